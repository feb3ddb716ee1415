//! The streaming session's pure core: one replication frame in, the actions
//! it calls for out (send these changes, end this transaction, this position
//! may be confirmed when idle, answer the server now).
//!
//! Why pure: everything that decides what goes to Kafka and what may be
//! confirmed to Postgres is here and unit-tested with hand-built messages;
//! the IO loop in `source` only reads frames, asks the catalog for a
//! relation's primary key when [`Decoder::catalog_needed`] says so, and
//! carries the actions out.
//!
//! The one piece of state that outlives a session is the last known primary
//! key per relation ([`KnownKeys`]): the decoder borrows it.

use std::sync::Arc;

use crate::change::{Change, Datum, Lsn, Op, Row, SnapshotMarker, Source, TableName};
use crate::config::SourceConfig;
use crate::error::Error;
use crate::incremental::WATERMARK_PREFIX;
use crate::pgoutput::{Message, PG_EPOCH_OFFSET_US, ReplicationFrame};
use crate::relation::{CatalogKey, KnownKeys, RelationCache, to_row, update_rows};

/// A frame of the replication stream with its pgoutput message decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The server's keepalive.
    Keepalive {
        /// End of WAL on the server.
        wal_end: Lsn,
        /// The server wants a status update now.
        reply_requested: bool,
    },
    /// One pgoutput message.
    Message {
        /// The change's own LSN (0 for Relation and Type messages).
        wal_start: Lsn,
        /// End of WAL on the server.
        wal_end: Lsn,
        /// The message.
        message: Message,
    },
}

impl Event {
    /// Decodes a frame's pgoutput message.
    pub fn of(frame: ReplicationFrame) -> Result<Event, Error> {
        Ok(match frame {
            ReplicationFrame::PrimaryKeepalive {
                wal_end,
                reply_requested,
                ..
            } => Event::Keepalive {
                wal_end,
                reply_requested,
            },
            ReplicationFrame::XLogData {
                wal_start,
                wal_end,
                data,
                ..
            } => Event::Message {
                wal_start,
                wal_end,
                message: Message::parse(data)?,
            },
        })
    }
}

/// What the IO loop must do.
#[derive(Debug, Clone)]
pub enum Action {
    /// The server has WAL up to here (progress metrics).
    ServerWalEnd(Lsn),
    /// Hand this change to the sink.
    Send(Change),
    /// The transaction ended: its end becomes confirmable once every record
    /// handed over so far is acknowledged.
    Commit {
        /// End of the commit record: the position to confirm.
        end_lsn: Lsn,
        /// Commit time, µs since 1970.
        commit_time_us: i64,
    },
    /// A keepalive while no transaction is open: `wal_end` may be confirmed
    /// once nothing handed to the sink is unacknowledged (see `source`).
    Idle(Lsn),
    /// The server asked for a status update now.
    ReplyNow,
    /// A row inserted into the signal table (its columns as text).
    Signal {
        /// `id`.
        id: String,
        /// `type`.
        kind: String,
        /// `data`.
        data: Option<String>,
    },
    /// A watermark message of ours (see `incremental`).
    Watermark {
        /// The message's LSN.
        lsn: Lsn,
        /// Its content.
        content: String,
    },
}

/// The transaction being decoded.
#[derive(Debug, Clone, Copy)]
struct OpenTx {
    xid: u32,
    final_lsn: Lsn,
    commit_ts_us: i64,
}

/// Decoding state of one streaming session.
#[derive(Debug)]
pub struct Decoder<'k> {
    cfg: Arc<SourceConfig>,
    relations: RelationCache,
    known_keys: &'k mut KnownKeys,
    tx: Option<OpenTx>,
}

impl<'k> Decoder<'k> {
    /// A fresh session's decoder (the server resends Relation messages on
    /// every connection).
    pub fn new(cfg: Arc<SourceConfig>, known_keys: &'k mut KnownKeys) -> Self {
        Decoder {
            cfg,
            relations: RelationCache::new(),
            known_keys,
            tx: None,
        }
    }

    /// Whether a transaction is open.
    pub fn in_transaction(&self) -> bool {
        self.tx.is_some()
    }

