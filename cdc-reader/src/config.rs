//! Command-line and environment configuration; the doc comments are `--help`.
//!
//! Sources: `--source NAME=URL` (repeatable) or `CDC_SOURCES` (comma-separated
//! `NAME=URL` list); without either, the four `CDC_PG_<DB>_URL` variables of
//! `.local/env`. The source name is the database's logical name: the default
//! topic prefix, `source.name`, the slot suffix and the metrics label.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};

use crate::error::Error;
use crate::replication::ConnectParams;
use crate::signal::Collection;
use crate::value::DecimalMode;

/// When to copy the rows that already exist.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum SnapshotMode {
    /// Snapshot when the slot does not exist yet (first start, or a start
    /// after the slot was dropped); a lost (invalidated) slot is an error.
    #[default]
    Initial,
    /// Never snapshot: create the slot and stream from its consistent point.
    Never,
    /// Like `initial`, and also drop and recreate a lost slot, then snapshot again.
    WhenNeeded,
    /// Like `initial`, but the existing rows come as an incremental
    /// snapshot (chunks between watermarks, while streaming): no exported
    /// snapshot is held for the whole copy, and a kill -9 resumes with the
    /// next chunk instead of starting over.
    InitialIncremental,
}

/// The four databases of the local stack and their env variables.
pub const DEFAULT_SOURCES: [(&str, &str); 4] = [
    ("instashop", "CDC_PG_INSTASHOP_URL"),
    ("crm", "CDC_PG_CRM_URL"),
    ("erp", "CDC_PG_ERP_URL"),
    ("ecommerce", "CDC_PG_ECOMMERCE_URL"),
];

/// InstaShop CDC reader: Postgres logical replication (pgoutput) to per-table
/// Kafka topics in Debezium's JSON format.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
pub struct Config {
    /// A database to capture, as NAME=URL (repeatable). NAME is the logical
    /// name (default topic prefix and slot suffix). Default: the four
    /// CDC_PG_*_URL variables (instashop, crm, erp, ecommerce).
    #[arg(long = "source", value_name = "NAME=URL")]
    pub sources: Vec<String>,

    /// Comma-separated NAME=URL list, used when no --source is given.
    #[arg(long, env = "CDC_SOURCES", value_name = "LIST", hide_env_values = true)]
    pub sources_list: Option<String>,

    /// Publication to stream (created when missing and the role may create it).
    #[arg(long, env = "CDC_PUBLICATION", default_value = "instashop_cdc")]
    pub publication: String,

    /// Replication slot name; `{name}` is replaced by the source name.
    #[arg(long, env = "CDC_SLOT", default_value = "instashop_cdc_{name}")]
    pub slot: String,

    /// When to copy existing rows.
    #[arg(long, env = "CDC_SNAPSHOT_MODE", value_enum, default_value_t = SnapshotMode::Initial)]
    pub snapshot_mode: SnapshotMode,

    /// Tables copied in parallel by the initial snapshot (per source).
    #[arg(long, env = "CDC_SNAPSHOT_WORKERS", default_value_t = 3)]
    pub snapshot_workers: usize,

    /// Only these tables (comma-separated `schema.table` or `table`); default all published tables.
    #[arg(long, env = "CDC_INCLUDE_TABLES", value_delimiter = ',')]
    pub include_tables: Vec<String>,

    /// Skip these tables (comma-separated `schema.table` or `table`).
    #[arg(long, env = "CDC_EXCLUDE_TABLES", value_delimiter = ',')]
    pub exclude_tables: Vec<String>,

