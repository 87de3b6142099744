//! Every CUDA kernel, run on the CPU through the SIMT emulation layer, against the f32 CPU
//! reference (`blockcascade::backend::cpu`). Inputs are fresh random normals (bf16 inputs are rounded
//! first and the reference gets the same rounded values), outputs are poisoned with NaN before
//! the launch, tolerance is bf16-level (1e-2 relative), and a non-finite output never passes.

use blockcascade::backend::cpu::attention::{attention as cpu_attention, KvSegment as CpuSeg};
use blockcascade::backend::cpu::ops;
use blockcascade::kernels::emu::{self, Act, AttentionTile, KvSegment, QkNormRope, QueryGroup};
use blockcascade::kernels::LaunchErrorKind;
use blockcascade::rng::Rng;
use half::bf16;
use std::sync::mpsc;
use std::time::Duration;

fn randn(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * scale).collect()
}

/// Random values already rounded to bf16, as f32 (for the reference) and bf16 (for the kernel).
fn randn_bf16(rng: &mut Rng, n: usize, scale: f32) -> (Vec<f32>, Vec<bf16>) {
    let b: Vec<bf16> = randn(rng, n, scale)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    (b.iter().map(|v| v.to_f32()).collect(), b)
}

fn to_f32(b: &[bf16]) -> Vec<f32> {
    b.iter().map(|v| v.to_f32()).collect()
}

/// Asserts `got` matches `want` within `rtol * (|want| + 0.05 * rms(want))`; NaN never passes.
fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f32) {
    assert_close_floor(what, got, want, rtol, 0.05);
}

/// Attention outputs: the tensor-core kernel rounds the probabilities P to bf16 before P.V (as
/// FlashAttention-2 does), which adds noise of about 1e-3 of the output rms to every element,
/// also to elements near zero; so the error floor is rms(want) instead of 0.05 rms.
fn assert_attention_close(what: &str, got: &[f32], want: &[f32]) {
    assert_close_floor(what, got, want, 2e-2, 1.0);
}

/// Asserts `got` matches `want` within `rtol * (|want| + floor * rms(want))`; NaN never passes.
fn assert_close_floor(what: &str, got: &[f32], want: &[f32], rtol: f32, floor: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let rms =
        (want.iter().map(|v| (v * v) as f64).sum::<f64>() / want.len().max(1) as f64).sqrt() as f32;
    let mut worst = (0usize, 0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}: element {i} is {g} (want {w})");
        let err = (g - w).abs() / (w.abs() + floor * rms).max(1e-30);
        if err > worst.1 {
            worst = (i, err);
        }
    }
    assert!(
        worst.1 <= rtol,
        "{what}: element {} is {} but want {} (relative error {:.3e} > {rtol:.0e})",
        worst.0,
        got[worst.0],
        want[worst.0],
        worst.1
    );
}

const EPS: f32 = 1e-6;

#[test]
fn ln_modulate_and_head_modulation() {
    let mut rng = Rng::new(1);
    for &(dim, tpf, frames) in &[(40usize, 7usize, 3usize), (1064, 5, 2)] {
        let rows = tpf * frames;
        let x = randn(&mut rng, rows * dim, 2.0);
        // Block modulation: shift/scale read straight out of e0 [frames, 6, dim] + modulation.
        let e0 = randn(&mut rng, frames * 6 * dim, 0.5);
        let m = randn(&mut rng, 6 * dim, 0.5);
        let mut out = vec![bf16::NAN; rows * dim];
        emu::ln_modulate(
            &x,
            dim,
            EPS,
            tpf,
            &e0[3 * dim..],
            &e0[4 * dim..],
            6 * dim,
            Some(&m[3 * dim..4 * dim]),
            Some(&m[4 * dim..5 * dim]),
            &mut out,
        )
        .unwrap();
        let eff = |c: usize| -> Vec<f32> {
            (0..frames)
                .flat_map(|f| (0..dim).map(move |d| (f, d)))
                .map(|(f, d)| e0[(f * 6 + c) * dim + d] + m[c * dim + d])
                .collect()
        };
        let mut want = vec![0f32; rows * dim];
        ops::ln_modulate(&x, dim, EPS as f64, tpf, &eff(3), &eff(4), &mut want);
        assert_close("ln_modulate", &to_f32(&out), &want, 1e-2);

        // Head modulation: shift = e + m0, scale = e + m1 with e [frames, dim].
        let e = randn(&mut rng, frames * dim, 0.5);
        let hm = randn(&mut rng, 2 * dim, 0.5);
        let mut out = vec![bf16::NAN; rows * dim];
        emu::ln_modulate(
            &x,
            dim,
            EPS,
            tpf,
            &e,
            &e,
            dim,
            Some(&hm[..dim]),
            Some(&hm[dim..]),
            &mut out,
        )
        .unwrap();
        let sh: Vec<f32> = (0..frames * dim).map(|i| e[i] + hm[i % dim]).collect();
        let sc: Vec<f32> = (0..frames * dim)
            .map(|i| e[i] + hm[dim + i % dim])
            .collect();
        ops::ln_modulate(&x, dim, EPS as f64, tpf, &sh, &sc, &mut want);
        assert_close("head modulation", &to_f32(&out), &want, 1e-2);
    }
}

#[test]
fn layer_norm_affine() {
    let mut rng = Rng::new(2);
    for &(dim, rows) in &[(48usize, 13usize), (776, 3)] {
        let x = randn(&mut rng, rows * dim, 3.0);
        let w = randn(&mut rng, dim, 1.0);
        let b = randn(&mut rng, dim, 1.0);
        let mut out = vec![bf16::NAN; rows * dim];
        emu::layer_norm_affine(&x, dim, EPS, &w, &b, &mut out).unwrap();
        let mut want = vec![0f32; rows * dim];
        ops::layer_norm_affine(&x, dim, EPS as f64, &w, &b, &mut want);
        assert_close("layer_norm_affine", &to_f32(&out), &want, 1e-2);
    }
}

#[test]
fn gated_residual_with_and_without_gate() {
    let mut rng = Rng::new(3);
    let (dim, tpf, frames) = (72, 9, 3);
    let rows = tpf * frames;
    let x0 = randn(&mut rng, rows * dim, 1.0);
    let (delta_f, delta) = randn_bf16(&mut rng, rows * dim, 1.0);
    let e0 = randn(&mut rng, frames * 6 * dim, 0.5);
    let m = randn(&mut rng, 6 * dim, 0.5);

    let mut x = x0.clone();
    emu::gated_residual(
        &mut x,
        &delta,
        dim,
        tpf,
        Some((&e0[2 * dim..], 6 * dim)),
        Some(&m[2 * dim..3 * dim]),
    )
    .unwrap();
    let gate: Vec<f32> = (0..frames * dim)
        .map(|i| e0[(i / dim * 6 + 2) * dim + i % dim] + m[2 * dim + i % dim])
        .collect();
    let mut want = x0.clone();
    ops::gated_residual(&mut want, &delta_f, dim, tpf, Some(&gate));
    assert_close("gated_residual", &x, &want, 1e-5);

    let mut x = x0.clone();
    emu::gated_residual(&mut x, &delta, dim, tpf, None, None).unwrap();
    let mut want = x0;
    ops::gated_residual(&mut want, &delta_f, dim, tpf, None);
    assert_close("residual", &x, &want, 1e-6);
}

