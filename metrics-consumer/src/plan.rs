//! The apply plan of one batch, computed in Rust from the Redis values the
//! batch depends on, and checked and written by one Lua call (`store.lua`).
//!
//! Why: parsing contribution strings inside Lua cost ~8.6 µs per event. Here
//! the store reads the prior row states and join inputs a batch touches
//! (pipelined HMGETs), [`build`] folds the batch with the reference fold
//! ([`MemStore`]) into the new row states and *aggregated* metric deltas
//! (one HINCRBY per metric field, summed over the batch), and the script only
//! compares and writes.
//!
//! Why it stays exact with several consumers and re-deliveries: the reads are
//! not atomic, so the plan carries every value it was computed from
//! ([`Check`]: offsets, row states, join inputs, whole hashes for truncates).
//! The script compares them with Redis's current values before writing
//! anything; equal inputs give the same plan, so applying it then is exactly
//! what an atomic read-fold-write would do. On any difference the script
//! writes nothing and the store re-reads and re-plans.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::Error;
use crate::batch::{Applied, Batch, join_products, tp_field};
use crate::fold::{Change, MemStore, RowState, Table, decode_state, encode_state};

/// Most fields or pairs per Redis command in the script (Lua's `unpack`
/// has a stack limit of a few thousand values).
pub const CHUNK: usize = 500;

/// The Redis values a batch depends on, as read before planning.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Stored next offset per topic/partition, in [`Batch::tps`] order
    /// (`None`: never applied).
    pub offsets: Vec<Option<String>>,
    /// Stored row state per table and id (`None`: no state yet).
    pub rows: BTreeMap<(Table, String), Option<String>>,
    /// Whole row-state hashes of the tables the batch truncates.
    pub tables: BTreeMap<Table, Vec<(String, String)>>,
    /// Join input: per-product GMV cents.
    pub product_gmv: BTreeMap<String, Option<String>>,
    /// Join input: product → category.
    pub product_category: BTreeMap<String, Option<String>>,
}

impl Snapshot {
    /// Product ids the plan needs whose join inputs were not read yet: those
    /// of the batch's new states and of the prior states read.
    pub fn missing_products(&self, batch: &Batch) -> Vec<String> {
        let mut need: BTreeSet<String> = batch
            .join_products()
            .into_iter()
            .map(str::to_owned)
            .collect();
        // Only details and products take part in the join.
        let joined = |t: &Table| matches!(t, Table::Product | Table::TransactionDetail);
        for text in self
            .rows
            .iter()
            .filter(|((t, _), _)| joined(t))
            .filter_map(|(_, v)| v.as_ref())
            .chain(
                self.tables
                    .iter()
                    .filter(|(t, _)| joined(t))
                    .flat_map(|(_, all)| all.iter().map(|(_, v)| v)),
            )
        {
            if let Some(state) = decode_state(text) {
                need.extend(join_products(&state).map(str::to_owned));
            }
        }
        need.into_iter()
            .filter(|p| !self.product_gmv.contains_key(p) || !self.product_category.contains_key(p))
            .collect()
    }
}

/// A value the plan was computed from; the script compares before writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// These hash fields hold exactly these values.
    Equal {
        /// Hash key.
        key: String,
        /// (field, value) pairs.
        pairs: Vec<(String, String)>,
    },
    /// These hash fields do not exist.
    Absent {
        /// Hash key.
        key: String,
        /// Fields.
        fields: Vec<String>,
    },
    /// The hash has exactly this many fields (with `Equal` on all of them:
    /// the whole hash is as read).
    Len {
        /// Hash key.
        key: String,
        /// Field count.
        len: usize,
    },
}

/// A write of the plan, done only when every [`Check`] holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// DEL (a truncated table's row states).
    Del {
        /// Key.
        key: String,
    },
    /// HSET of (field, value) pairs.
    HSet {
        /// Hash key.
        key: String,
        /// Pairs.
        pairs: Vec<(String, String)>,
    },
    /// HDEL of fields.
    HDel {
        /// Hash key.
        key: String,
        /// Fields.
        fields: Vec<String>,
    },
    /// HINCRBY per (field, amount).
    HIncrBy {
        /// Hash key.
        key: String,
        /// (field, amount) pairs.
        pairs: Vec<(String, i64)>,
    },
    /// INCRBY.
    IncrBy {
        /// Key.
        key: String,
        /// Amount.
        amount: i64,
    },
    /// EXPIREAT (unix seconds).
    ExpireAt {
        /// Key.
        key: String,
        /// When.
        at: i64,
    },
}

/// The plan of one batch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Values the plan depends on.
    pub checks: Vec<Check>,
    /// Writes, in order (deletes before the row states written after them).
    pub writes: Vec<Write>,
    /// What applying the plan counts.
    pub counts: Applied,
}

/// Where a truncated window's key expires: an hour after the window ends.
const WINDOW_TTL_S: i64 = 3600;
const WINDOW: &str = "window:30s:";

fn rows_key(prefix: &str, table: Table) -> String {
    format!("{prefix}rows:{}", table.qualified())
}

fn state_of(table: Table, id: &str, text: &str) -> Result<RowState, Error> {
    decode_state(text).ok_or_else(|| Error::StoredState {
        key: format!("rows:{}", table.qualified()),
        field: id.to_owned(),
    })
}

