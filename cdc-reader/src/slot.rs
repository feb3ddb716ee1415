//! Preflight checks, publication and slot setup.
//!
//! Why check up front: a missing privilege or a wrong `wal_level` otherwise
//! surfaces as an obscure error in the middle of a snapshot. Every failure
//! here is [`Error::Setup`] with the exact statement to run, and the process
//! exits with that one line.
//!
//! Why the slot is the "snapshot done" marker: the first snapshot is taken
//! from a *pending* slot, a permanent slot named `<slot>_snapshot` created
//! with `EXPORT_SNAPSHOT` at consistent point C1. Only after every snapshot
//! row was acknowledged by Kafka is it copied into the real slot `<slot>` with
//! `pg_copy_logical_replication_slot` (same consistent point, same retained
//! WAL) and dropped. So `<slot>` exists if and only if a snapshot (or `never`
//! mode) completed. No local state file, nothing in Kafka to read back.
//!
//! Why the pending slot is permanent: a crash mid-snapshot leaves `r` events
//! in Kafka for rows that may be deleted before the snapshot is redone. A
//! temporary slot would die with the connection and nothing would ever
//! retract those events; the pending slot survives the crash and retains
//! every change since C1, deletes included. The restart (pending exists,
//! `<slot>` does not) takes a fresh snapshot from a *temporary* slot
//! `<slot>_resnap` (exported at C2), and once Kafka acknowledged it copies
//! the *pending* slot into `<slot>`, so streaming re-emits everything since
//! C1 (the overlap is described in `snapshot`). States and what a start does:
//! - neither slot: first attempt (above);
//! - only `<slot>_snapshot`: restart mid-snapshot (above); in `never` mode the
//!   pending slot is promoted into `<slot>` without a snapshot, so the
//!   partial snapshot's rows are still followed by every later change;
//! - both: a crash between the copy and the drop; the pending slot is stale
//!   and dropped;
//! - only `<slot>`: streaming.
//!
//! Why an advisory lock around the snapshot: the pending slot is not held by
//! any walsender while the rows are copied (a permanent slot is released
//! right after CREATE_REPLICATION_SLOT), so "pending exists" cannot tell a
//! crashed reader from a running one. The snapshotting reader holds a
//! session-level advisory lock on the slot name; a second reader that cannot
//! take it retries, then finds `<slot>` busy and exits like any second reader.
//! A killed reader's session ends with its socket, releasing the lock.
//!
//! Why the permanent slot is never advanced except by status updates: on
//! PostgreSQL ≤ 16 a status update may move `confirmed_flush_lsn` backwards,
//! so the source never reports less than the slot's value at start.

use tokio_postgres::Client;

use crate::change::{Lsn, parse_lsn};
use crate::config::{SourceConfig, table_matches};
use crate::error::Error;
use crate::replication::{QueryError, ReplicationConnection, quote_ident};

/// A captured table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    /// Relation OID.
    pub oid: u32,
    /// Schema.
    pub schema: String,
    /// Table.
    pub name: String,
    /// `pg_class.reltuples` (estimate; -1 when never analyzed).
    pub estimated_rows: i64,
}