/// Bit patterns, so that `assert_eq!` compares NaN-safe and exactly.
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn residual_norm_is_the_unfused_pair_bit_for_bit() {
    let mut rng = Rng::new(31);
    // Rows shorter than one pass of the block, several passes with a ragged end, and the
    // largest row (every register pair in use).
    for &(dim, tpf, frames) in &[(72usize, 9usize, 3usize), (1064, 5, 2), (6144, 2, 2)] {
        let rows = tpf * frames;
        let x0 = randn(&mut rng, rows * dim, 2.0);
        let (delta_f, delta) = randn_bf16(&mut rng, rows * dim, 1.0);
        let e0 = randn(&mut rng, frames * 6 * dim, 0.5);
        let m = randn(&mut rng, 6 * dim, 0.5);
        let (w, b) = (randn(&mut rng, dim, 1.0), randn(&mut rng, dim, 1.0));
        let gates: [Option<(&[f32], usize)>; 2] = [Some((&e0[5 * dim..], 6 * dim)), None];
        for gate in gates {
            let gate_bias = gate.map(|_| &m[5 * dim..6 * dim]);
            let norms = [
                // The next layer's modulated LN (shift/scale out of e0, biases).
                emu::NormMod {
                    shift: &e0[..],
                    scale: &e0[dim..],
                    stride: 6 * dim,
                    shift_bias: Some(&m[..dim]),
                    scale_bias: Some(&m[dim..2 * dim]),
                    affine: false,
                },
                // norm3: affine, one weight and bias for every row.
                emu::NormMod {
                    shift: &b,
                    scale: &w,
                    stride: 0,
                    shift_bias: None,
                    scale_bias: None,
                    affine: true,
                },
            ];
            for nm in &norms {
                let what = format!("dim {dim}, gate {}, affine {}", gate.is_some(), nm.affine);
                let mut xf = x0.clone();
                let mut outf = vec![bf16::NAN; rows * dim];
                emu::residual_norm(
                    &mut xf, &delta, dim, EPS, tpf, gate, gate_bias, nm, &mut outf,
                )
                .unwrap();
                // The unfused pair.
                let mut xu = x0.clone();
                let mut outu = vec![bf16::NAN; rows * dim];
                emu::gated_residual(&mut xu, &delta, dim, tpf, gate, gate_bias).unwrap();
                if nm.affine {
                    emu::layer_norm_affine(&xu, dim, EPS, nm.scale, nm.shift, &mut outu).unwrap();
                } else {
                    emu::ln_modulate(
                        &xu,
                        dim,
                        EPS,
                        tpf,
                        nm.shift,
                        nm.scale,
                        nm.stride,
                        nm.shift_bias,
                        nm.scale_bias,
                        &mut outu,
                    )
                    .unwrap();
                }
                assert_eq!(bits(&xf), bits(&xu), "{what}: residual");
                let (of, ou) = (to_f32(&outf), to_f32(&outu));
                assert_eq!(bits(&of), bits(&ou), "{what}: normed rows");
                // And the CPU reference.
                let per_frame = |c: usize, bias: Option<&[f32]>| -> Vec<f32> {
                    (0..frames * dim)
                        .map(|i| {
                            let (f, d) = (i / dim, i % dim);
                            e0[(f * 6 + c) * dim + d] + bias.map_or(0.0, |b| b[d])
                        })
                        .collect()
                };
                let mut want_x = x0.clone();
                let g = gate.map(|_| per_frame(5, gate_bias));
                ops::gated_residual(&mut want_x, &delta_f, dim, tpf, g.as_deref());
                assert_close(&format!("{what}: residual"), &xf, &want_x, 1e-5);
                let mut want = vec![0f32; rows * dim];
                if nm.affine {
                    ops::layer_norm_affine(&want_x, dim, EPS as f64, &w, &b, &mut want);
                } else {
                    let (sh, sc) = (per_frame(0, nm.shift_bias), per_frame(1, nm.scale_bias));
                    ops::ln_modulate(&want_x, dim, EPS as f64, tpf, &sh, &sc, &mut want);
                }
                assert_close(&format!("{what}: normed rows"), &of, &want, 1e-2);
            }
        }
    }
    // Rows longer than the kernel keeps in registers are refused (the backend runs the pair).
    let dim = 6146;
    let mut x = vec![1f32; dim];
    let mut out = vec![bf16::NAN; dim];
    let one = vec![1f32; dim];
    let nm = emu::NormMod {
        shift: &one,
        scale: &one,
        stride: 0,
        shift_bias: None,
        scale_bias: None,
        affine: true,
    };
    let err = emu::residual_norm(
        &mut x,
        &vec![bf16::ONE; dim],
        dim,
        EPS,
        1,
        None,
        None,
        &nm,
        &mut out,
    )
    .unwrap_err();
    assert_eq!(err.kind, LaunchErrorKind::InvalidArgument, "{err}");
}

#[test]
fn qk_norm_rope_contiguous_q() {
    let mut rng = Rng::new(4);
    for &(heads, hd) in &[(2usize, 32usize), (3, 64), (2, 128), (1, 24)] {
        let (hp, wp, frames, first) = (3usize, 4usize, 3usize, 5usize);
        let dim = heads * hd;
        let rows = frames * hp * wp;
        let (xf, x) = randn_bf16(&mut rng, rows * dim, 2.0);
        let w = randn(&mut rng, dim, 1.0);
        let mut out = vec![bf16::NAN; rows * dim];
        let args = QkNormRope {
            heads,
            head_dim: hd,
            tokens_per_frame: hp * wp,
            wp,
            first_frame: first as i32,
            frame_pos: None,
            frame_slot: None,
            norm_weight: Some(&w),
            eps: EPS,
            rope: true,
        };
        emu::qk_norm_rope(&x, &args, &mut out).unwrap();
        let mut want = xf.clone();
        ops::rms_norm(&mut want, dim, EPS as f64, &w);
        ops::rope_3d(&mut want, heads, hd, first, hp, wp);
        assert_close(&format!("q norm+rope hd{hd}"), &to_f32(&out), &want, 1e-2);
    }
}

#[test]
fn qk_norm_rope_into_wrapped_cache_slots() {
    let mut rng = Rng::new(5);
    let (heads, hd, hp, wp, frames) = (2usize, 32usize, 2usize, 3usize, 3usize);
    let (dim, tpf) = (heads * hd, hp * wp);
    let rows = frames * tpf;
    let slots = 4;
    // Window frames 1_000_003..1_000_005 (a long stream: absolute positions, no table) land in
    // ring slots 3, 0, 1 (wrapped); slot 2 must stay untouched.
    let first = 1_000_003usize;
    let pos: Vec<i32> = (0..frames as i32).map(|f| first as i32 + f).collect();
    let slot: Vec<i32> = vec![3, 0, 1];
    let (kf, k) = randn_bf16(&mut rng, rows * dim, 1.5);
    let (vf, v) = randn_bf16(&mut rng, rows * dim, 1.5);
    let w = randn(&mut rng, dim, 1.0);
    let mut kc = vec![bf16::NAN; slots * tpf * dim];
    let mut vc = vec![bf16::NAN; slots * tpf * dim];
    let base = QkNormRope {
        heads,
        head_dim: hd,
        tokens_per_frame: tpf,
        wp,
        first_frame: 0,
        frame_pos: Some(&pos),
        frame_slot: Some(&slot),
        norm_weight: Some(&w),
        eps: EPS,
        rope: true,
    };
    emu::qk_norm_rope(&k, &base, &mut kc).unwrap();
    let vargs = QkNormRope {
        norm_weight: None,
        rope: false,
        ..base
    };
    emu::qk_norm_rope(&v, &vargs, &mut vc).unwrap();

    let mut want = kf.clone();
    ops::rms_norm(&mut want, dim, EPS as f64, &w);
    ops::rope_3d(&mut want, heads, hd, first, hp, wp);
    let fr = tpf * dim;
    for f in 0..frames {
        let s = slot[f] as usize;
        assert_close(
            "k cache slot",
            &to_f32(&kc[s * fr..(s + 1) * fr]),
            &want[f * fr..(f + 1) * fr],
            1e-2,
        );
        assert_eq!(
            to_f32(&vc[s * fr..(s + 1) * fr]),
            vf[f * fr..(f + 1) * fr],
            "v cache slot"
        );
    }
    assert!(
        kc[2 * fr..3 * fr].iter().all(|v| v.is_nan()),
        "slot 2 was written"
    );
    assert!(
        vc[2 * fr..3 * fr].iter().all(|v| v.is_nan()),
        "slot 2 was written"
    );
}

