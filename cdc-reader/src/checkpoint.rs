//! The exactly-once checkpoint: how far a source's events are committed in
//! Kafka, and which changes a restarted reader must therefore drop.
//!
//! The checkpoint is a record in a compacted topic of the reader's, keyed by
//! the source's `transactional.id`, written in the same Kafka transaction as
//! the events it covers: a `read_committed` reader of the checkpoint can
//! never see a position that disagrees with the data.
//!
//! What it holds, and why that is enough to drop exactly the events already
//! written:
//! - `end_lsn`: the end of the newest source transaction written completely.
//!   A change whose transaction's commit record starts before it (its
//!   `source.commit_lsn`, pgoutput Begin's `final_lsn`) belongs to a
//!   transaction written completely: commit records never overlap, so
//!   `commit_lsn < end_lsn` holds exactly for that transaction and the ones
//!   committed before it. Snapshot rows carry the consistent point minus one
//!   and the snapshot ends at the consistent point, so they follow the same
//!   rule.
//! - `partial`: a source transaction too large for one Kafka transaction is
//!   split; the checkpoint then names its `commit_lsn` and how many of its
//!   changes were written. Decoding the same WAL again yields the same
//!   changes in the same order, so the first `events` changes are dropped.
//!
//! [`Ledger`] is the pure state machine the transactional sink drives:
//! change in, write or drop out; transaction end in, confirm now or after
//! the next Kafka commit out.

use serde::{Deserialize, Serialize};

use crate::change::{Lsn, lsn_to_string};

/// A split source transaction's written part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partial {
    /// `source.commit_lsn` of the split transaction.
    pub commit_lsn: Lsn,
    /// How many of its changes (in decoding order) are written.
    pub events: u64,
}

/// What one source has committed to Kafka.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// End LSN of the newest source transaction written completely (0: none).
    pub end_lsn: Lsn,
    /// The written part of a split transaction after it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<Partial>,
}

impl Checkpoint {
    /// The record value (JSON, with the LSN also in Postgres' notation for people).
    pub fn encode(&self) -> Vec<u8> {
        let mut value = serde_json::json!({
            "end_lsn": self.end_lsn,
            "end": lsn_to_string(self.end_lsn),
        });
        if let Some(p) = self.partial {
            value["partial"] = serde_json::json!({"commit_lsn": p.commit_lsn, "events": p.events});
        }
        value.to_string().into_bytes()
    }

    /// Parses a record value; the error says what is wrong with it.
    pub fn decode(bytes: &[u8]) -> Result<Checkpoint, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }

    /// Whether the change at `index` (0-based, decoding order) of the
    /// transaction with `commit_lsn` is already written.
    pub fn covers(&self, commit_lsn: Lsn, index: u64) -> bool {
        commit_lsn < self.end_lsn
            || self
                .partial
                .is_some_and(|p| p.commit_lsn == commit_lsn && index < p.events)
    }
}

/// What to do with a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not yet in Kafka: write it.
    Write,
    /// Its whole transaction is already in Kafka: drop it without encoding.
    DropTransaction,
    /// The first part of a split transaction already in Kafka: drop it, but
    /// let the encoder see it (transaction metadata counts every event).
    DropSplit,
}

/// What a transaction end means for the LSN confirmed to Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirm {
    /// Nothing of it (or before it) awaits a Kafka commit: confirm now.
    Now(Lsn),
    /// Confirm once the open Kafka transaction is committed.
    AfterCommit,
}

/// The transactional sink's bookkeeping for one source (pure).
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    /// What Kafka holds (read at start, then advanced by each commit).
    committed: Checkpoint,
    /// What the open Kafka transaction will hold once committed.
    pending: Checkpoint,
    /// The source transaction being decoded: (commit_lsn, changes seen).
    open: Option<(Lsn, u64)>,
    /// Records written since the last commit.
    dirty: bool,
    /// Newest transaction end to confirm after the next commit.
    confirm_after_commit: Option<Lsn>,
}

impl Ledger {
    /// Starting from what Kafka holds.
    pub fn new(committed: Checkpoint) -> Self {
        Ledger {
            committed,
            pending: committed,
            ..Ledger::default()
        }
    }

    /// One change of the transaction `commit_lsn`, in decoding order.
    pub fn change(&mut self, commit_lsn: Lsn) -> Verdict {
        let index = match &mut self.open {
            Some((lsn, seen)) if *lsn == commit_lsn => {
                *seen += 1;
                *seen - 1
            }
            _ => {
                self.open = Some((commit_lsn, 1));
                0
            }
        };
        if commit_lsn < self.committed.end_lsn {
            return Verdict::DropTransaction;
        }
        if self.committed.covers(commit_lsn, index) {
            return Verdict::DropSplit;
        }
        self.pending.partial = Some(Partial {
            commit_lsn,
            events: index + 1,
        });
        self.dirty = true;
        Verdict::Write
    }

