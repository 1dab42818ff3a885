"""Decode-step key selection time on the H100: bf16 keys vs FP8 keys vs single- and two-stage FP4.

    python benchmarks/bench_sparse_select.py [--out results/sparse_select_h100.json] [--smoke]

One index query per row (row = sequence x KV head; here one KV head, head dim 128 as DeepSeek's
indexer), L keys per row, top-k with k = 256 and 2048 (DeepSeek-V3.2's k). Methods, all through the
same kernels (`fp4kit.kernels.fp4_topk`) and the same deterministic radix select:

    torch_bf16   cuBLAS bmm of bf16 keys with q, torch.topk (a plain-PyTorch baseline; ties arbitrary)
    bf16         scan bf16 keys (256 B/key) -> int16 scores -> radix select
    fp8          scan FP8 E4M3 keys + float32 scale per position (132 B/key) -> top-k
    fp4          scan MXFP4 keys (64 + 4 B/key) -> top-k                          (single stage)
    fp4_2stage   scan MXFP4 keys -> top-2k -> rerank over 2k gathered bf16 keys -> top-k

Timing: CUDA graph replays of the whole selection (launch gaps removed; eager times too), median
of many after warm-up, cycling over enough key sets that L2 (50 MB) never holds them. Roofline:
the bytes the method must move (keys read, the int16 scores written once and read by the three
select passes, the rerank's gathered keys) over the device-to-device copy bandwidth measured in the same run.
Correctness first: the kernels are compared with their torch twins on the device (bit-exact
selection for MXFP4; bf16/FP8 scores within 1 bf16 ulp).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time

import torch

from fp4kit.formats import MXFP4Config, ScaleRule, quantize_mxfp4
from fp4kit.kernels import fp4_topk
from fp4kit.kernels.fp4_topk import (KeyCacheView, KeyFormat, bits_to_bf16, index_score_bits, index_scores_torch,
                                     index_topk, index_topk_torch, rerank_topk, rerank_topk_torch)

MX = MXFP4Config(ScaleRule.RCEIL)
D = 128
L2_BYTES = 50 * 2**20


def make_keys(R: int, L: int, device) -> dict:
    """One key set in every format (built from the same bf16 keys), and the index queries."""
    keys = torch.randn(R, L, D, device=device).bfloat16()
    kf = keys.float()
    scale = kf.abs().amax(-1) / 448.0
    fp8 = (kf / scale.unsqueeze(-1)).to(torch.float8_e4m3fn)
    qt = quantize_mxfp4(kf, MX)
    q = torch.randn(R, D, device=device)
    q_fp4 = quantize_mxfp4(q, MX).dequantize()
    return {"bf16": KeyCacheView(KeyFormat.BF16, keys), "fp8": KeyCacheView(KeyFormat.FP8, fp8, scale),
            "fp4": KeyCacheView(KeyFormat.MXFP4, qt.data, qt.scale, fp4_config=MX), "keys": keys, "q": q,
            "q_fp4": q_fp4}


def selection(method: str, s: dict, k: int):
    if method == "torch_bf16":
        return lambda: torch.topk(torch.bmm(s["keys"], s["q"].bfloat16().unsqueeze(-1)).squeeze(-1), k).indices
    if method == "fp4_2stage":
        return lambda: rerank_topk(s["q"], s["keys"], index_topk(s["q_fp4"], s["fp4"], 2 * k), k)
    view, q = s[method], (s["q_fp4"] if method == "fp4" else s["q"])
    return lambda: index_topk(q, view, k)


def bytes_moved(method: str, R: int, L: int, k: int) -> int:
    per_key = {"torch_bf16": 2 * D, "bf16": 2 * D, "fp8": D + 4, "fp4": D // 2 + D // 32, "fp4_2stage": D // 2 + D // 32}
    # int16 score written once, read once by the fused select (+1 by a separate coarse-histogram pass), or by
    # the 3 (+1) passes of the unfused select
    reads = 1 if fp4_topk.FUSED_SELECT else 3
    reads += fp4_topk.COARSE_HIST is fp4_topk.CoarseHist.PASS or (not fp4_topk.FUSED_SELECT and
                                                                  fp4_topk.COARSE_HIST is fp4_topk.CoarseHist.FUSED)
    sort_keys = 0 if method == "torch_bf16" else 2 + 2 * reads
    total = R * L * (per_key[method] + sort_keys)
    if method == "torch_bf16":
        total += R * L * 4  # bf16 scores written and read
    if method == "fp4_2stage":
        total += R * 2 * k * 2 * D  # gathered bf16 keys
    return total


def copy_bandwidth(device) -> float:
    x = torch.empty(2**28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ts = time_fn(lambda: y.copy_(x), reps=50, graph=False)
    return 2 * x.numel() / (ts["median_us"] * 1e-6)


def time_fn(fn, *, reps: int = 100, graph: bool = True, cycle=None) -> dict:
    """Median / p10 / p90 microseconds. `cycle`: list of callables, run in turn (L2 never warm)."""
    fns = cycle or [fn]
    for f in fns:
        for _ in range(3):
            f()
    torch.cuda.synchronize()
    runs = fns
    if graph:
        runs = []
        for f in fns:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                f()
            runs.append(g.replay)
        for r in runs:
            r()
    times = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        runs[i % len(runs)]()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    times.sort()
    return {"median_us": statistics.median(times), "p10_us": times[len(times) // 10],
            "p90_us": times[9 * len(times) // 10]}


def check(device, out: dict, L: int = 5000, big: int = 70000) -> None:
    """Kernels against twins on the device, before any timing. The MXFP4 tensor-core path must select
    exactly what the twin selects; if it does not, it is switched off and the run goes on with the FMA path."""
    torch.manual_seed(1)
    s = make_keys(4, L, device)
    out["checks"] = {}
    for packed in (False, True):  # float32 products, or packed half2 for the MXFP4 query
        fp4_topk.MXFP4_PACKED_HALF = packed
        want = index_scores_torch(s["q_fp4"], s["fp4"]).float()
        want = torch.where(want == 0, 0.0, want)  # -0 -> +0, as the kernel writes it
        bits_same = torch.equal(bits_to_bf16(index_score_bits(s["q_fp4"], s["fp4"])[:, :L]).float(), want)
        out["checks"][f"mxfp4_{'half2' if packed else 'f32'}_scores_bit_exact"] = bits_same
        print(f"MXFP4 packed_half={packed}: scores bit-exact {bits_same}")
    # a float32 (not FP4) query takes the float32 path: within 1 bf16 ulp + the float32 summation error
    sc = bits_to_bf16(index_score_bits(s["q"], s["fp4"])[:, :L]).float()
    want = index_scores_torch(s["q"], s["fp4"]).float()
    mag = torch.einsum("rd,rld->rl", s["q"].abs(), s["fp4"].dequantize().abs())
    out["checks"]["mxfp4_f32_query_within_tol"] = bool(((sc - want).abs() <= want.abs() * 2**-7 + mag * 2**-16).all())
    if not out["checks"]["mxfp4_half2_scores_bit_exact"]:
        fp4_topk.MXFP4_PACKED_HALF = False
    assert out["checks"]["mxfp4_f32_scores_bit_exact"], "MXFP4 scores differ from the twin"
    # every select path against the twin (n = 64 and 1000; ties at lo), the fused one also under graph capture
    sel_ok = {}
    for fused in (True, False):
        for place in fp4_topk.CoarseHist:
            fp4_topk.FUSED_SELECT, fp4_topk.COARSE_HIST = fused, place
            try:
                same = all(torch.equal(index_topk(s["q_fp4"], s["fp4"], n, lo=1),
                                       index_topk_torch(s["q_fp4"], s["fp4"], n, lo=1)) for n in (64, 1000))
            except Exception as e:  # noqa: BLE001 - a path that fails on the device is reported and left off
                print(f"select fused={fused} {place.name}: {type(e).__name__}: {str(e)[:300]}")
                same = False
            sel_ok[(fused, place)] = same
            out["checks"][f"select_fused{int(fused)}_{place.value}_equal"] = same
    fp4_topk.FUSED_SELECT, fp4_topk.COARSE_HIST = True, fp4_topk.CoarseHist.FUSED
    if sel_ok[(True, fp4_topk.CoarseHist.FUSED)] and device.type != "cuda":
        out["checks"]["fused_graph_equal"] = True  # nothing to capture in the interpreter
    elif sel_ok[(True, fp4_topk.CoarseHist.FUSED)]:
        try:
            g = torch.cuda.CUDAGraph()
            res = {}
            with torch.cuda.graph(g):
                res["t"] = index_topk(s["q_fp4"], s["fp4"], 1000, lo=1)
            g.replay()
            torch.cuda.synchronize()
            want = index_topk_torch(s["q_fp4"], s["fp4"], 1000, lo=1)
            out["checks"]["fused_graph_equal"] = torch.equal(res["t"], want)
        except Exception as e:  # noqa: BLE001
            print(f"fused select under graph capture: {type(e).__name__}: {str(e)[:300]}")
            out["checks"]["fused_graph_equal"] = False
    if not (sel_ok[(True, fp4_topk.CoarseHist.FUSED)] and out["checks"].get("fused_graph_equal")):
        fp4_topk.FUSED_SELECT, fp4_topk.COARSE_HIST = False, fp4_topk.CoarseHist.PASS
    assert sel_ok[(False, fp4_topk.CoarseHist.PASS)], "the unfused select differs from its twin"
    for k in (64, 300):
        got, want = (index_topk(s["q_fp4"], s["fp4"], k, lo=3, hi=L - 10),
                     index_topk_torch(s["q_fp4"], s["fp4"], k, lo=3, hi=L - 10))
        assert torch.equal(got, want), "MXFP4 top-k differs from its twin"
        cand = index_topk(s["q_fp4"], s["fp4"], 2 * k)
        r1, r2 = rerank_topk(s["q"], s["keys"], cand, k), rerank_topk_torch(s["q"], s["keys"], cand, k)
        out["checks"][f"rerank_equal_k{k}"] = float((r1 == r2).float().mean())
        # the fused rerank (scores + last-program select) must equal the two-launch one exactly (same sums)
        keep = fp4_topk.FUSED_RERANK, fp4_topk.RERANK_BYTE_RADIX
        same = True
        for fused_rr in (False, True):
            for radix in (False, True):
                fp4_topk.FUSED_RERANK, fp4_topk.RERANK_BYTE_RADIX = fused_rr, radix
                same = same and torch.equal(r1, rerank_topk(s["q"], s["keys"], cand, k))
        fp4_topk.FUSED_RERANK, fp4_topk.RERANK_BYTE_RADIX = keep
        out["checks"][f"fused_rerank_equal_k{k}"] = same
    for fmt in ("bf16", "fp8"):
        sc = bits_to_bf16(index_score_bits(s["q"], s[fmt])[:, :L]).float()
        want = index_scores_torch(s["q"], s[fmt]).float()
        # 1 bf16 ulp of the score, plus the float32 summation-order error bound (cancellation near 0)
        mag = torch.einsum("rd,rld->rl", s["q"].abs(), s[fmt].dequantize().abs())
        tol = want.abs() * 2**-7 + mag * 2**-16
        assert bool(((sc - want).abs() <= tol).all()), f"{fmt} scores off by more than 1 bf16 ulp + sum error"
        out["checks"][f"{fmt}_scores_equal"] = float((sc == want).float().mean())
    if big:
        b = make_keys(2, big, device)  # > one 65,536-position chunk: the merge path
        assert torch.equal(index_topk(b["q_fp4"], b["fp4"], 512), index_topk_torch(b["q_fp4"], b["fp4"], 512))
    if not all(out["checks"][f"fused_rerank_equal_k{k}"] for k in (64, 300)):
        fp4_topk.FUSED_RERANK = False
    out["checks"]["mxfp4_topk_bit_exact"] = True
    out["checks"]["rerank_exact_k300"] = out["checks"]["rerank_equal_k300"] == 1.0
    print("checks:", out["checks"])


def _scan_only(q, view):
    """The scan kernel alone (no histogram, no select): what the decode costs."""
    block_t, warps, iters, n_out = fp4_topk._scan_tile(view)
    ws = torch.zeros(view.rows, 512, dtype=torch.int32, device=q.device)
    return fp4_topk._scan(q, view, 0, view.length, ws, n_out, block_t, warps, iters, False)


def _time_scan(sets, fmt):
    q = "q_fp4" if fmt == "fp4" else "q"
    return time_fn(None, cycle=[(lambda s=s: _scan_only(s[q], s[fmt])) for s in sets], reps=60)


def _sass_blocks(sass: str) -> list:
    """Opcode counts per labelled stretch of Triton's SASS listing ("ctrl<TAB>OPCODE operands")."""
    blocks, cur = [], {"label": "entry", "ops": {}}
    for line in sass.splitlines():
        if line.strip().endswith(":"):
            blocks.append(cur)
            cur = {"label": line.strip()[:-1], "ops": {}}
            continue
        if "\t" not in line:
            continue
        t = line.split("\t", 1)[1].split()
        if not t:
            continue
        op = (t[1] if t[0].startswith("@") and len(t) > 1 else t[0]).rstrip(";").split(".")[0]
        cur["ops"][op] = cur["ops"].get(op, 0) + 1
    blocks.append(cur)
    for blk in blocks:
        blk["count"] = sum(blk["ops"].values())
    return [blk for blk in blocks if blk["count"]]


