"""Which key mean should the FP4 indexer center on at long context? (issue 10, CPU)

Post-RoPE keys carry a shared component that rotates with position: a RoPE pair of angular frequency w turns
by w * (j - i) between positions i and j. So a mean taken over one stretch of positions is the right shift only
for keys near that stretch and for the slow pairs (w * distance << 1). This script takes the real post-RoPE Q/K
of the first 8,192 CoQA tokens, scores every 2nd of the last 2,048 queries (the 8K recall setup), shifts the keys
by each candidate mean mu (q . (k - mu) keeps the exact top-k) and measures plain block-32 MXFP4 recall
(`fp4kit.eval.sparse.head_recall`, uncentered variants over the shifted keys):

    none              no shift
    first1024         mean of keys 0..1023 (the first centering rule; it hurt SmolLM2 at 8K)
    recent1024        mean of the 1,024 keys before the first scored query (the end of the "prefill")
    prefill_all       mean of all keys before the first scored query (the rule the library adopted)
    *_slow            the same with the RoPE pairs whose w * 8192 > 1 rad zeroed (rotate_half layout)

    PYTHONPATH=. nice python3 benchmarks/sparse_center_mean.py smollm2-135m 0,4,8,12,16,20,24,28,29
    PYTHONPATH=. nice python3 benchmarks/sparse_center_mean.py gemma3-270m 2,5,8,11,14,17

Merges {model: {...}} into benchmarks/results/sparse_center_mean_8k.json.
"""

import json
import pathlib
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from sparse_recall import tokens, write_json  # noqa: E402

from fp4kit.eval.sparse import DEFAULT_VARIANTS, capture_qk, head_recall  # noqa: E402
from fp4kit.io.models import load_model  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent / "results" / "sparse_center_mean_8k.json"


def rope_theta(cfg, local: bool) -> float:
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict) and "full_attention" in rp:  # Gemma-3: one theta per layer kind
        return rp["sliding_attention" if local else "full_attention"]["rope_theta"]
    return rp["rope_theta"] if isinstance(rp, dict) and "rope_theta" in rp else cfg.rope_theta


def candidate_means(k: torch.Tensor, first: int, w: torch.Tensor, T: int) -> dict:
    """k [T, D] one head's keys; first: the first scored position; w [D]: each dim's RoPE frequency."""
    slow = (w * T <= 1.0).double()
    means = {"none": torch.zeros(k.shape[1], dtype=torch.float64), "first1024": k[:1024].double().mean(0),
             "recent1024": k[first - 1024:first].double().mean(0), "prefill_all": k[:first].double().mean(0)}
    means["first1024_slow"] = means["first1024"] * slow
    means["prefill_all_slow"] = means["prefill_all"] * slow
    return {n: m.float() for n, m in means.items()}


def main() -> None:
    torch.set_num_threads(2)
    model_name, layers = sys.argv[1], [int(x) for x in sys.argv[2].split(",")]
    T, Q, S = 8192, 2048, 2
    t0 = time.time()
    model, tok, _ = load_model(model_name)
    ids = tokens(tok, "coqa", T).unsqueeze(0)
    cap = capture_qk(model, ids, set(layers))
    base = replace(DEFAULT_VARIANTS["mxfp4_rot"], rotate_block=32)
    variants = {"rot32": base, "rot32_r2": replace(base, rerank=2)}
    positions = torch.arange(T - 1, T - 1 - Q, -S).flip(0)
    sums = {}
    for i in sorted(cap.q):
        q, k = cap.q[i], cap.k[i]
        Hq, _, D = q.shape
        Hkv = k.shape[0]
        inv = 1.0 / rope_theta(model.config, cap.window[i] is not None) ** (torch.arange(0, D, 2).double() / D)
        w = torch.cat([inv, inv])  # rotate_half: dims j and j + D/2 form one pair
        kind = "global" if cap.window[i] is None else "local"
        for g in range(Hkv):
            qg = q[g * (Hq // Hkv):(g + 1) * (Hq // Hkv), positions]
            for name, mu in candidate_means(k[g], int(positions[0]), w, T).items():
                for r in head_recall(qg, k[g] - mu, cap.scaling[i], [64, 256], variants, layer=i, kv_head=g,
                                     positions=positions, window=cap.window[i]):
                    sums.setdefault(f"{kind}|{r.variant}|{r.k}|{name}", []).append((r.set_recall, r.mass_recall))
        print(f"layer {i} ({kind}): {time.time() - t0:.0f} s", flush=True)
    summary = {key: {"set_mean": sum(s for s, _ in v) / len(v), "mass_mean": sum(m for _, m in v) / len(v),
                     "heads": len(v)} for key, v in sorted(sums.items())}
    entry = {"model": model_name, "corpus": "coqa", "tokens": T, "queries": Q, "query_stride": S, "layers": layers,
             "device": "cpu", "threads": 2, "date": time.strftime("%Y-%m-%d"), "seconds": time.time() - t0,
             "summary": summary}
    allres = json.loads(OUT.read_text()) if OUT.exists() else {}
    allres[model_name] = entry
    write_json(OUT, allres)
    for key, s in summary.items():
        print(f"{key:40s} set {100 * s['set_mean']:.2f} mass {100 * s['mass_mean']:.3f}")


if __name__ == "__main__":
    main()
