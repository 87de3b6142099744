//! GPU benchmarks (placeholder, filled below).
fn main() {}
