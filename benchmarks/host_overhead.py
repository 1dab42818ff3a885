"""Host time per call of `fp4_linear` on each path (GEMV, skinny, prefill, dequant + cuBLAS) against torch.matmul.

    python benchmarks/host_overhead.py [--out benchmarks/results/host_overhead_h100.json]

Eager GPU timings of short kernels (do_bench) were bimodal on the lent H100 (the same launch 0.24x and 0.70x of
cuBLAS). This separates the host's share: the mean wall time of N back-to-back calls without synchronising
(the launch queue absorbs them; the host is the limit whenever its time per call exceeds the kernel's), and the
same calls' GPU time in a CUDA graph. One weight (o: 4096 x 4096, NVFP4), warm (prepared, compiled).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fp4kit.formats import NVFP4Config, quantize
from fp4kit.kernels.fp4_gemm import fp4_linear


def host_us(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t_host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    t_all = (time.perf_counter() - t0) / n * 1e6
    return t_host, t_all


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/host_overhead_h100.json")
    p.add_argument("--profile", type=int, default=0, metavar="M",
                   help="instead: cProfile 500 warm fp4_linear calls at M rows and print the top entries")
    a = p.parse_args()
    import triton

    if a.profile:
        import cProfile
        import pstats

        from fp4kit.kernels.fp4_gemm import hooks_idle

        rt = triton.knobs.runtime
        enter, exit_ = (getattr(h, "calls", h) for h in (rt.launch_enter_hook, rt.launch_exit_hook))
        print(f"hooks_idle={hooks_idle()} enter hooks={enter} exit hooks={exit_}")
        qt = quantize(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02, NVFP4Config())
        x = torch.randn(a.profile, 4096, device="cuda", dtype=torch.bfloat16)
        host_us(lambda: fp4_linear(x, qt), n=200)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            fp4_linear(x, qt)
        prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return

    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    qt = quantize(w, NVFP4Config())
    rows = []
    for M, path in [(1, "gemv"), (16, "skinny"), (128, "prefill"), (256, "prefill"), (512, "dequant+cuBLAS")]:
        x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
        for name, fn in [("fp4_linear", lambda: fp4_linear(x, qt)), ("torch.matmul bf16", lambda: x @ w.T)]:
            h, tot = host_us(fn)
            g = triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3
            rows.append(dict(M=M, path=path if name == "fp4_linear" else "cuBLAS", fn=name, host_us_per_call=h,
                             wall_us_per_call=tot, graph_us=g))
            print(f"M={M:4d} {name:18s} {rows[-1]['path']:15s} host {h:6.1f} us/call  wall {tot:6.1f}  graph {g:6.1f}",
                  flush=True)
    json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
