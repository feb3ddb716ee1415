//! A Debezium change-event message (key and value bytes, JSON, schemas
//! disabled or enabled) decoded into what `change_event` stores. Pure.
//!
//! The row images stay raw JSON text (`before`, `after` borrowed from the
//! message): the warehouse parses them into `jsonb` itself, so the sink
//! never re-renders a value the source wrote.

use serde_json::value::RawValue;

pub use catalog::envelope::Op;

/// One change event.
#[derive(Debug, Clone)]
pub struct Event<'a> {
    /// `source.db`, after `--source-dbs` renames.
    pub db: String,
    /// `source.table`.
    pub table: String,
    /// The key as canonical JSON (keys sorted, no spaces); empty for a
    /// truncate or a table without key.
    pub key: String,
    /// The change's kind.
    pub op: Op,
    /// `source.ts_ms` (commit time) in microseconds since the epoch.
    pub commit_time_us: i64,
    /// `source.lsn`.
    pub lsn: i64,
    /// `source.commit_lsn` (our reader's; absent from Debezium's events).
    pub commit_lsn: Option<i64>,
    /// Whether the event comes from a snapshot.
    pub snapshot: bool,
    /// `source.txId`.
    pub tx_id: Option<i64>,
    /// The row before, raw JSON (`None` when null or absent).
    pub before: Option<&'a RawValue>,
    /// The row after, raw JSON.
    pub after: Option<&'a RawValue>,
}

impl Event<'_> {
    /// Where the event sits in its source's history: `(commit_lsn, lsn)`,
    /// with the change's own LSN standing in for a missing commit LSN.
    pub fn position(&self) -> (i64, i64) {
        (self.commit_lsn.unwrap_or(self.lsn), self.lsn)
    }
}

/// A decoded message.
#[derive(Debug, Clone)]
pub enum Decoded<'a> {
    /// A change to store.
    Change(Event<'a>),
    /// A tombstone (null value after a delete): nothing to store.
    Tombstone,
    /// An event that carries no row change (`op: "m"`).
    Ignored,
}

/// Why a message cannot be stored: dead-lettered, counted and skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadInput {
    /// Not a JSON object of the envelope's shape.
    #[error("value is not a Debezium JSON envelope: {0}")]
    NotJson(String),
    /// A required field is missing or null.
    #[error("required field `{0}` is missing or null")]
    MissingField(&'static str),
    /// A field holds a value of the wrong form.
    #[error("field `{0}` has an unreadable value")]
    BadValue(&'static str),
    /// `op` is not one of c, u, d, r, t, m.
    #[error("unknown op `{0}`")]
    UnknownOp(String),
    /// A row image PostgreSQL's jsonb refuses: a `\u0000` or unpaired
    /// surrogate escape. Caught here, or it would fail its whole batch on
    /// every retry.
    #[error("field `{0}` holds \\u0000 or an unpaired surrogate, which jsonb cannot store")]
    NotStorable(&'static str),
}

impl BadInput {
    /// A short stable name, for logging once per kind.
    pub fn kind(&self) -> &'static str {
        match self {
            BadInput::NotJson(_) => "not_json",
            BadInput::MissingField(_) => "missing_field",
            BadInput::BadValue(_) => "bad_value",
            BadInput::UnknownOp(_) => "unknown_op",
            BadInput::NotStorable(_) => "not_storable",
        }
    }
}

fn non_null(raw: Option<&RawValue>) -> Option<&RawValue> {
    raw.filter(|r| r.get() != "null")
}

/// Whether PostgreSQL's jsonb takes this JSON text: no `\u0000` escape and
/// no surrogate escape outside a high-low pair (JSON itself allows both).
/// Backslashes only occur in strings, each starting one escape, so a scan
/// from one to the next reads every escape and nothing else.
fn jsonb_storable(json: &str) -> bool {
    let bytes = json.as_bytes();
    let hex = |at: usize| {
        bytes
            .get(at..at + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u16::from_str_radix(h, 16).ok())
    };
    let mut at = 0;
    while let Some(found) = json.get(at..).and_then(|rest| rest.find('\\')) {
        let slash = at + found;
        if bytes.get(slash + 1) != Some(&b'u') {
            at = slash + 2;
            continue;
        }
        match hex(slash + 2) {
            Some(0) | None => return false,
            Some(0xd800..=0xdbff) => {
                let low = bytes.get(slash + 6..slash + 8) == Some(b"\\u".as_slice())
                    && matches!(hex(slash + 8), Some(0xdc00..=0xdfff));
                if !low {
                    return false;
                }
                at = slash + 12;
            }
            Some(0xdc00..=0xdfff) => return false,
            Some(_) => at = slash + 6,
        }
    }
    true
}

/// The reader's snapshot-complete marker: the snapshot of `db.table` ended,
/// its rows at `commit_lsn` (the consistent point - 1).
///
/// It comes on every partition of the table's topic after that partition's
/// snapshot rows, as a record with a null key and a null value and the
/// `cdc.*` headers. Every row of the table whose last event committed
/// before the snapshot and that this snapshot did not read again is gone
/// (deleted while no slot recorded anything); the warehouse ends those rows
/// at `(commit_lsn, commit_lsn)`, below every snapshot row (at
/// `(commit_lsn, commit_lsn + 1)`) and above every earlier
/// event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// `cdc.db`, after `--source-dbs` renames.
    pub db: String,
    /// `cdc.table`.
    pub table: String,
    /// `cdc.commit_lsn`.
    pub commit_lsn: i64,
}