fn check_hash<'a>(
    checks: &mut Vec<Check>,
    key: &str,
    values: impl Iterator<Item = (&'a str, &'a Option<String>)>,
) {
    let mut equal = Vec::new();
    let mut absent = Vec::new();
    for (field, value) in values {
        match value {
            Some(v) => equal.push((field.to_owned(), v.clone())),
            None => absent.push(field.to_owned()),
        }
    }
    for pairs in chunks(equal) {
        checks.push(Check::Equal {
            key: key.to_owned(),
            pairs,
        });
    }
    for fields in chunks(absent) {
        checks.push(Check::Absent {
            key: key.to_owned(),
            fields,
        });
    }
}

fn chunks<T>(items: Vec<T>) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        out.push(items.by_ref().take(CHUNK).collect());
    }
    out
}

/// Folds the batch over the snapshot: the checks, the writes and the counts.
/// Pure: the same batch and snapshot always give the same plan.
pub fn build(batch: &Batch, snap: &Snapshot, prefix: &str, now_ms: i64) -> Result<Plan, Error> {
    require_complete(batch, snap)?;
    let folded = fold_batch(batch, snap, prior(snap)?)?;
    let tp_names: Vec<String> = batch.tps().iter().map(|(t, p)| tp_field(t, *p)).collect();
    let mut writes = state_writes(&folded, snap, prefix);
    writes.extend(metric_writes(&folded.mem, prefix));
    writes.extend(progress_writes(&folded, tp_names.clone(), prefix, now_ms));
    Ok(Plan {
        checks: checks(snap, &tp_names, prefix),
        writes,
        counts: folded.counts,
    })
}

/// The fold needs every input read: a missing one would fold against a
/// made-up empty value.
fn require_complete(batch: &Batch, snap: &Snapshot) -> Result<(), Error> {
    if !snap.missing_products(batch).is_empty()
        || snap.offsets.len() != batch.tps().len()
        || batch.entries().iter().any(|e| match &e.change {
            Some(Change::Row { table, id, .. }) => !snap.rows.contains_key(&(*table, id.clone())),
            Some(Change::Truncate { table, .. }) => !snap.tables.contains_key(table),
            _ => false,
        })
    {
        return Err(Error::Internal(
            "apply plan built from an incomplete snapshot".into(),
        ));
    }
    Ok(())
}

/// The reference store holding the values read: row states and join inputs.
fn prior(snap: &Snapshot) -> Result<MemStore, Error> {
    let mut mem = MemStore::default();
    for ((table, id), text) in &snap.rows {
        if let Some(text) = text {
            mem.rows
                .insert((*table, id.clone()), state_of(*table, id, text)?);
        }
    }
    for (table, all) in &snap.tables {
        mem.rows.retain(|(t, _), _| t != table);
        for (id, text) in all {
            mem.rows
                .insert((*table, id.clone()), state_of(*table, id, text)?);
        }
    }
    for (pid, text) in &snap.product_gmv {
        if let Some(text) = text {
            let cents = text.parse().map_err(|_| Error::StoredState {
                key: "join:product_gmv_cents".into(),
                field: pid.clone(),
            })?;
            mem.product_gmv.insert(pid.clone(), cents);
        }
    }
    for (pid, category) in &snap.product_category {
        if let Some(category) = category {
            mem.product_category.insert(pid.clone(), category.clone());
        }
    }
    Ok(mem)
}

/// The batch folded over the values read.
struct BatchFold {
    /// Row states, join inputs and summed metric deltas after the batch.
    mem: MemStore,
    /// Next offset per topic/partition ([`Batch::tps`] order).
    next: Vec<i64>,
    /// Whether the batch moved that offset.
    moved: Vec<bool>,
    counts: Applied,
    /// Commit time of the last applied event.
    last_ts: Option<i64>,
    /// Rows whose state the batch changed.
    written: BTreeSet<(Table, String)>,
    /// Tables whose whole row-state hash is deleted (positionless truncates).
    truncated: BTreeSet<Table>,
}

fn fold_batch(batch: &Batch, snap: &Snapshot, mut mem: MemStore) -> Result<BatchFold, Error> {
    let mut next = Vec::with_capacity(snap.offsets.len());
    for (i, stored) in snap.offsets.iter().enumerate() {
        next.push(match stored {
            None => -1,
            Some(text) => text.parse::<i64>().map_err(|_| Error::StoredState {
                key: "offsets".into(),
                field: tp_field(&batch.tps()[i].0, batch.tps()[i].1),
            })?,
        });
    }
    let mut moved = vec![false; next.len()];
    let mut counts = Applied::default();
    let mut last_ts: Option<i64> = None;
    let mut written: BTreeSet<(Table, String)> = BTreeSet::new();
    let mut truncated: BTreeSet<Table> = BTreeSet::new();
    for e in batch.entries() {
        if e.offset < next[e.tp] {
            // Re-delivered: this offset was applied already.
            counts.duplicates += 1;
            continue;
        }
        next[e.tp] = e.offset + 1;
        moved[e.tp] = true;
        match &e.change {
            None => counts.bad += 1,
            Some(Change::Tombstone | Change::Ignored) => counts.skipped += 1,
            Some(
                change @ Change::Row {
                    table, id, ts_ms, ..
                },
            ) => {
                let before = mem.duplicates;
                mem.apply(change);
                if mem.duplicates > before {
                    counts.duplicates += 1;
                } else {
                    counts.applied += 1;
                    written.insert((*table, id.clone()));
                    last_ts = ts_ms.or(last_ts);
                }
            }
            Some(Change::Truncate {
                table,
                position,
                ts_ms,
            }) => {
                let changed = mem.truncate(*table, *position);
                if position.is_some() {
                    // Retracted rows stay, deleted at the truncate's position.
                    written.extend(changed.into_iter().map(|id| (*table, id)));
                } else {
                    written.retain(|(t, _)| t != table);
                    truncated.insert(*table);
                }
                counts.applied += 1;
                last_ts = ts_ms.or(last_ts);
            }
        }
    }
    Ok(BatchFold {
        mem,
        next,
        moved,
        counts,
        last_ts,
        written,
        truncated,
    })
}

