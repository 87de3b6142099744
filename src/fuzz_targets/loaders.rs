//! Fuzz targets of the weight loaders that infer sizes from tensor names and shapes (the Wan
//! VAE and TAEHV decoders, the umT5 text encoder) and of the tokenizer.

use super::{split_files, Scratch};
use crate::decode::{Decoder, DecoderKind};
use crate::text::tokenizer::Tokenizer;
use crate::text::umt5::Umt5;
use crate::{Error, Result};

/// Most multiply-adds a loaded decoder may cost to decode the probe latents (weights times
/// output pixels, an upper bound): the fuzzer's time per input stays well under its timeout.
const DECODE_WORK: usize = 1 << 26;

/// A Wan VAE decoder file (safetensors, upstream names), loaded as a Wan VAE.
pub fn vae_weights(bytes: &[u8]) -> Result<()> {
    decoder(bytes, DecoderKind::WanVae)
}

/// A TAEHV decoder file (safetensors, upstream names), loaded as TAEHV.
pub fn taehv_weights(bytes: &[u8]) -> Result<()> {
    decoder(bytes, DecoderKind::Taehv)
}

/// Loads a decoder of `kind` from `bytes`; one that loads and is small decodes two 1x2 latent
/// frames as a stream of two pushes, and the frame counts and sizes must be the promised ones.
fn decoder(bytes: &[u8], kind: DecoderKind) -> Result<()> {
    let s = Scratch::new()?;
    let d = Decoder::load(&s.write("decoder.safetensors", bytes)?, Some(kind))?;
    if d.kind() != kind {
        return Err(Error::Internal(format!(
            "asked for a {kind} decoder, got {}",
            d.kind()
        )));
    }
    let (h, w) = (1, 2);
    let (ph, pw) = d.pixel_size(h, w);
    let work = (d.weight_bytes() / 4)
        .saturating_mul(ph)
        .saturating_mul(pw)
        .saturating_mul(4);
    if work > DECODE_WORK {
        return Ok(());
    }
    let c = d.latent_channels();
    let mut stream = d.stream(h, w)?;
    let mut done = 0;
    for f in 0..2 {
        let z: Vec<f32> = (0..c * h * w)
            .map(|i| ((i + f) % 7) as f32 * 0.3 - 0.9)
            .collect();
        let v = stream.push(&z, 1)?;
        let want = d.pixel_frames(f + 1) - done;
        done += v.frames;
        if v.frames != want || (v.height, v.width) != (ph, pw) || v.data.len() != want * 3 * ph * pw
        {
            return Err(Error::Internal(format!(
                "latent frame {f}: {} frames of {}x{} ({} values), expected {want} of {ph}x{pw}",
                v.frames,
                v.height,
                v.width,
                v.data.len()
            )));
        }
    }
    if stream.state_bytes() > d.state_bytes(h, w) {
        return Err(Error::Internal(format!(
            "the stream holds {} bytes of state, more than the promised {}",
            stream.state_bytes(),
            d.state_bytes(h, w)
        )));
    }
    Ok(())
}

/// umT5 text-encoder weights, in Wan's or Hugging Face's naming. One part: a single file; more:
/// shards `model-00001.safetensors`, `model-00002.safetensors`, ... of one folder. An encoder
/// that loads encodes three token ids (the first, the last and a middle one).
pub fn umt5_weights(bytes: &[u8]) -> Result<()> {
    let parts = split_files(bytes);
    let s = Scratch::new()?;
    let path = if let [one] = parts[..] {
        s.write("model.safetensors", one)?
    } else {
        for (i, p) in parts.iter().enumerate() {
            s.write(&format!("model-{:05}.safetensors", i + 1), p)?;
        }
        s.dir.clone()
    };
    let m = Umt5::load(&path)?;
    let cfg = m.config().clone();
    let ids = [0, cfg.vocab as i64 - 1, cfg.vocab as i64 / 2];
    let out = m.forward(&ids)?;
    if out.len() != ids.len() * cfg.dim {
        return Err(Error::Internal(format!(
            "{} tokens of width {} gave {} values",
            ids.len(),
            cfg.dim,
            out.len()
        )));
    }
    Ok(())
}

/// Text after a `tokenizer.json` when the input has no second part.
const DEFAULT_TEXT: &str = "A  cat walks on the grass,\trealistic style. 日本語 ÉTÉ";

/// Longest token list asked for.
const TEXT_LEN: usize = 12;

/// A Hugging Face `tokenizer.json`, then (optional second part) the text to encode, as UTF-8
/// (invalid bytes replaced). The encoding must end in the tokenizer's `</s>` and hold at most
/// the asked number of ids.
pub fn tokenizer(bytes: &[u8]) -> Result<()> {
    let parts = split_files(bytes);
    let s = Scratch::new()?;
    let tok = Tokenizer::from_file(&s.write("tokenizer.json", parts[0])?)?;
    let text = match parts.get(1) {
        Some(t) => String::from_utf8_lossy(t).into_owned(),
        None => DEFAULT_TEXT.to_string(),
    };
    let eos = match &tok {
        Tokenizer::Hf { eos, .. } => *eos as i64,
        Tokenizer::Toy => 1,
    };
    for len in [1, TEXT_LEN] {
        let ids = tok.encode(&text, len)?;
        if ids.is_empty() || ids.len() > len || ids.last() != Some(&eos) {
            return Err(Error::Internal(format!(
                "encoding for at most {len} ids gave {ids:?} (`</s>` is {eos})"
            )));
        }
    }
    Ok(())
}
