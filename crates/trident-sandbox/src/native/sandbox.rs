//! One runner of the native sandbox, as the server holds it: requests over its control
//! socket (one connection each), and its destruction through its cgroup.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trident_core::backend::{
    BackendError, BackendExecution, BackendResult, ExecSpec, FileDownload, Sandbox,
};
use trident_core::model::{FileCopy, FileHeader, MappedPort};

use super::leases::Leases;
use super::spawn::RunnerInit;
use super::{failed, NativeBackend};
use crate::cgroup::Cgroups;
use crate::fdio::FdStream;
use crate::network::{self, RunnerNetwork};
use crate::protocol::{
    encode_frame, recv_frame, send_frame, CopyHeader, Request, Response, MAX_FRAME,
};

pub struct NativeSandbox {
    /// Its network, if it has one.
    network: Option<RunnerNetwork>,
    advertise: String,
    pub(super) cgroups: Cgroups,
    pub(super) cgroup: String,
    pub(super) socket: PathBuf,
    dir: PathBuf,
    /// Its runner-init, when this server started it (an adopted one is no child of ours).
    child: tokio::sync::Mutex<Option<RunnerInit>>,
    pub(super) destroyed: AtomicBool,
    /// Room for files in the runner (its writable tmpfs), if known.
    writable_bytes: Option<u64>,
    /// The id range, host ports and known id it holds: given back when it is destroyed (or
    /// dropped, whichever comes first).
    leases: Mutex<Option<Leases>>,
}

/// Up to this many bytes of a request (its frame and what follows it) are gathered into one
/// write; larger contents go out as they are.
const COALESCED_BYTES: usize = 64 * 1024;

impl NativeSandbox {
    pub(super) fn new(
        backend: &NativeBackend,
        id: &str,
        network: Option<RunnerNetwork>,
        writable_bytes: Option<u64>,
        child: Option<RunnerInit>,
        leases: Leases,
    ) -> NativeSandbox {
        let dir = backend.runners_dir.join(id);
        NativeSandbox {
            network,
            advertise: backend
                .config
                .network
                .as_ref()
                .map(|n| n.advertise.clone())
                .unwrap_or_default(),
            cgroups: backend.cgroups.clone(),
            cgroup: format!("{}/{id}", backend.cgroup_parent),
            socket: dir.join("control.sock"),
            dir,
            child: tokio::sync::Mutex::new(child),
            destroyed: AtomicBool::new(false),
            writable_bytes,
            leases: Mutex::new(Some(leases)),
        }
    }

    pub(super) fn network(&self) -> Option<&RunnerNetwork> {
        self.network.as_ref()
    }

    /// One request, one answer, on a fresh connection, awaited on the runtime (a local
    /// connection and a small frame never block; a hop to a blocking thread and back would
    /// cost more than the work).
    pub(super) async fn call(&self, request: Request) -> BackendResult<(Response, Vec<OwnedFd>)> {
        self.call_with(request, &[]).await
    }

    /// [`call`](Self::call), with bytes that follow the request's frame (a copy's contents).
    async fn call_with(
        &self,
        request: Request,
        trailing: &[&[u8]],
    ) -> BackendResult<(Response, Vec<OwnedFd>)> {
        if self.destroyed.load(Ordering::Acquire) {
            return Err(BackendError::Failed("the runner is gone".into()));
        }
        let answer = async {
            let stream = tokio::net::UnixStream::connect(&self.socket).await?;
            // The frame and a copy's small contents leave in one write: the handler then
            // finds them all at once, instead of waking up for every file.
            let mut out = tokio::io::BufWriter::with_capacity(COALESCED_BYTES, stream);
            out.write_all(&encode_frame(&request)?).await?;
            for bytes in trailing {
                out.write_all(bytes).await?;
            }
            out.flush().await?;
            let mut stream = out.into_inner();
            recv_frame_async(&mut stream)
                .await?
                .ok_or_else(|| std::io::Error::other("runner-init closed the connection"))
        }
        .await;
        answer.map_err(|e| BackendError::Failed(format!("runner control socket: {e}")))
    }

    /// Kills every process of the runner, removes its cgroup, directory and port mappings,
    /// and gives back what it held. Idempotent.
    ///
    /// A runner this server started is killed through its runner-init: every process of a
    /// runner lives in runner-init's pid namespace, and once pid 1 of it is reaped the kernel
    /// has killed and reaped all of them, so its cgroup is empty and goes at the first try.
    /// That costs no thread and a few cgroupfs operations, where the cgroup-wide kill
    /// (freeze, list, kill, thaw, list again, for each hierarchy's lock) cost milliseconds
    /// per runner when thousands go at once. An adopted runner (no child of this server), or
    /// a cgroup that is somehow still busy, gets that cgroup-wide kill.
    pub(super) async fn destroy_now(&self) -> BackendResult<()> {
        if self.destroyed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let mut child = self.child.lock().await.take();
        let mut emptied = false;
        if let Some(init) = &mut child {
            emptied = init.kill().is_ok() && init.wait().await.is_ok();
        }
        let cgroups = self.cgroups.clone();
        let cgroup = self.cgroup.clone();
        let dir = self.dir.clone();
        let network = self.network.clone();
        let cleaned = tokio::task::spawn_blocking(move || {
            if !(emptied && cgroups.remove_if_empty(&cgroup)) {
                cgroups.kill_all(&cgroup);
                // A dead but unreaped runner-init still pins its cgroup: reap it first.
                drop(child.map(|mut init| init.reap_blocking()));
                cgroups.remove(&cgroup);
            }
            if let Some(network) = &network {
                network::unmap_ports(network);
            }
            std::fs::remove_dir_all(&dir).or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })
        })
        .await
        .map_err(failed)?;
        // Given back last: nothing of the runner is left that its id or slot could meet.
        drop(self.leases.lock().unwrap_or_else(|p| p.into_inner()).take());
        cleaned.map_err(|e| BackendError::Failed(format!("removing the runner's directory: {e}")))
    }
}

