#!/usr/bin/env python3
"""Runs bnorm_bench (or reads its JSON output) and prints ratios per shape, as Markdown.

    benchmarks/compare.py build/test/benchmarks/bnorm_bench [--threads 1,4,8] [--filter RE] [--readme docs/benchmarks.md [--section perf]]
    benchmarks/compare.py --json run1.json [run2.json ...]
    benchmarks/compare.py --ab OLD_BENCH NEW_BENCH [--rounds 5] [--filter RE]
    ... [--torch torch.json ...] [--plot speed.png]

--torch merges the output of benchmarks/bench_torch.py (PyTorch on the same entries, a run of its
own) as a "PyTorch best / bnorm" column per thread count. --plot draws, per shape and pass, the
speed of bnorm (each layout), oneDNN's best layout and PyTorch's best against the thread count
(matplotlib; Debian python3-matplotlib).

--ab compares two builds of the benchmark (two commits, two sets of flags): it runs bnorm and the
memcpy of each binary, the two binaries one after the other in alternating order, for --rounds
rounds, and prints per entry each one's bnorm / memcpy and their quotient NEW / OLD, the median
over the rounds and its range. On a shared machine whose speed moves between runs, run a build
against itself first: that shows how far entries move with no change at all.

Every time is a median over the repetitions of one run, in which all implementations ran on the
same machine, their repetitions interleaved in random order. Given several runs (--json), each
figure is taken within every run, then its median over the runs is reported. Ratios: bnorm / memcpy (time of bnorm over the time of a memcpy of the
same tensor: 1.0 is the roofline of a forward), loops / memcpy (the same passes over the same
bytes as plain loops, with no per-channel work: what reading and writing those tensors costs),
peer / bnorm (above 1: bnorm is faster).
oneDNN's figure is its fastest layout for the shape (plain, NHWC or nChw16c).
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys

PASSES = ["fwd_train", "fwd_infer", "bwd",
          # the rest of the family (LayerNorm and RMSNorm rows have layout "-")
          "layernorm_fwd", "layernorm_bwd", "rmsnorm_fwd", "rmsnorm_bwd", "groupnorm_fwd",
          "groupnorm_bwd", "instancenorm_fwd", "instancenorm_bwd"]
LAYOUTS = ["NCHW", "NHWC", "-"]


THREADS = None  # --threads for bnorm_bench (None: its default, 1 and every core)
COLD = False  # --cold for bnorm_bench: caches flushed before every timed call


def run(binary, filt, reps, min_time):
    # Repetitions of all benchmarks in random order: on a shared machine, whose speed drifts
    # over minutes, the medians of a benchmark and of the memcpy it is compared with are then
    # taken over the same stretch of time.
    cmd = [binary, "--benchmark_format=json", f"--benchmark_repetitions={reps}",
           "--benchmark_report_aggregates_only=true", f"--benchmark_min_time={min_time}",
           "--benchmark_enable_random_interleaving=true"]
    if filt:
        cmd.append(f"--benchmark_filter={filt}")
    if THREADS:
        cmd.append(f"--threads={THREADS}")
    if COLD:
        cmd.append("--cold")
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
            f"float32, tensors starting on a page boundary, benchmarks built with "
            f"-O3 -march=native")


def thread_counts(times):
    """The thread counts above 1 in a run (bnorm_bench --threads), in order."""
    return sorted({int(k[4][1:]) for k in times if k[0] == "bnorm"} - {1})


def cells(times, counts):
    """Per (shape, layout, pass), in registration order: bnorm's time in ms (1 thread), then the
    ratios of the table (None where a peer is missing): 1 thread's, then for each of `counts`
    the speed-up over 1 thread, bnorm / memcpy and oneDNN best / bnorm at that count."""
    out = {}
    for (impl, pas, layout, shape, threads), b1 in times.items():
        if impl != "bnorm" or threads != "t1" or pas not in PASSES:
            continue
        mem = lambda t: times.get(("memcpy", "copy", "-", shape, t))
        best = lambda t, peer="onednn": min([times[k] for k in times if k[0] == peer and
                                             k[1] == pas and k[3] == shape and k[4] == t],
                                            default=None)
        loops = times.get(("loops", pas, "-", shape, "t1"))
        naive = times.get(("naive_eigen", pas, layout, shape, "t1"))
        row = [b1,
               b1 / mem("t1") if mem("t1") else None,
               loops / mem("t1") if loops and mem("t1") else None,
               best("t1") / b1 if best("t1") else None,
               best("t1", "pytorch") / b1 if best("t1", "pytorch") else None,
               naive / b1 if naive else None]
        for n in counts:
            t = f"t{n}"
            bt = times.get(("bnorm", pas, layout, shape, t))
            row += [b1 / bt if bt else None,
                    bt / mem(t) if bt and mem(t) else None,
                    best(t) / bt if bt and best(t) else None,
                    best(t, "pytorch") / bt if bt and best(t, "pytorch") else None]
        out[(shape, layout, pas)] = row
    return out


def step_cells(times):
    """Per (shape, layout): a training step (forward, then backward) through the functional
    layer and through a module that keeps no copy of its input, each over a memcpy, and module /
    functional (1 thread)."""
    out = {}
    for (impl, pas, layout, shape, threads), f in times.items():
        if impl != "bnorm" or pas != "step" or threads != "t1":
            continue
        mem = times.get(("memcpy", "copy", "-", shape, "t1"))
        m = times.get(("module", "step", layout, shape, "t1"))
        out[(shape, layout)] = [f / mem if mem else None, m / mem if m and mem else None,
                                m / f if m else None]
    return out


def step_table(figures):
    fmt = lambda v: "" if v is None else f"{v:.2f}"
    lines = ["", "A training step (forward, then backward), 1 thread, through the functional layer "
             "and through a module with `save_input = false` (`forward(x, y)`, then "
             "`backward(x, dy, dx)`):", "",
             "| shape | layout | functional / memcpy | module / memcpy | module / functional |",
             "|---|---|---:|---:|---:|"]
    for (shape, layout), ratios in figures.items():
        lines.append("| " + " | ".join([shape, layout] + [fmt(r) for r in ratios]) + " |")
    worst = [r[2] for r in figures.values() if r[2] is not None]
    if worst:
        lines += ["", f"Module / functional: at most {max(worst):.2f}, median "
                  f"{statistics.median(worst):.2f}."]
    return "\n".join(lines)


def storage_cells(times):
    """Per (shape, layout, pass), 1 thread: the time of a pass on bfloat16 and on half tensors
    over bnorm's on float tensors (issue 27's target: at most 0.6 for a training forward)."""
    out = {}
    for (impl, pas, layout, shape, threads), b16 in times.items():
        if impl != "bf16" or threads != "t1":
            continue
        f = times.get(("bnorm", pas, layout, shape, "t1"))
        h = times.get(("fp16", pas, layout, shape, "t1"))
        out[(shape, layout, pas)] = [b16 / f if f else None, h / f if h and f else None]
    return out


def storage_table(figures):
    fmt = lambda v: "" if v is None else f"{v:.2f}"
    lines = ["", "Tensors stored as bfloat16 and as half (parameters and statistics in float), "
             "1 thread, time over bnorm's on float tensors:", "",
             "| shape | layout | pass | bf16 / float | fp16 / float |", "|---|---|---|---:|---:|"]
    for (shape, layout, pas), ratios in figures.items():
        lines.append("| " + " | ".join([shape, layout, pas] + [fmt(r) for r in ratios]) + " |")
    return "\n".join(lines)


def median_of_runs(runs):
    """Each figure's median over the runs. Ratios are taken within a run first: on a shared
    machine whole runs drift, and a ratio of two figures from the same run drifts less."""
    combined = {}
    for key, first in runs[0].items():
        rows = [r[key] for r in runs if key in r]
        columns = ([row[i] for row in rows if row[i] is not None] for i in range(len(first)))
        combined[key] = [statistics.median(c) if c else None for c in columns]
    return combined


def table(figures, context, counts, runs=1):
    what = "Medians of one run" if runs == 1 else f"Medians over {runs} runs"
    regime = ("cold: the caches flushed before every timed call"
              if context.get("regime") == "cold" else
              "warm: each implementation's calls back to back")
    lines = [f"Machine: {machine(context)}. {what}; {regime}.", ""]
    head = ("| shape | layout | pass | bnorm ms (1 thr) | bnorm / memcpy | loops / memcpy "
            "| oneDNN best / bnorm | PyTorch best / bnorm | naive Eigen / bnorm |")
    for n in counts:
        head += (f" {n} thr speedup | bnorm {n} thr / memcpy {n} thr | oneDNN best / bnorm {n} thr"
                 f" | PyTorch best / bnorm {n} thr |")
    lines.append(head)
    lines.append("|---|---|---|" + "---:|" * (6 + 4 * len(counts)))
    worst = {}
    shapes = []
    for shape, _, _ in figures:
        if shape not in shapes:
            shapes.append(shape)
    fmt = lambda v: "" if v is None else f"{v:.2f}"
    for shape in shapes:
        for layout in LAYOUTS:
            for pas in PASSES:
                if (shape, layout, pas) not in figures:
                    continue
                ms, *ratios = figures[(shape, layout, pas)]
                lines.append("| " + " | ".join([shape, layout, pas, f"{ms:.3f}"] +
                                               [fmt(r) for r in ratios]) + " |")
                if ratios[0] is not None:
                    worst[(pas, layout)] = max(worst.get((pas, layout), 0), ratios[0])
    lines.append("")
    lines.append("Worst bnorm / memcpy over the shapes (1 thread): " + ", ".join(
        f"{p} {l} {v:.2f}" for (p, l), v in sorted(worst.items())) + ".")
    return "\n".join(lines)


def plot(times, path, filt=""):
    """Speed against the thread count, one panel per shape and pass (those with a bnorm entry
    whose name matches filt): each implementation's calls per second in units of a 1-thread memcpy of the
    same tensor (1 = a memcpy's pace)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = []
    for (impl, pas, layout, shape, threads) in times:
        if (impl == "bnorm" and pas in PASSES and (shape, pas) not in panels and
                re.search(filt, "/".join((impl, pas, layout, shape, threads)))):
            panels.append((shape, pas))
    columns = 3
    rows = (len(panels) + columns - 1) // columns
    height = 2.6 * rows + 1.0
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, height), squeeze=False)
    for ax, (shape, pas) in zip(axes.flat, panels):
        mem1 = times.get(("memcpy", "copy", "-", shape, "t1"))
        counts = sorted({int(k[4][1:]) for k in times if k[3] == shape and k[0] == "bnorm"})
        colors = {"bnorm": "tab:blue", "bnorm NCHW": "tab:blue", "bnorm NHWC": "tab:orange",
                  "oneDNN best": "tab:green", "PyTorch best": "tab:red", "memcpy": None}

        def line(label, time_of, style):
            xs, ys = [], []
            for n in counts:
                t = time_of(f"t{n}")
                if t and mem1:
                    xs.append(n)
                    ys.append(mem1 / t)
            if xs:  # a colour per implementation, the same in every panel
                ax.plot(xs, ys, style, label=label, **({"color": colors[label]} if colors.get(label) else {}))
        for layout in LAYOUTS:
            line(f"bnorm {layout}" if layout != "-" else "bnorm",
                 lambda t, l=layout: times.get(("bnorm", pas, l, shape, t)),
                 "o-" if layout != "NHWC" else "s-")
        for peer, label in (("onednn", "oneDNN best"), ("pytorch", "PyTorch best")):
            line(label, lambda t, p=peer: min([v for k, v in times.items() if k[0] == p and
                                               k[1] == pas and k[3] == shape and k[4] == t],
                                              default=None), "^--")
        line("memcpy", lambda t: times.get(("memcpy", "copy", "-", shape, t)), "k:")
        ax.set_title(f"{shape} {pas}", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts)
        ax.set_xticklabels([str(n) for n in counts])
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    legend = {}  # every label of every panel, once
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(l, h)
    handles, labels = list(legend.values()), list(legend.keys())
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8)
    fig.supxlabel("threads")
    fig.supylabel("speed (1-thread memcpy = 1)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / height))
    fig.savefig(path, dpi=80)
    print(f"plot written to {path}", file=sys.stderr)


def ab_rounds(binaries, filt, rounds, reps, min_time):
    """Per round, per binary: bnorm / memcpy by (shape, layout, pass, threads). The binaries run
    in order in even rounds and in reverse in odd ones, so that neither always runs first."""
    wanted = r"^(bnorm|memcpy)/" + (f".*({filt})" if filt else "")
    if filt:  # the memcpy of every shape the filter picks bnorm entries of, whatever it says
        listing = [binaries[0], "--benchmark_list_tests"] + ([f"--threads={THREADS}"] if THREADS else [])
        names = subprocess.run(listing, check=True, capture_output=True, text=True).stdout.split()
        shapes = sorted({n.split("/")[3] for n in names if re.search(rf"^bnorm/.*({filt})", n)})
        if shapes:
            wanted = rf"^(bnorm/.*({filt})|memcpy/copy/-/({'|'.join(shapes)})/)"
    results = []
    for r in range(rounds):
        order = list(range(len(binaries))) if r % 2 == 0 else list(reversed(range(len(binaries))))
        ratios = [None] * len(binaries)
        for i in order:
            times = medians(run(binaries[i], wanted, reps, min_time))
            ratios[i] = {(shape, layout, pas, threads): t / times[("memcpy", "copy", "-", shape, threads)]
                         for (impl, pas, layout, shape, threads), t in times.items()
                         if impl == "bnorm" and ("memcpy", "copy", "-", shape, threads) in times}
        results.append(ratios)
        print(f"round {r + 1} of {rounds} done", file=sys.stderr)
    return results


def ab_table(results, names):
    """Markdown: per entry, OLD's and NEW's bnorm / memcpy (medians over the rounds), and NEW / OLD
    per round: its median and range."""
    old, new = names
    lines = [f"A/B over {len(results)} rounds: OLD = {old}, NEW = {new}. bnorm / memcpy are "
             "medians over the rounds; NEW / OLD is taken within each round (below 1: NEW is "
             "faster).", "",
             "| shape | layout | pass | threads | OLD bnorm / memcpy | NEW bnorm / memcpy "
             "| NEW / OLD | NEW / OLD range |",
             "|---|---|---|---|---:|---:|---:|---|"]
    faster = slower = 0
    quotients = []
    for key in results[0][0]:
        rounds = [r for r in results if key in r[0] and key in r[1]]
        q = [r[1][key] / r[0][key] for r in rounds]
        if not q:
            continue
        quotients.append(statistics.median(q))
        faster += max(q) < 1
        slower += min(q) > 1
        shape, layout, pas, threads = key
        lines.append(f"| {shape} | {layout} | {pas} | {threads[1:]} "
                     f"| {statistics.median(r[0][key] for r in rounds):.2f} "
                     f"| {statistics.median(r[1][key] for r in rounds):.2f} "
                     f"| {statistics.median(q):.3f} | {min(q):.3f} - {max(q):.3f} |")
    lines += ["", f"{len(quotients)} entries; NEW / OLD median {statistics.median(quotients):.3f}; "
              f"NEW faster in every round on {faster}, slower in every round on {slower}."]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary", nargs="?")
    ap.add_argument("--json", nargs="+",
                    help="read these JSON outputs of bnorm_bench (runs) instead of running it")
    ap.add_argument("--save", help="also write the raw JSON here")
    ap.add_argument("--filter", default="")
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.1)
    ap.add_argument("--readme", help="replace a marked section of this file with the tables")
    ap.add_argument("--section", default="perf",
                    help="--readme's section: between <!-- SECTION:begin --> and <!-- SECTION:end -->")
    ap.add_argument("--ab", nargs=2, metavar=("OLD", "NEW"),
                    help="compare bnorm in two builds of the benchmark (see above)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of --ab")
    ap.add_argument("--cold", action="store_true",
                    help="flush the caches before every timed call (default: warm)")
    ap.add_argument("--threads", help="thread counts for bnorm_bench, e.g. 1,4,8,16 "
                    "(default: 1 and every core)")
    ap.add_argument("--torch", nargs="+", default=[],
                    help="outputs of bench_torch.py to merge (PyTorch's figures)")
    ap.add_argument("--plot", help="draw speed against threads to this PNG")
    args = ap.parse_args()
    global THREADS, COLD
    THREADS = args.threads
    COLD = args.cold
    if args.ab:
        if args.rounds < 1:
            ap.error("--rounds must be at least 1")
        results = ab_rounds(args.ab, args.filter, args.rounds, args.repetitions, args.min_time)
        if not results[0][0]:
            sys.exit(f"no bnorm entries with a memcpy matched the filter {args.filter!r}")
        print(ab_table(results, args.ab))
        return
    if args.json:
        runs = [json.load(open(path)) for path in args.json]
    elif args.binary:
        runs = [run(args.binary, args.filter, args.repetitions, args.min_time)]
    else:
        ap.error("give the benchmark binary or --json")
    if args.save:
        json.dump(runs[0], open(args.save, "w"))
    torch_times = {}
    for path in args.torch:
        torch_times.update(medians(json.load(open(path))))
    timed = [{**medians(data), **torch_times} for data in runs]
    counts = thread_counts(timed[0])
    figures = median_of_runs([cells(times, counts) for times in timed])
    text = table(figures, runs[0].get("context", {}), counts, len(runs))
    steps = median_of_runs([step_cells(medians(data)) for data in runs])
    if steps:
        text += "\n" + step_table(steps)
    storage = median_of_runs([storage_cells(medians(data)) for data in runs])
    if storage:
        text += "\n" + storage_table(storage)
    print(text)
    if args.plot:
        plot(timed[0], args.plot, args.filter)
    if args.readme:
        readme = open(args.readme).read()
        begin, end = f"<!-- {args.section}:begin -->", f"<!-- {args.section}:end -->"
        if begin not in readme:
            sys.exit(f"{args.readme} has no {begin} marker")
        head, rest = readme.split(begin, 1)
        _, tail = rest.split(end, 1)
        open(args.readme, "w").write(head + begin + "\n" + text + "\n" + end + tail)


if __name__ == "__main__":
    main()
