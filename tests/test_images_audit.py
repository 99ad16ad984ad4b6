"""Audit of the image reader and writer (engine/images.py) and the shapes test bed (engine/testbed/): each defect's
test failed before its fix; the rest pin behaviour against independent computations (the official notebook's
load_512, hand-made images) and the numbers docs/shapes-model.md quotes."""
import io
import random

import numpy as np
import pytest
from PIL import Image

from nti.config import NTIError
from nti.images import load_image, load_square, png_bytes, save_png
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
