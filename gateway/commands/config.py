"""`defacegate config`: show the effective configuration, or the documented example."""

from __future__ import annotations

import argparse
import json

from gateway.config import Settings

NAME = "config"
HELP = "print the effective configuration (secrets masked) or, with --example, every setting"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--example", action="store_true", help="documented YAML with every setting and default"
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.example:
        from gateway.configdoc import example_yaml

        print(example_yaml(), end="")
        return 0
    # SecretStr dumps as '**********' in JSON mode: keys and tokens never printed.
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    return 0
