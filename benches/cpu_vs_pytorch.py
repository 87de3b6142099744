#!/usr/bin/env python3
"""The CPU engine against a PyTorch pipeline of the same model on the same cores
(driven by benches/cpu_vs_pytorch.sh).

  make DIR [--dim 512 --heads 8 --layers 8 --ffn 2048 --frames 9 --height 16 --width 16]
      writes DIR/model/{config.json, diffusion_pytorch_model.safetensors} (random f32 weights,
      the built-in models' scheme), DIR/prompt_embeds.safetensors and DIR/noise.safetensors.
      Needs numpy only.
  torch DIR OUT [--threads N] [--reps R]
      runs the Self-Forcing sequential pipeline of that model in PyTorch (f32): per block of 3
      latent frames, 4 denoising steps over the KV cache of the earlier blocks, then a context
      pass at t = 0 that writes the block's K/V (skipped for the last block, whose K/V nobody
      reads, as the engine skips it). Weight loading is excluded from the time; the prompt's
      text embedding and cross-attention K/V are included (the engine computes them too).
      Prints one line `TORCH wall_s=... cpu_s=...` per repetition after a warm-up run, and
      writes the last run's latents to OUT (tensor `latents` [F,16,H,W]).
  gemm [--threads N] M,K,N ...
      torch's f32 GEMM rate (best of several) at the given shapes: `TORCH_GEMM m k n gflops`.
  engine BIN DIR OUT [ARGS...]
      runs `BIN generate` on that case as a whole process (load included) and prints
      `ENGINE wall_s=... cpu_s=...` (cpu = the child's user + system time).
  compare A B
      relative L2 distance of the `latents` tensors of two safetensors files.
"""
import json
import math
import os
import struct
import sys
import time

try:
    import numpy as np
except ImportError:
    print("SKIP: numpy is not importable")
    sys.exit(0)

STEPS = [1000, 750, 500, 250]
SHIFT = 5.0
BLOCK = 3
EPS = 1e-6


def save_st(path, tensors):
    header, off, blobs = {}, 0, []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a, dtype=np.float32)
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
        blobs.append(a.tobytes())
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def load_st(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", f"{name}: only F32 is written by `make`"
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=np.float32).reshape(info["shape"])
    return out


def arg(argv, name, default):
    return type(default)(argv[argv.index(name) + 1]) if name in argv else default


def weight_shapes(c):
    d = c["dim"]
    v = [("patch_embedding.weight", [d, c["in_dim"], 1, 2, 2]), ("patch_embedding.bias", [d]),
         ("text_embedding.0.weight", [d, c["text_dim"]]), ("text_embedding.0.bias", [d]),
         ("text_embedding.2.weight", [d, d]), ("text_embedding.2.bias", [d]),
         ("time_embedding.0.weight", [d, c["freq_dim"]]), ("time_embedding.0.bias", [d]),
         ("time_embedding.2.weight", [d, d]), ("time_embedding.2.bias", [d]),
         ("time_projection.1.weight", [6 * d, d]), ("time_projection.1.bias", [6 * d])]
    for l in range(c["num_layers"]):
        for a in ("self_attn", "cross_attn"):
            for p in "qkvo":
                v += [(f"blocks.{l}.{a}.{p}.weight", [d, d]), (f"blocks.{l}.{a}.{p}.bias", [d])]
            v += [(f"blocks.{l}.{a}.norm_q.weight", [d]), (f"blocks.{l}.{a}.norm_k.weight", [d])]
        v += [(f"blocks.{l}.norm3.weight", [d]), (f"blocks.{l}.norm3.bias", [d]),
              (f"blocks.{l}.ffn.0.weight", [c["ffn_dim"], d]), (f"blocks.{l}.ffn.0.bias", [c["ffn_dim"]]),
              (f"blocks.{l}.ffn.2.weight", [d, c["ffn_dim"]]), (f"blocks.{l}.ffn.2.bias", [d]),
              (f"blocks.{l}.modulation", [1, 6, d])]
    v += [("head.head.weight", [c["out_dim"] * 4, d]), ("head.head.bias", [c["out_dim"] * 4]),
          ("head.modulation", [1, 2, d])]
    return v


