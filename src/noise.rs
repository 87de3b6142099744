//! Noise sources: a documented seeded generator, or noise recorded in a file.
//!
//! **Seeded noise.** Every latent frame `f` and slot `s` (0 = the initial noise, `s >= 1` = the
//! renoise drawn after denoising step `s-1`) has its own stream: a xoshiro256++ generator seeded
//! through SplitMix64 from `seed ^ (f * 0x9E37_79B9_7F4A_7C15) ^ (s * 0xD1B5_4A32_D192_ED03)`,
//! producing standard normals with Box–Muller (f64, the cosine branch then the sine branch).
//! A frame's noise therefore does not depend on the video length, the block size or the
//! schedule, and long streams draw noise lazily in constant memory.

use crate::rng::Rng;
use crate::tensorfile::TensorFile;
use crate::{Error, Result};
use std::path::Path;

/// Where the initial noise and the renoise of every frame come from.
#[derive(Clone, Debug)]
pub enum NoiseSource {
    /// The seeded generator described in the module docs.
    Seeded(u64),
    /// Noise recorded in a file (`noise` `[F,16,H,W]`, `renoise` `[F,S-1,16,H,W]`).
    Recorded(RecordedNoise),
}

/// Noise loaded from a safetensors file.
#[derive(Clone, Debug)]
pub struct RecordedNoise {
    noise: Vec<f32>,
    renoise: Vec<f32>,
    frames: usize,
    renoise_steps: usize,
    frame_len: usize,
}

impl RecordedNoise {
    /// Loads `noise` and `renoise` and checks them against the requested generation:
    /// `frames` latent frames of `[channels, height, width]` with `steps` denoising steps.
    pub fn load(
        path: &Path,
        frames: usize,
        ch: usize,
        h: usize,
        w: usize,
        steps: usize,
    ) -> Result<Self> {
        let f = TensorFile::open(path)?;
        let noise = f.tensor_f32("noise", Some(&[frames, ch, h, w]))?;
        let renoise = f.tensor_f32(
            "renoise",
            Some(&[frames, steps.saturating_sub(1), ch, h, w]),
        )?;
        for (name, v) in [("noise", &noise), ("renoise", &renoise)] {
            if v.iter().any(|x| !x.is_finite()) {
                return Err(Error::format(format!(
                    "{}: tensor `{name}` contains NaN or infinite values",
                    path.display()
                )));
            }
        }
        Ok(RecordedNoise {
            noise,
            renoise,
            frames,
            renoise_steps: steps.saturating_sub(1),
            frame_len: ch * h * w,
        })
    }
}

impl NoiseSource {
    /// Fills `out` (one frame, `[16, H, W]`) with the noise of `frame` for `slot`
    /// (0 = initial noise, `s >= 1` = renoise after step `s-1`).
    pub fn fill(&self, frame: usize, slot: usize, out: &mut [f32]) -> Result<()> {
        match self {
            NoiseSource::Seeded(seed) => {
                let s = seed
                    ^ (frame as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ (slot as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
                let mut rng = Rng::new(s);
                out.iter_mut().for_each(|v| *v = rng.normal());
                Ok(())
            }
            NoiseSource::Recorded(r) => {
                if frame >= r.frames || slot > r.renoise_steps || out.len() != r.frame_len {
                    return Err(Error::invalid(format!(
                        "recorded noise has {} frames and {} renoise steps; frame {frame} slot {slot} was requested",
                        r.frames, r.renoise_steps
                    )));
                }
                let src = if slot == 0 {
                    &r.noise[frame * r.frame_len..][..r.frame_len]
                } else {
                    &r.renoise[(frame * r.renoise_steps + slot - 1) * r.frame_len..][..r.frame_len]
                };
                out.copy_from_slice(src);
                Ok(())
            }
        }
    }

    /// The number of frames available (`None` = unbounded).
    pub fn frames(&self) -> Option<usize> {
        match self {
            NoiseSource::Seeded(_) => None,
            NoiseSource::Recorded(r) => Some(r.frames),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_noise_is_standard_normal_and_frame_local() {
        let src = NoiseSource::Seeded(42);
        let mut a = vec![0f32; 20000];
        src.fill(3, 1, &mut a).unwrap();
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
        let mut b = vec![0f32; 20000];
        src.fill(3, 1, &mut b).unwrap();
        assert_eq!(a, b);
        src.fill(3, 2, &mut b).unwrap();
        assert_ne!(a, b);
        NoiseSource::Seeded(43).fill(3, 1, &mut b).unwrap();
        assert_ne!(a, b);
    }
}
