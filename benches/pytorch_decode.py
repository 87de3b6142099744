#!/usr/bin/env python3
"""PyTorch baseline for the decoder benchmark: the same streamed decode on the same CPU cores.

Times upstream's own code (from a Self-Forcing checkout, not a copy of it):
  * Wan VAE: `WanVAE_` at dim 96 (the real Wan2.1 decoder), `clear_cache()` then
    `cached_decode(block)` per block of latent frames (the caches carried across blocks, as
    `WanVAEWrapper.decode_to_pixel(use_cache=True)` streams), then `clamp_(-1, 1)`;
  * TAEHV: `TAEHV(checkpoint_path=None)` (widths 256/128/64/64), `decode_video(block,
    parallel=False)` per block (the per-block cost of a streamed decode).
Weights are PyTorch's default random init (speed does not depend on the values).

Usage:
  python3 benches/pytorch_decode.py --repo PATH/TO/Self-Forcing [--latent-h 60 --latent-w 104]
      [--block 3] [--blocks 2] [--threads N] [--kinds wan,taehv] [--compare]
--compare also runs `cargo bench --bench decode` with the same shape and prints the ratio
blockcascade / PyTorch (below 1 means blockcascade is faster).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=os.environ.get("SELF_FORCING"), help="Self-Forcing checkout (or $SELF_FORCING)")
    ap.add_argument("--latent-h", type=int, default=60)
    ap.add_argument("--latent-w", type=int, default=104)
    ap.add_argument("--block", type=int, default=3, help="latent frames per block")
    ap.add_argument("--blocks", type=int, default=2, help="blocks (the first fills the caches)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--kinds", default="wan,taehv")
    ap.add_argument("--compare", action="store_true")
    a = ap.parse_args()

    try:
        import torch
    except ImportError:
        print("pytorch_decode.py: PyTorch is not installed (pip install torch); nothing measured.")
        return 2
    if not a.repo or not os.path.isdir(a.repo):
        print("pytorch_decode.py: pass --repo PATH to a guandeh17/Self-Forcing checkout "
              "(it provides wan/modules/vae.py and demo_utils/taehv.py); nothing measured.")
        return 2
    sys.path.insert(0, a.repo)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    results = {}
    for kind in a.kinds.split(","):
        if kind == "wan":
            from wan.modules.vae import WanVAE_
            model = WanVAE_(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                            temperal_downsample=[False, True, True], dropout=0.0).eval()
            mean = torch.zeros(16)
            inv_std = torch.ones(16)
            model.clear_cache()

            def run(z):
                return model.cached_decode(z, [mean, inv_std]).clamp_(-1, 1)

            shape = lambda b: (1, 16, b, a.latent_h, a.latent_w)
        elif kind == "taehv":
            from demo_utils.taehv import TAEHV
            model = TAEHV(checkpoint_path=None).eval()

            def run(z):
                return model.decode_video(z, parallel=False, show_progress_bar=False).mul_(2).sub_(1)

            shape = lambda b: (1, b, 16, a.latent_h, a.latent_w)
        else:
            print(f"unknown kind {kind}")
            return 2
        times = []
        with torch.no_grad():
            for _ in range(max(1, a.blocks)):
                z = torch.randn(*shape(a.block))
                t0 = time.perf_counter()
                out = run(z)
                times.append((time.perf_counter() - t0) * 1e3)
                del out
        steady = times[1:] or times
        results[kind] = {
            "first_block_ms": times[0],
            "block_ms": sum(steady) / len(steady),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        print(f"pytorch {kind:6} {a.latent_h}x{a.latent_w} latents, blocks of {a.block}: first {times[0]:.1f} ms, "
              f"{results[kind]['block_ms']:.1f} ms/block, peak RSS {results[kind]['peak_rss_mib']:.0f} MiB "
              f"(threads {a.threads})")
        del model
    if a.compare:
        cmd = ["cargo", "bench", "--bench", "decode", "--", str(a.latent_h), str(a.latent_w), str(a.block),
               str(a.blocks), a.kinds]
        env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
        out = subprocess.run(cmd, capture_output=True, text=True, env=env).stdout
        print(out, end="")
        for line in out.splitlines():
            f = line.split()
            if f and f[0] in results and len(f) > 4 and f[4] != "-":
                ours = float(f[4])
                print(f"ratio {f[0]}: blockcascade / PyTorch = {ours / results[f[0]]['block_ms']:.2f}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
