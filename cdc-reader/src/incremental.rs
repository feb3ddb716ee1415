//! Incremental snapshots (the DBLog watermark algorithm) as a pure state
//! machine: which chunk rows may go out, and what is left to read.
//!
//! A table is read in primary-key order, one chunk at a time, while the
//! stream goes on. For each chunk the IO side
//! 1. tells the [`Window`] the chunk was requested (the stream position at
//!    that moment is the start of the window);
//! 2. writes a low watermark into the WAL (`pg_logical_emit_message`,
//!    non-transactional, with our prefix);
//! 3. reads the chunk (`... WHERE key > last ORDER BY key LIMIT n`) in a
//!    short REPEATABLE READ transaction, together with that transaction's
//!    snapshot (`pg_current_snapshot()`);
//! 4. writes a high watermark.
//!
//! The stream side reports every captured change of the table to the
//! window. When the high watermark arrives through the stream, the chunk
//! rows whose key was changed since the request are dropped (the stream
//! wins: it already delivered that key's newer state), the rest go out as
//! `op: "r"`, `source.snapshot: "incremental"`, positioned at the high
//! watermark.
//!
//! Why the window starts at the request and not only at the low watermark:
//! a transaction's commit record reaches the WAL (and so the stream) a
//! moment before the transaction becomes visible to new snapshots. A change
//! streamed just before the low watermark may thus be missing from the
//! chunk's snapshot; emitting the chunk row after it would put an older row
//! after a newer change. Counting from the request covers the usual gap;
//! the ring of recent changes ([`Window::streamed`] keeps their xids) covers
//! the rest: any recent change whose transaction the chunk's snapshot does
//! not see drops its key too ([`Visibility`]).
//!
//! Why non-transactional watermarks: they are decoded at their own WAL
//! position, right away, without an xid or a commit record; a
//! transactional message would only be decoded at its commit, which adds
//! nothing here. `pg_logical_emit_message` is executable by PUBLIC, so the
//! least-privilege CDC role can write them (the heartbeat does already).
//!
//! The [`Plan`] is the queue of tables still to snapshot and, for the table
//! in progress, the last key of the last chunk Kafka acknowledged: it is
//! persisted (see `source`) so a killed reader resumes with the next chunk.

use std::collections::{HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::signal::{Collection, Signal, SnapshotRequest};

/// The prefix of our watermark messages.
pub const WATERMARK_PREFIX: &str = "instashop_cdc_incremental";

/// A primary key in pgoutput's text form, one element per key column.
pub type Key = Vec<String>;

/// Which transactions a chunk's snapshot sees (`pg_current_snapshot()`:
/// `xmin:xmax:xip,...`, 64-bit xids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Visibility {
    xmin: u64,
    xmax: u64,
    xip: Vec<u64>,
}

impl Visibility {
    /// Parses `pg_snapshot` text; `None` when malformed.
    pub fn parse(text: &str) -> Option<Visibility> {
        let mut parts = text.trim().splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let list = parts.next()?;
        let xip = if list.is_empty() {
            Vec::new()
        } else {
            list.split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u64>>>()?
        };
        Some(Visibility { xmin, xmax, xip })
    }

    /// Whether a committed transaction with this 32-bit xid (as pgoutput
    /// sends it) is visible: its full xid is taken in the epoch that puts it
    /// nearest to `xmin` (running xids never span more than 2^31).
    pub fn sees(&self, xid: u32) -> bool {
        let base = self.xmin;
        let candidate = (base & !0xFFFF_FFFF) | u64::from(xid);
        let full = if candidate + (1 << 31) < base {
            candidate + (1 << 32)
        } else if candidate > base + (1 << 31) && candidate >= 1 << 32 {
            candidate - (1 << 32)
        } else {
            candidate
        };
        full < self.xmin || (full < self.xmax && !self.xip.contains(&full))
    }
}

/// One chunk as read by the IO side.
#[derive(Debug, Clone)]
pub struct ChunkRead<R> {
    /// The chunk's id (watermarks carry it).
    pub id: u64,
    /// Rows in key order, each with its key.
    pub rows: Vec<(Key, R)>,
    /// The snapshot the rows were read in.
    pub visibility: Visibility,
}

