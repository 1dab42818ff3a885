"""Checkpoints in the compressed-tensors layout that vLLM and transformers read.

A folder written by `save_checkpoint`:

    config.json                      the model's config plus `quantization_config` (below)
    model.safetensors                or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer files, chat template   copied from the source tokenizer
    README.md                        a model card: how it was made, its evaluation numbers when known

For each quantized linear layer NAME the safetensors hold NAME.weight_packed (uint8 [out, in/2]),
NAME.weight_scale (float8_e4m3fn or uint8 E8M0 [out, in/block]) and, for NVFP4, NAME.weight_global_scale
(float32 [1], compressed-tensors' convention g = 448*6/amax, shared by fused q/k/v and gate/up).
MoE experts that transformers keeps fused (FP4Experts in memory) are written one expert at a time
under the names the original checkpoints use (see `experts.py`). Everything else is stored dense
(bfloat16 by default). `quantization_config` is what
compressed-tensors writes for its NVFP4A16 / MXFP4A16 presets (format nvfp4-pack-quantized or
mxfp4-pack-quantized, status "compressed", ignore = the linear layers left in float).

Export streams: tensors go into a shard until it reaches `max_shard_bytes`, the shard is written,
and its memory released, so peak memory is the model plus one shard. Everything is written to a
temporary folder and renamed at the end (see `files.atomic_directory`).

`load_checkpoint` reads these folders, compressed-tensors checkpoints written by llm-compressor
(the same layout), ModelOpt NVFP4 folders (`hf_quant_config.json`, `weight_scale_2`), gpt-oss
MXFP4 folders (`quant_method: mxfp4`, expert `*_blocks` / `*_scales`, kept in FP4 through
`fp4kit.nn.register_fp4`) and plain float folders; anything else is an error that names the file and the format it found.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from fp4kit.formats import FP8Config, FP8Granularity, GlobalScale, MXFP4Config, NVFP4Config, QuantizedTensor
from fp4kit.nn import FP4Experts, FP4Linear, is_fused_experts, register_fp4
from fp4kit.nn.kv_quant import KVCacheConfig, KVScaleGranularity, add_kv_scale_buffers, enable_fp8_kv, kv_config_of
from fp4kit.nn.quantize import matches

from .experts import (expert_naming, expert_tensors, float_expert_tensors, gather_experts, install_experts,
                      router_names)
from .files import atomic_directory, load_tensors, read_json, weight_files
from .transforms import (card_note, ct_transform_config, fp4kit_rotation_metadata, pop_transform_tensors,
                         read_rotations, rotated_layers, transform_scheme_names, transform_tensors)

CT_FORMATS = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}
DEFAULT_SHARD_BYTES = 2 * 1024**3
KEEP_FP32 = ("global_scale", "k_scale", "v_scale")  # per-tensor scales stay float32, as vLLM reads them


def _fp4_args(config: NVFP4Config | MXFP4Config, *, activations: bool) -> dict:
    """compressed-tensors QuantizationArgs for FP4 weights, or for FP4 activations (its presets)."""
    if isinstance(config, NVFP4Config):
        args = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
                "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"}
        # activations: static global scale (input_global_scale), per-block scales computed at run time
        return args | {"dynamic": "local", "observer": "static_minmax"} if activations else args
    args = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 32, "strategy": "group",
            "dynamic": False, "scale_dtype": "torch.uint8"}
    return args | {"dynamic": True} if activations else args


# compressed-tensors' FP8_DYNAMIC input activations: E4M3, one scale per token computed at run time
FP8_TOKEN_ARGS = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True,
                  "observer": None}


def quantization_config(config: NVFP4Config | MXFP4Config, ignore: list[str],
                        input_config: NVFP4Config | MXFP4Config | FP8Config | None = None,
                        kv_config: KVCacheConfig | None = None) -> dict:
    """compressed-tensors' `quantization_config`: weight-only presets NVFP4A16 / MXFP4A16; with an FP4
    `input_config` the W4A4 presets NVFP4 / MXFP4; with FP8Config(TOKEN) FP4 weights and the
    FP8_DYNAMIC preset's per-token FP8 inputs (W4A8). `kv_config` adds a static FP8 `kv_cache_scheme`."""
    if isinstance(input_config, FP8Config):
        if input_config.granularity is not FP8Granularity.TOKEN:
            raise ValueError("W4A8 export supports dynamic per-token FP8 inputs only")
        inputs = dict(FP8_TOKEN_ARGS)
    elif input_config is not None and type(input_config) is not type(config):
        raise ValueError("compressed-tensors' FP4 presets pair NVFP4 weights with NVFP4 inputs, MXFP4 with MXFP4")
    else:
        inputs = None if input_config is None else _fp4_args(input_config, activations=True)
    weights = _fp4_args(config, activations=False)
    return {
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs,
                                      "output_activations": None, "format": None}},
        "quant_method": "compressed-tensors",
        "kv_cache_scheme": None if kv_config is None else kv_cache_scheme(kv_config),
        "format": CT_FORMATS[config.name],
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": sorted(ignore),
    }


