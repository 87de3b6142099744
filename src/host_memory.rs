//! How much host memory this process may still allocate, so that a request too large for the
//! machine, or for the container it runs in, is a clean [`Error::OutOfMemory`] instead of an
//! abort or a visit from the OOM killer.
//!
//! The answer is the smaller of the machine's `MemAvailable` plus free swap (`/proc/meminfo`)
//! and, inside a memory-limited cgroup (a container, a systemd slice, a batch job), what the
//! tightest limit on the way from this process's cgroup to the root leaves: `limit - usage`,
//! plus the cgroup's file pages (page cache, memory-mapped weights), which the kernel reclaims
//! before it kills anything, plus the swap the cgroup may still use.
//! Both cgroup versions are read (v2 `memory.max` / `memory.current`, v1
//! `memory.limit_in_bytes` / `memory.usage_in_bytes`). Where nothing can be read, nothing is
//! refused.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Bytes of host memory this process can still allocate, or `None` where it cannot be told.
pub fn available() -> Option<usize> {
    limit().map(|(bytes, _)| bytes)
}

/// What binds: (bytes, whether it is the cgroup limit rather than the machine's memory), the
/// smaller of the machine's available memory plus free swap and what the cgroup limits leave.
fn limit() -> Option<(usize, bool)> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let entry = |key: &str| meminfo.as_deref().and_then(|s| meminfo_bytes(s, key));
    let swap_free = entry("SwapFree:").unwrap_or(0);
    let machine = entry("MemAvailable:").map(|a| a.saturating_add(swap_free));
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| cgroup_available(Path::new("/sys/fs/cgroup"), &c, swap_free));
    match (machine, cgroup) {
        (Some(m), Some(c)) => Some((m.min(c), c < m)),
        (None, Some(c)) => Some((c, true)),
        (Some(m), None) => Some((m, false)),
        (None, None) => None,
    }
}

/// Refuses to allocate `bytes` of host memory for `what` when they exceed [`available`]
/// ([`Error::OutOfMemory`], naming both numbers and whether a cgroup limit binds).
pub fn ensure(bytes: usize, what: impl FnOnce() -> String) -> Result<()> {
    match limit() {
        Some((limit, by_cgroup)) if bytes > limit => Err(Error::OutOfMemory(format!(
            "{} needs {} MiB but {} MiB are available{}",
            what(),
            bytes >> 20,
            limit >> 20,
            if by_cgroup {
                " under this process's cgroup (container) memory limit"
            } else {
                ""
            }
        ))),
        _ => Ok(()),
    }
}

/// An entry of `/proc/meminfo`'s text in bytes (None where it is missing or malformed).
fn meminfo_bytes(meminfo: &str, key: &str) -> Option<usize> {
    let line = meminfo.lines().find(|l| l.starts_with(key))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// What the memory limits of the cgroups of `proc_cgroup` (the text of `/proc/self/cgroup`)
/// leave, with the cgroup file systems mounted under `root` and `swap_free` bytes of swap free
/// on the machine: the minimum over the process's cgroup and the ancestors whose limits apply
/// to it of `limit - usage + file pages (reclaimable) + swap the cgroup may still use`. `None`
/// where no limit is set or none can be read. Errs on the side of allowing: a wrong refusal
/// stops work that would have fit, a missed one only loses the early error.
pub fn cgroup_available(root: &Path, proc_cgroup: &str, swap_free: usize) -> Option<usize> {
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
            // cgroup v2 (unified hierarchy): every ancestor's limit applies.
            for dir in ancestors(&root.join(relative(path)), root) {
                take(left_in(&dir, CgroupVersion::V2, swap_free));
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            let base = root.join("memory");
            let leaf = base.join(relative(path));
            // v1 without use_hierarchy: the ancestors' limits do not cover this cgroup.
            let hierarchical = std::fs::read_to_string(leaf.join("memory.use_hierarchy"))
                .map_or(true, |v| v.trim() != "0");
            let dirs = if hierarchical {
                ancestors(&leaf, &base)
            } else {
                vec![leaf]
            };
            for dir in dirs {
                take(left_in(&dir, CgroupVersion::V1, swap_free));
            }
        }
    }
    best
}

/// The two cgroup interfaces.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CgroupVersion {
    V1,
    V2,
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

