//! runner-init: the long-lived, single-threaded process at the heart of every runner.
//!
//! Process tree of one runner (all in the runner's cgroup):
//!
//! ```text
//! trident runner-init <dir> (pid 1)  joins the cgroup, unshares namespaces, builds the root
//! │                                  fs, pivots, enters the runner's user namespace, serves
//! │                                  the control socket
//! ├── handler (pid 1)                one per connection, pid 1 of a pid namespace of its own:
//! │   │                              a file operation, or an execution, whose processes it
//! │   │                              reaps and, when the command ends, kills before it
//! │   │                              reports the end
//! │   └── /bin/bash -c <command>
//! └── spare handler (pid 1)          once the runner was used: the next connection's handler,
//!                                    cloned ahead and waiting in `accept` (see `serve`)
//! ```
//!
//! The server clones runner-init straight into the runner's new pid namespace
//! (`native/spawn.rs`: vfork-like, it never forks its multi-threaded tokio process), so an
//! idle runner is this one process; nothing here is async.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{signal, SigHandler, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Gid, Pid, Uid};

use crate::confine::{self, Filters};
use crate::fileops;
use crate::lowers::Mapping;
use crate::protocol::{recv_frame, send_frame, ExecRequest, Request, Response};
use crate::rootfs;
use crate::spec::{InitSpec, IDS_PER_RUNNER, USER_NAME, WORKSPACE};
use trident_core::backend::BackendError;

/// `oom_score_adj` of every execution's processes: the highest, so that they go first.
const EXECUTION_OOM_SCORE_ADJ: &str = "1000";

/// What runner-init writes to the ready fd when the runner accepts work (anything else is the
/// reason it failed; the server compares with the same constant).
pub(crate) const READY: &str = "ok";

/// The fd on which the server waits for `READY` (or an error text).
const READY_FD: RawFd = 3;

/// Entry point of `trident runner-init <dir>`. Never returns.
pub fn main(dir: &Path) -> ! {
    // The server's clone does as little as it can between clone and exec (it shares the
    // server's memory until then): the ready pipe comes as stdout and moves to fd 3 here,
    // stdout becomes /dev/null, and the runner gets its own session (a Ctrl-C or a signal
    // to the server's process group spares it).
    let moved = nix::unistd::dup2(1, READY_FD).and_then(|_| {
        let null = nix::fcntl::open(
            "/dev/null",
            nix::fcntl::OFlag::O_WRONLY,
            nix::sys::stat::Mode::empty(),
        )?;
        nix::unistd::dup2(null, 1)?;
        nix::unistd::close(null)
    });
    // SAFETY: fd 3 is the ready pipe the server gave this process, just moved there.
    let mut ready = unsafe { File::from_raw_fd(READY_FD) };
    // Nothing else of the server's may reach the runner: whatever the server's own parent
    // left open without close-on-exec, or what another thread of the server had opened a
    // moment before the spawn.
    // SAFETY: close_range(2) takes three integers; no fd above 3 is this process's own yet.
    let closed = unsafe { libc::syscall(libc::SYS_close_range, READY_FD + 1, u32::MAX, 0u32) };
    let closed = match closed {
        0 => Ok(()),
        _ => Err(nix::errno::Errno::last()),
    };
    if let Err(e) = moved
        .and(closed)
        .and_then(|()| nix::unistd::setsid().map(drop))
    {
        fail(
            &mut ready,
            &format!("setting up the ready pipe, open files and session: {e}"),
        );
    }
    let spec: InitSpec = match std::fs::read(dir.join("spec.json"))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(spec) => spec,
        Err(e) => fail(&mut ready, &format!("reading the runner spec: {e}")),
    };
    let userns = match enter_cgroup_and_namespaces(&spec) {
        Ok(userns) => userns,
        Err(e) => fail(&mut ready, &e.to_string()),
    };
    runner_init(&spec, ready, userns)
}

fn fail(ready: &mut File, message: &str) -> ! {
    let _ = ready.write_all(message.as_bytes());
    eprintln!("runner-init: {message}");
    std::process::exit(1)
}

/// Enters the runner's fresh namespaces (mount, IPC, UTS, network,
/// cgroup; the pid namespace it was born into) and makes its user namespace, returned
/// opened (entered last, in `enter_user_namespace`).
fn enter_cgroup_and_namespaces(spec: &InitSpec) -> io::Result<OwnedFd> {
    // The server clones this process into the runner's pid namespace (native/spawn.rs): a
    // runner-init anywhere else would share a pid namespace with the host.
    if std::process::id() != 1 {
        return Err(io::Error::other(
            "runner-init is started by the server, as pid 1 of a new pid namespace",
        ));
    }
    // The server made the runner's cgroup, and this process joined it before its exec (so
    // that all of its memory is charged there). The cgroup namespace, made here, has that
    // cgroup as its root: the runner sees its own cgroup as `/`, and no host path.
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWCGROUP,
    )
    .map_err(|e| io::Error::other(format!("unshare: {e}")))?;
    // Wired with `ip` (children of this process; the named host namespace is found through
    // the host's mounts, which this mount namespace still has).
    if let Some(network) = &spec.network {
        crate::network::connect_runner(network)?;
    }
    // While /proc is still the host's.
    runner_userns(spec.uid_base)
}

