"""`defacegate retry`: re-queue a dead-lettered (failed) series, or list them."""

from __future__ import annotations

import argparse
import sys

from gateway.config import Settings

NAME = "retry"
HELP = "re-queue a dead-lettered series (SERIES_UID or its log id); --list shows them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("series", nargs="?", help="SeriesInstanceUID or the log id from the logs")
    parser.add_argument("--list", action="store_true", help="list failed series")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from gateway import operator
    from gateway.state import NotRetryableError, State, UnknownSeriesError
    from gateway.tasks import Context

    ctx = Context.from_settings(settings)
    store = ctx.store
    if args.list or not args.series:
        for rec in store.find(State.FAILED):
            print(f"{rec.log_id}\t{rec.failed_stage}\t{rec.reason}")
        return 0 if args.list else 2
    try:
        rec = operator.retry(
            store, ctx.spool, ctx.trail, operator.find(store, args.series), by="cli"
        )
    except (UnknownSeriesError, NotRetryableError) as exc:
        print(f"defacegate retry: {exc}", file=sys.stderr)
        return 1
    print(f"series {rec.log_id}: re-queued as {rec.state} (the running gateway picks it up)")
    return 0
