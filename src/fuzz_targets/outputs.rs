//! Fuzz targets of `blockcascade decode`'s input and of the video writers: the latents file
//! (`latents_file`) and output paths, options and frames written into a temp folder
//! (`video_out`), where an error must leave the folder as it was.

use super::{split_files, Scratch};
use crate::decode::{Decoder, DecoderKind, LatentsFile};
use crate::tensorfile::TensorFile;
use crate::video::{VideoFormat, VideoOptions, VideoWriter, MAX_BITRATE, MIN_BITRATE};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Most latent values `latents_file` decodes (frames x height x width): the built-in decoders
/// are small, so this keeps an input well under the fuzzer's timeout.
const DECODE_POSITIONS: usize = 12;

/// The decoders `latents_file` reads for: the built-in tiny TAEHV and a Wan VAE of width 2.
fn decoders() -> &'static [Decoder; 2] {
    static D: OnceLock<[Decoder; 2]> = OnceLock::new();
    D.get_or_init(|| {
        [
            Decoder::tiny_taehv(0),
            Decoder::synthetic(DecoderKind::WanVae, 2, 0),
        ]
    })
}

/// The latents file of `blockcascade decode`, read as the CLI reads it:
///
/// | bytes | meaning                                                                    |
/// |-------|----------------------------------------------------------------------------|
/// | 0     | `--block-frames`: 0 means `usize::MAX`, else the byte                      |
/// | 1     | the decoder: even the built-in tiny TAEHV, odd a Wan VAE of width 2        |
/// | 2..   | the safetensors file                                                       |
///
/// A file that loads is decoded in blocks when it is small (at most 12 frames x positions).
/// Oracles: a loaded file holds `frames * 16 * h * w` finite values in the file's shape; the
/// blocks cover every frame once, none larger than asked; the decoded frame count and size
/// are the decoder's promised ones.
pub fn latents_file(bytes: &[u8]) -> Result<()> {
    let Some(([bf, which], file)) = bytes.split_first_chunk::<2>().map(|(h, f)| (*h, f)) else {
        return Err(Error::invalid("a latents_file input starts with 2 bytes"));
    };
    let block_frames = if bf == 0 { usize::MAX } else { bf as usize };
    let dec = &decoders()[usize::from(which % 2)];
    let s = Scratch::new()?;
    let path = s.write("latents.safetensors", file)?;
    let lat = LatentsFile::load(&path, dec)?;
    let shape = TensorFile::open(&path)?
        .tensors()
        .get("latents")
        .map(|i| i.shape.clone());
    if shape != Some(vec![lat.frames, lat.channels, lat.height, lat.width])
        || lat.data.len() != lat.frames * lat.frame_len()
        || lat.channels != dec.latent_channels()
        || lat.data.iter().any(|v| !v.is_finite())
    {
        return Err(Error::Internal(format!(
            "loaded latents {}x{}x{}x{} ({} values) disagree with the file's shape {shape:?}",
            lat.frames,
            lat.channels,
            lat.height,
            lat.width,
            lat.data.len()
        )));
    }
    let mut covered = 0;
    for (chunk, n) in lat.blocks(block_frames)? {
        if n == 0 || n > block_frames || chunk.len() != n * lat.frame_len() {
            return Err(Error::Internal(format!(
                "a block of {n} frames ({} values) for --block-frames {block_frames}",
                chunk.len()
            )));
        }
        covered += n;
    }
    if covered != lat.frames {
        return Err(Error::Internal(format!(
            "blocks cover {covered} of {} frames",
            lat.frames
        )));
    }
    if lat.frames * lat.height * lat.width > DECODE_POSITIONS {
        return Ok(());
    }
    let mut stream = dec.stream(lat.height, lat.width)?;
    let (ph, pw) = dec.pixel_size(lat.height, lat.width);
    let mut out = 0;
    for (chunk, n) in lat.blocks(block_frames)? {
        let v = stream.push(chunk, n)?;
        if (v.height, v.width) != (ph, pw) || v.data.len() != v.frames * 3 * ph * pw {
            return Err(Error::Internal(format!(
                "decoded {} frames of {}x{} ({} values), expected {ph}x{pw}",
                v.frames,
                v.height,
                v.width,
                v.data.len()
            )));
        }
        out += v.frames;
    }
    if out != dec.pixel_frames(lat.frames) {
        return Err(Error::Internal(format!(
            "{} latent frames decoded to {out} frames, {} promised",
            lat.frames,
            dec.pixel_frames(lat.frames)
        )));
    }
    Ok(())
}

/// Most write calls one `video_out` input makes.
const MAX_WRITES: usize = 8;

