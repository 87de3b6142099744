//! The model's weights on a device (upload: GEMM weights bf16, the rest f32) and the
//! process-wide cache that keeps them there between runs of the same model.

use super::device::{DevPtr, Gpu};
use super::prompt_kv;
use crate::model::Model;
use crate::Result;
use half::bf16;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Per-layer device weights (resident across runs, see [`weight_uploads`]).
#[derive(Clone, Copy)]
pub(super) struct LayerW {
    pub(super) qkv_w: DevPtr,
    pub(super) qkv_b: DevPtr,
    pub(super) o_w: DevPtr,
    pub(super) o_b: DevPtr,
    pub(super) norm_q: DevPtr,
    pub(super) norm_k: DevPtr,
    pub(super) cq_w: DevPtr,
    pub(super) cq_b: DevPtr,
    pub(super) co_w: DevPtr,
    pub(super) co_b: DevPtr,
    pub(super) cnorm_q: DevPtr,
    pub(super) norm3_w: DevPtr,
    pub(super) norm3_b: DevPtr,
    pub(super) ffn0_w: DevPtr,
    pub(super) ffn0_b: DevPtr,
    pub(super) ffn2_w: DevPtr,
    pub(super) ffn2_b: DevPtr,
    pub(super) modulation: DevPtr,
}

/// One layer as a run sees it: the resident weights and this run's KV cache.
pub(super) struct LayerDev {
    pub(super) w: LayerW,
    pub(super) cache_k: DevPtr,
    pub(super) cache_v: DevPtr,
}

impl std::ops::Deref for LayerDev {
    type Target = LayerW;
    fn deref(&self) -> &LayerW {
        &self.w
    }
}

/// The weights of one model on one device.
#[derive(Clone)]
pub(super) struct DevWeights {
    pub(super) patch_w: DevPtr,
    pub(super) patch_b: DevPtr,
    pub(super) head_w: DevPtr,
    pub(super) head_b: DevPtr,
    pub(super) head_mod: DevPtr,
    pub(super) layers: Vec<LayerW>,
    /// Text embedding and cross-attention K/V weights (the prompts' K/V).
    pub(super) prompt: prompt_kv::PromptWeights,
}

/// A device with one model's weights on it, kept between runs.
pub(super) struct Resident {
    pub(super) gpu: Gpu,
    pub(super) w: DevWeights,
}

/// (model id, device ordinal, emulated).
pub(super) type CacheKey = (u64, usize, bool);

/// The process-wide weight cache: devices with weights resident, one per key, not in use.
/// A run takes its key's entry out (so a second run on the same key at the same time, or a
/// second logical device on the same ordinal, finds none and opens its own device and
/// uploads its own weights) and puts it back when it ends, after freeing its per-run buffers;
/// when the key is already back in the cache by then, the later one is dropped.
pub(super) static CACHE: Mutex<Vec<(CacheKey, Resident)>> = Mutex::new(Vec::new());

/// Number of weight uploads (one per model and device opened without resident weights).
pub(super) static WEIGHT_UPLOADS: AtomicUsize = AtomicUsize::new(0);

pub(super) fn cache_lock() -> std::sync::MutexGuard<'static, Vec<(CacheKey, Resident)>> {
    // A model's cached weights go when the model does (registered before anything is cached).
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| crate::model::on_model_drop(evict_model));
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

/// How many times the CUDA backend has uploaded a model's weights to a device in this process.
/// A run finds the weights of its model still on the device when an earlier run of the same
/// [`Model`] on the same device ordinal (and emulation setting) has ended, so a session that
/// generates repeatedly uploads them once.
pub fn weight_uploads() -> usize {
    WEIGHT_UPLOADS.load(Ordering::Relaxed)
}

/// Number of devices held by the weight cache (not counting those in use by a run).
pub fn cached_weight_sets() -> usize {
    cache_lock().len()
}

/// Drops the cached device weights of model `id` (the hook `Drop for Model` runs). Cheap when
/// nothing is cached; never panics.
pub fn evict_model(id: u64) {
    let gone: Vec<Resident> = {
        let mut c = cache_lock();
        if c.is_empty() {
            return;
        }
        let (gone, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut *c)
            .into_iter()
            .partition(|(k, _)| k.0 == id);
        *c = keep;
        gone.into_iter().map(|(_, r)| r).collect()
    };
    // Devices (and their memory) go outside the lock.
    drop(gone);
}

