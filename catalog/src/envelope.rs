//! The outer shape of a Debezium JSON change event, as the consumers of
//! the topics (metrics-consumer, dwh-sink) read it. Pure.
//!
//! Both take the same steps before their own work: a missing or `null`
//! value is a tombstone, the schemas-enabled form keeps the envelope in
//! `payload`, `op` names the change (`m`, a logical message, carries no
//! row), and `source` says where the change came from. The row images are
//! left to the caller's type: raw JSON for the warehouse, the few columns
//! the metrics fold for the consumer.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The change's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `c`: insert.
    Create,
    /// `u`: update.
    Update,
    /// `d`: delete.
    Delete,
    /// `r`: snapshot read.
    Read,
    /// `t`: truncate.
    Truncate,
}

impl Op {
    /// The op's letter, as in the event.
    pub fn letter(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Truncate => "t",
        }
    }
}

/// The `source` block: where and when the change happened.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Source<'a> {
    /// `source.db`: the database as captured.
    #[serde(borrow, default)]
    pub db: Option<Cow<'a, str>>,
    /// `source.table`.
    #[serde(borrow, default)]
    pub table: Option<Cow<'a, str>>,
    /// `source.ts_ms`: commit time, ms since the epoch.
    #[serde(default)]
    pub ts_ms: Option<i64>,
    /// `source.ts_us`: commit time, µs since the epoch (newer Debezium).
    #[serde(default)]
    pub ts_us: Option<i64>,
    /// `source.lsn`: the change's own LSN.
    #[serde(default)]
    pub lsn: Option<u64>,
    /// `source.commit_lsn`: the commit LSN of its transaction (our
    /// reader's; Debezium's events have none).
    #[serde(default)]
    pub commit_lsn: Option<u64>,
    /// `source.snapshot` as written (`"false"`, `"true"`, `"last"`, ...).
    #[serde(borrow, default)]
    pub snapshot: Option<&'a RawValue>,
    /// `source.txId`.
    #[serde(rename = "txId", default)]
    pub tx_id: Option<i64>,
}

impl Source<'_> {
    /// Whether the event comes from a snapshot (any `snapshot` other than
    /// absent, `null` or `false`).
    pub fn is_snapshot(&self) -> bool {
        !matches!(
            self.snapshot.map(RawValue::get),
            None | Some("null" | "false" | "\"false\"")
        )
    }
}

/// A change event's value with its row images read as `R`.
#[derive(Debug, Clone)]
pub struct Envelope<'a, R> {
    /// The change's kind.
    pub op: Op,
    /// Where and when it happened.
    pub source: Source<'a>,
    /// The row before (`None` when null or absent).
    pub before: Option<R>,
    /// The row after (`None` when null or absent).
    pub after: Option<R>,
}

/// A message's value, read.
#[derive(Debug, Clone)]
pub enum Parsed<'a, R> {
    /// A change event.
    Change(Envelope<'a, R>),
    /// A tombstone (null value after a delete): no change.
    Tombstone,
    /// An event that carries no row change (`op: "m"`).
    Ignored,
}

/// Why a value is not a change event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unreadable {
    /// Not UTF-8 JSON of the envelope's shape (the parser's reason).
    NotJson(String),
    /// A required field (`op`, `source`) is missing or null.
    MissingField(&'static str),
    /// `op` is not one of c, u, d, r, t, m (its first 16 characters).
    UnknownOp(String),
}

#[derive(Deserialize)]
#[serde(bound(deserialize = "R: Deserialize<'de>"))]
struct Wire<'a, R> {
    #[serde(default)]
    before: Option<R>,
    #[serde(default)]
    after: Option<R>,
    #[serde(borrow, default)]
    source: Option<Source<'a>>,
    #[serde(borrow, default)]
    op: Option<Cow<'a, str>>,
    /// Schemas-enabled form: the envelope sits in `payload`.
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
}

