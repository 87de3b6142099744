//! GPU benchmarks of the CUDA backend (`cargo bench --bench gpu`, or the binary in the GPU
//! bundle). Without a GPU it prints why and exits 0.
//!
//! 1. Measured peaks: bf16 GEMM TFLOP/s (cuBLASLt, 8192^3) and device-memory GB/s (copy).
//! 2. Kernels at Wan-1.3B shapes (4680 query tokens = 3 frames of 30x52 patches, 12 heads x
//!    128): self-attention over 32760 keys (21 frames) and cross-attention over 512 text
//!    tokens in TFLOP/s (and self-attention at 24 heads x 64 with the mma.sync tiles and, on
//!    sm_90 with `BC_WGMMA_OK=1`, the wgmma prototype and its hd128 variants `_k128`, `_pp`,
//!    `_pp_k128`, `_ws`; split-KV rows of `_pp_k128` and `_ws`: the model's S and forced 2, 3,
//!    4); the GEMMs of a layer in TFLOP/s; the memory-bound fused ops in GB/s.
//! 3. End to end with the `wan-1.3b-shape` model shapes (random weights), 60x104 latents,
//!    21 frames (7 blocks of 3), 4 steps: ms per block (the 6th block and the steady-state
//!    mean), FPS (12 video frames per block), sequential vs cascade lag 1..3 (then rows without
//!    split-KV, with the mma.sync tiles, and with the warp-specialized attention).
//!
//! 4. The video decoders on the device (TAEHV, Wan VAE at real widths, 60x104 latents, blocks of
//!    3 latent frames): ms per block and the conv TFLOP/s (`BC_BENCH_NO_DECODE=1` skips them);
//!    each decoder's block walk (the default) and its frame walk, one row each (`block-walk`,
//!    `per-frame`), `DECODE taehv walk=...` / `DECODE wan walk=...` lines and a
//!    `DECODE <kind> walk speedup` line each.
//!
//! 5. Prompt-switch latency in a live stream (the `medium` model on the GPU, 16x16 latents, an
//!    umT5-XXL-wide random encoder on the device, then on the CPU): latency split into encode,
//!    wait and block, and the block gaps around the switches against the steady ones
//!    (`blockcascade::bench::switch`; `BC_BENCH_NO_SWITCH=1` skips it).
//!
//! 6. Live streams with pixels out (`PIXELS` lines): the same model in a `Stream` with local
//!    attention, cascade lag 1 without and with a real-width TAEHV decoder on the GPU, and
//!    sequential with it: ms per block and frames per second (`BC_BENCH_NO_PIXELS=1` skips it).
//!
//! Output: a table on stdout, and JSON in `$BC_BENCH_JSON` (default `gpu-bench.json`).
//! `BC_BENCH_QUICK=1` skips the end-to-end runs.
//!
//! The random inputs and the model's random weights are drawn on every core (one generator per
//! chunk or layer): drawn on one thread, the 1.42 B normals of the 1.3B-shaped model alone took
//! 55 s on the 2-core CI host, device time the GPU sits idle through. Speed does not depend on
//! the values.

use blockcascade::backend::cuda::device::{probe, DevPtr, Epilogue, Gpu, OutType};
use blockcascade::backend::cuda::{attention_tune, ops};
use blockcascade::config::BackendKind;
use blockcascade::decode::DecoderKind;
use blockcascade::kernels::launch::AttentionTile;
use blockcascade::kernels::params::{BcAttnGroup, BcKvSegment};
use blockcascade::model::Model;
use blockcascade::rng::Rng;
use blockcascade::weights::{builtin_config, Weights, BUILTIN_SEED};
use blockcascade::{
    kernels, GenerateOptions, Generator, ModelConfig, NoiseSource, PromptEmbeds, Schedule,
};
use half::bf16;
use rayon::prelude::*;
use serde_json::{json, Value};

fn up<T: Copy>(g: &mut Gpu, v: &[T]) -> DevPtr {
    let p = g.alloc(std::mem::size_of_val(v)).unwrap();
    g.upload(p, v).unwrap();
    g.sync().unwrap();
    p
}

/// `n` normals times `s`, converted by `f`, drawn in parallel (one generator per 1 Mi chunk).
fn randn_par<T: Copy + Default + Send>(
    n: usize,
    s: f32,
    seed: u64,
    f: impl Fn(f32) -> T + Sync,
) -> Vec<T> {
    let mut v = vec![T::default(); n];
    v.par_chunks_mut(1 << 20)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut rng = Rng::new(seed ^ (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for x in chunk {
                *x = f(rng.normal() * s);
            }
        });
    v
}

fn rand_bf16(g: &mut Gpu, n: usize, s: f32, seed: u64) -> DevPtr {
    let v = randn_par(n, s, seed, bf16::from_f32);
    up(g, &v)
}

fn rand_f32(g: &mut Gpu, n: usize, s: f32, seed: u64) -> DevPtr {
    let v = randn_par(n, s, seed, |x| x);
    up(g, &v)
}

/// The `wan-1.3b-shape` model with random weights drawn one layer per task on every core
/// (`Weights::builtin` draws them on one thread): each task draws a one-layer model with its
/// own seed and keeps its layer; the first also gives the embeddings and the head.
fn wan_1_3b_shape_model() -> Model {
    let config = builtin_config("wan-1.3b-shape").unwrap();
    let one = ModelConfig {
        num_layers: 1,
        ..config.clone()
    };
    let mut parts: Vec<Weights> = (0..config.num_layers as u64)
        .into_par_iter()
        .map(|l| Weights::random(one.clone(), BUILTIN_SEED + l))
        .collect();
    let rest: Vec<_> = parts
        .drain(1..)
        .map(|w| w.layers.into_iter().next().unwrap())
        .collect();
    let mut w = parts.pop().unwrap();
    w.layers.extend(rest);
    w.config = config;
    Model::new(w)
}

/// Self- and cross-attention inputs at the bench shape: random bf16 `q` `[n, dim]` and K/V
/// `[keys, dim]`, an output buffer, one group of `n` rows over one segment of `keys` keys
/// (`sd`) or of 512 (`sd2`, the cross-attention's text tokens).
struct AttnInputs {
    q: DevPtr,
    out: DevPtr,
    sd: DevPtr,
    sd2: DevPtr,
    id: DevPtr,
    gd: DevPtr,
}

fn attention_inputs(g: &mut Gpu, n: usize, keys: usize, dim: usize) -> AttnInputs {
    let q = rand_bf16(g, n * dim, 1.0, 4);
    let kc = rand_bf16(g, keys * dim, 1.0, 5);
    let vc = rand_bf16(g, keys * dim, 1.0, 6);
    let out = g.alloc(n * dim * 2).unwrap();
    let segs = [BcKvSegment {
        k: kc as *const _,
        v: vc as *const _,
        tokens: keys as i32,
        _pad: 0,
    }];
    let groups = [BcAttnGroup {
        q_begin: 0,
        q_rows: n as i32,
        seg_begin: 0,
        seg_count: 1,
    }];
    let (sd, id, gd) = (up(g, &segs), up(g, &[0i32]), up(g, &groups));
    let segs = [BcKvSegment {
        k: kc as *const _,
        v: vc as *const _,
        tokens: 512,
        _pad: 0,
    }];
    let sd2 = up(g, &segs);
    AttnInputs {
        q,
        out,
        sd,
        sd2,
        id,
        gd,
    }
}

/// Milliseconds per call of `f` (2 warm-up calls, then `iters` timed with events). Under
/// Nsight Compute (`BC_BENCH_NCU`, which profiles every launch many times over) one call, no
/// warm-up: ncu measures, and each row's launches are profiled once.
fn time_ms(g: &mut Gpu, iters: usize, mut f: impl FnMut(&mut Gpu)) -> f64 {
    let (warm, iters) = if std::env::var_os("BC_BENCH_NCU").is_some() {
        (0, 1)
    } else {
        (2, iters)
    };
    for _ in 0..warm {
        f(g);
    }
    g.sync().unwrap();
    let (a, b) = (g.event().unwrap(), g.event().unwrap());
    g.record(&a).unwrap();
    for _ in 0..iters {
        f(g);
    }
    g.record(&b).unwrap();
    g.elapsed_ms(&a, &b).unwrap() as f64 / iters as f64
}

/// Split-KV at the self-attention bench shape (q4680 k32760 12 x 128, one group) for the tile a
/// session uses here (`wgmma64_pp_k128` when the wgmma tiles run, then the warp-specialized
/// `wgmma64_ws` too; else `rows128`): per tile the wave-fill model's choice (`... split auto S=N`; `BC_ATTN_SPLIT` overrides it, `=1` turns it off) and
/// forced 2, 3 and 4 splits, in TFLOP/s next to the unsplit rows above; per split count one
/// line `SPLIT attention self q.. k.. <tile> S=N: max rel err vs unsplit E PASS|FAIL` (the
/// split output against the unsplit one, relative to |x| + rms; bound 2e-2) and one
/// `SPLIT model ...` line with the model's fill and prediction.
#[allow(clippy::too_many_arguments)]
fn attention_split_rows(
    g: &mut Gpu,
    rows: &mut Vec<Row>,
    peak_tflops: f64,
    tiles: &[AttentionTile],
    (q, out): (DevPtr, DevPtr),
    (sd, id, gd): (DevPtr, DevPtr, DevPtr),
    n: usize,
    keys: usize,
) {
    use blockcascade::kernels::launch;
    let (heads, hd) = (12usize, 128usize);
    let split_tiles: Vec<AttentionTile> = if tiles.contains(&AttentionTile::WgmmaPpK128) {
        [
            AttentionTile::WgmmaPpK128,
            AttentionTile::WgmmaWs,
            AttentionTile::WgmmaWsDeep,
        ]
        .into_iter()
        .filter(|t| tiles.contains(t))
        .collect()
    } else {
        vec![AttentionTile::Rows128]
    };
    let bytes = split_tiles
        .iter()
        .map(|&t| {
            launch::attention_split_bytes(heads, hd, 1, n, t, launch::ATTN_MAX_SPLITS).unwrap()
        })
        .max()
        .unwrap();
    let scratch = g.alloc(bytes).unwrap();
    for tile in split_tiles {
        attention_split_tile_rows(
            g,
            rows,
            peak_tflops,
            tile,
            (q, out),
            (sd, id, gd),
            (scratch, bytes),
            n,
            keys,
        );
    }
    g.sync().unwrap();
    g.free(scratch).unwrap();
}

