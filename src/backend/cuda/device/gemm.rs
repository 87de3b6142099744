//! cuBLASLt GEMMs on the driver device: plans per shape and fused epilogue, the workspace.

use super::driver::{lt_err, DriverDevice};
use crate::backend::cuda::dev_types::{Epilogue, GemmArgs, OutType};
use crate::{Error, Result};
use cudarc::cublaslt::{result as lt, sys as ltsys};
use std::ffi::c_void;

pub(super) struct GemmPlan {
    /// Whether a `cublasLtMatmul` with this plan succeeded (the first one runs eagerly, in the
    /// warm-up; a fused plan whose first run fails is dropped, see `DriverDevice::gemm`).
    ran: bool,
    desc: ltsys::cublasLtMatmulDesc_t,
    a: ltsys::cublasLtMatrixLayout_t,
    b: ltsys::cublasLtMatrixLayout_t,
    d: ltsys::cublasLtMatrixLayout_t,
    algo: ltsys::cublasLtMatmulAlgo_t,
}

/// Destroys a plan's cuBLASLt handles (null ones skipped).
pub(super) fn destroy_plan(p: &GemmPlan) {
    // SAFETY: every non-null handle was created for this plan and is destroyed once (plans
    // are destroyed when dropped from `DriverDevice::plans` or when their construction fails).
    unsafe {
        for l in [p.a, p.b, p.d] {
            if !l.is_null() {
                let _ = lt::destroy_matrix_layout(l);
            }
        }
        if !p.desc.is_null() {
            let _ = lt::destroy_matmul_desc(p.desc);
        }
    }
}

/// Size of the cuBLASLt workspace.
pub const GEMM_WORKSPACE: usize = 32 << 20;

/// Longest bias (output width) a fused bf16-output GEMM takes: its f32 bias is converted into a
/// scratch vector of this many bf16 values first. cuBLASLt refuses an f32 bias with a bf16
/// output (CUBLAS_STATUS_INVALID_VALUE for every Wan shape on the first GPU run, H200 with
/// cuBLASLt 13.1: all 39 bias GEMMs ran their epilogue as a separate kernel); wider outputs run
/// the epilogue as a kernel.
pub const BIAS_BF16_ELEMS: usize = 1 << 16;

/// Whether a fused epilogue `ep` with output type `ty` and `out` columns needs a bf16 bias
/// wider than the scratch vector ([`BIAS_BF16_ELEMS`]): then the GEMM runs plain and its
/// epilogue as a kernel. One rule for the GPU and the emulated device, so the emulation
/// rounds exactly where the GPU does (bf16(acc) + f32 bias in `bc_activation`, not
/// acc + bf16(bias) in cuBLASLt).
pub(super) fn bias_too_wide(ty: OutType, ep: Epilogue, out: usize) -> bool {
    ty == OutType::Bf16 && ep != Epilogue::None && out > BIAS_BF16_ELEMS
}

/// GEMM shapes whose fused cuBLASLt epilogue had no algorithm (bias / GELU run as a kernel).
pub(super) static UNFUSED_GEMM_SHAPES: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// How many times (per device and GEMM shape, in this process) a fused cuBLASLt epilogue
/// could not be planned (no algorithm, or the bias type / epilogue refused), so that shape runs
/// its bias and/or GELU as a separate kernel.
pub fn unfused_gemm_shapes() -> usize {
    UNFUSED_GEMM_SHAPES.load(std::sync::atomic::Ordering::Relaxed)
}

/// The next epilogue to try when `ep` cannot be fused: GELU+bias, then bias, then none.
fn less_fused(ep: Epilogue) -> Epilogue {
    match ep {
        Epilogue::GeluBias => Epilogue::Bias,
        _ => Epilogue::None,
    }
}

