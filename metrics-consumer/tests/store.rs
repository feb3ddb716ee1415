//! The compare-and-write apply against a real Redis, without Kafka: the same
//! events applied in random batches, with re-delivered batches mixed in, must
//! give exactly what the pure reference (`fold::MemStore`) and the SQL
//! definitions give; so must two appliers racing on the same rows, and a
//! truncate.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use common::*;
use metrics_consumer::fold::{
    Change, Code, Contribution, MemStore, Position, RowState, Table, decode,
};
use metrics_consumer::plan;
use metrics_consumer::store::{Batch, Store};
use rand::{RngExt, SeedableRng};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_apply_equals_reference_fold_and_sql() {
    let s = stack();
    let prefix = format!("{}:", unique("mctest:store:"));
    let topics = Topics {
        base: unique("mctest.store."),
    };
    let mut model = Model::new(3, topics);
    let mut msgs = model.step(4000);
    let half = msgs.len() / 2;
    msgs.extend(model.malformed());
    msgs.extend(msgs[half..].to_vec()); // reader re-send
    msgs.extend(model.snapshot());
    msgs.extend(model.step(1500));

    // Offsets per topic (one partition each).
    let mut next: BTreeMap<String, i64> = BTreeMap::new();
    let mut reference = MemStore::default();
    let mut offsets = Vec::new();
    for m in &msgs {
        let o = next.entry(m.topic.clone()).or_insert(0);
        offsets.push(*o);
        *o += 1;
        if let Ok(change) = decode(m.key.as_deref(), m.value.as_deref()) {
            reference.apply(&change);
        }
    }

    let mut store = Store::new(&s.redis, &prefix).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut i = 0;
    let mut batches: Vec<(usize, usize)> = Vec::new();
    let build = |from: usize, to: usize| {
        let mut b = Batch::default();
        for k in from..to {
            let m = &msgs[k];
            let change = decode(m.key.as_deref(), m.value.as_deref()).ok();
            b.push(&m.topic, 0, offsets[k], change);
        }
        b
    };
    let mut duplicates = 0;
    while i < msgs.len() {
        let n = rng.random_range(1..3000).min(msgs.len() - i);
        store.apply(&build(i, i + n), now_ms()).unwrap();
        batches.push((i, i + n));
        i += n;
        if rng.random_bool(0.2) {
            // A re-delivered batch (consumer crashed before the group commit).
            let (a, b) = batches[rng.random_range(0..batches.len())];
            let applied = store.apply(&build(a, b), now_ms()).unwrap();
            assert_eq!(applied.applied, 0, "re-delivered batch applied again");
            duplicates += applied.duplicates;
        }
    }
    assert!(duplicates > 0 || batches.len() < 5);

    let min_window = model.now_s - 3600 + 120;
    let actual = redis_metrics(&s, &prefix, min_window);
    let mut expected: Metrics = reference
        .metrics
        .iter()
        .filter(|(k, v)| {
            **v != 0
                && !(k.starts_with("window:30s:")
                    && k["window:30s:".len()..k.find('|').unwrap()]
                        .parse::<i64>()
                        .unwrap()
                        < min_window)
        })
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    expected.retain(|_, v| *v != 0);
    assert_eq!(expected, actual, "lua differs from the reference fold");
    let pipeline = pipeline_hash(&s, &prefix);
    let bad = msgs
        .iter()
        .filter(|m| decode(m.key.as_deref(), m.value.as_deref()).is_err())
        .count() as i64;
    assert_eq!(bad, 12, "six malformed messages, sent twice");
    assert_eq!(pipeline.get("bad_messages"), Some(&bad));
    assert_exact(&s, &prefix, &model).await;
    cleanup_redis(&s, &prefix);
}

fn contribution(code: Code, field: &str, amount: i64) -> Contribution {
    Contribution {
        code,
        field: field.to_owned(),
        amount,
    }
}

fn row(table: Table, id: i64, lsn: u64, contributions: Vec<Contribution>) -> Change {
    Change::Row {
        table,
        id: id.to_string(),
        state: RowState {
            position: Some(Position::lsn(lsn)),
            contributions,
        },
        ts_ms: Some(now_ms()),
    }
}

fn tx(id: i64, status: &str, cents: i64, lsn: u64) -> Change {
    let mut c = vec![
        contribution(Code::Count, "instashop.transaction", 1),
        contribution(Code::TxStatus, status, 1),
    ];
    if status == "completed" {
        c.push(contribution(Code::Revenue, "", cents));
    }
    row(Table::Transaction, id, lsn, c)
}

