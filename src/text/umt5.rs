//! The umT5 encoder (Wan's `T5Encoder` with `shared_pos=False`, Hugging Face's
//! `UMT5EncoderModel`) on the CPU, in f32 arithmetic.
//!
//! Per layer: `x += O(attn(Q, K, V of rms(x)) + bias)`, `x += fc2(gelu_tanh(gate(h)) * fc1(h))`
//! with `h = rms(x)`; then a final RMS norm. Attention has no `1/sqrt(d)` scale; every layer
//! has its own relative position bias (bidirectional buckets, max distance 128). Only the real
//! tokens are computed: upstream pads to `text_len` but masks the padded keys with the lowest
//! float, whose softmax weight is exactly 0, so the real rows are the same.
//!
//! Weights stay where they are (memory-mapped file, any of f32/bf16/f16) and a linear layer
//! converts a tile of rows at a time to f32 in a per-thread buffer: memory beyond the mapped
//! file is a few MiB per thread plus the activations, never an f32 copy of the model.

use super::TextPrecision;
use crate::tensorfile::{Dtype, TensorFile, TensorInfo};
use crate::{Error, Result};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Largest relative distance with its own bucket range (umT5: 128).
pub const MAX_DISTANCE: usize = 128;
/// Most tokens one prompt may have (umT5 is trained on 512; the position-bias table grows as
/// the square).
pub const MAX_TOKENS: usize = 4096;
/// RMS norm epsilon (umT5: 1e-6).
pub const EPS: f64 = 1e-6;

/// The encoder's sizes, read from the weights' shapes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Umt5Config {
    /// Vocabulary (rows of the token embedding).
    pub vocab: usize,
    /// Model width (the prompt embeddings' width, the DiT's `text_dim`).
    pub dim: usize,
    /// Attention width (heads × head dim).
    pub dim_attn: usize,
    /// Gated-GELU FFN width.
    pub ffn: usize,
    /// Attention heads.
    pub heads: usize,
    /// Layers.
    pub layers: usize,
    /// Relative position buckets (both directions together).
    pub buckets: usize,
}

impl Umt5Config {
    /// The real umT5-XXL encoder's sizes.
    pub fn xxl() -> Self {
        Umt5Config {
            vocab: 256384,
            dim: 4096,
            dim_attn: 4096,
            ffn: 10240,
            heads: 64,
            layers: 24,
            buckets: 32,
        }
    }

    /// Parameters.
    pub fn parameter_count(&self) -> usize {
        let per_layer = 4 * self.dim * self.dim_attn
            + 3 * self.dim * self.ffn
            + 2 * self.dim
            + self.buckets * self.heads;
        self.vocab * self.dim + self.layers * per_layer + self.dim
    }
}

/// Where a weight's values are.
#[derive(Clone)]
enum Src {
    /// An entry of a memory-mapped safetensors file.
    File(Arc<TensorFile>, TensorInfo),
    /// f32 in memory (the built-in encoder).
    F32(Arc<[f32]>),
    /// bf16 bits in memory (benchmark weights).
    Bf16(Arc<[u16]>),
}

/// A row-major `[rows, cols]` weight, converted to f32 on demand.
#[derive(Clone)]
pub(crate) struct Mat {
    src: Src,
    rows: usize,
    cols: usize,
}

impl Mat {
    /// `(rows, cols)`.
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Converts rows `r0..r0 + out.len() / cols` into `out`.
    pub(crate) fn rows_into(&self, r0: usize, out: &mut [f32]) {
        let a = r0 * self.cols;
        let n = out.len();
        match &self.src {
            Src::F32(v) => out.copy_from_slice(&v[a..a + n]),
            Src::Bf16(v) => {
                for (o, &b) in out.iter_mut().zip(&v[a..a + n]) {
                    *o = f32::from_bits((b as u32) << 16);
                }
            }
            Src::File(f, info) => {
                let raw = f.raw(info);
                let s = info.dtype.size();
                let raw = &raw[a * s..(a + n) * s];
                match info.dtype {
                    Dtype::F32 => {
                        for (o, b) in out.iter_mut().zip(raw.chunks_exact(4)) {
                            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                        }
                    }
                    Dtype::BF16 => {
                        for (o, b) in out.iter_mut().zip(raw.chunks_exact(2)) {
                            *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
                        }
                    }
                    Dtype::F16 => {
                        for (o, b) in out.iter_mut().zip(raw.chunks_exact(2)) {
                            *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                        }
                    }
                }
            }
        }
    }

