"""Issue 18, property-based: generated command lines, JSONL records and damaged inversion files thrown at the `nti`
entry point in-process (nti.cli.main). Whatever comes in: exit 0 or 2 only (argparse's exit included), no
traceback or 'internal error' on stderr, nothing written outside --out (and --cache), no input file changed.

Each example builds a fresh workspace: inputs/ holds a good photo, a 16-bit grey PNG, an EXIF-turned JPEG, an
animated GIF, a broken PNG, a generated JSONL and a good and a generated damaged inversion file. Runs that pass every
check do real (tiny-model, 1-2 step) work, so the invariants are checked on written outputs too.
"""
import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nti
from nti.cli import EXIT_BAD_INPUT, EXIT_OK, main

# 40 examples per property keep the suite fast and reproducible (derandomized); NTI_PROPERTY_EXAMPLES=500 explores
# further with fresh random examples
EXAMPLES = int(os.environ.get("NTI_PROPERTY_EXAMPLES", 40))

# ---------------------------------------------------------------------------------------------------- strategies

PROMPTS = st.one_of(st.sampled_from(["a cat", "a dog.", "a cat, sitting!", "", "a tiger next to a mirror"]),
                    st.text(max_size=24), st.just(" ".join(["a cat"] * 40)))
IDS = st.one_of(st.sampled_from(["../../x", "/etc/passwd", "..", ".", "a/b", "x.png", "~", "con", "dup", "dup"]),
                st.text(max_size=16), st.integers(), st.booleans(), st.floats(), st.lists(st.integers(), max_size=2))
JSON_VALUES = st.one_of(st.none(), st.integers(), st.lists(st.integers(), max_size=2), st.floats())
RECORDS = st.one_of(
    st.fixed_dictionaries({}, optional={
        "image": st.one_of(st.sampled_from(["good.png", "missing.png", "../inputs/good.png", "/etc/hostname",
                                            "skimage:chelsea", "skimage:nope", "deep.png", "broken.png", "anim.gif",
                                            "", "a\x00b", "."]), JSON_VALUES),
        "source_prompt": st.one_of(PROMPTS, JSON_VALUES),
        "target_prompt": st.one_of(PROMPTS, JSON_VALUES),
        "id": IDS,
    }).map(json.dumps),
    st.sampled_from(["not json", "[1, 2]", "null", '"text"', "{}", '{"image": 5}', "{\"image\": \"good.png\"", ""]),
)
GOOD_INPUTS = ["inputs/good.png", "skimage:chelsea", "inputs/deep.png", "inputs/turned.jpg", "inputs/jobs.jsonl"]
BAD_INPUTS = ["inputs/anim.gif", "inputs/broken.png", "inputs", "skimage:nope", "inputs/missing.png",
              "inputs/inv.safetensors", "inputs/good.png/x", "", "-"]
INVERSION_FILES = ["inputs/damaged.safetensors", "inputs/inv.safetensors", "inputs", "inputs/good.png",
                   "inputs/none.safetensors"]
OUTS = ["out/x.png", "out/x.safetensors", "out/sub/", "out/a/../b.png", "out.jpg", ".", "inputs/good.png", "inputs",
        "inputs/inv.safetensors", "inputs/good.png/x.png", "inputs/jobs.jsonl", "", None]
OPTIONS = {  # every value small enough that a run which passes the checks stays well under a second
    "--steps": ["1", "2", "0", "-1", "x", "1.5"], "--inner-steps": ["0", "1", "-3", "a"],
    "--guidance": ["1", "7.5", "0", "inf", "-inf", "nan", "1e30", "-1", "1e-300", "100", "abc"],
    "--guidance-schedule": ["constant", "cosine", "bogus"], "--steps-offset": ["0", "1", "999", "5000", "-1"],
    "--method": ["ddim", "null-text", "negative-prompt", "direct", "bogus"],
    "--edit": ["regenerate", "p2p-replace", "p2p-refine", "p2p-reweight", "x"],
    "--cross-replace": ["0.5", "2", "nan"], "--self-replace": ["0", "1", "-0.1"],
    "--reweight": ["cat=2", "cat=inf", "=2", "cat=-1", "cat", "two words=2"], "--blend-word": ["cat", "two words", ""],
    "--batch-size": ["1", "2", "0"], "--seed": ["0", "-1", "99999999999999999999999"],
    "--backend": ["reference", "fast", "gpu"], "--precision": ["fp32", "bf16", "fp8"],
    "--attention": ["sdpa", "plain", "xformers"], "--device": ["cpu", "cuda", "tpu", "cuda:99", "meta", "mps", "xpu"],
    "--model": ["tiny", "inputs/good.png", "nowhere", "inputs"], "--cache": ["cache", "cache/sub", "inputs/good.png"],
    "--direct-target-offset": ["none", "source"],
    "--fail-fast": None, "--no-early-stop": None, "--cuda-graphs": None, "--channels-last": None, "--nope": None,
}
OPTION = st.sampled_from(sorted(OPTIONS)).flatmap(
    lambda n: st.just([n]) if OPTIONS[n] is None else st.sampled_from(OPTIONS[n]).map(lambda v: [n, v]))
