//! The guest agent the forwarded port leads to, as the development guest's
//! `agent-http` serves it: one HTTP/1.x request per connection, always
//! `Content-Length` and `Connection: close`.

use std::path::Path;

/// Where a request's head ends (after the blank line), if it has.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What answering a request asks of the VM.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub bytes: Vec<u8>,
    pub poweroff: bool,
}

/// The guest's shares, as the agent sees them.
pub struct Shares<'a> {
    pub env: Option<&'a Path>,
    pub certs: Option<&'a Path>,
}

/// Answers a request head.
pub fn answer(head: &[u8], shares: &Shares<'_>) -> Answer {
    let head = String::from_utf8_lossy(head);
    let line = head.lines().next().unwrap_or_default();
    let mut words = line.split_whitespace();
    let method = words.next().unwrap_or_default();
    let target = words.next().unwrap_or_default();
    let version = words.next().unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default();
    let head_only = method == "HEAD";
    let respond = |status: &str, body: &[u8]| Answer {
        bytes: response(status, body, head_only),
        poweroff: false,
    };
    if !version.starts_with("HTTP/1.") {
        return respond("400 Bad Request", b"bad request\n");
    }
    if method != "GET" && method != "HEAD" {
        return respond("405 Method Not Allowed", b"method not allowed\n");
    }
    match path {
        "/health" => respond("200 OK", b"ok"),
        "/env" => match shares.env.map(|d| std::fs::read(d.join("environment"))) {
            Some(Ok(bytes)) => respond("200 OK", &bytes),
            _ => respond("404 Not Found", b"/etc/cocos/environment not found\n"),
        },
        "/certs" => match shares.certs.map(list) {
            Some(Ok(names)) => respond("200 OK", names.as_bytes()),
            _ => respond("404 Not Found", b"/etc/certs not found\n"),
        },
        "/poweroff" => Answer {
            poweroff: true,
            ..respond("200 OK", b"powering off")
        },
        _ => respond("404 Not Found", b"not found\n"),
    }
}

/// Names in `dir`, byte-sorted, joined by `\n` (`ls -1A | LC_ALL=C sort`).
fn list(dir: &Path) -> std::io::Result<String> {
    let mut names: Vec<Vec<u8>> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        names.push(entry?.file_name().into_encoded_bytes());
    }
    names.sort();
    Ok(String::from_utf8_lossy(&names.join(&b'\n')).into_owned())
}

pub fn response(status: &str, body: &[u8], head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\nServer: qemu-stand-in\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(a: &Answer) -> String {
        let text = String::from_utf8_lossy(&a.bytes);
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        body.to_string()
    }

    #[test]
    fn routes() {
        let dir = std::env::temp_dir().join(format!("stand-in-http-{}", std::process::id()));
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        std::fs::write(dir.join("environment"), "A=1\nB=2\n").unwrap();
        for name in ["key.pem", "ca.pem", "cert.pem"] {
            std::fs::write(certs.join(name), "x").unwrap();
        }
        let shares = Shares {
            env: Some(&dir),
            certs: Some(&certs),
        };
        let get = |path: &str| {
            answer(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
                &shares,
            )
        };
        assert_eq!(body(&get("/health")), "ok");
        assert_eq!(body(&get("/env")), "A=1\nB=2\n");
        assert_eq!(body(&get("/certs")), "ca.pem\ncert.pem\nkey.pem");
        assert!(get("/poweroff").poweroff);
        assert!(String::from_utf8_lossy(&get("/nope").bytes).starts_with("HTTP/1.1 404"));
        let post = answer(b"POST /health HTTP/1.1\r\n\r\n", &shares);
        assert!(String::from_utf8_lossy(&post.bytes).starts_with("HTTP/1.1 405"));
        let head = answer(b"HEAD /health HTTP/1.0\r\n\r\n", &shares);
        assert!(String::from_utf8_lossy(&head.bytes)
            .ends_with("Content-Length: 2\r\nConnection: close\r\nServer: qemu-stand-in\r\n\r\n"));
        let none = Shares {
            env: None,
            certs: None,
        };
        let env = answer(b"GET /env HTTP/1.1\r\n\r\n", &none);
        assert!(String::from_utf8_lossy(&env.bytes).starts_with("HTTP/1.1 404"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn finds_the_end_of_the_head() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