/// A cache of `slots` ring slots of `tpf` tokens, a window of members, and groups with
/// sink + local-window visibility (ring wrap), compared group by group with the CPU reference.
/// Both tiles, each against the CPU; and their outputs are bit-identical (same key tiles, same
/// per-warp work: the tile the backend picks by timing never changes the numbers).
/// The Hopper wgmma tiles ([`AttentionTile::WGMMA`], wgmma under the emulation) are checked
/// against the CPU too, not for the same bits as those (their S sums in another order); the
/// ping-pong variants must give the bits of the same tile size without it (same products in
/// the same order, only scheduled differently).
fn check_attention(seed: u64, heads: usize, hd: usize) {
    let outs: Vec<Vec<bf16>> = AttentionTile::ALL
        .into_iter()
        .map(|tile| check_attention_tile(seed, heads, hd, tile))
        .collect();
    let wg: Vec<Vec<bf16>> = AttentionTile::WGMMA
        .into_iter()
        .map(|tile| check_attention_tile(seed, heads, hd, tile))
        .collect();
    for (a, b) in [(0, 2), (1, 3), (1, 4)] {
        assert!(
            same_bits(&wg[a], &wg[b]),
            "hd{hd}: {:?} and {:?} give different outputs",
            AttentionTile::WGMMA[a],
            AttentionTile::WGMMA[b]
        );
    }
    assert!(
        outs[0]
            .iter()
            .zip(&outs[1])
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "hd{hd}: the attention tiles give different outputs"
    );
}

