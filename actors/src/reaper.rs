//! The `ZombieReaper`: the one place in the program that starts and waits
//! for child processes. It owns SIGCHLD. Starting children here too means
//! no other code can race it for an exit status (std's `spawn` waits on a
//! child whose exec failed; a `waitpid(-1)` elsewhere would steal that).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use actix::prelude::*;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::{debug, error, info, warn};

use crate::process::{pidfd_open, ExitStatus};
use crate::signals::SignalPipe;

/// Sent to whoever asked for a child when that child has been reaped.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct ChildExited {
    pub pid: i32,
    pub status: ExitStatus,
}

/// Start a program. Its stdout and stderr go to `output`.
#[derive(Message)]
#[rtype(result = "io::Result<Spawned>")]
pub struct Spawn {
    pub argv: Vec<String>,
    pub output: File,
    pub notify: Recipient<ChildExited>,
}

pub struct Spawned {
    pub pid: i32,
    pub pidfd: OwnedFd,
    /// Who it is (read from /proc here, on the reaper's own thread); `None`
    /// if it already vanished.
    pub identity: Option<crate::process::Identity>,
}

/// How many children are being watched (for tests and metrics).
#[derive(Message)]
#[rtype(result = "usize")]
pub struct WatchedCount;

#[derive(Message)]
#[rtype(result = "()")]
struct ReapNow;

#[derive(Default)]
pub struct ZombieReaper {
    watched: HashMap<i32, Recipient<ChildExited>>,
}

impl Actor for ZombieReaper {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Orphans of our children (QEMU helpers, sudo) come to us to be reaped.
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            warn!(error = %e, "could not become a child subreaper");
        }
        match install_sigchld(ctx.address()) {
            Ok(()) => debug!("SIGCHLD handler installed"),
            Err(e) => error!(error = %e, "cannot watch SIGCHLD; exited VMs will not be noticed"),
        }
        // Children that ended before the handler was in place.
        ctx.address().do_send(ReapNow);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        crate::failfast::essential_stopped("ZombieReaper");
    }
}

fn install_sigchld(addr: Addr<ZombieReaper>) -> io::Result<()> {
    let mut pipe = SignalPipe::register(signal_hook::consts::SIGCHLD)?;
    actix::spawn(async move {
        loop {
            match pipe.recv().await {
                Ok(()) => addr.do_send(ReapNow),
                Err(e) => {
                    error!(error = %e, "SIGCHLD pipe failed");
                    break;
                }
            }
        }
    });
    Ok(())
}

impl Handler<Spawn> for ZombieReaper {
    type Result = io::Result<Spawned>;

    fn handle(&mut self, msg: Spawn, _ctx: &mut Self::Context) -> Self::Result {
        let (program, args) = msg
            .argv
            .split_first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command line"))?;
        let stderr = msg.output.try_clone()?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(msg.output)
            .stderr(stderr)
            // Its own process group: a Ctrl-C meant for the manager must not
            // reach the VMs.
            .process_group(0)
            .spawn()?;
        let pid = child.id() as i32;
        // Dropping a std Child neither kills nor waits; we own its exit.
        drop(child);
        let pidfd = pidfd_open(pid)?;
        self.watched.insert(pid, msg.notify);
        let identity = crate::process::identify(pid);
        Ok(Spawned {
            pid,
            pidfd,
            identity,
        })
    }
}

impl Handler<WatchedCount> for ZombieReaper {
    type Result = usize;

    fn handle(&mut self, _: WatchedCount, _ctx: &mut Self::Context) -> usize {
        self.watched.len()
    }
}

impl Handler<ReapNow> for ZombieReaper {
    type Result = ();

    fn handle(&mut self, _: ReapNow, _ctx: &mut Self::Context) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(status) => {
                    let Some((pid, exit)) = ExitStatus::from_wait(status) else {
                        continue;
                    };
                    match self.watched.remove(&pid) {
                        Some(notify) => notify.do_send(ChildExited { pid, status: exit }),
                        None => info!(pid, status = %exit, "reaped an orphaned process"),
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::ECHILD) => break,
                Err(e) => {
                    error!(error = %e, "waitpid failed");
                    break;
                }
            }
        }
    }
}