/// Reads a message's value (`None`: a tombstone).
pub fn parse<'a, R: Deserialize<'a>>(value: Option<&'a [u8]>) -> Result<Parsed<'a, R>, Unreadable> {
    let Some(value) = value else {
        return Ok(Parsed::Tombstone);
    };
    let text =
        std::str::from_utf8(value).map_err(|_| Unreadable::NotJson("not utf-8".to_owned()))?;
    if text.trim() == "null" {
        return Ok(Parsed::Tombstone);
    }
    let mut wire: Wire<'a, R> =
        serde_json::from_str(text).map_err(|e| Unreadable::NotJson(e.to_string()))?;
    if let (None, Some(payload)) = (&wire.op, wire.payload) {
        wire =
            serde_json::from_str(payload.get()).map_err(|e| Unreadable::NotJson(e.to_string()))?;
    }
    let op = match wire.op.as_deref().ok_or(Unreadable::MissingField("op"))? {
        "c" => Op::Create,
        "u" => Op::Update,
        "d" => Op::Delete,
        "r" => Op::Read,
        "t" => Op::Truncate,
        "m" => return Ok(Parsed::Ignored),
        other => return Err(Unreadable::UnknownOp(other.chars().take(16).collect())),
    };
    let source = wire.source.ok_or(Unreadable::MissingField("source"))?;
    Ok(Parsed::Change(Envelope {
        op,
        source,
        before: wire.before,
        after: wire.after,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    type Raw<'a> = &'a RawValue;

    fn change(value: &str) -> Envelope<'_, Raw<'_>> {
        match parse::<Raw<'_>>(Some(value.as_bytes())).unwrap() {
            Parsed::Change(e) => e,
            other => panic!("not a change: {other:?}"),
        }
    }

    #[test]
    fn reads_op_source_and_rows() {
        let e = change(
            r#"{"before":null,"after":{"id":1},"source":{"db":"crm","table":"interaction","ts_ms":5,"ts_us":5001,"lsn":10,"commit_lsn":12,"snapshot":"false","txId":7},"op":"c"}"#,
        );
        assert_eq!(e.op, Op::Create);
        assert!(e.before.is_none());
        assert_eq!(e.after.unwrap().get(), r#"{"id":1}"#);
        let s = e.source;
        assert_eq!(
            (s.db.as_deref(), s.table.as_deref()),
            (Some("crm"), Some("interaction"))
        );
        assert_eq!(
            (s.ts_ms, s.ts_us, s.lsn, s.commit_lsn, s.tx_id),
            (Some(5), Some(5001), Some(10), Some(12), Some(7))
        );
        assert!(!s.is_snapshot());
    }

    #[test]
    fn schemas_enabled_form_reads_the_payload() {
        let e = change(
            r#"{"schema":{"type":"struct"},"payload":{"after":{"id":2},"source":{"db":"erp","table":"stock","snapshot":"last"},"op":"r"}}"#,
        );
        assert_eq!(e.op, Op::Read);
        assert!(e.source.is_snapshot());
    }

    #[test]
    fn tombstones_and_messages_carry_no_change() {
        for value in [None, Some("null"), Some(" null\n")] {
            let parsed = parse::<Raw<'_>>(value.map(str::as_bytes)).unwrap();
            assert!(matches!(parsed, Parsed::Tombstone), "{value:?}");
        }
        let parsed = parse::<Raw<'_>>(Some(br#"{"op":"m","message":{}}"#)).unwrap();
        assert!(matches!(parsed, Parsed::Ignored));
    }

    #[test]
    fn unreadable_values_say_why() {
        let err = |v: &[u8]| parse::<Raw<'_>>(Some(v)).unwrap_err();
        assert!(matches!(err(b"\xff"), Unreadable::NotJson(_)));
        assert!(matches!(err(b"{oops"), Unreadable::NotJson(_)));
        assert_eq!(err(br#"{"source":{}}"#), Unreadable::MissingField("op"));
        assert_eq!(err(br#"{"op":"c"}"#), Unreadable::MissingField("source"));
        assert_eq!(
            err(br#"{"op":"zzzzzzzzzzzzzzzzzzzzzz","source":{}}"#),
            Unreadable::UnknownOp("z".repeat(16))
        );
    }

    #[test]
    fn letters_round_trip() {
        for op in [Op::Create, Op::Update, Op::Delete, Op::Read, Op::Truncate] {
            let value = format!(r#"{{"op":"{}","source":{{}}}}"#, op.letter());
            assert_eq!(change(&value).op, op);
        }
    }
}