/// One random event on a small set of rows, so that streams collide: details
/// moving between products, products changing category, transactions
/// changing status, deletes.
fn random_event(rng: &mut rand::rngs::StdRng, lsn: u64) -> Change {
    let deleted = rng.random_bool(0.1);
    match rng.random_range(0..3) {
        0 => {
            let id = rng.random_range(1..=60);
            let c = if deleted {
                vec![]
            } else {
                let product = rng.random_range(1..=12).to_string();
                vec![
                    contribution(Code::Count, "instashop.transactiondetail", 1),
                    contribution(Code::ProductGmv, &product, rng.random_range(1..5000)),
                ]
            };
            row(Table::TransactionDetail, id, lsn, c)
        }
        1 => {
            let id = rng.random_range(1..=12);
            let c = if deleted {
                vec![]
            } else {
                let category = format!("{id}\x1dcat{}", rng.random_range(0..4));
                vec![
                    contribution(Code::Count, "instashop.product", 1),
                    contribution(Code::ProductCategory, &category, 1),
                ]
            };
            row(Table::Product, id, lsn, c)
        }
        _ => {
            let id = rng.random_range(1..=30);
            if deleted {
                row(Table::Transaction, id, lsn, vec![])
            } else {
                let status = ["pending", "completed", "refunded"][rng.random_range(0..3)];
                tx(id, status, rng.random_range(1..10_000), lsn)
            }
        }
    }
}

fn batch_of(partition: i32, first_offset: i64, changes: &[Change]) -> Batch {
    let mut b = Batch::default();
    for (i, c) in changes.iter().enumerate() {
        b.push("race", partition, first_offset + i as i64, Some(c.clone()));
    }
    b
}

fn reference_metrics(changes: &[Change]) -> Metrics {
    let mut reference = MemStore::default();
    for c in changes {
        reference.apply(c);
    }
    reference
        .metrics
        .into_iter()
        .filter(|(_, v)| *v != 0)
        .collect()
}

