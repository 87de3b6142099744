//! The CUDA backend (DESIGN §5, issue 4): the same joint forward as
//! [`Model::forward_partial`], op for op, on one NVIDIA GPU.
//!
//! - **Probing.** cudarc panics when libcuda or cuBLASLt cannot be loaded, so [`device::probe`]
//!   checks both first; absence is a clean [`Error::Device`]. A build without nvcc reports
//!   [`crate::kernels::NOT_BUILT`].
//! - **Memory.** Everything is allocated when the backend opens: weights (GEMM weights bf16;
//!   norms, biases and modulation f32), activations for the largest window
//!   (`(ceil(S/lag)+1)` blocks), the KV cache (ring of `local_attn` slots as in
//!   [`crate::kv_cache`], or [`CudaOptions::cache_frames`] frames with global attention),
//!   cross-attention K/V slots for the prompts of one window (and the scratch that computes
//!   them), the attention tables. The free
//!   memory is queried first; too little is an [`Error::OutOfMemory`] naming the bytes needed.
//! - **Weight cache.** The device and the weights outlive the run: when the backend is dropped
//!   it syncs, drops its graphs, frees its per-run buffers ([`device::Gpu::free`]) and puts the
//!   device with the weights into a process-wide cache keyed by ([`Model::id`], ordinal,
//!   emulated); the next run of the same model there takes it and skips the upload (and does
//!   not count the weights in the free-memory check). A run holds its entry exclusively: a
//!   concurrent run, or a second logical device on the same ordinal (`--devices 0,0`), opens
//!   its own device and uploads its own weights, and only one of them goes back to the cache.
//!   A device with an error pending is not cached. When a run does not fit, other models'
//!   cached weights on that GPU are dropped first. Dropping the [`Model`] drops its entries.
//!   [`weight_uploads`] and [`cached_weight_sets`] count. The weights are snapshotted at upload:
//!   a model whose `weights` are changed in place after a CUDA run keeps the old device copy.
//! - **Precision.** bf16 activations and weights, f32 accumulation everywhere, f32 residual
//!   stream (bf16 storage of it raises the golden error from 3.7e-3 to 4.6e-3 on the emulated
//!   device, see [`CudaOptions::round_residual_bf16`] and the README), f32 latents, per-frame
//!   conditioning and statistics (as `params.h` says). The time
//!   embedding (a few tiny GEMVs per distinct timestep) is computed on the CPU and uploaded.
//! - **Prompts.** A prompt's cross-attention K/V are computed on the device when the prompt
//!   first needs one of the prompt slots (keyed by [`PromptContext::id`]): text embedding and
//!   per-layer K/V GEMMs written straight into the slot, K RMS-normed in place, eagerly before
//!   the tick's graph (see `prompt_kv.rs`; [`CudaOptions::host_prompt_context`] computes them
//!   on the CPU instead, [`PromptContext::kv`], and uploads them).
//! - **GEMMs** go through cuBLASLt (bf16 in, f32 accumulate, fused bias epilogue, GELU+bias
//!   epilogue for `ffn.0`). Where cuBLASLt has no algorithm for a fused epilogue the GEMM runs
//!   plain and the activation kernel adds the bias / applies the GELU ([`Gpu::gemm`];
//!   `BC_NO_GELU_EPILOGUE=1` / `BC_NO_GEMM_EPILOGUE=1` force that path).
//! - **Graphs.** One tick = one CUDA graph. Per-tick data (latents, conditioning, RoPE
//!   positions, cache slots, attention segment tables) is uploaded to fixed device buffers
//!   before the launch; kernels read it from there. Launch *shapes* (rows, grids, group
//!   counts) are passed by value in the params structs, so a graph is captured once per
//!   distinct window shape ([`ShapeKey`]: member frame counts and roles, cross-attention
//!   groups) and replayed for every later tick of that shape: the first tick of a shape runs
//!   eagerly (warm-up: cuBLASLt heuristics, module load), the second captures, later ones
//!   replay. `BC_NO_GRAPHS=1` (or [`CudaOptions::graphs`] = false) runs everything eagerly.
//! - **Visibility** (which cache slots and window members each member attends to) is built on
//!   the host per tick with exactly the rules of [`Model::forward_partial`].
//!
//! - **Several devices** (`--devices 0,1`, or `0,0` for two logical devices on one GPU):
//!   [`MultiCudaBackend`], joint K/V exchange per layer or lagged exchange once per tick
//!   (`--kv-exchange lagged`), graphs per device (see there).

pub mod attention_tune;
pub mod device;
pub mod emu_device;
pub mod nvml;
pub mod nvtx;
pub mod ops;
mod prompt_kv;

pub use device::{graph_replays, peer_copy_bytes};

static DOUBLE_KV_DEVICES: AtomicUsize = AtomicUsize::new(0);

/// Logical devices opened with double-buffered window K/V in this process
/// ([`CudaOptions::double_kv`]; lets tests check that the overlapped exchange really ran).
pub fn double_kv_devices() -> usize {
    DOUBLE_KV_DEVICES.load(Ordering::Relaxed)
}

use crate::backend::Backend;
use crate::config::GenerateOptions;
use crate::kernels::launch::AttentionTile;
use crate::kernels::params::{BcAttnGroup, BcKvSegment, BC_ACT_ROUND_BF16};
use crate::kv_cache::KvCache;
#[cfg(doc)]
use crate::model::PromptContext;
use crate::model::{Member, Model, CHANNELS};
use crate::window;
use crate::{Error, Result};
use device::{DevPtr, Epilogue, Gpu, Graph, OutType};
use half::bf16;
use ops::{QkArgs, NULL};
use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Options of the CUDA backend that [`GenerateOptions`] does not carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaOptions {
    /// Device ordinal.
    pub device: usize,
    /// Device ordinals of the logical devices of a multi-device run (`--devices 0,1`;
    /// `0,0` runs two logical devices on GPU 0). Empty: `device`, `device + 1`, ... for
    /// [`GenerateOptions::devices`]. With `emulate` every logical device is its own emulated
    /// device.
    pub devices: Vec<usize>,
    /// Capture and replay CUDA graphs, one per window shape and part of the tick (see
    /// [`MultiCudaBackend`] for the parts with several devices; `BC_NO_GRAPHS=1` turns it off).
    pub graphs: bool,
    /// Frames the KV cache holds with global attention when the run's length is not known
    /// (`BC_CUDA_CACHE_FRAMES`, default 21, the Self-Forcing video length); a
    /// [`crate::Generator`] run sizes it for its own frames. Local attention always uses its
    /// ring of `local_attn`.
    pub cache_frames: usize,
    /// Run on an emulated device instead of a GPU (`BC_CUDA_EMULATE=1`): the kernels under the
    /// SIMT emulation layer and GEMMs on the CPU, for testing the backend without a GPU.
    pub emulate: bool,
    /// Compute the prompts' cross-attention K/V on the CPU ([`PromptContext::kv`], f32) and
    /// upload them, instead of on the device (`BC_HOST_PROMPT_CONTEXT=1`; for debugging: about
    /// 150 GFLOP per prompt for Wan-1.3B).
    pub host_prompt_context: bool,
    /// Fuse the bias (and GELU) into cuBLASLt's GEMM epilogue where it has an algorithm for it
    /// (`BC_NO_GEMM_EPILOGUE=1` turns it off: plain GEMMs, then the activation kernel).
    pub fuse_bias: bool,
    /// Measurement aid for the residual-stream precision (issue 4): round the f32 residual
    /// stream to bf16 after every residual add, as bf16 storage of it would. Not faster (the
    /// kernels still move f32); off by default, see the README for the measured error.
    pub round_residual_bf16: bool,
    /// Fuse the GELU of `ffn.0` into cuBLASLt's epilogue (`BC_NO_GELU_EPILOGUE=1` turns it
    /// off: bias epilogue, then the activation kernel).
    pub fuse_gelu: bool,
    /// The attention kernel's tile; `None` (the default) times both on the device at open and
    /// keeps the faster (see [`attention_tune`]; an emulated device uses
    /// [`AttentionTile::Rows128`]). `BC_ATTENTION_TILE=rows64|rows128|auto`.
    pub attention_tile: Option<AttentionTile>,
    /// Multi-device joint exchange: a second pair of window K/V buffers for odd layers, so
    /// the peer copies of one layer overlap the next layer's compute (default; off: single
    /// buffering, each device waits for its outgoing copies before its next layer).
    pub double_kv: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            device: 0,
            devices: Vec::new(),
            graphs: true,
            cache_frames: 21,
            emulate: false,
            host_prompt_context: false,
            fuse_bias: true,
            fuse_gelu: true,
            round_residual_bf16: false,
            attention_tile: None,
            double_kv: true,
        }
    }
}

impl CudaOptions {
    /// Defaults overridden by `BC_CUDA_DEVICE`, `BC_NO_GRAPHS=1`, `BC_CUDA_CACHE_FRAMES`,
    /// `BC_CUDA_EMULATE=1`, `BC_NO_GEMM_EPILOGUE=1`, `BC_NO_GELU_EPILOGUE=1`,
    /// `BC_HOST_PROMPT_CONTEXT=1`.
    pub fn from_env() -> Self {
        let mut o = CudaOptions::default();
        let num = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
        };
        if let Some(d) = num("BC_CUDA_DEVICE") {
            o.device = d;
        }
        if device::env_flag("BC_NO_GRAPHS") {
            o.graphs = false;
        }
        if device::env_flag("BC_CUDA_EMULATE") {
            o.emulate = true;
        }
        if device::env_flag("BC_HOST_PROMPT_CONTEXT") {
            o.host_prompt_context = true;
        }
        if let Some(f) = num("BC_CUDA_CACHE_FRAMES") {
            o.cache_frames = f.max(1);
        }
        if device::env_flag("BC_NO_GEMM_EPILOGUE") {
            o.fuse_bias = false;
        }
        if device::env_flag("BC_NO_GELU_EPILOGUE") {
            o.fuse_gelu = false;
        }
        // An unknown value is an error at open (`env_attention_tile`).
        o.attention_tile = env_attention_tile().ok().flatten();
        o
    }
}

/// `BC_ATTENTION_TILE`: `Ok(None)` when unset or `auto`, an error for an unknown value.
fn env_attention_tile() -> Result<Option<AttentionTile>> {
    match std::env::var("BC_ATTENTION_TILE") {
        Err(_) => Ok(None),
        Ok(v) if v.trim().is_empty() || v.trim() == "auto" => Ok(None),
        Ok(v) => AttentionTile::parse(&v).map(Some).ok_or_else(|| {
            Error::invalid(format!(
                "BC_ATTENTION_TILE={v:?} is not one of rows64, rows128, auto"
            ))
        }),
    }
}

