"""The same sweep run sequentially and on a local Ray cluster, in one run: wall times, their ratio,
and whether the two gave the same plans and the same model files.

    python tools/bench_sweep_cluster.py --workers 2 --out /tmp/bsc -- [sweep options]

The cluster is a head without CPUs and WORKERS nodes of one CPU each, all on this machine
(ray.cluster_utils.Cluster, as Ray's own tests make one). Each sweep is the `mosaic-export sweep`
command in its own process, the Ray one with `--ray ADDRESS --ray-cpus 1`; pass `--threads 1`
among the sweep options for the same arithmetic in both (and so the same files). The runs go
first sequential, then on the cluster; on a shared machine, repeat to see the noise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

VARYING = {"report.json", "report.md", "README.md", "manifest.json", "cost.png"}  # timings inside


def files(out: Path) -> dict[str, str]:
    """sha256 of each run's files but those that carry measured timings."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.glob("*/**/*")) if p.is_file() and p.name not in VARYING}


def plans(out: Path) -> dict[str, dict]:
    plans = {}
    for p in sorted(out.glob("*/plan.json")):
        plan = json.loads(p.read_text())
        plan["model"].pop("source", None)
        plans[p.parent.name] = plan
    return plans


def sweep(options: list[str], out: Path, extra: list[str]) -> float:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "mosaic_export", "sweep", *options, *extra, "--out", str(out)]
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="worker nodes, one CPU each (default: 2)")
    p.add_argument("--out", type=Path, required=True, help="folder for the two sweeps")
    p.add_argument("options", nargs=argparse.REMAINDER, help="-- then the sweep's options")
    args = p.parse_args(argv)
    options = [o for o in args.options if o != "--"]
    from ray.cluster_utils import Cluster

    args.out.mkdir(parents=True, exist_ok=False)
    sequential = sweep(options, args.out / "sequential", [])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(args.workers):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        on_ray = sweep(options, args.out / "ray", ["--ray", cluster.address, "--ray-cpus", "1"])
    finally:
        cluster.shutdown()
    a, b = args.out / "sequential", args.out / "ray"
    result = {"sequential_s": round(sequential, 1), "ray_s": round(on_ray, 1),
              "speed_up": round(sequential / on_ray, 3), "workers": args.workers,
              "same_plans": plans(a) == plans(b), "same_files": files(a) == files(b),
              "files_compared": len(files(a))}
    print(json.dumps(result, indent=1))
    (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
