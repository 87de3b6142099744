#!/usr/bin/env python3
"""PyTorch baseline for `blockcascade bench --text-encoder`: the umT5-XXL encoder on the same
CPU cores, written here in plain PyTorch from the math (docs/text-encoder.md "The math"):

  x = embed[ids]; per layer: x += O(attn(rms1(x))), attention scores q.k + bias[bucket(j-i)]
  with no 1/sqrt(d), per-layer bias table [32 buckets, heads], bidirectional buckets (8 exact,
  8 logarithmic up to distance 128 per direction); x += fc2(gelu_tanh(gate(h)) * fc1(h)) with
  h = rms2(x); then a final RMS norm (T5's: no mean, no bias, eps 1e-6).

Benchmark shape = ours: real dims (dim 4096, 64 heads, 24 layers, FFN 10240, 32 buckets),
random bf16 weights, one layer generated and shared by the 24 layers (same work, 0.4 GB
instead of 11.4 GB; the layer is 0.39 GB of bf16, far larger than any cache, so sharing it
saves no memory traffic), an embedding of 1024 rows, a 30-token prompt, batch 1, only the
prompt's rows computed (no padding; `--pad N` pads to N tokens with the masked keys as
upstream does, for what upstream really pays at text_len 512).

Modes (--modes, comma-separated):
  f32   weights held in f32 (the bf16 values upcast once), f32 arithmetic: exactly the function
        ours computes (ours keeps the bf16 bytes and converts them as it reads them). This is
        how Self-Forcing's `WanTextEncoder` builds the encoder (umt5_xxl(dtype=torch.float32,
        device='cpu'), the bf16 checkpoint loaded into it). Memory: 4 bytes per parameter.
  bf16  every parameter and activation bf16, the norm statistics and the softmax in f32 (the
        casts of Wan's T5 module): Wan2.1's `T5EncoderModel` with its default `t5_dtype`
        torch.bfloat16, which is what `generate.py --t5_cpu` runs on the CPU. Not autocast:
        upstream converts the module. Less exact than f32 (see --check).

Thread count: --threads, default $BC_THREADS, else $RAYON_NUM_THREADS, else all cores;
torch.set_num_threads(threads), and the same RAYON_NUM_THREADS for ours. Set
OMP_WAIT_POLICY=PASSIVE (this script sets it when unset, before importing torch) so that idle
OpenMP threads yield instead of spinning: on a shared machine that is what makes PyTorch's CPU
time mean the work done. CPU time is the process's (all threads, time.process_time); it is
the figure that survives a loaded machine, wall time does not.

--check DIR (the golden case tests/data/umt5-tiny or ../shared/golden/umt5-tiny) first runs
the very code that is timed on the golden weights and ids and prints the relative L2 distance
to the recorded upstream embeddings: f32 must be ~1e-6 (same math), bf16 is printed for
information. --compare then runs `blockcascade bench --text-encoder --text-encoder-precision P`
(the release binary, --bin or $BC_BIN, default target/release/blockcascade) for each P of
--ours (exact, bf16) interleaved with the PyTorch runs, --rounds times, and prints
blockcascade / PyTorch per pair, wall and CPU time (below 1 means blockcascade is faster):
ours exact computes PyTorch f32's function, ours bf16 PyTorch bf16's.

--device cuda times the same encoder on the GPU instead (eager PyTorch, the --modes given,
default bf16 there: Wan's T5EncoderModel on the GPU), --reps runs after 3 warm-ups, each
between torch.cuda.synchronize() calls, and prints one line per mode for the GPU bundle:
  PYTORCH_TEXT device=NAME mode=bf16 tokens=30 ms=MEDIAN min_ms=MIN runs=N
(`scripts/gpu-run.sh` runs it in its pytorch part and sets it against `benches/gpu.rs`'s
`TEXT umt5-xxl` line: ours on the device, 24 distinct layers; this one shares one layer, whose
0.39 GB is far larger than the GPU's L2, so the weight traffic is the same).

Usage:
  OMP_WAIT_POLICY=PASSIVE /path/to/python benches/pytorch_text_encoder.py \
      [--check tests/data/umt5-tiny] [--tokens 30] [--threads N] [--modes f32,bf16] \
      [--reps 2] [--rounds 2] [--pad 0] [--compare [--ours exact,bf16] [--bin target/release/blockcascade]]
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

XXL = dict(dim=4096, dim_attn=4096, ffn=10240, heads=64, layers=24, buckets=32)
MAX_DISTANCE = 128
EPS = 1e-6


def default_threads():
    for var in ("BC_THREADS", "RAYON_NUM_THREADS"):
        v = os.environ.get(var)
        if v and v.isdigit() and int(v) > 0:
            return int(v)
    return os.cpu_count() or 1


def buckets_of(torch, l, n_buckets, max_distance):
    """[l, l] bucket of `key - query` (bidirectional), the logarithmic part in f32."""
    pos = torch.arange(l)
    rel = pos[None, :] - pos[:, None]
    half = n_buckets // 2
    base = (rel > 0).long() * half
    n = rel.abs()
    exact = half // 2
    # log(0) for n = 0 is -inf; those entries take the exact branch below.
    logs = torch.log(n.float() / exact) / math.log(max_distance / exact) * (half - exact)
    large = (exact + logs.clamp(min=-1.0).long()).clamp(max=half - 1)
    return base + torch.where(n < exact, n, large)


def gelu(torch, x):
    """Upstream's GELU (wan/modules/t5.py `GELU`): the tanh form written out, so that in bf16
    every op rounds (F.gelu(approximate="tanh") rounds once and differs on 1002 of the 65280
    finite bf16 inputs; upstream's is exactly 0 below about -3.4)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Encoder:
    """umT5 encoder over a dict of Wan-named weights; `dtype` is the activations' dtype (the
    weights are expected in it already)."""

    def __init__(self, torch, w, layers, heads, dtype):
        self.t, self.w, self.layers, self.heads, self.dtype = torch, w, layers, heads, dtype
        self.F = torch.nn.functional

    def rms(self, x, weight):
        t = self.t
        y = x * t.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS)
        return weight * y.to(weight.dtype)

    def __call__(self, ids, mask=None):
        t, F, w, H = self.t, self.F, self.w, self.heads
        x = w["token_embedding.weight"][ids]
        l = x.shape[0]
        buckets = buckets_of(t, l, self.n_buckets, MAX_DISTANCE)
        for i in range(self.layers):
            p = self.layer_prefix(i)
            h = self.rms(x, w[p + "norm1.weight"])
            q = F.linear(h, w[p + "attn.q.weight"]).view(l, H, -1)
            k = F.linear(h, w[p + "attn.k.weight"]).view(l, H, -1)
            v = F.linear(h, w[p + "attn.v.weight"]).view(l, H, -1)
            bias = w[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)  # [H, l, l]
            if mask is not None:
                bias = bias.masked_fill(mask.view(1, 1, l) == 0, t.finfo(x.dtype).min)
            s = t.einsum("ihc,jhc->hij", q, k) + bias
            a = F.softmax(s.float(), dim=-1).to(x.dtype)
            a = t.einsum("hij,jhc->ihc", a, v).reshape(l, -1)
            x = x + F.linear(a, w[p + "attn.o.weight"])
            h = self.rms(x, w[p + "norm2.weight"])
            g = gelu(t, F.linear(h, w[p + "ffn.gate.0.weight"]))
            x = x + F.linear(g * F.linear(h, w[p + "ffn.fc1.weight"]), w[p + "ffn.fc2.weight"])
        return self.rms(x, w["norm.weight"])

    @property
    def n_buckets(self):
        return self.w[self.layer_prefix(0) + "pos_embedding.embedding.weight"].shape[0]

    def layer_prefix(self, i):
        # The benchmark model maps every layer to layer 0's tensors (one shared layer).
        return f"blocks.{0 if self.shared else i}."

    shared = False


