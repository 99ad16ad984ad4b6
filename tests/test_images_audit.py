"""Audit of the image reader and writer (engine/images.py) and the shapes test bed (engine/testbed/): each defect's
test failed before its fix; the rest pin behaviour against independent computations (the official notebook's
load_512, hand-made images) and the numbers docs/shapes-model.md quotes."""
import io
import json
import random
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from nti.config import NTIError
from nti.images import center_square, load_image, load_square, png_bytes, save_png, to_pil, to_tensor
from nti.testbed import scenes


def camera_jpeg(path):
    """A JPEG with an MP Format index, as phones write (a second image after the photo: an HDR gain map, a depth
    map or a preview); Pillow opens it as format MPO with 2 frames."""
    photo = Image.new("RGB", (24, 16), (200, 60, 30))
    photo.save(path, "MPO", save_all=True, append_images=[Image.new("RGB", (6, 4), (0, 0, 0))])
    with Image.open(path) as img:
        assert img.format == "MPO" and img.n_frames == 2
    return path


# ------------------------------------------------------------------------------------------------------ reading

def test_a_phone_jpeg_with_a_gain_map_is_read_as_its_photo(tmp_path):
    """Camera and phone JPEGs carrying an MPF index (HDR gain map, depth map, preview) were refused as 'animated or
    multi-page (2 frames)'; every viewer shows their first image, the photo."""
    pixels = np.asarray(load_image(camera_jpeg(tmp_path / "phone.jpg")))
    assert pixels.shape == (16, 24, 3) and np.abs(pixels.astype(int) - (200, 60, 30)).max() <= 3
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(NTIError, match=r"anim.gif is animated or multi-page \(2 frames\)"):  # still refused
        load_image(tmp_path / "anim.gif")


def test_nti_serve_takes_a_phone_jpeg_too(tmp_path):
    """The upload reader refused the same file as 'format MPO is not accepted; send one of PNG, JPEG, ...'."""
    pytest.importorskip("fastapi")
    from nti.serve import ServeSettings, read_image

    path = camera_jpeg(tmp_path / "phone.jpg")
    served = np.asarray(read_image(path.read_bytes(), ServeSettings()))
    assert np.array_equal(served, np.asarray(load_image(path)))


# ------------------------------------------------------------------------------------------------------ writing

