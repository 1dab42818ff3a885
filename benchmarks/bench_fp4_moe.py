"""Benchmark the grouped MoE FP4 GEMM against bf16 grouped matmul and the memory roofline.

    python benchmarks/bench_fp4_moe.py [--tokens 1 2 4 8 16 32 64] [--out benchmarks/results/fp4_moe_h100.json]

Qwen3-30B-A3B expert shapes: 128 experts, hidden 2048, expert width 768, top-8; gate_up [E, 1536, 2048]
(gate rows first), down [E, 2048, 768]. For each token count T, on one GPU in one run:

- baseline: bf16 weights through `torch._grouped_mm` (per-expert `torch.mm` loop if absent or failing):
  gate_up on the expert-sorted token rows, silu(gate) * up, down; the full layer adds the routing
  (argsort), the gather, the router weights and the scatter-add combine;
- fp4: `fp4_moe_gemm` (gate_up with the fused SwiGLU; down with the router weights) and `fp4_moe_mlp`
  (the full layer, routing included), NVFP4 and MXFP4;
- roofline: bytes of the touched experts' weights (unique experts of each routing, averaged over the
  routings the calls rotate through) plus activations, over the measured copy bandwidth.

Every call takes the next of 16 random routings, so the experts read change from call to call;
`do_bench` clears L2 before each call (eager, median of >= 100 after warm-up); "graph" is the same
calls captured in a CUDA graph (GPU time without Python and launch overhead).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_fp4_gemm import bench, bench_graph, copy_bandwidth  # noqa: E402

from fp4kit.formats import MXFP4Config, NVFP4Config  # noqa: E402
from fp4kit.kernels.fp4_moe import (MoEGemmConfig, _moe_config, fp4_moe_gemm, fp4_moe_mlp,  # noqa: E402
                                    prepare_fp4_experts, quantize_experts, route_topk)

E, H, I, TOP_K = 128, 2048, 768, 8
FORMATS = {"nvfp4": NVFP4Config(), "mxfp4": MXFP4Config(), "nvfp4_f16dec": NVFP4Config(),
           "nvfp4_gather": NVFP4Config(), "mxfp4_gather": MXFP4Config()}
# a format name that runs with fp4_moe module switches changed (same weights as its base format): NVFP4's
# float16-pair decode (the default before 2026-11-24); the bf16 decode with its scales gathered from the table
# (MXFP4's default before 2026-11-24). fp4_moe_scalereg_h100 also timed gate_up evict_first vs plain loads with the
# register scales: equal within 1% at every T (that switch is gone; evict_first stays).
FORMAT_SWITCHES = {"nvfp4_f16dec": {"MOE_NV_BF16_DECODE": False}, "nvfp4_gather": {"MOE_SCALE_REGS": False},
                   "mxfp4_gather": {"MOE_SCALE_REGS": False}}


def _switched(fn, name):
    """fn with the format's fp4_moe switches set while it runs (read at call time, so also under capture)."""
    attrs = FORMAT_SWITCHES.get(name)
    if not attrs:
        return fn
    from fp4kit.kernels import fp4_moe as fm

    def run(*a, **k):
        old = {key: getattr(fm, key) for key in attrs}
        for key, v in attrs.items():
            setattr(fm, key, v)
        try:
            return fn(*a, **k)
        finally:
            for key, v in old.items():
                setattr(fm, key, v)

    return run
N_ROUTINGS = 16


class Rotation:
    def __init__(self, items):
        self.items, self.i = items, 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def grouped_mm(a, w_t, offs):
    """bf16 grouped matmul: a [S, K] sorted by expert, w_t [E, K, N], offs int32 [E] cumulative ends."""
    return torch._grouped_mm(a, w_t, offs=offs)


