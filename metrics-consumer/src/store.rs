//! Redis side: reads the values a batch depends on (pipelined HMGETs), has
//! [`plan::build`] fold the batch over them, and runs one Lua script
//! (`store.lua`, EVALSHA) that compares those values with Redis's current
//! ones and, if unchanged, writes the plan and the consumed offsets in the
//! same atomic step. The stored offsets are where a (re)assigned partition
//! resumes.

use std::time::Duration;

use crate::Error;
pub use crate::batch::{Applied, Batch, Entry, tp_field};
use crate::plan::{self, Overlay, Plan, Snapshot};

/// The compare-and-write script.
pub const APPLY_LUA: &str = include_str!("store.lua");

/// Most attempts at one batch while concurrent writers keep changing its
/// inputs. Each failed attempt means another batch was applied meanwhile, so
/// reaching this means something else writes under the same prefix.
pub const MAX_ATTEMPTS: u32 = 50;

/// Whether a Redis error may go away by itself (connection lost or refused,
/// a timeout, a server loading its data or failing over), so retrying with
/// backoff is right; any other error (wrong key type, out of memory, no
/// permission, a script error) repeats on every retry.
pub fn is_transient(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    e.is_io_error()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_connection_dropped()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
            )
        )
        || e.code() == Some("BUSY")
}

/// A Redis error of the apply, by what the apply loop does next.
pub fn failure(e: redis::RedisError) -> Error {
    if is_transient(&e) {
        Error::RedisUnavailable(e)
    } else {
        Error::RedisRejected(e)
    }
}

/// A synchronous Redis connection with the script loaded.
pub struct Store {
    client: redis::Client,
    con: Option<redis::Connection>,
    script: redis::Script,
    prefix: String,
    conflicts: u64,
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
            conflicts: 0,
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

    /// Applies a batch atomically: read its inputs, plan, compare-and-write;
    /// on a conflict re-read and re-plan (at most [`MAX_ATTEMPTS`] times).
    /// Safe to retry after any error: offsets already applied are skipped.
    pub fn apply(&mut self, batch: &Batch, now_ms: i64) -> Result<Applied, Error> {
        if batch.is_empty() {
            return Ok(Applied::default());
        }
        for attempt in 1..=MAX_ATTEMPTS {
            let plan = self.plan(batch, now_ms, None)?;
            if self.write(&plan)? {
                return Ok(plan.counts);
            }
            self.conflicts += 1;
            tracing::debug!(
                attempt,
                "batch inputs changed under a concurrent writer, re-reading"
            );
        }
        Err(Error::Conflict {
            attempts: MAX_ATTEMPTS,
        })
    }

    /// Writes a plan made ahead by a [`Planner`]; if its inputs changed
    /// (or there is none), applies the batch from fresh reads instead.
    pub fn apply_planned(
        &mut self,
        batch: &Batch,
        plan: Option<&Plan>,
        now_ms: i64,
    ) -> Result<Applied, Error> {
        if batch.is_empty() {
            return Ok(Applied::default());
        }
        if let Some(plan) = plan {
            if self.write(plan)? {
                return Ok(plan.counts);
            }
            self.conflicts += 1;
        }
        self.apply(batch, now_ms)
    }

    /// Reads the batch's inputs (as after `overlay`'s plan) and plans it.
    pub fn plan(
        &mut self,
        batch: &Batch,
        now_ms: i64,
        overlay: Option<&Overlay>,
    ) -> Result<Plan, Error> {
        let snapshot = self.read(batch, overlay).map_err(failure)?;
        plan::build(batch, &snapshot, &self.prefix, now_ms)
    }

