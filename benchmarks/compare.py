#!/usr/bin/env python3
"""Runs bnorm_bench (or reads its JSON output) and prints ratios per shape, as Markdown.

    benchmarks/compare.py build/test/benchmarks/bnorm_bench [--filter RE] [--readme README.md]
    benchmarks/compare.py --json results.json

Every figure is a median over repetitions of one run, in which all implementations ran on the
same machine, their repetitions interleaved in random order. Ratios: bnorm / memcpy (time of bnorm over the time of a
memcpy of the same tensor: 1.0 is the roofline of a forward), peer / bnorm (above 1: bnorm is
faster). oneDNN's figure is its fastest layout for the shape (plain, NHWC or nChw16c).
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys

PASSES = ["fwd_train", "fwd_infer", "bwd"]


def run(binary, filt, reps, min_time):
    # Repetitions of all benchmarks in random order: on a shared machine, whose speed drifts
    # over minutes, the medians of a benchmark and of the memcpy it is compared with are then
    # taken over the same stretch of time.
    cmd = [binary, "--benchmark_format=json", f"--benchmark_repetitions={reps}",
           "--benchmark_report_aggregates_only=true", f"--benchmark_min_time={min_time}",
           "--benchmark_enable_random_interleaving=true"]
    if filt:
        cmd.append(f"--benchmark_filter={filt}")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def medians(data):
    """Median times in ms by (impl, pass, layout, shape, threads), in the order of registration
    (the run itself interleaves them)."""
    times = {}
    runs = sorted(data["benchmarks"], key=lambda b: b.get("family_index", 0))
    for b in runs:
        if b.get("aggregate_name", "median") != "median":
            continue
        name = b.get("run_name", b["name"]).replace("_median", "")
        impl, pas, layout, shape, threads = name.split("/")
        unit = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b["time_unit"]]
        times[(impl, pas, layout, shape, threads)] = b["real_time"] * unit
    return times


def machine(context):
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = open("/proc/cpuinfo").read()
        isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
    except OSError:
        isa = "?"
    caches = ", ".join(f"{c['type'][0]} L{c['level']} {c['size'] // 1024} KiB"
                       for c in context.get("caches", []) if c["type"] != "Instruction")
    return (f"{cpu} ({isa}), {context.get('num_cpus', '?')} cores at "
            f"{context.get('mhz_per_cpu', '?')} MHz, caches: {caches}; {platform.system()}; "
            f"float32, tensors starting on a 64-byte boundary, benchmarks built with "
            f"-O3 -march=native")


def table(times, context):
    shapes = []
    for key in times:
        if key[3] not in shapes:
            shapes.append(key[3])
    lines = [f"Machine: {machine(context)}. Medians of one run.", ""]
    lines.append("| shape | layout | pass | bnorm ms (1 thr) | bnorm / memcpy | oneDNN best / bnorm "
                 "| naive Eigen / bnorm | 2 thr speedup | bnorm 2 thr / memcpy 2 thr |")
    lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|")
    worst = {}
    for shape in shapes:
        mem = {t: times.get(("memcpy", "copy", "-", shape, t)) for t in ("t1", "t2")}
        for layout in ("NCHW", "NHWC"):
            for pas in PASSES:
                b1 = times.get(("bnorm", pas, layout, shape, "t1"))
                b2 = times.get(("bnorm", pas, layout, shape, "t2"))
                if b1 is None:
                    continue
                peers = [times[k] for k in times if k[0] == "onednn" and k[1] == pas
                         and k[3] == shape and k[4] == "t1"]
                naive = times.get(("naive_eigen", pas, layout, shape, "t1"))
                fmt = lambda v: "" if v is None else f"{v:.2f}"
                row = [shape, layout, pas, f"{b1:.3f}",
                       fmt(b1 / mem["t1"] if mem["t1"] else None),
                       fmt(min(peers) / b1 if peers else None),
                       fmt(naive / b1 if naive else None),
                       fmt(b1 / b2 if b2 else None),
                       fmt(b2 / mem["t2"] if b2 and mem["t2"] else None)]
                lines.append("| " + " | ".join(row) + " |")
                if mem["t1"]:
                    worst[(pas, layout)] = max(worst.get((pas, layout), 0), b1 / mem["t1"])
    lines.append("")
    lines.append("Worst bnorm / memcpy over the shapes (1 thread): " + ", ".join(
        f"{p} {l} {v:.2f}" for (p, l), v in sorted(worst.items())) + ".")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary", nargs="?")
    ap.add_argument("--json", help="read this JSON output of bnorm_bench instead of running it")
    ap.add_argument("--save", help="also write the raw JSON here")
    ap.add_argument("--filter", default="")
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.1)
    ap.add_argument("--readme", help="replace the section between the perf markers of this file")
    args = ap.parse_args()
    if args.json:
        data = json.load(open(args.json))
    elif args.binary:
        data = run(args.binary, args.filter, args.repetitions, args.min_time)
    else:
        ap.error("give the benchmark binary or --json")
    if args.save:
        json.dump(data, open(args.save, "w"))
    text = table(medians(data), data.get("context", {}))
    print(text)
    if args.readme:
        readme = open(args.readme).read()
        begin, end = "<!-- perf:begin -->", "<!-- perf:end -->"
        if begin not in readme:
            sys.exit(f"{args.readme} has no {begin} marker")
        head, rest = readme.split(begin, 1)
        _, tail = rest.split(end, 1)
        open(args.readme, "w").write(head + begin + "\n" + text + "\n" + end + tail)


if __name__ == "__main__":
    main()
