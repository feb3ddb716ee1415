//! The SQL that folds one batch's staged rows into the star schema, run in
//! the batch's transaction after the COPYs into the staging tables.
//!
//! Why it is correct whatever the arrival order: every version and fact row
//! carries the source position `(commit_lsn, lsn)` of the event it came
//! from, and every step decides by positions, never by arrival:
//!
//! * Dimensions (SCD2): each event becomes a version keyed by its position
//!   (a re-sent event meets that key and adds nothing); then, for the keys
//!   the batch touched, a version equal in its tracked attributes to the one
//!   before it is dropped (a re-snapshot, an update of untracked columns),
//!   and each version's `valid_to` is set to the next version's
//!   `valid_from`. A delete is a version with `is_deleted`.
//! * Facts hold the newest state per row: an upsert only replaces an older
//!   position, a delete only removes an older one, and an event older than
//!   a delete already recorded in `change_event` is not resurrected.
//! * Dimension keys of a fact are the versions valid at the fact's creation
//!   position. They are resolved for the batch's new facts and again for
//!   the facts at or after the position of any dimension version the batch
//!   added, so a sale that arrives before its product version is joined
//!   once that version arrives.

use std::fmt::Write as _;

use crate::shop::Entity;

/// `CREATE TEMP TABLE` statements of the staging tables (per connection).
pub fn staging_ddl() -> Vec<String> {
    let mut out = vec![
        "CREATE TEMP TABLE IF NOT EXISTS stage_event (LIKE change_event INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            .to_owned(),
        "CREATE TEMP TABLE IF NOT EXISTS marker_gone (row_key text NOT NULL, id bigint, before jsonb) ON COMMIT DELETE ROWS"
            .to_owned(),
    ];
    for entity in Entity::ALL {
        let mut sql = format!(
            "CREATE TEMP TABLE IF NOT EXISTS {} (op text NOT NULL, id bigint NOT NULL, row_key text NOT NULL, commit_lsn bigint NOT NULL, lsn bigint NOT NULL, commit_time timestamptz NOT NULL",
            entity.stage()
        );
        for c in entity.columns() {
            let _ = write!(sql, ", {} {}", c.name, c.kind.sql_type());
        }
        sql.push_str(") ON COMMIT DELETE ROWS");
        out.push(sql);
    }
    out
}

/// `COPY <staging table> (...) FROM STDIN` of an entity.
pub fn copy_into_stage(entity: Entity) -> String {
    let mut cols = "op, id, row_key, commit_lsn, lsn, commit_time".to_owned();
    for c in entity.columns() {
        let _ = write!(cols, ", {}", c.name);
    }
    format!("COPY {} ({cols}) FROM STDIN", entity.stage())
}

/// Moves the staged events into `change_event`: once per (table, key, lsn,
/// op, commit time). A snapshot read of our reader (it carries `commit_lsn`)
/// is always kept: it is the record that the row still existed at that
/// snapshot, which its snapshot-complete marker needs to tell the rows read
/// again from those deleted meanwhile. Another source's snapshot read (no
/// marker follows it) only when the row's last recorded state before it
/// differs (see sql/dwh.sql).
pub const INSERT_EVENTS: &str = "\
INSERT INTO change_event (source_db, source_table, row_key, op, commit_time, lsn, commit_lsn, snapshot, tx_id, before, after, kafka_topic, kafka_partition, kafka_offset)
SELECT s.source_db, s.source_table, s.row_key, s.op, s.commit_time, s.lsn, s.commit_lsn, s.snapshot, s.tx_id, s.before, s.after, s.kafka_topic, s.kafka_partition, s.kafka_offset
FROM stage_event s
WHERE s.op <> 'r' OR s.commit_lsn IS NOT NULL OR NOT EXISTS (
    SELECT 1 FROM (
        SELECT e.op, e.after FROM change_event e
        WHERE e.source_db = s.source_db AND e.source_table = s.source_table AND e.row_key = s.row_key
          AND (coalesce(e.commit_lsn, e.lsn), e.lsn) < (coalesce(s.commit_lsn, s.lsn), s.lsn)
        ORDER BY coalesce(e.commit_lsn, e.lsn) DESC, e.lsn DESC
        LIMIT 1
    ) last
    WHERE last.op <> 'd' AND last.after = s.after)
