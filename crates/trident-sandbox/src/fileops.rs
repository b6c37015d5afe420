//! File operations, run *inside* a runner by a forked handler of its runner-init (as root or
//! as `user`). Paths resolve in the runner's own root, so a symlink planted by executed code
//! can only ever point at the runner's own files, never at the host's.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use trident_core::backend::BackendError;
use trident_core::model::FileHeader;

use crate::protocol::CopyHeader;
use crate::spec::WORKSPACE;

/// Largest listing returned; a bigger tree must be listed in parts.
pub const MAX_LISTING: usize = 100_000;

/// Relative paths are relative to the workspace.
pub fn resolve(path: &str) -> PathBuf {
    if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        Path::new(WORKSPACE).join(path)
    }
}

/// Lists `path` like `ls -l` (recursively like `ls -lR`): a directory lists its entries
/// named `<path>/<entry>`; a file lists itself.
pub fn list(path: &str, recursive: bool) -> Result<Vec<FileHeader>, BackendError> {
    let path = if path.is_empty() { "./" } else { path };
    let target = resolve(path);
    let meta = fs::symlink_metadata(&target)
        .map_err(|e| BackendError::FileUnavailable(format!("{path}: {e}")))?;
    let names = Names::load();
    if !meta.is_dir() {
        return Ok(vec![header(path.to_string(), &target, &meta, &names)]);
    }
    let prefix = path.trim_end_matches('/');
    let mut out = Vec::new();
    walk(&target, prefix, recursive, &names, &mut out, true)?;
    Ok(out)
}

fn walk(
    dir: &Path,
    prefix: &str,
    recursive: bool,
    names: &Names,
    out: &mut Vec<FileHeader>,
    top: bool,
) -> Result<(), BackendError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if top => return Err(BackendError::FileUnavailable(format!("{prefix}: {e}"))),
        Err(_) => return Ok(()), // like `ls -R`: an unreadable subdirectory is skipped
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = format!("{prefix}/{}", entry.file_name().to_string_lossy());
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if out.len() >= MAX_LISTING {
            return Err(BackendError::Invalid(format!(
                "the listing has more than {MAX_LISTING} entries; list a narrower path or not recursively"
            )));
        }
        out.push(header(name.clone(), &path, &meta, names));
        if recursive && meta.is_dir() {
            walk(&path, &name, recursive, names, out, false)?;
        }
    }
    Ok(())
}

fn header(name: String, path: &Path, meta: &fs::Metadata, names: &Names) -> FileHeader {
    let ft = meta.file_type();
    use std::os::unix::fs::FileTypeExt;
    let entry_type = if ft.is_dir() {
        "d"
    } else if ft.is_symlink() {
        "l"
    } else if ft.is_fifo() {
        "p"
    } else if ft.is_socket() {
        "s"
    } else if ft.is_char_device() {
        "c"
    } else if ft.is_block_device() {
        "b"
    } else {
        "-"
    };
    FileHeader {
        name,
        entry_type: entry_type.to_string(),
        size: meta.len(),
        modification_time: meta.mtime(),
        permissions: permission_string(meta.mode()),
        owner: names.user(meta.uid()),
        group: names.group(meta.gid()),
        link_target: ft
            .is_symlink()
            .then(|| fs::read_link(path).ok())
            .flatten()
            .map(|t| t.to_string_lossy().into_owned()),
    }
}

