"""The CUDA-core FP4 GEMV (`_fp4_gemv`) against the tensor-core skinny kernel and cuBLAS bf16.

    python benchmarks/bench_fp4_gemv.py --sass        # offline: SASS instructions per weight (no GPU)
    python benchmarks/bench_fp4_gemv.py [--out benchmarks/results/fp4_gemv_h100.json]

--sass compiles the GEMV and the skinny kernel for sm_90 here (`triton.compile` with GPUTarget("cuda",
90, 32), pointers marked 16-byte divisible as the launchers specialise them), disassembles them with
the bundled nvdisasm and counts the SASS instructions of the main loop body per weight decoded
(instructions x threads / weights per iteration), by opcode.

The GPU run measures, for Llama-3-8B shapes and M in (1, 2, 4, 16), NVFP4 and MXFP4: cuBLAS bf16, the
skinny path and the GEMV path (M <= 4), as GPU time in a CUDA graph (median of replays after warm-up,
do_bench_cudagraph) and eager (do_bench); weights rotated through >= 256 MB of copies so L2 (50 MB)
never holds the next call's weight; the roofline (bytes moved / measured copy bandwidth) beside each;
accuracy of each path against a float64 reference. A small sweep of GEMV launch shapes at M = 1 and 4
comes first. Baselines and helpers come from bench_fp4_gemm so the two benchmarks never drift.

    python benchmarks/bench_fp4_gemv.py --chain-only --out benchmarks/results/fp4_gemv_pdl_h100.json

--chain (round 5) measures programmatic dependent launch (PDL, `fp4_gemm.PDL`) at M = 1, NVFP4, with
and without it in the same process, two ways:
    same-shape   do_bench_cudagraph: many launches of one shape back to back in a graph, weights
                 rotated (the round-3/4 "graph" method): per launch, us
    layer chain  the decode order qkv, o, gate_up, down over `--chain-layers` layers with distinct
                 weights (no L2 reuse), captured once, median replay: per layer and per launch, us,
                 against cuBLAS bf16 in the same order and the roofline (FP4 bytes / copy bandwidth)
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
# round 8b: where between qkv and gate_up the wider layout starts to win, and the NVFP4 head of Llama-3-8B
EXTRA_SHAPES = {"n12k": (12288, 4096), "n16k": (16384, 4096), "head": (128256, 4096)}


# ----------------------------------------------------------------------------------------------
# offline SASS


def _nvdisasm() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")


def _compile(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptrs = [i for i, (k, v) in enumerate(signature.items()) if v.startswith("*")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in ptrs}
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps,
                                                                               num_stages=num_stages))


def _sass(compiled) -> list[str]:
    """nvdisasm's listing: instruction lines and label lines (".L_x_3:")."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    out = subprocess.run([_nvdisasm(), "-c", f.name], capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    return [ln for ln in out.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/", ln) or re.match(r"\.L_x_\d+:", ln)]


def _instructions(lines):
    return [ln for ln in lines if not ln.startswith(".L_x_")]


def _loop_body(lines: list[str]) -> list[str]:
    """Instructions of the longest loop: a label and a later branch back to it (the K loop)."""
    labels = {ln[:-1]: i for i, ln in enumerate(lines) if ln.startswith(".L_x_")}
    best = (0, -1)
    for i, ln in enumerate(lines):
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", ln)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > best[1] - best[0]:
            best = (labels[m.group(1)], i)
    return _instructions(lines[best[0]: best[1] + 1])