    /// The weight's little-endian bf16 bytes where it is stored as bf16 (the skinny kernel
    /// reads them as they lie).
    pub(crate) fn bf16_bytes(&self) -> Option<&[u8]> {
        match &self.src {
            #[cfg(target_endian = "little")]
            Src::Bf16(v) => {
                // SAFETY: the u16 slice's memory viewed as its 2·len bytes (u8 has no alignment
                // requirement); on a little-endian target those are the little-endian bytes.
                Some(unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, 2 * v.len()) })
            }
            Src::File(f, info) if info.dtype == Dtype::BF16 => Some(f.raw(info)),
            _ => None,
        }
    }

    /// All values as f32 (for the small vectors: norms, position bias tables).
    fn to_vec(&self) -> Vec<f32> {
        let mut v = vec![0.0; self.rows * self.cols];
        self.rows_into(0, &mut v);
        v
    }

    fn from_f32(rows: usize, cols: usize, v: Vec<f32>) -> Self {
        Mat {
            src: Src::F32(v.into()),
            rows,
            cols,
        }
    }
}

/// One encoder layer (the device encoder, `super::cuda`, uploads these).
pub(crate) struct Layer {
    pub(crate) norm1: Vec<f32>,
    pub(crate) q: Mat,
    pub(crate) k: Mat,
    pub(crate) v: Mat,
    pub(crate) o: Mat,
    /// `[buckets, heads]`.
    pub(crate) rel: Vec<f32>,
    pub(crate) norm2: Vec<f32>,
    /// The linear half of the gated FFN (Wan `fc1`, HF `wi_1`).
    pub(crate) fc1: Mat,
    /// The GELU half (Wan `gate.0`, HF `wi_0`).
    pub(crate) gate: Mat,
    pub(crate) fc2: Mat,
}

/// A loaded umT5 encoder.
pub struct Umt5 {
    cfg: Umt5Config,
    embed: Mat,
    layers: Vec<Arc<Layer>>,
    norm: Vec<f32>,
}

/// Tensor names of one naming scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// Wan's `T5Encoder` (`token_embedding.weight`, `blocks.N.attn.q.weight`, ...).
    Wan,
    /// Hugging Face `UMT5EncoderModel` (`shared.weight`, `encoder.block.N.layer.0...`).
    HuggingFace,
}

impl Naming {
    /// Candidate names of the token embedding.
    fn embed(self) -> &'static [&'static str] {
        match self {
            Naming::Wan => &["token_embedding.weight"],
            Naming::HuggingFace => &["shared.weight", "encoder.embed_tokens.weight"],
        }
    }
    fn final_norm(self) -> &'static str {
        match self {
            Naming::Wan => "norm.weight",
            Naming::HuggingFace => "encoder.final_layer_norm.weight",
        }
    }
    /// The names of layer `i`'s tensors: norm1, q, k, v, o, relative position bias, norm2, fc1
    /// (linear half of the FFN), gate (GELU half), fc2.
    pub fn layer_names(self, i: usize) -> [String; 10] {
        match self {
            Naming::Wan => {
                let p = format!("blocks.{i}.");
                [
                    "norm1.weight",
                    "attn.q.weight",
                    "attn.k.weight",
                    "attn.v.weight",
                    "attn.o.weight",
                    "pos_embedding.embedding.weight",
                    "norm2.weight",
                    "ffn.fc1.weight",
                    "ffn.gate.0.weight",
                    "ffn.fc2.weight",
                ]
                .map(|s| format!("{p}{s}"))
            }
            Naming::HuggingFace => {
                let p = format!("encoder.block.{i}.layer.");
                [
                    "0.layer_norm.weight",
                    "0.SelfAttention.q.weight",
                    "0.SelfAttention.k.weight",
                    "0.SelfAttention.v.weight",
                    "0.SelfAttention.o.weight",
                    "0.SelfAttention.relative_attention_bias.weight",
                    "1.layer_norm.weight",
                    "1.DenseReluDense.wi_1.weight",
                    "1.DenseReluDense.wi_0.weight",
                    "1.DenseReluDense.wo.weight",
                ]
                .map(|s| format!("{p}{s}"))
            }
        }
    }
    /// Which naming a set of tensor names uses.
    fn detect(names: &BTreeMap<String, (Arc<TensorFile>, TensorInfo)>) -> Option<Self> {
        let has = |n: &str| names.contains_key(n);
        if has("token_embedding.weight") || names.keys().any(|k| k.starts_with("blocks.")) {
            Some(Naming::Wan)
        } else if Naming::HuggingFace.embed().iter().any(|n| has(n))
            || names.keys().any(|k| k.starts_with("encoder.block."))
        {
            Some(Naming::HuggingFace)
        } else {
            None
        }
    }
}