/// Every value the plan was computed from.
fn checks(snap: &Snapshot, tp_names: &[String], prefix: &str) -> Vec<Check> {
    let mut checks = Vec::new();
    check_hash(
        &mut checks,
        &format!("{prefix}offsets"),
        tp_names.iter().map(String::as_str).zip(&snap.offsets),
    );
    let mut per_table: BTreeMap<Table, Vec<(&str, &Option<String>)>> = BTreeMap::new();
    for ((table, id), value) in &snap.rows {
        per_table.entry(*table).or_default().push((id, value));
    }
    for (table, values) in per_table {
        check_hash(&mut checks, &rows_key(prefix, table), values.into_iter());
    }
    for (table, all) in &snap.tables {
        let key = rows_key(prefix, *table);
        checks.push(Check::Len {
            key: key.clone(),
            len: all.len(),
        });
        let values: Vec<(String, Option<String>)> = all
            .iter()
            .map(|(id, v)| (id.clone(), Some(v.clone())))
            .collect();
        check_hash(
            &mut checks,
            &key,
            values.iter().map(|(id, v)| (id.as_str(), v)),
        );
    }
    check_hash(
        &mut checks,
        &format!("{prefix}join:product_gmv_cents"),
        snap.product_gmv.iter().map(|(p, v)| (p.as_str(), v)),
    );
    check_hash(
        &mut checks,
        &format!("{prefix}join:product_category"),
        snap.product_category.iter().map(|(p, v)| (p.as_str(), v)),
    );
    checks
}

/// Row states and join inputs after the batch (deletes first).
fn state_writes(folded: &BatchFold, snap: &Snapshot, prefix: &str) -> Vec<Write> {
    let mem = &folded.mem;
    let mut writes = Vec::new();
    for table in &folded.truncated {
        writes.push(Write::Del {
            key: rows_key(prefix, *table),
        });
    }
    let mut row_writes: BTreeMap<Table, Vec<(String, String)>> = BTreeMap::new();
    for key in &folded.written {
        if let Some(state) = mem.rows.get(key) {
            row_writes
                .entry(key.0)
                .or_default()
                .push((key.1.clone(), encode_state(state)));
        }
    }
    for (table, pairs) in row_writes {
        for pairs in chunks(pairs) {
            writes.push(Write::HSet {
                key: rows_key(prefix, table),
                pairs,
            });
        }
    }
    let gmv_key = format!("{prefix}join:product_gmv_cents");
    let cat_key = format!("{prefix}join:product_category");
    let gmv_sets: Vec<(String, String)> = mem
        .product_gmv
        .iter()
        .map(|(p, c)| (p.clone(), c.to_string()))
        .filter(|(p, c)| snap.product_gmv.get(p).and_then(Option::as_ref) != Some(c))
        .collect();
    for pairs in chunks(gmv_sets) {
        writes.push(Write::HSet {
            key: gmv_key.clone(),
            pairs,
        });
    }
    let cat_sets: Vec<(String, String)> = mem
        .product_category
        .iter()
        .filter(|(p, c)| snap.product_category.get(*p).and_then(Option::as_ref) != Some(*c))
        .map(|(p, c)| (p.clone(), c.clone()))
        .collect();
    for pairs in chunks(cat_sets) {
        writes.push(Write::HSet {
            key: cat_key.clone(),
            pairs,
        });
    }
    let cat_dels: Vec<String> = snap
        .product_category
        .iter()
        .filter(|(p, c)| c.is_some() && !mem.product_category.contains_key(*p))
        .map(|(p, _)| p.clone())
        .collect();
    for fields in chunks(cat_dels) {
        writes.push(Write::HDel {
            key: cat_key.clone(),
            fields,
        });
    }
    writes
}