/// [`attention_split_rows`] for one tile, with `scratch` (`bytes` long) for the partials.
#[allow(clippy::too_many_arguments)]
fn attention_split_tile_rows(
    g: &mut Gpu,
    rows: &mut Vec<Row>,
    peak_tflops: f64,
    tile: AttentionTile,
    (q, out): (DevPtr, DevPtr),
    (sd, id, gd): (DevPtr, DevPtr, DevPtr),
    (scratch, bytes): (DevPtr, usize),
    n: usize,
    keys: usize,
) {
    use blockcascade::kernels::launch;
    let (heads, hd, dim) = (12usize, 128usize, 1536usize);
    let m = ops::attention_split_model(g, heads, hd, 1, n, keys, tile);
    println!(
        "SPLIT model {}: {} blocks, {} slots, {} key tiles; fill S=1..4 {:.3} {:.3} {:.3} {:.3}; predicted us S=1..4 {:.0} {:.0} {:.0} {:.0}; model picks S={}",
        tile.name(),
        m.items,
        m.slots,
        m.key_tiles,
        m.fill(1),
        m.fill(2),
        m.fill(3),
        m.fill(4),
        m.predict_us(1),
        m.predict_us(2),
        m.predict_us(3),
        m.predict_us(4),
        launch::attention_splits(&m)
    );
    let fl = 4.0 * (n * keys * dim) as f64;
    // The unsplit output, the reference of the split ones.
    ops::attention(g, q, out, heads, hd, sd, id, gd, 1, n, tile, None).unwrap();
    let reference = download_bf16(g, out, n * dim);
    for force in [None, Some(2), Some(3), Some(4)] {
        let split = ops::SplitScratch {
            ptr: scratch,
            bytes,
            max_keys: keys,
            force,
        };
        g.memset(out, 0xFF, n * dim * 2).unwrap();
        g.memset(scratch, 0xFF, bytes).unwrap();
        let used =
            ops::attention(g, q, out, heads, hd, sd, id, gd, 1, n, tile, Some(&split)).unwrap();
        let got = download_bf16(g, out, n * dim);
        let rms = (reference.iter().map(|v| (v * v) as f64).sum::<f64>() / reference.len() as f64)
            .sqrt() as f32;
        let err = got
            .iter()
            .zip(&reference)
            .map(|(a, b)| {
                if a.is_finite() {
                    (a - b).abs() / (b.abs() + rms)
                } else {
                    f32::INFINITY
                }
            })
            .fold(0f32, f32::max);
        let label = match force {
            None => format!("split auto S={used}"),
            Some(_) => format!("split {used}"),
        };
        println!(
            "SPLIT attention self q{n} k{keys} 12x128 {} S={used}: max rel err vs unsplit {err:.3e} {}",
            tile.name(),
            if err <= 2e-2 { "PASS" } else { "FAIL" }
        );
        let ms = time_ms(g, 5, |g| {
            ops::attention(g, q, out, heads, hd, sd, id, gd, 1, n, tile, Some(&split)).unwrap();
        });
        rows.push(Row {
            name: format!("attention self q{n} k{keys} 12x128 {} {label}", tile.name()),
            ms,
            value: fl / ms / 1e9,
            unit: "TFLOP/s",
            peak: peak_tflops,
        });
    }
}

/// `n` bf16 values at `src` as f32.
fn download_bf16(g: &Gpu, src: DevPtr, n: usize) -> Vec<f32> {
    let mut v = vec![bf16::ZERO; n];
    g.download(&mut v, src).unwrap();
    v.iter().map(|x| x.to_f32()).collect()
}

/// One output frame of each of the Wan VAE's conv layer shapes at 480x832 (latents 60x104;
/// the decoder's levels: 384 channels at 60x104 and 120x208, 192 at 240x416, 96 at 480x832, and
/// the two upsample convs reading their source through the 2x upsample), causal 3x3x3 layers as
/// three time taps; then two of TAEHV's 64-channel 3x3 layers at 480x832 (64 -> 64, and 128 ->
/// 64 as its MemBlock's conv over `cat[x, past]`, here one 128-channel source), which take
/// `bc_conv_wgmma_n64` (`conv_wgmma_tile`; no TMA variant): `bc_conv`, and `bc_conv_wgmma*`
/// (the tile `conv_wgmma_tile` picks) when `wgmma`, and its TMA variant
/// `bc_conv_wgmma_tma` when `tma` too (plain sources, or the upsample convs in the parity form),
/// in TFLOP/s; the upsample convs again in the sub-pixel (parity) form (`... parity` rows, 4/9
/// of the FLOPs: the rates count the FLOPs done, the ms compare with the dense rows); prints
/// the relative L2 distance of their outputs to the dense `bc_conv`'s (`CONV wgmma ...`,
/// `CONV tma ...`, `CONV parity ...`; bf16 rounding apart: ~1e-3). With `ws` (and `wgmma`),
/// the warp-specialized `bc_conv_wgmma_ws*` too (`conv_ws`: its own channel tile, 192 / 96 /
/// 64), dense and in the parity form, its output compared bit for bit with `bc_conv_wgmma`'s
/// of the same form (`CONV ws ... bits ... PASS/FAIL`: they must be identical).
fn wan_conv_rows(g: &mut Gpu, peak: f64, wgmma: bool, tma: bool, ws: bool) -> Vec<Row> {
    use blockcascade::kernels::launch::{
        conv_on, conv_tma, conv_tma_fits, conv_tma_specs, conv_ws, ConvEpilogue, ConvOut,
        ConvShape, ConvSource,
    };
    // (name, cin, cout, taps, h, w, upsampled source)
    let shapes = [
        ("wan res 384 @60x104", 384, 384, 3, 60, 104, false),
        ("wan res 384 @120x208", 384, 384, 3, 120, 208, false),
        ("wan res 192 @240x416", 192, 192, 3, 240, 416, false),
        ("wan res 96 @480x832", 96, 96, 3, 480, 832, false),
        ("wan up 384->192 @240x416", 384, 192, 1, 240, 416, true),
        ("wan up 192->96 @480x832", 192, 96, 1, 480, 832, true),
        ("taehv 64->64 @480x832", 64, 64, 1, 480, 832, false),
        ("taehv 128->64 @480x832", 128, 64, 1, 480, 832, false),
    ];
    let mut rows = Vec::new();
    for (i, &(name, cin, cout, taps, h, w, upsampled)) in shapes.iter().enumerate() {
        let px = if upsampled { (h / 2) * (w / 2) } else { h * w };
        let seed = 40 + 4 * i as u64;
        let srcs: Vec<DevPtr> = (0..taps)
            .map(|t| rand_bf16(g, px * cin, 1.0, seed + t as u64))
            .collect();
        let kshape = ConvShape {
            cout,
            cin,
            kt: taps,
            kh: 3,
            kw: 3,
            parity: false,
        };
        let wv = randn_par(
            cout * taps * 9 * cin,
            (1.0 / (taps * 9 * cin) as f32).sqrt(),
            seed + 3,
            bf16::from_f32,
        );
        let wt = up(g, &wv);
        // The parity form's weights `[4][cout][2][2][cin]`: per output parity (py, px) and 2x2
        // tap (a, b), the sum of the 3x3 taps that land on that source pixel (kernel rows {0}
        // and {1, 2} for py = 0, {0, 1} and {2} for py = 1; columns alike), in f32.
        let pw = upsampled.then(|| {
            let rows = |p: usize, a: usize| match (p, a) {
                (0, 0) => 0..1,
                (0, _) => 1..3,
                (_, 0) => 0..2,
                _ => 2..3,
            };
            let mut v = vec![bf16::ZERO; 16 * cout * cin];
            for z in 0..4 {
                for o in 0..cout {
                    for tap in 0..4 {
                        for c in 0..cin {
                            let mut acc = 0.0f32;
                            for dy in rows(z / 2, tap / 2) {
                                for dx in rows(z % 2, tap % 2) {
                                    acc += wv[(o * 9 + dy * 3 + dx) * cin + c].to_f32();
                                }
                            }
                            v[((z * cout + o) * 4 + tap) * cin + c] = bf16::from_f32(acc);
                        }
                    }
                }
            }
            up(g, &v)
        });
        let bias = rand_f32(g, cout, 0.1, seed + 3);
        // Dense bc_conv, wgmma, tma, then the same three in the parity form, then ws dense and
        // in the parity form: (parity, kernel family) per output buffer.
        let (conv, wg, tm, wsk) = (0, 1, 2, 3);
        let runs = [
            (false, conv),
            (false, wg),
            (false, tm),
            (true, conv),
            (true, wg),
            (true, tm),
            (false, wsk),
            (true, wsk),
        ];
        let outs: Vec<DevPtr> = runs
            .iter()
            .map(|_| g.alloc(h * w * cout * 2).unwrap())
            .collect();
        let mut ran = [false; 8];
        ran[0] = true;
        let ls: Vec<ConvSource> = srcs
            .iter()
            .enumerate()
            .map(|(t, &x)| ConvSource {
                x: x as *const _,
                channels: cin,
                stride: cin,
                c0: 0,
                t,
                up: upsampled,
            })
            .collect();
        for (k, &(parity, kind)) in runs.iter().enumerate() {
            let on = kind != conv;
            if on && !wgmma || kind == tm && !tma || kind == wsk && !ws || parity && pw.is_none() {
                continue;
            }
            let fl = 2.0 * (h * w * cout * taps * if parity { 4 } else { 9 } * cin) as f64;
            let l = conv_on(
                &ls,
                pw.filter(|_| parity).unwrap_or(wt) as *const _,
                ConvShape { parity, ..kshape },
                (h, w),
                ConvEpilogue {
                    bias: bias as *const f32,
                    res: std::ptr::null(),
                    res_stride: 0,
                    act: 0,
                },
                ConvOut::nhwc_bf16(outs[k] as *mut _, cout),
                on,
            )
            .unwrap();
            let (kname, ms) = if kind == wsk {
                let lw = conv_ws(l).unwrap();
                let ms = time_ms(g, 5, |g| {
                    // SAFETY: the same buffers as the wgmma launch it came from.
                    unsafe { g.launch(lw.kernel, lw.grid, lw.block, &lw.params) }.unwrap()
                });
                (lw.kernel.name(), ms)
            } else if kind == tm {
                if !conv_tma_fits(&l) {
                    continue;
                }
                let maps: Vec<_> = conv_tma_specs(&l)
                    .iter()
                    .map(|(spec, addr)| g.encode_tensor_map(spec, *addr).unwrap())
                    .collect();
                let lt = conv_tma(l, &maps).unwrap();
                let ms = time_ms(g, 5, |g| {
                    // SAFETY: as below; the tensor maps describe those same buffers.
                    unsafe { g.launch(lt.kernel, lt.grid, lt.block, &lt.params) }.unwrap()
                });
                (lt.kernel.name(), ms)
            } else {
                let ms = time_ms(g, 5, |g| {
                    // SAFETY: the sources, weights, bias and output were allocated above with
                    // the sizes this launch reads and writes.
                    unsafe { g.launch(l.kernel, l.grid, l.block, &l.params) }.unwrap()
                });
                (l.kernel.name(), ms)
            };
            ran[k] = true;
            rows.push(Row {
                name: format!("conv {name} {kname}{}", if parity { " parity" } else { "" }),
                ms,
                value: fl / ms / 1e9,
                unit: "TFLOP/s",
                peak,
            });
        }
        let mut a = vec![bf16::ZERO; h * w * cout];
        g.sync().unwrap();
        g.download(&mut a, outs[0]).unwrap();
        for (k, tag) in [
            (1, "wgmma"),
            (2, "tma"),
            (3, "parity"),
            (4, "parity wgmma"),
            (5, "parity tma"),
            (6, "ws"),
            (7, "parity ws"),
        ] {
            if !ran[k] {
                continue;
            }
            let mut b = a.clone();
            g.download(&mut b, outs[k]).unwrap();
            let (mut d, mut n) = (0.0f64, 0.0f64);
            for (x, y) in a.iter().zip(&b) {
                let (x, y) = (x.to_f32() as f64, y.to_f32() as f64);
                d += (x - y) * (x - y);
                n += x * x;
            }
            let rel = (d / n.max(1e-30)).sqrt();
            let ok = rel.is_finite() && rel < 1e-2;
            println!(
                "CONV {tag} {name}: rel L2 vs bc_conv {rel:.3e} {}",
                if ok { "PASS" } else { "FAIL" }
            );
        }
        // ws against bc_conv_wgmma of the same form: the same bits.
        for (k, base, tag) in [(6, 1, "ws"), (7, 4, "parity ws")] {
            if !ran[k] || !ran[base] {
                continue;
            }
            print_bits_line(
                g,
                (outs[base], outs[k], h * w * cout),
                &format!("{tag} {name}"),
                "bc_conv_wgmma",
            );
        }
        for p in srcs.into_iter().chain([wt]).chain(pw).chain(outs) {
            g.free(p).unwrap();
        }
        g.free(bias).unwrap();
    }
    rows
}

