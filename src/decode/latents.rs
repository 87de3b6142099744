//! The latents file `blockcascade decode` reads (tensor `latents`, `[F, C, H, W]`, as
//! `generate --out` writes it), checked in full before any decoder or video work: every way the
//! file can be wrong is one error that names the file.

use super::Decoder;
use crate::tensorfile::TensorFile;
use crate::{Error, Result};
use std::path::Path;

/// Latent frames read from a file, `[frames][channels][height][width]` f32, all finite.
#[derive(Debug, Clone, PartialEq)]
pub struct LatentsFile {
    /// The values, frame after frame.
    pub data: Vec<f32>,
    /// Latent frames (at least 1).
    pub frames: usize,
    /// Channels per frame (the decoder's latent channels).
    pub channels: usize,
    /// Latent height.
    pub height: usize,
    /// Latent width.
    pub width: usize,
}

impl LatentsFile {
    /// Reads tensor `latents` of `path` for `decoder`: rank 4, at least one frame, the
    /// decoder's channel count and a latent size it decodes
    /// ([`Decoder::check_latent_size`]), every value finite (a NaN would otherwise decode to
    /// black frames without a word). The shape is checked before the values are read.
    pub fn load(path: &Path, decoder: &Decoder) -> Result<LatentsFile> {
        let file = TensorFile::open(path)?;
        let bad = |m: String| Error::Format(format!("{}: {m}", path.display()));
        let info = file.tensors().get("latents").ok_or_else(|| {
            bad("no tensor `latents` (expected [F,16,H,W], as `generate --out` writes)".into())
        })?;
        let shape = info.shape.clone();
        let [frames, channels, height, width] = shape[..] else {
            return Err(bad(format!(
                "`latents` has shape {shape:?}; expected [F,16,H,W]"
            )));
        };
        if frames == 0 {
            return Err(bad("`latents` has no frames".into()));
        }
        decoder
            .check_latent_size(channels, height, width)
            .map_err(|e| bad(e.to_string()))?;
        let data = file.tensor_f32("latents", Some(&shape))?;
        let per_frame = channels * height * width;
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!(
                "`latents` value {} of frame {} is {} (latents must be finite)",
                i % per_frame,
                i / per_frame,
                data[i]
            )));
        }
        Ok(LatentsFile {
            data,
            frames,
            channels,
            height,
            width,
        })
    }

    /// Values per latent frame.
    pub fn frame_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The frames in blocks of at most `block_frames` (any size from 1 on; a size past the
    /// frame count is one block), each with its frame count.
    pub fn blocks(&self, block_frames: usize) -> Result<impl Iterator<Item = (&[f32], usize)>> {
        if block_frames == 0 {
            return Err(Error::invalid("--block-frames must be at least 1"));
        }
        let per = self.frame_len();
        // At most all frames: `block_frames * per` cannot overflow then.
        let n = block_frames.min(self.frames) * per;
        Ok(self.data.chunks(n).map(move |c| (c, c.len() / per)))
    }
}
