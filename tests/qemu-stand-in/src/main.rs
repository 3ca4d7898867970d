//! # qemu-stand-in — a TEST DOUBLE for `qemu-system-x86_64`
//!
//! This is not QEMU and runs no guest. It takes the argv cocos-manager gives
//! QEMU and behaves, from the outside, like a QEMU whose guest booted at
//! once: it checks the files QEMU would open, binds the `hostfwd` port and
//! answers there as the guest agent does (`/health`, `/env`, `/certs`,
//! `/poweroff`), serves QMP on the `-mon ...,mode=control` chardev socket
//! and writes a short boot log to the `-serial` chardev socket. Fault
//! injection comes from `STAND_IN_*` environment variables (see `--help`).
//!
//! It exists for load and fault tests of hundreds to thousands of VMs on a
//! small machine: one thread, one epoll set, no busy loop, ~1-2 MiB RSS.
//! Run the manager with `MANAGER_QEMU_BIN_PATH=target/release/qemu-stand-in`.

mod faults;
mod http;
mod opts;
mod qmp;
mod sys;
mod vm;

use std::io::Write;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use faults::Faults;
use opts::{Action, QEMU};

const HELP: &str = "\
qemu-stand-in: a TEST DOUBLE for qemu-system-x86_64. It is NOT QEMU and runs no guest.

It exists to load- and fault-test cocos-manager with many VMs on a small machine:
run the manager with MANAGER_QEMU_BIN_PATH=target/release/qemu-stand-in.

usage: qemu-stand-in [QEMU options as cocos-manager passes them]

What it acts on (every other option is accepted and ignored):
  -kernel F, -initrd F, -bios F, -drive if=pflash,file=F
                       must exist, else QEMU's error line and exit 1
  -netdev user,id=N,hostfwd=tcp:[ADDR]:PORT-[GADDR]:GPORT
                       binds ADDR:PORT (empty ADDR: 0.0.0.0) and answers as the
                       guest agent: GET /health, /env, /certs, /poweroff
  -chardev socket,id=X,path=P,server=on,wait=off -mon chardev=X,mode=control
                       (or -qmp unix:P,server=on,wait=off) QMP on P: greeting,
                       qmp_capabilities, query-status, query-version, query-name,
                       system_powerdown, stop, cont, quit
  -chardev socket,id=Y,path=C,server=on,wait=off -serial chardev:Y
                       a console socket with a short boot log
  -fsdev local,id=..,path=D + -device virtio-9p-pci,fsdev=..,mount_tag=certs_share|env_share
                       the directories /certs and /env read from
  -name NAME, -append CMDLINE, -monitor pty, -S
  -version, --version, -help, --help

Fault injection (environment):
";

fn main() {
    let started = Instant::now();
    let mut args = Vec::new();
    for (i, arg) in std::env::args_os().skip(1).enumerate() {
        match arg.into_string() {
            Ok(arg) => args.push(arg),
            Err(_) => die(&format!("qemu-stand-in: argument {} is not UTF-8", i + 1)),
        }
    }
    let plan = match opts::parse(&args) {
        Ok(Action::Help) => {
            say(&format!("{HELP}{}", faults::HELP));
            std::process::exit(0)
        }
        Ok(Action::Version) => {
            say("QEMU emulator version 7.2.0 (qemu-stand-in test double)\n\
                 This is qemu-stand-in, a test double for cocos-manager, not QEMU.\n");
            std::process::exit(0)
        }
        Ok(Action::Run(plan)) => plan,
        Err(line) => die(&line),
    };
    let faults = Faults::from_env().unwrap_or_else(|line| die(&line));
    if let Some(message) = &faults.fail_at_start {
        die(&format!("{QEMU}: {message}"));
    }
    if faults.orphan {
        if let Err(e) = sys::leave_orphan(std::time::Duration::from_millis(200)) {
            die(&format!("qemu-stand-in: cannot leave an orphan: {e}"));
        }
    }
    if plan.monitor_pty {
        say("char device redirected to /dev/pts/0 (label compat_monitor0)\n");
    }
    for needed in &plan.needed {
        let problem = match std::fs::metadata(&needed.path) {
            Ok(meta) if meta.is_dir() => Some("Is a directory".to_string()),
            Ok(_) => std::fs::File::open(&needed.path)
                .err()
                .map(|e| strerror(&e)),
            Err(e) => Some(strerror(&e)),
        };
        if let Some(problem) = problem {
            die(&format!("{QEMU}: {}", needed.error(&problem)));
        }
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let crashes = faults.crashes(u64::from(std::process::id()) << 32 ^ nanos);
    match vm::Vm::new(plan, faults, started, crashes) {
        Ok(vm) => vm.run(),
        Err(e) => die(&format!("qemu-stand-in: cannot set up: {e}")),
    }
}

/// A line to stderr (where QEMU reports errors); never panics.
pub fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn say(text: &str) {
    let mut out = std::io::stdout();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

fn die(line: &str) -> ! {
    report(line);
    std::process::exit(1)
}

/// An I/O error as C's strerror words it ("No such file or directory").
pub fn strerror(e: &std::io::Error) -> String {
    let mut text = e.to_string();
    if let Some(at) = text.rfind(" (os error ") {
        text.truncate(at);
    }
    text
}
