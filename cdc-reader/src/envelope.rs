//! Debezium's change-event envelope (schemas disabled): one [`Change`] to the
//! Kafka records a Debezium PostgreSQL connector would have written.
//!
//! Pure: the caller passes the processing time, and the [`Encoder`] keeps the
//! only state (the open transaction's counters for transaction metadata).
//!
//! - key: JSON object of the key columns (`{"id":42}`), `None` when the table
//!   has no key columns;
//! - value: `{"before","after","source":{...},"op","ts_ms","ts_us","ts_ns","transaction"}`;
//! - delete: the event, then a tombstone (same key, null value) when enabled;
//! - update that changes the key: delete (+ tombstone) of the old key, then a
//!   create of the new key, as Debezium does;
//! - truncate: `op: "t"` with a null key, only when enabled, routed to every
//!   partition of the table's topic ([`Route::EveryPartition`]);
//! - transaction metadata (optional): a `transaction` block in each event and
//!   BEGIN/END records on `<prefix>.transaction`. The transaction id is
//!   `"<txId>:<lsn of its first change>"`.
//!
//! # `source.commit_lsn`: the ordering position (our field, not Debezium's)
//!
//! Every event's `source` ends with `"commit_lsn": <JSON number>`, added after
//! Debezium's fields, whose meaning is unchanged (`lsn` is still the change's
//! own WAL position, `sequence` and `txId` as before). Consumers order the
//! events of one key by the pair **`(source.commit_lsn, source.lsn)`**:
//!
//! - streamed change (`c`, `u`, `d`, `t`): the LSN of the commit record of
//!   the change's transaction, i.e. pgoutput Begin's `final_lsn`. The reader
//!   uses pgoutput protocol version 1, where the server sends a transaction
//!   only once it committed, so Begin always carries it before the first
//!   change; there are no in-progress (streamed) transactions whose commit
//!   is unknown when their events are sent.
//! - snapshot row (`r`): `consistent point - 1`, with `source.lsn` = the
//!   consistent point C as before. Why not C itself: the snapshot holds
//!   exactly the transactions whose commit record starts before C, and the
//!   stream sends every transaction whose commit record starts at or after
//!   C, including one committing exactly at C whose changes all lie below C.
//!   With `(C, C)` such a change `(C, lsn < C)` would sort before the row it
//!   updates; with `(C - 1, C)` every streamed event sorts after every
//!   snapshot row, and every transaction the snapshot already contains
//!   (re-sent after an interrupted snapshot) sorts before it.
//!
//! Why a new field: a transaction that was open at the consistent point and
//! commits after it is streamed in full, including changes whose `lsn` is
//! below C. Ordered by `lsn` alone those changes look older than the snapshot
//! row and a consumer drops them; ordered by `(commit_lsn, lsn)` they come
//! after it. Within one transaction `lsn` orders the changes; across
//! transactions `commit_lsn` is the commit order. A re-sent duplicate (after
//! a crash) has the same pair, so consumers may drop events at or below the
//! last pair applied to a key. A truncate carries the pair too and is sent to
//! every partition of the table's topic (see `crate::sink`).

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::Arc;

use crate::change::{Change, Column, Datum, Lsn, Op, Row, SnapshotMarker, TableName};
use crate::value::{DecimalMode, ValueError, write_datum, write_i64, write_str, write_u64};

/// `source.version`: this reader's version (not a Debezium release).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the encoder emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvelopeConfig {
    /// `numeric` representation.
    pub decimal_mode: DecimalMode,
    /// Follow each delete with a tombstone (Debezium's `tombstones.on.delete`).
    pub tombstones: bool,
    /// Emit TRUNCATE as `op: "t"` (Debezium skips it by default).
    pub truncate: bool,
    /// Transaction block in each event plus BEGIN/END on `<prefix>.transaction`.
    pub transaction_metadata: bool,
}

impl Default for EnvelopeConfig {
    fn default() -> Self {
        EnvelopeConfig {
            decimal_mode: DecimalMode::String,
            tombstones: true,
            truncate: true,
            transaction_metadata: false,
        }
    }
}

/// Which partitions of its topic a record goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The partition the key hashes to (the producer's partitioner).
    ByKey,
    /// One copy to every partition of the topic: a truncate concerns every
    /// key, so a consumer of any partition must see it in order with that
    /// partition's other events.
    EveryPartition,
}

/// The partitions to produce a record to, given its topic's partition count:
/// `None` lets the partitioner hash the key.
pub fn partitions(route: Route, partition_count: i32) -> Vec<Option<i32>> {
    match route {
        Route::ByKey => vec![None],
        Route::EveryPartition => (0..partition_count.max(1)).map(Some).collect(),
    }
}

