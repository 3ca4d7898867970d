//! Percentiles and medians of latency samples.

use std::time::Duration;

/// Milliseconds as a float, for reports.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Summary of a set of latencies (all in milliseconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Summary {
    /// `None` when there is no sample.
    pub fn of(samples: &[Duration]) -> Option<Summary> {
        let mut sorted: Vec<f64> = samples.iter().map(|d| ms(*d)).collect();
        sorted.sort_by(f64::total_cmp);
        Some(Summary {
            count: sorted.len(),
            p50_ms: percentile(&sorted, 50.0)?,
            p99_ms: percentile(&sorted, 99.0)?,
            max_ms: *sorted.last()?,
        })
    }

    pub fn json(summary: Option<Summary>) -> serde_json::Value {
        match summary {
            Some(s) => serde_json::json!({
                "count": s.count,
                "p50_ms": round3(s.p50_ms),
                "p99_ms": round3(s.p99_ms),
                "max_ms": round3(s.max_ms),
            }),
            None => serde_json::Value::Null,
        }
    }

    pub fn line(summary: Option<Summary>) -> String {
        match summary {
            Some(s) => format!(
                "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples)",
                s.p50_ms, s.p99_ms, s.max_ms, s.count
            ),
            None => "no samples".to_string(),
        }
    }
}

/// Nearest-rank percentile of an ascending slice; `None` when empty.
pub fn percentile(sorted: &[f64], pct: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (pct / 100.0 * sorted.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted.len()) - 1;
    sorted.get(index).copied()
}

/// The median (mean of the two middle values for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => sorted.get(n / 2).copied(),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// Rounds to three decimals, to keep the JSON line readable.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The last line of a report: OK, or FAILED with each failure.
pub fn print_verdict(failures: &[String]) {
    if failures.is_empty() {
        println!("Result: OK");
    } else {
        println!("Result: FAILED");
        for failure in failures {
            println!("  - {failure}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn summary() {
        let samples: Vec<Duration> = (1..=10).map(Duration::from_millis).collect();
        let s = Summary::of(&samples).expect("samples");
        assert_eq!(s.count, 10);
        assert_eq!(s.p50_ms, 5.0);
        assert_eq!(s.p99_ms, 10.0);
        assert_eq!(s.max_ms, 10.0);
        assert!(Summary::of(&[]).is_none());
    }
}
