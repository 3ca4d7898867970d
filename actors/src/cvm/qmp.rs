//! A small QMP client: QEMU's JSON control protocol over the VM's unix
//! socket. One task owns the connection; commands go in over a channel and
//! events come out as messages to the VM's actor.

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::time::Duration;

use actix::prelude::*;
use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP connection: {0}")]
    Io(#[from] io::Error),
    #[error("QMP protocol: {0}")]
    Protocol(String),
    #[error("QMP command {command} failed: {desc}")]
    Command { command: String, desc: String },
    #[error("QMP connection closed")]
    Closed,
    #[error("QMP command {0} got no answer within {1:?}")]
    Timeout(String, Duration),
}

/// The longest QMP line accepted: QEMU's answers and events are far
/// shorter; anything longer is a broken or hostile peer.
pub const MAX_LINE: usize = 64 * 1024;
/// How long one QMP command may take; a QEMU that does not answer (stopped,
/// hung) does not hold up whoever asked.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads one line of at most `cap` bytes. Cancel-safe: bytes are moved from
/// the reader into `partial` only after an await has completed, so a line
/// interrupted by `select!` goes on where it stopped.
async fn next_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    partial: &mut Vec<u8>,
    cap: usize,
) -> Result<Option<String>, QmpError> {
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return if partial.is_empty() {
                Ok(None)
            } else {
                Err(QmpError::Closed)
            };
        }
        let (taken, done) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        partial.extend_from_slice(&available[..taken]);
        reader.consume(taken);
        if partial.len() > cap + 1 {
            return Err(QmpError::Protocol(format!(
                "a line longer than {cap} bytes"
            )));
        }
        if done {
            let mut line = std::mem::take(partial);
            line.pop();
            return String::from_utf8(line)
                .map(Some)
                .map_err(|_| QmpError::Protocol("a line that is not UTF-8".into()));
        }
    }
}

/// An asynchronous QMP event (`SHUTDOWN`, `GUEST_PANICKED`, …).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct QmpEvent {
    pub event: String,
    pub data: Value,
}

type Reply = oneshot::Sender<Result<Value, QmpError>>;

/// A handle to one QMP connection; cheap to clone.
#[derive(Clone)]
pub struct Qmp {
    commands: mpsc::Sender<(Value, Reply)>,
}

impl Qmp {
    /// Connects, checks the greeting and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path, events: Recipient<QmpEvent>) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).await?;
        let (read, mut write) = stream.into_split();
        // QMP lines are short; one reader lives per VM.
        let mut reader = BufReader::with_capacity(1024, read);
        let mut partial = Vec::new();
        let greeting = tokio::time::timeout(
            COMMAND_TIMEOUT,
            next_line(&mut reader, &mut partial, MAX_LINE),
        )
        .await
        .map_err(|_| QmpError::Timeout("(greeting)".into(), COMMAND_TIMEOUT))??
        .ok_or(QmpError::Closed)?;
        let greeting: Value = serde_json::from_str(&greeting)
            .map_err(|e| QmpError::Protocol(format!("bad greeting: {e}")))?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "unexpected greeting {greeting}"
            )));
        }
        let (tx, mut rx) = mpsc::channel::<(Value, Reply)>(8);
        tokio::spawn(async move {
            let mut pending: VecDeque<(String, Reply)> = VecDeque::new();
            loop {
                tokio::select! {
                    command = rx.recv() => {
                        let Some((command, reply)) = command else { break };
                        let name = command["execute"].as_str().unwrap_or("?").to_string();
                        let mut text = command.to_string();
                        text.push('\n');
                        if let Err(e) = write.write_all(text.as_bytes()).await {
                            let _ = reply.send(Err(QmpError::Io(e)));
                            break;
                        }
                        pending.push_back((name, reply));
                    }
                    line = next_line(&mut reader, &mut partial, MAX_LINE) => {
                        let line = match line {
                            Ok(Some(line)) => line,
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!(error = %e, "closing the QMP connection");
                                break;
                            }
                        };
                        let Ok(message) = serde_json::from_str::<Value>(&line) else { continue };
                        if let Some(event) = message.get("event").and_then(Value::as_str) {
                            events.do_send(QmpEvent {
                                event: event.to_string(),
                                data: message.get("data").cloned().unwrap_or(Value::Null),
                            });
                        } else if let Some((name, reply)) = pending.pop_front() {
                            let result = match (message.get("return"), message.get("error")) {
                                (Some(ret), _) => Ok(ret.clone()),
                                (None, Some(err)) => Err(QmpError::Command {
                                    command: name,
                                    desc: err["desc"].as_str().unwrap_or("unknown error").to_string(),
                                }),
                                (None, None) => Err(QmpError::Protocol(format!("unexpected message {message}"))),
                            };
                            let _ = reply.send(result);
                        }
                    }
                }
            }
            for (_, reply) in pending {
                let _ = reply.send(Err(QmpError::Closed));
            }
        });
        let qmp = Qmp { commands: tx };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let mut message = json!({ "execute": command });
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let (reply, answer) = oneshot::channel();
        let exchange = async {
            self.commands
                .send((message, reply))
                .await
                .map_err(|_| QmpError::Closed)?;
            answer.await.map_err(|_| QmpError::Closed)?
        };
        tokio::time::timeout(COMMAND_TIMEOUT, exchange)
            .await
            .map_err(|_| QmpError::Timeout(command.to_string(), COMMAND_TIMEOUT))?
    }

    /// The run state QEMU reports (`running`, `paused`, `prelaunch`, …).
    pub async fn status(&self) -> Result<String, QmpError> {
        let status = self.execute("query-status", None).await?;
        Ok(status["status"].as_str().unwrap_or("unknown").to_string())
    }
}
