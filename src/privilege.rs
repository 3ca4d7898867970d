//! QEMU as an unprivileged user: the identity a child process drops to
//! between fork and exec (uid, gid, supplementary groups), the group of its
//! own each VM gets so that one VM's QEMU cannot reach another VM's files,
//! and who owns what in a VM folder.
//!
//! Pure: the caller looks users and groups up in the system's database and
//! applies the plan (the reaper drops to it, the file code chowns to it).
//!
//! Why a group per VM: every QEMU runs as the same `MANAGER_QEMU_USER`, so
//! the user alone cannot keep VM A's QEMU out of VM B's folder. Each VM
//! folder is `root:<VM's gid>` and not searchable by others; only the VM's
//! own processes hold that gid (as a supplementary group), so only they get
//! in, even though the files inside (the key, the env file) belong to the
//! QEMU user.

use std::collections::BTreeSet;

use crate::config::{Config, ConfigError};

/// How many per-VM group ids there are, from `MANAGER_QEMU_VM_GID_BASE` on.
pub const VM_GIDS: u32 = 65536;

/// The sandbox options QEMU 7.2 knows, with the values each takes.
const SANDBOX_OPTIONS: &[(&str, &[&str])] = &[
    ("enable", &["on", "off"]),
    ("obsolete", &["allow", "deny"]),
    ("elevateprivileges", &["allow", "deny", "children"]),
    ("spawn", &["allow", "deny"]),
    ("resourcecontrol", &["allow", "deny"]),
];

/// Who a child process becomes between fork and exec: `setgroups(groups)`,
/// `setgid(gid)`, `setuid(uid)`, then no new privileges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropPlan {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, sorted, without duplicates.
    pub groups: Vec<u32>,
}

impl DropPlan {
    /// The plan for one VM's processes: the same, plus the VM's own group.
    pub fn with_vm_group(&self, vm_gid: u32) -> DropPlan {
        let mut groups = self.groups.clone();
        groups.push(vm_gid);
        groups.sort_unstable();
        groups.dedup();
        DropPlan {
            uid: self.uid,
            gid: self.gid,
            groups,
        }
    }
}

/// A user as the system's user database describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserFacts {
    pub uid: u32,
    /// Its primary group.
    pub gid: u32,
    /// Every group it is a member of (`getgrouplist`), e.g. `kvm`.
    pub groups: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrivilegeError {
    #[error(
        "MANAGER_QEMU_USER is {user:?} but the manager does not run as root (euid {euid}): \
         only root can start QEMU as another user; set MANAGER_QEMU_USER and \
         MANAGER_QEMU_GROUP to empty to run QEMU as the manager"
    )]
    NotRoot { user: String, euid: u32 },
    #[error(
        "MANAGER_QEMU_USER {0:?}: no such user (the package creates cocos-qemu; by hand: \
         useradd --system --no-create-home --shell /usr/sbin/nologin --groups kvm {0})"
    )]
    NoSuchUser(String),
    #[error("MANAGER_QEMU_GROUP {0:?}: no such group")]
    NoSuchGroup(String),
    #[error(
        "MANAGER_QEMU_USER {0:?} is root (uid 0) or has group root (gid 0): QEMU would keep \
         root's privileges; set an unprivileged user, or empty to run QEMU as the manager"
    )]
    Root(String),
    #[error("cannot look up MANAGER_QEMU_USER or MANAGER_QEMU_GROUP: {0}")]
    Lookup(String),
}

/// The drop plan for `MANAGER_QEMU_USER` / `MANAGER_QEMU_GROUP`, from what
/// the caller found: `user` is the user's entry (None: no such user),
/// `group_gid` the group's id (None: no such group, or none asked for).
/// `Ok(None)`: QEMU runs as the manager.
pub fn plan(
    user_name: &str,
    group_name: &str,
    manager_euid: u32,
    user: Option<&UserFacts>,
    group_gid: Option<u32>,
) -> Result<Option<DropPlan>, PrivilegeError> {
    if user_name.is_empty() {
        // The group goes with the user: without one it means nothing.
        return Ok(None);
    }
    if manager_euid != 0 {
        return Err(PrivilegeError::NotRoot {
            user: user_name.to_string(),
            euid: manager_euid,
        });
    }
    let user = user.ok_or_else(|| PrivilegeError::NoSuchUser(user_name.to_string()))?;
    let gid = if group_name.is_empty() {
        user.gid
    } else {
        group_gid.ok_or_else(|| PrivilegeError::NoSuchGroup(group_name.to_string()))?
    };
    let mut groups: Vec<u32> = user.groups.iter().copied().chain([gid]).collect();
    groups.sort_unstable();
    groups.dedup();
    if user.uid == 0 || gid == 0 || groups.contains(&0) {
        return Err(PrivilegeError::Root(user_name.to_string()));
    }
    Ok(Some(DropPlan {
        uid: user.uid,
        gid,
        groups,
    }))
}

