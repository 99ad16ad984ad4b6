"""Load test of `nti serve`: N concurrent OpenAI-route edits over loopback against `nti edit` on the same images.

Starts the real server (uvicorn, a subprocess on a free loopback port), fires N edits at once from N threads with the
official request shape (multipart image + prompt + source_prompt), and records per-request latency, the batch sizes
the worker formed (from /metrics and each response's timings), and throughput. Then runs `nti edit` on the same
images and prompts at the same batch size (fast backend) and compares throughput: both invert every image and edit
it once. Stops by itself; loopback only. Writes benchmarks/results/serve_load_cpu.json (an existing file is
refused unless --overwrite).

    OMP_NUM_THREADS=1 python -m nti.benchmarks.bench_serve --n 48 --batch-size 8 --steps 5 --inner-steps 2 \
        --repeats 3 --overwrite
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`nti serve` in a subprocess on a free loopback port; start() waits until /readyz says ready."""

    def __init__(self, data: str | os.PathLike, *args: str, token: str | None = None, log: str | None = None):
        self.data, self.args, self.token = str(data), list(args), token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log or str(Path(self.data).parent / f"serve-{self.port}.log")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> "ServerProcess":
        import httpx

        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "nti.cli", "serve", "--port", str(self.port), "--data", self.data,
               *self.args] + (["--token", self.token] if self.token else [])
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nti serve exited with {self.proc.returncode}; log: {self.log()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"nti serve was not ready in {timeout} s; log: {self.log()[-2000:]}")

    def restart(self, timeout: float = 120.0) -> "ServerProcess":
        """Start again on the same port and data folder (after kill() or stop())."""
        return self.start(timeout)

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        self.proc.kill()
        self.proc.wait()
        self.log_file.close()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful: drains), then SIGKILL if it hangs. uvicorn re-raises the signal once it has shut down,
        so a clean stop exits -SIGTERM; 0 is returned for that."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()
        clean = self.proc.returncode == -15 and "Application shutdown complete" in self.log()
        return 0 if clean else self.proc.returncode


def scene_jobs(n: int, seed: int = 0) -> list[dict]:
    """n distinct shapes-model scenes (PNG bytes) with their caption and a colour edit of the first object."""
    from nti.testbed.scenes import COLOURS, random_scene, render, replace_object

    rng = random.Random(seed)
    jobs, seen = [], set()
    while len(jobs) < n:
        scene = random_scene(rng)
        if scene.caption in seen and len(seen) < 200:  # distinct images; captions may repeat once exhausted
            continue
        seen.add(scene.caption)
        colour = rng.choice([c for c in COLOURS if c != scene.objects[0].colour])
        target = replace_object(scene, 0, colour=colour)
        out = io.BytesIO()
        render(scene).save(out, format="PNG")
        jobs.append({"name": f"scene{len(jobs):03d}", "png": out.getvalue(), "source_prompt": scene.caption,
                     "target_prompt": target.caption})
    return jobs


def post_edit(url: str, job: dict, headers: dict, timeout: float = 600) -> dict:
    import httpx

    start = time.perf_counter()
    r = httpx.post(url + "/v1/images/edits", headers=headers, timeout=timeout,
                   files={"image": (f"{job['name']}.png", job["png"], "image/png")},
                   data={"prompt": job["target_prompt"], "source_prompt": job["source_prompt"]})
    latency = time.perf_counter() - start
    body = r.json()
    if r.status_code != 200:
        raise RuntimeError(f"{job['name']}: {r.status_code} {body}")
    return {"latency_s": latency, "png": base64.b64decode(body["data"][0]["b64_json"]), "nti": body["nti"]}


def metric_values(text: str, name: str) -> dict[str, float]:
    """Prometheus text -> {labels: value} for one metric name."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{name}(\{{[^}}]*\}})? ([0-9.eE+-]+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def batch_histogram(metrics_text: str, kind: str) -> dict:
    """Batches by size from the nti_batch_size histogram's cumulative buckets."""
    buckets = metric_values(metrics_text, "nti_batch_size_bucket")
    cumulative = sorted((float(re.search(r'le="([^"]+)"', k).group(1)), v) for k, v in buckets.items()
                        if f'kind="{kind}"' in k)
    hist, previous = {}, 0.0
    for le, count in cumulative:
        if count > previous and le != float("inf"):
            hist[str(int(le))] = int(count - previous)
        previous = count
    return hist


