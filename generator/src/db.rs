//! Connections to one database, the multi-row SQL of each statement kind, and
//! writing planned batches with retry when the database goes away.
//!
//! A batch is one database transaction: `BEGIN` and `txid_current()` first (one
//! round trip), then every statement and `COMMIT` pipelined. If the connection
//! breaks, the transaction id tells after reconnecting whether the commit
//! landed (`txid_status`), so a batch is neither lost nor written twice.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::future::try_join_all;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::op::{Database, Op, Stmt, Table};
use crate::plan::Group;

/// Whether an error means "the database is (temporarily) not there" rather
/// than "the SQL is wrong".
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    let Some(code) = e.code() else {
        // No SQLSTATE: IO error, closed connection, timeout.
        return true;
    };
    let code = code.code();
    code.starts_with("08") // connection exception
        || code.starts_with("57P") // admin/crash shutdown, cannot connect now
        || code == "40001" // serialization failure
        || code == "40P01" // deadlock (two generators on one database)
        || code == "53300" // too many connections
        || code == "26000" // prepared statement gone: stale cache after a reconnect
}

/// Environment variable naming a database's URL.
pub fn url_var(db: Database) -> &'static str {
    match db {
        Database::Instashop => "PG_INSTASHOP_URL",
        Database::Crm => "PG_CRM_URL",
        Database::Erp => "PG_ERP_URL",
        Database::Ecommerce => "PG_ECOMMERCE_URL",
    }
}

/// Retry state of one operation against one database.
#[derive(Debug, Default)]
pub struct Outage {
    down: bool,
    backoff: Duration,
    /// Outages seen (each logged once).
    pub outages: u64,
}

impl Outage {
    /// Marks success; logs the recovery if there was an outage.
    pub fn done(&mut self, db: Database) {
        if self.down {
            tracing::info!(database = db.name(), "database back, continuing");
            self.down = false;
            self.backoff = Duration::ZERO;
        }
    }
}

/// Runs `$body` (an expression using `$conn`, evaluated again on each try)
/// until it succeeds, recovering from outages; `?` on final errors.
#[macro_export]
macro_rules! with_retry {
    ($conn:expr, $what:expr, $shutdown:expr, $outage:expr, $body:expr) => {{
        loop {
            let attempt = $body;
            match attempt {
                Ok(v) => {
                    $outage.done($conn.db);
                    break v;
                }
                Err(e) => $conn.recover(e, $what, $shutdown, $outage).await?,
            }
        }
    }};
    ($conn:expr, $what:expr, $shutdown:expr, $body:expr) => {{
        let mut outage = $crate::db::Outage::default();
        $crate::with_retry!($conn, $what, $shutdown, &mut outage, $body)
    }};
}

/// One connection to one database, reconnecting on demand.
#[derive(Debug)]
pub struct Conn {
    /// Which database.
    pub db: Database,
    url: String,
    config: tokio_postgres::Config,
    client: Option<Client>,
    prepared: HashMap<&'static str, Statement>,
    /// Transaction id of the batch in flight.
    in_flight: Option<i64>,
}