/// `rwxr-xr-x` with `s`/`S`/`t`/`T` for setuid, setgid and sticky, as `ls` prints it.
pub fn permission_string(mode: u32) -> String {
    let mut s = String::with_capacity(9);
    let special = [(0o4000, 's', 'S'), (0o2000, 's', 'S'), (0o1000, 't', 'T')];
    for (i, (flag, set_x, set_no_x)) in special.iter().enumerate() {
        let bits = (mode >> (6 - 3 * i)) & 0o7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        let x = bits & 1 != 0;
        s.push(match (mode & flag != 0, x) {
            (true, true) => *set_x,
            (true, false) => *set_no_x,
            (false, true) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// User and group names from the runner's own /etc/passwd and /etc/group.
struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    fn load() -> Names {
        let parse = |file: &str| -> HashMap<u32, String> {
            fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .filter_map(|line| {
                    let mut f = line.split(':');
                    let name = f.next()?;
                    let id = f.nth(1)?.parse().ok()?;
                    Some((id, name.to_string()))
                })
                .collect()
        };
        Names {
            users: parse("/etc/passwd"),
            groups: parse("/etc/group"),
        }
    }
    fn user(&self, id: u32) -> String {
        self.users
            .get(&id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }
    fn group(&self, id: u32) -> String {
        self.groups
            .get(&id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }
}

/// Deletes (recursively, errors ignored; `./*` empties the workspace), then copies. Copied
/// files belong to root with mode 0744; created directories are 1777 (sticky), so `user`
/// can add files but not remove or change copied ones.
///
/// Like the reference's one `tar` run, an entry that cannot be written does not stop the
/// others: every other entry is written, then the failures are reported together.
///
/// Paths are walked one component at a time on directory fds, as root. A symlink that
/// `user` planted (owned by anyone but root) is never followed: where a directory is needed
/// it is replaced by one, as GNU tar replaces a symlink with a directory it extracts; a
/// deletion through it deletes nothing. Root's own links (the image's, or a privileged
/// execution's) are followed, inside the runner.
pub fn patch(
    delete: &[String],
    copy: &[CopyHeader],
    mut contents: impl Read,
) -> Result<(), BackendError> {
    for path in delete {
        if path == "./*" {
            if let Ok(entries) = fs::read_dir(WORKSPACE) {
                for entry in entries.flatten() {
                    remove_any(&entry.path());
                }
            }
        } else if let Ok(Some((dir, name))) = walk_path(&resolve(path), false, false) {
            remove_any(&fd_path(&dir).join(name));
        }
    }
    let mut failures = Vec::new();
    let mut dirs = Directories::default();
    let mut buffer = vec![0u8; COPY_BUFFER];
    for file in copy {
        match copy_one(file, &mut dirs, &mut contents, &mut buffer) {
            Ok(()) => {}
            Err(CopyError::Target(e)) => failures.push(format!("{}: Cannot open: {e}", file.path)),
            Err(CopyError::Source(e)) => {
                return Err(BackendError::Failed(format!(
                    "the contents of the copy broke off at {}: {e}",
                    file.path
                )))
            }
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(BackendError::CopyFailed(format!(
            "file copy failed: {}",
            failures.join("; ")
        )))
    }
}

/// Bytes of a file's content read from the connection at a time.
const COPY_BUFFER: usize = 64 * 1024;

/// Where a copied file failed: its target (that file is not written, the copy goes on) or
/// the connection its content comes through (nothing after it can be read).
enum CopyError {
    Target(io::Error),
    Source(io::Error),
}

/// The directories one PATCH has walked to, by the path that led there: the files of a copy
/// mostly share a few directories, and each is walked to once (about a dozen syscalls per
/// file saved). A directory swapped for a link in the meantime (by an execution running
/// beside the copy) changes nothing: the walk's result was a real directory of the runner,
/// and the files go there.
/// Directories a copy keeps open at most (each is an fd of the handler).
const MAX_WALKED: usize = 256;

#[derive(Default)]
struct Directories {
    walked: HashMap<PathBuf, OwnedFd>,
    /// The directory of the last path that ended in `.` or `..` (walked as it is, not kept).
    odd: Option<OwnedFd>,
}

impl Directories {
    /// The directory that holds `target`'s last component, and that component's name.
    fn holding(&mut self, target: &Path) -> io::Result<(BorrowedFd<'_>, String)> {
        let last = match target.components().next_back() {
            Some(std::path::Component::Normal(name)) => Some(name.to_string_lossy().into_owned()),
            _ => None,
        };
        let (Some(name), Some(parent)) = (last, target.parent()) else {
            let (dir, name) = walk_path(target, true, false)?.ok_or_else(missing)?;
            let dir: &OwnedFd = self.odd.insert(dir);
            return Ok((dir.as_fd(), name));
        };
        if !self.walked.contains_key(parent) {
            let (dir, walked) = walk_path(target, true, false)?.ok_or_else(missing)?;
            debug_assert_eq!(walked, name, "walk_path splits paths as Path::components");
            if self.walked.len() >= MAX_WALKED {
                // A copy over thousands of directories must not run out of fds.
                self.walked.clear();
            }
            self.walked.insert(parent.to_path_buf(), dir);
        }
        Ok((self.walked[parent].as_fd(), name))
    }
}

/// Writes one file from the next `file.bytes` bytes of `contents`, all of which it reads
/// whatever happens to the file, so that the next file's content starts where it should.
fn copy_one(
    file: &CopyHeader,
    dirs: &mut Directories,
    contents: &mut impl Read,
    buffer: &mut [u8],
) -> Result<(), CopyError> {
    let target = resolve(&file.path);
    let opened = if file.path.ends_with('/') {
        // The directory itself is walked into like any other: a planted link in its place
        // is replaced, root's own is followed.
        walk_path(&target, true, true).and_then(|dir| dir.ok_or_else(missing).map(|_| None))
    } else {
        dirs.holding(&target).and_then(|(dir, name)| {
            if name.is_empty() {
                Err(io::Error::from_raw_os_error(libc::EISDIR))
            } else {
                open_for_write(dir, &name).map(Some)
            }
        })
    };
    let (mut out, mut failed) = match opened {
        Ok(out) => (out, None),
        Err(e) => (None, Some(e)),
    };
    let mut left = file.bytes;
    while left > 0 {
        let want = buffer
            .len()
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        let got = match contents.read(&mut buffer[..want]) {
            Ok(0) => return Err(CopyError::Source(io::ErrorKind::UnexpectedEof.into())),
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Source(e)),
        };
        left -= got as u64;
        if let Some(file) = &mut out {
            if let Err(e) = file.write_all(&buffer[..got]) {
                // A full file system: the rest of this file's bytes are read and dropped.
                failed = Some(e);
                out = None;
            }
        }
    }
    match failed {
        Some(e) => Err(CopyError::Target(e)),
        None => Ok(()),
    }
}

fn missing() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOENT)
}

/// `/proc/self/fd/<fd>`: a path that names exactly the directory the fd holds, whatever
/// happens to the names leading to it.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Symlinks followed in one walk, as the kernel's own limit.
const MAX_LINKS: usize = 40;

/// Walks to the directory that holds `path`'s last component and returns it (opened) with
/// that component's name, or, with `into_last`, to that last directory itself (the name is
/// then empty). With `create`, missing directories are made (1777) and planted symlinks in
/// the way are replaced; without, a planted symlink or a missing directory means there is
/// nothing there (`Ok(None)`).
fn walk_path(path: &Path, create: bool, into_last: bool) -> io::Result<Option<(OwnedFd, String)>> {
    use rustix::fs::{openat, Mode, OFlags, CWD};
    let root = || -> io::Result<OwnedFd> {
        Ok(openat(
            CWD,
            "/",
            OFlags::DIRECTORY | OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
        )?)
    };
    // Pending components, next first; a followed link pushes its target's components.
    let mut pending: Vec<String> = components_reversed(path);
    let mut stack: Vec<OwnedFd> = vec![root()?];
    let mut links = 0;
    while let Some(name) = pending.pop() {
        let here = stack.last().expect("never empty");
        if pending.is_empty() && !into_last {
            // The last component: the caller acts on it.
            let here = rustix::io::dup(here)?;
            return Ok(Some((here, name)));
        }
        match name.as_str() {
            "." => continue,
            ".." => {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            _ => {}
        }
        match step(here, &name, create)? {
            Step::Dir(fd) => stack.push(fd),
            Step::Missing => return Ok(None),
            Step::Link(target) => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                if target.starts_with('/') {
                    stack.truncate(1);
                }
                pending.extend(components_reversed(Path::new(&target)));
            }
        }
    }
    // Walked to the end (`into_last`, or a path of only `/`, `.` and `..`): the directory
    // reached is the answer.
    Ok(stack.pop().map(|dir| (dir, String::new())))
}

/// A path's normal components (and `.`/`..`), last first.
fn components_reversed(path: &Path) -> Vec<String> {
    use std::path::Component;
    let mut parts: Vec<String> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_string_lossy().into_owned()),
            Component::ParentDir => Some("..".into()),
            Component::CurDir => Some(".".into()),
            Component::RootDir | Component::Prefix(_) => None,
        })
        .collect();
    parts.reverse();
    parts
}

