#!/usr/bin/env python3
"""PyTorch baseline for benches/gpu.rs: one Wan-1.3B-shaped block generated the Self-Forcing
way (4 denoising steps + a context pass that writes the block's K/V into the cache), written
directly in PyTorch: bf16 weights and activations, fp32 residual stream, F.scaled_dot_product_attention,
a preallocated KV cache of 21 frames (global attention), cross-attention over 512 text tokens.
Random weights (the engine's benchmark uses random weights too; speed does not depend on them).

Prints ms per block for the 6th block of a 7-block video (15 cached frames plus its own 3: 18 frames of
keys), like the engine's `sixth block ms`, plus a JSON line. Usage: python3 benches/pytorch_baseline.py [--compile]
"""
import json
import math
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    print("SKIP pytorch baseline: torch is not importable")
    sys.exit(0)

if not torch.cuda.is_available():
    print("SKIP pytorch baseline: torch sees no CUDA device")
    sys.exit(0)

DIM, FFN, HEADS, LAYERS, TEXT = 1536, 8960, 12, 30, 512
HD = DIM // HEADS
H, W, BF = 60, 104, 3
TPF = (H // 2) * (W // 2)
N = BF * TPF
CACHE_FRAMES = 21
dev = torch.device("cuda")
bf = torch.bfloat16
torch.manual_seed(0)


def lin(o, i):
    return (torch.randn(o, i, device=dev, dtype=bf) / math.sqrt(i), torch.randn(o, device=dev, dtype=bf) * 0.02)


class Layer:
    def __init__(self):
        self.qkv = lin(3 * DIM, DIM)
        self.o = lin(DIM, DIM)
        self.cq = lin(DIM, DIM)
        self.co = lin(DIM, DIM)
        self.f0 = lin(FFN, DIM)
        self.f2 = lin(DIM, FFN)
        self.nq = torch.ones(DIM, device=dev, dtype=torch.float32)
        self.nk = torch.ones(DIM, device=dev, dtype=torch.float32)
        self.cnq = torch.ones(DIM, device=dev, dtype=torch.float32)
        self.n3w = torch.ones(DIM, device=dev, dtype=torch.float32)
        self.n3b = torch.zeros(DIM, device=dev, dtype=torch.float32)
        self.mod = torch.randn(6, DIM, device=dev) / math.sqrt(DIM)
        self.ck = torch.randn(TEXT, HEADS, HD, device=dev, dtype=bf)
        self.cv = torch.randn(TEXT, HEADS, HD, device=dev, dtype=bf)
        self.cache_k = torch.zeros(CACHE_FRAMES * TPF, HEADS, HD, device=dev, dtype=bf)
        self.cache_v = torch.zeros(CACHE_FRAMES * TPF, HEADS, HD, device=dev, dtype=bf)


layers = [Layer() for _ in range(LAYERS)]
patch = lin(DIM, 64)
head = lin(64, DIM)


def rope_freqs():
    d = HD
    parts = [d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)]
    fs = [1.0 / (10000 ** (torch.arange(0, p, 2, device=dev, dtype=torch.float64) / p)) for p in parts]
    return fs


FREQS = rope_freqs()


