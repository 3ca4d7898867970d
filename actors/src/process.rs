//! Process identity helpers: pidfds, so that a signal can never reach a
//! process that merely reused a VM's pid, and exit statuses in words.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use cocos_core::record::start_time_from_stat;

use nix::sys::wait::WaitStatus;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
    /// A process that was not our child (re-adopted after a manager
    /// restart): it ended, but only its parent could learn how.
    Unknown,
}

impl ExitStatus {
    pub fn from_wait(status: WaitStatus) -> Option<(i32, ExitStatus)> {
        match status {
            WaitStatus::Exited(pid, code) => Some((pid.as_raw(), ExitStatus::Exited(code))),
            WaitStatus::Signaled(pid, sig, _) => {
                Some((pid.as_raw(), ExitStatus::Signaled(sig as i32)))
            }
            _ => None,
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Exited(code) => write!(f, "exit status {code}"),
            ExitStatus::Unknown => write!(f, "exit status unknown (not our child)"),
            ExitStatus::Signaled(sig) => {
                let name = nix::sys::signal::Signal::try_from(*sig)
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|_| format!("signal {sig}"));
                write!(f, "killed by {name}")
            }
        }
    }
}

/// Opens a pidfd for `pid`. Done right after spawn, before the child can be
/// reaped, it names exactly that process for as long as we hold it.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sends `signal` through a pidfd. ESRCH (already gone) is not an error.
pub fn pidfd_signal(pidfd: &OwnedFd, signal: nix::sys::signal::Signal) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a valid fd, a signal number, no siginfo and no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal as i32,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(err);
    }
    Ok(())
}

/// Who a process is: enough to tell it from a later process with its pid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub start_time: u64,
    pub exe: PathBuf,
    pub cmdline: Vec<String>,
}

pub fn identify(pid: i32) -> Option<Identity> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let start_time = start_time_from_stat(&stat)?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    // An upgraded binary shows as "path (deleted)"; it is still the same one.
    let exe = PathBuf::from(
        exe.to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_string(),
    );
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(Identity {
        start_time,
        exe,
        cmdline,
    })
}

struct PidFdRef(Arc<OwnedFd>);

impl AsRawFd for PidFdRef {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Resolves when the process behind `pidfd` has ended. Works for processes
/// that are not our children, where SIGCHLD never comes.
pub async fn pidfd_exited(pidfd: Arc<OwnedFd>) -> io::Result<()> {
    // SAFETY: PidFdRef holds the OwnedFd through an Arc, so the descriptor
    // stays open and the same for as long as the AsyncFd lives.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            PidFdRef(pidfd),
            tokio::io::Interest::READABLE,
        )
    }
    .map_err(io::Error::from)?;
    let _guard = fd.readable().await?;
    Ok(())
}
