//! The pure heart of the consumer: a Debezium change event becomes the new
//! *contribution* of its source row to the metrics, and a row's contribution
//! replaces the one it had before ("retract the old, add the new").
//!
//! Why per-row contributions: an event's effect then depends only on the row's
//! prior contribution, never on how often or in which order events were seen.
//! A replayed event, a reader's re-send after its crash, or an `r` event of a
//! repeated snapshot finds the same contribution already in place and changes
//! nothing; an update from `completed` to `refunded` retracts the revenue the
//! row added. `before` is not needed (the prior contribution is kept by the
//! store), so tables with `REPLICA IDENTITY DEFAULT` work as well as `FULL`.
//!
//! The category GMV is a stream–table join. A detail row contributes its
//! amount to its *product* ([`Code::ProductGmv`]); a product row contributes
//! its category ([`Code::ProductCategory`]). The store keeps per-product GMV and
//! product → category and moves the product's whole GMV when its category
//! changes, so a detail that arrives before its product counts once the
//! product arrives. [`MemStore`] is the reference implementation of those
//! rules; `store.lua` applies the same rules inside Redis.
//!
//! Order: an event's [`Position`] is `(source.commit_lsn, source.lsn)`, the
//! commit of its source transaction and then the change within it. The LSN
//! of the change alone does not order across the reader's snapshot point C: a
//! transaction already running at C and committing after it is streamed with
//! changes below C, yet it is newer than the snapshot rows (whose position is
//! `(C, C)`). `commit_lsn` is a field of our reader, not Debezium's; events
//! without it (older readers, Debezium itself) are ordered by `source.lsn`
//! alone, and for them a change of such a transaction is still skipped as
//! older than the snapshot row.
//!
//! The encoded form ([`encode_state`]) is what Redis stores per row:
//! `<position>` then tokens `<code><field>\x1f<amount>`, separated by
//! `\x1e`. The script only compares stored states as strings.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::money::{self, MoneyError};

pub use catalog::Table;

/// What a contribution adds to. The char is the code in the encoded state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Code {
    /// `count:<field>` (field = `<db>.<table>`).
    Count,
    /// `transactions:status` hash, field = status.
    TxStatus,
    /// `revenue:total_cents` (field empty).
    Revenue,
    /// `revenue:daily_cents` hash, field = `YYYY-MM-DD`.
    RevenueDaily,
    /// `window:30s:<field>` hash field `transactions`.
    WindowTx,
    /// `window:30s:<field>` hash field `revenue_cents`.
    WindowRevenue,
    /// `stock:units` (field empty).
    StockUnits,
    /// `shipments:status` hash, field = status.
    ShipmentStatus,
    /// `interactions:type` hash, field = type.
    InteractionType,
    /// Per-product GMV cents (join input), field = product id.
    ProductGmv,
    /// Product → category (join input), field = `<product id>\x1d<category>`.
    ProductCategory,
}

impl Code {
    /// The code's char in the encoded state.
    pub fn as_char(self) -> char {
        match self {
            Code::Count => 'N',
            Code::TxStatus => 'S',
            Code::Revenue => 'R',
            Code::RevenueDaily => 'D',
            Code::WindowTx => 'W',
            Code::WindowRevenue => 'V',
            Code::StockUnits => 'K',
            Code::ShipmentStatus => 'H',
            Code::InteractionType => 'I',
            Code::ProductGmv => 'P',
            Code::ProductCategory => 'C',
        }
    }

    fn from_char(c: char) -> Option<Code> {
        Some(match c {
            'N' => Code::Count,
            'S' => Code::TxStatus,
            'R' => Code::Revenue,
            'D' => Code::RevenueDaily,
            'W' => Code::WindowTx,
            'V' => Code::WindowRevenue,
            'K' => Code::StockUnits,
            'H' => Code::ShipmentStatus,
            'I' => Code::InteractionType,
            'P' => Code::ProductGmv,
            'C' => Code::ProductCategory,
            _ => return None,
        })
    }
}

/// One row's share of one metric.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Contribution {
    /// Which metric.
    pub code: Code,
    /// Hash field or key suffix (see [`Code`]).
    pub field: String,
    /// Amount (a count or cents or units).
    pub amount: i64,
}

impl Contribution {
    fn new(code: Code, field: impl Into<String>, amount: i64) -> Self {
        Contribution {
            code,
            field: field.into(),
            amount,
        }
    }
}

/// Where an event sits in its source's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    /// `source.commit_lsn`: the commit of the event's transaction (for a
    /// snapshot row, the snapshot's consistent point). `None` for events of
    /// older readers and of Debezium.
    pub commit_lsn: Option<u64>,
    /// `source.lsn`: the change itself.
    pub lsn: u64,
}

impl Position {
    /// A position known only by the change's LSN.
    pub fn lsn(lsn: u64) -> Position {
        Position {
            commit_lsn: None,
            lsn,
        }
    }

    /// A position with its transaction's commit LSN.
    pub fn at(commit_lsn: u64, lsn: u64) -> Position {
        Position {
            commit_lsn: Some(commit_lsn),
            lsn,
        }
    }

    /// Order of two positions: by `(commit_lsn, lsn)` when both know their
    /// commit, else by `lsn` alone (the documented fallback).
    pub fn order(&self, other: &Position) -> Ordering {
        match (self.commit_lsn, other.commit_lsn) {
            (Some(a), Some(b)) => (a, self.lsn).cmp(&(b, other.lsn)),
            _ => self.lsn.cmp(&other.lsn),
        }
    }
}

/// What the store keeps per source row: the position of the last event
/// applied (to skip older re-sends) and the row's contributions (empty once
/// deleted).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RowState {
    /// Position of the last applied event, when the event carried one.
    pub position: Option<Position>,
    /// The row's current contributions; empty for a deleted row.
    pub contributions: Vec<Contribution>,
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A row's new state: `c`, `u`, `r` (contributions) or `d` (none).
    Row {
        /// Source table.
        table: Table,
        /// Primary key, canonical text (`42` for `{"id":42}`).
        id: String,
        /// The state after the event.
        state: RowState,
        /// `source.ts_ms`: commit time in ms.
        ts_ms: Option<i64>,
    },
    /// `op: "t"`: every row of the table changed before it is gone.
    Truncate {
        /// Source table.
        table: Table,
        /// Where the truncate happened; `None` from sources without
        /// `source.lsn`: then it retracts every row applied before it.
        position: Option<Position>,
        /// `source.ts_ms`.
        ts_ms: Option<i64>,
    },
    /// A tombstone (null value after a delete): nothing to do.
    Tombstone,
    /// An event that carries no row change (`op: "m"`).
    Ignored,
}

impl Change {
    /// `source.ts_ms` (commit time), if the change has one.
    pub fn ts_ms(&self) -> Option<i64> {
        match self {
            Change::Row { ts_ms, .. } | Change::Truncate { ts_ms, .. } => *ts_ms,
            Change::Tombstone | Change::Ignored => None,
        }
    }

    /// The source table, if the change has one.
    pub fn table(&self) -> Option<Table> {
        match self {
            Change::Row { table, .. } | Change::Truncate { table, .. } => Some(*table),
            Change::Tombstone | Change::Ignored => None,
        }
    }
}