/// The safetensors files of an encoder: `path` itself, or every `*.safetensors` in the folder.
fn weight_files(path: &Path) -> Result<Vec<std::path::PathBuf>> {
    if !path.is_dir() {
        // A file, or a missing path (reported by opening it).
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<_> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no *.safetensors text encoder weights in this folder (Wan's .pth must be \
                 converted to safetensors first)",
            ),
        ));
    }
    Ok(files)
}

impl Umt5 {
    /// Loads the encoder from a safetensors file or a folder of them (sharded files are merged).
    pub fn load(path: &Path) -> Result<Self> {
        let mut all: BTreeMap<String, (Arc<TensorFile>, TensorInfo)> = BTreeMap::new();
        for f in weight_files(path)? {
            let tf = Arc::new(TensorFile::open(&f)?);
            for (name, info) in tf.tensors() {
                if let Some((other, _)) = all.get(name) {
                    return Err(Error::format(format!(
                        "tensor `{name}` is in both {} and {}",
                        other.path().display(),
                        f.display()
                    )));
                }
                all.insert(name.clone(), (tf.clone(), info.clone()));
            }
        }
        let naming = Naming::detect(&all).ok_or_else(|| {
            Error::format(format!(
                "{}: not a umT5 encoder: expected Wan's tensor names (token_embedding.weight, \
                 blocks.N.attn.q.weight, ...) or Hugging Face UMT5EncoderModel's (shared.weight, \
                 encoder.block.N.layer.0.SelfAttention.q.weight, ...)",
                path.display()
            ))
        })?;
        Self::from_tensors(path, naming, &all)
    }

