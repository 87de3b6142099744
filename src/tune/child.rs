//! Runs one probe in a child process of the same executable, with a wall-clock timeout: a
//! kernel that faults (a sticky CUDA error kills the whole context), exits or hangs (a
//! setmaxnreg / mbarrier deadlock) takes only its child with it. The child runs in its own
//! process group, killed as a whole when the timeout expires; every wait of the parent is
//! bounded.

use super::probe::{Outcome, ProbeResult, RESULT_PREFIX};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long the parent waits at most for a child's output once the child is gone.
const DRAIN: Duration = Duration::from_secs(2);

/// Once the child is gone, how long its pipe may stay silent before the parent stops reading
/// (everything the child wrote is already in the pipe when it exits; only a descendant that
/// inherited the pipe and keeps it open delays the end of the stream).
const QUIET: Duration = Duration::from_millis(200);

/// Reads `r` on a thread and sends each chunk as it arrives (not only at the end of the
/// stream: a descendant of the child that inherited the pipe and keeps it open would delay
/// the end past the child's exit, and with it the child's result).
fn drain(mut r: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
    rx
}

/// Most bytes of a child's stream the parent keeps: the last ones (the result line is the
/// last line), so a descendant writing at pipe speed cannot fill the parent's memory.
const KEEP: usize = 1 << 20;

/// The text a [`drain`] received, once the child is gone: until the end of the stream, or
/// [`QUIET`] without a chunk, or the deadline `end` (shared by both streams), whichever comes
/// first; only the last [`KEEP`] bytes.
fn collect(rx: Option<mpsc::Receiver<Vec<u8>>>, end: Instant) -> String {
    let Some(rx) = rx else {
        return String::new();
    };
    let mut bytes = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match rx.recv_timeout(left.min(QUIET)) {
            Ok(chunk) => {
                bytes.extend_from_slice(&chunk);
                if bytes.len() > 2 * KEEP {
                    bytes.drain(..bytes.len() - KEEP);
                }
            }
            Err(_) => break,
        }
    }
    if bytes.len() > KEEP {
        bytes.drain(..bytes.len() - KEEP);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Kills the child's whole process group (the child leads it).
#[cfg(unix)]
fn kill_group(child: &mut std::process::Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: a plain syscall on the group this parent created for the child.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
}

#[cfg(not(unix))]
fn kill_group(child: &mut std::process::Child) {
    let _ = child.kill();
}

/// The result line of a child's stdout (the last one), if it printed one.
pub fn parse_result(stdout: &str) -> Option<ProbeResult> {
    stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(RESULT_PREFIX))
        .and_then(|j| serde_json::from_str(j.trim()).ok())
}

/// Runs `exe` with `args` (the environment without `env_remove`, plus `env_set`), waits at
/// most `timeout`, and reads its outcome: the result line it printed, [`Outcome::Hung`] when it
/// was killed at the timeout, [`Outcome::Failed`] when it exited non-zero or printed no
/// result (with its last line of stderr).
pub fn run_child(
    exe: &Path,
    args: &[String],
    env_remove: &[&str],
    env_set: &[(&str, &str)],
    timeout: Duration,
) -> ProbeResult {
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for k in env_remove {
        cmd.env_remove(k);
    }
    for (k, v) in env_set {
        cmd.env(k, v);
    }
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return ProbeResult::failed(format!("cannot start {}: {e}", exe.display())),
    };
    let out = child.stdout.take().map(drain);
    let err = child.stderr.take().map(drain);
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if start.elapsed() >= timeout => {
                kill_group(&mut child);
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                kill_group(&mut child);
                let _ = child.wait();
                return ProbeResult::failed(format!("waiting for the probe: {e}"));
            }
        }
    };
    let end = Instant::now() + DRAIN;
    let (stdout, stderr) = (collect(out, end), collect(err, end));
    let last_err = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string();
    let Some(status) = status else {
        return ProbeResult {
            outcome: Outcome::Hung,
            message: Some(format!(
                "no result within {:.0} s: killed",
                timeout.as_secs_f64()
            )),
            ..ProbeResult::failed("")
        };
    };
    match parse_result(&stdout) {
        Some(r) if status.success() || r.outcome == Outcome::Failed => r,
        Some(_) | None => ProbeResult::failed(if last_err.is_empty() {
            format!("probe exited with {status} and no result")
        } else {
            format!("probe exited with {status}: {last_err}")
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_result_line_counts() {
        let out = "noise\nBC_TUNE_RESULT {\"outcome\":\"differs\",\"ms\":1.5,\"err\":0.3}\n";
        let r = parse_result(out).unwrap();
        assert_eq!(r.outcome, Outcome::Differs);
        assert_eq!(r.ms, Some(1.5));
        assert!(parse_result("BC_TUNE_RESULT {oops").is_none());
        assert!(parse_result("").is_none());
    }

    #[cfg(unix)]
    #[test]
    fn a_child_that_sleeps_is_killed_at_the_timeout_with_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("grandchild-ran");
        // The grandchild would write the marker after 3 s unless the group is killed.
        let script = format!("(sleep 3; touch {}) & sleep 600", marker.display());
        let r = run_child(
            Path::new("/bin/sh"),
            &["-c".into(), script],
            &[],
            &[],
            Duration::from_millis(300),
        );
        assert_eq!(r.outcome, Outcome::Hung, "{r:?}");
        std::thread::sleep(Duration::from_millis(3500));
        assert!(!marker.exists(), "the grandchild survived the kill");
    }

    /// A descendant that escaped the child's process group and keeps its stdout and stderr
    /// open does not make the parent lose the result the child printed before it exited,
    /// nor wait for the descendant.
    #[cfg(unix)]
    #[test]
    fn a_descendant_holding_the_pipes_does_not_lose_the_result() {
        let start = Instant::now();
        let r = run_child(
            Path::new("/bin/sh"),
            &[
                "-c".into(),
                "echo 'BC_TUNE_RESULT {\"outcome\":\"ok\",\"ms\":2.0,\"err\":0.001}'; \
                 sleep 3 & exit 0"
                    .into(),
            ],
            &[],
            &[],
            Duration::from_secs(30),
        );
        assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
        assert_eq!(r.ms, Some(2.0));
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "waited for the descendant"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_child_that_exits_non_zero_or_prints_nothing_failed() {
        let sh = |s: &str| {
            run_child(
                Path::new("/bin/sh"),
                &["-c".into(), s.into()],
                &[],
                &[("BC_TUNE_TEST_MSG", "boom")],
                Duration::from_secs(30),
            )
        };
        let r = sh("echo \"illegal instruction $BC_TUNE_TEST_MSG\" >&2; exit 3");
        assert_eq!(r.outcome, Outcome::Failed);
        assert!(r.message.unwrap().contains("illegal instruction boom"));
        let r = sh("exit 0");
        assert_eq!(r.outcome, Outcome::Failed);
        let ok = sh("echo 'BC_TUNE_RESULT {\"outcome\":\"ok\",\"ms\":2.0,\"err\":0.001}'");
        assert_eq!(ok.outcome, Outcome::Ok);
        // A result line claiming ok from a child that then crashed does not count.
        let r = sh("echo 'BC_TUNE_RESULT {\"outcome\":\"ok\",\"ms\":2.0}'; exit 134");
        assert_eq!(r.outcome, Outcome::Failed);
    }
}