impl TableInfo {
    /// `schema.table` quoted for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// `schema.table` for logs.
    pub fn display(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// The permanent slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    /// `confirmed_flush_lsn`.
    pub confirmed_flush: Lsn,
    /// PID of the walsender using it.
    pub active_pid: Option<i32>,
    /// `wal_status` (`reserved`, `extended`, `unreserved`, `lost`).
    pub wal_status: Option<String>,
}

/// What preflight found.
#[derive(Debug, Clone)]
pub struct Preflight {
    /// Captured tables (published and included).
    pub tables: Vec<TableInfo>,
    /// The permanent slot, when it exists.
    pub slot: Option<SlotInfo>,
    /// The pending snapshot slot `<slot>_snapshot`, when it exists.
    pub pending: Option<SlotInfo>,
    /// The role's name.
    pub role: String,
}

fn setup(cfg: &SourceConfig, message: impl Into<String>) -> Error {
    let message: String = message.into();
    Error::Setup(format!(
        "source {} ({}): {message}",
        cfg.name,
        cfg.params.target()
    ))
}

/// Connects an ordinary session (catalog queries, snapshot copies, heartbeat).
pub async fn connect_sql(cfg: &SourceConfig) -> Result<Client, Error> {
    let (client, conn) = tokio_postgres::connect(&cfg.params.url, tokio_postgres::NoTls)
        .await
        .map_err(|e| match e.as_db_error() {
            Some(db) if db.code().code() == "28P01" => setup(
                cfg,
                format!(
                    "password authentication failed for user \"{}\": fix the password in the source URL",
                    cfg.params.user
                ),
            ),
            Some(db) if matches!(db.code().code(), "28000" | "3D000" | "42501") => {
                setup(cfg, db.message().to_owned())
            }
            _ => Error::Connect {
                target: cfg.params.target(),
                message: e.to_string(),
            },
        })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "sql connection ended");
        }
    });
    client
        .batch_execute(
            "SET TimeZone = 'UTC'; SET DateStyle = 'ISO'; SET IntervalStyle = 'postgres'; \
             SET extra_float_digits = 1; SET client_encoding = 'UTF8'",
        )
        .await?;
    Ok(client)
}

/// Checks everything the source needs and creates a missing publication when allowed.
pub async fn preflight(
    client: &Client,
    cfg: &SourceConfig,
    will_create_slot_hint: bool,
) -> Result<Preflight, Error> {
    let wal_level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        return Err(setup(
            cfg,
            format!(
                "wal_level is '{wal_level}', logical replication needs 'logical': as a superuser run ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"
            ),
        ));
    }
    let row = client
        .query_one(
            "SELECT current_user::text, rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?;
    let role: String = row.get(0);
    let (replication, superuser): (bool, bool) = (row.get(1), row.get(2));
    if !replication && !superuser {
        return Err(setup(
            cfg,
            format!(
                "role \"{role}\" lacks the REPLICATION attribute: as a superuser run ALTER ROLE {} REPLICATION;",
                quote_ident(&role)
            ),
        ));
    }

    ensure_publication(client, cfg, &role).await?;

    // Tables of the publication, then the include/exclude filter.
    let rows = client
        .query(
            "SELECT c.oid, n.nspname::text, c.relname::text, c.reltuples::float8, has_table_privilege(c.oid, 'SELECT') \
             FROM pg_publication_tables pt \
             JOIN pg_namespace n ON n.nspname = pt.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename \
             WHERE pt.pubname = $1 ORDER BY 2, 3",
            &[&cfg.publication],
        )
        .await?;
    let mut published = Vec::new();
    let mut no_select = Vec::new();
    for r in rows {
        let info = TableInfo {
            oid: r.get::<_, u32>(0),
            schema: r.get(1),
            name: r.get(2),
            estimated_rows: r.get::<_, f64>(3) as i64,
        };
        let can_select: bool = r.get(4);
        if cfg.includes(&info.schema, &info.name) {
            if !can_select {
                no_select.push(info.quoted());
            }
            published.push(info);
        }
    }
    for entry in &cfg.include {
        if published
            .iter()
            .any(|t| table_matches(entry, &t.schema, &t.name))
        {
            continue;
        }
        let (schema, table) = entry.split_once('.').unwrap_or(("public", entry.as_str()));
        let exists: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p'))",
                &[&schema, &table],
            )
            .await?
            .get(0);
        if exists {
            return Err(setup(
                cfg,
                format!(
                    "table {schema}.{table} from --include-tables is not in publication \"{}\": as the table owner run ALTER PUBLICATION {} ADD TABLE {}.{};",
                    cfg.publication,
                    quote_ident(&cfg.publication),
                    quote_ident(schema),
                    quote_ident(table)
                ),
            ));
        }
        return Err(setup(
            cfg,
            format!(
                "unknown table {schema}.{table} in --include-tables: database \"{}\" has no such table",
                cfg.params.dbname
            ),
        ));
    }
    if !no_select.is_empty() && cfg.snapshot_mode == crate::config::SnapshotMode::InitialIncremental
    {
        // Chunks are read table by table: an unreadable one is reported
        // and skipped when its turn comes, the others flow.
        tracing::warn!(source = %cfg.name, tables = %no_select.join(", "), "role {} cannot SELECT these tables; they are left out of the snapshot until GRANT SELECT ON {} TO {}; and an execute-snapshot signal", quote_ident(&role), no_select.join(", "), quote_ident(&role));
    } else if !no_select.is_empty() {
        return Err(setup(
            cfg,
            format!(
                "role \"{role}\" cannot SELECT from {} (needed for the snapshot): as the table owner run GRANT SELECT ON {} TO {};",
                no_select.join(", "),
                no_select.join(", "),
                quote_ident(&role)
            ),
        ));
    }
    if published.is_empty() {
        tracing::warn!(source = %cfg.name, publication = %cfg.publication, "no table to capture: the publication is empty or everything is excluded");
    }

    let slot = slot_info(client, cfg).await?;
    if slot.is_none() {
        let free = client
            .query_one(
                "SELECT current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)::int, \
                        current_setting('max_wal_senders')::int - (SELECT count(*) FROM pg_stat_replication)::int",
                &[],
            )
            .await?;
        let (free_slots, free_senders): (i32, i32) = (free.get(0), free.get(1));
        // A snapshot needs two more slots: the pending one and the real one it
        // is copied into (first attempt), or the temporary snapshot slot and
        // the real one (restart; the pending slot is already counted).
        let needed = if will_create_slot_hint { 2 } else { 1 };
        if free_slots < needed {
            return Err(setup(
                cfg,
                format!(
                    "no free replication slot ({free_slots} free, {needed} needed): raise max_replication_slots (ALTER SYSTEM SET max_replication_slots = ...; restart) or drop unused slots (SELECT slot_name FROM pg_replication_slots WHERE NOT active)"
                ),
            ));
        }
        if free_senders < 1 {
            return Err(setup(
                cfg,
                "no free WAL sender: raise max_wal_senders (ALTER SYSTEM SET max_wal_senders = ...; restart) or stop another replication client".to_owned(),
            ));
        }
    }
    let pending = pending_slot_info(client, cfg).await?;
    Ok(Preflight {
        tables: published,
        slot,
        pending,
        role,
    })
}

