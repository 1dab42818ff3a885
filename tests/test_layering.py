"""Imports only go down: formats < kernels < nn < algorithms < io < data < engine < train < eval < cli."""

import ast
import pathlib

ORDER = ["formats", "kernels", "nn", "algorithms", "io", "data", "engine", "train", "eval", "cli"]
RANK = {n: i for i, n in enumerate(ORDER)}
PKG = pathlib.Path(__file__).resolve().parents[1] / "fp4kit"


def imported_layers(tree, own_parts):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = own_parts[: len(own_parts) - node.level + 1]
                mod = ".".join(["fp4kit", *base, *(node.module.split(".") if node.module else [])])
            else:
                mod = node.module or ""
            yield mod
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_imports_only_go_down():
    bad = []
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG).with_suffix("").parts
        if parts[0] not in RANK:
            continue
        for mod in imported_layers(ast.parse(f.read_text()), list(parts[:-1]) if len(parts) > 1 else []):
            p = mod.split(".")
            if p[0] == "fp4kit" and len(p) > 1 and p[1] in RANK and RANK[p[1]] > RANK[parts[0]]:
                bad.append(f"{f.relative_to(PKG)} imports {mod}")
    assert not bad, bad


def test_checker_catches_an_upward_import(tmp_path):
    tree = ast.parse("from fp4kit.nn import FP4Linear\nfrom ..nn import x\n")
    mods = list(imported_layers(tree, ["formats"]))
    assert mods[0] == "fp4kit.nn" and mods[1].startswith("fp4kit.nn")
