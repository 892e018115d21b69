"""Logging set-up: plain text on a terminal, structured JSON lines for a log shipper.

Log records name series by :func:`gateway.keys.log_id` and errors by type; that is a rule for
every ``log.*`` call in the gateway (see the PHI test in tests/test_ops_phi.py). Set up once
by the entry point, never at import time.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(
    level: str = "INFO", fmt: Literal["text", "json"] = "text", stream=None
) -> None:
    """(Re)configure the root logger; idempotent."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(process)d %(threadName)s",
                rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Third-party chatter (pynetdicom logs every PDU at DEBUG; it quotes AE titles only).
    logging.getLogger("pynetdicom").setLevel(max(logging.getLevelName(level), logging.WARNING))
