"""Audit of `nti eval`'s aggregation and reporting: summary.csv recomputed from samples.csv in plain Python, the
markdown and PIE-Bench tables against summary.csv, the speed plot's points, CSV round trips of awkward text, sample
folders of unsafe ids, and what the data set must pass before any work. Hand-made samples.csv files, except the few
runs of the tiny model at the end."""
import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from nti.cli import EXIT_BAD_INPUT, main
from nti.evaluate import append_rows, check_rows_match, read_rows, row_key, sample_folder
from nti.report import SAMPLES, SUMMARY, write_outputs
from nti.scoring import KEY, PIE_BENCH, PIE_TABLE, SEED

TEXT = (*KEY, "edit_type", "source_prompt", "target_prompt", "recon_png", "edit_png")  # not averaged
FAST = ["--steps", "3", "--inner-steps", "2", "--quiet", "--device", "cpu", "--model", "tiny"]


def manifest(protocol) -> dict:
    """The run.json fields write_outputs reads."""
    return {"settings": {"protocol": protocol.name, "data": "hand-made", "model": "m", "model_fingerprint": "f",
                         "device": "cpu", "clip": None, "lpips": None, "dino": None},
            "environment": {"machine": "x86_64", "platform": "linux", "commit": None, "versions": {"torch": "2"}},
            "config": {"guidance_min": 1.0, "steps": 3, "inner_steps": 2, "early_stop": True, "lr": 0.01, "seed": 0,
                       "backend": "reference", "precision": "fp32", "batch_size": 1},
            "command": "nti eval", "updated": "2026-01-01T00:00:00+00:00"}


def row(sample_id, method="ddim", guidance=7.5, schedule="constant", **values) -> dict:
    """A samples.csv row as score_chunk makes one (prompts, timings and image paths filled in)."""
    folder = sample_folder(sample_id)
    stem = f"{folder}/{method}_w{guidance:g}_{schedule}"
    return {"id": sample_id, "method": method, "guidance": repr(float(guidance)), "schedule": schedule,
            "source_prompt": "a cat", "target_prompt": "a dog", "invert_s": 2.0, "recon_s": 1.0, "edit_s": 1.0,
            "inner_iterations": 0, "recon_png": None if method == "baseline" else f"{stem}_recon.png",
            "edit_png": f"{stem}_edit.png", **values}


