//! The InstaShop source catalog: the four databases and the nine tables the
//! generator writes and the metrics read.
//!
//! One definition, because the names are a contract across processes: the
//! generator's row counters, the topics (`<db>.public.<table>`) and the Redis
//! keys (`count:<db>.<table>`) must all spell a table the same way.

/// One of the four InstaShop databases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Database {
    /// Shops, buyers, products and purchases.
    Instashop,
    /// Buyers' behaviour.
    Crm,
    /// Stock per product and warehouse.
    Erp,
    /// Carriers and shipments.
    Ecommerce,
}

impl Database {
    /// All databases, in the order purchases flow through them.
    pub const ALL: [Database; 4] = [
        Database::Instashop,
        Database::Crm,
        Database::Erp,
        Database::Ecommerce,
    ];

    /// The database's name, also its name on the server.
    pub fn name(self) -> &'static str {
        match self {
            Database::Instashop => "instashop",
            Database::Crm => "crm",
            Database::Erp => "erp",
            Database::Ecommerce => "ecommerce",
        }
    }

    /// Position in [`Database::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// One of the nine source tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// `instashop.customer`
    Customer,
    /// `instashop.buyer`
    Buyer,
    /// `instashop.product`
    Product,
    /// `instashop.transaction`
    Transaction,
    /// `instashop.transactiondetail`
    TransactionDetail,
    /// `crm.interaction`
    Interaction,
    /// `erp.stock`
    Stock,
    /// `ecommerce.carrier`
    Carrier,
    /// `ecommerce.shipment`
    Shipment,
}

impl Table {
    /// Every table, in a fixed order (the index of per-table counters).
    pub const ALL: [Table; 9] = [
        Table::Customer,
        Table::Buyer,
        Table::Product,
        Table::Transaction,
        Table::TransactionDetail,
        Table::Interaction,
        Table::Stock,
        Table::Carrier,
        Table::Shipment,
    ];

    /// Finds a table by a change event's `source.db` and `source.table`.
    pub fn from_source(db: &str, table: &str) -> Option<Table> {
        Table::ALL
            .into_iter()
            .find(|t| t.db() == db && t.name() == table)
    }

    /// The table's name in SQL.
    pub fn name(self) -> &'static str {
        match self {
            Table::Customer => "customer",
            Table::Buyer => "buyer",
            Table::Product => "product",
            Table::Transaction => "transaction",
            Table::TransactionDetail => "transactiondetail",
            Table::Interaction => "interaction",
            Table::Stock => "stock",
            Table::Carrier => "carrier",
            Table::Shipment => "shipment",
        }
    }

    /// The database holding the table.
    pub fn database(self) -> Database {
        match self {
            Table::Customer
            | Table::Buyer
            | Table::Product
            | Table::Transaction
            | Table::TransactionDetail => Database::Instashop,
            Table::Interaction => Database::Crm,
            Table::Stock => Database::Erp,
            Table::Carrier | Table::Shipment => Database::Ecommerce,
        }
    }

    /// The name of the table's database.
    pub fn db(self) -> &'static str {
        self.database().name()
    }

    /// `<db>.<table>`, as in the `count:` metric keys and the row-state keys.
    pub fn qualified(self) -> &'static str {
        match self {
            Table::Customer => "instashop.customer",
            Table::Buyer => "instashop.buyer",
            Table::Product => "instashop.product",
            Table::Transaction => "instashop.transaction",
            Table::TransactionDetail => "instashop.transactiondetail",
            Table::Interaction => "crm.interaction",
            Table::Stock => "erp.stock",
            Table::Carrier => "ecommerce.carrier",
            Table::Shipment => "ecommerce.shipment",
        }
    }

    /// The id sequence that `bigserial`/`serial` created for the table.
    pub fn sequence(self) -> String {
        format!("{}_id_seq", self.name())
    }

    /// Position in [`Table::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Source databases captured under another name than their logical one (a
/// benchmark's or a test's scratch databases): `--source-dbs
/// LOGICAL=NAME,...` of the consumers, and the lookup from the `source.db`
/// an event carries to the database it stands for.
pub mod envelope;

pub mod alias {
    /// `(captured name, logical database)` pairs from `LOGICAL=NAME,...`;
    /// the error names the entry that is not of that form.
    pub fn parse(spec: &str) -> Result<Vec<(String, String)>, String> {
        spec.split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| match e.split_once('=') {
                Some((logical, name)) if !logical.is_empty() && !name.is_empty() => {
                    Ok((name.trim().to_owned(), logical.trim().to_owned()))
                }
                _ => Err(format!("--source-dbs entry `{e}` is not LOGICAL=NAME")),
            })
            .collect()
    }

    /// The logical database a captured `db` stands for (itself when it has
    /// no alias).
    pub fn logical<'a>(db: &'a str, aliases: &'a [(String, String)]) -> &'a str {
        aliases
            .iter()
            .find(|(captured, _)| captured == db)
            .map_or(db, |(_, logical)| logical.as_str())
    }
}

