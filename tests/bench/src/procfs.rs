//! What the bench reads from /proc, and signals by pid.

use std::io;

use crate::BenchResult;

/// Resident memory of `pid` in KiB (`VmRSS` of /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> BenchResult<u64> {
    status_kib(pid, "VmRSS:")
}

/// Peak resident memory of `pid` in KiB (`VmHWM`).
pub fn hwm_kib(pid: u32) -> BenchResult<u64> {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, key: &str) -> BenchResult<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .ok_or_else(|| format!("no {key} in {path}"))?;
    let value = line[key.len()..]
        .split_whitespace()
        .next()
        .ok_or_else(|| format!("empty {key} in {path}"))?;
    Ok(value
        .parse()
        .map_err(|e| format!("bad {key} {value:?} in {path}: {e}"))?)
}

/// utime + stime of `pid` (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> BenchResult<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    parse_cpu_ticks(&stat).ok_or_else(|| format!("cannot parse {path}: {stat:?}").into())
}

/// Fields 14 and 15 of /proc/<pid>/stat; the command name (field 2) may hold
/// spaces and parentheses, so fields are counted from its closing `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(") ")?;
    let mut fields = rest.split_whitespace().skip(11); // rest starts at field 3
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// One counter of /proc/<pid>/io (`rchar`, `wchar`, ...): bytes passed to
/// read(2)/write(2) and friends, sockets included. `None` when the file is
/// not readable (another user's process, a non-dumpable one) or has no such
/// key.
pub fn io_counter(pid: u32, key: &str) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == key).then(|| v.trim().parse().ok())?
    })
}

/// The value of `key` in the environment `pid` started with; `None` when
/// it is not set or the file is not readable.
pub fn environ_var(pid: u32, key: &str) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ.split(|b| *b == 0).find_map(|entry| {
        let entry = String::from_utf8_lossy(entry);
        let (k, v) = entry.split_once('=')?;
        (k == key).then(|| v.to_string())
    })
}

/// Clock ticks per second (the unit of [`cpu_ticks`]).
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

/// Live processes (not zombies, not this bench) one of whose arguments
/// contains `needle`.
pub fn pids_with_arg_containing(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        // A zombie's cmdline is empty, so it never matches.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let matches = cmdline
            .split(|b| *b == 0)
            .any(|arg| String::from_utf8_lossy(arg).contains(needle));
        if matches {
            pids.push(pid);
        }
    }
    pids
}

/// Sends `signal` to `pid`; a process already gone is not an error.
pub fn signal(pid: u32, signal: i32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
    // SAFETY: kill(2) takes a pid and a signal number and touches no memory.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(err)
    }
}

/// SIGKILLs every process one of whose arguments contains `needle`;
/// returns how many were signalled.
pub fn kill_all_with_arg(needle: &str) -> usize {
    let pids = pids_with_arg_containing(needle);
    for pid in &pids {
        let _ = signal(*pid, libc::SIGKILL);
    }
    pids.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_of_a_stat_line() {
        let stat = "1234 (we ird) name) S 1 1234 1234 0 -1 4194560 500 0 0 0 \
                    17 4 0 0 20 0 3 0 100 1000 200 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(21));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id();
        assert!(rss_kib(me).expect("rss") > 0);
        cpu_ticks(me).expect("ticks");
        assert!(clock_ticks_per_sec() > 0);
        assert!(io_counter(me, "rchar").is_some());
        assert!(io_counter(me, "no-such-key").is_none());
        assert!(environ_var(me, "COCOS_BENCH_NO_SUCH_VARIABLE").is_none());
    }
}
