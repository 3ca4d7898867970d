use super::*;
use crate::config::{load, ConfigInputs, HostCaps};

const ID: &str = "e71cdcf5-21c0-4e1d-9471-ac6b4389d5f3";

fn config(pairs: &[(&str, &str)]) -> Config {
    let inputs = ConfigInputs {
        env: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        host: HostCaps::default(),
        cwd: "/".into(),
        ..Default::default()
    };
    match load(&inputs) {
        Ok(l) => l.config,
        Err(e) => panic!("test configuration must be valid: {e}"),
    }
}

/// A stand-in for a VM's own host-data digest.
const PER_VM: [u8; 32] = [0xab; 32];

fn argv(config: &Config, aa: &str) -> Vec<String> {
    let paths = VmPaths::new(config, ID);
    let host_data = host_data(config, &PER_VM);
    command_line(
        config,
        &LaunchSpec {
            id: ID,
            port: 6100,
            paths: &paths,
            aa_kbs_params: aa,
            host_data: host_data.as_deref(),
        },
    )
}

fn words(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|s| s.replace('~', " "))
        .collect()
}

/// The sandbox QEMU runs in by default (MANAGER_QEMU_SANDBOX).
const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Our additions, identical in every mode.
fn tail() -> String {
    let d = format!("/run/cocos-manager/vms/{ID}");
    format!(
        "-fsdev local,id=cert_fs,path={d}/certs,security_model=mapped,readonly=on \
         -device virtio-9p-pci,fsdev=cert_fs,mount_tag=certs_share \
         -fsdev local,id=env_fs,path={d}/env,security_model=mapped,readonly=on \
         -device virtio-9p-pci,fsdev=env_fs,mount_tag=env_share \
         -sandbox {SANDBOX} \
         -name cocos-{ID} \
         -chardev socket,id=qmp,path={d}/qmp.sock,server=on,wait=off \
         -mon chardev=qmp,mode=control \
         -chardev socket,id=console,path={d}/console.sock,server=on,wait=off \
         -serial chardev:console"
    )
}

fn net() -> String {
    format!(
        "-netdev user,id=vmnic-{ID},hostfwd=tcp::6100-:7002 \
         -device virtio-net-pci,disable-legacy=on,iommu_platform=true,netdev=vmnic-{ID},addr=0x2,romfile="
    )
}

#[test]
fn plain_vm() {
    let c = config(&[("MANAGER_QEMU_ENABLE_SEV_SNP", "false")]);
    let expected = format!(
        "qemu-system-x86_64 -enable-kvm -machine q35 -cpu EPYC -smp 4,maxcpus=64 -m 2048M,slots=5,maxmem=30G \
         -drive if=pflash,format=raw,unit=0,file=/usr/share/OVMF/OVMF_CODE.fd,readonly=on \
         -drive if=pflash,format=raw,unit=1,file=/run/cocos-manager/vms/{ID}/OVMF_VARS.fd \
         {} -kernel img/bzImage -append quiet~console=null -initrd img/rootfs.cpio.gz \
         -nographic -monitor pty {}",
        net(),
        tail()
    );
    assert_eq!(argv(&c, ""), words(&expected));
}

#[test]
fn sev_snp_with_igvm_and_host_data() {
    let host_data = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let c = config(&[
        ("MANAGER_QEMU_ENABLE_SEV_SNP", "true"),
        ("MANAGER_QEMU_ENABLE_HOST_DATA", "true"),
        ("MANAGER_QEMU_HOST_DATA", host_data),
        ("MANAGER_QEMU_IGVM_FILE", "/root/coconut-qemu.igvm"),
    ]);
    let expected = format!(
        "qemu-system-x86_64 -enable-kvm -machine q35 -cpu EPYC -smp 4,maxcpus=64 -m 2048M,slots=5,maxmem=30G \
         {} \
         -machine confidential-guest-support=sev0-{ID},memory-backend=ram1,igvm-cfg=igvm0 \
         -object memory-backend-memfd,id=ram1,size=2048M,share=true,prealloc=false \
         -object sev-snp-guest,id=sev0-{ID},cbitpos=51,reduced-phys-bits=1,host-data={host_data} \
         -object igvm-cfg,id=igvm0,file=/root/coconut-qemu.igvm \
         -kernel img/bzImage -append quiet~console=null~agent.aa_kbc_params=cc_kbc::http://kbs:8080 \
         -initrd img/rootfs.cpio.gz -nographic -monitor pty {}",
        net(),
        tail()
    );
    assert_eq!(argv(&c, "cc_kbc::http://kbs:8080"), words(&expected));
}

