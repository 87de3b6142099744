//! The Hopper warpgroup MMA (wgmma, `cuda/include/wgmma.cuh`) under the SIMT emulation: the
//! probe kernel `bc_wgmma_probe` against a CPU f32 matmul on fresh random bf16 inputs (output
//! poisoned with NaN first), for every shared-memory layout (no swizzle, 128/64/32-byte swizzle),
//! N = 64/128/256 and A from shared memory or registers (and one commit group per k-step, two
//! warpgroups), with B K-major and MN-major (`imm-trans-b = 1`, the form P V uses); a
//! deliberately wrong descriptor must give a wrong answer, and the emulation must report misuse. This checks the emulation's reading of the PTX ISA (descriptor,
//! swizzle, fragment layouts, async groups); tests/cuda.rs runs the same probe on a Hopper GPU.

use blockcascade::kernels::emu::{self, WgmmaProbeCase, WGMMA_PROBE_LAYOUTS, WGMMA_PROBE_NS};
use blockcascade::kernels::params::{
    BC_WGMMA_FAULT_DIVERGENT, BC_WGMMA_FAULT_EARLY_READ, BC_WGMMA_FAULT_LBO,
    BC_WGMMA_FAULT_MISALIGNED, BC_WGMMA_FAULT_NO_TRANS, BC_WGMMA_FAULT_NO_WAIT,
    BC_WGMMA_FAULT_STRIDE, BC_WGMMA_FAULT_UNPUBLISHED, BC_WGMMA_PROBE_K,
};
use blockcascade::kernels::LaunchErrorKind;
use blockcascade::rng::Rng;
use half::bf16;

const K: usize = BC_WGMMA_PROBE_K as usize;

/// Random bf16 values, as f32 (for the reference) and bf16 (for the kernel).
fn randn_bf16(rng: &mut Rng, n: usize) -> (Vec<f32>, Vec<bf16>) {
    let b: Vec<bf16> = (0..n).map(|_| bf16::from_f32(rng.normal())).collect();
    (b.iter().map(|v| v.to_f32()).collect(), b)
}

/// `c[64][n] = a[64][K] . b[n][K]^T` in f64, rounded to f32.
fn reference(a: &[f32], b: &[f32], n: usize) -> Vec<f32> {
    (0..64 * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            (0..K)
                .map(|k| a[r * K + k] as f64 * b[c * K + k] as f64)
                .sum::<f64>() as f32
        })
        .collect()
}

/// Largest error relative to `|want| + 1e-2 * rms(want)`; infinite when any value is not finite.
fn max_err(got: &[f32], want: &[f32]) -> f32 {
    let rms = (want.iter().map(|v| v * v).sum::<f32>() / want.len() as f32).sqrt();
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            if g.is_finite() {
                (g - w).abs() / (w.abs() + 1e-2 * rms)
            } else {
                f32::INFINITY
            }
        })
        .fold(0.0, f32::max)
}

/// Checks every warpgroup's copy of the output against the reference.
fn check(what: &str, got: &[f32], want: &[f32]) {
    for (j, part) in got.chunks(want.len()).enumerate() {
        let err = max_err(part, want);
        assert!(err < 1e-4, "{what}, warpgroup {j}: max error {err}");
    }
}

/// Every layout x N x A source, with B K-major or (`b_mn_major`) MN-major.
fn probe_every_layout(seed: u64, b_mn_major: bool) {
    let mut rng = Rng::new(seed);
    for n in WGMMA_PROBE_NS {
        for (swizzle, name) in WGMMA_PROBE_LAYOUTS {
            for a_regs in [false, true] {
                let (af, a) = randn_bf16(&mut rng, 64 * K);
                let (bf, b) = randn_bf16(&mut rng, n * K);
                let case = WgmmaProbeCase {
                    a_regs,
                    b_mn_major,
                    ..WgmmaProbeCase::new(n, swizzle)
                };
                let got = emu::wgmma_probe(&a, &b, &case).unwrap();
                let src = if a_regs { "registers" } else { "shared" };
                check(
                    &format!("m64n{n}k16 swizzle {name} A from {src} B MN-major {b_mn_major}"),
                    &got,
                    &reference(&af, &bf, n),
                );
            }
        }
    }
}