/// The output path of `video_out` for selector `k` (`custom` is the input's path part).
fn out_path(k: u8, custom: &[u8]) -> PathBuf {
    match k % 8 {
        0 => "v.mp4".into(),
        1 => "v.y4m".into(),
        2 => "v.safetensors".into(),
        3 => "frames/".into(),
        4 => "f%04d.png".into(),
        5 => "missing/v.y4m".into(),
        6 => "V.Y4M".into(),
        _ => {
            use std::os::unix::ffi::OsStrExt;
            // Relative and inside the scratch folder: no root, no `..`, no NUL; any other
            // bytes (invalid UTF-8 included) stay.
            let mut p = PathBuf::new();
            for part in custom.split(|&b| b == b'/') {
                let part: Vec<u8> = part.iter().copied().filter(|&b| b != 0).collect();
                if part.as_slice() != b".." && !part.is_empty() {
                    p.push(std::ffi::OsStr::from_bytes(&part));
                }
            }
            if custom.ends_with(b"/") {
                p.push("");
            }
            p
        }
    }
}

/// Every file and folder under `dir` (relative paths) with the bytes of each file.
fn listing(dir: &Path) -> Result<BTreeMap<PathBuf, Option<Vec<u8>>>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let p = e.map_err(|e| Error::io(&d, e))?.path();
            let rel = p.strip_prefix(dir).unwrap_or(&p).to_path_buf();
            if p.is_dir() {
                todo.push(p);
                out.insert(rel, None);
            } else {
                let b = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
                out.insert(rel, Some(b));
            }
        }
    }
    Ok(out)
}