fn same_bits(a: &[bf16], b: &[bf16]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// The tile whose output bits `tile` must reproduce: a ping-pong variant's non-ping-pong twin.
fn bit_twin(tile: AttentionTile) -> AttentionTile {
    match tile {
        AttentionTile::WgmmaPp => AttentionTile::Wgmma64,
        AttentionTile::WgmmaPpK128 => AttentionTile::WgmmaK128,
        // the warp-specialized kernel: pp_k128's math, so _k128's bits too
        AttentionTile::WgmmaWs | AttentionTile::WgmmaWsDeep => AttentionTile::WgmmaK128,
        t => t,
    }
}

fn check_attention_tile(seed: u64, heads: usize, hd: usize, tile: AttentionTile) -> Vec<bf16> {
    let mut rng = Rng::new(seed);
    let dim = heads * hd;
    let tpf = 10;
    let slots = 5;
    let (ckf, ck) = randn_bf16(&mut rng, slots * tpf * dim, 1.0);
    let (cvf, cv) = randn_bf16(&mut rng, slots * tpf * dim, 1.0);
    // Window: member 0 has 2 frames (20 rows), member 1 has 3 frames (30), member 2 has 45 rows
    // (a partial query tile): nq = 95, not a multiple of the tile.
    let member_rows = [20usize, 30, 45];
    let nq: usize = member_rows.iter().sum();
    let (qf, q) = randn_bf16(&mut rng, nq * dim, 1.5);
    let (wkf, wk) = randn_bf16(&mut rng, nq * dim, 1.0);
    let (wvf, wv) = randn_bf16(&mut rng, nq * dim, 1.0);
    let fr = tpf * dim;
    let starts = [0usize, 20, 50, 95];
    let mut segs: Vec<KvSegment> = (0..slots)
        .map(|s| KvSegment {
            k: &ck[s * fr..(s + 1) * fr],
            v: &cv[s * fr..(s + 1) * fr],
        })
        .collect();
    for m in 0..3 {
        segs.push(KvSegment {
            k: &wk[starts[m] * dim..starts[m + 1] * dim],
            v: &wv[starts[m] * dim..starts[m + 1] * dim],
        });
    }
    // Segment ids: 0..5 cache slots, 5..8 members. Slot 0 is the sink; the local window has
    // wrapped around the ring (slots 4, then 1, 2 hold the newest frames).
    let lists: Vec<Vec<usize>> = vec![
        vec![0, 4, 1, 5],       // member 0: sink + local window + itself
        vec![0, 1, 2, 5, 6, 7], // member 1: sink, window, member 0, itself, later member (bidirectional)
        vec![2, 6, 7],          // member 2: one cache slot, member 1, itself
    ];
    let groups: Vec<QueryGroup> = (0..3)
        .map(|m| QueryGroup {
            rows: starts[m]..starts[m + 1],
            segments: lists[m].clone(),
        })
        .collect();
    let mut out = vec![bf16::NAN; nq * dim];
    emu::attention(&q, heads, hd, &segs, &groups, &mut out, tile).unwrap();

    let seg_f32 = |i: usize| -> (&[f32], &[f32]) {
        if i < slots {
            (&ckf[i * fr..(i + 1) * fr], &cvf[i * fr..(i + 1) * fr])
        } else {
            let m = i - slots;
            (
                &wkf[starts[m] * dim..starts[m + 1] * dim],
                &wvf[starts[m] * dim..starts[m + 1] * dim],
            )
        }
    };
    for m in 0..3 {
        let cs: Vec<CpuSeg> = lists[m]
            .iter()
            .map(|&i| {
                let (k, v) = seg_f32(i);
                CpuSeg { k, v }
            })
            .collect();
        let qm = &qf[starts[m] * dim..starts[m + 1] * dim];
        let mut want = vec![0f32; qm.len()];
        cpu_attention(qm, heads, hd, &cs, &mut want);
        assert_attention_close(
            &format!("attention hd{hd} {tile:?} member {m}"),
            &to_f32(&out[starts[m] * dim..starts[m + 1] * dim]),
            &want,
        );
    }
    out
}

#[test]
fn attention_head_dim_32() {
    check_attention(6, 2, 32);
}

#[test]
fn attention_head_dim_64() {
    check_attention(7, 2, 64);
}

#[test]
fn attention_head_dim_128() {
    check_attention(8, 2, 128);
}

#[test]
fn attention_head_dim_40_and_empty_group() {
    // head_dim 40: a multiple of 8 that is not a multiple of 32; plus a group without keys.
    check_attention(9, 1, 40);
    let (heads, hd) = (1, 40);
    let mut rng = Rng::new(10);
    let (_, q) = randn_bf16(&mut rng, 5 * hd, 1.0);
    let (_, k) = randn_bf16(&mut rng, 3 * hd, 1.0);
    let segs = [KvSegment { k: &k, v: &k }];
    let groups = [QueryGroup {
        rows: 0..5,
        segments: vec![],
    }];
    for tile in TEST_TILES {
        let mut out = vec![bf16::NAN; 5 * hd];
        emu::attention(&q, heads, hd, &segs, &groups, &mut out, tile).unwrap();
        assert!(
            out.iter().all(|v| v.to_f32() == 0.0),
            "{tile:?}: a group without keys gets zeros"
        );
    }
}

#[test]
fn cross_attention_512_text_tokens() {
    let mut rng = Rng::new(11);
    // hd32, and Wan's hd128 (the wgmma tile's two 64-column blocks over 8 full key tiles)
    for (heads, hd) in [(2usize, 32usize), (1, 128)] {
        cross_attention_case(&mut rng, heads, hd);
    }
}

/// One cross-attention case: 37 query rows over 512 keys, every tile against the CPU.
fn cross_attention_case(rng: &mut Rng, heads: usize, hd: usize) {
    let (nq, text) = (37usize, 512usize);
    let dim = heads * hd;
    let (qf, q) = randn_bf16(rng, nq * dim, 1.5);
    let (kf, k) = randn_bf16(rng, text * dim, 1.0);
    let (vf, v) = randn_bf16(rng, text * dim, 1.0);
    let groups = [QueryGroup {
        rows: 0..nq,
        segments: vec![0],
    }];
    let mut want = vec![0f32; nq * dim];
    cpu_attention(&qf, heads, hd, &[CpuSeg { k: &kf, v: &vf }], &mut want);
    let mut pp_k128: Option<Vec<bf16>> = None;
    for tile in TEST_TILES {
        let mut out = vec![bf16::NAN; nq * dim];
        emu::attention(
            &q,
            heads,
            hd,
            &[KvSegment { k: &k, v: &v }],
            &groups,
            &mut out,
            tile,
        )
        .unwrap();
        assert_attention_close(
            &format!("cross attention hd{hd} {tile:?}"),
            &to_f32(&out),
            &want,
        );
        // (the warp-specialized kernel: pp_k128's bits, which TEST_TILES runs before it)
        match tile {
            AttentionTile::WgmmaPpK128 => pp_k128 = Some(out),
            AttentionTile::WgmmaWs | AttentionTile::WgmmaWsDeep => assert!(
                pp_k128.as_ref().is_some_and(|b| same_bits(b, &out)),
                "cross attention hd{hd}: {tile:?} differs from WgmmaPpK128"
            ),
            _ => {}
        }
    }
}

/// The attention tiles the tests run: both of [`AttentionTile::ALL`] and the Hopper wgmma
/// prototype (its S = Q K^T runs on the emulated wgmma; head_dim <= 64 and <= 128 kernels).
const TEST_TILES: [AttentionTile; 8] = [
    AttentionTile::Rows64,
    AttentionTile::Rows128,
    AttentionTile::Wgmma64,
    AttentionTile::WgmmaK128,
    AttentionTile::WgmmaPp,
    AttentionTile::WgmmaPpK128,
    AttentionTile::WgmmaWs,
    AttentionTile::WgmmaWsDeep,
];

/// Every case with every attention tile of [`TEST_TILES`].
fn with_tiles<T: Copy>(cases: &[T]) -> Vec<(AttentionTile, T)> {
    TEST_TILES
        .into_iter()
        .flat_map(|t| cases.iter().map(move |&c| (t, c)))
        .collect()
}

/// Consecutive K/V segments of `seg_len[i]` rows of `dim` values, the keys of segment i scaled
/// by `grow[i]` (growing logits), the values by 1; the store and each segment's row range.
fn growing_segments(
    rng: &mut Rng,
    dim: usize,
    seg_len: &[usize],
    grow: &[f32],
) -> (KvStore, Vec<std::ops::Range<usize>>) {
    let (mut segs, mut kf, mut kb, mut vf, mut vb) = (vec![], vec![], vec![], vec![], vec![]);
    let mut at = 0;
    for (&n, &gscale) in seg_len.iter().zip(grow) {
        let (f, b) = randn_bf16(rng, n * dim, gscale);
        kf.extend(f);
        kb.extend(b);
        let (f, b) = randn_bf16(rng, n * dim, 1.0);
        vf.extend(f);
        vb.extend(b);
        segs.push(at..at + n);
        at += n;
    }
    let kv = KvStore {
        k: (kf, kb),
        v: (vf, vb),
        stride: dim,
    };
    (kv, segs)
}

/// K/V storage for the raw attention tests: `rows` rows of `stride` bf16 values (random,
/// including the padding columns past `heads*head_dim`).
struct KvStore {
    k: (Vec<f32>, Vec<bf16>),
    v: (Vec<f32>, Vec<bf16>),
    stride: usize,
}

/// `bc_attention_*` through the raw launcher: explicit `scale` and strides. Segments are row
/// ranges of `kv`; groups are (query rows, segment list). `out` rows have `out_stride` values.
#[allow(clippy::too_many_arguments)]
fn attention_raw(
    tile: AttentionTile,
    q: &[bf16],
    q_stride: usize,
    heads: usize,
    hd: usize,
    kv: &KvStore,
    segs: &[std::ops::Range<usize>],
    groups: &[(std::ops::Range<usize>, Vec<usize>)],
    scale: f32,
    out: &mut [bf16],
    out_stride: usize,
) {
    attention_raw_split(
        tile, q, q_stride, heads, hd, kv, segs, groups, scale, out, out_stride, 1,
    );
}

/// [`attention_raw`] with `splits` key splits: the partial results go to a NaN-poisoned
/// buffer, then `bc_attention_combine` writes `out`; that buffer's bits are returned. The
/// warp-specialized tile is run twice, the second time as `WgmmaPpK128`: the same partial
/// bits (slots, poison where nothing is written) and the same output bits, or a panic.
#[allow(clippy::too_many_arguments)]
fn attention_raw_split(
    tile: AttentionTile,
    q: &[bf16],
    q_stride: usize,
    heads: usize,
    hd: usize,
    kv: &KvStore,
    segs: &[std::ops::Range<usize>],
    groups: &[(std::ops::Range<usize>, Vec<usize>)],
    scale: f32,
    out: &mut [bf16],
    out_stride: usize,
    splits: usize,
) -> Vec<u32> {
    use blockcascade::kernels::params::{
        BcAttentionParams, BcAttnCombineParams, BcAttnGroup, BcKvSegment, BC_ATTN_COMBINE_THREADS,
    };
    let table: Vec<BcKvSegment> = segs
        .iter()
        .map(|r| BcKvSegment {
            k: kv.k.1[r.start * kv.stride..].as_ptr() as *const _,
            v: kv.v.1[r.start * kv.stride..].as_ptr() as *const _,
            tokens: r.len() as i32,
            _pad: 0,
        })
        .collect();
    let mut index = Vec::new();
    let mut gs = Vec::new();
    for (rows, list) in groups {
        assert!(rows.end * q_stride <= q.len() && rows.end * out_stride <= out.len());
        assert!(list
            .iter()
            .all(|&i| segs[i].end * kv.stride <= kv.k.1.len()));
        gs.push(BcAttnGroup {
            q_begin: rows.start as i32,
            q_rows: rows.len() as i32,
            seg_begin: index.len() as i32,
            seg_count: list.len() as i32,
        });
        index.extend(list.iter().map(|&i| i as i32));
    }
    let max_rows = groups.iter().map(|g| g.0.len()).max().unwrap();
    // NaN-poisoned partial results ([f32; 4]: 16-byte aligned), as the launcher sizes them.
    let floats = blockcascade::kernels::launch::attention_split_bytes(
        heads,
        hd,
        gs.len(),
        max_rows,
        tile,
        splits,
    )
    .unwrap()
        / 4;
    #[repr(C, align(16))]
    #[derive(Clone, Copy)]
    struct F4([f32; 4]);
    let mut partial = vec![F4([f32::NAN; 4]); floats.div_ceil(4).max(1)];
    let p = BcAttentionParams {
        q: q.as_ptr() as *const _,
        out: out.as_mut_ptr() as *mut _,
        segments: table.as_ptr(),
        seg_index: index.as_ptr(),
        groups: gs.as_ptr(),
        num_groups: gs.len() as i32,
        heads: heads as i32,
        head_dim: hd as i32,
        q_stride: q_stride as i32,
        kv_stride: kv.stride as i32,
        out_stride: out_stride as i32,
        scale,
        splits: splits as i32,
        partial: partial.as_mut_ptr() as *mut f32,
    };
    // The warp-specialized kernel must give pp_k128's bits on every input, split or not (the
    // same partials, so the same combine): run that on a copy.
    let twin = matches!(tile, AttentionTile::WgmmaWs | AttentionTile::WgmmaWsDeep).then(|| {
        let mut o = out.to_vec();
        let part = attention_raw_split(
            AttentionTile::WgmmaPpK128,
            q,
            q_stride,
            heads,
            hd,
            kv,
            segs,
            groups,
            scale,
            &mut o,
            out_stride,
            splits,
        );
        (o, part)
    });
    let p = BcAttentionParams {
        out: out.as_mut_ptr() as *mut _,
        ..p
    };
    let kernel = tile.kernel(hd);
    let tiles = max_rows.div_ceil(tile.rows(hd) as usize) as u32;
    let grid = [tiles * splits as u32, heads as u32, gs.len() as u32];
    // SAFETY: every pointer covers the rows the groups and segments name (asserted above), the
    // partial buffer the split grid's blocks.
    unsafe {
        emu::launch_raw(
            kernel,
            &emu::dims(kernel, grid, [tile.threads(hd), 1, 1]),
            &p as *const BcAttentionParams as *const std::ffi::c_void,
        )
    }
    .unwrap();
    if splits > 1 {
        let c = BcAttnCombineParams {
            partial: partial.as_ptr() as *const f32,
            out: out.as_mut_ptr() as *mut _,
            groups: gs.as_ptr(),
            heads: heads as i32,
            head_dim: hd as i32,
            out_stride: out_stride as i32,
            splits: splits as i32,
            rows: tile.rows(hd) as i32,
            _pad: 0,
        };
        let k = blockcascade::kernels::Kernel::AttentionCombine;
        // SAFETY: as above; the combine reads the partials the attention wrote.
        unsafe {
            emu::launch_raw(
                k,
                &emu::dims(
                    k,
                    [tiles, heads as u32, gs.len() as u32],
                    [BC_ATTN_COMBINE_THREADS, 1, 1],
                ),
                &c as *const BcAttnCombineParams as *const std::ffi::c_void,
            )
        }
        .unwrap();
    }
    let bits: Vec<u32> = partial.iter().flat_map(|f| f.0.map(f32::to_bits)).collect();
    if let Some((o, part)) = twin {
        assert!(
            bits == part,
            "hd{hd} split {splits}: {tile:?}'s partial results differ from WgmmaPpK128's"
        );
        assert!(
            same_bits(out, &o),
            "hd{hd} split {splits}: {tile:?} differs from WgmmaPpK128"
        );
    }
    bits
}

/// CPU reference of one group with softmax scale `scale` (cpu::attention uses 1/sqrt(hd), so
/// q is multiplied by `scale * sqrt(hd)` in f32 first). Rows `[rows, heads*hd]`, dense.
#[allow(clippy::too_many_arguments)]
fn attention_ref(
    qf: &[f32],
    q_stride: usize,
    heads: usize,
    hd: usize,
    kv: &KvStore,
    segs: &[std::ops::Range<usize>],
    rows: std::ops::Range<usize>,
    list: &[usize],
    scale: f32,
) -> Vec<f32> {
    let dim = heads * hd;
    let dense = |src: &[f32], r: &std::ops::Range<usize>, stride: usize, mul: f32| -> Vec<f32> {
        r.clone()
            .flat_map(|i| {
                src[i * stride..i * stride + dim]
                    .iter()
                    .map(move |v| v * mul)
            })
            .collect()
    };
    let q = dense(qf, &rows, q_stride, scale * (hd as f32).sqrt());
    let ks: Vec<Vec<f32>> = list
        .iter()
        .map(|&i| dense(&kv.k.0, &segs[i], kv.stride, 1.0))
        .collect();
    let vs: Vec<Vec<f32>> = list
        .iter()
        .map(|&i| dense(&kv.v.0, &segs[i], kv.stride, 1.0))
        .collect();
    let cs: Vec<CpuSeg> = ks.iter().zip(&vs).map(|(k, v)| CpuSeg { k, v }).collect();
    let mut want = vec![0f32; rows.len() * dim];
    cpu_attention(&q, heads, hd, &cs, &mut want);
    want
}

/// Output rows of a group as dense f32 `[rows, heads*hd]`, checking that the padding columns of
/// the output rows (between `dim` and `out_stride`) still hold the NaN poison.
fn group_out(
    out: &[bf16],
    rows: std::ops::Range<usize>,
    dim: usize,
    out_stride: usize,
) -> Vec<f32> {
    for r in rows.clone() {
        assert!(
            out[r * out_stride + dim..(r + 1) * out_stride]
                .iter()
                .all(|v| v.is_nan()),
            "row {r}: the kernel wrote past head_dim*heads"
        );
    }
    rows.flat_map(|r| to_f32(&out[r * out_stride..r * out_stride + dim]))
        .collect()
}

/// Segments of odd lengths (1 ... 100 keys, one empty, one of exactly 32: one full hd128 key
/// tile), many per group, in arbitrary orders; groups of 1, 17, 64, 65 and 130 rows (not
/// multiples of the 64-row tile; 17: one row in a warp's second m-tile), a group without
/// segments and one whose only segment is empty (zeros); padded q/kv/out strides; scales other
/// than 1/sqrt(hd), negative ones too; head_dim 32, 40, 64, 128.
#[test]
fn attention_many_odd_segments_strides_and_scale() {
    let seg_len = [1usize, 7, 13, 33, 64, 65, 0, 100, 31, 17, 32];
    let mut segs = Vec::new();
    let mut at = 0;
    for &n in &seg_len {
        segs.push(at..at + n);
        at += n + 3; // gaps between segments
    }
    let kv_rows = at;
    let group_rows = [1usize, 17, 64, 65, 130, 5, 3];
    let lists: Vec<Vec<usize>> = vec![
        (0..11).collect(),
        vec![9, 3, 6, 1],
        vec![7],
        vec![2, 5, 0, 8, 4, 10],
        vec![1, 3, 5, 10, 7, 9, 6],
        vec![],
        vec![6],
    ];
    let mut groups = Vec::new();
    let mut r = 0;
    for (n, list) in group_rows.iter().zip(&lists) {
        groups.push((r..r + n, list.clone()));
        r += n;
    }
    let nq = r;
    // Per case, the first tile's output: every tile must give the same bits (groups of up to
    // 130 rows span several blocks and warps 2-3 of the 128-row tile; segments up to 100 keys
    // span several key tiles).
    let mut first: std::collections::HashMap<u64, Vec<u16>> = Default::default();
    let mut wg_first: std::collections::HashMap<(u64, AttentionTile), Vec<u16>> =
        Default::default();
    for (tile, (seed, heads, hd)) in with_tiles(&[
        (21u64, 2usize, 32usize),
        (22, 1, 40),
        (23, 2, 64),
        (24, 1, 128),
    ]) {
        let mut rng = Rng::new(seed);
        let dim = heads * hd;
        let (q_stride, out_stride) = (dim + 8, dim + 16);
        let kv = KvStore {
            k: randn_bf16(&mut rng, kv_rows * (dim + 24), 1.0),
            v: randn_bf16(&mut rng, kv_rows * (dim + 24), 1.0),
            stride: dim + 24,
        };
        let (qf, q) = randn_bf16(&mut rng, nq * q_stride, 1.5);
        // A negative scale for hd40 and hd128 (the kernel folds its sign into Q).
        let scale = if seed % 2 == 0 { -0.37 } else { 0.37 };
        let mut out = vec![bf16::NAN; nq * out_stride];
        attention_raw(
            tile, &q, q_stride, heads, hd, &kv, &segs, &groups, scale, &mut out, out_stride,
        );
        let bits: Vec<u16> = out.iter().map(|v| v.to_bits()).collect();
        // (the wgmma tiles: against the CPU, and ping-pong against its twin)
        if AttentionTile::ALL.contains(&tile) {
            match first.get(&seed) {
                Some(b) => assert!(*b == bits, "hd{hd}: {tile:?} differs from the first tile"),
                None => {
                    first.insert(seed, bits);
                }
            }
        } else {
            match wg_first.get(&(seed, bit_twin(tile))) {
                Some(b) => assert!(*b == bits, "hd{hd}: {tile:?} differs from its twin"),
                None => {
                    wg_first.insert((seed, tile), bits);
                }
            }
        }
        for (gi, (rows, list)) in groups.iter().enumerate() {
            let got = group_out(&out, rows.clone(), dim, out_stride);
            let keys: usize = list.iter().map(|&i| segs[i].len()).sum();
            if keys == 0 {
                assert!(
                    got.iter().all(|&v| v == 0.0),
                    "hd{hd} group {gi}: no keys gives zeros"
                );
                continue;
            }
            let want = attention_ref(
                &qf,
                q_stride,
                heads,
                hd,
                &kv,
                &segs,
                rows.clone(),
                list,
                scale,
            );
            assert_attention_close(
                &format!("odd segments hd{hd} {tile:?} group {gi}"),
                &got,
                &want,
            );
        }
    }
}

/// Scale 0: every visible key gets the same weight 1, exactly representable in bf16, so the
/// output is the plain mean of the visible values to bf16 output rounding (tight tolerance). A
/// key past a segment end that leaked into the softmax would pull the mean toward 0.
#[test]
fn attention_scale_zero_is_the_mean_of_visible_values() {
    let segs = [0usize..3, 3..32, 32..102, 102..103];
    let groups = [(0usize..70, vec![0usize, 1, 2, 3]), (70..79, vec![3, 1])];
    for (tile, (seed, heads, hd)) in with_tiles(&[(31u64, 2usize, 40usize), (32, 1, 128)]) {
        let mut rng = Rng::new(seed);
        let dim = heads * hd;
        let kv = KvStore {
            k: randn_bf16(&mut rng, 103 * dim, 1.0),
            v: randn_bf16(&mut rng, 103 * dim, 1.0),
            stride: dim,
        };
        let (_, q) = randn_bf16(&mut rng, 79 * dim, 1.0);
        let mut out = vec![bf16::NAN; 79 * dim];
        attention_raw(
            tile, &q, dim, heads, hd, &kv, &segs, &groups, 0.0, &mut out, dim,
        );
        for (gi, (rows, list)) in groups.iter().enumerate() {
            let keys: Vec<usize> = list.iter().flat_map(|&i| segs[i].clone()).collect();
            let mean: Vec<f32> = (0..dim)
                .map(|c| keys.iter().map(|&k| kv.v.0[k * dim + c]).sum::<f32>() / keys.len() as f32)
                .collect();
            let want: Vec<f32> = rows.clone().flat_map(|_| mean.iter().copied()).collect();
            let got = group_out(&out, rows.clone(), dim, dim);
            assert_close(
                &format!("scale 0 hd{hd} {tile:?} group {gi}"),
                &got,
                &want,
                1e-2,
            );
        }
    }
}

/// Large logits (|q.k| * scale up to ~100s) with key magnitudes growing from segment to
/// segment, so the running row max keeps moving and the online-softmax rescaling of O and
/// the row sum matters; one group sees the segments in the reverse order; hd128 with a
/// negative scale.
#[test]
fn attention_large_logits_online_rescaling() {
    let seg_len = [40usize, 70, 9, 50];
    let grow = [0.5f32, 1.0, 3.0, 6.0];
    for (tile, (seed, heads, hd)) in
        with_tiles(&[(41u64, 1usize, 64usize), (42, 1, 128), (43, 2, 32)])
    {
        let mut rng = Rng::new(seed);
        let dim = heads * hd;
        let (kv, segs) = growing_segments(&mut rng, dim, &seg_len, &grow);
        let groups = [
            (0usize..77, vec![0usize, 1, 2, 3]),
            (77..90, vec![3, 2, 1, 0]),
        ];
        let (qf, q) = randn_bf16(&mut rng, 90 * dim, 6.0);
        // hd128 with a negative scale: the running max must be the max of S * scale (not
        // scale * max S), or 2^(S * scale - m) overflows.
        let sign = if hd == 128 { -1.0 } else { 1.0 };
        let scale = sign / (hd as f32).sqrt();
        let mut out = vec![bf16::NAN; 90 * dim];
        attention_raw(
            tile, &q, dim, heads, hd, &kv, &segs, &groups, scale, &mut out, dim,
        );
        for (gi, (rows, list)) in groups.iter().enumerate() {
            let got = group_out(&out, rows.clone(), dim, dim);
            let want = attention_ref(&qf, dim, heads, hd, &kv, &segs, rows.clone(), list, scale);
            assert_attention_close(
                &format!("large logits hd{hd} {tile:?} group {gi}"),
                &got,
                &want,
            );
        }
    }
}

/// Split-KV (`BcAttentionParams::splits` > 1, then `bc_attention_combine`) on every tile against
/// the CPU, NaN-poisoned output and partial buffer: 2, 3 and 7 splits of groups with 1 to 130
/// rows (ragged, several row tiles), segments of odd lengths (masked last tiles, one empty), a
/// group of a single 5-key tile (more splits than tiles: empty splits), a group without keys
/// (zeros), negative and zero scales, and large logits growing from segment to segment (each
/// split has its own row maxima: the combine must rescale by them).
#[test]
fn attention_split_kv_matches_the_cpu() {
    let seg_len = [5usize, 33, 0, 64, 100, 17, 40];
    let grow = [1.0f32, 0.5, 1.0, 2.0, 4.0, 1.0, 6.0];
    let group_rows = [130usize, 1, 17, 5, 64];
    let lists: Vec<Vec<usize>> = vec![
        vec![0, 1, 2, 3, 4, 5, 6],
        vec![0],
        vec![6, 4, 3, 1],
        vec![],
        vec![5, 2, 4],
    ];
    let mut groups = Vec::new();
    let mut r = 0;
    for (n, list) in group_rows.iter().zip(&lists) {
        groups.push((r..r + n, list.clone()));
        r += n;
    }
    let nq = r;
    for (tile, (seed, heads, hd)) in with_tiles(&[(51u64, 2usize, 32usize), (52, 1, 128)]) {
        assert!(tile.supports_split(), "{tile:?}");
        let mut rng = Rng::new(seed);
        let dim = heads * hd;
        let (kv, segs) = growing_segments(&mut rng, dim, &seg_len, &grow);
        let (qf, q) = randn_bf16(&mut rng, nq * dim, 3.0);
        for (splits, scale) in [(2usize, -0.3f32), (3, 0.0), (7, 1.0 / (hd as f32).sqrt())] {
            let mut out = vec![bf16::NAN; nq * dim];
            attention_raw_split(
                tile, &q, dim, heads, hd, &kv, &segs, &groups, scale, &mut out, dim, splits,
            );
            for (gi, (rows, list)) in groups.iter().enumerate() {
                let got = group_out(&out, rows.clone(), dim, dim);
                let what = format!("split {splits} hd{hd} {tile:?} scale {scale} group {gi}");
                if list.iter().all(|&i| segs[i].is_empty()) {
                    assert!(got.iter().all(|&v| v == 0.0), "{what}: no keys gives zeros");
                    continue;
                }
                let want =
                    attention_ref(&qf, dim, heads, hd, &kv, &segs, rows.clone(), list, scale);
                assert_attention_close(&what, &got, &want);
            }
        }
    }
}

/// The split-KV entry point of the emulated launcher ([`emu::attention_split`], what the device
/// launcher does: kernel, then combine) against the unsplit kernel on the sink + local-window
/// lists of [`check_attention`]'s layout: close (another summation order), finite, and with one
/// split the same bits; head_dim 64 (the hd64 kernels) and 128, where the warp-specialized
/// kernel's splits (5: more than a group's 3 key tiles, empty splits) give pp_k128's bits.
#[test]
fn attention_split_entry_point_matches_the_unsplit_kernel() {
    for (hd, tiles) in [
        (
            64usize,
            vec![AttentionTile::Rows128, AttentionTile::WgmmaPpK128],
        ),
        (
            128,
            vec![
                AttentionTile::WgmmaPpK128,
                AttentionTile::WgmmaWs,
                AttentionTile::WgmmaWsDeep,
            ],
        ),
    ] {
        let heads = 2usize;
        let dim = heads * hd;
        let mut rng = Rng::new(61);
        let (_, q) = randn_bf16(&mut rng, 95 * dim, 1.5);
        let (_, k) = randn_bf16(&mut rng, 200 * dim, 1.0);
        let (_, v) = randn_bf16(&mut rng, 200 * dim, 1.0);
        let segs: Vec<KvSegment> = [(0usize, 70usize), (70, 3), (73, 127)]
            .iter()
            .map(|&(a, n)| KvSegment {
                k: &k[a * dim..(a + n) * dim],
                v: &v[a * dim..(a + n) * dim],
            })
            .collect();
        let groups = [
            QueryGroup {
                rows: 0..40,
                segments: vec![0, 1, 2],
            },
            QueryGroup {
                rows: 40..95,
                segments: vec![1],
            },
        ];
        let mut prev: Option<Vec<Vec<bf16>>> = None; // (pp_k128's outputs, hd128)
        for tile in tiles {
            let mut base = vec![bf16::NAN; 95 * dim];
            emu::attention(&q, heads, hd, &segs, &groups, &mut base, tile).unwrap();
            let mut one = vec![bf16::NAN; 95 * dim];
            emu::attention_split(&q, heads, hd, &segs, &groups, &mut one, tile, 1).unwrap();
            assert!(
                same_bits(&base, &one),
                "hd{hd} {tile:?}: one split changed the bits"
            );
            let mut outs = vec![base.clone()];
            for splits in [2usize, 5] {
                let mut got = vec![bf16::NAN; 95 * dim];
                emu::attention_split(&q, heads, hd, &segs, &groups, &mut got, tile, splits)
                    .unwrap();
                assert_attention_close(
                    &format!("hd{hd} {tile:?} split {splits} vs unsplit"),
                    &to_f32(&got),
                    &to_f32(&base),
                );
                outs.push(got);
            }
            if matches!(tile, AttentionTile::WgmmaWs | AttentionTile::WgmmaWsDeep) {
                let want = prev.as_ref().expect("pp_k128 runs first");
                assert!(
                    outs.iter().zip(want).all(|(a, b)| same_bits(a, b)),
                    "hd{hd}: {tile:?} (unsplit, 2 or 5 splits) differs from WgmmaPpK128"
                );
            }
            if tile == AttentionTile::WgmmaPpK128 {
                prev = Some(outs);
            }
        }
    }
}

#[test]
fn activations_f32_and_bf16() {
    let mut rng = Rng::new(12);
    for act in [Act::GeluTanh, Act::Silu] {
        let x = randn(&mut rng, 1001, 3.0);
        let mut got = x.clone();
        emu::activation_f32(&mut got, act).unwrap();
        let mut want = x.clone();
        match act {
            Act::GeluTanh => ops::gelu_tanh(&mut want),
            Act::Silu => ops::silu(&mut want),
            Act::None => {}
        }
        assert_close(&format!("{act:?} f32"), &got, &want, 1e-5);

        let (xf, mut xb) = randn_bf16(&mut rng, 777, 3.0);
        emu::activation_bf16(&mut xb, act).unwrap();
        let mut want = xf;
        match act {
            Act::GeluTanh => ops::gelu_tanh(&mut want),
            Act::Silu => ops::silu(&mut want),
            Act::None => {}
        }
        assert_close(&format!("{act:?} bf16"), &to_f32(&xb), &want, 1e-2);
    }
}

/// The unfused GEMM epilogue: `act(x + bias[col])` over rows of `cols` values, into a
/// NaN-poisoned output, against the CPU's bias add and GELU.
#[test]
fn bias_activation_is_the_unfused_gemm_epilogue() {
    let mut rng = Rng::new(15);
    let (rows, cols) = (37usize, 96usize);
    let bias = randn(&mut rng, cols, 1.0);
    for act in [Act::None, Act::GeluTanh] {
        let reference = |x: &[f32]| {
            let mut want: Vec<f32> = x
                .iter()
                .enumerate()
                .map(|(i, v)| v + bias[i % cols])
                .collect();
            if act == Act::GeluTanh {
                ops::gelu_tanh(&mut want);
            }
            want
        };
        let x = randn(&mut rng, rows * cols, 2.0);
        let mut got = vec![f32::NAN; x.len()];
        emu::bias_activation_f32(&x, &bias, &mut got, act).unwrap();
        assert_close(&format!("bias + {act:?} f32"), &got, &reference(&x), 1e-5);

        let (xf, xb) = randn_bf16(&mut rng, rows * cols, 2.0);
        let mut got = vec![bf16::NAN; xb.len()];
        emu::bias_activation_bf16(&xb, &bias, &mut got, act).unwrap();
        let got = to_f32(&got);
        assert_close(&format!("bias + {act:?} bf16"), &got, &reference(&xf), 1e-2);
    }
    // A bias that does not tile the data is refused, not read out of bounds.
    let x = vec![1f32; 10];
    let mut out = vec![0f32; 10];
    let err = emu::bias_activation_f32(&x, &bias[..3], &mut out, Act::None).unwrap_err();
    assert_eq!(err.kind, LaunchErrorKind::InvalidArgument);
}

/// The f32 -> bf16 conversion (a fused bf16-output GEMM's bias for cuBLASLt): bit for bit
/// the round-to-nearest-even of `half::bf16::from_f32`, on random values and a NaN-poisoned
/// output, with values on rounding ties, subnormals and infinities too.
#[test]
fn f32_to_bf16_rounds_to_nearest_even() {
    let mut rng = Rng::new(16);
    let mut x = randn(&mut rng, 1000, 3.0);
    x.extend([
        f32::from_bits(0x3f80_8000), // a tie: rounds to even (1.0)
        f32::from_bits(0x3f81_8000), // a tie: rounds up to even
        1e-40,
        -1e-40,
        f32::INFINITY,
        f32::NEG_INFINITY,
        3.4e38,
    ]);
    let mut got = vec![bf16::NAN; x.len()];
    emu::f32_to_bf16(&x, &mut got).unwrap();
    for (i, (g, v)) in got.iter().zip(&x).enumerate() {
        assert_eq!(
            g.to_bits(),
            bf16::from_f32(*v).to_bits(),
            "value {i}: {v:e}"
        );
    }
    let err = emu::f32_to_bf16(&x, &mut got[..3]).unwrap_err();
    assert_eq!(err.kind, LaunchErrorKind::InvalidArgument);
}

#[test]
fn time_embedding_matches_sinusoidal() {
    let mut rng = Rng::new(13);
    let freq_dim = 256;
    let mut t: Vec<f32> = vec![1000.0, 937.5, 0.0, 833.3333];
    t.push(rng.normal().abs() * 500.0);
    let mut out = vec![f32::NAN; t.len() * freq_dim];
    emu::time_embedding(&t, freq_dim, &mut out).unwrap();
    let want: Vec<f32> = t
        .iter()
        .flat_map(|&ti| ops::sinusoidal(freq_dim, ti as f64))
        .collect();
    assert_close("time embedding", &out, &want, 1e-5);
}

#[test]
fn patchify_and_unpatchify() {
    let mut rng = Rng::new(14);
    let (frames, ch, h, w) = (2usize, 16usize, 6usize, 10usize);
    let n = frames * ch * h * w;
    let (latf, _) = randn_bf16(&mut rng, n, 1.0);
    let mut rows = vec![bf16::NAN; n];
    emu::patchify(&latf, frames, ch, h, w, &mut rows).unwrap();
    let mut want = vec![0f32; n];
    ops::patchify(&latf, frames, ch, h, w, &mut want);
    assert_eq!(to_f32(&rows), want, "patchify (bf16-exact inputs)");

    let (headf, head) = randn_bf16(&mut rng, n, 1.0);
    let mut lat = vec![f32::NAN; n];
    emu::unpatchify(&head, frames, ch, h, w, &mut lat).unwrap();
    let mut want = vec![0f32; n];
    ops::unpatchify(&headf, frames, ch, h, w, &mut want);
    assert_eq!(lat, want, "unpatchify");
}

#[test]
fn flow_step_per_frame_sigmas() {
    let mut rng = Rng::new(15);
    let (frames, fe) = (3usize, 16 * 4 * 6);
    let x0 = randn(&mut rng, frames * fe, 1.0);
    let v = randn(&mut rng, frames * fe, 1.0);
    let noise = randn(&mut rng, frames * fe, 1.0);
    let sigma = [0.9f32, 0.7, 0.3];
    let next = [0.5f32, -1.0, 0.2]; // frame 1: last step, no renoise
    let mut x = x0.clone();
    let mut x0_out = vec![f32::NAN; frames * fe];
    emu::flow_step(
        &mut x,
        &v,
        fe,
        &sigma,
        Some((&next, &noise)),
        Some(&mut x0_out),
    )
    .unwrap();
    for f in 0..frames {
        let r = f * fe..(f + 1) * fe;
        let mut want = x0[r.clone()].to_vec();
        let nx = (next[f] >= 0.0).then(|| (next[f], &noise[r.clone()]));
        ops::flow_step(&mut want, &v[r.clone()], sigma[f], nx);
        assert_close("flow_step x", &x[r.clone()], &want, 1e-6);
        let mut want0 = x0[r.clone()].to_vec();
        ops::flow_step(&mut want0, &v[r.clone()], sigma[f], None);
        assert_close("flow_step x0", &x0_out[r], &want0, 1e-6);
    }
    // Without renoise at all: x becomes x0.
    let mut x = x0.clone();
    emu::flow_step(&mut x, &v, fe, &sigma, None, None).unwrap();
    let mut want = x0;
    for (f, &sg) in sigma.iter().enumerate() {
        let r = f * fe..(f + 1) * fe;
        ops::flow_step(&mut want[r.clone()], &v[r], sg, None);
    }
    assert_close("flow_step no renoise", &x, &want, 1e-6);
}

#[test]
fn copy_regions_aligned_and_unaligned() {
    let mut rng = Rng::new(16);
    let src: Vec<u8> = (0..20000).map(|_| (rng.next_u64() & 0xff) as u8).collect();
    let mut a = vec![0xAAu8; 8192];
    let mut b = vec![0xAAu8; 5000];
    let mut c = [0xAAu8; 17];
    {
        let (a0, b0, c0) = (&mut a[..], &mut b[3..4999], &mut c[..]);
        let la = a0.len();
        let lb = b0.len();
        let mut regions: [(&[u8], &mut [u8]); 3] = [
            (&src[..la], a0),            // 16-byte aligned, 16-multiple
            (&src[1000..1000 + lb], b0), // unaligned, odd length
            (&src[19983..], c0),         // short tail
        ];
        emu::copy(&mut regions, 2).unwrap();
    }
    assert_eq!(&a[..], &src[..8192]);
    assert_eq!(b[0..3], [0xAA; 3]);
    assert_eq!(&b[3..4999], &src[1000..1000 + 4996]);
    assert_eq!(b[4999], 0xAA);
    assert_eq!(&c[..], &src[19983..]);
}

/// Runs `f` on a thread and fails (instead of hanging) if it does not finish in 60 s.
fn no_hang<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("emulated kernel hung")
}

