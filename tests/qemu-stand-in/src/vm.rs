//! The running "VM": one thread, one poll set. It serves the forwarded
//! port (the guest agent), the QMP socket and the console socket, and keeps
//! its timers (start delay, power-off, injected crash and panic, console
//! output) as poll timeouts, so an idle instance sleeps in `epoll_wait`.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use serde_json::Value;

use crate::faults::Faults;
use crate::http;
use crate::opts::{Plan, QEMU};
use crate::qmp::{self, Effect, RunState};
use crate::sys::{self, Caught, Signals};
use crate::{report, strerror};

const SIGNALS: Token = Token(0);
const QMP_LISTENER: Token = Token(1);
const QMP_CLIENT: Token = Token(2);
const CONSOLE_LISTENER: Token = Token(3);
const CONSOLE_CLIENT: Token = Token(4);
/// HTTP listeners are `HTTP_LISTENER + i`, connections `CONN + slot`.
const HTTP_LISTENER: usize = 16;
const CONN: usize = 1 << 16;

/// A connection that has not sent its request (or read the answer) by then
/// is closed, as the agent's `read -t 10`.
const HTTP_IDLE: Duration = Duration::from_secs(10);
const MAX_HEAD: usize = 16 * 1024;
const MAX_QMP_INPUT: usize = 1 << 20;
const MAX_QMP_OUTPUT: usize = 1 << 20;
const SPAM_TICK: Duration = Duration::from_millis(100);
/// Console output waiting for a slow reader; beyond it lines are dropped,
/// as a serial port without flow control would.
const CONSOLE_BUFFER: usize = 64 * 1024;
/// How long the last words (replies, SHUTDOWN) may take to leave at exit.
const FLUSH_AT_EXIT: Duration = Duration::from_millis(200);

enum Ending {
    Guest,
    Quit,
    Signal(Caught),
}

struct QmpClient {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    session: qmp::Session,
}

struct Console {
    stream: UnixStream,
    output: Vec<u8>,
}

struct Conn {
    stream: TcpStream,
    input: Vec<u8>,
    output: Vec<u8>,
    answered: bool,
    deadline: Instant,
}

pub struct Vm {
    plan: Plan,
    faults: Faults,
    poll: Poll,
    signals: Signals,
    started: Instant,
    /// Until then nothing is bound (the start delay).
    setup_at: Option<Instant>,
    qmp_listener: Option<UnixListener>,
    qmp: Option<QmpClient>,
    console_listener: Option<UnixListener>,
    console: Option<Console>,
    console_greeted: bool,
    http: Vec<TcpListener>,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    accept_stalled: bool,
    state: RunState,
    ending: Option<(Instant, Ending)>,
    crash_at: Option<Instant>,
    panic_at: Option<Instant>,
    spam_at: Option<Instant>,
    spam_budget: f64,
    spam_seq: u64,
}

impl Vm {
    pub fn new(plan: Plan, faults: Faults, started: Instant, crashes: bool) -> io::Result<Vm> {
        let poll = Poll::new()?;
        let mut catch = vec![libc::SIGINT, libc::SIGHUP];
        let mut ignore = vec![];
        if faults.ignore_sigterm {
            ignore.push(libc::SIGTERM);
        } else {
            catch.push(libc::SIGTERM);
        }
        let signals = Signals::new(&catch, &ignore)?;
        poll.registry().register(
            &mut SourceFd(&signals.raw_fd()),
            SIGNALS,
            Interest::READABLE,
        )?;
        sys::raise_nofile_limit();
        Ok(Vm {
            state: if plan.paused {
                RunState::Prelaunch
            } else {
                RunState::Running
            },
            setup_at: Some(started + faults.start_delay),
            crash_at: faults.crash_after.filter(|_| crashes).map(|d| started + d),
            panic_at: faults.panic_after.map(|d| started + d),
            plan,
            faults,
            poll,
            signals,
            started,
            qmp_listener: None,
            qmp: None,
            console_listener: None,
            console: None,
            console_greeted: false,
            http: Vec::new(),
            conns: Vec::new(),
            free: Vec::new(),
            accept_stalled: false,
            ending: None,
            spam_at: None,
            spam_budget: 0.0,
            spam_seq: 0,
        })
    }