def kv_cache_scheme(kv_config: KVCacheConfig) -> dict:
    """compressed-tensors QuantizationArgs of a static FP8 E4M3 KV cache (scales k_scale / v_scale)."""
    return {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
            "strategy": kv_config.granularity.value}


def fp4_config_of(model: nn.Module) -> tuple[NVFP4Config | MXFP4Config, NVFP4Config | MXFP4Config | None]:
    """(weight config, input config or None), the same for every FP4Linear, or an error."""
    configs = {(m.config, m.input_config) for m in model.modules() if isinstance(m, FP4Linear)}
    configs |= {(m.config, None) for m in model.modules() if isinstance(m, FP4Experts)}
    if not configs:
        raise ValueError("the model has no FP4Linear layers: run fp4kit.quantize_ first")
    if len(configs) > 1:
        raise ValueError(f"export needs one format for all layers, found {sorted(map(repr, configs))}")
    config, input_config = configs.pop()
    if isinstance(config, NVFP4Config) and config.global_scale is not GlobalScale.ENCODE:
        raise ValueError("compressed-tensors stores NVFP4 global scales as 448*6/amax: quantize with "
                         "NVFP4Config(global_scale=GlobalScale.ENCODE) to export")
    return config, input_config


def _export_plan(model: nn.Module, dense_dtype: torch.dtype):
    """(disk name, tensor, dtype to store) in module order; tied duplicates (lm_head tied to
    embed_tokens) once; FP4Experts expanded to one tensor set per expert."""
    naming = expert_naming(model.config)
    experts = {n: m for n, m in model.named_modules() if isinstance(m, FP4Experts) or is_fused_experts(m)}
    seen, written = set(), set()
    for name, t in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner in experts:
            if owner not in written:
                written.add(owner)
                m = experts[owner]
                if isinstance(m, FP4Experts):
                    yield from ((n, x, x.dtype) for n, x in expert_tensors(owner, m, naming))
                else:
                    yield from ((n, x, dense_dtype) for n, x in float_expert_tensors(owner, m, naming))
            continue
        name = naming.to_disk(name)
        key = (t.data_ptr(), t.shape, t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        dense = t.is_floating_point() and not name.endswith(KEEP_FP32) and t.dtype not in (
            torch.float8_e4m3fn, torch.float8_e8m0fnu)
        yield name, t, dense_dtype if dense else t.dtype
    # online rotations: the +-1 Hadamard vLLM's transform modules load (see transforms.py)
    yield from ((n, t, dense_dtype) for n, t in transform_tensors(rotated_layers(model, naming.to_disk), dense_dtype))


def _plan_length(model: nn.Module) -> int:
    """How many tensors `_export_plan` yields (for the progress bar)."""
    extra = sum(3 * m.num_experts * (3 if isinstance(m.config, NVFP4Config) else 2) - len(m.state_dict())
                for m in model.modules() if isinstance(m, FP4Experts))
    extra += sum(3 * m.gate_up_proj.shape[0] - 2 for m in model.modules() if is_fused_experts(m))
    return len(model.state_dict()) + extra + sum(1 for _ in transform_tensors(rotated_layers(model), torch.float32))


def export_bytes(model: nn.Module, dense_dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of tensor data `save_checkpoint` will write for this model."""
    return sum(t.numel() * dtype.itemsize for _, t, dtype in _export_plan(model, dense_dtype))


@dataclass
class SaveResult:
    path: pathlib.Path
    shards: list[str]
    total_bytes: int
    quantized: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def save_checkpoint(model: nn.Module, out: str | pathlib.Path, *, tokenizer=None, overwrite: bool = False,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES, dense_dtype: torch.dtype = torch.bfloat16,
                    card: str | None = None, progress: bool = True) -> SaveResult:
    """Write a quantized model (FP4Linear layers) as a compressed-tensors checkpoint folder."""
    from safetensors.torch import save_file

    config, input_config = fp4_config_of(model)
    naming = expert_naming(model.config)
    rotations = rotated_layers(model, naming.to_disk)  # raises on a float RotatedLinear
    quantized = [naming.to_disk(n) for n, m in model.named_modules() if isinstance(m, (FP4Linear, FP4Experts))]
    ignored = [naming.to_disk(n) for n, m in model.named_modules() if type(m) is nn.Linear]
    ignored += router_names(model, naming)
    out = pathlib.Path(out)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        shards, weight_map, shard, shard_bytes, total = [], {}, {}, 0, 0

        def flush():
            nonlocal shard, shard_bytes
            if shard:
                fname = f"shard-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                shards.append(fname)
                weight_map.update({k: fname for k in shard})
                shard, shard_bytes = {}, 0

        plan = _export_plan(model, dense_dtype)
        for name, t, dtype in tqdm(plan, desc=f"export {out.name}", disable=not progress, leave=False,
                                   total=_plan_length(model)):
            t = t.to(dtype).contiguous()
            size = t.numel() * t.element_size()
            if shard and shard_bytes + size > max_shard_bytes:
                flush()
            shard[name] = t
            shard_bytes += size
            total += size
        flush()
        final = _name_shards(tmp, shards, weight_map, total)

        hf_config = model.config.to_dict()
        hf_config.pop("quantization_config", None)
        hf_config["torch_dtype"] = str(dense_dtype).removeprefix("torch.")
        hf_config.pop("fp4kit_rotation", None)
        hf_config["quantization_config"] = quantization_config(config, ignored, input_config, kv_config_of(model))
        if rotations:
            hf_config["fp4kit_rotation"] = fp4kit_rotation_metadata(rotations)
            transform = ct_transform_config(rotations)
            if transform is not None:
                hf_config["quantization_config"]["transform_config"] = transform
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            try:
                model.generation_config.save_pretrained(tmp)
            except Exception:  # generation config validation is advisory; the weights are what matter
                pass
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text((card or model_card(config, quantized, ignored, input_config=input_config))
                                       + card_note(rotations))
    return SaveResult(out, final, total, quantized, ignored)


def _name_shards(folder: pathlib.Path, shards: list[str], weight_map: dict, total: int) -> list[str]:
    if len(shards) == 1:
        (folder / shards[0]).rename(folder / "model.safetensors")
        return ["model.safetensors"]
    names = {s: f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, s in enumerate(shards)}
    for old, new in names.items():
        (folder / old).rename(folder / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in sorted(weight_map.items())}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return list(names.values())


METHODS = {"rtn": "round-to-nearest (RTN)", "mse": "per-block MSE scale search", "gptq": "GPTQ",
           "mr-gptq": "MR-GPTQ (block-Hadamard input rotations, MSE scales, GPTQ)"}


def _activation_label(input_config) -> str:
    if input_config is None:
        return "bf16 (weight-only, W4A16)"
    if isinstance(input_config, FP8Config):
        return "FP8 E4M3, dynamic per-token scales (W4A8)"
    return f"{input_config.name.upper()} (W4A4)"


def model_card(config, quantized: list[str], ignored: list[str], *, source: str = "", table: str = "",
               input_config=None, method: str = "rtn") -> str:
    lines = [f"# {source or 'model'} — {config.name.upper()} (fp4kit)", "",
             f"Weights of {len(quantized)} linear layers are {config.name.upper()} in the compressed-tensors "
             f"`{CT_FORMATS[config.name]}` layout (vLLM and transformers with compressed-tensors load it).", "",
             f"- fp4kit config: `{config!r}`", f"- method: {METHODS.get(method, method)}",
             f"- activations: {_activation_label(input_config)}",
             f"- left in float: {', '.join(ignored) if ignored else 'none'}", ""]
    if table:
        lines += ["## Evaluation", "", table, ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- loading

@dataclass
class CheckpointInfo:
    path: pathlib.Path
    format: str  # "nvfp4-pack-quantized", "mxfp4-pack-quantized", "modelopt-nvfp4", "gpt-oss-mxfp4", "dense"
    config: NVFP4Config | MXFP4Config | None
    quantized: list[str]
    ignored: list[str]  # linear layers stored dense
    total_bytes: int
    ignore_patterns: list[str] = field(default_factory=list)  # the checkpoint's own ignore list


def detect_format(folder: pathlib.Path) -> tuple[str, NVFP4Config | MXFP4Config | None, list[str]]:
    cfg = read_json(folder / "config.json")
    qc = cfg.get("quantization_config")
    if (folder / "hf_quant_config.json").exists():
        hq = read_json(folder / "hf_quant_config.json").get("quantization", {})
        if hq.get("quant_algo") != "NVFP4":
            raise ValueError(f"{folder / 'hf_quant_config.json'}: ModelOpt quant_algo {hq.get('quant_algo')!r} "
                             "is not supported (only NVFP4)")
        return "modelopt-nvfp4", NVFP4Config(global_scale=GlobalScale.DECODE), list(hq.get("exclude_modules") or [])
    if qc is None:
        return "dense", None, []
    method, fmt = qc.get("quant_method"), qc.get("format")
    if method == "mxfp4":  # gpt-oss: MoE expert weights as *_blocks / *_scales, the rest dense
        return "gpt-oss-mxfp4", MXFP4Config(), list(qc.get("modules_to_not_convert") or [])
    if method == "compressed-tensors" and fmt in CT_FORMATS.values():
        config = NVFP4Config() if fmt == CT_FORMATS["nvfp4"] else MXFP4Config()
        return fmt, config, list(qc.get("ignore") or [])
    raise ValueError(f"{folder / 'config.json'}: unsupported quantization_config (quant_method={method!r}, "
                     f"format={fmt!r}); fp4kit reads compressed-tensors {sorted(CT_FORMATS.values())}, "
                     "ModelOpt NVFP4 and dense checkpoints")


def _modelopt_names(tensors: dict) -> dict:
    """ModelOpt names -> ours: weight (packed uint8) -> weight_packed, weight_scale_2 -> weight_global_scale."""
    out = {}
    for k, v in tensors.items():
        if k.endswith(".weight") and v.dtype == torch.uint8:
            k = k[: -len("weight")] + "weight_packed"
        elif k.endswith(".weight_scale_2"):
            k, v = k[: -len("weight_scale_2")] + "weight_global_scale", v.float().reshape(1)
        elif k.endswith((".input_scale", ".k_scale", ".v_scale")):
            continue
        out[k] = v
    return out


def load_checkpoint(path: str | pathlib.Path, *, dtype: torch.dtype = torch.bfloat16):
    """(model with FP4Linear layers, tokenizer or None, CheckpointInfo) from a checkpoint folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    fmt, config, ignore = detect_format(folder)
    tensors = {}
    for f in weight_files(folder):
        tensors.update(load_tensors(f))
    if fmt == "modelopt-nvfp4":
        tensors = _modelopt_names(tensors)
    hf_config = AutoConfig.from_pretrained(folder)
    naming = expert_naming(hf_config)
    tensors = {naming.from_disk(k): v for k, v in tensors.items()}
    expert_blocks = {k[: -len("_blocks")]: (tensors.pop(k), tensors.pop(k[: -len("_blocks")] + "_scales", None))
                     for k in [k for k in tensors if k.endswith("_blocks")]}

    for attr in ("quantization_config", "fp4kit_rotation"):
        if hasattr(hf_config, attr):
            delattr(hf_config, attr)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
    expert_groups = gather_experts(tensors, naming, model)
    input_config = _input_config(folder, config)
    quantized = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_packed")} | set(expert_blocks))
    raw_config = read_json(folder / "config.json")
    rotations = read_rotations(raw_config, quantized, str(folder / "config.json"))
    pop_transform_tensors(tensors, rotations, transform_scheme_names(raw_config), str(folder))
    for name in quantized:
        if name not in expert_blocks:
            _swap_in(model, name, config, tensors, folder, dtype, input_config, rotations.get(name))
    for name, (blocks, scales) in expert_blocks.items():
        _register_gpt_oss_expert(model, name, blocks, scales, folder, dtype)
    quantized = sorted(quantized + install_experts(model, expert_groups, tensors, config, naming, folder, dtype))
    kv_config = _kv_config(folder)
    if kv_config is not None:
        heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
        add_kv_scale_buffers(model, kv_config, heads)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if ".parametrizations." not in k]
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(hf_config, "tie_word_embeddings", False)}
    if set(missing) - tied:
        raise ValueError(f"{folder}: tensors missing from the checkpoint: {sorted(set(missing) - tied)[:8]}")
    if unexpected:
        raise ValueError(f"{folder}: tensors the model does not have: {sorted(unexpected)[:8]}")
    if tied:
        model.tie_weights()
    if kv_config is not None:
        enable_fp8_kv(model)
    tokenizer = _maybe_tokenizer(folder)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    ignored = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    return model, tokenizer, CheckpointInfo(folder, fmt, config, quantized, ignored, total, ignore)