def load_test(server: ServerProcess, jobs: list[dict]) -> dict:
    """All jobs at once, one thread each; returns latencies, throughput and the batches the server formed."""
    import httpx

    results: list = [None] * len(jobs)
    errors: list = []
    barrier = threading.Barrier(len(jobs))

    def worker(k: int) -> None:
        barrier.wait()
        try:
            results[k] = post_edit(server.url, jobs[k], server.headers())
        except Exception as err:  # reported, not raised inside a thread
            errors.append(repr(err))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(jobs))]
    cpu_start = process_cpu_s(server.proc.pid)
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    cpu = process_cpu_s(server.proc.pid) - cpu_start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[:3]}")
    metrics = httpx.get(server.url + "/metrics", headers=server.headers()).text
    latencies = sorted(r["latency_s"] for r in results)
    edit_batches = Counter(r["nti"]["timings"]["batch_size"] for r in results)
    busy = sum(metric_values(metrics, "nti_batch_seconds_sum").values())
    return {"requests": len(jobs), "wall_s": wall, "throughput_img_per_s": len(jobs) / wall,
            "cpu_s": cpu, "worker_busy_s": busy,
            "batches_run": int(sum(metric_values(metrics, "nti_batch_seconds_count").values())),
            "latency_p50_s": statistics.median(latencies),
            "latency_p99_s": latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))],
            "latency_max_s": latencies[-1],
            "batches_invert": batch_histogram(metrics, "invert"), "batches_edit": batch_histogram(metrics, "edit"),
            "edits_by_batch_size": {str(k): v for k, v in sorted(edit_batches.items())},
            "images": [r["png"] for r in results]}


def nti_edit(jobs: list[dict], folder: Path, batch_size: int, steps: int, inner_steps: int) -> dict:
    """`nti edit` on the same images and prompts (fast backend, same batch size); its own 'done in' time excludes
    the model load, like the server's steady state."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "jobs.jsonl", "w") as fh:
        for job in jobs:
            (folder / f"{job['name']}.png").write_bytes(job["png"])
            fh.write(json.dumps({"id": job["name"], "image": f"{job['name']}.png",
                                 "source_prompt": job["source_prompt"], "target_prompt": job["target_prompt"]}) + "\n")
    argv = ["edit", str(folder / "jobs.jsonl"), "--out", str(folder / "out"), "--backend", "fast", "--batch-size",
            str(batch_size), "--steps", str(steps), "--inner-steps", str(inner_steps), "--device", "cpu"]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CLI_TIMER, *argv], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    process_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"nti edit failed: {proc.stderr[-2000:]}")
    done = float(re.search(r"done in ([0-9.]+) s", proc.stderr).group(1))
    window = json.loads(proc.stderr.strip().splitlines()[-1])
    return {"command": " ".join(["nti", *argv]), "done_in_s": done, "process_s": process_s,
            "cpu_s": window["cpu_s"], "throughput_img_per_s": len(jobs) / done,
            "images": {j["name"]: (folder / "out" / f"{j['name']}.png").read_bytes() for j in jobs}}


# `nti edit` itself (nti.cli.main), with the process's CPU seconds counted from the end of the model load (where
# its own 'done in' clock starts) to the end: the machine is shared, so CPU time is the steadier cost measure
CLI_TIMER = """
import json, sys, time
import nti.cli, nti.models
load, mark = nti.models.load_pipeline, {}
def timed_load(*args, **kwargs):
    pipe = load(*args, **kwargs)
    mark["cpu"] = time.process_time()
    return pipe
