"""Upcycled SmolLM2-135M MoE with MXFP4 (RCEIL) experts, trained the DeepSeek-V4 way (a tiny CPU run).

    dense model -> upcycle (E experts = copies of each MLP, top-k router) -> fake-quantize the experts only
    (MXFP4 RCEIL, FP32 masters, STE; attention and routers in float) -> QAD from the dense model -> convert

Reports held-out perplexity (last 10% of tiny-shakespeare) of the dense model, the upcycled model, the
upcycled model with RTN MXFP4 experts, and after QAD; and the per-layer FP4 -> FP8 (128x128 tiles) check.

    python benchmarks/qat_moe_upcycle.py --steps 30 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import pathlib
import time

import torch

from fp4kit.data import load_corpus
from fp4kit.eval import perplexity
from fp4kit.formats import MXFP4Config, ScaleRule
from fp4kit.io import load_model
from fp4kit.nn.fake_quant import QATConfig, convert, fp8_tile_report, prepare_qat
from fp4kit.train.moe_upcycle import UpcycleConfig, experts_only, upcycle_
from fp4kit.train.qat import Loss, TrainConfig, split_tokens, train_qat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--ppl-tokens", type=int, default=2048)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    model, tokenizer, _ = load_model(args.model, dtype=torch.float32)
    model.to(device)
    ids = tokenizer(load_corpus("shakespeare"), return_tensors="pt").input_ids[0]
    train, held_out = split_tokens(ids, 0.1)
    held_out = held_out[: args.ppl_tokens]
    res = {"model": args.model, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "date": datetime.date.today().isoformat(), "args": vars(args), "ppl": {}}

    def ppl(m, key):
        with torch.no_grad():
            res["ppl"][key] = perplexity(m.eval(), held_out, context=args.context, progress=False).perplexity
        print(key, res["ppl"][key], f"{time.perf_counter() - t0:.0f}s", flush=True)

    ppl(model, "dense")
    teacher = copy.deepcopy(model).eval()  # float32 teacher on CPU (bf16 matmuls are slow there)
    upcycle_(model, UpcycleConfig(num_experts=args.experts, top_k=args.top_k, expert_noise=0.0))
    ppl(model, "upcycled")
    report = prepare_qat(model, QATConfig(MXFP4Config(ScaleRule.RCEIL)), filter_fn=experts_only)
    res["quantized_layers"], res["float_layers"] = len(report.quantized), len(report.excluded)
    ppl(model, "upcycled_rtn_experts")
    cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=max(args.steps // 10, 1), batch_size=args.batch_size,
                      seq_len=args.seq_len, loss=Loss.KD)
    result = train_qat(model, train, cfg, teacher=teacher, out="/tmp/qat_moe_run", resume=False, progress=False)
    res["train"] = {"seconds": result.seconds, "tokens_per_s": result.tokens_per_s, "final_kd": result.final_loss,
                    "config": cfg.as_json()}
    convert(model)
    ppl(model, "upcycled_qad_experts")
    tiles = fp8_tile_report(model)
    res["fp8_tiles"] = {"layers": len(tiles), "lossless_layers": sum(t.lossless for t in tiles.values()),
                        "max_scale_span": max(t.max_scale_span for t in tiles.values())}
    gap = res["ppl"]["upcycled_rtn_experts"] - res["ppl"]["upcycled"]
    res["recovered"] = (res["ppl"]["upcycled_rtn_experts"] - res["ppl"]["upcycled_qad_experts"]) / gap if gap else None
    res["seconds"] = time.perf_counter() - t0
    out = pathlib.Path(args.out) / f"qat_moe_upcycle_{res['device'].split()[0].lower()}.json"
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
