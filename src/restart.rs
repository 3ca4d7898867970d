//! Erlang/OTP-style restart policy for VMs. The decision is kept pure (time
//! is passed in as a `Duration` since an epoch the caller picks) so the
//! supervisor actor owns the clock and the timers, and every edge of the
//! policy can be tested without sleeping.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::duration::format_go_duration;

/// OTP restart types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartType {
    /// Always restart: the VM is meant to be up whatever happened to it.
    Permanent,
    /// Restart only after a crash: a clean guest power-off is respected.
    Transient,
    /// Never restart.
    Temporary,
}

impl RestartType {
    const NAMES: &'static str = "permanent, transient, temporary";
}

impl FromStr for RestartType {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "permanent" => Ok(RestartType::Permanent),
            "transient" => Ok(RestartType::Transient),
            "temporary" => Ok(RestartType::Temporary),
            _ => Err(format!(
                "unknown restart type {text:?}, expected one of: {}",
                RestartType::NAMES
            )),
        }
    }
}

impl fmt::Display for RestartType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RestartType::Permanent => "permanent",
            RestartType::Transient => "transient",
            RestartType::Temporary => "temporary",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    pub restart: RestartType,
    /// Intensity: at most `max_restarts` restarts within any `period`, so a
    /// VM that crashes on boot does not spin forever. Zero never restarts.
    pub max_restarts: u32,
    pub period: Duration,
    /// Exponential backoff between tries, so a crash loop does not hammer
    /// the host: initial, doubled each consecutive restart, capped.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// After running this long without a crash the restart history is
    /// forgotten, so a VM that crashes once a month is not treated like one
    /// in a crash loop. Zero disables the reset: a literal zero would forget
    /// the history on every exit and defeat the intensity limit.
    pub healthy_reset: Duration,
}

/// How the VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// The guest powered itself off cleanly (QEMU exit status 0 / guest-initiated shutdown).
    Normal,
    /// Killed by a signal, non-zero exit, guest panic, failed to come back up.
    Abnormal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Restart after this delay; `attempt` counts consecutive restarts since
    /// the last healthy run, starting at 1.
    Restart { after: Duration, attempt: u32 },
    /// The policy says not to restart this exit (temporary, or transient + normal).
    Stop,
    /// Restart budget spent: give up; `reason` is a human sentence for logs.
    GiveUp { reason: String },
}

/// Per-VM restart history.
///
/// Giving up does not clear the history: if an operator starts the VM again
/// by hand, it must run healthily for `healthy_reset` before it regains its
/// full budget (or the caller drops the tracker and makes a new one).
#[derive(Debug, Clone, Default)]
pub struct RestartTracker {
    /// Times of the restarts still inside the window, oldest first. Pruned
    /// on each exit, so it never grows beyond `max_restarts` entries.
    restarts: VecDeque<Duration>,
    /// Consecutive restarts since the last healthy run; drives the backoff.
    consecutive: u32,
    /// When the VM last started running; `None` when it never came up, so a
    /// failed boot can never count as a healthy run.
    started_at: Option<Duration>,
}