impl Conn {
    /// Connects, or fails with a one-line error naming the database.
    pub async fn open(db: Database, url: &str, timeout: Duration) -> Result<Conn, Error> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|source| Error::BadUrl {
            database: db.name(),
            url: local_stack::redact::url(url),
            var: url_var(db),
            source,
        })?;
        config.connect_timeout(timeout);
        config.application_name("instashop-generator");
        let mut conn = Conn {
            db,
            url: url.to_owned(),
            config,
            client: None,
            prepared: HashMap::new(),
            in_flight: None,
        };
        conn.connect().await.map_err(|source| Error::Connect {
            database: db.name(),
            url: local_stack::redact::url(&conn.url),
            var: url_var(db),
            source,
        })?;
        Ok(conn)
    }

    async fn connect(&mut self) -> Result<(), tokio_postgres::Error> {
        self.client = None;
        self.prepared.clear();
        let (client, connection) = self.config.connect(NoTls).await?;
        let db = self.db.name();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(database = db, error = %e, "connection ended");
            }
        });
        // The generator's writes may be lost in a server crash (a few ms of
        // them); it regenerates traffic anyway, and this is 2-5x the speed.
        client
            .batch_execute("SET synchronous_commit = off; SET TIME ZONE 'UTC'")
            .await?;
        self.client = Some(client);
        Ok(())
    }

    /// The live client; reconnects first when the last one broke.
    pub async fn client(&mut self) -> Result<&Client, tokio_postgres::Error> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.connect().await?;
        }
        match &self.client {
            Some(c) => Ok(c),
            None => unreachable!("connect() sets the client"),
        }
    }

    async fn statement(&mut self, sql: &'static str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client().await?.prepare(sql).await?;
        self.prepared.insert(sql, s.clone());
        Ok(s)
    }

    /// Handles a failed attempt: on a transient error, says once per outage
    /// that the database is unavailable, drops the connection and waits with
    /// backoff (the caller then tries again); any other error is final.
    pub async fn recover(
        &mut self,
        e: tokio_postgres::Error,
        what: &'static str,
        shutdown: &CancellationToken,
        outage: &mut Outage,
    ) -> Result<(), Error> {
        if !is_transient(&e) {
            return Err(Error::Rejected {
                database: self.db.name(),
                what,
                source: e,
            });
        }
        if !outage.down {
            tracing::warn!(
                database = self.db.name(),
                url = %local_stack::redact::url(&self.url),
                error = %e,
                "database unavailable, retrying"
            );
            outage.down = true;
            outage.outages += 1;
        }
        self.client = None;
        self.prepared.clear();
        tokio::select! {
            _ = tokio::time::sleep(outage.backoff) => {}
            _ = shutdown.cancelled() => {
                return Err(Error::StoppedWhileUnavailable { database: self.db.name() });
            }
        }
        outage.backoff =
            (outage.backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
        Ok(())
    }

    /// Writes planned groups as one transaction; returns rows affected per
    /// group. Safe to call again after a transient error: a batch that did
    /// commit is not applied twice.
    pub async fn write(&mut self, groups: &[Planned]) -> Result<Vec<u64>, tokio_postgres::Error> {
        if let Some(xid) = self.in_flight {
            // The previous attempt broke off; did its COMMIT land? A backend
            // that lost its client (or was terminated) may still be finishing
            // that transaction, and until it has, the status is "in
            // progress": retrying then could apply the batch twice. Wait for
            // the outcome; the backend is on its way out, so it comes soon.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            let status = loop {
                let row = self
                    .client()
                    .await?
                    .query_one("SELECT txid_status($1)::text", &[&xid])
                    .await?;
                let status: Option<String> = row.get(0);
                if status.as_deref() != Some("in progress")
                    || tokio::time::Instant::now() > deadline
                {
                    break status;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            self.in_flight = None;
            if status.as_deref() == Some("committed") {
                return Ok(groups.iter().map(|g| g.rows).collect());
            }
        }
        // Connect first: statements prepared on a connection that then
        // turns out dead would not exist on its replacement.
        self.client().await?;
        let mut stmts = Vec::with_capacity(groups.len());
        for g in groups {
            stmts.push(self.statement(sql(g.stmt)).await?);
        }
        let commit = self.statement("COMMIT").await?;
        let client = self.client().await?;
        let rows = client.simple_query("BEGIN; SELECT txid_current()").await?;
        let xid = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                r.get(0).and_then(|v| v.parse::<i64>().ok())
            }
            _ => None,
        });
        self.in_flight = xid;
        let client = match &self.client {
            Some(c) => c,
            None => unreachable!("client() just connected"),
        };
        let refs: Vec<Vec<&(dyn ToSql + Sync)>> = groups
            .iter()
            .map(|g| {
                g.params
                    .iter()
                    .map(|b| b.as_ref() as &(dyn ToSql + Sync))
                    .collect()
            })
            .collect();
        let writes = try_join_all(
            stmts
                .iter()
                .zip(&refs)
                .map(|(s, r)| client.execute(s, r.as_slice())),
        );
        let (affected, _) = match tokio::try_join!(writes, client.execute(&commit, &[])) {
            Ok(v) => v,
            Err(e) => {
                if !is_transient(&e) {
                    // The server rolled back at COMMIT; nothing to recover.
                    self.in_flight = None;
                    let _ = client.batch_execute("ROLLBACK").await;
                }
                return Err(e);
            }
        };
        self.in_flight = None;
        Ok(affected)
    }
}

