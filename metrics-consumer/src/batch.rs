//! A batch: the decoded messages the consumer applies to Redis in one atomic
//! step, in Kafka order per partition, and what applying it counted.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::fold::{Change, Code, RowState, Table};

/// What a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Events whose effect was applied.
    pub applied: u64,
    /// Re-deliveries (offset already applied) and re-sends (older LSN).
    pub duplicates: u64,
    /// Bad messages counted.
    pub bad: u64,
    /// Tombstones and other no-op messages.
    pub skipped: u64,
}

/// One message of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Index into [`Batch::tps`].
    pub tp: usize,
    /// Kafka offset.
    pub offset: i64,
    /// The decoded change; `None` for a bad message (counted only).
    pub change: Option<Change>,
}

/// One batch of messages in Kafka order per partition.
#[derive(Debug, Default)]
pub struct Batch {
    tps: Vec<(String, i32)>,
    tp_index: HashMap<(String, i32), usize>,
    entries: Vec<Entry>,
    /// Next offset per topic/partition after this batch.
    pub next_offsets: HashMap<(String, i32), i64>,
    /// Messages per table, for the per-table counters.
    pub per_table: [u64; 9],
    /// Number of messages.
    pub len: usize,
    /// Largest source ts_ms seen, for latency metrics.
    pub max_ts_ms: Option<i64>,
}

/// The name of a topic/partition in the offsets hash.
pub fn tp_field(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

/// The product ids a row state takes part in the category join with: its
/// GMV tokens (details) and its category token (products).
pub fn join_products(state: &RowState) -> impl Iterator<Item = &str> {
    state.contributions.iter().filter_map(|c| match c.code {
        Code::ProductGmv => Some(c.field.as_str()),
        Code::ProductCategory => c.field.split('\x1d').next(),
        _ => None,
    })
}

impl Batch {
    /// Adds one message: its decoded change, or `None` for a bad message.
    pub fn push(&mut self, topic: &str, partition: i32, offset: i64, change: Option<Change>) {
        // Most messages come from the partition of the previous one.
        let tp = match self.entries.last() {
            Some(last) if self.tps[last.tp].1 == partition && self.tps[last.tp].0 == topic => {
                last.tp
            }
            _ => {
                let key = (topic.to_owned(), partition);
                match self.tp_index.get(&key) {
                    Some(i) => *i,
                    None => {
                        self.tps.push(key.clone());
                        let i = self.tps.len() - 1;
                        self.tp_index.insert(key, i);
                        i
                    }
                }
            }
        };
        match self.next_offsets.get_mut(&self.tps[tp]) {
            Some(next) => *next = offset + 1,
            None => {
                self.next_offsets.insert(self.tps[tp].clone(), offset + 1);
            }
        }
        self.len += 1;
        match &change {
            Some(Change::Row { table, ts_ms, .. }) => {
                self.per_table[table.index()] += 1;
                self.max_ts_ms = self.max_ts_ms.max(*ts_ms);
            }
            Some(Change::Truncate { table, .. }) => self.per_table[table.index()] += 1,
            _ => {}
        }
        self.entries.push(Entry { tp, offset, change });
    }

    /// Whether the batch holds no message.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The batch's topic/partitions; [`Entry::tp`] indexes this.
    pub fn tps(&self) -> &[(String, i32)] {
        &self.tps
    }

    /// The messages, in the order they were pushed.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Distinct row ids per table of the batch's row changes: the prior
    /// states to read.
    pub fn row_ids(&self) -> BTreeMap<Table, Vec<&str>> {
        let mut seen: BTreeSet<(Table, &str)> = BTreeSet::new();
        let mut out: BTreeMap<Table, Vec<&str>> = BTreeMap::new();
        for e in &self.entries {
            if let Some(Change::Row { table, id, .. }) = &e.change
                && seen.insert((*table, id.as_str()))
            {
                out.entry(*table).or_default().push(id.as_str());
            }
        }
        out
    }

    /// Tables truncated in this batch (their whole row-state hash is read).
    pub fn truncated_tables(&self) -> BTreeSet<Table> {
        self.entries
            .iter()
            .filter_map(|e| match &e.change {
                Some(Change::Truncate { table, .. }) => Some(*table),
                _ => None,
            })
            .collect()
    }

    /// Product ids the batch's new row states join on.
    pub fn join_products(&self) -> BTreeSet<&str> {
        self.entries
            .iter()
            .filter_map(|e| match &e.change {
                Some(Change::Row { state, .. }) => Some(join_products(state)),
                _ => None,
            })
            .flatten()
            .collect()
    }
}
