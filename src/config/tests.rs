use super::*;

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn inputs<'a>(file: Option<&'a str>, env_pairs: &[(&str, &str)]) -> ConfigInputs<'a> {
    ConfigInputs {
        file_name: Some("test.toml"),
        file_text: file,
        env: env(env_pairs),
        host: HostCaps::default(),
        cwd: PathBuf::from("/srv"),
    }
}

fn load_ok(file: Option<&str>, env_pairs: &[(&str, &str)]) -> Loaded {
    match load(&inputs(file, env_pairs)) {
        Ok(l) => l,
        Err(e) => panic!("expected a valid configuration: {e}"),
    }
}

fn load_err(file: Option<&str>, env_pairs: &[(&str, &str)]) -> String {
    match load(&inputs(file, env_pairs)) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn defaults_match_the_document() {
    let c = load_ok(None, &[]).config;
    assert_eq!(c.instance_id, "");
    assert_eq!(c.grpc_host, "localhost");
    assert_eq!(c.grpc_port, 7001);
    assert_eq!(c.grpc_timeout, Duration::from_secs(60));
    assert_eq!(c.log_level, LogLevel::Info);
    assert_eq!(
        c.attestation_policy_binary,
        PathBuf::from("../../build/attestation_policy")
    );
    assert_eq!(
        c.igvmmeasure_binary,
        PathBuf::from("../../build/igvmmeasure")
    );
    assert_eq!(c.qemu_bin_path, PathBuf::from("qemu-system-x86_64"));
    assert!(!c.qemu_use_sudo);
    assert_eq!(c.qemu_machine.as_str(), "q35");
    assert_eq!(c.qemu_cpu.as_str(), "EPYC");
    assert!(c.qemu_enable_kvm);
    assert!(c.qemu_no_graphic);
    assert_eq!(c.qemu_monitor.as_str(), "pty");
    assert_eq!(c.qemu_memory_size.0, "2048M");
    assert_eq!(c.qemu_memory_slots, 5);
    assert_eq!(c.qemu_max_memory.0, "30G");
    assert_eq!(c.qemu_smp_count, 4);
    assert_eq!(c.qemu_smp_maxcpus, 64);
    assert_eq!(c.qemu_mem_id.as_str(), "ram1");
    assert_eq!(
        c.qemu_ovmf_code_file,
        PathBuf::from("/usr/share/OVMF/OVMF_CODE.fd")
    );
    assert_eq!(
        c.qemu_ovmf_vars_file,
        PathBuf::from("/usr/share/OVMF/OVMF_VARS.fd")
    );
    assert_eq!(c.qemu_ovmf_code_readonly.as_str(), "on");
    assert_eq!(c.qemu_ovmf_vars_unit, 1);
    assert_eq!(c.qemu_netdev_id.as_str(), "vmnic");
    assert_eq!(c.qemu_host_fwd_agent, 7020);
    assert_eq!(c.qemu_guest_fwd_agent, 7002);
    assert_eq!(
        c.qemu_host_fwd_range,
        PortRange {
            start: 6100,
            end: 6200
        }
    );
    assert_eq!(c.qemu_virtio_net_pci_disable_legacy.as_str(), "on");
    assert!(c.qemu_virtio_net_pci_iommu_platform);
    assert_eq!(c.qemu_virtio_net_pci_addr.as_str(), "0x2");
    assert_eq!(c.qemu_disk_img_kernel_file, PathBuf::from("img/bzImage"));
    assert_eq!(
        c.qemu_disk_img_rootfs_file,
        PathBuf::from("img/rootfs.cpio.gz")
    );
    assert_eq!(c.qemu_sev_snp_id.as_str(), "sev0");
    assert_eq!(c.qemu_sev_snp_cbitpos, 51);
    assert_eq!(c.qemu_sev_snp_reduced_phys_bits, 1);
    assert!(!c.qemu_enable_host_data);
    assert_eq!(c.qemu_tdx_id.as_str(), "tdx0");
    assert_eq!(c.qemu_quote_generation_port, 4050);
    assert_eq!(c.qemu_ovmf_file, PathBuf::from("/usr/share/ovmf/OVMF.fd"));
    assert_eq!(c.qemu_igvm_id.as_str(), "igvm0");
    assert_eq!(c.qemu_igvm_file, PathBuf::from("/root/coconut-qemu.igvm"));
    assert_eq!(c.jaeger_url, "http://localhost:4318");
    assert_eq!(c.jaeger_trace_ratio, 1.0);
    assert_eq!(c.max_vms, 10);
    assert_eq!(c.http_host, "localhost");
    assert_eq!(c.http_port, 7003);
    assert_eq!(c.qemu_kernel_cmdline, "quiet console=null");
    assert!(!c.qemu_enable_disk);
    assert_eq!(c.qemu_src_disk_file, PathBuf::from("img/enc_os.qcow2"));
    assert_eq!(c.qemu_disk_id.as_str(), "disk0");
    assert_eq!(c.qemu_disk_format.as_str(), "qcow2");
    assert_eq!(c.qemu_disk_scsi_id.as_str(), "scsi0");
    assert_eq!(c.state_dir, PathBuf::from("/run/cocos-manager"));
}

#[test]
fn every_documented_variable_is_a_setting() {
    // The user's document plus configuration.md's extras.
    let documented = [
        "MANAGER_INSTANCE_ID",
        "MANAGER_GRPC_HOST",
        "MANAGER_GRPC_PORT",
        "MANAGER_GRPC_TIMEOUT",
        "MANAGER_LOG_LEVEL",
        "MANAGER_GRPC_CLIENT_CERT",
        "MANAGER_GRPC_CLIENT_KEY",
        "MANAGER_GRPC_SERVER_CA_CERTS",
        "MANAGER_ATTESTATION_POLICY_BINARY",
        "MANAGER_IGVMMEASURE_BINARY",
        "MANAGER_PCR_VALUES",
        "MANAGER_QEMU_BIN_PATH",
        "MANAGER_QEMU_USE_SUDO",
        "MANAGER_QEMU_MACHINE",
        "MANAGER_QEMU_CPU",
        "MANAGER_QEMU_ENABLE_KVM",
        "MANAGER_QEMU_NO_GRAPHIC",
        "MANAGER_QEMU_MONITOR",
        "MANAGER_QEMU_MEMORY_SIZE",
        "MANAGER_QEMU_MEMORY_SLOTS",
        "MANAGER_QEMU_MAX_MEMORY",
        "MANAGER_QEMU_SMP_COUNT",
        "MANAGER_QEMU_SMP_MAXCPUS",
        "MANAGER_QEMU_MEM_ID",
        "MANAGER_QEMU_OVMF_CODE_FILE",
        "MANAGER_QEMU_OVMF_VARS_FILE",
        "MANAGER_QEMU_OVMF_CODE_IF",
        "MANAGER_QEMU_OVMF_CODE_FORMAT",
        "MANAGER_QEMU_OVMF_CODE_UNIT",
        "MANAGER_QEMU_OVMF_CODE_READONLY",
        "MANAGER_QEMU_OVMF_VARS_IF",
        "MANAGER_QEMU_OVMF_VARS_FORMAT",
        "MANAGER_QEMU_OVMF_VARS_UNIT",
        "MANAGER_QEMU_OVMF_VERSION",
        "MANAGER_QEMU_NETDEV_ID",
        "MANAGER_QEMU_HOST_FWD_AGENT",
        "MANAGER_QEMU_GUEST_FWD_AGENT",
        "MANAGER_QEMU_HOST_FWD_RANGE",
        "MANAGER_QEMU_VIRTIO_NET_PCI_DISABLE_LEGACY",
        "MANAGER_QEMU_VIRTIO_NET_PCI_IOMMU_PLATFORM",
        "MANAGER_QEMU_VIRTIO_NET_PCI_ADDR",
        "MANAGER_QEMU_VIRTIO_NET_PCI_ROMFILE",
        "MANAGER_QEMU_DISK_IMG_KERNEL_FILE",
        "MANAGER_QEMU_DISK_IMG_ROOTFS_FILE",
        "MANAGER_QEMU_CERTS_MOUNT",
        "MANAGER_QEMU_ENV_MOUNT",
        "MANAGER_QEMU_ENABLE_SEV_SNP",
        "MANAGER_QEMU_SEV_SNP_ID",
        "MANAGER_QEMU_SEV_SNP_CBITPOS",
        "MANAGER_QEMU_SEV_SNP_REDUCED_PHYS_BITS",
        "MANAGER_QEMU_ENABLE_HOST_DATA",
        "MANAGER_QEMU_HOST_DATA",
        "MANAGER_QEMU_ENABLE_TDX",
        "MANAGER_QEMU_TDX_ID",
        "MANAGER_QEMU_QUOTE_GENERATION_PORT",
        "MANAGER_QEMU_OVMF_FILE",
        "MANAGER_QEMU_IGVM_ID",
        "MANAGER_QEMU_IGVM_FILE",
        "COCOS_JAEGER_URL",
        "COCOS_JAEGER_TRACE_RATIO",
        "MANAGER_EOS_VERSION",
        "MANAGER_MAX_VMS",
        "MANAGER_HTTP_HOST",
        "MANAGER_HTTP_PORT",
        "MANAGER_GRPC_SERVER_CERT",
        "MANAGER_GRPC_SERVER_KEY",
        "MANAGER_GRPC_CLIENT_CA_CERTS",
        "MANAGER_QEMU_KERNEL_CMDLINE",
        "MANAGER_QEMU_ENABLE_DISK",
        "MANAGER_QEMU_SRC_DISK_FILE",
        "MANAGER_QEMU_DISK_ID",
        "MANAGER_QEMU_DISK_FORMAT",
        "MANAGER_QEMU_DISK_SCSI_ID",
        "MANAGER_GRPC_URL",
    ];
    for name in documented {
        assert!(
            SETTINGS.iter().any(|s| s.env == name),
            "{name} is not a setting"
        );
    }
    let mut keys: Vec<_> = SETTINGS.iter().map(|s| s.key).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), SETTINGS.len(), "file keys must be unique");
}