/// The snapshot-complete marker in a message's headers: `None` when the
/// message is not one (no `cdc.marker` header, or a kind this sink does not
/// know, which it skips like a tombstone).
pub fn decode_marker<'a>(
    headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    renames: &[(String, String)],
) -> Option<Result<Marker, BadInput>> {
    use catalog::marker::Unreadable;
    let marker = match catalog::marker::read(headers)? {
        Ok(m) => m,
        Err(Unreadable::Missing(header)) => return Some(Err(BadInput::MissingField(header))),
        Err(Unreadable::BadValue(header)) => return Some(Err(BadInput::BadValue(header))),
    };
    // The warehouse keeps positions as bigint, like every event's LSN.
    let Ok(commit_lsn) = i64::try_from(marker.commit_lsn) else {
        return Some(Err(BadInput::BadValue("header cdc.commit_lsn")));
    };
    Some(Ok(Marker {
        db: catalog::alias::logical(marker.db, renames).to_owned(),
        table: marker.table.to_owned(),
        commit_lsn,
    }))
}

/// Decodes one Kafka message. `renames` maps a captured database name to
/// its logical name.
pub fn decode<'a>(
    key: Option<&[u8]>,
    value: Option<&'a [u8]>,
    renames: &[(String, String)],
) -> Result<Decoded<'a>, BadInput> {
    use catalog::envelope::{Parsed, Unreadable};
    let envelope = match catalog::envelope::parse::<&'a RawValue>(value) {
        Ok(Parsed::Change(envelope)) => envelope,
        Ok(Parsed::Tombstone) => return Ok(Decoded::Tombstone),
        Ok(Parsed::Ignored) => return Ok(Decoded::Ignored),
        Err(Unreadable::NotJson(why)) => return Err(BadInput::NotJson(why)),
        Err(Unreadable::MissingField(field)) => return Err(BadInput::MissingField(field)),
        Err(Unreadable::UnknownOp(op)) => return Err(BadInput::UnknownOp(op)),
    };
    let op = envelope.op;
    let source = &envelope.source;
    let db = source
        .db
        .as_deref()
        .ok_or(BadInput::MissingField("source.db"))?;
    let db = catalog::alias::logical(db, renames).to_owned();
    let table = source
        .table
        .as_deref()
        .ok_or(BadInput::MissingField("source.table"))?
        .to_owned();
    let commit_time_us = match (source.ts_us, source.ts_ms) {
        (Some(us), _) => us,
        (None, Some(ms)) => ms
            .checked_mul(1000)
            .ok_or(BadInput::BadValue("source.ts_ms"))?,
        (None, None) => return Err(BadInput::MissingField("source.ts_ms")),
    };
    // The warehouse keeps positions as bigint.
    let position = |lsn: u64, field| i64::try_from(lsn).map_err(|_| BadInput::BadValue(field));
    let lsn = position(
        source.lsn.ok_or(BadInput::MissingField("source.lsn"))?,
        "source.lsn",
    )?;
    let commit_lsn = source
        .commit_lsn
        .map(|c| position(c, "source.commit_lsn"))
        .transpose()?;
    let snapshot = source.is_snapshot();
    let before = non_null(envelope.before);
    let after = non_null(envelope.after);
    if before.is_some_and(|r| !jsonb_storable(r.get())) {
        return Err(BadInput::NotStorable("before"));
    }
    if after.is_some_and(|r| !jsonb_storable(r.get())) {
        return Err(BadInput::NotStorable("after"));
    }
    // A NUL in a name fails a text column as `\u0000` fails jsonb.
    if db.contains('\0') {
        return Err(BadInput::BadValue("source.db"));
    }
    if table.contains('\0') {
        return Err(BadInput::BadValue("source.table"));
    }
    match op {
        Op::Create | Op::Update | Op::Read if after.is_none() => {
            return Err(BadInput::MissingField("after"));
        }
        _ => {}
    }
    let key = match op {
        Op::Truncate => String::new(),
        _ => canonical_key(key)?,
    };
    Ok(Decoded::Change(Event {
        db,
        table,
        key,
        op,
        commit_time_us,
        lsn,
        commit_lsn,
        snapshot,
        tx_id: source.tx_id,
        before,
        after,
    }))
}

