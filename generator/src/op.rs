//! Row changes the model decides on, before any SQL exists.
//!
//! Every change names the row it writes (`write_key`) and the rows it needs to
//! exist (`read_keys`, foreign keys inside one database). The planner uses
//! those keys to group many changes into few multi-row statements without
//! changing their meaning.

pub use catalog::{Database, Table};

/// Insert, update or delete: how rows-written counters are split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Change {
    /// Rows inserted.
    Insert,
    /// Rows updated.
    Update,
    /// Rows deleted.
    Delete,
}

impl Change {
    /// All kinds.
    pub const ALL: [Change; 3] = [Change::Insert, Change::Update, Change::Delete];

    /// Lowercase name for metrics.
    pub fn name(self) -> &'static str {
        match self {
            Change::Insert => "insert",
            Change::Update => "update",
            Change::Delete => "delete",
        }
    }

    /// Position in [`Change::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A purchase's status (`transaction_status` enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TxStatus {
    /// Awaiting payment.
    Pending,
    /// Paid.
    Completed,
    /// Payment failed.
    Failed,
    /// Paid, then refunded.
    Refunded,
}

impl TxStatus {
    /// SQL label.
    pub fn name(self) -> &'static str {
        match self {
            TxStatus::Pending => "pending",
            TxStatus::Completed => "completed",
            TxStatus::Failed => "failed",
            TxStatus::Refunded => "refunded",
        }
    }

    /// The only transitions a purchase may take: pending → completed | failed,
    /// completed → refunded. (A pending purchase may also be deleted when
    /// abandoned; that is not a status change.)
    pub fn can_become(self, next: TxStatus) -> bool {
        matches!(
            (self, next),
            (TxStatus::Pending, TxStatus::Completed)
                | (TxStatus::Pending, TxStatus::Failed)
                | (TxStatus::Completed, TxStatus::Refunded)
        )
    }

    /// Parses the SQL label.
    pub fn parse(s: &str) -> Option<TxStatus> {
        Some(match s {
            "pending" => TxStatus::Pending,
            "completed" => TxStatus::Completed,
            "failed" => TxStatus::Failed,
            "refunded" => TxStatus::Refunded,
            _ => return None,
        })
    }
}

/// A shipment's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShipStatus {
    /// Label printed, not yet handed to the carrier.
    Created,
    /// With the carrier.
    InTransit,
    /// At the buyer.
    Delivered,
    /// Back at the shop.
    Returned,
}

impl ShipStatus {
    /// SQL label.
    pub fn name(self) -> &'static str {
        match self {
            ShipStatus::Created => "created",
            ShipStatus::InTransit => "in_transit",
            ShipStatus::Delivered => "delivered",
            ShipStatus::Returned => "returned",
        }
    }

    /// Allowed paths: created → in_transit → delivered; in_transit → returned
    /// (refused or refunded on the way); delivered → returned.
    pub fn can_become(self, next: ShipStatus) -> bool {
        matches!(
            (self, next),
            (ShipStatus::Created, ShipStatus::InTransit)
                | (ShipStatus::InTransit, ShipStatus::Delivered)
                | (ShipStatus::InTransit, ShipStatus::Returned)
                | (ShipStatus::Delivered, ShipStatus::Returned)
        )
    }

    /// Parses the SQL label.
    pub fn parse(s: &str) -> Option<ShipStatus> {
        Some(match s {
            "created" => ShipStatus::Created,
            "in_transit" => ShipStatus::InTransit,
            "delivered" => ShipStatus::Delivered,
            "returned" => ShipStatus::Returned,
            _ => return None,
        })
    }
}

/// A row identity inside one database: table and primary key.
pub type Key = (Table, i64);

