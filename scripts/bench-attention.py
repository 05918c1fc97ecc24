#!/usr/bin/env python3
"""The CPU attention and RoPE kernels dancegrpo relies on, timed with the same
libtorch (run with the project's environment: `.venv/bin/python
scripts/bench-attention.py`; `./dev.sh setup` installs it).

1. `scaled_dot_product_attention`: libtorch's default dispatch against the flash
   and math backends, float32 and bfloat16, forward and forward + backward.
2. RoPE on interleaved pairs: the reference's rotated-copy form against the
   halves form `(re c - im s, im c + re s)` (forward only) and the pair-swap
   form the transformer uses, `x * cos + swap(x) * signed_sin` (forward, and
   forward + backward), and whether each gives the reference's bits (values,
   and for the pair swap the input's gradient).
Best of 3 repeats of N calls each; milliseconds per call. Arguments: the
thread count (2), then `attention` or `rope` for one table alone.
"""
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

THREADS = int(sys.argv[1]) if len(sys.argv) > 1 else 2
ONLY = sys.argv[2] if len(sys.argv) > 2 else None  # "attention" or "rope": that table alone
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


def rope_swap(x, cos, signed_sin):
    s = x.shape
    swapped = x.reshape(*s[:3], s[3] // 2, 2).flip(-1).reshape(s)
    return x * cos + swapped * signed_sin


def with_grad(rope, x, g, *tables):
    x = x.detach().requires_grad_(True)
    y = rope(x, *tables)
    y.backward(g)
    return y.detach(), x.grad


def main():
    print(f"torch {torch.__version__}, {THREADS} threads")
    if ONLY != "rope":
        attention_table()
    if ONLY != "attention":
        rope_table()


def attention_table():
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


def rope_table():
    print("| (b, heads, seq, hd) | pass | rotated copy ms | halves ms (same bits) | pair swap ms (same bits) | pair swap speed-up |")
    print("|---|---|---|---|---|---|")
    for shape in [(8, 4, 288, 32), (2, 8, 1056, 64), (1, 24, 4608, 128)]:
        x = torch.randn(shape).transpose(1, 2).contiguous().transpose(1, 2)  # the projections' layout
        g = torch.randn(shape)
        angles = torch.randn(shape[2], shape[3] // 2)
        c, s = angles.cos(), angles.sin()
        cos, sin = c.repeat_interleave(2, 1), s.repeat_interleave(2, 1)
        signed = sin * torch.tensor([-1.0, 1.0]).repeat(shape[3] // 2)
        with torch.no_grad():
            ref = rope_copy(x, cos, sin)
            same_h = torch.equal(ref, rope_halves(x, c, s))
            same_s = torch.equal(ref, rope_swap(x, cos, signed))
            a = timed(lambda: rope_copy(x, cos, sin), 10)
            b = timed(lambda: rope_halves(x, c, s), 10)
            w = timed(lambda: rope_swap(x, cos, signed), 10)
        print(f"| {shape} | forward | {a:.2f} | {b:.2f} ({same_h}) | {w:.2f} ({same_s}) | {a / w:.2f}x |")
        y0, g0 = with_grad(rope_copy, x, g, cos, sin)
        y1, g1 = with_grad(rope_swap, x, g, cos, signed)
        same = torch.equal(y0, y1) and torch.equal(g0, g1)
        a = timed(lambda: with_grad(rope_copy, x, g, cos, sin), 5)
        w = timed(lambda: with_grad(rope_swap, x, g, cos, signed), 5)
        print(f"| {shape} | forward + backward | {a:.2f} | | {w:.2f} ({same}) | {a / w:.2f}x |")

if __name__ == "__main__":
    main()