/// The consumed offsets and the pipeline counters.
fn progress_writes(
    folded: &BatchFold,
    tp_names: Vec<String>,
    prefix: &str,
    now_ms: i64,
) -> Vec<Write> {
    let mut writes = Vec::new();
    let offsets: Vec<(String, String)> = tp_names
        .into_iter()
        .zip(&folded.next)
        .zip(&folded.moved)
        .filter(|(_, m)| **m)
        .map(|((name, n), _)| (name, n.to_string()))
        .collect();
    for pairs in chunks(offsets) {
        writes.push(Write::HSet {
            key: format!("{prefix}offsets"),
            pairs,
        });
    }
    let pipeline = format!("{prefix}pipeline");
    let counts = folded.counts;
    let stats: Vec<(String, i64)> = [
        ("events_applied", counts.applied),
        ("duplicates_skipped", counts.duplicates),
        ("bad_messages", counts.bad),
        ("tombstones_skipped", counts.skipped),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .map(|(f, n)| (f.to_owned(), n as i64))
    .collect();
    if !stats.is_empty() {
        writes.push(Write::HIncrBy {
            key: pipeline.clone(),
            pairs: stats,
        });
    }
    if let Some(ts) = folded.last_ts {
        writes.push(Write::HSet {
            key: pipeline,
            pairs: vec![
                ("last_source_ts_ms".into(), ts.to_string()),
                ("lag_ms".into(), (now_ms - ts).to_string()),
                ("last_applied_at_ms".into(), now_ms.to_string()),
            ],
        });
    }
    writes
}

/// The batch's summed metric deltas as Redis increments. [`MemStore`] names
/// a metric `key` or `key|field` (hash); window keys also get their expiry.
fn metric_writes(mem: &MemStore, prefix: &str) -> Vec<Write> {
    let mut hashes: BTreeMap<&str, Vec<(String, i64)>> = BTreeMap::new();
    let mut out = Vec::new();
    let mut windows: BTreeSet<&str> = BTreeSet::new();
    for (name, amount) in &mem.metrics {
        match name.split_once('|') {
            Some((key, field)) => {
                if let Some(start) = key.strip_prefix(WINDOW) {
                    windows.insert(start);
                }
                if *amount != 0 {
                    hashes
                        .entry(key)
                        .or_default()
                        .push((field.to_owned(), *amount));
                }
            }
            None if *amount != 0 => out.push(Write::IncrBy {
                key: format!("{prefix}{name}"),
                amount: *amount,
            }),
            None => {}
        }
    }
    for (key, pairs) in hashes {
        for pairs in chunks(pairs) {
            out.push(Write::HIncrBy {
                key: format!("{prefix}{key}"),
                pairs,
            });
        }
    }
    for start in windows {
        if let Ok(s) = start.parse::<i64>() {
            out.push(Write::ExpireAt {
                key: format!("{prefix}{WINDOW}{start}"),
                at: s + 30 + WINDOW_TTL_S,
            });
        }
    }
    out
}

impl Plan {
    /// The script's ARGV: the number of check values, the checks, then the
    /// writes; each as `op, key, n, values...` (see `store.lua`).
    pub fn script_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.emit_args(|a| out.push(a.to_owned()));
        out
    }

    /// [`Plan::script_args`], one value at a time (no copy per value: the
    /// caller appends them to the command buffer).
    pub fn emit_args(&self, mut push: impl FnMut(&str)) {
        // Integers formatted on the stack: a batch has thousands of them.
        let num = |push: &mut dyn FnMut(&str), n: i64| {
            push(itoa::Buffer::new().format(n));
        };
        let check_values: usize = self
            .checks
            .iter()
            .map(|c| {
                3 + match c {
                    Check::Equal { pairs, .. } => 2 * pairs.len(),
                    Check::Absent { fields, .. } => fields.len(),
                    Check::Len { .. } => 0,
                }
            })
            .sum();
        num(&mut push, check_values as i64);
        let op = |push: &mut dyn FnMut(&str), name: &str, key: &str, n: usize| {
            push(name);
            push(key);
            num(push, n as i64);
        };
        for c in &self.checks {
            match c {
                Check::Equal { key, pairs } => {
                    op(&mut push, "eq", key, pairs.len());
                    pairs.iter().for_each(|(f, _)| push(f));
                    pairs.iter().for_each(|(_, v)| push(v));
                }
                Check::Absent { key, fields } => {
                    op(&mut push, "absent", key, fields.len());
                    fields.iter().for_each(|f| push(f));
                }
                Check::Len { key, len } => op(&mut push, "hlen", key, *len),
            }
        }
        for w in &self.writes {
            match w {
                Write::Del { key } => op(&mut push, "del", key, 0),
                Write::HSet { key, pairs } => {
                    op(&mut push, "hset", key, pairs.len());
                    for (f, v) in pairs {
                        push(f);
                        push(v);
                    }
                }
                Write::HDel { key, fields } => {
                    op(&mut push, "hdel", key, fields.len());
                    fields.iter().for_each(|f| push(f));
                }
                Write::HIncrBy { key, pairs } => {
                    op(&mut push, "hincrby", key, pairs.len());
                    for (f, n) in pairs {
                        push(f);
                        num(&mut push, *n);
                    }
                }
                Write::IncrBy { key, amount } => {
                    op(&mut push, "incrby", key, 1);
                    num(&mut push, *amount);
                }
                Write::ExpireAt { key, at } => {
                    op(&mut push, "expireat", key, 1);
                    num(&mut push, *at);
                }
            }
        }
    }
}

