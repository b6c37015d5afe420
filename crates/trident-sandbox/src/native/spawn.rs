//! Starting a runner-init straight into a pid namespace of its own, as that namespace's pid 1.
//!
//! A pid namespace's first process can only be made by `clone(CLONE_NEWPID)` (`unshare`
//! moves only later children), and std's `Command` takes no clone flags. Before this, the
//! server spawned a runner-init (P0) that unshared and forked the runner's pid 1 (P1), and
//! then stayed alive for the runner's whole life only to wait for it: a process, its stack,
//! heap and page tables per idle runner, and a fork per creation. So this one spawn is
//! written by hand, the way posix_spawn works: `CLONE_VM | CLONE_VFORK` (the child borrows
//! the server's memory until its exec: no copy of the page tables of a large, multi-threaded
//! server), plus `CLONE_NEWPID`. Between the clone and the exec the child makes only raw,
//! async-signal-safe system calls on memory prepared before the clone, and never returns
//! into Rust code.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::sched::CloneFlags;
use rustix::process::{WaitId, WaitIdOptions};
use tokio::io::unix::AsyncFd;

/// The child's stack between clone and exec: a few raw calls deep.
const CHILD_STACK_BYTES: usize = 64 * 1024;

/// What the child runs with: stdin is /dev/null, stdout and stderr are the given fds.
pub(super) struct SpawnSpec<'a> {
    /// `cgroup.procs` files the child joins before its exec (`Cgroups::open_procs`), so
    /// that everything its exec allocates is charged to the runner's cgroup.
    pub join: &'a [BorrowedFd<'a>],
    pub exe: &'a Path,
    pub args: &'a [&'a OsStr],
    pub env: &'a [(&'a str, &'a str)],
    pub stdout: BorrowedFd<'a>,
    pub stderr: BorrowedFd<'a>,
}

/// A runner-init this server started, pid 1 of its own pid namespace and a child of the
/// server: it must be reaped (`wait`) once it ended, or its zombie pins its cgroup.
#[derive(Debug)]
pub(super) struct RunnerInit {
    pidfd: Option<OwnedFd>,
}

/// Clones and execs `spec.exe` as pid 1 of a new pid namespace.
pub(super) fn spawn_in_pid_namespace(spec: &SpawnSpec<'_>) -> io::Result<RunnerInit> {
    let c = |bytes: &[u8]| CString::new(bytes).map_err(|e| io::Error::other(e.to_string()));
    let exe = c(spec.exe.as_os_str().as_bytes())?;
    let mut argv = vec![exe.clone()];
    for arg in spec.args {
        argv.push(c(arg.as_bytes())?);
    }
    let env = spec
        .env
        .iter()
        .map(|(k, v)| c(format!("{k}={v}").as_bytes()))
        .collect::<io::Result<Vec<_>>>()?;
    let argv_ptrs = null_terminated(&argv);
    let env_ptrs = null_terminated(&env);
    let null = std::fs::File::open("/dev/null")?;
    // The child reports a failed exec here (its errno); a successful exec closes it.
    let (error_r, error_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let join: Vec<i32> = spec.join.iter().map(|fd| fd.as_raw_fd()).collect();
    let child_fds = ChildFds {
        join: &join,
        stdin: null.as_raw_fd(),
        stdout: spec.stdout.as_raw_fd(),
        stderr: spec.stderr.as_raw_fd(),
        error: error_w.as_raw_fd(),
    };
    let mut stack = vec![0u8; CHILD_STACK_BYTES];

    // All signals blocked across the clone (raw, so that glibc's own two are too): no
    // handler of the server may run in the child while it shares the server's memory. The
    // child resets every disposition and unblocks all before its exec; the server's mask
    // comes back right after.
    let all: KernelSigset = !0;
    let mut previous: KernelSigset = 0;
    // SAFETY: rt_sigprocmask reads and writes the two 8-byte sets.
    unsafe { sigprocmask(&all, &mut previous) };
    let child = Box::new(|| {
        // SAFETY: runs in the cloned child on its own stack, on memory the suspended parent
        // prepared; only async-signal-safe calls, and it ends in execve or _exit.
        unsafe { exec_child(&exe, &argv_ptrs, &env_ptrs, &child_fds) }
    });
    // SAFETY: CLONE_VM | CLONE_VFORK suspends this thread until the child has exec'd or
    // exited, so the stack and everything the closure borrows outlive the child's use.
    let cloned = unsafe {
        nix::sched::clone(
            child,
            &mut stack,
            CloneFlags::CLONE_VM | CloneFlags::CLONE_VFORK | CloneFlags::CLONE_NEWPID,
            Some(libc::SIGCHLD),
        )
    };
    // SAFETY: restores the mask saved above.
    unsafe { sigprocmask(&previous, std::ptr::null_mut()) };
    drop(error_w);
    let pid = cloned.map_err(io::Error::from)?;
    // The child is ours and unreaped, so its pid cannot be reused before this.
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid.as_raw()).expect("clone returns a positive pid"),
        rustix::process::PidfdFlags::empty(),
    );
    let mut errno = [0u8; 4];
    let exec_failed = nix::unistd::read(error_r.as_raw_fd(), &mut errno).is_ok_and(|n| n == 4);
    match pidfd {
        Ok(pidfd) if !exec_failed => Ok(RunnerInit { pidfd: Some(pidfd) }),
        pidfd => {
            // Reaped right away: it has exited, or is killed here (no pidfd, no runner).
            if !exec_failed {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
            let _ = nix::sys::wait::waitpid(pid, None);
            Err(match pidfd {
                Err(e) if !exec_failed => e.into(),
                _ => io::Error::from_raw_os_error(i32::from_ne_bytes(errno)),
            })
        }
    }
}

