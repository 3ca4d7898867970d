//! A VM's folder: the firmware vars copy, the two 9p shares and the logs.
//! Created before QEMU starts and removed only after it has been reaped.

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{
    fchown, DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt,
};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cocos_core::config::{Config, TeeMode};
use cocos_core::guest::ValidatedCreate;
use cocos_core::privilege::{self, DropPlan, EntryKind, Item, Ownership};
use cocos_core::qemu::VmPaths;
use tracing::{info, warn};

use crate::error::ApiError;

/// An I/O failure on the state directory as the API reports it: a full
/// disk or quota is RESOURCE_EXHAUSTED, a read-only or forbidden one
/// FAILED_PRECONDITION, anything else INTERNAL.
pub fn storage_error(what: &str, e: &io::Error) -> ApiError {
    classify(format!("{what}: {e}"), e)
}

fn classify(message: String, e: &io::Error) -> ApiError {
    use io::ErrorKind as K;
    match (e.raw_os_error(), e.kind()) {
        (Some(libc::ENOSPC | libc::EDQUOT), _) | (_, K::StorageFull | K::QuotaExceeded) => {
            ApiError::ResourceExhausted(message)
        }
        (Some(libc::EROFS | libc::EACCES | libc::EPERM), _)
        | (_, K::ReadOnlyFilesystem | K::PermissionDenied) => ApiError::FailedPrecondition(message),
        // A file the configuration names is missing (the OVMF vars template).
        (_, K::NotFound) => ApiError::FailedPrecondition(message),
        _ => ApiError::Internal(message),
    }
}

/// Who a VM's processes run as when QEMU does not run as the manager: the
/// drop plan, with the VM's own group among its groups, and that group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmUser {
    pub plan: DropPlan,
    pub vm_gid: u32,
}

fn owner(item: Item, user: Option<&VmUser>) -> Ownership {
    privilege::ownership(item, user.map(|u| (&u.plan, u.vm_gid)))
}

/// Gives `file` (just made, still private) its owner, group and mode.
fn own_file(file: &File, item: Item, user: Option<&VmUser>) -> io::Result<()> {
    let o = owner(item, user);
    if o.uid.is_some() || o.gid.is_some() {
        fchown(file, o.uid, o.gid)?;
    }
    file.set_permissions(fs::Permissions::from_mode(o.mode))
}

/// The same for a directory the manager made (it cannot be replaced:
/// nothing but the manager can write where it lies).
pub fn own_dir(path: &Path, item: Item, user: Option<&VmUser>) -> io::Result<()> {
    let o = owner(item, user);
    if o.uid.is_some() || o.gid.is_some() {
        std::os::unix::fs::chown(path, o.uid, o.gid)?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(o.mode))
}

fn write_file(path: &Path, content: &[u8], item: Item, user: Option<&VmUser>) -> io::Result<()> {
    // Private from the first byte; owner and mode follow before any content.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    own_file(&file, item, user)?;
    // No fsync: these files matter only while the VM's QEMU runs, and no
    // QEMU survives a host crash.
    file.write_all(content)
}

fn make_dir(path: &Path, item: Item, user: Option<&VmUser>) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o700).create(path)?;
    own_dir(path, item, user)
}

/// Makes `dir` (and what is missing above it) for the manager's own use
/// below it, passable by QEMU's user when QEMU does not run as the manager.
fn make_base(dir: &Path, user: Option<&VmUser>) -> io::Result<()> {
    let mode = owner(Item::Base, user).mode;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)?;
    if let Some(user) = user {
        reachable(dir, &user.plan)?;
    }
    Ok(())
}

/// Directories already known to let QEMU's user through.
static REACHABLE: Mutex<Option<HashSet<(PathBuf, u32)>>> = Mutex::new(None);

