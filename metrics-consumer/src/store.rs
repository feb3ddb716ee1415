//! Redis side: one Lua script (`store.lua`, run with EVALSHA) applies a whole
//! batch of decoded events and stores the consumed offsets in the same atomic
//! step; the stored offsets are where a (re)assigned partition resumes.

use std::collections::HashMap;
use std::time::Duration;

use crate::fold::{Change, encode_state};

/// The batch-apply script.
pub const APPLY_LUA: &str = include_str!("store.lua");

/// What a batch did, as counted by the script.
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

/// One batch of messages in Kafka order per partition, encoded for the script.
#[derive(Debug, Default)]
pub struct Batch {
    tps: Vec<String>,
    tp_index: HashMap<(String, i32), usize>,
    args: Vec<String>,
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

impl Batch {
    /// Adds one message: its decoded change, or `None` for a bad message.
    pub fn push(&mut self, topic: &str, partition: i32, offset: i64, change: Option<&Change>) {
        let key = (topic.to_owned(), partition);
        let index = match self.tp_index.get(&key) {
            Some(i) => *i,
            None => {
                self.tps.push(tp_field(topic, partition));
                let i = self.tps.len();
                self.tp_index.insert(key.clone(), i);
                i
            }
        };
        self.next_offsets.insert(key, offset + 1);
        self.len += 1;
        let ts = |t: &Option<i64>| t.map(|v| v.to_string()).unwrap_or_default();
        let (kind, table, id, state, ts_ms) = match change {
            None => ("B", "", String::new(), String::new(), String::new()),
            Some(Change::Row {
                table,
                id,
                state,
                ts_ms,
            }) => {
                self.per_table[table.index()] += 1;
                self.max_ts_ms = self.max_ts_ms.max(*ts_ms);
                (
                    "R",
                    table.qualified(),
                    id.clone(),
                    encode_state(state),
                    ts(ts_ms),
                )
            }
            Some(Change::Truncate { table, ts_ms }) => {
                self.per_table[table.index()] += 1;
                (
                    "T",
                    table.qualified(),
                    String::new(),
                    String::new(),
                    ts(ts_ms),
                )
            }
            Some(Change::Tombstone | Change::Ignored) => {
                ("S", "", String::new(), String::new(), String::new())
            }
        };
        self.args.extend([
            index.to_string(),
            offset.to_string(),
            kind.to_owned(),
            table.to_owned(),
            id,
            state,
            ts_ms,
        ]);
    }

    /// Whether the batch holds no message.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A synchronous Redis connection with the script loaded.
pub struct Store {
    client: redis::Client,
    con: Option<redis::Connection>,
    script: redis::Script,
    prefix: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("prefix", &self.prefix)
            .field("connected", &self.con.is_some())
            .finish()
    }
}

impl Store {
    /// Creates the store; connects lazily.
    pub fn new(url: &str, prefix: &str) -> Result<Store, redis::RedisError> {
        Ok(Store {
            client: redis::Client::open(url)?,
            con: None,
            script: redis::Script::new(APPLY_LUA),
            prefix: prefix.to_owned(),
        })
    }

