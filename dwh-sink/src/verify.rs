//! `dwh-sink verify`: the warehouse against the source databases, at rest.
//!
//! Each check is a pair of queries returning `(key, value)` text rows, one
//! on a source database and one on the warehouse; every key missing on one
//! side or with another value is a difference. The checks:
//!
//! * `change_event` holds no two rows with the same table, key, LSN and op,
//!   and the rows whose last event is not a delete are exactly the source
//!   rows, for each of the nine tables;
//! * the current version of every dimension equals its source row;
//! * every fact equals its source row (lines with their purchase's status,
//!   customer and buyer);
//! * revenue per day and GMV per category equal their SQL on the sources;
//! * every sale line's dimension keys point at the version valid at its
//!   creation.

use std::collections::BTreeMap;

use tokio_postgres::{Client, NoTls};

use crate::{Config, Error};

/// `verify`'s options: the source databases.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// The `instashop` source database.
    #[arg(
        long,
        env = "PG_INSTASHOP_URL",
        default_value = "postgres://instashop_app:instashop_app@127.0.0.1:54329/instashop"
    )]
    pub instashop_url: String,
    /// The `crm` source database.
    #[arg(
        long,
        env = "PG_CRM_URL",
        default_value = "postgres://instashop_app:instashop_app@127.0.0.1:54329/crm"
    )]
    pub crm_url: String,
    /// The `erp` source database.
    #[arg(
        long,
        env = "PG_ERP_URL",
        default_value = "postgres://instashop_app:instashop_app@127.0.0.1:54329/erp"
    )]
    pub erp_url: String,
    /// The `ecommerce` source database.
    #[arg(
        long,
        env = "PG_ECOMMERCE_URL",
        default_value = "postgres://instashop_app:instashop_app@127.0.0.1:54329/ecommerce"
    )]
    pub ecommerce_url: String,
    /// Only the checks of these source databases (comma-separated).
    #[arg(long, default_value = "instashop,crm,erp,ecommerce")]
    pub databases: String,
    /// Differences printed per check (all are counted).
    #[arg(long, default_value_t = 10)]
    pub show: usize,
}

/// A comparison of one source query with one warehouse query.
struct Check {
    name: String,
    db: &'static str,
    source: String,
    dwh: String,
}

fn key_set(db: &'static str, table: &'static str) -> Check {
    Check {
        name: format!("change_event live rows of {db}.{table}"),
        db,
        source: format!("SELECT '{table}/{{\"id\":' || id || '}}', '' FROM {table}"),
        dwh: format!(
            "SELECT '{table}/' || row_key, '' FROM (
                SELECT DISTINCT ON (row_key) row_key, op FROM change_event e
                WHERE source_db = '{db}' AND source_table = '{table}' AND row_key <> ''
                  AND NOT EXISTS (
                      SELECT 1 FROM change_event t
                      WHERE t.source_db = '{db}' AND t.source_table = '{table}' AND t.op = 't'
                        AND (coalesce(t.commit_lsn, t.lsn), t.lsn) > (coalesce(e.commit_lsn, e.lsn), e.lsn))
                ORDER BY row_key, coalesce(commit_lsn, lsn) DESC, lsn DESC) last
            WHERE op <> 'd'"
        ),
    }
}