/// The lowest free per-VM group id: not held by a VM folder (`used`) and
/// not a group the system knows (`named`). None when all are taken.
pub fn pick_vm_gid(base: u32, used: &BTreeSet<u32>, named: impl Fn(u32) -> bool) -> Option<u32> {
    (0..VM_GIDS)
        .filter_map(|i| base.checked_add(i))
        .find(|gid| !used.contains(gid) && !named(*gid))
}

/// Whether `gid` is one of the per-VM group ids.
pub fn is_vm_gid(base: u32, gid: u32) -> bool {
    gid >= base && gid - base < VM_GIDS
}

/// What a permission check asks for (the `rwx` bits of one class).
pub const READ: u32 = 0o4;
pub const WRITE: u32 = 0o2;
pub const SEARCH: u32 = 0o1;

/// Whether a process with `uid` and `gids` (primary and supplementary) may
/// do `want` on a file with `mode`, owned by `owner`:`group`, by its mode
/// bits alone (as the kernel checks them: the owner class, else the group
/// class, else the others). Root may always.
pub fn permits(mode: u32, owner: u32, group: u32, uid: u32, gids: &[u32], want: u32) -> bool {
    if uid == 0 {
        return true;
    }
    let bits = if uid == owner {
        (mode >> 6) & 0o7
    } else if gids.contains(&group) {
        (mode >> 3) & 0o7
    } else {
        mode & 0o7
    };
    bits & want == want
}

impl DropPlan {
    /// Whether this plan's process may do `want` (see [`permits`]).
    pub fn permits(&self, mode: u32, owner: u32, group: u32, want: u32) -> bool {
        let gids: Vec<u32> = self.groups.iter().copied().chain([self.gid]).collect();
        permits(mode, owner, group, self.uid, &gids, want)
    }
}

/// The pieces of a VM's files whose owner and mode depend on who QEMU is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    /// `MANAGER_STATE_DIR`, its `vms/`, the disk directory and its `disks/`,
    /// the shares' mount bases: QEMU must pass through, never list.
    Base,
    /// The VM folder while QEMU and swtpm start (they create their sockets).
    VmDirOpen,
    /// The VM folder otherwise: QEMU passes through, creates nothing.
    VmDir,
    /// The certs and env shares (read-only for QEMU).
    Share,
    /// `key.pem`, `environment`.
    Secret,
    /// `cert.pem`, `ca.pem`.
    Cert,
    /// The VM's own firmware variables (QEMU writes them).
    OvmfVars,
    /// swtpm's state directory.
    TpmDir,
    /// The folder of the VM's disk image (qemu-img writes it).
    DiskDir,
}

/// Owner, group and mode of an item; `None` = the manager's own (root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ownership {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mode: u32,
}

/// Who owns `item`: with `qemu` = the drop plan and the VM's group, as
/// described in the module documentation; without, everything is the
/// manager's and private to it (QEMU runs as the manager).
pub fn ownership(item: Item, qemu: Option<(&DropPlan, u32)>) -> Ownership {
    let own = |mode| Ownership {
        uid: None,
        gid: None,
        mode,
    };
    let Some((plan, vm_gid)) = qemu else {
        return match item {
            Item::Base => own(0o700),
            Item::Cert => own(0o644),
            Item::Secret | Item::OvmfVars => own(0o600),
            _ => own(0o700),
        };
    };
    let vm = |mode| Ownership {
        uid: None,
        gid: Some(vm_gid),
        mode,
    };
    let qemu = |mode| Ownership {
        uid: Some(plan.uid),
        gid: Some(vm_gid),
        mode,
    };
    match item {
        Item::Base => own(0o711),
        // setgid: what QEMU creates belongs to the VM's group; sticky: it
        // cannot remove or rename the manager's files (record, logs).
        Item::VmDirOpen => vm(0o3770),
        Item::VmDir => vm(0o3710),
        Item::Share => vm(0o2750),
        Item::Secret | Item::OvmfVars => qemu(0o600),
        Item::Cert => qemu(0o644),
        Item::TpmDir => qemu(0o700),
        Item::DiskDir => vm(0o2770),
    }
}