static OVERRIDE: Mutex<Option<CudaOptions>> = Mutex::new(None);

/// Sets the options that [`open`] (and so `--backend cuda` through the executor) uses instead
/// of [`CudaOptions::from_env`]; `None` restores the environment. For tests and benchmarks.
pub fn set_session_options(o: Option<CudaOptions>) {
    *OVERRIDE.lock().unwrap_or_else(|e| e.into_inner()) = o;
}

/// Opens the CUDA backend for `model` with `opts` (what [`crate::backend::cuda_backend`] calls):
/// [`CudaBackend`] on one device, [`MultiCudaBackend`] with `opts.devices > 1`.
///
/// `frames`: the number of frames the run generates, when known. With global attention the
/// KV cache then holds exactly that many frames (a run too long for the GPU fails here, with
/// the bytes it needs, instead of part-way); unknown, it holds [`CudaOptions::cache_frames`].
pub fn open<'m>(
    model: &'m Model,
    opts: &GenerateOptions,
    frames: Option<usize>,
) -> Result<Box<dyn Backend + 'm>> {
    let mut co = OVERRIDE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_else(CudaOptions::from_env);
    if !opts.device_ids.is_empty() {
        co.devices = opts.device_ids.clone();
    }
    co.graphs &= opts.graphs;
    if let (None, Some(f)) = (opts.local_attn, frames) {
        co.cache_frames = f.max(1);
    }
    if opts.devices > 1 || co.devices.len() > 1 {
        return Ok(Box::new(MultiCudaBackend::new(model, opts, co)?));
    }
    Ok(Box::new(CudaBackend::new(model, opts, co)?))
}

/// Per-layer device weights (resident across runs, see [`weight_uploads`]).
#[derive(Clone, Copy)]
struct LayerW {
    qkv_w: DevPtr,
    qkv_b: DevPtr,
    o_w: DevPtr,
    o_b: DevPtr,
    norm_q: DevPtr,
    norm_k: DevPtr,
    cq_w: DevPtr,
    cq_b: DevPtr,
    co_w: DevPtr,
    co_b: DevPtr,
    cnorm_q: DevPtr,
    norm3_w: DevPtr,
    norm3_b: DevPtr,
    ffn0_w: DevPtr,
    ffn0_b: DevPtr,
    ffn2_w: DevPtr,
    ffn2_b: DevPtr,
    modulation: DevPtr,
}

/// One layer as a run sees it: the resident weights and this run's KV cache.
struct LayerDev {
    w: LayerW,
    cache_k: DevPtr,
    cache_v: DevPtr,
}

impl std::ops::Deref for LayerDev {
    type Target = LayerW;
    fn deref(&self) -> &LayerW {
        &self.w
    }
}

/// The weights of one model on one device.
#[derive(Clone)]
struct DevWeights {
    patch_w: DevPtr,
    patch_b: DevPtr,
    head_w: DevPtr,
    head_b: DevPtr,
    head_mod: DevPtr,
    layers: Vec<LayerW>,
    /// Text embedding and cross-attention K/V weights (the prompts' K/V).
    prompt: prompt_kv::PromptWeights,
}

/// A device with one model's weights on it, kept between runs.
struct Resident {
    gpu: Gpu,
    w: DevWeights,
}

/// (model id, device ordinal, emulated).
type CacheKey = (u64, usize, bool);

/// The process-wide weight cache: devices with weights resident, one per key, not in use.
/// A run takes its key's entry out (so a second run on the same key at the same time, or a
/// second logical device on the same ordinal, finds none and opens its own device and
/// uploads its own weights) and puts it back when it ends, after freeing its per-run buffers;
/// when the key is already back in the cache by then, the later one is dropped.
static CACHE: Mutex<Vec<(CacheKey, Resident)>> = Mutex::new(Vec::new());

/// Number of weight uploads (one per model and device opened without resident weights).
static WEIGHT_UPLOADS: AtomicUsize = AtomicUsize::new(0);

fn cache_lock() -> std::sync::MutexGuard<'static, Vec<(CacheKey, Resident)>> {
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
fn evict_ordinal(ordinal: usize, emulate: bool) -> usize {
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

fn take_cached(key: CacheKey) -> Option<Resident> {
    let mut c = cache_lock();
    let i = c.iter().position(|(k, _)| *k == key)?;
    Some(c.swap_remove(i).1)
}

/// Activation buffers and tables.
struct Bufs {
    lat: DevPtr,
    flow: DevPtr,
    patches: DevPtr,
    x: DevPtr,
    y: DevPtr,
    qkv: DevPtr,
    q: DevPtr,
    k: DevPtr,
    v: DevPtr,
    att: DevPtr,
    ffn: DevPtr,
    head: DevPtr,
    e: DevPtr,
    e0: DevPtr,
    frame_pos: DevPtr,
    frame_slot: DevPtr,
    sa_segs: DevPtr,
    sa_index: DevPtr,
    sa_groups: DevPtr,
    ca_segs: DevPtr,
    ca_index: DevPtr,
    ca_groups: DevPtr,
    prompt_kv: DevPtr,
    /// Scratch of the prompts' text embedding ([`prompt_kv::scratch_bytes`]).
    prompt_scratch: DevPtr,
}

/// What a captured graph depends on besides device-memory contents: per member (frames,
/// context), and the member runs that share a prompt in cross-attention.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ShapeKey {
    members: Vec<(usize, bool)>,
    cross_runs: Vec<usize>,
}

/// A captured graph's identity: the window shape and which part of the work it holds. The
/// part is an enum so that two kinds of work with the same window shape (a whole one-device
/// tick or recache chunk, and part 0 of a multi-device tick) never share a graph.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct GraphKey {
    shape: ShapeKey,
    part: Part,
}

/// Which part of a tick a graph holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Part {
    /// A whole forward on one device (a one-device tick, or a recache chunk).
    Whole,
    /// Several devices, joint exchange: the work between K/V exchanges `i - 1` and `i`
    /// (0: embedding + layer 0's q/k/v; `i`: layer `i-1`'s attention and FFN + layer `i`'s
    /// q/k/v; the last one ends with the head).
    Joint(usize),
    /// Several devices, lagged exchange: the whole tick writing K/V generation `g` (its
    /// buffers are baked into the graph).
    Lagged(usize),
}

enum GraphState {
    /// Seen once (ran eagerly as warm-up).
    Warm,
    /// Captured.
    Ready(Graph),
}

/// A run of keys: cache slots or window rows.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Src {
    Cache {
        slot: usize,
        frames: usize,
    },
    Win {
        row: usize,
        rows: usize,
    },
    /// Rows of the previous tick's K/V (lagged exchange), in that tick's row layout.
    Prev {
        row: usize,
        rows: usize,
    },
}

/// Lagged exchange, as one device sees a tick: per member, the first row of its previous-tick
/// K/V in `prev_kv` (`None`: not available, the member is not attended to), for members this
/// device does not compute; and per layer the (K, V) buffers of the previous tick.
struct LagView<'a> {
    prev_row: &'a [Option<usize>],
    prev_kv: &'a [(DevPtr, DevPtr)],
}

fn push_src(v: &mut Vec<Src>, s: Src) {
    if let Some(last) = v.last_mut() {
        match (last, s) {
            (
                Src::Cache { slot, frames },
                Src::Cache {
                    slot: s2,
                    frames: f2,
                },
            ) if *slot + *frames == s2 => {
                *frames += f2;
                return;
            }
            (Src::Win { row, rows }, Src::Win { row: r2, rows: n2 })
            | (Src::Prev { row, rows }, Src::Prev { row: r2, rows: n2 })
                if *row + *rows == r2 =>
            {
                *rows += n2;
                return;
            }
            _ => {}
        }
    }
    v.push(s);
}

/// The CUDA backend: one device, its weights, activations, KV cache and graphs.
pub struct CudaBackend<'m> {
    graphs: HashMap<GraphKey, GraphState>,
    graphs_ok: bool,
    /// Taken out in `Drop` (back to the weight cache, or dropped).
    gpu: ManuallyDrop<Gpu>,
    /// Where the weights' cache entry goes back to.
    key: CacheKey,
    /// Per-run allocations (activations, KV cache, tables, lagged-exchange buffers), freed
    /// when the run ends; the weights stay.
    run_allocs: Vec<DevPtr>,
    model: &'m Model,
    opts: GenerateOptions,
    copts: CudaOptions,
    geom: KvCache,
    slots: usize,
    max_frames: usize,
    max_members: usize,
    seg_max: usize,
    w: DevWeights,
    layers: Vec<LayerDev>,
    b: Bufs,
    /// Per prompt slot: (prompt id, last tick that used it).
    prompt_slots: Vec<Option<(u64, usize)>>,
    time_cache: HashMap<u64, (Vec<f32>, Vec<f32>)>,
    cache_bytes: usize,
    ticks: usize,
    attn_tile: AttentionTile,
    attn_tune: Option<attention_tune::TuneResult>,
    /// The window K/V buffers of odd layers when double-buffered ([`Self::kv_bufs`]).
    kv_odd: Option<(DevPtr, DevPtr)>,
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// Uploads `model`'s weights (GEMM weights bf16, the rest f32) to `gpu`.
fn upload_weights(gpu: &mut Gpu, model: &Model) -> Result<DevWeights> {
    let d = model.config().dim;
    let wt = &model.weights;
    let up_bf = |gpu: &mut Gpu, v: &[f32]| -> Result<DevPtr> {
        let p = gpu.alloc(v.len() * 2)?;
        gpu.upload(p, &to_bf16(v))?;
        gpu.sync()?;
        Ok(p)
    };
    let up_f = |gpu: &mut Gpu, v: &[f32]| -> Result<DevPtr> {
        let p = gpu.alloc(v.len() * 4)?;
        gpu.upload(p, v)?;
        gpu.sync()?;
        Ok(p)
    };
    let patch_w = up_bf(gpu, &wt.patch_w)?;
    let patch_b = up_f(gpu, &wt.patch_b)?;
    let head_w = up_bf(gpu, &wt.head.0)?;
    let head_b = up_f(gpu, &wt.head.1)?;
    let head_mod = up_f(gpu, &wt.head_modulation)?;
    let mut layers = Vec::with_capacity(wt.layers.len());
    for lw in &wt.layers {
        let (sa, ca) = (&lw.self_attn, &lw.cross_attn);
        layers.push(LayerW {
            qkv_w: up_bf(gpu, &sa.qkv_w)?,
            qkv_b: up_f(gpu, &sa.qkv_b)?,
            o_w: up_bf(gpu, &sa.o_w)?,
            o_b: up_f(gpu, &sa.o_b)?,
            norm_q: up_f(gpu, &sa.norm_q)?,
            norm_k: up_f(gpu, &sa.norm_k)?,
            cq_w: up_bf(gpu, &ca.qkv_w[..d * d])?,
            cq_b: up_f(gpu, &ca.qkv_b[..d])?,
            co_w: up_bf(gpu, &ca.o_w)?,
            co_b: up_f(gpu, &ca.o_b)?,
            cnorm_q: up_f(gpu, &ca.norm_q)?,
            norm3_w: up_f(gpu, &lw.norm3_w)?,
            norm3_b: up_f(gpu, &lw.norm3_b)?,
            ffn0_w: up_bf(gpu, &lw.ffn0_w)?,
            ffn0_b: up_f(gpu, &lw.ffn0_b)?,
            ffn2_w: up_bf(gpu, &lw.ffn2_w)?,
            ffn2_b: up_f(gpu, &lw.ffn2_b)?,
            modulation: up_f(gpu, &lw.modulation)?,
        });
    }
    Ok(DevWeights {
        patch_w,
        patch_b,
        head_w,
        head_b,
        head_mod,
        layers,
        prompt: prompt_kv::upload(gpu, model)?,
    })
}

