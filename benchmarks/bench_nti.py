"""Waterfall benchmark of null-text inversion + edit: each technique added in turn, quality next to speed.

    python -m nti.benchmarks.bench_nti --model sd14-shaped --device cuda          # the protocol (DESIGN.md section 6)
    python -m nti.benchmarks.bench_nti --quick --overwrite                        # CPU smoke run on the tiny model

Rows: reference fp32 b1 -> fast fp32 b1 -> bf16 b1 (autocast numerics through the half-weight UNet copy) -> bf16
at each batch size -> + compile -> + CUDA graphs -> + fused DDIM step, then the reference and that last row with
early stop on, and DDIM inversion + edit rows. The eager reference runs in the same process on the same weights and
inputs, so ratios survive noisy machines; every row reports speed and parity (relative L2 of null embeddings, z_T
and the edited latent of image 0) against the reference of its method and early-stop setting. Each row records
what really ran (`ran`: a fused step without Triton runs its torch reference, a failed compile runs eager). An
existing output file is refused unless --overwrite.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

import nti
from nti import NTIConfig
from nti.config import NTIError
from nti.api import null_embedding
from nti.conditioning import unet_inputs
from nti.models import build_sd14_shaped_pipeline, load_pipeline
from nti.provenance import git_commit

from nti.benchmarks.results_file import add_overwrite, refuse_existing, write_text

PHOTOS = [("skimage:chelsea", "a cat lying on a mat", "a tiger lying on a mat"),
          ("skimage:astronaut", "a woman astronaut", "a man astronaut"),
          ("skimage:coffee", "a cup of coffee", "a cup of tea"),
          ("skimage:rocket", "a rocket on a launch pad", "a tower on a launch pad")]


def rel(a, b) -> float | None:
    if a is None or b is None:
        return None
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def unet_flops(pipe) -> tuple[float, float]:
    """FLOPs of one UNet forward and one forward + backward to the text embedding, batch 1."""
    from torch.utils.flop_counter import FlopCounterMode

    z = torch.randn((1, *pipe.latent_shape), device=pipe.device)
    ctx = null_embedding(pipe).clone()
    with FlopCounterMode(display=False) as fwd, torch.no_grad():
        pipe.unet(z, 500, **unet_inputs(pipe.pooled, ctx))
    ctx.requires_grad_(True)
    with FlopCounterMode(display=False) as both:
        pipe.unet(z, 500, **unet_inputs(pipe.pooled, ctx)).sample.square().mean().backward()
    return float(fwd.get_total_flops()), float(both.get_total_flops())


def run_variant(pipe, config: NTIConfig, n_images: int, warmup: bool) -> dict:
    """Invert and edit n images with config; returns timings, results and peak memory."""
    jobs = [PHOTOS[k % len(PHOTOS)] for k in range(n_images)]
    images, sources, targets = zip(*jobs)
    warmup_s = None
    if warmup:  # compile / graph capture / autotune on the same shapes, timed apart from steady state
        start = time.perf_counter()
        invs = nti.invert(pipe, list(images), list(sources), config.replace(steps=2), progress=False)
        nti.edit_latents(pipe, invs, list(targets), config.replace(steps=2), progress=False)
        sync(pipe.device)
        warmup_s = time.perf_counter() - start
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    invs = nti.invert(pipe, list(images), list(sources), config, progress=False)
    sync(pipe.device)
    invert_s = time.perf_counter() - start
    start = time.perf_counter()
    edited = nti.edit_latents(pipe, invs, list(targets), config, progress=False)
    sync(pipe.device)
    edit_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if pipe.device.type == "cuda" else None
    # quality that stays meaningful when trajectories differ (bf16): image 0's reconstruction error, untimed
    recon = nti.edit_latents(pipe, invs[:1], [sources[0]], config, progress=False)[0]
    recon_mse = float(((recon.cpu() - invs[0].z_0) ** 2).mean())
    return {"recon_mse": recon_mse, "invs": invs, "edited": edited, "invert_s": invert_s, "edit_s": edit_s, "warmup_s": warmup_s,
            "peak_gib": peak}


def count_flops(invs, config: NTIConfig, fwd: float, fwd_bwd: float) -> float:
    """UNet FLOPs spent: inversion, cond + move-on passes, inner fwd+bwd iterations, CFG sampling (2 per step)."""
    total = 0.0
    for inv in invs:
        steps = inv.settings["steps"]
        total += steps * fwd + 2 * steps * fwd  # DDIM inversion + editing (uncond and cond)
        if inv.null_embeddings is not None:
            move_on = 2 if config.backend == "reference" else 1  # the fast path reuses the cached cond pass
            total += steps * (1 + move_on) * fwd + sum(inv.iterations) * fwd_bwd
    return total


def waterfall(args) -> list[tuple[str, NTIConfig, int]]:
    """(name, config, images) per row, each adding one technique to the previous row."""
    base = NTIConfig(steps=args.steps, inner_steps=args.inner_steps, guidance=args.guidance, early_stop=False)
    try:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise NTIError(f"--batch-sizes takes positive integers separated by commas, e.g. 4,8,16; got {args.batch_sizes!r}")
    top = max(sizes)
    cuda = args.device_obj.type == "cuda"
    # fused_step off until its own row (its default is on where Triton runs: every CUDA row would have it)
    rows = [("reference fp32 b1", base, 1),
            ("fast fp32 b1", base.replace(backend="fast", batch_size=1, fused_step=False), 1),
            ("+ bf16 autocast b1", base.replace(backend="fast", batch_size=1, precision="bf16", fused_step=False), 1)]
    rows += [(f"+ batch {b}", base.replace(backend="fast", batch_size=b, precision="bf16", fused_step=False), b)
             for b in sizes if b > 1]
    fast = base.replace(backend="fast", batch_size=top, precision="bf16", fused_step=False)
    if not args.no_compile:
        fast = fast.replace(compile=True)
        rows.append((f"+ torch.compile (regional) b{top}", fast, top))
    if cuda:
        fast = fast.replace(cuda_graphs=True, channels_last=True)
        rows.append((f"+ CUDA graphs, channels_last b{top}", fast, top))
    fast = fast.replace(fused_step=True)
    rows.append((f"+ fused DDIM step b{top}", fast, top))
    # early stop changes the iterations and so the embeddings: that row is measured against a reference with it on
    rows.append(("reference fp32 b1, early stop on", base.replace(early_stop=True), 1))
    rows.append((f"  same, early stop on b{top}", fast.replace(early_stop=True), top))
    rows.append(("DDIM invert+edit reference fp32 b1", base.replace(method="ddim"), 1))
    rows.append((f"DDIM invert+edit fast bf16 b{top}", base.replace(method="ddim", backend="fast", batch_size=top,
                                                                    precision="bf16", fused_step=False), top))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="tiny | sd14-shaped (random weights) | a diffusers folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--inner-steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch-sizes", default="4,8,16")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: 5 steps, 3 inner, batches 2,4")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/nti_<model>_<device>.json)")
    add_overwrite(p)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.inner_steps, args.batch_sizes = 5, 3, "2,4"
    try:  # bad settings are refused before anything loads
        args.device_obj = nti.models.parse_device(args.device)
        plan = waterfall(args)
        out = Path(args.out or default_out(args))
        refuse_existing(p, [out], args.overwrite)
        torch.manual_seed(0)
        start = time.perf_counter()
        pipe = (build_sd14_shaped_pipeline(device=args.device_obj) if args.model == "sd14-shaped"
                else load_pipeline(args.model, args.device_obj))
    except NTIError as err:
        p.error(str(err))
    build_s = time.perf_counter() - start
    fwd, fwd_bwd = unet_flops(pipe)
    print(f"model {args.model} on {args.device_obj}: UNet fwd {fwd / 1e9:.1f} GFLOP, fwd+bwd {fwd_bwd / 1e9:.1f} GFLOP "
          f"(b1); built in {build_s:.1f} s", file=sys.stderr)

    rows, reference = [], {}
    for name, config, n in plan:
        try:  # every row warms up, the reference too: its first calls (lazy init, cuDNN plans) are not steady state
            res = run_variant(pipe, config, n, warmup=True)
        except Exception as err:  # one failing technique must not lose the other rows
            rows.append({"variant": name, "error": f"{type(err).__name__}: {err}"})
            print(f"{name:40s} FAILED {type(err).__name__}: {err}", file=sys.stderr)
            continue
        inv0 = res["invs"][0]
        key = (config.method, config.early_stop)
        if config.backend == "reference":
            reference[key] = (inv0, res["edited"][0])
        ref_inv, ref_edit = reference.get(key, (None, None))
        total = res["invert_s"] + res["edit_s"]
        flops = count_flops(res["invs"], config, fwd, fwd_bwd)
        row = {
            "variant": name, "method": config.method, "batch": n, "precision": config.precision,
            "backend": config.backend, "half_weights": config.backend == "fast" and config.precision != "fp32"
            and config.half_weights, "compile": config.compile, "cuda_graphs": config.cuda_graphs,
            "fused_step": fused_step_ran(config, pipe.device), "early_stop": config.early_stop,
            "compile_failed": compile_failed(pipe, config),
            "compared_with": reference_name(config) if ref_inv else None,
            "s_per_image": total / n, "invert_s_per_image": res["invert_s"] / n, "edit_s_per_image": res["edit_s"] / n,
            "latency_s": total if n == 1 else None, "warmup_s": res["warmup_s"], "peak_gib": res["peak_gib"],
            "tflops": flops / total / 1e12, "inner_iterations_per_image": sum(sum(i.iterations) for i in res["invs"]) / n,
            "fp32_retries": sum(len(i.fp32_retries) for i in res["invs"]),
            "recon_latent_mse_img0": res["recon_mse"],
            "parity_embeddings_rel": rel(inv0.null_embeddings, ref_inv.null_embeddings) if ref_inv else None,
            "parity_zT_rel": rel(inv0.z_T, ref_inv.z_T) if ref_inv else None,
            "parity_edit_rel": rel(res["edited"][0], ref_edit) if ref_edit is not None else None,
        }
        row["ran"] = what_ran(row)
        rows.append(row)
        print(format_row(row), file=sys.stderr)

    # against the reference of the same method and early stop: DDIM rows against DDIM's, not against null-text's
    # slower reference; an early-stop row against the reference that stops early too
    ref_s = {(r["method"], r["early_stop"]): r["s_per_image"] for r in rows if r.get("backend") == "reference"}
    for r in rows:
        if (r.get("method"), r.get("early_stop")) in ref_s:
            r["speedup_vs_reference"] = ref_s[r["method"], r["early_stop"]] / r["s_per_image"]
    result = {
        "benchmark": "null-text inversion + edit waterfall", "model": args.model, "device": device_name(args),
        "torch": torch.__version__, "python": platform.python_version(), "commit": git_commit(),
        "settings": {"steps": args.steps, "inner_steps": args.inner_steps, "guidance": args.guidance,
                     "resolution": pipe.resolution, "batch_sizes": args.batch_sizes},
        "unet_gflop": {"fwd_b1": fwd / 1e9, "fwd_bwd_b1": fwd_bwd / 1e9}, "rows": rows,
    }
    write_text(out, json.dumps(result, indent=2))
    print(markdown_table(result))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def fused_step_ran(config: NTIConfig, device: torch.device) -> str:
    """What the fast path's DDIM step really runs under config: 'triton', 'torch fallback (why)' or 'off'."""
    if config.backend != "fast":
        return "off"
    from nti.fast import fused_ops

    with warnings.catch_warnings():  # the run itself warns; here only the answer is wanted
        warnings.simplefilter("ignore")
        ops = fused_ops(config, device)
    if ops is None:
        return "off" if not config.fused_step else "torch fallback (fused ops unavailable)"
    why_not = ops.why_not_triton(torch.empty(0, device=device))
    return "triton" if why_not is None else f"torch fallback ({why_not})"


