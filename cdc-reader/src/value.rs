//! Column values: Postgres' text output (as pgoutput sends it) to the JSON
//! Debezium's PostgreSQL connector writes with schemas disabled.
//!
//! Pure and allocation-light: values are written straight into the output
//! buffer of the envelope, so a row costs one pass over its text. The reader
//! sets the session `TimeZone=UTC`, so `timestamptz` arrives with a `+00`
//! offset; other offsets are still converted correctly.
//!
//! | Postgres type | JSON | example |
//! |---|---|---|
//! | `smallint`, `integer`, `bigint`, `oid` | number | `42` |
//! | `real`, `double precision` | number; `"NaN"`, `"Infinity"`, `"-Infinity"` | `1.5` |
//! | `numeric` (`DecimalMode::String`, default) | exact decimal string; `"NAN"`, `"POSITIVE_INFINITY"`, `"NEGATIVE_INFINITY"` | `"22.22"` |
//! | `numeric` (`DecimalMode::Double`) | number (may round) | `22.22` |
//! | `numeric(p,s)` (`DecimalMode::Precise`) | base64 of the unscaled two's-complement big-endian integer | `"CK4="` |
//! | `numeric` without scale (`DecimalMode::Precise`) | `{"scale":s,"value":base64}` | `{"scale":2,"value":"CK4="}` |
//! | `money` | decimal as for `numeric(.,2)` (currency symbol and separators dropped) | `"1234.56"` |
//! | `boolean` | `true` / `false` | `true` |
//! | `bit(1)` | `true` / `false` | `true` |
//! | `text`, `varchar`, `char(n)`, `name`, `"char"`, `uuid`, `xml`, `inet`, `cidr`, `macaddr`, `bit(n)`, `varbit` | string | `"a"` |
//! | enums and every other unknown type (OID ≥ 16384, geometric types, ranges, ...) | string (Postgres' text form) | `"completed"` |
//! | `json`, `jsonb` | string holding the document | `"{\"a\": 1}"` |
//! | `bytea` | base64 string | `"AQI="` |
//! | `timestamptz` | ISO-8601 string in UTC (`ZonedTimestamp`), exactly the column's precision in fraction digits (6 by default); `"infinity"` / `"-infinity"` | `"2016-11-04T11:51:30.120000Z"` |
//! | `timestamp` | microseconds since the epoch (`MicroTimestamp`); ±infinity as `i64::MAX` / `i64::MIN` | `1478260290123456` |
//! | `date` | days since 1970-01-01 (`Date`); ±infinity as `i32::MAX` / `i32::MIN` | `17109` |
//! | `time` | microseconds since midnight (`MicroTime`) | `42690123456` |
//! | `timetz` | ISO-8601 time string in UTC (`ZonedTime`) | `"09:51:30.123456Z"` |
//! | `interval` | ISO-8601 duration string (`interval.handling.mode=string`) | `"P1Y2M3DT4H5M6.78S"` |
//! | arrays of any type above (nested too) | JSON arrays, elements converted as above | `[1,null,3]` |
//! | SQL NULL | `null` | `null` |
//! | unchanged TOASTed value not known from the old row | `"__debezium_unavailable_value"` | |

use std::fmt;
use std::io::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::change::{Column, Datum};

/// Debezium's placeholder for an unchanged TOASTed value the server did not send.
pub const UNAVAILABLE_VALUE: &str = "__debezium_unavailable_value";

/// How `numeric` values are represented (Debezium's `decimal.handling.mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DecimalMode {
    /// Exact decimal string, e.g. `"22.22"` (easiest for consumers).
    #[default]
    String,
    /// JSON number (may lose precision).
    Double,
    /// Debezium's default: base64 of the unscaled integer (`{"scale","value"}`
    /// when the column has no fixed scale).
    Precise,
}

/// A value whose text could not be read as its declared type. Never holds the
/// value itself (row values stay out of logs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read a {type_name} value (type oid {type_oid}): {reason}")]
pub struct ValueError {
    /// Type OID of the column.
    pub type_oid: u32,
    /// Human name of the type.
    pub type_name: &'static str,
    /// What was wrong.
    pub reason: &'static str,
}

/// Type OIDs of the built-in types handled specially (`pg_type.oid`, fixed).
pub mod oid {
    #![allow(missing_docs)]
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const XML: u32 = 142;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const MONEY: u32 = 790;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const INTERVAL: u32 = 1186;
    pub const TIMETZ: u32 = 1266;
    pub const BIT: u32 = 1560;
    pub const VARBIT: u32 = 1562;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// Element type of a built-in array type, `None` when `type_oid` is not one.
pub fn array_element_type(type_oid: u32) -> Option<u32> {
    Some(match type_oid {
        1000 => oid::BOOL,
        1001 => oid::BYTEA,
        1002 => oid::CHAR,
        1003 => oid::NAME,
        1005 => oid::INT2,
        1007 => oid::INT4,
        1009 => oid::TEXT,
        1014 => oid::BPCHAR,
        1015 => oid::VARCHAR,
        1016 => oid::INT8,
        1021 => oid::FLOAT4,
        1022 => oid::FLOAT8,
        1028 => oid::OID,
        1115 => oid::TIMESTAMP,
        1182 => oid::DATE,
        1183 => oid::TIME,
        1185 => oid::TIMESTAMPTZ,
        1187 => oid::INTERVAL,
        1231 => oid::NUMERIC,
        1270 => oid::TIMETZ,
        1561 => oid::BIT,
        1563 => oid::VARBIT,
        143 => oid::XML,
        199 => oid::JSON,
        791 => oid::MONEY,
        2951 => oid::UUID,
        3807 => oid::JSONB,
        // inet, cidr, macaddr arrays: elements are strings.
        1040 | 1041 | 651 => oid::TEXT,
        _ => return None,
    })
}

fn type_name(type_oid: u32) -> &'static str {
    match type_oid {
        oid::BOOL => "boolean",
        oid::BYTEA => "bytea",
        oid::INT2 => "smallint",
        oid::INT4 => "integer",
        oid::INT8 => "bigint",
        oid::OID => "oid",
        oid::FLOAT4 => "real",
        oid::FLOAT8 => "double precision",
        oid::MONEY => "money",
        oid::NUMERIC => "numeric",
        oid::DATE => "date",
        oid::TIME => "time",
        oid::TIMETZ => "timetz",
        oid::TIMESTAMP => "timestamp",
        oid::TIMESTAMPTZ => "timestamptz",
        oid::INTERVAL => "interval",
        oid::BIT => "bit",
        t if array_element_type(t).is_some() => "array",
        _ => "text",
    }
}