/// `CONV <what>: bits vs <base>: N of M differ PASS/FAIL` for the `n` bf16 values at `want`
/// (the base kernel's output) and `got`, which must be identical.
fn print_bits_line(g: &mut Gpu, (want, got, n): (DevPtr, DevPtr, usize), what: &str, base: &str) {
    let mut a = vec![bf16::ZERO; n];
    let mut b = a.clone();
    g.download(&mut a, want).unwrap();
    g.download(&mut b, got).unwrap();
    let diff = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    println!(
        "CONV {what}: bits vs {base}: {diff} of {n} differ {}",
        if diff == 0 { "PASS" } else { "FAIL" }
    );
}

/// TAEHV's 3x3 layers to 64 channels as the decoder launches them (64 -> 64 over one source;
/// the MemBlock's 128 -> 64 over `cat[x, past]` as two 64-channel sources, residual and ReLU;
/// the convs after an `Upsample` reading through it: 64 -> 64 at 480x832 in the parity form, as
/// the decoder runs it, and dense, 128 -> 64 at 240x416 dense) on `bc_conv_wgmma_n64` and on
/// the persistent halo conv
/// `bc_conv_halo_n64` (one block per SM, tiles claimed from a counter pair), in TFLOP/s;
/// `CONV halo ... bits vs bc_conv_wgmma_n64 ... PASS/FAIL`: the outputs must be identical.
fn taehv_halo_conv_rows(g: &mut Gpu, peak: f64) -> Vec<Row> {
    use blockcascade::kernels::launch::{
        conv_halo, conv_on, ConvEpilogue, ConvOut, ConvShape, ConvSource,
    };
    let cout = 64;
    let ctas = u32::try_from(g.sm_count())
        .ok()
        .filter(|&c| c > 0)
        .unwrap_or(u32::MAX);
    // Zeroed once; every launch leaves it zero.
    let ctr = g.alloc(8).unwrap();
    g.memset(ctr, 0, 8).unwrap();
    let mut rows = Vec::new();
    // (name, output size, channels per source, read through a 2x upsample, parity form)
    type HaloCase = (&'static str, (usize, usize), &'static [usize], bool, bool);
    let cases: [HaloCase; 5] = [
        ("taehv 64->64 @480x832", (480, 832), &[64], false, false),
        (
            "taehv memblock 2x64->64 @480x832",
            (480, 832),
            &[64, 64],
            false,
            false,
        ),
        (
            "taehv up 64->64 @480x832 parity",
            (480, 832),
            &[64],
            true,
            true,
        ),
        (
            "taehv up 64->64 @480x832 dense",
            (480, 832),
            &[64],
            true,
            false,
        ),
        (
            "taehv up 128->64 @240x416 dense",
            (240, 416),
            &[128],
            true,
            false,
        ),
    ];
    for (i, (name, (h, w), chans, upsampled, parity)) in cases.into_iter().enumerate() {
        let nsrc = chans.len();
        let seed = 90 + 4 * i as u64;
        let cin: usize = chans.iter().sum();
        let px = if upsampled { (h / 2) * (w / 2) } else { h * w };
        let srcs: Vec<DevPtr> = chans
            .iter()
            .enumerate()
            .map(|(s, &c)| rand_bf16(g, px * c, 1.0, seed + s as u64))
            .collect();
        // Taps per output pixel: 9, or 2x2 per parity (weights [4 parities][cout][2][2][cin]).
        let taps = if parity { 4 } else { 9 };
        let wv = randn_par(
            cout * taps * cin * if parity { 4 } else { 1 },
            (1.0 / (taps * cin) as f32).sqrt(),
            seed + 2,
            bf16::from_f32,
        );
        let wt = up(g, &wv);
        let bias = rand_f32(g, cout, 0.1, seed + 3);
        // ReLU; the MemBlock adds its input x as the residual (0: none).
        let res: DevPtr = if nsrc == 2 { srcs[0] } else { 0 };
        let act = blockcascade::kernels::params::BC_ACT_RELU;
        let outs: Vec<DevPtr> = (0..2).map(|_| g.alloc(h * w * cout * 2).unwrap()).collect();
        let ls: Vec<ConvSource> = srcs
            .iter()
            .zip(chans)
            .enumerate()
            .map(|(s, (&x, &c))| ConvSource {
                x: x as *const _,
                channels: c,
                stride: c,
                c0: 64 * s,
                t: 0,
                up: upsampled,
            })
            .collect();
        let fl = 2.0 * (h * w * cout * taps * cin) as f64;
        for (k, out) in outs.iter().enumerate() {
            let l = conv_on(
                &ls,
                wt as *const _,
                ConvShape {
                    parity,
                    ..ConvShape::new(cout, cin, 1, 3, 3)
                },
                (h, w),
                ConvEpilogue {
                    bias: bias as *const f32,
                    res: res as *const _,
                    res_stride: 64,
                    act,
                },
                ConvOut::nhwc_bf16(*out as *mut _, cout),
                true,
            )
            .unwrap();
            let l = if k == 1 {
                conv_halo(l, ctas, ctr as *mut u32).unwrap()
            } else {
                l
            };
            let ms = time_ms(g, 5, |g| {
                // SAFETY: the sources, weights, bias, residual and output were allocated above
                // with the sizes this launch reads and writes.
                unsafe { g.launch(l.kernel, l.grid, l.block, &l.params) }.unwrap()
            });
            rows.push(Row {
                name: format!("conv {name} {}", l.kernel.name()),
                ms,
                value: fl / ms / 1e9,
                unit: "TFLOP/s",
                peak,
            });
        }
        g.sync().unwrap();
        print_bits_line(
            g,
            (outs[0], outs[1], h * w * cout),
            &format!("halo {name}"),
            "bc_conv_wgmma_n64",
        );
        for p in srcs.into_iter().chain([wt]).chain(outs) {
            g.free(p).unwrap();
        }
        g.free(bias).unwrap();
    }
    g.free(ctr).unwrap();
    rows
}