async fn ensure_publication(client: &Client, cfg: &SourceConfig, role: &str) -> Result<(), Error> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&cfg.publication],
        )
        .await?
        .is_some();
    if exists {
        return Ok(());
    }
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
             AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1, 2",
            &[],
        )
        .await?;
    let tables: Vec<String> = rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
        .filter(|(s, t)| cfg.includes(s, t))
        .map(|(s, t)| format!("{}.{}", quote_ident(&s), quote_ident(&t)))
        .collect();
    if tables.is_empty() {
        return Err(setup(
            cfg,
            format!(
                "publication \"{}\" does not exist and there is no table to publish (check --include-tables/--exclude-tables)",
                cfg.publication
            ),
        ));
    }
    // What the table owner can run (FOR ALL TABLES needs a superuser).
    let for_tables = format!(
        "CREATE PUBLICATION {} FOR TABLE {}",
        quote_ident(&cfg.publication),
        tables.join(", ")
    );
    let sql = if cfg.include.is_empty() && cfg.exclude.is_empty() {
        format!(
            "CREATE PUBLICATION {} FOR ALL TABLES",
            quote_ident(&cfg.publication)
        )
    } else {
        for_tables.clone()
    };
    match client.batch_execute(&sql).await {
        Ok(()) => {
            tracing::info!(source = %cfg.name, publication = %cfg.publication, "created publication");
            Ok(())
        }
        Err(e) => Err(setup(
            cfg,
            format!(
                "publication \"{}\" does not exist and role \"{role}\" cannot create it ({}): as the owner of the tables run {for_tables};",
                cfg.publication,
                e.as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_owned()),
            ),
        )),
    }
}

/// The permanent slot, checked for plugin and database.
pub async fn slot_info(client: &Client, cfg: &SourceConfig) -> Result<Option<SlotInfo>, Error> {
    named_slot_info(client, cfg, &cfg.slot, false).await
}

