"""Decode engine on the GPU: correctness on SmolLM2 and speed on the Llama-3-8B shape.

    # correctness: greedy FP4 tokens vs the torch-twin path, and the FP8 KV cache's perplexity change
    python benchmarks/bench_decode.py smollm2 --gguf FILE.gguf --text shakespeare.txt --out decode_smollm2.json
    # speed: bf16 vs NVFP4 weights (bf16 and FP8 KV) at batch 1, 8, 32, prompt 512, 256 new tokens
    python benchmarks/bench_decode.py speed --out decode_8b.json

`smollm2`. The model (GGUF dequantized to bf16, then RTN NVFP4 with `quantize_`) generates 128 greedy
tokens for each chat prompt four ways (then `teacher_forced`: the engine fed the twin's tokens, step by step):
    engine     our engine, CUDA graphs, FP4 layers through the Triton kernels (batched)
    engine_1   the same, one prompt at a time
    twin       transformers' own `generate` on a copy whose FP4Linear layers are swapped for nn.Linear
               holding the dequantized weight: the torch twin (`F.linear(x, dequant(W))`), HF attention
    twin_eng   our engine on that twin copy (eager): isolates the kernels from our attention code
Token sequences are compared; where two differ, the reference's top-2 logit gap at the first
differing step is recorded (a near-tie flipped by GEMM rounding has a gap of a few bf16 ulps).
Perplexity: non-overlapping 512-token windows of the text, logits through the engine's cache
(`prompt_logits`), bf16 vs FP8 KV cache, for bf16 and NVFP4 weights.

`speed`. `fp4kit bench`'s measurement (fp4kit.engine.bench) on `llama3-8b-random`: bf16 weights, then
NVFP4 weights in the same process (quantized on the GPU), KV cache bf16 and FP8. `--unfused` runs the
engine's module-by-module torch path (`Engine(fused=False)`) instead of the fused kernels.

`lmhead`. The perplexity cost of the quantized output heads (`Engine(lm_head="int8" | "nvfp4")`) on SmolLM2
(tied embeddings: the head is a quantized copy, the input embedding stays bf16): 512-token windows of the
text through the engine's cache, the model's head vs the INT8 and NVFP4 heads, with bf16 and NVFP4 (RTN)
layer weights. Runs on any device (the CPU in BENCHMARKS.md):

    python benchmarks/bench_decode.py lmhead --gguf FILE.gguf --text input.txt --device cpu --out decode_lmhead.json

`speed --lm-head model int8 nvfp4` and `profile --lm-head int8` add rows with those heads (NVFP4 weights).

`profile`. Where one decode step's GPU time goes: the same model and configurations, one prompt batch
prefilled, then `--steps` decode steps (CUDA graph replays) under torch.profiler; kernels are summed by
name and divided by the steps (count per step, microseconds per step), largest first.

    python benchmarks/bench_decode.py profile --batch 1 --out decode_profile.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
from torch import nn

PROMPTS = ["What is the capital of France? Answer in one sentence.",
           "Write a short poem about the sea.",
           "Explain what a neural network is to a child.",
           "List three prime numbers and say why they are prime.",
           "Give me a recipe for pancakes.",
           "Why is the sky blue?",
           "Write a haiku about autumn leaves.",
           "What are the benefits of regular exercise?"]


def twin_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose FP4Linear layers are nn.Linear with the dequantized weight (the torch twin)."""
    from fp4kit.nn import FP4Linear

    twin = copy.deepcopy(model)
    for name, mod in list(twin.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, FP4Linear):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                device=child.weight_packed.device, dtype=child.dtype)
                lin.weight.data.copy_(child.dequantize_weight(child.dtype))
                if child.bias is not None:
                    lin.bias.data.copy_(child.bias)
                setattr(mod, child_name, lin)
    return twin


def first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def top2_gap(model, prompt_ids: list[int], completion: list[int], step: int) -> float:
    """Reference model's logit gap between its two best tokens at `step` of its own completion."""
    ids = torch.tensor([prompt_ids + completion[:step]], device=model.device)
    with torch.no_grad():
        top = model(ids).logits[0, -1].float().topk(2).values
    return (top[0] - top[1]).item()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids], device=model.device)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@torch.no_grad()
