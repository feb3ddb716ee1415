//! The local Kafka cluster as `scripts/up` promises it, asked through the
//! Admin API: three brokers with distinct ids, an elected KRaft controller,
//! every pipeline topic on three replicas with `min.insync.replicas=2`, and
//! the broker settings that keep acknowledged writes (internal topics
//! replicated, no unclean leader election).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::RDKafkaLogLevel;

fn env(var: &str) -> String {
    local_stack::envfile::load();
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: the local stack is not up (run scripts/up, which writes .local/env)"
        )
    })
}

fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", env("KAFKA_BOOTSTRAP_SERVERS"))
        .set_log_level(RDKafkaLogLevel::Error)
        .create()
        .unwrap()
}

/// The pipeline's topics: one per table of the catalog, and the consumer's
/// dead-letter topic.
fn pipeline_topics() -> Vec<String> {
    let mut topics: Vec<String> = catalog::Table::ALL
        .iter()
        .map(|t| format!("{}.public.{}", t.db(), t.name()))
        .collect();
    topics.push("metrics.dlq".to_owned());
    topics
}

/// Config values of one resource, by name.
async fn configs(
    admin: &AdminClient<DefaultClientContext>,
    resource: ResourceSpecifier<'_>,
) -> std::collections::HashMap<String, Option<String>> {
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let results = admin.describe_configs([&resource], &opts).await.unwrap();
    let config = results.into_iter().next().unwrap().unwrap();
    config
        .entries
        .into_iter()
        .map(|e| (e.name, e.value))
        .collect()
}

#[tokio::test]
async fn three_brokers_a_controller_and_every_topic_on_three_replicas() {
    let admin = admin();
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    let ids: BTreeSet<i32> = metadata.brokers().iter().map(|b| b.id()).collect();
    assert_eq!(
        ids.len(),
        3,
        "expected three distinct broker ids, got {ids:?}"
    );

    // The KRaft quorum through Kafka's own Admin API (describeMetadataQuorum);
    // librdkafka has no call for it.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("scripts/kafka"))
        .args(["--state-dir", &env("INSTASHOP_STATE_DIR")])
        .args(["kafka-metadata-quorum", "describe", "--status"])
        .env("KAFKA_BOOTSTRAP_SERVERS", env("KAFKA_BOOTSTRAP_SERVERS"))
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kafka-metadata-quorum failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let leader: i32 = status
        .lines()
        .find_map(|l| l.strip_prefix("LeaderId:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("no LeaderId in:\n{status}"));
    assert!(
        ids.contains(&leader),
        "the active controller {leader} is not one of the brokers {ids:?}"
    );
    let voters = status
        .lines()
        .find(|l| l.starts_with("CurrentVoters:"))
        .unwrap_or_default();
    assert_eq!(
        voters.matches("\"id\"").count(),
        3,
        "expected three voters: {voters}"
    );

    for topic in pipeline_topics() {
        let t = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .unwrap_or_else(|| panic!("topic {topic} is missing (scripts/up creates it)"));
        assert_eq!(t.partitions().len(), 3, "{topic}: partitions");
        for p in t.partitions() {
            let replicas: BTreeSet<i32> = p.replicas().iter().copied().collect();
            assert_eq!(replicas, ids, "{topic}[{}]: replicas", p.id());
        }
        let c = configs(&admin, ResourceSpecifier::Topic(&topic)).await;
        assert_eq!(
            c["min.insync.replicas"].as_deref(),
            Some("2"),
            "{topic}: min.insync.replicas"
        );
        assert_eq!(
            c["unclean.leader.election.enable"].as_deref(),
            Some("false"),
            "{topic}: unclean.leader.election.enable"
        );
    }

    for id in &ids {
        let c = configs(&admin, ResourceSpecifier::Broker(*id)).await;
        for (name, want) in [
            ("default.replication.factor", "3"),
            ("min.insync.replicas", "2"),
            ("offsets.topic.replication.factor", "3"),
            ("transaction.state.log.replication.factor", "3"),
            ("transaction.state.log.min.isr", "2"),
            ("unclean.leader.election.enable", "false"),
        ] {
            assert_eq!(c[name].as_deref(), Some(want), "broker {id}: {name}");
        }
    }
    println!("brokers {ids:?}, controller {leader}");
}