/// Writes one column value as JSON.
pub fn write_datum(
    out: &mut Vec<u8>,
    datum: &Datum,
    column: &Column,
    mode: DecimalMode,
) -> Result<(), ValueError> {
    match datum {
        Datum::Null => {
            out.extend_from_slice(b"null");
            Ok(())
        }
        Datum::UnchangedToast => {
            write_str(out, UNAVAILABLE_VALUE);
            Ok(())
        }
        Datum::Text(bytes) => {
            let text = std::str::from_utf8(bytes).map_err(|_| ValueError {
                type_oid: column.type_oid,
                type_name: type_name(column.type_oid),
                reason: "not valid UTF-8",
            })?;
            write_text(out, text, column.type_oid, column.type_modifier, mode)
        }
    }
}

/// One column value as a `serde_json::Value` (tests and tools; the envelope
/// uses [`write_datum`]).
pub fn to_json(
    datum: &Datum,
    column: &Column,
    mode: DecimalMode,
) -> Result<serde_json::Value, ValueError> {
    let mut out = Vec::new();
    write_datum(&mut out, datum, column, mode)?;
    serde_json::from_slice(&out).map_err(|_| ValueError {
        type_oid: column.type_oid,
        type_name: type_name(column.type_oid),
        reason: "produced invalid JSON (bug)",
    })
}

/// Writes the JSON for one non-null value given in Postgres' text form.
pub fn write_text(
    out: &mut Vec<u8>,
    text: &str,
    type_oid: u32,
    type_modifier: i32,
    mode: DecimalMode,
) -> Result<(), ValueError> {
    let err = |reason: &'static str| ValueError {
        type_oid,
        type_name: type_name(type_oid),
        reason,
    };
    match type_oid {
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => {
            if !is_integer(text) {
                return Err(err("not an integer"));
            }
            out.extend_from_slice(text.as_bytes());
        }
        oid::BOOL => match text {
            "t" => out.extend_from_slice(b"true"),
            "f" => out.extend_from_slice(b"false"),
            _ => return Err(err("expected t or f")),
        },
        oid::BIT if type_modifier == 1 => match text {
            "1" => out.extend_from_slice(b"true"),
            "0" => out.extend_from_slice(b"false"),
            _ => return Err(err("expected 0 or 1")),
        },
        oid::FLOAT4 | oid::FLOAT8 => match text {
            "NaN" | "Infinity" | "-Infinity" => write_str(out, text),
            _ => {
                let v: f64 = text.parse().map_err(|_| err("not a number"))?;
                write_f64(out, v);
            }
        },
        oid::NUMERIC => {
            write_numeric(out, text, numeric_scale(type_modifier), mode).map_err(err)?;
        }
        oid::MONEY => {
            let cleaned: String = text
                .chars()
                .filter(|c| c.is_ascii_digit() || *c == '-' || *c == '.')
                .collect();
            let cleaned = if text.starts_with('(') && !cleaned.starts_with('-') {
                format!("-{cleaned}")
            } else {
                cleaned
            };
            write_numeric(out, &cleaned, Some(2), mode).map_err(err)?;
        }
        oid::BYTEA => {
            let hex = text
                .strip_prefix("\\x")
                .ok_or_else(|| err("expected hex format (bytea_output = hex)"))?;
            let bytes = decode_hex(hex).ok_or_else(|| err("invalid hex digits"))?;
            out.push(b'"');
            let start = out.len();
            out.resize(start + bytes.len().div_ceil(3) * 4, 0);
            let written = BASE64
                .encode_slice(&bytes, &mut out[start..])
                .map_err(|_| err("base64 buffer too small (bug)"))?;
            out.truncate(start + written);
            out.push(b'"');
        }
        oid::TIMESTAMPTZ => match text {
            "infinity" | "-infinity" => write_str(out, text),
            _ => {
                let (days, time, offset) =
                    parse_timestamp(text, true).ok_or_else(|| err("bad timestamp"))?;
                // Shifted to UTC across midnight by day and time of day, not
                // through micros since the epoch: PostgreSQL's last years do
                // not fit them, and ZonedTimestamp is a string.
                let time = time - i64::from(offset) * 1_000_000;
                let days = days
                    .checked_add(time.div_euclid(86_400_000_000))
                    .ok_or_else(|| err("bad timestamp"))?;
                write_iso_timestamp(
                    out,
                    days,
                    time.rem_euclid(86_400_000_000),
                    zoned_fraction_digits(type_modifier),
                );
            }
        },
        oid::TIMESTAMP => match text {
            "infinity" => write_i64(out, i64::MAX),
            "-infinity" => write_i64(out, i64::MIN),
            _ => {
                let (days, time, _) =
                    parse_timestamp(text, false).ok_or_else(|| err("bad timestamp"))?;
                let micros = days
                    .checked_mul(86_400_000_000)
                    .and_then(|day_start| day_start.checked_add(time))
                    .ok_or_else(|| err("timestamp beyond 64-bit microseconds since 1970"))?;
                write_i64(out, micros);
            }
        },
        oid::DATE => {
            let days = match text {
                "infinity" => i64::from(i32::MAX),
                "-infinity" => i64::from(i32::MIN),
                _ => parse_date(text).ok_or_else(|| err("bad date"))?,
            };
            write_i64(out, days);
        }
        oid::TIME => {
            let (micros, rest) = parse_time(text).ok_or_else(|| err("bad time"))?;
            if !rest.is_empty() {
                return Err(err("bad time"));
            }
            write_i64(out, micros);
        }
        oid::TIMETZ => {
            let (micros, rest) = parse_time(text).ok_or_else(|| err("bad time"))?;
            let offset = parse_offset(rest).ok_or_else(|| err("bad time zone offset"))?;
            let utc = (micros - offset as i64 * 1_000_000).rem_euclid(86_400_000_000);
            out.push(b'"');
            write_clock(out, utc);
            out.extend_from_slice(b"Z\"");
        }
        oid::INTERVAL => match interval_to_iso(text) {
            Some(iso) => write_str(out, &iso),
            None => return Err(err("bad interval")),
        },
        _ => {
            if let Some(element) = array_element_type(type_oid) {
                write_array(out, text, element, type_modifier, mode)?;
            } else {
                write_str(out, text);
            }
        }
    }
    Ok(())
}

/// Bytes that need escaping inside a JSON string.
static NEEDS_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        table[i] = true;
        i += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// A JSON string with escaping.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    while let Some(offset) = bytes[start..]
        .iter()
        .position(|&b| NEEDS_ESCAPE[b as usize])
    {
        let i = start + offset;
        out.extend_from_slice(&bytes[start..i]);
        let b = bytes[i];
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0C => out.extend_from_slice(b"\\f"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xF)]);
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Writes an unsigned integer in decimal without going through `fmt`.
pub fn write_u64(out: &mut Vec<u8>, value: u64) {
    let mut buf = [0u8; 20];
    let mut pos = buf.len();
    let mut n = value;
    loop {
        pos -= 1;
        buf[pos] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[pos..]);
}

/// Writes a signed integer in decimal without going through `fmt`.
pub fn write_i64(out: &mut Vec<u8>, value: i64) {
    if value < 0 {
        out.push(b'-');
    }
    write_u64(out, value.unsigned_abs());
}

