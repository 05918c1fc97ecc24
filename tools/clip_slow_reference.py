"""Writes a tiny CLIP vocab.json + merges.txt and the ids transformers gives for
prompts that need ftfy (curly quotes, mojibake, ligatures, entities), for the
slow `CLIPTokenizer` (what diffusers' FLUX pipeline loads) and `CLIPTokenizerFast`.

    python -m venv /tmp/ftfy && /tmp/ftfy/bin/pip install ftfy==6.3.1 transformers==4.46.1
    /tmp/ftfy/bin/python tools/clip_slow_reference.py

Output (checked in): crates/dancegrpo/tests/data/clip-slow/{vocab.json,merges.txt,cases.json}
"""
import json
import os

import ftfy
import transformers
from transformers import CLIPTokenizer, CLIPTokenizerFast
from transformers.models.clip.tokenization_clip import bytes_to_unicode

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "dancegrpo", "tests", "data", "clip-slow")
WORDS = ["the</w>", "cat</w>", "photo</w>", "'s</w>", "a</w>", "of</w>", "café</w>", "fine</w>", "&</w>"]
PROMPTS = [
    "a photo of the cat",
    "A Photo of THE Cat's",
    "a cat’s “photo”",
    "cafÃ© photo of a cat",
    "â€œthe catâ€\x9d",
    "ﬁne ＦＩＮＥ photo",
    "the cat &amp; a cat",
    "cat &amp; <b>photo</b>",
    "a\u00a0cat\tphoto\n\nof  the cat ",
    "café naïve Straße 日本 🐍",
    "the <|endoftext|> cat",
    "\x1b[31mcat\x1b[0m",
    "Ð¼Ð¾Ñ\x81ÐºÐ²Ð° cat",
    "",
]


def merges_for(word):
    """Left-to-right merges that build `word` (with its </w>) from characters."""
    chars = [bytes_to_unicode()[b] for b in word[: -len("</w>")].encode("utf-8")]
    chars[-1] += "</w>"
    out, cur = [], chars[0]
    for c in chars[1:]:
        out.append((cur, c))
        cur += c
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    merges = []
    for word in WORDS:
        for pair in merges_for(word):
            if pair not in merges:
                merges.append(pair)
    tokens += [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    with open(os.path.join(OUT, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(OUT, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    slow = CLIPTokenizer.from_pretrained(OUT)
    fast = CLIPTokenizerFast.from_pretrained(OUT)
    assert slow.fix_text is not None, "ftfy must be installed"
    cases = [
        {"prompt": p, "slow": slow(p)["input_ids"], "fast": fast(p)["input_ids"]}
        for p in PROMPTS
    ]
    meta = {"transformers": transformers.__version__, "ftfy": ftfy.__version__}
    with open(os.path.join(OUT, "cases.json"), "w", encoding="utf-8") as f:
        json.dump({"made_with": meta, "cases": cases}, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
