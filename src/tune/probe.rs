//! The child side of `blockcascade tune`: one candidate of one family measured on the device,
//! against the reference (the current default) computed in the same process on the same fresh
//! random inputs. [`run_probe`] answers one [`ProbeResult`]; the hidden `tune --probe` prints it
//! as one line (`BC_TUNE_RESULT {json}`) for the parent to read.
//!
//! Test hooks (`BC_TUNE_TEST_FAULT`, a comma-separated list of `KIND:FAMILY=CANDIDATE`): `hang`
//! makes that candidate's child sleep forever, `fail` makes it fail as a faulting kernel would
//! (an error, non-zero exit), `wrong` perturbs its output after the run (it then differs from
//! the reference), `linger` starts a descendant in its own process group that keeps the
//! child's stdout and stderr open for 20 s after the child exits (the result must still reach
//! the parent). They act in the child only, so the parent's handling of each outcome can be
//! tested without a GPU.

use super::{conv_candidate, Family};
use crate::backend::cuda::device::{DevPtr, Gpu};
use crate::backend::cuda::ops::{self, SplitScratch};
use crate::kernels::launch::{self, AttentionTile, ConvEpilogue, ConvOut, ConvShape, ConvSource};
use crate::kernels::params::{BcAttnGroup, BcKvSegment, BC_ACT_NONE};
use crate::rng::Rng;
use crate::{Error, Result};
use half::bf16;
use serde::{Deserialize, Serialize};

/// The prefix of the one line a probe child prints on stdout.
pub const RESULT_PREFIX: &str = "BC_TUNE_RESULT ";

/// The largest relative error ([`max_rel_err`]) a candidate may have against the reference
/// (what the GPU tests allow: bf16 outputs, different summation orders); NaN or inf never
/// passes.
pub const TOLERANCE: f64 = 2e-2;

/// The attention problem the probes time: one group of `q_rows` query rows over `keys` keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttnShape {
    /// Heads.
    pub heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Query rows (a block's tokens).
    pub q_rows: usize,
    /// Keys (a full window).
    pub keys: usize,
}

impl AttnShape {
    /// Floating-point operations of one launch (4 per query row, key and channel).
    pub fn flops(&self) -> f64 {
        4.0 * (self.q_rows * self.keys * self.heads * self.head_dim) as f64
    }
}

/// One decoder convolution the conv probes time: a 3x3 over `sources` sources of `cin`
/// channels each to `cout` channels, one `h x w` output frame, bf16 NHWC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvLayer {
    /// Where it occurs.
    pub name: String,
    /// Channels of each source.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Sources.
    pub sources: usize,
    /// The sources are time taps of one causal conv3d (the Wan VAE: `kt = sources`, the same
    /// channels); else channel ranges of one `cat` (TAEHV's MemBlock: `kt = 1`).
    pub time_taps: bool,
    /// Output height.
    pub h: usize,
    /// Output width.
    pub w: usize,
    /// The sources are read through a nearest 2x upsample (they are `h/2 x w/2`): the conv
    /// after TAEHV's `Upsample`.
    #[serde(default)]
    pub up: bool,
    /// Its sub-pixel (parity) form (needs `up`): the decoders' default for that conv.
    #[serde(default)]
    pub parity: bool,
}

impl ConvLayer {
    /// Floating-point operations of one launch (the parity form: 4 taps per output, not 9).
    pub fn flops(&self) -> f64 {
        let taps = if self.parity { 4 } else { 9 };
        2.0 * (self.h * self.w * self.cout * self.cin * self.sources * taps) as f64
    }
}

/// What every probe child of one tune is given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeSpec {
    /// Device ordinal.
    pub device: usize,
    /// Run on the emulated device (tests).
    pub emulate: bool,
    /// The attention problem.
    pub attention: AttnShape,
    /// The conv layers.
    pub convs: Vec<ConvLayer>,
    /// Timed launches per measurement (the median counts), after one warm-up.
    pub reps: usize,
    /// The attention variant the split candidates run with (the attention family's winner).
    pub split_tile: String,
}

/// How a candidate fared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Ran, within [`TOLERANCE`] of the reference.
    Ok,
    /// Ran, outside the tolerance (or not finite): never chosen.
    Differs,
    /// The child failed (an error, a fault, a non-zero exit).
    Failed,
    /// The child did not finish within the timeout (killed).
    Hung,
}

impl Outcome {
    /// `ok`, `differs`, `failed`, `hung`.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Differs => "differs",
            Outcome::Failed => "failed",
            Outcome::Hung => "hung",
        }
    }
}

