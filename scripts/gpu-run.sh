#!/usr/bin/env bash
# run.sh of the GPU validation bundle (built by scripts/gpu-bundle.sh from scripts/gpu-run.sh).
# Finds libcuda and cuBLASLt, runs every GPU test and benchmark, then the PyTorch baseline
# when torch is importable, and prints one summary table.
#   run.sh                      everything (tests sanitizer bench pytorch), then the summary
#   run.sh tests bench          only those parts (each part is well under 10 minutes), summary
# Parts: tests, sanitizer (compute-sanitizer memcheck + racecheck on the kernel tests at small
# shapes), bench, pytorch. Logs go to $BC_LOGS (default ./logs next to this file); the summary
# reads whatever logs are there, so parts run in separate calls can share one log folder.
# Exit status: non-zero when a test failed (or no GPU was usable).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# A relative BC_LOGS is relative to where run.sh was started; the default is logs/ here.
[ -n "${BC_LOGS:-}" ] || cd "$here"
parts="${*:-tests sanitizer bench pytorch}"
for p in $parts; do
    case "$p" in tests|sanitizer|bench|pytorch) ;;
        *) echo "run.sh: unknown part '$p' (parts: tests sanitizer bench pytorch)" >&2; exit 64;;
    esac
done
want() { [[ " $parts " == *" $1 "* ]]; }
logs="${BC_LOGS:-logs}"
mkdir -p "$logs" && logs=$(cd "$logs" && pwd)
cd "$here"

# --- libraries -------------------------------------------------------------------------
libdirs=()
add_dir() { [ -d "$1" ] && libdirs+=("$1"); }
for d in /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib /usr/local/cuda/lib64 \
         /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64 \
         /usr/local/cuda-13*/targets/x86_64-linux/lib /usr/lib/wsl/lib; do
    add_dir "$d"
done
if command -v ldconfig >/dev/null 2>&1; then
    while read -r p; do add_dir "$(dirname "$p")"; done < <(ldconfig -p 2>/dev/null | awk '/libcuda\.so|libcublasLt\.so/ {print $NF}')
fi
for py in python3 python; do
    if command -v "$py" >/dev/null 2>&1; then
        while read -r p; do add_dir "$p"; done < <("$py" - <<'PY' 2>/dev/null
import site, sys, os, glob
paths = set(site.getsitepackages() + [site.getusersitepackages()] + sys.path)
for sp in paths:
    for sub in ("nvidia/cublas/lib", "nvidia/cu13/lib", "nvidia/cuda_runtime/lib"):
        d = os.path.join(sp, sub)
        if glob.glob(os.path.join(d, "libcublasLt.so*")):
            print(d)
PY
)
    fi
done
ld=$(IFS=:; echo "${libdirs[*]:-}")
export LD_LIBRARY_PATH="${ld}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
found() { for d in "${libdirs[@]:-}"; do ls "$d"/$1 >/dev/null 2>&1 && { ls "$d"/$1 | head -n 1; return; }; done; echo "NOT FOUND"; }
libcuda=$(found 'libcuda.so*')
libcublaslt=$(found 'libcublasLt.so*')
echo "libcuda:     $libcuda"
echo "libcublasLt: $libcublaslt"
# cuBLASLt 13 is needed (the build targets CUDA 13); say so if only another major is there.
case "$libcublaslt" in *libcublasLt.so.13*|*libcublasLt.so) ;; "NOT FOUND") ;; *) echo "note: cuBLASLt found is not version 13 ($libcublaslt); pip install nvidia-cublas (cu13) if the tests cannot load it";; esac
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$logs"/nvidia-smi.txt

export BC_TEST_DATA="$here/data"
export BC_CLI="$here/bin/blockcascade"
status=0

# --- devices ---------------------------------------------------------------------------
./bin/blockcascade info --devices > "$logs"/devices.txt 2>&1 || true

# --- tests -----------------------------------------------------------------------------
if want tests; then
    echo "== GPU tests"
    ./bin/cuda-tests --test-threads=1 --nocapture 2>&1 | tee "$logs"/tests.log
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

# --- compute-sanitizer (memcheck, racecheck) on the kernel tests at small shapes ---------
san=$(command -v compute-sanitizer || ls -d /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | sort -V | tail -n 1)
if ! want sanitizer; then
    :
