"""Follow-ups of the benchmark audit: a benchmark run never destroys an earlier result (refused unless --overwrite;
gpu_run appends), each row says what really ran, the early-stop row is measured against the reference that stops
early too, and bench_serve's identical-PNG count holds over every repeat."""
import importlib
import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CPU_FALLBACK = "torch fallback (cpu tensors; the kernels run on CUDA)"

# module -> arguments that pass every other check (the refusal comes before any model loads)
SCRIPTS = {
    "nti.benchmarks.bench_nti": ["--device", "cpu", "--quick"],
    "nti.benchmarks.bench_precision": ["--scenes", "1"],
    "nti.benchmarks.bench_testbed": ["--quick"],
    "nti.benchmarks.bench_ray": ["--images", "1"],
    "nti.benchmarks.bench_serve": ["--n", "1"],
    "nti.benchmarks.sdxl_memory": ["--models", "sd14"],
    "nti.export.bench_forward": ["--model", "tiny", "--backends", "eager"],
}


def _last_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("module", SCRIPTS)
def test_an_existing_results_file_is_refused_and_kept(module, tmp_path, capsys):
    """Every benchmark script replaced whatever its --out named (the committed results too, by default); now exit 2
    with one line naming the file, and the file keeps its bytes."""
    out = tmp_path / "earlier.json"
    out.write_text('{"earlier": "result"}\n')
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main([*SCRIPTS[module], "--out", str(out)])
    assert exit_info.value.code == 2
    assert f"{out} already exists (an earlier result); pass --overwrite" in _last_line(capsys)
    assert out.read_text() == '{"earlier": "result"}\n'


def test_the_first_documented_precision_command_keeps_the_committed_file(capsys):
    """`bench_precision --variants ...` without --out replaced precision_shapes_cpu.json (and dropped its hand-added
    earlier_run, which now has a file of its own so that the documented --overwrite loses nothing)."""
    from nti.benchmarks.bench_precision import main

    committed = RESULTS / "precision_shapes_cpu.json"
    before = committed.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["--variants", "bf16 half weights (autocast),bf16 half norms (no autocast)"])
    assert exit_info.value.code == 2 and "precision_shapes_cpu.json already exists" in _last_line(capsys)
    assert committed.read_bytes() == before
    earlier = json.loads((RESULTS / "precision_shapes_cpu_earlier_run.json").read_text())
    assert [r["variant"] for r in earlier["rows"]] == ["fp16 half weights (autocast)"]
    assert earlier["rows"][0]["mean_psnr"] == 38.1752  # docs/benchmarks.md's 38.18 row
    assert "earlier_run" not in json.loads(before)


def test_bench_forward_overwrite_replaces_the_file_whole(tmp_path):
    """With --overwrite the earlier file is replaced by the complete new JSON (no temp file left beside it)."""
    from nti.export.bench_forward import main

    out = tmp_path / "fwd.json"
    out.write_text("earlier")
    assert main(["--model", "tiny", "--device", "cpu", "--backends", "eager", "--batches", "1", "--warmup", "0",
                 "--iters", "1", "--out", str(out), "--overwrite"]) == 0
    result = json.loads(out.read_text())
    assert [(r["backend"], r["batch"]) for r in result["rows"]] == [("eager", 1)]
    assert result["rows"][0]["rel_err_vs_eager_fp32"] == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fwd.json"]


def _fake_testbed(bench, monkeypatch):
    from PIL import Image

    image = Image.new("RGB", (32, 32))
    monkeypatch.setattr(bench, "load_pipeline", lambda *a: SimpleNamespace(name="shapes", fingerprint="f"))
    monkeypatch.setattr(bench, "text_to_image", lambda pipe, n, seed: {})  # the minutes of work, not under test
    monkeypatch.setattr(bench, "reconstruction", lambda pipe, scene_list, steps, batch: (
        {"steps": steps}, {}, {"ddim_w7.5": [image] * 40, "nti_w7.5": [image] * 40}))
    monkeypatch.setattr(bench, "edits", lambda *args: ({}, {row: [] for row in bench.SHEET_ROWS}, []))


