//! A small QMP client: QEMU's JSON control protocol over the VM's unix
//! socket. One task owns the connection; commands go in over a channel and
//! events come out as messages to the VM's actor.

use std::collections::VecDeque;
use std::io;
use std::path::Path;

use actix::prelude::*;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
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
        let mut lines = BufReader::with_capacity(1024, read).lines();
        let greeting = lines.next_line().await?.ok_or(QmpError::Closed)?;
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
                    line = lines.next_line() => {
                        let line = match line {
                            Ok(Some(line)) => line,
                            _ => break,
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
        self.commands
            .send((message, reply))
            .await
            .map_err(|_| QmpError::Closed)?;
        answer.await.map_err(|_| QmpError::Closed)?
    }

    /// The run state QEMU reports (`running`, `paused`, `prelaunch`, …).
    pub async fn status(&self) -> Result<String, QmpError> {
        let status = self.execute("query-status", None).await?;
        Ok(status["status"].as_str().unwrap_or("unknown").to_string())
    }
}
