"""What installing the project adds: one import name, `nti`, and the `nti` command; no top-level `kernels`,
`export`, `benchmarks` (or `engine`). Built and installed the way the GPU machines get it: a wheel installed with
--target into a fresh folder, run from there with PYTHONPATH."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fresh_site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(ROOT)],
                   check=True, cwd=tmp, timeout=600)
    wheels = sorted((tmp / "dist").glob("nti_engine-*.whl"))
    assert len(wheels) == 1
    site = tmp / "site"
    subprocess.run([*pip, "install", "--no-index", "--no-deps", "--target", str(site), str(wheels[0])], check=True,
                   cwd=tmp, timeout=600)
    return site


@pytest.mark.slow
def test_installing_adds_only_the_nti_package(fresh_site):
    top = {p.name for p in fresh_site.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin"}
    assert top == {"nti"}
    for generic in ("kernels", "export", "benchmarks", "engine"):
        assert not (fresh_site / generic).exists() and not (fresh_site / f"{generic}.py").exists()
    package = fresh_site / "nti"
    for sub in ("kernels", "export", "benchmarks", "testbed"):
        assert (package / sub / "__init__.py").is_file()
    assert (package / "assets" / "shapes" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (package / "assets" / "scenes" / "prompts.jsonl").is_file()


@pytest.mark.slow
def test_the_installed_wheel_runs_from_any_folder(fresh_site, tmp_path):
    """The GPU route: PYTHONPATH=site python -m nti.benchmarks.gpu_run, here with --help; and the command line."""
    env = {**os.environ, "PYTHONPATH": str(fresh_site), "OMP_NUM_THREADS": "1"}
    probe = ("import nti, nti.kernels, nti.export, nti.benchmarks.gpu_run, nti.testbed.scenes; "
             "print(nti.__file__); print(nti.__version__)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    where, version = proc.stdout.split()
    assert Path(where).is_relative_to(fresh_site) and version == __import__("nti").__version__
    proc = subprocess.run([sys.executable, "-m", "nti.benchmarks.gpu_run", "--help"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and "--quick" in proc.stdout, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "nti.cli", "--version"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("nti-engine "), proc.stderr[-2000:]


def test_the_checkouts_kernels_folder_gives_way_to_hugging_faces_kernels_package():
    """Run from the checkout's root (`python -m ...`, pytest), `import kernels` finds the kernels/ folder first;
    transformers >= 5 requires Hugging Face's `kernels` package and imports names from it. The folder hands the
    name over (kernels/__init__.py), and nti.kernels stays the project's."""
    import importlib.metadata

    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed (transformers < 5)")
    code = ("import kernels, nti.kernels, transformers.integrations.hub_kernels; "
            "print(kernels.__file__); print(nti.kernels.__file__); print(hasattr(kernels, 'CUDAProperties'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    hf, ours, has_names = out.stdout.split()
    assert Path(hf).parent != ROOT / "kernels" and has_names == "True"
    assert Path(ours) == ROOT / "kernels" / "__init__.py"
