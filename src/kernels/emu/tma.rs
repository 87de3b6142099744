//! The TMA / mbarrier layout probe `bc_tma_probe` (`cuda/test/tma_probe.cu`) under the
//! emulation, and the params builders the GPU test shares.

use super::super::params::*;
use super::super::tma::{TensorMapSpec, TmaSwizzle};
use super::super::{invalid, Kernel, LaunchResult};
use super::{check_len, run};
use crate::kernels::launch::Launch;
use half::bf16;

/// One raw-mode run of the probe: the tensor map, the two boxes' start coordinates (innermost
/// first; unused dimensions 0) and a deliberate fault (0 or a `BC_TMA_FAULT_*`).
#[doc(hidden)]
#[derive(Clone, Debug)]
pub struct TmaProbeCase {
    /// The tensor and its box.
    pub spec: TensorMapSpec,
    /// Start of box 0 (phase 0) and box 1 (phase 1).
    pub coords: [[i32; 5]; 2],
    /// 0 or a `BC_TMA_FAULT_*`.
    pub fault: i32,
}

impl TmaProbeCase {
    /// A tensor of `rank` (2..=5) dimensions of `elem_bytes`-byte elements and two boxes that
    /// hang over the low (box 0) and the high (box 1) edge of every dimension: box rows of the
    /// swizzle span (48 bytes without swizzle), outer box extents 5, 3, 2, 2, each dimension 2
    /// (the innermost 5) elements longer than the box, rows padded 16 bytes and the rank-3 planes
    /// 32 bytes beyond dense (strides that are not the dense ones).
    pub fn edges(rank: usize, swizzle: TmaSwizzle, elem_bytes: usize) -> Self {
        let inner = if swizzle == TmaSwizzle::None {
            48
        } else {
            swizzle.bytes()
        };
        let box0 = (inner / elem_bytes) as u32;
        let mut dims = vec![box0 as u64 + 5];
        let mut boxes = vec![box0];
        for &b in [5u32, 3, 2, 2].iter().take(rank.saturating_sub(1)) {
            dims.push(b as u64 + 2);
            boxes.push(b);
        }
        let mut strides = Vec::new();
        let mut s = (dims[0] * elem_bytes as u64).div_ceil(16) * 16 + 16;
        for (i, d) in dims.iter().enumerate().skip(1) {
            strides.push(s);
            s = s * d + if i == 1 { 32 } else { 0 };
        }
        let mut coords = [[0i32; 5]; 2];
        for i in 0..dims.len() {
            let over = if i == 0 { 3 } else { 1 };
            coords[0][i] = -over;
            coords[1][i] = dims[i] as i32 - boxes[i] as i32 + over;
        }
        TmaProbeCase {
            spec: TensorMapSpec {
                elem_bytes,
                element_strides: vec![1; dims.len()],
                dims,
                strides,
                box_dims: boxes,
                swizzle,
            },
            coords,
            fault: 0,
        }
    }

    /// The case with its shape changed by `mods` (the bisection of the H200's TMA fault, where
    /// every raw case faulted and the dense wgmma-mode boxes passed; `BC_TMA_ONLY` in
    /// `tests/cuda.rs`): `rows8` makes the boxes' outer extents 8 (only rank 2 fits the probe's
    /// shared memory then), `fit` makes every extent twice its box, `dense` drops the row
    /// padding (rows rounded up to 16 bytes only), `inside` keeps both boxes inside the tensor
    /// (else they overhang every edge, as [`TmaProbeCase::edges`] places them). Unknown words
    /// are ignored.
    pub fn reshaped(mut self, mods: &[&str]) -> Self {
        let has = |m: &str| mods.contains(&m);
        let spec = &mut self.spec;
        let rank = spec.dims.len();
        let eb = spec.elem_bytes as u64;
        if has("rows8") {
            for i in 1..rank {
                spec.box_dims[i] = 8;
                spec.dims[i] = spec.dims[i].max(10);
            }
        }
        if has("fit") {
            for i in 0..rank {
                spec.dims[i] = 2 * spec.box_dims[i] as u64;
            }
        }
        let pad = !has("dense");
        let mut s = (spec.dims[0] * eb).div_ceil(16) * 16 + if pad { 16 } else { 0 };
        spec.strides.clear();
        for i in 1..rank {
            spec.strides.push(s);
            s = s * spec.dims[i] + if pad && i == 1 { 32 } else { 0 };
        }
        for i in 0..rank {
            let (d, b) = (spec.dims[i] as i32, spec.box_dims[i] as i32);
            let over = if has("inside") {
                0
            } else if i == 0 {
                3
            } else {
                1
            };
            self.coords[0][i] = -over;
            self.coords[1][i] = d - b + over;
        }
        self
    }

