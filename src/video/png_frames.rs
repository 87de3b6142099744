//! PNG frames: one RGB8 PNG per frame, into a folder (`frame_000000.png`, ...) or after a
//! printf-style pattern (`out/name%04d.png`), numbered from 0.
//!
//! The frames go to a hidden temporary folder first and are moved into place on finish, so an
//! error or a dropped writer leaves no stray frames. (Each move is atomic; the set of moves is
//! not, which only matters if the process dies during finish.)

use super::atomic::{create_error, parent_dir, temp_name};
use crate::error::{Error, Result};
use std::io::BufWriter;
use std::path::{Path, PathBuf};

/// Where the frames end up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PngTarget {
    /// A folder: frames are named `frame_%06d.png`.
    Folder(PathBuf),
    /// A file-name pattern: `dir`, the text before and after the number, and its zero-padded width.
    Pattern {
        dir: PathBuf,
        prefix: String,
        suffix: String,
        digits: usize,
    },
}

impl PngTarget {
    /// The file name of frame `i`.
    fn name(&self, i: usize) -> String {
        match self {
            PngTarget::Folder(_) => format!("frame_{i:06}.png"),
            PngTarget::Pattern {
                prefix,
                suffix,
                digits,
                ..
            } => format!("{prefix}{i:0digits$}{suffix}"),
        }
    }
}

/// Parses a `name%04d.png` (or `%d`) pattern in the file-name part of `path`. `Ok(None)` when the
/// name holds no `%`; an error when it holds one that is not a single `%d`/`%0Nd` or when the
/// extension is not `.png`.
pub(crate) fn parse_pattern(path: &Path) -> Result<Option<PngTarget>> {
    let Some(name) = path.file_name().and_then(|s| s.to_str()) else {
        return Ok(None);
    };
    let Some(pos) = name.find('%') else {
        return Ok(None);
    };
    let bad = || {
        Error::invalid(format!(
            "{}: a frame pattern needs exactly one %d or %0Nd (N at most 9) and the .png \
             extension, e.g. frames/out%04d.png",
            path.display()
        ))
    };
    let (prefix, rest) = name.split_at(pos);
    let rest = &rest[1..];
    let spec_len = rest.find('d').ok_or_else(bad)?;
    let spec = &rest[..spec_len];
    let digits = if spec.is_empty() {
        1
    } else if spec.len() >= 2
        && spec.starts_with('0')
        && spec[1..].bytes().all(|b| b.is_ascii_digit())
    {
        spec[1..].parse::<usize>().map_err(|_| bad())?
    } else {
        return Err(bad());
    };
    let suffix = &rest[spec_len + 1..];
    if digits == 0
        || digits > 9
        || suffix.contains('%')
        || !suffix.to_ascii_lowercase().ends_with(".png")
    {
        return Err(bad());
    }
    Ok(Some(PngTarget::Pattern {
        dir: parent_dir(path).to_path_buf(),
        prefix: prefix.to_string(),
        suffix: suffix.to_string(),
        digits,
    }))
}

pub(crate) struct PngWriter {
    target: PngTarget,
    /// The hidden folder the frames are written to; empty once finished.
    tmp: PathBuf,
    /// Where the caller asked the frames to go (returned by finish).
    path: PathBuf,
    width: usize,
    height: usize,
    frames: usize,
}

impl PngWriter {
    pub(crate) fn create(
        path: &Path,
        target: PngTarget,
        width: usize,
        height: usize,
    ) -> Result<Self> {
        // The temporary folder sits inside an existing target folder (so only that folder needs to
        // be writable), next to a target folder still to be made, or in the pattern's folder.
        let tmp_dir = match &target {
            PngTarget::Folder(dir) if dir.is_dir() => dir.clone(),
            PngTarget::Folder(dir) => {
                if dir.exists() {
                    return Err(Error::io(
                        dir,
                        std::io::Error::new(
                            std::io::ErrorKind::AlreadyExists,
                            "exists and is not a folder",
                        ),
                    ));
                }
                parent_dir(dir).to_path_buf()
            }
            PngTarget::Pattern { dir, .. } => dir.clone(),
        };
        let tmp = temp_name(&tmp_dir, path, "frames-tmp");
        std::fs::create_dir(&tmp).map_err(|e| create_error(path, e))?;
        Ok(PngWriter {
            target,
            tmp,
            path: path.to_path_buf(),
            width,
            height,
            frames: 0,
        })
    }