def teacher_forced(engine, twin, prompts: list[list[int]], completions: list[list[int]]) -> list[dict]:
    """The engine's greedy pick at every step of the twin's own completions: the prompts prefilled, then each
    decode step fed the twin's token (CUDA graphs, as `generate`), so one early flip does not end the comparison.
    Per prompt: the steps where the engine's argmax differs from the twin's token, the twin's top-2 logit gap
    at each (from one forward of prompt + completion), and the largest |engine - twin| logit difference seen."""
    n = len(completions[0])
    comp = torch.tensor(completions, device=engine.device)  # [B, n]
    ref = []  # twin logits [n, V] per prompt: position of each completion token's prediction
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p + c], device=twin.device)
        ref.append(twin(ids).logits[0, len(p) - 1:-1].float())
    logits, pad, P = engine.prefill(prompts, room=n)
    picks, diffs = [], torch.zeros(len(prompts), device=engine.device)
    for t in range(n):
        lg = logits.float() if t == 0 else engine.decode(comp[:, t - 1], pad, P + t - 1).float()
        picks.append(lg.argmax(-1))
        diffs = torch.maximum(diffs, (lg - torch.stack([r[t] for r in ref])).abs().amax(-1))
    picks = torch.stack(picks, 1)  # [B, n]
    rows = []
    for b, r in enumerate(ref):
        top = r.topk(2, dim=-1).values
        gap = top[:, 0] - top[:, 1]
        steps = (picks[b] != comp[b]).nonzero().flatten().tolist()
        rows.append({"disagree_steps": steps, "twin_gap_there": [gap[i].item() for i in steps],
                     "twin_forward_vs_own_tokens": (r.argmax(-1) != comp[b]).nonzero().flatten().tolist(),
                     "max_abs_logit_diff": diffs[b].item(), "twin_min_gap": gap.min().item()})
    return rows


def perplexity(engine, windows: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for w in windows:
        logits = engine.prompt_logits(w)[:-1]
        target = torch.tensor(w[1:], device=logits.device)
        nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        count += len(w) - 1
    return math.exp(nll / count)


def run_smollm2(args) -> dict:
    import pathlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fp4kit.engine import Engine, SamplingParams, chat_ids
    from fp4kit.formats import NVFP4Config
    from fp4kit.nn import quantize_

    path = pathlib.Path(args.gguf)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16)
    model = model.to(args.device).eval()
    text = pathlib.Path(args.text).read_text()
    ids = tok(text)["input_ids"]
    windows = [ids[i:i + 512] for i in range(0, 512 * args.ppl_windows, 512)]
    res = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> bf16)", "ppl_windows": len(windows), "ppl_window": 512}
    for kv in ("bf16", "fp8"):
        eng = Engine(model, tok, max_batch=1, max_seq_len=520,
                     kv_dtype=torch.bfloat16 if kv == "bf16" else torch.float8_e4m3fn)
        res[f"ppl_bf16w_{kv}kv"] = perplexity(eng, windows)
    quantize_(model, NVFP4Config(), progress=False)
    for kv in ("bf16", "fp8"):
        eng = Engine(model, tok, max_batch=1, max_seq_len=520,
                     kv_dtype=torch.bfloat16 if kv == "bf16" else torch.float8_e4m3fn)
        res[f"ppl_nvfp4w_{kv}kv"] = perplexity(eng, windows)

    prompts = [chat_ids(tok, [{"role": "user", "content": p}]) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=args.tokens, temperature=0, ignore_eos=True)
    eng = Engine(model, tok, max_batch=len(prompts), max_seq_len=512)
    batched = [o.token_ids for o in eng.generate(prompts, params)]
    single = [eng.generate([p], params)[0].token_ids for p in prompts]
    twin = twin_copy(model)
    twin_hf = [hf_greedy(twin, p, args.tokens) for p in prompts]
    twin_eng = [o.token_ids for o in Engine(twin, tok, max_batch=len(prompts), max_seq_len=512,
                                            cuda_graphs=False).generate(prompts, params)]
    rows = []
    for i, p in enumerate(prompts):
        row = {"prompt": PROMPTS[i]}
        for name, other in (("engine_1", single[i]), ("twin", twin_hf[i]), ("twin_eng", twin_eng[i])):
            d = first_diff(batched[i], other)
            row[f"engine_vs_{name}"] = "equal" if d is None else d
            if d is not None and name == "twin":
                row["twin_top2_gap_at_diff"] = top2_gap(twin, p, other, d)
        row["text"] = tok.decode(batched[i], skip_special_tokens=True)[:200]
        rows.append(row)
    res["greedy"] = rows
    res["teacher_forced"] = teacher_forced(eng, twin, prompts, twin_hf)
    res["tokens"] = args.tokens
    res["equal_to_twin"] = sum(r["engine_vs_twin"] == "equal" for r in rows)
    return res


