"""Decode attention (one query token per row, split-KV) over a bf16 or FP8 cache: time and roofline.

    python benchmarks/bench_decode_attention.py --out benchmarks/results/decode_attn_h100.json
    python benchmarks/bench_decode_attention.py --sweep ...   # every tile setting at the engine's shapes

The engine's batch-32 decode step spends ~0.7-1.0 ms of ~4.3 in `decode_attention` (the 8B shape: 32 query
heads, 8 KV heads of 128, one call per layer). This times the split kernel plus the combine for one layer,
Llama-3-8B heads, at several batches and cache lengths, GPU time in a CUDA graph that walks NC layer caches
(so L2, 50 MB on the H100, never holds the one being read), median of `do_bench_cudagraph`. Roofline: the
bytes the kernel must read (keys and values of the live prefix, plus the FP8 cache's float32 scale per key
and head) over the copy bandwidth measured in the same run. Each setting is checked against the torch twin
(`decode_attention_torch`) on the device before it is timed.

The settings are `fp4kit.kernels.decode_ops`' module constants (`ATTN_BLOCK_L`, `ATTN_NUM_WARPS`,
`ATTN_NUM_STAGES`, `ATTN_PROGRAMS_PER_SM`, `ATTN_MAXNREG`, `ATTN_SINGLE_SPLIT_WAVES`); the bench sets them, runs, and puts them back. (Commits 2409eef
and c5d78e7 also had `ATTN_FP8_F16` and `ATTN_FP8_PAIRS`, two other decodes of the FP8 codes; measured slower,
removed: BENCHMARKS.md.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPE = dict(Hq=32, Hkv=8, D=128)  # Llama-3-8B attention
KNOBS = ("ATTN_BLOCK_L", "ATTN_NUM_WARPS", "ATTN_NUM_STAGES", "ATTN_PROGRAMS_PER_SM", "ATTN_MAXNREG",
         "ATTN_SINGLE_SPLIT_WAVES")
FP8_KNOBS = ("ATTN_FP8_SINGLE_SPLIT", "ATTN_FP8_SINGLE_SPLIT_LONG")  # (warps, stages, register cap, keys per tile)


def _caches(n: int, B: int, L: int, kv: str, device):
    from fp4kit.nn.kv_cache import quantize_kv_fp8

    Hkv, D = SHAPE["Hkv"], SHAPE["D"]
    out = []
    for _ in range(n):
        k = torch.randn(B, Hkv, L, D, device=device, dtype=torch.bfloat16) * 2
        v = torch.randn(B, Hkv, L, D, device=device, dtype=torch.bfloat16)
        if kv == "fp8":
            (kq, ks), (vq, vs) = quantize_kv_fp8(k), quantize_kv_fp8(v)
            out.append((kq, vq, ks, vs))
        else:
            out.append((k, v, None, None))
    return out


def cache_bytes(B: int, L: int, kv: str) -> int:
    Hkv, D = SHAPE["Hkv"], SHAPE["D"]
    per_key = 2 * D * (1 if kv == "fp8" else 2) + (2 * 4 if kv == "fp8" else 0)
    return B * Hkv * L * per_key


def run_case(B: int, L: int, kv: str, settings: dict, device, bw: float, sweep: bool = False) -> dict:
    import triton

    from fp4kit.kernels import decode_ops

    settings = ({"ATTN_FP8_SINGLE_SPLIT": None, "ATTN_FP8_SINGLE_SPLIT_LONG": None, **settings} if sweep
                else settings)  # a sweep sets every launch
    old = {k: getattr(decode_ops, k) for k in settings}
    try:
        for k, val in settings.items():
            setattr(decode_ops, k, val)
        nbytes = cache_bytes(B, L, kv)
        n = max(2, min(16, -(-200_000_000 // nbytes)))  # >= 200 MB of caches, so L2 holds none of them
        caches = _caches(n, B, L, kv, device)
        q = torch.randn(B, SHAPE["Hq"], SHAPE["D"], device=device, dtype=torch.bfloat16)
        pad = torch.zeros(B, dtype=torch.long, device=device)
        slot = torch.tensor([L - 1], device=device)
        scale = SHAPE["D"] ** -0.5
        k, v, ks, vs = caches[0]  # checked against the twin before it is timed
        got = decode_ops.decode_attention(q, k, v, ks, vs, pad, slot, L, None, scale).float()
        ref = decode_ops.decode_attention_torch(q.float(), k if ks is not None else k.float(),
                                                v if vs is not None else v.float(), ks, vs, pad, slot, L,
                                                None, scale).float()
        err = ((got - ref).abs().max() / ref.abs().max()).item()

        def fn():
            for k, v, ks, vs in caches:
                decode_ops.decode_attention(q, k, v, ks, vs, pad, slot, L, None, scale)

        us = triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3 / n
        roof = nbytes / bw * 1e6
        knobs = {k.lower(): v for k, v in settings.items() if k in KNOBS + FP8_KNOBS}
        return {"batch": B, "kv_len": L, "kv": kv, **knobs,
                "us": us, "roofline_us": roof, "bw_frac": roof / us, "bytes": nbytes, "rel_err_vs_twin": err}
    finally:
        for k, val in old.items():
            setattr(decode_ops, k, val)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="1x8192,8x2048,32x576,32x2048", help="BATCHxKV_LEN, comma separated")
    ap.add_argument("--kv", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    ap.add_argument("--sweep", action="store_true", help="every combination of the grids below, per case")
    ap.add_argument("--block-l", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--pps", type=int, nargs="+", default=[2, 4, 8], help="ATTN_PROGRAMS_PER_SM")
    ap.add_argument("--set", nargs="*", default=[], help="KNOB=VALUE settings for the non-sweep run, e.g. "
                    "ATTN_BLOCK_L=32 ATTN_NUM_STAGES=3 (several runs: separate them with ';' in one argument)")
    ap.add_argument("--maxnreg", type=int, nargs="+", default=[0], help="ATTN_MAXNREG (0: the compiler's choice)")
    ap.add_argument("--single", type=float, nargs="+", default=[0.0], help="ATTN_SINGLE_SPLIT_WAVES")
    ap.add_argument("--fp8-single", nargs="*", default=[], metavar="WARPS,STAGES,BLOCK_L",
                    help="launch settings to try in the FP8 one-split regime (ATTN_FP8_SINGLE_SPLIT, at every "
                    "cache length); each is one more run beside those of --set")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode_attention: needs a CUDA GPU (the kernels fall back to the torch twin elsewhere)")
    from fp4kit.engine.bench import copy_bandwidth
    from fp4kit.kernels import decode_ops

    device = "cuda"
    bw = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    if args.sweep:
        runs = [dict(zip(KNOBS, c[:4] + (c[4] or None, c[5])))
                for c in itertools.product(args.block_l, args.warps, args.stages, args.pps, args.maxnreg, args.single)]
    else:
        runs = []
        for group in (";".join(args.set) or "").split(";"):
            s = {}
            for kv in filter(None, group.split()):
                key, val = kv.split("=")
                if key not in KNOBS:
                    sys.exit(f"--set: unknown knob {key}; one of {KNOBS}")
                s[key] = (int(val) or None if key == "ATTN_MAXNREG" else float(val) if key == "ATTN_SINGLE_SPLIT_WAVES"
                          else type(getattr(decode_ops, key))(int(val)))
            runs.append(s)
        for spec in args.fp8_single:
            w, st, bl = (int(x) for x in spec.split(","))
            runs.append({**runs[0], "ATTN_FP8_SINGLE_SPLIT": (w, st, None, bl), "ATTN_FP8_SINGLE_SPLIT_LONG": None})
    rows = []
    t0 = time.time()
    for (B, L), kv in itertools.product(cases, args.kv):
        seen = set()
        for s in runs:
            full = {k: s.get(k, getattr(decode_ops, k)) for k in KNOBS + FP8_KNOBS}
            key = tuple(full.values())
            if key in seen:
                continue
            seen.add(key)
            try:
                r = run_case(B, L, kv, full, device, bw, sweep=args.sweep)
            except Exception as e:  # a tile that does not compile (shared memory) is a result, not a crash
                r = {"batch": B, "kv_len": L, "kv": kv, **{k.lower(): v for k, v in full.items()},
                     "error": f"{type(e).__name__}: {str(e)[:200]}"}
            rows.append(r)
            msg = (f"{r['us']:8.1f} us  roofline {r['roofline_us']:6.1f} ({100 * r['bw_frac']:4.1f}%)  err "
                   f"{r['rel_err_vs_twin']:.1e}" if "us" in r else r["error"])
            print(f"B={B:3d} L={L:6d} {kv:4s} " + " ".join(f"{k[5:].lower()}={v}" for k, v in full.items())
                  + f"  {msg}  [{time.time() - t0:.0f} s]", flush=True)
    best = {}
    for r in rows:
        if "us" in r:
            key = (r["batch"], r["kv_len"], r["kv"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    print("\nbest per case:")
    for (B, L, kv), r in best.items():
        print(f"B={B} L={L} {kv}: {r['us']:.1f} us ({100 * r['bw_frac']:.0f}% of copy BW) "
              + " ".join(f"{k[5:].lower()}={r[k.lower()]}" for k in KNOBS + FP8_KNOBS))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bw": bw, "date": time.strftime("%Y-%m-%d"),
                       "torch": torch.__version__, "shape": SHAPE, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
