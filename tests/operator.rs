//! The operator's extension service, `cocos.manager.v1.Operator`, against
//! the real daemon over a real gRPC socket: WatchEvents (the events of a
//! create, a crash and restart, a TTL expiry and a remove, in order; a
//! watcher that never reads), ListVms across a manager restart, GetVm, the
//! errors, and StreamLogs of a real development guest.

mod common;

use std::time::Duration;

use cocos_core::operator_proto::operator_client::OperatorClient;
use cocos_core::operator_proto::{
    EventKind, GetVmRequest, ListVmsRequest, LogSource, StreamLogsRequest, TeeMode, VmEvent,
    VmState, WatchEventsRequest,
};
use cocos_core::proto::{CreateReq, RemoveReq};
use common::*;
use nix::sys::signal::Signal;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

type Operator = OperatorClient<Channel>;

async fn operator(manager: &Manager) -> Operator {
    OperatorClient::connect(format!("http://127.0.0.1:{}", manager.grpc_port))
        .await
        .expect("gRPC connection")
}

fn fast_restarts() -> Vec<(&'static str, &'static str)> {
    vec![
        ("MANAGER_RESTART_BACKOFF_INITIAL", "200ms"),
        ("MANAGER_RESTART_BACKOFF_MAX", "1s"),
    ]
}

/// The next event of a watch, bounded.
async fn next_event(stream: &mut Streaming<VmEvent>, limit: Duration) -> Option<VmEvent> {
    match tokio::time::timeout(limit, stream.message()).await {
        Ok(Ok(event)) => event,
        Ok(Err(status)) => panic!("WatchEvents failed: {status}"),
        Err(_) => panic!("no event within {limit:?}"),
    }
}

/// Reads the watch until SYNCED; returns the CURRENT events before it.
async fn until_synced(stream: &mut Streaming<VmEvent>) -> Vec<VmEvent> {
    let mut current = Vec::new();
    loop {
        let event = next_event(stream, Duration::from_secs(10))
            .await
            .expect("stream open");
        match event.kind() {
            EventKind::Synced => return current,
            EventKind::Current => current.push(event),
            other => panic!("{other:?} before SYNCED"),
        }
    }
}

/// Reads events into `seen` until `done` holds for the list, bounded.
async fn collect_until(
    stream: &mut Streaming<VmEvent>,
    seen: &mut Vec<VmEvent>,
    limit: Duration,
    done: impl Fn(&[VmEvent]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done(seen) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        assert!(!left.is_zero(), "events so far: {:?}", kinds_of(seen, None));
        match next_event(stream, left).await {
            Some(event) => seen.push(event),
            None => panic!("stream ended; events: {:?}", kinds_of(seen, None)),
        }
    }
}

fn kinds_of(events: &[VmEvent], id: Option<&str>) -> Vec<EventKind> {
    events
        .iter()
        .filter(|e| id.is_none_or(|id| e.id == id))
        .map(|e| e.kind())
        .collect()
}