impl RestartTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// The VM (re)started running at `now`.
    pub fn started(&mut self, now: Duration) {
        self.started_at = Some(now);
    }

    /// The VM ended at `now`; decide what to do. Records the restart (at
    /// `now`, not at the end of the backoff) if the decision is `Restart`.
    pub fn on_exit(&mut self, policy: &RestartPolicy, kind: ExitKind, now: Duration) -> Decision {
        if let Some(started) = self.started_at.take() {
            if !policy.healthy_reset.is_zero()
                && now.saturating_sub(started) >= policy.healthy_reset
            {
                self.restarts.clear();
                self.consecutive = 0;
            }
        }

        let wanted = match policy.restart {
            RestartType::Permanent => true,
            RestartType::Transient => kind == ExitKind::Abnormal,
            RestartType::Temporary => false,
        };
        if !wanted {
            return Decision::Stop;
        }

        if policy.max_restarts == 0 {
            return Decision::GiveUp {
                reason: "restarts are disabled (MANAGER_RESTART_MAX_RESTARTS is 0)".to_string(),
            };
        }

        // A timestamp later than `now` (the caller's clock stepped back)
        // counts as recent: better to give up early than to loop forever.
        self.restarts
            .retain(|&at| now.saturating_sub(at) < policy.period);
        let recent = u32::try_from(self.restarts.len()).unwrap_or(u32::MAX);
        if recent >= policy.max_restarts {
            return Decision::GiveUp {
                reason: format!(
                    "{recent} restarts within {} (MANAGER_RESTART_MAX_RESTARTS / MANAGER_RESTART_PERIOD)",
                    format_go_duration(policy.period)
                ),
            };
        }

        self.restarts.push_back(now);
        self.consecutive = self.consecutive.saturating_add(1);
        Decision::Restart {
            after: backoff(policy, self.consecutive),
            attempt: self.consecutive,
        }
    }

    /// Restarts counted in the current window (for status/metrics), as of
    /// the last exit.
    pub fn recent_restarts(&self) -> u32 {
        u32::try_from(self.restarts.len()).unwrap_or(u32::MAX)
    }
}