/// Writes `value` zero-padded to `width` digits (`value` must be non-negative).
fn write_padded(out: &mut Vec<u8>, value: i64, width: usize) {
    let mut buf = [b'0'; 20];
    let mut n = value.unsigned_abs();
    let mut pos = buf.len();
    while n > 0 {
        pos -= 1;
        buf[pos] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    let start = (buf.len() - width).min(pos);
    out.extend_from_slice(&buf[start..]);
}

fn write_f64(out: &mut Vec<u8>, v: f64) {
    if v.is_finite() {
        // serde_json prints the shortest text that reads back as the same f64.
        let _ = serde_json::to_writer(&mut *out, &v);
    } else if v.is_nan() {
        write_str(out, "NaN");
    } else if v > 0.0 {
        write_str(out, "Infinity");
    } else {
        write_str(out, "-Infinity");
    }
}

/// `-?digits` without leading zeros: the text is written as a JSON number
/// as it is, and JSON has no leading zeros (Postgres never prints them).
fn is_integer(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits.len() == 1 || !digits.starts_with('0'))
}

/// `[-]digits[.digits]`: (negative, integer part, fraction part).
fn split_decimal(text: &str) -> Option<(bool, &str, &str)> {
    let (negative, body) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let ok = !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b.is_ascii_digit())
        && !(body.contains('.') && frac.is_empty());
    ok.then_some((negative, int, frac))
}

/// The scale of `numeric(p,s)` from its typmod (`None`: no fixed scale).
/// The typmod is `((p << 16) | s) + 4` with `s` in 11 bits, signed since
/// PostgreSQL 15 (`numeric(5,-2)` rounds to hundreds).
fn numeric_scale(type_modifier: i32) -> Option<i32> {
    (type_modifier >= 4).then(|| (((type_modifier - 4) & 0x7ff) ^ 0x400) - 0x400)
}

fn write_numeric(
    out: &mut Vec<u8>,
    text: &str,
    fixed_scale: Option<i32>,
    mode: DecimalMode,
) -> Result<(), &'static str> {
    let special = match text {
        "NaN" => Some(("NAN", "NaN")),
        "Infinity" => Some(("POSITIVE_INFINITY", "Infinity")),
        "-Infinity" => Some(("NEGATIVE_INFINITY", "-Infinity")),
        _ => None,
    };
    if let Some((debezium, float)) = special {
        match mode {
            DecimalMode::Double => write_str(out, float),
            DecimalMode::String | DecimalMode::Precise => write_str(out, debezium),
        }
        return Ok(());
    }
    let (negative, int, frac) = split_decimal(text).ok_or("not a decimal number")?;
    match mode {
        DecimalMode::String => {
            out.push(b'"');
            out.extend_from_slice(text.as_bytes());
            out.push(b'"');
        }
        DecimalMode::Double => {
            let v: f64 = text.parse().map_err(|_| "not a decimal number")?;
            write_f64(out, v);
        }
        DecimalMode::Precise => {
            let scale = match fixed_scale {
                Some(scale) => scale,
                None => i32::try_from(frac.len()).map_err(|_| "too many fraction digits")?,
            };
            let digits = unscaled_digits(int, frac, scale)?;
            let bytes = twos_complement(negative, &digits);
            let encoded = BASE64.encode(bytes);
            if fixed_scale.is_some() {
                write_str(out, &encoded);
            } else {
                let _ = write!(out, "{{\"scale\":{scale},\"value\":\"{encoded}\"}}");
            }
        }
    }
    Ok(())
}

/// The decimal digits of `int.frac` × 10^`scale` (Debezium's unscaled
/// value), which must be an integer: digits below the scale must be zeros.
fn unscaled_digits(int: &str, frac: &str, scale: i32) -> Result<Vec<u8>, &'static str> {
    let mut digits: Vec<u8> = int.bytes().chain(frac.bytes()).map(|b| b - b'0').collect();
    // Digits kept: those left of the point, plus `scale` more (fewer when negative).
    let keep = i64::try_from(int.len())
        .map_err(|_| "too many digits")?
        .saturating_add(i64::from(scale));
    let keep = usize::try_from(keep).unwrap_or(0);
    if keep >= digits.len() {
        digits.resize(keep, 0);
    } else {
        if digits[keep..].iter().any(|&d| d != 0) {
            return Err("more digits than the column's scale keeps");
        }
        digits.truncate(keep);
    }
    if digits.is_empty() {
        digits.push(0);
    }
    Ok(digits)
}

/// Java `BigInteger.toByteArray()` of the decimal digits: minimal big-endian
/// two's complement.
fn twos_complement(negative: bool, digits: &[u8]) -> Vec<u8> {
    // Magnitude in base 256, little-endian while building.
    let mut mag: Vec<u8> = Vec::with_capacity(digits.len() / 2 + 1);
    for &d in digits {
        let mut carry = u32::from(d);
        for byte in mag.iter_mut() {
            let v = u32::from(*byte) * 10 + carry;
            *byte = (v & 0xFF) as u8;
            carry = v >> 8;
        }
        while carry > 0 {
            mag.push((carry & 0xFF) as u8);
            carry >>= 8;
        }
    }
    while mag.last() == Some(&0) {
        mag.pop();
    }
    let is_zero = mag.is_empty();
    if negative && !is_zero {
        // Two's complement: invert and add one, with one extra byte of room.
        mag.push(0);
        let mut carry = 1u16;
        for byte in mag.iter_mut() {
            let v = u16::from(!*byte) + carry;
            *byte = (v & 0xFF) as u8;
            carry = v >> 8;
        }
        // Drop redundant 0xFF sign bytes.
        while mag.len() > 1 && mag[mag.len() - 1] == 0xFF && mag[mag.len() - 2] & 0x80 != 0 {
            mag.pop();
        }
    } else if mag.last().is_none_or(|b| b & 0x80 != 0) {
        mag.push(0);
    }
    mag.reverse();
    mag
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    let bytes = hex.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    bytes
        .chunks_exact(2)
        .map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect()
}

/// 1970-01-01, day 0 of Debezium's `Date` and of the epoch-based types.
const EPOCH: jiff::civil::Date = jiff::civil::Date::constant(1970, 1, 1);

/// The proleptic Gregorian calendar repeats every 400 years, which hold
/// 146097 days.
const CYCLE_YEARS: i64 = 400;
const CYCLE_DAYS: i64 = 146_097;

