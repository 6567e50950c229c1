//! Child processes in their own process groups, and their CPU time and memory read
//! from /proc (per group, so a broker that forks helpers, like RabbitMQ's Erlang VM,
//! is counted whole).

use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use sluice_testkit::ChildGuard;

/// Fails with the tail of the log when the process has exited.
pub fn check_alive(child: &mut ChildGuard) -> Result<()> {
    if let Some(status) = child.exit_status() {
        bail!(
            "{} exited early ({status}); last lines of {}:\n{}",
            child.name,
            child.log.display(),
            child.tail(20)
        );
    }
    Ok(())
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "sluice-bench-{prefix}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// CPU time and memory of a process group at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// User + system CPU time of the group's live processes.
    pub cpu: Duration,
    /// Resident set size now, KiB.
    pub rss_kib: u64,
    /// Peak resident set size (VmHWM), summed over the group's processes, KiB.
    pub peak_kib: u64,
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// (process group, user + system ticks) of one process, from /proc/PID/stat.
fn stat_of(pid: &str) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): pgrp is field 5, utime 14, stime 15.
    let pgrp = f.get(2)?.parse().ok()?;
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((pgrp, ticks))
}

fn status_kib(pid: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Usage of every live process in process group `pgid`.
pub fn group_usage(pgid: u32) -> Usage {
    let mut u = Usage::default();
    let mut ticks = 0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return u;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if let Some((pgrp, t)) = stat_of(pid)
            && pgrp == pgid
        {
            ticks += t;
            u.rss_kib += status_kib(pid, "VmRSS:");
            u.peak_kib += status_kib(pid, "VmHWM:");
        }
    }
    u.cpu = Duration::from_secs_f64(ticks as f64 / ticks_per_second() as f64);
    u
}

/// CPU time (user + system) of this process, all threads.
pub fn self_cpu() -> Duration {
    let ticks = stat_of("self").map(|(_, t)| t).unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / ticks_per_second() as f64)
}

/// The path of `name` on PATH (or in the usual sbin directories), if any.
pub fn which(name: &str, extra: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
