//! Video output: decoded frames (`[T, 3, H, W]` f32 in [-1, 1]) streamed, block by block, to a
//! `.safetensors` tensor, an H.264 `.mp4`, a `.y4m` or PNG frames.
//!
//! Every writer is atomic: the data goes to a hidden temporary name next to the target and is
//! renamed on [`VideoWriter::finish`]; a writer dropped before that, or one whose write failed,
//! leaves nothing behind. [`VideoWriter::create`] checks that the output can be written before any
//! decoding work is spent. The formats are described in `docs/formats.md`.

pub(crate) mod atomic;
mod color;
mod mp4;
mod png_frames;
mod safetensors;
mod y4m;

use crate::error::{Error, Result};
use png_frames::PngTarget;
use std::path::{Path, PathBuf};

/// The lowest `.mp4` bit rate accepted (bits per second).
pub const MIN_BITRATE: u32 = 1_000;
/// The highest `.mp4` bit rate accepted (bits per second): H.264 level 5.2 allows 240 Mbit/s,
/// and OpenH264 refuses 500 Mbit/s.
pub const MAX_BITRATE: u32 = 200_000_000;

/// How a video is written.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoOptions {
    /// Frames per second of the `.mp4` and `.y4m` (recorded as metadata in `.safetensors`).
    /// Defaults to 16, Wan2.1's rate.
    pub fps: f64,
    /// Target bit rate of the `.mp4` in bits per second ([`MIN_BITRATE`] to [`MAX_BITRATE`]);
    /// `None` picks about 0.25 bits per pixel.
    pub bitrate: Option<u32>,
}

impl Default for VideoOptions {
    fn default() -> Self {
        VideoOptions {
            fps: 16.0,
            bitrate: None,
        }
    }
}

/// The kind of output, chosen from the path by [`VideoFormat::from_path`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VideoFormat {
    /// `.safetensors`: tensor `video`, f32 `[T, 3, H, W]`, the decoder's output bit for bit.
    Safetensors,
    /// `.mp4`: H.264 (yuv420p) in MP4, playable by ffmpeg and browsers.
    Mp4,
    /// `.y4m`: uncompressed YUV4MPEG2, 4:2:0.
    Y4m,
    /// A folder (existing, or a path ending in `/`) or a `name%04d.png` pattern: RGB8 PNG frames.
    Png,
}

impl VideoFormat {
    /// Picks the format from the path: its extension, a trailing `/` or an existing folder, or a
    /// `%d` pattern. Anything else is a clear error naming the accepted forms.
    pub fn from_path(p: &Path) -> Result<VideoFormat> {
        Ok(Self::classify(p)?.0)
    }

    /// The format and, for PNG frames, where they go.
    fn classify(p: &Path) -> Result<(VideoFormat, Option<PngTarget>)> {
        let s = p.as_os_str().to_string_lossy();
        if s.is_empty() {
            return Err(Error::invalid("the video output path is empty"));
        }
        // Without its trailing slash, so that `file/` is seen to exist (as a file).
        let folder = Ok((
            VideoFormat::Png,
            Some(PngTarget::Folder(p.components().collect())),
        ));
        if s.ends_with('/') || s.ends_with(std::path::MAIN_SEPARATOR) {
            return folder;
        }
        if let Some(t) = png_frames::parse_pattern(p)? {
            return Ok((VideoFormat::Png, Some(t)));
        }
        let ext = p
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            // A known extension wins over an existing folder of that name (which then fails to
            // open as a file, clearly) rather than silently turning into PNG frames.
            Some("safetensors") => Ok((VideoFormat::Safetensors, None)),
            Some("mp4") => Ok((VideoFormat::Mp4, None)),
            Some("y4m") => Ok((VideoFormat::Y4m, None)),
            _ if p.is_dir() => folder,
            Some("png") => Err(Error::invalid(format!(
                "{}: PNG output is one file per frame: give a folder (ending in /) or a pattern \
                 such as frames/out%04d.png",
                p.display()
            ))),
            other => Err(Error::invalid(format!(
                "{}: unknown video format{}; use .mp4, .y4m, .safetensors, a folder ending in / \
                 (PNG frames) or a name%04d.png pattern",
                p.display(),
                other.map(|e| format!(" `.{e}`")).unwrap_or_default()
            ))),
        }
    }
}