/// `limit - usage + file pages + swap headroom` of one cgroup folder; `None` without a limit
/// (`max`, or v1's huge "unlimited" value) or where the files cannot be read.
fn left_in(dir: &Path, version: CgroupVersion, swap_free: usize) -> Option<usize> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let num = |f: &str| -> Option<u64> { read(f)?.trim().parse().ok() };
    // cgroup v1 reports "no limit" as a page-rounded i64::MAX; v2 as "max" (not a number).
    let limited = |v: u64| v < 1 << 62;
    let stat = read("memory.stat").unwrap_or_default();
    let stat = |key: &str| -> Option<u64> {
        stat.lines().find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some(key))
                .then(|| it.next()?.parse().ok())
                .flatten()
        })
    };
    let swap_free = swap_free as u64;
    let (limit, usage, file, swap) = match version {
        CgroupVersion::V2 => {
            let limit = num("memory.max").filter(|&v| limited(v))?;
            let usage = num("memory.current")?;
            let file = stat("file").unwrap_or_else(|| {
                stat("active_file").unwrap_or(0) + stat("inactive_file").unwrap_or(0)
            });
            // No swap limit here ("max" or no file): the machine's free swap.
            let swap = match (num("memory.swap.max"), num("memory.swap.current")) {
                (Some(max), Some(cur)) => max.saturating_sub(cur).min(swap_free),
                _ => swap_free,
            };
            (limit, usage, file, swap)
        }
        CgroupVersion::V1 => {
            let limit = num("memory.limit_in_bytes").filter(|&v| limited(v))?;
            let usage = num("memory.usage_in_bytes")?;
            let file =
                stat("total_active_file").unwrap_or(0) + stat("total_inactive_file").unwrap_or(0);
            // memory+swap limit: what it leaves beyond the memory limit's headroom is swap.
            let swap = match (
                num("memory.memsw.limit_in_bytes").filter(|&v| limited(v)),
                num("memory.memsw.usage_in_bytes"),
            ) {
                (Some(max), Some(cur)) => max
                    .saturating_sub(cur)
                    .saturating_sub(limit.saturating_sub(usage))
                    .min(swap_free),
                _ => swap_free,
            };
            (limit, usage, file, swap)
        }
    };
    let left = limit
        .saturating_sub(usage)
        .saturating_add(file.min(usage))
        .saturating_add(swap);
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
    fn cgroup_v2_takes_the_tightest_ancestor_and_counts_file_pages() {
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
        let got = cgroup_available(r, "0::/slice/job\n", 0);
        // job: 1 GiB + 512 MiB; slice: 3 GiB.
        assert_eq!(got, Some(1536 << 20));
        // Without a job limit the slice binds.
        std::fs::write(r.join("slice/job/memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_available(r, "0::/slice/job\n", 0), Some(3 << 30));
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
        assert_eq!(cgroup_available(r, proc, 0), Some((1 << 30) + (256 << 20)));
        // Unlimited everywhere: no answer, so nothing is refused.
        std::fs::write(r.join("memory/docker/abc/memory.limit_in_bytes"), unlimited).unwrap();
        assert_eq!(cgroup_available(r, proc, 0), None);
    }

    #[test]
    fn file_pages_and_swap_headroom_are_credited() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        // v2: 2 GiB limit, 2 GiB used of which 1 GiB page cache (active and inactive), swap
        // limit 1 GiB with 256 MiB used.
        write(
            &r.join("job"),
            &[
                ("memory.max", "2147483648\n"),
                ("memory.current", "2147483648\n"),
                (
                    "memory.stat",
                    "anon 1073741824\nfile 1073741824\nactive_file 805306368\n",
                ),
                ("memory.swap.max", "1073741824\n"),
                ("memory.swap.current", "268435456\n"),
            ],
        );
        let swap_free = 10usize << 30;
        assert_eq!(
            cgroup_available(r, "0::/job\n", swap_free),
            Some((1 << 30) + (768 << 20))
        );
        // No swap limit: the machine's free swap; no swap free: none.
        std::fs::write(r.join("job/memory.swap.max"), "max\n").unwrap();
        assert_eq!(
            cgroup_available(r, "0::/job\n", swap_free),
            Some((1 << 30) + swap_free)
        );
        assert_eq!(cgroup_available(r, "0::/job\n", 0), Some(1 << 30));
        // v1 memory+swap limit: 3 GiB with 2.5 GiB used leaves 0.5 GiB, of which the memory
        // limit's own headroom (0 here) is not swap.
        let v1 = r.join("memory/job");
        write(
            &v1,
            &[
                ("memory.limit_in_bytes", "2147483648\n"),
                ("memory.usage_in_bytes", "2147483648\n"),
                (
                    "memory.stat",
                    "total_active_file 0\ntotal_inactive_file 0\n",
                ),
                ("memory.memsw.limit_in_bytes", "3221225472\n"),
                ("memory.memsw.usage_in_bytes", "2684354560\n"),
            ],
        );
        assert_eq!(
            cgroup_available(r, "3:memory:/job\n", swap_free),
            Some(512 << 20)
        );
    }

    #[test]
    fn cgroup_v1_without_use_hierarchy_ignores_the_parents_limit() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let unlimited = "9223372036854771712\n";
        write(
            &r.join("memory/parent"),
            &[
                ("memory.limit_in_bytes", "1048576\n"),
                ("memory.usage_in_bytes", "0\n"),
            ],
        );
        write(
            &r.join("memory/parent/child"),
            &[
                ("memory.limit_in_bytes", unlimited),
                ("memory.usage_in_bytes", "0\n"),
                ("memory.use_hierarchy", "0\n"),
            ],
        );
        assert_eq!(cgroup_available(r, "4:memory:/parent/child\n", 0), None);
        std::fs::write(r.join("memory/parent/child/memory.use_hierarchy"), "1\n").unwrap();
        assert_eq!(
            cgroup_available(r, "4:memory:/parent/child\n", 0),
            Some(1 << 20)
        );
    }

    #[test]
    fn unreadable_or_malformed_cgroup_files_give_no_limit() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        assert_eq!(cgroup_available(r, "0::/nowhere\n", 0), None);
        assert_eq!(cgroup_available(r, "garbage\n\n::\n", 0), None);
        write(
            &r.join("x"),
            &[("memory.max", "lots\n"), ("memory.current", "1\n")],
        );
        assert_eq!(cgroup_available(r, "0::/x\n", 0), None);
        // Usage above the limit (possible for a moment): nothing left, not an underflow.
        write(
            &r.join("y"),
            &[("memory.max", "100\n"), ("memory.current", "200\n")],
        );
        assert_eq!(cgroup_available(r, "0::/y\n", 0), Some(0));
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
