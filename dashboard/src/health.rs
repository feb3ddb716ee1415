//! The red/amber/green state of the pipeline, with the reasons a person needs
//! to act on it.
//!
//! Pure rules over what was observed this tick. Red means data is not flowing
//! or cannot be read (a process or Redis is unreachable, lag past the red
//! threshold); amber means it flows but something needs a look (lag growing,
//! messages in the dead-letter topic, no event for a while); green otherwise.
//! Every non-green state carries at least one reason.

use catalog::Database;
use serde_json::{Value, json};

use crate::pipeline::{ConsumerReading, ReaderReading};

/// Overall state, ordered by severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    /// Everything flows within thresholds.
    Green,
    /// Flows, but needs a look.
    Amber,
    /// Not flowing or not observable.
    Red,
}

impl State {
    /// Lowercase name used in JSON and on the page.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Green => "green",
            State::Amber => "amber",
            State::Red => "red",
        }
    }

    /// Numeric form for the dashboard's own `/metrics` (0 green, 1 amber, 2 red).
    pub fn as_number(self) -> u8 {
        match self {
            State::Green => 0,
            State::Amber => 1,
            State::Red => 2,
        }
    }
}

/// Limits for amber and red.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    /// Replication lag in seconds at which a source turns amber.
    pub lag_seconds_amber: f64,
    /// Replication lag in seconds at which a source turns red.
    pub lag_seconds_red: f64,
    /// Replication lag in WAL bytes at which a source turns amber.
    pub lag_bytes_amber: f64,
    /// Replication lag in WAL bytes at which a source turns red.
    pub lag_bytes_red: f64,
    /// Consumer lag in messages at which the consumer turns amber.
    pub consumer_lag_amber: f64,
    /// Consumer lag in messages at which the consumer turns red.
    pub consumer_lag_red: f64,
    /// Seconds without an applied event after which the pipeline turns amber.
    pub idle_seconds_amber: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            lag_seconds_amber: 10.0,
            lag_seconds_red: 60.0,
            lag_bytes_amber: 16.0 * 1024.0 * 1024.0,
            lag_bytes_red: 256.0 * 1024.0 * 1024.0,
            consumer_lag_amber: 5_000.0,
            consumer_lag_red: 100_000.0,
            idle_seconds_amber: 120.0,
        }
    }
}

/// What one tick observed. `None` readings mean the endpoint was unreachable.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Why Redis could not be read, if it could not.
    pub redis_error: Option<String>,
    /// The reader's reduced metrics, `None` when its endpoint failed.
    pub reader: Option<ReaderReading>,
    /// Why the reader's endpoint failed.
    pub reader_error: Option<String>,
    /// The consumer's reduced metrics, `None` when its endpoint failed.
    pub consumer: Option<ConsumerReading>,
    /// Why the consumer's endpoint failed.
    pub consumer_error: Option<String>,
    /// Milliseconds since the source commit of the last applied event (Redis).
    pub last_event_age_ms: Option<i64>,
    /// Redis keys of an unexpected type (read as missing).
    pub bad_keys: Vec<String>,
}

/// The verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    /// Worst state found.
    pub state: State,
    /// One line per finding, worst first; a single all-clear line when green.
    pub reasons: Vec<String>,
}

impl Health {
    /// `{"state": ..., "reasons": [...]}`.
    pub fn to_json(&self) -> Value {
        json!({"state": self.state.as_str(), "reasons": self.reasons})
    }
}

fn bytes(n: f64) -> String {
    if n >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", n / (1024.0 * 1024.0))
    } else if n >= 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else {
        format!("{n:.0} B")
    }
}