/// Why a message cannot be applied. Bad data: count, dead-letter and skip.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadInput {
    /// The value is not JSON or not a JSON object of the expected shape.
    #[error("value is not a Debezium JSON envelope: {0}")]
    NotJson(String),
    /// A required field is missing or null.
    #[error("required field `{0}` is missing or null")]
    MissingField(&'static str),
    /// A field holds a value of the wrong form.
    #[error("field `{0}` has an unreadable value")]
    BadValue(&'static str),
    /// `source.db`/`source.table` is not one of the nine tables.
    #[error("unknown table `{0}`: not one of the nine metric tables")]
    UnknownTable(String),
    /// `op` is not one of c, u, d, r, t, m.
    #[error("unknown op `{0}`")]
    UnknownOp(String),
}

impl BadInput {
    /// A short stable name for logging once per kind and for counters.
    pub fn kind(&self) -> &'static str {
        match self {
            BadInput::NotJson(_) => "not_json",
            BadInput::MissingField(_) => "missing_field",
            BadInput::BadValue(_) => "bad_value",
            BadInput::UnknownTable(_) => "unknown_table",
            BadInput::UnknownOp(_) => "unknown_op",
        }
    }
}

#[derive(Deserialize, Default)]
struct Row<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    status: Option<&'a RawValue>,
    #[serde(borrow, default)]
    total_amount: Option<&'a RawValue>,
    #[serde(borrow, default)]
    created_at: Option<&'a RawValue>,
    #[serde(borrow, default)]
    product_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    quantity: Option<&'a RawValue>,
    #[serde(borrow, default)]
    unit_price: Option<&'a RawValue>,
    #[serde(borrow, default)]
    category: Option<&'a RawValue>,
    #[serde(borrow, default)]
    interaction_type: Option<&'a RawValue>,
}

/// The reader's snapshot-complete marker, read from a message's headers:
/// `None` when the message is not one (no `cdc.marker` header, or a marker
/// kind this consumer does not know, which it skips like a tombstone).
///
/// The marker (null key, null value, on every partition of a table's topic)
/// says the reader's snapshot of the table ended, its rows at
/// `(cdc.commit_lsn, cdc.lsn)`. Every row of the table whose last event
/// committed before the snapshot (`commit_lsn` below the marker's) and that
/// the snapshot did not re-read is gone: the reader restarted from scratch
/// never saw its delete. It folds as a positioned truncate at
/// `(cdc.commit_lsn, 0)`: below every snapshot row, above every event
/// committed before the snapshot (whose commit record starts before the
/// consistent point - 1), so copies on other partitions, re-deliveries and
/// snapshot rows read after it in any order give the same result.
pub fn decode_marker<'a>(
    headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    renames: &[(String, String)],
) -> Option<Result<Change, BadInput>> {
    use catalog::marker::Unreadable;
    let marker = match catalog::marker::read(headers)? {
        Ok(m) => m,
        Err(Unreadable::Missing(header)) => return Some(Err(BadInput::MissingField(header))),
        Err(Unreadable::BadValue(header)) => return Some(Err(BadInput::BadValue(header))),
    };
    let db = catalog::alias::logical(marker.db, renames);
    Some(
        Table::from_source(db, marker.table)
            .ok_or_else(|| BadInput::UnknownTable(format!("{db}.{}", marker.table)))
            .map(|table| Change::Truncate {
                table,
                position: Some(Position::at(marker.commit_lsn, 0)),
                ts_ms: None,
            }),
    )
}

/// Decodes one Kafka message (key and value bytes) into a [`Change`].
pub fn decode(key: Option<&[u8]>, value: Option<&[u8]>) -> Result<Change, BadInput> {
    decode_renamed(key, value, &[])
}

/// [`decode`], reading `source.db` through `renames`: (database name as
/// captured, logical database) pairs, for sources that run under another
/// name (a benchmark's scratch databases).
pub fn decode_renamed(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    renames: &[(String, String)],
) -> Result<Change, BadInput> {
    use catalog::envelope::{Op, Parsed, Unreadable};
    let envelope = match catalog::envelope::parse::<Row<'_>>(value) {
        Ok(Parsed::Change(envelope)) => envelope,
        Ok(Parsed::Tombstone) => return Ok(Change::Tombstone),
        Ok(Parsed::Ignored) => return Ok(Change::Ignored),
        Err(Unreadable::NotJson(why)) => return Err(BadInput::NotJson(why)),
        Err(Unreadable::MissingField(field)) => return Err(BadInput::MissingField(field)),
        Err(Unreadable::UnknownOp(op)) => return Err(BadInput::UnknownOp(op)),
    };
    let source = &envelope.source;
    let db = source
        .db
        .as_deref()
        .ok_or(BadInput::MissingField("source.db"))?;
    let table_name = source
        .table
        .as_deref()
        .ok_or(BadInput::MissingField("source.table"))?;
    let db = catalog::alias::logical(db, renames);
    let table = Table::from_source(db, table_name)
        .ok_or_else(|| BadInput::UnknownTable(format!("{db}.{table_name}")))?;
    let ts_ms = source.ts_ms;
    let position = source.lsn.map(|lsn| Position {
        commit_lsn: source.commit_lsn,
        lsn,
    });
    match envelope.op {
        Op::Truncate => Ok(Change::Truncate {
            table,
            position,
            ts_ms,
        }),
        Op::Create | Op::Update | Op::Read => {
            let after = envelope
                .after
                .as_ref()
                .ok_or(BadInput::MissingField("after"))?;
            let id = row_id(key, after.id)?;
            let contributions = contributions(table, &id, after)?;
            Ok(Change::Row {
                table,
                id,
                state: RowState {
                    position,
                    contributions,
                },
                ts_ms,
            })
        }
        Op::Delete => {
            let before_id = envelope.before.as_ref().and_then(|b| b.id);
            let id = row_id(key, before_id)?;
            Ok(Change::Row {
                table,
                id,
                state: RowState {
                    position,
                    contributions: Vec::new(),
                },
                ts_ms,
            })
        }
    }
}

/// The row's key: the message key's `id` (schemas disabled or enabled), else
/// the whole key in canonical JSON, else the row's own `id` column.
fn row_id(key: Option<&[u8]>, column: Option<&RawValue>) -> Result<String, BadInput> {
    if let Some(key) = key.and_then(|k| serde_json::from_slice::<serde_json::Value>(k).ok()) {
        let key = match key {
            serde_json::Value::Object(mut map)
                if map.contains_key("payload") && map.contains_key("schema") =>
            {
                map.remove("payload").unwrap_or(serde_json::Value::Null)
            }
            other => other,
        };
        let id = match &key {
            serde_json::Value::Object(map) if map.len() == 1 && map.contains_key("id") => {
                map.get("id").cloned()
            }
            serde_json::Value::Null => None,
            other => Some(other.clone()),
        };
        if let Some(id) = id {
            return Ok(match id {
                serde_json::Value::String(s) => sanitize(&s),
                serde_json::Value::Number(n) => n.to_string(),
                other => sanitize(&other.to_string()),
            });
        }
    }
    let column = column.ok_or(BadInput::MissingField("key"))?;
    Ok(int_col(Some(column), "id")?.to_string())
}