impl<'m> CudaBackend<'m> {
    /// Opens device `copts.device` and allocates everything a session with `opts` needs.
    pub fn new(model: &'m Model, opts: &GenerateOptions, copts: CudaOptions) -> Result<Self> {
        if opts.devices > 1 {
            return Err(Error::Unsupported(
                "CudaBackend runs on one device: use MultiCudaBackend (or cuda::open) for --devices > 1".into(),
            ));
        }
        let ordinal = copts.devices.first().copied().unwrap_or(copts.device);
        Self::open_device(model, opts, copts, ordinal)
    }

    /// One logical device on GPU `ordinal` (or an emulated device), ignoring `opts.devices`.
    fn open_device(
        model: &'m Model,
        opts: &GenerateOptions,
        copts: CudaOptions,
        ordinal: usize,
    ) -> Result<Self> {
        let c = model.config();
        let (d, hd) = (c.dim, c.head_dim());
        if hd % 8 != 0 || hd > 128 || d % 8 != 0 {
            return Err(Error::Unsupported(format!(
                "the CUDA kernels need head_dim a multiple of 8 and at most 128 (model: {hd})"
            )));
        }
        let (h, w) = (opts.height, opts.width);
        if h == 0 || w == 0 || h % 2 != 0 || w % 2 != 0 {
            return Err(Error::invalid(format!(
                "latent size {h}x{w} must be positive and even"
            )));
        }
        let key: CacheKey = (model.id(), ordinal, copts.emulate);
        // A cached device with this model's weights, or a fresh one (none cached, or another
        // run / logical device on this ordinal holds the entry).
        let (mut gpu, resident) = match take_cached(key) {
            Some(r) => {
                r.gpu.bind()?;
                (r.gpu, Some(r.w))
            }
            None if copts.emulate => (Gpu::open_emulated()?, None),
            None => (Gpu::open(ordinal)?, None),
        };
        gpu.fused_epilogues = copts.fuse_bias;
        gpu.gelu_epilogue = copts.fuse_gelu;
        // Sizes come from user options (latent size, block frames, steps, run length): every
        // product is checked, and the byte plan is summed in u128, so a size too large for
        // any GPU is an out-of-memory error, never an overflow.
        let too_big = |what: &str| {
            Error::OutOfMemory(format!(
                "the CUDA buffers for {what} are larger than any device's memory"
            ))
        };
        let tpf = (h / 2)
            .checked_mul(w / 2)
            .ok_or_else(|| too_big("the latent size"))?;
        let flen = CHANNELS
            .checked_mul(tpf)
            .and_then(|v| v.checked_mul(4))
            .ok_or_else(|| too_big("the latent size"))?;
        let row = tpf
            .checked_mul(d)
            .ok_or_else(|| too_big("the latent size"))?;
        let geom = KvCache::new(0, row, opts.local_attn, opts.sink)?;
        let slots = match opts.local_attn {
            Some(l) => l,
            None => copts.cache_frames,
        };
        let steps = opts.steps.len().max(1);
        let lag = opts.lag().clamp(1, steps);
        let max_members = steps.div_ceil(lag) + 1;
        let max_frames = max_members
            .checked_mul(opts.block_frames.max(1))
            .ok_or_else(|| too_big("the window"))?;
        let n = max_frames
            .checked_mul(tpf)
            .ok_or_else(|| too_big("the window"))?;
        let seg_max = slots
            .checked_add(max_frames)
            .and_then(|v| v.checked_add(max_members))
            .and_then(|v| v.checked_mul(max_members))
            .and_then(|v| v.checked_add(4))
            .ok_or_else(|| too_big("the attention tables"))?;
        let pslots = max_members;
        let l = c.num_layers;
        let (ffn, tl) = (c.ffn_dim, c.text_len);
        // Byte plan (u128: no product of these can overflow it).
        let u = |v: usize| v as u128;
        let (bf, f4) = (2u128, 4u128);
        let (du, lu, nu, ffu, mfu, mmu, su) = (
            u(d),
            u(l),
            u(n),
            u(ffn),
            u(max_frames),
            u(max_members),
            u(seg_max),
        );
        let seg = u(std::mem::size_of::<BcKvSegment>());
        let per_layer_w = bf * (3 * du * du + du * du + du * du + du * du + 2 * ffu * du)
            + f4 * (3 * du + du + 2 * du + du + du + du + 2 * du + ffu + du + 6 * du);
        let cache_layer = 2 * bf * u(slots) * u(tpf) * du;
        let weights = lu * per_layer_w
            + bf * (du * 64 + 64 * du)
            + f4 * (du + 64 + 2 * du)
            + prompt_kv::weight_bytes(c);
        let acts = 2 * f4 * mfu * u(flen)
            + bf * nu * 64
            + f4 * nu * du
            + bf * nu * du * 6
            + bf * nu * ffu
            + bf * nu * 64
            + f4 * mfu * 7 * du
            + 2 * f4 * mfu
            + lu * su * seg
            + f4 * mmu * su
            + 16 * mmu
            + lu * u(pslots) * seg
            + f4 * mmu
            + 16 * mmu;
        // Prompt K/V slots and the scratch of their computation.
        let slot_bytes = u(pslots) * lu * 2 * bf * u(tl) * du;
        let scratch_bytes = prompt_kv::scratch_bytes(c);
        let prompts = slot_bytes + scratch_bytes;
        // Resident weights (and the GEMM workspace of a device already open) are not needed
        // again.
        let fresh = resident.is_none();
        let upload = if fresh {
            weights + u(device::GEMM_WORKSPACE)
        } else {
            0
        };
        let need = upload + lu * cache_layer + acts + prompts;
        let (mut free, mut total) = gpu.mem_info()?;
        // Allocation granularity and the driver's own needs.
        let margin = 64u128 << 20;
        if need + margin > u(free) && !copts.emulate && evict_ordinal(ordinal, false) > 0 {
            // Other models' cached weights on this GPU made way.
            gpu.bind()?;
            (free, total) = gpu.mem_info()?;
        }
        // From here on every size below is at most `need`, which fits in `free`: the usize
        // arithmetic of the allocations cannot overflow.
        if need + margin > u(free) {
            return Err(Error::OutOfMemory(format!(
                "the CUDA backend needs {need} bytes ({:.2} GiB: weights {:.2}{}, KV cache {:.2}, activations {:.2}, prompts {:.2}) but only {free} of {total} bytes are free on {}",
                need as f64 / (1u64 << 30) as f64,
                weights as f64 / (1u64 << 30) as f64,
                if fresh { "" } else { " already resident, not counted" },
                (lu * cache_layer) as f64 / (1u64 << 30) as f64,
                acts as f64 / (1u64 << 30) as f64,
                prompts as f64 / (1u64 << 30) as f64,
                gpu.name
            )));
        }
        let w = match resident {
            Some(w) => w,
            None => {
                let w = upload_weights(&mut gpu, model)?;
                WEIGHT_UPLOADS.fetch_add(1, Ordering::Relaxed);
                w
            }
        };
        let bf = 2usize;
        let cb = slots * tpf * d * bf;
        let mut run_allocs = Vec::new();
        let mut a = |bytes: usize| -> Result<DevPtr> {
            let p = gpu.alloc(bytes)?;
            run_allocs.push(p);
            Ok(p)
        };
        let caches = (0..l)
            .map(|_| Ok((a(cb)?, a(cb)?)))
            .collect::<Result<Vec<_>>>()?;
        let b = Bufs {
            lat: a(4 * max_frames * flen)?,
            flow: a(4 * max_frames * flen)?,
            patches: a(bf * n * 64)?,
            x: a(4 * n * d)?,
            y: a(bf * n * d)?,
            qkv: a(bf * n * 3 * d)?,
            q: a(bf * n * d)?,
            k: a(bf * n * d)?,
            v: a(bf * n * d)?,
            att: a(bf * n * d)?,
            ffn: a(bf * n * ffn)?,
            head: a(bf * n * 64)?,
            e: a(4 * max_frames * d)?,
            e0: a(4 * max_frames * 6 * d)?,
            frame_pos: a(4 * max_frames)?,
            frame_slot: a(4 * max_frames)?,
            sa_segs: a(l * seg_max * std::mem::size_of::<BcKvSegment>())?,
            sa_index: a(4 * max_members * seg_max)?,
            sa_groups: a(std::mem::size_of::<BcAttnGroup>() * max_members)?,
            ca_segs: a(l * pslots * std::mem::size_of::<BcKvSegment>())?,
            ca_index: a(4 * max_members)?,
            ca_groups: a(std::mem::size_of::<BcAttnGroup>() * max_members)?,
            prompt_kv: a(slot_bytes as usize)?,
            prompt_scratch: a(scratch_bytes as usize)?,
        };
        let layers = w
            .layers
            .iter()
            .zip(&caches)
            .map(|(&lw, &(cache_k, cache_v))| LayerDev {
                w: lw,
                cache_k,
                cache_v,
            })
            .collect();
        if copts.attention_tile.is_none() {
            // A bad BC_ATTENTION_TILE is an error, unless the options chose a tile in code.
            env_attention_tile()?;
        }
        let (attn_tile, attn_tune) = match copts.attention_tile {
            Some(t) => (t, None),
            None if copts.emulate => (AttentionTile::Rows128, None),
            None => {
                // Times both tiles on this window's rows against the whole layer-0 cache
                // (random data, overwritten below and by every tick).
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                std::hash::Hash::hash(&(ordinal, &gpu.name), &mut hasher);
                let shape = attention_tune::TuneShape {
                    device: std::hash::Hasher::finish(&hasher),
                    heads: c.num_heads,
                    head_dim: c.head_dim(),
                    rows: n.min(attention_tune::TUNE_MAX_ROWS),
                    keys: (slots * tpf).min(attention_tune::TUNE_MAX_KEYS),
                };
                let r = attention_tune::pick(
                    &gpu,
                    shape,
                    &attention_tune::TuneBuffers {
                        q: b.q,
                        out: b.att,
                        k: caches[0].0,
                        v: caches[0].1,
                        segments: b.sa_segs,
                        seg_index: b.sa_index,
                        groups: b.sa_groups,
                    },
                )?;
                (r.tile, Some(r))
            }
        };
        for &(k, v) in &caches {
            gpu.memset(k, 0, cb)?;
            gpu.memset(v, 0, cb)?;
        }
        gpu.sync()?;
        Ok(CudaBackend {
            graphs: HashMap::new(),
            graphs_ok: copts.graphs,
            gpu: ManuallyDrop::new(gpu),
            key,
            run_allocs,
            model,
            opts: opts.clone(),
            copts,
            geom,
            slots,
            max_frames,
            max_members,
            seg_max,
            w,
            layers,
            b,
            prompt_slots: vec![None; pslots],
            time_cache: HashMap::new(),
            cache_bytes: (lu * cache_layer) as usize,
            ticks: 0,
            attn_tile,
            attn_tune,
            kv_odd: None,
        })
    }