ON CONFLICT DO NOTHING";

/// A dimension: its table, natural and surrogate key columns.
#[derive(Debug, Clone, Copy)]
struct Dim {
    entity: Entity,
    table: &'static str,
    id: &'static str,
    key: &'static str,
}

const DIMS: [Dim; 4] = [
    Dim {
        entity: Entity::Customer,
        table: "dim_customer",
        id: "customer_id",
        key: "customer_key",
    },
    Dim {
        entity: Entity::Buyer,
        table: "dim_buyer",
        id: "buyer_id",
        key: "buyer_key",
    },
    Dim {
        entity: Entity::Product,
        table: "dim_product",
        id: "product_id",
        key: "product_key",
    },
    Dim {
        entity: Entity::Carrier,
        table: "dim_carrier",
        id: "carrier_id",
        key: "carrier_key",
    },
];

fn dim_of(entity: Entity) -> Option<Dim> {
    DIMS.into_iter().find(|d| d.entity == entity)
}

/// Which keys a dimension step looks at.
#[derive(Debug, Clone, Copy)]
enum Scope {
    /// Those in the entity's staging table.
    Staged,
    /// All (after a truncate).
    All,
    /// Those a snapshot-complete marker ended (`marker_gone`).
    MarkerGone,
}

fn scope(d: &Dim, scope: Scope) -> String {
    match scope {
        Scope::All => "true".to_owned(),
        Scope::Staged => format!("{} IN (SELECT id FROM {})", d.id, d.entity.stage()),
        Scope::MarkerGone => format!("{} IN (SELECT id FROM marker_gone)", d.id),
    }
}

/// Drops versions equal to the one before them, then sets every version's
/// end to the next one's start, for the keys in scope.
fn versions_settle(d: &Dim, all: Scope) -> Vec<String> {
    let attrs: Vec<&str> = d.entity.columns().iter().map(|c| c.name).collect();
    let same = attrs
        .iter()
        .map(|a| format!("{a} IS NOT DISTINCT FROM lag({a}) OVER w"))
        .collect::<Vec<_>>()
        .join(" AND ");
    let scope = scope(d, all);
    vec![
        format!(
            "DELETE FROM {t} v USING (
                SELECT {k} AS k, row_number() OVER w AS n, is_deleted, lag(is_deleted) OVER w AS prev_deleted, ({same}) AS same
                FROM {t} WHERE {scope}
                WINDOW w AS (PARTITION BY {id} ORDER BY valid_from_commit_lsn, valid_from_lsn)
            ) r
            WHERE v.{k} = r.k AND r.n > 1 AND r.is_deleted = r.prev_deleted AND (r.is_deleted OR r.same)",
            t = d.table,
            k = d.key,
            id = d.id,
        ),
        format!(
            "UPDATE {t} v SET valid_to = n.next_time, valid_to_commit_lsn = n.next_commit, valid_to_lsn = n.next_lsn,
                is_current = (n.next_commit IS NULL AND NOT v.is_deleted)
            FROM (
                SELECT {k} AS k, lead(valid_from) OVER w AS next_time, lead(valid_from_commit_lsn) OVER w AS next_commit,
                       lead(valid_from_lsn) OVER w AS next_lsn
                FROM {t} WHERE {scope}
                WINDOW w AS (PARTITION BY {id} ORDER BY valid_from_commit_lsn, valid_from_lsn)
            ) n
            WHERE v.{k} = n.k AND (v.valid_to_commit_lsn IS DISTINCT FROM n.next_commit
                OR v.valid_to_lsn IS DISTINCT FROM n.next_lsn
                OR v.is_current IS DISTINCT FROM (n.next_commit IS NULL AND NOT v.is_deleted))",
            t = d.table,
            k = d.key,
            id = d.id,
        ),
    ]
}

