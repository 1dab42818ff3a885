"""MoE experts in checkpoints: one tensor set per expert, as vLLM and the original models store them.

In memory, transformers 5 (and `FP4Experts`) keep a layer's experts fused in 3-D tensors. On disk,
Qwen2/3-MoE, DeepSeek and Mixtral checkpoints keep one 2-D linear per expert, and vLLM's loaders
read those names (its compressed-tensors MoE path gathers them into its own fused layout):

    Qwen2/3-MoE, DeepSeek (default)   model.layers.L.mlp.experts.E.{gate_proj,up_proj,down_proj}.SUFFIX
    Mixtral                           model.layers.L.block_sparse_moe.experts.E.{w1,w3,w2}.SUFFIX

with SUFFIX = weight_packed, weight_scale and (NVFP4) weight_global_scale for quantized experts, or
`weight` for float ones. Mixtral's whole MoE block is named `block_sparse_moe` on disk (the router
too: `block_sparse_moe.gate.weight`), so every tensor name under `.mlp.` is renamed both ways.

An expert's gate and up are written with the same global scale (FP4Experts quantizes them
together), which is what vLLM needs to fuse them into w13.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from fp4kit.formats import NVFP4Config
from fp4kit.nn import FP4Experts, is_fused_experts


@dataclass(frozen=True)
class ExpertNaming:
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    block: str = "mlp"  # the MoE block's name on disk; in memory transformers 5 calls it `mlp`

    def to_disk(self, name: str) -> str:
        return name if self.block == "mlp" else name.replace(".mlp.", f".{self.block}.")

    def from_disk(self, name: str) -> str:
        return name if self.block == "mlp" else name.replace(f".{self.block}.", ".mlp.")


EXPERT_NAMING = {"mixtral": ExpertNaming("w1", "w3", "w2", "block_sparse_moe"),
                 "minimax": ExpertNaming("w1", "w3", "w2", "block_sparse_moe")}


def expert_naming(hf_config) -> ExpertNaming:
    return EXPERT_NAMING.get(getattr(hf_config, "model_type", ""), ExpertNaming())


def expert_tensors(name: str, experts: FP4Experts, naming: ExpertNaming):
    """(disk name, tensor) for every expert of one FP4Experts module at in-memory path `name`."""
    nvfp4 = isinstance(experts.config, NVFP4Config)
    base = naming.to_disk(name)
    for e in range(experts.num_experts):
        views = {naming.gate: experts.gate_up(e, 0), naming.up: experts.gate_up(e, 1), naming.down: experts.down(e)}
        for proj, qt in views.items():
            prefix = f"{base}.{e}.{proj}"
            yield f"{prefix}.weight_packed", qt.data.clone()  # own storage: safetensors refuses shared views
            yield f"{prefix}.weight_scale", qt.scale.clone()
            if nvfp4:
                yield f"{prefix}.weight_global_scale", qt.global_scale.reshape(1).float().clone()


def float_expert_tensors(name: str, module: nn.Module, naming: ExpertNaming):
    """(disk name, tensor) per expert of a float fused experts module (one left out of quantization)."""
    gu, down = module.gate_up_proj.detach(), module.down_proj.detach()
    i = gu.shape[1] // 2
    base = naming.to_disk(name)
    for e in range(gu.shape[0]):
        yield f"{base}.{e}.{naming.gate}.weight", gu[e, :i].clone()
        yield f"{base}.{e}.{naming.up}.weight", gu[e, i:].clone()
        yield f"{base}.{e}.{naming.down}.weight", down[e].clone()


def router_names(model: nn.Module, naming: ExpertNaming) -> list[str]:
    """Disk names of the routers beside FP4Experts modules: float, and not nn.Linear, so list them in
    `ignore` (vLLM builds the router as a linear layer and would otherwise look for FP4 tensors)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, FP4Experts):
            parent = name.rpartition(".")[0]
            for child in ("gate", "router"):
                r = getattr(model.get_submodule(parent), child, None) if parent else None
                if r is not None and not isinstance(r, nn.Linear) and getattr(r, "weight", None) is not None:
                    out.append(naming.to_disk(f"{parent}.{child}"))
    return out