def _load_smollm2(args):
    import pathlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = pathlib.Path(args.gguf)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16)
    return model.to(args.device).eval(), tok


def run_lmhead(args) -> dict:
    import pathlib

    from fp4kit.engine import Engine
    from fp4kit.formats import NVFP4Config
    from fp4kit.nn import quantize_

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tok = _load_smollm2(args)
    ids = tok(pathlib.Path(args.text).read_text())["input_ids"]
    windows = [ids[i:i + 512] for i in range(0, 512 * args.ppl_windows, 512)]
    res = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> bf16), tied embeddings", "device": args.device,
           "ppl_windows": len(windows), "ppl_window": 512, "results": []}
    for weights in ("bf16", "nvfp4"):
        if weights == "nvfp4":
            quantize_(model, NVFP4Config(), progress=False)  # layers only: lm_head (tied) is not an FP4Linear
        for head in ("model", "int8", "nvfp4"):
            t0 = time.time()
            eng = Engine(model, tok, max_batch=1, max_seq_len=520, lm_head=head)
            ppl = perplexity(eng, windows)
            r = {"weights": weights, "lm_head": head, "ppl": ppl, "seconds": time.time() - t0}
            res["results"].append(r)
            print(json.dumps(r), flush=True)
    for r in res["results"]:
        base = next(b for b in res["results"] if b["weights"] == r["weights"] and b["lm_head"] == "model")
        r["ppl_change"] = r["ppl"] / base["ppl"] - 1
    return res