def rope_table(first_frame):
    f = torch.arange(first_frame, first_frame + BF, device=dev, dtype=torch.float64)
    hh = torch.arange(H // 2, device=dev, dtype=torch.float64)
    ww = torch.arange(W // 2, device=dev, dtype=torch.float64)
    a = torch.outer(f, FREQS[0])[:, None, None, :].expand(BF, H // 2, W // 2, -1)
    b = torch.outer(hh, FREQS[1])[None, :, None, :].expand(BF, H // 2, W // 2, -1)
    c = torch.outer(ww, FREQS[2])[None, None, :, :].expand(BF, H // 2, W // 2, -1)
    ang = torch.cat([a, b, c], -1).reshape(N, 1, HD // 2)
    return torch.polar(torch.ones_like(ang), ang).to(torch.complex64)


def rope(x, tab):
    xc = torch.view_as_complex(x.float().reshape(N, HEADS, HD // 2, 2))
    return torch.view_as_real(xc * tab).reshape(N, HEADS, HD).to(bf)


def rms(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * w).to(bf)


def forward(lat_rows, e0, cached, tab, write_slot=None):
    x = F.linear(lat_rows, *patch).float()
    for L in layers:
        m = L.mod + e0
        y = (F.layer_norm(x, (DIM,), eps=1e-6) * (1 + m[1]) + m[0]).to(bf)
        q, k, v = F.linear(y, *L.qkv).split(DIM, -1)
        q = rope(rms(q, L.nq).view(N, HEADS, HD), tab)
        k = rope(rms(k, L.nk).view(N, HEADS, HD), tab)
        v = v.reshape(N, HEADS, HD)
        kk = torch.cat([L.cache_k[: cached * TPF], k], 0)
        vv = torch.cat([L.cache_v[: cached * TPF], v], 0)
        a = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk.transpose(0, 1)[None], vv.transpose(0, 1)[None])
        a = a[0].transpose(0, 1).reshape(N, DIM)
        if write_slot is not None:
            L.cache_k[write_slot * TPF:(write_slot + BF) * TPF] = k
            L.cache_v[write_slot * TPF:(write_slot + BF) * TPF] = v
        x = x + F.linear(a, *L.o).float() * m[2]
        y = (F.layer_norm(x, (DIM,), weight=L.n3w, bias=L.n3b, eps=1e-6)).to(bf)
        cq = rms(F.linear(y, *L.cq), L.cnq).view(N, HEADS, HD)
        a = F.scaled_dot_product_attention(cq.transpose(0, 1)[None], L.ck.transpose(0, 1)[None], L.cv.transpose(0, 1)[None])
        x = x + F.linear(a[0].transpose(0, 1).reshape(N, DIM), *L.co).float()
        y = (F.layer_norm(x, (DIM,), eps=1e-6) * (1 + m[4]) + m[3]).to(bf)
        h = F.gelu(F.linear(y, *L.f0), approximate="tanh")
        x = x + F.linear(h, *L.f2).float() * m[5]
    y = F.layer_norm(x, (DIM,), eps=1e-6).to(bf)
    return F.linear(y, *head)


@torch.no_grad()
def block(b):
    first = b * BF
    tab = rope_table(first)
    lat = torch.randn(N, 64, device=dev, dtype=bf)
    sig = [1.0, 0.9375, 0.8333, 0.625]
    for s in range(4):
        e0 = torch.randn(6, DIM, device=dev) * 0.1  # per-step conditioning (time MLP is negligible)
        v = forward(lat, e0, first // 1, tab)
        x0 = (lat.float() - sig[s] * v.float())
        if s < 3:
            lat = ((1 - sig[s + 1]) * x0 + sig[s + 1] * torch.randn_like(x0)).to(bf)
        else:
            lat = x0.to(bf)
    forward(lat, torch.zeros(6, DIM, device=dev), first, tab, write_slot=first)  # context pass


def main():
    global forward
    if "--compile" in sys.argv:
        forward = torch.compile(forward)
    times = []
    for b in range(7):
        torch.cuda.synchronize()
        t = time.perf_counter()
        block(b)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    sixth = times[5] * 1e3
    mean = sum(times[2:]) / len(times[2:]) * 1e3
    print(f"PYTORCH device={torch.cuda.get_device_name()} torch={torch.__version__} sixth_block_ms={sixth:.1f} mean_ms_per_block={mean:.1f} fps={12000.0 / mean:.1f}")
    print(json.dumps({"pytorch_sixth_block_ms": sixth, "pytorch_ms_per_block": mean, "block_ms": [t * 1e3 for t in times]}))


if __name__ == "__main__":
    main()
