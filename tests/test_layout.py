"""The project's shape: no import circle between its modules, one flag per config field, a stable cache key."""
import ast
import dataclasses
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def package_folders() -> dict[str, Path]:
    """Import name -> folder of every installed package, as pyproject.toml maps them."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setup.get("package-dir") or {name: name.replace(".", "/") for name in setup["packages"]}
    return {name: ROOT / folder for name, folder in mapping.items() if name}


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the installed packages."""
    modules = {}
    for package, folder in sorted(package_folders().items(), key=lambda item: -len(item[0])):
        for file in folder.rglob("*.py"):
            parts = [*package.split("."), *file.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules.setdefault(".".join(parts), file)
    return modules


def imports_of(module: str, file: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `module` imports anywhere in its file (inside functions too: a lazy import is still a
    dependency), except under `if TYPE_CHECKING:`."""
    tree = ast.parse(file.read_text())
    typing_only = {id(node) for branch in ast.walk(tree) if isinstance(branch, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(branch.test) for stmt in branch.body for node in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = module.split(".") if file.name == "__init__.py" else module.split(".")[:-1]
            prefix = node.module or ""
            if node.level:
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself
            names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_no_import_circle_between_modules():
    modules = project_modules()
    assert len(modules) > 30
    graph = {name: imports_of(name, file, modules) for name, file in modules.items()}
    assert import_cycles(graph) == []
    # the checker itself finds a circle
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_edit_help_lists_every_config_field(capsys):
    from nti.cli import main
    from nti.config import NTIConfig
    from nti.options import flag_of

    with pytest.raises(SystemExit) as exit_:
        main(["edit", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    fields = dataclasses.fields(NTIConfig)
    assert len(fields) >= 30
    missing = [f.name for f in fields if flag_of(f) not in text]
    assert missing == []
    for flag in ("--guidance-min", "--lr", "--early-stop-eps", "--self-replace-max-tokens", "--blend-threshold",
                 "--blend-start", "--fused-step", "--no-early-stop", "--no-half-weights", "--reweight",
                 "--blend-word"):
        assert flag in text
    assert "Adam learning rate at step 0" in text  # the help is the field's docstring


def test_every_flag_reaches_the_config():
    from nti.cli import build_parser
    from nti.config import NTIConfig
    from nti.models import parse_device
    from nti.options import config_from_args

    args = build_parser().parse_args(["edit", "x.png", "--out", "o.png", "--lr", "0.02", "--guidance-min", "2",
                                      "--early-stop-eps", "1e-4", "--no-early-stop", "--blend-start", "0.3",
                                      "--edit", "p2p-refine", "--reweight", "cat=2", "--blend-word", "cat",
                                      "--fused-step", "--self-replace-max-tokens", "256"])
    config = config_from_args(args, parse_device("cpu"))
    assert (config.lr, config.guidance_min, config.early_stop_eps, config.early_stop) == (0.02, 2.0, 1e-4, False)
    assert (config.blend_start, config.reweight, config.blend_words) == (0.3, (("cat", 2.0),), ("cat",))
    assert config.fused_step is True and config.self_replace_max_tokens == 256
    assert (config.backend, config.precision) == ("reference", "fp32")  # CPU: chosen by device
    defaults = config_from_args(build_parser().parse_args(["edit", "x.png", "--out", "o.png"]), parse_device("cpu"))
    assert defaults == NTIConfig()  # the flags' defaults are the dataclass's


def test_cache_key_comes_from_the_result_changing_fields_and_kept_its_values():
    from nti.artifact import inversion_key
    from nti.config import NTIConfig

    config = NTIConfig()
    assert sorted(config.result_settings({})) == ["early_stop", "early_stop_eps", "guidance", "guidance_min",
                                                  "guidance_schedule", "inner_steps", "lr", "method", "precision",
                                                  "steps", "steps_offset"]
    # the keys the hand-kept list gave before the settings were derived from the fields: saved caches stay valid
    assert inversion_key("h", "a cat", "fp", config.result_settings({"steps_offset": 1})) == "214600db30e611e45a5ecdb1"
    other = NTIConfig(method="direct", steps=20, guidance=3.0, guidance_schedule="cosine", precision="bf16",
                      early_stop=False, edit="p2p-replace", backend="fast", batch_size=2, seed=5)
    assert inversion_key("h", "a cat", "fp", other.result_settings({})) == "9299bd8ca84868b834ef043e"