/// Prints `rows[*shown..]` as a table (a `kernel ...` header, the rows, a blank line: the
/// bundle's summary takes every such table from the log) and marks them shown. The bench prints
/// its rows in several tables, so that a run cut short (a hang in a kernel never run on a GPU
/// before, the bundle's time cap) still leaves the rows measured before it.
fn print_rows(rows: &[Row], shown: &mut usize) {
    if *shown >= rows.len() {
        return;
    }
    println!(
        "\n{:<44} {:>10} {:>12} {:>8}",
        "kernel", "ms", "rate", "% peak"
    );
    for r in &rows[*shown..] {
        println!(
            "{:<44} {:>10.4} {:>8.1} {:<7} {:>5.1}%",
            r.name,
            r.ms,
            r.value,
            r.unit,
            100.0 * r.value / r.peak
        );
    }
    println!();
    *shown = rows.len();
}

/// Whether the warp-specialized attention may run: `BC_NO_ATTN_WS=1` (run.sh sets it when
/// `BC_BENCH_SMOKE=attention-ws` failed or hung) leaves `wgmma64_ws` out, `BC_NO_ATTN_WS_DEEP=1`
/// (`attention-ws-deep`) `wgmma64_ws_deep`; other tiles always.
fn attn_ws_ok(tile: AttentionTile) -> bool {
    match tile {
        AttentionTile::WgmmaWs => std::env::var_os("BC_NO_ATTN_WS").is_none(),
        AttentionTile::WgmmaWsDeep => std::env::var_os("BC_NO_ATTN_WS_DEEP").is_none(),
        _ => true,
    }
}

/// `BC_NO_SPLIT=1` (run.sh sets it, with `BC_ATTN_SPLIT=1`, when `BC_BENCH_SMOKE=split`
/// failed or hung): no forced split-KV launches (rows, ncu) either.
fn no_split() -> bool {
    std::env::var_os("BC_NO_SPLIT").is_some()
}

struct Row {
    name: String,
    ms: f64,
    value: f64,
    unit: &'static str,
    peak: f64,
}

