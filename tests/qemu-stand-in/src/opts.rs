//! QEMU's command line, as much of it as the stand-in acts on. Everything
//! else is accepted and ignored, as long as it looks like an option.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

/// The program name QEMU puts in front of its error lines.
pub const QEMU: &str = "qemu-system-x86_64";

/// One `hostfwd=tcp:ADDR:PORT-[GADDR]:GPORT` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The whole option (`-netdev user,...`), for QEMU's error location.
    pub option: String,
    /// The rule as written, for the error message.
    pub rule: String,
    pub addr: IpAddr,
    pub port: u16,
    pub guest_port: u16,
}

/// A file QEMU would open at start, and how it complains when it cannot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needed {
    pub path: PathBuf,
    pub kind: NeededKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NeededKind {
    Kernel,
    Initrd,
    Bios,
    /// A `-drive if=pflash` image; the whole option for the error location.
    Pflash(String),
}

impl Needed {
    /// QEMU's error line (without the program prefix) for `reason`.
    pub fn error(&self, reason: &str) -> String {
        let path = self.path.display();
        match &self.kind {
            NeededKind::Kernel => format!("could not load kernel '{path}': {reason}"),
            NeededKind::Initrd => format!("could not load initial ram disk '{path}': {reason}"),
            NeededKind::Bios => format!("could not load PC BIOS '{path}': {reason}"),
            NeededKind::Pflash(option) => {
                format!("{option}: Could not open '{path}': {reason}")
            }
        }
    }
}

/// What the stand-in does with its command line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub name: Option<String>,
    pub append: Option<String>,
    pub needed: Vec<Needed>,
    pub forwards: Vec<Forward>,
    pub qmp: PathBuf,
    pub console: Option<PathBuf>,
    pub certs: Option<PathBuf>,
    pub env: Option<PathBuf>,
    pub monitor_pty: bool,
    /// `-S`: start paused (`prelaunch`) until `cont`.
    pub paused: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Help,
    Version,
    Run(Plan),
}

/// An option value: `implied,key=value,key=value` with `,,` for a comma.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Opts {
    pub implied: Option<String>,
    pub pairs: Vec<(String, String)>,
}

impl Opts {
    /// Parses `text`; when `implied` is set, a first item without `=` is the
    /// option's implied value (the netdev type, the chardev backend, ...).
    /// Elsewhere a bare `key` means `key=on`, as in QEMU.
    pub fn parse(text: &str, implied: bool) -> Opts {
        let mut items = Vec::new();
        let mut current = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    current.push(',');
                } else {
                    items.push(std::mem::take(&mut current));
                }
            } else {
                current.push(c);
            }
        }
        items.push(current);
        let mut opts = Opts::default();
        for (i, item) in items.into_iter().enumerate() {
            if item.is_empty() {
                continue;
            }
            match item.split_once('=') {
                Some((key, value)) => opts.pairs.push((key.to_string(), value.to_string())),
                None if i == 0 && implied => opts.implied = Some(item),
                None => opts.pairs.push((item, "on".to_string())),
            }
        }
        opts
    }

    /// The last value of `key` (QEMU: the last one wins).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.pairs
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn on(&self, key: &str) -> bool {
        matches!(self.get(key), Some("on" | "true" | "yes" | "y"))
    }
}

/// Options without an argument. Any other option takes the next word when
/// it is known to, or when that word does not look like an option.
const FLAGS: &[&str] = &[
    "S",
    "s",
    "nographic",
    "enable-kvm",
    "nodefaults",
    "no-reboot",
    "no-shutdown",
    "daemonize",
    "snapshot",
    "no-hpet",
    "no-acpi",
    "no-user-config",
    "full-screen",
    "enable-fips",
    "preconfig",
    "only-migratable",
    "no-quit",
    "win2k-hack",
    "singlestep",
    "old-param",
];

/// Options known to take an argument, even one that starts with `-`.
const WITH_ARG: &[&str] = &[
    "machine",
    "M",
    "cpu",
    "smp",
    "m",
    "drive",
    "blockdev",
    "netdev",
    "nic",
    "net",
    "device",
    "kernel",
    "append",
    "initrd",
    "dtb",
    "bios",
    "monitor",
    "mon",
    "qmp",
    "qmp-pretty",
    "serial",
    "parallel",
    "chardev",
    "fsdev",
    "virtfs",
    "name",
    "object",
    "accel",
    "boot",
    "global",
    "uuid",
    "pidfile",
    "D",
    "d",
    "L",
    "k",
    "rtc",
    "vga",
    "display",
    "action",
    "trace",
    "incoming",
    "overcommit",
    "msg",
    "run-with",
    "runas",
    "chroot",
    "cdrom",
    "hda",
    "hdb",
    "hdc",
    "hdd",
    "fda",
    "fdb",
    "mem-path",
    "numa",
    "sandbox",
    "audiodev",
    "add-fd",
    "smbios",
    "icount",
    "loadvm",
    "tpmdev",
    "plugin",
    "compat",
    "fw_cfg",
    "option-rom",
    "g",
    "echr",
    "debugcon",
    "watchdog-action",
    "mem-prealloc",
    "iscsi",
    "semihosting-config",
    "spice",
    "vnc",
    "usbdevice",
    "acpitable",
];