    /// Runs the compare-and-write script: `false` (nothing written) when a
    /// value the plan was built from has changed since it was read.
    pub fn write(&mut self, plan: &Plan) -> Result<bool, Error> {
        // EVALSHA built by hand: the values go straight into the command
        // buffer (the invocation helper copies each into its own Vec).
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(0);
        plan.emit_args(|a| {
            cmd.arg(a);
        });
        let written: i64 = self
            .with_con(|con, script, _| match cmd.query(con) {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    script.load(con)?;
                    cmd.query(con)
                }
                other => other,
            })
            .map_err(failure)?;
        Ok(written == 1)
    }

    /// Conflicts met so far (batches re-read because a concurrent writer
    /// changed their inputs).
    pub fn conflicts(&self) -> u64 {
        self.conflicts
    }

    /// Reads what the batch's plan depends on: stored offsets, prior row
    /// states, whole hashes of truncated tables, then the join inputs of the
    /// products in the new and the prior states.
    pub fn read(
        &mut self,
        batch: &Batch,
        overlay: Option<&Overlay>,
    ) -> Result<Snapshot, redis::RedisError> {
        let ids = batch.row_ids();
        let truncated = batch.truncated_tables();
        let products: Vec<String> = batch
            .join_products()
            .into_iter()
            .map(str::to_owned)
            .collect();
        let mut snap = Snapshot::default();
        self.with_con(|con, _, p| {
            let mut pipe = redis::pipe();
            let tps: Vec<String> = batch.tps().iter().map(|(t, n)| tp_field(t, *n)).collect();
            pipe.cmd("HMGET").arg(format!("{p}offsets")).arg(&tps);
            for (table, ids) in &ids {
                pipe.cmd("HMGET")
                    .arg(format!("{p}rows:{}", table.qualified()))
                    .arg(ids);
            }
            for table in &truncated {
                pipe.cmd("HGETALL")
                    .arg(format!("{p}rows:{}", table.qualified()));
            }
            join_reads(&mut pipe, p, &products);
            let mut replies = pipe.query::<Vec<redis::Value>>(con)?.into_iter();
            let mut next = || {
                replies.next().ok_or_else(|| {
                    redis::RedisError::from((redis::ErrorKind::Client, "short pipeline reply"))
                })
            };
            snap.offsets = redis::from_redis_value(next()?)?;
            for (table, ids) in &ids {
                let values: Vec<Option<String>> = redis::from_redis_value(next()?)?;
                for (id, v) in ids.iter().zip(values) {
                    snap.rows.insert((*table, (*id).to_owned()), v);
                }
            }
            for table in &truncated {
                let all: Vec<(String, String)> = redis::from_redis_value(next()?)?;
                snap.tables.insert(*table, all);
            }
            store_join(&mut snap, &products, &mut next)?;
            if let Some(o) = overlay {
                o.apply(&mut snap, batch, p);
            }
            // Prior states may join on products the new ones do not (a
            // deleted detail, a changed product id): read those too.
            let more = snap.missing_products(batch);
            if !more.is_empty() {
                let mut pipe = redis::pipe();
                join_reads(&mut pipe, p, &more);
                let mut replies = pipe.query::<Vec<redis::Value>>(con)?.into_iter();
                let mut next = || {
                    replies.next().ok_or_else(|| {
                        redis::RedisError::from((redis::ErrorKind::Client, "short pipeline reply"))
                    })
                };
                store_join(&mut snap, &more, &mut next)?;
                if let Some(o) = overlay {
                    o.apply(&mut snap, batch, p);
                }
            }
            Ok(())
        })?;
        Ok(snap)
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

fn join_reads(pipe: &mut redis::Pipeline, prefix: &str, products: &[String]) {
    if products.is_empty() {
        return;
    }
    pipe.cmd("HMGET")
        .arg(format!("{prefix}join:product_gmv_cents"))
        .arg(products);
    pipe.cmd("HMGET")
        .arg(format!("{prefix}join:product_category"))
        .arg(products);
}

fn store_join(
    snap: &mut Snapshot,
    products: &[String],
    next: &mut impl FnMut() -> Result<redis::Value, redis::RedisError>,
) -> Result<(), redis::RedisError> {
    if products.is_empty() {
        return Ok(());
    }
    let gmv: Vec<Option<String>> = redis::from_redis_value(next()?)?;
    let cat: Vec<Option<String>> = redis::from_redis_value(next()?)?;
    for ((p, g), c) in products.iter().zip(gmv).zip(cat) {
        snap.product_gmv.insert(p.clone(), g);
        snap.product_category.insert(p.clone(), c);
    }
    Ok(())
}

/// Plans batch N+1 while batch N's script runs (on another connection): its
/// reads are overlaid with N's planned writes, so they look as after N.
#[derive(Debug)]
pub struct Planner {
    store: Store,
    previous: Option<Overlay>,
}

impl Planner {
    /// A planner with its own connection.
    pub fn new(url: &str, prefix: &str) -> Result<Planner, redis::RedisError> {
        Ok(Planner {
            store: Store::new(url, prefix)?,
            previous: None,
        })
    }

    /// Plans `batch` as if the previously planned batch had been applied.
    /// The plan goes to [`Store::apply_planned`], in planning order.
    pub fn plan(&mut self, batch: &Batch, now_ms: i64) -> Result<Plan, Error> {
        let result = self.store.plan(batch, now_ms, self.previous.as_ref());
        self.previous = result.as_ref().ok().map(Overlay::of);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_errors_split_by_what_happens_next() {
        let io =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(failure(io), Error::RedisUnavailable(_)));
        let loading = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading),
            "loading",
        ));
        assert!(failure(loading).is_transient());
        let script = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "unknown write",
        ));
        assert!(matches!(failure(script), Error::RedisRejected(_)));
        let auth = redis::RedisError::from((redis::ErrorKind::AuthenticationFailed, "auth"));
        assert!(!failure(auth).is_transient());
    }
}
