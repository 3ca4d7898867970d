//! The guest agent's health answer, as `managerctl create --wait` and the
//! manager's create-to-agent-ready metric read it: both send
//! `GET /health` to the VM's forwarded port and need only the status code
//! of the answer's first line. The callers open (and bound) the
//! connection; this module only speaks over it.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Sends `GET /health` over `stream` (a connection the caller opened to
/// `host`:`port`) and reads the answer up to its status line: the HTTP
/// status, or why there was none. Reads at most 4 KiB; the caller bounds
/// the time.
pub async fn exchange<S>(stream: &mut S, host: &str, port: u16) -> Result<u16, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream
        .write_all(health_request(host, port).as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !has_status_line(&head) && head.len() < 4096 {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    parse_status(&head)
}

/// The status code of an HTTP/1.x status line (`head` is what was read of
/// the answer so far, at least its first line when there is one).
pub fn parse_status(head: &[u8]) -> Result<u16, String> {
    if head.is_empty() {
        return Err("connection closed without an answer (the guest is not up yet)".into());
    }
    let text = String::from_utf8_lossy(head);
    let line = text.lines().next().unwrap_or_default();
    let mut words = line.split_whitespace();
    match (
        words.next(),
        words.next().and_then(|c| c.parse::<u16>().ok()),
    ) {
        (Some(version), Some(code)) if version.starts_with("HTTP/") => Ok(code),
        _ => Err(format!(
            "not an HTTP answer: {:?}",
            line.chars().take(80).collect::<String>()
        )),
    }
}

/// Whether `head` holds the whole status line (so reading can stop).
pub fn has_status_line(head: &[u8]) -> bool {
    head.windows(2).any(|w| w == b"\r\n")
}

/// The request both send: HTTP/1.0, one request per connection.
pub fn health_request(host: &str, port: u16) -> String {
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    format!("GET /health HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.0 200 OK\r\n\r\nok"), Ok(200));
        assert_eq!(
            parse_status(b"HTTP/1.1 503 Service Unavailable\r\n"),
            Ok(503)
        );
        assert!(parse_status(b"").is_err());
        assert!(parse_status(b"SSH-2.0-x\r\n").is_err());
        assert!(parse_status(b"HTTP/1.1 abc\r\n").is_err());
    }

    #[test]
    fn requests_name_the_host() {
        assert_eq!(
            health_request("127.0.0.1", 6100),
            "GET /health HTTP/1.0\r\nHost: 127.0.0.1:6100\r\nConnection: close\r\n\r\n"
        );
        assert!(health_request("::1", 6100).contains("Host: [::1]:6100\r\n"));
        assert!(has_status_line(b"HTTP/1.0 200 OK\r\n"));
        assert!(!has_status_line(b"HTTP/1.0 200"));
    }
}