#[test]
fn divergent_barrier_and_bad_masks_are_errors_not_hangs() {
    // Mode 0: correct kernel, every element becomes its block's sum.
    let res = no_hang(|| {
        let mut rng = Rng::new(17);
        let mut d = randn(&mut rng, 3 * 64, 1.0);
        let orig = d.clone();
        emu::test_sync(&mut d, 64, 0, 0).map(|_| (d, orig))
    });
    let (d, orig) = res.unwrap();
    for b in 0..3 {
        let s: f32 = orig[b * 64..(b + 1) * 64].iter().sum();
        for &v in &d[b * 64..(b + 1) * 64] {
            assert!((v - s).abs() < 1e-4, "{v} vs {s}");
        }
    }
    let cases = [
        (1, 5, LaunchErrorKind::BarrierDivergence, "exited"),
        (
            2,
            0,
            LaunchErrorKind::BarrierDivergence,
            "divergent __syncthreads",
        ),
        (3, 7, LaunchErrorKind::WarpCollective, "mask 0xffffff7f"),
        (4, 9, LaunchErrorKind::WarpCollective, "has exited"),
    ];
    for (mode, arg, kind, text) in cases {
        let err = no_hang(move || {
            let mut d = vec![1f32; 2 * 64];
            emu::test_sync(&mut d, 64, mode, arg)
        })
        .expect_err("a broken kernel must fail");
        assert_eq!(err.kind, kind, "mode {mode}: {err}");
        assert!(err.message.contains(text), "mode {mode}: {err}");
    }
}

