//! Picks the attention kernel's tile ([`AttentionTile`]) for a session by timing both on the
//! session's own device and its real self-attention list.
//!
//! The two tiles trade differently on different GPUs and lists: 64 query rows per block make
//! twice the blocks (more parallelism for short groups, a smaller tail), 128 rows halve the
//! K/V bytes each FLOP pulls from L2 and the barriers per key (see `cuda/attention.cu`). Which
//! wins depends on the chip's L2 bandwidth, its SM count and the blocks the list makes (groups
//! x heads x row blocks), so it is measured rather than guessed, on the list the session
//! launches: at the first tick of each window shape ([`super::graphs::ShapeKey`], before its
//! graph is captured), once the tick's tables are uploaded, both tiles run layer 0's
//! self-attention on those tables (the real groups and segments: their rows, their keys, the
//! cache and window buffers they point to; queries overwritten with random bf16, the output
//! scratch overwritten, both recomputed by the tick), 1 warm-up and [`TUNE_RUNS`] timed
//! launches each (median), and the faster tile is kept for that shape. Results are remembered
//! per device and list for the process ([`TuneShape`]), so a later session or shape with the
//! same list does not pay again (Wan-1.3B, estimated: up to ~10 ms per launch at 350 TFLOP/s,
//! 8 launches per new shape). The list is the one of the shape's first tick: a shape first
//! seen while the KV cache still fills is timed with the keys it has then.
//! Both tiles give bit-identical outputs (same key tiles, same per-warp work), so the choice
//! affects speed only. `BC_ATTENTION_TILE=rows64|rows128` or
//! [`super::CudaOptions::attention_tile`] skips the measurement; an emulated device uses
//! [`AttentionTile::Rows128`] without timing.

use super::device::{DevPtr, Gpu};
use super::graphs::ShapeKey;
use super::ops;
use super::tables::TickTables;
use super::CudaBackend;
use crate::kernels::launch::AttentionTile;
use crate::rng::Rng;
use crate::Result;
use half::bf16;
use std::collections::HashMap;
use std::sync::Mutex;

/// Timed launches per tile (the median counts).
pub const TUNE_RUNS: usize = 3;
/// Random bf16 values uploaded once and repeated to fill the query buffer.
const PATTERN: usize = 1 << 20;

/// The device buffers a tuning run uses: the tick's uploaded self-attention tables (layer 0)
/// and the query / output buffers the tick overwrites anyway.
pub(super) struct TuneBuffers {
    /// Queries, rows up to the end of the last group (overwritten with random bf16).
    pub q: DevPtr,
    /// Output, same size as `q` (overwritten; also the staging of the random pattern).
    pub out: DevPtr,
    /// Layer 0's segment table.
    pub segments: DevPtr,
    /// Per group its segments' indices.
    pub seg_index: DevPtr,
    /// The groups.
    pub groups: DevPtr,
}

/// One query group of a tuning problem: its query rows and the keys of each segment it sees,
/// in order (the list the kernel walks).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TuneGroup {
    /// Query rows.
    pub rows: usize,
    /// Keys of each segment of the group's list.
    pub segments: Vec<usize>,
}

/// A tuning problem (and key of the process-wide memo): the device and the self-attention
/// list of one tick, as launched.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TuneShape {
    /// The device (a hash of its ordinal and name), so two GPU models never share a result.
    pub device: u64,
    /// Heads.
    pub heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// The groups in launch order (grid z).
    pub groups: Vec<TuneGroup>,
}