def test_written_pngs_carry_no_colour_profile_of_the_input(tmp_path):
    """nti reads pixels as they are stored (as the notebook; no colour management), but the square of an input with
    an ICC profile kept the profile in its info, and save_png / png_bytes wrote it: `nti eval`'s source.png (what the
    model saw) then showed other colours than the reconstructions and edits beside it, written without one."""
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    pixels = np.random.RandomState(0).randint(0, 256, (40, 50, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "profiled.png", icc_profile=profile)
    square = load_square(tmp_path / "profiled.png", 32, "image profiled.png")
    save_png(square, tmp_path / "source.png", request="key")
    for written in (Image.open(tmp_path / "source.png"), Image.open(io.BytesIO(png_bytes(square)))):
        with written:
            assert "icc_profile" not in written.info and written.info["Software"] == "nti"
            assert np.array_equal(np.asarray(written), np.asarray(square))  # the pixels the model saw, exactly
    assert Image.open(tmp_path / "source.png").info["nti-request"] == "key"


# -------------------------------------------------------------------------------------------------- scene oracle

def canvas(background: str, size: int = 32) -> np.ndarray:
    return np.tile(np.array(scenes.BACKGROUNDS[background], np.uint8), (size, size, 1))


def test_the_oracle_reads_a_dark_8_bit_image_as_it_is():
    """read_scene took any image whose values were all <= 1 for a 0..1 float image and multiplied it by 255: a
    near-black PIL image (a decoder gone dark) read as 'a yellow square on a black background'."""
    dark = np.zeros((32, 32, 3), np.uint8)
    dark[10:20, 10:20] = 1
    reading = scenes.read_scene(Image.fromarray(dark))
    assert reading.background == "black" and reading.objects == ()
    assert scenes.read_scene(dark).objects == ()  # a uint8 array as well
    floats = canvas("gray").astype(np.float32) / 255  # a 0..1 float image is still scaled
    floats[10:22, 8:20] = np.array(scenes.COLOURS["red"]) / 255
    assert scenes.read_scene(floats).objects == (("red", "square"),)


def test_hand_drawn_shapes_read_as_drawn():
    """Shapes drawn with numpy (no PIL drawing, no anti-aliasing), not with the renderer the oracle's templates use."""
    ys, xs = np.mgrid[:32, :32] + 0.5
    image = canvas("white")
    image[10:22, 3:15] = scenes.COLOURS["red"]  # a 12 px square on the left
    image[(ys - 16) ** 2 + (xs - 24.5) ** 2 <= 25] = scenes.COLOURS["green"]  # a disc of radius 5 on the right
    assert scenes.read_scene(Image.fromarray(image)).objects == (("red", "square"), ("green", "circle"))
    image = canvas("gray")
    image[(ys >= 9) & (ys <= 23) & (np.abs(xs - 16) <= (ys - 9) / 2)] = scenes.COLOURS["yellow"]  # apex up
    reading = scenes.read_scene(Image.fromarray(image))
    assert reading.background == "gray" and reading.objects == (("yellow", "triangle"),)
    assert reading.matches("a yellow triangle on a gray background")


def test_random_scene_refuses_an_object_count_it_cannot_draw():
    """n_objects=3 gave a two-object scene and n_objects=0 a random one, silently."""
    for n in (0, 3, -1):
        with pytest.raises(ValueError, match=f"n_objects must be 1 or 2 .or None for either., got {n}"):
            scenes.random_scene(random.Random(0), n_objects=n)
    assert {len(scenes.random_scene(random.Random(s), n_objects=2).objects) for s in range(20)} == {2}


# ------------------------------------------------------------------------------- pinned: what was checked and held

def notebook_load(pixels: np.ndarray, size: int) -> np.ndarray:
    """The official notebook's load_512 (null_text_w_ptp.ipynb), offsets 0, at `size`: centre square by numpy
    slicing, then PIL's default resize (bicubic), as its image2latent then maps it: x / 127.5 - 1."""
    h, w, _ = pixels.shape
    if h < w:
        offset = (w - h) // 2
        pixels = pixels[:, offset:offset + h]
    elif w < h:
        offset = (h - w) // 2
        pixels = pixels[offset:offset + w]
    square = np.array(Image.fromarray(pixels).resize((size, size)))
    return square.astype(np.float32) / 127.5 - 1


@pytest.mark.parametrize("h, w", [(37, 61), (61, 37), (32, 32), (3, 5), (100, 9), (513, 512), (33, 33)])
def test_the_square_fed_to_the_vae_is_the_notebooks(h, w):
    pixels = np.random.RandomState(h * w).randint(0, 256, (h, w, 3)).astype(np.uint8)
    for size in (32, 64):
        ours = to_tensor(center_square(load_image(pixels), size))
        assert ours.shape == (1, 3, size, size) and ours.dtype == torch.float32
        assert torch.equal(ours[0].permute(1, 2, 0), torch.from_numpy(notebook_load(pixels, size)))
    assert to_tensor(Image.fromarray(np.array([[[0, 255, 128]]], np.uint8))).flatten().tolist() == [
        -1.0, 1.0, pytest.approx(128 / 127.5 - 1, abs=1e-7)]  # float32


def test_every_exif_orientation_turns_the_image_as_a_viewer_does(tmp_path):
    stored = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    viewed = {1: stored, 2: stored[:, ::-1], 3: stored[::-1, ::-1], 4: stored[::-1], 5: stored.transpose(1, 0, 2),
              6: np.rot90(stored, -1), 7: stored[::-1, ::-1].transpose(1, 0, 2), 8: np.rot90(stored, 1)}
    for orientation, expected in viewed.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        for fmt, suffix in (("PNG", "png"), ("WEBP", "webp")):
            path = tmp_path / f"o{orientation}.{suffix}"
            options = {"lossless": True} if fmt == "WEBP" else {}
            Image.fromarray(stored).save(path, fmt, exif=exif.tobytes(), **options)
            assert np.array_equal(np.asarray(load_image(path)), expected), (orientation, fmt)
            assert np.array_equal(np.asarray(load_image(path, as_stored=True)), stored), (orientation, fmt)


def test_every_pil_mode_becomes_the_rgb_a_viewer_shows(tmp_path):
    def rgb(img):
        return np.asarray(load_image(img)).tolist()

    assert rgb(Image.fromarray(np.array([[False, True]]))) == [[[0] * 3, [255] * 3]]  # mode 1
    assert rgb(Image.fromarray(np.array([[7, 200]], np.uint8))) == [[[7] * 3, [200] * 3]]  # L
    assert rgb(Image.fromarray(np.array([[[50, 0], [50, 255]]], np.uint8), "LA")) == [[[255] * 3, [50] * 3]]
    assert rgb(Image.fromarray(np.array([[[9, 8, 7, 0], [9, 8, 7, 255]]], np.uint8))) == [[[255] * 3, [9, 8, 7]]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 40, 50, 60])
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png")
    palette.save(tmp_path / "pt.png", transparency=0)
    palette.save(tmp_path / "pt.gif", transparency=0)
    assert rgb(tmp_path / "p.png") == [[[10, 20, 30], [40, 50, 60]]]
    assert rgb(tmp_path / "pt.png") == rgb(tmp_path / "pt.gif") == [[[255] * 3, [40, 50, 60]]]
    Image.fromarray(np.array([[0, 100, 200]], np.uint8)).save(tmp_path / "lt.png", transparency=100)
    assert rgb(tmp_path / "lt.png") == [[[0] * 3, [255] * 3, [200] * 3]]
    Image.new("CMYK", (1, 1), (0, 255, 255, 0)).save(tmp_path / "c.tif")
    assert rgb(tmp_path / "c.tif") == [[[255, 0, 0]]]
    Image.fromarray(np.array([[0, 200, 65535]], np.uint16)).save(tmp_path / "g16.png")  # I;16: scaled, not clipped
    assert rgb(tmp_path / "g16.png") == [[[0] * 3, [1] * 3, [255] * 3]]
    Image.fromarray(np.array([[0, 77, 255]], np.int32)).save(tmp_path / "i.tif")  # I within 0..255: as it is
    assert rgb(tmp_path / "i.tif") == [[[0] * 3, [77] * 3, [255] * 3]]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(tmp_path / "f.tif")  # F in 0..1
    assert rgb(tmp_path / "f.tif") == [[[0] * 3, [128] * 3, [255] * 3]]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_16_bit_rgb_png_bombs_and_files_that_are_no_image(tmp_path):
    rows = np.array([[[0, 32896, 65535], [2570, 33096, 65407]]], np.uint16)  # 16-bit RGB, which PIL reads as RGB
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rows)
    header = b"\x89PNG\r\n\x1a\n"
    (tmp_path / "rgb16.png").write_bytes(header + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0))
                                         + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))
    assert np.array_equal(np.asarray(load_image(tmp_path / "rgb16.png")), np.round(rows / 257))
    for w, h in ((10000, 10000), (1, 100_000_000), (65535, 65535)):  # headers only: nothing is allocated
        (tmp_path / "bomb.png").write_bytes(header + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                                            + png_chunk(b"IEND", b""))
        with pytest.raises(NTIError, match=r"bomb.png is too large to decode safely .*; downscale it first"):
            load_image(tmp_path / "bomb.png")
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ("notes.png", "empty.png"):
        with pytest.raises(NTIError, match=f"{name} is not a readable image"):
            load_image(tmp_path / name)
    with pytest.raises(NTIError, match=r"is empty \(0x0 pixels\)"):
        load_square(Image.new("RGB", (0, 0)), 32, "image nothing")
    assert load_square(Image.new("RGB", (1, 1), (1, 2, 3)), 32, "image dot").getpixel((31, 31)) == (1, 2, 3)


