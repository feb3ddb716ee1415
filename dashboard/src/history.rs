//! The historical view, read from the data warehouse that `dwh-sink`
//! writes: revenue and purchases per day over the whole history, GMV per
//! category per week (the category each product had when sold), and one
//! product's price history from its SCD2 versions.
//!
//! The page asks `/api/history` every few seconds while it is open; each
//! request reads the warehouse now. One connection is kept and replaced
//! after an error, so a warehouse restart shows as "no data" for a moment,
//! not as a dead dashboard; a dashboard without a warehouse keeps serving
//! the live view.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

/// Connect and query timeout: the page must not hang on a stuck warehouse.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Revenue and purchases per UTC day (completed purchases).
const DAILY: &str = "SELECT to_char(date, 'YYYY-MM-DD'), purchases, revenue_cents::bigint FROM revenue_daily ORDER BY date";

/// GMV per ISO week (its Monday) and category as sold.
const WEEKLY: &str = "SELECT to_char(date_trunc('week', f.purchase_time AT TIME ZONE 'UTC'), 'YYYY-MM-DD'), p.category, sum(f.amount_cents)::bigint
    FROM fact_sale_line f JOIN dim_product p ON p.product_key = f.product_key
    WHERE f.purchase_time IS NOT NULL
    GROUP BY 1, 2 ORDER BY 1, 2";

/// The products with the most price versions, for the product picker.
const PRODUCTS: &str = "SELECT product_id, (array_agg(name ORDER BY valid_from_commit_lsn DESC, valid_from_lsn DESC))[1], count(DISTINCT price_cents)::bigint
    FROM dim_product WHERE NOT is_deleted
    GROUP BY product_id ORDER BY 3 DESC, 1 LIMIT 20";

/// One product's versions.
const PRICES: &str = "SELECT (extract(epoch FROM valid_from) * 1000)::bigint, (extract(epoch FROM valid_to) * 1000)::bigint, price_cents, name, category
    FROM dim_product WHERE product_id = $1 AND NOT is_deleted
    ORDER BY valid_from_commit_lsn, valid_from_lsn";

/// Why the history could not be read (shown on the page, transient).
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// No warehouse configured.
    #[error("no warehouse configured: set --dwh-url / DWH_URL")]
    NotConfigured,
    /// The warehouse did not answer in time.
    #[error("the warehouse at {0} did not answer within 3 s")]
    Timeout(String),
    /// The warehouse refused or dropped the connection or a query.
    #[error("the warehouse at {url} is unavailable (is dwh-sink's database created? scripts/up)")]
    Unavailable {
        /// The URL, password hidden.
        url: String,
        /// The cause.
        #[source]
        source: tokio_postgres::Error,
    },
}

/// The warehouse connection of the historical view.
#[derive(Debug)]
pub struct History {
    url: String,
    client: Mutex<Option<Client>>,
}

impl History {
    /// Does not connect yet; an empty URL turns the view off.
    pub fn new(url: &str) -> History {
        History {
            url: url.to_owned(),
            client: Mutex::new(None),
        }
    }

    fn unavailable(&self, source: tokio_postgres::Error) -> HistoryError {
        HistoryError::Unavailable {
            url: local_stack::redact::url(&self.url),
            source,
        }
    }

    async fn client(&self) -> Result<Client, HistoryError> {
        let (client, connection) = tokio_postgres::connect(&self.url, NoTls)
            .await
            .map_err(|e| self.unavailable(e))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Reads the warehouse with one connection, reconnecting after errors.
    async fn with_client<T, F, Fut>(&self, read: F) -> Result<T, HistoryError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: std::future::Future<Output = (Client, Result<T, tokio_postgres::Error>)>,
    {
        if self.url.is_empty() {
            return Err(HistoryError::NotConfigured);
        }
        let mut slot = self.client.lock().await;
        let client = match slot.take() {
            Some(c) if !c.is_closed() => c,
            _ => tokio::time::timeout(TIMEOUT, self.client())
                .await
                .map_err(|_| HistoryError::Timeout(local_stack::redact::url(&self.url)))??,
        };
        let (client, result) = tokio::time::timeout(TIMEOUT, read(client))
            .await
            .map_err(|_| HistoryError::Timeout(local_stack::redact::url(&self.url)))?;
        match result {
            Ok(v) => {
                *slot = Some(client);
                Ok(v)
            }
            Err(e) => Err(self.unavailable(e)),
        }
    }

    /// Revenue per day, GMV per week and category, the products with the
    /// most price versions, and the price history of `product` (else of
    /// the first of those products).
    pub async fn read(&self, product: Option<i64>) -> Result<Value, HistoryError> {
        self.with_client(|client| async move {
            let result = async {
                let daily: Vec<Value> = client
                    .query(DAILY, &[])
                    .await?
                    .iter()
                    .map(|r| {
                        json!({"date": r.get::<_, String>(0), "purchases": r.get::<_, i64>(1), "revenue_cents": r.get::<_, i64>(2)})
                    })
                    .collect();
                let weekly: Vec<Value> = client
                    .query(WEEKLY, &[])
                    .await?
                    .iter()
                    .map(|r| {
                        json!({"week": r.get::<_, String>(0), "category": r.get::<_, Option<String>>(1), "gmv_cents": r.get::<_, i64>(2)})
                    })
                    .collect();
                let products: Vec<Value> = client
                    .query(PRODUCTS, &[])
                    .await?
                    .iter()
                    .map(|r| {
                        json!({"id": r.get::<_, i64>(0), "name": r.get::<_, Option<String>>(1), "prices": r.get::<_, i64>(2)})
                    })
                    .collect();
                let chosen = product.or_else(|| products.first().and_then(|p| p["id"].as_i64()));
                let mut prices = Vec::new();
                if let Some(id) = chosen {
                    prices = client
                        .query(PRICES, &[&id])
                        .await?
                        .iter()
                        .map(|r| {
                            json!({
                                "valid_from_ms": r.get::<_, i64>(0),
                                "valid_to_ms": r.get::<_, Option<i64>>(1),
                                "price_cents": r.get::<_, Option<i64>>(2),
                                "name": r.get::<_, Option<String>>(3),
                                "category": r.get::<_, Option<String>>(4),
                            })
                        })
                        .collect();
                }
                Ok(json!({
                    "revenue_daily": daily,
                    "gmv_weekly": weekly,
                    "products": products,
                    "product": chosen,
                    "price_history": prices,
                }))
            }
            .await;
            (client, result)
        })
        .await
    }
}
