"""`fp4kit quantize`: quantize a model (RTN, MSE scale search, GPTQ, MR-GPTQ, SignRound or MR-SignRound), compare it
with the original, export it."""

from __future__ import annotations

from fp4kit.formats import FP8Config, FP8Granularity

from .common import SCHEMES, SCALE_RULES, format_config, resolve_device


ACT_LABEL = {"none": "", "fp4": " W4A4", "fp8": " W4A8"}


def _input_config(config, activations: str):
    """What FP4Linear quantizes its inputs with: None, the weight format (W4A4), or FP8 per token (W4A8)."""
    if activations == "fp8":
        return FP8Config(FP8Granularity.TOKEN)
    return config if activations == "fp4" else None


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
    recipe = recipe_from_args(args)  # flag errors before the model loads
    device = resolve_device(args.device)
    print(f"loading {args.model} ...", flush=True)
    model, tokenizer, src = load_model(args.model)
    model.to(device)  # float32 as loaded: calibration, GPTQ and SignRound run where the model is
    params, bf16_bytes = _bf16_bytes(model)
    ids = None
    if args.eval_tokens:
        text = load_corpus("shakespeare")[: args.eval_tokens * 8]
        ids = tokenizer(text, return_tensors="pt").input_ids[0][: args.eval_tokens]
        before = perplexity(model, ids, context=args.context, desc="ppl bf16/float")
    report = _quantize_with_method(model, tokenizer, config, recipe, args)
    print(report.summary())
    if args.kv_cache == "fp8":
        _calibrate_kv(model, tokenizer, args)
    after = perplexity(model, ids, context=args.context, desc=f"ppl {args.scheme}") if ids is not None else None
    rows = [("original", before.perplexity if ids is not None else None, bf16_bytes),
            (f"{args.scheme} {args.method}" + ACT_LABEL[args.activations]
             + (f" KV FP8/{args.kv_granularity}" if args.kv_cache == "fp8" else ""),
             after.perplexity if after else None, export_bytes(model))]
    table = _table(rows, params, ids, args)
    card = model_card(config, report.quantized, list(report.excluded), source=src.label, table=table,
                      method=args.method, input_config=_input_config(config, args.activations))
    result = save_checkpoint(model.to("cpu"), out, tokenizer=tokenizer, overwrite=args.overwrite, card=card)
    print(table)
    print(f"wrote {result.path} ({len(result.shards)} shard(s), {result.total_bytes / 1e6:.1f} MB)")
    return 0


def _calibration_batches(tokenizer, samples: int, seq_len: int, device="cpu") -> list:
    """Token batches [1, seq_len] on `device` from tiny-shakespeare, after the text perplexity is measured on;
    BOS first in every window when the tokenizer starts text with one (Gemma-3)."""
    from fp4kit.data import load_corpus, token_windows
    from fp4kit.eval import bos_prefix

    text = load_corpus("shakespeare")[200_000:]
    ids, bos = bos_prefix(tokenizer, tokenizer(text[: samples * seq_len * 8], return_tensors="pt").input_ids[0])
    return [w.to(device) for w in token_windows(ids, samples, seq_len, bos=bos, what="calibration text (shakespeare)")]


def _model_device(model):
    return next(model.parameters()).device


def _calibrate_kv(model, tokenizer, args) -> None:
    """Static FP8 KV scales from the calibration text, observed on the quantized model (what serves)."""
    from fp4kit.nn.kv_quant import KVCacheConfig, KVScaleGranularity, enable_fp8_kv, observe_kv_amax, set_kv_scales

    batches = _calibration_batches(tokenizer, args.calib_samples, args.calib_seq_len, _model_device(model))
    kv = KVCacheConfig(KVScaleGranularity.HEAD if args.kv_granularity == "head" else KVScaleGranularity.TENSOR)
    set_kv_scales(model, observe_kv_amax(model, lambda: [model(b) for b in batches], kv), kv)
    enable_fp8_kv(model)
    print(f"FP8 KV cache: static {kv.granularity.value} scales from {len(batches)} x {args.calib_seq_len} tokens")


def recipe_from_args(args):
    """The PTQRecipe the flags describe (the dispatch itself lives in fp4kit.algorithms.apply_ptq)."""
    from fp4kit.algorithms import GPTQConfig, PTQMethod, PTQRecipe, RotationConfig, SignRoundConfig

    method = PTQMethod(args.method)
    rotation = None
    if method.rotates and (args.rotation_size or args.random_signs):
        block = args.rotation_size or format_config(args.scheme, args.scale_rule).block_size
        rotation = RotationConfig(block, args.random_signs, args.rotation_seed)
    elif not method.rotates and (args.rotation_size is not None or args.random_signs):
        raise ValueError("--rotation-size/--random-signs apply to --method mr-gptq and mr-signround")
    if method.signround and args.activations != "none":
        raise ValueError(f"--method {args.method} is W4A16 only (it simulates no activation quantization); "
                         "use --activations none")
    if not method.signround and (args.iters is not None or args.signround_batch_size is not None):
        raise ValueError("--iters/--signround-batch-size apply to --method signround and mr-signround")
    signround = SignRoundConfig(**{k: v for k, v in (("iters", args.iters), ("batch_size", args.signround_batch_size))
                                   if v is not None})
    if args.rounded_inputs and (args.activations == "none" or method not in (PTQMethod.GPTQ, PTQMethod.MR_GPTQ)):
        raise ValueError("--rounded-inputs applies to --method gptq / mr-gptq with --activations fp4 or fp8")
    if args.dynamic_scales and method not in (PTQMethod.GPTQ, PTQMethod.MR_GPTQ):
        raise ValueError("--dynamic-scales applies to --method gptq / mr-gptq")
    gptq = GPTQConfig(damp=args.damp, act_order=args.act_order, rounded_inputs=args.rounded_inputs,
                      dynamic_scales=args.dynamic_scales)
    return PTQRecipe(method, rotation, gptq,
                     sequential=args.sequential, state_dir=args.calib_state, signround=signround)


