"""The Python API used as an outside tool would, adversarially: wrong types and values for every public function's
arguments get an nti.NTIError naming the argument and what to pass, never a bare TypeError/AttributeError from deep
inside torch, a silently wrong result, or a user's file overwritten."""
import dataclasses

import pytest
import torch
from PIL import Image

import nti
from nti.config import NTIError

FEW = dict(steps=2, inner_steps=1)


@pytest.mark.parametrize("field, value, message", [
    # bool is an int to Python: steps=True ran one step, batch_size=True a batch of one, without a word
    ("steps", True, "steps must be a positive integer; got True"),
    ("batch_size", True, "batch_size must be a positive integer; got True"),
    ("inner_steps", True, "inner_steps must be a non-negative integer; got True"),
    ("seed", True, "seed must be an integer"),
    ("steps_offset", True, "steps_offset must be a non-negative integer or None"),
    ("self_replace_max_tokens", True, "self_replace_max_tokens must be a non-negative integer"),
    # switches were read by truthiness: early_stop="no" kept early stop on, and was recorded as "no"
    ("early_stop", "no", "early_stop must be True or False; got 'no'"),
    ("half_norms", 1, "half_norms must be True or False; got 1"),
    ("compile", "yes", "compile must be True or False; got 'yes'"),
    ("fused_step", 0, "fused_step must be True or False or None; got 0"),
    # TypeError: '<=' not supported between instances of 'float' and 'str'
    ("cross_replace", "0.5", r"cross_replace must be a fraction of the steps in \[0, 1\]; got '0.5'"),
    ("self_replace", None, r"self_replace must be a fraction of the steps in \[0, 1\]; got None"),
    ("blend_start", [0.2], r"blend_start must be a fraction"),
    # never checked: nan made an empty blend mask (the edit silently undone), a string crashed inside torch
    ("blend_threshold", float("nan"), "blend_threshold must be a finite number; got nan"),
    ("blend_threshold", "0.3", "blend_threshold must be a finite number; got '0.3'"),
    # TypeError: 'NoneType' object is not iterable; [None] became the word 'None'
    ("blend_words", None, "blend_words must be a word or a list of words"),
    ("blend_words", 5, "blend_words must be a word or a list of words"),
    ("blend_words", [None], "blend_words must be a word or a list of words"),
    ("export_cache", 5, "export_cache must be a folder path or None; got 5"),
])
def test_config_fields_of_the_wrong_type_are_refused(field, value, message):
    extra = {"edit": "p2p-refine"} if field in ("blend_words", "blend_threshold") else {}
    with pytest.raises(NTIError, match=message):
        nti.NTIConfig(**{field: value}, **extra)
    with pytest.raises(NTIError, match=message):  # replace() goes through the same checks
        nti.NTIConfig(**extra).replace(**{field: value})


def test_config_values_that_stay_accepted():
    """What the tightened checks must still take: the CLI's and JSON's types, extremes tests rely on."""
    config = nti.NTIConfig(edit="p2p-refine", blend_words={"cat"}, blend_threshold=-1.0, fused_step=None,
                           early_stop=False, steps_offset=None, export_cache=None, reweight={"cat": 2})
    assert config.blend_words == ("cat",) and config.reweight == (("cat", 2.0),)
    assert nti.NTIConfig(blend_threshold=1, cross_replace=1, self_replace=0).blend_threshold == 1


# ------------------------------------------------------------------------------------------- invert, edit, generate

@pytest.fixture(scope="module")
def inv(tiny_pipe):
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    return nti.invert(tiny_pipe, image, "a cat", nti.NTIConfig(**FEW), progress=False)[0]


def calls(pipe, inv, config):
    """Every public function that takes a pipeline, with its other arguments good."""
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    return {
        "invert": lambda: nti.invert(pipe, image, "a cat", config, progress=False),
        "edit": lambda: nti.edit(pipe, [inv], "a dog", config, progress=False),
        "edit_latents": lambda: nti.edit_latents(pipe, [inv], "a dog", config, progress=False),
        "reconstruct": lambda: nti.reconstruct(pipe, [inv], config, progress=False),
        "generate": lambda: nti.generate(pipe, "a cat", config, progress=False),
    }


