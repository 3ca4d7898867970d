//! Process identity helpers: pidfds, so that a signal can never reach a
//! process that merely reused a VM's pid, and exit statuses in words.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use cocos_core::config::Config;
use cocos_core::privilege::{self, DropPlan, PrivilegeError, UserFacts};
use cocos_core::record::start_time_from_stat;
use std::ffi::CString;

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

/// When a process started, from its start time in clock ticks after boot
/// (`Identity::start_time`) and the boot time in `/proc/stat`.
pub fn started_at(start_ticks: u64) -> Option<std::time::SystemTime> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let boot: u64 = stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf reads a constant of the system; no memory is shared.
    let ticks = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()
        .filter(|t| *t > 0)?;
    let after_boot = std::time::Duration::from_millis(start_ticks.saturating_mul(1000) / ticks);
    std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(boot) + after_boot)
}

/// The system's entry for user `name` (getpwnam_r, getgrouplist); None if
/// there is no such user.
pub fn lookup_user(name: &str) -> io::Result<Option<UserFacts>> {
    let Ok(cname) = CString::new(name) else {
        return Ok(None);
    };
    let mut buf = vec![0u8; 16 << 10];
    // SAFETY: passwd is plain data; getpwnam_r fills it with pointers into
    // `buf`, which outlives every use below.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    loop {
        // SAFETY: all pointers are valid for the sizes given.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        match rc {
            0 => break,
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
    if found.is_null() {
        return Ok(None);
    }
    let (uid, gid) = (pwd.pw_uid, pwd.pw_gid);
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut count = groups.len() as libc::c_int;
        // SAFETY: `groups` holds `count` entries; the call writes at most
        // that many and says how many there are.
        let rc =
            unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        if rc >= 0 {
            groups.truncate(usize::try_from(count).unwrap_or(0));
            break;
        }
        if groups.len() >= 1 << 16 {
            return Err(io::Error::other(format!(
                "user {name} is in too many groups"
            )));
        }
        let want = usize::try_from(count).unwrap_or(0);
        groups.resize(want.max(groups.len() * 2), 0);
    }
    Ok(Some(UserFacts { uid, gid, groups }))
}

/// The id of group `name` (getgrnam_r); None if there is no such group.
pub fn lookup_group(name: &str) -> io::Result<Option<u32>> {
    let Ok(cname) = CString::new(name) else {
        return Ok(None);
    };
    group_entry(|grp, buf, len, found| {
        // SAFETY: forwarded from group_entry, which owns the buffers.
        unsafe { libc::getgrnam_r(cname.as_ptr(), grp, buf, len, found) }
    })
}

/// Whether the system knows a group with id `gid` (getgrgid_r).
pub fn group_exists(gid: u32) -> bool {
    group_entry(|grp, buf, len, found| {
        // SAFETY: forwarded from group_entry, which owns the buffers.
        unsafe { libc::getgrgid_r(gid, grp, buf, len, found) }
    })
    .map(|g| g.is_some())
    // When the database cannot be read, assume taken: a per-VM group must
    // never be one that means something else.
    .unwrap_or(true)
}

fn group_entry(
    mut call: impl FnMut(
        *mut libc::group,
        *mut libc::c_char,
        libc::size_t,
        *mut *mut libc::group,
    ) -> libc::c_int,
) -> io::Result<Option<u32>> {
    let mut buf = vec![0u8; 16 << 10];
    // SAFETY: group is plain data, filled by the call with pointers into buf.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    loop {
        let rc = call(&mut grp, buf.as_mut_ptr().cast(), buf.len(), &mut found);
        match rc {
            0 => break,
            libc::ERANGE if buf.len() < 1 << 22 => buf.resize(buf.len() * 4, 0),
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
    Ok((!found.is_null()).then_some(grp.gr_gid))
}

/// The manager's effective user id.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Who QEMU and its helpers run as under `config`: looked up now, so a
/// user created (or removed) since the start counts. `Ok(None)`: as the
/// manager.
pub fn qemu_drop_plan(config: &Config) -> Result<Option<DropPlan>, PrivilegeError> {
    if config.qemu_user.is_empty() {
        return Ok(None);
    }
    let lookup = |e: io::Error| PrivilegeError::Lookup(e.to_string());
    let user = lookup_user(&config.qemu_user).map_err(lookup)?;
    let group = if config.qemu_group.is_empty() {
        None
    } else {
        lookup_group(&config.qemu_group).map_err(lookup)?
    };
    privilege::plan(
        &config.qemu_user,
        &config.qemu_group,
        euid(),
        user.as_ref(),
        group,
    )
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
