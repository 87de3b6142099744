//! Picks the attention kernel's tile ([`AttentionTile`]) for a session by timing both on the
//! session's own device and shapes.
//!
//! The two tiles trade differently on different GPUs: 64 query rows per block keep two blocks
//! per SM (latency hiding across blocks), 128 rows halve the K/V bytes each FLOP pulls from L2
//! and the barriers per key (see `cuda/attention.cu`). Which wins depends on the chip's L2
//! bandwidth, SM count and the number of blocks the shape makes, so it is measured rather than
//! guessed: at open, before any graph is captured, each tile runs on a synthetic problem of the
//! session's largest window (rows capped at [`TUNE_MAX_ROWS`]) against its full KV cache
//! (capped at [`TUNE_MAX_KEYS`]), on random bf16 data, 1 warm-up and [`TUNE_RUNS`] timed
//! launches each (median), and the faster tile is kept. Results are remembered per device and
//! shape for the process, so a later session on the same shapes does not pay again (about
//! 40 ms for Wan-1.3B shapes: 8 launches of up to 1.6 TFLOP). Both tiles give bit-identical
//! outputs (same key tiles, same per-warp work), so the choice affects speed only. `BC_ATTENTION_TILE=rows64|rows128` or
//! [`super::CudaOptions::attention_tile`] skips the measurement.

use super::device::{DevPtr, Gpu};
use super::ops;
use crate::kernels::launch::AttentionTile;
use crate::kernels::params::{BcAttnGroup, BcKvSegment};
use crate::rng::Rng;
use crate::Result;
use half::bf16;
use std::collections::HashMap;
use std::sync::Mutex;

/// Query rows of the tuning problem at most.
pub const TUNE_MAX_ROWS: usize = 8192;
/// Keys of the tuning problem at most.
pub const TUNE_MAX_KEYS: usize = 32768;
/// Timed launches per tile (the median counts).
pub const TUNE_RUNS: usize = 3;
/// Random bf16 values uploaded once and repeated to fill the tuning buffers.
const PATTERN: usize = 1 << 20;

/// The device buffers a tuning run may overwrite (the caller re-initialises them after).
pub(super) struct TuneBuffers {
    /// Queries, at least `rows * heads * head_dim` bf16.
    pub q: DevPtr,
    /// Output, same size as `q`.
    pub out: DevPtr,
    /// Keys and values, each at least `keys * heads * head_dim` bf16.
    pub k: DevPtr,
    /// See `k`.
    pub v: DevPtr,
    /// Room for one [`BcKvSegment`].
    pub segments: DevPtr,
    /// Room for one i32.
    pub seg_index: DevPtr,
    /// Room for one [`BcAttnGroup`].
    pub groups: DevPtr,
}

/// Shape of a tuning problem (and key of the process-wide memo).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TuneShape {
    /// The device (a hash of its ordinal and name), so two GPU models never share a result.
    pub device: u64,
    /// Heads.
    pub heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Query rows (capped).
    pub rows: usize,
    /// Keys (capped).
    pub keys: usize,
}

/// One tuning result: each tile's median milliseconds and the winner.
#[derive(Clone, Debug)]
pub struct TuneResult {
    /// The faster tile.
    pub tile: AttentionTile,
    /// (tile, median ms of one launch).
    pub times: Vec<(AttentionTile, f32)>,
}

fn memo() -> &'static Mutex<HashMap<TuneShape, TuneResult>> {
    static MEMO: std::sync::OnceLock<Mutex<HashMap<TuneShape, TuneResult>>> =
        std::sync::OnceLock::new();
    MEMO.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Every tuning result of this process so far (for benchmarks and reports).
pub fn remembered() -> Vec<(TuneShape, TuneResult)> {
    memo()
        .lock()
        .map(|m| m.iter().map(|(s, r)| (*s, r.clone())).collect())
        .unwrap_or_default()
}

/// Fills `bytes` of `dst` with random bf16: one pattern uploaded to `scratch` (room for
/// `scratch_bytes`), repeated by device copies.
fn fill_random(
    gpu: &Gpu,
    dst: DevPtr,
    bytes: usize,
    scratch: DevPtr,
    scratch_bytes: usize,
    seed: u64,
) -> Result<()> {
    let chunk = (PATTERN * 2).min(bytes).min(scratch_bytes) & !1;
    if chunk == 0 {
        return Ok(());
    }
    let mut rng = Rng::new(seed);
    let pattern: Vec<bf16> = (0..chunk / 2)
        .map(|_| bf16::from_f32(rng.normal()))
        .collect();
    gpu.upload(scratch, &pattern)?;
    let mut off = 0;
    while off < bytes {
        let n = chunk.min(bytes - off);
        gpu.copy(dst + off as u64, scratch, n)?;
        off += n;
    }
    Ok(())
}

/// Times both tiles on `shape` (rows and keys already capped) and returns the faster, or the
/// remembered result for this shape. Overwrites every buffer of `buf`.
pub(super) fn pick(gpu: &Gpu, shape: TuneShape, buf: &TuneBuffers) -> Result<TuneResult> {
    if let Some(r) = memo().lock().ok().and_then(|m| m.get(&shape).cloned()) {
        return Ok(r);
    }
    let dim = shape.heads * shape.head_dim;
    let (qb, kb) = (shape.rows * dim * 2, shape.keys * dim * 2);
    // The pattern is staged in `out` (as large as q), which the runs overwrite anyway.
    fill_random(gpu, buf.q, qb, buf.out, qb, 1)?;
    fill_random(gpu, buf.k, kb, buf.out, qb, 2)?;
    fill_random(gpu, buf.v, kb, buf.out, qb, 3)?;
    let seg = BcKvSegment {
        k: buf.k as usize as *const _,
        v: buf.v as usize as *const _,
        tokens: shape.keys as i32,
        _pad: 0,
    };
    let group = BcAttnGroup {
        q_begin: 0,
        q_rows: shape.rows as i32,
        seg_begin: 0,
        seg_count: 1,
    };
    gpu.upload(buf.segments, std::slice::from_ref(&seg))?;
    gpu.upload(buf.seg_index, &[0i32])?;
    gpu.upload(buf.groups, std::slice::from_ref(&group))?;
    let (start, end) = (gpu.event()?, gpu.event()?);
    let mut times = Vec::new();
    for tile in AttentionTile::ALL {
        let run = || {
            ops::attention(
                gpu,
                buf.q,
                buf.out,
                shape.heads,
                shape.head_dim,
                buf.segments,
                buf.seg_index,
                buf.groups,
                1,
                shape.rows,
                tile,
            )
        };
        run()?;
        let mut ms = Vec::with_capacity(TUNE_RUNS);
        for _ in 0..TUNE_RUNS {
            gpu.record(&start)?;
            run()?;
            gpu.record(&end)?;
            ms.push(gpu.elapsed_ms(&start, &end)?);
        }
        ms.sort_by(f32::total_cmp);
        times.push((tile, ms[TUNE_RUNS / 2]));
    }
    gpu.sync()?;
    let tile = times
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(AttentionTile::Rows64, |t| t.0);
    let r = TuneResult { tile, times };
    if let Ok(mut m) = memo().lock() {
        m.insert(shape, r.clone());
    }
    Ok(r)
}
