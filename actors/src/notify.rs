//! systemd's notification protocol: a datagram to `$NOTIFY_SOCKET`.
//! Readiness (`Type=notify`) and the watchdog (`WatchdogSec=`). Without
//! systemd the variables are unset and this is a no-op.

use std::future::Future;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use tracing::{debug, info, warn};

pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        if let Some(abstract_name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
            socket.send_to_addr(state.as_bytes(), &addr)
        } else {
            socket.send_to(state.as_bytes(), &path)
        }
    });
    if let Err(e) = result {
        debug!(error = %e, state, "sd_notify failed");
    }
}

/// The interval systemd expects `WATCHDOG=1` within (`$WATCHDOG_USEC`), if
/// the watchdog is on for this process (`$WATCHDOG_PID`, when set, names it).
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok()?;
    let interval = match usec.trim().parse::<u64>() {
        Ok(0) | Err(_) => {
            warn!(
                WATCHDOG_USEC = usec,
                "ignoring a WATCHDOG_USEC that is not a positive number"
            );
            return None;
        }
        Ok(usec) => Duration::from_micros(usec),
    };
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            debug!(
                WATCHDOG_PID = pid,
                "the watchdog is meant for another process"
            );
            return None;
        }
    }
    Some(interval)
}

/// Pings the systemd watchdog every half `interval`, each time only after
/// `round_trip` (a message through the supervisor's mailbox) answered within
/// its own bound, half `interval` as well. A wedged supervisor (or a
/// blocked thread running this loop) stops the pings, and systemd ends the
/// process after `interval`. Runs until the round trip says the supervisor
/// is gone.
pub async fn watchdog<F, Fut>(interval: Duration, mut round_trip: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), actix::MailboxError>>,
{
    let period = interval / 2;
    info!(
        interval = ?interval,
        ping_every = ?period,
        "systemd watchdog on: pinging after each round trip through the supervisor"
    );
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut missing = false;
    loop {
        ticks.tick().await;
        match tokio::time::timeout(period, round_trip()).await {
            Ok(Ok(())) => {
                if missing {
                    info!("watchdog: the supervisor answers again; pinging systemd");
                    missing = false;
                }
                notify("WATCHDOG=1");
            }
            Ok(Err(e)) => {
                warn!(error = %e, "watchdog: the supervisor is gone; no more pings");
                return;
            }
            Err(_) => {
                if !missing {
                    warn!(
                        bound = ?period,
                        "watchdog: the supervisor did not answer a ping in time; not pinging systemd"
                    );
                    missing = true;
                }
            }
        }
    }
}
