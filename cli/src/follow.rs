//! Reading a server stream (`logs`, `events`) to its end. Each message is
//! printed as it comes; Ctrl-C (SIGINT) and a closed stdout (`| head`) end
//! the command cleanly (exit 0) instead of killing it mid-line; opening the
//! stream is bounded by the request bound, and so is each message of a
//! stream that does not follow (a following stream waits as long as
//! nothing happens, by design).

use std::future::Future;
use std::io::Write;
use std::time::Duration;

use cocos_core::duration::format_go_duration;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tonic::{Code, Streaming};

use crate::connect::Target;
use crate::failure::Failure;

/// How a stream ended without a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The manager ended it (a tail sent, a removed VM).
    Finished,
    /// Ctrl-C.
    Interrupted,
    /// Nobody reads stdout any more.
    OutputClosed,
}

/// SIGINT, caught from the moment it is installed.
pub struct Interrupt(Signal);

impl Interrupt {
    pub fn install() -> Result<Interrupt, Failure> {
        signal(SignalKind::interrupt())
            .map(Interrupt)
            .map_err(|e| Failure::grpc(Code::Internal, format!("cannot catch SIGINT: {e}")))
    }

    async fn recv(&mut self) {
        // None only if the signal driver is gone: then never.
        if self.0.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
    }
}

/// Opens a server stream (`opening`: connect, then call, each within the
/// request bound), or None on Ctrl-C meanwhile.
pub async fn open<T>(
    interrupt: &mut Interrupt,
    opening: impl Future<Output = Result<Streaming<T>, Failure>>,
) -> Result<Option<Streaming<T>>, Failure> {
    tokio::select! {
        _ = interrupt.recv() => Ok(None),
        opened = opening => opened.map(Some),
    }
}

/// Hands each message to `print` until the stream ends, Ctrl-C, or
/// `print` fails (stdout closed). With `per_message`, each message must
/// come within that bound.
pub async fn drain<T>(
    target: &Target,
    stream: &mut Streaming<T>,
    interrupt: &mut Interrupt,
    per_message: Option<Duration>,
    mut print: impl FnMut(T) -> std::io::Result<()>,
) -> Result<End, Failure> {
    loop {
        let next = async {
            match per_message {
                None => Some(stream.message().await),
                Some(limit) => tokio::time::timeout(limit, stream.message()).await.ok(),
            }
        };
        let message = tokio::select! {
            _ = interrupt.recv() => return Ok(End::Interrupted),
            message = next => message,
        };
        match message {
            None => {
                return Err(Failure::grpc(
                    Code::DeadlineExceeded,
                    format!(
                        "the manager at {} sent nothing more for {} (--grpc-timeout, \
                         MANAGER_GRPC_TIMEOUT)",
                        target.uri,
                        format_go_duration(per_message.unwrap_or_default())
                    ),
                ))
            }
            Some(Err(status)) => return Err(Failure::from_status(&status)),
            Some(Ok(None)) => return Ok(End::Finished),
            Some(Ok(Some(message))) => {
                if print(message).is_err() {
                    return Ok(End::OutputClosed);
                }
            }
        }
    }
}

/// One line on stdout, flushed at once (a reader of a pipe sees each line
/// as it comes).
pub fn print_line(bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.write_all(b"\n")?;
    out.flush()
}
