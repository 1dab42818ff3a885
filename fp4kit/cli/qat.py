"""`fp4kit qat`: quantization-aware training / distillation of a model into FP4, then export it.

    fp4kit qat smollm2-135m --scheme nvfp4 --steps 300 --out out/smol-qad

loads the model (FP32 master weights), quantizes it (RTN or GPTQ start), trains it with the fake-
quant forward against the teacher (default: the model itself in bf16, loss = KL, i.e. QAD) on the
first 90% of the text, measures perplexity on the held-out last 10% before and after, and writes

    OUT/model/          the FP4 checkpoint (compressed-tensors layout, vLLM-loadable)
    OUT/log.jsonl       one line per step (loss, kd, ce, lr, grad_norm, tokens/s)
    OUT/loss.png        the curves
    OUT/checkpoints/    training state every --save-every steps: rerun the command to resume
    OUT/result.json     perplexities and the fraction of the PTQ gap recovered

With `--swiglu-clamp LIMIT` every gated MLP computes down(act(min(gate, L)) * clamp(up, -L, L)) in
training and evaluation (DeepSeek-V4's stability option). The exported Llama-style checkpoint has
no place for the limit, so runtimes run it unclamped: result.json also gives the perplexity without
the clamp and the share of gate/up values the limit bound on the held-out text.
"""

from __future__ import annotations

import json
import pathlib

from .common import SCALE_RULES, SCHEMES, format_config


def _text(data: str) -> str:
    from fp4kit.data import CORPUS_IDS, load_corpus

    if data in CORPUS_IDS:
        return load_corpus(data)
    path = pathlib.Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"--data {data!r}: not a bundled corpus ({', '.join(CORPUS_IDS)}) or a text file")
    return path.read_text(encoding="utf-8")


def _gptq_start(model, config, train, args, bos: int | None = None) -> dict:
    """GPTQ of a copy on `calib_samples` consecutive windows of `calib_seq_len` tokens (BOS first when given)."""
    import copy

    from fp4kit.algorithms import GPTQConfig, apply_gptq, collect_hessians
    from fp4kit.data import token_windows

    work = copy.deepcopy(model)
    device = next(model.parameters()).device
    batches = [w.to(device) for w in token_windows(train, args.calib_samples, args.calib_seq_len, bos=bos,
                                                    what="training text (GPTQ start)")]
    result = apply_gptq(work, config, collect_hessians(work, batches, config), GPTQConfig())
    return {name: work.get_submodule(name).quantized_weight() for name in result.report.quantized}


def cmd_qat(args) -> int:
    import copy
    from dataclasses import replace

    import torch

    from fp4kit.data import token_windows
    from fp4kit.eval import bos_prefix, perplexity
    from fp4kit.io import load_model, save_checkpoint
    from fp4kit.io.checkpoint import model_card
    from fp4kit.nn.fake_quant import QATConfig, ScaleMode, convert, prepare_qat
    from fp4kit.nn.swiglu_clamp import reset_clip_counts
    from fp4kit.train.qat import Loss, TrainConfig, Trainable, split_tokens, train_qat

    out = pathlib.Path(args.out)
    if (out / "model").exists() and not args.overwrite:
        raise FileExistsError(f"{out / 'model'} already exists; pass --overwrite to replace it")
    config = format_config(args.scheme, args.scale_rule)
    ignore = ("lm_head", *[p for p in (args.keep_bf16 or "").split(",") if p])
    qat_config = QATConfig(config, activations=config if args.activations == "fp4" else None,
                           scales=ScaleMode(args.scales), ignore=ignore, swiglu_clamp=args.swiglu_clamp)
    train_config = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup, batch_size=args.batch_size,
                               seq_len=args.seq_len, grad_accum=args.grad_accum, loss=Loss(args.loss),
                               trainable=Trainable(args.trainable), save_every=args.save_every, seed=args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    text = _text(args.data)  # before the (slow) model load: a wrong path fails at once
    print(f"loading {args.model} ...", flush=True)
    model, tokenizer, src = load_model(args.model, dtype=torch.float32)
    model.to(device)
    teacher = None
    if train_config.loss is not Loss.CE:
        teacher = (load_model(args.teacher, dtype=torch.bfloat16)[0] if args.teacher
                   else copy.deepcopy(model).to(torch.bfloat16)).to(device).eval()
    ids, bos = bos_prefix(tokenizer, tokenizer(text, return_tensors="pt").input_ids[0])
    if bos is not None:  # a tokenizer that starts every text with BOS (Gemma-3): every training window and
        train_config = replace(train_config, bos_token=bos)  # perplexity window starts with it too
    train, held_out = split_tokens(ids, 0.1)
    held_out = held_out[: args.eval_tokens]
    start = _gptq_start(model, config, train, args, bos) if args.start == "gptq" else None
    report = prepare_qat(model, qat_config, start=start)
    print(report.summary())
    if args.activations == "fp4":  # NVFP4 inputs: static scales start from a few training windows' amax
        with torch.no_grad():
            model.train()(torch.cat(token_windows(train, 4, args.seq_len, bos=bos, what="training text")).to(device))

    def ppl(m, desc):
        return (perplexity(m, held_out, context=args.context, prefix_token=bos, desc=desc).perplexity
                if args.eval_tokens else None)

    result = {"model": src.label, "scheme": args.scheme, "start": args.start, "teacher": args.teacher or "self (bf16)",
              "train": train_config.as_json(), "eval_tokens": int(held_out.numel())}
    with torch.no_grad():
        result["ppl_teacher"] = ppl(teacher, "ppl teacher") if teacher is not None else None
        result["ppl_start"] = ppl(model.eval(), f"ppl {args.scheme} {args.start}")
    trained = train_qat(model, train.to("cpu"), train_config, teacher=teacher, out=out)
    convert(model, dtype=torch.bfloat16)
    with torch.no_grad():
        reset_clip_counts(model)
        result["ppl_qat"] = ppl(model, f"ppl {args.scheme} qat")
        if args.swiglu_clamp is not None:
            result |= _unclamped(model, ppl, args)
    if result["ppl_teacher"] is not None and result["ppl_start"] is not None:
        gap = result["ppl_start"] - result["ppl_teacher"]
        result["recovered"] = (result["ppl_start"] - result["ppl_qat"]) / gap if gap else None
    result |= {"resumed_from": trained.resumed_from, "tokens_per_s": trained.tokens_per_s, "seconds": trained.seconds}
    table = _table(result, args)
    card = model_card(config, report.quantized, list(report.excluded), source=src.label, table=table,
                      method=f"QAT ({train_config.loss.value}, {args.steps} steps, {args.start} start)",
                      input_config=qat_config.activations)
    saved = save_checkpoint(model, out / "model", tokenizer=tokenizer, overwrite=args.overwrite, card=card)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(table)
    print(f"wrote {saved.path} ({saved.total_bytes / 1e6:.1f} MB), logs in {out}")
    return 0


