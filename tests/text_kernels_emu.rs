//! The umT5 text encoder's kernels (`cuda/t5.cu`), run on the CPU through the SIMT emulation
//! layer, against the CPU reference (`blockcascade::text::umt5`, `backend::cpu::ops`). Inputs
//! are fresh random normals, outputs are poisoned with NaN before the launch, and a non-finite
//! output never passes.

use blockcascade::backend::cpu::ops;
use blockcascade::kernels::emu::{self, T5Attention, T5NormOut};
use blockcascade::kernels::LaunchErrorKind;
use blockcascade::rng::Rng;
use blockcascade::text::umt5::{attention, bucket_table, relative_bucket, MAX_DISTANCE};
use half::bf16;

fn randn(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * scale).collect()
}

fn to_f32(b: &[bf16]) -> Vec<f32> {
    b.iter().map(|v| v.to_f32()).collect()
}

/// Worst `|got - want| / (|want| + 0.05 rms(want))`; panics on a non-finite value.
fn worst_err(what: &str, got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let rms = (want.iter().map(|v| (v * v) as f64).sum::<f64>() / want.len() as f64).sqrt() as f32;
    let mut worst = 0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}: element {i} is {g} (want {w})");
        worst = worst.max((g - w).abs() / (w.abs() + 0.05 * rms));
    }
    worst
}

fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f32) {
    let e = worst_err(what, got, want);
    assert!(
        e <= rtol,
        "{what}: worst relative error {e:.3e} > {rtol:.0e}"
    );
}

const EPS: f32 = 1e-6;

#[test]
fn rms_norm_with_and_without_residual_add() {
    let mut rng = Rng::new(1);
    // Odd widths and row counts: the thread loop's tail, one row.
    for &(rows, dim) in &[(7usize, 40usize), (1, 300), (3, 4096)] {
        let x0 = randn(&mut rng, rows * dim, 3.0);
        let delta = randn(&mut rng, rows * dim, 1.0);
        let w = randn(&mut rng, dim, 1.0);
        // bf16 out, no add: x unchanged.
        let mut x = x0.clone();
        let mut out = vec![bf16::NAN; rows * dim];
        emu::t5_rms_norm(&mut x, None, &w, dim, EPS, T5NormOut::Bf16(&mut out)).unwrap();
        assert_eq!(x, x0, "x changed without delta");
        let mut want = x0.clone();
        ops::rms_norm(&mut want, dim, EPS as f64, &w);
        assert_close("rms_norm bf16", &to_f32(&out), &want, 1e-2);
        // f32 out with the residual add: x becomes x + delta.
        let mut x = x0.clone();
        let mut out = vec![f32::NAN; rows * dim];
        emu::t5_rms_norm(&mut x, Some(&delta), &w, dim, EPS, T5NormOut::F32(&mut out)).unwrap();
        let sum: Vec<f32> = x0.iter().zip(&delta).map(|(a, b)| a + b).collect();
        assert_eq!(x, sum, "residual add");
        let mut want = sum.clone();
        ops::rms_norm(&mut want, dim, EPS as f64, &w);
        assert_close("rms_norm f32", &out, &want, 1e-5);
    }
    // Bad sizes are refused, not run.
    let mut x = vec![0.5f32; 10];
    let mut o = vec![0f32; 10];
    let e = emu::t5_rms_norm(&mut x, None, &[1.0; 4], 5, EPS, T5NormOut::F32(&mut o)).unwrap_err();
    assert_eq!(e.kind, LaunchErrorKind::InvalidArgument);
}

#[test]
fn gated_gelu_reads_two_halves_of_one_row() {
    let mut rng = Rng::new(2);
    for &(rows, cols) in &[(5usize, 64usize), (1, 3), (13, 257)] {
        // One GEMM output [rows, 2 * cols]: the GELU half, then the linear half.
        let gf = randn(&mut rng, rows * 2 * cols, 2.0);
        let mut out = vec![bf16::NAN; rows * cols];
        emu::t5_gated_gelu(&gf, &gf[cols..], 2 * cols, rows, cols, &mut out).unwrap();
        let mut g: Vec<f32> = (0..rows * cols)
            .map(|i| gf[(i / cols) * 2 * cols + i % cols])
            .collect();
        ops::gelu_tanh(&mut g);
        let want: Vec<f32> = g
            .iter()
            .enumerate()
            .map(|(i, v)| v * gf[(i / cols) * 2 * cols + cols + i % cols])
            .collect();
        assert_close("gated gelu", &to_f32(&out), &want, 1e-2);
    }
}

