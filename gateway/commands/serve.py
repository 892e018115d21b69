"""`defacegate serve`."""

from __future__ import annotations

import argparse
import sys

from gateway.config import Settings

NAME = "serve"
HELP = "serve (not yet implemented)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*")


def run(args: argparse.Namespace, settings: Settings) -> int:
    print("defacegate serve: not yet implemented", file=sys.stderr)
    return 3