/// Video output: a path, options and frames written into a fresh folder.
///
/// | bytes | meaning                                                                      |
/// |-------|------------------------------------------------------------------------------|
/// | 0     | bits 0..3: the path (`v.mp4`, `v.y4m`, `v.safetensors`, `frames/`,           |
/// |       | `f%04d.png`, `missing/v.y4m`, `V.Y4M`, or the input's second part); bit 3:   |
/// |       | the path exists as a folder first; bit 4: as a file; bit 5: dropped unfinished|
/// | 1     | width `1 + b % 8`, height `1 + b / 8 % 8`                                    |
/// | 2     | fps (`b % 8`: 16, 0, -1, NaN, 1e9, 0.01, 1000, 24.5), bit rate (`b / 8 % 8`: |
/// |       | default, 0, 1, `u32::MAX`, the lowest and highest accepted, one past each)   |
/// | 3..   | writes, one byte each and its values: `% 4` = 0 f32 frames, 1 RGB8 frames,   |
/// |       | 2 one value too many, 3 a frame count that overflows; the frame count is     |
/// |       | `b / 4 % 4`; f32 values are bytes mapped to [-1.28, 1.27] (255: NaN, 254: inf)|
///
/// A second part (after the file separator) is the custom path. Oracles: a failed create,
/// write or finish, or a writer dropped unfinished, leaves the folder exactly as it was; a
/// finished video holds every frame written (`.safetensors` bit for bit, `.y4m` by size,
/// PNG frames by count, `.mp4` an `ftyp` box) and nothing else appears.
pub fn video_out(bytes: &[u8]) -> Result<()> {
    let parts = split_files(bytes);
    let mut head = [0u8; 3];
    let n = parts[0].len().min(3);
    head[..n].copy_from_slice(&parts[0][..n]);
    let mut ops = parts[0].get(3..).unwrap_or_default();
    let s = Scratch::new()?;
    let rel = out_path(head[0], parts.get(1).copied().unwrap_or_default());
    let path = s.dir.join(&rel);
    if head[0] & 8 != 0 && !rel.as_os_str().is_empty() {
        let _ = std::fs::create_dir_all(&path);
    }
    // Without a trailing `/`: a file where a PNG folder is asked for.
    let file_path: PathBuf = path.components().collect();
    if head[0] & 16 != 0 && !file_path.exists() {
        if let Some(p) = file_path.parent() {
            let _ = std::fs::create_dir_all(p);
        }
        let _ = std::fs::write(&file_path, b"old");
    }
    let before = listing(&s.dir)?;
    let (w, h) = (
        1 + usize::from(head[1] % 8),
        1 + usize::from(head[1] / 8 % 8),
    );
    let opts = VideoOptions {
        fps: [16.0, 0.0, -1.0, f64::NAN, 1e9, 0.01, 1000.0, 24.5][usize::from(head[2] % 8)],
        bitrate: [
            None,
            Some(0),
            Some(1),
            Some(u32::MAX),
            Some(MIN_BITRATE),
            Some(MAX_BITRATE),
            Some(MIN_BITRATE - 1),
            Some(MAX_BITRATE + 1),
        ][usize::from(head[2] / 8 % 8)],
    };
    let unchanged = |what: &str| -> Result<()> {
        let after = listing(&s.dir)?;
        if after != before {
            let extra: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
            return Err(Error::Internal(format!(
                "{what} changed the output folder (new: {extra:?})"
            )));
        }
        Ok(())
    };
    let mut writer = match VideoWriter::create(&path, w, h, &opts) {
        Ok(wr) => wr,
        Err(e) => {
            unchanged("a failed create")?;
            return Err(e);
        }
    };
    let frame = 3 * w * h;
    let mut written: Vec<f32> = Vec::new();
    let mut f32_frames = true;
    let mut failed = None;
    for _ in 0..MAX_WRITES {
        let Some((&op, rest)) = ops.split_first() else {
            break;
        };
        ops = rest;
        let count = usize::from(op / 4 % 4);
        let take = (count * frame).min(ops.len());
        let mut vals: Vec<f32> = ops[..take]
            .iter()
            .map(|&b| match b {
                255 => f32::NAN,
                254 => f32::INFINITY,
                b => (f32::from(b) - 128.0) / 100.0,
            })
            .collect();
        ops = &ops[take..];
        vals.resize(count * frame, 0.25);
        let r = match op % 4 {
            0 => writer.write_frames(&vals, count),
            1 => {
                let rgb = crate::video::to_rgb8(&vals, count, h, w);
                writer.write_rgb8(&rgb, count)
            }
            2 => {
                vals.push(0.0);
                writer.write_frames(&vals, count)
            }
            _ => writer.write_frames(&vals, usize::MAX / 2 + count),
        };
        match r {
            Ok(()) if op % 4 < 2 => {
                written.extend_from_slice(&vals);
                // (No frames: nothing was written, whatever the kind.)
                f32_frames &= op % 4 == 0 || count == 0;
            }
            Ok(()) => {
                return Err(Error::Internal(format!(
                    "write {} of {} values for {count} frames succeeded",
                    op % 4,
                    vals.len()
                )))
            }
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    let frames = written.len() / frame;
    if writer.frames() != frames {
        return Err(Error::Internal(format!(
            "the writer counts {} frames, {frames} were written",
            writer.frames()
        )));
    }
    let format = writer.format();
    if head[0] & 32 != 0 {
        drop(writer);
        unchanged("a writer dropped unfinished")?;
        return failed.map_or(Ok(()), Err);
    }
    let out = match writer.finish() {
        Ok(p) => p,
        Err(e) => {
            unchanged("a failed finish")?;
            // The first failed write says more than the finish it spoiled.
            return Err(failed.unwrap_or(e));
        }
    };
    // Only the output is new (PNG: its frames, and the folder when it was made).
    let after = listing(&s.dir)?;
    // (Counted by name: a folder's name may hold a `%` and a pattern may be invalid UTF-8.)
    let new_pngs = after
        .iter()
        .filter(|(k, v)| v.is_some() && before.get(*k) != Some(*v))
        .filter(|(k, _)| k.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
        .count();
    check_video(&out, format, &written, frames, (w, h), f32_frames, new_pngs)?;
    for (k, v) in &after {
        let p = s.dir.join(k);
        let is_output = p == out
            || p.starts_with(&out)
            || (format == VideoFormat::Png && p.parent() == Some(out.parent().unwrap_or(&out)));
        if before.get(k) != Some(v) && !is_output {
            return Err(Error::Internal(format!(
                "{} appeared next to the video",
                k.display()
            )));
        }
    }
    Ok(())
}

/// The finished video at `out` holds the `frames` frames written (`values`, f32 when
/// `f32_frames`); `new_pngs` PNG files appeared (or changed) in the folder.
fn check_video(
    out: &Path,
    format: VideoFormat,
    values: &[f32],
    frames: usize,
    (w, h): (usize, usize),
    f32_frames: bool,
    new_pngs: usize,
) -> Result<()> {
    let bad = |m: String| Err(Error::Internal(format!("{}: {m}", out.display())));
    match format {
        VideoFormat::Safetensors => {
            let f = TensorFile::open(out)?;
            let v = f.tensor_f32("video", Some(&[frames, 3, h, w]))?;
            let same = f32_frames
                && v.len() == values.len()
                && v.iter()
                    .zip(values)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
            if !same {
                return bad("the video tensor differs from the frames written".into());
            }
        }
        VideoFormat::Y4m => {
            let b = std::fs::read(out).map_err(|e| Error::io(out, e))?;
            let header = b.iter().position(|&c| c == b'\n').map_or(0, |i| i + 1);
            let per = 6 + w * h + 2 * w.div_ceil(2) * h.div_ceil(2);
            if !b.starts_with(b"YUV4MPEG2 ") || b.len() != header + frames * per {
                return bad(format!("{} bytes for {frames} frames of {w}x{h}", b.len()));
            }
        }
        VideoFormat::Mp4 => {
            let b = std::fs::read(out).map_err(|e| Error::io(out, e))?;
            if b.get(4..8) != Some(b"ftyp".as_slice()) {
                return bad("no ftyp box".into());
            }
        }
        VideoFormat::Png => {
            let pngs = new_pngs;
            if pngs < frames {
                return bad(format!("{pngs} PNG files for {frames} frames"));
            }
        }
    }
    Ok(())
}