_EXPERT_KEY = re.compile(r"^(?P<module>.+\.experts)\.(?P<e>\d+)\.(?P<proj>[A-Za-z0-9_]+)\.(?P<suffix>weight\w*)$")


def gather_experts(tensors: dict, naming: ExpertNaming, model: nn.Module) -> dict[str, dict]:
    """Pop the per-expert tensors of the model's fused experts modules out of `tensors` (already
    renamed to in-memory names); group them as {module: {proj: {suffix: {expert: tensor}}}} for
    `install_experts`. Experts that are real submodules (a ModuleList of linears) are left alone."""
    projs = {naming.gate, naming.up, naming.down}
    fused = {n for n, m in model.named_modules() if is_fused_experts(m)}
    groups: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for key in list(tensors):
        m = _EXPERT_KEY.match(key)
        if m and m["proj"] in projs and m["module"] in fused:
            groups[m["module"]][m["proj"]][m["suffix"]][int(m["e"])] = tensors.pop(key)
    return {k: v for k, v in groups.items()}


def _stack(group: dict, proj: str, suffix: str, n: int, where: str) -> torch.Tensor:
    per = group.get(proj, {}).get(suffix, {})
    missing = [e for e in range(n) if e not in per]
    if missing:
        raise ValueError(f"{where}: experts {missing[:8]} have no {proj}.{suffix}")
    return torch.stack([per[e] for e in range(n)])


def install_experts(model: nn.Module, groups: dict, tensors: dict, config, naming: ExpertNaming, folder,
                    dtype) -> list[str]:
    """Swap an FP4Experts into `model` for each packed group and put the stacked tensors into
    `tensors` under the module's state-dict names (float groups become the fused gate_up_proj /
    down_proj parameters), so one `load_state_dict` loads everything. Returns the FP4 modules' names."""
    quantized = []
    for name, group in groups.items():
        where = f"{folder}: {name}"
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{where}: per-expert tensors have no matching experts module in the model") from None
        if not is_fused_experts(module):
            raise ValueError(f"{where}: the model's module is {type(module).__name__}, not fused experts")
        e, two_i, h = module.gate_up_proj.shape
        g, u, d = naming.gate, naming.up, naming.down

        def both(suffix):  # gate rows then up rows: [E, 2I, ...]
            return torch.cat([_stack(group, g, suffix, e, where), _stack(group, u, suffix, e, where)], dim=1)

        if "weight_packed" not in group.get(g, {}):  # float experts
            stacked = {"gate_up_proj": both("weight"), "down_proj": _stack(group, d, "weight", e, where)}
        else:
            if config is None:
                raise ValueError(f"{where}: experts are packed but config.json declares no FP4 quantization")
            module = FP4Experts(e, h, two_i // 2, config, module.act_fn, dtype=dtype)
            stacked = {"gate_up_packed": both("weight_packed"), "gate_up_scale": both("weight_scale"),
                       "down_packed": _stack(group, d, "weight_packed", e, where),
                       "down_scale": _stack(group, d, "weight_scale", e, where)}
            if isinstance(config, NVFP4Config):
                stacked["gate_up_global_scale"] = torch.stack(
                    [_stack(group, p, "weight_global_scale", e, where).reshape(e) for p in (g, u)], dim=1)
                stacked["down_global_scale"] = _stack(group, d, "weight_global_scale", e, where).reshape(e)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module)
            quantized.append(name)
        expected = dict(module.state_dict())
        for key, value in stacked.items():
            want = expected[key]
            if tuple(want.shape) != tuple(value.shape):
                raise ValueError(f"{where}.{key}: checkpoint experts stack to {tuple(value.shape)}, "
                                 f"the model expects {tuple(want.shape)}")
            tensors[f"{name}.{key}"] = value
    return quantized
