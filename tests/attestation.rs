//! `AttestationPolicy` end to end over gRPC. SEV-SNP cannot run on this
//! host, so these VMs run the stand-in QEMU (a test double that accepts the
//! SNP command line) on firmware the tests build themselves; the launch
//! digests are checked against the reference tool `sev-snp-measure`, run
//! here on the same files. The real-guest half (host data seen inside the
//! guest, vTPM PCRs) is in `attestation_guest.rs`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use cocos_core::attestation::snp::test_firmware;
use cocos_core::proto::{AttestationPolicyReq, CreateReq};
use common::*;
use tonic::Code;

const CMDLINE: &str = "console=ttyS0 quiet";

fn b64d(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap_or_else(|e| panic!("not base64 {text:?}: {e}"))
}

/// Firmware, kernel and initrd made by the test, and the PCR file.
struct Inputs {
    dir: tempfile::TempDir,
}

impl Inputs {
    fn new(kernel_hashes: bool) -> Inputs {
        let dir = tempfile::tempdir().expect("dir");
        let write = |name: &str, bytes: Vec<u8>| {
            std::fs::write(dir.path().join(name), bytes).expect("write input");
        };
        write("ovmf.fd", test_firmware::build(kernel_hashes));
        write("bzImage", test_firmware::kernel_bytes(1, 300_000));
        write("initrd", test_firmware::kernel_bytes(2, 70_000));
        let pcrs = serde_json::json!({
            "sha256": {"0": "11".repeat(32), "9": "22".repeat(32)},
            "sha384": {"0": "33".repeat(48)}
        });
        write("pcrs.json", pcrs.to_string().into_bytes());
        Inputs { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn pcrs(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.path("pcrs.json")).expect("pcrs")).expect("json")
    }
}

fn snp_manager(inputs: &Inputs, extra: &[(&str, &str)]) -> Manager {
    let ovmf = inputs.path("ovmf.fd");
    let kernel = inputs.path("bzImage");
    let initrd = inputs.path("initrd");
    let pcrs = inputs.path("pcrs.json");
    let mut env: Vec<(&str, String)> = vec![
        ("MANAGER_QEMU_ENABLE_SEV_SNP", "true".into()),
        ("MANAGER_QEMU_IGVM_FILE", String::new()),
        ("MANAGER_QEMU_OVMF_CODE_FILE", ovmf.display().to_string()),
        (
            "MANAGER_QEMU_DISK_IMG_KERNEL_FILE",
            kernel.display().to_string(),
        ),
        (
            "MANAGER_QEMU_DISK_IMG_ROOTFS_FILE",
            initrd.display().to_string(),
        ),
        ("MANAGER_QEMU_KERNEL_CMDLINE", CMDLINE.into()),
        ("MANAGER_QEMU_CPU", "EPYC-v4".into()),
        ("MANAGER_QEMU_SMP_COUNT", "2".into()),
        ("MANAGER_QEMU_ENABLE_HOST_DATA", "true".into()),
        ("MANAGER_PCR_VALUES", pcrs.display().to_string()),
    ];
    for (k, v) in extra {
        env.push((k, v.to_string()));
    }
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    start_on_stand_in(free_port_range(6), &refs)
}

