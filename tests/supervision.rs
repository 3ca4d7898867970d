//! Supervision end to end, with real QEMU and the development guest:
//! restarts, giving up, re-adoption across manager restarts, SIGTERM,
//! SIGHUP, and no leaks over many cycles.

mod common;

use std::time::Duration;

use cocos_core::proto::{CreateReq, CvmInfoReq, RemoveReq};
use common::*;
use nix::sys::signal::Signal;
use tonic::Code;

fn fast_restarts() -> Vec<(&'static str, &'static str)> {
    vec![
        ("MANAGER_RESTART_BACKOFF_INITIAL", "200ms"),
        ("MANAGER_RESTART_BACKOFF_MAX", "1s"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_vm_comes_back_with_the_same_id_port_and_files() {
    let manager = Manager::start(&fast_restarts());
    let mut client = manager.client().await;
    let (id, port) = create(&mut client).await;
    agent_ok(port).await;
    let vars = manager.vms_dir().join(&id).join("OVMF_VARS.fd");
    let vars_inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&vars).expect("vars"));

    let first = qemu_pid(&id).await;
    kill9(first);
    assert!(
        eventually(Duration::from_secs(30), || pids_matching(&id)
            .iter()
            .any(|p| *p != first))
        .await,
        "not restarted:\n{}",
        manager.log()
    );
    assert!(!process_exists(first), "the killed QEMU was left a zombie");
    client
        .cvm_info(CvmInfoReq { id: id.clone() })
        .await
        .expect("same id");
    agent_ok(port).await;
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&vars).expect("vars kept"));
    assert_eq!(inode, vars_inode, "the VM keeps its own firmware vars");
    assert!(manager.log().contains("restarting VM"));
    client
        .remove_vm(RemoveReq { cvm_id: id })
        .await
        .expect("RemoveVm");
    assert!(manager.vm_folders().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_always_dies_is_marked_failed_and_released() {
    let mut env = fast_restarts();
    env.push(("MANAGER_RESTART_MAX_RESTARTS", "2"));
    let manager = Manager::start(&env);
    let mut client = manager.client().await;
    let (id, port) = create(&mut client).await;
    let dir = manager.vms_dir().join(&id);
    // Kill every QEMU of this VM as soon as it appears: 1 start + 2 restarts.
    let mut killed = Vec::new();
    let gave_up = eventually(Duration::from_secs(60), || {
        for pid in pids_matching(&id) {
            if !killed.contains(&pid) {
                kill9(pid);
                killed.push(pid);
            }
        }
        manager.log().contains("VM failed: restart budget spent")
    })
    .await;
    assert!(gave_up, "never gave up:\n{}", manager.log());
    assert_eq!(killed.len(), 3, "started {} times", killed.len());
    assert!(
        eventually(Duration::from_secs(5), || !dir.exists()).await,
        "folder kept"
    );
    assert!(pids_matching(&id).is_empty());
    assert!(port_is_free(port));
    // Still listed as failed until removed.
    client
        .cvm_info(CvmInfoReq { id: id.clone() })
        .await
        .expect("failed VM still listed");
    client
        .remove_vm(RemoveReq { cvm_id: id.clone() })
        .await
        .expect("RemoveVm of a failed VM");
    let err = client
        .cvm_info(CvmInfoReq { id })
        .await
        .expect_err("forgotten");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_powers_off_is_not_restarted_under_transient() {
    let manager = Manager::start(&fast_restarts());
    let mut client = manager.client().await;
    let (id, port) = create(&mut client).await;
    agent_ok(port).await;
    let pid = qemu_pid(&id).await;
    let (status, _) = tokio::task::spawn_blocking(move || http_get(port, "/poweroff"))
        .await
        .expect("join")
        .expect("poweroff request");
    assert_eq!(status, 200);
    let dir = manager.vms_dir().join(&id);
    assert!(
        eventually(Duration::from_secs(30), || !process_exists(pid)
            && !dir.exists())
        .await,
        "guest power-off not handled:\n{}",
        manager.log()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        pids_matching(&id).is_empty(),
        "restarted after a clean power-off"
    );
    let err = client
        .cvm_info(CvmInfoReq { id })
        .await
        .expect_err("stopped VMs are forgotten");
    assert_eq!(err.code(), Code::NotFound);
    assert!(port_is_free(port));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_manager_is_replaced_and_readopts_its_vms() {
    let mut manager = Manager::start(&fast_restarts());
    let mut client = manager.client().await;
    let a = client
        .create_vm(CreateReq::default())
        .await
        .expect("A")
        .into_inner();
    let b = client
        .create_vm(CreateReq::default())
        .await
        .expect("B")
        .into_inner();
    let a_port: u16 = a.forwarded_port.parse().expect("port");
    let a_pid = qemu_pid(&a.cvm_id).await;
    let b_pid = qemu_pid(&b.cvm_id).await;
    agent_ok(a_port).await;
    // Its TTL runs out only after the manager has been replaced.
    let c = client
        .create_vm(CreateReq {
            ttl: "25s".into(),
            ..Default::default()
        })
        .await
        .expect("C with a TTL")
        .into_inner();
    let c_pid = qemu_pid(&c.cvm_id).await;

    manager.stop_with(Signal::SIGKILL, Duration::from_secs(10));
    assert!(process_exists(a_pid), "VMs must outlive the manager");
    // While no manager runs: B's QEMU dies, a record is corrupted, and a
    // record names a pid that now belongs to an unrelated process.
    kill9(b_pid);
    let vms = manager.vms_dir();
    let corrupt_id = uuid::Uuid::new_v4().to_string();
    std::fs::create_dir_all(vms.join(&corrupt_id)).expect("dir");
    std::fs::write(
        vms.join(&corrupt_id).join("record.json"),
        b"{ this is not json",
    )
    .expect("write");
    let mut stranger = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .expect("sleep");
    let reused_id = uuid::Uuid::new_v4().to_string();
    let mut record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(vms.join(&a.cvm_id).join("record.json")).expect("A's record"),
    )
    .expect("json");
    let a_dir = vms.join(&a.cvm_id).to_string_lossy().into_owned();
    let reused_dir = vms.join(&reused_id).to_string_lossy().into_owned();
    let text = record
        .to_string()
        .replace(&a_dir, &reused_dir)
        .replace(&a.cvm_id, &reused_id);
    record = serde_json::from_str(&text).expect("json");
    record["pid"] = serde_json::json!(stranger.id());
    std::fs::create_dir_all(vms.join(&reused_id)).expect("dir");
    std::fs::write(vms.join(&reused_id).join("record.json"), record.to_string()).expect("write");

    manager.spawn();
    let mut client = manager.client().await;
    // A is re-adopted: same id, same port, same process, still answering.
    client
        .cvm_info(CvmInfoReq {
            id: a.cvm_id.clone(),
        })
        .await
        .expect("A re-adopted");
    assert_eq!(pids_matching(&a.cvm_id), vec![a_pid]);
    agent_ok(a_port).await;
    // B died meanwhile: cleaned up.
    let err = client
        .cvm_info(CvmInfoReq {
            id: b.cvm_id.clone(),
        })
        .await
        .expect_err("B gone");
    assert_eq!(err.code(), Code::NotFound);
    assert!(!vms.join(&b.cvm_id).exists());
    // The corrupt record was set aside and did not stop the start.
    assert!(!vms.join(&corrupt_id).join("record.json").exists());
    assert!(
        manager
            .state_dir
            .path()
            .join("state/corrupt")
            .read_dir()
            .expect("corrupt dir")
            .count()
            >= 1
    );
    // The stranger is left alone; its fake VM is cleaned up.
    assert!(
        stranger.try_wait().expect("wait").is_none(),
        "an unrelated process was signalled"
    );
    assert!(!vms.join(&reused_id).exists());
    let _ = stranger.kill();
    let _ = stranger.wait();
    // C's TTL, set before the restart, still fires.
    assert!(
        eventually(Duration::from_secs(60), || !process_exists(c_pid)
            && !vms.join(&c.cvm_id).exists())
        .await,
        "TTL forgotten across the restart:\n{}",
        manager.log()
    );
    // A crash after the restart is still restarted.
    kill9(a_pid);
    assert!(
        eventually(Duration::from_secs(30), || pids_matching(&a.cvm_id)
            .iter()
            .any(|p| *p != a_pid))
        .await,
        "re-adopted VM not restarted:\n{}",
        manager.log()
    );
    agent_ok(a_port).await;
    client
        .remove_vm(RemoveReq {
            cvm_id: a.cvm_id.clone(),
        })
        .await
        .expect("RemoveVm works");
    assert!(pids_matching(&a.cvm_id).is_empty());
    let mut left = manager.vm_folders();
    left.retain(|f| f != &corrupt_id);
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_leaves_vms_running_for_the_next_manager() {
    let mut manager = Manager::start(&[]);
    let mut client = manager.client().await;
    let created = client
        .create_vm(CreateReq::default())
        .await
        .expect("CreateVm")
        .into_inner();
    let pid = qemu_pid(&created.cvm_id).await;
    let status = manager
        .stop_with(Signal::SIGTERM, Duration::from_secs(15))
        .expect("the manager exits within 15 s of SIGTERM");
    assert!(status.success(), "{status}");
    assert!(
        process_exists(pid) && !is_zombie(pid),
        "the VM must keep running"
    );
    manager.spawn();
    let mut client = manager.client().await;
    let info = client
        .cvm_info(CvmInfoReq {
            id: created.cvm_id.clone(),
        })
        .await
        .expect("re-adopted")
        .into_inner();
    assert_eq!(info.id, created.cvm_id);
    client
        .remove_vm(RemoveReq {
            cvm_id: created.cvm_id,
        })
        .await
        .expect("RemoveVm");
    // A re-adopted QEMU is not our child: init reaps it, a moment later.
    assert!(eventually(Duration::from_secs(5), || !process_exists(pid)).await);
    assert!(manager.vm_folders().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_valid_file_and_keeps_the_old_on_error() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("manager.toml");
    let dev = std::fs::read_to_string(repo_root().join("config/dev.toml")).expect("dev.toml");
    std::fs::write(&file, &dev).expect("write");
    let range = free_port_range(4);
    let mut env = Manager::dev_env(range);
    env.insert("MANAGER_STOP_POWERDOWN_TIMEOUT".into(), "0s".into());
    let mut manager = Manager::start_with_config(env, range, file.clone());
    let mut client = manager.client().await;
    let hup = |m: &Manager| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(m.pid()), Signal::SIGHUP).expect("hup")
    };
    let (before, _) = create(&mut client).await;

    std::fs::write(&file, dev.replace("smp_count = 1", "smp_count = 2")).expect("write");
    hup(&manager);
    let logged = || manager.log().contains("MANAGER_QEMU_SMP_COUNT");
    assert!(eventually(Duration::from_secs(10), logged).await);
    let (after, _) = create(&mut client).await;
    assert_eq!(
        info(&mut client, &after).await.cpu_num,
        2,
        "new VMs use the new file"
    );
    assert_eq!(
        info(&mut client, &before).await.cpu_num,
        1,
        "running VMs keep theirs"
    );

    std::fs::write(&file, dev.replace("smp_count = 1", "smp_count = \"many\"")).expect("write");
    hup(&manager);
    let refused = || manager.log().contains("reload refused");
    assert!(eventually(Duration::from_secs(10), refused).await);
    let (third, _) = create(&mut client).await;
    assert_eq!(
        info(&mut client, &third).await.cpu_num,
        2,
        "the previous configuration stays in force"
    );
    for id in [before, after, third] {
        client
            .remove_vm(RemoveReq { cvm_id: id })
            .await
            .expect("RemoveVm");
    }
    manager.stop_with(Signal::SIGTERM, Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_cycles_leave_nothing_behind() {
    let mut env = fast_restarts();
    env.push(("MANAGER_STOP_POWERDOWN_TIMEOUT", "0s"));
    env.push(("MANAGER_RESTART_MAX_RESTARTS", "100"));
    let manager = Manager::start(&env);
    let mut client = manager.client().await;
    for _ in 0..50 {
        let vm = client
            .create_vm(CreateReq::default())
            .await
            .expect("CreateVm")
            .into_inner();
        client
            .remove_vm(RemoveReq { cvm_id: vm.cvm_id })
            .await
            .expect("RemoveVm");
    }
    // Crash and restart cycles.
    let vm = client
        .create_vm(CreateReq::default())
        .await
        .expect("CreateVm")
        .into_inner();
    for _ in 0..5 {
        let pid = qemu_pid(&vm.cvm_id).await;
        kill9(pid);
        assert!(
            eventually(Duration::from_secs(30), || {
                let now = pids_matching(&vm.cvm_id);
                now.len() == 1 && now[0] != pid && manager.log().matches("VM restarted").count() > 0
            })
            .await
        );
        // Let the restart finish before the next crash.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    client
        .remove_vm(RemoveReq { cvm_id: vm.cvm_id })
        .await
        .expect("RemoveVm");

    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_moves_the_port_range_and_log_level() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("manager.toml");
    let dev = std::fs::read_to_string(repo_root().join("config/dev.toml")).expect("dev.toml");
    let old_range = free_port_range(2);
    let new_range = free_port_range(2);
    let with = |range: (u16, u16), level: &str| {
        dev.replace(
            "host_fwd_range = \"6100-6200\"",
            &format!("host_fwd_range = \"{}-{}\"", range.0, range.1),
        )
        .replace("log_level = \"info\"", &format!("log_level = \"{level}\""))
    };
    std::fs::write(&file, with(old_range, "info")).expect("write");
    let mut env = Manager::dev_env(old_range);
    // The range and level come from the file in this test.
    env.remove("MANAGER_QEMU_HOST_FWD_RANGE");
    env.remove("MANAGER_LOG_LEVEL");
    env.insert("MANAGER_STOP_POWERDOWN_TIMEOUT".into(), "0s".into());
    let manager = Manager::start_with_config(env, old_range, file.clone());
    let mut client = manager.client().await;
    let hup = |m: &Manager| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(m.pid()), Signal::SIGHUP).expect("hup")
    };
    let (first, first_port) = create(&mut client).await;
    assert_eq!(first_port, old_range.0);
    assert!(!manager.log().contains("DEBUG"));

    std::fs::write(&file, with(new_range, "debug")).expect("write");
    hup(&manager);
    assert!(
        eventually(Duration::from_secs(10), || manager
            .log()
            .contains("port range changed"))
        .await
    );
    let (second, second_port) = create(&mut client).await;
    assert!(
        (new_range.0..=new_range.1).contains(&second_port),
        "{second_port} not in {new_range:?}"
    );
    assert!(
        manager.log().contains("DEBUG"),
        "the log level follows the file"
    );

    // Shrink the new range to the one port in use: nothing is free, and the
    // first VM's port, outside the range, is not handed out either.
    let single = (second_port, second_port);
    std::fs::write(&file, with(single, "debug")).expect("write");
    hup(&manager);
    let shrunk = format!("new={}-{}", single.0, single.1);
    assert!(eventually(Duration::from_secs(10), || manager.log().contains(&shrunk)).await);
    let err = client
        .create_vm(CreateReq::default())
        .await
        .expect_err("range full");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    info(&mut client, &first).await;
    for id in [first, second] {
        client
            .remove_vm(RemoveReq { cvm_id: id })
            .await
            .expect("RemoveVm");
    }
    assert!(port_is_free(first_port) && port_is_free(second_port));
}
