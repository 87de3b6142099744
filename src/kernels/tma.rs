//! Tensor maps for the Hopper tensor memory accelerator (TMA): what a kernel's
//! `cp.async.bulk.tensor` reads to know a tensor's shape and the box it copies.
//!
//! [`TensorMapSpec`] holds the arguments of the driver's `cuTensorMapEncodeTiled` (tile mode)
//! and checks them against the driver's documented rules, once, for both paths: on a GPU the
//! backend hands them to the driver (`backend::cuda::device::encode_tensor_map`), under the
//! emulation [`TensorMapSpec::encode_emulated`] writes them into the same 128-byte
//! [`BcTensorMap`] as a [`BcEmuTensorMap`]. [`TensorMapSpec::load_box`] is the CPU model of
//! one tile-mode load (what lands in shared memory, byte for byte), the reference the probe
//! tests compare with.

use super::params::{BcEmuTensorMap, BcTensorMap, BC_EMU_TENSOR_MAP_MAGIC};

/// Shared-memory swizzle of a tensor map (the driver's `CUtensorMapSwizzle`, the modes wgmma's
/// descriptors read too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TmaSwizzle {
    /// Rows as they are.
    None,
    /// 16-byte chunks XOR address bit 7 (32-byte span).
    B32,
    /// 16-byte chunks XOR address bits 7-8 (64-byte span).
    B64,
    /// 16-byte chunks XOR address bits 7-9 (128-byte span).
    B128,
}

impl TmaSwizzle {
    /// The span in bytes (0 without swizzle).
    pub fn bytes(self) -> usize {
        match self {
            TmaSwizzle::None => 0,
            TmaSwizzle::B32 => 32,
            TmaSwizzle::B64 => 64,
            TmaSwizzle::B128 => 128,
        }
    }

    /// The wgmma descriptor's code for the same layout (`BC_WGMMA_SWIZZLE_*`).
    pub fn wgmma_code(self) -> i32 {
        match self {
            TmaSwizzle::None => 0,
            TmaSwizzle::B128 => 1,
            TmaSwizzle::B64 => 2,
            TmaSwizzle::B32 => 3,
        }
    }

    /// Every mode.
    pub const ALL: [TmaSwizzle; 4] = [
        TmaSwizzle::None,
        TmaSwizzle::B32,
        TmaSwizzle::B64,
        TmaSwizzle::B128,
    ];
}

/// The arguments of `cuTensorMapEncodeTiled` this project uses (interleave none, no L2
/// promotion, zero fill out of bounds). Dimension 0 is the innermost (contiguous) one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorMapSpec {
    /// Bytes per element: 1, 2 (bf16), 4 (f32) or 8.
    pub elem_bytes: usize,
    /// Extents of the `rank` dimensions (1..=5).
    pub dims: Vec<u64>,
    /// Bytes between consecutive indices of dimensions 1..rank (rank - 1 values).
    pub strides: Vec<u64>,
    /// Box extents (elements of the traversal, 1..=256 each).
    pub box_dims: Vec<u32>,
    /// Traversal steps (1..=8 each): every `element_strides[i]`-th element is loaded.
    pub element_strides: Vec<u32>,
    /// Shared-memory swizzle.
    pub swizzle: TmaSwizzle,
}

impl TensorMapSpec {
    /// A map of a dense tensor (`dims`, innermost first) with unit element strides.
    pub fn dense(elem_bytes: usize, dims: &[u64], box_dims: &[u32], swizzle: TmaSwizzle) -> Self {
        let mut strides = Vec::new();
        let mut s = elem_bytes as u64;
        for d in &dims[..dims.len().saturating_sub(1)] {
            s *= d;
            strides.push(s);
        }
        TensorMapSpec {
            elem_bytes,
            dims: dims.to_vec(),
            strides,
            box_dims: box_dims.to_vec(),
            element_strides: vec![1; dims.len()],
            swizzle,
        }
    }

    /// Rank (dimensions).
    pub fn rank(&self) -> usize {
        self.dims.len()
    }

    /// Elements the box has along dimension `i` in shared memory.
    pub fn box_extent(&self, i: usize) -> usize {
        self.box_dims[i].div_ceil(self.element_strides[i]) as usize
    }

