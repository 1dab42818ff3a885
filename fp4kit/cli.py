"""The `fp4kit` command: argument parsing that calls the library, nothing more."""

from __future__ import annotations

import argparse
import sys

import torch

import fp4kit
from fp4kit.formats import E2M1_VALUES, MXFP4Config, NVFP4Config, ScaleRule, quantize, sqnr_db

SCHEMES = ("nvfp4", "mxfp4")


def format_config(scheme: str, scale_rule: str | None = None):
    if scheme == "nvfp4":
        return NVFP4Config()
    if scheme == "mxfp4":
        return MXFP4Config(ScaleRule(scale_rule)) if scale_rule else MXFP4Config()
    raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")


def load_tensor_file(path: str) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or a .pt/.bin file loaded with weights_only=True (no pickle code)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, torch.Tensor):
        return {"tensor": obj}
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ValueError(f"{path}: expected a tensor or a dict of tensors, got {type(obj).__name__}")


def cmd_formats(args) -> int:
    print("E2M1 codes (bit 3 = sign, element 2j in the low nibble):")
    print("code  bits  value")
    for code, value in enumerate(E2M1_VALUES):
        print(f"{code:>4}  {code:04b}  {value:+g}")
    if args.roundtrip:
        config = format_config(args.scheme, args.scale_rule)
        print(f"\nround trip through {config.name} ({args.roundtrip}):")
        print(f"{'tensor':<40} {'shape':<18} {'SQNR dB':>8} {'max err':>10} {'bits/el':>8}")
        for name, t in load_tensor_file(args.roundtrip).items():
            if not t.is_floating_point():
                print(f"{name:<40} skipped: dtype {t.dtype} is not floating point")
                continue
            if t.dim() == 0 or t.shape[-1] % config.block_size:
                print(f"{name:<40} skipped: last dim of {tuple(t.shape)} not divisible by {config.block_size}")
                continue
            qt = quantize(t, config, name=name)
            deq = qt.dequantize()
            err = (deq - t.float()).abs().max().item()
            print(f"{name:<40} {str(tuple(t.shape)):<18} {sqnr_db(t.float(), deq):>8.2f} {err:>10.3g} "
                  f"{qt.bits_per_element:>8.3f}")
    return 0


def _bf16_bytes(model) -> tuple[int, int]:
    """(parameters, bytes as a bf16 checkpoint), tied tensors counted once."""
    seen, params = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        params += t.numel()
    return params, 2 * params


def cmd_quantize(args) -> int:
    import pathlib

    from fp4kit.data import load_corpus
    from fp4kit.eval import perplexity
    from fp4kit.io import export_bytes, load_model, save_checkpoint
    from fp4kit.io.checkpoint import model_card

    out = pathlib.Path(args.out or f"out/{pathlib.Path(args.model).name}-{args.scheme}")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    config = format_config(args.scheme, args.scale_rule)
    print(f"loading {args.model} ...", flush=True)
    model, tokenizer, src = load_model(args.model)
    params, bf16_bytes = _bf16_bytes(model)
    ids = None
    if args.eval_tokens:
        text = load_corpus("shakespeare")[: args.eval_tokens * 8]
        ids = tokenizer(text, return_tensors="pt").input_ids[0][: args.eval_tokens]
        before = perplexity(model, ids, context=args.context, desc="ppl bf16/float")
    report = _quantize_with_method(model, tokenizer, config, args)
    print(report.summary())
    after = perplexity(model, ids, context=args.context, desc=f"ppl {args.scheme}") if ids is not None else None
    rows = [("original", before.perplexity if ids is not None else None, bf16_bytes),
            (f"{args.scheme} {args.method}" + (" W4A4" if args.activations == "fp4" else ""),
             after.perplexity if after else None, export_bytes(model))]
    table = _table(rows, params, ids, args)
    card = model_card(config, report.quantized, list(report.excluded), source=src.label, table=table,
                      method=args.method, input_config=config if args.activations == "fp4" else None)
    result = save_checkpoint(model, out, tokenizer=tokenizer, overwrite=args.overwrite, card=card)
    print(table)
    print(f"wrote {result.path} ({len(result.shards)} shard(s), {result.total_bytes / 1e6:.1f} MB)")
    return 0