def grouped_mm_loop(a, w_t, offs):
    out = torch.empty(a.shape[0], w_t.shape[2], dtype=a.dtype, device=a.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(a[start:end], w_t[e], out=out[start:end])
        start = end
    return out


def pick_grouped_mm(a, w_t, offs):
    try:
        ref = grouped_mm_loop(a, w_t, offs)
        got = grouped_mm(a, w_t, offs)
        torch.cuda.synchronize()
        err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        if err < 1e-2:
            return grouped_mm, "torch._grouped_mm"
        print(f"torch._grouped_mm differs from the loop (rel err {err:.2e}): using the loop", flush=True)
    except (AttributeError, RuntimeError) as exc:
        print(f"torch._grouped_mm unavailable ({type(exc).__name__}: {str(exc)[:120]}): using the loop", flush=True)
    return grouped_mm_loop, "per-expert torch.mm loop"


def make_case(T, gen):
    logits = torch.randn(T, E, device="cuda", generator=gen)
    w, ids = torch.softmax(logits, -1).topk(TOP_K, dim=-1)
    ids = ids.to(torch.int64)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.long, device="cuda").scatter_add_(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)
    return dict(ids=ids, w=(w / w.sum(-1, keepdim=True)).float(), order=order, offs=offs,
                routing=route_topk(ids, E), touched=int((counts > 0).sum()))