def _regs(compiled) -> int | None:
    """Registers per thread, from the cubin's resource usage (cuobjdump -res-usage)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(_nvdisasm()), "cuobjdump")
    out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    m = re.search(r"REG:(\d+)", out)
    return int(m.group(1)) if m else None


def _opcodes(lines):
    c = collections.Counter()
    for ln in lines:
        m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", ln)
        if m:
            c[m.group(1).split(".")[0]] += 1
    return c


def gemv_sass(N, K, M, bs, cfg) -> dict:
    """SASS of the GEMV main loop for one launch config: instructions per weight, by opcode, registers."""
    from fp4kit.kernels import _fp4_gemv
    from fp4kit.kernels.fp4_gemm import GEMV_LANES, gemv_lanes

    lanes = gemv_lanes(K, bs, GEMV_LANES)
    bm = 1 << (M - 1).bit_length()
    sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*u8", "table_ptr": "*fp32", "bias_ptr": "*bf16",
           "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "constexpr",
           "K": "constexpr", "PAIRED": "constexpr", "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr",
           "BLOCK_N": "constexpr", "L": "constexpr", "SPLIT_K": "constexpr", "PREFETCH": "constexpr",
           "INTERPRET": "constexpr", "CACHE": "constexpr", "EVICT": "constexpr", "STAGES": "constexpr"}
    const = dict(N=N, K=K, PAIRED=bs == 32, HAS_BIAS=False, BLOCK_M=bm, BLOCK_N=cfg.block_n, L=lanes,
                 SPLIT_K=cfg.split_k, PREFETCH=cfg.prefetch, INTERPRET=False, CACHE=cfg.cache, EVICT=cfg.evict,
                 STAGES=cfg.stages)
    k = _compile(_fp4_gemv.fp4_gemv_kernel, sig, const, cfg.num_warps, 1)
    lines = _sass(k)
    body = _loop_body(lines)
    weights = cfg.block_n * 16 * lanes * 8  # per chunk (one loop iteration)
    threads = 32 * cfg.num_warps
    ops = _opcodes(body)
    return dict(config=cfg.__dict__, lanes=lanes, total_instr=len(_instructions(lines)), loop_instr=len(body),
                per_weight=len(body) * threads / weights, regs=_regs(k), smem=k.metadata.shared,
                top={op: round(n * threads / weights, 3) for op, n in ops.most_common(14)})


def sass_report(N=28672, K=4096, m_list=(1, 2, 4)) -> dict:
    """SASS per weight for the GEMV at each M (default config, and with prefetch) and for the skinny
    kernel (gate_up shape, NVFP4 and MXFP4)."""
    import dataclasses

    from fp4kit.kernels import _fp4_gemm
    from fp4kit.kernels.fp4_gemm import GEMV_LANES, _gemv_config, _skinny_config, gemv_lanes

    out = {}
    for fmt, bs in (("nvfp4", 16), ("mxfp4", 32)):
        lanes = gemv_lanes(K, bs, GEMV_LANES)
        for M in m_list:
            cfg = _gemv_config(M, N, K, lanes)
            out[f"gemv_{fmt}_M{M}"] = gemv_sass(N, K, M, bs, cfg)
            out[f"gemv_{fmt}_M{M}_prefetch"] = gemv_sass(N, K, M, bs, dataclasses.replace(cfg, prefetch=True))
        cfg = _skinny_config(1, N, K, bs, 132, fmt == "mxfp4")
        sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*u8", "table_ptr": "*fp32" if fmt == "nvfp4" else "*i32",
               "bias_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32",
               "N": "constexpr", "K": "constexpr", "BS": "constexpr", "HAS_BIAS": "constexpr",
               "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "SPLIT_K": "constexpr",
               "MX_BF16": "constexpr", "ONE_MUL": "constexpr", "INTERPRET": "constexpr"}
        const = dict(N=N, K=K, BS=bs, HAS_BIAS=False, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                     BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, MX_BF16=fmt == "mxfp4", ONE_MUL=True,
                     INTERPRET=False)
        k = _compile(_fp4_gemm.fp4_skinny_kernel, sig, const, cfg.num_warps, cfg.num_stages)
        lines = _sass(k)
        body = _loop_body(lines)
        weights = cfg.block_n * cfg.block_k
        threads = 32 * cfg.num_warps
        out[f"skinny_{fmt}_M1"] = dict(config=cfg.__dict__, total_instr=len(_instructions(lines)), loop_instr=len(body),
                                       per_weight=len(body) * threads / weights, regs=_regs(k),
                                       top={op: round(n * threads / weights, 3)
                                            for op, n in _opcodes(body).most_common(14)})
    return out


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--sass", action="store_true")
    p.add_argument("--out", default="benchmarks/results/fp4_gemv_h100.json")
    p.add_argument("--ms", type=int, nargs="+", default=list(MS))
    p.add_argument("--sweep-shapes", nargs="*", default=["gate_up", "down"])
    p.add_argument("--sweep-ms", type=int, nargs="+", default=[1, 4])
    p.add_argument("--sweep-stages", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--sweep-evict", default="", help="eviction policy of the grid candidates ('' or evict_first)")
    p.add_argument("--chain", action="store_true", help="also the PDL on/off chain measurements (round 5)")
    p.add_argument("--chain-only", action="store_true", help="only the PDL chain measurements")
    p.add_argument("--chain-layers", type=int, default=16)
    p.add_argument("--round8", action="store_true",
                   help="only the round-8 sweep: persistent kernel, lanes 8/16/32, float32 x (M = 1, NVFP4)")
    p.add_argument("--round8-shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--round8b", action="store_true", help="round 8b: launch grid at 16 lanes vs the default")
    p.add_argument("--chain-tuned", action="store_true",
                   help="round 8c: the decode-order layer chain (PDL) with GEMV_TUNED's layouts vs 8 lanes everywhere")
    args = p.parse_args(argv)
    if args.sass:
        rep = sass_report()
        for k, v in rep.items():
            print(f"{k:18s} loop {v['loop_instr']:4d} instr  {v['per_weight']:.2f}/weight  regs {v['regs']}  "
                  f"{v.get('config')}\n    {v['top']}")
        path = os.path.join(os.path.dirname(args.out), "fp4_gemv_sass_sm90.json")
        with open(path, "w") as f:
            json.dump(rep, f, indent=1)
        return 0
    return run_gpu(args)


FORMATS = {"nvfp4": "NVFP4Config", "mxfp4": "MXFP4Config"}
MS = (1, 2, 4, 16)


def _formats():
    from fp4kit.formats import MXFP4Config, NVFP4Config

    return {"nvfp4": NVFP4Config(), "mxfp4": MXFP4Config()}


def _prepared_set(w, fcfg, nbytes):
    """Rotating PreparedFP4Weights with their GEMV layouts built (eager, before any graph capture)."""
    from bench_fp4_gemm import rotating

    from fp4kit.formats import quantize
    from fp4kit.kernels.fp4_gemm import _gemv_layout_for, prepare_fp4_weight

    def make():
        p = prepare_fp4_weight(quantize(torch.randn_like(w) * 0.02, fcfg))
        _gemv_layout_for(p)
        return p

    return rotating(make, nbytes)


def sweep_candidates(M, N, K, lanes, stages_list=(1, 2, 3, 4), evict=""):
    """GEMV launch shapes around the default (round 4 levers, one at a time): the weight loads' cache
    modifier / eviction policy, and a grid of rows per program x K split x software-pipelining depth
    (stages > 1: cp.async into shared memory, needs >= stages chunks per split), 4 or 8 warps."""
    import dataclasses

    from fp4kit.kernels.fp4_gemm import GemvConfig, _gemv_config

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    default = _gemv_config(M, N, K, lanes, sms)
    chunks = (K // 8) // (16 * lanes)
    cands = [default, dataclasses.replace(default, evict="evict_first"), dataclasses.replace(default, cache=".cg")]
    for warps, bn in ((4, 16), (4, 32), (8, 64)):
        programs = -(-N // bn)
        for split in (d for d in range(1, chunks + 1) if chunks % d == 0):
            if not 1.5 * sms <= programs * split <= 28 * sms:
                continue
            for stages in stages_list:
                if stages > 1 and chunks // split < stages:
                    continue
                cfg = GemvConfig(bn, split, warps, stages=stages, evict=evict)
                if cfg not in cands:
                    cands.append(cfg)
    return default, cands


def run_sweep(bw, shapes, ms=(1, 4), stages_list=(1, 2, 3, 4), evict=""):
    """GEMV launch shapes, NVFP4, GPU time in a CUDA graph with rotated weights."""
    from bench_fp4_gemm import bench_graph, check

    from fp4kit.formats import NVFP4Config, quantize
    from fp4kit.kernels.fp4_gemm import _launch_gemv

    rows = []
    for name in shapes:
        N, K = SHAPES[name]
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        qt0 = quantize(w, NVFP4Config())
        preps, nxt = _prepared_set(w, NVFP4Config(), qt0.nbytes)
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            default, cands = sweep_candidates(M, N, K, preps[0].gemv.lanes, stages_list, evict)
            res = []
            for cfg in cands:
                try:
                    max_err, _ = check(x, preps[0].qt, _launch_gemv(x, preps[0], None, config=cfg))
                    us = bench_graph(lambda: _launch_gemv(x, nxt(), None, config=cfg))
                except Exception as e:  # noqa: BLE001 (registers, resources: report and go on)
                    print(f"  {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                    continue
                nbytes = qt0.nbytes + 2 * M * K + 2 * M * N
                rows.append(dict(shape=name, M=M, cfg=cfg.__dict__, default=cfg == default, graph_us=us,
                                 bw_frac=nbytes / (us * 1e-6) / bw, max_err=max_err))
                res.append((us, cfg))
            print(f"sweep {name:8s} M={M} default {res[0][0]:6.1f} us | " + "  ".join(
                f"{us:6.1f} bn{c.block_n} w{c.num_warps} sk{c.split_k} st{c.stages}{c.cache}{' ' + c.evict if c.evict else ''}"
                for us, c in sorted(res, key=lambda r: r[0])[:8]), flush=True)
        del preps
    return rows


def round8_candidates(N, K, lanes, sms):
    """(label, GemvConfig, x dtype) for one plane layout: the default launch rule, the persistent kernel at
    2 / 4 / 6 programs per SM (rows per thread 2, and 1 at 8 lanes), and at 8 lanes x in float32."""
    from fp4kit.kernels.fp4_gemm import GEMV_EVICT, GemvConfig, _gemv_config

    default = _gemv_config(1, N, K, lanes, sms)
    chunks = (K // 8) // (16 * lanes)
    out = [(f"L{lanes} default", default, torch.bfloat16)]
    if lanes == 8:
        out.append(("L8 default, x float32", default, torch.float32))
    for rows in ((2, 1) if lanes == 8 else (2,)):
        bn = rows * 4 * (32 // lanes)
        for per_sm in (2, 4, 6):
            out.append((f"L{lanes} persistent bn{bn} {per_sm}/SM",
                        GemvConfig(bn, chunks, 4, evict=GEMV_EVICT, persistent=per_sm), torch.bfloat16))
    return out


def round8b_candidates(N, K, lanes, sms):
    """The default rule, and at 16 lanes a grid of rows per thread x warps x K split (1.5-28 programs/SM)."""
    from fp4kit.kernels.fp4_gemm import GEMV_EVICT, GemvConfig, _gemv_config

    out = [(f"L{lanes} default", _gemv_config(1, N, K, lanes, sms), torch.bfloat16)]
    if lanes != 16:
        return out
    chunks = (K // 8) // (16 * lanes)
    for warps in (4, 8):
        for rows in (1, 2, 4):
            bn = rows * warps * (32 // lanes)
            programs = -(-N // bn)
            for split in (d for d in range(1, chunks + 1) if chunks % d == 0):
                if 1.5 * sms <= programs * split <= 64 * sms:
                    cfg = GemvConfig(bn, split, warps, evict=GEMV_EVICT)
                    if cfg != out[0][1]:
                        out.append((f"L16 bn{bn} w{warps} sk{split}", cfg, torch.bfloat16))
    return out


def run_round8(bw, shapes, wide=False):
    """Round 8 (issue 5/8): is the GEMV at M = 1 held by its program structure (load, wait, compute, exit;
    1-4 chunks per program), by the plane layout's lanes, or by instruction issue? NVFP4, GPU time in a
    CUDA graph (same-shape launches, PDL as the default), weights rotated through 256 MB, each candidate
    checked bit-identical (bf16 x) to the default launch before timing."""
    from bench_fp4_gemm import bench_graph, check

    from fp4kit.formats import NVFP4Config, quantize
    from fp4kit.kernels.fp4_gemm import _launch_gemv, gemv_layout, gemv_lanes

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for name in shapes:
        N, K = {**SHAPES, **EXTRA_SHAPES}[name]
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        qt0 = quantize(w, NVFP4Config())
        preps, nxt = _prepared_set(w, NVFP4Config(), qt0.nbytes)
        layouts = {}
        for max_lanes in ((8, 16) if wide else (8, 16, 32)):
            lanes = gemv_lanes(K, 16, max_lanes)
            if lanes not in layouts:
                layouts[lanes] = {id(p): (p.gemv if lanes == p.gemv.lanes else gemv_layout(p.qt, lanes)) for p in preps}
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        ref = None
        nbytes = qt0.nbytes + 2 * K + 2 * N
        for lanes, lays in layouts.items():
            for label, cfg, xdt in (round8b_candidates if wide else round8_candidates)(N, K, lanes, sms):
                xx = x.to(xdt)
                try:
                    y = _launch_gemv(xx, preps[0], None, config=cfg, layout=lays[id(preps[0])])
                    if ref is None:
                        ref = y
                    same = bool(torch.equal(y.to(torch.bfloat16), ref)) if xdt == torch.bfloat16 else None
                    max_err, _ = check(x, preps[0].qt, y.to(torch.bfloat16))

                    def call(cfg=cfg, xx=xx, lays=lays):
                        p = nxt()
                        return _launch_gemv(xx, p, None, config=cfg, layout=lays[id(p)])

                    us = bench_graph(call)
                except Exception as e:  # noqa: BLE001 (registers, resources: report and go on)
                    print(f"  {name} {label}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                rows.append(dict(shape=name, label=label, lanes=lanes, cfg=cfg.__dict__, x_dtype=str(xdt),
                                 graph_us=us, bw_frac=nbytes / (us * 1e-6) / bw, roofline_us=nbytes / bw * 1e6,
                                 bit_identical_to_default=same, max_err=max_err))
                print(f"round8 {name:8s} {label:34s} {us:7.2f} us  {100 * nbytes / (us * 1e-6) / bw:5.1f}% BW  "
                      f"same={same}", flush=True)
        del preps, layouts
    return rows


def run_compare(bw, ms=MS):
    """cuBLAS bf16 vs the skinny path vs the GEMV path, graph and eager, both formats, all shapes."""
    from bench_fp4_gemm import bench, bench_graph, check, rotating

    from fp4kit.formats import quantize
    from fp4kit.kernels.fp4_gemm import DecodePath, fp4_matmul

    rows = []
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        _, nxt_bf16 = rotating(lambda: torch.randn_like(w) * 0.02, w.numel() * 2)
        sets = {}
        for fmt, fcfg in _formats().items():
            qt0 = quantize(w, fcfg)
            sets[fmt] = (qt0, _prepared_set(w, fcfg, qt0.nbytes))
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            row = dict(shape=name, N=N, K=K, M=M,
                       cublas_us=bench(lambda: torch.matmul(x, nxt_bf16().T)),
                       cublas_graph_us=bench_graph(lambda: torch.matmul(x, nxt_bf16().T)),
                       cublas_roofline_us=(2 * N * K + 2 * M * K + 2 * M * N) / bw * 1e6)
            line = f"{name:8s} M={M:3d} cuBLAS {row['cublas_graph_us']:6.1f} us (graph) {row['cublas_us']:6.1f} (eager)"
            for fmt, (qt0, (preps, nxt)) in sets.items():
                nbytes = qt0.nbytes + 2 * M * K + 2 * M * N
                r = dict(roofline_us=nbytes / bw * 1e6)
                for path in (DecodePath.SKINNY, DecodePath.GEMV):
                    if path is DecodePath.GEMV and M > 4:
                        continue
                    p0 = preps[0]
                    max_err, rms_err = check(x, p0.qt, fp4_matmul(x, p0.qt, prepared=p0, path=path))

                    def call(path=path):
                        p = nxt()
                        return fp4_matmul(x, p.qt, prepared=p, path=path)

                    g = bench_graph(call)
                    e = bench(call)
                    r[path.value] = dict(graph_us=g, us=e, graph_speedup=row["cublas_graph_us"] / g,
                                         speedup=row["cublas_us"] / e, graph_bw_frac=nbytes / (g * 1e-6) / bw,
                                         bw_frac=nbytes / (e * 1e-6) / bw, max_err=max_err, rms_err=rms_err)
                    line += (f" | {fmt} {path.value} {g:6.1f} us {r[path.value]['graph_speedup']:4.2f}x "
                             f"{100 * r[path.value]['graph_bw_frac']:4.1f}%BW (eager {e:6.1f}) err {max_err:.1e}")
                line += f" | roof {r['roofline_us']:5.1f}"
                row[fmt] = r
            rows.append(row)
            print(line, flush=True)
        del sets
    return rows


def summarize(rows):
    """Mean speedups per (format, M, path), and for the path AUTO takes (GEMV_AUTO_MAX_M)."""
    from fp4kit.kernels.fp4_gemm import GEMV_AUTO_MAX_M

    s = {}
    auto_max = {fmt: GEMV_AUTO_MAX_M.get(type(cfg), 0) for fmt, cfg in _formats().items()}
    for fmt in FORMATS:
        for M in sorted({r["M"] for r in rows}):
            path = "gemv" if M <= auto_max[fmt] else "skinny"
            rs = [r for r in rows if r["M"] == M and path in r[fmt]]
            for mode in ("graph_speedup", "speedup"):
                s[f"{fmt}_M{M}_default_{path}_mean_{mode}"] = sum(r[fmt][path][mode] for r in rs) / len(rs)
    for fmt in FORMATS:
        for M in sorted({r["M"] for r in rows}):
            for path in ("skinny", "gemv"):
                rs = [r for r in rows if r["M"] == M and path in r[fmt]]
                if not rs:
                    continue
                for mode in ("graph_speedup", "speedup"):
                    s[f"{fmt}_M{M}_{path}_mean_{mode}"] = sum(r[fmt][path][mode] for r in rs) / len(rs)
                gu = [r for r in rs if r["shape"] == "gate_up"]
                if gu:
                    s[f"{fmt}_M{M}_{path}_gate_up_graph_bw_frac"] = gu[0][fmt][path]["graph_bw_frac"]
    return s


def run_gpu(args):
    import triton
    from bench_fp4_gemm import copy_bandwidth

    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    if args.chain_tuned:
        res = run_chain_tuned(bw, args.chain_layers)
        _write(args, dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                          torch=torch.__version__, triton=triton.__version__, copy_bw_bytes_per_s=bw, chain_tuned=res))
        return 0
    if args.round8 or args.round8b:
        rows = run_round8(bw, args.round8_shapes, wide=args.round8b)
        _write(args, dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                          torch=torch.__version__, triton=triton.__version__, copy_bw_bytes_per_s=bw, round8=rows))
        return 0
    if args.chain or args.chain_only:
        chain = run_chain(bw, args.chain_layers)
        if args.chain_only:
            _write(args, dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                              torch=torch.__version__, triton=triton.__version__, copy_bw_bytes_per_s=bw,
                              chain=chain))
            return 0
    sweep = run_sweep(bw, args.sweep_shapes, tuple(args.sweep_ms), tuple(args.sweep_stages),
                      args.sweep_evict) if args.sweep_shapes else []
    rows = run_compare(bw, tuple(args.ms))
    summary = summarize(rows)
    for k, v in summary.items():
        print(f"{k:44s} {v:.3f}")
    result = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                  torch=torch.__version__, triton=triton.__version__, copy_bw_bytes_per_s=bw,
                  sweep=sweep, compare=rows, summary=summary)
    if args.chain:
        result["chain"] = chain
    _write(args, result)
    return 0


def _write(args, result):
    out_dir = os.environ.get("OUT", os.path.dirname(args.out))
    for path in {args.out, os.path.join(out_dir, os.path.basename(args.out))}:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def _graph_median_us(fn, replays=50) -> float:
    """Capture fn once (after one eager call), replay it: median GPU time of a replay in us (events)."""
    import statistics

    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(5):
        g.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def run_chain(bw, layers=16):
    """PDL off / on at M = 1, NVFP4: same-shape launches (do_bench_cudagraph) and the decode-order layer chain."""
    from bench_fp4_gemm import bench_graph

    from fp4kit.formats import NVFP4Config, quantize
    from fp4kit.kernels import fp4_gemm
    from fp4kit.kernels.fp4_gemm import DecodePath, fp4_matmul, prepare_fp4_weight

    order = ("qkv", "o", "gate_up", "down")
    weights = {name: [] for name in order}
    for name in order:
        N, K = SHAPES[name]
        for _ in range(layers):
            p = prepare_fp4_weight(quantize(torch.randn(N, K, device="cuda") * 0.02, NVFP4Config()))
            fp4_gemm._gemv_layout_for(p)
            weights[name].append(p)
    xs = {K: torch.randn(1, K, device="cuda", dtype=torch.bfloat16) for K in (4096, 14336)}
    fp4_bytes = {name: weights[name][0].qt.nbytes for name in order}
    out = {"layers": layers, "same_shape": {}, "layer_chain": {}}
    old = fp4_gemm.PDL
    try:
        for pdl in (False, True):
            fp4_gemm.PDL = pdl
            tag = "pdl" if pdl else "no_pdl"
            for name in order:
                K = SHAPES[name][1]
                state = {"i": 0}

                def call(name=name, K=K, state=state):
                    state["i"] = (state["i"] + 1) % layers
                    p = weights[name][state["i"]]
                    return fp4_matmul(xs[K], p.qt, prepared=p, path=DecodePath.GEMV)

                us = bench_graph(call)
                out["same_shape"].setdefault(name, {})[tag] = us
                out["same_shape"][name]["roofline_us"] = fp4_bytes[name] / bw * 1e6

            def chain():
                for i in range(layers):
                    for name in order:
                        p = weights[name][i]
                        fp4_matmul(xs[SHAPES[name][1]], p.qt, prepared=p, path=DecodePath.GEMV)

            us = _graph_median_us(chain)
            out["layer_chain"][tag] = {"total_us": us, "per_layer_us": us / layers, "per_launch_us": us / (4 * layers)}
    finally:
        fp4_gemm.PDL = old
    bf16 = {name: [torch.randn(*SHAPES[name], device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
            for name in order}

    def chain_bf16():
        for i in range(layers):
            for name in order:
                torch.matmul(xs[SHAPES[name][1]], bf16[name][i].T)

    us = _graph_median_us(chain_bf16)
    out["layer_chain"]["cublas_bf16"] = {"total_us": us, "per_layer_us": us / layers}
    layer_bytes = sum(fp4_bytes.values())
    out["layer_chain"]["roofline_per_layer_us"] = layer_bytes / bw * 1e6
    for tag in ("no_pdl", "pdl"):
        r = out["layer_chain"][tag]
        r["bw_frac"] = out["layer_chain"]["roofline_per_layer_us"] / r["per_layer_us"]
        r["x_cublas"] = out["layer_chain"]["cublas_bf16"]["per_layer_us"] / r["per_layer_us"]
    print("| shape | same-shape no PDL us | same-shape PDL us | roofline us |", flush=True)
    for name in order:
        r = out["same_shape"][name]
        print(f"| {name} | {r['no_pdl']:.1f} | {r['pdl']:.1f} | {r['roofline_us']:.1f} |", flush=True)
    lc = out["layer_chain"]
    print(f"layer chain ({layers} layers, 4 GEMVs each): per layer no PDL {lc['no_pdl']['per_layer_us']:.1f} us, "
          f"PDL {lc['pdl']['per_layer_us']:.1f} us, cuBLAS bf16 {lc['cublas_bf16']['per_layer_us']:.1f} us, "
          f"roofline {lc['roofline_per_layer_us']:.1f} us; x cuBLAS {lc['no_pdl']['x_cublas']:.2f} / "
          f"{lc['pdl']['x_cublas']:.2f}, % copy BW {100 * lc['no_pdl']['bw_frac']:.0f} / {100 * lc['pdl']['bw_frac']:.0f}",
          flush=True)
    return out


def run_chain_tuned(bw, layers=16, rounds=3):
    """The layer chain (qkv, o, gate_up, down per layer, distinct weights, one CUDA graph, PDL as the default)
    with the tuned layouts and launches (`GEMV_TUNED`) and with 8 lanes everywhere, the two graphs replayed
    in alternation `rounds` times (median replay each), plus each shape's same-shape time both ways."""
    from bench_fp4_gemm import bench_graph

    from fp4kit.formats import NVFP4Config, quantize
    from fp4kit.kernels.fp4_gemm import DecodePath, _gemv_layout_for, fp4_matmul, gemv_layout, prepare_fp4_weight

    order = ("qkv", "o", "gate_up", "down")
    sets = {"tuned": {n: [] for n in order}, "lanes8": {n: [] for n in order}}
    for name in order:
        N, K = SHAPES[name]
        for _ in range(layers):
            qt = quantize(torch.randn(N, K, device="cuda") * 0.02, NVFP4Config())
            p = prepare_fp4_weight(qt)
            _gemv_layout_for(p)
            p8 = prepare_fp4_weight(qt)
            p8.gemv = gemv_layout(qt, 8)
            sets["tuned"][name].append(p)
            sets["lanes8"][name].append(p8)
    xs = {K: torch.randn(1, K, device="cuda", dtype=torch.bfloat16) for K in (4096, 14336)}
    x2s = {K: torch.randn(2, K, device="cuda", dtype=torch.bfloat16) for K in (4096, 14336)}
    out = {"layers": layers, "lanes": {n: sets["tuned"][n][0].gemv.lanes for n in order}, "same_shape": {},
           "same_shape_m2": {}, "chain_per_layer_us": {"tuned": [], "lanes8": []}}
    for tag, ws in sets.items():
        for key, xin in (("same_shape", xs), ("same_shape_m2", x2s)):
            for name in order:
                K = SHAPES[name][1]
                state = {"i": 0}

                def call(name=name, K=K, state=state, ws=ws, xin=xin):
                    state["i"] = (state["i"] + 1) % layers
                    p = ws[name][state["i"]]
                    return fp4_matmul(xin[K], p.qt, prepared=p, path=DecodePath.GEMV)

                out[key].setdefault(name, {})[tag] = bench_graph(call)
    for _ in range(rounds):
        for tag, ws in sets.items():
            def chain(ws=ws):
                for i in range(layers):
                    for name in order:
                        p = ws[name][i]
                        fp4_matmul(xs[SHAPES[name][1]], p.qt, prepared=p, path=DecodePath.GEMV)

            out["chain_per_layer_us"][tag].append(_graph_median_us(chain) / layers)
    roof = sum(sets["tuned"][n][0].qt.nbytes for n in order) / bw * 1e6
    out["roofline_per_layer_us"] = roof
    for name in order:
        r = out["same_shape"][name]
        r2 = out["same_shape_m2"][name]
        print(f"same-shape {name:8s} tuned (L{out['lanes'][name]}) {r['tuned']:6.2f} us   8 lanes {r['lanes8']:6.2f} us"
              f"   | M = 2: {r2['tuned']:6.2f} / {r2['lanes8']:6.2f} us", flush=True)
    for tag, v in out["chain_per_layer_us"].items():
        print(f"chain {tag:7s} per layer us {[round(x, 2) for x in v]}  roofline {roof:.1f} us", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
