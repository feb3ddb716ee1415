//! The typed rows of the shop's tables that feed the star schema, read from
//! a change event's row image. Pure.
//!
//! Why typed in the sink rather than cast in SQL: a value the warehouse
//! cannot cast would fail the whole batch's transaction, again on every
//! retry. Read here, a bad value is one bad message: dead-lettered, counted
//! and skipped, and the batch goes through. Decimals are read in each of
//! Debezium's decimal modes (string, double, precise base64), timestamps as
//! ISO-8601 text or microseconds.

use std::borrow::Cow;

use base64::Engine as _;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::event::{BadInput, Event, Op};

/// A star-schema input: which staging table a shop table's rows go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Entity {
    /// `instashop.customer` → `dim_customer`.
    Customer,
    /// `instashop.buyer` → `dim_buyer`.
    Buyer,
    /// `instashop.product` → `dim_product`.
    Product,
    /// `ecommerce.carrier` → `dim_carrier`.
    Carrier,
    /// `instashop.transaction` → `fact_purchase`.
    Purchase,
    /// `instashop.transactiondetail` → `fact_sale_line`.
    Line,
    /// `ecommerce.shipment` → `fact_shipment`.
    Shipment,
}

/// Kind of a typed column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `text`.
    Text,
    /// `bigint`.
    Int,
    /// `boolean`.
    Bool,
    /// Money in integer cents (`bigint`).
    Cents,
    /// `timestamptz`, from ISO text or microseconds.
    Time,
}

impl Kind {
    /// The staging column's SQL type.
    pub fn sql_type(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Int | Kind::Cents => "bigint",
            Kind::Bool => "boolean",
            Kind::Time => "timestamptz",
        }
    }
}

/// A column of an entity: the staging name, the source column and its kind.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    /// Name in the staging table (and the warehouse table).
    pub name: &'static str,
    /// Name in the source row image.
    pub source: &'static str,
    /// How it is read.
    pub kind: Kind,
}

const fn col(name: &'static str, source: &'static str, kind: Kind) -> Column {
    Column { name, source, kind }
}

impl Entity {
    /// Every entity.
    pub const ALL: [Entity; 7] = [
        Entity::Customer,
        Entity::Buyer,
        Entity::Product,
        Entity::Carrier,
        Entity::Purchase,
        Entity::Line,
        Entity::Shipment,
    ];

    /// The entity fed by a source table (logical database and table name).
    pub fn of(db: &str, table: &str) -> Option<Entity> {
        Some(match (db, table) {
            ("instashop", "customer") => Entity::Customer,
            ("instashop", "buyer") => Entity::Buyer,
            ("instashop", "product") => Entity::Product,
            ("instashop", "transaction") => Entity::Purchase,
            ("instashop", "transactiondetail") => Entity::Line,
            ("ecommerce", "carrier") => Entity::Carrier,
            ("ecommerce", "shipment") => Entity::Shipment,
            _ => return None,
        })
    }

    /// The source table, as `(db, table)`.
    pub fn source(self) -> (&'static str, &'static str) {
        match self {
            Entity::Customer => ("instashop", "customer"),
            Entity::Buyer => ("instashop", "buyer"),
            Entity::Product => ("instashop", "product"),
            Entity::Carrier => ("ecommerce", "carrier"),
            Entity::Purchase => ("instashop", "transaction"),
            Entity::Line => ("instashop", "transactiondetail"),
            Entity::Shipment => ("ecommerce", "shipment"),
        }
    }

    /// Position in [`Entity::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The staging table's name.
    pub fn stage(self) -> &'static str {
        match self {
            Entity::Customer => "stage_customer",
            Entity::Buyer => "stage_buyer",
            Entity::Product => "stage_product",
            Entity::Carrier => "stage_carrier",
            Entity::Purchase => "stage_purchase",
            Entity::Line => "stage_line",
            Entity::Shipment => "stage_shipment",
        }
    }

    /// The typed columns read from the row image (after the common
    /// header: op, id, row_key, commit_lsn, lsn, commit_time). For
    /// dimensions these are the tracked attributes.
    pub fn columns(self) -> &'static [Column] {
        match self {
            Entity::Customer => CUSTOMER,
            Entity::Buyer => BUYER,
            Entity::Product => PRODUCT,
            Entity::Carrier => CARRIER,
            Entity::Purchase => PURCHASE,
            Entity::Line => LINE,
            Entity::Shipment => SHIPMENT,
        }
    }
}

