//! Raw Redis values (as the metrics-consumer wrote them) to the JSON
//! snapshot that `/api/metrics` returns and the page draws.
//!
//! Pure: [`RedisValues`] is filled by [`crate::store`], [`assemble`] only
//! reshapes. Integers go out exactly as they are in Redis (a value that is not
//! an integer is passed on as its string, never coerced to a float), and a key
//! that is missing becomes `null`, so the page can say "no data" instead of
//! showing a misleading zero.

use std::collections::BTreeMap;

use catalog::Table;
use serde_json::{Map, Value, json};

/// String keys (relative to the prefix) besides the per-table counts.
pub const REVENUE_TOTAL: &str = "revenue:total_cents";
/// Sum of stock quantities.
pub const STOCK_UNITS: &str = "stock:units";
/// The consumer's JSON summary.
pub const DASHBOARD_JSON: &str = "dashboard";

/// Hash keys (relative to the prefix).
pub const TRANSACTIONS_STATUS: &str = "transactions:status";
/// Completed revenue per UTC day.
pub const REVENUE_DAILY: &str = "revenue:daily_cents";
/// GMV per product category.
pub const GMV_CATEGORY: &str = "gmv:category_cents";
/// Shipments per status.
pub const SHIPMENTS_STATUS: &str = "shipments:status";
/// Interactions per type.
pub const INTERACTIONS_TYPE: &str = "interactions:type";
/// The consumer's progress hash.
pub const PIPELINE: &str = "pipeline";

/// Every hash key read each tick.
pub const HASH_KEYS: [&str; 6] = [
    TRANSACTIONS_STATUS,
    REVENUE_DAILY,
    GMV_CATEGORY,
    SHIPMENTS_STATUS,
    INTERACTIONS_TYPE,
    PIPELINE,
];

/// Width of a purchase window in seconds.
pub const WINDOW_SECONDS: i64 = 30;
/// Windows shown: the last hour.
pub const WINDOW_COUNT: i64 = 120;

/// The key (relative to the prefix) of the count of one table:
/// `count:<db>.<table>`.
pub fn count_key(table: Table) -> String {
    format!("count:{}", table.qualified())
}

/// The key (relative to the prefix) of the 30-second window starting at `start`.
pub fn window_key(start: i64) -> String {
    format!("window:30s:{start}")
}

/// Start times (unix seconds) of the windows of the last hour, oldest first,
/// ending with the window that contains `now_ms`.
pub fn window_starts(now_ms: i64) -> Vec<i64> {
    let current = now_ms.div_euclid(1000).div_euclid(WINDOW_SECONDS) * WINDOW_SECONDS;
    (0..WINDOW_COUNT)
        .rev()
        .map(|i| current - i * WINDOW_SECONDS)
        .collect()
}

/// Values read from Redis in one tick; keys are relative to the prefix.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RedisValues {
    /// String keys: `None` when the key does not exist.
    pub strings: BTreeMap<String, Option<String>>,
    /// Hash keys: an absent key reads as an empty hash.
    pub hashes: BTreeMap<String, BTreeMap<String, String>>,
    /// Window start -> the window hash (empty when absent).
    pub windows: BTreeMap<i64, BTreeMap<String, String>>,
    /// Keys (with prefix) whose Redis type was not the expected one; they
    /// read as missing.
    pub bad_keys: Vec<String>,
}

impl RedisValues {
    fn string(&self, key: &str) -> Option<&str> {
        self.strings.get(key).and_then(|v| v.as_deref())
    }

    fn hash(&self, key: &str) -> Option<&BTreeMap<String, String>> {
        self.hashes.get(key).filter(|h| !h.is_empty())
    }
}

/// A Redis value as JSON: an integer when it is one, else the string itself.
pub fn redis_number(raw: &str) -> Value {
    match raw.trim().parse::<i64>() {
        Ok(n) => Value::from(n),
        Err(_) => Value::from(raw),
    }
}

fn optional_number(raw: Option<&str>) -> Value {
    raw.map_or(Value::Null, redis_number)
}

fn hash_json(hash: Option<&BTreeMap<String, String>>) -> Value {
    match hash {
        Some(h) => Value::Object(
            h.iter()
                .map(|(k, v)| (k.clone(), redis_number(v)))
                .collect::<Map<_, _>>(),
        ),
        None => Value::Null,
    }
}

/// A field of a hash: its number, `0` when the hash exists without it (the
/// consumer may drop zero counts), `null` when the hash itself is missing.
fn field_or_zero(hash: Option<&BTreeMap<String, String>>, field: &str) -> Value {
    match hash {
        Some(h) => h.get(field).map_or(Value::from(0), |v| redis_number(v)),
        None => Value::Null,
    }
}

