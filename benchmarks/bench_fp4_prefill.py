"""Prefill-shaped FP4 GEMM (M = 128..4096 tokens) against cuBLAS bf16 and dequantize + cuBLAS.

    python benchmarks/bench_fp4_prefill.py sweep [--ms 256 1024] [--top-ms 128 512 4096]
    python benchmarks/bench_fp4_prefill.py final [--ms 128 256 512 1024 2048 4096]

Why a separate benchmark. At M >= 128 a linear layer is no longer a pass over its weight: cuBLAS bf16
at M = 256 on gate_up (28672 x 4096) moves 235 MB of weight and does 60 GFLOP, both ~80-110 us on the
H100, and the FP4 kernel saves the bytes but not the flops. Its bound is the tensor cores:

    t_fp4 >= 2 M N K / peak_bf16            t_cublas >= max(2 N K / bw, 2 M N K / peak_bf16)
    speedup <= peak_bf16 / (M * bw)          (while cuBLAS is memory bound, M < peak / bw ~ 330)

so at M = 256 no W4A16 kernel on bf16 tensor cores can beat a memory-bound cuBLAS by more than
989e12 / (256 * 3.0e12) = 1.29x at the H100's data-sheet dense bf16 peak, and by less at the peak a
matmul really reaches (measured in the same run: `peak_tflops`, 8192^3 bf16 matmul). Each row carries
both bounds: the bytes (FP4 weight + x + y over the copy bandwidth) and the flops (over the measured peak).

What is measured, GPU time in a CUDA graph (median of replays; weights rotated through 256 MB so L2
never holds the next call's weight), per Llama-3-8B shape, format and M:
- cuBLAS bf16 `x @ W.T`, and fp4kit's previous default at this M, dequantize (`fp4_dequantize`, bit
  exact) + cuBLAS;
- sweep: launch configs of the two tensor-core kernels run as plain tiled GEMMs with the token tiles
  fastest in the grid (`m_fast`): `fp4_mma_kernel` (weights as the MMA's register A operand, tokens on
  N) and `fp4_skinny_kernel` (tokens on M, decoded weights through shared memory);
- final: `fp4_linear`'s default (what a model runs) beside the same baselines, eager and graph.

Results: benchmarks/results/fp4_prefill_{sweep,final}_h100.json; BENCHMARKS.md "Prefill GEMM".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch

from bench_fp4_gemm import FORMATS, SHAPES, bench, bench_graph, check, copy_bandwidth, fp4_bytes, rotating
from fp4kit.formats import quantize
from fp4kit.kernels import fp4_gemm
from fp4kit.kernels.fp4_gemm import (DEQUANT_CUBLAS_MIN_M, GemmConfig, _launch_skinny, fp4_dequantize, fp4_linear,
                                     prepare_fp4_weight)
from fp4kit.kernels.fp4_mma import MmaConfig, _launch_mma, prefill_config

DATASHEET_BF16_TFLOPS = 989.4  # H100 SXM dense bf16
TIME_BUDGET_S = 540  # stop timing new rows after this (one device call is 600 s)


def mma_candidates(round_):
    """Swapped-operand kernel as a tiled GEMM: weight rows per program (MMA M side, 64 per warpgroup),
    tokens per program (MMA N side, <= 256), K step, pipelining stages; round 2 adds K splits (the N = 4096
    layers had 64-128 programs for 132 SMs in round 1) and drops round 1's losers (1 stage for 64-row tiles)."""
    out = []
    if round_ == 1:
        grid = [(bn, bm, bk, st, 1) for bn in (64, 128) for bm in (64, 128, 256) for bk in (64, 128) for st in (1, 3)]
    else:
        grid = ([(64, bm, bk, 3, sp) for bm in (64, 128, 256) for bk in (64, 128) for sp in (1, 2, 4)]
                + [(128, bm, 64, st, sp) for bm in (128, 256) for st in (1, 3) for sp in (1, 2)])
    for bn, bm, bk, st, sp in grid:
        if bm * bk * 2 * st > 160 * 1024:  # x's stages alone would not fit in shared memory
            continue
        out.append(MmaConfig(block_n=bn, block_m=bm, block_k=bk, split_k=sp, num_warps=4 if bn == 64 else 8,
                             num_stages=st, evict="", pdl=False, m_fast=True))
    return out


def skinny_candidates(round_):
    """Tokens on the MMA's M side (decoded weights stored to shared memory as the B operand)."""
    tiles = ([(128, 128, 64, 8), (128, 256, 64, 8), (64, 128, 64, 4), (128, 128, 128, 8)] if round_ == 1
             else [(128, 128, 64, 8), (128, 256, 64, 8), (64, 128, 64, 4)])
    return [GemmConfig(bm, bn, bk, num_warps=w, num_stages=st, m_fast=True)
            for bm, bn, bk, w in tiles for st in ((1, 3) if round_ == 1 else (3,))]


