//! VM records on disk: written atomically (write a temporary file, rename
//! it over the record), found again at start, and set aside when unreadable.
//!
//! The rename is what a manager killed mid-write needs: it never sees a torn
//! record. There is no fsync: a record only has to outlive the manager, not
//! the host, because no VM outlives the host either.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use cocos_core::config::Config;
use cocos_core::record::{VmRecord, RECORD_FILE};
use tracing::warn;

pub fn write(record: &VmRecord) -> io::Result<()> {
    let dir = &record.paths.dir;
    let tmp = dir.join(format!("{RECORD_FILE}.tmp"));
    {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(&record.to_json())?;
    }
    fs::rename(&tmp, dir.join(RECORD_FILE))
}

/// What start-up finds in one VM folder.
pub enum Found {
    Record(Box<VmRecord>),
    /// A folder without a record: a create that never finished.
    NoRecord {
        folder: String,
        dir: PathBuf,
    },
    /// A record that cannot be used; it has been moved aside.
    Corrupt {
        folder: String,
        error: String,
    },
}

pub fn scan(config: &Config) -> Vec<Found> {
    let vms = config.state_dir.join("vms");
    let bases = [
        config.qemu_certs_mount.as_path(),
        config.qemu_env_mount.as_path(),
    ];
    let Ok(entries) = fs::read_dir(&vms) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let folder = entry.file_name().to_string_lossy().into_owned();
        let dir = entry.path();
        // A real folder only: a symlink planted in vms/ must not lead the
        // manager to adopt, or later delete, anything outside it.
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = dir.join(RECORD_FILE);
        match fs::read(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                found.push(Found::NoRecord { folder, dir })
            }
            Err(e) => {
                let error = e.to_string();
                move_aside(config, &folder, &path);
                found.push(Found::Corrupt { folder, error });
            }
            Ok(bytes) => match VmRecord::parse(&bytes, &config.state_dir, &folder, &bases) {
                Ok(record) => found.push(Found::Record(Box::new(record))),
                Err(e) => {
                    move_aside(config, &folder, &path);
                    found.push(Found::Corrupt {
                        folder,
                        error: e.to_string(),
                    });
                }
            },
        }
    }
    found
}

/// Moves an unusable record to `<state_dir>/corrupt/` for an operator to read.
fn move_aside(config: &Config, folder: &str, path: &Path) {
    let corrupt = config.state_dir.join("corrupt");
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let target = corrupt.join(format!("{folder}-{stamp}.json"));
    let result = fs::create_dir_all(&corrupt).and_then(|()| fs::rename(path, &target));
    if let Err(e) = result {
        warn!(record = %path.display(), error = %e, "cannot move the unreadable record aside");
    }
}