    /// The window K/V buffers (K, V) that layer `li` writes and its attention reads. With
    /// double buffering (multi-device joint exchange) odd layers use a second pair, so the peer
    /// copies of layer `li` can still read, or land in, its rows while layer `li + 1` runs.
    fn kv_bufs(&self, li: usize) -> (DevPtr, DevPtr) {
        match self.kv_odd {
            Some(p) if li % 2 == 1 => p,
            _ => (self.b.k, self.b.v),
        }
    }

    /// A per-run allocation (freed when the run ends).
    fn alloc_run(&mut self, bytes: usize) -> Result<DevPtr> {
        let p = self.gpu.alloc(bytes)?;
        self.run_allocs.push(p);
        Ok(p)
    }

    /// The options this backend was opened with.
    pub fn options(&self) -> &CudaOptions {
        &self.copts
    }

    /// The device's name.
    pub fn device_name(&self) -> &str {
        &self.gpu.name
    }

    /// The attention tile this session runs.
    pub fn attention_tile(&self) -> AttentionTile {
        self.attn_tile
    }

    /// The timing that chose [`Self::attention_tile`] (`None` when it was set by option).
    pub fn attention_tune(&self) -> Option<&attention_tune::TuneResult> {
        self.attn_tune.as_ref()
    }

    /// Number of graphs captured so far.
    pub fn graphs_captured(&self) -> usize {
        self.graphs
            .values()
            .filter(|g| matches!(g, GraphState::Ready(_)))
            .count()
    }

    /// Whether graphs are in use (false when disabled or when a capture failed).
    pub fn graphs_enabled(&self) -> bool {
        self.graphs_ok
    }

    fn slot_of(&self, f: usize) -> Result<usize> {
        let s = self.geom.slot(f);
        if s >= self.slots {
            return Err(Error::OutOfMemory(format!(
                "the CUDA KV cache holds {} frames with global attention and frame {f} does not fit (a Generator run sizes it for its frames; otherwise set BC_CUDA_CACHE_FRAMES), or use local attention",
                self.slots
            )));
        }
        Ok(s)
    }

    fn time_embedding(&mut self, t: f64) -> (Vec<f32>, Vec<f32>) {
        let m = self.model;
        self.time_cache
            .entry(t.to_bits())
            .or_insert_with(|| m.time_embedding(t))
            .clone()
    }

    /// Makes sure the prompt of every member this device computes (`own`) has a slot, its
    /// K/V computed when it enters one ([`Self::compute_prompt`]); returns the slot of each
    /// member (`None` for the members of other devices). Slots are keyed by
    /// [`PromptContext::id`]; a new prompt takes the least recently used slot that this window
    /// does not need.
    fn load_prompts(&mut self, members: &[Member], own: &[bool]) -> Result<Vec<Option<usize>>> {
        let mut out = Vec::with_capacity(members.len());
        let mut used = vec![false; self.prompt_slots.len()];
        for (m, &mine) in members.iter().zip(own) {
            if !mine {
                out.push(None);
                continue;
            }
            let id = m.prompt.id();
            let s = match self
                .prompt_slots
                .iter()
                .position(|p| p.is_some_and(|(i, _)| i == id))
            {
                Some(s) => s,
                None => {
                    let s = (0..self.prompt_slots.len())
                        .filter(|&s| !used[s])
                        .min_by_key(|&s| self.prompt_slots[s].map_or(0, |p| p.1 + 1))
                        .ok_or_else(|| Error::Internal("no free prompt slot".into()))?;
                    // Empty until its K/V are written (a failure leaves it empty).
                    self.prompt_slots[s] = None;
                    self.compute_prompt(s, m.prompt)?;
                    s
                }
            };
            self.prompt_slots[s] = Some((id, self.ticks));
            used[s] = true;
            out.push(Some(s));
        }
        Ok(out)
    }