/// The hash fields a plan writes, to plan the next batch before this one's
/// script has run: the next batch's reads may come before that script, and
/// the overlay makes them as if after it. Safe either way: if the script
/// does not write (conflict), the next plan's checks fail too and it is
/// re-planned from fresh reads.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// Key → field → value after the plan (`None`: deleted).
    fields: HashMap<String, HashMap<String, Option<String>>>,
    /// Keys the plan deletes whole (truncates): fields not rewritten are gone.
    deleted: HashSet<String>,
}

impl Overlay {
    /// What `plan` leaves in the hashes it writes.
    pub fn of(plan: &Plan) -> Overlay {
        let mut o = Overlay::default();
        for w in &plan.writes {
            match w {
                Write::Del { key } => {
                    o.fields.remove(key);
                    o.deleted.insert(key.clone());
                }
                Write::HSet { key, pairs } => {
                    let f = o.fields.entry(key.clone()).or_default();
                    for (field, value) in pairs {
                        f.insert(field.clone(), Some(value.clone()));
                    }
                }
                Write::HDel { key, fields } => {
                    let f = o.fields.entry(key.clone()).or_default();
                    for field in fields {
                        f.insert(field.clone(), None);
                    }
                }
                // Counters are added to, never read by a plan.
                Write::HIncrBy { .. } | Write::IncrBy { .. } | Write::ExpireAt { .. } => {}
            }
        }
        o
    }

    /// The value after the plan, if the plan decides it.
    fn get(&self, key: &str, field: &str) -> Option<Option<&String>> {
        match self.fields.get(key).and_then(|f| f.get(field)) {
            Some(v) => Some(v.as_ref()),
            None if self.deleted.contains(key) => Some(None),
            None => None,
        }
    }

