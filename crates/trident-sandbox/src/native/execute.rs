//! Executions: stdin and stdout share a terminal (as the reference does), stderr stays a
//! pipe so that clients can tell the two apart; the end comes over the control socket, and
//! closing that connection kills the execution.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use async_trait::async_trait;
use futures_util::StreamExt;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::io::ReaderStream;
use trident_core::backend::{
    BackendError, BackendExecution, BackendResult, ExecSpec, ExecutionControl, ExitOutcome, Output,
};

use super::{failed, NativeSandbox};
use crate::fdio::FdStream;
use crate::protocol::{encode_frame, ExecRequest, Request, Response, MAX_FRAME};

/// Kills an execution by dropping its half of the connection: the handler in the runner
/// sees the hang-up and kills the execution's pid namespace.
struct Control {
    kill: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

#[async_trait]
impl ExecutionControl for Control {
    async fn kill(&self) -> BackendResult<()> {
        if let Some(kill) = self.kill.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = kill.send(());
        }
        Ok(())
    }
}

/// The two ends of a new pty.
struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
}

/// Opens a pty whose ends are close-on-exec from the moment they exist. The server starts
/// runner-inits (and `ip`, `nft`) from other threads at any moment: an end set close-on-exec
/// only after `openpty` returned could be inherited by one of them in between, which then
/// holds the pty open for as long as it lives, and the execution's output never ends.
fn open_pty() -> io::Result<Pty> {
    use nix::fcntl::OFlag;
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    nix::pty::unlockpt(&master)?;
    // TIOCGPTPEER opens the slave from the master itself (no lookup of its path), with the
    // flags given.
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new fd or -1.
    let slave = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if slave < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Pty {
        // SAFETY: PtyMaster owns its fd; it is handed over whole.
        master: unsafe { OwnedFd::from_raw_fd(master.into_raw_fd()) },
        // SAFETY: a fresh fd of ours.
        slave: unsafe { OwnedFd::from_raw_fd(slave) },
    })
}

impl NativeSandbox {
    pub(super) async fn start_execution(&self, spec: ExecSpec) -> BackendResult<BackendExecution> {
        if self.destroyed.load(Ordering::Acquire) {
            return Err(BackendError::Failed("the runner is gone".into()));
        }
        let pty = open_pty().map_err(failed)?;
        let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(failed)?;
        let oom_before = self.cgroups.oom_kills(&self.cgroup);
        let socket = self.socket.clone();
        let request = Request::Exec(ExecRequest {
            command: spec.command,
            privileged: spec.privileged,
            environment: spec.environment,
            tty: true,
        });
        // On the runtime itself, not on a blocking thread: connecting to a local socket and
        // sending a small frame with the three fds never block, and the answer is awaited;
        // the two hand-offs to and from a pool thread cost more than all of that.
        let mut stream = tokio::net::UnixStream::connect(&socket)
            .await
            .map_err(|e| BackendError::Failed(format!("starting the execution: {e}")))?;
        let frame = encode_frame(&request).map_err(failed)?;
        let fds = [
            pty.slave.as_raw_fd(),
            pty.slave.as_raw_fd(),
            err_w.as_raw_fd(),
        ];
        let started = async {
            let sent = stream
                .async_io(tokio::io::Interest::WRITABLE, || {
                    let cmsg = [ControlMessage::ScmRights(&fds)];
                    sendmsg::<()>(
                        stream.as_raw_fd(),
                        &[IoSlice::new(&frame)],
                        &cmsg,
                        MsgFlags::MSG_NOSIGNAL,
                        None,
                    )
                    .map_err(std::io::Error::from)
                })
                .await?;
            stream.write_all(&frame[sent..]).await?;
            std::io::Result::Ok(())
        }
        .await;
        // Our copies must close now, or the streams would never reach end-of-file.
        drop(pty.slave);
        drop(err_w);
        let answer = match started {
            Ok(()) => read_frame(&mut stream).await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(Response::Started) => {}
            Ok(other) => {
                return Err(BackendError::Failed(format!(
                    "starting the execution: {other:?}"
                )))
            }
            Err(e) => return Err(BackendError::Failed(format!("starting the execution: {e}"))),
        }

        let master_for_stdin = pty.master.try_clone().map_err(failed)?;
        let stdin = FdStream::new(master_for_stdin, true).map_err(failed)?;
        let stdout = ReaderStream::new(FdStream::new(pty.master, true).map_err(failed)?)
            .map(|chunk| chunk.map(Output::Stdout));
        let stderr = ReaderStream::new(FdStream::new(err_r, false).map_err(failed)?)
            .map(|chunk| chunk.map(Output::Stderr));
        let output = Box::pin(futures_util::stream::select(stdout, stderr));

        let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
        let cgroups = self.cgroups.clone();
        let cgroup = self.cgroup.clone();
        let exit = Box::pin(async move {
            tokio::select! {
                // As the reference: a process the OOM killer took while the runner lives on
                // just ends the execution with its code (137); only a runner whose own
                // processes died of memory (its control connection broke) is an OOM error.
                frame = read_frame(&mut stream) => match frame {
                    Ok(Response::Exited { code }) => ExitOutcome::Exited(code),
                    Ok(other) => ExitOutcome::Failed(format!("{other:?}")),
                    Err(_) if cgroups.oom_kills(&cgroup) > oom_before => ExitOutcome::OomKilled,
                    Err(e) => ExitOutcome::Failed(e.to_string()),
                },
                // Dropping the connection tells the handler to kill the execution.
                _ = kill_rx => ExitOutcome::Failed("killed".into()),
            }
        });
        Ok(BackendExecution {
            stdin: Box::new(stdin),
            output,
            exit,
            control: Box::new(Control {
                kill: Mutex::new(Some(kill_tx)),
            }),
        })
    }
}

async fn read_frame(stream: &mut tokio::net::UnixStream) -> std::io::Result<Response> {
    let len = stream.read_u32_le().await? as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other("control frame too large"));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    serde_json::from_slice(&body).map_err(std::io::Error::other)
}