/// The statements of a dimension's staged events.
fn dimension(d: &Dim) -> Vec<String> {
    let attrs: Vec<&str> = d.entity.columns().iter().map(|c| c.name).collect();
    let list = attrs.join(", ");
    let mut out = vec![format!(
        "INSERT INTO {t} ({id}, {list}, valid_from, valid_from_commit_lsn, valid_from_lsn, is_deleted)
        SELECT id, {list}, commit_time, commit_lsn, lsn, op = 'd' FROM {stage}
        ON CONFLICT ({id}, valid_from_commit_lsn, valid_from_lsn) DO NOTHING",
        t = d.table,
        id = d.id,
        stage = d.entity.stage(),
    )];
    out.extend(versions_settle(d, Scope::Staged));
    out
}

/// A fact table fed by one entity: its table, key, creation-position
/// columns and the extra computed columns.
struct Fact {
    entity: Entity,
    table: &'static str,
    id: &'static str,
    /// Creation position columns (`sold_*`, `created_*`), if any.
    created: Option<(&'static str, &'static str, Option<&'static str>)>,
    /// Extra computed columns: (name, expression over the staged row `l`).
    computed: &'static [(&'static str, &'static str)],
    /// Columns set only when the row is inserted: (name, expression over
    /// `l` and `first`, the row's first staged event).
    on_insert: &'static [(&'static str, &'static str)],
    /// Columns set again when a newer event updates the row: (name,
    /// expression over the stored row `f` and the new one `excluded`).
    on_update: &'static [(&'static str, &'static str)],
}

/// The surrogate key of the version of `dim` (id column `id`) valid at
/// the position (`c`, `l`) (commit LSN and LSN columns), for the natural
/// key `fk`: the newest version from at or before that position, NULL if
/// it is a delete. A fact older than every version of its dimension row (a
/// late-arriving dimension: the source's history before it never reached
/// the topics, e.g. a snapshot attempt killed after some partitions were
/// written) joins the row's first version, as an inferred member, until an
/// older version arrives.
///
/// One probe of the `(id, valid_from_commit_lsn, valid_from_lsn)` unique
/// index, one row, however many versions the row has (a product whose
/// price changed a thousand times is not scanned per sale); a second only
/// for a fact older than every version. A delete is 0 inside (surrogate
/// keys start at 1), so that it ends the search and becomes NULL. Relies on
/// the versions of the batch being settled first (`valid_to` of each the
/// next one's `valid_from`), which `batch_statements` does before the facts.
macro_rules! version_at {
    ($dim:literal, $key:literal, $id:literal, $fk:literal, $c:literal, $l:literal) => {
        concat!(
            "NULLIF(coalesce(",
            version_probe!($dim, $key, $id, $fk),
            " AND (d.valid_from_commit_lsn, d.valid_from_lsn) <= (",
            $c,
            ", ",
            $l,
            ") ORDER BY d.valid_from_commit_lsn DESC, d.valid_from_lsn DESC LIMIT 1), ",
            version_probe!($dim, $key, $id, $fk),
            " ORDER BY d.valid_from_commit_lsn, d.valid_from_lsn LIMIT 1)), 0)"
        )
    };
}

/// The start of one [`version_at`] probe: a version of the row `fk` of
/// `dim`, its key or 0 for a delete.
macro_rules! version_probe {
    ($dim:literal, $key:literal, $id:literal, $fk:literal) => {
        concat!(
            "(SELECT CASE WHEN d.is_deleted THEN 0 ELSE d.",
            $key,
            " END FROM ",
            $dim,
            " d WHERE d.",
            $id,
            " = ",
            $fk
        )
    };
}

/// [`version_at`] the position of `first`, a fact's first staged event.
macro_rules! version_at_first {
    ($dim:literal, $key:literal, $id:literal, $fk:literal) => {
        version_at!($dim, $key, $id, $fk, "first.commit_lsn", "first.lsn")
    };
}

/// On an update of a stored purchase `f` to `excluded`: its key into `dim`
/// kept while the natural key (`old`, `new`) is the same, else the version
/// of the new one valid at the purchase's creation.
macro_rules! version_at_created {
    ($dim:literal, $key:literal, $id:literal, $old:literal, $new:literal) => {
        concat!(
            "CASE WHEN ",
            $new,
            " IS NOT DISTINCT FROM ",
            $old,
            " THEN f.",
            $key,
            " ELSE ",
            version_at!(
                $dim,
                $key,
                $id,
                $new,
                "f.created_commit_lsn",
                "f.created_lsn"
            ),
            " END"
        )
    };
}

const FACTS: [Fact; 3] = [
    Fact {
        entity: Entity::Purchase,
        table: "fact_purchase",
        id: "purchase_id",
        created: Some(("created_commit_lsn", "created_lsn", None)),
        computed: &[(
            "date_key",
            "to_char(l.purchase_time AT TIME ZONE 'UTC', 'YYYYMMDD')::integer",
        )],
        // The customer and buyer versions valid at the purchase's
        // creation: its lines' too (the fact_sale_line view). Later
        // versions of either are applied by `after_staged_versions`.
        on_insert: &[
            (
                "customer_key",
                version_at_first!(
                    "dim_customer",
                    "customer_key",
                    "customer_id",
                    "l.customer_id"
                ),
            ),
            (
                "buyer_key",
                version_at_first!("dim_buyer", "buyer_key", "buyer_id", "l.buyer_id"),
            ),
        ],
        on_update: &[
            (
                "customer_key",
                version_at_created!(
                    "dim_customer",
                    "customer_key",
                    "customer_id",
                    "f.customer_id",
                    "excluded.customer_id"
                ),
            ),
            (
                "buyer_key",
                version_at_created!(
                    "dim_buyer",
                    "buyer_key",
                    "buyer_id",
                    "f.buyer_id",
                    "excluded.buyer_id"
                ),
            ),
        ],
    },
    Fact {
        entity: Entity::Line,
        table: "sale_line",
        id: "line_id",
        created: Some(("sold_commit_lsn", "sold_lsn", Some("sold_time"))),
        computed: &[("amount_cents", "l.quantity * l.unit_price_cents")],
        // The product version valid when sold, on insert; later versions
        // are applied by `after_staged_versions`.
        on_insert: &[(
            "product_key",
            version_at_first!("dim_product", "product_key", "product_id", "l.product_id"),
        )],
        on_update: &[],
    },
    Fact {
        entity: Entity::Shipment,
        table: "fact_shipment",
        id: "shipment_id",
        created: Some(("created_commit_lsn", "created_lsn", None)),
        computed: &[],
        on_insert: &[(
            "carrier_key",
            version_at_first!("dim_carrier", "carrier_key", "carrier_id", "l.carrier_id"),
        )],
        on_update: &[],
    },
];

/// The upsert (and delete) of a fact's staged events: the newest event per
/// row in the batch wins, if newer than the stored row.
fn fact(f: &Fact) -> Vec<String> {
    let (db, table) = f.entity.source();
    let mut cols: Vec<String> = f
        .entity
        .columns()
        .iter()
        .map(|c| c.name.to_owned())
        .collect();
    let mut exprs: Vec<String> = cols.iter().map(|c| format!("l.{c}")).collect();
    for (name, expr) in f.computed {
        cols.push((*name).to_owned());
        exprs.push((*expr).to_owned());
    }
    let updates = cols
        .iter()
        .chain(
            ["commit_time", "last_commit_lsn", "last_lsn"]
                .map(str::to_owned)
                .iter(),
        )
        .map(|c| format!("{c} = excluded.{c}"))
        .chain(f.on_update.iter().map(|(c, e)| format!("{c} = {e}")))
        .collect::<Vec<_>>()
        .join(", ");
    cols.extend(["commit_time", "last_commit_lsn", "last_lsn"].map(str::to_owned));
    exprs.extend(["l.commit_time", "l.commit_lsn", "l.lsn"].map(str::to_owned));
    let mut first_join = String::new();
    if let Some((c, l, time)) = f.created {
        cols.push(c.to_owned());
        cols.push(l.to_owned());
        exprs.push("first.commit_lsn".to_owned());
        exprs.push("first.lsn".to_owned());
        if let Some(time) = time {
            cols.push(time.to_owned());
            exprs.push("first.commit_time".to_owned());
        }
        first_join = format!(
            " JOIN (SELECT DISTINCT ON (id) id, commit_lsn, lsn, commit_time FROM {stage} WHERE op <> 'd' ORDER BY id, commit_lsn, lsn) first ON first.id = l.id",
            stage = f.entity.stage()
        );
    }
    for (name, expr) in f.on_insert {
        cols.push((*name).to_owned());
        exprs.push((*expr).to_owned());
    }
    let latest = format!(
        "(SELECT DISTINCT ON (id) * FROM {stage} ORDER BY id, commit_lsn DESC, lsn DESC)",
        stage = f.entity.stage()
    );
    // The resurrection guard looks for a later delete of the row in
    // change_event; a delete commits after the change it follows, so the
    // commit-time bound (an hour of slack for the source's clock) lets the
    // server probe only the day partitions from then on.
    vec![
        format!(
            "DELETE FROM {t} f USING {latest} l
            WHERE l.op = 'd' AND f.{id} = l.id AND (f.last_commit_lsn, f.last_lsn) < (l.commit_lsn, l.lsn)",
            t = f.table,
            id = f.id,
        ),
        format!(
            "INSERT INTO {t} AS f ({id}, {cols})
            SELECT l.id, {exprs} FROM {latest} l{first_join}
            WHERE l.op <> 'd' AND NOT EXISTS (
                SELECT 1 FROM change_event e
                WHERE e.source_db = '{db}' AND e.source_table = '{table}' AND e.row_key = l.row_key AND e.op = 'd'
                  AND e.commit_time >= l.commit_time - interval '1 hour'
                  AND (coalesce(e.commit_lsn, e.lsn), e.lsn) > (l.commit_lsn, l.lsn))
            ON CONFLICT ({id}) DO UPDATE SET {updates}
            WHERE (f.last_commit_lsn, f.last_lsn) < (excluded.last_commit_lsn, excluded.last_lsn)",
            t = f.table,
            id = f.id,
            cols = cols.join(", "),
            exprs = exprs.join(", "),
        ),
    ]
}

/// Sets a fact's dimension key to the version valid at the fact's creation
/// position (the first version for a fact older than every version, as in
/// [`version_at_first`]), for the fact rows `scope` selects (a condition
/// on `f`, with `from` joined).
fn resolve(target: Target<'_>, from: &str, scope: &str) -> String {
    let Target {
        fact,
        fk,
        key,
        dim,
        dim_id,
        created: (c, l),
    } = target;
    format!(
        "UPDATE {fact} f SET {key} = d.{key}
        FROM {from}{dim} d
        WHERE ({scope}) AND d.{dim_id} = f.{fk} AND NOT d.is_deleted
          AND ((d.valid_from_commit_lsn, d.valid_from_lsn) <= (f.{c}, f.{l})
            OR NOT EXISTS (SELECT 1 FROM {dim} e WHERE e.{dim_id} = d.{dim_id}
              AND (e.valid_from_commit_lsn, e.valid_from_lsn) < (d.valid_from_commit_lsn, d.valid_from_lsn)))
          AND (d.valid_to_commit_lsn IS NULL OR (d.valid_to_commit_lsn, d.valid_to_lsn) > (f.{c}, f.{l}))
          AND f.{key} IS DISTINCT FROM d.{key}"
    )
}

/// A fact's dimension key column and the dimension it points into.
#[derive(Debug, Clone, Copy)]
struct Target<'a> {
    fact: &'a str,
    fk: &'a str,
    key: &'a str,
    dim: &'a str,
    dim_id: &'a str,
    created: (&'a str, &'a str),
}