#[derive(Default)]
struct Chardev {
    option: String,
    path: Option<PathBuf>,
    server: bool,
}

/// Reads the argv (without the program name).
pub fn parse(args: &[String]) -> Result<Action, String> {
    let mut plan = Plan::default();
    let mut chardevs: HashMap<String, Chardev> = HashMap::new();
    let mut fsdevs: HashMap<String, PathBuf> = HashMap::new();
    let mut tags: HashMap<String, String> = HashMap::new();
    let mut tag_paths: HashMap<String, PathBuf> = HashMap::new();
    let mut qmp_chardev: Option<(String, String)> = None;
    let mut qmp_path: Option<PathBuf> = None;
    let mut serial_chardev: Option<String> = None;

    let mut i = 0;
    while i < args.len() {
        let word = &args[i];
        i += 1;
        // Not an option: QEMU reads it as a disk image; nothing to do here.
        let Some(name) = word.strip_prefix('-') else {
            continue;
        };
        let name = name.strip_prefix('-').unwrap_or(name);
        match name {
            "help" | "h" => return Ok(Action::Help),
            "version" => return Ok(Action::Version),
            _ => {}
        }
        if FLAGS.contains(&name) {
            if name == "S" {
                plan.paused = true;
            }
            continue;
        }
        let value = if WITH_ARG.contains(&name) {
            match args.get(i) {
                Some(v) => v.as_str(),
                None => return Err(format!("{QEMU}: -{name}: requires an argument")),
            }
        } else {
            match args.get(i) {
                Some(v) if !v.starts_with('-') => v.as_str(),
                _ => continue,
            }
        };
        i += 1;
        let option = format!("-{name} {value}");
        match name {
            "name" => {
                let opts = Opts::parse(value, true);
                plan.name = opts.implied.clone().or(opts.get("guest").map(str::to_string));
            }
            "kernel" => plan.needed.push(Needed {
                path: value.into(),
                kind: NeededKind::Kernel,
            }),
            "initrd" => plan.needed.push(Needed {
                path: value.into(),
                kind: NeededKind::Initrd,
            }),
            "bios" => plan.needed.push(Needed {
                path: value.into(),
                kind: NeededKind::Bios,
            }),
            "append" => plan.append = Some(value.to_string()),
            "drive" => {
                let opts = Opts::parse(value, false);
                if let (Some("pflash"), Some(file)) = (opts.get("if"), opts.get("file")) {
                    plan.needed.push(Needed {
                        path: file.into(),
                        kind: NeededKind::Pflash(option.clone()),
                    });
                }
            }
            "netdev" | "nic" | "net" => {
                let opts = Opts::parse(value, true);
                if opts.implied.as_deref() == Some("user") {
                    for rule in opts.all("hostfwd") {
                        if let Some(forward) = hostfwd(&option, rule)? {
                            plan.forwards.push(forward);
                        }
                    }
                }
            }
            "chardev" => {
                let opts = Opts::parse(value, true);
                if let Some(id) = opts.get("id") {
                    let chardev = Chardev {
                        option: option.clone(),
                        path: match opts.implied.as_deref() {
                            Some("socket") => opts.get("path").map(PathBuf::from),
                            _ => None,
                        },
                        server: opts.on("server"),
                    };
                    chardevs.insert(id.to_string(), chardev);
                }
            }
            "mon" => {
                let opts = Opts::parse(value, true);
                let chardev = opts.get("chardev").or(opts.implied.as_deref());
                if let (Some(chardev), Some("control")) = (chardev, opts.get("mode")) {
                    qmp_chardev = Some((chardev.to_string(), option.clone()));
                }
            }
            "qmp" | "qmp-pretty" => match value.strip_prefix("unix:") {
                Some(rest) => {
                    let opts = Opts::parse(rest, true);
                    qmp_path = opts.implied.map(PathBuf::from);
                }
                None => {
                    return Err(format!(
                        "qemu-stand-in: {option}: only unix:PATH QMP sockets are supported by this test double"
                    ))
                }
            },
            "serial" => {
                if let Some(id) = value.strip_prefix("chardev:") {
                    serial_chardev = Some(id.to_string());
                } else if let Some(rest) = value.strip_prefix("unix:") {
                    let opts = Opts::parse(rest, true);
                    plan.console = opts.implied.map(PathBuf::from);
                }
            }
            "monitor" => plan.monitor_pty = value == "pty",
            "fsdev" => {
                let opts = Opts::parse(value, true);
                if let (Some(id), Some(path)) = (opts.get("id"), opts.get("path")) {
                    fsdevs.insert(id.to_string(), path.into());
                }
            }
            "virtfs" => {
                let opts = Opts::parse(value, true);
                if let (Some(tag), Some(path)) = (opts.get("mount_tag"), opts.get("path")) {
                    tag_paths.insert(tag.to_string(), path.into());
                }
            }
            "device" => {
                let opts = Opts::parse(value, true);
                let driver = opts.implied.as_deref().unwrap_or_default();
                if driver.starts_with("virtio-9p") {
                    if let (Some(fsdev), Some(tag)) = (opts.get("fsdev"), opts.get("mount_tag")) {
                        tags.insert(tag.to_string(), fsdev.to_string());
                    }
                }
            }
            _ => {}
        }
    }

    // The shares the guest agent reads, by mount tag first, then by fsdev id.
    let share = |tag: &str, id: &str| -> Option<PathBuf> {
        tag_paths
            .get(tag)
            .cloned()
            .or_else(|| tags.get(tag).and_then(|fs| fsdevs.get(fs)).cloned())
            .or_else(|| fsdevs.get(id).cloned())
    };
    plan.certs = share("certs_share", "cert_fs");
    plan.env = share("env_share", "env_fs");

    let socket_of = |id: &str, user: &str| -> Result<PathBuf, String> {
        let chardev = chardevs
            .get(id)
            .ok_or_else(|| format!("{QEMU}: {user}: chardev \"{id}\" not found"))?;
        match (&chardev.path, chardev.server) {
            (Some(path), true) => Ok(path.clone()),
            _ => Err(format!(
                "qemu-stand-in: {}: this test double serves only -chardev socket,path=...,server=on",
                chardev.option
            )),
        }
    };
    plan.qmp = match (qmp_path, qmp_chardev) {
        (Some(path), _) => path,
        (None, Some((id, user))) => socket_of(&id, &user)?,
        (None, None) => return Err(
            "qemu-stand-in: no QMP socket: give -chardev socket,id=X,path=P,server=on,wait=off \
                 with -mon chardev=X,mode=control (or -qmp unix:P,server=on,wait=off)"
                .to_string(),
        ),
    };
    if let Some(id) = serial_chardev {
        plan.console = Some(socket_of(&id, &format!("-serial chardev:{id}"))?);
    }
    Ok(Action::Run(plan))
}

