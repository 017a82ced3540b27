#!/usr/bin/env python3
"""Times PyTorch's batch norm (and the rest of the family) on the entries bnorm_bench runs, for
compare.py --torch.

    benchmarks/bench_torch.py build/test/benchmarks/bnorm_bench [--threads 1,4,8,16] [--cold]
        [--filter RE] [--repetitions 5] [--min-time 0.1] > torch.json

The entries (pass, layout, shape, thread count) come from bnorm_bench --benchmark_list_tests,
so both programs time the same list. NCHW runs torch's contiguous format, NHWC its channels_last
(4-D and 5-D shapes only: torch has no channels-last format for (N, C) and (N, C, L) data).
Passes: fwd_train (train mode, under no_grad: batch statistics and the running-statistics
update), fwd_infer (eval mode), bwd (the gradients of x, weight and bias of a training forward,
through autograd, as a training step computes them). Warm: each entry's calls back to back;
--cold: a buffer larger than the last-level cache is written before every timed call.
Output: Google Benchmark's JSON (one median per entry), implementation "pytorch".
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time


def entries(binary, filt):
    """(pass, layout, shape, threads) of every bnorm entry of the binary's list."""
    args = [binary, "--benchmark_list_tests"]
    if THREADS:
        args.append(f"--threads={THREADS}")
    names = subprocess.run(args, check=True, capture_output=True, text=True).stdout.split()
    out = []
    for name in names:
        parts = name.split("/")
        if len(parts) != 5 or parts[0] != "bnorm" or parts[1] not in PASSES:
            continue
        if filt and not re.search(filt, name):
            continue
        out.append(tuple(parts[1:]))
    return out


def last_level_cache_bytes():
    size = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    for index in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            text = open(os.path.join(base, index, "size")).read().strip()
            size = max(size, int(text.rstrip("K")) * 1024)
        except (OSError, ValueError):
            pass
    return size or 64 << 20


def main():
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary", help="bnorm_bench, whose entries are timed")
    ap.add_argument("--threads", help="thread counts, e.g. 1,4,8,16 (default: bnorm_bench's)")
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--filter", default="")
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.1)
    args = ap.parse_args()
    THREADS = args.threads
    try:
        import torch
    except ImportError:
        sys.exit("bench_torch.py: PyTorch is not installed (Debian: python3-torch)")

    flush = torch.empty(2 * last_level_cache_bytes() // 4, dtype=torch.float32) if args.cold else None
    benchmarks = []
    cases = {}
    for pas, layout, shape, threads in entries(args.binary, args.filter):
        dims = [int(d) for d in shape.split("x")]
        if layout == "NHWC" and len(dims) not in (4, 5):
            continue
        torch.set_num_threads(int(threads[1:]))
        key = (shape, layout)
        if key not in cases and pas not in FAMILY:
            gen = torch.Generator().manual_seed(len(cases))
            x = torch.randn(dims, generator=gen) * 3 + 1
            if layout == "NHWC":
                x = x.contiguous(memory_format=torch.channels_last if len(dims) == 4
                                 else torch.channels_last_3d)
            module = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
                      5: torch.nn.BatchNorm3d}[len(dims)](dims[1])
            cases = {key: (x, module, torch.randn_like(x))}  # one shape's tensors at a time
        if pas in FAMILY:
            call = family_call(pas, dims, layout)
        else:
            call = None
        x, bn, dy = cases[key] if call is None else (None, None, None)
        if call is not None:
            pass
        elif pas == "fwd_train":
            bn.train()
            def call():
                with torch.no_grad():
                    bn(x)
        elif pas == "fwd_infer":
            bn.eval()
            def call():
                with torch.no_grad():
                    bn(x)
        else:
            bn.train()
            xg = x.detach().requires_grad_(True)
            y = bn(xg)
            wanted = [xg, bn.weight, bn.bias]
            def call():
                torch.autograd.grad(y, wanted, dy, retain_graph=True)
        call()
        medians = []
        for _ in range(args.repetitions):
            if flush is not None:
                times = []
                deadline = time.perf_counter() + args.min_time
                while not times or time.perf_counter() < deadline:
                    flush.fill_(len(times))
                    start = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - start)
                medians.append(statistics.median(times))
            else:
                count = 0
                start = time.perf_counter()
                while True:
                    call()
                    count += 1
                    elapsed = time.perf_counter() - start
                    if elapsed >= args.min_time:
                        break
                medians.append(elapsed / count)
        name = f"pytorch/{pas}/{layout}/{shape}/{threads}"
        benchmarks.append({"name": name + "_median", "run_name": name, "aggregate_name": "median",
                           "real_time": statistics.median(medians) * 1e3, "time_unit": "ms"})
        print(f"{name}: {benchmarks[-1]['real_time']:.3f} ms", file=sys.stderr)
    context = {"library": f"PyTorch {torch.__version__}", "num_cpus": os.cpu_count(),
               "host_name": platform.node(), "regime": "cold" if args.cold else "warm"}
    json.dump({"context": context, "benchmarks": benchmarks}, sys.stdout, indent=1)


THREADS = None
FAMILY = ["layernorm_fwd", "layernorm_bwd", "rmsnorm_fwd", "rmsnorm_bwd", "groupnorm_fwd",
          "groupnorm_bwd", "instancenorm_fwd", "instancenorm_bwd"]
PASSES = ["fwd_train", "fwd_infer", "bwd"] + FAMILY


def family_call(pas, dims, layout):
    """A call of PyTorch's module for one of the family's entries (bnorm_bench's names):
    LayerNorm over the last dim, RMSNorm as its formula where torch has no nn.RMSNorm (before
    2.4), GroupNorm with 32 groups, InstanceNorm2d; forward under no_grad in train mode, backward
    the gradients of x and the parameters through autograd."""
    import torch
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(dims, generator=gen) * 3 + 1
    if layout == "NHWC":
        x = x.contiguous(memory_format=torch.channels_last)
    norm = pas.split("_")[0]
    if norm == "layernorm":
        module = torch.nn.LayerNorm(dims[-1])
    elif norm == "rmsnorm":
        if hasattr(torch.nn, "RMSNorm"):
            module = torch.nn.RMSNorm(dims[-1])
        else:
            weight = torch.nn.Parameter(torch.ones(dims[-1]))
            eps = torch.finfo(torch.float32).eps
            module = lambda t: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight
            module.parameters = lambda: [weight]
    elif norm == "groupnorm":
        module = torch.nn.GroupNorm(32, dims[1])
    else:
        module = torch.nn.InstanceNorm2d(dims[1], affine=True)
    if pas.endswith("_fwd"):
        def call():
            with torch.no_grad():
                module(x)
        return call
    xg = x.detach().requires_grad_(True)
    y = module(xg)
    dy = torch.randn_like(y)
    wanted = [xg] + list(module.parameters())
    return lambda: torch.autograd.grad(y, wanted, dy, retain_graph=True)

if __name__ == "__main__":
    main()