/// Makes the runner's user namespace: owned by the runner's base id, its ids 0..65536 mapped
/// onto `uid_base..` (users and groups). It is what `MOUNT_ATTR_IDMAP` takes to shift the
/// lower layers' owners, and the namespace runner-init enters once everything is mounted.
///
/// A forked helper takes the runner's base id (keeping its capabilities, so that hosts that
/// refuse unprivileged user namespaces allow the creation), unshares the namespace and
/// waits, while this process, still root on the host, writes the maps: only a process
/// privileged in the parent namespace may map a range. The open fd keeps the namespace
/// alive after the helper exits.
///
/// Owned by the base id, not host root: the kernel charges per-user counters of everything
/// the runner makes (inotify instances and watches, processes, namespaces) to the owner in
/// the host's namespace, so each runner gets its own share of those host-wide limits instead
/// of all runners (and the host's root) sharing root's.
fn runner_userns(uid_base: u32) -> io::Result<OwnedFd> {
    let (unshared_r, unshared_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (done_r, done_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // The first fork in the runner's cgroup: it is where the pids limits of the runner and
    // of all runners together (the cgroup parent's) first apply.
    // SAFETY: runner-init is single-threaded; the helper runs only this module's code and
    // ends in _exit.
    let forked = unsafe { fork() }.map_err(|e| {
        io::Error::other(format!(
            "fork: {e} (EAGAIN: the processes of all runners reached the pids limit of \
             trident's cgroup parent, or the host's kernel.pid_max)"
        ))
    })?;
    match forked {
        ForkResult::Child => {
            drop((unshared_r, done_w));
            let unshared = become_owner(uid_base)
                .and_then(|()| unshare(CloneFlags::CLONE_NEWUSER).map_err(io::Error::other))
                // Its pid as the host's /proc names it (this pid namespace's is not).
                .and_then(|()| std::fs::read_link("/proc/self"));
            if let Ok(host_pid) = unshared {
                let _ = File::from(unshared_w).write_all(host_pid.as_os_str().as_encoded_bytes());
                let mut byte = [0u8; 1];
                let _ = File::from(done_r).read(&mut byte);
            }
            // SAFETY: _exit(2) takes an int and never returns.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            drop((unshared_w, done_r));
            let result = (|| -> io::Result<OwnedFd> {
                let mut host_pid = [0u8; 16];
                let n = File::from(unshared_r).read(&mut host_pid)?;
                let host_pid = std::str::from_utf8(&host_pid[..n])
                    .ok()
                    .filter(|pid| n > 0 && pid.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| {
                        io::Error::other(
                            "the helper could not take the runner's ids and unshare a user \
                             namespace",
                        )
                    })?;
                let map = format!("0 {uid_base} {IDS_PER_RUNNER}\n");
                let proc = Path::new("/proc").join(host_pid);
                for file in ["uid_map", "gid_map"] {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(proc.join(file))
                        .and_then(|mut f| f.write_all(map.as_bytes()))
                        .map_err(|e| io::Error::other(format!("writing the {file}: {e}")))?;
                }
                Ok(OwnedFd::from(File::open(proc.join("ns/user"))?))
            })();
            let _ = File::from(done_w).write_all(b"d");
            let _ = waitpid(child, None);
            result.map_err(|e| io::Error::other(format!("the runner's user namespace: {e}")))
        }
    }
}

/// P1: pid 1 of the runner.
/// pid 1 of the runner, from its root file system on.
fn runner_init(spec: &InitSpec, mut ready: File, userns: OwnedFd) -> ! {
    let (listener, mapping) = match build_runner(spec, userns) {
        Ok(built) => built,
        Err(e) => fail(&mut ready, &e.to_string()),
    };
    let filters = match confine::compile() {
        Ok(filters) => filters,
        Err(e) => fail(&mut ready, &e.to_string()),
    };
    if let Err(e) = confine::narrow_bounding_set() {
        fail(&mut ready, &format!("narrowing the bounding set: {e}"));
    }
    // From here on, runner-init and all it starts run under the runner's seccomp layer.
    if let Err(e) = confine::restrict_runner(&filters) {
        fail(&mut ready, &e.to_string());
    }
    // SAFETY: setting dispositions in a single-threaded process. SIGCHLD ignored = handlers
    // are reaped by the kernel; SIGPIPE ignored = a vanished client is an EPIPE, not a death.
    unsafe {
        let _ = signal(Signal::SIGCHLD, SigHandler::SigIgn);
        let _ = signal(Signal::SIGPIPE, SigHandler::SigIgn);
    }
    // The server reads the other end. If it died while we were starting, nobody will ever
    // use or record this runner: end it now (the next start's janitor removes the rest).
    // A runner whose lowers are not idmapped works, with the image's files owned by the
    // overflow id: the server logs why (once).
    let word = match mapping {
        Mapping::Idmapped => READY.to_string(),
        Mapping::Plain(why) => format!("{READY}\n{why}"),
    };
    if ready.write_all(word.as_bytes()).is_err() {
        eprintln!("runner-init: the server went away while the runner started");
        std::process::exit(3);
    }
    drop((ready, word));
    // What setting up used and freed goes back to the kernel before the runner idles:
    // every idle runner would keep those pages for its whole life (and each handler would
    // start with a copy of them).
    release_stack_below_here();
    // SAFETY: malloc_trim only returns free memory of glibc's heap.
    unsafe { libc::malloc_trim(0) };
    serve(spec, &filters, listener)
}

/// Serves the control socket for the rest of the runner's life. Each connection gets a
/// handler of its own (`fork_into_pid_namespace`). Once the runner has been used, the next
/// connection's handler is cloned ahead, a *spare* that waits in `accept` itself, so that
/// an execution or file operation does not wait for a fork (about a quarter of a
/// millisecond). The spare is cloned when the handler before it has ended, not while it
/// works, so that the clone does not compete with an execution for the CPUs. An idle runner
/// that was never used stays one process; a used one keeps its spare (one process more,
/// counted in its pids limit).
fn serve(spec: &InitSpec, filters: &Filters, listener: UnixListener) -> ! {
    let mut state = Serving::Unused;
    loop {
        state = match state {
            Serving::Unused => match accept_and_fork(spec, filters, &listener, true) {
                Some(Some(ended)) => Serving::Busy(ended),
                _ => Serving::Unused,
            },
            Serving::Waiting(pipe) => match wait_for_spare(&pipe) {
                SpareNews::Accepted => Serving::Busy(pipe),
                SpareNews::Nothing => Serving::Waiting(pipe),
                // It died before it took a connection (the OOM killer, most likely): the
                // next connection is served the plain way, and its end brings a new spare.
                SpareNews::Gone => Serving::Unused,
            },
            Serving::Busy(pipe) => {
                let mut polls = [
                    PollFd::new(pipe.as_fd(), PollFlags::POLLIN),
                    PollFd::new(listener.as_fd(), PollFlags::POLLIN),
                ];
                let _ = poll(&mut polls, PollTimeout::NONE);
                if polls[1].any().unwrap_or(false) {
                    // A second connection while the spare's is still served (a file
                    // listing beside a long execution): a handler of its own, at once.
                    let _ = accept_and_fork(spec, filters, &listener, false);
                }
                if polls[0].any().unwrap_or(false) {
                    clone_spare(spec, filters, &listener)
                } else {
                    Serving::Busy(pipe)
                }
            }
        };
    }
}

/// Where runner-init's control socket stands.
enum Serving {
    /// Never used, or the last spare could not be made: runner-init accepts itself.
    Unused,
    /// A spare waits in `accept`; the pipe's read end says when it took a connection.
    Waiting(OwnedFd),
    /// The spare (or the first handler) serves a connection; the pipe reads as closed once
    /// that handler has ended, and the next spare is due.
    Busy(OwnedFd),
}

/// What a spare's pipe said.
enum SpareNews {
    Accepted,
    Nothing,
    Gone,
}

fn wait_for_spare(pipe: &OwnedFd) -> SpareNews {
    let mut polls = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
    if poll(&mut polls, PollTimeout::NONE).is_err() {
        return SpareNews::Nothing;
    }
    let mut byte = [0u8; 1];
    match nix::unistd::read(pipe.as_raw_fd(), &mut byte) {
        Ok(1) => SpareNews::Accepted,
        Err(nix::errno::Errno::EINTR) => SpareNews::Nothing,
        _ => SpareNews::Gone,
    }
}

/// Accepts a connection and forks its handler. With `tell_end`, returns the read end of a
/// pipe that reads as closed once that handler has ended (`Some(None)` when making the pipe
/// failed); `None` when nothing was accepted or the fork failed.
fn accept_and_fork(
    spec: &InitSpec,
    filters: &Filters,
    listener: &UnixListener,
    tell_end: bool,
) -> Option<Option<OwnedFd>> {
    let stream = match listener.accept() {
        Ok((stream, _)) => stream,
        Err(e) => {
            if e.kind() != io::ErrorKind::Interrupted {
                eprintln!("runner-init: accept: {e}");
            }
            return None;
        }
    };
    let pipe = if tell_end {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).ok()
    } else {
        None
    };
    // SAFETY: single-threaded; the child handles one connection and exits.
    match unsafe { fork_into_pid_namespace() } {
        Ok(ForkResult::Child) => {
            // The write end, if any, stays open until this handler exits.
            let _keep = pipe.map(|(_, write)| write);
            close_listener(listener);
            serve_connection(spec, filters, &stream)
        }
        Ok(ForkResult::Parent { .. }) => Some(pipe.map(|(read, _)| read)),
        Err(e) => {
            // Most likely the pids limit: answer so the server does not wait forever.
            let _ = send_frame(
                &stream,
                &Response::Error(BackendError::Failed(format!("fork: {e}"))),
                &[],
            );
            None
        }
    }
}

/// Clones the handler of the next connection ahead of it. It writes one byte to its pipe
/// when it has accepted, and the pipe closes when it ends. `Unused` when the clone failed
/// (the pids limit, most likely): runner-init then accepts the next connection itself.
fn clone_spare(spec: &InitSpec, filters: &Filters, listener: &UnixListener) -> Serving {
    let Ok((read, write)) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) else {
        return Serving::Unused;
    };
    // SAFETY: single-threaded; the child handles one connection and exits.
    match unsafe { fork_into_pid_namespace() } {
        Ok(ForkResult::Child) => {
            drop(read);
            let stream = loop {
                match listener.accept() {
                    Ok((stream, _)) => break stream,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        eprintln!("runner-init: accept: {e}");
                        std::process::exit(1);
                    }
                }
            };
            close_listener(listener);
            let _ = nix::unistd::write(&write, b"a");
            serve_connection(spec, filters, &stream)
        }
        Ok(ForkResult::Parent { .. }) => Serving::Waiting(read),
        Err(_) => Serving::Unused,
    }
}

