//! The Debian package: built with `cargo deb` from the release build,
//! inspected (files, conffiles, unit, dependencies, maintainer scripts),
//! installed, reinstalled over a locally changed conffile, removed and
//! purged with dpkg. Needs root; refuses to run where the package or its
//! user already exist, and purges what it installed even when it fails.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;

const PACKAGE: &str = "cocos-manager";
const USER: &str = "cocos-qemu";
const CONFFILE: &str = "/etc/cocos-manager/cocos-manager.toml";
const UNIT: &str = "usr/lib/systemd/system/cocos-manager.service";
const DROP_IN: &str = "usr/lib/systemd/system/cocos-manager.service.d/package.conf";

fn run(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Output {
    let program = program.as_ref();
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap_or_else(|e| panic!("run {program:?}: {e}"))
}

/// Runs a command that must succeed; its stdout.
fn ok(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> String {
    let program = program.as_ref().to_os_string();
    let out = run(&program, args);
    assert!(
        out.status.success(),
        "{program:?} {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn getent(db: &str, name: &str) -> Option<String> {
    let out = run("getent", &[db, name]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// dpkg's status of the package (`install ok installed`,
/// `deinstall ok config-files`), or None when dpkg does not know it.
fn package_status() -> Option<String> {
    let out = run("dpkg-query", &["-W", "-f=${Status}", PACKAGE]);
    let status = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !status.is_empty() && status != "unknown ok not-installed")
        .then_some(status)
}

fn is_installed(name: &str) -> bool {
    let out = run("dpkg-query", &["-W", "-f=${Status}", name]);
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok installed")
}

/// Purges the package if a failed test left it; the machine is left as found.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        if package_status().is_some() {
            let out = run("dpkg", &["--purge", PACKAGE]);
            eprintln!(
                "cleanup: dpkg --purge {PACKAGE}: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if getent("passwd", USER).is_some() {
            let _ = run("deluser", &["--system", "--quiet", USER]);
        }
        if getent("group", USER).is_some() {
            let _ = run(
                "delgroup",
                &["--system", "--quiet", "--only-if-empty", USER],
            );
        }
    }
}

/// The value of each `Key=` of the `[Service]` section, in order.
fn service_entries(unit: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut entries = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.starts_with('#') && !line.starts_with(';') {
            if let Some((k, v)) = line.split_once('=') {
                entries.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    entries
}

/// ExecStart after the unit and then its drop-in (an empty value resets).
fn effective_exec_start(files: &[&str]) -> Vec<String> {
    let mut exec = Vec::new();
    for file in files {
        for (k, v) in service_entries(file) {
            if k == "ExecStart" {
                if v.is_empty() {
                    exec.clear();
                } else {
                    exec.push(v);
                }
            }
        }
    }
    exec
}

/// `cargo deb` from the release build next to this test; the .deb's path.
fn build_deb(out_dir: &Path) -> PathBuf {
    let profile_dir = manager_binary()
        .parent()
        .expect("profile dir")
        .to_path_buf();
    assert_eq!(
        profile_dir.file_name().and_then(|n| n.to_str()),
        Some("release"),
        "the package is made from the release build: cargo test --release"
    );
    for bin in ["cocos-manager", "managerctl"] {
        assert!(
            profile_dir.join(bin).exists(),
            "{bin} is missing: cargo build --release --workspace"
        );
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let probe = run(&cargo, &["deb", "--version"]);
    assert!(
        probe.status.success(),
        "this test needs cargo-deb: cargo install cargo-deb --locked (.ci/run installs it)"
    );
    let deb = out_dir.join("cocos-manager.deb");
    let out = Command::new(&cargo)
        .args([
            "deb",
            "-p",
            PACKAGE,
            "--no-build",
            "--strip",
            "--fast",
            "-o",
        ])
        .arg(&deb)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .output()
        .expect("run cargo deb");
    assert!(
        out.status.success() && deb.exists(),
        "cargo deb failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    deb
}

fn control_fields(info: &str) -> BTreeMap<String, String> {
    info.lines()
        .filter_map(|l| l.trim_start().split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn names(list: &str) -> Vec<String> {
    list.split(',')
        .map(|d| d.split_whitespace().next().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn the_package_builds_installs_and_removes_cleanly() {
    assert_eq!(
        ok("id", &["-u"]).trim(),
        "0",
        "installing a package needs root"
    );
    for tool in [
        "dpkg",
        "dpkg-deb",
        "dpkg-query",
        "getent",
        "adduser",
        "deluser",
    ] {
        require_tool(tool);
    }
    // Never touch an operator's installation or user.
    assert_eq!(
        package_status(),
        None,
        "{PACKAGE} is already known to dpkg on this machine: this test installs and purges it, \
         so it runs only where it is not installed"
    );
    assert_eq!(
        getent("passwd", USER),
        None,
        "user {USER} exists already: this test would remove it at purge"
    );
    assert!(
        !Path::new("/etc/cocos-manager").exists(),
        "/etc/cocos-manager exists already"
    );

    let work = tempfile::tempdir().expect("dir");
    let deb = build_deb(work.path());
    let deb_s = deb.to_string_lossy().into_owned();

    // ---- inspect ----
    let info = ok("dpkg-deb", &["-I", &deb_s]);
    let control = control_fields(&info);
    assert_eq!(control["Package"], PACKAGE, "{info}");
    assert_eq!(control["Architecture"], "amd64", "{info}");
    let depends = names(&control["Depends"]);
    for needed in ["qemu-system-x86", "ovmf", "adduser"] {
        assert!(
            depends.iter().any(|d| d == needed),
            "Depends lacks {needed}: {info}"
        );
    }
    let recommends = names(&control["Recommends"]);
    assert_eq!(recommends, ["swtpm", "swtpm-tools"], "{info}");

    let listing = ok("dpkg-deb", &["-c", &deb_s]);
    let mode_of = |path: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(" ./{path}")))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_string)
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{listing}"))
    };
    assert_eq!(mode_of("usr/bin/cocos-manager"), "-rwxr-xr-x");
    assert_eq!(mode_of("usr/bin/managerctl"), "-rwxr-xr-x");
    assert_eq!(mode_of(UNIT), "-rw-r--r--");
    assert_eq!(mode_of(DROP_IN), "-rw-r--r--");
    assert_eq!(
        mode_of("etc/cocos-manager/cocos-manager.toml"),
        "-rw-r--r--"
    );
    // Nothing of the test doubles.
    assert!(
        !listing.contains("qemu-stand-in") && !listing.contains("bench"),
        "{listing}"
    );

    let control_dir = work.path().join("control");
    ok("dpkg-deb", &["-e", &deb_s, &control_dir.to_string_lossy()]);
    let conffiles = std::fs::read_to_string(control_dir.join("conffiles")).expect("conffiles");
    assert_eq!(conffiles.trim(), CONFFILE);
    for script in ["postinst", "prerm", "postrm"] {
        let path = control_dir.join(script);
        let packaged = std::fs::read(&path).unwrap_or_else(|_| panic!("no {script}"));
        let source = std::fs::read(repo_root().join("packaging/deb").join(script)).expect("source");
        assert_eq!(packaged, source, "{script} is not packaging/deb/{script}");
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&path.metadata().expect("meta").permissions());
        assert_eq!(mode & 0o111, 0o111, "{script} is not executable");
        // The scripts must not fail where systemd does not run (here).
        ok("sh", &["-n", &path.to_string_lossy()]);
    }

    let tree = work.path().join("tree");
    ok("dpkg-deb", &["-x", &deb_s, &tree.to_string_lossy()]);
    let read = |rel: &str| std::fs::read_to_string(tree.join(rel)).expect(rel);
    let unit = read(UNIT);
    assert_eq!(
        unit,
        std::fs::read_to_string(repo_root().join("packaging/systemd/cocos-manager.service"))
            .expect("unit source"),
        "the packaged unit is packaging/systemd/cocos-manager.service"
    );
    assert_eq!(
        read(&CONFFILE[1..]),
        std::fs::read_to_string(repo_root().join("config/cocos-manager.toml")).expect("config")
    );
    // The unit names /usr/local/bin (a manual install); the package's drop-in
    // runs /usr/bin with the same arguments.
    let own = effective_exec_start(&[&unit]);
    assert_eq!(own.len(), 1, "{own:?}");
    let exec = effective_exec_start(&[&unit, &read(DROP_IN)]);
    assert_eq!(
        exec,
        [own[0].replace("/usr/local/bin/", "/usr/bin/")],
        "the drop-in's ExecStart must be the unit's with /usr/bin"
    );
    let argv: Vec<&str> = exec[0].split_whitespace().collect();
    assert_eq!(argv[..3], ["/usr/bin/cocos-manager", "--config", CONFFILE]);
    let service = service_entries(&unit);
    let value = |key: &str| {
        service
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(
        value("KillMode"),
        Some("process"),
        "VMs must outlive the manager"
    );
    assert!(unit.contains("WantedBy=multi-user.target"));
    let packaged_ctl = tree.join("usr/bin/managerctl");
    assert!(ok(&packaged_ctl, &["--version"]).starts_with("managerctl "));

    // ---- install ----
    let missing: Vec<&str> = depends
        .iter()
        .map(String::as_str)
        .filter(|d| !d.starts_with("libc6") && !is_installed(d))
        .collect();
    if !missing.is_empty() {
        eprintln!("installing the package's dependencies first: {missing:?}");
        let mut args = vec!["install", "-y", "--no-install-recommends"];
        args.extend(missing.iter().copied());
        ok("apt-get", &args);
    }
    let _purge = Purge;
    ok("dpkg", &["-i", &deb_s]);
    assert_eq!(package_status().as_deref(), Some("install ok installed"));
    let version = ok("/usr/bin/managerctl", &["--version"]);
    assert_eq!(
        version.trim(),
        format!("managerctl {}", env!("CARGO_PKG_VERSION"))
    );
    let version = ok("/usr/bin/cocos-manager", &["--version"]);
    assert!(version.starts_with("cocos-manager "), "{version}");
    // The unit's command line works with the installed files: the config
    // loads and yields a QEMU command.
    let qemu = ok(
        "/usr/bin/cocos-manager",
        &["--config", CONFFILE, "--print-qemu-cmd"],
    );
    assert!(qemu.contains("qemu-system-x86_64"), "{qemu}");
    if Path::new("/usr/bin/systemd-analyze").exists() {
        // Loads the unit with its drop-in and checks ExecStart's program.
        ok("systemd-analyze", &["verify", &format!("/{UNIT}")]);
    }

    // The user QEMU runs as: a system user with its own group, no shell.
    let passwd = getent("passwd", USER).expect("postinst creates the user");
    let fields: Vec<&str> = passwd.split(':').collect();
    let uid: u32 = fields[2].parse().expect("uid");
    assert!(uid < 1000, "not a system user: {passwd}");
    assert_eq!(fields[5], "/nonexistent", "{passwd}");
    assert_eq!(fields[6], "/usr/sbin/nologin", "{passwd}");
    let group = getent("group", USER).expect("postinst creates the group");
    assert_eq!(
        group.split(':').nth(2),
        Some(fields[3]),
        "{group} is not {passwd}'s group"
    );
    if let Some(kvm) = getent("group", "kvm") {
        assert!(
            kvm.split(':')
                .nth(3)
                .unwrap_or("")
                .split(',')
                .any(|m| m == USER),
            "{kvm}"
        );
    }
    // systemd does not run here: nothing was enabled.
    if !Path::new("/run/systemd/system").exists() {
        assert!(
            !Path::new("/etc/systemd/system/multi-user.target.wants/cocos-manager.service")
                .exists()
        );
    }

    // ---- reinstall over a changed conffile: the operator's file stays ----
    let mut changed = std::fs::read_to_string(CONFFILE).expect("conffile");
    changed.push_str("# changed by the operator\n");
    std::fs::write(CONFFILE, &changed).expect("change conffile");
    ok("dpkg", &["-i", "--force-confold", &deb_s]);
    assert_eq!(
        std::fs::read_to_string(CONFFILE).expect("conffile"),
        changed
    );
    assert!(getent("passwd", USER).is_some());

    // ---- remove: programs go, configuration and user stay ----
    ok("dpkg", &["-r", PACKAGE]);
    for gone in [
        "/usr/bin/cocos-manager",
        "/usr/bin/managerctl",
        &format!("/{UNIT}"),
        &format!("/{DROP_IN}"),
    ] {
        assert!(
            !Path::new(gone).exists(),
            "{gone} is still there after dpkg -r"
        );
    }
    assert_eq!(
        std::fs::read_to_string(CONFFILE).expect("conffile kept"),
        changed
    );
    assert_eq!(
        package_status().as_deref(),
        Some("deinstall ok config-files")
    );
    assert!(getent("passwd", USER).is_some(), "remove keeps the user");

    // ---- purge: configuration and user go ----
    ok("dpkg", &["-P", PACKAGE]);
    assert!(
        !Path::new(CONFFILE).exists(),
        "the conffile is still there after dpkg -P"
    );
    assert!(!Path::new("/etc/cocos-manager").exists());
    assert_eq!(getent("passwd", USER), None, "purge removes the user");
    assert_eq!(getent("group", USER), None, "purge removes the group");
    assert_eq!(package_status(), None);
}
