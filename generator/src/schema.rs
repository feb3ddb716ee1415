//! Creates the tables from `sql/<db>.sql` when they are missing, and reads
//! back what the model needs to continue on databases that already hold data.

use tokio_util::sync::CancellationToken;

use crate::db::Conn;
use crate::error::Error;
use crate::model::{Line, Snapshot};
use crate::op::{Database, ShipStatus, Table};
use crate::with_retry;

/// The schema file of a database, compiled in.
pub fn sql(db: Database) -> &'static str {
    match db {
        Database::Instashop => include_str!("../../sql/instashop.sql"),
        Database::Crm => include_str!("../../sql/crm.sql"),
        Database::Erp => include_str!("../../sql/erp.sql"),
        Database::Ecommerce => include_str!("../../sql/ecommerce.sql"),
    }
}

/// Applies the schema file when any of the database's tables is missing.
/// The file is idempotent; it is not re-applied to complete schemas because
/// `ALTER TABLE ... REPLICA IDENTITY` takes a strong lock a running CDC
/// reader would notice. Returns whether it was applied.
pub async fn ensure(conn: &mut Conn, shutdown: &CancellationToken) -> Result<bool, Error> {
    let db = conn.db;
    let tables: Vec<String> = Table::ALL
        .iter()
        .filter(|t| t.database() == db)
        .map(|t| format!("public.{}", t.name()))
        .collect();
    let missing: i64 = with_retry!(conn, "schema check", shutdown, {
        count_missing(conn, &tables).await
    });
    if missing == 0 {
        return Ok(false);
    }
    tracing::info!(
        database = db.name(),
        "creating tables from sql/{}.sql",
        db.name()
    );
    with_retry!(conn, "schema file", shutdown, {
        apply(conn, sql(db)).await
    });
    Ok(true)
}

async fn count_missing(conn: &mut Conn, tables: &[String]) -> Result<i64, tokio_postgres::Error> {
    let row = conn
        .client()
        .await?
        .query_one(
            "SELECT count(*) FROM unnest($1::text[]) AS t(name) WHERE to_regclass(name) IS NULL",
            &[&tables],
        )
        .await?;
    Ok(row.get(0))
}

async fn apply(conn: &mut Conn, sql: &str) -> Result<(), tokio_postgres::Error> {
    conn.client().await?.batch_execute(sql).await
}

/// Reads the rows the model continues from. Order is by id, so a resumed
/// model is deterministic too.
pub async fn load(conns: &mut [Conn; 4], shutdown: &CancellationToken) -> Result<Snapshot, Error> {
    let mut snap = Snapshot::default();
    let [instashop, _crm, erp, ecommerce] = conns;

    let (customers, buyers, products, pending) = with_retry!(instashop, "state query", shutdown, {
        load_instashop(instashop).await
    });
    snap.customers = customers;
    snap.buyers = buyers;
    snap.products = products;
    snap.pending = pending;
    snap.stock = with_retry!(erp, "state query", shutdown, { load_stock(erp).await });
    let (carriers, shipments) = with_retry!(ecommerce, "state query", shutdown, {
        load_ecommerce(ecommerce).await
    });
    snap.carriers = carriers;
    snap.shipments = shipments;
    Ok(snap)
}

type InstashopState = (
    Vec<(i64, String, bool)>,
    Vec<(i64, i64, bool)>,
    Vec<(i64, i64, i64, String, bool)>,
    Vec<(i64, Vec<Line>)>,
);

async fn load_instashop(c: &mut Conn) -> Result<InstashopState, tokio_postgres::Error> {
    let client = c.client().await?;
    let customers = client
        .query(
            "SELECT id, subscription_plan, is_active FROM customer ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect::<Vec<(i64, String, bool)>>();
    let buyers = client
        .query(
            "SELECT b.id, b.customer_id, \
                     EXISTS (SELECT 1 FROM transaction t WHERE t.buyer_id = b.id) \
                     FROM buyer b ORDER BY b.id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect::<Vec<(i64, i64, bool)>>();
    let products = client
        .query(
            "SELECT p.id, p.customer_id, (p.price * 100)::bigint, p.category, \
                     EXISTS (SELECT 1 FROM transactiondetail d WHERE d.product_id = p.id) \
                     FROM product p ORDER BY p.id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect::<Vec<(i64, i64, i64, String, bool)>>();
    let rows = client
        .query(
            "SELECT t.id, d.id, d.product_id, d.quantity, (d.unit_price * 100)::bigint \
                     FROM transaction t JOIN transactiondetail d ON d.transaction_id = t.id \
                     WHERE t.status = 'pending' ORDER BY t.id, d.id",
            &[],
        )
        .await?;
    let mut pending: Vec<(i64, Vec<Line>)> = Vec::new();
    for r in rows {
        let tx: i64 = r.get(0);
        let line = Line {
            detail_id: r.get(1),
            product_id: r.get(2),
            quantity: r.get(3),
            unit_cents: r.get(4),
        };
        match pending.last_mut() {
            Some((id, lines)) if *id == tx => lines.push(line),
            _ => pending.push((tx, vec![line])),
        }
    }
    Ok((customers, buyers, products, pending))
}

async fn load_stock(c: &mut Conn) -> Result<Vec<(i64, i64, i32)>, tokio_postgres::Error> {
    Ok(c.client()
        .await?
        .query(
            "SELECT id, product_id, quantity FROM stock ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

type EcommerceState = (Vec<(i64, String)>, Vec<(i64, i64, ShipStatus)>);

async fn load_ecommerce(c: &mut Conn) -> Result<EcommerceState, tokio_postgres::Error> {
    let client = c.client().await?;
    let carriers = client
        .query("SELECT id::bigint, name FROM carrier ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect::<Vec<(i64, String)>>();
    let shipments = client
        .query(
            "SELECT id, transaction_id, status FROM shipment \
                     WHERE status IN ('created', 'in_transit') ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .filter_map(|r| {
            let status: String = r.get(2);
            Some((r.get(0), r.get(1), ShipStatus::parse(&status)?))
        })
        .collect::<Vec<(i64, i64, ShipStatus)>>();
    Ok((carriers, shipments))
}