def compile_failed(pipe, config: NTIConfig) -> str | None:
    """Why a row asked to compile ran eager (a compile failure, or a compiled UNet unlike eager), else None."""
    if not (config.compile and config.backend == "fast"):
        return None
    from nti.runner import prepared_unet
    return prepared_unet(pipe, config).compile_failed


def reference_name(config: NTIConfig) -> str:
    """The reference row a row's speedup and parity are measured against."""
    if config.method == "ddim":
        return "DDIM invert+edit reference fp32 b1"
    return "reference fp32 b1" + (", early stop on" if config.early_stop else "")


def what_ran(row: dict) -> str:
    """The row's label in terms of what ran: precision and weights, compile, graphs, fused step, early stop."""
    parts = [row["backend"], row["precision"] + (" half-weight UNet copy" if row["half_weights"] else "")]
    if row["compile"]:
        parts.append(f"eager (compile failed: {row['compile_failed'][:60]})" if row["compile_failed"] else "compile")
    if row["cuda_graphs"]:
        parts.append("CUDA graphs")
    if row["fused_step"] != "off":
        parts.append("fused step: " + row["fused_step"])
    parts.append("early stop " + ("on" if row["early_stop"] else "off"))
    return ", ".join(parts)


def default_out(args) -> Path:
    """benchmarks/results/nti_<model>_<device>[_quick].json: a smoke run never replaces a full run's file, and a
    model folder is named by its last part."""
    name = f"nti_{Path(args.model).name}_{args.device_obj.type}{'_quick' if args.quick else ''}.json"
    return Path(__file__).parent / "results" / name


