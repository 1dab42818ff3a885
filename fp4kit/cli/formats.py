"""`fp4kit formats`: the E2M1 code table, and a tensor file's round trip through a format."""

from __future__ import annotations

from fp4kit.formats import E2M1_VALUES, quantize, sqnr_db

from .common import SCHEMES, SCALE_RULES, format_config, load_tensor_file


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


def register(sub) -> None:
    f = sub.add_parser("formats", help="print the E2M1 table; round-trip a tensor file through a format")
    f.add_argument("--roundtrip", metavar="FILE", help=".safetensors, or .pt loaded with weights_only=True")
    f.add_argument("--scheme", choices=SCHEMES, default="nvfp4")
    f.add_argument("--scale-rule", choices=SCALE_RULES, help="MXFP4 shared-exponent rule")
    f.set_defaults(func=cmd_formats)
