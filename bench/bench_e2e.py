"""End-to-end latency: seconds from the last C-STORE response (dcmtk ``storescu`` into the
gateway) to the last instance stored in Orthanc, for a 512×512×300 phantom, anatomical engine,
quiet period 2 s (target ≤ 30 s on 2 cores).

    .venv/bin/python bench/bench_e2e.py [--matrix 512] [--slices 300] [--mode embedded|redis]

``embedded`` (default) is ``defacegate serve`` alone; ``redis`` adds a private redis-server and
one ``defacegate worker``. The gateway log lines of the series are printed as a breakdown.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support (the rig)

from pydicom import dcmread

from inference.phantom import PhantomOptions, generate_phantom, write_phantom
from tests.support.gateway import GatewayProcess, RedisServer, WorkerProcess, write_config
from tests.support.pacs import LOCALHOST, Orthanc, storescu, wait_for


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--quiet", type=float, default=2.0, help="quiet period, s")
    parser.add_argument("--mode", choices=("embedded", "redis"), default="embedded")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        started = time.perf_counter()
        phantom = generate_phantom(PhantomOptions(seed=1, matrix=args.matrix, n_slices=args.slices))
        series = write_phantom(phantom, root / "phantom")
        files = sorted(series.iterdir())
        n = len(files)
        series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        del phantom
        print(f"phantom {n}×{args.matrix}² written in {time.perf_counter() - started:.1f} s")

        pacs = Orthanc(root / "orthanc", count_stores=False)
        stack.callback(pacs.stop)
        pacs.start()
        celery = {}
        if args.mode == "redis":
            redis = RedisServer(root / "redis")
            stack.callback(redis.stop)
            redis.start()
            celery = {"broker_url": redis.url}
        config = write_config(
            root / "gw",
            gateway={"quiet_period_s": args.quiet, "poll_interval_s": 0.2},
            celery=celery,
            destinations=[{"ae_title": pacs.aet, "host": LOCALHOST, "port": pacs.dicom_port}],
        )
        gateway = GatewayProcess(config)
        stack.callback(gateway.stop)
        gateway.start()
        if args.mode == "redis":
            worker = WorkerProcess(config, "deface,forward")
            stack.callback(worker.stop)
            worker.start()

        t0 = time.perf_counter()
        storescu([series], gateway.port, gateway.ae_title, calling_aet="BENCH")
        last_response = time.perf_counter()
        print(f"ingest: {n} instances in {last_response - t0:.1f} s")

        def arrived() -> bool:
            gateway.check_alive()
            return pacs.instance_count() >= n

        wait_for(arrived, args.timeout, f"{n} instances in Orthanc", interval=0.1)
        latency = time.perf_counter() - last_response
        wait_for(lambda: gateway.state(series_uid) == "done", 60, "series done", interval=0.1)
        logs = gateway.log_text()
        if args.mode == "redis":
            logs += (root / "gw" / "worker.log").read_text(errors="replace")
        for line in logs.splitlines():
            if "series " in line and ("job" in line or "first instance" in line):
                print("  " + line.strip()[:160])
        print(
            f"\nend-to-end {n}×{args.matrix}² ({args.mode}, anatomical engine, quiet period "
            f"{args.quiet:g} s): {latency:.1f} s from the last C-STORE response to the last "
            f"instance in Orthanc (target ≤ 30 s) {'OK' if latency <= 30 else 'ABOVE TARGET'}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
