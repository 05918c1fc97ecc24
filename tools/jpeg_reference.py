"""Writes the JPEG files Pillow makes, for the byte-exact test of `rewards::jpeg`.

    python -m venv /tmp/pil && /tmp/pil/bin/pip install pillow==11.3.0 numpy safetensors
    /tmp/pil/bin/python tools/jpeg_reference.py

Output (checked in): crates/dancegrpo/tests/data/pil-jpeg/cases.safetensors with, per case i,
`in.{i}` (uint8 [h, w, 3], seeded noise mixed with smooth gradients) and `out.{i}.q{q}.{s}` (uint8
[n], the whole file) = `Image.fromarray(in).save(f, format="JPEG", quality=q)` for s = 420 (Pillow's
default subsampling) and `subsampling=0` for s = 444. DDPO's and Flow-GRPO's JPEG rewards are
`len` of that file / 1000.
"""
import io
import os

import numpy as np
import PIL
from PIL import Image
from safetensors.numpy import save_file

from pil_reference import image  # the resize tests' seeded images (tools/ is on sys.path)

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "dancegrpo", "tests", "data", "pil-jpeg")
SIZES = [(1, 1), (7, 5), (16, 16), (17, 9), (33, 17), (48, 64), (61, 47), (64, 64), (120, 90)]
QUALITIES = {"420": [95, 100, 75, 10], "444": [95, 50]}


def main():
    rng = np.random.default_rng(2026)
    tensors = {}
    for i, (h, w) in enumerate(SIZES):
        img = image(rng, h, w)
        tensors[f"in.{i}"] = img
        for sub, qs in QUALITIES.items():
            for q in qs:
                buf = io.BytesIO()
                extra = {"subsampling": 0} if sub == "444" else {}
                Image.fromarray(img).save(buf, format="JPEG", quality=q, **extra)
                tensors[f"out.{i}.q{q}.{sub}"] = np.frombuffer(buf.getvalue(), dtype=np.uint8).copy()
    os.makedirs(OUT, exist_ok=True)
    save_file(tensors, os.path.join(OUT, "cases.safetensors"), metadata={"pillow": PIL.__version__})


if __name__ == "__main__":
    main()
