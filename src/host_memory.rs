//! How much host memory this process may still allocate, so that a request too large for the
//! machine, or for the container it runs in, is a clean [`Error::OutOfMemory`] instead of an
//! abort or a visit from the OOM killer.
//!
//! The answer is the smaller of the machine's `MemAvailable` plus free swap (`/proc/meminfo`)
//! and, inside a memory-limited cgroup (a container, a systemd slice, a batch job), what the
//! tightest limit on the way from this process's cgroup to the root leaves: `limit - usage`,
//! plus the cgroup's inactive file pages, which the kernel reclaims before it kills anything.
//! Both cgroup versions are read (v2 `memory.max` / `memory.current`, v1
//! `memory.limit_in_bytes` / `memory.usage_in_bytes`). Where nothing can be read, nothing is
//! refused.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Bytes of host memory this process can still allocate, or `None` where it cannot be told.
pub fn available() -> Option<usize> {
    match limits() {
        (Some(m), Some(c)) => Some(m.min(c)),
        (m, c) => m.or(c),
    }
}

/// (the machine's available memory plus free swap, what the cgroup limits leave).
fn limits() -> (Option<usize>, Option<usize>) {
    let machine = meminfo_bytes("MemAvailable:")
        .map(|a| a.saturating_add(meminfo_bytes("SwapFree:").unwrap_or(0)));
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| cgroup_available(Path::new("/sys/fs/cgroup"), &c));
    (machine, cgroup)
}

