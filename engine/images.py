"""Image IO: any PIL-readable file (or a bundled scikit-image photo) to a centred square tensor, and PNG out."""
from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .config import NTIError
from .outputs import PNG_SOFTWARE, REQUEST_TAG, atomic_write

log = logging.getLogger("nti")

SKIMAGE_PREFIX = "skimage:"  # e.g. "skimage:chelsea": a photo that ships inside scikit-image, needs no download
PIL_FOLDER = Path(Image.__file__).parent  # whose warnings open_image words itself
# the centre square keeps min(w, h) / max(w, h) of an image: every usual photo and video frame keeps more than half
# (4:3 75%, 3:2 67%, 16:9 56%); below it (wider than 2:1: panoramas, banners, strips) the subject is likely cut off
MIN_CROP_KEPT = 0.5
MAX_UPSCALE = 4  # past it a short side is made up more than it is seen: warned (crop_warning)
TIFF_BITS_PER_SAMPLE, TIFF_SAMPLE_FORMAT, TIFF_SIGNED = 258, 339, 2  # SampleFormat 2: two's complement integers


def load_image(source: str | os.PathLike | Image.Image | np.ndarray, as_stored: bool = False) -> Image.Image:
    """An RGB PIL image from a path, 'skimage:NAME', a PIL image or an HxW / HxWx3 / HxWx4 array (read as
    array_to_rgb says); clear errors otherwise. as_stored: a file's pixels as stored, its EXIF orientation not
    applied (see open_image)."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        return array_to_rgb(source, "image array")
    if not isinstance(source, (str, os.PathLike)):  # str() of a tensor or bytes is no path to look up
        raise NTIError(f"an image must be a file path, 'skimage:NAME', a PIL image or a numpy array; got "
                       f"{type(source).__name__}")
    text = str(source)
    if not text.strip():  # Path("") is ".", which was reported as "image . is a folder"
        raise NTIError("an image path is empty; give an image file, 'skimage:NAME' or a PIL image")
    if text.startswith(SKIMAGE_PREFIX):
        return array_to_rgb(skimage_photo(text), text)
    path = Path(text).expanduser()
    check_image_file(path)
    return open_image(path, f"image {path}", as_stored)


# scikit-image's data functions that return no photo (a folder, a download, a checksum, a cascade file's path)
SKIMAGE_NOT_PHOTOS = ("data_dir", "download_all", "file_hash", "lbp_frontal_face_cascade_filename")


def skimage_names() -> list[str]:
    """The NAMEs `skimage:NAME` may give: scikit-image's data functions that return an image."""
    import skimage.data

    return [name for name in skimage.data.__all__
            if name not in SKIMAGE_NOT_PHOTOS and callable(getattr(skimage.data, name, None))]


def skimage_photo(text: str) -> np.ndarray:
    """The array of 'skimage:NAME': only scikit-image's photos are called (never download_all or another helper),
    and one it would download first, or that is no single image, is refused with what to use instead."""
    import skimage.data

    name = text[len(SKIMAGE_PREFIX):]
    if name not in skimage_names():
        raise NTIError(f"{text}: scikit-image has no bundled image {name!r} (try skimage:chelsea)")
    try:
        image = getattr(skimage.data, name)()
    except Exception as err:  # not in the wheel: fetched on first use through pooch, over the network
        raise NTIError(f"{text} is not bundled with scikit-image, which would download it ({type(err).__name__}); "
                       f"use a bundled photo such as skimage:chelsea, or save the image to a file") from None
    if not isinstance(image, np.ndarray):
        raise NTIError(f"{text} is not one image (scikit-image returns a {type(image).__name__}); save the image "
                       f"to edit to a file")
    return image


def array_to_rgb(array: np.ndarray, label: str) -> Image.Image:
    """RGB from an HxW, HxWx3 or HxWx4 array, read as to_rgb reads an image file of its kind: uint8 as it is, bool
    as black and white, uint16 from 0..65535, other integers from 0..255 (0..65535 when they exceed 255), floats
    from 0..1 when they fit it, else 0..255; alpha over white. Values outside the range are refused, not wrapped
    or clipped (a silently wrong image)."""
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise NTIError(f"{label} must be HxW or HxWx3/4, got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        if array.dtype.kind not in "iuf":
            raise NTIError(f"{label} has {array.dtype} values; give numbers (uint8, uint16, or floats in 0..1)")
        kind = "16bit" if array.dtype == np.uint16 else "float" if array.dtype.kind == "f" else "int"
        array = to_8bit(array, label, kind)
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)), label)