elif [ -n "$san" ]; then
    : > "$logs"/sanitizer.txt
    for tool in memcheck racecheck; do
        echo "== compute-sanitizer $tool"
        # Every test named *_the_cpu (all kernels, the attention kernel included); 270 s each
        # keeps the part under the GPU machine's 10-minute command limit.
        BC_TEST_SMALL=1 timeout 270 "$san" --tool "$tool" --error-exitcode 99 \
            ./bin/cuda-tests --test-threads=1 _the_cpu > "$logs/sanitizer-$tool.log" 2>&1
        rc=$?
        echo "SANITIZER $tool exit=$rc $(grep -m1 -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$logs/sanitizer-$tool.log")" | tee -a "$logs"/sanitizer.txt
        [ $rc -eq 0 ] || status=1
    done
else
    echo "SANITIZER skipped: compute-sanitizer not found" | tee "$logs"/sanitizer.txt
fi

# --- benchmarks ------------------------------------------------------------------------
if want bench; then
    echo "== GPU benchmarks"
    BC_BENCH_JSON="$logs/gpu-bench.json" ./bin/gpu-bench 2>&1 | tee "$logs"/bench.log
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if want pytorch; then
    echo "== PyTorch baseline"
    if python3 -c "import torch" >/dev/null 2>&1; then
        python3 pytorch_baseline.py 2>&1 | tee "$logs"/pytorch.log
    else
        echo "SKIP pytorch baseline: torch is not importable" | tee "$logs"/pytorch.log
    fi
fi

# The summary reads every log there is (some parts may have run in earlier calls).
for f in tests.log bench.log pytorch.log sanitizer.txt; do [ -f "$logs/$f" ] || : > "$logs/$f"; done

# --- summary ---------------------------------------------------------------------------
echo
echo "================================ SUMMARY ================================"
dev=$(grep -m1 '^device:' "$logs"/bench.log || true)
echo "${dev:-device: (none: $(grep -m1 -o 'SKIP.*' "$logs"/tests.log || echo unknown))}"
echo "commit: $(cat COMMIT 2>/dev/null || echo unknown)"
echo "-- devices (blockcascade info --devices)"
sed 's/^/  /' "$logs"/devices.txt
echo
echo "-- kernel max error vs CPU reference (tolerance ~1e-2)"
grep '^KERNEL ' "$logs"/tests.log | awk '{printf "  %-34s %-28s %s\n", $2, $3, $4}'
echo "-- whole model (relative L2 vs f32 reference, < 2e-2)"
grep -E '^(GOLDEN|GRAPH|MULTI|EPILOGUE) ' "$logs"/tests.log | sed 's/^/  /'
echo "-- compute-sanitizer (kernel tests, small shapes)"
sed 's/^/  /' "$logs"/sanitizer.txt
echo "-- tests"
grep -E '^test result|FAILED|panicked' "$logs"/tests.log | sed 's/^/  /'
grep -o 'SKIP.*' "$logs"/tests.log | sort -u | sed 's/^/  /'
echo "-- kernels (rate and % of measured peak)"
sed -n '/^kernel /,/^$/p' "$logs"/bench.log | sed 's/^/  /'
echo "-- end to end (wan-1.3b-shape, 60x104, 21 frames, 4 steps)"
sed -n '/^schedule /,/^$/p' "$logs"/bench.log | grep -v '^JSON' | sed 's/^/  /'
grep -E '^(SKIP|TUNE) ' "$logs"/bench.log | sed 's/^/  /'
echo "-- PyTorch baseline (same GPU)"
py=$(grep -m1 -E '^(PYTORCH|SKIP)' "$logs"/pytorch.log || echo "no result (see $logs/pytorch.log)")
echo "  $py"
eng=$(awk '$1=="sequential" {print $3}' "$logs"/bench.log | head -n 1)
pt=$(echo "$py" | sed -n 's/.*sixth_block_ms=\([0-9.]*\).*/\1/p')
if [ -n "$eng" ] && [ -n "$pt" ]; then
    awk -v e="$eng" -v p="$pt" 'BEGIN { printf "  6th block: engine %.1f ms, PyTorch %.1f ms, engine/PyTorch speed-up %.2fx\n", e, p, p / e }'
fi
echo "logs: $logs"
if grep -q 'SKIP.*no GPU' "$logs"/tests.log; then
    echo "no usable GPU: nothing was validated (exit 2)"
    [ $status -ne 0 ] || status=2
fi
exit $status