fn main() {
    if !kernels::built() {
        println!("SKIP gpu bench: {}", kernels::NOT_BUILT);
        return;
    }
    let info = match probe() {
        Ok(i) => i,
        Err(e) => {
            println!("SKIP gpu bench: no GPU ({e})");
            return;
        }
    };
    let mut g = Gpu::open(0).unwrap();
    println!(
        "device: {} (sm_{}{}, {:.1} GiB, {} SMs)",
        info.name,
        info.capability.0,
        info.capability.1,
        info.total_mem as f64 / (1u64 << 30) as f64,
        g.sm_count()
    );
    if let Ok(what) = std::env::var("BC_BENCH_NCU") {
        ncu_run(g, &what);
        return;
    }
    if let Ok(what) = std::env::var("BC_BENCH_SMOKE") {
        smoke_run(g, &what);
        return;
    }
    let mut rows: Vec<Row> = Vec::new();
    // Peaks.
    let m = 8192usize;
    let (a, b, bias) = (
        rand_bf16(&mut g, m * m, 0.01, 1),
        rand_bf16(&mut g, m * m, 0.01, 2),
        rand_f32(&mut g, m, 0.0, 3),
    );
    let c = g.alloc(m * m * 2).unwrap();
    let peak_gemm = |g: &mut Gpu| {
        blockcascade::backend::cuda::ops::gemm(
            g,
            a,
            b,
            bias,
            c,
            m,
            m,
            m,
            OutType::Bf16,
            Epilogue::Bias,
        )
        .unwrap()
    };
    // Warm up first (~50 GEMMs, ~70 ms on an H100): the GPU comes from idle clocks, and this
    // peak is the denominator of every "% peak" and of the MFU below.
    time_ms(&mut g, 50, peak_gemm);
    let ms = time_ms(&mut g, 20, peak_gemm);
    let peak_tflops = 2.0 * (m * m * m) as f64 / ms / 1e9;
    rows.push(Row {
        name: "peak: cuBLASLt bf16 GEMM 8192^3".into(),
        ms,
        value: peak_tflops,
        unit: "TFLOP/s",
        peak: peak_tflops,
    });
    let bytes = 1usize << 30;
    let (s, d) = (g.alloc(bytes).unwrap(), g.alloc(bytes).unwrap());
    let ms = time_ms(&mut g, 10, |g| g.copy(d, s, bytes).unwrap());
    let peak_gbs = 2.0 * bytes as f64 / ms / 1e6;
    rows.push(Row {
        name: "peak: device copy 1 GiB".into(),
        ms,
        value: peak_gbs,
        unit: "GB/s",
        peak: peak_gbs,
    });

    // Kernels at Wan-1.3B shapes.
    let (dim, heads, hd, tpf, ffn) = (1536usize, 12usize, 128usize, 1560usize, 8960usize);
    let n = 3 * tpf;
    let keys = 21 * tpf;
    let AttnInputs {
        q,
        out,
        sd,
        sd2,
        id,
        gd,
    } = attention_inputs(&mut g, n, keys, dim);
    // Both tiles of the attention kernel (the backend times them per window shape and keeps the
    // faster) and, on sm_90 once the wgmma layouts passed on this device (the GPU bundle sets
    // BC_WGMMA_OK=1 then), the Hopper wgmma prototype next to them, at Wan's 12 x 128 and below
    // at 24 x 64.
    // The wgmma tiles: the prototype and its hd128 variants (128-key tiles, ping-pong, both).
    let mut tiles = AttentionTile::ALL.to_vec();
    if g.compute_capability() == Some((9, 0)) {
        if std::env::var("BC_WGMMA_OK").is_ok_and(|v| v == "1") {
            tiles.extend(AttentionTile::WGMMA.into_iter().filter(|&t| attn_ws_ok(t)));
        } else {
            println!("SKIP attention wgmma64: BC_WGMMA_OK is not 1 (the wgmma layout probe did not pass or did not run)");
        }
    }
    for &tile in &tiles {
        let ms = time_ms(&mut g, 5, |g| {
            ops::attention(g, q, out, heads, hd, sd, id, gd, 1, n, tile, None).unwrap();
        });
        let fl = 4.0 * (n * keys * dim) as f64;
        rows.push(Row {
            name: format!("attention self q{n} k{keys} 12x128 {}", tile.name()),
            ms,
            value: fl / ms / 1e9,
            unit: "TFLOP/s",
            peak: peak_tflops,
        });
        let ms = time_ms(&mut g, 20, |g| {
            ops::attention(g, q, out, heads, hd, sd2, id, gd, 1, n, tile, None).unwrap();
        });
        let fl = 4.0 * (n * 512 * dim) as f64;
        rows.push(Row {
            name: format!("attention cross q{n} k512 12x128 {}", tile.name()),
            ms,
            value: fl / ms / 1e9,
            unit: "TFLOP/s",
            peak: peak_tflops,
        });
    }
    if no_split() {
        println!(
            "SKIP attention split rows: BC_NO_SPLIT=1 (run.sh: the split-KV smoke run failed)"
        );
    } else {
        attention_split_rows(
            &mut g,
            &mut rows,
            peak_tflops,
            &tiles,
            (q, out),
            (sd, id, gd),
            n,
            keys,
        );
    }
    // head_dim 64 (24 x 64, the same buffers and FLOPs), the same tiles (the wgmma variants
    // differ only above head_dim 64: their hd64 kernel is the prototype's, timed once).
    for tile in tiles
        .into_iter()
        .filter(|t| !t.is_wgmma() || *t == AttentionTile::Wgmma64)
    {
        let ms = time_ms(&mut g, 5, |g| {
            ops::attention(g, q, out, 2 * heads, hd / 2, sd, id, gd, 1, n, tile, None).unwrap();
        });
        rows.push(Row {
            name: format!("attention self q{n} k{keys} 24x64 {}", tile.name()),
            ms,
            value: 4.0 * (n * keys * dim) as f64 / ms / 1e9,
            unit: "TFLOP/s",
            peak: peak_tflops,
        });
    }
    // GEMMs of one layer.
    let x = rand_bf16(&mut g, n * ffn, 1.0, 7);
    let w = rand_bf16(&mut g, ffn * dim * 3, 0.02, 8);
    let bb = rand_f32(&mut g, ffn * 3, 0.02, 9);
    let y = g.alloc(n * ffn * 4).unwrap();
    for (name, k, o, ep) in [
        ("gemm qkv", dim, 3 * dim, Epilogue::Bias),
        ("gemm o", dim, dim, Epilogue::Bias),
        ("gemm ffn0+gelu", dim, ffn, Epilogue::GeluBias),
        ("gemm ffn2", ffn, dim, Epilogue::Bias),
    ] {
        let ms = time_ms(&mut g, 20, |g| {
            blockcascade::backend::cuda::ops::gemm(g, x, w, bb, y, n, k, o, OutType::Bf16, ep)
                .unwrap()
        });
        let fl = 2.0 * (n * k * o) as f64;
        rows.push(Row {
            name: format!("{name} {n}x{k}x{o}"),
            ms,
            value: fl / ms / 1e9,
            unit: "TFLOP/s",
            peak: peak_tflops,
        });
    }
    // Memory-bound fused ops.
    let xf = rand_f32(&mut g, n * dim, 1.0, 10);
    let e0 = rand_f32(&mut g, 3 * 6 * dim, 0.1, 11);
    let modu = rand_f32(&mut g, 6 * dim, 0.1, 12);
    let nw = rand_f32(&mut g, dim, 0.1, 13);
    let pos = up(&mut g, &[0i32, 1, 2]);
    let yb = g.alloc(n * dim * 2).unwrap();
    let ms = time_ms(&mut g, 50, |g| {
        ops::ln_modulate(
            g,
            xf,
            yb,
            n,
            dim,
            1e-6,
            tpf,
            e0,
            e0 + 4 * dim as u64,
            6 * dim,
            modu,
            modu + 4 * dim as u64,
        )
        .unwrap()
    });
    rows.push(Row {
        name: format!("ln_modulate {n}x{dim}"),
        ms,
        value: (n * dim * 6) as f64 / ms / 1e6,
        unit: "GB/s",
        peak: peak_gbs,
    });
    let ms = time_ms(&mut g, 50, |g| {
        ops::gated_residual(g, xf, yb, n, dim, tpf, e0, 6 * dim, modu).unwrap()
    });
    rows.push(Row {
        name: format!("gated_residual {n}x{dim}"),
        ms,
        value: (n * dim * 10) as f64 / ms / 1e6,
        unit: "GB/s",
        peak: peak_gbs,
    });
    // The fused pair: x read + written (f32), delta read and the rows written (bf16, in place).
    let nm = ops::Norm::modulate(
        e0,
        e0 + 4 * dim as u64,
        6 * dim,
        modu,
        modu + 4 * dim as u64,
    );
    let ms = time_ms(&mut g, 50, |g| {
        ops::residual_norm(g, xf, yb, yb, n, dim, 1e-6, tpf, e0, 6 * dim, modu, &nm).unwrap()
    });
    rows.push(Row {
        name: format!("residual_norm {n}x{dim}"),
        ms,
        value: (n * dim * 12) as f64 / ms / 1e6,
        unit: "GB/s",
        peak: peak_gbs,
    });
    let qa = ops::QkArgs {
        x: q,
        x_stride: dim,
        out,
        rows: n,
        heads,
        head_dim: hd,
        tpf,
        wp: 52,
        norm: nw,
        frame_pos: pos,
        frame_slot: 0,
        rope: true,
        eps: 1e-6,
    };
    let ms = time_ms(&mut g, 50, |g| ops::qk_norm_rope(g, &qa).unwrap());
    rows.push(Row {
        name: format!("qk_norm_rope {n}x{dim}"),
        ms,
        value: (n * dim * 4) as f64 / ms / 1e6,
        unit: "GB/s",
        peak: peak_gbs,
    });
    let ms = time_ms(&mut g, 50, |g| {
        ops::activation(g, x, n * ffn, true, true).unwrap()
    });
    rows.push(Row {
        name: format!("gelu bf16 {n}x{ffn}"),
        ms,
        value: (n * ffn * 4) as f64 / ms / 1e6,
        unit: "GB/s",
        peak: peak_gbs,
    });
    // The rows so far, before the never-run sections below (their rows follow in later tables).
    let mut shown = 0;
    print_rows(&rows, &mut shown);
    // The Wan VAE's convolution layers at 480x832 (60x104 latents) and two of TAEHV's
    // 64-channel ones, one output frame each, on
    // bc_conv and, on sm_90 once the wgmma layouts passed here (BC_WGMMA_OK=1), on the Hopper
    // bc_conv_wgmma next to it (its output compared with bc_conv's).
    let conv_wgmma = g.compute_capability() == Some((9, 0))
        && std::env::var("BC_WGMMA_OK").is_ok_and(|v| v == "1");
    if g.compute_capability() == Some((9, 0)) && !conv_wgmma {
        println!("SKIP conv wgmma: BC_WGMMA_OK is not 1 (the wgmma layout probe did not pass or did not run)");
    }
    // Its TMA variant too once the TMA probe passed here (BC_TMA_OK=1).
    let conv_tma = conv_wgmma && std::env::var("BC_TMA_OK").is_ok_and(|v| v == "1");
    if conv_wgmma && !conv_tma {
        println!("SKIP conv tma: BC_TMA_OK is not 1 (the TMA probe did not pass or did not run)");
    }
    // And the warp-specialized bc_conv_wgmma_ws* (never run on a GPU before: a hang there would
    // cost the rows after it; BC_BENCH_NO_CONV_WS=1 skips it, here and in the decoder rows).
    let conv_ws = conv_wgmma && std::env::var_os("BC_BENCH_NO_CONV_WS").is_none();
    // And the persistent halo conv bc_conv_halo_n64 (never run on a GPU before either;
    // BC_BENCH_NO_CONV_HALO=1 skips it, here and in the decoder rows).
    let conv_halo = conv_wgmma && std::env::var_os("BC_BENCH_NO_CONV_HALO").is_none();
    if std::env::var_os("BC_BENCH_NO_DECODE").is_none() {
        rows.extend(wan_conv_rows(
            &mut g,
            peak_tflops,
            conv_wgmma,
            conv_tma,
            conv_ws,
        ));
        if conv_halo {
            // The rows so far first: a hang in the halo conv would cost only its own.
            print_rows(&rows, &mut shown);
            rows.extend(taehv_halo_conv_rows(&mut g, peak_tflops));
        }
    }
    print_rows(&rows, &mut shown);
    drop(g);
    // The video decoders (decode::CudaDecoder): ms per 3-latent-frame block at 480x832, real
    // widths, random weights; rate = the conv FLOPs the decoder launched per block; with
    // bc_conv_wgmma too where the conv rows above ran it; each with the upsample convs in the
    // parity form and dense (`no-parity` rows: more FLOPs, compare the ms).
    if std::env::var_os("BC_BENCH_NO_DECODE").is_none() {
        let kinds = [DecoderKind::Taehv, DecoderKind::WanVae];
        // Kernels only: the decoders need no cuBLASLt.
        let open = || Gpu::open_kernels(0);
        // Each kernel with the upsample convs in the parity form (the default), then dense;
        // then the warp-specialized conv (`BC_CONV_WGMMA_VARIANT=ws`) in the parity form; last
        // the persistent halo conv (`BC_CONV_HALO=1`: TAEHV's 3x3 convs to 64 channels) with
        // the wgmma conv for the rest, in the parity form and dense (where it also takes the
        // convs after the last two Upsamples: compare with `wgmma no-parity`).
        let configs = [(false, false), (true, false), (true, true)]
            .into_iter()
            .flat_map(|(w, t)| [(w, t, false, true, false), (w, t, false, false, false)])
            .chain([
                (true, false, true, true, false),
                (true, false, false, true, true),
                (true, false, false, false, true),
            ]);
        for (wgmma, tma, ws, parity, halo) in configs {
            if wgmma && !conv_wgmma || tma && !conv_tma || ws && !conv_ws || halo && !conv_halo {
                continue;
            }
            let tag = match (wgmma, tma, ws, halo) {
                (_, _, _, true) => " wgmma halo",
                (_, _, true, _) => " wgmma ws",
                (_, true, _, _) => " wgmma tma",
                (true, _, _, _) => " wgmma",
                _ => "",
            };
            let tag = format!("{tag}{}", if parity { "" } else { " no-parity" });
            // The halo conv takes only TAEHV's layers.
            let kinds: &[DecoderKind] = if halo { &kinds[..1] } else { &kinds };
            match blockcascade::decode::bench_decode_device(
                kinds,
                (60, 104),
                (3, 3),
                None,
                (wgmma, tma, ws, parity, true, halo),
                &open,
            ) {
                Ok(r) => {
                    for b in r {
                        rows.push(Row {
                            name: format!("decode {} 60x104 3-frame block{tag}", b.kind),
                            ms: b.block_ms.unwrap_or(b.first_block_ms),
                            value: b.tflops,
                            unit: "TFLOP/s",
                            peak: peak_tflops,
                        });
                    }
                }
                // Tagged for the summary of scripts/gpu-run.sh.
                Err(e) => println!("DECODE bench{tag} FAILED: {e}"),
            }
        }
        // Each decoder's block walk (every layer one launch over all the block's frames: the
        // rows above) against its frame walk (one latent frame at a time), on the kernel the
        // wgmma rows use where they ran: one row each, and `DECODE <kind> walk=...` lines (ms,
        // launches per block, pool) and a speedup line for the summary.
        let tag = if conv_wgmma { " wgmma" } else { "" };
        for kind in kinds {
            let mut walks = Vec::new();
            for (batch, label) in [(true, "block-walk"), (false, "per-frame")] {
                match blockcascade::decode::bench_decode_device(
                    &[kind],
                    (60, 104),
                    (3, 3),
                    None,
                    (conv_wgmma, false, false, true, batch, false),
                    &open,
                ) {
                    Ok(r) => {
                        for b in r {
                            let ms = b.block_ms.unwrap_or(b.first_block_ms);
                            rows.push(Row {
                                name: format!("decode {kind} 60x104 3-frame block {label}{tag}"),
                                ms,
                                value: b.tflops,
                                unit: "TFLOP/s",
                                peak: peak_tflops,
                            });
                            walks.push((label, ms, b.cost));
                        }
                    }
                    Err(e) => println!("DECODE {kind} walk={label}{tag} FAILED: {e}"),
                }
            }
            for (label, ms, c) in &walks {
                println!(
                    "DECODE {kind} walk={label}{tag} 60x104 3-frame block: {ms:.2} ms, \
                     {} launches+copies in {} walks, pool {:.1} MiB, state {:.1} MiB, \
                     io {:.1} MiB",
                    c.submissions,
                    c.walks,
                    c.pool_bytes as f64 / 1048576.0,
                    c.state_bytes as f64 / 1048576.0,
                    c.io_bytes as f64 / 1048576.0
                );
            }
            if let [(_, b, _), (_, f, _)] = walks[..] {
                println!(
                    "DECODE {kind} walk speedup: block-walk {b:.2} ms vs per-frame {f:.2} ms = \
                     {:.2}x",
                    f / b
                );
            }
        }
        print_rows(&rows, &mut shown);
        decode_profiles(conv_wgmma, &open);
    }
    print_rows(&rows, &mut shown);
    let kernels_json: Vec<Value> = rows
        .iter()
        .map(|r| json!({"name": r.name, "ms": r.ms, "rate": r.value, "unit": r.unit, "fraction_of_peak": r.value / r.peak}))
        .collect();

    let text = text_encoder(peak_gbs);
    let mut e2e = Vec::new();
    let mut pixels = Vec::new();
    if std::env::var_os("BC_BENCH_QUICK").is_none() {
        let t0 = std::time::Instant::now();
        let model = std::sync::Arc::new(wan_1_3b_shape_model());
        let built = t0.elapsed().as_secs_f64();
        e2e = end_to_end(&model, built, peak_tflops);
        if std::env::var_os("BC_BENCH_NO_PIXELS").is_none() {
            pixels = pixel_stream(&model);
        }
    }
    // Last: the part most likely to be cut by the bundle's time cap.
    let switch = if std::env::var_os("BC_BENCH_NO_SWITCH").is_none() {
        switch_latency()
    } else {
        Vec::new()
    };
    // The attention tile each end-to-end session picked per window shape (see attention_tune).
    let mut tunes = Vec::new();
    for (s, r) in attention_tune::remembered() {
        let times: Vec<String> = r
            .times
            .iter()
            .map(|(t, ms)| format!("{} {ms:.3} ms", t.name()))
            .collect();
        let keys: usize = s
            .groups
            .iter()
            .map(|g| g.segments.iter().sum::<usize>())
            .sum();
        println!(
            "TUNE attention {} groups, q{} k{} {}x{} ({:.1} GFLOP): {} -> {}",
            s.groups.len(),
            s.rows(),
            keys,
            s.heads,
            s.head_dim,
            s.flops() / 1e9,
            times.join(", "),
            r.tile.name()
        );
        tunes.push(json!({"groups": s.groups.iter().map(|g| json!({"rows": g.rows, "segments": g.segments})).collect::<Vec<_>>(),
            "heads": s.heads, "head_dim": s.head_dim, "gflop": s.flops() / 1e9,
            "times_ms": r.times.iter().map(|(t, ms)| json!({"tile": t.name(), "ms": ms})).collect::<Vec<_>>(),
            "picked": r.tile.name()}));
    }
    let doc = json!({
        "device": info.name,
        "peak_bf16_tflops": peak_tflops,
        "peak_copy_gbs": peak_gbs,
        "kernels": kernels_json,
        "end_to_end": e2e,
        "pixel_stream": pixels,
        "attention_tune": tunes,
        "text_encoder": text,
        "switch_latency": switch,
    });
    let path = std::env::var("BC_BENCH_JSON").unwrap_or_else(|_| "gpu-bench.json".into());
    std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    println!("\nJSON written to {path}");
}