    /// Validates the window, uploads the tick's data and tables and returns the launch shape.
    /// `own`: the members this device computes (all with `None`); the visibility tables and
    /// the cache writes cover every member, the attention groups and row ranges only `own`.
    /// `lag`: lagged exchange (members of peers are read from the previous tick's K/V, or
    /// not attended to; only this device's context members are written to its cache).
    fn prepare(
        &mut self,
        members: &[Member],
        own: Option<&[usize]>,
        lag: Option<&LagView>,
    ) -> Result<(Shape, ShapeKey)> {
        let own: Vec<bool> = match own {
            None => vec![true; members.len()],
            Some(o) => (0..members.len()).map(|i| o.contains(&i)).collect(),
        };
        let c = self.model.config().clone();
        let d = c.dim;
        let (h, w) = (self.opts.height, self.opts.width);
        let tpf = (h / 2) * (w / 2);
        let flen = CHANNELS * h * w;
        let geom = window::geometry(members, h, w)?;
        let frames: Vec<usize> = geom.iter().map(|g| g.frames).collect();
        let nf: usize = frames.iter().sum();
        if members.len() > self.max_members || nf > self.max_frames {
            return Err(Error::Internal(format!(
                "window of {} members / {nf} frames exceeds the CUDA buffers ({} / {})",
                members.len(),
                self.max_members,
                self.max_frames
            )));
        }
        let mut row0 = Vec::with_capacity(members.len());
        let mut fr0 = Vec::with_capacity(members.len());
        let (mut r, mut f) = (0, 0);
        for &fc in &frames {
            row0.push(r);
            fr0.push(f);
            r += fc * tpf;
            f += fc;
        }
        let pslot = self.load_prompts(members, &own)?;
        // Per-tick host data.
        let mut lat = Vec::with_capacity(nf * flen);
        let mut e = Vec::with_capacity(nf * d);
        let mut e0 = Vec::with_capacity(nf * 6 * d);
        let mut pos = Vec::with_capacity(nf);
        let mut slot = Vec::with_capacity(nf);
        for (i, m) in members.iter().enumerate() {
            lat.extend_from_slice(m.latents);
            let (ei, e0i) = self.time_embedding(m.timestep);
            for fi in 0..frames[i] {
                e.extend_from_slice(&ei);
                e0.extend_from_slice(&e0i);
                let af = m.first_frame + fi;
                pos.push(i32::try_from(af).map_err(|_| Error::invalid("frame index too large"))?);
                slot.push(if m.context {
                    self.slot_of(af)? as i32
                } else {
                    0
                });
            }
        }
        // Self-attention visibility: the rule every backend shares (window.rs).
        let mut lists: Vec<Vec<Src>> = Vec::with_capacity(members.len());
        for i in 0..members.len() {
            let vis = window::visible(&geom, i, &self.geom, self.opts.attention);
            let mut segs = Vec::new();
            for f in vis.cache_frames {
                push_src(
                    &mut segs,
                    Src::Cache {
                        slot: self.slot_of(f)?,
                        frames: 1,
                    },
                );
            }
            for (j, r) in vis.members {
                let rows = r.len() * tpf;
                let src = match lag {
                    Some(lv) if !own[j] => match lv.prev_row[j] {
                        Some(pr) => Src::Prev {
                            row: pr + r.start * tpf,
                            rows,
                        },
                        // The peer's K/V did not arrive: not attended to.
                        None => continue,
                    },
                    _ => Src::Win {
                        row: row0[j] + r.start * tpf,
                        rows,
                    },
                };
                push_src(&mut segs, src);
            }
            lists.push(segs);
        }
        let nseg: usize = lists.iter().map(Vec::len).sum();
        if nseg > self.seg_max {
            return Err(Error::Internal("attention segment table overflow".into()));
        }
        let l = c.num_layers;
        let row_bytes = (d * 2) as u64;
        let mut seg_tab = Vec::with_capacity(l * self.seg_max);
        for (li, ld) in self.layers.iter().enumerate() {
            for s in lists.iter().flatten() {
                let (k, v, tokens) = match *s {
                    Src::Cache { slot, frames } => {
                        let off = (slot * tpf) as u64 * row_bytes;
                        (ld.cache_k + off, ld.cache_v + off, frames * tpf)
                    }
                    Src::Win { row, rows } => {
                        let off = row as u64 * row_bytes;
                        let (bk, bv) = self.kv_bufs(li);
                        (bk + off, bv + off, rows)
                    }
                    Src::Prev { row, rows } => {
                        let (pk, pv) = lag
                            .and_then(|lv| lv.prev_kv.get(li))
                            .copied()
                            .ok_or_else(|| Error::Internal("lagged K/V buffers missing".into()))?;
                        let off = row as u64 * row_bytes;
                        (pk + off, pv + off, rows)
                    }
                };
                seg_tab.push(BcKvSegment {
                    k: k as *const _,
                    v: v as *const _,
                    tokens: tokens as i32,
                    _pad: 0,
                });
            }
            while seg_tab.len() % self.seg_max != 0 {
                seg_tab.push(BcKvSegment {
                    k: std::ptr::null(),
                    v: std::ptr::null(),
                    tokens: 0,
                    _pad: 0,
                });
            }
        }
        let mut index = Vec::with_capacity(nseg);
        let mut groups = Vec::with_capacity(members.len());
        for (i, list) in lists.iter().enumerate() {
            if own[i] {
                let keys: usize = list
                    .iter()
                    .map(|s| match *s {
                        Src::Cache { frames, .. } => frames * tpf,
                        Src::Win { rows, .. } | Src::Prev { rows, .. } => rows,
                    })
                    .sum();
                groups.push((
                    keys,
                    BcAttnGroup {
                        q_begin: row0[i] as i32,
                        q_rows: (frames[i] * tpf) as i32,
                        seg_begin: index.len() as i32,
                        seg_count: list.len() as i32,
                    },
                ));
            }
            let b = index.len() as i32;
            index.extend((0..list.len() as i32).map(|x| b + x));
        }
        // Groups with the most keys first: blocks start in grid order (the group is grid.z), so
        // the longest blocks start first instead of forming the tail of the launch.
        groups.sort_by_key(|&(keys, _)| std::cmp::Reverse(keys));
        let groups: Vec<BcAttnGroup> = groups.into_iter().map(|(_, g)| g).collect();
        // Cross-attention: consecutive members sharing a prompt form one group.
        let (tl, pslots) = (c.text_len, self.prompt_slots.len());
        let per = l * 2 * tl * d * 2;
        let mut ca_tab = Vec::with_capacity(l * pslots);
        for li in 0..l {
            for s in 0..pslots {
                let k = self.b.prompt_kv + (s * per + li * 2 * tl * d * 2) as u64;
                ca_tab.push(BcKvSegment {
                    k: k as *const _,
                    v: (k + (tl * d * 2) as u64) as *const _,
                    tokens: tl as i32,
                    _pad: 0,
                });
            }
        }
        let mut ca_groups = Vec::new();
        let mut ca_index = Vec::new();
        let mut cross_runs = Vec::new();
        let mut a = 0;
        while a < members.len() {
            if !own[a] {
                a += 1;
                continue;
            }
            let mut b = a + 1;
            while b < members.len() && own[b] && members[b].prompt.id() == members[a].prompt.id() {
                b += 1;
            }
            ca_groups.push(BcAttnGroup {
                q_begin: row0[a] as i32,
                q_rows: (row0[b - 1] + frames[b - 1] * tpf - row0[a]) as i32,
                seg_begin: ca_index.len() as i32,
                seg_count: 1,
            });
            let slot = pslot[a].ok_or_else(|| Error::Internal("prompt slot missing".into()))?;
            ca_index.push(slot as i32);
            cross_runs.push(b - a);
            a = b;
        }
        let g = &self.gpu;
        g.upload(self.b.lat, &lat)?;
        g.upload(self.b.e, &e)?;
        g.upload(self.b.e0, &e0)?;
        g.upload(self.b.frame_pos, &pos)?;
        g.upload(self.b.frame_slot, &slot)?;
        g.upload(self.b.sa_segs, &seg_tab)?;
        g.upload(self.b.sa_index, &index)?;
        g.upload(self.b.sa_groups, &groups)?;
        g.upload(self.b.ca_segs, &ca_tab)?;
        g.upload(self.b.ca_index, &ca_index)?;
        g.upload(self.b.ca_groups, &ca_groups)?;
        // Runs of consecutive own members: (first row, rows, first frame, frames).
        let mut ranges: Vec<(usize, usize, usize, usize)> = Vec::new();
        for i in (0..members.len()).filter(|&i| own[i]) {
            match ranges.last_mut() {
                Some(r) if r.0 + r.1 == row0[i] => {
                    r.1 += frames[i] * tpf;
                    r.3 += frames[i];
                }
                _ => ranges.push((row0[i], frames[i] * tpf, fr0[i], frames[i])),
            }
        }
        let shape = Shape {
            frames: frames.clone(),
            row0: row0.clone(),
            fr0: fr0.clone(),
            ranges,
            groups: groups.len(),
            max_rows: (0..members.len())
                .filter(|&i| own[i])
                .map(|i| frames[i] * tpf)
                .max()
                .unwrap_or(0),
            cross_groups: ca_groups.iter().map(|g| g.q_rows as usize).collect(),
            cache_writes: (0..members.len())
                .filter(|&j| members[j].context && (own[j] || lag.is_none()))
                .collect(),
        };
        let key = ShapeKey {
            members: frames
                .iter()
                .zip(members)
                .map(|(&f, m)| (f, m.context))
                .collect(),
            cross_runs,
        };
        // The uploads read host vectors that end here.
        self.gpu.sync()?;
        Ok((shape, key))
    }

    fn run(&mut self, members: &[Member]) -> Result<Vec<Vec<f32>>> {
        self.gpu.bind()?;
        let (shape, key) = self.prepare(members, None, None)?;
        self.launch(
            GraphKey {
                shape: key,
                part: Part::Whole,
            },
            &|b: &mut Self| b.enqueue(&shape),
        )?;
        let flen = CHANNELS * self.opts.height * self.opts.width;
        let nf: usize = shape.frames.iter().sum();
        let mut flow = vec![0f32; nf * flen];
        self.gpu.download(&mut flow, self.b.flow)?;
        self.ticks += 1;
        let (fr0, frames) = (&shape.fr0, &shape.frames);
        Ok(members
            .iter()
            .enumerate()
            .map(|(i, _)| flow[fr0[i] * flen..(fr0[i] + frames[i]) * flen].to_vec())
            .collect())
    }

    /// Enqueues the work of `key` (`enqueue`): eagerly the first time a key is seen (warm-up:
    /// cuBLASLt heuristics, module load), captured into a graph and replayed the second time,
    /// replayed afterwards. With graphs off (or after a failed capture) always eagerly.
    fn launch(&mut self, key: GraphKey, enqueue: &dyn Fn(&mut Self) -> Result<()>) -> Result<()> {
        if !self.graphs_ok {
            return enqueue(self);
        }
        match self.graphs.get(&key) {
            Some(GraphState::Ready(graph)) => self.gpu.replay(graph),
            Some(GraphState::Warm) => {
                // All uploads before this call are ordered before the capture's replay.
                self.gpu.begin_capture()?;
                let res = enqueue(self);
                match res.and_then(|_| self.gpu.end_capture()) {
                    Ok(graph) => {
                        self.gpu.replay(&graph)?;
                        self.graphs.insert(key, GraphState::Ready(graph));
                        Ok(())
                    }
                    Err(err) => {
                        self.gpu.abort_capture();
                        if std::env::var_os("BC_CUDA_VERBOSE").is_some() {
                            eprintln!("CUDA graph capture failed, running eagerly: {err}");
                        }
                        self.graphs_ok = false;
                        self.graphs.clear();
                        enqueue(self)
                    }
                }
            }
            None => {
                enqueue(self)?;
                self.graphs.insert(key, GraphState::Warm);
                Ok(())
            }
        }
    }

    /// Downloads the flow of member `i` of the last tick.
    fn download_member(&self, s: &Shape, i: usize) -> Result<Vec<f32>> {
        let flen = CHANNELS * self.opts.height * self.opts.width;
        let mut flow = vec![0f32; s.frames[i] * flen];
        self.gpu
            .download(&mut flow, self.b.flow + (s.fr0[i] * flen * 4) as u64)?;
        Ok(flow)
    }

    /// Enqueues one joint forward of a window of `s`'s shape (every launch of the tick).
    fn enqueue(&mut self, s: &Shape) -> Result<()> {
        self.enqueue_embed(s)?;
        for li in 0..self.layers.len() {
            let _r = nvtx::range(|| format!("layer {li}"));
            self.enqueue_pre(s, li)?;
            self.enqueue_post(s, li)?;
        }
        self.enqueue_head(s)
    }

    /// Patch embedding of this device's rows.
    fn enqueue_embed(&mut self, s: &Shape) -> Result<()> {
        let d = self.model.config().dim;
        let (h, w) = (self.opts.height, self.opts.width);
        let flen = (CHANNELS * h * w) as u64;
        let b = &self.b;
        let g = &mut self.gpu;
        for &(r0, rows, f0, nf) in &s.ranges {
            let (r0, f0) = (r0 as u64, f0 as u64);
            ops::patch(
                g,
                true,
                b.lat + f0 * flen * 4,
                b.patches + r0 * 64 * 2,
                nf,
                CHANNELS,
                h,
                w,
            )?;
            g.gemm(
                b.patches + r0 * 64 * 2,
                self.w.patch_w,
                self.w.patch_b,
                b.x + r0 * (d as u64) * 4,
                rows,
                64,
                d,
                OutType::F32,
                Epilogue::Bias,
            )?;
        }
        Ok(())
    }

    /// Layer `li` up to the exchange point: modulated LN, qkv GEMM, q/k norm + RoPE, v, for
    /// this device's rows (into the window buffers `q`, `k`, `v` at the members' rows).
    fn enqueue_pre(&mut self, s: &Shape, li: usize) -> Result<()> {
        let c = self.model.config();
        let (d, nh, hd) = (c.dim, c.num_heads, c.head_dim());
        let eps = c.eps as f32;
        let wp = self.opts.width / 2;
        let tpf = (self.opts.height / 2) * wp;
        let (kb, vb) = self.kv_bufs(li);
        let b = &self.b;
        let ld = &self.layers[li];
        let g = &mut self.gpu;
        let (f32b, du) = (4u64, d as u64);
        let row = du * 2;
        let m = |j: usize| ld.modulation + (j * d) as u64 * f32b;
        for &(r0, n, f0, _) in &s.ranges {
            let (r0, f0) = (r0 as u64, f0 as u64);
            let e0 = |j: usize| b.e0 + (f0 * 6 * du + (j * d) as u64) * f32b;
            let y = b.y + r0 * row;
            let qkv = b.qkv + r0 * 3 * row;
            ops::ln_modulate(
                g,
                b.x + r0 * du * f32b,
                y,
                n,
                d,
                eps,
                tpf,
                e0(0),
                e0(1),
                6 * d,
                m(0),
                m(1),
            )?;
            g.gemm(
                y,
                ld.qkv_w,
                ld.qkv_b,
                qkv,
                n,
                d,
                3 * d,
                OutType::Bf16,
                Epilogue::Bias,
            )?;
            let qa = QkArgs {
                x: qkv,
                x_stride: 3 * d,
                out: b.q + r0 * row,
                rows: n,
                heads: nh,
                head_dim: hd,
                tpf,
                wp,
                norm: ld.norm_q,
                frame_pos: b.frame_pos + f0 * 4,
                frame_slot: NULL,
                rope: true,
                eps,
            };
            ops::qk_norm_rope(g, &qa)?;
            ops::qk_norm_rope(
                g,
                &QkArgs {
                    x: qkv + row,
                    out: kb + r0 * row,
                    norm: ld.norm_k,
                    ..qa
                },
            )?;
            ops::qk_norm_rope(
                g,
                &QkArgs {
                    x: qkv + 2 * row,
                    out: vb + r0 * row,
                    norm: NULL,
                    rope: false,
                    ..qa
                },
            )?;
        }
        Ok(())
    }

