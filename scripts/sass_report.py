#!/usr/bin/env python3
"""Per-kernel SASS statistics of the kernel fatbin, and a threshold check on them.

Called by scripts/sass-report.sh (which installs cuobjdump/nvdisasm and finds the fatbin):

    sass_report.py --bin DIR --fatbin FILE [--limits FILE] [--check] [--dump DIR]

For every kernel and every sm_* cubin of the fatbin it prints:
  regs      registers per thread (cuobjdump -res-usage)
  spill     spill store + load bytes (the ptxas -v log build.rs writes next to the fatbin;
            the build already refuses spills)
  lmem      STL/LDL instructions (spills or local arrays, e.g. the slow path of f64 sin/cos)
  BRA       branch instructions (predicated ones included)
  HMMA      tensor-core mma instructions
  HGMMA     Hopper warpgroup mma instructions (wgmma.mma_async, sm_90a)
  WGARRIVE  WARPGROUP.ARRIVE instructions (wgmma.fence, and those ptxas injects when
            accumulator registers are touched between wgmma: fewer is better)
  LDSM      ldmatrix instructions
  EX2       MUFU.EX2 instructions
  f64       double-precision instructions (DADD/DMUL/DFMA/DSETP/..., F2F/I2F/F2I and MUFU
            forms with an f64 operand)
  smbase    reads of the shared-memory window base (S2R/S2UR of SR_CgaCtaId, sm_90: every
            generic->shared address conversion that is not hoisted costs one)
  ldsm>hmma the shortest distance, in instructions, from an LDSM to the first HMMA that reads
            one of its destination registers, over the LDSMs of the main loop (the backward
            branch whose body holds the most HMMAs; a use in the next iteration counts around
            the back edge). 1 = the mma waits for the full shared-memory latency.

--check compares against the limits file (lines `kernel-glob arch-glob metric <=|>= value`,
value an integer or a decimal,
'#' comments) and exits 1 when one is broken. Kernels or metrics a limit names that do not
exist are an error too, so that a renamed kernel does not silently pass.
"""

import argparse
import fnmatch
import os
import re
import subprocess
import sys
import tempfile

INSN = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^(\.L_x_\d+):")
FUNC = re.compile(r"^\.text\.(\S+):")
TARGET = re.compile(r"`\((\.L_x_\d+)\)")
REG = re.compile(r"\bR(\d+)\b")
F64_OPS = {"DADD", "DMUL", "DFMA", "DSETP", "DSET", "DMNMX", "DMMA"}
METRICS = ["regs", "spill", "lmem", "BRA", "HMMA", "HGMMA", "WGARRIVE", "LDSM", "EX2", "f64", "smbase", "ldsm>hmma", "hmma/ldsm"]


def run(cmd):
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"sass-report: {' '.join(cmd)} failed:\n{res.stderr}")
    return res.stdout


class Insn:
    def __init__(self, addr, text):
        self.addr = addr
        self.text = text
        parts = text.split()
        if parts and parts[0].startswith("@"):
            parts = parts[1:]
        self.op = parts[0] if parts else ""
        self.base = self.op.split(".")[0]
        self.args = " ".join(parts[1:])


def parse_functions(sass):
    """{kernel: (instructions, {label: index})} from nvdisasm -c output."""
    funcs = {}
    cur = None
    for line in sass.splitlines():
        m = FUNC.match(line)
        if m:
            cur = ([], {})
            funcs[m.group(1)] = cur
            continue
        if cur is None:
            continue
        m = LABEL.match(line)
        if m:
            cur[1][m.group(1)] = len(cur[0])
            continue
        m = INSN.match(line)
        if m:
            cur[0].append(Insn(int(m.group(1), 16), m.group(2)))
    return funcs


def is_f64(i):
    if i.base in F64_OPS:
        return True
    if i.base in ("F2F", "I2F", "F2I", "FRND"):
        return ".F64" in i.op
    if i.base == "MUFU":
        return "64H" in i.op
    return False


def regs_of(operand, width):
    m = REG.search(operand)
    if not m:
        return set()
    r = int(m.group(1))
    return set(range(r, r + width))


def ldsm_dest(i):
    width = 4 if i.op.endswith(".4") else 2 if i.op.endswith(".2") else 1
    return regs_of(i.args.split(",")[0], width)


def hmma_reads(i):
    ops = [o.strip() for o in i.args.split(",")]
    if len(ops) < 4:
        return set()
    return regs_of(ops[1], 4) | regs_of(ops[2], 2) | regs_of(ops[3], 4)


def main_loop(insns, labels):
    """(start, end) instruction indices of the backward branch holding the most HMMAs."""
    best = None
    for idx, i in enumerate(insns):
        if i.base != "BRA":
            continue
        m = TARGET.search(i.args)
        if not m or m.group(1) not in labels:
            continue
        tgt = labels[m.group(1)]
        if tgt > idx:
            continue
        n = sum(1 for j in insns[tgt : idx + 1] if j.base == "HMMA")
        if n and (best is None or n > best[0]):
            best = (n, tgt, idx)
    return None if best is None else (best[1], best[2])


def min_ldsm_hmma(insns, labels):
    loop = main_loop(insns, labels)
    if loop is None:
        return None
    lo, hi = loop
    body = insns[lo : hi + 1]
    n = len(body)
    best = None
    for k, i in enumerate(body):
        if i.base != "LDSM":
            continue
        dest = ldsm_dest(i)
        for step in range(1, n):
            j = body[(k + step) % n]
            if j.base == "HMMA" and hmma_reads(j) & dest:
                best = step if best is None else min(best, step)
                break
    return best


