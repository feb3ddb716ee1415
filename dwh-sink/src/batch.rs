//! One warehouse transaction's worth of messages, already encoded for COPY:
//! the change events, the typed shop rows per entity, the truncates, the
//! days whose `change_event` partitions must exist, and the next Kafka
//! offset of every partition it covers. Filled by the poll thread (pure).

use std::collections::{BTreeMap, BTreeSet};

use crate::copy::{BinaryRows, CopyRows};
use crate::event::{BadInput, Decoded, Event, Marker, Op};
use crate::shop::{self, Entity, Field};

/// Microseconds per day.
const DAY_US: i64 = 86_400_000_000;

/// A truncate of a source table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Which entity's facts or versions it ends.
    pub entity: Entity,
    /// Its position `(commit_lsn, lsn)`.
    pub position: (i64, i64),
    /// Its commit time (µs).
    pub commit_time_us: i64,
}

/// A snapshot-complete marker as read from one partition: it ends the
/// rows of its table that this partition holds (their last event was read
/// from it) and that the snapshot did not read again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkerAt {
    /// The marker.
    pub marker: Marker,
    /// The topic it was read from.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its Kafka timestamp (µs): the deletes it records carry it as their
    /// commit time (the source's is unknown, somewhen while no slot
    /// existed).
    pub time_us: i64,
}

/// A message that could not be decoded, for the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Where it was read.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key.
    pub key: Option<Vec<u8>>,
    /// Its value.
    pub payload: Option<Vec<u8>>,
    /// Why it is bad.
    pub error: String,
}

/// One batch.
#[derive(Debug, Default)]
pub struct Batch {
    /// Rows for `change_event` (via its staging table).
    pub events: BinaryRows,
    /// Typed rows per entity, indexed by [`Entity::index`].
    pub shop: [CopyRows; 7],
    /// Truncates in the batch.
    pub truncates: Vec<Truncate>,
    /// Snapshot-complete markers in the batch, in the order read.
    pub markers: Vec<MarkerAt>,
    /// Days (as days since the epoch) of the events' commit times.
    pub days: BTreeSet<i64>,
    /// Next offset per `(topic, partition)`.
    pub next_offsets: BTreeMap<(String, i32), i64>,
    /// Bad messages.
    pub dead: Vec<DeadLetter>,
    /// Messages taken (all kinds).
    pub messages: usize,
    /// Tombstones and ignored messages.
    pub skipped: usize,
    /// Snapshot reads (`r`) among the events.
    pub snapshot_reads: usize,
    /// Change events per source table (`db.table`).
    pub per_table: BTreeMap<String, u64>,
    /// Largest commit time in the batch (µs), for the lag gauge.
    pub max_commit_time_us: Option<i64>,
    /// The key of the partition of the last message, whose entry in
    /// `next_offsets` is updated in place while its run lasts.
    last_partition: Option<(String, i32)>,
    /// Room to spell a `db.table` name without allocating.
    table_name: String,
}

/// The order and names of `change_event`'s columns in a COPY.
pub const EVENT_COLUMNS: &str = "source_db, source_table, row_key, op, commit_time, lsn, commit_lsn, snapshot, tx_id, before, after, kafka_topic, kafka_partition, kafka_offset";

