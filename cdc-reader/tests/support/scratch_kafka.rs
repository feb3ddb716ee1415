//! A throwaway three-node Apache Kafka cluster of the test's own, for what
//! the shared cluster must not see: brokers killed and restarted under load.
//!
//! The same jars, node layout and settings as `scripts/up` (KRaft, each node
//! broker and controller, replication factor 3, `min.insync.replicas=2`, no
//! unclean election), on free ports, with data and logs in a temporary
//! directory. Dropping the value kills the nodes and removes the directory,
//! also when the test failed.
#![allow(dead_code, clippy::unwrap_used)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::support::{env, unique};

/// A running scratch cluster; dropped = killed and deleted.
#[derive(Debug)]
pub struct ScratchKafka {
    dir: PathBuf,
    libs: PathBuf,
    /// Client ports of nodes 1, 2, 3 on 127.0.0.1.
    pub ports: [u16; 3],
    nodes: [Option<Child>; 3],
}

impl ScratchKafka {
    /// Formats and starts three nodes, and waits until all three brokers
    /// are registered.
    pub fn start(tag: &str) -> ScratchKafka {
        let libs = PathBuf::from(env("INSTASHOP_KAFKA_LIBS"));
        assert!(
            libs.join(".fetched").is_file(),
            "no Kafka jars in {} (run scripts/up)",
            libs.display()
        );
        let dir = std::env::temp_dir().join(unique(&format!("kafka_{tag}")));
        std::fs::create_dir_all(&dir).unwrap();
        let port = crate::support::listen_port;
        let ports = [port(), port(), port()];
        let controllers = [port(), port(), port()];
        let voters: Vec<String> = controllers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}@127.0.0.1:{p}", i + 1))
            .collect();
        std::fs::write(
            dir.join("log4j2.properties"),
            "status = warn\n\
             appender.file.type = File\n\
             appender.file.name = file\n\
             appender.file.fileName = ${sys:kafka.logs.dir}/server.log\n\
             appender.file.layout.type = PatternLayout\n\
             appender.file.layout.pattern = [%d] %p %m (%c)%n\n\
             rootLogger.level = INFO\n\
             rootLogger.appenderRef.file.ref = file\n",
        )
        .unwrap();
        // Kafka's cluster-id format: 16 bytes, URL-safe base64 without padding.
        let cluster_id = "c2NyYXRjaC1jbHVzdGVyAA";
        let mut cluster = ScratchKafka {
            dir,
            libs,
            ports,
            nodes: [None, None, None],
        };
        for n in 1..=3 {
            let node = cluster.node_dir(n);
            std::fs::create_dir_all(&node).unwrap();
            let mut props = String::new();
            writeln!(
                props,
                "process.roles=broker,controller\n\
                 node.id={n}\n\
                 controller.quorum.voters={}\n\
                 listeners=PLAINTEXT://127.0.0.1:{},CONTROLLER://127.0.0.1:{}\n\
                 advertised.listeners=PLAINTEXT://127.0.0.1:{}\n\
                 controller.listener.names=CONTROLLER\n\
                 inter.broker.listener.name=PLAINTEXT\n\
                 listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
                 log.dirs={}\n\
                 num.partitions=3\n\
                 default.replication.factor=3\n\
                 min.insync.replicas=2\n\
                 unclean.leader.election.enable=false\n\
                 offsets.topic.replication.factor=3\n\
                 transaction.state.log.replication.factor=3\n\
                 transaction.state.log.min.isr=2\n\
                 auto.create.topics.enable=false\n\
                 num.network.threads=2\n\
                 num.io.threads=2\n\
                 group.initial.rebalance.delay.ms=0",
                voters.join(","),
                ports[n - 1],
                controllers[n - 1],
                ports[n - 1],
                node.join("data").display(),
            )
            .unwrap();
            std::fs::write(node.join("server.properties"), props).unwrap();
            let out = cluster
                .java(n)
                .args(["kafka.tools.StorageTool", "format", "-t", cluster_id, "-c"])
                .arg(node.join("server.properties"))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "formatting node {n} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for n in 1..=3 {
            cluster.start_node(n);
        }
        cluster.wait_brokers(3, Duration::from_secs(120));
        cluster
    }

    fn node_dir(&self, n: usize) -> PathBuf {
        self.dir.join(format!("node-{n}"))
    }

    fn java(&self, n: usize) -> Command {
        let mut cmd = Command::new("java");
        cmd.arg("-cp")
            .arg(format!("{}/*", self.libs.display()))
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.dir.join("log4j2.properties").display()
            ))
            .arg(format!("-Dkafka.logs.dir={}", self.node_dir(n).display()));
        cmd
    }

    /// The bootstrap list of all three nodes.
    pub fn bootstrap(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts node `n` (1-based) unless it runs; does not wait.
    pub fn start_node(&mut self, n: usize) {
        if self.nodes[n - 1].is_some() {
            return;
        }
        let stdout = std::fs::File::create(self.node_dir(n).join("stdout.log")).unwrap();
        let child = self
            .java(n)
            .args([
                "-Xms384m",
                "-Xmx384m",
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
            ])
            .arg("kafka.Kafka")
            .arg(self.node_dir(n).join("server.properties"))
            .stdout(Stdio::from(stdout.try_clone().unwrap()))
            .stderr(Stdio::from(stdout))
            .spawn()
            .unwrap();
        self.nodes[n - 1] = Some(child);
    }

    /// kill -9 of node `n` (1-based).
    pub fn kill9(&mut self, n: usize) {
        if let Some(mut child) = self.nodes[n - 1].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether node `n` runs.
    pub fn is_running(&self, n: usize) -> bool {
        self.nodes[n - 1].is_some()
    }

    /// The tail of node `n`'s server log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.node_dir(n).join("server.log")).unwrap_or_default();
        crate::support::tail(&text, 20)
    }

    fn client(&self) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set_log_level(RDKafkaLogLevel::Emerg)
            .create()
            .unwrap()
    }

    /// Polls metadata until `count` brokers are registered.
    pub fn wait_brokers(&self, count: usize, timeout: Duration) {
        let client = self.client();
        let deadline = Instant::now() + timeout;
        loop {
            let seen = client
                .fetch_metadata(None, Duration::from_secs(2))
                .map(|m| m.brokers().len())
                .unwrap_or(0);
            if seen >= count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{seen} of {count} scratch brokers registered after {timeout:?}; the nodes' logs:\n{}",
                (1..=3)
                    .map(|n| format!("node {n}:\n{}", self.log_tail(n)))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Node id of the leader of `topic`'s `partition`, once one is known.
    pub fn leader(&self, topic: &str, partition: i32) -> usize {
        let client = self.client();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(md) = client.fetch_metadata(Some(topic), Duration::from_secs(2))
                && let Some(p) = md
                    .topics()
                    .first()
                    .and_then(|t| t.partitions().iter().find(|p| p.id() == partition))
                && p.leader() > 0
            {
                return usize::try_from(p.leader()).unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "no leader for {topic}[{partition}]"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The data directory (for assertions on logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for ScratchKafka {
    fn drop(&mut self) {
        for n in 1..=3 {
            self.kill9(n);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
