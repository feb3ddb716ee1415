//! Event format against the examples in Debezium's PostgreSQL connector
//! documentation (`connectors/postgresql.adoc`, "Data change events"): the
//! `customers` table, its key, and the create, update, primary-key change,
//! delete and tombstone events, with schemas disabled.
//!
//! Only what Debezium itself varies per installation is not compared
//! literally: `source.version` (ours is the reader's version) and the
//! processing time (`ts_ms` at the top, which the test fixes).

use std::sync::Arc;

use bytes::Bytes;
use cdc_reader::change::{Change, Column, Datum, Op, Row, SnapshotMarker, Source, TableName};
use cdc_reader::envelope::{Encoder, EnvelopeConfig, Record, VERSION};
use serde_json::{Value, json};

// CREATE TABLE customers (id SERIAL, first_name VARCHAR(255) NOT NULL,
//   last_name VARCHAR(255) NOT NULL, email VARCHAR(255) NOT NULL, PRIMARY KEY(id));
fn customers() -> (Arc<TableName>, Arc<[Column]>) {
    let table = Arc::new(TableName {
        prefix: "PostgreSQL_server".into(),
        database: "postgres".into(),
        schema: "public".into(),
        table: "customers".into(),
    });
    let col = |name: &str, type_oid: u32, type_modifier: i32, is_key: bool| Column {
        name: name.into(),
        type_oid,
        type_modifier,
        is_key,
    };
    let columns: Arc<[Column]> = Arc::from(vec![
        col("id", 23, -1, true),
        col("first_name", 1043, 259, false),
        col("last_name", 1043, 259, false),
        col("email", 1043, 259, false),
    ]);
    (table, columns)
}

fn row(values: &[&str]) -> Row {
    values
        .iter()
        .map(|v| Datum::Text(Bytes::copy_from_slice(v.as_bytes())))
        .collect()
}

const NOW_US: i64 = 1_559_033_904_863_000;

fn encode(op: Op, before: Option<Row>, after: Option<Row>, source: Source) -> Vec<Record> {
    let (table, columns) = customers();
    let change = Change {
        table,
        columns,
        op,
        before,
        after,
        source,
    };
    let mut out = Vec::new();
    Encoder::new(EnvelopeConfig::default())
        .encode(&change, NOW_US, &mut out)
        .expect("documented example encodes");
    out
}

fn json_of(bytes: Option<&Vec<u8>>) -> Value {
    bytes.map_or(Value::Null, |b| {
        serde_json::from_slice(b).expect("valid JSON")
    })
}

fn source(ts_ms: i64, tx_id: u32, last: u64, lsn: u64) -> Source {
    Source {
        commit_ts_us: ts_ms * 1000,
        snapshot: SnapshotMarker::No,
        tx_id: Some(tx_id),
        lsn,
        last_commit_lsn: Some(last),
        commit_lsn: last,
    }
}

fn expected_source(ts_ms: i64, tx_id: u32, sequence: &str, lsn: u64) -> Value {
    json!({
        "version": VERSION,
        "connector": "postgresql",
        "name": "PostgreSQL_server",
        "ts_ms": ts_ms,
        "ts_us": ts_ms * 1000,
        "ts_ns": i128::from(ts_ms) * 1_000_000,
        "snapshot": "false",
        "db": "postgres",
        "sequence": sequence,
        "schema": "public",
        "table": "customers",
        "txId": tx_id,
        "lsn": lsn,
        "xmin": null,
        "commit_lsn": commit_lsn_of(sequence)
    })
}

/// Our own `source.commit_lsn`: the commit position, the first element of
/// `sequence` for streamed changes in these examples.
fn commit_lsn_of(sequence: &str) -> u64 {
    let parsed: Vec<Option<String>> = serde_json::from_str(sequence).expect("sequence is JSON");
    parsed[0]
        .as_deref()
        .map_or(0, |s| s.parse().expect("numeric lsn"))
}

// `json!` serialises its arguments by reference.
#[allow(clippy::needless_pass_by_value)]
fn envelope(before: Value, after: Value, source: Value, op: &str) -> Value {
    json!({
        "before": before,
        "after": after,
        "source": source,
        "op": op,
        "ts_ms": NOW_US / 1000,
        "ts_us": NOW_US,
        "ts_ns": i128::from(NOW_US) * 1000,
        "transaction": null
    })
}

const ANNE: [&str; 4] = ["1", "Anne", "Kretchmar", "annek@noanswer.org"];

#[test]
fn key_is_the_primary_key_columns() {
    let records = encode(
        Op::Create,
        None,
        Some(row(&ANNE)),
        source(1_559_033_904_863, 555, 24_023_119, 24_023_128),
    );
    // Documented key payload: {"id": 1}.
    assert_eq!(json_of(records[0].key.as_ref()), json!({"id": 1}));
    assert_eq!(&*records[0].topic, "PostgreSQL_server.public.customers");
}