/// The format-specific writer behind a [`VideoWriter`].
enum Sink {
    Safetensors(safetensors::SafetensorsWriter),
    Mp4(Box<mp4::Mp4Writer>),
    Y4m(y4m::Y4mWriter),
    Png(png_frames::PngWriter),
}

/// Streams frames to a video file. Create it before decoding (it checks the output is writable),
/// call [`write_frames`](VideoWriter::write_frames) for each decoded block, then
/// [`finish`](VideoWriter::finish); only `finish` makes the output appear.
pub struct VideoWriter {
    sink: Sink,
    format: VideoFormat,
    width: usize,
    height: usize,
    frames: usize,
    /// Set by a failed write: the output is incomplete and `finish` refuses to publish it.
    failed: bool,
}

impl VideoWriter {
    /// Opens a writer for `width x height` frames at `path` (format from
    /// [`VideoFormat::from_path`]). Fails now, before any decoding, on an unknown extension, a bad
    /// size or fps, a missing or unwritable folder, or a size the H.264 encoder cannot code.
    pub fn create(
        path: &Path,
        width: usize,
        height: usize,
        opts: &VideoOptions,
    ) -> Result<VideoWriter> {
        let (format, png_target) = VideoFormat::classify(path)?;
        if width == 0 || height == 0 {
            return Err(Error::invalid(format!(
                "video frame size {width}x{height}: both sides must be at least 1"
            )));
        }
        if width.max(height) > 1 << 16 {
            return Err(Error::invalid(format!(
                "video frame size {width}x{height}: a side exceeds 65536"
            )));
        }
        if !(opts.fps.is_finite() && (0.01..=1000.0).contains(&opts.fps)) {
            return Err(Error::invalid(format!(
                "fps {} is out of range (0.01 to 1000)",
                opts.fps
            )));
        }
        if let Some(b) = opts.bitrate {
            // OpenH264 refuses rates outside this range only when the first frame is coded.
            if !(MIN_BITRATE..=MAX_BITRATE).contains(&b) {
                return Err(Error::invalid(format!(
                    "bit rate {b} bit/s is out of range ({MIN_BITRATE} to {MAX_BITRATE})"
                )));
            }
        }
        let sink = match (format, png_target) {
            (VideoFormat::Safetensors, _) => Sink::Safetensors(
                safetensors::SafetensorsWriter::create(path, width, height, opts.fps)?,
            ),
            (VideoFormat::Mp4, _) => Sink::Mp4(Box::new(mp4::Mp4Writer::create(
                path,
                width,
                height,
                opts.fps,
                opts.bitrate,
            )?)),
            (VideoFormat::Y4m, _) => {
                Sink::Y4m(y4m::Y4mWriter::create(path, width, height, opts.fps)?)
            }
            (VideoFormat::Png, Some(t)) => {
                Sink::Png(png_frames::PngWriter::create(path, t, width, height)?)
            }
            (VideoFormat::Png, None) => {
                return Err(Error::Internal("PNG output without a target".into()))
            }
        };
        Ok(VideoWriter {
            sink,
            format,
            width,
            height,
            frames: 0,
            failed: false,
        })
    }

    /// The format being written.
    pub fn format(&self) -> VideoFormat {
        self.format
    }