    /// The open source transaction ended at `end_lsn`.
    pub fn end(&mut self, end_lsn: Lsn) -> Confirm {
        self.open = None;
        if end_lsn <= self.committed.end_lsn {
            return Confirm::Now(end_lsn);
        }
        if !self.dirty {
            // Nothing written since the last commit (an empty transaction, or
            // one of tables not captured): nothing to lose by confirming it.
            return Confirm::Now(end_lsn);
        }
        self.pending.end_lsn = self.pending.end_lsn.max(end_lsn);
        self.pending.partial = None;
        self.confirm_after_commit = Some(end_lsn);
        Confirm::AfterCommit
    }

    /// A record other than a change's was written (a transaction's END).
    pub fn wrote(&mut self) {
        self.dirty = true;
    }

    /// Whether records await a commit.
    pub fn dirty(&self) -> bool {
        self.dirty
    }

    /// Whether a source transaction is being decoded.
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// Changes of the open source transaction seen so far.
    pub fn open_events(&self) -> u64 {
        self.open.map_or(0, |(_, seen)| seen)
    }

    /// The checkpoint to write with the next commit.
    pub fn pending(&self) -> Checkpoint {
        self.pending
    }

    /// What Kafka holds.
    pub fn committed(&self) -> Checkpoint {
        self.committed
    }

    /// The Kafka transaction committed: returns the LSN now confirmable.
    pub fn committed_now(&mut self) -> Option<Lsn> {
        self.committed = self.pending;
        self.dirty = false;
        self.confirm_after_commit.take()
    }
}

/// When the open Kafka transaction is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Commit at a source transaction's end once this many records are in it.
    pub max_records: u64,
    /// ... or this many bytes.
    pub max_bytes: u64,
    /// ... or once the first completed source transaction waited this long,
    pub linger: std::time::Duration,
    /// ... or this long while a backlog is read (more WAL already waits in
    /// the reader): then latency is the backlog's anyway, and each commit
    /// (~50 ms on three brokers, during which the source stops) would cut
    /// the catch-up rate, so the transaction fills up first.
    pub backlog_linger: std::time::Duration,
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            max_records: 20_000,
            max_bytes: 16 * 1024 * 1024,
            linger: std::time::Duration::from_millis(10),
            backlog_linger: std::time::Duration::from_millis(1000),
        }
    }
}

impl Batching {
    /// Whether a batch of `records` / `bytes` is full.
    pub fn full(&self, records: u64, bytes: u64) -> bool {
        records >= self.max_records || bytes >= self.max_bytes
    }

    /// How long the first completed source transaction of a batch may wait
    /// for its commit: `linger`, or `backlog_linger` while a backlog is read.
    pub fn wait(&self, backlog: bool) -> std::time::Duration {
        if backlog {
            self.backlog_linger.max(self.linger)
        } else {
            self.linger
        }
    }