def scan_sass(s: dict, out_dir: str | None, out: dict) -> None:
    """SASS of the chosen MXFP4 scan kernel (both product paths): instruction counts per opcode, the
    listing to out_dir. What the decode costs per element, read off the machine code."""
    from triton.tools.disasm import get_sass

    view, q = s["fp4"], s["q_fp4"]
    block_t, warps, iters, n_out = fp4_topk._scan_tile(view)
    ws = torch.zeros(view.rows, 512, dtype=torch.int32, device=q.device)
    m = torch.empty(view.rows, n_out, dtype=torch.int16, device=q.device)
    out["sass"] = {}
    keep = fp4_topk.MXFP4_PACKED_HALF
    for packed in (False, True):
        fp4_topk.MXFP4_PACKED_HALF = packed
        grid, args, meta = fp4_topk._scan_launch(q, view, 0, view.length, ws, m, block_t, warps, iters, False)
        try:
            k = fp4_topk._fp4_topk.index_score_kernel.warmup(*args, grid=grid, **meta)
            k._init_handles()
            sass = get_sass(k.asm["cubin"])
        except Exception as e:  # noqa: BLE001 - no cuobjdump: report, go on
            print(f"SASS unavailable: {type(e).__name__}: {e}")
            break
        blocks = _sass_blocks(sass)
        elements = block_t * D // (32 * warps)  # per thread and tile
        out["sass"]["half2" if packed else "f32"] = {"elements_per_thread_per_tile": elements, "n_regs": k.n_regs,
                                                     "blocks": blocks}
        print(f"SASS packed={packed}: {k.n_regs} regs, {elements} elements per thread and tile; basic blocks:")
        for blk in blocks:
            top = sorted(blk["ops"].items(), key=lambda x: -x[1])[:10]
            print(f"  {blk['label']}: {blk['count']} instr ({blk['count'] / elements:.2f} per element) "
                  + ", ".join(f"{o} {c}" for o, c in top))
        if out_dir:
            pathlib.Path(out_dir, f"scan_mxfp4_{'half2' if packed else 'f32'}.sass").write_text(sass)
    fp4_topk.MXFP4_PACKED_HALF = keep


