"""Container health check: ``python -m gateway.health [--worker]``.

Gateway: the admin API's ``/readyz`` (state database, spool space, SCP listening, broker)
must answer 200. Worker: a Celery worker of this host must answer a ping. Exit 0 = healthy.
"""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from gateway.config import Settings, load_settings


def gateway_ready(settings: Settings, timeout: float = 5.0) -> str | None:
    """None when ready, else a short reason."""
    if not settings.admin.enabled:
        return "admin API disabled: nothing to probe"
    host = "127.0.0.1" if settings.admin.host in ("0.0.0.0", "::") else settings.admin.host
    request = urllib.request.Request(f"http://{host}:{settings.admin.port}/readyz")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return None if response.status == 200 else f"readyz answered {response.status}"
    except urllib.error.HTTPError as exc:
        return f"readyz answered {exc.code}"
    except OSError as exc:
        return f"admin API unreachable ({type(exc).__name__})"


def worker_alive(settings: Settings, timeout: float = 5.0) -> str | None:
    from gateway.celery_app import create_app

    if settings.celery.broker_url is None:
        return "celery.broker_url is not set"
    replies = create_app(settings).control.ping(timeout=timeout) or []
    suffix = "@" + socket.gethostname()
    if any(name.endswith(suffix) for reply in replies for name in reply):
        return None
    return "no worker on this host answered"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    settings = load_settings()
    problem = worker_alive(settings) if "--worker" in args else gateway_ready(settings)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
