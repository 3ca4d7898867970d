use super::*;
use crate::restart::RestartType;

const S: Duration = Duration::from_secs(1);

fn policy(restart: RestartType) -> RestartPolicy {
    RestartPolicy {
        restart,
        max_restarts: 2,
        period: Duration::from_secs(60),
        backoff_initial: S,
        backoff_max: Duration::from_secs(8),
        healthy_reset: Duration::from_secs(300),
    }
}

fn budget() -> StopBudget {
    StopBudget {
        powerdown: Duration::from_secs(10),
        quit: Duration::from_secs(5),
        term: Duration::from_secs(4),
        kill: Duration::from_secs(3),
    }
}

fn machine() -> Lifecycle {
    Lifecycle::new(policy(RestartType::Transient), budget())
}

const RELEASE: Effect = Effect::Release {
    failed: false,
    keep_listed: false,
};

/// Drives a fresh machine into each phase the way a real VM gets there.
fn into(phase: Phase) -> Lifecycle {
    let mut m = machine();
    let t = Duration::ZERO;
    let running = |m: &mut Lifecycle| {
        m.on(Event::Launched { control: true }, t);
    };
    match phase {
        Phase::Starting => {}
        Phase::Running => running(&mut m),
        Phase::Backoff => {
            running(&mut m);
            m.on(Event::Exited(ExitKind::Abnormal), t);
        }
        Phase::Restarting => {
            running(&mut m);
            m.on(Event::Exited(ExitKind::Abnormal), t);
            m.on(Event::RestartTimer, t);
        }
        Phase::Stopping(stage) => {
            running(&mut m);
            m.on(Event::Remove, t);
            let ladder = [
                StopStage::PowerDown,
                StopStage::Quit,
                StopStage::Term,
                StopStage::Kill,
            ];
            for step in ladder {
                if step == stage {
                    break;
                }
                m.on(Event::StageTimeout(step), t);
            }
        }
        Phase::Unkillable => {
            m = into(Phase::Stopping(StopStage::Kill));
            m.on(Event::StageTimeout(StopStage::Kill), t);
        }
        Phase::Stopped => {
            running(&mut m);
            m.on(Event::Remove, t);
            m.on(Event::Exited(ExitKind::Normal), t);
        }
        Phase::Failed => {
            m.on(Event::LaunchFailed, t);
        }
    }
    assert_eq!(m.phase(), phase, "driver reached the phase");
    m
}

const PHASES: [Phase; 11] = [
    Phase::Starting,
    Phase::Running,
    Phase::Backoff,
    Phase::Restarting,
    Phase::Stopping(StopStage::PowerDown),
    Phase::Stopping(StopStage::Quit),
    Phase::Stopping(StopStage::Term),
    Phase::Stopping(StopStage::Kill),
    Phase::Unkillable,
    Phase::Stopped,
    Phase::Failed,
];

const EVENTS: [Event; 13] = [
    Event::Launched { control: true },
    Event::LaunchFailed,
    Event::Exited(ExitKind::Normal),
    Event::Exited(ExitKind::Abnormal),
    Event::GuestPanicked,
    Event::Ttl,
    Event::Remove,
    Event::Shutdown,
    Event::StageTimeout(StopStage::PowerDown),
    Event::StageTimeout(StopStage::Quit),
    Event::StageTimeout(StopStage::Term),
    Event::StageTimeout(StopStage::Kill),
    Event::RestartTimer,
];