/// Lets QEMU's user pass through `dir` and every directory above it: one of
/// them that does not is given the search bit for others (never the right
/// to list) when the manager owns it, which is logged; one the manager does
/// not own is an error naming it. (A private temporary directory holding
/// the state directory, for one, is mode 0700.)
pub fn reachable(dir: &Path, plan: &DropPlan) -> io::Result<()> {
    let key = (dir.to_path_buf(), plan.uid);
    if let Ok(known) = REACHABLE.lock() {
        if known.as_ref().is_some_and(|k| k.contains(&key)) {
            return Ok(());
        }
    }
    let euid = crate::process::euid();
    for step in dir.ancestors().collect::<Vec<_>>().into_iter().rev() {
        let meta = fs::metadata(step)?;
        if plan.permits(meta.mode(), meta.uid(), meta.gid(), privilege::SEARCH) {
            continue;
        }
        if meta.uid() != euid {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} (mode {:o}, owner uid {}) does not let MANAGER_QEMU_USER (uid {}) through, and it is not the manager's to change",
                    step.display(),
                    meta.mode() & 0o7777,
                    meta.uid(),
                    plan.uid
                ),
            ));
        }
        let mode = (meta.mode() & 0o7777) | 0o001;
        fs::set_permissions(step, fs::Permissions::from_mode(mode))?;
        warn!(
            dir = %step.display(),
            mode = format!("{mode:o}"),
            "made a directory above a VM folder passable (search only, not listable) for MANAGER_QEMU_USER"
        );
    }
    if let Ok(mut known) = REACHABLE.lock() {
        known.get_or_insert_with(HashSet::new).insert(key);
    }
    Ok(())
}

/// The per-VM group ids in use (by VM folders), found once, then kept.
static VM_GIDS: Mutex<Option<BTreeSet<u32>>> = Mutex::new(None);

fn vm_gids_in_use(config: &Config) -> BTreeSet<u32> {
    let vms = config.state_dir.join("vms");
    let mut used = BTreeSet::new();
    if let Ok(entries) = fs::read_dir(&vms) {
        for entry in entries.flatten() {
            if let Ok(meta) = entry.metadata() {
                if meta.is_dir() && meta.gid() != 0 {
                    used.insert(meta.gid());
                }
            }
        }
    }
    used
}

/// A group of its own for a new VM (see `cocos_core::privilege`).
fn allocate_vm_gid(config: &Config) -> io::Result<u32> {
    let mut guard = VM_GIDS
        .lock()
        .map_err(|_| io::Error::other("the per-VM group book is poisoned"))?;
    let used = guard.get_or_insert_with(|| vm_gids_in_use(config));
    let gid = privilege::pick_vm_gid(config.qemu_vm_gid_base, used, crate::process::group_exists)
        .ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::QuotaExceeded,
            format!(
                "every per-VM group id from MANAGER_QEMU_VM_GID_BASE ({}) on is taken",
                config.qemu_vm_gid_base
            ),
        )
    })?;
    used.insert(gid);
    Ok(gid)
}

fn release_vm_gid(gid: u32) {
    if let Ok(mut guard) = VM_GIDS.lock() {
        if let Some(used) = guard.as_mut() {
            used.remove(&gid);
        }
    }
}

/// Who the processes of an existing VM run as: the current drop plan with
/// the group its folder was given. `Ok(None)`: as the manager.
pub fn vm_user(config: &Config, paths: &VmPaths) -> Result<Option<VmUser>, ApiError> {
    let Some(plan) = crate::process::qemu_drop_plan(config)
        .map_err(|e| ApiError::FailedPrecondition(e.to_string()))?
    else {
        return Ok(None);
    };
    let meta = fs::metadata(&paths.dir)
        .map_err(|e| storage_error(&format!("cannot read {}", paths.dir.display()), &e))?;
    if meta.gid() == 0 {
        return Err(ApiError::FailedPrecondition(format!(
            "{} was made for QEMU running as the manager; MANAGER_QEMU_USER has been set since: create the VM again",
            paths.dir.display()
        )));
    }
    Ok(Some(VmUser {
        plan: plan.with_vm_group(meta.gid()),
        vm_gid: meta.gid(),
    }))
}

/// Lets the VM's processes create their sockets (and swtpm its log) in the
/// VM folder while they start.
pub fn open_window(paths: &VmPaths, user: &VmUser) -> io::Result<()> {
    own_dir(&paths.dir, Item::VmDirOpen, Some(user))
}

/// Closes the VM folder again and removes whatever a process of the VM made
/// in it besides its sockets, swtpm's log and state: from here on the
/// manager's own names there (record, logs) cannot have been planted.
/// Returns the names removed.
pub fn close_window(paths: &VmPaths, user: &VmUser) -> io::Result<Vec<String>> {
    own_dir(&paths.dir, Item::VmDir, Some(user))?;
    let euid = crate::process::euid();
    let mut removed = Vec::new();
    for entry in fs::read_dir(&paths.dir)? {
        let entry = entry?;
        let meta = entry.path().symlink_metadata()?;
        if meta.uid() == euid {
            continue;
        }
        let kind = match meta.file_type() {
            t if t.is_socket() => EntryKind::Socket,
            t if t.is_file() => EntryKind::File,
            t if t.is_dir() => EntryKind::Dir,
            _ => EntryKind::Other,
        };
        let name = entry.file_name().to_string_lossy().into_owned();
        if privilege::may_stay(&name, kind) {
            continue;
        }
        if kind == EntryKind::Dir {
            fs::remove_dir_all(entry.path())?;
        } else {
            fs::remove_file(entry.path())?;
        }
        removed.push(name);
    }
    Ok(removed)
}