/// What a high watermark lets out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emit<R> {
    /// Rows to send, in key order.
    pub rows: Vec<R>,
    /// Rows read from the table (sent or dropped).
    pub read: usize,
    /// Rows dropped because the stream delivered a newer state.
    pub dropped: usize,
    /// Key of the last row read: the next chunk starts after it.
    pub last_key: Option<Key>,
    /// The earliest commit position of a streamed change that kept rows
    /// out of this chunk: one streamed since the chunk was requested (it may
    /// precede the low watermark) or one the chunk's snapshot did not see.
    /// The rows it kept out have no chunk event, only that change's (see
    /// [`Job::since`]).
    pub earliest_kept_out: Option<u64>,
}

/// Why a watermark was not acted on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stale {
    /// Not the chunk in progress (an earlier attempt, another reader's).
    OtherChunk,
    /// The high watermark arrived before the low one or without rows.
    OutOfOrder,
}

/// The DBLog window of one chunk of one table, plus the ring of recent
/// changes of that table.
#[derive(Debug, Clone)]
pub struct Window {
    table: Option<Collection>,
    chunk: Option<u64>,
    low_seen: bool,
    changed: HashSet<Key>,
    /// The earliest commit position among the changes in `changed`.
    changed_since: Option<u64>,
    truncated: bool,
    recent: VecDeque<(u32, Key, u64)>,
    recent_cap: usize,
}

impl Window {
    /// An idle window keeping up to `recent_cap` recent changes.
    pub fn new(recent_cap: usize) -> Self {
        Window {
            table: None,
            chunk: None,
            low_seen: false,
            changed: HashSet::new(),
            changed_since: None,
            truncated: false,
            recent: VecDeque::new(),
            recent_cap,
        }
    }

    /// The chunk being read, if any.
    pub fn chunk(&self) -> Option<u64> {
        self.chunk
    }

    /// Starts remembering recent changes of `table` (the table queued
    /// next), before its first chunk is requested.
    pub fn follow(&mut self, table: &Collection) {
        if self.table.as_ref() != Some(table) {
            self.recent.clear();
            self.table = Some(table.clone());
        }
    }

    /// A chunk of `table` was requested: changes count from now.
    pub fn requested(&mut self, id: u64, table: &Collection) {
        self.follow(table);
        self.chunk = Some(id);
        self.low_seen = false;
        self.changed.clear();
        self.changed_since = None;
        self.truncated = false;
    }

    /// Gives up the chunk in progress (its read failed; a new one follows).
    pub fn abandon(&mut self) {
        self.chunk = None;
        self.low_seen = false;
        self.changed.clear();
        self.changed_since = None;
        self.truncated = false;
    }

    /// Stops following any table (snapshot finished or stopped).
    pub fn idle(&mut self) {
        self.abandon();
        self.table = None;
        self.recent.clear();
    }

    /// A streamed change of `table` by transaction `xid`, committed at
    /// `commit_lsn`, touched `keys` (an update that moves a row touches its
    /// old and new key).
    pub fn streamed(&mut self, table: &Collection, xid: u32, keys: &[Key], commit_lsn: u64) {
        if self.table.as_ref() != Some(table) {
            return;
        }
        for key in keys {
            if self.chunk.is_some() {
                self.changed.insert(key.clone());
                self.changed_since =
                    Some(self.changed_since.map_or(commit_lsn, |s| s.min(commit_lsn)));
            }
            if self.recent_cap > 0 {
                if self.recent.len() == self.recent_cap {
                    self.recent.pop_front();
                }
                self.recent.push_back((xid, key.clone(), commit_lsn));
            }
        }
    }

    /// `table` was truncated by a streamed transaction.
    pub fn truncated(&mut self, table: &Collection) {
        if self.table.as_ref() == Some(table) && self.chunk.is_some() {
            self.truncated = true;
        }
    }

    /// The low watermark of chunk `id` came through the stream.
    pub fn low(&mut self, id: u64) -> Result<(), Stale> {
        if self.chunk != Some(id) {
            return Err(Stale::OtherChunk);
        }
        self.low_seen = true;
        Ok(())
    }

