//! Tensor maps for TMA loads (`cuda/include/tma.cuh`): one validation for both paths
//! ([`TensorMapSpec::validate`]), then the driver's `cuTensorMapEncodeTiled` on a GPU or the
//! emulation's own encoding ([`TensorMapSpec::encode_emulated`]) on an emulated device.

use super::{DevPtr, Driver, Emulated, Gpu};
use crate::kernels::params::BcTensorMap;
use crate::kernels::tma::{TensorMapSpec, TmaSwizzle};
use crate::{Error, Result};
use cudarc::driver::sys;

impl Gpu {
    /// The tensor map of `spec` for the tensor at `addr` (a device pointer; a host one on an
    /// emulated device), to pass inside a kernel's params: refused (one clear error) when the
    /// spec breaks a driver rule, or the driver refuses it.
    pub fn encode_tensor_map(&self, spec: &TensorMapSpec, addr: DevPtr) -> Result<BcTensorMap> {
        spec.validate(addr)
            .map_err(|e| Error::InvalidArgument(format!("tensor map: {e}")))?;
        match &self.imp {
            Emulated(_) => spec
                .encode_emulated(addr)
                .map_err(|e| Error::InvalidArgument(format!("tensor map: {e}"))),
            Driver(d) => {
                d.bind()?;
                encode_driver(spec, addr)
            }
        }
    }
}

/// `cuTensorMapEncodeTiled` of a validated spec: raw unsigned elements of its size (the bytes
/// are copied as they are; out-of-bound elements read as zero), interleave none, no L2
/// promotion, zero fill.
fn encode_driver(spec: &TensorMapSpec, addr: DevPtr) -> Result<BcTensorMap> {
    use sys::CUtensorMapDataType_enum as T;
    use sys::CUtensorMapSwizzle_enum as S;
    let dtype = match spec.elem_bytes {
        1 => T::CU_TENSOR_MAP_DATA_TYPE_UINT8,
        2 => T::CU_TENSOR_MAP_DATA_TYPE_UINT16,
        4 => T::CU_TENSOR_MAP_DATA_TYPE_UINT32,
        _ => T::CU_TENSOR_MAP_DATA_TYPE_UINT64,
    };
    let swizzle = match spec.swizzle {
        TmaSwizzle::None => S::CU_TENSOR_MAP_SWIZZLE_NONE,
        TmaSwizzle::B32 => S::CU_TENSOR_MAP_SWIZZLE_32B,
        TmaSwizzle::B64 => S::CU_TENSOR_MAP_SWIZZLE_64B,
        TmaSwizzle::B128 => S::CU_TENSOR_MAP_SWIZZLE_128B,
    };
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    // SAFETY: the arrays hold `rank` (strides: rank - 1) values, as the spec validated; `map` is
    // 64-byte aligned (CUtensorMap's own alignment).
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            dtype,
            spec.rank() as u32,
            addr as *mut std::ffi::c_void,
            spec.dims.as_ptr(),
            spec.strides.as_ptr(),
            spec.box_dims.as_ptr(),
            spec.element_strides.as_ptr(),
            sys::CUtensorMapInterleave_enum::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            sys::CUtensorMapL2promotion_enum::CU_TENSOR_MAP_L2_PROMOTION_NONE,
            sys::CUtensorMapFloatOOBfill_enum::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::Device(format!(
            "cuTensorMapEncodeTiled: {r:?} for {spec:?}"
        )));
    }
    Ok(BcTensorMap { opaque: map.opaque })
}
