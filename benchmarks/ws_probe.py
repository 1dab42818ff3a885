"""Where the warp-specialised FP4 GEMM's ~4-5 us of fixed cost per launch goes: timing probes that leave one part out.

`ws_fixed_cost.py` found the short layers' time is a straight line in the bytes with a ~4 us intercept (o at 16
tokens: 8.3 us for 3.2 us of bytes). This script times the same launches with one part of the kernel removed, so
the differences place the intercept (METHOD.md: time variants that leave a stage out, take differences):

- `full`: the kernel as shipped;
- `noloop`: no K steps at all (no loads, no decode, no MMA): launch, prologue, PDL wait, the split-K epilogue;
- `nodecode`: the loader streams every stage, the consumer only waits for it and frees it (no decode, no MMA);
- `noreduce`: every split stores its partial straight to y (no workspace, ticket or reduction; wrong sums,
  timing only);
- `relaxed` / `nopartial` / `noload`: the split-K epilogue without the ticket's release-acquire ordering, without
  the partial's store, or without the last split's loads;
- `empty`: a Gluon kernel of the same grid and warps that only does the PDL handshake.

The probe kernels are built from `fp4kit/kernels/_fp4_ws.py`'s own source with small text edits, written beside it
as `_fp4_ws_probe_<name>.py` (removed at exit) and swapped in for the launch; nothing here changes the library.
GPU: `python benchmarks/ws_probe.py --out benchmarks/results/ws_probe_h100.json`.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EDITS = {
    "noloop": [("    N_STEPS: gl.constexpr = ((K + BLOCK_K - 1) // BLOCK_K + SPLIT_K - 1) // SPLIT_K",
                "    N_STEPS: gl.constexpr = 0")],
    "nodecode": [("        for j in gl.static_range(XSUB):\n            if MODE == 4 and IS_NVFP4 and SCALE_SMEM:",
                  "        for j in gl.static_range(0):\n            if MODE == 4 and IS_NVFP4 and SCALE_SMEM:")],
    "noreduce": [("    if SPLIT_K > 1:\n", "    if False:\n")],
    # the split-K epilogue taken apart (timing only; the sums are wrong or unordered)
    "relaxed": [('ticket = gl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")',
                 'ticket = gl.atomic_add(cnt_ptr + pid_n, 1, sem="relaxed")')],
    "nopartial": [("        gl.store(ws_ptr + pid_k * M * N + off, acc, mask=mask)\n", "")],
    "noload": [('                acc += gl.load(ws_ptr + sk * M * N + off, mask=mask, other=0.0, cache_modifier=".cg")',
                '                acc += 0.0')],
    # the split-K workspace kept in L2 (stores and loads marked evict_last; the streamed weights pass through it)
    "wslast": [("        gl.store(ws_ptr + pid_k * M * N + off, acc, mask=mask)\n",
                '        gl.store(ws_ptr + pid_k * M * N + off, acc, mask=mask, eviction_policy="evict_last")\n'),
               ('mask=mask, other=0.0, cache_modifier=".cg")', 'mask=mask, other=0.0, '
                'eviction_policy="evict_last")')],  # (ptxas: no .cg with evict_last; the acquire invalidates L1)
}


def probe_module(name: str):
    """fp4kit.kernels._fp4_ws with EDITS[name] applied, imported from a file beside it."""
    import fp4kit.kernels as pkg

    src = open(os.path.join(os.path.dirname(pkg.__file__), "_fp4_ws.py")).read()
    for old, new in (e for part in name.split("+") for e in EDITS[part]):  # "noloop+relaxed": both edits
        if src.count(old) != 1:
            raise RuntimeError(f"ws_probe: edit {name!r} no longer matches _fp4_ws.py exactly once: {old!r}")
        src = src.replace(old, new)
    mod = f"_fp4_ws_probe_{name.replace('+', '_')}"
    path = os.path.join(os.path.dirname(pkg.__file__), mod + ".py")
    with open(path, "w") as f:
        f.write(src)
    atexit.register(lambda: os.path.exists(path) and os.remove(path))
    return importlib.import_module(f"fp4kit.kernels.{mod}")


def empty_kernel():
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    @gluon.jit
    def _empty(y_ptr, PDL: gl.constexpr):
        if PDL:
            gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                      is_pure=False, pack=1)
            gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)

    return _empty


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--ks", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--variants", nargs="+", default=["full", "noloop", "nodecode", "noreduce", "empty"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import fp4kit.kernels as pkg
    from bench_fp4_gemm import bench_graph, copy_bandwidth
    from ws_fixed_cost import weight_set

    from fp4kit.kernels import fp4_gemm, fp4_ws
    from fp4kit.kernels.fp4_ws import WsConfig, _layout_switches, fp4_ws_matmul

    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    from fp4kit.kernels import _fp4_ws as original
    mods = {v: (original if v == "full" else probe_module(v)) for v in args.variants if v != "empty"}
    rows = []
    N = args.n
    for K in args.ks:
        qt0, wsw, nxt, x, nbytes = weight_set(N, K, args.m)
        for sk in args.splits:
            if (K // 256) % sk:
                continue
            cfg = _layout_switches(WsConfig(block_n=64, block_k=256, stages=2, split_k=sk), args.m, K)
            for v in args.variants:
                for pdl in (True, False):
                    fp4_gemm.PDL = pdl
                    fp4_gemm._PDL_DEVICES.clear()
                    if v == "empty":
                        k = empty_kernel()
                        y = torch.empty(1, device="cuda")
                        grid = (N // 64, sk)

                        def fn():
                            k[grid](y, PDL=pdl, num_warps=4, **({"launch_pdl": True} if pdl else {}))
                    else:
                        pkg._fp4_ws = mods[v]
                        fp4_ws.WS_MMA_OVERLAP = v not in ("noloop", "nodecode")  # no MMA: no slice to overlap

                        def fn():
                            fp4_ws_matmul(x, wsw[id(nxt())], config=cfg)
                    try:
                        for _ in wsw:  # compile and build the per-weight copies outside the capture
                            fn()
                        us = bench_graph(fn)
                    finally:
                        pkg._fp4_ws = original
                        fp4_ws.WS_MMA_OVERLAP = True
                    rows.append(dict(variant=v, N=N, K=K, M=args.m, split_k=sk, pdl=pdl, us=us, bytes=nbytes,
                                     roofline_us=nbytes / bw * 1e6))
                    print(f"K={K:6d} split {sk} pdl {int(pdl)} {v:9s} {us:6.2f} us (roofline {nbytes / bw * 1e6:5.2f})",
                          flush=True)
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                           copy_bandwidth=bw, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
