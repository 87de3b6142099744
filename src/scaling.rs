//! A performance model of cascades over several GPUs: FLOPs and bytes counted from the model
//! shapes and the cascade plan, turned into time with a device throughput and a link bandwidth.
//!
//! For every tick of a generation the planner gives the window members; each member's FLOPs are
//! its linear layers (`2 · tokens · weights`) plus self-attention over the keys it may see
//! (`4 · tokens · keys · dim`) plus cross-attention over `text_len` keys. Members are placed on
//! devices with [`crate::cascade::place`]; a tick takes the busiest device's compute time
//! plus the K/V exchange: in joint mode every layer each device sends its members' K and V
//! (bf16) to the peers that read them before attention (with causal attention, the devices of
//! later members; the context member's to every peer). The CUDA backend runs those copies on a
//! copy stream with double-buffered window K/V, so they overlap compute: a tick takes the
//! longer of compute and exchange, plus one layer's exchange (the first copy a device waits
//! for); [`Overlap::None`] gives the serial bound (compute plus every layer's exchange). In
//! lagged mode every member's K/V of every layer go to every peer once per tick, after the
//! tick and before the next one (what the CUDA backend does: not overlapped), so it moves at
//! least the joint exchange's bytes and is never predicted faster than the serial joint bound.

use crate::cascade::place;
use crate::cascade::{Plan, Role};
use crate::config::KvExchange;
use crate::config::ModelConfig;

/// Device and link figures the prediction uses.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Hardware {
    /// Dense bf16 throughput, TFLOP/s (an H100 SXM measures about 800).
    pub tflops: f64,
    /// Fraction of it the engine reaches on whole forwards.
    pub mfu: f64,
    /// Per-GPU outgoing bandwidth of the link, GB/s (NVLink 4 about 450, PCIe 5 x16 about 50,
    /// PCIe 4 about 25).
    pub link_gbs: f64,
    /// Fixed latency per exchange, microseconds.
    pub link_latency_us: f64,
}

/// The shape of one generation.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Workload {
    /// Tokens per latent frame (60×104 latents: 1560).
    pub tokens_per_frame: usize,
    /// Latent frames per block.
    pub block_frames: usize,
    /// Blocks generated.
    pub blocks: usize,
    /// Denoising steps.
    pub steps: usize,
    /// Local attention window in frames (`None` = global).
    pub local_attn: Option<usize>,
}

/// A prediction.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Prediction {
    /// Devices.
    pub devices: usize,
    /// Lag.
    pub lag: usize,
    /// Milliseconds per block (whole generation / blocks).
    pub ms_per_block: f64,
    /// Video frames per second (4 video frames per latent frame).
    pub fps: f64,
    /// Share of the time spent in K/V exchange.
    pub comm_share: f64,
    /// TFLOP per generation.
    pub tflop: f64,
}

/// FLOPs of one member of `frames` frames whose queries see `keys` tokens.
pub fn member_flops(c: &ModelConfig, tokens: usize, keys: usize) -> f64 {
    let (d, f) = (c.dim as f64, c.ffn_dim as f64);
    let n = tokens as f64;
    let linear_weights = 6.0 * d * d + 2.0 * d * f; // self q,k,v,o + cross q,o + ffn
    let per_layer =
        2.0 * n * linear_weights + 4.0 * n * keys as f64 * d + 4.0 * n * c.text_len as f64 * d;
    per_layer * c.num_layers as f64
}

/// Whether the joint exchange overlaps compute (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overlap {
    /// Copies on a copy stream, double-buffered window K/V (the CUDA backend's default).
    CopyStream,
    /// Every layer waits for its exchange (single buffering; the conservative bound).
    None,
}

/// Predicts time per block and FPS for `devices` devices and lag `lag` (joint exchange
/// overlapped with compute, as the CUDA backend runs it; lagged exchange never overlapped).
pub fn predict(
    c: &ModelConfig,
    w: &Workload,
    hw: &Hardware,
    devices: usize,
    lag: usize,
    xch: KvExchange,
) -> Prediction {
    predict_with(c, w, hw, devices, lag, xch, Overlap::CopyStream)
}

