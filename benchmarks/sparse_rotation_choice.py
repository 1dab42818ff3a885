"""A per-layer rotation for the FP4 indexer, chosen on calibration text and judged on other text (issue 10).

    python benchmarks/sparse_rotation_choice.py \
        --calib benchmarks/results/sparse_recall_gemma3-270m_drop_2k_center.json \
        --eval benchmarks/results/sparse_recall_gemma3-270m_coqa_2k_center.json

Reads two recall runs of `sparse_recall.py recall` (same model, same variants, different corpora), picks for each
layer the rotation (block-32 Hadamard or the full head-dim one) whose variants keep more of the exact top-k set
on the calibration corpus (`fp4kit.eval.sparse.choose_per_layer`: mean set recall over the single-stage and
r = 2 variants, every k and KV head; ties to block 32, the default), and reports on the evaluation corpus the
set and mass recall of: every layer block-32 (the default), every layer full, the calibrated choice, and the
oracle (the same rule applied to the evaluation corpus itself: this rule's ceiling, not a method). No model runs
here: `fp4kit.eval.sparse.calibrate_rotation` does the same from a model and calibration ids.
Writes benchmarks/results/sparse_rotation_choice_<model>.json (temp file, then rename) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sparse_recall import write_json  # noqa: E402

from fp4kit.eval.sparse import RecallRow, choose_per_layer  # noqa: E402

OPTIONS = {32: ("mxfp4_rot32_c", "mxfp4_rot32_r2_c"), None: ("mxfp4_rot_c", "mxfp4_rot_r2_c")}
STAGES = {"single": 0, "r2": 1}  # index into each option's variant pair


def load(path: pathlib.Path) -> tuple[dict, list[RecallRow]]:
    d = json.loads(path.read_text())
    fields = RecallRow.__dataclass_fields__
    rows = [RecallRow(**{k: v for k, v in r.items() if k in fields}) for r in d["rows"]]
    missing = {v for pair in OPTIONS.values() for v in pair} - {r.variant for r in rows}
    if missing:
        raise SystemExit(f"{path}: no rows for variants {sorted(missing)} (run sparse_recall.py with "
                         f"--rotation-block 32 --center-keys)")
    return d, rows


def evaluate(rows: list[RecallRow], choice: dict[int, object], layers: list[int]) -> dict:
    """{stage: {k: {set, mass}}}: mean over (layer, KV head) of each layer's chosen rotation, in percent."""
    by = {(r.layer, r.kv_head, r.variant, r.k): r for r in rows}
    heads = sorted({(r.layer, r.kv_head) for r in rows if r.layer in layers})
    out: dict = defaultdict(dict)
    for stage, i in STAGES.items():
        for k in sorted({r.k for r in rows if r.layer in layers}):
            keys = [(layer, h, OPTIONS[choice.get(layer, 32)][i], k) for layer, h in heads]
            if any(key not in by for key in keys):  # e.g. k > a sliding window: no live queries there
                continue
            sel = [by[key] for key in keys]
            out[stage][k] = {"set": 100 * sum(r.set_recall for r in sel) / len(sel),
                             "mass": 100 * sum(r.mass_recall for r in sel) / len(sel)}
    return dict(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calib", type=pathlib.Path, required=True)
    p.add_argument("--eval", type=pathlib.Path, required=True)
    p.add_argument("--out", type=pathlib.Path)
    a = p.parse_args()
    dc, calib = load(a.calib)
    de, ev = load(a.eval)
    if dc["model"] != de["model"]:
        raise SystemExit(f"the two runs are of different models: {dc['model']} vs {de['model']}")
    chosen = choose_per_layer(calib, {b: list(v) for b, v in OPTIONS.items()})
    oracle = choose_per_layer(ev, {b: list(v) for b, v in OPTIONS.items()})
    local = set(de.get("local_layers") or [])
    groups = {"global": [l for l in de["layers"] if l not in local]}
    if local:
        groups["local (within window)"] = sorted(local)
    result = {"model": de["model"], "calib": {"file": a.calib.name, "corpus": dc["corpus"], "tokens": dc["tokens"]},
              "eval": {"file": a.eval.name, "corpus": de["corpus"], "tokens": de["tokens"]},
              "options": {str(b): list(v) for b, v in OPTIONS.items()},
              "chosen": {str(l): b for l, b in chosen.items()}, "oracle": {str(l): b for l, b in oracle.items()},
              "groups": {}}
    print(f"{de['model']}: rotation per layer chosen on {dc['corpus']} ({dc['tokens']} tokens), judged on "
          f"{de['corpus']} ({de['tokens']} tokens)")
    print("chosen:", {l: b or "full" for l, b in chosen.items()})
    print("oracle:", {l: b or "full" for l, b in oracle.items()})
    print("\n| layers | stage | k | block 32 (default) set / mass | full set / mass | calibrated set / mass | "
          "oracle set / mass |\n|---|---|---|---|---|---|---|")
    for name, layers in groups.items():
        res = {label: evaluate(ev, c, layers) for label, c in
               (("block32", {}), ("full", {l: None for l in layers}), ("calibrated", chosen), ("oracle", oracle))}
        result["groups"][name] = {"layers": layers, **res}
        for stage in STAGES:
            for k in res["block32"][stage]:
                cells = " | ".join(f"{res[c][stage][k]['set']:.2f} / {res[c][stage][k]['mass']:.2f}"
                                   for c in ("block32", "full", "calibrated", "oracle"))
                print(f"| {name} | {stage} | {k} | {cells} |")
    out = a.out or pathlib.Path("benchmarks/results") / f"sparse_rotation_choice_{de['model']}.json"
    write_json(out, result)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
