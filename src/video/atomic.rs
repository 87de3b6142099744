//! Temp-then-rename output: every video writer puts its bytes under a hidden temporary name
//! next to the target and renames it on success, so a crash, an error or a dropped writer never
//! leaves a half-written video under the name the user asked for.

use crate::error::{Error, Result};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The number of the next [`temp_name`].
pub(crate) static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh hidden name in `dir` derived from `target`'s file name; unique per process and call,
/// so two writers (threads, processes) aiming at the same target never share a temp file.
pub(crate) fn temp_name(dir: &Path, target: &Path, tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = target
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or("video");
    dir.join(format!(".{name}.{tag}-{}-{n}", std::process::id()))
}

/// How many fresh names [`create_temp_file`] tries: a name already taken (a file left by a
/// killed run of a process with the same id, as in containers) moves on to the next one.
const TEMP_TRIES: usize = 16;

/// Creates a fresh temporary file for `target` in `dir` ([`temp_name`]), exclusively: whatever
/// already sits at a name (a symlink, a FIFO, a file left behind) is neither opened nor
/// written through; the next name is tried, up to [`TEMP_TRIES`] of them. `read` also opens it
/// for reading.
pub(crate) fn create_temp_file(
    dir: &Path,
    target: &Path,
    tag: &str,
    read: bool,
) -> io::Result<(PathBuf, File)> {
    let mut tries = 0;
    loop {
        let tmp = temp_name(dir, target, tag);
        match File::options()
            .read(read)
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries + 1 < TEMP_TRIES => {
                tries += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The folder a file `path` lives in ("." for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Why an output cannot be created, worded for the person at the terminal.
pub(crate) fn create_error(target: &Path, e: io::Error) -> Error {
    let hint = match e.kind() {
        io::ErrorKind::NotFound => " (its folder does not exist)",
        io::ErrorKind::PermissionDenied => " (its folder is not writable)",
        _ => "",
    };
    Error::io(
        target,
        io::Error::new(e.kind(), format!("cannot write the output: {e}{hint}")),
    )
}

/// A file being written under a temporary name; [`TempFile::commit`] renames it to the target,
/// dropping it uncommitted deletes it.
pub(crate) struct TempFile {
    tmp: PathBuf,
    target: PathBuf,
    file: Option<File>,
}

impl TempFile {
    /// Creates the temporary file next to `target` (this is also the up-front writability check).
    pub(crate) fn create(target: &Path, tag: &str) -> Result<TempFile> {
        if target.is_dir() {
            return Err(Error::io(
                target,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "is a folder; give a file name (or end the path with / for PNG frames)",
                ),
            ));
        }
        crate::files::check_output_target(target)?;
        let (tmp, file) = create_temp_file(parent_dir(target), target, tag, true)
            .map_err(|e| create_error(target, e))?;
        Ok(TempFile {
            tmp,
            target: target.to_path_buf(),
            file: Some(file),
        })
    }

    /// The open file.
    pub(crate) fn file(&mut self) -> Result<&mut File> {
        let tmp = &self.tmp;
        self.file
            .as_mut()
            .ok_or_else(|| Error::Internal(format!("{} used after commit", tmp.display())))
    }

    /// An I/O error on the temporary file, reported against the target the user named.
    pub(crate) fn err(&self, e: io::Error) -> Error {
        Error::io(&self.target, e)
    }

    /// Flushes to disk and renames to the target (replacing an existing file).
    pub(crate) fn commit(mut self) -> Result<PathBuf> {
        let file = self.file.take();
        let res = (|| -> io::Result<()> {
            if let Some(f) = file {
                f.sync_all()?;
            }
            std::fs::rename(&self.tmp, &self.target)
        })();
        match res {
            Ok(()) => {
                // Committed: nothing left for Drop to remove.
                self.tmp = PathBuf::new();
                Ok(self.target.clone())
            }
            Err(e) => Err(Error::io(&self.target, e)),
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        self.file = None;
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