/// The umT5-XXL text encoder on the device for a 30-token prompt (random bf16 weights, the 24
/// layers uploaded: 9.26 GB): ms per prompt and the weight bandwidth it implies (at 30 rows
/// the GEMMs are bound by reading the weights once).
fn text_encoder(peak_gbs: f64) -> Value {
    use blockcascade::text::{bench_text_encoder_on, TextDevice, Umt5Config};
    let cfg = Umt5Config::xxl();
    let tokens = 30;
    let t0 = std::time::Instant::now();
    match bench_text_encoder_on(&cfg, tokens, 5, TextDevice::Cuda) {
        Ok(ms) => {
            let layer = 4 * cfg.dim * cfg.dim_attn + 3 * cfg.dim * cfg.ffn;
            let bytes = (cfg.layers * layer * 2) as f64;
            let gbs = bytes / ms / 1e6;
            println!(
                "TEXT umt5-xxl {tokens} tokens: {ms:.2} ms per prompt, weights at {gbs:.0} GB/s \
                 ({:.0}% of copy peak; setup {:.1} s)",
                100.0 * gbs / peak_gbs,
                t0.elapsed().as_secs_f64()
            );
            json!({"tokens": tokens, "ms": ms, "weight_gbs": gbs, "fraction_of_copy_peak": gbs / peak_gbs})
        }
        Err(e) => {
            println!("TEXT umt5-xxl {tokens} tokens: failed: {e}");
            json!({"tokens": tokens, "error": e.to_string()})
        }
    }
}

/// Prompt-switch latency in a live stream on the GPU: the `medium` model (text width 4096),
/// with a random umT5-XXL-wide encoder on the device (12 of the 24 layers: half the upload of
/// the `TEXT` benchmark, half its encode time) and on the CPU (2 of the 24 layers, to keep the
/// run short: a full CPU encode is about 12 times as long). Lines tagged `SWITCH` go to the
/// bundle's summary.
fn switch_latency() -> Vec<Value> {
    use blockcascade::bench::switch::{run, table, SwitchBenchOptions, SwitchEncoder};
    use blockcascade::text::TextDevice;
    let mut out = Vec::new();
    for (device, layers) in [(TextDevice::Cuda, 12), (TextDevice::Cpu, 2)] {
        let o = SwitchBenchOptions {
            model: "medium".into(),
            latent: (16, 16),
            backend: BackendKind::Cuda,
            encoder: SwitchEncoder::Random {
                dim_attn: 4096,
                ffn: 10240,
                heads: 64,
                layers,
            },
            text_device: device,
            switches: 3,
            gap_blocks: 8,
            ..Default::default()
        };
        let t0 = std::time::Instant::now();
        match run(&o) {
            Ok(r) => {
                println!("\n{}", table(&r));
                for (i, x) in r.samples.iter().enumerate() {
                    println!(
                        "SWITCH encoder {} ({layers} layers) #{i}{}: latency {:.1} ms = encode {:.1} + wait {:.1} + block {:.1}; {} blocks during the encode; max gap {:.1} ms (steady p50 {:.1}, max {:.1})",
                        device.name(),
                        if x.cached { " cached" } else { "" },
                        x.latency_ms,
                        x.encode_ms,
                        x.wait_ms,
                        x.block_ms,
                        x.blocks_during_encode,
                        x.max_gap_ms,
                        r.steady.p50_ms,
                        r.steady.max_ms
                    );
                }
                println!(
                    "SWITCH encoder {} run took {:.1} s",
                    device.name(),
                    t0.elapsed().as_secs_f64()
                );
                out.push(
                    json!({"encoder_device": device.name(), "encoder_layers": layers, "result": r}),
                );
            }
            Err(e) => {
                println!("SWITCH encoder {} FAILED: {e}", device.name());
                out.push(json!({"encoder_device": device.name(), "error": e.to_string()}));
            }
        }
    }
    out
}

/// Live streams with pixels out: the `wan-1.3b-shape` model at 60x104 latents in a
/// [`blockcascade::Stream`] (local attention, 21 frames with a sink of 3, so the KV cache stays
/// bounded), 10 blocks, with and without a real-width TAEHV decoder (random weights) on the
/// DiT's GPU (its own stream, finished blocks handed over on the device, RGB8 to the host):
/// the steady interval between blocks as the consumer sees them (blocks 4..10) and the pixel
/// frames per second. Without decode overhead showing, the decoder overlaps the DiT.
/// `BC_BENCH_NO_PIXELS=1` skips it.
fn pixel_stream(model: &std::sync::Arc<Model>) -> Vec<Value> {
    use blockcascade::decode::Decoder;
    use blockcascade::{Stream, StreamOptions};
    let prompt = bench_prompt(model.config(), 22);
    let taehv = std::sync::Arc::new(Decoder::synthetic(DecoderKind::Taehv, 64, 1));
    println!("\npixel stream: wan-1.3b-shape, 60x104 latents, local attention 21 frames (sink 3), 10 blocks of 3");
    let mut out = Vec::new();
    for (name, schedule, decode) in [
        (
            "cascade lag 1, latents only",
            Schedule::Cascade { lag: 1 },
            false,
        ),
        (
            "cascade lag 1, TAEHV on the GPU",
            Schedule::Cascade { lag: 1 },
            true,
        ),
        ("sequential, TAEHV on the GPU", Schedule::Sequential, true),
    ] {
        let opts = GenerateOptions {
            local_attn: Some(21),
            sink: 3,
            ..wan_shape_options(schedule)
        };
        let sopts = StreamOptions {
            decoder: decode.then(|| taehv.clone()),
            host_latents: !decode,
            ..Default::default()
        };
        let run = || -> blockcascade::Result<(Vec<f64>, usize, Option<String>)> {
            let mut s = Stream::open(
                model.clone(),
                opts,
                NoiseSource::Seeded(1),
                prompt.clone(),
                sopts,
            )?;
            let (mut t, mut px, mut note) = (Vec::new(), 0, None);
            for _ in 0..10 {
                let b = s
                    .next_block(Some(std::time::Duration::from_secs(60)))?
                    .ok_or_else(|| blockcascade::Error::Device("no block within 60 s".into()))?;
                t.push(b.since_start.as_secs_f64());
                px = b.pixel_frames;
                if note.is_none() {
                    note = b.handoff_note.clone();
                }
            }
            s.cancel();
            Ok((t, px, note))
        };
        match run() {
            Ok((t, px, note)) => {
                let steady = (t[9] - t[3]) / 6.0;
                let fps = if decode {
                    px as f64 / steady
                } else {
                    12.0 / steady
                };
                println!(
                    "PIXELS {name}: {:.1} ms per block (blocks 4..10), {:.1} {} frames/s, first block at {:.0} ms{}",
                    steady * 1e3,
                    fps,
                    if decode { "pixel" } else { "video-equivalent" },
                    t[0] * 1e3,
                    note.map_or_else(String::new, |n| format!(" ({n})"))
                );
                out.push(
                    json!({"run": name, "block_ms": steady * 1e3, "fps": fps, "since_start_s": t}),
                );
            }
            Err(e) => {
                println!("PIXELS {name}: FAILED: {e}");
                out.push(json!({"run": name, "error": e.to_string()}));
            }
        }
    }
    out
}

/// The benchmark's generation on the CUDA backend: 60x104 latents (480x832 video), blocks of
/// 3 frames, `schedule`.
fn wan_shape_options(schedule: Schedule) -> GenerateOptions {
    GenerateOptions {
        height: 60,
        width: 104,
        block_frames: 3,
        schedule,
        backend: BackendKind::Cuda,
        ..Default::default()
    }
}

