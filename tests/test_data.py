"""Dataset loaders on tiny files written by the tests: GenAI-Bench parquet, PIE-Bench folder, JSONL, bundled sample."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from nti.config import NTIError
from nti.data import (EditSample, decode_pie_mask, load_bundled, load_dataset, load_folder,
                         load_genai_bench, load_pie_bench, spread_over_sources, strip_brackets)


def _png_bytes(color, size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def genai_parquet(tmp_path):
    """Three GenAI-Bench-schema rows: HF Image structs and raw bytes, with one repeated input (as arena rows are)."""
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    red, blue = _png_bytes((255, 0, 0)), _png_bytes((0, 0, 255))
    frame = pd.DataFrame({
        "source_prompt": ["a red square", "a blue square", "a red square"],
        "target_prompt": ["a green square", "a blue circle", "a green square"],
        "instruct_prompt": ["make it green", "make it a circle", "make it green"],
        "source_image": [{"bytes": red, "path": None}, {"bytes": blue, "path": None}, {"bytes": red, "path": None}],
        "left_model": ["m1", "m2", "m3"],
    })
    path = tmp_path / "genai.parquet"
    frame.to_parquet(path)
    raw = frame.assign(source_image=[red, blue, red])
    raw_path = tmp_path / "genai_raw.parquet"
    raw.to_parquet(raw_path)
    return path, raw_path


def test_genai_bench_loads_structs_and_raw_bytes(genai_parquet):
    for path in genai_parquet:
        samples = load_genai_bench(path)
        assert [s.id for s in samples] == ["genai-0000", "genai-0001"]  # row 2 repeats row 0's input
        first = samples[0]
        assert (first.source_prompt, first.target_prompt, first.instruction) == \
            ("a red square", "a green square", "make it green")
        image = first.get_image()
        assert image.mode == "RGB" and image.size == (24, 16) and image.getpixel((0, 0)) == (255, 0, 0)
        assert first.meta["left_model"] == "m1" and first.meta["row"] == 0
        assert len(load_genai_bench(path, dedupe=False)) == 3
        assert len(load_genai_bench(path, limit=1)) == 1
        assert load_dataset(str(path), limit=1)[0].source_prompt == "a red square"


def test_genai_bench_errors_name_the_problem(tmp_path):
    pd = pytest.importorskip("pandas")
    with pytest.raises(NTIError, match="does not exist"):
        load_genai_bench(tmp_path / "missing.parquet")
    path = tmp_path / "wrong.parquet"
    pd.DataFrame({"source_prompt": ["x"], "prompt": ["y"]}).to_parquet(path)
    with pytest.raises(NTIError, match="target_prompt, instruct_prompt, source_image"):
        load_genai_bench(path)
    bad = tmp_path / "bad_image.parquet"
    pd.DataFrame({"source_prompt": ["x"], "target_prompt": ["y"], "instruct_prompt": ["z"],
                  "source_image": [b"not an image"]}).to_parquet(bad)
    with pytest.raises(NTIError, match="row 0"):
        load_genai_bench(bad)[0].get_image()


def test_decode_pie_mask_row_major_runs():
    mask = decode_pie_mask([0, 3, 10, 2], shape=(4, 4))
    expected = np.zeros(16, bool)
    expected[[0, 1, 2, 10, 11]] = True
    np.testing.assert_array_equal(mask, expected.reshape(4, 4))
    assert decode_pie_mask([14, 10], shape=(4, 4)).sum() == 2  # a run past the end is clipped
    assert not decode_pie_mask([], shape=(4, 4)).any()
    border = decode_pie_mask([], shape=(4, 4), mark_border=True)
    assert border.sum() == 12 and not border[1:3, 1:3].any()
    with pytest.raises(NTIError, match="pairs"):
        decode_pie_mask([1, 2, 3])


def test_strip_brackets():
    assert strip_brackets("a [cat] sitting on [a  red] mat") == "a cat sitting on a red mat"


@pytest.fixture
def pie_folder(tmp_path):
    """A two-entry PIE-Bench layout: mapping_file.json and annotation_images/<category>/<file>.jpg."""
    images = tmp_path / "annotation_images" / "0_random_140"
    images.mkdir(parents=True)
    Image.new("RGB", (512, 512), (10, 200, 30)).save(images / "000000000000.jpg")
    Image.new("RGB", (512, 512), (200, 10, 30)).save(images / "000000000001.jpg")
    # rows 100..101, columns 200..263 (two runs of 64 pixels), in PIE-Bench's flat [start, length] code
    rle = [100 * 512 + 200, 64, 101 * 512 + 200, 64]
    mapping = {
        "000000000000": {"image_path": "0_random_140/000000000000.jpg", "original_prompt": "a [cat] on a mat",
                         "editing_prompt": "a [dog] on a mat", "editing_instruction": "make the cat a dog",
                         "editing_type_id": "0", "blended_word": "cat dog", "mask": rle},
        "000000000001": {"image_path": "0_random_140/000000000001.jpg", "original_prompt": "a red car",
                         "editing_prompt": "a [blue] car", "editing_instruction": "", "editing_type_id": "6",
                         "blended_word": "", "mask": []},
    }
    (tmp_path / "mapping_file.json").write_text(json.dumps(mapping))
    return tmp_path


def test_pie_bench_loads_prompts_masks_and_images(pie_folder):
    samples = load_pie_bench(pie_folder)
    assert [s.id for s in samples] == ["000000000000", "000000000001"]
    first = samples[0]
    assert (first.source_prompt, first.target_prompt) == ("a cat on a mat", "a dog on a mat")
    assert first.instruction == "make the cat a dog" and samples[1].instruction is None
    assert first.meta["original_prompt"] == "a [cat] on a mat" and first.meta["blended_word"] == "cat dog"
    assert (first.edit_type, samples[1].edit_type) == ("0 random", "6 change color")  # PIE-Bench's categories
    expected = np.zeros((512, 512), bool)
    expected[100:102, 200:264] = True
    assert first.mask.dtype == bool
    np.testing.assert_array_equal(first.mask, expected)
    assert not samples[1].mask.any()
    assert first.get_image().getpixel((0, 0))[1] > 150
    assert len(load_pie_bench(pie_folder, limit=1)) == 1
    assert load_dataset(str(pie_folder))[1].target_prompt == "a blue car"


def test_pie_bench_errors(pie_folder, tmp_path_factory):
    with pytest.raises(NTIError, match="mapping_file.json is missing"):
        load_pie_bench(tmp_path_factory.mktemp("empty"))
    (pie_folder / "annotation_images" / "0_random_140" / "000000000001.jpg").unlink()
    with pytest.raises(NTIError, match="000000000001.*does not exist"):
        load_pie_bench(pie_folder)


@pytest.fixture
def prompt_folder(tmp_path):
    Image.new("RGB", (20, 10), (1, 2, 3)).save(tmp_path / "a.png")
    Image.new("L", (20, 10), 255).save(tmp_path / "a_mask.png")
    lines = [
        {"image": "a.png", "source_prompt": "a dark image", "target_prompt": "a bright image", "mask": "a_mask.png"},
        {"id": "cat", "skimage": "chelsea", "source_prompt": "a cat", "target_prompt": "a tiger",
         "instruction": "make it a tiger", "note": "kept in meta"},
    ]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    return tmp_path


def test_folder_loader(prompt_folder):
    samples = load_folder(prompt_folder)
    assert [s.id for s in samples] == ["a", "cat"]
    assert samples[0].get_image().size == (20, 10) and samples[0].mask.all() and samples[0].instruction is None
    assert samples[1].instruction == "make it a tiger" and samples[1].meta["note"] == "kept in meta"
    assert samples[0].edit_type is None
    assert samples[1].get_image().size == (451, 300)
    assert [s.id for s in load_folder(prompt_folder / "prompts.jsonl", limit=1)] == ["a"]
    assert len(load_dataset(str(prompt_folder))) == 2


@pytest.mark.parametrize("bad_line, message", [
    ('{"image": "a.png", "source_prompt": "x"}', "line 2: missing or empty field.*target_prompt"),
    ('{"image": "a.png", "source_prompt": "x", "target_prompt": "\\u200b"}', "line 2: missing or empty field"),
    ('{"image": "nope.png", "source_prompt": "x", "target_prompt": "y"}', "line 2: image .*nope.png does not exist"),
    ('{"image": "a.png", "source_prompt": "x", ', "line 2: not valid JSON"),
    ('{"source_prompt": "x", "target_prompt": "y"}', "line 2: give exactly one of 'image'"),
    ('{"image": "a.png", "source_prompt": "x", "target_prompt": "y"}',
     "line 2: duplicate id 'a' taken from the image's name"),
    ('{"id": "a", "image": "a.png", "source_prompt": "x", "target_prompt": "y"}', r"line 2: duplicate id 'a' \("),
])
def test_folder_loader_names_the_bad_line(prompt_folder, bad_line, message):
    good = '{"image": "a.png", "source_prompt": "a", "target_prompt": "b"}'
    path = prompt_folder / "bad.jsonl"
    path.write_text(good + "\n" + bad_line + "\n")
    with pytest.raises(NTIError, match=message):
        load_folder(path)


def test_bundled_sample_is_offline_rgb_with_prompts():
    samples = load_bundled("sample")
    assert len(samples) >= 5 and len({s.id for s in samples}) == len(samples)
    for sample in samples:
        assert isinstance(sample, EditSample)
        image = sample.get_image()
        assert image.mode == "RGB" and min(image.size) >= 256
        assert sample.source_prompt.strip() and sample.target_prompt.strip()
        assert sample.source_prompt != sample.target_prompt
    assert len(load_dataset("sample", limit=2)) == 2


def test_load_dataset_rejects_unknown_specs(tmp_path):
    with pytest.raises(NTIError, match="does not exist"):
        load_dataset(str(tmp_path / "nothing_here"))
    with pytest.raises(NTIError, match="is not a dataset"):
        load_dataset(str(tmp_path))  # an empty folder: no prompts.jsonl, no mapping_file.json
    with pytest.raises(NTIError, match="limit"):
        load_dataset("sample", limit=-1)


def test_spread_over_sources_takes_one_edit_per_image_first():
    samples = [EditSample(name, None, "s", "t") for name in ("a1", "a2", "a3", "b1", "c1", "c2")]
    sources = ["a", "a", "a", "b", "c", "c"]
    assert [s.id for s in spread_over_sources(samples, sources)] == ["a1", "b1", "c1", "a2", "c2", "a3"]
    assert spread_over_sources([], []) == []


def test_n_samples_of_the_bundled_scenes_are_n_different_scenes():
    """Each scene has a colour and a shape edit; the first two samples must not be two edits of one image (their
    reconstructions would be one inversion, and the spread over samples zero)."""
    two = load_dataset("scenes", limit=2)
    assert [s.id for s in two] == ["scene0-colour", "scene1-colour"]
    assert two[0].get_image().tobytes() != two[1].get_image().tobytes()
    everything = load_dataset("scenes")
    assert [s.id for s in everything[:6]] == [f"scene{k}-colour" for k in range(6)]
    assert {s.id for s in everything} == {f"scene{k}-{kind}" for k in range(6) for kind in ("colour", "shape")}
    assert [s.id for s in load_dataset("scenes", limit=7)] == [s.id for s in everything[:7]]  # --n extends
    assert {s.edit_type for s in everything} == {"colour", "shape"}
