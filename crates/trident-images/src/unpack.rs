//! Unpacking one layer (a tar stream, possibly gzip or zstd compressed) into its own
//! directory, confined to it, with OCI whiteouts turned into overlayfs ones.
//!
//! # Confinement model
//!
//! A layer is a stranger's archive and we run as root on the host, so no entry may reach
//! anything outside `dest`. We never build a host path from an entry name. Instead:
//!
//! - `dest` is opened once as a directory fd (the *layer root*). Every entry name is
//!   normalised lexically first (leading `/` and `./` stripped, `.` dropped, `..` popped but
//!   never above the root), exactly as containerd scopes `filepath.Join("/", name)`.
//! - The entry's parent directory is opened with `openat2(root, parent,
//!   RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`: the kernel resolves symlinks met on the way
//!   (including ones the layer itself created, absolute or full of `..`) as if the layer root
//!   were `/`, so they can only land inside the layer. Missing parents are created one
//!   component at a time with `mkdirat` on an fd obtained that way.
//! - The final component is a single name (no `/`) acted on relative to that parent fd, and
//!   is never followed: files are created with `O_CREAT | O_EXCL | O_NOFOLLOW` after removing
//!   whatever was there (later entries replace earlier ones, as in tar and OCI), ownership and
//!   times of symlinks are set with `AT_SYMLINK_NOFOLLOW`.
//! - Hard links resolve their target the same way (`RESOLVE_IN_ROOT`) and are made with
//!   `linkat` from the target's fd, so a target such as `../../etc/passwd` or `/etc/passwd`
//!   means `<layer>/etc/passwd`; a target that does not exist in this layer, or is not a
//!   regular file, is refused.
//!
//! Only `dest` itself is a host path. Nothing is written outside it even when unpacking fails
//! half way; the caller removes `dest` on error.
//!
//! # Resource limits
//!
//! [`UnpackLimits`] bounds the content bytes (checked against each entry's size before any
//! byte is written, so a compressed bomb stops at the quota without inflating further) and the
//! number of entries. Metadata (headers, PAX records, GNU long names, which the tar crate
//! buffers in memory) is bounded per entry by [`MAX_ENTRY_METADATA`], and data after the end
//! of the archive by [`MAX_TRAILER`], so no part of the uncompressed stream is unbounded.
//!
//! # Policies
//!
//! - Device nodes (char/block) and FIFOs are created with `mknodat` as the layer says, like
//!   containerd does as root (some base images ship `/dev/null` and friends). This is safe
//!   because runners mount layers `nodev`, so such a node cannot be opened as a device inside
//!   a runner, and the image store is root-only (its callers keep it `0700`), so host users
//!   cannot reach one either. They stay confined like every entry.
//! - Hard links must point at a regular file already unpacked from this layer (Docker and
//!   containerd's tar writers only emit such links); others are refused.
//! - Whiteouts: `.wh.<name>` removes `<name>` from this layer's directory and creates an
//!   overlayfs whiteout (char device 0:0) `<name>`; `.wh..wh..opq` sets
//!   `trusted.overlay.opaque=y` on its directory. Other `.wh..wh.` names (aufs metadata) are
//!   ignored, as Docker does. A `.wh.` name used as a directory is refused.
//! - xattrs come from PAX `SCHILY.xattr.*` records. `trusted.overlay.*` and `user.overlay.*`
//!   are dropped (with a warning): they are how overlayfs encodes whiteouts, opaque dirs and
//!   redirects, so a layer setting them itself could hide or redirect other layers' files.
//! - Unsupported entry types (GNU sparse files, unknown type flags) are refused, naming the
//!   entry, as containerd refuses unknown types. PAX global headers are ignored.
//! - The root entry (`./`) applies its owner, mode, xattrs and mtime to `dest` itself.

use std::cell::Cell;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::rc::Rc;

use rustix::fs::{
    AtFlags, Dir, FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps, Uid, XattrFlags,
    CWD,
};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

/// Largest metadata (header, PAX records, GNU long name/link) one entry may carry. The tar
/// crate holds these in memory, so they must be bounded; real layers use a few KiB at most.
pub const MAX_ENTRY_METADATA: u64 = 4 << 20;

/// Largest amount of data accepted after the tar archive's end-of-archive marker (padding to a
/// record size; tools pad to 10 KiB records). It is read only to complete the diff_id.
pub const MAX_TRAILER: u64 = 1 << 20;

/// The overlayfs xattr of an opaque directory.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression of a layer with this OCI or Docker schema 2 media type, or `None` if it
    /// is not a layer media type we can unpack.
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        // Media types may carry parameters; the type itself is before any `;`.
        let media_type = media_type.split(';').next().unwrap_or("").trim();
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.zstd" => {
                Some(Compression::Zstd)
            }
            _ => None,
        }
    }
}

/// Limits for one layer.
#[derive(Debug, Clone)]
pub struct UnpackLimits {
    /// Total bytes of file contents written (uncompressed).
    pub max_bytes: u64,
    /// Number of tar entries (files, dirs, links, whiteouts...).
    pub max_entries: u64,
}

/// What an unpack did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackReport {
    /// Tar entries processed.
    pub entries: u64,
    /// Content bytes written.
    pub bytes: u64,
    /// `sha256:<hex>` of the uncompressed tar stream (the layer's diff_id in the image config).
    pub diff_id: String,
}

/// Why a layer could not be unpacked. Messages name the offending entry where there is one.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The layer's content is larger than [`UnpackLimits::max_bytes`].
    #[error("layer entry {entry:?}: the layer exceeds the quota of {limit} bytes")]
    TooLarge { entry: String, limit: u64 },
    /// The layer has more entries than [`UnpackLimits::max_entries`].
    #[error("layer entry {entry:?}: the layer exceeds the quota of {limit} entries")]
    TooManyEntries { entry: String, limit: u64 },
    /// An entry was refused (hostile, unsupported or inconsistent).
    #[error("layer entry {entry:?}: {reason}")]
    Refused { entry: String, reason: String },
    /// A filesystem operation for an entry failed.
    #[error("layer entry {entry:?}: {op}: {source}")]
    Io {
        entry: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The stream is not a valid (compressed) tar archive, or reading it failed.
    #[error("reading the layer{}: {source}", after_entry(after))]
    Read {
        after: String,
        #[source]
        source: io::Error,
    },
    /// An entry's headers (PAX records, long names) are larger than [`MAX_ENTRY_METADATA`].
    #[error(
        "the layer's next entry{} has headers larger than {MAX_ENTRY_METADATA} bytes",
        after_entry(after)
    )]
    MetadataTooLarge { after: String },
    /// More than [`MAX_TRAILER`] bytes follow the end of the tar archive.
    #[error("the layer has more than {MAX_TRAILER} bytes after the end of its tar archive")]
    TrailingData,
    /// `dest` could not be opened.
    #[error("opening the layer directory {dest:?}: {source}")]
    Dest {
        dest: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
}

fn after_entry(entry: &str) -> String {
    if entry.is_empty() {
        String::new()
    } else {
        format!(" after entry {entry:?}")
    }
}

