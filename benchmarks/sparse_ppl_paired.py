"""Paired per-token standard error of the log-perplexity difference, SmolLM2 CoQA 3,072 tokens, windows of 1,024
(same windows / scoring as fp4kit.eval.perplexity with stride = context, no prefix), sink 4 + window 32 + top-k.

    PYTHONPATH=. nice python benchmarks/sparse_ppl_paired.py mxfp4_rot32_c:mxfp4_rot:64 mxfp4_rot32_r2_c:mxfp4_rot_r2:64

Each argument NEW:OLD:K names two `sparse_recall.PPL_VARIANTS`; adds its pair to
benchmarks/results/sparse_ppl_smollm2-135m_coqa_center_paired.json (mean and standard error over tokens of the
per-token NLL difference; it treats tokens as independent, which they are not:
read it as a rough, likely optimistic, scale)."""
import json, math, os, sys, time
import torch, torch.nn.functional as F
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sparse_recall import tokens, PPL_VARIANTS
from fp4kit.io.models import load_model
from fp4kit.nn.indexer import IndexerConfig
from fp4kit.nn.sparse_attention import use_sparse_attention
torch.set_num_threads(2)
model, tok, _ = load_model("smollm2-135m")
ids = tokens(tok, "coqa", 3072)[:3072]
def nll(cfg):
    out = []
    for start in range(0, ids.numel() - 1, 1024):
        w = ids[start:start + 1024].unsqueeze(0)
        with torch.no_grad(), use_sparse_attention(model, cfg):
            lg = model(w).logits[0, :-1].float()
        out.append(F.cross_entropy(lg, w[0, 1:], reduction="none"))
        if start + 1024 >= ids.numel(): break
    return torch.cat(out)
res = {}
pairs = [tuple(x.split(":")[:2]) + (int(x.split(":")[2]),) for x in sys.argv[1:]]
for new, old, k in pairs:
    a = nll(IndexerConfig(top_k=k, sink=4, window=32, **PPL_VARIANTS[new]))
    b = nll(IndexerConfig(top_k=k, sink=4, window=32, **PPL_VARIANTS[old]))
    d = a - b
    se = d.std() / math.sqrt(d.numel())
    r = {"tokens": d.numel(), "ppl_new": math.exp(a.mean()), "ppl_old": math.exp(b.mean()),
         "mean_log_diff": d.mean().item(), "se_log_diff": se.item(),
         "tokens_changed_gt_0.01": int((d.abs() > 0.01).sum())}
    res[f"{new}_vs_{old}_k{k}"] = r
    print(r, flush=True)
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                    "sparse_ppl_smollm2-135m_coqa_center_paired.json")
prev = json.load(open(path))["pairs"] if os.path.exists(path) else {}
json.dump({"date": time.strftime("%Y-%m-%d"), "device": "cpu", "torch": torch.__version__, "note": __doc__,
           "script": "benchmarks/sparse_ppl_paired.py", "pairs": {**prev, **res}},
          open(path, "w"), indent=1)