def run_speed(args) -> dict:
    from fp4kit.engine import Engine
    from fp4kit.engine.bench import BenchConfig, bench_engine, copy_bandwidth
    from fp4kit.engine.random_model import random_llama
    from fp4kit.formats import NVFP4Config
    from fp4kit.kernels import fp4_gemm, fp4_glu
    from fp4kit.nn import quantize_

    cfg = BenchConfig(tuple(args.batch), args.prompt_len, args.gen_len, args.repeats)
    t0 = time.time()
    small = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1024} if args.small else {}
    model = random_llama(args.device, torch.bfloat16, **small)
    bw = copy_bandwidth(args.device)
    on_gpu = torch.device(args.device).type == "cuda"
    out = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "bandwidth_Bps": bw,
           "config": dict(vars(args)), "results": [], "no_pdl": []}
    print(f"built in {time.time() - t0:.0f} s; copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    for weights in ("bf16", "nvfp4"):
        if weights == "nvfp4":
            t0 = time.time()
            quantize_(model, NVFP4Config(), progress=False)
            if on_gpu:
                torch.cuda.synchronize()
            print(f"quantized in {time.time() - t0:.0f} s", flush=True)
        variants = [(kv, head) for kv in args.kv for head in args.lm_head] if weights == "nvfp4" else [
            ("bf16", "model")]
        for kv, head in variants:
            eng = Engine(model, max_batch=max(cfg.batches), max_seq_len=cfg.prompt_len + cfg.gen_len,
                         kv_dtype=torch.bfloat16 if kv == "bf16" else torch.float8_e4m3fn, fused=not args.unfused,
                         lm_head=head)
            for r in bench_engine(eng, cfg, bw):
                r = {"weights": weights, "kv": kv, "lm_head": head, "pdl": fp4_gemm.PDL, **r}
                out["results"].append(r)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
            del eng
            if args.pdl_off_too and on_gpu:  # the same engine without programmatic dependent launch, batch 1
                fp4_gemm.PDL = False
                eng = Engine(model, max_batch=1, max_seq_len=cfg.prompt_len + cfg.gen_len, fused=not args.unfused,
                             kv_dtype=torch.bfloat16 if kv == "bf16" else torch.float8_e4m3fn, lm_head=head)
                one = BenchConfig((1,), cfg.prompt_len, cfg.gen_len, cfg.repeats)
                r = {"weights": weights, "kv": kv, "lm_head": head, "pdl": False, **bench_engine(eng, one, bw)[0]}
                out["no_pdl"].append(r)
                print("no PDL", json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}),
                      flush=True)
                fp4_gemm.PDL = True
                del eng
            if args.before_too and on_gpu:  # every batch with the --before switches, same process
                saved = _set_switches(args.before)
                eng = Engine(model, max_batch=max(cfg.batches), max_seq_len=cfg.prompt_len + cfg.gen_len,
                             kv_dtype=torch.bfloat16 if kv == "bf16" else torch.float8_e4m3fn,
                             fused=not args.unfused, lm_head=head)
                for r in bench_engine(eng, cfg, bw):
                    r = {"weights": weights, "kv": kv, "lm_head": head, "switches": args.before, **r}
                    out.setdefault("before", []).append(r)
                    print("before", json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}),
                          flush=True)
                _set_switches(saved)
                del eng
            if args.glu_off_too and on_gpu and weights == "nvfp4":  # batch 1: gate/up GEMV, then silu_mul
                fp4_glu.FUSED_GLU = False
                eng = Engine(model, max_batch=1, max_seq_len=cfg.prompt_len + cfg.gen_len, fused=not args.unfused,
                             kv_dtype=torch.bfloat16 if kv == "bf16" else torch.float8_e4m3fn, lm_head=head)
                one = BenchConfig((1,), cfg.prompt_len, cfg.gen_len, cfg.repeats)
                r = {"weights": weights, "kv": kv, "lm_head": head, "glu": False, **bench_engine(eng, one, bw)[0]}
                out.setdefault("glu_off", []).append(r)
                print("GLU off", json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}),
                      flush=True)
                fp4_glu.FUSED_GLU = True
                del eng
            if args.ws_off_too and on_gpu and weights == "nvfp4" and kv == "bf16":
                # batches > 1 with the skinny kernel instead of the warp-specialised one (fp4_gemm.WS_AUTO)
                fp4_gemm.WS_AUTO = False
                many = BenchConfig(tuple(b for b in cfg.batches if b > 1), cfg.prompt_len, cfg.gen_len, cfg.repeats)
                eng = Engine(model, max_batch=max(many.batches), max_seq_len=cfg.prompt_len + cfg.gen_len,
                             fused=not args.unfused, kv_dtype=torch.bfloat16, lm_head=head)
                for r in bench_engine(eng, many, bw):
                    r = {"weights": weights, "kv": kv, "lm_head": head, "ws": False, **r}
                    out.setdefault("ws_off", []).append(r)
                    print("WS off", json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}),
                          flush=True)
                fp4_gemm.WS_AUTO = True
                del eng
            if args.round8_off_too and on_gpu and kv == "bf16":  # batch 1 without the round-8 changes
                tuned = dict(fp4_gemm.GEMV_TUNED)
                fp4_gemm.GEMV_TUNED.clear()  # fresh Engine: its fused q/k/v and gate/up layouts are rebuilt at 8 lanes
                eng = Engine(model, max_batch=1, max_seq_len=cfg.prompt_len + cfg.gen_len, fused=not args.unfused,
                             kv_dtype=torch.bfloat16, lm_head=head)
                one = BenchConfig((1,), cfg.prompt_len, cfg.gen_len, cfg.repeats)
                r = {"weights": weights, "kv": kv, "lm_head": head, "round8": False, **bench_engine(eng, one, bw)[0]}
                out.setdefault("round8_off", []).append(r)
                print("round-8 off", json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                                 for k, v in r.items()}), flush=True)
                fp4_gemm.GEMV_TUNED.update(tuned)
                del eng
            if args.prefill_eager_too:  # TTFT with every prefill eager (Engine(prefill_graphs=False)), batch 1
                eng = Engine(model, max_batch=1, max_seq_len=cfg.prompt_len + cfg.gen_len, fused=not args.unfused,
                             kv_dtype=torch.bfloat16 if kv == "bf16" else torch.float8_e4m3fn, lm_head=head,
                             prefill_graphs=False)
                one = BenchConfig((1,), cfg.prompt_len, cfg.gen_len, cfg.repeats)
                r = {"weights": weights, "kv": kv, "lm_head": head, "prefill": "eager", **bench_engine(eng, one, bw)[0]}
                out.setdefault("prefill_eager", []).append(r)
                print("prefill eager", json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                                   for k, v in r.items()}), flush=True)
                del eng
            if args.prefill_dequant_too and on_gpu:  # TTFT with the previous prefill path: dequantize + cuBLAS
                old_min = fp4_gemm.DEQUANT_CUBLAS_MIN_M
                fp4_gemm.DEQUANT_CUBLAS_MIN_M = fp4_gemm.SKINNY_MAX_M + 1
                eng = Engine(model, max_batch=1, max_seq_len=cfg.prompt_len + cfg.gen_len, fused=not args.unfused,
                             kv_dtype=torch.bfloat16 if kv == "bf16" else torch.float8_e4m3fn, lm_head=head)
                one = BenchConfig((1,), cfg.prompt_len, cfg.gen_len, cfg.repeats)
                r = {"weights": weights, "kv": kv, "lm_head": head, "prefill": "dequant+cuBLAS",
                     **bench_engine(eng, one, bw)[0]}
                out.setdefault("prefill_dequant", []).append(r)
                print("prefill dequant+cuBLAS", json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                                            for k, v in r.items()}), flush=True)
                fp4_gemm.DEQUANT_CUBLAS_MIN_M = old_min
                del eng
            if on_gpu:
                torch.cuda.empty_cache()
    base = {r["batch"]: r["decode_tok_s"] for r in out["results"] if r["weights"] == "bf16"}
    before_base = {r["batch"]: r["decode_tok_s"] for r in out.get("before", []) if r["weights"] == "bf16"}
    print("| weights | kv | head | batch | decode tok/s | TTFT ms | step ms | weight roofline tok/s | % roofline "
          "| % roofline w+kv | vs bf16 |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for label, key, ref in (("", "results", base), ("round-8 off: ", "round8_off", base),
                            ("before: ", "before", before_base), ("GLU off: ", "glu_off", base),
                            ("WS off (skinny): ", "ws_off", base), ("no PDL: ", "no_pdl", base)):
        for r in out.get(key, []):
            r["speedup_vs_bf16"] = r["decode_tok_s"] / ref[r["batch"]]
            print(f"| {label}{r['weights']} | {r['kv']} | {r['lm_head']} | {r['batch']} | {r['decode_tok_s']:.1f} "
                  f"| {r['ttft_ms']:.1f} | {r['step_ms']:.2f} | {r['roofline_tok_s']:.1f} "
                  f"| {100 * r['roofline_frac']:.0f}% | {100 * r['roofline_kv_frac']:.0f}% | {r['speedup_vs_bf16']:.2f}x |")
    return out