/// In a handler: lets go of runner-init's listening socket, which no handler needs.
fn close_listener(listener: &UnixListener) {
    // SAFETY: the listener's fd is closed once, in a handler that never uses the listener
    // again and leaves by exit, which runs no destructor of runner-init's frames.
    unsafe { libc::close(listener.as_raw_fd()) };
}

/// A handler's life: one connection, then exit.
fn serve_connection(spec: &InitSpec, filters: &Filters, stream: &UnixStream) -> ! {
    let code = match handle(spec, filters, stream) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("runner-init: handler: {e}");
            1
        }
    };
    std::process::exit(code)
}

/// Gives back the stack pages that setting up used below the serve loop's frame: deep
/// one-time calls (the spec's parsing, the root file system) left them dirty, and an idle
/// runner would keep them for its whole life. Below the stack pointer nothing is live, so
/// they simply fault in as zero pages when the stack grows again.
#[inline(never)]
fn release_stack_below_here() {
    const PAGE: usize = 4096;
    let marker = 0u8;
    let here = std::hint::black_box(&marker) as *const u8 as usize;
    // This function's own frame and what it calls stay: a page of margin below it.
    let top = (here & !(PAGE - 1)).saturating_sub(PAGE);
    let Some(bottom) = std::fs::read_to_string("/proc/self/maps")
        .ok()
        .and_then(|maps| {
            let line = maps.lines().find(|l| l.ends_with("[stack]"))?;
            usize::from_str_radix(line.split('-').next()?, 16).ok()
        })
    else {
        return;
    };
    if bottom < top {
        // SAFETY: the range lies within this thread's stack mapping and below every live
        // frame; MADV_DONTNEED on private anonymous memory only drops pages.
        unsafe {
            libc::madvise(
                bottom as *mut libc::c_void,
                top - bottom,
                libc::MADV_DONTNEED,
            )
        };
    }
}