def _kv_config(folder: pathlib.Path) -> KVCacheConfig | None:
    """The static FP8 KV cache a compressed-tensors config declares (None when it has none)."""
    kv = (read_json(folder / "config.json").get("quantization_config") or {}).get("kv_cache_scheme")
    if not kv:
        return None
    strategies = {g.value: g for g in KVScaleGranularity}
    if kv.get("num_bits") != 8 or kv.get("type") != "float" or kv.get("dynamic") or kv.get("strategy") not in strategies:
        raise ValueError(f"{folder / 'config.json'}: kv_cache_scheme {kv} is not a static FP8 scheme fp4kit simulates "
                         f"(num_bits 8, type float, strategy in {sorted(strategies)})")
    return KVCacheConfig(strategies[kv["strategy"]])


def _input_config(folder: pathlib.Path, config):
    """The FP4 input quantization a compressed-tensors config declares (None when weight-only)."""
    qc = read_json(folder / "config.json").get("quantization_config") or {}
    groups = qc.get("config_groups") or {}
    acts = [g.get("input_activations") for g in groups.values() if g.get("input_activations")]
    if not acts:
        return None
    a = acts[0]
    if a.get("num_bits") == 8 and a.get("type") == "float" and a.get("strategy") == "token" and a.get("dynamic"):
        return FP8Config(FP8Granularity.TOKEN)
    if a.get("num_bits") == 4 and a.get("type") == "float" and a.get("group_size") in (16, 32):
        return NVFP4Config() if a["group_size"] == 16 else MXFP4Config()
    raise ValueError(f"{folder / 'config.json'}: input_activations {a} are not an FP4 scheme fp4kit simulates")