def _quantize_with_method(model, tokenizer, config, recipe, args):
    """rtn: round to nearest; mse: per-block scale search; gptq: GPTQ on calibration Hessians; mr-gptq:
    block-Hadamard rotation + MSE scales + GPTQ on the rotated Hessians; signround: learned rounding and scale
    clipping per decoder block (signSGD on the block's output error); mr-signround: SignRound started from
    MR-GPTQ's rotation and MSE scales (see fp4kit.algorithms.recipe).
    --activations fp4 adds W4A4 input quantization, NVFP4 with calibrated static input scales;
    --activations fp8 adds W4A8: FP8 inputs with dynamic per-token scales (nothing to calibrate)."""
    from fp4kit.algorithms import apply_ptq

    batches = None
    if recipe.method.needs_calibration or args.activations == "fp4":
        batches = _calibration_batches(tokenizer, args.calib_samples, args.calib_seq_len, _model_device(model))
    return apply_ptq(model, config, recipe, batches=batches, activations=_input_config(config, args.activations))


def _table(rows, params, ids, args) -> str:
    ctx = f"tiny-shakespeare, {ids.numel()} tokens, context {args.context}" if ids is not None else "not measured"
    lines = [f"| model | perplexity ({ctx}) | size | bits/param |", "|---|---|---|---|"]
    for name, ppl, nbytes in rows:
        size = f"{nbytes / 1e6:.1f} MB" if nbytes else "?"
        bpp = f"{8 * nbytes / params:.2f}" if nbytes else "?"
        lines.append(f"| {name} | {ppl:.3f} | {size} | {bpp} |" if ppl else f"| {name} | - | {size} | {bpp} |")
    return "\n".join(lines)


def register(sub) -> None:
    q = sub.add_parser("quantize", help="quantize a model, compare it with the original, export it for vLLM")
    q.add_argument("model", nargs="?", default="smollm2-135m",
                   help="embedded name (smollm2-135m, gemma3-270m), a local HF folder or a .gguf file")
    q.add_argument("--scheme", choices=SCHEMES, default="nvfp4")
    q.add_argument("--method", choices=["rtn", "mse", "gptq", "mr-gptq", "signround", "mr-signround"], default="rtn",
                   help="rtn: round to nearest; mse: per-block scale search; gptq: GPTQ with calibration; "
                        "mr-gptq: block-Hadamard input rotations + MSE scales + GPTQ; signround: learned rounding "
                        "and scale clipping per decoder block (SignRound/AutoRound, W4A16); mr-signround: "
                        "SignRound from MR-GPTQ's rotation and MSE scales")
    q.add_argument("--iters", type=int, default=None,
                   help="signround: signSGD steps per decoder block (default 200)")
    q.add_argument("--signround-batch-size", type=int, default=None,
                   help="signround: calibration sequences per step (default 8)")
    q.add_argument("--rotation-size", type=int, choices=[16, 32, 64, 128], default=None,
                   help="mr-gptq/mr-signround: Hadamard block size (default: the format's block, 16 NVFP4 / 32 MXFP4)")
    q.add_argument("--random-signs", action="store_true",
                   help="mr-gptq: random-sign Hadamard (fp4kit metadata; vLLM cannot serve it yet)")
    q.add_argument("--rotation-seed", type=int, default=0, help="mr-gptq: seed of the random signs")
    q.add_argument("--activations", choices=list(ACT_LABEL), default="none",
                   help="fp4: also quantize layer inputs (W4A4, the compressed-tensors NVFP4/MXFP4 presets)")
    q.add_argument("--kv-cache", choices=["none", "fp8"], default="none",
                   help="fp8: calibrate static FP8 E4M3 KV cache scales (k_scale/v_scale, kv_cache_scheme)")
    q.add_argument("--kv-granularity", choices=["tensor", "head"], default="tensor",
                   help="FP8 KV scales per layer (tensor, what vLLM reads) or per KV head")
    q.add_argument("--calib-samples", type=int, default=16,
                   help="calibration sequences (gptq, fp4 activations, fp8 KV cache)")
    q.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration sequence")
    q.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns in order of Hessian diagonal")
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ: dampening, a fraction of the mean diagonal")
    q.add_argument("--dynamic-scales", action="store_true",
                   help="GPTQ: pick each block's scale when the sweep reaches the block, from the weights as the "
                        "sweep has moved them (default: fixed from the weights before the sweep)")
    q.add_argument("--rounded-inputs", action="store_true",
                   help="GPTQ with --activations: Hessians of the inputs as the quantized layers round them")
    q.add_argument("--sequential", action="store_true",
                   help="GPTQ layer by layer on the quantized layers' outputs (bounded memory)")
    q.add_argument("--calib-state", metavar="DIR",
                   help="sequential GPTQ saves each finished layer here; rerunning resumes after the last one")
    q.add_argument("--scale-rule", choices=SCALE_RULES, help="MXFP4 shared-exponent rule")
    q.add_argument("--device", help="where calibration, GPTQ, SignRound and perplexity run: cpu or cuda "
                                    "(default: cuda when present); the checkpoint is written from the CPU")
    q.add_argument("--out", help="output folder (default out/MODEL-SCHEME)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--eval-tokens", type=int, default=2048, help="tokens of tiny-shakespeare for perplexity (0: skip)")
    q.add_argument("--context", type=int, default=512, help="perplexity window")
    q.set_defaults(func=cmd_quantize)
