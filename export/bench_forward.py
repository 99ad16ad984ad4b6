"""Latency of one forward UNet call per backend and batch size, with its error against eager fp32; writes JSON.

    python -m nti.export.bench_forward --model /path/to/sd-v1-4 --device cuda --precision fp16 --out fwd.json

Rows: backend x batch -> setup (build/compile/load) seconds apart from steady state, mean/median ms per call
(CUDA events on GPU, perf_counter on CPU, after warm-up), images/s, peak memory, and the relative L2 error of the
output against the eager fp32 UNet on the same inputs. A backend that cannot run here gets a row saying why. An
existing --out is refused unless --overwrite.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from nti.config import NTIError

BACKENDS = ("eager", "compile", "onnx", "aoti", "tensorrt")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except Exception:
        return None


def _eager(pipe, precision):
    def run(z, t, c):
        if precision == "fp32":
            return pipe.unet(z, t, encoder_hidden_states=c).sample
        with torch.autocast(pipe.device.type, dtype=AUTOCAST[precision]):
            return pipe.unet(z, t, encoder_hidden_states=c).sample
    return run


def make_forward(pipe, backend: str, precision: str, cache_dir=None):
    """(callable (z, t, ctx) -> eps, setup seconds, note) for one backend."""
    start = time.perf_counter()
    if backend == "eager":
        return _eager(pipe, precision), 0.0, "autocast" if precision != "fp32" else ""
    if backend == "compile":
        compiled = torch.compile(pipe.unet, dynamic=False)  # first call per batch size pays the compile: a warm-up

        def run(z, t, c):
            if precision == "fp32":
                return compiled(z, t, encoder_hidden_states=c).sample
            with torch.autocast(pipe.device.type, dtype=AUTOCAST[precision]):
                return compiled(z, t, encoder_hidden_states=c).sample
        return run, 0.0, "torch.compile default mode, compile time in first_call_s"
    from nti.export import load_forward_backend

    fn = load_forward_backend(pipe, backend, precision, cache_dir)
    return fn, time.perf_counter() - start, f"{'built' if fn.built.built else 'cached'} {fn.built.path}"


def _time_calls(fn, args, iters: int, cuda: bool) -> list[float]:
    times = []
    for _ in range(iters):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - start) * 1e3)
    return times


def _measure(fn, z, c, t, truth, warmup, iters, cuda) -> dict:
    b, row = z.shape[0], {}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn(z, t, c)
    if cuda:
        torch.cuda.synchronize()
    row["first_call_s"] = round(time.perf_counter() - start, 4)  # compile / lazy init / autotune land here
    for _ in range(max(warmup - 1, 0)):
        fn(z, t, c)
    ms = _time_calls(fn, (z, t, c), iters, cuda)
    row.update(mean_ms=round(statistics.fmean(ms), 3), median_ms=round(statistics.median(ms), 3),
               images_per_s=round(b * 1e3 / statistics.median(ms), 2),
               rel_err_vs_eager_fp32=float((out.float() - truth).norm() / truth.norm()))
    if cuda:
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
    return row


@torch.no_grad()
def bench_forward(pipe, backends=BACKENDS, batches=(1, 2, 8), precision: str = "fp32", warmup: int = 3,
                  iters: int = 10, cache_dir=None, t: int = 501) -> dict:
    """Benchmark every backend at every batch size; a dict ready for JSON."""
    cuda = pipe.device.type == "cuda"
    d = int(pipe.unet.config.cross_attention_dim)
    seq = int(pipe.tokenizer.model_max_length)
    gen = torch.Generator().manual_seed(0)
    inputs = {b: (torch.randn((b, *pipe.latent_shape), generator=gen).to(pipe.device),
                  torch.randn((b, seq, d), generator=gen).to(pipe.device)) for b in batches}
    truth = {b: _eager(pipe, "fp32")(z, t, c).float() for b, (z, c) in inputs.items()}
    rows = []
    for backend in backends:
        try:
            fn, setup_s, note = make_forward(pipe, backend, precision, cache_dir)
        except (NTIError, RuntimeError) as err:
            rows.append({"backend": backend, "precision": precision, "skipped": str(err)})
            continue
        for b, (z, c) in inputs.items():
            row = {"backend": backend, "precision": precision, "batch": b, "setup_s": round(setup_s, 3),
                   "note": note}
            try:
                row.update(_measure(fn, z, c, t, truth[b], warmup, iters, cuda))
            except Exception as err:  # e.g. a compile failure at the first call: the row says so, others go on
                row["error"] = f"{type(err).__name__}: {str(err)[:500]}"
            rows.append(row)
    device = torch.cuda.get_device_name(pipe.device) if cuda else platform.processor() or platform.machine()
    return {"what": "one UNet forward call (no grad)", "model": pipe.name, "fingerprint": pipe.fingerprint,
            "device": str(pipe.device), "device_name": device, "torch": torch.__version__, "commit": _commit(),
            "threads": torch.get_num_threads(), "warmup": warmup, "iters": iters, "rows": rows}


def main(argv=None) -> int:
    from nti.benchmarks.results_file import add_overwrite, refuse_existing, write_text
    from nti.models import load_pipeline, parse_device

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="local SD folder, 'shapes' or 'tiny' (default: the built-in shapes model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {', '.join(BACKENDS)}")
    p.add_argument("--batches", default="1,2,8")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--export-cache", default=None)
    p.add_argument("--out", default=None, help="JSON file (default: stdout)")
    add_overwrite(p)
    args = p.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        p.error(f"--batches takes positive integers separated by commas, e.g. 1,2,8; got {args.batches!r}")
    backends = [b for b in args.backends.split(",") if b]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:  # a misspelt backend would otherwise be a row saying it was skipped
        p.error(f"--backends takes a comma list of {', '.join(BACKENDS)}; got {args.backends!r}")
    if args.iters < 1 or args.warmup < 0:
        p.error(f"--iters must be at least 1 and --warmup at least 0; got {args.iters} and {args.warmup}")
    if args.out:
        refuse_existing(p, [args.out], args.overwrite)
    try:
        pipe = load_pipeline(args.model, parse_device(args.device))
    except NTIError as err:
        print(f"bench_forward: error: {err}", file=sys.stderr)
        return 2
    result = bench_forward(pipe, backends, batches, args.precision, args.warmup, args.iters, args.export_cache)
    text = json.dumps(result, indent=2)
    if args.out:
        write_text(args.out, text + "\n")
        for row in result["rows"]:
            print({k: v for k, v in row.items() if k != "note"}, file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
