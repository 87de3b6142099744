//! Model weights: loading a model directory (Wan `config.json` + safetensors, single file or
//! shards with `*.safetensors.index.json`, f32/bf16/f16, optional name prefix such as `model.`),
//! validating every tensor against the config before any compute, and the built-in models
//! whose weights are generated from a fixed seed.

use crate::config::{weight_shapes, ModelConfig};
use crate::rng::Rng;
use crate::tensorfile::{Dtype, TensorFile};
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Self- or cross-attention projections of one block.
#[derive(Clone, Debug)]
pub struct AttnWeights {
    /// q, k, v weights stacked `[3*dim, dim]` (one GEMM for all three).
    pub qkv_w: Vec<f32>,
    /// q, k, v biases stacked `[3*dim]`.
    pub qkv_b: Vec<f32>,
    /// Output projection `[dim, dim]`.
    pub o_w: Vec<f32>,
    /// Output bias.
    pub o_b: Vec<f32>,
    /// RMSNorm weight on q.
    pub norm_q: Vec<f32>,
    /// RMSNorm weight on k.
    pub norm_k: Vec<f32>,
}

/// One transformer block.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    /// Self-attention.
    pub self_attn: AttnWeights,
    /// Cross-attention.
    pub cross_attn: AttnWeights,
    /// `norm3` affine weight.
    pub norm3_w: Vec<f32>,
    /// `norm3` affine bias.
    pub norm3_b: Vec<f32>,
    /// FFN in `[ffn_dim, dim]`.
    pub ffn0_w: Vec<f32>,
    /// FFN in bias.
    pub ffn0_b: Vec<f32>,
    /// FFN out `[dim, ffn_dim]`.
    pub ffn2_w: Vec<f32>,
    /// FFN out bias.
    pub ffn2_b: Vec<f32>,
    /// Modulation `[6, dim]`.
    pub modulation: Vec<f32>,
}

/// All weights of a model, in f32.
#[derive(Clone, Debug)]
pub struct Weights {
    /// The config the weights were checked against.
    pub config: ModelConfig,
    /// dtype of the weights as stored on disk.
    pub source_dtype: Dtype,
    /// Patch embedding `[dim, 64]` (input order channel, dh, dw).
    pub patch_w: Vec<f32>,
    /// Patch embedding bias.
    pub patch_b: Vec<f32>,
    /// Text embedding layers (`text_embedding.0`, `.2`).
    pub text: [(Vec<f32>, Vec<f32>); 2],
    /// Time embedding layers (`time_embedding.0`, `.2`).
    pub time: [(Vec<f32>, Vec<f32>); 2],
    /// `time_projection.1` `[6*dim, dim]` and bias.
    pub time_proj: (Vec<f32>, Vec<f32>),
    /// Blocks.
    pub layers: Vec<LayerWeights>,
    /// Head linear `[64, dim]` and bias.
    pub head: (Vec<f32>, Vec<f32>),
    /// Head modulation `[2, dim]`.
    pub head_modulation: Vec<f32>,
}

/// The names of the built-in models.
pub const BUILTIN_MODELS: &[&str] = &["tiny", "medium", "wan-1.3b-shape", "wan-14b-shape"];

/// The config of a built-in model: `tiny` (dim 64, 2 heads, 2 layers, text 16×32: the shape of
/// the golden test model), `medium` (dim 512, 8 heads, 8 layers, ffn 2048, text 512×4096) and
/// `wan-1.3b-shape` / `wan-14b-shape` (the Wan2.1-T2V-1.3B / 14B shapes with random weights,
/// for benchmarks and the scaling model).
pub fn builtin_config(name: &str) -> Result<ModelConfig> {
    let (dim, ffn_dim, num_heads, num_layers, text_len, text_dim) = match name {
        "tiny" => (64, 128, 2, 2, 16, 32),
        "medium" => (512, 2048, 8, 8, 512, 4096),
        "wan-1.3b-shape" => (1536, 8960, 12, 30, 512, 4096),
        "wan-14b-shape" => (5120, 13824, 40, 40, 512, 4096),
        _ => {
            return Err(Error::invalid(format!(
                "unknown built-in model `{name}` (known: {})",
                BUILTIN_MODELS.join(", ")
            )))
        }
    };
    Ok(ModelConfig {
        dim,
        ffn_dim,
        freq_dim: 256,
        num_heads,
        num_layers,
        in_dim: 16,
        out_dim: 16,
        text_len,
        text_dim,
        patch_size: vec![1, 2, 2],
        eps: 1e-6,
        model_type: "t2v".into(),
    })
}

