//! The few system calls std does not offer: a signalfd (so signals arrive
//! as readable events in the one poll loop, with the sender's pid), resource
//! limits, and dying by a signal.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::faults::CrashSignal;

/// A caught signal and who sent it (0: the kernel).
#[derive(Debug, Clone, Copy)]
pub struct Caught {
    pub signo: i32,
    pub pid: i32,
}

/// Signals delivered through a file descriptor instead of a handler.
pub struct Signals {
    fd: OwnedFd,
}

impl Signals {
    /// Blocks `catch` and reads them from a non-blocking signalfd; sets
    /// `ignore` to SIG_IGN.
    pub fn new(catch: &[i32], ignore: &[i32]) -> io::Result<Signals> {
        // SAFETY: plain libc calls on a zeroed sigset_t we own; the returned
        // descriptor is checked and then owned by OwnedFd.
        unsafe {
            for &signo in ignore {
                if libc::signal(signo, libc::SIG_IGN) == libc::SIG_ERR {
                    return Err(io::Error::last_os_error());
                }
            }
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for &signo in catch {
                libc::sigaddset(&mut set, signo);
            }
            if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Signals {
                fd: OwnedFd::from_raw_fd(fd),
            })
        }
    }

    /// The next pending signal, if any.
    pub fn next(&self) -> Option<Caught> {
        // SAFETY: reads at most size_of::<signalfd_siginfo>() bytes into a
        // zeroed struct of exactly that size.
        unsafe {
            let mut info: libc::signalfd_siginfo = std::mem::zeroed();
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            let n = libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            );
            (n == size as isize).then_some(Caught {
                signo: info.ssi_signo as i32,
                pid: info.ssi_pid as i32,
            })
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Raises the soft limit of open files to the hard one (at most 65536), so
/// one instance can hold many HTTP connections.
pub fn raise_nofile_limit() {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            let want = lim.rlim_max.min(65536);
            if lim.rlim_cur < want {
                lim.rlim_cur = want;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
    }
}

/// Leaves one orphan: a child that forks a grandchild and exits at once
/// (reaped here), so the grandchild is re-parented to the nearest child
/// subreaper above us (the manager); it exits after `linger`. Called at
/// start, before any thread or descriptor of the VM exists.
pub fn leave_orphan(linger: Duration) -> io::Result<()> {
    let pause = libc::timespec {
        tv_sec: linger.as_secs() as libc::time_t,
        tv_nsec: linger.subsec_nanos() as libc::c_long,
    };
    // SAFETY: between fork and _exit the children call only
    // async-signal-safe functions (fork, nanosleep, _exit) on data made
    // before the fork; the parent waits for its own child.
    unsafe {
        match libc::fork() {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                if libc::fork() == 0 {
                    libc::nanosleep(&pause, std::ptr::null_mut());
                }
                libc::_exit(0)
            }
            child => {
                let mut status = 0;
                while libc::waitpid(child, &mut status, 0) < 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EINTR) {
                        return Err(e);
                    }
                }
                Ok(())
            }
        }
    }
}

/// Dies abnormally, without a core file.
pub fn crash(how: CrashSignal) -> ! {
    // SAFETY: setrlimit on a struct we own; resetting a disposition to
    // SIG_DFL and signalling ourselves.
    unsafe {
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &none);
        match how {
            CrashSignal::Abort => {}
            CrashSignal::Kill => {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            CrashSignal::Segv => {
                // Rust's own SIGSEGV handler would swallow a sent signal.
                libc::signal(libc::SIGSEGV, libc::SIG_DFL);
                libc::kill(libc::getpid(), libc::SIGSEGV);
            }
        }
    }
    std::process::abort()
}

/// The command name QEMU reports for a signal's sender.
pub fn process_name(pid: i32) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let first = cmdline.split(|&b| b == 0).next()?;
    (!first.is_empty()).then(|| String::from_utf8_lossy(first).into_owned())
}
