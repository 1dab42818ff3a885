"""The `fp4kit` command: argument parsing that calls the library, nothing more."""

from __future__ import annotations

import argparse
import sys

import torch

import fp4kit
from fp4kit.formats import E2M1_VALUES, MXFP4Config, NVFP4Config, ScaleRule, quantize, sqnr_db

SCHEMES = ("nvfp4", "mxfp4")


def format_config(scheme: str, scale_rule: str | None = None):
    if scheme == "nvfp4":
        return NVFP4Config()
    if scheme == "mxfp4":
        return MXFP4Config(ScaleRule(scale_rule)) if scale_rule else MXFP4Config()
    raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")


def load_tensor_file(path: str) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or a .pt/.bin file loaded with weights_only=True (no pickle code)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, torch.Tensor):
        return {"tensor": obj}
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ValueError(f"{path}: expected a tensor or a dict of tensors, got {type(obj).__name__}")


def cmd_formats(args) -> int:
    print("E2M1 codes (bit 3 = sign, element 2j in the low nibble):")
    print("code  bits  value")
    for code, value in enumerate(E2M1_VALUES):
        print(f"{code:>4}  {code:04b}  {value:+g}")
    if args.roundtrip:
        config = format_config(args.scheme, args.scale_rule)
        print(f"\nround trip through {config.name} ({args.roundtrip}):")
        print(f"{'tensor':<40} {'shape':<18} {'SQNR dB':>8} {'max err':>10} {'bits/el':>8}")
        for name, t in load_tensor_file(args.roundtrip).items():
            if not t.is_floating_point():
                print(f"{name:<40} skipped: dtype {t.dtype} is not floating point")
                continue
            if t.dim() == 0 or t.shape[-1] % config.block_size:
                print(f"{name:<40} skipped: last dim of {tuple(t.shape)} not divisible by {config.block_size}")
                continue
            qt = quantize(t, config, name=name)
            deq = qt.dequantize()
            err = (deq - t.float()).abs().max().item()
            print(f"{name:<40} {str(tuple(t.shape)):<18} {sqnr_db(t.float(), deq):>8.2f} {err:>10.3g} "
                  f"{qt.bits_per_element:>8.3f}")
    return 0


def cmd_quantize(args) -> int:
    # Placeholder main job until checkpoint IO lands: a small random Llama-shaped model.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    with torch.no_grad():
        ref = model(ids).logits
        report = fp4kit.quantize_(model, format_config(args.scheme))
        out = model(ids).logits
    print(report.summary())
    print(f"random Llama ({sum(p.numel() for p in model.parameters()):,} params left in float): "
          f"logit SQNR {sqnr_db(ref, out):.2f} dB after {args.scheme}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fp4kit", description=__doc__)
    p.add_argument("--version", action="version", version=f"fp4kit {fp4kit.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("formats", help="print the E2M1 table; round-trip a tensor file through a format")
    f.add_argument("--roundtrip", metavar="FILE", help=".safetensors, or .pt loaded with weights_only=True")
    f.add_argument("--scheme", choices=SCHEMES, default="nvfp4")
    f.add_argument("--scale-rule", choices=[r.value for r in ScaleRule], help="MXFP4 shared-exponent rule")
    f.set_defaults(func=cmd_formats)
    q = sub.add_parser("quantize", help="quantize a model (placeholder: a small random Llama)")
    q.add_argument("--scheme", choices=SCHEMES, default="nvfp4")
    q.set_defaults(func=cmd_quantize)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"fp4kit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