def hmma_per_ldsm(insns, labels):
    loop = main_loop(insns, labels)
    if loop is None:
        return None
    body = insns[loop[0] : loop[1] + 1]
    ldsm = sum(1 for i in body if i.base == "LDSM")
    hmma = sum(1 for i in body if i.base == "HMMA")
    return round(hmma / ldsm, 2) if ldsm else None


def stats(insns, labels):
    count = lambda pred: sum(1 for i in insns if pred(i))
    return {
        "BRA": count(lambda i: i.base == "BRA"),
        "HMMA": count(lambda i: i.base == "HMMA"),
        "HGMMA": count(lambda i: i.base == "HGMMA"),
        "WGARRIVE": count(lambda i: i.op.startswith("WARPGROUP.ARRIVE")),
        "LDSM": count(lambda i: i.base == "LDSM"),
        "EX2": count(lambda i: i.op.startswith("MUFU.EX2")),
        "f64": count(is_f64),
        "smbase": count(lambda i: i.base in ("S2R", "S2UR") and "SR_CgaCtaId" in i.args),
        "ldsm>hmma": min_ldsm_hmma(insns, labels),
        "hmma/ldsm": hmma_per_ldsm(insns, labels),
        "lmem": count(lambda i: i.base in ("STL", "LDL")),
    }


def resources(text):
    """{kernel: registers} from cuobjdump -res-usage of one cubin."""
    out = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+)", line)
        if m and name:
            out[name] = int(m.group(1))
            name = None
    return out


def ptxas_spills(fatbin):
    """{(kernel, arch): spill bytes} from the `ptxas -v` log build.rs writes beside the fatbin
    (ptxas.log; the spills of functions an entry calls count for the entry)."""
    out = {}
    path = os.path.join(os.path.dirname(os.path.abspath(fatbin)), "ptxas.log")
    if not os.path.exists(path):
        return out
    cur = None
    with open(path) as f:
        for line in f:
            m = re.search(r"Compiling entry function '([^']+)' for '([^']+)'", line)
            if m:
                cur = (m.group(1), m.group(2))
                out[cur] = 0
                continue
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and cur:
                out[cur] += int(m.group(1)) + int(m.group(2))
    return out


def collect(bindir, fatbin, dump):
    spills = ptxas_spills(fatbin)
    bindir = os.path.abspath(bindir)
    cuobjdump = os.path.join(bindir, "cuobjdump")
    nvdisasm = os.path.join(bindir, "nvdisasm")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        fat = os.path.abspath(fatbin)
        subprocess.run([cuobjdump, "-xelf", "all", fat], cwd=tmp, capture_output=True, check=True)
        cubins = sorted(f for f in os.listdir(tmp) if f.endswith(".cubin"))
        if not cubins:
            sys.exit(f"sass-report: no cubin in {fatbin}")
        for cubin in cubins:
            arch = re.search(r"\.(sm_\w+)\.cubin$", cubin)
            arch = arch.group(1) if arch else cubin
            path = os.path.join(tmp, cubin)
            sass = run([nvdisasm, "-c", path])
            if dump:
                os.makedirs(dump, exist_ok=True)
                with open(os.path.join(dump, f"{arch}.sass"), "w") as f:
                    f.write(sass)
            res = resources(run([cuobjdump, "-res-usage", path]))
            for name, (insns, labels) in parse_functions(sass).items():
                s = stats(insns, labels)
                s["regs"] = res.get(name)
                s["spill"] = spills.get((name, arch))
                rows[(name, arch)] = s
    return rows


def print_table(rows):
    fmt = "{:<24} {:<6}" + " {:>6}" * (len(METRICS) - 2) + " {:>9} {:>9}"
    print(fmt.format("kernel", "arch", *METRICS))
    for (name, arch) in sorted(rows):
        s = rows[(name, arch)]
        print(fmt.format(name, arch, *("-" if s[m] is None else s[m] for m in METRICS)))


def check(rows, limits_path):
    failures = []
    with open(limits_path) as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 5 or parts[3] not in ("<=", ">=") or parts[2] not in METRICS:
                sys.exit(f"sass-report: {limits_path}:{n}: want `kernel arch metric <=|>= value`")
            kern, arch, metric, op = parts[0], parts[1], parts[2], parts[3]
            try:
                value = float(parts[4])
            except ValueError:
                sys.exit(f"sass-report: {limits_path}:{n}: `{parts[4]}` is not a number")
            hit = [k for k in rows if fnmatch.fnmatchcase(k[0], kern) and fnmatch.fnmatchcase(k[1], arch)]
            if not hit:
                failures.append(f"{limits_path}:{n}: no kernel matches `{kern} {arch}`")
            for k in sorted(hit):
                got = rows[k][metric]
                ok = got is not None and (got <= value if op == "<=" else got >= value)
                if not ok:
                    failures.append(f"{k[0]} {k[1]}: {metric} = {got}, limit {op} {value} ({limits_path}:{n})")
    return failures


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--fatbin", required=True)
    ap.add_argument("--limits")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--dump")
    a = ap.parse_args()
    rows = collect(a.bin, a.fatbin, a.dump)
    print_table(rows)
    if a.check:
        failures = check(rows, a.limits)
        if failures:
            print("\nSASS limits broken:", file=sys.stderr)
            for f in failures:
                print("  " + f, file=sys.stderr)
            sys.exit(1)
        print("\nSASS limits hold")


if __name__ == "__main__":
    main()