/// The kernel's signal set (64 signals), as `rt_sigprocmask` and `rt_sigaction` take it.
type KernelSigset = u64;

/// The kernel's `struct sigaction` on x86_64 (not glibc's, which is laid out differently).
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: u64,
    restorer: usize,
    mask: KernelSigset,
}

/// `rt_sigprocmask(SIG_SETMASK)` as a raw system call.
///
/// # Safety
///
/// `previous` is null or points to writable memory for a set.
unsafe fn sigprocmask(set: &KernelSigset, previous: *mut KernelSigset) {
    // SAFETY: the kernel reads 8 bytes from `set` and writes 8 to `previous` if not null.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            set as *const KernelSigset,
            previous,
            std::mem::size_of::<KernelSigset>(),
        );
    }
}

/// The raw fds the child uses.
struct ChildFds<'a> {
    join: &'a [i32],
    stdin: i32,
    stdout: i32,
    stderr: i32,
    error: i32,
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// The child between clone and exec.
///
/// # Safety
///
/// Only to be called in a child cloned with `CLONE_VM | CLONE_VFORK`, with all signals
/// blocked, on pointers to live, null-terminated arrays.
unsafe fn exec_child(
    exe: &CString,
    argv: &[*const libc::c_char],
    env: &[*const libc::c_char],
    fds: &ChildFds<'_>,
) -> isize {
    // Without CLONE_SIGHAND the child has its own copy of the signal dispositions: setting
    // them back to the default changes nothing of the server's.
    // SAFETY: raw system calls on memory the caller keeps alive.
    unsafe {
        let default = KernelSigaction {
            handler: libc::SIG_DFL,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        for signal in 1..=64 {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    signal,
                    &default as *const KernelSigaction,
                    std::ptr::null_mut::<KernelSigaction>(),
                    std::mem::size_of::<KernelSigset>(),
                );
            }
        }
        sigprocmask(&0, std::ptr::null_mut());
        let joined = fds
            .join
            .iter()
            .all(|&fd| libc::write(fd, b"0".as_ptr().cast(), 1) == 1);
        let placed = joined
            && libc::dup2(fds.stdin, 0) == 0
            && libc::dup2(fds.stdout, 1) == 1
            && libc::dup2(fds.stderr, 2) == 2;
        if placed {
            libc::execve(exe.as_ptr(), argv.as_ptr(), env.as_ptr());
        }
        let errno = *libc::__errno_location();
        let bytes = errno.to_ne_bytes();
        libc::write(fds.error, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(127)
    }
}