def check_image_file(path: Path, where: str = "") -> None:
    """Refuse an image path that is missing, a folder, or not a regular file, naming which (`where`: the JSONL line)."""
    prefix = f"{where}: " if where else ""
    if not path.exists():
        raise NTIError(f"{prefix}image {path} does not exist")
    if path.is_dir():
        raise NTIError(f"{prefix}image {path} is a folder, not an image file")
    if not path.is_file():  # a named pipe would block the read until something writes to it: a hang, not an error
        raise NTIError(f"{prefix}image {path} is not a regular file (a pipe, socket or device); save the image to a "
                       f"file")


def open_image(source: Path | bytes, label: str, as_stored: bool = False) -> Image.Image:
    """Decode a file or encoded bytes to RGB the way a photo viewer shows it: EXIF orientation applied (unless
    as_stored: pixels as stored, for data whose annotations index them so, as PIE-Bench's masks), 16-bit
    greys scaled to 8 bits (not clipped to white). Refused with a clear NTIError: unreadable or truncated files,
    decompression bombs (PIL's pixel limit), and animations (which frame the user meant is a guess). PIL's own
    warnings (corrupt EXIF) become one 'nti' warning naming the file instead of a bare line on stderr."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # recorded, not printed: said below in nti's words, with the file's name
            # PIL only warns between MAX_IMAGE_PIXELS and twice that: a bomb either way
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
                frames = frame_count(img)
                if frames > 1:
                    raise NTIError(f"{label} is animated or multi-page ({frames} frames); save the frame to edit as a "
                                  f"still image")
                signed = is_signed_16bit(img)  # before exif_transpose: its copy has no TIFF tags to tell
                img.load()
                img, turned, exif_error = (img, False, None) if as_stored else upright(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise NTIError(f"{label} is too large to decode safely ({err}); downscale it first: the model sees a "
                       f"square of a few hundred pixels anyway") from None
    except UnidentifiedImageError:
        raise NTIError(f"{label} is not a readable image (corrupt or unsupported format)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # truncated data, broken chunks
        raise NTIError(f"{label} could not be read: {err}") from None
    report_decoder_warnings(label, caught, turned, exif_error)
    return to_rgb(img, label, signed)


def frame_count(img: Image.Image) -> int:
    """How many frames an opened image offers to choose from: an MPO (a JPEG with an MP Format index, as phones and
    cameras write with an HDR gain map, depth map or preview after the photo) is its first image, the photo every
    viewer shows; counting an animation's frames seeks through the file, so a broken one fails here."""
    return 1 if img.format == "MPO" else getattr(img, "n_frames", 1)


