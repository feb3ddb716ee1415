//! Ordered acknowledgement: which WAL position may be confirmed to Postgres.
//!
//! Kafka acknowledges records in any order across partitions; Postgres must
//! only hear of a transaction's end once every record of it, and of every
//! transaction before it, is acknowledged, or a crash would skip an
//! undelivered change. Pure: the sink feeds it enqueues, acknowledgements
//! and transaction ends, and publishes what it returns.

use std::collections::VecDeque;

use crate::change::Lsn;

/// Ordered acknowledgement of a source's transactions (pure).
///
/// A queue of (transaction end LSN, unacknowledged records). The highest
/// confirmable LSN is the `end_lsn` of the newest closed transaction such
/// that it and all earlier ones have no unacknowledged record.
#[derive(Debug, Default)]
pub struct AckTracker {
    queue: VecDeque<PendingTx>,
    /// Sequence number of `queue[0]`.
    front_seq: u64,
    confirmed: Lsn,
    in_flight: usize,
    poisoned: bool,
}

#[derive(Debug)]
struct PendingTx {
    /// `None` while the transaction is still open.
    end_lsn: Option<Lsn>,
    outstanding: usize,
}

impl AckTracker {
    /// An empty tracker (confirmed LSN 0).
    pub fn new() -> Self {
        AckTracker::default()
    }

    /// One record of the open transaction was enqueued; returns the
    /// transaction's sequence number to pass to [`AckTracker::acked`].
    pub fn sent(&mut self) -> u64 {
        self.in_flight += 1;
        match self.queue.back_mut() {
            Some(tx) if tx.end_lsn.is_none() => tx.outstanding += 1,
            _ => self.queue.push_back(PendingTx {
                end_lsn: None,
                outstanding: 1,
            }),
        }
        self.front_seq + self.queue.len() as u64 - 1
    }

    /// A record of transaction `seq` was acknowledged. Returns the new
    /// confirmed LSN when it moved.
    pub fn acked(&mut self, seq: u64) -> Option<Lsn> {
        let index = seq.checked_sub(self.front_seq)? as usize;
        let tx = self.queue.get_mut(index)?;
        tx.outstanding = tx.outstanding.checked_sub(1)?;
        self.in_flight = self.in_flight.saturating_sub(1);
        self.advance()
    }

    /// A record of transaction `seq` failed (delivery error, or it could not
    /// be enqueued after all): nothing is confirmed from now on.
    pub fn failed(&mut self, seq: u64) {
        self.poisoned = true;
        if let Some(tx) = seq
            .checked_sub(self.front_seq)
            .and_then(|i| self.queue.get_mut(i as usize))
            && tx.outstanding > 0
        {
            tx.outstanding -= 1;
            self.in_flight = self.in_flight.saturating_sub(1);
        }
    }

    /// Closes the open transaction (or records an empty one) at `end_lsn`.
    /// Returns the new confirmed LSN when it moved.
    pub fn end_transaction(&mut self, end_lsn: Lsn) -> Option<Lsn> {
        match self.queue.back_mut() {
            Some(tx) if tx.end_lsn.is_none() => tx.end_lsn = Some(end_lsn),
            _ => self.queue.push_back(PendingTx {
                end_lsn: Some(end_lsn),
                outstanding: 0,
            }),
        }
        self.advance()
    }

    fn advance(&mut self) -> Option<Lsn> {
        if self.poisoned {
            return None;
        }
        let before = self.confirmed;
        while let Some(front) = self.queue.front() {
            match front.end_lsn {
                Some(lsn) if front.outstanding == 0 => {
                    self.confirmed = self.confirmed.max(lsn);
                    self.queue.pop_front();
                    self.front_seq += 1;
                }
                _ => break,
            }
        }
        (self.confirmed > before).then_some(self.confirmed)
    }