/// The pending snapshot slot, checked for plugin and database.
pub async fn pending_slot_info(
    client: &Client,
    cfg: &SourceConfig,
) -> Result<Option<SlotInfo>, Error> {
    named_slot_info(client, cfg, &snapshot_slot_name(cfg), true).await
}

async fn named_slot_info(
    client: &Client,
    cfg: &SourceConfig,
    name: &str,
    pending: bool,
) -> Result<Option<SlotInfo>, Error> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, active_pid, confirmed_flush_lsn::text, wal_status, temporary \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let temporary: Option<bool> = row.get(5);
    if pending && temporary == Some(true) {
        // Only a running reader of an earlier version snapshots from a
        // temporary slot of that name; it disappears with its session.
        return Err(Error::Replication(format!(
            "source {}: slot \"{name}\" is a temporary slot of another running reader",
            cfg.name
        )));
    }
    let plugin: Option<String> = row.get(0);
    let database: Option<String> = row.get(1);
    if plugin.as_deref() != Some("pgoutput")
        || database.as_deref() != Some(cfg.params.dbname.as_str())
    {
        return Err(setup(
            cfg,
            format!(
                "slot \"{name}\" exists but is not a pgoutput slot of database \"{}\" (plugin {:?}, database {:?}): pick another --slot or drop it with SELECT pg_drop_replication_slot('{name}');",
                cfg.params.dbname,
                plugin.unwrap_or_default(),
                database.unwrap_or_default(),
            ),
        ));
    }
    let confirmed: Option<String> = row.get(3);
    Ok(Some(SlotInfo {
        confirmed_flush: confirmed.as_deref().and_then(parse_lsn).unwrap_or(0),
        active_pid: row.get(2),
        wal_status: row.get(4),
    }))
}

/// Drops the permanent slot (a lost slot in `when_needed` mode).
pub async fn drop_slot(client: &Client, cfg: &SourceConfig) -> Result<(), Error> {
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&cfg.slot])
        .await?;
    Ok(())
}

/// A slot created with an exported snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    /// Where streaming starts; snapshot rows carry this LSN.
    pub consistent_point: Lsn,
    /// Exported snapshot name (`None` without EXPORT_SNAPSHOT).
    pub snapshot_name: Option<String>,
}

/// `<slot><suffix>`, the slot part shortened so the suffix always fits in
/// the 63 bytes of a slot name (the two helper names never collide).
fn helper_slot_name(cfg: &SourceConfig, suffix: &str) -> String {
    let mut base = cfg.slot.clone();
    base.truncate(63 - suffix.len());
    base + suffix
}

/// Permanent slot marking a snapshot in progress (the first attempt's
/// consistent point and every change since).
pub fn snapshot_slot_name(cfg: &SourceConfig) -> String {
    helper_slot_name(cfg, "_snapshot")
}

/// Temporary slot whose exported snapshot a restarted snapshot copies.
pub fn resnapshot_slot_name(cfg: &SourceConfig) -> String {
    helper_slot_name(cfg, "_resnap")
}

/// Takes the session-level advisory lock that makes one reader at a time
/// snapshot this slot; `false` when another session holds it.
pub async fn try_lock_snapshot(client: &Client, cfg: &SourceConfig) -> Result<bool, Error> {
    Ok(client
        .query_one(
            "SELECT pg_try_advisory_lock(hashtext('instashop_cdc_snapshot'), hashtext($1))",
            &[&cfg.slot],
        )
        .await?
        .get(0))
}

/// Releases [`try_lock_snapshot`]'s lock (it also ends with the session).
pub async fn unlock_snapshot(client: &Client, cfg: &SourceConfig) -> Result<(), Error> {
    client
        .execute(
            "SELECT pg_advisory_unlock(hashtext('instashop_cdc_snapshot'), hashtext($1))",
            &[&cfg.slot],
        )
        .await?;
    Ok(())
}