def _swap_in(model, name, config, tensors, folder, dtype, input_config=None, rotation=None):
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{folder}: {name}.weight_packed has no matching layer in the model") from None
    if config is None:
        raise ValueError(f"{folder}: {name} is packed but config.json declares no FP4 quantization")
    n, k = linear.out_features, linear.in_features
    expect = {"weight_packed": (n, k // 2), "weight_scale": (n, k // config.block_size)}
    if isinstance(config, NVFP4Config):
        expect["weight_global_scale"] = (1,)
    for suffix, shape in expect.items():
        t = tensors.get(f"{name}.{suffix}")
        if t is None:
            raise ValueError(f"{folder}: {name}.{suffix} is missing")
        if t.dim() == 0:
            t = tensors[f"{name}.{suffix}"] = t.reshape(1)
        if tuple(t.shape) != shape:
            raise ValueError(f"{folder}: {name}.{suffix} has shape {tuple(t.shape)}, the config says {shape}")
    parent, _, child = name.rpartition(".")
    if isinstance(input_config, NVFP4Config) and f"{name}.input_global_scale" not in tensors:
        raise ValueError(f"{folder}: {name}.input_global_scale is missing (the config declares NVFP4 activations)")
    fp4 = FP4Linear(k, n, config, bias=linear.bias is not None, dtype=dtype, input_config=input_config,
                    rotation=rotation, name=name)
    setattr(model.get_submodule(parent) if parent else model, child, fp4)


def _register_gpt_oss_expert(model, name, blocks, scales, folder, dtype):
    """gpt-oss stores experts as [E, out, in/32, 16] bytes + [E, out, in/32] E8M0 scales (low nibble
    first, as ours); the module's parameter is [E, in, out], so the FP4 tensor is seen transposed.
    gate_up rows stay interleaved (gate even, up odd): GptOssExperts reads them that way."""
    if scales is None:
        raise ValueError(f"{folder}: {name}_blocks has no {name}_scales")
    if blocks.dim() != 4 or blocks.shape[-1] != 16 or tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise ValueError(f"{folder}: {name}_blocks {tuple(blocks.shape)} / {name}_scales {tuple(scales.shape)} "
                         "are not gpt-oss MXFP4 ([E, out, in/32, 16] and [E, out, in/32])")
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
        getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{folder}: {name}_blocks has no matching parameter in the model") from None
    e, n, kb, _ = blocks.shape
    qt = QuantizedTensor(blocks.reshape(e, n, kb * 16).contiguous(), scales.contiguous(), None, (e, n, kb * 32),
                         MXFP4Config())
    register_fp4(module, attr, qt, transpose=True, dtype=dtype)


def _maybe_tokenizer(folder: pathlib.Path):
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def checkpoint_summary(info: CheckpointInfo, model: nn.Module) -> dict:
    params = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, FP4Linear))
    params += sum(3 * m.num_experts * m.hidden_dim * m.intermediate_dim for m in model.modules()
                  if isinstance(m, FP4Experts))
    params += sum(p.numel() for n, p in model.named_parameters() if not _is_tied_duplicate(model, n))
    return {"path": str(info.path), "format": info.format, "config": repr(info.config),
            "quantized_layers": info.quantized, "excluded_layers": {n: _reason(n, info) for n in info.ignored},
            "parameters": params, "bytes": info.total_bytes, "bits_per_parameter": 8 * info.total_bytes / max(params, 1)}


def _is_tied_duplicate(model, name):
    return name.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)


def _reason(name, info):
    hit = next((p for p in info.ignore_patterns if matches(name, p.removeprefix("re:"))), None)
    return f"in the checkpoint's ignore list ({hit!r})" if hit else "stored dense (no FP4 tensors for it)"
