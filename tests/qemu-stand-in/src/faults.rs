//! Fault injection, read from `STAND_IN_*` environment variables (the
//! manager passes its own environment to QEMU, so tests set them on the
//! manager). An empty variable counts as unset.

use std::time::Duration;

/// How an injected crash ends the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashSignal {
    /// `abort()`: SIGABRT, as a failed assertion in QEMU (no core file).
    Abort,
    /// SIGKILL sent to itself.
    Kill,
    /// SIGSEGV sent to itself, as a QEMU segfault (no core file).
    Segv,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Faults {
    pub fail_at_start: Option<String>,
    pub crash_after: Option<Duration>,
    pub crash_probability: f64,
    pub crash_signal: CrashSignal,
    pub panic_after: Option<Duration>,
    pub ignore_powerdown: bool,
    pub powerdown_delay: Duration,
    pub start_delay: Duration,
    pub ignore_sigterm: bool,
    /// Console bytes per second once a console client is connected.
    pub console_spam: u64,
    /// Leave one short-lived orphan at start (a grandchild whose parent
    /// exits, so it is re-parented to the manager, a child subreaper).
    pub orphan: bool,
}

impl Default for Faults {
    fn default() -> Faults {
        Faults {
            fail_at_start: None,
            crash_after: None,
            crash_probability: 1.0,
            crash_signal: CrashSignal::Abort,
            panic_after: None,
            ignore_powerdown: false,
            powerdown_delay: Duration::from_millis(50),
            start_delay: Duration::ZERO,
            ignore_sigterm: false,
            console_spam: 0,
            orphan: false,
        }
    }
}

/// The variables, for `--help`.
pub const HELP: &str = "\
  STAND_IN_FAIL_AT_START=MSG      print 'qemu-system-x86_64: MSG' to stderr and exit 1
                                  before binding anything
  STAND_IN_CRASH_AFTER=DUR        die abnormally DUR after start (no SHUTDOWN event)
  STAND_IN_CRASH_PROBABILITY=P    only this fraction (0..1) of instances crash (default 1)
  STAND_IN_CRASH_SIGNAL=SIG       ABRT (default: abort(), no core file), KILL or SEGV
  STAND_IN_PANIC_AFTER=DUR        DUR after start emit GUEST_PANICKED and pause the VM
  STAND_IN_IGNORE_POWERDOWN=1     system_powerdown is accepted but the guest ignores it
  STAND_IN_POWERDOWN_DELAY=DUR    how long the guest takes to power off (default 50ms)
  STAND_IN_START_DELAY=DUR        sleep DUR before binding the port and the sockets
  STAND_IN_IGNORE_SIGTERM=1       ignore SIGTERM (only SIGKILL ends it)
  STAND_IN_CONSOLE_SPAM=BYTES     write that many console bytes per second
  STAND_IN_ORPHAN=1               at start, leave one orphan that exits 200ms later (a
                                  grandchild re-parented to the manager, which reaps it)
DUR is a Go-style duration (500ms, 2s, 1m30s) or a number of seconds.
";

impl Faults {
    pub fn from_env() -> Result<Faults, String> {
        Faults::from_lookup(|name| match std::env::var_os(name) {
            None => Ok(None),
            Some(value) => value
                .into_string()
                .map(|v| Some(v).filter(|v| !v.is_empty()))
                .map_err(|_| format!("qemu-stand-in: {name} is not UTF-8")),
        })
    }