/// One row change. Amounts are integer cents.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub enum Op {
    InsertCustomer {
        id: i64,
        name: String,
        email: String,
        plan: &'static str,
        country: String,
    },
    UpdateCustomerPlan {
        id: i64,
        plan: &'static str,
    },
    SetCustomerActive {
        id: i64,
        active: bool,
    },
    InsertBuyer {
        id: i64,
        customer_id: i64,
        name: String,
        email: String,
        birth_date: String,
    },
    UpdateBuyerEmail {
        id: i64,
        email: String,
    },
    InsertProduct {
        id: i64,
        customer_id: i64,
        name: String,
        category: &'static str,
        price_cents: i64,
        /// A Postgres array literal, e.g. `{eco,bestseller}`.
        tags: String,
        description: String,
    },
    UpdateProductPrice {
        id: i64,
        price_cents: i64,
    },
    UpdateProductCategory {
        id: i64,
        category: &'static str,
    },
    InsertTransaction {
        id: i64,
        external_id: String,
        customer_id: i64,
        buyer_id: i64,
        total_cents: i64,
        payment_method: &'static str,
        status: TxStatus,
    },
    UpdateTransactionStatus {
        id: i64,
        from: TxStatus,
        to: TxStatus,
    },
    UpdateTransactionTotal {
        id: i64,
        total_cents: i64,
    },
    InsertDetail {
        id: i64,
        transaction_id: i64,
        product_id: i64,
        quantity: i32,
        unit_cents: i64,
    },
    UpdateDetailQuantity {
        id: i64,
        transaction_id: i64,
        quantity: i32,
    },
    DeleteDetail {
        id: i64,
        transaction_id: i64,
    },
    InsertInteraction {
        id: i64,
        customer_id: i64,
        buyer_id: i64,
        kind: &'static str,
        session_id: String,
        /// JSON text.
        payload: String,
    },
    /// Merges a JSON object into the payload (a support ticket resolved).
    PatchInteraction {
        id: i64,
        patch: String,
    },
    /// Deletes the `count` oldest interactions (retention).
    PurgeInteractions {
        count: i64,
    },
    InsertStock {
        id: i64,
        product_id: i64,
        warehouse: &'static str,
        quantity: i32,
        reorder_level: i32,
    },
    /// `quantity = GREATEST(quantity + delta, 0)`.
    AdjustStock {
        id: i64,
        delta: i32,
    },
    InsertCarrier {
        id: i64,
        name: String,
        template: String,
    },
    UpdateCarrier {
        id: i64,
        template: String,
    },
    InsertShipment {
        id: i64,
        transaction_id: i64,
        carrier_id: i64,
        tracking_code: String,
        label: Vec<u8>,
    },
    UpdateShipmentStatus {
        id: i64,
        from: ShipStatus,
        to: ShipStatus,
    },
    /// Deletes one row by primary key.
    Delete {
        table: Table,
        id: i64,
    },
}

/// The prepared statement an [`Op`] runs in; one statement serves many ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(missing_docs)]
pub enum Stmt {
    // Order inside one planner layer: parents before children for inserts,
    // children before parents for deletes. Layers already order dependent
    // rows; this order only makes each layer read naturally.
    InsertCustomer,
    InsertBuyer,
    InsertProduct,
    InsertTransaction,
    InsertDetail,
    InsertInteraction,
    InsertStock,
    InsertCarrier,
    InsertShipment,
    UpdateCustomerPlan,
    SetCustomerActive,
    UpdateBuyerEmail,
    UpdateProductPrice,
    UpdateProductCategory,
    UpdateTransactionStatus,
    UpdateTransactionTotal,
    UpdateDetailQuantity,
    PatchInteraction,
    AdjustStock,
    UpdateCarrier,
    UpdateShipmentStatus,
    Delete(Table),
    PurgeInteractions,
}

impl Stmt {
    /// The table the statement writes.
    pub fn table(self) -> Table {
        match self {
            Stmt::InsertCustomer | Stmt::UpdateCustomerPlan | Stmt::SetCustomerActive => {
                Table::Customer
            }
            Stmt::InsertBuyer | Stmt::UpdateBuyerEmail => Table::Buyer,
            Stmt::InsertProduct | Stmt::UpdateProductPrice | Stmt::UpdateProductCategory => {
                Table::Product
            }
            Stmt::InsertTransaction
            | Stmt::UpdateTransactionStatus
            | Stmt::UpdateTransactionTotal => Table::Transaction,
            Stmt::InsertDetail | Stmt::UpdateDetailQuantity => Table::TransactionDetail,
            Stmt::InsertInteraction | Stmt::PatchInteraction | Stmt::PurgeInteractions => {
                Table::Interaction
            }
            Stmt::InsertStock | Stmt::AdjustStock => Table::Stock,
            Stmt::InsertCarrier | Stmt::UpdateCarrier => Table::Carrier,
            Stmt::InsertShipment | Stmt::UpdateShipmentStatus => Table::Shipment,
            Stmt::Delete(table) => table,
        }
    }

    /// Insert, update or delete.
    pub fn change(self) -> Change {
        match self {
            Stmt::InsertCustomer
            | Stmt::InsertBuyer
            | Stmt::InsertProduct
            | Stmt::InsertTransaction
            | Stmt::InsertDetail
            | Stmt::InsertInteraction
            | Stmt::InsertStock
            | Stmt::InsertCarrier
            | Stmt::InsertShipment => Change::Insert,
            Stmt::Delete(_) | Stmt::PurgeInteractions => Change::Delete,
            _ => Change::Update,
        }
    }
}

