"""Ingest speed: a 300-slice 512×512 CT series sent by dcmtk ``storescu`` over one association
into the gateway (``defacegate serve``, fsync on) and into dcmtk ``storescp`` (TCP_NODELAY=1),
alternately, on the same machine in the same run. Prints instances/s and the ratio
(target: gateway ≥ 0.5 × storescp).

    .venv/bin/python bench/bench_ingest.py [--slices 300] [--matrix 512] [--rounds 2]

The gateway's quiet period is set far beyond the run so no defacing competes for the CPU:
this measures receive + durable spool only. Each round sends a fresh series (new UIDs) so
the gateway never takes the duplicate fast path. A bare in-process pynetdicom SCP is measured
alongside: what pynetdicom's own C-STORE path costs (the gateway's lane bypasses it). Before
each send the page cache is written back (``os.sync``) so no receiver pays for the previous
one's or the generator's I/O.

The receivers' order is counterbalanced: storescp, gateway, bare pynetdicom, ignore in the
first round, the reverse in the second, and so on. A receiver that writes right after
another one has used up the freed page-cache pages writes into fresh guest memory, which on
a VM costs ≈ 10 µs per 4 KiB page (up to ≈ 1 ms per 512 KiB instance), so a fixed order
would always charge that to the same receiver.

Also measured, to show what the target allows on this machine in this run: ``storescp
--ignore`` (dcmtk receives and discards: the sender's pace plus the cheapest receive) and, in
this process, the gateway spool's durable write of the same files (``Spool.store``: temp
file, fdatasync, rename, directory fsync). Their sum is the time per instance of an *ideal*
gateway (dcmtk's receive, then the write the issue requires; storescu waits for each
response, so nothing overlaps); the "ideal ratio" printed is that receiver's rate over
storescp's. When it is below 0.5, no gateway that syncs before answering reaches the target
on this disk in that run. (storescp's own rate moves between runs; a likely cause on a VM:
a write into never-touched guest memory costs ~10 µs per 4 KiB page.)

Not like for like: storescp never fsyncs (dcmtk has no option for it) and gets 128 KiB PDUs
(its ``--max-pdu``), the gateway 1 MiB and the bare SCP unlimited ones. The gateway's
durable write (fdatasync + rename + directory fsync, two journal commits on ext4) is in the
gateway's figure only; ``--no-fsync`` shows what the same gateway does without it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support (the rig)

from gateway.spool import Spool
from inference.dicomgen import make_ct_series
from inference.geometry import Geometry
from tests.support.gateway import GatewayProcess, write_config
from tests.support.pacs import LOCALHOST, StoreSCP, free_port, storescu


def write_series(directory: Path, slices: int, matrix: int, seed: int) -> list[Path]:
    """A CT series of realistic size (uncompressed, 12-bit noise-like content)."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    hu = rng.normal(40.0, 300.0, size=(slices, matrix, matrix)).astype(np.float32)
    spacing = 250.0 / matrix
    geometry = Geometry(affine=np.diag([1.0, spacing, spacing, 1.0]), shape=hu.shape)
    paths = []
    for k, ds in enumerate(make_ct_series(hu, geometry)):
        path = directory / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class BarePynetdicomSCP:
    """Reference point: a minimal pynetdicom storage SCP (TCP_NODELAY, raw bytes to a file,
    no fsync, no state). Its rate is the ceiling any pynetdicom-based receiver can reach."""

    def __init__(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True)
        self.aet = "BARE"
        self.port = free_port()
        ae = AE(ae_title=self.aet)
        ae.maximum_pdu_size = 0
        ae.add_supported_context(CTImageStorage)

        def store(event: evt.Event) -> int:
            name = f"{event.request.AffectedSOPInstanceUID}.dcm"  # type: ignore[union-attr]
            (out_dir / name).write_bytes(event.encoded_dataset(include_meta=True))
            return 0x0000

        def nodelay(event: evt.Event) -> None:
            sock = event.assoc.dul.socket
            if sock is not None and sock.socket is not None:
                sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        self.server: ThreadedAssociationServer = ae.start_server(  # type: ignore[assignment]
            (LOCALHOST, self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, store), (evt.EVT_CONN_OPEN, nodelay)],
        )

    def close(self) -> None:
        self.server.shutdown()


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process (all its threads); None = this process."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def durable_write_ms(paths: list[Path], root: Path) -> float:
    """Milliseconds per instance of the gateway spool's durable write of these files alone
    (read into memory first; the page cache written back before, as before a send)."""
    blobs = [p.read_bytes() for p in paths]
    spool = Spool(root, fsync=True)
    os.sync()
    start = time.perf_counter()
    for k, data in enumerate(blobs, start=1):
        spool.store("1.2.826.0.1.3680043.8.498.1", f"1.2.826.0.1.3680043.8.498.1.{k}", data)
    ms = 1000 * (time.perf_counter() - start) / len(blobs)
    shutil.rmtree(root)
    return ms