/// Kernels that loop forever while still reaching emulated operations never deadlock: the
/// emulation's step budget (`BC_EMU_STEP_LIMIT`, here set small for this thread's launches)
/// fails them with [`LaunchErrorKind::StepLimit`] naming where the threads are, instead of
/// hanging (`bc_test_sync` modes 40-41: a loop through barriers, warp collectives and atomics;
/// one thread spinning on an atomic while the others wait at a barrier). The same thread's next
/// launch runs normally.
#[test]
fn a_kernel_that_loops_forever_fails_at_the_step_budget() {
    let cases = [(40, "__syncthreads at "), (41, "thread 0 at atomicAdd at ")];
    for (mode, text) in cases {
        let (err, after) = no_hang(move || {
            emu::set_step_limit(Some(1000));
            let mut d = vec![1f32; 3 * 64];
            let err = emu::test_sync(&mut d, 64, mode, 0);
            // A correct launch right after the failed one (same thread, same fiber stacks).
            let mut rng = Rng::new(41);
            let mut d = randn(&mut rng, 3 * 64, 1.0);
            let orig = d.clone();
            let after = emu::test_sync(&mut d, 64, 0, 0).map(|_| (d, orig));
            emu::set_step_limit(None);
            (err, after)
        });
        let err = err.expect_err("a kernel that loops forever must fail");
        eprintln!("mode {mode}: {err}");
        assert_eq!(err.kind, LaunchErrorKind::StepLimit, "mode {mode}: {err}");
        for want in [
            "step budget exceeded",
            "1000 per thread x 64 threads",
            "test_kernels.cu:",
            text,
        ] {
            assert!(err.message.contains(want), "mode {mode}: {err}");
        }
        let (d, orig) = after.unwrap_or_else(|e| panic!("mode {mode}: the next launch: {e}"));
        for b in 0..3 {
            let s: f32 = orig[b * 64..(b + 1) * 64].iter().sum();
            for &v in &d[b * 64..(b + 1) * 64] {
                assert!((v - s).abs() < 1e-4, "mode {mode}: {v} vs {s}");
            }
        }
    }
}