    /// Topic prefix of a source as NAME=PREFIX (repeatable, or comma-separated
    /// in the env variable); default: the source name.
    #[arg(
        long = "topic-prefix",
        env = "CDC_TOPIC_PREFIXES",
        value_delimiter = ',',
        value_name = "NAME=PREFIX"
    )]
    pub topic_prefixes: Vec<String>,

    /// How numeric values are written.
    #[arg(long, env = "CDC_DECIMAL_MODE", value_enum, default_value_t = DecimalMode::String)]
    pub decimal_mode: DecimalMode,

    /// Follow each delete with a tombstone (null value, same key).
    #[arg(long, env = "CDC_TOMBSTONES", action = ArgAction::Set, default_value_t = true)]
    pub tombstones: bool,

    /// Emit TRUNCATE as `op: "t"` events.
    #[arg(long, env = "CDC_TRUNCATE", action = ArgAction::Set, default_value_t = true)]
    pub truncate: bool,

    /// Add the `transaction` block and BEGIN/END records on `<prefix>.transaction`.
    #[arg(long, env = "CDC_TRANSACTION_METADATA", action = ArgAction::Set, default_value_t = false)]
    pub transaction_metadata: bool,

    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    pub kafka_bootstrap_servers: String,

    /// Seconds to wait at startup for a Kafka broker to answer; when none
    /// does, the reader exits with an error instead of retrying forever.
    #[arg(
        long,
        env = "CDC_KAFKA_STARTUP_TIMEOUT_SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub kafka_startup_timeout_secs: u64,

    /// Partitions of topics the reader creates.
    #[arg(long, env = "CDC_TOPIC_PARTITIONS", default_value_t = 3)]
    pub topic_partitions: i32,

    /// Extra librdkafka producer property KEY=VALUE (repeatable).
    #[arg(
        long = "kafka-property",
        env = "CDC_KAFKA_PROPERTIES",
        value_delimiter = ',',
        value_name = "KEY=VALUE"
    )]
    pub kafka_properties: Vec<String>,

    /// Address of `/metrics` and `/health` (port 0 = any free port).
    #[arg(long, env = "CDC_METRICS_ADDR", default_value = "127.0.0.1:9472")]
    pub metrics_addr: SocketAddr,

    /// Interval of standby status updates (confirmed LSN) in milliseconds.
    #[arg(long, env = "CDC_STATUS_INTERVAL_MS", default_value_t = 1000)]
    pub status_interval_ms: u64,

    /// Heartbeat interval in seconds (0 = off): emits a non-transactional
    /// `pg_logical_emit_message` so a quiet database's slot keeps advancing
    /// even when the whole cluster is idle.
    #[arg(long, env = "CDC_HEARTBEAT_SECS", default_value_t = 0)]
    pub heartbeat_secs: u64,

    /// Seconds to wait for Kafka acknowledgements on shutdown.
    #[arg(long, env = "CDC_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
    pub shutdown_timeout_secs: u64,

    /// Exactly-once topics: each source writes through a transactional
    /// producer (`transactional.id` from its slot) and keeps its checkpoint
    /// in Kafka, in the same transactions; `read_committed` consumers then
    /// see every change once, through crashes and Postgres restarts.
    #[arg(long, env = "CDC_EXACTLY_ONCE", action = ArgAction::Set, default_value_t = false)]
    pub exactly_once: bool,

    /// The compacted topic of the sources' checkpoints (created when missing).
    #[arg(long, env = "CDC_CHECKPOINT_TOPIC", default_value = crate::exactly_once::DEFAULT_CHECKPOINT_TOPIC)]
    pub checkpoint_topic: String,

    /// With --exactly-once: milliseconds a finished source transaction may
    /// wait for others before its Kafka transaction is committed.
    #[arg(long, env = "CDC_TRANSACTION_LINGER_MS", default_value_t = 10)]
    pub transaction_linger_ms: u64,

    /// With --exactly-once: while a backlog is read (more WAL already
    /// waiting), milliseconds a Kafka transaction stays open (unless full)
    /// instead of --transaction-linger-ms, so commits do not slow catch-up.
    #[arg(
        long,
        env = "CDC_TRANSACTION_BACKLOG_LINGER_MS",
        default_value_t = 1000
    )]
    pub transaction_backlog_linger_ms: u64,

    /// With --exactly-once: commit once a Kafka transaction holds this many
    /// records (at a source transaction's end; a source transaction four
    /// times larger is split, its position kept in the checkpoint).
    #[arg(long, env = "CDC_TRANSACTION_MAX_RECORDS", default_value_t = 20_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub transaction_max_records: u64,

    /// The signal table (`schema.table`, Debezium's columns `id`, `type`,
    /// `data`): inserts into it steer incremental snapshots. It must be in
    /// the publication; it is never published as a topic.
    #[arg(long, env = "CDC_SIGNAL_TABLE", default_value = "public.cdc_signal")]
    pub signal_table: String,

    /// Rows per chunk of an incremental snapshot.
    #[arg(long, env = "CDC_INCREMENTAL_CHUNK_SIZE", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub incremental_chunk_size: u64,
}

