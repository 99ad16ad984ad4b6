"""Audit of saved inversions, the shared --cache and --resume: what the cache key covers (and what it must not), damaged
files found on load instead of edited (a flipped bit too), claims between processes (a killed holder included), and
outputs a rerun keeps only when they are whole."""
import dataclasses
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import unicodedata
from pathlib import Path

import pytest
import torch
from PIL import Image

import nti
from nti import NTIConfig, NTIError, load_inversion, save_inversion
from nti.artifact import inversion_key
from nti.cli import EXIT_OK

from tests.test_bad_input import TINY, run_cli
from tests.test_resume import edit_calls

ROOT = Path(__file__).resolve().parent.parent
CONFIG = NTIConfig(steps=2, inner_steps=1)


@pytest.fixture(scope="module")
def inversion(tiny_pipe, cat_image):
    return nti.invert(tiny_pipe, cat_image, "a cat", CONFIG, progress=False)[0]


def header_of(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's JSON header and the tensor bytes after it."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + size]), data[8 + size:]


def write_with_header(path: Path, header: dict, body: bytes) -> Path:
    """A safetensors file from a header and tensor bytes (the header padded to 8 bytes, as safetensors writes it)."""
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)
    return path


def flip_bit(path: Path, at: float) -> None:
    """Flip one bit of the tensor data, `at` of the way through it (the header stays valid)."""
    header, body = header_of(path)
    k = min(int(len(body) * at), len(body) - 1)
    body = body[:k] + bytes([body[k] ^ 0x08]) + body[k + 1:]
    write_with_header(path, header, body)


def counted_invert(monkeypatch) -> list:
    """Record every image api.invert gets (the cache calls it only for entries no run has saved)."""
    from nti import api
    real, seen = api.invert, []
    monkeypatch.setattr(api, "invert", lambda pipe, images, *a, **k: seen.extend(images) or real(pipe, images, *a, **k))
    return seen


# -------------------------------------------------------------------------------------------- damaged artifacts

@pytest.mark.parametrize("at", [0.0, 0.5, 0.999])
def test_a_flipped_bit_in_the_tensors_is_refused_on_load(inversion, tmp_path, at):
    """safetensors keeps no checksum: a flipped bit in z_T or an embedding loaded as a finite, plausible, wrong
    inversion (and an edit of it was a silently wrong image)."""
    path = save_inversion(inversion, tmp_path / "cat.safetensors")
    flip_bit(path, at)
    with pytest.raises(NTIError, match="checksum"):
        load_inversion(path)


def test_metadata_that_disagrees_with_its_recorded_key_is_refused(inversion, tmp_path):
    """A changed setting (a flipped digit, a hand edit) still passed every range check: the file was edited under
    guidance 7.0 although its embeddings were optimized for 7.5."""
    path = save_inversion(inversion, tmp_path / "cat.safetensors")
    header, body = header_of(path)
    meta = json.loads(header["__metadata__"]["nti"])
    meta["settings"]["guidance"] = 7.0
    header["__metadata__"]["nti"] = json.dumps(meta, sort_keys=True)
    with pytest.raises(NTIError, match="key"):
        load_inversion(write_with_header(path, header, body))


@pytest.mark.parametrize("case", ["zero bytes", "cut short", "newer format"])
def test_unreadable_files_give_a_clear_error(inversion, tmp_path, case):
    path = save_inversion(inversion, tmp_path / "cat.safetensors")
    if case == "zero bytes":
        path.write_bytes(b"")
    elif case == "cut short":
        path.write_bytes(path.read_bytes()[:-5])
    else:
        header, body = header_of(path)
        meta = json.loads(header["__metadata__"]["nti"])
        header["__metadata__"]["nti"] = json.dumps({**meta, "format_version": 99})
        write_with_header(path, header, body)
    with pytest.raises(NTIError) as err:
        load_inversion(path)
    assert str(path) in str(err.value)
    if case == "newer format":  # not "damaged": the user needs a newer nti, not a new inversion
        assert "newer" in str(err.value) and "99" in str(err.value)


