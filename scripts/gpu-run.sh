#!/usr/bin/env bash
# GPU validation bundle runner (scripts/gpu-bundle.sh copies it to run.sh in the bundle). Finds
# libcuda and cuBLASLt, runs the GPU tests, compute-sanitizer, the benchmarks and the PyTorch
# baseline, and prints one summary table.
#
#   run.sh device [PARTS]  ONE bounded call, for a short GPU lease (what a session lent a GPU
#                          runs): the parts in priority order, wgmma (the sm_90a wgmma layout
#                          probe, alone in its own process), tests (correctness), bench
#                          (kernels, end to end), pytorch (baseline), ncu (Nsight Compute:
#                          where the DiT's and the kernels' time goes), sanitizer (memcheck,
#                          then racecheck), within BC_BUDGET_S seconds (default 420) in all. A part
#                          starts only when the budget still holds its minimum (the table below),
#                          else the summary says "skipped: out of time budget"; each runs under
#                          its own timeout (its cap, cut to what is left), so a hang costs one
#                          part, not the call. Part output goes to the logs; stdout gets progress
#                          lines stamped with elapsed seconds, then the compact summary, last.
#                          After every part it (re)writes BC_OUT/summary.txt and
#                          BC_OUT/logs.tar.gz (BC_OUT defaults to $OUT when set, else the log
#                          folder): 2 files, so a call killed from outside still returns a
#                          partial summary. PARTS (optional) restricts the parts, e.g. for a rerun:
#                          `run.sh device tests`.
#   run.sh                 everything (wgmma tests sanitizer bench pytorch), full output, summary
#   run.sh tests bench     only those parts (each well under 10 minutes), summary
# Parts: wgmma (tests/cuda.rs wgmma_layouts_match_the_hardware: one WGMMA PASS/FAIL line per
# shared-memory layout, N and A source; SKIP off sm_90; when all PASS it exports BC_WGMMA_OK=1,
# which adds the wgmma attention prototype to the attention test and the benchmark on sm_90:
# set it by hand for a later `run.sh device tests bench`; then smoke runs of the paths never
# run on a GPU before, split-KV, the ws attention, the ws conv and the halo conv, one short
# process each: one that fails or hangs is left out of the later parts (a call without the
# wgmma part runs them before its tests); then tma_layouts_match_the_hardware, one TMA
# PASS/FAIL line per box / layout, all PASS -> BC_TMA_OK=1: the TMA conv joins the
# benchmark), tests (the rest of tests/cuda.rs),
# ncu (Nsight Compute, when the image has it: the device time of every kernel of two
# sequential wan-1.3b-shape blocks, `NCU dit` lines, and the throughput, tensor-pipe, occupancy
# and warp-stall counters of the attention kernels and the decoders' convolutions, `NCU kern`
# lines; scripts/ncu_summary.py reads its CSV; clocks and caches left alone),
# sanitizer (compute-sanitizer memcheck + racecheck on the kernel tests at small
# shapes; a sanitizer that refuses the device, as on gVisor machines, is reported as
# "unavailable", not as a failure), bench, pytorch. Logs go to $BC_LOGS (default ./logs next to
# this file); the summary reads whatever logs are there, so parts run in separate calls can share
# one log folder (device mode starts from fresh logs).
# Exit status: 0 all ran and passed; 1 a test, the benchmark or the sanitizer failed or hung;
# 2 no usable GPU (nothing was validated); 3 nothing failed, but a part was skipped or cut short
# for time (device mode). The summary's last line (RESULT: ...) says which.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
t0=$SECONDS
mode=parts
if [ "${1:-}" = device ]; then mode=device; shift; fi
all="wgmma tests sanitizer bench pytorch ncu"
[ $mode = parts ] || all="wgmma tests bench pytorch ncu sanitizer" # the order device mode runs them in
parts="${*:-$all}"
for p in $parts; do
    case "$p" in wgmma|tests|sanitizer|bench|pytorch|ncu|tune) ;;
        *) echo "run.sh: unknown part '$p' (run.sh [device] [wgmma tests sanitizer bench pytorch ncu tune])" >&2; exit 64;;
    esac
done
want() { [[ " $parts " == *" $1 "* ]]; }
budget=${BC_BUDGET_S:-420}
case "$budget" in ''|*[!0-9]*) echo "run.sh: BC_BUDGET_S must be a whole number of seconds" >&2; exit 64;; esac
reserve=15 # seconds kept back for the kill grace of a timed-out part, the summary and the tarball

# Per part: timeout cap in device mode, the least budget left for it to start, timeout cap in
# the other modes (each under the GPU machine's 10-minute command limit). BC_CAP_TESTS,
# BC_CAP_BENCH, BC_CAP_PYTORCH, BC_CAP_MEMCHECK and BC_CAP_RACECHECK override the device-mode
# caps. Estimated times on an H100/H200 (docs/gpu-bundle.md): tests ~40 s, bench
# ~45 s, pytorch ~25 s, memcheck and racecheck ~30-60 s each.
declare -A cap=([wgmma]=${BC_CAP_WGMMA:-60} [tests]=${BC_CAP_TESTS:-150} [bench]=${BC_CAP_BENCH:-180} [pytorch]=${BC_CAP_PYTORCH:-90} [ncu]=${BC_CAP_NCU:-140}
    [memcheck]=${BC_CAP_MEMCHECK:-90} [racecheck]=${BC_CAP_RACECHECK:-90} [tune]=${BC_CAP_TUNE:-300})
declare -A need=([wgmma]=15 [tests]=45 [bench]=45 [pytorch]=30 [ncu]=40 [memcheck]=30 [racecheck]=30 [tune]=60)
declare -A cap_full=([wgmma]=120 [tests]=570 [bench]=570 [pytorch]=570 [ncu]=570 [memcheck]=270 [racecheck]=270 [tune]=570)