/// Separator chars of the encoded state may not appear in fields.
fn sanitize(text: &str) -> String {
    text.replace(['\x1d', '\x1e', '\x1f'], "?")
}

fn required<'a>(raw: Option<&'a RawValue>, name: &'static str) -> Result<&'a RawValue, BadInput> {
    match raw {
        Some(raw) if raw.get() != "null" => Ok(raw),
        _ => Err(BadInput::MissingField(name)),
    }
}

fn str_col(raw: Option<&RawValue>, name: &'static str) -> Result<String, BadInput> {
    let raw = required(raw, name)?;
    let text: Cow<'_, str> =
        serde_json::from_str(raw.get()).map_err(|_| BadInput::BadValue(name))?;
    if text == "__debezium_unavailable_value" {
        return Err(BadInput::BadValue(name));
    }
    Ok(sanitize(&text))
}

fn int_col(raw: Option<&RawValue>, name: &'static str) -> Result<i64, BadInput> {
    let raw = required(raw, name)?;
    let text = raw.get();
    let text = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    text.parse::<i64>().map_err(|_| BadInput::BadValue(name))
}

#[derive(Deserialize)]
struct VariableScale<'a> {
    scale: u32,
    #[serde(borrow)]
    value: Cow<'a, str>,
}

/// A `numeric(12,2)` column in any of Debezium's decimal modes, as cents.
fn money_col(raw: Option<&RawValue>, name: &'static str) -> Result<i64, BadInput> {
    let raw = required(raw, name)?;
    let text = raw.get();
    let bad = |_: MoneyError| BadInput::BadValue(name);
    match text.as_bytes().first() {
        Some(b'"') => {
            let s: Cow<'_, str> =
                serde_json::from_str(text).map_err(|_| BadInput::BadValue(name))?;
            let looks_decimal = s
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'+');
            if looks_decimal {
                money::cents_from_decimal(&s).map_err(bad)
            } else {
                money::cents_from_base64(&s, money::KNOWN_SCALE).map_err(bad)
            }
        }
        Some(b'{') => {
            let v: VariableScale<'_> =
                serde_json::from_str(text).map_err(|_| BadInput::BadValue(name))?;
            money::cents_from_base64(&v.value, v.scale).map_err(bad)
        }
        _ => {
            let f: f64 = serde_json::from_str(text).map_err(|_| BadInput::BadValue(name))?;
            money::cents_from_f64(f).map_err(bad)
        }
    }
}

/// A timestamptz column: ISO-8601 text (Debezium's `ZonedTimestamp`) or
/// microseconds since the epoch. Returns UTC seconds since the epoch (floor).
fn timestamp_col(raw: Option<&RawValue>, name: &'static str) -> Result<i64, BadInput> {
    let raw = required(raw, name)?;
    let text = raw.get();
    if text.starts_with('"') {
        let s: Cow<'_, str> = serde_json::from_str(text).map_err(|_| BadInput::BadValue(name))?;
        parse_iso_seconds(&s).ok_or(BadInput::BadValue(name))
    } else {
        let micros: i64 = text.parse().map_err(|_| BadInput::BadValue(name))?;
        Ok(micros.div_euclid(1_000_000))
    }
}

/// Parses `YYYY-MM-DD[T ]HH:MM:SS[.ffffff](Z|±HH[:MM])` to UTC epoch seconds.
pub fn parse_iso_seconds(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = s.get(from..from + len)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !(b[10] == b'T' || b[10] == b' ') {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        rest = &frac[digits..];
    }
    let offset = match rest {
        "" | "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let tz = rest[1..].replace(':', "");
            if tz.len() != 2 && tz.len() != 4 || !tz.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            let h: i64 = tz[..2].parse().ok()?;
            let m: i64 = if tz.len() == 4 {
                tz[2..].parse().ok()?
            } else {
                0
            };
            sign * (h * 3600 + m * 60)
        }
    };
    Some(unix_midnight(year, month, day)? + hour * 3600 + minute * 60 + second - offset)
}

/// Unix seconds of midnight UTC at the start of a proleptic Gregorian date;
/// `None` for a date that does not exist (2026-02-30) or lies outside the
/// years -9999 to 9999.
pub fn unix_midnight(year: i64, month: i64, day: i64) -> Option<i64> {
    let date = jiff::civil::Date::new(
        i16::try_from(year).ok()?,
        i8::try_from(month).ok()?,
        i8::try_from(day).ok()?,
    )
    .ok()?;
    let midnight = date.to_datetime(jiff::civil::Time::midnight());
    jiff::tz::Offset::UTC
        .to_timestamp(midnight)
        .ok()
        .map(jiff::Timestamp::as_second)
}

/// `YYYY-MM-DD`, the UTC calendar day of unix seconds; `None` outside the
/// years -9999 to 9999.
pub fn utc_date(unix_seconds: i64) -> Option<String> {
    let at = jiff::Timestamp::from_second(unix_seconds).ok()?;
    Some(jiff::tz::Offset::UTC.to_datetime(at).date().to_string())
}

/// The contributions of a live row, from its `after` image.
fn contributions(table: Table, id: &str, after: &Row<'_>) -> Result<Vec<Contribution>, BadInput> {
    let mut out = vec![Contribution::new(Code::Count, table.qualified(), 1)];
    match table {
        Table::Customer | Table::Buyer | Table::Carrier => {}
        Table::Product => {
            let category = str_col(after.category, "after.category")?;
            out.push(Contribution::new(
                Code::ProductCategory,
                format!("{id}\x1d{category}"),
                1,
            ));
        }
        Table::Transaction => {
            let status = str_col(after.status, "after.status")?;
            let cents = money_col(after.total_amount, "after.total_amount")?;
            let created = timestamp_col(after.created_at, "after.created_at")?;
            let window = created.div_euclid(30) * 30;
            out.push(Contribution::new(Code::TxStatus, status.clone(), 1));
            out.push(Contribution::new(Code::WindowTx, window.to_string(), 1));
            if status == "completed" {
                out.push(Contribution::new(Code::Revenue, "", cents));
                out.push(Contribution::new(
                    Code::RevenueDaily,
                    utc_date(created).ok_or(BadInput::BadValue("after.created_at"))?,
                    cents,
                ));
                out.push(Contribution::new(
                    Code::WindowRevenue,
                    window.to_string(),
                    cents,
                ));
            }
        }
        Table::TransactionDetail => {
            let product = int_col(after.product_id, "after.product_id")?;
            let quantity = int_col(after.quantity, "after.quantity")?;
            let price = money_col(after.unit_price, "after.unit_price")?;
            let cents = quantity
                .checked_mul(price)
                .ok_or(BadInput::BadValue("after.unit_price"))?;
            out.push(Contribution::new(
                Code::ProductGmv,
                product.to_string(),
                cents,
            ));
        }
        Table::Interaction => {
            let kind = str_col(after.interaction_type, "after.interaction_type")?;
            out.push(Contribution::new(Code::InteractionType, kind, 1));
        }
        Table::Stock => {
            let quantity = int_col(after.quantity, "after.quantity")?;
            out.push(Contribution::new(Code::StockUnits, "", quantity));
        }
        Table::Shipment => {
            let status = str_col(after.status, "after.status")?;
            out.push(Contribution::new(Code::ShipmentStatus, status, 1));
        }
    }
    Ok(out)
}

