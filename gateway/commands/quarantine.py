"""`defacegate quarantine`: list, release or discard quarantined series."""

from __future__ import annotations

import argparse
import sys

from gateway.config import Settings

NAME = "quarantine"
HELP = "list quarantined series, or release / discard one (by log id or SERIES_UID)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list", "release", "discard"))
    parser.add_argument("series", nargs="?", help="log id (as in logs and the API) or UID")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from gateway import operator
    from gateway.state import NotRetryableError, State, UnknownSeriesError
    from gateway.tasks import Context

    ctx = Context.from_settings(settings)
    if args.action == "list":
        for rec in ctx.store.find(State.QUARANTINED):
            has = "outputs" if ctx.spool.output_paths(rec.series_uid, rec.generation) else "-"
            print(f"{rec.log_id}\t{rec.reason}\t{has}")
        return 0
    if not args.series:
        print(f"defacegate quarantine {args.action}: which series?", file=sys.stderr)
        return 2
    action = operator.release if args.action == "release" else operator.discard
    try:
        rec = operator.find(ctx.store, args.series)
        new = action(ctx.store, ctx.spool, ctx.trail, rec, by="cli")
    except (UnknownSeriesError, NotRetryableError) as exc:
        print(f"defacegate quarantine {args.action}: {exc}", file=sys.stderr)
        return 1
    print(f"series {new.log_id}: {new.state}")
    return 0
