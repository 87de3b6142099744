#!/usr/bin/env bash
# The CPU engine against PyTorch on the same machine, in one run: random weights at the given
# dims (default: dim 512, 8 heads, 8 layers, ffn 2048, 9 latent frames of 16x16, 4 steps,
# sequential), the engine timed as a whole process (load included), the PyTorch pipeline of the
# same model (f32, load excluded, after one warm-up run), interleaved run by run so that
# machine noise hits both alike. Prints every run, the medians, the ratio engine/PyTorch, the
# cores each used (CPU time / wall time) and the two results' relative L2 distance.
#
#   BC_TORCH_PYTHON=/path/to/venv/bin/python benches/cpu_vs_pytorch.sh [REPS]
#
# Env: BC_TORCH_PYTHON (a python with torch and numpy; SKIP when missing), BC_BIN (the engine
# binary; default: build target/release/blockcascade), BC_THREADS (default: all cores),
# BC_DIMS (extra `make` options, e.g. "--dim 1536 --heads 12 --layers 2 --ffn 8960").
# On a shared machine PyTorch's OpenMP threads spin-wait and its wall time collapses under
# load; OMP_WAIT_POLICY=PASSIVE (passed through) makes it yield like the engine's threads, and
# the CPU-time ratio (also printed) is the figure that survives load.
# Not run in CI (it needs torch).
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-3}
py=${BC_TORCH_PYTHON:-}
if [ -z "$py" ] || ! "$py" -c 'import torch, numpy' 2>/dev/null; then
    echo "SKIP cpu_vs_pytorch: set BC_TORCH_PYTHON to a python that imports torch and numpy"
    exit 0
fi
threads=${BC_THREADS:-$(nproc)}
bin=${BC_BIN:-}
if [ -z "$bin" ]; then
    cargo build --release --quiet --bin blockcascade
    bin=target/release/blockcascade
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# shellcheck disable=SC2086
"$py" benches/cpu_vs_pytorch.py make "$work" ${BC_DIMS:-}
for _ in $(seq "$reps"); do
    "$py" benches/cpu_vs_pytorch.py engine "$bin" "$work" "$work/engine.safetensors" --threads "$threads" | tee -a "$work/log"
    "$py" benches/cpu_vs_pytorch.py torch "$work" "$work/torch.safetensors" --threads "$threads" | tee -a "$work/log"
done
diff=$("$py" benches/cpu_vs_pytorch.py compare "$work/torch.safetensors" "$work/engine.safetensors")
"$py" - "$work/log" "$diff" "$threads" <<'PY'
import re, statistics, sys
log, diff, threads = open(sys.argv[1]).read(), sys.argv[2], sys.argv[3]
def runs(tag):
    return [(float(w), float(c)) for w, c in re.findall(tag + r" wall_s=(\S+) cpu_s=(\S+)", log)]
e, t = runs("ENGINE"), runs("TORCH")
ew, tw = statistics.median(w for w, _ in e), statistics.median(w for w, _ in t)
ecores = statistics.median(c / w for w, c in e)
tcores = statistics.median(c / w for w, c in t)
print(f"engine (whole process, load included): median {ew:.3f} s over {len(e)} runs, {ecores:.2f} cores busy")
print(f"pytorch (pipeline, load excluded):     median {tw:.3f} s over {len(t)} runs, {tcores:.2f} cores busy")
ec, tc = statistics.median(c for _, c in e), statistics.median(c for _, c in t)
print(f"RATIO engine/pytorch = {ew / tw:.3f} wall, {ec / tc:.3f} CPU time  (threads {threads}; latents rel L2 engine vs pytorch {diff})")
PY