    pub fn run(mut self) -> ! {
        let mut events = Events::with_capacity(128);
        loop {
            self.timers();
            let timeout = self
                .next_deadline()
                .map(|at| at.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.fail(&format!("qemu-stand-in: poll: {e}"));
                }
                continue;
            }
            for event in events.iter() {
                match event.token() {
                    SIGNALS => self.on_signal(),
                    QMP_LISTENER => self.accept_qmp(),
                    QMP_CLIENT => self.service_qmp(),
                    CONSOLE_LISTENER => self.accept_console(),
                    CONSOLE_CLIENT => self.service_console(),
                    Token(t) if t >= CONN => self.service_conn(t - CONN),
                    Token(t) if t >= HTTP_LISTENER => self.accept_http(t - HTTP_LISTENER),
                    Token(_) => {}
                }
            }
        }
    }

    // ----- time -----

    fn next_deadline(&self) -> Option<Instant> {
        let conns = self.conns.iter().flatten().map(|c| c.deadline);
        [
            self.setup_at,
            self.crash_at,
            self.panic_at,
            self.ending.as_ref().map(|(at, _)| *at),
            self.spam_at,
        ]
        .into_iter()
        .flatten()
        .chain(conns)
        .min()
    }

    fn timers(&mut self) {
        let now = Instant::now();
        let due = |at: Option<Instant>| at.is_some_and(|at| at <= now);
        if due(self.crash_at) {
            let after = self.started.elapsed();
            report(&format!(
                "qemu-stand-in: injected crash {after:.1?} after start (STAND_IN_CRASH_AFTER)"
            ));
            sys::crash(self.faults.crash_signal);
        }
        if due(self.setup_at) {
            self.setup_at = None;
            self.setup();
        }
        if due(self.panic_at) {
            self.panic_at = None;
            self.state = RunState::GuestPanicked;
            self.emit(&qmp::event(
                "GUEST_PANICKED",
                Some("{\"action\": \"pause\"}"),
            ));
            self.write_console(
                b"qemu-stand-in: Kernel panic - not syncing: injected (STAND_IN_PANIC_AFTER)\r\n",
            );
        }
        if self.ending.as_ref().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, ending)) = self.ending.take() {
                self.end(ending);
            }
        }
        if due(self.spam_at) {
            self.spam(now);
        }
        let expired: Vec<usize> = self
            .conns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.as_ref().is_some_and(|c| c.deadline <= now))
            .map(|(i, _)| i)
            .collect();
        for slot in expired {
            self.close_conn(slot);
        }
    }

    // ----- start and end -----

    /// Binds the forwarded ports, then the QMP and console sockets.
    fn setup(&mut self) {
        for (i, forward) in self.plan.forwards.clone().iter().enumerate() {
            let bound = TcpListener::bind(SocketAddr::new(forward.addr, forward.port));
            let mut listener = match bound {
                Ok(listener) => listener,
                Err(_) => self.fail(&format!(
                    "{QEMU}: {}: Could not set up host forwarding rule '{}'",
                    forward.option, forward.rule
                )),
            };
            if let Err(e) = self.poll.registry().register(
                &mut listener,
                Token(HTTP_LISTENER + i),
                Interest::READABLE,
            ) {
                self.fail(&format!("qemu-stand-in: poll: {e}"));
            }
            self.http.push(listener);
        }
        let path = self.plan.qmp.clone();
        let qmp = self.listen(&path, QMP_LISTENER);
        self.qmp_listener = Some(qmp);
        if let Some(path) = self.plan.console.clone() {
            let console = self.listen(&path, CONSOLE_LISTENER);
            self.console_listener = Some(console);
        }
    }

    fn listen(&mut self, path: &Path, token: Token) -> UnixListener {
        // A socket left by an earlier run would make bind fail.
        if std::fs::symlink_metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            let _ = std::fs::remove_file(path);
        }
        let mut listener = match UnixListener::bind(path) {
            Ok(listener) => listener,
            Err(e) => self.fail(&format!(
                "{QEMU}: Failed to bind socket to {}: {}",
                path.display(),
                strerror(&e)
            )),
        };
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut listener, token, Interest::READABLE)
        {
            self.fail(&format!("qemu-stand-in: poll: {e}"));
        }
        listener
    }

    fn on_signal(&mut self) {
        if let Some(caught) = self.signals.next() {
            self.end(Ending::Signal(caught));
        }
    }

    /// A clean end: QEMU's last words, SHUTDOWN to the QMP client, exit 0.
    fn end(&mut self, ending: Ending) -> ! {
        let data = match ending {
            Ending::Guest => qmp::shutdown_data(true, "guest-shutdown"),
            Ending::Quit => qmp::shutdown_data(false, "host-qmp-quit"),
            Ending::Signal(Caught { signo, pid }) => {
                if pid == 0 {
                    report(&format!("{QEMU}: terminating on signal {signo}"));
                } else {
                    let name = sys::process_name(pid);
                    report(&format!(
                        "{QEMU}: terminating on signal {signo} from pid {pid} ({})",
                        name.as_deref().unwrap_or("<unknown process>")
                    ));
                }
                qmp::shutdown_data(false, "host-signal")
            }
        };
        self.emit(&qmp::event("SHUTDOWN", Some(&data)));
        self.flush_at_exit();
        self.exit(0)
    }

    fn fail(&mut self, line: &str) -> ! {
        report(line);
        self.exit(1)
    }

    fn exit(&mut self, code: i32) -> ! {
        if self.qmp_listener.is_some() {
            let _ = std::fs::remove_file(&self.plan.qmp);
        }
        if let (Some(_), Some(path)) = (&self.console_listener, &self.plan.console) {
            let _ = std::fs::remove_file(path);
        }
        std::process::exit(code)
    }

    /// Gives pending replies a short while to leave before the process ends.
    fn flush_at_exit(&mut self) {
        let until = Instant::now() + FLUSH_AT_EXIT;
        loop {
            let mut pending = false;
            if let Some(q) = self.qmp.as_mut() {
                pending |= matches!(flush(&mut q.stream, &mut q.output), Ok(false));
            }
            for conn in self.conns.iter_mut().flatten() {
                if conn.answered {
                    pending |= matches!(flush(&mut conn.stream, &mut conn.output), Ok(false));
                }
            }
            if !pending || Instant::now() >= until {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    // ----- QMP -----

    /// Sends an event to the QMP client, if one has negotiated.
    fn emit(&mut self, line: &str) {
        if let Some(q) = self.qmp.as_mut().filter(|q| q.session.negotiated) {
            q.output.extend_from_slice(line.as_bytes());
            if flush(&mut q.stream, &mut q.output).is_err() {
                self.drop_qmp();
            }
        }
    }

    /// One client at a time; the others wait in the backlog.
    fn accept_qmp(&mut self) {
        if self.qmp.is_some() {
            return;
        }
        let Some(listener) = self.qmp_listener.as_ref() else {
            return;
        };
        loop {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    if self
                        .poll
                        .registry()
                        .register(
                            &mut stream,
                            QMP_CLIENT,
                            Interest::READABLE | Interest::WRITABLE,
                        )
                        .is_err()
                    {
                        continue;
                    }
                    let mut client = QmpClient {
                        stream,
                        input: Vec::new(),
                        output: qmp::GREETING.as_bytes().to_vec(),
                        session: qmp::Session::default(),
                    };
                    if flush(&mut client.stream, &mut client.output).is_ok() {
                        self.qmp = Some(client);
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(_) => return,
            }
        }
    }

    fn drop_qmp(&mut self) {
        if let Some(mut q) = self.qmp.take() {
            let _ = self.poll.registry().deregister(&mut q.stream);
        }
        self.accept_qmp();
    }

    fn service_qmp(&mut self) {
        let closed = match self.qmp.as_mut() {
            Some(q) => read_into(&mut q.stream, &mut q.input) || q.input.len() > MAX_QMP_INPUT,
            None => return,
        };
        loop {
            let Some(q) = self.qmp.as_mut() else {
                return;
            };
            let Some(input) = next_json(&mut q.input) else {
                break;
            };
            let vm = qmp::Vm {
                state: self.state,
                name: self.plan.name.as_deref(),
            };
            let (line, effect) = match input {
                Ok(value) => q.session.execute(&value, &vm),
                Err(desc) => (qmp::error("GenericError", &desc, None), Effect::Nothing),
            };
            q.output.extend_from_slice(line.as_bytes());
            self.apply(effect);
        }
        let failed = match self.qmp.as_mut() {
            // A client that sends commands but never reads the replies.
            Some(q) => {
                flush(&mut q.stream, &mut q.output).is_err() || q.output.len() > MAX_QMP_OUTPUT
            }
            None => false,
        };
        if closed || failed {
            self.drop_qmp();
        }
    }

    fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::Nothing => {}
            Effect::Quit => self.end(Ending::Quit),
            Effect::Powerdown => {
                // QEMU reports the ACPI request whether or not the guest acts.
                self.emit(&qmp::event("POWERDOWN", None));
                if !self.faults.ignore_powerdown {
                    self.power_off_in(self.faults.powerdown_delay);
                }
            }
            Effect::Stop => {
                if matches!(self.state, RunState::Running) {
                    self.state = RunState::Paused;
                    self.emit(&qmp::event("STOP", None));
                }
            }
            Effect::Cont => {
                if !matches!(self.state, RunState::Running) {
                    self.state = RunState::Running;
                    self.emit(&qmp::event("RESUME", None));
                }
            }
        }
    }

    /// The guest powers itself off after `delay`.
    fn power_off_in(&mut self, delay: Duration) {
        if self.ending.is_none() {
            self.ending = Some((Instant::now() + delay, Ending::Guest));
        }
    }

    // ----- console -----

    fn accept_console(&mut self) {
        if self.console.is_some() {
            return;
        }
        let Some(listener) = self.console_listener.as_ref() else {
            return;
        };
        loop {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    if self
                        .poll
                        .registry()
                        .register(
                            &mut stream,
                            CONSOLE_CLIENT,
                            Interest::READABLE | Interest::WRITABLE,
                        )
                        .is_err()
                    {
                        continue;
                    }
                    self.console = Some(Console {
                        stream,
                        output: Vec::new(),
                    });
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(_) => return,
            }
        }
        // The boot log goes to the first reader only; a reconnecting reader
        // sees what the guest prints from then on, as on a real serial port.
        if !self.console_greeted {
            self.console_greeted = true;
            let name = self.plan.name.as_deref().unwrap_or("(unnamed)");
            let mut boot = format!(
                "qemu-stand-in: booting VM {name}\r\n\
                 qemu-stand-in: this is a test double, not QEMU; no guest runs\r\n"
            );
            if let Some(append) = &self.plan.append {
                boot.push_str(&format!("qemu-stand-in: kernel command line: {append}\r\n"));
            }
            for forward in &self.plan.forwards {
                boot.push_str(&format!(
                    "qemu-stand-in: agent listening on {}\r\n",
                    forward.guest_port
                ));
            }
            self.write_console(boot.as_bytes());
        }
        if self.faults.console_spam > 0 {
            self.spam_at = Some(Instant::now() + SPAM_TICK);
        }
    }

    fn write_console(&mut self, bytes: &[u8]) {
        if let Some(c) = self.console.as_mut() {
            if c.output.len() + bytes.len() <= CONSOLE_BUFFER {
                c.output.extend_from_slice(bytes);
            }
            if flush(&mut c.stream, &mut c.output).is_err() {
                self.drop_console();
            }
        }
    }

    fn service_console(&mut self) {
        let Some(c) = self.console.as_mut() else {
            return;
        };
        // Input would go to the guest's serial port: nobody reads it.
        let mut sink = Vec::new();
        let closed = read_into(&mut c.stream, &mut sink);
        if closed || flush(&mut c.stream, &mut c.output).is_err() {
            self.drop_console();
        } else if self.spam_budget > 0.0 {
            self.spam_fill();
        }
    }

    fn drop_console(&mut self) {
        if let Some(mut c) = self.console.take() {
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
        self.spam_at = None;
        self.accept_console();
    }

    /// A tick of `STAND_IN_CONSOLE_SPAM`: a tenth of a second's worth of
    /// bytes more to write. A reader that falls behind is written to as fast
    /// as it reads; what it has not taken after a second is dropped.
    fn spam(&mut self, now: Instant) {
        if self.console.is_none() {
            self.spam_at = None;
            return;
        }
        let rate = self.faults.console_spam as f64;
        self.spam_budget = (self.spam_budget + rate * SPAM_TICK.as_secs_f64()).min(rate);
        let next = self.spam_at.map_or(now, |at| at + SPAM_TICK);
        // After a stall, do not try to catch up tick by tick.
        self.spam_at = Some(if next < now { now + SPAM_TICK } else { next });
        self.spam_fill();
    }

    /// Writes spam lines while there is budget and the reader takes them.
    fn spam_fill(&mut self) {
        let Some(c) = self.console.as_mut() else {
            return;
        };
        let mut line = String::with_capacity(128);
        let mut failed = false;
        while self.spam_budget > 0.0 {
            if c.output.len() >= CONSOLE_BUFFER {
                match flush(&mut c.stream, &mut c.output) {
                    Err(_) => failed = true,
                    Ok(_) if c.output.len() < CONSOLE_BUFFER => continue,
                    Ok(_) => {}
                }
                break;
            }
            let t = self.started.elapsed();
            self.spam_seq += 1;
            line.clear();
            let _ = write!(
                line,
                "[{:>5}.{:06}] qemu-stand-in: console line {:>9} \
                 the quick brown fox jumps over the lazy dog\r\n",
                t.as_secs(),
                t.subsec_micros(),
                self.spam_seq
            );
            self.spam_budget -= line.len() as f64;
            c.output.extend_from_slice(line.as_bytes());
        }
        if failed || flush(&mut c.stream, &mut c.output).is_err() {
            self.drop_console();
        }
    }

    // ----- the guest agent (HTTP) -----

    fn accept_http(&mut self, index: usize) {
        loop {
            let Some(listener) = self.http.get(index) else {
                return;
            };
            match listener.accept() {
                Ok((stream, _)) => self.add_conn(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(_) => {
                    // Out of descriptors: retried when a connection closes.
                    self.accept_stalled = true;
                    return;
                }
            }
        }
    }

    fn add_conn(&mut self, mut stream: TcpStream) {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        let registered = self.poll.registry().register(
            &mut stream,
            Token(CONN + slot),
            Interest::READABLE | Interest::WRITABLE,
        );
        if registered.is_err() {
            self.free.push(slot);
            return;
        }
        self.conns[slot] = Some(Conn {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            answered: false,
            deadline: Instant::now() + HTTP_IDLE,
        });
    }

    fn service_conn(&mut self, slot: usize) {
        let Some(Some(conn)) = self.conns.get_mut(slot) else {
            return;
        };
        let mut poweroff = false;
        if !conn.answered {
            let closed = read_into(&mut conn.stream, &mut conn.input);
            if let Some(end) = http::head_end(&conn.input) {
                let shares = http::Shares {
                    env: self.plan.env.as_deref(),
                    certs: self.plan.certs.as_deref(),
                };
                let answer = http::answer(&conn.input[..end], &shares);
                conn.output = answer.bytes;
                conn.answered = true;
                conn.input = Vec::new();
                poweroff = answer.poweroff;
            } else if conn.input.len() > MAX_HEAD {
                conn.output = http::response(
                    "431 Request Header Fields Too Large",
                    b"request header too large\n",
                    false,
                );
                conn.answered = true;
            } else if closed {
                self.close_conn(slot);
                return;
            }
        }
        let mut done = false;
        if conn.answered {
            match flush(&mut conn.stream, &mut conn.output) {
                Ok(true) | Err(_) => done = true,
                Ok(false) => {}
            }
        }
        if poweroff {
            self.power_off_in(self.faults.powerdown_delay);
        }
        if done {
            self.close_conn(slot);
        }
    }

    fn close_conn(&mut self, slot: usize) {
        let Some(mut conn) = self.conns.get_mut(slot).and_then(Option::take) else {
            return;
        };
        if conn.answered {
            // Read what is left of the request so closing sends FIN, not
            // RST (which can discard the answer at the client).
            let _ = conn.stream.shutdown(Shutdown::Write);
            let mut sink = Vec::new();
            read_into(&mut conn.stream, &mut sink);
        }
        let _ = self.poll.registry().deregister(&mut conn.stream);
        self.free.push(slot);
        if self.accept_stalled {
            self.accept_stalled = false;
            for index in 0..self.http.len() {
                self.accept_http(index);
            }
        }
    }
}

/// Reads what is there; true when the peer has closed (or the read failed).
fn read_into(stream: &mut impl Read, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return true,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

/// Writes what it can of `buf`; Ok(true) once all is written.
fn flush(stream: &mut impl Write, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut written = 0;
    let result = loop {
        if written == buf.len() {
            break Ok(true);
        }
        match stream.write(&buf[written..]) {
            Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    buf.drain(..written);
    result
}

/// The next complete JSON value of a QMP input stream; an error (and the
/// rest of that line dropped) on a syntax error; None until more arrives.
fn next_json(buf: &mut Vec<u8>) -> Option<Result<Value, String>> {
    let start = buf
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(buf.len());
    buf.drain(..start);
    if buf.is_empty() {
        return None;
    }
    let mut values = serde_json::Deserializer::from_slice(buf).into_iter::<Value>();
    match values.next() {
        None => {
            buf.clear();
            None
        }
        Some(Ok(value)) => {
            let used = values.byte_offset();
            buf.drain(..used);
            Some(Ok(value))
        }
        Some(Err(e)) if e.is_eof() => None,
        Some(Err(e)) => {
            let skip = buf
                .iter()
                .position(|&b| b == b'\n')
                .map_or(buf.len(), |p| p + 1);
            buf.drain(..skip);
            Some(Err(format!("JSON parse error, {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_a_qmp_stream() {
        let mut buf = b"{\"execute\": \"a\"}{\"execute\":\n \"b\"}\r\n  nonsense\n{\"exe".to_vec();
        assert_eq!(next_json(&mut buf).unwrap().unwrap()["execute"], "a");
        assert_eq!(next_json(&mut buf).unwrap().unwrap()["execute"], "b");
        assert!(next_json(&mut buf).unwrap().is_err());
        assert!(next_json(&mut buf).is_none());
        buf.extend_from_slice(b"cute\": \"c\"}");
        assert_eq!(next_json(&mut buf).unwrap().unwrap()["execute"], "c");
        assert!(next_json(&mut buf).is_none());
        assert!(buf.is_empty());
    }
}
