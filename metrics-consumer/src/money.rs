//! Money as integer cents, parsed exactly from every form Debezium writes a
//! `numeric` in: `string` mode (`"12.50"`), `precise` mode (base64 of the
//! unscaled big-endian two's-complement integer, bare with the column's known
//! scale or as `{"scale":s,"value":"<base64>"}`) and `double` mode (a JSON
//! number). Floats never take part in the arithmetic: a `double` is turned
//! back into its shortest decimal text first.
//!
//! Values with more than two decimals are rounded half away from zero, as
//! PostgreSQL's `::bigint` cast of `numeric` does.

use base64::Engine as _;

/// Scale of the `numeric(12,2)` columns the metrics read.
pub const KNOWN_SCALE: u32 = 2;

/// Why a value is not an amount of money.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoneyError {
    /// Not a decimal number (e.g. `"NAN"` or garbage).
    NotDecimal,
    /// Larger than an i64 of cents holds.
    Overflow,
}

/// Parses a decimal string (`"-12.5"`, `"3"`, `"0.125"`) into cents.
pub fn cents_from_decimal(text: &str) -> Result<i64, MoneyError> {
    let text = text.trim();
    let (negative, digits) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
    if (int_part.is_empty() && frac_part.is_empty())
        || !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(MoneyError::NotDecimal);
    }
    let mut cents: i64 = 0;
    for b in int_part.bytes() {
        cents = cents
            .checked_mul(10)
            .and_then(|c| c.checked_add(i64::from(b - b'0')))
            .ok_or(MoneyError::Overflow)?;
    }
    let frac = frac_part.as_bytes();
    for i in 0..2 {
        let digit = frac.get(i).map_or(0, |b| i64::from(b - b'0'));
        cents = cents
            .checked_mul(10)
            .and_then(|c| c.checked_add(digit))
            .ok_or(MoneyError::Overflow)?;
    }
    if frac.get(2).is_some_and(|b| *b >= b'5') {
        cents = cents.checked_add(1).ok_or(MoneyError::Overflow)?;
    }
    Ok(if negative { -cents } else { cents })
}

/// Parses Debezium `precise` mode: base64 of the unscaled value with `scale`.
pub fn cents_from_base64(encoded: &str, scale: u32) -> Result<i64, MoneyError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| MoneyError::NotDecimal)?;
    if bytes.is_empty() {
        return Err(MoneyError::NotDecimal);
    }
    if bytes.len() > 16 {
        return Err(MoneyError::Overflow);
    }
    // Sign-extend the big-endian two's-complement integer into an i128.
    let mut unscaled: i128 = if bytes[0] & 0x80 != 0 { -1 } else { 0 };
    for b in &bytes {
        unscaled = (unscaled << 8) | i128::from(*b);
    }
    let cents = rescale(unscaled, scale)?;
    i64::try_from(cents).map_err(|_| MoneyError::Overflow)
}

fn rescale(unscaled: i128, scale: u32) -> Result<i128, MoneyError> {
    if scale <= KNOWN_SCALE {
        let factor = 10_i128
            .checked_pow(KNOWN_SCALE - scale)
            .ok_or(MoneyError::Overflow)?;
        return unscaled.checked_mul(factor).ok_or(MoneyError::Overflow);
    }
    let divisor = 10_i128
        .checked_pow(scale - KNOWN_SCALE)
        .ok_or(MoneyError::Overflow)?;
    let quotient = unscaled / divisor;
    let remainder = (unscaled % divisor).abs();
    let round = if remainder * 2 >= divisor { 1 } else { 0 };
    Ok(if unscaled < 0 {
        quotient - round
    } else {
        quotient + round
    })
}

/// Parses Debezium `double` mode: the shortest decimal text of the f64.
pub fn cents_from_f64(value: f64) -> Result<i64, MoneyError> {
    if !value.is_finite() {
        return Err(MoneyError::NotDecimal);
    }
    cents_from_decimal(&format!("{value}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_strings() {
        assert_eq!(cents_from_decimal("12.50"), Ok(1250));
        assert_eq!(cents_from_decimal("12.5"), Ok(1250));
        assert_eq!(cents_from_decimal("0.01"), Ok(1));
        assert_eq!(cents_from_decimal("7"), Ok(700));
        assert_eq!(cents_from_decimal("-3.10"), Ok(-310));
        assert_eq!(cents_from_decimal("9999999999.99"), Ok(999_999_999_999));
        assert_eq!(cents_from_decimal("0.125"), Ok(13));
        assert_eq!(cents_from_decimal("0.124"), Ok(12));
        assert_eq!(cents_from_decimal("NAN"), Err(MoneyError::NotDecimal));
        assert_eq!(cents_from_decimal(""), Err(MoneyError::NotDecimal));
        assert_eq!(cents_from_decimal("."), Err(MoneyError::NotDecimal));
        assert_eq!(cents_from_decimal("1e5"), Err(MoneyError::NotDecimal));
        assert_eq!(
            cents_from_decimal("99999999999999999999"),
            Err(MoneyError::Overflow)
        );
    }

    #[test]
    fn precise_base64() {
        // 22.22 -> unscaled 2222 = 0x08AE -> "CK4=" (Debezium's documented example).
        assert_eq!(cents_from_base64("CK4=", 2), Ok(2222));
        // 1.56 -> 156 = 0x009C -> "AJw=".
        assert_eq!(cents_from_base64("AJw=", 2), Ok(156));
        // -1 cent: 0xFF.
        assert_eq!(cents_from_base64("/w==", 2), Ok(-1));
        // scale 0: 5 -> 500 cents; scale 3: 1234 -> 1.234 -> 123 cents.
        assert_eq!(cents_from_base64("BQ==", 0), Ok(500));
        assert_eq!(cents_from_base64("BNI=", 3), Ok(123));
        assert_eq!(
            cents_from_base64("not base64!", 2),
            Err(MoneyError::NotDecimal)
        );
    }

    #[test]
    fn doubles() {
        assert_eq!(cents_from_f64(12.5), Ok(1250));
        assert_eq!(cents_from_f64(0.1 + 0.2), Ok(30));
        assert_eq!(cents_from_f64(19.99), Ok(1999));
        assert_eq!(cents_from_f64(f64::NAN), Err(MoneyError::NotDecimal));
    }
}