/// The expected answer of every event in every phase: (phase after, effects).
fn expected(phase: Phase, event: Event) -> (Phase, Vec<Effect>) {
    use Effect as F;
    use Event as E;
    use Phase as P;
    let stay = (phase, vec![]);
    let stage_timer = |stage, secs| F::ArmStageTimer {
        stage,
        after: Duration::from_secs(secs),
    };
    let stopped = (
        P::Stopped,
        vec![RELEASE, F::AnswerStop(StopAnswer::Stopped)],
    );
    let begin_stop = (
        P::Stopping(StopStage::PowerDown),
        vec![
            F::CancelTtl,
            F::PowerDown,
            stage_timer(StopStage::PowerDown, 10),
        ],
    );
    match (phase, event) {
        (P::Starting | P::Restarting, E::Launched { .. }) => (P::Running, vec![F::Running]),
        (P::Starting, E::LaunchFailed) => (
            P::Failed,
            vec![F::Release {
                failed: true,
                keep_listed: false,
            }],
        ),
        // A failed restart counts as a crash: backoff again (budget left).
        (P::Restarting, E::LaunchFailed) => (
            P::Backoff,
            vec![F::ScheduleRestart {
                after: 2 * S,
                attempt: 2,
            }],
        ),
        (P::Starting | P::Restarting, E::Ttl | E::Remove | E::Shutdown) => stay,

        (P::Running, E::Exited(ExitKind::Abnormal)) => (
            P::Backoff,
            vec![F::ScheduleRestart {
                after: S,
                attempt: 1,
            }],
        ),
        (P::Running, E::Exited(ExitKind::Normal)) => (
            P::Stopped,
            vec![
                F::Log("VM ended and is not restarted (restart policy transient)".into()),
                RELEASE,
            ],
        ),
        (P::Running, E::GuestPanicked) => (P::Running, vec![F::KillForRestart]),
        (P::Running, E::Ttl | E::Remove | E::Shutdown) => begin_stop,

        (P::Backoff, E::RestartTimer) => (P::Restarting, vec![F::Relaunch]),
        (P::Backoff, E::Ttl | E::Remove | E::Shutdown) => (
            P::Stopped,
            vec![
                F::CancelRestartTimer,
                RELEASE,
                F::AnswerStop(StopAnswer::Stopped),
            ],
        ),

        (P::Stopping(_) | P::Unkillable, E::Exited(_)) => stopped,
        (P::Stopping(StopStage::PowerDown), E::StageTimeout(StopStage::PowerDown)) => (
            P::Stopping(StopStage::Quit),
            vec![F::Quit, stage_timer(StopStage::Quit, 5)],
        ),
        (P::Stopping(StopStage::Quit), E::StageTimeout(StopStage::Quit)) => (
            P::Stopping(StopStage::Term),
            vec![F::SigTerm, stage_timer(StopStage::Term, 4)],
        ),
        (P::Stopping(StopStage::Term), E::StageTimeout(StopStage::Term)) => (
            P::Stopping(StopStage::Kill),
            vec![F::SigKill, stage_timer(StopStage::Kill, 3)],
        ),
        (P::Stopping(StopStage::Kill), E::StageTimeout(StopStage::Kill)) => {
            (P::Unkillable, vec![F::AnswerStop(StopAnswer::Unkillable)])
        }
        (P::Unkillable, E::Ttl | E::Remove | E::Shutdown) => {
            (P::Unkillable, vec![F::AnswerStop(StopAnswer::Unkillable)])
        }
        (P::Stopped | P::Failed, E::Remove | E::Shutdown) => {
            (phase, vec![F::AnswerStop(StopAnswer::Stopped)])
        }
        _ => stay,
    }
}

#[test]
fn every_event_in_every_phase() {
    for phase in PHASES {
        for event in EVENTS {
            let mut m = into(phase);
            let effects = m.on(event, Duration::ZERO);
            let (want_phase, want_effects) = expected(phase, event);
            assert_eq!(
                (m.phase(), effects),
                (want_phase, want_effects),
                "{event:?} in {phase:?}"
            );
        }
    }
}

#[test]
fn remove_during_create_stops_once_the_launch_is_up() {
    let mut m = machine();
    assert_eq!(m.on(Event::Remove, Duration::ZERO), vec![]);
    assert_eq!(m.stopping_for(), Some(StopReason::Remove));
    let effects = m.on(Event::Launched { control: true }, Duration::ZERO);
    assert_eq!(
        effects,
        vec![
            Effect::Running,
            Effect::CancelTtl,
            Effect::PowerDown,
            Effect::ArmStageTimer {
                stage: StopStage::PowerDown,
                after: Duration::from_secs(10)
            }
        ]
    );
    assert_eq!(m.phase(), Phase::Stopping(StopStage::PowerDown));
}

#[test]
fn remove_during_a_failed_create_answers_the_remove() {
    let mut m = machine();
    m.on(Event::Remove, Duration::ZERO);
    let effects = m.on(Event::LaunchFailed, Duration::ZERO);
    assert_eq!(
        effects,
        vec![
            Effect::Release {
                failed: true,
                keep_listed: false
            },
            Effect::AnswerStop(StopAnswer::Stopped)
        ]
    );
}

#[test]
fn remove_during_restart_backoff_releases_at_once() {
    let mut m = into(Phase::Backoff);
    let effects = m.on(Event::Remove, Duration::ZERO);
    assert_eq!(m.phase(), Phase::Stopped);
    assert!(effects.contains(&Effect::CancelRestartTimer));
    // The restart timer firing afterwards changes nothing.
    assert_eq!(m.on(Event::RestartTimer, Duration::ZERO), vec![]);
    assert_eq!(m.phase(), Phase::Stopped);
}

#[test]
fn ttl_during_a_restart_stops_the_vm_when_the_relaunch_is_up() {
    let mut m = into(Phase::Restarting);
    assert_eq!(m.on(Event::Ttl, Duration::ZERO), vec![]);
    let effects = m.on(Event::Launched { control: false }, Duration::ZERO);
    // No control socket: straight to SIGTERM.
    assert_eq!(
        effects,
        vec![
            Effect::Running,
            Effect::CancelTtl,
            Effect::SigTerm,
            Effect::ArmStageTimer {
                stage: StopStage::Term,
                after: Duration::from_secs(4)
            }
        ]
    );
    assert_eq!(m.stopping_for(), Some(StopReason::Ttl));
}

