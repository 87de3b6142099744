#!/usr/bin/env bash
# Coverage-guided fuzzing with AFL++ (cargo-afl, stable Rust). See docs/fuzzing.md.
#
#   scripts/fuzz.sh TARGET SECONDS    fuzz one target (names: src/fuzz_targets.rs TARGETS)
#   scripts/fuzz.sh all SECONDS       fuzz every target, SECONDS each, one after the other
#   scripts/fuzz.sh build             only install the tooling and build the harness
#   scripts/fuzz.sh corpus TARGET     add what fuzzing found (fuzz/out/TARGET) to the committed
#                                     corpus: afl-cmin, then the smallest files, at most
#                                     BC_FUZZ_CORPUS_KB (default 200) KB and 500 files
#   scripts/fuzz.sh list              print the target names, one a line
#
# Installs cargo-afl (which builds AFL++ from source) when missing, builds the harness in
# fuzz/target, seeds each run from fuzz/corpus/TARGET and keeps AFL's state in
# fuzz/out/TARGET (a second run resumes it). Prints executions, edges and findings per
# target; exits 1 when a target has crashes or hangs (they are in fuzz/out/TARGET/default/).
# Environment: BC_FUZZ_TIMEOUT_MS (per input, default 2000), BC_FUZZ_OUT (default fuzz/out).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
AFL_VERSION=0.18.2

