//! Shared support for the integration tests: the local stack's addresses, a
//! random but coherent workload over the nine tables that emits hand-made
//! Debezium events, and the independent check: the workload's final rows are
//! loaded into a scratch PostgreSQL database built from `sql/*.sql` and the
//! README's SQL definitions run there; every metric in Redis must equal them.
#![allow(dead_code, clippy::unwrap_used, clippy::print_stdout)]

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

pub mod reader;

/// Addresses of the local stack (from `.local/env`).
pub struct Stack {
    pub kafka: String,
    pub redis: String,
    pub pg_admin: String,
}

/// Loads `.local/env`; fails the test with a clear message if the stack is down.
pub fn stack() -> Stack {
    local_stack::envfile::load();
    local_stack::init_tracing();
    let var = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| {
            panic!("{k} is not set: the local stack is not up; run scripts/up first")
        })
    };
    let s = Stack {
        kafka: var("KAFKA_BOOTSTRAP_SERVERS"),
        redis: var("REDIS_URL"),
        pg_admin: var("PG_ADMIN_URL"),
    };
    let client = redis::Client::open(s.redis.as_str()).unwrap();
    client
        .get_connection_with_timeout(Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("redis at {} unreachable ({e}): run scripts/up", s.redis));
    s
}

/// A name no other test or run uses.
pub fn unique(base: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{base}{}x{nanos}", std::process::id())
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Creates topics with the cluster's default replication factor.
pub async fn create_topics(kafka: &str, names: &[String], partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .create()
        .unwrap();
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(-1)))
        .collect();
    let results = tokio::time::timeout(
        Duration::from_secs(30),
        admin.create_topics(
            &topics,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        ),
    )
    .await
    .unwrap_or_else(|_| {
        panic!("creating topics at {kafka} timed out: are the brokers up (scripts/up)?")
    })
    .unwrap_or_else(|e| {
        panic!("creating topics at {kafka} failed ({e}): are the brokers up (scripts/up)?")
    });
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("cannot create topic {t}: {e}"));
    }
}

/// Deletes a test's topics (after its checks passed).
pub async fn delete_topics(kafka: &str, names: &[String]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .create()
        .unwrap();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let results = tokio::time::timeout(
        Duration::from_secs(30),
        admin.delete_topics(
            &names,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        ),
    )
    .await
    .unwrap_or_else(|_| panic!("deleting topics at {kafka} timed out"))
    .unwrap_or_else(|e| panic!("deleting topics at {kafka} failed ({e})"));
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("cannot delete topic {t}: {e}"));
    }
}

