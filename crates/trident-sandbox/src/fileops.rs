//! File operations, run *inside* a runner by a forked handler of its runner-init (as root or
//! as `user`). Paths resolve in the runner's own root, so a symlink planted by executed code
//! can only ever point at the runner's own files, never at the host's.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use trident_core::model::{FileCopy, FileHeader};

use crate::spec::WORKSPACE;

/// Largest listing returned; a bigger tree must be listed in parts.
pub const MAX_LISTING: usize = 100_000;

pub enum FileOpError {
    Unavailable(String),
    Invalid(String),
    Failed(String),
}

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
pub fn list(path: &str, recursive: bool) -> Result<Vec<FileHeader>, FileOpError> {
    let path = if path.is_empty() { "./" } else { path };
    let target = resolve(path);
    let meta = fs::symlink_metadata(&target)
        .map_err(|e| FileOpError::Unavailable(format!("{path}: {e}")))?;
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
) -> Result<(), FileOpError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if top => return Err(FileOpError::Unavailable(format!("{prefix}: {e}"))),
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
            return Err(FileOpError::Invalid(format!(
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
pub fn patch(delete: &[String], copy: &[FileCopy]) -> Result<(), FileOpError> {
    for path in delete {
        if path == "./*" {
            if let Ok(entries) = fs::read_dir(WORKSPACE) {
                for entry in entries.flatten() {
                    remove_any(&entry.path());
                }
            }
        } else {
            remove_any(&resolve(path));
        }
    }
    for file in copy {
        let target = resolve(&file.path);
        if file.path.ends_with('/') {
            make_dirs(&target)?;
            continue;
        }
        let content = base64::engine::general_purpose::STANDARD
            .decode(&file.content_base64)
            .map_err(|e| FileOpError::Invalid(format!("{}: invalid base64: {e}", file.path)))?;
        if let Some(parent) = target.parent() {
            make_dirs(parent)?;
        }
        write_file(&target, &content)
            .map_err(|e| refused(format!("cannot write {}", file.path), e))?;
    }
    Ok(())
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

fn make_dirs(path: &Path) -> Result<(), FileOpError> {
    let mut current = PathBuf::new();
    for part in path.components() {
        current.push(part);
        if current.exists() {
            continue;
        }
        fs::create_dir(&current)
            .and_then(|()| fs::set_permissions(&current, fs::Permissions::from_mode(0o1777)))
            .map_err(|e| refused(format!("cannot create {}", current.display()), e))?;
    }
    Ok(())
}

/// A copy the runner's file system refuses because of what the request asks (a path
/// through a file, a read-only or image directory, a directory in the way) is the client's
/// error (400); anything else, a full disk included, is the server's.
fn refused(what: String, e: io::Error) -> FileOpError {
    match e.raw_os_error() {
        Some(
            libc::EACCES
            | libc::EPERM
            | libc::EROFS
            | libc::ENOTDIR
            | libc::EISDIR
            | libc::EEXIST
            | libc::ENOENT
            | libc::EINVAL
            | libc::ENAMETOOLONG
            | libc::ELOOP,
        ) => FileOpError::Invalid(format!("{what}: {e}")),
        _ => FileOpError::Failed(format!("{what}: {e}")),
    }
}

/// Writes a root-owned 0744 file; a symlink in its place is replaced, never followed.
fn write_file(path: &Path, content: &[u8]) -> io::Result<()> {
    if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        fs::remove_file(path)?;
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o744)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    file.write_all(content)?;
    file.set_permissions(fs::Permissions::from_mode(0o744))?;
    std::os::unix::fs::fchown(&file, Some(0), Some(0))?;
    Ok(())
}

/// Opens a regular file for download.
pub fn open(path: &str) -> Result<(fs::File, u64), FileOpError> {
    let target = resolve(path);
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&target)
        .map_err(|e| FileOpError::Unavailable(format!("{path}: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| FileOpError::Unavailable(format!("{path}: {e}")))?;
    if !meta.is_file() {
        return Err(FileOpError::Unavailable(format!(
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
