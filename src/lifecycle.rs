//! The life of one VM as a pure state machine: a phase, and for every event
//! (launch result, QEMU exit, guest panic, TTL, remove request, a stop
//! stage's timer, the restart timer) the next phase and the effects to carry
//! out. The `CvmActor` owns the process, files and timers and only carries
//! out effects; every decision is here, with time passed in, so each case is
//! a plain unit test (as `restart.rs`).
//!
//! The stop ladder advances on its timers alone: power-down, `quit`,
//! SIGTERM, SIGKILL, each stage bounded, whether or not QEMU answers its
//! control socket. So a remove of a hung QEMU ends within the stop budget.

use std::time::Duration;

use crate::restart::{Decision, ExitKind, RestartPolicy, RestartTracker};

/// One rung of the stop ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopStage {
    /// ACPI power-down over QMP: the guest shuts itself down.
    PowerDown,
    /// QMP `quit`: QEMU exits.
    Quit,
    Term,
    Kill,
}

/// Why a VM is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Remove,
    Ttl,
    Shutdown,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Remove => "RemoveVm",
            StopReason::Ttl => "TTL expired",
            StopReason::Shutdown => "manager shutdown",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The first launch is in progress.
    Starting,
    Running,
    /// Ended; waiting out the backoff before a restart.
    Backoff,
    /// A restart's launch is in progress.
    Restarting,
    Stopping(StopStage),
    /// SIGKILL sent and its bound passed, the process still there (stuck in
    /// the kernel): waiting for it to go, however long that takes.
    Unkillable,
    Stopped,
    /// Gave up (restart budget spent, or the first launch failed).
    Failed,
}

impl Phase {
    /// Nothing more happens to the VM: its actor is finishing.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Stopped | Phase::Failed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A launch (first, restart, or re-adoption) is up; `control` says
    /// whether QEMU's control socket answers.
    Launched {
        control: bool,
    },
    /// A launch failed; nothing of it is left running.
    LaunchFailed,
    /// QEMU ended, classified.
    Exited(ExitKind),
    /// The guest reported a panic over QMP.
    GuestPanicked,
    Ttl,
    Remove,
    Shutdown,
    /// The timer of a stop stage fired.
    StageTimeout(StopStage),
    RestartTimer,
}

/// What the VM's stop ended in, for those waiting on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopAnswer {
    Stopped,
    /// SIGKILL did not end QEMU within its bound; its files stay until it does.
    Unkillable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The process is up: record it, log its console, arm the TTL.
    Running,
    /// Kill QEMU now (a panicked guest); supervision restarts it.
    KillForRestart,
    ScheduleRestart {
        after: Duration,
        attempt: u32,
    },
    Relaunch,
    CancelTtl,
    CancelRestartTimer,
    /// Send QMP `system_powerdown` (fire and forget, bounded).
    PowerDown,
    /// Send QMP `quit` (fire and forget, bounded).
    Quit,
    SigTerm,
    SigKill,
    ArmStageTimer {
        stage: StopStage,
        after: Duration,
    },
    /// End the helpers, remove the files, release the port, tell the
    /// supervisor; `keep_listed` keeps a failed VM visible until removed.
    Release {
        failed: bool,
        keep_listed: bool,
    },
    /// Answer everyone waiting for the VM to stop.
    AnswerStop(StopAnswer),
    /// Log why the VM is not restarted (the policy says so).
    Log(String),
    /// Log that the VM failed for good (restart budget spent).
    LogFailure(String),
}

/// The bounds of the stop ladder; zero skips a QMP stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopBudget {
    pub powerdown: Duration,
    pub quit: Duration,
    pub term: Duration,
    pub kill: Duration,
}

impl StopBudget {
    /// The longest a stop can take before the VM is declared unkillable.
    pub fn total(&self) -> Duration {
        self.powerdown + self.quit + self.term + self.kill
    }
}

#[derive(Debug, Clone)]
pub struct Lifecycle {
    phase: Phase,
    policy: RestartPolicy,
    budget: StopBudget,
    tracker: RestartTracker,
    /// Whether QEMU's control socket answers (the QMP stages need it).
    control: bool,
    /// A stop asked for while a launch is in progress.
    pending_stop: Option<StopReason>,
    /// Why the VM is stopping, once it is.
    stopping_for: Option<StopReason>,
}

