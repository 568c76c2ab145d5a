"""Verified PNG decoding for training and evaluation data.

Pillow checks neither the image data chunks' (IDAT) CRCs nor zlib's Adler-32 trailer, so some
single-bit flips in a PNG's image data (about 5 % in a fault-injection run) decode without
error into wrong pixels. `decode_png` first walks the chunk list and checks the signature,
every chunk's CRC-32 (over type and data, as the PNG spec defines it) and that the chunks end
with IEND, so a damaged byte anywhere up to IEND is found; only then does Pillow decode the
image. Every failure is a `CorruptFile` naming the file and the chunk, which the loaders skip
with a counted warning.
"""
from __future__ import annotations

import io
import struct
import zlib
from typing import Optional

import numpy as np

from .errors import CorruptFile

SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_CHUNK = 2 ** 31 - 1       # the spec's largest chunk length


def verify_png(data: bytes, name: str) -> None:
    """CorruptFile unless `data` is a PNG whose signature, chunk CRCs and IEND are intact.

    name: the file (or shard entry) the bytes came from, for the message. Bytes after IEND are
    ignored, as Pillow and libpng do.
    """
    if data[:8] != SIGNATURE:
        raise CorruptFile(f"{name}: not a PNG file (bad signature {bytes(data[:8])!r})")
    pos, index = 8, 0
    while True:
        if pos + 8 > len(data):
            raise CorruptFile(f"{name}: truncated after chunk {index} (no IEND chunk)")
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        label = f"chunk {index} ({ctype.decode('latin-1')!r} at byte {pos})"
        end = pos + 8 + length
        if length > MAX_CHUNK or end + 4 > len(data):
            raise CorruptFile(f"{name}: {label} claims {length} bytes, past the end of the "
                              f"{len(data)}-byte file (truncated or damaged)")
        stored = struct.unpack(">I", data[end:end + 4])[0]
        if zlib.crc32(data[pos + 4:end]) != stored:
            raise CorruptFile(f"{name}: {label} fails its CRC check (damaged data)")
        if ctype == b"IEND":
            return
        pos, index = end + 4, index + 1


def decode_png(data: bytes, name: str, mode: Optional[str] = None) -> np.ndarray:
    """The image in PNG bytes `data` as a numpy array (converted to Pillow `mode` if given),
    after `verify_png`; CorruptFile naming `name` if it is damaged or Pillow cannot decode it."""
    from PIL import Image
    verify_png(data, name)
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im if mode is None else im.convert(mode))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptFile(f"{name}: {type(e).__name__}: {e}") from None


def read_rgb(path: str) -> np.ndarray:
    """[H, W, 3] uint8 of a PNG of RGB(A) or grey pixels (grey repeated, alpha dropped);
    CorruptFile for one with fewer than 3 channels otherwise, or as `read_png`."""
    img = read_png(path)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, -1)
    if img.shape[-1] < 3:
        raise CorruptFile(f"'{path}' has {img.shape[-1]} channels; images need RGB(A)")
    return np.ascontiguousarray(img[..., :3], dtype=np.uint8)


def read_png(path: str, mode: Optional[str] = None) -> np.ndarray:
    """`decode_png` of the file at `path`; CorruptFile if it is missing or unreadable."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CorruptFile(f"'{path}': file is missing") from None
    except OSError as e:
        raise CorruptFile(f"'{path}': cannot be read ({e.strerror})") from None
    return decode_png(data, f"'{path}'", mode)