/// Unpacks `layer` (compressed as `compression`) into the EXISTING EMPTY directory `dest`;
/// blocking (callers use spawn_blocking). On error `dest` may hold part of the layer (the
/// caller removes it) but nothing outside `dest` was touched.
pub fn unpack_layer(
    layer: impl Read,
    compression: Compression,
    dest: &Path,
    limits: &UnpackLimits,
) -> Result<UnpackReport, UnpackError> {
    let root = rustix::fs::open(
        dest,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| UnpackError::Dest {
        dest: dest.to_owned(),
        source: e.into(),
    })?;

    let decoder: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(layer),
        // Multi-member gzip is valid gzip (pigz and Go's reader accept it).
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(layer)),
        Compression::Zstd => {
            Box::new(
                zstd::stream::read::Decoder::new(layer).map_err(|e| UnpackError::Read {
                    after: String::new(),
                    source: e,
                })?,
            )
        }
    };
    let budget = Rc::new(Budget::default());
    let reader = HashingReader {
        inner: decoder,
        hasher: Sha256::new(),
        budget: budget.clone(),
    };
    let mut archive = tar::Archive::new(reader);
    let mut unpacker = Unpacker {
        root,
        limits,
        budget: budget.clone(),
        entries: 0,
        bytes: 0,
        dirs: Vec::new(),
        last: String::new(),
        buf: vec![0; 256 * 1024],
    };

    {
        let mut entries = archive
            .entries()
            .map_err(|e| unpacker.read_error(e, Phase::Metadata))?;
        loop {
            budget.allow(MAX_ENTRY_METADATA, Phase::Metadata);
            let entry = match entries.next() {
                None => break,
                Some(Ok(entry)) => entry,
                Some(Err(e)) => return Err(unpacker.read_error(e, Phase::Metadata)),
            };
            unpacker.entry(entry)?;
        }
    }
    unpacker.finish_dirs()?;

    // Read to the very end (the end-of-archive blocks and record padding) so the digest covers
    // the whole uncompressed stream, which is what the image config's diff_id names.
    let mut reader = archive.into_inner();
    budget.allow(MAX_TRAILER, Phase::Trailer);
    if let Err(e) = io::copy(&mut reader, &mut io::sink()) {
        return Err(unpacker.read_error(e, Phase::Trailer));
    }
    let digest = reader.hasher.finalize();
    Ok(UnpackReport {
        entries: unpacker.entries,
        bytes: unpacker.bytes,
        diff_id: format!("sha256:{}", hex(&digest)),
    })
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// What part of the stream is being read, to say which limit a refused read hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Phase {
    #[default]
    Metadata,
    Data,
    Trailer,
}

/// How far into the uncompressed stream the tar reader may read right now. The unpack loop
/// moves the limit before each header, each entry's data and the trailer.
#[derive(Default)]
struct Budget {
    pos: Cell<u64>,
    end: Cell<u64>,
    phase: Cell<Phase>,
    exceeded: Cell<bool>,
}

impl Budget {
    fn allow(&self, bytes: u64, phase: Phase) {
        self.end.set(self.pos.get().saturating_add(bytes));
        self.phase.set(phase);
        self.exceeded.set(false);
    }
}

/// Hashes the uncompressed stream as the tar reader consumes it, within the [`Budget`].
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    budget: Rc<Budget>,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let room = self.budget.end.get() - self.budget.pos.get();
        if room == 0 {
            // Only an error if there is in fact more data: probe with one byte.
            let mut probe = [0u8; 1];
            let n = self.inner.read(&mut probe)?;
            if n == 0 {
                return Ok(0);
            }
            self.hasher.update(probe);
            self.budget.exceeded.set(true);
            return Err(io::Error::other("layer stream limit reached"));
        }
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.hasher.update(&buf[..n]);
        self.budget.pos.set(self.budget.pos.get() + n as u64);
        Ok(n)
    }
}

/// Owner, mode, xattrs and time an entry asks for.
struct Meta {
    uid: Uid,
    gid: Gid,
    mode: Mode,
    times: Timestamps,
    xattrs: Vec<(CString, Vec<u8>)>,
}

struct Unpacker<'l> {
    root: OwnedFd,
    limits: &'l UnpackLimits,
    budget: Rc<Budget>,
    entries: u64,
    bytes: u64,
    /// Directories whose mtime is set at the end (writing into them changes it).
    dirs: Vec<(Vec<u8>, Timestamps)>,
    /// The last entry's name, for errors about what follows it.
    last: String,
    buf: Vec<u8>,
}

/// An entry's normalised path: components, none empty, `.` or `..`.
struct EntryPath<'a> {
    parent: Vec<&'a [u8]>,
    /// `None` for the layer root itself.
    name: Option<&'a [u8]>,
}

fn normalise(raw: &[u8]) -> EntryPath<'_> {
    let mut comps: Vec<&[u8]> = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            // Scoped to the layer root, as containerd does.
            b".." => {
                comps.pop();
            }
            c => comps.push(c),
        }
    }
    let name = comps.pop();
    EntryPath {
        parent: comps,
        name,
    }
}

fn join(comps: &[&[u8]]) -> Vec<u8> {
    if comps.is_empty() {
        return b".".to_vec();
    }
    comps.join(&b'/')
}

fn in_root() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC
}

/// `/proc/self/fd/<dir>/<name>`: the only way to reach a symlink or device node for
/// `lsetxattr` without opening it. `<dir>` is our own fd of a directory inside the layer and
/// `<name>` a single component that `lsetxattr` does not follow, so it stays confined.
fn proc_path(dir: BorrowedFd<'_>, name: &[u8]) -> Vec<u8> {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    p
}

