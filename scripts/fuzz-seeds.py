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

    # c_abi_options with the full bc_engine_options (64 bytes): decoder_device, text encoder,
    # tokenizer (bytes 55, 60, 61; strings from byte 320 on: backend, decoder device, encoder
    # file, tokenizer file).
    def abi_full(dec=0, te=0, tok=0, strings=b"", **kw):
        b = bytearray(abi(**kw))
        b[48:52] = struct.pack("<I", 64)
        b[55], b[60], b[61] = dec, te, tok
        return bytes(b) + strings

    write("c_abi_options", "ok-decoder-device-cpu", abi_full(dec=1, h=2, w=2, bf=1, gen=1))
    write("c_abi_options", "ok-decoder-device-spaces", abi_full(dec=3))
    write("c_abi_options", "decoder-device-cuda", abi_full(dec=2))
    write("c_abi_options", "err-decoder-device-unknown", abi_full(dec=4, strings=b"\0gpu\0"))
    write("c_abi_options", "err-decoder-device-not-utf8", abi_full(dec=4, strings=b"\0\xff\xfecpu\0"))
    write("c_abi_options", "err-text-encoder-missing", abi_full(te=1))
    write("c_abi_options", "err-text-encoder-empty-path", abi_full(te=2))
    write("c_abi_options", "err-text-encoder-garbage-file", abi_full(te=3, tok=2, strings=b"\0\0garbage\0{}\0"))
    write("c_abi_options", "err-text-encoder-folder-no-tokenizer", abi_full(te=4, strings=b"\0\0\x10\0\0\0\0\0\0\0{}\0"))
    write("c_abi_options", "err-tokenizer-without-encoder", abi_full(tok=1))

    loader_seeds(g)
    output_seeds()


def shrink(tensors, sizes, keep=(), drop=()):
    """Cuts every tensor down to a smaller model of the same structure: each dimension of size
    `v` becomes `sizes.get(v, v)` (its first entries), except the (name, axis) pairs in `keep`;
    names starting with a prefix in `drop` go. tensors: {name: (shape, values)}."""
    out = []
    for name in sorted(tensors):
        if any(name.startswith(d) for d in drop):
            continue
        shape, v = tensors[name]
        new = [d if (name, a) in keep else sizes.get(d, d) for a, d in enumerate(shape)]
        vals = []

        def walk(axis, base):
            stride = prod(shape[axis + 1 :])
            if axis == len(shape) - 1:
                vals.extend(v[base : base + new[axis]])
                return
            for i in range(new[axis]):
                walk(axis + 1, base + i * stride)

        if shape:
            walk(0, 0)
        else:
            vals = v
        out.append((name, new, vals))
    return out