fn checks() -> Vec<Check> {
    let mut out: Vec<Check> = catalog::Table::ALL
        .into_iter()
        .map(|t| key_set(t.db(), t.name()))
        .collect();
    let current = |table: &str, id: &str, cols: &str| {
        format!(
            "SELECT {id}::text, format('{fmt}', {cols}) FROM {table} WHERE is_current",
            fmt = vec!["%s"; cols.split(',').count()].join("|")
        )
    };
    let source = |table: &str, cols: &str| {
        format!(
            "SELECT id::text, format('{fmt}', {cols}) FROM {table}",
            fmt = vec!["%s"; cols.split(',').count()].join("|")
        )
    };
    out.extend([
        Check {
            name: "dim_customer current versions".into(),
            db: "instashop",
            source: source("customer", "name, email, subscription_plan, country, is_active"),
            dwh: current("dim_customer", "customer_id", "name, email, subscription_plan, country, is_active"),
        },
        Check {
            name: "dim_buyer current versions".into(),
            db: "instashop",
            source: source("buyer", "customer_id, name, email"),
            dwh: current("dim_buyer", "buyer_id", "customer_id, name, email"),
        },
        Check {
            name: "dim_product current versions".into(),
            db: "instashop",
            source: source("product", "customer_id, name, category, (price * 100)::bigint"),
            dwh: current("dim_product", "product_id", "customer_id, name, category, price_cents"),
        },
        Check {
            name: "dim_carrier current versions".into(),
            db: "ecommerce",
            source: source("carrier", "name, tracking_url_template"),
            dwh: current("dim_carrier", "carrier_id", "name, tracking_url_template"),
        },
        Check {
            name: "fact_purchase".into(),
            db: "instashop",
            source: source(
                "transaction",
                "customer_id, buyer_id, (total_amount * 100)::bigint, currency, payment_method, status, extract(epoch FROM created_at)",
            ),
            dwh: "SELECT purchase_id::text, format('%s|%s|%s|%s|%s|%s|%s', customer_id, buyer_id, total_cents, currency, payment_method, status, extract(epoch FROM purchase_time)) FROM fact_purchase".into(),
        },
        Check {
            name: "fact_sale_line".into(),
            db: "instashop",
            source: "SELECT d.id::text, format('%s|%s|%s|%s|%s|%s|%s|%s', d.transaction_id, d.product_id, d.quantity, (d.unit_price * 100)::bigint, (d.quantity * d.unit_price * 100)::bigint, t.status, t.customer_id, t.buyer_id) FROM transactiondetail d JOIN transaction t ON t.id = d.transaction_id".into(),
            dwh: "SELECT line_id::text, format('%s|%s|%s|%s|%s|%s|%s|%s', purchase_id, product_id, quantity, unit_price_cents, amount_cents, status, customer_id, buyer_id) FROM fact_sale_line".into(),
        },
        Check {
            name: "fact_shipment".into(),
            db: "ecommerce",
            source: source("shipment", "transaction_id, carrier_id, status, tracking_code, extract(epoch FROM created_at)"),
            dwh: "SELECT shipment_id::text, format('%s|%s|%s|%s|%s', purchase_id, carrier_id, status, tracking_code, extract(epoch FROM created_time)) FROM fact_shipment".into(),
        },
        Check {
            name: "revenue per day".into(),
            db: "instashop",
            source: "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD'), sum(total_amount * 100)::bigint::text FROM transaction WHERE status = 'completed' GROUP BY 1".into(),
            dwh: "SELECT to_char(date, 'YYYY-MM-DD'), revenue_cents::text FROM revenue_daily".into(),
        },
        Check {
            name: "GMV per category".into(),
            db: "instashop",
            source: "SELECT p.category, sum(d.quantity * d.unit_price * 100)::bigint::text FROM transactiondetail d JOIN product p ON p.id = d.product_id GROUP BY p.category".into(),
            dwh: "SELECT p.category, sum(f.amount_cents)::text FROM fact_sale_line f JOIN dim_product p ON p.product_id = f.product_id AND p.is_current GROUP BY p.category".into(),
        },
    ]);
    out
}

/// A purchase's creation position columns.
const CREATED: (&str, &str) = ("created_commit_lsn", "created_lsn");

/// The rows of `facts` (labelled `label` and their `id`) whose key into
/// `dim_<dim>` is not the version valid at their position `(c, l)`: the
/// newest from at or before it, or the first for a fact older than every
/// version.
fn version_check(label: &str, facts: &str, id: &str, dim: &str, (c, l): (&str, &str)) -> String {
    format!(
        "SELECT '{label} ' || f.{id} FROM {facts} LEFT JOIN dim_{dim} d ON d.{dim}_key = f.{dim}_key
         WHERE d.{dim}_key IS NULL OR d.{dim}_id <> f.{dim}_id
            OR ((d.valid_from_commit_lsn, d.valid_from_lsn) > (f.{c}, f.{l})
                AND EXISTS (SELECT 1 FROM dim_{dim} e WHERE e.{dim}_id = d.{dim}_id
                            AND (e.valid_from_commit_lsn, e.valid_from_lsn) < (d.valid_from_commit_lsn, d.valid_from_lsn)))
            OR (d.valid_to_commit_lsn IS NOT NULL AND (d.valid_to_commit_lsn, d.valid_to_lsn) <= (f.{c}, f.{l}))"
    )
}

/// Warehouse-only consistency checks: each returns the offending rows.
fn integrity() -> Vec<(&'static str, String)> {
    vec![
        (
            "change_event rows with the same table, key, lsn and op",
            "SELECT source_db || '.' || source_table || ' ' || row_key || ' lsn ' || lsn || ' ' || op::text || ' x' || count(*)
             FROM change_event GROUP BY source_db, source_table, row_key, lsn, op HAVING count(*) > 1".into(),
        ),
        (
            "sale lines whose product version is not the one valid when sold (the first for a sale older than every version)",
            version_check("line", "fact_sale_line f", "line_id", "product", ("sold_commit_lsn", "sold_lsn")),
        ),
        (
            "purchases (and so their sale lines) whose customer or buyer version is not the one valid when made",
            format!(
                "{} UNION ALL {}",
                version_check("customer of purchase", "fact_purchase f", "purchase_id", "customer", CREATED),
                version_check("buyer of purchase", "fact_purchase f", "purchase_id", "buyer", CREATED),
            ),
        ),
        (
            "shipments without the carrier version valid when created",
            "SELECT 'shipment ' || f.shipment_id FROM fact_shipment f LEFT JOIN dim_carrier d ON d.carrier_key = f.carrier_key
             WHERE d.carrier_key IS NULL OR d.carrier_id <> f.carrier_id".into(),
        ),
        (
            "dimension rows with more than one current version",
            "SELECT 'product ' || product_id FROM dim_product WHERE is_current GROUP BY product_id HAVING count(*) > 1
             UNION ALL SELECT 'customer ' || customer_id FROM dim_customer WHERE is_current GROUP BY customer_id HAVING count(*) > 1
             UNION ALL SELECT 'buyer ' || buyer_id FROM dim_buyer WHERE is_current GROUP BY buyer_id HAVING count(*) > 1
             UNION ALL SELECT 'carrier ' || carrier_id FROM dim_carrier WHERE is_current GROUP BY carrier_id HAVING count(*) > 1".into(),
        ),
    ]
}

