//! Attestation with real QEMU and the development guest: the per-VM host
//! data the manager computes equals what the guest computes from the files
//! it sees (`GET /hostdata`), and each VM's swtpm gives it a TPM whose PCRs
//! OVMF and the kernel's EFI stub fill the same way for the same launch
//! (`GET /pcrs`); the swtpm lives and dies with its VM, across a manager
//! restart too.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use cocos_core::proto::{CreateReq, RemoveReq};
use common::*;

fn request(aa: &str) -> CreateReq {
    CreateReq {
        agent_log_level: "info".into(),
        agent_cvm_server_ca_cert: b"-----BEGIN CERTIFICATE-----\nCA\n".to_vec(),
        agent_cvm_client_cert: b"client cert\n".to_vec(),
        agent_cvm_client_key: b"client key\n".to_vec(),
        agent_cvm_server_url: "computations.example:7001".into(),
        aa_kbs_params: aa.into(),
        ..Default::default()
    }
}

/// The manager's per-VM digest of `id`, from its "attestation state" log line.
fn logged_digest(manager: &Manager, id: &str) -> String {
    let log = manager.log();
    let line = log
        .lines()
        .find(|l| l.contains("attestation state") && l.contains(id))
        .unwrap_or_else(|| panic!("no attestation state logged for {id}:\n{log}"));
    let b64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("per_vm_digest="))
        .unwrap_or_else(|| panic!("no per_vm_digest in {line}"));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim_matches('"'))
        .expect("base64");
    hex(&bytes)
}

async fn get(port: u16, path: &'static str) -> (u16, String) {
    tokio::task::spawn_blocking(move || http_get(port, path))
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

async fn pcrs(port: u16) -> BTreeMap<u32, String> {
    let (status, body) = get(port, "/pcrs").await;
    assert_eq!(status, 200, "GET /pcrs: {body}");
    body.lines()
        .map(|line| {
            let (index, value) = line.split_once(' ').expect("index hex");
            (index.parse().expect("index"), value.to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_sees_its_host_data_and_swtpm_pcrs_follow_the_launch() {
    require_tool("swtpm");
    let mut manager = Manager::start(&[
        ("MANAGER_QEMU_VTPM", "swtpm"),
        ("MANAGER_QEMU_ENABLE_HOST_DATA", "true"),
    ]);
    let mut client = manager.client().await;
    let aa_1 = "provider:kbs::http://kbs-1:8080";
    let aa_2 = "provider:kbs::http://kbs-2:8080";
    let (mut c1, mut c2, mut c3) = (client.clone(), client.clone(), client.clone());
    let (a, b, c) = tokio::join!(
        c1.create_vm(request(aa_1)),
        c2.create_vm(request(aa_1)),
        c3.create_vm(request(aa_2)),
    );
    let vms: Vec<(String, u16)> = [a, b, c]
        .into_iter()
        .map(|r| {
            let r = r.unwrap_or_else(|e| panic!("CreateVm: {e}")).into_inner();
            (r.cvm_id, r.forwarded_port.parse().expect("port"))
        })
        .collect();
    for (_, port) in &vms {
        agent_ok(*port).await;
    }

    let mut all_pcrs = Vec::new();
    for (id, port) in &vms {
        let (status, guest) = get(*port, "/hostdata").await;
        assert_eq!(status, 200, "GET /hostdata: {guest}");
        let guest = guest.trim().to_string();
        assert_eq!(
            guest,
            logged_digest(&manager, id),
            "VM {id}: guest vs manager"
        );
        assert_eq!(
            guest,
            hex(&recompute_host_data(&manager.vms_dir().join(id))),
            "VM {id}: guest vs test"
        );
        assert!(
            manager.vms_dir().join(id).join("tpm").is_dir(),
            "the swtpm state lives in the VM's folder"
        );
        let pcrs = pcrs(*port).await;
        assert_eq!(
            pcrs.keys().copied().collect::<Vec<_>>(),
            (0..=9).collect::<Vec<_>>()
        );
        for index in [0, 1, 2, 3, 4, 5, 6, 7, 9] {
            assert_ne!(
                pcrs[&index],
                "0".repeat(64),
                "VM {id}: PCR {index} is measured"
            );
        }
        all_pcrs.push(pcrs);
    }
    assert_eq!(
        all_pcrs[0], all_pcrs[1],
        "the same request gives the same PCRs"
    );
    let differing: Vec<u32> = (0..=9)
        .filter(|i| all_pcrs[0][i] != all_pcrs[2][i])
        .collect();
    assert_eq!(
        differing,
        vec![9],
        "aa_kbs_params changes the command line, so PCR 9 only"
    );
    // Host data binds the VM id (in its env file): it differs per VM.
    assert_ne!(
        logged_digest(&manager, &vms[0].0),
        logged_digest(&manager, &vms[1].0)
    );

    for (id, _) in &vms[1..] {
        client
            .remove_vm(RemoveReq { cvm_id: id.clone() })
            .await
            .expect("RemoveVm");
    }
    // A manager killed outright: the next one re-adopts the VM and its swtpm.
    let state = manager.state_dir.path().to_string_lossy().into_owned();
    let swtpm_before = swtpm_pids_matching(&vms[0].0);
    assert_eq!(swtpm_before.len(), 1, "one swtpm for the VM left");
    manager.stop_with(nix::sys::signal::Signal::SIGKILL, Duration::from_secs(10));
    manager.spawn();
    let mut client = manager.client().await;
    assert_eq!(pcrs(vms[0].1).await, all_pcrs[0], "the TPM still answers");
    assert_eq!(swtpm_pids_matching(&vms[0].0), swtpm_before);
    client
        .remove_vm(RemoveReq {
            cvm_id: vms[0].0.clone(),
        })
        .await
        .expect("RemoveVm");
    assert!(swtpm_pids_matching(&state).is_empty(), "no swtpm left");
    assert_nothing_left(&manager).await;
}