enum Step {
    Dir(OwnedFd),
    /// A symlink of root's, to follow.
    Link(String),
    Missing,
}

/// Goes one directory down from `dir` into `name`.
fn step(dir: &OwnedFd, name: &str, create: bool) -> io::Result<Step> {
    use rustix::fs::{readlinkat, statat, AtFlags, FileType};
    match statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
            if st.st_uid == 0 {
                let target = readlinkat(dir, name, Vec::new())?;
                return Ok(Step::Link(target.to_string_lossy().into_owned()));
            }
            if !create {
                return Ok(Step::Missing);
            }
            // Planted by `user`: replaced by a directory, never followed.
            rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
            open_dir_step(dir, name, true).map(Step::Dir)
        }
        Ok(_) => open_dir_step(dir, name, false).map(Step::Dir),
        Err(rustix::io::Errno::NOENT) if create => open_dir_step(dir, name, true).map(Step::Dir),
        Err(rustix::io::Errno::NOENT) => Ok(Step::Missing),
        Err(e) => Err(e.into()),
    }
}

/// Opens the directory `name` in `dir` without following a symlink, making it (1777) first
/// if asked to and it does not exist.
fn open_dir_step(dir: &OwnedFd, name: &str, create: bool) -> io::Result<OwnedFd> {
    use rustix::fs::{mkdirat, openat, Mode, OFlags};
    if create {
        match mkdirat(dir, name, Mode::from_raw_mode(0o1777)) {
            Ok(()) => {
                let made = openat(
                    dir,
                    name,
                    OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                // mkdir's mode went through the umask.
                rustix::fs::fchmod(&made, Mode::from_raw_mode(0o1777))?;
                return Ok(made);
            }
            Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(openat(
        dir,
        name,
        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

fn remove_any(path: &Path) {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            let _ = fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = fs::remove_file(path);
        }
        Err(_) => {}
    }
}

/// Writes the file at `path` (as a copy would: root-owned, 0744, parents made, planted links
/// never followed) from `source` until its end; returns how many bytes it took. A full
/// file system ends it with an error (the runner's writable quota bounds it).
pub fn write_from(path: &str, source: OwnedFd) -> Result<u64, BackendError> {
    let failed = |e: io::Error| BackendError::CopyFailed(format!("{path}: Cannot write: {e}"));
    let (dir, name) = walk_path(&resolve(path), true, false)
        .map_err(failed)?
        .ok_or_else(|| failed(missing()))?;
    if name.is_empty() {
        return Err(failed(io::Error::from_raw_os_error(libc::EISDIR)));
    }
    let mut file = open_for_write(&dir, &name).map_err(failed)?;
    let bytes = io::copy(&mut fs::File::from(source), &mut file).map_err(failed)?;
    Ok(bytes)
}

/// Creates (or truncates) the root-owned 0744 file `name` in `dir`; a symlink in its place
/// is replaced, never followed.
fn open_for_write(dir: impl AsFd, name: &str) -> io::Result<fs::File> {
    use rustix::fs::{openat, AtFlags, Mode, OFlags};
    let flags =
        OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mode = Mode::from_raw_mode(0o744);
    let dir = dir.as_fd();
    let fd = match openat(dir, name, flags, mode) {
        Err(rustix::io::Errno::LOOP) => {
            rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
            openat(dir, name, flags | OFlags::EXCL, mode)?
        }
        other => other?,
    };
    let file = fs::File::from(fd);
    file.set_permissions(fs::Permissions::from_mode(0o744))?;
    std::os::unix::fs::fchown(&file, Some(0), Some(0))?;
    Ok(file)
}

/// Opens a regular file for download.
pub fn open(path: &str) -> Result<(fs::File, u64), BackendError> {
    let target = resolve(path);
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&target)
        .map_err(|e| BackendError::FileUnavailable(format!("{path}: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| BackendError::FileUnavailable(format!("{path}: {e}")))?;
    if !meta.is_file() {
        return Err(BackendError::FileUnavailable(format!(
            "{path}: not a regular file"
        )));
    }
    Ok((file, meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_render_like_ls() {
        assert_eq!(permission_string(0o744), "rwxr--r--");
        assert_eq!(permission_string(0o1777), "rwxrwxrwt");
        assert_eq!(permission_string(0o1776), "rwxrwxrwT");
        assert_eq!(permission_string(0o4755), "rwsr-xr-x");
        assert_eq!(permission_string(0o2644), "rw-r-Sr--");
    }

    #[test]
    fn relative_paths_are_in_the_workspace() {
        assert_eq!(resolve("a/b.txt"), PathBuf::from("/workspace/a/b.txt"));
        assert_eq!(resolve("/tmp/x"), PathBuf::from("/tmp/x"));
    }
}
