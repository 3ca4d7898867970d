//! A VM's folder: the firmware vars copy, the two 9p shares and the logs.
//! Created before QEMU starts and removed only after it has been reaped.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use cocos_core::config::{Config, TeeMode};
use cocos_core::guest::ValidatedCreate;
use cocos_core::qemu::VmPaths;

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

fn write_file(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    // No fsync: these files matter only while the VM's QEMU runs, and no
    // QEMU survives a host crash.
    file.write_all(content)
}

fn make_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o700).create(path)
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

/// Creates the VM folder and everything the guest is given. On error the
/// caller removes whatever was made with [`remove`].
pub fn prepare(
    config: &Config,
    paths: &VmPaths,
    id: &str,
    create: &ValidatedCreate,
) -> Result<(), FileError> {
    let vms = paths.dir.parent().unwrap_or(&paths.dir);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(vms)
        .map_err(|e| context("cannot create", vms, e))?;
    make_dir(&paths.dir).map_err(|e| context("cannot create", &paths.dir, e))?;
    for dir in [&paths.certs_dir, &paths.env_dir] {
        if let Some(parent) = dir.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| context("cannot create", parent, e))?;
        }
        make_dir(dir).map_err(|e| context("cannot create", dir, e))?;
    }
    for cert in &create.certs {
        let path = paths.certs_dir.join(cert.name);
        // The key is a secret; certificates need not be, but nothing else on
        // the host has a reason to read them either.
        let mode = if cert.secret { 0o600 } else { 0o644 };
        write_file(&path, &cert.content, mode).map_err(|e| context("cannot write", &path, e))?;
    }
    let env_path = paths.env_dir.join("environment");
    write_file(&env_path, create.environment_file(id).as_bytes(), 0o600)
        .map_err(|e| context("cannot write", &env_path, e))?;
    if config.tee_mode() == TeeMode::None {
        let template = fs::read(&config.qemu_ovmf_vars_file).map_err(|e| {
            context(
                "cannot read OVMF vars template",
                &config.qemu_ovmf_vars_file,
                e,
            )
        })?;
        write_file(&paths.ovmf_vars, &template, 0o600)
            .map_err(|e| context("cannot write", &paths.ovmf_vars, e))?;
    }
    Ok(())
}

/// Removes everything [`prepare`] made. Missing pieces are fine.
pub fn remove(paths: &VmPaths) -> Result<(), FileError> {
    let mut first_error = None;
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
        None => Ok(()),
    }
}

/// The line QEMU printed to explain why it stopped: the last line of its
/// log that is not routine chatter.
pub fn last_error_line(qemu_log: &Path) -> Option<String> {
    let text = fs::read(qemu_log).ok()?;
    let text = String::from_utf8_lossy(&text);
    text.lines()
        .rev()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with("char device redirected"))
        .map(|line| line.chars().take(1000).collect())
}