/// Seed of the built-in models' weights.
pub const BUILTIN_SEED: u64 = 0x0B10_CCA5_CADE;

impl Weights {
    /// Loads and validates a model directory.
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            let (kind, msg) = if dir.exists() {
                (
                    std::io::ErrorKind::InvalidInput,
                    "not a directory (a model is a directory with config.json and safetensors weights)",
                )
            } else {
                (std::io::ErrorKind::NotFound, "model directory not found")
            };
            return Err(Error::io(dir, std::io::Error::new(kind, msg)));
        }
        let config = ModelConfig::load(&dir.join("config.json"))?;
        let files = weight_files(dir)?;
        let opened: Vec<TensorFile> = files
            .iter()
            .map(|p| TensorFile::open(p))
            .collect::<Result<_>>()?;
        // stored name -> indices of the files that hold it
        let mut index: HashMap<String, Vec<usize>> = HashMap::new();
        for (fi, f) in opened.iter().enumerate() {
            for name in f.tensors().keys() {
                index.entry(name.clone()).or_default().push(fi);
            }
        }
        let prefix = detect_prefix(index.keys().map(String::as_str));
        let shapes = weight_shapes(&config);
        let mut dtype = None;
        // Validate everything before converting anything.
        for (name, shape) in &shapes {
            let stored = format!("{prefix}{name}");
            let fi = match index.get(&stored).map(Vec::as_slice) {
                Some([fi]) => fi,
                Some([a, b, ..]) => {
                    return Err(Error::format(format!(
                        "{}: tensor `{stored}` is in both {} and {} (which one is meant?)",
                        dir.display(),
                        opened[*a].path().display(),
                        opened[*b].path().display()
                    )))
                }
                _ => {
                    return Err(Error::format(format!(
                        "{}: missing tensor `{stored}` (expected shape {shape:?})",
                        dir.display()
                    )))
                }
            };
            let info = &opened[*fi].tensors()[&stored];
            if &info.shape != shape {
                return Err(Error::format(format!(
                    "{}: tensor `{stored}` has shape {:?}, expected {shape:?} for this config",
                    opened[*fi].path().display(),
                    info.shape
                )));
            }
            match dtype {
                None => dtype = Some(info.dtype),
                Some(d) if d != info.dtype => {
                    return Err(Error::format(format!(
                        "{}: tensor `{stored}` is {} while other weights are {} (mixed dtypes)",
                        opened[*fi].path().display(),
                        info.dtype.name(),
                        d.name()
                    )))
                }
                _ => {}
            }
        }
        // The f32 copies must fit in memory (a model too large for this machine is an error,
        // not an abort of the allocator).
        let bytes = shapes.iter().fold(0usize, |a, (_, s)| {
            a.saturating_add(s.iter().fold(4usize, |p, &d| p.saturating_mul(d)))
        });
        crate::host_memory::ensure(bytes, || {
            format!("{}: the f32 weights of this model", dir.display())
        })?;
        let mut map = HashMap::new();
        for (name, _) in &shapes {
            let stored = format!("{prefix}{name}");
            let f = &opened[index[&stored][0]];
            let v = f.convert(&f.tensors()[&stored]);
            if rayon::iter::ParallelIterator::any(
                rayon::slice::ParallelSlice::par_chunks(&v[..], 1 << 16),
                |c| c.iter().any(|x| !x.is_finite()),
            ) {
                return Err(Error::format(format!(
                    "{}: tensor `{stored}` contains NaN or infinite values",
                    f.path().display()
                )));
            }
            map.insert(name.clone(), v);
        }
        Self::from_map(config, dtype.unwrap_or(Dtype::F32), map)
    }

    /// A built-in model (see [`builtin_config`]) with weights drawn from [`BUILTIN_SEED`]:
    /// linear weights N(0, 1/fan_in), biases N(0, 0.02²), norm weights 1 + N(0, 0.1²),
    /// modulations N(0, 1/dim).
    pub fn builtin(name: &str) -> Result<Self> {
        let config = builtin_config(name)?;
        crate::host_memory::ensure(config.parameter_count().saturating_mul(4), || {
            format!("the f32 weights of the built-in model `{name}`")
        })?;
        Ok(Self::random(config, BUILTIN_SEED))
    }

    /// Random weights with the scheme of [`Weights::builtin`].
    pub fn random(config: ModelConfig, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut map = HashMap::new();
        for (name, shape) in weight_shapes(&config) {
            let n: usize = shape.iter().product();
            let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
            let v: Vec<f32> = if name.ends_with("modulation") {
                let s = 1.0 / (config.dim as f32).sqrt();
                (0..n).map(|_| rng.normal() * s).collect()
            } else if name.contains("norm") && name.ends_with("weight") {
                (0..n).map(|_| 1.0 + 0.1 * rng.normal()).collect()
            } else if name.ends_with("bias") {
                (0..n).map(|_| 0.02 * rng.normal()).collect()
            } else {
                let s = 1.0 / (fan_in as f32).sqrt();
                (0..n).map(|_| rng.normal() * s).collect()
            };
            map.insert(name, v);
        }
        // from_map only fails on a missing name, which weight_shapes rules out.
        Self::from_map(config, Dtype::F32, map).unwrap_or_else(|e| unreachable!("{e}"))
    }

    fn from_map(
        config: ModelConfig,
        source_dtype: Dtype,
        mut m: HashMap<String, Vec<f32>>,
    ) -> Result<Self> {
        fn take(m: &mut HashMap<String, Vec<f32>>, n: &str) -> Result<Vec<f32>> {
            m.remove(n)
                .ok_or_else(|| Error::Internal(format!("weight `{n}` was not loaded")))
        }
        fn pair(m: &mut HashMap<String, Vec<f32>>, p: &str) -> Result<(Vec<f32>, Vec<f32>)> {
            Ok((
                take(m, &format!("{p}.weight"))?,
                take(m, &format!("{p}.bias"))?,
            ))
        }
        let patch = pair(&mut m, "patch_embedding")?;
        let text = [
            pair(&mut m, "text_embedding.0")?,
            pair(&mut m, "text_embedding.2")?,
        ];
        let time = [
            pair(&mut m, "time_embedding.0")?,
            pair(&mut m, "time_embedding.2")?,
        ];
        let time_proj = pair(&mut m, "time_projection.1")?;
        let head = pair(&mut m, "head.head")?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            let attn = |m: &mut HashMap<String, Vec<f32>>, a: &str| -> Result<AttnWeights> {
                let mut qkv_w = Vec::new();
                let mut qkv_b = Vec::new();
                for p in ["q", "k", "v"] {
                    let (w, b) = pair(m, &format!("blocks.{l}.{a}.{p}"))?;
                    qkv_w.extend(w);
                    qkv_b.extend(b);
                }
                let (o_w, o_b) = pair(m, &format!("blocks.{l}.{a}.o"))?;
                Ok(AttnWeights {
                    qkv_w,
                    qkv_b,
                    o_w,
                    o_b,
                    norm_q: take(m, &format!("blocks.{l}.{a}.norm_q.weight"))?,
                    norm_k: take(m, &format!("blocks.{l}.{a}.norm_k.weight"))?,
                })
            };
            let self_attn = attn(&mut m, "self_attn")?;
            let cross_attn = attn(&mut m, "cross_attn")?;
            let (norm3_w, norm3_b) = pair(&mut m, &format!("blocks.{l}.norm3"))?;
            let (ffn0_w, ffn0_b) = pair(&mut m, &format!("blocks.{l}.ffn.0"))?;
            let (ffn2_w, ffn2_b) = pair(&mut m, &format!("blocks.{l}.ffn.2"))?;
            layers.push(LayerWeights {
                self_attn,
                cross_attn,
                norm3_w,
                norm3_b,
                ffn0_w,
                ffn0_b,
                ffn2_w,
                ffn2_b,
                modulation: take(&mut m, &format!("blocks.{l}.modulation"))?,
            });
        }
        let head_modulation = take(&mut m, "head.modulation")?;
        Ok(Weights {
            config,
            source_dtype,
            patch_w: patch.0,
            patch_b: patch.1,
            text,
            time,
            time_proj,
            layers,
            head,
            head_modulation,
        })
    }
}

