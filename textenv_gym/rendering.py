"""The ``rgb_array`` frame of a token sequence: its decoded text, word-wrapped on a fixed-size image.

A fixed size keeps every frame of an episode alike, as video recorders (Gymnasium's
``RecordVideo``, SB3's ``VecVideoRecorder``) need.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: Width and height of a frame, in pixels.
FRAME_SIZE = (480, 160)
MARGIN = 8
LINE_HEIGHT = 14


@cache
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def text_frame(text: str) -> np.ndarray:
    """``text`` in black on white, wrapped at word boundaries: an ``(H, W, 3)`` uint8 array of
    :data:`FRAME_SIZE`; text that does not fit ends in an ellipsis."""
    width, height = FRAME_SIZE
    image = Image.new("RGB", FRAME_SIZE, "white")
    draw = ImageDraw.Draw(image)
    lines = _wrap(draw, text.split(), width - 2 * MARGIN)
    room = (height - 2 * MARGIN) // LINE_HEIGHT
    if len(lines) > room:
        lines = [*lines[: room - 1], lines[room - 1] + " ..."]
    for index, line in enumerate(lines):
        draw.text((MARGIN, MARGIN + index * LINE_HEIGHT), line, fill="black", font=_font())
    return np.asarray(image, dtype=np.uint8)


def _wrap(draw: ImageDraw.ImageDraw, words: list[str], width: int) -> list[str]:
    lines: list[str] = []
    for word in words:
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=_font()) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines
