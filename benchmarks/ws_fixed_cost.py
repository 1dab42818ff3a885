"""Where the short layers' time goes: the warp-specialised FP4 GEMM timed over K at fixed N and split.

The decode GEMM of a short layer (o: 4096 x 4096 at 16 tokens) takes ~8.3 us for 3.2 us of bytes. Timing the same
kernel while K grows (1, 2, 4, 8, 16 stages per program) at a fixed split separates the cost that does not scale
with the bytes (launch, first stage's latency, the split-K epilogue) from the cost per byte: a straight line
t = a + b * bytes per (split, PDL) pair, a the intercept in us and 1 / b the bandwidth the kernel reaches once it
streams. Run with PDL on and off in one process (`fp4_gemm.PDL` is read per call).

GPU: `python benchmarks/ws_fixed_cost.py --out benchmarks/results/ws_fixed_cost_h100.json` (CUDA-graph time,
weights rotated through 256 MB, the copy bandwidth measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def weight_set(N: int, K: int, M: int):
    """Rotated NVFP4 weights [N, K] prepared for the fragment decode, an x [M, K] and the bytes one call moves:
    (first quantized weight, {id(qt): WsWeight}, next-weight fn, x, bytes)."""
    from bench_fp4_gemm import rotating

    from fp4kit.formats import NVFP4Config, quantize
    from fp4kit.kernels import prepare_fp4_weight
    from fp4kit.kernels.fp4_ws import WsDecode, prepare_ws

    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    qt0 = quantize(w, NVFP4Config())
    qts, nxt = rotating(lambda: quantize(torch.randn_like(w) * 0.02, NVFP4Config()), qt0.nbytes)
    wsw = {id(q): prepare_ws(q, WsDecode.FRAG, prepare_fp4_weight(q)) for q in qts}
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    return qt0, wsw, nxt, x, qt0.nbytes + 2 * M * K + 2 * M * N


def fit(points):
    """Least-squares line through (bytes, us): (intercept us, slope us per byte)."""
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    b = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx
    return my - b * mx, b


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[4096])
    ap.add_argument("--ks", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--once", action="store_true",
                    help="launch the first (N, K, split) 8 times and stop: a target for ncu")
    args = ap.parse_args()

    from bench_fp4_gemm import bench_graph, copy_bandwidth

    from fp4kit.formats import NVFP4Config, quantize
    from fp4kit.kernels import fp4_gemm
    from fp4kit.kernels.fp4_ws import WsConfig, WsDecode, _layout_switches, fp4_ws_matmul, prepare_ws

    torch.manual_seed(0)
    if args.once:
        N, K, sk = args.n[0], args.ks[0], args.splits[0]
        ws = prepare_ws(quantize(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02, NVFP4Config()),
                        WsDecode.FRAG)
        x = torch.randn(args.m, K, device="cuda", dtype=torch.bfloat16)
        cfg = _layout_switches(WsConfig(block_n=args.block_n, block_k=256, stages=2, split_k=sk), args.m, K)
        for _ in range(8):
            fp4_ws_matmul(x, ws, config=cfg)
        torch.cuda.synchronize()
        return
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    for N in args.n:
        for K in args.ks:
            qt0, wsw, nxt, x, nbytes = weight_set(N, K, args.m)
            for sk in args.splits:
                if (K // 256) % sk:
                    continue
                cfg = _layout_switches(WsConfig(block_n=args.block_n, block_k=256, stages=2, split_k=sk), args.m, K)
                for ws in wsw.values():  # per-weight copies built eagerly, never inside a capture
                    fp4_ws_matmul(x, ws, config=cfg)
                for pdl in (True, False):
                    fp4_gemm.PDL = pdl
                    fp4_gemm._PDL_DEVICES.clear()
                    us = bench_graph(lambda: fp4_ws_matmul(x, wsw[id(nxt())], config=cfg))
                    rows.append(dict(N=N, K=K, M=args.m, split_k=sk, pdl=pdl, bytes=nbytes, us=us,
                                     roofline_us=nbytes / bw * 1e6, steps_per_program=K // 256 // sk))
                    print(f"N={N} K={K:6d} split {sk} pdl {int(pdl)}: {us:6.2f} us (roofline {nbytes / bw * 1e6:5.2f})",
                          flush=True)
            torch.cuda.empty_cache()
    fits = []
    for N in args.n:
        for sk in args.splits:
            for pdl in (True, False):
                pts = [(r["bytes"], r["us"]) for r in rows if r["N"] == N and r["split_k"] == sk and r["pdl"] == pdl]
                if len(pts) >= 3:
                    a, b = fit(pts)
                    fits.append(dict(N=N, split_k=sk, pdl=pdl, intercept_us=a, streaming_bw=1e6 / b if b > 0 else None))
                    print(f"N={N} split {sk} pdl {int(pdl)}: t = {a:.2f} us + bytes / {1e-6 / b:.2f} TB/s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                           copy_bandwidth=bw, rows=rows, fits=fits), f, indent=1)


if __name__ == "__main__":
    main()