/// The SQL of each statement kind: one statement, many rows, arrays in.
/// Amounts travel as integer cents and become `numeric` by exact division.
pub fn sql(stmt: Stmt) -> &'static str {
    match stmt {
        Stmt::InsertCustomer => {
            "INSERT INTO customer (id, name, email, subscription_plan, country) \
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[])"
        }
        Stmt::InsertBuyer => {
            "INSERT INTO buyer (id, customer_id, name, email, birth_date) \
             SELECT i, c, n, e, b::date \
             FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[]) AS u(i, c, n, e, b)"
        }
        Stmt::InsertProduct => {
            "INSERT INTO product (id, customer_id, name, category, price, tags, description) \
             SELECT i, c, n, k, p::numeric / 100, t::text[], d \
             FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[]) \
             AS u(i, c, n, k, p, t, d)"
        }
        Stmt::InsertTransaction => {
            "INSERT INTO transaction (id, external_id, customer_id, buyer_id, total_amount, payment_method, status) \
             SELECT i, x::uuid, c, b, a::numeric / 100, m, s::transaction_status \
             FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::text[], $7::text[]) \
             AS u(i, x, c, b, a, m, s)"
        }
        Stmt::InsertDetail => {
            "INSERT INTO transactiondetail (id, transaction_id, product_id, quantity, unit_price) \
             SELECT i, t, p, q, c::numeric / 100 \
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::int[], $5::bigint[]) AS u(i, t, p, q, c)"
        }
        Stmt::InsertInteraction => {
            "INSERT INTO interaction (id, customer_id, buyer_id, interaction_type, session_id, payload) \
             SELECT i, c, b, k, s::uuid, p::jsonb \
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[]) \
             AS u(i, c, b, k, s, p)"
        }
        Stmt::InsertStock => {
            "INSERT INTO stock (id, product_id, warehouse, quantity, reorder_level) \
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::int[], $5::int[])"
        }
        Stmt::InsertCarrier => {
            "INSERT INTO carrier (id, name, tracking_url_template) \
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[])"
        }
        Stmt::InsertShipment => {
            "INSERT INTO shipment (id, transaction_id, carrier_id, tracking_code, label) \
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::bytea[])"
        }
        Stmt::UpdateCustomerPlan => {
            "UPDATE customer c SET subscription_plan = u.p \
             FROM unnest($1::bigint[], $2::text[]) AS u(i, p) WHERE c.id = u.i"
        }
        Stmt::SetCustomerActive => {
            "UPDATE customer c SET is_active = u.a \
             FROM unnest($1::bigint[], $2::bool[]) AS u(i, a) WHERE c.id = u.i"
        }
        Stmt::UpdateBuyerEmail => {
            "UPDATE buyer b SET email = u.e \
             FROM unnest($1::bigint[], $2::text[]) AS u(i, e) WHERE b.id = u.i"
        }
        Stmt::UpdateProductPrice => {
            "UPDATE product p SET price = u.c::numeric / 100, updated_at = now() \
             FROM unnest($1::bigint[], $2::bigint[]) AS u(i, c) WHERE p.id = u.i"
        }
        Stmt::UpdateProductCategory => {
            "UPDATE product p SET category = u.k, updated_at = now() \
             FROM unnest($1::bigint[], $2::text[]) AS u(i, k) WHERE p.id = u.i"
        }
        Stmt::UpdateTransactionStatus => {
            // The WHERE on the old status makes a disallowed transition a no-op.
            "UPDATE transaction t SET status = u.s::transaction_status, updated_at = now() \
             FROM unnest($1::bigint[], $2::text[], $3::text[]) AS u(i, f, s) \
             WHERE t.id = u.i AND t.status = u.f::transaction_status"
        }
        Stmt::UpdateTransactionTotal => {
            "UPDATE transaction t SET total_amount = u.c::numeric / 100, updated_at = now() \
             FROM unnest($1::bigint[], $2::bigint[]) AS u(i, c) \
             WHERE t.id = u.i AND t.status = 'pending'"
        }
        Stmt::UpdateDetailQuantity => {
            "UPDATE transactiondetail d SET quantity = u.q \
             FROM unnest($1::bigint[], $2::int[]) AS u(i, q) WHERE d.id = u.i"
        }
        Stmt::PatchInteraction => {
            "UPDATE interaction x SET payload = x.payload || u.p::jsonb \
             FROM unnest($1::bigint[], $2::text[]) AS u(i, p) WHERE x.id = u.i"
        }
        Stmt::AdjustStock => {
            "UPDATE stock s SET quantity = GREATEST(s.quantity + u.d, 0), updated_at = now() \
             FROM unnest($1::bigint[], $2::int[]) AS u(i, d) WHERE s.id = u.i"
        }
        Stmt::UpdateCarrier => {
            "UPDATE carrier c SET tracking_url_template = u.t \
             FROM unnest($1::bigint[], $2::text[]) AS u(i, t) WHERE c.id = u.i"
        }
        Stmt::UpdateShipmentStatus => {
            "UPDATE shipment sh SET status = u.s, updated_at = now() \
             FROM unnest($1::bigint[], $2::text[], $3::text[]) AS u(i, f, s) \
             WHERE sh.id = u.i AND sh.status = u.f"
        }
        // Deletes re-check in SQL what the model already knows (nothing
        // references the row; the cart is still pending; the label was not
        // handed over yet), so a second generator or hand-made rows on the
        // same databases turn a delete into a no-op, never into an error.
        Stmt::Delete(table) => match table {
            Table::Customer => {
                "DELETE FROM customer c WHERE c.id = ANY($1::bigint[]) \
                 AND NOT EXISTS (SELECT 1 FROM buyer b WHERE b.customer_id = c.id) \
                 AND NOT EXISTS (SELECT 1 FROM product p WHERE p.customer_id = c.id) \
                 AND NOT EXISTS (SELECT 1 FROM transaction t WHERE t.customer_id = c.id)"
            }
            Table::Buyer => {
                "DELETE FROM buyer b WHERE b.id = ANY($1::bigint[]) \
                 AND NOT EXISTS (SELECT 1 FROM transaction t WHERE t.buyer_id = b.id)"
            }
            Table::Product => {
                "DELETE FROM product p WHERE p.id = ANY($1::bigint[]) \
                 AND NOT EXISTS (SELECT 1 FROM transactiondetail d WHERE d.product_id = p.id)"
            }
            Table::Transaction => {
                "DELETE FROM transaction WHERE id = ANY($1::bigint[]) AND status = 'pending'"
            }
            Table::TransactionDetail => {
                "DELETE FROM transactiondetail d WHERE d.id = ANY($1::bigint[]) \
                 AND EXISTS (SELECT 1 FROM transaction t \
                             WHERE t.id = d.transaction_id AND t.status = 'pending')"
            }
            Table::Interaction => "DELETE FROM interaction WHERE id = ANY($1::bigint[])",
            Table::Stock => "DELETE FROM stock WHERE id = ANY($1::bigint[])",
            Table::Carrier => {
                "DELETE FROM carrier c WHERE c.id = ANY($1::bigint[]) \
                 AND NOT EXISTS (SELECT 1 FROM shipment s WHERE s.carrier_id = c.id)"
            }
            Table::Shipment => {
                "DELETE FROM shipment WHERE id = ANY($1::bigint[]) AND status = 'created'"
            }
        },
        Stmt::PurgeInteractions => {
            "DELETE FROM interaction WHERE id IN \
             (SELECT id FROM interaction ORDER BY id LIMIT $1::bigint)"
        }
    }
}

