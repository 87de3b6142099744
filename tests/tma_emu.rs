//! The Hopper TMA tile-mode loads and the mbarrier (`cuda/include/tma.cuh`) under the SIMT
//! emulation, through the probe kernel `bc_tma_probe`: every swizzle (none, 32/64/128 bytes) x
//! rank 2..5 x element size, two boxes per run (mbarrier phases 0 and 1) hanging over the low
//! and the high edge of every dimension, on fresh random bytes, against the CPU model of the
//! load (`TensorMapSpec::load_box`); boxes loaded by TMA then read by wgmma, against a CPU
//! matmul; deliberate faults (no expect_tx, wrong parity, no arrival, box one row off, the map's
//! swizzle not the descriptor's) must fail. tests/cuda.rs runs the same probe on a Hopper GPU
//! against this emulation.

use blockcascade::kernels::emu::{self, TmaProbeCase};
use blockcascade::kernels::params::{
    BC_TMA_FAULT_COORD, BC_TMA_FAULT_NO_ARRIVE, BC_TMA_FAULT_NO_EXPECT_TX, BC_TMA_FAULT_PARITY,
};
use blockcascade::kernels::tma::{TensorMapSpec, TmaSwizzle};
use blockcascade::rng::Rng;
use half::bf16;

fn case(rank: usize, swizzle: TmaSwizzle, eb: usize) -> TmaProbeCase {
    TmaProbeCase::edges(rank, swizzle, eb)
}

fn tensor_bytes(rng: &mut Rng, spec: &TensorMapSpec) -> Vec<u8> {
    let c = TmaProbeCase {
        spec: spec.clone(),
        coords: [[0; 5]; 2],
        fault: 0,
    };
    // Never zero, so zero fill and data are told apart.
    (0..c.tensor_bytes())
        .map(|_| (rng.next_u64() % 255) as u8 + 1)
        .collect()
}

fn want(c: &TmaProbeCase, t: &[u8]) -> Vec<u8> {
    c.expected(t)
}

#[test]
fn tma_boxes_match_the_model_for_every_swizzle_rank_and_edge() {
    let mut rng = Rng::new(131);
    let mut runs = 0;
    for swizzle in TmaSwizzle::ALL {
        for rank in 2..=5 {
            for eb in [2usize, 4] {
                let c = case(rank, swizzle, eb);
                let t = tensor_bytes(&mut rng, &c.spec);
                let got = emu::tma_probe(&t, &c).unwrap();
                let w = want(&c, &t);
                assert!(
                    w.contains(&0) && w.iter().any(|&b| b != 0),
                    "zero fill and data"
                );
                assert_eq!(got, w, "swizzle {swizzle:?} rank {rank} {eb}-byte elements");
                // The same loads reading a copy of the map elsewhere (`map_global`, the GPU
                // diagnostic), the parameter's map zeroed: the same bytes.
                let global = emu::tma_probe_global_map(&t, &c).unwrap();
                assert_eq!(
                    global, w,
                    "map_global: swizzle {swizzle:?} rank {rank} {eb}B"
                );
                runs += 1;
            }
        }
    }
    assert_eq!(runs, 32);
}

/// The shape changes the GPU bundle bisects the H200's TMA fault with (`TmaProbeCase::reshaped`,
/// `BC_TMA_ONLY` in tests/cuda.rs): each still a valid map whose emulated boxes equal the model.
#[test]
fn tma_bisection_cases_are_valid_and_match_the_model() {
    // No change is the edges case itself (the GPU test reshapes every case, most with none).
    for swizzle in TmaSwizzle::ALL {
        for rank in 2..=5 {
            for eb in [2usize, 4] {
                let (e, r) = (
                    case(rank, swizzle, eb),
                    case(rank, swizzle, eb).reshaped(&[]),
                );
                assert_eq!(
                    format!("{e:?}"),
                    format!("{r:?}"),
                    "{swizzle:?} {rank} {eb}"
                );
            }
        }
    }
    let mut rng = Rng::new(132);
    for (sw, mods) in [
        (TmaSwizzle::None, "inside"),
        (TmaSwizzle::None, "dense"),
        (TmaSwizzle::None, "fit"),
        (TmaSwizzle::None, "rows8"),
        (TmaSwizzle::None, "dense,fit"),
        (TmaSwizzle::None, "dense,fit,inside"),
        (TmaSwizzle::B128, "dense,fit,inside"),
        (TmaSwizzle::None, "dense,fit,rows8,inside"),
    ] {
        let m: Vec<&str> = mods.split(',').collect();
        let c = case(2, sw, 2).reshaped(&m);
        c.spec.validate(0).unwrap_or_else(|e| panic!("{mods}: {e}"));
        let t = tensor_bytes(&mut rng, &c.spec);
        assert_eq!(
            emu::tma_probe(&t, &c).unwrap(),
            want(&c, &t),
            "{sw:?} {mods}"
        );
    }
}

