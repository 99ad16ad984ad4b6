"""Fidelity of the built-in shapes model, graded from pixels by the scene oracle (engine/testbed/scenes.py).

    python -m nti.benchmarks.bench_testbed --overwrite    # remakes benchmarks/results/testbed_shapes_cpu.json + .png
    python -m nti.benchmarks.bench_testbed --quick        # a smaller sample, same sections (testbed_shapes_cpu_quick)

Other --steps, --seed or --batch get a file name of their own (testbed_shapes_cpu_steps10.json); an existing JSON or
PNG is refused unless --overwrite.

1. Text-to-image (DDIM 50 steps, w=7.5) on held-out captions (never shown in training) and on training captions:
   the share whose rendering the oracle reads back as the caption.
2. Reconstruction of rendered scenes: PSNR of DDIM inversion and of null-text inversion at w=7.5, and of DDIM at
   w=1 (where the null text has no effect, so NTI is DDIM), next to the VAE's own ceiling.
3. Edits, per scene: a colour swap and a shape swap of an object, a background swap, and an object added (to a
   one-object scene) or removed (from a two-object scene), from NTI (constant and cosine-decayed guidance), direct
   and DDIM inversions (EDIT_ROWS). Graded: the share the oracle reads as the target caption, and SSIM / PSNR
   outside what the edit may change (`scenes.edit_mask`: the edited object's source and target masks grown by
   1 px; for removals the removed object; for background swaps and additions, all but the source objects' cores)
   next to the NTI reconstruction's own score there. SSIM's 7x7 window reaches 3 px into the mask, so SSIM is
   also given clear of it (`metrics.clear_of`: mask grown by 3 more px, no window sees a masked pixel).
The picture shows, per scene: source | DDIM and NTI reconstructions | colour, shape and add/remove edit of each
SHEET_ROWS row.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from nti import api
from nti.testbed import scenes
from nti.config import NTIConfig, NTIError
from nti.images import to_pil
from nti.metrics import clear_of, psnr, ssim
from nti.models import decode_latents, encode_images, load_pipeline
from nti.provenance import git_commit
from nti.outputs import atomic_write

from nti.benchmarks.results_file import add_overwrite, refuse_existing, write_text

RESULTS = Path(__file__).parent / "results"

RECONSTRUCTION_ROWS = (  # name, method, guidance, schedule (cosine: decay from w to 1 over the denoising steps)
    ("ddim_w7.5", "ddim", 7.5, "constant"), ("nti_w7.5", "null-text", 7.5, "constant"),
    ("ddim_w7.5_cosine", "ddim", 7.5, "cosine"), ("nti_w7.5_cosine", "null-text", 7.5, "cosine"),
    ("ddim_w1", "ddim", 1.0, "constant"))
# row -> (inversion, edit settings); P2P defaults: cross_replace 0.8, self_replace 0.5. p2p-replace swaps words one
# for one, so its rows edit additions and removals (different word counts) with p2p-refine (`edit_mode`).
EDIT_ROWS = {
    "null-text + p2p-replace": ("nti_w7.5", dict(edit="p2p-replace")),
    "null-text + regenerate": ("nti_w7.5", dict(edit="regenerate")),
    "null-text, cosine w + p2p-replace": ("nti_w7.5_cosine", dict(edit="p2p-replace")),
    "null-text, cosine w + regenerate": ("nti_w7.5_cosine", dict(edit="regenerate")),
    "direct + p2p-replace": ("direct_w7.5", dict(edit="p2p-replace")),
    "ddim + p2p-replace": ("ddim_w7.5", dict(edit="p2p-replace")),
}
EDIT_KINDS = ("colour", "shape", "background", "add", "remove")
SHEET_ROWS = ("null-text + p2p-replace", "null-text, cosine w + p2p-replace", "direct + p2p-replace")


def text_to_image(pipe, n: int, seed: int) -> dict:
    """Oracle agreement of generated images with held-out and with training captions."""
    rng = random.Random(seed)
    held, seen = [], []
    while len(held) < n or len(seen) < n:
        caption = scenes.random_scene(rng).caption
        group = held if scenes.is_held_out(caption) else seen
        if len(group) < n:
            group.append(caption)
    out = {}
    for name, captions in (("held_out", held), ("training", seen)):
        images = api.generate(pipe, captions, NTIConfig(seed=seed), progress=False)
        readings = [scenes.read_scene(image) for image in images]
        hits = [r.matches(c) for r, c in zip(readings, captions)]
        singles = [h for h, c in zip(hits, captions) if " and " not in c]
        pairs = [h for h, c in zip(hits, captions) if " and " in c]
        out[name] = {"n": len(hits), "agreement": float(np.mean(hits)),
                     "agreement_one_object": float(np.mean(singles)) if singles else None,
                     "agreement_two_objects": float(np.mean(pairs)) if pairs else None,
                     "misses": [{"caption": c, "oracle": [r.background, list(r.objects)]}
                                for h, r, c in zip(hits, readings, captions) if not h][:10]}
    return out


def reconstruction(pipe, scene_list, steps: int, batch: int) -> tuple[dict, dict, dict]:
    """PSNR (dB, vs the rendered source) of each RECONSTRUCTION_ROWS row, next to the VAE's own ceiling.

    At w=1 CFG is the conditional prediction alone, so the null text has no effect and NTI is DDIM by construction.
    Returns the summary, the inversions per row (plus a direct inversion for the edits) and the reconstructed
    images per row.
    """
    images = [scenes.render(s) for s in scene_list]
    captions = [s.caption for s in scene_list]
    _, pixels = api.prepare_images(pipe, images)
    vae_only = to_pil(decode_latents(pipe, encode_images(pipe, pixels)))
    rows = {"vae_ceiling": [psnr(a, b) for a, b in zip(images, vae_only)]}
    inversions, recons = {}, {}
    for name, method, w, schedule in RECONSTRUCTION_ROWS:
        config = NTIConfig(method=method, guidance=w, guidance_schedule=schedule, steps=steps, backend="fast",
                           batch_size=batch)
        start = time.perf_counter()
        invs = api.invert(pipe, images, captions, config, progress=False)
        rows[name + "_invert_s_per_image"] = (time.perf_counter() - start) / len(images)
        recon = api.reconstruct(pipe, invs, config, progress=False)
        rows[name] = [psnr(a, b) for a, b in zip(images, recon)]
        recons[name] = recon
        inversions[name] = invs
    summary = {k: (round(float(np.mean(v)), 3) if isinstance(v, list) else round(v, 2)) for k, v in rows.items()}
    summary["min_nti_w7.5"] = round(float(np.min(rows["nti_w7.5"])), 3)
    summary["max_ddim_w7.5"] = round(float(np.max(rows["ddim_w7.5"])), 3)
    summary["nti_beats_ddim_w7.5_on"] = int(sum(a > b for a, b in zip(rows["nti_w7.5"], rows["ddim_w7.5"])))
    summary["n"] = len(images)
    summary["oracle_on_vae_round_trip"] = float(np.mean([scenes.read_scene(im).matches(c)
                                                         for im, c in zip(vae_only, captions)]))
    for name in ("ddim_w7.5", "nti_w7.5", "nti_w7.5_cosine"):
        summary[f"oracle_on_{name}"] = float(np.mean([scenes.read_scene(im).matches(c)
                                                      for im, c in zip(recons[name], captions)]))
    inversions["direct_w7.5"] = api.invert(pipe, images, captions, NTIConfig(method="direct", steps=steps,
                                                                          backend="fast", batch_size=batch),
                                      progress=False)
    return summary, inversions, recons


def edit_mode(kind: str, mode: str) -> str:
    """The P2P mode an edit kind runs under in a row of `mode`: refine where the word counts differ."""
    return "p2p-refine" if kind in ("add", "remove") and mode == "p2p-replace" else mode


def edits(pipe, scene_list, inversions: dict, recon: list, seed: int, batch: int) -> tuple[dict, dict, list]:
    """EDIT_KINDS edits of each scene under each EDIT_ROWS row, graded by the oracle; `recon`: the NTI w=7.5
    reconstructions, scored outside the same masks.

    Success: the oracle reads the edited image as the target caption (what the edit names changed as asked,
    nothing else did). Outside what the edit may change (`scenes.edit_mask`): SSIM and PSNR against the source.
    Returns the summary, per row the edited images in job order, and the jobs: (kind, scene index, source scene,
    target scene, object index), colour then shape edit of each scene, then the background swaps, then the
    additions and removals.
    """
    rng = random.Random(seed)
    jobs = []  # (kind, scene index, source scene, target scene, object index or None)
    for k, scene in enumerate(scene_list):
        jobs += [(kind, k, scene, target, index) for kind, target, index in scenes.edit_pairs(rng, scene)]
    rng = random.Random(seed + 1)  # a stream of its own, so the colour and shape edits stay as they were
    for k, scene in enumerate(scene_list):
        other = rng.choice([b for b in scenes.BACKGROUNDS if b != scene.background])
        jobs.append(("background", k, scene, replace(scene, background=other), None))
    rng = random.Random(seed + 2)
    for k, scene in enumerate(scene_list):
        added_or_removed = scenes.add_or_remove(rng, scene)  # None: no room beside the one object for another
        if added_or_removed:
            kind, target, index = added_or_removed
            jobs.append((kind, k, scene, target, index))
    sources = [scenes.render(s) for s in scene_list]
    masks = [scenes.edit_mask(scene, target, index) for _, _, scene, target, index in jobs]  # what each may change
    out, images = {}, {}
    for name, (method, settings) in EDIT_ROWS.items():
        config = NTIConfig(backend="fast", batch_size=batch, **settings)
        groups = {}  # edit mode -> job indices
        for i, job in enumerate(jobs):
            groups.setdefault(edit_mode(job[0], config.edit), []).append(i)
        edited = [None] * len(jobs)
        start = time.perf_counter()
        for mode, indices in groups.items():
            done = api.edit(pipe, [inversions[method][jobs[i][1]] for i in indices],
                            [jobs[i][3].caption for i in indices], config.replace(edit=mode), progress=False)
            for i, image in zip(indices, done):
                edited[i] = image
        seconds = (time.perf_counter() - start) / len(jobs)
        images[name] = edited
        rows = {kind: [] for kind in EDIT_KINDS}
        for (kind, k, _, target, _), image, mask in zip(jobs, edited, masks):
            rows[kind].append((scenes.read_scene(image).matches(target.caption),
                               ssim(sources[k], image, mask=mask), psnr(sources[k], image, mask=mask),
                               ssim(sources[k], image, mask=clear_of(mask))))
        out[name] = {kind: {"n": len(r), "success": round(float(np.mean([x[0] for x in r])), 4),
                            "outside_ssim": round(float(np.mean([x[1] for x in r])), 4),
                            "outside_psnr": round(float(np.mean([x[2] for x in r])), 2),
                            "outside_ssim_clear_of_object": round(float(np.nanmean([x[3] for x in r])), 4)
                            if not np.isnan([x[3] for x in r]).all() else None,
                            "outside_ssim_when_successful": round(float(np.mean([x[1] for x in r if x[0]])), 4)
                            if any(x[0] for x in r) else None}
                     for kind, r in rows.items() if r}
        out[name]["edit_s_per_image"] = round(seconds, 3)
        print(name, json.dumps(out[name]), flush=True)
    # the reconstruction's own score outside the same masks: what "unchanged" looks like after a round trip
    swaps = [(j[1], m) for j, m in zip(jobs, masks) if j[0] in ("colour", "shape")]  # (scene index, mask)
    cores = [m for j, m in zip(jobs, masks) if j[0] == "background"]  # one per scene, in scene order
    removed = [psnr(sources[j[1]], recon[j[1]], mask=m) for j, m in zip(jobs, masks) if j[0] == "remove"]
    out["nti_reconstruction_outside"] = {
        "ssim": round(float(np.mean([ssim(sources[k], recon[k], mask=m) for k, m in swaps])), 4),
        "psnr": round(float(np.mean([psnr(sources[k], recon[k], mask=m) for k, m in swaps])), 2),
        "ssim_clear_of_object": round(float(np.nanmean([ssim(sources[k], recon[k], mask=clear_of(m))
                                                        for k, m in swaps])), 4),
        "psnr_object_cores": round(float(np.mean([psnr(s, r, mask=m) for s, r, m in zip(sources, recon, cores)])),
                                   2),  # what background swaps and additions must keep
        "psnr_outside_removed_object": round(float(np.mean(removed)), 2) if removed else None}
    return out, images, jobs


def edit_sheet(rows: list[list], path: Path, scale: int = 4) -> Path:
    """A PNG grid of 32 px images (one list per row), each scaled up `scale` times without smoothing."""
    side = scenes.RESOLUTION * scale
    gap = 2 * scale
    sheet = Image.new("RGB", (len(rows[0]) * (side + gap) - gap, len(rows) * (side + gap) - gap), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet.paste(image.convert("RGB").resize((side, side), Image.NEAREST), (c * (side + gap), r * (side + gap)))
    return atomic_write(path, lambda temp: sheet.save(temp, format="PNG"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="12 captions per group and 6 scenes instead of 100 and 40")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON path, the picture beside it as .png (default "
                   "benchmarks/results/testbed_shapes_<device>[_quick][_steps<N>...].json)")
    add_overwrite(p)
    args = p.parse_args(argv)
    # every setting that changes the figures (not --out), so the command reproduces this JSON; a run with other
    # settings gets a default file of its own, never the committed 50-step run's
    changed = [name for name in ("steps", "seed", "batch", "device") if getattr(args, name) != p.get_default(name)]
    suffix = args.device + ("_quick" if args.quick else "") + "".join(
        f"_{name}{getattr(args, name)}" for name in changed if name != "device")
    out = Path(args.out or RESULTS / f"testbed_shapes_{suffix}.json")
    refuse_existing(p, [out, out.with_suffix(".png")], args.overwrite)
    n_captions, n_scenes = (12, 6) if args.quick else (100, 40)
    try:  # bad settings are refused before the minutes of work start
        NTIConfig(steps=args.steps, batch_size=args.batch, seed=args.seed)
        pipe = load_pipeline("shapes", args.device)
    except NTIError as err:
        p.error(str(err))
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    result = {"benchmark": "shapes test-bed fidelity (oracle-graded)", "model": pipe.name,
              "fingerprint": pipe.fingerprint, "device": args.device, "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "steps": args.steps,
              "commit": git_commit(),
              "command": "python -m nti.benchmarks.bench_testbed" + (" --quick" if args.quick else "") + "".join(
                  f" --{name} {getattr(args, name)}" for name in changed) + (" --overwrite" if args.overwrite else "")}
    result["text_to_image"] = text_to_image(pipe, n_captions, args.seed)
    print(json.dumps({k: {m: v[m] for m in ("n", "agreement")} for k, v in result["text_to_image"].items()}))
    scene_rng = random.Random(args.seed + 100)
    scene_list = [scenes.random_scene(scene_rng) for _ in range(n_scenes)]
    result["reconstruction_psnr"], inversions, recons = reconstruction(pipe, scene_list, args.steps, args.batch)
    print(json.dumps(result["reconstruction_psnr"]))
    result["edits"], edited, jobs = edits(pipe, scene_list, inversions, recons["nti_w7.5"], args.seed + 200,
                                          args.batch)
    # per scene: source | DDIM w=7.5 | NTI w=7.5 reconstructions | colour, shape, add/remove edit of each SHEET_ROWS
    # row (jobs run colour and shape of each scene, then the background swaps, then the additions and removals)
    job = {(kind.replace("remove", "add"), k): j for j, (kind, k, *_) in enumerate(jobs)}
    blank = Image.new("RGB", (scenes.RESOLUTION,) * 2, (255, 255, 255))  # a one-object scene with no room to add
    sheet = [[scenes.render(s), recons["ddim_w7.5"][k], recons["nti_w7.5"][k]]
             + [edited[row][job[kind, k]] if (kind, k) in job else blank
                for row in SHEET_ROWS for kind in ("colour", "shape", "add")]
             for k, s in enumerate(scene_list[:8])]
    picture = edit_sheet(sheet, out.with_suffix(".png"))  # next to the JSON
    result["sheet"] = picture.name
    result["seconds"] = round(time.perf_counter() - start, 1)
    write_text(out, json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
