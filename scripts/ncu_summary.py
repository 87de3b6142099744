#!/usr/bin/env python3
"""Summarises Nsight Compute CSV (`ncu --csv --page raw`) for the GPU bundle's `ncu` part.

    ncu_summary.py dit FILE      per-kernel device time of a DiT run (gpu__time_duration.sum):
                                 NCU dit lines, the shares of attention, GEMMs, norms and the rest,
                                 then the longest kernels
    ncu_summary.py kernels FILE  per kernel and grid of a `--section ...` run: duration, SM and
                                 memory throughput, tensor pipe, issue slots, occupancy,
                                 registers and the top warp stall reasons (NCU kern lines)
    ncu_summary.py --self-test   checks the parser on a made-up CSV of ncu's raw layout

The raw page is one header row ("ID", ..., "Kernel Name", ..., metric names), a row of units,
then one row per profiled launch, every cell quoted, numbers with thousands separators
("1,600,000"), "n/a" where a value is missing. The details page (`--page details`, the default)
is the long form instead: one row per metric ("Section Name", "Metric Name", "Metric Unit",
"Metric Value"), several per launch; it is turned into the raw form. Some ncu versions have a
"Kernel Time" column, others "Block Size", "Grid Size", "Device", "CC": only "ID" and "Kernel
Name" are required. ncu's own `==PROF==` / `==WARNING==` / `==ERROR==` lines may be mixed in
(with --log-file they share the file) and are skipped, and so is a launch whose row was cut off
(a program stopped mid-profile). A metric ncu did not collect is left out of a line, not
guessed. Only the standard library is used (the GPU image's python3).
"""
import csv
import io
import re
import sys

TIME_SCALE_MS = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0, "second": 1e3, "s": 1e3}


LONG = ("Metric Name", "Metric Unit", "Metric Value")
UNIT = "\0unit "  # a pivoted row's own unit of a metric


def read_raw(text):
    """(header, units, rows) of the ncu CSV in `text` (raw page; the details page is pivoted to
    it); rows are dicts, one per launch. Raises ValueError."""
    lines = [l.lstrip("\ufeff") for l in text.splitlines()]
    lines = [l for l in lines if l.strip() and not l.lstrip().startswith("==")]
    start = next((i for i, l in enumerate(lines) if re.match(r'^\s*"?ID"?\s*,', l)), None)
    if start is None:
        raise ValueError("no CSV header (a line starting with \"ID\") in the ncu output")
    table = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header = [h.strip() for h in table[0]]
    if "Kernel Name" not in header:
        raise ValueError("no 'Kernel Name' column")
    if all(c in header for c in LONG):
        return pivot_long(header, table[1:])
    units, rows = {}, []
    for r in table[1:]:
        if len(r) != len(header):
            continue
        d = dict(zip(header, r))
        if d["ID"].strip().isdigit():
            rows.append(d)
        elif not rows and not units:
            units = d
    return header, units, rows


# The details page names a section's metrics by their labels (--print-metric-name label, its
# default; metrics asked for with --metrics keep their names): the labels of the ones read here.
LABELS = {
    "Duration": "gpu__time_duration.sum",
    "Compute (SM) Throughput": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "Memory Throughput": "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",
    "DRAM Throughput": "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
    "L2 Hit Rate": "lts__t_sector_hit_rate.pct",
    "Issue Slots Busy": "sm__inst_issued.avg.pct_of_peak_sustained_active",
    "Achieved Occupancy": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "Registers Per Thread": "launch__registers_per_thread",
    "Dynamic Shared Memory Per Block": "launch__shared_mem_per_block_dynamic",
}


def pivot_long(header, table):
    """The details page's rows (one per metric) as the raw page's (one per launch)."""
    fixed = [h for h in header if h not in LONG and h not in ("Section Name", "Rule Name", "Rule Type",
                                                              "Rule Description", "Estimated Speedup Type",
                                                              "Estimated Speedup")]
    by_id, units, names = {}, {}, []
    for r in table:
        if len(r) != len(header):
            continue
        d = dict(zip(header, r))
        if not d["ID"].strip().isdigit() or not d["Metric Name"].strip():
            continue
        row = by_id.setdefault(d["ID"], {h: d[h] for h in fixed})
        m = d["Metric Name"].strip()
        m = LABELS.get(m, m)
        if m not in names:
            names.append(m)
        row[m] = d["Metric Value"]
        # Without --print-units base the unit changes from launch to launch (usecond, msecond).
        row[UNIT + m] = d["Metric Unit"]
        units.setdefault(m, d["Metric Unit"])
    return fixed + names, units, list(by_id.values())


