//! Starting a child process without copying the manager. `fork` copies the
//! page tables of the whole multi-threaded daemon and then makes every
//! thread's next write fault and copy a page (with TLB shootdowns across
//! cores); profiled under many creates, that was most of the daemon's CPU.
//! Like glibc's `posix_spawn` — which cannot drop privileges — this clones
//! with `CLONE_VM | CLONE_VFORK`: the child runs on its own small stack in
//! the manager's memory until it execs, and the calling thread waits for
//! that. The child then makes raw system calls only (no allocation, no
//! locks, no glibc wrapper that would act on the parent's threads, such as
//! `setresuid`'s broadcast to all threads), on data prepared here.
//!
//! Only the `ZombieReaper` calls this: it is the one place children are
//! started and waited for.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

/// What the child is and becomes.
pub struct Plan<'a> {
    pub argv: &'a [String],
    /// Descriptors for 0, 1 and 2.
    pub stdio: [RawFd; 3],
    /// Descriptors put at 3, 4, … (numbered above those targets).
    pub passed: &'a [RawFd],
    /// uid, gid, supplementary groups.
    pub user: Option<(libc::uid_t, libc::gid_t, &'a [libc::gid_t])>,
}

/// First descriptor number of `Plan::passed` in the child.
pub const FIRST_PASSED_FD: RawFd = 3;

/// The child's stack: it makes a few system calls, nothing more.
const CHILD_STACK: usize = 64 << 10;

/// The kernel's `struct sigaction` on x86_64 and aarch64.
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// Everything the child reads, made before the clone.
struct Child {
    program: CString,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    stdio: [RawFd; 3],
    passed: Vec<RawFd>,
    user: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    /// The errno of the step that failed, written by the child.
    error: AtomicI32,
}

/// The program's path: as given when it names a directory, else the first
/// executable `program` in `PATH` (as `execvp` and std's `Command` do).
fn resolve(program: &str) -> io::Result<PathBuf> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{program}: not found in PATH"),
            )
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a command-line argument or environment entry contains a NUL byte",
        )
    })
}

/// Starts the child; answers once it has exec'd (its pid), or with why it
/// could not (then it is gone and reaped).
pub fn spawn(plan: &Plan<'_>) -> io::Result<i32> {
    let program = plan
        .argv
        .first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command line"))?;
    let program = c_string(resolve(program)?.as_os_str().as_bytes())?;
    let args = plan
        .argv
        .iter()
        .map(|a| c_string(a.as_bytes()))
        .collect::<io::Result<Vec<_>>>()?;
    let env = std::env::vars_os()
        .map(|(k, v)| {
            let mut entry = k.into_vec();
            entry.push(b'=');
            entry.extend_from_slice(OsStr::as_bytes(&v));
            c_string(&entry)
        })
        .collect::<io::Result<Vec<_>>>()?;
    let pointers = |strings: &[CString]| {
        strings
            .iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect::<Vec<_>>()
    };
    let child = Child {
        program,
        argv: pointers(&args),
        envp: pointers(&env),
        stdio: plan.stdio,
        passed: plan.passed.to_vec(),
        user: plan.user.map(|(u, g, groups)| (u, g, groups.to_vec())),
        error: AtomicI32::new(0),
    };
    let mut stack = vec![0u8; CHILD_STACK];
    // The stack grows down from its end, 16-byte aligned.
    let top = (stack.as_mut_ptr() as usize + CHILD_STACK) & !15;

    // Every signal blocked while the child shares our memory: a handler
    // of ours must not run in it. The child unblocks once its dispositions
    // are the defaults.
    // SAFETY: sigset_t is plain data, filled by sigfillset.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to sigset_t values.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: `run_child` only reads `child` (alive until clone returns:
    // CLONE_VFORK suspends this thread until the child execs or exits) and
    // makes raw system calls; the stack is ours and unused by anyone else.
    let pid = unsafe {
        libc::clone(
            run_child,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &child as *const Child as *mut libc::c_void,
        )
    };
    let clone_error = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    drop(stack);
    if pid < 0 {
        return Err(clone_error);
    }
    match child.error.load(Ordering::SeqCst) {
        0 => Ok(pid),
        errno => {
            // It exited (127) without exec'ing: reap it here, where
            // children are waited for, so nothing else sees it.
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            Err(io::Error::from_raw_os_error(errno))
        }
    }
}

