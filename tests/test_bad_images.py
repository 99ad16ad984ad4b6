"""Bad input (issue 18) in the image reader: pixel formats, metadata and shapes that gave a silently wrong image, a
bare Pillow warning or a result nobody explained. Each test failed before its fix."""
import numpy as np
import pytest
from PIL import Image, TiffImagePlugin

from nti.cli import EXIT_BAD_INPUT
from nti.config import NTIError
from nti.images import load_image
# the CLI runner, its one-error-line check and the tiny model's fast options
from test_bad_input import TINY, error_line, run_cli


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