/// Whole 400-year cycles between 1970 and `year`, and the year moved by
/// them into 1970..2370.
///
/// jiff does the calendar, but like every maintained Rust date crate it stops
/// long before PostgreSQL does (jiff at the years -9999 and 9999; PostgreSQL
/// dates run from 4713 BC to 5874897 AD, timestamps to 294276 AD), while
/// Debezium's `java.time` writes them all. This is the one piece of calendar
/// arithmetic kept here: a year outside jiff's range is moved into it by
/// whole cycles, which changes neither the month lengths nor the leap days.
fn calendar_cycles(year: i64) -> Option<(i64, i64)> {
    let cycles = year.checked_sub(1970)?.div_euclid(CYCLE_YEARS);
    Some((cycles, year - cycles * CYCLE_YEARS))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (astronomical year),
/// `None` when the date does not exist (2026-02-30) or is beyond `i64`.
fn days_from_civil(year: i64, month: u32, day: u32) -> Option<i64> {
    let (cycles, year) = calendar_cycles(year)?;
    let date = jiff::civil::Date::new(
        i16::try_from(year).ok()?,
        i8::try_from(month).ok()?,
        i8::try_from(day).ok()?,
    )
    .ok()?;
    let days = date.duration_since(EPOCH).as_secs() / 86_400;
    cycles.checked_mul(CYCLE_DAYS)?.checked_add(days)
}

/// (astronomical year, month, day) of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let cycles = days.div_euclid(CYCLE_DAYS);
    let within = days.rem_euclid(CYCLE_DAYS);
    // Within one cycle from 1970-01-01, so always inside jiff's range.
    let date = EPOCH
        .checked_add(jiff::SignedDuration::from_secs(within * 86_400))
        .unwrap_or(EPOCH);
    let year = i64::from(date.year()) + cycles * CYCLE_YEARS;
    (
        year,
        date.month().unsigned_abs().into(),
        date.day().unsigned_abs().into(),
    )
}

/// `YYYY-MM-DD` (year may be longer than 4 digits): (year, month, day, rest).
fn parse_ymd(text: &str) -> Option<(i64, u32, u32, &str)> {
    let (year, rest) = text.split_once('-')?;
    if year.len() < 4 || !year.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let year: i64 = year.parse().ok()?;
    let month = two_digits(rest.get(0..2)?)?;
    if rest.as_bytes().get(2) != Some(&b'-') {
        return None;
    }
    let day = two_digits(rest.get(3..5)?)?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    Some((year, month, day, &rest[5..]))
}

fn two_digits(s: &str) -> Option<u32> {
    let b = s.as_bytes();
    (b.len() == 2 && b[0].is_ascii_digit() && b[1].is_ascii_digit())
        .then(|| u32::from(b[0] - b'0') * 10 + u32::from(b[1] - b'0'))
}

/// Strips a trailing ` BC` and returns the astronomical year adjustment.
fn strip_bc(text: &str) -> (&str, bool) {
    match text.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (text, false),
    }
}

fn parse_date(text: &str) -> Option<i64> {
    let (text, bc) = strip_bc(text);
    let (year, month, day, rest) = parse_ymd(text)?;
    if !rest.is_empty() {
        return None;
    }
    let year = if bc { 1 - year } else { year };
    days_from_civil(year, month, day)
}

/// `HH:MM:SS[.ffffff]`: (micros since midnight, rest of the text).
fn parse_time(text: &str) -> Option<(i64, &str)> {
    let h = two_digits(text.get(0..2)?)?;
    let m = two_digits(text.get(3..5)?)?;
    let s = two_digits(text.get(6..8)?)?;
    if text.as_bytes()[2] != b':' || text.as_bytes()[5] != b':' || h > 24 || m > 59 || s > 60 {
        return None;
    }
    let mut micros = (i64::from(h) * 3600 + i64::from(m) * 60 + i64::from(s)) * 1_000_000;
    let mut rest = &text[8..];
    if let Some(frac) = rest.strip_prefix('.') {
        let len = frac.bytes().take_while(u8::is_ascii_digit).count();
        if len == 0 || len > 6 {
            return None;
        }
        let mut f: i64 = frac[..len].parse().ok()?;
        for _ in len..6 {
            f *= 10;
        }
        micros += f;
        rest = &frac[len..];
    }
    Some((micros, rest))
}