def write_samples(out: Path, protocol, rows) -> None:
    """samples.csv through the engine's own writer (a header, then the rows)."""
    out.mkdir(parents=True, exist_ok=True)
    append_rows(out / SAMPLES, protocol.columns, [], header=True)
    append_rows(out / SAMPLES, protocol.columns, rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def number(text: str) -> float | None:
    """A CSV cell as a value to average: None when empty or NaN (left out of the means)."""
    if text == "":
        return None
    value = float(text)
    return None if math.isnan(value) else value


def recompute(samples: list[dict], by: tuple[str, ...] = ()) -> dict:
    """summary.csv written out in plain Python: per (method, guidance, schedule, *by), n = rows, and each numeric
    column's mean and sample std (n - 1) over the rows with a value; std None below two values."""
    groups = defaultdict(list)
    for r in samples:
        groups[(r["method"], float(r["guidance"]), r["schedule"], *(r[b] for b in by))].append(r)
    out = {}
    for key, rows in groups.items():
        stats = {"n": len(rows)}
        for r in rows:
            r["s_per_sample"] = str(float(r["invert_s"]) + float(r["edit_s"]))
        columns = [c for c in rows[0] if c not in TEXT]
        for c in columns:
            values = [v for v in (number(r[c]) for r in rows) if v is not None]
            if values:
                stats[f"{c}_mean"] = statistics.fmean(values)
                stats[f"{c}_std"] = statistics.stdev(values) if len(values) > 1 else None
                stats[f"{c}_count"] = len(values)
        out[key] = stats
    return out


def sweep_rows() -> list[dict]:
    """A 2 methods x 2 weights x 2 schedules sweep over three samples, with holes: a metric with no value in one
    setting, empty and NaN cells, one setting run on a single sample, a baseline without reconstruction."""
    rows = []
    for k, sample_id in enumerate(("s0", "s1", "s2")):
        for method in ("baseline", "null-text"):
            for g in (1.0, 7.5):
                for schedule in ("constant", "cosine"):
                    if (method, g, schedule) == ("null-text", 1.0, "cosine") and k > 0:
                        continue  # run on one sample only: n = 1, no std
                    base = 10 * g + (3 if schedule == "cosine" else 0) + k * 1.25
                    values = {"edit_psnr": base, "edit_ssim_global": 0.5 + 0.125 * k,
                              "edit_mse": float("nan") if k == 1 else 0.001 * (k + 1), "inner_iterations": 5 * k,
                              "invert_s": 0.0 if method == "baseline" else 3.0 + k, "edit_s": 0.5 + k}
                    if method != "baseline":
                        values |= {"recon_psnr": 30 + k * 0.5 + g, "recon_ssim_global": 0.9 - 0.01 * k}
                    if k != 2:
                        values["edit_bg_psnr"] = 20.0 + k  # sample s2 has no mask
                    rows.append(row(sample_id, method, g, schedule, **values))
    return rows


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory):
    """The sweep's samples.csv through write_outputs once (plots are slow): its folder, the printed table and the
    figures by file name."""
    import nti.report

    out = tmp_path_factory.mktemp("seed") / "eval"
    write_samples(out, SEED, sweep_rows())
    figures = {}
    real = nti.report.save_figure
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nti.report, "save_figure", lambda fig, path: (figures.__setitem__(path.name, fig),
                                                                    real(fig, path)))
        printed = write_outputs(out, manifest(SEED), "m")
    return out, printed, figures


def test_summary_csv_is_samples_csv_recomputed(seed_run):
    """Every summary.csv cell is the plain-Python mean / sample std of samples.csv's cells with a value (empty and
    NaN cells left out), n counts the rows of the setting, and a single value has an empty std (NaN, not 0)."""
    out = seed_run[0]
    expected = recompute(read_csv(out / SAMPLES))
    summary = read_csv(out / SUMMARY)
    assert len(summary) == len(expected) == 8
    # sorted as EVAL_METHODS, then guidance, then schedules in GUIDANCE_SCHEDULES' order
    assert [(s["method"], float(s["guidance"]), s["schedule"]) for s in summary] == sorted(
        expected, key=lambda k: (k[0] != "baseline", k[1], k[2] != "constant"))
    for s in summary:
        want = expected[(s["method"], float(s["guidance"]), s["schedule"])]
        got = {c: v for c, v in s.items() if c not in ("method", "guidance", "schedule") and v != ""}
        for c in [c for c, v in got.items() if c.endswith("_count") and v == "0"]:  # no value in this setting
            assert got.pop(c) and s[c.removesuffix("_count") + "_mean"] == ""
        assert set(got) == {c for c, v in want.items() if v is not None}, s["method"]
        assert int(got.pop("n")) == want["n"]
        for c, v in got.items():
            assert float(v) == pytest.approx(want[c], rel=1e-12, abs=1e-15), (s["method"], c)
    single = next(s for s in summary if (s["method"], s["guidance"], s["schedule"]) == ("null-text", "1.0", "cosine"))
    assert single["n"] == "1" and single["edit_psnr_mean"] != "" and single["edit_psnr_std"] == ""
    baseline = next(s for s in summary if s["method"] == "baseline")
    assert "recon_psnr_mean" not in baseline or baseline["recon_psnr_mean"] == ""  # no reconstruction to average
    assert float(baseline["s_per_sample_mean"]) == pytest.approx(statistics.fmean([0.5, 1.5, 2.5]))


def table(text: str, heading: str) -> list[list[str]]:
    """The cells of the markdown table under a '## heading' of report.md (header row first)."""
    block = text.split(f"## {heading}", 1)[1].split("\n\n", 2)[1]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines() if "---" not in line]


