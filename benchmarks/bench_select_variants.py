"""Where the selection's time goes after the scan: the radix select's settings, end to end.

    python benchmarks/bench_select_variants.py [--out benchmarks/results/select_variants_h100.json] [--quick]
    python benchmarks/bench_select_variants.py --ncu-target      # a few selections with the defaults, for ncu
    python benchmarks/bench_select_variants.py --floors --out benchmarks/results/select_floors_h100.json
                                 # our select and rerank alone beside torch.topk and a launch on the same scores

A selection is scan + select (+ rerank). This script times whole selections (`bench_sparse_select.selection`:
bf16, FP8 and MXFP4 keys single stage, and the two-stage FP4 path) back to back in one CUDA graph (key sets cycled
so L2 never holds the keys; `bench_sparse_select.time_fn(per_graph=...)`): first with the library's defaults, then
under each combination of

- where the coarse (high-byte) histogram is built, for every format at once: in the fused select
  (`CoarseHist.FUSED`, a 256-bin `tl.histogram` over every score) or in the scan (`CoarseHist.SCAN`: the tiled
  scan adds one per tile with atomics; the persistent scan one per tile in registers, flushed once per program);
- the fused select's (positions per program, warps) (`fp4_topk.FUSED_BLOCKS`; a block whose grid does not fit
  on the device at once falls back to the unfused passes).

Besides, the scan alone (with and without its histogram) and the select alone on fixed scores, so the table can
say what each part costs. Every setting's selection is compared with the defaults' before it is timed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import time

import torch

import bench_sparse_select as bss
from fp4kit.kernels import fp4_topk

PER_KEY = {"fp8": bss.D + 4, "fp4": bss.D // 2 + bss.D // 32}


def _set(place: str, block: tuple) -> None:
    """One setting for every key format."""
    fp4_topk.COARSE_HIST, fp4_topk.COARSE_HIST_FORMAT = fp4_topk.CoarseHist[place], {}
    fp4_topk.FUSED_BLOCKS = (block,)


def _sets(R: int, L: int, device) -> list:
    n = max(2, -(-2 * bss.L2_BYTES // (R * L * PER_KEY["fp4"])))
    return [bss.make_keys(R, L, device) for _ in range(min(n, 16))]


def _time(fns) -> float:
    return bss.time_fn(None, cycle=fns, reps=100, per_graph=max(len(fns), 16))["median_us"]


def _floors(dev, out_path) -> None:
    """What the select and the rerank cost against what a tuned CUDA select costs on the same data: issue 10's
    1.6x needs 0.6 S + 1.6 R <= ~6 us (S the shared select, R the rerank) with both scans at their measured speed,
    so the question is whether any select reaches a few microseconds at 8 x 128K."""
    out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "rows": []}
    for R, L in [(8, 131072), (1, 131072), (8, 32768)]:
        s = bss.make_keys(R, L, dev)
        m = bss._scan_only(s["q_fp4"], s["fp4"])  # int16 score bits, as the select reads them
        bf = fp4_topk.bits_to_bf16(m)
        cand = fp4_topk.index_topk(s["q_fp4"], s["fp4"], 512)
        parts = {
            "select_alone_n512 (ours, fused radix)": bss._select_alone(m, 512, "radix"),
            "select_alone_n256 (ours, fused radix)": bss._select_alone(m, 256, "radix"),
            "torch.topk int16 k=512 sorted=False": lambda: torch.topk(m, 512, sorted=False),
            "torch.topk bf16 k=512 sorted=False": lambda: torch.topk(bf, 512, sorted=False),
            "torch.topk bf16 k=256 sorted=False": lambda: torch.topk(bf, 256, sorted=False),
            "read the scores once (amax)": lambda: m.amax(-1),
            "rerank launch alone 512 -> 256 (ours)": lambda: fp4_topk.rerank_topk(s["q"], s["keys"],
                                                                                   cand, 256),
            "empty-ish launch (zero_ of 1 element)": (lambda z=torch.zeros(1, device=dev): z.zero_()),
        }
        for name, fn in parts.items():
            us = _time([fn])
            out["rows"].append({"R": R, "L": L, "part": name, "us": us})
            print(f"{R} x {L}: {name}: {us:.1f} us")
        got = torch.topk(m.int(), 512, sorted=False).values.sort(-1).values
        want = m.gather(1, cand.clamp_min(0)).int().sort(-1).values
        out["rows"].append({"R": R, "L": L, "check": "torch.topk values equal ours", "ok": bool(torch.equal(got, want))})
        print("torch.topk's 512 values equal our candidates':", bool(torch.equal(got, want)))
        del s, m, bf, cand
    if out_path:
        pathlib.Path(out_path).write_text(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true", help="8 x 128K only")
    ap.add_argument("--ncu-target", action="store_true")
    ap.add_argument("--rerank", action="store_true",
                    help="only the two-stage launch's last-program k-of-n: the 32-step search against one sort")
    ap.add_argument("--floors", action="store_true",
                    help="only the parts after the scan against outside references: our select alone, torch.topk "
                         "(CUDA radix select with shared-memory atomics) on the same scores, a plain read of them, "
                         "and the rerank launch alone")
    a = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    base = (fp4_topk.COARSE_HIST, dict(fp4_topk.COARSE_HIST_FORMAT), fp4_topk.FUSED_BLOCKS)

    def restore():
        fp4_topk.COARSE_HIST, fp4_topk.COARSE_HIST_FORMAT, fp4_topk.FUSED_BLOCKS = base[0], dict(base[1]), base[2]

    if a.ncu_target:
        s = bss.make_keys(8, 131072, dev)
        for _ in range(3):
            bss.selection("fp8", s, 512)()
            bss.selection("fp4_2stage", s, 256)()
        torch.cuda.synchronize()
        return
    if a.rerank:
        out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "rows": [], "checks": {}}
        for (R, L), k in itertools.product([(8, 131072), (1, 131072), (8, 32768), (1, 32768)], (64, 128, 256)):
            sets = _sets(R, L, dev)
            got = {}
            for sort in (False, True):
                fp4_topk.RERANK_IN_SELECT_SORT = sort
                got[sort] = bss.selection("fp4_2stage", sets[0], k)().clone()
                us = _time([bss.selection("fp4_2stage", s, k) for s in sets])
                out["rows"].append({"R": R, "L": L, "k": k, "sort": sort, "us": us})
                print(f"{R} x {L} two-stage k={k} sort={sort}: {us:.1f} us")
            fp4_topk.RERANK_IN_SELECT_SORT = False
            out["checks"][f"{R}x{L}_k{k}"] = bool(torch.equal(got[False], got[True]))
            del sets
        print("equal:", all(out["checks"].values()))
        if a.out:
            pathlib.Path(a.out).write_text(json.dumps(out, indent=1))
        return
    if a.floors:
        _floors(dev, a.out)
        return
    bw = bss.copy_bandwidth(dev)
    out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "copy_GBps": bw / 1e9,
           "rows": [], "parts": [], "checks": {}}
    print(f"{out['device']}: copy {bw / 1e9:.0f} GB/s")
    shapes = [(8, 131072)] if a.quick else [(8, 131072), (1, 131072), (8, 32768)]
    blocks = [(1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8)]
    cases = [("bf16", 512), ("fp8", 512), ("fp4", 512), ("fp4_2stage", 256), ("fp8", 4096), ("fp4", 4096)]
    for R, L in shapes:
        sets = _sets(R, L, dev)
        for fmt in ("fp8", "fp4"):  # the scan alone, with and without the coarse histogram
            for hist in (False, True):
                def scan(s, fmt=fmt, hist=hist):
                    view, q = s[fmt], s["q_fp4" if fmt == "fp4" else "q"]
                    block_t, warps, iters, n_out = fp4_topk._scan_tile(view)
                    ws = torch.zeros(R, 512, dtype=torch.int32, device=dev)
                    return fp4_topk._scan(q, view, 0, L, ws, n_out, block_t, warps, iters, hist)
                us = _time([lambda s=s: scan(s) for s in sets])
                out["parts"].append({"R": R, "L": L, "part": f"scan_{fmt}", "hist": hist, "us": us})
                print(f"{R} x {L}: scan {fmt} hist={hist}: {us:.1f} us")
        m = bss._scan_only(sets[0]["q_fp4"], sets[0]["fp4"])
        for block, n in itertools.product(blocks, (512, 4096)):  # the fused select alone on fixed scores
            _set("FUSED", block)
            try:
                us = _time([bss._select_alone(m, n, "radix")])
            except Exception as e:  # noqa: BLE001 - a setting that fails on the device is reported and skipped
                print(f"select alone {block}: {type(e).__name__}: {str(e)[:200]}")
                continue
            out["parts"].append({"R": R, "L": L, "part": "select_alone", "block": block, "n": n, "us": us})
            print(f"{R} x {L}: select alone n={n} block={block}: {us:.1f} us")
        restore()
        want = {(meth, n): bss.selection(meth, sets[0], n)().clone() for meth, n in cases}
        for meth, n in cases:
            us = _time([bss.selection(meth, s, n) for s in sets])
            out["rows"].append({"R": R, "L": L, "method": meth, "n_or_k": n, "setting": "default", "us": us})
            print(f"{R} x {L} {meth:10s} {n:4d} library default: {us:.1f} us")
        for place, block in itertools.product(("FUSED", "SCAN"), blocks):
            _set(place, block)
            for meth, n in cases:
                try:
                    ok = bool(torch.equal(bss.selection(meth, sets[0], n)(), want[(meth, n)]))
                    us = _time([bss.selection(meth, s, n) for s in sets])
                except Exception as e:  # noqa: BLE001
                    print(f"{meth} {place} {block}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                out["rows"].append({"R": R, "L": L, "method": meth, "n_or_k": n, "setting": "sweep", "coarse": place,
                                    "block": block, "equal_to_default": ok, "us": us})
                out["checks"][f"{R}x{L}_{meth}_{n}_{place}_{block}"] = ok
                print(f"{R} x {L} {meth:10s} {n:4d} coarse={place:5s} block={block} equal={ok}: {us:.1f} us")
            restore()
        del sets, m
        torch.cuda.empty_cache()
    print("\nlibrary default against the best setting per case (us):")
    for R, L in shapes:
        for meth, n in cases:
            rs = [r for r in out["rows"] if (r["R"], r["L"], r["method"], r["n_or_k"]) == (R, L, meth, n)]
            d = [r for r in rs if r["setting"] == "default"]
            sw = [r for r in rs if r["setting"] == "sweep" and r["equal_to_default"]]
            if d and sw:
                b = min(sw, key=lambda r: r["us"])
                print(f"{R} x {L} {meth:10s} {n:4d}: default {d[0]['us']:.1f}, best {b['us']:.1f} "
                      f"(coarse {b['coarse']}, block {b['block']})")
    if a.out:
        p = pathlib.Path(a.out)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(p)


if __name__ == "__main__":
    main()
