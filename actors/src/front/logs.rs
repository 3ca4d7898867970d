//! `StreamLogs`: a VM's console log or QEMU log as lines, the last N and
//! then, when following, new ones as they are written — across the console
//! log's rotation — until the VM is removed, the client goes away or the
//! manager shuts down. The files are read on the blocking pool, never on
//! the API's threads; what a slow client has not taken yet is bounded by a
//! small channel (the reader waits for it).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use cocos_core::operator_proto::{EventKind, LogLine, LogSource, VmEvent};
use tokio::sync::{broadcast, mpsc, watch};
use tonic::Status;
use tracing::debug;

use crate::supervisor::{IsListed, Supervisor};

/// Longest line sent; a longer one is cut into pieces of this size.
pub const MAX_LINE: usize = 64 << 10;
/// Most bytes read back from the end of a file to find the last N lines.
pub const MAX_TAIL_BYTES: u64 = 8 << 20;
/// Most lines a request may ask for.
pub const MAX_TAIL_LINES: u32 = 100_000;
/// How often a followed file is checked for new lines.
const POLL: Duration = Duration::from_millis(200);
/// Most bytes read at once while following.
const READ_CHUNK: usize = 256 << 10;
/// Lines queued for a client before the reader waits.
const QUEUE: usize = 256;

/// Splits bytes into lines (without their line feed), carrying an
/// unfinished line over to the next chunk; a line that grows past
/// `MAX_LINE` is cut.
#[derive(Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Vec<u8>>) {
        for piece in bytes.split_inclusive(|b| *b == b'\n') {
            let (text, ended) = match piece.strip_suffix(b"\n") {
                Some(text) => (text, true),
                None => (piece, false),
            };
            let mut text = text;
            while self.partial.len() + text.len() > MAX_LINE {
                let take = MAX_LINE - self.partial.len();
                self.partial.extend_from_slice(&text[..take]);
                out.push(std::mem::take(&mut self.partial));
                text = &text[take..];
            }
            self.partial.extend_from_slice(text);
            if ended {
                out.push(std::mem::take(&mut self.partial));
            }
        }
    }

    /// The unfinished line, if any (at the end of a stream).
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        (!self.partial.is_empty()).then(|| std::mem::take(&mut self.partial))
    }
}

/// The last `n` lines of `bytes` (a trailing unfinished line counts as one).
/// `whole` says whether `bytes` starts at the start of its file: if not,
/// its first line may be cut and is dropped, unless it is the only one.
pub fn last_lines(bytes: &[u8], n: usize, whole: bool) -> Vec<Vec<u8>> {
    if n == 0 {
        return Vec::new();
    }
    let mut lines = Vec::new();
    LineSplitter::default().push_all(bytes, &mut lines);
    if !whole && lines.len() > 1 {
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(n);
    lines.split_off(skip)
}

impl LineSplitter {
    fn push_all(mut self, bytes: &[u8], out: &mut Vec<Vec<u8>>) {
        self.push(bytes, out);
        out.extend(self.finish());
    }
}

/// A file being followed: the open file, how far it was read, and which
/// file it is (a rotation puts a new file at the path).
struct Followed {
    path: PathBuf,
    file: Option<File>,
    pos: u64,
    inode: u64,
}

impl Followed {
    /// Opens `path` positioned at its end (if it exists yet).
    fn at_end(path: PathBuf) -> Followed {
        let mut followed = Followed {
            path,
            file: None,
            pos: 0,
            inode: 0,
        };
        if let Ok(file) = File::open(&followed.path) {
            if let Ok(meta) = file.metadata() {
                followed.pos = meta.len();
                followed.inode = meta.ino();
                followed.file = Some(file);
            }
        }
        followed
    }

    /// New bytes: what was appended to the file, and after a rotation
    /// (another file at the path) or a truncation, the new file from its
    /// start. Empty when nothing is new.
    fn read_new(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        if let Some(file) = self.file.as_mut() {
            let len = file.metadata()?.len();
            if len < self.pos {
                // Truncated in place: start again.
                self.pos = 0;
            }
            file.seek(SeekFrom::Start(self.pos))?;
            let n = file
                .take(READ_CHUNK as u64)
                .read_to_end(&mut out)
                .map(|n| n as u64)?;
            self.pos += n;
            if n > 0 {
                return Ok(out);
            }
        }
        // All of the open file is read: has another taken its place?
        match std::fs::metadata(&self.path) {
            Ok(meta) if self.file.is_none() || meta.ino() != self.inode => {
                let file = File::open(&self.path)?;
                self.inode = file.metadata()?.ino();
                self.file = Some(file);
                self.pos = 0;
                self.read_new()
            }
            _ => Ok(out),
        }
    }
}

/// The last `n` lines of the log at `path`, reading back at most
/// `MAX_TAIL_BYTES`; the rotated file before it (`<path>.1`) supplies the
/// rest when the current one is short.
fn tail(path: &Path, n: usize) -> io::Result<Vec<Vec<u8>>> {
    let mut lines = tail_one(path, n)?;
    if lines.len() < n {
        let mut rotated = path.as_os_str().to_owned();
        rotated.push(".1");
        if let Ok(mut older) = tail_one(Path::new(&rotated), n - lines.len()) {
            older.append(&mut lines);
            lines = older;
        }
    }
    Ok(lines)
}

fn tail_one(path: &Path, n: usize) -> io::Result<Vec<Vec<u8>>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    // Read back in growing blocks until enough line feeds are in.
    let mut start = len;
    let mut block = 64u64 << 10;
    let mut bytes = Vec::new();
    loop {
        let from = start
            .saturating_sub(block)
            .max(len.saturating_sub(MAX_TAIL_BYTES));
        if from == start {
            break;
        }
        let mut chunk = vec![0u8; usize::try_from(start - from).unwrap_or(0)];
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&bytes);
        bytes = chunk;
        start = from;
        let feeds = bytes.iter().filter(|b| **b == b'\n').count();
        if feeds > n || start == 0 {
            break;
        }
        block = block.saturating_mul(2);
    }
    Ok(last_lines(&bytes, n, start == 0))
}