/// The reference tool's digest for the same launch (hex).
fn reference_digest(inputs: &Inputs, append: &str) -> String {
    let python = require_tool("python3");
    let out = Command::new(python)
        .args(["-m", "sevsnpmeasure.cli", "--mode", "snp", "--vcpus", "2"])
        .args(["--vcpu-type", "EPYC-v4", "--output-format", "hex"])
        .arg("--ovmf")
        .arg(inputs.path("ovmf.fd"))
        .arg("--kernel")
        .arg(inputs.path("bzImage"))
        .arg("--initrd")
        .arg(inputs.path("initrd"))
        .arg("--append")
        .arg(append)
        .output()
        .expect("run sev-snp-measure");
    assert!(
        out.status.success(),
        "sev-snp-measure (PyPI package sev-snp-measure; packaging/host-tools.sh install): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_lowercase()
}

async fn policy(client: &mut Client, id: &str) -> Result<serde_json::Value, tonic::Status> {
    let res = client
        .attestation_policy(AttestationPolicyReq { id: id.to_string() })
        .await?
        .into_inner();
    assert_eq!(res.id, id);
    Ok(serde_json::from_slice(&res.info).expect("the policy is JSON"))
}

/// The `host-data=` value on the VM's QEMU command line (from its record).
fn host_data_on_command_line(vm_dir: &Path) -> String {
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vm_dir.join("record.json")).expect("record"))
            .expect("record json");
    let argv: Vec<String> = serde_json::from_value(record["argv"].clone()).expect("argv");
    let sev = argv
        .iter()
        .find(|a| a.starts_with("sev-snp-guest,"))
        .expect("a sev-snp-guest object");
    assert!(sev.contains(",kernel-hashes=on"), "{sev}");
    sev.split(',')
        .find_map(|kv| kv.strip_prefix("host-data="))
        .expect("host-data= on the command line")
        .to_string()
}