/// What `cdc-reader signal` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SignalKind {
    /// Queue tables for an incremental snapshot.
    ExecuteSnapshot,
    /// Drop tables (all when none is named) from the snapshot queue.
    StopSnapshot,
    /// No new chunk until resumed; streaming goes on.
    PauseSnapshot,
    /// Resume a paused snapshot.
    ResumeSnapshot,
}

/// `cdc-reader signal ACTION [TABLE...]`: writes one row into a source's
/// signal table, with the reader's own connection settings (flags or the
/// env file), so nobody has to write the JSON by hand. The running reader
/// acts on it when the row arrives through the stream.
#[derive(Debug, Clone, Parser)]
#[command(name = "cdc-reader signal")]
pub struct SignalCommand {
    /// What to ask for.
    #[arg(value_enum)]
    pub action: SignalKind,
    /// Tables as schema.table (execute-snapshot: at least one).
    pub tables: Vec<String>,
    /// The source (database logical name) to signal.
    #[arg(long, default_value = "instashop")]
    pub db: String,
    /// Row filter for execute-snapshot (`additional-conditions`), an SQL
    /// boolean expression applied to every named table.
    #[arg(long)]
    pub filter: Option<String>,
    /// Reader options (`--source NAME=URL`, `--signal-table`, ...), after `--`.
    #[arg(last = true)]
    pub reader: Vec<String>,
}

impl SignalCommand {
    /// The row's `type` and `data`.
    pub fn row(&self) -> (&'static str, Option<String>) {
        let tables = serde_json::Value::from(self.tables.clone());
        match self.action {
            SignalKind::ExecuteSnapshot => {
                let mut data = serde_json::json!({
                    "data-collections": tables,
                    "type": "incremental",
                });
                if let Some(f) = &self.filter {
                    let conditions: Vec<serde_json::Value> = self
                        .tables
                        .iter()
                        .map(|t| serde_json::json!({"data-collection": t, "filter": f}))
                        .collect();
                    data["additional-conditions"] = conditions.into();
                }
                ("execute-snapshot", Some(data.to_string()))
            }
            SignalKind::StopSnapshot if self.tables.is_empty() => ("stop-snapshot", None),
            SignalKind::StopSnapshot => (
                "stop-snapshot",
                Some(
                    serde_json::json!({"data-collections": tables, "type": "incremental"})
                        .to_string(),
                ),
            ),
            SignalKind::PauseSnapshot => ("pause-snapshot", None),
            SignalKind::ResumeSnapshot => ("resume-snapshot", None),
        }
    }

    /// The source to write to, resolved like the reader's.
    pub fn source(&self) -> Result<SourceConfig, Error> {
        let mut args = vec!["cdc-reader".to_owned()];
        args.extend(self.reader.iter().cloned());
        let config = Config::try_parse_from(args).map_err(|e| Error::Config(e.to_string()))?;
        config
            .source_configs()?
            .into_iter()
            .find(|s| s.name == self.db)
            .ok_or_else(|| {
                Error::Config(format!(
                    "no source named {:?}; name one with --db or pass --source NAME=URL after --",
                    self.db
                ))
            })
    }
}