    /// Replaces the values read by those the plan writes.
    pub fn apply(&self, snap: &mut Snapshot, batch: &Batch, prefix: &str) {
        let offsets = format!("{prefix}offsets");
        for ((topic, partition), value) in batch.tps().iter().zip(snap.offsets.iter_mut()) {
            if let Some(v) = self.get(&offsets, &tp_field(topic, *partition)) {
                *value = v.cloned();
            }
        }
        for ((table, id), value) in &mut snap.rows {
            if let Some(v) = self.get(&rows_key(prefix, *table), id) {
                *value = v.cloned();
            }
        }
        for (table, all) in &mut snap.tables {
            let key = rows_key(prefix, *table);
            if self.deleted.contains(&key) {
                all.clear();
            }
            if let Some(fields) = self.fields.get(&key) {
                all.retain(|(id, _)| !fields.contains_key(id));
                for (id, v) in fields {
                    if let Some(v) = v {
                        all.push((id.clone(), v.clone()));
                    }
                }
            }
        }
        let gmv = format!("{prefix}join:product_gmv_cents");
        for (pid, value) in &mut snap.product_gmv {
            if let Some(v) = self.get(&gmv, pid) {
                *value = v.cloned();
            }
        }
        let cat = format!("{prefix}join:product_category");
        for (pid, value) in &mut snap.product_category {
            if let Some(v) = self.get(&cat, pid) {
                *value = v.cloned();
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::fold::{Code, Contribution, Position};

    const P: &str = "m:";

    fn c(code: Code, field: &str, amount: i64) -> Contribution {
        Contribution {
            code,
            field: field.to_owned(),
            amount,
        }
    }

    fn tx(status: &str, cents: i64, lsn: u64) -> RowState {
        let mut contributions = vec![
            c(Code::Count, "instashop.transaction", 1),
            c(Code::TxStatus, status, 1),
            c(Code::WindowTx, "1795000020", 1),
        ];
        if status == "completed" {
            contributions.push(c(Code::Revenue, "", cents));
            contributions.push(c(Code::WindowRevenue, "1795000020", cents));
        }
        RowState {
            position: Some(Position::lsn(lsn)),
            contributions,
        }
    }

    fn row(table: Table, id: &str, state: RowState) -> Option<Change> {
        Some(Change::Row {
            table,
            id: id.to_owned(),
            state,
            ts_ms: Some(1_795_000_000_000),
        })
    }

    /// A snapshot with every input of the batch absent (nothing stored yet).
    fn empty_snapshot(batch: &Batch) -> Snapshot {
        let mut s = Snapshot {
            offsets: vec![None; batch.tps().len()],
            ..Snapshot::default()
        };
        for (table, ids) in batch.row_ids() {
            for id in ids {
                s.rows.insert((table, id.to_owned()), None);
            }
        }
        for p in batch.join_products() {
            s.product_gmv.insert(p.to_owned(), None);
            s.product_category.insert(p.to_owned(), None);
        }
        s
    }

    fn hincr<'a>(plan: &'a Plan, key: &str) -> BTreeMap<&'a str, i64> {
        plan.writes
            .iter()
            .filter_map(|w| match w {
                Write::HIncrBy { key: k, pairs } if k == key => Some(pairs),
                _ => None,
            })
            .flatten()
            .map(|(f, n)| (f.as_str(), *n))
            .collect()
    }

    fn incr(plan: &Plan, key: &str) -> Option<i64> {
        plan.writes.iter().find_map(|w| match w {
            Write::IncrBy { key: k, amount } if k == key => Some(*amount),
            _ => None,
        })
    }

    #[test]
    fn deltas_are_summed_over_the_batch() {
        let mut b = Batch::default();
        b.push(
            "t",
            0,
            0,
            row(Table::Transaction, "1", tx("completed", 250, 10)),
        );
        b.push(
            "t",
            0,
            1,
            row(Table::Transaction, "2", tx("completed", 100, 11)),
        );
        b.push(
            "t",
            0,
            2,
            row(Table::Transaction, "3", tx("pending", 999, 12)),
        );
        // Row 1 again, refunded: its revenue is taken back within the batch.
        b.push(
            "t",
            0,
            3,
            row(Table::Transaction, "1", tx("refunded", 250, 13)),
        );
        let plan = build(&b, &empty_snapshot(&b), P, 5).unwrap();
        assert_eq!(
            hincr(&plan, "m:transactions:status"),
            BTreeMap::from([("completed", 1), ("pending", 1), ("refunded", 1)])
        );
        assert_eq!(incr(&plan, "m:revenue:total_cents"), Some(100));
        assert_eq!(incr(&plan, "m:count:instashop.transaction"), Some(3));
        assert_eq!(
            hincr(&plan, "m:window:30s:1795000020"),
            BTreeMap::from([("revenue_cents", 100), ("transactions", 3)])
        );
        assert!(plan.writes.contains(&Write::ExpireAt {
            key: "m:window:30s:1795000020".into(),
            at: 1_795_000_020 + 30 + 3600
        }));
        // One row-state write per row, the last state.
        let rows: Vec<&(String, String)> = plan
            .writes
            .iter()
            .filter_map(|w| match w {
                Write::HSet { key, pairs } if key == "m:rows:instashop.transaction" => Some(pairs),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(rows.len(), 3);
        assert!(rows.contains(&&("1".to_owned(), encode_state(&tx("refunded", 250, 13)))));
        assert!(plan.writes.contains(&Write::HSet {
            key: "m:offsets".into(),
            pairs: vec![("t/0".into(), "4".into())]
        }));
        assert_eq!(
            plan.counts,
            Applied {
                applied: 4,
                ..Applied::default()
            }
        );
    }

    #[test]
    fn checks_carry_the_exact_values_read() {
        let mut b = Batch::default();
        b.push(
            "t",
            0,
            7,
            row(Table::Transaction, "1", tx("refunded", 250, 20)),
        );
        b.push(
            "t",
            0,
            8,
            row(Table::Transaction, "2", tx("pending", 5, 21)),
        );
        let mut snap = empty_snapshot(&b);
        let prior = encode_state(&tx("completed", 250, 10));
        snap.rows
            .insert((Table::Transaction, "1".into()), Some(prior.clone()));
        snap.offsets = vec![Some("7".into())];
        let plan = build(&b, &snap, P, 5).unwrap();
        assert!(plan.checks.contains(&Check::Equal {
            key: "m:offsets".into(),
            pairs: vec![("t/0".into(), "7".into())]
        }));
        assert!(plan.checks.contains(&Check::Equal {
            key: "m:rows:instashop.transaction".into(),
            pairs: vec![("1".into(), prior)]
        }));
        assert!(plan.checks.contains(&Check::Absent {
            key: "m:rows:instashop.transaction".into(),
            fields: vec!["2".into()]
        }));
        // The prior contribution is retracted.
        assert_eq!(incr(&plan, "m:revenue:total_cents"), Some(-250));
        assert_eq!(
            hincr(&plan, "m:transactions:status"),
            BTreeMap::from([("completed", -1), ("pending", 1), ("refunded", 1)])
        );
    }

    #[test]
    fn applied_offsets_and_older_lsns_are_duplicates() {
        let mut b = Batch::default();
        b.push(
            "t",
            0,
            3,
            row(Table::Transaction, "1", tx("completed", 1, 10)),
        );
        b.push(
            "t",
            0,
            4,
            row(Table::Transaction, "2", tx("completed", 2, 5)),
        );
        b.push("t", 0, 5, None);
        b.push("t", 0, 6, Some(Change::Tombstone));
        let mut snap = empty_snapshot(&b);
        snap.offsets = vec![Some("4".into())];
        snap.rows.insert(
            (Table::Transaction, "2".into()),
            Some(encode_state(&tx("pending", 2, 9))),
        );
        let plan = build(&b, &snap, P, 5).unwrap();
        assert_eq!(
            plan.counts,
            Applied {
                applied: 0,
                duplicates: 2,
                bad: 1,
                skipped: 1
            }
        );
        assert_eq!(incr(&plan, "m:revenue:total_cents"), None);
        assert!(
            !plan
                .writes
                .iter()
                .any(|w| matches!(w, Write::HSet { key, .. } if key.contains("rows:")))
        );
        assert_eq!(
            hincr(&plan, "m:pipeline"),
            BTreeMap::from([
                ("bad_messages", 1),
                ("duplicates_skipped", 2),
                ("tombstones_skipped", 1)
            ])
        );
        assert!(plan.writes.contains(&Write::HSet {
            key: "m:offsets".into(),
            pairs: vec![("t/0".into(), "7".into())]
        }));
    }

    #[test]
    fn join_moves_gmv_and_reads_prior_products() {
        let detail = |product: &str, cents: i64, lsn: u64| RowState {
            position: Some(Position::lsn(lsn)),
            contributions: vec![
                c(Code::Count, "instashop.transactiondetail", 1),
                c(Code::ProductGmv, product, cents),
            ],
        };
        let mut b = Batch::default();
        // Detail 1 moves from product 9 to product 8; product 8 is in "toys".
        b.push(
            "d",
            0,
            0,
            row(Table::TransactionDetail, "1", detail("8", 300, 20)),
        );
        let mut snap = empty_snapshot(&b);
        snap.rows.insert(
            (Table::TransactionDetail, "1".into()),
            Some(encode_state(&detail("9", 500, 10))),
        );
        assert_eq!(snap.missing_products(&b), vec!["9".to_owned()]);
        assert!(matches!(build(&b, &snap, P, 0), Err(Error::Internal(_))));
        snap.product_gmv.insert("8".into(), Some("1000".into()));
        snap.product_category
            .insert("8".into(), Some("toys".into()));
        snap.product_gmv.insert("9".into(), Some("500".into()));
        snap.product_category
            .insert("9".into(), Some("games".into()));
        assert!(snap.missing_products(&b).is_empty());
        let plan = build(&b, &snap, P, 0).unwrap();
        assert_eq!(
            hincr(&plan, "m:gmv:category_cents"),
            BTreeMap::from([("games", -500), ("toys", 300)])
        );
        assert!(plan.writes.contains(&Write::HSet {
            key: "m:join:product_gmv_cents".into(),
            pairs: vec![("8".into(), "1300".into()), ("9".into(), "0".into())]
        }));
        assert!(plan.checks.contains(&Check::Equal {
            key: "m:join:product_category".into(),
            pairs: vec![("8".into(), "toys".into()), ("9".into(), "games".into())]
        }));
        assert_eq!(incr(&plan, "m:count:instashop.transactiondetail"), None);

        // A deleted product leaves the join: its category is removed.
        let mut b = Batch::default();
        b.push(
            "p",
            0,
            0,
            row(
                Table::Product,
                "8",
                RowState {
                    position: Some(Position::lsn(30)),
                    contributions: vec![],
                },
            ),
        );
        let mut snap = empty_snapshot(&b);
        snap.rows.insert(
            (Table::Product, "8".into()),
            Some(encode_state(&RowState {
                position: Some(Position::lsn(1)),
                contributions: vec![
                    c(Code::Count, "instashop.product", 1),
                    c(Code::ProductCategory, "8\x1dtoys", 1),
                ],
            })),
        );
        snap.product_gmv.insert("8".into(), Some("1300".into()));
        snap.product_category
            .insert("8".into(), Some("toys".into()));
        let plan = build(&b, &snap, P, 0).unwrap();
        assert_eq!(
            hincr(&plan, "m:gmv:category_cents"),
            BTreeMap::from([("toys", -1300)])
        );
        assert!(plan.writes.contains(&Write::HDel {
            key: "m:join:product_category".into(),
            fields: vec!["8".into()]
        }));
    }

    #[test]
    fn truncate_checks_the_whole_hash_and_deletes_it() {
        let mut b = Batch::default();
        b.push(
            "t",
            0,
            0,
            Some(Change::Truncate {
                table: Table::Transaction,
                position: None,
                ts_ms: None,
            }),
        );
        b.push(
            "t",
            0,
            1,
            row(Table::Transaction, "3", tx("pending", 1, 50)),
        );
        let mut snap = empty_snapshot(&b);
        let one = encode_state(&tx("completed", 40, 1));
        let two = encode_state(&tx("pending", 2, 2));
        snap.tables.insert(
            Table::Transaction,
            vec![("1".into(), one.clone()), ("2".into(), two.clone())],
        );
        let plan = build(&b, &snap, P, 0).unwrap();
        let key = "m:rows:instashop.transaction".to_owned();
        assert!(plan.checks.contains(&Check::Len {
            key: key.clone(),
            len: 2
        }));
        assert!(plan.checks.contains(&Check::Equal {
            key: key.clone(),
            pairs: vec![("1".into(), one), ("2".into(), two)]
        }));
        let del = plan
            .writes
            .iter()
            .position(|w| *w == Write::Del { key: key.clone() });
        let set = plan
            .writes
            .iter()
            .position(|w| matches!(w, Write::HSet { key: k, .. } if *k == key));
        assert!(
            del.unwrap() < set.unwrap(),
            "delete before the rows written after it"
        );
        assert_eq!(incr(&plan, "m:revenue:total_cents"), Some(-40));
        assert_eq!(incr(&plan, "m:count:instashop.transaction"), Some(-1));
    }

    #[test]
    fn positioned_truncate_rewrites_older_rows_and_keeps_newer_ones() {
        let at = |commit: u64, lsn: u64, state: RowState| RowState {
            position: Some(Position::at(commit, lsn)),
            ..state
        };
        let mut b = Batch::default();
        b.push(
            "t",
            1,
            0,
            Some(Change::Truncate {
                table: Table::Transaction,
                position: Some(Position::at(20, 19)),
                ts_ms: None,
            }),
        );
        let mut snap = empty_snapshot(&b);
        let old = encode_state(&at(10, 9, tx("completed", 40, 0)));
        let newer = encode_state(&at(30, 29, tx("completed", 7, 0)));
        snap.tables.insert(
            Table::Transaction,
            vec![("1".into(), old.clone()), ("2".into(), newer.clone())],
        );
        let plan = build(&b, &snap, P, 0).unwrap();
        let key = "m:rows:instashop.transaction".to_owned();
        assert!(!plan.writes.contains(&Write::Del { key: key.clone() }));
        assert!(plan.writes.contains(&Write::HSet {
            key: key.clone(),
            pairs: vec![(
                "1".into(),
                encode_state(&RowState {
                    position: Some(Position::at(20, 19)),
                    contributions: vec![],
                })
            )]
        }));
        assert!(plan.checks.contains(&Check::Equal {
            key,
            pairs: vec![("1".into(), old), ("2".into(), newer)]
        }));
        assert_eq!(incr(&plan, "m:revenue:total_cents"), Some(-40));
        assert_eq!(incr(&plan, "m:count:instashop.transaction"), Some(-1));
    }

    #[test]
    fn unreadable_stored_state_is_an_error() {
        let mut b = Batch::default();
        b.push("t", 0, 0, row(Table::Transaction, "1", tx("pending", 1, 5)));
        let mut snap = empty_snapshot(&b);
        snap.rows
            .insert((Table::Transaction, "1".into()), Some("\x1eZbad".into()));
        assert!(matches!(
            build(&b, &snap, P, 0),
            Err(Error::StoredState { .. })
        ));
    }

    #[test]
    fn script_args_layout() {
        let plan = Plan {
            checks: vec![
                Check::Equal {
                    key: "k".into(),
                    pairs: vec![("a".into(), "1".into()), ("b".into(), "2".into())],
                },
                Check::Absent {
                    key: "k".into(),
                    fields: vec!["c".into()],
                },
                Check::Len {
                    key: "h".into(),
                    len: 4,
                },
            ],
            writes: vec![
                Write::Del { key: "h".into() },
                Write::HIncrBy {
                    key: "s".into(),
                    pairs: vec![("x".into(), -3)],
                },
                Write::IncrBy {
                    key: "n".into(),
                    amount: 7,
                },
            ],
            counts: Applied::default(),
        };
        let args = plan.script_args();
        let expected = [
            "14", "eq", "k", "2", "a", "b", "1", "2", "absent", "k", "1", "c", "hlen", "h", "4",
            "del", "h", "0", "hincrby", "s", "1", "x", "-3", "incrby", "n", "1", "7",
        ];
        assert_eq!(args, expected);
    }

    #[test]
    fn large_inputs_are_chunked() {
        let mut b = Batch::default();
        for i in 0..(CHUNK as i64 + 1) {
            b.push(
                "t",
                0,
                i,
                row(Table::Transaction, &i.to_string(), tx("pending", 1, 1)),
            );
        }
        let plan = build(&b, &empty_snapshot(&b), P, 0).unwrap();
        let absent: Vec<usize> = plan
            .checks
            .iter()
            .filter_map(|c| match c {
                Check::Absent { key, fields } if key.contains("rows:") => Some(fields.len()),
                _ => None,
            })
            .collect();
        assert_eq!(absent, vec![CHUNK, 1]);
    }

    #[test]
    fn overlay_makes_the_next_plan_see_this_one() {
        let mut first = Batch::default();
        first.push(
            "t",
            0,
            0,
            row(Table::Transaction, "1", tx("completed", 250, 10)),
        );
        let plan1 = build(&first, &empty_snapshot(&first), P, 0).unwrap();
        let mut second = Batch::default();
        second.push(
            "t",
            0,
            1,
            row(Table::Transaction, "1", tx("refunded", 250, 20)),
        );
        // Read before the first script ran: nothing stored yet.
        let mut snap = empty_snapshot(&second);
        Overlay::of(&plan1).apply(&mut snap, &second, P);
        assert_eq!(snap.offsets, vec![Some("1".to_owned())]);
        assert_eq!(
            snap.rows.get(&(Table::Transaction, "1".to_owned())),
            Some(&Some(encode_state(&tx("completed", 250, 10))))
        );
        let plan2 = build(&second, &snap, P, 0).unwrap();
        assert_eq!(incr(&plan2, "m:revenue:total_cents"), Some(-250));
        assert!(plan2.checks.contains(&Check::Equal {
            key: "m:offsets".into(),
            pairs: vec![("t/0".into(), "1".into())]
        }));
        // A truncate deletes every row the overlay does not rewrite.
        let mut third = Batch::default();
        third.push(
            "t",
            0,
            2,
            Some(Change::Truncate {
                table: Table::Transaction,
                position: None,
                ts_ms: None,
            }),
        );
        let mut snap = empty_snapshot(&third);
        snap.tables.insert(
            Table::Transaction,
            vec![("1".into(), "stale".into()), ("9".into(), "stale".into())],
        );
        let overlay = Overlay {
            deleted: HashSet::from(["m:rows:instashop.transaction".to_owned()]),
            ..Overlay::default()
        };
        overlay.apply(&mut snap, &third, P);
        assert!(snap.tables[&Table::Transaction].is_empty());
    }
}
