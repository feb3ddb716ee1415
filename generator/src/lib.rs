//! InstaShop traffic generator: realistic, seeded traffic into the four
//! InstaShop databases, fast enough to load-test the CDC pipeline.
//!
//! Layout: [`model`] decides what happens (pure, seeded); [`plan`] groups a
//! batch of row changes into few multi-row statements; [`db`] writes them, one
//! transaction per batch and database, retrying while a database is away;
//! [`schema`] creates missing tables and reads back existing state; [`ids`]
//! reserves primary keys from the sequences; [`progress`] counts and reports.
//!
//! Data flow: the producer task runs the model and paces events; the
//! `instashop` writer commits a batch's purchases first, then hands the
//! batch's stock, shipment and behaviour rows to the `erp`, `ecommerce` and
//! `crm` writers, which commit them concurrently with the next batch.

pub mod config;
pub mod db;
pub mod error;
pub mod ids;
pub mod model;
pub mod op;
pub mod plan;
pub mod progress;
pub mod schema;
pub mod words;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use config::Config;
use config::Rate;
use db::Conn;
pub use error::Error;
use model::{BASE_IDS, Model, Output, max_new_rows};
use op::{Database, Stmt};
use progress::Counters;

/// Runs the generator until the configured duration or event count is
/// reached, or `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    run_with(config, shutdown, Arc::new(Counters::default())).await
}

/// [`run`] with caller-provided counters (tests read them).
pub async fn run_with(
    config: Config,
    shutdown: CancellationToken,
    counters: Arc<Counters>,
) -> Result<(), Error> {
    let timeout = Duration::from_secs(config.connect_timeout_secs.max(1));
    let mut producer_conns = open_all(&config, timeout).await?;
    let writer_conns = open_all(&config, timeout).await?;

    let background = CancellationToken::new();
    if let Some(addr) = config.metrics_addr.0 {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Metrics { addr, source })?;
        tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "serving /metrics");
        let counters = counters.clone();
        let stop = background.clone();
        tokio::spawn(async move { progress::serve(listener, &counters, stop).await });
    }
    if config.progress_secs > 0 {
        tokio::spawn(progress::report(
            counters.clone(),
            Duration::from_secs(config.progress_secs),
            background.clone(),
        ));
    }

    let result = generate(
        &config,
        &mut producer_conns,
        writer_conns,
        &counters,
        &shutdown,
    )
    .await;
    background.cancel();
    tracing::info!(
        events = counters.events.get(),
        purchases = counters.purchases.get(),
        "generator stopped"
    );
    result
}

async fn open_all(config: &Config, timeout: Duration) -> Result<[Conn; 4], Error> {
    let [a, b, c, d] = Database::ALL;
    let (a, b, c, d) = tokio::join!(
        Conn::open(a, config.url(a), timeout),
        Conn::open(b, config.url(b), timeout),
        Conn::open(c, config.url(c), timeout),
        Conn::open(d, config.url(d), timeout),
    );
    Ok([a?, b?, c?, d?])
}

/// One batch: the ops of some events, per database.
#[derive(Debug, Default)]
struct Batch {
    parts: [Vec<db::Planned>; 4],
    events: u64,
    purchases: u64,
}