/// Streams the log at `path` as the request asks; the returned receiver
/// ends when the stream does.
pub struct LogStream {
    pub id: String,
    pub path: PathBuf,
    pub source: LogSource,
    pub tail: u32,
    pub follow: bool,
    pub supervisor: Addr<Supervisor>,
    /// Lifecycle events, to end when the VM is removed.
    pub events: broadcast::Receiver<Arc<VmEvent>>,
    /// Set when the manager shuts down.
    pub stop: watch::Receiver<bool>,
}

impl LogStream {
    pub fn start(self) -> mpsc::Receiver<Result<LogLine, Status>> {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(self.run(tx));
        rx
    }

    async fn run(mut self, tx: mpsc::Sender<Result<LogLine, Status>>) {
        let source = self.source;
        let send = |line: Vec<u8>| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(LogLine {
                    source: source as i32,
                    line,
                }))
                .await
                .is_ok()
            }
        };
        let path = self.path.clone();
        let tail_lines = usize::try_from(self.tail.min(MAX_TAIL_LINES)).unwrap_or(0);
        let follow = self.follow;
        // The tail and the position to follow from, read in one go so no
        // line falls between them.
        let start = tokio::task::spawn_blocking(move || {
            let lines = tail(&path, tail_lines)?;
            let followed = follow.then(|| Followed::at_end(path));
            Ok::<_, io::Error>((lines, followed))
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
        let (lines, followed) = match start {
            Ok(started) => started,
            Err(e) => {
                let _ = tx
                    .send(Err(Status::internal(format!(
                        "cannot read the log of VM {}: {e}",
                        self.id
                    ))))
                    .await;
                return;
            }
        };
        for line in lines {
            if !send(line).await {
                return;
            }
        }
        let Some(mut followed) = followed else {
            return;
        };
        let mut splitter = LineSplitter::default();
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut removed = false;
        loop {
            // Read what is new (all of it once the VM is removed).
            loop {
                let read = tokio::task::spawn_blocking(move || {
                    let result = followed.read_new();
                    (result, followed)
                })
                .await;
                let Ok((result, back)) = read else {
                    // The runtime is shutting down.
                    return;
                };
                followed = back;
                let bytes = match result {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        debug!(vm = %self.id, error = %e, "log not readable now");
                        Vec::new()
                    }
                };
                if bytes.is_empty() {
                    break;
                }
                let mut lines = Vec::new();
                splitter.push(&bytes, &mut lines);
                for line in lines {
                    if !send(line).await {
                        return;
                    }
                }
            }
            if removed {
                if let Some(rest) = splitter.finish() {
                    send(rest).await;
                }
                return;
            }
            tokio::select! {
                _ = poll.tick() => {}
                _ = stopped(&mut self.stop) => return,
                _ = tx.closed() => return,
                event = self.events.recv() => match event {
                    Ok(event) => {
                        removed = event.id == self.id && event.kind == EventKind::Removed as i32;
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        removed = !self
                            .supervisor
                            .send(IsListed(self.id.clone()))
                            .await
                            .unwrap_or(false);
                    }
                    Err(broadcast::error::RecvError::Closed) => removed = true,
                },
            }
        }
    }
}

