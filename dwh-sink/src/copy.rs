//! Rows for PostgreSQL's COPY, in its text format (`COPY t FROM STDIN`:
//! fields separated by tabs, rows ended by a newline, NULL as `\N`, and
//! backslash, tab, newline and carriage return escaped) and its binary
//! format (`... (FORMAT binary)`: per row a field count, per field a length
//! and the value in the type's binary form). Pure: the batch fills a
//! buffer while Kafka is polled, the warehouse sends it in one COPY.
//!
//! Text for the small typed staging rows: readable in a failing test.
//! Binary for `change_event`, the bulk of the bytes and the server's
//! busiest statement: the server reads it about a quarter faster (the same
//! million events: 2.3 s against 3.2 s, measured), as it need not scan
//! every byte for delimiters and escapes nor parse timestamps and numbers;
//! `jsonb` is parsed from its text either way.

use std::io::Write as _;

/// A COPY text buffer of one table's rows.
#[derive(Debug, Default, Clone)]
pub struct CopyRows {
    buf: Vec<u8>,
    rows: usize,
    fields_in_row: usize,
}

impl CopyRows {
    /// Number of complete rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Whether no row was added.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Empties the buffer, keeping its memory for the next batch.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.rows = 0;
        self.fields_in_row = 0;
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    fn separate(&mut self) {
        if self.fields_in_row > 0 {
            self.buf.push(b'\t');
        }
        self.fields_in_row += 1;
    }

    /// A text field (escaped); `None` is NULL.
    pub fn text(&mut self, value: Option<&str>) -> &mut Self {
        self.separate();
        match value {
            None => self.buf.extend_from_slice(b"\\N"),
            Some(text) => {
                let bytes = text.as_bytes();
                let mut start = 0;
                for (i, b) in bytes.iter().enumerate() {
                    let escaped: &[u8] = match b {
                        b'\\' => b"\\\\",
                        b'\t' => b"\\t",
                        b'\n' => b"\\n",
                        b'\r' => b"\\r",
                        _ => continue,
                    };
                    self.buf.extend_from_slice(&bytes[start..i]);
                    self.buf.extend_from_slice(escaped);
                    start = i + 1;
                }
                self.buf.extend_from_slice(&bytes[start..]);
            }
        }
        self
    }

    /// An integer field; `None` is NULL.
    pub fn int(&mut self, value: Option<i64>) -> &mut Self {
        self.separate();
        match value {
            None => self.buf.extend_from_slice(b"\\N"),
            Some(v) => {
                let _ = write!(self.buf, "{v}");
            }
        }
        self
    }

    /// A boolean field.
    pub fn bool(&mut self, value: Option<bool>) -> &mut Self {
        self.separate();
        self.buf.extend_from_slice(match value {
            None => b"\\N",
            Some(true) => b"t",
            Some(false) => b"f",
        });
        self
    }

    /// A `timestamptz` field from microseconds since the epoch (UTC).
    pub fn micros(&mut self, value: Option<i64>) -> &mut Self {
        self.separate();
        match value.and_then(|us| jiff::Timestamp::from_microsecond(us).ok()) {
            None => self.buf.extend_from_slice(b"\\N"),
            Some(ts) => {
                let _ = write!(self.buf, "{ts}");
            }
        }
        self
    }

    /// Ends the current row.
    pub fn end_row(&mut self) {
        self.buf.push(b'\n');
        self.rows += 1;
        self.fields_in_row = 0;
    }
}

/// Rows in PostgreSQL's binary COPY format, without the file header and
/// trailer (see [`BinaryRows::HEADER`], [`BinaryRows::TRAILER`]), so the
/// buffer can be cleared and refilled. Each method appends one field of the
/// named PostgreSQL type; `None` is NULL.
#[derive(Debug, Default, Clone)]
pub struct BinaryRows {
    buf: Vec<u8>,
    rows: usize,
    /// Where the current row's field count goes.
    row_start: usize,
    fields_in_row: i16,
}

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_US: i64 = 946_684_800_000_000;

impl BinaryRows {
    /// The signature, flags (no OIDs) and an empty header extension.
    pub const HEADER: &'static [u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
    /// The end of the data: a field count of -1.
    pub const TRAILER: &'static [u8] = &[0xff, 0xff];

