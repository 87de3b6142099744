//! Types shared by the driver device ([`super::device`]) and the emulated device
//! ([`super::emu_device`]).

/// A device pointer.
pub type DevPtr = u64;

/// Output type of a GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutType {
    /// bf16 output.
    Bf16,
    /// f32 output.
    F32,
}

/// Epilogue of a GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Epilogue {
    /// `y = x W^T` (the bias pointer is ignored).
    None,
    /// `y = x W^T + b`.
    Bias,
    /// `y = GELU_tanh(x W^T + b)`.
    GeluBias,
}

/// Arguments of a GEMM (see [`super::device::Gpu::gemm_fused`]).
#[derive(Clone, Copy, Debug)]
pub struct GemmArgs {
    /// bf16 `[rows, inp]`.
    pub x: DevPtr,
    /// bf16 `[out, inp]`.
    pub w: DevPtr,
    /// f32 `[out]` or 0.
    pub bias: DevPtr,
    /// Output `[rows, out]`.
    pub d: DevPtr,
    /// Rows.
    pub rows: usize,
    /// Input features.
    pub inp: usize,
    /// Output features.
    pub out: usize,
    /// Output type.
    pub ty: OutType,
    /// Epilogue.
    pub ep: Epilogue,
}

impl GemmArgs {
    /// The same GEMM with the bias pointer cleared when the epilogue does not read it.
    pub fn bias_if_used(self) -> Self {
        let bias = if self.ep == Epilogue::None {
            0
        } else {
            self.bias
        };
        GemmArgs { bias, ..self }
    }
}