use Kind::{Bool, Cents, Int, Text, Time};

const CUSTOMER: &[Column] = &[
    col("name", "name", Text),
    col("email", "email", Text),
    col("subscription_plan", "subscription_plan", Text),
    col("country", "country", Text),
    col("is_active", "is_active", Bool),
];

const BUYER: &[Column] = &[
    col("customer_id", "customer_id", Int),
    col("name", "name", Text),
    col("email", "email", Text),
];

const PRODUCT: &[Column] = &[
    col("customer_id", "customer_id", Int),
    col("name", "name", Text),
    col("category", "category", Text),
    col("price_cents", "price", Cents),
];

const CARRIER: &[Column] = &[
    col("name", "name", Text),
    col("tracking_url_template", "tracking_url_template", Text),
];

const PURCHASE: &[Column] = &[
    col("customer_id", "customer_id", Int),
    col("buyer_id", "buyer_id", Int),
    col("total_cents", "total_amount", Cents),
    col("currency", "currency", Text),
    col("payment_method", "payment_method", Text),
    col("status", "status", Text),
    col("purchase_time", "created_at", Time),
];

const LINE: &[Column] = &[
    col("purchase_id", "transaction_id", Int),
    col("product_id", "product_id", Int),
    col("quantity", "quantity", Int),
    col("unit_price_cents", "unit_price", Cents),
];

const SHIPMENT: &[Column] = &[
    col("purchase_id", "transaction_id", Int),
    col("carrier_id", "carrier_id", Int),
    col("status", "status", Text),
    col("tracking_code", "tracking_code", Text),
    col("created_time", "created_at", Time),
    col("updated_time", "updated_at", Time),
];

/// One typed value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// Text or NULL.
    Text(Option<String>),
    /// Integer (also cents) or NULL.
    Int(Option<i64>),
    /// Boolean or NULL.
    Bool(Option<bool>),
    /// Microseconds since the epoch or NULL.
    Time(Option<i64>),
}

/// A shop row change, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShopRow {
    /// Which entity.
    pub entity: Entity,
    /// The row's `id`.
    pub id: i64,
    /// Values of [`Entity::columns`], in order; all NULL for a delete.
    pub fields: Vec<Field>,
}

/// The typed row of an event of a shop table, `None` for other tables and
/// truncates. A delete carries the id only.
pub fn extract(event: &Event<'_>) -> Result<Option<ShopRow>, BadInput> {
    let Some(entity) = Entity::of(&event.db, &event.table) else {
        return Ok(None);
    };
    if event.op == Op::Truncate {
        return Ok(None);
    }
    let id = row_id(&event.key, event.before.or(event.after))?;
    let columns = entity.columns();
    if event.op == Op::Delete {
        let fields = columns
            .iter()
            .map(|c| match c.kind {
                Kind::Text => Field::Text(None),
                Kind::Int | Kind::Cents => Field::Int(None),
                Kind::Bool => Field::Bool(None),
                Kind::Time => Field::Time(None),
            })
            .collect();
        return Ok(Some(ShopRow { entity, id, fields }));
    }
    let after = event.after.ok_or(BadInput::MissingField("after"))?;
    let row: RowImage<'_> =
        serde_json::from_str(after.get()).map_err(|_| BadInput::BadValue("after"))?;
    let fields = columns
        .iter()
        .map(|c| read(c, row.get(c.source)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(ShopRow { entity, id, fields }))
}

/// A row image's columns, values unparsed, names borrowed from the
/// message unless escaped. A list, not a map: for the few columns of a
/// shop table a scan beats hashing every name of every event.
struct RowImage<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> RowImage<'a> {
    /// The value of `column` (the last one, should a name repeat).
    fn get(&self, column: &str) -> Option<&'a RawValue> {
        self.0
            .iter()
            .rev()
            .find(|(name, _)| name == column)
            .map(|(_, v)| *v)
    }
}

impl<'de> serde::Deserialize<'de> for RowImage<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Image;
        impl<'de> serde::de::Visitor<'de> for Image {
            type Value = RowImage<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a row image (JSON object)")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut columns = Vec::with_capacity(map.size_hint().unwrap_or(12));
                while let Some((Name(name), value)) =
                    map.next_entry::<Name<'de>, &'de RawValue>()?
                {
                    columns.push((name, value));
                }
                Ok(RowImage(columns))
            }
        }
        d.deserialize_map(Image)
    }
}