/// Refuses to allocate `bytes` of host memory for `what` when they exceed [`available`]
/// ([`Error::OutOfMemory`], naming both numbers and whether a cgroup limit binds).
pub fn ensure(bytes: usize, what: impl FnOnce() -> String) -> Result<()> {
    let (machine, cgroup) = limits();
    let (limit, by_cgroup) = match (machine, cgroup) {
        (Some(m), Some(c)) => (m.min(c), c < m),
        (None, Some(c)) => (c, true),
        (Some(m), None) => (m, false),
        (None, None) => return Ok(()),
    };
    if bytes > limit {
        return Err(Error::OutOfMemory(format!(
            "{} needs {} MiB but {} MiB are available{}",
            what(),
            bytes >> 20,
            limit >> 20,
            if by_cgroup {
                " under this process's cgroup (container) memory limit"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

/// A `/proc/meminfo` entry in bytes (None where it cannot be read).
fn meminfo_bytes(key: &str) -> Option<usize> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// What the memory limits of the cgroups of `proc_cgroup` (the text of `/proc/self/cgroup`)
/// leave, with the cgroup file systems mounted under `root`: the minimum over the process's
/// cgroup and its ancestors of `limit - usage + inactive file pages`. `None` where no limit is
/// set or none can be read.
pub fn cgroup_available(root: &Path, proc_cgroup: &str) -> Option<usize> {
    let mut best: Option<usize> = None;
    let mut take = |v: Option<usize>| {
        if let Some(v) = v {
            best = Some(best.map_or(v, |b| b.min(v)));
        }
    };
    for line in proc_cgroup.lines() {
        // hierarchy-id:controllers:path
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if controllers.is_empty() {
            // cgroup v2 (unified hierarchy).
            for dir in ancestors(&root.join(relative(path)), root) {
                take(left_in(
                    &dir,
                    "memory.max",
                    "memory.current",
                    "inactive_file",
                ));
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            let base = root.join("memory");
            for dir in ancestors(&base.join(relative(path)), &base) {
                take(left_in(
                    &dir,
                    "memory.limit_in_bytes",
                    "memory.usage_in_bytes",
                    "total_inactive_file",
                ));
            }
        }
    }
    best
}

/// `path` without its leading `/` (a cgroup path is absolute within its hierarchy).
fn relative(path: &str) -> &str {
    path.trim_start_matches('/')
}

/// `dir` and its parents up to and including `top`.
fn ancestors(dir: &Path, top: &Path) -> Vec<PathBuf> {
    dir.ancestors()
        .take_while(|d| d.starts_with(top))
        .map(Path::to_path_buf)
        .collect()
}

/// `limit - usage + inactive file pages` of one cgroup folder; `None` without a limit
/// (`max`, or v1's huge "unlimited" value) or where the files cannot be read.
fn left_in(dir: &Path, limit: &str, usage: &str, inactive_key: &str) -> Option<usize> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let limit: u64 = read(limit)?.trim().parse().ok()?;
    // cgroup v1 reports "no limit" as a page-rounded i64::MAX.
    if limit >= 1 << 62 {
        return None;
    }
    let usage: u64 = read(usage)?.trim().parse().ok()?;
    let inactive: u64 = read("memory.stat")
        .and_then(|s| {
            s.lines().find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some(inactive_key))
                    .then(|| it.next()?.parse().ok())
                    .flatten()
            })
        })
        .unwrap_or(0);
    let left = limit
        .saturating_sub(usage)
        .saturating_add(inactive.min(usage));
    usize::try_from(left).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, files: &[(&str, &str)]) {
        std::fs::create_dir_all(dir).unwrap();
        for (f, v) in files {
            std::fs::write(dir.join(f), v).unwrap();
        }
    }

    #[test]
    fn cgroup_v2_takes_the_tightest_ancestor_and_counts_inactive_file_pages() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        // The root has no limit; the slice allows 8 GiB with 5 GiB used; the job 4 GiB with
        // 3 GiB used, 512 MiB of it inactive file pages.
        write(r, &[("memory.max", "max\n")]);
        write(
            &r.join("slice"),
            &[
                ("memory.max", "8589934592\n"),
                ("memory.current", "5368709120\n"),
            ],
        );
        write(
            &r.join("slice/job"),
            &[
                ("memory.max", "4294967296\n"),
                ("memory.current", "3221225472\n"),
                ("memory.stat", "anon 2684354560\ninactive_file 536870912\n"),
            ],
        );
        let got = cgroup_available(r, "0::/slice/job\n");
        // job: 1 GiB + 512 MiB; slice: 3 GiB.
        assert_eq!(got, Some(1536 << 20));
        // Without a job limit the slice binds.
        std::fs::write(r.join("slice/job/memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_available(r, "0::/slice/job\n"), Some(3 << 30));
    }

    #[test]
    fn cgroup_v1_memory_controller_and_unlimited_values() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let unlimited = "9223372036854771712\n";
        write(&r.join("memory"), &[("memory.limit_in_bytes", unlimited)]);
        write(
            &r.join("memory/docker/abc"),
            &[
                ("memory.limit_in_bytes", "2147483648\n"),
                ("memory.usage_in_bytes", "1073741824\n"),
                ("memory.stat", "cache 10\ntotal_inactive_file 268435456\n"),
            ],
        );
        let proc = "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n";
        assert_eq!(cgroup_available(r, proc), Some((1 << 30) + (256 << 20)));
        // Unlimited everywhere: no answer, so nothing is refused.
        std::fs::write(r.join("memory/docker/abc/memory.limit_in_bytes"), unlimited).unwrap();
        assert_eq!(cgroup_available(r, proc), None);
    }

    #[test]
    fn unreadable_or_malformed_cgroup_files_give_no_limit() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        assert_eq!(cgroup_available(r, "0::/nowhere\n"), None);
        assert_eq!(cgroup_available(r, "garbage\n\n::\n"), None);
        write(
            &r.join("x"),
            &[("memory.max", "lots\n"), ("memory.current", "1\n")],
        );
        assert_eq!(cgroup_available(r, "0::/x\n"), None);
        // Usage above the limit (possible for a moment): nothing left, not an underflow.
        write(
            &r.join("y"),
            &[("memory.max", "100\n"), ("memory.current", "200\n")],
        );
        assert_eq!(cgroup_available(r, "0::/y\n"), Some(0));
    }

    #[test]
    fn a_request_beyond_the_host_is_refused_with_both_numbers() {
        let e = ensure(usize::MAX, || "the test buffer".into());
        if available().is_none() {
            assert!(e.is_ok(), "nothing readable: nothing refused");
            return;
        }
        let msg = e.unwrap_err().to_string();
        assert!(
            msg.contains("the test buffer") && msg.contains("MiB are available"),
            "{msg}"
        );
        assert!(ensure(1, || "one byte".into()).is_ok());
    }
}
