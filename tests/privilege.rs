//! Least privilege with real QEMU and the development guest: QEMU (and its
//! swtpm) run as the development profile's unprivileged user (`nobody`) in
//! QEMU's seccomp sandbox, each VM's files are reachable by its own
//! processes only, the secrets are the QEMU user's alone, and nothing is
//! left after removal. Run as root (the manager drops privileges).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cocos_core::proto::{CreateReq, RemoveReq};
use common::*;
use tonic::Code;

const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;
const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The ids of a `/proc/<pid>/status` line such as `Uid:` (real, effective,
/// saved, filesystem).
fn status_ids(pid: i32, field: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
        .split_whitespace()
        .map(|n| n.parse().expect("id"))
        .collect()
}

fn status_field(pid: i32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .expect("cmdline")
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// `cat path` as uid nobody, gid nogroup and exactly `groups` (util-linux's
/// setpriv): its output, or its error.
fn cat_as_nobody(groups: &[u32], path: &Path) -> Result<String, String> {
    let groups = if groups.is_empty() {
        "--clear-groups".to_string()
    } else {
        format!(
            "--groups={}",
            groups
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    let out = Command::new(require_tool("setpriv"))
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOGROUP}"),
            &groups,
            "cat",
        ])
        .arg(path)
        .output()
        .expect("run setpriv");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn request(key: &str) -> CreateReq {
    CreateReq {
        agent_cvm_client_key: key.as_bytes().to_vec(),
        agent_cvm_client_cert: b"-----BEGIN CERTIFICATE-----\n".to_vec(),
        aws_secret_access_key: format!("aws-{key}"),
        ..Default::default()
    }
}

/// Owner, group and permission bits of `path`.
fn owner_mode(path: &Path) -> (u32, u32, u32) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.uid(), meta.gid(), meta.permissions().mode() & 0o7777)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_runs_as_nobody_in_its_sandbox_and_cannot_reach_another_vm() {
    let manager = Manager::start(&[]);
    let mut client = manager.client().await;
    let mut vms = Vec::new();
    for key in ["key-of-a", "key-of-b"] {
        let created = client
            .create_vm(request(key))
            .await
            .unwrap_or_else(|e| panic!("CreateVm: {e}"))
            .into_inner();
        let port: u16 = created.forwarded_port.parse().expect("port");
        vms.push((created.cvm_id, port, key));
    }
    for (_, port, _) in &vms {
        agent_ok(*port).await;
    }

    let state = manager.state_dir.path().join("state");
    // The state directory and vms/ let QEMU's user through, listing nothing.
    for dir in [state.clone(), manager.vms_dir()] {
        assert_eq!(owner_mode(&dir), (0, 0, 0o711), "{}", dir.display());
    }
    let mut vm_gids = Vec::new();
    for (id, _, key) in &vms {
        let pid = qemu_pid(id).await;
        // Uid and Gid: real, effective, saved and filesystem ids all nobody.
        assert_eq!(status_ids(pid, "Uid:"), vec![NOBODY; 4], "QEMU of {id}");
        assert_eq!(status_ids(pid, "Gid:"), vec![NOGROUP; 4], "QEMU of {id}");
        assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
        // 2 = a seccomp filter: QEMU's sandbox is on.
        assert_eq!(status_field(pid, "Seccomp:"), "2");
        assert_eq!(status_field(pid, "CapEff:"), "0000000000000000");
        let argv = cmdline(pid);
        let at = argv.iter().position(|a| a == "-sandbox").expect("-sandbox");
        assert_eq!(argv[at + 1], SANDBOX);

        // Its folder: root's, with the VM's own group, which QEMU holds.
        let dir = manager.vms_dir().join(id);
        let (uid, gid, mode) = owner_mode(&dir);
        assert_eq!((uid, mode), (0, 0o3710), "{}", dir.display());
        let groups = status_ids(pid, "Groups:");
        assert!(
            groups.contains(&gid),
            "QEMU holds its VM's group: {groups:?}"
        );
        assert!(groups.contains(&NOGROUP), "{groups:?}");
        assert_eq!(groups.len(), 2, "nothing more: {groups:?}");
        vm_gids.push(gid);

        // The secrets are the QEMU user's alone; the shares read-only for it.
        for secret in [dir.join("certs/key.pem"), dir.join("env/environment")] {
            assert_eq!(
                owner_mode(&secret),
                (NOBODY, gid, 0o600),
                "{}",
                secret.display()
            );
        }
        assert_eq!(owner_mode(&dir.join("certs")), (0, gid, 0o2750));
        assert_eq!(owner_mode(&dir.join("OVMF_VARS.fd")), (NOBODY, gid, 0o600));
        // The manager's own files stay root's.
        for own in ["record.json", "qemu.log"] {
            assert_eq!(owner_mode(&dir.join(own)).0, 0, "{own}");
        }
        // The sockets QEMU made: the manager reaches them (it answers QMP);
        // QEMU made them as nobody.
        assert_eq!(owner_mode(&dir.join("qmp.sock")).0, NOBODY);

        // swtpm (dev profile: vtpm = swtpm) runs as the same user and group.
        let swtpm = swtpm_pids_matching(&dir.to_string_lossy());
        assert_eq!(swtpm.len(), 1, "{swtpm:?}");
        assert_eq!(status_ids(swtpm[0], "Uid:"), vec![NOBODY; 4]);
        assert!(status_ids(swtpm[0], "Groups:").contains(&gid));
        assert_eq!(owner_mode(&dir.join("tpm")), (NOBODY, gid, 0o700));

        // With the VM's own group, its key is readable (as QEMU reads it).
        let key_path = dir.join("certs/key.pem");
        assert_eq!(cat_as_nobody(&[gid], &key_path).as_deref(), Ok(*key));
    }
    assert_ne!(vm_gids[0], vm_gids[1], "each VM has a group of its own");

    // Another VM's QEMU (same user, its own group) and a plain process of
    // the QEMU user (no group at all) cannot read a VM's files.
    let (a, b) = (&vms[0].0, &vms[1].0);
    for (reader_groups, target) in [
        (vec![vm_gids[0]], b),
        (vec![vm_gids[1]], a),
        (vec![], a),
        (vec![], b),
    ] {
        let dir = manager.vms_dir().join(target);
        for file in ["certs/key.pem", "env/environment", "OVMF_VARS.fd"] {
            let err = cat_as_nobody(&reader_groups, &dir.join(file))
                .expect_err("another VM's file must not be readable");
            assert!(
                err.contains("Permission denied"),
                "reading {file} of {target} with groups {reader_groups:?}: {err}"
            );
        }
    }

    // Removal leaves nothing: no folder, no process, no port.
    for (id, _, _) in &vms {
        client
            .remove_vm(RemoveReq { cvm_id: id.clone() })
            .await
            .expect("RemoveVm");
    }
    assert_nothing_left(&manager).await;
    // The folder was closed to QEMU once it was up: nothing else of it stayed.
    assert!(
        !manager
            .log()
            .contains("removed what QEMU or swtpm made in the VM folder"),
        "{}",
        manager.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_user_that_does_not_exist_is_a_clear_error_and_leaves_nothing() {
    let said = "MANAGER_QEMU_USER \"cocos-no-such-user\": no such user";
    let started = std::panic::catch_unwind(|| {
        Manager::start(&[
            ("MANAGER_QEMU_USER", "cocos-no-such-user"),
            ("MANAGER_QEMU_GROUP", ""),
        ])
    });
    let manager = match started {
        Ok(manager) => manager,
        // Refused at start: the harness's panic carries the manager's log.
        Err(panic) => {
            let text = panic.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(text.contains(said), "{text}");
            return;
        }
    };
    // Or serving: said at start, naming the setting, and every create is
    // refused before anything is made.
    assert!(manager.log().contains(said), "{}", manager.log());
    let mut client = manager.client().await;
    let err = client
        .create_vm(CreateReq::default())
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains(said), "{}", err.message());
    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_runs_as_the_manager_when_no_user_is_set() {
    let manager = Manager::start(&[("MANAGER_QEMU_USER", ""), ("MANAGER_QEMU_SANDBOX", "")]);
    let mut client = manager.client().await;
    let (id, port) = create(&mut client).await;
    agent_ok(port).await;
    let pid = qemu_pid(&id).await;
    assert_eq!(status_ids(pid, "Uid:"), vec![0; 4]);
    assert!(!cmdline(pid).iter().any(|a| a == "-sandbox"));
    let dir = manager.vms_dir().join(&id);
    assert_eq!(owner_mode(&dir), (0, 0, 0o700));
    client
        .remove_vm(RemoveReq { cvm_id: id })
        .await
        .expect("RemoveVm");
    assert_nothing_left(&manager).await;
}

#[test]
fn a_manager_that_is_not_root_refuses_a_qemu_user() {
    // The manager itself as nobody, with the development profile's QEMU
    // user: it says why QEMU cannot run as that user.
    let state = tempfile::Builder::new()
        .prefix("cocos-t")
        .tempdir_in("/tmp")
        .expect("dir");
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let log = state.path().join("manager.log");
    let mut child = Command::new(require_tool("setpriv"))
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOGROUP}"),
            "--clear-groups",
        ])
        // Copies it can reach, should the checkout be in a private folder.
        .arg(reachable_by_anyone(&manager_binary()))
        .arg("--config")
        .arg(reachable_by_anyone(&repo_root().join("config/dev.toml")))
        .current_dir(state.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("MANAGER_STATE_DIR", state.path().join("state"))
        .env("MANAGER_GRPC_PORT", free_port().to_string())
        .env("MANAGER_HTTP_PORT", free_port().to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start the manager as nobody");
    // Whether it refuses to start or starts and warns, it says so at once.
    let said = "MANAGER_QEMU_USER is \"nobody\" but the manager does not run as root";
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut text = String::new();
    while std::time::Instant::now() < deadline {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(said) || child.try_wait().expect("wait").is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap_or(text);
    assert!(text.contains(said), "{text}");
}