    /// Bytes of the tensor the map describes (the last dimension's stride times its extent).
    pub fn tensor_bytes(&self) -> usize {
        let s = &self.spec;
        let last = s.strides.last().copied().unwrap_or(s.elem_bytes as u64);
        (last * s.dims.last().copied().unwrap_or(1)) as usize
    }

    /// What the probe must return for `tensor`: the CPU model of both boxes.
    pub fn expected(&self, tensor: &[u8]) -> Vec<u8> {
        let mut w = self.spec.load_box(tensor, &self.coords[0]);
        w.extend(self.spec.load_box(tensor, &self.coords[1]));
        w
    }
}

/// Runs the probe (one warpgroup, one block) with `p`.
fn run_probe(p: BcTmaProbeParams) -> LaunchResult {
    run(Ok(Launch {
        kernel: Kernel::TmaProbe,
        grid: [1, 1, 1],
        block: BC_TMA_PROBE_THREADS,
        params: p,
    }))
}

fn check_fault(k: Kernel, fault: i32) -> LaunchResult {
    if !(0..=BC_TMA_FAULT_COORD as i32).contains(&fault) {
        return Err(invalid(k, format!("fault = {fault}: not a BC_TMA_FAULT_*")));
    }
    Ok(())
}

/// Params of a raw-mode probe run with `map` (the case's spec encoded for the device or the
/// emulation) writing `2 * box_bytes` bytes to `out`.
#[doc(hidden)]
pub fn tma_probe_params(
    map: BcTensorMap,
    case: &TmaProbeCase,
    out: *mut u8,
) -> LaunchResult<BcTmaProbeParams> {
    let k = Kernel::TmaProbe;
    check_fault(k, case.fault)?;
    let rank = case.spec.rank();
    if !(2..=5).contains(&rank) {
        return Err(invalid(
            k,
            format!("rank {rank}: the probe loads ranks 2..=5"),
        ));
    }
    let bytes = case.spec.box_bytes();
    if bytes > BC_TMA_PROBE_MAX_BOX as usize || bytes % 16 != 0 {
        return Err(invalid(
            k,
            format!("box of {bytes} bytes: at most {BC_TMA_PROBE_MAX_BOX}, a multiple of 16"),
        ));
    }
    Ok(BcTmaProbeParams {
        map,
        map_b: BcTensorMap { opaque: [0; 16] },
        coords: case.coords,
        rank: rank as i32,
        box_bytes: bytes as i32,
        mode: 0,
        swizzle: case.spec.swizzle.wgmma_code(),
        fault: case.fault,
        out,
        c: std::ptr::null_mut(),
        map_global: std::ptr::null(),
    })
}

/// The spec of the wgmma mode's tiles: `[64][64]` bf16, boxes `{E, 64}` (E = 8 without
/// swizzle, half the span with one).
#[doc(hidden)]
pub fn tma_probe_wgmma_spec(swizzle: TmaSwizzle) -> TensorMapSpec {
    let e = match swizzle {
        TmaSwizzle::None => 8,
        s => s.bytes() as u32 / 2,
    };
    TensorMapSpec::dense(2, &[64, 64], &[e, 64], swizzle)
}