def number(v):
    try:
        return float(str(v).replace(",", ""))
    except ValueError:
        return None


def duration_ms(row, units):
    v = number(row.get("gpu__time_duration.sum", ""))
    if v is None:
        return None
    unit = row.get(UNIT + "gpu__time_duration.sum") or units.get("gpu__time_duration.sum") or "nsecond"
    return v * TIME_SCALE_MS.get(unit.strip(), 1e-6)


def short(name, n=60):
    name = name.split("(")[0] if name.startswith("bc_") else name
    return name if len(name) <= n else name[: n - 3] + "..."


def category(name):
    if name.startswith("bc_attention"):
        return "attention"
    low = name.lower()
    # cuBLAS(Lt) 12.9+ names its Hopper GEMMs nvjet_* (e.g. nvjet_hsh_192x192_64x3_2x1_v_bz_coopB_NTN).
    if any(k in low for k in ("gemm", "xmma", "cutlass", "cublas", "matmul", "nvjet")):
        return "gemm"
    if any(name.startswith(k) for k in ("bc_ln", "bc_layer_norm", "bc_residual_norm", "bc_gated", "bc_qk_norm")):
        return "norms"
    return "other"


def summarise_dit(text, top=12):
    _, units, rows = read_raw(text)
    per = {}
    for r in rows:
        ms = duration_ms(r, units)
        if ms is None:
            continue
        k = r["Kernel Name"]
        c, t = per.get(k, (0, 0.0))
        per[k] = (c + 1, t + ms)
    total = sum(t for _, t in per.values())
    out = [f"NCU dit: {sum(c for c, _ in per.values())} kernels, {total:.1f} ms of device time "
           "(kernel durations summed, serialized by ncu)"]
    cats = {}
    for k, (c, t) in per.items():
        cats[category(k)] = cats.get(category(k), 0.0) + t
    out.append("NCU dit share: " + ", ".join(
        f"{c} {t:.1f} ms ({100 * t / max(total, 1e-12):.1f}%)"
        for c, t in sorted(cats.items(), key=lambda x: -x[1])))
    for k, (c, t) in sorted(per.items(), key=lambda x: -x[1][1])[:top]:
        out.append(f"NCU dit   {short(k):<60} {c:>6}x {t:>9.2f} ms {100 * t / max(total, 1e-12):5.1f}%")
    return out


STALL = re.compile(r"^smsp__(?:average_warp_latency_issue_stalled|average_warps_issue_stalled)_(\w+?)(?:_per_issue_active)?\.ratio$")
# The same stalls as a share of the active warps' cycles, where only those were collected.
STALL_PCT = re.compile(r"^smsp__(?:average_)?warps?_issue_stalled_(\w+?)_per_warp_active\.pct$")


def stall_columns(header):
    """([(column, reason)], unit): one column per stall reason, in cycles per issued instruction
    (WarpStateStats' *_per_issue_active.ratio first), else in % of the active warps."""
    for pattern, unit in ((STALL, "cycles/issue"), (STALL_PCT, "% of warps")):
        cols = {}
        for h in sorted(header, key=lambda h: "_per_issue_active" not in h):
            m = pattern.match(h)
            if m and m.group(1) not in cols:
                cols[m.group(1)] = h
        if cols:
            return [(c, r) for r, c in cols.items()], unit
    return [], ""


