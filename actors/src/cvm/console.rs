//! A VM's serial console, read from QEMU's console socket into a log file
//! that is rotated at a size cap (as libvirt's virtlogd does) so a chatty
//! guest cannot fill the disk.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tracing::debug;

/// A log file of at most `max_size` bytes, keeping `files - 1` rotated ones
/// (`console.log.1`, `console.log.2`, …).
pub struct RotatingLog {
    path: PathBuf,
    file: File,
    size: u64,
    max_size: u64,
    files: u32,
}

impl RotatingLog {
    pub fn open(path: &Path, max_size: u64, files: u32) -> io::Result<RotatingLog> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingLog {
            path: path.to_path_buf(),
            file,
            size,
            max_size,
            files: files.max(1),
        })
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    fn rotate(&mut self) -> io::Result<()> {
        if self.files == 1 {
            self.file.set_len(0)?;
        } else {
            for n in (1..self.files - 1).rev() {
                let from = self.rotated(n);
                if from.exists() {
                    fs::rename(&from, self.rotated(n + 1))?;
                }
            }
            fs::rename(&self.path, self.rotated(1))?;
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
        }
        self.size = 0;
        Ok(())
    }

    pub fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if self.size >= self.max_size {
                self.rotate()?;
            }
            let room = (self.max_size - self.size) as usize;
            let take = room.min(data.len());
            self.file.write_all(&data[..take])?;
            self.size += take as u64;
            data = &data[take..];
        }
        Ok(())
    }
}

/// The most console output one VM gets logged per second. A guest that
/// floods its serial port is read no faster than this (QEMU then holds the
/// output back), so the flood costs a bounded share of one thread.
pub const MAX_RATE: u64 = 4 * 1024 * 1024;

/// The thread every VM's console is copied on, apart from the actors and
/// the API: a chatty guest's file writes never run where requests are served.
fn console_thread() -> &'static actix::prelude::ArbiterHandle {
    static CONSOLE: std::sync::OnceLock<actix::prelude::ArbiterHandle> = std::sync::OnceLock::new();
    CONSOLE.get_or_init(|| actix::prelude::Arbiter::new().handle())
}

/// Starts copying a VM's console socket into its log, on the console thread.
pub fn start(socket: PathBuf, log: PathBuf, max_size: u64, files: u32) {
    let started = console_thread().spawn(async move {
        match RotatingLog::open(&log, max_size, files) {
            Ok(log) => pump(socket, log, MAX_RATE).await,
            Err(e) => debug!(log = %log.display(), error = %e, "cannot open the console log"),
        }
    });
    if !started {
        debug!("the console thread is gone; console not logged");
    }
}

/// Copies the console socket into the log until QEMU closes it, at most
/// `rate` bytes per second.
pub async fn pump(socket: PathBuf, mut log: RotatingLog, rate: u64) {
    let mut stream = match UnixStream::connect(&socket).await {
        Ok(stream) => stream,
        Err(e) => {
            debug!(socket = %socket.display(), error = %e, "console socket not available");
            return;
        }
    };
    // Small: one of these lives per VM.
    let mut buf = vec![0u8; 2048];
    // A token bucket of one second's worth.
    let mut tokens = rate;
    let mut refilled = tokio::time::Instant::now();
    loop {
        if tokens < buf.len() as u64 {
            let elapsed = refilled.elapsed();
            let earned = (elapsed.as_secs_f64() * rate as f64) as u64;
            if earned == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
            tokens = (tokens + earned).min(rate);
            refilled = tokio::time::Instant::now();
            continue;
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                tokens -= n as u64;
                if let Err(e) = log.write_all(&buf[..n]) {
                    debug!(error = %e, "console log write failed");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_at_the_cap_and_keeps_n_files() {
        let dir = std::env::temp_dir().join(format!("cocos-rotate-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("console.log");
        let mut log = RotatingLog::open(&path, 100, 3).expect("open");
        for _ in 0..50 {
            log.write_all(&[b'x'; 30]).expect("write");
        }
        let size = |p: PathBuf| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(size(path.clone()) <= 100);
        assert_eq!(size(log.rotated(1)), 100);
        assert_eq!(size(log.rotated(2)), 100);
        assert!(!log.rotated(3).exists());
        let total: u64 = fs::read_dir(&dir)
            .expect("dir")
            .flatten()
            .map(|e| size(e.path()))
            .sum();
        assert!(total <= 300, "total {total}");
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