def _calibration_batches(tokenizer, samples: int, seq_len: int) -> list:
    """Token batches [1, seq_len] from tiny-shakespeare, taken after the text perplexity is measured on."""
    from fp4kit.data import load_corpus

    text = load_corpus("shakespeare")[200_000:]
    ids = tokenizer(text[: samples * seq_len * 8], return_tensors="pt").input_ids[0]
    if ids.numel() < samples * seq_len:
        raise ValueError(f"calibration text too short for {samples} x {seq_len} tokens")
    return [ids[i * seq_len:(i + 1) * seq_len].unsqueeze(0) for i in range(samples)]


def _quantize_with_method(model, tokenizer, config, args):
    """rtn: round to nearest; mse: per-block scale search; gptq: GPTQ on calibration Hessians.
    --activations fp4 adds W4A4 input quantization, NVFP4 with calibrated static input scales."""
    from fp4kit.algorithms import GPTQConfig, apply_gptq, apply_scale_search, collect_hessians
    from fp4kit.nn import observe_input_amax

    batches = None
    if args.method == "gptq" or args.activations == "fp4":
        batches = _calibration_batches(tokenizer, args.calib_samples, args.calib_seq_len)
    extra = {}
    if args.activations == "fp4":
        amax = observe_input_amax(model, lambda: [model(b) for b in batches])
        extra = {"activations": config, "input_amax": amax}
    if args.method == "mse":
        return apply_scale_search(model, config, **extra)
    if args.method == "gptq":
        hessians = collect_hessians(model, batches, config)
        result = apply_gptq(model, config, hessians, GPTQConfig(damp=args.damp, act_order=args.act_order), **extra)
        return result.report
    return fp4kit.quantize_(model, config, **extra)


def _table(rows, params, ids, args) -> str:
    ctx = f"tiny-shakespeare, {ids.numel()} tokens, context {args.context}" if ids is not None else "not measured"
    lines = [f"| model | perplexity ({ctx}) | size | bits/param |", "|---|---|---|---|"]
    for name, ppl, nbytes in rows:
        size = f"{nbytes / 1e6:.1f} MB" if nbytes else "?"
        bpp = f"{8 * nbytes / params:.2f}" if nbytes else "?"
        lines.append(f"| {name} | {ppl:.3f} | {size} | {bpp} |" if ppl else f"| {name} | - | {size} | {bpp} |")
    return "\n".join(lines)


def cmd_inspect(args) -> int:
    import json

    from fp4kit.io import checkpoint_summary, load_checkpoint

    model, _, info = load_checkpoint(args.path)
    summary = checkpoint_summary(info, model)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['path']}: {summary['format']}  ({summary['config']})")
    print(f"  {summary['parameters']:,} parameters, {summary['bytes'] / 1e6:.1f} MB, "
          f"{summary['bits_per_parameter']:.2f} bits/param")
    print(f"  quantized: {len(summary['quantized_layers'])} linear layers")
    for name, reason in summary["excluded_layers"].items():
        print(f"  excluded {name}: {reason}")
    return 0


def _load_any(spec: str, dtype):
    """An exported/quantized checkpoint folder through load_checkpoint, anything else through load_model."""
    import pathlib

    from fp4kit.io import detect_format, load_checkpoint, load_model

    path = pathlib.Path(spec)
    if path.is_dir() and (path / "config.json").exists() and detect_format(path)[0] != "dense":
        model, tok, info = load_checkpoint(path, dtype=dtype)
        return model, tok, {"model": path.name, "format": info.format, "method": "checkpoint"}
    model, tok, src = load_model(spec, dtype=dtype)
    return model, tok, {"model": src.label, "format": "bf16" if dtype == torch.bfloat16 else "fp32", "method": "none"}


def cmd_eval(args) -> int:
    from fp4kit.eval import evaluate, parse_tasks, write_jsonl

    tasks = parse_tasks(args.tasks)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tok, meta = _load_any(args.model, dtype)
    if args.quantize != "none":
        report = fp4kit.quantize_(model, format_config(args.quantize, args.scale_rule))
        meta |= {"format": args.quantize + (f"-{args.scale_rule}" if args.scale_rule else ""), "method": "rtn",
                 "quantized_layers": len(report.quantized)}
    model = model.to(device).eval()
    records = evaluate(model, tok, tasks, limit=args.limit, seed=args.seed, batch_size=args.batch_size,
                       ppl_tokens=args.ppl_tokens, context=args.context, meta=meta)
    print(f"| task | metric | value | stderr | n |\n|---|---|---|---|---|")
    for r in records:
        se = f"{r['stderr']:.4f}" if r["stderr"] else "-"
        print(f"| {r['task']} | {r['metric']} | {r['value']:.4f} | {se} | {r['n']} |")
    if args.json:
        write_jsonl(records, args.json)
        print(f"appended {len(records)} records to {args.json}")
    return 0