/// A position as stored: `<lsn>` without a commit LSN (the form written
/// before commit LSNs existed, still read), else `<commit_lsn>/<lsn>`; both
/// fixed-width decimals. Empty when unknown.
pub fn encode_position(position: Option<Position>) -> String {
    match position {
        None => String::new(),
        Some(Position {
            commit_lsn: None,
            lsn,
        }) => format!("{lsn:020}"),
        Some(Position {
            commit_lsn: Some(commit),
            lsn,
        }) => format!("{commit:020}/{lsn:020}"),
    }
}

fn decode_position(text: &str) -> Option<Option<Position>> {
    if text.is_empty() {
        return Some(None);
    }
    Some(Some(match text.split_once('/') {
        None => Position::lsn(text.parse().ok()?),
        Some((commit, lsn)) => Position::at(commit.parse().ok()?, lsn.parse().ok()?),
    }))
}

/// The row state as stored in Redis and compared by the Lua script.
pub fn encode_state(state: &RowState) -> String {
    let mut out = encode_position(state.position);
    for c in &state.contributions {
        out.push('\x1e');
        out.push(c.code.as_char());
        out.push_str(&c.field);
        out.push('\x1f');
        out.push_str(&c.amount.to_string());
    }
    out
}

/// Inverse of [`encode_state`]; `None` for text it did not write.
pub fn decode_state(text: &str) -> Option<RowState> {
    let mut parts = text.split('\x1e');
    let position = decode_position(parts.next()?)?;
    let mut contributions = Vec::new();
    for token in parts {
        let code = Code::from_char(token.chars().next()?)?;
        let (field, amount) = token[1..].rsplit_once('\x1f')?;
        contributions.push(Contribution::new(code, field, amount.parse().ok()?));
    }
    Some(RowState {
        position,
        contributions,
    })
}

/// The outcome of folding one row event into its prior state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folded {
    /// The row's state to store (unchanged prior for a skipped duplicate).
    pub state: RowState,
    /// Signed metric deltas: old contributions negated, then new ones.
    pub deltas: Vec<Contribution>,
    /// The event was older than (or the same as) what was applied: skipped.
    pub duplicate: bool,
}

/// Folds a row event into the row's prior state: retract the old
/// contribution, add the new. An event at a position older than the stored
/// one is a re-send and changes nothing; so does the same event again.
pub fn fold(prior: Option<&RowState>, new: &RowState) -> Folded {
    if let Some(prior) = prior
        && let (Some(old), Some(next)) = (prior.position, new.position)
        && match next.order(&old) {
            Ordering::Less => true,
            Ordering::Equal => prior.contributions == new.contributions,
            Ordering::Greater => false,
        }
    {
        return Folded {
            state: prior.clone(),
            deltas: Vec::new(),
            duplicate: true,
        };
    }
    let mut deltas: Vec<Contribution> = prior
        .map(|p| {
            p.contributions
                .iter()
                .map(|c| Contribution::new(c.code, c.field.clone(), -c.amount))
                .collect()
        })
        .unwrap_or_default();
    deltas.extend(new.contributions.iter().cloned());
    Folded {
        state: new.clone(),
        deltas,
        duplicate: false,
    }
}

/// Folds a truncate at `at` into one row's prior state: a row last changed
/// before the truncate is retracted and kept as deleted *at the truncate's
/// position*, so an older event of it that arrives later is skipped; a row
/// changed after the truncate (an insert on a partition whose copy of the
/// truncate comes later) is left alone. `None` when nothing changes.
///
/// Why this is enough: the reader writes the truncate to every partition of
/// the table's topic, after that partition's earlier events. Each copy
/// retracts every row older than the truncate, whatever its partition; a row
/// of a partition that lags behind is applied after the first copy and
/// retracted by its own partition's copy. A second copy finds nothing older
/// left, so copies and replays change nothing.
pub fn fold_truncate(prior: &RowState, at: Position) -> Option<Folded> {
    let older = prior
        .position
        .is_none_or(|p| p.order(&at) == Ordering::Less);
    if !older || prior.contributions.is_empty() {
        return None;
    }
    Some(Folded {
        state: RowState {
            position: Some(at),
            contributions: Vec::new(),
        },
        deltas: prior
            .contributions
            .iter()
            .map(|c| Contribution::new(c.code, c.field.clone(), -c.amount))
            .collect(),
        duplicate: false,
    })
}

/// In-memory reference store: the rules `store.lua` applies in Redis, used
/// by unit tests and as executable documentation. Metric names are the Redis
/// keys without prefix; hash entries are `key|field`.
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    /// Row states per `<db>.<table>` and id.
    pub rows: BTreeMap<(Table, String), RowState>,
    /// Metric values: `count:instashop.buyer`, `transactions:status|completed`, ...
    pub metrics: BTreeMap<String, i64>,
    /// Join state: per-product GMV cents.
    pub product_gmv: BTreeMap<String, i64>,
    /// Join state: product → category.
    pub product_category: BTreeMap<String, String>,
    /// Events skipped as duplicates.
    pub duplicates: u64,
}