fn request(aa: &str) -> CreateReq {
    CreateReq {
        agent_log_level: "info".into(),
        agent_cvm_server_ca_cert: b"-----BEGIN CERTIFICATE-----\nCA\n".to_vec(),
        agent_cvm_client_cert: b"client cert".to_vec(),
        agent_cvm_client_key: b"client key (secret)".to_vec(),
        agent_cvm_server_url: "computations.example:7001".into(),
        aa_kbs_params: aa.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snp_policy_is_the_reference_measurement_of_each_vms_own_launch() {
    let inputs = Inputs::new(true);
    let mut manager = snp_manager(&inputs, &[]);
    let mut client = manager.client().await;

    let mut vms = Vec::new();
    for aa in [
        "provider:kbs::http://kbs-a:8080",
        "provider:kbs::http://kbs-b:8080",
    ] {
        let created = client
            .create_vm(request(aa))
            .await
            .unwrap_or_else(|e| panic!("CreateVm: {e}"))
            .into_inner();
        vms.push((created.cvm_id, aa));
    }
    let mut measurements = Vec::new();
    let mut documents = Vec::new();
    for (id, aa) in &vms {
        let doc = policy(&mut client, id).await.expect("AttestationPolicy");
        let measurement = b64d(doc["policy"]["measurement"].as_str().expect("measurement"));
        assert_eq!(measurement.len(), 48);
        let expected = reference_digest(&inputs, &format!("{CMDLINE} agent.aa_kbc_params={aa}"));
        assert_eq!(hex(&measurement), expected, "VM {id} ({aa})");
        measurements.push(measurement);

        let vm_dir = manager.vms_dir().join(id);
        let host_data = doc["policy"]["host_data"].as_str().expect("host_data");
        assert_eq!(b64d(host_data), recompute_host_data(&vm_dir), "VM {id}");
        assert_eq!(host_data_on_command_line(&vm_dir), host_data, "VM {id}");

        assert_eq!(doc["pcr_values"], inputs.pcrs());
        assert_eq!(doc["policy"]["policy"], serde_json::json!(196608));
        assert_eq!(doc["policy"]["vmpl"], serde_json::json!(0));
        documents.push(doc);
    }
    assert_ne!(
        measurements[0], measurements[1],
        "aa_kbs_params is on the measured command line"
    );

    // Unknown id.
    let err = policy(&mut client, "no-such-vm")
        .await
        .expect_err("unknown id");
    assert_eq!(err.code(), Code::NotFound, "{err}");

    // kill -9 of the manager, a new one: the same document for the same VM.
    manager.stop_with(nix::sys::signal::Signal::SIGKILL, Duration::from_secs(10));
    manager.spawn();
    let mut client = manager.client().await;
    for ((id, _), before) in vms.iter().zip(&documents) {
        let after = policy(&mut client, id).await.expect("after restart");
        assert_eq!(&after, before, "VM {id}");
    }
    for (id, _) in &vms {
        client
            .remove_vm(cocos_core::proto::RemoveReq { cvm_id: id.clone() })
            .await
            .expect("RemoveVm");
    }
    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_without_kernel_hashes_refuses_the_create_and_leaves_nothing() {
    let inputs = Inputs::new(false);
    let manager = snp_manager(&inputs, &[]);
    let mut client = manager.client().await;
    let err = client
        .create_vm(request("x"))
        .await
        .expect_err("no kernel-hashes table: no measurement, no launch");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(
        err.message().contains("kernel-hashes") || err.message().contains("KERNEL_HASHES"),
        "the cause is named: {}",
        err.message()
    );
    assert_nothing_left(&manager).await;
    assert!(
        !manager.log().contains("starting QEMU"),
        "nothing was launched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_vm_has_no_launch_measurement() {
    let manager = start_on_stand_in(
        free_port_range(4),
        &[("MANAGER_QEMU_ENABLE_SEV_SNP", "false")],
    );
    let mut client = manager.client().await;
    let (id, _) = create(&mut client).await;
    let err = policy(&mut client, &id).await.expect_err("plain VM");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(
        err.message().contains("no launch measurement"),
        "{}",
        err.message()
    );
    client
        .remove_vm(cocos_core::proto::RemoveReq { cvm_id: id })
        .await
        .expect("RemoveVm");
    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn igvm_launch_is_measured_from_the_igvm_file() {
    use cocos_core::attestation::igvm;
    let inputs = Inputs::new(true);
    let file = inputs.path("coconut.igvm");
    // A parameter area of three pages: QEMU measures every page of it.
    let bytes = igvm::test_igvm::build(3);
    std::fs::write(&file, &bytes).expect("write igvm");
    let manager = snp_manager(
        &inputs,
        &[("MANAGER_QEMU_IGVM_FILE", &file.display().to_string())],
    );
    let mut client = manager.client().await;
    let created = client
        .create_vm(request(""))
        .await
        .expect("CreateVm")
        .into_inner();
    let doc = policy(&mut client, &created.cvm_id).await.expect("policy");
    let expected = igvm::snp_launch_digest(&bytes).expect("digest");
    assert_eq!(
        b64d(doc["policy"]["measurement"].as_str().expect("measurement")),
        expected.to_vec()
    );
    assert_eq!(
        doc["policy"]["vmpl"],
        serde_json::json!(2),
        "the guest runs at VMPL2 under SVSM"
    );
    client
        .remove_vm(cocos_core::proto::RemoveReq {
            cvm_id: created.cvm_id,
        })
        .await
        .expect("RemoveVm");
    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tdx_answers_the_operators_document_or_refuses() {
    let inputs = Inputs::new(true);
    let base = inputs.path("base.json");
    std::fs::write(
        &base,
        r#"{"policy": {"mr_td": "b3BlcmF0b3I="}, "root_of_trust": {"product": "TDX"}}"#,
    )
    .expect("base");
    let tdx = [
        ("MANAGER_QEMU_ENABLE_SEV_SNP", "false"),
        ("MANAGER_QEMU_ENABLE_TDX", "true"),
    ];
    // Without a base document: refused, never invented.
    let manager = start_on_stand_in(free_port_range(4), &tdx);
    let mut client = manager.client().await;
    let (id, _) = create(&mut client).await;
    let err = policy(&mut client, &id).await.expect_err("no TDX document");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    client
        .remove_vm(cocos_core::proto::RemoveReq { cvm_id: id })
        .await
        .expect("RemoveVm");
    drop(manager);

    let base_env = base.display().to_string();
    let pcrs = inputs.path("pcrs.json").display().to_string();
    let mut with_base = tdx.to_vec();
    with_base.push(("MANAGER_ATTESTATION_BASE_POLICY", &base_env));
    with_base.push(("MANAGER_PCR_VALUES", &pcrs));
    let manager = start_on_stand_in(free_port_range(4), &with_base);
    let mut client = manager.client().await;
    let (id, _) = create(&mut client).await;
    let doc = policy(&mut client, &id)
        .await
        .expect("TDX with a base document");
    assert_eq!(doc["policy"]["mr_td"], serde_json::json!("b3BlcmF0b3I="));
    assert_eq!(doc["pcr_values"], inputs.pcrs());
    assert!(doc["policy"].get("measurement").is_none());
    client
        .remove_vm(cocos_core::proto::RemoveReq { cvm_id: id })
        .await
        .expect("RemoveVm");
    assert_nothing_left(&manager).await;
}

fn hup(manager: &Manager) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(manager.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pcr_values_are_checked_at_start_and_on_sighup() {
    let inputs = Inputs::new(true);
    // A bad file refuses the start, naming the file and the entry.
    let bad = inputs.path("bad-pcrs.json");
    std::fs::write(&bad, r#"{"sha256": {"0": "not hex"}}"#).expect("write");
    let out = Command::new(manager_binary())
        .env_clear()
        .env("MANAGER_PCR_VALUES", &bad)
        .env("MANAGER_STATE_DIR", inputs.path("state"))
        .env("MANAGER_GRPC_PORT", free_port().to_string())
        .env("MANAGER_HTTP_PORT", free_port().to_string())
        .output()
        .expect("run the manager");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("MANAGER_PCR_VALUES")
            && stderr.contains("bad-pcrs.json")
            && stderr.contains("PCR 0"),
        "{stderr}"
    );

    // A running manager: a bad new file is refused, the old values stay;
    // a good one is used for VMs created afterwards, not for those before.
    let manager = snp_manager(&inputs, &[]);
    let mut client = manager.client().await;
    let first = client
        .create_vm(request(""))
        .await
        .expect("CreateVm")
        .into_inner()
        .cvm_id;
    let pcr_file = inputs.path("pcrs.json");
    let original = std::fs::read(&pcr_file).expect("pcrs");
    std::fs::write(&pcr_file, b"{\"sha256\": {\"99\": \"00\"}}").expect("write");
    hup(&manager);
    let refused = || manager.log().contains("reload refused");
    assert!(
        eventually(Duration::from_secs(10), refused).await,
        "{}",
        manager.log()
    );
    assert!(manager.log().contains("0 to 23"), "the reason is logged");
    let second = client
        .create_vm(request(""))
        .await
        .expect("CreateVm")
        .into_inner()
        .cvm_id;
    let doc = policy(&mut client, &second).await.expect("policy");
    assert_eq!(
        doc["pcr_values"],
        serde_json::from_slice::<serde_json::Value>(&original).expect("json"),
        "the old values stay in force"
    );

    let new_pcrs = serde_json::json!({"sha256": {"7": "44".repeat(32)}});
    std::fs::write(&pcr_file, new_pcrs.to_string()).expect("write");
    hup(&manager);
    let reread = || manager.log().contains("attestation files read again");
    assert!(
        eventually(Duration::from_secs(10), reread).await,
        "{}",
        manager.log()
    );
    let third = client
        .create_vm(request(""))
        .await
        .expect("CreateVm")
        .into_inner()
        .cvm_id;
    assert_eq!(
        policy(&mut client, &third).await.expect("policy")["pcr_values"],
        new_pcrs
    );
    assert_eq!(
        policy(&mut client, &first).await.expect("policy")["pcr_values"],
        serde_json::from_slice::<serde_json::Value>(&original).expect("json"),
        "a VM keeps the document it was created with"
    );
    for id in [first, second, third] {
        client
            .remove_vm(cocos_core::proto::RemoveReq { cvm_id: id })
            .await
            .expect("RemoveVm");
    }
    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_policy_binary_gives_the_base_document() {
    use std::os::unix::fs::PermissionsExt;
    let inputs = Inputs::new(true);
    // Stands in for the original's attestation_policy tool (reads /dev/sev).
    let tool = inputs.path("attestation_policy");
    let chip = base64::engine::general_purpose::STANDARD.encode([0xc1u8; 64]);
    std::fs::write(
        &tool,
        format!(
            "#!/bin/sh\n[ \"$1 $2\" = \"--policy 196608\" ] || exit 3\n\
             echo '{{\"policy\": {{\"chip_id\": \"{chip}\", \"minimum_tcb\": 7, \"measurement\": \"theirs\"}}, \"root_of_trust\": {{\"product\": \"Milan\"}}}}'\n"
        ),
    )
    .expect("write tool");
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let manager = snp_manager(
        &inputs,
        &[(
            "MANAGER_ATTESTATION_POLICY_BINARY",
            &tool.display().to_string(),
        )],
    );
    assert!(
        !manager.log().contains("no chip_id"),
        "the base document gives the chip id: no warning"
    );
    let mut client = manager.client().await;
    let id = client
        .create_vm(request(""))
        .await
        .expect("CreateVm")
        .into_inner()
        .cvm_id;
    let doc = policy(&mut client, &id).await.expect("policy");
    assert_eq!(doc["policy"]["chip_id"], serde_json::json!(chip));
    assert_eq!(doc["policy"]["minimum_tcb"], serde_json::json!(7));
    assert_eq!(doc["root_of_trust"]["product"], serde_json::json!("Milan"));
    let measurement = b64d(doc["policy"]["measurement"].as_str().expect("ours"));
    assert_eq!(
        hex(&measurement),
        reference_digest(&inputs, CMDLINE),
        "the measurement is ours"
    );
    client
        .remove_vm(cocos_core::proto::RemoveReq { cvm_id: id })
        .await
        .expect("RemoveVm");
    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_platform_facts_the_start_warns_once() {
    let inputs = Inputs::new(true);
    let manager = snp_manager(&inputs, &[]);
    let warnings = manager
        .log()
        .matches("no chip_id and no TCB floors")
        .count();
    assert_eq!(warnings, 1, "{}", manager.log());
}

#[test]
fn print_attestation_policy_shows_what_an_empty_request_would_get() {
    let inputs = Inputs::new(true);
    let run = |snp: &str| {
        Command::new(manager_binary())
            .env_clear()
            .env("MANAGER_QEMU_ENABLE_SEV_SNP", snp)
            .env("MANAGER_QEMU_IGVM_FILE", "")
            .env("MANAGER_QEMU_OVMF_CODE_FILE", inputs.path("ovmf.fd"))
            .env("MANAGER_QEMU_DISK_IMG_KERNEL_FILE", inputs.path("bzImage"))
            .env("MANAGER_QEMU_DISK_IMG_ROOTFS_FILE", inputs.path("initrd"))
            .env("MANAGER_QEMU_KERNEL_CMDLINE", CMDLINE)
            .env("MANAGER_QEMU_CPU", "EPYC-v4")
            .env("MANAGER_QEMU_SMP_COUNT", "2")
            .env("MANAGER_PCR_VALUES", inputs.path("pcrs.json"))
            .env("MANAGER_STATE_DIR", inputs.path("state"))
            .arg("--print-attestation-policy")
            .output()
            .expect("run the manager")
    };
    let out = run("true");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let measurement = b64d(doc["policy"]["measurement"].as_str().expect("measurement"));
    assert_eq!(hex(&measurement), reference_digest(&inputs, CMDLINE));
    assert_eq!(doc["pcr_values"], inputs.pcrs());
    assert!(!inputs.path("state/vms").exists(), "nothing was started");

    let out = run("false");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no launch measurement"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