impl TuneShape {
    /// The self-attention list of a tick's tables (layer 0; every layer has the same rows and
    /// keys): what the tick launches, group by group.
    pub(super) fn of_tables(
        device: u64,
        heads: usize,
        head_dim: usize,
        t: &TickTables,
    ) -> TuneShape {
        let groups = t
            .groups
            .iter()
            .map(|g| {
                let b = g.seg_begin.max(0) as usize;
                let n = g.seg_count.max(0) as usize;
                TuneGroup {
                    rows: g.q_rows.max(0) as usize,
                    segments: t.index[b.min(t.index.len())..(b + n).min(t.index.len())]
                        .iter()
                        .filter_map(|&i| t.seg_tab.get(i.max(0) as usize))
                        .map(|s| s.tokens.max(0) as usize)
                        .collect(),
                }
            })
            .collect();
        TuneShape {
            device,
            heads,
            head_dim,
            groups,
        }
    }

    /// Query rows of all groups.
    pub fn rows(&self) -> usize {
        self.groups.iter().map(|g| g.rows).sum()
    }

    /// Floating-point operations of one launch: 4 * rows * keys * head_dim per group and head.
    pub fn flops(&self) -> f64 {
        self.groups
            .iter()
            .map(|g| 4.0 * g.rows as f64 * g.segments.iter().sum::<usize>() as f64)
            .sum::<f64>()
            * (self.heads * self.head_dim) as f64
    }
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
        .map(|m| m.iter().map(|(s, r)| (s.clone(), r.clone())).collect())
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

/// Times both tiles on the tables in `buf` (the list `shape` describes, `q_rows` query rows
/// from row 0, `max_rows` the largest group) and returns the faster, or the remembered result
/// for this list. Overwrites `buf.q` and `buf.out`.
pub(super) fn pick(
    gpu: &Gpu,
    shape: TuneShape,
    buf: &TuneBuffers,
    q_rows: usize,
    max_rows: usize,
) -> Result<TuneResult> {
    if let Some(r) = memo().lock().ok().and_then(|m| m.get(&shape).cloned()) {
        return Ok(r);
    }
    let qb = q_rows * shape.heads * shape.head_dim * 2;
    // The pattern is staged in `out` (as large as q), which the runs overwrite anyway.
    fill_random(gpu, buf.q, qb, buf.out, qb, 1)?;
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
                shape.groups.len(),
                max_rows,
                tile,
                None,
            )
            .map(|_| ())
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
        .map_or(AttentionTile::Rows128, |t| t.0);
    let r = TuneResult { tile, times };
    if let Ok(mut m) = memo().lock() {
        m.insert(shape, r.clone());
    }
    Ok(r)
}

/// A session's automatic tile choice: the device (hashed into [`TuneShape::device`]) and the
/// tile picked per window shape (a shape's graph is captured with its tile).
pub(super) struct AutoTile {
    device: u64,
    per_shape: HashMap<ShapeKey, AttentionTile>,
}

impl AutoTile {
    /// No shape tuned yet on the device `ordinal` named `name`.
    pub(super) fn new(ordinal: usize, name: &str) -> AutoTile {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&(ordinal, name), &mut hasher);
        AutoTile {
            device: std::hash::Hasher::finish(&hasher),
            per_shape: HashMap::new(),
        }
    }
}