#[test]
fn file_overrides_defaults_and_env_overrides_file() {
    let file = r#"
        log_level = "debug"
        max_vms = 3
        [grpc]
        host = "0.0.0.0"
        port = 9001
        [qemu]
        smp_count = 2
        enable_kvm = false
        host_fwd_range = "7000-7010"
    "#;
    let c = load_ok(Some(file), &[]).config;
    assert_eq!(c.log_level, LogLevel::Debug);
    assert_eq!(c.max_vms, 3);
    assert_eq!(c.grpc_host, "0.0.0.0");
    assert_eq!(c.grpc_port, 9001);
    assert_eq!(c.qemu_smp_count, 2);
    assert!(!c.qemu_enable_kvm);
    assert_eq!(
        c.qemu_host_fwd_range,
        PortRange {
            start: 7000,
            end: 7010
        }
    );

    let c = load_ok(
        Some(file),
        &[
            ("MANAGER_GRPC_PORT", "9100"),
            ("MANAGER_QEMU_SMP_COUNT", "1"),
            ("PATH", "/bin"),
        ],
    )
    .config;
    assert_eq!(c.grpc_port, 9100, "environment wins over the file");
    assert_eq!(c.qemu_smp_count, 1);
    assert_eq!(c.grpc_host, "0.0.0.0", "file still wins over the default");
}

