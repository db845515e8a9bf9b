"""Image files read the way detection libraries read them: header without decoding, EXIF orientation applied,
every mode (16-bit, float, palette, alpha, CMYK, ...) turned into 8-bit RGB with its real range."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps

EXIF_ORIENTATION = 0x0112
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # transpose / rotate 90° / transverse / rotate 270°: width and height swap
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I;16LS", "I;16BS", "I", "I;32", "F")
# how a complete file of each format ends; other formats are decoded once in full to be sure
_TRAILERS = {"JPEG": (b"\xff\xd9",), "MPO": (b"\xff\xd9",), "PNG": (b"IEND\xaeB`\x82",), "GIF": (b"\x3b",)}
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)  # what PIL raises on bad files


@dataclass(frozen=True)
class ImageHeader:
    """What an image file says about itself before decoding: format, mode, stored size, EXIF orientation."""
    format: str
    mode: str
    size: tuple[int, int]  # (width, height) as stored
    orientation: int = 1  # EXIF tag 274; 1 (or absent/invalid) = as stored
    problem: str = ""  # non-empty: the file is incomplete or does not decode (the reason)

    @property
    def oriented_size(self) -> tuple[int, int]:
        """(width, height) once the EXIF orientation is applied: the image the annotations describe."""
        return self.size[::-1] if self.orientation in SWAPPING_ORIENTATIONS else self.size

    @property
    def high_depth(self) -> bool:
        return self.mode in HIGH_DEPTH_MODES


def _ends_complete(f, fmt: str) -> bool | None:
    """True/False when the format has a trailer to look for (zero padding allowed), None when it has not."""
    trailers = _TRAILERS.get(fmt)
    if trailers is None:
        return None
    f.seek(0, 2)
    end = f.tell()
    f.seek(max(0, end - 64))
    tail = f.read().rstrip(b"\x00")
    return tail.endswith(trailers)


def _exif(im: Image.Image) -> Image.Exif:
    """The EXIF block the header holds (PNG's getexif() would decode the whole image to look past the pixels)."""
    if im.format != "PNG":
        return im.getexif()
    exif = Image.Exif()
    if "exif" in im.info:  # an eXIf chunk before the pixel data
        exif.load(im.info["exif"])
    return exif


def read_header(path: str | Path) -> ImageHeader:
    """Read ``path``'s header and trailer (no pixel decoding unless the trailer is missing or unknown).

    Raises what PIL raises (``UNREADABLE``, FileNotFoundError) when the file is not an image at all; a file
    that is an image but does not decode to the end gives a header whose ``problem`` says why.
    """
    with open(path, "rb") as f:
        with Image.open(f) as im:
            fmt, mode, size = im.format or "", im.mode, im.size
            orientation = _exif(im).get(EXIF_ORIENTATION, 1)
        complete = _ends_complete(f, fmt)
    orientation = orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1
    problem = ""
    if not complete:  # truncated, trailing bytes after the end marker, or a format without a cheap check
        try:
            with Image.open(path) as im:
                im.load()
        except UNREADABLE as e:
            problem = f"does not decode ({e})"
    return ImageHeader(fmt, mode, (int(size[0]), int(size[1])), orientation, problem)


def _high_depth_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit integer or float pixels to 0..255 by their real range (PIL's own convert clips at 255)."""
    a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode.startswith("I;16") and lo >= 0:
        scale = 65535.0  # the file's bit depth
    elif mode == "F" and lo >= 0 and hi <= 1.0:
        scale = 1.0
    elif lo >= 0 and hi <= 255:
        scale = 255.0
    elif lo >= 0 and hi <= 65535:
        scale = 65535.0  # 16-bit data stored as 32-bit (older PIL, TIFF)
    else:  # signed or wider: stretch what is there
        a, scale = a - lo, max(hi - lo, 1e-12)
    return np.clip(np.rint(a * (255.0 / scale)), 0, 255).astype(np.uint8)


def decode_rgb(path: str | Path) -> np.ndarray:
    """The image as (H, W, 3) uint8 RGB, EXIF orientation applied; raises ``UNREADABLE`` errors."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in HIGH_DEPTH_MODES:
            grey = _high_depth_to_uint8(np.asarray(im), im.mode)
            return np.repeat(grey[..., None], 3, axis=2)
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")  # PIL's advice for palette transparency; the alpha is dropped below
        return np.asarray(im.convert("RGB"))


def copy_as_jpeg(coco: dict, image_dir: str | Path, image_ids: Iterable[int],
                 dest: Path) -> Iterator[tuple[str, dict, list[dict]]]:
    """Copy images ``image_ids`` of a COCO-style dict from ``image_dir`` to ``dest/<stem>.jpg`` (RGB); yield each
    one's stem, image record and annotations (what the VOC and CrowdHuman writers turn into their own files)."""
    dest.mkdir(parents=True, exist_ok=True)
    images = {im["id"]: im for im in coco["images"]}
    by_image: dict[int, list] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for image_id in image_ids:
        im = images[image_id]
        name = Path(im["file_name"]).stem
        with Image.open(Path(image_dir) / im["file_name"]) as pic:
            pic.convert("RGB").save(dest / f"{name}.jpg", quality=95)
        yield name, im, by_image.get(image_id, [])