@pytest.mark.parametrize("name", ["invert", "edit", "edit_latents", "reconstruct", "generate"])
def test_a_pipe_or_config_of_the_wrong_kind_is_named(tiny_pipe, inv, name):
    """AttributeError: 'str' object has no attribute 'resolution' (a model name for the pipeline); 'dict' object has
    no attribute 'validate' / 'edit' / 'replace' / 'steps' (keyword settings as a dict)."""
    with pytest.raises(NTIError, match="pipe must be a Pipeline from nti.load_pipeline"):
        calls("tiny", inv, nti.NTIConfig(**FEW))[name]()
    with pytest.raises(NTIError, match="config must be an nti.NTIConfig, e.g. NTIConfig"):
        calls(tiny_pipe, inv, {"steps": 2})[name]()


@pytest.mark.parametrize("name", ["invert", "edit", "edit_latents", "reconstruct", "generate"])
def test_a_config_changed_after_construction_is_checked_again(tiny_pipe, inv, name):
    """invert validated its config, the others did not: steps='2' set on a config crashed generate with
    TypeError deep in the schedule."""
    config = nti.NTIConfig(**FEW)
    config.steps = "2"
    with pytest.raises(NTIError, match="steps must be a positive integer; got '2'"):
        calls(tiny_pipe, inv, config)[name]()


@pytest.mark.parametrize("call, message", [
    # ValueError: torch.cat(): expected a non-empty list of Tensors
    (lambda pipe: nti.edit(pipe, [], [], nti.NTIConfig(**FEW), progress=False), "no inversions given"),
    (lambda pipe: nti.edit_latents(pipe, [], "a dog", nti.NTIConfig(**FEW), progress=False), "no inversions given"),
    (lambda pipe: nti.reconstruct(pipe, [], nti.NTIConfig(**FEW), progress=False), "no inversions given"),
    (lambda pipe: nti.generate(pipe, [], nti.NTIConfig(**FEW), progress=False), "no prompts given"),
    # TypeError: 'NoneType' object is not iterable
    (lambda pipe: nti.edit(pipe, None, "a dog", progress=False), "inversions must be a list of nti.Inversion"),
    (lambda pipe: nti.reconstruct(pipe, None, progress=False), "inversions must be a list of nti.Inversion"),
    (lambda pipe: nti.generate(pipe, None, progress=False), "prompts must be a string or a list of strings"),
    (lambda pipe: nti.generate(pipe, 5, progress=False), "prompts must be a string or a list of strings, got int"),
    # AttributeError: 'str' object has no attribute 'model_fingerprint'
    (lambda pipe: nti.edit(pipe, ["inv.safetensors"], "a dog", progress=False),
     r"inversions\[0\] is a str, not an nti.Inversion .*; read a file with nti.load_inversion"),
    (lambda pipe: nti.reconstruct(pipe, [{"z_T": 1}], progress=False), r"inversions\[0\] is a dict"),
    # bytes were taken as one prompt per byte: 'got 5 prompts for 1 images'
    (lambda pipe: nti.invert(pipe, Image.new("RGB", (32, 32)), b"a cat", nti.NTIConfig(**FEW), progress=False),
     "source prompts must be a string or a list of strings, got bytes"),
])
def test_empty_and_foreign_arguments_are_named(tiny_pipe, call, message):
    with pytest.raises(NTIError, match=message):
        call(tiny_pipe)


def test_one_inversion_alone_is_taken_as_a_list_of_one(tiny_pipe, inv):
    """invert takes one image alone; edit and reconstruct said TypeError: 'Inversion' object is not iterable."""
    config = nti.NTIConfig(**FEW)
    assert torch.equal(nti.edit_latents(tiny_pipe, inv, "a dog", config, progress=False),
                       nti.edit_latents(tiny_pipe, [inv], "a dog", config, progress=False))
    assert len(nti.reconstruct(tiny_pipe, inv, config, progress=False)) == 1