    fn from_tensors(
        path: &Path,
        naming: Naming,
        all: &BTreeMap<String, (Arc<TensorFile>, TensorInfo)>,
    ) -> Result<Self> {
        let missing = |n: &str| {
            Error::format(format!(
                "{}: missing tensor `{n}` ({naming:?} naming)",
                path.display()
            ))
        };
        let get = |n: &str| -> Result<Mat> {
            let (f, info) = all.get(n).ok_or_else(|| missing(n))?;
            let (rows, cols) = match info.shape.as_slice() {
                [r, c] => (*r, *c),
                [r] => (1, *r),
                s => {
                    return Err(Error::format(format!(
                        "{}: tensor `{n}` has shape {s:?}, expected a matrix or a vector",
                        path.display()
                    )))
                }
            };
            Ok(Mat {
                src: Src::File(f.clone(), info.clone()),
                rows,
                cols,
            })
        };
        let embed_name = naming
            .embed()
            .iter()
            .find(|n| all.contains_key(**n))
            .ok_or_else(|| missing(naming.embed()[0]))?;
        let embed = get(embed_name)?;
        let (vocab, dim) = (embed.rows, embed.cols);
        let l0 = naming.layer_names(0);
        let q0 = get(&l0[1])?;
        let fc0 = get(&l0[7])?;
        let rel0 = get(&l0[5])?;
        let cfg = Umt5Config {
            vocab,
            dim,
            dim_attn: q0.rows,
            ffn: fc0.rows,
            heads: rel0.cols,
            layers: (0..)
                .take_while(|&i| all.contains_key(&naming.layer_names(i)[1]))
                .count(),
            buckets: rel0.rows,
        };
        let bad = |m: String| Error::format(format!("{}: {m}", path.display()));
        if cfg.vocab == 0 || cfg.dim == 0 || cfg.dim_attn == 0 || cfg.ffn == 0 || cfg.heads == 0 {
            return Err(bad(format!("zero-sized encoder: {cfg:?}")));
        }
        if cfg.dim_attn % cfg.heads != 0 {
            return Err(bad(format!(
                "attention width {} is not a multiple of the {} heads",
                cfg.dim_attn, cfg.heads
            )));
        }
        if cfg.buckets < 4 || cfg.buckets % 2 != 0 {
            return Err(bad(format!(
                "{} relative position buckets: need an even number >= 4",
                cfg.buckets
            )));
        }
        let (d, da, f) = (cfg.dim, cfg.dim_attn, cfg.ffn);
        let want: [(usize, usize); 10] = [
            (1, d),
            (da, d),
            (da, d),
            (da, d),
            (d, da),
            (cfg.buckets, cfg.heads),
            (1, d),
            (f, d),
            (f, d),
            (d, f),
        ];
        let check = |n: &str, m: &Mat, (r, c): (usize, usize)| -> Result<()> {
            if (m.rows, m.cols) != (r, c) {
                let shape = all.get(n).map(|t| t.1.shape.clone()).unwrap_or_default();
                let exp = if r == 1 { vec![c] } else { vec![r, c] };
                return Err(bad(format!(
                    "tensor `{n}` has shape {shape:?}, expected {exp:?} (dims read from the \
                     token embedding [{vocab}, {d}] and layer 0)"
                )));
            }
            Ok(())
        };
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let names = naming.layer_names(i);
            let mut m: Vec<Mat> = Vec::with_capacity(10);
            for (n, w) in names.iter().zip(want) {
                let t = get(n)?;
                check(n, &t, w)?;
                m.push(t);
            }
            let [norm1, q, k, v, o, rel, norm2, fc1, gate, fc2]: [Mat; 10] = m
                .try_into()
                .map_err(|_| Error::Internal("layer part count".into()))?;
            layers.push(Arc::new(Layer {
                norm1: norm1.to_vec(),
                q,
                k,
                v,
                o,
                rel: rel.to_vec(),
                norm2: norm2.to_vec(),
                fc1,
                gate,
                fc2,
            }));
        }
        if layers.is_empty() {
            return Err(missing(&l0[1]));
        }
        let norm = get(naming.final_norm())?;
        check(naming.final_norm(), &norm, (1, d))?;
        let norm = norm.to_vec();
        Ok(Umt5 {
            cfg,
            embed,
            layers,
            norm,
        })
    }

    /// An encoder with seeded random weights, initialised as upstream's `init_weights`
    /// (embedding N(0, 1), projections N(0, fan-dependent std), norms 1).
    pub fn random(cfg: &Umt5Config, seed: u64) -> Self {
        let mut rng = crate::rng::Rng::new(seed ^ 0x7E47_E0C0);
        let mut mat = |r: usize, c: usize, std: f64| {
            let v = (0..r * c)
                .map(|_| (rng.normal() as f64 * std) as f32)
                .collect();
            Mat::from_f32(r, c, v)
        };
        let (d, da, f, h, nb) = (cfg.dim, cfg.dim_attn, cfg.ffn, cfg.heads, cfg.buckets);
        let fl = |x: usize| x as f64;
        let embed = mat(cfg.vocab, d, 1.0);
        let layers = (0..cfg.layers)
            .map(|_| {
                Arc::new(Layer {
                    norm1: vec![1.0; d],
                    q: mat(da, d, (fl(d) * fl(da)).powf(-0.5)),
                    k: mat(da, d, fl(d).powf(-0.5)),
                    v: mat(da, d, fl(d).powf(-0.5)),
                    o: mat(d, da, (fl(h) * fl(da)).powf(-0.5)),
                    rel: mat(nb, h, (2.0 * fl(nb) * fl(h)).powf(-0.5)).to_vec(),
                    norm2: vec![1.0; d],
                    fc1: mat(f, d, fl(d).powf(-0.5)),
                    gate: mat(f, d, fl(d).powf(-0.5)),
                    fc2: mat(d, f, fl(f).powf(-0.5)),
                })
            })
            .collect();
        Umt5 {
            cfg: cfg.clone(),
            embed,
            layers,
            norm: vec![1.0; d],
        }
    }

    /// An encoder of `cfg`'s sizes for timing: one layer of random bf16 weights shared by all
    /// layers (the work per layer is the same), and an embedding of `embed_rows` rows (only the
    /// prompt's rows are read). Memory: one layer, not the whole model.
    pub fn bench_bf16(cfg: &Umt5Config, embed_rows: usize, seed: u64) -> Self {
        let gen = |r: usize, c: usize, salt: u64| -> Mat {
            let n = r * c;
            let scale = (c as f32).powf(-0.5) * 1.7;
            let mut v = vec![0u16; n];
            v.par_chunks_mut(1 << 16).enumerate().for_each(|(i, ch)| {
                let mut s = seed
                    ^ salt.wrapping_mul(0x9E37_79B9)
                    ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
                for x in ch {
                    // xorshift64*: uniform in [-1, 1) times `scale`.
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    let u = (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
                    *x = ((u * scale).to_bits() >> 16) as u16;
                }
            });
            Mat {
                src: Src::Bf16(v.into()),
                rows: r,
                cols: c,
            }
        };
        let (d, da, f, h, nb) = (cfg.dim, cfg.dim_attn, cfg.ffn, cfg.heads, cfg.buckets);
        let layer = Arc::new(Layer {
            norm1: vec![1.0; d],
            q: gen(da, d, 1),
            k: gen(da, d, 2),
            v: gen(da, d, 3),
            o: gen(d, da, 4),
            rel: gen(nb, h, 5).to_vec(),
            norm2: vec![1.0; d],
            fc1: gen(f, d, 6),
            gate: gen(f, d, 7),
            fc2: gen(d, f, 8),
        });
        let mut c = cfg.clone();
        c.vocab = embed_rows.max(1);
        Umt5 {
            cfg: c.clone(),
            embed: gen(c.vocab, d, 9),
            layers: vec![layer; cfg.layers],
            norm: vec![1.0; d],
        }
    }

    /// The sizes.
    pub fn config(&self) -> &Umt5Config {
        &self.cfg
    }

    /// The layers.
    pub(crate) fn layers(&self) -> impl Iterator<Item = &Layer> {
        self.layers.iter().map(|l| &**l)
    }

    /// The final RMS norm's weight.
    pub(crate) fn final_norm(&self) -> &[f32] {
        &self.norm
    }

    /// The token embedding rows of `ids` (`[ids.len(), dim]` f32): the encoder's input. Checks
    /// the token count (1..=`max_tokens`) and that every id is in the vocabulary.
    pub(crate) fn embed_rows(&self, ids: &[i64], max_tokens: usize) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let l = ids.len();
        if l == 0 || l > max_tokens {
            return Err(Error::invalid(format!(
                "{l} tokens: the text encoder takes 1..={max_tokens} (lower text_len)"
            )));
        }
        let d = c.dim;
        let mut x = vec![0.0f32; l * d];
        for (row, &id) in x.chunks_mut(d).zip(ids) {
            if id < 0 || id as usize >= c.vocab {
                return Err(Error::invalid(format!(
                    "token id {id} is outside the encoder's vocabulary of {}",
                    c.vocab
                )));
            }
            self.embed.rows_into(id as usize, row);
        }
        Ok(x)
    }

    /// Embeddings `[ids.len(), dim]` of token ids in `precision`: [`TextPrecision::Exact`] is
    /// [`Umt5::forward`], [`TextPrecision::Bf16`] rounds the activations as upstream's bf16
    /// module does (`super::bf16`).
    pub fn forward_with(&self, ids: &[i64], precision: TextPrecision) -> Result<Vec<f32>> {
        match precision {
            TextPrecision::Exact => self.forward(ids),
            TextPrecision::Bf16 => super::bf16::forward(self, ids),
        }
    }

    /// Embeddings `[ids.len(), dim]` of token ids (all real: no padding, no mask), in f32
    /// arithmetic on the weights' values (the exact function).
    pub fn forward(&self, ids: &[i64]) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let l = ids.len();
        let d = c.dim;
        let mut x = self.embed_rows(ids, MAX_TOKENS)?;
        let buckets = bucket_table(l, c.buckets, MAX_DISTANCE);
        let mut h = vec![0.0f32; l * d];
        for layer in &self.layers {
            // Attention block.
            h.copy_from_slice(&x);
            crate::backend::cpu::ops::rms_norm(&mut h, d, EPS, &layer.norm1);
            let q = linear_tiled(&h, l, &layer.q);
            let k = linear_tiled(&h, l, &layer.k);
            let v = linear_tiled(&h, l, &layer.v);
            let a = attention(
                &q,
                &k,
                &v,
                l,
                c.heads,
                c.dim_attn / c.heads,
                &layer.rel,
                &buckets,
            );
            let o = linear_tiled(&a, l, &layer.o);
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            // Gated-GELU FFN block.
            h.copy_from_slice(&x);
            crate::backend::cpu::ops::rms_norm(&mut h, d, EPS, &layer.norm2);
            let mut g = linear_tiled(&h, l, &layer.gate);
            crate::backend::cpu::ops::gelu_tanh(&mut g);
            let lin = linear_tiled(&h, l, &layer.fc1);
            g.iter_mut().zip(&lin).for_each(|(g, u)| *g *= u);
            let y = linear_tiled(&g, l, &layer.fc2);
            x.iter_mut().zip(&y).for_each(|(x, y)| *x += y);
        }
        crate::backend::cpu::ops::rms_norm(&mut x, d, EPS, &self.norm);
        Ok(x)
    }
}