    /// The relation whose primary key the catalog must be asked for before
    /// `event` is stepped: a Relation message of a captured table.
    pub fn catalog_needed(&self, event: &Event) -> Option<u32> {
        match event {
            Event::Message {
                message:
                    Message::Relation {
                        oid,
                        namespace,
                        name,
                        ..
                    },
                ..
            } if self.cfg.includes(namespace, name) => Some(*oid),
            _ => None,
        }
    }

    /// Steps one event; `catalog` answers [`Decoder::catalog_needed`].
    /// Appends the actions to `actions`.
    pub fn step(
        &mut self,
        event: Event,
        catalog: Option<&CatalogKey>,
        actions: &mut Vec<Action>,
    ) -> Result<(), Error> {
        match event {
            Event::Keepalive {
                wal_end,
                reply_requested,
            } => {
                actions.push(Action::ServerWalEnd(wal_end));
                if self.tx.is_none() {
                    actions.push(Action::Idle(wal_end));
                }
                if reply_requested {
                    actions.push(Action::ReplyNow);
                }
                Ok(())
            }
            Event::Message {
                wal_start,
                wal_end,
                message,
            } => {
                actions.push(Action::ServerWalEnd(wal_end));
                self.message(wal_start, message, catalog, actions)
            }
        }
    }

    fn message(
        &mut self,
        wal_start: Lsn,
        message: Message,
        catalog: Option<&CatalogKey>,
        actions: &mut Vec<Action>,
    ) -> Result<(), Error> {
        match message {
            Message::Begin {
                final_lsn,
                commit_time,
                xid,
            } => {
                self.tx = Some(OpenTx {
                    xid,
                    final_lsn,
                    commit_ts_us: commit_time + PG_EPOCH_OFFSET_US,
                });
            }
            Message::Commit {
                end_lsn,
                commit_time,
                ..
            } => {
                self.tx = None;
                actions.push(Action::Commit {
                    end_lsn,
                    commit_time_us: commit_time + PG_EPOCH_OFFSET_US,
                });
            }
            Message::Relation {
                oid,
                namespace,
                name,
                replica_identity,
                mut columns,
            } => {
                let included = self.cfg.includes(&namespace, &name);
                if included {
                    let catalog = catalog.ok_or_else(|| {
                        Error::Replication(format!(
                            "relation {namespace}.{name}: its primary key was not looked up"
                        ))
                    })?;
                    if !self
                        .known_keys
                        .resolve(oid, replica_identity, &mut columns, catalog)
                    {
                        return Err(Error::MissingKey {
                            table: format!("{namespace}.{name}"),
                            oid,
                            slot: self.cfg.slot.clone(),
                        });
                    }
                }
                let table = TableName {
                    prefix: self.cfg.prefix.clone(),
                    database: self.cfg.params.dbname.clone(),
                    schema: namespace,
                    table: name,
                };
                self.relations
                    .replace(oid, table, replica_identity, &columns, included);
            }
            Message::LogicalMessage {
                prefix,
                content,
                lsn,
                ..
            } if prefix == WATERMARK_PREFIX => {
                actions.push(Action::Watermark {
                    lsn,
                    content: String::from_utf8_lossy(&content).into_owned(),
                });
            }
            Message::Type { .. } | Message::Origin { .. } | Message::LogicalMessage { .. } => {}
            Message::Insert { oid, new } if self.is_signal(oid) => {
                let rel = self.relations.get(oid)?;
                let row = to_row(&rel.columns, new)?;
                let text = |name: &str| {
                    rel.columns
                        .iter()
                        .position(|c| c.name == name)
                        .and_then(|i| match &row[i] {
                            Datum::Text(b) => Some(String::from_utf8_lossy(b).into_owned()),
                            _ => None,
                        })
                };
                actions.push(Action::Signal {
                    id: text("id").unwrap_or_default(),
                    kind: text("type").unwrap_or_default(),
                    data: text("data"),
                });
            }
            Message::Insert { oid, new } => {
                self.change(oid, wal_start, Op::Create, actions, |columns| {
                    Ok((None, Some(to_row(columns, new)?)))
                })?;
            }
            Message::Update { oid, old, new } => {
                self.change(oid, wal_start, Op::Update, actions, |columns| {
                    let (before, after) = update_rows(columns, old, new)?;
                    Ok((before, Some(after)))
                })?;
            }
            Message::Delete { oid, old: (_, old) } => {
                self.change(oid, wal_start, Op::Delete, actions, |columns| {
                    Ok((Some(to_row(columns, old)?), None))
                })?;
            }
            Message::Truncate { oids, .. } => {
                for oid in oids {
                    self.change(oid, wal_start, Op::Truncate, actions, |_| Ok((None, None)))?;
                }
            }
        }
        Ok(())
    }