def test_report_tables_print_summary_csv(seed_run):
    """The report's seed table is summary.csv's numbers (mean to 4 significant digits, ± std to 2, the mean alone
    when there is no std, '-' when no sample has a value), row for row."""
    out, printed, _ = seed_run
    report = (out / "report.md").read_text(encoding="utf-8")
    cells = table(report, "Summary (mean ± std over samples)")
    assert "\n".join("| " + " | ".join(r) + " |" for r in cells[:1]) in printed
    head, body = cells[0], cells[1:]
    summary = read_csv(out / SUMMARY)
    assert len(body) == len(summary)
    for line, s in zip(body, summary):
        assert line[:4] == [s["method"], f"{float(s['guidance']):g}", s["schedule"], s["n"]]
        for title, cell in zip(head[4:], line[4:]):
            mean, std = s.get(f"{title}_mean", ""), s.get(f"{title}_std", "")
            want = "-" if mean == "" else f"{float(mean):.4g}" + ("" if std == "" else f" ± {float(std):.2g}")
            count = s.get(f"{title}_count", s["n"])  # a mean over fewer samples than the setting's says so
            want += f" (n={int(float(count))})" if mean != "" and int(float(count)) < int(s["n"]) else ""
            assert cell == want, (s["method"], title)
    assert "edit_psnr" not in head and "recon_psnr" in head and "s_per_sample" in head
    # the std's definition and its absence for one value are stated, here and in docs/evaluation.md
    stated = "std is the sample standard deviation (n - 1), left out when fewer than two samples have a value"
    assert stated in report
    docs = " ".join((Path(__file__).parent.parent / "docs" / "evaluation.md").read_text(encoding="utf-8").split())
    assert "`_std` is the sample standard deviation (divided by n - 1). With fewer than two values it is empty" in docs


def pie_rows() -> list[dict]:
    """PIE-Bench rows of two methods over the ten editing types, one type's background NaN (its whole image is the
    edited region, PnPInversion's "nan")."""
    from nti.data import PIE_EDIT_TYPES

    rows = []
    for method in ("ddim", "null-text"):
        for type_id, name in PIE_EDIT_TYPES.items():
            for k in range(2):
                t = int(type_id)
                whole = type_id == "9"
                values = {"edit_type": f"{type_id} {name}", "edit_structure_distance": 0.01 + 0.001 * t + 0.0004 * k,
                          "edit_bg_psnr": math.nan if whole else 20 + t + k / 3, "edit_bg_lpips":
                          math.nan if whole else 0.1 + 0.01 * k, "edit_bg_mse": math.nan if whole else 0.002 + 1e-4 * t,
                          "edit_bg_ssim": math.nan if whole else 0.8 + 0.001 * k, "edit_clip_whole": 25 + 0.37 * k,
                          "edit_clip_edited": 21 + 0.11 * t, "recon_bg_psnr": 27.0 + k,
                          "invert_s": 5.0 if method == "null-text" else 1.0}
                rows.append(row(f"{type_id}0000000000{k}", method, **values))
    return rows