/// The key as canonical JSON: object keys sorted, no whitespace, the
/// schemas-enabled wrapper removed; empty for a null or absent key.
fn canonical_key(key: Option<&[u8]>) -> Result<String, BadInput> {
    let Some(key) = key else {
        return Ok(String::new());
    };
    let value: serde_json::Value =
        serde_json::from_slice(key).map_err(|_| BadInput::BadValue("key"))?;
    let value = match value {
        serde_json::Value::Object(mut map)
            if map.contains_key("payload") && map.contains_key("schema") =>
        {
            map.remove("payload").unwrap_or(serde_json::Value::Null)
        }
        other => other,
    };
    if value.is_null() {
        return Ok(String::new());
    }
    // serde_json's map is ordered by key (no `preserve_order` feature).
    Ok(value.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn row_images_jsonb_cannot_store_are_refused() {
        for ok in [
            r#"{"a":"x"}"#,
            r#"{"a":"\u00e9\n\\u0000"}"#,
            r#"{"a":"\ud83d\ude00"}"#,
            r#"{"a":"\\"}"#,
        ] {
            assert!(jsonb_storable(ok), "{ok}");
        }
        for bad in [
            r#"{"a":"x\u0000"}"#,
            r#"{"a":"\ud800"}"#,
            r#"{"a":"\ud800\u0041"}"#,
            r#"{"a":"\udc00"}"#,
            r#"{"\u0000":1}"#,
        ] {
            assert!(!jsonb_storable(bad), "{bad}");
        }
        let value = UPDATE.replace(r#""2.50""#, r#""2.50\u0000""#);
        let e = decode(Some(br#"{"id":7}"#), Some(value.as_bytes()), &[]).unwrap_err();
        assert_eq!(e, BadInput::NotStorable("after"));
        assert_eq!(e.kind(), "not_storable");
    }

    const UPDATE: &str = r#"{"before":{"id":7,"price":"1.00"},"after":{"id":7,"price":"2.50"},"source":{"version":"0.1.0","connector":"postgresql","name":"instashop","ts_ms":1795360039853,"snapshot":"false","db":"scratch_db","schema":"public","table":"product","txId":812,"lsn":2000,"xmin":null,"commit_lsn":2100},"op":"u","ts_ms":1795360062077,"transaction":null}"#;

    #[test]
    fn decodes_an_update_with_positions_and_rename() {
        let renames = vec![("scratch_db".to_owned(), "instashop".to_owned())];
        let Decoded::Change(e) =
            decode(Some(br#"{ "id" : 7 }"#), Some(UPDATE.as_bytes()), &renames).unwrap()
        else {
            panic!("not a change")
        };
        assert_eq!(e.db, "instashop");
        assert_eq!(e.table, "product");
        assert_eq!(e.key, r#"{"id":7}"#);
        assert_eq!(e.op, Op::Update);
        assert_eq!(e.commit_time_us, 1_795_360_039_853_000);
        assert_eq!(e.position(), (2100, 2000));
        assert_eq!(e.tx_id, Some(812));
        assert!(!e.snapshot);
        assert_eq!(e.after.unwrap().get(), r#"{"id":7,"price":"2.50"}"#);
    }

    #[test]
    fn debezium_events_without_commit_lsn_order_by_lsn() {
        let v = UPDATE.replace(r#","commit_lsn":2100"#, "");
        let Decoded::Change(e) = decode(Some(br#"{"id":7}"#), Some(v.as_bytes()), &[]).unwrap()
        else {
            panic!("not a change")
        };
        assert_eq!(e.commit_lsn, None);
        assert_eq!(e.position(), (2000, 2000));
        assert_eq!(e.db, "scratch_db");
    }

    #[test]
    fn tombstones_messages_and_bad_input() {
        assert!(matches!(
            decode(Some(b"{}"), None, &[]).unwrap(),
            Decoded::Tombstone
        ));
        assert!(matches!(
            decode(Some(b"{}"), Some(b"null"), &[]).unwrap(),
            Decoded::Tombstone
        ));
        assert!(matches!(
            decode(None, Some(br#"{"op":"m","source":{}}"#), &[]).unwrap(),
            Decoded::Ignored
        ));
        assert_eq!(
            decode(None, Some(b"not json"), &[]).unwrap_err().kind(),
            "not_json"
        );
        assert_eq!(
            decode(None, Some(br#"{"op":"x"}"#), &[]).unwrap_err(),
            BadInput::UnknownOp("x".into())
        );
        let no_after = UPDATE.replace(r#""after":{"id":7,"price":"2.50"}"#, r#""after":null"#);
        assert_eq!(
            decode(Some(b"{\"id\":7}"), Some(no_after.as_bytes()), &[]).unwrap_err(),
            BadInput::MissingField("after")
        );
        let no_lsn = UPDATE.replace(r#""lsn":2000,"#, "");
        assert_eq!(
            decode(Some(b"{\"id\":7}"), Some(no_lsn.as_bytes()), &[]).unwrap_err(),
            BadInput::MissingField("source.lsn")
        );
    }

    #[test]
    fn truncate_has_no_key_and_snapshot_reads_are_marked() {
        let t = r#"{"before":null,"after":null,"source":{"ts_ms":5,"db":"erp","table":"stock","lsn":9,"snapshot":"false"},"op":"t"}"#;
        let Decoded::Change(e) = decode(None, Some(t.as_bytes()), &[]).unwrap() else {
            panic!("not a change")
        };
        assert_eq!((e.op, e.key.as_str()), (Op::Truncate, ""));
        let r = UPDATE
            .replace(r#""op":"u""#, r#""op":"r""#)
            .replace(r#""snapshot":"false""#, r#""snapshot":"true""#);
        let Decoded::Change(e) = decode(Some(b"{\"id\":7}"), Some(r.as_bytes()), &[]).unwrap()
        else {
            panic!("not a change")
        };
        assert!(e.snapshot);
        assert_eq!(e.op, Op::Read);
    }

    #[test]
    fn snapshot_complete_markers_are_read_from_headers() {
        let renames = vec![("scratch".to_owned(), "instashop".to_owned())];
        let headers = |commit: &'static str| {
            vec![
                ("cdc.marker", Some(&b"snapshot_complete"[..])),
                ("cdc.db", Some(&b"scratch"[..])),
                ("cdc.schema", Some(&b"public"[..])),
                ("cdc.table", Some(&b"product"[..])),
                ("cdc.commit_lsn", Some(commit.as_bytes())),
                ("cdc.lsn", Some(&b"101"[..])),
            ]
        };
        assert_eq!(
            decode_marker(headers("100"), &renames),
            Some(Ok(Marker {
                db: "instashop".into(),
                table: "product".into(),
                commit_lsn: 100,
            }))
        );
        assert_eq!(
            decode_marker(headers("x"), &renames),
            Some(Err(BadInput::BadValue("header cdc.commit_lsn")))
        );
        let mut no_table = headers("100");
        no_table.retain(|(k, _)| *k != "cdc.table");
        assert_eq!(
            decode_marker(no_table, &[]),
            Some(Err(BadInput::MissingField("header cdc.table")))
        );
        assert_eq!(decode_marker([("other", None)], &[]), None);
        assert_eq!(
            decode_marker([("cdc.marker", Some(&b"later_kind"[..]))], &[]),
            None
        );
    }

    #[test]
    fn schemas_enabled_envelopes_are_unwrapped() {
        let wrapped = format!(r#"{{"schema":{{}},"payload":{UPDATE}}}"#);
        let key = br#"{"schema":{},"payload":{"id":7}}"#;
        let Decoded::Change(e) = decode(Some(key), Some(wrapped.as_bytes()), &[]).unwrap() else {
            panic!("not a change")
        };
        assert_eq!(e.key, r#"{"id":7}"#);
        assert_eq!(e.op, Op::Update);
    }
}