#[test]
fn tma_element_strides_and_one_byte_elements() {
    let mut rng = Rng::new(7);
    let mut c = case(3, TmaSwizzle::None, 1);
    c.spec.box_dims = vec![48, 5, 3];
    c.spec.element_strides = vec![1, 2, 3];
    c.spec.dims[2] = 8;
    c.coords[1] = [5, 1, 2, 0, 0];
    let t = tensor_bytes(&mut rng, &c.spec);
    assert_eq!(emu::tma_probe(&t, &c).unwrap(), want(&c, &t));
    let mut c = case(2, TmaSwizzle::B64, 1);
    c.coords[0] = [0, 0, 0, 0, 0];
    let t = tensor_bytes(&mut rng, &c.spec);
    assert_eq!(emu::tma_probe(&t, &c).unwrap(), want(&c, &t));
}

#[test]
fn tma_faults_are_caught() {
    let mut rng = Rng::new(9);
    let c = case(3, TmaSwizzle::B128, 2);
    let t = tensor_bytes(&mut rng, &c.spec);
    let w = want(&c, &t);
    for (fault, name) in [
        (BC_TMA_FAULT_NO_EXPECT_TX, "no expect_tx"),
        (BC_TMA_FAULT_PARITY, "wrong parity"),
        (BC_TMA_FAULT_NO_ARRIVE, "no arrival"),
        (BC_TMA_FAULT_COORD, "box one row off"),
    ] {
        let f = TmaProbeCase {
            fault: fault as i32,
            ..c.clone()
        };
        let r = emu::tma_probe(&t, &f);
        println!(
            "{name}: {:?}",
            r.as_ref().map(|g| g.iter().filter(|&&b| b == 0xff).count())
        );
        match r {
            Ok(got) => {
                assert_ne!(got, w, "{name}: the probe still matched");
                assert_ne!(
                    fault, BC_TMA_FAULT_NO_ARRIVE,
                    "{name}: no deadlock reported"
                );
            }
            Err(e) => {
                assert_ne!(fault, BC_TMA_FAULT_COORD, "{name}: {e}");
                if fault == BC_TMA_FAULT_NO_ARRIVE {
                    assert!(e.to_string().contains("deadlock"), "{name}: {e}");
                }
            }
        }
    }
}

#[test]
fn tma_probe_refuses_bad_arguments() {
    let mut rng = Rng::new(3);
    let c = case(2, TmaSwizzle::None, 2);
    let t = tensor_bytes(&mut rng, &c.spec);
    let bad = TmaProbeCase {
        fault: 99,
        ..c.clone()
    };
    assert!(emu::tma_probe(&t, &bad).is_err());
    let big = TmaProbeCase {
        spec: TensorMapSpec::dense(2, &[24, 300, 2], &[24, 200, 2], TmaSwizzle::None),
        coords: [[0; 5]; 2],
        fault: 0,
    };
    assert!(big.spec.box_bytes() > 16384);
    let t2 = tensor_bytes(&mut rng, &big.spec);
    assert!(
        emu::tma_probe(&t2, &big).is_err(),
        "box beyond the probe's shared memory"
    );
    assert!(
        emu::tma_probe(&t[..16], &c).is_err(),
        "tensor shorter than the map"
    );
}

fn rand_bf16(rng: &mut Rng, n: usize) -> (Vec<f32>, Vec<bf16>) {
    let b: Vec<bf16> = (0..n).map(|_| bf16::from_f32(rng.normal())).collect();
    (b.iter().map(|v| v.to_f32()).collect(), b)
}

fn matmul_err(got: &[f32], a: &[f32], b: &[f32]) -> f32 {
    let want: Vec<f32> = (0..64 * 64)
        .map(|i| {
            (0..64)
                .map(|k| a[i / 64 * 64 + k] as f64 * b[i % 64 * 64 + k] as f64)
                .sum::<f64>() as f32
        })
        .collect();
    let rms = (want.iter().map(|v| v * v).sum::<f32>() / want.len() as f32).sqrt();
    got.iter()
        .zip(&want)
        .map(|(g, w)| {
            if g.is_finite() {
                (g - w).abs() / (w.abs() + 1e-2 * rms)
            } else {
                f32::INFINITY
            }
        })
        .fold(0.0, f32::max)
}