/// Where a VM's disk image lives: its own folder under MANAGER_DISK_DIR
/// (relative: to the working directory), on persistent storage.
pub fn disk_folder(config: &Config, id: &str) -> io::Result<PathBuf> {
    let base = if config.disk_dir.is_relative() {
        std::env::current_dir()?.join(&config.disk_dir)
    } else {
        config.disk_dir.clone()
    };
    Ok(base.join("disks").join(id))
}

/// Makes the VM's disk folder and the link to the image in the VM folder
/// (`paths.disk`, where the command line and the record name it); returns
/// the image's own path, for qemu-img to write.
pub fn prepare_disk(
    config: &Config,
    paths: &VmPaths,
    id: &str,
    user: Option<&VmUser>,
) -> Result<PathBuf, FileError> {
    let folder =
        disk_folder(config, id).map_err(|e| context("cannot find", &config.disk_dir, e))?;
    let image = folder.join(DISK_IMAGE);
    // The link first: removing the VM finds the folder through it.
    std::os::unix::fs::symlink(&image, &paths.disk)
        .map_err(|e| context("cannot create", &paths.disk, e))?;
    if let Some(disks) = folder.parent() {
        make_base(disks, user).map_err(|e| context("cannot create", disks, e))?;
        if user.is_some() {
            // Ours alone: exactly passable, not listable.
            own_dir(disks, Item::Base, user).map_err(|e| context("cannot set up", disks, e))?;
        }
    }
    make_dir(&folder, Item::DiskDir, user).map_err(|e| context("cannot create", &folder, e))?;
    Ok(image)
}

const DISK_IMAGE: &str = "disk.qcow2";

/// The disk folder a VM folder's link leads to, if it has one of the shape
/// [`prepare_disk`] makes (`.../disks/<id>/disk.qcow2`).
fn linked_disk_folder(paths: &VmPaths) -> Option<PathBuf> {
    let target = fs::read_link(&paths.disk).ok()?;
    let folder = target.parent()?;
    let id = paths.dir.file_name()?;
    let shaped = target.file_name()? == DISK_IMAGE
        && folder.file_name()? == id
        && folder.parent()?.file_name()? == "disks"
        && target.is_absolute();
    shaped.then(|| folder.to_path_buf())
}

/// Overwrites a secret with zeros, as long as it was, and makes that reach
/// the storage, before it is unlinked: on a state directory that is not
/// tmpfs the old blocks would otherwise keep it. Only a regular file with
/// one link, opened without following a symlink.
fn shred(path: &Path) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.nlink() != 1 {
        return Ok(());
    }
    let zeros = [0u8; 4096];
    let mut left = meta.len();
    while left > 0 {
        let n = usize::try_from(left.min(zeros.len() as u64)).unwrap_or(zeros.len());
        file.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    file.sync_data()
}

/// Shreds every file of a share (the key, the env file, certificates).
fn shred_share(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            if let Err(e) = shred(&entry.path()) {
                warn!(file = %entry.path().display(), error = %e, "cannot overwrite a secret before removing it");
            }
        }
    }
}

/// A file operation on a VM's folder that failed: what, on which path, why.
#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {source}", path.display())]
pub struct FileError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl FileError {
    /// As the API reports it (see [`storage_error`]).
    pub fn to_api(&self, what: &str) -> ApiError {
        classify(format!("{what}: {self}"), &self.source)
    }
}