#[test]
fn two_appliers_racing_on_the_same_rows_stay_exact() {
    let s = stack();

    // Deterministic conflict: A reads, B applies a newer version of the same
    // row, A's compare-and-write must write nothing; A's retry then sees B's
    // row and skips its older event.
    let prefix = format!("{}:", unique("mctest:race1:"));
    let mut a = Store::new(&s.redis, &prefix).unwrap();
    let mut b = Store::new(&s.redis, &prefix).unwrap();
    let batch_a = batch_of(0, 0, &[tx(1, "completed", 700, 10)]);
    let batch_b = batch_of(1, 0, &[tx(1, "refunded", 700, 20)]);
    let snapshot = a.read(&batch_a, None).unwrap();
    let stale = plan::build(&batch_a, &snapshot, &prefix, now_ms()).unwrap();
    assert_eq!(b.apply(&batch_b, now_ms()).unwrap().applied, 1);
    assert!(!a.write(&stale).unwrap(), "a stale plan was written");
    let retried = a.apply(&batch_a, now_ms()).unwrap();
    assert_eq!((retried.applied, retried.duplicates), (0, 1));
    assert_eq!(
        redis_metrics(&s, &prefix, 0),
        reference_metrics(&[tx(1, "refunded", 700, 20)])
    );
    cleanup_redis(&s, &prefix);

    // Two threads, two partitions, the same rows, random batch sizes and
    // re-delivered batches: the result equals the reference fold. The LSN
    // rule makes the final state independent of the interleaving.
    let prefix = format!("{}:", unique("mctest:race2:"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let events: Vec<Change> = (1..=6000).map(|lsn| random_event(&mut rng, lsn)).collect();
    let streams: Vec<Vec<Change>> = (0..2)
        .map(|p| events.iter().skip(p).step_by(2).cloned().collect())
        .collect();
    let conflicts: u64 = std::thread::scope(|scope| {
        let workers: Vec<_> = streams
            .iter()
            .enumerate()
            .map(|(p, stream)| {
                let (redis, prefix) = (&s.redis, &prefix);
                scope.spawn(move || {
                    let mut store = Store::new(redis, prefix).unwrap();
                    let mut rng = rand::rngs::StdRng::seed_from_u64(p as u64);
                    let mut done: Vec<(usize, usize)> = Vec::new();
                    let mut i = 0;
                    while i < stream.len() {
                        let n = rng.random_range(1..80).min(stream.len() - i);
                        let batch = batch_of(p as i32, i as i64, &stream[i..i + n]);
                        store.apply(&batch, now_ms()).unwrap();
                        done.push((i, i + n));
                        i += n;
                        if rng.random_bool(0.1) {
                            let (x, y) = done[rng.random_range(0..done.len())];
                            let again = batch_of(p as i32, x as i64, &stream[x..y]);
                            let applied = store.apply(&again, now_ms()).unwrap();
                            assert_eq!(applied.applied, 0, "re-delivered batch applied again");
                        }
                    }
                    store.conflicts()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    println!("{conflicts} conflicts retried");
    assert_eq!(redis_metrics(&s, &prefix, 0), reference_metrics(&events));
    cleanup_redis(&s, &prefix);
}

#[test]
fn truncate_retracts_the_stored_rows() {
    let s = stack();
    let prefix = format!("{}:", unique("mctest:truncate:"));
    let mut store = Store::new(&s.redis, &prefix).unwrap();
    let mut changes = vec![
        tx(1, "completed", 100, 1),
        tx(2, "pending", 5, 2),
        row(
            Table::Product,
            7,
            3,
            vec![contribution(Code::Count, "instashop.product", 1)],
        ),
    ];
    store.apply(&batch_of(0, 0, &changes), now_ms()).unwrap();
    // A truncate and a row written after it in the same batch.
    let tail = vec![
        Change::Truncate {
            table: Table::Transaction,
            position: None,
            ts_ms: Some(now_ms()),
        },
        tx(3, "completed", 40, 5),
    ];
    let applied = store.apply(&batch_of(0, 3, &tail), now_ms()).unwrap();
    assert_eq!(applied.applied, 2);
    changes.extend(tail);
    let expected = reference_metrics(&changes);
    assert_eq!(expected.get("revenue:total_cents"), Some(&40));
    assert_eq!(redis_metrics(&s, &prefix, 0), expected);
    // Only the row written after the truncate is left.
    let mut con = redis::Client::open(s.redis.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let ids: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("{prefix}rows:instashop.transaction"))
        .query(&mut con)
        .unwrap();
    assert_eq!(ids, vec!["3".to_owned()]);
    cleanup_redis(&s, &prefix);
}

/// The row of a change, if it is one.
fn row_id(change: &Change) -> Option<(Table, String)> {
    match change {
        Change::Row { table, id, .. } => Some((*table, id.clone())),
        _ => None,
    }
}

#[test]
fn positioned_truncate_copies_on_three_partitions_racing_equal_one_truncate() {
    // Transactions and details on three partitions (by id), a truncate of
    // both tables at LSN 3000 in every partition, in order with that
    // partition's events; each partition applied in random batches with
    // re-deliveries. The result equals one pass in LSN order with one
    // truncate.
    let s = stack();
    let prefix = format!("{}:", unique("mctest:truncate3:"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let at = 3000;
    let truncates = |table| Change::Truncate {
        table,
        position: Some(Position::lsn(at)),
        ts_ms: Some(now_ms()),
    };
    let events: Vec<Change> = (1..=6000)
        .filter(|lsn| *lsn != at)
        .map(|lsn| random_event(&mut rng, lsn))
        .filter(|c| {
            !matches!(
                c,
                Change::Row {
                    table: Table::Product,
                    ..
                }
            )
        })
        .collect();
    let mut reference: Vec<Change> = Vec::new();
    let mut streams: Vec<Vec<Change>> = vec![Vec::new(); 3];
    let mut truncated = false;
    for e in &events {
        let lsn = match e {
            Change::Row { state, .. } => state.position.map_or(0, |p| p.lsn),
            _ => 0,
        };
        if lsn > at && !truncated {
            truncated = true;
            for t in [Table::Transaction, Table::TransactionDetail] {
                reference.push(truncates(t));
                for stream in &mut streams {
                    stream.push(truncates(t));
                }
            }
        }
        reference.push(e.clone());
        let (_, id) = row_id(e).unwrap();
        streams[id.parse::<usize>().unwrap() % 3].push(e.clone());
    }
    let apply_partition = |p: usize| {
        let stream = &streams[p];
        let mut store = Store::new(&s.redis, &prefix).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(100 + p as u64);
        let mut done: Vec<(usize, usize)> = Vec::new();
        let mut i = 0;
        while i < stream.len() {
            let n = rng.random_range(1..60).min(stream.len() - i);
            store
                .apply(&batch_of(p as i32, i as i64, &stream[i..i + n]), now_ms())
                .unwrap();
            done.push((i, i + n));
            i += n;
            if rng.random_bool(0.1) {
                let (x, y) = done[rng.random_range(0..done.len())];
                let again = batch_of(p as i32, x as i64, &stream[x..y]);
                assert_eq!(store.apply(&again, now_ms()).unwrap().applied, 0);
            }
        }
    };
    // Partition 0 first, rows after the truncate included; then the other
    // two race: their copies of the truncate come after those rows.
    apply_partition(0);
    std::thread::scope(|scope| {
        for p in [1, 2] {
            scope.spawn(move || apply_partition(p));
        }
    });
    let expected = reference_metrics(&reference);
    assert!(
        expected
            .get("count:instashop.transaction")
            .copied()
            .unwrap_or(0)
            > 0,
        "nothing after the truncate: {expected:?}"
    );
    assert_eq!(redis_metrics(&s, &prefix, 0), expected);
    cleanup_redis(&s, &prefix);
}
