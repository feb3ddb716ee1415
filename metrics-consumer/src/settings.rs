//! librdkafka settings of the consumer's three Kafka clients, translated
//! from [`Config`] and the user's `--kafka-property KEY=VALUE` overrides.
//!
//! Why a pure translation that refuses some overrides: the exactness rests
//! on a few settings a pass-through property could silently switch off. The
//! offsets that count are stored in Redis in the same atomic step as the
//! metrics, so librdkafka must never commit or store offsets by itself; the
//! dead-letter producer's delivery report must mean "on every in-sync
//! replica, once", so `acks=all` and idempotence stay. Everything else
//! (security, client ids, timeouts, fetch sizes) passes through, to every
//! client, since connection settings concern them all.

use rdkafka::config::ClientConfig;

use crate::{Config, Error};

/// The settings of the three clients.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// The group consumer of the table topics.
    pub consumer: ClientConfig,
    /// The dead-letter producer.
    pub dead_letters: ClientConfig,
    /// The client that reads high watermarks for the lag gauge.
    pub watermarks: ClientConfig,
}

/// Largest dead letter: a bad event can be as large as any event, up to
/// 16 MiB plus framing, the size the reader writes and the brokers and
/// topics of the local stack accept (librdkafka's default is 1 MB).
pub const MESSAGE_MAX_BYTES: usize = 17_825_792;

/// Why the offset handling is not the user's to change.
const OFFSETS_WHY: &str = "offsets are stored in redis in the same atomic step as the metrics and resumed from there; librdkafka must not commit, store or reset them by itself";
/// Why the dead-letter delivery is not the user's to change.
const DEAD_LETTERS_WHY: &str = "the dead-letter producer must write to every in-sync replica exactly once (acks=all, idempotence, at most 5 requests in flight) before a bad message's offset is applied";

/// Keys the guarantees depend on: refused with the reason.
const REFUSED: [(&str, &str); 6] = [
    ("enable.auto.commit", OFFSETS_WHY),
    ("auto.commit.enable", OFFSETS_WHY),
    ("enable.auto.offset.store", OFFSETS_WHY),
    ("auto.offset.reset", OFFSETS_WHY),
    ("acks", DEAD_LETTERS_WHY),
    ("request.required.acks", DEAD_LETTERS_WHY),
];

/// Keys a flag sets: refused with the flag to use.
const FLAGS: [(&str, &str); 7] = [
    ("bootstrap.servers", "--bootstrap-servers"),
    ("metadata.broker.list", "--bootstrap-servers"),
    ("group.id", "--group"),
    ("group.instance.id", "--instance-id"),
    ("session.timeout.ms", "--session-timeout-ms"),
    ("fetch.wait.max.ms", "--fetch-wait-max-ms"),
    ("debug", "--kafka-debug"),
];

