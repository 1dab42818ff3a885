"""`fp4kit inspect`: format, quantized and excluded layers, size and bits per parameter of a checkpoint folder."""

from __future__ import annotations


def cmd_inspect(args) -> int:
    import json

    from fp4kit.io import checkpoint_summary, load_checkpoint

    model, _, info = load_checkpoint(args.path)
    summary = checkpoint_summary(info, model)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['path']}: {summary['format']}  ({summary['config']})")
    print(f"  {summary['parameters']:,} parameters, {summary['bytes'] / 1e6:.1f} MB, "
          f"{summary['bits_per_parameter']:.2f} bits/param")
    experts = sum(n.endswith(".experts") for n in summary["quantized_layers"])
    print(f"  quantized: {len(summary['quantized_layers']) - experts} linear layers"
          + (f", {experts} MoE expert groups" if experts else ""))
    for name, reason in summary["excluded_layers"].items():
        print(f"  excluded {name}: {reason}")
    return 0


def register(sub) -> None:
    i = sub.add_parser("inspect", help="describe a quantized checkpoint folder")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_inspect)