/// A random 64-row prompt for `config`'s text width (seeded).
fn bench_prompt(config: &ModelConfig, seed: u64) -> PromptEmbeds {
    let mut rng = Rng::new(seed);
    let rows = 64;
    PromptEmbeds {
        data: (0..rows * config.text_dim)
            .map(|_| rng.normal() * 0.1)
            .collect(),
        rows,
    }
}

fn end_to_end(model: &Model, built_s: f64, peak_tflops: f64) -> Vec<Value> {
    let c = model.config().clone();
    let prompt = bench_prompt(&c, 21);
    println!("\nend to end: wan-1.3b-shape, 60x104 latents, 21 frames (7 blocks), 4 steps (model built in {built_s:.1} s)");
    println!(
        "{:<22} {:>12} {:>14} {:>8} {:>8}",
        "schedule", "ms/block", "6th block ms", "FPS", "MFU"
    );
    let mut out = Vec::new();
    // The last rows are the sequential schedule again with one switch set: BC_ATTN_SPLIT=1 (no
    // split-KV: the sessions above split the self-attention where the wave-fill model says so),
    // and BC_ATTN_WGMMA=0: on a compute capability 9.0 device the sessions above run the wgmma
    // attention (the default there), this one the tuned mma.sync tiles (elsewhere it repeats the
    // first row); then sequential and lag 1 with BC_ATTN_WGMMA_VARIANT=ws (the warp-specialized
    // kernel, split where the model says so; off 9.0 the variant is ignored).
    let saved: Vec<_> = ["BC_ATTN_WGMMA", "BC_ATTN_SPLIT", "BC_ATTN_WGMMA_VARIANT"]
        .map(|k| (k, std::env::var_os(k)))
        .into_iter()
        .collect();
    for (name, schedule, switch) in [
        ("sequential", Schedule::Sequential, None),
        ("cascade lag 1", Schedule::Cascade { lag: 1 }, None),
        ("cascade lag 2", Schedule::Cascade { lag: 2 }, None),
        ("cascade lag 3", Schedule::Cascade { lag: 3 }, None),
        (
            "sequential no split",
            Schedule::Sequential,
            Some(("BC_ATTN_SPLIT", "1")),
        ),
        (
            "cascade lag 1 no split",
            Schedule::Cascade { lag: 1 },
            Some(("BC_ATTN_SPLIT", "1")),
        ),
        (
            "sequential mma.sync",
            Schedule::Sequential,
            Some(("BC_ATTN_WGMMA", "0")),
        ),
        (
            "sequential ws",
            Schedule::Sequential,
            Some(("BC_ATTN_WGMMA_VARIANT", "ws")),
        ),
        (
            "cascade lag 1 ws",
            Schedule::Cascade { lag: 1 },
            Some(("BC_ATTN_WGMMA_VARIANT", "ws")),
        ),
        (
            "sequential ws_deep",
            Schedule::Sequential,
            Some(("BC_ATTN_WGMMA_VARIANT", "ws_deep")),
        ),
    ] {
        for (k, v) in &saved {
            match v {
                Some(v) => std::env::set_var(k, v),
                None => std::env::remove_var(k),
            }
        }
        if switch == Some(("BC_ATTN_WGMMA_VARIANT", "ws")) && !attn_ws_ok(AttentionTile::WgmmaWs) {
            println!("{name}: skipped (BC_NO_ATTN_WS=1)");
            continue;
        }
        if switch == Some(("BC_ATTN_WGMMA_VARIANT", "ws_deep"))
            && !attn_ws_ok(AttentionTile::WgmmaWsDeep)
        {
            println!("{name}: skipped (BC_NO_ATTN_WS_DEEP=1)");
            continue;
        }
        if let Some((k, v)) = switch {
            std::env::set_var(k, v);
        }
        let opts = wan_shape_options(schedule);
        let gen = match Generator::new(model, opts, NoiseSource::Seeded(1), &prompt) {
            Ok(g) => g,
            Err(e) => {
                println!("{name}: {e}");
                continue;
            }
        };
        match gen.generate(7) {
            Ok((_, rep)) => {
                let bs = &rep.block_seconds;
                let steady: Vec<f64> = bs.iter().skip(2).copied().collect();
                let mean = steady.iter().sum::<f64>() / steady.len().max(1) as f64;
                let sixth = bs.get(5).copied().unwrap_or(f64::NAN);
                // FLOPs of one block: 4 steps + context pass over 3 frames (GEMMs + attention),
                // attention against the mean visible context (~ half the video).
                let fl = block_flops(&c, 4680, 3 * 4680);
                let mfu = fl / mean / 1e12 / peak_tflops;
                println!(
                    "{:<22} {:>12.1} {:>14.1} {:>8.1} {:>7.1}%",
                    name,
                    mean * 1e3,
                    sixth * 1e3,
                    12.0 / mean,
                    mfu * 100.0
                );
                out.push(json!({"schedule": name, "ms_per_block": mean * 1e3, "sixth_block_ms": sixth * 1e3, "fps": 12.0 / mean, "block_seconds": bs, "total_seconds": rep.total_seconds, "ticks": rep.ticks, "mfu": mfu}));
            }
            Err(e) => println!("{name}: {e}"),
        }
    }
    for (k, v) in &saved {
        match v {
            Some(v) => std::env::set_var(k, v),
            None => std::env::remove_var(k),
        }
    }
    println!(
        "SPLIT split attention launches in this process: {}",
        blockcascade::backend::cuda::ops::split_attention_launches()
    );
    // Both end up in the bundle's summary (end to end section).
    let (failed, last) = blockcascade::backend::cuda::graph_capture_failures();
    let last = last.map_or_else(String::new, |m| format!(" (last: {m}; these ran eagerly)"));
    println!("GRAPH captures_failed={failed}{last}");
    println!(
        "EPILOGUE unfused_gemm_shapes={}",
        blockcascade::backend::cuda::device::unfused_gemm_shapes()
    );
    out
}

/// Approximate FLOPs of one block (S=4 steps + the context pass) of `n` tokens attending to
/// `ctx` cached keys on average.
fn block_flops(c: &blockcascade::ModelConfig, n: usize, ctx: usize) -> f64 {
    let d = c.dim as f64;
    let nf = n as f64;
    let per_layer = 2.0 * nf * d * (3.0 * d + d + d + d + 2.0 * c.ffn_dim as f64)
        + 4.0 * nf * (ctx as f64 + nf) * d
        + 4.0 * nf * c.text_len as f64 * d;
    5.0 * per_layer * c.num_layers as f64
}

/// Where a steady 3-latent-frame block's device time goes, per decoder (default kernels, events
/// around every launch: `decode::profile_decode_device`): `DECODE profile` lines, the kernels
/// longest first, then the longest (kernel, grid) pairs, which tell the conv layers apart.
fn decode_profiles(conv_wgmma: bool, open: &dyn Fn() -> blockcascade::Result<Gpu>) {
    for kind in [DecoderKind::WanVae, DecoderKind::Taehv] {
        let flags = (conv_wgmma, false, false, true, true, false);
        let p = match blockcascade::decode::profile_decode_device(
            kind,
            (60, 104),
            3,
            None,
            flags,
            open,
        ) {
            Ok(p) => p,
            Err(e) => {
                println!("DECODE profile {kind} FAILED: {e}");
                continue;
            }
        };
        let total: f64 = p.kernels.iter().map(|k| k.ms).sum();
        let n: u64 = p.kernels.iter().map(|k| k.launches).sum();
        println!(
            "DECODE profile {kind} 60x104 3-frame block: {:.1} ms eager with events, {total:.1} ms on the device in {n} launches+copies ({:.0}%)",
            p.block_ms,
            100.0 * total / p.block_ms
        );
        let line = |k: &blockcascade::decode::KernelTime, grid: String| {
            println!(
                "DECODE profile {kind}   {:<28}{grid:<16} {:>5}x {:>8.2} ms {:>5.1}%",
                k.name,
                k.launches,
                k.ms,
                100.0 * k.ms / total.max(1e-9)
            )
        };
        for k in blockcascade::decode::by_kernel(&p.kernels).iter().take(8) {
            line(k, String::new());
        }
        for k in p.kernels.iter().take(6) {
            line(
                k,
                format!(" grid {}x{}x{}", k.grid[0], k.grid[1], k.grid[2]),
            );
        }
    }
}