/// The reader's snapshot-complete marker as its consumers read it: a record
/// with a null key and a null value whose headers (UTF-8 text) say that the
/// snapshot of a table ended, its rows at `cdc.commit_lsn` (the consistent
/// point - 1) and `cdc.lsn` (the consistent point). It comes on every
/// partition of the table's topic, after that partition's snapshot rows.
pub mod marker {
    /// The header naming the marker's kind.
    pub const KIND: &str = "cdc.marker";
    /// The value of [`KIND`] for the snapshot-complete marker.
    pub const SNAPSHOT_COMPLETE: &str = "snapshot_complete";

    /// A snapshot-complete marker's contents.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct SnapshotComplete<'a> {
        /// `cdc.db`, as captured.
        pub db: &'a str,
        /// `cdc.table`.
        pub table: &'a str,
        /// `cdc.commit_lsn`: the snapshot rows' `source.commit_lsn`.
        pub commit_lsn: u64,
    }

    /// Why a marker's headers cannot be read.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Unreadable {
        /// A header is missing (`header cdc.table`).
        Missing(&'static str),
        /// A header holds no decimal LSN (`header cdc.commit_lsn`).
        BadValue(&'static str),
    }

    /// The snapshot-complete marker in a message's headers: `None` when the
    /// message is not one (no `cdc.marker` header, or a kind the consumers
    /// do not know, which they skip like a tombstone).
    pub fn read<'a>(
        headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) -> Option<Result<SnapshotComplete<'a>, Unreadable>> {
        let (mut kind, mut db, mut table, mut commit_lsn) = (None, None, None, None);
        for (name, value) in headers {
            let value = value.and_then(|v| std::str::from_utf8(v).ok());
            match name {
                KIND => kind = value,
                "cdc.db" => db = value,
                "cdc.table" => table = value,
                "cdc.commit_lsn" => commit_lsn = value,
                _ => {}
            }
        }
        if kind? != SNAPSHOT_COMPLETE {
            return None;
        }
        Some(fields(db, table, commit_lsn))
    }

    fn fields<'a>(
        db: Option<&'a str>,
        table: Option<&'a str>,
        commit_lsn: Option<&str>,
    ) -> Result<SnapshotComplete<'a>, Unreadable> {
        Ok(SnapshotComplete {
            db: db.ok_or(Unreadable::Missing("header cdc.db"))?,
            table: table.ok_or(Unreadable::Missing("header cdc.table"))?,
            commit_lsn: commit_lsn
                .ok_or(Unreadable::Missing("header cdc.commit_lsn"))?
                .parse()
                .map_err(|_| Unreadable::BadValue("header cdc.commit_lsn"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_follow_all() {
        for (i, t) in Table::ALL.into_iter().enumerate() {
            assert_eq!(t.index(), i);
        }
        for (i, d) in Database::ALL.into_iter().enumerate() {
            assert_eq!(d.index(), i);
        }
    }

    #[test]
    fn qualified_is_db_dot_name_and_round_trips() {
        for t in Table::ALL {
            assert_eq!(t.qualified(), format!("{}.{}", t.db(), t.name()));
            assert_eq!(Table::from_source(t.db(), t.name()), Some(t));
        }
        assert_eq!(Table::from_source("crm", "stock"), None);
        assert_eq!(Table::from_source("erp", "nope"), None);
    }

    #[test]
    fn every_database_holds_a_table() {
        for d in Database::ALL {
            assert!(Table::ALL.iter().any(|t| t.database() == d), "{d:?}");
        }
    }

    #[test]
    fn aliases_parse_and_map_captured_names() {
        let aliases = alias::parse(" instashop=scratch_1 , crm=scratch_2,").expect("parses");
        assert_eq!(
            aliases,
            vec![
                ("scratch_1".to_owned(), "instashop".to_owned()),
                ("scratch_2".to_owned(), "crm".to_owned())
            ]
        );
        assert_eq!(alias::logical("scratch_2", &aliases), "crm");
        assert_eq!(alias::logical("erp", &aliases), "erp");
        assert_eq!(
            alias::parse("instashop"),
            Err("--source-dbs entry `instashop` is not LOGICAL=NAME".to_owned())
        );
        assert_eq!(alias::parse(""), Ok(vec![]));
    }

    #[test]
    fn snapshot_complete_markers_read_from_headers() {
        let headers = |commit: &'static str| {
            vec![
                ("cdc.marker", Some(&b"snapshot_complete"[..])),
                ("cdc.db", Some(&b"erp"[..])),
                ("cdc.table", Some(&b"stock"[..])),
                ("cdc.commit_lsn", Some(commit.as_bytes())),
            ]
        };
        assert_eq!(
            marker::read(headers("42")),
            Some(Ok(marker::SnapshotComplete {
                db: "erp",
                table: "stock",
                commit_lsn: 42
            }))
        );
        assert_eq!(
            marker::read(headers("-")),
            Some(Err(marker::Unreadable::BadValue("header cdc.commit_lsn")))
        );
        let mut no_db = headers("42");
        no_db.remove(1);
        assert_eq!(
            marker::read(no_db),
            Some(Err(marker::Unreadable::Missing("header cdc.db")))
        );
        assert_eq!(marker::read([("traceparent", None)]), None);
        assert_eq!(marker::read([("cdc.marker", Some(&b"other"[..]))]), None);
    }
}
