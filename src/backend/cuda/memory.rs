//! The device memory of one logical device, planned before anything is allocated: the sizes
//! that follow from the options, and one list of `(name, bytes)` per-run buffers that both the
//! free-memory check and the allocation use.

use super::{prompt_kv, weight_cache, CudaOptions};
use crate::config::{GenerateOptions, ModelConfig};
use crate::kernels::params::{BcAttnGroup, BcKvSegment};
use crate::model::{Model, CHANNELS};
use crate::{Error, Result};

/// Sizes that follow from the model and the options. User options (latent size, block frames,
/// steps, run length) reach every product: each is checked, so a size too large for any GPU
/// is an out-of-memory error, never an overflow.
#[derive(Clone, Copy, Debug)]
pub(super) struct Sizes {
    /// Tokens per frame and values per latent frame.
    pub(super) tpf: usize,
    pub(super) flen: usize,
    /// KV cache slots (frames) per layer.
    pub(super) slots: usize,
    /// The largest window: members, frames, token rows.
    pub(super) max_members: usize,
    pub(super) max_frames: usize,
    pub(super) rows: usize,
    /// Self-attention segments per layer.
    pub(super) seg_max: usize,
    /// Prompt K/V slots (one per member of a window).
    pub(super) prompt_slots: usize,
    /// Entries of the time-embedding table (`time_table.rs`).
    pub(super) time_entries: usize,
}

impl Sizes {
    pub(super) fn new(opts: &GenerateOptions, copts: &CudaOptions, dim: usize) -> Result<Self> {
        let too_big = |what: &str| {
            Error::OutOfMemory(format!(
                "the CUDA buffers for {what} are larger than any device's memory"
            ))
        };
        let (h, w) = (opts.height, opts.width);
        let tpf = (h / 2)
            .checked_mul(w / 2)
            .ok_or_else(|| too_big("the latent size"))?;
        let flen = CHANNELS
            .checked_mul(tpf)
            .and_then(|v| v.checked_mul(4))
            .ok_or_else(|| too_big("the latent size"))?;
        tpf.checked_mul(dim)
            .ok_or_else(|| too_big("the latent size"))?;
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
        let rows = max_frames
            .checked_mul(tpf)
            .ok_or_else(|| too_big("the window"))?;
        let seg_max = slots
            .checked_add(max_frames)
            .and_then(|v| v.checked_add(max_members))
            .and_then(|v| v.checked_mul(max_members))
            .and_then(|v| v.checked_add(4))
            .ok_or_else(|| too_big("the attention tables"))?;
        Ok(Sizes {
            tpf,
            flen,
            slots,
            max_members,
            max_frames,
            rows,
            seg_max,
            prompt_slots: max_members,
            time_entries: super::time_table::entries(steps, max_members),
        })
    }
}

/// Key splits the self-attention's split-KV scratch holds for one member's rows (a window of
/// more members splits less, as far as its partials fit; see [`split_scratch_bytes`]).
pub(super) const SPLIT_SCRATCH_SPLITS: u128 = 4;

/// Bytes of the self-attention's split-KV scratch (`ops::SplitScratch`): the partial results of
/// [`SPLIT_SCRATCH_SPLITS`] splits of one member's rows (a block's frames, rounded up to 128-row
/// tiles, `head_dim + 2` f32 per row and head). Allocated with the session, never inside a
/// graph capture; a launch whose splits need more splits less.
pub(super) fn split_scratch_bytes(c: &ModelConfig, s: &Sizes) -> u128 {
    let u = |v: usize| v as u128;
    let member_rows = u(s.max_frames / s.max_members.max(1)) * u(s.tpf);
    SPLIT_SCRATCH_SPLITS
        * member_rows.next_multiple_of(128)
        * u(c.num_heads)
        * (u(c.head_dim()) + 2)
        * 4
}

/// What a buffer is for (the out-of-memory message reports the sums).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Use {
    /// The KV cache (per layer, K and V).
    Cache,
    /// Activations and the tick tables.
    Activations,
    /// Prompt K/V slots and the scratch that computes them.
    Prompts,
}

