//! Named decoder weights, from a safetensors file or generated in memory, with the shape checks
//! both decoders share. Every failure is a [`Error::Format`] naming the tensor.

use super::conv::Conv;
use crate::tensorfile::TensorFile;
use crate::{Error, Result};
use std::collections::BTreeMap;

/// Where tensors come from.
enum Store {
    File(TensorFile),
    Mem(BTreeMap<String, (Vec<usize>, Vec<f32>)>),
}

/// A set of named tensors with shape-checked accessors.
pub(crate) struct Weights {
    /// What to call the source in messages (the file path, or "built-in weights").
    what: String,
    shapes: BTreeMap<String, Vec<usize>>,
    store: Store,
}

impl Weights {
    /// Tensors of a safetensors file.
    pub fn file(f: TensorFile) -> Weights {
        let shapes = f
            .tensors()
            .iter()
            .map(|(k, v)| (k.clone(), v.shape.clone()))
            .collect();
        Weights {
            what: f.path().display().to_string(),
            shapes,
            store: Store::File(f),
        }
    }

    /// Tensors held in memory (generated weights).
    pub fn mem(tensors: Vec<(String, Vec<usize>, Vec<f32>)>) -> Weights {
        let shapes = tensors
            .iter()
            .map(|(k, s, _)| (k.clone(), s.clone()))
            .collect();
        Weights {
            what: "built-in weights".into(),
            shapes,
            store: Store::Mem(tensors.into_iter().map(|(k, s, d)| (k, (s, d))).collect()),
        }
    }

    /// Tensor names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.shapes.keys().map(|s| s.as_str())
    }

    /// Whether `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }

    /// Whether any tensor name starts with `prefix`.
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.shapes
            .range(prefix.to_string()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(prefix))
    }

    /// A format error about this source.
    pub fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::format(format!("{}: {msg}", self.what))
    }

    /// Shape of `name`, or a "missing tensor" error.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        self.shapes
            .get(name)
            .map(|s| s.as_slice())
            .ok_or_else(|| self.err(format!("missing tensor `{name}`")))
    }

    /// Values of `name` as f32 (any stored dtype), all finite: a NaN would not even show in
    /// the frames, since the decoders' ReLUs (`max(x, 0)`) turn it into 0.
    pub fn values(&self, name: &str) -> Result<Vec<f32>> {
        let v = match &self.store {
            Store::File(f) => f.tensor_f32(name, None)?,
            Store::Mem(m) => m
                .get(name)
                .map(|(_, d)| d.clone())
                .ok_or_else(|| self.err(format!("missing tensor `{name}`")))?,
        };
        if v.iter().any(|x| !x.is_finite()) {
            return Err(self.err(format!("tensor `{name}` contains NaN or infinite values")));
        }
        Ok(v)
    }

    /// A per-channel vector (`gamma` `[C, 1, ...]` or a bias `[C]`) of exactly `c` values.
    pub fn vector(&self, name: &str, c: usize) -> Result<Vec<f32>> {
        let s = self.shape(name)?;
        if s.first() != Some(&c) || s.iter().product::<usize>() != c {
            return Err(self.err(format!(
                "tensor `{name}` has shape {s:?}, expected {c} channels ([{c}] or [{c}, 1, ...])"
            )));
        }
        self.values(name)
    }

    /// Loads convolution `{prefix}.weight` (and `{prefix}.bias` when present or `bias` is
    /// required) with rank `rank` (4 = conv2d, 5 = conv3d), kernel `k` (time, height, width;
    /// time ignored for conv2d) and `cin` input channels when given.
    pub fn conv(
        &self,
        prefix: &str,
        rank: usize,
        k: (usize, usize, usize),
        cin: Option<usize>,
        bias: bool,
    ) -> Result<Conv> {
        let wn = format!("{prefix}.weight");
        let s = self.shape(&wn)?.to_vec();
        let want_k: Vec<usize> = if rank == 5 {
            vec![k.0, k.1, k.2]
        } else {
            vec![k.1, k.2]
        };
        let ok = s.len() == rank
            && s[2..] == want_k[..]
            && s[0] > 0
            && s[1] > 0
            && cin.is_none_or(|c| s[1] == c);
        if !ok {
            let want = format!(
                "[out, {}, {}]",
                cin.map_or("in".to_string(), |c| c.to_string()),
                want_k
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            return Err(self.err(format!("tensor `{wn}` has shape {s:?}, expected {want}")));
        }
        let bn = format!("{prefix}.bias");
        let b = if bias || self.has(&bn) {
            Some(self.vector(&bn, s[0])?)
        } else {
            None
        };
        let w = self.values(&wn)?;
        Ok(Conv::from_torch(&w, &s, b))
    }
}

/// Random weights for generated decoders: normal values scaled by `1/sqrt(fan_in)` for
/// weights (`fan_in` = product of all dims but the first), 0.02 for biases, 1 for `gamma`.
pub(crate) fn random_tensor(
    rng: &mut crate::rng::Rng,
    name: &str,
    shape: Vec<usize>,
) -> (String, Vec<usize>, Vec<f32>) {
    let n: usize = shape.iter().product();
    let data = if name.ends_with("gamma") {
        vec![1.0; n]
    } else {
        let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
        let s = if name.ends_with("bias") {
            0.02
        } else {
            1.0 / (fan_in as f32).sqrt()
        };
        (0..n).map(|_| rng.normal() * s).collect()
    };
    (name.to_string(), shape, data)
}