def test_pie_tables_are_table_1_of_summary_csv(tmp_path):
    """PIE-Bench's Table 1 in the report: its column order and scales (structure x10^3, PSNR, LPIPS x10^3, MSE
    x10^4, SSIM x10^2, CLIP whole, CLIP edited), two decimals, from summary.csv's means; the breakdown by editing
    type lists the ten types by id with their PIE-Bench names, each type's means over its own samples."""
    out = tmp_path / "eval"
    write_samples(out, PIE_BENCH, pie_rows())
    write_outputs(out, manifest(PIE_BENCH), "m")
    report = (out / "report.md").read_text(encoding="utf-8")
    cells = table(report, "PIE-Bench table: edits (mean over samples)")
    assert cells[0] == ["method", "guidance", "schedule", "n", "structure distance ×10³ ↓", "PSNR ↑", "LPIPS ×10³ ↓",
                        "MSE ×10⁴ ↓", "SSIM ×10² ↑", "CLIP whole ↑", "CLIP edited ↑"]
    summary = {s["method"]: s for s in read_csv(out / SUMMARY)}
    expected = recompute(read_csv(out / SAMPLES))
    for line in cells[1:]:
        s, want = summary[line[0]], expected[(line[0], 7.5, "constant")]
        assert line[3] == s["n"] == "20"
        for (metric, _, scale), cell in zip(PIE_TABLE, line[4:]):
            count = int(float(s[f"edit_{metric}_count"]))  # the background metrics: type 9's 2 samples have none
            assert count == (18 if metric.startswith("bg_") else 20)
            assert cell == f"{float(s[f'edit_{metric}_mean']) * scale:.2f}" + (" (n=18)" if count == 18 else "")
            assert float(cell.split()[0]) == pytest.approx(want[f"edit_{metric}_mean"] * scale, abs=0.0051)
    psnr = statistics.fmean(20 + t + k / 3 for t in range(9) for k in range(2))  # type 9's NaN left out
    assert cells[1][5] == f"{psnr:.2f} (n=18)"

    by_type = table(report, "Edits by editing type")
    assert by_type[0][:5] == ["method", "guidance", "schedule", "edit_type", "n"]
    names = ["0 random", "1 change object", "2 add object", "3 delete object", "4 change content", "5 change pose",
             "6 change color", "7 change material", "8 change background", "9 change style"]
    assert [line[3] for line in by_type[1:]] == names * 2 and all(line[4] == "2" for line in by_type[1:])
    typed = recompute(read_csv(out / SAMPLES), by=("edit_type",))
    for line in by_type[1:]:
        want = typed[(line[0], 7.5, "constant", line[3])]
        for (metric, _, scale), cell in zip(PIE_TABLE, line[5:]):
            mean = want.get(f"edit_{metric}_mean")
            assert cell == ("-" if mean is None else f"{mean * scale:.2f}"), (line[3], metric)


def test_speed_plot_points_are_the_summary_means(seed_run):
    """The speed-vs-fidelity plot puts each setting at (s_per_sample mean, metric mean) of summary.csv, x in seconds
    per sample; settings without the metric (the baseline's reconstruction) are not drawn."""
    out, _, figures = seed_run
    summary = read_csv(out / SUMMARY)
    axes = [ax for ax in figures["speed_vs_fidelity.png"].axes if ax.get_ylabel()]
    assert [ax.get_ylabel() for ax in axes] == list(SEED.speed_panels)
    for ax in axes:
        assert ax.get_xlabel() == "seconds per sample (inversion + edit)"
        points = sorted(tuple(xy) for line in ax.lines if line.get_marker() == "o" for xy in line.get_xydata())
        want = sorted((float(s["s_per_sample_mean"]), float(s[f"{ax.get_ylabel()}_mean"])) for s in summary
                      if s.get(f"{ax.get_ylabel()}_mean", "") != "")
        assert [x for xy in points for x in xy] == pytest.approx([x for xy in want for x in xy])
        assert len(points) == (4 if ax.get_ylabel().startswith("recon") else 8)


NA_LIKE_IDS = ("NA", "None", "null", "nan", "N/A", "#N/A", "NaN")  # pandas reads these as missing by default


def test_ids_pandas_reads_as_missing_are_reported(tmp_path):
    """Sample ids such as "NA" or "None" are ids, not missing values: the report counts and lists them and draws
    their grid rows (read as NaN, they crashed the grid with an IndexError after the whole run)."""
    out = tmp_path / "eval"
    rows = [row(sample_id, edit_psnr=float(k)) for k, sample_id in enumerate(NA_LIKE_IDS)]
    rows += [row("None ", source_prompt="None", target_prompt="NA", edit_psnr=99.0)]
    write_samples(out, SEED, rows)
    write_outputs(out, manifest(SEED), "m")
    report = (out / "report.md").read_text(encoding="utf-8")
    assert f"{len(rows)} samples" in report.splitlines()[0]
    assert f"samples: {', '.join(r['id'] for r in rows)}" in report
    (summary,) = read_csv(out / SUMMARY)
    assert summary["n"] == str(len(rows))
    assert float(summary["edit_psnr_mean"]) == pytest.approx(statistics.fmean(r["edit_psnr"] for r in rows))


