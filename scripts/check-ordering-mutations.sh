#!/usr/bin/env bash
# Mutation check of the multi-device ordering rules: copies the working tree, deletes one of
# the waits of MultiCudaBackend's joint K/V exchange (src/backend/cuda/joint.rs) at a time
# (rule 1: a copy waits for its source's compute; 2: for the receiver's last read of the rows
# it overwrites; 3: the receiver waits for its copies; 4: the sender waits for its outgoing
# copies before overwriting a buffer; 5: rule 2 for layer 0 with double buffering, the
# receiver's previous tick, which no host sync orders once the latents stay on the devices),
# and runs the emulated stream-order test, which must fail for each.
#   scripts/check-ordering-mutations.sh                 all rules, every test case
#   scripts/check-ordering-mutations.sh --double-only 2 4
#       rules 2 and 4 with the single-buffered case removed (the double-buffered form alone)
# Needs a few minutes per rule on 2 cores (its own target folder: the first build is a full
# one). Exit 0 when every mutation was caught.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="${BC_MUTATION_DIR:-${TMPDIR:-/tmp}/bc-ordering-mutations}"
double_only=0
if [ "${1:-}" = "--double-only" ]; then double_only=1; shift; fi
rules="${*:-1 2 3 4 5}"
mkdir -p "$work"
rm -rf "$work/tree"
mkdir -p "$work/tree"
(cd "$root" && git ls-files -z | xargs -0 cp --parents -t "$work/tree")
[ -d "$root/.cuda-toolchain" ] && ln -sfn "$root/.cuda-toolchain" "$work/tree/.cuda-toolchain"
cd "$work/tree"
cp src/backend/cuda/joint.rs "$work/joint.rs.orig"
if [ $double_only = 1 ]; then
  python3 - <<'PY' || exit 2
p = 'tests/cuda_multi_emulated.rs'
s = open(p).read()
a = '        case(causal, 3, false, false),\n'
assert s.count(a) == 1, 'single-buffered case not found'
open(p, 'w').write(s.replace(a, ''))
PY
fi
missed=0
for rule in $rules; do
  cp "$work/joint.rs.orig" src/backend/cuda/joint.rs
  python3 - "$rule" <<'PY' || exit 2
import sys
rule = sys.argv[1]
p = 'src/backend/cuda/joint.rs'
s = open(p).read()
subs = {
    '1': ('std::iter::once(&done[src]).chain(war).collect()', 'war.into_iter().collect()'),
    '2': ('std::iter::once(&done[src]).chain(war).collect()', 'std::iter::once(&done[src]).collect()'),
    '3': ('            for m in &arrived[d] {\n                dev.gpu.compute_wait(m)?;\n            }',
          '            let _ = &arrived[d];'),
    '4': ('            if let Some(m) = own_sent[d] {\n                dev.gpu.compute_wait(m)?;\n            }',
          '            let _ = own_sent[d];'),
    '5': ('        let mut done_prev: Marks = start;',
          '        let _ = start;\n        let mut done_prev: Marks = (0..nd).map(|_| None).collect();'),
}
a, b = subs[rule]
assert s.count(a) == 1, f'rule {rule}: the wait to delete was not found (code changed?)'
open(p, 'w').write(s.replace(a, b))
PY
  log="$work/rule$rule.log"
  CARGO_TARGET_DIR="$work/target" cargo test --release --test cuda_multi_emulated \
    joint_exchange_is_exact_under -- --nocapture > "$log" 2>&1
  rc=$?
  first=$(grep -m1 -E 'the stream order changes|panicked|Err\(' "$log" | cut -c1-220)
  if [ $rc = 0 ]; then
    echo "rule $rule: NOT caught (the test passed without its wait)"; missed=1
  else
    echo "rule $rule: caught: $first"
  fi
done
cp "$work/joint.rs.orig" src/backend/cuda/joint.rs
exit $missed
