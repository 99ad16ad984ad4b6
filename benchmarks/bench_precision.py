"""Half precision against fp32 on the trained shapes model: null-text reconstruction PSNR per scene, per precision.

    python -m nti.benchmarks.bench_precision --variants "bf16 half weights (autocast),bf16 half norms (no autocast)" \
        --overwrite                                          # remakes benchmarks/results/precision_shapes_cpu.json
    python -m nti.benchmarks.bench_precision --scenes 6 --out precision6.json    # a quick look at every row

24 scenes by default; JSON under benchmarks/results/, rewritten after each row (an existing file is refused unless
--overwrite). On a 2-core CPU fp32 and each bf16 row take 2-4 min, but fp16 is slow on CPUs (no fast fp16
convolution): its autocast row took 15 min (precision_shapes_cpu_earlier_run.json), and its half-norms row 22 min
alone at one thread (precision_shapes_cpu_fp16_half_norms.json), hence the first command.

Each row inverts the same rendered scenes with the fast path (batch 8, w=7.5, 50 steps, early stop as the
notebook) and reconstructs them; the figure is each scene's PSNR minus the fp32 fast path's (which equals the
reference's to 0.01 dB, tests/test_testbed.py). Null-text inversion amplifies rounding (a 1e-7 perturbation of its
input moves the reference's own embeddings by 5.4e-5), so single scenes scatter by tenths of a dB either way: read
the mean (a systematic loss) apart from the mean absolute difference (the scatter). CPU bf16 kernels round
differently from CUDA's, so these rows say how much each precision costs on this model, not a GPU's exact figures.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch

from nti import api
from nti.config import NTIConfig, NTIError
from nti.metrics import psnr
from nti.models import load_pipeline
from nti.provenance import git_commit
from nti.testbed import scenes

from nti.benchmarks.results_file import add_overwrite, refuse_existing, write_text

VARIANTS = {  # name -> NTIConfig changes on the fp32 fast path
    "fp32": {},
    "bf16 half weights (autocast)": {"precision": "bf16"},
    "bf16 half norms (no autocast)": {"precision": "bf16", "half_norms": True},
    "fp16 half weights (autocast)": {"precision": "fp16"},
    "fp16 half norms (no autocast)": {"precision": "fp16", "half_norms": True},
}


def reconstruction_psnr(pipe, images, captions, config) -> list[float]:
    inversions = api.invert(pipe, images, captions, config, progress=False)
    return [psnr(a, b) for a, b in zip(images, api.reconstruct(pipe, inversions, config, progress=False))]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenes", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (the notebook's 50; fewer only to try it)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated rows to run (fp32, the baseline, always runs first)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/precision_shapes_<device>.json)")
    add_overwrite(p)
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results"
                                           / f"precision_shapes_{args.device}.json")
    refuse_existing(p, [out], args.overwrite)
    wanted = ["fp32"] + [v for v in args.variants.split(",") if v != "fp32"]
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.scenes < 1:
        p.error(f"--scenes must be at least 1; got {args.scenes}")
    try:  # bad settings are refused before anything runs
        base = NTIConfig(backend="fast", batch_size=args.batch, steps=args.steps)
        pipe = load_pipeline("shapes", args.device)
    except NTIError as err:
        p.error(str(err))
    rng = random.Random(args.seed + 100)  # bench_testbed's scenes
    scene_list = [scenes.random_scene(rng) for _ in range(args.scenes)]
    images, captions = [scenes.render(s) for s in scene_list], [s.caption for s in scene_list]
    result = {"benchmark": "null-text reconstruction PSNR by precision, shapes model", "model": pipe.name,
              "device": args.device, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "scenes": args.scenes, "steps": args.steps, "commit": git_commit(),
              "command": "python -m nti.benchmarks.bench_precision" + "".join(
                  f" --{name} '{getattr(args, name)}'" for name in ("scenes", "seed", "batch", "steps", "variants", "device")
                  if getattr(args, name) != p.get_default(name)) + (" --overwrite" if args.overwrite else ""),
              "rows": []}
    fp32 = None
    for name in wanted:
        changes = VARIANTS[name]
        start = time.perf_counter()
        values = np.array(reconstruction_psnr(pipe, images, captions, base.replace(**changes)))
        row = {"variant": name, **changes, "psnr": values.round(3).tolist(), "mean_psnr": float(values.mean()),
               "seconds": time.perf_counter() - start}
        if fp32 is None:
            fp32 = values
        else:
            delta = values - fp32
            row.update(mean_delta_db=float(delta.mean()), mean_abs_delta_db=float(np.abs(delta).mean()),
                       max_abs_delta_db=float(np.abs(delta).max()),
                       within_0p3_db=int((np.abs(delta) < 0.3).sum()))
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        write_text(out, json.dumps(result, indent=1) + "\n")  # after each row: a stopped run keeps what it measured
    return result


if __name__ == "__main__":
    main()