# A relative BC_LOGS is relative to where run.sh was started; the default is logs/ here.
[ -n "${BC_LOGS:-}" ] || cd "$here" || exit 70
logs="${BC_LOGS:-logs}"
mkdir -p "$logs" && logs=$(cd "$logs" && pwd)
outdir="${BC_OUT:-${OUT:-}}"
[ -n "$outdir" ] || outdir=$logs
mkdir -p "$outdir" && outdir=$(cd "$outdir" && pwd)
cd "$here" || exit 70
chmod +x bin/* 2>/dev/null || true # in case a copy lost the executable bits
if [ $mode = device ]; then
    # Fresh logs (a bundle folder may carry logs of an earlier run): only the files run.sh writes.
    rm -f "$logs"/{wgmma,tma,tma-sanitizer,tma-bisect,tma-conv,tests,bench,pytorch,sanitizer-memcheck,sanitizer-racecheck}.log \
        "$logs"/{sanitizer,parts,env,devices,nvidia-smi,summary,ncu}.txt "$logs"/gpu-bench.json "$logs"/ncu.log "$logs"/ncu-*.csv "$logs"/smoke-*.log
fi
: >> "$logs"/parts.txt

el() { echo $((SECONDS - t0)); }
say() { printf '[%4ds] %s\n' "$(el)" "$*"; }
# The status of a part in parts.txt ("name|status"), replacing its earlier line.
set_status() {
    { grep -v "^$1|" "$logs"/parts.txt; echo "$1|$2"; } > "$logs"/parts.txt.new
    mv "$logs"/parts.txt.new "$logs"/parts.txt
}
[ $mode = device ] && say "run.sh device: budget ${budget}s, parts: $parts; summary and logs -> $outdir"

# --- libraries -------------------------------------------------------------------------
# The PyTorch baseline runs with the caller's LD_LIBRARY_PATH: ours could make torch load
# another CUDA toolkit's cuBLAS than the one its wheels bring.
if [ -n "${LD_LIBRARY_PATH+set}" ]; then torch_env=(env LD_LIBRARY_PATH="$LD_LIBRARY_PATH"); else torch_env=(env -u LD_LIBRARY_PATH); fi
libdirs=()
add_dir() { [ -d "$1" ] && libdirs+=("$1"); }
for d in /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib /usr/local/nvidia/lib64 /usr/local/nvidia/lib \
         /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64 \
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
# $1 is a glob on purpose; the first match of the first folder that has one.
# shellcheck disable=SC2086,SC2012
found() { for d in "${libdirs[@]:-}"; do ls "$d"/$1 >/dev/null 2>&1 && { ls "$d"/$1 | head -n 1; return; }; done; echo "NOT FOUND"; }
# The driver's own soname first (libcuda.so alone may be a toolkit stub), cuBLASLt 13 first
# (the build targets CUDA 13; another major is only a fallback).
libcuda=$(found 'libcuda.so.1')
[ "$libcuda" != "NOT FOUND" ] || libcuda=$(found 'libcuda.so*')
libcublaslt=$(found 'libcublasLt.so.13')
[ "$libcublaslt" != "NOT FOUND" ] || libcublaslt=$(found 'libcublasLt.so*')
# cudarc dlopens `libcublasLt.so` before `libcublasLt.so.13`: a folder of links that name the
# chosen files goes first on the search path, so an unversioned link elsewhere (a CUDA 12
# toolkit) cannot win over the cuBLASLt 13 found here.
if [ "$libcublaslt" != "NOT FOUND" ]; then
    shim=$(mktemp -d "${TMPDIR:-/tmp}/bc-libs.XXXXXX") &&
        ln -sf "$libcublaslt" "$shim/libcublasLt.so" && libdirs=("$shim" "${libdirs[@]}") &&
        trap 'rm -rf "$shim"' EXIT
fi
ld=$(IFS=:; echo "${libdirs[*]:-}")
export LD_LIBRARY_PATH="${ld}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# A library and the version its real file name carries (libcuda.so.580.65.06: the driver).
describe() {
    [ "$1" != "NOT FOUND" ] || { echo "NOT FOUND"; return; }
    local real
    real=$(readlink -f "$1" 2>/dev/null || echo "$1")
    echo "$1 -> $(basename "$real") (version ${real##*.so.})"
}
{
    echo "libcuda:     $(describe "$libcuda")"
    echo "libcublasLt: $(describe "$libcublaslt")"
    # cuBLASLt 13 is needed for GEMMs (the kernel tests run without it); say so if only another
    # major is there.
    case "$libcublaslt" in *libcublasLt.so.13*) ;; "NOT FOUND") echo "note: no cuBLASLt: GEMM and end-to-end tests skip, kernel tests run; pip install nvidia-cublas (cu13)";; *) echo "note: cuBLASLt found is not version 13 ($libcublaslt); pip install nvidia-cublas (cu13) if the tests cannot load it";; esac
} > "$logs"/env.txt
if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$logs"/nvidia-smi.txt 2>&1
fi
[ $mode = device ] && sed 's/^/        /' "$logs"/env.txt "$logs"/nvidia-smi.txt 2>/dev/null
[ $mode = device ] || cat "$logs"/env.txt "$logs"/nvidia-smi.txt 2>/dev/null

export BC_TEST_DATA="$here/data"
export BC_CLI="$here/bin/blockcascade"
export PYTHONUNBUFFERED=1
# A tuning file on this machine (`blockcascade tune`) must not steer the tests and bench rows:
# they measure the defaults and name every variant they run. The tune part writes its own.
export BC_TUNING=off
status=0
short="" # parts skipped or cut short for time

# --- devices: is there a usable GPU at all? ---------------------------------------------
timeout 60 ./bin/blockcascade info --devices > "$logs"/devices.txt 2>&1
devrc=$?
nogpu=""
if [ $devrc -ne 0 ]; then
    nogpu=$(grep -m1 -v '^\s*$' "$logs"/devices.txt | cut -c1-300)
    [ -n "$nogpu" ] || nogpu="blockcascade info --devices exited $devrc"
    [ $devrc -ne 124 ] || nogpu="blockcascade info --devices hung (60 s)"
elif timeout 30 ./bin/blockcascade info --kernels 2>&1 | grep -q "kernels were not built"; then
    nogpu="the bundle's kernels were not built (no nvcc when it was made)"
fi
[ -z "$nogpu" ] || say "no usable GPU: $nogpu"
# No GPU: the tests say so when they ran (they are the judge: info --devices could fail for
# another reason), else info --devices.
gpu_missing() {
    if grep -q '^test result' "$logs"/tests.log 2>/dev/null; then
        grep -q 'SKIP.*no GPU' "$logs"/tests.log
    else
        [ -n "$nogpu" ]
    fi
}

# --- summary -----------------------------------------------------------------------------
# summary full|compact: full writes every KERNEL line; compact (stdout in device mode) the worst
# error per kernel. Test output lines may start with libtest's "test NAME ... " prefix (with
# --nocapture a test's first line follows it), hence `tagged`.
tagged() { # lines of $2 that carry tag $1 (at the start, or after libtest's prefix)
    grep -oE "(^|^test [^ ]+ \.\.\. )$1 .*" "$2" 2>/dev/null | sed -E 's/^test [^ ]+ \.\.\. //'
}
summary() {
    local f ok
    echo "================================ SUMMARY ================================"
    local dev
    dev=$(grep -m1 '^device:' "$logs"/bench.log 2>/dev/null)
    [ -n "$dev" ] || dev="device: $(head -n 1 "$logs"/nvidia-smi.txt 2>/dev/null || echo "none (no nvidia-smi)")"
    echo "$dev"
    local commit
    commit=$(head -n 1 COMMIT 2>/dev/null)
    echo "commit: ${commit:-unknown}"
    sed 's/^/  /' "$logs"/env.txt
    if [ $mode = device ]; then
        echo "-- parts (run.sh device, budget ${budget}s, $(el)s used)"
    else
        echo "-- parts"
    fi
    for f in wgmma tests bench pytorch ncu memcheck racecheck tune; do
        ok=$(grep -m1 "^$f|" "$logs"/parts.txt | cut -d'|' -f2-)
        [ -z "$ok" ] || printf '  %-10s %s\n' "$f" "$ok"
    done
    echo "-- devices (blockcascade info --devices)"
    sed 's/^/  /' "$logs"/devices.txt 2>/dev/null | head -n 20
    if [ -s "$logs"/tune.log ]; then
        echo "-- tune (blockcascade tune: every variant in its own process; * chosen)"
        grep -E '^(family|attention|split|conv|chosen:|written:|error)' "$logs"/tune.log | sed 's/^/  /'
    fi
    echo "-- wgmma layouts (sm_90a probe, run first: every layout must PASS before a wgmma kernel is trusted)"
    if [ "$1" = compact ]; then
        tagged WGMMA "$logs"/wgmma.log | grep -v ' PASS ' | cut -c1-200 | sed 's/^/  /'
        np=$(tagged WGMMA "$logs"/wgmma.log | grep -c ' PASS'); nf=$(tagged WGMMA "$logs"/wgmma.log | grep -c ' FAIL')
        echo "  ${np:-0} PASS, ${nf:-0} FAIL (wgmma.log in logs.tar.gz has every line)"
        tagged TMA "$logs"/tma.log | grep -v ' PASS ' | cut -c1-200 | sed 's/^/  /'
        tp=$(tagged TMA "$logs"/tma.log | grep -c ' PASS'); tf=$(tagged TMA "$logs"/tma.log | grep -c ' FAIL')
        echo "  TMA: ${tp:-0} PASS, ${tf:-0} FAIL (tma.log)"
    else
        tagged WGMMA "$logs"/wgmma.log | cut -c1-200 | sed 's/^/  /'
        tagged TMA "$logs"/tma.log | cut -c1-200 | sed 's/^/  /'
    fi
    # A failed TMA probe's diagnostics (both summaries; only a failed probe leaves them).
    grep -h -m2 -A1 'panicked' "$logs"/tma.log 2>/dev/null | cut -c1-200 | sed 's/^/  TMA probe: /'
    grep -h -m4 -E '^========= +(Illegal|Invalid|Error|at |by thread)' "$logs"/tma-sanitizer.log 2>/dev/null | cut -c1-200 | sed 's/^/  TMA sanitizer: /'
    sed 's/^/  /' "$logs"/tma-bisect.log 2>/dev/null
    tagged GOLDEN "$logs"/tma-conv.log | grep 'conv-tma' | sed 's/^/  TMA conv golden: /'
    # The smoke runs of the never-run paths (a failed or hung one is left out of the later parts).
    grep -h -E '^SMOKE ' "$logs"/smoke-*.log 2>/dev/null | cut -c1-200 | sed 's/^/  /'
    echo "-- kernel max error vs CPU reference (tolerance ~1e-2)"
    if [ "$1" = compact ]; then
        tagged KERNEL "$logs"/tests.log | awk '{
            e = $NF; sub(/^max_err=/, "", e); s = $3; for (i = 4; i < NF; i++) s = s " " $i
            n[$2]++; if (!($2 in w) || e + 0 > w[$2] + 0) { w[$2] = e; sh[$2] = s }
            if (!($2 in o)) { o[$2] = ++k; nm[k] = $2 } }
            END { for (i = 1; i <= k; i++) { m = nm[i]; printf "  %-36s %-10s %s%s\n", m, w[m], sh[m], (n[m] > 1 ? " (worst of " n[m] ")" : "") } }'
    else
        tagged KERNEL "$logs"/tests.log | awk '{ s = $3; for (i = 4; i < NF; i++) s = s " " $i; printf "  %-36s %-28s %s\n", $2, s, $NF }'
    fi
    # The warp-specialized attention kernel against pp_k128's bits (tests/cuda.rs ws_twin).
    tagged ATTN_WS_BITS "$logs"/tests.log | cut -c1-200 | sed 's/^/  /'
    echo "-- whole model (relative L2 vs f32 reference, < 2e-2)"
    tagged '(GOLDEN|GRAPH|MULTI|EPILOGUE|TEXT)' "$logs"/tests.log | sed 's/^/  /'
    echo "-- compute-sanitizer (kernel tests, small shapes)"
    sed 's/^/  /' "$logs"/sanitizer.txt 2>/dev/null
    echo "-- tests"
    grep -hE '^test result|FAILED|panicked' "$logs"/tests.log 2>/dev/null | cut -c1-300 | sed 's/^/  /'
    grep -ho 'SKIP.*' "$logs"/tests.log 2>/dev/null | sed 's/^SKIP [^:]*: //' | sort | uniq -c |
        awk '{ n = $1; $1 = ""; printf "  SKIP (%d tests):%s\n", n, $0 }' | head -n 8
    echo "-- kernels (rate and % of measured peak)"
    # The bench prints its rows in several tables (a run cut short keeps the earlier ones): one header.
    sed -n '/^kernel /,/^$/p' "$logs"/bench.log 2>/dev/null | sed '/^$/d; s/^/  /' | awk '!/^  kernel / || !h++'
    echo "-- end to end (wan-1.3b-shape, 60x104, 21 frames, 4 steps)"
    sed -n '/^schedule /,/^$/p' "$logs"/bench.log 2>/dev/null | grep -vE '^(JSON|TUNE) ' | sed '/^$/d; s/^/  /'
    grep -hE '^(SKIP|TUNE|TEXT|DECODE|CONV|SWITCH|PIXELS|SPLIT) ' "$logs"/bench.log 2>/dev/null | cut -c1-300 | sed 's/^/  /'
    echo "-- Nsight Compute (where the time goes; docs/gpu-bundle.md)"
    cut -c1-300 "$logs"/ncu.txt 2>/dev/null | sed 's/^/  /'
    echo "-- PyTorch baseline (same GPU)"
    local py eng pt
    py=$(grep -m1 -hE '^(PYTORCH|SKIP)' "$logs"/pytorch.log 2>/dev/null || echo "no result (see $logs/pytorch.log)")
    echo "  $py"
    eng=$(awk '$1=="sequential" {print $3}' "$logs"/bench.log 2>/dev/null | head -n 1)
    pt=$(echo "$py" | sed -n 's/.*sixth_block_ms=\([0-9.]*\).*/\1/p')
    if [ -n "$eng" ] && [ -n "$pt" ]; then
        awk -v e="$eng" -v p="$pt" 'BEGIN { printf "  6th block: engine %.1f ms, PyTorch %.1f ms, engine/PyTorch speed-up %.2fx\n", e, p, p / e }'
    fi
    # The text encoder (30 tokens, bf16): benches/gpu.rs's TEXT line against PyTorch's.
    local tx ours
    tx=$(grep -m1 -h '^PYTORCH_TEXT' "$logs"/pytorch.log 2>/dev/null)
    if [ -n "$tx" ]; then
        echo "  $tx"
        ours=$(grep -m1 -ohE '^TEXT umt5-xxl [0-9]+ tokens: [0-9.]+ ms' "$logs"/bench.log 2>/dev/null | awk '{print $(NF-1)}')
        pt=$(echo "$tx" | sed -n 's/.* ms=\([0-9.]*\).*/\1/p')
        if [ -n "$ours" ] && [ -n "$pt" ]; then
            awk -v e="$ours" -v p="$pt" 'BEGIN { printf "  text encoder: engine %.2f ms, PyTorch %.2f ms, engine/PyTorch speed-up %.2fx\n", e, p, p / e }'
        fi
    fi
    # The Wan VAE decode: PyTorch's (bf16, cuDNN) against the engine's default decode row (the
    # fastest `decode wan 60x104 3-frame block` row that is not a no-parity or per-frame variant).
    local dc
    grep -hE '^(check wan-vae-tiny|SKIP pytorch decode)' "$logs"/pytorch.log 2>/dev/null | cut -c1-200 | sed 's/^/  /'
    dc=$(grep -m1 -h '^PYTORCH_DECODE wan' "$logs"/pytorch.log 2>/dev/null)
    if [ -n "$dc" ]; then
        echo "  $dc"
        ours=$(grep -hE '^decode wan 60x104 3-frame block' "$logs"/bench.log 2>/dev/null | grep -vE 'no-parity|per-frame' |
            sed -E 's/^decode wan 60x104 3-frame block[a-z -]* +([0-9.]+) .*/\1/' | sort -g | head -n 1)
        pt=$(echo "$dc" | sed -n 's/.* ms=\([0-9.]*\).*/\1/p')
        if [ -n "$ours" ] && [ -n "$pt" ]; then
            awk -v e="$ours" -v p="$pt" 'BEGIN { printf "  Wan VAE decode per 3-latent-frame block: engine %.1f ms, PyTorch %.1f ms, engine/PyTorch speed-up %.2fx\n", e, p, p / e }'
        fi
    fi
    echo "logs: $logs${tarball:+ (tarball: $tarball)}"
    echo "$result"
}
result="RESULT: incomplete: run.sh had not finished when this summary was written"
tarball=""
[ $mode = device ] && tarball="$outdir/logs.tar.gz"
# Writes summary.txt (and in device mode the tarball) into the log folder and BC_OUT.
save() {
    summary full > "$logs"/summary.txt 2>&1
    if [ "$outdir" != "$logs" ]; then
        cp "$logs"/summary.txt "$outdir"/summary.txt.part && mv "$outdir"/summary.txt.part "$outdir"/summary.txt
    fi
    [ $mode = device ] || return 0
    local f
    for f in "$logs"/*.log; do # keep the tarball far below the 16 MiB a returned file may have
        [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt $((8 << 20)) ] || continue
        { head -c $((3 << 20)) "$f"; printf '\n[... trimmed by run.sh ...]\n'; tail -c $((3 << 20)) "$f"; } > "$f.trim" && mv "$f.trim" "$f"
    done
    tar -czf "$tarball.part" --exclude=logs.tar.gz --exclude='*.part' -C "$logs" . 2>/dev/null && mv "$tarball.part" "$tarball"
}

# --- running one part ----------------------------------------------------------------------
# Device mode: lines worth a progress line (test starts and results, benchmark rows, errors).
progress() {
    local l
    while IFS= read -r l; do
        case "$l" in
            'test '*|WGMMA*FAIL*|'WGMMA SKIP'*|'SMOKE '*|'NCU '*|'== ncu '*|*panicked*|*FAILED*|SKIP*|'device:'*|'end to end'*|'sequential '*|'cascade lag '*|PYTORCH*|*Traceback*|*'ERROR SUMMARY'*|*'RACECHECK SUMMARY'*|*'not supported'*|*'Error:'*|*'error:'*)
                say "    ${l:0:120}";;
        esac
    done
}
# run_part NAME LOG CMD...: runs CMD (output to LOG) under its timeout; sets $rc and $cut (1 when
# the timeout was cut to the time left in the budget). Returns 1 when skipped for time.
run_part() {
    local name=$1 log=$2 t left
    shift 2
    cut=0
    if [ $mode = device ]; then
        t=${cap[$name]}
        left=$((budget - reserve - $(el)))
        if [ $left -lt "${need[$name]}" ]; then
            set_status "$name" "skipped: out of time budget (${left}s left, needs ${need[$name]}s)"
            say "$name: skipped: out of time budget (${left}s left, needs ${need[$name]}s)"
            short+="$name (skipped) "
            save
            return 1
        fi
        [ $left -ge "$t" ] || { t=$left; cut=1; }
    else
        t=${cap_full[$name]}
    fi
    set_status "$name" "running (started at $(el)s, timeout ${t}s): the call ended before it did"
    save
    say "== $name (timeout ${t}s)"
    local s=$SECONDS
    # BC_PART_TIMEOUT: the part's own time, for a part that shares it out (ncu).
    if [ $mode = device ]; then
        BC_PART_TIMEOUT=$t timeout -k 10 "$t" "$@" 2>&1 | tee "$log" | progress
    else
        BC_PART_TIMEOUT=$t timeout -k 10 "$t" "$@" 2>&1 | tee "$log"
    fi
    rc=${PIPESTATUS[0]}
    dt=$((SECONDS - s))
    return 0
}
# The outcome of a finished part: "ok", "TIMEOUT ..." or "FAILED ..."; sets status on failure.
finish() {
    local name=$1 log=$2 what=${3:0:150}
    if [ "$rc" -eq 0 ] && [ "${what#SKIP}" != "$what" ]; then
        what="skipped: ${what#SKIP *: }"
    elif [ "$rc" -eq 0 ]; then
        what="ok${what:+, $what}"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        if [ "$cut" = 1 ]; then
            what="cut short by the time budget after ${dt}s (partial log)"
            short+="$name (cut short) "
        elif [ "$name" = memcheck ] || [ "$name" = racecheck ]; then
            # The same tests ran without the sanitizer first: most likely slow, not hung.
            what="TIMEOUT after ${dt}s (slow under the sanitizer, or hung; partial log)"
            short+="$name (timeout) "
        else
            what="TIMEOUT after ${dt}s (hung? partial log)"
            status=1
        fi
    else
        what="FAILED (exit $rc)${what:+, $what}"
        status=1
    fi
    set_status "$name" "$what (${dt}s)"
    say "$name: $what (${dt}s)"
    if [ $mode = device ] && [ "$rc" -ne 0 ]; then # what went wrong, in the output tail
        case "$name" in
            memcheck|racecheck) grep -m 12 '^========= ' "$log";;
            *) tail -n 12 "$log";;
        esac | cut -c1-200 | sed 's/^/          | /'
    fi
    save
}

# Smoke runs of the paths never run on a GPU before (split-KV, the ws attention, the ws
# conv, the halo conv), each one short process under a short timeout, before the tests and the bench that
# use them: a hang costs its timeout here instead of a part's cap and everything that part
# would print after it. One that fails or hangs is left out of the later parts:
# BC_NO_SPLIT=1 + BC_ATTN_SPLIT=1, BC_NO_ATTN_WS=1, BC_NO_ATTN_WS_DEEP=1, BC_BENCH_NO_CONV_WS=1,
# BC_BENCH_NO_CONV_HALO=1 (`SMOKE` lines in
# the summary, smoke-*.log).
smoke() { # smoke WHAT SECONDS: succeeds when the run printed `SMOKE WHAT ok`
    timeout -k 3 "$2" env BC_BENCH_SMOKE="$1" ./bin/gpu-bench > "$logs/smoke-$1.log" 2>&1
    local r=$?
    if grep -q "^SMOKE $1 ok" "$logs/smoke-$1.log"; then
        say "    SMOKE $1 ok"
        return 0
    fi
    if [ $r -eq 124 ] || [ $r -eq 137 ]; then
        echo "SMOKE $1 HUNG: killed after ${2}s" >> "$logs/smoke-$1.log"
    else
        echo "SMOKE $1 FAILED: exit $r" >> "$logs/smoke-$1.log"
    fi
    say "    SMOKE $1 FAILED or hung (smoke-$1.log): left out of the later parts"
    status=1 # a finding: the RESULT line says FAILED
    return 1
}
# smoke_all: the smoke runs above, once per call; their notes go to $note. Called after the
# wgmma probe, or (a later `run.sh device tests bench` with BC_WGMMA_OK=1 set by hand, or a
# failed wgmma part) before the tests, so no part meets a never-run path unsmoked.
smoked=""
smoke_all() {
    [ -z "$smoked" ] || return 0
    smoked=1
    note=${note:-} # unset when the wgmma part did not run (set -u)
    [ -z "$nogpu" ] || return 0
    ! grep -qs 'SKIP.*no GPU' "$logs"/wgmma.log || return 0
    if ! smoke split 30; then
        export BC_NO_SPLIT=1 BC_ATTN_SPLIT=1
        note="$note; split-KV smoke FAILED: split off"
    fi
    if [ "${BC_WGMMA_OK:-}" = 1 ]; then
        if ! smoke attention-ws 30; then
            export BC_NO_ATTN_WS=1
            note="$note; ws attention smoke FAILED: left out"
        fi
        if ! smoke attention-ws-deep 30; then
            export BC_NO_ATTN_WS_DEEP=1
            note="$note; ws_deep attention smoke FAILED: left out"
        fi
        if [ -z "${BC_BENCH_NO_CONV_WS:-}" ] && ! smoke conv-ws 45; then
            export BC_BENCH_NO_CONV_WS=1
            note="$note; ws conv smoke FAILED: left out"
        fi
        if [ -z "${BC_BENCH_NO_CONV_HALO:-}" ] && ! smoke conv-halo 45; then
            export BC_BENCH_NO_CONV_HALO=1
            note="$note; halo conv smoke FAILED: left out"
        fi
    fi
}

# --- wgmma layouts first (own process: a faulting probe cannot take the other tests with it) --
if want wgmma && run_part wgmma "$logs"/wgmma.log ./bin/cuda-tests --test-threads=1 --nocapture --exact wgmma_layouts_match_the_hardware; then
    # Lines may follow libtest's "test NAME ... " prefix (the first one does): `tagged`.
    np=$(tagged WGMMA "$logs"/wgmma.log | grep -c ' PASS'); nf=$(tagged WGMMA "$logs"/wgmma.log | grep -c ' FAIL')
    note="$np PASS, $nf FAIL"
    if grep -q '^WGMMA SKIP' "$logs"/wgmma.log; then note=$(grep -m1 '^WGMMA SKIP' "$logs"/wgmma.log); fi
    if grep -q 'SKIP.*no GPU' "$logs"/wgmma.log; then note="SKIP wgmma: no GPU"; fi
    # Every layout PASSed (and the control failed as it must): the wgmma attention prototype
    # may run in the tests and the benchmark below (BC_WGMMA_OK=1; they also need sm_90).
    if [ "$nf" -eq 0 ] && [ "$np" -gt 0 ] && grep -q '^test result: ok' "$logs"/wgmma.log &&
        ! grep -q '^WGMMA SKIP' "$logs"/wgmma.log; then
        export BC_WGMMA_OK=1
        note="$note; wgmma attention enabled"
    fi
    smoke_all
    # The TMA / mbarrier probe (tests/cuda.rs tma_layouts_match_the_hardware), in its own
    # process too: every TMA line PASSes -> BC_TMA_OK=1 (the TMA conv bc_conv_wgmma_tma then
    # joins the tests and the benchmark, with BC_WGMMA_OK=1 as well).
    # This run's diagnostics only (a passing probe leaves none).
    rm -f "$logs"/tma-sanitizer.log "$logs"/tma-bisect.log "$logs"/tma-conv.log
    timeout -k 5 60 ./bin/cuda-tests --test-threads=1 --nocapture --exact tma_layouts_match_the_hardware \
        > "$logs"/tma.log 2>&1
    tp=$(tagged TMA "$logs"/tma.log | grep -c ' PASS'); tf=$(tagged TMA "$logs"/tma.log | grep -c ' FAIL')
    note="$note; TMA $tp PASS, $tf FAIL"
    # A probe that faulted (the first GPU run: an illegal instruction) prints few lines: say so.
    if ! grep -q '^test result: ok' "$logs"/tma.log; then
        note="$note, TMA probe FAILED (tma.log)"
        # The diagnostics below come out of the budget too: in device mode they keep 200 s for
        # the parts after them (tests, bench, pytorch) and stop where that would not hold.
        # At most BC_TMA_DIAG_S (default 60) seconds in all: the bisect is worth less than the
        # new kernels' data in the bench and ncu parts.
        diag_end=$(( $(el) + ${BC_TMA_DIAG_S:-60} ))
        diag_left() {
            local l=100000
            if [ $mode = device ]; then l=$((budget - reserve - $(el) - 200)); fi
            [ $((diag_end - $(el))) -ge "$l" ] || l=$((diag_end - $(el)))
            echo "$l"
        }
        # Seconds for one diagnostic of at most $1 s (0: no time left for it).
        diag_t() { local l; l=$(diag_left); [ "$l" -ge 5 ] || { echo 0; return; }; [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
        # Locate the fault: the probe again under compute-sanitizer (its report names the
        # kernel and the SASS offset of the faulting instruction), 45 s at most.
        san=$(command -v compute-sanitizer || ls -d /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | sort -V | tail -n 1)
        if [ -n "$san" ] && [ "$(diag_t 45)" -gt 0 ]; then
            timeout -k 5 "$(diag_t 45)" "$san" --tool memcheck --show-backtrace device ./bin/cuda-tests --test-threads=1 \
                --nocapture --exact tma_layouts_match_the_hardware > "$logs"/tma-sanitizer.log 2>&1
            note="$note, sanitizer report in tma-sanitizer.log"
        fi
        # Bisect the raw cases' shape, one process per case (a fault leaves the context
        # unusable): `TMA bisect` lines in tma-bisect.log (docs/gpu-results.md says why).
        for c in wgmma:B128 raw:None:2:2 raw:None:2:2:inside raw:None:2:2:dense \
                 raw:None:2:2:fit raw:None:2:2:rows8 raw:None:2:2:dense,fit \
                 raw:None:2:2:dense,fit,inside raw:B128:2:2:dense,fit,inside raw:None:2:2:dense,fit,rows8,inside; do
            dt_c=$(diag_t 10)
            [ "$dt_c" -gt 0 ] || { echo "TMA bisect $c: skipped (time budget)"; continue; }
            r=$(BC_TMA_ONLY=$c timeout -k 2 "$dt_c" ./bin/cuda-tests --test-threads=1 --nocapture --exact \
                tma_layouts_match_the_hardware 2>&1 | grep -m1 -E '^(test [^ ]+ \.\.\. )?TMA (raw|wgmma|global)' | grep -oE ' (PASS|FAIL)' | head -n 1)
            echo "TMA bisect $c:${r:- no result}"
        done > "$logs"/tma-bisect.log 2>&1
        note="$note, bisection in tma-bisect.log"
        # The TMA convolution on its own maps (3-D activation boxes of whole 16-byte channel
        # groups and 2-D weight boxes, unlike the probe's raw cases): the golden decoders with it,
        # in a process of their own. Reported only (`TMA conv golden` in the summary); it stays
        # off in the tests and the benchmark, where a fault would cost their later sections.
        if [ "${BC_WGMMA_OK:-}" = 1 ] && [ "$(diag_t 60)" -gt 0 ]; then
            BC_TMA_OK=1 timeout -k 2 "$(diag_t 60)" ./bin/cuda-tests --test-threads=1 --nocapture --exact \
                decoders_match_the_golden_videos > "$logs"/tma-conv.log 2>&1
            if grep -q '^test result: ok' "$logs"/tma-conv.log && grep -q 'conv-tma rel_l2' "$logs"/tma-conv.log; then
                note="$note, TMA conv golden PASS (tma-conv.log)"
            else
                note="$note, TMA conv golden FAIL (tma-conv.log)"
            fi
        fi
    fi
    if [ "$tf" -eq 0 ] && [ "$tp" -gt 0 ] && grep -q '^test result: ok' "$logs"/tma.log; then
        export BC_TMA_OK=1
        note="$note (TMA conv enabled)"
    fi
    finish wgmma "$logs"/wgmma.log "$note"
fi

# The smoke runs, where the wgmma part did not run them (not wanted, or it failed).
if want tests || want bench || want ncu; then smoke_all; fi

# --- tests -----------------------------------------------------------------------------
skip_wgmma=()
want wgmma && skip_wgmma=(--skip wgmma_layouts_match_the_hardware --skip tma_layouts_match_the_hardware) # ran above
if want tests && run_part tests "$logs"/tests.log ./bin/cuda-tests --test-threads=1 --nocapture ${skip_wgmma[@]+"${skip_wgmma[@]}"}; then
    note=$(grep -m1 -oE '[0-9]+ passed; [0-9]+ failed' "$logs"/tests.log)
    if grep -q 'SKIP.*no GPU' "$logs"/tests.log; then note="${note:+$note, }GPU tests skipped: no GPU"; fi
    finish tests "$logs"/tests.log "$note"
fi

# --- benchmarks ------------------------------------------------------------------------
if want bench && run_part bench "$logs"/bench.log env BC_BENCH_JSON="$logs/gpu-bench.json" ./bin/gpu-bench; then
    # Only the whole bench's own SKIP (no GPU) makes it "skipped": its other SKIP lines (a
    # section left out, e.g. the TMA conv) are listed in the summary.
    finish bench "$logs"/bench.log "$(grep -m1 -o '^SKIP gpu bench.*' "$logs"/bench.log)"
fi

# --- PyTorch baseline ----------------------------------------------------------------------
if want pytorch; then
    if ! command -v python3 >/dev/null 2>&1; then
        echo "SKIP pytorch baseline: no python3" > "$logs"/pytorch.log
        set_status pytorch "skipped: no python3"
    # The DiT baseline, then the umT5-XXL text encoder in eager PyTorch on the GPU, then the Wan
    # VAE decode (diffusers' AutoencoderKLWan, bf16, streamed as the engine does; diffusers'
    # wheels travel in wheels/, the image lacks it): their failures do not hide the first's result.
    elif run_part pytorch "$logs"/pytorch.log "${torch_env[@]}" bash -c \
        'python3 pytorch_baseline.py; r=$?; python3 pytorch_text_encoder.py --device cuda --reps 10 || true
         if ls wheels/*.whl >/dev/null 2>&1; then
             python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/bc-pydeps wheels/*.whl &&
                 PYTHONPATH=/tmp/bc-pydeps PYTHONUNBUFFERED=1 python3 pytorch_decode.py --wan-from diffusers --kinds wan \
                     --device cuda --dtype bf16 --blocks 3 --check data/decode || true
         else echo "SKIP pytorch decode: no wheels/ in the bundle (gpu-bundle.sh could not download diffusers)"; fi
         exit $r'; then
        # The script prints "SKIP ..." and exits 0 without torch or without a CUDA device. Its
        # failure is reported but does not fail the run (the engine is what is validated).
        st=$status
        finish pytorch "$logs"/pytorch.log "$(grep -m1 -o '^SKIP.*' "$logs"/pytorch.log)"
        status=$st
    fi
fi

# --- Nsight Compute --------------------------------------------------------------------------
# Runs of the bench binary in its BC_BENCH_NCU modes, clocks and caches left as they are, most
# valuable first, each with its own CSV and its summary appended to ncu.txt as soon as it ends:
# `attention` (the self-attention at the bench shape on pp_k128 and ws, unsplit and split) and
# `conv` (the bench's conv layers, one launch per layer and kernel, then the halo conv's TAEHV layers) with the counter sections;
# `dit` (two sequential blocks of the 1.3B-shaped model, graphs off) with only the durations of
# its first 1000 kernels (about two of its ~9 ticks); `decode` (one block of each decoder, the
# Wan VAE first) with the counter sections for its first 40 conv launches. The launch counts
# are sized so that each program ends by itself (ncu prints its table only when its program
# ends); in case it does not, the program (not ncu) is stopped at a deadline cut from the
# part's time (BC_PART_TIMEOUT), and ncu then reports the launches it had profiled (expected,
# not yet seen). Reported, never a failure.
if want ncu; then
    # shellcheck disable=SC2012
    ncu_bin=$(command -v ncu || ls -d /usr/local/cuda/bin/ncu /usr/local/cuda-*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$ncu_bin" ]; then
        echo "NCU skipped: ncu not found" > "$logs"/ncu.txt
        set_status ncu "skipped: ncu not found"
    elif gpu_missing; then
        echo "NCU skipped: no GPU" > "$logs"/ncu.txt
        set_status ncu "skipped: no GPU"
    elif run_part ncu "$logs"/ncu.log env NCU="$ncu_bin" LOGS="$logs" bash -c '
            : > "$LOGS"/ncu.txt
            end=$((SECONDS + ${BC_PART_TIMEOUT:-140} - 10)) # before the version query: it counts too
            timeout 20 "$NCU" --version 2>&1 | tail -n 1
            # prof NAME KIND SECONDS NCU-ARGS...: the bench in mode NAME under ncu, the program
            # stopped after SECONDS (cut to the time left, 15 s kept for ncu to start and print),
            # then its summary (ncu_summary.py KIND).
            prof() {
                local name=$1 kind=$2 s=$3 left
                shift 3
                left=$((end - SECONDS - 15))
                [ "$s" -le "$left" ] || s=$left
                if [ "$s" -lt 15 ]; then
                    echo "NCU $name: skipped (${left}s left in the part)" >> "$LOGS"/ncu.txt
                    return
                fi
                echo "== ncu $name: the program stopped after ${s}s at most"
                timeout -k 5 $((s + 15)) "$NCU" --target-processes all --clock-control none --cache-control none \
                    --print-units base --print-metric-name name --csv --page raw --log-file "$LOGS/ncu-$name.csv" "$@" \
                    timeout -k 3 "$s" env BC_BENCH_NCU="$name" ./bin/gpu-bench
                echo "== ncu $name: exit $?"
                python3 ncu_summary.py "$kind" "$LOGS/ncu-$name.csv" | sed "s/^NCU kernels:/NCU kernels ($name):/" >> "$LOGS"/ncu.txt
            }
            counters="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats
                      --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section SchedulerStats"
            prof attention kernels 35 $counters -k regex:^bc_attention -c 40
            prof conv kernels 50 $counters -k regex:^bc_conv_(wgmma|halo) -c 64
            BC_NO_GRAPHS=1 prof dit dit 45 -c 1000 --metrics gpu__time_duration.sum
            prof decode kernels 60 $counters -k regex:^bc_conv -c 40
            true'; then
        st=$status
        finish ncu "$logs"/ncu.log "$(head -n 1 "$logs"/ncu.txt 2>/dev/null)"
        status=$st # a profiler problem is reported, not a failed validation
    fi
fi

# --- compute-sanitizer (memcheck, racecheck) on the kernel tests at small shapes ---------
if want sanitizer; then
    # shellcheck disable=SC2012
    san=$(command -v compute-sanitizer || ls -d /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | sort -V | tail -n 1)
    : > "$logs"/sanitizer.txt
    unavailable=""
    for tool in memcheck racecheck; do
        log="$logs/sanitizer-$tool.log"
        if [ -z "$san" ]; then
            unavailable="compute-sanitizer not found"
        elif gpu_missing; then
            unavailable="no GPU"
        fi
        if [ -n "$unavailable" ]; then
            echo "SANITIZER $tool skipped: $unavailable" >> "$logs"/sanitizer.txt
            set_status "$tool" "skipped: $unavailable"
            [ $mode = device ] && say "$tool: skipped: $unavailable"
            continue
        fi
        # Every test named *_the_cpu (all kernels, the attention kernel included) at small shapes.
        run_part "$tool" "$log" env BC_TEST_SMALL=1 "$san" --tool "$tool" --error-exitcode 99 \
            ./bin/cuda-tests --test-threads=1 _the_cpu || {
            echo "SANITIZER $tool skipped: out of time budget" >> "$logs"/sanitizer.txt
            continue
        }
        line="SANITIZER $tool exit=$rc: $(grep -m1 -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | sed 's/^=* *//'); $(grep -m1 -o 'test result: [^;]*; [^;]*' "$log")"
        # A sanitizer that refuses the device (gVisor: "Device not supported", then error 999 at
        # the first allocation) is unavailable on this machine, not a finding.
        if [ "$rc" -ne 0 ] && [ "$rc" -ne 99 ] && grep -qiE 'device not supported|not supported on this (device|platform)' "$log"; then
            unavailable="compute-sanitizer refuses this device: $(grep -m1 -oiE '[^=]*not supported[^.]*' "$log" | sed 's/^ *//' | cut -c1-120)"
            echo "SANITIZER $tool unavailable: $unavailable" >> "$logs"/sanitizer.txt
            set_status "$tool" "unavailable ($unavailable; ${dt}s)"
            say "$tool: unavailable on this machine ($unavailable)"
            save
            continue
        fi
        echo "$line" >> "$logs"/sanitizer.txt
        if [ "$rc" -eq 99 ]; then
            finish "$tool" "$log" "errors found: $(grep -m1 -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | sed 's/^=* *//')"
        else
            finish "$tool" "$log" "$(grep -m1 -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | sed 's/^=* *//')"
        fi
    done
fi

# --- tune (opt-in, never in the default parts: `run.sh device tune`) ------------------------
# `blockcascade tune`: every Hopper kernel variant in its own child process (20 s timeout each:
# 12 candidates x 20 s stay under the 300 s cap, so even hung ones cannot lose the table), the
# table in tune.log, the file in the logs (tuning.json); a hung or faulting variant is a row
# of the table, not a failure of the part.
if want tune && run_part tune "$logs"/tune.log ./bin/blockcascade tune --out "$logs/tuning.json" --timeout-s 20; then
    finish tune "$logs"/tune.log "$(grep -m1 '^chosen:' "$logs"/tune.log)"
fi

# --- result ------------------------------------------------------------------------------
if gpu_missing; then
    [ $status -ne 0 ] || status=2
    reason=${nogpu:-$(grep -m1 -o 'no GPU.*' "$logs"/tests.log)}
    result="RESULT: no usable GPU ($reason): nothing was validated (exit $status)"
elif [ $status -ne 0 ]; then
    result="RESULT: FAILED (exit $status): see the parts table and the logs"
elif [ -n "$short" ]; then
    status=3
    result="RESULT: no failure, but INCOMPLETE for time (exit 3): ${short% }"
else
    result="RESULT: passed (exit 0)"
fi
[ -z "$short" ] || [ $status -eq 3 ] || result="$result; incomplete for time: ${short% }"
save
echo
if [ $mode = device ]; then
    summary compact | awk 'NR > 1 { print substr(p, 1, 220) } { p = $0 } END { print p }' # RESULT uncut
else
    summary full
fi
exit $status