    /// Highest confirmable LSN (0 before the first).
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// Records enqueued but not yet acknowledged (or failed).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether a record failed: nothing more will be confirmed.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_only_after_every_record_of_the_transaction() {
        let mut t = AckTracker::new();
        let a1 = t.sent();
        let a2 = t.sent();
        assert_eq!(t.end_transaction(100), None);
        assert_eq!(t.acked(a1), None);
        assert_eq!(t.confirmed(), 0);
        assert_eq!(t.acked(a2), Some(100));
        assert_eq!(t.confirmed(), 100);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn later_transaction_waits_for_earlier_one() {
        let mut t = AckTracker::new();
        let a = t.sent();
        t.end_transaction(100);
        let b = t.sent();
        t.end_transaction(200);
        let c = t.sent();
        t.end_transaction(300);
        assert_ne!(a, b);
        // b and c acknowledged first: nothing confirmable while a is out.
        assert_eq!(t.acked(c), None);
        assert_eq!(t.acked(b), None);
        assert_eq!(t.confirmed(), 0);
        // a acknowledged: all three confirmable at once.
        assert_eq!(t.acked(a), Some(300));
    }

    #[test]
    fn open_transaction_is_never_confirmed() {
        let mut t = AckTracker::new();
        let a = t.sent();
        assert_eq!(t.acked(a), None);
        assert_eq!(t.confirmed(), 0);
        assert_eq!(t.end_transaction(50), Some(50));
    }

    #[test]
    fn empty_transactions_confirm_in_order() {
        let mut t = AckTracker::new();
        assert_eq!(t.end_transaction(10), Some(10));
        let a = t.sent();
        t.end_transaction(20);
        // An empty transaction after a pending one waits for it.
        assert_eq!(t.end_transaction(30), None);
        assert_eq!(t.acked(a), Some(30));
    }

    #[test]
    fn confirmed_is_monotonic() {
        let mut t = AckTracker::new();
        assert_eq!(t.end_transaction(100), Some(100));
        assert_eq!(t.end_transaction(90), None);
        assert_eq!(t.confirmed(), 100);
    }

    #[test]
    fn snapshot_chunks_with_same_lsn() {
        let mut t = AckTracker::new();
        let a = t.sent();
        t.end_transaction(500);
        let b = t.sent();
        t.end_transaction(500);
        assert_eq!(t.acked(b), None);
        assert_eq!(t.acked(a), Some(500));
    }

    #[test]
    fn failure_stops_confirmation_forever() {
        let mut t = AckTracker::new();
        let a = t.sent();
        let b = t.sent();
        t.end_transaction(100);
        t.failed(a);
        assert_eq!(t.acked(b), None);
        assert_eq!(t.end_transaction(200), None);
        assert_eq!(t.confirmed(), 0);
        assert!(t.is_poisoned());
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn unknown_sequence_numbers_are_ignored() {
        let mut t = AckTracker::new();
        assert_eq!(t.acked(7), None);
        let a = t.sent();
        t.end_transaction(1);
        assert_eq!(t.acked(a), Some(1));
        // Duplicate report of an already retired transaction.
        assert_eq!(t.acked(a), None);
    }

    /// Random interleavings: the confirmed LSN never passes a transaction with
    /// an unacknowledged record, and ends at the last end LSN.
    #[test]
    fn random_ack_orders_never_confirm_past_a_pending_record() {
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let mut t = AckTracker::new();
            // (seq, end lsn of its transaction)
            let mut pending: Vec<(u64, Lsn)> = Vec::new();
            let transactions = 1 + next() % 20;
            for tx in 0..transactions {
                let lsn = (tx + 1) * 10;
                for _ in 0..next() % 4 {
                    pending.push((t.sent(), lsn));
                }
                t.end_transaction(lsn);
            }
            while !pending.is_empty() {
                let i = (next() % pending.len() as u64) as usize;
                let (seq, _) = pending.swap_remove(i);
                t.acked(seq);
                let lowest_pending = pending.iter().map(|&(_, lsn)| lsn).min();
                if let Some(lowest) = lowest_pending {
                    assert!(t.confirmed() < lowest, "confirmed past a pending record");
                }
            }
            assert_eq!(t.confirmed(), transactions * 10);
            assert_eq!(t.in_flight(), 0);
        }
    }
}
