//! Load without loss, with the stand-in QEMU (a test double; a few hundred
//! real guests do not fit on a 2-core CI machine): many clients create,
//! query and remove concurrently while some VMs crash. Every request must
//! get a correct answer, no VM may be lost or duplicated, no port handed
//! out twice, and nothing may be left at the end.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cocos_core::proto::{CreateReq, CvmInfoReq, RemoveReq};
use common::*;
use tonic::Code;

const CLIENTS: usize = 16;
const ROUNDS: usize = 20;
const KEEP: usize = 6;

#[derive(Default)]
struct Ledger {
    /// Ports held by VMs the clients believe alive, and by whom.
    live: HashMap<u16, String>,
    /// Ports whose VM is being removed: the manager may hand them out again
    /// as soon as the remove has finished inside it.
    releasing: HashSet<u16>,
    ids: HashSet<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_with_crashing_vms_lose_nothing() {
    let range = free_port_range(400);
    let manager = start_on_stand_in(
        range,
        &[
            ("MANAGER_MAX_VMS", "0"),
            ("MANAGER_LOG_LEVEL", "info"),
            ("MANAGER_STOP_POWERDOWN_TIMEOUT", "2s"),
            ("MANAGER_RESTART_BACKOFF_INITIAL", "50ms"),
            ("MANAGER_RESTART_BACKOFF_MAX", "200ms"),
            ("MANAGER_RESTART_MAX_RESTARTS", "50"),
            ("STAND_IN_CRASH_AFTER", "300ms"),
            ("STAND_IN_CRASH_PROBABILITY", "0.15"),
        ],
    );
    let client = manager.client().await;
    let ledger = Arc::new(Mutex::new(Ledger::default()));

    let workers = (0..CLIENTS).map(|w| {
        let mut client = client.clone();
        let ledger = ledger.clone();
        tokio::spawn(async move {
            let mut kept = Vec::new();
            for round in 0..ROUNDS {
                let created = client
                    .create_vm(CreateReq {
                        agent_log_level: format!("w{w}r{round}"),
                        ..Default::default()
                    })
                    .await
                    .unwrap_or_else(|e| panic!("CreateVm failed: {e}"))
                    .into_inner();
                let port: u16 = created.forwarded_port.parse().expect("port");
                {
                    let mut l = ledger.lock().expect("ledger");
                    assert!(l.ids.insert(created.cvm_id.clone()), "id handed out twice");
                    if let Some(holder) = l.live.get(&port) {
                        assert!(
                            l.releasing.contains(&port),
                            "port {port} handed out twice (held by {holder})"
                        );
                    }
                    l.releasing.remove(&port);
                    l.live.insert(port, created.cvm_id.clone());
                }
                let info = client
                    .cvm_info(CvmInfoReq {
                        id: created.cvm_id.clone(),
                    })
                    .await
                    .unwrap_or_else(|e| panic!("CVMInfo of a live VM failed: {e}"))
                    .into_inner();
                assert_eq!(info.id, created.cvm_id);
                if round % (ROUNDS / KEEP) == 0 {
                    kept.push((created.cvm_id, port));
                    continue;
                }
                ledger.lock().expect("ledger").releasing.insert(port);
                client
                    .remove_vm(RemoveReq {
                        cvm_id: created.cvm_id.clone(),
                    })
                    .await
                    .unwrap_or_else(|e| panic!("RemoveVm failed: {e}"));
                let mut l = ledger.lock().expect("ledger");
                if l.live.get(&port) == Some(&created.cvm_id) {
                    l.live.remove(&port);
                    l.releasing.remove(&port);
                }
            }
            kept
        })
    });
    let mut kept = Vec::new();
    for worker in workers.collect::<Vec<_>>() {
        kept.extend(worker.await.expect("client task"));
    }
    let created = ledger.lock().expect("ledger").ids.len();
    assert_eq!(created, CLIENTS * ROUNDS);
    assert!(
        manager.log().contains("restarting VM"),
        "no crash was exercised"
    );

    // Every kept VM is still there (crashes were restarted), then removed.
    let mut client = client;
    for (id, _) in &kept {
        client
            .cvm_info(CvmInfoReq { id: id.clone() })
            .await
            .expect("kept VM lost");
    }
    let removes = kept.iter().map(|(id, _)| {
        let mut c = client.clone();
        let id = id.clone();
        tokio::spawn(async move { c.remove_vm(RemoveReq { cvm_id: id }).await })
    });
    for r in removes.collect::<Vec<_>>() {
        r.await.expect("task").expect("RemoveVm of a kept VM");
    }
    let ids: Vec<String> = ledger.lock().expect("ledger").ids.iter().cloned().collect();
    for id in ids {
        let err = client
            .cvm_info(CvmInfoReq { id })
            .await
            .expect_err("all removed");
        assert_eq!(err.code(), Code::NotFound);
    }

    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chatty_console_cannot_fill_the_disk() {
    let range = free_port_range(2);
    let manager = start_on_stand_in(
        range,
        &[
            ("MANAGER_VM_LOG_MAX_SIZE", "64K"),
            ("MANAGER_VM_LOG_FILES", "2"),
            ("STAND_IN_CONSOLE_SPAM", "2000000"),
        ],
    );
    let mut client = manager.client().await;
    let vm = client
        .create_vm(CreateReq::default())
        .await
        .expect("CreateVm")
        .into_inner();
    let dir = manager.vms_dir().join(&vm.cvm_id);
    assert!(
        eventually(Duration::from_secs(20), || dir
            .join("console.log.1")
            .exists())
        .await,
        "the console log was never rotated"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let size = |name: &str| {
        std::fs::metadata(dir.join(name))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    assert!(size("console.log") <= 64 * 1024);
    assert_eq!(size("console.log.1"), 64 * 1024);
    assert!(
        !dir.join("console.log.2").exists(),
        "more files kept than MANAGER_VM_LOG_FILES"
    );
    client
        .remove_vm(RemoveReq { cvm_id: vm.cvm_id })
        .await
        .expect("RemoveVm");
}