def load_golden(torch, d):
    from safetensors.torch import load_file
    w = load_file(os.path.join(d, "text_encoder", "model.safetensors"))
    exp = load_file(os.path.join(d, "expected.safetensors"))
    case = json.load(open(os.path.join(d, "case.json")))
    return w, exp, case


def rel_l2(torch, got, want):
    return (torch.linalg.vector_norm(got.double() - want.double())
            / torch.linalg.vector_norm(want.double())).item()


def check(a, torch):
    w32, exp, case = load_golden(torch, a.check)
    ok = True
    for mode in a.modes:
        dt = torch.float32 if mode == "f32" else torch.bfloat16
        # The golden weights are f32; bf16 mode rounds them as a bf16 checkpoint would be.
        w = {k: v.to(dt) for k, v in w32.items()}
        enc = Encoder(torch, w, case["layers"], case["heads"], dt)
        worst, worst_pad = 0.0, 0.0
        n = len([k for k in exp if k.startswith("ids_")])
        with torch.no_grad():
            for i in range(n):
                ids = exp[f"ids_{i}"]
                want = exp[f"embeds_{i}"]
                worst = max(worst, rel_l2(torch, enc(ids).float(), want))
                # Upstream's form: padded to text_len with <pad> = 0, padded keys masked.
                L, tl = ids.shape[0], case["text_len"]
                padded = torch.cat([ids, torch.zeros(tl - L, dtype=ids.dtype)])
                mask = (torch.arange(tl) < L).long()
                worst_pad = max(worst_pad, rel_l2(torch, enc(padded, mask)[:L].float(), want))
        if mode == "bf16" and a.write_bf16:
            # Upstream's bf16 result per prompt (real rows), for ours' bf16 precision to be
            # checked against (tests/text_encoder.rs).
            from safetensors.torch import save_file
            with torch.no_grad():
                out = {f"embeds_{i}": enc(exp[f"ids_{i}"]).float().contiguous() for i in range(n)}
            save_file(out, a.write_bf16, metadata={
                "source": "benches/pytorch_text_encoder.py --check --write-bf16 (the bf16 module)",
                "torch": torch.__version__})
            print(f"wrote {a.write_bf16}")
        bound = 1e-5 if mode == "f32" else 5e-2
        print(f"check umt5-tiny {mode:4}: {n} prompts, worst rel L2 {worst:.2e} (real rows only), "
              f"{worst_pad:.2e} (padded to {case['text_len']} with the mask)  [bound {bound:.0e}]")
        ok &= worst < bound and worst_pad < bound
    return ok