    fn con(&mut self) -> Result<&mut redis::Connection, redis::RedisError> {
        if self.con.is_none() {
            let con = self
                .client
                .get_connection_with_timeout(Duration::from_secs(5))?;
            con.set_read_timeout(Some(Duration::from_secs(30)))?;
            con.set_write_timeout(Some(Duration::from_secs(30)))?;
            self.con = Some(con);
        }
        match self.con.as_mut() {
            Some(con) => Ok(con),
            None => Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "no redis connection",
            ))),
        }
    }

    fn with_con<T>(
        &mut self,
        f: impl FnOnce(&mut redis::Connection, &redis::Script, &str) -> Result<T, redis::RedisError>,
    ) -> Result<T, redis::RedisError> {
        let prefix = self.prefix.clone();
        let script = self.script.clone();
        let result = f(self.con()?, &script, &prefix);
        if result.is_err() {
            // Reconnect next time: the connection may be half-way through a reply.
            self.con = None;
        }
        result
    }

    /// Applies a batch atomically. Safe to retry after any error: offsets
    /// already applied are skipped by the script.
    pub fn apply(&mut self, batch: &Batch, now_ms: i64) -> Result<Applied, redis::RedisError> {
        if batch.is_empty() {
            return Ok(Applied::default());
        }
        self.with_con(|con, script, prefix| {
            let mut invocation = script.prepare_invoke();
            invocation
                .arg(prefix)
                .arg(now_ms)
                .arg(batch.tps.len())
                .arg(&batch.tps)
                .arg(&batch.args);
            let (applied, duplicates, bad, skipped): (u64, u64, u64, u64) =
                invocation.invoke(con)?;
            Ok(Applied {
                applied,
                duplicates,
                bad,
                skipped,
            })
        })
    }

    /// The stored next offsets of these topic/partitions (`None`: never applied).
    pub fn offsets(
        &mut self,
        tps: &[(String, i32)],
    ) -> Result<Vec<Option<i64>>, redis::RedisError> {
        if tps.is_empty() {
            return Ok(Vec::new());
        }
        self.with_con(|con, _, prefix| {
            let fields: Vec<String> = tps.iter().map(|(t, p)| tp_field(t, *p)).collect();
            redis::cmd("HMGET")
                .arg(format!("{prefix}offsets"))
                .arg(fields)
                .query(con)
        })
    }

    /// Writes the `dashboard` JSON summary from the current metric keys.
    pub fn write_dashboard(&mut self, now_ms: i64) -> Result<(), redis::RedisError> {
        self.with_con(|con, _, p| {
            let tables: Vec<String> = crate::fold::Table::ALL
                .iter()
                .map(|t| format!("{p}count:{}", t.qualified()))
                .collect();
            let hashes = [
                "transactions:status",
                "revenue:daily_cents",
                "gmv:category_cents",
                "shipments:status",
                "interactions:type",
                "pipeline",
            ];
            let mut pipe = redis::pipe();
            pipe.cmd("MGET").arg(&tables);
            pipe.cmd("MGET")
                .arg(format!("{p}revenue:total_cents"))
                .arg(format!("{p}stock:units"));
            for h in hashes {
                pipe.cmd("HGETALL").arg(format!("{p}{h}"));
            }
            type Hash = std::collections::BTreeMap<String, String>;
            type Ints = Vec<Option<i64>>;
            type Reply = (Ints, Ints, Hash, Hash, Hash, Hash, Hash, Hash);
            let (counts, scalars, status, daily, gmv, ships, inter, pipeline): Reply =
                pipe.query(con)?;
            let num = |h: Hash| -> serde_json::Map<String, serde_json::Value> {
                h.into_iter()
                    .map(|(k, v)| {
                        (
                            k,
                            v.parse::<i64>().map_or(serde_json::Value::Null, Into::into),
                        )
                    })
                    .collect()
            };
            let count_map: serde_json::Map<String, serde_json::Value> = crate::fold::Table::ALL
                .iter()
                .zip(counts)
                .map(|(t, c)| (t.qualified().to_owned(), c.unwrap_or(0).into()))
                .collect();
            let summary = serde_json::json!({
                "updated_at_ms": now_ms,
                "counts": count_map,
                "revenue_total_cents": scalars.first().copied().flatten().unwrap_or(0),
                "stock_units": scalars.get(1).copied().flatten().unwrap_or(0),
                "transactions_status": num(status),
                "revenue_daily_cents": num(daily),
                "gmv_category_cents": num(gmv),
                "shipments_status": num(ships),
                "interactions_type": num(inter),
                "pipeline": num(pipeline),
            });
            redis::cmd("SET")
                .arg(format!("{p}dashboard"))
                .arg(summary.to_string())
                .query::<()>(con)
        })
    }
}