    /// Bytes one box lands in shared memory (what a load completes on its mbarrier, elements
    /// outside the tensor included).
    pub fn box_bytes(&self) -> usize {
        (0..self.rank())
            .map(|i| self.box_extent(i))
            .product::<usize>()
            * self.elem_bytes
    }

    /// Checks the driver's rules for `cuTensorMapEncodeTiled` (tile mode, interleave none) for
    /// a tensor at address `addr`, and the emulation's one restriction (a swizzled box's rows
    /// are exactly the swizzle span): why not, if not.
    pub fn validate(&self, addr: u64) -> Result<(), String> {
        let r = self.rank();
        if !(1..=5).contains(&r) {
            return Err(format!("rank {r}: must be 1..=5"));
        }
        if self.strides.len() != r - 1
            || self.box_dims.len() != r
            || self.element_strides.len() != r
        {
            return Err("strides / box / element strides do not match the rank".into());
        }
        if ![1, 2, 4, 8].contains(&self.elem_bytes) {
            return Err(format!("{} bytes per element", self.elem_bytes));
        }
        if addr % 16 != 0 {
            return Err(format!("global address {addr:#x} is not 16-byte aligned"));
        }
        if let Some(d) = self.dims.iter().find(|&&d| d == 0 || d > 1 << 32) {
            return Err(format!("dimension {d}: must be in 1..=2^32"));
        }
        if let Some(s) = self.strides.iter().find(|&&s| s % 16 != 0 || s >= 1 << 40) {
            return Err(format!("stride {s}: must be a multiple of 16 below 2^40"));
        }
        if let Some(b) = self.box_dims.iter().find(|&&b| b == 0 || b > 256) {
            return Err(format!("box extent {b}: must be in 1..=256"));
        }
        if let Some(e) = self.element_strides.iter().find(|&&e| e == 0 || e > 8) {
            return Err(format!("element stride {e}: must be in 1..=8"));
        }
        let row = self.box_dims[0] as usize * self.elem_bytes;
        if row % 16 != 0 {
            return Err(format!(
                "inner box of {row} bytes: must be a multiple of 16"
            ));
        }
        let span = self.swizzle.bytes();
        if span != 0 && row > span {
            return Err(format!(
                "inner box of {row} bytes exceeds the {span}-byte swizzle span"
            ));
        }
        let srow = self.box_extent(0) * self.elem_bytes;
        if span != 0 && srow != span {
            return Err(format!(
                "box rows of {srow} bytes with the {span}-byte swizzle: only rows of exactly the span are used (and emulated)"
            ));
        }
        Ok(())
    }

    /// The emulation's tensor map of this spec for a tensor at `addr` (validated first).
    pub fn encode_emulated(&self, addr: u64) -> Result<BcTensorMap, String> {
        self.validate(addr)?;
        let r = self.rank();
        let mut e = BcEmuTensorMap {
            magic: BC_EMU_TENSOR_MAP_MAGIC,
            global_address: addr,
            global_strides: [0; 4],
            global_dim: [1; 5],
            box_dim: [1; 5],
            element_strides: [1; 5],
            rank: r as u32,
            elem_bytes: self.elem_bytes as u32,
            swizzle_bytes: self.swizzle.bytes() as u32,
            interleave: 0,
            oob_fill: 0,
        };
        e.global_strides[..r - 1].copy_from_slice(&self.strides);
        for i in 0..r {
            e.global_dim[i] = self.dims[i] as u32;
            e.box_dim[i] = self.box_dims[i];
            e.element_strides[i] = self.element_strides[i];
        }
        let mut m = BcTensorMap { opaque: [0; 16] };
        // SAFETY: both are plain-old-data of 128 bytes (checked at compile time below).
        unsafe {
            std::ptr::copy_nonoverlapping(
                &e as *const BcEmuTensorMap as *const u8,
                m.opaque.as_mut_ptr() as *mut u8,
                std::mem::size_of::<BcEmuTensorMap>(),
            )
        };
        Ok(m)
    }

