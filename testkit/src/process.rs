//! A child process owned by a test (or the benchmark): its output goes to a log
//! file, and it is killed and reaped when the guard is dropped, its log printed when
//! that happens during a panic.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A child process, killed (SIGKILL) and reaped on drop. Stdout and stderr are
/// appended to `log`; stdin is empty.
#[derive(Debug, Default)]
pub struct ChildGuard {
    pub name: String,
    pub log: PathBuf,
    /// None once killed or reaped (and for [`Default`]: a slot to spawn into later).
    child: Option<Child>,
    /// The child leads a process group of its own: signals go to the whole group.
    group: bool,
    /// How many last lines of the log a drop during a panic prints (None: all).
    panic_tail: Option<usize>,
}

impl ChildGuard {
    /// Starts `cmd` with its output appended to `log` (created if missing).
    pub fn spawn(name: &str, cmd: &mut Command, log: impl Into<PathBuf>) -> io::Result<Self> {
        Self::start(name, cmd, log.into(), false)
    }

    /// Like [`spawn`](Self::spawn), the child leading a new process group that
    /// [`kill`](Self::kill) and [`signal`](Self::signal) reach whole (a server that
    /// forks helpers).
    pub fn spawn_group(name: &str, cmd: &mut Command, log: impl Into<PathBuf>) -> io::Result<Self> {
        Self::start(name, cmd, log.into(), true)
    }

    fn start(name: &str, cmd: &mut Command, log: PathBuf, group: bool) -> io::Result<Self> {
        let at =
            |what: String| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(at(format!("creating {}", log.display())))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        if group {
            cmd.process_group(0);
        }
        let child = cmd
            .spawn()
            .map_err(at(format!("starting {name} ({cmd:?})")))?;
        Ok(ChildGuard {
            name: name.to_string(),
            log,
            child: Some(child),
            group,
            panic_tail: None,
        })
    }

    /// A drop during a panic prints only the last `lines` of the log.
    pub fn panic_tail(mut self, lines: usize) -> Self {
        self.panic_tail = Some(lines);
        self
    }

    /// The process id (the process group id for [`spawn_group`](Self::spawn_group)),
    /// while it runs.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .unwrap_or_else(|| panic!("{}: process running", self.name))
            .id()
    }

    /// How the process ended, once it has (None while it runs, and once killed).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("waitpid"))
    }

    /// SIGKILL (to the whole group for a group leader), then reap: no chance to
    /// flush anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.group {
                // SAFETY: kill(2) with a negative pid signals our child's process group.
                unsafe { libc::kill(-(c.id() as libc::pid_t), libc::SIGKILL) };
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal by name (`TERM`, `STOP` freezes the process, `CONT` thaws it).
    pub fn signal(&self, name: &str) {
        let target = match self.group {
            true => format!("-{}", self.pid()),
            false => self.pid().to_string(),
        };
        let status = Command::new("kill")
            .args([&format!("-{name}"), "--", &target])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {target} failed");
    }

    /// SIGTERM, then wait for the exit without blocking the runtime (a test's client
    /// connections must see the server's goodbye); panics after 30 s.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        let mut c = self.child.take().expect("process running");
        let start = Instant::now();
        loop {
            if let Some(s) = c.try_wait().expect("waitpid") {
                return s;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
                let _ = c.wait();
                panic!("{} did not exit within 30s of SIGTERM", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM (a graceful stop), then SIGKILL if the process has not ended within
    /// `grace`. Blocks.
    pub fn stop(&mut self, grace: Duration) {
        if self.child.is_none() {
            return;
        }
        let pid = self.pid() as libc::pid_t;
        let pid = if self.group { -pid } else { pid };
        // SAFETY: kill(2) on our own child (or its process group).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < grace {
            if self.exit_status().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill();
    }

    /// Resident memory (kB) and open file descriptors of the process, from /proc.
    pub fn resources(&self) -> (u64, usize) {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let rss_kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status");
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count();
        (rss_kb, fds)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let ran = self.child.is_some() || !self.log.as_os_str().is_empty();
        self.kill();
        if std::thread::panicking() && ran {
            match self.panic_tail {
                None => eprintln!("---- {} ----\n{}", self.log.display(), self.log_text()),
                Some(n) => eprintln!(
                    "---- {} log {} (last {n} lines) ----\n{}",
                    self.name,
                    self.log.display(),
                    self.tail(n)
                ),
            }
        }
    }
}

/// The last `lines` lines of the file at `path` (empty if it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(name: &str) -> PathBuf {
        let p =
            std::env::temp_dir().join(format!("sluice-testkit-{}-{name}.log", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn output_goes_to_the_log_and_the_exit_is_seen() {
        let l = log("echo");
        let mut g = ChildGuard::spawn(
            "sh",
            Command::new("sh").args(["-c", "echo out; echo err >&2"]),
            &l,
        )
        .unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(s) = g.exit_status() {
                break s;
            }
            assert!(start.elapsed() < Duration::from_secs(30));
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(status.success());
        assert_eq!(g.log_text(), "out\nerr\n");
        assert_eq!(g.tail(1), "err");
        drop(g);
        std::fs::remove_file(l).unwrap();
    }

    #[test]
    fn dropping_kills_and_reaps_the_whole_group() {
        let l = log("group");
        let g = ChildGuard::spawn_group(
            "sh",
            Command::new("sh").args(["-c", "sleep 600 & echo $!; wait"]),
            &l,
        )
        .unwrap();
        let leader = g.pid();
        let start = Instant::now();
        let helper: u32 = loop {
            if let Ok(p) = g.log_text().trim().parse() {
                break p;
            }
            assert!(start.elapsed() < Duration::from_secs(30));
            std::thread::sleep(Duration::from_millis(10));
        };
        drop(g);
        // The leader is reaped (no zombie left); the helper dies with its group
        // (reaped by init, so it may linger briefly as a zombie).
        assert!(!Path::new(&format!("/proc/{leader}")).exists());
        let start = Instant::now();
        while let Ok(stat) = std::fs::read_to_string(format!("/proc/{helper}/stat")) {
            if stat
                .rsplit(')')
                .next()
                .unwrap()
                .trim_start()
                .starts_with('Z')
            {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "helper survived its group"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::remove_file(l).unwrap();
    }

    #[test]
    fn stop_ends_a_process_that_ignores_sigterm() {
        let l = log("stop");
        let script = "trap '' TERM; echo ready; exec sleep 600";
        let mut g = ChildGuard::spawn("sh", Command::new("sh").args(["-c", script]), &l).unwrap();
        let start = Instant::now();
        while g.log_text() != "ready\n" {
            assert!(start.elapsed() < Duration::from_secs(30));
            std::thread::sleep(Duration::from_millis(10));
        }
        g.stop(Duration::from_millis(300));
        assert_eq!(g.exit_status(), None, "killed and reaped");
        std::fs::remove_file(l).unwrap();
    }

    #[test]
    fn stop_keeps_the_status_of_a_graceful_exit() {
        let l = log("graceful");
        let mut g = ChildGuard::spawn("sleep", Command::new("sleep").arg("600"), &l).unwrap();
        g.stop(Duration::from_secs(30));
        let status = g.exit_status().expect("exited on SIGTERM");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGTERM)
        );
        std::fs::remove_file(l).unwrap();
    }
}