/// `+HH`, `-HH:MM`, `+HH:MM:SS`: offset east of UTC in seconds.
fn parse_offset(text: &str) -> Option<i32> {
    let sign = match text.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let mut parts = text[1..].split(':');
    let h = two_digits(parts.next()?)?;
    let m = parts.next().map_or(Some(0), two_digits)?;
    let s = parts.next().map_or(Some(0), two_digits)?;
    if parts.next().is_some() {
        return None;
    }
    Some(sign * (h as i32 * 3600 + m as i32 * 60 + s as i32))
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff][offset][ BC]`: (days since the epoch,
/// local micros since midnight, offset seconds east of UTC).
fn parse_timestamp(text: &str, with_offset: bool) -> Option<(i64, i64, i32)> {
    let (text, bc) = strip_bc(text);
    let (year, month, day, rest) = parse_ymd(text)?;
    let rest = rest.strip_prefix(' ')?;
    let (time, rest) = parse_time(rest)?;
    let offset = if with_offset {
        parse_offset(rest)?
    } else if rest.is_empty() {
        0
    } else {
        return None;
    };
    let year = if bc { 1 - year } else { year };
    Some((days_from_civil(year, month, day)?, time, offset))
}

fn write_clock(out: &mut Vec<u8>, micros_of_day: i64) {
    let secs = micros_of_day / 1_000_000;
    let mut frac = micros_of_day % 1_000_000;
    write_padded(out, secs / 3600, 2);
    out.push(b':');
    write_padded(out, secs / 60 % 60, 2);
    out.push(b':');
    write_padded(out, secs % 60, 2);
    if frac != 0 {
        let mut width = 6;
        while frac % 10 == 0 {
            frac /= 10;
            width -= 1;
        }
        out.push(b'.');
        write_padded(out, frac, width);
    }
}

/// Digits of the second's fraction in a `timestamptz(p)` value, as
/// Debezium's ZonedTimestamp writes them: exactly `p` (6 when the column
/// has no precision, as PostgreSQL's default), zeros kept
/// (`11:51:30.100000Z`); with `p = 0` none.
fn zoned_fraction_digits(type_modifier: i32) -> usize {
    match usize::try_from(type_modifier) {
        Ok(p) => p.min(6),
        Err(_) => 6,
    }
}

/// `days` since the epoch and `time` micros since midnight, both UTC, with
/// exactly `fraction_digits` (at most 6) digits of the second's fraction.
fn write_iso_timestamp(out: &mut Vec<u8>, days: i64, time: i64, fraction_digits: usize) {
    let (year, month, day) = civil_from_days(days);
    out.push(b'"');
    if (0..=9999).contains(&year) {
        write_padded(out, year, 4);
        out.push(b'-');
        write_padded(out, i64::from(month), 2);
        out.push(b'-');
        write_padded(out, i64::from(day), 2);
        out.push(b'T');
    } else {
        // ISO-8601 expanded years, as java.time prints them.
        let sign = if year < 0 { '-' } else { '+' };
        let _ = write!(out, "{sign}{:04}-{month:02}-{day:02}T", year.abs());
    }
    let secs = time / 1_000_000;
    write_padded(out, secs / 3600, 2);
    out.push(b':');
    write_padded(out, secs / 60 % 60, 2);
    out.push(b':');
    write_padded(out, secs % 60, 2);
    if fraction_digits > 0 {
        let unit = 10_i64.pow(6 - fraction_digits.min(6) as u32);
        out.push(b'.');
        write_padded(out, time % 1_000_000 / unit, fraction_digits.min(6));
    }
    out.extend_from_slice(b"Z\"");
}

/// Postgres' `postgres` interval style (`1 year 2 mons -3 days 04:05:06.5`)
/// to ISO-8601 (`P1Y2M-3DT4H5M6.5S`).
pub fn interval_to_iso(text: &str) -> Option<String> {
    let (mut years, mut months, mut days) = (0i64, 0i64, 0i64);
    let mut micros: i64 = 0;
    let mut tokens = text.split_whitespace().peekable();
    while let Some(token) = tokens.next() {
        if token.contains(':') {
            let (negative, clock) = match token.as_bytes().first()? {
                b'-' => (true, &token[1..]),
                b'+' => (false, &token[1..]),
                _ => (false, token),
            };
            // Hours may exceed two digits.
            let (h, rest) = clock.split_once(':')?;
            let h: i64 = h.parse().ok()?;
            let (m, rest) = rest.split_once(':').unwrap_or((rest, "0"));
            let m: i64 = m.parse().ok()?;
            let (s, f) = rest.split_once('.').unwrap_or((rest, ""));
            let s: i64 = s.parse().ok()?;
            if f.len() > 6 || !f.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let f: i64 = if f.is_empty() {
                0
            } else {
                format!("{f:0<6}").parse().ok()?
            };
            let value = ((h * 60 + m) * 60 + s) * 1_000_000 + f;
            micros += if negative { -value } else { value };
        } else {
            let n: i64 = token.parse().ok()?;
            match tokens.next()? {
                "year" | "years" => years += n,
                "mon" | "mons" => months += n,
                "day" | "days" => days += n,
                _ => return None,
            }
        }
    }
    let negative = micros < 0;
    let abs = micros.unsigned_abs();
    let (h, m) = (abs / 3_600_000_000, abs / 60_000_000 % 60);
    let (s, f) = (abs / 1_000_000 % 60, abs % 1_000_000);
    let sign = |nonzero: bool| if negative && nonzero { "-" } else { "" };
    let (hs, ms) = (sign(h != 0), sign(m != 0));
    let mut seconds = format!("{}{s}", sign(s != 0 || f != 0));
    if f != 0 {
        let mut digits = format!("{f:06}");
        while digits.ends_with('0') {
            digits.pop();
        }
        seconds.push('.');
        seconds.push_str(&digits);
    }
    Some(format!(
        "P{years}Y{months}M{days}DT{hs}{h}H{ms}{m}M{seconds}S"
    ))
}

/// A Postgres array literal (`{1,2}`, `{{a,"b c"},{NULL,"d\"e"}}`,
/// `[0:1]={1,2}`) as a JSON array with each element converted.
fn write_array(
    out: &mut Vec<u8>,
    text: &str,
    element: u32,
    type_modifier: i32,
    mode: DecimalMode,
) -> Result<(), ValueError> {
    let bad = ValueError {
        type_oid: element,
        type_name: "array",
        reason: "malformed array literal",
    };
    let body = if text.starts_with('[') {
        text.split_once('=')
            .map(|(_, b)| b)
            .ok_or_else(|| bad.clone())?
    } else {
        text
    };
    let mut parser = ArrayParser {
        bytes: body.as_bytes(),
        text: body,
        pos: 0,
        scratch: String::new(),
    };
    parser.array(out, element, type_modifier, mode, &bad)?;
    if parser.pos != parser.bytes.len() {
        return Err(bad);
    }
    Ok(())
}

struct ArrayParser<'a> {
    bytes: &'a [u8],
    text: &'a str,
    pos: usize,
    scratch: String,
}

impl ArrayParser<'_> {
    fn array(
        &mut self,
        out: &mut Vec<u8>,
        element: u32,
        type_modifier: i32,
        mode: DecimalMode,
        bad: &ValueError,
    ) -> Result<(), ValueError> {
        if self.bytes.get(self.pos) != Some(&b'{') {
            return Err(bad.clone());
        }
        self.pos += 1;
        out.push(b'[');
        if self.bytes.get(self.pos) == Some(&b'}') {
            self.pos += 1;
            out.push(b']');
            return Ok(());
        }
        loop {
            match self.bytes.get(self.pos) {
                Some(b'{') => self.array(out, element, type_modifier, mode, bad)?,
                Some(b'"') => {
                    self.pos += 1;
                    self.scratch.clear();
                    loop {
                        let start = self.pos;
                        let end = start
                            + self.bytes[start..]
                                .iter()
                                .position(|&b| b == b'"' || b == b'\\')
                                .ok_or_else(|| bad.clone())?;
                        self.scratch.push_str(&self.text[start..end]);
                        self.pos = end + 1;
                        if self.bytes[end] == b'"' {
                            break;
                        }
                        let escaped = self.text[self.pos..]
                            .chars()
                            .next()
                            .ok_or_else(|| bad.clone())?;
                        self.scratch.push(escaped);
                        self.pos += escaped.len_utf8();
                    }
                    let value = std::mem::take(&mut self.scratch);
                    write_text(out, &value, element, type_modifier, mode)?;
                    self.scratch = value;
                }
                Some(_) => {
                    let start = self.pos;
                    let end = start
                        + self.bytes[start..]
                            .iter()
                            .position(|&b| b == b',' || b == b'}')
                            .ok_or_else(|| bad.clone())?;
                    let raw = self.text[start..end].trim();
                    self.pos = end;
                    if raw.eq_ignore_ascii_case("NULL") {
                        out.extend_from_slice(b"null");
                    } else {
                        write_text(out, raw, element, type_modifier, mode)?;
                    }
                }
                None => return Err(bad.clone()),
            }
            match self.bytes.get(self.pos) {
                Some(b',') => {
                    self.pos += 1;
                    out.push(b',');
                }
                Some(b'}') => {
                    self.pos += 1;
                    out.push(b']');
                    return Ok(());
                }
                _ => return Err(bad.clone()),
            }
        }
    }
}

impl fmt::Display for DecimalMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DecimalMode::String => "string",
            DecimalMode::Double => "double",
            DecimalMode::Precise => "precise",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::json;

    fn conv(text: &str, type_oid: u32, type_modifier: i32, mode: DecimalMode) -> serde_json::Value {
        let column = Column {
            name: "c".into(),
            type_oid,
            type_modifier,
            is_key: false,
        };
        to_json(
            &Datum::Text(Bytes::copy_from_slice(text.as_bytes())),
            &column,
            mode,
        )
        .unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn s(text: &str, type_oid: u32) -> serde_json::Value {
        conv(text, type_oid, -1, DecimalMode::String)
    }

    fn fails(text: &str, type_oid: u32) {
        let mut out = Vec::new();
        assert!(
            write_text(&mut out, text, type_oid, -1, DecimalMode::String).is_err(),
            "{text} should fail"
        );
    }

    /// numeric(p,s) typmod as Postgres stores it.
    fn numeric_typmod(precision: i32, scale: i32) -> i32 {
        ((precision << 16) | scale) + 4
    }

    #[test]
    fn integers() {
        assert_eq!(s("42", oid::INT4), json!(42));
        assert_eq!(s("-32768", oid::INT2), json!(-32768));
        assert_eq!(
            s("9223372036854775807", oid::INT8),
            json!(9_223_372_036_854_775_807i64)
        );
        assert_eq!(s("4294967295", oid::OID), json!(4_294_967_295u32));
        fails("4x", oid::INT4);
        fails("", oid::INT8);
        fails("-", oid::INT8);
        // Written as JSON numbers as they are: leading zeros would be invalid JSON.
        assert_eq!(s("0", oid::INT4), json!(0));
        fails("00", oid::INT8);
        fails("-07", oid::INT2);
    }

    #[test]
    fn floats_and_special_values() {
        assert_eq!(s("1.5", oid::FLOAT8), json!(1.5));
        assert_eq!(s("1.1", oid::FLOAT4), json!(1.1));
        assert_eq!(s("-1e+20", oid::FLOAT8), json!(-1e20));
        assert_eq!(s("NaN", oid::FLOAT8), json!("NaN"));
        assert_eq!(s("Infinity", oid::FLOAT4), json!("Infinity"));
        assert_eq!(s("-Infinity", oid::FLOAT8), json!("-Infinity"));
        fails("abc", oid::FLOAT8);
    }

    #[test]
    fn booleans_and_bits() {
        assert_eq!(s("t", oid::BOOL), json!(true));
        assert_eq!(s("f", oid::BOOL), json!(false));
        fails("true", oid::BOOL);
        assert_eq!(conv("1", oid::BIT, 1, DecimalMode::String), json!(true));
        assert_eq!(
            conv("1010", oid::BIT, 4, DecimalMode::String),
            json!("1010")
        );
    }

    #[test]
    fn numeric_string_mode_is_exact() {
        let typmod = numeric_typmod(10, 2);
        assert_eq!(
            conv("22.22", oid::NUMERIC, typmod, DecimalMode::String),
            json!("22.22")
        );
        assert_eq!(
            conv(
                "12345678901234567890.123456789",
                oid::NUMERIC,
                -1,
                DecimalMode::String
            ),
            json!("12345678901234567890.123456789")
        );
        assert_eq!(s("-0.50", oid::NUMERIC), json!("-0.50"));
        assert_eq!(s("NaN", oid::NUMERIC), json!("NAN"));
        assert_eq!(s("Infinity", oid::NUMERIC), json!("POSITIVE_INFINITY"));
        assert_eq!(s("-Infinity", oid::NUMERIC), json!("NEGATIVE_INFINITY"));
        fails("1.2.3", oid::NUMERIC);
        fails("1.", oid::NUMERIC);
        fails("1e5", oid::NUMERIC);
    }

    #[test]
    fn numeric_double_mode() {
        assert_eq!(
            conv("22.22", oid::NUMERIC, -1, DecimalMode::Double),
            json!(22.22)
        );
        assert_eq!(
            conv("NaN", oid::NUMERIC, -1, DecimalMode::Double),
            json!("NaN")
        );
    }

    #[test]
    fn numeric_precise_mode_matches_debezium_examples() {
        // Debezium docs: 22.22 in a NUMERIC(4,2)-like column is "CK4=" (0x08AE = 2222).
        let fixed = numeric_typmod(4, 2);
        assert_eq!(
            conv("22.22", oid::NUMERIC, fixed, DecimalMode::Precise),
            json!("CK4=")
        );
        // Variable scale: {"scale":2,"value":...}.
        assert_eq!(
            conv("22.22", oid::NUMERIC, -1, DecimalMode::Precise),
            json!({"scale": 2, "value": "CK4="})
        );
        // 1.56 -> 156 = 0x009C (leading zero byte keeps it positive).
        assert_eq!(
            conv("1.56", oid::NUMERIC, -1, DecimalMode::Precise),
            json!({"scale": 2, "value": "AJw="})
        );
        // Fixed scale pads: 5 in numeric(5,2) -> 500 = 0x01F4.
        assert_eq!(
            conv(
                "5",
                oid::NUMERIC,
                numeric_typmod(5, 2),
                DecimalMode::Precise
            ),
            json!("AfQ=")
        );
        // Zero is one 0x00 byte.
        assert_eq!(
            conv("0.00", oid::NUMERIC, fixed, DecimalMode::Precise),
            json!("AA==")
        );
    }

    #[test]
    fn numeric_negative_scale_is_read_from_the_typmod() {
        // numeric(5,-2) rounds to hundreds (PostgreSQL 15+); its typmod keeps
        // the scale in 11 signed bits: 329730 on PostgreSQL 15.
        let typmod = numeric_typmod(5, -2 & 0x7ff);
        assert_eq!(typmod, 329_730);
        // 12300 = 123 * 10^2: the unscaled value is 123 = 0x7B.
        assert_eq!(
            conv("12300", oid::NUMERIC, typmod, DecimalMode::Precise),
            json!("ew==")
        );
        assert_eq!(
            conv("-12300", oid::NUMERIC, typmod, DecimalMode::Precise),
            json!("hQ==")
        );
        assert_eq!(
            conv("0", oid::NUMERIC, typmod, DecimalMode::Precise),
            json!("AA==")
        );
        // Exact text is unaffected by the scale.
        assert_eq!(
            conv("12300", oid::NUMERIC, typmod, DecimalMode::String),
            json!("12300")
        );
        // Digits below the scale cannot be represented.
        let mut out = Vec::new();
        assert!(
            write_text(
                &mut out,
                "12345",
                oid::NUMERIC,
                typmod,
                DecimalMode::Precise
            )
            .is_err()
        );
    }

    #[test]
    fn twos_complement_matches_java_biginteger() {
        let d = |s: &str| s.bytes().map(|b| b - b'0').collect::<Vec<_>>();
        assert_eq!(twos_complement(false, &d("0")), vec![0x00]);
        assert_eq!(twos_complement(false, &d("127")), vec![0x7F]);
        assert_eq!(twos_complement(false, &d("128")), vec![0x00, 0x80]);
        assert_eq!(twos_complement(true, &d("1")), vec![0xFF]);
        assert_eq!(twos_complement(true, &d("128")), vec![0x80]);
        assert_eq!(twos_complement(true, &d("129")), vec![0xFF, 0x7F]);
        assert_eq!(twos_complement(true, &d("256")), vec![0xFF, 0x00]);
        assert_eq!(twos_complement(false, &d("65536")), vec![0x01, 0x00, 0x00]);
        assert_eq!(
            twos_complement(false, &d("18446744073709551616")),
            vec![0x01, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn money_is_a_decimal() {
        assert_eq!(s("$1,234.56", oid::MONEY), json!("1234.56"));
        assert_eq!(s("-$0.50", oid::MONEY), json!("-0.50"));
    }

    #[test]
    fn strings_and_opaque_types() {
        assert_eq!(s("héllo \"q\"\n", oid::TEXT), json!("héllo \"q\"\n"));
        assert_eq!(s("a\u{1}b", oid::VARCHAR), json!("a\u{1}b"));
        assert_eq!(s("ab  ", oid::BPCHAR), json!("ab  "));
        assert_eq!(
            s("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", oid::UUID),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        // An enum (custom OID) is its label.
        assert_eq!(s("completed", 16_390), json!("completed"));
        assert_eq!(s("192.168.0.1/32", 869), json!("192.168.0.1/32"));
    }

    #[test]
    fn json_documents_are_strings() {
        assert_eq!(s("{\"a\": 1}", oid::JSONB), json!("{\"a\": 1}"));
        assert_eq!(s("[1, 2]", oid::JSON), json!("[1, 2]"));
    }

    #[test]
    fn bytea_is_base64() {
        assert_eq!(s("\\x0102", oid::BYTEA), json!("AQI="));
        assert_eq!(s("\\x", oid::BYTEA), json!(""));
        assert_eq!(s("\\xDEADbeef", oid::BYTEA), json!("3q2+7w=="));
        fails("\\x0", oid::BYTEA);
        fails("abc", oid::BYTEA);
    }

    #[test]
    fn timestamptz_is_iso_utc() {
        assert_eq!(
            s("2016-11-04 11:51:30.123456+00", oid::TIMESTAMPTZ),
            json!("2016-11-04T11:51:30.123456Z")
        );
        assert_eq!(
            s("2016-11-04 11:51:30+00", oid::TIMESTAMPTZ),
            json!("2016-11-04T11:51:30.000000Z")
        );
        assert_eq!(
            s("2016-11-04 11:51:30.5+00", oid::TIMESTAMPTZ),
            json!("2016-11-04T11:51:30.500000Z")
        );
        // Other offsets are converted to UTC, across a day boundary.
        assert_eq!(
            s("2016-11-04 01:51:30.123456+05:30", oid::TIMESTAMPTZ),
            json!("2016-11-03T20:21:30.123456Z")
        );
        assert_eq!(
            s("2016-12-31 23:00:00-08", oid::TIMESTAMPTZ),
            json!("2017-01-01T07:00:00.000000Z")
        );
        assert_eq!(
            s("1900-01-01 00:00:00+00:19:32", oid::TIMESTAMPTZ),
            json!("1899-12-31T23:40:28.000000Z")
        );
        assert_eq!(s("infinity", oid::TIMESTAMPTZ), json!("infinity"));
        assert_eq!(s("-infinity", oid::TIMESTAMPTZ), json!("-infinity"));
        assert_eq!(
            s("10000-01-01 00:00:00+00", oid::TIMESTAMPTZ),
            json!("+10000-01-01T00:00:00.000000Z")
        );
        // Exactly the column's precision in digits, as Debezium writes them.
        assert_eq!(
            conv(
                "2016-11-04 11:51:30.5+00",
                oid::TIMESTAMPTZ,
                3,
                DecimalMode::String
            ),
            json!("2016-11-04T11:51:30.500Z")
        );
        assert_eq!(
            conv(
                "2016-11-04 11:51:30+00",
                oid::TIMESTAMPTZ,
                0,
                DecimalMode::String
            ),
            json!("2016-11-04T11:51:30Z")
        );
        fails("2016-11-04 11:51:30", oid::TIMESTAMPTZ);
        fails("2016-13-04 11:51:30+00", oid::TIMESTAMPTZ);
    }

    #[test]
    fn timestamp_is_micros_since_epoch() {
        assert_eq!(s("1970-01-01 00:00:00", oid::TIMESTAMP), json!(0));
        assert_eq!(
            s("2016-11-04 11:51:30.123456", oid::TIMESTAMP),
            json!(1_478_260_290_123_456i64)
        );
        assert_eq!(s("1969-12-31 23:59:59.999999", oid::TIMESTAMP), json!(-1));
        assert_eq!(
            s("0001-01-01 00:00:00 BC", oid::TIMESTAMP),
            json!(-62_167_219_200_000_000i64)
        );
        assert_eq!(s("infinity", oid::TIMESTAMP), json!(i64::MAX));
        assert_eq!(s("-infinity", oid::TIMESTAMP), json!(i64::MIN));
    }

    #[test]
    fn date_is_days_since_epoch() {
        // Debezium docs: 2016-11-04 -> 17109.
        assert_eq!(s("2016-11-04", oid::DATE), json!(17109));
        assert_eq!(s("1970-01-01", oid::DATE), json!(0));
        assert_eq!(s("1969-12-31", oid::DATE), json!(-1));
        assert_eq!(s("2000-02-29", oid::DATE), json!(11016));
        assert_eq!(s("infinity", oid::DATE), json!(i32::MAX));
        assert_eq!(s("-infinity", oid::DATE), json!(i32::MIN));
        fails("2016-11-4", oid::DATE);
    }

    fn jiff_days(date: jiff::civil::Date) -> i64 {
        date.duration_since(EPOCH).as_secs() / 86_400
    }

    #[test]
    fn dates_beyond_jiff_match_postgres_and_java() {
        // PostgreSQL's own bounds (its first date is Julian day 0, 4714-11-24
        // BC in the proleptic Gregorian calendar, astronomical year -4713;
        // its last is the day before Julian day 2147483494, 5874898-01-01),
        // as Java's LocalDate.toEpochDay gives them: Julian day - 2440588.
        assert_eq!(days_from_civil(-4713, 11, 24), Some(-2_440_588));
        assert_eq!(
            days_from_civil(5_874_898, 1, 1),
            Some(2_147_483_494 - 2_440_588)
        );
        assert_eq!(s("4714-11-24 BC", oid::DATE), json!(-2_440_588));
        assert_eq!(
            s("5874897-12-31", oid::DATE),
            json!(2_147_483_493 - 2_440_588)
        );
        assert_eq!(
            civil_from_days(2_147_483_493 - 2_440_588),
            (5_874_897, 12, 31)
        );
        // The last timestamp PostgreSQL accepts.
        assert_eq!(
            s("294276-12-31 23:59:59.999999+00", oid::TIMESTAMPTZ),
            json!("+294276-12-31T23:59:59.999999Z")
        );
        assert_eq!(
            s("294247-01-10 04:00:54.775807", oid::TIMESTAMP),
            json!(i64::MAX)
        );
        // Later ones do not fit MicroTimestamp's 64 bits: an error, never a
        // wrapped number.
        fails("294247-01-10 04:00:54.775808", oid::TIMESTAMP);
        // A leap day four cycles out, and a century year that is not leap.
        assert_eq!(
            civil_from_days(days_from_civil(11_600, 2, 29).unwrap_or(0)),
            (11_600, 2, 29)
        );
        assert_eq!(days_from_civil(11_700, 2, 29), None);
        assert_eq!(days_from_civil(2026, 2, 30), None);
        assert_eq!(days_from_civil(i64::MIN, 1, 1), None);
        fails("99999999999999999999-01-01", oid::DATE);
        fails("9999999999999999-01-01 00:00:00", oid::TIMESTAMP);
    }

    proptest::proptest! {
        /// Over jiff's whole range the cycle-shifted conversion is jiff's own.
        #[test]
        fn civil_days_equal_jiff_over_its_range(
            year in -9999i16..=9999,
            month in 1i8..=12,
            day in 1i8..=31,
        ) {
            let expected = jiff::civil::Date::new(year, month, day).ok().map(jiff_days);
            let got = days_from_civil(year.into(), month.unsigned_abs().into(), day.unsigned_abs().into());
            proptest::prop_assert_eq!(got, expected);
            if let Some(days) = expected {
                let date = (i64::from(year), month.unsigned_abs().into(), day.unsigned_abs().into());
                proptest::prop_assert_eq!(civil_from_days(days), date);
            }
        }

        /// Beyond it, every day count round-trips and whole cycles shift
        /// the year by 400 and nothing else.
        #[test]
        fn civil_days_round_trip_over_postgres_range(days in -2_500_000i64..2_200_000_000) {
            let (year, month, day) = civil_from_days(days);
            proptest::prop_assert_eq!(days_from_civil(year, month, day), Some(days));
            let back = civil_from_days(days.rem_euclid(CYCLE_DAYS) + 3 * CYCLE_DAYS);
            proptest::prop_assert_eq!((back.1, back.2), (month, day));
        }
    }

    #[test]
    fn times() {
        assert_eq!(s("11:51:30.123456", oid::TIME), json!(42_690_123_456i64));
        assert_eq!(s("00:00:00", oid::TIME), json!(0));
        assert_eq!(s("24:00:00", oid::TIME), json!(86_400_000_000i64));
        assert_eq!(s("11:51:30.5+02", oid::TIMETZ), json!("09:51:30.5Z"));
        assert_eq!(s("01:00:00-03:30", oid::TIMETZ), json!("04:30:00Z"));
        assert_eq!(s("01:00:00+03", oid::TIMETZ), json!("22:00:00Z"));
        fails("1:00:00", oid::TIME);
    }

    #[test]
    fn intervals_are_iso_durations() {
        assert_eq!(
            s("1 year 2 mons 3 days 04:05:06.78", oid::INTERVAL),
            json!("P1Y2M3DT4H5M6.78S")
        );
        assert_eq!(s("00:00:01", oid::INTERVAL), json!("P0Y0M0DT0H0M1S"));
        assert_eq!(
            s("-1 days +02:03:00", oid::INTERVAL),
            json!("P0Y0M-1DT2H3M0S")
        );
        assert_eq!(s("-00:00:01.5", oid::INTERVAL), json!("P0Y0M0DT0H0M-1.5S"));
        assert_eq!(s("3 mons", oid::INTERVAL), json!("P0Y3M0DT0H0M0S"));
        assert_eq!(s("100:00:00", oid::INTERVAL), json!("P0Y0M0DT100H0M0S"));
        fails("1 fortnight", oid::INTERVAL);
    }

    #[test]
    fn arrays_convert_each_element() {
        assert_eq!(s("{1,2,NULL,4}", 1007), json!([1, 2, null, 4]));
        assert_eq!(s("{}", 1009), json!([]));
        assert_eq!(
            s(r#"{a,b,"c d",NULL,"NULL","x\"y\\z",""}"#, 1009),
            json!(["a", "b", "c d", null, "NULL", "x\"y\\z", ""])
        );
        assert_eq!(s("{{1,2},{3,4}}", 1007), json!([[1, 2], [3, 4]]));
        assert_eq!(s("[0:1]={7,8}", 1016), json!([7, 8]));
        assert_eq!(s("{t,f}", 1000), json!([true, false]));
        assert_eq!(s("{1.50,NaN}", 1231), json!(["1.50", "NAN"]));
        assert_eq!(
            s(r#"{"2016-11-04 11:51:30+00"}"#, 1185),
            json!(["2016-11-04T11:51:30.000000Z"])
        );
        assert_eq!(s("{2016-11-04}", 1182), json!([17109]));
        assert_eq!(s(r#"{"{\"a\": 1}"}"#, 3807), json!(["{\"a\": 1}"]));
        assert_eq!(s(r#"{"\\x0102"}"#, 1001), json!(["AQI="]));
        assert_eq!(s("{é,ü}", 1009), json!(["é", "ü"]));
        fails("{1,2", 1007);
        fails("{1,x}", 1007);
        fails("1,2}", 1007);
        fails(r#"{"a}"#, 1009);
    }

    #[test]
    fn integers_and_escapes_are_written_directly() {
        let int = |v: i64| {
            let mut out = Vec::new();
            write_i64(&mut out, v);
            String::from_utf8(out).unwrap_or_default()
        };
        assert_eq!(int(0), "0");
        assert_eq!(int(-5), "-5");
        assert_eq!(int(i64::MAX), "9223372036854775807");
        assert_eq!(int(i64::MIN), i64::MIN.to_string());
        let mut out = Vec::new();
        write_u64(&mut out, u64::MAX);
        assert_eq!(
            String::from_utf8(out).unwrap_or_default(),
            u64::MAX.to_string()
        );
        let mut out = Vec::new();
        write_str(&mut out, "a\"b\\c\u{7}\u{1f}é\t");
        assert_eq!(
            String::from_utf8(out).unwrap_or_default(),
            r#""a\"b\\c\u0007\u001fé\t""#
        );
    }

    #[test]
    fn null_and_unchanged_toast() {
        let column = Column {
            name: "c".into(),
            type_oid: oid::TEXT,
            type_modifier: -1,
            is_key: false,
        };
        assert_eq!(
            to_json(&Datum::Null, &column, DecimalMode::String),
            Ok(json!(null))
        );
        assert_eq!(
            to_json(&Datum::UnchangedToast, &column, DecimalMode::String),
            Ok(json!("__debezium_unavailable_value"))
        );
        let invalid = Datum::Text(Bytes::from_static(b"\xff"));
        assert!(to_json(&invalid, &column, DecimalMode::String).is_err());
    }
}