    /// Where frame `i` ends up, when the target is an existing folder or a pattern (a new
    /// folder is published whole).
    fn final_path(&self, i: usize) -> Option<PathBuf> {
        match &self.target {
            PngTarget::Folder(dir) if !dir.exists() => None,
            PngTarget::Folder(dir) | PngTarget::Pattern { dir, .. } => {
                Some(dir.join(self.target.name(i)))
            }
        }
    }

    /// Refuses to publish frame `i` over what is at its name now: only a regular file (or a
    /// symlink, which is replaced, not followed) may be there. A FIFO, device or socket
    /// (the rule of every output, [`crate::files::check_output_target`]) or a folder would be
    /// replaced by the rename, or would fail it after the frames before it were moved.
    fn check_frame_target(&self, i: usize) -> Result<()> {
        let Some(p) = self.final_path(i) else {
            return Ok(());
        };
        crate::files::check_output_target(&p)?;
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
            return Err(Error::io(
                &p,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a folder sits at this frame's name: move it or name other frames",
                ),
            ));
        }
        Ok(())
    }

    /// Writes `[T][H][W][3]` RGB8 frames.
    pub(crate) fn write_rgb(&mut self, rgb: &[u8]) -> Result<()> {
        for f in rgb.chunks_exact(self.width * self.height * 3) {
            // Checked as each frame comes (an error before the work is spent) and again for
            // all of them before the first is moved (see `move_into_place`).
            self.check_frame_target(self.frames)?;
            let file = self.tmp.join(self.target.name(self.frames));
            self.write_one(&file, f)?;
            self.frames += 1;
        }
        Ok(())
    }

    fn write_one(&self, file: &Path, rgb: &[u8]) -> Result<()> {
        let io_err = |e: std::io::Error| Error::io(&self.path, e);
        let f = std::fs::File::create(file).map_err(io_err)?;
        let (w, h) = (self.width as u32, self.height as u32);
        let mut enc = png::Encoder::new(BufWriter::new(f), w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Fast);
        let png_err = |e: png::EncodingError| match e {
            png::EncodingError::IoError(e) => io_err(e),
            e => Error::Internal(format!("PNG encoder: {e}")),
        };
        let mut w = enc.write_header().map_err(png_err)?;
        w.write_image_data(rgb).map_err(png_err)?;
        w.finish().map_err(png_err)
    }

    pub(crate) fn finish(mut self) -> Result<PathBuf> {
        let tmp = std::mem::take(&mut self.tmp);
        let res = self.move_into_place(&tmp);
        let _ = std::fs::remove_dir_all(&tmp);
        res.map(|()| self.path.clone())
    }

    fn move_into_place(&self, tmp: &Path) -> Result<()> {
        let io_err = |e: std::io::Error| Error::io(&self.path, e);
        match &self.target {
            PngTarget::Folder(dir) if !dir.exists() => {
                // One rename publishes the whole folder.
                std::fs::rename(tmp, dir).map_err(io_err)
            }
            PngTarget::Folder(dir) | PngTarget::Pattern { dir, .. } => {
                // Every target is checked before any frame moves: a refused one leaves none.
                for i in 0..self.frames {
                    self.check_frame_target(i)?;
                }
                for i in 0..self.frames {
                    let name = self.target.name(i);
                    std::fs::rename(tmp.join(&name), dir.join(&name)).map_err(io_err)?;
                }
                Ok(())
            }
        }
    }
}

impl Drop for PngWriter {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let p = parse_pattern(Path::new("out/a_%04d.png")).unwrap().unwrap();
        assert_eq!(p.name(7), "a_0007.png");
        assert_eq!(p.name(123456), "a_123456.png");
        let p = parse_pattern(Path::new("x%d.PNG")).unwrap().unwrap();
        assert_eq!(p.name(12), "x12.PNG");
        assert!(parse_pattern(Path::new("plain.png")).unwrap().is_none());
        for bad in [
            "a%4d.png",
            "a%04x.png",
            "a%04d.jpg",
            "a%d%d.png",
            "a%.png",
            "a%00d.png",
        ] {
            assert!(parse_pattern(Path::new(bad)).is_err(), "{bad}");
        }
    }
}
