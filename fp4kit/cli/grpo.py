"""`fp4kit grpo`: GRPO with verifiable rewards on a frozen FP4 (or bf16) base with LoRA adapters."""

from __future__ import annotations

import torch

from .common import SCHEMES, format_config

LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")


def cmd_grpo(args) -> int:
    import pathlib

    from fp4kit.io import load_model
    from fp4kit.nn.lora import LoRAConfig
    from fp4kit.train.grpo import GRPOConfig, NoiseSchedule, prepare_policy, run_task

    out = pathlib.Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise FileExistsError(f"{out} is not empty; pass --resume to continue the run in it, or choose another --out")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"loading {args.model} ...", flush=True)
    model, tokenizer, src = load_model(args.model, dtype=dtype)
    model.to(device)
    lora = LoRAConfig(targets=tuple(args.targets.split(",")), rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                      train_norms=args.train_norms)
    info = prepare_policy(model, args.base, format_config(args.scheme), lora)
    print(f"policy: {info}")
    config = GRPOConfig(
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        temperature=args.temperature, beta=args.beta, epsilon=args.epsilon, epsilon_high=args.epsilon_high,
        loss_type=args.loss_type, scale_rewards=args.scale_rewards, num_iterations=args.num_iterations,
        mask_truncated_completions=args.mask_truncated_completions, learning_rate=args.lr, max_steps=args.steps,
        save_steps=args.save_steps, seed=args.seed, prompts_per_step=args.prompts_per_step,
        micro_batch_size=args.micro_batch_size, noise=NoiseSchedule() if args.aqn else None)
    s = run_task(model, tokenizer, args.task, config, out, eval_limit=args.eval_limit, format_weight=args.format_weight,
                 base_model_name=src.label, resume=args.resume)
    print("| base | before | after | reward first->last | rollout tok/s |\n|---|---|---|---|---|")
    before = f"{s['before']['accuracy']:.3f}" if "before" in s else "-"
    after = f"{s['after']['accuracy']:.3f}" if "after" in s else "-"
    print(f"| {info['base']}{'-' + args.scheme if args.base == 'fp4' else ''} | {before} | {after} | "
          f"{s.get('reward_first', float('nan')):.3f} -> {s.get('reward_last', float('nan')):.3f} | "
          f"{s.get('rollout_tokens_per_s', 0):.0f} |")
    print(f"wrote {out}/metrics.jsonl, reward.png, summary.json, adapter/")
    return 0


def register(sub) -> None:
    g = sub.add_parser("grpo", help="GRPO with verifiable rewards: LoRA adapters on a frozen FP4 or bf16 base")
    g.add_argument("model", help="embedded name, HF folder or .gguf file")
    g.add_argument("--task", default="basic_arithmetic", choices=("basic_arithmetic", "gsm8k"))
    g.add_argument("--steps", type=int, default=100, help="rollout batches (each num_iterations optimizer updates)")
    g.add_argument("--out", required=True, help="run folder: metrics.jsonl, reward.png, checkpoints/, adapter/")
    g.add_argument("--base", choices=("fp4", "bf16"), default="fp4")
    g.add_argument("--scheme", choices=SCHEMES, default="nvfp4")
    g.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--seed", type=int, default=0)
    r = g.add_argument_group("GRPO (TRL GRPOConfig names)")
    r.add_argument("--num-generations", type=int, default=8)
    r.add_argument("--prompts-per-step", type=int, default=16)
    r.add_argument("--micro-batch-size", type=int, default=64)
    r.add_argument("--max-completion-length", type=int, default=16)
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--lr", type=float, default=1e-5)
    r.add_argument("--beta", type=float, default=0.0)
    r.add_argument("--epsilon", type=float, default=0.2)
    r.add_argument("--epsilon-high", type=float)
    r.add_argument("--loss-type", choices=LOSS_TYPES, default="dapo")
    r.add_argument("--scale-rewards", choices=SCALE_REWARDS, default="group")
    r.add_argument("--num-iterations", type=int, default=1)
    r.add_argument("--mask-truncated-completions", action="store_true")
    r.add_argument("--format-weight", type=float, default=0.0, help="weight of the answer-format reward (0: off)")
    r.add_argument("--save-steps", type=int, default=25)
    r.add_argument("--eval-limit", type=int, default=500, help="held-out prompts scored before and after (0: skip)")
    r.add_argument("--aqn", action="store_true", help="QeRL adaptive quantization noise on the norms during rollouts")
    a = g.add_argument_group("LoRA")
    a.add_argument("--rank", type=int, default=16)
    a.add_argument("--alpha", type=float, default=32.0)
    a.add_argument("--dropout", type=float, default=0.0)
    a.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    a.add_argument("--train-norms", action="store_true")
    g.set_defaults(func=cmd_grpo)