    pub fn from_lookup(
        get: impl Fn(&str) -> Result<Option<String>, String>,
    ) -> Result<Faults, String> {
        let mut f = Faults::default();
        let bad =
            |name: &str, value: &str, why: &str| format!("qemu-stand-in: {name}={value:?}: {why}");
        let duration = |name: &str| -> Result<Option<Duration>, String> {
            match get(name)? {
                None => Ok(None),
                Some(v) => parse_duration(&v)
                    .map(Some)
                    .ok_or_else(|| bad(name, &v, "expected a duration such as 500ms or 2s")),
            }
        };
        let flag = |name: &str| -> Result<bool, String> {
            match get(name)?.as_deref() {
                None | Some("0" | "false" | "no" | "off") => Ok(false),
                Some("1" | "true" | "yes" | "on") => Ok(true),
                Some(v) => Err(bad(name, v, "expected 1 or 0")),
            }
        };
        f.fail_at_start = get("STAND_IN_FAIL_AT_START")?;
        f.crash_after = duration("STAND_IN_CRASH_AFTER")?;
        if let Some(v) = get("STAND_IN_CRASH_PROBABILITY")? {
            f.crash_probability = match v.parse::<f64>() {
                Ok(p) if (0.0..=1.0).contains(&p) => p,
                _ => return Err(bad("STAND_IN_CRASH_PROBABILITY", &v, "expected 0..1")),
            };
        }
        if let Some(v) = get("STAND_IN_CRASH_SIGNAL")? {
            let name = v.to_ascii_uppercase();
            f.crash_signal = match name.strip_prefix("SIG").unwrap_or(&name) {
                "ABRT" | "ABORT" => CrashSignal::Abort,
                "KILL" => CrashSignal::Kill,
                "SEGV" => CrashSignal::Segv,
                _ => {
                    return Err(bad(
                        "STAND_IN_CRASH_SIGNAL",
                        &v,
                        "expected ABRT, KILL or SEGV",
                    ))
                }
            };
        }
        f.panic_after = duration("STAND_IN_PANIC_AFTER")?;
        f.ignore_powerdown = flag("STAND_IN_IGNORE_POWERDOWN")?;
        if let Some(d) = duration("STAND_IN_POWERDOWN_DELAY")? {
            f.powerdown_delay = d;
        }
        f.start_delay = duration("STAND_IN_START_DELAY")?.unwrap_or_default();
        f.ignore_sigterm = flag("STAND_IN_IGNORE_SIGTERM")?;
        if let Some(v) = get("STAND_IN_CONSOLE_SPAM")? {
            f.console_spam = v
                .parse()
                .map_err(|_| bad("STAND_IN_CONSOLE_SPAM", &v, "expected bytes per second"))?;
        }
        f.orphan = flag("STAND_IN_ORPHAN")?;
        Ok(f)
    }

    /// Whether this instance crashes: all of them at probability 1, else a
    /// draw from `seed` (the pid and the clock).
    pub fn crashes(&self, seed: u64) -> bool {
        self.crash_after.is_some()
            && (self.crash_probability >= 1.0 || unit_interval(seed) < self.crash_probability)
    }
}

/// About 30 years: longer delays are refused rather than overflowing.
const MAX_SECS: f64 = 1e9;

/// A Go-style duration (`1h2m3.5s`, `500ms`, `10us`), or a plain number of
/// seconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    if let Ok(secs) = text.parse::<f64>() {
        return (secs.is_finite() && (0.0..MAX_SECS).contains(&secs))
            .then(|| Duration::from_secs_f64(secs));
    }
    let mut rest = text;
    let mut total = 0f64;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[u..];
        total += number * scale;
    }
    (total.is_finite() && total < MAX_SECS).then(|| Duration::from_secs_f64(total))
}

/// splitmix64, mapped to [0, 1).
pub fn unit_interval(seed: u64) -> f64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &[(&str, &str)]) -> Result<Faults, String> {
        Faults::from_lookup(|name| {
            Ok(vars
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
                .filter(|v| !v.is_empty()))
        })
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("2 s"), None);
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("5x"), None);
        assert_eq!(parse_duration("1e300"), None);
        assert_eq!(parse_duration("99999999999h"), None);
    }

    #[test]
    fn reads_the_environment() {
        let f = with(&[
            ("STAND_IN_CRASH_AFTER", "2s"),
            ("STAND_IN_CRASH_PROBABILITY", "0.25"),
            ("STAND_IN_CRASH_SIGNAL", "sigkill"),
            ("STAND_IN_IGNORE_SIGTERM", "1"),
            ("STAND_IN_CONSOLE_SPAM", "4096"),
            ("STAND_IN_FAIL_AT_START", ""),
            ("STAND_IN_ORPHAN", "1"),
        ])
        .unwrap();
        assert_eq!(f.crash_after, Some(Duration::from_secs(2)));
        assert_eq!(f.crash_probability, 0.25);
        assert_eq!(f.crash_signal, CrashSignal::Kill);
        assert!(f.ignore_sigterm && !f.ignore_powerdown);
        assert_eq!(f.console_spam, 4096);
        assert_eq!(f.fail_at_start, None);
        assert!(f.orphan && !Faults::default().orphan);
        assert!(with(&[("STAND_IN_CRASH_PROBABILITY", "2")]).is_err());
        assert!(with(&[("STAND_IN_START_DELAY", "soon")]).is_err());
        assert!(with(&[("STAND_IN_IGNORE_POWERDOWN", "maybe")]).is_err());
    }

    #[test]
    fn crash_probability_picks_about_that_fraction() {
        let f = with(&[
            ("STAND_IN_CRASH_AFTER", "1s"),
            ("STAND_IN_CRASH_PROBABILITY", "0.3"),
        ])
        .unwrap();
        let crashed = (0..10_000u64).filter(|&s| f.crashes(s << 32 | s)).count();
        assert!((2_700..3_300).contains(&crashed), "{crashed}");
        assert!(!Faults::default().crashes(1));
    }
}