fn context(action: &'static str, path: &Path, source: io::Error) -> FileError {
    FileError {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates the VM folder and everything the guest is given, owned as
/// `cocos_core::privilege::ownership` says when QEMU runs as `plan`'s user
/// (the VM then gets a group of its own). On error the caller removes
/// whatever was made with [`remove`].
pub fn prepare(
    config: &Config,
    paths: &VmPaths,
    id: &str,
    create: &ValidatedCreate,
    plan: Option<&DropPlan>,
) -> Result<Option<VmUser>, FileError> {
    let vms = paths.dir.parent().unwrap_or(&paths.dir);
    let user = match plan {
        Some(plan) => {
            let vm_gid = allocate_vm_gid(config)
                .map_err(|e| context("cannot allocate a group for", &paths.dir, e))?;
            Some(VmUser {
                plan: plan.with_vm_group(vm_gid),
                vm_gid,
            })
        }
        None => None,
    };
    let made = prepare_as(config, paths, id, create, vms, user.as_ref());
    if let (Err(_), Some(user)) = (&made, &user) {
        // Unless the folder got it (then removing the folder frees it).
        if fs::metadata(&paths.dir).map_or(true, |m| m.gid() != user.vm_gid) {
            release_vm_gid(user.vm_gid);
        }
    }
    made.map(|()| user)
}

fn prepare_as(
    config: &Config,
    paths: &VmPaths,
    id: &str,
    create: &ValidatedCreate,
    vms: &Path,
    user: Option<&VmUser>,
) -> Result<(), FileError> {
    make_base(vms, user).map_err(|e| context("cannot create", vms, e))?;
    if user.is_some() {
        // The state directory and vms/ are the manager's alone: passable by
        // QEMU's user, listable by nobody else (a shared directory named as
        // the state directory is left as it is).
        let state = fs::metadata(&config.state_dir)
            .map_err(|e| context("cannot read", &config.state_dir, e))?;
        for dir in [config.state_dir.as_path(), vms] {
            if dir == vms || privilege::may_tighten(state.mode()) {
                own_dir(dir, Item::Base, user).map_err(|e| context("cannot set up", dir, e))?;
            }
        }
    }
    make_dir(&paths.dir, Item::VmDir, user).map_err(|e| context("cannot create", &paths.dir, e))?;
    for dir in [&paths.certs_dir, &paths.env_dir] {
        // A share outside the VM folder: under its configured mount base.
        if let Some(parent) = dir.parent().filter(|p| *p != paths.dir) {
            make_base(parent, user).map_err(|e| context("cannot create", parent, e))?;
        }
        make_dir(dir, Item::Share, user).map_err(|e| context("cannot create", dir, e))?;
    }
    for cert in &create.certs {
        let path = paths.certs_dir.join(cert.name);
        // The key is a secret, for QEMU's user alone; certificates need not
        // be, but nothing else on the host has a reason to read them either.
        let item = if cert.secret {
            Item::Secret
        } else {
            Item::Cert
        };
        write_file(&path, &cert.content, item, user)
            .map_err(|e| context("cannot write", &path, e))?;
    }
    let env_path = paths.env_dir.join("environment");
    write_file(
        &env_path,
        create.environment_file(id).as_bytes(),
        Item::Secret,
        user,
    )
    .map_err(|e| context("cannot write", &env_path, e))?;
    if config.tee_mode() == TeeMode::None {
        let template = fs::read(&config.qemu_ovmf_vars_file).map_err(|e| {
            context(
                "cannot read OVMF vars template",
                &config.qemu_ovmf_vars_file,
                e,
            )
        })?;
        write_file(&paths.ovmf_vars, &template, Item::OvmfVars, user)
            .map_err(|e| context("cannot write", &paths.ovmf_vars, e))?;
    }
    Ok(())
}

/// Removes everything [`prepare`] made (and the disk [`prepare_disk`]
/// made), the secrets overwritten first. Missing pieces are fine.
pub fn remove(paths: &VmPaths) -> Result<(), FileError> {
    let mut first_error = None;
    for dir in [&paths.certs_dir, &paths.env_dir] {
        shred_share(dir);
    }
    if let Some(folder) = linked_disk_folder(paths) {
        match fs::remove_dir_all(&folder) {
            Ok(()) => info!(folder = %folder.display(), "VM disk removed"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                first_error.get_or_insert(context("cannot remove", &folder, e));
            }
        }
    }
    let vm_gid = fs::metadata(&paths.dir)
        .ok()
        .map(|m| m.gid())
        .filter(|g| *g != 0);
    for dir in [&paths.certs_dir, &paths.env_dir, &paths.dir] {
        match fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                first_error.get_or_insert(context("cannot remove", dir, e));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => {
            if let Some(gid) = vm_gid {
                release_vm_gid(gid);
            }
            Ok(())
        }
    }
}

/// The line QEMU printed to explain why it stopped: the last line of its
/// log that is not routine chatter.
pub fn last_error_line(qemu_log: &Path) -> Option<String> {
    // Never through a link: what the manager reads here ends up in answers.
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(qemu_log)
        .ok()?;
    let mut text = Vec::new();
    io::Read::read_to_end(&mut file, &mut text).ok()?;
    let text = String::from_utf8_lossy(&text);
    text.lines()
        .rev()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with("char device redirected"))
        .map(|line| line.chars().take(1000).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cocos-files-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn paths_in(dir: &Path) -> VmPaths {
        let mut config = Config::defaults();
        config.state_dir = dir.to_path_buf();
        VmPaths::new(&config, "e71cdcf5-21c0-4e1d-9471-ac6b4389d5f3")
    }

    #[test]
    fn closing_the_folder_keeps_the_sockets_and_removes_what_was_planted() {
        use std::os::unix::net::UnixListener;
        let base = scratch("window");
        let paths = paths_in(&base);
        fs::create_dir_all(&paths.dir).expect("vm dir");
        // As root the test plays the QEMU user with chown; elsewhere it
        // cannot, and the owner check makes everything the manager's.
        let root = crate::process::euid() == 0;
        let user = VmUser {
            plan: DropPlan {
                uid: 65534,
                gid: 65534,
                groups: vec![65534, 1_879_048_192],
            },
            vm_gid: 1_879_048_192,
        };
        let by_qemu = |p: &Path| {
            if root {
                let _ = std::os::unix::fs::lchown(p, Some(65534), Some(65534));
            }
        };
        fs::write(paths.dir.join("record.json"), b"{}").expect("record");
        let qmp = UnixListener::bind(&paths.qmp_socket).expect("bind");
        by_qemu(&paths.qmp_socket);
        std::os::unix::fs::symlink("/etc/passwd", paths.dir.join("record.json.tmp"))
            .expect("plant");
        by_qemu(&paths.dir.join("record.json.tmp"));
        fs::write(paths.dir.join("console.log"), b"").expect("plant");
        by_qemu(&paths.dir.join("console.log"));
        let removed = close_window(&paths, &user).expect("close");
        if root {
            let mut removed = removed;
            removed.sort();
            assert_eq!(removed, ["console.log", "record.json.tmp"]);
            assert!(paths.qmp_socket.exists(), "QEMU's socket stays");
            assert!(paths.dir.join("record.json").exists(), "ours stays");
            let meta = fs::metadata(&paths.dir).expect("dir");
            assert_eq!(meta.mode() & 0o7777, 0o3710);
            assert_eq!(meta.gid(), 1_879_048_192);
        } else {
            assert!(removed.is_empty());
        }
        drop(qmp);
        fs::remove_dir_all(&base).expect("cleanup");
    }

    #[test]
    fn secrets_are_zeroed_in_place_and_links_are_not_followed() {
        let base = scratch("shred");
        let secret = base.join("key.pem");
        fs::write(&secret, b"private key").expect("write");
        let reader = fs::File::open(&secret).expect("open");
        shred(&secret).expect("shred");
        // The same inode now holds zeros of the same length.
        let mut text = Vec::new();
        io::Read::read_to_end(&mut &reader, &mut text).expect("read");
        assert_eq!(text, vec![0u8; b"private key".len()]);
        let victim = base.join("victim");
        fs::write(&victim, b"keep").expect("write");
        let link = base.join("environment");
        std::os::unix::fs::symlink(&victim, &link).expect("link");
        assert!(shred(&link).is_err(), "a link is refused");
        assert_eq!(fs::read(&victim).expect("read"), b"keep");
        fs::remove_dir_all(&base).expect("cleanup");
    }

    #[test]
    fn the_disk_folder_is_found_only_through_a_link_of_its_own_shape() {
        let base = scratch("disk");
        let paths = paths_in(&base.join("state"));
        fs::create_dir_all(&paths.dir).expect("vm dir");
        let id = paths.dir.file_name().expect("id").to_owned();
        let folder = base.join("disks").join(&id);
        std::os::unix::fs::symlink(folder.join(DISK_IMAGE), &paths.disk).expect("link");
        assert_eq!(linked_disk_folder(&paths), Some(folder));
        fs::remove_file(&paths.disk).expect("unlink");
        std::os::unix::fs::symlink("/etc/passwd", &paths.disk).expect("link");
        assert_eq!(linked_disk_folder(&paths), None);
        fs::remove_file(&paths.disk).expect("unlink");
        assert_eq!(linked_disk_folder(&paths), None, "no link, no disk");
        fs::remove_dir_all(&base).expect("cleanup");
    }
}