def sweep_tiles(device, out: dict, bw: float) -> None:
    """Scan kernel alone at L = 128K, batch 8: pick the tile and the MXFP4 product path (packed half2 or
    float32); then the select path (fused or not, where the coarse histogram is built) on the whole
    single-stage FP4 selection at batch 1 and 8. Every variant is recorded."""
    sets = [make_keys(8, 131072, device) for _ in range(2)]
    out["tile_sweep"] = []
    per_key = {"bf16": 2 * D, "fp8": D + 4, "fp4": D // 2 + D // 32}
    variants = [("bf16", "bf16", None, 128, 4, 1), ("bf16", "bf16", None, 128, 4, 4)]
    variants += [("fp8", "fp8", None, t, w, i) for t, w, i in ((128, 4, 1), (128, 4, 4), (256, 4, 2))]
    variants += [("fp4", "mxfp4", p, t, w, i) for p in (True, False)
                 for t, w, i in ((128, 4, 1), (128, 4, 4), (128, 4, 8), (256, 4, 4), (256, 8, 4), (64, 4, 8))]
    best = {}
    half2_ok = fp4_topk.MXFP4_PACKED_HALF
    for fmt, name, packed, block_t, warps, iters in variants:
        if packed and not half2_ok:
            continue
        fp4_topk.SCAN_TILE[name] = (block_t, warps, iters)
        fp4_topk.MXFP4_PACKED_HALF = bool(packed)
        try:
            t = _time_scan(sets, fmt)
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is reported, not fatal
            print(f"scan {fmt} packed={packed} {block_t}x{warps}x{iters}: {type(e).__name__}: {str(e)[:200]}")
            continue
        nbytes = 8 * 131072 * (per_key[fmt] + 2)
        row = {"format": fmt, "packed_half": packed, "block_t": block_t, "warps": warps, "iters": iters, **t,
               "roofline_us": nbytes / bw * 1e6}
        out["tile_sweep"].append(row)
        print(f"scan {fmt:4s} packed={packed} tile {block_t}x{warps}x{iters}: {t['median_us']:.1f} us "
              f"(roofline {row['roofline_us']:.1f})")
        if fmt not in best or t["median_us"] < best[fmt][0]:
            best[fmt] = (t["median_us"], name, packed, block_t, warps, iters)
    for fmt, (_, name, packed, block_t, warps, iters) in best.items():
        fp4_topk.SCAN_TILE[name] = (block_t, warps, iters)
        if fmt == "fp4":
            fp4_topk.MXFP4_PACKED_HALF = bool(packed)
    out["select_sweep"] = []
    paths = [(True, fp4_topk.CoarseHist.FUSED), (True, fp4_topk.CoarseHist.SCAN), (True, fp4_topk.CoarseHist.PASS),
             (False, fp4_topk.CoarseHist.SCAN), (False, fp4_topk.CoarseHist.PASS)]
    if not fp4_topk.FUSED_SELECT:  # the check found the fused select wrong on this device
        paths = paths[3:]
    total = {}
    for B in (1, 8):
        bsets = [make_keys(B, 131072, device) for _ in range(4 if B == 1 else 2)]
        for fused, place in paths:
            fp4_topk.FUSED_SELECT, fp4_topk.COARSE_HIST = fused, place
            for fmt in ("fp8", "fp4"):
                q = "q_fp4" if fmt == "fp4" else "q"
                fns = [(lambda s=s, q=q, fmt=fmt: index_topk(s[q], s[fmt], 2048)) for s in bsets]
                t = time_fn(None, cycle=fns, reps=100)
                out["select_sweep"].append({"batch": B, "format": fmt, "fused": fused, "coarse_hist": place.value, **t})
                print(f"select B={B} {fmt} fused={fused} coarse={place.value}: {t['median_us']:.1f} us")
                if fmt == "fp4":
                    total[(fused, place)] = total.get((fused, place), 0.0) + t["median_us"]
        del bsets
    fused, place = min(total, key=total.get)
    fp4_topk.FUSED_SELECT, fp4_topk.COARSE_HIST = fused, place
    if fused:  # positions per program of the fused select: fewer, larger programs mean fewer at each barrier
        every = fp4_topk.FUSED_BLOCKS
        best_blocks = (every, total[(fused, place)])
        for first in every[1:]:
            fp4_topk.FUSED_BLOCKS = tuple(b for b in every if b[0] >= first[0])
            t_sum = 0.0
            for B in (1, 8):
                bsets = [make_keys(B, 131072, device) for _ in range(4 if B == 1 else 2)]
                t = time_fn(None, cycle=[(lambda s=s: index_topk(s["q_fp4"], s["fp4"], 2048)) for s in bsets],
                            reps=100)
                t_sum += t["median_us"]
                out["select_sweep"].append({"batch": B, "format": "fp4", "fused": True, "coarse_hist": place.value,
                                            "fused_block_min": first[0], **t})
                print(f"select B={B} fp4 fused, blocks >= {first[0]}: {t['median_us']:.1f} us")
                del bsets
            if t_sum < best_blocks[1]:
                best_blocks = (fp4_topk.FUSED_BLOCKS, t_sum)
        fp4_topk.FUSED_BLOCKS = best_blocks[0]
    # the rerank: one launch or two, byte-radix or bitwise k-th-key search (two-stage FP4, k = 2048)
    rr = {}
    for B in (1, 8):
        bsets = [make_keys(B, 131072, device) for _ in range(4 if B == 1 else 2)]
        for fused_rr in (False, True):
            for radix in (False, True):
                fp4_topk.FUSED_RERANK, fp4_topk.RERANK_BYTE_RADIX = fused_rr, radix
                t = time_fn(None, cycle=[selection("fp4_2stage", s, 2048) for s in bsets], reps=100)
                rr[(fused_rr, radix)] = rr.get((fused_rr, radix), 0.0) + t["median_us"]
                out["select_sweep"].append({"batch": B, "method": "fp4_2stage", "fused_rerank": fused_rr,
                                            "byte_radix": radix, **t})
                print(f"two-stage B={B} k=2048 fused_rerank={fused_rr} byte_radix={radix}: {t['median_us']:.1f} us")
        del bsets
    fp4_topk.FUSED_RERANK, fp4_topk.RERANK_BYTE_RADIX = min(rr, key=rr.get)
    out["scan_config"] = {"tile": dict(fp4_topk.SCAN_TILE), "mxfp4_packed_half": fp4_topk.MXFP4_PACKED_HALF,
                          "fused_select": fused, "coarse_hist": place.value, "fused_blocks": fp4_topk.FUSED_BLOCKS,
                          "fused_rerank": fp4_topk.FUSED_RERANK,
                          "rerank_byte_radix": fp4_topk.RERANK_BYTE_RADIX}
    print("chosen:", out["scan_config"])
    del sets
    torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, no timing (CPU interpreter check)")
    p.add_argument("--sass-dir", default=None, help="write the MXFP4 scan kernel's SASS here")
    p.add_argument("--sweep-only", action="store_true", help="checks and the scan / select sweeps, no table")
    args = p.parse_args()
    if args.smoke:  # run as TRITON_INTERPRET=1 python ... --smoke on a CPU machine
        out = {}
        check(torch.device("cpu"), out, L=400, big=0)
        return
    device = torch.device("cuda")
    out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "head_dim": D,
           "torch": torch.__version__, "rows": []}
    check(device, out)
    bw = copy_bandwidth(device)
    out["copy_bandwidth_GBps"] = bw / 1e9
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    methods = ["torch_bf16", "bf16", "fp8", "fp4", "fp4_2stage"]
    sweep_tiles(device, out, bw)
    scan_sass(make_keys(2, 4096, device), args.sass_dir, out)
    if args.sweep_only:
        methods, out["rows"] = [], []
    for L in (32768, 65536, 131072) if methods else ():
        for B in (1, 8):
            fp4_set = B * L * (D // 2 + D // 32)  # the smallest format decides: 2x L2 of FP4 keys per cycle
            n_sets = max(1, min(64, -(-2 * L2_BYTES // fp4_set)))
            sets = [make_keys(B, L, device) for _ in range(n_sets)]
            for k in (256, 2048):
                for m in methods:
                    fns = [selection(m, s, k) for s in sets]
                    try:
                        t = time_fn(None, cycle=fns, reps=200)
                        mode = "graph"
                    except Exception as e:  # noqa: BLE001 - report and fall back to eager timing
                        print(f"graph capture failed for {m}: {type(e).__name__}: {e}")
                        t = time_fn(None, cycle=fns, reps=200, graph=False)
                        mode = "eager"
                    te = time_fn(None, cycle=fns, reps=100, graph=False)
                    nbytes = bytes_moved(m, B, L, k)
                    row = {"L": L, "batch": B, "k": k, "method": m, "mode": mode, **t,
                           "eager_median_us": te["median_us"], "bytes": nbytes,
                           "roofline_us": nbytes / bw * 1e6}
                    out["rows"].append(row)
                    print(f"L={L:6d} B={B} k={k:4d} {m:11s} {t['median_us']:8.1f} us (eager {te['median_us']:7.1f})"
                          f"  roofline {row['roofline_us']:6.1f} us")
            del sets
            torch.cuda.empty_cache()
    if not methods:
        _save(out, args.out)
        return
    print("\n| L | batch | k | torch bf16 | bf16 | fp8 | fp4 | fp4 two-stage | fp8 / fp4 two-stage |")
    print("|---|---|---|---|---|---|---|---|---|")
    for L in (32768, 65536, 131072):
        for B in (1, 8):
            for k in (256, 2048):
                r = {x["method"]: x for x in out["rows"] if (x["L"], x["batch"], x["k"]) == (L, B, k)}
                cells = [f"{r[m]['median_us']:.1f} ({r[m]['roofline_us']:.1f})" for m in methods]
                ratio = r["fp8"]["median_us"] / r["fp4_2stage"]["median_us"]
                print(f"| {L // 1024}K | {B} | {k} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    _save(out, args.out)


def _save(out: dict, where: str | None) -> None:
    if where:
        path = pathlib.Path(where)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, path)


if __name__ == "__main__":
    main()