def device_name(args) -> str:
    if args.device_obj.type == "cuda":
        return torch.cuda.get_device_name(args.device_obj)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_row(r: dict) -> str:
    def f(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"
    return (f"{r['variant']:40s} [{r['ran']}] {f(r['s_per_image'], '8.3f')} s/img  {f(r['speedup_vs_reference'] if 'speedup_vs_reference' in r else None, '6.1f')}x  "
            f"{f(r['tflops'], '7.3f')} TFLOP/s  emb rel {f(r['parity_embeddings_rel'], '.1e')}  "
            f"edit rel {f(r['parity_edit_rel'], '.1e')}")


def markdown_table(result: dict) -> str:
    lines = [f"{result['benchmark']} — {result['model']} on {result['device']}, torch {result['torch']}, "
             f"{result['settings']['steps']} steps, {result['settings']['inner_steps']} inner, "
             f"w={result['settings']['guidance']}", "",
             "| variant | what ran | s/image | speedup | latency b1 (s) | warm-up (s) | TFLOP/s | peak GiB | recon MSE "
             "| emb rel | z_T rel | edit rel |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, spec=".3g"):
        return format(v, spec) if isinstance(v, (int, float)) and v is not None else "-"
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:60]} |||||||||||")
            continue
        lines.append(f"| {r['variant']} | {r['ran']} | {f(r['s_per_image'])} | {f(r.get('speedup_vs_reference'), '.1f')}x | "
                     f"{f(r['latency_s'])} | {f(r['warmup_s'])} | {f(r['tflops'])} | {f(r['peak_gib'])} | "
                     f"{f(r['recon_latent_mse_img0'])} | "
                     f"{f(r['parity_embeddings_rel'], '.1e')} | {f(r['parity_zT_rel'], '.1e')} | "
                     f"{f(r['parity_edit_rel'], '.1e')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
