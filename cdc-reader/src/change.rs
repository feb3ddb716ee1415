//! A decoded row change: the hand-off between the replication side
//! (`pgoutput`, `relation`, `replication`, `snapshot`) and the Kafka side
//! (`value`, `envelope`, `topic`, `sink`).
//!
//! Column values stay in pgoutput's text form until the Kafka side renders
//! them, so the replication side never needs to know Debezium's JSON rules.

use std::sync::Arc;

use bytes::Bytes;

/// A WAL position (`pg_lsn`) as the 64-bit integer Debezium puts in `source.lsn`.
pub type Lsn = u64;

/// Formats an LSN the way Postgres prints it (`16/B374D848`).
pub fn lsn_to_string(lsn: Lsn) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses `16/B374D848`; `None` when malformed.
pub fn parse_lsn(text: &str) -> Option<Lsn> {
    let (hi, lo) = text.split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    (hi <= 0xFFFF_FFFF && lo <= 0xFFFF_FFFF).then_some((hi << 32) | lo)
}

/// Debezium's `op` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `c`: insert.
    Create,
    /// `u`: update.
    Update,
    /// `d`: delete.
    Delete,
    /// `r`: row read by the initial snapshot.
    Read,
    /// `t`: table truncated.
    Truncate,
    /// Not a Debezium op: the end of a table's snapshot, sent as a record
    /// with a null key, a null value and `cdc.*` headers (see
    /// [`crate::envelope`]); rows it did not re-read are gone.
    SnapshotComplete,
}

impl Op {
    /// The one-letter code Debezium writes.
    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Truncate => "t",
            // Never written as an `op` field: the marker has no value.
            Op::SnapshotComplete => "snapshot_complete",
        }
    }
}

/// Where a table's events go and how `source` names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    /// Topic prefix and `source.name` (the logical name of the database).
    pub prefix: String,
    /// `source.db`: the Postgres database name.
    pub database: String,
    /// `source.schema`.
    pub schema: String,
    /// `source.table`.
    pub table: String,
}

impl TableName {
    /// `<prefix>.<schema>.<table>`.
    pub fn topic(&self) -> String {
        format!("{}.{}.{}", self.prefix, self.schema, self.table)
    }
}

/// One column of a relation, as the latest Relation message described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Type OID (`pg_type.oid`); custom types (enums, domains) have OIDs ≥ 16384.
    pub type_oid: u32,
    /// `atttypmod` (e.g. numeric precision/scale), -1 when none.
    pub type_modifier: i32,
    /// Part of the primary key (or replica identity index).
    pub is_key: bool,
}

/// One column value in pgoutput's text representation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value the server did not send; the relation layer
    /// replaces it from the old row when it can. If it reaches the envelope it
    /// is rendered as Debezium's `__debezium_unavailable_value`.
    UnchangedToast,
    /// The value in Postgres' text output format (UTF-8).
    Text(Bytes),
}

/// A row: values in the column order of `Change::columns`.
pub type Row = Vec<Datum>;

/// Whether an event belongs to the initial snapshot (`source.snapshot`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMarker {
    /// Streamed change: `"false"`.
    No,
    /// First row of the snapshot: `"first"`.
    First,
    /// A row in the middle of the snapshot: `"true"`.
    InProgress,
    /// Last row of the snapshot: `"last"`.
    Last,
    /// A row of an incremental snapshot chunk: `"incremental"`.
    Incremental,
}

/// The `source` block's facts that come from the replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Commit time of the transaction, µs since the epoch, as pgoutput gives
    /// it (snapshot: the time the snapshot was taken, in whole ms).
    pub commit_ts_us: i64,
    /// Snapshot marker.
    pub snapshot: SnapshotMarker,
    /// Transaction id (`txId`); `None` for snapshot rows.
    pub tx_id: Option<u32>,
    /// This change's LSN (`source.lsn`; for snapshot rows the consistent point).
    pub lsn: Lsn,
    /// LSN of the last commit before this transaction, the first element of
    /// `source.sequence`; `None` when not known.
    pub last_commit_lsn: Option<Lsn>,
    /// Our own `source.commit_lsn`: the LSN of the commit record of the
    /// change's transaction (pgoutput Begin's `final_lsn`); for snapshot rows
    /// the slot's consistent point minus one. See [`crate::envelope`] for the
    /// contract.
    pub commit_lsn: Lsn,
}

impl Source {
    /// The `source` facts of a snapshot row: `lsn` is the slot's consistent
    /// point and `commit_lsn` one below it, so every streamed transaction,
    /// even one whose commit record starts exactly at the consistent point,
    /// orders after the row (see [`crate::envelope`]).
    pub fn snapshot_row(consistent_point: Lsn, taken_ms: i64) -> Source {
        Source {
            commit_ts_us: taken_ms.saturating_mul(1000),
            snapshot: SnapshotMarker::InProgress,
            tx_id: None,
            lsn: consistent_point,
            last_commit_lsn: None,
            commit_lsn: consistent_point.saturating_sub(1),
        }
    }
}

/// One change of one row (or one truncated table).
#[derive(Debug, Clone)]
pub struct Change {
    /// Table identity; shared by all changes of that table.
    pub table: Arc<TableName>,
    /// Columns of the relation when the change was decoded; shared.
    pub columns: Arc<[Column]>,
    /// Operation.
    pub op: Op,
    /// Old row: full with REPLICA IDENTITY FULL, key columns only otherwise
    /// (other positions `Datum::Null`), `None` when the server sent none.
    pub before: Option<Row>,
    /// New row; `None` for delete and truncate.
    pub after: Option<Row>,
    /// Source metadata.
    pub source: Source,
}
