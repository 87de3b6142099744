//! Reading the small files a user names (JSON settings, indexes, tokenizers) whole: only
//! regular files, and only up to a size limit, so that a FIFO, a device or a huge file is one
//! error instead of a hang or an allocation that aborts the process.

use crate::{Error, Result};
use std::io::Read;
use std::path::Path;

/// Most bytes of a JSON settings file (`config.json`, a prompt schedule, a weight index): far
/// above any real one (the index of a 14B model is about 100 KiB).
pub const MAX_JSON_BYTES: u64 = 64 << 20;

/// Reads `path` whole, which must be a regular file (symlinks followed) of at most `max`
/// bytes; `what` names the file in errors. A directory, FIFO or device is refused before it is
/// opened (opening a FIFO blocks until a writer comes; `/dev/zero` never ends).
pub fn read_regular_file(path: &Path, what: &str, max: u64) -> Result<Vec<u8>> {
    let refuse = |m: String| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, m),
        )
    };
    let meta = regular_file(path, what)?;
    let too_large = |n: u64| refuse(format!("{n} bytes is too large for {what} (at most {max})"));
    if meta.len() > max {
        return Err(too_large(meta.len()));
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // The length may change after the check: read at most one byte more than allowed.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// The metadata of `path`, which must be a regular file (symlinks followed): a directory, FIFO
/// or device is refused before anything opens it. `what` names the expected file in the error.
pub fn regular_file(path: &Path, what: &str) -> Result<std::fs::Metadata> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("not a regular file (a directory, FIFO or device); expected {what}"),
            ),
        ));
    }
    Ok(meta)
}

/// Refuses an output `path` that exists and is neither a regular file nor a symlink (a device
/// such as `/dev/null`, a FIFO, a socket): outputs are written to a temporary file that is
/// renamed over the target, which would replace that node with a regular file (with the rights
/// to write in `/dev`, `--out /dev/null` replaced the system's `/dev/null`).
pub fn check_output_target(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !(m.is_file() || m.is_symlink() || m.is_dir()) => Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "exists and is not a regular file (a device, FIFO or socket); outputs are \
                 written to a temporary file renamed over the target, which would replace it: \
                 name a regular file",
            ),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_within_the_limit_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.json");
        std::fs::write(&f, b"[1, 2]").unwrap();
        assert_eq!(read_regular_file(&f, "a list", 6).unwrap(), b"[1, 2]");
        let m = read_regular_file(&f, "a list", 5).unwrap_err().to_string();
        assert!(
            m.contains("6 bytes is too large for a list (at most 5)"),
            "{m}"
        );
        let m = read_regular_file(dir.path(), "a list", 5)
            .unwrap_err()
            .to_string();
        assert!(m.contains("not a regular file"), "{m}");
        let m = read_regular_file(Path::new("/dev/zero"), "a list", 5)
            .unwrap_err()
            .to_string();
        assert!(m.contains("not a regular file"), "{m}");
        let e = read_regular_file(&dir.path().join("missing"), "a list", 5).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
    }

    #[test]
    fn devices_are_not_output_targets() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.safetensors");
        check_output_target(&f).unwrap();
        std::fs::write(&f, b"x").unwrap();
        check_output_target(&f).unwrap();
        let m = check_output_target(Path::new("/dev/null"))
            .unwrap_err()
            .to_string();
        assert!(m.contains("not a regular file"), "{m}");
    }
}