def test_a_loaded_inversion_does_not_change_with_its_file(inversion, tmp_path):
    """load_file maps the file: a write over it in place (cp, a shell's >) changed an inversion already loaded, and
    cutting the file short killed the process with SIGBUS when the tensors were next read."""
    path = save_inversion(inversion, tmp_path / "cat.safetensors")
    loaded = load_inversion(path)
    path.write_bytes(bytes(path.stat().st_size))
    assert torch.equal(loaded.z_T, inversion.z_T) and torch.equal(loaded.null_embeddings, inversion.null_embeddings)
    code = ("import sys, nti; from pathlib import Path; inv = nti.load_inversion(sys.argv[1]); "
            "Path(sys.argv[1]).write_bytes(b''); print(float(inv.z_T.sum()))")
    path = save_inversion(inversion, tmp_path / "again.safetensors")
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=child_env())
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("field, value", [("null_embeddings", float("inf")), ("z_0", float("nan"))])
def test_non_finite_tensors_are_refused(inversion, tmp_path, field, value):
    bad = dataclasses.replace(inversion, **{field: torch.full_like(getattr(inversion, field), value)})
    with pytest.raises(NTIError, match="non-finite"):
        save_inversion(bad, tmp_path / "bad.safetensors")
    assert not list(tmp_path.iterdir())


def test_an_inversion_of_another_model_is_refused_naming_both(inversion):
    other = nti.build_tiny_pipeline(seed=1)
    with pytest.raises(NTIError) as err:
        nti.edit_latents(other, [inversion], "a dog", progress=False)
    assert inversion.model_fingerprint in str(err.value) and other.fingerprint in str(err.value)


# ------------------------------------------------------------------------------------------------ the cache key

BASE = {"backend": "fast", "precision": "bf16"}  # half precision: where the speed switches could matter
KEY_CASES = {  # field -> (a change of it, whether that changes the inversion's key)
    "method": ({"method": "ddim"}, True), "steps": ({"steps": 3}, True), "guidance": ({"guidance": 5.0}, True),
    "guidance_schedule": ({"guidance_schedule": "cosine"}, True), "guidance_min": ({"guidance_min": 2.0}, True),
    "inner_steps": ({"inner_steps": 3}, True), "lr": ({"lr": 0.02}, True), "early_stop": ({"early_stop": False}, True),
    "early_stop_eps": ({"early_stop_eps": 1e-4}, True), "steps_offset": ({"steps_offset": 0}, True),
    "optimize_pooled": ({"optimize_pooled": False}, True), "clip_skip": ({"clip_skip": 1}, True),
    "seed": ({"seed": 1}, False),
    "edit": ({"edit": "p2p-replace"}, False), "cross_replace": ({"cross_replace": 0.5}, False),
    "cross_replace_words": ({"edit": "p2p-replace", "cross_replace_words": {"cat": 0.4}}, False),
    "self_replace": ({"self_replace": 0.3}, False), "self_replace_max_tokens": ({"self_replace_max_tokens": 9}, False),
    "reweight": ({"edit": "p2p-replace", "reweight": {"cat": 2.0}}, False),
    "blend_words": ({"edit": "p2p-replace", "blend_words": ["cat"]}, False),
    "blend_threshold": ({"blend_threshold": 0.5}, False), "blend_start": ({"blend_start": 0.4}, False),
    "direct_target_offset": ({"direct_target_offset": "source"}, False),
    "backend": ({"backend": "reference"}, True),  # the reference computes in fp32 whatever precision says
    "batch_size": ({"batch_size": 3}, False), "precision": ({"precision": "fp16"}, True),
    "half_weights": ({"half_weights": False}, False), "half_norms": ({"half_norms": True}, True),
    "attention": ({"attention": "plain"}, False), "compile": ({"compile": True}, False),
    "compile_scope": ({"compile_scope": "unet"}, False), "cuda_graphs": ({"cuda_graphs": True}, False),
    "channels_last": ({"channels_last": True}, False),
    "gradient_checkpointing": ({"gradient_checkpointing": True}, False),
    "fused_step": ({"fused_step": True}, False), "forward_backend": ({"forward_backend": "onnx"}, True),
    "export_cache": ({"export_cache": "/somewhere"}, False),
}


def key_of(config: NTIConfig) -> str:
    return inversion_key("pixels", "a cat", "model", config.result_settings({"steps_offset": 1}))