def bench_weights(torch, cfg, embed_rows, seed=5):
    """One layer of random bf16 weights (uniform, std-like scale 1.7/sqrt(fan_in)), Wan names."""
    g = torch.Generator().manual_seed(seed)
    d, da, f, h, nb = cfg["dim"], cfg["dim_attn"], cfg["ffn"], cfg["heads"], cfg["buckets"]

    def mat(r, c):
        m = torch.empty(r, c, dtype=torch.bfloat16)
        return m.uniform_(-1.0, 1.0, generator=g).mul_(1.7 * c ** -0.5)

    p = "blocks.0."
    return {
        "token_embedding.weight": mat(embed_rows, d),
        p + "norm1.weight": torch.ones(d, dtype=torch.bfloat16),
        p + "attn.q.weight": mat(da, d), p + "attn.k.weight": mat(da, d),
        p + "attn.v.weight": mat(da, d), p + "attn.o.weight": mat(d, da),
        p + "pos_embedding.embedding.weight": mat(nb, h),
        p + "norm2.weight": torch.ones(d, dtype=torch.bfloat16),
        p + "ffn.fc1.weight": mat(f, d), p + "ffn.gate.0.weight": mat(f, d),
        p + "ffn.fc2.weight": mat(d, f),
        "norm.weight": torch.ones(d, dtype=torch.bfloat16),
    }


def peak_rss_mib():
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_ours(a, precision):
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    cmd = [a.bin, "bench", "--text-encoder", "--text-tokens", str(a.tokens), "--reps", str(a.reps),
           "--text-encoder-precision", precision]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        print(r.stderr, end="")
        raise SystemExit(f"pytorch_text_encoder.py: {' '.join(cmd)} failed ({r.returncode})")
    line = [s for s in r.stdout.splitlines() if s.startswith("{")][-1]
    j = json.loads(line)
    print(f"ours {precision:5} {a.tokens} tokens: {j['ms'] / 1e3:.2f} s wall, "
          f"{j['cpu_ms'] / 1e3 if j.get('cpu_ms') is not None else float('nan'):.2f} s CPU "
          f"(median of {a.reps}, threads {j['threads']})", flush=True)
    return j


def write_random(a, torch):
    from safetensors.torch import save_file
    cfg = dict(XXL)
    rows = max(1024, a.tokens)
    w = {}
    for i in range(a.layers):
        one = bench_weights(torch, cfg, rows, seed=5 + i)
        for k, v in one.items():
            if k.startswith("blocks.0."):
                w[k.replace("blocks.0.", f"blocks.{i}.")] = v
            elif i == 0:
                w[k] = v
    os.makedirs(a.write_random, exist_ok=True)
    save_file(w, os.path.join(a.write_random, "model.safetensors"))
    ids = torch.tensor([(i * 7919) % rows for i in range(a.tokens)])
    out = {"ids": ids}
    with torch.no_grad():
        for mode, dt in (("bf16", torch.bfloat16), ("f32", torch.float32)):
            enc = Encoder(torch, {k: v.to(dt) for k, v in w.items()}, a.layers, cfg["heads"], dt)
            out["embeds_" + mode] = enc(ids).float().contiguous()
    save_file(out, os.path.join(a.write_random, "expected.safetensors"),
              metadata={"layers": str(a.layers), "torch": torch.__version__})
    d = rel_l2(torch, out["embeds_bf16"], out["embeds_f32"])
    print(f"wrote {a.write_random}: {a.layers} layers, {a.tokens} tokens; PyTorch bf16 vs f32 rel L2 {d:.2e}")
    return 0


