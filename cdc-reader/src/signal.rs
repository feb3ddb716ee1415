//! Signals: rows a user inserts into the signal table (`public.cdc_signal`
//! by default, Debezium's columns `id`, `type`, `data`) to steer the reader
//! while it runs, parsed here from the streamed insert.
//!
//! Why the signal table and not an HTTP call: the insert travels through the
//! same WAL as the changes, so a signal has a position in the stream (an
//! `execute-snapshot` of a table added to the publication a moment earlier
//! finds the table's Relation already decoded), and it survives a reader
//! that is down when the signal is written. The table is in the publication
//! but never published as a topic.
//!
//! Why parsing is total: a malformed signal (bad JSON, unknown type, a table
//! name without a schema) is the user's typo, not a reason to stop the
//! pipeline; [`Signal::parse`] returns a [`SignalError`] whose text is the
//! one warn line the reader logs, and streaming goes on.

use std::fmt;

use serde::Deserialize;

/// The type of a signal row that carries the reader's own snapshot progress
/// (not a user signal; see `incremental`).
pub const PROGRESS_TYPE: &str = "snapshot-progress";

/// A table named by a signal, `schema.table`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Collection {
    /// Schema.
    pub schema: String,
    /// Table.
    pub table: String,
}

impl Collection {
    /// Parses `schema.table` (exactly one dot, both parts non-empty).
    pub fn parse(text: &str) -> Option<Collection> {
        let (schema, table) = text.split_once('.')?;
        if schema.is_empty() || table.is_empty() || table.contains('.') {
            return None;
        }
        Some(Collection {
            schema: schema.to_owned(),
            table: table.to_owned(),
        })
    }
}

impl fmt::Display for Collection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// One table of an `execute-snapshot`, with its optional row filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRequest {
    /// The table.
    pub collection: Collection,
    /// `additional-conditions` filter: an SQL boolean expression over the
    /// table's columns, run in a read-only transaction as the CDC role.
    pub filter: Option<String>,
}

/// What a signal asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// `execute-snapshot` with `"type": "incremental"`: queue these tables.
    ExecuteSnapshot(Vec<SnapshotRequest>),
    /// `stop-snapshot`: drop these tables from the queue (all when `None`).
    StopSnapshot(Option<Vec<Collection>>),
    /// `pause-snapshot`: no new chunk until resumed (streaming goes on).
    PauseSnapshot,
    /// `resume-snapshot`.
    ResumeSnapshot,
    /// The reader's own progress row: not an instruction.
    Progress,
}