# A run starts valid (edit or invert or reconstruct of good inputs into out/) and gets up to three changes: the
# simplest examples hypothesis tries first are then real runs, and the rest reach every check from there.
CHANGES = st.lists(st.one_of(
    st.tuples(st.just("input"), st.sampled_from(BAD_INPUTS + GOOD_INPUTS)),
    st.tuples(st.just("prompt"), st.one_of(PROMPTS, st.none())),
    st.tuples(st.just("target"), st.one_of(PROMPTS, st.none())),
    st.tuples(st.just("out"), st.sampled_from(OUTS)),
    st.tuples(st.just("option"), OPTION),
    st.tuples(st.just("inversion"), st.sampled_from(INVERSION_FILES)),
    st.tuples(st.just("only-inversions"), st.sampled_from(INVERSION_FILES)),
), max_size=3)
GOOD_RECORD = st.fixed_dictionaries({"image": st.sampled_from(["good.png", "skimage:chelsea", "deep.png"]),
                                     "source_prompt": st.just("a cat"), "target_prompt": st.just("a dog")},
                                    optional={"id": IDS}).map(json.dumps)
DAMAGE = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("meta"), st.sampled_from(["settings.steps", "settings.method", "settings.guidance",
                                                "settings.steps_offset", "settings", "format_version",
                                                "source_prompt", "model_fingerprint", "iterations"]),
              st.sampled_from([3, 0, -1, "2", 1e9, None, "bogus", 1e30, float("nan"), True, [], {}, "DROP"])),
    st.tuples(st.just("tensor"), st.sampled_from(["z_T", "z_0", "null_embeddings", "pivots"]),
              st.sampled_from(["nan", "inf", "flat", "fewer", "int", "DROP"])),
)


# ---------------------------------------------------------------------------------------------------- workspace

@pytest.fixture(scope="module")
def good_inversion(tiny_pipe, tmp_path_factory):
    inv = nti.invert(tiny_pipe, "skimage:chelsea", "a cat", nti.NTIConfig(steps=1, inner_steps=1),
                        progress=False)[0]
    return nti.save_inversion(inv, tmp_path_factory.mktemp("good") / "inv.safetensors")


def damage_inversion(good: Path, dst: Path, damage) -> None:
    """A copy of `good` with one generated defect: cut short, a flipped byte, a metadata field changed or dropped,
    a tensor made non-finite, flat, shorter, integer or dropped."""
    data = good.read_bytes()
    kind = damage[0]
    if kind == "truncate":
        dst.write_bytes(data[:int(damage[1] * len(data))])
        return
    if kind == "flip":
        at = min(int(damage[1] * len(data)), len(data) - 1)
        dst.write_bytes(data[:at] + bytes([data[at] ^ damage[2]]) + data[at + 1:])
        return
    tensors = load_file(str(good))
    with safe_open(str(good), framework="pt") as fh:
        meta = json.loads(fh.metadata()["nti"])
    if kind == "meta":
        *parents, key = damage[1].split(".")
        holder = meta[parents[0]] if parents else meta
        if damage[2] == "DROP":
            holder.pop(key, None)
        else:
            holder[key] = damage[2]
    else:
        name, how = damage[1], damage[2]
        base = tensors.get(name, tensors["z_T"].expand(3, *tensors["z_T"].shape).clone())
        changed = {"nan": base * float("nan"), "inf": base + float("inf"), "flat": base.flatten(),
                   "fewer": base[:1] if base.ndim == 3 and base.shape[0] > 1 else base[..., :1],
                   "int": base.to(torch.int32), "DROP": None}[how]
        tensors.pop(name, None)
        if changed is not None:
            tensors[name] = changed.contiguous()
    save_file(tensors, str(dst), metadata={"nti": json.dumps(meta)})


def make_workspace(root: Path, good: Path, records: list[str], damage) -> None:
    inputs = root / "inputs"
    inputs.mkdir()
    Image.fromarray(np.full((40, 48, 3), 150, np.uint8)).save(inputs / "good.png")
    Image.fromarray(np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)).save(inputs / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.full((20, 40, 3), 90, np.uint8)).save(inputs / "turned.jpg", exif=exif)
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    frames[0].save(inputs / "anim.gif", save_all=True, append_images=frames[1:])
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (inputs / "jobs.jsonl").write_text("\n".join(records), encoding="utf-8")
    shutil.copy(good, inputs / "inv.safetensors")
    shutil.copy(good.with_suffix(".json"), inputs / "inv.json")
    damage_inversion(good, inputs / "damaged.safetensors", damage)


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