def test_bench_testbed_other_steps_get_their_own_file_and_the_picture_is_guarded(tmp_path, monkeypatch, capsys):
    """`bench_testbed --steps N` wrote testbed_shapes_cpu.json, the committed 50-step run's file; a PNG left without
    its JSON was replaced too."""
    from nti.benchmarks import bench_testbed as bench

    _fake_testbed(bench, monkeypatch)
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    (tmp_path / "testbed_shapes_cpu.json").write_text("50 steps")
    result = bench.main(["--steps", "10", "--batch", "4"])
    assert (tmp_path / "testbed_shapes_cpu.json").read_text() == "50 steps"
    written = json.loads((tmp_path / "testbed_shapes_cpu_steps10_batch4.json").read_text())
    assert written["command"] == result["command"] == "python -m nti.benchmarks.bench_testbed --steps 10 --batch 4"
    assert (tmp_path / "testbed_shapes_cpu_steps10_batch4.png").exists()

    (tmp_path / "sheet.png").write_bytes(b"earlier picture")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--out", str(tmp_path / "sheet.json")])
    assert exit_info.value.code == 2 and "sheet.png already exists" in _last_line(capsys)
    assert (tmp_path / "sheet.png").read_bytes() == b"earlier picture" and not (tmp_path / "sheet.json").exists()
    assert bench.main(["--out", str(tmp_path / "sheet.json"), "--overwrite"])["command"] == \
        "python -m nti.benchmarks.bench_testbed --overwrite"
    assert (tmp_path / "sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _recorded_commands():
    """(file, command) of each committed result that records the command that remakes it."""
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        command = data.get("command") or (data.get("provenance") or {}).get("command")
        if command:
            yield path, re.sub(r" \([^()'\"]*\)$", "", command)  # testbed's ends saying in parentheses how it ran


@pytest.mark.parametrize("path, command", list(_recorded_commands()), ids=lambda v: getattr(v, "name", ""))
def test_each_committed_result_records_a_command_that_remakes_it(path, command, monkeypatch):
    """The recorded command, run as written from the repository root, targets that very file and passes
    --overwrite (precision_shapes_cpu_fp16_half_norms.json's named no --out, so it would have replaced
    precision_shapes_cpu.json)."""
    import nti.benchmarks.results_file as results_file

    words = shlex.split(command)
    assert words[:2] == ["python", "-m"]
    module = importlib.import_module(words[2])
    seen = {}

    def stop(parser, paths, overwrite):
        seen.update(paths=[Path(p).resolve() for p in paths], overwrite=overwrite)
        raise KeyboardInterrupt  # nothing after the check runs

    for where in (module, results_file):
        monkeypatch.setattr(where, "refuse_existing", stop, raising=False)
    monkeypatch.chdir(ROOT)
    with pytest.raises(KeyboardInterrupt):
        module.main(words[3:])
    assert seen["paths"][0] == path and seen["overwrite"] is True


def _fake_inversion(value: float, steps: int, early_stop: bool):
    return SimpleNamespace(z_T=torch.full((1, 4, 2, 2), value), null_embeddings=torch.full((steps, 3, 4), value),
                           iterations=[1 if early_stop else 2] * steps, settings={"steps": steps},
                           fp32_retries=[], z_0=torch.zeros(1, 4, 2, 2))


@pytest.fixture(scope="module")
def fake_waterfall(tmp_path_factory):
    """bench_nti's real plan, rows and table on the tiny model, with each run replaced by known numbers: the
    reference's embeddings are 1 with early stop off and 2 with it on, a fast row's 0.1% above its own; a reference
    takes 3 s per image with early stop off and 2 s with it on, a fast row 1 s."""
    from nti.benchmarks import bench_nti

    def run_variant(pipe, config, n, warmup):
        value = (2.0 if config.early_stop else 1.0) * (1.0 if config.backend == "reference" else 1.001)
        seconds = (2.0 if config.early_stop else 3.0) if config.backend == "reference" else 1.0
        invs = [_fake_inversion(value, config.steps, config.early_stop) for _ in range(n)]
        if config.method == "ddim":
            for inv in invs:
                inv.null_embeddings, inv.iterations = None, []
        return {"recon_mse": 0.0, "invs": invs, "edited": torch.full((n, 4, 2, 2), value), "invert_s": seconds * n,
                "edit_s": 0.0, "warmup_s": 0.5, "peak_gib": None}

    patch = pytest.MonkeyPatch()
    patch.setattr(bench_nti, "run_variant", run_variant)
    out = tmp_path_factory.mktemp("bench_nti") / "bench.json"
    try:
        assert bench_nti.main(["--device", "cpu", "--no-compile", "--steps", "2", "--inner-steps", "2",
                               "--batch-sizes", "2", "--out", str(out)]) == 0
    finally:
        patch.undo()
    result = json.loads(out.read_text())
    return {r["variant"]: r for r in result["rows"]}, bench_nti.markdown_table(result)


def test_the_early_stop_row_is_measured_against_the_reference_that_stops_early(fake_waterfall):
    """'same, early stop on' took its speedup and parity from the reference with early stop off (other iterations,
    other embeddings by design); now from a reference row with early stop on."""
    rows, _ = fake_waterfall
    early = rows["  same, early stop on b2"]
    assert early["compared_with"] == "reference fp32 b1, early stop on"
    assert early["parity_embeddings_rel"] == pytest.approx(1e-3, rel=1e-3)  # vs 2.0, not vs 1.0 (which reads 1.0)
    assert early["parity_edit_rel"] == pytest.approx(1e-3, rel=1e-3)
    assert early["speedup_vs_reference"] == pytest.approx(2.0)  # 2 s / 1 s, not 3 s / 1 s
    plain = rows["+ fused DDIM step b2"]
    assert plain["compared_with"] == "reference fp32 b1" and plain["speedup_vs_reference"] == pytest.approx(3.0)
    assert plain["parity_embeddings_rel"] == pytest.approx(1e-3, rel=1e-3)
    assert rows["DDIM invert+edit fast bf16 b2"]["compared_with"] == "DDIM invert+edit reference fp32 b1"


def test_rows_record_what_really_ran_and_the_table_shows_it(fake_waterfall):
    """On CPU the '+ fused DDIM step' row runs the ops' torch reference (no Triton kernels), and '+ bf16 autocast'
    runs the half-weight UNet copy; the rows and the table said neither."""
    rows, table = fake_waterfall
    fused = rows["+ fused DDIM step b2"]
    assert fused["fused_step"] == CPU_FALLBACK and f"fused step: {CPU_FALLBACK}" in fused["ran"]
    assert [r["fused_step"] for name, r in rows.items() if name != "+ fused DDIM step b2"
            and "early stop on b2" not in name] == ["off"] * (len(rows) - 2)
    assert rows["+ bf16 autocast b1"]["half_weights"] is True and not rows["fast fp32 b1"]["half_weights"]
    assert "bf16 half-weight UNet copy" in rows["+ bf16 autocast b1"]["ran"]
    line = next(l for l in table.splitlines() if l.startswith("| + fused DDIM step b2 |"))
    assert CPU_FALLBACK in line.split("|")[2]
    line = next(l for l in table.splitlines() if l.startswith("| + bf16 autocast b1 |"))
    assert "half-weight UNet copy" in line.split("|")[2]


def test_waterfall_keeps_the_fused_step_off_until_its_row_on_cuda():
    """fused_step's default runs the Triton step wherever it runs: on a GPU every fast row had it, so the
    '+ fused DDIM step' row added nothing; now the rows above it set it off."""
    import argparse

    from nti.benchmarks.bench_nti import waterfall

    args = argparse.Namespace(steps=50, inner_steps=10, guidance=7.5, batch_sizes="4,16", no_compile=False,
                              device_obj=torch.device("cuda"))
    fused = {name: config.fused_step for name, config, _ in waterfall(args) if config.backend == "fast"}
    assert fused == {"fast fp32 b1": False, "+ bf16 autocast b1": False, "+ batch 4": False, "+ batch 16": False,
                     "+ torch.compile (regional) b16": False, "+ CUDA graphs, channels_last b16": False,
                     "+ fused DDIM step b16": True, "  same, early stop on b16": True,
                     "DDIM invert+edit fast bf16 b16": False}


def test_gpu_run_rows_record_the_fused_step_that_ran(tmp_path, monkeypatch):
    """gpu_run's timing and parity rows left the fused step unsaid (its default runs the Triton step on every GPU
    row); now each records what ran and the summary shows it."""
    from nti import NTIConfig
    from nti.benchmarks import gpu_run

    rows = []
    st = SimpleNamespace(device=torch.device("cpu"), cuda=False, emit=lambda stage, **row: rows.append(row))
    monkeypatch.setattr(gpu_run, "timed_run", lambda st, config, n: {
        "invs": [_fake_inversion(1.0, 2, False)], "edited": torch.ones(1, 4, 2, 2), "invert_s": 1.0, "edit_s": 1.0,
        "warmup_s": 0.1, "peak_gib": None, "forward_rows": 0, "backward_rows": 0, "captures_in_timed_run": 0})
    base = NTIConfig(backend="fast", steps=2, inner_steps=2, batch_size=1, early_stop=False)
    gpu_run.timing_row(st, "nti_b1", "fused", base.replace(fused_step=True), 1, (1.0, 2.0))
    gpu_run.timing_row(st, "nti_b1", "default", base, 1, (1.0, 2.0))
    assert [r["fused_step"] for r in rows] == [CPU_FALLBACK, "off"]
    (tmp_path / "gpu_run.jsonl").write_text("".join(json.dumps({"stage": "nti_b1", **r}) + "\n" for r in rows))
    summary = gpu_run.summarize(tmp_path)
    assert f"| nti_b1 | fused (fused step: {CPU_FALLBACK}) | 1 |" in summary
    assert "| nti_b1 | default | 1 |" in summary


def test_gpu_run_appends_and_never_truncates(tmp_path):
    """gpu_run's one output rule is to append: an earlier run's lines stay, in order, and summarize only reads."""
    from nti.benchmarks import gpu_run

    earlier = '{"stage": "env", "gpu": "earlier"}\n'
    (tmp_path / "gpu_run.jsonl").write_text(earlier)
    tf32 = torch.backends.cudnn.allow_tf32
    try:
        st = gpu_run.Stage(SimpleNamespace(out=str(tmp_path), quick=True))  # it turns TF32 off for the process
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    st.emit("env", gpu="now")
    gpu_run.record(tmp_path, {"stage": "env", "status": "ok"})
    assert gpu_run.main(["--summarize", str(tmp_path)]) == 0
    lines = (tmp_path / "gpu_run.jsonl").read_text().splitlines(keepends=True)
    assert lines[0] == earlier and [json.loads(l).get("gpu") for l in lines] == ["earlier", "now", None]
    assert "Device: earlier" in (tmp_path / "summary.md").read_text()


def test_bench_serve_counts_pngs_identical_in_every_repeat(tmp_path, monkeypatch):
    """identical_pngs_server_vs_cli counted only the last repeat: a first repeat whose server PNG differed from
    nti edit's was reported as '2/2'."""
    from nti.benchmarks import bench_serve as bench

    runs = iter([[b"other", b"b"], [b"a", b"b"]])  # the server's PNGs per repeat; nti edit gives a, b each time

    class Server:
        def __init__(self, *args):
            self.proc = None

        def start(self):
            return self

        def stop(self):
            return 0

    monkeypatch.setattr(bench, "ServerProcess", Server)
    monkeypatch.setattr(bench, "nti_edit", lambda jobs, folder, *a: {
        "done_in_s": 1.0, "cpu_s": 1.0, "throughput_img_per_s": 2.0,
        "images": dict(zip([j["name"] for j in jobs], [b"a", b"b"]))})
    monkeypatch.setattr(bench, "load_test", lambda server, jobs: {
        "throughput_img_per_s": 2.0, "cpu_s": 1.0, "wall_s": 1.0, "latency_p50_s": 0.5, "latency_p99_s": 0.9,
        "batches_invert": {}, "batches_edit": {}, "images": next(runs)})
    out = tmp_path / "serve.json"
    report = bench.main(["--n", "2", "--repeats", "2", "--out", str(out)])
    assert report["identical_pngs_server_vs_cli"] == "1/2"
    assert [run["identical_pngs_vs_cli"] for run in report["server_runs"]] == [1, 2]
    assert json.loads(out.read_text())["identical_pngs_server_vs_cli"] == "1/2"
