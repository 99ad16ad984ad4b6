"""Bad input (issue 18) in the image reader: pixel formats, metadata and shapes that gave a silently wrong image, a
bare Pillow warning or a result nobody explained. Each test failed before its fix."""
import warnings

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin

from nti.cli import EXIT_BAD_INPUT, EXIT_OK
from nti.config import NTIError
from nti.images import crop_warning, load_image
# the CLI runner, its one-error-line check and the tiny model's fast options
from test_bad_input import TINY, error_line, run_cli

# an EXIF block whose first IFD promises 5 entries and is cut off inside the first: Pillow warns "Corrupt EXIF data"
TRUNCATED_EXIF = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00\x12\x01"
GARBLED_EXIF = b"Exif\x00\x00garbage"  # no TIFF header at all: Pillow's EXIF parser raises SyntaxError


def signed_tiff(path, values, orientation=None):
    """A 16x16 TIFF of these int16 values (repeated to fill it), tagged as signed samples (SampleFormat 339 = 2)."""
    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[339] = 2
    if orientation is not None:
        info[274] = orientation
    array = np.resize(np.asarray(values, np.int16), (16, 16))
    Image.frombytes("I;16", (16, 16), array.tobytes()).save(path, "TIFF", tiffinfo=info)
    with Image.open(path) as img:  # the file really is read back as signed
        assert img.mode == "I" and np.asarray(img).min() == np.min(values) and np.asarray(img).max() == np.max(values)
    return path


# ---------------------------------------------------------------------------------------------------- pixel formats

def test_a_signed_16_bit_tiff_is_scaled_from_0_to_32767(tmp_path):
    """PIL reads signed 16-bit samples as mode I, 32767 at most; they were scaled as 0..65535: half as bright."""
    grey = np.asarray(load_image(signed_tiff(tmp_path / "signed.tif", [0, 16384, 32767])))[..., 0]
    assert grey.max() == 255 and sorted(np.unique(grey)) == [0, 128, 255]  # mid grey stays mid grey
    # the orientation tag turns the image into a copy without TIFF tags: the sample format is read before that
    turned = np.zeros((16, 16), np.int16)
    turned[:, :8] = 32767  # left half white
    upright = np.asarray(load_image(signed_tiff(tmp_path / "turned.tif", turned, orientation=6)))[..., 0]
    assert upright[:8].min() == 255 and upright[8:].max() == 0  # rotated 90 degrees clockwise, and full white
    # unsigned 16-bit TIFF and PNG as before: 0..65535
    for name in ("unsigned.tif", "unsigned.png"):
        Image.fromarray(np.resize(np.array([0, 32767, 65535], np.uint16), (16, 16))).save(tmp_path / name)
        assert sorted(np.unique(np.asarray(load_image(tmp_path / name)))) == [0, 127, 255], name


def test_negative_signed_16_bit_pixels_are_refused(tmp_path, capsys):
    path = signed_tiff(tmp_path / "negative.tif", [-100, 0, 32767])
    with pytest.raises(NTIError, match=r"negative.tif has pixel values from -100 to 32767, outside 0\.\.32767"):
        load_image(path)
    code, _, err = run_cli(["reconstruct", path, "--prompt", "a cat", "--out", tmp_path / "out", "--method", "ddim",
                            *TINY], capsys)
    assert code == EXIT_BAD_INPUT and "negative.tif" in error_line(err) and "outside 0..32767" in error_line(err)


# --------------------------------------------------------------------------------------------------------- metadata

@pytest.mark.parametrize("fmt, exif", [("JPEG", TRUNCATED_EXIF), ("PNG", TRUNCATED_EXIF), ("PNG", GARBLED_EXIF)],
                         ids=["jpeg-truncated", "png-truncated", "png-garbled"])
def test_corrupt_exif_is_one_nti_warning_and_the_image_is_used_as_stored(tmp_path, nti_warnings, fmt, exif):
    """Pillow printed its own 'Corrupt EXIF data' UserWarning line (no file name, nothing to do), and an EXIF block
    its parser rejects refused an image whose pixels were fine."""
    path = tmp_path / f"photo.{fmt.lower()}"
    Image.fromarray(np.full((16, 24, 3), 120, np.uint8)).save(path, fmt, exif=exif)
    with pytest.warns(UserWarning, match="Corrupt EXIF") if exif == TRUNCATED_EXIF else pytest.raises(SyntaxError):
        with Image.open(path) as img:  # the file does trouble Pillow
            img.getexif()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning that escapes fails the test
        img = load_image(path)
    assert img.size == (24, 16) and abs(np.asarray(img).astype(float).mean() - 120) < 3
    messages = [r.getMessage() for r in nti_warnings]
    assert len(messages) == 1 and str(path) in messages[0], messages
    assert "orientation tag could not be read" in messages[0] and "used as stored" in messages[0]