#[test]
fn fatbin_and_report_agree() {
    use blockcascade::kernels;
    let report = kernels::report();
    match kernels::fatbin() {
        Some(fb) => {
            assert!(kernels::built());
            assert_eq!(fb.as_ptr() as usize % 16, 0, "fatbin alignment");
            assert!(fb.len() > 1000);
            for name in kernels::KERNEL_NAMES {
                for arch in ["sm_80", "sm_90a"] {
                    let line = report
                        .lines()
                        .find(|l| l.starts_with(&format!("{name} ")) && l.contains(arch))
                        .unwrap_or_else(|| {
                            panic!("{name} ({arch}) missing from the report:\n{report}")
                        });
                    assert!(line.trim_end().ends_with(" 0/0"), "spills: {line}");
                }
            }
        }
        None => {
            assert!(!kernels::built());
            assert_eq!(report.trim(), kernels::NOT_BUILT);
            eprintln!("skipping fatbin checks: {}", kernels::NOT_BUILT);
        }
    }
}

#[test]
fn tensor_core_fragment_layouts() {
    let mut rng = Rng::new(18);
    let (af, a) = randn_bf16(&mut rng, 256, 1.0);
    let (bf, b) = randn_bf16(&mut rng, 128, 1.0);
    let c = randn(&mut rng, 128, 1.0);
    let (d1, d2) = emu::test_mma(&a, &b, &c).unwrap();
    let want: Vec<f32> = (0..128)
        .map(|i| {
            let (r, n) = (i / 8, i % 8);
            c[i] + (0..16).map(|k| af[r * 16 + k] * bf[k * 8 + n]).sum::<f32>()
        })
        .collect();
    assert_close("mma via ldmatrix.trans", &d1, &want, 1e-4);
    assert_close("mma via direct B fragments", &d2, &want, 1e-4);
}

