"""Two GPUs against one: FP4 QAT under DDP follows the one-GPU loss curve step for step, at what throughput.

`train_qat` draws each step's global batch from a generator seeded by (seed, step) and gives rank r
the r-th slice of it, so one GPU with batch B and N GPUs with batch B/N each see exactly the same
windows at every step: the two loss curves differ only by floating-point order (bf16 GEMMs over a
different number of rows, gradients summed by all-reduce instead of inside one GEMM). What this run
trains: SmolLM2-135M's architecture from a random init (the real config; no weights need staging), every
linear layer but lm_head fake-quantized to NVFP4 (dynamic scales, FP32 masters, bf16 autocast),
cross-entropy on tiny-shakespeare tokens, all parameters trained, AdamW lr 1e-3 with warm-up and
cosine: a curve that moves a lot in few steps, so divergence would show.

    CUDA_VISIBLE_DEVICES=0 python benchmarks/qat_ddp.py --tokens T.pt --config C.json --out $OUT/one
    torchrun --nproc-per-node 2 benchmarks/qat_ddp.py --tokens T.pt --config C.json --out $OUT/two
    python benchmarks/qat_ddp.py --compare $OUT/one $OUT/two --out $OUT      # JSON + PNG

Throughput: median tokens/s over the steps after the first `--skip` (warm-up, allocator growth),
all ranks' tokens counted. `--dump` writes the two input files from the bundled model and text.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics

import torch


def dump(tokens_path: str, config_path: str) -> None:
    """Tokenize tiny-shakespeare with SmolLM2's tokenizer and save SmolLM2's config (machine with the data)."""
    from fp4kit.data import load_corpus
    from fp4kit.io import load_model

    model, tokenizer, _ = load_model("smollm2-135m", dtype=torch.float32)
    ids = tokenizer(load_corpus("shakespeare"), return_tensors="pt").input_ids[0].to(torch.int32)
    torch.save(ids, tokens_path)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    pathlib.Path(config_path).write_text(json.dumps(cfg, indent=1))
    print(f"wrote {tokens_path} ({ids.numel()} tokens) and {config_path}")


def train(args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from fp4kit.formats import NVFP4Config
    from fp4kit.nn.fake_quant import QATConfig, prepare_qat
    from fp4kit.train.qat import Loss, TrainConfig, Trainable, split_tokens, train_qat
    from fp4kit.train.state import read_jsonl

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        torch.distributed.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    if args.global_batch % world:
        raise ValueError(f"--global-batch {args.global_batch} is not divisible by {world} ranks")
    tokens = torch.load(args.tokens, weights_only=True).long()
    train_ids, _ = split_tokens(tokens, 0.1)
    config = LlamaConfig.from_dict(json.loads(pathlib.Path(args.config).read_text()))
    torch.manual_seed(args.seed)  # every rank builds the same initial model (DDP also broadcasts it)
    model = LlamaForCausalLM._from_config(config, dtype=torch.float32).to(device)
    report = prepare_qat(model, QATConfig(NVFP4Config()))
    cfg = TrainConfig(steps=args.steps, lr=1e-3, warmup_steps=10, batch_size=args.global_batch // world,
                      seq_len=args.seq_len, loss=Loss.CE, trainable=Trainable.ALL, seed=args.seed)
    out = pathlib.Path(args.out)
    result = train_qat(model, train_ids, cfg, out=out if rank == 0 else None, resume=False, progress=False)
    if rank == 0:
        log = read_jsonl(out / "log.jsonl")
        rates = [r["tokens_per_s"] for r in log[args.skip:]]
        run = {"world": world, "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
               "quantized_layers": len(report.quantized), "config": cfg.as_json(), "global_batch": args.global_batch,
               "seconds": result.seconds, "tokens_per_s_median": statistics.median(rates),
               "tokens_per_s_spread": [min(rates), max(rates)], "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None}
        (out / "run.json").write_text(json.dumps(run, indent=1))
        print(json.dumps(run), flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()


def compare(one_dir: str, two_dir: str, out: str, tolerance: float, name: str) -> None:
    from fp4kit.train.state import read_jsonl

    one, two = (pathlib.Path(d) for d in (one_dir, two_dir))
    run1, run2 = (json.loads((d / "run.json").read_text()) for d in (one, two))
    log1, log2 = read_jsonl(one / "log.jsonl"), read_jsonl(two / "log.jsonl")
    if [r["step"] for r in log1] != [r["step"] for r in log2]:
        raise ValueError("the two runs logged different steps")
    rel = [abs(b["loss"] - a["loss"]) / a["loss"] for a, b in zip(log1, log2)]
    gn = [abs(b["grad_norm"] - a["grad_norm"]) / a["grad_norm"] for a, b in zip(log1, log2)]
    res = {"device": run2["device"], "date": datetime.date.today().isoformat(), "torch": run2["torch"],
           "what": "SmolLM2-135M architecture, random init, NVFP4 fake-quant QAT, CE on tiny-shakespeare",
           "steps": len(log1), "global_batch": run1["global_batch"], "seq_len": run1["config"]["seq_len"],
           "one_gpu": run1, "two_gpus": run2,
           "speedup": run2["tokens_per_s_median"] / run1["tokens_per_s_median"],
           "tolerance_rel_loss": tolerance, "max_rel_loss_diff": max(rel),
           "max_rel_loss_diff_at_step": log1[rel.index(max(rel))]["step"],
           "mean_rel_loss_diff": sum(rel) / len(rel), "max_rel_grad_norm_diff": max(gn),
           "within_tolerance": max(rel) <= tolerance,
           "loss_one": [r["loss"] for r in log1], "loss_two": [r["loss"] for r in log2]}
    outp = pathlib.Path(out)
    (outp / f"{name}.json").write_text(json.dumps(res, indent=1))
    plot(res, outp / f"{name}.png")
    print(json.dumps({k: v for k, v in res.items() if not k.startswith("loss_")}, indent=1))


def plot(res: dict, png: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, res["steps"] + 1)
    fig, (a, b) = plt.subplots(2, 1, figsize=(6, 5), sharex=True, height_ratios=[3, 1.4])
    a.plot(steps, res["loss_one"], label=f"1 GPU ({res['one_gpu']['tokens_per_s_median'] / 1e3:.0f}k tok/s)", lw=2)
    a.plot(steps, res["loss_two"], "--", label=f"2 GPUs DDP ({res['two_gpus']['tokens_per_s_median'] / 1e3:.0f}k tok/s)")
    a.set_ylabel("CE loss (train batch)")
    a.set_title(f"NVFP4 QAT, same global batches, {res['device']}")
    a.legend()
    a.grid(alpha=0.3)
    b.plot(steps, [abs(y - x) / x for x, y in zip(res["loss_one"], res["loss_two"])])
    b.axhline(res["tolerance_rel_loss"], color="r", lw=0.8, ls=":")
    b.set_yscale("log")
    b.set_ylabel("|rel. diff|")
    b.set_xlabel("step")
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", help="int tensor of token ids (torch.save)")
    p.add_argument("--config", help="LlamaConfig JSON")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--skip", type=int, default=5, help="steps left out of the throughput median")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=1e-2, help="stated max relative loss difference per step")
    p.add_argument("--out", required=True)
    p.add_argument("--compare", nargs=2, metavar=("ONE", "TWO"))
    p.add_argument("--name", default="qat_ddp_h200x2", help="basename of the comparison's JSON and PNG")
    p.add_argument("--dump", action="store_true", help="write --tokens and --config from the bundled data")
    args = p.parse_args()
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.dump:
        return dump(args.tokens, args.config)
    if args.compare:
        return compare(*args.compare, args.out, args.tolerance, args.name)
    train(args)


if __name__ == "__main__":
    main()
