//! Relation cache and tuple -> [`Row`] conversion.
//!
//! Why replace, never merge: the server sends a new Relation message before
//! the first change after `ALTER TABLE`, a replica identity change or a
//! TRUNCATE, and every tuple afterwards has the new column list. Replacing the
//! cached entry (and its shared `Arc<[Column]>`) makes later events show the
//! new column while events already handed to the sink keep the column list
//! they were decoded with.
//!
//! Why fill unchanged TOAST from the old row: with REPLICA IDENTITY FULL the
//! update carries the whole old row, large values included, while the new
//! tuple marks unchanged TOASTed columns as `u`. Copying the old value is
//! exact. Without FULL the value is unknown and stays
//! [`Datum::UnchangedToast`] (rendered as Debezium's placeholder), never a
//! silent null.

use std::collections::HashMap;
use std::sync::Arc;

use crate::change::{Column, Datum, Row, TableName};
use crate::error::Error;
use crate::pgoutput::{OldKind, RelationColumn, Tuple, TupleValue};

/// A cached relation.
#[derive(Debug, Clone)]
pub struct Relation {
    /// Topic and `source` naming.
    pub table: Arc<TableName>,
    /// Columns as of the latest Relation message.
    pub columns: Arc<[Column]>,
    /// `relreplident`: `d`efault, `n`othing, `f`ull, `i`ndex.
    pub replica_identity: u8,
    /// Whether this table's events are emitted (include/exclude filter).
    pub included: bool,
}

/// Relations by OID, replaced on every Relation message.
#[derive(Debug, Default)]
pub struct RelationCache {
    relations: HashMap<u32, Relation>,
}

impl RelationCache {
    /// Empty cache (the server resends Relation messages on every new connection).
    pub fn new() -> Self {
        RelationCache::default()
    }

    /// Replaces the entry for `oid`.
    pub fn replace(
        &mut self,
        oid: u32,
        table: TableName,
        replica_identity: u8,
        columns: &[RelationColumn],
        included: bool,
    ) -> &Relation {
        let columns: Arc<[Column]> = columns
            .iter()
            .map(|c| Column {
                name: c.name.clone(),
                type_oid: c.type_oid,
                type_modifier: c.type_modifier,
                is_key: c.is_key,
            })
            .collect();
        let table = match self.relations.get(&oid) {
            // Keep the same Arc when the name did not change: cheap equality downstream.
            Some(old) if *old.table == table => old.table.clone(),
            _ => Arc::new(table),
        };
        self.relations.insert(
            oid,
            Relation {
                table,
                columns,
                replica_identity,
                included,
            },
        );
        &self.relations[&oid]
    }

    /// The relation for `oid`; a change for an unknown relation is a protocol violation.
    pub fn get(&self, oid: u32) -> Result<&Relation, Error> {
        self.relations.get(&oid).ok_or_else(|| {
            Error::Replication(format!(
                "change for relation oid {oid} before its Relation message"
            ))
        })
    }

    /// Number of cached relations.
    pub fn len(&self) -> usize {
        self.relations.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.relations.is_empty()
    }
}

/// What the catalog says, when a Relation message arrives, about the
/// relation's primary key. The catalog is the present, the message may
/// describe the past: the server decodes changes long after they were made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogKey {
    /// No relation with that OID any more: dropped since.
    Gone,
    /// The relation exists; its primary-key columns (empty: none).
    Columns(Vec<String>),
}

/// The last known key columns per relation OID, kept across reconnects.
///
/// Why: with REPLICA IDENTITY FULL pgoutput marks every column as key, so
/// the key comes from the catalog, which may no longer have the table (or
/// its key) when its last changes are decoded. Sending those changes with a
/// null key would put them on random partitions, out of order with the
/// key's earlier events.
#[derive(Debug, Default)]
pub struct KnownKeys {
    keys: HashMap<u32, Vec<String>>,
}

impl KnownKeys {
    /// Nothing known yet.
    pub fn new() -> Self {
        KnownKeys::default()
    }

