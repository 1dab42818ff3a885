"""INT8-weight linear (`fp4kit.kernels.int8_linear`, W8A16) against cuBLAS bf16 and the NVFP4 path.

GPU (H100): `python benchmarks/bench_int8_linear.py --out benchmarks/results/int8_linear_h100.json` times, for
the Llama-3-8B output head (128256 x 4096) at M = 1..64 tokens, in one process:
    cuBLAS bf16 (`x @ W.T`), the INT8 kernel (its default tile, and with --sweep every tile of the sweep),
    and NVFP4 (`fp4_linear`, AUTO's kernel) for the same weight,
each as GPU time in a CUDA graph (median replay), with weights rotated through 256 MB so L2 never holds them
(one head copy is 0.5-1 GB: two copies alternate). Every configuration is first checked against the twin
(largest difference over the tests' bound: one bf16 ulp plus float32 summation error) and against a float64 reference. The roofline column is
the INT8 bytes moved (codes + scales + x + y) over the copy bandwidth measured in the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {"lm_head": (128256, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def sweep_configs():
    from fp4kit.kernels.int8_linear import Int8LinearConfig

    for bn, bk, stages, warps in itertools.product((32, 64, 128), (128, 256, 512), (2, 3, 4), (2, 4, 8)):
        if bn * bk * stages > 160 * 1024 or bn * bk < 4096 or warps * 16 > bn or (bn >= 128 and warps == 2):
            continue
        yield Int8LinearConfig(block_n=bn, block_k=bk, num_stages=stages, num_warps=warps)


def twin_ratio(y, x, qt, t):
    """Largest |y - t| over tests/kernels/test_int8_linear.py's bound (one bf16 ulp of t plus float32 summation
    error K 2^-23 sum |x| |w|): <= 1 where the kernel agrees with the twin as the tests require."""
    t32 = t.float()
    spacing = torch.exp2(torch.floor(torch.log2(t32.abs().clamp_min(1e-30))) - 7)
    mag = (x.float().abs() @ qt.data.float().abs().T) * qt.scale
    return ((y.float() - t32).abs() / (spacing + qt.shape[1] * 2**-23 * mag)).max().item()


def gpu(args):
    from bench_fp4_gemm import bench_graph, copy_bandwidth, rotating
    from bench_fp4_ws import _write  # the same JSON layout: device, date, torch, copy_bandwidth, rows

    from fp4kit.formats import Int8Config, NVFP4Config, quantize
    from fp4kit.kernels import fp4_linear, prepare_fp4_weight
    from fp4kit.kernels import int8_linear as il

    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    for name in args.shapes:
        N, K = SHAPES[name]
        w0 = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        bf, nxt_bf = rotating(lambda: torch.randn_like(w0) * 0.02, w0.numel() * 2)
        q8, nxt_q8 = rotating(lambda: quantize(torch.randn_like(w0) * 0.02, Int8Config()), w0.numel())
        nv = prepped = nxt_nv = None
        if args.nvfp4:
            nv, nxt_nv = rotating(lambda: quantize(torch.randn_like(w0) * 0.02, NVFP4Config()), w0.numel() // 2)
            prepped = {id(q): prepare_fp4_weight(q) for q in nv}
        for M in args.ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            nbytes = q8[0].nbytes + 2 * M * K + 2 * M * N
            row = dict(shape=name, N=N, K=K, M=M, roofline_us=nbytes / bw * 1e6,
                       bf16_roofline_us=(2 * N * K + 2 * M * K + 2 * M * N) / bw * 1e6,
                       cublas_graph_us=bench_graph(lambda: torch.matmul(x, nxt_bf().T)), int8={})
            if nv is not None:
                for q in nv:  # plane layouts built eagerly, never in a capture
                    fp4_linear(x, q, prepared=prepped[id(q)])
                row["nvfp4_graph_us"] = bench_graph(lambda: fp4_linear(x, (q := nxt_nv()), prepared=prepped[id(q)]))
            ref = (x.double() @ q8[0].dequantize(torch.float64).T)
            twin = il.int8_linear_torch(x, q8[0])
            default = il.int8_config(M)
            swept = [dataclasses.replace(c, block_m=bm) for bm in (args.block_ms or [default.block_m])
                     for c in sweep_configs()] if args.sweep else []
            cands = [default] + [c for c in dict.fromkeys(swept) if c != default]
            for cfg in cands:
                key = f"bn{cfg.block_n}_bm{cfg.block_m}_bk{cfg.block_k}_s{cfg.num_stages}_w{cfg.num_warps}"
                il.CONFIG = cfg
                try:
                    y = il.int8_linear(x, q8[0])
                    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                    us = bench_graph(lambda: il.int8_linear(x, nxt_q8()))
                    ratio = twin_ratio(y, x, q8[0], twin)
                    row["int8"][key] = dict(us=us, err_max=err, twin_ratio=ratio, default=cfg == default)
                    print(f"{name} M={M:3d} {key:22s} {us:7.1f} us  err {err:.2e}  twin/bound {ratio:.2f}"
                          f"{'  (default)' if cfg == default else ''}", flush=True)
                except Exception as e:  # noqa: BLE001 - a failed configuration is recorded, the sweep goes on
                    row["int8"][key] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
                    print(f"{name} M={M:3d} {key} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                finally:
                    il.CONFIG = None
            ok = {k: v["us"] for k, v in row["int8"].items() if v.get("twin_ratio", 99) <= 1.0}
            row["best"] = min(ok, key=ok.get) if ok else None
            d = next((v["us"] for v in row["int8"].values() if v.get("default") and "us" in v), float("nan"))
            print(f"{name} M={M:3d} cuBLAS {row['cublas_graph_us']:.1f} (roofline {row['bf16_roofline_us']:.1f})  "
                  f"int8 default {d:.1f}  best {ok.get(row['best'], float('nan')):.1f} ({row['best']})  "
                  f"nvfp4 {row.get('nvfp4_graph_us', float('nan')):.1f}  int8 roofline {row['roofline_us']:.1f} us "
                  f"({row['roofline_us'] / d:.0%} of it)", flush=True)
            rows.append(row)
            _write(args.out, bw, rows)
        for copies in (bf, q8, nv or []):  # free this shape's copies before the next
            copies.clear()
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 2, 8, 16, 32, 64])
    ap.add_argument("--shapes", nargs="+", default=["lm_head"], choices=sorted(SHAPES))
    ap.add_argument("--sweep", action="store_true", help="also time every tile of the sweep at each M")
    ap.add_argument("--block-ms", type=int, nargs="*", default=None,
                    help="--sweep: token tiles to try (default: int8_config's for each M)")
    ap.add_argument("--nvfp4", action="store_true", help="also time the NVFP4 path (fp4_linear) on the same shape")
    ap.add_argument("--out", default=None)
    gpu(ap.parse_args())


if __name__ == "__main__":
    main()