/// A column name: borrowed when the JSON has no escapes in it (serde's own
/// `Cow<str>` always copies).
struct Name<'a>(Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Name<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl<'de> serde::de::Visitor<'de> for Text {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a column name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(Text)
    }
}

fn row_id(key: &str, image: Option<&RawValue>) -> Result<i64, BadInput> {
    let from = |text: &str| -> Option<i64> {
        let v: Value = serde_json::from_str(text).ok()?;
        as_int(v.get("id")?)
    };
    if !key.is_empty() {
        return from(key).ok_or(BadInput::BadValue("key.id"));
    }
    image
        .and_then(|i| from(i.get()))
        .ok_or(BadInput::MissingField("key"))
}

fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn read(column: &Column, raw: Option<&RawValue>) -> Result<Field, BadInput> {
    let bad = || BadInput::BadValue(column.source);
    let value: Value = match raw {
        None => Value::Null,
        Some(r) => serde_json::from_str(r.get()).map_err(|_| bad())?,
    };
    if value.is_null() {
        return Ok(match column.kind {
            Kind::Text => Field::Text(None),
            Kind::Int | Kind::Cents => Field::Int(None),
            Kind::Bool => Field::Bool(None),
            Kind::Time => Field::Time(None),
        });
    }
    Ok(match column.kind {
        Kind::Text => match value {
            Value::String(s) => Field::Text(Some(s)),
            Value::Number(n) => Field::Text(Some(n.to_string())),
            Value::Bool(b) => Field::Text(Some(b.to_string())),
            _ => return Err(bad()),
        },
        Kind::Int => Field::Int(Some(as_int(&value).ok_or_else(bad)?)),
        Kind::Bool => match value {
            Value::Bool(b) => Field::Bool(Some(b)),
            _ => return Err(bad()),
        },
        Kind::Cents => Field::Int(Some(cents(&value).ok_or_else(bad)?)),
        Kind::Time => Field::Time(Some(micros(&value).ok_or_else(bad)?)),
    })
}

/// Money in cents from any of Debezium's decimal modes: a decimal string
/// (`"22.22"`), a number (`22.22`), base64 of the unscaled integer at scale
/// 2 (`"CK4="`), or `{"scale":s,"value":base64}`. `None` when it is not
/// an exact number of cents.
pub fn cents(value: &Value) -> Option<i64> {
    match value {
        Value::String(s) if s.bytes().all(|b| b.is_ascii_digit() || b"+-.".contains(&b)) => {
            cents_from_decimal(s)
        }
        Value::String(s) => cents_from_unscaled(&unscaled(s)?, 2),
        Value::Number(n) => {
            let f = n.as_f64()? * 100.0;
            let rounded = f.round();
            ((f - rounded).abs() < 1e-6 && rounded.abs() < 9.0e15).then_some(rounded as i64)
        }
        Value::Object(map) => {
            let scale = u32::try_from(map.get("scale")?.as_u64()?).ok()?;
            cents_from_unscaled(&unscaled(map.get("value")?.as_str()?)?, scale)
        }
        _ => None,
    }
}

fn cents_from_decimal(s: &str) -> Option<i64> {
    let (negative, digits) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() && fraction.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let (cents_part, rest) = fraction.split_at(fraction.len().min(2));
    if rest.bytes().any(|b| b != b'0') {
        return None;
    }
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut frac: i64 = if cents_part.is_empty() {
        0
    } else {
        cents_part.parse().ok()?
    };
    if cents_part.len() == 1 {
        frac *= 10;
    }
    let value = whole.checked_mul(100)?.checked_add(frac)?;
    Some(if negative { -value } else { value })
}

/// The big-endian two's-complement integer in base64.
fn unscaled(b64: &str) -> Option<i128> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    if bytes.is_empty() || bytes.len() > 16 {
        return None;
    }
    let mut value: i128 = if bytes[0] & 0x80 != 0 { -1 } else { 0 };
    for b in bytes {
        value = (value << 8) | i128::from(b);
    }
    Some(value)
}

fn cents_from_unscaled(unscaled: &i128, scale: u32) -> Option<i64> {
    let cents = if scale <= 2 {
        unscaled.checked_mul(10i128.checked_pow(2 - scale)?)?
    } else {
        let div = 10i128.checked_pow(scale - 2)?;
        if unscaled % div != 0 {
            return None;
        }
        unscaled / div
    };
    i64::try_from(cents).ok()
}