/// Drops the pending snapshot slot if it exists. Retries for a moment while a
/// walsender that just ended still shows it active.
pub async fn drop_pending_slot(client: &Client, cfg: &SourceConfig) -> Result<(), Error> {
    let name = snapshot_slot_name(cfg);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&name],
            )
            .await
        {
            Ok(_) => return Ok(()),
            Err(e)
                if e.as_db_error().is_some_and(|d| d.code().code() == "55006")
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "42704") => {
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn slot_create_error(cfg: &SourceConfig, slot: &str, e: QueryError) -> Error {
    match e {
        // A crashed reader's walsender may still hold its temporary slot for a
        // moment, or an earlier version of the reader is snapshotting: retry.
        QueryError::Server(se) if se.code == "42710" => Error::Replication(format!(
            "source {}: slot \"{slot}\" already exists (another reader is snapshotting, or a crashed one's session is ending)",
            cfg.name
        )),
        QueryError::Server(se) if se.code == "53400" => setup(
            cfg,
            format!(
                "cannot create slot \"{slot}\": {se}: raise max_replication_slots or drop unused slots"
            ),
        ),
        other => other.into_error(&format!("create slot {slot}")),
    }
}

async fn create(
    conn: &mut ReplicationConnection,
    cfg: &SourceConfig,
    slot: &str,
    temporary: bool,
    export: bool,
) -> Result<CreatedSlot, Error> {
    let sql = format!(
        "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput {}",
        quote_ident(slot),
        if temporary { " TEMPORARY" } else { "" },
        if export {
            "EXPORT_SNAPSHOT"
        } else {
            "NOEXPORT_SNAPSHOT"
        }
    );
    let result = conn
        .simple_query(&sql)
        .await
        .map_err(|e| slot_create_error(cfg, slot, e))?;
    let consistent_point = result
        .first("consistent_point")
        .and_then(parse_lsn)
        .ok_or_else(|| {
            Error::Replication(format!(
                "CREATE_REPLICATION_SLOT {slot}: no consistent_point"
            ))
        })?;
    Ok(CreatedSlot {
        consistent_point,
        snapshot_name: result.first("snapshot_name").map(str::to_owned),
    })
}

/// Creates the pending (permanent) snapshot slot and exports its snapshot:
/// the first attempt. The connection must stay idle until every copier
/// imported the snapshot.
pub async fn create_pending_slot(
    conn: &mut ReplicationConnection,
    cfg: &SourceConfig,
) -> Result<CreatedSlot, Error> {
    create(conn, cfg, &snapshot_slot_name(cfg), false, true).await
}

/// Creates the temporary slot of a restarted snapshot and exports its
/// snapshot (the pending slot already exists and keeps its position).
pub async fn create_resnapshot_slot(
    conn: &mut ReplicationConnection,
    cfg: &SourceConfig,
) -> Result<CreatedSlot, Error> {
    create(conn, cfg, &resnapshot_slot_name(cfg), true, true).await
}

/// Creates the permanent slot without a snapshot (`never` mode).
pub async fn create_permanent_slot(
    conn: &mut ReplicationConnection,
    cfg: &SourceConfig,
) -> Result<CreatedSlot, Error> {
    create(conn, cfg, &cfg.slot, false, false).await
}

/// Copies the pending slot into the permanent slot once the snapshot was
/// acknowledged (it still has to be dropped with [`drop_pending_slot`]).
///
/// Runs on an ordinary session, not on the walsender that exported the
/// snapshot: a temporary slot created by a walsender stays acquired by it
/// until that connection ends, so SQL is the one place that works for both
/// the first attempt and a restart.
pub async fn persist_snapshot_slot(client: &Client, cfg: &SourceConfig) -> Result<(), Error> {
    client
        .execute(
            "SELECT pg_copy_logical_replication_slot($1, $2, false)",
            &[&snapshot_slot_name(cfg), &cfg.slot],
        )
        .await
        .map_err(|e| match e.as_db_error() {
            Some(db) if db.code().code() == "42710" => Error::Replication(format!(
                "source {}: slot \"{}\" already exists (another reader created it)",
                cfg.name, cfg.slot
            )),
            _ => Error::from(e),
        })?;
    Ok(())
}
