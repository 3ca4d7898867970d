//! Go `time.ParseDuration` syntax, which Cocos clients use for TTLs and the
//! original manager for its timeouts: `90s`, `1h30m0s`, `1.5h`, `300ms`;
//! and the calendar date of a Unix day, for the UTC times tools print.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("invalid duration {0:?}: expected a number followed by a unit (ns, us, ms, s, m, h), e.g. 90s or 1h30m")]
    Invalid(String),
    #[error("negative duration {0:?} is not allowed")]
    Negative(String),
    #[error("duration {0:?} is too large: the longest is 2562047h47m16.854775807s")]
    Overflow(String),
}

const UNITS: &[(&str, u64)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("\u{b5}s", 1_000),
    ("\u{3bc}s", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// The longest duration Go can represent (an `int64` of nanoseconds,
/// `2562047h47m16.854775807s`); anything longer is refused as an overflow.
pub const MAX_GO_DURATION: Duration = Duration::from_nanos(i64::MAX as u64);

/// Parses a Go duration. Negative durations are refused: nothing in the
/// manager has a meaning for them.
///
/// Every step is checked integer arithmetic on nanoseconds: a value beyond
/// [`MAX_GO_DURATION`] is [`DurationError::Overflow`], never a wrapped or
/// rounded number, and no input panics. Fractions are exact: `1.1h` is
/// `1h6m0s`, and digits below a nanosecond are truncated, as in Go.
pub fn parse_go_duration(text: &str) -> Result<Duration, DurationError> {
    let invalid = || DurationError::Invalid(text.to_string());
    let overflow = || DurationError::Overflow(text.to_string());
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut rest = text;
    if let Some(r) = rest.strip_prefix('+') {
        rest = r;
    } else if rest.starts_with('-') {
        return Err(DurationError::Negative(text.to_string()));
    }
    // Go accepts a bare "0" without a unit.
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(invalid());
    }
    let digits_len = |s: &str| s.bytes().take_while(u8::is_ascii_digit).count();
    let max_ns = i64::MAX as u64;
    let mut total_ns: u64 = 0;
    while !rest.is_empty() {
        let (int_digits, after_int) = rest.split_at(digits_len(rest));
        let (frac_digits, after_number) = match after_int.strip_prefix('.') {
            Some(r) => r.split_at(digits_len(r)),
            None => ("", after_int),
        };
        // "." alone, ".s" or a unit without a number.
        if int_digits.is_empty() && frac_digits.is_empty() {
            return Err(invalid());
        }
        let unit_len = after_number
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after_number.len());
        let (unit, after_unit) = after_number.split_at(unit_len);
        rest = after_unit;
        let scale = UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, scale)| *scale)
            .ok_or_else(invalid)?;
        let mut whole: u64 = 0;
        for digit in int_digits.bytes() {
            whole = whole
                .checked_mul(10)
                .and_then(|w| w.checked_add(u64::from(digit - b'0')))
                .ok_or_else(overflow)?;
        }
        let whole_ns = whole.checked_mul(scale).ok_or_else(overflow)?;
        // floor(0.d1d2…dn × scale), exactly: Horner's rule from the last
        // digit, where floor((d × scale + floor(y)) / 10) = floor((d × scale
        // + y) / 10). The accumulator stays below `scale`, so 9 × scale plus
        // it fits easily in a u64.
        let mut frac_ns: u64 = 0;
        for digit in frac_digits.bytes().rev() {
            frac_ns = (u64::from(digit - b'0') * scale + frac_ns) / 10;
        }
        total_ns = whole_ns
            .checked_add(frac_ns)
            .and_then(|v| total_ns.checked_add(v))
            .filter(|&t| t <= max_ns)
            .ok_or_else(overflow)?;
    }
    Ok(Duration::from_nanos(total_ns))
}