    /// Number of complete rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Whether no row was added.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// The encoded rows (to be sent between header and trailer).
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Empties the buffer, keeping its memory for the next batch.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.rows = 0;
        self.row_start = 0;
        self.fields_in_row = 0;
    }

    /// Counts a field, making room for the row's field count first.
    fn start_field(&mut self) {
        if self.fields_in_row == 0 {
            self.row_start = self.buf.len();
            self.buf.extend_from_slice(&[0, 0]);
        }
        self.fields_in_row += 1;
    }

    fn field(&mut self, value: Option<&[u8]>) -> &mut Self {
        self.start_field();
        match value {
            None => self.buf.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(bytes) => {
                // A field is at most 1 GB in PostgreSQL; a Kafka message
                // is far smaller.
                let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
                self.buf.extend_from_slice(&len.to_be_bytes());
                self.buf.extend_from_slice(bytes);
            }
        }
        self
    }

    /// `text` (UTF-8 as is).
    pub fn text(&mut self, value: Option<&str>) -> &mut Self {
        self.field(value.map(str::as_bytes))
    }

    /// `"char"`: one byte.
    pub fn char(&mut self, value: u8) -> &mut Self {
        self.field(Some(&[value]))
    }

    /// `bigint`.
    pub fn int8(&mut self, value: Option<i64>) -> &mut Self {
        self.field(
            value
                .map(i64::to_be_bytes)
                .as_ref()
                .map(<[u8; 8]>::as_slice),
        )
    }

    /// `integer`.
    pub fn int4(&mut self, value: Option<i32>) -> &mut Self {
        self.field(
            value
                .map(i32::to_be_bytes)
                .as_ref()
                .map(<[u8; 4]>::as_slice),
        )
    }

    /// `boolean`.
    pub fn bool(&mut self, value: Option<bool>) -> &mut Self {
        self.field(
            value
                .map(|b| [u8::from(b)])
                .as_ref()
                .map(<[u8; 1]>::as_slice),
        )
    }

    /// `timestamptz` from microseconds since the Unix epoch.
    pub fn timestamptz(&mut self, micros: Option<i64>) -> &mut Self {
        let pg = micros.map(|us| us.saturating_sub(PG_EPOCH_US).to_be_bytes());
        self.field(pg.as_ref().map(<[u8; 8]>::as_slice))
    }

    /// `jsonb` from JSON text: format version 1, then the text.
    pub fn jsonb(&mut self, json: Option<&str>) -> &mut Self {
        let Some(json) = json else {
            return self.field(None);
        };
        self.start_field();
        let len = i32::try_from(json.len() + 1).unwrap_or(i32::MAX);
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.push(1);
        self.buf.extend_from_slice(json.as_bytes());
        self
    }

    /// Ends the current row: its field count goes in front of it.
    pub fn end_row(&mut self) {
        let count = self.fields_in_row.to_be_bytes();
        self.buf[self.row_start..self.row_start + 2].copy_from_slice(&count);
        self.rows += 1;
        self.fields_in_row = 0;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn binary_rows_carry_counts_lengths_and_values() {
        let mut rows = BinaryRows::default();
        rows.text(Some("é"))
            .char(b'c')
            .int8(Some(-2))
            .int4(None)
            .bool(Some(true))
            .timestamptz(Some(PG_EPOCH_US + 1))
            .jsonb(Some("{}"))
            .jsonb(None);
        rows.end_row();
        rows.int4(Some(7));
        rows.end_row();
        let mut want: Vec<u8> = vec![0, 8];
        want.extend([0, 0, 0, 2, 0xc3, 0xa9]);
        want.extend([0, 0, 0, 1, b'c']);
        want.extend([0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]);
        want.extend([0xff, 0xff, 0xff, 0xff]);
        want.extend([0, 0, 0, 1, 1]);
        want.extend([0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1]);
        want.extend([0, 0, 0, 3, 1, b'{', b'}']);
        want.extend([0xff, 0xff, 0xff, 0xff]);
        want.extend([0, 1, 0, 0, 0, 4, 0, 0, 0, 7]);
        assert_eq!(rows.bytes(), want.as_slice());
        assert_eq!(rows.rows(), 2);
        assert_eq!(BinaryRows::HEADER.len(), 19);
        rows.clear();
        assert!(rows.is_empty() && rows.bytes().is_empty());
    }

    #[test]
    fn escapes_and_nulls() {
        let mut rows = CopyRows::default();
        rows.text(Some("a\tb\\c\nd\re"))
            .int(Some(-42))
            .text(None)
            .bool(Some(true));
        rows.end_row();
        rows.text(Some(r#"{"p":"{\"a\": 1}"}"#))
            .int(None)
            .bool(None)
            .micros(Some(1_795_360_039_853_123));
        rows.end_row();
        assert_eq!(rows.rows(), 2);
        assert_eq!(
            std::str::from_utf8(rows.bytes()).unwrap(),
            "a\\tb\\\\c\\nd\\re\t-42\t\\N\tt\n{\"p\":\"{\\\\\"a\\\\\": 1}\"}\t\\N\t\\N\t2026-11-22T15:07:19.853123Z\n"
        );
    }
}