    /// Frames written so far.
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Appends `count` frames, `[count, 3, H, W]` f32 in [-1, 1] (values outside are clamped
    /// for the 8-bit formats and kept as they are in `.safetensors`).
    /// Call it once per decoded block. After an error the writer is spent: drop it (nothing is
    /// left on disk).
    pub fn write_frames(&mut self, frames: &[f32], count: usize) -> Result<()> {
        if !self.check_write(frames.len(), count, "values")? {
            return Ok(());
        }
        let res = match &mut self.sink {
            Sink::Safetensors(w) => w.write(frames, count),
            Sink::Mp4(w) => w.write_rgb(&to_rgb8(frames, count, self.height, self.width)),
            Sink::Y4m(w) => w.write_rgb(&to_rgb8(frames, count, self.height, self.width)),
            Sink::Png(w) => w.write_rgb(&to_rgb8(frames, count, self.height, self.width)),
        };
        self.count_written(res, count)
    }

    /// Appends `count` frames already converted to RGB8 `[count][H][W][3]` (as the device
    /// decoder hands them out, by [`to_rgb8`]'s rule). The 8-bit formats only: `.safetensors`
    /// keeps f32 values, so it needs [`VideoWriter::write_frames`]. Errors as `write_frames`.
    pub fn write_rgb8(&mut self, rgb: &[u8], count: usize) -> Result<()> {
        if !self.check_write(rgb.len(), count, "RGB8 bytes")? {
            return Ok(());
        }
        let res = match &mut self.sink {
            Sink::Safetensors(_) => {
                return Err(Error::invalid(
                    ".safetensors output keeps f32 values: write f32 frames, not RGB8",
                ))
            }
            Sink::Mp4(w) => w.write_rgb(rgb),
            Sink::Y4m(w) => w.write_rgb(rgb),
            Sink::Png(w) => w.write_rgb(rgb),
        };
        self.count_written(res, count)
    }

    /// The checks both writes share: the writer not spent, and `len` values (`what`) being
    /// `count` frames of 3xHxW. `Ok(false)` when there is nothing to write.
    fn check_write(&self, len: usize, count: usize, what: &str) -> Result<bool> {
        if self.failed {
            return Err(Error::invalid(
                "an earlier write to this video failed; the output was discarded",
            ));
        }
        let want = count
            .checked_mul(3 * self.width * self.height)
            .ok_or_else(|| Error::invalid(format!("{count} frames overflow")))?;
        if len != want {
            return Err(Error::invalid(format!(
                "{count} frames of 3x{}x{} need {want} {what}, got {len}",
                self.height, self.width
            )));
        }
        Ok(count > 0)
    }

    /// Counts `count` frames written, or spends the writer on an error.
    fn count_written(&mut self, res: Result<()>, count: usize) -> Result<()> {
        match res {
            Ok(()) => {
                self.frames += count;
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    /// Publishes the output under its final name and returns it (for PNG frames, the folder or
    /// pattern given). A video with no frames, or one whose write failed, is an error and leaves
    /// nothing behind.
    pub fn finish(self) -> Result<PathBuf> {
        if self.failed {
            return Err(Error::invalid(
                "an earlier write to this video failed; the output was discarded",
            ));
        }
        if self.frames == 0 {
            return Err(Error::invalid("no frames were written; no video was made"));
        }
        match self.sink {
            Sink::Safetensors(w) => w.finish(),
            Sink::Mp4(w) => w.finish(),
            Sink::Y4m(w) => w.finish(),
            Sink::Png(w) => w.finish(),
        }
    }
}

/// Converts `[count, 3, height, width]` f32 frames in [-1, 1] to `[count][height][width][3]` RGB8.
///
/// Each value maps to `trunc((clamp(x, -1, 1) + 1) * 127.5)` computed in f32 as
/// `x * 127.5 + 127.5`, exactly what Self-Forcing's demo (`tensor_to_base64_frame`) and its
/// `inference.py` (via torchvision's `write_video`, whose uint8 cast truncates) produce, so frames
/// match upstream's byte for byte. (Truncation, not rounding: only 1.0 reaches 255.) NaN maps
/// to 0. If `frames` holds fewer than `count` frames, only the complete frames present are
/// converted.
pub fn to_rgb8(frames: &[f32], count: usize, height: usize, width: usize) -> Vec<u8> {
    let plane = height * width;
    if plane == 0 {
        return Vec::new();
    }
    let count = count.min(frames.len() / (3 * plane));
    let mut out = vec![0u8; count * plane * 3];
    for (src, dst) in frames
        .chunks_exact(3 * plane)
        .zip(out.chunks_exact_mut(3 * plane))
    {
        let (r, rest) = src.split_at(plane);
        let (g, b) = rest.split_at(plane);
        for (i, px) in dst.chunks_exact_mut(3).enumerate() {
            px[0] = to_u8(r[i]);
            px[1] = to_u8(g[i]);
            px[2] = to_u8(b[i]);
        }
    }
    out
}

/// One value in [-1, 1] to 0..=255, truncating like torch's float-to-uint8 cast.
#[inline]
fn to_u8(x: f32) -> u8 {
    (x.clamp(-1.0, 1.0) * 127.5 + 127.5) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rgb8_conversion_truncates_like_upstream() {
        // Values chosen on both sides of the .5 boundaries; the expected codes are
        // floor(x * 127.5 + 127.5) worked out by hand.
        let xs = [
            -1.0f32,
            -2.0,
            1.0,
            3.0,
            0.0,
            0.5,
            -0.5,
            0.004,
            0.0039,
            f32::NAN,
        ];
        let want = [0u8, 0, 255, 255, 127, 191, 63, 128, 127, 0];
        // One 1x1 frame per value, R = G = B.
        let mut frames = Vec::new();
        for &x in &xs {
            frames.extend_from_slice(&[x, x, x]);
        }
        let rgb = to_rgb8(&frames, xs.len(), 1, 1);
        for (i, &w) in want.iter().enumerate() {
            assert_eq!(rgb[3 * i..3 * i + 3], [w, w, w], "x = {}", xs[i]);
        }
    }

    #[test]
    fn rgb8_layout_is_thwc() {
        // 2 frames, 2x3; each value encodes (t, c, y, x) so a transposition shows.
        let (t, h, w) = (2, 2, 3);
        let mut frames = vec![0f32; t * 3 * h * w];
        let code = |ti: usize, c: usize, y: usize, x: usize| (ti * 100 + c * 30 + y * 5 + x) as u8;
        for ti in 0..t {
            for c in 0..3 {
                for y in 0..h {
                    for x in 0..w {
                        // Invert the truncating map: the centre of the code's bucket.
                        let v = (code(ti, c, y, x) as f32 + 0.5) / 127.5 - 1.0;
                        frames[((ti * 3 + c) * h + y) * w + x] = v;
                    }
                }
            }
        }
        let rgb = to_rgb8(&frames, t, h, w);
        for ti in 0..t {
            for y in 0..h {
                for x in 0..w {
                    for c in 0..3 {
                        assert_eq!(rgb[((ti * h + y) * w + x) * 3 + c], code(ti, c, y, x));
                    }
                }
            }
        }
        // A short buffer converts only its complete frames.
        assert_eq!(to_rgb8(&frames[..3 * h * w + 1], 2, h, w).len(), h * w * 3);
    }

    #[test]
    fn formats_from_paths() {
        let ok = |p: &str| VideoFormat::from_path(Path::new(p)).unwrap();
        assert_eq!(ok("a/b.safetensors"), VideoFormat::Safetensors);
        assert_eq!(ok("b.MP4"), VideoFormat::Mp4);
        assert_eq!(ok("b.y4m"), VideoFormat::Y4m);
        assert_eq!(ok("frames/"), VideoFormat::Png);
        assert_eq!(ok("f/x%04d.png"), VideoFormat::Png);
        assert_eq!(ok("."), VideoFormat::Png);
        for bad in ["b.avi", "b", "x.png", "x%4d.png", ""] {
            let e = VideoFormat::from_path(Path::new(bad)).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad}: {e}");
        }
        let e = VideoFormat::from_path(Path::new("b.avi")).unwrap_err();
        assert!(e.to_string().contains(".mp4"), "{e}");
    }
}
