//! Groups a batch of row changes for one database into few multi-row
//! statements, keeping the meaning of applying them one by one.
//!
//! Two changes conflict when they touch the same row, or when one needs a row
//! (a foreign key) that the other writes. Each change goes into the first
//! *layer* after every earlier conflicting change; within a layer no two
//! changes conflict, so the layer's changes can run as one statement per
//! kind in any order. Consecutive stock adjustments of the same row add up
//! into one (the model never lets stock go below zero, so the sum is exact).

use std::collections::HashMap;

use crate::op::{Key, Op, Stmt};

/// One multi-row statement: its kind and the ops that fill its arrays.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Which prepared statement.
    pub stmt: Stmt,
    /// The ops, in batch order.
    pub ops: Vec<Op>,
}

/// Plans ops (all of one database) into statements to run in order.
pub fn plan(ops: Vec<Op>) -> Vec<Group> {
    let mut last_write: HashMap<Key, u32> = HashMap::new();
    let mut last_access: HashMap<Key, u32> = HashMap::new();
    // The most recent op (index into `placed`) touching a key, for merging.
    let mut last_op: HashMap<Key, usize> = HashMap::new();
    let mut placed: Vec<(u32, Op)> = Vec::with_capacity(ops.len());
    let mut max_layer = 0;

    for op in ops {
        let write = op.write_key();
        let reads = op.read_keys();

        if let (Op::AdjustStock { delta, .. }, Some(key)) = (&op, write)
            && let Some(&i) = last_op.get(&key)
            && let (_, Op::AdjustStock { delta: earlier, .. }) = &mut placed[i]
        {
            *earlier += delta;
            continue;
        }

        let mut layer = 0;
        for key in &reads {
            if let Some(&l) = last_write.get(key) {
                layer = layer.max(l + 1);
            }
        }
        if let Some(key) = write
            && let Some(&l) = last_access.get(&key)
        {
            layer = layer.max(l + 1);
        }
        if matches!(op, Op::PurgeInteractions { .. }) {
            // Touches rows it cannot name: after everything else.
            layer = u32::MAX;
        }
        for key in reads {
            let e = last_access.entry(key).or_insert(layer);
            *e = (*e).max(layer);
            last_op.insert(key, placed.len());
        }
        if let Some(key) = write {
            last_write.insert(key, layer);
            last_access.insert(key, layer);
            last_op.insert(key, placed.len());
        }
        if layer != u32::MAX {
            max_layer = max_layer.max(layer);
        }
        placed.push((layer, op));
    }

    for (layer, _) in &mut placed {
        if *layer == u32::MAX {
            *layer = max_layer + 1;
        }
    }
    // Stable: ops keep their batch order inside a group.
    placed.sort_by_key(|(layer, op)| (*layer, op.stmt()));
    let mut groups: Vec<Group> = Vec::new();
    let mut current: Option<(u32, Stmt)> = None;
    for (layer, op) in placed {
        let stmt = op.stmt();
        match groups.last_mut() {
            Some(group) if current == Some((layer, stmt)) => group.ops.push(op),
            _ => {
                current = Some((layer, stmt));
                groups.push(Group {
                    stmt,
                    ops: vec![op],
                });
            }
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{Table, TxStatus};

    fn tx(id: i64) -> Op {
        Op::InsertTransaction {
            id,
            external_id: format!("00000000-0000-4000-8000-{id:012}"),
            customer_id: 1,
            buyer_id: 1,
            total_cents: 100,
            payment_method: "paypal",
            status: TxStatus::Pending,
        }
    }

    fn detail(id: i64, transaction_id: i64) -> Op {
        Op::InsertDetail {
            id,
            transaction_id,
            product_id: 1,
            quantity: 1,
            unit_cents: 100,
        }
    }

    fn stmts(groups: &[Group]) -> Vec<(Stmt, usize)> {
        groups.iter().map(|g| (g.stmt, g.ops.len())).collect()
    }

    #[test]
    fn purchases_become_two_statements() {
        let ops = vec![tx(1), detail(1, 1), detail(2, 1), tx(2), detail(3, 2)];
        let groups = plan(ops);
        assert_eq!(
            stmts(&groups),
            vec![(Stmt::InsertTransaction, 2), (Stmt::InsertDetail, 3)]
        );
    }

    #[test]
    fn two_updates_of_one_row_stay_in_order() {
        let ops = vec![
            tx(1),
            Op::UpdateTransactionStatus {
                id: 1,
                from: TxStatus::Pending,
                to: TxStatus::Completed,
            },
            Op::UpdateTransactionStatus {
                id: 1,
                from: TxStatus::Completed,
                to: TxStatus::Refunded,
            },
            Op::UpdateTransactionStatus {
                id: 7,
                from: TxStatus::Pending,
                to: TxStatus::Failed,
            },
        ];
        let groups = plan(ops);
        assert_eq!(
            stmts(&groups),
            vec![
                (Stmt::InsertTransaction, 1),
                (Stmt::UpdateTransactionStatus, 1),
                (Stmt::UpdateTransactionStatus, 1),
                (Stmt::UpdateTransactionStatus, 1),
            ]
        );
        // The unrelated update of 7 runs in the first layer.
        assert_eq!(
            groups[1].ops[0],
            Op::UpdateTransactionStatus {
                id: 7,
                from: TxStatus::Pending,
                to: TxStatus::Failed,
            }
        );
    }

    #[test]
    fn children_deleted_before_parent() {
        let ops = vec![
            Op::Delete {
                table: Table::Transaction,
                id: 5,
            },
            Op::DeleteDetail {
                id: 9,
                transaction_id: 5,
            },
        ];
        // Batch order says the parent goes first; the detail reads the
        // parent, and the parent's delete came earlier, so the detail must
        // follow it: ordering is preserved, not "fixed".
        let groups = plan(ops.clone());
        assert_eq!(groups[0].stmt, Stmt::Delete(Table::Transaction));
        let groups = plan(ops.into_iter().rev().collect());
        assert_eq!(
            stmts(&groups),
            vec![
                (Stmt::Delete(Table::TransactionDetail), 1),
                (Stmt::Delete(Table::Transaction), 1)
            ]
        );
    }

    #[test]
    fn stock_adjustments_add_up() {
        let ops = vec![
            Op::AdjustStock { id: 3, delta: -2 },
            Op::AdjustStock { id: 4, delta: -1 },
            Op::AdjustStock { id: 3, delta: -5 },
            Op::AdjustStock { id: 3, delta: 100 },
        ];
        let groups = plan(ops);
        assert_eq!(groups.len(), 1);
        assert_eq!(
            groups[0].ops,
            vec![
                Op::AdjustStock { id: 3, delta: 93 },
                Op::AdjustStock { id: 4, delta: -1 }
            ]
        );
    }

    #[test]
    fn stock_insert_then_adjust_is_not_merged_into_insert() {
        let ops = vec![
            Op::InsertStock {
                id: 3,
                product_id: 1,
                warehouse: "AMS-1",
                quantity: 10,
                reorder_level: 5,
            },
            Op::AdjustStock { id: 3, delta: -2 },
        ];
        assert_eq!(
            stmts(&plan(ops)),
            vec![(Stmt::InsertStock, 1), (Stmt::AdjustStock, 1)]
        );
    }

    #[test]
    fn purge_runs_last() {
        let ops = vec![
            Op::PurgeInteractions { count: 2 },
            Op::InsertInteraction {
                id: 1,
                customer_id: 1,
                buyer_id: 1,
                kind: "view",
                session_id: String::new(),
                payload: "{}".into(),
            },
        ];
        let groups = plan(ops);
        assert_eq!(groups.last().map(|g| g.stmt), Some(Stmt::PurgeInteractions));
    }
}
