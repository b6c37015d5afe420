//! The host-wide kernel tables all runners draw from, and what bounds each runner's take, so
//! that no runner (or set of runners) can exhaust one for the others or the host.
//!
//! | table | bound |
//! |---|---|
//! | processes and threads (`kernel.pid_max`, `kernel.threads-max`) | `pids_limit` per runner; all of trident's runners together at most [`runner_processes`] (a pids limit on trident's cgroup parent) |
//! | open files (`fs.file-max`) | each file is charged to its runner's memory cgroup; the global count is lifted to its maximum, as systemd does on every host it boots (the memory limit is the real bound) |
//! | inotify instances and watches (per user) | each runner's user namespace is owned by its own host id, so each runner has its own per-user share |
//! | Linux AIO contexts (`fs.aio-max-nr`) | none: `io_setup` is not available in runners (seccomp) |
//! | kernel keyrings | not reachable (`keyctl`, `add_key`, `request_key` denied) |
//! | System V IPC | per runner (its own IPC namespace, small limits) |

use std::io;

/// The file-max systemd sets (`LONG_MAX`): the table becomes a counter only, and memory
/// accounting bounds what each cgroup takes.
const UNLIMITED_FILES: u64 = i64::MAX as u64;

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// How many processes all runners of this instance may have together: three quarters of
/// the host's process table, so that the host always keeps a quarter for itself.
pub fn runner_processes() -> u64 {
    let pid_max = read_number("/proc/sys/kernel/pid_max").unwrap_or(32768);
    let threads = read_number("/proc/sys/kernel/threads-max").unwrap_or(pid_max);
    pid_max.min(threads) * 3 / 4
}

/// Lifts `fs.file-max` to its maximum when it is lower (what systemd does at boot): open
/// files are charged to each runner's memory cgroup, so the global count only risks a
/// denial of service. Returns the value before, if it was changed.
pub fn lift_file_max() -> io::Result<Option<u64>> {
    const PATH: &str = "/proc/sys/fs/file-max";
    let current = read_number(PATH).unwrap_or(UNLIMITED_FILES);
    if current >= UNLIMITED_FILES {
        return Ok(None);
    }
    std::fs::write(PATH, UNLIMITED_FILES.to_string())?;
    Ok(Some(current))
}