    /// The CPU model of a tile-mode load of box `coords` (innermost first) from `tensor` (the
    /// bytes from the map's global address on): the bytes that land in shared memory at an
    /// address on the swizzle's period. Dense box, dimension 0 innermost; elements outside the
    /// tensor are zero; with a W-byte swizzle the 16-byte chunk bits 4.. of each byte offset
    /// XOR its bits 7.. (3 bits for 128B, 2 for 64B, 1 for 32B). Reads past `tensor`'s end are
    /// zero too (the caller's tensor is shorter than the map says only in a broken test).
    pub fn load_box(&self, tensor: &[u8], coords: &[i32]) -> Vec<u8> {
        let r = self.rank();
        let eb = self.elem_bytes;
        let n: Vec<usize> = (0..r).map(|i| self.box_extent(i)).collect();
        let mask = match self.swizzle {
            TmaSwizzle::None => 0,
            TmaSwizzle::B32 => 1,
            TmaSwizzle::B64 => 3,
            TmaSwizzle::B128 => 7,
        };
        let total: usize = n.iter().product();
        let mut out = vec![0u8; total * eb];
        let mut j = vec![0usize; r];
        for e in 0..total {
            let mut rest = e;
            for i in 0..r {
                j[i] = rest % n[i];
                rest /= n[i];
            }
            let mut src = 0u64;
            let mut inside = true;
            for i in 0..r {
                let c = coords[i] as i64 + (j[i] as i64) * self.element_strides[i] as i64;
                if c < 0 || c >= self.dims[i] as i64 {
                    inside = false;
                    break;
                }
                src += c as u64
                    * if i == 0 {
                        eb as u64
                    } else {
                        self.strides[i - 1]
                    };
            }
            let off = e * eb;
            let o = off ^ (((off >> 7) & mask) << 4);
            if inside {
                let s = src as usize;
                if let Some(b) = tensor.get(s..s + eb) {
                    out[o..o + eb].copy_from_slice(b);
                }
            }
        }
        out
    }
}

const _: () = assert!(std::mem::size_of::<BcEmuTensorMap>() == std::mem::size_of::<BcTensorMap>());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_driver_rules_are_checked() {
        let ok = TensorMapSpec::dense(2, &[64, 40, 3], &[64, 16, 2], TmaSwizzle::B128);
        assert_eq!(ok.validate(0x1000), Ok(()));
        assert_eq!(ok.box_bytes(), 64 * 16 * 2 * 2);
        assert!(ok.validate(0x1008).is_err(), "address alignment");
        let mut bad = ok.clone();
        bad.box_dims[1] = 257;
        assert!(bad.validate(0x1000).is_err(), "box extent");
        let mut bad = ok.clone();
        bad.strides[0] = 136;
        assert!(bad.validate(0x1000).is_err(), "stride alignment");
        let wide = TensorMapSpec::dense(2, &[128, 8], &[128, 8], TmaSwizzle::B128);
        assert!(
            wide.validate(0).is_err(),
            "inner box beyond the swizzle span"
        );
        let narrow = TensorMapSpec::dense(2, &[128, 8], &[32, 8], TmaSwizzle::B128);
        assert!(narrow.validate(0).is_err(), "rows narrower than the span");
        let odd = TensorMapSpec::dense(2, &[12, 8], &[12, 8], TmaSwizzle::None);
        assert!(odd.validate(0).is_err(), "24-byte rows");
        assert!(
            TensorMapSpec::dense(2, &[64, 8], &[64, 8], TmaSwizzle::None)
                .validate(0)
                .is_ok()
        );
    }

    #[test]
    fn the_model_swizzles_and_fills_like_the_wgmma_layout() {
        // A [10][64] bf16 tensor; a box {64, 16} at row -3: rows -3..-1 and 10..12 are zero, row
        // r's 16-byte chunk c lands at chunk c ^ (r % 8) (128B swizzle).
        let spec = TensorMapSpec::dense(2, &[64, 10], &[64, 16], TmaSwizzle::B128);
        let t: Vec<u8> = (0..64 * 10 * 2).map(|i| (i % 251) as u8 + 1).collect();
        let b = spec.load_box(&t, &[0, -3]);
        for r in 0..16usize {
            let g = r as i64 - 3;
            for c in 0..8usize {
                let dst = r * 128 + ((c ^ (r % 8)) * 16);
                let want: &[u8] = if (0..10).contains(&g) {
                    &t[g as usize * 128 + c * 16..][..16]
                } else {
                    &[0; 16]
                };
                assert_eq!(&b[dst..dst + 16], want, "row {r} chunk {c}");
            }
        }
    }
}