/// The safetensors files of a model directory: the shards named by an index, or every
/// `*.safetensors` file.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut st = Vec::new();
    let mut idx = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        let name = p
            .file_name()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        if name.ends_with(".safetensors.index.json") {
            idx.push(p);
        } else if name.ends_with(".safetensors") {
            st.push(p);
        }
    }
    idx.sort();
    st.sort();
    if let Some(ip) = idx.first() {
        let text = crate::files::read_regular_file(
            ip,
            "a safetensors weight index",
            crate::files::MAX_JSON_BYTES,
        )?;
        let v: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| Error::format(format!("{}: malformed index: {e}", ip.display())))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::format(format!("{}: no `weight_map` object", ip.display())))?;
        let mut shards: BTreeMap<String, ()> = BTreeMap::new();
        for f in map.values() {
            let f = f.as_str().ok_or_else(|| {
                Error::format(format!(
                    "{}: weight_map values must be file names",
                    ip.display()
                ))
            })?;
            let plain = matches!(
                Path::new(f).components().collect::<Vec<_>>().as_slice(),
                [std::path::Component::Normal(c)] if *c == std::ffi::OsStr::new(f)
            );
            if !plain || f.contains('/') || f.contains('\\') || f.contains("..") {
                return Err(Error::format(format!(
                    "{}: shard name `{f}` must be a plain file name",
                    ip.display()
                )));
            }
            shards.insert(f.to_string(), ());
        }
        return Ok(shards.into_keys().map(|f| dir.join(f)).collect());
    }
    if st.is_empty() {
        return Err(Error::format(format!(
            "{}: no *.safetensors weights found in the model directory",
            dir.display()
        )));
    }
    Ok(st)
}

/// The common prefix in front of the upstream names (e.g. `model.`), found from the patch embedding.
fn detect_prefix<'a>(names: impl Iterator<Item = &'a str>) -> String {
    const ANCHOR: &str = "patch_embedding.weight";
    let mut best: Option<String> = None;
    for n in names {
        if let Some(p) = n.strip_suffix(ANCHOR) {
            if (p.is_empty() || p.ends_with('.')) && best.as_ref().is_none_or(|b| p.len() < b.len())
            {
                best = Some(p.to_string());
            }
        }
    }
    best.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_detection() {
        assert_eq!(
            detect_prefix(["a", "model.patch_embedding.weight"].into_iter()),
            "model."
        );
        assert_eq!(
            detect_prefix(["patch_embedding.weight", "model.patch_embedding.weight"].into_iter()),
            ""
        );
        assert_eq!(detect_prefix(["xpatch_embedding.weight"].into_iter()), "");
    }
}
