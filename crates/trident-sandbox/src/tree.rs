//! Working inside a directory tree that strangers made (an image's root filesystem, an
//! unpacked layer), as host root, without ever leaving it.
//!
//! An image may hold `etc -> /etc` or `etc/passwd -> /etc/shadow`: a path built by joining
//! strings would follow such links onto the host. Here every path is resolved by the kernel
//! *inside* the tree (`openat2` with `RESOLVE_IN_ROOT`: an absolute link means the tree's
//! root, `..` stops there, magic links are refused) or, for directories trident itself needs
//! (mount points, `/etc`), made real: a symlink or file in their place is replaced. Files
//! are written through directory fds, never through a name that could be swapped, and
//! mounts land on `/proc/self/fd/<fd>` of a directory opened that way.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// A directory tree, held open.
pub struct Tree {
    root: OwnedFd,
}

fn in_root() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS
}

fn err(what: impl std::fmt::Display, e: impl Into<io::Error>) -> io::Error {
    let e = e.into();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// The normal components of a relative path; `..` and absolute paths are refused (callers
/// name trident's own paths, never a client's).
fn parts(rel: &str) -> io::Result<Vec<&OsStr>> {
    Path::new(rel)
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .map(|c| match c {
            Component::Normal(name) => Ok(name),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{rel} is not a plain relative path"),
            )),
        })
        .collect()
}

impl Tree {
    /// Opens the tree at `path` (a path trident chose: the runner's root mount point).
    pub fn open(path: &Path) -> io::Result<Tree> {
        let root = rustix::fs::open(
            path,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| err(path.display(), e))?;
        Ok(Tree { root })
    }

    /// Opens `rel` as the tree's own programs would see it (links resolved inside the tree).
    pub fn resolve(&self, rel: &str, flags: OFlags) -> io::Result<OwnedFd> {
        // openat2 refuses O_NOCTTY beside O_PATH.
        let extra = if flags.contains(OFlags::PATH) {
            OFlags::CLOEXEC
        } else {
            OFlags::CLOEXEC | OFlags::NOCTTY
        };
        rustix::fs::openat2(&self.root, rel, flags | extra, Mode::empty(), in_root())
            .map_err(|e| err(format!("/{rel}"), e))
    }

    /// Reads a file of the tree (links resolved inside it); `None` if it is not there or
    /// not a regular file. At most `limit` bytes.
    pub fn read(&self, rel: &str, limit: u64) -> io::Result<Option<Vec<u8>>> {
        let opened = rustix::fs::openat2(
            &self.root,
            rel,
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::empty(),
            in_root(),
        );
        let fd = match opened {
            Ok(fd) => fd,
            // Missing, a link loop, a link to a magic link, a path through a file.
            Err(Errno::NOENT | Errno::LOOP | Errno::XDEV | Errno::NOTDIR) => return Ok(None),
            Err(e) => return Err(err(format!("/{rel}"), e)),
        };
        let stat = rustix::fs::fstat(&fd)?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Ok(None);
        }
        let mut bytes = Vec::new();
        std::fs::File::from(fd)
            .take(limit)
            .read_to_end(&mut bytes)?;
        Ok(Some(bytes))
    }

    /// Whether `rel` exists in the tree (links resolved inside it) and is not a directory.
    pub fn has_file(&self, rel: &str) -> bool {
        self.resolve(rel, OFlags::PATH)
            .and_then(|fd| Ok(rustix::fs::fstat(&fd)?))
            .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) != FileType::Directory)
    }

    /// Makes `rel` a real directory of the tree, every component of it: a missing one is
    /// made, a symlink or file in the way is removed first (this is the runner's own
    /// writable view of the image, never the image itself). The last one gets `mode`.
    /// Returns it opened.
    pub fn real_dir(&self, rel: &str, mode: u32) -> io::Result<OwnedFd> {
        let parts = parts(rel)?;
        let mut here = rustix::io::dup(&self.root)?;
        for (i, name) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let made = step_into(&here, name, if last { mode } else { 0o755 })
                .map_err(|e| err(format!("/{rel}"), e))?;
            here = made;
        }
        if parts.is_empty() {
            return Ok(here);
        }
        rustix::fs::fchmod(&here, Mode::from_raw_mode(mode))
            .map_err(|e| err(format!("/{rel}"), e))?;
        Ok(here)
    }
}

