//! The block a report ends with, meant to be pasted into the README's
//! Performance section: one Markdown table row per figure, each naming what
//! was measured, the figure, when and on which commit, and the command.

use cocos_core::duration::civil_from_days;
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

/// When and on what a run was made.
#[derive(Debug, Clone)]
pub struct Stamp {
    /// UTC date, `YYYY-MM-DD`.
    pub date: String,
    /// `git rev-parse --short HEAD`, with `+dirty` when tracked files differ
    /// from it; `unknown` outside a repository.
    pub commit: String,
    /// The command that was run, as typed (the bench's own name, then its
    /// arguments; `BENCH_WORKSPACE_ROOT` first when it is set).
    pub command: String,
}

impl Stamp {
    pub fn now(repo_root: &Path) -> Stamp {
        let days = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() / 86_400)
            .unwrap_or(0);
        let (y, m, d) = civil_from_days(days as i64);
        Stamp {
            date: format!("{y:04}-{m:02}-{d:02}"),
            commit: commit(repo_root),
            command: command_line(),
        }
    }

    /// `2025-01-31, abc1234+dirty`.
    pub fn when(&self) -> String {
        format!("{}, {}", self.date, self.commit)
    }
}

fn git(repo_root: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo_root)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn commit(repo_root: &Path) -> String {
    let Some(head) = git(repo_root, &["rev-parse", "--short", "HEAD"]) else {
        return "unknown".to_string();
    };
    let dirty = git(
        repo_root,
        &["status", "--porcelain", "--untracked-files=no"],
    )
    .is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{head}+dirty")
    } else {
        head
    }
}

fn command_line() -> String {
    let quote = cocos_core::qemu::shell_quote;
    let prefix = std::env::var_os("BENCH_WORKSPACE_ROOT").map(|root| {
        format!(
            "BENCH_WORKSPACE_ROOT={} ",
            quote(&[root.to_string_lossy().into_owned()])
        )
    });
    let mut words: Vec<String> = Vec::new();
    let mut args = std::env::args();
    let exe = args.next().unwrap_or_default();
    // As the README writes it: from the repository root.
    let exe = Path::new(&exe)
        .file_name()
        .map(|n| format!("target/release/{}", n.to_string_lossy()))
        .unwrap_or(exe);
    words.push(exe);
    words.extend(args);
    format!("{}{}", prefix.unwrap_or_default(), quote(&words))
}

/// One row of the README's table: figure | measured | command.
pub struct Row {
    pub figure: String,
    pub measured: String,
}

/// Prints the block: a header line, the table head and the rows. A run
/// with failures says so instead of offering its rows for the README.
pub fn print(stamp: &Stamp, rows: &[Row], failures: &[String]) {
    if failures.is_empty() {
        println!("-- summary for the README (Performance) --");
    } else {
        println!("-- summary: the run FAILED, not for the README --");
    }
    println!("| figure | measured | command |");
    println!("|---|---|---|");
    for row in rows {
        println!(
            "| {} | {} ({}) | `{}` |",
            row.figure,
            row.measured,
            stamp.when(),
            stamp.command
        );
    }
}

/// `loaded / idle`; `None` without both or with a zero baseline.
pub fn ratio(loaded: Option<f64>, idle: Option<f64>) -> Option<f64> {
    match (loaded, idle) {
        (Some(l), Some(i)) if i > 0.0 => Some(l / i),
        _ => None,
    }
}

/// Shortens a message to 300 characters (QEMU's error lines carry its
/// whole command line).
pub fn shorten(message: &str) -> String {
    let mut shown: String = message.chars().take(300).collect();
    if shown.len() < message.len() {
        shown.push_str(" ...");
    }
    shown
}

pub fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "n/a".to_string(), |r| format!("{r:.2}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios() {
        assert_eq!(ratio(Some(3.0), Some(1.5)), Some(2.0));
        assert_eq!(ratio(Some(3.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(1.0)), None);
        assert_eq!(fmt_ratio(Some(0.554)), "0.55");
        assert_eq!(fmt_ratio(None), "n/a");
    }
}
