//! Job traces on disk: appended in pieces as agents send them, with secrets masked, within a
//! size limit.
//!
//! Masking keeps every byte where it is (a secret becomes as many `x`, as GitLab's
//! `MaskSecret` does), so the offsets agents count in stay true. A secret split across two
//! pieces is found by looking at the end of what is stored together with the new piece, and
//! the stored part of it is masked in place.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Secrets shorter than this are not masked (they would mask ordinary words); GitLab asks
/// for at least 8 characters in masked variables too.
pub const MIN_SECRET_LEN: usize = 8;

/// Replaces every occurrence of a secret in `tail ++ piece` that ends inside `piece` (those
/// within `tail` were masked when they arrived) by `x`s. Returns whether `tail` changed.
pub fn mask(tail: &mut [u8], piece: &mut [u8], secrets: &[&[u8]]) -> bool {
    let mut joined: Vec<u8> = Vec::with_capacity(tail.len() + piece.len());
    joined.extend_from_slice(tail);
    joined.extend_from_slice(piece);
    let mut tail_changed = false;
    for secret in secrets.iter().filter(|s| s.len() >= MIN_SECRET_LEN) {
        let mut from = 0;
        while let Some(at) = find(&joined[from..], secret).map(|i| i + from) {
            let end = at + secret.len();
            if end > tail.len() {
                joined[at..end].fill(b'x');
                tail_changed |= at < tail.len();
            }
            from = at + 1;
        }
    }
    let (t, p) = joined.split_at(tail.len());
    tail.copy_from_slice(t);
    piece.copy_from_slice(p);
    tail_changed
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Appends `piece` (already limited) to the trace at `path`, which holds `size` bytes, with
/// `secrets` masked. The file is flushed to the page cache; the caller decides on fsync.
pub fn append(path: &Path, size: u64, piece: &[u8], secrets: &[&[u8]]) -> io::Result<()> {
    let longest = secrets.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)?;
    // Only the bytes a secret could still be completing are reread.
    let tail_len = (longest.saturating_sub(1) as u64).min(size);
    let mut tail = vec![0u8; tail_len as usize];
    let tail_at = size - tail_len;
    file.read_exact_at(&mut tail, tail_at)?;
    let mut piece = piece.to_vec();
    if mask(&mut tail, &mut piece, secrets) {
        // Appending files ignore the offset of pwrite on Linux: write the mended tail
        // through a second, non-appending handle.
        OpenOptions::new()
            .write(true)
            .open(path)?
            .write_all_at(&tail, tail_at)?;
    }
    file.write_all(&piece)
}

/// The trace from `offset` on, as a file positioned there (`None` when there is none yet).
pub fn open_at(path: &Path, offset: u64) -> io::Result<Option<File>> {
    match File::open(path) {
        Ok(mut file) => {
            file.seek(SeekFrom::Start(offset))?;
            Ok(Some(file))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Flushes the trace to disk (before a job's final state is acknowledged).
pub fn sync(path: &Path) -> io::Result<()> {
    match File::open(path) {
        Ok(file) => file.sync_data(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Cuts the trace back to `size` bytes (to what its job's record says was appended).
pub fn truncate(path: &Path, size: u64) -> io::Result<()> {
    match OpenOptions::new().write(true).open(path) {
        Ok(file) if file.metadata()?.len() > size => file.set_len(size),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Reads a whole (small) trace; for tests and checks.
pub fn read_all(path: &Path) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    if let Some(mut file) = open_at(path, 0)? {
        file.read_to_end(&mut out)?;
    }
    Ok(out)
}

/// What is appended when a trace reaches its limit (gitlab-runner's words for its own
/// limit, GitLab's failure reason).
pub fn limit_notice(limit: u64) -> String {
    format!(
        "\n\nJob's log exceeded limit of {limit} bytes.\nThe job is failed \
         (trace_size_exceeded); no more output is kept.\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &[u8] = b"glcbt-0123456789abcdef";

    fn masked(pieces: &[&str], secrets: &[&[u8]]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.log");
        let mut size = 0;
        for piece in pieces {
            append(&path, size, piece.as_bytes(), secrets).unwrap();
            size += piece.len() as u64;
        }
        let text = String::from_utf8(read_all(&path).unwrap()).unwrap();
        assert_eq!(text.len() as u64, size, "masking keeps every offset");
        text
    }

    #[test]
    fn secrets_are_masked_whole_and_split_across_pieces() {
        let x = "x".repeat(TOKEN.len());
        let token = std::str::from_utf8(TOKEN).unwrap();
        assert_eq!(
            masked(&[&format!("a {token} b {token}")], &[TOKEN]),
            format!("a {x} b {x}")
        );
        // Split in two, and in three pieces.
        let (head, rest) = token.split_at(5);
        let (middle, end) = rest.split_at(7);
        assert_eq!(
            masked(&[&format!("say {head}"), &format!("{rest} done")], &[TOKEN]),
            format!("say {x} done")
        );
        assert_eq!(
            masked(&[head, middle, end, "\n"], &[TOKEN]),
            format!("{x}\n")
        );
        // Short "secrets" and text that only resembles one stay.
        assert_eq!(masked(&["abc abc"], &[b"abc"]), "abc abc");
        assert_eq!(
            masked(&["glcbt-0123 glcbt-"], &[TOKEN]),
            "glcbt-0123 glcbt-"
        );
        // Two secrets, one inside a longer line.
        let other: &[u8] = b"hunter2hunter2";
        assert_eq!(
            masked(&["p=hunter2hun", "ter2;", token], &[TOKEN, other]),
            format!("p={};{x}", "x".repeat(other.len()))
        );
    }
}