    /// The high watermark of `chunk.id` came through the stream: the rows
    /// that may go out. The window is then free for the next chunk.
    pub fn high<R>(&mut self, chunk: ChunkRead<R>) -> Result<Emit<R>, Stale> {
        if self.chunk != Some(chunk.id) {
            return Err(Stale::OtherChunk);
        }
        if !self.low_seen {
            return Err(Stale::OutOfOrder);
        }
        let read = chunk.rows.len();
        let last_key = chunk.rows.last().map(|(k, _)| k.clone());
        let mut late: HashSet<&Key> = HashSet::new();
        let mut earliest_kept_out: Option<u64> = self.changed_since;
        for (xid, key, at) in &self.recent {
            if !chunk.visibility.sees(*xid) {
                late.insert(key);
                earliest_kept_out = Some(earliest_kept_out.map_or(*at, |e| e.min(*at)));
            }
        }
        let mut rows = Vec::with_capacity(read);
        for (key, row) in chunk.rows {
            if !self.truncated && !self.changed.contains(&key) && !late.contains(&key) {
                rows.push(row);
            }
        }
        let dropped = read - rows.len();
        self.chunk = None;
        self.low_seen = false;
        self.changed.clear();
        self.changed_since = None;
        self.truncated = false;
        Ok(Emit {
            rows,
            read,
            dropped,
            last_key,
            earliest_kept_out,
        })
    }
}

/// One table to snapshot, with how far it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// `schema.table`.
    pub table: String,
    /// Optional row filter (`additional-conditions`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// Key of the last row of the last acknowledged chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Key>,
    /// Chunks done.
    #[serde(default)]
    pub chunks: u64,
    /// Rows read.
    #[serde(default)]
    pub rows: u64,
    /// A position before every change this snapshot's chunks could have
    /// missed: the first chunk's low watermark, lowered below the commit of
    /// any change a chunk's snapshot did not see. A row whose last event is
    /// older and that no chunk re-read was deleted before the snapshot;
    /// the snapshot-complete marker carries this position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
}

impl Job {
    /// The table as a [`Collection`] (`None` if the stored name is bad).
    pub fn collection(&self) -> Option<Collection> {
        Collection::parse(&self.table)
    }
}

/// Tables queued for an incremental snapshot; persisted as JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Tables in order; the first is in progress.
    #[serde(default)]
    pub queue: VecDeque<Job>,
    /// No new chunk while paused.
    #[serde(default)]
    pub paused: bool,
    /// Ids of the latest signals acted on: a signal re-sent after a restart
    /// (its transaction was not confirmed yet) is not applied twice.
    #[serde(default)]
    pub seen: VecDeque<String>,
}

/// How many signal ids [`Plan::seen`] keeps.
const SEEN_SIGNALS: usize = 64;

/// What applying a signal changed (for the log line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Tables added to the queue (already queued ones are not).
    Queued(Vec<String>),
    /// Tables removed.
    Stopped(Vec<String>),
    /// Paused.
    Paused,
    /// Resumed.
    Resumed,
    /// Nothing to do.
    Nothing,
}

