"""Edit benchmarks as EditSample lists: GenAI-Bench parquet, PIE-Bench folders, prompt JSONL folders, a bundled sample.

Everything reads local files; the bundled sample uses photos that ship inside scikit-image, so it needs no download.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .config import NTIError
from .images import SKIMAGE_PREFIX, check_image_file, load_image, open_image, skimage_names
from .validate import is_blank

log = logging.getLogger("nti")

SAMPLE_PROMPTS = Path(__file__).parent / "assets" / "sample" / "prompts.jsonl"
SCENE_PROMPTS = Path(__file__).parent / "assets" / "scenes" / "prompts.jsonl"  # for the built-in shapes model
BUNDLED = {"sample": SAMPLE_PROMPTS, "scenes": SCENE_PROMPTS}  # `--data NAME` -> its prompts.jsonl
GENAI_COLUMNS = ("source_prompt", "target_prompt", "instruct_prompt", "source_image")
PIE_MAPPING = "mapping_file.json"
PIE_REQUIRED = ("image_path", "original_prompt", "editing_prompt")
PIE_MASK_SHAPE = (512, 512)
# editing_type_id -> its category, as cure-lab/PnPInversion's README names them, shortened ("4. change sth's content",
# folder 4_change_attribute_content_40 -> "change content"; "8. change image background" -> "change background")
PIE_EDIT_TYPES = {"0": "random", "1": "change object", "2": "add object", "3": "delete object",
                  "4": "change content", "5": "change pose", "6": "change color", "7": "change material",
                  "8": "change background", "9": "change style"}


@dataclass(eq=False)  # identity equality: comparing mask arrays with == would be ambiguous
class EditSample:
    """One edit to run: a source image, the prompt that describes it, the prompt to edit towards."""

    id: str
    image: Image.Image | Callable[[], Image.Image]  # a PIL image, or a zero-argument loader (decoded on demand)
    source_prompt: str
    target_prompt: str
    instruction: str | None = None
    mask: np.ndarray | None = None  # HxW bool, True = region the edit should change
    meta: dict = field(default_factory=dict)
    edit_type: str | None = None  # the data set's category of the edit (PIE-Bench: "1 change object"), if any

    def get_image(self) -> Image.Image:
        """The source image as RGB PIL, running the lazy loader if there is one."""
        image = self.image if isinstance(self.image, Image.Image) else self.image()
        return image.convert("RGB")


def _check_limit(limit: int | None) -> int | None:
    """Validate a sample limit (None = all)."""
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise NTIError(f"limit must be a non-negative integer or None, got {limit!r}")
    return limit


def _decode_image_bytes(data: bytes, label: str) -> Image.Image:
    """An RGB PIL image from encoded bytes (PNG, JPEG, ...); the error names where the bytes came from."""
    return open_image(data, f"{label}: image bytes")


# --- GenAI-Bench (TIGER-Lab image-edition parquet) -------------------------------------------------------------


def _genai_image_bytes(value, label: str) -> bytes:
    """Encoded image bytes from a source_image cell: a {'bytes': ...} struct (HF Image feature) or raw bytes."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value):
        return bytes(value)
    raise NTIError(f"{label}: source_image holds no image bytes (got {type(value).__name__})")


def _genai_prompt(record: dict, column: str, label: str) -> str | None:
    """A row's prompt, None when it is empty (the row is skipped, with a warning: inverting or editing under an empty
    prompt is another experiment); NTIError when the column holds something other than text."""
    prompt = record[column]
    if prompt is not None and not isinstance(prompt, str):
        raise NTIError(f"{label}: {column} must be text, got {type(prompt).__name__}")
    return None if prompt is None or is_blank(prompt) else prompt


