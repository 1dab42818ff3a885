"""W4A4 GPTQ with Hessians of the rounded inputs vs of the float inputs (issue 6), perplexity on CPU.

A W4A4 layer multiplies its input after rounding it to FP4; plain GPTQ builds its Hessian from the float
input. `GPTQConfig(rounded_inputs=True)` builds it from the rounded one. This runs both on SmolLM2-135M
(float32, CPU) with the PTQ matrix's calibration (64 x 512 tokens of tiny-shakespeare after character
200,000) and reports perplexity on the first --ppl-tokens of tiny-shakespeare and of CoQA (1,024-token
windows), one JSON line per variant.

    PYTHONPATH=. nice python benchmarks/ptq_rounded_inputs.py \
        --out benchmarks/results/ptq_rounded_inputs_smollm2_cpu.jsonl
"""

import argparse
import copy
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from ptq_matrix import windows  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--formats", default="nvfp4,mxfp4")
    p.add_argument("--methods", default="gptq")
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    import fp4kit
    from fp4kit.algorithms import GPTQConfig, PTQMethod, PTQRecipe, apply_ptq
    from fp4kit.data import load_corpus
    from fp4kit.eval import perplexity
    from fp4kit.io import load_model

    torch.manual_seed(0)
    base, tok, _ = load_model(a.model, dtype=torch.float32)
    shakespeare = load_corpus("shakespeare")
    batches = windows(tok, shakespeare[200_000:], a.calib_samples, 512, "shakespeare")
    texts = {"shakespeare": shakespeare[:200_000], "coqa": load_corpus("coqa")}
    ids = {k: tok(v, return_tensors="pt").input_ids[0] for k, v in texts.items()}
    out = pathlib.Path(a.out)
    for fmt in a.formats.split(","):
        config = fp4kit.NVFP4Config() if fmt == "nvfp4" else fp4kit.MXFP4Config()
        for method in a.methods.split(","):
            for rounded in (False, True):
                model = copy.deepcopy(base)
                t0 = time.time()
                apply_ptq(model, config, PTQRecipe(PTQMethod(method), gptq=GPTQConfig(rounded_inputs=rounded)),
                          batches=batches, activations=config, progress=False)
                took = time.time() - t0
                row = {"model": a.model, "format": fmt, "method": method + "+a4", "rounded_inputs": rounded,
                       "calib": f"{a.calib_samples}x512", "device": "cpu", "date": time.strftime("%Y-%m-%d"),
                       "seconds_quantize": round(took, 1)}
                for name, t in ids.items():
                    r = perplexity(model, t, context=1024, max_tokens=a.ppl_tokens, progress=False)
                    row[f"ppl:{name}"] = round(float(r.perplexity), 3)
                print(json.dumps(row), flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