    /// Whether relation `oid` is the signal table.
    fn is_signal(&self, oid: u32) -> bool {
        self.relations
            .get(oid)
            .is_ok_and(|r| self.cfg.is_signal_table(&r.table.schema, &r.table.table))
    }

    /// One row change (or truncate) of relation `oid`, when it is captured;
    /// `rows` turns the message's tuples into (before, after).
    fn change(
        &self,
        oid: u32,
        lsn: Lsn,
        op: Op,
        actions: &mut Vec<Action>,
        rows: impl FnOnce(&[crate::change::Column]) -> Result<(Option<Row>, Option<Row>), Error>,
    ) -> Result<(), Error> {
        let rel = self.relations.get(oid)?;
        if !rel.included {
            return Ok(());
        }
        let tx = self
            .tx
            .ok_or_else(|| Error::Replication("change outside a transaction".to_owned()))?;
        let (before, after) = rows(&rel.columns)?;
        actions.push(Action::Send(Change {
            table: rel.table.clone(),
            columns: rel.columns.clone(),
            op,
            before,
            after,
            source: Source {
                commit_ts_us: tx.commit_ts_us,
                snapshot: SnapshotMarker::No,
                tx_id: Some(tx.xid),
                lsn,
                last_commit_lsn: Some(tx.final_lsn),
                commit_lsn: tx.final_lsn,
            },
        }));
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::config::Config;
    use crate::pgoutput::{OldKind, RelationColumn, TupleValue};
    use clap::Parser;

    fn cfg(extra: &[&str]) -> Arc<SourceConfig> {
        let mut args = vec!["cdc-reader", "--source", "shop=postgres://u@h/shopdb"];
        args.extend_from_slice(extra);
        let config = Config::try_parse_from(args).unwrap();
        Arc::new(config.source_configs().unwrap().remove(0))
    }

    fn msg(wal_start: Lsn, message: Message) -> Event {
        Event::Message {
            wal_start,
            wal_end: 9_000,
            message,
        }
    }

    fn relation(oid: u32, name: &str, identity: u8) -> Event {
        let col = |n: &str| RelationColumn {
            is_key: true,
            name: n.into(),
            type_oid: 23,
            type_modifier: -1,
        };
        msg(
            0,
            Message::Relation {
                oid,
                namespace: "public".into(),
                name: name.into(),
                replica_identity: identity,
                columns: vec![col("id"), col("v")],
            },
        )
    }

    fn tuple(id: &str, v: &str) -> Vec<TupleValue> {
        vec![
            TupleValue::Text(Bytes::copy_from_slice(id.as_bytes())),
            TupleValue::Text(Bytes::copy_from_slice(v.as_bytes())),
        ]
    }

    fn begin(final_lsn: Lsn) -> Event {
        msg(
            0,
            Message::Begin {
                final_lsn,
                commit_time: 1_234_567,
                xid: 77,
            },
        )
    }

    fn commit(end_lsn: Lsn) -> Event {
        msg(
            0,
            Message::Commit {
                flags: 0,
                commit_lsn: end_lsn - 8,
                end_lsn,
                commit_time: 1_000,
            },
        )
    }

    fn pk_id() -> CatalogKey {
        CatalogKey::Columns(vec!["id".into()])
    }

    /// Steps events, answering catalog questions with `catalog`.
    fn run(decoder: &mut Decoder<'_>, events: Vec<Event>, catalog: &CatalogKey) -> Vec<Action> {
        let mut actions = Vec::new();
        for e in events {
            let needed = decoder.catalog_needed(&e).map(|_| catalog);
            decoder.step(e, needed, &mut actions).unwrap();
        }
        actions
    }

    fn sent(actions: &[Action]) -> Vec<&Change> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    /// An insert into the signal table becomes a signal, never a change
    /// to send; our watermark messages are handed on, others' ignored.
    #[test]
    fn signal_rows_and_watermarks() {
        let mut keys = KnownKeys::new();
        let mut d = Decoder::new(cfg(&[]), &mut keys);
        let col = |n: &str| RelationColumn {
            is_key: n == "id",
            name: n.into(),
            type_oid: 25,
            type_modifier: -1,
        };
        let text = |v: &str| TupleValue::Text(Bytes::copy_from_slice(v.as_bytes()));
        let actions = run(
            &mut d,
            vec![
                msg(
                    0,
                    Message::Relation {
                        oid: 20,
                        namespace: "public".into(),
                        name: "cdc_signal".into(),
                        replica_identity: b'd',
                        columns: vec![col("id"), col("type"), col("data")],
                    },
                ),
                begin(5_000),
                msg(
                    4_100,
                    Message::Insert {
                        oid: 20,
                        new: vec![text("s1"), text("pause-snapshot"), TupleValue::Null],
                    },
                ),
                commit(5_100),
                msg(
                    0,
                    Message::LogicalMessage {
                        transactional: false,
                        lsn: 6_000,
                        prefix: WATERMARK_PREFIX.into(),
                        content: Bytes::from_static(b"slot low 1"),
                    },
                ),
                msg(
                    0,
                    Message::LogicalMessage {
                        transactional: false,
                        lsn: 6_100,
                        prefix: "instashop_cdc_heartbeat".into(),
                        content: Bytes::new(),
                    },
                ),
            ],
            &pk_id(),
        );
        assert!(sent(&actions).is_empty(), "the signal table is never sent");
        let signals: Vec<_> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Signal { id, kind, data } => Some((id.clone(), kind.clone(), data.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            signals,
            vec![("s1".to_owned(), "pause-snapshot".to_owned(), None)]
        );
        let marks: Vec<_> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Watermark { lsn, content } => Some((*lsn, content.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(marks, vec![(6_000, "slot low 1".to_owned())]);
    }

    #[test]
    fn a_transaction_sends_its_changes_with_the_commit_position_then_commits() {
        let mut keys = KnownKeys::new();
        let mut d = Decoder::new(cfg(&[]), &mut keys);
        let actions = run(
            &mut d,
            vec![
                relation(10, "item", b'f'),
                begin(5_000),
                msg(
                    4_100,
                    Message::Insert {
                        oid: 10,
                        new: tuple("1", "a"),
                    },
                ),
                msg(
                    4_200,
                    Message::Update {
                        oid: 10,
                        old: Some((OldKind::Full, tuple("1", "a"))),
                        new: tuple("1", "b"),
                    },
                ),
                msg(
                    4_300,
                    Message::Delete {
                        oid: 10,
                        old: (OldKind::Full, tuple("1", "b")),
                    },
                ),
                commit(5_040),
            ],
            &pk_id(),
        );
        let changes = sent(&actions);
        let ops: Vec<Op> = changes.iter().map(|c| c.op).collect();
        assert_eq!(ops, [Op::Create, Op::Update, Op::Delete]);
        for (c, lsn) in changes.iter().zip([4_100, 4_200, 4_300]) {
            assert_eq!(c.source.lsn, lsn);
            assert_eq!(c.source.commit_lsn, 5_000, "Begin's final_lsn");
            assert_eq!(c.source.tx_id, Some(77));
            assert_eq!(
                c.source.commit_ts_us,
                1_234_567 + PG_EPOCH_OFFSET_US,
                "Begin's commit time, to the microsecond"
            );
            assert_eq!(c.table.topic(), "shop.public.item");
            let keys: Vec<&str> = c
                .columns
                .iter()
                .filter(|c| c.is_key)
                .map(|c| c.name.as_str())
                .collect();
            assert_eq!(keys, ["id"], "the catalog's key, not pgoutput's FULL flags");
        }
        assert!(matches!(
            actions.last(),
            Some(Action::Commit { end_lsn: 5_040, commit_time_us }) if *commit_time_us == 1_000 + PG_EPOCH_OFFSET_US
        ));
        assert!(!d.in_transaction());
    }

    #[test]
    fn keepalives_are_idle_only_between_transactions() {
        let mut keys = KnownKeys::new();
        let mut d = Decoder::new(cfg(&[]), &mut keys);
        let keepalive = |reply| Event::Keepalive {
            wal_end: 7_000,
            reply_requested: reply,
        };
        let idle = run(&mut d, vec![keepalive(true)], &pk_id());
        assert!(matches!(
            idle[..],
            [
                Action::ServerWalEnd(7_000),
                Action::Idle(7_000),
                Action::ReplyNow
            ]
        ));
        let busy = run(&mut d, vec![begin(8_000), keepalive(false)], &pk_id());
        assert!(
            !busy.iter().any(|a| matches!(a, Action::Idle(_))),
            "never idle inside a transaction: {busy:?}"
        );
    }

    #[test]
    fn excluded_tables_send_nothing_and_need_no_catalog() {
        let mut keys = KnownKeys::new();
        let mut d = Decoder::new(cfg(&["--exclude-tables", "secret"]), &mut keys);
        let rel = relation(11, "secret", b'f');
        assert_eq!(d.catalog_needed(&rel), None);
        let actions = run(
            &mut d,
            vec![
                rel,
                begin(100),
                msg(
                    90,
                    Message::Insert {
                        oid: 11,
                        new: tuple("1", "x"),
                    },
                ),
                commit(140),
            ],
            &CatalogKey::Gone,
        );
        assert!(sent(&actions).is_empty());
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Commit { end_lsn: 140, .. }))
        );
    }

    #[test]
    fn a_truncate_is_one_change_per_captured_table() {
        let mut keys = KnownKeys::new();
        let mut d = Decoder::new(cfg(&["--exclude-tables", "other"]), &mut keys);
        let actions = run(
            &mut d,
            vec![
                relation(10, "item", b'd'),
                relation(12, "other", b'd'),
                begin(300),
                msg(
                    250,
                    Message::Truncate {
                        options: 0,
                        oids: vec![10, 12],
                    },
                ),
                commit(340),
            ],
            &pk_id(),
        );
        let changes = sent(&actions);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].op, Op::Truncate);
        assert_eq!(
            (changes[0].source.commit_lsn, changes[0].source.lsn),
            (300, 250)
        );
    }

    #[test]
    fn the_key_survives_a_reconnect_and_a_drop() {
        let mut keys = KnownKeys::new();
        {
            let mut d = Decoder::new(cfg(&[]), &mut keys);
            run(&mut d, vec![relation(10, "item", b'f')], &pk_id());
        }
        // A new session: the table is gone by the time it is decoded.
        let mut d = Decoder::new(cfg(&[]), &mut keys);
        let actions = run(
            &mut d,
            vec![
                relation(10, "item", b'f'),
                begin(600),
                msg(
                    550,
                    Message::Insert {
                        oid: 10,
                        new: tuple("2", "y"),
                    },
                ),
                commit(640),
            ],
            &CatalogKey::Gone,
        );
        let key: Vec<bool> = sent(&actions)[0].columns.iter().map(|c| c.is_key).collect();
        assert_eq!(key, [true, false]);
    }

    #[test]
    fn unkeyable_relation_and_protocol_violations_are_errors() {
        let mut keys = KnownKeys::new();
        let mut d = Decoder::new(cfg(&[]), &mut keys);
        let rel = relation(13, "gone", b'f');
        let err = d
            .step(rel.clone(), Some(&CatalogKey::Gone), &mut Vec::new())
            .unwrap_err();
        assert!(matches!(err, Error::MissingKey { oid: 13, .. }), "{err}");
        assert!(!err.is_retryable());
        let err = d.step(rel, None, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("not looked up"), "{err}");
        // A change before its Relation message, and one outside a transaction.
        let insert = msg(
            1,
            Message::Insert {
                oid: 99,
                new: tuple("1", "a"),
            },
        );
        assert!(d.step(insert, None, &mut Vec::new()).is_err());
        run(&mut d, vec![relation(10, "item", b'd')], &pk_id());
        let insert = msg(
            1,
            Message::Insert {
                oid: 10,
                new: tuple("1", "a"),
            },
        );
        let err = d.step(insert, None, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("outside a transaction"), "{err}");
    }
}