def summarise_kernels(text, top_conv=8):
    header, units, rows = read_raw(text)
    groups = {}
    for r in rows:
        key = (r["Kernel Name"], r.get("Grid Size", ""), r.get("Block Size", ""))
        groups.setdefault(key, []).append(r)

    def mean(rs, col):
        vs = [number(r.get(col, "")) for r in rs]
        vs = [v for v in vs if v is not None]
        return sum(vs) / len(vs) if vs else None

    tensor_cols = [h for h in header if "pipe_tensor" in h and re.search(r"\.pct_of_peak_sustained_(active|elapsed)$", h)]
    stall_cols, stall_unit = stall_columns(header)
    # (label, metric names in order of preference: the first the CSV has, unit)
    fields = [("SM", ["sm__throughput.avg.pct_of_peak_sustained_elapsed"], "%"),
              ("mem", ["gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed"], "%"),
              ("dram", ["gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
                        "dram__throughput.avg.pct_of_peak_sustained_elapsed"], "%"),
              ("L2 hit", ["lts__t_sector_hit_rate.pct"], "%"),
              ("issue", ["sm__inst_issued.avg.pct_of_peak_sustained_active",
                         "smsp__issue_active.avg.pct_of_peak_sustained_active"], "%"),
              ("occ", ["sm__warps_active.avg.pct_of_peak_sustained_active"], "%"),
              ("regs", ["launch__registers_per_thread"], ""),
              ("smem/block", ["launch__shared_mem_per_block_dynamic"], "B")]
    fields = [(label, next((c for c in cols if c in header), cols[0]), unit) for label, cols, unit in fields]
    lines = []
    for (name, grid, block), rs in groups.items():
        ms = [duration_ms(r, units) for r in rs]
        ms = [m for m in ms if m is not None]
        dur = sum(ms) / len(ms) if ms else None
        parts = [f"{label} {v:.0f}{unit}" for label, col, unit in fields if (v := mean(rs, col)) is not None]
        tv = [v for v in (mean(rs, c) for c in tensor_cols) if v is not None]
        if tv:
            parts.insert(2, f"tensor {max(tv):.0f}%")
        stalls = [(s, v) for s, v in ((s, mean(rs, c)) for c, s in stall_cols) if v is not None and s not in ("selected",)]
        stalls.sort(key=lambda x: -x[1])
        st = ", ".join(f"{s} {v:.2f}" for s, v in stalls[:5])
        total = dur * len(rs) if dur is not None else 0.0
        text_line = (f"NCU kern {short(name, 44):<44} grid {grid.strip()} x{len(rs)} "
                     + (f"{dur * 1e3:.1f} us" if dur is not None else "? us")
                     + (" | " + " ".join(parts) if parts else "")
                     + (f" | stalls ({stall_unit}): {st}" if st else ""))
        lines.append((name.startswith("bc_attention"), total, text_line))
    att = [l for a, _, l in lines if a]
    rest = [l for _, _, l in sorted((x for x in lines if not x[0]), key=lambda x: -x[1])[:top_conv]]
    return [f"NCU kernels: {len(rows)} launches profiled, {len(groups)} (kernel, grid) pairs"] + att + rest


SELF_TEST_CSV = '''==PROF== Connected to process 123 (/tmp/b/gpu-bundle/bin/gpu-bench)
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","gpu__time_duration.sum","sm__throughput.avg.pct_of_peak_sustained_elapsed","sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","launch__registers_per_thread"
"","","","","","","","","","","","nsecond","%","%","ratio","ratio","register/thread"
"0","123","gpu-bench","127.0.0.1","bc_attention_wgmma_hd128_pp_k128","1","7","(256, 1, 1)","(37, 12, 1)","0","9.0","1,600,000","71.5","62.0","0.50","1.25","168"
==PROF== Profiling "bc_attention_wgmma_hd128_pp_k128": 0%....50%....100%
"1","123","gpu-bench","127.0.0.1","bc_attention_wgmma_hd128_pp_k128","1","7","(256, 1, 1)","(37, 12, 1)","0","9.0","1,400,000","72.5","64.0","0.70","1.75","168"
"2","123","gpu-bench","127.0.0.1","bc_conv_wgmma_n96","1","7","(256, 1, 1)","(3120, 1, 4)","0","9.0","700,000","40.0","30.0","2.00","0.10","96"
"3","123","gpu-bench","127.0.0.1","sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_cublas","1","7","(384, 1, 1)","(132, 1, 1)","0","9.0","300,000","80.0","","","","168"
'''


