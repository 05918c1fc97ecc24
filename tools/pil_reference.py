"""Writes Pillow's resize outputs for the pixel-exact tests of `imaging::pil`.

    python -m venv /tmp/pil && /tmp/pil/bin/pip install pillow==11.3.0 numpy safetensors
    /tmp/pil/bin/python tools/pil_reference.py

Output (checked in): crates/dancegrpo/tests/data/pil-resize/cases.safetensors with, per case i,
`in.{i}` (uint8 [h, w, 3], seeded noise with smooth gradients) and `out.{i}.{filter}.{oh}x{ow}`
= `Image.fromarray(in).resize((ow, oh), filter)` for the five filters and several targets
(down- and up-scaling, odd sizes, aspect changes, one-pixel sides, exact halving; sides at
most 48 pixels, BOX and HAMMING on the four smallest inputs only, to keep the file small).
"""
import os

import numpy as np
import PIL
from PIL import Image
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "dancegrpo", "tests", "data", "pil-resize")
FILTERS = {"lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
           "box": Image.BOX, "hamming": Image.HAMMING}
SIZES = [(1, 1), (7, 5), (16, 16), (33, 17), (48, 64), (61, 47), (120, 90)]


def image(rng, h, w):
    y, x = np.mgrid[0:h, 0:w]
    smooth = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
    noise = rng.integers(0, 256, size=(h, w, 3))
    return np.where(rng.random((h, w, 1)) < 0.5, smooth, noise).astype(np.uint8)


def targets(h, w):
    ts = {(max(h // 2, 1), max(w // 2, 1)), (h * 2 + 1, w * 3), (max(h * 2 // 3, 1), w + 5),
          (1, max(w // 3, 1)), (h, max(w - 3, 1)), (h + 7, w), (13, 29)}
    if min(h, w) > 1:  # a CLIP-style shortest edge (40)
        s = 40
        ts.add((s, int(s * w / h)) if h <= w else (int(s * h / w), s))
    return sorted((min(a, 48), min(b, 48)) for a, b in ts if (min(a, 48), min(b, 48)) != (h, w))


def main():
    rng = np.random.default_rng(2026)
    tensors = {}
    for i, (h, w) in enumerate(SIZES):
        img = image(rng, h, w)
        tensors[f"in.{i}"] = img
        for oh, ow in targets(h, w):
            for name, f in FILTERS.items():
                if name in ("box", "hamming") and i >= 4:
                    continue
                out = np.asarray(Image.fromarray(img, "RGB").resize((ow, oh), f))
                tensors[f"out.{i}.{name}.{oh}x{ow}"] = np.ascontiguousarray(out)
    os.makedirs(OUT, exist_ok=True)
    save_file(tensors, os.path.join(OUT, "cases.safetensors"), metadata={"pillow": PIL.__version__})


if __name__ == "__main__":
    main()