/// Bucket of relative position `rel = key - query`, as upstream's `_relative_position_bucket`
/// (bidirectional) computes it: the logarithmic part in f32, as PyTorch does.
pub fn relative_bucket(rel: i64, buckets: usize, max_distance: usize) -> usize {
    let half = buckets / 2;
    let base = if rel > 0 { half } else { 0 };
    let n = rel.unsigned_abs() as usize;
    let max_exact = half / 2;
    if n < max_exact {
        return base + n;
    }
    let log_ratio = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
    let large =
        ((n as f32 / max_exact as f32).ln() / log_ratio * (half - max_exact) as f32) as usize;
    base + (max_exact + large).min(half - 1)
}

/// `a · b` in f32 with 16 partial sums (lane by lane, so that the compiler vectorizes it),
/// added at the end.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `[l, l]` buckets of `key - query`.
pub fn bucket_table(l: usize, buckets: usize, max_distance: usize) -> Vec<usize> {
    (0..l * l)
        .map(|ij| relative_bucket((ij % l) as i64 - (ij / l) as i64, buckets, max_distance))
        .collect()
}

/// Softmax attention of all `l` queries over all `l` keys, per head, with the bias
/// `rel[bucket(j - i), head]` and no scaling. `q`, `k`, `v`, the output: `[l, heads*hd]`;
/// `buckets` is [`bucket_table`]'s `[l, l]`. The reference of the CUDA kernel
/// `bc_t5_attention`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    l: usize,
    heads: usize,
    hd: usize,
    rel: &[f32],
    buckets: &[usize],
) -> Vec<f32> {
    let exact = AttentionRounding {
        score: |dot, bias| dot + bias,
        prob: |p| p,
        store: |o| o,
    };
    attention_rounded(q, k, v, l, heads, hd, rel, buckets, exact)
}

