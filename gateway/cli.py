"""``defacegate`` command line: one subcommand per module in :mod:`gateway.commands`.

Each command module exposes ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args, settings) -> int``. The entry point builds the settings once and passes them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from gateway.config import load_settings
from gateway.logs import configure_logging

COMMANDS = (
    "deface",
    "phantom",
    "deid",
    "serve",
    "worker",
    "retry",
    "quarantine",
    "models",
    "audit",
    "config",
)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(
        prog="defacegate",
        description="DICOM defacing and de-identification gateway for head and neck CTA.",
    )
    parser.add_argument("--config", help="YAML configuration file (or $DEFACEGATE_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules: dict[str, object] = {}
    for name in COMMANDS:
        module = importlib.import_module(f"gateway.commands.{name}")
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        modules[module.NAME] = module
    return parser, modules


def describe_config_error(exc: Exception) -> str:
    """One line per bad setting (``section.name: what is wrong``), never the value given:
    it may be a secret, and pydantic's own text adds documentation links."""
    if not isinstance(exc, ValidationError):
        return str(exc)
    lines = [f"{exc.error_count()} invalid setting(s)"]
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        where = ".".join(str(part) for part in error["loc"]) or "(file)"
        lines.append(f"  {where}: {error['msg']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except Exception as exc:  # invalid config is a user error: say what and stop
        print(f"defacegate: configuration error: {describe_config_error(exc)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    return int(modules[args.command].run(args, settings) or 0)  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