impl MemStore {
    /// Applies one change.
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::Row {
                table, id, state, ..
            } => {
                let key = (*table, id.clone());
                let folded = fold(self.rows.get(&key), state);
                if folded.duplicate {
                    self.duplicates += 1;
                    return;
                }
                for delta in &folded.deltas {
                    self.apply_delta(delta);
                }
                self.rows.insert(key, folded.state);
            }
            Change::Truncate {
                table, position, ..
            } => {
                self.truncate(*table, *position);
            }
            Change::Tombstone | Change::Ignored => {}
        }
    }

    /// Applies a truncate of `table` at `position` ([`fold_truncate`]) and
    /// returns the ids whose state changed. Without a position every row
    /// state of the table is retracted and forgotten.
    pub fn truncate(&mut self, table: Table, position: Option<Position>) -> Vec<String> {
        let ids: Vec<String> = self
            .rows
            .range((table, String::new())..)
            .take_while(|((t, _), _)| *t == table)
            .map(|((_, id), _)| id.clone())
            .collect();
        let mut changed = Vec::new();
        for id in ids {
            let key = (table, id);
            let Some(prior) = self.rows.get(&key) else {
                continue;
            };
            let folded = match position {
                Some(at) => fold_truncate(prior, at),
                None => Some(Folded {
                    state: RowState::default(),
                    deltas: prior
                        .contributions
                        .iter()
                        .map(|c| Contribution::new(c.code, c.field.clone(), -c.amount))
                        .collect(),
                    duplicate: false,
                }),
            };
            let Some(folded) = folded else {
                continue;
            };
            for delta in &folded.deltas {
                self.apply_delta(delta);
            }
            if position.is_some() {
                self.rows.insert(key.clone(), folded.state);
            } else {
                self.rows.remove(&key);
            }
            changed.push(key.1);
        }
        changed
    }

    fn add(&mut self, name: String, amount: i64) {
        *self.metrics.entry(name).or_insert(0) += amount;
    }

    fn apply_delta(&mut self, d: &Contribution) {
        let f = &d.field;
        match d.code {
            Code::Count => self.add(format!("count:{f}"), d.amount),
            Code::TxStatus => self.add(format!("transactions:status|{f}"), d.amount),
            Code::Revenue => self.add("revenue:total_cents".into(), d.amount),
            Code::RevenueDaily => self.add(format!("revenue:daily_cents|{f}"), d.amount),
            Code::WindowTx => self.add(format!("window:30s:{f}|transactions"), d.amount),
            Code::WindowRevenue => self.add(format!("window:30s:{f}|revenue_cents"), d.amount),
            Code::StockUnits => self.add("stock:units".into(), d.amount),
            Code::ShipmentStatus => self.add(format!("shipments:status|{f}"), d.amount),
            Code::InteractionType => self.add(format!("interactions:type|{f}"), d.amount),
            Code::ProductGmv => {
                *self.product_gmv.entry(f.clone()).or_insert(0) += d.amount;
                if let Some(category) = self.product_category.get(f).cloned() {
                    self.add(format!("gmv:category_cents|{category}"), d.amount);
                }
            }
            Code::ProductCategory => {
                let Some((product, category)) = f.split_once('\x1d') else {
                    return;
                };
                let gmv = self.product_gmv.get(product).copied().unwrap_or(0);
                if d.amount > 0 {
                    self.product_category
                        .insert(product.to_owned(), category.to_owned());
                    self.add(format!("gmv:category_cents|{category}"), gmv);
                } else if self.product_category.get(product).map(String::as_str) == Some(category) {
                    self.product_category.remove(product);
                    self.add(format!("gmv:category_cents|{category}"), -gmv);
                }
            }
        }
    }

    /// A metric's value (0 when absent).
    pub fn get(&self, name: &str) -> i64 {
        self.metrics.get(name).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx_event(op: &str, id: i64, status: &str, amount: &str, lsn: u64) -> String {
        let after = if op == "d" {
            "null".to_owned()
        } else {
            format!(
                r#"{{"id":{id},"external_id":"x","customer_id":1,"buyer_id":1,"total_amount":{amount},"currency":"USD","payment_method":"paypal","status":"{status}","created_at":"2026-11-22T10:00:15.123456Z","updated_at":"2026-11-22T10:00:15.123456Z"}}"#
            )
        };
        event("instashop", "transaction", op, &after, lsn)
    }

    fn event(db: &str, table: &str, op: &str, after: &str, lsn: u64) -> String {
        format!(
            r#"{{"before":null,"after":{after},"source":{{"version":"2.7.0","connector":"postgresql","name":"{db}","ts_ms":1795000000000,"snapshot":"false","db":"{db}","sequence":"[\"1\",\"{lsn}\"]","schema":"public","table":"{table}","txId":7,"lsn":{lsn},"xmin":null}},"op":"{op}","ts_ms":1795000000100}}"#
        )
    }

    /// A transaction event as a reader with `source.commit_lsn` writes it.
    fn tx_event_at(op: &str, id: i64, status: &str, cents: i64, commit: u64, lsn: u64) -> String {
        let mut value: serde_json::Value = serde_json::from_str(&tx_event(
            op,
            id,
            status,
            &format!("\"{}.{:02}\"", cents / 100, cents % 100),
            lsn,
        ))
        .expect("test event is json");
        value["source"]["commit_lsn"] = commit.into();
        value.to_string()
    }

    fn key(id: i64) -> String {
        format!(r#"{{"id":{id}}}"#)
    }

    fn apply(store: &mut MemStore, id: i64, value: &str) {
        let change = decode(Some(key(id).as_bytes()), Some(value.as_bytes())).expect("decodes");
        store.apply(&change);
    }

    fn product(id: i64, category: &str, lsn: u64) -> String {
        event(
            "instashop",
            "product",
            "c",
            &format!(
                r#"{{"id":{id},"customer_id":1,"name":"p","category":"{category}","price":"1.00","tags":[],"description":null}}"#
            ),
            lsn,
        )
    }

    fn detail(id: i64, product: i64, quantity: i64, price: &str, lsn: u64) -> String {
        event(
            "instashop",
            "transactiondetail",
            "c",
            &format!(
                r#"{{"id":{id},"transaction_id":1,"product_id":{product},"quantity":{quantity},"unit_price":{price}}}"#
            ),
            lsn,
        )
    }

    #[test]
    fn transaction_insert_update_refund_delete() {
        let mut s = MemStore::default();
        apply(&mut s, 1, &tx_event("c", 1, "pending", r#""12.50""#, 10));
        assert_eq!(s.get("count:instashop.transaction"), 1);
        assert_eq!(s.get("transactions:status|pending"), 1);
        assert_eq!(s.get("revenue:total_cents"), 0);
        let window = (unix_midnight(2026, 11, 22).expect("a real date") + 36_000).to_string();
        assert_eq!(s.get(&format!("window:30s:{window}|transactions")), 1);

        apply(&mut s, 1, &tx_event("u", 1, "completed", r#""12.50""#, 20));
        assert_eq!(s.get("transactions:status|pending"), 0);
        assert_eq!(s.get("transactions:status|completed"), 1);
        assert_eq!(s.get("revenue:total_cents"), 1250);
        assert_eq!(s.get("revenue:daily_cents|2026-11-22"), 1250);
        assert_eq!(s.get(&format!("window:30s:{window}|revenue_cents")), 1250);
        assert_eq!(s.get("count:instashop.transaction"), 1);

        // completed -> refunded takes the revenue back.
        apply(&mut s, 1, &tx_event("u", 1, "refunded", r#""12.50""#, 30));
        assert_eq!(s.get("revenue:total_cents"), 0);
        assert_eq!(s.get("revenue:daily_cents|2026-11-22"), 0);
        assert_eq!(s.get("transactions:status|refunded"), 1);
        assert_eq!(s.get("transactions:status|completed"), 0);

        apply(&mut s, 1, &tx_event("d", 1, "", "", 40));
        assert_eq!(s.get("count:instashop.transaction"), 0);
        assert_eq!(s.get("transactions:status|refunded"), 0);
        assert_eq!(s.get(&format!("window:30s:{window}|transactions")), 0);
    }

    #[test]
    fn replays_and_duplicates_change_nothing() {
        let events = [
            tx_event("c", 1, "pending", r#""10.00""#, 10),
            tx_event("u", 1, "completed", r#""10.00""#, 20),
            tx_event("c", 2, "completed", r#""5.05""#, 25),
            tx_event("d", 2, "", "", 30),
        ];
        let ids = [1, 1, 2, 2];
        let mut once = MemStore::default();
        for (id, e) in ids.iter().zip(&events) {
            apply(&mut once, *id, e);
        }
        let mut replayed = once.clone();
        // The reader re-sends everything after its crash; each event twice more.
        for (id, e) in ids.iter().zip(&events) {
            apply(&mut replayed, *id, e);
            apply(&mut replayed, *id, e);
        }
        assert_eq!(once.metrics, replayed.metrics);
        assert_eq!(replayed.duplicates, 8);
        assert_eq!(once.get("revenue:total_cents"), 1000);
        assert_eq!(once.get("count:instashop.transaction"), 1);
    }

    #[test]
    fn repeated_snapshot_changes_nothing() {
        let mut s = MemStore::default();
        apply(&mut s, 1, &tx_event("r", 1, "completed", r#""7.00""#, 100));
        apply(&mut s, 2, &tx_event("r", 2, "pending", r#""1.00""#, 100));
        let before = s.metrics.clone();
        // A second snapshot at a later LSN with the same rows.
        apply(&mut s, 1, &tx_event("r", 1, "completed", r#""7.00""#, 500));
        apply(&mut s, 2, &tx_event("r", 2, "pending", r#""1.00""#, 500));
        assert_eq!(before, s.metrics);
        // An old snapshot row arriving after a newer change is skipped.
        apply(&mut s, 2, &tx_event("u", 2, "completed", r#""1.00""#, 600));
        apply(&mut s, 2, &tx_event("r", 2, "pending", r#""1.00""#, 500));
        assert_eq!(s.get("revenue:total_cents"), 800);
    }

    #[test]
    fn a_transaction_open_across_the_snapshot_point_applies_after_the_snapshot_row() {
        // Snapshot at consistent point C = 1000: the row is read as completed, 7.00.
        let mut s = MemStore::default();
        apply(
            &mut s,
            1,
            &tx_event_at("r", 1, "completed", 700, 1000, 1000),
        );
        assert_eq!(s.get("revenue:total_cents"), 700);
        // A transaction that began before C updated the row at LSN 900 and
        // committed at 1100, after C: it is streamed, and it is newer.
        apply(&mut s, 1, &tx_event_at("u", 1, "completed", 800, 1100, 900));
        assert_eq!(s.get("revenue:total_cents"), 800);
        // Re-sent, it changes nothing; nor does the snapshot row again.
        apply(&mut s, 1, &tx_event_at("u", 1, "completed", 800, 1100, 900));
        apply(
            &mut s,
            1,
            &tx_event_at("r", 1, "completed", 700, 1000, 1000),
        );
        assert_eq!(s.get("revenue:total_cents"), 800);
        // A delete in another such transaction retracts the row.
        apply(
            &mut s,
            2,
            &tx_event_at("r", 2, "completed", 100, 1000, 1000),
        );
        apply(&mut s, 2, &tx_event_at("d", 2, "", 0, 1200, 950));
        assert_eq!(s.get("revenue:total_cents"), 800);
        assert_eq!(s.get("count:instashop.transaction"), 1);
    }

    #[test]
    fn events_without_commit_lsn_order_by_lsn_alone() {
        // Older readers and Debezium: the snapshot-boundary limitation stays.
        let mut s = MemStore::default();
        apply(&mut s, 1, &tx_event("r", 1, "completed", r#""7.00""#, 1000));
        apply(&mut s, 1, &tx_event("u", 1, "completed", r#""8.00""#, 900));
        assert_eq!(s.get("revenue:total_cents"), 700);
        apply(&mut s, 1, &tx_event("u", 1, "completed", r#""9.00""#, 1001));
        assert_eq!(s.get("revenue:total_cents"), 900);
    }

    /// One row's history as the reader streams it across a snapshot at
    /// `snapshot`: transactions commit in order; changes of a transaction
    /// that began before the snapshot point have LSNs below it.
    fn history(rng: &mut rand::rngs::StdRng, rows: i64, snapshot: u64) -> Vec<(i64, String)> {
        use rand::RngExt;
        let mut out = Vec::new();
        let mut commit = snapshot;
        for id in 1..=rows {
            out.push((
                id,
                tx_event_at("r", id, "completed", 100 * id, snapshot, snapshot),
            ));
        }
        for _ in 0..rng.random_range(1..40) {
            commit += rng.random_range(10..100);
            // Began before the snapshot point about half of the time.
            let first = if rng.random_bool(0.5) {
                snapshot - rng.random_range(1..500)
            } else {
                commit - 9
            };
            for lsn in first..first + rng.random_range(1..4) {
                let id = rng.random_range(1..=rows);
                let status = ["pending", "completed", "refunded"][rng.random_range(0..3)];
                let op = if rng.random_bool(0.1) { "d" } else { "u" };
                out.push((
                    id,
                    tx_event_at(op, id, status, rng.random_range(1..10_000), commit, lsn),
                ));
            }
        }
        out
    }

    #[test]
    fn any_interleaving_of_duplicates_and_replays_equals_one_clean_pass() {
        use rand::{RngExt, SeedableRng};
        for seed in 0..200 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let events = history(&mut rng, 4, 10_000);
            // The expected result: the last event of each row, in commit order.
            let mut last: BTreeMap<i64, &str> = BTreeMap::new();
            for (id, e) in &events {
                last.insert(*id, e);
            }
            let mut expected = MemStore::default();
            for (id, e) in &last {
                apply(&mut expected, *id, e);
            }
            let mut clean = MemStore::default();
            for (id, e) in &events {
                apply(&mut clean, *id, e);
            }
            let nonzero = |m: &MemStore| {
                let mut metrics = m.metrics.clone();
                metrics.retain(|_, v| *v != 0);
                metrics
            };
            assert_eq!(
                nonzero(&clean),
                nonzero(&expected),
                "seed {seed}: clean pass"
            );
            // The same stream with re-sent events and replayed prefixes.
            let mut noisy = MemStore::default();
            for (i, (id, e)) in events.iter().enumerate() {
                apply(&mut noisy, *id, e);
                if rng.random_bool(0.3) {
                    let from = rng.random_range(0..=i);
                    for (id, e) in &events[from..=i] {
                        apply(&mut noisy, *id, e);
                    }
                }
            }
            assert_eq!(
                nonzero(&noisy),
                nonzero(&expected),
                "seed {seed}: with replays"
            );
        }
    }

    #[test]
    fn detail_before_product_and_category_change() {
        let mut s = MemStore::default();
        apply(&mut s, 1, &detail(1, 9, 3, r#""2.50""#, 10));
        assert_eq!(
            s.get("gmv:category_cents|toys"),
            0,
            "product unknown yet: not joined"
        );
        apply(&mut s, 9, &product(9, "toys", 20));
        assert_eq!(s.get("gmv:category_cents|toys"), 750);
        apply(&mut s, 2, &detail(2, 9, 1, r#""1.00""#, 30));
        assert_eq!(s.get("gmv:category_cents|toys"), 850);
        // Category change moves the product's past sales.
        apply(&mut s, 9, &product(9, "games", 40));
        assert_eq!(s.get("gmv:category_cents|toys"), 0);
        assert_eq!(s.get("gmv:category_cents|games"), 850);
        // Detail update (quantity) and delete.
        apply(&mut s, 1, &detail(1, 9, 1, r#""2.50""#, 50));
        assert_eq!(s.get("gmv:category_cents|games"), 350);
        let del = event("instashop", "transactiondetail", "d", "null", 60);
        apply(&mut s, 2, &del);
        assert_eq!(s.get("gmv:category_cents|games"), 250);
        // Product deleted: the inner join drops its sales.
        apply(&mut s, 9, &event("instashop", "product", "d", "null", 70));
        assert_eq!(s.get("gmv:category_cents|games"), 0);
        assert_eq!(s.get("count:instashop.product"), 0);
    }

    #[test]
    fn decimal_modes_agree() {
        for amount in [
            r#""22.22""#,
            r#""CK4=""#,
            r#"{"scale":2,"value":"CK4="}"#,
            "22.22",
        ] {
            let mut s = MemStore::default();
            apply(&mut s, 1, &tx_event("c", 1, "completed", amount, 1));
            assert_eq!(s.get("revenue:total_cents"), 2222, "amount {amount}");
        }
    }

    #[test]
    fn schemas_enabled_envelope_and_key() {
        let inner = tx_event("c", 5, "completed", r#""3.00""#, 1);
        let value = format!(r#"{{"schema":{{"type":"struct","fields":[]}},"payload":{inner}}}"#);
        let key = r#"{"schema":{"type":"struct"},"payload":{"id":5}}"#;
        let change = decode(Some(key.as_bytes()), Some(value.as_bytes())).expect("decodes");
        match &change {
            Change::Row { id, table, .. } => {
                assert_eq!(id, "5");
                assert_eq!(*table, Table::Transaction);
            }
            other => panic!("unexpected {other:?}"),
        }
        let mut s = MemStore::default();
        s.apply(&change);
        assert_eq!(s.get("revenue:total_cents"), 300);
    }

    #[test]
    fn tombstones_and_messages_are_no_ops() {
        assert_eq!(decode(Some(b"{\"id\":1}"), None), Ok(Change::Tombstone));
        assert_eq!(
            decode(Some(b"{\"id\":1}"), Some(b"null")),
            Ok(Change::Tombstone)
        );
        let m = event("instashop", "transaction", "m", "null", 1);
        assert_eq!(decode(None, Some(m.as_bytes())), Ok(Change::Ignored));
    }

    #[test]
    fn truncate_retracts_the_table() {
        let mut s = MemStore::default();
        apply(&mut s, 1, &tx_event("c", 1, "completed", r#""1.00""#, 1));
        apply(&mut s, 2, &tx_event("c", 2, "completed", r#""2.00""#, 2));
        apply(&mut s, 9, &product(9, "toys", 3));
        let t = event("instashop", "transaction", "t", "null", 4);
        s.apply(&decode(None, Some(t.as_bytes())).expect("decodes"));
        assert_eq!(s.get("count:instashop.transaction"), 0);
        assert_eq!(s.get("revenue:total_cents"), 0);
        assert_eq!(s.get("count:instashop.product"), 1);
    }

    fn truncate_at(commit: u64, lsn: u64) -> Change {
        let mut value: serde_json::Value =
            serde_json::from_str(&event("instashop", "transaction", "t", "null", lsn))
                .expect("test event is json");
        value["source"]["commit_lsn"] = commit.into();
        decode(None, Some(value.to_string().as_bytes())).expect("decodes")
    }

    #[test]
    fn truncate_retracts_only_rows_older_than_itself() {
        let mut s = MemStore::default();
        apply(&mut s, 1, &tx_event_at("c", 1, "completed", 100, 10, 9));
        // Inserted after the truncate; its partition was read first.
        apply(&mut s, 2, &tx_event_at("c", 2, "completed", 200, 30, 29));
        s.apply(&truncate_at(20, 19));
        assert_eq!(s.get("revenue:total_cents"), 200);
        assert_eq!(s.get("count:instashop.transaction"), 1);
        // Row 1's partition lags: an older update of it arrives after the
        // first copy of the truncate and is skipped; its own copy changes nothing.
        apply(&mut s, 1, &tx_event_at("u", 1, "completed", 150, 15, 14));
        s.apply(&truncate_at(20, 19));
        assert_eq!(s.get("revenue:total_cents"), 200);
        assert_eq!(s.get("count:instashop.transaction"), 1);
    }

    /// Applies the partitions' changes, each partition in its order, the
    /// partitions interleaved at random, with now and then a re-delivery of
    /// something that came before.
    fn interleaved(parts: &[Vec<Change>], rng: &mut rand::rngs::StdRng) -> MemStore {
        use rand::RngExt;
        let mut s = MemStore::default();
        let mut next = vec![0_usize; parts.len()];
        while next.iter().zip(parts).any(|(n, p)| *n < p.len()) {
            let p = rng.random_range(0..parts.len());
            if next[p] < parts[p].len() {
                s.apply(&parts[p][next[p]]);
                if rng.random_bool(0.2) {
                    s.apply(&parts[p][rng.random_range(0..=next[p])]);
                }
                next[p] += 1;
            }
        }
        s
    }

    /// The metrics without zero entries (a retracted group may stay at 0).
    fn nonzero(m: &MemStore) -> BTreeMap<String, i64> {
        let mut metrics = m.metrics.clone();
        metrics.retain(|_, v| *v != 0);
        metrics
    }

    #[test]
    fn truncate_copies_on_every_partition_in_any_interleaving_equal_one_truncate() {
        use rand::{RngExt, SeedableRng};
        // Three partitions, each in its own order: rows of that partition
        // before the truncate, its copy of the truncate, rows after it.
        for seed in 0..200 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut parts: Vec<Vec<Change>> = vec![Vec::new(); 3];
            let mut lsn = 100;
            let mut expected = MemStore::default();
            let truncate_commit = 1000;
            for id in 1..=24_i64 {
                let part = (id % 3) as usize;
                let before = rng.random_bool(0.5);
                lsn += 5;
                let commit = if before { lsn } else { truncate_commit + lsn };
                let value = tx_event_at("c", id, "completed", 100 * id, commit, lsn);
                let change =
                    decode(Some(key(id).as_bytes()), Some(value.as_bytes())).expect("decodes");
                if !before {
                    expected.apply(&change);
                }
                parts[part].push(change);
            }
            let trunc = truncate_at(truncate_commit, truncate_commit - 1);
            for part in &mut parts {
                // Keep each partition in commit order around its copy.
                part.sort_by_key(|c| match c {
                    Change::Row { state, .. } => state.position.map(|p| p.commit_lsn),
                    _ => None,
                });
                let at = part
                    .iter()
                    .position(|c| matches!(c, Change::Row { state, .. } if state.position.and_then(|p| p.commit_lsn) > Some(truncate_commit)))
                    .unwrap_or(part.len());
                part.insert(at, trunc.clone());
            }
            let s = interleaved(&parts, &mut rng);
            assert_eq!(nonzero(&s), nonzero(&expected), "seed {seed}");
        }
    }

    fn marker(commit_lsn: &str) -> Option<Result<Change, BadInput>> {
        let headers = [
            ("cdc.marker", "snapshot_complete"),
            ("cdc.db", "instashop"),
            ("cdc.schema", "public"),
            ("cdc.table", "transaction"),
            ("cdc.commit_lsn", commit_lsn),
            ("cdc.lsn", "5000"),
        ];
        decode_marker(headers.iter().map(|(k, v)| (*k, Some(v.as_bytes()))), &[])
    }

    #[test]
    fn snapshot_marker_decodes_from_headers_only() {
        assert_eq!(
            marker("4999"),
            Some(Ok(Change::Truncate {
                table: Table::from_source("instashop", "transaction").expect("a table"),
                position: Some(Position::at(4999, 0)),
                ts_ms: None,
            }))
        );
        assert!(matches!(marker("x"), Some(Err(BadInput::BadValue(_)))));
        let other = [("cdc.marker", Some(&b"something_else"[..]))];
        assert_eq!(decode_marker(other, &[]), None);
        assert_eq!(decode_marker([("traceparent", None)], &[]), None);
    }

    #[test]
    fn snapshot_marker_retracts_rows_the_snapshot_did_not_reread_in_any_interleaving() {
        use rand::{RngExt, SeedableRng};
        // A reader restarted from scratch: rows 1..=24 were captured by the
        // old slot; those divisible by 4 were deleted while no slot recorded
        // it. The new snapshot (consistent point 5000) re-reads the others,
        // some with a new amount; rows 25..=30 are streamed after it.
        let marker = marker("4999").and_then(Result::ok).expect("a marker");
        for seed in 0..200 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut parts: Vec<Vec<Change>> = vec![Vec::new(); 3];
            let mut expected = MemStore::default();
            let decoded = |id: i64, value: String| {
                decode(Some(key(id).as_bytes()), Some(value.as_bytes())).expect("decodes")
            };
            for id in 1..=24_i64 {
                let lsn = 100 + 10 * id as u64;
                parts[(id % 3) as usize].push(decoded(
                    id,
                    tx_event_at("c", id, "completed", 100 * id, lsn, lsn - 1),
                ));
            }
            for id in (1..=24_i64).filter(|id| id % 4 != 0) {
                let cents = if rng.random_bool(0.5) {
                    100 * id
                } else {
                    7 * id
                };
                let row = decoded(id, tx_event_at("r", id, "completed", cents, 4999, 5000));
                expected.apply(&row);
                parts[(id % 3) as usize].push(row);
            }
            for part in &mut parts {
                part.push(marker.clone());
            }
            for id in 25..=30_i64 {
                let lsn = 6000 + 10 * id as u64;
                let row = decoded(
                    id,
                    tx_event_at("c", id, "completed", 100 * id, lsn, lsn - 1),
                );
                expected.apply(&row);
                parts[(id % 3) as usize].push(row);
            }
            let s = interleaved(&parts, &mut rng);
            assert_eq!(nonzero(&s), nonzero(&expected), "seed {seed}");
        }
    }

    #[test]
    fn every_table_counts_and_sums() {
        let mut s = MemStore::default();
        let rows = [
            ("instashop", "customer", r#"{"id":1,"name":"a"}"#),
            ("instashop", "buyer", r#"{"id":1,"birth_date":20000}"#),
            (
                "crm",
                "interaction",
                r#"{"id":1,"interaction_type":"click","payload":"{\"a\": 1}"}"#,
            ),
            (
                "erp",
                "stock",
                r#"{"id":1,"product_id":3,"warehouse":"w","quantity":17}"#,
            ),
            ("ecommerce", "carrier", r#"{"id":1,"name":"c"}"#),
            ("ecommerce", "shipment", r#"{"id":1,"status":"in_transit"}"#),
        ];
        for (db, table, after) in rows {
            apply(&mut s, 1, &event(db, table, "c", after, 1));
            assert_eq!(s.get(&format!("count:{db}.{table}")), 1);
        }
        assert_eq!(s.get("interactions:type|click"), 1);
        assert_eq!(s.get("stock:units"), 17);
        assert_eq!(s.get("shipments:status|in_transit"), 1);
        // Stock update: quantity replaced, not added.
        apply(
            &mut s,
            1,
            &event(
                "erp",
                "stock",
                "u",
                r#"{"id":1,"product_id":3,"quantity":5}"#,
                2,
            ),
        );
        assert_eq!(s.get("stock:units"), 5);
        // Delete of a DEFAULT-identity table: only the key is known.
        apply(&mut s, 1, &event("instashop", "customer", "d", "null", 3));
        assert_eq!(s.get("count:instashop.customer"), 0);
    }

    #[test]
    fn bad_input_is_classified() {
        let k = Some(&b"{\"id\":1}"[..]);
        assert_eq!(
            decode(k, Some(b"not json")).map_err(|e| e.kind()),
            Err("not_json")
        );
        let no_op =
            r#"{"before":null,"after":{"id":1},"source":{"db":"crm","table":"interaction"}}"#;
        assert_eq!(
            decode(k, Some(no_op.as_bytes())),
            Err(BadInput::MissingField("op"))
        );
        let unknown = event("instashop", "nosuch", "c", r#"{"id":1}"#, 1);
        assert_eq!(
            decode(k, Some(unknown.as_bytes())).map_err(|e| e.kind()),
            Err("unknown_table")
        );
        let missing = event(
            "instashop",
            "transaction",
            "c",
            r#"{"id":1,"status":"completed"}"#,
            1,
        );
        assert_eq!(
            decode(k, Some(missing.as_bytes())),
            Err(BadInput::MissingField("after.total_amount"))
        );
        let nan = tx_event("c", 1, "completed", r#""NAN""#, 1);
        assert_eq!(
            decode(k, Some(nan.as_bytes())),
            Err(BadInput::BadValue("after.total_amount"))
        );
    }

    #[test]
    fn renamed_databases_map_to_the_logical_ones() {
        let value = event(
            "scratch_7",
            "transaction",
            "c",
            r#"{"id":1,"total_amount":"1.00","status":"pending","created_at":"2026-11-22T10:00:00Z"}"#,
            1,
        );
        let k = Some(&b"{\"id\":1}"[..]);
        assert_eq!(
            decode(k, Some(value.as_bytes())).map_err(|e| e.kind()),
            Err("unknown_table")
        );
        let renames = [("scratch_7".to_owned(), "instashop".to_owned())];
        let change = decode_renamed(k, Some(value.as_bytes()), &renames).expect("decodes");
        assert_eq!(change.table(), Some(Table::Transaction));
    }

    #[test]
    fn state_encoding_round_trips() {
        let value = tx_event("c", 1, "completed", r#""12.34""#, 77);
        let Ok(Change::Row { state, .. }) = decode(Some(b"{\"id\":1}"), Some(value.as_bytes()))
        else {
            panic!("decodes");
        };
        assert_eq!(decode_state(&encode_state(&state)), Some(state.clone()));
        let deleted = RowState {
            position: None,
            contributions: vec![],
        };
        assert_eq!(decode_state(&encode_state(&deleted)), Some(deleted));
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_iso_seconds("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_iso_seconds("2016-11-04T11:51:30.123456Z"),
            Some(1_478_260_290)
        );
        assert_eq!(
            parse_iso_seconds("2016-11-04T12:51:30+01:00"),
            Some(1_478_260_290)
        );
        assert_eq!(
            parse_iso_seconds("2016-11-04 11:51:30"),
            Some(1_478_260_290)
        );
        assert_eq!(parse_iso_seconds("yesterday"), None);
        assert_eq!(utc_date(17_109 * 86_400).as_deref(), Some("2016-11-04"));
        assert_eq!(utc_date(-1).as_deref(), Some("1969-12-31"));
        assert_eq!(unix_midnight(2016, 11, 4), Some(17_109 * 86_400));
        assert_eq!(utc_date(i64::MAX), None);
    }

    #[test]
    fn a_calendar_date_that_does_not_exist_is_refused() {
        assert_eq!(parse_iso_seconds("2026-02-30T00:00:00Z"), None);
        assert_eq!(parse_iso_seconds("2026-04-31T00:00:00Z"), None);
        assert_eq!(parse_iso_seconds("2025-02-29T00:00:00Z"), None);
        assert_eq!(
            parse_iso_seconds("2024-02-29T00:00:00Z"),
            Some(1_709_164_800)
        );
    }
}