impl Lifecycle {
    pub fn new(policy: RestartPolicy, budget: StopBudget) -> Lifecycle {
        Lifecycle {
            phase: Phase::Starting,
            policy,
            budget,
            tracker: RestartTracker::new(),
            control: false,
            pending_stop: None,
            stopping_for: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn stopping_for(&self) -> Option<StopReason> {
        self.stopping_for.or(self.pending_stop)
    }

    /// QEMU's control socket went away (or came back).
    pub fn set_control(&mut self, control: bool) {
        self.control = control;
    }

    /// The next phase and the effects of `event` at `now` (time since an
    /// epoch the caller picks).
    pub fn on(&mut self, event: Event, now: Duration) -> Vec<Effect> {
        use Event as E;
        use Phase as P;
        match (self.phase, event) {
            // A launch in progress: its result decides; stops wait for it.
            (P::Starting | P::Restarting, E::Launched { control }) => {
                self.control = control;
                self.phase = P::Running;
                self.tracker.started(now);
                let mut effects = vec![Effect::Running];
                if let Some(reason) = self.pending_stop.take() {
                    effects.extend(self.begin_stop(reason));
                }
                effects
            }
            (P::Starting, E::LaunchFailed) => {
                self.phase = P::Failed;
                let mut effects = vec![Effect::Release {
                    failed: true,
                    keep_listed: false,
                }];
                if self.pending_stop.take().is_some() {
                    effects.push(Effect::AnswerStop(StopAnswer::Stopped));
                }
                effects
            }
            (P::Restarting, E::LaunchFailed) => {
                if self.pending_stop.take().is_some() {
                    self.phase = P::Stopped;
                    return vec![
                        Effect::Release {
                            failed: false,
                            keep_listed: false,
                        },
                        Effect::AnswerStop(StopAnswer::Stopped),
                    ];
                }
                self.decide(ExitKind::Abnormal, now)
            }
            (P::Starting | P::Restarting, E::Remove | E::Ttl | E::Shutdown) => {
                let reason = stop_reason(event);
                self.pending_stop.get_or_insert(reason);
                Vec::new()
            }

            (P::Running, E::Exited(kind)) => self.decide(kind, now),
            (P::Running, E::GuestPanicked) => vec![Effect::KillForRestart],
            (P::Running, E::Remove | E::Ttl | E::Shutdown) => self.begin_stop(stop_reason(event)),

            (P::Backoff, E::RestartTimer) => {
                self.phase = P::Restarting;
                vec![Effect::Relaunch]
            }
            (P::Backoff, E::Remove | E::Ttl | E::Shutdown) => {
                self.stopping_for = Some(stop_reason(event));
                self.phase = P::Stopped;
                vec![
                    Effect::CancelRestartTimer,
                    Effect::Release {
                        failed: false,
                        keep_listed: false,
                    },
                    Effect::AnswerStop(StopAnswer::Stopped),
                ]
            }

            (P::Stopping(_) | P::Unkillable, E::Exited(_)) => {
                self.phase = P::Stopped;
                vec![
                    Effect::Release {
                        failed: false,
                        keep_listed: false,
                    },
                    Effect::AnswerStop(StopAnswer::Stopped),
                ]
            }
            (P::Stopping(current), E::StageTimeout(stage)) if stage == current => {
                self.next_stage(current)
            }
            (P::Unkillable, E::Remove | E::Ttl | E::Shutdown) => {
                vec![Effect::AnswerStop(StopAnswer::Unkillable)]
            }

            // A second remove of a VM that is gone already.
            (P::Stopped | P::Failed, E::Remove | E::Shutdown) => {
                vec![Effect::AnswerStop(StopAnswer::Stopped)]
            }

            // Everything else is stale or has nothing to change: a timer
            // that fired after its phase ended, an exit a launch job reports
            // itself, a remove while already stopping (its waiter is
            // answered when the stop ends).
            _ => Vec::new(),
        }
    }

    /// A VM that ended on its own: restart, stop or give up, as the policy says.
    fn decide(&mut self, kind: ExitKind, now: Duration) -> Vec<Effect> {
        match self.tracker.on_exit(&self.policy, kind, now) {
            Decision::Restart { after, attempt } => {
                self.phase = Phase::Backoff;
                vec![Effect::ScheduleRestart { after, attempt }]
            }
            Decision::Stop => {
                self.phase = Phase::Stopped;
                vec![
                    Effect::Log(format!(
                        "VM ended and is not restarted (restart policy {})",
                        self.policy.restart
                    )),
                    Effect::Release {
                        failed: false,
                        keep_listed: false,
                    },
                ]
            }
            Decision::GiveUp { reason } => {
                self.phase = Phase::Failed;
                vec![
                    Effect::LogFailure(format!(
                        "VM failed: restart budget spent ({reason}); its port and files are released"
                    )),
                    Effect::Release {
                        failed: true,
                        keep_listed: true,
                    },
                ]
            }
        }
    }

    fn begin_stop(&mut self, reason: StopReason) -> Vec<Effect> {
        self.stopping_for = Some(reason);
        let mut effects = vec![Effect::CancelTtl];
        let first = if self.control && !self.budget.powerdown.is_zero() {
            StopStage::PowerDown
        } else if self.control && !self.budget.quit.is_zero() {
            StopStage::Quit
        } else {
            StopStage::Term
        };
        effects.extend(self.enter(first));
        effects
    }

    fn enter(&mut self, stage: StopStage) -> Vec<Effect> {
        self.phase = Phase::Stopping(stage);
        let (action, after) = match stage {
            StopStage::PowerDown => (Effect::PowerDown, self.budget.powerdown),
            StopStage::Quit => (Effect::Quit, self.budget.quit),
            StopStage::Term => (Effect::SigTerm, self.budget.term),
            StopStage::Kill => (Effect::SigKill, self.budget.kill),
        };
        vec![action, Effect::ArmStageTimer { stage, after }]
    }

    fn next_stage(&mut self, current: StopStage) -> Vec<Effect> {
        match current {
            StopStage::PowerDown if self.control && !self.budget.quit.is_zero() => {
                self.enter(StopStage::Quit)
            }
            StopStage::PowerDown | StopStage::Quit => self.enter(StopStage::Term),
            StopStage::Term => self.enter(StopStage::Kill),
            StopStage::Kill => {
                self.phase = Phase::Unkillable;
                vec![Effect::AnswerStop(StopAnswer::Unkillable)]
            }
        }
    }
}

fn stop_reason(event: Event) -> StopReason {
    match event {
        Event::Ttl => StopReason::Ttl,
        Event::Shutdown => StopReason::Shutdown,
        _ => StopReason::Remove,
    }
}

#[cfg(test)]
mod tests;