/// The kernel against `umt5::attention` for `rows` tokens, `heads` heads of `hd`, q/k/v as the
/// three parts of one `[rows, 3 * heads * hd]` GEMM output; logits of size `scale`.
fn check_attention(seed: u64, rows: usize, heads: usize, hd: usize, scale: f32) {
    let mut rng = Rng::new(seed);
    let w = heads * hd;
    let qkv = randn(&mut rng, rows * 3 * w, scale);
    let part = |p: usize| -> Vec<f32> {
        (0..rows * w)
            .map(|i| qkv[(i / w) * 3 * w + p * w + i % w])
            .collect()
    };
    let nb = 32;
    let rel = randn(&mut rng, nb * heads, 2.0);
    let bucket: Vec<i32> = (0..2 * rows - 1)
        .map(|i| relative_bucket(i as i64 - (rows as i64 - 1), nb, MAX_DISTANCE) as i32)
        .collect();
    let mut out = vec![bf16::NAN; rows * w];
    emu::t5_attention(
        &T5Attention {
            q: &qkv,
            k: &qkv[w..],
            v: &qkv[2 * w..],
            qkv_stride: 3 * w,
            rel_bias: &rel,
            bucket: &bucket,
            rows,
            heads,
            head_dim: hd,
        },
        &mut out,
    )
    .unwrap();
    let want = attention(
        &part(0),
        &part(1),
        &part(2),
        rows,
        heads,
        hd,
        &rel,
        &bucket_table(rows, nb, MAX_DISTANCE),
    );
    let got = to_f32(&out);
    let e = worst_err("t5 attention", &got, &want);
    eprintln!("rows {rows}, heads {heads}, hd {hd}: worst relative error {e:.2e}");
    assert!(
        e <= 1e-2,
        "rows {rows}, heads {heads}, hd {hd}: worst relative error {e:.3e}"
    );
}

#[test]
fn attention_small_and_odd_shapes() {
    // One token; fewer than a key tile; an odd count over two tiles and two row blocks.
    check_attention(3, 1, 1, 8, 1.0);
    check_attention(4, 5, 3, 8, 1.0);
    check_attention(5, 37, 5, 40, 0.5);
}

#[test]
fn attention_umt5_head_dim_and_large_unscaled_logits() {
    // umT5-XXL's head dim 64 with logits of tens (no 1/sqrt(d) scale): the softmax must stay
    // exact in f32.
    check_attention(6, 30, 2, 64, 1.5);
    check_attention(7, 19, 1, 128, 0.7);
}

#[test]
fn attention_at_the_token_limit() {
    check_attention(8, 512, 1, 8, 1.0);
}

#[test]
fn attention_refuses_what_it_cannot_run() {
    let qkv = vec![0.5f32; 600 * 3 * 8];
    let bucket = vec![0i32; 2 * 600 - 1];
    let rel = vec![0.1f32; 32];
    let mut out = vec![bf16::ZERO; 600 * 8];
    let a = T5Attention {
        q: &qkv,
        k: &qkv[8..],
        v: &qkv[16..],
        qkv_stride: 24,
        rel_bias: &rel,
        bucket: &bucket,
        rows: 600,
        heads: 1,
        head_dim: 8,
    };
    // More tokens than the kernel's score rows hold.
    let e = emu::t5_attention(&a, &mut out).unwrap_err();
    assert_eq!(e.kind, LaunchErrorKind::InvalidArgument);
    assert!(e.message.contains("512"), "{e}");
    // A bucket outside the bias table.
    let mut bad = bucket.clone();
    bad[3] = 32;
    let e = emu::t5_attention(
        &T5Attention {
            rows: 4,
            bucket: &bad,
            ..a
        },
        &mut out,
    )
    .unwrap_err();
    assert_eq!(e.kind, LaunchErrorKind::InvalidArgument);
    // A head dim over the kernel's limit.
    let big = vec![0.5f32; 2 * 3 * 136];
    let e = emu::t5_attention(
        &T5Attention {
            q: &big,
            k: &big[136..],
            v: &big[272..],
            qkv_stride: 3 * 136,
            rows: 2,
            head_dim: 136,
            ..a
        },
        &mut out,
    )
    .unwrap_err();
    assert_eq!(e.kind, LaunchErrorKind::InvalidArgument);
}