/// One database to capture, resolved from [`Config`].
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Logical name.
    pub name: String,
    /// Connection parameters.
    pub params: ConnectParams,
    /// Topic prefix.
    pub prefix: String,
    /// Slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// Include list (empty = all).
    pub include: Vec<String>,
    /// Exclude list.
    pub exclude: Vec<String>,
    /// Snapshot mode.
    pub snapshot_mode: SnapshotMode,
    /// Parallel snapshot copiers.
    pub snapshot_workers: usize,
    /// Status update interval.
    pub status_interval: Duration,
    /// Heartbeat interval (`None` = off).
    pub heartbeat: Option<Duration>,
    /// How long shutdown waits for Kafka acknowledgements (`--shutdown-timeout-secs`).
    pub shutdown_timeout: Duration,
    /// The signal table.
    pub signal_table: Collection,
    /// Rows per incremental snapshot chunk.
    pub chunk_size: usize,
}

impl SourceConfig {
    /// Whether `schema.table` is captured.
    pub fn includes(&self, schema: &str, table: &str) -> bool {
        if self.is_signal_table(schema, table) {
            return false;
        }
        let matches = |entry: &String| table_matches(entry, schema, table);
        (self.include.is_empty() || self.include.iter().any(matches))
            && !self.exclude.iter().any(matches)
    }
}

impl SourceConfig {
    /// Whether `schema.table` is the signal table (read, never published).
    pub fn is_signal_table(&self, schema: &str, table: &str) -> bool {
        self.signal_table.schema == schema && self.signal_table.table == table
    }
}

/// `entry` is `schema.table` or a bare `table` (schema `public`).
pub fn table_matches(entry: &str, schema: &str, table: &str) -> bool {
    match entry.split_once('.') {
        Some((s, t)) => s == schema && t == table,
        None => schema == "public" && entry == table,
    }
}

fn split_pair(s: &str, what: &str) -> Result<(String, String), Error> {
    let (a, b) = s.split_once('=').ok_or_else(|| {
        Error::Config(format!(
            "{what}: expected NAME=VALUE, got {:?}",
            local_stack::redact::url(s)
        ))
    })?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() || b.is_empty() {
        return Err(Error::Config(format!(
            "{what}: empty name or value in {:?}",
            local_stack::redact::url(s)
        )));
    }
    Ok((a.to_owned(), b.to_owned()))
}