/// One Kafka record, ready to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Topic name.
    pub topic: Arc<str>,
    /// Key bytes (JSON); `None` for a null key. Also the partitioning key.
    pub key: Option<Vec<u8>>,
    /// Value bytes (JSON); `None` for a tombstone.
    pub value: Option<Vec<u8>>,
    /// Where it goes.
    pub route: Route,
    /// Kafka headers (name, UTF-8 value); only the snapshot-complete
    /// marker has any.
    pub headers: Vec<(&'static str, String)>,
}

impl Record {
    /// The record's headers for the producer; `None` when it has none.
    pub fn kafka_headers(&self) -> Option<rdkafka::message::OwnedHeaders> {
        if self.headers.is_empty() {
            return None;
        }
        let headers = rdkafka::message::OwnedHeaders::new_with_capacity(self.headers.len());
        Some(self.headers.iter().fold(headers, |h, (name, value)| {
            h.insert(rdkafka::message::Header {
                key: name,
                value: Some(value.as_bytes()),
            })
        }))
    }
}

/// Header names and value of the snapshot-complete marker.
pub mod marker {
    /// `snapshot_complete`: what the record is.
    pub const KIND: &str = "cdc.marker";
    /// The value of [`KIND`].
    pub const SNAPSHOT_COMPLETE: &str = "snapshot_complete";
    /// `source.db` of the table.
    pub const DB: &str = "cdc.db";
    /// `source.schema` of the table.
    pub const SCHEMA: &str = "cdc.schema";
    /// `source.table`.
    pub const TABLE: &str = "cdc.table";
    /// The snapshot rows' `source.commit_lsn` (consistent point - 1), decimal.
    pub const COMMIT_LSN: &str = "cdc.commit_lsn";
    /// The snapshot rows' `source.lsn` (the consistent point), decimal.
    pub const LSN: &str = "cdc.lsn";
}

/// A value that could not be encoded: which table and column, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{schema}.{table} column {column}: {source}")]
pub struct EncodeError {
    /// Schema of the table.
    pub schema: String,
    /// Table.
    pub table: String,
    /// Column.
    pub column: String,
    /// What was wrong with the value.
    #[source]
    pub source: ValueError,
}

impl From<EncodeError> for crate::error::Error {
    fn from(e: EncodeError) -> Self {
        crate::error::Error::BadData(e.to_string())
    }
}

/// Per-source encoder: configuration, topic-name cache, open transaction.
#[derive(Debug)]
pub struct Encoder {
    config: EnvelopeConfig,
    topics: HashMap<Arc<TableName>, Arc<str>>,
    /// The last table's topic: consecutive changes mostly hit one table.
    last_topic: Option<(Arc<TableName>, Arc<str>)>,
    transaction: Option<OpenTransaction>,
    /// Size of the last event, to allocate the next one in one go.
    size_hint: usize,
}

#[derive(Debug)]
struct OpenTransaction {
    tx_id: u32,
    id: String,
    topic: Arc<str>,
    total: u64,
    /// `schema.table` -> events, in first-seen order.
    per_table: Vec<(String, u64)>,
}

/// Microseconds since the epoch split the way the envelope prints it.
fn write_times(out: &mut Vec<u8>, micros: i64) {
    out.extend_from_slice(b"\"ts_ms\":");
    write_i64(out, micros.div_euclid(1000));
    out.extend_from_slice(b",\"ts_us\":");
    write_i64(out, micros);
    out.extend_from_slice(b",\"ts_ns\":");
    // Nanoseconds: the microseconds followed by three zeros (no i128 maths).
    write_i64(out, micros);
    if micros != 0 {
        out.extend_from_slice(b"000");
    }
}

impl Encoder {
    /// An encoder with the given options.
    pub fn new(config: EnvelopeConfig) -> Self {
        Encoder {
            config,
            topics: HashMap::new(),
            last_topic: None,
            transaction: None,
            size_hint: 512,
        }
    }

    /// The options.
    pub fn config(&self) -> &EnvelopeConfig {
        &self.config
    }

    fn topic(&mut self, table: &Arc<TableName>) -> Arc<str> {
        if let Some((last, topic)) = &self.last_topic
            && Arc::ptr_eq(last, table)
        {
            return topic.clone();
        }
        let topic = match self.topics.get(table) {
            Some(topic) => topic.clone(),
            None => {
                let topic: Arc<str> = table.topic().into();
                self.topics.insert(table.clone(), topic.clone());
                topic
            }
        };
        self.last_topic = Some((table.clone(), topic.clone()));
        topic
    }