def test_an_edit_config_whose_algorithm_settings_differ_from_the_inversions_says_they_are_not_used(tiny_pipe, inv):
    """An edit runs with its inversion's method, steps and guidance (its nulls were fitted to them). A config saying
    otherwise was ignored without a word (the CLI refuses such flags); now a warning names each one. A config that
    matches the inversion, or leaves a field at its default, warns of nothing."""
    import warnings

    other = nti.NTIConfig(steps=2, inner_steps=1, guidance=5.0, method="ddim")
    with pytest.warns(UserWarning, match="not used from the config") as caught:
        edited = nti.edit_latents(tiny_pipe, inv, "a dog", other, progress=False)
    message = str(caught[0].message)
    assert "guidance 5.0 (the inversion's: 7.5)" in message
    assert "method 'ddim' (the inversion's: 'null-text')" in message
    assert "steps" not in message.replace("inner_steps", "")  # the same as the inversion's
    assert torch.equal(edited, nti.edit_latents(tiny_pipe, inv, "a dog", nti.NTIConfig(**FEW), progress=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nti.edit_latents(tiny_pipe, inv, "a dog", nti.NTIConfig(**FEW), progress=False)
        nti.edit_latents(tiny_pipe, inv, "a dog", nti.NTIConfig(steps=2), progress=False)  # inner_steps at default


def test_speed_settings_on_the_reference_backend_are_said_to_be_ignored(tiny_pipe, inv):
    """The reference backend is eager fp32 whatever precision, compile or batch_size say (the CLI warns, or refuses a
    half precision); the API dropped them without a word. A warning names them; the result is the fp32 one."""
    import warnings

    with pytest.warns(UserWarning, match="batch_size, precision, compile act on the fast backend only"):
        edited = nti.edit_latents(tiny_pipe, inv, "a dog", nti.NTIConfig(**FEW, precision="bf16", batch_size=4,
                                                                          compile=True), progress=False)
    assert torch.equal(edited, nti.edit_latents(tiny_pipe, inv, "a dog", nti.NTIConfig(**FEW), progress=False))
    said = []
    with pytest.MonkeyPatch.context() as patch:  # every warn call counted, whatever the filters do with it
        patch.setattr(warnings, "warn", lambda message, *args, **kwargs: said.append(str(message)))
        nti.reconstruct(tiny_pipe, inv, nti.NTIConfig(**FEW, compile=True), progress=False)
    assert len([m for m in said if "fast backend only" in m]) == 1  # once per call (reconstruct said it 3 times)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nti.edit_latents(tiny_pipe, inv, "a dog", nti.NTIConfig(**FEW), progress=False)


@pytest.mark.parametrize("change, message", [
    # each of these was edited without a word: extra, missing or misshapen rows were indexed or broadcast
    (lambda inv: {"null_embeddings": inv.null_embeddings[:1]}, "a null-text inversion of 2 steps needs 2 null"),
    (lambda inv: {"null_embeddings": torch.cat([inv.null_embeddings] * 2)}, r"null embeddings have shape \(4, "),
    (lambda inv: {"settings": {**inv.settings, "steps": 3}}, "the inversion records 3 steps"),
    (lambda inv: {"pivots": torch.zeros(5)}, r"pivots have shape \(5,\), expected \(3, 4, 16, 16\)"),
    # TypeError / KeyError / AttributeError / ValueError from deep inside
    (lambda inv: {"settings": {**inv.settings, "steps": "2"}}, "settings hold a non-integer step count"),
    (lambda inv: {"settings": {k: v for k, v in inv.settings.items() if k != "steps"}}, "settings lack steps"),
    (lambda inv: {"settings": {**inv.settings, "guidance_schedule": "bogus"}}, "invalid settings: guidance_sch"),
    (lambda inv: {"settings": None}, "its settings must be a dict"),
    (lambda inv: {"source_prompt": None}, "its source_prompt a string; got dict and NoneType"),
    (lambda inv: {"z_T": inv.z_T.numpy()}, "z_T must be a floating-point torch tensor; got ndarray"),
    (lambda inv: {"z_T": inv.z_T.long()}, "z_T must be a floating-point torch tensor; got a torch.int64 tensor"),
])
def test_an_inversion_changed_in_memory_is_checked_before_editing(tiny_pipe, inv, change, message):
    """load_inversion checked a file's inversion against itself; an Inversion handed over in memory (changed by the
    caller since invert made it) was edited as it was."""
    bad = dataclasses.replace(inv, **change(inv))
    for call in (lambda: nti.edit(tiny_pipe, [inv, bad], "a dog", nti.NTIConfig(**FEW), progress=False),
                 lambda: nti.reconstruct(tiny_pipe, [inv, bad], nti.NTIConfig(edit="p2p-refine"), progress=False)):
        with pytest.raises(NTIError, match=rf"inversions\[1\]: .*{message}.*; invert again"):
            call()


def test_other_float_dtypes_in_memory_edit_as_fp32(tiny_pipe, inv):
    """RuntimeError: mat1 and mat2 must have the same dtype, but got Double and Float."""
    config = nti.NTIConfig(**FEW)
    want = nti.edit_latents(tiny_pipe, [inv], "a dog", config, progress=False)
    double = dataclasses.replace(inv, z_T=inv.z_T.double(), null_embeddings=inv.null_embeddings.double())
    assert torch.equal(nti.edit_latents(tiny_pipe, [double], "a dog", config, progress=False), want)


# ------------------------------------------------------------------------------------ save_inversion, load_inversion

def test_save_inversion_never_replaces_a_users_file(inv, tmp_path):
    """save_inversion(inv, 'notes.safetensors') replaced the user's notes.json with the readable twin, and a
    safetensors file of the user's (weights, say) with the inversion, without a word."""
    (tmp_path / "notes.json").write_text("my notes")
    (tmp_path / "weights.safetensors").write_bytes(b"my weights")
    with pytest.raises(NTIError, match="notes.json exists and was not written by nti; move it, or give another"):
        nti.save_inversion(inv, tmp_path / "notes.safetensors")
    with pytest.raises(NTIError, match="weights.safetensors exists and was not written by nti"):
        nti.save_inversion(inv, tmp_path / "weights")
    assert (tmp_path / "notes.json").read_text() == "my notes"
    assert (tmp_path / "weights.safetensors").read_bytes() == b"my weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.json", "weights.safetensors"]
    # nti's own files are replaced: saving again (another inversion to the same name) works
    path = nti.save_inversion(inv, tmp_path / "inv.safetensors")
    assert nti.save_inversion(dataclasses.replace(inv, source_prompt="a dog"), path) == path
    assert nti.load_inversion(path).source_prompt == "a dog"


@pytest.mark.parametrize("make, path, message", [
    # ValueError: PosixPath('.') has an empty name
    (None, "", "the inversion path is empty"),
    (None, ".", r"inversion path \. names a folder; give a file name such as inversion.safetensors"),
    # FileExistsError from mkdir
    ("file", "afile/x.safetensors", "afile is a file, not a folder"),
    # the twin was written first, then: could not write ...: Is a directory
    ("folder", "adir.safetensors", "adir.safetensors is a folder"),
    # TypeError: expected str, bytes or os.PathLike object, not NoneType
    (None, None, "the inversion path must be a str or a pathlib.Path; got NoneType"),
])
def test_save_inversion_refuses_odd_paths_and_writes_nothing(inv, tmp_path, monkeypatch, make, path, message):
    monkeypatch.chdir(tmp_path)
    if make == "file":
        (tmp_path / "afile").write_text("mine")
    elif make == "folder":
        (tmp_path / "adir.safetensors").mkdir()
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(NTIError, match=message):
        nti.save_inversion(inv, path)
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("change, message", [
    # written, then refused by load_inversion: a file that can never be used
    (lambda inv: {"z_T": torch.full_like(inv.z_T, float("nan"))}, "z_T holds non-finite values"),
    (lambda inv: {"settings": {**inv.settings, "steps": 5}}, "the inversion records 5 steps"),
    # AttributeError: 'numpy.ndarray' object has no attribute 'detach'
    (lambda inv: {"z_T": inv.z_T.numpy()}, "z_T must be a floating-point torch tensor; got ndarray"),
    # TypeError: Object of type Tensor is not JSON serializable
    (lambda inv: {"timings": {"x": torch.tensor(1.0)}}, "its metadata cannot be written as JSON"),
])
def test_save_inversion_refuses_what_load_inversion_would(inv, tmp_path, change, message):
    with pytest.raises(NTIError, match=f"inversion not saved to .*{message}"):
        nti.save_inversion(dataclasses.replace(inv, **change(inv)), tmp_path / "bad.safetensors")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args", [lambda inv, path: (None, path), lambda inv, path: ({"z_T": 1}, path),
                                  lambda inv, path: ([inv], path), lambda inv, path: (path, inv)])