    /// Sets `is_key` on `columns` (a Relation message's) and remembers the
    /// choice. In order: the catalog's primary key when the message has all
    /// its columns; else the last key known for `oid`; else, unless the
    /// identity is FULL, the message's own key flags (its replica identity
    /// at the time). A table that exists without a primary key is keyless
    /// (null keys, as Debezium). Returns `false`, leaving `columns` alone,
    /// when no key can be known: the table is gone (or its key changed) and
    /// none was ever seen.
    pub fn resolve(
        &mut self,
        oid: u32,
        replica_identity: u8,
        columns: &mut [RelationColumn],
        catalog: &CatalogKey,
    ) -> bool {
        let present = |names: &[String]| names.iter().all(|n| columns.iter().any(|c| c.name == *n));
        let flagged: Vec<String> = columns
            .iter()
            .filter(|c| c.is_key)
            .map(|c| c.name.clone())
            .collect();
        let chosen = match catalog {
            CatalogKey::Columns(pk) if !pk.is_empty() && present(pk) => Some(pk.clone()),
            _ => match self.keys.get(&oid) {
                Some(known) if present(known) => Some(known.clone()),
                _ if replica_identity != b'f' && !flagged.is_empty() => Some(flagged),
                _ => match catalog {
                    // Exists, no primary key: a keyless table.
                    CatalogKey::Columns(pk) if pk.is_empty() => Some(Vec::new()),
                    _ => None,
                },
            },
        };
        let Some(key) = chosen else {
            return false;
        };
        for c in columns.iter_mut() {
            c.is_key = key.contains(&c.name);
        }
        self.keys.insert(oid, key);
        true
    }
}

/// Converts a tuple to a row of `columns.len()` values.
pub fn to_row(columns: &[Column], tuple: Tuple) -> Result<Row, Error> {
    if tuple.len() != columns.len() {
        return Err(Error::BadData(format!(
            "tuple has {} values but the relation has {} columns",
            tuple.len(),
            columns.len()
        )));
    }
    tuple
        .into_iter()
        .map(|v| match v {
            TupleValue::Null => Ok(Datum::Null),
            TupleValue::UnchangedToast => Ok(Datum::UnchangedToast),
            TupleValue::Text(b) => Ok(Datum::Text(b)),
            TupleValue::Binary(_) => Err(Error::BadData(
                "binary tuple value (the reader never requests binary mode)".to_owned(),
            )),
        })
        .collect()
}

