"""`fp4kit generate`, `fp4kit chat` and `fp4kit bench`: the generation engine from the command line."""

from __future__ import annotations

import json
import sys

import torch

from .common import SCHEMES, format_config, load_any, resolve_device

KV_CACHE = {"bf16": None, "fp8": torch.float8_e4m3fn}  # None: the model's own dtype


def _device(args) -> torch.device:
    return resolve_device(args.device)


def load(spec: str, device: torch.device):
    """(model on device, tokenizer or None) for an embedded name, folder, .gguf, checkpoint or llama3-8b-random."""
    from fp4kit.engine.random_model import RANDOM_MODELS, random_llama

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec in RANDOM_MODELS:
        return random_llama(device, dtype), None
    model, tok, _ = load_any(spec, dtype)
    return model.to(device).eval(), tok


def quantize(model, scheme: str) -> None:
    if scheme != "none":
        import fp4kit

        report = fp4kit.quantize_(model, format_config(scheme), progress=False)
        print(f"{scheme}: quantized {len(report.quantized)} linear layers, excluded {len(report.excluded)}",
              file=sys.stderr)


def engine_for(model, tok, args, max_batch: int, max_seq_len: int, lm_head: str | None = None,
               kv_cache: str | None = None):
    """The engine the flags ask for; `lm_head` / `kv_cache` override --lm-head / --kv-cache (bench's baseline)."""
    from fp4kit.engine import Engine

    kv = KV_CACHE[kv_cache or args.kv_cache]
    return Engine(model, tok, max_batch=max_batch, max_seq_len=max_seq_len,
                  kv_dtype=kv or model.get_input_embeddings().weight.dtype, cuda_graphs=not args.no_graphs,
                  fused=not args.unfused, lm_head=lm_head or args.lm_head, prefill_graphs=not args.no_prefill_graphs)


def sampling(args):
    from fp4kit.engine import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, stop=tuple(args.stop or ()), seed=args.seed)


def needs_tokenizer(spec: str, command: str) -> None:
    from fp4kit.engine.random_model import RANDOM_MODELS

    if spec in RANDOM_MODELS:
        raise ValueError(f"{spec} has no tokenizer; {command} needs one (use `fp4kit bench` for speed runs)")


def cmd_generate(args) -> int:
    from fp4kit.engine import chat_ids

    needs_tokenizer(args.model, "generate")
    model, tok = load(args.model, _device(args))
    quantize(model, args.scheme)
    prompts = [chat_ids(tok, [{"role": "user", "content": p}]) if args.chat else p for p in args.prompt]
    eng = engine_for(model, tok, args, max_batch=len(prompts), max_seq_len=args.max_seq_len)
    streaming = args.stream and len(prompts) == 1
    outs = eng.generate(prompts, sampling(args),
                        stream=(lambda i, t, d: print(d, end="", flush=True)) if streaming else None)
    for i, o in enumerate(outs):
        if streaming:
            print()
        else:
            print(f"--- {i} ({o.finish_reason.value}, {len(o.token_ids)} tokens)\n{o.text}")
    return 0


def cmd_chat(args) -> int:
    from fp4kit.engine import chat_ids

    needs_tokenizer(args.model, "chat")
    model, tok = load(args.model, _device(args))
    quantize(model, args.scheme)
    eng = engine_for(model, tok, args, max_batch=1, max_seq_len=args.max_seq_len)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        out = eng.generate([chat_ids(tok, messages)], sampling(args),
                           stream=lambda i, t, d: print(d, end="", flush=True))[0]
        print(flush=True)
        messages.append({"role": "assistant", "content": out.text})