/// `protocol::recv_frame` on the runtime: the first read through recvmsg, so that fds sent
/// with the frame (an opened file) are picked up. `Ok(None)` at a clean end of stream.
async fn recv_frame_async(
    stream: &mut tokio::net::UnixStream,
) -> std::io::Result<Option<(Response, Vec<OwnedFd>)>> {
    use std::os::fd::FromRawFd;
    let mut header = [0u8; 4];
    let (got, fds) = stream
        .async_io(tokio::io::Interest::READABLE, || {
            let mut cmsg_space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
            let mut iov = [std::io::IoSliceMut::new(&mut header)];
            let msg = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg_space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let mut fds = Vec::new();
            for cmsg in msg.cmsgs().map_err(std::io::Error::other)? {
                if let ControlMessageOwned::ScmRights(received) = cmsg {
                    // SAFETY: the kernel just installed these descriptors for us; we own them.
                    fds.extend(
                        received
                            .into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
            Ok((msg.bytes, fds))
        })
        .await?;
    if got == 0 {
        return Ok(None);
    }
    stream.read_exact(&mut header[got..]).await?;
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "control frame too large",
        ));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    let message = serde_json::from_slice(&body).map_err(std::io::Error::other)?;
    Ok(Some((message, fds)))
}

pub(super) fn unexpected(r: Response) -> BackendError {
    match r {
        Response::Error(e) => e,
        other => BackendError::Failed(format!("unexpected answer from runner-init: {other:?}")),
    }
}

#[async_trait]
impl Sandbox for NativeSandbox {
    fn writable_bytes(&self) -> Option<u64> {
        self.writable_bytes
    }

    fn mapped_ports(&self) -> Vec<MappedPort> {
        self.network
            .iter()
            .flat_map(|network| network.ports.iter())
            .map(|(inside, host)| MappedPort {
                exposed_port: *inside,
                host_address: format!("{}:{host}", self.advertise),
            })
            .collect()
    }

    async fn execute(&self, spec: ExecSpec) -> BackendResult<BackendExecution> {
        self.start_execution(spec).await
    }

    async fn list_files(
        &self,
        path: &str,
        recursive: bool,
        privileged: bool,
    ) -> BackendResult<Vec<FileHeader>> {
        let request = Request::ListFiles {
            path: path.to_string(),
            recursive,
            privileged,
        };
        match self.call(request).await?.0 {
            Response::Files(files) => Ok(files),
            other => Err(unexpected(other)),
        }
    }

    async fn patch_files(&self, delete: Vec<String>, copy: Vec<FileCopy>) -> BackendResult<()> {
        let headers = copy
            .iter()
            .map(|file| CopyHeader {
                path: file.path.clone(),
                bytes: file.content.len() as u64,
            })
            .collect();
        let contents: Vec<&[u8]> = copy.iter().map(|file| file.content.as_slice()).collect();
        let request = Request::PatchFiles {
            delete,
            copy: headers,
        };
        match self.call_with(request, &contents).await?.0 {
            Response::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn open_file(&self, path: &str, privileged: bool) -> BackendResult<FileDownload> {
        let request = Request::OpenFile {
            path: path.to_string(),
            privileged,
        };
        match self.call(request).await? {
            (Response::Opened { size }, mut fds) if fds.len() == 1 => {
                let file = std::fs::File::from(fds.remove(0));
                let content = tokio::fs::File::from_std(file).take(size);
                Ok(FileDownload {
                    size,
                    content: Box::new(content),
                })
            }
            (other, _) => Err(unexpected(other)),
        }
    }

    async fn write_file(
        &self,
        path: &str,
        mut content: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    ) -> BackendResult<u64> {
        if self.destroyed.load(Ordering::Acquire) {
            return Err(BackendError::Failed("the runner is gone".into()));
        }
        // The content flows through a pipe into a handler inside the runner, which writes
        // the file there: a chunk at a time, never whole in the server's memory.
        let (read_end, write_end) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(failed)?;
        let socket = self.socket.clone();
        let request = Request::WriteFile {
            path: path.to_string(),
        };
        let answer = tokio::task::spawn_blocking(move || {
            let stream = UnixStream::connect(&socket)?;
            send_frame(&stream, &request, &[read_end.as_raw_fd()])?;
            drop(read_end);
            recv_frame::<Response>(&stream)?
                .ok_or_else(|| std::io::Error::other("runner-init closed the connection"))
        });
        let mut sink = FdStream::new(write_end, false).map_err(failed)?;
        let copied = tokio::io::copy(&mut content, &mut sink).await;
        drop(sink); // the end of the file
        let answer = answer
            .await
            .map_err(failed)?
            .map_err(|e| BackendError::Failed(format!("runner control socket: {e}")))?;
        // The runner's word first: if it stopped early, that is why the copy broke off.
        match (answer.0, copied) {
            (Response::Written { bytes }, Ok(_)) => Ok(bytes),
            (Response::Written { .. }, Err(e)) => {
                Err(BackendError::CopyFailed(format!("{path}: {e}")))
            }
            (other, _) => Err(unexpected(other)),
        }
    }

    async fn destroy(&self) -> BackendResult<()> {
        self.destroy_now().await
    }
}