/// fork(2) with the child as pid 1 of a pid namespace of its own: a clone(2) without
/// CLONE_VM and without a stack of its own is what fork is (the child runs on a copy of this
/// stack), as bubblewrap does it. Every handler gets one, so that an execution's handler is
/// the init of the execution's processes itself (no process in between), and when it ends,
/// the kernel kills whatever is left in there.
///
/// # Safety
///
/// As for fork: the calling process must be single-threaded.
unsafe fn fork_into_pid_namespace() -> nix::Result<ForkResult> {
    let flags = (libc::CLONE_NEWPID | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: clone with these flags and no new stack duplicates the process as fork does;
    // the caller guarantees that no other thread exists.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    match pid {
        -1 => Err(nix::errno::Errno::last()),
        0 => Ok(ForkResult::Child),
        pid => Ok(ForkResult::Parent {
            child: Pid::from_raw(pid as i32),
        }),
    }
}

fn build_runner(spec: &InitSpec, userns: OwnedFd) -> io::Result<(UnixListener, Mapping)> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| io::Error::other(format!("making mounts private: {e}")))?;
    let (root, mapping) = rootfs::build(spec, Some(&userns))?;
    // Bound before the pivot, so that the socket lives at a stable host path.
    let socket = spec.socket_path();
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    rootfs::pivot(&root)?;
    nix::unistd::sethostname(&spec.hostname).map_err(io::Error::other)?;
    rootfs::loopback_up()?;
    enter_user_namespace(userns)?;
    // Nothing in the runner may ptrace or read the memory of runner-init and its handlers
    // (an execution's own processes stay debuggable).
    nix::sys::prctl::set_dumpable(false)?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    Ok((listener, mapping))
}

/// Becomes root of the runner's user namespace (`runner_userns`), whose ids map to an
/// unprivileged host range. Everything was mounted before, by real root: the mounts, and
/// the namespaces made so far, stay owned by the host's user namespace, so nothing in the
/// runner can ever change them, and files the runner creates belong to host ids of its own
/// range. (Host root holds CAP_SYS_ADMIN in every namespace below the host's, which
/// `setns` asks for; it gives this process all capabilities in there, and none outside.)
fn enter_user_namespace(userns: OwnedFd) -> io::Result<()> {
    nix::sched::setns(&userns, CloneFlags::CLONE_NEWUSER)
        .map_err(|e| io::Error::other(format!("entering the runner's user namespace: {e}")))?;
    drop(userns);
    nix::unistd::setgroups(&[]).map_err(io::Error::other)?;
    let root = Gid::from_raw(0);
    nix::unistd::setresgid(root, root, root).map_err(io::Error::other)?;
    nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
        .map_err(io::Error::other)?;
    Ok(())
}