    /// Appends the records for `change` to `out`; `now_us` is the processing
    /// time (top-level `ts_ms`). On error nothing is appended.
    pub fn encode(
        &mut self,
        change: &Change,
        now_us: i64,
        out: &mut Vec<Record>,
    ) -> Result<(), EncodeError> {
        let topic = self.topic(&change.table);
        let start = out.len();
        let result = self.encode_into(change, &topic, now_us, out);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    fn encode_into(
        &mut self,
        change: &Change,
        topic: &Arc<str>,
        now_us: i64,
        out: &mut Vec<Record>,
    ) -> Result<(), EncodeError> {
        let cfg = self.config;
        if change.op == Op::Truncate && !cfg.truncate {
            return Ok(());
        }
        if cfg.transaction_metadata
            && let Some(tx_id) = change.source.tx_id
            && self.transaction.as_ref().is_none_or(|t| t.tx_id != tx_id)
        {
            // A change of a new transaction whose predecessor was never
            // closed (should not happen): close it first.
            if let Some(end) = self.end_transaction(change.source.commit_ts_us) {
                out.push(end);
            }
            let id = format!("{tx_id}:{}", change.source.lsn);
            let tx_topic: Arc<str> = crate::topic::transaction_topic(&change.table.prefix).into();
            out.push(Record {
                topic: tx_topic.clone(),
                key: Some(tx_key(&id)),
                value: Some(tx_value("BEGIN", &id, now_us, None)),
                route: Route::ByKey,
                headers: Vec::new(),
            });
            self.transaction = Some(OpenTransaction {
                tx_id,
                id,
                topic: tx_topic,
                total: 0,
                per_table: Vec::new(),
            });
        }
        let columns = &change.columns[..];
        let mode = cfg.decimal_mode;
        match change.op {
            Op::Create | Op::Read => {
                let after = change.after.as_ref();
                let key = encode_key(columns, after, &change.table, mode)?;
                let value = self.event(change, change.op, None, after, now_us)?;
                out.push(record(topic, key, Some(value)));
            }
            Op::Update => {
                let after = change.after.as_ref();
                let new_key = encode_key(columns, after, &change.table, mode)?;
                let before = change.before.as_ref();
                let key_changed = match (before, after) {
                    (Some(b), Some(a)) => columns.iter().enumerate().any(|(i, c)| {
                        c.is_key
                            && !matches!(a.get(i), Some(Datum::UnchangedToast))
                            && b.get(i) != a.get(i)
                    }),
                    _ => false,
                };
                if key_changed {
                    let old_key = encode_key(columns, before, &change.table, mode)?;
                    let value = self.event(change, Op::Delete, before, None, now_us)?;
                    out.push(record(topic, old_key.clone(), Some(value)));
                    if cfg.tombstones && old_key.is_some() {
                        out.push(record(topic, old_key, None));
                    }
                    let value = self.event(change, Op::Create, None, after, now_us)?;
                    out.push(record(topic, new_key, Some(value)));
                } else {
                    let value = self.event(change, Op::Update, before, after, now_us)?;
                    out.push(record(topic, new_key, Some(value)));
                }
            }
            Op::Delete => {
                let before = change.before.as_ref();
                let key = encode_key(columns, before, &change.table, mode)?;
                let value = self.event(change, Op::Delete, before, None, now_us)?;
                out.push(record(topic, key.clone(), Some(value)));
                if cfg.tombstones && key.is_some() {
                    out.push(record(topic, key, None));
                }
            }
            Op::Truncate => {
                let value = self.event(change, Op::Truncate, None, None, now_us)?;
                out.push(Record {
                    route: Route::EveryPartition,
                    ..record(topic, None, Some(value))
                });
            }
            Op::SnapshotComplete => out.push(snapshot_complete(topic, change)),
        }
        Ok(())
    }

    /// Closes the open transaction (if transaction metadata is on and one is
    /// open) and returns its END record.
    pub fn end_transaction(&mut self, now_us: i64) -> Option<Record> {
        let tx = self.transaction.take()?;
        let mut collections = Vec::with_capacity(64);
        collections.push(b'[');
        for (i, (name, count)) in tx.per_table.iter().enumerate() {
            if i > 0 {
                collections.push(b',');
            }
            collections.extend_from_slice(b"{\"data_collection\":");
            write_str(&mut collections, name);
            let _ = write!(collections, ",\"event_count\":{count}}}");
        }
        collections.push(b']');
        Some(Record {
            topic: tx.topic,
            route: Route::ByKey,
            headers: Vec::new(),
            key: Some(tx_key(&tx.id)),
            value: Some(tx_value(
                "END",
                &tx.id,
                now_us,
                Some((tx.total, &collections)),
            )),
        })
    }

    /// One event value. Counts it in the open transaction.
    fn event(
        &mut self,
        change: &Change,
        op: Op,
        before: Option<&Row>,
        after: Option<&Row>,
        now_us: i64,
    ) -> Result<Vec<u8>, EncodeError> {
        let mode = self.config.decimal_mode;
        let table = &change.table;
        let src = &change.source;
        let mut out = Vec::with_capacity(self.size_hint);
        out.extend_from_slice(b"{\"before\":");
        write_row(&mut out, &change.columns, before, table, mode)?;
        out.extend_from_slice(b",\"after\":");
        write_row(&mut out, &change.columns, after, table, mode)?;
        out.extend_from_slice(b",\"source\":{\"version\":");
        write_str(&mut out, VERSION);
        out.extend_from_slice(b",\"connector\":\"postgresql\",\"name\":");
        write_str(&mut out, &table.prefix);
        out.push(b',');
        write_times(&mut out, src.commit_ts_us);
        out.extend_from_slice(b",\"snapshot\":");
        out.extend_from_slice(match src.snapshot {
            SnapshotMarker::No => b"\"false\"",
            SnapshotMarker::First => b"\"first\"",
            SnapshotMarker::InProgress => b"\"true\"",
            SnapshotMarker::Last => b"\"last\"",
            SnapshotMarker::Incremental => b"\"incremental\"",
        });
        out.extend_from_slice(b",\"db\":");
        write_str(&mut out, &table.database);
        out.extend_from_slice(b",\"sequence\":");
        // `sequence`: a string holding ["<last commit lsn>","<lsn>"].
        match src.last_commit_lsn {
            Some(last) => {
                out.extend_from_slice(b"\"[\\\"");
                write_u64(&mut out, last);
                out.extend_from_slice(b"\\\",");
            }
            None => out.extend_from_slice(b"\"[null,"),
        }
        out.extend_from_slice(b"\\\"");
        write_u64(&mut out, src.lsn);
        out.extend_from_slice(b"\\\"]\"");
        out.extend_from_slice(b",\"schema\":");
        write_str(&mut out, &table.schema);
        out.extend_from_slice(b",\"table\":");
        write_str(&mut out, &table.table);
        match src.tx_id {
            Some(tx) => {
                out.extend_from_slice(b",\"txId\":");
                write_u64(&mut out, tx.into());
            }
            None => out.extend_from_slice(b",\"txId\":null"),
        }
        out.extend_from_slice(b",\"lsn\":");
        write_u64(&mut out, src.lsn);
        // Our own field, after Debezium's: the ordering position (see the module doc).
        out.extend_from_slice(b",\"xmin\":null,\"commit_lsn\":");
        write_u64(&mut out, src.commit_lsn);
        out.extend_from_slice(b"},\"op\":\"");
        out.extend_from_slice(op.code().as_bytes());
        out.extend_from_slice(b"\",");
        write_times(&mut out, now_us);
        out.extend_from_slice(b",\"transaction\":");
        match self.transaction.as_mut() {
            Some(tx) if src.tx_id == Some(tx.tx_id) => {
                tx.total += 1;
                let name = format!("{}.{}", table.schema, table.table);
                let per_table = match tx.per_table.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, count)) => {
                        *count += 1;
                        *count
                    }
                    None => {
                        tx.per_table.push((name, 1));
                        1
                    }
                };
                out.extend_from_slice(b"{\"id\":");
                write_str(&mut out, &tx.id);
                let _ = write!(
                    out,
                    ",\"total_order\":{},\"data_collection_order\":{per_table}}}",
                    tx.total
                );
            }
            _ => out.extend_from_slice(b"null"),
        }
        out.push(b'}');
        self.size_hint = out.len() + 64;
        Ok(out)
    }
}