/// [`predict`] with an explicit overlap model for the joint exchange.
pub fn predict_with(
    c: &ModelConfig,
    w: &Workload,
    hw: &Hardware,
    devices: usize,
    lag: usize,
    xch: KvExchange,
    overlap: Overlap,
) -> Prediction {
    let plan = match Plan::new(w.blocks, w.steps, lag) {
        Ok(p) => p,
        Err(_) => {
            return Prediction {
                devices,
                lag,
                ms_per_block: f64::NAN,
                fps: f64::NAN,
                comm_share: 0.0,
                tflop: 0.0,
            }
        }
    };
    let tpf = w.tokens_per_frame;
    let bf = w.block_frames;
    let rate = hw.tflops * 1e12 * hw.mfu;
    let (mut total, mut comm_total, mut flops_total) = (0.0f64, 0.0f64, 0.0f64);
    for tau in 0..plan.ticks() {
        let ms = plan.members(tau);
        let mut flops = Vec::with_capacity(ms.len());
        for (i, m) in ms.iter().enumerate() {
            let f0 = m.block * bf;
            let e_end = f0 + bf;
            // Clean cache frames committed before this tick, then earlier members, then itself.
            let committed = ms
                .iter()
                .filter(|o| o.role == Role::Context)
                .map(|o| o.block * bf)
                .min()
                .unwrap_or(
                    // No context member: everything before the first member is committed.
                    ms.first().map_or(0, |o| o.block * bf),
                );
            let visible_frame = |f: usize| w.local_attn.is_none_or(|l| f + l > e_end);
            let mut key_frames = (0..committed.min(f0)).filter(|&f| visible_frame(f)).count();
            key_frames += ms[..i]
                .iter()
                .map(|o| {
                    (o.block * bf..o.block * bf + bf)
                        .filter(|&f| visible_frame(f))
                        .count()
                })
                .sum::<usize>();
            key_frames += bf;
            flops.push(member_flops(c, bf * tpf, key_frames * tpf));
        }
        flops_total += flops.iter().sum::<f64>();
        let tokens: Vec<usize> = vec![bf * tpf; ms.len()];
        let placement = place(&tokens, devices);
        let compute = placement
            .iter()
            .map(|ids| ids.iter().map(|&i| flops[i]).sum::<f64>() / rate)
            .fold(0.0, f64::max);
        let comm = if devices > 1 {
            // What the engine exchanges (joint mode, causal attention): member j's K and V
            // (bf16) go to every other device that reads them, i.e. holds a later member (or
            // any member, for the context member, whose K/V every device caches). The link
            // time is that of the busiest device, sending or receiving.
            let kv = (bf * tpf) as f64 * c.dim as f64 * 2.0 * 2.0;
            let mut owner = vec![0usize; ms.len()];
            for (d, ids) in placement.iter().enumerate() {
                ids.iter().for_each(|&i| owner[i] = d);
            }
            // Lagged exchange sends every member to every peer (what `forward_lagged` does).
            let (mut sent, mut received) = (vec![0.0f64; devices], vec![0.0f64; devices]);
            for (j, m) in ms.iter().enumerate() {
                for (dst, ids) in placement.iter().enumerate() {
                    let reads = xch == KvExchange::Lagged
                        || m.role == Role::Context
                        || ids.iter().any(|&i| i > j);
                    if dst != owner[j] && reads {
                        sent[owner[j]] += kv;
                        received[dst] += kv;
                    }
                }
            }
            let bytes_per_layer = sent.iter().chain(&received).fold(0.0f64, |a, &b| a.max(b));
            let per_layer = bytes_per_layer / (hw.link_gbs * 1e9) + hw.link_latency_us * 1e-6;
            let all = per_layer * c.num_layers as f64;
            match (xch, overlap) {
                (KvExchange::Joint, Overlap::None) => all,
                (KvExchange::Joint, Overlap::CopyStream) => (all - compute).max(0.0) + per_layer,
                (KvExchange::Lagged, _) => all,
            }
        } else {
            0.0
        };
        total += compute + comm;
        comm_total += comm;
    }
    let ms_per_block = total * 1e3 / w.blocks as f64;
    Prediction {
        devices,
        lag,
        ms_per_block,
        fps: (w.blocks * bf * 4) as f64 / total,
        comm_share: comm_total / total,
        tflop: flops_total / 1e12,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::builtin_config;

    fn wan() -> (ModelConfig, Workload, Hardware) {
        (
            builtin_config("wan-1.3b-shape").unwrap(),
            Workload {
                tokens_per_frame: 1560,
                block_frames: 3,
                blocks: 7,
                steps: 4,
                local_attn: None,
            },
            Hardware {
                tflops: 800.0,
                mfu: 1.0,
                link_gbs: 450.0,
                link_latency_us: 10.0,
            },
        )
    }

    #[test]
    fn block_six_costs_about_182_tflop() {
        // The 6th block of 7 (global attention, 4 steps + context pass).
        let (c, _, _) = wan();
        let tpf = 1560;
        let keys = |frames: usize| frames * tpf;
        // Block 5 (0-based): 15 cached frames + its own 3 at every step and in its context pass.
        let f = 5.0 * member_flops(&c, 3 * tpf, keys(18));
        assert!((f / 1e12 - 182.0).abs() < 3.0, "{}", f / 1e12);
    }

    #[test]
    fn more_devices_and_smaller_lag_are_faster_on_nvlink() {
        let (c, w, hw) = wan();
        let seq = predict(&c, &w, &hw, 1, 4, KvExchange::Joint);
        let one_lag1 = predict(&c, &w, &hw, 1, 1, KvExchange::Joint);
        let five_lag1 = predict(&c, &w, &hw, 5, 1, KvExchange::Joint);
        // One device: the same FLOPs (up to attention) in fewer, bigger ticks.
        assert!((one_lag1.ms_per_block / seq.ms_per_block - 1.0).abs() < 0.2);
        assert!(five_lag1.fps > 2.0 * seq.fps, "{five_lag1:?} vs {seq:?}");
        let pcie = Hardware {
            link_gbs: 25.0,
            ..hw
        };
        let five_pcie = predict(&c, &w, &pcie, 5, 1, KvExchange::Joint);
        assert!(five_pcie.fps < five_lag1.fps && five_pcie.comm_share > five_lag1.comm_share);
        // Overlapping the joint exchange never loses to the serial bound; the lagged exchange
        // (all-to-all, after the tick, not overlapped) never beats it.
        let serial = predict_with(&c, &w, &pcie, 5, 1, KvExchange::Joint, Overlap::None);
        assert!(five_pcie.fps >= serial.fps, "{five_pcie:?} vs {serial:?}");
        let lagged = predict(&c, &w, &pcie, 5, 1, KvExchange::Lagged);
        assert!(lagged.fps <= serial.fps, "{lagged:?} vs {serial:?}");
    }
}