def _unclamped(model, ppl, args) -> dict:
    """How often the SwiGLU limit bound in the (clamped) evaluation just run, and the perplexity with the
    limit lifted: what the exported checkpoint computes in a runtime without the clamp."""
    from fp4kit.nn.swiglu_clamp import clip_fraction, swiglu_clamps

    fraction = clip_fraction(model) if args.eval_tokens else None
    clamps = swiglu_clamps(model).values()
    for m in clamps:
        m.limit = float("inf")
    unclamped = ppl(model, f"ppl {args.scheme} qat, clamp lifted")
    for m in clamps:
        m.limit = args.swiglu_clamp
    return {"swiglu_clamp": args.swiglu_clamp, "ppl_qat_unclamped": unclamped, "swiglu_clip_fraction": fraction}


def _table(r: dict, args) -> str:
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    rec = r.get("recovered")
    lines = [f"| model | perplexity (held-out {args.data}, {r['eval_tokens']} tokens) |", "|---|---|",
             f"| teacher (bf16) | {f(r['ppl_teacher'])} |", f"| {args.scheme} {args.start} | {f(r['ppl_start'])} |",
             f"| {args.scheme} QAT | {f(r['ppl_qat'])} |"]
    if r.get("swiglu_clamp") is not None:
        share = r["swiglu_clip_fraction"]
        lines.append(f"| {args.scheme} QAT, SwiGLU clamp lifted (as exported) | {f(r['ppl_qat_unclamped'])} |")
        lines.append(f"\nTrained with a SwiGLU clamp at {r['swiglu_clamp']:g}; it bound "
                     f"{'-' if share is None else f'{100 * share:.4f}%'} of the gate/up values on the held-out text. "
                     "The checkpoint's architecture has no clamp: other runtimes compute the lifted row.")
    if rec is not None:
        lines.append(f"\nQAT recovered {100 * rec:.0f}% of the {args.start.upper()} gap to the teacher.")
    return "\n".join(lines)


def register(sub) -> None:
    q = sub.add_parser("qat", help="quantization-aware training / distillation into FP4, then export")
    q.add_argument("model", nargs="?", default="smollm2-135m",
                   help="embedded name (smollm2-135m, gemma3-270m), a local HF folder or a .gguf file")
    q.add_argument("--scheme", choices=SCHEMES, default="nvfp4")
    q.add_argument("--scale-rule", choices=SCALE_RULES, help="MXFP4 shared-exponent rule (rceil: DeepSeek-V4)")
    q.add_argument("--teacher", help="teacher model (default: the model itself in bf16)")
    q.add_argument("--loss", choices=["kd", "ce", "both"], default="kd", help="kd: KL to the teacher (QAD); ce: the text; both: an even mix")
    q.add_argument("--data", default="shakespeare", help="bundled corpus (shakespeare, coqa, drop) or a text file")
    q.add_argument("--steps", type=int, default=300)
    q.add_argument("--lr", type=float, default=5e-5)
    q.add_argument("--warmup", type=int, default=15, help="warm-up steps before the cosine decay")
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--grad-accum", type=int, default=1)
    q.add_argument("--trainable", choices=["quantized", "non-embedding", "all"], default="non-embedding")
    q.add_argument("--start", choices=["rtn", "gptq"], default="rtn", help="PTQ start of the FP4 weights")
    q.add_argument("--scales", choices=["dynamic", "frozen"], default="dynamic",
                   help="dynamic: scales follow the weights each step; frozen: keep the start's scales")
    q.add_argument("--activations", choices=["none", "fp4"], default="none", help="fp4: W4A4 fake quantization")
    q.add_argument("--swiglu-clamp", type=float, metavar="LIMIT",
                   help="clamp every gated MLP: down(act(min(gate, L)) * clamp(up, -L, L)) (DeepSeek-V4 uses 10)")
    q.add_argument("--keep-bf16", help="comma-separated layer patterns kept unquantized (besides lm_head)")
    q.add_argument("--calib-samples", type=int, default=32, help="GPTQ start: calibration sequences")
    q.add_argument("--calib-seq-len", type=int, default=512)
    q.add_argument("--save-every", type=int, default=100, help="training checkpoint interval (0: none)")
    q.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens for perplexity (0: skip)")
    q.add_argument("--context", type=int, default=512)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    q.add_argument("--out", required=True, help="output folder (model/, logs, checkpoints)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing OUT/model")
    q.set_defaults(func=cmd_qat)
