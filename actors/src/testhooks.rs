//! Test hooks, compiled only with the cargo feature `test-hooks` (never in a
//! release build: `cargo build --release` leaves it off). They let the
//! fail-fast tests (`tests/fail_fast.rs`) provoke a panic in each actor and
//! wedge the supervisor.
//!
//! `COCOS_TEST_HOOK=<action>:<target>` is read at start; each SIGUSR1 then
//! carries it out once:
//!
//! - `panic:supervisor`, `panic:reaper`, `panic:ports`, `panic:measurer`,
//!   `panic:cvm` (every `CvmActor`): a `Panic` message, handled by a panic
//!   inside that actor;
//! - `panic:task`: a panic in a tokio task on the runtime that serves gRPC
//!   and HTTP (where the front's request handlers run);
//! - `panic:blocking`: a panic on tokio's blocking pool;
//! - `panic:thread`: a panic on a plain thread;
//! - `panic:log-writer`: the next log line panics in the log writer's thread;
//! - `stop:supervisor`, `stop:reaper`, `stop:ports`, `stop:measurer`: the
//!   actor stops (`ctx.stop()`) without a panic;
//! - `wedge:supervisor`: the supervisor stops handling messages (it waits on
//!   a future that never completes) while its thread runs on.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use actix::prelude::*;
use tracing::{error, info};

use crate::attest::Measurer;
use crate::cvm::CvmActor;
use crate::ports::PortAllocator;
use crate::reaper::ZombieReaper;
use crate::signals::SignalPipe;
use crate::supervisor::Supervisor;

pub const ENV: &str = "COCOS_TEST_HOOK";

/// Panic in the handler, naming the actor.
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct Panic(pub &'static str);

/// Stop the actor without a panic.
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct StopActor;

/// Stop handling messages, for good, without blocking the thread.
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct Wedge;

/// Sent to the supervisor: a `Panic` to every `CvmActor`.
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct PanicVms;

/// The addresses the hooks reach.
pub struct Targets {
    pub supervisor: Addr<Supervisor>,
    pub reaper: Addr<ZombieReaper>,
    pub ports: Addr<PortAllocator>,
    pub measurer: Addr<Measurer>,
}

/// Arms the hook named by `$COCOS_TEST_HOOK` on SIGUSR1. An unknown hook is
/// an error: a test that asks for one must not silently get none.
pub fn install(targets: Targets) -> Result<(), String> {
    let Ok(hook) = std::env::var(ENV) else {
        return Ok(());
    };
    if !KNOWN.contains(&hook.as_str()) {
        return Err(format!(
            "unknown {ENV}={hook:?}; known: {}",
            KNOWN.join(", ")
        ));
    }
    let mut pipe = SignalPipe::register(signal_hook::consts::SIGUSR1)
        .map_err(|e| format!("cannot watch SIGUSR1: {e}"))?;
    info!(hook, "test hook armed: SIGUSR1 fires it");
    actix::spawn(async move {
        while pipe.recv().await.is_ok() {
            info!(hook, "test hook fired");
            fire(&hook, &targets);
        }
    });
    Ok(())
}

const KNOWN: &[&str] = &[
    "panic:supervisor",
    "panic:reaper",
    "panic:ports",
    "panic:measurer",
    "panic:cvm",
    "panic:task",
    "panic:blocking",
    "panic:thread",
    "panic:log-writer",
    "stop:supervisor",
    "stop:reaper",
    "stop:ports",
    "stop:measurer",
    "wedge:supervisor",
];

fn fire(hook: &str, t: &Targets) {
    match hook {
        "panic:supervisor" => t.supervisor.do_send(Panic("Supervisor")),
        "panic:reaper" => t.reaper.do_send(Panic("ZombieReaper")),
        "panic:ports" => t.ports.do_send(Panic("PortAllocator")),
        "panic:measurer" => t.measurer.do_send(Panic("Measurer")),
        "panic:cvm" => t.supervisor.do_send(PanicVms),
        "panic:task" => {
            tokio::spawn(async {
                panic!("test hook: panic in a tokio task of the front's runtime")
            });
        }
        "panic:blocking" => {
            tokio::task::spawn_blocking(|| panic!("test hook: panic on tokio's blocking pool"));
        }
        "panic:thread" => {
            let _ = std::thread::Builder::new()
                .name("cocos-test-hook".into())
                .spawn(|| panic!("test hook: panic on a plain thread"));
        }
        "panic:log-writer" => {
            PANIC_IN_LOG_WRITER.store(true, Ordering::SeqCst);
            error!("test hook: this line makes the log writer panic");
        }
        "stop:supervisor" => t.supervisor.do_send(StopActor),
        "stop:reaper" => t.reaper.do_send(StopActor),
        "stop:ports" => t.ports.do_send(StopActor),
        "stop:measurer" => t.measurer.do_send(StopActor),
        "wedge:supervisor" => t.supervisor.do_send(Wedge),
        _ => {}
    }
}

macro_rules! panic_and_stop {
    ($($actor:ty),*) => {$(
        impl Handler<Panic> for $actor {
            type Result = ();

            fn handle(&mut self, msg: Panic, _ctx: &mut Self::Context) {
                panic!("test hook: panic in {}", msg.0);
            }
        }

        impl Handler<StopActor> for $actor {
            type Result = ();

            fn handle(&mut self, _: StopActor, ctx: &mut Self::Context) {
                info!(actor = stringify!($actor), "test hook: stopping the actor");
                ctx.stop();
            }
        }
    )*};
}

panic_and_stop!(Supervisor, ZombieReaper, PortAllocator, Measurer);

impl Handler<Panic> for CvmActor {
    type Result = ();

    fn handle(&mut self, msg: Panic, _ctx: &mut Self::Context) {
        panic!("test hook: panic in {}", msg.0);
    }
}

impl Handler<Wedge> for Supervisor {
    type Result = ();

    fn handle(&mut self, _: Wedge, ctx: &mut Self::Context) {
        info!("test hook: the supervisor stops handling messages");
        ctx.wait(futures::future::pending::<()>().into_actor(self));
    }
}

static PANIC_IN_LOG_WRITER: AtomicBool = AtomicBool::new(false);

/// The log's writer in a test-hook build: panics once `panic:log-writer`
/// fired (on the log writer's thread, which is the one that writes).
pub struct LogWriter<W>(pub W);

impl<W: Write> Write for LogWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if PANIC_IN_LOG_WRITER.load(Ordering::SeqCst) {
            panic!("test hook: panic in the log writer");
        }
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}