def loader_seeds(g):
    """Seeds of the decoder, text-encoder and tokenizer targets: the golden files cut down."""
    # Wan VAE: widths 96/64/32/16/8 -> 12/8/4/2/1; the 16 latent channels stay.
    vae = read_st(os.path.join(g, "wan-vae-tiny", "vae", "model.safetensors"))
    keep = {("conv2.weight", 0), ("conv2.weight", 1), ("conv2.bias", 0), ("decoder.conv1.weight", 1)}
    small = shrink(vae, {96: 12, 64: 8, 32: 4, 16: 2, 8: 1}, keep, drop=("encoder.",))
    write("vae_weights", "ok-golden-cut-bf16", st_bytes(small, "BF16"))
    write("vae_weights", "ok-golden-cut-f32-no-conv1", st_bytes([t for t in small if t[0] != "conv1.weight" and t[0] != "conv1.bias"]))
    write("vae_weights", "err-no-head", st_bytes([t for t in small if not t[0].startswith("decoder.head.")], "F16"))

    # TAEHV: widths 64/32/16/8 -> 16/8/4/2; the 16 latent channels of decoder.1 stay.
    tae = read_st(os.path.join(g, "taehv-tiny", "taehv", "model.safetensors"))
    small = shrink(tae, {64: 16, 32: 8, 16: 4, 8: 2}, {("decoder.1.weight", 1)}, drop=("encoder.",))
    write("taehv_weights", "ok-golden-cut-f16", st_bytes(small, "F16"))
    write("taehv_weights", "ok-golden-cut-f32", st_bytes(small))
    write("taehv_weights", "err-skip-missing", st_bytes([t for t in small if t[0] != "decoder.13.conv.weight"], "BF16"))

    # umT5: vocab 300 -> 16, widths 32/64 -> 8/16; 4 heads and 32 buckets stay. Wan's naming in
    # one file, Hugging Face's in two shards.
    te = read_st(os.path.join(g, "umt5-tiny", "text_encoder", "model.safetensors"))
    keep = {(f"blocks.{i}.pos_embedding.embedding.weight", 0) for i in range(8)}
    small = shrink(te, {300: 16, 32: 8, 64: 16}, keep)
    write("umt5_weights", "ok-golden-cut-wan-f32", st_bytes(small))
    hf = {
        "norm1.weight": "0.layer_norm.weight",
        "attn.q.weight": "0.SelfAttention.q.weight",
        "attn.k.weight": "0.SelfAttention.k.weight",
        "attn.v.weight": "0.SelfAttention.v.weight",
        "attn.o.weight": "0.SelfAttention.o.weight",
        "pos_embedding.embedding.weight": "0.SelfAttention.relative_attention_bias.weight",
        "norm2.weight": "1.layer_norm.weight",
        "ffn.fc1.weight": "1.DenseReluDense.wi_1.weight",
        "ffn.gate.0.weight": "1.DenseReluDense.wi_0.weight",
        "ffn.fc2.weight": "1.DenseReluDense.wo.weight",
    }

    def rename(n):
        if n == "token_embedding.weight":
            return "shared.weight"
        if n == "norm.weight":
            return "encoder.final_layer_norm.weight"
        _, i, rest = n.split(".", 2)
        return f"encoder.block.{i}.layer.{hf[rest]}"

    renamed = [(rename(n), s, v) for n, s, v in small]
    half = len(renamed) // 2
    write("umt5_weights", "ok-golden-cut-hf-bf16-two-shards",
          st_bytes(renamed[:half], "BF16") + SEP + st_bytes(renamed[half:], "BF16"))
    write("umt5_weights", "err-hf-one-shard-of-two", st_bytes(renamed[:half], "F16"))

    # tokenizer: the golden umT5 tokenizer.json with a small normaliser instead of its 300 KB
    # precompiled character map, then other models (BPE, WordPiece, WordLevel).
    tj = json.load(open(os.path.join(g, "umt5-tiny", "text_encoder", "tokenizer", "tokenizer.json")))
    tj["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "NFKC"}, {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]}
    dump = lambda t: json.dumps(t, ensure_ascii=False, separators=(",", ":")).encode()
    write("tokenizer", "ok-golden-unigram-nfkc", dump(tj))
    write("tokenizer", "ok-golden-unigram-with-text", dump(tj) + SEP + "  Ünïcode\ttext, 123 ½ ﬁ".encode())
    added = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, c in enumerate(["<pad>", "</s>", "<unk>"])]
    specials = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    letters = {c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}
    bpe = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
           "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
           "post_processor": None, "decoder": None,
           "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                     "vocab": dict(specials, **letters, **{"th": 30, "the": 31, "at": 32}),
                     "merges": ["t h", "th e", "a t"]}}
    write("tokenizer", "ok-bpe-lowercase", dump(bpe))
    wp = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
          "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                         "strip_accents": None, "lowercase": True},
          "pre_tokenizer": {"type": "BertPreTokenizer"}, "post_processor": None, "decoder": None,
          "model": {"type": "WordPiece", "unk_token": "<unk>", "continuing_subword_prefix": "##",
                    "max_input_chars_per_word": 100,
                    "vocab": dict(specials, a=3, cat=4, walks=5, on=6, the=7, **{"##s": 8, "gr": 9, "##ass": 10})}}
    write("tokenizer", "ok-wordpiece-bert", dump(wp))
    wl = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
          "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
          "decoder": None, "model": {"type": "WordLevel", "unk_token": "<unk>",
                                     "vocab": dict(specials, A=3, cat=4)}}
    write("tokenizer", "ok-wordlevel", dump(wl))
    no_eos = dict(wl, added_tokens=[], model=dict(wl["model"], vocab={"<unk>": 0, "A": 1}))
    write("tokenizer", "err-no-eos", dump(no_eos))