def label(kind, c):
    tail = f"{'' if c.split_k == 1 else f' sk{c.split_k}'}{'' if c.m_fast else ' nfast'}"
    if kind.startswith("mma"):
        return f"{kind} bn{c.block_n} bm{c.block_m} bk{c.block_k} w{c.num_warps} s{c.num_stages}{tail}"
    return f"{kind} bm{c.block_m} bn{c.block_n} bk{c.block_k} w{c.num_warps} s{c.num_stages}{tail}"


def launch(kind, cfg):
    """kind: "mma" / "skinny", or "mma-f32" / "skinny-f32": MXFP4 through the float32 decode instead of the
    bf16x2 one (`fp4_gemm.MXFP4_BF16_DECODE` off for the call; the bf16 decode puts x in pair order, a
    register permutation of the big operand at prefill sizes)."""
    base = (lambda x, p: _launch_mma(x, p, None, cfg)) if kind.startswith("mma") else (
        lambda x, p: _launch_skinny(x, p, None, cfg))
    if not kind.endswith("-f32"):
        return base

    def run(x, p):
        old = fp4_gemm.MXFP4_BF16_DECODE
        fp4_gemm.MXFP4_BF16_DECODE = False
        try:
            return base(x, p)
        finally:
            fp4_gemm.MXFP4_BF16_DECODE = old
    return run


def _precompile(task):
    """Worker: one call per config so Triton compiles it into the shared disk cache."""
    N, K, fmt, kind, cfg = task
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    p = prepare_fp4_weight(quantize(w, FORMATS[fmt]))
    x = torch.randn(256, K, device="cuda", dtype=torch.bfloat16)
    c = MmaConfig(**cfg) if kind.startswith("mma") else GemmConfig(**cfg)
    try:
        launch(kind, c)(x, p)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # out of shared memory / registers: the main process skips it again
        return f"{type(e).__name__}: {str(e)[:100]}"


def precompile(tasks, workers):
    import concurrent.futures as cf
    import multiprocessing as mp

    t0 = time.time()
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        errors = [e for e in ex.map(_precompile, tasks, chunksize=2) if e]
    print(f"precompiled {len(tasks)} configs in {time.time() - t0:.0f} s, {len(errors)} failed", flush=True)


def peak_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / (bench(lambda: a @ b) * 1e-6) / 1e12


def candidates(round_, fmt):
    cands = [("mma", c) for c in mma_candidates(round_)] + [("skinny", c) for c in skinny_candidates(round_)]
    if fmt == "mxfp4" and round_ > 1:
        cands += [(k + "-f32", c) for k, c in cands]
    return cands