def test_save_inversion_names_an_object_that_is_no_inversion(inv, tmp_path, args):
    """AttributeError: 'dict' object has no attribute 'z_T'; the arguments swapped: TypeError: expected str, bytes or
    os.PathLike object, not Inversion."""
    with pytest.raises(NTIError, match="save_inversion takes an nti.Inversion .*, then a path; got"):
        nti.save_inversion(*args(inv, tmp_path / "x.safetensors"))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("given", [None, 5, b"inv.safetensors", "inversion"])
def test_load_inversion_names_a_path_of_the_wrong_kind(inv, given):
    """TypeError: expected str, bytes or os.PathLike object, not NoneType (or int, or Inversion); bytes: argument
    should be a str object or an os.PathLike object returning str."""
    with pytest.raises(NTIError, match="the inversion path must be a str or a pathlib.Path; got"):
        nti.load_inversion(inv if given == "inversion" else given)


def test_save_and_load_expand_the_home_folder(inv, tmp_path, monkeypatch):
    """'~/x.safetensors' made a folder named '~' in the working directory, as load_image and the command line do
    not: they expand it."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    path = nti.save_inversion(inv, "~/inv.safetensors")
    assert path == tmp_path / "home" / "inv.safetensors" and path.is_file() and not (tmp_path / "~").exists()
    assert nti.load_inversion("~/inv.safetensors").key == inv.key


# ------------------------------------------------------------------------------------------------ models, the package

@pytest.mark.parametrize("call, message", [
    # TypeError: expected str, bytes or os.PathLike object, not int; '' was read as the working directory
    (lambda: nti.load_pipeline(5, "cpu"), "model must be a diffusers folder path, .* got 5"),
    (lambda: nti.load_pipeline("", "cpu"), "model must be a diffusers folder path, .* got ''"),
    # RuntimeError: Invalid device string: 'float16'; TypeError: nn.Module.to only accepts floating point ...
    (lambda: nti.load_pipeline("tiny", "cpu", dtype="float16"), "dtype must be a floating-point torch.dtype"),
    (lambda: nti.build_tiny_pipeline(dtype=torch.int8), "dtype must be a floating-point torch.dtype"),
    # TypeError: int() argument must be ... not 'NoneType'; 1.5 was recorded as seed 1.5 while torch drew seed 1
    (lambda: nti.load_pipeline("tiny", "cpu", seed=None), "seed must be an integer; got None"),
    (lambda: nti.build_tiny_pipeline(seed=1.5), "seed must be an integer; got 1.5"),
    # RuntimeError: Expected one of cpu, cuda, ipu, ... device type at start of device string: gpu
    (lambda: nti.build_tiny_pipeline(device="gpu"), "unknown device 'gpu'; use cpu, cuda, cuda:N or auto"),
    # AttributeError: 'str' object has no attribute 'unet'; NotADirectoryError
    (lambda: nti.save_pipeline_folder("tiny", "folder"), "save_pipeline_folder takes a Pipeline and a folder path"),
])
def test_model_loading_arguments_of_the_wrong_kind_are_named(call, message):
    with pytest.raises(NTIError, match=message):
        call()


def test_save_pipeline_folder_onto_a_file_is_refused(tiny_pipe, tmp_path):
    (tmp_path / "mine").write_text("mine")
    with pytest.raises(NTIError, match="is a file; give a folder to write the model into"):
        nti.save_pipeline_folder(tiny_pipe, tmp_path / "mine")
    assert (tmp_path / "mine").read_text() == "mine"


@pytest.mark.parametrize("name", ["invert", "edit", "edit_latents", "reconstruct", "generate"])
def test_a_half_precision_pipeline_is_refused_with_what_to_do(inv, name):
    """load_pipeline(dtype=torch.float16) loaded, then every call failed deep in torch: 'mat1 and mat2 must have
    the same dtype, but got Float and Half' (on either backend)."""
    half = nti.build_tiny_pipeline(seed=0, dtype=torch.float16)
    with pytest.raises(NTIError, match="weights are torch.float16; load it with dtype=torch.float32 and ask "
                                       r"NTIConfig\(backend='fast', precision="):
        calls(half, inv, nti.NTIConfig(**FEW))[name]()


def test_submodules_are_attributes_of_nti_whatever_was_touched_first():
    """`nti.models.build_tiny_pipeline` raised AttributeError in a fresh process until an export from nti.models
    (nti.load_pipeline, say) had been used: the lazy __getattr__ knew only the exports."""
    import subprocess
    import sys
    code = "import nti; print(nti.models.build_tiny_pipeline.__name__, nti.images.to_pil.__name__, nti.Inversion)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("build_tiny_pipeline to_pil")
    with pytest.raises(AttributeError, match="has no attribute 'nonexistent'"):
        nti.nonexistent


def test_an_empty_image_path_is_named_as_empty(tiny_pipe):
    """It said 'image . is a folder, not an image file'."""
    with pytest.raises(NTIError, match="an image path is empty"):
        nti.invert(tiny_pipe, "", "a cat", nti.NTIConfig(**FEW), progress=False)