def _set_switches(assignments) -> list[str]:
    """Set module switches of fp4kit.kernels ("fp4_ws.MID_M_RING=0"); returns the assignments that undo it."""
    import importlib

    undo = []
    for a in assignments:
        name, _, value = a.partition("=")
        mod_name, _, attr = name.rpartition(".")
        mod = importlib.import_module(f"fp4kit.kernels.{mod_name}")
        old = getattr(mod, attr)  # AttributeError names a switch that does not exist
        undo.append(f"{name}={int(old)}")
        setattr(mod, attr, type(old)(int(value)))
    return undo


def profile_step(eng, batch: int, prompt_len: int, steps: int) -> dict:
    """GPU kernels of `steps` decode steps after a prefill: {kernels: [{name, per_step, us_per_step}], ...}."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(100, 1000, (batch, prompt_len)).tolist()
    logits, pad, P = eng.prefill(ids)
    tokens = logits.argmax(-1)
    for _ in range(3):  # capture and warm up (the step rewrites the same slot)
        eng.decode(tokens, pad, P)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.decode(tokens, pad, P)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if us > 0:
            rows.append({"name": e.key[:160], "per_step": e.count / steps, "us_per_step": us / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    return {"batch": batch, "prompt_len": prompt_len, "steps": steps, "gpu_us_per_step": total,
            "kernels_per_step": sum(r["per_step"] for r in rows), "kernels": rows[:40]}


def run_profile(args) -> dict:
    from fp4kit.engine import Engine
    from fp4kit.engine.random_model import random_llama
    from fp4kit.formats import NVFP4Config
    from fp4kit.nn import quantize_

    small = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1024} if args.small else {}
    model = random_llama(args.device, torch.bfloat16, **small)
    out = {"device": torch.cuda.get_device_name(), "results": []}
    for weights in ("bf16", "nvfp4"):
        if weights == "nvfp4":
            quantize_(model, NVFP4Config(), progress=False)
        variants = [(kv, head) for kv in ("bf16", "fp8") for head in args.lm_head] if weights == "nvfp4" else [
            ("bf16", "model")]
        for kv, head in variants:
            for fused in ((True, False) if args.unfused_too else (True,)):
                eng = Engine(model, max_batch=args.batch, max_seq_len=args.prompt_len + 64, fused=fused,
                             kv_dtype=torch.bfloat16 if kv == "bf16" else torch.float8_e4m3fn, lm_head=head)
                r = {"weights": weights, "kv": kv, "fused": fused, "lm_head": head,
                     **profile_step(eng, args.batch, args.prompt_len, args.steps)}
                out["results"].append(r)
                print(f"{weights} kv {kv} head {head} fused {fused}: {r['gpu_us_per_step']:.0f} us GPU per step, "
                      f"{r['kernels_per_step']:.0f} kernels", flush=True)
                for k in r["kernels"][:12]:
                    print(f"   {k['us_per_step']:8.1f} us  x{k['per_step']:5.1f}  {k['name'][:90]}", flush=True)
                del eng
                torch.cuda.empty_cache()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("smollm2")
    s.add_argument("--gguf", required=True)
    s.add_argument("--text", required=True)
    s.add_argument("--tokens", type=int, default=128)
    s.add_argument("--ppl-windows", type=int, default=16)
    s.add_argument("--out", required=True)
    s.add_argument("--device", default="cuda")
    f = sub.add_parser("speed")
    f.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    f.add_argument("--prompt-len", type=int, default=512)
    f.add_argument("--gen-len", type=int, default=256)
    f.add_argument("--repeats", type=int, default=3)
    f.add_argument("--out", required=True)
    f.add_argument("--device", default="cuda")
    f.add_argument("--small", action="store_true", help="a 2-layer model of the same family (smoke test)")
    f.add_argument("--unfused", action="store_true", help="the module-by-module torch path (Engine(fused=False))")
    f.add_argument("--lm-head", nargs="+", default=["model"], choices=["model", "int8", "nvfp4"],
                   help="output heads for the NVFP4-weight rows (the bf16 row keeps the model's head)")
    f.add_argument("--kv", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"],
                   help="KV caches for the NVFP4-weight rows (the bf16 row keeps a bf16 cache)")
    f.add_argument("--prefill-eager-too", action="store_true",
                   help="also batch 1 with every prefill eager (no prefill graphs): TTFT")
    f.add_argument("--prefill-dequant-too", action="store_true",
                   help="also batch 1 with the previous prefill path (dequantize + cuBLAS from 65 rows): TTFT")
    f.add_argument("--round8-off-too", action="store_true",
                   help="batch 1 also without round 8's tuned GEMV shapes (16-lane layouts for gate_up / qkv), "
                        "same process")
    f.add_argument("--before-too", action="store_true",
                   help="also every row with the --before switches (default: without session 18's changes); its "
                        "vs-bf16 column is against the bf16 row measured the same way")
    f.add_argument("--before", nargs="+", default=["fp4_ws.MID_M_RING=0", "fp4_ws.HEAD_RING=0",
                                                   "fp4_glu.FUSED_GLU_WS=0", "fp4_ws.WS_SMALL_M=0"],
                   help="module switches of fp4kit.kernels for the --before-too rows, as module.NAME=0|1 (default: "
                        "session 18's changes off: the 3-stage ring at 17-32 rows, the heads' ring, silu * up in the "
                        "WS epilogue, the WS kernel at 1-2 rows)")
    f.add_argument("--glu-off-too", action="store_true",
                   help="also the NVFP4 rows at batch 1 with silu * up as its own kernel after the gate/up GEMV "
                        "(fp4_glu.FUSED_GLU off), same process")
    f.add_argument("--ws-off-too", action="store_true",
                   help="also the NVFP4 engine (bf16 KV) at the batches > 1 with the skinny kernel (WS_AUTO off)")
    f.add_argument("--pdl-off-too", action="store_true",
                   help="also each configuration at batch 1 without programmatic dependent launch (FP4KIT_PDL=0)")
    r = sub.add_parser("profile")
    r.add_argument("--batch", type=int, default=1)
    r.add_argument("--prompt-len", type=int, default=512)
    r.add_argument("--steps", type=int, default=5)
    r.add_argument("--unfused-too", action="store_true", help="also profile Engine(fused=False)")
    r.add_argument("--lm-head", nargs="+", default=["model"], choices=["model", "int8", "nvfp4"])
    r.add_argument("--out", required=True)
    r.add_argument("--device", default="cuda")
    r.add_argument("--small", action="store_true")
    h = sub.add_parser("lmhead")
    h.add_argument("--gguf", required=True)
    h.add_argument("--text", required=True)
    h.add_argument("--ppl-windows", type=int, default=8)
    h.add_argument("--out", required=True)
    h.add_argument("--device", default="cpu")
    args = p.parse_args()
    run = {"smollm2": run_smollm2, "speed": run_speed, "profile": run_profile, "lmhead": run_lmhead}[args.what]
    res = run(args)
    res["date"] = time.strftime("%Y-%m-%d")
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k not in ("results",)}, indent=1)[:6000])


if __name__ == "__main__":
    main()