#[test]
fn create_event() {
    let records = encode(
        Op::Create,
        None,
        Some(row(&ANNE)),
        source(1_559_033_904_863, 555, 24_023_119, 24_023_128),
    );
    assert_eq!(records.len(), 1);
    assert_eq!(
        json_of(records[0].value.as_ref()),
        envelope(
            Value::Null,
            json!({"id": 1, "first_name": "Anne", "last_name": "Kretchmar", "email": "annek@noanswer.org"}),
            expected_source(
                1_559_033_904_863,
                555,
                "[\"24023119\",\"24023128\"]",
                24_023_128
            ),
            "c"
        )
    );
}

#[test]
fn update_event_with_replica_identity_full() {
    let records = encode(
        Op::Update,
        Some(row(&ANNE)),
        Some(row(&["1", "Anne Marie", "Kretchmar", "annek@noanswer.org"])),
        source(1_465_584_025_523, 556, 24_023_119, 24_023_128),
    );
    assert_eq!(records.len(), 1);
    assert_eq!(json_of(records[0].key.as_ref()), json!({"id": 1}));
    assert_eq!(
        json_of(records[0].value.as_ref()),
        envelope(
            json!({"id": 1, "first_name": "Anne", "last_name": "Kretchmar", "email": "annek@noanswer.org"}),
            json!({"id": 1, "first_name": "Anne Marie", "last_name": "Kretchmar", "email": "annek@noanswer.org"}),
            expected_source(
                1_465_584_025_523,
                556,
                "[\"24023119\",\"24023128\"]",
                24_023_128
            ),
            "u"
        )
    );
}

#[test]
fn update_event_with_default_replica_identity_has_null_before() {
    let records = encode(
        Op::Update,
        None,
        Some(row(&["1", "Anne Marie", "Kretchmar", "annek@noanswer.org"])),
        source(1_465_584_025_523, 556, 24_023_119, 24_023_128),
    );
    let value = json_of(records[0].value.as_ref());
    assert_eq!(value["before"], Value::Null);
    assert_eq!(value["op"], "u");
}

#[test]
fn primary_key_update_is_delete_tombstone_create() {
    // "Primary key updates": a DELETE event and a tombstone for the old key,
    // then a CREATE event for the new key.
    let records = encode(
        Op::Update,
        Some(row(&ANNE)),
        Some(row(&["2", "Anne", "Kretchmar", "annek@noanswer.org"])),
        source(1_465_584_025_523, 556, 24_023_119, 24_023_128),
    );
    let ops: Vec<(Value, Value)> = records
        .iter()
        .map(|r| {
            (
                json_of(r.key.as_ref()),
                json_of(r.value.as_ref())
                    .get("op")
                    .cloned()
                    .unwrap_or(Value::Null),
            )
        })
        .collect();
    assert_eq!(
        ops,
        vec![
            (json!({"id": 1}), json!("d")),
            (json!({"id": 1}), Value::Null),
            (json!({"id": 2}), json!("c")),
        ]
    );
}

#[test]
fn delete_event_and_tombstone() {
    let before = row(&["1", "Anne Marie", "Kretchmar", "annek@noanswer.org"]);
    let records = encode(
        Op::Delete,
        Some(before),
        None,
        source(1_465_581_902_461, 556, 46_523_119, 46_523_128),
    );
    assert_eq!(records.len(), 2, "delete event then tombstone");
    assert_eq!(json_of(records[0].key.as_ref()), json!({"id": 1}));
    assert_eq!(
        json_of(records[0].value.as_ref()),
        envelope(
            json!({"id": 1, "first_name": "Anne Marie", "last_name": "Kretchmar", "email": "annek@noanswer.org"}),
            Value::Null,
            expected_source(
                1_465_581_902_461,
                556,
                "[\"46523119\",\"46523128\"]",
                46_523_128
            ),
            "d"
        )
    );
    // Tombstone: same key, null value, same topic.
    assert_eq!(records[1].key, records[0].key);
    assert_eq!(records[1].value, None);
    assert_eq!(records[1].topic, records[0].topic);
}

#[test]
fn delete_with_default_replica_identity_carries_only_the_key() {
    let before = vec![
        Datum::Text(Bytes::from_static(b"1")),
        Datum::Null,
        Datum::Null,
        Datum::Null,
    ];
    let records = encode(
        Op::Delete,
        Some(before),
        None,
        source(1_465_581_902_461, 556, 46_523_119, 46_523_128),
    );
    assert_eq!(
        json_of(records[0].value.as_ref())["before"],
        json!({"id": 1, "first_name": null, "last_name": null, "email": null})
    );
}
