//! The C ABI (see `ffi/include/blockcascade.h`).