def make(argv):
    out = argv[0]
    dim, heads = arg(argv, "--dim", 512), arg(argv, "--heads", 8)
    layers, ffn = arg(argv, "--layers", 8), arg(argv, "--ffn", 2048)
    frames, h, w = arg(argv, "--frames", 9), arg(argv, "--height", 16), arg(argv, "--width", 16)
    cfg = {"dim": dim, "ffn_dim": ffn, "freq_dim": 256, "num_heads": heads, "num_layers": layers,
           "in_dim": 16, "out_dim": 16, "text_len": 512, "text_dim": 4096, "patch_size": [1, 2, 2],
           "eps": EPS, "model_type": "t2v"}
    rng = np.random.default_rng(18)
    wts = {}
    for name, shape in weight_shapes(cfg):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        if name.endswith("modulation"):
            a = rng.standard_normal(shape, np.float32) / math.sqrt(dim)
        elif "norm" in name and name.endswith("weight"):
            a = 1 + 0.1 * rng.standard_normal(shape, np.float32)
        elif name.endswith("bias"):
            a = 0.02 * rng.standard_normal(shape, np.float32)
        else:
            a = rng.standard_normal(shape, np.float32) / math.sqrt(fan_in)
        wts[name] = a
    os.makedirs(f"{out}/model", exist_ok=True)
    with open(f"{out}/model/config.json", "w") as f:
        json.dump(cfg, f)
    save_st(f"{out}/model/diffusion_pytorch_model.safetensors", wts)
    save_st(f"{out}/prompt_embeds.safetensors",
            {"prompt_embeds": rng.standard_normal((77, 4096), np.float32) * 0.1})
    save_st(f"{out}/noise.safetensors", {
        "noise": rng.standard_normal((frames, 16, h, w), np.float32),
        "renoise": rng.standard_normal((frames, len(STEPS) - 1, 16, h, w), np.float32)})
    with open(f"{out}/case.json", "w") as f:
        json.dump({"frames": frames, "height": h, "width": w}, f)