async fn generate(
    config: &Config,
    conns: &mut [Conn; 4],
    writer_conns: [Conn; 4],
    counters: &Arc<Counters>,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    for conn in conns.iter_mut() {
        schema::ensure(conn, shutdown).await?;
    }
    let snapshot = schema::load(conns, shutdown).await?;
    let fresh = snapshot.customers.is_empty();

    let batch = u64::from(config.batch_size());
    let bound = max_new_rows(batch);
    let mut pool = ids::Pool::default();
    let mut first = bound;
    if fresh {
        for (w, b) in first.iter_mut().zip(BASE_IDS) {
            *w += b;
        }
    }
    pool.refill(first, conns, shutdown).await?;
    // Same seed on fresh databases gives the same rows; on databases that
    // already have purchases, mix in where the ids continue, so a restart
    // does not repeat the previous run's external ids.
    let offset = pool.peek(op::Table::Transaction).unwrap_or(1) - 1;
    let seed = config.seed ^ (offset as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut model = Model::resume(seed, config.mix.purchase_share, snapshot);

    // Writers: instashop first, then the other three fed by it.
    let (to_instashop, rx) = mpsc::channel::<Batch>(1);
    let mut forward = Vec::new();
    let mut handles = Vec::new();
    let [w_instashop, w_crm, w_erp, w_ecommerce] = writer_conns;
    for conn in [w_crm, w_erp, w_ecommerce] {
        let (tx, rx) = mpsc::channel::<Batch>(4);
        forward.push(tx);
        handles.push(tokio::spawn(writer(
            conn,
            rx,
            Vec::new(),
            counters.clone(),
            shutdown.clone(),
        )));
    }
    handles.insert(
        0,
        tokio::spawn(writer(
            w_instashop,
            rx,
            forward,
            counters.clone(),
            shutdown.clone(),
        )),
    );

    let produced = produce(
        config,
        &mut model,
        &mut pool,
        conns,
        fresh,
        to_instashop,
        shutdown,
    )
    .await;

    let mut first_error = produced.err();
    for (db, h) in Database::ALL.iter().zip(handles) {
        let res = match h.await {
            Ok(r) => r,
            Err(_) => Err(Error::WriterGone(db.name())),
        };
        if let Err(e) = res {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn produce(
    config: &Config,
    model: &mut Model,
    pool: &mut ids::Pool,
    conns: &mut [Conn; 4],
    fresh: bool,
    to_instashop: mpsc::Sender<Batch>,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let batch = u64::from(config.batch_size());
    let bound = max_new_rows(batch);
    if fresh {
        let mut out = Output::default();
        model.seed_base_data(pool, &mut out)?;
        tracing::info!(
            "empty databases: writing base data (shops, buyers, products, stock, carriers)"
        );
        if to_instashop.send(into_batch(out)).await.is_err() {
            return Ok(()); // a writer failed; its error is reported
        }
    }
    let start = tokio::time::Instant::now();
    let deadline = config.duration.map(|d| start + d);
    let mut produced = 0u64;
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            break;
        }
        let n = match config.events {
            Some(limit) if produced >= limit => break,
            Some(limit) => batch.min(limit - produced),
            None => batch,
        };
        if (0..9).any(|i| (pool.available(op::Table::ALL[i]) as u64) < bound[i]) {
            pool.refill(bound.map(|b| b * 2), conns, shutdown).await?;
        }
        let mut out = Output::default();
        for _ in 0..n {
            model.step(pool, &mut out)?;
        }
        produced += n;
        if let Rate::PerSecond(rate) = config.rate {
            let due = start + Duration::from_secs_f64(produced as f64 / rate);
            let due = deadline.map_or(due, |d| due.min(d));
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        if to_instashop.send(into_batch(out)).await.is_err() {
            break;
        }
    }
    Ok(())
}

fn into_batch(out: Output) -> Batch {
    Batch {
        parts: out.ops.map(db::prepare),
        events: out.events,
        purchases: out.purchases,
    }
}

async fn writer(
    mut conn: Conn,
    mut rx: mpsc::Receiver<Batch>,
    forward: Vec<mpsc::Sender<Batch>>,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let db = conn.db;
    let started = Instant::now();
    let (mut waiting, mut forwarding) = (Duration::ZERO, Duration::ZERO);
    loop {
        let t = Instant::now();
        let Some(mut batch) = rx.recv().await else {
            break;
        };
        waiting += t.elapsed();
        let groups = std::mem::take(&mut batch.parts[db.index()]);
        if !groups.is_empty() {
            let mut outage = db::Outage::default();
            let affected = with_retry!(conn, "batch", &shutdown, &mut outage, {
                conn.write(&groups).await
            });
            counters.unavailable.inc_by(outage.outages);
            for (g, n) in groups.iter().zip(affected) {
                counters.add_rows(g.stmt.table(), g.stmt.change(), n);
                if matches!(
                    g.stmt,
                    Stmt::UpdateTransactionStatus
                        | Stmt::UpdateShipmentStatus
                        | Stmt::UpdateTransactionTotal
                        | Stmt::Delete(_)
                ) {
                    counters.skipped.inc_by(g.rows.saturating_sub(n));
                }
            }
            counters.batches.inc_by(1);
        }
        if db == Database::Instashop {
            counters.events.inc_by(batch.events);
            counters.purchases.inc_by(batch.purchases);
        }
        let t = Instant::now();
        for (i, tx) in forward.iter().enumerate() {
            let target = Database::ALL[i + 1];
            let mut part = Batch {
                parts: Default::default(),
                events: 0,
                purchases: 0,
            };
            part.parts[target.index()] = std::mem::take(&mut batch.parts[target.index()]);
            if part.parts[target.index()].is_empty() {
                continue;
            }
            if tx.send(part).await.is_err() {
                return Ok(()); // that writer failed; its error is reported
            }
        }
        forwarding += t.elapsed();
    }
    // Where the time went: a writer that mostly waits is not the bottleneck.
    tracing::debug!(
        database = db.name(),
        total_ms = started.elapsed().as_millis() as u64,
        waiting_ms = waiting.as_millis() as u64,
        blocked_forwarding_ms = forwarding.as_millis() as u64,
        "writer done"
    );
    Ok(())
}