async fn create_with_ttl(client: &mut Client, ttl: &str) -> (String, u16) {
    let created = client
        .create_vm(CreateReq {
            ttl: ttl.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("CreateVm: {e}"))
        .into_inner();
    (
        created.cvm_id,
        created.forwarded_port.parse().expect("decimal port"),
    )
}

#[tokio::test]
async fn watch_sees_create_crash_restart_ttl_and_remove_in_order() {
    let manager = start_on_stand_in(free_port_range(4), &fast_restarts());
    let mut client = manager.client().await;
    let mut op = operator(&manager).await;
    let mut all = op
        .watch_events(WatchEventsRequest::default())
        .await
        .expect("WatchEvents")
        .into_inner();
    assert!(until_synced(&mut all).await.is_empty(), "no VM yet");

    let (a, _) = create_with_ttl(&mut client, "8s").await;
    let (b, b_port) = create(&mut client).await;
    // A watch of B alone: its state now, then only its events.
    let mut only_b = op
        .watch_events(WatchEventsRequest { id: b.clone() })
        .await
        .expect("WatchEvents of one VM")
        .into_inner();
    let current = until_synced(&mut only_b).await;
    assert_eq!(current.len(), 1);
    let b_now = current[0].vm.clone().expect("VM in CURRENT");
    assert_eq!(
        (b_now.id.as_str(), b_now.state()),
        (b.as_str(), VmState::Running)
    );
    assert_eq!(b_now.port, u32::from(b_port));

    let mut seen = Vec::new();
    collect_until(&mut all, &mut seen, Duration::from_secs(30), |s| {
        kinds_of(s, Some(&a)).contains(&EventKind::Running)
            && kinds_of(s, Some(&b)).contains(&EventKind::Running)
    })
    .await;
    // A crashes (SIGKILL): supervision restarts it.
    let pid = qemu_pid(&a).await;
    kill9(pid);
    collect_until(&mut all, &mut seen, Duration::from_secs(30), |s| {
        kinds_of(s, Some(&a))
            .iter()
            .filter(|k| **k == EventKind::Running)
            .count()
            == 2
    })
    .await;
    let exit = seen
        .iter()
        .find(|e| e.id == a && e.kind() == EventKind::Exited)
        .expect("exit event");
    assert_eq!(exit.exit_signal, Some(9), "{exit:?}");
    assert_eq!(exit.exit_cause, "crash");
    let restarting = seen
        .iter()
        .find(|e| e.id == a && e.kind() == EventKind::Restarting)
        .expect("restart event");
    assert_eq!(restarting.attempt, 1);
    let running_again = seen
        .iter()
        .rfind(|e| e.id == a && e.kind() == EventKind::Running)
        .and_then(|e| e.vm.clone())
        .expect("VM in the event");
    assert_eq!(running_again.restarts, 1);
    assert_ne!(running_again.pid, pid);
    assert_eq!(running_again.last_exit, "killed by SIGKILL (crash)");

    // A's TTL passes; B is removed.
    collect_until(&mut all, &mut seen, Duration::from_secs(60), |s| {
        kinds_of(s, Some(&a)).contains(&EventKind::Removed)
    })
    .await;
    client
        .remove_vm(RemoveReq { cvm_id: b.clone() })
        .await
        .expect("RemoveVm");
    collect_until(&mut all, &mut seen, Duration::from_secs(30), |s| {
        kinds_of(s, Some(&b)).contains(&EventKind::Removed)
    })
    .await;

    use EventKind::*;
    assert_eq!(
        kinds_of(&seen, Some(&a)),
        [Created, Running, Exited, Restarting, Running, TtlExpired, Stopping, Exited, Removed]
    );
    let requested = seen
        .iter()
        .rfind(|e| e.id == a && e.kind() == Exited)
        .expect("exit");
    assert_eq!(requested.exit_cause, "requested");
    assert_eq!(
        kinds_of(&seen, Some(&b)),
        [Created, Running, Stopping, Exited, Removed]
    );
    let removed = seen
        .iter()
        .rfind(|e| e.id == b && e.kind() == Removed)
        .and_then(|e| e.vm.clone())
        .expect("VM in REMOVED");
    assert_eq!(
        (removed.state(), removed.pid, removed.port),
        (VmState::Stopped, 0, 0)
    );
    // Numbered in order, none twice.
    assert!(seen.windows(2).all(|w| w[0].sequence < w[1].sequence));

    // The watch of B saw B's events after the snapshot, then ended.
    let mut b_events = Vec::new();
    while let Some(event) = next_event(&mut only_b, Duration::from_secs(10)).await {
        b_events.push(event);
    }
    assert_eq!(kinds_of(&b_events, None), [Stopping, Exited, Removed]);
    assert_nothing_left(&manager).await;
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

async fn create_remove_cycles(manager: &Manager, cycles: usize, parallel: usize) {
    let mut tasks = Vec::new();
    for _ in 0..parallel {
        let mut client = manager.client().await;
        tasks.push(tokio::spawn(async move {
            for _ in 0..cycles / parallel {
                let (id, _) = create(&mut client).await;
                client
                    .remove_vm(RemoveReq { cvm_id: id })
                    .await
                    .expect("RemoveVm");
            }
        }));
    }
    for task in tasks {
        task.await.expect("client task");
    }
}

#[tokio::test]
async fn a_watcher_that_never_reads_loses_events_not_memory() {
    let manager = start_on_stand_in(free_port_range(16), &[("MANAGER_MAX_VMS", "16")]);
    let mut op = operator(&manager).await;
    // Opened, then never read while the manager publishes thousands of
    // events (five per create and remove). Its connection takes HTTP/2's
    // default 64 KiB window rather than hyper's 2 MiB, so the few hundred
    // events it buffers do not hide the manager's own bound.
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", manager.grpc_port))
            .expect("endpoint")
            .initial_stream_window_size(Some(65_535))
            .initial_connection_window_size(Some(65_535))
            .connect()
            .await
            .expect("gRPC connection");
    let mut stalled = OperatorClient::new(channel)
        .watch_events(WatchEventsRequest::default())
        .await
        .expect("WatchEvents")
        .into_inner();
    create_remove_cycles(&manager, 64, 8).await;
    let before = rss_kib(manager.pid());
    create_remove_cycles(&manager, 640, 8).await;
    let after = rss_kib(manager.pid());
    // 3200 events of ~300 bytes each would be ~1 MiB if they were queued;
    // what matters is that they were not: the LAGGED marker below. The
    // bound here only catches gross growth.
    assert!(
        after < before + 32 * 1024,
        "manager RSS grew from {before} KiB to {after} KiB"
    );

    let mut seen = Vec::new();
    let mut lost = 0;
    // The stalled watcher now reads: the snapshot, what fit in the buffers,
    // a LAGGED marker with the count it lost, then the newest events.
    while let Ok(Ok(Some(event))) =
        tokio::time::timeout(Duration::from_secs(3), stalled.message()).await
    {
        if event.kind() == EventKind::Lagged {
            lost += event.lagged;
        }
        seen.push(event);
    }
    assert!(lost > 0, "no LAGGED marker in {} events", seen.len());
    let after_gap = seen
        .iter()
        .skip_while(|e| e.kind() != EventKind::Lagged)
        .skip(1)
        .find(|e| e.kind() != EventKind::Lagged)
        .expect("events after the gap");
    assert!(after_gap.sequence > lost);
    // Events after the gap come in order.
    let numbers: Vec<u64> = seen
        .iter()
        .filter(|e| e.sequence > 0 && e.kind() != EventKind::Synced)
        .map(|e| e.sequence)
        .collect();
    assert!(numbers.windows(2).all(|w| w[0] < w[1]));
    // A new watcher is served at once.
    let mut fresh = op
        .watch_events(WatchEventsRequest::default())
        .await
        .expect("WatchEvents")
        .into_inner();
    assert!(until_synced(&mut fresh).await.is_empty());
    assert_nothing_left(&manager).await;
}

#[tokio::test]
async fn list_vms_after_a_manager_restart_shows_readopted_vms() {
    let mut manager = start_on_stand_in(free_port_range(4), &[]);
    let mut client = manager.client().await;
    let (a, a_port) = create(&mut client).await;
    let (b, _) = create_with_ttl(&mut client, "1h").await;
    let mut op = operator(&manager).await;
    // A crashes once and is restarted: the count is kept in its record.
    let first = qemu_pid(&a).await;
    kill9(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let vms = op
            .list_vms(ListVmsRequest {})
            .await
            .expect("ListVms")
            .into_inner()
            .vms;
        let restarted = vms.iter().any(|v| {
            v.id == a && v.restarts == 1 && v.state() == VmState::Running && v.pid != first
        });
        if restarted {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "A not restarted: {vms:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = op
        .list_vms(ListVmsRequest {})
        .await
        .expect("ListVms")
        .into_inner()
        .vms;
    assert_eq!(before.len(), 2);
    let a_before = before.iter().find(|v| v.id == a).expect("A listed");
    assert_eq!(a_before.state(), VmState::Running);
    assert_eq!(a_before.pid, qemu_pid(&a).await);
    assert_eq!(a_before.port, u32::from(a_port));
    assert_eq!(a_before.tee(), TeeMode::None);
    assert!(!a_before.readopted && a_before.ttl_left_ms.is_none());
    let b_before = before.iter().find(|v| v.id == b).expect("B listed");
    let ttl_left = b_before.ttl_left_ms.expect("B has a TTL");
    assert!(ttl_left > 3_500_000 && ttl_left <= 3_600_000, "{ttl_left}");

    // A watcher open at shutdown sees its stream end; the manager leaves.
    let mut watch = op
        .watch_events(WatchEventsRequest::default())
        .await
        .expect("WatchEvents")
        .into_inner();
    assert_eq!(until_synced(&mut watch).await.len(), 2);
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(manager.pid()), Signal::SIGTERM);
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(_)) = watch.message().await {}
    })
    .await;
    assert!(ended.is_ok(), "watch stream still open after SIGTERM");
    let status = manager.stop_with(Signal::SIGTERM, Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "manager did not exit cleanly with a watch open: {status:?}\n{}",
        manager.log()
    );
    manager.spawn();
    let mut op = operator(&manager).await;
    let after = op
        .list_vms(ListVmsRequest {})
        .await
        .expect("ListVms")
        .into_inner()
        .vms;
    assert_eq!(after.len(), 2, "{after:?}");
    for vm in &after {
        let old = before.iter().find(|v| v.id == vm.id).expect("same VMs");
        assert!(vm.readopted, "{vm:?}");
        assert_eq!(vm.state(), VmState::Running);
        assert_eq!((vm.pid, vm.port), (old.pid, old.port));
        assert_eq!(vm.created_unix_ms, old.created_unix_ms);
        assert_eq!(vm.restarts, old.restarts);
        assert_eq!(vm.restarts, u32::from(vm.id == a));
        assert!(vm.uptime_ms >= old.uptime_ms, "{vm:?} {old:?}");
        assert_eq!(vm.ttl_left_ms.is_some(), vm.id == b);
    }
    // A new watch opens with the re-adopted VMs.
    let mut watch = op
        .watch_events(WatchEventsRequest::default())
        .await
        .expect("WatchEvents")
        .into_inner();
    let current = until_synced(&mut watch).await;
    assert_eq!(current.len(), 2);
    assert!(current
        .iter()
        .all(|e| e.vm.as_ref().is_some_and(|v| v.readopted)));
    for id in [a, b] {
        client = manager.client().await;
        client
            .remove_vm(RemoveReq { cvm_id: id })
            .await
            .expect("RemoveVm");
    }
    assert_nothing_left(&manager).await;
}