def allowed(root: Path, rel: str, out: str | None, cache: str | None) -> bool:
    """May the run have written (or removed) root/rel: inside --out (the file, its .json sidecar, or the folder)
    or inside --cache."""
    path = (root / rel).resolve()
    for place in ([out] if out else []) + ([cache] if cache else []):
        target = (root / place).resolve()
        if path == target or target in path.parents or (place == out and path == target.with_suffix(".json")):
            return True
    return False


# ---------------------------------------------------------------------------------------------------- the property

def run_and_check(root: Path, argv: list[str], out: str | None, cache: str | None, inputs: set[str]) -> int:
    """main(argv) in-process, then the invariants: exit 0 or 2, no traceback, none of `inputs` (paths relative to
    root) changed, nothing written outside --out and --cache, and a successful run wrote something."""
    before = snapshot(root)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own exit
            code = exc.code
    err = stderr.getvalue()
    after = snapshot(root)
    last = (err.strip().splitlines() or [""])[-1]
    event(f"exit {code}: {last[:70]}" if code else "exit 0")  # pytest --hypothesis-show-statistics shows the mix
    assert code in (EXIT_OK, EXIT_BAD_INPUT), (argv, code, err)
    assert "Traceback" not in err and "internal error" not in err, (argv, err)
    changed = {rel for rel in before.keys() | after.keys() if before.get(rel) != after.get(rel)}
    assert not changed & inputs, (argv, changed & inputs)
    outside = [rel for rel in changed if not allowed(root, rel, out, cache)]
    assert not outside, (argv, outside)
    if code == EXIT_OK:
        assert changed, argv
    return code


PROPERTY = settings(max_examples=EXAMPLES, deadline=None, derandomize="NTI_PROPERTY_EXAMPLES" not in os.environ,
                    database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])
TINY = ["--steps", "1", "--inner-steps", "1", "--quiet", "--device", "cpu", "--model", "tiny"]


@PROPERTY
@given(command=st.sampled_from(["edit", "invert", "reconstruct"]), first=st.sampled_from(GOOD_INPUTS),
       changes=CHANGES, records=st.lists(st.one_of(GOOD_RECORD, RECORDS), min_size=1, max_size=2), damage=DAMAGE)
def test_generated_command_lines_and_jsonl(good_inversion, command, first, changes, records, damage):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_workspace(root, good_inversion, records, damage)
        inputs, prompt, target, out, options, inversions = [first], "a cat", "a dog", "out", [], []
        for kind, value in changes:
            if kind == "input":
                inputs.append(value)
            elif kind == "prompt":
                prompt = value
            elif kind == "target":
                target = value
            elif kind == "out":
                out = value
            elif kind == "option":
                options.append(value)
            else:
                inversions.append(value)
                if kind == "only-inversions":
                    inputs = []
        argv = [command, *(i if i.startswith("skimage:") or i in ("", "-") else str(root / i) for i in inputs),
                *TINY]
        if command == "edit" and inversions:
            argv += ["--inversion", *(str(root / i) for i in inversions)]
        if prompt is not None:
            argv += ["--prompt", prompt]
        if target is not None and command == "edit":
            argv += ["--target", target]
        cache = None
        for name, *value in options:
            if name in ("--model", "--cache") and value[0] not in ("tiny", "nowhere"):
                value = [str(root / value[0])]
            if name == "--cache":
                cache = value[0]
            argv += [name, *value]
        if out is not None:
            argv += ["--out", str(root / out) if out else ""]
        # the run's own input files: those named, a named folder's or JSONL's (all of inputs/, conservatively) and
        # the inversion files; another file in inputs/ that --out names is the user's to overwrite
        files = {rel for rel in snapshot(root) if rel.startswith("inputs/")}
        named = {i for i in inputs + inversions if not i.startswith("skimage:")}
        mine = files if named & {"inputs", "inputs/jobs.jsonl"} else files & named
        run_and_check(root, argv, out and str(root / out), cache, mine)


@PROPERTY
@given(damage=DAMAGE, option=st.one_of(st.none(), OPTION), with_image=st.booleans())
def test_generated_damaged_inversion_files(good_inversion, damage, option, with_image):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_workspace(root, good_inversion, [], damage)
        argv = ["edit", "--inversion", str(root / "inputs/damaged.safetensors"), "--target", "a dog", *TINY[2:],
                "--out", str(root / "out")]
        if with_image:  # beside an image to invert: a bad file must not cost it its result
            argv += [str(root / "inputs/good.png"), "--prompt", "a cat", "--steps", "1", "--inner-steps", "1"]
        if option is not None and option[0] not in ("--model", "--cache", "--device"):
            argv += option
        inputs = {rel for rel in snapshot(root) if rel.startswith("inputs/")}
        run_and_check(root, argv, str(root / "out"), None, inputs)