#[test]
fn sev_snp_with_ovmf_bios() {
    let c = config(&[
        ("MANAGER_QEMU_ENABLE_SEV_SNP", "true"),
        ("MANAGER_QEMU_IGVM_FILE", ""),
    ]);
    let expected = format!(
        "qemu-system-x86_64 -enable-kvm -machine q35 -cpu EPYC -smp 4,maxcpus=64 -m 2048M,slots=5,maxmem=30G \
         {} \
         -machine confidential-guest-support=sev0-{ID},memory-backend=ram1 \
         -object memory-backend-memfd,id=ram1,size=2048M,share=true,prealloc=false \
         -object sev-snp-guest,id=sev0-{ID},cbitpos=51,reduced-phys-bits=1,kernel-hashes=on \
         -bios /usr/share/OVMF/OVMF_CODE.fd \
         -kernel img/bzImage -append quiet~console=null -initrd img/rootfs.cpio.gz -nographic -monitor pty {}",
        net(),
        tail()
    );
    assert_eq!(argv(&c, ""), words(&expected));
}

#[test]
fn tdx() {
    let c = config(&[
        ("MANAGER_QEMU_ENABLE_SEV_SNP", "false"),
        ("MANAGER_QEMU_ENABLE_TDX", "true"),
        ("MANAGER_QEMU_CPU", "host"),
    ]);
    let expected = format!(
        "qemu-system-x86_64 -enable-kvm -machine q35 -cpu host -smp 4,maxcpus=64 -m 2048M,slots=5,maxmem=30G \
         {} \
         -object {{\"qom-type\":\"tdx-guest\",\"id\":\"tdx0-{ID}\",\"quote-generation-socket\":{{\"type\":\"vsock\",\"cid\":\"2\",\"port\":\"4050\"}}}} \
         -machine confidential-guest-support=tdx0-{ID},memory-backend=ram1,hpet=off \
         -object memory-backend-memfd,id=ram1,size=2048M,share=true,prealloc=false \
         -bios /usr/share/ovmf/OVMF.fd -nodefaults \
         -kernel img/bzImage -append quiet~console=null -initrd img/rootfs.cpio.gz -nographic -monitor pty {}",
        net(),
        tail()
    );
    let got = argv(&c, "");
    // serde_json orders object keys alphabetically unless preserve_order is on;
    // compare the JSON object semantically and the rest literally.
    let expected = words(&expected);
    assert_eq!(got.len(), expected.len());
    for (g, e) in got.iter().zip(&expected) {
        if e.starts_with('{') {
            let g: serde_json::Value = serde_json::from_str(g).expect("json object");
            let e: serde_json::Value = serde_json::from_str(e).expect("json object");
            assert_eq!(g, e);
        } else {
            assert_eq!(g, e);
        }
    }
}

#[test]
fn disk_mode_with_sudo_and_no_kvm() {
    let c = config(&[
        ("MANAGER_QEMU_ENABLE_SEV_SNP", "false"),
        ("MANAGER_QEMU_ENABLE_DISK", "true"),
        ("MANAGER_QEMU_USE_SUDO", "true"),
        ("MANAGER_QEMU_ENABLE_KVM", "false"),
        ("MANAGER_QEMU_NO_GRAPHIC", "false"),
    ]);
    let expected = format!(
        "sudo qemu-system-x86_64 -machine q35 -cpu EPYC -smp 4,maxcpus=64 -m 2048M,slots=5,maxmem=30G \
         -drive if=pflash,format=raw,unit=0,file=/usr/share/OVMF/OVMF_CODE.fd,readonly=on \
         -drive if=pflash,format=raw,unit=1,file=/run/cocos-manager/vms/{ID}/OVMF_VARS.fd \
         {} \
         -drive file=/run/cocos-manager/vms/{ID}/disk.qcow2,if=none,id=disk0,format=qcow2 \
         -device virtio-scsi-pci,id=scsi0,disable-legacy=on,iommu_platform=true \
         -device scsi-hd,drive=disk0,bus=scsi0.0 \
         -monitor pty {}",
        net(),
        tail()
    );
    assert_eq!(argv(&c, ""), words(&expected));
}

#[test]
fn empty_machine_and_cpu_are_left_out_and_bind_is_used() {
    let c = config(&[
        ("MANAGER_QEMU_ENABLE_SEV_SNP", "false"),
        ("MANAGER_QEMU_MACHINE", ""),
        ("MANAGER_QEMU_CPU", ""),
        ("MANAGER_QEMU_HOST_FWD_BIND", "127.0.0.1"),
    ]);
    let got = argv(&c, "");
    assert!(!got.iter().any(|a| a == "-machine" || a == "-cpu"));
    assert!(got.contains(&format!(
        "user,id=vmnic-{ID},hostfwd=tcp:127.0.0.1:6100-:7002"
    )));
}

#[test]
fn commas_in_paths_are_escaped() {
    let c = config(&[
        ("MANAGER_QEMU_ENABLE_SEV_SNP", "false"),
        ("MANAGER_QEMU_OVMF_CODE_FILE", "/fw/a,b.fd"),
    ]);
    let got = argv(&c, "");
    assert!(got.contains(&"if=pflash,format=raw,unit=0,file=/fw/a,,b.fd,readonly=on".to_string()));
}

#[test]
fn shares_follow_the_mount_bases() {
    let c = config(&[
        ("MANAGER_QEMU_CERTS_MOUNT", "/srv/certs"),
        ("MANAGER_QEMU_ENV_MOUNT", "/srv/env"),
    ]);
    let paths = VmPaths::new(&c, ID);
    assert_eq!(paths.certs_dir, PathBuf::from(format!("/srv/certs/{ID}")));
    assert_eq!(paths.env_dir, PathBuf::from(format!("/srv/env/{ID}")));
}

