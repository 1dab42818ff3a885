"""The `fp4kit` command: argument parsing that calls the library, nothing more.

Each subcommand lives in its own module here with a `register(subparsers)` function; COMMANDS lists them in the
order `fp4kit --help` shows them. Library errors that a user can fix (bad input, missing files, an existing output
folder) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

import fp4kit

from . import eval as eval_cmd
from . import formats, generate, grpo, inspect, qat, quantize

COMMANDS = [formats, quantize, eval_cmd, inspect, generate, qat, grpo]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fp4kit", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"fp4kit {fp4kit.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, OSError) as e:
        print(f"fp4kit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