def output_seeds():
    """Seeds of c_abi_stream's want_latents, latents_file and video_out (layouts: the docs of
    those targets in src/fuzz_targets/)."""
    def stream(pixels, attn, ops, size=32):
        b = struct.pack("<IIdII", size, 2, 0.0, pixels, 0) + struct.pack("<I", 64)
        return b + bytes([attn]) + bytes(ops)

    write("c_abi_stream", "ok-pixels-without-latents", stream(1, 6 | 1 << 4, [1, 1, 1, 1]))
    write("c_abi_stream", "ok-pixels-and-latents", stream(1, 6 | 2 << 4, [1, 1, 2, 1, 2, 1]))
    write("c_abi_stream", "ok-first-version-ignores-want-latents", stream(0, 6 | 1 << 4, [1, 1], size=24))
    write("c_abi_stream", "err-nothing-wanted", stream(0, 6 | 1 << 4, [1]))
    write("c_abi_stream", "err-want-latents-2", stream(1, 6 | 3 << 4, [1]))

    def lat(shape, vals=None, dtype="F32", name="latents"):
        n = prod(shape)
        return st_bytes([(name, shape, vals if vals is not None else values(n, n))], dtype)

    write("latents_file", "ok-taehv-1x2x2", bytes([1, 0]) + lat([1, 16, 2, 2]))
    write("latents_file", "ok-wan-2x1x2-blocks-of-1", bytes([1, 1]) + lat([2, 16, 1, 2]))
    write("latents_file", "ok-taehv-3x1x1-bf16-one-block", bytes([0, 0]) + lat([3, 16, 1, 1], dtype="BF16"))
    write("latents_file", "ok-f16-too-large-to-decode", bytes([2, 1]) + lat([4, 16, 4, 4], dtype="F16"))
    nan = values(64, 1)
    nan[37] = float("nan")
    write("latents_file", "err-nan", bytes([1, 0]) + lat([1, 16, 2, 2], nan))
    inf = values(32, 2)
    inf[5] = float("inf")
    write("latents_file", "err-inf-bf16", bytes([1, 1]) + lat([2, 16, 1, 1], inf, "BF16"))
    write("latents_file", "err-8-channels", bytes([1, 0]) + lat([1, 8, 2, 2]))
    write("latents_file", "err-rank-3", bytes([1, 0]) + lat([16, 2, 2]))
    write("latents_file", "err-no-frames", bytes([1, 0]) + lat([0, 16, 2, 2]))
    write("latents_file", "err-zero-width", bytes([1, 0]) + lat([1, 16, 2, 0]))
    write("latents_file", "err-named-video", bytes([1, 0]) + lat([1, 16, 2, 2], name="video"))

    # video_out: path/flags, size (w = 1 + b % 8, h = 1 + b / 8 % 8), fps/bit rate, writes.
    def frames(n, w=2, h=2, seed=0):
        return bytes((seed + 37 * i) % 254 for i in range(n * 3 * w * h))

    def vid(path, ops, size=9, rate=0, custom=None):
        b = bytes([path, size, rate]) + ops
        return b if custom is None else b + SEP + custom

    one = bytes([4]) + frames(1)
    write("video_out", "ok-mp4-2x2", vid(0, one + one))
    write("video_out", "ok-mp4-odd-3x5", vid(0, bytes([4]) + frames(1, 3, 5), size=2 + 8 * 4))
    write("video_out", "ok-y4m-f32-and-rgb8", vid(1, bytes([12]) + frames(3) + bytes([5]) + frames(1, seed=9)))
    write("video_out", "ok-safetensors-nan-inf", vid(2, bytes([8]) + bytes([255, 254]) + frames(2)[2:]))
    write("video_out", "ok-png-folder", vid(3, one))
    write("video_out", "ok-png-pattern", vid(4, one + one))
    write("video_out", "ok-upper-case-y4m", vid(6, one, rate=7))
    write("video_out", "ok-custom-path", vid(7, one, custom=b"x.Y4M"))
    write("video_out", "ok-custom-png-folder", vid(7, one, custom=b"out/"))
    write("video_out", "ok-replaces-a-file", vid(1 | 16, one))
    write("video_out", "ok-dropped-unfinished", vid(1 | 32, one))
    write("video_out", "err-missing-folder", vid(5, one))
    write("video_out", "err-target-is-a-folder", vid(1 | 8, one))
    write("video_out", "err-png-target-is-a-file", vid(3 | 16, one))
    write("video_out", "err-fps-0", vid(1, one, rate=1))
    write("video_out", "err-fps-nan", vid(1, one, rate=3))
    write("video_out", "err-mp4-bitrate-0", vid(0, one, rate=8))
    write("video_out", "ok-mp4-lowest-bitrate", vid(0, one + one, rate=32))
    write("video_out", "ok-mp4-highest-bitrate", vid(0, one, rate=40))
    write("video_out", "err-mp4-bitrate-past-the-highest", vid(0, one, rate=56))
    write("video_out", "err-no-frames", vid(1, b""))
    write("video_out", "err-wrong-length", vid(1, bytes([6]) + frames(1)))
    write("video_out", "err-overflowing-count", vid(2, bytes([3])))
    write("video_out", "err-rgb8-into-safetensors", vid(2, bytes([5]) + frames(1)))
    write("video_out", "err-unknown-extension", vid(7, one, custom=b"v.avi"))
    write("video_out", "err-png-file", vid(7, one, custom=b"v.png"))
    write("video_out", "err-bad-pattern", vid(7, one, custom=b"v%d%d.png"))
    write("video_out", "err-not-utf8", vid(7, one, custom=b"\xff\xfe.mkv"))


if __name__ == "__main__":
    main()
