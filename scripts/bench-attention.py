#!/usr/bin/env python3
"""The CPU attention and RoPE kernels dancegrpo relies on, timed with the same
libtorch (run with the project's environment: `.venv/bin/python
scripts/bench-attention.py`; `./dev.sh setup` installs it).

1. `scaled_dot_product_attention`: libtorch's default dispatch against the flash
   and math backends, float32 and bfloat16, forward and forward + backward.
2. RoPE on interleaved pairs: the rotated-copy form the transformer uses against
   the halves form `(re c - im s, im c + re s)`, forward only, and whether the
   two give the same bits.
Best of 3 repeats of N calls each; milliseconds per call.
"""
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

THREADS = int(sys.argv[1]) if len(sys.argv) > 1 else 2
torch.set_num_threads(THREADS)


def timed(fn, n):
    fn()
    fn()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e3


def attention(shape, dtype, grad, n):
    q, k, v = [torch.randn(shape, dtype=dtype, requires_grad=grad) for _ in range(3)]

    def call(backend):
        def f():
            if backend is None:
                o = F.scaled_dot_product_attention(q, k, v)
            else:
                with sdpa_kernel([backend]):
                    o = F.scaled_dot_product_attention(q, k, v)
            if grad:
                o.float().sum().backward()
        return f

    names = [("default", None), ("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)]
    return {name: timed(call(b), n) for name, b in names}


def rope_copy(x, cos, sin):
    s = x.shape
    pairs = x.reshape(*s[:3], s[3] // 2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([-im, re], -1).flatten(3)
    return x * cos + rotated * sin


def rope_halves(x, c, s_):
    s = x.shape
    pairs = x.reshape(*s[:3], s[3] // 2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    return torch.stack([re * c - im * s_, im * c + re * s_], -1).flatten(3)


def main():
    print(f"torch {torch.__version__}, {THREADS} threads")
    print("| (b, heads, seq, hd) | dtype | pass | default ms | flash ms | math ms |")
    print("|---|---|---|---|---|---|")
    for shape, n in [((8, 4, 288, 32), 20), ((2, 8, 1056, 64), 5), ((1, 24, 1536, 128), 3)]:
        for dtype in (torch.float32, torch.bfloat16):
            for grad in (False, True):
                r = attention(shape, dtype, grad, n)
                kind = str(dtype).split(".")[-1]
                pas = "forward + backward" if grad else "forward"
                print(f"| {shape} | {kind} | {pas} | {r['default']:.2f} | {r['flash']:.2f} | {r['math']:.2f} |")
    print()
    print("| (b, heads, seq, hd) | same bits | rotated copy ms | halves ms | speed-up |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for shape in [(8, 4, 288, 32), (2, 8, 1056, 64), (1, 24, 4608, 128)]:
            x = torch.randn(shape)
            angles = torch.randn(shape[2], shape[3] // 2)
            c, s = angles.cos(), angles.sin()
            cos, sin = c.repeat_interleave(2, 1), s.repeat_interleave(2, 1)
            same = torch.equal(rope_copy(x, cos, sin), rope_halves(x, c, s))
            a = timed(lambda: rope_copy(x, cos, sin), 10)
            b = timed(lambda: rope_halves(x, c, s), 10)
            print(f"| {shape} | {same} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