def timed_send(series: Path, port: int, aet: str, pid: int | None) -> tuple[float, float]:
    """Wall seconds of the send and CPU seconds the receiver spent meanwhile."""
    cpu = cpu_seconds(pid)
    start = time.perf_counter()
    storescu([series], port, aet)
    return time.perf_counter() - start, cpu_seconds(pid) - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--no-fsync", dest="fsync", action="store_false", help="gateway.fsync off (diagnosis)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        root = Path(tmp)
        config = write_config(
            root / "gw",
            gateway={"quiet_period_s": 3600.0, "fsync": args.fsync},
            destinations=[{"ae_title": "NOWHERE", "host": LOCALHOST, "port": 1}],
        )
        n = args.slices
        mb = 0.0
        results: dict[str, list[float]] = {
            "storescp": [],
            "gateway": [],
            "pynetdicom": [],
            "ignore": [],
        }
        cpu_ms: dict[str, list[float]] = {k: [] for k in results}
        write_ms: list[float] = []
        bare = BarePynetdicomSCP(root / "bare")
        with (
            StoreSCP(root / "storescp") as scp,
            StoreSCP(root / "ignore", aet="IGNORE", extra_args=["--ignore"]) as ignore,
            GatewayProcess(config) as gateway,
        ):
            scp.start()
            ignore.start()
            assert scp.process is not None and ignore.process is not None
            assert gateway.process is not None
            targets = {
                "storescp": (scp.port, scp.aet, scp.process.pid),
                "gateway": (gateway.port, gateway.ae_title, gateway.process.pid),
                "pynetdicom": (bare.port, bare.aet, None),  # in this process
                "ignore": (ignore.port, ignore.aet, ignore.process.pid),
            }
            for r in range(args.rounds):
                order = list(targets.items())  # counterbalanced (see the docstring)
                for target, (port, aet, pid) in order[:: -1 if r % 2 else 1]:
                    series = root / f"series-{target}-{r}"
                    paths = write_series(series, n, args.matrix, seed=r)
                    mb = sum(p.stat().st_size for p in paths) / 1e6
                    # Write back the series just generated and the previous receiver's
                    # files first: otherwise ~300 MB of dirty pages are flushed during the
                    # next send and queue ahead of the gateway's fdatasync on the same disk
                    # (storescp, which never syncs, does not notice).
                    os.sync()
                    seconds, cpu = timed_send(series, port, aet, pid)
                    if target == "gateway":
                        write_ms.append(durable_write_ms(paths, root / "probe"))
                        print(f"round {r + 1} durable write alone {write_ms[-1]:.2f} ms/instance")
                    shutil.rmtree(series)
                    results[target].append(n / seconds)
                    cpu_ms[target].append(1000 * cpu / n)
                    print(
                        f"round {r + 1} {target:10s} {n} instances ({mb:.0f} MB) in "
                        f"{seconds:6.2f} s = {n / seconds:6.1f} instances/s, "
                        f"receiver CPU {1000 * cpu / n:5.2f} ms/instance",
                        flush=True,
                    )
            gateway.check_alive()
        bare.close()
        dcmtk = statistics.median(results["storescp"])
        ours = statistics.median(results["gateway"])
        ceiling = statistics.median(results["pynetdicom"])
        ratio = ours / dcmtk
        ideal = 1000 / (1000 / statistics.median(results["ignore"]) + statistics.median(write_ms))
        print(
            f"\ningest {n}×{args.matrix}² over one association (median of {args.rounds}): "
            f"gateway {ours:.1f} instances/s (fsync {'on' if args.fsync else 'off'}), "
            f"dcmtk storescp {dcmtk:.1f} instances/s, "
            f"ratio {ratio:.2f} (target ≥ 0.50) {'OK' if ratio >= 0.5 else 'BELOW TARGET'}; "
            f"bare pynetdicom SCP (no fsync, no state) {ceiling:.1f} instances/s = "
            f"{ceiling / dcmtk:.2f} of dcmtk; receiver CPU ms/instance (median): "
            + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in cpu_ms.items())
        )
        print(
            f"bound: storescp --ignore {statistics.median(results['ignore']):.1f} instances/s "
            f"+ durable write alone {statistics.median(write_ms):.2f} ms/instance → ideal "
            f"gateway {ideal:.1f} instances/s, ideal ratio {ideal / dcmtk:.2f}; "
            f"the gateway reaches {ours / ideal:.0%} of the ideal"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