/// One candidate's measurement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// How it fared.
    pub outcome: Outcome,
    /// Median milliseconds of one launch (of all the conv layers together).
    #[serde(default)]
    pub ms: Option<f64>,
    /// TFLOP/s at that median.
    #[serde(default)]
    pub tflops: Option<f64>,
    /// The largest relative error against the reference ([`max_rel_err`]; the largest over the
    /// conv layers).
    #[serde(default)]
    pub err: Option<f64>,
    /// Why it failed or hung.
    #[serde(default)]
    pub message: Option<String>,
}

impl ProbeResult {
    /// A failure with `message`.
    pub fn failed(message: impl Into<String>) -> ProbeResult {
        ProbeResult {
            outcome: Outcome::Failed,
            ms: None,
            tflops: None,
            err: None,
            message: Some(message.into()),
        }
    }
}

/// A test fault `BC_TUNE_TEST_FAULT` asks of `family=candidate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Hang,
    Fail,
    Wrong,
    Linger,
}

fn test_fault(family: Family, candidate: &str) -> Option<Fault> {
    let v = std::env::var("BC_TUNE_TEST_FAULT").ok()?;
    let target = format!("{}={candidate}", family.name());
    v.split(',').find_map(|f| {
        let (kind, what) = f.trim().split_once(':')?;
        (what.trim() == target).then_some(())?;
        match kind.trim() {
            "hang" => Some(Fault::Hang),
            "fail" => Some(Fault::Fail),
            "wrong" => Some(Fault::Wrong),
            "linger" => Some(Fault::Linger),
            _ => None,
        }
    })
}

/// Measures `candidate` of `family` on the device `spec` names (see the module docs). An
/// error (a launch that faults, a device that does not open) is a [`Outcome::Failed`] result;
/// the caller exits non-zero for it.
pub fn run_probe(family: Family, candidate: &str, spec: &ProbeSpec) -> ProbeResult {
    let fault = test_fault(family, candidate);
    if fault == Some(Fault::Hang) {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
    if fault == Some(Fault::Fail) {
        return ProbeResult::failed("BC_TUNE_TEST_FAULT: injected failure");
    }
    if fault == Some(Fault::Linger) {
        let mut c = std::process::Command::new("sleep");
        c.arg("20").stdin(std::process::Stdio::null());
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut c, 0);
        if let Err(e) = c.spawn() {
            return ProbeResult::failed(format!("BC_TUNE_TEST_FAULT: linger: {e}"));
        }
    }
    let r = (|| -> Result<(f64, f64, f64)> {
        let mut gpu = if spec.emulate {
            Gpu::open_emulated()?
        } else {
            Gpu::open_kernels(spec.device)?
        };
        let perturb = fault == Some(Fault::Wrong);
        match family {
            Family::Attention => {
                let tile = AttentionTile::wgmma_variant(Some(candidate)).map_err(Error::invalid)?;
                attention_probe(&mut gpu, spec, tile, None, perturb)
            }
            Family::Split => {
                let tile =
                    AttentionTile::wgmma_variant(Some(&spec.split_tile)).map_err(Error::invalid)?;
                let force = match candidate {
                    "auto" => None,
                    n => Some(n.parse::<usize>().map_err(|_| {
                        Error::invalid(format!("split candidate {n:?} is not auto or a number"))
                    })?),
                };
                attention_probe(&mut gpu, spec, tile, force, perturb)
            }
            Family::Conv => {
                let (ws, halo) = conv_candidate(candidate);
                conv_probe(&mut gpu, spec, ws, halo, perturb)
            }
        }
    })();
    match r {
        Ok((ms, flops, err)) => ProbeResult {
            outcome: if err < TOLERANCE {
                Outcome::Ok
            } else {
                Outcome::Differs
            },
            ms: Some(ms),
            tflops: Some(flops / (ms * 1e-3) / 1e12),
            err: Some(err),
            message: None,
        },
        Err(e) => ProbeResult::failed(e.to_string()),
    }
}

/// A seed that differs from run to run (fresh inputs for every child).
fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ ((std::process::id() as u64) << 32)
}