nti.models.load_pipeline = timed_load
code = nti.cli.main(sys.argv[1:])
print(json.dumps({"cpu_s": time.process_time() - mark["cpu"]}), file=sys.stderr)
sys.exit(code)
"""


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-delay-ms", type=float, default=1000, help="a burst of uploads takes about a second to "
                        "be accepted on a busy 2-core CPU, and a partial batch costs nearly a full one there")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--inner-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="server and CLI runs, interleaved: on a shared machine "
                        "the load of others drifts, so each side is timed more than once and the best run counts")
    parser.add_argument("--out", default=str(RESULTS / "serve_load_cpu.json"))
    from nti.benchmarks.results_file import add_overwrite, refuse_existing, write_text

    add_overwrite(parser)
    args = parser.parse_args(argv)
    from nti.config import NTIConfig, NTIError

    if args.n < 1 or args.repeats < 1 or not args.max_delay_ms >= 0:
        parser.error(f"--n and --repeats must be at least 1 and --max-delay-ms at least 0; got {args.n}, "
                     f"{args.repeats} and {args.max_delay_ms}")
    try:  # refused here, not by the server after it has started
        NTIConfig(steps=args.steps, inner_steps=args.inner_steps, batch_size=args.batch_size)
    except NTIError as err:
        parser.error(str(err))
    refuse_existing(parser, [args.out], args.overwrite)
    import torch

    jobs = scene_jobs(args.n)
    servers, clis, same = [], [], [True] * len(jobs)  # same: identical to nti edit's PNG in every repeat
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            cli = nti_edit(jobs, Path(tmp) / f"cli{r}", args.batch_size, args.steps, args.inner_steps)
            # a fresh data folder each run: a stored inversion would be reused and the server would skip its work
            server = ServerProcess(Path(tmp) / f"data{r}", "--batch-size", str(args.batch_size), "--max-delay-ms",
                                   str(args.max_delay_ms), "--steps", str(args.steps), "--inner-steps",
                                   str(args.inner_steps), "--device", "cpu", "--max-queue", str(4 * args.n + 8))
            server.start()
            try:
                load = load_test(server, jobs)
            finally:
                server.stop()
            identical = [a == cli["images"][j["name"]] for a, j in zip(load.pop("images"), jobs)]
            same = [s and i for s, i in zip(same, identical)]
            load["identical_pngs_vs_cli"] = sum(identical)
            cli.pop("images")
            servers.append(load)
            clis.append(cli)
            print(f"run {r}: server {load['wall_s']:.1f} s ({load['cpu_s']:.1f} CPU s), "
                  f"nti edit {cli['done_in_s']:.1f} s ({cli['cpu_s']:.1f} CPU s)", file=sys.stderr)
    best_server = max(servers, key=lambda s: s["throughput_img_per_s"])
    best_cli = max(clis, key=lambda c: c["throughput_img_per_s"])
    report = {
        "what": f"{args.n} concurrent OpenAI-route edits (invert + edit each, distinct images) over loopback vs "
                f"`nti edit` on the same images at the same batch size (fast backend, fp32, CPU); runs interleaved, "
                f"the best of each side compared",
        "settings": vars(args),
        "throughput_ratio_server_over_cli": best_server["throughput_img_per_s"] / best_cli["throughput_img_per_s"],
        "throughput_ratio_per_run": [s["throughput_img_per_s"] / c["throughput_img_per_s"]
                                     for s, c in zip(servers, clis)],
        "cpu_ratio_note": "images per CPU-second, server over nti edit: the server process's CPU over the load window "
                          "(all threads: HTTP, decoding, the worker) vs nti edit's after its model load; unlike wall "
                          "time it hardly moves with the load others put on the shared machine",
        "cpu_throughput_ratio_server_over_cli": min(c["cpu_s"] for c in clis) / min(s["cpu_s"] for s in servers),
        "cpu_throughput_ratio_per_run": [c["cpu_s"] / s["cpu_s"] for s, c in zip(servers, clis)],
        "identical_pngs_server_vs_cli": f"{sum(same)}/{args.n}",  # images identical in every repeat
        "server": best_server, "nti_edit": best_cli, "server_runs": servers, "nti_edit_runs": clis,
        "machine": {"cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "load_average": os.getloadavg(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=Path(__file__).parent).stdout.strip(),
    }
    write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("throughput_ratio_server_over_cli", "throughput_ratio_per_run",
                                              "cpu_throughput_ratio_server_over_cli", "cpu_throughput_ratio_per_run",
                                              "identical_pngs_server_vs_cli")}
                     | {"p50": best_server["latency_p50_s"], "p99": best_server["latency_p99_s"],
                        "batches_invert": best_server["batches_invert"],
                        "batches_edit": best_server["batches_edit"]}, indent=1))
    return report


if __name__ == "__main__":
    main()