def test_outputs_round_trip_their_8_bit_pixels_exactly(tmp_path):
    decoded = torch.rand(2, 3, 16, 16)
    images = to_pil(decoded)
    expected = (decoded.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # VaeImageProcessor's rounding
    for k, img in enumerate(images):
        save_png(img, tmp_path / f"out{k}.png")
        assert np.array_equal(np.asarray(load_image(tmp_path / f"out{k}.png")), expected[k])
    with pytest.raises(NTIError, match="must end in .png"):
        save_png(images[0], tmp_path / "out.jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out0.png", "out1.png"]  # no temp file left behind


# -------------------------------------------------------------------------------------- test bed and its claims

SCENE_DIGEST = """
import hashlib, random
import numpy as np
from nti.testbed import scenes
digest = hashlib.sha256()
for seed in range(12):
    rng = random.Random(seed)
    scene = scenes.random_scene(rng)
    digest.update(scene.caption.encode() + np.asarray(scenes.render(scene)).tobytes())
    for kind, target, index in scenes.edit_pairs(rng, scene):
        digest.update(f"{kind} {target.caption} {index} {scenes.is_held_out(target.caption)}".encode())
print(digest.hexdigest())
"""


def test_scenes_are_the_same_for_a_seed_in_every_process():
    """Captions, pixels, edits and held-out choices depend on the seed alone (no hash() of a str, which
    PYTHONHASHSEED changes from process to process)."""
    import os

    digests = {subprocess.run([sys.executable, "-c", SCENE_DIGEST], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(digests) == 1


def test_the_shipped_scene_examples_are_what_write_examples_draws(tmp_path):
    from nti.testbed.train import EXAMPLES_FOLDER, write_examples

    write_examples(tmp_path)
    assert (tmp_path / "prompts.jsonl").read_text() == (EXAMPLES_FOLDER / "prompts.jsonl").read_text()
    for made in tmp_path.glob("*.png"):
        assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(EXAMPLES_FOLDER / made.name)))


def test_shapes_model_doc_numbers(shapes_pipe):
    """docs/shapes-model.md: 21 MB of fp32 safetensors (UNet 16.8, VAE 3.8, text encoder 0.6), 32 px images, 8x8x4
    latents (VAE factor 4), 16-token prompts, every 9th single-object and ~1 in 10 two-object captions held out,
    the training settings and time, and the VAE round trip's 39.10 dB on the benchmark's 40 scenes."""
    from safetensors.torch import load_file

    from nti.metrics import psnr
    from nti.models import SHAPES_FOLDER, decode_latents, encode_images

    megabytes = {f.parent.name: f.stat().st_size / 1e6 for f in SHAPES_FOLDER.rglob("*.safetensors")}
    assert {k: round(v, 1) for k, v in megabytes.items()} == {"unet": 16.8, "vae": 3.8, "text_encoder": 0.6}
    assert round(sum(megabytes.values())) == 21
    assert {t.dtype for f in SHAPES_FOLDER.rglob("*.safetensors") for t in load_file(f).values()} == {torch.float32}
    assert (shapes_pipe.resolution, shapes_pipe.latent_shape, shapes_pipe.vae_scale_factor) == (32, (4, 8, 8), 4)
    longest = "an orange triangle and an orange triangle on a black background"
    assert shapes_pipe.tokenizer.model_max_length == 16 and len(shapes_pipe.tokenizer(longest).input_ids) <= 16
    singles = [scenes.Scene(bg, (scenes.Shape(c, s),)).caption for bg in scenes.BACKGROUNDS for c in scenes.COLOURS
               for s in scenes.SHAPES]
    pairs = [scenes.Scene(bg, (scenes.Shape(c, s), scenes.Shape(d, t))).caption for bg in scenes.BACKGROUNDS
             for c in scenes.COLOURS for s in scenes.SHAPES for d in scenes.COLOURS for t in scenes.SHAPES]
    assert sum(map(scenes.is_held_out, singles)) * 9 == len(singles)
    assert 0.09 < np.mean([scenes.is_held_out(c) for c in pairs]) < 0.11
    recorded = json.loads((SHAPES_FOLDER / "train_config.json").read_text())
    assert (recorded["vae_steps"], recorded["unet_steps"], recorded["batch_size"], recorded["caption_dropout"],
            recorded["seconds_this_run"]) == (4000, 10000, 64, 0.1, 7140)
    rng = random.Random(100)  # bench_testbed's scenes: random.Random(seed + 100), seed 0, 40 scenes
    images = [scenes.render(scenes.random_scene(rng)) for _ in range(40)]
    pixels = torch.cat([to_tensor(img) for img in images])
    round_trip = to_pil(decode_latents(shapes_pipe, encode_images(shapes_pipe, pixels)))
    assert np.mean([psnr(a, b) for a, b in zip(images, round_trip)]) == pytest.approx(39.10, abs=0.01)


def test_a_16_bit_grey_png_colour_key_is_transparent_over_white(tmp_path):
    """An 8-bit grey PNG's tRNS colour key shows white (transparent over white, as a viewer shows it); a 16-bit grey
    PNG's was ignored: its transparent pixels kept their grey."""
    Image.fromarray(np.array([[0, 300, 65535]], np.uint16)).save(tmp_path / "keyed.png", transparency=300)
    assert np.asarray(load_image(tmp_path / "keyed.png")).tolist() == [[[0] * 3, [255] * 3, [255] * 3]]
    Image.fromarray(np.array([[0, 300, 65535]], np.uint16)).save(tmp_path / "plain.png")
    assert np.asarray(load_image(tmp_path / "plain.png")).tolist() == [[[0] * 3, [1] * 3, [255] * 3]]


def test_training_refuses_to_write_over_a_model_before_it_trains(tmp_path, capsys, monkeypatch):
    """`python -m nti.testbed` with no --out retrained over the shipped model (engine/assets/shapes) when done; an
    --out that holds a model is now refused up front (exit 2), and --out must be given."""
    import nti.testbed.train as train

    monkeypatch.setattr(train, "train", lambda *args: pytest.fail("training started"))
    with pytest.raises(SystemExit) as exit_info:
        train.main([])
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err
    shipped = train.SHAPES_FOLDER / "model_index.json"
    before = shipped.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--out", str(train.SHAPES_FOLDER)])
    assert exit_info.value.code == 2 and "already holds a model; pass --overwrite" in capsys.readouterr().err
    assert shipped.read_bytes() == before
    calls = []
    monkeypatch.setattr(train, "train", lambda config, out, work, device: calls.append(out) or out)
    train.main(["--out", str(train.SHAPES_FOLDER), "--overwrite", "--work", str(tmp_path)])
    assert calls == [train.SHAPES_FOLDER]


def test_nti_serve_stores_an_uploads_square_without_its_colour_profile(tmp_path):
    """nti serve kept its own PNG writer, which wrote the upload's ICC profile into the stored source square (the
    one GET /v1/inversions/{id}/source returns): the same colour shift as source.png had."""
    pytest.importorskip("fastapi")
    from PIL import ImageCms

    import nti.serve
    from nti.serve import ServeSettings, read_image

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    upload = io.BytesIO()
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(upload, format="PNG", icc_profile=profile)
    square = center_square(read_image(upload.getvalue(), ServeSettings()), 32)
    assert "icc_profile" in square.info  # what the upload carried in
    with Image.open(io.BytesIO(nti.serve.png_bytes(square))) as stored:
        assert "icc_profile" not in stored.info and np.array_equal(np.asarray(stored), np.asarray(square))


@pytest.mark.parametrize("size, warned", [((1, 1), True), ((127, 127), True), ((128, 128), False), ((128, 200), False),
                                          ((512, 512), False), ((120, 512), True)])
def test_a_tiny_image_is_said_to_be_upscaled(size, warned):
    """A 1x1 upload was upscaled to 512x512 without a word (crop_warning looked at the aspect ratio only): the model
    then inverts and edits a flat colour. Past 4x the short side is made up more than seen, and that is said."""
    from nti.images import crop_warning

    message = crop_warning(size, 512, "image x.png")
    assert (message is not None) == warned
    if warned and min(size) * 2 >= max(size):  # square-ish: the upscale is the whole reason
        assert f"upscaled {512 / min(size):.1f}x to 512x512" in message and "at least 128 px" in message