    /// Layer `li` from the exchange point on: self-attention of this device's members (every
    /// member's K/V must be in the window buffers), every context member's K/V into the cache,
    /// output projection, cross-attention, FFN.
    fn enqueue_post(&mut self, s: &Shape, li: usize) -> Result<()> {
        let c = self.model.config();
        let (d, nh, hd, ffn) = (c.dim, c.num_heads, c.head_dim(), c.ffn_dim);
        let eps = c.eps as f32;
        let wp = self.opts.width / 2;
        let tpf = (self.opts.height / 2) * wp;
        let b = &self.b;
        let ld = &self.layers[li];
        let round = self.copts.round_residual_bf16;
        let tile = self.attn_tile;
        let (k, v) = self.kv_bufs(li);
        let g = &mut self.gpu;
        let (x, y, q, att) = (b.x, b.y, b.q, b.att);
        let (f32b, du) = (4u64, d as u64);
        let row = du * 2;
        let seg_stride = (self.seg_max * std::mem::size_of::<BcKvSegment>()) as u64;
        let ca_stride = (self.prompt_slots.len() * std::mem::size_of::<BcKvSegment>()) as u64;
        let m = |j: usize| ld.modulation + (j * d) as u64 * f32b;
        ops::attention(
            g,
            q,
            att,
            nh,
            hd,
            b.sa_segs + li as u64 * seg_stride,
            b.sa_index,
            b.sa_groups,
            s.groups,
            s.max_rows,
            tile,
        )?;
        // Context members' K/V into the cache (after this layer's attention).
        for &j in &s.cache_writes {
            let rows = s.frames[j] * tpf;
            let base = QkArgs {
                x: k + s.row0[j] as u64 * row,
                x_stride: d,
                out: ld.cache_k,
                rows,
                heads: nh,
                head_dim: hd,
                tpf,
                wp,
                norm: NULL,
                frame_pos: NULL,
                frame_slot: b.frame_slot + (s.fr0[j] * 4) as u64,
                rope: false,
                eps,
            };
            ops::qk_norm_rope(g, &base)?;
            ops::qk_norm_rope(
                g,
                &QkArgs {
                    x: v + s.row0[j] as u64 * row,
                    out: ld.cache_v,
                    ..base
                },
            )?;
        }
        for &(r0, n, f0, _) in &s.ranges {
            let (r0, f0) = (r0 as u64, f0 as u64);
            let e0 = |j: usize| b.e0 + (f0 * 6 * du + (j * d) as u64) * f32b;
            let (xr, yr, ar) = (x + r0 * du * f32b, y + r0 * row, att + r0 * row);
            g.gemm(
                ar,
                ld.o_w,
                ld.o_b,
                yr,
                n,
                d,
                d,
                OutType::Bf16,
                Epilogue::Bias,
            )?;
            ops::gated_residual(g, xr, yr, n, d, tpf, e0(2), 6 * d, m(2))?;
            if round {
                ops::bias_activation(g, xr, NULL, 1, n * d, BC_ACT_ROUND_BF16, false)?;
            }
            // Cross-attention queries.
            ops::layer_norm_affine(g, xr, yr, n, d, eps, ld.norm3_w, ld.norm3_b)?;
            let qr = q + r0 * row;
            g.gemm(
                yr,
                ld.cq_w,
                ld.cq_b,
                qr,
                n,
                d,
                d,
                OutType::Bf16,
                Epilogue::Bias,
            )?;
            ops::qk_norm_rope(
                g,
                &QkArgs {
                    x: qr,
                    x_stride: d,
                    out: qr,
                    rows: n,
                    heads: nh,
                    head_dim: hd,
                    tpf,
                    wp,
                    norm: ld.cnorm_q,
                    frame_pos: NULL,
                    frame_slot: NULL,
                    rope: false,
                    eps,
                },
            )?;
        }
        ops::attention(
            g,
            q,
            att,
            nh,
            hd,
            b.ca_segs + li as u64 * ca_stride,
            b.ca_index,
            b.ca_groups,
            s.cross_groups.len(),
            s.cross_groups.iter().copied().max().unwrap_or(0),
            tile,
        )?;
        for &(r0, n, f0, _) in &s.ranges {
            let (r0, f0) = (r0 as u64, f0 as u64);
            let e0 = |j: usize| b.e0 + (f0 * 6 * du + (j * d) as u64) * f32b;
            let (xr, yr, ar) = (x + r0 * du * f32b, y + r0 * row, att + r0 * row);
            let fr = b.ffn + r0 * (ffn as u64) * 2;
            g.gemm(
                ar,
                ld.co_w,
                ld.co_b,
                yr,
                n,
                d,
                d,
                OutType::Bf16,
                Epilogue::Bias,
            )?;
            ops::gated_residual(g, xr, yr, n, d, tpf, NULL, 0, NULL)?;
            if round {
                ops::bias_activation(g, xr, NULL, 1, n * d, BC_ACT_ROUND_BF16, false)?;
            }
            // FFN.
            ops::ln_modulate(g, xr, yr, n, d, eps, tpf, e0(3), e0(4), 6 * d, m(3), m(4))?;
            g.gemm(
                yr,
                ld.ffn0_w,
                ld.ffn0_b,
                fr,
                n,
                d,
                ffn,
                OutType::Bf16,
                Epilogue::GeluBias,
            )?;
            g.gemm(
                fr,
                ld.ffn2_w,
                ld.ffn2_b,
                yr,
                n,
                ffn,
                d,
                OutType::Bf16,
                Epilogue::Bias,
            )?;
            ops::gated_residual(g, xr, yr, n, d, tpf, e0(5), 6 * d, m(5))?;
            if round {
                ops::bias_activation(g, xr, NULL, 1, n * d, BC_ACT_ROUND_BF16, false)?;
            }
        }
        Ok(())
    }

    /// The head and unpatchify of this device's rows into `flow`.
    fn enqueue_head(&mut self, s: &Shape) -> Result<()> {
        let c = self.model.config();
        let (d, eps) = (c.dim, c.eps as f32);
        let (h, w) = (self.opts.height, self.opts.width);
        let tpf = (h / 2) * (w / 2);
        let flen = (CHANNELS * h * w) as u64;
        let b = &self.b;
        let g = &mut self.gpu;
        let du = d as u64;
        for &(r0, n, f0, nf) in &s.ranges {
            let (r0, f0) = (r0 as u64, f0 as u64);
            let (xr, yr, hr) = (b.x + r0 * du * 4, b.y + r0 * du * 2, b.head + r0 * 64 * 2);
            let er = b.e + f0 * du * 4;
            // Head: shift = m0 + e, scale = m1 + e.
            ops::ln_modulate(
                g,
                xr,
                yr,
                n,
                d,
                eps,
                tpf,
                er,
                er,
                d,
                self.w.head_mod,
                self.w.head_mod + (d * 4) as u64,
            )?;
            g.gemm(
                yr,
                self.w.head_w,
                self.w.head_b,
                hr,
                n,
                d,
                64,
                OutType::Bf16,
                Epilogue::Bias,
            )?;
            ops::patch(g, false, b.flow + f0 * flen * 4, hr, nf, CHANNELS, h, w)?;
        }
        Ok(())
    }
}

/// Launch-shape data of one tick.
struct Shape {
    frames: Vec<usize>,
    row0: Vec<usize>,
    fr0: Vec<usize>,
    /// Runs of consecutive members this device computes: (first row, rows, first frame,
    /// frames). One run covering the window on a single device.
    ranges: Vec<(usize, usize, usize, usize)>,
    /// Self-attention groups (members this device computes).
    groups: usize,
    /// Most query rows of one of those members.
    max_rows: usize,
    cross_groups: Vec<usize>,
    /// Context members whose K/V this device writes to its cache.
    cache_writes: Vec<usize>,
}

impl Backend for CudaBackend<'_> {
    fn forward(
        &mut self,
        members: &[Member],
        _blocks: &[usize],
        tick: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let _r = nvtx::range(|| nvtx::tick_label(tick, members));
        self.run(members)
    }

    fn commit(&mut self, end: usize) {
        self.geom.commit(end);
    }

    fn resident(&self, f: usize) -> bool {
        self.geom.resident(f)
    }

    fn recache(&mut self, members: &[Member]) -> Result<()> {
        // Context members are causal among themselves, so running them in chunks that fit
        // the window buffers, committing each chunk, sees exactly what one joint forward over
        // a fresh cache sees.
        let old = self.geom.committed();
        self.geom = self.geom.empty_like();
        let mut i = 0;
        while i < members.len() {
            let mut j = i;
            let mut fr = 0;
            let flen = CHANNELS * self.opts.height * self.opts.width;
            while j < members.len()
                && j - i < self.max_members
                && fr + members[j].latents.len() / flen <= self.max_frames
            {
                fr += members[j].latents.len() / flen;
                j += 1;
            }
            if j == i {
                return Err(Error::Internal(
                    "recache member larger than the window buffers".into(),
                ));
            }
            self.run(&members[i..j])?;
            let m = &members[j - 1];
            self.geom.commit(m.first_frame + m.latents.len() / flen);
            i = j;
        }
        self.geom = self.geom.empty_like();
        self.geom.commit(old);
        Ok(())
    }

    fn cache_bytes(&self) -> usize {
        self.cache_bytes
    }
}