AWKWARD = ["a café, \"quoted\" and 'single'", "line one\nline two", "carriage\rreturn", "windows\r\nline",
           "tab\there", "emoji 🐱 and CJK 猫", "separator\u2028inside", " leading and trailing ", "x" * 5000]


def test_awkward_text_survives_samples_csv_round_trips(tmp_path):
    """Prompts and ids with commas, quotes, newlines, carriage returns, tabs, non-ASCII and long text come back from
    samples.csv as written: through a resume's read_rows (which rewrites the file) and through the report's reader;
    the resume's keys still match the data set's, so no item runs twice and no sample is counted twice."""
    from nti.data import EditSample
    from nti.report import load_results

    path = tmp_path / SAMPLES
    rows = [row(f"id {k}: {text}", source_prompt=text, target_prompt=text[::-1], edit_type=text, edit_psnr=20.0 + k)
            for k, text in enumerate(AWKWARD)]
    append_rows(path, SEED.columns, [], header=True)
    append_rows(path, SEED.columns, rows)
    for _ in range(2):  # a second resume reads what the first rewrote
        back = read_rows(path, SEED.columns)
        assert [(r["id"], r["source_prompt"], r["target_prompt"], r["edit_type"]) for r in back] == [
            (r["id"], r["source_prompt"], r["target_prompt"], r["edit_type"]) for r in rows]
    samples = [EditSample(r["id"], None, r["source_prompt"], r["target_prompt"], edit_type=r["edit_type"])
               for r in rows]
    check_rows_match(back, samples, tmp_path)  # the same prompts: no refusal
    assert {row_key(r) for r in back} == {(s.id, "ddim", 7.5, "constant") for s in samples}
    df = load_results(path)
    assert list(df["id"]) == [r["id"] for r in rows] and list(df["source_prompt"]) == AWKWARD
    assert list(df["edit_psnr"]) == [20.0 + k for k in range(len(rows))]