fn record(topic: &Arc<str>, key: Option<Vec<u8>>, value: Option<Vec<u8>>) -> Record {
    Record {
        topic: topic.clone(),
        key,
        value,
        route: Route::ByKey,
        headers: Vec::new(),
    }
}

/// The snapshot-complete marker of `change.table`: null key, null value,
/// on every partition, positioned by headers at the snapshot rows'
/// `(commit_lsn, lsn)`.
fn snapshot_complete(topic: &Arc<str>, change: &Change) -> Record {
    let table = &change.table;
    Record {
        route: Route::EveryPartition,
        headers: vec![
            (marker::KIND, marker::SNAPSHOT_COMPLETE.to_owned()),
            (marker::DB, table.database.clone()),
            (marker::SCHEMA, table.schema.clone()),
            (marker::TABLE, table.table.clone()),
            (marker::COMMIT_LSN, change.source.commit_lsn.to_string()),
            (marker::LSN, change.source.lsn.to_string()),
        ],
        ..record(topic, None, None)
    }
}

/// `source.sequence`: a string holding `["<last commit lsn>","<lsn>"]`.
pub fn sequence(last_commit_lsn: Option<Lsn>, lsn: Lsn) -> String {
    match last_commit_lsn {
        Some(last) => format!("[\"{last}\",\"{lsn}\"]"),
        None => format!("[null,\"{lsn}\"]"),
    }
}