# The real layouts, as ncu 2024-2025 writes them (with --log-file its own lines share the file):
# the raw page as VerticalResearchGroup/casio's scripts/utils/ncu_raw.py reads real files (the
# header row from "ID","Process ID","Process Name", one units row, thousands separators), with
# the fixed columns of ncu 2023+ ("Block Size", "Grid Size", "Device", "CC"), "n/a" for a metric
# a launch lacks, a ==WARNING== line, and a last row cut off (a program stopped mid-write); the
# details page as a real `ncu --csv --log-file` log quoted in a public parser (2024: a "Kernel
# Time" column, no "Block Size"), long form, a section's metrics under their labels. Kernel names as cuBLASLt 13 on Hopper has them
# (nvjet_*, NVIDIA/Fuser#3137). Stall metric names as ncu 2025.1's WarpStateStats rules read them.
REAL_RAW_CSV = '''==PROF== Connected to process 4242 (/tmp/b/gpu-bundle/bin/gpu-bench)
==PROF== Profiling "bc_attention_wgmma_hd128_ws" - 0: 0%....50%....100% - 38 passes
==WARNING== Backing up device memory in system memory. Kernel replay might be slow.
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","device__attribute_display_name","gpu__time_duration.sum","gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed","launch__registers_per_thread","sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active","sm__throughput.avg.pct_of_peak_sustained_elapsed","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","smsp__average_warps_issue_stalled_selected_per_issue_active.ratio","smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"
"","","","","","","","","","","","","nsecond","%","register/thread","%","%","ratio","ratio","ratio"
"0","4242","gpu-bench","127.0.0.1","bc_attention_wgmma_hd128_ws","1","13","(384, 1, 1)","(37, 12, 1)","0","9.0","NVIDIA H200","2,150,112","3.51","168","71.20","74.06","0.31","1.00","2.47"
"1","4242","gpu-bench","127.0.0.1","bc_attention_wgmma_hd128_ws","1","13","(384, 1, 1)","(37, 12, 1)","0","9.0","NVIDIA H200","2,149,888","3.49","168","71.30","74.10","0.29","1.00","2.53"
"2","4242","gpu-bench","127.0.0.1","bc_attention_combine","1","13","(128, 1, 1)","(4680, 12, 1)","0","9.0","NVIDIA H200","41,216","88.10","32","n/a","12.50","6.10","1.00","0.80"
"3","4242","gpu-bench","127.0.0.1","nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NNT","1","13","(384, 1, 1)","(132, 1, 1)","0","9.0","NVIDIA H200","100,000","20.00","168","80.00","81.00","0.10","1.00","0.20"
"4","4242","gpu-bench","127.0.0.1","bc_conv_wgmma_ws","1","13","(384, 1, 1)","(1560, 2, 1)","0","9.0","NVIDIA H200","1,2
==PROF== Disconnected from process 4242
==ERROR== The application returned an error code (15).
'''

REAL_DETAILS_CSV = '''==PROF== Connected to process 20798 (/tmp/b/gpu-bundle/bin/gpu-bench)
==PROF== Disconnected from process 20798
==WARNING== Found outstanding GPU clock reset, trying to revert...Success.
"ID","Process ID","Process Name","Host Name","Kernel Name","Kernel Time","Context","Stream","Section Name","Metric Name","Metric Unit","Metric Value"
"0","20798","gpu-bench","127.0.0.1","nvjet_hsh_192x192_64x3_2x1_v_bz_coopB_NTN","2026-Dec-05 00:14:36","1","7","Command line profiler metrics","gpu__time_duration.sum","usecond","152.19"
"1","20798","gpu-bench","127.0.0.1","bc_attention_wgmma_hd128_pp_k128","2026-Dec-05 00:14:36","1","7","Command line profiler metrics","gpu__time_duration.sum","msecond","2.05"
"2","20798","gpu-bench","127.0.0.1","bc_ln_modulate","2026-Dec-05 00:14:36","1","7","Command line profiler metrics","gpu__time_duration.sum","usecond","24.00"
"3","20798","gpu-bench","127.0.0.1","bc_attention_wgmma_hd128_pp_k128","2026-Dec-05 00:14:36","1","7","GPU Speed Of Light Throughput","Duration","msecond","2.05"
"3","20798","gpu-bench","127.0.0.1","bc_attention_wgmma_hd128_pp_k128","2026-Dec-05 00:14:36","1","7","GPU Speed Of Light Throughput","Compute (SM) Throughput","%","73.10"
'''


