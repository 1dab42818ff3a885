"""Where a QAT step's time goes: fake-quant of the weights vs the matmuls vs the optimizer (one GPU).

The 2-GPU run (`qat_ddp.py`) found the step time of SmolLM2-135M QAT nearly independent of the batch
(0.45 s at 16 x 512 tokens, 0.43 s at 64 x 512 on one H200). This splits one training step, for the
float model (plain nn.Linear) and the NVFP4 / MXFP4 fake-quant models, at two batch sizes:

    fakequant   computing every layer's fake-quantized weight once (no_grad; what each forward adds)
    fwd_bwd     forward + backward of one micro-batch (bf16 autocast, CE loss)
    optim       gradient clipping + AdamW step + zero_grad over all FP32 masters

Medians over `--reps` after `--warmup` repetitions, CUDA-synchronized host timers. SmolLM2's config
from a random init (no weights needed). Prints a table and writes OUT/qat_step_profile.json.

    python benchmarks/qat_step_profile.py --config .stage/qat/smollm2_config.json --out $OUT
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import pathlib
import statistics
import time

import torch
import torch.nn.functional as F


def timed(fn, device, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def profile(model, device, batch: int, seq: int, reps: int, warmup: int) -> dict:
    from fp4kit.nn.fake_quant import fake_quant_layers

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq + 1), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95))
    fakes = list(fake_quant_layers(model).values())

    def fwd_bwd():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids[:, :-1]).logits
        F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()

    def optim():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)

    @torch.no_grad()
    def fakequant():
        for m in fakes:
            m.quantized_weight().dequantize(m.weight.dtype)

    out = {"fwd_bwd": timed(fwd_bwd, device, reps, warmup)}
    out["optim"] = timed(optim, device, reps, warmup)
    out["fakequant"] = timed(fakequant, device, reps, warmup) if fakes else 0.0
    out["tokens_per_s_step"] = batch * seq / (out["fwd_bwd"] + out["optim"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="LlamaConfig JSON (qat_ddp.py --dump writes SmolLM2's)")
    p.add_argument("--batches", default="16,64")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    from fp4kit.formats import MXFP4Config, NVFP4Config, ScaleRule
    from fp4kit.nn.fake_quant import QATConfig, prepare_qat

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = LlamaConfig.from_dict(json.loads(pathlib.Path(args.config).read_text()))
    torch.manual_seed(0)
    base = LlamaForCausalLM._from_config(config, dtype=torch.float32).to(device)
    schemes = {"float": None, "nvfp4": NVFP4Config(), "mxfp4-rceil": MXFP4Config(ScaleRule.RCEIL)}
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "date": datetime.date.today().isoformat(), "seq_len": args.seq_len, "reps": args.reps, "runs": {}}
    rows = []
    for name, fmt in schemes.items():
        model = copy.deepcopy(base)
        if fmt is not None:
            prepare_qat(model, QATConfig(fmt))
        model.train()
        for b in (int(x) for x in args.batches.split(",")):
            r = profile(model, device, b, args.seq_len, args.reps, args.warmup)
            res["runs"][f"{name}/b{b}"] = r
            rows.append(f"| {name} | {b} | {1e3 * r['fakequant']:.1f} | {1e3 * r['fwd_bwd']:.1f} | "
                        f"{1e3 * r['optim']:.1f} | {r['tokens_per_s_step'] / 1e3:.1f}k |")
            print(rows[-1], flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "qat_step_profile.json").write_text(json.dumps(res, indent=1))
    print("| model | batch x seq | fake-quant all weights (ms) | fwd+bwd (ms) | clip+AdamW (ms) | tokens/s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