/// Applies the rules.
pub fn evaluate(obs: &Observed, t: &Thresholds) -> Health {
    let mut findings: Vec<(State, String)> = Vec::new();
    let mut push = |state: State, reason: String| findings.push((state, reason));

    if let Some(err) = &obs.redis_error {
        push(
            State::Red,
            format!("redis unreachable ({err}): no metrics can be shown"),
        );
    }
    match &obs.reader {
        None => push(
            State::Red,
            format!(
                "cdc-reader metrics unreachable ({}): is cdc-reader running?",
                obs.reader_error.as_deref().unwrap_or("no answer")
            ),
        ),
        Some(reader) => {
            for db in Database::ALL.map(Database::name) {
                let Some(s) = reader.sources.get(db) else {
                    push(
                        State::Amber,
                        format!("{db}: cdc-reader reports no replication data"),
                    );
                    continue;
                };
                for (table, reason) in &s.skipped {
                    push(
                        State::Amber,
                        format!("{db}: {table} left out of its snapshot: {reason}"),
                    );
                }
                match s.state.as_deref() {
                    Some("failed") => push(
                        State::Red,
                        format!("{db}: cdc-reader stopped this source (see its log)"),
                    ),
                    Some("connecting") => {
                        push(State::Amber, format!("{db}: cdc-reader is (re)connecting"))
                    }
                    _ => {}
                }
                if let Some(lag) = s.lag_seconds {
                    if lag >= t.lag_seconds_red {
                        push(State::Red, format!("{db}: replication lag {lag:.0} s"));
                    } else if lag >= t.lag_seconds_amber {
                        push(State::Amber, format!("{db}: replication lag {lag:.0} s"));
                    }
                }
                if let Some(lag) = s.lag_bytes {
                    if lag >= t.lag_bytes_red {
                        push(State::Red, format!("{db}: replication lag {}", bytes(lag)));
                    } else if lag >= t.lag_bytes_amber {
                        push(
                            State::Amber,
                            format!("{db}: replication lag {}", bytes(lag)),
                        );
                    }
                }
            }
        }
    }
    match &obs.consumer {
        None => push(
            State::Red,
            format!(
                "metrics-consumer metrics unreachable ({}): is metrics-consumer running?",
                obs.consumer_error.as_deref().unwrap_or("no answer")
            ),
        ),
        Some(c) => {
            if let Some(lag) = c.lag {
                if lag >= t.consumer_lag_red {
                    push(State::Red, format!("consumer lag {lag:.0} messages"));
                } else if lag >= t.consumer_lag_amber {
                    push(State::Amber, format!("consumer lag {lag:.0} messages"));
                }
            }
            if let Some(dlq) = c.dlq.filter(|d| *d > 0.0) {
                push(
                    State::Amber,
                    format!("{dlq:.0} bad messages sent to the dead-letter topic metrics.dlq"),
                );
            }
        }
    }
    if obs.redis_error.is_none() {
        match obs.last_event_age_ms {
            Some(age) if age as f64 / 1000.0 >= t.idle_seconds_amber => push(
                State::Amber,
                format!(
                    "no change applied for {} s: sources idle, or the pipeline is stalled",
                    age / 1000
                ),
            ),
            None => push(
                State::Amber,
                "no event applied yet (metrics:pipeline has no source ts_ms)".to_owned(),
            ),
            Some(_) => {}
        }
    }

    if !obs.bad_keys.is_empty() {
        push(
            State::Amber,
            format!(
                "redis keys of an unexpected type, shown as no data: {}",
                obs.bad_keys.join(", ")
            ),
        );
    }

    findings.sort_by_key(|f| std::cmp::Reverse(f.0));
    let state = findings.first().map_or(State::Green, |f| f.0);
    let reasons = if findings.is_empty() {
        vec!["all sources replicating within limits, consumer caught up".to_owned()]
    } else {
        findings.into_iter().map(|f| f.1).collect()
    };
    Health { state, reasons }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::SourceReading;

    fn healthy() -> Observed {
        let sources = Database::ALL
            .iter()
            .map(|db| {
                (
                    db.name().to_owned(),
                    SourceReading {
                        lag_bytes: Some(100.0),
                        lag_seconds: Some(0.2),
                        ..SourceReading::default()
                    },
                )
            })
            .collect();
        Observed {
            reader: Some(ReaderReading { sources }),
            consumer: Some(ConsumerReading {
                lag: Some(3.0),
                dlq: Some(0.0),
                events_applied: Some(1000.0),
                end_to_end_lag_ms: Some(50.0),
            }),
            last_event_age_ms: Some(400),
            ..Observed::default()
        }
    }

    fn set_crm(obs: &mut Observed, f: impl FnOnce(&mut SourceReading)) {
        if let Some(s) = obs.reader.as_mut().and_then(|r| r.sources.get_mut("crm")) {
            f(s);
        }
    }

    #[test]
    fn healthy_pipeline_is_green_with_one_reason() {
        let h = evaluate(&healthy(), &Thresholds::default());
        assert_eq!(h.state, State::Green);
        assert_eq!(h.reasons.len(), 1);
        assert_eq!(h.to_json()["state"], "green");
    }

    #[test]
    fn lag_seconds_thresholds() {
        let t = Thresholds::default();
        let mut obs = healthy();
        set_crm(&mut obs, |s| s.lag_seconds = Some(9.9));
        assert_eq!(evaluate(&obs, &t).state, State::Green);
        set_crm(&mut obs, |s| s.lag_seconds = Some(10.0));
        let h = evaluate(&obs, &t);
        assert_eq!(h.state, State::Amber);
        assert_eq!(h.reasons, vec!["crm: replication lag 10 s".to_owned()]);
        set_crm(&mut obs, |s| s.lag_seconds = Some(60.0));
        assert_eq!(evaluate(&obs, &t).state, State::Red);
    }

    #[test]
    fn a_table_left_out_of_a_snapshot_is_amber_with_the_fix() {
        let mut obs = healthy();
        set_crm(&mut obs, |s| {
            s.skipped.insert(
                "public.secret".to_owned(),
                "the CDC role cannot read it: GRANT SELECT ON public.secret TO cdc".to_owned(),
            );
        });
        let h = evaluate(&obs, &Thresholds::default());
        assert_eq!(h.state, State::Amber);
        assert_eq!(
            h.reasons,
            vec![
                "crm: public.secret left out of its snapshot: the CDC role cannot read it: GRANT SELECT ON public.secret TO cdc"
                    .to_owned()
            ]
        );
    }

    #[test]
    fn lag_bytes_thresholds() {
        let t = Thresholds::default();
        let mut obs = healthy();
        set_crm(&mut obs, |s| s.lag_bytes = Some(16.0 * 1024.0 * 1024.0));
        let h = evaluate(&obs, &t);
        assert_eq!(h.state, State::Amber);
        assert_eq!(h.reasons, vec!["crm: replication lag 16.0 MiB".to_owned()]);
        set_crm(&mut obs, |s| s.lag_bytes = Some(300.0 * 1024.0 * 1024.0));
        assert_eq!(evaluate(&obs, &t).state, State::Red);
    }

    #[test]
    fn consumer_lag_and_dlq() {
        let t = Thresholds::default();
        let mut obs = healthy();
        if let Some(c) = obs.consumer.as_mut() {
            c.lag = Some(5_000.0);
        }
        assert_eq!(evaluate(&obs, &t).state, State::Amber);
        if let Some(c) = obs.consumer.as_mut() {
            c.lag = Some(100_000.0);
            c.dlq = Some(2.0);
        }
        let h = evaluate(&obs, &t);
        assert_eq!(h.state, State::Red);
        // Worst first.
        assert_eq!(h.reasons[0], "consumer lag 100000 messages");
        assert!(h.reasons[1].contains("2 bad messages"));
    }

    #[test]
    fn idle_pipeline_is_amber() {
        let t = Thresholds::default();
        let mut obs = healthy();
        obs.last_event_age_ms = Some(119_999);
        assert_eq!(evaluate(&obs, &t).state, State::Green);
        obs.last_event_age_ms = Some(120_000);
        let h = evaluate(&obs, &t);
        assert_eq!(h.state, State::Amber);
        assert!(h.reasons[0].starts_with("no change applied for 120 s"));
        obs.last_event_age_ms = None;
        assert_eq!(evaluate(&obs, &t).state, State::Amber);
    }

    #[test]
    fn unreachable_endpoints_are_red_and_say_what_to_check() {
        let t = Thresholds::default();
        let mut obs = healthy();
        obs.reader = None;
        obs.reader_error = Some("connection refused".into());
        let h = evaluate(&obs, &t);
        assert_eq!(h.state, State::Red);
        assert!(h.reasons[0].contains("is cdc-reader running?"));
        let nothing = Observed {
            redis_error: Some("connection refused".into()),
            ..Observed::default()
        };
        let h = evaluate(&nothing, &t);
        assert_eq!(h.state, State::Red);
        assert_eq!(h.reasons.len(), 3);
    }

    #[test]
    fn keys_of_the_wrong_type_are_amber() {
        let mut obs = healthy();
        obs.bad_keys = vec!["metrics:pipeline".into()];
        let h = evaluate(&obs, &Thresholds::default());
        assert_eq!(h.state, State::Amber);
        assert!(h.reasons[0].ends_with("metrics:pipeline"));
    }

    #[test]
    fn source_states_from_the_reader() {
        let t = Thresholds::default();
        let mut obs = healthy();
        set_crm(&mut obs, |s| s.state = Some("snapshotting".into()));
        assert_eq!(evaluate(&obs, &t).state, State::Green);
        set_crm(&mut obs, |s| s.state = Some("connecting".into()));
        assert_eq!(evaluate(&obs, &t).state, State::Amber);
        set_crm(&mut obs, |s| s.state = Some("failed".into()));
        let h = evaluate(&obs, &t);
        assert_eq!(h.state, State::Red);
        assert!(h.reasons[0].starts_with("crm: cdc-reader stopped"));
    }

    #[test]
    fn missing_database_is_amber() {
        let mut obs = healthy();
        if let Some(r) = obs.reader.as_mut() {
            r.sources.remove("erp");
        }
        let h = evaluate(&obs, &Thresholds::default());
        assert_eq!(h.state, State::Amber);
        assert_eq!(
            h.reasons,
            vec!["erp: cdc-reader reports no replication data".to_owned()]
        );
    }
}