/// Whether the manager may set its state directory, now of mode `mode`, to
/// [`Item::Base`]'s mode: not when it is shared (writable by others, or
/// sticky like /tmp), which an operator pointing it at a system directory
/// would make it; that one is left as it is.
pub fn may_tighten(mode: u32) -> bool {
    mode & 0o7022 == 0
}

/// The names QEMU and swtpm may leave in a VM folder while it is open, with
/// the kind each must be; anything else a process of the VM made there is
/// removed when the folder closes.
pub const QEMU_MADE: &[(&str, EntryKind)] = &[
    ("qmp.sock", EntryKind::Socket),
    ("console.sock", EntryKind::Socket),
    ("swtpm.sock", EntryKind::Socket),
    ("swtpm.log", EntryKind::File),
    ("OVMF_VARS.fd", EntryKind::File),
    ("tpm", EntryKind::Dir),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Socket,
    File,
    Dir,
    Other,
}

/// Whether an entry of a VM folder that the manager did not make may stay.
pub fn may_stay(name: &str, kind: EntryKind) -> bool {
    QEMU_MADE.iter().any(|(n, k)| *n == name && *k == kind)
}

/// The `-sandbox` value's check: `on`/`off` (or `enable=`) first, then
/// only options QEMU knows, each with one of its values.
pub fn check_sandbox(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters".into());
    }
    for (i, item) in value.split(',').enumerate() {
        let (key, val) = match item.split_once('=') {
            Some(pair) => pair,
            None if i == 0 => ("enable", item),
            None => return Err(format!("{item:?} is not KEY=VALUE")),
        };
        let Some((_, values)) = SANDBOX_OPTIONS.iter().find(|(k, _)| *k == key) else {
            return Err(format!(
                "unknown option {key:?} (known: obsolete, elevateprivileges, spawn, resourcecontrol)"
            ));
        };
        if !values.contains(&val) {
            return Err(format!(
                "{key}={val}: expected one of {}",
                values.join(", ")
            ));
        }
        if (key == "enable") != (i == 0) {
            return Err("must start with on or off".into());
        }
    }
    Ok(())
}

fn invalid(env: &'static str, key: &'static str, value: String, reason: String) -> ConfigError {
    ConfigError::Invalid {
        env,
        key,
        value,
        reason,
    }
}

