"""`defacegate worker`: a Celery worker of distributed mode."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from gateway.config import Settings

NAME = "worker"
HELP = "run a Celery worker for the deface and/or forward queues (needs celery.broker_url)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--queues", default="deface,forward", help="comma-separated: deface, forward"
    )
    parser.add_argument("--engine", choices=("anatomical", "nnunet"), help="override deface.engine")
    parser.add_argument(
        "--concurrency", type=int, default=1, help="worker processes (default 1: one engine)"
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    from celery.signals import worker_process_init  # type: ignore[import-untyped]

    from gateway.celery_app import create_app
    from gateway.tasks import get_engine

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = set(queues) - {"deface", "forward"}
    if not queues or unknown:
        print(f"defacegate worker: unknown queue(s): {sorted(unknown)}", file=sys.stderr)
        return 2
    if settings.celery.broker_url is None:
        print(
            "defacegate worker: celery.broker_url is not set (embedded mode runs the tasks "
            "inside `defacegate serve`)",
            file=sys.stderr,
        )
        return 2
    if args.engine:
        deface = settings.deface.model_copy(update={"engine": args.engine})
        settings = settings.model_copy(update={"deface": deface})
    if "deface" in queues and settings.deid.key is None:
        print("defacegate worker: deid.key is required to de-identify", file=sys.stderr)
        return 2
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    app = create_app(settings)
    if "deface" in queues:

        @worker_process_init.connect(weak=False)
        def _load_engine(**_: object) -> None:
            get_engine(settings.deface)  # once per worker process, before the first task

    argv = [
        "worker",
        f"--queues={','.join(queues)}",
        f"--concurrency={args.concurrency}",
        "--pool=prefork",
        f"--hostname=defacegate-{os.getpid()}@{socket.gethostname()}",
        f"--loglevel={settings.log_level}",
        "--without-gossip",
        "--without-mingle",
    ]
    app.worker_main(argv)
    return 0