/// Takes the host ids `id` (the runner's base), keeping the capabilities this process has.
fn become_owner(id: u32) -> io::Result<()> {
    let keep = caps::read(None, caps::CapSet::Permitted).map_err(io::Error::other)?;
    nix::sys::prctl::set_keepcaps(true).map_err(io::Error::other)?;
    nix::unistd::setgroups(&[]).map_err(io::Error::other)?;
    let gid = Gid::from_raw(id);
    nix::unistd::setresgid(gid, gid, gid).map_err(io::Error::other)?;
    let uid = Uid::from_raw(id);
    nix::unistd::setresuid(uid, uid, uid).map_err(io::Error::other)?;
    caps::set(None, caps::CapSet::Effective, &keep).map_err(io::Error::other)?;
    nix::sys::prctl::set_keepcaps(false).map_err(io::Error::other)?;
    Ok(())
}

fn handle(spec: &InitSpec, filters: &Filters, stream: &UnixStream) -> io::Result<()> {
    // SAFETY: restoring the default in a single-threaded child, so that waitpid works.
    unsafe {
        let _ = signal(Signal::SIGCHLD, SigHandler::SigDfl);
    }
    let Some((request, fds)) = recv_frame::<Request>(stream)? else {
        return Ok(());
    };
    let reply = |r: Response| send_frame(stream, &r, &[]);
    match request {
        Request::Ping => reply(Response::Pong {
            runner_id: spec.runner_id.clone(),
        }),
        Request::Exec(request) => exec(
            &ExecContext {
                spec,
                filters,
                request: &request,
            },
            stream,
            fds,
        ),
        Request::ListFiles {
            path,
            recursive,
            privileged,
        } => {
            if !privileged {
                become_user(spec)?;
            }
            // Listed from the workspace, as the reference's `ls` runs there: link targets
            // such as /proc/self/cwd then read as they would for the runner's programs.
            let _ = nix::unistd::chdir(WORKSPACE);
            reply(match fileops::list(&path, recursive) {
                Ok(files) => Response::Files(files),
                Err(e) => Response::Error(e),
            })
        }
        Request::PatchFiles { delete, copy } => {
            // Buffered: many small files arrive in one read. Nothing follows the contents
            // until this handler answers, so the buffer never holds what is not theirs.
            let contents = io::BufReader::with_capacity(64 * 1024, stream);
            reply(match fileops::patch(&delete, &copy, contents) {
                Ok(()) => Response::Done,
                Err(e) => Response::Error(e),
            })
        }
        Request::WriteFile { path } => {
            let Some(source) = fds.into_iter().next() else {
                return reply(Response::Error(BackendError::Failed(
                    "expected 1 fd".into(),
                )));
            };
            reply(match fileops::write_from(&path, source) {
                Ok(bytes) => Response::Written { bytes },
                Err(e) => Response::Error(e),
            })
        }
        Request::OpenFile { path, privileged } => {
            if !privileged {
                become_user(spec)?;
            }
            match fileops::open(&path) {
                Ok((file, size)) => {
                    send_frame(stream, &Response::Opened { size }, &[file.as_raw_fd()])
                }
                Err(e) => reply(Response::Error(e)),
            }
        }
    }
}

fn become_user(spec: &InitSpec) -> io::Result<()> {
    nix::unistd::setgroups(&[]).map_err(io::Error::other)?;
    nix::unistd::setgid(Gid::from_raw(spec.user_gid)).map_err(io::Error::other)?;
    nix::unistd::setuid(Uid::from_raw(spec.user_uid)).map_err(io::Error::other)?;
    Ok(())
}

/// Runs one execution and reports its end; a hang-up of the connection kills it.
/// What every process of one execution needs to know.
struct ExecContext<'a> {
    spec: &'a InitSpec,
    filters: &'a Filters,
    request: &'a ExecRequest,
}