/// `BC_BENCH_NCU=attention|conv|decode|kernels|dit`: a short run for Nsight Compute instead of
/// the bench (run.sh's `ncu` part; scripts/ncu_summary.py reads its CSV). `attention`: the
/// self-attention at the bench shape (q4680 k32760 12 x 128), two launches unsplit and two with
/// the split the wave-fill model picks, on the wgmma hd128 variants `pp_k128` (the default) and
/// `ws` where the wgmma probe passed (`BC_WGMMA_OK=1`), else on `rows128`. `conv`: the bench's
/// conv layers (`wan_conv_rows`, one launch per layer and kernel: see `time_ms`) on bc_conv and,
/// with wgmma, bc_conv_wgmma* and (unless `BC_BENCH_NO_CONV_WS=1`) bc_conv_wgmma_ws*, then
/// (unless `BC_BENCH_NO_CONV_HALO=1`) TAEHV's two 64-channel layers on bc_conv_wgmma_n64 and
/// the halo conv (`taehv_halo_conv_rows`). `decode`: one
/// 3-latent-frame block of each decoder at 480x832, the Wan VAE first, each on the default conv
/// kernels and, with wgmma, then on the ws conv. `kernels`: all three. `dit`: two blocks of the
/// wan-1.3b-shape model, sequential (run.sh sets `BC_NO_GRAPHS=1`: one launch per kernel).
/// run.sh stops the program (not ncu) at its deadline: ncu then reports the launches it profiled.
fn ncu_run(mut g: Gpu, what: &str) {
    let wgmma = g.compute_capability() == Some((9, 0))
        && std::env::var("BC_WGMMA_OK").is_ok_and(|v| v == "1");
    match what {
        "attention" | "conv" | "decode" | "kernels" => {
            if matches!(what, "attention" | "kernels") {
                ncu_attention(&mut g, wgmma);
            }
            if matches!(what, "conv" | "kernels") {
                let ws = wgmma && std::env::var_os("BC_BENCH_NO_CONV_WS").is_none();
                let mut rows = wan_conv_rows(&mut g, 1.0, wgmma, false, ws);
                if wgmma && std::env::var_os("BC_BENCH_NO_CONV_HALO").is_none() {
                    rows.extend(taehv_halo_conv_rows(&mut g, 1.0));
                }
                println!("NCU conv: {} layer launches", rows.len());
            }
            drop(g);
            if matches!(what, "decode" | "kernels") {
                ncu_decode(wgmma);
            }
        }
        "dit" => {
            drop(g);
            let model = wan_1_3b_shape_model();
            let prompt = bench_prompt(model.config(), 21);
            let opts = wan_shape_options(Schedule::Sequential);
            match Generator::new(&model, opts, NoiseSource::Seeded(1), &prompt)
                .and_then(|gen| gen.generate(2))
            {
                Ok((_, rep)) => println!(
                    "NCU dit sequential 2 blocks: {} ticks, {:.0} ms",
                    rep.ticks,
                    rep.total_seconds * 1e3
                ),
                Err(e) => println!("NCU dit FAILED: {e}"),
            }
        }
        _ => println!("NCU: BC_BENCH_NCU={what}: expected attention, conv, decode, kernels or dit"),
    }
}

/// [`ncu_run`]'s attention launches: per tile two unsplit, then (unless `BC_NO_SPLIT=1`) two
/// with the split the model picks.
fn ncu_attention(g: &mut Gpu, wgmma: bool) {
    let (heads, hd, dim, n, keys) = (12, 128, 1536, 3 * 1560, 21 * 1560);
    let AttnInputs {
        q, out, sd, id, gd, ..
    } = attention_inputs(g, n, keys, dim);
    let tiles = if wgmma {
        [
            AttentionTile::WgmmaPpK128,
            AttentionTile::WgmmaWs,
            AttentionTile::WgmmaWsDeep,
        ]
        .into_iter()
        .filter(|&t| attn_ws_ok(t))
        .collect()
    } else {
        vec![AttentionTile::Rows128]
    };
    for tile in tiles {
        let split = split_scratch(g, tile, (heads, hd, n, keys), None);
        let splits: &[Option<&ops::SplitScratch>] = if no_split() {
            &[None]
        } else {
            &[None, Some(&split)]
        };
        for &s in splits {
            for _ in 0..2 {
                let used = ops::attention(g, q, out, heads, hd, sd, id, gd, 1, n, tile, s);
                match used {
                    Ok(used) => println!("NCU attention {} splits={used}", tile.name()),
                    Err(e) => println!("NCU attention {} FAILED: {e}", tile.name()),
                }
            }
        }
    }
    g.sync().unwrap();
}

/// A split-KV partials buffer for `tile` at one group of `n` query rows against `keys` keys
/// (room for the most splits), `force`d to that many splits where given.
fn split_scratch(
    g: &mut Gpu,
    tile: AttentionTile,
    (heads, hd, n, keys): (usize, usize, usize, usize),
    force: Option<usize>,
) -> ops::SplitScratch {
    use blockcascade::kernels::launch;
    let bytes =
        launch::attention_split_bytes(heads, hd, 1, n, tile, launch::ATTN_MAX_SPLITS).unwrap();
    ops::SplitScratch {
        ptr: g.alloc(bytes).unwrap(),
        bytes,
        max_keys: keys,
        force,
    }
}

/// [`ncu_run`]'s decoder blocks: the Wan VAE (the longer block) first, each on the default conv
/// and then (where wgmma runs, unless `BC_BENCH_NO_CONV_WS=1`) on the ws conv.
fn ncu_decode(wgmma: bool) {
    let open = || Gpu::open_kernels(0);
    let no_ws = std::env::var_os("BC_BENCH_NO_CONV_WS").is_some();
    for (kind, ws) in [
        (DecoderKind::WanVae, false),
        (DecoderKind::WanVae, true),
        (DecoderKind::Taehv, false),
        (DecoderKind::Taehv, true),
    ] {
        if ws && (!wgmma || no_ws) {
            continue;
        }
        let tag = if ws { " ws" } else { "" };
        let r = blockcascade::decode::bench_decode_device(
            &[kind],
            (60, 104),
            (3, 1),
            None,
            (wgmma, false, ws, true, true, false),
            &open,
        );
        match r {
            Ok(r) => println!("NCU decode {kind}{tag}: {:.1} ms", r[0].first_block_ms),
            Err(e) => println!("NCU decode {kind}{tag} FAILED: {e}"),
        }
    }
}

/// `BC_BENCH_SMOKE=split|attention-ws|attention-ws-deep|conv-ws|conv-halo`: one short run of a kernel path never run on a
/// GPU before, in a process of its own under a short timeout (run.sh's wgmma part, before the
/// tests and the bench): `split` the default attention tile with a forced 2-way split-KV (and
/// `bc_attention_combine`), `attention-ws` the warp-specialized attention unsplit and split
/// (`attention-ws-deep` its deeper-pipelined twin),
/// `conv-ws` one 3-latent-frame block of each decoder on the ws conv (every ws tile: n192 and
/// n96 in the Wan VAE, n64 in TAEHV), `conv-halo` one TAEHV block on the persistent halo conv
/// (`bc_conv_halo_n64`), with the upsample convs in the parity form, then dense. Prints `SMOKE <what> ok` last when every launch returned
/// and the device synchronised; a hang never gets there (run.sh then sets `BC_NO_SPLIT=1`,
/// `BC_NO_ATTN_WS=1`, `BC_NO_ATTN_WS_DEEP=1`, `BC_BENCH_NO_CONV_WS=1` or `BC_BENCH_NO_CONV_HALO=1` for the later parts).
fn smoke_run(mut g: Gpu, what: &str) {
    let wgmma = g.compute_capability() == Some((9, 0))
        && std::env::var("BC_WGMMA_OK").is_ok_and(|v| v == "1");
    let t0 = std::time::Instant::now();
    let ok = match what {
        "split" | "attention-ws" | "attention-ws-deep" => {
            let (heads, hd, dim, n, keys) = (12, 128, 1536, 3 * 1560, 21 * 1560);
            let AttnInputs {
                q, out, sd, id, gd, ..
            } = attention_inputs(&mut g, n, keys, dim);
            let tile = match (what, wgmma) {
                ("split", true) => AttentionTile::WgmmaPpK128,
                ("split", false) => AttentionTile::Rows128,
                ("attention-ws-deep", _) => AttentionTile::WgmmaWsDeep,
                _ => AttentionTile::WgmmaWs,
            };
            let split = split_scratch(&mut g, tile, (heads, hd, n, keys), Some(2));
            let cases: &[Option<&ops::SplitScratch>] = if what == "split" {
                &[Some(&split)]
            } else {
                &[None, Some(&split)]
            };
            let mut ok = what == "split" || wgmma;
            if !ok {
                println!("SMOKE {what}: no wgmma here (BC_WGMMA_OK is not 1 or not sm_90)");
            }
            for &s in if ok { cases } else { &[] } {
                let r = ops::attention(&g, q, out, heads, hd, sd, id, gd, 1, n, tile, s)
                    .and_then(|used| g.sync().map(|_| used));
                match r {
                    Ok(used) => println!(
                        "SMOKE {what}: {} splits={used} returned ({:.2} s)",
                        tile.name(),
                        t0.elapsed().as_secs_f64()
                    ),
                    Err(e) => {
                        println!("SMOKE {what}: {} FAILED: {e}", tile.name());
                        ok = false;
                    }
                }
            }
            ok
        }
        "conv-ws" | "conv-halo" => {
            drop(g);
            let halo = what == "conv-halo";
            let open = || Gpu::open_kernels(0);
            let mut ok = wgmma;
            if !ok {
                println!("SMOKE {what}: no wgmma here (BC_WGMMA_OK is not 1 or not sm_90)");
            }
            // The halo conv takes only TAEHV's 64-channel layers.
            let kinds: &[DecoderKind] = match (ok, halo) {
                (false, _) => &[],
                (true, false) => &[DecoderKind::Taehv, DecoderKind::WanVae],
                (true, true) => &[DecoderKind::Taehv],
            };
            // The halo conv also dense (its 128-channel and upsampled bodies), after the
            // parity form the decoder runs by default.
            let forms: &[bool] = if halo { &[true, false] } else { &[true] };
            for &kind in kinds {
                for &parity in forms {
                    let form = if parity { "" } else { " dense" };
                    match blockcascade::decode::bench_decode_device(
                        &[kind],
                        (60, 104),
                        (3, 1),
                        None,
                        (true, false, !halo, parity, true, halo),
                        &open,
                    ) {
                        Ok(r) => println!(
                            "SMOKE {what}: {kind}{form} block returned, {:.1} ms ({:.2} s)",
                            r[0].first_block_ms,
                            t0.elapsed().as_secs_f64()
                        ),
                        Err(e) => {
                            println!("SMOKE {what}: {kind}{form} FAILED: {e}");
                            ok = false;
                        }
                    }
                }
            }
            ok
        }
        _ => {
            println!(
                "SMOKE: BC_BENCH_SMOKE={what}: expected split, attention-ws, conv-ws or conv-halo"
            );
            false
        }
    };
    if ok {
        println!("SMOKE {what} ok");
    } else {
        println!("SMOKE {what} FAILED");
        std::process::exit(1);
    }
}