def test_reports_are_utf8_whatever_the_locale(tmp_path):
    """samples.csv and report.md are UTF-8 under a locale whose encoding is not (ASCII here; cp1252 on Windows has
    no ↓): the report's ± and ×10³ and a prompt's é were written in the locale's encoding, or not at all."""
    out = tmp_path / "eval"
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
from test_eval_audit import manifest, pie_rows, row, write_samples
from nti.evaluate import read_rows
import nti.report
from nti.report import write_outputs
from nti.scoring import PIE_BENCH
nti.report.plot_metrics = nti.report.plot_speed = nti.report.plot_schedules = lambda *args: None  # text files only
nti.report.plot_grid = lambda *args: False
out = Path({str(out)!r})
rows = pie_rows()[:4]
rows[0] = dict(rows[0], id="café", source_prompt="un café", target_prompt="un thé ↓")
write_samples(out, PIE_BENCH, rows)
read_rows(out / "samples.csv", PIE_BENCH.columns)
write_outputs(out, manifest(PIE_BENCH), "m")
"""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    (tmp_path / "run.py").write_text(script, encoding="utf-8")  # not on the command line: argv is ASCII there
    done = subprocess.run([sys.executable, str(tmp_path / "run.py")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "un thé ↓" in (out / SAMPLES).read_text(encoding="utf-8")
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "structure distance ×10³ ↓" in report and "café" in report


def test_unsafe_ids_get_folders_of_their_own():
    """Ids that one safe name stands for (unsafe characters, case, length, dots) each get their own images/ folder,
    compared as a case-insensitive disk compares names, always inside images/."""
    ids = ["a/b", "a_b", "a\\b", "a b", "A_B", "a_b.", ".a_b", "../a_b", "a_b/..", "café", "cafe", "CAFE", "猫", "🐱",
           "x" * 200, "x" * 201, "x" * 120, "item", "", ".", "..", "NA", "na"]
    ids += [sample_folder(i).split("/")[1] for i in ("A", "a/b", "CAFE")]  # an id that is another id's folder name
    ids = list(dict.fromkeys([*ids, *(i.lower() for i in ids[-3:]), "b-0123abcd", "b-0123ABCD"]))  # distinct ids
    folders = [sample_folder(i) for i in ids]
    assert len({f.lower() for f in folders}) == len(ids)
    for folder in folders:
        parts = folder.split("/")
        assert parts[0] == "images" and len(parts) == 2 and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", parts[1])
        assert len(parts[1]) <= 130


def test_empty_data_and_n_past_its_end(tmp_path, capsys):
    """An empty data file is refused (exit 2) with nothing written; --n beyond the data takes all of it, and the
    run's record says how many samples it has."""
    from nti.data import load_dataset

    assert len(load_dataset("scenes", 10_000)) == len(load_dataset("scenes"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    out = tmp_path / "eval"
    assert main(["eval", "--data", str(tmp_path / "empty.jsonl"), "--out", str(out), *FAST]) == EXIT_BAD_INPUT
    assert "has no samples" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("second, options, message", [
    ({"source_prompt": "a cup of coffee " + "very " * 80, "target_prompt": "a cup of tea"}, [], "tokens long"),
    ({"source_prompt": "a cup of coffee", "target_prompt": "a big red cup of tea"}, ["--edit", "p2p-replace"],
     "swaps words one for one"),
])
def test_a_prompt_the_model_cannot_take_is_refused_before_any_work(tmp_path, capsys, second, options, message):
    """Every sample's prompts are checked before the first sample runs (length, P2P's word match), as `nti edit`
    checks a batch's: a long benchmark must not stop at its 500th sample after hours of work."""
    records = [{"id": "first", "skimage": "chelsea", "source_prompt": "a cat", "target_prompt": "a dog"},
               {"id": "second", "skimage": "coffee", **second}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "eval"
    code = main(["eval", "--data", str(tmp_path / "p.jsonl"), "--out", str(out), "--methods", "ddim", *options,
                 *FAST])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and "nti: error: sample second: " in err and message in err
    assert not (out / SAMPLES).exists() or len(read_csv(out / SAMPLES)) == 0  # the first sample did not run


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_jsonl_prompts_may_hold_any_unicode_line_separator(tmp_path, newline):
    """JSON Lines separates records with newlines alone: U+2028, U+2029 and U+0085, valid raw inside a JSON string
    (json.dumps(..., ensure_ascii=False) writes them so), are part of a prompt, not line breaks that cut its record
    in two ("not valid JSON"). Windows and old Mac line ends still separate records."""
    from nti.data import load_dataset

    prompts = ["a cat\u2028on a mat", "a dog\u2029in a park", "a bird\x85on a wire"]
    records = [{"id": f"s{k}", "skimage": "chelsea", "source_prompt": p, "target_prompt": p.upper()}
               for k, p in enumerate(prompts)]
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(newline.join(json.dumps(r, ensure_ascii=False) for r in records).encode())
    samples = load_dataset(str(path))
    assert [(s.id, s.source_prompt, s.target_prompt) for s in samples] == [
        (r["id"], r["source_prompt"], r["target_prompt"]) for r in records]


def test_a_data_sets_own_edit_type_stays_in_its_table_cell(tmp_path):
    """An edit type from a JSONL (any text) is one cell of the by-type table: a '|' or a newline in it would add
    columns or end the row, shifting every number after it under another metric's title."""
    out = tmp_path / "eval"
    rows = pie_rows()[:2]
    rows[0]["edit_type"], rows[1]["edit_type"] = "colour | shape", "two\nlines"
    write_samples(out, PIE_BENCH, rows)
    write_outputs(out, manifest(PIE_BENCH), "m")
    block = (out / "report.md").read_text(encoding="utf-8").split("## Edits by editing type", 1)[1].split("\n\n")[1]
    lines = block.splitlines()
    assert len(lines) == 4 and len({len(re.findall(r"(?<!\\)\|", line)) for line in lines}) == 1
    assert r"| colour \| shape |" in block and "| two lines |" in block
