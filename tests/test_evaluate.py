"""`nti eval` end to end on the tiny and shapes models: both protocols' outputs, resume after an interruption,
refusal of mixed settings, the scene oracle's column."""
import csv
import logging
import math

import pytest

import nti.api
from nti.cli import EXIT_BAD_INPUT, main
from nti.evaluate import PIE_BENCH, SAMPLES, SEED
from nti.metrics import CLIP_SKIPPED
# fixtures: random tiny CLIP / LPIPS (SqueezeNet) / DINO ViT saved to folders
from test_metrics import tiny_clip_folder, tiny_dino_folder, tiny_lpips_folder  # noqa: F401
from test_metrics import write_pie_folder

FAST = ["--steps", "3", "--inner-steps", "2", "--quiet", "--device", "cpu", "--model", "tiny"]  # photo prompts


def read_samples(out):
    with open(out / SAMPLES, newline="") as f:
        return list(csv.DictReader(f))


def finite(row, columns):
    return all(math.isfinite(float(row[c])) for c in columns)


@pytest.fixture
def count_inversions(monkeypatch):
    """Count images passed to nti.api.invert (what eval must not redo on resume)."""
    calls = []
    real = nti.api.invert

    def counting(pipe, images, prompts, config=None, progress=True):
        calls.extend((p, config.method, config.guidance, config.guidance_schedule) for p in prompts)
        return real(pipe, images, prompts, config, progress)

    monkeypatch.setattr(nti.api, "invert", counting)
    return calls


def test_eval_writes_tables_plots_grids_and_report(tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--out", str(out), "--n", "2", "--methods", "baseline,ddim,null-text",
                 "--guidance-sweep", "1,7.5", "--schedules", "constant,cosine", *FAST])
    stdout, stderr = capsys.readouterr()
    assert code == 0
    # what the user sees: one warning line on stderr (the CLI's 'nti' logger does not propagate to pytest's caplog)
    assert stderr.count(CLIP_SKIPPED) == 1

    rows = read_samples(out)
    assert len(rows) == 2 * 3 * 2 * 2  # samples x methods x guidance x schedules
    assert len({(r["id"], r["method"], r["guidance"], r["schedule"]) for r in rows}) == len(rows)
    assert list(rows[0]) == list(SEED.columns)
    for row in rows:
        assert finite(row, ["edit_ssim_global", "edit_ssim_windowed", "edit_psnr", "edit_mse", "edit_s", "invert_s"])
        assert (out / row["edit_png"]).is_file()
        if row["method"] == "baseline":
            assert row["recon_psnr"] == "" and row["recon_png"] == ""
        else:
            assert finite(row, ["recon_ssim_global", "recon_ssim_windowed", "recon_psnr", "recon_mse", "recon_s"])
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
    assert "schedules: constant, cosine (cosine: w decays to guidance_min = 1)" in report
    assert "`ssim_global`: **the seed report's SSIM (its Algorithm 1)**" in report
    assert "| recon_psnr | recon_ssim_global |" in report and "windowed SSIM, not the seed report's" in report


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
    dropped = dict(zip(SEED.columns, next(csv.reader([lines[-1]]))))
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