#[tokio::test]
async fn get_vm_describes_the_launch_and_bad_requests_are_refused() {
    let manager = start_on_stand_in(free_port_range(4), &[]);
    let mut client = manager.client().await;
    let created = client
        .create_vm(CreateReq {
            aa_kbs_params: "kbs:http://10.0.2.2:8080".into(),
            ..Default::default()
        })
        .await
        .expect("CreateVm")
        .into_inner();
    let id = created.cvm_id;
    let mut op = operator(&manager).await;
    let got = op
        .get_vm(GetVmRequest { id: id.clone() })
        .await
        .expect("GetVm")
        .into_inner();
    let vm = got.vm.expect("vm");
    assert_eq!(vm.id, id);
    assert_eq!(vm.port.to_string(), created.forwarded_port);
    let argv = &got.command_line;
    assert!(
        argv.first().is_some_and(|p| p.ends_with("qemu-stand-in")),
        "{argv:?}"
    );
    assert!(argv.iter().any(|a| a == &format!("cocos-{id}")), "{argv:?}");
    let launch = got.launch.expect("launch config");
    assert_eq!(launch.aa_kbs_params, "kbs:http://10.0.2.2:8080");
    assert_eq!(
        launch.settings.get("MANAGER_QEMU_HOST_FWD_RANGE"),
        Some(&format!("{}-{}", manager.range.0, manager.range.1))
    );
    // The Cocos CVMInfo and GetVm agree.
    let info = info(&mut client, &id).await;
    assert_eq!(
        (launch.cpu_num, &launch.kernel_cmd, &launch.cpu_type),
        (info.cpu_num, &info.kernel_cmd, &info.cpu_type)
    );

    let unknown = "00000000-0000-0000-0000-000000000000".to_string();
    let code = op
        .get_vm(GetVmRequest {
            id: unknown.clone(),
        })
        .await
        .expect_err("unknown id");
    assert_eq!(code.code(), Code::NotFound);
    assert!(code.message().contains(&unknown), "{}", code.message());
    let code = op
        .get_vm(GetVmRequest { id: String::new() })
        .await
        .expect_err("empty id");
    assert_eq!(code.code(), Code::InvalidArgument);
    let code = op
        .watch_events(WatchEventsRequest {
            id: unknown.clone(),
        })
        .await
        .expect_err("unknown id");
    assert_eq!(code.code(), Code::NotFound);
    let logs = |id: &str, source: i32, tail_lines: u32| StreamLogsRequest {
        id: id.to_string(),
        source,
        tail_lines,
        follow: false,
    };
    let code = op
        .stream_logs(logs(&unknown, 0, 10))
        .await
        .expect_err("unknown id");
    assert_eq!(code.code(), Code::NotFound);
    let code = op
        .stream_logs(logs(&id, 7, 10))
        .await
        .expect_err("unknown source");
    assert_eq!(code.code(), Code::InvalidArgument);
    assert!(code.message().contains("source"), "{}", code.message());
    let code = op
        .stream_logs(logs(&id, 0, 10_000_000))
        .await
        .expect_err("too many lines");
    assert_eq!(code.code(), Code::InvalidArgument);
    // A log that is there: read to its end, the stream ends.
    let mut qemu_log = op
        .stream_logs(logs(&id, LogSource::Qemu as i32, 100))
        .await
        .expect("StreamLogs")
        .into_inner();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = qemu_log.message().await.expect("line") {
            assert_eq!(line.source(), LogSource::Qemu);
        }
    })
    .await;
    assert!(ended.is_ok(), "a log without follow did not end");

    client
        .remove_vm(RemoveReq { cvm_id: id.clone() })
        .await
        .expect("RemoveVm");
    let code = op.get_vm(GetVmRequest { id }).await.expect_err("removed");
    assert_eq!(code.code(), Code::NotFound);
    assert_nothing_left(&manager).await;
}