/// Drops every cached device on `ordinal` (emulated or not as `emulate`), to make room.
pub(super) fn evict_ordinal(ordinal: usize, emulate: bool) -> usize {
    let gone: Vec<Resident> = {
        let mut c = cache_lock();
        let (gone, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut *c)
            .into_iter()
            .partition(|(k, _)| k.1 == ordinal && k.2 == emulate);
        *c = keep;
        gone.into_iter().map(|(_, r)| r).collect()
    };
    let n = gone.len();
    drop(gone);
    n
}

pub(super) fn take_cached(key: CacheKey) -> Option<Resident> {
    let mut c = cache_lock();
    let i = c.iter().position(|(k, _)| *k == key)?;
    Some(c.swap_remove(i).1)
}

pub(super) fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// A tensor as it goes to the device: its values, and whether it is stored as bf16 (GEMM
/// weights) or f32 (biases, norms, modulation).
type DevTensor<'a> = (&'a [f32], bool);

/// Every tensor of `model` the backend uploads, in upload order: the patch embedding, the
/// head, then per layer the fields of [`LayerW`] in order. [`upload_weights`] uploads exactly
/// these and [`super::memory::weight_bytes`] counts them.
pub(super) fn weight_tensors(model: &Model) -> Vec<DevTensor<'_>> {
    let d = model.config().dim;
    let wt = &model.weights;
    let mut t: Vec<DevTensor> = vec![
        (&wt.patch_w, true),
        (&wt.patch_b, false),
        (&wt.head.0, true),
        (&wt.head.1, false),
        (&wt.head_modulation, false),
    ];
    for lw in &wt.layers {
        let (sa, ca) = (&lw.self_attn, &lw.cross_attn);
        t.extend([
            (&sa.qkv_w[..], true),
            (&sa.qkv_b[..], false),
            (&sa.o_w[..], true),
            (&sa.o_b[..], false),
            (&sa.norm_q[..], false),
            (&sa.norm_k[..], false),
            (&ca.qkv_w[..d * d], true),
            (&ca.qkv_b[..d], false),
            (&ca.o_w[..], true),
            (&ca.o_b[..], false),
            (&ca.norm_q[..], false),
            (&lw.norm3_w[..], false),
            (&lw.norm3_b[..], false),
            (&lw.ffn0_w[..], true),
            (&lw.ffn0_b[..], false),
            (&lw.ffn2_w[..], true),
            (&lw.ffn2_b[..], false),
            (&lw.modulation[..], false),
        ]);
    }
    t
}

/// Uploads `model`'s weights ([`weight_tensors`]: GEMM weights bf16, the rest f32) to `gpu`.
pub(super) fn upload_weights(gpu: &mut Gpu, model: &Model) -> Result<DevWeights> {
    let mut ptrs = Vec::new();
    for (v, as_bf16) in weight_tensors(model) {
        let p = if as_bf16 {
            let p = gpu.alloc(v.len() * 2)?;
            gpu.upload(p, &to_bf16(v))?;
            p
        } else {
            let p = gpu.alloc(v.len() * 4)?;
            gpu.upload(p, v)?;
            p
        };
        gpu.sync()?;
        ptrs.push(p);
    }
    let layer = |p: &[DevPtr]| LayerW {
        qkv_w: p[0],
        qkv_b: p[1],
        o_w: p[2],
        o_b: p[3],
        norm_q: p[4],
        norm_k: p[5],
        cq_w: p[6],
        cq_b: p[7],
        co_w: p[8],
        co_b: p[9],
        cnorm_q: p[10],
        norm3_w: p[11],
        norm3_b: p[12],
        ffn0_w: p[13],
        ffn0_b: p[14],
        ffn2_w: p[15],
        ffn2_b: p[16],
        modulation: p[17],
    };
    let (global, per_layer) = ptrs.split_at(5);
    Ok(DevWeights {
        patch_w: global[0],
        patch_b: global[1],
        head_w: global[2],
        head_b: global[3],
        head_mod: global[4],
        layers: per_layer.chunks_exact(18).map(layer).collect(),
        prompt: prompt_kv::upload(gpu, model)?,
    })
}
