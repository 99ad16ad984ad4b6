"""The documentation against the code: every `nti ...` command the docs show parses with the real CLI parser, every
flag they name exists, every `python -m nti...` module they name exists and parses its flags, every python block
compiles. Nothing here runs a command: each check stops once argparse has read the line."""
import argparse
import ast
import contextlib
import importlib
import io
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "export" / "README.md",
        ROOT / "kernels" / "README.md", ROOT / "tests" / "golden" / "README.md"]
OPERATORS = {"|", "||", "&&", ";", "&"}
REDIRECTS = {">", ">>", "<", "2>"}
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SHELL_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*=\S*\s+)*(\.venv/bin/)?(nti|python3?|pip|ray|curl|bash)\s")
# flags of other programs the docs show (pip, ray start, pytest, curl): not nti's
FOREIGN = {"--index-url", "--no-index", "--no-deps", "--target", "--only-binary", "--python-version", "--head",
           "--address", "--num-gpus", "--dist"}


def blocks(text: str):
    """(line number, language, joined source) of every fenced or indented code block."""
    lines, i = text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```\s*(\w*)", lines[i])
        if fence:
            start, lang, body = i + 1, fence.group(2), []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i])
                i += 1
            yield start + 1, lang, "\n".join(body)
        elif lines[i].startswith("    ") and (i == 0 or not lines[i - 1].strip()) and lines[i].strip() \
                and not lines[i].lstrip().startswith(("-", "|")):
            start, body = i, []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                body.append(lines[i][4:])
                i += 1
            yield start + 1, "indented", "\n".join(body).rstrip()
            continue
        i += 1


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"```.*?```", "", text, flags=re.S)


def shell_commands(source: str):
    """Each simple command of a shell block as a word list: continuations joined, comments, env-var prefixes,
    redirections and `.venv/bin/` dropped, split at pipes and && / ;."""
    lexer = shlex.shlex(source.replace("\\\n", " "), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words, skip = [], False
    for word in list(lexer) + [";"]:
        if skip:
            skip = False
        elif word in REDIRECTS:
            skip = True
        elif word in OPERATORS or word == "\n":
            while words and ENV.match(words[0]):
                words.pop(0)
            if words:
                words[0] = words[0].removeprefix(".venv/bin/")
                yield words
            words = []
        else:
            words.append(word)


def block_lines(source: str):
    """A shell block's logical lines (continuations joined), so that each command is split on its own."""
    return [line for line in source.replace("\\\n", " ").splitlines() if line.strip()]


def doc_commands():
    """(doc:line, words) of every command line in every shell code block of the docs."""
    for path in DOCS:
        for line, lang, source in blocks(path.read_text()):
            if lang not in ("bash", "sh", "", "indented"):
                continue
            for logical in block_lines(source):
                if lang in ("", "indented") and not SHELL_LINE.match(logical):
                    continue  # an unlabeled block of prose or a diagram (README's layout, docs/ray.md's pipeline)
                for words in shell_commands(logical):
                    yield f"{path.relative_to(ROOT)}:{line}", words


def inline_spans(path: Path):
    """(doc:line, text) of every inline code span outside fenced blocks, one that wraps over lines joined."""
    text = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), path.read_text(), flags=re.S)
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
        yield f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}", " ".join(m.group(1).split())


def inline_nti(path: Path):
    """(doc:line, text) of every inline code span that runs `nti` (after an install's && too)."""
    for where, span in inline_spans(path):
        if span.startswith("nti ") or span.startswith("pip install") and "&& nti" in span:
            yield where, span


def parse(parser: argparse.ArgumentParser, argv):
    """argparse's error message for argv, or None when it parses (the parser's exit is caught, nothing runs)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
    except SystemExit as exit_:
        return None if exit_.code == 0 else (err.getvalue().strip().splitlines() or ["exit 2"])[-1]
    return None


def nti_parser():
    from nti.cli import build_parser
    return build_parser()


def subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def options(parser) -> set:
    return {s for a in parser._actions for s in a.option_strings}


NTI_COMMANDS = [(where, words) for where, words in doc_commands() if words[0] == "nti"]
INLINE_COMMANDS = [(where, words) for path in DOCS for where, span in inline_spans(path)
                   if re.match(r"^([A-Z_]+=\S+ )*python3? -m nti", span)
                   for words in shell_commands(re.sub(r"\[([^]]*)\]", r"\1", span))]  # [--optional flag]
PY_MODULES = [(where, words[words.index("-m") + 1], words[words.index("-m") + 2:])
              for where, words in [*doc_commands(), *INLINE_COMMANDS]
              if re.match(r"^python3?$", words[0]) and "-m" in words and words[words.index("-m") + 1].startswith("nti")]


def test_the_extractor_finds_the_docs_commands():
    """A guard on the extraction itself: the README's main command, a continued line, a pipe's left side and an
    env-prefixed module are all found, so that an extractor gone blind cannot pass the checks below."""
    found = {" ".join(w) for _, w in NTI_COMMANDS}
    assert "nti edit engine/assets/scenes/prompts.jsonl --guidance-schedule cosine --edit p2p-replace --out " \
           "out/scenes" in found  # after `.venv/bin/` and the install's &&
    assert any(w[:3] == ["nti", "edit", "skimage:chelsea"] and "--reweight" in w for _, w in NTI_COMMANDS)  # \
    assert any(w[:2] == ["nti", "export"] for _, w in NTI_COMMANDS)  # export/README.md's indented block
    modules = {m for _, m, _ in PY_MODULES}
    assert {"nti.benchmarks.gpu_run", "nti.benchmarks.bench_serve", "nti.testbed"} <= modules  # PYTHONPATH=, OMP=
    assert any(m == "nti.benchmarks.bench_precision" and "--out" in argv for _, m, argv in PY_MODULES)  # wrapped
    assert len(NTI_COMMANDS) >= 20
    assert list(shell_commands('A=1 .venv/bin/nti edit x --out "a b" | jq .x > f')) == \
        [["nti", "edit", "x", "--out", "a b"], ["jq", ".x"]]


@pytest.mark.parametrize("where,words", NTI_COMMANDS, ids=[f"{w}:{' '.join(c[:2])}" for w, c in NTI_COMMANDS])
def test_every_nti_command_in_a_code_block_parses(where, words):
    """Each `nti ...` line of a code block, as a newcomer would type it, is accepted by the real parser."""
    assert parse(nti_parser(), words[1:]) is None, f"{where}: {' '.join(words)}"


def synopses(span: str):
    """The command lines an inline synopsis stands for: `a\\|b` and `a|b` are alternatives, `[X]` may be left out,
    `...` stands for the inputs."""
    words = span.replace("\\|", "|").replace("...", "").replace("[", "").replace("]", "").split()
    if words[:2] == ["pip", "install"]:
        words = words[words.index("nti"):]
    expanded = [[]]
    for word in words:
        expanded = [done + [alt] for done in expanded for alt in word.split("|")]
    return expanded


INLINE = [(where, span) for path in DOCS for where, span in inline_nti(path)]


@pytest.mark.parametrize("where,span", INLINE, ids=[f"{w}:{s[:40]}" for w, s in INLINE])
def test_every_inline_nti_command_names_a_subcommand_and_its_flags(where, span):
    """An inline `nti SUB --flag ...` (a synopsis, or a flag in prose) names a real subcommand and flags it takes;
    a complete one (all required arguments given) parses."""
    subs = subparsers(nti_parser())
    for words in synopses(span):
        assert words[1] in subs, f"{where}: {span}: no subcommand {words[1]!r}"
        flags = {w.split("=")[0] for w in words if w.startswith("--")}
        assert flags <= options(subs[words[1]]), f"{where}: {span}: {flags - options(subs[words[1]])}"
        error = parse(nti_parser(), words[1:])
        # a flag named in prose (`nti eval --out`) lacks its value and the rest of the line
        fragment = error and ("the following arguments are required" in error or "expected one argument" in error
                              and words[-1].startswith("--"))
        assert error is None or fragment, f"{where}: {span}: {error}"


def known_flags() -> set:
    """Every flag of every nti subcommand and of every module the docs run."""
    flags = options(nti_parser())
    for sub in subparsers(nti_parser()).values():
        flags |= options(sub)
    for module in {m for _, m, _ in PY_MODULES}:
        flags |= options(module_parser(module, ["--help"])[0])
    return flags


def test_every_flag_named_in_the_docs_exists():
    """Each `--flag` the docs name, in prose or code, is an option of nti or of a module they run (or of the other
    tool the line runs: pip, ray, pytest)."""
    known, missing = known_flags() | FOREIGN, []
    for path in DOCS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line):
                if flag not in known:
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {flag}")
    assert not missing, "\n".join(missing)


class Parsed(Exception):
    """Raised in place of the module's work once its parser has read the command line."""


def module_parser(module: str, argv):
    """(the ArgumentParser a `python -m MODULE` builds, the namespace it read from argv or None): main() is run with
    parse_args patched to stop right after parsing."""
    seen = {}
    original = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        seen["parser"] = self
        args = sys.argv[1:] if args is None else list(args)
        if args == ["--help"]:
            raise Parsed()
        raise Parsed(original(self, args, namespace))

    name = module + ".__main__" if module == "nti.testbed" else module
    argparse.ArgumentParser.parse_args = stop
    saved_argv = sys.argv
    sys.argv = [module, *argv]
    try:
        with pytest.raises(Parsed) as parsed:
            if name in sys.modules and name.endswith("__main__"):
                del sys.modules[name]
            imported = importlib.import_module(name)
            if not name.endswith("__main__"):
                main = imported.main
                main(argv) if main.__code__.co_argcount else main()
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = saved_argv
    return seen["parser"], (parsed.value.args[0] if parsed.value.args else None)


@pytest.mark.parametrize("where,module,argv", PY_MODULES, ids=[f"{w}:{m}" for w, m, _ in PY_MODULES])
def test_every_python_module_in_the_docs_exists_and_parses_its_flags(where, module, argv):
    """`python -m nti.X FLAGS` as the docs show it: the module imports, has a main, and its parser takes the flags."""
    parser, _ = module_parser(module, ["--help"])
    assert parse(parser, argv) is None, f"{where}: python -m {module} {' '.join(argv)}"


PY_BLOCKS = [(f"{p.relative_to(ROOT)}:{line}", source) for p in DOCS for line, lang, source in blocks(p.read_text())
             if lang == "python"]


@pytest.mark.parametrize("where,source", PY_BLOCKS, ids=[w for w, _ in PY_BLOCKS])
def test_every_python_block_compiles(where, source):
    """Each ```python block is valid Python (and names only what nti exports, for the blocks that use nti)."""
    tree = ast.parse(source, where)
    import nti
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "nti":
            assert hasattr(nti, node.attr), f"{where}: nti.{node.attr}"


def test_there_are_python_blocks():
    assert len(PY_BLOCKS) >= 2


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation but - and _ dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_and_anchor_resolves():
    """Each [text](path#anchor) between the docs points at a file that exists and a heading it has."""
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(path.read_text())):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
            elif anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+\s+(.*)$", prose(linked.read_text()), flags=re.M)
                if anchor not in {slug(h) for h in headings}:
                    broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_module_values_the_docs_give_are_ones_the_modules_take():
    """Values a module checks only after parsing: gpu_run's --stage / --stages names and bench_precision's
    --variants rows, as the docs write them."""
    from nti.benchmarks import bench_precision, gpu_run
    for where, module, argv in PY_MODULES:
        _, args = module_parser(module, argv)
        if module == "nti.benchmarks.gpu_run":
            names = [args.stage] if args.stage else args.stages.split(",") if args.stages else []
            assert set(names) <= set(gpu_run.STAGES), f"{where}: {names}"
        if module == "nti.benchmarks.bench_precision":
            assert set(args.variants.split(",")) <= set(bench_precision.VARIANTS), f"{where}: {args.variants}"