/// One statement's parameter.
pub type Param = Box<dyn ToSql + Sync + Send>;

/// A planned statement with its column arrays, ready to execute. Built by the
/// producer, so the writers only do IO.
pub struct Planned {
    /// Which statement.
    pub stmt: Stmt,
    /// Rows it is meant to touch (ops in the group).
    pub rows: u64,
    /// `$1..$n`.
    pub params: Vec<Param>,
}

impl std::fmt::Debug for Planned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Planned")
            .field("stmt", &self.stmt)
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

/// Plans one database's ops and builds each statement's arrays.
pub fn prepare(ops: Vec<Op>) -> Vec<Planned> {
    crate::plan::plan(ops)
        .iter()
        .map(|g| Planned {
            stmt: g.stmt,
            rows: g.ops.len() as u64,
            params: params(g),
        })
        .collect()
}

fn boxed<T: ToSql + Sync + Send + 'static>(v: T) -> Param {
    Box::new(v)
}

/// Column arrays of one group, in the order of its SQL's `$n`.
pub fn params(group: &Group) -> Vec<Param> {
    let ops = &group.ops;
    let ids: Vec<i64> = ops
        .iter()
        .filter_map(|o| o.write_key().map(|(_, id)| id))
        .collect();
    macro_rules! col {
        ($pat:pat => $e:expr) => {
            boxed(
                ops.iter()
                    .filter_map(|o| match o {
                        $pat => Some($e),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            )
        };
    }
    match group.stmt {
        Stmt::InsertCustomer => vec![
            boxed(ids),
            col!(Op::InsertCustomer { name, .. } => name.clone()),
            col!(Op::InsertCustomer { email, .. } => email.clone()),
            col!(Op::InsertCustomer { plan, .. } => (*plan).to_owned()),
            col!(Op::InsertCustomer { country, .. } => country.clone()),
        ],
        Stmt::InsertBuyer => vec![
            boxed(ids),
            col!(Op::InsertBuyer { customer_id, .. } => *customer_id),
            col!(Op::InsertBuyer { name, .. } => name.clone()),
            col!(Op::InsertBuyer { email, .. } => email.clone()),
            col!(Op::InsertBuyer { birth_date, .. } => birth_date.clone()),
        ],
        Stmt::InsertProduct => vec![
            boxed(ids),
            col!(Op::InsertProduct { customer_id, .. } => *customer_id),
            col!(Op::InsertProduct { name, .. } => name.clone()),
            col!(Op::InsertProduct { category, .. } => (*category).to_owned()),
            col!(Op::InsertProduct { price_cents, .. } => *price_cents),
            col!(Op::InsertProduct { tags, .. } => tags.clone()),
            col!(Op::InsertProduct { description, .. } => description.clone()),
        ],
        Stmt::InsertTransaction => vec![
            boxed(ids),
            col!(Op::InsertTransaction { external_id, .. } => external_id.clone()),
            col!(Op::InsertTransaction { customer_id, .. } => *customer_id),
            col!(Op::InsertTransaction { buyer_id, .. } => *buyer_id),
            col!(Op::InsertTransaction { total_cents, .. } => *total_cents),
            col!(Op::InsertTransaction { payment_method, .. } => (*payment_method).to_owned()),
            col!(Op::InsertTransaction { status, .. } => status.name().to_owned()),
        ],
        Stmt::InsertDetail => vec![
            boxed(ids),
            col!(Op::InsertDetail { transaction_id, .. } => *transaction_id),
            col!(Op::InsertDetail { product_id, .. } => *product_id),
            col!(Op::InsertDetail { quantity, .. } => *quantity),
            col!(Op::InsertDetail { unit_cents, .. } => *unit_cents),
        ],
        Stmt::InsertInteraction => vec![
            boxed(ids),
            col!(Op::InsertInteraction { customer_id, .. } => *customer_id),
            col!(Op::InsertInteraction { buyer_id, .. } => *buyer_id),
            col!(Op::InsertInteraction { kind, .. } => (*kind).to_owned()),
            col!(Op::InsertInteraction { session_id, .. } => session_id.clone()),
            col!(Op::InsertInteraction { payload, .. } => payload.clone()),
        ],
        Stmt::InsertStock => vec![
            boxed(ids),
            col!(Op::InsertStock { product_id, .. } => *product_id),
            col!(Op::InsertStock { warehouse, .. } => (*warehouse).to_owned()),
            col!(Op::InsertStock { quantity, .. } => *quantity),
            col!(Op::InsertStock { reorder_level, .. } => *reorder_level),
        ],
        Stmt::InsertCarrier => vec![
            boxed(ids),
            col!(Op::InsertCarrier { name, .. } => name.clone()),
            col!(Op::InsertCarrier { template, .. } => template.clone()),
        ],
        Stmt::InsertShipment => vec![
            boxed(ids),
            col!(Op::InsertShipment { transaction_id, .. } => *transaction_id),
            col!(Op::InsertShipment { carrier_id, .. } => *carrier_id),
            col!(Op::InsertShipment { tracking_code, .. } => tracking_code.clone()),
            col!(Op::InsertShipment { label, .. } => label.clone()),
        ],
        Stmt::UpdateCustomerPlan => vec![
            boxed(ids),
            col!(Op::UpdateCustomerPlan { plan, .. } => (*plan).to_owned()),
        ],
        Stmt::SetCustomerActive => vec![
            boxed(ids),
            col!(Op::SetCustomerActive { active, .. } => *active),
        ],
        Stmt::UpdateBuyerEmail => vec![
            boxed(ids),
            col!(Op::UpdateBuyerEmail { email, .. } => email.clone()),
        ],
        Stmt::UpdateProductPrice => vec![
            boxed(ids),
            col!(Op::UpdateProductPrice { price_cents, .. } => *price_cents),
        ],
        Stmt::UpdateProductCategory => vec![
            boxed(ids),
            col!(Op::UpdateProductCategory { category, .. } => (*category).to_owned()),
        ],
        Stmt::UpdateTransactionStatus => vec![
            boxed(ids),
            col!(Op::UpdateTransactionStatus { from, .. } => from.name().to_owned()),
            col!(Op::UpdateTransactionStatus { to, .. } => to.name().to_owned()),
        ],
        Stmt::UpdateTransactionTotal => vec![
            boxed(ids),
            col!(Op::UpdateTransactionTotal { total_cents, .. } => *total_cents),
        ],
        Stmt::UpdateDetailQuantity => vec![
            boxed(ids),
            col!(Op::UpdateDetailQuantity { quantity, .. } => *quantity),
        ],
        Stmt::PatchInteraction => vec![
            boxed(ids),
            col!(Op::PatchInteraction { patch, .. } => patch.clone()),
        ],
        Stmt::AdjustStock => vec![boxed(ids), col!(Op::AdjustStock { delta, .. } => *delta)],
        Stmt::UpdateCarrier => vec![
            boxed(ids),
            col!(Op::UpdateCarrier { template, .. } => template.clone()),
        ],
        Stmt::UpdateShipmentStatus => vec![
            boxed(ids),
            col!(Op::UpdateShipmentStatus { from, .. } => from.name().to_owned()),
            col!(Op::UpdateShipmentStatus { to, .. } => to.name().to_owned()),
        ],
        Stmt::Delete(_) => vec![boxed(ids)],
        Stmt::PurgeInteractions => {
            let count: i64 = ops
                .iter()
                .map(|o| match o {
                    Op::PurgeInteractions { count } => *count,
                    _ => 0,
                })
                .sum();
            vec![boxed(count)]
        }
    }
}