/// A timestamp as microseconds since the epoch: ISO-8601 text
/// (`ZonedTimestamp`) or an integer of microseconds (`MicroTimestamp`).
pub fn micros(value: &Value) -> Option<i64> {
    match value {
        Value::String(s) => {
            let ts: jiff::Timestamp = s.parse().ok()?;
            Some(ts.as_microsecond())
        }
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::event::{Decoded, decode};

    #[test]
    fn a_row_image_reads_escaped_and_repeated_column_names() {
        let image: RowImage<'_> =
            serde_json::from_str(r#"{"qu\u0061ntity":2,"id":7,"id":8,"note":"a\"b"}"#).unwrap();
        assert_eq!(image.get("quantity").map(RawValue::get), Some("2"));
        assert_eq!(
            image.get("id").map(RawValue::get),
            Some("8"),
            "the last wins"
        );
        assert_eq!(image.get("note").map(RawValue::get), Some(r#""a\"b""#));
        assert!(image.get("missing").is_none());
        assert!(matches!(image.0[1].0, Cow::Borrowed("id")));
        assert!(serde_json::from_str::<RowImage<'_>>("[1]").is_err());
    }

    fn event(value: &str, key: &str) -> Event<'static> {
        let value: &'static str = Box::leak(value.to_owned().into_boxed_str());
        match decode(Some(key.as_bytes()), Some(value.as_bytes()), &[]).unwrap() {
            Decoded::Change(e) => e,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn money_in_every_decimal_mode() {
        assert_eq!(cents(&json!("22.22")), Some(2222));
        assert_eq!(cents(&json!("7")), Some(700));
        assert_eq!(cents(&json!("7.5")), Some(750));
        assert_eq!(cents(&json!("-0.01")), Some(-1));
        assert_eq!(cents(&json!("1.230")), Some(123));
        assert_eq!(cents(&json!("1.234")), None);
        assert_eq!(cents(&json!(22.22)), Some(2222));
        assert_eq!(cents(&json!("CK4=")), Some(2222));
        assert_eq!(cents(&json!({"scale": 3, "value": "Vsw="})), Some(2222));
        assert_eq!(cents(&json!("NAN")), None);
        assert_eq!(cents(&json!(".")), None);
    }

    #[test]
    fn times_from_text_and_micros() {
        assert_eq!(micros(&json!("1970-01-01T00:00:01.5Z")), Some(1_500_000));
        assert_eq!(micros(&json!(42)), Some(42));
        assert_eq!(micros(&json!("2026-02-30T00:00:00Z")), None);
    }

    #[test]
    fn product_update_and_delete() {
        let e = event(
            r#"{"before":null,"after":{"id":7,"customer_id":3,"name":"Lamp","category":"home","price":"19.99","tags":[]},"source":{"db":"instashop","table":"product","ts_ms":1,"lsn":5},"op":"u"}"#,
            r#"{"id":7}"#,
        );
        let row = extract(&e).unwrap().unwrap();
        assert_eq!(row.entity, Entity::Product);
        assert_eq!(row.id, 7);
        assert_eq!(
            row.fields,
            vec![
                Field::Int(Some(3)),
                Field::Text(Some("Lamp".into())),
                Field::Text(Some("home".into())),
                Field::Int(Some(1999)),
            ]
        );
        let d = event(
            r#"{"before":{"id":7},"after":null,"source":{"db":"instashop","table":"product","ts_ms":1,"lsn":6},"op":"d"}"#,
            r#"{"id":7}"#,
        );
        let row = extract(&d).unwrap().unwrap();
        assert_eq!(row.id, 7);
        assert!(
            row.fields
                .iter()
                .all(|f| matches!(f, Field::Int(None) | Field::Text(None)))
        );
    }

    #[test]
    fn bad_values_are_bad_input_and_other_tables_are_none() {
        let e = event(
            r#"{"after":{"id":1,"transaction_id":2,"product_id":3,"quantity":"x","unit_price":"1.00"},"source":{"db":"instashop","table":"transactiondetail","ts_ms":1,"lsn":5},"op":"c"}"#,
            r#"{"id":1}"#,
        );
        assert_eq!(extract(&e).unwrap_err(), BadInput::BadValue("quantity"));
        let s = event(
            r#"{"after":{"id":1,"quantity":4},"source":{"db":"erp","table":"stock","ts_ms":1,"lsn":5},"op":"c"}"#,
            r#"{"id":1}"#,
        );
        assert_eq!(extract(&s).unwrap(), None);
    }
}