def test_the_quoted_unknown_word_error_is_what_the_cli_prints(tmp_path, capsys):
    """docs/shapes-model.md quotes the shapes model's refusal of an unknown word: the CLI prints that line (it names
    the input first, as every per-input error does), exit 2, nothing written."""
    from nti.cli import main
    quoted = re.search(r"`(nti: error: [^`]*does not know[^`]*)`", (ROOT / "docs" / "shapes-model.md").read_text())
    image = ROOT / "engine" / "assets" / "scenes" / "scene0.png"
    code = main(["invert", str(image), "--prompt", "a cat on a mat", "--out", str(tmp_path / "x.safetensors"),
                 "--steps", "1", "--quiet"])
    printed = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and not any(tmp_path.iterdir())
    pattern = re.escape(quoted.group(1)).replace(re.escape("..."), ".*").replace(re.escape("NAME"), r"\S+")
    assert re.fullmatch(pattern, printed), (quoted.group(1), printed)


NOT_NTI = {"metrics.compute_metrics",  # docs/evaluation.md: what earlier versions had, named as removed
           "serve.ingress"}  # Ray Serve's decorator (docs/serving.md)


def python_names():
    """(doc:line, dotted name) of every inline `module.name` the docs cite: nti's modules and their functions."""
    modules = {p.stem for p in (ROOT / "engine").glob("*.py")} | {"kernels", "export", "testbed", "scenes"}
    for path in DOCS:
        for where, span in inline_spans(path):
            m = re.fullmatch(r"((?:nti\.)?[a-z_]+(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(?:\(.*\))?", span)
            if m and m.group(1).removeprefix("nti.").split(".")[0] in modules and m.group(1) not in NOT_NTI \
                    and not re.search(r"\.(md|py|json|jsonl|csv|png)$", m.group(1)):  # a file name
                yield where, m.group(1)


def test_every_python_name_the_docs_cite_exists():
    """`metrics.pie_scores`, `nti.models.build_clip_tokenizer`, `UNetRunner.check_compiled`'s module ...: each
    module-qualified name in the docs is there, so a renamed function cannot leave its docs behind."""
    aliases = {"scenes": "nti.testbed.scenes", "kernels": "nti.kernels", "export": "nti.export",
               "testbed": "nti.testbed"}
    missing, names = [], list(python_names())
    assert len(names) >= 15
    for where, name in names:
        parts = name.removeprefix("nti.").split(".")
        module = aliases.get(parts[0], "nti." + parts[0])
        try:
            obj = importlib.import_module(module)
            for attr in parts[1:]:
                obj = importlib.import_module(f"{obj.__name__}.{attr}") if not hasattr(obj, attr) and \
                    hasattr(obj, "__path__") else getattr(obj, attr)
        except (ImportError, AttributeError) as err:
            missing.append(f"{where}: {name} ({err})")
    assert not missing, "\n".join(missing)