/// One level down into the real directory `name` of `dir`, made if needed.
fn step_into(dir: &OwnedFd, name: &OsStr, mode: u32) -> io::Result<OwnedFd> {
    let open = || {
        rustix::fs::openat(
            dir,
            name,
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
    };
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => Ok(open()?),
        Ok(_) => {
            rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
            make_dir(dir, name, mode)?;
            Ok(open()?)
        }
        Err(Errno::NOENT) => {
            make_dir(dir, name, mode)?;
            Ok(open()?)
        }
        Err(e) => Err(e.into()),
    }
}

fn make_dir(dir: &OwnedFd, name: &OsStr, mode: u32) -> io::Result<()> {
    match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(mode)) {
        Ok(()) | Err(Errno::EXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Replaces the file `name` in the directory `dir` by a fresh one with `content`, `mode`
/// and owner `owner` (a symlink in its place is removed, never followed).
pub fn replace_file(
    dir: &OwnedFd,
    name: &str,
    content: &[u8],
    mode: u32,
    owner: u32,
) -> io::Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => {}
        // A directory in the way.
        Err(Errno::ISDIR) => return Err(err(name, Errno::ISDIR)),
        Err(e) => return Err(err(name, e)),
    }
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )
    .map_err(|e| err(name, e))?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
    let id = Some(rustix::fs::Uid::from_raw(owner));
    let gid = Some(rustix::fs::Gid::from_raw(owner));
    rustix::fs::fchown(&fd, id, gid)?;
    std::fs::File::from(fd).write_all(content)
}

/// Removes the file `name` in `dir` if it is there (a symlink is removed, not followed).
pub fn remove_file(dir: &OwnedFd, name: &str) {
    let _ = rustix::fs::unlinkat(dir, name, AtFlags::empty());
}

/// Names of the entries of an opened directory.
pub fn entries(dir: &OwnedFd) -> io::Result<Vec<String>> {
    let fd = rustix::fs::openat(
        dir,
        ".",
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(&fd)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(String::from_utf8_lossy(name).into_owned());
        }
    }
    Ok(names)
}

/// `/proc/self/fd/<fd>`: a path for syscalls that take paths only (mount), naming exactly
/// the object the fd holds.
pub fn fd_path(fd: &impl AsFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn links_in_a_tree_never_lead_out_of_it() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "host secret").unwrap();
        let image = tempfile::tempdir().unwrap();
        let root = image.path();
        std::fs::create_dir(root.join("etc")).unwrap();
        // An absolute link to a host file, a relative one climbing out, a link to a
        // directory outside.
        symlink(outside.path().join("secret"), root.join("etc/passwd")).unwrap();
        symlink(
            "../../../../../../../../etc/hostname",
            root.join("etc/group"),
        )
        .unwrap();
        symlink(outside.path(), root.join("tmp")).unwrap();
        std::fs::write(root.join("etc/hostname"), "inside").unwrap();
        let tree = Tree::open(root).unwrap();
        let outside_mode = std::fs::metadata(outside.path())
            .unwrap()
            .permissions()
            .mode();

        // Reading follows links inside the tree only: the absolute one is the tree's own
        // path (missing), the climbing one stops at the tree's root.
        assert_eq!(tree.read("etc/passwd", 1024).unwrap(), None);
        assert_eq!(
            tree.read("etc/group", 1024).unwrap(),
            Some(b"inside".to_vec())
        );

        // A directory trident needs is made real: the link is replaced, the outside
        // untouched.
        let tmp = tree.real_dir("tmp", 0o1777).unwrap();
        replace_file(&tmp, "marker", b"x", 0o644, 0).unwrap();
        assert!(root.join("tmp").is_dir() && !root.join("tmp").is_symlink());
        assert!(!outside.path().join("marker").exists());
        assert_eq!(
            std::fs::metadata(outside.path())
                .unwrap()
                .permissions()
                .mode(),
            outside_mode,
            "the outside directory's mode is untouched"
        );
        // Replacing a linked file replaces the link.
        let etc = tree.real_dir("etc", 0o755).unwrap();
        replace_file(&etc, "passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644, 0).unwrap();
        assert_eq!(
            std::fs::read_to_string(outside.path().join("secret")).unwrap(),
            "host secret"
        );
        assert!(!root.join("etc/passwd").is_symlink());
        assert!(parts("../x").is_err() && parts("/x").is_err());
    }

    use std::os::unix::fs::PermissionsExt;
}