def run(mode, ms, top_ms, out, workers, shapes, fmts, round_=1):
    t_start = time.time()
    if mode == "sweep":
        precompile([(SHAPES[s][0], SHAPES[s][1], f, k, c.__dict__) for s in shapes for f in fmts
                    for k, c in candidates(round_, f)], workers)
    bw, peak = copy_bandwidth(), peak_tflops()
    print(f"device {torch.cuda.get_device_name()}  copy {bw / 1e12:.3f} TB/s  bf16 matmul peak {peak:.0f} TFLOP/s",
          flush=True)
    rows = []

    def save():
        with open(out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), mode=mode,
                           round=round_,
                           torch=torch.__version__, copy_bw_bytes_per_s=bw, peak_bf16_tflops=peak,
                           datasheet_bf16_tflops=DATASHEET_BF16_TFLOPS, rows=rows), f, indent=1)

    for name in shapes:
        N, K = SHAPES[name]
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        _, nxt_bf16 = rotating(lambda: torch.randn_like(w) * 0.02, w.numel() * 2)
        for fmt in fmts:
            qt0 = quantize(w, FORMATS[fmt])
            preps, nxt = rotating(lambda: prepare_fp4_weight(quantize(torch.randn_like(w) * 0.02, FORMATS[fmt])),
                                  fp4_bytes(qt0))
            ranked = None
            for M in list(ms) + [m for m in top_ms if m not in ms]:
                if time.time() - t_start > TIME_BUDGET_S:
                    print(f"time budget reached: skipping {name} {fmt} M={M}", flush=True)
                    continue
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                nbytes = fp4_bytes(qt0) + 2 * M * K + 2 * M * N
                flops = 2 * M * N * K
                t_cublas = bench_graph(lambda: torch.matmul(x, nxt_bf16().T))
                t_deq = bench_graph(lambda: torch.matmul(x, fp4_dequantize(nxt().qt, x.dtype).T))
                base = dict(shape=name, fmt=fmt, M=M, N=N, K=K, cublas_graph_us=t_cublas, dequant_cublas_graph_us=t_deq,
                            bytes_roofline_us=nbytes / bw * 1e6, flops_roofline_us=flops / (peak * 1e12) * 1e6,
                            datasheet_flops_roofline_us=flops / (DATASHEET_BF16_TFLOPS * 1e12) * 1e6)
                if mode == "final":
                    y = fp4_linear(x, qt0)
                    max_err, rms_err = check(x, qt0, y)
                    for p in preps:
                        fp4_linear(x, p.qt)
                    t = bench_graph(lambda: fp4_linear(x, nxt().qt))
                    t_eager = bench(lambda: fp4_linear(x, nxt().qt))
                    t_cublas_eager = bench(lambda: torch.matmul(x, nxt_bf16().T))
                    fused = M < DEQUANT_CUBLAS_MIN_M
                    cfg = prefill_config(M, N, K, qt0.config.block_size) if fused else None
                    rows.append(dict(base, graph_us=t, eager_us=t_eager, cublas_eager_us=t_cublas_eager,
                                     vs_cublas=t_cublas / t, vs_cublas_eager=t_cublas_eager / t_eager,
                                     vs_dequant=t_deq / t, tflops=flops / (t * 1e-6) / 1e12, max_err=max_err,
                                     rms_err=rms_err, path="mma prefill" if fused else "dequant+cuBLAS",
                                     config=cfg.__dict__ if fused else None))
                    print(f"{name:8s} {fmt} M={M:5d} cuBLAS {t_cublas:7.1f} deq+cuBLAS {t_deq:7.1f} fp4_linear "
                          f"{t:7.1f} us ({t_cublas / t:4.2f}x; eager {t_cublas_eager / t_eager:4.2f}x) "
                          f"{flops / (t * 1e-6) / 1e12:4.0f} TF/s roof bytes {nbytes / bw * 1e6:5.1f} flops "
                          f"{flops / (peak * 1e12) * 1e6:6.1f} err {max_err:.1e}", flush=True)
                    save()
                    continue
                todo = candidates(round_, fmt) if M in ms or ranked is None else ranked[:6]
                res = []
                for kind, cfg in todo:
                    fn = launch(kind, cfg)
                    try:
                        y = fn(x, preps[0])
                        max_err, rms_err = check(x, preps[0].qt, y)
                        for p in preps:
                            fn(x, p)
                        torch.cuda.synchronize()
                        us = bench_graph(lambda: fn(x, nxt()))
                    except Exception as e:
                        print(f"  {label(kind, cfg)}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                        continue
                    rows.append(dict(base, kind=kind, cfg=cfg.__dict__, graph_us=us, vs_cublas=t_cublas / us,
                                     vs_dequant=t_deq / us, tflops=flops / (us * 1e-6) / 1e12, max_err=max_err,
                                     rms_err=rms_err))
                    res.append((us, kind, cfg, max_err))
                res.sort(key=lambda r: r[0])
                if M in ms and ranked is None:
                    ranked = [(k, c) for _, k, c, _ in res]
                if M in ms and res:  # ablation: the best launch with the weight tiles fastest in the grid
                    k, c = res[0][1], res[0][2]
                    c2 = type(c)(**{**c.__dict__, "m_fast": False})
                    fn = launch(k, c2)
                    fn(x, preps[0])
                    us = bench_graph(lambda: fn(x, nxt()))
                    rows.append(dict(base, kind=k, cfg=c2.__dict__, graph_us=us, vs_cublas=t_cublas / us,
                                     vs_dequant=t_deq / us, tflops=flops / (us * 1e-6) / 1e12, ablation="n_fast"))
                    print(f"  ablation {label(k, c2)}: {us:7.1f} us (m_fast {res[0][0]:7.1f})", flush=True)
                if res:
                    print(f"{name:8s} {fmt} M={M:5d} cuBLAS {t_cublas:7.1f} deq+cuBLAS {t_deq:7.1f} "
                          f"({t_cublas / t_deq:4.2f}x) roof bytes {nbytes / bw * 1e6:5.1f} flops "
                          f"{flops / (peak * 1e12) * 1e6:6.1f} | best " + "  ".join(
                              f"{us:7.1f} ({t_cublas / us:4.2f}x) {label(k, c)}" for us, k, c, _ in res[:4])
                          + f" | max err {max(r[3] for r in res):.1e}", flush=True)
                save()
            del preps
    save()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["sweep", "final"])
    p.add_argument("--ms", type=int, nargs="+", default=None, help="sweep: full grid at these M; final: these M")
    p.add_argument("--top-ms", type=int, nargs="+", default=[128, 512, 4096],
                   help="sweep: the six best configs of the first --ms value at these M too")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--workers", type=int, default=15)
    p.add_argument("--round", type=int, default=2, choices=[1, 2], help="sweep: candidate grid (round 1 or 2)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    ms = a.ms or ([256] if a.mode == "sweep" else [128, 256, 512, 1024, 2048, 4096])
    out = a.out or f"benchmarks/results/fp4_prefill_{a.mode}_h100.json"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    run(a.mode, ms, a.top_ms if a.mode == "sweep" else [], out, a.workers, a.shapes, a.formats, a.round)


if __name__ == "__main__":
    main()