/// The child, between clone and exec: raw system calls on prepared data.
extern "C" fn run_child(arg: *mut libc::c_void) -> libc::c_int {
    /// Tells the parent why (errno) and ends the child at once.
    fn fail(child: &Child) -> ! {
        // SAFETY: reads this thread's errno.
        let errno = unsafe { *libc::__errno_location() };
        child.error.store(errno.max(1), Ordering::SeqCst);
        loop {
            // SAFETY: ends this process now (no atexit handlers, no flush).
            unsafe {
                libc::syscall(libc::SYS_exit, 127);
            }
        }
    }
    // SAFETY: `arg` is the `Child` the suspended parent thread keeps alive.
    let child = unsafe { &*(arg as *const Child) };
    // SAFETY (whole block): raw system calls with integer arguments or
    // pointers to data that lives in the suspended parent's frame.
    unsafe {
        // Handlers of ours back to the default (ignored signals stay
        // ignored across exec, as with fork; SIGPIPE, which Rust ignores,
        // goes back to the default as std's Command does).
        for signal in 1..65 {
            if signal == libc::SIGKILL || signal == libc::SIGSTOP {
                continue;
            }
            let mut current = KernelSigaction {
                handler: 0,
                flags: 0,
                restorer: 0,
                mask: 0,
            };
            if libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                std::ptr::null::<KernelSigaction>(),
                &mut current as *mut KernelSigaction,
                8,
            ) != 0
            {
                continue;
            }
            if current.handler != libc::SIG_IGN || signal == libc::SIGPIPE {
                let default = KernelSigaction {
                    handler: libc::SIG_DFL,
                    flags: 0,
                    restorer: 0,
                    mask: 0,
                };
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    signal,
                    &default as *const KernelSigaction,
                    std::ptr::null_mut::<KernelSigaction>(),
                    8,
                );
            }
        }
        // Its own process group: a Ctrl-C meant for the manager must not
        // reach the VMs.
        if libc::syscall(libc::SYS_setpgid, 0, 0) != 0 {
            fail(child);
        }
        for (target, fd) in child.stdio.iter().enumerate() {
            let target = target as libc::c_int;
            let placed = if *fd == target {
                // Already there: only its close-on-exec flag goes.
                libc::syscall(libc::SYS_fcntl, *fd, libc::F_SETFD, 0)
            } else {
                libc::syscall(libc::SYS_dup3, *fd, target, 0)
            };
            if placed < 0 {
                fail(child);
            }
        }
        for (i, fd) in child.passed.iter().enumerate() {
            // dup2's copy is not close-on-exec: it survives the exec.
            if libc::syscall(libc::SYS_dup3, *fd, FIRST_PASSED_FD + i as RawFd, 0) < 0 {
                fail(child);
            }
        }
        if let Some((uid, gid, groups)) = &child.user {
            // Groups, then the gid, then the uid: each step needs the
            // privilege the next gives up. Raw calls change this process
            // alone (glibc's wrappers would change the manager's threads).
            if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0
                || libc::syscall(libc::SYS_setresgid, *gid, *gid, *gid) != 0
                || libc::syscall(libc::SYS_setresuid, *uid, *uid, *uid) != 0
            {
                fail(child);
            }
            // No way back: a process that could become root again is not
            // what the plan said.
            if *uid != 0 && libc::syscall(libc::SYS_setuid, 0) == 0 {
                *libc::__errno_location() = libc::EPERM;
                fail(child);
            }
            // Neither setuid binaries nor file capabilities can raise it
            // again (QEMU's seccomp sandbox relies on it too).
            if libc::syscall(libc::SYS_prctl, libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                fail(child);
            }
        }
        let empty: u64 = 0;
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty as *const u64,
            std::ptr::null_mut::<u64>(),
            8,
        );
        libc::syscall(
            libc::SYS_execve,
            child.program.as_ptr(),
            child.argv.as_ptr(),
            child.envp.as_ptr(),
        );
    }
    fail(child)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_in_path() {
        assert_eq!(resolve("/bin/sh").expect("path"), PathBuf::from("/bin/sh"));
        assert!(resolve("sh").expect("in PATH").ends_with("sh"));
        let missing = resolve("no-such-program-here").expect_err("missing");
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn nul_bytes_are_refused() {
        assert_eq!(
            c_string(b"a\0b").expect_err("NUL").kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