def cmd_bench(args) -> int:
    from fp4kit.engine.bench import BenchConfig, bench_engine, copy_bandwidth

    device = _device(args)
    cfg = BenchConfig(tuple(int(b) for b in args.batch.split(",")), args.prompt_len, args.gen_len, args.repeats)
    model, tok = load(args.model, device)
    bw = copy_bandwidth(device)
    results = []
    for label in ["bf16" if device.type == "cuda" else "fp32", args.scheme]:
        if label == args.scheme:
            if args.scheme == "none":
                break
            quantize(model, args.scheme)
        head = args.lm_head if label == args.scheme else "model"
        kv = args.kv_cache if label == args.scheme or args.baseline_kv_cache == "same" else args.baseline_kv_cache
        eng = engine_for(model, tok, args, max_batch=max(cfg.batches), max_seq_len=cfg.prompt_len + cfg.gen_len,
                         lm_head=head, kv_cache=kv)
        for r in bench_engine(eng, cfg, bw):
            results.append({"weights": label, "kv_cache": kv, "lm_head": head, "fused": not args.unfused,
                            "model": args.model, **r})
        del eng
    base = {r["batch"]: r["decode_tok_s"] for r in results if r["weights"] == results[0]["weights"]}
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s, prompt {cfg.prompt_len}, gen {cfg.gen_len}, kv {args.kv_cache} "
          f"(baseline {results[0]['kv_cache']}), FP4 run's head {args.lm_head}, {'unfused' if args.unfused else 'fused'}")
    print("| weights | kv | batch | decode tok/s | TTFT ms | step ms | roofline tok/s | % of roofline | vs first |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        r["speedup"] = r["decode_tok_s"] / base[r["batch"]]
        print(f"| {r['weights']} | {r['kv_cache']} | {r['batch']} | {r['decode_tok_s']:.1f} | {r['ttft_ms']:.1f} | {r['step_ms']:.2f} "
              f"| {r['roofline_tok_s']:.1f} | {100 * r['roofline_frac']:.0f}% | {r['speedup']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "bandwidth": bw, "results": results}, f, indent=1)
    return 0


def _engine_flags(p) -> None:
    p.add_argument("--lm-head", choices=("model", "int8", "nvfp4"), default="model",
                   help="output head: the model's own (default), an INT8 per-row copy (half the bf16 head's bytes; "
                        "perplexity within 0.2%% of the model's head on SmolLM2 and Gemma-3; 0.2 ms less per token on "
                        "an 8B model on the H100) or an NVFP4 copy (0.27 ms less; +8-11%% perplexity)")
    p.add_argument("--unfused", action="store_true",
                   help="call the model's modules one by one instead of the fused decode step (for comparison)")
    p.add_argument("--no-prefill-graphs", action="store_true",
                   help="run every prefill eagerly (default: a prompt length seen twice is captured as a CUDA graph, "
                        "prompts padded to a multiple of 64 tokens)")


def _common(p, max_new_tokens: int = 128) -> None:
    p.add_argument("model", help="embedded name, HF folder, .gguf file, fp4kit checkpoint, or llama3-8b-random")
    p.add_argument("--scheme", choices=SCHEMES + ("none",), default="none", help="RTN-quantize the linears first")
    p.add_argument("--kv-cache", choices=tuple(KV_CACHE), default="bf16", help="bf16 (the model's dtype) or fp8")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--no-graphs", action="store_true", help="decode without CUDA graphs")
    p.add_argument("--max-seq-len", type=int, default=2048, help="KV cache length")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    _engine_flags(p)


def register(sub) -> None:
    g = sub.add_parser("generate", help="complete prompts with the engine (FP4 weights, FP8 KV cache optional)")
    _common(g)
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable: one batch)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    g.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt)")
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat with streaming replies (reads stdin; /exit ends)")
    _common(c, max_new_tokens=256)
    c.add_argument("--system", help="system message")
    c.set_defaults(func=cmd_chat)
    b = sub.add_parser("bench", help="decode speed of bf16 and FP4 weights in one process, with the roofline")
    b.add_argument("model", help="llama3-8b-random, or any model generate takes")
    b.add_argument("--batch", default="1,8,32", help="comma list of batch sizes")
    b.add_argument("--prompt-len", type=int, default=512)
    b.add_argument("--gen-len", type=int, default=256)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--scheme", choices=SCHEMES + ("none",), default="nvfp4")
    b.add_argument("--kv-cache", choices=tuple(KV_CACHE), default="bf16")
    b.add_argument("--baseline-kv-cache", choices=("same", *KV_CACHE), default="same",
                   help="the unquantized baseline's KV cache: the same as --kv-cache (default), or its own (e.g. "
                        "bf16 against an FP4 run with --kv-cache fp8: the all-bf16 model against the whole FP4 setup)")
    b.add_argument("--device")
    b.add_argument("--no-graphs", action="store_true")
    _engine_flags(b)
    b.add_argument("--json", help="write the results here")
    b.set_defaults(func=cmd_bench)