def bf16_layer(x, c, gu_t, dn_t, gmm):
    """The bf16 baseline layer: route, gather, grouped gate_up, SwiGLU, grouped down, weights, combine."""
    T = x.shape[0]
    flat = c["ids"].reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.long, device="cuda").scatter_add_(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x[order // TOP_K]
    gate, up = gmm(xs, gu_t, offs).chunk(2, dim=-1)
    ys = gmm(F.silu(gate) * up, dn_t, offs) * c["w"].reshape(-1)[order, None].to(x.dtype)
    out = torch.zeros(T, H, dtype=torch.float32, device="cuda")
    out.index_add_(0, order // TOP_K, ys.float())
    return out.to(x.dtype)


SWEEP = [MoEGemmConfig(bn, bk, num_warps=w, num_stages=st) for bn, bk, w, st in
         [(32, 128, 4, 5), (32, 256, 4, 4), (64, 128, 4, 5), (16, 256, 4, 4), (64, 256, 4, 3), (16, 128, 4, 6),
          (128, 128, 8, 4)]]


def _rotation_and_inputs(T, gen):
    """N_ROUTINGS random routings of T tokens taken in turn, x [T, H] and the down input h [T * TOP_K, I]."""
    nxt = Rotation([make_case(T, gen) for _ in range(N_ROUTINGS)])
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    return nxt, x, torch.randn(T * TOP_K, I, device="cuda", dtype=torch.bfloat16)


def run_sweep(fp4, gen, out_dir, tokens=(1, 8, 64)):
    """Tile configs of the grouped kernel per token count, gate_up and down, GPU time in a CUDA graph."""
    rows = []
    for T in tokens:
        nxt, x, h = _rotation_and_inputs(T, gen)
        for f, (gu, dn, _, _) in fp4.items():
            for op, prep, inp, kw in (("gate_up", gu, x, dict(swiglu=True)), ("down", dn, h, dict(x_per_pair=True))):
                N_out = 2 * I // 2 if op == "gate_up" else H
                default = _moe_config(N_out, inp.shape[1], op == "gate_up", f == "mxfp4", T * TOP_K, E)
                res = []
                for cfg in [default] + SWEEP:
                    try:
                        us = bench_graph(lambda: fp4_moe_gemm(inp, prep, nxt()["routing"], config=cfg, **kw))
                    except Exception as exc:  # shared memory etc.
                        print(f"  {cfg}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
                        continue
                    rows.append(dict(T=T, fmt=f, op=op, cfg=cfg.__dict__, default=cfg == default, graph_us=us))
                    res.append((us, cfg))
                print(f"sweep T={T:3d} {f} {op:8s} default {res[0][0]:6.1f}us | " + "  ".join(
                    f"{us:6.1f} bn{c.block_n} bk{c.block_k} w{c.num_warps} s{c.num_stages}"
                    for us, c in sorted(res[1:], key=lambda r: r[0])), flush=True)
    with open(os.path.join(out_dir, "fp4_moe_sweep_h100.json"), "w") as fh:
        json.dump(rows, fh, indent=1)


def round6_lut_configs(default: MoEGemmConfig) -> list[MoEGemmConfig]:
    """Round 6, third call: the table decode (lut) at the default tile and at shallower pipelines."""
    import dataclasses

    out = [default, dataclasses.replace(default, lut=True)]
    for st in (3, 2):
        cfg = dataclasses.replace(default, lut=True, num_stages=st)
        if cfg not in out:
            out.append(cfg)
    return out


def round6_configs(default: MoEGemmConfig, second: bool = False) -> list[MoEGemmConfig]:
    """Round 6: the default, evict_first on its weight loads, and neighbouring tiles with evict_first.
    second: the second sweep (defaults now with evict_first): pipelining depths around the default."""
    import dataclasses

    if second:
        out = [default, dataclasses.replace(default, evict="")]
        for st in (2, 3, 4, 5, 6):
            cfg = dataclasses.replace(default, num_stages=st)
            if cfg not in out:
                out.append(cfg)
        return out
    out = [default, dataclasses.replace(default, evict="evict_first")]
    for bn, bk, w, st in [(64, 128, 4, 3), (64, 256, 4, 3), (32, 128, 4, 5), (128, 128, 8, 4), (64, 128, 8, 5)]:
        cfg = MoEGemmConfig(bn, bk, num_warps=w, num_stages=st, split_k=default.split_k, evict="evict_first")
        if cfg not in out:
            out.append(cfg)
    return out


LAYER_VARIANTS = {  # fp4_moe module attributes per layer variant
    "torch_combine": dict(MOE_PDL=False, MOE_COMBINE_KERNEL=False, MOE_FUSED_COMBINE=False),
    "combine_kernel": dict(MOE_PDL=False, MOE_COMBINE_KERNEL=True, MOE_FUSED_COMBINE=False),
    "pdl_combine_kernel": dict(MOE_PDL=True, MOE_COMBINE_KERNEL=True, MOE_FUSED_COMBINE=False),
    "fused": dict(MOE_PDL=False, MOE_COMBINE_KERNEL=True, MOE_FUSED_COMBINE=True),
    "pdl_fused": dict(MOE_PDL=True, MOE_COMBINE_KERNEL=True, MOE_FUSED_COMBINE=True),
    "default": {}, "lut": dict(MOE_LUT_NVFP4=True)}


def run_round6(fp4, gen, gmm, gu_t, dn_t, out_dir, tokens=(2, 8, 16, 64), layer_tokens=(1, 2, 4, 8, 16, 32, 64),
               second=False, variants=("torch_combine", "combine_kernel", "pdl_combine_kernel"), repeats=1,
               lut=False):
    """Round 6 exploration, GPU time in a CUDA graph: per-GEMM configs (evict_first, tiles) at a few T; the
    layer with and without PDL and the combine kernel, against the bf16 layer; the routing launch alone."""
    from fp4kit.kernels import fp4_moe

    rows = []
    for T in tokens:
        nxt, x, h = _rotation_and_inputs(T, gen)
        for f, (gu, dn, _, _) in fp4.items():
            for op, prep, inp, kw in (("gate_up", gu, x, dict(swiglu=True)), ("down", dn, h, dict(x_per_pair=True))):
                N_out = I if op == "gate_up" else H
                default = _moe_config(N_out, inp.shape[1], op == "gate_up", f == "mxfp4", T * TOP_K, E)
                res = []
                if lut and f != "nvfp4":
                    continue
                for cfg in (round6_lut_configs(default) if lut else round6_configs(default, second)):
                    try:
                        us = bench_graph(lambda: fp4_moe_gemm(inp, prep, nxt()["routing"], config=cfg, **kw))
                    except Exception as exc:  # shared memory etc.
                        print(f"  {cfg}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
                        continue
                    rows.append(dict(kind="gemm", T=T, fmt=f, op=op, cfg=cfg.__dict__, default=cfg == default,
                                     graph_us=us))
                    res.append((us, cfg))
                print(f"r6 T={T:3d} {f} {op:8s} default {res[0][0]:6.1f}us | " + "  ".join(
                    f"{us:6.1f} bn{c.block_n} bk{c.block_k} w{c.num_warps} s{c.num_stages} k{c.split_k}"
                    f"{' ef' if c.evict else ''}{' lut' if c.lut else ''}"
                    for us, c in sorted(res[1:], key=lambda r: r[0])), flush=True)
    for T in layer_tokens:
        cases = [make_case(T, gen) for _ in range(N_ROUTINGS)]
        nxt = Rotation(cases)
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        line = {"bf16": bench_graph(lambda: bf16_layer(x, nxt(), gu_t, dn_t, gmm))}
        line["route"] = bench_graph(lambda: route_topk(nxt()["ids"], E))
        for f, (gu, dn, _, _) in fp4.items():
            for rep in range(repeats):
                for name in variants:
                    saved = {k: getattr(fp4_moe, k) for k in LAYER_VARIANTS[name]}
                    for k, v in LAYER_VARIANTS[name].items():
                        setattr(fp4_moe, k, v)

                    def layer(gu=gu, dn=dn):
                        c = nxt()
                        return fp4_moe_mlp(x, gu, dn, c["ids"], c["w"])

                    layer()
                    key = f"{f}_{name}" + (f"_{rep}" if repeats > 1 else "")
                    line[key] = bench_graph(layer)
                    for k, v in saved.items():
                        setattr(fp4_moe, k, v)
        rows.append(dict(kind="layer", T=T, **line))
        print(f"r6 layer T={T:3d} " + "  ".join(f"{k} {v:6.1f}" for k, v in line.items())
              + "  | x bf16: " + "  ".join(f"{k} {line['bf16'] / v:4.2f}" for k, v in line.items()
                                          if k not in ("bf16", "route")), flush=True)
    name = "3" if lut else "2" if second else ""
    with open(os.path.join(out_dir, f"fp4_moe_round6_sweep{name}_h100.json"), "w") as fh:
        json.dump(rows, fh, indent=1)


LAYER_DEFAULT_VARIANTS = {  # fp4_moe module attributes changed from the round-6 defaults
    "no_pdl": {"MOE_PDL": False}, "no_prefetch": {"MOE_PREFETCH": False},
    "pdl_at_t1": {"MOE_PDL_MIN_TOKENS": 1}, "fused": {"MOE_FUSED_COMBINE": True}}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--formats", nargs="+", default=["nvfp4", "mxfp4"], choices=list(FORMATS),
                   help="the *_f16dec / *_gather / *_evictfirst names: the same format with an fp4_moe switch "
                        "changed (FORMAT_SWITCHES)")
    p.add_argument("--out", default="benchmarks/results/fp4_moe_h100.json")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--round6", action="store_true", help="round 6 exploration (evict, tiles, PDL, combine)")
    p.add_argument("--round6-second", action="store_true", help="round 6 second sweep (stages; fused combine)")
    p.add_argument("--layer-variants", action="store_true", help="also time the layer without each round-6 default")
    p.add_argument("--round6-lut", action="store_true", help="round 6 third call: the table decode for NVFP4")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    w_gu = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * 0.02
    w_dn = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * 0.02
    gu_t, dn_t = w_gu.transpose(1, 2), w_dn.transpose(1, 2)  # [E, K, N] views for _grouped_mm
    fp4 = {}
    for f in args.formats:
        gu, dn = quantize_experts(w_gu, FORMATS[f]), quantize_experts(w_dn, FORMATS[f])
        fp4[f] = (prepare_fp4_experts(gu), prepare_fp4_experts(dn), gu.nbytes // E, dn.nbytes // E)
    gen = torch.Generator(device="cuda").manual_seed(1)
    probe = make_case(4, gen)
    gmm, gmm_name = pick_grouped_mm(torch.randn(4 * TOP_K, H, device="cuda", dtype=torch.bfloat16)[probe["order"]],
                                    gu_t, probe["offs"])
    print(f"baseline: {gmm_name}", flush=True)
    if args.sweep:
        return run_sweep(fp4, gen, os.environ.get("OUT", os.path.dirname(args.out)))
    if args.round6:
        return run_round6(fp4, gen, gmm, gu_t, dn_t, os.environ.get("OUT", os.path.dirname(args.out)))
    if args.round6_lut:
        return run_round6(fp4, gen, gmm, gu_t, dn_t, os.environ.get("OUT", os.path.dirname(args.out)),
                          tokens=(4, 8, 16, 64), layer_tokens=(4, 8, 16, 32, 64), lut=True,
                          variants=("default", "lut"), repeats=2)
    if args.round6_second:
        return run_round6(fp4, gen, gmm, gu_t, dn_t, os.environ.get("OUT", os.path.dirname(args.out)),
                          tokens=(4, 16, 64), second=True, repeats=2,
                          variants=("combine_kernel", "pdl_combine_kernel", "fused", "pdl_fused"))
    rows = []
    for T in args.tokens:
        cases = [make_case(T, gen) for _ in range(N_ROUTINGS)]
        touched = sum(c["touched"] for c in cases) / len(cases)
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        h = torch.randn(T * TOP_K, I, device="cuda", dtype=torch.bfloat16)
        for c in cases:
            c["xs"], c["hs"] = x[c["order"] // TOP_K], h[c["order"]]
        nxt = Rotation(cases)
        P = T * TOP_K
        act_gu, act_dn = 2 * (T * H + P * I), 2 * (P * I + P * H)
        row = dict(T=T, pairs=P, touched_experts=touched)

        def base_gu():
            c = nxt()
            g, u = gmm(c["xs"], gu_t, c["offs"]).chunk(2, dim=-1)
            return F.silu(g) * u

        def base_dn():
            c = nxt()
            return gmm(c["hs"], dn_t, c["offs"])

        timed = {"gate_up": {"bf16": base_gu}, "down": {"bf16": base_dn},
                 "layer": {"bf16": lambda: bf16_layer(x, nxt(), gu_t, dn_t, gmm)}}
        bytes_bf16 = {"gate_up": touched * 2 * I * H * 2 + act_gu, "down": touched * H * I * 2 + act_dn}
        bytes_bf16["layer"] = bytes_bf16["gate_up"] + bytes_bf16["down"]
        nbytes = {"bf16": bytes_bf16}
        for f, (gu, dn, gu_b, dn_b) in fp4.items():
            def f_gu(gu=gu):
                return fp4_moe_gemm(x, gu, nxt()["routing"], swiglu=True)

            def f_dn(dn=dn):
                c = nxt()
                return fp4_moe_gemm(h, dn, c["routing"], x_per_pair=True, pair_weights=c["w"])

            def f_layer(gu=gu, dn=dn):
                c = nxt()
                return fp4_moe_mlp(x, gu, dn, c["ids"], c["w"])

            f_gu, f_dn, f_layer = (_switched(fn, f) for fn in (f_gu, f_dn, f_layer))
            timed["gate_up"][f], timed["down"][f], timed["layer"][f] = f_gu, f_dn, f_layer
            nbytes[f] = {"gate_up": touched * gu_b + act_gu, "down": touched * dn_b + act_dn}
            nbytes[f]["layer"] = nbytes[f]["gate_up"] + nbytes[f]["down"]
            # correctness: the fp4 layer against bf16 math on the dequantized weights (float32 reference)
            c = cases[0]
            got = _switched(fp4_moe_mlp, f)(x, gu, dn, c["ids"], c["w"]).float()
            gu_w, dn_w = gu.experts.dequantize(torch.bfloat16), dn.experts.dequantize(torch.bfloat16)
            ref = bf16_layer(x.float(), c, gu_w.float().transpose(1, 2), dn_w.float().transpose(1, 2),
                             grouped_mm_loop).float()
            row[f"{f}_layer_rel_err"] = ((got - ref).norm() / ref.norm()).item()
            row[f"{f}_layer_max_err"] = ((got - ref).abs().max() / ref.abs().max()).item()
            # and against the exactly dequantized weights (float32: what NVFP4's bf16 decode multiplies)
            gu_w, dn_w = gu.experts.dequantize(torch.float32), dn.experts.dequantize(torch.float32)
            ref = bf16_layer(x.float(), c, gu_w.transpose(1, 2), dn_w.transpose(1, 2), grouped_mm_loop).float()
            row[f"{f}_layer_rel_err_exact"] = ((got - ref).norm() / ref.norm()).item()
            row[f"{f}_layer_max_err_exact"] = ((got - ref).abs().max() / ref.abs().max()).item()
        if args.layer_variants:  # each round-6 default against its absence, same run (graph only)
            from fp4kit.kernels import fp4_moe as fm

            for f, (gu, dn, _, _) in fp4.items():
                for var, attrs in LAYER_DEFAULT_VARIANTS.items():
                    if var == "pdl_at_t1" and T != 1:
                        continue
                    old = {k: getattr(fm, k) for k in attrs}
                    for k, v in attrs.items():
                        setattr(fm, k, v)
                    try:
                        def lay(gu=gu, dn=dn):
                            c = nxt()
                            return fp4_moe_mlp(x, gu, dn, c["ids"], c["w"])

                        lay()
                        row[f"layer_{f}_{var}"] = dict(graph_us=bench_graph(lay))
                    finally:
                        for k, v in old.items():
                            setattr(fm, k, v)
            print(f"T={T:3d} layer variants (graph us): " + "  ".join(
                f"{k[6:]} {v['graph_us']:.1f}" for k, v in row.items() if k.startswith("layer_")), flush=True)
        for op, fns in timed.items():
            for name, fn in fns.items():
                us = bench(fn)
                try:
                    g_us = bench_graph(fn)
                except Exception as exc:  # capture not possible (e.g. a host sync in the loop baseline)
                    print(f"  graph capture failed for {op}/{name}: {type(exc).__name__}", flush=True)
                    g_us = None
                roof = nbytes[name][op] / bw * 1e6
                row[f"{op}_{name}"] = dict(us=us, graph_us=g_us, bytes=nbytes[name][op], roofline_us=roof,
                                           bw_frac=roof / us, graph_bw_frac=None if g_us is None else roof / g_us)
            for name in fns:
                if name == "bf16":
                    continue
                r, b = row[f"{op}_{name}"], row[f"{op}_bf16"]
                r["speedup"] = b["us"] / r["us"]
                both = r["graph_us"] is not None and b["graph_us"] is not None
                r["graph_speedup"] = b["graph_us"] / r["graph_us"] if both else None
            print(f"T={T:3d} {op:8s} touched {touched:5.1f} | " + " | ".join(
                f"{n} {row[f'{op}_{n}']['us']:7.1f} us"
                + (f" graph {row[f'{op}_{n}']['graph_us']:6.1f}" if row[f'{op}_{n}']['graph_us'] else "")
                + f" roof {row[f'{op}_{n}']['roofline_us']:5.1f}"
                + (f" {row[f'{op}_{n}']['speedup']:4.2f}x/{row[f'{op}_{n}']['graph_speedup'] or 0:4.2f}x"
                   if n != "bf16" else "") for n in fns), flush=True)
        rows.append(row)
    summary = {}
    for f in args.formats:
        for op in ("gate_up", "down", "layer"):
            sp = [r[f"{op}_{f}"]["speedup"] for r in rows]
            gsp = [r[f"{op}_{f}"]["graph_speedup"] for r in rows if r[f"{op}_{f}"]["graph_speedup"]]
            summary[f"{f}_{op}_mean_speedup"] = sum(sp) / len(sp)
            summary[f"{f}_{op}_min_speedup"] = min(sp)
            if gsp:
                summary[f"{f}_{op}_mean_graph_speedup"] = sum(gsp) / len(gsp)
    for k, v in summary.items():
        print(f"{k:36s} {v:.3f}")
    import triton

    result = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), torch=torch.__version__,
                  triton=triton.__version__, copy_bw_bytes_per_s=bw, baseline=gmm_name,
                  shapes=dict(experts=E, hidden=H, expert_width=I, top_k=TOP_K), rows=rows, summary=summary)
    out_dir = os.environ.get("OUT", os.path.dirname(args.out))
    for path in {args.out, os.path.join(out_dir, os.path.basename(args.out))}:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
