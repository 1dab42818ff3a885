"""Benchmark the FP4 W4A16 GEMM and the fused quantizers against cuBLAS bf16 and the memory roofline.

    python benchmarks/bench_fp4_gemm.py [--sweep] [--out benchmarks/results/fp4_gemm_h100.json]

What is measured, on one GPU in one run:
- copy bandwidth: a 1 GiB device-to-device copy, bytes read + written over time (the roofline);
- for Llama-3-8B layer shapes and M in (1, 16, 256, 4096): cuBLAS bf16 `x @ W.T`, and the Triton
  GEMM with NVFP4 and MXFP4 weights. Each weight exists in several copies that the timed calls
  rotate through (at least 256 MB in all, so L2 (50 MB) cannot hold the next call's weight), and
  `triton.testing.do_bench` also clears L2 before every call; median of >= 100 runs after warm-up;
- the roofline per row: bytes moved (x, the weight with its scales, y; each once) over copy bandwidth;
- the quantize kernels on a 64M-element bf16 tensor: bytes = 2 read + 0.5 written + scale bytes;
- for M <= 16 also the GPU time alone, with the calls captured in a CUDA graph (launch overhead out).

--sweep times a grid of tile configs per (shape, M) instead, to choose `fp4_gemm._config`.

--mma-sweep (round 5): the swapped-operand kernel `fp4_mma.fp4_mma_matmul` over a grid of launch
configs (tile rows, K width, K split, pipelining stages, warps, eviction policy, PDL) at M = 16 and 32
(`--ms`), GPU time in a CUDA graph, weights rotated; cuBLAS bf16 and the skinny kernel's default in the
same run as baselines. The kernels are compiled first by a pool of worker processes (Triton's disk
cache is shared), so the sweep costs little compile time on the device. With 3 <= M <= 64 the plain
run also times `fp4_mma_matmul` (default rule) beside the `fp4_linear` default.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import sys

import torch

from fp4kit.formats import MXFP4Config, NVFP4Config, quantize
from fp4kit.kernels.fp4_gemm import (DEQUANT_CUBLAS_MIN_M, SKINNY_MAX_M, GemmConfig, _config, _launch_skinny,
                                     _skinny_config, fp4_linear, fp4_matmul, prepare_fp4_weight)
from fp4kit.kernels.fp4_mma import (MMA_MAX_M, MMA_MIN_M, MmaConfig, _launch_mma, _lut_for, fp4_mma_matmul, mma_config,
                                    prefill_config)
from fp4kit.kernels.fp4_quantize import quantize_mxfp4_triton, quantize_nvfp4_triton

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
MS = (1, 16, 256, 4096)
FORMATS = {"nvfp4": NVFP4Config(), "mxfp4": MXFP4Config()}
ROTATE_BYTES = 256 << 20
FUSED_LARGE_M = False
GRAPH_MAX_M = 64  # rows up to which the GPU time in a CUDA graph is measured too  # also time the tiled kernel at M >= DEQUANT_CUBLAS_MIN_M (slow; see BENCHMARKS.md)


def bench(fn, rep=100):
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3  # us


def bench_graph(fn):
    """GPU time alone: the calls captured in one CUDA graph (as a decode loop runs), median replay."""
    import triton

    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (us * 1e-6)


def rotating(make, nbytes):
    """Enough copies of a weight that the rotation spans ROTATE_BYTES; returns (list, next-index fn)."""
    n = max(2, math.ceil(ROTATE_BYTES / nbytes))
    items = [make() for _ in range(n)]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % n
        return items[state["i"]]

    return items, nxt


def fp4_bytes(qt) -> int:
    return qt.nbytes


def check(x, qt, y):
    ref = x.double() @ qt.dequantize(x.dtype).double().T
    err = y.double() - ref
    return (err.abs().max() / ref.abs().max()).item(), (err.norm() / ref.norm()).item()


def sweep_configs(M):
    if M <= 16:
        for bn, bk, split in itertools.product((16, 32, 64), (128, 256, 512), (1, 2, 4, 8)):
            yield GemmConfig(16, bn, bk, split_k=split, num_warps=4, num_stages=4)
    elif M <= 256:
        for bm, bn, bk in itertools.product((64, 128), (64, 128), (64, 128)):
            yield GemmConfig(bm, bn, bk, num_warps=4 if bm == 64 else 8, num_stages=3)
    else:
        for bn, bk in itertools.product((128, 256), (64, 128)):
            yield GemmConfig(128, bn, bk, num_warps=8, num_stages=3)


def skinny_sweep(name):
    """Skinny-kernel candidates per shape: split-K for the few-tile layers, tile shapes for gate_up."""
    if name == "gate_up":
        cand = [(64, 128, 2, 5), (64, 128, 1, 5), (128, 128, 1, 4), (128, 128, 2, 4), (64, 256, 2, 4),
                (32, 128, 2, 5)]
    else:
        cand = [(32, 128, 4, 5), (32, 128, 2, 5), (64, 128, 4, 5), (64, 256, 4, 4), (32, 256, 4, 5), (64, 128, 2, 5)]
    return [GemmConfig(16, bn, bk, split_k=sp, num_warps=4, num_stages=st) for bn, bk, sp, st in cand]


SWEEP_MS = (1,)
SWEEP_SHAPES = ("qkv", "o", "gate_up", "down")


def run_sweep(out_dir):
    """Skinny-kernel tiles and split-K at M = 1, both formats (MXFP4 with its bf16 decode and without),
    GPU time in a CUDA graph, weights rotated; the default config's time beside them."""
    from fp4kit.kernels import fp4_gemm

    rows = []
    for name, (N, K) in SHAPES.items():
        if name not in SWEEP_SHAPES:
            continue
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        for fmt, fcfg in FORMATS.items():
            qt0 = quantize(w, fcfg)
            preps, nxt = rotating(lambda: prepare_fp4_weight(quantize(torch.randn_like(w) * 0.02, fcfg)),
                                  fp4_bytes(qt0))
            for bf16_decode in ((True, False) if fmt == "mxfp4" else (False,)):
                fp4_gemm.MXFP4_BF16_DECODE = bf16_decode
                for M in SWEEP_MS:
                    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                    res = []
                    default = _skinny_config(M, N, K, fcfg.block_size,
                                             torch.cuda.get_device_properties(0).multi_processor_count,
                                             bf16_decode and fmt == "mxfp4")
                    cands = [default] + (skinny_sweep(name) if bf16_decode or fmt == "nvfp4" else [])
                    for cfg in cands:
                        cfg = GemmConfig(16 if M <= 16 else 32, cfg.block_n, cfg.block_k, split_k=cfg.split_k,
                                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                        try:
                            max_err, _ = check(x, preps[0].qt, _launch_skinny(x, preps[0], None, config=cfg))
                            us = bench_graph(lambda: _launch_skinny(x, nxt(), None, config=cfg))
                        except Exception as e:  # out of shared memory etc.
                            print(f"  {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                            continue
                        rows.append(dict(shape=name, fmt=fmt, bf16_decode=bf16_decode, M=M, cfg=cfg.__dict__,
                                         default=cfg == default, graph_us=us, max_err=max_err))
                        res.append((us, cfg))
                    fp4_gemm.MXFP4_BF16_DECODE = True
                    tag = f"{fmt}{'-bf16dec' if bf16_decode else ''}"
                    d_us, d_cfg = res[0]
                    print(f"{name:8s} {tag:14s} M={M} default {d_us:6.1f}us {d_cfg.block_n}x{d_cfg.block_k} "
                          f"sk{d_cfg.split_k} | " + "  ".join(
                        f"{us:6.1f} bn{c.block_n} bk{c.block_k} sk{c.split_k} s{c.num_stages}"
                        for us, c in sorted(res[1:], key=lambda r: r[0])), flush=True)
            del preps
    with open(os.path.join(out_dir, "fp4_gemm_skinny_splitk_sweep_h100.json"), "w") as f:
        json.dump(rows, f, indent=1)


# ----------------------------------------------------------------------------------------------
# round 5: the swapped-operand kernel (fp4_mma)

MMA_TILES = ((64, 128, 1, 4), (64, 128, 2, 4), (64, 128, 4, 4), (128, 128, 1, 8), (128, 128, 3, 8),
             (64, 256, 1, 4))  # (block_n, block_k, stages, warps); each with both decodes
MMA_TILES_MX_BF16 = ((64, 256, 4, 4), (64, 256, 1, 4), (64, 128, 1, 4))  # MXFP4's bf16x2-multiply decode
MMA_TILES_MX = ((64, 128, 1, 4), (64, 128, 2, 4), (128, 128, 3, 8))  # MXFP4, table decode


def _block_m(M):
    return 16 if M <= 16 else 32 if M <= 32 else 64


def mma_final_candidates(N, K, M, fmt):
    """The default rule, then with the register prefetch, with half and twice its K split, and with 128-row
    tiles of 8 warps (the last sweep's runner-up on down)."""
    d = mma_config(M, N, K, FORMATS[fmt].block_size, 132, fmt == "mxfp4")
    out = [d, MmaConfig(**{**d.__dict__, "prefetch": True})]
    for sp in (d.split_k // 2, d.split_k * 2):
        if sp >= 1 and K // (d.block_k * sp) >= 1:
            out += [MmaConfig(**{**d.__dict__, "split_k": sp}), MmaConfig(**{**d.__dict__, "split_k": sp, "prefetch": True})]
    out.append(MmaConfig(**{**d.__dict__, "block_n": 128, "num_warps": 8}))
    return out


def mma_occupancy_candidates(N, K, M, fmt):
    """The default rule with register caps (more programs per SM) and with the prefetch under a cap."""
    d = mma_config(M, N, K, FORMATS[fmt].block_size, 132, fmt == "mxfp4")
    return [d] + [MmaConfig(**{**d.__dict__, "maxnreg": r}) for r in (56, 64, 72)] + [
        MmaConfig(**{**d.__dict__, "maxnreg": 80, "prefetch": True})]


def mma_candidates(N, K, M, fmt):
    """Launch configs of the round-5 sweep for one (shape, M, format): the default rule first, then the
    grid with the table decode, a few tiles with the skinny kernel's decode, and the default without
    evict_first and without PDL (the two levers' ablations)."""
    bs = FORMATS[fmt].block_size
    default = mma_config(M, N, K, bs, 132, fmt == "mxfp4")
    if fmt == "mxfp4":
        grid = [(t, True) for t in MMA_TILES_MX] + [(t, False) for t in MMA_TILES_MX_BF16]
    else:
        grid = [(t, lut) for t in MMA_TILES for lut in (True, False)]
    splits = (2, 4, 8) if N > 16384 else (4, 8, 16)
    out = [default]
    for ((bn, bk, st, w), lut), sp in itertools.product(grid, splits):
        if K // (bk * sp) < 1:
            continue
        out.append(MmaConfig(bn, _block_m(M), bk, sp, num_warps=w, num_stages=st, lut=lut))
    out += [MmaConfig(**{**default.__dict__, "evict": ""}), MmaConfig(**{**default.__dict__, "pdl": False})]
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


_WORKER_WEIGHTS: dict = {}


def _precompile(task):
    """Worker: run one launch config once on a small-M input, so Triton compiles it into the disk cache."""
    N, K, fmt, M, cfg = task
    key = (N, K, fmt)
    if key not in _WORKER_WEIGHTS:
        _WORKER_WEIGHTS.clear()
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        _WORKER_WEIGHTS[key] = quantize(w, FORMATS[fmt])
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    try:
        fp4_mma_matmul(x, _WORKER_WEIGHTS[key], config=MmaConfig(**cfg))
        torch.cuda.synchronize()
        return None
    except Exception as e:  # out of shared memory, etc.: the main process reports it again
        return f"{type(e).__name__}: {str(e)[:120]}"


def precompile(tasks, workers):
    """Compile every (shape, format, M, config) in a pool of spawned processes (they share the disk cache)."""
    import concurrent.futures as cf
    import multiprocessing as mp
    import time

    t0 = time.time()
    tasks = sorted(tasks, key=lambda t: (t[0], t[1], t[2]))  # a worker reuses its quantized weight
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        errors = [e for e in ex.map(_precompile, tasks, chunksize=4) if e]
    print(f"precompiled {len(tasks)} configs in {time.time() - t0:.0f} s with {workers} workers, "
          f"{len(errors)} failed", flush=True)


def run_mma_sweep(out_dir, ms=(16, 32), shapes=None, fmts=("nvfp4", "mxfp4"), workers=14, grid="full"):
    """Round-5 sweep: every candidate of `mma_candidates` (grid "full") or `mma_final_candidates` ("final"),
    cuBLAS and the skinny default, GPU time in a graph."""
    candidates = {"full": mma_candidates, "final": mma_final_candidates, "occupancy": mma_occupancy_candidates}[grid]
    shapes = shapes or list(SHAPES)
    plan = []
    for name in shapes:
        N, K = SHAPES[name]
        for fmt in fmts:
            for M in ms:
                if fmt == "mxfp4" and M != ms[0]:
                    continue
                plan.append((name, fmt, M, candidates(N, K, M, fmt)))
    precompile([(SHAPES[n][0], SHAPES[n][1], f, M, c.__dict__) for n, f, M, cands in plan for c in cands], workers)
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    rows = []
    for name in shapes:
        N, K = SHAPES[name]
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        _, nxt_bf16 = rotating(lambda: torch.randn_like(w) * 0.02, w.numel() * 2)
        for fmt in fmts:
            fcfg = FORMATS[fmt]
            qt0 = quantize(w, fcfg)
            preps, nxt = rotating(lambda: prepare_fp4_weight(quantize(torch.randn_like(w) * 0.02, fcfg)),
                                  fp4_bytes(qt0))
            for p in preps:  # the table decode's tables, built before any graph capture
                _lut_for(p, torch.bfloat16)
            for pname, pfmt, M, cands in plan:
                if (pname, pfmt) != (name, fmt):
                    continue
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                nbytes = fp4_bytes(qt0) + 2 * M * K + 2 * M * N
                t_cublas = bench_graph(lambda: torch.matmul(x, nxt_bf16().T))
                skinny_cfg = _skinny_config(M, N, K, fcfg.block_size, 132, fmt == "mxfp4")
                t_skinny = bench_graph(lambda: _launch_skinny(x, nxt(), None))
                base = dict(shape=name, fmt=fmt, M=M, cublas_graph_us=t_cublas, skinny_graph_us=t_skinny,
                            skinny_cfg=skinny_cfg.__dict__, roofline_us=nbytes / bw * 1e6)
                res = []
                for i, cfg in enumerate(cands):
                    try:
                        y = _launch_mma(x, preps[0], None, cfg)
                        max_err, rms_err = check(x, preps[0].qt, y)
                        for p in preps:  # warm: every rotated weight once, eagerly, before the graph
                            _launch_mma(x, p, None, cfg)
                        torch.cuda.synchronize()
                        us = bench_graph(lambda: _launch_mma(x, nxt(), None, cfg))
                    except Exception as e:
                        print(f"  {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                        continue
                    rows.append(dict(base, cfg=cfg.__dict__, default=i == 0, graph_us=us, max_err=max_err,
                                     rms_err=rms_err, vs_cublas=t_cublas / us, bw_frac=nbytes / (us * 1e-6) / bw))
                    res.append((us, cfg, max_err))
                d_us = res[0][0]
                best = sorted(res, key=lambda r: r[0])
                print(f"{name:8s} {fmt} M={M:2d} cuBLAS {t_cublas:6.1f} skinny {t_skinny:6.1f} ({t_cublas / t_skinny:4.2f}x) "
                      f"mma default {d_us:6.1f} ({t_cublas / d_us:4.2f}x) roof {nbytes / bw * 1e6:5.1f} | best: " +
                      "  ".join(f"{us:6.1f} bn{c.block_n} bk{c.block_k} sk{c.split_k} s{c.num_stages} w{c.num_warps}"
                                f"{'' if c.lut else ' f32dec'}{' pf' if c.prefetch else ''}{f' r{c.maxnreg}' if c.maxnreg else ''}"
                                f"{'' if c.evict else ' noevict'}"
                                f"{'' if c.pdl else ' nopdl'}"
                                for us, c, _ in best[:5]) + f" | max err {max(r[2] for r in res):.1e}", flush=True)
                f32 = [r for r in best if not r[1].lut]
                if f32:
                    c = f32[0][1]
                    print(f"{'':8s} best without the table decode {f32[0][0]:6.1f} bn{c.block_n} bk{c.block_k} "
                          f"sk{c.split_k} s{c.num_stages} w{c.num_warps}", flush=True)
            del preps
        path = os.path.join(out_dir, f"fp4_mma_sweep_{grid}_h100.json")  # rewritten after each shape
        with open(path, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                           copy_bw_bytes_per_s=bw, rows=rows), f, indent=1)
    return rows


def mma_sass(N=28672, K=4096, M=16) -> dict:
    """Offline (no GPU): compile fp4_mma_kernel for sm_90 for the decode / pipelining / prefetch / register-cap
    variants of the round-5 notes and count the K loop's SASS per weight (helpers of bench_fp4_gemv --sass),
    whether the MMA is HGMMA (wgmma) or HMMA, registers, shared memory and local-memory traffic in the loop."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_fp4_gemv import _loop_body, _opcodes, _regs, _sass

    from fp4kit.kernels import _fp4_gemm

    names = ("x_ptr", "w_ptr", "s_ptr", "table_ptr", "bias_ptr", "y_ptr", "ws_ptr", "cnt_ptr", "M")
    out = {}
    variants = {"pair_decode_s1": dict(lut=False, stages=1), "pair_decode_s4": dict(lut=False, stages=4),
                "table_decode_s1": dict(lut=True, stages=1), "table_decode_s4": dict(lut=True, stages=4),
                "pair_decode_s1_prefetch": dict(lut=False, stages=1, prefetch=True),
                "pair_decode_s1_maxnreg72": dict(lut=False, stages=1, maxnreg=72),
                "pair_decode_s1_maxnreg64": dict(lut=False, stages=1, maxnreg=64)}
    for name, v in variants.items():
        types = ("*bf16", "*i32", "*u8", "*i32" if v["lut"] else "*fp32", "*bf16", "*bf16", "*fp32", "*i32", "i32")
        sig = dict(zip(names, types))
        const = dict(N=N, K=K, BS=16, HAS_BIAS=False, BLOCK_M=_block_m(M), BLOCK_N=64, BLOCK_K=128, SPLIT_K=4,
                     MX_BF16=False, ONE_MUL=True, LUT=v["lut"], EVICT="evict_first", PDL=True,
                     PREFETCH=v.get("prefetch", False), INTERPRET=False)
        sig.update({k: "constexpr" for k in const})
        attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(types) if t.startswith("*")}
        opts = dict(num_warps=4, num_stages=v["stages"])
        if "maxnreg" in v:
            opts["maxnreg"] = v["maxnreg"]
        k = triton.compile(ASTSource(_fp4_gemm.fp4_mma_kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                           options=opts)
        body = _loop_body(_sass(k))
        ops = _opcodes(body)
        per_w = 128 / (64 * 128)  # threads / weights per K step
        out[name] = dict(loop_instr=len(body), per_weight=len(body) * per_w, regs=_regs(k), smem=k.metadata.shared,
                         hgmma=ops.get("HGMMA", 0), hmma=ops.get("HMMA", 0), local=ops.get("LDL", 0) + ops.get("STL", 0),
                         top={op: round(n * per_w, 3) for op, n in ops.most_common(10)})
        print(f"{name:26s} {out[name]['per_weight']:5.2f} SASS/weight  regs {out[name]['regs']}  smem "
              f"{out[name]['smem']}  HGMMA {out[name]['hgmma']} HMMA {out[name]['hmma']}  LDL+STL {out[name]['local']}"
              f"\n    {out[name]['top']}", flush=True)
    return out


def path(M, qt=None, x=None):
    """fp4_linear's choice for M rows (at M <= SKINNY_MAX_M: AUTO's decode kernel, GEMV / WS / SKINNY)."""
    if M <= SKINNY_MAX_M:
        from fp4kit.kernels.fp4_gemm import _auto_path

        return _auto_path(M, qt, x).name.lower() if qt is not None else "decode"
    return "mma prefill" if M < DEQUANT_CUBLAS_MIN_M else "dequant+cuBLAS"


def run_gemm(bw, ms=MS):
    rows = []
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        ws_bf16, nxt_bf16 = rotating(lambda: torch.randn_like(w) * 0.02, w.numel() * 2)
        fp4 = {}
        for fmt, cfg in FORMATS.items():
            qt0 = quantize(w, cfg)
            fp4[fmt] = (qt0, rotating(lambda: quantize(torch.randn_like(w) * 0.02, cfg), fp4_bytes(qt0))[1])
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            t_cublas = bench(lambda: torch.matmul(x, nxt_bf16().T))
            row = dict(shape=name, N=N, K=K, M=M, cublas_us=t_cublas,
                       cublas_graph_us=bench_graph(lambda: torch.matmul(x, nxt_bf16().T)) if M <= GRAPH_MAX_M else None,
                       cublas_roofline_us=(2 * N * K + 2 * M * K + 2 * M * N) / bw * 1e6)
            for fmt, (qt0, nxt) in fp4.items():
                y = fp4_linear(x, qt0)
                max_err, rms_err = check(x, qt0, y)
                t = bench(lambda: fp4_linear(x, nxt()))
                nbytes = fp4_bytes(qt0) + 2 * M * K + 2 * M * N
                cfg = (_skinny_config(M, N, K, qt0.config.block_size, 132, fmt == "mxfp4")
                       if path(M, qt0, x) == "skinny" else None if M <= SKINNY_MAX_M
                       else prefill_config(M, N, K, qt0.config.block_size) if M < DEQUANT_CUBLAS_MIN_M
                       else _config(M, N, K, x.device))
                row[fmt] = dict(us=t, speedup=t_cublas / t, roofline_us=nbytes / bw * 1e6,
                                bw_frac=nbytes / (t * 1e-6) / bw, tflops=2 * M * N * K / (t * 1e-6) / 1e12,
                                max_err=max_err, rms_err=rms_err,
                                path=path(M, qt0, x), config=(None if cfg is None else cfg.__dict__))
                if M <= GRAPH_MAX_M:
                    row[fmt]["graph_us"] = bench_graph(lambda: fp4_linear(x, nxt()))
                    row[fmt]["graph_speedup"] = row["cublas_graph_us"] / row[fmt]["graph_us"]
                    row[fmt]["graph_bw_frac"] = nbytes / (row[fmt]["graph_us"] * 1e-6) / bw
                if MMA_MIN_M <= M <= MMA_MAX_M:  # round 5: the swapped-operand kernel, default rule
                    y = fp4_mma_matmul(x, qt0)
                    m_err, r_err = check(x, qt0, y)
                    t_mma = bench(lambda: fp4_mma_matmul(x, nxt()))
                    g_mma = bench_graph(lambda: fp4_mma_matmul(x, nxt()))
                    row[fmt]["mma"] = dict(us=t_mma, speedup=t_cublas / t_mma, bw_frac=nbytes / (t_mma * 1e-6) / bw,
                                           graph_us=g_mma, graph_speedup=row["cublas_graph_us"] / g_mma,
                                           graph_bw_frac=nbytes / (g_mma * 1e-6) / bw, max_err=m_err, rms_err=r_err,
                                           config=mma_config(M, N, K, qt0.config.block_size, 132,
                                                             fmt == "mxfp4").__dict__)
                if M >= DEQUANT_CUBLAS_MIN_M and FUSED_LARGE_M:  # what the tiled kernel alone does there
                    cfg = _config(M, N, K, x.device)
                    row[fmt]["fused_us"] = bench(lambda: fp4_matmul(x, nxt(), config=cfg))
            rows.append(row)
            print(f"{name:8s} M={M:5d} cuBLAS {t_cublas:7.1f} us | " + " | ".join(
                f"{f} {row[f]['us']:7.1f} us {row[f]['speedup']:5.2f}x {100 * row[f]['bw_frac']:5.1f}%BW "
                f"roof {row[f]['roofline_us']:6.1f} err {row[f]['max_err']:.1e}"
                + (f" graph {row[f]['graph_us']:6.1f} us {row[f]['graph_speedup']:4.2f}x "
                   f"{100 * row[f]['graph_bw_frac']:4.1f}%BW" if M <= GRAPH_MAX_M else f" fused {row[f]['fused_us']:7.1f}"
                   if "fused_us" in row[f] else "")
                + (f" || mma {row[f]['mma']['us']:6.1f} us {row[f]['mma']['speedup']:4.2f}x graph "
                   f"{row[f]['mma']['graph_us']:6.1f} us {row[f]['mma']['graph_speedup']:4.2f}x "
                   f"{100 * row[f]['mma']['graph_bw_frac']:4.1f}%BW" if "mma" in row[f] else "")
                for f in FORMATS), flush=True)
    return rows


def _with(fq, attrs: dict, fn):
    """fn run with module attributes of fp4_quantize temporarily set (launch variants for comparison)."""
    def run():
        old = {k: getattr(fq, k) for k in attrs}
        for k, v in attrs.items():
            setattr(fq, k, v)
        try:
            return fn()
        finally:
            for k, v in old.items():
                setattr(fq, k, v)
    return run


def run_quantize(bw, sweep=True):
    """Quantize timings, eager (do_bench, host launch included) and in a CUDA graph (GPU time alone)."""
    from fp4kit.kernels import fp4_quantize as fq

    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)  # 64M elements
    n = x.numel()
    amax = x.abs().amax().float()  # a static, calibrated amax: float32 on the device
    amax_f = float(amax)
    nv_bytes, mx_bytes = 2 * n + n // 2 + n // 16, 2 * n + n // 2 + n // 32
    out = {}
    cases = {
        "nvfp4_static_amax": (lambda: quantize_nvfp4_triton(x, amax=amax), nv_bytes),
        "nvfp4_static_amax_python_float": (lambda: quantize_nvfp4_triton(x, amax=amax_f), nv_bytes),
        "nvfp4_static_amax_ieee_division": (_with(fq, {"NVFP4_RCP_DIV": False},
                                                  lambda: quantize_nvfp4_triton(x, amax=amax)), nv_bytes),
        "nvfp4_amax_pass_only": (lambda: fq.nvfp4_amax(x.reshape(-1)), 2 * n),
        "nvfp4_with_amax_pass": (lambda: quantize_nvfp4_triton(x), nv_bytes),
        "mxfp4": (lambda: quantize_mxfp4_triton(x), mx_bytes),
    }
    if sweep:  # round 6: one block per thread, so warps = elements per program / 512
        for elems in (1024, 2048, 4096):
            for evict in ("", "evict_first"):
                cases[f"nvfp4_static_amax_{elems}_per_program{'_evict_first' if evict else ''}"] = (
                    _with(fq, {"QUANT_ELEMS_PER_PROGRAM": {16: elems, 32: 4096}, "QUANT_WARPS": elems // 512,
                               "NVFP4_EVICT": evict}, lambda: quantize_nvfp4_triton(x, amax=amax)), nv_bytes)
        cases["nvfp4_with_amax_pass_forward_order"] = (
            _with(fq, {"NVFP4_REVERSE_AFTER_AMAX": False}, lambda: quantize_nvfp4_triton(x)), nv_bytes)
        cases["nvfp4_with_amax_pass_evict_first"] = (
            _with(fq, {"NVFP4_EVICT": "evict_first"}, lambda: quantize_nvfp4_triton(x)), nv_bytes)
    for name, (fn, nbytes) in cases.items():
        fn()  # compile
        us = bench(fn)
        g_us = bench_graph(fn)
        out[name] = dict(us=us, graph_us=g_us, bytes=nbytes, roofline_us=nbytes / bw * 1e6,
                         bw_frac=nbytes / (us * 1e-6) / bw, graph_bw_frac=nbytes / (g_us * 1e-6) / bw)
        print(f"quantize {name:44s} {us:8.1f} us eager ({100 * out[name]['bw_frac']:5.1f}% BW)  "
              f"{g_us:8.1f} us graph ({100 * out[name]['graph_bw_frac']:5.1f}%)  "
              f"roofline {out[name]['roofline_us']:7.1f} us", flush=True)
    for name in ("nvfp4_static_amax", "nvfp4_static_amax_ieee_division") * 2:
        out[name].setdefault("us_repeats", []).append(bench(cases[name][0]))  # the two orders interleaved
        print(f"quantize {name:44s} again {out[name]['us_repeats'][-1]:8.1f} us", flush=True)
    # bit-exactness: the benchmark tensor itself, and every finite bf16 value (shuffled into blocks,
    # so blocks get all kinds of scales) under several tensor amaxes (several global scales)
    from fp4kit.formats import quantize_mxfp4, quantize_nvfp4

    def same(a, b):
        return bool(torch.equal(a.data, b.data) and torch.equal(a.scale.view(torch.uint8), b.scale.view(torch.uint8))
                    and (a.global_scale is None or torch.equal(a.global_scale.view(torch.int32),
                                                               b.global_scale.view(torch.int32))))

    allbf = torch.arange(-32768, 32768, dtype=torch.int32, device="cuda").to(torch.int16).view(torch.bfloat16)
    allbf = allbf[torch.isfinite(allbf)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    n_all = (allbf.numel() // 512) * 512
    xs = [x[:1024]] + [allbf[torch.randperm(allbf.numel(), device="cuda", generator=gen)][:n_all]
                       .reshape(-1, 512) for _ in range(4)]
    checks = {}
    for i, xt in enumerate(xs):
        for amax in (None, 1.0, 3e-3, 7e5, 1e-30, 3e36, "device_0.37"):
            amax_arg = torch.tensor(0.37, device="cuda") if amax == "device_0.37" else amax
            for cfg_name, cfg in (("ct", NVFP4Config()), ("torchao", NVFP4Config.torchao())):
                checks[f"nvfp4_{cfg_name}_{i}_{amax}"] = same(quantize_nvfp4_triton(xt, cfg, amax=amax_arg),
                                                              quantize_nvfp4(xt, cfg, amax=amax_arg))
        checks[f"mxfp4_{i}"] = same(quantize_mxfp4_triton(xt), quantize_mxfp4(xt))
    bad = [k for k, v in checks.items() if not v]
    out["bit_exact"] = not bad
    out["bit_exact_cases"] = len(checks)
    out["bit_exact_failures"] = bad
    print(f"quantize bit-exact vs twin: {len(checks) - len(bad)}/{len(checks)} cases {bad}", flush=True)
    return out


def summarize(rows, bw):
    s = {}
    for fmt in FORMATS:
        for M in sorted({r["M"] for r in rows}):
            sp = [r[fmt]["speedup"] for r in rows if r["M"] == M]
            s[f"{fmt}_M{M}_mean_speedup"] = sum(sp) / len(sp)
            if M <= GRAPH_MAX_M:
                sp = [r[fmt]["graph_speedup"] for r in rows if r["M"] == M]
                s[f"{fmt}_M{M}_mean_speedup_cudagraph"] = sum(sp) / len(sp)
            mma = [r[fmt]["mma"] for r in rows if r["M"] == M and "mma" in r[fmt]]
            if mma:
                s[f"{fmt}_M{M}_mma_mean_speedup"] = sum(m["speedup"] for m in mma) / len(mma)
                s[f"{fmt}_M{M}_mma_mean_speedup_cudagraph"] = sum(m["graph_speedup"] for m in mma) / len(mma)
        gu = next((r for r in rows if r["M"] == 1 and r["shape"] == "gate_up"), None)
        if gu is not None:
            s[f"{fmt}_M1_gate_up_bw_frac"] = gu[fmt]["bw_frac"]
            s[f"{fmt}_M1_gate_up_bw_frac_cudagraph"] = gu[fmt]["graph_bw_frac"]
    return s


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--mma-sweep", action="store_true", help="round 5: launch configs of fp4_mma_matmul")
    p.add_argument("--mma-sass", action="store_true", help="round 5, offline: SASS of fp4_mma_kernel variants")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="only these shapes (--mma-sweep)")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS), help="(--mma-sweep)")
    p.add_argument("--workers", type=int, default=14, help="compile processes (--mma-sweep)")
    p.add_argument("--mma-grid", default="full", choices=["full", "final", "occupancy"], help="(--mma-sweep)")
    p.add_argument("--quantize-only", action="store_true")
    p.add_argument("--skip-quantize", action="store_true")
    p.add_argument("--quantize-sweep", action="store_true", help="also time elements-per-program variants")
    p.add_argument("--ms", type=int, nargs="+", default=list(MS))
    p.add_argument("--out", default="benchmarks/results/fp4_gemm_h100.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    out_dir = os.environ.get("OUT", os.path.dirname(args.out))
    if args.sweep:
        return run_sweep(out_dir)
    if args.mma_sass:
        rep = mma_sass(M=args.ms[0] if args.ms != list(MS) else 16)
        with open(os.path.join(os.path.dirname(args.out), "fp4_mma_sass_sm90.json"), "w") as f:
            json.dump(rep, f, indent=1)
        return 0
    if args.mma_sweep:
        run_mma_sweep(out_dir, tuple(args.ms), args.shapes, tuple(args.formats), args.workers, args.mma_grid)
        return 0
    if args.quantize_only:
        bw = copy_bandwidth()
        quant = run_quantize(bw, sweep=args.quantize_sweep)
        path = os.path.join(out_dir, os.path.basename(args.out))
        with open(path, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                           copy_bw_bytes_per_s=bw, quantize=quant), f, indent=1)
        return 0
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    quant = None if args.skip_quantize else run_quantize(bw, sweep=args.quantize_sweep)
    rows = run_gemm(bw, tuple(args.ms))
    summary = summarize(rows, bw)
    for k, v in summary.items():
        print(f"{k:32s} {v:.3f}")
    import triton

    result = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                  torch=torch.__version__, triton=triton.__version__, copy_bw_bytes_per_s=bw,
                  gemm=rows, quantize=quant, summary=summary)
    for path in {args.out, os.path.join(out_dir, os.path.basename(args.out))}:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