#[test]
fn empty_environment_value_clears_a_default() {
    let c = load_ok(
        None,
        &[
            ("MANAGER_QEMU_IGVM_FILE", ""),
            ("MANAGER_QEMU_ENABLE_SEV_SNP", "true"),
        ],
    )
    .config;
    assert_eq!(c.tee_mode(), TeeMode::SevSnpOvmf);
}

#[test]
fn each_validation_error_names_the_variable_and_value() {
    let cases: &[(&str, &str, &str)] = &[
        ("MANAGER_GRPC_PORT", "70000", "MANAGER_GRPC_PORT"),
        ("MANAGER_GRPC_PORT", "abc", "MANAGER_GRPC_PORT"),
        ("MANAGER_GRPC_PORT", "0", "MANAGER_GRPC_PORT"),
        ("MANAGER_HTTP_PORT", "-1", "MANAGER_HTTP_PORT"),
        ("MANAGER_LOG_LEVEL", "loud", "MANAGER_LOG_LEVEL"),
        ("MANAGER_MAX_VMS", "-3", "MANAGER_MAX_VMS"),
        ("MANAGER_QEMU_USE_SUDO", "maybe", "MANAGER_QEMU_USE_SUDO"),
        ("MANAGER_QEMU_ENABLE_KVM", "2", "MANAGER_QEMU_ENABLE_KVM"),
        (
            "MANAGER_QEMU_MEMORY_SIZE",
            "lots",
            "MANAGER_QEMU_MEMORY_SIZE",
        ),
        (
            "MANAGER_QEMU_MEMORY_SIZE",
            "2048MB",
            "MANAGER_QEMU_MEMORY_SIZE",
        ),
        ("MANAGER_QEMU_MAX_MEMORY", "1G", "MANAGER_QEMU_MAX_MEMORY"),
        ("MANAGER_QEMU_SMP_COUNT", "0", "MANAGER_QEMU_SMP_COUNT"),
        ("MANAGER_QEMU_SMP_MAXCPUS", "2", "MANAGER_QEMU_SMP_MAXCPUS"),
        (
            "MANAGER_QEMU_HOST_FWD_RANGE",
            "6200-6100",
            "MANAGER_QEMU_HOST_FWD_RANGE",
        ),
        (
            "MANAGER_QEMU_HOST_FWD_RANGE",
            "0-10",
            "MANAGER_QEMU_HOST_FWD_RANGE",
        ),
        (
            "MANAGER_QEMU_HOST_FWD_RANGE",
            "6100",
            "MANAGER_QEMU_HOST_FWD_RANGE",
        ),
        (
            "MANAGER_QEMU_MACHINE",
            "q35,accel=kvm",
            "MANAGER_QEMU_MACHINE",
        ),
        ("MANAGER_QEMU_CPU", "EPYC host", "MANAGER_QEMU_CPU"),
        (
            "MANAGER_QEMU_KERNEL_CMDLINE",
            "quiet\ninit=/bin/sh",
            "MANAGER_QEMU_KERNEL_CMDLINE",
        ),
        ("MANAGER_GRPC_TIMEOUT", "soon", "MANAGER_GRPC_TIMEOUT"),
        (
            "COCOS_JAEGER_TRACE_RATIO",
            "1.5",
            "COCOS_JAEGER_TRACE_RATIO",
        ),
        ("COCOS_JAEGER_TRACE_RATIO", "x", "COCOS_JAEGER_TRACE_RATIO"),
        ("MANAGER_STATE_DIR", "/var/lib/a\nb", "MANAGER_STATE_DIR"),
        ("MANAGER_VM_LOG_MAX_SIZE", "1", "MANAGER_VM_LOG_MAX_SIZE"),
        ("MANAGER_VM_LOG_FILES", "0", "MANAGER_VM_LOG_FILES"),
        ("MANAGER_START_TIMEOUT", "0s", "MANAGER_START_TIMEOUT"),
    ];
    for (var, value, named) in cases {
        let message = load_err(None, &[(var, value)]);
        assert!(message.contains(named), "{var}={value:?} gave {message:?}");
    }
    let message = load_err(None, &[("MANAGER_GRPC_PORT", "70000")]);
    assert!(
        message.contains("70000") && message.contains("grpc.port"),
        "{message}"
    );
}