/// Where an attention rounds (the f32 encoder: nowhere; the bf16 one: as upstream's bf16
/// tensors, see `super::bf16`): the score from the dot product and the bias, each softmax
/// probability, and the stored output value.
pub(crate) struct AttentionRounding<S, P, O> {
    /// `(q·k, bias) -> score`.
    pub score: S,
    /// `exp(s - max) / sum -> p`.
    pub prob: P,
    /// `sum_j p_j v_j -> output element`.
    pub store: O,
}

/// [`attention`] with its roundings given by `r`: per head and query, the scores, their
/// softmax (max subtracted, f32 sum), then `sum_j p_j v_j` accumulated in f32 in key order.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_rounded<T, S, P, O>(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    l: usize,
    heads: usize,
    hd: usize,
    rel: &[f32],
    buckets: &[usize],
    r: AttentionRounding<S, P, O>,
) -> Vec<T>
where
    T: Copy + Default + Send,
    S: Fn(f32, f32) -> f32 + Sync,
    P: Fn(f32) -> f32 + Sync,
    O: Fn(f32) -> T + Sync,
{
    let w = heads * hd;
    let per_head: Vec<Vec<T>> = (0..heads)
        .into_par_iter()
        .map(|hh| {
            let mut out = vec![T::default(); l * hd];
            let mut s = vec![0.0f32; l];
            let mut acc = vec![0.0f32; hd];
            for i in 0..l {
                let qi = &q[i * w + hh * hd..i * w + (hh + 1) * hd];
                for (j, sj) in s.iter_mut().enumerate() {
                    let kj = &k[j * w + hh * hd..j * w + (hh + 1) * hd];
                    *sj = (r.score)(dot(qi, kj), rel[buckets[i * l + j] * heads + hh]);
                }
                let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let mut z = 0.0f32;
                for sj in s.iter_mut() {
                    *sj = (*sj - m).exp();
                    z += *sj;
                }
                acc.fill(0.0);
                for (j, &e) in s.iter().enumerate() {
                    let p = (r.prob)(e / z);
                    let vj = &v[j * w + hh * hd..j * w + (hh + 1) * hd];
                    for (a, &vv) in acc.iter_mut().zip(vj) {
                        *a += p * vv;
                    }
                }
                for (o, &a) in out[i * hd..(i + 1) * hd].iter_mut().zip(&acc) {
                    *o = (r.store)(a);
                }
            }
            out
        })
        .collect();
    let mut out = vec![T::default(); l * w];
    for (hh, ph) in per_head.iter().enumerate() {
        for i in 0..l {
            out[i * w + hh * hd..i * w + (hh + 1) * hd].copy_from_slice(&ph[i * hd..(i + 1) * hd]);
        }
    }
    out
}

