"""`defacegate serve`: the gateway (SCP, spool, scheduler; embedded worker without a broker)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from gateway.config import Settings

NAME = "serve"
HELP = "run the DICOM gateway (C-STORE SCP → deface → forward)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, help="override gateway.port (0 = ephemeral)")


def check(settings: Settings) -> str | None:
    """A configuration problem that makes serving pointless or unsafe, or None."""
    if settings.deid.key is None:
        return "deid.key is required by the gateway (pseudonyms must survive restarts)"
    if not settings.destinations:
        return "no destinations configured: the gateway would have nowhere to forward"
    return None


def run(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.malloc import tune_for_ingest
    from gateway.service import Gateway

    if args.port is not None:
        gateway = settings.gateway.model_copy(update={"port": args.port})
        settings = settings.model_copy(update={"gateway": gateway})
    problem = check(settings)
    if problem:
        print(f"defacegate serve: {problem}", file=sys.stderr)
        return 2
    # pynetdicom logs UIDs and identifiers at INFO/DEBUG: keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    tune_for_ingest()  # per-instance buffers stay in the heap (gateway/malloc.py)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        service = Gateway(settings)
        service.start()
    except (OSError, ValueError) as exc:
        print(f"defacegate serve: cannot start: {exc}", file=sys.stderr)
        return 1
    service.run_until(stop)
    return 0