/// Allocates `elems` bf16 values, filled with normal values times `scale` (a pattern of at
/// most 2^22 values, repeated by device copies).
fn random_bf16(gpu: &mut Gpu, elems: usize, scale: f32, rng: &mut Rng) -> Result<DevPtr> {
    let p = gpu.alloc(elems.max(1) * 2)?;
    let n = elems.clamp(1, 1 << 22);
    let pattern: Vec<bf16> = (0..n)
        .map(|_| bf16::from_f32(rng.normal() * scale))
        .collect();
    gpu.upload(p, &pattern)?;
    let mut off = n;
    while off < elems {
        let k = n.min(elems - off);
        gpu.copy(p + (off * 2) as u64, p, k * 2)?;
        off += k;
    }
    Ok(p)
}

/// Downloads `n` bf16 values as f32.
fn download_f32(gpu: &Gpu, p: DevPtr, n: usize) -> Result<Vec<f32>> {
    let mut v = vec![bf16::ZERO; n];
    gpu.download(&mut v, p)?;
    Ok(v.into_iter().map(f32::from).collect())
}

/// The largest relative error of an element of `got` against `want`, as the GPU tests
/// measure it (tests/cuda.rs `check_floor`): `|got - want| / (|want| + floor * rms(want))`;
/// infinite when `got` is not finite or the lengths differ. `floor` 1.0 for the attention
/// (its bf16 probabilities add noise of about 1e-2 of the output's RMS everywhere), 0.05
/// elsewhere. An error when the reference itself is not finite.
pub fn max_rel_err(want: &[f32], got: &[f32], floor: f64) -> Result<f64> {
    if want.iter().any(|v| !v.is_finite()) {
        return Err(Error::Device("the reference output is not finite".into()));
    }
    if want.len() != got.len() || got.iter().any(|v| !v.is_finite()) {
        return Ok(f64::INFINITY);
    }
    let rms =
        (want.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / want.len().max(1) as f64).sqrt();
    Ok(want.iter().zip(got).fold(0.0f64, |worst, (&w, &g)| {
        let e = (g as f64 - w as f64).abs() / (w.abs() as f64 + floor * rms).max(1e-30);
        worst.max(e)
    }))
}

/// The median of `reps` timed runs of `f` (after one warm-up), in milliseconds.
fn time_ms(gpu: &Gpu, reps: usize, f: &dyn Fn() -> Result<()>) -> Result<f64> {
    f()?;
    let (a, b) = (gpu.event()?, gpu.event()?);
    let mut ms = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        gpu.record(&a)?;
        f()?;
        gpu.record(&b)?;
        ms.push(gpu.elapsed_ms(&a, &b)? as f64);
    }
    gpu.sync()?;
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

/// Times `tile` (key splits `force`, `None`: the wave-fill model) on [`ProbeSpec::attention`]
/// against `pp_k128` with the model's splits: (median ms, FLOPs, largest relative error).
fn attention_probe(
    gpu: &mut Gpu,
    spec: &ProbeSpec,
    tile: AttentionTile,
    force: Option<usize>,
    perturb: bool,
) -> Result<(f64, f64, f64)> {
    let s = &spec.attention;
    let dim = s.heads * s.head_dim;
    let mut rng = Rng::new(fresh_seed());
    let q = random_bf16(gpu, s.q_rows * dim, 1.0, &mut rng)?;
    let k = random_bf16(gpu, s.keys * dim, 1.0, &mut rng)?;
    let v = random_bf16(gpu, s.keys * dim, 1.0, &mut rng)?;
    let (out_ref, out) = (
        gpu.alloc(s.q_rows * dim * 2)?,
        gpu.alloc(s.q_rows * dim * 2)?,
    );
    let (segments, seg_index, groups) = (
        gpu.alloc(std::mem::size_of::<BcKvSegment>())?,
        gpu.alloc(4)?,
        gpu.alloc(std::mem::size_of::<BcAttnGroup>())?,
    );
    let as_i32 = |n: usize| {
        i32::try_from(n).map_err(|_| Error::invalid(format!("{n} does not fit the kernels")))
    };
    gpu.upload(
        segments,
        &[BcKvSegment {
            k: k as usize as *const _,
            v: v as usize as *const _,
            tokens: as_i32(s.keys)?,
            _pad: 0,
        }],
    )?;
    gpu.upload(seg_index, &[0i32])?;
    gpu.upload(
        groups,
        &[BcAttnGroup {
            q_begin: 0,
            q_rows: as_i32(s.q_rows)?,
            seg_begin: 0,
            seg_count: 1,
        }],
    )?;
    let reference = AttentionTile::WgmmaPpK128;
    let scratch_bytes = [reference, tile]
        .iter()
        .filter_map(|&t| {
            launch::attention_split_bytes(
                s.heads,
                s.head_dim,
                1,
                s.q_rows,
                t,
                launch::ATTN_MAX_SPLITS,
            )
        })
        .max()
        .unwrap_or(0);
    let scratch = gpu.alloc(scratch_bytes.max(16))?;
    let split = |force| SplitScratch {
        ptr: scratch,
        bytes: scratch_bytes,
        max_keys: s.keys,
        force,
    };
    let run = |t: AttentionTile, o: DevPtr, force: Option<usize>| -> Result<()> {
        ops::attention(
            gpu,
            q,
            o,
            s.heads,
            s.head_dim,
            segments,
            seg_index,
            groups,
            1,
            s.q_rows,
            t,
            Some(&split(force)),
        )
        .map(|_| ())
    };
    run(reference, out_ref, None)?;
    gpu.sync()?;
    let want = download_f32(gpu, out_ref, s.q_rows * dim)?;
    let ms = time_ms(gpu, spec.reps, &|| run(tile, out, force))?;
    let mut got = download_f32(gpu, out, s.q_rows * dim)?;
    if perturb {
        got.iter_mut().for_each(|x| *x *= 1.25);
    }
    Ok((ms, s.flops(), max_rel_err(&want, &got, 1.0)?))
}