/// `y[l, rows] = x[l, cols] · Wᵀ`, converting `W` to f32 a tile of rows at a time (in
/// parallel, one tile buffer per thread).
fn linear_tiled(x: &[f32], l: usize, w: &Mat) -> Vec<f32> {
    let (o, k) = (w.rows, w.cols);
    debug_assert_eq!(x.len(), l * k);
    // The CPU backend's GEMM kernel where it runs (weight rows converted per task tile).
    let mut y = vec![0.0f32; l * o];
    if let Some(wb) = w.bf16_bytes() {
        // A prompt's few rows: bf16 weights widened in registers (the skinny kernel).
        if crate::backend::cpu::gemm_bf16::try_linear_bf16(x, l, k, wb, o, &mut y) {
            return y;
        }
    }
    let rows = |r0: usize, buf: &mut [f32]| w.rows_into(r0, buf);
    crate::backend::cpu::gemm::linear_rows(x, l, k, o, &rows, &mut y);
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_the_t5_table() {
        // Bidirectional, 32 buckets, max distance 128: bucket 8 + floor(8 log16(n / 8)) for
        // distances n >= 8, whose boundaries are n = 8 * 2^(k/2): 11.3, 16, 22.6, 32, 45.3, 64,
        // 90.5, then 15 from 91 on. The exact powers of two (16, 32, 64) are where f32 rounding
        // could tip a bucket.
        let b = |r| relative_bucket(r, 32, 128);
        assert_eq!(
            (0..8).map(|r| b(-r)).collect::<Vec<_>>(),
            (0..8).collect::<Vec<_>>()
        );
        assert_eq!(b(1), 17);
        for (lo, hi, bucket) in [
            (8, 11, 8),
            (12, 15, 9),
            (16, 22, 10),
            (23, 31, 11),
            (32, 45, 12),
            (46, 63, 13),
            (64, 90, 14),
            (91, 127, 15),
            (128, 600, 15),
        ] {
            for n in lo..=hi {
                assert_eq!(b(-n), bucket, "distance -{n}");
                assert_eq!(b(n), bucket + 16, "distance {n}");
            }
        }
    }

    #[test]
    fn tiled_linear_matches_a_naive_product() {
        let mut rng = crate::rng::Rng::new(3);
        let (l, k, o) = (5, 300, 7000);
        let x: Vec<f32> = (0..l * k).map(|_| rng.normal()).collect();
        let wv: Vec<f32> = (0..o * k).map(|_| rng.normal()).collect();
        let w = Mat::from_f32(o, k, wv.clone());
        let y = linear_tiled(&x, l, &w);
        for i in 0..l {
            for r in (0..o).step_by(97) {
                let e: f64 = (0..k)
                    .map(|c| x[i * k + c] as f64 * wv[r * k + c] as f64)
                    .sum();
                assert!((y[i * o + r] as f64 - e).abs() < 1e-3 * (1.0 + e.abs()));
            }
        }
    }
}