fn tx_key(id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(id.len() + 10);
    out.extend_from_slice(b"{\"id\":");
    write_str(&mut out, id);
    out.push(b'}');
    out
}

fn tx_value(status: &str, id: &str, now_us: i64, end: Option<(u64, &[u8])>) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"{\"status\":");
    write_str(&mut out, status);
    out.extend_from_slice(b",\"id\":");
    write_str(&mut out, id);
    out.push(b',');
    write_times(&mut out, now_us);
    match end {
        Some((count, collections)) => {
            let _ = write!(out, ",\"event_count\":{count},\"data_collections\":");
            out.extend_from_slice(collections);
        }
        None => out.extend_from_slice(b",\"event_count\":null,\"data_collections\":null"),
    }
    out.push(b'}');
    out
}

fn value_error(table: &TableName, column: &Column, source: ValueError) -> EncodeError {
    EncodeError {
        schema: table.schema.clone(),
        table: table.table.clone(),
        column: column.name.clone(),
        source,
    }
}

fn write_row(
    out: &mut Vec<u8>,
    columns: &[Column],
    row: Option<&Row>,
    table: &TableName,
    mode: DecimalMode,
) -> Result<(), EncodeError> {
    let Some(row) = row else {
        out.extend_from_slice(b"null");
        return Ok(());
    };
    out.push(b'{');
    for (i, column) in columns.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, &column.name);
        out.push(b':');
        let datum = row.get(i).unwrap_or(&Datum::Null);
        write_datum(out, datum, column, mode).map_err(|e| value_error(table, column, e))?;
    }
    out.push(b'}');
    Ok(())
}

