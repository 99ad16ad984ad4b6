"""Audit of the exported UNets (export/) beyond tests/test_export.py: batch sizes and timestep forms through the
engine hook, damaged / stale / foreign cache entries, read-only and full cache folders, two threads building one key,
and `nti export`'s bad input. One ONNX build of the tiny model (module fixture); the rest copies or stubs it.
"""
import errno
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

import torch

import nti.export as export
from nti import NTIError
from nti.export import cache as export_cache
from nti.export import onnx_unet
from tests.conftest import rel_err
from tests.test_export import HAVE_ONNX, eager_eps, unet_inputs

pytestmark = pytest.mark.skipif(not HAVE_ONNX, reason="onnx, onnxruntime and onnxscript are needed")


@pytest.fixture(scope="module")
def built(tiny_pipe, tmp_path_factory):
    """One ONNX fp32 export of the tiny UNet; tests copy its folder rather than touch it."""
    return export.build_forward_backend(tiny_pipe, "onnx", "fp32", tmp_path_factory.mktemp("export-audit"))


def _copy_cache(built, tmp_path) -> tuple[Path, Path]:
    """A private copy of the built cache (root, entry folder): what a test may damage."""
    root = built.path.parents[2]
    shutil.copytree(root, tmp_path / "cache")
    return tmp_path / "cache", tmp_path / "cache" / built.path.parent.relative_to(root)


def _stub_export(monkeypatch, built, calls):
    """export_onnx replaced by a copy of the good build: a rebuild that takes no 30 s."""
    good = built.path.parent

    def export_onnx(component, path, precision):
        calls.append(path)
        for f in good.iterdir():
            if f.name != export_cache.META:
                shutil.copy(f, path.parent / f.name)
        return path
    monkeypatch.setattr(onnx_unet, "export_onnx", export_onnx)


# ---------------------------------------------------------------------------------------------------- engine hook

@pytest.mark.parametrize("batch", [1, 2, 5])
def test_forward_fn_equals_eager_for_batches_and_timestep_forms(tiny_pipe, built, batch):
    fn = export.load_forward_backend(tiny_pipe, "onnx", "fp32", built.path.parents[2])
    z, c = unet_inputs(tiny_pipe, batch, seed=batch)
    want = eager_eps(tiny_pipe, z, 981, c)
    for t in (981, torch.tensor(981), torch.tensor([981])):
        out = fn(z, t, c)
        assert out.shape == z.shape and out.dtype == torch.float32
        assert rel_err(out, want) < 1e-4  # measured ~1e-6
    assert fn.fallbacks == 0


def test_per_image_timesteps_run_the_eager_unet(tiny_pipe, built):
    """The graph takes one timestep for the whole batch; a (B,) timestep tensor (the eager UNet takes one per image)
    raised 'a Tensor with 2 elements cannot be converted to Scalar'."""
    fn = export.load_forward_backend(tiny_pipe, "onnx", "fp32", built.path.parents[2])
    z, c = unet_inputs(tiny_pipe, 2)
    t = torch.tensor([981, 501])
    with pytest.warns(UserWarning, match=r"one timestep per call; running the eager UNet.*timesteps \(2,\)"):
        out = fn(z, t, c)
    assert fn.fallbacks == 1 and torch.equal(out, eager_eps(tiny_pipe, z, t, c))


# ---------------------------------------------------------------------------------------------------- cache entries

def test_build_records_every_file_and_the_model(tiny_pipe, built):
    meta = export_cache.read_meta(built.path.parent)
    assert meta["model"] == tiny_pipe.fingerprint and meta["precision"] == "fp32"
    files = meta["files"]
    assert set(files) == {"model.onnx", "model.onnx.data"}
    assert all(files[n][0] == (built.path.parent / n).stat().st_size and len(files[n][1]) == 64 for n in files)


def _damage_same_size(folder):
    data = folder / "model.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2:len(blob) // 2 + 4096] = bytes(4096)  # a disk error: same size, other bytes
    data.write_bytes(bytes(blob))


def _truncate(folder):
    data = folder / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])


def _stale_meta(folder):
    meta = json.loads((folder / export_cache.META).read_text())
    meta["model"] = "another-model"  # a folder copied over from another model's entry
    (folder / export_cache.META).write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", [_damage_same_size, _truncate, _stale_meta], ids=["bytes", "truncated", "meta"])
def test_damaged_entry_is_built_again_not_used(tiny_pipe, built, tmp_path, monkeypatch, damage):
    """An entry whose files changed since the build was used as is: ONNX Runtime ran the zeroed weights and returned
    NaN/wrong noise without a word (truncated files failed only inside onnxruntime)."""
    root, folder = _copy_cache(built, tmp_path)
    damage(folder)
    calls = []
    _stub_export(monkeypatch, built, calls)
    export.clear_loaded()
    with pytest.warns(UserWarning, match="is damaged.*building it again"):
        fn = export.load_forward_backend(tiny_pipe, "onnx", "fp32", root)
    assert len(calls) == 1 and fn.built.built and fn.built.path == folder / "model.onnx"
    z, c = unet_inputs(tiny_pipe, 2)
    assert rel_err(fn(z, 981, c), eager_eps(tiny_pipe, z, 981, c)) < 1e-4
    export.clear_loaded()