#[test]
fn shell_quoting() {
    let argv = vec![
        "qemu".to_string(),
        "-append".into(),
        "quiet console=null".into(),
        "it's".into(),
    ];
    assert_eq!(
        shell_quote(&argv),
        r#"qemu -append 'quiet console=null' 'it'\''s'"#
    );
}

#[test]
fn host_data_is_the_vms_own_digest_unless_the_operator_set_one() {
    let off = config(&[("MANAGER_QEMU_ENABLE_SEV_SNP", "true")]);
    assert_eq!(host_data(&off, &PER_VM), None);
    assert!(!argv(&off, "").iter().any(|a| a.contains("host-data")));

    let per_vm = config(&[
        ("MANAGER_QEMU_ENABLE_SEV_SNP", "true"),
        ("MANAGER_QEMU_ENABLE_HOST_DATA", "true"),
    ]);
    // python3 -c 'import base64; print(base64.b64encode(bytes([0xab]*32)).decode())'
    let b64 = "q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=";
    assert_eq!(host_data(&per_vm, &PER_VM).as_deref(), Some(b64));
    assert!(argv(&per_vm, "")
        .iter()
        .any(|a| a.ends_with(&format!(",host-data={b64}"))));

    let operator = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let fixed = config(&[
        ("MANAGER_QEMU_ENABLE_SEV_SNP", "true"),
        ("MANAGER_QEMU_ENABLE_HOST_DATA", "true"),
        ("MANAGER_QEMU_HOST_DATA", operator),
    ]);
    assert_eq!(host_data(&fixed, &PER_VM).as_deref(), Some(operator));
}

#[test]
fn swtpm_gives_a_tpm_crb_device_on_the_vms_own_socket() {
    let none = config(&[("MANAGER_QEMU_ENABLE_SEV_SNP", "false")]);
    assert!(!argv(&none, "").iter().any(|a| a.contains("tpm")));
    let c = config(&[
        ("MANAGER_QEMU_ENABLE_SEV_SNP", "false"),
        ("MANAGER_QEMU_VTPM", "swtpm"),
    ]);
    let got = argv(&c, "").join(" ");
    let d = format!("/run/cocos-manager/vms/{ID}");
    assert!(
        got.contains(&format!(
            "-chardev socket,id=chrtpm,path={d}/swtpm.sock -tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-crb,tpmdev=tpm0 -name cocos-{ID}"
        )),
        "{got}"
    );
}

#[test]
fn sandbox_is_on_by_default_among_our_additions() {
    let c = config(&[("MANAGER_QEMU_ENABLE_SEV_SNP", "false")]);
    let got = argv(&c, "");
    let at = got.iter().position(|a| a == "-sandbox").expect("-sandbox");
    assert_eq!(got[at + 1], SANDBOX);
    // After the original's options, before the name and control sockets.
    let name = got.iter().position(|a| a == "-name").expect("-name");
    let fsdev = got.iter().rposition(|a| a == "-fsdev").expect("-fsdev");
    assert!(fsdev < at && at < name, "{got:?}");
    assert_eq!(got.iter().filter(|a| *a == "-sandbox").count(), 1);
}

#[test]
fn sandbox_can_be_set_or_turned_off() {
    let custom = config(&[
        ("MANAGER_QEMU_ENABLE_SEV_SNP", "false"),
        ("MANAGER_QEMU_SANDBOX", "on,elevateprivileges=children"),
    ]);
    let got = argv(&custom, "").join(" ");
    assert!(
        got.contains(" -sandbox on,elevateprivileges=children "),
        "{got}"
    );
    let none = config(&[
        ("MANAGER_QEMU_ENABLE_SEV_SNP", "false"),
        ("MANAGER_QEMU_SANDBOX", ""),
    ]);
    assert!(!argv(&none, "").iter().any(|a| a.contains("sandbox")));
}

#[test]
fn a_bad_sandbox_value_is_refused_at_load() {
    let inputs = ConfigInputs {
        env: [(
            "MANAGER_QEMU_SANDBOX".to_string(),
            "on,spawn=sometimes".to_string(),
        )]
        .into_iter()
        .collect(),
        cwd: "/".into(),
        ..Default::default()
    };
    let err = load(&inputs).expect_err("refused").to_string();
    assert!(err.contains("MANAGER_QEMU_SANDBOX"), "{err}");
    assert!(err.contains("spawn=sometimes"), "{err}");
}

#[test]
fn the_disk_in_the_vm_folder_stays_where_records_expect_it() {
    // The image itself lives under MANAGER_DISK_DIR; the VM folder holds a
    // link to it, so the command line and the records keep this path.
    let c = config(&[("MANAGER_DISK_DIR", "/srv/disks")]);
    let paths = VmPaths::new(&c, ID);
    assert_eq!(
        paths.disk,
        PathBuf::from(format!("/run/cocos-manager/vms/{ID}/disk.qcow2"))
    );
}