/// Reads log lines until one contains `needle`; all lines read so far.
async fn read_until(
    stream: &mut Streaming<cocos_core::operator_proto::LogLine>,
    lines: &mut Vec<String>,
    needle: &str,
    limit: Duration,
) {
    let found = tokio::time::timeout(limit, async {
        while let Some(line) = stream.message().await.expect("StreamLogs") {
            let text = String::from_utf8_lossy(&line.line).into_owned();
            let hit = text.contains(needle);
            lines.push(text);
            if hit {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        found == Ok(true),
        "no line with {needle:?} (ended: {:?}); lines:\n{}",
        found,
        lines.join("\n")
    );
}

#[tokio::test]
async fn stream_logs_of_a_real_guest_shows_boot_and_follows_until_removed() {
    let manager = Manager::start(&[]);
    let mut client = manager.client().await;
    let (id, port) = create(&mut client).await;
    let mut op = operator(&manager).await;
    let mut follow = op
        .stream_logs(StreamLogsRequest {
            id: id.clone(),
            source: LogSource::Console as i32,
            tail_lines: 10_000,
            follow: true,
        })
        .await
        .expect("StreamLogs")
        .into_inner();
    let mut lines = Vec::new();
    // Boot lines of the dev guest's init, as they come.
    read_until(
        &mut follow,
        &mut lines,
        "dev-guest: host data v1",
        Duration::from_secs(240),
    )
    .await;
    agent_ok(port).await;
    // Without follow: the last lines, and the stream ends.
    let mut tail = op
        .stream_logs(StreamLogsRequest {
            id: id.clone(),
            source: LogSource::Console as i32,
            tail_lines: 3,
            follow: false,
        })
        .await
        .expect("StreamLogs")
        .into_inner();
    let mut tail_lines = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = tail.message().await.expect("line") {
            tail_lines.push(line.line);
        }
    })
    .await
    .expect("the tail ends");
    assert!(
        !tail_lines.is_empty() && tail_lines.len() <= 3,
        "{tail_lines:?}"
    );

    // The remove presses the ACPI power button: the guest says so on its
    // console, the follower sees that new line, then its stream ends.
    let remover = tokio::spawn({
        let mut client = client.clone();
        let id = id.clone();
        async move { client.remove_vm(RemoveReq { cvm_id: id }).await }
    });
    read_until(
        &mut follow,
        &mut lines,
        "ACPI power button pressed",
        Duration::from_secs(60),
    )
    .await;
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        while follow.message().await.expect("line").is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the follow did not end after the remove");
    remover.await.expect("join").expect("RemoveVm");
    let boot = lines
        .iter()
        .position(|l| l.contains("dev-guest: host data v1"))
        .expect("boot line");
    let button = lines
        .iter()
        .position(|l| l.contains("ACPI power button pressed"))
        .expect("power button line");
    assert!(boot < button);
    assert_nothing_left(&manager).await;
}