def test_sound_entry_is_found_without_writing(tiny_pipe, built, tmp_path, monkeypatch):
    """A read-only cache (a shared, pre-built folder) serves its entries: a hit hashes the files once and writes
    nothing; a miss there is a clear error."""
    root, folder = _copy_cache(built, tmp_path)

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(args[0]) if args else None)
    for owner, name in ((Path, "mkdir"), (Path, "write_text"), (Path, "write_bytes"), (shutil, "rmtree"),
                        (export_cache.os, "replace")):
        monkeypatch.setattr(owner, name, refuse)
    for _ in range(2):
        again = export.build_forward_backend(tiny_pipe, "onnx", "fp32", root)
        assert not again.built and again.path == folder / "model.onnx"
    with pytest.raises(NTIError, match="cannot write the export cache.*pass another --export-cache"):
        export.build_forward_backend(tiny_pipe, "onnx", "fp16", root)


def test_full_disk_is_a_clear_error_and_leaves_nothing(tiny_pipe, tmp_path, monkeypatch):
    def export_onnx(component, path, precision):
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(onnx_unet, "export_onnx", export_onnx)
    with pytest.raises(NTIError, match="No space left.*free space there or pass another --export-cache"):
        export.build_forward_backend(tiny_pipe, "onnx", "fp32", tmp_path)
    assert [p.name for p in (tmp_path / "onnx").iterdir()] == []  # no entry, no temp folder


def test_another_model_gets_another_entry(tiny_pipe, built, monkeypatch):
    from nti.models import build_tiny_pipeline

    other = build_tiny_pipeline(seed=1, device="cpu")  # same architecture and shapes, other weights
    assert other.fingerprint != tiny_pipe.fingerprint
    seen = []

    def record(folder, fields, artifact, build):
        seen.append(folder)
        raise NTIError("stop")
    monkeypatch.setattr(export_cache, "cached_build", record)
    for pipe in (tiny_pipe, other):
        with pytest.raises(NTIError, match="stop"):
            export.build_forward_backend(pipe, "onnx", "fp32", built.path.parents[2])
    assert seen[0] == built.path.parent and seen[1] != seen[0]


def test_two_threads_building_one_key(tmp_path):
    """Both threads of one process used the temp folder .KEY.HOST.PID.tmp: the second deleted the first's build."""
    barrier = threading.Barrier(2)
    results, errors = [], []

    def build(tmp):
        (tmp / "a.bin").write_bytes(b"x" * 1000)
        barrier.wait(timeout=30)  # both builds in progress at once
        assert (tmp / "a.bin").read_bytes() == b"x" * 1000

    def worker():
        try:
            results.append(export_cache.cached_build(tmp_path / "onnx" / "unet-k", {"kind": "test"}, "a.bin", build))
        except Exception as err:  # collected: an exception in a thread would not fail the test
            errors.append(err)
    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == 2 and {p for p, _ in results} == {tmp_path / "onnx" / "unet-k" / "a.bin"}
    assert (tmp_path / "onnx" / "unet-k" / "a.bin").read_bytes() == b"x" * 1000
    assert export_cache.damage(tmp_path / "onnx" / "unet-k", {"kind": "test"}, "a.bin") is None
    assert [p.name for p in (tmp_path / "onnx").iterdir()] == ["unet-k"]


# ---------------------------------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("argv, said", [
    (["--kind", "onnx", "--out", "{file}"], "cannot write the export cache"),
    (["--kind", "onnx", "--precision", "fp8", "--out", "{dir}"], "invalid choice: 'fp8'"),
    (["--kind", "aoti", "--max-batch", "33", "--out", "{dir}"], "must be in 1..32"),
    (["--kind", "onnx", "--model", "{dir}/nothing-here", "--out", "{dir}"], "does not exist"),
])
def test_nti_export_bad_input(argv, said, tmp_path, capsys):
    """Exit 2, one line saying what to change, no traceback, and the file --out named untouched."""
    from nti.cli import main

    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    argv = [a.format(file=file, dir=tmp_path) for a in argv]
    try:
        code = main(["export", "--device", "cpu", "--model", "tiny", *argv])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and said in err and "Traceback" not in err, err
    assert file.read_text() == "keep me"


def test_an_export_on_one_gpu_is_not_fed_another_gpus_tensors():
    """The exported UNet's guard compared device types only: cuda:1 latents went to a session loaded on cuda:0."""
    from nti.export import device_key

    assert device_key(torch.device("cuda:1")) != device_key(torch.device("cuda:0"))
    assert device_key("cuda:0") == device_key(torch.device("cuda", 0)) and device_key("cpu") == ("cpu", 0)
    if not torch.cuda.is_available():  # 'cuda' is the current device, cuda:0 on a machine without one
        assert device_key("cuda") == ("cuda", 0)


def test_a_finished_build_is_checked_and_renamed_into_place_under_a_lock(tmp_path, monkeypatch):
    """Between one process's check ('no entry yet') and its clearing of the folder, another process's finished build
    could be renamed into place, and was then deleted. The check, clear and rename now hold an flock that every
    builder of the key takes: another file handle (another process's) cannot take it meanwhile."""
    import fcntl

    folder = tmp_path / "onnx" / "unet-k"
    held = []
    real_replace = os.replace

    def replace(src, dst):
        other = os.open(folder.parent, os.O_RDONLY)
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(other)
        return real_replace(src, dst)

    monkeypatch.setattr(export_cache.os, "replace", replace)
    path, built = export_cache.cached_build(folder, {"kind": "test"}, "a.bin",
                                            lambda tmp: (tmp / "a.bin").write_bytes(b"x"))
    assert built and path.read_bytes() == b"x" and held == [True]
    assert [p.name for p in folder.parent.iterdir()] == ["unet-k"]  # no lock file left beside it