impl Unpacker<'_> {
    fn read_error(&self, source: io::Error, phase: Phase) -> UnpackError {
        if self.budget.exceeded.get() {
            match phase {
                Phase::Metadata => UnpackError::MetadataTooLarge {
                    after: self.last.clone(),
                },
                Phase::Trailer => UnpackError::TrailingData,
                Phase::Data => UnpackError::TooLarge {
                    entry: self.last.clone(),
                    limit: self.limits.max_bytes,
                },
            }
        } else if phase == Phase::Data {
            UnpackError::Io {
                entry: self.last.clone(),
                op: "reading its data",
                source,
            }
        } else {
            UnpackError::Read {
                after: self.last.clone(),
                source,
            }
        }
    }

    fn refused(&self, reason: impl Into<String>) -> UnpackError {
        UnpackError::Refused {
            entry: self.last.clone(),
            reason: reason.into(),
        }
    }

    fn io(&self, op: &'static str) -> impl FnOnce(Errno) -> UnpackError + '_ {
        move |e| UnpackError::Io {
            entry: self.last.clone(),
            op,
            source: e.into(),
        }
    }

    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw_path = entry.path_bytes().into_owned();
        self.last = String::from_utf8_lossy(&raw_path).into_owned();
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(UnpackError::TooManyEntries {
                entry: self.last.clone(),
                limit: self.limits.max_entries,
            });
        }
        let size = entry.size();
        if self.bytes.saturating_add(size) > self.limits.max_bytes {
            return Err(UnpackError::TooLarge {
                entry: self.last.clone(),
                limit: self.limits.max_bytes,
            });
        }
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            return self.drain(&mut entry);
        }
        if kind.is_gnu_sparse() {
            return Err(self.refused("GNU sparse files are not supported"));
        }
        let meta = self.meta(&mut entry)?;
        let path = normalise(&raw_path);
        if path.parent.iter().any(|c| c.starts_with(WHITEOUT_PREFIX)) {
            return Err(self.refused("a whiteout name (.wh.) used as a directory"));
        }
        let parent = self.open_parent(&path.parent)?;
        let Some(name) = path.name else {
            // The layer root itself.
            if !kind.is_dir() {
                return Err(self.refused("the layer root is not a directory"));
            }
            self.drain(&mut entry)?;
            self.set_dir_meta(&parent, &meta)?;
            self.dirs.push((Vec::new(), meta.times));
            return Ok(());
        };

        if name.starts_with(WHITEOUT_PREFIX) {
            self.drain(&mut entry)?;
            return self.whiteout(&parent, name);
        }

        // V7 archives mark directories by a trailing slash on a regular entry.
        let is_dir = kind.is_dir() || (kind == tar::EntryType::Regular && raw_path.ends_with(b"/"));
        if is_dir {
            self.drain(&mut entry)?;
            let existing_dir = self.clear(&parent, name, true)?;
            if !existing_dir {
                rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o700))
                    .map_err(self.io("mkdirat"))?;
            }
            let fd = rustix::fs::openat2(
                &parent,
                name,
                dir_flags() | OFlags::NOFOLLOW,
                Mode::empty(),
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
            )
            .map_err(self.io("opening the directory"))?;
            self.set_dir_meta(&fd, &meta)?;
            let mut full = path.parent.clone();
            full.push(name);
            self.dirs.push((join(&full), meta.times));
            return Ok(());
        }

        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                self.regular(&mut entry, &parent, name, size, &meta)
            }
            tar::EntryType::Symlink => {
                self.drain(&mut entry)?;
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.refused("symlink without a target"))?
                    .into_owned();
                self.clear(&parent, name, false)?;
                // The target text is kept verbatim: it is resolved later, inside the runner.
                rustix::fs::symlinkat(target.as_slice(), &parent, name)
                    .map_err(self.io("symlinkat"))?;
                rustix::fs::chownat(
                    &parent,
                    name,
                    Some(meta.uid),
                    Some(meta.gid),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(self.io("chown"))?;
                self.set_xattrs_by_name(&parent, name, &meta, true)?;
                rustix::fs::utimensat(&parent, name, &meta.times, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(self.io("utimensat"))
            }
            tar::EntryType::Link => {
                self.drain(&mut entry)?;
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.refused("hard link without a target"))?
                    .into_owned();
                self.hardlink(&parent, &path, name, &target)
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                self.drain(&mut entry)?;
                self.node(&mut entry, &parent, name, kind, &meta)
            }
            other => Err(self.refused(format!(
                "unsupported entry type {:?}",
                char::from(other.as_byte())
            ))),
        }
    }

    /// Reads the entry's data without writing it (it still counts against the quota).
    fn drain<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        self.copy(entry, &mut io::sink())
    }

    fn copy<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        out: &mut impl Write,
    ) -> Result<(), UnpackError> {
        let size = entry.size();
        self.budget.allow(size, Phase::Data);
        let mut done = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.read_error(e, Phase::Data)),
            };
            out.write_all(&self.buf[..n])
                .map_err(|source| UnpackError::Io {
                    entry: self.last.clone(),
                    op: "writing",
                    source,
                })?;
            done += n as u64;
        }
        if done != size {
            return Err(self.read_error(
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the archive ends inside an entry",
                ),
                Phase::Data,
            ));
        }
        self.bytes += done;
        Ok(())
    }

    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>) -> Result<Meta, UnpackError> {
        let header = entry.header();
        // The tar crate already applies PAX uid/gid records to the header.
        let id = |v: io::Result<u64>, what: &str| -> Result<u32, UnpackError> {
            let v = v.map_err(|e| self.refused(format!("bad {what}: {e}")))?;
            // u32::MAX means "leave unchanged" to chown, so it is no valid id either.
            u32::try_from(v)
                .ok()
                .filter(|v| *v != u32::MAX)
                .ok_or_else(|| self.refused(format!("{what} {v} out of range")))
        };
        let uid = id(header.uid(), "uid")?;
        let gid = id(header.gid(), "gid")?;
        let mode = header
            .mode()
            .map_err(|e| self.refused(format!("bad mode: {e}")))?
            & 0o7777;
        let mtime = header
            .mtime()
            .map_err(|e| self.refused(format!("bad mtime: {e}")))?;
        let mut mtime = Timespec {
            tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
            tv_nsec: 0,
        };
        let mut xattrs = Vec::new();
        let exts = entry
            .pax_extensions()
            .map_err(|e| self.refused(format!("bad PAX header: {e}")))?;
        if let Some(exts) = exts {
            for ext in exts {
                let ext = ext.map_err(|e| self.refused(format!("bad PAX record: {e}")))?;
                let key = ext.key_bytes();
                if key == b"mtime" {
                    if let Some(t) = parse_pax_time(ext.value_bytes()) {
                        mtime = t;
                    }
                } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    if name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.") {
                        // Overlayfs metadata: a layer setting it would forge whiteouts,
                        // opaque dirs or redirects; we make those ourselves from .wh. files.
                        tracing::warn!(
                            entry = %self.last,
                            xattr = %String::from_utf8_lossy(name),
                            "ignoring an overlayfs xattr set by the layer"
                        );
                        continue;
                    }
                    let name =
                        CString::new(name).map_err(|_| self.refused("xattr name contains NUL"))?;
                    xattrs.push((name, ext.value_bytes().to_vec()));
                }
            }
        }
        Ok(Meta {
            uid: Uid::from_raw(uid),
            gid: Gid::from_raw(gid),
            mode: Mode::from_raw_mode(mode),
            times: Timestamps {
                last_access: mtime,
                last_modification: mtime,
            },
            xattrs,
        })
    }

    /// Opens (creating if needed) the directory `comps` inside the layer, confined to it.
    fn open_parent(&self, comps: &[&[u8]]) -> Result<OwnedFd, UnpackError> {
        match rustix::fs::openat2(
            &self.root,
            join(comps),
            dir_flags(),
            Mode::empty(),
            in_root(),
        ) {
            Ok(fd) => return Ok(fd),
            Err(Errno::NOENT) => {}
            Err(Errno::NOTDIR) => return Err(self.refused("a parent is not a directory")),
            Err(Errno::LOOP) => return Err(self.refused("a parent is a symlink loop")),
            Err(e) => return Err(self.io("opening the parent directory")(e)),
        }
        // Some component is missing: walk down, creating what is not there. Each prefix is
        // opened from the root again so symlinks on the way stay scoped to the layer.
        let mut dir = rustix::fs::openat2(&self.root, ".", dir_flags(), Mode::empty(), in_root())
            .map_err(self.io("opening the layer root"))?;
        for i in 0..comps.len() {
            let prefix = join(&comps[..=i]);
            let open =
                || rustix::fs::openat2(&self.root, &prefix, dir_flags(), Mode::empty(), in_root());
            dir = match open() {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    match rustix::fs::mkdirat(&dir, comps[i], Mode::from_raw_mode(0o755)) {
                        Ok(()) => {}
                        // A dangling symlink: creating its target would mean guessing.
                        Err(Errno::EXIST) => {
                            return Err(self.refused(format!(
                                "parent {:?} is a symlink to a directory that does not exist \
                                 in this layer",
                                String::from_utf8_lossy(&prefix)
                            )))
                        }
                        Err(e) => return Err(self.io("creating a parent directory")(e)),
                    }
                    let fd = open().map_err(self.io("opening a parent directory"))?;
                    // mkdirat obeys the umask; implicit parents are 0755 as tar makes them.
                    rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o755))
                        .map_err(self.io("chmod"))?;
                    fd
                }
                Err(Errno::NOTDIR) => return Err(self.refused("a parent is not a directory")),
                Err(e) => return Err(self.io("opening a parent directory")(e)),
            };
        }
        Ok(dir)
    }

    /// Removes `name` from `parent` so a new entry can take its place. An existing
    /// directory is kept if `keep_dir` (a directory entry over a directory merges, as in tar);
    /// returns whether it was.
    fn clear(&self, parent: &OwnedFd, name: &[u8], keep_dir: bool) -> Result<bool, UnpackError> {
        match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(self.io("stat")(e)),
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                if keep_dir {
                    return Ok(true);
                }
                remove_all(parent.as_fd(), name).map_err(self.io("removing the replaced entry"))?;
                Ok(false)
            }
            Ok(_) => {
                rustix::fs::unlinkat(parent, name, AtFlags::empty())
                    .map_err(self.io("removing the replaced entry"))?;
                Ok(false)
            }
        }
    }

    fn regular<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        parent: &OwnedFd,
        name: &[u8],
        size: u64,
        meta: &Meta,
    ) -> Result<(), UnpackError> {
        debug_assert_eq!(size, entry.size());
        self.clear(parent, name, false)?;
        let fd = rustix::fs::openat2(
            parent,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
        )
        .map_err(self.io("creating the file"))?;
        let mut file = File::from(fd);
        self.copy(entry, &mut file)?;
        // chown clears setuid/setgid and file capabilities, so: owner, then mode, then xattrs.
        rustix::fs::fchown(&file, Some(meta.uid), Some(meta.gid)).map_err(self.io("chown"))?;
        rustix::fs::fchmod(&file, meta.mode).map_err(self.io("chmod"))?;
        self.set_xattrs_fd(file.as_fd(), meta)?;
        rustix::fs::futimens(&file, &meta.times).map_err(self.io("futimens"))
    }

    fn set_dir_meta(&self, fd: &OwnedFd, meta: &Meta) -> Result<(), UnpackError> {
        rustix::fs::fchown(fd, Some(meta.uid), Some(meta.gid)).map_err(self.io("chown"))?;
        rustix::fs::fchmod(fd, meta.mode).map_err(self.io("chmod"))?;
        self.set_xattrs_fd(fd.as_fd(), meta)
    }

    fn set_xattrs_fd(&self, fd: BorrowedFd<'_>, meta: &Meta) -> Result<(), UnpackError> {
        for (name, value) in &meta.xattrs {
            match rustix::fs::fsetxattr(fd, name.as_c_str(), value, XattrFlags::empty()) {
                Ok(()) => {}
                Err(e) if e == Errno::OPNOTSUPP => self.warn_xattr(name, e),
                Err(e) => return Err(self.io("setting an xattr")(e)),
            }
        }
        Ok(())
    }

    /// xattrs of a symlink or node, which we must not open.
    fn set_xattrs_by_name(
        &self,
        parent: &OwnedFd,
        name: &[u8],
        meta: &Meta,
        symlink: bool,
    ) -> Result<(), UnpackError> {
        if meta.xattrs.is_empty() {
            return Ok(());
        }
        let path = proc_path(parent.as_fd(), name);
        for (xname, value) in &meta.xattrs {
            match rustix::fs::lsetxattr(
                path.as_slice(),
                xname.as_c_str(),
                value,
                XattrFlags::empty(),
            ) {
                Ok(()) => {}
                Err(e) if e == Errno::OPNOTSUPP => self.warn_xattr(xname, e),
                // user.* xattrs are not allowed on symlinks; containerd skips those too.
                Err(Errno::PERM) if symlink => self.warn_xattr(xname, Errno::PERM),
                Err(e) => return Err(self.io("setting an xattr")(e)),
            }
        }
        Ok(())
    }

    fn warn_xattr(&self, name: &CString, e: Errno) {
        tracing::warn!(entry = %self.last, xattr = ?name, error = %e, "xattr not kept");
    }

    fn whiteout(&self, parent: &OwnedFd, name: &[u8]) -> Result<(), UnpackError> {
        if name == WHITEOUT_OPAQUE {
            return rustix::fs::fsetxattr(parent, OPAQUE_XATTR, b"y", XattrFlags::empty())
                .map_err(self.io("marking the directory opaque"));
        }
        if name.starts_with(WHITEOUT_META_PREFIX) {
            // aufs bookkeeping (.wh..wh.plnk etc.): meaningless to overlayfs, as Docker skips.
            return Ok(());
        }
        let target = &name[WHITEOUT_PREFIX.len()..];
        if target.is_empty() || target == b"." || target == b".." {
            return Err(self.refused("a whiteout without a name"));
        }
        self.clear(parent, target, false)?;
        rustix::fs::mknodat(
            parent,
            target,
            FileType::CharacterDevice,
            Mode::empty(),
            rustix::fs::makedev(0, 0),
        )
        .map_err(self.io("creating the whiteout"))
    }

    fn hardlink(
        &self,
        parent: &OwnedFd,
        path: &EntryPath<'_>,
        name: &[u8],
        target_raw: &[u8],
    ) -> Result<(), UnpackError> {
        let target = normalise(target_raw);
        let Some(target_name) = target.name else {
            return Err(self.refused("hard link to the layer root"));
        };
        let mut target_comps = target.parent.clone();
        target_comps.push(target_name);
        if target.parent == path.parent && target_name == name {
            return Ok(()); // A link to itself: nothing to do.
        }
        let shown = String::from_utf8_lossy(target_raw);
        // Resolved inside the layer; O_PATH | O_NOFOLLOW opens a final symlink itself.
        let fd = match rustix::fs::openat2(
            &self.root,
            join(&target_comps),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            in_root(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) | Err(Errno::NOTDIR) => {
                return Err(self.refused(format!(
                    "hard link target {shown:?} does not exist in this layer"
                )))
            }
            Err(Errno::LOOP) => {
                return Err(self.refused(format!(
                    "hard link target {shown:?} goes through a symlink loop"
                )))
            }
            Err(e) => return Err(self.io("opening the hard link target")(e)),
        };
        let st = rustix::fs::fstat(&fd).map_err(self.io("stat of the hard link target"))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(self.refused(format!("hard link target {shown:?} is not a regular file")));
        }
        self.clear(parent, name, false)?;
        match rustix::fs::linkat(&fd, "", parent, name, AtFlags::EMPTY_PATH) {
            // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; the fd's magic link in /proc does not.
            // It names the inode we opened, so following it cannot leave the layer.
            Err(Errno::NOENT) | Err(Errno::PERM) => rustix::fs::linkat(
                CWD,
                format!("/proc/self/fd/{}", fd.as_raw_fd()),
                parent,
                name,
                AtFlags::SYMLINK_FOLLOW,
            ),
            other => other,
        }
        .map_err(self.io("linkat"))
    }

    fn node<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        parent: &OwnedFd,
        name: &[u8],
        kind: tar::EntryType,
        meta: &Meta,
    ) -> Result<(), UnpackError> {
        let header = entry.header();
        let (file_type, dev) = match kind {
            tar::EntryType::Fifo => (FileType::Fifo, 0),
            _ => {
                let num = |v: io::Result<Option<u32>>| {
                    v.map_err(|e| self.refused(format!("bad device number: {e}")))
                        .map(|v| v.unwrap_or(0))
                };
                let major = num(header.device_major())?;
                let minor = num(header.device_minor())?;
                let t = if kind == tar::EntryType::Char {
                    FileType::CharacterDevice
                } else {
                    FileType::BlockDevice
                };
                (t, rustix::fs::makedev(major, minor))
            }
        };
        self.clear(parent, name, false)?;
        // Devices are kept as the layer has them: runners mount layers nodev (see the
        // module docs), so they are inert there.
        rustix::fs::mknodat(parent, name, file_type, Mode::empty(), dev)
            .map_err(self.io("mknodat"))?;
        rustix::fs::chownat(
            parent,
            name,
            Some(meta.uid),
            Some(meta.gid),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(self.io("chown"))?;
        // fchmodat cannot refuse to follow, but `name` is the node we just made, not a link.
        rustix::fs::chmodat(parent, name, meta.mode, AtFlags::empty()).map_err(self.io("chmod"))?;
        self.set_xattrs_by_name(parent, name, meta, false)?;
        rustix::fs::utimensat(parent, name, &meta.times, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(self.io("utimensat"))
    }

    /// Sets directories' mtimes last: creating their children changed them.
    fn finish_dirs(&mut self) -> Result<(), UnpackError> {
        for (path, times) in std::mem::take(&mut self.dirs) {
            let fd = match rustix::fs::openat2(
                &self.root,
                &path,
                dir_flags() | OFlags::NOFOLLOW,
                Mode::empty(),
                in_root(),
            ) {
                Ok(fd) => fd,
                // Replaced or whited out by a later entry.
                Err(Errno::NOENT) | Err(Errno::NOTDIR) | Err(Errno::LOOP) => continue,
                Err(e) => {
                    return Err(UnpackError::Io {
                        entry: String::from_utf8_lossy(&path).into_owned(),
                        op: "opening the directory",
                        source: e.into(),
                    })
                }
            };
            rustix::fs::futimens(&fd, &times).map_err(|e| UnpackError::Io {
                entry: String::from_utf8_lossy(&path).into_owned(),
                op: "futimens",
                source: e.into(),
            })?;
        }
        Ok(())
    }
}

/// Removes `name` (a directory) in `parent` and everything below it, never following links.
fn remove_all(parent: BorrowedFd<'_>, name: &[u8]) -> rustix::io::Result<()> {
    let fd = rustix::fs::openat(parent, name, dir_flags() | OFlags::NOFOLLOW, Mode::empty())?;
    let mut children = Vec::new();
    for child in Dir::read_from(&fd)? {
        let child = child?;
        let n = child.file_name().to_bytes();
        if n != b"." && n != b".." {
            children.push(n.to_vec());
        }
    }
    for child in children {
        let st = rustix::fs::statat(&fd, child.as_slice(), AtFlags::SYMLINK_NOFOLLOW)?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            remove_all(fd.as_fd(), &child)?;
        } else {
            rustix::fs::unlinkat(&fd, child.as_slice(), AtFlags::empty())?;
        }
    }
    rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)
}

