//! `create --wait`: polls the guest agent's `GET /health` through the VM's
//! forwarded port until it answers 2xx.

use std::time::Duration;

// Shared with the manager's create-to-agent-ready metric.
use cocos_core::agent::exchange;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Bound of one probe (connect, send, first line of the answer).
const PROBE_LIMIT: Duration = Duration::from_secs(5);
/// Pause between probes.
const PROBE_PAUSE: Duration = Duration::from_millis(500);

/// One `GET /health`: the HTTP status, or why there was none.
pub async fn probe(host: &str, port: u16) -> Result<u16, String> {
    let attempt = async {
        let mut stream = TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        exchange(&mut stream, host, port).await
    };
    match tokio::time::timeout(PROBE_LIMIT, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {}s", PROBE_LIMIT.as_secs())),
    }
}

/// Polls until the agent answers 2xx or `limit` passes; `tick` is told the
/// last reason after every failed probe. Err carries the last reason.
pub async fn wait_ready(
    host: &str,
    port: u16,
    limit: Duration,
    mut tick: impl FnMut(&str),
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    let mut last = String::from("no probe finished");
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(last);
        }
        match tokio::time::timeout(remaining, probe(host, port)).await {
            Ok(Ok(code)) if (200..300).contains(&code) => return Ok(()),
            Ok(Ok(code)) => last = format!("HTTP {code}"),
            Ok(Err(reason)) => last = reason,
            Err(_) => return Err(last),
        }
        tick(&last);
        let remaining = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(PROBE_PAUSE.min(remaining)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn waits_until_an_agent_answers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            // The first connection is closed unanswered, as slirp does
            // before the guest listens; the second one is answered.
            let (first, _) = listener.accept().await.unwrap();
            drop(first);
            let (mut second, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 512];
            let _ = second.read(&mut buf).await;
            second
                .write_all(b"HTTP/1.0 200 OK\r\n\r\nok")
                .await
                .unwrap();
        });
        let mut ticks = 0;
        wait_ready("127.0.0.1", port, Duration::from_secs(10), |_| ticks += 1)
            .await
            .unwrap();
        assert_eq!(ticks, 1);
    }

    #[tokio::test]
    async fn gives_up_at_the_limit() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let start = Instant::now();
        let err = wait_ready("127.0.0.1", port, Duration::from_millis(1200), |_| {})
            .await
            .unwrap_err();
        assert!(err.contains("connect"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
