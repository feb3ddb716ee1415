//! The simulated shop platform: a seeded, pure state machine that turns
//! "the next event" into row changes ([`Op`]s) for the four databases.
//!
//! Determinism: every decision comes from one seeded RNG and the event
//! number, never from the clock or from database answers; row ids come from an
//! [`IdSource`] that hands out sequence values in request order. Same seed,
//! same starting state, same ids ⇒ same ops.
//!
//! Time is counted in events. Lifecycle steps (a pending purchase resolved, a
//! shipment moving on, a refund) are scheduled a random number of events
//! ahead; rarer platform changes (signups, price changes, deletions of rows
//! nothing references) run every N events, so at the default 10 events/s
//! every table sees inserts, updates and deletes within a minute.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use fake::Fake;
use fake::faker::address::en::{BuildingNumber, CityName, CountryCode, StreetName, ZipCode};
use fake::faker::company::en::CompanyName;
use fake::faker::internet::en::SafeEmail;
use fake::faker::lorem::en::{Sentence, Words};
use fake::faker::name::en::{LastName, Name};
use rand::rngs::Xoshiro256PlusPlus;
use rand::seq::IndexedRandom;
use rand::{RngExt, SeedableRng};

use crate::op::{Database, Op, ShipStatus, Table, TxStatus};
use crate::words;

/// Most lifecycle tasks handled per event; the rest wait for the next one.
pub const MAX_TASKS_PER_EVENT: usize = 8;

/// Upper bound of new rows per table (indexed by [`Table::index`]) that `n`
/// consecutive events can create; the id pool keeps at least this many.
/// Periodic jobs with period `p` run at most `n / p + 1` times.
pub fn max_new_rows(n: u64) -> [u64; 9] {
    let signups = n / 50 + 1;
    let products = signups * 12 + n / 60 + 1;
    [
        signups,
        signups * 20 + n / 40 + 1,
        products,
        n,
        5 * n,
        n,
        products * 3,
        n / 200 + 1,
        // The purchase, resolved pending purchases, relabels.
        n * (1 + MAX_TASKS_PER_EVENT as u64) + n / 100 + 1,
    ]
}

/// Upper bound of ids the base data needs (indexed by [`Table::index`]).
pub const BASE_IDS: [u64; 9] = [
    BASE_CUSTOMERS as u64,
    BASE_CUSTOMERS as u64 * 20,
    BASE_CUSTOMERS as u64 * 12,
    0,
    0,
    0,
    BASE_CUSTOMERS as u64 * 12 * 3,
    words::CARRIERS.len() as u64,
    0,
];

const BASE_CUSTOMERS: usize = 40;
const REORDER_LEVEL: i32 = 10;

/// The model asked for an id the pool does not have (a sizing bug).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the id pool of table {} ran dry", .0.name())]
pub struct IdsExhausted(pub Table);

/// Hands out fresh primary keys.
pub trait IdSource {
    /// The next id for `table`.
    fn next_id(&mut self, table: Table) -> Result<i64, IdsExhausted>;
}

/// Ops of one or more events, split per database, plus counts.
#[derive(Debug, Default, Clone)]
pub struct Output {
    /// Ops per database, indexed by [`Database::index`].
    pub ops: [Vec<Op>; 4],
    /// Events produced.
    pub events: u64,
    /// Purchases among them.
    pub purchases: u64,
}

impl Output {
    fn push(&mut self, op: Op) {
        self.ops[op.database().index()].push(op);
    }

    /// Ops of one database.
    pub fn of(&self, db: Database) -> &[Op] {
        &self.ops[db.index()]
    }
}

/// What already exists in the databases when the generator starts on
/// non-empty tables (loaded by `schema`).
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// id, plan, is_active.
    pub customers: Vec<(i64, String, bool)>,
    /// id, customer_id, has any purchase.
    pub buyers: Vec<(i64, i64, bool)>,
    /// id, customer_id, price in cents, category, sold at least once.
    pub products: Vec<(i64, i64, i64, String, bool)>,
    /// id, product_id, quantity.
    pub stock: Vec<(i64, i64, i32)>,
    /// id, name.
    pub carriers: Vec<(i64, String)>,
    /// Pending purchases: id, lines (detail id, product id, quantity, unit cents).
    pub pending: Vec<(i64, Vec<Line>)>,
    /// Shipments not yet delivered or returned: id, transaction id, status.
    pub shipments: Vec<(i64, i64, ShipStatus)>,
}

/// One purchase line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line {
    /// transactiondetail id.
    pub detail_id: i64,
    /// product id.
    pub product_id: i64,
    /// Units.
    pub quantity: i32,
    /// Unit price in cents.
    pub unit_cents: i64,
}

/// Ids that can be picked uniformly at random and removed in O(1).
#[derive(Debug, Default, Clone)]
struct IdSet {
    ids: Vec<i64>,
    pos: HashMap<i64, usize>,
}

impl IdSet {
    fn insert(&mut self, id: i64) {
        if !self.pos.contains_key(&id) {
            self.pos.insert(id, self.ids.len());
            self.ids.push(id);
        }
    }

    fn remove(&mut self, id: i64) {
        if let Some(i) = self.pos.remove(&id) {
            self.ids.swap_remove(i);
            if let Some(&moved) = self.ids.get(i) {
                self.pos.insert(moved, i);
            }
        }
    }

    fn pick(&self, rng: &mut Xoshiro256PlusPlus) -> Option<i64> {
        self.ids.choose(rng).copied()
    }

    fn len(&self) -> usize {
        self.ids.len()
    }
}

#[derive(Debug, Clone)]
struct Customer {
    plan: usize,
    active: bool,
    trial: bool,
    buyers: Vec<i64>,
    products: Vec<i64>,
}

#[derive(Debug, Clone)]
struct Product {
    customer_id: i64,
    price_cents: i64,
    category: usize,
    /// Stock rows: id, quantity, restock scheduled.
    slots: Vec<(i64, i32, bool)>,
}

