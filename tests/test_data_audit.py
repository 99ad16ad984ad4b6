"""Malformed data sets for `nti eval` and its loaders: each is a clear NTIError (exit 2 on the CLI), never a
traceback, a dropped sample, a misread mask or prompt, or one sample's images written over another's."""
import csv
import io
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from nti.cli import EXIT_BAD_INPUT, main
from nti.config import NTIError
from nti.data import decode_pie_mask, load_dataset, load_genai_bench, load_pie_bench

FAST = ["--n", "2", "--steps", "2", "--inner-steps", "1", "--methods", "ddim", "--quiet", "--device", "cpu",
        "--model", "tiny"]
RECORD = {"image_path": "1/a.jpg", "original_prompt": "a [cat]", "editing_prompt": "a [dog]",
          "editing_instruction": "", "editing_type_id": "1", "blended_word": "", "mask": [512 * 100 + 50, 100]}


def pie_folder(root, mapping, sizes=None):
    """A PIE-Bench folder with `mapping` (a dict, or the mapping file's exact text or bytes); each record's
    image_path, if text, is written as a JPEG of sizes[path] (default 512x512)."""
    records = mapping.values() if isinstance(mapping, dict) else []
    names = {r["image_path"] for r in records if isinstance(r, dict) and isinstance(r.get("image_path"), str)
             and r["image_path"]}
    for name in names | set(sizes or {}):
        (root / "annotation_images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (sizes or {}).get(name, (512, 512)), (30, 90, 150)).save(root / "annotation_images" / name)
    text = json.dumps(mapping) if isinstance(mapping, dict) else mapping
    (root / "mapping_file.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    return root


def run_cli(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


# --- PIE-Bench ---------------------------------------------------------------------------------------------------


def test_pie_duplicate_ids_are_refused_not_dropped(tmp_path):
    # json.loads keeps the last of two equal keys: one of the two samples would vanish without a word
    first, second = json.dumps(RECORD), json.dumps(dict(RECORD, image_path="1/b.jpg"))
    pie_folder(tmp_path, f'{{"000": {first}, "000": {second}}}', sizes={"1/a.jpg": (512, 512), "1/b.jpg": (512, 512)})
    with pytest.raises(NTIError, match="'000' twice"):
        load_pie_bench(tmp_path)


@pytest.mark.parametrize("field, value, says", [
    ("original_prompt", None, "original_prompt must be text"),
    ("editing_prompt", 5, "editing_prompt must be text"),
    ("editing_prompt", " [ ] ", "editing_prompt is empty"),
    ("image_path", 3, "image_path must be"),
    ("image_path", "", "image_path must be"),
])
def test_pie_fields_of_the_wrong_kind_are_refused(tmp_path, field, value, says):
    pie_folder(tmp_path, {"000": dict(RECORD, **{field: value})}, sizes={"1/a.jpg": (512, 512)})
    with pytest.raises(NTIError, match=f"entry 000.*{says}"):
        load_pie_bench(tmp_path)


@pytest.mark.parametrize("code", [[10.7, 20.2], ["10", "20"], [[10, 20], [30, 5]], [0, 10 ** 30]])
def test_pie_mask_code_that_is_not_whole_numbers_is_refused(tmp_path, code):
    # PnPInversion's mask_decode indexes with these numbers: floats, text or pairs in lists stop it; ours must
    # not truncate or flatten them into another mask
    with pytest.raises(NTIError, match="flat list of whole numbers"):
        decode_pie_mask(code)
    pie_folder(tmp_path, {"000": dict(RECORD, mask=code)})
    with pytest.raises(NTIError, match="entry 000 has a bad mask"):
        load_pie_bench(tmp_path)


def test_pie_mask_code_still_reads_as_pnpinversion_does():
    mask = decode_pie_mask(np.array([3, 2, 14, 10]), shape=(4, 4))  # an int array, a run clipped at the end
    assert mask.ravel().nonzero()[0].tolist() == [3, 4, 14, 15]
    assert not decode_pie_mask([], shape=(4, 4)).any()


def test_pie_mapping_with_a_byte_order_mark_loads_and_other_encodings_name_utf8(tmp_path):
    pie_folder(tmp_path, b"\xef\xbb\xbf" + json.dumps({"000": RECORD}).encode(), sizes={"1/a.jpg": (512, 512)})
    assert [s.source_prompt for s in load_pie_bench(tmp_path)] == ["a cat"]
    latin = json.dumps({"000": dict(RECORD, original_prompt="a caf\u00e9")}, ensure_ascii=False).encode("latin-1")
    pie_folder(tmp_path, latin)
    with pytest.raises(NTIError, match="not UTF-8.*save it as UTF-8"):
        load_pie_bench(tmp_path)


# --- GenAI-Bench -------------------------------------------------------------------------------------------------


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buffer, "PNG")
    return buffer.getvalue()


def _genai_parquet(path, column, values):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    cells = {"source_prompt": ["a cat", "a cow"], "target_prompt": ["a dog", "a dog"],
             "instruct_prompt": ["make it a dog"] * 2, "source_image": [_png(), _png()], column: values}
    pq.write_table(pa.table(cells), path)
    return path


@pytest.mark.parametrize("column, values", [("source_prompt", ["a cat", None]), ("target_prompt", ["a dog", "  "])])
def test_genai_rows_without_a_prompt_are_skipped_with_a_warning(tmp_path, caplog, column, values):
    """An empty prompt used to run as "" (another experiment than the row's): the row is left out, and said so."""
    import logging

    with caplog.at_level(logging.WARNING, logger="nti"):
        samples = load_genai_bench(_genai_parquet(tmp_path / "genai.parquet", column, values))
    assert [s.source_prompt for s in samples] == ["a cat"]
    assert [r.getMessage() for r in caplog.records] == [
        "genai.parquet: 1 row(s) with an empty source_prompt or target_prompt skipped (rows 1)"]


def test_genai_prompts_that_are_not_text_are_refused(tmp_path):
    with pytest.raises(NTIError, match="row 0: source_prompt must be text"):
        load_genai_bench(_genai_parquet(tmp_path / "genai.parquet", "source_prompt", [7, 8]))


# --- prompts JSONL -----------------------------------------------------------------------------------------------


def test_jsonl_mask_that_is_a_folder_is_named_as_one(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "masks").mkdir()
    line = {"image": "a.png", "mask": "masks", "source_prompt": "a", "target_prompt": "b"}
    (tmp_path / "prompts.jsonl").write_text(json.dumps(line))
    with pytest.raises(NTIError, match="line 1: mask .*masks is not a file"):
        load_dataset(tmp_path)


# --- nti eval ----------------------------------------------------------------------------------------------------


def test_eval_refuses_a_mask_shaped_unlike_its_image(tmp_path, capsys):
    # a 20x40 mask over a 40x20 photo would be stretched onto it: every background score over the wrong pixels
    Image.new("RGB", (40, 20), (9, 9, 9)).save(tmp_path / "a.png")
    Image.new("L", (20, 40), 255).save(tmp_path / "tall.png")
    line = {"image": "a.png", "mask": "tall.png", "source_prompt": "a dark photo", "target_prompt": "a red photo"}
    (tmp_path / "prompts.jsonl").write_text(json.dumps(line))
    code, err = run_cli(["eval", "--data", str(tmp_path), "--out", str(tmp_path / "out"), *FAST], capsys)
    assert code == EXIT_BAD_INPUT and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("nti: error: sample a: its mask is 20x40 but its image 40x20")
    # a PIE-Bench mask indexes a 512x512 image: a 768x512 photo in its folder is refused the same way
    pie = pie_folder(tmp_path / "pie", {"000": RECORD}, sizes={"1/a.jpg": (768, 512)})
    code, err = run_cli(["eval", "--data", str(pie), "--out", str(tmp_path / "out2"), *FAST], capsys)
    assert code == EXIT_BAD_INPUT and "its mask is 512x512 but its image 768x512" in err


def test_eval_gives_each_sample_its_own_image_folder(tmp_path, capsys):
    # 'a/b' and 'a_b' (and two ids of CJK letters) made the same safe folder name: the second sample's
    # reconstruction and edit were written over the first's, and both rows named the same PNGs
    colours = {"a.png": (250, 10, 10), "b.png": (10, 250, 10), "c.png": (10, 10, 250), "d.png": (250, 250, 10)}
    for name, colour in colours.items():
        Image.new("RGB", (32, 32), colour).save(tmp_path / name)
    ids = {"a.png": "a/b", "b.png": "a_b", "c.png": "\u732b", "d.png": "\u72ac"}
    lines = [{"image": name, "id": ids[name], "source_prompt": "a photo", "target_prompt": "a painting"}
             for name in colours]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, err = run_cli(["eval", "--data", str(tmp_path), "--out", str(out), *FAST, "--n", "4"], capsys)
    assert code == 0, err
    # the CJK ids label the grid's rows: no raw matplotlib warning (file, line, source) per missing glyph
    assert not [w for w in caught if "Glyph" in str(w.message)]
    with open(out / "samples.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and len({row["edit_png"] for row in rows}) == 4
    for row in rows:
        name = next(n for n, i in ids.items() if i == row["id"])
        folder = (out / row["edit_png"]).parent
        assert folder.parent == out / "images"
        source = np.asarray(Image.open(folder / "source.png").convert("RGB"), dtype=int)
        assert np.abs(source - np.array(colours[name])).max() <= 2, row["id"]


def test_eval_refuses_an_empty_out(tmp_path, monkeypatch, capsys):
    # Path('') is the current folder: an unset $OUT in a script would spill results into wherever it ran
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["eval", "--out", "", *FAST], capsys)
    assert code == EXIT_BAD_INPUT and "--out is empty" in err
    assert list(tmp_path.iterdir()) == []
    # and `--out=~/results` (no shell expands that ~) is the home folder's, as every other path option takes it
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    code, err = run_cli(["eval", "--out=~/results", *FAST, "--n", "1"], capsys)
    assert code == 0, err
    assert (tmp_path / "home" / "results" / "samples.csv").is_file() and not (tmp_path / "~").exists()


# --- nti export --------------------------------------------------------------------------------------------------


def test_export_build_removes_temp_folders_of_killed_builds(tmp_path):
    # a build killed mid-way (SIGKILL, out of memory) left its hidden temp folder for ever: never served, never
    # removed, GBs for an SD UNet. The next build removes those of dead processes, not of live ones
    import os
    import socket
    import subprocess
    import sys
    import time

    from nti.export import cache

    folder = tmp_path / "onnx" / "unet-fp32-abc"
    folder.parent.mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    prefix = f".{folder.name}.{socket.gethostname()}."
    dead, alive = folder.parent / f"{prefix}{gone.stdout.strip()}.tmp", folder.parent / f"{prefix}{os.getppid()}.tmp"
    other_key = folder.parent / f".unet-fp16-def.{socket.gethostname()}.{gone.stdout.strip()}.tmp"
    recent = folder.parent / f".unet-fp16-ghi.{socket.gethostname()}.{gone.stdout.strip()}.tmp"
    for tmp in (dead, alive, other_key, recent):
        tmp.mkdir()
        (tmp / "model.onnx").write_bytes(b"half")
        if tmp != recent:  # a recent one may be a live build of another pid namespace on this disk: kept
            old = time.time() - cache.DEAD_BUILD_AGE_S - 60
            os.utime(tmp, (old, old))
    path, built = cache.cached_build(folder, {"kind": "test"}, "model.onnx",
                                     lambda tmp: (tmp / "model.onnx").write_bytes(b"x"))
    assert built and path.read_bytes() == b"x"
    assert not dead.exists() and not other_key.exists() and alive.is_dir() and recent.is_dir()
