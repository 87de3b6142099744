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
/// bytes; `what` names the file in errors. A directory, FIFO or device is refused without a
/// blocking open (opening a FIFO blocks until a writer comes; `/dev/zero` never ends): the
/// file is opened first, non-blocking, and the open file is checked ([`open_regular_file`]),
/// so a path swapped for a FIFO between a check and the open cannot hang.
pub fn read_regular_file(path: &Path, what: &str, max: u64) -> Result<Vec<u8>> {
    let refuse = |m: String| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, m),
        )
    };
    let (file, meta) = open_regular_file(path, what)?;
    let too_large = |n: u64| refuse(format!("{n} bytes is too large for {what} (at most {max})"));
    if meta.len() > max {
        return Err(too_large(meta.len()));
    }
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

/// The error for `path`, which is not a regular file; `what` names the expected file.
fn not_regular(path: &Path, what: &str) -> Error {
    Error::io(
        path,
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "not a regular file (a directory, FIFO, pipe such as /dev/stdin or <(...), \
                 socket or device): save it to a file; expected {what}"
            ),
        ),
    )
}

/// Opens `path` for reading, which must be a regular file (symlinks followed), and returns it
/// with its metadata; `what` names the expected file in the error. The open is non-blocking
/// (a FIFO opens at once instead of waiting for a writer) and close-on-exec, and the type is
/// checked on the open file (`fstat`), not on the path: a path swapped between a check and
/// the open cannot make the caller read a FIFO or a device. The file is then switched back to
/// blocking reads (regular files never block either way).
pub fn open_regular_file(path: &Path, what: &str) -> Result<(std::fs::File, std::fs::Metadata)> {
    // The path is checked first, so that a device or socket named by mistake is refused
    // without being opened (opening a serial port or a tape has effects, and a socket's open
    // fails with an unhelpful ENXIO); the open file is checked again below.
    regular_file(path, what)?;
    #[cfg(test)]
    tests::before_open(path);
    #[cfg(unix)]
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(path)
    };
    #[cfg(not(unix))]
    let file = std::fs::File::open(path);
    let file = file.map_err(|e| match std::fs::metadata(path) {
        // Swapped for something that is not a regular file since the check.
        Ok(m) if !m.is_file() => not_regular(path, what),
        _ => Error::io(path, e),
    })?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular(path, what));
    }
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        // SAFETY: fcntl on a descriptor this function owns, with integer flags only.
        let ok = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) >= 0
        };
        if !ok {
            return Err(Error::io(path, std::io::Error::last_os_error()));
        }
    }
    Ok((file, meta))
}

/// The metadata of `path`, which must be a regular file (symlinks followed): a directory, FIFO
/// or device is refused without opening it. `what` names the expected file in the error. This
/// only checks the path as it is now: a caller that then reads the file opens it with
/// [`open_regular_file`] (or [`read_regular_file`]), which checks the open file again.
pub fn regular_file(path: &Path, what: &str) -> Result<std::fs::Metadata> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular(path, what));
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

/// Makes a FIFO at `path` (tests of the refusals above, here and in other modules).
#[cfg(all(test, unix))]
pub(crate) fn test_mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL in path");
    // SAFETY: mkfifo with a valid, NUL-terminated C string.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o600) },
        0,
        "{}",
        path.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    type Hook = Box<dyn Fn(&Path)>;

    thread_local! {
        /// Runs just before [`open_regular_file`] opens a path (this thread only).
        static BEFORE_OPEN: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    pub(super) fn before_open(path: &Path) {
        BEFORE_OPEN.with(|h| {
            if let Some(h) = h.borrow().as_ref() {
                h(path)
            }
        });
    }

    /// A path that was a regular file when the caller looked and is a FIFO when it is opened
    /// (another process swapped it) is refused without blocking: the type is checked on the
    /// open file. Checking the path and then opening it blocked forever in `open`.
    #[cfg(unix)]
    #[test]
    fn a_path_swapped_for_a_fifo_before_the_open_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.json");
        std::fs::write(&f, b"[1]").unwrap();
        let fifo = dir.path().join("fifo");
        test_mkfifo(&fifo);
        let (tx, rx) = std::sync::mpsc::channel();
        let path = f.clone();
        std::thread::spawn(move || {
            BEFORE_OPEN.with(|h| {
                *h.borrow_mut() = Some(Box::new(move |p: &Path| {
                    std::fs::rename(&fifo, p).unwrap();
                }))
            });
            let _ = tx.send(read_regular_file(&path, "a list", 100).map_err(|e| e.to_string()));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("read_regular_file blocked opening a FIFO");
        let m = r.unwrap_err();
        assert!(m.contains("not a regular file"), "{m}");
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::symlink_metadata(&f).unwrap().file_type().is_fifo());
        // An ordinary file reads as before (the descriptor is blocking again).
        let g = dir.path().join("b.json");
        std::fs::write(&g, b"[2]").unwrap();
        let (file, meta) = open_regular_file(&g, "a list").unwrap();
        assert!(meta.is_file());
        use std::os::fd::AsRawFd;
        // SAFETY: F_GETFL on an open descriptor.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
        assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY);
        // SAFETY: F_GETFD on an open descriptor.
        let fd_flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(fd_flags & libc::FD_CLOEXEC, 0);
    }

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
