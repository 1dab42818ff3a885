"""Why does the Hadamard rotation hurt the MXFP4 indexer on Gemma-3-270M's global layer 11? (issue 10)

BENCHMARKS.md ("Recall on real Q/K at 8,192 tokens (CPU)") found that rotating Q and K by a Hadamard matrix over
the head dimension before MXFP4 (block 32, RCEIL) gains ~9 points of top-k set recall on SmolLM2-135M, but does not
help on Gemma-3-270M's full-attention layers and hurts on layer 11. This script captures the real post-RoPE Q and K
(`fp4kit.eval.sparse.capture_qk`, first 2,048 tokens of CoQA) and measures, per layer / KV head:

  * per-dimension statistics of K and of the index query (sum of the group's query heads): the mean over tokens
    (a bias-like component shared by all keys) against the spread around it; the fraction of key energy that is
    the shared mean, and how concentrated that mean is in a few dimensions;
  * per-block (32) dynamic range of K (block amax / block RMS, and block amax / RMS of the key's *centered* part
    in that block, i.e. how large the FP4 step is against the part of the key that ranks keys), with / without
    rotation;
  * the MXFP4 error of K, relative to the key energy and to the centered (ranking-relevant) key energy, and the
    error of the q.k scores: per query, std over keys of (fp4 score - exact score) divided by the std over keys of
    the exact score (a per-query constant error does not change the ranking, so the across-key spread is what
    counts); split into the part from K's rounding and from Q's rounding;
  * per block of 32 (original basis): the share of the index query's energy, of the keys' centered variance and
    of their mean, and the MXFP4 error of K in that block, per variant; and a diagonal model of the K-side score
    noise, sqrt(sum_d q_d^2 E[dk_d^2] / q^T C_k q), which shows WHERE the error lands against where q looks;
  * recall (set and mass, `fp4kit.eval.sparse.head_recall`, pure top-k, fp32 reference) of MXFP4 with / without
    rotation, and of the candidate fix "subtract a constant key c before quantizing K": q.(k - c) = q.k - q.c, a
    per-query constant, so the exact top-k is unchanged and the fix costs only one D-vector per KV head. c is the
    mean of the keys at positions 0..1023 (causal for the scored queries, the last 1,024 positions). NVFP4 with
    rotation is listed for comparison, and "rot32": a block-diagonal Hadamard (32 x 32 inside each MXFP4 block), which
    spreads outliers within a block but never moves energy between blocks (so each block keeps its own scale).

    PYTHONPATH=. nice python3 benchmarks/sparse_rotation_diag.py --model gemma3-270m --layers 5 11 17
    PYTHONPATH=. nice python3 benchmarks/sparse_rotation_diag.py --model smollm2-135m --layers 20

Each run merges its model's entry into benchmarks/results/sparse_rotation_diag_gemma3.json (the file name is the
issue's; it also holds the SmolLM2 contrast). `--cache DIR` keeps the captured Q/K as .pt files between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from fp4kit.eval.sparse import capture_qk, head_recall  # noqa: E402
from fp4kit.nn.indexer import IndexerConfig, IndexPrecision, IndexScore, group_queries, hadamard_rotate, round_index  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
OUT = RESULTS / "sparse_rotation_diag_gemma3.json"
PLAIN = {"center_keys": False, "rotate_block": None}  # as measured: full rotation, centering done by hand here
MX = IndexerConfig(precision=IndexPrecision.MXFP4, rotate=False, rerank=1, **PLAIN)
MX_ROT = IndexerConfig(precision=IndexPrecision.MXFP4, rotate=True, rerank=1, **PLAIN)
NV_ROT = IndexerConfig(precision=IndexPrecision.NVFP4, rotate=True, rerank=1, **PLAIN)


def capture(model_name: str, layers: list[int], tokens_n: int, cache: str | None) -> dict:
    path = None if cache is None else pathlib.Path(cache) / f"qk_{model_name}_{'_'.join(map(str, layers))}_{tokens_n}.pt"
    if path is not None and path.exists():
        return torch.load(path)
    from sparse_recall import tokens

    from fp4kit.io.models import load_model

    model, tok, _ = load_model(model_name)
    ids = tokens(tok, "coqa", tokens_n).unsqueeze(0)
    cap = capture_qk(model, ids, set(layers))
    norms = {}
    for i in layers:
        attn = model.model.layers[i].self_attn
        if hasattr(attn, "k_norm"):  # Gemma-3: RMSNorm scaled by (1 + weight)
            norms[i] = {"q": (1 + attn.q_norm.weight.float()).detach(), "k": (1 + attn.k_norm.weight.float()).detach()}
    rope = {i: getattr(model.config, "rope_parameters", None) for i in layers}
    d = {"q": cap.q, "k": cap.k, "scaling": cap.scaling, "window": cap.window, "norms": norms,
         "rope": {i: json.loads(json.dumps(r, default=str)) if r is not None else None for i, r in rope.items()}}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(d, path)
    return d


def block_rotate(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """x [..., D] -> each MXFP4 block of 32 rotated by the 32 x 32 Hadamard (block-diagonal H; its own inverse)."""
    return hadamard_rotate(x.reshape(*x.shape[:-1], x.shape[-1] // block, block)).reshape(x.shape)


def rnd(x: torch.Tensor, cfg: IndexerConfig, block_rot: bool = False) -> torch.Tensor:
    """x [N, D] -> rounded, in the ORIGINAL basis (rotated ones rotated back: H is symmetric and orthonormal).
    block_rot: rotate within each block of 32 only (cfg.rotate must be False)."""
    if block_rot:
        return block_rotate(round_index(block_rotate(x).unsqueeze(0), cfg)[0])
    y = round_index(x.unsqueeze(0), cfg)[0]
    return hadamard_rotate(y) if cfg.rotate else y


def block_stats(x: torch.Tensor, center: torch.Tensor, rotate: bool) -> dict:
    """x [N, D] keys; per block of 32 (in the basis that is quantized): amax / RMS of the block, and amax / RMS of
    the centered part (x - center) in that block: the FP4 step against what ranks the keys."""
    xb = hadamard_rotate(x) if rotate else x
    cb = hadamard_rotate(x - center) if rotate else x - center
    N, D = xb.shape
    xb, cb = xb.view(N, D // 32, 32), cb.view(N, D // 32, 32)
    amax = xb.abs().amax(-1)
    rms = xb.pow(2).mean(-1).sqrt()
    crms = cb.pow(2).mean(-1).sqrt()
    per_block_amax_over_crms = (amax / crms).median(0).values  # [D/32], median over tokens
    return {"amax_over_rms_mean": (amax / rms).mean().item(),
            "amax_over_centered_rms_median": (amax / crms).median().item(),
            "per_block_amax_over_centered_rms_median": [round(v, 2) for v in per_block_amax_over_crms.tolist()]}


def score_error(q: torch.Tensor, k: torch.Tensor, qh: torch.Tensor, kh: torch.Tensor) -> float:
    """Median over queries of std_j(qh.kh_j - q.k_j) / std_j(q.k_j): the ranking-relevant score noise."""
    s = q.double() @ k.double().T
    e = qh.double() @ kh.double().T - s
    return (e.std(-1) / s.std(-1)).median().item()


def diagnose(q_idx: torch.Tensor, k: torch.Tensor, c: torch.Tensor, qsel: torch.Tensor) -> dict:
    """q_idx [T, D] index queries, k [T, D] keys, c [D] the constant key subtracted by the fix, qsel: scored rows."""
    T, D = k.shape
    mu, sd = k.mean(0), k.std(0)
    e_tot = k.pow(2).sum(-1).mean().item()
    e_mu = mu.pow(2).sum().item()
    order = mu.abs().argsort(descending=True)
    top8 = order[:8]
    qmu = q_idx.mean(0)
    out = {
        "D": D,
        "key_energy_fraction_in_mean": e_mu / e_tot,  # ||mean k||^2 / E||k||^2
        "key_mean_energy_top8_dims_fraction": mu[top8].pow(2).sum().item() / e_mu,
        "key_top8_mean_dims": [{"dim": int(d), "mean": round(mu[d].item(), 3), "std": round(sd[d].item(), 3)}
                               for d in top8],
        "key_rms_per_dim_median": k.pow(2).mean(0).sqrt().median().item(),
        "key_centered_rms": (k - mu).pow(2).sum(-1).mean().sqrt().item(),
        "key_mean_norm": mu.norm().item(),
        "query_energy_fraction_in_mean": qmu.pow(2).sum().item() / q_idx.pow(2).sum(-1).mean().item(),
        # how much of the score variance over keys... and the constant part q.mu relative to the varying part
        "query_mean_dot_key_mean_over_score_std": ((q_idx[qsel].double() @ mu.double()).abs()
                                                   / (q_idx[qsel].double() @ k.double().T).std(-1)).median().item(),
        "max_abs_key_dim_over_median_rms": (k.abs().amax(0).max() / k.pow(2).mean(0).sqrt().median()).item(),
    }
    kc = k - c
    blocks, kerr, serr = {}, {}, {}
    qq = q_idx[qsel]
    keys_sub = k[:: max(1, T // 1024)]  # 1,024 keys for the score statistics
    qe = q_idx[qsel].pow(2).mean(0)
    kv = (k - mu).pow(2).mean(0)
    per_block = {"q_energy_share": (qe.view(-1, 32).sum(-1) / qe.sum()).tolist(),
                 "key_centered_var_share": (kv.view(-1, 32).sum(-1) / kv.sum()).tolist(),
                 "key_mean_sq_share": (mu.pow(2).view(-1, 32).sum(-1) / mu.pow(2).sum()).tolist(),
                 "key_mxfp4_error_mean_sq": {}}
    out["top8_query_energy_dims"] = [{"dim": int(d), "share": round((qe[d] / qe.sum()).item(), 3),
                                      "key_abs_mean": round(mu[d].abs().item(), 2)}
                                     for d in qe.argsort(descending=True)[:8]]
    cov = torch.cov((k - mu).T.double())
    qvar = (qq.double() @ cov * qq.double()).sum(-1)  # q^T C_k q: variance over keys of the exact score
    out["predicted_k_score_noise"] = {}
    for name, cfg, shift in [("mxfp4", MX, False), ("mxfp4_rot", MX_ROT, True), ("mxfp4_sub", MX, False),
                             ("mxfp4_rot_sub", MX_ROT, True), ("nvfp4_rot", NV_ROT, True),
                             ("mxfp4_rot32", MX, False), ("mxfp4_rot32_sub", MX, False)]:
        sub = name.endswith("_sub")
        br = "rot32" in name
        kk = kc if sub else k
        if cfg.precision is IndexPrecision.MXFP4 and not br:
            blocks[name] = block_stats(kk, (mu - c) if sub else mu, cfg.rotate)
        kh = rnd(kk, cfg, br)
        e_d = (kh - kk).pow(2).mean(0)  # per-dim K error energy, original basis
        per_block["key_mxfp4_error_mean_sq"][name] = e_d.view(-1, 32).mean(-1).tolist()
        # diagonal model of the K-side score noise: sqrt(sum_d q_d^2 E[dk_d^2] / q^T C_k q), median over queries
        out["predicted_k_score_noise"][name] = ((qq.double().pow(2) @ e_d.double()) / qvar).sqrt().median().item()
        err = (kh - kk).pow(2).sum(-1).mean().item()
        kerr[name] = {"rel_to_key_energy": err / kk.pow(2).sum(-1).mean().item(),
                      "rel_to_centered_key_energy": err / (k - mu).pow(2).sum(-1).mean().item()}
        ks_ = (keys_sub - c) if sub else keys_sub
        khs = rnd(ks_, cfg, br)
        qh = rnd(qq, cfg, br)
        serr[name] = {"both": score_error(qq, ks_, qh, khs), "k_only": score_error(qq, ks_, qq, khs),
                      "q_only": score_error(qq, ks_, qh, ks_)}
    out.update(block_range=blocks, key_error=kerr, score_noise=serr, per_block=per_block)
    # which dims carry the K-side score error without rotation: fraction of the error variance over keys
    # (summed over queries) from the 8 largest-mean dims
    kh = rnd(keys_sub, MX)
    dk = (kh - keys_sub).double()
    contrib = (qq.double().unsqueeze(1) * dk.unsqueeze(0))  # [Q, K, D]
    var_d = contrib.var(1).mean(0)  # variance over keys per dim (ignoring cross terms), mean over queries
    out["mxfp4_k_error_var_top8_mean_dims_fraction"] = (var_d[top8].sum() / var_d.sum()).item()
    del contrib
    return out


def recall(q_grp: torch.Tensor, k: torch.Tensor, c: torch.Tensor, scaling: float, positions, ks, layer, g) -> list:
    variants = {"mxfp4": MX, "mxfp4_rot": MX_ROT, "nvfp4_rot": NV_ROT}
    rows = head_recall(q_grp, k, scaling, ks, variants, layer=layer, kv_head=g, positions=positions)
    sub = {"mxfp4_sub": MX, "mxfp4_rot_sub": MX_ROT}
    # keys shifted by c: scores shift by q.c per query, so the fp32 reference top-k is the same (checked below)
    rows += head_recall(q_grp, k - c, scaling, ks, sub, layer=layer, kv_head=g, positions=positions)
    # rotation within each block of 32 only: applied to q and k up front (q.k is unchanged in exact arithmetic,
    # so the fp32 reference is the same up to rounding; checked below), then plain MXFP4
    qb = block_rotate(q_grp)
    rows += head_recall(qb, block_rotate(k), scaling, ks, {"mxfp4_rot32": MX}, layer=layer, kv_head=g,
                        positions=positions)
    rows += head_recall(qb, block_rotate(k - c), scaling, ks, {"mxfp4_rot32_sub": MX}, layer=layer, kv_head=g,
                        positions=positions)
    return [{"layer": r.layer, "kv_head": r.kv_head, "variant": r.variant, "k": r.k, "set_recall": r.set_recall,
             "mass_recall": r.mass_recall, "queries": r.queries} for r in rows]


def reference_agreement(q_idx: torch.Tensor, k: torch.Tensor, c: torch.Tensor, positions, kk: int = 64,
                        block_rot: bool = False) -> float:
    """Set overlap of the fp32 top-kk by q.k and by q.(k - c) (block_rot: by the block-rotated q and k - c), over
    64 of the scored queries (ties aside: 1)."""
    tot = 0.0
    sel = positions[:: max(1, len(positions) // 64)]
    for t in sel.tolist():
        a = (q_idx[t].double() @ k[: t + 1].double().T).float().topk(kk).indices
        qt, kt = (block_rotate(q_idx[t]), block_rotate(k[: t + 1] - c)) if block_rot else (q_idx[t], k[: t + 1] - c)
        b = (qt.double() @ kt.double().T).float().topk(kk).indices
        tot += len(set(a.tolist()) & set(b.tolist())) / kk
    return tot / len(sel)


def write_json(path: pathlib.Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--layers", type=int, nargs="+", default=[5, 11, 17])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--queries", type=int, default=1024)
    p.add_argument("--ks", type=int, nargs="+", default=[64, 256])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=None, help="folder for the captured Q/K (.pt)")
    p.add_argument("--no-recall", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    cap = capture(args.model, args.layers, args.tokens, args.cache)
    print(f"captured in {time.time() - t0:.0f} s", flush=True)
    T = args.tokens
    positions = torch.arange(T - args.queries, T)
    calib = T - args.queries  # c = mean of the keys before the first scored query
    entry = {"model": args.model, "corpus": "coqa", "tokens": T, "queries": args.queries, "ks": args.ks,
             "constant_key": f"mean of keys at positions 0..{calib - 1}", "device": "cpu", "threads": args.threads,
             "date": time.strftime("%Y-%m-%d"), "layers": {}}
    for i in args.layers:
        q, k = cap["q"][i], cap["k"][i]
        Hq, _, D = q.shape
        Hkv = k.shape[0]
        lay = {"window": cap["window"][i], "rope": cap.get("rope", {}).get(i), "heads": {}}
        if i in cap.get("norms", {}):
            n = cap["norms"][i]
            lay["k_norm_gain"] = {"max": n["k"].max().item(), "median": n["k"].median().item(),
                                  "top8_dims": n["k"].argsort(descending=True)[:8].tolist()}
            lay["q_norm_gain"] = {"max": n["q"].max().item(), "median": n["q"].median().item()}
        for g in range(Hkv):
            qg = q[g * (Hq // Hkv):(g + 1) * (Hq // Hkv)]
            q_idx = group_queries(qg.unsqueeze(0), 1, IndexScore.DOT)[0, 0, 0]  # [T, D]
            c = k[g, :calib].mean(0)
            h = diagnose(q_idx, k[g], c, positions)
            h["reference_top64_agreement_with_shift"] = reference_agreement(q_idx, k[g], c, positions)
            h["reference_top64_agreement_with_shift_and_block_rotation"] = reference_agreement(
                q_idx, k[g], c, positions, block_rot=True)
            print(f"layer {i} head {g}: diag done {time.time() - t0:.0f} s", flush=True)
            if not args.no_recall:
                h["recall"] = recall(qg[:, positions], k[g], c, cap["scaling"][i], positions, args.ks, i, g)
                print(f"layer {i} head {g}: recall done {time.time() - t0:.0f} s", flush=True)
            lay["heads"][g] = h
        entry["layers"][i] = lay
    entry["seconds"] = time.time() - t0
    allres = json.loads(OUT.read_text()) if OUT.exists() else {}
    allres[args.model] = entry
    write_json(OUT, allres)
    print_summary(entry)


def print_summary(entry: dict) -> None:
    print(f"\n{entry['model']} coqa T={entry['tokens']}")
    for i, lay in entry["layers"].items():
        for g, h in lay["heads"].items():
            print(f"L{i} h{g}: mean-key energy {100 * h['key_energy_fraction_in_mean']:.1f}%, "
                  f"top8 dims hold {100 * h['key_mean_energy_top8_dims_fraction']:.1f}% of it; score noise "
                  + ", ".join(f"{v}={s['both']:.3f}(K {s['k_only']:.3f})" for v, s in h["score_noise"].items()))
            for r in h.get("recall", []):
                print(f"   {r['variant']:14s} k={r['k']:4d} set {100 * r['set_recall']:.2f} "
                      f"mass {100 * r['mass_recall']:.3f}")


if __name__ == "__main__":
    main()
