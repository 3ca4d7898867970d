//! The daemon's log lines: `MANAGER_LOG_FORMAT=json` gives one JSON object
//! per line, text has timestamps except under systemd's journal (stderr is
//! the stream `JOURNAL_STREAM` names), and a bad format is refused at start.

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use cocos_core::proto::CvmInfoReq;
use common::*;
use nix::sys::signal::Signal;

const LEVELS: [&str; 5] = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"];

/// `2026-01-02T03:04:05…`: an RFC 3339 timestamp at the start of a line.
fn starts_with_timestamp(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() > 20
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_format_gives_one_object_per_line() {
    let mut manager = start_on_stand_in(free_port_range(4), &[("MANAGER_LOG_FORMAT", "json")]);
    let mut client = manager.client().await;
    let (id, _) = create(&mut client).await;
    let missing = client
        .cvm_info(CvmInfoReq {
            id: "no-such-vm".into(),
        })
        .await
        .expect_err("unknown VM");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    assert_eq!(info(&mut client, &id).await.id, id);
    let status = manager.stop_with(Signal::SIGTERM, Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let log = manager.log();
    let mut messages = Vec::new();
    let mut lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        lines += 1;
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}\n{log}"));
        let object = value
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {line}"));
        let timestamp = object["timestamp"].as_str().unwrap_or_default();
        assert!(starts_with_timestamp(timestamp), "{line}");
        let level = object["level"].as_str().unwrap_or_default();
        assert!(LEVELS.contains(&level), "{line}");
        let message = object["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no message: {line}"));
        messages.push((message.to_string(), value.clone()));
    }
    assert!(lines > 5, "{log}");
    // Fields are JSON fields of the line, not text in its message.
    let (_, start) = messages
        .iter()
        .find(|(m, _)| m == "cocos-manager starting")
        .unwrap_or_else(|| panic!("no start line:\n{log}"));
    assert_eq!(start["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(start["level"], "INFO");
    let (_, running) = messages
        .iter()
        .find(|(m, v)| m == "VM running" && v["vm"] == id.as_str())
        .unwrap_or_else(|| panic!("no VM running line for {id}:\n{log}"));
    assert!(running["port"].is_u64(), "{running}");
    assert!(
        messages.iter().any(|(m, _)| m == "cocos-manager stopped"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_lines_carry_no_timestamp_under_the_journal() {
    // JOURNAL_STREAM inherited from somewhere else (it names another
    // file): stderr is not the journal, lines keep their timestamps.
    let mut manager = start_on_stand_in(free_port_range(4), &[("JOURNAL_STREAM", "1:1")]);
    let mut client = manager.client().await;
    let (id, _) = create(&mut client).await;
    assert_eq!(info(&mut client, &id).await.id, id);
    let status = manager.stop_with(Signal::SIGTERM, Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let first = manager.log();
    let first_lines: Vec<&str> = first.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(first_lines.len() > 5, "{first}");
    for line in &first_lines {
        assert!(
            starts_with_timestamp(line),
            "no timestamp: {line:?}\n{first}"
        );
    }

    // The same manager again, its stderr (the log file) now being the
    // stream JOURNAL_STREAM names, as systemd sets it.
    let meta = std::fs::metadata(&manager.log_path).expect("log file");
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    manager.env.insert("JOURNAL_STREAM".into(), stream);
    manager.spawn();
    let mut client = manager.client().await;
    assert_eq!(info(&mut client, &id).await.id, id);
    let status = manager.stop_with(Signal::SIGTERM, Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let all = manager.log();
    let second = &all[first.len()..];
    let lines: Vec<&str> = second.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() > 5, "{second}");
    for line in &lines {
        assert!(
            !starts_with_timestamp(line),
            "timestamp under the journal: {line:?}"
        );
        let level = line.split_whitespace().next().unwrap_or_default();
        assert!(LEVELS.contains(&level), "{line:?}");
        // Plain text for the journal: no colour codes.
        assert!(!line.contains('\u{1b}'), "{line:?}");
    }
    assert!(
        lines.iter().any(|l| l.contains("re-adopted VM")),
        "the VM was re-adopted:\n{second}"
    );
}

#[test]
fn a_bad_log_format_is_refused_at_start() {
    let stderr = refused_at_start(&[("MANAGER_LOG_FORMAT", "yaml")]);
    assert!(
        stderr.contains("configuration error")
            && stderr.contains("MANAGER_LOG_FORMAT")
            && stderr.contains("yaml")
            && stderr.contains("text or json"),
        "{stderr}"
    );
}