/// `backoff_initial * 2^(attempt-1)`, capped at `backoff_max`; saturates
/// rather than panicking because attempt counts are unbounded.
fn backoff(policy: &RestartPolicy, attempt: u32) -> Duration {
    let delay = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .and_then(|factor| policy.backoff_initial.checked_mul(factor))
        .unwrap_or(Duration::MAX);
    if policy.backoff_initial.is_zero() {
        Duration::ZERO
    } else {
        delay.min(policy.backoff_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(v: u64) -> Duration {
        Duration::from_secs(v)
    }

    fn policy(restart: RestartType) -> RestartPolicy {
        RestartPolicy {
            restart,
            max_restarts: 3,
            period: secs(60),
            backoff_initial: secs(1),
            backoff_max: secs(10),
            healthy_reset: secs(300),
        }
    }

    fn is_restart(d: &Decision) -> bool {
        matches!(d, Decision::Restart { .. })
    }

    #[test]
    fn restart_type_by_exit_kind() {
        let cases = [
            (RestartType::Permanent, ExitKind::Normal, true),
            (RestartType::Permanent, ExitKind::Abnormal, true),
            (RestartType::Transient, ExitKind::Normal, false),
            (RestartType::Transient, ExitKind::Abnormal, true),
            (RestartType::Temporary, ExitKind::Normal, false),
            (RestartType::Temporary, ExitKind::Abnormal, false),
        ];
        for (restart, kind, expect_restart) in cases {
            let mut t = RestartTracker::new();
            t.started(secs(0));
            let d = t.on_exit(&policy(restart), kind, secs(1));
            if expect_restart {
                assert_eq!(
                    d,
                    Decision::Restart {
                        after: secs(1),
                        attempt: 1
                    },
                    "{restart} {kind:?}"
                );
                assert_eq!(t.recent_restarts(), 1);
            } else {
                assert_eq!(d, Decision::Stop, "{restart} {kind:?}");
                assert_eq!(t.recent_restarts(), 0);
            }
        }
    }

    #[test]
    fn intensity_allows_max_then_gives_up() {
        let p = policy(RestartType::Permanent);
        let mut t = RestartTracker::new();
        for i in 0..3 {
            let d = t.on_exit(&p, ExitKind::Abnormal, secs(i));
            assert!(is_restart(&d), "restart {i}: {d:?}");
        }
        assert_eq!(t.recent_restarts(), 3);
        match t.on_exit(&p, ExitKind::Abnormal, secs(3)) {
            Decision::GiveUp { reason } => {
                assert!(reason.contains("3 restarts within 1m0s"), "{reason}");
                assert!(reason.contains("MANAGER_RESTART_MAX_RESTARTS"), "{reason}");
            }
            other => panic!("expected GiveUp, got {other:?}"),
        }
    }

    #[test]
    fn intensity_window_slides() {
        let p = policy(RestartType::Permanent);
        let mut t = RestartTracker::new();
        for at in [0, 30, 50] {
            assert!(is_restart(&t.on_exit(&p, ExitKind::Abnormal, secs(at))));
        }
        // At 59s all three are inside (-1s, 59s].
        assert!(matches!(
            t.clone().on_exit(&p, ExitKind::Abnormal, secs(59)),
            Decision::GiveUp { .. }
        ));
        // At exactly 60s the one at 0s has left (0s, 60s]: one slot free.
        assert!(is_restart(&t.on_exit(&p, ExitKind::Abnormal, secs(60))));
        assert_eq!(t.recent_restarts(), 3);
        assert!(matches!(
            t.on_exit(&p, ExitKind::Abnormal, secs(61)),
            Decision::GiveUp { .. }
        ));
        // Once 30s and 50s have aged out too, two more fit.
        assert!(is_restart(&t.on_exit(&p, ExitKind::Abnormal, secs(110))));
        assert_eq!(t.recent_restarts(), 2);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let p = policy(RestartType::Permanent);
        let p = RestartPolicy {
            max_restarts: 100,
            ..p
        };
        let mut t = RestartTracker::new();
        let mut delays = Vec::new();
        for i in 0..6 {
            match t.on_exit(&p, ExitKind::Abnormal, secs(i)) {
                Decision::Restart { after, attempt } => {
                    assert_eq!(attempt, u32::try_from(i + 1).unwrap_or(0));
                    delays.push(after.as_secs());
                }
                other => panic!("expected Restart, got {other:?}"),
            }
        }
        assert_eq!(delays, [1, 2, 4, 8, 10, 10]);
    }

    #[test]
    fn backoff_saturates_on_huge_attempts() {
        let p = RestartPolicy {
            backoff_initial: secs(3),
            backoff_max: Duration::MAX,
            ..policy(RestartType::Permanent)
        };
        assert_eq!(backoff(&p, 1), secs(3));
        assert_eq!(backoff(&p, 32), secs(3) * (1 << 31));
        assert_eq!(backoff(&p, 33), Duration::MAX);
        assert_eq!(backoff(&p, u32::MAX), Duration::MAX);
        let capped = RestartPolicy {
            backoff_max: secs(10),
            ..p
        };
        assert_eq!(backoff(&capped, u32::MAX), secs(10));
        let huge = RestartPolicy {
            backoff_initial: Duration::MAX,
            ..p
        };
        assert_eq!(backoff(&huge, 2), Duration::MAX);
    }

    #[test]
    fn zero_initial_backoff_means_no_delay() {
        let p = RestartPolicy {
            backoff_initial: Duration::ZERO,
            ..policy(RestartType::Permanent)
        };
        let mut t = RestartTracker::new();
        for i in 0..3 {
            assert!(matches!(
                t.on_exit(&p, ExitKind::Abnormal, secs(i)),
                Decision::Restart { after, .. } if after.is_zero()
            ));
        }
        assert_eq!(backoff(&p, u32::MAX), Duration::ZERO);
    }

    #[test]
    fn healthy_run_resets_history() {
        let p = policy(RestartType::Permanent);
        let mut t = RestartTracker::new();
        for i in 0..3 {
            t.started(secs(i * 10));
            assert!(is_restart(&t.on_exit(
                &p,
                ExitKind::Abnormal,
                secs(i * 10 + 1)
            )));
        }
        // A run one second short of healthy keeps the consecutive count; the
        // window has passed, so only the backoff shows the history.
        t.started(secs(30));
        match t.on_exit(&p, ExitKind::Abnormal, secs(329)) {
            Decision::Restart { attempt, after } => {
                assert_eq!(attempt, 4);
                assert_eq!(after, secs(8));
            }
            other => panic!("expected Restart, got {other:?}"),
        }
        // A run of exactly `healthy_reset` forgets everything.
        t.started(secs(400));
        assert_eq!(
            t.on_exit(&p, ExitKind::Abnormal, secs(700)),
            Decision::Restart {
                after: secs(1),
                attempt: 1
            }
        );
        assert_eq!(t.recent_restarts(), 1);
        // ...and the full budget is back: two more, then give up.
        for at in [701, 702] {
            assert!(is_restart(&t.on_exit(&p, ExitKind::Abnormal, secs(at))));
        }
        assert!(matches!(
            t.on_exit(&p, ExitKind::Abnormal, secs(703)),
            Decision::GiveUp { .. }
        ));
    }

    #[test]
    fn healthy_reset_restores_budget_within_period() {
        // The window is longer than the healthy run, so without the reset
        // the old restarts would still count and the crash would give up.
        let p = RestartPolicy {
            period: secs(3600),
            healthy_reset: secs(60),
            ..policy(RestartType::Permanent)
        };
        let mut t = RestartTracker::new();
        for i in 0..3 {
            assert!(is_restart(&t.on_exit(&p, ExitKind::Abnormal, secs(i))));
        }
        assert!(matches!(
            t.clone().on_exit(&p, ExitKind::Abnormal, secs(10)),
            Decision::GiveUp { .. }
        ));
        t.started(secs(10));
        assert_eq!(
            t.on_exit(&p, ExitKind::Abnormal, secs(70)),
            Decision::Restart {
                after: secs(1),
                attempt: 1
            }
        );
    }

    #[test]
    fn exit_without_start_is_never_healthy() {
        let p = RestartPolicy {
            period: secs(3600),
            healthy_reset: secs(60),
            ..policy(RestartType::Permanent)
        };
        let mut t = RestartTracker::new();
        t.started(secs(0));
        assert!(is_restart(&t.on_exit(&p, ExitKind::Abnormal, secs(1))));
        // Failed to come back up: no `started`, long after the last start.
        match t.on_exit(&p, ExitKind::Abnormal, secs(1000)) {
            Decision::Restart { attempt, .. } => assert_eq!(attempt, 2),
            other => panic!("expected Restart, got {other:?}"),
        }
    }

    #[test]
    fn zero_healthy_reset_never_forgets() {
        let p = RestartPolicy {
            period: secs(3600),
            healthy_reset: Duration::ZERO,
            ..policy(RestartType::Permanent)
        };
        let mut t = RestartTracker::new();
        for i in 0..3 {
            t.started(secs(i * 100));
            assert!(is_restart(&t.on_exit(
                &p,
                ExitKind::Abnormal,
                secs(i * 100 + 50)
            )));
        }
        t.started(secs(300));
        assert!(matches!(
            t.on_exit(&p, ExitKind::Abnormal, secs(350)),
            Decision::GiveUp { .. }
        ));
    }

    #[test]
    fn max_restarts_zero_never_restarts() {
        let p = RestartPolicy {
            max_restarts: 0,
            ..policy(RestartType::Permanent)
        };
        let mut t = RestartTracker::new();
        t.started(secs(0));
        match t.on_exit(&p, ExitKind::Abnormal, secs(1000)) {
            Decision::GiveUp { reason } => {
                assert!(
                    reason.contains("MANAGER_RESTART_MAX_RESTARTS is 0"),
                    "{reason}"
                )
            }
            other => panic!("expected GiveUp, got {other:?}"),
        }
        assert_eq!(t.recent_restarts(), 0);
        // The restart type is still consulted first.
        let transient = RestartPolicy {
            restart: RestartType::Transient,
            ..p
        };
        assert_eq!(
            t.on_exit(&transient, ExitKind::Normal, secs(1001)),
            Decision::Stop
        );
    }

    #[test]
    fn restart_type_round_trips() {
        for ty in [
            RestartType::Permanent,
            RestartType::Transient,
            RestartType::Temporary,
        ] {
            assert_eq!(ty.to_string().parse::<RestartType>(), Ok(ty));
            assert_eq!(ty.to_string().to_uppercase().parse::<RestartType>(), Ok(ty));
        }
        assert_eq!(" Transient ".parse(), Ok(RestartType::Transient));
        assert_eq!(RestartType::Permanent.to_string(), "permanent");
    }

    #[test]
    fn restart_type_bad_string_names_valid_values() {
        let err = "always".parse::<RestartType>().err().unwrap_or_default();
        assert!(err.contains("\"always\""), "{err}");
        for name in ["permanent", "transient", "temporary"] {
            assert!(err.contains(name), "{err}");
        }
    }
}