/// A PAX time: decimal seconds with an optional fraction (`1700000000.123456789`).
fn parse_pax_time(v: &[u8]) -> Option<Timespec> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let tv_sec: i64 = secs.parse().ok()?;
    let mut nsec = 0i64;
    if !s.starts_with('-') {
        for (i, c) in frac.chars().take(9).enumerate() {
            nsec += i64::from(c.to_digit(10)?) * 10i64.pow(8 - i as u32);
        }
    }
    Some(Timespec {
        tv_sec,
        tv_nsec: nsec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::path::PathBuf;
    use tar::{EntryType, Header};

    const NO_LIMITS: UnpackLimits = UnpackLimits {
        max_bytes: u64::MAX,
        max_entries: u64::MAX,
    };

    /// A header with the path (and link target) written raw, so hostile names survive.
    fn header(path: &[u8], kind: EntryType, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.as_old_mut().name[..path.len()].copy_from_slice(path);
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h
    }

    struct Layer(tar::Builder<Vec<u8>>);

    impl Layer {
        fn new() -> Layer {
            Layer(tar::Builder::new(Vec::new()))
        }
        fn raw(&mut self, mut h: Header, data: &[u8]) -> &mut Self {
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }
        fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
            self.raw(
                header(path.as_bytes(), EntryType::Regular, data.len() as u64),
                data,
            )
        }
        fn dir(&mut self, path: &str) -> &mut Self {
            self.raw(header(path.as_bytes(), EntryType::Directory, 0), b"")
        }
        fn link(&mut self, kind: EntryType, path: &str, target: &str) -> &mut Self {
            let mut h = header(path.as_bytes(), kind, 0);
            h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
            self.raw(h, b"")
        }
        fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
            self.0
                .append_pax_extensions(records.iter().copied())
                .unwrap();
            self
        }
        fn finish(&mut self) -> Vec<u8> {
            let b = std::mem::replace(&mut self.0, tar::Builder::new(Vec::new()));
            b.into_inner().unwrap()
        }
    }

    /// `<tmp>/layer` (empty, the dest) beside `<tmp>/outside` (a marker with a file).
    struct Env {
        _tmp: tempfile::TempDir,
        dest: PathBuf,
        outside: PathBuf,
    }

    fn fresh() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("layer");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&dest).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"secret").unwrap();
        Env {
            _tmp: tmp,
            dest,
            outside,
        }
    }

    /// Everything observable about a tree (names, types, modes, owners, sizes, contents).
    fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let md = std::fs::symlink_metadata(&d).unwrap();
            out.insert(
                d.clone(),
                format!(
                    "{:o} {} {} {} {}",
                    md.mode(),
                    md.uid(),
                    md.nlink(),
                    md.mtime(),
                    md.size()
                ),
            );
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let md = std::fs::symlink_metadata(&p).unwrap();
                if md.is_dir() {
                    stack.push(p);
                } else {
                    let content = if md.is_file() {
                        String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned()
                    } else {
                        String::new()
                    };
                    out.insert(
                        p,
                        format!(
                            "{:o} {} {} {} {content}",
                            md.mode(),
                            md.uid(),
                            md.nlink(),
                            md.size()
                        ),
                    );
                }
            }
        }
        out
    }

    fn unpack(env: &Env, tar: &[u8]) -> Result<UnpackReport, UnpackError> {
        unpack_layer(tar, Compression::None, &env.dest, &NO_LIMITS)
    }

    fn sha256(data: &[u8]) -> String {
        format!("sha256:{}", hex(&Sha256::digest(data)))
    }

    fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 256];
        match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
            Ok(n) => Some(buf[..n].to_vec()),
            Err(Errno::NODATA) => None,
            Err(e) => panic!("getxattr {path:?} {name}: {e}"),
        }
    }

    fn is_whiteout(path: &Path) -> bool {
        let md = std::fs::symlink_metadata(path).unwrap();
        md.file_type().is_char_device() && md.rdev() == 0
    }

    /// Runs a hostile layer and checks the marker beside dest is untouched; returns the result.
    fn hostile(tar: &[u8]) -> (Env, Result<UnpackReport, UnpackError>) {
        let env = fresh();
        let before = snapshot(env.outside.parent().unwrap());
        let passwd = std::fs::symlink_metadata("/etc/passwd").unwrap();
        let result = unpack(&env, tar);
        let mut after = snapshot(env.outside.parent().unwrap());
        // Only dest's own subtree may change.
        let mut before_outside = before.clone();
        before_outside.retain(|p, _| !p.starts_with(&env.dest));
        after.retain(|p, _| !p.starts_with(&env.dest));
        assert_eq!(before_outside, after, "something outside dest changed");
        let passwd_after = std::fs::symlink_metadata("/etc/passwd").unwrap();
        assert_eq!(passwd.nlink(), passwd_after.nlink());
        assert_eq!(passwd.mtime(), passwd_after.mtime());
        (env, result)
    }

    fn assert_refused(result: Result<UnpackReport, UnpackError>, entry: &str, words: &str) {
        let msg = result.expect_err("the layer should be refused").to_string();
        assert!(
            msg.contains(&format!("{entry:?}")),
            "{msg:?} should name {entry:?}"
        );
        assert!(msg.contains(words), "{msg:?} should say {words:?}");
    }

    #[test]
    fn regular_files_keep_content_mode_owner_mtime() {
        let env = fresh();
        let mut h = header(b"etc/app.conf", EntryType::Regular, 5);
        h.set_mode(0o640);
        h.set_uid(1000);
        h.set_gid(1001);
        h.set_mtime(1_500_000_000);
        let mut suid = header(b"usr/bin/su", EntryType::Regular, 2);
        suid.set_mode(0o4755);
        suid.set_uid(1000);
        let mut d = header(b"etc/", EntryType::Directory, 0);
        d.set_mtime(1_400_000_000);
        d.set_mode(0o750);
        let tar = Layer::new()
            .raw(header(b"./", EntryType::Directory, 0), b"")
            .raw(d, b"")
            .raw(h, b"hello")
            .raw(suid, b"#!")
            .finish();
        let report = unpack(&env, &tar).unwrap();
        assert_eq!(report.entries, 4);
        assert_eq!(report.bytes, 7);
        assert_eq!(report.diff_id, sha256(&tar));

        let f = env.dest.join("etc/app.conf");
        assert_eq!(std::fs::read(&f).unwrap(), b"hello");
        let md = std::fs::metadata(&f).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o640);
        assert_eq!((md.uid(), md.gid()), (1000, 1001));
        assert_eq!(md.mtime(), 1_500_000_000);
        let md = std::fs::metadata(env.dest.join("usr/bin/su")).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o4755, "setuid survives chown");
        assert_eq!(md.uid(), 1000);
        // Implicit parents are 0755; the etc dir keeps its own mode and mtime.
        let md = std::fs::metadata(env.dest.join("usr")).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o755);
        let md = std::fs::metadata(env.dest.join("etc")).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o750);
        assert_eq!(
            md.mtime(),
            1_400_000_000,
            "dir mtime set after its children"
        );
        let md = std::fs::metadata(&env.dest).unwrap();
        assert_eq!(
            md.mode() & 0o7777,
            0o755,
            "the ./ entry applies to the root"
        );
    }

    #[test]
    fn symlinks_hardlinks_devices_fifos() {
        let env = fresh();
        let mut null = header(b"dev/null", EntryType::Char, 0);
        null.set_device_major(1).unwrap();
        null.set_device_minor(3).unwrap();
        null.set_mode(0o666);
        let mut fifo = header(b"run/fifo", EntryType::Fifo, 0);
        fifo.set_mode(0o620);
        let tar = Layer::new()
            .file("bin/busybox", b"elf")
            .link(EntryType::Link, "bin/sh", "bin/busybox")
            .link(EntryType::Link, "bin/ls", "/bin/busybox")
            .link(EntryType::Symlink, "etc/shadow-link", "../../etc/shadow")
            .raw(null, b"")
            .raw(fifo, b"")
            .finish();
        unpack(&env, &tar).unwrap();
        let link = std::fs::read_link(env.dest.join("etc/shadow-link")).unwrap();
        assert_eq!(link, Path::new("../../etc/shadow"), "symlink kept verbatim");
        let a = std::fs::metadata(env.dest.join("bin/busybox")).unwrap();
        let b = std::fs::metadata(env.dest.join("bin/sh")).unwrap();
        let c = std::fs::metadata(env.dest.join("bin/ls")).unwrap();
        assert_eq!(a.ino(), b.ino());
        assert_eq!(a.ino(), c.ino());
        assert_eq!(a.nlink(), 3);
        let md = std::fs::symlink_metadata(env.dest.join("dev/null")).unwrap();
        assert!(md.file_type().is_char_device());
        assert_eq!(md.rdev(), rustix::fs::makedev(1, 3));
        assert_eq!(md.mode() & 0o7777, 0o666);
        let md = std::fs::symlink_metadata(env.dest.join("run/fifo")).unwrap();
        assert!(md.file_type().is_fifo());
        assert_eq!(md.mode() & 0o7777, 0o620);
    }

    #[test]
    fn whiteouts_and_opaque_dirs() {
        let env = fresh();
        let tar = Layer::new()
            .file("a/file", b"x")
            .file("a/keep", b"y")
            .file("a/.wh.file", b"")
            .file(".wh.gone", b"")
            .dir("tree/")
            .file("tree/sub/f", b"z")
            .file(".wh.tree", b"")
            .file("opq/.wh..wh..opq", b"")
            .file("opq/new", b"n")
            .file(".wh..wh.plnk", b"")
            .finish();
        unpack(&env, &tar).unwrap();
        assert!(
            is_whiteout(&env.dest.join("a/file")),
            "earlier file replaced by a whiteout"
        );
        assert!(env.dest.join("a/keep").is_file());
        assert!(is_whiteout(&env.dest.join("gone")));
        assert!(
            is_whiteout(&env.dest.join("tree")),
            "a whited-out dir goes with its children"
        );
        assert_eq!(
            xattr(&env.dest.join("opq"), OPAQUE_XATTR).as_deref(),
            Some(&b"y"[..])
        );
        assert!(env.dest.join("opq/new").is_file());
        for name in [".wh.gone", "a/.wh.file", "opq/.wh..wh..opq", ".wh..wh.plnk"] {
            assert!(
                std::fs::symlink_metadata(env.dest.join(name)).is_err(),
                "{name} created"
            );
        }
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let env = fresh();
        let tar = Layer::new()
            .file("x", b"file")
            .dir("x/")
            .file("x/inner", b"i")
            .dir("y/")
            .file("y/child", b"c")
            .file("y", b"now a file")
            .link(EntryType::Symlink, "z", "/somewhere")
            .file("z", b"plain")
            .file("w", b"old")
            .file("w", b"new")
            .finish();
        unpack(&env, &tar).unwrap();
        assert!(env.dest.join("x/inner").is_file());
        assert_eq!(std::fs::read(env.dest.join("y")).unwrap(), b"now a file");
        assert_eq!(std::fs::read(env.dest.join("z")).unwrap(), b"plain");
        assert_eq!(std::fs::read(env.dest.join("w")).unwrap(), b"new");
    }

    #[test]
    fn pax_xattrs_long_names_and_times() {
        let env = fresh();
        let long = format!("{}/file", "d".repeat(150));
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([
            ("SCHILY.xattr.user.comment", &b"hi"[..]),
            (
                "SCHILY.xattr.security.capability",
                &[1, 0, 0, 2, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..],
            ),
            ("mtime", &b"1700000000.5"[..]),
        ])
        .unwrap();
        let mut h = Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o755);
        h.set_entry_type(EntryType::Regular);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h, &long, &b"abc"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        unpack(&env, &tar).unwrap();
        let f = env.dest.join(&long);
        assert_eq!(std::fs::read(&f).unwrap(), b"abc");
        assert_eq!(xattr(&f, "user.comment").as_deref(), Some(&b"hi"[..]));
        assert!(xattr(&f, "security.capability").is_some());
        let md = std::fs::metadata(&f).unwrap();
        assert_eq!((md.mtime(), md.mtime_nsec()), (1_700_000_000, 500_000_000));
    }

    #[test]
    fn compressed_layers_and_diff_id() {
        let tar = Layer::new().file("a", b"hello").dir("d/").finish();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&tar[..], 3).unwrap();
        for (compression, blob) in [
            (Compression::None, tar.clone()),
            (Compression::Gzip, gz),
            (Compression::Zstd, zst),
        ] {
            let env = fresh();
            let report = unpack_layer(&blob[..], compression, &env.dest, &NO_LIMITS).unwrap();
            assert_eq!(report.diff_id, sha256(&tar), "{compression:?}");
            assert_eq!(report.entries, 2);
            assert_eq!(std::fs::read(env.dest.join("a")).unwrap(), b"hello");
        }
        // A stream that is not what it claims fails cleanly.
        let env = fresh();
        let err = unpack_layer(&tar[..], Compression::Gzip, &env.dest, &NO_LIMITS).unwrap_err();
        assert!(matches!(err, UnpackError::Read { .. }), "{err}");
    }

    #[test]
    fn v7_directories_and_errors_cross_threads() {
        let env = fresh();
        let tar = Layer::new()
            .raw(header(b"olddir/", EntryType::new(b'0'), 0), b"")
            .raw(header(b"contig", EntryType::Continuous, 2), b"ok")
            .finish();
        unpack(&env, &tar).unwrap();
        assert!(env.dest.join("olddir").is_dir());
        assert_eq!(std::fs::read(env.dest.join("contig")).unwrap(), b"ok");
        // Callers hand errors back from spawn_blocking.
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<UnpackError>();
        send_sync::<UnpackReport>();
    }

    #[test]
    fn media_types() {
        use Compression::*;
        for (mt, c) in [
            ("application/vnd.oci.image.layer.v1.tar", Some(None)),
            ("application/vnd.oci.image.layer.v1.tar+gzip", Some(Gzip)),
            ("application/vnd.oci.image.layer.v1.tar+zstd", Some(Zstd)),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar",
                Some(None),
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Some(Gzip),
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
                Some(Zstd),
            ),
            ("application/vnd.docker.image.rootfs.diff.tar", Some(None)),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Some(Gzip),
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.zstd",
                Some(Zstd),
            ),
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                Some(Gzip),
            ),
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar",
                Some(None),
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip; charset=x",
                Some(Gzip),
            ),
            ("application/vnd.oci.image.config.v1+json", Option::None),
            ("application/vnd.oci.image.layer.v1.tar+bzip2", Option::None),
            ("", Option::None),
        ] {
            assert_eq!(Compression::from_media_type(mt), c, "{mt}");
        }
    }

    #[test]
    fn dotdot_is_scoped_to_the_layer_root() {
        let tar = Layer::new().file("../outside/x", b"pwned").finish();
        let (env, result) = hostile(&tar);
        result.unwrap();
        assert_eq!(std::fs::read(env.dest.join("outside/x")).unwrap(), b"pwned");
        let tar = Layer::new()
            .file("a/../../../../outside/y", b"pwned")
            .finish();
        let (env, result) = hostile(&tar);
        result.unwrap();
        assert!(env.dest.join("outside/y").is_file());
    }

    #[test]
    fn absolute_paths_are_scoped_to_the_layer_root() {
        let tar = Layer::new().file("/abs/path", b"pwned").finish();
        let (env, result) = hostile(&tar);
        result.unwrap();
        assert!(env.dest.join("abs/path").is_file());
        assert!(!Path::new("/abs/path").exists());
    }

    #[test]
    fn file_through_a_relative_symlink_stays_inside() {
        let tar = Layer::new()
            .link(EntryType::Symlink, "evil", "../../outside")
            .file("evil/pwned", b"pwned")
            .finish();
        let (env, result) = hostile(&tar);
        assert_refused(result, "evil/pwned", "does not exist in this layer");
        assert!(!env.outside.join("pwned").exists());

        // When the target exists inside the layer, the write lands there.
        let tar = Layer::new()
            .dir("outside/")
            .link(EntryType::Symlink, "evil", "../../outside")
            .file("evil/pwned", b"pwned")
            .finish();
        let (env, result) = hostile(&tar);
        result.unwrap();
        assert!(env.dest.join("outside/pwned").is_file());
    }

    #[test]
    fn file_through_an_absolute_symlink_stays_inside() {
        let marker = fresh();
        let target = marker.outside.to_str().unwrap().to_owned();
        let tar = Layer::new()
            .link(EntryType::Symlink, "evil", &target)
            .file("evil/pwned", b"pwned")
            .finish();
        let before = snapshot(&marker.outside);
        let (_env, result) = hostile(&tar);
        assert_refused(result, "evil/pwned", "does not exist in this layer");
        assert_eq!(before, snapshot(&marker.outside));

        let tar = Layer::new()
            .link(EntryType::Symlink, "evil", "/")
            .file("evil/etc/pwned", b"pwned")
            .finish();
        let (env, result) = hostile(&tar);
        result.unwrap();
        assert!(env.dest.join("etc/pwned").is_file());
        assert!(!Path::new("/etc/pwned").exists());
    }

    #[test]
    fn hardlinks_outside_are_refused() {
        let tar = Layer::new()
            .link(EntryType::Link, "stolen", "../outside/secret")
            .finish();
        let (_env, result) = hostile(&tar);
        assert_refused(result, "stolen", "does not exist in this layer");

        let tar = Layer::new()
            .link(EntryType::Link, "passwd", "/etc/passwd")
            .finish();
        let (_env, result) = hostile(&tar);
        assert_refused(result, "passwd", "does not exist in this layer");

        // Through a symlink to the host's /etc: resolved inside the layer, so still absent.
        let tar = Layer::new()
            .link(EntryType::Symlink, "hostetc", "/etc")
            .link(EntryType::Link, "passwd", "hostetc/passwd")
            .finish();
        let (_env, result) = hostile(&tar);
        assert_refused(result, "passwd", "does not exist in this layer");
        // A symlink to itself (`/etc` inside the layer is the link `etc`).
        let tar = Layer::new()
            .link(EntryType::Symlink, "etc", "/etc")
            .link(EntryType::Link, "passwd", "etc/passwd")
            .file("etc/x", b"")
            .finish();
        let (_env, result) = hostile(&tar);
        assert_refused(result, "passwd", "symlink loop");

        // Not yet existing (later in the archive) and non-regular targets.
        let tar = Layer::new()
            .link(EntryType::Link, "early", "late")
            .file("late", b"x")
            .finish();
        let (_env, result) = hostile(&tar);
        assert_refused(result, "early", "does not exist in this layer");
        let tar = Layer::new()
            .dir("d/")
            .link(EntryType::Link, "dlink", "d")
            .finish();
        let (_env, result) = hostile(&tar);
        assert_refused(result, "dlink", "not a regular file");
    }

    #[test]
    fn forged_overlay_xattrs_are_dropped() {
        let tar = Layer::new()
            .pax(&[("SCHILY.xattr.trusted.overlay.opaque", b"y")])
            .dir("d/")
            .pax(&[
                ("SCHILY.xattr.trusted.overlay.redirect", b"/etc"),
                ("SCHILY.xattr.user.overlay.opaque", b"y"),
            ])
            .file("f", b"x")
            .finish();
        let (env, result) = hostile(&tar);
        result.unwrap();
        assert_eq!(xattr(&env.dest.join("d"), OPAQUE_XATTR), None);
        assert_eq!(xattr(&env.dest.join("f"), "trusted.overlay.redirect"), None);
        assert_eq!(xattr(&env.dest.join("f"), "user.overlay.opaque"), None);
    }

    #[test]
    fn devices_and_whiteouts_cannot_escape() {
        let mut dev = header(b"../outside/sda", EntryType::Block, 0);
        dev.set_device_major(8).unwrap();
        dev.set_device_minor(0).unwrap();
        let tar = Layer::new()
            .raw(dev, b"")
            .file("../outside/.wh.secret", b"")
            .finish();
        let (env, result) = hostile(&tar);
        result.unwrap();
        assert!(is_whiteout(&env.dest.join("outside/secret")));
        assert!(env.outside.join("secret").is_file());
    }

    #[test]
    fn quota_on_bytes() {
        let tar = Layer::new()
            .file("a", &[1; 600])
            .file("b", &[2; 600])
            .finish();
        let env = fresh();
        let limits = UnpackLimits {
            max_bytes: 1000,
            max_entries: 100,
        };
        let result = unpack_layer(&tar[..], Compression::None, &env.dest, &limits);
        assert_refused(result, "b", "exceeds the quota of 1000 bytes");
        assert!(
            !env.dest.join("b").exists(),
            "nothing of the entry over quota written"
        );
    }

    #[test]
    fn quota_on_entries() {
        let tar = Layer::new()
            .file("a", b"")
            .file("b", b"")
            .file("c", b"")
            .finish();
        let env = fresh();
        let limits = UnpackLimits {
            max_bytes: 1000,
            max_entries: 2,
        };
        let result = unpack_layer(&tar[..], Compression::None, &env.dest, &limits);
        assert_refused(result, "c", "exceeds the quota of 2 entries");
    }

    /// A tar stream of one file of `size` zero bytes, generated lazily, counting what is read.
    struct Bomb {
        header: Vec<u8>,
        pos: u64,
        total: u64,
        read: Rc<Cell<u64>>,
    }

    impl Bomb {
        fn new(size: u64, read: Rc<Cell<u64>>) -> Bomb {
            let mut h = header(b"bomb", EntryType::Regular, size);
            h.set_cksum();
            Bomb {
                header: h.as_bytes().to_vec(),
                pos: 0,
                total: 512 + size,
                read,
            }
        }
    }

    impl Read for Bomb {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let left = self.total - self.pos;
            let n = (buf.len() as u64).min(left) as usize;
            for (i, b) in buf[..n].iter_mut().enumerate() {
                let p = self.pos + i as u64;
                *b = if p < 512 { self.header[p as usize] } else { 0 };
            }
            self.pos += n as u64;
            self.read.set(self.read.get() + n as u64);
            Ok(n)
        }
    }

    #[test]
    fn zstd_bomb_stops_at_the_quota() {
        let limits = UnpackLimits {
            max_bytes: 1 << 20,
            max_entries: 100,
        };
        // 10 GiB of zeros inflated from a stream read lazily: refused from the header alone.
        let read = Rc::new(Cell::new(0));
        let env = fresh();
        let result = unpack_layer(
            Bomb::new(10 << 30, read.clone()),
            Compression::None,
            &env.dest,
            &limits,
        );
        assert_refused(result, "bomb", "exceeds the quota of 1048576 bytes");
        assert!(read.get() < 1 << 20, "read {} bytes", read.get());

        // A real zstd bomb: 256 MiB of zeros in a few KiB.
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        io::copy(&mut Bomb::new(256 << 20, Rc::default()), &mut enc).unwrap();
        let blob = enc.finish().unwrap();
        assert!(blob.len() < 1 << 20);
        let env = fresh();
        let result = unpack_layer(&blob[..], Compression::Zstd, &env.dest, &limits);
        assert_refused(result, "bomb", "exceeds the quota of 1048576 bytes");

        // Many small files that add up past the quota.
        let mut layer = Layer::new();
        for i in 0..20 {
            layer.file(&format!("f{i}"), &[0; 100 << 10]);
        }
        let blob = zstd::encode_all(&layer.finish()[..], 3).unwrap();
        let env = fresh();
        let result = unpack_layer(&blob[..], Compression::Zstd, &env.dest, &limits);
        assert_refused(result, "f10", "exceeds the quota of 1048576 bytes");
    }

    #[test]
    fn oversized_headers_and_trailers_are_refused() {
        // A PAX header of 8 MiB, which the tar crate would buffer.
        let mut pax = header(b"PaxHeaders/x", EntryType::XHeader, 8 << 20);
        pax.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&pax, io::repeat(b'a').take(8 << 20)).unwrap();
        let tar = b.into_inner().unwrap();
        let env = fresh();
        let err = unpack(&env, &tar).unwrap_err();
        assert!(matches!(err, UnpackError::MetadataTooLarge { .. }), "{err}");

        // 2 MiB of data after the end of the archive.
        let mut tar = Layer::new().file("a", b"x").finish();
        tar.extend(std::iter::repeat_n(0u8, 2 << 20));
        let env = fresh();
        let err = unpack(&env, &tar).unwrap_err();
        assert!(matches!(err, UnpackError::TrailingData), "{err}");
    }

    #[test]
    fn unsupported_entries_are_refused() {
        let mut sparse = header(b"sparse", EntryType::GNUSparse, 0);
        sparse.as_gnu_mut().unwrap().set_real_size(0);
        let tar = Layer::new().raw(sparse, b"").finish();
        let env = fresh();
        assert_refused(unpack(&env, &tar), "sparse", "GNU sparse");
        let tar = Layer::new()
            .raw(header(b"odd", EntryType::new(b'Z'), 0), b"")
            .finish();
        let env = fresh();
        assert_refused(unpack(&env, &tar), "odd", "unsupported entry type");
        let tar = Layer::new().file(".wh.d/x", b"").finish();
        let env = fresh();
        assert_refused(unpack(&env, &tar), ".wh.d/x", "whiteout");
        let tar = Layer::new().file("f", b"").file("f/g", b"").finish();
        let env = fresh();
        assert_refused(unpack(&env, &tar), "f/g", "not a directory");
        // A truncated archive.
        let tar = Layer::new().file("a", &[1; 2000]).finish();
        let env = fresh();
        let err = unpack(&env, &tar[..1200]).unwrap_err().to_string();
        assert!(
            err.starts_with("layer entry \"a\": reading its data"),
            "{err}"
        );
        let env = fresh();
        let err = unpack(&env, b"not a tar archive at all")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("reading the layer: "), "{err}");
    }
}