#[test]
fn wgmma_reads_tma_tiles_in_every_layout() {
    let mut rng = Rng::new(17);
    for swizzle in TmaSwizzle::ALL {
        let (af, a) = rand_bf16(&mut rng, 64 * 64);
        let (bf, b) = rand_bf16(&mut rng, 64 * 64);
        let got = emu::tma_probe_wgmma(&a, &b, swizzle, swizzle, 0).unwrap();
        let err = matmul_err(&got, &af, &bf);
        assert!(err < 1e-4, "{swizzle:?}: max error {err}");
    }
    // Controls: the map's swizzle is not the descriptor's, or the boxes start a row too low.
    let (af, a) = rand_bf16(&mut rng, 64 * 64);
    let (bf, b) = rand_bf16(&mut rng, 64 * 64);
    let got = emu::tma_probe_wgmma(
        &a,
        &b,
        TmaSwizzle::B128,
        TmaSwizzle::B128,
        BC_TMA_FAULT_COORD as i32,
    )
    .unwrap();
    assert!(matmul_err(&got, &af, &bf) > 1e-2, "box one row off matched");
    // 128B tiles loaded unswizzled (same boxes {64, 64}: the rows are not XORed).
    let spec_none = TensorMapSpec::dense(2, &[64, 64], &[64, 64], TmaSwizzle::None);
    assert!(spec_none.validate(0).is_ok());
    match emu::tma_probe_wgmma(&a, &b, TmaSwizzle::B128, TmaSwizzle::None, 0) {
        Ok(got) => assert!(
            matmul_err(&got, &af, &bf) > 1e-2,
            "unswizzled tiles read as 128B matched"
        ),
        Err(e) => panic!("{e}"),
    }
}

/// The emulated mbarrier wait is a scheduling point that warp collectives and barriers live
/// with: a lane waiting for a phase holds its warp's shuffle until the phase completes; a phase
/// nobody completes, or one completed only behind a `__syncthreads` the waiter never reaches,
/// is a reported deadlock, not a hang.
#[test]
fn mbarrier_waits_meet_collectives_and_deadlocks_are_reported() {
    let mut data = vec![0.0f32; 128];
    emu::test_sync(&mut data, 64, 20, 0).unwrap();
    for b in 0..2 {
        for t in 0..64 {
            let want = if t < 32 { 42.0 } else { 7.0 };
            assert_eq!(data[64 * b + t], want, "block {b} thread {t}");
        }
    }
    for mode in [21, 22] {
        let e = emu::test_sync(&mut data, 64, mode, 0).unwrap_err();
        assert!(
            e.message.contains("deadlock") && e.message.contains("mbarrier"),
            "mode {mode}: {e}"
        );
    }
}

/// The race check of asynchronous shared-memory copies (`bc_test_sync` modes 30-33,
/// `cuda/emu/test_kernels.cu`): a stage published on its mbarrier before the producer's
/// `cp.async.wait_group` (the wgmma is issued while the copies are pending), a stage released
/// before the consumers' `wgmma.wait_group` (the refill's cp.async is issued while the wgmma may
/// still read it) and an `ldmatrix` of a pending cp.async destination are reported races, each
/// naming where it happened; the correct handshake (mode 30) runs and gives 16 = 16 x 1 x 1.
#[test]
fn async_copy_races_are_reported() {
    let mut data = vec![0.0f32; 256];
    emu::test_sync(&mut data, 256, 30, 0).unwrap();
    for (t, &v) in data.iter().enumerate().skip(128) {
        assert_eq!(v, 16.0, "consumer thread {t}");
    }
    for (mode, what) in [
        (31, "pending when the wgmma is issued"),
        (32, "issued after the wgmma"),
        (33, "ldmatrix reads shared address"),
    ] {
        let e = emu::test_sync(&mut data, 256, mode, 0).unwrap_err();
        assert!(
            e.message.contains("race") && e.message.contains(what),
            "mode {mode}: {e}"
        );
        assert!(e.message.contains("test_kernels.cu:"), "mode {mode}: {e}");
    }
}

/// `cp.async.mbarrier.arrive(.noinc)` (bc_test_sync modes 34-38): the producer hands its
/// cp.async to the mbarrier without a wait_group; with the consumers' proxy fence after their
/// wait the wgmma reads the data (both forms), without it, with it before the wait, or with the
/// asynchronous arrive issued before the copies (nothing tracked), the emulation reports it.
#[test]
fn cp_async_mbarrier_arrive_hands_copies_over() {
    for mode in [34, 36] {
        let mut data = vec![0.0f32; 256];
        emu::test_sync(&mut data, 256, mode, 0).unwrap();
        for (t, &v) in data.iter().enumerate().skip(128) {
            assert_eq!(v, 16.0, "mode {mode}: consumer thread {t}");
        }
    }
    for (mode, what) in [
        (35, "has not executed fence.proxy.async"),
        (37, "pending when the wgmma is issued"),
        (38, "has not executed fence.proxy.async"),
    ] {
        let mut data = vec![0.0f32; 256];
        let e = emu::test_sync(&mut data, 256, mode, 0).unwrap_err();
        assert!(e.message.contains(what), "mode {mode}: {e}");
        assert!(e.message.contains("test_kernels.cu:"), "mode {mode}: {e}");
    }
}