def test_every_config_field_is_classified():
    """A new NTIConfig field must say here whether it changes an inversion (and so its cache key)."""
    assert set(KEY_CASES) == {f.name for f in dataclasses.fields(NTIConfig)}


@pytest.mark.parametrize("field", sorted(KEY_CASES))
def test_the_key_changes_exactly_with_what_changes_the_inversion(field):
    changes, keyed = KEY_CASES[field]
    base = NTIConfig(**BASE)
    assert (key_of(base.replace(**changes)) != key_of(base)) == keyed


@pytest.mark.parametrize("changes", [{"half_norms": True}, {"forward_backend": "onnx"}, {"backend": "reference"},
                                     {"batch_size": 3}])
def test_in_fp32_the_speed_switches_keep_the_key(changes):
    """fp32 on either backend and any forward backend agree to rounding (tests/test_fast.py): one inversion."""
    assert key_of(NTIConfig(backend="fast").replace(**changes)) == key_of(NTIConfig(backend="fast"))


def test_a_whole_number_setting_keys_as_its_float():
    """NTIConfig(guidance=7) and --guidance 7 (7.0) run the same inversion; they were two cache entries."""
    ints = NTIConfig(guidance=7, guidance_min=2, lr=1, early_stop_eps=0)
    floats = NTIConfig(guidance=7.0, guidance_min=2.0, lr=1.0, early_stop_eps=0.0)
    assert key_of(ints) == key_of(floats)
    assert ints.result_settings({}) == floats.result_settings({}) and isinstance(ints.result_settings({})["lr"], float)


def test_prompts_that_differ_as_text_key_apart():
    """CLIP reads 'a cat', 'a  cat ' and 'A cat' alike, but an inversion records its source prompt (P2P aligns the
    words of it): each text keeps its own entry, and so do NFC and NFD spellings."""
    settings = CONFIG.result_settings({})
    texts = ["a cat", "a  cat ", "A cat", *(unicodedata.normalize(form, "a café") for form in ("NFC", "NFD"))]
    assert len({inversion_key("pixels", text, "model", settings) for text in texts}) == len(texts)


def test_the_cache_keys_decoded_pixels_not_file_bytes(tiny_pipe, tmp_path, monkeypatch):
    """The same pixels in two differently encoded files are one entry; one changed pixel is another."""
    pixels = Image.effect_noise((40, 40), 60).convert("RGB")
    a, b, c = tmp_path / "a.png", tmp_path / "b b.png", tmp_path / "c.png"
    pixels.save(a, compress_level=1)
    pixels.save(b, compress_level=9, pnginfo=None, optimize=True)
    changed = pixels.copy()
    changed.putpixel((20, 20), (0, 0, 0) if changed.getpixel((20, 20)) != (0, 0, 0) else (255, 255, 255))
    changed.save(c)
    assert a.read_bytes() != b.read_bytes()
    seen = counted_invert(monkeypatch)
    cache = tmp_path / "cache"
    first = nti.api.invert_cached(tiny_pipe, [a], ["a cat"], CONFIG, cache, progress=False)[0]
    same = nti.api.invert_cached(tiny_pipe, [b], ["a cat"], CONFIG, cache, progress=False)[0]
    assert len(seen) == 1 and torch.equal(same.null_embeddings, first.null_embeddings)
    nti.api.invert_cached(tiny_pipe, [c], ["a cat"], CONFIG, cache, progress=False)
    assert len(seen) == 2


# ----------------------------------------------------------------------------------------- the cache's entries