#[test]
fn wgmma_probe_matches_a_matmul_for_every_layout() {
    probe_every_layout(90, false);
}

/// B MN-major (`[K][n]`, n contiguous; `imm-trans-b = 1`): the V operand of P V.
#[test]
fn wgmma_probe_with_an_mn_major_b_matches_a_matmul_for_every_layout() {
    probe_every_layout(94, true);
}

/// The MN-major descriptor's own faults give wrong answers: stride (8-row k groups when
/// swizzled, n core matrices without), leading offset (n atoms when swizzled, k groups without;
/// N = 128 spans two atoms of every swizzle), and the K-major form reading the MN-major tile.
#[test]
fn a_wrong_mn_major_descriptor_gives_a_wrong_answer() {
    let mut rng = Rng::new(95);
    for (swizzle, name) in WGMMA_PROBE_LAYOUTS {
        for fault in [
            BC_WGMMA_FAULT_STRIDE,
            BC_WGMMA_FAULT_LBO,
            BC_WGMMA_FAULT_NO_TRANS,
        ] {
            let n = 128;
            let (af, a) = randn_bf16(&mut rng, 64 * K);
            let (bf, b) = randn_bf16(&mut rng, n * K);
            let case = WgmmaProbeCase {
                fault: fault as i32,
                b_mn_major: true,
                a_regs: fault == BC_WGMMA_FAULT_LBO,
                ..WgmmaProbeCase::new(n, swizzle)
            };
            match emu::wgmma_probe(&a, &b, &case) {
                Ok(got) => {
                    let err = max_err(&got, &reference(&af, &bf, n));
                    assert!(
                        err > 1e-2,
                        "swizzle {name}, fault {fault}: still matched (error {err})"
                    );
                }
                Err(e) => assert_eq!(e.kind, LaunchErrorKind::Trap, "{name} {fault}: {e}"),
            }
        }
    }
}

/// One commit group per k-step (wait_group 1 while the next is in flight: the queued mma chain
/// their accumulators) and two warpgroups in one block (each with its own queue).
#[test]
fn wgmma_probe_pipelined_and_with_two_warpgroups() {
    let mut rng = Rng::new(93);
    for (swizzle, name) in WGMMA_PROBE_LAYOUTS {
        for (pipelined, warpgroups, a_regs) in [
            (true, 1, false),
            (true, 1, true),
            (false, 2, false),
            (true, 2, true),
        ] {
            let n = 128;
            let (af, a) = randn_bf16(&mut rng, 64 * K);
            let (bf, b) = randn_bf16(&mut rng, n * K);
            let case = WgmmaProbeCase {
                a_regs,
                pipelined,
                warpgroups,
                // The register-A runs with the MN-major B of P V.
                b_mn_major: a_regs,
                ..WgmmaProbeCase::new(n, swizzle)
            };
            let got = emu::wgmma_probe(&a, &b, &case).unwrap();
            check(&format!("{name} {case:?}"), &got, &reference(&af, &bf, n));
        }
    }
}

#[test]
fn a_wrong_descriptor_gives_a_wrong_answer() {
    // B's stride-dimension byte offset 16 bytes off: the probe must not pass (wrong values, NaN
    // from unwritten shared memory, or an out-of-bounds error from the emulation).
    let mut rng = Rng::new(91);
    for (swizzle, name) in WGMMA_PROBE_LAYOUTS {
        let (af, a) = randn_bf16(&mut rng, 64 * K);
        let (bf, b) = randn_bf16(&mut rng, 64 * K);
        let case = WgmmaProbeCase {
            fault: BC_WGMMA_FAULT_STRIDE as i32,
            ..WgmmaProbeCase::new(64, swizzle)
        };
        match emu::wgmma_probe(&a, &b, &case) {
            Ok(got) => {
                let err = max_err(&got, &reference(&af, &bf, 64));
                assert!(
                    err > 1e-2,
                    "swizzle {name}: a wrong stride still matched (error {err})"
                );
            }
            Err(e) => assert_eq!(e.kind, LaunchErrorKind::Trap, "swizzle {name}: {e}"),
        }
    }
}

