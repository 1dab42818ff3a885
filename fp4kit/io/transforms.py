"""Online input rotations in checkpoints: fp4kit's own metadata, and compressed-tensors' `transform_config`.

An `FP4Linear` with a rotation computes (x R) Q(W R)^T, R = diag(s)(I_{K/b} (x) H_b) (see
`fp4kit.nn.rotation`). Its packed weight already is W R; a reader must also rotate the input. Two
descriptions go into config.json:

1. `fp4kit_rotation` (top level, always written; `load_checkpoint` reads it first):

       {"format": "fp4kit-block-hadamard", "version": 1,
        "groups": [{"block_size": 128, "random_signs": false, "seed": 0, "targets": [layer names]}]}

2. `quantization_config.transform_config` (compressed-tensors 0.20, read by vLLM), written only when
   no group has random signs: one scheme per block size,

       {"type": "hadamard", "head_dim": b, "randomize": false,
        "apply": [{"targets": names, "location": "input"},
                  {"targets": names, "location": "weight_input", "inverse": true}]}

   plus, per layer, the tensor `NAME.<scheme>_input.weight` = sqrt(b) H_b (+-1 entries) that vLLM loads
   and divides by sqrt(b). compressed-tensors builds that scheme's matrix as Sylvester's H_b / sqrt(b)
   applied block-diagonally, x -> x H_b on the input and W -> W H_b^T^T = W H_b fused into the weight:
   exactly our R without signs (tests/io/test_rotation_export.py checks it against the installed CT).
   Random signs are not expressible: compressed-tensors' "random-hadamard" draws one sign vector per
   block size (shared by every block) from its own generator and multiplies a Hadamard from its table
   of known matrices, while fp4kit draws K signs per layer. Such checkpoints carry `fp4kit_rotation`
   only: fp4kit loads them; vLLM would ignore the rotation and compute garbage, so the model card says
   it cannot serve them.

On load, `fp4kit_rotation` wins; without it a compressed-tensors `transform_config` is accepted when it
is the form above (hadamard, no randomize, input + fused weight_input, targets as names, "Linear" or
"re:" patterns); anything else is an error naming the scheme.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from fp4kit.nn import FP4Linear
from fp4kit.nn.quantize import matches
from fp4kit.nn.rotation import RotatedLinear, RotationConfig, hadamard

FORMAT, VERSION = "fp4kit-block-hadamard", 1


def scheme_name(block_size: int) -> str:
    return f"fp4kit_hadamard_{block_size}"


def rotated_layers(model: nn.Module, to_disk=lambda n: n) -> dict[str, RotationConfig]:
    """{disk name: rotation} of every FP4Linear with an online rotation; a float RotatedLinear is an error."""
    floats = [n for n, m in model.named_modules() if isinstance(m, RotatedLinear)]
    if floats:
        raise ValueError(f"{floats[0]} is a float RotatedLinear (rotated but not quantized); quantize it "
                         f"(quantize_/apply_ptq) before export ({len(floats)} such layers)")
    return {to_disk(n): m.rotation.config for n, m in model.named_modules()
            if isinstance(m, FP4Linear) and m.rotation is not None}


def _groups(rotations: dict[str, RotationConfig]) -> dict[RotationConfig, list[str]]:
    out: dict[RotationConfig, list[str]] = {}
    for name, cfg in rotations.items():
        out.setdefault(cfg, []).append(name)
    return out


def fp4kit_rotation_metadata(rotations: dict[str, RotationConfig]) -> dict | None:
    if not rotations:
        return None
    return {"format": FORMAT, "version": VERSION,
            "groups": [cfg.to_dict() | {"targets": sorted(names)} for cfg, names in _groups(rotations).items()]}


def ct_transform_config(rotations: dict[str, RotationConfig]) -> dict | None:
    """compressed-tensors' transform_config for these rotations, or None when they cannot be expressed."""
    if not rotations or any(c.random_signs for c in rotations.values()):
        return None
    groups = {}
    for cfg, names in _groups(rotations).items():
        targets = sorted(names)
        groups[scheme_name(cfg.block_size)] = {
            "type": "hadamard", "randomize": False, "requires_grad": False, "head_dim": cfg.block_size,
            "precision": "torch.float32",
            "apply": [{"targets": targets, "location": "input", "inverse": False, "ignore": []},
                      {"targets": targets, "location": "weight_input", "inverse": True, "ignore": []}]}
    return {"config_groups": groups}


def transform_tensors(rotations: dict[str, RotationConfig], dtype: torch.dtype):
    """(name, tensor) of the +-1 Hadamard each online layer's `<scheme>_input` module holds (vLLM loads it)."""
    if ct_transform_config(rotations) is None:
        return
    for name, cfg in rotations.items():
        b = cfg.block_size
        yield f"{name}.{scheme_name(b)}_input.weight", (hadamard(b, torch.float64) * b**0.5).round().to(dtype)