/// Params of a wgmma-mode probe run: A and B through `map_a`, `map_b` (both
/// [`tma_probe_wgmma_spec`] of the map's swizzle), the boxes and descriptors in the layout of
/// `swizzle` (normally the maps'; another one is a deliberate mismatch), `c[64][64]` out.
#[doc(hidden)]
pub fn tma_probe_wgmma_params(
    map_a: BcTensorMap,
    map_b: BcTensorMap,
    swizzle: TmaSwizzle,
    fault: i32,
    c: *mut f32,
) -> LaunchResult<BcTmaProbeParams> {
    check_fault(Kernel::TmaProbe, fault)?;
    Ok(BcTmaProbeParams {
        map: map_a,
        map_b,
        coords: [[0; 5]; 2],
        rank: 2,
        box_bytes: 0,
        mode: 1,
        swizzle: swizzle.wgmma_code(),
        fault,
        out: std::ptr::null_mut(),
        c,
        map_global: std::ptr::null(),
    })
}

/// Runs the raw mode under the emulation on `tensor` (the bytes the map describes): the two
/// boxes' shared-memory bytes as they landed.
#[doc(hidden)]
pub fn tma_probe(tensor: &[u8], case: &TmaProbeCase) -> LaunchResult<Vec<u8>> {
    raw_probe(tensor, case, false)
}

/// [`tma_probe`] with the loads reading a copy of the map in other memory
/// (`BcTmaProbeParams::map_global`), the parameter's own map zeroed: the same bytes must land.
#[doc(hidden)]
pub fn tma_probe_global_map(tensor: &[u8], case: &TmaProbeCase) -> LaunchResult<Vec<u8>> {
    raw_probe(tensor, case, true)
}

/// The raw mode under the emulation, the map in the params or (`global`) behind `map_global`.
fn raw_probe(tensor: &[u8], case: &TmaProbeCase, global: bool) -> LaunchResult<Vec<u8>> {
    let k = Kernel::TmaProbe;
    let map = case
        .spec
        .encode_emulated(tensor.as_ptr() as u64)
        .map_err(|e| invalid(k, e))?;
    check_len(k, "tensor", tensor.len(), case.tensor_bytes())?;
    let mut out = vec![0xa5u8; 2 * case.spec.box_bytes()];
    let elsewhere = Box::new(map);
    let p = if global {
        let mut p = tma_probe_params(BcTensorMap { opaque: [0; 16] }, case, out.as_mut_ptr())?;
        p.map_global = &*elsewhere;
        p
    } else {
        tma_probe_params(map, case, out.as_mut_ptr())?
    };
    run_probe(p)?;
    Ok(out)
}

/// Runs the wgmma mode under the emulation: `c = a . b^T` (both `[64][64]` bf16) with A and B
/// loaded by TMA as boxes of the layout of `swizzle`; `map_swizzle` is the swizzle mode the
/// maps are encoded with (differing: a deliberate mismatch). `c` starts as NaN.
#[doc(hidden)]
pub fn tma_probe_wgmma(
    a: &[bf16],
    b: &[bf16],
    swizzle: TmaSwizzle,
    map_swizzle: TmaSwizzle,
    fault: i32,
) -> LaunchResult<Vec<f32>> {
    let k = Kernel::TmaProbe;
    check_len(k, "a", a.len(), 64 * 64)?;
    check_len(k, "b", b.len(), 64 * 64)?;
    // The boxes of `swizzle`'s layout, encoded with the map's own swizzle mode.
    let spec = TensorMapSpec {
        swizzle: map_swizzle,
        ..tma_probe_wgmma_spec(swizzle)
    };
    let enc = |p: &[bf16]| {
        spec.encode_emulated(p.as_ptr() as u64)
            .map_err(|e| invalid(k, e))
    };
    let mut c = vec![f32::NAN; 64 * 64];
    let p = tma_probe_wgmma_params(enc(a)?, enc(b)?, swizzle, fault, c.as_mut_ptr())?;
    run_probe(p)?;
    Ok(c)
}