/// The facts whose dimension versions may have moved: those at or after
/// the earliest staged version of their dimension row, and every fact of
/// the row when that version is now its first (facts older than it join
/// it as their inferred member). Drives the update from the few staged
/// rows through the fact's `(fk, created)` index.
fn after_staged_versions(target: Target<'_>, dim: Entity) -> String {
    let (c, l) = target.created;
    let Target {
        fk,
        dim: table,
        dim_id,
        ..
    } = target;
    resolve(
        target,
        &format!(
            "(SELECT DISTINCT ON (id) id, commit_lsn, lsn FROM {stage} ORDER BY id, commit_lsn, lsn) s, ",
            stage = dim.stage()
        ),
        &format!(
            "f.{fk} = s.id AND ((f.{c} >= s.commit_lsn AND (f.{c}, f.{l}) >= (s.commit_lsn, s.lsn))
              OR NOT EXISTS (SELECT 1 FROM {table} e WHERE e.{dim_id} = s.id
                AND (e.valid_from_commit_lsn, e.valid_from_lsn) < (s.commit_lsn, s.lsn)))"
        ),
    )
}

/// Every statement to run for a batch, given which staging tables hold rows.
/// `staged[i]` is whether entity `i` (see [`Entity::index`]) has rows.
pub fn batch_statements(staged: &[bool; 7]) -> Vec<String> {
    let has = |e: Entity| staged[e.index()];
    let mut out = Vec::new();
    for d in &DIMS {
        if has(d.entity) {
            out.extend(dimension(d));
        }
    }
    if has(Entity::Purchase) {
        out.push(
            "INSERT INTO dim_date (date_key, date, year, quarter, month, day, iso_week, day_of_week)
            SELECT DISTINCT to_char(d, 'YYYYMMDD')::integer, d, extract(year FROM d), extract(quarter FROM d),
                   extract(month FROM d), extract(day FROM d), extract(week FROM d), extract(isodow FROM d)
            FROM (SELECT (purchase_time AT TIME ZONE 'UTC')::date AS d FROM stage_purchase WHERE purchase_time IS NOT NULL) x
            ON CONFLICT DO NOTHING"
                .to_owned(),
        );
    }
    for f in &FACTS {
        if has(f.entity) {
            out.extend(fact(f));
        }
    }
    // Sale lines and purchases at or after a version the batch added.
    let product = Target {
        fact: "sale_line",
        fk: "product_id",
        key: "product_key",
        dim: "dim_product",
        dim_id: "product_id",
        created: ("sold_commit_lsn", "sold_lsn"),
    };
    let purchase = |fk, key, dim, dim_id| Target {
        fact: "fact_purchase",
        fk,
        key,
        dim,
        dim_id,
        created: ("created_commit_lsn", "created_lsn"),
    };
    let customer = purchase("customer_id", "customer_key", "dim_customer", "customer_id");
    let buyer = purchase("buyer_id", "buyer_key", "dim_buyer", "buyer_id");
    for (entity, target) in [
        (Entity::Product, product),
        (Entity::Customer, customer),
        (Entity::Buyer, buyer),
    ] {
        if has(entity) {
            out.push(after_staged_versions(target, entity));
        }
    }
    let carrier = Target {
        fact: "fact_shipment",
        fk: "carrier_id",
        key: "carrier_key",
        dim: "dim_carrier",
        dim_id: "carrier_id",
        created: ("created_commit_lsn", "created_lsn"),
    };
    if has(Entity::Carrier) {
        out.push(after_staged_versions(carrier, Entity::Carrier));
    }
    out
}