/// The launch a conv candidate makes of the base wgmma conv's launch `l`: the persistent halo
/// conv (`ctas` blocks at most) where it fits and `halo` is on, else with `ws` the
/// warp-specialized conv, else `l`. `counter`: the halo conv's zeroed tile counter pair
/// (`BcConvParams::tile_counter`; every launch leaves it zero).
fn conv_candidate_launch(
    l: launch::Launch<crate::kernels::params::BcConvParams>,
    ws: bool,
    halo: bool,
    ctas: u32,
    counter: *mut u32,
) -> crate::kernels::LaunchResult<launch::Launch<crate::kernels::params::BcConvParams>> {
    if halo && launch::conv_halo_fits(&l) {
        launch::conv_halo(l, ctas, counter)
    } else if ws {
        launch::conv_ws(l)
    } else {
        Ok(l)
    }
}

/// Times the conv layers of `spec` on the wgmma conv, warp-specialized with `ws`, with the
/// persistent halo conv for the layers that fit it with `halo`, against the base wgmma conv:
/// (the layers' median ms summed, their FLOPs, the largest relative error of any layer).
fn conv_probe(
    gpu: &mut Gpu,
    spec: &ProbeSpec,
    ws: bool,
    halo: bool,
    perturb: bool,
) -> Result<(f64, f64, f64)> {
    let mut rng = Rng::new(fresh_seed());
    let (mut total_ms, mut flops, mut worst) = (0.0, 0.0, 0.0f64);
    let counter = gpu.alloc(8)?;
    gpu.memset(counter, 0, 8)?;
    let counter = counter as usize as *mut u32;
    for layer in &spec.convs {
        let px = layer.h * layer.w;
        let src_px = if layer.up { px / 4 } else { px };
        let mut srcs = Vec::with_capacity(layer.sources);
        for i in 0..layer.sources {
            let x = random_bf16(gpu, src_px * layer.cin, 1.0, &mut rng)?;
            srcs.push(ConvSource {
                x: x as usize as *const _,
                channels: layer.cin,
                stride: layer.cin,
                c0: if layer.time_taps { 0 } else { i * layer.cin },
                t: if layer.time_taps { i } else { 0 },
                up: layer.up,
            });
        }
        let shape = if layer.time_taps {
            ConvShape::new(layer.cout, layer.cin, layer.sources, 3, 3)
        } else {
            ConvShape {
                parity: layer.parity,
                ..ConvShape::new(layer.cout, layer.cin * layer.sources, 1, 3, 3)
            }
        };
        let fan_in = (shape.weight_len() / layer.cout.max(1)).max(1) as f32;
        let w = random_bf16(gpu, shape.weight_len(), fan_in.sqrt().recip(), &mut rng)?;
        let bias: Vec<f32> = (0..layer.cout).map(|_| rng.normal() * 0.1).collect();
        let b = gpu.alloc(layer.cout * 4)?;
        gpu.upload(b, &bias)?;
        let (out_ref, out) = (
            gpu.alloc(px * layer.cout * 2)?,
            gpu.alloc(px * layer.cout * 2)?,
        );
        let base = |o: DevPtr| {
            launch::conv_on(
                &srcs,
                w as usize as *const _,
                shape,
                (layer.h, layer.w),
                ConvEpilogue {
                    bias: b as usize as *const f32,
                    res: std::ptr::null(),
                    res_stride: 0,
                    act: BC_ACT_NONE,
                },
                ConvOut {
                    out: o as usize as *mut _,
                    f32: false,
                    stride: layer.cout,
                    split: layer.cout,
                    frame_stride: px * layer.cout,
                    cstride: 1,
                    frames: 1,
                },
                true,
            )
        };
        let ctas = u32::try_from(gpu.sm_count()).unwrap_or(1).max(1);
        let candidate = |o: DevPtr| conv_candidate_launch(base(o)?, ws, halo, ctas, counter);
        ops::run(gpu, base(out_ref))?;
        gpu.sync()?;
        let want = download_f32(gpu, out_ref, px * layer.cout)?;
        total_ms += time_ms(gpu, spec.reps, &|| ops::run(gpu, candidate(out)))?;
        let mut got = download_f32(gpu, out, px * layer.cout)?;
        if perturb {
            got.iter_mut().for_each(|x| *x *= 1.25);
        }
        worst = worst.max(max_rel_err(&want, &got, 0.05)?);
        flops += layer.flops();
    }
    Ok((total_ms, flops, worst))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Kernel;

    #[test]
    fn the_error_is_the_gpu_tests_max_relative_error() {
        let want = [1.0f32, -2.0, 0.0, 4.0];
        assert_eq!(max_rel_err(&want, &want, 0.05).unwrap(), 0.0);
        // rms 2.29: element 2 (want 0) off by 0.01 -> 0.01 / (0 + 0.05 * 2.29).
        let got = [1.0f32, -2.0, 0.01, 4.0];
        let e = max_rel_err(&want, &got, 0.05).unwrap();
        assert!((e - 0.01 / (0.05 * 2.2913)).abs() < 1e-3, "{e}");
        assert!(max_rel_err(&want, &[1.0, -2.0, f32::NAN, 4.0], 1.0)
            .unwrap()
            .is_infinite());
        assert!(max_rel_err(&want, &got[..3], 1.0).unwrap().is_infinite());
        assert!(max_rel_err(&[f32::INFINITY], &[1.0], 1.0).is_err());
    }

    /// The conv candidates really launch their kernels on the layers tuned: the halo conv on
    /// TAEHV's two 64-channel layers (real and tiny), the warp-specialized conv on the others.
    #[test]
    fn conv_candidates_launch_the_halo_and_ws_kernels() {
        let (_, tiny) = super::super::tiny_spec();
        for layer in super::super::real_convs().iter().chain(&tiny) {
            let src = |i: usize| ConvSource {
                x: (0x10000 * (i + 1)) as *const _,
                channels: layer.cin,
                stride: layer.cin,
                c0: if layer.time_taps { 0 } else { i * layer.cin },
                t: if layer.time_taps { i } else { 0 },
                up: false,
            };
            let srcs: Vec<ConvSource> = (0..layer.sources).map(src).collect();
            let shape = if layer.time_taps {
                ConvShape::new(layer.cout, layer.cin, layer.sources, 3, 3)
            } else {
                ConvShape::new(layer.cout, layer.cin * layer.sources, 1, 3, 3)
            };
            let base = launch::conv_on(
                &srcs,
                0x100000 as *const _,
                shape,
                (layer.h, layer.w),
                ConvEpilogue {
                    bias: 0x200000 as *const f32,
                    res: std::ptr::null(),
                    res_stride: 0,
                    act: BC_ACT_NONE,
                },
                ConvOut {
                    out: 0x300000 as *mut _,
                    f32: false,
                    stride: layer.cout,
                    split: layer.cout,
                    frame_stride: layer.h * layer.w * layer.cout,
                    cstride: 1,
                    frames: 1,
                },
                true,
            )
            .unwrap();
            let k = |ws, halo| {
                conv_candidate_launch(base, ws, halo, 132, 0x400000 as *mut u32)
                    .unwrap()
                    .kernel
            };
            let taehv = layer.cout == 64;
            assert_eq!(
                k(false, true) == Kernel::ConvHaloN64,
                taehv,
                "{}: halo",
                layer.name
            );
            assert!(
                matches!(
                    k(true, false),
                    Kernel::ConvWgmmaWs | Kernel::ConvWgmmaWsN96 | Kernel::ConvWgmmaWsN64
                ),
                "{}: ws",
                layer.name
            );
            assert_eq!(k(false, false), base.kernel, "{}: base", layer.name);
        }
    }
}