impl RunnerInit {
    /// Sends it SIGKILL through its pidfd (no pid that could have been reused). As pid 1 of
    /// the runner's pid namespace, its death takes every process of the namespace with it:
    /// the kernel kills them all (nested namespaces too), stops the namespace from forking
    /// and waits until they are gone before pid 1 can be reaped.
    pub(super) fn kill(&self) -> io::Result<()> {
        let Some(pidfd) = &self.pidfd else {
            return Ok(());
        };
        rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::KILL)
            .map_err(io::Error::from)
    }

    /// Waits until it has ended and reaps it. Returns at once if it was reaped before.
    pub(super) async fn wait(&mut self) -> io::Result<()> {
        let Some(pidfd) = &self.pidfd else {
            return Ok(());
        };
        // SAFETY: the pidfd stays open (in self, borrowed for this whole call) while the
        // registration lives; it is dropped before this returns.
        let exited = unsafe {
            AsyncFd::register_with_interest(pidfd.as_raw_fd(), tokio::io::Interest::READABLE)
        }
        .map_err(io::Error::from)?;
        // A pidfd turns readable when its process has exited.
        let _ = exited.readable().await?;
        drop(exited);
        reap(pidfd.as_fd())?;
        self.pidfd = None;
        Ok(())
    }

    /// Reaps it, blocking until it has ended: for a blocking thread, once it was killed.
    pub(super) fn reap_blocking(&mut self) -> io::Result<()> {
        if let Some(pidfd) = &self.pidfd {
            reap(pidfd.as_fd())?;
            self.pidfd = None;
        }
        Ok(())
    }
}

fn reap(pidfd: BorrowedFd<'_>) -> io::Result<()> {
    match rustix::process::waitid(WaitId::PidFd(pidfd), WaitIdOptions::EXITED) {
        Ok(_) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl Drop for RunnerInit {
    /// One that nobody waited for is reaped once it ends, so that no zombie is left behind
    /// (a runner outlives the server's handle of it only when the server shuts down).
    fn drop(&mut self) {
        if let Some(pidfd) = self.pidfd.take() {
            let exited = rustix::process::waitid(
                WaitId::PidFd(pidfd.as_fd()),
                WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
            );
            if matches!(exited, Ok(None)) {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move {
                        let _ = RunnerInit { pidfd: Some(pidfd) }.wait().await;
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn(exe: &str, args: &[&str], stdout: BorrowedFd<'_>) -> io::Result<RunnerInit> {
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        let stderr = std::io::stderr();
        spawn_in_pid_namespace(&SpawnSpec {
            join: &[],
            exe: Path::new(exe),
            args: &args,
            env: &[("PATH", "/usr/bin:/bin"), ("ONLY", "this")],
            stdout,
            stderr: stderr.as_fd(),
        })
    }

    /// The child is pid 1 of a new pid namespace, with exactly the given environment, the
    /// given stdout, stdin from /dev/null, no blocked signals, and it can be waited for.
    #[tokio::test]
    async fn the_child_is_pid_1_of_its_own_namespace_with_what_it_was_given() {
        let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let script = "echo pid=$$; env | sort | tr '\\n' ' '; echo; \
                      grep SigBlk /proc/self/status; read line || echo stdin=empty";
        let mut init = spawn("/bin/sh", &["-c", script], out_w.as_fd()).unwrap();
        drop(out_w);
        init.wait().await.unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(out_r), &mut out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "pid=1", "{out}");
        assert!(lines[1].contains("ONLY=this"), "{out}");
        assert!(lines[1].contains("PATH=/usr/bin:/bin"), "{out}");
        assert!(!lines[1].contains("HOME="), "{out}");
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["SigBlk:", "0000000000000000"],
            "{out}"
        );
        assert_eq!(lines[3], "stdin=empty", "{out}");
        // Reaped: no child of this process is left to wait for.
        init.wait().await.unwrap();
    }

    #[tokio::test]
    async fn a_missing_binary_is_its_exec_error() {
        let stdout = std::io::stdout();
        let err = spawn("/nonexistent/runner-init", &[], stdout.as_fd()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
    }
}
