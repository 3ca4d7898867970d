//! Go `time.ParseDuration` syntax, which Cocos clients use for TTLs and the
//! original manager for its timeouts: `90s`, `1h30m0s`, `1.5h`, `300ms`.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("invalid duration {0:?}: expected a number followed by a unit (ns, us, ms, s, m, h), e.g. 90s or 1h30m")]
    Invalid(String),
    #[error("negative duration {0:?} is not allowed")]
    Negative(String),
    #[error("duration {0:?} is too large")]
    Overflow(String),
}

const UNITS: &[(&str, u128)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// Parses a Go duration. Negative durations are refused: nothing in the
/// manager has a meaning for them.
pub fn parse_go_duration(text: &str) -> Result<Duration, DurationError> {
    let invalid = || DurationError::Invalid(text.to_string());
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
    let mut total_ns: u128 = 0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = &rest[..num_len];
        rest = &rest[num_len..];
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(invalid());
        }
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let scale = UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, scale)| *scale)
            .ok_or_else(invalid)?;
        let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
        let int_value: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| invalid())?
        };
        let mut value = int_value
            .checked_mul(scale)
            .ok_or_else(|| DurationError::Overflow(text.to_string()))?;
        // Fractions are exact to the nanosecond, as in Go.
        let mut frac_scale = scale;
        for digit in frac_part.chars().take(30) {
            frac_scale /= 10;
            let d = u128::from(digit.to_digit(10).ok_or_else(invalid)?);
            value += d * frac_scale;
        }
        total_ns = total_ns
            .checked_add(value)
            .ok_or_else(|| DurationError::Overflow(text.to_string()))?;
    }
    // Go durations are int64 nanoseconds.
    if total_ns > i64::MAX as u128 {
        return Err(DurationError::Overflow(text.to_string()));
    }
    let secs = (total_ns / 1_000_000_000) as u64;
    let nanos = (total_ns % 1_000_000_000) as u32;
    Ok(Duration::new(secs, nanos))
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

#[cfg(test)]
mod tests {
    use super::*;

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
            "", "5", "s", "1x", "1.2.3s", "abc", "1h 30m", "h1", "1..s", ".",
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
