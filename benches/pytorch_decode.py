#!/usr/bin/env python3
"""PyTorch baseline for the decoder benchmark: the same streamed decode on the same CPU cores.

Times public PyTorch code (imported from where it lives, never copied into this repository):
  * Wan VAE at dim 96 (the real Wan2.1 decoder), streamed: the caches cleared once, then per
    block of latent frames the un-normalisation, the 1x1x1 `conv2` and the decoder one latent
    frame at a time with the causal caches (`feat_cache`) carried across blocks, then clamp to
    [-1, 1], as `WanVAEWrapper.decode_to_pixel(use_cache=True)` streams. The module is either
      --repo: Self-Forcing's `wan/modules/vae.py` `WanVAE_` (`cached_decode`), or
      --wan-from diffusers: diffusers' `AutoencoderKLWan` (the same Wan2.1 VAE; its `_decode`
        loop, per latent frame with `_feat_map`, without the cache clears between blocks).
  * TAEHV `taew2_1` (widths 256/128/64/64): `TAEHV(checkpoint_path=None).decode_video(block,
    parallel=False)` per block, then `2x - 1` (the per-block cost of a streamed decode, frame by
    frame as our decoder runs it), from --repo's `demo_utils/taehv.py` or --taehv-file (a copy
    of madebyollin/taehv's `taehv.py`). --taehv-parallel also times `parallel=True` (all frames
    of a block per layer), usually faster on many cores, and uses the faster one for the ratio.
Weights are PyTorch's default random init (speed does not depend on the values).
--check GOLDEN_DIR first decodes the repo's golden cases (wan-vae-tiny, taehv-tiny) with the
very code paths that are timed (diffusers' names converted from upstream's) and prints their
relative L2 error against the stored expected video, so the baseline is known to do the same
math.

Usage:
  python3 benches/pytorch_decode.py (--repo SELF_FORCING | --wan-from diffusers --taehv-file F)
      [--latent-h 60 --latent-w 104] [--block 3] [--blocks 2] [--threads N] [--kinds wan,taehv]
      [--taehv-parallel] [--check GOLDEN_DIR] [--compare]
--device cuda [--dtype bf16|fp16|f32] times the same streamed decode on a GPU instead (weights
and latents in that dtype, cuDNN's autotuner on, a synchronize around each block, the CUDA
caching allocator's peak per decoder) and prints one `PYTORCH_DECODE kind ms=... peak_mib=...`
line per decoder for the GPU bundle's summary (scripts/gpu-run.sh), which sets it against the
engine's `decode KIND 60x104 3-frame block` rows. --check then runs on the device in that
dtype too, against a bound of 2e-2 (the engine's GPU decoders' bound) instead of 1e-4.
--compare then runs `cargo bench --bench decode` at the same shape with RAYON_NUM_THREADS set
to the same thread count and prints blockcascade / PyTorch per steady block, wall and CPU time
(below 1 means blockcascade is faster). CPU time is the process's (all threads), the figure
that survives a shared machine; set OMP_WAIT_POLICY=PASSIVE so that PyTorch's idle OpenMP
threads do not spin it up. Peak RSS is each run's Linux VmHWM, reset before each decoder
(the models' unused encoders are dropped; "before the model" is what the process held then,
mostly PyTorch itself).
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

# `wan_wrapper.py`'s latent statistics (the un-normalisation of `decode_to_pixel`).
WAN_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
            0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
           3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def dtype_of(a, torch):
    return {"f32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]


def place(a, torch, m):
    """`m` (a module or a tensor) on --device in --dtype."""
    return m.to(device=a.device, dtype=dtype_of(a, torch))


def sync(a, torch):
    if a.device != "cpu":
        torch.cuda.synchronize()


def wan_streamer(a, torch, dim=96, state_dict=None):
    """A function decoding one block `[1, 16, F, h, w]` of a stream, caches carried."""
    mean = place(a, torch, torch.tensor(WAN_MEAN))
    std = place(a, torch, torch.tensor(WAN_STD))
    if a.wan_from == "diffusers":
        from diffusers import AutoencoderKLWan
        model = AutoencoderKLWan(base_dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                 attn_scales=[], temperal_downsample=[False, True, True]).eval()
        if state_dict is not None:
            from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
            model.load_state_dict(convert_wan_vae_to_diffusers(state_dict))
        model.encoder = None  # the decode never uses it; memory then compares decoders
        model = place(a, torch, model)
        model.clear_cache()
        first = [True]

        def run(z):
            z = place(a, torch, z)
            z = z / (1.0 / std).view(1, 16, 1, 1, 1) + mean.view(1, 16, 1, 1, 1)
            x = model.post_quant_conv(z)
            out = None
            for i in range(x.shape[2]):
                model._conv_idx = [0]
                o = model.decoder(x[:, :, i:i + 1], feat_cache=model._feat_map,
                                  feat_idx=model._conv_idx, first_chunk=first[0])
                first[0] = False
                out = o if out is None else torch.cat([out, o], 2)
            return out.clamp_(-1, 1)
        return run
    sys.path.insert(0, a.repo)
    from wan.modules.vae import WanVAE_
    model = WanVAE_(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                    temperal_downsample=[False, True, True], dropout=0.0).eval()
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=False)
    model.clear_cache()  # counts the encoder's convs too: before dropping it
    model.encoder = None
    model = place(a, torch, model)

    def run(z):
        return model.cached_decode(place(a, torch, z), [mean, 1.0 / std]).clamp_(-1, 1)
    return run


def taehv_module(a):
    path = a.taehv_file or os.path.join(a.repo, "demo_utils", "taehv.py")
    spec = importlib.util.spec_from_file_location("taehv_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def taehv_decoder_only(a, torch, mod):
    model = mod.TAEHV(checkpoint_path=None).eval()
    model.encoder = None  # the decode never uses it
    return place(a, torch, model)


def taehv_runner(a, torch, model, parallel):
    def run(z):  # z: [1, F, 16, h, w]
        z = place(a, torch, z)
        return model.decode_video(z, parallel=parallel, show_progress_bar=False).mul_(2).sub_(1)
    return run


def load_st(path, torch):
    from safetensors.torch import load_file
    return load_file(path)


def rel_l2(torch, got, want):
    got, want = got.float().cpu(), want.float().cpu()
    return (torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want)).item()


def bound(a):
    """The golden check's bound: exact math in f32 on the CPU, the engine's GPU bound else."""
    return 1e-4 if a.dtype == "f32" and a.device == "cpu" else 2e-2


def check(a, torch):
    """Decodes the golden cases with the timed code paths; returns False on a mismatch."""
    ok = True
    kinds = a.kinds.split(",")
    if "wan" in kinds:
        d = os.path.join(a.check, "wan-vae-tiny")
        case = json.load(open(os.path.join(d, "case.json")))
        sd = load_st(os.path.join(d, "vae", "model.safetensors"), torch)
        lat = load_st(os.path.join(d, "latents.safetensors"), torch)
        z = next(iter(lat.values())).permute(1, 0, 2, 3)[None]  # [F,16,h,w] -> [1,16,F,h,w]
        want = next(iter(load_st(os.path.join(d, "expected.safetensors"), torch).values()))
        run = wan_streamer(a, torch, dim=case["dim"], state_dict=sd)
        with torch.no_grad():
            blocks = [run(z[:, :, i:i + a.block]) for i in range(0, z.shape[2], a.block)]
        got = torch.cat(blocks, 2)[0].permute(1, 0, 2, 3)
        e = rel_l2(torch, got, want.reshape(got.shape))
        print(f"check wan-vae-tiny ({a.wan_from or 'repo'}, blocks of {a.block}, {a.device} {a.dtype}): "
              f"rel L2 {e:.2e} (bound {bound(a):.0e})")
        ok &= e < bound(a)
    if "taehv" in kinds:
        d = os.path.join(a.check, "taehv-tiny")
        case = json.load(open(os.path.join(d, "case.json")))
        mod = taehv_module(a)
        # The file's TAEHV has the real widths; the golden case's are smaller. Build the same
        # layer list at the case's widths by scaling every conv (the module's own classes).
        sd = load_st(os.path.join(d, "taehv", "model.safetensors"), torch)
        model = mod.TAEHV(checkpoint_path=None).eval()
        import torch.nn as nn
        for name, m in list(model.named_modules()):
            key = f"{name}.weight"
            if isinstance(m, nn.Conv2d) and key in sd:
                w = sd[key]
                m.weight = nn.Parameter(w.clone())
                m.in_channels, m.out_channels = w.shape[1], w.shape[0]
                if m.bias is not None:
                    m.bias = nn.Parameter(sd[f"{name}.bias"].clone())
        lat = next(iter(load_st(os.path.join(d, "latents.safetensors"), torch).values()))
        want = next(iter(load_st(os.path.join(d, "expected.safetensors"), torch).values()))
        model = place(a, torch, model)
        for par in ([False, True] if a.taehv_parallel else [False]):
            with torch.no_grad():
                got = taehv_runner(a, torch, model, par)(lat[None])[0][case["frames_to_trim"]:]
            e = rel_l2(torch, got, want.reshape(got.shape))
            print(f"check taehv-tiny (parallel={par}, whole video, {a.device} {a.dtype}): rel L2 {e:.2e} "
                  f"(bound {bound(a):.0e})")
            ok &= e < bound(a)
    return ok


def bench(a, torch, kind, make_run, shape):
    reset_peak()
    base = peak_rss_mib()
    run = make_run()
    reset = reset_peak()  # the encoders' transient weights do not count
    gpu = a.device != "cpu"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    wall, cpu = [], []
    with torch.no_grad():
        for _ in range(max(1, a.blocks)):
            z = torch.randn(*shape)
            if gpu:
                z = z.to(a.device)
            sync(a, torch)
            t0, c0 = time.perf_counter(), time.process_time()
            out = run(z)
            sync(a, torch)
            wall.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
            del out
    sw, sc = wall[1:] or wall, cpu[1:] or cpu
    r = {
        "first_block_ms": wall[0],
        "block_ms": sum(sw) / len(sw),
        "cpu_block_ms": sum(sc) / len(sc),
        "peak_rss_mib": peak_rss_mib() if reset else None,
        "rss_before_mib": base if reset else None,
    }
    rss = r["peak_rss_mib"]
    print(f"pytorch {kind:14} {a.latent_h}x{a.latent_w} latents, blocks of {a.block}: first "
          f"{wall[0]:.1f} ms, {r['block_ms']:.1f} ms/block wall, {r['cpu_block_ms']:.1f} ms/block CPU, "
          f"peak RSS {'-' if rss is None else f'{rss:.0f}'} MiB (before the model: "
          f"{'-' if base is None else f'{base:.0f}'} MiB) (threads {a.threads})")
    if gpu:
        r["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        # One line for the GPU bundle's summary (scripts/gpu-run.sh).
        print(f"PYTORCH_DECODE {kind} {a.device} {a.dtype} {a.latent_h}x{a.latent_w} blocks of {a.block}: "
              f"ms={r['block_ms']:.2f} first_ms={wall[0]:.1f} peak_mib={r['gpu_peak_mib']:.0f} "
              f"({torch.cuda.get_device_name()}, torch {torch.__version__}, steady blocks {len(sw)})")
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=os.environ.get("SELF_FORCING"), help="Self-Forcing checkout (or $SELF_FORCING)")
    ap.add_argument("--wan-from", choices=["repo", "diffusers"], default=None,
                    help="where the Wan VAE comes from (default: --repo when given, else diffusers)")
    ap.add_argument("--taehv-file", help="a taehv.py (madebyollin/taehv) instead of --repo's demo_utils/taehv.py")
    ap.add_argument("--taehv-parallel", action="store_true", help="also time decode_video(parallel=True)")
    ap.add_argument("--latent-h", type=int, default=60)
    ap.add_argument("--latent-w", type=int, default=104)
    ap.add_argument("--block", type=int, default=3, help="latent frames per block")
    ap.add_argument("--blocks", type=int, default=2, help="blocks (the first fills the caches)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--kinds", default="wan,taehv")
    ap.add_argument("--check", metavar="GOLDEN_DIR", help="first check the golden cases (e.g. ../shared/golden)")
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N (prints PYTORCH_DECODE lines)")
    ap.add_argument("--dtype", choices=["f32", "bf16", "fp16"], default=None,
                    help="weights and activations (default: f32 on the CPU, bf16 on a GPU)")
    a = ap.parse_args()
    if a.dtype is None:
        a.dtype = "f32" if a.device == "cpu" else "bf16"
    if a.wan_from is None:
        a.wan_from = "repo" if a.repo else "diffusers"
    if a.wan_from == "repo":
        a.wan_from = None

    try:
        import torch
    except ImportError:
        print("SKIP pytorch decode: PyTorch is not installed (pip install torch); nothing measured.")
        return 2
    kinds = a.kinds.split(",")
    need_repo = ("wan" in kinds and a.wan_from is None) or ("taehv" in kinds and not a.taehv_file)
    if need_repo and (not a.repo or not os.path.isdir(a.repo)):
        print("pytorch_decode.py: pass --repo PATH to a guandeh17/Self-Forcing checkout (it provides "
              "wan/modules/vae.py and demo_utils/taehv.py), or --wan-from diffusers (pip install "
              "diffusers) and --taehv-file PATH/taehv.py; nothing measured.")
        return 2
    if a.device != "cpu":
        if not torch.cuda.is_available():
            print(f"SKIP pytorch decode: torch sees no CUDA device for --device {a.device}")
            return 0
        torch.backends.cudnn.benchmark = True  # what a tuned PyTorch deployment turns on
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.check and not check(a, torch):
        print("pytorch_decode.py: the baseline does not reproduce the golden cases; not timing it.")
        return 1
    results = {}
    for kind in kinds:
        if kind == "wan":
            results["wan"] = bench(a, torch, "wan", lambda: wan_streamer(a, torch),
                                   (1, 16, a.block, a.latent_h, a.latent_w))
        elif kind == "taehv":
            mod = taehv_module(a)
            shape = (1, a.block, 16, a.latent_h, a.latent_w)
            modes = [False, True] if a.taehv_parallel else [False]
            runs = {}
            for par in modes:
                runs[par] = bench(a, torch, f"taehv{' parallel' if par else ''}",
                                  lambda: taehv_runner(a, torch, taehv_decoder_only(a, torch, mod), par), shape)
            best = min(runs.values(), key=lambda r: r["cpu_block_ms"])
            results["taehv"] = dict(best, parallel=best is runs.get(True))
        else:
            print(f"unknown kind {kind}")
            return 2
    if a.compare:
        cmd = ["cargo", "bench", "--bench", "decode", "--", str(a.latent_h), str(a.latent_w), str(a.block),
               str(a.blocks), a.kinds]
        env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
        out = subprocess.run(cmd, capture_output=True, text=True, env=env).stdout
        print(out, end="")
        for line in out.splitlines():
            f = line.split()
            if f and f[0] in results and len(f) > 5 and f[4] != "-":
                p = results[f[0]]
                ours_wall, ours_cpu = float(f[4]), float(f[5])
                p.update(ours_block_ms=ours_wall, ours_cpu_block_ms=ours_cpu,
                         ratio_wall=ours_wall / p["block_ms"], ratio_cpu=ours_cpu / p["cpu_block_ms"])
                print(f"ratio {f[0]}: blockcascade / PyTorch = {p['ratio_wall']:.2f} wall, "
                      f"{p['ratio_cpu']:.2f} CPU time (threads {a.threads})")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