#[test]
fn ttl_during_a_failed_restart_releases_instead_of_retrying() {
    let mut m = into(Phase::Restarting);
    m.on(Event::Ttl, Duration::ZERO);
    let effects = m.on(Event::LaunchFailed, Duration::ZERO);
    assert_eq!(m.phase(), Phase::Stopped);
    assert_eq!(
        effects,
        vec![RELEASE, Effect::AnswerStop(StopAnswer::Stopped)]
    );
}

#[test]
fn a_crash_during_a_stop_ends_the_stop() {
    for stage in [
        StopStage::PowerDown,
        StopStage::Quit,
        StopStage::Term,
        StopStage::Kill,
    ] {
        let mut m = into(Phase::Stopping(stage));
        let effects = m.on(Event::Exited(ExitKind::Abnormal), Duration::ZERO);
        assert_eq!(m.phase(), Phase::Stopped, "{stage:?}");
        assert_eq!(
            effects,
            vec![RELEASE, Effect::AnswerStop(StopAnswer::Stopped)]
        );
    }
}

#[test]
fn a_second_remove_while_stopping_waits_and_after_is_answered() {
    let mut m = into(Phase::Stopping(StopStage::Term));
    assert_eq!(m.on(Event::Remove, Duration::ZERO), vec![]);
    m.on(Event::Exited(ExitKind::Normal), Duration::ZERO);
    assert_eq!(
        m.on(Event::Remove, Duration::ZERO),
        vec![Effect::AnswerStop(StopAnswer::Stopped)]
    );
}

#[test]
fn the_ladder_advances_on_timers_whether_or_not_qemu_answers() {
    // A hung QEMU: nothing ever exits; only timers fire.
    let mut m = into(Phase::Running);
    m.on(Event::Remove, Duration::ZERO);
    let mut waited = Duration::ZERO;
    while let Phase::Stopping(stage) = m.phase() {
        let effects = m.on(Event::StageTimeout(stage), Duration::ZERO);
        if let Some(Effect::ArmStageTimer { after, .. }) = effects.last() {
            waited += *after;
        }
    }
    assert_eq!(m.phase(), Phase::Unkillable);
    // Powerdown's 10 s were armed on entering; the rest on each step.
    assert_eq!(waited + Duration::from_secs(10), budget().total());
}

#[test]
fn a_stale_stage_timer_is_ignored() {
    let mut m = into(Phase::Stopping(StopStage::Term));
    assert_eq!(
        m.on(Event::StageTimeout(StopStage::PowerDown), Duration::ZERO),
        vec![]
    );
    assert_eq!(m.phase(), Phase::Stopping(StopStage::Term));
}

#[test]
fn zero_powerdown_or_no_control_socket_skips_qmp_stages() {
    let mut b = budget();
    b.powerdown = Duration::ZERO;
    let mut m = Lifecycle::new(policy(RestartType::Transient), b);
    m.on(Event::Launched { control: true }, Duration::ZERO);
    let effects = m.on(Event::Remove, Duration::ZERO);
    assert_eq!(effects[1], Effect::Quit);

    let mut m = into(Phase::Running);
    m.set_control(false);
    let effects = m.on(Event::Remove, Duration::ZERO);
    assert_eq!(effects[1], Effect::SigTerm);

    // Power-down with no answer, control lost meanwhile: on to SIGTERM.
    let mut m = into(Phase::Stopping(StopStage::PowerDown));
    m.set_control(false);
    let effects = m.on(Event::StageTimeout(StopStage::PowerDown), Duration::ZERO);
    assert_eq!(effects[0], Effect::SigTerm);
}

#[test]
fn the_restart_budget_is_spent_then_the_vm_fails_and_stays_listed() {
    let mut m = into(Phase::Running);
    let mut now = Duration::ZERO;
    for _ in 0..2 {
        m.on(Event::Exited(ExitKind::Abnormal), now);
        assert_eq!(m.phase(), Phase::Backoff);
        m.on(Event::RestartTimer, now);
        m.on(Event::Launched { control: true }, now);
        now += S;
    }
    let effects = m.on(Event::Exited(ExitKind::Abnormal), now);
    assert_eq!(m.phase(), Phase::Failed);
    assert!(effects.contains(&Effect::Release {
        failed: true,
        keep_listed: true
    }));
}

#[test]
fn permanent_restarts_a_clean_power_off_and_temporary_never_restarts() {
    let mut m = Lifecycle::new(policy(RestartType::Permanent), budget());
    m.on(Event::Launched { control: true }, Duration::ZERO);
    m.on(Event::Exited(ExitKind::Normal), Duration::ZERO);
    assert_eq!(m.phase(), Phase::Backoff);

    let mut m = Lifecycle::new(policy(RestartType::Temporary), budget());
    m.on(Event::Launched { control: true }, Duration::ZERO);
    m.on(Event::Exited(ExitKind::Abnormal), Duration::ZERO);
    assert_eq!(m.phase(), Phase::Stopped);
}

#[test]
fn final_phases() {
    for phase in PHASES {
        assert_eq!(
            phase.is_final(),
            matches!(phase, Phase::Stopped | Phase::Failed),
            "{phase:?}"
        );
    }
}