    /// Whether the batch is to be committed at a source transaction's end:
    /// full, or its first source transaction ended `waited` ago.
    pub fn due(
        &self,
        records: u64,
        bytes: u64,
        waited: std::time::Duration,
        backlog: bool,
    ) -> bool {
        self.full(records, bytes) || waited >= self.wait(backlog)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_values() {
        let c = Checkpoint {
            end_lsn: 0x16_B374_D848,
            partial: Some(Partial {
                commit_lsn: 0x17_0000_0000,
                events: 12,
            }),
        };
        let text = String::from_utf8(c.encode()).expect("utf-8");
        assert!(text.contains("\"end\":\"16/B374D848\""), "{text}");
        assert_eq!(Checkpoint::decode(&c.encode()), Ok(c));
        let whole = Checkpoint {
            end_lsn: 5,
            partial: None,
        };
        assert_eq!(Checkpoint::decode(&whole.encode()), Ok(whole));
        assert!(Checkpoint::decode(b"{\"end\":1}").is_err());
        assert!(Checkpoint::decode(b"not json").is_err());
    }

    #[test]
    fn transactions_before_the_checkpoint_are_dropped_whole() {
        // Transactions: A commit at 100 ends 110; B commit at 200 ends 210.
        let mut l = Ledger::new(Checkpoint {
            end_lsn: 110,
            partial: None,
        });
        assert_eq!(l.change(100), Verdict::DropTransaction);
        assert_eq!(l.change(100), Verdict::DropTransaction);
        assert_eq!(l.end(110), Confirm::Now(110));
        assert!(!l.dirty());
        assert_eq!(l.change(200), Verdict::Write);
        assert_eq!(l.end(210), Confirm::AfterCommit);
        assert_eq!(l.pending().end_lsn, 210);
        assert_eq!(l.committed_now(), Some(210));
        assert_eq!(l.committed().end_lsn, 210);
    }

    #[test]
    fn a_snapshot_is_covered_by_its_consistent_point() {
        // Rows carry commit_lsn = consistent point - 1; a streamed
        // transaction whose commit starts exactly at the point is not.
        let cp = 1000;
        let mut l = Ledger::new(Checkpoint::default());
        assert_eq!(l.change(cp - 1), Verdict::Write);
        assert_eq!(l.change(cp - 1), Verdict::Write);
        assert_eq!(l.end(cp), Confirm::AfterCommit);
        assert_eq!(l.committed_now(), Some(cp));
        let mut restarted = Ledger::new(l.committed());
        assert_eq!(restarted.change(cp - 1), Verdict::DropTransaction);
        restarted.end(cp);
        assert_eq!(restarted.change(cp), Verdict::Write);
    }

    #[test]
    fn a_split_transaction_resumes_after_its_written_part() {
        let mut l = Ledger::new(Checkpoint::default());
        for _ in 0..3 {
            assert_eq!(l.change(500), Verdict::Write);
        }
        // Committed mid-transaction: nothing to confirm yet.
        assert_eq!(l.committed_now(), None);
        assert_eq!(
            l.committed().partial,
            Some(Partial {
                commit_lsn: 500,
                events: 3
            })
        );
        // A restart: the server resends the whole transaction.
        let mut r = Ledger::new(l.committed());
        for _ in 0..3 {
            assert_eq!(r.change(500), Verdict::DropSplit);
        }
        assert!(!r.dirty());
        assert_eq!(r.change(500), Verdict::Write);
        assert_eq!(r.change(500), Verdict::Write);
        assert_eq!(r.end(510), Confirm::AfterCommit);
        assert_eq!(r.pending().partial, None);
        assert_eq!(r.committed_now(), Some(510));
        assert_eq!(r.committed().end_lsn, 510);
    }

    #[test]
    fn empty_transactions_confirm_at_once_unless_writes_wait() {
        let mut l = Ledger::new(Checkpoint::default());
        assert_eq!(l.end(50), Confirm::Now(50));
        assert_eq!(l.change(60), Verdict::Write);
        assert_eq!(l.end(70), Confirm::AfterCommit);
        // An empty transaction after uncommitted writes waits with them.
        assert_eq!(l.end(80), Confirm::AfterCommit);
        assert_eq!(l.committed_now(), Some(80));
        assert_eq!(l.committed_now(), None);
    }

    /// Any cut: the checkpoint written at any commit, applied to a replay of
    /// the same stream, drops exactly the changes written before the cut.
    #[test]
    fn replay_after_any_commit_writes_every_change_once() {
        // Three transactions of 1, 4 and 2 changes.
        let stream: [(Lsn, Lsn, u64); 3] = [(100, 110, 1), (200, 210, 4), (300, 310, 2)];
        let total: u64 = stream.iter().map(|t| t.2).sum();
        for cut in 0..=total {
            let mut first = Ledger::new(Checkpoint::default());
            let mut written = 0;
            'outer: for &(commit, end, n) in &stream {
                for _ in 0..n {
                    if written == cut {
                        break 'outer;
                    }
                    assert_eq!(first.change(commit), Verdict::Write);
                    written += 1;
                }
                first.end(end);
            }
            first.committed_now();
            let mut again = Ledger::new(first.committed());
            let mut rewritten = 0;
            for &(commit, end, n) in &stream {
                for _ in 0..n {
                    if again.change(commit) == Verdict::Write {
                        rewritten += 1;
                    }
                }
                again.end(end);
            }
            assert_eq!(written + rewritten, total, "cut after {cut} changes");
        }
    }

    #[test]
    fn a_backlog_keeps_the_transaction_open_until_full_or_its_own_linger() {
        use std::time::Duration;
        let b = Batching {
            max_records: 100,
            max_bytes: 1_000,
            linger: Duration::from_millis(10),
            backlog_linger: Duration::from_millis(500),
        };
        let ms = Duration::from_millis;
        // Caught up: the linger commits.
        assert!(!b.due(1, 10, ms(9), false));
        assert!(b.due(1, 10, ms(10), false));
        // A backlog waits: the linger alone does not commit ...
        assert!(!b.due(1, 10, ms(10), true));
        assert!(!b.due(99, 999, ms(499), true));
        // ... a full batch or the backlog linger does.
        assert!(b.due(100, 10, ms(0), true));
        assert!(b.due(1, 1_000, ms(0), true));
        assert!(b.due(1, 10, ms(500), true));
        // A backlog linger below the linger never shortens it.
        let short = Batching {
            backlog_linger: ms(1),
            ..b
        };
        assert_eq!(short.wait(true), ms(10));
        assert!(!short.due(1, 10, ms(5), true));
    }
}
