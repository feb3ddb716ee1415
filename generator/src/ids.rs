//! Primary keys reserved from the tables' own sequences, ahead of the model.
//!
//! The model decides every row (and which rows later rows point at) before
//! anything is written, so it needs ids up front. Taking them from the
//! sequences with `nextval` keeps the tables usable by anyone else inserting
//! with defaults, and on a fresh database hands out 1, 2, 3, ... in request
//! order, which keeps runs with the same seed identical.

use std::collections::VecDeque;

use tokio_util::sync::CancellationToken;

use crate::db::Conn;
use crate::error::Error;
use crate::model::{IdSource, IdsExhausted};
use crate::op::Table;

/// Reserved ids per table.
#[derive(Debug, Default)]
pub struct Pool {
    free: [VecDeque<i64>; 9],
}

impl Pool {
    /// Ids available for `table`.
    pub fn available(&self, table: Table) -> usize {
        self.free[table.index()].len()
    }

    /// Adds reserved ids.
    pub fn add(&mut self, table: Table, ids: impl IntoIterator<Item = i64>) {
        self.free[table.index()].extend(ids);
    }

    /// Tops every table up to `want[table]` ids, reserving from the
    /// sequences through `conns` (indexed by database).
    pub async fn refill(
        &mut self,
        want: [u64; 9],
        conns: &mut [Conn; 4],
        shutdown: &CancellationToken,
    ) -> Result<(), Error> {
        for table in Table::ALL {
            let have = self.available(table) as u64;
            let need = want[table.index()].saturating_sub(have);
            if need == 0 {
                continue;
            }
            let conn = &mut conns[table.database().index()];
            let seq = table.sequence();
            let ids = crate::with_retry!(conn, "id reservation", shutdown, {
                match conn.client().await {
                    Ok(client) => client
                        .query(
                            "SELECT nextval($1::text::regclass) FROM generate_series(1, $2::bigint)",
                            &[&seq, &(need as i64)],
                        )
                        .await
                        .map(|rows| rows.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>()),
                    Err(e) => Err(e),
                }
            });
            self.add(table, ids);
        }
        Ok(())
    }

    /// The first id the pool would hand out for `table`, if any.
    pub fn peek(&self, table: Table) -> Option<i64> {
        self.free[table.index()].front().copied()
    }
}

impl IdSource for Pool {
    fn next_id(&mut self, table: Table) -> Result<i64, IdsExhausted> {
        self.free[table.index()]
            .pop_front()
            .ok_or(IdsExhausted(table))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_in_order_and_runs_dry() {
        let mut p = Pool::default();
        p.add(Table::Shipment, [5, 6]);
        assert_eq!(p.next_id(Table::Shipment), Ok(5));
        assert_eq!(p.next_id(Table::Shipment), Ok(6));
        assert_eq!(
            p.next_id(Table::Shipment),
            Err(IdsExhausted(Table::Shipment))
        );
        assert_eq!(p.available(Table::Stock), 0);
    }
}