#[test]
fn wgmma_probe_refuses_bad_arguments() {
    let a = vec![bf16::ZERO; 64 * K];
    let bad = [
        WgmmaProbeCase::new(32, 0),
        WgmmaProbeCase::new(96, 1),
        WgmmaProbeCase::new(64, 4),
        WgmmaProbeCase::new(64, -1),
        WgmmaProbeCase {
            fault: BC_WGMMA_FAULT_UNPUBLISHED as i32 + 1,
            b_mn_major: true,
            ..WgmmaProbeCase::new(64, 0)
        },
        WgmmaProbeCase {
            fault: BC_WGMMA_FAULT_LBO as i32,
            ..WgmmaProbeCase::new(64, 0)
        },
        WgmmaProbeCase {
            warpgroups: 3,
            ..WgmmaProbeCase::new(64, 0)
        },
    ];
    for case in bad {
        let e = emu::wgmma_probe(&a, &a, &case).unwrap_err();
        assert_eq!(e.kind, LaunchErrorKind::InvalidArgument, "{case:?}: {e}");
    }
    let e = emu::wgmma_probe(&a, &a, &WgmmaProbeCase::new(128, 0)).unwrap_err();
    assert!(e.message.contains("b has"), "{e}");
}

/// The emulation's own checks of the wgmma rules: D read before the wait is NaN; tiles off the
/// swizzle period, an mma never waited for, and a warpgroup whose threads pass different
/// descriptors are errors (each undefined or wrong on hardware).
#[test]
fn the_emulation_catches_wgmma_misuse() {
    let mut rng = Rng::new(92);
    let (af, a) = randn_bf16(&mut rng, 64 * K);
    let (bf, b) = randn_bf16(&mut rng, 64 * K);
    let fault = |f: u32, swizzle| WgmmaProbeCase {
        fault: f as i32,
        ..WgmmaProbeCase::new(64, swizzle)
    };
    // Without a swizzle only 16-byte alignment matters: tiles 128 bytes off still work.
    let got = emu::wgmma_probe(&a, &b, &fault(BC_WGMMA_FAULT_MISALIGNED, 0)).unwrap();
    check(
        "unswizzled tiles off the 1024-byte boundary",
        &got,
        &reference(&af, &bf, 64),
    );
    let early = emu::wgmma_probe(&a, &b, &fault(BC_WGMMA_FAULT_EARLY_READ, 1)).unwrap();
    assert!(
        early.iter().all(|v| v.is_nan()),
        "D before the wait must read as NaN"
    );
    for (f, text) in [
        (BC_WGMMA_FAULT_MISALIGNED, "swizzle period"),
        (BC_WGMMA_FAULT_NO_WAIT, "never waited for"),
        (BC_WGMMA_FAULT_DIVERGENT, "disagree"),
        (BC_WGMMA_FAULT_UNPUBLISHED, "not arrived at a barrier"),
    ] {
        for (swizzle, name) in WGMMA_PROBE_LAYOUTS {
            // (Checked above: without a swizzle there is no period to be off.)
            if f == BC_WGMMA_FAULT_MISALIGNED && swizzle == 0 {
                continue;
            }
            for b_mn_major in [false, true] {
                let case = WgmmaProbeCase {
                    b_mn_major,
                    ..fault(f, swizzle)
                };
                let Err(e) = emu::wgmma_probe(&a, &b, &case) else {
                    panic!("{case:?}, {name}: the emulation did not notice");
                };
                assert_eq!(e.kind, LaunchErrorKind::Trap, "{case:?}, {name}: {e}");
                assert!(e.message.contains(text), "{case:?}, {name}: {e}");
            }
        }
    }
}