/// Named barriers (`bar.sync` / `bar.arrive`, `cuda/include/barrier.cuh`) under the emulation:
/// a correct two-half ping-pong gives the exchanged sums; a wrong barrier id, mismatched counts,
/// a missing arrive, arrivals left at the exit, id 0 and a double arrival are errors, not hangs.
#[test]
fn named_barriers_ping_pong_and_their_faults() {
    let block = 128usize;
    let (d, orig) = no_hang(move || {
        let mut rng = Rng::new(23);
        let mut d = randn(&mut rng, 3 * block, 1.0);
        let orig = d.clone();
        emu::test_sync(&mut d, block as u32, 5, 0).map(|_| (d, orig))
    })
    .unwrap();
    let h = block / 2;
    for b in 0..3 {
        let x = &orig[b * block..(b + 1) * block];
        let (lo, up): (f32, f32) = (x[..h].iter().sum(), x[h..].iter().sum());
        for (t, &v) in d[b * block..(b + 1) * block].iter().enumerate() {
            let other = if t < h { up } else { lo };
            let want = 3.0 * other + 3.0 * h as f32;
            assert!(
                (v - want).abs() < 1e-3,
                "block {b} thread {t}: {v} vs {want}"
            );
        }
    }
    let cases = [
        (6, "deadlock"),
        (7, "count"),
        (8, "deadlock"),
        (9, "when the block exits"),
        (10, "ids are 1..15"),
        (11, "arrives twice"),
    ];
    for (mode, text) in cases {
        let err = no_hang(move || {
            let mut d = vec![1f32; 2 * 128];
            emu::test_sync(&mut d, 128, mode, 0)
        })
        .expect_err("a broken kernel must fail");
        assert_eq!(
            err.kind,
            LaunchErrorKind::BarrierDivergence,
            "mode {mode}: {err}"
        );
        assert!(err.message.contains(text), "mode {mode}: {err}");
        assert!(err.message.contains("named barrier"), "mode {mode}: {err}");
    }
}
