//! Decoder speed on the CPU: ms per block of latent frames, both decoders at real widths with
//! random weights (nothing stored). `cargo bench --bench decode -- [H W [BLOCK [BLOCKS [KINDS]]]]`
//! with latent sizes (default 60 104 = 480x832 pixels), latent frames per block (3), blocks
//! (2: the first block fills the caches, later ones are the steady cost) and kinds
//! (`wan,taehv`). `cargo bench --bench decode -- conv [REPS]` instead prints the GFLOP/s of
//! the decoders' convolution shapes on the backend's kernel and on `matrixmultiply`.

use blockcascade::decode::{
    bench_conv, bench_decode, bench_table, conv_table, decoder_conv_shapes, DecoderKind,
};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    if args.first().map(String::as_str) == Some("conv") {
        print!(
            "{}",
            conv_table(&bench_conv(&decoder_conv_shapes(), num(1, 3)))
        );
        return;
    }
    let kinds: Vec<DecoderKind> = args
        .get(4)
        .map_or("wan,taehv", |s| s.as_str())
        .split(',')
        .filter_map(|k| k.parse().ok())
        .collect();
    match bench_decode(&kinds, num(0, 60), num(1, 104), num(2, 3), num(3, 2)) {
        Ok(r) => print!("{}", bench_table(&r)),
        Err(e) => {
            eprintln!("decode bench: {e}");
            std::process::exit(1);
        }
    }
}