def torch_pipeline(argv):
    import torch
    import torch.nn.functional as F

    case, out = argv[0], argv[1]
    threads, reps = arg(argv, "--threads", os.cpu_count()), arg(argv, "--reps", 1)
    torch.set_num_threads(threads)
    cfg = json.load(open(f"{case}/model/config.json"))
    cj = json.load(open(f"{case}/case.json"))
    W = {k: torch.from_numpy(v.copy()) for k, v in load_st(f"{case}/model/diffusion_pytorch_model.safetensors").items()}
    prompt = torch.from_numpy(load_st(f"{case}/prompt_embeds.safetensors")["prompt_embeds"].copy())
    nz = load_st(f"{case}/noise.safetensors")
    noise, renoise = torch.from_numpy(nz["noise"].copy()), torch.from_numpy(nz["renoise"].copy())
    D, NH, L = cfg["dim"], cfg["num_heads"], cfg["num_layers"]
    HD = D // NH
    FR, H, Wd = cj["frames"], cj["height"], cj["width"]
    hp, wp = H // 2, Wd // 2
    T = hp * wp
    NB = FR // BLOCK
    N = BLOCK * T
    lw = lambda p: (W[p + ".weight"], W[p + ".bias"])
    layers = []
    for l in range(L):
        b = f"blocks.{l}."
        qkv_w = torch.cat([W[b + f"self_attn.{p}.weight"] for p in "qkv"])
        qkv_b = torch.cat([W[b + f"self_attn.{p}.bias"] for p in "qkv"])
        layers.append(dict(
            qkv=(qkv_w, qkv_b), o=lw(b + "self_attn.o"), nq=W[b + "self_attn.norm_q.weight"],
            nk=W[b + "self_attn.norm_k.weight"], cq=lw(b + "cross_attn.q"), ck=lw(b + "cross_attn.k"),
            cv=lw(b + "cross_attn.v"), co=lw(b + "cross_attn.o"), cnq=W[b + "cross_attn.norm_q.weight"],
            cnk=W[b + "cross_attn.norm_k.weight"], n3=lw(b + "norm3"), f0=lw(b + "ffn.0"),
            f2=lw(b + "ffn.2"), mod=W[b + "modulation"][0],
            cache_k=torch.zeros(NH, FR * T, HD), cache_v=torch.zeros(NH, FR * T, HD)))
    patch_w = W["patch_embedding.weight"].reshape(D, 64)
    patch_b = W["patch_embedding.bias"]
    u = 1 - torch.arange(1000, dtype=torch.float64) / 1000
    sig = SHIFT * u / (1 + (SHIFT - 1) * u)
    sigmas = [float(sig[1000 - k]) for k in STEPS]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w

    def rope_tables(first):
        d6 = HD // 6
        parts = [HD - 4 * d6, 2 * d6, 2 * d6]
        pos = [torch.arange(first, first + BLOCK, dtype=torch.float64).repeat_interleave(T),
               torch.arange(hp, dtype=torch.float64).repeat_interleave(wp).repeat(BLOCK),
               torch.arange(wp, dtype=torch.float64).repeat(BLOCK * hp)]
        ang = torch.cat([torch.outer(p, 10000.0 ** (-2 * torch.arange(n // 2, dtype=torch.float64) / n))
                         for p, n in zip(pos, parts)], 1)
        return ang.cos().float()[:, None, :], ang.sin().float()[:, None, :]

    def rope(x, cs):
        c, s = cs
        x = x.view(N, NH, HD // 2, 2)
        a, b = x[..., 0], x[..., 1]
        return torch.stack([a * c - b * s, a * s + b * c], -1).view(N, NH, HD)

    def time_emb(t):
        half = cfg["freq_dim"] // 2
        a = t * 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
        s = torch.cat([a.cos(), a.sin()]).float()[None]
        e = F.linear(F.silu(F.linear(s, *lw("time_embedding.0"))), *lw("time_embedding.2"))
        return e[0], F.linear(F.silu(e), *lw("time_projection.1")).view(6, D)

    def forward(lat, t, f0, ctx_kv, tabs, write):
        x = F.linear(lat.reshape(BLOCK, 16, hp, 2, wp, 2).permute(0, 2, 4, 1, 3, 5).reshape(N, 64), patch_w, patch_b)
        e, e0 = time_emb(t)
        ncache = f0 * T
        for ly, (ck, cv) in zip(layers, ctx_kv):
            m = ly["mod"] + e0
            y = F.layer_norm(x, (D,), eps=EPS) * (1 + m[1]) + m[0]
            q, k, v = F.linear(y, *ly["qkv"]).split(D, -1)
            q = rope(rms(q, ly["nq"]).view(N, NH, HD), tabs).transpose(0, 1)
            k = rope(rms(k, ly["nk"]).view(N, NH, HD), tabs).transpose(0, 1)
            v = v.reshape(N, NH, HD).transpose(0, 1)
            kk = torch.cat([ly["cache_k"][:, :ncache], k], 1)
            vv = torch.cat([ly["cache_v"][:, :ncache], v], 1)
            a = F.scaled_dot_product_attention(q, kk, vv).transpose(0, 1).reshape(N, D)
            if write:
                ly["cache_k"][:, ncache:ncache + N] = k
                ly["cache_v"][:, ncache:ncache + N] = v
            x = x + F.linear(a, *ly["o"]) * m[2]
            y = F.layer_norm(x, (D,), *ly["n3"], eps=EPS)
            cq = rms(F.linear(y, *ly["cq"]), ly["cnq"]).view(N, NH, HD).transpose(0, 1)
            a = F.scaled_dot_product_attention(cq, ck, cv).transpose(0, 1).reshape(N, D)
            x = x + F.linear(a, *ly["co"])
            y = F.layer_norm(x, (D,), eps=EPS) * (1 + m[4]) + m[3]
            x = x + F.linear(F.gelu(F.linear(y, *ly["f0"]), approximate="tanh"), *ly["f2"]) * m[5]
        hm = W["head.modulation"][0] + e
        o = F.linear(F.layer_norm(x, (D,), eps=EPS) * (1 + hm[1]) + hm[0], *lw("head.head"))
        return o.reshape(BLOCK, hp, wp, 2, 2, 16).permute(0, 5, 1, 3, 2, 4).reshape(BLOCK, 16, H, Wd)

    @torch.inference_mode()
    def pipeline():
        ctx = torch.zeros(cfg["text_len"], cfg["text_dim"])
        ctx[: prompt.shape[0]] = prompt
        ctx = F.linear(F.gelu(F.linear(ctx, *lw("text_embedding.0")), approximate="tanh"), *lw("text_embedding.2"))
        ctx_kv = [(rms(F.linear(ctx, *ly["ck"]), ly["cnk"]).view(-1, NH, HD).transpose(0, 1),
                   F.linear(ctx, *ly["cv"]).view(-1, NH, HD).transpose(0, 1)) for ly in layers]
        outs = []
        for b in range(NB):
            f0 = b * BLOCK
            tabs = rope_tables(f0)
            x = noise[f0:f0 + BLOCK]
            for s, sg in enumerate(sigmas):
                v = forward(x, 1000.0 * sg, f0, ctx_kv, tabs, False)
                x0 = x - sg * v
                x = (1 - sigmas[s + 1]) * x0 + sigmas[s + 1] * renoise[f0:f0 + BLOCK, s] if s + 1 < len(sigmas) else x0
            if b + 1 < NB:
                forward(x, 0.0, f0, ctx_kv, tabs, True)
            outs.append(x)
        return torch.cat(outs)

    pipeline()  # warm-up (allocator, thread pool, kernel selection)
    for _ in range(reps):
        c0, t0 = os.times(), time.perf_counter()
        lat = pipeline()
        wall, c1 = time.perf_counter() - t0, os.times()
        cpu = (c1.user - c0.user) + (c1.system - c0.system)
        print(f"TORCH wall_s={wall:.4f} cpu_s={cpu:.4f} threads={threads} torch={torch.__version__}", flush=True)
    save_st(out, {"latents": lat.numpy()})


def gemm(argv):
    import torch

    threads = arg(argv, "--threads", os.cpu_count())
    torch.set_num_threads(threads)
    for s in [a for a in argv if "," in a]:
        m, k, n = map(int, s.split(","))
        a, w = torch.randn(m, k), torch.randn(n, k)
        reps = max(3, int(2e10 / (2 * m * k * n)))
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(reps):
                torch.nn.functional.linear(a, w)
            best = min(best, (time.perf_counter() - t) / reps)
        print(f"TORCH_GEMM {m} {k} {n} {2 * m * k * n / best / 1e9:.1f}", flush=True)


def engine(argv):
    import resource
    import subprocess

    binary, case, out = argv[0], argv[1], argv[2]
    cj = json.load(open(f"{case}/case.json"))
    cmd = [binary, "generate", "--model", f"{case}/model", "--prompt-embeds", f"{case}/prompt_embeds.safetensors",
           "--noise", f"{case}/noise.safetensors", "--frames", str(cj["frames"]), "--height", str(cj["height"]),
           "--width", str(cj["width"]), "--out", out, "--quiet"] + argv[3:]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(f"ENGINE wall_s={wall:.4f} cpu_s={cpu:.4f}", flush=True)


def compare(argv):
    a, b = load_st(argv[0])["latents"].astype(np.float64), load_st(argv[1])["latents"].astype(np.float64)
    print(f"{np.linalg.norm(a - b) / np.linalg.norm(a):.3e}")


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd in ("torch", "gemm"):
        try:
            import torch  # noqa: F401
        except ImportError:
            print("SKIP: torch is not importable")
            sys.exit(0)
    {"make": make, "torch": torch_pipeline, "gemm": gemm, "engine": engine, "compare": compare}[cmd](rest)