pub fn producer(kafka: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("linger.ms", "5")
        .set("message.timeout.ms", "120000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap()
}

/// One Kafka message to produce.
#[derive(Clone, Debug)]
pub struct Msg {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

/// Produces messages in order (per key order is kept: same key, same partition).
pub async fn produce(producer: &FutureProducer, msgs: &[Msg]) {
    let mut pending = Vec::with_capacity(msgs.len().min(20_000));
    for m in msgs {
        let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&m.topic);
        if let Some(k) = &m.key {
            rec = rec.key(k.as_slice());
        }
        if let Some(v) = &m.value {
            rec = rec.payload(v.as_slice());
        }
        pending.push(producer.send_result(rec).map_err(|(e, _)| e).unwrap());
        if pending.len() >= 20_000 {
            for p in pending.drain(..) {
                p.await.unwrap().map_err(|(e, _)| e).unwrap();
            }
        }
    }
    for p in pending {
        p.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

/// High watermark per `topic/partition`.
pub fn high_watermarks(kafka: &str, topics: &[String], partitions: i32) -> BTreeMap<String, i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .create()
        .unwrap();
    let mut out = BTreeMap::new();
    for t in topics {
        for p in 0..partitions {
            let (_, high) = c.fetch_watermarks(t, p, Duration::from_secs(10)).unwrap();
            out.insert(format!("{t}/{p}"), high);
        }
    }
    out
}

/// Waits until the offsets stored in Redis reach the high watermarks.
pub fn wait_caught_up(
    s: &Stack,
    prefix: &str,
    topics: &[String],
    partitions: i32,
    deadline: Duration,
) {
    let highs = high_watermarks(&s.kafka, topics, partitions);
    let mut con = redis::Client::open(s.redis.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let start = Instant::now();
    loop {
        let stored: HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(format!("{prefix}offsets"))
            .query(&mut con)
            .unwrap();
        let behind: Vec<_> = highs
            .iter()
            .filter(|(tp, high)| **high > 0 && stored.get(*tp).copied().unwrap_or(0) < **high)
            .collect();
        if behind.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < deadline,
            "consumer did not catch up within {deadline:?}; behind: {behind:?}, stored: {stored:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Topic names for one test run.
#[derive(Clone, Debug)]
pub struct Topics {
    pub base: String,
}

pub const TABLES: [(&str, &str); 9] = [
    ("instashop", "customer"),
    ("instashop", "buyer"),
    ("instashop", "product"),
    ("instashop", "transaction"),
    ("instashop", "transactiondetail"),
    ("crm", "interaction"),
    ("erp", "stock"),
    ("ecommerce", "carrier"),
    ("ecommerce", "shipment"),
];

impl Topics {
    pub fn topic(&self, db: &str, table: &str) -> String {
        format!("{}.{db}.public.{table}", self.base)
    }
    pub fn all(&self) -> Vec<String> {
        TABLES.iter().map(|(d, t)| self.topic(d, t)).collect()
    }
}

const CATEGORIES: [&str; 5] = ["toys", "books", "garden", "electronics", "food & drink"];
const TX_STATUS: [&str; 4] = ["pending", "completed", "failed", "refunded"];
const INTERACTIONS: [&str; 6] = [
    "view",
    "click",
    "search",
    "cart_add",
    "cart_abandonment",
    "support_ticket",
];
const SHIP_STATUS: [&str; 4] = ["created", "in_transit", "delivered", "returned"];

/// A random workload: the current rows (Debezium `after` images in string
/// decimal mode) and the events that produced them.
pub struct Model {
    rng: StdRng,
    pub topics: Topics,
    lsn: u64,
    next_id: BTreeMap<&'static str, i64>,
    pub rows: BTreeMap<&'static str, BTreeMap<i64, Value>>,
    pub now_s: i64,
}

fn iso(epoch_s: i64, micros: i64) -> String {
    let secs = epoch_s.rem_euclid(86_400);
    format!(
        "{}T{:02}:{:02}:{:02}.{micros:06}Z",
        metrics_consumer::fold::utc_date(epoch_s).unwrap(),
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

fn cents_text(c: i64) -> String {
    format!("{}.{:02}", c / 100, c % 100)
}

impl Model {
    pub fn new(seed: u64, topics: Topics) -> Model {
        Model {
            rng: StdRng::seed_from_u64(seed),
            topics,
            lsn: 1_000,
            next_id: BTreeMap::new(),
            rows: TABLES.iter().map(|(_, t)| (*t, BTreeMap::new())).collect(),
            now_s: now_ms() / 1000,
        }
    }

    fn db_of(table: &str) -> &'static str {
        TABLES
            .iter()
            .find(|(_, t)| *t == table)
            .map(|(d, _)| *d)
            .unwrap()
    }

    fn id(&mut self, table: &'static str) -> i64 {
        let n = self.next_id.entry(table).or_insert(0);
        *n += 1;
        *n
    }

    fn pick(&mut self, table: &str) -> Option<i64> {
        let rows = &self.rows[table];
        if rows.is_empty() {
            return None;
        }
        let i = self.rng.random_range(0..rows.len());
        rows.keys().nth(i).copied()
    }

    /// Re-encodes money columns in a random Debezium decimal mode.
    fn encode_money(&mut self, table: &str, after: &Value) -> Value {
        let mut after = after.clone();
        let field = match table {
            "transaction" => "total_amount",
            "transactiondetail" => "unit_price",
            "product" => "price",
            _ => return after,
        };
        let text = after[field].as_str().unwrap().to_owned();
        let cents = metrics_consumer::money::cents_from_decimal(&text).unwrap();
        let mode = self.rng.random_range(0..4);
        let b64 = |v: i64| {
            let bytes = v.to_be_bytes();
            let skip = bytes.iter().take_while(|b| **b == 0).count().min(7);
            let mut trimmed = bytes[skip..].to_vec();
            if trimmed[0] & 0x80 != 0 {
                trimmed.insert(0, 0);
            }
            base64::engine::general_purpose::STANDARD.encode(trimmed)
        };
        after[field] = match mode {
            0 => json!(text),
            1 => json!(b64(cents)),
            2 => json!({"scale": 3, "value": b64(cents * 10)}),
            _ => json!(cents as f64 / 100.0),
        };
        after
    }

    /// One Debezium event (and a tombstone after a delete).
    fn emit(
        &mut self,
        out: &mut Vec<Msg>,
        table: &'static str,
        id: i64,
        op: &str,
        after: Option<Value>,
    ) {
        self.lsn += self.rng.random_range(1..50);
        let db = Self::db_of(table);
        let after = after.map(|a| self.encode_money(table, &a));
        let before = if op == "d" {
            json!({"id": id})
        } else {
            Value::Null
        };
        let ts = now_ms();
        let mut value = json!({
            "before": before,
            "after": after,
            "source": {"version": "2.7.0.Final", "connector": "postgresql", "name": db, "ts_ms": ts,
                        "snapshot": if op == "r" { "true" } else { "false" }, "db": db,
                        "sequence": format!("[\"{}\",\"{}\"]", self.lsn - 1, self.lsn),
                        "schema": "public", "table": table, "txId": self.lsn / 3, "lsn": self.lsn, "xmin": null},
            "op": op, "ts_ms": ts
        });
        let mut key = json!({"id": id});
        if self.rng.random_bool(0.1) {
            value = json!({"schema": {"type": "struct", "optional": false, "name": "envelope"}, "payload": value});
            key = json!({"schema": {"type": "struct"}, "payload": key});
        }
        let topic = self.topics.topic(db, table);
        let key_bytes = serde_json::to_vec(&key).unwrap();
        out.push(Msg {
            topic: topic.clone(),
            key: Some(key_bytes.clone()),
            value: Some(serde_json::to_vec(&value).unwrap()),
        });
        if op == "d" {
            out.push(Msg {
                topic,
                key: Some(key_bytes),
                value: None,
            });
        }
    }

    fn upsert(&mut self, out: &mut Vec<Msg>, table: &'static str, id: i64, after: Value) {
        let op = if self.rows[table].contains_key(&id) {
            "u"
        } else {
            "c"
        };
        self.rows.get_mut(table).unwrap().insert(id, after.clone());
        self.emit(out, table, id, op, Some(after));
    }

    fn delete(&mut self, out: &mut Vec<Msg>, table: &'static str, id: i64) {
        if self.rows.get_mut(table).unwrap().remove(&id).is_some() {
            self.emit(out, table, id, "d", None);
        }
    }

    fn created_at(&mut self) -> String {
        // Mostly within the last 50 minutes (live windows), some days old.
        let back = if self.rng.random_bool(0.8) {
            self.rng.random_range(0..3000)
        } else {
            self.rng.random_range(3 * 86_400..9 * 86_400)
        };
        let micros = self.rng.random_range(0..1_000_000);
        iso(self.now_s - back, micros)
    }

    /// Appends `n` random operations' events.
    pub fn step(&mut self, n: usize) -> Vec<Msg> {
        let mut out = Vec::new();
        for _ in 0..n {
            let roll = self.rng.random_range(0..100);
            match roll {
                0..=4 => {
                    let id = self.id("customer");
                    self.upsert(&mut out, "customer", id, json!({"id": id, "name": "c", "email": "c@x", "subscription_plan": "free", "country": "NL", "is_active": true, "created_at": iso(self.now_s, 0)}));
                }
                5..=9 => {
                    let id = self.id("buyer");
                    self.upsert(&mut out, "buyer", id, json!({"id": id, "customer_id": 1, "name": "b", "email": "b@x", "birth_date": 9000, "created_at": iso(self.now_s, 0)}));
                }
                10..=13 => {
                    // A product id may be used by details before the product exists.
                    let id = self.id("product");
                    let cat = CATEGORIES[self.rng.random_range(0..CATEGORIES.len())];
                    let price = cents_text(self.rng.random_range(0..100_000));
                    self.upsert(&mut out, "product", id, json!({"id": id, "customer_id": 1, "name": "p", "category": cat, "price": price, "tags": ["a"], "description": null}));
                }
                14..=16 => {
                    if let Some(id) = self.pick("product") {
                        let mut row = self.rows["product"][&id].clone();
                        row["category"] =
                            json!(CATEGORIES[self.rng.random_range(0..CATEGORIES.len())]);
                        self.upsert(&mut out, "product", id, row);
                    }
                }
                17 => {
                    if let Some(id) = self.pick("product") {
                        self.delete(&mut out, "product", id);
                    }
                }
                18..=39 => {
                    let id = self.id("transaction");
                    let status = TX_STATUS[self.rng.random_range(0..3)];
                    let details = self.rng.random_range(1..4);
                    let mut total = 0;
                    let max_product = self.next_id.get("product").copied().unwrap_or(0) + 3;
                    let mut detail_rows = Vec::new();
                    for _ in 0..details {
                        let did = self.id("transactiondetail");
                        let q = self.rng.random_range(1..5);
                        let price = self.rng.random_range(0..20_000);
                        total += q * price;
                        let pid = self.rng.random_range(1..=max_product);
                        detail_rows.push((did, json!({"id": did, "transaction_id": id, "product_id": pid, "quantity": q, "unit_price": cents_text(price)})));
                    }
                    let created = self.created_at();
                    self.upsert(&mut out, "transaction", id, json!({"id": id, "external_id": format!("00000000-0000-0000-0000-{id:012}"), "customer_id": 1, "buyer_id": 1, "total_amount": cents_text(total), "currency": "USD", "payment_method": "paypal", "status": status, "created_at": created, "updated_at": created}));
                    for (did, row) in detail_rows {
                        self.upsert(&mut out, "transactiondetail", did, row);
                    }
                }
                40..=51 => {
                    if let Some(id) = self.pick("transaction") {
                        let mut row = self.rows["transaction"][&id].clone();
                        let next = match row["status"].as_str().unwrap() {
                            "pending" => {
                                if self.rng.random_bool(0.8) {
                                    "completed"
                                } else {
                                    "failed"
                                }
                            }
                            "completed" => "refunded",
                            other => other,
                        }
                        .to_owned();
                        row["status"] = json!(next);
                        if self.rng.random_bool(0.1) {
                            row["total_amount"] =
                                json!(cents_text(self.rng.random_range(0..500_000)));
                        }
                        self.upsert(&mut out, "transaction", id, row);
                    }
                }
                52..=53 => {
                    if let Some(id) = self.pick("transaction") {
                        let details: Vec<i64> = self.rows["transactiondetail"]
                            .iter()
                            .filter(|(_, r)| r["transaction_id"] == json!(id))
                            .map(|(k, _)| *k)
                            .collect();
                        for d in details {
                            self.delete(&mut out, "transactiondetail", d);
                        }
                        self.delete(&mut out, "transaction", id);
                    }
                }
                54..=56 => {
                    if let Some(id) = self.pick("transactiondetail") {
                        let mut row = self.rows["transactiondetail"][&id].clone();
                        row["quantity"] = json!(self.rng.random_range(1..9));
                        self.upsert(&mut out, "transactiondetail", id, row);
                    }
                }
                57..=69 => {
                    let id = self.id("interaction");
                    let t = INTERACTIONS[self.rng.random_range(0..INTERACTIONS.len())];
                    self.upsert(&mut out, "interaction", id, json!({"id": id, "customer_id": 1, "buyer_id": 1, "interaction_type": t, "session_id": null, "payload": "{\"page\": 1}", "created_at": iso(self.now_s, 0)}));
                }
                70..=72 => {
                    if let Some(id) = self.pick("interaction") {
                        self.delete(&mut out, "interaction", id);
                    }
                }
                73..=78 => {
                    let id = self.id("stock");
                    let q = self.rng.random_range(0..1000);
                    self.upsert(&mut out, "stock", id, json!({"id": id, "product_id": id, "warehouse": "w1", "quantity": q, "reorder_level": 10, "updated_at": iso(self.now_s, 0)}));
                }
                79..=84 => {
                    if let Some(id) = self.pick("stock") {
                        let mut row = self.rows["stock"][&id].clone();
                        row["quantity"] = json!(self.rng.random_range(0..1000));
                        self.upsert(&mut out, "stock", id, row);
                    }
                }
                85 => {
                    if let Some(id) = self.pick("stock") {
                        self.delete(&mut out, "stock", id);
                    }
                }
                86..=87 => {
                    let id = self.id("carrier");
                    self.upsert(&mut out, "carrier", id, json!({"id": id, "name": format!("carrier{id}"), "tracking_url_template": "t", "created_at": iso(self.now_s, 0)}));
                }
                88..=93 => {
                    let id = self.id("shipment");
                    self.upsert(&mut out, "shipment", id, json!({"id": id, "transaction_id": 1, "carrier_id": 1, "status": "created", "tracking_code": "x", "label": null, "created_at": iso(self.now_s, 0), "updated_at": iso(self.now_s, 0)}));
                }
                94..=98 => {
                    if let Some(id) = self.pick("shipment") {
                        let mut row = self.rows["shipment"][&id].clone();
                        row["status"] =
                            json!(SHIP_STATUS[self.rng.random_range(0..SHIP_STATUS.len())]);
                        self.upsert(&mut out, "shipment", id, row);
                    }
                }
                _ => {
                    if let Some(id) = self.pick("shipment") {
                        self.delete(&mut out, "shipment", id);
                    }
                }
            }
        }
        out
    }

    /// A repeated snapshot: an `r` event for every live row, at later LSNs.
    pub fn snapshot(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        let all: Vec<(&'static str, i64, Value)> = self
            .rows
            .iter()
            .flat_map(|(t, rows)| rows.iter().map(|(id, r)| (*t, *id, r.clone())))
            .collect();
        for (t, id, row) in all {
            self.emit(&mut out, t, id, "r", Some(row));
        }
        out
    }

    /// Malformed messages of every kind, spread over the topics.
    pub fn malformed(&mut self) -> Vec<Msg> {
        let t = self.topics.topic("instashop", "transaction");
        let s = self.topics.topic("erp", "stock");
        let bad = |topic: &str, v: &str| Msg {
            topic: topic.to_owned(),
            key: Some(b"{\"id\":999999}".to_vec()),
            value: Some(v.as_bytes().to_vec()),
        };
        vec![
            bad(&t, "this is not json"),
            bad(&s, "{\"truncated\": "),
            bad(
                &t,
                r#"{"before":null,"after":{"id":1},"source":{"db":"instashop","table":"transaction"}}"#,
            ),
            bad(
                &s,
                r#"{"before":null,"after":{"id":1},"source":{"db":"erp","table":"nosuchtable","lsn":1},"op":"c"}"#,
            ),
            bad(
                &t,
                r#"{"before":null,"after":{"id":999999,"status":"completed"},"source":{"db":"instashop","table":"transaction","lsn":1},"op":"c"}"#,
            ),
            bad(
                &t,
                r#"{"before":null,"after":{"id":999999,"status":"completed","total_amount":"NAN","created_at":"2026-01-01T00:00:00Z"},"source":{"db":"instashop","table":"transaction","lsn":1},"op":"c"}"#,
            ),
        ]
    }
}

/// Metrics as `name` or `name|field` -> value, zeros dropped.
pub type Metrics = BTreeMap<String, i64>;

/// Reads every metric under `prefix` from Redis (windows newer than `min_window`).
pub fn redis_metrics(s: &Stack, prefix: &str, min_window: i64) -> Metrics {
    let mut con = redis::Client::open(s.redis.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let mut m = Metrics::new();
    for (db, t) in TABLES {
        let v: Option<i64> = redis::cmd("GET")
            .arg(format!("{prefix}count:{db}.{t}"))
            .query(&mut con)
            .unwrap();
        m.insert(format!("count:{db}.{t}"), v.unwrap_or(0));
    }
    for k in ["revenue:total_cents", "stock:units"] {
        let v: Option<i64> = redis::cmd("GET")
            .arg(format!("{prefix}{k}"))
            .query(&mut con)
            .unwrap();
        m.insert(k.to_owned(), v.unwrap_or(0));
    }
    for h in [
        "transactions:status",
        "revenue:daily_cents",
        "gmv:category_cents",
        "shipments:status",
        "interactions:type",
    ] {
        let v: BTreeMap<String, i64> = redis::cmd("HGETALL")
            .arg(format!("{prefix}{h}"))
            .query(&mut con)
            .unwrap();
        for (f, n) in v {
            m.insert(format!("{h}|{f}"), n);
        }
    }
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}window:30s:*"))
        .query(&mut con)
        .unwrap();
    for k in keys {
        let start: i64 = k.rsplit(':').next().unwrap().parse().unwrap();
        if start < min_window {
            continue;
        }
        let ttl: i64 = redis::cmd("TTL").arg(&k).query(&mut con).unwrap();
        assert!(ttl > 0 && ttl <= 3630, "window {k} has TTL {ttl}");
        let v: BTreeMap<String, i64> = redis::cmd("HGETALL").arg(&k).query(&mut con).unwrap();
        for (f, n) in v {
            m.insert(format!("window:30s:{start}|{f}"), n);
        }
    }
    m.retain(|_, v| *v != 0);
    m
}

pub fn pipeline_hash(s: &Stack, prefix: &str) -> BTreeMap<String, i64> {
    let mut con = redis::Client::open(s.redis.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    redis::cmd("HGETALL")
        .arg(format!("{prefix}pipeline"))
        .query(&mut con)
        .unwrap()
}

fn sql_text(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::String(s) => format!("'{}'", s.replace('\'', "''")),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Array(a) => {
            let items: Vec<String> = a
                .iter()
                .map(|x| x.as_str().unwrap_or("").replace('\'', "''"))
                .collect();
            format!("ARRAY['{}']::text[]", items.join("','"))
        }
        Value::Object(_) => unreachable!("no objects in rows"),
    }
}

/// The expected metrics: the model's final rows loaded into a scratch
/// database built from `sql/*.sql`, and the README's SQL definitions run there.
pub async fn sql_expected(s: &Stack, model: &Model, min_window: i64) -> Metrics {
    let (admin, conn) = tokio_postgres::connect(&s.pg_admin, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("postgres at PG_ADMIN_URL unreachable ({e}): run scripts/up"));
    tokio::spawn(conn);
    let db = unique("mc_check_");
    admin
        .simple_query(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let url = format!("{}/{db}", s.pg_admin.rsplit_once('/').unwrap().0);
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let handle = tokio::spawn(conn);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("sql");
    for f in ["instashop.sql", "crm.sql", "erp.sql", "ecommerce.sql"] {
        let text = std::fs::read_to_string(root.join(f)).unwrap();
        c.batch_execute(&text).await.unwrap();
    }
    // Load the final rows; referential checks off (rows arrive in any order).
    c.batch_execute("SET session_replication_role = replica")
        .await
        .unwrap();
    for (_, table) in TABLES {
        let rows = &model.rows[table];
        if rows.is_empty() {
            continue;
        }
        let cols: Vec<String> = rows
            .values()
            .next()
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        let rows: Vec<&Value> = rows.values().collect();
        for chunk in rows.chunks(500) {
            let values: Vec<String> = chunk
                .iter()
                .map(|r| {
                    let vals: Vec<String> = cols
                        .iter()
                        .map(|col| {
                            let v = &r[col];
                            if col == "birth_date" {
                                format!("(date '1970-01-01' + {})", v)
                            } else if col == "payload" {
                                format!("{}::jsonb", sql_text(v))
                            } else {
                                sql_text(v)
                            }
                        })
                        .collect();
                    format!("({})", vals.join(","))
                })
                .collect();
            let sql = format!(
                "INSERT INTO \"{table}\" ({}) VALUES {}",
                cols.join(","),
                values.join(",")
            );
            c.batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{e}: {}", &sql[..sql.len().min(300)]));
        }
    }
    let m = sql_metrics(&c, &TABLES, min_window).await;
    drop(c);
    handle.abort();
    admin
        .simple_query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
    m
}

/// The README's SQL definitions of the metrics over `tables` (the others
/// are absent from the database), run in a database holding them; windows
/// from `min_window` on; zeros dropped.
pub async fn sql_metrics(
    c: &tokio_postgres::Client,
    tables: &[(&str, &str)],
    min_window: i64,
) -> Metrics {
    let has = |t: &str| tables.iter().any(|(_, x)| *x == t);
    let mut m = Metrics::new();
    let q = |sql: &'static str| {
        let c = &c;
        async move {
            c.query(sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        }
    };
    for (db, t) in tables {
        let row = c
            .query_one(&format!("SELECT count(*) FROM \"{t}\""), &[])
            .await
            .unwrap();
        m.insert(format!("count:{db}.{t}"), row.get::<_, i64>(0));
    }
    for r in if has("transaction") {
        q("SELECT status::text, count(*) FROM transaction GROUP BY status").await
    } else {
        Vec::new()
    } {
        m.insert(
            format!("transactions:status|{}", r.get::<_, String>(0)),
            r.get(1),
        );
    }
    for r in if has("transaction") {
        q("SELECT coalesce(sum(total_amount*100),0)::bigint FROM transaction WHERE status='completed'").await
    } else {
        Vec::new()
    } {
        m.insert("revenue:total_cents".into(), r.get(0));
    }
    for r in if has("transaction") {
        q("SELECT to_char(created_at AT TIME ZONE 'UTC','YYYY-MM-DD'), sum(total_amount*100)::bigint FROM transaction WHERE status='completed' GROUP BY 1").await
    } else {
        Vec::new()
    } {
        m.insert(
            format!("revenue:daily_cents|{}", r.get::<_, String>(0)),
            r.get(1),
        );
    }
    for r in if has("transactiondetail") {
        q("SELECT p.category, sum(d.quantity*d.unit_price*100)::bigint FROM transactiondetail d JOIN product p ON p.id = d.product_id GROUP BY p.category").await
    } else {
        Vec::new()
    } {
        m.insert(
            format!("gmv:category_cents|{}", r.get::<_, String>(0)),
            r.get(1),
        );
    }
    for r in if has("stock") {
        q("SELECT coalesce(sum(quantity),0)::bigint FROM stock").await
    } else {
        Vec::new()
    } {
        m.insert("stock:units".into(), r.get(0));
    }
    for r in if has("shipment") {
        q("SELECT status, count(*) FROM shipment GROUP BY status").await
    } else {
        Vec::new()
    } {
        m.insert(
            format!("shipments:status|{}", r.get::<_, String>(0)),
            r.get(1),
        );
    }
    for r in if has("interaction") {
        q("SELECT interaction_type, count(*) FROM interaction GROUP BY 1").await
    } else {
        Vec::new()
    } {
        m.insert(
            format!("interactions:type|{}", r.get::<_, String>(0)),
            r.get(1),
        );
    }
    for r in if has("transaction") {
        q("SELECT (floor(extract(epoch FROM created_at)/30)*30)::bigint, count(*), coalesce(sum(total_amount*100) FILTER (WHERE status='completed'),0)::bigint FROM transaction GROUP BY 1").await
    } else {
        Vec::new()
    } {
        let start: i64 = r.get(0);
        if start >= min_window {
            m.insert(format!("window:30s:{start}|transactions"), r.get(1));
            m.insert(format!("window:30s:{start}|revenue_cents"), r.get(2));
        }
    }
    m.retain(|_, v| *v != 0);
    m
}

/// Asserts Redis equals SQL, printing a readable difference.
pub async fn assert_exact(s: &Stack, prefix: &str, model: &Model) {
    // Windows that stay inside the last hour for the duration of the check.
    let min_window = model.now_s - 3600 + 120;
    let expected = sql_expected(s, model, min_window).await;
    let actual = redis_metrics(s, prefix, min_window);
    if expected != actual {
        let mut diff = Vec::new();
        for k in expected.keys().chain(actual.keys()) {
            let (e, a) = (expected.get(k), actual.get(k));
            if e != a && !diff.iter().any(|(x, _, _): &(String, _, _)| x == k) {
                diff.push((k.clone(), e.copied(), a.copied()));
            }
        }
        panic!("metrics differ from SQL (key, sql, redis): {diff:#?}");
    }
    assert!(
        expected.len() > 20,
        "too few metrics to be a meaningful check: {expected:?}"
    );
}

/// A consumer config for tests.
pub fn config(
    s: &Stack,
    topics: &Topics,
    prefix: &str,
    group: &str,
    dlq: &str,
) -> metrics_consumer::Config {
    use clap::Parser;
    metrics_consumer::Config::parse_from([
        "metrics-consumer",
        "--bootstrap-servers",
        &s.kafka,
        "--redis-url",
        &s.redis,
        "--group",
        group,
        "--prefix",
        prefix,
        "--topics",
        &topics.all().join(","),
        "--dlq-topic",
        dlq,
        "--metrics-addr",
        "127.0.0.1:0",
    ])
}

/// Counts the messages of a topic (all partitions).
pub fn topic_count(kafka: &str, topic: &str, partitions: i32) -> i64 {
    high_watermarks(kafka, &[topic.to_owned()], partitions)
        .values()
        .sum()
}

/// Deletes a test's Redis keys (after its checks passed; a failed test keeps
/// them for inspection).
pub fn cleanup_redis(s: &Stack, prefix: &str) {
    let mut con = redis::Client::open(s.redis.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(&mut con)
        .unwrap();
    for chunk in keys.chunks(500) {
        redis::cmd("DEL").arg(chunk).query::<()>(&mut con).unwrap();
    }
}
