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
import triton

from fp4kit.formats import MXFP4Config, ScaleRule, quantize_mxfp4
from fp4kit.kernels import fp4_topk
from fp4kit.kernels.fp4_topk import (KeyCacheView, KeyFormat, bits_to_bf16, index_score_bits, index_scores_torch,
                                     index_topk, index_topk_rerank, index_topk_torch, rerank_topk,
                                     rerank_topk_torch)

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
    if method == "fp4_2stage":  # the library's two-stage call (the rerank inside the select with RERANK_IN_SELECT)
        return lambda: index_topk_rerank(s["q_fp4"], s["fp4"], s["q"], s["keys"], k, 2 * k)
    if method == "fp4_2stage_split":  # the two calls: select, then a rerank launch
        return lambda: rerank_topk(s["q"], s["keys"], index_topk(s["q_fp4"], s["fp4"], 2 * k), k)
    view, q = s[method], (s["q_fp4"] if method == "fp4" else s["q"])
    return lambda: index_topk(q, view, k)


def bytes_moved(method: str, R: int, L: int, k: int) -> int:
    per_key = {"torch_bf16": 2 * D, "bf16": 2 * D, "fp8": D + 4, "fp4": D // 2 + D // 32, "fp4_2stage": D // 2 + D // 32,
               "fp4_2stage_split": D // 2 + D // 32}
    # int16 score written once, read once by the fused select (+1 by a separate coarse-histogram pass), or by
    # the 3 (+1) passes of the unfused select
    if fp4_topk.SELECT_METHOD is fp4_topk.SelectMethod.THRESHOLD:
        reads = 1  # the compaction reads the scores once (the group maxima: 2 bytes per group, not counted)
    else:
        reads = 1 if fp4_topk.FUSED_SELECT else 3
        reads += fp4_topk.COARSE_HIST is fp4_topk.CoarseHist.PASS or (not fp4_topk.FUSED_SELECT and
                                                                      fp4_topk.COARSE_HIST is fp4_topk.CoarseHist.FUSED)
    sort_keys = 0 if method == "torch_bf16" else 2 + 2 * reads
    total = R * L * (per_key[method] + sort_keys)
    if method == "torch_bf16":
        total += R * L * 4  # bf16 scores written and read
    if method in ("fp4_2stage", "fp4_2stage_split"):
        total += R * 2 * k * 2 * D  # gathered bf16 keys
    return total


def copy_bandwidth(device) -> float:
    x = torch.empty(2**28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ts = time_fn(lambda: y.copy_(x), reps=50, graph=False)
    return 2 * x.numel() / (ts["median_us"] * 1e-6)


def time_fn(fn, *, reps: int = 100, graph: bool = True, cycle=None, per_graph: int = 0) -> dict:
    """Median / p10 / p90 microseconds. `cycle`: list of callables, run in turn (L2 never warm).
    per_graph > 0: ONE graph holds `per_graph` calls back to back (cycling), and a replay's time is divided by
    per_graph: the GPU time per call without the replay's launch latency and event overhead (a lone replay adds
    ~5 us on the H100 against ncu's kernel time, 2026-11-24), as in a decode step where the selection sits between
    other kernels."""
    fns = cycle or [fn]
    for f in fns:
        for _ in range(3):
            f()
    torch.cuda.synchronize()
    if per_graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(per_graph):
                fns[i % len(fns)]()
        g.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(max(10, reps // 5)):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1000 / per_graph)
        times.sort()
        return {"median_us": statistics.median(times), "p10_us": times[len(times) // 10],
                "p90_us": times[9 * len(times) // 10], "per_graph": per_graph}
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
    for name, (dp4a, packed) in PRODUCT_PATHS.items():  # float32, packed half2 or integer (dp4a) products
        fp4_topk.MXFP4_DP4A, fp4_topk.MXFP4_PACKED_HALF = dp4a, packed
        want = index_scores_torch(s["q_fp4"], s["fp4"]).float()
        want = torch.where(want == 0, 0.0, want)  # -0 -> +0, as the kernel writes it
        bits_same = torch.equal(bits_to_bf16(index_score_bits(s["q_fp4"], s["fp4"])[:, :L]).float(), want)
        out["checks"][f"mxfp4_{name}_scores_bit_exact"] = bits_same
        print(f"MXFP4 {name} products: scores bit-exact {bits_same}")
    fp4_topk.MXFP4_DP4A = out["checks"]["mxfp4_dp4a_scores_bit_exact"]
    fp4_topk.MXFP4_PACKED_HALF = False
    # a float32 (not FP4) query takes the float32 path: within 1 bf16 ulp + the float32 summation error
    sc = bits_to_bf16(index_score_bits(s["q"], s["fp4"])[:, :L]).float()
    want = index_scores_torch(s["q"], s["fp4"]).float()
    mag = torch.einsum("rd,rld->rl", s["q"].abs(), s["fp4"].dequantize().abs())
    out["checks"]["mxfp4_f32_query_within_tol"] = bool(((sc - want).abs() <= want.abs() * 2**-7 + mag * 2**-16).all())
    assert out["checks"]["mxfp4_f32_scores_bit_exact"], "MXFP4 scores differ from the twin"
    check_threshold(device, out, s)
    # every select path against the twin (n = 64 and 1000; ties at lo), the fused one also under graph capture
    sel_ok = {}
    fp4_topk.SELECT_METHOD = fp4_topk.SelectMethod.RADIX
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
    if out["checks"]["threshold_select_equal"]:
        fp4_topk.SELECT_METHOD = fp4_topk.SelectMethod.THRESHOLD
    for k in (64, 300):
        got, want = (index_topk(s["q_fp4"], s["fp4"], k, lo=3, hi=L - 10),
                     index_topk_torch(s["q_fp4"], s["fp4"], k, lo=3, hi=L - 10))
        assert torch.equal(got, want), "MXFP4 top-k differs from its twin"
        cand = index_topk(s["q_fp4"], s["fp4"], 2 * k)
        r1, r2 = rerank_topk(s["q"], s["keys"], cand, k), rerank_topk_torch(s["q"], s["keys"], cand, k)
        out["checks"][f"rerank_equal_k{k}"] = float((r1 == r2).float().mean())
        # the fused rerank (scores + last-program select) must equal the two-launch one exactly (same sums)
        keep = fp4_topk.FUSED_RERANK, fp4_topk.RERANK_BYTE_RADIX, fp4_topk.RERANK_DIGITS
        same = True
        for fused_rr in (False, True):
            for radix, digits in ((False, False), (True, False), (False, True)):
                fp4_topk.FUSED_RERANK, fp4_topk.RERANK_BYTE_RADIX, fp4_topk.RERANK_DIGITS = fused_rr, radix, digits
                same = same and torch.equal(r1, rerank_topk(s["q"], s["keys"], cand, k))
        fp4_topk.FUSED_RERANK, fp4_topk.RERANK_BYTE_RADIX, fp4_topk.RERANK_DIGITS = keep
        out["checks"][f"fused_rerank_equal_k{k}"] = same
        # the rerank inside the select's launch: the same selection as the two calls (random keys: float32 sums in
        # another order can flip a near-tie, so a fraction), and exactly the twin's on small-integer keys
        one = index_topk_rerank(s["q_fp4"], s["fp4"], s["q"], s["keys"], k, 2 * k)
        out["checks"][f"rerank_in_select_equal_k{k}"] = float((one == r1).float().mean())
        ik = torch.randint(-2, 3, (4, L, D), device=device).bfloat16()
        iq = torch.randint(-2, 3, (4, D), device=device).float()
        iq4 = quantize_mxfp4(iq, MX).dequantize()
        qt = quantize_mxfp4(ik.float() + 0.3 * torch.randn(4, L, D, device=device), MX)
        iv = KeyCacheView(KeyFormat.MXFP4, qt.data, qt.scale, fp4_config=MX)
        want2 = rerank_topk_torch(iq, ik, index_topk_torch(iq4, iv, 2 * k, lo=3, hi=L - 10), k)
        out["checks"][f"rerank_in_select_exact_k{k}"] = torch.equal(
            index_topk_rerank(iq4, iv, iq, ik, k, 2 * k, lo=3, hi=L - 10), want2)
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
        for n in (512, 4096):
            assert torch.equal(index_topk(b["q_fp4"], b["fp4"], n), index_topk_torch(b["q_fp4"], b["fp4"], n))
    if not all(out["checks"][f"fused_rerank_equal_k{k}"] for k in (64, 300)):
        fp4_topk.FUSED_RERANK = False
    if not all(out["checks"][f"rerank_in_select_exact_k{k}"] for k in (64, 300)):
        print("the rerank inside the select differs from the twin: switched off")
        fp4_topk.RERANK_IN_SELECT = False
    out["checks"]["mxfp4_topk_bit_exact"] = True
    out["checks"]["rerank_exact_k300"] = out["checks"]["rerank_equal_k300"] == 1.0
    print("checks:", out["checks"])


PRODUCT_PATHS = {"f32": (False, False), "half2": (False, True), "dp4a": (True, False)}  # (MXFP4_DP4A, PACKED_HALF)


def _monotone_set(R, L, device):
    """MXFP4 keys whose scores rise with position: scores cluster, so the threshold select's candidates
    overflow its buffer and the row's last program selects from all scores (the exact fallback)."""
    v = torch.randn(128, device=device)
    k = torch.linspace(0.1, 4.0, L, device=device).view(1, L, 1) * v + 0.01 * torch.randn(R, L, 128, device=device)
    qt = quantize_mxfp4(k, MX)
    q = quantize_mxfp4(v.expand(R, 128).contiguous(), MX).dequantize()
    return q, KeyCacheView(KeyFormat.MXFP4, qt.data, qt.scale, fp4_config=MX)


def check_threshold(device, out: dict, s: dict) -> None:
    """The threshold select against the twin: every tier (registers, chunked, overflow), every format, under
    graph capture, twice in a row (its workspace must come back zero)."""
    keep = fp4_topk.SELECT_METHOD
    fp4_topk.SELECT_METHOD = fp4_topk.SelectMethod.THRESHOLD
    ok = True
    try:
        for n in (64, 1000, 2000) if device.type == "cuda" else (20, 100):  # the register tier (the big set in `check` reaches the chunked one)
            for _ in range(2):
                ok &= torch.equal(index_topk(s["q_fp4"], s["fp4"], n, lo=1), index_topk_torch(s["q_fp4"], s["fp4"],
                                                                                               n, lo=1))
        hi = s["keys"].shape[1] - 7
        for fmt in ("bf16", "fp8"):  # exact top-n of the kernel's own scores
            sc = bits_to_bf16(index_score_bits(s["q"], s[fmt])[:, 5:hi]).float()
            want = (fp4_topk.topk_order_torch(sc, 30) + 5).sort(-1).values
            ok &= torch.equal(index_topk(s["q"], s[fmt], 30, lo=5, hi=hi), want)
        q, view = _monotone_set(2, 20000 if device.type == "cuda" else 600, device)
        ok &= torch.equal(index_topk(q, view, 256), index_topk_torch(q, view, 256))
        out["checks"]["threshold_overflow_equal"] = bool(ok)
        if device.type == "cuda":
            g = torch.cuda.CUDAGraph()
            res = {}
            with torch.cuda.graph(g):
                res["t"] = index_topk(s["q_fp4"], s["fp4"], 1000, lo=1)
            g.replay()
            torch.cuda.synchronize()
            ok &= torch.equal(res["t"], index_topk_torch(s["q_fp4"], s["fp4"], 1000, lo=1))
        zero = all(int(b.abs().sum()) == 0 for b in fp4_topk._STREAM_BUFFERS.values())
        out["checks"]["threshold_workspace_zero"] = zero
        ok &= zero
    except Exception as e:  # noqa: BLE001 - a path that fails on the device is reported and left off
        print(f"threshold select: {type(e).__name__}: {str(e)[:500]}")
        ok = False
    out["checks"]["threshold_select_equal"] = bool(ok)
    print(f"threshold select equal to the twin (all tiers, graph): {bool(ok)}")
    fp4_topk.SELECT_METHOD = keep


def _select_alone(m, n, method):
    """The select kernels alone on fixed scores m [R, n_out] (and group maxima): what the select costs."""
    R, n_out = m.shape
    if method == "threshold":
        block_t = 128
        group = fp4_topk._group_size(n, n_out, block_t)
        mx = m.view(R, -1, group).amax(-1).contiguous()
        M = mx.shape[1]
        block, warps_c = fp4_topk.THRESH_BLOCK
        n_tiles = triton.cdiv(n_out, block)
        ws = fp4_topk._stream_buffer(m.device, "threshold", R, 4 + triton.next_power_of_2(n_tiles))
        cap = triton.next_power_of_2(fp4_topk.CAND_PER_N * n)
        cu = torch.empty(R, cap, dtype=torch.int32, device=m.device)
        cp = torch.empty_like(cu)
        out = torch.empty(R, n, dtype=torch.int64, device=m.device)
        bm = min(triton.next_power_of_2(M), 8192)

        def run():
            fp4_topk._fp4_topk.maxima_threshold_kernel[(R,)](mx, ws, M, n, mx.stride(0), ws.stride(0), BLOCK=bm,
                                                             CHUNKED=M > bm, STEP=fp4_topk.THRESH_SEARCH_STEP,
                                                             num_warps=4 if bm <= 1024 else (8 if bm <= 4096 else 16))
            fp4_topk._fp4_topk.compact_select_kernel[(R, n_tiles)](
                m, ws, cu, cp, out, m.stride(0), ws.stride(0), cu.stride(0), out.stride(0), n_out, n, n_tiles, cap,
                BLOCK=block, TILES=triton.next_power_of_2(n_tiles), FB=min(cap, fp4_topk.THRESH_REGISTERS), CH=4096,
                STEP=fp4_topk.THRESH_SEARCH_STEP, PHASE=0, MAX_SPINS=fp4_topk._MAX_SPINS, num_warps=warps_c)
            return out
        return run
    ws = fp4_topk._select_ws(m.device, R, n_out)
    return lambda: fp4_topk._radix_select(m, ws, n, False)


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
    """SASS of the chosen MXFP4 scan kernel (float32 and dp4a products): instruction counts per opcode, the
    listing to out_dir. What the decode costs per element, read off the machine code."""
    from triton.tools.disasm import get_sass

    view, q = s["fp4"], s["q_fp4"]
    block_t, warps, iters, n_out = fp4_topk._scan_tile(view)
    ws = torch.zeros(view.rows, 512, dtype=torch.int32, device=q.device)
    m = torch.empty(view.rows, n_out, dtype=torch.int16, device=q.device)
    out["sass"] = {}
    keep = fp4_topk.MXFP4_DP4A, fp4_topk.MXFP4_PACKED_HALF
    for path in ("f32", "dp4a"):
        fp4_topk.MXFP4_DP4A, fp4_topk.MXFP4_PACKED_HALF = PRODUCT_PATHS[path]
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
        out["sass"][path] = {"elements_per_thread_per_tile": elements, "n_regs": k.n_regs,
                                                     "blocks": blocks}
        print(f"SASS {path}: {k.n_regs} regs, {elements} elements per thread and tile; basic blocks:")
        for blk in blocks:
            top = sorted(blk["ops"].items(), key=lambda x: -x[1])[:10]
            print(f"  {blk['label']}: {blk['count']} instr ({blk['count'] / elements:.2f} per element) "
                  + ", ".join(f"{o} {c}" for o, c in top))
        if out_dir:
            pathlib.Path(out_dir, f"scan_mxfp4_{path}.sass").write_text(sass)
    fp4_topk.MXFP4_DP4A, fp4_topk.MXFP4_PACKED_HALF = keep


def sweep_tiles(device, out: dict, bw: float) -> None:
    """Scan kernel alone at L = 128K, batch 8: pick the tile and the MXFP4 product path (dp4a, packed half2 or
    float32); then the select (radix, or threshold with its knobs) on single-stage FP8 and FP4 selections at
    batch 1 and 8, the select kernels alone, and the rerank's variants. Every variant is recorded."""
    sets = [make_keys(8, 131072, device) for _ in range(2)]
    out["tile_sweep"] = []
    per_key = {"bf16": 2 * D, "fp8": D + 4, "fp4": D // 2 + D // 32}
    variants = [("bf16", "bf16", None, 128, 4, 1)]
    variants += [("fp8", "fp8", None, t, w, i) for t, w, i in ((128, 4, 4), (256, 4, 2))]
    variants += [("fp4", "mxfp4", "dp4a", t, w, i)
                 for t, w, i in ((128, 4, 1), (128, 4, 4), (256, 4, 2), (256, 8, 4), (512, 8, 2), (64, 4, 8))]
    variants += [("fp4", "mxfp4", "f32", 128, 4, 1), ("fp4", "mxfp4", "half2", 128, 4, 8)]
    variants += [("fp4", "mxfp4", "dp4a-persistent", 128, 4, 1)]  # iters unused: the programs stride
    best = {}
    for fmt, name, path, block_t, warps, iters in variants:
        persistent = path is not None and path.endswith("-persistent")
        path = path.removesuffix("-persistent") if path else path
        if path is not None and not out["checks"].get(f"mxfp4_{path}_scores_bit_exact"):
            continue
        fp4_topk.SCAN_PERSISTENT[name] = persistent
        if persistent:
            fp4_topk.SCAN_PERSISTENT_TILE[name] = (block_t, warps)
        fp4_topk.SCAN_TILE[name] = (block_t, warps, iters)
        fp4_topk.MXFP4_DP4A, fp4_topk.MXFP4_PACKED_HALF = PRODUCT_PATHS[path or "f32"]
        try:
            t = _time_scan(sets, fmt)
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is reported, not fatal
            print(f"scan {fmt} {path} {block_t}x{warps}x{iters}: {type(e).__name__}: {str(e)[:200]}")
            continue
        nbytes = 8 * 131072 * (per_key[fmt] + 2)
        row = {"format": fmt, "products": path, "persistent": persistent, "block_t": block_t, "warps": warps,
               "iters": iters, **t, "roofline_us": nbytes / bw * 1e6}
        out["tile_sweep"].append(row)
        print(f"scan {fmt:4s} {path}{' persistent' if persistent else ''} tile {block_t}x{warps}x{iters}: "
              f"{t['median_us']:.1f} us (roofline {row['roofline_us']:.1f})")
        if fmt not in best or t["median_us"] < best[fmt][0]:
            best[fmt] = (t["median_us"], name, path, block_t, warps, iters, persistent)
    for fmt, (_, name, path, block_t, warps, iters, persistent) in best.items():
        fp4_topk.SCAN_PERSISTENT[name] = persistent
        if persistent:
            fp4_topk.SCAN_PERSISTENT_TILE[name] = (block_t, warps)
        else:
            fp4_topk.SCAN_TILE[name] = (block_t, warps, iters)
        if fmt == "fp4":
            fp4_topk.MXFP4_DP4A, fp4_topk.MXFP4_PACKED_HALF = PRODUCT_PATHS[path]
    del sets
    # the select: radix (the fused one-launch kernel) against the threshold select and its knobs
    out["select_sweep"] = []
    configs = [("radix", None, None, None)]
    if out["checks"].get("threshold_select_equal"):
        configs += [("threshold", blk, regs, step) for blk, regs in (((2048, 8), 4096), ((4096, 8), 4096),
                                                                     ((2048, 16), 8192)) for step in (4, 1)]
    total = {}
    for B in (1, 8):
        bsets = [make_keys(B, 131072, device) for _ in range(4 if B == 1 else 2)]
        for cfg in configs:
            method, blk, regs, step = cfg
            fp4_topk.SELECT_METHOD = fp4_topk.SelectMethod(method)
            if blk:
                fp4_topk.THRESH_BLOCK, fp4_topk.THRESH_REGISTERS, fp4_topk.THRESH_SEARCH_STEP = blk, regs, step
            for fmt in ("fp8", "fp4"):
                for n in (512, 4096):
                    q = "q_fp4" if fmt == "fp4" else "q"
                    fns = [(lambda s=s, q=q, fmt=fmt, n=n: index_topk(s[q], s[fmt], n)) for s in bsets]
                    try:
                        t = time_fn(None, cycle=fns, reps=60)
                    except Exception as e:  # noqa: BLE001
                        print(f"select {cfg}: {type(e).__name__}: {str(e)[:300]}")
                        total[cfg] = float("inf")
                        continue
                    out["select_sweep"].append({"batch": B, "format": fmt, "n": n, "method": method,
                                                "thresh_block": blk, "thresh_registers": regs, "search_step": step,
                                                **t})
                    print(f"select B={B} {fmt} n={n} {method} {blk} {regs} step {step}: {t['median_us']:.1f} us")
                    total[cfg] = total.get(cfg, 0.0) + t["median_us"]
        del bsets
    method, blk, regs, step = min(total, key=total.get)
    fp4_topk.SELECT_METHOD = fp4_topk.SelectMethod(method)
    if blk:
        fp4_topk.THRESH_BLOCK, fp4_topk.THRESH_REGISTERS, fp4_topk.THRESH_SEARCH_STEP = blk, regs, step
    # the select kernels alone on fixed scores (what the select costs without the scan)
    out["select_alone"] = []
    for B in (1, 8):
        s = make_keys(B, 131072, device)
        m = _scan_only(s["q_fp4"], s["fp4"])
        for n in (512, 4096):
            for how, step in (("radix", None), ("threshold", 4), ("threshold", 1)):
                if how == "threshold" and not out["checks"].get("threshold_select_equal"):
                    continue
                keep_step = fp4_topk.THRESH_SEARCH_STEP
                fp4_topk.THRESH_SEARCH_STEP = step or keep_step
                t = time_fn(_select_alone(m, n, how), reps=100)
                fp4_topk.THRESH_SEARCH_STEP = keep_step
                out["select_alone"].append({"batch": B, "n": n, "method": how, "search_step": step, **t})
                print(f"select alone B={B} n={n} {how} step {step}: {t['median_us']:.1f} us")
        del s, m
    # the rerank: one launch or two; bitwise, byte-radix or 4-bit-digit k-th-key search (two-stage FP4)
    rr = {}
    for B in (1, 8):
        bsets = [make_keys(B, 131072, device) for _ in range(4 if B == 1 else 2)]
        for fused_rr in (False, True):
            for radix, digits in ((False, False), (False, True)):
                fp4_topk.FUSED_RERANK, fp4_topk.RERANK_BYTE_RADIX, fp4_topk.RERANK_DIGITS = fused_rr, radix, digits
                for k in (256, 2048):
                    t = time_fn(None, cycle=[selection("fp4_2stage_split", s, k) for s in bsets], reps=60)
                    rr[(fused_rr, radix, digits)] = rr.get((fused_rr, radix, digits), 0.0) + t["median_us"]
                    out["select_sweep"].append({"batch": B, "method": "fp4_2stage", "k": k, "fused_rerank": fused_rr,
                                                "byte_radix": radix, "digits": digits, **t})
                    print(f"two-stage B={B} k={k} fused_rerank={fused_rr} digits={digits}: {t['median_us']:.1f} us")
        del bsets
    fp4_topk.FUSED_RERANK, fp4_topk.RERANK_BYTE_RADIX, fp4_topk.RERANK_DIGITS = min(rr, key=rr.get)
    out["scan_config"] = {"tile": dict(fp4_topk.SCAN_TILE), "persistent": dict(fp4_topk.SCAN_PERSISTENT),
                          "persistent_tile": dict(fp4_topk.SCAN_PERSISTENT_TILE), "mxfp4_dp4a": fp4_topk.MXFP4_DP4A,
                          "mxfp4_packed_half": fp4_topk.MXFP4_PACKED_HALF,
                          "select_method": fp4_topk.SELECT_METHOD.value, "thresh_block": fp4_topk.THRESH_BLOCK,
                          "thresh_registers": fp4_topk.THRESH_REGISTERS,
                          "thresh_search_step": fp4_topk.THRESH_SEARCH_STEP, "fused_select": fp4_topk.FUSED_SELECT,
                          "coarse_hist": fp4_topk.COARSE_HIST.value, "fused_rerank": fp4_topk.FUSED_RERANK,
                          "rerank_byte_radix": fp4_topk.RERANK_BYTE_RADIX, "rerank_digits": fp4_topk.RERANK_DIGITS}
    print("chosen:", out["scan_config"])
    torch.cuda.empty_cache()


def apply_config(cfg: dict, out: dict) -> None:
    """Use the knobs a sweep chose (those the on-device checks passed)."""
    fp4_topk.SCAN_TILE.update({k: tuple(v) for k, v in cfg["tile"].items()})
    fp4_topk.SCAN_PERSISTENT.update(cfg.get("persistent", {}))  # a config from before the persistent scan: defaults
    fp4_topk.SCAN_PERSISTENT_TILE.update({k: tuple(v) for k, v in cfg.get("persistent_tile", {}).items()})
    fp4_topk.MXFP4_DP4A = cfg["mxfp4_dp4a"] and out["checks"]["mxfp4_dp4a_scores_bit_exact"]
    fp4_topk.MXFP4_PACKED_HALF = cfg["mxfp4_packed_half"] and out["checks"]["mxfp4_half2_scores_bit_exact"]
    threshold = cfg["select_method"] == "threshold" and out["checks"]["threshold_select_equal"]
    fp4_topk.SELECT_METHOD = fp4_topk.SelectMethod.THRESHOLD if threshold else fp4_topk.SelectMethod.RADIX
    fp4_topk.THRESH_BLOCK, fp4_topk.THRESH_REGISTERS = tuple(cfg["thresh_block"]), cfg["thresh_registers"]
    fp4_topk.THRESH_SEARCH_STEP = cfg.get("thresh_search_step", 4)
    fp4_topk.FUSED_RERANK, fp4_topk.RERANK_BYTE_RADIX = cfg["fused_rerank"], cfg["rerank_byte_radix"]
    fp4_topk.RERANK_DIGITS = cfg["rerank_digits"]
    out["scan_config"] = dict(cfg, applied_from="--config")
    print("config:", out["scan_config"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, no timing (CPU interpreter check)")
    p.add_argument("--sass-dir", default=None, help="write the MXFP4 scan kernel's SASS here")
    p.add_argument("--sweep-only", action="store_true", help="checks and the scan / select sweeps, no table")
    p.add_argument("--config", default=None, help="a results JSON whose scan_config to use instead of sweeping")
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
    methods = ["torch_bf16", "bf16", "fp8", "fp4", "fp4_2stage", "fp4_2stage_split"]
    out["rerank_in_select"] = fp4_topk.RERANK_IN_SELECT
    if args.config:
        apply_config(json.loads(pathlib.Path(args.config).read_text())["scan_config"], out)
    else:
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
                        t = time_fn(None, cycle=fns, reps=100)
                        mode = "graph"
                    except Exception as e:  # noqa: BLE001 - report and fall back to eager timing
                        print(f"graph capture failed for {m}: {type(e).__name__}: {e}")
                        t = time_fn(None, cycle=fns, reps=100, graph=False)
                        mode = "eager"
                    te = time_fn(None, cycle=fns, reps=30, graph=False)
                    tb = time_fn(None, cycle=fns, reps=100, per_graph=max(len(fns), 16)) if mode == "graph" else {}
                    nbytes = bytes_moved(m, B, L, k)
                    row = {"L": L, "batch": B, "k": k, "method": m, "mode": mode, **t,
                           "eager_median_us": te["median_us"], "back_to_back_median_us": tb.get("median_us"),
                           "back_to_back_p10_us": tb.get("p10_us"), "back_to_back_p90_us": tb.get("p90_us"),
                           "per_graph": tb.get("per_graph"), "bytes": nbytes, "roofline_us": nbytes / bw * 1e6}
                    out["rows"].append(row)
                    print(f"L={L:6d} B={B} k={k:4d} {m:11s} {t['median_us']:8.1f} us (eager {te['median_us']:7.1f}, "
                          f"back to back {tb.get('median_us', float('nan')):7.1f})  roofline {row['roofline_us']:6.1f} us")
            del sets
            torch.cuda.empty_cache()
    if not methods:
        _save(out, args.out)
        return
    print("\n| L | batch | k | torch bf16 | bf16 | fp8 | fp4 | fp4 two-stage | two-stage, two calls | fp8 / fp4 two-stage |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for L in (32768, 65536, 131072):
        for B in (1, 8):
            for k in (256, 2048):
                r = {x["method"]: x for x in out["rows"] if (x["L"], x["batch"], x["k"]) == (L, B, k)}
                cells = [f"{r[m]['median_us']:.1f} ({r[m]['roofline_us']:.1f})" for m in methods]
                ratio = r["fp8"]["median_us"] / r["fp4_2stage"]["median_us"]
                print(f"| {L // 1024}K | {B} | {k} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    print("\nback to back (per selection, many in one graph):")
    print("| L | batch | k | torch bf16 | bf16 | fp8 | fp4 | fp4 two-stage | two-stage, two calls | fp8 / fp4 "
          "| fp8 / fp4 two-stage |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for L in (32768, 65536, 131072):
        for B in (1, 8):
            for k in (256, 2048):
                r = {x["method"]: x for x in out["rows"] if (x["L"], x["batch"], x["k"]) == (L, B, k)}
                if any(r[m]["back_to_back_median_us"] is None for m in methods):
                    continue
                cells = [f"{r[m]['back_to_back_median_us']:.1f}" for m in methods]
                one = r["fp8"]["back_to_back_median_us"] / r["fp4"]["back_to_back_median_us"]
                two = r["fp8"]["back_to_back_median_us"] / r["fp4_2stage"]["back_to_back_median_us"]
                print(f"| {L // 1024}K | {B} | {k} | " + " | ".join(cells) + f" | {one:.2f}x | {two:.2f}x |")
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
