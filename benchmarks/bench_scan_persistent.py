"""The index scan alone, one program per ITERS tiles (`index_score_kernel`) against the persistent scan
(`index_scan_kernel`: a few programs per SM stride over the tiles and load the next tile before scoring this one).

    python benchmarks/bench_scan_persistent.py [--out benchmarks/results/scan_persistent_h100.json] [--quick]

bf16, FP8 and MXFP4 (dp4a) keys, head dim 128, rows x keys in (8 x 128K, 1 x 128K, 8 x 32K); GPU time of CUDA
graph replays (median of 100 after warm-up; one scan per replay, and many back to back in one graph, per scan),
key sets cycled so L2 never holds them (`bench_sparse_select`'s timing); roofline = keys + 2-byte scores written, over the copy bandwidth measured in the same run. Both kernels'
scores are compared bit for bit before any timing. A sweep of the persistent scan's programs per SM and tile picks
the setting the library should use (`fp4_topk.SCAN_PERSISTENT*`); `--ncu-target` runs only the chosen kernels a few times, for `ncu`.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch

import bench_sparse_select as bss
from fp4kit.kernels import fp4_topk

PER_KEY = {"bf16": 2 * bss.D, "fp8": bss.D + 4, "fp4": bss.D // 2 + bss.D // 32}
NAME = {"bf16": "bf16", "fp8": "fp8", "fp4": "mxfp4"}


def scan(s, fmt):
    return bss._scan_only(s["q_fp4"] if fmt == "fp4" else s["q"], s[fmt])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true", help="8 x 128K only")
    ap.add_argument("--regs", action="store_true", help="sweep register caps of the persistent MXFP4 scan")
    ap.add_argument("--ncu-target", action="store_true", help="run each scan 5 times at 8 x 128K and stop")
    a = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    fp4_topk.MXFP4_DP4A, fp4_topk.MXFP4_PACKED_HALF = True, False
    if a.ncu_target:
        s = bss.make_keys(8, 131072, dev)
        for persistent in (False, True):
            fp4_topk.SCAN_PERSISTENT.update(fp8=persistent, mxfp4=persistent)
            for fmt in ("fp8", "fp4"):
                for _ in range(5):
                    scan(s, fmt)
        torch.cuda.synchronize()
        return
    bw = bss.copy_bandwidth(dev)
    out = {"device": torch.cuda.get_device_name(), "copy_GBps": bw / 1e9, "checks": {}, "rows": []}
    print(f"{out['device']}: copy {bw / 1e9:.0f} GB/s")
    shapes = [(8, 131072)] if a.quick else [(8, 131072), (1, 131072), (8, 32768)]
    base_tile = dict(fp4_topk.SCAN_TILE)
    base_persistent, base_ptile = dict(fp4_topk.SCAN_PERSISTENT), dict(fp4_topk.SCAN_PERSISTENT_TILE)
    for R, L in shapes:
        sets = [bss.make_keys(R, L, dev) for _ in range(max(2, -(-150 * 2**20 // (R * L * PER_KEY['fp4']))))]
        for fmt in ("bf16", "fp8", "fp4"):
            name = NAME[fmt]
            roof = R * L * (PER_KEY[fmt] + 2) / bw * 1e6
            fp4_topk.SCAN_PERSISTENT[name] = False
            ref = scan(sets[0], fmt).clone()
            variants = [("tiled", base_tile[name], None, None)]
            if a.regs:  # register caps for the persistent MXFP4 scan (programs per SM follow from them)
                if fmt == "fp4":
                    variants += [("persistent", t, None, r) for t in ((128, 4), (128, 2), (256, 8), (64, 2))
                                 for r in (None, 112, 96, 80, 64)]
            else:
                tiles = [(128, 4), (256, 8), (64, 4)] if fmt == "fp4" else [(128, 4), (64, 4)]
                variants += [("persistent", t, pp, None) for t in tiles
                             for pp in ((None, 2, 8) if fmt == "fp4" else (None,))]
            for kernel, tile, pp, regs in variants:
                fp4_topk.SCAN_PERSISTENT[name] = kernel == "persistent"
                if kernel == "persistent":
                    fp4_topk.SCAN_PERSISTENT_TILE[name] = tile
                    fp4_topk.SCAN_PROGRAMS_PER_SM[name] = pp
                    fp4_topk.SCAN_MAXNREG[name] = regs
                try:
                    got = scan(sets[0], fmt)
                except Exception as e:  # noqa: BLE001 - a variant that does not compile is reported
                    print(f"{R}x{L} {fmt} {kernel} {tile} pp {pp}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                same = torch.equal(got[:, :L], ref[:, :L]) and bool((got[:, L:] == -32768).all())
                out["checks"][f"{R}x{L}_{fmt}_{kernel}_{tile}_pp{pp}_regs{regs}_bit_exact"] = same
                if not same:
                    print(f"{R}x{L} {fmt} {kernel} {tile} pp {pp}: NOT bit-exact; not timed")
                    continue
                fns = [(lambda s=s: scan(s, fmt)) for s in sets]
                t = bss.time_fn(None, cycle=fns, reps=100)
                tb = bss.time_fn(None, cycle=fns, reps=100, per_graph=max(len(fns), 16))
                row = {"R": R, "L": L, "format": fmt, "kernel": kernel, "tile": list(tile), "programs_per_sm": pp,
                       "maxnreg": regs,
                       **t, "back_to_back_median_us": tb["median_us"], "back_to_back_p10_us": tb["p10_us"],
                       "back_to_back_p90_us": tb["p90_us"], "roofline_us": roof}
                out["rows"].append(row)
                print(f"{R}x{L} {fmt:4s} {kernel:10s} {str(tile):14s} pp {str(pp):4s} regs {str(regs):4s}: one replay "
                      f"{t['median_us']:6.1f} us, back to back {tb['median_us']:6.1f} us "
                      f"({roof / tb['median_us']:.0%} of roofline {roof:.1f})")
            fp4_topk.SCAN_PERSISTENT[name] = base_persistent[name]
            fp4_topk.SCAN_PERSISTENT_TILE[name] = base_ptile[name]
            fp4_topk.SCAN_PROGRAMS_PER_SM[name] = None
            fp4_topk.SCAN_MAXNREG[name] = None
        del sets
    if a.out:
        pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