#[test]
fn long_state_dir_is_refused_for_socket_room() {
    let long = format!("/{}", "d".repeat(80));
    let message = load_err(None, &[("MANAGER_STATE_DIR", &long)]);
    assert!(
        message.contains("MANAGER_STATE_DIR") && message.contains("108"),
        "{message}"
    );
    let fits = format!("/{}", "d".repeat(UNIX_PATH_MAX - VM_SOCKET_SUFFIX_LEN - 1));
    load_ok(None, &[("MANAGER_STATE_DIR", &fits)]);
}

#[test]
fn relative_state_dir_is_made_absolute() {
    let c = load_ok(None, &[("MANAGER_STATE_DIR", "./target/../state")]).config;
    assert_eq!(c.state_dir, PathBuf::from("/srv/state"));
}

#[test]
fn file_errors_name_the_key() {
    let message = load_err(Some("[qemu]\nsmp_count = \"many\"\n"), &[]);
    assert!(
        message.contains("qemu.smp_count") && message.contains("MANAGER_QEMU_SMP_COUNT"),
        "{message}"
    );
    let message = load_err(Some("[qemu]\nsmp_cuont = 2\n"), &[]);
    assert!(
        message.contains("unknown key `qemu.smp_cuont`"),
        "{message}"
    );
    let message = load_err(Some("this is not toml ["), &[]);
    assert!(message.contains("test.toml"), "{message}");
    let message = load_err(Some("[qemu]\nsmp_count = [1, 2]\n"), &[]);
    assert!(message.contains("qemu.smp_count"), "{message}");
}

