"""Benchmark: anatomical facemask engine on a 512×512×300 phantom, 2 CPU cores.

    .venv/bin/python bench/bench_anatomical.py [--repeats 3] [--matrix 512] [--slices 300]
        [--bone keep|smooth|remove]

Targets (issue 3): ≤ 10 s wall and ≤ 3 GB peak RSS. The phantom is generated in this
process and saved as a float32 ``.npy``; the engine then runs in a fresh child process
pinned to two cores that only loads the volume (as a worker holding the reconstructed
series would) and runs the engine ``--repeats`` times, so the peak RSS printed is the
engine's own plus the volume, not the phantom generator's. Also prints the Dice against the
ground truth and the number of intracranial voxels masked (must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET_S, TARGET_GB = 10.0, 3.0


def _hwm_mb() -> float:
    """Peak resident memory of this process, MB: VmHWM (reset by exec, unlike ru_maxrss,
    which a child inherits from the parent that forked it)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(work: Path, repeats: int, bone: str) -> None:
    """Run in the child process: load, run the engine, report JSON on stdout."""
    from inference.engines.anatomical import AnatomicalEngine, AnatomicalOptions

    import_mb = _hwm_mb()
    hu = np.load(work / "hu.npy")
    geometry = pickle.loads((work / "geometry.pkl").read_bytes())
    base_mb = _hwm_mb()
    engine = AnatomicalEngine(AnatomicalOptions(bone=bone))  # type: ignore[arg-type]
    times = []
    mask = None
    for _ in range(repeats):
        t = time.perf_counter()
        mask = engine.mask(hu, geometry)
        times.append(time.perf_counter() - t)
    assert mask is not None
    np.save(work / "mask.npy", mask)
    peak_mb = _hwm_mb()
    print(
        json.dumps({"times": times, "import_mb": import_mb, "base_mb": base_mb, "peak_mb": peak_mb})
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--bone", choices=["keep", "smooth", "remove"], default="keep")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.repeats, args.bone)
        return 0

    from inference.phantom import PhantomOptions, generate_phantom

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        p = generate_phantom(
            PhantomOptions(matrix=args.matrix, n_slices=args.slices, fov="head", seed=1)
        )
        print(
            f"phantom {p.hu.shape} float32, spacing {np.round(p.geometry.spacing, 3)} mm, "
            f"generated in {time.perf_counter() - t:.1f} s"
        )
        np.save(work / "hu.npy", p.hu)
        (work / "geometry.pkl").write_bytes(pickle.dumps(p.geometry))
        facemask, intracranial = p.facemask, p.intracranial
        del p
        env = dict(os.environ, OMP_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2", MKL_NUM_THREADS="2")
        cmd = [
            sys.executable,
            __file__,
            "--child",
            str(work),
            "--repeats",
            str(args.repeats),
            "--bone",
            args.bone,
        ]
        cores = sorted(os.sched_getaffinity(0))[:2] if hasattr(os, "sched_getaffinity") else []
        if cores:
            cmd = ["taskset", "-c", ",".join(map(str, cores)), *cmd]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        mask = np.load(work / "mask.npy")
    inter = int((mask & facemask).sum())
    dice = 2 * inter / (int(mask.sum()) + int(facemask.sum()))
    best, med = min(r["times"]), statistics.median(r["times"])
    peak_gb = r["peak_mb"] / 1024
    print(
        f"anatomical engine (bone={args.bone}) on {len(cores) or 'all'} cores, "
        f"{args.repeats} runs: best {best:.2f} s, median {med:.2f} s "
        f"(target <= {TARGET_S:.0f} s)"
    )
    print(
        f"peak RSS {peak_gb:.2f} GB (after imports {r['import_mb'] / 1024:.2f} GB, volume "
        f"loaded {r['base_mb'] / 1024:.2f} GB; target <= {TARGET_GB:.0f} GB)"
    )
    print(
        f"Dice vs ground truth {dice:.3f}; intracranial voxels masked "
        f"{int((mask & intracranial).sum())}"
    )
    ok = med <= TARGET_S and peak_gb <= TARGET_GB and not (mask & intracranial).any()
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