def test_a_kill_while_resume_rewrites_samples_loses_no_row(tmp_path, monkeypatch):
    """Resume rewrites samples.csv without its cut-off last row; a Ctrl-C during that rewrite must leave the old
    file, not a truncated one (the rewrite goes through a temp file and a rename)."""
    from nti.evaluate import read_rows
    path = tmp_path / SAMPLES
    rows = [dict.fromkeys(SEED.columns, str(k)) for k in range(3)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, SEED.columns)
        writer.writeheader()
        writer.writerows(rows)
    before = path.read_bytes() + b"cut,off"
    path.write_bytes(before)

    def interrupted(self, rows):
        self.writerow(next(iter(rows)))
        raise KeyboardInterrupt
    monkeypatch.setattr(csv.DictWriter, "writerows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        read_rows(path, SEED.columns)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [SAMPLES]  # no temp file left
    monkeypatch.undo()
    assert read_rows(path, SEED.columns) == rows and path.read_bytes() == before[:-len(b"cut,off")]


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


def test_a_resume_under_another_engine_version_is_refused(tmp_path, capsys, monkeypatch):
    """Rows made by another release of nti (or of torch/diffusers under it) may differ in their numbers: a resume
    that would table them beside this release's rows is refused, naming the versions (they were not compared)."""
    import nti.version

    out = tmp_path / "eval"
    argv = ["eval", "--out", str(out), "--methods", "ddim", "--n", "1", *FAST]
    monkeypatch.setattr(nti.version, "__version__", "0.0.1")
    assert main(argv) == 0
    capsys.readouterr()
    monkeypatch.setattr(nti.version, "__version__", "0.0.2")
    assert main([*argv, "--n", "1"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "different settings" in err and "'nti-engine': '0.0.1'" in err and "'nti-engine': '0.0.2'" in err
    assert len(read_samples(out)) == 1


@pytest.mark.parametrize("option, message", [
    (["--methods", "ddim,magic"], "unknown method 'magic'"),
    (["--schedules", "cosine,square"], "unknown schedule 'square'"),
    (["--guidance-sweep", "1,x"], "comma-separated numbers"),
    (["--data", "no/such/folder"], "does not exist"),
])
def test_bad_sweep_exits_2(tmp_path, capsys, option, message):
    assert main(["eval", "--out", str(tmp_path / "new" / "eval"), *option, *FAST]) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # refused: no empty --out folder (nor its new parent) left behind


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(tmp_path, capsys):
    """Two runs into one --out appended the same rows twice to samples.csv and wrote over each other's report."""
    import os

    from nti.cache import Claim
    from nti.evaluate import EVAL_LOCK

    out = tmp_path / "eval"
    argv = ["eval", "--out", str(out), "--methods", "ddim", "--n", "1", *FAST]
    assert main(argv) == 0
    assert not (out / EVAL_LOCK).exists()  # released with the run
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    running = Claim(out / EVAL_LOCK)  # the first run, still working (flock: another open file, so another owner)
    assert running.try_acquire()
    try:
        assert main([*argv, "--n", "2"]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert f"in use by another nti eval run (process {os.getpid()})" in err and "Traceback" not in err
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != EVAL_LOCK} == before
    finally:
        running.release()
    assert main([*argv, "--n", "2"]) == 0  # once it is done, the resume runs
    assert len(read_samples(out)) == 2


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


def test_a_named_metric_folder_without_its_model_exits_2_before_any_work(tmp_path, capsys, monkeypatch):
    import nti.models

    monkeypatch.setattr(nti.models, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded first"))
    cases = [("--clip", "seed")]
    try:
        import torchmetrics  # noqa: F401
        cases.append(("--dino", "pie-bench"))
    except ImportError:
        pass
    for flag, protocol in cases:
        out = tmp_path / flag.strip("-")
        code = main(["eval", "--out", str(out), "--protocol", protocol, flag, str(tmp_path / "typo"), *FAST])
        assert code == EXIT_BAD_INPUT and not out.exists()
        assert f"{flag} {tmp_path / 'typo'}: " in capsys.readouterr().err


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
        assert float(rows["outside"][f"{kind}_bg_ssim_windowed"]) == pytest.approx(
            float(rows["outside"][f"{kind}_ssim_windowed"]))
        assert float(rows["inside"][f"{kind}_bg_mse"]) != pytest.approx(float(rows["inside"][f"{kind}_mse"]))
    report = (out / "report.md").read_text()
    assert "edit_bg_ssim_windowed" in report
    assert "schedules: constant\n" in report and "decay" not in report  # no decaying schedule to speak of


def test_wide_samples_are_named_then_counted(tmp_path, capsys):
    """A data set of 3:1 photos: the model rates only their centre squares, and the user is told which and how many
    (the first CROP_WARNINGS_SHOWN in full, the rest in one line), as the CLI's invert and edit warn per image."""
    import json

    import numpy as np
    from PIL import Image

    from nti.evaluate import CROP_WARNINGS_SHOWN

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 60, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "square.png")
    n_wide = CROP_WARNINGS_SHOWN + 2
    records = [{"id": f"w{k}", "image": "wide.png", "source_prompt": "a red car", "target_prompt": "a blue car"}
               for k in range(n_wide)]
    records.append({"id": "sq", "image": "square.png", "source_prompt": "a red car", "target_prompt": "a blue car"})
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert main(["eval", "--data", str(tmp_path), "--out", str(tmp_path / "eval"), "--methods", "ddim", *FAST]) == 0
    stderr = capsys.readouterr().err
    named = [k for k in range(n_wide) if f"sample w{k} is 60x20: the model sees only its centre 20x20" in stderr]
    assert named == list(range(CROP_WARNINGS_SHOWN)) and "sample sq" not in stderr
    assert f"{n_wide} of {n_wide + 1} samples lost over half of their image to the centre crop or were upscaled" in stderr
    assert len(read_samples(tmp_path / "eval")) == n_wide + 1  # warned, and scored all the same


def _pie_background_psnr(source, edit, mask512) -> float:
    """PIE-Bench's background PSNR written out: the 512 px mask brought to the image size (nearest), its 1-pixel
    border marked edited, the edited region zeroed in both images, MSE over the whole image."""
    import numpy as np
    from PIL import Image

    side = source.shape[0]
    mask = np.asarray(Image.fromarray(mask512).resize((side, side), Image.Resampling.NEAREST)).astype(bool)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    keep = ~mask[..., None]
    error = ((source / 255.0 * keep - edit / 255.0 * keep) ** 2).mean()
    return 10 * math.log10(1 / error)


def test_pie_bench_protocol_end_to_end(tmp_path, capsys, caplog, count_inversions, tiny_clip_folder,  # noqa: F811
                                      tiny_lpips_folder, tiny_dino_folder):  # noqa: F811
    pytest.importorskip("torchmetrics")
    import numpy as np
    from PIL import Image

    from nti.data import load_pie_bench

    data = tmp_path / "pie"
    write_pie_folder(data)
    out = tmp_path / "eval"
    argv = ["eval", "--protocol", "pie-bench", "--data", str(data), "--out", str(out), "--methods", "ddim",
            "--clip", str(tiny_clip_folder), "--lpips", str(tiny_lpips_folder), "--dino", str(tiny_dino_folder),
            *FAST]
    with caplog.at_level(logging.WARNING, logger="nti"):
        assert main(argv) == 0
    assert not [r for r in caplog.records if "skipped" in r.message]  # every model was found
    stdout = capsys.readouterr().out
    table_head = ("| method | guidance | schedule | n | structure distance ×10³ ↓ | PSNR ↑ | LPIPS ×10³ ↓ | "
                  "MSE ×10⁴ ↓ | SSIM ×10² ↑ | CLIP whole ↑ | CLIP edited ↑ |")
    assert table_head in stdout

    rows = read_samples(out)
    assert list(rows[0]) == list(PIE_BENCH.columns) and len(rows) == 2
    assert [r["edit_type"] for r in rows] == ["1 change object", "6 change color"]
    pie = ["structure_distance", "bg_psnr", "bg_lpips", "bg_mse", "bg_ssim", "clip_whole", "clip_edited"]
    for row in rows:
        assert finite(row, [f"{kind}_{m}" for kind in ("recon", "edit") for m in pie])
        assert row["edit_oracle"] == ""  # not the shapes model
        # the edit's background PSNR, recomputed from the saved images and the PIE-Bench mask
        sample = next(s for s in load_pie_bench(data) if s.id == row["id"])
        source = np.asarray(Image.open(out / "images" / row["id"] / "source.png"), dtype=np.float64)
        edit = np.asarray(Image.open(out / row["edit_png"]), dtype=np.float64)
        mask = sample.mask.astype(np.uint8) * 255
        assert float(row["edit_bg_psnr"]) == pytest.approx(_pie_background_psnr(source, edit, mask), abs=1e-3)

    report = (out / "report.md").read_text()
    assert "(pie-bench protocol)" in report and table_head in report
    assert "## Edits by editing type" in report and "| 6 change color | 1 |" in report
    assert str(tiny_dino_folder) in report and "squeezenet1_1-b8a52dc0.pth" in report
    assert (out / "plots" / "metrics.png").is_file()

    count_inversions.clear()
    assert main(argv) == 0 and count_inversions == []  # resumed: every row is already there
    assert len(read_samples(out)) == 2
    capsys.readouterr()
    assert main([*argv[:2], "seed", *argv[3:]]) == EXIT_BAD_INPUT  # another protocol: other columns, refused
    assert "protocol: 'pie-bench' -> 'seed'" in capsys.readouterr().err


def test_shapes_model_report_has_the_oracle_and_n_spreads_over_scenes(tmp_path, capsys):
    """The default model on its bundled scenes: `--n 2` takes two different scenes, and the scene oracle grades
    every output (1 = it reads the output as its prompt)."""
    from PIL import Image

    from nti.testbed.scenes import read_scene

    out = tmp_path / "eval"
    assert main(["eval", "--out", str(out), "--n", "2", "--methods", "ddim", "--steps", "3", "--quiet",
                 "--device", "cpu"]) == 0
    rows = read_samples(out)
    assert [r["id"] for r in rows] == ["scene0-colour", "scene1-colour"]
    assert rows[0]["recon_psnr"] != rows[1]["recon_psnr"]  # two inversions, not one reused
    for row in rows:
        for kind, prompt in (("recon", row["source_prompt"]), ("edit", row["target_prompt"])):
            with Image.open(out / row[f"{kind}_png"]) as image:
                assert float(row[f"{kind}_oracle"]) == float(read_scene(image).matches(prompt))
    report = (out / "report.md").read_text()
    assert "edit_oracle" in report and "scene oracle" in report


def test_close_guidance_weights_keep_their_own_images_and_rows(tmp_path, capsys):
    """7.5 and 7.5000001 are two settings of one sweep: each keeps its own edit PNGs, grid and table row (the names
    used `{w:g}`, which prints both as 7.5, so the second setting's images overwrote the first's)."""
    out = tmp_path / "eval"
    code = main(["eval", "--out", str(out), "--n", "1", "--methods", "ddim", "--guidance-sweep", "7.5,7.5000001",
                 *FAST])
    stdout = capsys.readouterr().out
    assert code == 0
    rows = read_samples(out)
    assert sorted(float(r["guidance"]) for r in rows) == [7.5, 7.5000001]
    pngs = [r["edit_png"] for r in rows]
    assert len(set(pngs)) == 2 and all((out / p).is_file() for p in pngs)
    assert "| ddim | 7.5 |" in stdout and "| ddim | 7.5000001 |" in stdout
    assert {p.name for p in (out / "plots").glob("grid_*.png")} >= {"grid_w7.5_constant.png",
                                                                    "grid_w7.5000001_constant.png"}


def test_pie_bench_p2p_edits_take_each_samples_blended_word(tmp_path, capsys):
    """PnPInversion's P2P runs behind the published PIE-Bench table blend each sample's blended_word "SRC TGT" (SRC
    in the source prompt, TGT in the target) and reweight TGT x2; the eval did neither (one config for every sample
    has no per-sample words). Now a p2p edit takes them (--no-sample-words leaves them out), run.json says which,
    and a blended_word that is not two words is exit 2 naming the sample."""
    import json

    from nti.evaluate import sample_words
    from nti.p2p import SampleWords

    data = tmp_path / "pie"
    mapping = write_pie_folder(data)
    first, second = list(mapping)
    mapping[first]["blended_word"], mapping[second]["blended_word"] = "astronaut cat", "coffee tea"
    (data / "mapping_file.json").write_text(json.dumps(mapping))
    common = ["eval", "--data", str(data), "--methods", "ddim", "--edit", "p2p-refine", "--blend-threshold", "0.9",
              "--blend-start", "0", *FAST]
    assert main([*common, "--out", str(tmp_path / "words")]) == 0
    assert main([*common, "--out", str(tmp_path / "none"), "--no-sample-words"]) == 0
    capsys.readouterr()
    with_words, without = read_samples(tmp_path / "words"), read_samples(tmp_path / "none")
    for a, b in zip(with_words, without):
        assert (tmp_path / "words" / a["edit_png"]).read_bytes() != (tmp_path / "none" / b["edit_png"]).read_bytes()
        assert a["recon_psnr"] == b["recon_psnr"]  # the reconstruction has no words
    settings = [json.loads((tmp_path / o / "run.json").read_text())["settings"] for o in ("words", "none")]
    assert [s["sample_words"] for s in settings] == [True, False]

    class Sample:
        id, meta = "x", {"blended_word": "astronaut cat"}
    p2p, regenerate = nti.NTIConfig(edit="p2p-refine"), nti.NTIConfig()
    assert sample_words(Sample, p2p, True) == SampleWords(("astronaut",), ("cat",), (("cat", 2.0),))
    assert sample_words(Sample, regenerate, True) is None and sample_words(Sample, p2p, False) is None
    mapping[first]["blended_word"] = "astronaut"
    (data / "mapping_file.json").write_text(json.dumps(mapping))
    assert main([*common, "--out", str(tmp_path / "bad")]) == EXIT_BAD_INPUT
    assert "blended_word must be two words" in capsys.readouterr().err


def test_sample_words_cross_to_ray_actors_as_json():
    """`nti eval --ray` sends each sample's words to the actors inside its chunk's JSON: they come back equal."""
    import dataclasses
    import json

    from nti.distributed import sample_words_of
    from nti.p2p import SampleWords

    words = SampleWords(("astronaut",), ("cat",), (("cat", 2.0),))
    assert sample_words_of(json.loads(json.dumps(dataclasses.asdict(words)))) == words
    assert sample_words_of(None) is None


def test_the_summary_table_prints_on_a_stdout_that_cannot_write_its_signs(tmp_path):
    """On an ASCII or Latin-1 stdout the table's '±' raised UnicodeEncodeError after every file was written: exit 1,
    'internal error'. It prints, the signs in ASCII; an output path's characters come out escaped, not as a crash."""
    import os
    import subprocess
    import sys

    out = tmp_path / "eval"
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "nti.cli", "eval", "--out", str(out), "--methods", "ddim", "--n",
                           "2", *FAST], env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert b" +/- " in done.stdout and "±" in (out / "report.md").read_text(encoding="utf-8")
    assert read_samples(out) and (out / "summary.csv").is_file()


def test_stdout_writes_what_its_encoding_lacks_without_failing():
    """The handler main() puts on stdout: an undecodable file-name byte goes out as that byte (the name a script
    reads back is the file's), the table's signs in ASCII, other characters as escapes."""
    from nti.cli import STDOUT_ERRORS

    line = "out/caf\u00e9-\udce9.png 1.5 ± 0.2 ×"
    assert line.encode("ascii", STDOUT_ERRORS) == b"out/caf\\xe9-\xe9.png 1.5 +/- 0.2 x"
    assert line.encode("latin-1", STDOUT_ERRORS) == b"out/caf\xe9-\xe9.png 1.5 \xb1 0.2 \xd7"  # all it has
