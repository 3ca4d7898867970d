//! Fail-fast: a half-alive daemon is worse than a dead one. A panic on any
//! thread (the actix system, the `Measurer`'s thread, tokio's blocking pool,
//! the log writer) and an essential actor that stops both end the process
//! with a non-zero status, after the cause is in the log. systemd
//! (`Restart=on-failure`) starts a new manager, which re-adopts the VMs:
//! QEMU runs in its own process group and nothing on this path signals it.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tracing::{debug, error};
use tracing_appender::non_blocking::WorkerGuard;

/// Exit status after a panic (what a panic in `main` gives).
pub const PANIC_EXIT: i32 = 101;
/// Exit status after an essential actor stopped (`EX_SOFTWARE`).
pub const ACTOR_STOPPED_EXIT: i32 = 70;
/// The name of the thread that writes the log (tracing-appender's worker).
pub const LOG_WRITER_THREAD: &str = "cocos-log-writer";
/// How long logging and flushing may take before the process ends anyway.
const LAST_RESORT: Duration = Duration::from_secs(5);

/// The log writer's guard: dropping it flushes what is queued.
static LOG_GUARD: Mutex<Option<WorkerGuard>> = Mutex::new(None);
/// Set while the daemon serves: an essential actor that stops then is fatal.
/// Cleared before an orderly shutdown (which stops every actor).
static ARMED: AtomicBool = AtomicBool::new(false);
/// The first fatal event owns the exit; later ones only log.
static EXITING: AtomicBool = AtomicBool::new(false);

/// Installs the panic hook; `guard` is the log writer's, flushed before exit.
pub fn install(guard: WorkerGuard) {
    *LOG_GUARD.lock().unwrap_or_else(|e| e.into_inner()) = Some(guard);
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed").to_string();
        let message = payload_text(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_else(|| "unknown location".into());
        // Only with RUST_BACKTRACE=1 (or RUST_LIB_BACKTRACE=1).
        let backtrace = std::backtrace::Backtrace::capture();
        let backtrace = match backtrace.status() {
            std::backtrace::BacktraceStatus::Captured => Some(backtrace.to_string()),
            _ => None,
        };
        let first = claim_exit(PANIC_EXIT);
        if thread == LOG_WRITER_THREAD {
            // The thread that would write a log line is this one: straight
            // to stderr, and no flush (it would wait for this thread).
            let _ = writeln!(
                std::io::stderr(),
                "cocos-manager: panic in thread '{thread}' at {location}: {message}; \
                 the manager exits (status {PANIC_EXIT}), VMs keep running{}",
                backtrace.map(|b| format!("\n{b}")).unwrap_or_default()
            );
        } else {
            error!(
                thread = %thread,
                location = %location,
                "panic: {message}; the manager exits (status {PANIC_EXIT}) to be restarted, VMs keep running"
            );
            if let Some(backtrace) = backtrace {
                error!("backtrace of the panic:\n{backtrace}");
            }
        }
        if first {
            exit(PANIC_EXIT, thread != LOG_WRITER_THREAD);
        }
        park_forever();
    }));
}

/// From now on an essential actor that stops ends the process.
pub fn arm() {
    ARMED.store(true, Ordering::SeqCst);
}

/// An orderly end begins: actors stopping now is expected.
pub fn disarm() {
    ARMED.store(false, Ordering::SeqCst);
}

/// Called from the `stopped` hook of an essential actor (`Supervisor`,
/// `ZombieReaper`, `PortAllocator`, `Measurer`).
pub fn essential_stopped(actor: &str) {
    if !ARMED.load(Ordering::SeqCst) {
        debug!(actor, "actor stopped");
        return;
    }
    let first = claim_exit(ACTOR_STOPPED_EXIT);
    error!(
        actor,
        "essential actor {actor} stopped; the manager exits (status {ACTOR_STOPPED_EXIT}) to be restarted, VMs keep running"
    );
    if first {
        exit(ACTOR_STOPPED_EXIT, true);
    }
    park_forever();
}

/// Flushes the log at an orderly end.
pub fn flush_log() {
    drop(LOG_GUARD.lock().unwrap_or_else(|e| e.into_inner()).take());
}

/// True for the first caller. It also starts a timer that ends the process
/// with `code` should logging or flushing hang.
fn claim_exit(code: i32) -> bool {
    if EXITING.swap(true, Ordering::SeqCst) {
        return false;
    }
    let _ = std::thread::Builder::new()
        .name("cocos-exit-timer".into())
        .spawn(move || {
            std::thread::sleep(LAST_RESORT);
            let _ = writeln!(
                std::io::stderr(),
                "cocos-manager: the log did not flush within {LAST_RESORT:?}; exiting (status {code})"
            );
            // SAFETY: _exit only ends the process.
            unsafe { libc::_exit(code) }
        });
    true
}

fn exit(code: i32, flush: bool) -> ! {
    if flush {
        flush_log();
    }
    let _ = std::io::stderr().flush();
    std::process::exit(code)
}

/// Another thread owns the exit; this one waits for it.
fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic payload that is not text)".into()
    }
}
