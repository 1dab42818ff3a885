"""The CUDA-core GEMV with its block scales computed in registers against the gathered scale table, same process.

`fp4_gemm.GEMV_SCALE_REGS` (default on) replaces the GEMV's one gathered table load per block (8 per chunk and
thread) with a few integer and float instructions (`_fp4_gemv._scale14_regs`); NVFP4 then applies its per-tensor
factor once per output. This times both, with cuBLAS bf16 beside them, for the Llama-3-8B shapes at M = 1 and 2
(GPU time in a CUDA graph, weights rotated through 256 MB) and for the decode-order layer chain (q/k/v, o,
gate_up, down; 16 layers; PDL as in the engine).

GPU: `python benchmarks/gemv_scale_regs.py --out benchmarks/results/gemv_scale_regs_h100.json`
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

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--formats", nargs="+", default=["nvfp4", "mxfp4"])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from bench_fp4_gemm import bench_graph, copy_bandwidth, rotating
    from bench_fp4_gemv import _formats, _prepared_set

    from fp4kit.kernels import fp4_gemm
    from fp4kit.kernels.fp4_gemm import DecodePath, fp4_matmul

    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    fmts = _formats()
    rows, chains = [], {}
    sets = {}
    for fmt in args.formats:
        for name, (N, K) in SHAPES.items():
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
            preps, nxt = _prepared_set(w, fmts[fmt], N * K // 2)
            sets[(fmt, name)] = preps
            _, nxt_bf16 = rotating(lambda: torch.randn_like(w) * 0.02, w.numel() * 2)
            for M in args.ms:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                nbytes = preps[0].qt.nbytes + 2 * M * (K + N)
                row = dict(fmt=fmt, shape=name, M=M, N=N, K=K, roofline_us=nbytes / bw * 1e6,
                           cublas_us=bench_graph(lambda: torch.matmul(x, nxt_bf16().T)))
                for regs in (True, False):
                    fp4_gemm.GEMV_SCALE_REGS = regs
                    for p in preps:  # compile and cache each launch eagerly, never inside a capture
                        fp4_matmul(x, p.qt, prepared=p, path=DecodePath.GEMV)
                    row["regs" if regs else "table"] = bench_graph(
                        lambda: fp4_matmul(x, (p := nxt()).qt, prepared=p, path=DecodePath.GEMV))
                fp4_gemm.GEMV_SCALE_REGS = True
                rows.append(row)
                print(f"{fmt} {name:8s} M={M}: cuBLAS {row['cublas_us']:6.2f}  table {row['table']:6.2f}  "
                      f"regs {row['regs']:6.2f} us ({row['cublas_us'] / row['regs']:.2f}x, "
                      f"{100 * row['roofline_us'] / row['regs']:.0f}% of copy BW; roofline {row['roofline_us']:.2f})",
                      flush=True)
    for fmt in args.formats:  # the decode-order chain: one weight per layer and shape, x of each K
        xs = {K: torch.randn(1, K, device="cuda", dtype=torch.bfloat16) for K in (4096, 14336)}
        layers = [[sets[(fmt, n)][i % len(sets[(fmt, n)])] for n in SHAPES] for i in range(args.layers)]
        out = {}
        for regs in (True, False):
            fp4_gemm.GEMV_SCALE_REGS = regs

            def chain():
                for ps in layers:
                    for p, (N, K) in zip(ps, SHAPES.values()):
                        fp4_matmul(xs[K], p.qt, prepared=p, path=DecodePath.GEMV)

            chain()
            out["regs" if regs else "table"] = bench_graph(chain) / args.layers
        fp4_gemm.GEMV_SCALE_REGS = True
        roof = sum(sets[(fmt, n)][0].qt.nbytes for n in SHAPES) / bw * 1e6
        chains[fmt] = dict(per_layer_us=out, roofline_us=roof)
        print(f"{fmt} chain per layer: table {out['table']:.1f} us, regs {out['regs']:.1f} us "
              f"(roofline {roof:.1f} us: {100 * roof / out['regs']:.0f}%)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"),
                           torch=torch.__version__, copy_bandwidth=bw, rows=rows, chains=chains), f, indent=1)


if __name__ == "__main__":
    main()