/// `YYYY-MM-DD` (UTC) of a unix time in milliseconds (a clock outside the
/// range jiff supports, about the years -9999 to 9999, reads as its edge).
pub fn utc_date(unix_ms: i64) -> String {
    let at = jiff::Timestamp::from_millisecond(unix_ms).unwrap_or(if unix_ms < 0 {
        jiff::Timestamp::MIN
    } else {
        jiff::Timestamp::MAX
    });
    jiff::tz::Offset::UTC.to_datetime(at).date().to_string()
}

/// The source `ts_ms` of the last applied event, from the pipeline hash.
///
/// The content is what matters (the last event's source ts_ms), not the
/// field's name, so
/// any field whose name ends in `ts_ms` is accepted (the largest wins).
pub fn last_event_ts_ms(pipeline: &BTreeMap<String, String>) -> Option<i64> {
    pipeline
        .iter()
        .filter(|(k, _)| k.ends_with("ts_ms"))
        .filter_map(|(_, v)| v.trim().parse::<i64>().ok())
        .max()
}

/// Builds the snapshot served by `/api/metrics` and drawn by the page.
pub fn assemble(values: &RedisValues, now_ms: i64) -> Value {
    let count = |table: Table| optional_number(values.string(&count_key(table)));
    let counts: Map<String, Value> = Table::ALL
        .into_iter()
        .map(|t| (t.qualified().to_owned(), count(t)))
        .collect();
    let today = utc_date(now_ms);
    let daily = values.hash(REVENUE_DAILY);
    let revenue_today = match daily {
        Some(_) => field_or_zero(daily, &today),
        // No completed purchase ever: zero only if the consumer has written
        // the total (so we know it is running), else unknown.
        None => values
            .string(REVENUE_TOTAL)
            .map_or(Value::Null, |_| Value::from(0)),
    };
    let shipments = values.hash(SHIPMENTS_STATUS);
    let in_transit = match shipments {
        Some(_) => field_or_zero(shipments, "in_transit"),
        None => {
            if count(Table::Shipment).is_number() {
                Value::from(0)
            } else {
                Value::Null
            }
        }
    };
    let windows: Vec<Value> = window_starts(now_ms)
        .into_iter()
        .map(|start| {
            let w = values.windows.get(&start);
            let field = |name: &str| {
                w.and_then(|h| h.get(name))
                    .map_or(Value::from(0), |v| redis_number(v))
            };
            json!({
                "start": start,
                "transactions": field("transactions"),
                "revenue_cents": field("revenue_cents"),
            })
        })
        .collect();
    let pipeline = values.hash(PIPELINE);
    let last_event_age_ms = pipeline
        .and_then(last_event_ts_ms)
        .map_or(Value::Null, |ts| Value::from((now_ms - ts).max(0)));
    let summary = values
        .string(DASHBOARD_JSON)
        .and_then(|raw| serde_json::from_str::<Value>(raw).ok())
        .unwrap_or(Value::Null);
    json!({
        "generated_at_ms": now_ms,
        "today": today,
        "kpi": {
            "purchases": count(Table::Transaction),
            "revenue_total_cents": optional_number(values.string(REVENUE_TOTAL)),
            "revenue_today_cents": revenue_today,
            "shops": count(Table::Customer),
            "buyers": count(Table::Buyer),
            "products": count(Table::Product),
            "shipments_in_transit": in_transit,
            "stock_units": optional_number(values.string(STOCK_UNITS)),
        },
        "counts": counts,
        "transactions_status": hash_json(values.hash(TRANSACTIONS_STATUS)),
        "revenue_daily_cents": hash_json(daily),
        "gmv_category_cents": hash_json(values.hash(GMV_CATEGORY)),
        "shipments_status": hash_json(shipments),
        "interactions_type": hash_json(values.hash(INTERACTIONS_TYPE)),
        "windows_30s": windows,
        "pipeline": hash_json(pipeline),
        "last_event_age_ms": last_event_age_ms,
        "summary": summary,
        "bad_keys": values.bad_keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    // 2026-11-22T12:00:00Z
    const NOON: i64 = 1_795_348_800_000;

    #[test]
    fn dates_are_utc_calendar_days() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(NOON), "2026-11-22");
        assert_eq!(utc_date(951_782_400_000), "2000-02-29");
        assert_eq!(utc_date(-1), "1969-12-31");
        assert!(utc_date(i64::MAX).starts_with("9999-12-"), "no panic");
    }

    #[test]
    fn counts_name_the_nine_tables_as_the_consumer_keys_them() {
        let mut values = RedisValues::default();
        for (i, table) in Table::ALL.into_iter().enumerate() {
            values.strings.insert(count_key(table), Some(i.to_string()));
        }
        let snap = assemble(&values, NOON);
        let counts = snap["counts"].as_object().expect("counts is an object");
        let names: Vec<&str> = counts.keys().map(String::as_str).collect();
        let mut expected = vec![
            "crm.interaction",
            "ecommerce.carrier",
            "ecommerce.shipment",
            "erp.stock",
            "instashop.buyer",
            "instashop.customer",
            "instashop.product",
            "instashop.transaction",
            "instashop.transactiondetail",
        ];
        expected.sort_unstable();
        assert_eq!(names, expected);
        assert_eq!(count_key(Table::Stock), "count:erp.stock");
        assert_eq!(counts["instashop.transactiondetail"], 4);
    }

    #[test]
    fn empty_redis_gives_nulls_not_zeros() {
        let snap = assemble(&RedisValues::default(), NOON);
        for kpi in [
            "purchases",
            "revenue_total_cents",
            "revenue_today_cents",
            "shops",
        ] {
            assert_eq!(snap["kpi"][kpi], Value::Null, "{kpi}");
        }
        assert_eq!(snap["kpi"]["shipments_in_transit"], Value::Null);
        assert_eq!(snap["gmv_category_cents"], Value::Null);
        assert_eq!(snap["last_event_age_ms"], Value::Null);
        assert_eq!(snap["windows_30s"].as_array().map(Vec::len), Some(120));
    }

    #[test]
    fn values_pass_through_exactly() {
        let mut v = RedisValues::default();
        v.strings.insert(
            count_key(Table::Transaction),
            Some("9007199254740993".into()),
        );
        v.strings
            .insert(count_key(Table::Customer), Some("12".into()));
        v.strings
            .insert(count_key(Table::Buyer), Some("not-a-number".into()));
        v.strings
            .insert(REVENUE_TOTAL.into(), Some("123456".into()));
        v.hashes.insert(
            REVENUE_DAILY.into(),
            hash(&[("2026-11-21", "100"), ("2026-11-22", "2599")]),
        );
        v.hashes.insert(
            SHIPMENTS_STATUS.into(),
            hash(&[("in_transit", "4"), ("delivered", "3")]),
        );
        let snap = assemble(&v, NOON);
        // Above 2^53: must not go through a float.
        assert_eq!(
            snap["kpi"]["purchases"].as_i64(),
            Some(9_007_199_254_740_993)
        );
        assert_eq!(snap["kpi"]["shops"], 12);
        assert_eq!(snap["kpi"]["buyers"], "not-a-number");
        assert_eq!(snap["kpi"]["revenue_total_cents"], 123_456);
        assert_eq!(snap["kpi"]["revenue_today_cents"], 2599);
        assert_eq!(snap["kpi"]["shipments_in_transit"], 4);
        assert_eq!(snap["revenue_daily_cents"]["2026-11-21"], 100);
        assert_eq!(
            snap["counts"]["instashop.transaction"].as_i64(),
            Some(9_007_199_254_740_993)
        );
        assert_eq!(snap["counts"]["erp.stock"], Value::Null);
    }

    #[test]
    fn absent_fields_of_present_hashes_are_zero() {
        let mut v = RedisValues::default();
        v.hashes
            .insert(REVENUE_DAILY.into(), hash(&[("2026-11-21", "100")]));
        v.hashes
            .insert(SHIPMENTS_STATUS.into(), hash(&[("delivered", "3")]));
        let snap = assemble(&v, NOON);
        assert_eq!(snap["kpi"]["revenue_today_cents"], 0);
        assert_eq!(snap["kpi"]["shipments_in_transit"], 0);
    }

    #[test]
    fn windows_cover_the_last_hour_oldest_first() {
        let starts = window_starts(NOON + 29_999);
        assert_eq!(starts.len(), 120);
        assert_eq!(starts.last().copied(), Some(NOON / 1000));
        assert_eq!(starts.first().copied(), Some(NOON / 1000 - 119 * 30));
        let mut v = RedisValues::default();
        v.windows.insert(
            NOON / 1000 - 30,
            hash(&[("transactions", "5"), ("revenue_cents", "1999")]),
        );
        let snap = assemble(&v, NOON + 1000);
        let windows = snap["windows_30s"].as_array().cloned().unwrap_or_default();
        assert_eq!(windows[118]["start"], NOON / 1000 - 30);
        assert_eq!(windows[118]["transactions"], 5);
        assert_eq!(windows[118]["revenue_cents"], 1999);
        assert_eq!(windows[119]["transactions"], 0);
    }

    #[test]
    fn last_event_age_from_any_ts_ms_field() {
        let mut v = RedisValues::default();
        v.hashes.insert(
            PIPELINE.into(),
            hash(&[
                ("last_source_ts_ms", "1795348795000"),
                ("events_applied", "10"),
            ]),
        );
        let snap = assemble(&v, NOON);
        assert_eq!(snap["last_event_age_ms"], 5000);
        assert_eq!(snap["pipeline"]["events_applied"], 10);
    }

    #[test]
    fn summary_json_is_embedded_or_null() {
        let mut v = RedisValues::default();
        v.strings
            .insert(DASHBOARD_JSON.into(), Some("{\"a\":1}".into()));
        assert_eq!(assemble(&v, NOON)["summary"]["a"], 1);
        v.strings
            .insert(DASHBOARD_JSON.into(), Some("{oops".into()));
        assert_eq!(assemble(&v, NOON)["summary"], Value::Null);
    }
}