#[test]
fn unknown_manager_variables_warn() {
    let loaded = load_ok(
        None,
        &[
            ("MANAGER_QEMU_SMP_CUONT", "2"),
            ("COCOS_OTHER", "x"),
            ("HOME", "/root"),
        ],
    );
    assert_eq!(loaded.warnings.len(), 1);
    assert!(loaded.warnings[0].contains("MANAGER_QEMU_SMP_CUONT"));
    assert!(load_ok(None, &[("MANAGER_GRPC_URL", "h:1")])
        .warnings
        .is_empty());
}

#[test]
fn tee_selection_and_detection() {
    let with_host = |host: HostCaps, pairs: &[(&str, &str)]| {
        let mut i = inputs(None, pairs);
        i.host = host;
        load(&i).map(|l| l.config.tee_mode())
    };
    let none = HostCaps::default();
    let snp = HostCaps {
        sev_snp: true,
        tdx: false,
    };
    let tdx = HostCaps {
        sev_snp: false,
        tdx: true,
    };
    assert_eq!(with_host(none, &[]), Ok(TeeMode::None));
    assert_eq!(with_host(snp, &[]), Ok(TeeMode::SevSnpIgvm));
    assert_eq!(with_host(tdx, &[]), Ok(TeeMode::Tdx));
    // Explicit settings win over detection.
    assert_eq!(
        with_host(snp, &[("MANAGER_QEMU_ENABLE_SEV_SNP", "false")]),
        Ok(TeeMode::None)
    );
    assert_eq!(
        with_host(none, &[("MANAGER_QEMU_ENABLE_SEV_SNP", "true")]),
        Ok(TeeMode::SevSnpIgvm)
    );
    assert_eq!(
        with_host(none, &[("MANAGER_QEMU_ENABLE_TDX", "true")]),
        Ok(TeeMode::Tdx)
    );
    assert_eq!(
        with_host(snp, &[("MANAGER_QEMU_ENABLE_TDX", "true")]),
        Ok(TeeMode::Tdx)
    );
    let both = with_host(
        none,
        &[
            ("MANAGER_QEMU_ENABLE_TDX", "true"),
            ("MANAGER_QEMU_ENABLE_SEV_SNP", "true"),
        ],
    );
    assert!(
        matches!(both, Err(ConfigError::Conflict(ref m)) if m.contains("MANAGER_QEMU_ENABLE_TDX"))
    );
}