/// The per-run buffers of one logical device, in allocation order; bytes in u128 (no product
/// of the sizes can overflow it). The free-memory check sums this list and the allocation
/// walks it, so the two cannot disagree.
pub(super) struct RunPlan {
    pub(super) buffers: Vec<(&'static str, Use, u128)>,
}

impl RunPlan {
    pub(super) fn new(c: &ModelConfig, s: &Sizes) -> Self {
        let u = |v: usize| v as u128;
        let (bf, f4) = (2u128, 4u128);
        let (d, n, mf, mm) = (u(c.dim), u(s.rows), u(s.max_frames), u(s.max_members));
        let seg = u(std::mem::size_of::<BcKvSegment>());
        let group = u(std::mem::size_of::<BcAttnGroup>());
        let cache = bf * u(s.slots) * u(s.tpf) * d;
        let mut buffers = Vec::new();
        for _ in 0..c.num_layers {
            buffers.push(("cache_k", Use::Cache, cache));
            buffers.push(("cache_v", Use::Cache, cache));
        }
        let a = Use::Activations;
        buffers.extend([
            ("lat", a, f4 * mf * u(s.flen)),
            ("flow", a, f4 * mf * u(s.flen)),
            // The denoising state on the device: one latent slot per window member, the
            // renoise, the per-frame sigmas of the flow step (`resident.rs`).
            ("lat_slots", a, f4 * mf * u(s.flen)),
            ("step_noise", a, f4 * mf * u(s.flen)),
            ("step_sigma", a, f4 * mf * 2),
            ("patches", a, bf * n * 64),
            ("x", a, f4 * n * d),
            ("y", a, bf * n * d),
            ("qkv", a, bf * n * 3 * d),
            ("q", a, bf * n * d),
            ("k", a, bf * n * d),
            ("v", a, bf * n * d),
            ("att", a, bf * n * d),
            ("ffn", a, bf * n * u(c.ffn_dim)),
            ("head", a, bf * n * 64),
            ("e", a, f4 * mf * d),
            ("e0", a, f4 * mf * 6 * d),
            // Each distinct timestep's e and e0, repeated for one block (`time_table.rs`).
            (
                "time_table",
                a,
                f4 * u(s.time_entries) * (mf / mm.max(1)) * 7 * d,
            ),
            ("frame_pos", a, f4 * mf),
            ("frame_slot", a, f4 * mf),
            ("sa_segs", a, u(c.num_layers) * u(s.seg_max) * seg),
            ("sa_index", a, f4 * mm * u(s.seg_max)),
            ("sa_groups", a, group * mm),
            ("ca_segs", a, u(c.num_layers) * u(s.prompt_slots) * seg),
            ("ca_index", a, f4 * mm),
            ("ca_groups", a, group * mm),
            (
                "prompt_kv",
                Use::Prompts,
                u(s.prompt_slots) * u(c.num_layers) * 2 * bf * u(c.text_len) * d,
            ),
            ("prompt_scratch", Use::Prompts, prompt_kv::scratch_bytes(c)),
            ("attn_split", a, split_scratch_bytes(c, s)),
        ]);
        RunPlan { buffers }
    }

    /// Bytes of the buffers for `what`.
    pub(super) fn bytes(&self, what: Use) -> u128 {
        self.buffers
            .iter()
            .filter(|b| b.1 == what)
            .map(|b| b.2)
            .sum()
    }

    /// Bytes of every buffer.
    pub(super) fn total(&self) -> u128 {
        self.buffers.iter().map(|b| b.2).sum()
    }
}

/// Bytes of `model`'s weights on a device, as
/// [`upload_weights`](super::weight_cache::upload_weights) lays them out (GEMM weights bf16,
/// the rest f32), and the text-embedding / cross-attention K/V weights.
pub(super) fn weight_bytes(model: &Model) -> u128 {
    weight_cache::weight_tensors(model)
        .iter()
        .map(|(v, bf16)| v.len() as u128 * if *bf16 { 2 } else { 4 })
        .sum::<u128>()
        + prompt_kv::weight_bytes(model.config())
}