impl Drop for CudaBackend<'_> {
    fn drop(&mut self) {
        // SAFETY: `self.gpu` is taken once, here, and not used afterwards.
        let mut gpu = unsafe { ManuallyDrop::take(&mut self.gpu) };
        let _ = gpu.bind();
        // Graphs belong to the run: they go before the buffers they captured (and before the
        // context).
        self.graphs.clear();
        // Back to the weight cache only when the device is healthy (no error pending, no
        // capture open) and the per-run buffers are gone; otherwise the device (weights
        // included) is dropped and the next run starts fresh.
        let ok = gpu.sync_copies().is_ok()
            && gpu.sync().is_ok()
            && self.run_allocs.drain(..).all(|p| gpu.free(p).is_ok());
        if ok {
            let mut c = cache_lock();
            if !c.iter().any(|(k, _)| *k == self.key) {
                c.push((
                    self.key,
                    Resident {
                        gpu,
                        w: self.w.clone(),
                    },
                ));
                return;
            }
        }
        drop(gpu);
    }
}

/// The CUDA backend over several logical devices (DESIGN §4, multi-device, joint mode): one
/// [`CudaBackend`] per device (weights, activation buffers and KV cache replicated), members
/// placed with [`crate::cascade::place`], and in every layer each member's K/V rows copied
/// from the device that computed them into the window buffers (same row offsets on every
/// device) of every peer that reads them before attention, so every member sees exactly what
/// it sees on one device. A peer reads a member's rows when one of its own members attends to
/// it, or when it is a context member: every device writes every context member's K/V into
/// its own cache. A device waits only for the copies it reads ([`peer_copy_bytes`] counts the
/// bytes).
///
/// All devices are driven from one host thread, layer by layer. The copies run on each
/// source device's copy stream ([`Gpu::send_to_peer`]), ordered with the compute streams by
/// events only ([`device::Mark`]), and the window K/V are double-buffered by layer parity
/// ([`CudaOptions::double_kv`]), so the exchange overlaps compute (the rules are listed in
/// `forward`). Graphs: each device captures the work between two exchanges as one graph
/// ([`GraphKey`]: part 0 = embedding + layer 0's q/k/v, part `i` = layer `i-1`'s attention and
/// FFN + layer `i`'s q/k/v, the last part ends with the head), so a tick is `layers + 1` graph
/// launches per device with the event waits between them; graph launches are ordinary stream
/// work, so the cross-device ordering is the same as with eager launches. `recache` runs the
/// whole rebuild on every device.
///
/// **Lagged** exchange ([`crate::config::KvExchange::Lagged`], the semantics of
/// [`crate::multi_device`]): no exchange inside the tick. Every device keeps two generations
/// of per-layer K/V buffers in the window's row layout: during a tick it snapshots its own
/// window members' K/V of every layer into the current generation, and its attention reads
/// the peers' members from the previous generation (keyed by block index; a block that was
/// not in the previous tick is not attended to). After the tick each device copies its
/// window members' rows of the current generation, and its context members' cache frames, to
/// every peer; the generations then swap. So every device holds every window member's K/V
/// of the previous tick (a block may move to another device between ticks). With nothing
/// exchanged inside the tick, each device's whole tick is one graph (one per generation).
pub struct MultiCudaBackend<'m> {
    devs: Vec<CudaBackend<'m>>,
    opts: GenerateOptions,
    lag: Option<LagState>,
}

/// Lagged exchange state.
struct LagState {
    /// Per device, two generations of per-layer (K, V) buffers, each `[max_frames * tpf, dim]`
    /// bf16 in the window's row layout.
    gens: Vec<[Vec<(DevPtr, DevPtr)>; 2]>,
    /// The generation written this tick (`1 - cur` holds the previous tick's K/V).
    cur: usize,
    /// Block index -> (first row, rows) in generation `1 - cur`: the previous tick's window
    /// members (not its context members, whose K/V are in the caches).
    prev: HashMap<usize, (usize, usize)>,
}

impl<'m> MultiCudaBackend<'m> {
    /// Opens one logical device per entry of `copts.devices` (or `opts.devices` devices from
    /// `copts.device` on when the list is empty).
    pub fn new(model: &'m Model, opts: &GenerateOptions, copts: CudaOptions) -> Result<Self> {
        let ordinals: Vec<usize> = if copts.devices.is_empty() {
            (0..opts.devices.max(1)).map(|i| copts.device + i).collect()
        } else {
            copts.devices.clone()
        };
        if opts.devices > 1 && ordinals.len() != opts.devices {
            return Err(Error::invalid(format!(
                "{} devices requested but the CUDA device list has {} entries",
                opts.devices,
                ordinals.len()
            )));
        }
        let mut one = opts.clone();
        one.devices = 1;
        let mut devs = Vec::with_capacity(ordinals.len());
        for &o in &ordinals {
            devs.push(CudaBackend::open_device(model, &one, copts.clone(), o)?);
        }
        for a in 0..devs.len() {
            for b in 0..devs.len() {
                if a != b {
                    devs[a].gpu.enable_peer_access(&devs[b].gpu)?;
                }
            }
        }
        let lag = if opts.kv_exchange == crate::config::KvExchange::Lagged {
            let mut gens = Vec::with_capacity(devs.len());
            for dev in &mut devs {
                let c = dev.model.config();
                let tpf = (dev.opts.height / 2) * (dev.opts.width / 2);
                let bytes = dev.max_frames * tpf * c.dim * 2;
                let need = 2 * 2 * c.num_layers * bytes;
                let (free, total) = dev.gpu.mem_info()?;
                if need + (64 << 20) > free {
                    return Err(Error::OutOfMemory(format!(
                        "lagged K/V exchange needs {need} more bytes for the previous tick's K/V but only {free} of {total} bytes are free on {}",
                        dev.gpu.name
                    )));
                }
                let mut gen = || -> Result<Vec<(DevPtr, DevPtr)>> {
                    (0..c.num_layers)
                        .map(|_| Ok((dev.alloc_run(bytes)?, dev.alloc_run(bytes)?)))
                        .collect()
                };
                gens.push([gen()?, gen()?]);
            }
            Some(LagState {
                gens,
                cur: 0,
                prev: HashMap::new(),
            })
        } else {
            None
        };
        if lag.is_none() && devs.len() > 1 && copts.double_kv {
            // Joint exchange: a second pair of window K/V buffers for odd layers, so a device
            // never waits for its outgoing copies of one layer before computing the next
            // (see `forward`). Where it does not fit, single buffering (correct, less overlap).
            for dev in &mut devs {
                let c = dev.model.config();
                let tpf = (dev.opts.height / 2) * (dev.opts.width / 2);
                let bytes = dev.max_frames * tpf * c.dim * 2;
                let (free, _) = dev.gpu.mem_info()?;
                if 2 * bytes + (64 << 20) <= free {
                    dev.kv_odd = Some((dev.alloc_run(bytes)?, dev.alloc_run(bytes)?));
                    DOUBLE_KV_DEVICES.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(MultiCudaBackend {
            devs,
            opts: opts.clone(),
            lag,
        })
    }

    /// Number of logical devices.
    pub fn device_count(&self) -> usize {
        self.devs.len()
    }
}

/// The flow of all `n` members of the tick just enqueued, each downloaded from the device
/// it was placed on.
fn download_all(
    devs: &mut [CudaBackend],
    shapes: &[Shape],
    placement: &[Vec<usize>],
    n: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut out: Vec<Option<Vec<f32>>> = vec![None; n];
    for ((dev, s), own) in devs.iter_mut().zip(shapes).zip(placement) {
        dev.gpu.bind()?;
        for &i in own {
            out[i] = Some(dev.download_member(s, i)?);
        }
        dev.ticks += 1;
    }
    out.into_iter()
        .enumerate()
        .map(|(i, f)| f.ok_or_else(|| Error::Internal(format!("member {i} was not computed"))))
        .collect()
}

impl Backend for MultiCudaBackend<'_> {
    fn forward(
        &mut self,
        members: &[Member],
        blocks: &[usize],
        tick: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let _r = nvtx::range(|| nvtx::tick_label(tick, members));
        if self.lag.is_some() {
            return self.forward_lagged(members, blocks);
        }
        let nd = self.devs.len();
        let tokens: Vec<usize> = members.iter().map(|m| m.latents.len()).collect();
        let placement = crate::cascade::place(&tokens, nd);
        let (mut shapes, mut keys) = (Vec::with_capacity(nd), Vec::with_capacity(nd));
        for (dev, own) in self.devs.iter_mut().zip(&placement) {
            dev.gpu.bind()?;
            let (s, k) = dev.prepare(members, Some(own), None)?;
            shapes.push(s);
            keys.push(k);
        }
        let layers = self.devs[0].layers.len();
        let row = (self.devs[0].model.config().dim * 2) as u64;
        // Part 0: embedding and layer 0's q/k/v, on every device.
        for ((dev, s), k) in self.devs.iter_mut().zip(&shapes).zip(&keys) {
            dev.gpu.bind()?;
            let key = GraphKey {
                shape: k.clone(),
                part: Part::Joint(0),
            };
            dev.launch(key, &|b: &mut CudaBackend| {
                b.enqueue_embed(s)?;
                let _r = nvtx::range(|| "layer 0".to_string());
                b.enqueue_pre(s, 0)
            })?;
        }
        // What each device reads of its peers' rows: the members its own members attend to
        // this tick (the shared visibility rule), and every context member (each device
        // writes every context member's K/V into its own cache). Nothing else is copied, and
        // a device waits only for the copies it reads: with causal attention the device of
        // the earliest members needs nothing from the devices of later ones.
        let geom = window::geometry(members, self.opts.height, self.opts.width)?;
        let tpf = (self.opts.height / 2) * (self.opts.width / 2);
        let mut regions_to: Vec<Vec<Vec<(u64, usize)>>> = vec![vec![Vec::new(); nd]; nd];
        for (dst, own) in placement.iter().enumerate() {
            let mut needs: Vec<bool> = members.iter().map(|m| m.context).collect();
            for &i in own {
                let vis = window::visible(&geom, i, &self.devs[dst].geom, self.opts.attention);
                for (j, _) in vis.members {
                    needs[j] = true;
                }
            }
            for (src, src_own) in placement.iter().enumerate().filter(|&(p, _)| p != dst) {
                let s = &shapes[src];
                let mut runs: Vec<(u64, usize)> = Vec::new();
                for &j in src_own.iter().filter(|&&j| needs[j]) {
                    let (off, bytes) = (s.row0[j] as u64 * row, s.frames[j] * tpf * row as usize);
                    match runs.last_mut() {
                        Some(r) if r.0 + r.1 as u64 == off => r.1 += bytes,
                        _ => runs.push((off, bytes)),
                    }
                }
                regions_to[src][dst] = runs;
            }
        }
        // The exchange runs on each source device's copy stream, ordered by marks only, so a
        // device computes on while its K/V travel and waits only for the rows it reads:
        //   (1) a copy of layer li starts after its source computed layer li's K/V;
        //   (2) it lands after the destination finished reading the rows it overwrites: the
        //       peer rows of the same buffer, last read by the destination's attention of layer
        //       li - 2 with double buffering (part li - 1), of layer li - 1 without (part li);
        //   (3) a device runs layer li's attention (part li + 1) after every copy into it;
        //   (4) a device overwrites its own rows in a buffer after its outgoing copies read
        //       them: part li + 1 writes layer li + 1's K/V, into the buffer of layer li - 1
        //       with double buffering (so it waits for the copies of layer li - 1), into the
        //       one of layer li without (the copies of layer li).
        // With double buffering a device with early members runs ahead of the devices that
        // read its K/V, and the copies overlap compute instead of stopping every device.
        let double: Vec<bool> = self.devs.iter().map(|d| d.kv_odd.is_some()).collect();
        // Every exit, error or not, waits for the copy streams: no copy may still read or
        // write a buffer once the caller goes on (or drops the devices).
        let res = (|| -> Result<()> {
            let mut done_prev: Vec<Option<device::Mark>> = (0..nd).map(|_| None).collect();
            let mut sent_prev: Vec<Option<device::Mark>> = (0..nd).map(|_| None).collect();
            for li in 0..layers {
                let _r = nvtx::range(|| format!("layer {li} exchange"));
                let done = self
                    .devs
                    .iter()
                    .map(|d| d.gpu.mark_compute())
                    .collect::<Result<Vec<_>>>()?;
                // sent[src]: the end of all of src's copies of this layer; arrived[dst]: the ends
                // of the copies into dst (the copy stream runs in order).
                let mut sent: Vec<Option<device::Mark>> = (0..nd).map(|_| None).collect();
                let mut arrived: Vec<Vec<device::Mark>> = (0..nd).map(|_| Vec::new()).collect();
                for (src, to) in regions_to.iter().enumerate() {
                    let sd = &self.devs[src];
                    let (sk, sv) = sd.kv_bufs(li);
                    for (dst, runs) in to.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
                        let dd = &self.devs[dst];
                        let (dk, dv) = dd.kv_bufs(li);
                        let mut regions = Vec::with_capacity(2 * runs.len());
                        for &(off, bytes) in runs {
                            regions.push((dk + off, sk + off, bytes));
                            regions.push((dv + off, sv + off, bytes));
                        }
                        // (1) and (2).
                        let war = if double[dst] {
                            done_prev[dst].as_ref()
                        } else {
                            Some(&done[dst])
                        };
                        let after: Vec<&device::Mark> =
                            std::iter::once(&done[src]).chain(war).collect();
                        arrived[dst].push(sd.gpu.send_to_peer(&dd.gpu, &regions, &after)?);
                    }
                    if to.iter().any(|r| !r.is_empty()) {
                        sent[src] = Some(sd.gpu.mark_copies()?);
                    }
                }
                // Part li + 1: layer li's attention and FFN, then layer li + 1's q/k/v (or the
                // head after the last layer).
                for (d, ((dev, s), k)) in self.devs.iter_mut().zip(&shapes).zip(&keys).enumerate() {
                    dev.gpu.bind()?;
                    // (3)
                    for m in &arrived[d] {
                        dev.gpu.compute_wait(m)?;
                    }
                    // (4)
                    let own_sent = if double[d] { &sent_prev[d] } else { &sent[d] };
                    if let Some(m) = own_sent {
                        dev.gpu.compute_wait(m)?;
                    }
                    let key = GraphKey {
                        shape: k.clone(),
                        part: Part::Joint(li + 1),
                    };
                    dev.launch(key, &|b: &mut CudaBackend| {
                        b.enqueue_post(s, li)?;
                        if li + 1 < layers {
                            let _r = nvtx::range(|| format!("layer {}", li + 1));
                            b.enqueue_pre(s, li + 1)
                        } else {
                            b.enqueue_head(s)
                        }
                    })?;
                }
                done_prev = done.into_iter().map(Some).collect();
                sent_prev = sent;
            }
            Ok(())
        })();
        for dev in &self.devs {
            let synced = dev.gpu.sync_copies();
            if res.is_ok() {
                synced?;
            }
        }
        res?;
        download_all(&mut self.devs, &shapes, &placement, members.len())
    }

    fn commit(&mut self, end: usize) {
        self.devs.iter_mut().for_each(|d| d.commit(end));
    }

    fn resident(&self, f: usize) -> bool {
        self.devs[0].resident(f)
    }

    fn recache(&mut self, members: &[Member]) -> Result<()> {
        self.devs.iter_mut().try_for_each(|d| d.recache(members))
    }

    fn cache_bytes(&self) -> usize {
        self.devs[0].cache_bytes()
    }
}

impl Drop for MultiCudaBackend<'_> {
    fn drop(&mut self) {
        // Before any device frees its buffers: no peer copy may still read or write them.
        for d in &self.devs {
            let _ = d.gpu.sync_copies();
        }
    }
}

