//! The `ZombieReaper`: the one place in the program that starts and waits
//! for child processes. It owns SIGCHLD. Starting children here too means
//! no other code can race it for an exit status (std's `spawn` waits on a
//! child whose exec failed; a `waitpid(-1)` elsewhere would steal that).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use actix::prelude::*;
use cocos_core::privilege::DropPlan;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::{debug, error, info, warn};

use crate::process::{pidfd_open, ExitStatus};
use crate::signals::SignalPipe;
use crate::spawn;

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

/// Start a program as another user, with extra descriptors: `fds[i]` is
/// descriptor `3 + i` in the child (the sockets and files a process that
/// cannot open them itself is handed).
#[derive(Message)]
#[rtype(result = "io::Result<Spawned>")]
pub struct SpawnAs {
    pub spawn: Spawn,
    /// Who the child becomes between fork and exec (`None`: the manager).
    pub user: Option<DropPlan>,
    pub fds: Vec<OwnedFd>,
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
        self.start(msg, None, Vec::new())
    }
}

impl Handler<SpawnAs> for ZombieReaper {
    type Result = io::Result<Spawned>;

    fn handle(&mut self, msg: SpawnAs, _ctx: &mut Self::Context) -> Self::Result {
        self.start(msg.spawn, msg.user, msg.fds)
    }
}

/// The descriptor number the first of `SpawnAs::fds` gets in the child.
pub const FIRST_PASSED_FD: RawFd = crate::spawn::FIRST_PASSED_FD;

impl ZombieReaper {
    fn start(
        &mut self,
        msg: Spawn,
        user: Option<DropPlan>,
        fds: Vec<OwnedFd>,
    ) -> io::Result<Spawned> {
        let stdin = File::open("/dev/null")?;
        // Copies numbered above every target, so that putting one in place
        // cannot overwrite another; close-on-exec, so none leaks.
        let above = FIRST_PASSED_FD + fds.len() as RawFd;
        let copies = fds
            .iter()
            .map(|fd| {
                // SAFETY: F_DUPFD_CLOEXEC on a descriptor we hold returns a new one or -1.
                let copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, above) };
                if copy < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: the kernel just gave us this descriptor.
                Ok(unsafe { OwnedFd::from_raw_fd(copy) })
            })
            .collect::<io::Result<Vec<OwnedFd>>>()?;
        drop(fds);
        let passed: Vec<RawFd> = copies.iter().map(AsRawFd::as_raw_fd).collect();
        let user = user.map(|plan| (plan.uid, plan.gid, plan.groups));
        let pid = spawn::spawn(&spawn::Plan {
            argv: &msg.argv,
            stdio: [
                stdin.as_raw_fd(),
                msg.output.as_raw_fd(),
                msg.output.as_raw_fd(),
            ],
            passed: &passed,
            user: user
                .as_ref()
                .map(|(u, g, groups)| (*u, *g, groups.as_slice())),
        })?;
        // The child has its own copies now.
        drop(copies);
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
                    let watched = self.watched.remove(&pid);
                    crate::metrics::reaped(watched.is_some());
                    match watched {
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
