"""`nti eval` end to end on the tiny model: outputs, resume after an interruption, refusal of mixed settings."""
import csv
import logging
import math

import pytest

import engine.api
from engine.cli import EXIT_BAD_INPUT, main
from engine.evaluate import COLUMNS, SAMPLES
from engine.metrics import CLIP_SKIPPED
from test_metrics import tiny_clip_folder  # noqa: F401  (a fixture: a random tiny CLIP saved to a folder)

FAST = ["--steps", "3", "--inner-steps", "2", "--quiet", "--device", "cpu", "--model", "tiny"]  # photo prompts


def read_samples(out):
    with open(out / SAMPLES, newline="") as f:
        return list(csv.DictReader(f))


def finite(row, columns):
    return all(math.isfinite(float(row[c])) for c in columns)


@pytest.fixture
def count_inversions(monkeypatch):
    """Count images passed to engine.api.invert (what eval must not redo on resume)."""
    calls = []
    real = engine.api.invert

    def counting(pipe, images, prompts, config=None, progress=True):
        calls.extend((p, config.method, config.guidance, config.guidance_schedule) for p in prompts)
        return real(pipe, images, prompts, config, progress)

    monkeypatch.setattr(engine.api, "invert", counting)
    return calls


def test_eval_writes_tables_plots_grids_and_report(tmp_path, capsys, caplog):
    out = tmp_path / "eval"
    with caplog.at_level(logging.WARNING, logger="nti"):
        code = main(["eval", "--out", str(out), "--n", "2", "--methods", "baseline,ddim,null-text",
                     "--guidance-sweep", "1,7.5", "--schedules", "constant,cosine", *FAST])
    stdout = capsys.readouterr().out
    assert code == 0
    assert sum(CLIP_SKIPPED in r.message for r in caplog.records) == 1

    rows = read_samples(out)
    assert len(rows) == 2 * 3 * 2 * 2  # samples x methods x guidance x schedules
    assert len({(r["id"], r["method"], r["guidance"], r["schedule"]) for r in rows}) == len(rows)
    assert list(rows[0]) == list(COLUMNS)
    for row in rows:
        assert finite(row, ["edit_ssim", "edit_psnr", "edit_mse", "edit_s", "invert_s"])
        assert (out / row["edit_png"]).is_file()
        if row["method"] == "baseline":
            assert row["recon_psnr"] == "" and row["recon_png"] == ""
        else:
            assert finite(row, ["recon_ssim", "recon_psnr", "recon_mse", "recon_s"])
            assert (out / row["recon_png"]).is_file()
        iterations = int(row["inner_iterations"])
        assert 0 < iterations <= 3 * 2 if row["method"] == "null-text" else iterations == 0
        assert row["edit_clip_text"] == ""  # no --clip

    with open(out / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 3 * 2 * 2 and all(s["n"] == "2" for s in summary)
    assert all(math.isfinite(float(s["recon_psnr_mean"])) for s in summary if s["method"] != "baseline")
    assert "| null-text | 7.5 | cosine | 2 |" in stdout  # the printed table

    plots = ["metrics.png", "speed_vs_fidelity.png", "schedules.png", "grid_w1_constant.png", "grid_w7.5_cosine.png"]
    for name in plots:
        path = out / "plots" / name
        assert path.is_file() and path.stat().st_size > 1000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "tiny random model" in report and "only check" in report
    assert all(f"plots/{name}" in report for name in plots)
    assert "tiny-0-" in report and "torch" in report and "CLIP: skipped" in report


def test_resume_redoes_only_missing_items(tmp_path, capsys, count_inversions):
    out = tmp_path / "eval"
    argv = ["eval", "--out", str(out), "--methods", "ddim,null-text", *FAST]
    assert main([*argv, "--n", "2"]) == 0
    assert len(count_inversions) == 4
    first = read_samples(out)
    kept_image = out / first[0]["edit_png"]
    stamp = kept_image.stat().st_mtime_ns

    # simulate a kill mid-write: the last finished row is gone and a partial row is left behind
    lines = (out / SAMPLES).read_text().splitlines(keepends=True)
    dropped = dict(zip(COLUMNS, next(csv.reader([lines[-1]]))))
    (out / SAMPLES).write_text("".join(lines[:-1]) + lines[-1][:25])
    count_inversions.clear()
    assert main([*argv, "--n", "3"]) == 0  # a larger --n extends the same run
    redone = {(prompt, method) for prompt, method, _, _ in count_inversions}
    assert len(count_inversions) == 3  # the dropped row + two for the third sample, nothing else
    assert (dropped["source_prompt"], dropped["method"]) in redone

    rows = read_samples(out)
    assert len(rows) == 6 and len({(r["id"], r["method"]) for r in rows}) == 6
    assert rows[:3] == first[:3]  # finished rows kept as they were
    assert kept_image.stat().st_mtime_ns == stamp  # and their images not rewritten

    count_inversions.clear()
    assert main(argv) == 0 and len(count_inversions) == 5 * 2 - 6  # no --n: all five samples, four new items


def test_other_settings_are_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--out", str(out), "--methods", "ddim", "--n", "1", *FAST]
    assert main(argv) == 0
    capsys.readouterr()
    code = main([*argv, "--inner-steps", "1"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    error = [line for line in err.splitlines() if line.startswith("nti: error")]
    assert len(error) == 1 and "different settings" in error[0] and "inner_steps: 2 -> 1" in error[0]
    assert "--overwrite" in error[0] and "Traceback" not in err
    assert main([*argv, "--no-resume"]) == EXIT_BAD_INPUT  # existing results and no resume: refuse too
    assert len(read_samples(out)) == 1

    assert main([*argv, "--inner-steps", "1", "--overwrite"]) == 0
    rows = read_samples(out)
    assert len(rows) == 1 and rows[0]["method"] == "ddim"
    assert '"inner_steps": 1' in (out / "run.json").read_text()


@pytest.mark.parametrize("option, message", [
    (["--methods", "ddim,magic"], "unknown method 'magic'"),
    (["--schedules", "cosine,square"], "unknown schedule 'square'"),
    (["--guidance-sweep", "1,x"], "comma-separated numbers"),
    (["--data", "no/such/folder"], "does not exist"),
])
def test_bad_sweep_exits_2(tmp_path, capsys, option, message):
    assert main(["eval", "--out", str(tmp_path / "eval"), *option, *FAST]) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err


def test_clip_columns_with_a_local_clip(tmp_path, capsys, tiny_clip_folder):  # noqa: F811
    out = tmp_path / "eval"
    assert main(["eval", "--out", str(out), "--methods", "baseline,null-text", "--n", "1", "--clip",
                 str(tiny_clip_folder), *FAST]) == 0
    rows = read_samples(out)
    assert len(rows) == 2
    for row in rows:
        assert finite(row, ["edit_clip_image", "edit_clip_text"]) and -1 <= float(row["edit_clip_text"]) <= 1
    null_text = next(r for r in rows if r["method"] == "null-text")
    assert finite(null_text, ["recon_clip_image", "recon_clip_text"])
    assert str(tiny_clip_folder) in (out / "report.md").read_text()


def test_masks_are_cropped_like_the_image(tmp_path, capsys):
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    outside = np.zeros((40, 60), np.uint8)
    outside[:, :10] = 255  # edited region entirely in the strip the centre crop (columns 10..49) removes
    inside = np.zeros((40, 60), np.uint8)
    inside[10:30, 20:40] = 255
    Image.fromarray(outside).save(tmp_path / "outside.png")
    Image.fromarray(inside).save(tmp_path / "inside.png")
    records = [{"id": name, "image": "wide.png", "mask": f"{name}.png", "source_prompt": "a red car",
                "target_prompt": "a blue car"} for name in ("outside", "inside")]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "eval"
    assert main(["eval", "--data", str(tmp_path), "--out", str(out), "--methods", "ddim", *FAST]) == 0
    rows = {r["id"]: r for r in read_samples(out)}
    for kind in ("recon", "edit"):
        assert float(rows["outside"][f"{kind}_bg_mse"]) == pytest.approx(float(rows["outside"][f"{kind}_mse"]))
        assert float(rows["outside"][f"{kind}_bg_ssim"]) == pytest.approx(float(rows["outside"][f"{kind}_ssim"]))
        assert float(rows["inside"][f"{kind}_bg_mse"]) != pytest.approx(float(rows["inside"][f"{kind}_mse"]))
    assert "edit_bg_ssim" in (out / "report.md").read_text()