impl MultiCudaBackend<'_> {
    /// One tick with lagged exchange (see [`MultiCudaBackend`]).
    fn forward_lagged(&mut self, members: &[Member], blocks: &[usize]) -> Result<Vec<Vec<f32>>> {
        let Some(lag) = self.lag.as_mut() else {
            return Err(Error::Internal("lagged state missing".into()));
        };
        if blocks.len() != members.len() {
            return Err(Error::Internal(
                "one block index per member expected".into(),
            ));
        }
        let nd = self.devs.len();
        let c = self.devs[0].model.config();
        let (d, layers) = (c.dim, c.num_layers);
        let (h, w) = (self.opts.height, self.opts.width);
        let (tpf, flen) = ((h / 2) * (w / 2), CHANNELS * h * w);
        let row = (d * 2) as u64;
        let tokens: Vec<usize> = members.iter().map(|m| m.latents.len()).collect();
        let placement = crate::cascade::place(&tokens, nd);
        // The previous tick's K/V of each member's block (same rows on every device).
        let mut prev_row = Vec::with_capacity(members.len());
        for (i, m) in members.iter().enumerate() {
            let rows = m.latents.len() / flen * tpf;
            prev_row.push(match lag.prev.get(&blocks[i]) {
                Some(&(r0, n)) if n == rows => Some(r0),
                Some(_) => {
                    return Err(Error::Device(format!(
                        "lagged K/V of block {} has the wrong size",
                        blocks[i]
                    )))
                }
                None => None,
            });
        }
        let (cur, prv) = (lag.cur, 1 - lag.cur);
        let (mut shapes, mut keys) = (Vec::with_capacity(nd), Vec::with_capacity(nd));
        for (di, (dev, own)) in self.devs.iter_mut().zip(&placement).enumerate() {
            dev.gpu.bind()?;
            let view = LagView {
                prev_row: &prev_row,
                prev_kv: &lag.gens[di][prv],
            };
            let (s, k) = dev.prepare(members, Some(own), Some(&view))?;
            shapes.push(s);
            keys.push(k);
        }
        // No exchange inside the tick: each device's tick is one graph (one per generation
        // written, since the snapshot copies target that generation's buffers).
        for (di, (((dev, s), k), own)) in self
            .devs
            .iter_mut()
            .zip(&shapes)
            .zip(&keys)
            .zip(&placement)
            .enumerate()
        {
            dev.gpu.bind()?;
            let gen = &lag.gens[di][cur];
            let key = GraphKey {
                shape: k.clone(),
                part: Part::Lagged(cur),
            };
            dev.launch(key, &|b: &mut CudaBackend| {
                b.enqueue_embed(s)?;
                for (li, &(gk, gv)) in gen.iter().enumerate().take(layers) {
                    let _r = nvtx::range(|| format!("layer {li}"));
                    b.enqueue_pre(s, li)?;
                    // Snapshot this device's window members' K/V of this layer.
                    for &i in own.iter().filter(|&&i| !members[i].context) {
                        let off = s.row0[i] as u64 * row;
                        let bytes = s.frames[i] * tpf * row as usize;
                        let (bk, bv) = b.kv_bufs(li);
                        b.gpu.copy(gk + off, bk + off, bytes)?;
                        b.gpu.copy(gv + off, bv + off, bytes)?;
                    }
                    b.enqueue_post(s, li)?;
                }
                b.enqueue_head(s)
            })?;
        }
        let out = download_all(&mut self.devs, &shapes, &placement, members.len())?;
        // End of tick: window members' K/V to every peer's current generation, context
        // members' K/V to every peer's cache (same rows and cache slots on every device).
        for (src, own) in placement.iter().enumerate() {
            let s = &shapes[src];
            for dst in (0..nd).filter(|&p| p != src) {
                let (sd, dd) = (&self.devs[src], &self.devs[dst]);
                let mut regions = Vec::new();
                for &i in own {
                    if members[i].context {
                        let bytes = tpf * row as usize;
                        for fi in 0..s.frames[i] {
                            let slot = sd.slot_of(members[i].first_frame + fi)?;
                            let off = (slot * tpf) as u64 * row;
                            for (sl, dl) in sd.layers.iter().zip(&dd.layers) {
                                regions.push((dl.cache_k + off, sl.cache_k + off, bytes));
                                regions.push((dl.cache_v + off, sl.cache_v + off, bytes));
                            }
                        }
                    } else {
                        let off = s.row0[i] as u64 * row;
                        let bytes = s.frames[i] * tpf * row as usize;
                        for (sg, dg) in lag.gens[src][cur].iter().zip(&lag.gens[dst][cur]) {
                            regions.push((dg.0 + off, sg.0 + off, bytes));
                            regions.push((dg.1 + off, sg.1 + off, bytes));
                        }
                    }
                }
                if !regions.is_empty() {
                    sd.gpu.copy_to_peer(&dd.gpu, &regions)?;
                }
            }
        }
        // The next tick reads this tick's window members.
        lag.prev = (0..members.len())
            .filter(|&i| !members[i].context)
            .map(|i| (blocks[i], (shapes[0].row0[i], shapes[0].frames[i] * tpf)))
            .collect();
        lag.cur = prv;
        Ok(out)
    }

    /// The generation options this backend was opened with.
    pub fn generate_options(&self) -> &GenerateOptions {
        &self.opts
    }
}
