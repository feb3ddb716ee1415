//! The Lua batch-apply against a real Redis, without Kafka: the same events
//! applied in random batches, with re-delivered batches mixed in, must give
//! exactly what the pure reference (`fold::MemStore`) and the SQL definitions
//! give.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use common::*;
use metrics_consumer::fold::{MemStore, decode};
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
            b.push(&m.topic, 0, offsets[k], change.as_ref());
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