impl Batch {
    /// Whether nothing at all was taken.
    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }

    /// Empties a written batch for reuse: its COPY buffers keep their
    /// memory (tens of MiB under load), which a new batch would allocate,
    /// fault in and grow by copying again.
    pub fn clear(&mut self) {
        self.events.clear();
        for rows in &mut self.shop {
            rows.clear();
        }
        self.truncates.clear();
        self.markers.clear();
        self.days.clear();
        self.next_offsets.clear();
        self.dead.clear();
        self.messages = 0;
        self.skipped = 0;
        self.snapshot_reads = 0;
        self.per_table.clear();
        self.max_commit_time_us = None;
        self.last_partition = None;
        self.table_name.clear();
    }

    /// Records `offset` as read: the partition's next offset is the one
    /// after it. Messages come in runs from one partition, so the run's
    /// entry is updated without building a key (an allocation per message
    /// otherwise).
    fn cover(&mut self, topic: &str, partition: i32, offset: i64) {
        if let Some(key) = &self.last_partition
            && key.1 == partition
            && key.0 == topic
            && let Some(next) = self.next_offsets.get_mut(key)
        {
            *next = offset + 1;
            return;
        }
        let key = (topic.to_owned(), partition);
        self.next_offsets.insert(key.clone(), offset + 1);
        self.last_partition = Some(key);
    }

    /// Decodes and adds one message; a bad one is kept for the dead-letter
    /// topic. Its offset counts as covered either way.
    pub fn push(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        renames: &[(String, String)],
    ) -> Result<(), BadInput> {
        self.messages += 1;
        self.cover(topic, partition, offset);
        let result = crate::event::decode(key, value, renames).and_then(|decoded| match decoded {
            Decoded::Change(event) => {
                let row = shop::extract(&event)?;
                self.add(&event, row.as_ref(), topic, partition, offset);
                Ok(())
            }
            Decoded::Tombstone | Decoded::Ignored => {
                self.skipped += 1;
                Ok(())
            }
        });
        if let Err(bad) = &result {
            self.dead.push(DeadLetter {
                topic: topic.to_owned(),
                partition,
                offset,
                key: key.map(<[u8]>::to_vec),
                payload: value.map(<[u8]>::to_vec),
                error: bad.to_string(),
            });
        }
        result
    }

    /// Adds a snapshot-complete marker read at `offset` with Kafka
    /// timestamp `time_us`; a bad one is kept for the dead-letter topic.
    /// Its offset counts as covered either way.
    pub fn push_marker(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        marker: Result<Marker, BadInput>,
        headers: &[(String, Vec<u8>)],
        time_us: i64,
    ) -> Result<(), BadInput> {
        self.messages += 1;
        self.cover(topic, partition, offset);
        match marker {
            Ok(marker) => {
                self.days.insert(time_us.div_euclid(DAY_US));
                self.markers.push(MarkerAt {
                    marker,
                    topic: topic.to_owned(),
                    partition,
                    offset,
                    time_us,
                });
                Ok(())
            }
            Err(bad) => {
                let headers = headers
                    .iter()
                    .map(|(k, v)| format!("{k}={}", String::from_utf8_lossy(v)))
                    .collect::<Vec<_>>()
                    .join(", ");
                self.dead.push(DeadLetter {
                    topic: topic.to_owned(),
                    partition,
                    offset,
                    key: None,
                    payload: None,
                    error: format!("snapshot-complete marker with headers {headers}: {bad}"),
                });
                Err(bad)
            }
        }
    }

    fn add(
        &mut self,
        event: &Event<'_>,
        row: Option<&shop::ShopRow>,
        topic: &str,
        partition: i32,
        offset: i64,
    ) {
        let (commit_lsn, lsn) = event.position();
        self.days.insert(event.commit_time_us.div_euclid(DAY_US));
        self.max_commit_time_us = self.max_commit_time_us.max(Some(event.commit_time_us));
        let mut name = std::mem::take(&mut self.table_name);
        name.clear();
        name.push_str(&event.db);
        name.push('.');
        name.push_str(&event.table);
        match self.per_table.get_mut(name.as_str()) {
            Some(n) => *n += 1,
            None => {
                self.per_table.insert(name.clone(), 1);
            }
        }
        self.table_name = name;
        // In the order and types of EVENT_COLUMNS.
        self.events
            .text(Some(&event.db))
            .text(Some(&event.table))
            .text(Some(&event.key))
            .char(event.op.letter().bytes().next().unwrap_or(b'?'))
            .timestamptz(Some(event.commit_time_us))
            .int8(Some(event.lsn))
            .int8(event.commit_lsn)
            .bool(Some(event.snapshot))
            .int8(event.tx_id)
            .jsonb(event.before.map(|r| r.get()))
            .jsonb(event.after.map(|r| r.get()))
            .text(Some(topic))
            .int4(Some(partition))
            .int8(Some(offset));
        self.events.end_row();
        if event.op == Op::Read {
            self.snapshot_reads += 1;
        }
        if event.op == Op::Truncate {
            if let Some(entity) = Entity::of(&event.db, &event.table) {
                self.truncates.push(Truncate {
                    entity,
                    position: (commit_lsn, lsn),
                    commit_time_us: event.commit_time_us,
                });
            }
            return;
        }
        let Some(row) = row else {
            return;
        };
        let out = &mut self.shop[row.entity.index()];
        out.text(Some(event.op.letter()))
            .int(Some(row.id))
            .text(Some(&event.key))
            .int(Some(commit_lsn))
            .int(Some(lsn))
            .micros(Some(event.commit_time_us));
        for field in &row.fields {
            match field {
                Field::Text(v) => out.text(v.as_deref()),
                Field::Int(v) => out.int(*v),
                Field::Bool(v) => out.bool(*v),
                Field::Time(v) => out.micros(*v),
            };
        }
        out.end_row();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn collects_events_rows_offsets_and_dead_letters() {
        let mut b = Batch::default();
        let v = br#"{"after":{"id":1,"transaction_id":2,"product_id":3,"quantity":2,"unit_price":"1.50"},"source":{"db":"instashop","table":"transactiondetail","ts_ms":86400000,"lsn":50,"commit_lsn":60},"op":"c"}"#;
        b.push("t", 0, 10, Some(br#"{"id":1}"#), Some(v), &[])
            .unwrap();
        b.push("t", 0, 11, Some(br#"{"id":1}"#), None, &[]).unwrap();
        assert!(b.push("t", 1, 5, None, Some(b"garbage"), &[]).is_err());
        assert_eq!(b.messages, 3);
        assert_eq!(b.skipped, 1);
        assert_eq!(b.dead.len(), 1);
        assert_eq!(b.events.rows(), 1);
        assert_eq!(b.shop[Entity::Line.index()].rows(), 1);
        assert_eq!(
            std::str::from_utf8(b.shop[Entity::Line.index()].bytes()).unwrap(),
            "c\t1\t{\"id\":1}\t60\t50\t1970-01-02T00:00:00Z\t2\t3\t2\t150\n"
        );
        assert_eq!(b.days.iter().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(b.next_offsets[&("t".to_owned(), 0)], 12);
        assert_eq!(b.next_offsets[&("t".to_owned(), 1)], 6);
    }

    #[test]
    fn offsets_follow_interleaved_partitions_and_a_cleared_batch_starts_over() {
        let v = br#"{"after":{"id":1,"quantity":2},"source":{"db":"erp","table":"stock","ts_ms":5,"lsn":50},"op":"c"}"#;
        let key = Some(&br#"{"id":1}"#[..]);
        let mut b = Batch::default();
        for (topic, partition, offset) in [
            ("a", 0, 1),
            ("a", 0, 2),
            ("a", 1, 5),
            ("a", 0, 3),
            ("b", 0, 9),
        ] {
            b.push(topic, partition, offset, key, Some(v), &[]).unwrap();
        }
        let offsets = |b: &Batch| {
            b.next_offsets
                .iter()
                .map(|((t, p), n)| (t.clone(), *p, *n))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            offsets(&b),
            [("a".into(), 0, 4), ("a".into(), 1, 6), ("b".into(), 0, 10)]
        );
        assert_eq!(b.per_table.get("erp.stock"), Some(&5));
        b.clear();
        // Field by field as a new batch (a field added later and left out
        // of clear() shows here).
        assert_eq!(format!("{b:?}"), format!("{:?}", Batch::default()));
        b.push("b", 0, 10, key, Some(v), &[]).unwrap();
        b.push("a", 0, 4, key, Some(v), &[]).unwrap();
        assert_eq!(offsets(&b), [("a".into(), 0, 5), ("b".into(), 0, 11)]);
        assert_eq!(b.events.rows(), 2);
        assert_eq!(b.per_table.get("erp.stock"), Some(&2));
    }

    #[test]
    fn markers_are_kept_with_their_partition_and_day() {
        let mut b = Batch::default();
        let marker = Marker {
            db: "instashop".into(),
            table: "product".into(),
            commit_lsn: 100,
        };
        b.push_marker("t", 2, 7, Ok(marker.clone()), &[], 2 * DAY_US + 5)
            .unwrap();
        let bad = b.push_marker(
            "t",
            1,
            3,
            Err(BadInput::MissingField("header cdc.table")),
            &[("cdc.marker".to_owned(), b"snapshot_complete".to_vec())],
            0,
        );
        assert!(bad.is_err());
        assert_eq!(b.messages, 2);
        assert_eq!(b.markers.len(), 1);
        assert_eq!(b.markers[0].marker, marker);
        assert_eq!((b.markers[0].partition, b.markers[0].offset), (2, 7));
        assert_eq!(b.days.iter().copied().collect::<Vec<_>>(), vec![2]);
        assert_eq!(b.dead.len(), 1);
        assert!(b.dead[0].error.contains("cdc.marker=snapshot_complete"));
        assert_eq!(b.next_offsets[&("t".to_owned(), 1)], 4);
        assert_eq!(b.next_offsets[&("t".to_owned(), 2)], 8);
    }
}