#[derive(Debug, Clone)]
struct Shipment {
    transaction_id: i64,
    status: ShipStatus,
    return_on_arrival: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Task {
    Resolve(i64),
    CartEdit(i64),
    Refund(i64),
    Advance(i64),
    Restock(i64),
    ResolveTicket(i64),
    Churn(i64),
}

/// The simulated platform.
#[derive(Debug)]
pub struct Model {
    rng: Xoshiro256PlusPlus,
    purchase_share: f64,
    event: u64,
    customers: HashMap<i64, Customer>,
    all_customers: IdSet,
    shops: IdSet,
    buyer_owner: HashMap<i64, i64>,
    all_buyers: IdSet,
    idle_buyers: IdSet,
    products: HashMap<i64, Product>,
    all_products: IdSet,
    unsold: IdSet,
    stock_owner: HashMap<i64, i64>,
    carriers: HashMap<i64, String>,
    active_carriers: IdSet,
    onboarding_carrier: Option<i64>,
    pending: HashMap<i64, Vec<Line>>,
    /// Completed purchases that will be refunded: their shipment, if any.
    refunds: HashMap<i64, Option<i64>>,
    shipments: HashMap<i64, Shipment>,
    fresh_shipments: IdSet,
    tasks: BinaryHeap<Reverse<(u64, u64, Task)>>,
    task_seq: u64,
}

fn weighted(rng: &mut Xoshiro256PlusPlus, items: &[(&'static str, u32)]) -> (usize, &'static str) {
    let total: u32 = items.iter().map(|(_, w)| w).sum();
    let mut roll = rng.random_range(0..total);
    for (i, (name, w)) in items.iter().enumerate() {
        if roll < *w {
            return (i, name);
        }
        roll -= w;
    }
    (0, items[0].0)
}

/// A version-4 UUID from the seeded RNG.
fn uuid(rng: &mut Xoshiro256PlusPlus) -> String {
    let mut b: [u8; 16] = rng.random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl Model {
    /// A platform with nothing in it yet; call [`Model::seed_base_data`] or
    /// start from a [`Snapshot`] with [`Model::resume`].
    pub fn new(seed: u64, purchase_share: f64) -> Model {
        Model {
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
            purchase_share: purchase_share.clamp(0.0, 1.0),
            event: 0,
            customers: HashMap::new(),
            all_customers: IdSet::default(),
            shops: IdSet::default(),
            buyer_owner: HashMap::new(),
            all_buyers: IdSet::default(),
            idle_buyers: IdSet::default(),
            products: HashMap::new(),
            all_products: IdSet::default(),
            unsold: IdSet::default(),
            stock_owner: HashMap::new(),
            carriers: HashMap::new(),
            active_carriers: IdSet::default(),
            onboarding_carrier: None,
            pending: HashMap::new(),
            refunds: HashMap::new(),
            shipments: HashMap::new(),
            fresh_shipments: IdSet::default(),
            tasks: BinaryHeap::new(),
            task_seq: 0,
        }
    }

    /// A platform continuing from rows already in the databases.
    pub fn resume(seed: u64, purchase_share: f64, snap: Snapshot) -> Model {
        let mut m = Model::new(seed, purchase_share);
        for (id, plan, active) in snap.customers {
            let plan = words::PLANS
                .iter()
                .position(|(p, _)| *p == plan)
                .unwrap_or(0);
            m.customers.insert(
                id,
                Customer {
                    plan,
                    active,
                    trial: false,
                    buyers: Vec::new(),
                    products: Vec::new(),
                },
            );
            m.all_customers.insert(id);
        }
        for (id, customer_id, has_tx) in snap.buyers {
            if let Some(c) = m.customers.get_mut(&customer_id) {
                c.buyers.push(id);
                m.buyer_owner.insert(id, customer_id);
                m.all_buyers.insert(id);
                if !has_tx {
                    m.idle_buyers.insert(id);
                }
            }
        }
        for (id, customer_id, price_cents, category, sold) in snap.products {
            if let Some(c) = m.customers.get_mut(&customer_id) {
                c.products.push(id);
                let category = words::CATEGORIES
                    .iter()
                    .position(|c| *c == category)
                    .unwrap_or(0);
                m.products.insert(
                    id,
                    Product {
                        customer_id,
                        price_cents,
                        category,
                        slots: Vec::new(),
                    },
                );
                m.all_products.insert(id);
                if !sold {
                    m.unsold.insert(id);
                }
            }
        }
        for (id, product_id, quantity) in snap.stock {
            if let Some(p) = m.products.get_mut(&product_id) {
                p.slots.push((id, quantity, false));
                m.stock_owner.insert(id, product_id);
            }
        }
        for (id, name) in snap.carriers {
            m.carriers.insert(id, name);
            m.active_carriers.insert(id);
        }
        let ids: Vec<i64> = m.all_customers.ids.clone();
        for id in ids {
            m.refresh_shop(id);
        }
        for (id, lines) in snap.pending {
            m.pending.insert(id, lines);
            let delay = m.rng.random_range(5..80);
            m.schedule(delay, Task::Resolve(id));
        }
        for (id, transaction_id, status) in snap.shipments {
            m.shipments.insert(
                id,
                Shipment {
                    transaction_id,
                    status,
                    return_on_arrival: false,
                },
            );
            if status == ShipStatus::Created {
                m.fresh_shipments.insert(id);
            }
            let delay = m.rng.random_range(10..150);
            m.schedule(delay, Task::Advance(id));
        }
        m
    }

    /// Events produced so far.
    pub fn events(&self) -> u64 {
        self.event
    }

    /// The platform a fresh install starts with: shops with buyers, products
    /// and stock, and the carriers unless some exist already.
    pub fn seed_base_data(
        &mut self,
        ids: &mut impl IdSource,
        out: &mut Output,
    ) -> Result<(), IdsExhausted> {
        let carriers = if self.carriers.is_empty() {
            words::CARRIERS
        } else {
            &[]
        };
        for (name, template) in carriers {
            let id = ids.next_id(Table::Carrier)?;
            out.push(Op::InsertCarrier {
                id,
                name: (*name).to_owned(),
                template: (*template).to_owned(),
            });
            self.carriers.insert(id, (*name).to_owned());
            self.active_carriers.insert(id);
        }
        for _ in 0..BASE_CUSTOMERS {
            self.signup(ids, out, false)?;
        }
        Ok(())
    }

    /// Produces one event (a purchase or a behaviour event) and the lifecycle
    /// work due at it.
    pub fn step(&mut self, ids: &mut impl IdSource, out: &mut Output) -> Result<(), IdsExhausted> {
        self.event += 1;
        out.events += 1;
        if self.rng.random_bool(self.purchase_share) {
            if self.purchase(ids, out)? {
                out.purchases += 1;
            }
        } else {
            self.interaction(ids, out)?;
        }
        for _ in 0..MAX_TASKS_PER_EVENT {
            match self.tasks.peek() {
                Some(Reverse((due, _, _))) if *due <= self.event => {}
                _ => break,
            }
            if let Some(Reverse((_, _, task))) = self.tasks.pop() {
                self.run_task(task, ids, out)?;
            }
        }
        self.periodic(ids, out)
    }

    fn schedule(&mut self, delay: u64, task: Task) {
        self.task_seq += 1;
        self.tasks
            .push(Reverse((self.event + delay.max(1), self.task_seq, task)));
    }

    fn refresh_shop(&mut self, id: i64) {
        let shoppable = self
            .customers
            .get(&id)
            .is_some_and(|c| c.active && !c.buyers.is_empty() && !c.products.is_empty());
        if shoppable {
            self.shops.insert(id);
        } else {
            self.shops.remove(id);
        }
    }

    fn set_tx_status(out: &mut Output, id: i64, from: TxStatus, to: TxStatus) {
        // The model only ever asks for allowed transitions; the check keeps it so.
        if from.can_become(to) {
            out.push(Op::UpdateTransactionStatus { id, from, to });
        }
    }

    fn set_ship_status(&mut self, out: &mut Output, id: i64, to: ShipStatus) -> bool {
        let Some(s) = self.shipments.get_mut(&id) else {
            return false;
        };
        if !s.status.can_become(to) {
            return false;
        }
        out.push(Op::UpdateShipmentStatus {
            id,
            from: s.status,
            to,
        });
        s.status = to;
        if to != ShipStatus::Created {
            self.fresh_shipments.remove(id);
        }
        true
    }

    // ----- events -----

    fn purchase(
        &mut self,
        ids: &mut impl IdSource,
        out: &mut Output,
    ) -> Result<bool, IdsExhausted> {
        let Some(customer_id) = self.shops.pick(&mut self.rng) else {
            return Ok(false);
        };
        let Some(c) = self.customers.get(&customer_id) else {
            return Ok(false);
        };
        let Some(&buyer_id) = c.buyers.choose(&mut self.rng) else {
            return Ok(false);
        };
        let (n, _) = weighted(
            &mut self.rng,
            &[("1", 35), ("2", 30), ("3", 20), ("4", 10), ("5", 5)],
        );
        let n = (n + 1).min(c.products.len());
        let picked: Vec<i64> = rand::seq::index::sample(&mut self.rng, c.products.len(), n)
            .iter()
            .map(|i| c.products[i])
            .collect();

        let id = ids.next_id(Table::Transaction)?;
        let mut lines = Vec::with_capacity(n);
        for product_id in picked {
            let (q, _) = weighted(&mut self.rng, &[("1", 70), ("2", 20), ("3", 7), ("4", 3)]);
            let unit_cents = self.products.get(&product_id).map_or(0, |p| p.price_cents);
            lines.push(Line {
                detail_id: ids.next_id(Table::TransactionDetail)?,
                product_id,
                quantity: q as i32 + 1,
                unit_cents,
            });
        }
        let total_cents = lines
            .iter()
            .map(|l| i64::from(l.quantity) * l.unit_cents)
            .sum();
        let (roll, _) = weighted(
            &mut self.rng,
            &[("completed", 68), ("pending", 27), ("failed", 5)],
        );
        let status = [TxStatus::Completed, TxStatus::Pending, TxStatus::Failed][roll];
        let (_, payment_method) = weighted(&mut self.rng, words::PAYMENT_METHODS);
        out.push(Op::InsertTransaction {
            id,
            external_id: uuid(&mut self.rng),
            customer_id,
            buyer_id,
            total_cents,
            payment_method,
            status,
        });
        for l in &lines {
            out.push(Op::InsertDetail {
                id: l.detail_id,
                transaction_id: id,
                product_id: l.product_id,
                quantity: l.quantity,
                unit_cents: l.unit_cents,
            });
            self.unsold.remove(l.product_id);
        }
        self.idle_buyers.remove(buyer_id);

        match status {
            TxStatus::Completed => self.complete(id, &lines, ids, out)?,
            TxStatus::Pending => {
                let delay = self.rng.random_range(5..80);
                if self.rng.random_bool(0.15) {
                    let edit = self.rng.random_range(1..delay);
                    self.schedule(edit, Task::CartEdit(id));
                }
                self.pending.insert(id, lines);
                self.schedule(delay, Task::Resolve(id));
            }
            TxStatus::Failed | TxStatus::Refunded => {}
        }
        Ok(true)
    }

    /// Paid: stock leaves the warehouse, a shipment is created, and a few
    /// purchases are later refunded.
    fn complete(
        &mut self,
        id: i64,
        lines: &[Line],
        ids: &mut impl IdSource,
        out: &mut Output,
    ) -> Result<(), IdsExhausted> {
        let mut restock = Vec::new();
        for l in lines {
            let Some(p) = self.products.get_mut(&l.product_id) else {
                continue;
            };
            let Some(slot) = p.slots.iter_mut().max_by_key(|s| (s.1, Reverse(s.0))) else {
                continue;
            };
            let take = l.quantity.min(slot.1);
            if take > 0 {
                slot.1 -= take;
                out.push(Op::AdjustStock {
                    id: slot.0,
                    delta: -take,
                });
            }
            if slot.1 < REORDER_LEVEL && !slot.2 {
                slot.2 = true;
                restock.push(slot.0);
            }
        }
        for stock_id in restock {
            let delay = self.rng.random_range(20..200);
            self.schedule(delay, Task::Restock(stock_id));
        }
        let shipment = self.new_shipment(id, ids, out)?;
        if self.rng.random_bool(0.04) {
            self.refunds.insert(id, shipment);
            let delay = self.rng.random_range(5..400);
            self.schedule(delay, Task::Refund(id));
        }
        Ok(())
    }

    fn new_shipment(
        &mut self,
        transaction_id: i64,
        ids: &mut impl IdSource,
        out: &mut Output,
    ) -> Result<Option<i64>, IdsExhausted> {
        let Some(carrier_id) = self.active_carriers.pick(&mut self.rng) else {
            return Ok(None);
        };
        let carrier = self.carriers.get(&carrier_id).cloned().unwrap_or_default();
        let id = ids.next_id(Table::Shipment)?;
        let prefix: String = carrier
            .chars()
            .filter(char::is_ascii_alphabetic)
            .take(2)
            .collect::<String>()
            .to_ascii_uppercase();
        let tracking_code = format!(
            "{prefix}{:014}",
            self.rng.random_range(0..100_000_000_000_000u64)
        );
        let rng = &mut self.rng;
        let name: String = Name().fake_with_rng(rng);
        let building: String = BuildingNumber().fake_with_rng(rng);
        let street: String = StreetName().fake_with_rng(rng);
        let zip: String = ZipCode().fake_with_rng(rng);
        let city: String = CityName().fake_with_rng(rng);
        let grams = rng.random_range(100..20_000);
        let label = format!(
            "^XA\n^CF0,30^FO40,40^FD{carrier}^FS\n^CF0,24^FO40,90^FDSHIP TO: {name}^FS\n\
             ^FO40,125^FD{building} {street}^FS\n^FO40,160^FD{zip} {city}^FS\n\
             ^BY3^FO40,220^BCN,120,Y,N,N^FD{tracking_code}^FS\n\
             ^FO40,380^FDWEIGHT {}.{:03} KG  ORDER {transaction_id}^FS\n^XZ\n",
            grams / 1000,
            grams % 1000
        );
        out.push(Op::InsertShipment {
            id,
            transaction_id,
            carrier_id,
            tracking_code,
            label: label.into_bytes(),
        });
        self.shipments.insert(
            id,
            Shipment {
                transaction_id,
                status: ShipStatus::Created,
                return_on_arrival: false,
            },
        );
        self.fresh_shipments.insert(id);
        let delay = self.rng.random_range(10..80);
        self.schedule(delay, Task::Advance(id));
        Ok(Some(id))
    }

    fn interaction(
        &mut self,
        ids: &mut impl IdSource,
        out: &mut Output,
    ) -> Result<(), IdsExhausted> {
        let Some(customer_id) = self.shops.pick(&mut self.rng) else {
            return Ok(());
        };
        let Some(c) = self.customers.get(&customer_id) else {
            return Ok(());
        };
        let Some(&buyer_id) = c.buyers.choose(&mut self.rng) else {
            return Ok(());
        };
        let product_id = c.products.choose(&mut self.rng).copied().unwrap_or(0);
        let (_, kind) = weighted(&mut self.rng, words::INTERACTIONS);
        let rng = &mut self.rng;
        let device = words::DEVICES.choose(rng).copied().unwrap_or("desktop");
        let payload = match kind {
            "view" => serde_json::json!({
                "product_id": product_id,
                "page": format!("/products/{product_id}"),
                "device": device,
                "referrer": words::REFERRERS.choose(rng).copied().unwrap_or("direct"),
                "duration_ms": rng.random_range(300..120_000),
            }),
            "click" => serde_json::json!({
                "product_id": product_id,
                "element": (["add_to_wishlist", "image_gallery", "reviews", "size_guide"]
                    .choose(rng).copied().unwrap_or("reviews")),
                "device": device,
            }),
            "search" => {
                let words: Vec<String> = Words(1..4).fake_with_rng(rng);
                serde_json::json!({
                    "query": words.join(" "),
                    "results": rng.random_range(0..200),
                    "device": device,
                })
            }
            "cart_add" => serde_json::json!({
                "product_id": product_id,
                "quantity": rng.random_range(1..4),
                "device": device,
            }),
            "cart_abandonment" => serde_json::json!({
                "items": rng.random_range(1..6),
                "value_cents": rng.random_range(500..50_000),
                "device": device,
            }),
            _ => serde_json::json!({
                "subject": words::TICKET_SUBJECTS.choose(rng).copied().unwrap_or("Other"),
                "priority": (["low", "normal", "high"].choose(rng).copied().unwrap_or("normal")),
                "status": "open",
                "channel": (["email", "chat", "phone"].choose(rng).copied().unwrap_or("email")),
            }),
        };
        let id = ids.next_id(Table::Interaction)?;
        out.push(Op::InsertInteraction {
            id,
            customer_id,
            buyer_id,
            kind,
            session_id: uuid(&mut self.rng),
            payload: payload.to_string(),
        });
        if kind == "support_ticket" && self.rng.random_bool(0.8) {
            let delay = self.rng.random_range(20..200);
            self.schedule(delay, Task::ResolveTicket(id));
        }
        Ok(())
    }

    // ----- lifecycle tasks -----

    fn run_task(
        &mut self,
        task: Task,
        ids: &mut impl IdSource,
        out: &mut Output,
    ) -> Result<(), IdsExhausted> {
        match task {
            Task::Resolve(id) => {
                let Some(lines) = self.pending.remove(&id) else {
                    return Ok(());
                };
                let (roll, _) = weighted(
                    &mut self.rng,
                    &[("completed", 82), ("failed", 10), ("abandoned", 8)],
                );
                match roll {
                    0 => {
                        Self::set_tx_status(out, id, TxStatus::Pending, TxStatus::Completed);
                        self.complete(id, &lines, ids, out)?;
                    }
                    1 => Self::set_tx_status(out, id, TxStatus::Pending, TxStatus::Failed),
                    _ => {
                        for l in &lines {
                            out.push(Op::DeleteDetail {
                                id: l.detail_id,
                                transaction_id: id,
                            });
                        }
                        out.push(Op::Delete {
                            table: Table::Transaction,
                            id,
                        });
                    }
                }
            }
            Task::CartEdit(id) => {
                let rng = &mut self.rng;
                let Some(lines) = self.pending.get_mut(&id) else {
                    return Ok(());
                };
                if lines.is_empty() {
                    return Ok(());
                }
                let i = rng.random_range(0..lines.len());
                let old = lines[i].quantity;
                let new = (old + rng.random_range(1..4) - 1) % 4 + 1;
                let new = if new == old { old % 4 + 1 } else { new };
                lines[i].quantity = new;
                let total_cents = lines
                    .iter()
                    .map(|l| i64::from(l.quantity) * l.unit_cents)
                    .sum();
                out.push(Op::UpdateDetailQuantity {
                    id: lines[i].detail_id,
                    transaction_id: id,
                    quantity: new,
                });
                out.push(Op::UpdateTransactionTotal { id, total_cents });
            }
            Task::Refund(id) => {
                let Some(shipment) = self.refunds.remove(&id) else {
                    return Ok(());
                };
                Self::set_tx_status(out, id, TxStatus::Completed, TxStatus::Refunded);
                if let Some(sid) = shipment {
                    match self.shipments.get(&sid).map(|s| s.status) {
                        Some(ShipStatus::Created) => {
                            // Cancelled before it left: the label is voided.
                            out.push(Op::Delete {
                                table: Table::Shipment,
                                id: sid,
                            });
                            self.shipments.remove(&sid);
                            self.fresh_shipments.remove(sid);
                        }
                        Some(ShipStatus::InTransit) => {
                            if let Some(s) = self.shipments.get_mut(&sid) {
                                s.return_on_arrival = true;
                            }
                        }
                        Some(ShipStatus::Delivered) => {
                            self.set_ship_status(out, sid, ShipStatus::Returned);
                            self.shipments.remove(&sid);
                        }
                        _ => {}
                    }
                }
            }
            Task::Advance(sid) => {
                let Some(s) = self.shipments.get(&sid) else {
                    return Ok(());
                };
                match s.status {
                    ShipStatus::Created => {
                        self.set_ship_status(out, sid, ShipStatus::InTransit);
                        let delay = self.rng.random_range(20..150);
                        self.schedule(delay, Task::Advance(sid));
                    }
                    ShipStatus::InTransit => {
                        let lost = self.rng.random_bool(0.03);
                        if s.return_on_arrival || lost {
                            self.set_ship_status(out, sid, ShipStatus::Returned);
                            self.shipments.remove(&sid);
                        } else {
                            self.set_ship_status(out, sid, ShipStatus::Delivered);
                            if self.rng.random_bool(0.05) {
                                let delay = self.rng.random_range(20..300);
                                self.schedule(delay, Task::Advance(sid));
                            } else if !self
                                .shipments
                                .get(&sid)
                                .is_some_and(|s| self.refunds.contains_key(&s.transaction_id))
                            {
                                self.shipments.remove(&sid);
                            }
                        }
                    }
                    ShipStatus::Delivered => {
                        self.set_ship_status(out, sid, ShipStatus::Returned);
                        self.shipments.remove(&sid);
                    }
                    ShipStatus::Returned => {
                        self.shipments.remove(&sid);
                    }
                }
            }
            Task::Restock(stock_id) => {
                let rng = &mut self.rng;
                let Some(product_id) = self.stock_owner.get(&stock_id) else {
                    return Ok(());
                };
                let Some(p) = self.products.get_mut(product_id) else {
                    return Ok(());
                };
                if let Some(slot) = p.slots.iter_mut().find(|s| s.0 == stock_id) {
                    let delta = rng.random_range(50..300);
                    slot.1 += delta;
                    slot.2 = false;
                    out.push(Op::AdjustStock {
                        id: stock_id,
                        delta,
                    });
                }
            }
            Task::ResolveTicket(id) => {
                let resolution = ["answered", "refund_issued", "replacement_sent", "no_reply"]
                    .choose(&mut self.rng)
                    .copied()
                    .unwrap_or("answered");
                out.push(Op::PatchInteraction {
                    id,
                    patch: serde_json::json!({"status": "resolved", "resolution": resolution})
                        .to_string(),
                });
            }
            Task::Churn(id) => {
                let empty = self
                    .customers
                    .get(&id)
                    .is_some_and(|c| c.trial && c.buyers.is_empty() && c.products.is_empty());
                if empty {
                    out.push(Op::Delete {
                        table: Table::Customer,
                        id,
                    });
                    self.customers.remove(&id);
                    self.all_customers.remove(id);
                    self.shops.remove(id);
                }
            }
        }
        Ok(())
    }

    // ----- platform changes every N events -----

    fn periodic(&mut self, ids: &mut impl IdSource, out: &mut Output) -> Result<(), IdsExhausted> {
        let e = self.event;
        if e % 50 == 7 {
            let trial = self.rng.random_bool(0.4);
            self.signup(ids, out, trial)?;
        }
        if e % 40 == 3
            && let Some(cid) = self.shops.pick(&mut self.rng)
        {
            self.new_buyer(cid, ids, out)?;
        }
        if e % 60 == 11
            && let Some(cid) = self.shops.pick(&mut self.rng)
        {
            self.new_product(cid, ids, out)?;
        }
        if e % 25 == 5 {
            self.change_price(out);
        }
        if e % 70 == 13 {
            self.change_category(out);
        }
        if e % 80 == 17 {
            self.change_plan(out);
        }
        if e % 300 == 150
            && self.shops.len() > 10
            && let Some(cid) = self.shops.pick(&mut self.rng)
        {
            out.push(Op::SetCustomerActive {
                id: cid,
                active: false,
            });
            if let Some(c) = self.customers.get_mut(&cid) {
                c.active = false;
            }
            self.refresh_shop(cid);
        }
        if e % 90 == 29
            && let Some(id) = self.all_buyers.pick(&mut self.rng)
        {
            let email: String = SafeEmail().fake_with_rng(&mut self.rng);
            out.push(Op::UpdateBuyerEmail { id, email });
        }
        if e % 100 == 31 {
            self.delete_idle_buyer(out);
        }
        if e % 120 == 37 {
            self.delete_unsold_product(out);
        }
        if e % 100 == 61 {
            self.relabel(ids, out)?;
        }
        if e % 10 == 9 {
            out.push(Op::PurgeInteractions { count: 2 });
        }
        if e % 200 == 71 {
            self.carrier_cycle(e / 200, ids, out)?;
        }
        Ok(())
    }

    fn signup(
        &mut self,
        ids: &mut impl IdSource,
        out: &mut Output,
        trial: bool,
    ) -> Result<(), IdsExhausted> {
        let id = ids.next_id(Table::Customer)?;
        let rng = &mut self.rng;
        let name: String = CompanyName().fake_with_rng(rng);
        let email: String = SafeEmail().fake_with_rng(rng);
        let (plan, plan_name) = weighted(rng, words::PLANS);
        let country: String = CountryCode().fake_with_rng(rng);
        out.push(Op::InsertCustomer {
            id,
            name,
            email,
            plan: plan_name,
            country,
        });
        self.customers.insert(
            id,
            Customer {
                plan,
                active: true,
                trial,
                buyers: Vec::new(),
                products: Vec::new(),
            },
        );
        self.all_customers.insert(id);
        if trial {
            // Signed up, never set the shop up: gone again soon.
            let delay = self.rng.random_range(30..150);
            self.schedule(delay, Task::Churn(id));
            return Ok(());
        }
        let buyers = self.rng.random_range(5..=20);
        for _ in 0..buyers {
            self.new_buyer(id, ids, out)?;
        }
        let products = self.rng.random_range(3..=12);
        for _ in 0..products {
            self.new_product(id, ids, out)?;
        }
        Ok(())
    }

    fn new_buyer(
        &mut self,
        customer_id: i64,
        ids: &mut impl IdSource,
        out: &mut Output,
    ) -> Result<(), IdsExhausted> {
        let id = ids.next_id(Table::Buyer)?;
        let rng = &mut self.rng;
        let name: String = Name().fake_with_rng(rng);
        let email: String = SafeEmail().fake_with_rng(rng);
        let birth_date = format!(
            "{}-{:02}-{:02}",
            rng.random_range(1950..2008),
            rng.random_range(1..=12),
            rng.random_range(1..=28)
        );
        out.push(Op::InsertBuyer {
            id,
            customer_id,
            name,
            email,
            birth_date,
        });
        if let Some(c) = self.customers.get_mut(&customer_id) {
            c.buyers.push(id);
        }
        self.buyer_owner.insert(id, customer_id);
        self.all_buyers.insert(id);
        self.idle_buyers.insert(id);
        self.refresh_shop(customer_id);
        Ok(())
    }

    fn new_product(
        &mut self,
        customer_id: i64,
        ids: &mut impl IdSource,
        out: &mut Output,
    ) -> Result<(), IdsExhausted> {
        let id = ids.next_id(Table::Product)?;
        let rng = &mut self.rng;
        let name = format!(
            "{} {} {}",
            words::ADJECTIVES.choose(rng).copied().unwrap_or("Classic"),
            words::MATERIALS.choose(rng).copied().unwrap_or("Steel"),
            words::NOUNS.choose(rng).copied().unwrap_or("Mug")
        );
        let category = rng.random_range(0..words::CATEGORIES.len());
        let (band, _) = weighted(rng, &[("low", 50), ("mid", 35), ("high", 15)]);
        let dollars = match band {
            0 => rng.random_range(2..20),
            1 => rng.random_range(20..100),
            _ => rng.random_range(100..1000),
        };
        let price_cents = dollars * 100 + [99, 0, 49, 95].choose(rng).copied().unwrap_or(99);
        let tag_count = rng.random_range(0..=3);
        let tags: Vec<&str> = words::TAGS.sample(rng, tag_count).copied().collect();
        let sentence: String = Sentence(6..14).fake_with_rng(rng);
        out.push(Op::InsertProduct {
            id,
            customer_id,
            name,
            category: words::CATEGORIES[category],
            price_cents,
            tags: format!("{{{}}}", tags.join(",")),
            description: sentence,
        });
        let warehouses = self.rng.random_range(1..=3);
        let mut slots = Vec::new();
        for warehouse in words::WAREHOUSES.sample(&mut self.rng, warehouses) {
            let sid = ids.next_id(Table::Stock)?;
            let quantity = self.rng.random_range(20..400);
            out.push(Op::InsertStock {
                id: sid,
                product_id: id,
                warehouse,
                quantity,
                reorder_level: REORDER_LEVEL,
            });
            slots.push((sid, quantity, false));
            self.stock_owner.insert(sid, id);
        }
        self.products.insert(
            id,
            Product {
                customer_id,
                price_cents,
                category,
                slots,
            },
        );
        self.all_products.insert(id);
        self.unsold.insert(id);
        if let Some(c) = self.customers.get_mut(&customer_id) {
            c.products.push(id);
        }
        self.refresh_shop(customer_id);
        Ok(())
    }

    fn change_price(&mut self, out: &mut Output) {
        let Some(id) = self.all_products.pick(&mut self.rng) else {
            return;
        };
        let pct = self.rng.random_range(5..=20);
        let up = self.rng.random_bool(0.5);
        if let Some(p) = self.products.get_mut(&id) {
            let factor = if up { 100 + pct } else { 100 - pct };
            p.price_cents = (p.price_cents * factor / 100).max(99);
            out.push(Op::UpdateProductPrice {
                id,
                price_cents: p.price_cents,
            });
        }
    }

    fn change_category(&mut self, out: &mut Output) {
        let Some(id) = self.all_products.pick(&mut self.rng) else {
            return;
        };
        let shift = self.rng.random_range(1..words::CATEGORIES.len());
        if let Some(p) = self.products.get_mut(&id) {
            p.category = (p.category + shift) % words::CATEGORIES.len();
            out.push(Op::UpdateProductCategory {
                id,
                category: words::CATEGORIES[p.category],
            });
        }
    }

    fn change_plan(&mut self, out: &mut Output) {
        let Some(id) = self.all_customers.pick(&mut self.rng) else {
            return;
        };
        let shift = self.rng.random_range(1..words::PLANS.len());
        if let Some(c) = self.customers.get_mut(&id) {
            c.plan = (c.plan + shift) % words::PLANS.len();
            out.push(Op::UpdateCustomerPlan {
                id,
                plan: words::PLANS[c.plan].0,
            });
        }
    }

    /// A buyer who never bought anything asks to be forgotten.
    fn delete_idle_buyer(&mut self, out: &mut Output) {
        let Some(id) = self.idle_buyers.pick(&mut self.rng) else {
            return;
        };
        out.push(Op::Delete {
            table: Table::Buyer,
            id,
        });
        self.idle_buyers.remove(id);
        self.all_buyers.remove(id);
        if let Some(cid) = self.buyer_owner.remove(&id) {
            if let Some(c) = self.customers.get_mut(&cid) {
                c.buyers.retain(|b| *b != id);
            }
            self.refresh_shop(cid);
        }
    }

    /// A product that never sold is delisted, with its stock rows.
    fn delete_unsold_product(&mut self, out: &mut Output) {
        let Some(id) = self.unsold.pick(&mut self.rng) else {
            return;
        };
        let Some(p) = self.products.remove(&id) else {
            return;
        };
        for (sid, _, _) in &p.slots {
            out.push(Op::Delete {
                table: Table::Stock,
                id: *sid,
            });
            self.stock_owner.remove(sid);
        }
        out.push(Op::Delete {
            table: Table::Product,
            id,
        });
        self.unsold.remove(id);
        self.all_products.remove(id);
        if let Some(c) = self.customers.get_mut(&p.customer_id) {
            c.products.retain(|x| *x != id);
        }
        self.refresh_shop(p.customer_id);
    }

    /// A label that failed address validation is voided and reprinted,
    /// possibly with another carrier.
    fn relabel(&mut self, ids: &mut impl IdSource, out: &mut Output) -> Result<(), IdsExhausted> {
        let Some(sid) = self.fresh_shipments.pick(&mut self.rng) else {
            return Ok(());
        };
        let Some(old) = self.shipments.remove(&sid) else {
            return Ok(());
        };
        self.fresh_shipments.remove(sid);
        out.push(Op::Delete {
            table: Table::Shipment,
            id: sid,
        });
        let new = self.new_shipment(old.transaction_id, ids, out)?;
        if let Some(entry) = self.refunds.get_mut(&old.transaction_id) {
            *entry = new;
        }
        Ok(())
    }

    /// Carriers come and go: one is onboarded, the next cycle updates a
    /// carrier's tracking URL, the one after either cancels the onboarding
    /// (delete: nothing references it yet) or activates it.
    fn carrier_cycle(
        &mut self,
        cycle: u64,
        ids: &mut impl IdSource,
        out: &mut Output,
    ) -> Result<(), IdsExhausted> {
        match cycle % 3 {
            0 => {
                if self.onboarding_carrier.is_none() {
                    let id = ids.next_id(Table::Carrier)?;
                    let last: String = LastName().fake_with_rng(&mut self.rng);
                    let name = format!("{last} Freight {id}");
                    let slug: String = last
                        .chars()
                        .filter(char::is_ascii_alphanumeric)
                        .collect::<String>()
                        .to_ascii_lowercase();
                    out.push(Op::InsertCarrier {
                        id,
                        name: name.clone(),
                        template: format!("https://track.{slug}-freight.example/{{code}}"),
                    });
                    self.carriers.insert(id, name);
                    self.onboarding_carrier = Some(id);
                }
            }
            1 => {
                if let Some(id) = self.active_carriers.pick(&mut self.rng) {
                    let version = self.rng.random_range(2..9);
                    let slug: String = self
                        .carriers
                        .get(&id)
                        .map(|n| {
                            n.chars()
                                .filter(char::is_ascii_alphanumeric)
                                .collect::<String>()
                                .to_ascii_lowercase()
                        })
                        .unwrap_or_default();
                    out.push(Op::UpdateCarrier {
                        id,
                        template: format!("https://api.{slug}.example/v{version}/track/{{code}}"),
                    });
                }
            }
            _ => {
                if let Some(id) = self.onboarding_carrier.take() {
                    if (cycle / 3).is_multiple_of(2) {
                        out.push(Op::Delete {
                            table: Table::Carrier,
                            id,
                        });
                        self.carriers.remove(&id);
                    } else {
                        self.active_carriers.insert(id);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap as Map, HashSet};

    use super::*;
    use crate::op::Change;

    /// Sequential ids per table, like a fresh database's sequences.
    #[derive(Default)]
    struct Counter([i64; 9]);

    impl IdSource for Counter {
        fn next_id(&mut self, table: Table) -> Result<i64, IdsExhausted> {
            self.0[table.index()] += 1;
            Ok(self.0[table.index()])
        }
    }

    fn run(seed: u64, events: u64) -> Output {
        let mut ids = Counter::default();
        let mut out = Output::default();
        let mut m = Model::new(seed, 0.7);
        m.seed_base_data(&mut ids, &mut out).expect("ids");
        for _ in 0..events {
            m.step(&mut ids, &mut out).expect("ids");
        }
        out
    }

    #[test]
    fn same_seed_same_ops() {
        let a = run(7, 3000);
        let b = run(7, 3000);
        assert_eq!(a.ops, b.ops);
        let c = run(8, 3000);
        assert_ne!(a.ops, c.ops);
    }

    #[test]
    fn mix_is_respected() {
        let out = run(1, 10_000);
        assert_eq!(out.events, 10_000);
        assert!(
            (6_700..7_300).contains(&out.purchases),
            "purchases {}",
            out.purchases
        );
    }

    /// Replays the ops on an in-memory copy of the tables and checks the
    /// invariants the integration tests check in SQL.
    #[test]
    fn invariants_hold_over_a_long_run() {
        let out = run(3, 20_000);
        let mut tx: Map<i64, (TxStatus, i64)> = Map::new();
        let mut details: Map<i64, (i64, i32, i64, i64)> = Map::new();
        let mut stock: Map<i64, i32> = Map::new();
        let mut ships: Map<i64, (i64, ShipStatus)> = Map::new();
        let mut products: HashSet<i64> = HashSet::new();
        let mut changes: HashSet<(Table, Change)> = HashSet::new();
        for op in out.ops.iter().flatten() {
            let stmt = op.stmt();
            changes.insert((stmt.table(), stmt.change()));
            match op {
                Op::InsertProduct { id, .. } => {
                    products.insert(*id);
                }
                Op::Delete {
                    table: Table::Product,
                    id,
                } => {
                    assert!(
                        details.values().all(|d| d.3 != *id),
                        "deleted product {id} still sold"
                    );
                    products.remove(id);
                }
                Op::InsertTransaction {
                    id,
                    total_cents,
                    status,
                    ..
                } => {
                    tx.insert(*id, (*status, *total_cents));
                }
                Op::UpdateTransactionStatus { id, from, to } => {
                    let t = tx.get_mut(id).expect("updated purchase exists");
                    assert_eq!(t.0, *from);
                    assert!(from.can_become(*to));
                    t.0 = *to;
                }
                Op::UpdateTransactionTotal { id, total_cents } => {
                    let t = tx.get_mut(id).expect("purchase exists");
                    assert_eq!(t.0, TxStatus::Pending, "only carts change");
                    t.1 = *total_cents;
                }
                Op::Delete {
                    table: Table::Transaction,
                    id,
                } => {
                    let t = tx.remove(id).expect("deleted purchase exists");
                    assert_eq!(t.0, TxStatus::Pending, "only abandoned carts are deleted");
                    assert!(details.values().all(|d| d.0 != *id), "details left behind");
                }
                Op::InsertDetail {
                    id,
                    transaction_id,
                    product_id,
                    quantity,
                    unit_cents,
                } => {
                    assert!(tx.contains_key(transaction_id));
                    assert!(products.contains(product_id));
                    details.insert(*id, (*transaction_id, *quantity, *unit_cents, *product_id));
                }
                Op::UpdateDetailQuantity { id, quantity, .. } => {
                    details.get_mut(id).expect("detail exists").1 = *quantity;
                }
                Op::DeleteDetail { id, .. } => {
                    details.remove(id).expect("detail exists");
                }
                Op::InsertStock { id, quantity, .. } => {
                    stock.insert(*id, *quantity);
                }
                Op::AdjustStock { id, delta } => {
                    let q = stock.get_mut(id).expect("stock row exists");
                    *q += delta;
                    assert!(*q >= 0, "stock {id} would go negative");
                }
                Op::Delete {
                    table: Table::Stock,
                    id,
                } => {
                    stock.remove(id).expect("stock row exists");
                }
                Op::InsertShipment {
                    id,
                    transaction_id,
                    label,
                    ..
                } => {
                    // Ops are replayed database by database, so the purchase
                    // already has its final status here.
                    let t = tx.get(transaction_id).expect("shipped purchase exists");
                    assert!(matches!(t.0, TxStatus::Completed | TxStatus::Refunded));
                    assert!((200..600).contains(&label.len()), "label {}", label.len());
                    ships.insert(*id, (*transaction_id, ShipStatus::Created));
                }
                Op::UpdateShipmentStatus { id, from, to } => {
                    let s = ships.get_mut(id).expect("shipment exists");
                    assert_eq!(s.1, *from);
                    assert!(from.can_become(*to));
                    s.1 = *to;
                }
                _ => {}
            }
        }
        let mut sums: Map<i64, i64> = Map::new();
        for (t, q, u, _) in details.values() {
            *sums.entry(*t).or_default() += i64::from(*q) * u;
        }
        for (id, (_, total)) in &tx {
            assert_eq!(sums.get(id).copied().unwrap_or(0), *total, "purchase {id}");
        }
        for (t, _) in ships.values() {
            let status = tx.get(t).expect("purchase of shipment exists").0;
            assert!(matches!(status, TxStatus::Completed | TxStatus::Refunded));
        }
        for table in Table::ALL {
            for change in Change::ALL {
                assert!(
                    changes.contains(&(table, change)),
                    "no {} on {}",
                    change.name(),
                    table.name()
                );
            }
        }
    }

    #[test]
    fn every_table_changes_within_600_events() {
        // A minute at the default 10 events/s, with the default seed too.
        for seed in [11, 42] {
            let out = run(seed, 600);
            let mut changes = HashSet::new();
            for op in out.ops.iter().flatten() {
                changes.insert((op.stmt().table(), op.stmt().change()));
            }
            for table in Table::ALL {
                for change in Change::ALL {
                    assert!(
                        changes.contains(&(table, change)),
                        "seed {seed}: no {} on {}",
                        change.name(),
                        table.name()
                    );
                }
            }
        }
    }

    #[test]
    fn id_bounds_hold_for_any_window() {
        for n in [1u64, 7, 100, 2000] {
            let mut ids = Counter::default();
            let mut out = Output::default();
            let mut m = Model::new(5, 0.7);
            m.seed_base_data(&mut ids, &mut out).expect("ids");
            for _ in 0..(20_000 / n) {
                let before = ids.0;
                for _ in 0..n {
                    m.step(&mut ids, &mut out).expect("ids");
                }
                let bound = max_new_rows(n);
                for t in Table::ALL {
                    let used = (ids.0[t.index()] - before[t.index()]) as u64;
                    assert!(
                        used <= bound[t.index()],
                        "{} used {used} of {}",
                        t.name(),
                        bound[t.index()]
                    );
                }
            }
        }
    }

    #[test]
    fn uuids_are_version_4() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
        let u = uuid(&mut rng);
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"));
    }
}
