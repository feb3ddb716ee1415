//! Rows in PostgreSQL's COPY text format (`COPY t FROM STDIN`): fields
//! separated by tabs, rows ended by a newline, NULL as `\N`, and backslash,
//! tab, newline and carriage return escaped. Pure: the batch fills a buffer
//! while Kafka is polled, the warehouse sends it in one COPY.
//!
//! Why text and not binary: the JSON row images are the bulk of the bytes,
//! and `jsonb` is parsed from text by the server either way; text keeps the
//! encoder small and the buffer readable in a failing test.

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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