fn exec(ctx: &ExecContext, stream: &UnixStream, fds: Vec<OwnedFd>) -> io::Result<()> {
    if fds.len() != 3 {
        return send_frame(
            stream,
            &Response::Error(BackendError::Failed("expected 3 fds".into())),
            &[],
        );
    }
    // This handler is pid 1 of a pid namespace of its own (runner-init cloned it into one):
    // everything the execution starts lives there. The handler reaps it all, and kills what
    // is left when the command ends, before it reports the end; and should the handler
    // itself die, the kernel kills every process in there (setsid'd and double-forked
    // daemons included).
    let request = ctx.request;
    let argv = shell_argv(&request.command);
    let envp = environment_for(
        request.privileged,
        &ctx.spec.image_env,
        &request.environment,
        request.tty,
    );
    // SIGCHLD, blocked, arrives on a signalfd: one poll waits for the client's hang-up and
    // for children. (The command unblocks every signal before it execs.)
    let mut sigchld = SigSet::empty();
    sigchld.add(Signal::SIGCHLD);
    sigchld.thread_block().map_err(io::Error::other)?;
    let children = SignalFd::with_flags(&sigchld, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(io::Error::other)?;
    let command = match spawn_command(ctx, &fds, &argv, &envp) {
        Ok(command) => command,
        Err(e) => {
            // Most likely the runner's pids limit.
            let _ = nix::unistd::write(
                &fds[2],
                format!("trident: cannot start the command: clone: {e}\n").as_bytes(),
            );
            return report_failed_start(stream);
        }
    };
    // The OOM killer's first choice, before runner-init and its handlers: when the runner
    // runs out of memory, it is the execution's processes that go and the runner lives on.
    if let Err(e) = raise_oom_score(&command) {
        let _ = nix::unistd::write(
            &fds[2],
            format!("trident: cannot start the command: oom_score_adj: {e}\n").as_bytes(),
        );
        kill_all();
        return report_failed_start(stream);
    }
    let command = command.pid;
    // Only the command may hold the streams, so that they end when it and its children do.
    drop(fds);
    if let Err(e) = send_frame(stream, &Response::Started, &[]) {
        kill_all();
        return Err(e);
    }
    let mut buf = [0u8; 64];
    loop {
        let mut polls = [
            PollFd::new(stream.as_fd(), PollFlags::POLLIN),
            PollFd::new(children.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut polls, PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                kill_all();
                return Err(e.into());
            }
            Ok(_) => {}
        }
        if polls[1].any().unwrap_or(false) {
            while let Ok(Some(_)) = children.read_signal() {}
            if let Some(end) = reap(command) {
                if end.others_left {
                    kill_all();
                }
                return send_frame(stream, &Response::Exited { code: end.code }, &[]);
            }
        }
        if polls[0].any().unwrap_or(false) {
            // Any byte or the end of the stream means: stop.
            let _ = (&*stream).read(&mut buf);
            kill_all();
            return Ok(());
        }
    }
}

/// A command that could not start ends as one whose exec failed would: it started, said
/// why on its stderr, and exited with 127.
fn report_failed_start(stream: &UnixStream) -> io::Result<()> {
    send_frame(stream, &Response::Started, &[])?;
    send_frame(stream, &Response::Exited { code: 127 }, &[])
}

/// How the command ended, seen by its handler.
struct CommandEnd {
    /// Its exit status, 128 + the signal's number for a signal.
    code: u8,
    /// Whether any other process of the execution still lives (children of the command
    /// become the handler's when their parent ends, so these are the handler's children).
    others_left: bool,
}

/// Reaps every child that has ended; how the command ended once it is among them.
fn reap(command: Pid) -> Option<CommandEnd> {
    let mut code = None;
    loop {
        let others_left = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, status)) if pid == command => {
                code = Some(status as u8);
                continue;
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == command => {
                code = Some(128u8.wrapping_add(sig as u8));
                continue;
            }
            Ok(WaitStatus::StillAlive) => true,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            // ECHILD: the handler has no child left. Every process of the pid namespace
            // descends from the handler (nothing of the runner joins it with setns), so
            // the namespace holds the handler alone.
            Err(_) => false,
        };
        return code.map(|code| CommandEnd { code, others_left });
    }
}

/// As pid 1 of the execution's pid namespace: kills every other process in there and reaps
/// them, so that nothing of the execution is left when its end is reported.
fn kill_all() {
    let _ = nix::sys::signal::kill(Pid::from_raw(-1), Signal::SIGKILL);
    loop {
        match waitpid(None, None) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        }
    }
}

/// Leaves a forked child at once, without running destructors or exit handlers that belong
/// to the process it was copied from.
fn leave(code: i32) -> ! {
    // SAFETY: _exit(2) takes an int and never returns.
    unsafe { libc::_exit(code) }
}

fn shell_argv(command: &str) -> Vec<CString> {
    let shell = if Path::new("/bin/bash").exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    };
    [shell, "-c", command]
        .iter()
        .map(|s| CString::new(s.replace('\0', "")).expect("NULs removed"))
        .collect()
}

/// The environment of an execution: trident's defaults (or, for an image with an `Env`,
/// that environment over PATH, HOME, USER and LOGNAME defaults, as Docker fills in PATH and
/// HOME), then `extra` (CODEOCEAN=true and the client's variables) on top.
fn environment_for(
    privileged: bool,
    image_env: &[String],
    extra: &[(String, String)],
    tty: bool,
) -> Vec<CString> {
    let (user, home) = if privileged {
        ("root", "/root")
    } else {
        (USER_NAME, WORKSPACE)
    };
    let mut vars: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOME".into(), home.into()),
        ("USER".into(), user.into()),
        ("LOGNAME".into(), user.into()),
    ];
    if image_env.is_empty() {
        vars.push(("LANG".into(), "C.UTF-8".into()));
    }
    if tty {
        vars.push(("TERM".into(), "xterm".into()));
    }
    // The image's entries are the image maker's: one without `=` or with an empty name is
    // skipped, as a shell would never see it either.
    let image = image_env
        .iter()
        .filter_map(|entry| entry.split_once('='))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()));
    let extra = extra.iter().cloned();
    for (k, v) in image.chain(extra) {
        vars.retain(|(existing, _)| *existing != k);
        vars.push((k, v));
    }
    vars.into_iter()
        .filter_map(|(k, v)| CString::new(format!("{k}={v}")).ok())
        .collect()
}

/// The stack the command's process runs on until it execs (it calls little: the confinement
/// steps, and an error message when one fails).
const COMMAND_STACK_BYTES: usize = 256 * 1024;

/// The command's process, by its pid in the handler's pid namespace (for waitpid) and in
/// the one of the runner's /proc (for its files there).
struct Command {
    pid: Pid,
    proc_pid: i32,
}