def self_test():
    d = summarise_dit(SELF_TEST_CSV)
    assert d[0].startswith("NCU dit: 4 kernels, 4.0 ms"), d
    assert "attention 3.0 ms (75.0%)" in d[1] and "gemm 0.3 ms (7.5%)" in d[1] and "other 0.7 ms" in d[1], d
    assert "bc_attention_wgmma_hd128_pp_k128" in d[2] and "2x" in d[2] and "3.00 ms" in d[2], d
    k = summarise_kernels(SELF_TEST_CSV)
    assert k[0] == "NCU kernels: 4 launches profiled, 3 (kernel, grid) pairs", k
    att = k[1]
    assert "grid (37, 12, 1) x2 1500.0 us" in att and "SM 72%" in att and "tensor 63%" in att, att
    assert "regs 168" in att and "long_scoreboard 1.50, barrier 0.60" in att, att
    assert k[2].startswith("NCU kern bc_conv_wgmma_n96") and "barrier 2.00" in k[2], k
    assert "tensor" not in k[3] and "stalls" not in k[3], k[3]  # empty cells are left out
    # The real raw layout: the cut-off last launch and the ==...== lines are skipped, thousands
    # separators read, "n/a" left out, nvjet counted as a GEMM, gpu__dram_throughput taken.
    d = summarise_dit(REAL_RAW_CSV)
    assert d[0].startswith("NCU dit: 4 kernels, 4.4 ms"), d
    assert "gemm 0.1 ms" in d[1] and "other" not in d[1], d
    k = summarise_kernels(REAL_RAW_CSV)
    assert k[0] == "NCU kernels: 4 launches profiled, 3 (kernel, grid) pairs", k
    assert k[1].startswith("NCU kern bc_attention_wgmma_hd128_ws") and "x2 2150.0 us" in k[1], k
    assert "SM 74%" in k[1] and "dram 4%" in k[1] and "tensor 71%" in k[1] and "regs 168" in k[1], k
    assert "wait 2.50, long_scoreboard 0.30" in k[1] and "selected" not in k[1], k
    assert k[2].startswith("NCU kern bc_attention_combine") and "tensor" not in k[2], k
    # One column per stall reason; the % form only where the ratio form is missing.
    cols, unit = stall_columns(["smsp__average_warp_latency_issue_stalled_wait.ratio",
                                "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio",
                                "smsp__warp_issue_stalled_wait_per_warp_active.pct"])
    assert cols == [("smsp__average_warps_issue_stalled_wait_per_issue_active.ratio", "wait")], cols
    assert unit == "cycles/issue"
    cols, unit = stall_columns(["smsp__warp_issue_stalled_gmma_per_warp_active.pct"])
    assert cols == [("smsp__warp_issue_stalled_gmma_per_warp_active.pct", "gmma")] and unit == "% of warps"
    # The details page (long form, another ncu's columns): pivoted, units per metric.
    d = summarise_dit(REAL_DETAILS_CSV)
    assert d[0].startswith("NCU dit: 4 kernels, 4.3 ms"), d
    assert "attention 4.1 ms" in d[1] and "gemm 0.2 ms" in d[1] and "norms 0.0 ms" in d[1], d
    k = summarise_kernels(REAL_DETAILS_CSV)
    assert any("pp_k128" in l and "SM 73%" in l for l in k), k  # a section metric by its label
    try:
        read_raw("==PROF== nothing\n")
    except ValueError:
        pass
    else:
        raise AssertionError("a file without a header must be refused")
    print("ncu_summary self-test: ok")


def main(argv):
    if argv[1:] == ["--self-test"]:
        self_test()
        return 0
    if len(argv) != 3 or argv[1] not in ("dit", "kernels"):
        print(__doc__, file=sys.stderr)
        return 64
    try:
        with open(argv[2], encoding="utf-8", errors="replace") as f:
            text = f.read()
        out = summarise_dit(text) if argv[1] == "dit" else summarise_kernels(text)
    except (OSError, ValueError) as e:
        print(f"NCU {argv[1]}: no summary ({e})")
        return 0
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