#[test]
fn tls_settings_must_come_together() {
    assert!(load_err(None, &[("MANAGER_GRPC_SERVER_CERT", "/c.pem")])
        .contains("MANAGER_GRPC_SERVER_KEY"));
    assert!(
        load_err(None, &[("MANAGER_GRPC_CLIENT_CA_CERTS", "/ca.pem")])
            .contains("MANAGER_GRPC_CLIENT_CA_CERTS")
    );
    load_ok(
        None,
        &[
            ("MANAGER_GRPC_SERVER_CERT", "/c.pem"),
            ("MANAGER_GRPC_SERVER_KEY", "/k.pem"),
            ("MANAGER_GRPC_CLIENT_CA_CERTS", "/ca.pem"),
        ],
    );
}

#[test]
fn host_data_must_be_32_bytes_of_base64() {
    let good = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    load_ok(
        None,
        &[
            ("MANAGER_QEMU_ENABLE_HOST_DATA", "true"),
            ("MANAGER_QEMU_HOST_DATA", good),
        ],
    );
    let message = load_err(
        None,
        &[
            ("MANAGER_QEMU_ENABLE_HOST_DATA", "true"),
            ("MANAGER_QEMU_HOST_DATA", "c2hvcnQ="),
        ],
    );
    assert!(message.contains("MANAGER_QEMU_HOST_DATA"), "{message}");
    // Empty: each VM gets its own digest.
    let c = load_ok(None, &[("MANAGER_QEMU_ENABLE_HOST_DATA", "true")]).config;
    assert!(c.qemu_enable_host_data && c.qemu_host_data.is_empty());
}

#[test]
fn vtpm_is_none_or_swtpm() {
    use crate::config::VtpmMode;
    assert_eq!(load_ok(None, &[]).config.qemu_vtpm, VtpmMode::None);
    let c = load_ok(None, &[("MANAGER_QEMU_VTPM", "swtpm")]).config;
    assert_eq!(c.qemu_vtpm, VtpmMode::Swtpm);
    let message = load_err(None, &[("MANAGER_QEMU_VTPM", "tpm2")]);
    assert!(message.contains("MANAGER_QEMU_VTPM"), "{message}");
    assert!(message.contains("none, swtpm"), "{message}");
}

#[test]
fn empty_range_falls_back_to_the_agent_port() {
    let c = load_ok(
        None,
        &[
            ("MANAGER_QEMU_HOST_FWD_RANGE", ""),
            ("MANAGER_QEMU_HOST_FWD_AGENT", "7020"),
        ],
    )
    .config;
    assert_eq!(c.port_range(), PortRange::single(7020));
}

#[test]
fn changes_are_listed() {
    let old = load_ok(None, &[]).config;
    let new = load_ok(
        None,
        &[
            ("MANAGER_LOG_LEVEL", "debug"),
            ("MANAGER_QEMU_SMP_COUNT", "2"),
        ],
    )
    .config;
    let changes = new.changes_from(&old);
    assert_eq!(
        changes,
        vec![
            ("MANAGER_LOG_LEVEL", "info".to_string(), "debug".to_string()),
            ("MANAGER_QEMU_SMP_COUNT", "4".to_string(), "2".to_string()),
        ]
    );
}

#[test]
fn default_file_parses_to_the_defaults() {
    let text = render_default_file();
    let from_file = load_ok(Some(&text), &[]).config;
    assert_eq!(from_file, load_ok(None, &[]).config);
    for setting in SETTINGS {
        assert!(
            text.contains(setting.env),
            "{} missing from the default file",
            setting.env
        );
    }
}