/// What the command's process reads until it execs, and the one thing it reports back.
struct CommandStart<'a> {
    ctx: &'a ExecContext<'a>,
    fds: &'a [OwnedFd],
    argv: &'a [CString],
    envp: &'a [CString],
    /// Written by the child before it execs: its pid as the runner's /proc names it.
    proc_pid: std::sync::atomic::AtomicI32,
    /// The write end of a close-on-exec pipe the child holds until its exec is through.
    exec_done: RawFd,
}

/// Starts the command the way posix_spawn does: `clone(CLONE_VM | CLONE_VFORK)`, so that the
/// child runs on this handler's memory until it execs, with no copy of the page tables, no
/// copy-on-write faults and no copied address space to tear down at exec (the handler
/// sleeps meanwhile). Hand-written because the child must run trident's own confinement
/// steps between clone and exec, which no spawn API allows. Returns once the command runs
/// (or failed to start: it then exits with 127 and says why on its stderr).
fn spawn_command(
    ctx: &ExecContext,
    fds: &[OwnedFd],
    argv: &[CString],
    envp: &[CString],
) -> io::Result<Command> {
    let (exec_wait, exec_done) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let start = CommandStart {
        ctx,
        fds,
        argv,
        envp,
        proc_pid: std::sync::atomic::AtomicI32::new(0),
        exec_done: exec_done.as_raw_fd(),
    };
    let mut stack: Vec<u8> = Vec::with_capacity(COMMAND_STACK_BYTES);
    // The stack grows down from its end, aligned to 16 bytes as the ABIs want it.
    let top = (stack.as_mut_ptr() as usize + COMMAND_STACK_BYTES) & !15;
    extern "C" fn command_main(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the `CommandStart` of `spawn_command`, alive until this process
        // execs or exits (CLONE_VFORK suspends the handler until then).
        let start = unsafe { &*(arg as *const CommandStart) };
        start_command(start)
    }
    let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD;
    // SAFETY: the child gets a stack of its own and runs `command_main` only, which execs or
    // _exits; the handler is single-threaded and blocked in clone until then, so nothing
    // touches the shared memory concurrently.
    let pid = unsafe {
        libc::clone(
            command_main,
            top as *mut libc::c_void,
            flags,
            &start as *const CommandStart as *mut libc::c_void,
        )
    };
    if pid == -1 {
        return Err(io::Error::last_os_error());
    }
    drop(stack);
    // CLONE_VFORK wakes the handler as soon as the child has left this memory, a moment
    // before the exec has put the new program's memory and credentials in place (and with
    // them, the owner of its /proc files). The pipe's end closes later in the exec: once it
    // reads as closed, the command runs as itself (or failed and exited).
    drop(exec_done);
    let mut byte = [0u8; 1];
    while let Err(nix::errno::Errno::EINTR) = nix::unistd::read(exec_wait.as_raw_fd(), &mut byte) {}
    Ok(Command {
        pid: Pid::from_raw(pid),
        proc_pid: start.proc_pid.load(std::sync::atomic::Ordering::Acquire),
    })
}