/// One `KEY=VALUE` override, checked.
fn checked(entry: &str) -> Result<(String, String), Error> {
    let refuse = |key: &str, why: String| Error::Setting {
        key: key.to_owned(),
        why,
    };
    let Some((key, value)) = entry.split_once('=') else {
        return Err(refuse(entry, "not KEY=VALUE".into()));
    };
    let (key, value) = (key.trim(), value.trim());
    if key.is_empty() {
        return Err(refuse(entry, "not KEY=VALUE".into()));
    }
    if let Some((_, why)) = REFUSED.iter().find(|(k, _)| *k == key) {
        return Err(refuse(key, (*why).to_owned()));
    }
    if let Some((_, flag)) = FLAGS.iter().find(|(k, _)| *k == key) {
        return Err(refuse(key, format!("set it with {flag}")));
    }
    match key {
        "enable.idempotence" if value != "true" => {
            return Err(refuse(key, DEAD_LETTERS_WHY.to_owned()));
        }
        "max.in.flight.requests.per.connection" | "max.in.flight"
            if value.parse::<u32>().is_ok_and(|n| n > 5) =>
        {
            return Err(refuse(key, DEAD_LETTERS_WHY.to_owned()));
        }
        "isolation.level" if !matches!(value, "read_committed" | "read_uncommitted") => {
            return Err(refuse(
                key,
                "isolation.level is read_committed (the default) or read_uncommitted".into(),
            ));
        }
        _ => {}
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// Translates the configuration; an override the guarantees forbid is an
/// [`Error::Setting`] naming the key and why.
pub fn translate(config: &Config) -> Result<KafkaSettings, Error> {
    let overrides = config
        .kafka_properties
        .iter()
        .filter(|e| !e.trim().is_empty())
        .map(|e| checked(e))
        .collect::<Result<Vec<_>, _>>()?;
    let mut consumer = ClientConfig::new();
    consumer
        .set("bootstrap.servers", &config.bootstrap_servers)
        .set("group.id", &config.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Only reached without an offset in redis, or when it fell out of
        // retention: start at the beginning.
        .set("auto.offset.reset", "earliest")
        // Aborted transactions of a transactional producer never count;
        // the fold is idempotent either way.
        .set("isolation.level", "read_committed")
        .set("session.timeout.ms", config.session_timeout_ms.to_string())
        .set("fetch.wait.max.ms", config.fetch_wait_max_ms.to_string())
        .set("topic.metadata.refresh.interval.ms", "10000");
    if !config.instance_id.is_empty() {
        consumer.set("group.instance.id", &config.instance_id);
    }
    let mut dead_letters = ClientConfig::new();
    dead_letters
        .set("bootstrap.servers", &config.bootstrap_servers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // A delivery still failing after a minute stops the consumer.
        .set("message.timeout.ms", "60000")
        .set("message.max.bytes", MESSAGE_MAX_BYTES.to_string())
        .set("linger.ms", "5");
    let mut watermarks = ClientConfig::new();
    watermarks.set("bootstrap.servers", &config.bootstrap_servers);
    for c in [&mut consumer, &mut dead_letters, &mut watermarks] {
        if !config.kafka_debug.is_empty() {
            c.set("debug", &config.kafka_debug);
        }
        for (key, value) in &overrides {
            c.set(key, value);
        }
    }
    Ok(KafkaSettings {
        consumer,
        dead_letters,
        watermarks,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser;

    use super::*;

    fn config(overrides: &[&str]) -> Config {
        let mut args = vec!["metrics-consumer", "--bootstrap-servers", "b:9092"];
        for o in overrides {
            args.push("--kafka-property");
            args.push(o);
        }
        Config::parse_from(args)
    }

    fn rejected(overrides: &[&str]) -> String {
        match translate(&config(overrides)) {
            Err(e @ Error::Setting { .. }) => e.to_string(),
            other => panic!("{overrides:?} accepted: {other:?}"),
        }
    }

    #[test]
    fn defaults_protect_the_guarantees() {
        let s = translate(&config(&[])).unwrap();
        assert_eq!(s.consumer.get("enable.auto.commit"), Some("false"));
        assert_eq!(s.consumer.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(s.consumer.get("isolation.level"), Some("read_committed"));
        assert_eq!(s.consumer.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(s.consumer.get("bootstrap.servers"), Some("b:9092"));
        assert_eq!(s.dead_letters.get("acks"), Some("all"));
        assert_eq!(s.dead_letters.get("enable.idempotence"), Some("true"));
        assert_eq!(s.dead_letters.get("message.max.bytes"), Some("17825792"));
        assert_eq!(s.watermarks.get("bootstrap.servers"), Some("b:9092"));
    }

    #[test]
    fn overrides_reach_every_client() {
        let s = translate(&config(&[
            "security.protocol=ssl",
            "isolation.level=read_uncommitted",
            " client.id = metrics ",
        ]))
        .unwrap();
        for c in [&s.consumer, &s.dead_letters, &s.watermarks] {
            assert_eq!(c.get("security.protocol"), Some("ssl"));
            assert_eq!(c.get("client.id"), Some("metrics"));
        }
        assert_eq!(s.consumer.get("isolation.level"), Some("read_uncommitted"));
        let s = translate(&config(&["max.in.flight.requests.per.connection=5"])).unwrap();
        assert_eq!(
            s.dead_letters.get("max.in.flight.requests.per.connection"),
            Some("5")
        );
    }

    #[test]
    fn overrides_of_the_offset_handling_are_rejected() {
        for o in [
            "enable.auto.commit=true",
            "enable.auto.offset.store=true",
            "auto.offset.reset=latest",
        ] {
            let e = rejected(&[o]);
            assert!(e.contains("redis"), "{o}: {e}");
        }
    }

    #[test]
    fn overrides_of_the_dead_letter_delivery_are_rejected() {
        for o in [
            "acks=1",
            "enable.idempotence=false",
            "max.in.flight.requests.per.connection=10",
            "max.in.flight=6",
        ] {
            let e = rejected(&[o]);
            assert!(e.contains("dead-letter"), "{o}: {e}");
        }
    }

    #[test]
    fn flags_own_their_settings_and_bad_entries_are_rejected() {
        assert!(rejected(&["bootstrap.servers=x:1"]).contains("--bootstrap-servers"));
        assert!(rejected(&["group.id=g"]).contains("--group"));
        assert!(rejected(&["isolation.level=read_everything"]).contains("isolation.level"));
        assert!(rejected(&["no-equals-sign"]).contains("KEY=VALUE"));
    }
}