#[test]
fn shipped_files_are_current_and_valid() {
    let shipped = include_str!("../../config/cocos-manager.toml");
    assert_eq!(
        shipped,
        render_default_file(),
        "regenerate with: cocos-manager --print-default-config > config/cocos-manager.toml"
    );
    let dev = include_str!("../../config/dev.toml");
    let c = load_ok(Some(dev), &[]).config;
    assert_eq!(c.tee_mode(), TeeMode::None);
    assert!(!c.qemu_enable_kvm);
    assert_eq!(c.grpc_host, "127.0.0.1");
    assert_eq!(c.grpc_port, 7001);
}

#[test]
fn readme_lists_every_setting() {
    let readme = include_str!("../../README.md");
    assert!(
        readme.contains(&render_reference_table()),
        "regenerate the README table with: cocos-manager --print-config-reference"
    );
}

#[test]
fn log_format_is_text_or_json() {
    assert_eq!(load_ok(None, &[]).config.log_format, LogFormat::Text);
    let c = load_ok(None, &[("MANAGER_LOG_FORMAT", "json")]).config;
    assert_eq!(c.log_format, LogFormat::Json);
    let c = load_ok(Some("log_format = \"JSON\"\n"), &[]).config;
    assert_eq!(c.log_format, LogFormat::Json);
    let message = load_err(None, &[("MANAGER_LOG_FORMAT", "yaml")]);
    assert!(
        message.contains("MANAGER_LOG_FORMAT")
            && message.contains("log_format")
            && message.contains("\"yaml\"")
            && message.contains("text or json"),
        "{message}"
    );
}

#[test]
fn traces_go_to_the_collector_url_with_the_otlp_path() {
    let endpoint = |pairs: &[(&str, &str)]| load_ok(None, pairs).config.traces_endpoint();
    assert_eq!(
        endpoint(&[]).as_deref(),
        Some("http://localhost:4318/v1/traces")
    );
    assert_eq!(
        endpoint(&[("COCOS_JAEGER_URL", "https://otel.example:4318/")]).as_deref(),
        Some("https://otel.example:4318/v1/traces")
    );
    assert_eq!(
        endpoint(&[("COCOS_JAEGER_URL", "http://c:4318/prefix")]).as_deref(),
        Some("http://c:4318/prefix/v1/traces")
    );
    assert_eq!(
        endpoint(&[("COCOS_JAEGER_URL", "http://c:4318/v1/traces")]).as_deref(),
        Some("http://c:4318/v1/traces")
    );
    // Off: no URL, or nothing sampled.
    assert_eq!(endpoint(&[("COCOS_JAEGER_URL", "")]), None);
    assert_eq!(endpoint(&[("COCOS_JAEGER_TRACE_RATIO", "0")]), None);
    assert!(endpoint(&[("COCOS_JAEGER_TRACE_RATIO", "0.25")]).is_some());
}

#[test]
fn bad_collector_urls_are_refused_naming_the_variable() {
    for (url, reason) in [
        ("localhost:4318", "http:// or https://"),
        ("ftp://c:21", "http:// or https://"),
        ("http://", "no host"),
        ("http://:4318", "no host"),
        ("http://user:secret@c:4318", "user or password"),
        ("http://c:4318/?x=1", "query"),
        ("http://c :4318", "spaces"),
    ] {
        let message = load_err(None, &[("COCOS_JAEGER_URL", url)]);
        assert!(
            message.contains("COCOS_JAEGER_URL") && message.contains(reason),
            "{url:?} gave {message:?}"
        );
    }
    // The password is not repeated in the message.
    let message = load_err(None, &[("COCOS_JAEGER_URL", "http://user:secret@c:4318")]);
    assert!(
        !message.contains("secret") && message.contains("<redacted>@c:4318"),
        "{message}"
    );
}
