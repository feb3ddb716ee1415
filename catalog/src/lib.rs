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
}