/// Why a signal row was ignored; `Display` is the warn line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("signal {id:?} ignored: {reason}")]
pub struct SignalError {
    /// The row's `id`.
    pub id: String,
    /// What is wrong and how to write it instead.
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecuteData {
    #[serde(rename = "data-collections")]
    data_collections: Vec<String>,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(rename = "additional-conditions", default)]
    additional_conditions: Vec<Condition>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Condition {
    #[serde(rename = "data-collection")]
    data_collection: String,
    filter: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StopData {
    #[serde(rename = "data-collections", default)]
    data_collections: Option<Vec<String>>,
    #[serde(rename = "type", default)]
    kind: Option<String>,
}

const EXAMPLE: &str = r#"{"data-collections":["public.product"],"type":"incremental"}"#;

impl Signal {
    /// Parses one signal row (`data` may be NULL or empty for the types
    /// that take none).
    pub fn parse(id: &str, kind: &str, data: Option<&str>) -> Result<Signal, SignalError> {
        let fail = |reason: String| SignalError {
            id: id.to_owned(),
            reason,
        };
        let data = data.map(str::trim).filter(|d| !d.is_empty());
        match kind {
            "execute-snapshot" => {
                let data = data.ok_or_else(|| {
                    fail(format!("execute-snapshot needs data such as {EXAMPLE}"))
                })?;
                let parsed: ExecuteData = serde_json::from_str(data).map_err(|e| {
                    fail(format!(
                        "data is not valid execute-snapshot JSON ({e}); write it as {EXAMPLE}"
                    ))
                })?;
                if let Some(k) = parsed.kind.as_deref()
                    && k != "incremental"
                {
                    return Err(fail(format!(
                        "snapshot type {k:?} is not supported; use \"incremental\""
                    )));
                }
                if parsed.data_collections.is_empty() {
                    return Err(fail(format!(
                        "data-collections is empty; name the tables as in {EXAMPLE}"
                    )));
                }
                let collections = collections(&parsed.data_collections).map_err(fail)?;
                let mut requests: Vec<SnapshotRequest> = collections
                    .into_iter()
                    .map(|collection| SnapshotRequest {
                        collection,
                        filter: None,
                    })
                    .collect();
                for c in parsed.additional_conditions {
                    let name = Collection::parse(&c.data_collection).ok_or_else(|| {
                        fail(format!(
                            "additional-conditions names {:?}; write schema.table",
                            c.data_collection
                        ))
                    })?;
                    let Some(request) = requests.iter_mut().find(|r| r.collection == name) else {
                        return Err(fail(format!(
                            "additional-conditions names {name}, which is not in data-collections"
                        )));
                    };
                    if c.filter.trim().is_empty() {
                        return Err(fail(format!("the filter for {name} is empty")));
                    }
                    request.filter = Some(c.filter);
                }
                Ok(Signal::ExecuteSnapshot(requests))
            }
            "stop-snapshot" => {
                let Some(data) = data else {
                    return Ok(Signal::StopSnapshot(None));
                };
                let parsed: StopData = serde_json::from_str(data).map_err(|e| {
                    fail(format!(
                        "data is not valid stop-snapshot JSON ({e}); write it as {EXAMPLE} or leave it empty to stop every table"
                    ))
                })?;
                if let Some(k) = parsed.kind.as_deref()
                    && k != "incremental"
                {
                    return Err(fail(format!(
                        "snapshot type {k:?} is not supported; use \"incremental\""
                    )));
                }
                match parsed.data_collections {
                    None => Ok(Signal::StopSnapshot(None)),
                    Some(names) if names.is_empty() => Ok(Signal::StopSnapshot(None)),
                    Some(names) => Ok(Signal::StopSnapshot(Some(
                        collections(&names).map_err(fail)?,
                    ))),
                }
            }
            "pause-snapshot" => Ok(Signal::PauseSnapshot),
            "resume-snapshot" => Ok(Signal::ResumeSnapshot),
            PROGRESS_TYPE => Ok(Signal::Progress),
            other => Err(fail(format!(
                "unknown type {other:?}; use execute-snapshot, stop-snapshot, pause-snapshot or resume-snapshot"
            ))),
        }
    }
}

fn collections(names: &[String]) -> Result<Vec<Collection>, String> {
    let mut out: Vec<Collection> = Vec::with_capacity(names.len());
    for n in names {
        let c = Collection::parse(n).ok_or_else(|| {
            format!("data-collections names {n:?}; write schema.table, e.g. public.product")
        })?;
        if !out.contains(&c) {
            out.push(c);
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn col(s: &str) -> Collection {
        Collection::parse(s).unwrap()
    }

    #[test]
    fn execute_snapshot_with_a_filter() {
        let s = Signal::parse(
            "1",
            "execute-snapshot",
            Some(
                r#"{"data-collections":["public.product","public.buyer"],"type":"incremental",
                   "additional-conditions":[{"data-collection":"public.product","filter":"id > 10"}]}"#,
            ),
        )
        .unwrap();
        assert_eq!(
            s,
            Signal::ExecuteSnapshot(vec![
                SnapshotRequest {
                    collection: col("public.product"),
                    filter: Some("id > 10".into())
                },
                SnapshotRequest {
                    collection: col("public.buyer"),
                    filter: None
                },
            ])
        );
    }

    #[test]
    fn stop_pause_resume() {
        assert_eq!(
            Signal::parse("1", "stop-snapshot", None).unwrap(),
            Signal::StopSnapshot(None)
        );
        assert_eq!(
            Signal::parse(
                "1",
                "stop-snapshot",
                Some(r#"{"data-collections":["public.product"],"type":"incremental"}"#)
            )
            .unwrap(),
            Signal::StopSnapshot(Some(vec![col("public.product")]))
        );
        assert_eq!(
            Signal::parse("1", "pause-snapshot", Some("")).unwrap(),
            Signal::PauseSnapshot
        );
        assert_eq!(
            Signal::parse("1", "resume-snapshot", None).unwrap(),
            Signal::ResumeSnapshot
        );
    }

    #[test]
    fn malformed_signals_say_what_is_wrong_on_one_line() {
        let cases = [
            ("execute-snapshot", Some("{not json"), "not valid"),
            ("execute-snapshot", None, "needs data"),
            (
                "execute-snapshot",
                Some(r#"{"data-collections":["product"]}"#),
                "schema.table",
            ),
            (
                "execute-snapshot",
                Some(r#"{"data-collections":["public.product"],"type":"blocking"}"#),
                "not supported",
            ),
            (
                "execute-snapshot",
                Some(r#"{"data-collections":[]}"#),
                "is empty",
            ),
            (
                "execute-snapshot",
                Some(
                    r#"{"data-collections":["public.a"],"additional-conditions":[{"data-collection":"public.b","filter":"x"}]}"#,
                ),
                "not in data-collections",
            ),
            ("snapshot-please", None, "unknown type"),
        ];
        for (kind, data, expect) in cases {
            let e = Signal::parse("sig-7", kind, data).unwrap_err();
            let line = e.to_string();
            assert!(line.contains(expect), "{kind} {data:?}: {line}");
            assert!(line.contains("sig-7"), "{line}");
            assert!(!line.contains('\n'), "one line: {line}");
        }
    }
}