def load_genai_bench(parquet_path: str | os.PathLike, limit: int | None = None,
                     dedupe: bool = True) -> list[EditSample]:
    """GenAI-Bench image-edition rows; dedupe drops repeats of the same image and prompts (arena rows repeat inputs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    limit = _check_limit(limit)
    path = Path(parquet_path).expanduser()
    if not path.is_file():
        raise NTIError(f"GenAI-Bench parquet {path} does not exist")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise NTIError(f"{path} is not a readable parquet file ({err})") from None
    names = parquet.schema_arrow.names
    missing = [column for column in GENAI_COLUMNS if column not in names]
    if missing:
        raise NTIError(f"{path} lacks GenAI-Bench column(s) {', '.join(missing)} (it has: {', '.join(names)})")
    # small scalar columns (ids, model names, votes) travel in meta; other images and structs stay on disk
    scalar = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_floating,
              pa.types.is_boolean)
    meta_columns = [f.name for f in parquet.schema_arrow
                    if f.name not in GENAI_COLUMNS and any(check(f.type) for check in scalar)]
    samples, seen, empty = [], set(), []
    if limit == 0:
        return samples
    batches = parquet.iter_batches(batch_size=64, columns=list(GENAI_COLUMNS) + meta_columns)
    for row, record in enumerate(record for batch in batches for record in batch.to_pylist()):
        label = f"{path.name} row {row}"
        data = _genai_image_bytes(record["source_image"], label)
        source, target = (_genai_prompt(record, column, label) for column in ("source_prompt", "target_prompt"))
        instruction = record["instruct_prompt"] or None
        key = (hashlib.sha1(data).hexdigest(), source, target, instruction)
        if source is None or target is None:
            empty.append(row)
        elif not (dedupe and key in seen):
            seen.add(key)
            meta = {"dataset": "genai-bench", "row": row, **{c: record[c] for c in meta_columns}}
            sample_id = str(record["id"]) if record.get("id") is not None else f"genai-{row:04d}"
            samples.append(EditSample(sample_id, partial(_decode_image_bytes, data, label), source, target,
                                      instruction, None, meta))
            if limit is not None and len(samples) >= limit:
                break
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        log.warning("%s: %d row(s) with an empty source_prompt or target_prompt skipped (rows %s)", path.name,
                    len(empty), shown)
    return samples


# --- PIE-Bench ---------------------------------------------------------------------------------------------------


def decode_pie_mask(rle, shape: tuple[int, int] = PIE_MASK_SHAPE, mark_border: bool = False) -> np.ndarray:
    """HxW bool mask from PIE-Bench run-length code: flat [start, length, start, length, ...] over row-major pixels.

    Assumes PIE-Bench's convention: starts index the flattened 512x512 image (row-major, C order), runs are the
    edited region (True), runs past the end are clipped. PIE-Bench's own evaluation also marks the one-pixel image
    border as edited (so it never counts as background); mark_border=True reproduces that, off by default.
    """
    height, width = shape
    size = height * width
    code = np.asarray(rle)
    # PnPInversion's mask_decode indexes with these numbers: a float, a text or a nested pair would be truncated or
    # flattened into another mask here, so only a flat list of integers is PIE-Bench's code
    if code.size and (code.ndim != 1 or code.dtype.kind not in "biu"):
        raise NTIError("PIE-Bench mask code must be a flat list of whole numbers [start, length, ...]")
    code = code.astype(np.int64)
    if code.size % 2:
        raise NTIError(f"PIE-Bench mask code must hold [start, length] pairs, got an odd count ({code.size})")
    starts, lengths = code[0::2], code[1::2]
    if (starts < 0).any() or (lengths < 0).any():
        raise NTIError("PIE-Bench mask code has a negative start or length")
    starts = np.minimum(starts, size)
    ends = np.minimum(starts + lengths, size)
    # +1 at each run start, -1 at each end: the running sum is > 0 inside any run (overlaps are fine)
    edges = np.zeros(size + 1, dtype=np.int64)
    np.add.at(edges, starts, 1)
    np.add.at(edges, ends, -1)
    mask = (np.cumsum(edges[:-1]) > 0).reshape(height, width)
    if mark_border:
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def strip_brackets(prompt: str) -> str:
    """A PIE-Bench prompt without the [ ] that mark edited words, whitespace collapsed."""
    return " ".join(re.sub(r"[\[\]]", "", prompt).split())


def _unique_keys(pairs: list[tuple]) -> dict:
    """A JSON object as a dict, refusing a repeated key (json's default keeps the last: a sample would vanish)."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise NTIError(f"it names {key!r} twice; give each entry (and each field of one) a unique key")
        seen[key] = value
    return seen


def load_pie_bench(root: str | os.PathLike, limit: int | None = None,
                   mark_border: bool = False) -> list[EditSample]:
    """PIE-Bench from root/mapping_file.json and root/annotation_images/; prompts unbracketed, masks decoded."""
    limit = _check_limit(limit)
    root = Path(root).expanduser()
    mapping_path = root / PIE_MAPPING
    if not mapping_path.is_file():
        raise NTIError(f"{root} is not a PIE-Bench folder: {PIE_MAPPING} is missing")
    try:  # a byte-order mark (Windows editors) is not JSON
        mapping = json.loads(mapping_path.read_text(encoding="utf-8-sig"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as err:
        raise NTIError(f"{mapping_path} is not UTF-8 ({err.reason} at byte {err.start}); save it as UTF-8") from None
    except NTIError as err:  # a repeated key
        raise NTIError(f"{mapping_path}: {err}") from None
    except ValueError as err:
        raise NTIError(f"{mapping_path} is not valid JSON ({err})") from None
    if not isinstance(mapping, dict):
        raise NTIError(f"{mapping_path} must map id -> record, got a {type(mapping).__name__}")
    samples = []
    for sample_id, record in mapping.items():
        if limit is not None and len(samples) >= limit:
            break
        missing = [key for key in PIE_REQUIRED if not isinstance(record, dict) or key not in record]
        if missing:
            raise NTIError(f"{mapping_path}: entry {sample_id} lacks {', '.join(missing)}")
        if not isinstance(record["image_path"], str) or not record["image_path"].strip():
            raise NTIError(f"{mapping_path}: entry {sample_id}: image_path must be a file name under "
                           f"annotation_images/, got {record['image_path']!r}")
        for key in ("original_prompt", "editing_prompt"):
            if not isinstance(record[key], str):
                raise NTIError(f"{mapping_path}: entry {sample_id}: {key} must be text, got "
                               f"{type(record[key]).__name__}")
            if is_blank(strip_brackets(record[key])):
                raise NTIError(f"{mapping_path}: entry {sample_id}: {key} is empty; give the prompt")
        image_path = root / "annotation_images" / record["image_path"]
        if not image_path.is_file():
            raise NTIError(f"{mapping_path}: entry {sample_id} names image {image_path}, which does not exist")
        mask = None
        if record.get("mask") is not None:
            try:
                mask = decode_pie_mask(record["mask"], mark_border=mark_border)
            except (NTIError, ValueError, TypeError) as err:
                raise NTIError(f"{mapping_path}: entry {sample_id} has a bad mask: {err}") from None
        type_id = record.get("editing_type_id")
        meta = {"dataset": "pie-bench", "image_path": record["image_path"], "editing_type_id": type_id,
                "blended_word": record.get("blended_word"), "original_prompt": record["original_prompt"],
                "editing_prompt": record["editing_prompt"]}
        edit_type = None if type_id is None else f"{type_id} {PIE_EDIT_TYPES.get(str(type_id), 'unknown')}"
        # as stored, no EXIF orientation: PnPInversion's Image.open, and its masks index those pixels
        samples.append(EditSample(str(sample_id), partial(load_image, image_path, as_stored=True),
                                  strip_brackets(record["original_prompt"]), strip_brackets(record["editing_prompt"]),
                                  record.get("editing_instruction") or None, mask, meta, edit_type))
    return samples


# --- prompt JSONL folders (and the bundled sample) ---------------------------------------------------------------


def _load_mask_file(path: Path) -> np.ndarray:
    """HxW bool from a mask image: pixels brighter than half scale are the edited region."""
    return np.asarray(open_image(path, f"mask {path}").convert("L")) > 127


def spread_over_sources(samples: list[EditSample], sources: list[str]) -> list[EditSample]:
    """The samples reordered so that one edit of every source image comes before a second edit of any (first
    appearance order within each round): the first N then cover min(N, images) images, and a larger N extends the
    same order."""
    groups: dict[str, list[EditSample]] = {}
    for sample, source in zip(samples, sources):
        groups.setdefault(source, []).append(sample)
    rounds = max((len(group) for group in groups.values()), default=0)
    return [group[k] for k in range(rounds) for group in groups.values() if k < len(group)]


@dataclass
class PromptRecord:
    """One line of a prompts JSONL: the one reader behind `nti edit FILE.jsonl` and `nti eval --data FILE.jsonl`."""

    id: str
    image: str  # a path (relative paths resolved against the file's folder) or 'skimage:NAME'
    source_prompt: str | None  # optional here; `nti edit` falls back to --prompt, `nti eval` requires it
    target_prompt: str | None
    mask: Path | None = None  # HxW image, bright = the region the edit should change
    instruction: str | None = None
    edit_type: str | None = None
    meta: dict = field(default_factory=dict)  # the line's other fields
    where: str = ""  # "FILE, line N", for error messages
    line: int = 0


RECORD_FIELDS = {"id", "image", "skimage", "mask", "source_prompt", "target_prompt", "instruction"}


def read_prompts_jsonl(path: str | os.PathLike, require_prompts: bool = False,
                       on_error: Callable[[str], None] | None = None) -> list[PromptRecord]:
    """Records of a prompts JSONL: one {"image": PATH or "skimage:NAME" | "skimage": NAME, "source_prompt",
    "target_prompt", "id", "mask", "instruction", ...} object per line (blank lines skipped). Errors name the line.
    The prompts are optional unless `require_prompts` (evaluation); `nti edit` fills them from --prompt/--target.
    Without `on_error` the first bad line raises NTIError; with it, each bad line is handed to it and skipped (a
    batch finishes the good lines and lists every bad one)."""
    def fail(message: str) -> None:
        if on_error is None:
            raise NTIError(message)
        on_error(message)

    jsonl = Path(path).expanduser()
    try:
        if not jsonl.is_file():
            fail(f"{jsonl} does not exist (a folder needs a prompts.jsonl, or give the .jsonl path)")
            return []
        text = jsonl.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not JSON
    except OSError as err:  # is_file raises for a name too long to look up
        fail(f"JSONL file {jsonl} could not be read: {err.strerror or err}")
        return []
    except UnicodeDecodeError as err:  # name the line: the rest of the file may be fine
        line = err.object[:err.start].count(b"\n") + 1
        fail(f"JSONL file {jsonl}: line {line} is not UTF-8 ({err.reason} at byte {err.start}); save it as UTF-8")
        return []
    records, ids = [], set()
    # records end at \n, \r\n or \r only: str.splitlines would also cut at U+2028, U+2029 and U+0085, valid raw inside
    # a JSON string (a prompt), leaving two halves that are not JSON
    for number, line in enumerate(re.split(r"\r\n?|\n", text), start=1):
        if not line.strip():
            continue
        try:
            record = _prompt_record(line, f"{jsonl}, line {number}", number, jsonl.parent, require_prompts, ids)
        except NTIError as err:
            fail(str(err))
            continue
        except OSError as err:  # an image or mask path too long to look up
            fail(f"{jsonl}, line {number}: {err.filename}: {err.strerror or err}")
            continue
        ids.add(record.id)
        records.append(record)
    return records


def _prompt_record(line: str, where: str, number: int, base: Path, require_prompts: bool, ids: set) -> PromptRecord:
    """One JSONL line as a record; NTIError naming the line if it is not one."""
    try:
        record = json.loads(line)
    except ValueError as err:
        raise NTIError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise NTIError(f"{where}: expected a JSON object, got {type(record).__name__}")
    wrong = [key for key in ("source_prompt", "target_prompt") if key in record and not isinstance(record[key], str)]
    if wrong:
        raise NTIError(f"{where}: {', '.join(wrong)} must be text, got "
                       f"{', '.join(type(record[key]).__name__ for key in wrong)}")
    empty = [key for key in ("source_prompt", "target_prompt") if (key in record or require_prompts)
             and is_blank(str(record.get(key) or ""))]
    if empty:
        raise NTIError(f"{where}: missing or empty field(s) {', '.join(empty)}")
    if ("image" in record) == ("skimage" in record):
        raise NTIError(f"{where}: give exactly one of 'image' (a path) or 'skimage' (a scikit-image photo)")
    name = record["skimage"] if "skimage" in record else record["image"]
    if not isinstance(name, str) or not name.strip():
        raise NTIError(f"{where}: 'image' / 'skimage' must name a file or photo, got {name!r}")
    if "skimage" in record or name.startswith(SKIMAGE_PREFIX):
        name = name.removeprefix(SKIMAGE_PREFIX)
        if name not in skimage_names():
            raise NTIError(f"{where}: scikit-image has no bundled image {name!r}")
        image, default_id = SKIMAGE_PREFIX + name, name
    else:
        image_path = base / name
        check_image_file(image_path, where)
        image, default_id = str(image_path), image_path.stem
    mask = None
    if record.get("mask"):
        mask = base / str(record["mask"])
        if not mask.is_file():
            raise NTIError(f"{where}: mask {mask} {'is not a file' if mask.exists() else 'does not exist'}")
    record_id = record.get("id")
    if record_id is not None and (isinstance(record_id, bool) or not isinstance(record_id, (str, int))):
        raise NTIError(f"{where}: 'id' must be text or a number, got {type(record_id).__name__}")
    sample_id = str(record_id if record_id not in (None, "") else default_id)
    if sample_id in ids:
        derived = " taken from the image's name" if record_id in (None, "") else ""
        raise NTIError(f"{where}: duplicate id {sample_id!r}{derived} (give each line a unique 'id')")
    edit_type = record.get("edit_type") or record.get("edit")  # the bundled sets' names for it
    return PromptRecord(
        sample_id, image, _stripped(record.get("source_prompt")), _stripped(record.get("target_prompt")),
        mask, record.get("instruction") or None, None if edit_type is None else str(edit_type),
        {k: v for k, v in record.items() if k not in RECORD_FIELDS}, where, number)


def _stripped(prompt: str | None) -> str | None:
    return None if prompt is None else prompt.strip()


def load_folder(path: str | os.PathLike, limit: int | None = None) -> list[EditSample]:
    """Samples from a prompts.jsonl (in a folder, or given directly; read_prompts_jsonl), each with both prompts;
    with a limit, the first `limit` of them spread over distinct images (spread_over_sources)."""
    limit = _check_limit(limit)
    path = Path(path).expanduser()
    samples, sources = [], []
    for record in read_prompts_jsonl(path / "prompts.jsonl" if path.is_dir() else path, require_prompts=True):
        source = record.image if record.image.startswith(SKIMAGE_PREFIX) else str(Path(record.image).resolve())
        meta = {"dataset": "folder", "line": record.line, **record.meta}
        samples.append(EditSample(record.id, partial(load_image, record.image), record.source_prompt,
                                  record.target_prompt, record.instruction,
                                  None if record.mask is None else _load_mask_file(record.mask), meta,
                                  record.edit_type))
        sources.append(source)
    # several edits of one image (the bundled scenes: a colour and a shape edit each) would otherwise make
    # `--n 2` two edits of the same image, whose reconstructions are the same inversion: no spread at all
    return spread_over_sources(samples, sources)[:limit]


def load_bundled(name: str = "sample", limit: int | None = None) -> list[EditSample]:
    """A bundled data set (BUNDLED): 'sample', scikit-image's photos (cat, astronaut, coffee, ...) with written edit
    prompts; 'scenes', the shapes model's rendered scenes with colour and shape edits and the edited object's mask."""
    samples = load_folder(BUNDLED[name], limit=limit)
    for sample in samples:
        sample.meta["dataset"] = name
    return samples


def load_dataset(spec: str | os.PathLike, limit: int | None = None) -> list[EditSample]:
    """Samples from 'sample', 'scenes', a GenAI-Bench .parquet, a PIE-Bench folder, or a prompts folder / .jsonl."""
    text = str(spec)
    if text in BUNDLED:
        return load_bundled(text, limit)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".parquet":
        return load_genai_bench(path, limit)
    if path.is_dir() and (path / PIE_MAPPING).is_file():
        return load_pie_bench(path, limit)
    if path.name == PIE_MAPPING and path.is_file():
        return load_pie_bench(path.parent, limit)
    if (path.is_dir() and (path / "prompts.jsonl").is_file()) or (path.suffix.lower() == ".jsonl" and path.is_file()):
        return load_folder(path, limit)
    what = "does not exist" if not path.exists() else "is not a dataset this loader knows"
    raise NTIError(f"dataset {text!r} {what}: give 'sample', 'scenes', a GenAI-Bench .parquet, a PIE-Bench folder "
                   f"(with {PIE_MAPPING}), or a folder with prompts.jsonl / a .jsonl file")