/// The checks of this module's settings, part of the configuration's.
pub fn validate(config: &Config) -> Result<(), ConfigError> {
    check_sandbox(&config.qemu_sandbox).map_err(|reason| {
        invalid(
            "MANAGER_QEMU_SANDBOX",
            "qemu.sandbox",
            config.qemu_sandbox.clone(),
            reason,
        )
    })?;
    for (env, key, name) in [
        ("MANAGER_QEMU_USER", "qemu.user", &config.qemu_user),
        ("MANAGER_QEMU_GROUP", "qemu.group", &config.qemu_group),
    ] {
        if name
            .chars()
            .any(|c| c.is_whitespace() || c == ':' || c == '/')
        {
            return Err(invalid(
                env,
                key,
                name.clone(),
                "must be a user or group name".into(),
            ));
        }
    }
    let base = config.qemu_vm_gid_base;
    if base < 1000
        || base
            .checked_add(VM_GIDS)
            .is_none_or(|end| end > u32::MAX - 1)
    {
        return Err(invalid(
            "MANAGER_QEMU_VM_GID_BASE",
            "qemu.vm_gid_base",
            base.to_string(),
            format!(
                "must be from 1000 to {} (it and the {} ids after it are the VMs' own groups)",
                u32::MAX - 1 - VM_GIDS,
                VM_GIDS - 1
            ),
        ));
    }
    if config.disk_dir.as_os_str().is_empty() {
        return Err(invalid(
            "MANAGER_DISK_DIR",
            "disk_dir",
            String::new(),
            "must not be empty".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_user() -> UserFacts {
        // Like Debian's libvirt-qemu: its own group, and kvm for /dev/kvm.
        UserFacts {
            uid: 64055,
            gid: 64055,
            groups: vec![108, 64055],
        }
    }

    #[test]
    fn no_user_means_no_drop() {
        assert_eq!(plan("", "", 0, None, None), Ok(None));
        assert_eq!(plan("", "", 1000, None, None), Ok(None));
        // The default group does not matter without a user.
        assert_eq!(plan("", "cocos-qemu", 1000, None, None), Ok(None));
    }

    #[test]
    fn drop_to_the_user_with_its_groups() {
        let p = plan("cocos-qemu", "", 0, Some(&qemu_user()), None)
            .expect("valid")
            .expect("a drop");
        assert_eq!(
            p,
            DropPlan {
                uid: 64055,
                gid: 64055,
                groups: vec![108, 64055]
            }
        );
    }

    #[test]
    fn an_explicit_group_is_primary_and_the_users_groups_stay() {
        let p = plan("cocos-qemu", "nogroup", 0, Some(&qemu_user()), Some(65534))
            .expect("valid")
            .expect("a drop");
        assert_eq!(p.gid, 65534);
        assert_eq!(p.groups, vec![108, 64055, 65534]);
    }

    #[test]
    fn nobody_as_in_the_development_profile() {
        let nobody = UserFacts {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        };
        let p = plan("nobody", "nogroup", 0, Some(&nobody), Some(65534))
            .expect("valid")
            .expect("a drop");
        assert_eq!(
            (p.uid, p.gid, p.groups.clone()),
            (65534, 65534, vec![65534])
        );
        let vm = p.with_vm_group(1_879_048_193);
        assert_eq!(vm.groups, vec![65534, 1_879_048_193]);
        assert_eq!((vm.uid, vm.gid), (65534, 65534));
    }

    #[test]
    fn errors() {
        let u = qemu_user();
        assert_eq!(
            plan("cocos-qemu", "", 1000, Some(&u), None),
            Err(PrivilegeError::NotRoot {
                user: "cocos-qemu".into(),
                euid: 1000
            })
        );
        assert_eq!(
            plan("cocos-qemu", "", 0, None, None),
            Err(PrivilegeError::NoSuchUser("cocos-qemu".into()))
        );
        assert_eq!(
            plan("cocos-qemu", "qemu", 0, Some(&u), None),
            Err(PrivilegeError::NoSuchGroup("qemu".into()))
        );
        let root = UserFacts {
            uid: 0,
            gid: 0,
            groups: vec![0],
        };
        assert_eq!(
            plan("root", "", 0, Some(&root), None),
            Err(PrivilegeError::Root("root".into()))
        );
        assert_eq!(
            plan("cocos-qemu", "root", 0, Some(&u), Some(0)),
            Err(PrivilegeError::Root("cocos-qemu".into()))
        );
        let wheel = UserFacts {
            groups: vec![0, 64055],
            ..u
        };
        assert!(matches!(
            plan("cocos-qemu", "", 0, Some(&wheel), None),
            Err(PrivilegeError::Root(_))
        ));
        assert!(PrivilegeError::NotRoot {
            user: "x".into(),
            euid: 1
        }
        .to_string()
        .contains("does not run as root"));
    }

    #[test]
    fn vm_gids_are_unique_and_skip_named_groups() {
        let base = 1_879_048_192;
        let mut used = BTreeSet::new();
        assert_eq!(pick_vm_gid(base, &used, |_| false), Some(base));
        used.insert(base);
        used.insert(base + 2);
        assert_eq!(pick_vm_gid(base, &used, |_| false), Some(base + 1));
        assert_eq!(pick_vm_gid(base, &used, |g| g == base + 1), Some(base + 3));
        let full: BTreeSet<u32> = (base..base + VM_GIDS).collect();
        assert_eq!(pick_vm_gid(base, &full, |_| false), None);
        assert!(is_vm_gid(base, base));
        assert!(is_vm_gid(base, base + VM_GIDS - 1));
        assert!(!is_vm_gid(base, base + VM_GIDS));
        assert!(!is_vm_gid(base, base - 1));
    }

    #[test]
    fn permission_classes_as_the_kernel_checks_them() {
        // root:vm 3710: the VM's own process passes, another QEMU does not.
        let vm_gid = 1_879_048_192;
        let nobody = DropPlan {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        };
        let own = nobody.with_vm_group(vm_gid);
        assert!(own.permits(0o3710, 0, vm_gid, SEARCH));
        assert!(!own.permits(0o3710, 0, vm_gid, READ));
        assert!(!own.permits(0o3710, 0, vm_gid, WRITE));
        assert!(!nobody.permits(0o3710, 0, vm_gid, SEARCH));
        // Owner bits decide for the owner, even when others may more.
        assert!(!permits(0o077, 65534, 0, 65534, &[65534], READ));
        assert!(permits(0o711, 0, 0, 65534, &[65534], SEARCH));
        assert!(!permits(0o700, 0, 0, 65534, &[65534], SEARCH));
        assert!(permits(0o600, 0, 0, 0, &[], READ | WRITE));
    }

    #[test]
    fn who_owns_what() {
        let plan = DropPlan {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        };
        let g = 1_879_048_192;
        let q = Some((&plan, g));
        let key = ownership(Item::Secret, q);
        assert_eq!((key.uid, key.gid, key.mode), (Some(65534), Some(g), 0o600));
        let dir = ownership(Item::VmDir, q);
        assert_eq!((dir.uid, dir.gid, dir.mode), (None, Some(g), 0o3710));
        assert_eq!(ownership(Item::VmDirOpen, q).mode, 0o3770);
        assert_eq!(ownership(Item::Share, q).mode, 0o2750);
        assert_eq!(ownership(Item::Base, q).mode, 0o711);
        assert_eq!(ownership(Item::TpmDir, q).uid, Some(65534));
        // Another QEMU (same user, not the VM's group) gets nowhere in.
        for item in [Item::VmDir, Item::VmDirOpen, Item::Share, Item::DiskDir] {
            let o = ownership(item, q);
            assert!(
                !plan.permits(o.mode, 0, o.gid.unwrap_or(0), SEARCH),
                "{item:?}"
            );
            let own = plan.with_vm_group(g);
            assert!(
                own.permits(o.mode, 0, o.gid.unwrap_or(0), SEARCH),
                "{item:?}"
            );
        }
        // Without a drop everything is the manager's and private.
        for item in [Item::VmDir, Item::Share, Item::Secret, Item::Base] {
            let o = ownership(item, None);
            assert_eq!((o.uid, o.gid), (None, None));
            assert_eq!(o.mode & 0o077, 0, "{item:?}");
        }
    }

    #[test]
    fn shared_directories_are_never_tightened() {
        assert!(may_tighten(0o755));
        assert!(may_tighten(0o700));
        assert!(may_tighten(0o711));
        assert!(!may_tighten(0o1777), "/tmp");
        assert!(!may_tighten(0o775));
        assert!(!may_tighten(0o2755));
    }

    #[test]
    fn only_qemus_own_names_stay_in_its_folder() {
        assert!(may_stay("qmp.sock", EntryKind::Socket));
        assert!(may_stay("tpm", EntryKind::Dir));
        assert!(!may_stay("qmp.sock", EntryKind::Other));
        assert!(!may_stay("record.json.tmp", EntryKind::Other));
        assert!(!may_stay("console.log", EntryKind::File));
    }

    #[test]
    fn sandbox_values() {
        for ok in [
            "",
            "on",
            "off",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "enable=on,elevateprivileges=children",
        ] {
            assert_eq!(check_sandbox(ok), Ok(()), "{ok}");
        }
        for bad in [
            "yes",
            "on,spawn=maybe",
            "on,chroot=/",
            "obsolete=deny",
            "on,on",
            "on, spawn=deny",
            "on,spawn=deny\n",
        ] {
            assert!(check_sandbox(bad).is_err(), "{bad}");
        }
    }
}
