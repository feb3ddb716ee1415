//! The lag measurement against the local stack's brokers: a scratch topic
//! of two partitions with 3 and 1 messages, read up to offsets 1 and 1.
//!
//! Needs the local stack (`scripts/up`; `INSTASHOP_ENV_FILE` names another
//! stack's env file).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::BaseConsumer;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_the_high_watermark_minus_the_next_offset_per_partition() {
    local_stack::envfile::load();
    let kafka = std::env::var("KAFKA_BOOTSTRAP_SERVERS")
        .expect("KAFKA_BOOTSTRAP_SERVERS is not set: run scripts/up");
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let topic = format!("lag_test_{}_{nanos}", std::process::id());
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &kafka)
        .create()
        .unwrap();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    for r in admin
        .create_topics(
            &[NewTopic::new(&topic, 2, TopicReplication::Fixed(-1))],
            &options,
        )
        .await
        .unwrap()
    {
        r.unwrap();
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &kafka)
        .create()
        .unwrap();
    for partition in [0, 0, 0, 1] {
        producer
            .send(
                FutureRecord::<str, str>::to(&topic)
                    .partition(partition)
                    .payload("x"),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let watermarks: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka)
        .create()
        .unwrap();
    let next = vec![((topic.clone(), 0), 1), ((topic.clone(), 1), 1)];
    let shutdown = CancellationToken::new();
    let lag = tokio::task::block_in_place(|| {
        kafka_probe::lag::measure(&watermarks, next.clone(), &shutdown)
    });
    assert_eq!(
        lag,
        Some(BTreeMap::from([
            ((topic.clone(), 0), 2),
            ((topic.clone(), 1), 0)
        ]))
    );
    shutdown.cancel();
    let stopped =
        tokio::task::block_in_place(|| kafka_probe::lag::measure(&watermarks, next, &shutdown));
    assert_eq!(stopped, None);
    let _ = admin.delete_topics(&[&topic], &options).await;
}