/// Formats a duration the way Go prints one (`1h30m0s`, `300ms`), for logs
/// and for configuration echoes that operators compare with the original.
pub fn format_go_duration(d: Duration) -> String {
    let total_ns = d.as_nanos();
    if total_ns == 0 {
        return "0s".to_string();
    }
    if total_ns < 1_000_000_000 {
        return if total_ns % 1_000_000 == 0 {
            format!("{}ms", total_ns / 1_000_000)
        } else if total_ns % 1_000 == 0 {
            format!("{}µs", total_ns / 1_000)
        } else {
            format!("{total_ns}ns")
        };
    }
    let hours = total_ns / 3_600_000_000_000;
    let minutes = (total_ns / 60_000_000_000) % 60;
    let secs_ns = total_ns % 60_000_000_000;
    let secs = secs_ns / 1_000_000_000;
    let frac = secs_ns % 1_000_000_000;
    let mut out = String::new();
    if hours > 0 {
        out.push_str(&format!("{hours}h"));
    }
    if hours > 0 || minutes > 0 {
        out.push_str(&format!("{minutes}m"));
    }
    if frac == 0 {
        out.push_str(&format!("{secs}s"));
    } else {
        let frac_text = format!("{frac:09}");
        out.push_str(&format!("{secs}.{}s", frac_text.trim_end_matches('0')));
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (H. Hinnant's `civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_of_unix_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_088), (2024, 12, 31));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn parses_go_examples() {
        assert_eq!(parse_go_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1h30m0s"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("300ms"), Ok(ms(300)));
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_go_duration("2h45m"), Ok(Duration::from_secs(9900)));
        assert_eq!(parse_go_duration("1.25s"), Ok(ms(1250)));
        assert_eq!(parse_go_duration(".5s"), Ok(ms(500)));
        assert_eq!(parse_go_duration("10us"), Ok(Duration::from_micros(10)));
        assert_eq!(parse_go_duration("10µs"), Ok(Duration::from_micros(10)));
        assert_eq!(parse_go_duration("7ns"), Ok(Duration::from_nanos(7)));
        assert_eq!(parse_go_duration("+5m"), Ok(Duration::from_secs(300)));
    }

    #[test]
    fn refuses_bad_input() {
        for bad in [
            "", "5", "s", "1x", "1.2.3s", "abc", "1h 30m", "h1", "1..s", ".", ".s", "+", "1h-1m",
            "1s ", " 1s", "1e3s", "\u{663}s", "1\u{0}s", "1ss",
        ] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(matches!(
            parse_go_duration("-1s"),
            Err(DurationError::Negative(_))
        ));
        assert!(matches!(
            parse_go_duration("9999999999h"),
            Err(DurationError::Overflow(_))
        ));
    }

    fn overflows(text: &str) -> bool {
        matches!(parse_go_duration(text), Err(DurationError::Overflow(_)))
    }

    #[test]
    fn refuses_overflow_without_wrapping() {
        // The TTL of issue 8: its integer part times 3.6e12 is just below
        // u128::MAX, and an unchecked fraction used to wrap it to ~36 minutes.
        assert!(overflows("94522879700260684295381835.999999999999h"));
        assert!(overflows("94522879700260684295381836h"));
        // Integer part beyond u64, beyond u128, very long.
        assert!(overflows("18446744073709551616ns"));
        assert!(overflows("340282366920938463463374607431768211456ns"));
        assert!(overflows(&format!("{}s", "9".repeat(5000))));
        // Each term fits, the sum does not.
        assert!(overflows("2562047h2562047h"));
        assert!(overflows("9223372036854775807ns1ns"));
        // A fraction that carries the sum over the limit.
        assert!(overflows("2562047h47m16.854775808s"));
        assert!(overflows("2562047.9999999999h"));
        assert!(overflows("2562048h"));
        assert!(matches!(
            parse_go_duration("106751.99116730063d"),
            Err(DurationError::Invalid(_))
        ));
    }

    #[test]
    fn boundaries_are_exact() {
        assert_eq!(
            parse_go_duration("9223372036854775807ns"),
            Ok(MAX_GO_DURATION)
        );
        assert_eq!(
            parse_go_duration("2562047h47m16.854775807s"),
            Ok(MAX_GO_DURATION)
        );
        assert_eq!(
            parse_go_duration("2562047h47m16.8547758079999999s"),
            Ok(MAX_GO_DURATION),
            "digits below a nanosecond are truncated"
        );
        assert_eq!(
            parse_go_duration("0000000000000000000000000000001s"),
            Ok(Duration::from_secs(1)),
            "leading zeros are not an overflow"
        );
        assert_eq!(
            format_go_duration(MAX_GO_DURATION),
            "2562047h47m16.854775807s"
        );
    }

    #[test]
    fn fractions_are_exact() {
        // 0.1h is 360s exactly; a float would give 359.99999…s.
        assert_eq!(parse_go_duration("1.1h"), Ok(Duration::from_secs(3960)));
        assert_eq!(parse_go_duration("0.1m"), Ok(Duration::from_secs(6)));
        assert_eq!(
            parse_go_duration("0.333333333333h"),
            Ok(Duration::from_nanos(1_199_999_999_998)),
            "truncated, not rounded"
        );
        assert_eq!(parse_go_duration("1.5ns"), Ok(Duration::from_nanos(1)));
        assert_eq!(parse_go_duration("0.9999999999ns"), Ok(Duration::ZERO));
        assert_eq!(parse_go_duration("1.s"), Ok(Duration::from_secs(1)));
        assert_eq!(
            parse_go_duration(&format!("0.{}1s", "0".repeat(4000))),
            Ok(Duration::ZERO),
            "a very long fraction is fine"
        );
        assert_eq!(
            parse_go_duration(&format!("0.{}h", "9".repeat(60))),
            Ok(Duration::from_nanos(3_599_999_999_999))
        );
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(format_go_duration(Duration::from_secs(5400)), "1h30m0s");
        assert_eq!(format_go_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_go_duration(ms(300)), "300ms");
        assert_eq!(format_go_duration(ms(1500)), "1.5s");
        assert_eq!(format_go_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn round_trips() {
        for text in ["1h30m0s", "300ms", "1m30s", "2.5s", "45s"] {
            let d = parse_go_duration(text).expect("valid");
            assert_eq!(format_go_duration(d), text);
        }
    }
}