def cmd_compare(args) -> int:
    from fp4kit.eval import read_jsonl
    from fp4kit.eval.report import compare_plot, compare_table, group_runs

    records = []
    for path in args.files:
        recs = read_jsonl(path)
        if not recs:
            raise ValueError(f"{path}: no records")
        records += recs
    runs = group_runs(records)
    print(compare_table(runs))
    if args.plot:
        compare_plot(runs, args.plot)
        print(f"wrote {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fp4kit", description=__doc__)
    p.add_argument("--version", action="version", version=f"fp4kit {fp4kit.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("formats", help="print the E2M1 table; round-trip a tensor file through a format")
    f.add_argument("--roundtrip", metavar="FILE", help=".safetensors, or .pt loaded with weights_only=True")
    f.add_argument("--scheme", choices=SCHEMES, default="nvfp4")
    f.add_argument("--scale-rule", choices=[r.value for r in ScaleRule], help="MXFP4 shared-exponent rule")
    f.set_defaults(func=cmd_formats)
    q = sub.add_parser("quantize", help="quantize a model, compare it with the original, export it for vLLM")
    q.add_argument("model", nargs="?", default="smollm2-135m",
                   help="embedded name (smollm2-135m, gemma3-270m), a local HF folder or a .gguf file")
    q.add_argument("--scheme", choices=SCHEMES, default="nvfp4")
    q.add_argument("--method", choices=["rtn", "mse", "gptq"], default="rtn",
                   help="rtn: round to nearest; mse: per-block scale search; gptq: GPTQ with calibration")
    q.add_argument("--activations", choices=["none", "fp4"], default="none",
                   help="fp4: also quantize layer inputs (W4A4, the compressed-tensors NVFP4/MXFP4 presets)")
    q.add_argument("--calib-samples", type=int, default=16, help="calibration sequences (gptq, fp4 activations)")
    q.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration sequence")
    q.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns in order of Hessian diagonal")
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ: dampening, a fraction of the mean diagonal")
    q.add_argument("--scale-rule", choices=[r.value for r in ScaleRule], help="MXFP4 shared-exponent rule")
    q.add_argument("--out", help="output folder (default out/MODEL-SCHEME)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--eval-tokens", type=int, default=2048, help="tokens of tiny-shakespeare for perplexity (0: skip)")
    q.add_argument("--context", type=int, default=512, help="perplexity window")
    q.set_defaults(func=cmd_quantize)
    e = sub.add_parser("eval", help="evaluate a model or checkpoint on bundled tasks")
    e.add_argument("model", help="embedded name, HF folder, .gguf file or fp4kit/compressed-tensors checkpoint")
    e.add_argument("--tasks", default="ppl:shakespeare,hellaswag,arc_easy,arc_challenge,piqa,winogrande",
                   help="comma list: ppl:shakespeare|coqa|drop, hellaswag, arc_easy, arc_challenge, piqa, "
                        "winogrande, mmlu, lambada, basic_arithmetic, gsm8k, math500")
    e.add_argument("--limit", type=int, help="items per task (a fixed-seed sample)")
    e.add_argument("--seed", type=int, default=1234)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    e.add_argument("--quantize", choices=("none",) + SCHEMES, default="none", help="RTN-quantize in memory first")
    e.add_argument("--scale-rule", choices=[r.value for r in ScaleRule], help="MXFP4 shared-exponent rule")
    e.add_argument("--ppl-tokens", type=int, default=16384)
    e.add_argument("--context", type=int, default=1024, help="perplexity window")
    e.add_argument("--json", help="append result records (JSON lines) to this file")
    e.set_defaults(func=cmd_eval)
    c = sub.add_parser("compare", help="table (and plot) of result files; runs are grouped by model, format "
                                       "and method, in order of appearance, and the first is the base")
    c.add_argument("files", nargs="+")
    c.add_argument("--plot", help="write a PNG plot here")
    c.set_defaults(func=cmd_compare)
    i = sub.add_parser("inspect", help="describe a quantized checkpoint folder")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, OSError) as e:
        print(f"fp4kit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