impl Op {
    /// The statement this op runs in.
    pub fn stmt(&self) -> Stmt {
        match self {
            Op::InsertCustomer { .. } => Stmt::InsertCustomer,
            Op::UpdateCustomerPlan { .. } => Stmt::UpdateCustomerPlan,
            Op::SetCustomerActive { .. } => Stmt::SetCustomerActive,
            Op::InsertBuyer { .. } => Stmt::InsertBuyer,
            Op::UpdateBuyerEmail { .. } => Stmt::UpdateBuyerEmail,
            Op::InsertProduct { .. } => Stmt::InsertProduct,
            Op::UpdateProductPrice { .. } => Stmt::UpdateProductPrice,
            Op::UpdateProductCategory { .. } => Stmt::UpdateProductCategory,
            Op::InsertTransaction { .. } => Stmt::InsertTransaction,
            Op::UpdateTransactionStatus { .. } => Stmt::UpdateTransactionStatus,
            Op::UpdateTransactionTotal { .. } => Stmt::UpdateTransactionTotal,
            Op::InsertDetail { .. } => Stmt::InsertDetail,
            Op::UpdateDetailQuantity { .. } => Stmt::UpdateDetailQuantity,
            Op::DeleteDetail { .. } => Stmt::Delete(Table::TransactionDetail),
            Op::InsertInteraction { .. } => Stmt::InsertInteraction,
            Op::PatchInteraction { .. } => Stmt::PatchInteraction,
            Op::PurgeInteractions { .. } => Stmt::PurgeInteractions,
            Op::InsertStock { .. } => Stmt::InsertStock,
            Op::AdjustStock { .. } => Stmt::AdjustStock,
            Op::InsertCarrier { .. } => Stmt::InsertCarrier,
            Op::UpdateCarrier { .. } => Stmt::UpdateCarrier,
            Op::InsertShipment { .. } => Stmt::InsertShipment,
            Op::UpdateShipmentStatus { .. } => Stmt::UpdateShipmentStatus,
            Op::Delete { table, .. } => Stmt::Delete(*table),
        }
    }

    /// The database the op writes.
    pub fn database(&self) -> Database {
        self.stmt().table().database()
    }

    /// The row the op writes, if it is a single row.
    pub fn write_key(&self) -> Option<Key> {
        let table = self.stmt().table();
        let id = match self {
            Op::InsertCustomer { id, .. }
            | Op::UpdateCustomerPlan { id, .. }
            | Op::SetCustomerActive { id, .. }
            | Op::InsertBuyer { id, .. }
            | Op::UpdateBuyerEmail { id, .. }
            | Op::InsertProduct { id, .. }
            | Op::UpdateProductPrice { id, .. }
            | Op::UpdateProductCategory { id, .. }
            | Op::InsertTransaction { id, .. }
            | Op::UpdateTransactionStatus { id, .. }
            | Op::UpdateTransactionTotal { id, .. }
            | Op::InsertDetail { id, .. }
            | Op::UpdateDetailQuantity { id, .. }
            | Op::DeleteDetail { id, .. }
            | Op::InsertInteraction { id, .. }
            | Op::PatchInteraction { id, .. }
            | Op::InsertStock { id, .. }
            | Op::AdjustStock { id, .. }
            | Op::InsertCarrier { id, .. }
            | Op::UpdateCarrier { id, .. }
            | Op::InsertShipment { id, .. }
            | Op::UpdateShipmentStatus { id, .. }
            | Op::Delete { id, .. } => *id,
            Op::PurgeInteractions { .. } => return None,
        };
        Some((table, id))
    }

    /// Rows in the same database that must exist first (foreign keys).
    pub fn read_keys(&self) -> Vec<Key> {
        match self {
            Op::InsertBuyer { customer_id, .. } | Op::InsertProduct { customer_id, .. } => {
                vec![(Table::Customer, *customer_id)]
            }
            Op::InsertTransaction {
                customer_id,
                buyer_id,
                ..
            } => vec![(Table::Customer, *customer_id), (Table::Buyer, *buyer_id)],
            Op::InsertDetail {
                transaction_id,
                product_id,
                ..
            } => vec![
                (Table::Transaction, *transaction_id),
                (Table::Product, *product_id),
            ],
            Op::UpdateDetailQuantity { transaction_id, .. }
            | Op::DeleteDetail { transaction_id, .. } => {
                vec![(Table::Transaction, *transaction_id)]
            }
            Op::InsertShipment { carrier_id, .. } => vec![(Table::Carrier, *carrier_id)],
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purchase_status_paths() {
        use TxStatus::*;
        let all = [Pending, Completed, Failed, Refunded];
        let allowed: Vec<_> = all
            .iter()
            .flat_map(|a| all.iter().map(move |b| (*a, *b)))
            .filter(|(a, b)| a.can_become(*b))
            .collect();
        assert_eq!(
            allowed,
            vec![
                (Pending, Completed),
                (Pending, Failed),
                (Completed, Refunded)
            ]
        );
    }

    #[test]
    fn shipment_status_paths() {
        use ShipStatus::*;
        assert!(Created.can_become(InTransit));
        assert!(!Created.can_become(Delivered));
        assert!(!Created.can_become(Returned));
        assert!(!Delivered.can_become(InTransit));
        assert!(!Returned.can_become(Created));
        assert!(Delivered.can_become(Returned));
        for s in ["created", "in_transit", "delivered", "returned"] {
            assert_eq!(ShipStatus::parse(s).map(ShipStatus::name), Some(s));
        }
    }

    #[test]
    fn tables_belong_to_their_databases() {
        assert_eq!(Table::TransactionDetail.database(), Database::Instashop);
        assert_eq!(Table::Shipment.database(), Database::Ecommerce);
        assert_eq!(Table::Stock.sequence(), "stock_id_seq");
    }
}