/// Raises the command's `oom_score_adj` to the highest, from the handler, once the command
/// runs: its process is dumpable then (exec made it so), so its /proc files belong to its
/// own user, whom root in the runner may write for. (The command cannot do it itself before
/// exec without making itself, and the memory it shares with the handler, dumpable while it
/// still holds every capability.) A command that forks within the first microseconds gives
/// those children the runner's default score: at worst the OOM killer then weighs them
/// against runner-init by size alone.
fn raise_oom_score(command: &Command) -> io::Result<()> {
    if command.proc_pid <= 0 {
        // The child failed before it knew its pid: it reported that and exited.
        return Ok(());
    }
    let path = format!("/proc/{}/oom_score_adj", command.proc_pid);
    // The pipe says the exec is past the point where the old memory is gone, not that it is
    // through: until its new credentials are in place, the file may still belong to the
    // host's root (seen on 6.1 and 6.12 guests whose lowers are not idmapped). A process
    // that dropped its memory on the way out looks the same. Hence EACCES means: gone, or
    // wait a moment (with a bound, so that a genuine refusal is reported).
    let mut pause = std::time::Duration::from_micros(50);
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match std::fs::write(&path, EXECUTION_OOM_SCORE_ADJ) {
            // Already gone (a quick command, or one that could not start): nothing to raise.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ESRCH) | Some(libc::ENOENT)) => {
                return Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                if is_exiting(command.proc_pid) {
                    return Ok(());
                }
                if std::time::Instant::now() >= give_up {
                    return Err(e);
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Whether the process `proc_pid` (of the runner's /proc) is exiting or has exited: the
/// kernel's PF_EXITING in the flags of its `stat`, or no `stat` any more.
fn is_exiting(proc_pid: i32) -> bool {
    const PF_EXITING: u64 = 0x4;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{proc_pid}/stat")) else {
        return true;
    };
    // After the command name in parentheses: state, ppid, pgrp, session, tty, tpgid, flags.
    let flags = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(6))
        .and_then(|flags| flags.parse::<u64>().ok());
    flags.is_some_and(|flags| flags & PF_EXITING != 0)
}

/// The command's process, from clone to exec. It shares the handler's memory (see
/// `spawn_command`): it must not return, and changes nothing the handler reads after it.
fn start_command(start: &CommandStart) -> ! {
    let CommandStart {
        ctx,
        fds,
        argv,
        envp,
        proc_pid,
        exec_done,
    } = start;
    let ExecContext {
        spec,
        filters,
        request,
    } = ctx;
    let (privileged, tty) = (request.privileged, request.tty);
    let fail = |what: &str| -> ! {
        let error = io::Error::last_os_error();
        // Stderr is the fd the execution was given once dup2 ran (and the only one left
        // after close_range).
        let _ = nix::unistd::write(
            std::io::stderr(),
            format!("trident: cannot start the command: {what}: {error}\n").as_bytes(),
        );
        leave(127)
    };
    // Its pid as the runner's /proc shows it (the proc mount belongs to runner-init's pid
    // namespace, not to the handler's), for the handler.
    match nix::fcntl::readlink("/proc/self")
        .ok()
        .and_then(|name| name.to_str()?.parse().ok())
    {
        Some(pid) => proc_pid.store(pid, std::sync::atomic::Ordering::Release),
        None => fail("reading /proc/self"),
    }
    let _ = nix::unistd::setsid();
    for (i, fd) in fds.iter().enumerate() {
        if nix::unistd::dup2(fd.as_raw_fd(), i as RawFd).is_err() {
            fail("dup2");
        }
    }
    if tty && rustix::process::ioctl_tiocsctty(std::io::stdin()).is_err() {
        fail("controlling terminal");
    }
    // Every fd from 3 up but the exec-done pipe (close-on-exec) is closed.
    let done = *exec_done as u32;
    // SAFETY: this process owns those fds and holds no Rust value over one of them that it
    // uses afterwards (it execs or exits next).
    let closed = unsafe {
        (done <= 3 || libc::syscall(libc::SYS_close_range, 3u32, done - 1, 0u32) == 0)
            && libc::syscall(libc::SYS_close_range, done + 1, u32::MAX, 0u32) == 0
    };
    if !closed {
        fail("close_range");
    }
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
    for sig in [
        Signal::SIGPIPE,
        Signal::SIGCHLD,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGTERM,
    ] {
        // SAFETY: restoring default dispositions in a single-threaded child about to exec.
        let _ = unsafe { signal(sig, SigHandler::SigDfl) };
    }
    if nix::unistd::chdir(WORKSPACE).is_err() {
        let _ = nix::unistd::chdir("/");
    }
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    if let Err(e) = confine::confine(filters, privileged, || become_user(spec)) {
        let message = format!("trident: cannot confine the command: {e}\n");
        let _ = nix::unistd::write(std::io::stderr(), message.as_bytes());
        leave(127)
    }
    let _ = nix::unistd::execve(&argv[0], argv, envp);
    fail("exec")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(privileged: bool, image: &[&str], extra: &[(&str, &str)]) -> Vec<String> {
        let image: Vec<String> = image.iter().map(|s| s.to_string()).collect();
        let extra: Vec<(String, String)> = extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        environment_for(privileged, &image, &extra, false)
            .into_iter()
            .map(|c| c.into_string().unwrap())
            .collect()
    }

    #[test]
    fn without_an_image_env_executions_get_the_defaults() {
        let vars = env(false, &[], &[("CODEOCEAN", "true")]);
        assert!(vars.contains(&"LANG=C.UTF-8".to_string()));
        assert!(vars.contains(&"HOME=/workspace".to_string()));
        assert!(vars.contains(&"USER=user".to_string()));
        assert!(vars.contains(&"CODEOCEAN=true".to_string()));
        assert!(vars.iter().any(|v| v.starts_with("PATH=/usr/local/sbin:")));
    }

    #[test]
    fn the_image_env_is_the_base_and_the_client_wins() {
        let vars = env(
            true,
            &[
                "PATH=/opt/java/bin:/usr/bin",
                "JAVA_HOME=/opt/java",
                "LANG=de_DE.UTF-8",
                "CODEOCEAN=false",
                "NOEQUALS",
                "=empty",
                "EMPTY=",
            ],
            &[("CODEOCEAN", "true"), ("JAVA_HOME", "/client/java")],
        );
        let find = |k: &str| {
            let all: Vec<&String> = vars
                .iter()
                .filter(|v| v.starts_with(&format!("{k}=")))
                .collect();
            assert!(all.len() <= 1, "{k} twice: {vars:?}");
            all.first().map(|v| v[k.len() + 1..].to_string())
        };
        assert_eq!(find("PATH").as_deref(), Some("/opt/java/bin:/usr/bin"));
        assert_eq!(find("JAVA_HOME").as_deref(), Some("/client/java"));
        assert_eq!(find("LANG").as_deref(), Some("de_DE.UTF-8"));
        assert_eq!(find("CODEOCEAN").as_deref(), Some("true"));
        assert_eq!(find("HOME").as_deref(), Some("/root"));
        assert_eq!(find("EMPTY").as_deref(), Some(""));
        assert!(
            !vars.iter().any(|v| v == "NOEQUALS" || v.starts_with('=')),
            "{vars:?}"
        );
        // No LANG default when the image has an Env without one (as Docker).
        let vars = env(false, &["A=b"], &[]);
        assert!(!vars.iter().any(|v| v.starts_with("LANG=")), "{vars:?}");
        assert!(vars.iter().any(|v| v.starts_with("PATH=")), "{vars:?}");
    }
}
