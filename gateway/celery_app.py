"""The Celery app of distributed mode: two tasks, ``defacegate.deface`` (queue ``deface``)
and ``defacegate.forward`` (queue ``forward``), thin adapters over :mod:`gateway.tasks`.

Delivery guarantees: ``acks_late`` + ``task_reject_on_worker_lost`` (a task whose worker
child died is redelivered; the redelivered message has the same task id, which the claim
accepts as the same owner), prefetch multiplier 1 (a long inference never holds a second
series hostage), and a Redis ``visibility_timeout`` far above the longest inference (else
Redis hands a running task to a second worker). A task is only a message; the authoritative
state is SQLite, so a lost or duplicated message is harmless: the gateway's scheduler
re-queues work whose lease expired, and a duplicate finds nothing to claim.
"""

from __future__ import annotations

from celery import Celery, Task  # type: ignore[import-untyped]

from gateway.config import Settings
from gateway.state import Stage
from gateway.tasks import JOBS, Context

TASK_NAMES = {stage: f"defacegate.{stage.value}" for stage in Stage}


def create_app(settings: Settings) -> Celery:
    """A Celery app bound to ``settings`` (no module-level app, no global configuration)."""
    cel = settings.celery
    if cel.broker_url is None:
        raise ValueError("celery.broker_url is not set: the embedded mode does not use Celery")
    app = Celery(
        "defacegate", broker=cel.broker_url, backend=cel.result_backend, set_as_current=False
    )
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=cel.result_backend is None,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_routes={TASK_NAMES[s]: {"queue": s.value} for s in Stage},
        task_default_queue=Stage.DEFACE.value,
        broker_transport_options={"visibility_timeout": cel.visibility_timeout_s},
        result_backend_transport_options={"visibility_timeout": cel.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )
    contexts: dict[str, Context] = {}

    def context() -> Context:
        # Built lazily in the process that runs the task (after the prefork fork).
        if "ctx" not in contexts:
            contexts["ctx"] = Context.from_settings(settings)
        return contexts["ctx"]

    for stage, job in JOBS.items():

        def run(self: Task, series_uid: str, generation: int, _job=job) -> str:
            return str(_job(context(), series_uid, int(generation), owner=str(self.request.id)))

        app.task(name=TASK_NAMES[stage], bind=True, queue=stage.value, shared=False)(run)
    return app


def send(app: Celery, stage: Stage, series_uid: str, generation: int) -> None:
    """Queue one job (ids only)."""
    app.send_task(TASK_NAMES[stage], args=[series_uid, generation], queue=stage.value)