/// The key of `row`: `{"<key column>":value,...}`, `None` when the table has
/// no key columns or the row is missing.
pub fn encode_key(
    columns: &[Column],
    row: Option<&Row>,
    table: &TableName,
    mode: DecimalMode,
) -> Result<Option<Vec<u8>>, EncodeError> {
    let Some(row) = row else { return Ok(None) };
    if !columns.iter().any(|c| c.is_key) {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(32);
    out.push(b'{');
    let mut first = true;
    for (i, column) in columns.iter().enumerate().filter(|(_, c)| c.is_key) {
        if !first {
            out.push(b',');
        }
        first = false;
        write_str(&mut out, &column.name);
        out.push(b':');
        let datum = row.get(i).unwrap_or(&Datum::Null);
        write_datum(&mut out, datum, column, mode).map_err(|e| value_error(table, column, e))?;
    }
    out.push(b'}');
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Source;
    use crate::value::oid;
    use bytes::Bytes;
    use serde_json::{Value, json};

    fn table() -> Arc<TableName> {
        Arc::new(TableName {
            prefix: "instashop".into(),
            database: "instashop".into(),
            schema: "public".into(),
            table: "customer".into(),
        })
    }

    fn columns() -> Arc<[Column]> {
        let col = |name: &str, type_oid: u32, is_key: bool| Column {
            name: name.into(),
            type_oid,
            type_modifier: -1,
            is_key,
        };
        Arc::from(vec![
            col("id", oid::INT8, true),
            col("name", oid::TEXT, false),
            col("is_active", oid::BOOL, false),
        ])
    }

    fn row(id: &str, name: Option<&str>, active: &str) -> Row {
        let t = |s: &str| Datum::Text(Bytes::copy_from_slice(s.as_bytes()));
        vec![t(id), name.map_or(Datum::Null, t), t(active)]
    }

    fn source(tx_id: Option<u32>, lsn: Lsn) -> Source {
        Source {
            commit_ts_us: 1_559_033_904_863_000,
            snapshot: SnapshotMarker::No,
            tx_id,
            lsn,
            last_commit_lsn: Some(24_023_000),
            commit_lsn: 24_023_000,
        }
    }

    fn change(op: Op, before: Option<Row>, after: Option<Row>) -> Change {
        Change {
            table: table(),
            columns: columns(),
            op,
            before,
            after,
            source: source(Some(555), 24_023_128),
        }
    }

    const NOW_US: i64 = 1_559_033_904_986_123;

    fn encode(config: EnvelopeConfig, change: &Change) -> Vec<Record> {
        let mut out = Vec::new();
        Encoder::new(config)
            .encode(change, NOW_US, &mut out)
            .expect("encodes");
        out
    }

    fn json_of(bytes: &Option<Vec<u8>>) -> Value {
        match bytes {
            Some(b) => serde_json::from_slice(b).expect("valid JSON"),
            None => Value::Null,
        }
    }

    #[test]
    fn create_event_matches_debezium_layout() {
        let records = encode(
            EnvelopeConfig::default(),
            &change(Op::Create, None, Some(row("1", Some("Anne"), "t"))),
        );
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!(&*r.topic, "instashop.public.customer");
        assert_eq!(json_of(&r.key), json!({"id": 1}));
        assert_eq!(
            json_of(&r.value),
            json!({
                "before": null,
                "after": {"id": 1, "name": "Anne", "is_active": true},
                "source": {
                    "version": VERSION,
                    "connector": "postgresql",
                    "name": "instashop",
                    "ts_ms": 1_559_033_904_863i64,
                    "ts_us": 1_559_033_904_863_000i64,
                    "ts_ns": 1_559_033_904_863_000_000i64,
                    "snapshot": "false",
                    "db": "instashop",
                    "sequence": "[\"24023000\",\"24023128\"]",
                    "schema": "public",
                    "table": "customer",
                    "txId": 555,
                    "lsn": 24_023_128,
                    "xmin": null,
                    "commit_lsn": 24_023_000
                },
                "op": "c",
                "ts_ms": 1_559_033_904_986i64,
                "ts_us": NOW_US,
                "ts_ns": 1_559_033_904_986_123_000i64,
                "transaction": null
            })
        );
        // Field order as Debezium writes it.
        let text = String::from_utf8(r.value.clone().unwrap_or_default()).unwrap_or_default();
        let pos = |s: &str| text.find(s).unwrap_or(usize::MAX);
        assert!(pos("\"before\"") < pos("\"after\""));
        assert!(pos("\"after\"") < pos("\"source\""));
        assert!(pos("\"source\"") < pos("\"op\""));
    }

    #[test]
    fn update_with_same_key_is_one_u_event() {
        let before = row("1", Some("Anne"), "t");
        let after = row("1", Some("Anne Marie"), "f");
        let records = encode(
            EnvelopeConfig::default(),
            &change(Op::Update, Some(before), Some(after)),
        );
        assert_eq!(records.len(), 1);
        let v = json_of(&records[0].value);
        assert_eq!(v["op"], "u");
        assert_eq!(
            v["before"],
            json!({"id": 1, "name": "Anne", "is_active": true})
        );
        assert_eq!(
            v["after"],
            json!({"id": 1, "name": "Anne Marie", "is_active": false})
        );
        assert_eq!(json_of(&records[0].key), json!({"id": 1}));
    }

    #[test]
    fn update_without_old_row_has_null_before() {
        let records = encode(
            EnvelopeConfig::default(),
            &change(Op::Update, None, Some(row("1", None, "t"))),
        );
        let v = json_of(&records[0].value);
        assert_eq!(v["before"], Value::Null);
        assert_eq!(v["after"]["name"], Value::Null);
    }

    #[test]
    fn delete_is_followed_by_a_tombstone() {
        // REPLICA IDENTITY DEFAULT: only the key in `before`, the rest null.
        let before = vec![
            Datum::Text(Bytes::from_static(b"1")),
            Datum::Null,
            Datum::Null,
        ];
        let records = encode(
            EnvelopeConfig::default(),
            &change(Op::Delete, Some(before), None),
        );
        assert_eq!(records.len(), 2);
        let v = json_of(&records[0].value);
        assert_eq!(v["op"], "d");
        assert_eq!(
            v["before"],
            json!({"id": 1, "name": null, "is_active": null})
        );
        assert_eq!(v["after"], Value::Null);
        assert_eq!(json_of(&records[0].key), json!({"id": 1}));
        assert_eq!(records[1].key, records[0].key);
        assert_eq!(records[1].value, None);
        assert_eq!(records[1].topic, records[0].topic);
    }

    #[test]
    fn tombstones_can_be_switched_off() {
        let config = EnvelopeConfig {
            tombstones: false,
            ..EnvelopeConfig::default()
        };
        let records = encode(config, &change(Op::Delete, Some(row("1", None, "t")), None));
        assert_eq!(records.len(), 1);
    }

    #[test]
    fn key_change_is_delete_tombstone_create() {
        let before = row("1", Some("Anne"), "t");
        let after = row("2", Some("Anne"), "t");
        let records = encode(
            EnvelopeConfig::default(),
            &change(Op::Update, Some(before), Some(after)),
        );
        assert_eq!(records.len(), 3);
        assert_eq!(json_of(&records[0].key), json!({"id": 1}));
        assert_eq!(json_of(&records[0].value)["op"], "d");
        assert_eq!(json_of(&records[0].value)["before"]["id"], 1);
        assert_eq!(json_of(&records[1].key), json!({"id": 1}));
        assert_eq!(records[1].value, None);
        assert_eq!(json_of(&records[2].key), json!({"id": 2}));
        let create = json_of(&records[2].value);
        assert_eq!(create["op"], "c");
        assert_eq!(create["before"], Value::Null);
        assert_eq!(create["after"]["id"], 2);
    }

    #[test]
    fn table_without_key_has_null_key_and_no_tombstone() {
        let mut c = change(Op::Delete, Some(row("1", None, "t")), None);
        c.columns = Arc::from(
            c.columns
                .iter()
                .map(|col| Column {
                    is_key: false,
                    ..col.clone()
                })
                .collect::<Vec<_>>(),
        );
        let records = encode(EnvelopeConfig::default(), &c);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].key, None);
    }

    #[test]
    fn composite_key_in_column_order() {
        let mut c = change(Op::Create, None, Some(row("7", Some("x"), "t")));
        c.columns = Arc::from(
            c.columns
                .iter()
                .map(|col| Column {
                    is_key: col.name != "is_active",
                    ..col.clone()
                })
                .collect::<Vec<_>>(),
        );
        let records = encode(EnvelopeConfig::default(), &c);
        assert_eq!(
            String::from_utf8(records[0].key.clone().unwrap_or_default()).unwrap_or_default(),
            r#"{"id":7,"name":"x"}"#
        );
    }

    #[test]
    fn snapshot_complete_is_a_headers_only_record_on_every_partition() {
        let rows = Source::snapshot_row(1_000, 5);
        let marker = crate::snapshot::complete_marker(&table(), &rows);
        let records = encode(EnvelopeConfig::default(), &marker);
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!((r.key.as_ref(), r.value.as_ref()), (None, None));
        assert_eq!(r.route, Route::EveryPartition);
        assert_eq!(&*r.topic, "instashop.public.customer");
        let headers: Vec<(&str, &str)> = r.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(
            headers,
            [
                ("cdc.marker", "snapshot_complete"),
                ("cdc.db", "instashop"),
                ("cdc.schema", "public"),
                ("cdc.table", "customer"),
                ("cdc.commit_lsn", "999"),
                ("cdc.lsn", "1000"),
            ]
        );
        assert!(r.kafka_headers().is_some());
        // The same with transaction metadata on: no BEGIN/END around it.
        let with_tx = EnvelopeConfig {
            transaction_metadata: true,
            ..EnvelopeConfig::default()
        };
        assert_eq!(encode(with_tx, &marker).len(), 1);
    }

    #[test]
    fn truncate_is_switchable() {
        let c = change(Op::Truncate, None, None);
        let records = encode(EnvelopeConfig::default(), &c);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].key, None);
        let v = json_of(&records[0].value);
        assert_eq!(v["op"], "t");
        assert_eq!(v["before"], Value::Null);
        assert_eq!(v["after"], Value::Null);
        let off = EnvelopeConfig {
            truncate: false,
            ..EnvelopeConfig::default()
        };
        assert!(encode(off, &c).is_empty());
    }

    #[test]
    fn truncate_goes_to_every_partition_other_records_by_key() {
        let t = encode(EnvelopeConfig::default(), &change(Op::Truncate, None, None));
        assert_eq!(t[0].route, Route::EveryPartition);
        assert_eq!(partitions(t[0].route, 3), vec![Some(0), Some(1), Some(2)]);
        let d = encode(
            EnvelopeConfig::default(),
            &change(Op::Delete, Some(row("1", None, "t")), None),
        );
        assert!(
            d.iter().all(|r| r.route == Route::ByKey),
            "delete and tombstone"
        );
        assert_eq!(partitions(Route::ByKey, 3), vec![None]);
        // A topic whose partition count is unknown still gets one copy.
        assert_eq!(partitions(Route::EveryPartition, 0), vec![Some(0)]);
    }

    #[test]
    fn snapshot_read_event() {
        let mut c = change(Op::Read, None, Some(row("3", Some("Bo"), "f")));
        c.source.tx_id = None;
        c.source.last_commit_lsn = None;
        c.source.snapshot = SnapshotMarker::First;
        let v = json_of(&encode(EnvelopeConfig::default(), &c)[0].value);
        assert_eq!(v["op"], "r");
        assert_eq!(v["source"]["snapshot"], "first");
        assert_eq!(v["source"]["txId"], Value::Null);
        assert_eq!(v["source"]["sequence"], "[null,\"24023128\"]");
        c.source.snapshot = SnapshotMarker::Last;
        let v = json_of(&encode(EnvelopeConfig::default(), &c)[0].value);
        assert_eq!(v["source"]["snapshot"], "last");
        c.source.snapshot = SnapshotMarker::InProgress;
        let v = json_of(&encode(EnvelopeConfig::default(), &c)[0].value);
        assert_eq!(v["source"]["snapshot"], "true");
    }

    #[test]
    fn every_event_carries_the_commit_position_as_a_number() {
        // A change made before the snapshot's consistent point (lsn 900) by a
        // transaction that committed after it (commit 1_200).
        let mut streamed = change(Op::Update, None, Some(row("1", None, "t")));
        streamed.source.lsn = 900;
        streamed.source.last_commit_lsn = Some(1_200);
        streamed.source.commit_lsn = 1_200;
        let v = json_of(&encode(EnvelopeConfig::default(), &streamed)[0].value);
        assert_eq!(v["source"]["commit_lsn"], json!(1_200));
        // Debezium's own fields keep their meaning.
        assert_eq!(v["source"]["lsn"], json!(900));
        assert_eq!(v["source"]["sequence"], "[\"1200\",\"900\"]");
        assert_eq!(v["source"]["txId"], json!(555));

        let mut snap = change(Op::Read, None, Some(row("1", None, "f")));
        snap.source = Source::snapshot_row(1_000, snap.source.commit_ts_us / 1000);
        let r = json_of(&encode(EnvelopeConfig::default(), &snap)[0].value);
        assert_eq!(r["source"]["lsn"], json!(1_000));
        assert_eq!(r["source"]["snapshot"], "true");

        // Ordered by (commit_lsn, lsn) the update comes after the snapshot
        // row; ordered by lsn alone it would come first and be dropped.
        let position = |v: &Value| {
            (
                v["source"]["commit_lsn"].as_u64(),
                v["source"]["lsn"].as_u64(),
            )
        };
        assert!(position(&r) < position(&v));
        assert!(v["source"]["lsn"].as_u64() < r["source"]["lsn"].as_u64());

        // A transaction whose commit record starts exactly at the consistent
        // point is streamed, not in the snapshot: it still orders after.
        streamed.source.commit_lsn = 1_000;
        let tie = json_of(&encode(EnvelopeConfig::default(), &streamed)[0].value);
        assert!(position(&r) < position(&tie));
        // A transaction the snapshot already holds (re-sent after an
        // interrupted snapshot) orders before.
        streamed.source.commit_lsn = 992;
        let older = json_of(&encode(EnvelopeConfig::default(), &streamed)[0].value);
        assert!(position(&older) < position(&r));

        // Truncates carry it too.
        let mut t = change(Op::Truncate, None, None);
        t.source.commit_lsn = 1_300;
        let tv = json_of(&encode(EnvelopeConfig::default(), &t)[0].value);
        assert_eq!(tv["source"]["commit_lsn"], json!(1_300));
    }

    #[test]
    fn unchanged_toast_becomes_placeholder() {
        let mut after = row("1", None, "t");
        after[1] = Datum::UnchangedToast;
        let records = encode(
            EnvelopeConfig::default(),
            &change(Op::Update, None, Some(after)),
        );
        let v = json_of(&records[0].value);
        assert_eq!(v["after"]["name"], "__debezium_unavailable_value");
    }

    #[test]
    fn bad_value_names_table_and_column_and_emits_nothing() {
        let mut out = Vec::new();
        let bad = change(Op::Create, None, Some(row("1", Some("a"), "yes")));
        let err = Encoder::new(EnvelopeConfig::default())
            .encode(&bad, NOW_US, &mut out)
            .expect_err("bad bool");
        assert_eq!(err.column, "is_active");
        assert!(err.to_string().contains("public.customer column is_active"));
        assert!(!err.to_string().contains("yes"), "never echoes values");
        assert!(out.is_empty());
    }

    #[test]
    fn transaction_metadata_begin_blocks_end() {
        let config = EnvelopeConfig {
            transaction_metadata: true,
            ..EnvelopeConfig::default()
        };
        let mut encoder = Encoder::new(config);
        let mut out = Vec::new();
        let c1 = change(Op::Create, None, Some(row("1", None, "t")));
        let c2 = change(Op::Create, None, Some(row("2", None, "t")));
        encoder.encode(&c1, NOW_US, &mut out).expect("encodes");
        encoder.encode(&c2, NOW_US, &mut out).expect("encodes");
        out.extend(encoder.end_transaction(NOW_US));
        assert_eq!(out.len(), 4);
        assert_eq!(&*out[0].topic, "instashop.transaction");
        assert_eq!(json_of(&out[0].key), json!({"id": "555:24023128"}));
        let begin = json_of(&out[0].value);
        assert_eq!(begin["status"], "BEGIN");
        assert_eq!(begin["event_count"], Value::Null);
        let e2 = json_of(&out[2].value);
        assert_eq!(
            e2["transaction"],
            json!({"id": "555:24023128", "total_order": 2, "data_collection_order": 2})
        );
        let end = json_of(&out[3].value);
        assert_eq!(end["status"], "END");
        assert_eq!(end["event_count"], 2);
        assert_eq!(
            end["data_collections"],
            json!([{"data_collection": "public.customer", "event_count": 2}])
        );
        // Nothing open any more.
        assert!(encoder.end_transaction(NOW_US).is_none());
    }
}