def upright(img: Image.Image) -> tuple[Image.Image, bool, str | None]:
    """(the image turned by its EXIF orientation, whether an orientation tag was read, None), or the image as stored
    and why when its EXIF cannot be parsed: the pixels are loaded already and EXIF is only metadata, so whatever its
    parser raises is no reason to refuse them."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation)  # parsed once: exif_transpose reuses it
    except Exception as err:  # SyntaxError "not a TIFF file", struct.error, ... from a garbled EXIF block
        return img, False, f"{type(err).__name__}: {err}"
    return ImageOps.exif_transpose(img), orientation is not None, None


def report_decoder_warnings(label: str, caught: list, turned: bool, exif_error: str | None) -> None:
    """PIL's warnings while decoding as 'nti' log lines naming the file, each once; other modules' warnings as they
    were. Corrupt EXIF is a warning when it cost the orientation tag (the image is used as stored), else a note."""
    ours = [w for w in caught if Path(w.filename).parent == PIL_FOLDER]
    for w in caught:
        if w not in ours:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    # TiffImagePlugin parses every format's EXIF block (and a TIFF's own tags, orientation among them)
    exif = [w for w in ours if Path(w.filename).name == "TiffImagePlugin.py" or "exif" in str(w.message).lower()]
    exif_messages = [" ".join(str(w.message).split()) for w in exif] + ([exif_error] if exif_error else [])
    exif_text = "; ".join(dict.fromkeys(exif_messages))
    if exif_messages and turned:
        log.info(f"{label}: part of its EXIF data is corrupt ({exif_text}); its orientation tag was read and applied")
    elif exif_messages:
        log.warning(f"{label}: its EXIF data is corrupt ({exif_text}), so its orientation tag could not be read and "
                    f"the image is used as stored; if it shows up turned, rotate it and save it without EXIF")
    for message in dict.fromkeys(" ".join(str(w.message).split()) for w in ours if w not in exif):
        log.warning(f"{label}: the image decoder warned: {message}")


def is_signed_16bit(img: Image.Image) -> bool:
    """Whether a TIFF holds signed 16-bit samples (SampleFormat 2): PIL reads them as mode I, values -32768..32767,
    which to_rgb would otherwise take for unsigned 0..65535 (an image half as bright)."""
    tags = getattr(img, "tag_v2", None)
    if img.mode != "I" or tags is None:
        return False
    formats, bits = tags.get(TIFF_SAMPLE_FORMAT, ()), tags.get(TIFF_BITS_PER_SAMPLE, ())
    formats, bits = (f if isinstance(f, tuple) else (f,) for f in (formats, bits))
    return bool(formats) and set(formats) == {TIFF_SIGNED} and set(bits) == {16}


def to_rgb(img: Image.Image, label: str = "image", signed16: bool | None = None) -> Image.Image:
    """RGB, 8 bits per channel. PIL's own convert clips 16- and 32-bit greys at 255 (a white image); scale them by
    their bit depth instead (0..32767 for a signed 16-bit TIFF; `signed16`: None reads it off the image's tags).
    Float images are taken as [0, 1] when they fit it, else as [0, 255]. Wider values (a 32-bit or negative integer
    image, HDR floats) are refused: clipping them would be a silently wrong image."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        kind = "16bit" if img.mode.startswith("I;16") else "int" if img.mode == "I" else "float"
        signed = is_signed_16bit(img) if signed16 is None else signed16
        values = np.asarray(img)
        rgb = Image.fromarray(to_8bit(values, label, kind, signed)).convert("RGB")
        key = img.info.get("transparency")  # a 16-bit grey PNG's tRNS colour key: white, as for 8-bit greys below
        if isinstance(key, int) and img.mode.startswith("I;16"):
            rgb.paste((255, 255, 255), mask=Image.fromarray((values == key).astype(np.uint8) * 255))
        return rgb
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:  # P's palette alpha, or RGB's / L's colour
        # key (PNG tRNS): transparent pixels over white, as a viewer shows them (convert("RGB") keeps their colour)
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def to_8bit(values: np.ndarray, label: str, kind: str, signed16: bool = False) -> np.ndarray:
    """uint8 pixels of wider values (kind: '16bit', 'int' or 'float'), scaled as to_rgb says; refused when not
    finite or outside the range they are scaled from."""
    array = np.asarray(values, dtype=np.float64)
    if not np.isfinite(array).all():
        raise NTIError(f"{label} has non-finite pixel values")
    low, high = array.min(initial=0), array.max(initial=0)
    if signed16:
        array, limit = array * (255.0 / 32767.0), "0..32767"  # 32767 -> 255; negatives are refused below
    elif kind == "16bit" or (kind == "int" and high > 255):
        array, limit = array / 257.0, "0..65535"  # 65535 -> 255
    elif kind == "float" and high <= 1.0:
        array, limit = array * 255.0, "0..1"
    else:
        limit = "0..255"
    if low < 0 or array.max(initial=0) > 255.5:
        raise NTIError(f"{label} has pixel values from {low:g} to {high:g}, outside {limit}; save it as an "
                       f"unsigned 8- or 16-bit image")
    return np.clip(np.round(array), 0, 255).astype(np.uint8)


def center_square(img: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize to size x size (the notebook's load_512, bicubic)."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return img if side == size else img.resize((size, size), Image.Resampling.BICUBIC)


def crop_warning(size: tuple[int, int], resolution: int, label: str) -> str | None:
    """Why center_square would spoil an image of this (w, h) size, with what to do; None when it keeps enough."""
    w, h = size
    side = min(w, h)
    kept = side / max(w, h, 1)
    if kept >= MIN_CROP_KEPT:
        if side * MAX_UPSCALE >= resolution:
            return None  # a 1x1 upload was upscaled to 512x512 without a word: the model edits a flat colour
        return (f"{label} is {w}x{h}: upscaled {resolution / max(side, 1):.1f}x to {resolution}x{resolution}, so the "
                f"model sees a blurry image and edits that; give an image of at least {resolution // MAX_UPSCALE} px "
                f"on its short side")
    blurry = (f", upscaled {resolution / max(side, 1):.1f}x to {resolution}x{resolution} (blurry)"
              if 2 * side <= resolution else "")
    return (f"{label} is {w}x{h}: the model sees only its centre {side}x{side} square ({100 * kept:.2g}% of the "
            f"image){blurry}; crop or pad it to a square first to choose what the model sees")


def file_crop_warning(path: str, resolution: int) -> str | None:
    """crop_warning for an image file from its header alone (no decoding: for a driver that hands decoding to
    workers); None when it keeps enough or is not a readable regular file (its reader reports that)."""
    try:
        if not Path(path).is_file():  # opening a named pipe would block
            return None
        with Image.open(path) as img:
            size = img.size
    except Exception:
        return None
    return crop_warning(size, resolution, f"image {path}")


def load_square(source, resolution: int, label: str) -> Image.Image:
    """load_image, a warning through the 'nti' logger when the centre crop would spoil it (crop_warning), then
    center_square at the model's resolution."""
    img = load_image(source)
    if 0 in img.size:  # nothing to crop or scale: resizing it would make up a whole image
        raise NTIError(f"{label} is empty ({img.size[0]}x{img.size[1]} pixels)")
    message = crop_warning(img.size, resolution, label)
    if message is not None:
        log.warning(message)
    return center_square(img, resolution)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) fp32 in [-1, 1] from an RGB image (notebook: x / 127.5 - 1)."""
    array = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """PIL images from (B, 3, H, W) in [0, 1]; NaN pixels (a diverged result the API returns with a warning) black,
    as said, not left to numpy's undefined NaN-to-uint8 cast."""
    pixels = images.detach().float().cpu().nan_to_num(0.0).clamp(0, 1)
    array = (pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def pixel_hash(img: Image.Image) -> str:
    """sha256 of the preprocessed RGB pixels and size: the identity of an inversion's input."""
    digest = hashlib.sha256(f"{img.size}".encode())
    digest.update(np.asarray(img.convert("RGB")).tobytes())
    return digest.hexdigest()


def save_png(img: Image.Image, path: str | os.PathLike, request: str | None = None) -> Path:
    """Write a PNG atomically (temp file + rename), creating parent folders; refuse a non-.png name rather than guess
    a format. `request`: the outputs.request_key it answers, recorded for --resume."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise NTIError(f"output {path} must end in .png")
    return atomic_write(path, lambda temp: img.save(temp, format="PNG", **png_options(request)))


def png_options(request: str | None = None) -> dict:
    """PIL's PNG save options for every image nti writes: its text chunks (png_info), and no colour profile: nti
    reads pixels as stored (no colour management, as the notebook), so an input's ICC profile, which PIL would
    otherwise copy from the image's info, would show the written pixels in other colours than the model saw."""
    return {"pnginfo": png_info(request), "icc_profile": None}


def png_info(request: str | None = None):
    """The PNG text chunks of every image nti writes: Software=nti, so a rerun knows its own files (written_by_nti),
    and the request it answers when there is one (outputs.recorded_request)."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("Software", PNG_SOFTWARE)
    if request is not None:
        info.add_text(REQUEST_TAG, request)
    return info


def png_bytes(img: Image.Image, request: str | None = None) -> bytes:
    """The bytes save_png writes for an image (lossless, tagged), for a worker that hands the file to its writer."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", **png_options(request))
    return buffer.getvalue()