/// Completes once `stop` is set (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::io::Write;

    fn split_all(chunks: &[&[u8]]) -> VecDeque<Vec<u8>> {
        let mut splitter = LineSplitter::default();
        let mut out = Vec::new();
        for chunk in chunks {
            splitter.push(chunk, &mut out);
        }
        out.extend(splitter.finish());
        out.into()
    }

    #[test]
    fn lines_across_chunks() {
        let lines = split_all(&[b"one\ntw", b"o\n\nthr", b"ee"]);
        assert_eq!(
            lines,
            VecDeque::from(vec![
                b"one".to_vec(),
                b"two".to_vec(),
                b"".to_vec(),
                b"three".to_vec()
            ])
        );
    }

    #[test]
    fn long_lines_are_cut() {
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        let mut input = long.clone();
        input.push(b'\n');
        let lines = split_all(&[&input[..100], &input[100..]]);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].len(), MAX_LINE);
        assert_eq!(lines[1].len(), MAX_LINE);
        assert_eq!(lines[2].len(), 10);
    }

    #[test]
    fn last_lines_of_text() {
        let text = b"a\nb\nc\nd\n";
        assert_eq!(
            last_lines(text, 2, true),
            vec![b"c".to_vec(), b"d".to_vec()]
        );
        assert_eq!(last_lines(text, 10, true).len(), 4);
        assert!(last_lines(text, 0, true).is_empty());
        // Not the start of the file: the first line may be cut.
        assert_eq!(
            last_lines(b"ial\nb\nc\n", 10, false),
            vec![b"b".to_vec(), b"c".to_vec()]
        );
        assert_eq!(
            last_lines(b"a\nunfinished", 1, true),
            vec![b"unfinished".to_vec()]
        );
    }

    #[test]
    fn tail_reads_back_and_uses_the_rotated_file() {
        let dir = std::env::temp_dir().join(format!("logs-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("console.log");
        let mut big = String::new();
        for i in 0..50_000 {
            big.push_str(&format!("line {i}\n"));
        }
        std::fs::write(&path, &big).expect("write");
        let lines = tail(&path, 3).expect("tail");
        assert_eq!(
            lines,
            vec![
                b"line 49997".to_vec(),
                b"line 49998".to_vec(),
                b"line 49999".to_vec()
            ]
        );
        assert_eq!(tail(&path, 20_000).expect("tail").len(), 20_000);
        std::fs::write(dir.join("console.log.1"), "old 1\nold 2\n").expect("write");
        std::fs::write(&path, "new 1\n").expect("write");
        let lines = tail(&path, 2).expect("tail");
        assert_eq!(lines, vec![b"old 2".to_vec(), b"new 1".to_vec()]);
        assert!(tail(&dir.join("absent.log"), 5).expect("tail").is_empty());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn following_sees_appends_rotation_and_truncation() {
        let dir = std::env::temp_dir().join(format!("logs-follow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("console.log");
        std::fs::write(&path, "before\n").expect("write");
        let mut followed = Followed::at_end(path.clone());
        assert!(followed.read_new().expect("read").is_empty());
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        file.write_all(b"after\n").expect("append");
        assert_eq!(followed.read_new().expect("read"), b"after\n");
        // Rotated: the old file renamed, a new one in its place.
        file.write_all(b"last of old\n").expect("append");
        std::fs::rename(&path, dir.join("console.log.1")).expect("rename");
        std::fs::write(&path, "first of new\n").expect("write");
        assert_eq!(followed.read_new().expect("read"), b"last of old\n");
        assert_eq!(followed.read_new().expect("read"), b"first of new\n");
        // Truncated in place.
        std::fs::write(&path, "x\n").expect("truncate");
        assert_eq!(followed.read_new().expect("read"), b"x\n");
        // A file that appears later.
        let mut late = Followed::at_end(dir.join("late.log"));
        assert!(late.read_new().expect("read").is_empty());
        std::fs::write(dir.join("late.log"), "hello\n").expect("write");
        assert_eq!(late.read_new().expect("read"), b"hello\n");
        std::fs::remove_dir_all(&dir).ok();
    }
}
