"""Drawing: segmentation colours, float to uint8 images, and image grids; used by the training
visualisation grids, rendered frames and the viewer.

Pure numpy + PIL (no matplotlib): the reference draws its grids with matplotlib subplots; we
compose the same layout (one column per (header, images, kind), one row per scene, optional
per-row labels) directly into a PNG, which is faster and needs no GUI backend.
"""
from __future__ import annotations

import colorsys
import math
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# A fixed palette, so that label i has the same colour in every column, frame and run. Entry 0 is
# a dark grey (not black, so that a slot covering the background is still visibly "a slot" and
# distinguishable from empty padding); the rest are well separated saturated hues.
_BASE_PALETTE = np.array([
    (64, 64, 64),
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (255, 255, 255),
], dtype=np.uint8)

# Layout constants of draw_visualization_grid (public so callers and tests can predict sizes).
GRID_PAD = 2            # pixels between cells and around the grid
GRID_HEADER_H = 18      # height of the header text row
GRID_FONT_SIZE = 11
GRID_MIN_CELL = 96      # small images are upscaled (nearest) to at least this height
GRID_BACKGROUND = (255, 255, 255)


def segmentation_colors(n: int) -> np.ndarray:
    """Palette [n, 3] uint8: colour i for label i, independent of n (prefixes agree).

    Beyond the built-in 21 colours, hues follow the golden-ratio sequence so that any number of
    labels stays distinguishable from its neighbours.
    """
    if n <= len(_BASE_PALETTE):
        return _BASE_PALETTE[:n].copy()
    extra = []
    for i in range(n - len(_BASE_PALETTE)):
        h = (i * 0.618033988749895) % 1.0
        v = 0.95 if i % 2 == 0 else 0.7
        extra.append(tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, 0.75, v)))
    return np.concatenate([_BASE_PALETTE, np.array(extra, dtype=np.uint8)], 0)


def colorize_segmentation(labels, num_colors: Optional[int] = None) -> np.ndarray:
    """Integer labels [..., H, W] -> RGB uint8 [..., H, W, 3] with `segmentation_colors`."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iub":
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise ValueError("colorize_segmentation expects integer labels (e.g. an argmax), "
                             f"got non-integer values of dtype {labels.dtype}")
        labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(f"segmentation labels must be non-negative, got min {labels.min()}")
    n = int(labels.max()) + 1 if labels.size else 1
    if num_colors is not None:
        n = max(n, num_colors)
    return segmentation_colors(n)[labels]


def to_uint8(img) -> np.ndarray:
    """Float image(s) in [0, 1] (any shape; torch or numpy) -> uint8, clipped and rounded.

    uint8 input is returned unchanged; non-finite values become 0.
    """
    if hasattr(img, "detach"):
        img = img.detach().cpu().numpy()
    img = np.asarray(img)
    if img.dtype == np.uint8:
        return img
    img = np.nan_to_num(img.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _font(size: int = GRID_FONT_SIZE):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the fixed bitmap font
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def _column_cells(array, kind: str, num_colors: int) -> np.ndarray:
    """One column's data -> uint8 cells [B, H, W, 3]."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if kind == "clustering":
        if array.ndim == 4 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim != 3:
            raise ValueError(f"a 'clustering' column needs labels [B, H, W], got {array.shape}")
        return colorize_segmentation(array, num_colors)
    if kind == "image":
        if array.ndim == 3:                        # [B, H, W] greyscale (e.g. depth)
            array = array[..., None]
        if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
            raise ValueError(f"an 'image' column needs [B, H, W, 3] (or 1 channel), "
                             f"got {array.shape}")
        if array.shape[-1] == 1:
            array = np.repeat(array, 3, -1)
        return to_uint8(array[..., :3])
    raise ValueError(f"unknown column kind {kind!r}; valid kinds are 'image' and 'clustering'")


def draw_visualization_grid(columns: Sequence, path: str,
                            row_labels: Optional[Sequence[str]] = None,
                            scale: Optional[int] = None) -> str:
    """Writes a grid PNG: a header row of column titles, then one row per scene.

    Args:
        columns: list of (header, array, kind). kind 'image': array [B, H, W, 3] (or [B, H, W, 1]
            / [B, H, W]) float in [0, 1] or uint8; kind 'clustering': integer labels [B, H, W],
            coloured with one shared palette across all columns.
        path: output file; '.png' is appended when it has no extension (as the reference).
        row_labels: optional B strings (e.g. per-scene FG-ARI), drawn left of each row.
        scale: integer nearest-neighbour upscale of every cell; by default the smallest one that
            makes cells at least GRID_MIN_CELL pixels tall.
    Returns:
        The path written.

    Size: width = pad + label_w + C * (W*scale + pad), height = pad + GRID_HEADER_H +
    B * (H*scale + pad), where label_w is 0 without row labels and otherwise the widest label plus
    2 * pad. All columns must share H and W.
    """
    if not columns:
        raise ValueError("draw_visualization_grid needs at least one column")
    if not os.path.splitext(path)[1]:
        path = path + ".png"
    num_colors = 1
    for col in columns:
        if len(col) < 3:
            raise ValueError("each column must be (header, array, kind)")
        if col[2] == "clustering":
            a = col[1].detach().cpu().numpy() if hasattr(col[1], "detach") else np.asarray(col[1])
            num_colors = max(num_colors, int(a.max()) + 1 if a.size else 1)
    cells = [_column_cells(col[1], col[2], num_colors) for col in columns]
    num_rows, h, w = cells[0].shape[:3]
    for (header, _, _), c in zip(columns, cells):
        if c.shape[:3] != (num_rows, h, w):
            raise ValueError(f"column {header!r} has shape {c.shape[:3]}, expected "
                             f"{(num_rows, h, w)} like the first column")
    if row_labels is not None and len(row_labels) != num_rows:
        raise ValueError(f"got {len(row_labels)} row labels for {num_rows} rows")
    if scale is None:
        scale = max(1, math.ceil(GRID_MIN_CELL / h))
    ch, cw = h * scale, w * scale

    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 0
    if row_labels is not None:
        label_w = max((_text_width(probe, str(s), font) for s in row_labels), default=0) \
            + 2 * GRID_PAD
    width = GRID_PAD + label_w + len(columns) * (cw + GRID_PAD)
    height = GRID_PAD + GRID_HEADER_H + num_rows * (ch + GRID_PAD)

    canvas = Image.new("RGB", (width, height), GRID_BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for c, ((header, _, _), col_cells) in enumerate(zip(columns, cells)):
        x0 = GRID_PAD + label_w + c * (cw + GRID_PAD)
        text = str(header)
        tw = _text_width(draw, text, font)
        # Centred over the cell; long titles start at the cell's left edge rather than overlap
        # the previous column.
        draw.text((x0 + max(0, (cw - tw) // 2), GRID_PAD + 2), text, fill=(0, 0, 0), font=font)
        for r in range(num_rows):
            y0 = GRID_PAD + GRID_HEADER_H + r * (ch + GRID_PAD)
            cell = col_cells[r]
            if scale > 1:
                cell = np.repeat(np.repeat(cell, scale, 0), scale, 1)
            canvas.paste(Image.fromarray(np.ascontiguousarray(cell)), (x0, y0))
    if row_labels is not None:
        for r, label in enumerate(row_labels):
            y0 = GRID_PAD + GRID_HEADER_H + r * (ch + GRID_PAD)
            draw.text((GRID_PAD, y0 + ch // 2 - GRID_FONT_SIZE // 2), str(label),
                      fill=(0, 0, 0), font=font)

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path