def test_an_orientation_read_from_partly_corrupt_exif_is_applied_without_a_warning(tmp_path, nti_warnings):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    exif[0x010E] = "x" * 100  # ImageDescription, stored after the IFD: cut off below
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :20] = 255  # left half white
    Image.fromarray(wide).save(tmp_path / "part.png", exif=exif.tobytes()[:-60])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        upright = np.asarray(load_image(tmp_path / "part.png"))
    assert upright.shape == (40, 20, 3) and upright[:15].mean() > 200 and upright[25:].mean() < 50
    assert not nti_warnings


@pytest.mark.filterwarnings("error::UserWarning")
def test_the_cli_says_corrupt_exif_in_one_nti_line(tmp_path, capsys):
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(path, exif=TRUNCATED_EXIF)
    code, _, err = run_cli(["reconstruct", path, "--prompt", "a cat", "--out", tmp_path / "out", "--method", "ddim",
                            *TINY], capsys)
    assert code == EXIT_OK and "Traceback" not in err and "UserWarning" not in err
    lines = [line for line in err.splitlines() if "EXIF" in line]
    assert len(lines) == 1 and lines[0].startswith(f"nti: image {path}: its EXIF data is corrupt"), err


# ----------------------------------------------------------------------------------------------------------- shapes

def test_a_centre_crop_that_drops_most_of_the_image_is_warned_about():
    """A 4000x40 strip became its centre 40x40, upscaled to the model's 512x512, without a word."""
    message = crop_warning((4000, 40), 512, "image strip.png")
    assert message.startswith("image strip.png is 4000x40: the model sees only its centre 40x40 square (1% of")
    assert "upscaled 12.8x to 512x512" in message and "crop or pad it to a square first" in message
    assert "centre 40x40" in crop_warning((40, 4000), 512, "image tall.png")
    assert "upscaled" not in crop_warning((3000, 1000), 512, "image pano.png")  # cut, but not small
    for size in [(1920, 1080), (1080, 1920), (4032, 3024), (6000, 4000), (600, 300), (128, 160), (512, 512)]:
        assert crop_warning(size, 512, "image photo.png") is None, size  # ordinary photos and squares
    assert "upscaled 12.8x" in crop_warning((40, 48), 512, "image icon.png")  # not cut, but made up (4x at most)


def test_the_cli_warns_about_a_strip_and_not_about_a_16_by_9_photo(tmp_path, capsys):
    Image.fromarray(np.full((40, 4000, 3), 120, np.uint8)).save(tmp_path / "strip.png")
    Image.fromarray(np.full((1080, 1920, 3), 120, np.uint8)).save(tmp_path / "photo.png")
    code, _, err = run_cli(["reconstruct", tmp_path / "strip.png", tmp_path / "photo.png", "--prompt", "a red circle",
                            "--out", tmp_path / "out", "--method", "ddim", "--steps", "2", "--quiet", "--device",
                            "cpu"], capsys)  # the default shapes model (32x32)
    lines = [line for line in err.splitlines() if "the model sees only" in line]
    assert code == EXIT_OK and len(lines) == 1, err
    assert lines[0].startswith(f"nti: image {tmp_path / 'strip.png'} is 4000x40: the model sees only its centre "
                               f"40x40 square (1% of the image); crop or pad")


def test_the_python_api_warns_about_a_strip_too(shapes_pipe, nti_warnings):
    from nti.api import prepare_images
    squares, _ = prepare_images(shapes_pipe, [np.full((40, 4000, 3), 120, np.uint8),
                                              np.full((1080, 1920, 3), 120, np.uint8)])
    messages = [r.getMessage() for r in nti_warnings]
    assert [s.size for s in squares] == [(32, 32)] * 2 and len(messages) == 1, messages
    assert messages[0].startswith("images[0] is 4000x40: the model sees only its centre 40x40 square")


def test_nti_serve_reads_signed_tiffs_and_corrupt_exif_as_the_cli_does(tmp_path):
    """The HTTP upload reader shares the CLI's steps: a signed TIFF at full brightness, turned by its orientation tag;
    a PNG whose EXIF cannot be parsed used as stored (it was a 400 'corrupt')."""
    pytest.importorskip("fastapi")
    from nti.serve import ServeSettings, read_image

    turned = np.zeros((16, 16), np.int16)
    turned[:, :8] = 32767
    signed_tiff(tmp_path / "turned.tif", turned, orientation=6)
    Image.new("RGB", (12, 8), (10, 200, 30)).save(tmp_path / "garbled.png", exif=GARBLED_EXIF)
    for name in ("turned.tif", "garbled.png"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            served = np.asarray(read_image((tmp_path / name).read_bytes(), ServeSettings()))
        assert np.array_equal(served, np.asarray(load_image(tmp_path / name))), name
    assert served.shape == (8, 12, 3) and tuple(served[0, 0]) == (10, 200, 30)