/// Builds `(before, after)` of an update: unchanged TOASTed values of the
/// new row are taken from a full old row when there is one.
pub fn update_rows(
    columns: &[Column],
    old: Option<(OldKind, Tuple)>,
    new: Tuple,
) -> Result<(Option<Row>, Row), Error> {
    let before = old
        .map(|(kind, t)| Ok::<_, Error>((kind, to_row(columns, t)?)))
        .transpose()?;
    let mut after = to_row(columns, new)?;
    if let Some((OldKind::Full, old)) = &before {
        for (a, b) in after.iter_mut().zip(old) {
            if *a == Datum::UnchangedToast && *b != Datum::UnchangedToast {
                *a = b.clone();
            }
        }
    }
    Ok((before.map(|(_, row)| row), after))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn cols() -> Vec<RelationColumn> {
        vec![
            RelationColumn {
                is_key: true,
                name: "id".into(),
                type_oid: 20,
                type_modifier: -1,
            },
            RelationColumn {
                is_key: false,
                name: "doc".into(),
                type_oid: 25,
                type_modifier: -1,
            },
        ]
    }

    fn full(names: &[&str]) -> Vec<RelationColumn> {
        names
            .iter()
            .map(|n| RelationColumn {
                is_key: true,
                name: (*n).into(),
                type_oid: 23,
                type_modifier: -1,
            })
            .collect()
    }

    fn keys_of(columns: &[RelationColumn]) -> Vec<&str> {
        columns
            .iter()
            .filter(|c| c.is_key)
            .map(|c| c.name.as_str())
            .collect()
    }

    #[test]
    fn full_identity_takes_the_catalogs_primary_key() {
        let mut known = KnownKeys::new();
        let mut c = full(&["id", "v"]);
        assert!(known.resolve(1, b'f', &mut c, &CatalogKey::Columns(vec!["id".into()])));
        assert_eq!(keys_of(&c), ["id"]);
    }

    #[test]
    fn a_dropped_table_keeps_its_last_known_key() {
        let mut known = KnownKeys::new();
        let mut c = full(&["id", "v"]);
        assert!(known.resolve(1, b'f', &mut c, &CatalogKey::Columns(vec!["id".into()])));
        // Altered (a column added), then dropped before decoding.
        let mut altered = full(&["id", "v", "extra"]);
        assert!(known.resolve(1, b'f', &mut altered, &CatalogKey::Gone));
        assert_eq!(keys_of(&altered), ["id"]);
        // Key changed in the catalog to a column the message does not have yet.
        let mut old = full(&["id", "v"]);
        assert!(known.resolve(1, b'f', &mut old, &CatalogKey::Columns(vec!["nid".into()])));
        assert_eq!(keys_of(&old), ["id"]);
    }

    #[test]
    fn a_changed_key_is_refreshed_from_the_catalog() {
        let mut known = KnownKeys::new();
        let mut c = full(&["id", "code"]);
        assert!(known.resolve(1, b'f', &mut c, &CatalogKey::Columns(vec!["id".into()])));
        let mut c = full(&["id", "code"]);
        assert!(known.resolve(1, b'f', &mut c, &CatalogKey::Columns(vec!["code".into()])));
        assert_eq!(keys_of(&c), ["code"]);
        let mut c = full(&["id", "code"]);
        assert!(known.resolve(1, b'f', &mut c, &CatalogKey::Gone));
        assert_eq!(keys_of(&c), ["code"]);
    }

    #[test]
    fn no_key_ever_known_for_a_dropped_full_identity_table() {
        let mut known = KnownKeys::new();
        let mut c = full(&["id", "v"]);
        assert!(!known.resolve(7, b'f', &mut c, &CatalogKey::Gone));
        // Another relation's key does not count.
        assert!(known.resolve(
            8,
            b'f',
            &mut full(&["id"]),
            &CatalogKey::Columns(vec!["id".into()])
        ));
        assert!(!known.resolve(7, b'f', &mut c, &CatalogKey::Gone));
    }

    #[test]
    fn default_identity_flags_describe_the_key_at_the_time() {
        let mut known = KnownKeys::new();
        let mut c = cols();
        assert!(known.resolve(3, b'd', &mut c, &CatalogKey::Gone));
        assert_eq!(keys_of(&c), ["id"]);
    }

    #[test]
    fn an_existing_table_without_primary_key_is_keyless() {
        let mut known = KnownKeys::new();
        let mut c = full(&["a", "b"]);
        assert!(known.resolve(4, b'f', &mut c, &CatalogKey::Columns(Vec::new())));
        assert!(keys_of(&c).is_empty());
        // Known keyless, then dropped: still keyless, not an error.
        let mut c = full(&["a", "b"]);
        assert!(known.resolve(4, b'f', &mut c, &CatalogKey::Gone));
        assert!(keys_of(&c).is_empty());
    }

    fn name() -> TableName {
        TableName {
            prefix: "p".into(),
            database: "db".into(),
            schema: "public".into(),
            table: "t".into(),
        }
    }

    fn t(s: &'static str) -> TupleValue {
        TupleValue::Text(Bytes::from_static(s.as_bytes()))
    }

    fn d(s: &'static str) -> Datum {
        Datum::Text(Bytes::from_static(s.as_bytes()))
    }

    #[test]
    fn relation_is_replaced_on_every_message() {
        let mut cache = RelationCache::new();
        let first = cache.replace(1, name(), b'd', &cols(), true).clone();
        assert_eq!(first.columns.len(), 2);
        let mut more = cols();
        more.push(RelationColumn {
            is_key: false,
            name: "added".into(),
            type_oid: 23,
            type_modifier: -1,
        });
        let second = cache.replace(1, name(), b'f', &more, true).clone();
        assert_eq!(second.columns.len(), 3);
        assert_eq!(second.replica_identity, b'f');
        assert!(Arc::ptr_eq(&first.table, &second.table));
        // The earlier column list is untouched for events already decoded.
        assert_eq!(first.columns.len(), 2);
        assert!(cache.get(2).is_err());
    }

    #[test]
    fn full_identity_fills_unchanged_toast() {
        let mut cache = RelationCache::new();
        let rel = cache.replace(1, name(), b'f', &cols(), true).clone();
        let (before, after) = update_rows(
            &rel.columns,
            Some((OldKind::Full, vec![t("1"), t("big value")])),
            vec![t("1"), TupleValue::UnchangedToast],
        )
        .unwrap();
        assert_eq!(after, vec![d("1"), d("big value")]);
        assert_eq!(before, Some(vec![d("1"), d("big value")]));
    }

    #[test]
    fn default_identity_keeps_the_marker() {
        let c: Vec<Column> = cols()
            .iter()
            .map(|c| Column {
                name: c.name.clone(),
                type_oid: c.type_oid,
                type_modifier: c.type_modifier,
                is_key: c.is_key,
            })
            .collect();
        let (before, after) =
            update_rows(&c, None, vec![t("1"), TupleValue::UnchangedToast]).unwrap();
        assert_eq!(before, None);
        assert_eq!(after, vec![d("1"), Datum::UnchangedToast]);
        // A key-only old row does not fill anything.
        let (_, after) = update_rows(
            &c,
            Some((OldKind::Key, vec![t("0"), TupleValue::Null])),
            vec![t("1"), TupleValue::UnchangedToast],
        )
        .unwrap();
        assert_eq!(after[1], Datum::UnchangedToast);
    }

    #[test]
    fn wrong_width_is_bad_data() {
        let c: Vec<Column> = Vec::new();
        assert!(matches!(
            to_row(&c, vec![TupleValue::Null]),
            Err(Error::BadData(_))
        ));
    }
}