impl DriverDevice {
    /// `a` with as much of its epilogue (`a.ep`: bias, GELU) fused into cuBLASLt's as it has
    /// an algorithm for: without one for GELU+bias, bias alone, then a plain GEMM. Returns the
    /// epilogue that ran. A shape whose fused plan fails is remembered (counted in
    /// [`unfused_gemm_shapes`]); plans are made on the first call of a shape, which is always
    /// an eager warm-up launch, never inside a graph capture. A fused plan whose first
    /// `cublasLtMatmul` fails (cuBLASLt planned what it then refuses to run) is dropped the
    /// same way and the call falls back to less fusion: a fused plan that ran once is kept.
    pub(super) fn gemm(&mut self, a: GemmArgs) -> Result<Epilogue> {
        if self.lt.is_null() {
            return Err(Error::Device(
                "cuBLASLt was not loaded (device opened for kernels only): GEMMs need libcublasLt.so.13".into(),
            ));
        }
        self.debug_assert_current("cublasLtMatmul");
        let mut fused = a.ep;
        // A bf16 output takes a bf16 bias: too wide for the scratch vector, no fusion.
        let bf16_bias = a.ty == OutType::Bf16;
        if bias_too_wide(a.ty, fused, a.out) {
            if let std::collections::hash_map::Entry::Vacant(e) =
                self.plans.entry((a.rows, a.inp, a.out, a.ty, fused))
            {
                e.insert(None);
                UNFUSED_GEMM_SHAPES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            fused = Epilogue::None;
        }
        loop {
            while fused != Epilogue::None
                && self.plan_for(a.rows, a.inp, a.out, a.ty, fused)?.is_none()
            {
                fused = less_fused(fused);
            }
            let key = (a.rows, a.inp, a.out, a.ty, fused);
            let first = self
                .plans
                .get(&key)
                .and_then(Option::as_ref)
                .is_some_and(|p| !p.ran);
            let mut call = GemmArgs { ep: fused, ..a }.bias_if_used();
            if bf16_bias && fused != Epilogue::None {
                // The f32 bias to the bf16 scratch vector, on the GEMM's stream (ordered
                // before it; captured into graphs with it).
                let l = crate::kernels::launch::f32_to_bf16(
                    a.bias as *const f32,
                    self.bias_bf16 as *mut c_void,
                    a.out,
                )
                .map_err(|e| Error::Internal(format!("{}: {}", e.kernel, e.message)))?;
                // SAFETY: `a.bias` holds `a.out` f32 values (the GEMM's contract), the scratch
                // vector BIAS_BF16_ELEMS >= a.out bf16 values.
                unsafe { self.launch(l.kernel, l.grid, l.block, &l.params)? };
                call.bias = self.bias_bf16;
            }
            match self.matmul(call) {
                Ok(()) => {
                    if let Some(Some(p)) = self.plans.get_mut(&key) {
                        p.ran = true;
                    }
                    return Ok(fused);
                }
                // The warm-up call of a fused plan: drop the plan, run with less fusion.
                Err(e) if first && fused != Epilogue::None => {
                    if let Some(Some(p)) = self.plans.insert(key, None) {
                        destroy_plan(&p);
                    }
                    UNFUSED_GEMM_SHAPES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if std::env::var_os("BC_CUDA_VERBOSE").is_some() {
                        eprintln!("{e}; running the epilogue as a kernel");
                    }
                    fused = less_fused(fused);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The plan of a GEMM shape with a fused epilogue (made on first use; `None` when
    /// cuBLASLt has no algorithm for it). Plain GEMMs (`Epilogue::None`) must have one.
    fn plan_for(
        &mut self,
        rows: usize,
        inp: usize,
        out: usize,
        ty: OutType,
        ep: Epilogue,
    ) -> Result<Option<&GemmPlan>> {
        let key = (rows, inp, out, ty, ep);
        if !self.plans.contains_key(&key) {
            let plan = match self.plan(rows, inp, out, ty, ep) {
                Ok(p) => Some(p),
                Err(e) if ep != Epilogue::None => {
                    UNFUSED_GEMM_SHAPES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if std::env::var_os("BC_CUDA_VERBOSE").is_some() {
                        eprintln!("{e}; running the epilogue as a kernel");
                    }
                    None
                }
                Err(e) => return Err(e),
            };
            self.plans.insert(key, plan);
        }
        Ok(self.plans.get(&key).and_then(Option::as_ref))
    }

    /// One cuBLASLt matmul with epilogue `a.ep` (its plan must exist for a fused epilogue).
    fn matmul(&mut self, a: GemmArgs) -> Result<()> {
        let GemmArgs {
            x,
            w,
            bias,
            d,
            rows,
            inp,
            out,
            ty,
            ep,
        } = a;
        if (x | w | d) % 16 != 0 {
            return Err(Error::Internal(format!(
                "GEMM operands must be 16-byte aligned (x {x:#x}, w {w:#x}, d {d:#x})"
            )));
        }
        let (lt_handle, workspace, stream) = (self.lt, self.workspace, self.stream);
        let p = self.plan_for(rows, inp, out, ty, ep)?.ok_or_else(|| {
            Error::Internal(format!(
                "no cuBLASLt plan for [{rows}x{inp}]x[{inp}x{out}] {ep:?}"
            ))
        })?;
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: the layouts describe x, w, d as the caller promised; the bias pointer is
        // set per call.
        unsafe {
            if ep != Epilogue::None {
                let bp = bias as *const c_void;
                lt::set_matmul_desc_attribute(
                    p.desc,
                    ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &bp as *const _ as *const c_void,
                    std::mem::size_of::<*const c_void>(),
                )
                .map_err(lt_err("cublasLtMatmulDescSetAttribute(bias)"))?;
            }
            lt::matmul(
                lt_handle,
                p.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                w as *const c_void,
                p.a,
                x as *const c_void,
                p.b,
                d as *const c_void,
                p.d,
                d as *mut c_void,
                p.d,
                &p.algo,
                workspace as *mut c_void,
                GEMM_WORKSPACE,
                stream as ltsys::cudaStream_t,
            )
            .map_err(|e| Error::Device(format!("cublasLtMatmul [{rows}x{inp}]x[{inp}x{out}]: {e}")))
        }
    }

    fn plan(
        &self,
        rows: usize,
        inp: usize,
        out: usize,
        ty: OutType,
        ep: Epilogue,
    ) -> Result<GemmPlan> {
        use ltsys::cublasLtMatmulDescAttributes_t as A;
        use ltsys::cudaDataType_t as T;
        let dt = match ty {
            OutType::Bf16 => T::CUDA_R_16BF,
            OutType::F32 => T::CUDA_R_32F,
        };
        // Column-major view: D[out, rows] = W^T(op T of [inp, out]) . X[inp, rows].
        let desc = lt::create_matmul_desc(
            ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            T::CUDA_R_32F,
        )
        .map_err(lt_err("cublasLtMatmulDescCreate"))?;
        // From here on the handles are owned by `plan` and destroyed by `destroy_plan` on
        // every error path.
        let mut plan = GemmPlan {
            ran: false,
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            d: std::ptr::null_mut(),
            algo: ltsys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        let res = (|| -> Result<()> {
            plan.a = lt::create_matrix_layout(T::CUDA_R_16BF, inp as u64, out as u64, inp as i64)
                .map_err(lt_err("cublasLtMatrixLayoutCreate"))?;
            plan.b = lt::create_matrix_layout(T::CUDA_R_16BF, inp as u64, rows as u64, inp as i64)
                .map_err(lt_err("cublasLtMatrixLayoutCreate"))?;
            plan.d = lt::create_matrix_layout(dt, out as u64, rows as u64, out as i64)
                .map_err(lt_err("cublasLtMatrixLayoutCreate"))?;
            let trans: i32 = 1; // CUBLAS_OP_T
            let epi = match ep {
                Epilogue::None => ltsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
                Epilogue::Bias => ltsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
                Epilogue::GeluBias => ltsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS,
            };
            // The bias in the output's type (see BIAS_BF16_ELEMS).
            let bias_ty = dt;
            // SAFETY: valid descriptors, attribute buffers of the documented sizes.
            unsafe {
                let set = |attr: A, p: *const c_void, n: usize| {
                    lt::set_matmul_desc_attribute(desc, attr, p, n)
                        .map_err(lt_err("cublasLtMatmulDescSetAttribute"))
                };
                set(
                    A::CUBLASLT_MATMUL_DESC_TRANSA,
                    &trans as *const i32 as *const c_void,
                    4,
                )?;
                set(
                    A::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    &epi as *const _ as *const c_void,
                    std::mem::size_of_val(&epi),
                )?;
                if ep != Epilogue::None {
                    set(
                        A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                        &bias_ty as *const _ as *const c_void,
                        std::mem::size_of_val(&bias_ty),
                    )?;
                }
                let pref =
                    lt::create_matmul_pref().map_err(lt_err("cublasLtMatmulPreferenceCreate"))?;
                let ws = GEMM_WORKSPACE as u64;
                let h = lt::set_matmul_pref_attribute(
                    pref,
                    ltsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const u64 as *const c_void,
                    8,
                )
                .map_err(lt_err("cublasLtMatmulPreferenceSetAttribute"))
                .and_then(|_| {
                    // Operands are row ranges of larger buffers: 16-byte aligned (rows of a
                    // multiple of 8 bf16), not the 256 bytes cuBLASLt assumes by default.
                    use ltsys::cublasLtMatmulPreferenceAttributes_t as P;
                    let align: u32 = 16;
                    for attr in [
                        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                    ] {
                        lt::set_matmul_pref_attribute(
                            pref,
                            attr,
                            &align as *const u32 as *const c_void,
                            4,
                        )
                        .map_err(lt_err("cublasLtMatmulPreferenceSetAttribute(alignment)"))?;
                    }
                    Ok(())
                })
                .and_then(|_| {
                    lt::get_matmul_algo_heuristic(self.lt, desc, plan.a, plan.b, plan.d, plan.d, pref)
                        .map_err(|e| {
                            Error::Device(format!(
                                "cuBLASLt has no algorithm for bf16 [{rows}x{inp}]x[{inp}x{out}] -> {ty:?} with {ep:?} epilogue: {e}"
                            ))
                        })
                });
                let _ = lt::destroy_matmul_pref(pref);
                plan.algo = h?.algo;
            }
            Ok(())
        })();
        match res {
            Ok(()) => Ok(plan),
            Err(e) => {
                destroy_plan(&plan);
                Err(e)
            }
        }
    }
}
