//! GEMM rates of the CPU backend's linear layer at the shapes that matter: tokens × dim × ffn
//! of the medium built-in model (192 tokens = one 3-frame block of 16×16 latents, dim 512,
//! ffn 2048) and of Wan-1.3B (4680 tokens = one 3-frame block at 60×104, dim 1536,
//! ffn 8960). Prints GFLOP/s (best of several runs, all rayon threads) of the kernel the
//! backend picks on this CPU and of the portable `matrixmultiply` path.
//! `cargo bench --bench gemm [-- M,K,N ...]`; compare with
//! `python3 benches/cpu_vs_pytorch.py gemm M,K,N ...` (torch's rate on the same cores).

use blockcascade::backend::cpu::gemm::{linear, linear_portable};
use std::time::Instant;

type Linear = fn(&[f32], usize, usize, &[f32], Option<&[f32]>, &mut [f32]);

fn rate(f: Linear, x: &[f32], n: usize, k: usize, w: &[f32], b: &[f32], y: &mut [f32]) -> f64 {
    let flop = 2.0 * (n * k * b.len()) as f64;
    let reps = ((4e9 / flop) as usize).max(1);
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..reps {
            f(x, n, k, w, Some(b), y);
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    flop / best / 1e9
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a.contains(','))
        .collect();
    let shapes: Vec<(usize, usize, usize)> = if args.is_empty() {
        vec![
            (192, 512, 1536),
            (192, 512, 512),
            (192, 512, 2048),
            (192, 2048, 512),
            (4680, 1536, 4608),
            (4680, 1536, 8960),
            (4680, 8960, 1536),
        ]
    } else {
        args.iter()
            .filter_map(|a| {
                let v: Vec<usize> = a.split(',').filter_map(|x| x.parse().ok()).collect();
                (v.len() == 3).then(|| (v[0], v[1], v[2]))
            })
            .collect()
    };
    println!(
        "threads {}  (GFLOP/s, best of 5)\n{:>6} {:>6} {:>6} {:>10} {:>15}",
        rayon::current_num_threads(),
        "tokens",
        "k",
        "o",
        "backend",
        "matrixmultiply"
    );
    for (n, k, o) in shapes {
        let x: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let w: Vec<f32> = (0..o * k)
            .map(|i| ((i * 104729) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let b = vec![0.1f32; o];
        let mut y = vec![0f32; n * o];
        let fast = rate(linear, &x, n, k, &w, &b, &mut y);
        let port = rate(linear_portable, &x, n, k, &w, &b, &mut y);
        println!("{n:>6} {k:>6} {o:>6} {fast:>10.1} {port:>15.1}");
    }
}