@pytest.mark.parametrize("damage", ["flipped bit", "zero bytes", "another key"])  # newer format: test_artifact.py
def test_a_bad_cache_entry_is_moved_aside_and_inverted_again(tiny_pipe, cat_image, tmp_path, monkeypatch, caplog,
                                                            damage):
    cache = tmp_path / "cache"
    first = nti.api.invert_cached(tiny_pipe, [cat_image], ["a cat"], CONFIG, cache, progress=False)[0]
    (entry,) = cache.glob("*.safetensors")
    if damage == "flipped bit":
        flip_bit(entry, 0.5)
    elif damage == "zero bytes":
        entry.write_bytes(b"")
    else:  # a whole inversion of another image, under this entry's name
        other = nti.invert(tiny_pipe, "skimage:coffee", "a cat", CONFIG, progress=False)[0]
        entry.unlink()
        save_inversion(other, entry)
    seen = counted_invert(monkeypatch)
    again = nti.api.invert_cached(tiny_pipe, [cat_image], ["a cat"], CONFIG, cache, progress=False)[0]
    assert len(seen) == 1 and "moved aside" in caplog.text
    assert (cache / (entry.name + ".corrupt")).is_file()
    assert torch.equal(again.z_T, first.z_T) and torch.equal(again.null_embeddings, first.null_embeddings)
    assert load_inversion(entry).key == entry.stem and not list(cache.glob("*.lock"))


CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import nti
    from nti import api
    from nti.images import center_square, load_image
    pipe = nti.build_tiny_pipeline(seed=0)
    square = center_square(load_image("skimage:chelsea"), pipe.resolution)
    cache, log = Path(sys.argv[1]), Path(sys.argv[2])
    real = api.invert
    def slow(*args, **kwargs):  # long enough for the other run to find the claim taken
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\\n")
        time.sleep(2)
        return real(*args, **kwargs)
    api.invert = slow
    (log.parent / f"ready-{os.getpid()}").touch()
    while len(list(log.parent.glob("ready-*"))) < 2:  # both runs start inverting together
        time.sleep(0.02)
    inv = api.invert_cached(pipe, [square], ["a cat"], nti.NTIConfig(steps=2, inner_steps=1), cache, progress=False)[0]
    print(inv.key, float(inv.z_T.double().sum()), float(inv.null_embeddings.double().sum()))
""")


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def test_two_processes_on_one_key_invert_it_once(tmp_path):
    cache, log = tmp_path / "shared cache", tmp_path / "inverted.log"
    runs = [subprocess.Popen([sys.executable, "-c", CHILD, str(cache), str(log)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=child_env()) for _ in range(2)]
    outs = [run.communicate(timeout=240) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outs]
    assert len(log.read_text().split()) == 1  # one run inverted, the other waited and took its entry
    assert outs[0][0] == outs[1][0]
    (entry,) = cache.glob("*.safetensors")
    assert {p.name for p in cache.iterdir()} == {entry.name, entry.stem + ".json"}  # no lock, no temp file
    load_inversion(entry)


def test_a_claim_left_by_a_killed_run_does_not_block(tiny_pipe, cat_image, tmp_path):
    """SIGKILL runs no cleanup: the lock file stays, but the kernel drops the lock with the process."""
    from nti.images import center_square, pixel_hash
    key = inversion_key(pixel_hash(center_square(cat_image, tiny_pipe.resolution)), "a cat", tiny_pipe.fingerprint,
                        CONFIG.result_settings(tiny_pipe.scheduler_config))
    lock = tmp_path / f"{key}.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from nti.cache import Claim; "
                               "assert Claim(__import__('pathlib').Path(sys.argv[1])).try_acquire(); "
                               "print('held', flush=True); time.sleep(600)", str(lock)],
                              stdout=subprocess.PIPE, text=True, env=child_env())
    assert holder.stdout.readline().strip() == "held"
    from nti.cache import Claim
    assert not Claim(lock).try_acquire()  # the premise: the claim is really held
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
    assert lock.exists()
    start = time.monotonic()
    inv = nti.api.invert_cached(tiny_pipe, [cat_image], ["a cat"], CONFIG, tmp_path, progress=False)[0]
    assert time.monotonic() - start < 60 and inv.key == key and not lock.exists()


# ----------------------------------------------------------------------------------------------------- --resume

EDIT = ["edit", "skimage:chelsea", "--prompt", "a photo", "--target", "a painting", "--method", "ddim", *TINY]


@pytest.mark.parametrize("damage", ["cut short", "flipped bit"])
def test_a_damaged_png_output_is_made_again_not_kept(tmp_path, capsys, monkeypatch, damage):
    """--resume read only a finished PNG's text chunk, which comes before the pixels: a file cut short (a copy
    that stopped, a full disk outside nti) or with a flipped bit was kept as finished."""
    out = tmp_path / "dir with spaces ü" / "o.png"
    assert run_cli([*EDIT, "--out", out], capsys)[0] == EXIT_OK
    whole = out.read_bytes()
    out.write_bytes(whole[:len(whole) * 2 // 3] if damage == "cut short" else
                    whole[:-30] + bytes([whole[-30] ^ 0x10]) + whole[-29:])
    with monkeypatch.context() as m:
        calls = edit_calls(m)
        assert run_cli([*EDIT, "--out", out], capsys)[0] == EXIT_OK
    assert calls == [["chelsea"]] and out.read_bytes() == whole


def test_a_damaged_inversion_output_is_made_again_not_kept(tmp_path, capsys):
    argv = ["invert", "skimage:chelsea", "--prompt", "a photo", "--method", "ddim", *TINY, "--out",
            tmp_path / "ünï cöde" / "cat.safetensors"]
    assert run_cli(argv, capsys)[0] == EXIT_OK
    path = Path(argv[-1])
    whole = load_inversion(path)
    flip_bit(path, 0.5)
    assert run_cli(argv, capsys)[0] == EXIT_OK
    again = load_inversion(path)
    assert torch.equal(again.z_T, whole.z_T) and again.key == whole.key


def test_the_cache_is_shared_whatever_the_output_path_and_progress(tmp_path, capsys, monkeypatch):
    """--out and --quiet change no inversion: the second run takes the first's cache entry."""
    cache = tmp_path / "cäche dir"
    argv = ["invert", "skimage:chelsea", "--prompt", "a photo", *TINY, "--cache", cache]
    assert run_cli([*argv, "--out", tmp_path / "a.safetensors"], capsys)[0] == EXIT_OK
    seen = counted_invert(monkeypatch)
    loud = [a for a in argv if a != "--quiet"]
    assert run_cli([*loud, "--out", tmp_path / "other place" / "b b.safetensors"], capsys)[0] == EXIT_OK
    assert seen == []
    a, b = load_inversion(tmp_path / "a.safetensors"), load_inversion(tmp_path / "other place" / "b b.safetensors")
    assert torch.equal(a.null_embeddings, b.null_embeddings) and a.key == b.key


