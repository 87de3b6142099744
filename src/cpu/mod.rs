//! The CPU backend: f32 reference implementations of every op of the model.
//!
//! These functions are the semantics every other backend (the CUDA kernels, their CPU
//! emulation) is checked against. Hot paths use rayon over rows and `matrixmultiply` GEMMs.

pub mod attention;
pub mod gemm;
pub mod ops;