/// Reads one `hostfwd` rule: `[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport`.
/// UDP rules are accepted and ignored.
fn hostfwd(option: &str, rule: &str) -> Result<Option<Forward>, String> {
    let invalid =
        |why: &str| format!("{QEMU}: {option}: Invalid host forwarding rule '{rule}' ({why})");
    let (proto, rest) = rule
        .split_once(':')
        .ok_or_else(|| invalid("missing protocol"))?;
    match proto {
        "" | "tcp" => {}
        "udp" => return Ok(None),
        _ => return Err(invalid("bad protocol name")),
    }
    let (host, guest) = rest
        .split_once('-')
        .ok_or_else(|| invalid("missing guest part"))?;
    let (addr, port) = host
        .rsplit_once(':')
        .ok_or_else(|| invalid("missing host port"))?;
    let addr = addr.trim_start_matches('[').trim_end_matches(']');
    let addr: IpAddr = if addr.is_empty() {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        addr.parse().map_err(|_| invalid("bad host address"))?
    };
    let port: u16 = port.parse().map_err(|_| invalid("bad host port"))?;
    let guest_port: u16 = guest
        .rsplit_once(':')
        .map(|(_, p)| p)
        .unwrap_or(guest)
        .parse()
        .map_err(|_| invalid("bad guest port"))?;
    Ok(Some(Forward {
        option: option.to_string(),
        rule: rule.to_string(),
        addr,
        port,
        guest_port,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &[&str]) -> Vec<String> {
        s.iter().map(|w| w.to_string()).collect()
    }

    fn manager_argv() -> Vec<String> {
        words(&[
            "-machine",
            "q35",
            "-cpu",
            "max",
            "-smp",
            "1,maxcpus=64",
            "-m",
            "512M,slots=5,maxmem=30G",
            "-drive",
            "if=pflash,format=raw,unit=0,file=/ovmf/CODE.fd,readonly=on",
            "-drive",
            "if=pflash,format=raw,unit=1,file=/s/vms/a,,b/VARS.fd",
            "-netdev",
            "user,id=vmnic-a,hostfwd=tcp:127.0.0.1:6100-:7002",
            "-device",
            "virtio-net-pci,disable-legacy=on,iommu_platform=true,netdev=vmnic-a,addr=0x2,romfile=",
            "-kernel",
            "/k/bzImage",
            "-append",
            "console=ttyS0 -quiet",
            "-initrd",
            "/k/rootfs",
            "-nographic",
            "-monitor",
            "pty",
            "-fsdev",
            "local,id=cert_fs,path=/s/certs,security_model=mapped,readonly=on",
            "-device",
            "virtio-9p-pci,fsdev=cert_fs,mount_tag=certs_share",
            "-fsdev",
            "local,id=env_fs,path=/s/env,security_model=mapped,readonly=on",
            "-device",
            "virtio-9p-pci,fsdev=env_fs,mount_tag=env_share",
            "-name",
            "cocos-a",
            "-chardev",
            "socket,id=qmp,path=/s/qmp.sock,server=on,wait=off",
            "-mon",
            "chardev=qmp,mode=control",
            "-chardev",
            "socket,id=console,path=/s/console.sock,server=on,wait=off",
            "-serial",
            "chardev:console",
        ])
    }

    #[test]
    fn reads_the_managers_command_line() {
        let Ok(Action::Run(plan)) = parse(&manager_argv()) else {
            panic!("not a plan");
        };
        assert_eq!(plan.name.as_deref(), Some("cocos-a"));
        assert_eq!(plan.qmp, PathBuf::from("/s/qmp.sock"));
        assert_eq!(plan.console, Some(PathBuf::from("/s/console.sock")));
        assert_eq!(plan.certs, Some(PathBuf::from("/s/certs")));
        assert_eq!(plan.env, Some(PathBuf::from("/s/env")));
        assert_eq!(plan.append.as_deref(), Some("console=ttyS0 -quiet"));
        assert!(plan.monitor_pty);
        assert!(!plan.paused);
        let paths: Vec<_> = plan.needed.iter().map(|n| n.path.clone()).collect();
        assert_eq!(
            paths,
            vec![
                PathBuf::from("/ovmf/CODE.fd"),
                PathBuf::from("/s/vms/a,b/VARS.fd"),
                PathBuf::from("/k/bzImage"),
                PathBuf::from("/k/rootfs"),
            ]
        );
        assert_eq!(plan.forwards.len(), 1);
        let f = &plan.forwards[0];
        assert_eq!(
            (f.addr, f.port, f.guest_port),
            ("127.0.0.1".parse().unwrap(), 6100, 7002)
        );
        assert_eq!(f.rule, "tcp:127.0.0.1:6100-:7002");
    }

    #[test]
    fn empty_bind_address_is_any_and_unknown_options_are_skipped() {
        let argv = words(&[
            "-unknown-flag",
            "-weird",
            "value",
            "disk.img",
            "-S",
            "-netdev",
            "user,id=n,hostfwd=tcp::6101-10.0.2.15:7002,hostfwd=udp::53-:53",
            "-qmp",
            "unix:/q.sock,server,nowait",
        ]);
        let Ok(Action::Run(plan)) = parse(&argv) else {
            panic!("not a plan");
        };
        assert!(plan.paused);
        assert_eq!(plan.qmp, PathBuf::from("/q.sock"));
        assert_eq!(plan.forwards.len(), 1);
        assert_eq!(plan.forwards[0].addr, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!(plan.forwards[0].port, 6101);
        assert!(plan.console.is_none());
    }

    #[test]
    fn errors_look_like_qemus() {
        let e = parse(&words(&["-kernel"])).unwrap_err();
        assert_eq!(e, "qemu-system-x86_64: -kernel: requires an argument");
        let e = parse(&words(&["-mon", "chardev=q,mode=control"])).unwrap_err();
        assert!(e.contains("chardev \"q\" not found"), "{e}");
        let e = parse(&words(&["-netdev", "user,id=n,hostfwd=tcp:1.2.3.4:x-:1"])).unwrap_err();
        assert!(
            e.contains("Invalid host forwarding rule 'tcp:1.2.3.4:x-:1'"),
            "{e}"
        );
        assert!(parse(&words(&["-m", "1G"]))
            .unwrap_err()
            .contains("no QMP socket"));
        assert_eq!(parse(&words(&["--help"])), Ok(Action::Help));
        assert_eq!(parse(&words(&["-version"])), Ok(Action::Version));
    }

    #[test]
    fn opts_unescape_commas_and_take_bare_keys_as_on() {
        let o = Opts::parse("socket,id=a,path=/x,,y,server,wait=off", true);
        assert_eq!(o.implied.as_deref(), Some("socket"));
        assert_eq!(o.get("path"), Some("/x,y"));
        assert_eq!(o.get("server"), Some("on"));
        assert_eq!(o.get("wait"), Some("off"));
    }
}