/// The statements of a truncate at `position` (commit time in µs) of an
/// entity's table: its facts written before it are removed, its dimension
/// rows get a deleting version.
pub fn truncate_statements(
    entity: Entity,
    position: (i64, i64),
    commit_time_us: i64,
) -> Vec<String> {
    let (c, l) = position;
    let time =
        jiff::Timestamp::from_microsecond(commit_time_us).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    if let Some(d) = dim_of(entity) {
        let mut out = vec![format!(
            "INSERT INTO {t} ({id}, valid_from, valid_from_commit_lsn, valid_from_lsn, is_deleted)
            SELECT DISTINCT {id}, '{time}'::timestamptz, {c}, {l}, true FROM {t}
            WHERE is_current AND (valid_from_commit_lsn, valid_from_lsn) < ({c}, {l})
            ON CONFLICT DO NOTHING",
            t = d.table,
            id = d.id,
        )];
        out.extend(versions_settle(&d, Scope::All));
        return out;
    }
    FACTS
        .iter()
        .filter(|f| f.entity == entity)
        .map(|f| {
            format!(
                "DELETE FROM {t} WHERE (last_commit_lsn, last_lsn) < ({c}, {l})",
                t = f.table
            )
        })
        .collect()
}

/// The statements of a snapshot-complete marker of `db.table` read from
/// `topic`/`partition` at `offset` (Kafka timestamp `time_us`), its
/// snapshot rows at `commit_lsn`: the rows whose last event was read from
/// that partition, committed before the snapshot, is not a delete and was
/// not followed by a truncate (the snapshot read every row it found again,
/// and those reads are in `change_event` by now: they precede the marker in
/// the partition) get a delete event at `(commit_lsn, commit_lsn)` in
/// `change_event`, and their facts and current dimension versions end as a
/// delete would end them.
///
/// The position `(commit_lsn, commit_lsn)` is below the snapshot rows'
/// `(commit_lsn, commit_lsn + 1)` and above every event committed before
/// the snapshot; as the delete's `lsn` it differs from one snapshot to the
/// next, so a row ended by two markers has two distinct delete events.
///
/// Per partition, because a row's events all come through one partition:
/// another partition's copy of the marker may come before this partition's
/// snapshot rows, and must not end them. A copy read again finds its rows'
/// last event a delete and does nothing.
pub fn marker_statements(
    entity: Option<Entity>,
    marker: &crate::event::Marker,
    at: (&str, i32, i64),
    time_us: i64,
) -> Vec<String> {
    let (topic, partition, offset) = at;
    let c = marker.commit_lsn;
    let (db, table, topic) = (literal(&marker.db), literal(&marker.table), literal(topic));
    let time = jiff::Timestamp::from_microsecond(time_us).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    let mut out = vec![
        "DELETE FROM marker_gone".to_owned(),
        format!(
            "INSERT INTO marker_gone (row_key, id, before)
            SELECT row_key, CASE WHEN jsonb_typeof(row_key::jsonb -> 'id') = 'number' THEN (row_key::jsonb ->> 'id')::bigint END, after
            FROM (
                SELECT DISTINCT ON (row_key) row_key, op, commit_lsn, lsn, after, kafka_topic, kafka_partition
                FROM change_event
                WHERE source_db = {db} AND source_table = {table} AND row_key <> ''
                ORDER BY row_key, coalesce(commit_lsn, lsn) DESC, lsn DESC
            ) last
            WHERE last.op <> 'd' AND last.kafka_topic = {topic} AND last.kafka_partition = {partition}
              AND (coalesce(last.commit_lsn, last.lsn), last.lsn) < ({c}, {c})
              AND NOT EXISTS (
                  SELECT 1 FROM change_event t
                  WHERE t.source_db = {db} AND t.source_table = {table} AND t.op = 't'
                    AND (coalesce(t.commit_lsn, t.lsn), t.lsn) > (coalesce(last.commit_lsn, last.lsn), last.lsn))"
        ),
        format!(
            "INSERT INTO change_event (source_db, source_table, row_key, op, commit_time, lsn, commit_lsn, snapshot, tx_id, before, after, kafka_topic, kafka_partition, kafka_offset)
            SELECT {db}, {table}, row_key, 'd', '{time}'::timestamptz, {c}, {c}, true, NULL, before, NULL, {topic}, {partition}, {offset}
            FROM marker_gone
            ON CONFLICT DO NOTHING"
        ),
    ];
    let Some(entity) = entity else {
        return out;
    };
    if let Some(d) = dim_of(entity) {
        out.push(format!(
            "INSERT INTO {t} ({id}, valid_from, valid_from_commit_lsn, valid_from_lsn, is_deleted)
            SELECT {id}, '{time}'::timestamptz, {c}, {c}, true FROM {t}
            WHERE is_current AND {id} IN (SELECT id FROM marker_gone)
              AND (valid_from_commit_lsn, valid_from_lsn) < ({c}, {c})
            ON CONFLICT DO NOTHING",
            t = d.table,
            id = d.id,
        ));
        out.extend(versions_settle(&d, Scope::MarkerGone));
    }
    for f in FACTS.iter().filter(|f| f.entity == entity) {
        out.push(format!(
            "DELETE FROM {t} WHERE {id} IN (SELECT id FROM marker_gone) AND (last_commit_lsn, last_lsn) < ({c}, {c})",
            t = f.table,
            id = f.id,
        ));
    }
    out
}