usage() { sed -n '4,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage

install_tooling() {
  if ! cargo afl --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-afl $AFL_VERSION (builds AFL++)" >&2
    cargo install cargo-afl --locked --version "$AFL_VERSION"
  fi
  # Builds AFL++ for this rustc when it is not built yet (cargo-afl's install usually does it).
  local help
  help=$(cargo afl fuzz -h 2>&1 || true)
  if ! grep -q "afl-fuzz.*options" <<<"$help"; then
    cargo afl config --build
  fi
}

build() {
  # The harness needs no GPU kernels: skip nvcc (the emulated kernels are still built).
  (cd fuzz && BC_SKIP_NVCC=1 cargo afl build --release --quiet)
}

targets() {
  sed -n 's/^ *name: "\([a-z_0-9]*\)",$/\1/p' src/fuzz_targets.rs
}

# Runs one target for $2 seconds; prints a summary line; returns 1 on crashes or hangs.
run_one() {
  local t=$1 secs=$2
  local in="$ROOT/fuzz/corpus/$t" out="${BC_FUZZ_OUT:-$ROOT/fuzz/out}/$t"
  [ -d "$in" ] || { echo "fuzz: no corpus folder fuzz/corpus/$t" >&2; return 2; }
  # Scratch files of the targets (written and removed per input): in memory when possible.
  local tmp="$out/tmp"
  if [ -d /dev/shm ] && [ -w /dev/shm ]; then tmp="/dev/shm/bc-fuzz-$t-$$"; fi
  mkdir -p "$out" "$tmp"
  TMPDIR="$tmp" AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_NO_AFFINITY=1 AFL_AUTORESUME=1 \
    AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_FAST_CAL=1 AFL_IGNORE_SEED_PROBLEMS=1 \
    cargo afl fuzz -i "$in" -o "$out" -V "$secs" -t "${BC_FUZZ_TIMEOUT_MS:-2000}" -m none \
      -x "$ROOT/fuzz/bc.dict" -- "$ROOT/fuzz/target/release/bc-fuzz" "$t" >"$out/afl.log" 2>&1 ||
    { echo "fuzz: afl-fuzz failed for $t (see $out/afl.log):" >&2; tail -20 "$out/afl.log" >&2; return 2; }
  rm -rf "$tmp"
  local stats="$out/default/fuzzer_stats"
  val() { sed -n "s/^$1 *: *//p" "$stats"; }
  local crashes hangs
  crashes=$(val saved_crashes)
  hangs=$(val saved_hangs)
  printf 'fuzz: %-16s %5ss  execs %-10s %8s exec/s  edges %s (%s of the map)  corpus %s  crashes %s  hangs %s\n' \
    "$t" "$(val run_time)" "$(val execs_done)" "$(val execs_per_sec)" "$(val edges_found)" "$(val bitmap_cvg)" \
    "$(val corpus_count)" "$crashes" "$hangs"
  if [ "${crashes:-0}" != 0 ] || [ "${hangs:-0}" != 0 ]; then
    ls "$out/default/crashes" "$out/default/hangs" 2>/dev/null | grep -v README >&2 || true
    local first
    first=$(find "$out/default/crashes" -name 'id:*' 2>/dev/null | sort | head -1)
    if [ -n "$first" ]; then
      echo "fuzz: $t: replaying $first:" >&2
      BC_FUZZ_PRINT=1 "$ROOT/fuzz/target/release/bc-fuzz" "$t" <"$first" 2>&1 | head -5 >&2 || true
    fi
    return 1
  fi
}

# Minimises fuzz/out/$1's queue together with the committed corpus into fuzz/corpus/$1: the
# named seeds (ok-*, err-*) stay, the other files are replaced by the smallest of the minimised
# set that fit the size budget.
merge_corpus() {
  local t=$1 out="${BC_FUZZ_OUT:-$ROOT/fuzz/out}/$1" corpus="$ROOT/fuzz/corpus/$1"
  local work
  # The work folder sits beside AFL's state, not in $TMPDIR: with afl-cmin's output folder
  # under /dev/shm (TMPDIR=/dev/shm) every trace came back empty (AFL++ 4.40c), so the
  # "minimised" set was empty and the corpus lost every file found by fuzzing.
  mkdir -p "$out"
  work=$(mktemp -d "$out/cmin.XXXXXX")
  mkdir -p "$work/all" "$work/tmp"
  cp "$out"/default/queue/id:* "$work/all/" 2>/dev/null || true
  cp "$corpus"/* "$work/all/"
  TMPDIR="$work/tmp" AFL_SKIP_BIN_CHECK=1 cargo afl cmin -i "$work/all" -o "$work/min" -- \
    "$ROOT/fuzz/target/release/bc-fuzz" "$t" >"$work/cmin.log" 2>&1 ||
    { tail -20 "$work/cmin.log" >&2; rm -rf "$work"; return 2; }
  # Never replace the corpus with nothing: no input kept means the traces failed.
  if [ -z "$(find "$work/min" -type f -print -quit 2>/dev/null)" ]; then
    echo "fuzz: $t: afl-cmin kept no input (see below); the corpus is unchanged" >&2
    tail -5 "$work/cmin.log" >&2
    rm -rf "$work"
    return 2
  fi
  find "$corpus" -type f ! -name 'ok-*' ! -name 'err-*' -delete
  local budget=$((${BC_FUZZ_CORPUS_KB:-200} * 1024)) used=0 n=0 f size
  while read -r size f; do
    case "$(basename "$f")" in ok-* | err-*) continue ;; esac
    [ $((used + size)) -le "$budget" ] && [ "$n" -lt 500 ] || break
    cp "$f" "$corpus/q-$(sha1sum "$f" | cut -c1-12)"
    used=$((used + size)) n=$((n + 1))
  done < <(find "$work/min" -type f -printf '%s %p\n' | sort -n)
  echo "fuzz: $t: $(ls "$corpus" | wc -l) corpus files ($((used / 1024)) KB found by fuzzing)"
  rm -rf "$work"
}

if [ "$1" = build ]; then install_tooling; build; exit 0; fi
if [ "$1" = list ]; then targets; exit 0; fi
if [ "$1" = corpus ]; then
  [ $# -eq 2 ] || usage
  install_tooling
  build
  merge_corpus "$2"
  exit 0
fi
[ $# -eq 2 ] || usage
target=$1 secs=$2
[[ $secs =~ ^[0-9]+$ ]] && [ "$secs" -gt 0 ] || usage
if [ "$target" != all ] && ! targets | grep -qx "$target"; then
  echo "fuzz: unknown target $target (known: $(targets | tr '\n' ' '))" >&2
  exit 2
fi
install_tooling
build
status=0
if [ "$target" = all ]; then
  for t in $(targets); do run_one "$t" "$secs" || status=1; done
else
  run_one "$target" "$secs" || status=1
fi
exit $status
