#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/ (standard library only).

Seeds are small on purpose (a fuzzer mutates small inputs much faster): the golden model and noise
are cut down to the same tensor names with tiny shapes. A seed whose name starts with `ok-` must
be accepted by its target; tests/fuzz_replay.rs checks that, so the seeds keep reaching deep code.
Usage: scripts/fuzz-seeds.py [GOLDEN_DIR] (default: ../shared/golden next to the repository, or
/work/shared/golden).
"""
import json
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEP = b"--BCFUZZ-FILE--"


def golden_dir():
    if len(sys.argv) > 1:
        return sys.argv[1]
    for d in (os.path.join(ROOT, "..", "shared", "golden"), "/work/shared/golden"):
        if os.path.isdir(d):
            return d
    sys.exit("golden folder not found; pass it as the first argument")


def read_st(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8 : 8 + n])
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        s, t = e["data_offsets"]
        raw = b[8 + n + s : 8 + n + t]
        assert e["dtype"] == "F32"
        out[name] = (e["shape"], list(struct.unpack("<%df" % (len(raw) // 4), raw)))
    return out


def encode(dtype, vals):
    if dtype == "F32":
        return struct.pack("<%df" % len(vals), *vals)
    if dtype == "F16":
        return struct.pack("<%de" % len(vals), *vals)
    # BF16: the high half of the f32 bits
    return b"".join(struct.pack("<I", struct.unpack("<I", struct.pack("<f", v))[0])[2:] for v in vals)


def st_bytes(tensors, dtype="F32", metadata=None):
    """tensors: list of (name, shape, values)."""
    header, body = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, shape, vals in tensors:
        data = encode(dtype, vals)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body) + len(data)]}
        body += data
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + body


def prod(s):
    p = 1
    for d in s:
        p *= d
    return p


def values(n, seed):
    """Deterministic small values in [-0.5, 0.5)."""
    out, x = [], seed * 2654435761 % 2**32 or 1
    for _ in range(n):
        x = (x * 1103515245 + 12345) % 2**31
        out.append((x / 2**31) - 0.5)
    return out


def weight_shapes(c):
    """The weight names and shapes of a config (as src/config.rs weight_shapes)."""
    d = c["dim"]
    v = [
        ("patch_embedding.weight", [d, 16, 1, 2, 2]),
        ("patch_embedding.bias", [d]),
        ("text_embedding.0.weight", [d, c["text_dim"]]),
        ("text_embedding.0.bias", [d]),
        ("text_embedding.2.weight", [d, d]),
        ("text_embedding.2.bias", [d]),
        ("time_embedding.0.weight", [d, c["freq_dim"]]),
        ("time_embedding.0.bias", [d]),
        ("time_embedding.2.weight", [d, d]),
        ("time_embedding.2.bias", [d]),
        ("time_projection.1.weight", [6 * d, d]),
        ("time_projection.1.bias", [6 * d]),
    ]
    for l in range(c["num_layers"]):
        for a in ("self_attn", "cross_attn"):
            for p in "qkvo":
                v += [(f"blocks.{l}.{a}.{p}.weight", [d, d]), (f"blocks.{l}.{a}.{p}.bias", [d])]
            v += [(f"blocks.{l}.{a}.norm_q.weight", [d]), (f"blocks.{l}.{a}.norm_k.weight", [d])]
        v += [
            (f"blocks.{l}.norm3.weight", [d]),
            (f"blocks.{l}.norm3.bias", [d]),
            (f"blocks.{l}.ffn.0.weight", [c["ffn_dim"], d]),
            (f"blocks.{l}.ffn.0.bias", [c["ffn_dim"]]),
            (f"blocks.{l}.ffn.2.weight", [d, c["ffn_dim"]]),
            (f"blocks.{l}.ffn.2.bias", [d]),
            (f"blocks.{l}.modulation", [1, 6, d]),
        ]
    v += [("head.head.weight", [64, d]), ("head.head.bias", [64]), ("head.modulation", [1, 2, d])]
    return v


def write(target, name, data):
    d = os.path.join(ROOT, "fuzz", "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    g = golden_dir()
    sf = os.path.join(g, "selfforcing-tiny")
    prompt = open(os.path.join(sf, "prompt_embeds.safetensors"), "rb").read()
    noise = read_st(os.path.join(sf, "noise.safetensors"))
    gconfig = json.load(open(os.path.join(sf, "model", "config.json")))

    # Golden noise cut to `frames` frames of h x w (from the top-left corner).
    def crop(name, frames, steps, h, w):
        shape, v = noise[name]
        H, W = shape[-2], shape[-1]
        lead = shape[1:-3]  # [] for noise, [S-1] for renoise
        out = []
        for f in range(frames):
            for s in range(prod(lead[:1]) if lead else 1):
                if lead and s >= steps - 1:
                    continue
                for ch in range(16):
                    base = ((f * (prod(lead) if lead else 1) + s) * 16 + ch) * H * W
                    for y in range(h):
                        out += v[base + y * W : base + y * W + w]
        return out

    def noise_file(frames, steps, h, w, dtype="F32"):
        return st_bytes(
            [
                ("noise", [frames, 16, h, w], crop("noise", frames, steps, h, w)),
                ("renoise", [frames, steps - 1, 16, h, w], crop("renoise", frames, steps, h, w)),
            ],
            dtype,
        )

    # safetensors
    write("safetensors", "ok-golden-prompt-embeds", prompt)
    write("safetensors", "ok-noise-f32", noise_file(1, 4, 2, 2))
    write("safetensors", "ok-noise-bf16-metadata", st_bytes(
        [("noise", [1, 16, 2, 2], crop("noise", 1, 4, 2, 2))], "BF16", {"format": "pt", "k": "v"}))
    write("safetensors", "ok-f16-zero-dim", st_bytes(
        [("a", [2, 3], values(6, 1)), ("empty", [0, 4], []), ("scalar", [], [1.5])], "F16"))
    write("safetensors", "ok-empty-header", st_bytes([]))
    claim = json.dumps({"t": {"dtype": "F32", "shape": [1 << 38], "data_offsets": [0, 1 << 40]}}).encode()
    write("safetensors", "err-1tb-tensor", struct.pack("<Q", len(claim)) + claim)

    # model_dir: tiny configs, one file / sharded with a prefix
    cfg = dict(gconfig, dim=2, ffn_dim=2, freq_dim=2, num_heads=1, num_layers=1, text_len=2, text_dim=2)
    shapes = weight_shapes(cfg)
    tensors = [(n, s, values(prod(s), i)) for i, (n, s) in enumerate(shapes)]
    cj = json.dumps(cfg).encode()
    write("model_dir", "ok-tiny-f16", cj + SEP + st_bytes(tensors, "F16"))
    write("model_dir", "ok-tiny-f32", cj + SEP + st_bytes(tensors, "F32"))
    half = len(tensors) // 2
    pre = [("model." + n, s, v) for n, s, v in tensors]
    a, b = "diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"
    index = json.dumps({"metadata": {}, "weight_map": {n: (a if i < half else b) for i, (n, _, _) in enumerate(pre)}}).encode()
    write("model_dir", "ok-tiny-bf16-sharded-prefixed",
          cj + SEP + st_bytes(pre[:half], "BF16") + SEP + index + SEP + st_bytes(pre[half:], "BF16"))
    write("model_dir", "err-golden-config-only", json.dumps(gconfig).encode())

    # prompt_schedule (the built-in tiny model: text_dim 32, text_len 16; blocks of 3 frames)
    sched = json.dumps([{"block": 0, "prompt_embeds": "p0.safetensors"},
                        {"frame": 6, "prompt_embeds": "p1.safetensors"}]).encode()
    p1 = st_bytes([("prompt_embeds", [1, 2, 32], values(64, 7))], "F16")
    write("prompt_schedule", "ok-golden-two-prompts", sched + SEP + prompt + SEP + p1)
    write("prompt_schedule", "ok-one-block", json.dumps([{"block": 3, "prompt_embeds": "p0.safetensors"}]).encode() + SEP + p1)

    # recorded_noise: 4 request bytes (frames, h, w, steps) then the file
    write("recorded_noise", "ok-1x2x2-4steps", bytes([1, 0, 0, 3]) + noise_file(1, 4, 2, 2))
    write("recorded_noise", "ok-c-abi-2x2", bytes([0, 0, 0, 0]) + noise_file(2, 4, 2, 2))
    write("recorded_noise", "ok-2x4x6-2steps-bf16", bytes([2, 1, 2, 1]) + noise_file(2, 2, 4, 6, "BF16"))

    # c_abi_options (layout: src/fuzz_targets.rs c_abi_options)
    def abi(h=8, w=12, bf=3, lag=0, bidir=0, local=-1, sink=0, seed=0, backend=1, devices=(), gen=0, tail=b""):
        b = struct.pack("<IIIIIIiIQ", 40, h, w, bf, lag, bidir, local, sink, seed)
        b += struct.pack("<III", 32, 48, 32) + bytes([backend, 1 if devices else 0, gen, 0])
        b += struct.pack("<I", len(devices)) + b"\0" * 4
        b += b"".join(struct.pack("<i", d) for d in devices).ljust(256, b"\0")
        return b + tail

    write("c_abi_options", "ok-defaults", abi())
    write("c_abi_options", "ok-generate-cascade-local", abi(h=2, w=2, bf=1, lag=2, bidir=1, local=3, sink=1, gen=3))
    write("c_abi_options", "ok-generate-sequential", abi(h=2, w=4, bf=2, gen=1, seed=5))
    write("c_abi_options", "ok-two-cpu-devices", abi(devices=(0, 1)))
    write("c_abi_options", "ok-backend-string", abi(backend=3, tail=b"cpu\0"))


if __name__ == "__main__":
    main()