impl CudaBackend<'_> {
    /// Sets the attention tile of the tick whose tables `t` were just uploaded: the one picked
    /// for its window shape, timed now on these tables when the shape is new (see the module
    /// documentation). Nothing to do with a fixed tile.
    pub(super) fn tune_attention(&mut self, t: &TickTables) -> Result<()> {
        let Some(auto) = &self.attn_auto else {
            return Ok(());
        };
        if let Some(&tile) = auto.per_shape.get(&t.key) {
            self.attn_tile = tile;
            return Ok(());
        }
        let c = self.model.config();
        let shape = TuneShape::of_tables(auto.device, c.num_heads, c.head_dim(), t);
        if shape.groups.is_empty() {
            return Ok(()); // nothing launched: keep the tile
        }
        let q_rows = t
            .groups
            .iter()
            .map(|g| (g.q_begin.max(0) + g.q_rows.max(0)) as usize)
            .max()
            .unwrap_or(0);
        let buf = TuneBuffers {
            q: self.b.q,
            out: self.b.att,
            segments: self.b.sa_segs,
            seg_index: self.b.sa_index,
            groups: self.b.sa_groups,
        };
        let r = pick(&self.gpu, shape, &buf, q_rows, t.shape.max_rows)?;
        self.attn_tile = r.tile;
        if let Some(auto) = &mut self.attn_auto {
            auto.per_shape.insert(t.key.clone(), r.tile);
        }
        self.attn_tune = Some(r);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::params::{BcAttnGroup, BcKvSegment};

    /// The tuner launches both tiles on the list it is given (several groups, several
    /// segments, on an emulated device), answers with the faster and remembers that list.
    #[test]
    fn pick_times_both_tiles_on_the_given_list_and_remembers_it() {
        let mut gpu = Gpu::open_emulated().unwrap();
        let (heads, hd) = (2usize, 32usize);
        let dim = heads * hd;
        let (q_rows, kv_rows) = (57usize, 87usize);
        let mut rng = Rng::new(5);
        let mut rand =
            |n: usize| -> Vec<bf16> { (0..n).map(|_| bf16::from_f32(rng.normal())).collect() };
        let (k, v) = (rand(kv_rows * dim), rand(kv_rows * dim));
        let mut alloc = |bytes: usize| gpu.alloc(bytes).unwrap();
        let (q, out) = (alloc(q_rows * dim * 2), alloc(q_rows * dim * 2));
        let (kd, vd) = (alloc(kv_rows * dim * 2), alloc(kv_rows * dim * 2));
        let (segments, seg_index, groups) = (alloc(3 * 32), alloc(16), alloc(2 * 16));
        gpu.upload(kd, &k).unwrap();
        gpu.upload(vd, &v).unwrap();
        // Segments of 30, 50 and 7 keys; group 0 (40 rows) sees 0, 1; group 1 (17 rows) 2, 0.
        let seg = |at: usize, n: usize| BcKvSegment {
            k: (kd + (at * dim * 2) as u64) as usize as *const _,
            v: (vd + (at * dim * 2) as u64) as usize as *const _,
            tokens: n as i32,
            _pad: 0,
        };
        gpu.upload(segments, &[seg(0, 30), seg(30, 50), seg(80, 7)])
            .unwrap();
        gpu.upload(seg_index, &[0i32, 1, 2, 0]).unwrap();
        let g = |q_begin, q_rows, seg_begin| BcAttnGroup {
            q_begin,
            q_rows,
            seg_begin,
            seg_count: 2,
        };
        gpu.upload(groups, &[g(0, 40, 0), g(40, 17, 2)]).unwrap();
        let shape = TuneShape {
            device: 0x5eed_0001,
            heads,
            head_dim: hd,
            groups: vec![
                TuneGroup {
                    rows: 40,
                    segments: vec![30, 50],
                },
                TuneGroup {
                    rows: 17,
                    segments: vec![7, 30],
                },
            ],
        };
        assert_eq!(shape.rows(), 57);
        assert_eq!(shape.flops(), 4.0 * (40.0 * 80.0 + 17.0 * 37.0) * 64.0);
        let buf = TuneBuffers {
            q,
            out,
            segments,
            seg_index,
            groups,
        };
        let r = pick(&gpu, shape.clone(), &buf, q_rows, 40).unwrap();
        let tiles: Vec<AttentionTile> = r.times.iter().map(|t| t.0).collect();
        assert_eq!(tiles, AttentionTile::ALL.to_vec());
        let best = r.times.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
        assert_eq!(r.tile, best.0);
        assert!(remembered()
            .iter()
            .any(|(s, m)| *s == shape && m.tile == r.tile));
        // The runs wrote the attention of the random queries: finite, not all zero.
        let mut o = vec![bf16::ZERO; q_rows * dim];
        gpu.download(&mut o, out).unwrap();
        assert!(o.iter().all(|x| x.is_finite()) && o.iter().any(|x| x.to_f32() != 0.0));
    }
}
