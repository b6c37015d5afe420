//! The read-only lower layers of a runner's overlays (an image's layer directories, an image
//! directory, the host's system directories), mounted at short per-runner names and, where
//! the kernel and filesystem allow it, idmapped with the runner's id range.
//!
//! Without an idmap, the files of a lower keep their host owners (root is host id 0), which
//! the runner's user namespace does not map: inside they belong to the overflow id
//! (`nobody`), and even root in the runner cannot change them. An idmapped mount shifts
//! host ids 0..65536 of the lower onto the runner's own range (`uid_base..`), the range its
//! user namespace maps back to 0..65536: a root-owned file of the image is owned by root in
//! the runner, a file of uid 1000 by uid 1000, without copying or chowning anything.
//!
//! The mounts themselves stay read-only, nosuid and nodev; the overlays above them write to
//! the runner's tmpfs only.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use rustix::mount::{move_mount, open_tree, MoveMountFlags, OpenTreeFlags};

/// How the lowers of a runner were mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapping {
    /// Idmapped: the image's owners as the image has them.
    Idmapped,
    /// Plain read-only binds (the reason the kernel gave): files show as the overflow id.
    Plain(String),
}

/// `mount_setattr(2)` on a detached mount: `attr_set` and, with `MOUNT_ATTR_IDMAP`, the
/// user namespace whose id map the mount takes. (rustix has no wrapper for it.)
fn mount_setattr(mount: &OwnedFd, attr_set: u64, userns: Option<&OwnedFd>) -> io::Result<()> {
    // SAFETY: mount_attr is plain old data; all-zero is its "change nothing" value.
    let mut attr: libc::mount_attr = unsafe { std::mem::zeroed() };
    attr.attr_set = attr_set;
    if let Some(userns) = userns {
        attr.userns_fd = userns.as_raw_fd() as u64;
    }
    let empty = CString::default();
    // SAFETY: the fd is open for the whole call, the path is a valid NUL-terminated empty
    // string (AT_EMPTY_PATH: the fd itself), and attr is a live mount_attr of the size given.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mount.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Read-only, nosuid, nodev: what every lower is, idmapped or not.
const LOWER_ATTRS: u64 = libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;

/// A detached, idmapped, read-only clone of the mount at `source` (its top mount only, as
/// an overlay's lower never crosses into submounts anyway).
fn idmapped_clone(source: &Path, userns: &OwnedFd) -> io::Result<OwnedFd> {
    let tree = open_tree(
        rustix::fs::CWD,
        source,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )
    .map_err(|e| io::Error::other(format!("open_tree {}: {e}", source.display())))?;
    mount_setattr(&tree, LOWER_ATTRS | libc::MOUNT_ATTR_IDMAP, Some(userns))?;
    Ok(tree)
}

/// Mounts each `(source, target)` pair: `source` (a host path trident chose: a layer, the
/// image directory, a host system directory) read-only on `target` (an empty directory of
/// the runner's writable tmpfs). All idmapped with `userns` or, when the kernel or the
/// filesystem of any refuses (kernels before 5.12, filesystems without idmap support such
/// as tmpfs before 6.3, or no `userns`), all plain, so that a runner never mixes the two.
pub fn mount_lowers(pairs: &[(PathBuf, PathBuf)], userns: Option<&OwnedFd>) -> io::Result<Mapping> {
    let refused = match userns {
        None => "no user namespace for idmapped mounts could be made".to_string(),
        Some(userns) => {
            let clones: io::Result<Vec<OwnedFd>> = pairs
                .iter()
                .map(|(source, _)| {
                    idmapped_clone(source, userns).map_err(|e| {
                        io::Error::new(e.kind(), format!("idmapping {}: {e}", source.display()))
                    })
                })
                .collect();
            match clones {
                Ok(clones) => {
                    for (tree, (_, target)) in clones.iter().zip(pairs) {
                        move_mount(
                            tree.as_fd(),
                            "",
                            rustix::fs::CWD,
                            target,
                            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
                        )
                        .map_err(|e| {
                            io::Error::other(format!("move_mount {}: {e}", target.display()))
                        })?;
                    }
                    return Ok(Mapping::Idmapped);
                }
                Err(e) => e.to_string(),
            }
        }
    };
    for (source, target) in pairs {
        plain_bind(source, target)?;
    }
    Ok(Mapping::Plain(refused))
}

/// Today's way (and the fallback): a bind mount, made read-only, nosuid and nodev.
fn plain_bind(source: &Path, target: &Path) -> io::Result<()> {
    let what = |e: nix::Error| io::Error::other(format!("bind {}: {e}", source.display()));
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(what)?;
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(what)
}
