//! The control protocol between the server and a runner-init, over the runner's Unix socket.
//!
//! One connection carries one request. A frame is a little-endian u32 length and a JSON body;
//! file descriptors (the standard streams of an execution, an opened file) travel beside the
//! first frame as SCM_RIGHTS. Closing the connection of an execution kills it.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use trident_core::backend::BackendError;
use trident_core::model::FileHeader;

/// Largest frame accepted: a recursive listing of a big tree, or a PATCH of many files.
pub const MAX_FRAME: usize = 512 * 1024 * 1024;

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Runs a command; fds: stdin, stdout, stderr.
    Exec(ExecRequest),
    ListFiles {
        path: String,
        recursive: bool,
        privileged: bool,
    },
    /// Deletes, then writes files. Their contents follow the frame on the connection, raw,
    /// one after the other, `bytes` each: megabytes of file need no JSON string escaped,
    /// parsed and base64-decoded on the way.
    PatchFiles {
        delete: Vec<String>,
        copy: Vec<CopyHeader>,
    },
    /// Writes a file (root-owned, 0744, as a copy is) from what comes through the fd sent
    /// with it, until its end; answered with `Written`.
    WriteFile {
        path: String,
    },
    /// Opens a regular file for reading; answered with `Opened` and the fd.
    OpenFile {
        path: String,
        privileged: bool,
    },
    Ping,
}

/// One file of a `PatchFiles`: where it goes and how many of the bytes after the frame are
/// its content (a path ending in `/` is a directory, with none).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopyHeader {
    pub path: String,
    pub bytes: u64,
}

/// What to run, and as whom.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecRequest {
    pub command: String,
    pub privileged: bool,
    pub environment: Vec<(String, String)>,
    /// stdin and stdout on a terminal (stderr always a pipe).
    pub tty: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    /// The execution's process runs.
    Started,
    /// The execution ended; `code` follows the shell convention (128 + signal).
    Exited {
        code: u8,
    },
    Files(Vec<FileHeader>),
    Done,
    Opened {
        size: u64,
    },
    Written {
        bytes: u64,
    },
    /// Names the runner, so that the server can tell its own runner from a stale socket.
    Pong {
        runner_id: String,
    },
    /// The request failed, as the core's own error type says.
    Error(BackendError),
}

/// One frame: the length, then the JSON body.
pub fn encode_frame<T: Serialize>(message: &T) -> io::Result<Vec<u8>> {
    let body = serde_json::to_vec(message).map_err(io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Writes one frame, passing `fds` with its first byte.
pub fn send_frame<T: Serialize>(stream: &UnixStream, message: &T, fds: &[RawFd]) -> io::Result<()> {
    let frame = encode_frame(message)?;
    let mut sent = 0;
    if !fds.is_empty() {
        let cmsg = [ControlMessage::ScmRights(fds)];
        sent = loop {
            match sendmsg::<()>(
                stream.as_raw_fd(),
                &[IoSlice::new(&frame)],
                &cmsg,
                MsgFlags::empty(),
                None,
            ) {
                Ok(n) => break n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
    }
    (&*stream).write_all(&frame[sent..])
}

/// Reads one frame and any fds that came with it. `Ok(None)` at a clean end of stream.
pub fn recv_frame<T: for<'de> Deserialize<'de>>(
    stream: &UnixStream,
) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
    let mut header = [0u8; 4];
    let mut fds = Vec::new();
    // The first read goes through recvmsg so that fds sent with the frame are picked up.
    let mut got = 0;
    while got == 0 {
        let mut cmsg_space = nix::cmsg_space!([RawFd; 4]);
        let mut iov = [IoSliceMut::new(&mut header)];
        let msg = match recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for cmsg in msg.cmsgs().map_err(io::Error::other)? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                // SAFETY: the kernel just installed these descriptors for us; we own them.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if msg.bytes == 0 {
            return Ok(None);
        }
        got = msg.bytes;
    }
    (&*stream).read_exact(&mut header[got..])?;
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control frame too large",
        ));
    }
    let mut body = vec![0u8; len];
    (&*stream).read_exact(&mut body)?;
    let message = serde_json::from_slice(&body).map_err(io::Error::other)?;
    Ok(Some((message, fds)))
}
