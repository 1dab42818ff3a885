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


def sass_report(N=28672, K=4096, m_list=(1, 2, 4)) -> dict:
    """SASS per weight for the GEMV at each M and for the skinny kernel (gate_up shape, NVFP4 and MXFP4)."""
    from fp4kit.kernels import _fp4_gemm, _fp4_gemv
    from fp4kit.kernels.fp4_gemm import (GEMV_LANES, _gemv_config, _skinny_config, gemv_lanes)

    out = {}
    for fmt, bs in (("nvfp4", 16), ("mxfp4", 32)):
        lanes = gemv_lanes(K, bs, GEMV_LANES)
        for M in m_list:
            cfg = _gemv_config(M, N, K, lanes)
            bm = 1 << (M - 1).bit_length()
            sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*u8", "table_ptr": "*fp32", "bias_ptr": "*bf16",
                   "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "constexpr",
                   "K": "constexpr", "PAIRED": "constexpr", "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr",
                   "BLOCK_N": "constexpr", "L": "constexpr", "SPLIT_K": "constexpr", "INTERPRET": "constexpr"}
            const = dict(N=N, K=K, PAIRED=bs == 32, HAS_BIAS=False, BLOCK_M=bm, BLOCK_N=cfg.block_n, L=lanes,
                         SPLIT_K=cfg.split_k, INTERPRET=False)
            k = _compile(_fp4_gemv.fp4_gemv_kernel, sig, const, cfg.num_warps, 1)
            lines = _sass(k)
            body = _loop_body(lines)
            weights = cfg.block_n * 16 * lanes * 8  # per chunk (one loop iteration)
            threads = 32 * cfg.num_warps
            ops = _opcodes(body)
            out[f"gemv_{fmt}_M{M}"] = dict(config=cfg.__dict__, lanes=lanes, total_instr=len(_instructions(lines)),
                                           loop_instr=len(body), per_weight=len(body) * threads / weights,
                                           regs=_regs(k), smem=k.metadata.shared,
                                           top={op: round(n * threads / weights, 3)
                                                for op, n in ops.most_common(14)})
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


def run_gpu(args):
    raise NotImplementedError


if __name__ == "__main__":
    sys.exit(main())
