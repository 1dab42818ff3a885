"""Warp-specialised skinny FP4 GEMM (`fp4kit.kernels._fp4_ws`, Gluon) against the skinny kernel and cuBLAS bf16.

GPU (H100): `python benchmarks/bench_fp4_ws.py --out benchmarks/results/fp4_ws_h100.json`: for the Llama-3-8B
shapes at M = 16 and 32 (NVFP4), checks every configuration against the float64 reference first, then times
cuBLAS bf16, the skinny kernel (`DecodePath.SKINNY`) and each configuration of the warp-specialised kernel in
one process: GPU time in a CUDA graph, weights rotated through 256 MB so L2 never holds them, median replay.
The roofline column is bytes moved (weights + scales + x + y) over the copy bandwidth measured in the run.

CPU: `--sass` compiles the configurations for sm_90 offline and prints registers, shared memory and spills.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ring depths the sweep tries (the r3 sweep: 4 stages never won before the wide boxes; "2,3,4" re-checks)
SWEEP_STAGES = tuple(int(v) for v in os.environ.get("WS_SWEEP_STAGES", "2,4").split(","))
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
EXTRA_SHAPES = {"lm_head": (128256, 4096)}  # the engine's NVFP4 output head: only when named in --shapes


def configs(N: int, K: int, M: int):
    """(BLOCK_N, num_warps, BLOCK_K, STAGES, maxnreg, SPLIT_K) to try for one shape."""
    out = []
    for bn, warps in ((64, 4), (128, 8)):
        tiles = -(-N // bn)
        ctas_per_sm = 3 if bn == 64 else 2
        base = max(1, round(ctas_per_sm * 132 / tiles))
        base = 1 << (base.bit_length() - 1)
        for stages in SWEEP_STAGES:
            for split in sorted({max(1, base // 4), max(1, base // 2), base, 2 * base}):
                steps = -(-K // 256)
                if split > steps:
                    continue
                out.append((bn, warps, 256, stages, 80, split))
    return out


def sass(args):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from bench_fp4_gemv import _instructions, _opcodes, _regs, _sass
    from fp4kit.kernels import _fp4_ws

    for name, (N, K) in SHAPES.items():
        if args.shapes and name not in args.shapes:
            continue
        for M in args.ms:
            for cfg in configs(N, K, M):
                bn, warps, bk, stages, maxnreg, split = cfg
                bs = args.sass_bs
                bk = 512 if bs == 32 else bk
                block_m = max(16, triton.next_power_of_2(M))
                wl, xl, sl = _fp4_ws.layouts(bn, block_m, bk, bs)
                wshape, sshape = f"{bn},8", f"{bn},{bk // bs}"
                if os.environ.get("WS_TILED") == "2":  # WIDE boxes
                    from triton.experimental.gluon import language as gl
                    wl, sl = gl.NVMMASharedLayout(0, 32), gl.NVMMASharedLayout(0, 8)
                    wshape, sshape = f"{bk // 64 * bn // 4},32", f"{bn * (bk // bs) // 128},128"
                sig = dict(x_desc=f"tensordesc<bf16[{block_m},64],{xl!r}>", w_desc=f"tensordesc<i32[{wshape}],{wl!r}>",
                           s_desc=f"tensordesc<u8[{sshape}],{sl!r}>", table_ptr="*i32", post_ptr="*fp32", bias_ptr="*bf16", y_ptr="*bf16", ws_ptr="*fp32",
                           cnt_ptr="*i32", M="i32",
                           N="i32")
                const = dict(K=K, BLOCK_N=bn, BLOCK_M=block_m, BLOCK_K=bk, SPLIT_K=split, STAGES=stages,
                             num_warps=warps, MODE=args.sass_mode, TWO_MUL=bs == 32, HAS_POST=bs == 16,
                             IS_NVFP4=bs == 16, PDL=1, OVERLAP=bool(int(os.environ.get("WS_OVERLAP", "1"))),
                             TILED=int(os.environ.get("WS_TILED", "0")),
                             SCALE_SMEM=bool(int(os.environ.get("WS_SCALE_SMEM", "0"))))
                sig.update({k: "constexpr" for k in const})
                attrs = {(i,): [["tt.divisibility", 16]] for i in (3, 4, 5, 6, 7, 8)}
                k = triton.compile(GluonASTSource(_fp4_ws.fp4_ws_kernel, sig, const, attrs),
                                   target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, maxnreg=maxnreg))
                ops = _opcodes(_instructions(_sass(k)))
                print(name, M, cfg, "regs", _regs(k), "smem", k.metadata.shared, "spills",
                      ops.get("LDL", 0) + ops.get("STL", 0), "STS", ops.get("STS", 0), "LDS", ops.get("LDS", 0),
                      "instructions", sum(ops.values()), flush=True)
                if args.sass_dump:
                    with open(args.sass_dump, "w") as f:
                        f.write("\n".join(map(str, _sass(k))))
                    return


def _skinny(x, qt, preps):
    from fp4kit.kernels.fp4_gemm import DecodePath, fp4_matmul

    return fp4_matmul(x, qt, prepared=preps[id(qt)], path=DecodePath.SKINNY)  # AUTO takes the WS kernel now


def gpu(args):
    from bench_fp4_gemm import bench_graph, check, copy_bandwidth, rotating

    from fp4kit.formats import MXFP4Config, NVFP4Config, quantize
    from fp4kit.kernels import prepare_fp4_weight
    from fp4kit.kernels.fp4_ws import WsConfig, WsDecode, _layout_switches, fp4_ws_matmul, prepare_ws, ws_config

    DECODES = {"f32": WsDecode.FLOAT32, "frag": WsDecode.FRAG}

    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    formats = {"nvfp4": NVFP4Config(), "mxfp4": MXFP4Config()}
    for name, (N, K) in {**SHAPES, **EXTRA_SHAPES}.items():
        if (args.shapes and name not in args.shapes) or (name in EXTRA_SHAPES and not args.shapes):
            continue
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        _, nxt_bf16 = rotating(lambda: torch.randn_like(w) * 0.02, w.numel() * 2)
        for fmt in args.formats:
            cfg_fmt = formats[fmt]
            qt0 = quantize(w, cfg_fmt)
            qts, nxt_qt = rotating(lambda: quantize(torch.randn_like(w) * 0.02, cfg_fmt), qt0.nbytes)
            preps = {id(q): prepare_fp4_weight(q) for q in qts}
            decodes = [d for d in args.decodes if fmt == "nvfp4" or d == "frag"]
            wsw = {d: {id(q): prepare_ws(q, DECODES[d], preps[id(q)]) for q in qts} for d in decodes}
            ws0 = {d: prepare_ws(qt0, DECODES[d]) for d in decodes}
            for M in args.ms:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                nbytes = qt0.nbytes + 2 * M * K + 2 * M * N
                row = dict(shape=name, fmt=fmt, N=N, K=K, M=M, roofline_us=nbytes / bw * 1e6,
                           cublas_graph_us=bench_graph(lambda: torch.matmul(x, nxt_bf16().T)), ws={})
                for q in qts:  # each prepared weight's first call builds its launch (never inside a capture)
                    _skinny(x, q, preps)
                row["skinny_graph_us"] = bench_graph(lambda: _skinny(x, nxt_qt(), preps))
                row["skinny_err"] = check(x, qt0, _skinny(x, qt0, {id(qt0): prepare_fp4_weight(qt0)}))
                if M <= 2:  # the CUDA-core GEMV, fp4_matmul's AUTO path at 1-2 rows
                    from fp4kit.kernels.fp4_gemm import DecodePath, fp4_matmul
                    for q in qts:  # plane layouts built eagerly, never in a capture
                        fp4_matmul(x, q, prepared=preps[id(q)], path=DecodePath.GEMV)
                    row["gemv_graph_us"] = bench_graph(
                        lambda: fp4_matmul(x, (q := nxt_qt()), prepared=preps[id(q)], path=DecodePath.GEMV))
                default = ws_config(M, N, K, block_size=cfg_fmt.block_size)
                bk = default.block_k
                swept = [WsConfig(block_n=bn, block_k=b, stages=max(1, st * 256 // b), split_k=sk)
                         for b in (args.block_ks or [bk]) for bn, _, _, st, _, sk in configs(N, K, M)
                         if K % b == 0 and (K // b) >= sk and sk >= args.min_split] if args.sweep else []
                if args.switched:  # the sweep's configurations with the default's layout switches
                    swept = [_layout_switches(c, M, K) for c in swept]
                sweep = [default] + swept
                for v in args.variants:  # the same configurations with a WsConfig switch on (tiled, scale_smem), or
                    if v == "plain":  # all of them off (the kernel before the tiled copy and the scale table)
                        sweep += [dataclasses.replace(c, tiled=False, wide=False, scale_smem=False) for c in sweep]
                        continue
                    sweep += [dataclasses.replace(c, **{v: True}, **({"tiled": True} if v == "wide" else {}))
                              for c in sweep if not getattr(c, v)
                              and (v not in ("tiled", "wide") or ((K // c.block_k) % c.split_k == 0
                                                                  and K % c.block_k == 0))]
                cands = [(d, c) for d in decodes for c in dict.fromkeys(sweep if d != "f32" else [default])]
                for dec, cfg in cands:
                    key = f"{dec}_bn{cfg.block_n}_bk{cfg.block_k}_s{cfg.stages}_sk{cfg.split_k}{'_tiled' * cfg.tiled}{'_wide' * cfg.wide}{'_scsmem' * cfg.scale_smem}"
                    try:
                        err = check(x, qt0, fp4_ws_matmul(x, ws0[dec], config=cfg))
                        for q in qts:  # per-weight copies (the tiled layout) are built eagerly, never in a capture
                            fp4_ws_matmul(x, wsw[dec][id(q)], config=cfg)
                        us = bench_graph(lambda: fp4_ws_matmul(x, wsw[dec][id(nxt_qt())], config=cfg))
                        row["ws"][key] = dict(us=us, err_max=err[0], err_rms=err[1], default=cfg == default,
                                              decode=dec)
                        print(f"{name:8s} {fmt} M={M:3d} {key:24s} {us:7.1f} us  err {err[0]:.2e} / {err[1]:.2e}"
                              f"{'  (default)' if cfg == default else ''}", flush=True)
                    except Exception as e:  # noqa: BLE001 - a failed configuration is recorded, the sweep goes on
                        row["ws"][key] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
                        print(f"{name:8s} {fmt} M={M:3d} {key:24s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                ok = {k: v["us"] for k, v in row["ws"].items() if "err_max" in v and v["err_max"] < 1e-2}
                best = min(ok, key=ok.get) if ok else None
                row["best"] = best
                dflt = {v["decode"]: v["us"] for v in row["ws"].values() if v.get("default") and "err_max" in v}
                print(f"{name:8s} {fmt} M={M:3d} cuBLAS {row['cublas_graph_us']:.1f}  skinny "
                      f"{row['skinny_graph_us']:.1f}  gemv {row.get('gemv_graph_us', float('nan')):.1f}  ws default {dflt}  best {ok.get(best, float('nan')):.1f} "
                      f"({best})  roofline {row['roofline_us']:.1f} us", flush=True)
                rows.append(row)
                _write(args.out, bw, rows)  # after every row: a run cut off by its time limit keeps what it measured


def _write(path, bw, rows):
    if not path:
        return
    out = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
               copy_bandwidth=bw, rows=rows)
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sass", action="store_true", help="offline sm_90 compile of every configuration (no GPU)")
    ap.add_argument("--sass-mode", type=int, default=4, help="--sass: the consumer MODE to compile (0 float32, 4 fragments)")
    ap.add_argument("--sass-bs", type=int, default=16, choices=[16, 32], help="--sass: 16 NVFP4, 32 MXFP4")
    ap.add_argument("--sass-dump", default=None, help="--sass: write the first configuration's SASS here and stop")
    ap.add_argument("--ms", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--shapes", nargs="*", default=None)
    ap.add_argument("--formats", nargs="+", default=["nvfp4"], help="nvfp4 and/or mxfp4 (MXFP4: frag decode only)")
    ap.add_argument("--decodes", nargs="+", default=["f32", "frag"], choices=["f32", "frag"])
    ap.add_argument("--sweep", action="store_true", help="also time the sweep's other configurations")
    ap.add_argument("--block-ks", type=int, nargs="*", default=None,
                    help="--sweep: stage widths to try (default: the format's default; NVFP4 256 and/or 512)")
    ap.add_argument("--min-split", type=int, default=1, help="--sweep: skip configurations with fewer K splits")
    ap.add_argument("--switched", action="store_true",
                    help="--sweep: give the swept configurations the default's layout switches (tiled, wide, scale table)")
    ap.add_argument("--variants", nargs="*", default=[], choices=["tiled", "wide", "scale_smem", "plain"],
                    help="also time each configuration with these WsConfig switches on")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sass(args) if args.sass else gpu(args)


if __name__ == "__main__":
    main()