impl Config {
    /// Resolves the list of sources (flags, then `CDC_SOURCES`, then the defaults).
    pub fn source_configs(&self) -> Result<Vec<SourceConfig>, Error> {
        let signal_table = Collection::parse(self.signal_table.trim()).ok_or_else(|| {
            Error::Config(format!(
                "--signal-table {:?}: write schema.table, e.g. public.cdc_signal",
                self.signal_table
            ))
        })?;
        let mut pairs = Vec::new();
        if !self.sources.is_empty() {
            for s in &self.sources {
                pairs.push(split_pair(s, "--source")?);
            }
        } else if let Some(list) = self
            .sources_list
            .as_deref()
            .filter(|l| !l.trim().is_empty())
        {
            for s in list.split(',').filter(|s| !s.trim().is_empty()) {
                pairs.push(split_pair(s, "CDC_SOURCES")?);
            }
        } else {
            for (name, var) in DEFAULT_SOURCES {
                if let Ok(url) = std::env::var(var) {
                    pairs.push((name.to_owned(), url));
                }
            }
            if pairs.is_empty() {
                return Err(Error::Config(
                    "no sources: pass --source NAME=URL, set CDC_SOURCES, or run scripts/up to write CDC_PG_*_URL into .local/env"
                        .to_owned(),
                ));
            }
        }
        let mut prefixes = Vec::new();
        for p in &self.topic_prefixes {
            prefixes.push(split_pair(p, "--topic-prefix")?);
        }
        for (name, _) in &prefixes {
            if !pairs.iter().any(|(n, _)| n == name) {
                return Err(Error::Config(format!(
                    "--topic-prefix names unknown source {name:?}"
                )));
            }
        }
        if self.snapshot_workers == 0 {
            return Err(Error::Config(
                "--snapshot-workers must be at least 1".to_owned(),
            ));
        }
        let mut out: Vec<SourceConfig> = Vec::new();
        for (name, url) in pairs {
            if out.iter().any(|s| s.name == name) {
                return Err(Error::Config(format!("source {name:?} is given twice")));
            }
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(Error::Config(format!(
                    "source name {name:?}: use letters, digits, '_' or '-'"
                )));
            }
            let params = ConnectParams::from_url(&url)?;
            let prefix = prefixes
                .iter()
                .find(|(n, _)| *n == name)
                .map_or_else(|| name.clone(), |(_, p)| p.clone());
            let slot = self.slot.replace("{name}", &name.replace('-', "_"));
            out.push(SourceConfig {
                name,
                params,
                prefix,
                slot,
                publication: self.publication.clone(),
                include: self
                    .include_tables
                    .iter()
                    .filter(|s| !s.is_empty())
                    .cloned()
                    .collect(),
                exclude: self
                    .exclude_tables
                    .iter()
                    .filter(|s| !s.is_empty())
                    .cloned()
                    .collect(),
                snapshot_mode: self.snapshot_mode,
                snapshot_workers: self.snapshot_workers,
                status_interval: Duration::from_millis(self.status_interval_ms.max(10)),
                heartbeat: (self.heartbeat_secs > 0)
                    .then(|| Duration::from_secs(self.heartbeat_secs)),
                shutdown_timeout: Duration::from_secs(self.shutdown_timeout_secs),
                signal_table: signal_table.clone(),
                chunk_size: self.incremental_chunk_size as usize,
            });
        }
        let mut slots: Vec<&str> = out.iter().map(|s| s.slot.as_str()).collect();
        slots.sort_unstable();
        if slots.windows(2).any(|w| w[0] == w[1]) && !self.slot.contains("{name}") {
            return Err(Error::Config(
                "several sources share one slot name: put {name} into --slot".to_owned(),
            ));
        }
        Ok(out)
    }

    /// The exactly-once settings: checkpoint topic, batching, and each
    /// source's slot and `transactional.id`.
    pub fn exactly_once_settings(&self) -> Result<crate::exactly_once::ExactlyOnce, Error> {
        if self.checkpoint_topic.trim().is_empty() {
            return Err(Error::Config(
                "--checkpoint-topic must not be empty".to_owned(),
            ));
        }
        let sources = self
            .source_configs()?
            .into_iter()
            .map(|s| {
                let id = crate::exactly_once::transactional_id(&s.prefix, &s.slot);
                (s.name, (s.slot, id))
            })
            .collect();
        Ok(crate::exactly_once::ExactlyOnce {
            checkpoint_topic: self.checkpoint_topic.trim().to_owned(),
            batching: crate::checkpoint::Batching {
                max_records: self.transaction_max_records,
                linger: Duration::from_millis(self.transaction_linger_ms),
                backlog_linger: Duration::from_millis(self.transaction_backlog_linger_ms),
                ..crate::checkpoint::Batching::default()
            },
            sources,
        })
    }

    /// Extra producer properties as pairs.
    pub fn kafka_extra(&self) -> Result<Vec<(String, String)>, Error> {
        self.kafka_properties
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| split_pair(s, "--kafka-property"))
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        let mut v = vec!["cdc-reader"];
        v.extend_from_slice(args);
        Config::try_parse_from(v).unwrap()
    }

    #[test]
    fn signal_table_and_incremental_settings() {
        let s = parse(&["--source", "shop=postgres://u@h/db"])
            .source_configs()
            .unwrap();
        assert_eq!(s[0].signal_table.to_string(), "public.cdc_signal");
        assert_eq!(s[0].chunk_size, 4096);
        assert!(!s[0].includes("public", "cdc_signal"), "never a topic");
        let e = parse(&[
            "--source",
            "shop=postgres://u@h/db",
            "--signal-table",
            "cdc_signal",
        ])
        .source_configs()
        .unwrap_err();
        assert!(e.to_string().contains("schema.table"), "{e}");
    }

    #[test]
    fn explicit_sources_and_prefixes() {
        let c = parse(&[
            "--source",
            "shop=postgres://u:p@h:1/instashop",
            "--source",
            "crm=postgres://u:p@h:1/crm",
            "--topic-prefix",
            "shop=instashop",
            "--include-tables",
            "public.customer,buyer",
        ]);
        let s = c.source_configs().unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].name.as_str(), s[0].prefix.as_str(), s[0].slot.as_str()),
            ("shop", "instashop", "instashop_cdc_shop")
        );
        assert_eq!(s[1].prefix, "crm");
        assert!(s[0].includes("public", "customer"));
        assert!(s[0].includes("public", "buyer"));
        assert!(!s[0].includes("public", "product"));
        assert!(!s[0].includes("other", "buyer"));
    }

    #[test]
    fn bad_sources_are_config_errors() {
        assert!(parse(&["--source", "nourl"]).source_configs().is_err());
        assert!(
            parse(&[
                "--source",
                "a=postgres://u@h/db",
                "--source",
                "a=postgres://u@h/db2"
            ])
            .source_configs()
            .is_err()
        );
        assert!(
            parse(&["--source", "a=postgres://u@h/db", "--topic-prefix", "b=x"])
                .source_configs()
                .is_err()
        );
        let c = parse(&[
            "--source",
            "a=postgres://u@h/db",
            "--source",
            "b=postgres://u@h/db",
            "--slot",
            "same",
        ]);
        assert!(c.source_configs().is_err());
    }

    #[test]
    fn help_never_shows_source_urls() {
        use clap::CommandFactory;
        let help = Config::command().render_long_help().to_string();
        assert!(help.contains("CDC_SOURCES"));
        assert!(!help.contains("CDC_SOURCES=postgres"));
    }

    #[test]
    fn every_source_gets_the_shutdown_timeout() {
        let c = parse(&[
            "--source",
            "a=postgres://u@h/db",
            "--shutdown-timeout-secs",
            "7",
        ]);
        let s = c.source_configs().unwrap();
        assert_eq!(s[0].shutdown_timeout, Duration::from_secs(7));
        let d = parse(&["--source", "a=postgres://u@h/db"]);
        assert_eq!(
            d.source_configs().unwrap()[0].shutdown_timeout,
            Duration::from_secs(30)
        );
    }

    #[test]
    fn kafka_startup_timeout_defaults_to_30_s_and_is_at_least_1() {
        let d = parse(&["--source", "a=postgres://u@h/db"]);
        assert_eq!(d.kafka_startup_timeout_secs, 30);
        let c = parse(&["--kafka-startup-timeout-secs", "2"]);
        assert_eq!(c.kafka_startup_timeout_secs, 2);
        assert!(
            Config::try_parse_from(["cdc-reader", "--kafka-startup-timeout-secs", "0"]).is_err()
        );
    }

    #[test]
    fn exclude_wins_and_flags_parse() {
        let c = parse(&[
            "--source",
            "a=postgres://u@h/db",
            "--exclude-tables",
            "secret",
            "--tombstones",
            "false",
        ]);
        let s = c.source_configs().unwrap();
        assert!(s[0].includes("public", "customer"));
        assert!(!s[0].includes("public", "secret"));
        assert!(!c.tombstones);
    }
}