async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

async fn pairs(
    client: &Client,
    sql: &str,
) -> Result<BTreeMap<String, String>, tokio_postgres::Error> {
    Ok(client
        .query(sql, &[])
        .await?
        .iter()
        .map(|r| {
            (
                r.get::<_, Option<String>>(0).unwrap_or_default(),
                r.get::<_, Option<String>>(1).unwrap_or_default(),
            )
        })
        .collect())
}

/// The differences of two keyed sets, as printable lines.
pub fn differences(
    source: &BTreeMap<String, String>,
    dwh: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in source {
        match dwh.get(k) {
            None => out.push(format!("{k}: missing in the warehouse (source: {v})")),
            Some(w) if w != v => out.push(format!("{k}: warehouse {w}, source {v}")),
            Some(_) => {}
        }
    }
    for (k, w) in dwh {
        if !source.contains_key(k) {
            out.push(format!("{k}: in the warehouse ({w}), not in the source"));
        }
    }
    out
}

/// Runs every check, prints the differences; `Err(Differences)` when any.
pub async fn run(config: Config, args: VerifyArgs) -> Result<(), Error> {
    let dwh = connect(&config.dwh_url)
        .await
        .map_err(|source| Error::DwhUnreachable {
            url: local_stack::redact::url(&config.dwh_url),
            source,
        })?;
    let missing = dwh
        .query_one("SELECT to_regclass('change_event') IS NULL", &[])
        .await
        .map_err(|source| Error::DwhUnreachable {
            url: local_stack::redact::url(&config.dwh_url),
            source,
        })?;
    if missing.get::<_, bool>(0) {
        return Err(Error::SchemaMissing {
            url: local_stack::redact::url(&config.dwh_url),
            table: "change_event".into(),
        });
    }
    let mut sources = BTreeMap::new();
    for (db, var, url) in [
        ("instashop", "PG_INSTASHOP_URL", &args.instashop_url),
        ("crm", "PG_CRM_URL", &args.crm_url),
        ("erp", "PG_ERP_URL", &args.erp_url),
        ("ecommerce", "PG_ECOMMERCE_URL", &args.ecommerce_url),
    ] {
        if !args.databases.split(',').any(|d| d.trim() == db) {
            continue;
        }
        let client = connect(url)
            .await
            .map_err(|source| Error::Source { db, var, source })?;
        sources.insert(db, (client, var));
    }
    let rejected = |source| Error::DwhRejected {
        what: "a verify query",
        source,
    };
    let mut total = 0;
    for check in checks() {
        let Some((client, var)) = sources.get(check.db) else {
            continue;
        };
        let source = pairs(client, &check.source)
            .await
            .map_err(|source| Error::Source {
                db: check.db,
                var,
                source,
            })?;
        let warehouse = pairs(&dwh, &check.dwh).await.map_err(rejected)?;
        let diffs = differences(&source, &warehouse);
        report(&check.name, &diffs, source.len(), args.show);
        total += diffs.len();
    }
    for (name, sql) in integrity() {
        let rows: Vec<String> = dwh
            .query(&sql, &[])
            .await
            .map_err(rejected)?
            .iter()
            .map(|r| r.get::<_, Option<String>>(0).unwrap_or_default())
            .collect();
        report(name, &rows, 0, args.show);
        total += rows.len();
    }
    if total > 0 {
        return Err(Error::Differences(total));
    }
    println!("verify: the warehouse equals the sources");
    Ok(())
}

fn report(name: &str, diffs: &[String], compared: usize, show: usize) {
    if diffs.is_empty() {
        if compared > 0 {
            println!("ok    {name} ({compared} rows)");
        } else {
            println!("ok    {name}");
        }
        return;
    }
    println!("DIFF  {name}: {} difference(s)", diffs.len());
    for d in diffs.iter().take(show) {
        println!("      {d}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_missing_extra_and_changed_rows() {
        let s = BTreeMap::from([
            ("1".to_owned(), "a".to_owned()),
            ("2".to_owned(), "b".to_owned()),
        ]);
        let w = BTreeMap::from([
            ("2".to_owned(), "c".to_owned()),
            ("3".to_owned(), "d".to_owned()),
        ]);
        assert_eq!(
            differences(&s, &w),
            vec![
                "1: missing in the warehouse (source: a)".to_owned(),
                "2: warehouse c, source b".to_owned(),
                "3: in the warehouse (d), not in the source".to_owned(),
            ]
        );
        assert!(differences(&s, &s).is_empty());
    }
}
