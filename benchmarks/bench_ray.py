"""1 vs 2 Ray workers on CPU (issue 20): the bundled scenes edited by `nti edit --ray`, against the single-process run.

    OMP_NUM_THREADS=1 python -m nti.benchmarks.bench_ray --out benchmarks/results/ray_workers_cpu.json --overwrite

One local Ray cluster (--cpus logical CPUs) serves every run; each run has its own output folder and an empty cache,
so every run inverts everything. Reported per run: wall time (driver's view, from the first record to the last file
written; the cluster's start is apart), time per edited image, engine load per actor, compute per image inside the
actors, and whether the files equal the single-process run's. An existing --out is refused unless --overwrite.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENES = ROOT / "engine" / "assets" / "scenes"


def scene_jobs(folder: Path, n_images: int) -> Path:
    records = [json.loads(line) for line in (SCENES / "prompts.jsonl").read_text().splitlines() if line.strip()]
    records = [{**r, "image": str(SCENES / r["image"])} for r in records if int(r["id"][5]) < n_images]
    path = folder / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def commit() -> str:
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return head + ("-dirty" if dirty.stdout.strip() else "")


def load_average() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/ray_workers_cpu.json")
    parser.add_argument("--images", type=int, default=6, help="bundled scenes (2 edits each)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--inner-steps", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local Ray cluster")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    from nti.benchmarks.results_file import add_overwrite, refuse_existing, write_text

    add_overwrite(parser)
    opts = parser.parse_args(argv)
    from nti.config import NTIConfig, NTIError

    n_scenes = len({json.loads(line)["image"] for line in (SCENES / "prompts.jsonl").read_text().splitlines()
                    if line.strip()})
    if not 1 <= opts.images <= n_scenes:
        parser.error(f"--images must be 1 to {n_scenes} (the bundled scenes); got {opts.images}")
    if opts.cpus < 1 or min(opts.workers) < 1:
        parser.error(f"--cpus and --workers must be at least 1; got {opts.cpus} and {opts.workers}")
    try:
        NTIConfig(steps=opts.steps, inner_steps=opts.inner_steps)
    except NTIError as err:
        parser.error(str(err))
    refuse_existing(parser, [opts.out], opts.overwrite)  # before the cluster starts

    import ray
    import torch

    from nti.cli import build_parser, main as nti
    from nti.distributed import run_batch

    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    jobs = scene_jobs(work, opts.images)
    common = ["--steps", str(opts.steps), "--inner-steps", str(opts.inner_steps), "--quiet", "--device", "cpu"]
    n_edits = len(jobs.read_text().splitlines())
    result = {"what": "nti edit of the bundled shapes scenes, single process vs --ray with 1 and 2 engine actors",
              "images": opts.images, "edits": n_edits, "steps": opts.steps, "inner_steps": opts.inner_steps,
              "backend": "reference (CPU default: fp32, one image at a time)", "cluster_cpus": opts.cpus,
              "machine_cores": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
              "python": platform.python_version(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "commit": commit(), "runs": []}

    # the single-process baseline, one torch thread like each actor on a 2-CPU cluster
    torch.set_num_threads(1)
    load_avg = load_average()
    start = time.perf_counter()
    from nti.models import load_pipeline
    load_pipeline(None, "cpu")
    single_load_s = time.perf_counter() - start
    start = time.perf_counter()
    assert nti(["edit", str(jobs), "--out", str(work / "single"), *common]) == 0
    wall = time.perf_counter() - start
    result["runs"].append({"mode": "single process", "workers": 1, "wall_s": round(wall, 2),
                           "s_per_image": round(wall / n_edits, 3), "model_load_s": [round(single_load_s, 2)],
                           "load_average_before": load_avg})
    single = {p.name: p.read_bytes() for p in (work / "single").iterdir()}

    # Ray starts its workers at nice 15; on a shared machine the actors would then measure the other users' load,
    # not the scale-out, against a baseline running at nice 0
    os.environ.setdefault("RAY_worker_niceness", "0")
    result["ray_worker_niceness"] = os.environ["RAY_worker_niceness"]
    start = time.perf_counter()
    ray.init(num_cpus=opts.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    result["ray_init_s"] = round(time.perf_counter() - start, 2)
    try:
        for workers in opts.workers:
            out = work / f"ray{workers}"
            args = build_parser().parse_args(["edit", str(jobs), "--out", str(out), "--cache",
                                              str(work / f"cache{workers}"), *common, "--ray",
                                              "--num-workers", str(workers)])
            load_avg = load_average()
            start = time.perf_counter()
            report = run_batch(args)
            wall = time.perf_counter() - start
            same = {p.name: p.read_bytes() for p in out.iterdir()} == single
            result["runs"].append({
                "mode": "ray", "workers": workers, "wall_s": round(wall, 2), "s_per_image": round(wall / n_edits, 3),
                "model_load_s": sorted(round(s, 2) for s in report.actor_load_s.values()),
                "actor_compute_s_per_image": round(sum(report.batch_s) / max(1, len(report.batch_s)), 3),
                "outputs": len(report.written), "failed": len(report.failed),
                "files_equal_single_process": same, "load_average_before": load_avg})
            print(json.dumps(result["runs"][-1]), file=sys.stderr)
    finally:
        ray.shutdown()
    base = {r["workers"]: r["wall_s"] for r in result["runs"] if r["mode"] == "ray"}
    if 1 in base and 2 in base:
        result["speedup_2_vs_1_workers"] = round(base[1] / base[2], 2)
    result["load_average_after"] = load_average()
    write_text(opts.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