def test_a_resume_inside_a_chunk_equals_the_uninterrupted_run(tmp_path, capsys, monkeypatch):
    """Interrupted between two saves of one fast-backend chunk, the rerun batches other images together (astronaut
    with coffee instead of chelsea): its outputs are still the uninterrupted run's, byte for byte."""
    import nti.images
    argv = ["edit", "skimage:chelsea", "skimage:astronaut", "skimage:coffee", "--prompt", "a photo", "--target",
            "a painting", "--backend", "fast", "--batch-size", "2", "--inner-steps", "2", *TINY]
    real, saved = nti.images.save_png, []

    def interrupted(image, path, *args, **kwargs):
        if saved:
            raise KeyboardInterrupt
        saved.append(path)
        return real(image, path, *args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(nti.images, "save_png", interrupted)
        run_cli([*argv, "--out", tmp_path / "resumed"], capsys)
    assert [p.name for p in (tmp_path / "resumed").iterdir()] == ["chelsea.png"]
    assert run_cli([*argv, "--out", tmp_path / "resumed"], capsys)[0] == EXIT_OK
    assert run_cli([*argv, "--out", tmp_path / "whole"], capsys)[0] == EXIT_OK
    assert {p.name: p.read_bytes() for p in (tmp_path / "resumed").iterdir()} == {
        p.name: p.read_bytes() for p in (tmp_path / "whole").iterdir()}


def test_a_claims_lock_file_takes_the_umasks_mode(tmp_path):
    """A cache shared by a group (umask 002, a group-writable folder): the lock file was made 0644, so the next user
    of the group could not open it for the claim and failed. It is made as any new file is: 0666 less the umask."""
    import os
    import stat

    from nti.cache import Claim, fcntl

    if fcntl is None:
        pytest.skip("no fcntl locks on this platform")
    old = os.umask(0o002)
    try:
        claim = Claim(tmp_path / "key.lock")
        assert claim.try_acquire()
        mode = stat.S_IMODE((tmp_path / "key.lock").stat().st_mode)
        claim.release()
    finally:
        os.umask(old)
    assert mode == 0o664