impl Plan {
    /// Parses a persisted plan.
    pub fn from_json(text: &str) -> Result<Plan, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The persisted form.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }

    /// Applies a user signal.
    pub fn apply(&mut self, signal: &Signal) -> Applied {
        match signal {
            Signal::ExecuteSnapshot(requests) => {
                let mut added = Vec::new();
                for SnapshotRequest { collection, filter } in requests {
                    let name = collection.to_string();
                    if self.queue.iter().any(|j| j.table == name) {
                        continue;
                    }
                    self.queue.push_back(Job {
                        table: name.clone(),
                        filter: filter.clone(),
                        after: None,
                        chunks: 0,
                        rows: 0,
                        since: None,
                    });
                    added.push(name);
                }
                if added.is_empty() {
                    Applied::Nothing
                } else {
                    Applied::Queued(added)
                }
            }
            Signal::StopSnapshot(which) => {
                let before: Vec<String> = self.queue.iter().map(|j| j.table.clone()).collect();
                match which {
                    None => self.queue.clear(),
                    Some(list) => {
                        let names: Vec<String> = list.iter().map(ToString::to_string).collect();
                        self.queue.retain(|j| !names.contains(&j.table));
                    }
                }
                let stopped: Vec<String> = before
                    .into_iter()
                    .filter(|t| !self.queue.iter().any(|j| &j.table == t))
                    .collect();
                if stopped.is_empty() {
                    Applied::Nothing
                } else {
                    Applied::Stopped(stopped)
                }
            }
            Signal::PauseSnapshot if !self.paused => {
                self.paused = true;
                Applied::Paused
            }
            Signal::ResumeSnapshot if self.paused => {
                self.paused = false;
                Applied::Resumed
            }
            _ => Applied::Nothing,
        }
    }

    /// Records a signal id; `false` when it was acted on before.
    pub fn first_time(&mut self, id: &str) -> bool {
        if self.seen.iter().any(|s| s == id) {
            return false;
        }
        if self.seen.len() == SEEN_SIGNALS {
            self.seen.pop_front();
        }
        self.seen.push_back(id.to_owned());
        true
    }

    /// The job to read the next chunk of, unless paused or empty.
    pub fn next(&self) -> Option<&Job> {
        if self.paused {
            None
        } else {
            self.queue.front()
        }
    }

    /// A chunk of `table` went out: `read` rows (of at most `limit`), the
    /// last with `last_key`; `since` is the chunk's own bound for
    /// [`Job::since`]. Returns the job when the table is finished.
    pub fn chunk_done(
        &mut self,
        table: &str,
        read: usize,
        limit: usize,
        last_key: Option<Key>,
        since: u64,
    ) -> Option<Job> {
        let job = self.queue.front_mut().filter(|j| j.table == table)?;
        // A job resumed from progress saved without `since` (chunks done
        // before it was recorded) keeps none: its first chunks' bound is lost.
        job.since = match job.since {
            Some(s) => Some(s.min(since)),
            None if job.chunks == 0 => Some(since),
            None => None,
        };
        job.chunks += 1;
        job.rows += read as u64;
        if let Some(k) = last_key {
            job.after = Some(k);
        }
        if read < limit {
            self.queue.pop_front()
        } else {
            None
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn t() -> Collection {
        Collection::parse("public.product").unwrap()
    }

    fn k(i: u32) -> Key {
        vec![i.to_string()]
    }

    fn all_visible() -> Visibility {
        Visibility::parse("1000:1000:").unwrap()
    }

    fn chunk(id: u64, keys: &[u32], vis: Visibility) -> ChunkRead<u32> {
        ChunkRead {
            id,
            rows: keys.iter().map(|&i| (k(i), i)).collect(),
            visibility: vis,
        }
    }

    #[test]
    fn visibility_of_32_bit_xids() {
        let v = Visibility::parse("100:110:103,105").unwrap();
        assert!(v.sees(99));
        assert!(v.sees(104));
        assert!(!v.sees(103));
        assert!(!v.sees(105));
        assert!(!v.sees(110));
        assert!(!v.sees(200));
        // Epoch 1: full xids 2^32 + n, pgoutput sends the low 32 bits.
        let e = 1u64 << 32;
        let v = Visibility::parse(&format!("{}:{}:", e + 5, e + 9)).unwrap();
        assert!(v.sees(4));
        assert!(v.sees(u32::MAX), "the end of epoch 0 is older");
        assert!(!v.sees(9));
        assert!(Visibility::parse("1:2").is_none());
        assert!(Visibility::parse("a:2:").is_none());
    }

    #[test]
    fn a_key_streamed_inside_the_window_is_dropped() {
        let mut w = Window::new(100);
        w.requested(1, &t());
        w.low(1).unwrap();
        w.streamed(&t(), 500, &[k(2)], 0);
        let e = w.high(chunk(1, &[1, 2, 3], all_visible())).unwrap();
        assert_eq!(e.rows, vec![1, 3]);
        assert_eq!((e.read, e.dropped), (3, 1));
        assert_eq!(e.last_key, Some(k(3)));
    }

    #[test]
    fn a_change_streamed_after_the_request_but_before_the_low_watermark_also_wins() {
        let mut w = Window::new(0);
        w.requested(1, &t());
        w.streamed(&t(), 500, &[k(1)], 0);
        w.low(1).unwrap();
        let e = w.high(chunk(1, &[1, 2], all_visible())).unwrap();
        assert_eq!(e.rows, vec![2]);
    }

    #[test]
    fn a_change_streamed_before_the_request_but_invisible_to_the_chunk_wins() {
        let mut w = Window::new(100);
        w.requested(1, &t());
        w.high(chunk(1, &[], all_visible())).unwrap_err();
        w.low(1).unwrap();
        w.high(chunk(1, &[], all_visible())).unwrap();
        // Streamed between chunks: xid 120 committed in the WAL but still
        // running for the next chunk's snapshot.
        w.streamed(&t(), 120, &[k(7)], 0);
        w.streamed(&t(), 90, &[k(8)], 0);
        w.requested(2, &t());
        w.low(2).unwrap();
        let vis = Visibility::parse("100:130:120").unwrap();
        let e = w.high(chunk(2, &[7, 8, 9], vis)).unwrap();
        assert_eq!(e.rows, vec![8, 9]);
    }

    #[test]
    fn the_earliest_commit_a_chunk_did_not_see_bounds_its_snapshot() {
        let mut w = Window::new(100);
        w.follow(&t());
        w.streamed(&t(), 120, &[k(7)], 5_000);
        w.streamed(&t(), 121, &[k(9)], 4_000);
        w.streamed(&t(), 90, &[k(8)], 3_000);
        w.requested(1, &t());
        w.low(1).unwrap();
        // 120 and 121 committed in the WAL, still running for the chunk.
        let vis = Visibility::parse("100:130:120,121").unwrap();
        let e = w.high(chunk(1, &[7, 8], vis)).unwrap();
        assert_eq!(e.earliest_kept_out, Some(4_000));
        w.requested(2, &t());
        w.low(2).unwrap();
        let e = w.high(chunk(2, &[10], all_visible())).unwrap();
        assert_eq!(e.earliest_kept_out, None, "every recent change visible");
        // Streamed after the request, before the low watermark: it keeps
        // its row out of the chunk, and its commit may precede the low one.
        w.requested(3, &t());
        w.streamed(&t(), 140, &[k(11)], 6_000);
        w.low(3).unwrap();
        w.streamed(&t(), 141, &[k(12)], 7_000);
        let e = w.high(chunk(3, &[11, 12, 13], all_visible())).unwrap();
        assert_eq!(e.rows, vec![13]);
        assert_eq!(e.earliest_kept_out, Some(6_000));
    }

    #[test]
    fn other_tables_and_stale_watermarks_change_nothing() {
        let mut w = Window::new(10);
        w.requested(3, &t());
        assert_eq!(w.low(2), Err(Stale::OtherChunk));
        w.low(3).unwrap();
        w.streamed(&Collection::parse("public.buyer").unwrap(), 1, &[k(1)], 0);
        assert_eq!(
            w.high(chunk(2, &[1], all_visible())).unwrap_err(),
            Stale::OtherChunk
        );
        let e = w.high(chunk(3, &[1], all_visible())).unwrap();
        assert_eq!(e.rows, vec![1]);
        assert_eq!(w.chunk(), None);
    }

    #[test]
    fn a_truncate_in_the_window_drops_the_whole_chunk() {
        let mut w = Window::new(10);
        w.requested(1, &t());
        w.low(1).unwrap();
        w.truncated(&t());
        let e = w.high(chunk(1, &[1, 2], all_visible())).unwrap();
        assert!(e.rows.is_empty());
        assert_eq!(e.last_key, Some(k(2)));
    }

    #[test]
    fn plan_queue_stop_pause_resume_and_persisted_form() {
        let mut p = Plan::default();
        let exec = Signal::parse(
            "1",
            "execute-snapshot",
            Some(r#"{"data-collections":["public.a","public.b"]}"#),
        )
        .unwrap();
        assert_eq!(
            p.apply(&exec),
            Applied::Queued(vec!["public.a".into(), "public.b".into()])
        );
        assert_eq!(p.apply(&exec), Applied::Nothing, "queued once");
        assert!(p.first_time("sig-1"));
        assert!(!p.first_time("sig-1"), "a re-sent signal is seen");
        assert_eq!(p.next().unwrap().table, "public.a");
        assert!(p.chunk_done("public.a", 10, 10, Some(k(10)), 500).is_none());
        assert_eq!(p.next().unwrap().after, Some(k(10)));
        let back = Plan::from_json(&p.to_json()).unwrap();
        assert_eq!(back, p);
        assert_eq!(p.apply(&Signal::PauseSnapshot), Applied::Paused);
        assert!(p.next().is_none());
        assert_eq!(p.apply(&Signal::ResumeSnapshot), Applied::Resumed);
        let done = p.chunk_done("public.a", 3, 10, Some(k(13)), 400).unwrap();
        assert_eq!((done.chunks, done.rows, done.since), (2, 13, Some(400)));
        // Progress saved before `since` existed: the bound stays unknown.
        let mut old = Plan::from_json(
            r#"{"queue":[{"table":"public.c","after":["5"],"chunks":3,"rows":30}]}"#,
        )
        .unwrap();
        let done = old.chunk_done("public.c", 1, 10, Some(k(6)), 100).unwrap();
        assert_eq!(done.since, None);
        assert_eq!(p.next().unwrap().table, "public.b");
        assert_eq!(
            p.apply(&Signal::StopSnapshot(None)),
            Applied::Stopped(vec!["public.b".into()])
        );
        assert!(p.next().is_none());
    }

    /// One step of a random run: the stream changes a key (with a new
    /// value), or the chunk reader takes its snapshot, or a watermark.
    #[derive(Debug, Clone)]
    enum Step {
        Change(u32),
        Delete(u32),
    }

    fn steps() -> impl Strategy<Value = (Vec<Step>, Vec<Step>, Vec<Step>, usize)> {
        let step = prop_oneof![
            3 => (0u32..12).prop_map(Step::Change),
            1 => (0u32..12).prop_map(Step::Delete),
        ];
        (
            prop::collection::vec(step.clone(), 0..20),
            prop::collection::vec(step.clone(), 0..20),
            prop::collection::vec(step, 0..20),
            0usize..4,
        )
    }

    /// The simulated database, stream and consumer of one random run.
    struct Sim {
        /// key -> version: the table as committed (WAL order).
        table: HashMap<u32, u64>,
        /// What a new snapshot sees: commits become visible `lag` steps
        /// after they reached the WAL (and the stream).
        visible: HashMap<u32, u64>,
        /// Committed but not yet visible: (xid, step, version).
        invisible: Vec<(u32, Step, u64)>,
        /// The consumer's state after replaying the topic; it never saw
        /// the rows that existed before streaming began.
        consumer: HashMap<u32, u64>,
        version: u64,
        xid: u32,
        lag: usize,
    }

    impl Sim {
        fn commit(&mut self, step: &Step, w: &mut Window) {
            self.version += 1;
            self.xid += 1;
            let key = match step {
                Step::Change(k) => {
                    self.table.insert(*k, self.version);
                    self.consumer.insert(*k, self.version);
                    *k
                }
                Step::Delete(k) => {
                    self.table.remove(k);
                    self.consumer.remove(k);
                    *k
                }
            };
            w.streamed(
                &t(),
                self.xid,
                &[vec![key.to_string()]],
                u64::from(self.xid),
            );
            self.invisible.push((self.xid, step.clone(), self.version));
            while self.invisible.len() > self.lag {
                let (_, s, v) = self.invisible.remove(0);
                match s {
                    Step::Change(k) => {
                        self.visible.insert(k, v);
                    }
                    Step::Delete(k) => {
                        self.visible.remove(&k);
                    }
                }
            }
        }
    }

    proptest! {
        /// Random interleavings of streamed changes around one chunk, with
        /// the chunk's snapshot taken at a random point inside the window
        /// and commits that reach the stream before they become visible:
        /// replaying the stream and the emitted chunk rows in stream order
        /// always ends at the table's state, so no chunk row is older than
        /// a streamed change of the same key, and no row is missed.
        #[test]
        fn replay_of_stream_and_chunk_equals_the_table(
            (before, window, after, lag) in steps(),
            split in 0usize..20,
        ) {
            let start: HashMap<u32, u64> = (0..10).map(|i| (i, 0)).collect();
            let mut sim = Sim {
                table: start.clone(),
                visible: start,
                invisible: Vec::new(),
                consumer: HashMap::new(),
                version: 0,
                xid: 100,
                lag,
            };
            let mut w = Window::new(64);
            w.follow(&t());
            for s in &before {
                sim.commit(s, &mut w);
            }
            w.requested(1, &t());
            w.low(1).unwrap();
            let split = split.min(window.len());
            for s in &window[..split] {
                sim.commit(s, &mut w);
            }
            // The chunk's snapshot: what is visible now; the xids still
            // in flight are in xip.
            let xip: Vec<String> = sim.invisible.iter().map(|(x, _, _)| x.to_string()).collect();
            let vis = Visibility::parse(&format!("1:{}:{}", sim.xid + 1, xip.join(","))).unwrap();
            let mut rows: Vec<(Key, (u32, u64))> = sim
                .visible
                .iter()
                .map(|(k, v)| (vec![k.to_string()], (*k, *v)))
                .collect();
            rows.sort_by_key(|(_, (k, _))| *k);
            for s in &window[split..] {
                sim.commit(s, &mut w);
            }
            let emit = w.high(ChunkRead { id: 1, rows, visibility: vis }).unwrap();
            // The consumer applies the chunk rows at the high watermark.
            for (k, v) in emit.rows {
                sim.consumer.insert(k, v);
            }
            for s in &after {
                sim.commit(s, &mut w);
            }
            prop_assert_eq!(&sim.consumer, &sim.table);
        }
    }
}
