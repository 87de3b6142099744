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