def bench_cuda(a, torch):
    """--device cuda: the encoder of each mode on the GPU, median of --reps synchronised runs."""
    if not torch.cuda.is_available():
        print("SKIP pytorch text encoder: no CUDA device for PyTorch")
        return 0
    cfg = dict(XXL)
    rows = max(1024, a.tokens)
    base = bench_weights(torch, cfg, rows)
    name = torch.cuda.get_device_name(0)
    ids = torch.tensor([(i * 7919) % rows for i in range(a.tokens)], device="cuda")
    mask = None
    if a.pad > a.tokens:
        ids = torch.cat([ids, torch.zeros(a.pad - a.tokens, dtype=ids.dtype, device="cuda")])
        mask = (torch.arange(a.pad, device="cuda") < a.tokens).long()
    summary = {"device": name, "tokens": a.tokens, "pad": a.pad}
    with torch.no_grad():
        for mode in a.modes:
            dt = torch.float32 if mode == "f32" else torch.bfloat16
            enc = Encoder(torch, {k: v.to(device="cuda", dtype=dt) for k, v in base.items()},
                          cfg["layers"], cfg["heads"], dt)
            enc.shared = True
            for _ in range(3):
                enc(ids, mask)
            torch.cuda.synchronize()
            times = []
            for _ in range(max(a.reps, 1)):
                t0 = time.perf_counter()
                enc(ids, mask)
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
            med = statistics.median(times)
            summary[mode] = {"ms": med, "min_ms": min(times), "runs": len(times)}
            print(f"PYTORCH_TEXT device={name} mode={mode} tokens={a.tokens}"
                  f"{f' padded={a.pad}' if mask is not None else ''} ms={med:.2f} "
                  f"min_ms={min(times):.2f} runs={len(times)}", flush=True)
            del enc
            torch.cuda.empty_cache()
    print(json.dumps(summary))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--modes", default="f32,bf16")
    ap.add_argument("--reps", type=int, default=2, help="timed runs per round (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds, each PyTorch's modes then ours")
    ap.add_argument("--pad", type=int, default=0, help="pad to this many tokens with a key mask (upstream: 512)")
    ap.add_argument("--check", metavar="GOLDEN_DIR", help="the umt5-tiny golden case (tests/data/umt5-tiny)")
    ap.add_argument("--no-bench", action="store_true", help="only --check")
    ap.add_argument("--write-random", metavar="DIR",
                    help="write a random real-width encoder of --layers distinct layers (bf16, Wan "
                         "names) and the f32 and bf16 modules' embeddings of a --tokens prompt, "
                         "then exit (tests/text_encoder.rs::real_width_bf16_against_pytorch reads it)")
    ap.add_argument("--layers", type=int, default=1, help="with --write-random")
    ap.add_argument("--write-bf16", metavar="FILE",
                    help="with --check: save the bf16 module's embeddings of the golden prompts")
    ap.add_argument("--compare", action="store_true", help="also run `blockcascade bench --text-encoder`")
    ap.add_argument("--ours", default="exact,bf16",
                    help="blockcascade's precisions to run with --compare (exact, bf16)")
    ap.add_argument("--bin", default=os.environ.get("BC_BIN", "target/release/blockcascade"))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: time the encoder on the GPU (see above)")
    a = ap.parse_args()
    if a.device == "cuda" and a.modes == "f32,bf16" and "--modes" not in sys.argv:
        a.modes = "bf16"
    a.modes = [m for m in a.modes.split(",") if m]
    a.ours = [m for m in a.ours.split(",") if m]
    if any(m not in ("exact", "bf16") for m in a.ours):
        ap.error("--ours takes exact and/or bf16")
    if any(m not in ("f32", "bf16") for m in a.modes):
        ap.error("--modes takes f32 and/or bf16")
    try:
        import torch
    except ImportError:
        print("pytorch_text_encoder.py: PyTorch is not installed; nothing measured.")
        return 2
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {a.threads}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    if a.write_random:
        return write_random(a, torch)
    if a.check and not check(a, torch):
        print("pytorch_text_encoder.py: the baseline does not reproduce the golden case; not timing it.")
        return 1
    if a.no_bench:
        return 0
    if a.device == "cuda":
        return bench_cuda(a, torch)
    if a.compare and not os.path.isfile(a.bin):
        print(f"pytorch_text_encoder.py: no binary {a.bin} (cargo build --release --bin blockcascade)")
        return 2
    cfg = dict(XXL)
    base = bench_weights(torch, cfg, max(1024, a.tokens))
    models = {}
    for mode in a.modes:
        dt = torch.float32 if mode == "f32" else torch.bfloat16
        enc = Encoder(torch, {k: v.to(dt) for k, v in base.items()}, cfg["layers"], cfg["heads"], dt)
        enc.shared = True
        models[mode] = enc
    del base
    ids = torch.tensor([(i * 7919) % max(1024, a.tokens) for i in range(a.tokens)])
    mask = None
    if a.pad > a.tokens:
        ids = torch.cat([ids, torch.zeros(a.pad - a.tokens, dtype=ids.dtype)])
        mask = (torch.arange(a.pad) < a.tokens).long()
    gflop = 2 * a.tokens * cfg["layers"] * (4 * cfg["dim"] * cfg["dim_attn"] + 3 * cfg["dim"] * cfg["ffn"]) / 1e9
    if mask is not None:
        gflop *= a.pad / a.tokens
    results = {m: {"wall_s": [], "cpu_s": []} for m in a.modes}
    ours = {m: {"wall_s": [], "cpu_s": []} for m in a.ours}
    with torch.no_grad():
        for mode, enc in models.items():
            enc(ids, mask)  # warm-up (first-touch, oneDNN primitive creation)
        for rnd in range(a.rounds):
            for mode, enc in models.items():
                for _ in range(a.reps):
                    t0, c0 = time.perf_counter(), time.process_time()
                    enc(ids, mask)
                    w, c = time.perf_counter() - t0, time.process_time() - c0
                    results[mode]["wall_s"].append(w)
                    results[mode]["cpu_s"].append(c)
                    print(f"pytorch {mode:4} {a.tokens} tokens{f' padded to {a.pad}' if mask is not None else ''}: "
                          f"{w:.2f} s wall, {c:.2f} s CPU ({gflop / c:.1f} GFLOP per CPU-s, "
                          f"{c / w:.2f} cores busy, load {os.getloadavg()[0]:.1f})", flush=True)
            if a.compare:
                for prec in a.ours:
                    j = run_ours(a, prec)
                    ours[prec]["wall_s"].append(j["ms"] / 1e3)
                    if j.get("cpu_ms") is not None:
                        ours[prec]["cpu_s"].append(j["cpu_ms"] / 1e3)
    summary = {"tokens": a.tokens, "pad": a.pad, "threads": a.threads, "gflop": gflop,
               "peak_rss_mib": peak_rss_mib()}
    for mode, r in results.items():
        w, c = statistics.median(r["wall_s"]), statistics.median(r["cpu_s"])
        summary[mode] = {"wall_s": w, "cpu_s": c, "runs": len(r["wall_s"])}
        print(f"pytorch {mode:4}: median {w:.2f} s wall, {c:.2f} s CPU over {len(r['wall_s'])} runs")
    for prec, o in ours.items():
        if not (a.compare and o["wall_s"]):
            continue
        w = statistics.median(o["wall_s"])
        c = statistics.median(o["cpu_s"]) if o["cpu_s"] else None
        summary["ours_" + prec] = {"wall_s": w, "cpu_s": c, "runs": len(o["wall_s"])}
        print(f"ours {prec:5}: median {w:.2f} s wall, {c if c is not None else float('nan'):.2f} s CPU "
              f"over {len(o['wall_s'])} rounds ({gflop / c if c else float('nan'):.1f} GFLOP per CPU-s)")
        for mode in a.modes:
            p = summary[mode]
            rw = w / p["wall_s"]
            rc = c / p["cpu_s"] if c else float("nan")
            summary["ours_" + prec][f"ratio_vs_{mode}"] = {"wall": rw, "cpu": rc}
            print(f"ratio blockcascade {prec} / PyTorch {mode}: {rw:.2f} wall, {rc:.2f} CPU time "
                  f"(threads {a.threads})")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