/// A SQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_tables_have_every_column() {
        let ddl = staging_ddl();
        assert_eq!(ddl.len(), 2 + Entity::ALL.len());
        assert!(ddl[4].contains("stage_product"));
        assert!(ddl[4].contains("price_cents bigint"));
        assert_eq!(
            copy_into_stage(Entity::Carrier),
            "COPY stage_carrier (op, id, row_key, commit_lsn, lsn, commit_time, name, tracking_url_template) FROM STDIN"
        );
    }

    #[test]
    fn a_marker_ends_the_rows_of_its_partition_below_its_snapshot() {
        let marker = crate::event::Marker {
            db: "erp".into(),
            table: "o'stock".into(),
            commit_lsn: 700,
        };
        let sql = marker_statements(None, &marker, ("t", 3, 9), 0);
        assert_eq!(sql.len(), 3, "change_event only for a table without entity");
        let all = sql.join(";\n");
        assert!(
            all.contains("last.kafka_topic = 't' AND last.kafka_partition = 3"),
            "{all}"
        );
        assert!(all.contains("source_table = 'o''stock'"), "{all}");
        assert!(all.contains("< (700, 700)"), "{all}");
        assert!(
            all.contains("'d', '1970-01-01T00:00:00Z'::timestamptz, 700, 700, true"),
            "{all}"
        );
        let product = crate::event::Marker {
            db: "instashop".into(),
            table: "product".into(),
            commit_lsn: 700,
        };
        let all = marker_statements(Some(Entity::Product), &product, ("t", 0, 1), 0).join(";\n");
        assert!(all.contains("INSERT INTO dim_product"), "{all}");
        assert!(
            all.contains("product_id IN (SELECT id FROM marker_gone)"),
            "{all}"
        );
        let all = marker_statements(Some(Entity::Line), &product, ("t", 0, 1), 0).join(";\n");
        assert!(
            all.contains("DELETE FROM sale_line WHERE line_id IN (SELECT id FROM marker_gone) AND (last_commit_lsn, last_lsn) < (700, 700)"),
            "{all}"
        );
    }

    #[test]
    fn statements_only_for_staged_entities() {
        let none = batch_statements(&[false; 7]);
        assert!(none.is_empty());
        let mut only_lines = [false; 7];
        only_lines[Entity::Line.index()] = true;
        let sql = batch_statements(&only_lines).join(";\n");
        assert!(sql.contains("INSERT INTO sale_line"));
        assert!(sql.contains("product_key"));
        assert!(!sql.contains("INSERT INTO dim_product"));
        assert!(!truncate_statements(Entity::Product, (5, 6), 0).is_empty());
        assert_eq!(
            truncate_statements(Entity::Line, (5, 6), 0),
            vec!["DELETE FROM sale_line WHERE (last_commit_lsn, last_lsn) < (5, 6)".to_owned()]
        );
    }
}