def card_note(rotations: dict[str, RotationConfig]) -> str:
    if not rotations:
        return ""
    cfgs = sorted({repr(c) for c in rotations.values()})
    served = ("compressed-tensors `transform_config` (deterministic Hadamard, online on the input) is written in "
              "the form vLLM's compressed-tensors transform support reads (checked against compressed-tensors "
              "0.20, not run in vLLM by fp4kit)" if ct_transform_config(rotations) is not None else
              "**vLLM cannot serve this checkpoint yet**: random-sign rotations are not expressible in "
              "compressed-tensors' `transform_config`; load it with `fp4kit.io.load_checkpoint`")
    return "\n".join(["", "## Rotations", "",
                      f"{len(rotations)} layers rotate their input online with a block Hadamard ({', '.join(cfgs)}); "
                      "their stored weights are W R (config.json `fp4kit_rotation`).", f"- serving: {served}", ""])


# ---------------------------------------------------------------------------------------------- loading

def read_rotations(cfg: dict, layers: list[str], where: str) -> dict[str, RotationConfig]:
    """{layer: rotation} from config.json's `fp4kit_rotation` or compressed-tensors' `transform_config`."""
    meta = cfg.get("fp4kit_rotation")
    if meta:
        return _read_fp4kit(meta, layers, where)
    tc = ((cfg.get("quantization_config") or {}).get("transform_config") or {}).get("config_groups") or {}
    out: dict[str, RotationConfig] = {}
    for name, scheme in tc.items():
        for layer, rot in _read_ct_scheme(name, scheme, layers, where).items():
            if layer in out:
                raise ValueError(f"{where}: {layer} has two input transforms (schemes overlap)")
            out[layer] = rot
    return out


def _read_fp4kit(meta: dict, layers: list[str], where: str) -> dict[str, RotationConfig]:
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{where}: fp4kit_rotation format {meta.get('format')!r} version {meta.get('version')!r} "
                         f"is not supported (this fp4kit reads {FORMAT!r} version {VERSION})")
    out = {}
    for g in meta.get("groups", []):
        cfg = RotationConfig(g["block_size"], bool(g["random_signs"]), int(g["seed"]))
        for t in g["targets"]:
            if t not in layers:
                raise ValueError(f"{where}: fp4kit_rotation targets {t}, which is not an FP4 layer of the checkpoint")
            out[t] = cfg
    return out


def _read_ct_scheme(name: str, scheme: dict, layers: list[str], where: str) -> dict[str, RotationConfig]:
    what = f"{where}: transform_config scheme {name!r}"
    if scheme.get("type") != "hadamard" or scheme.get("randomize"):
        raise ValueError(f"{what}: type {scheme.get('type')!r} randomize={scheme.get('randomize')} is not supported; "
                         "fp4kit applies deterministic 'hadamard' transforms only")
    online, fused = set(), set()
    for args in scheme.get("apply", []):
        loc, inverse = args.get("location"), bool(args.get("inverse"))
        chosen = _resolve(args.get("targets", []), args.get("ignore", []), layers)
        if loc == "input" and not inverse:
            online |= chosen
        elif loc == "weight_input" and inverse:
            fused |= chosen
        else:
            raise ValueError(f"{what}: location {loc!r} inverse={inverse} is not supported (fp4kit reads an online "
                             "'input' transform with its inverse fused into 'weight_input')")
    if online != fused:
        raise ValueError(f"{what}: the online input and fused weight_input transforms target different layers")
    head_dim = scheme.get("head_dim")
    if head_dim is None:
        raise ValueError(f"{what}: head_dim (the Hadamard block) is required")
    return {layer: RotationConfig(int(head_dim)) for layer in online}


def _resolve(targets, ignore, layers) -> set[str]:
    def hit(name, pattern):
        if pattern == "Linear":
            return True
        if pattern.startswith("re:"):
            return re.match(pattern[3:], name) is not None
        return matches(name, pattern)
    targets = [targets] if isinstance(targets, str) else targets
    ignore = [ignore] if isinstance(ignore, str) else ignore
    return {n for n in layers if any(hit(n, t) for t in targets) and not any(hit(n, p) for p in ignore)}


def transform_scheme_names(cfg: dict) -> set[str]:
    tc = ((cfg.get("quantization_config") or {}).get("transform_config") or {}).get("config_groups") or {}
    return set(tc)


def pop_transform_tensors(tensors: dict, rotations: dict[str, RotationConfig], schemes: set[str], where: str) -> None:
    """Remove `<layer>.<scheme>_input.weight` tensors, checking each is the +-1 Sylvester Hadamard."""
    suffixes = tuple(f".{s}_input.weight" for s in schemes)
    for key in [k for k in tensors if suffixes and k.endswith(suffixes)]:
        layer = key.rpartition(".")[0].rpartition(".")[0]
        t = tensors.pop(key)
        rot = rotations.get(layer)
        if rot is None:
            raise ValueError(f"{where}: tensor {key} is a transform weight but {layer} has no input rotation")
        b = rot.block_size
        expect = hadamard(b, torch.float64) * b**0.5
        if rot.random_signs or tuple(t.shape) != (b, b) or not torch.equal(t.double(), expect.round()):
            raise ValueError(f"{where}: {key} is not the Sylvester Hadamard of size {b} fp4kit applies")
