"""Writes a tiny transformers CLIPModel with its processor, images that need resizing, and the
CLIP-score and PickScore values transformers computes for them (the parity test
`tests/clip_reward_parity.rs`).

    python -m venv /tmp/tf && /tmp/tf/bin/pip install transformers==4.46.1 pillow==11.3.0 numpy safetensors
    PYTHONPATH=<a site-packages with torch> /tmp/tf/bin/python tools/clip_reward_reference.py

Output (checked in): crates/dancegrpo/tests/data/clip-reward/ with the model (`save_pretrained`:
config.json, model.safetensors), the processor (`CLIPProcessor.save_pretrained`: 56 px shortest
edge and crop, bicubic; the fast tokenizer converted from tests/data/clip-slow), `images.safetensors`
(uint8 [h, w, 3] per image, sizes below) and `expected.json` (per image: prompt, cosine, PickScore).
"""
import json
import os

import numpy as np
import PIL
import torch
import transformers
from PIL import Image
from safetensors.numpy import save_file
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                          CLIPTokenizerFast)

HERE = os.path.join(os.path.dirname(__file__), "..", "crates", "dancegrpo", "tests", "data")
OUT = os.path.join(HERE, "clip-reward")
SIZES = [(90, 60), (56, 56), (40, 64), (71, 57), (133, 100), (57, 200)]
PROMPTS = ["a photo of the cat", "the cat", "a cat’s photo", "cafÃ© photo", "photo of a cat", "a cat"]


def main():
    torch.manual_seed(0)
    tok = CLIPTokenizerFast.from_pretrained(os.path.join(HERE, "clip-slow"))
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id)
    vision = dict(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16,
                     logit_scale_init_value=2.6592)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # move the norms and biases off their trivial initial values
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 56},
                                           crop_size={"height": 56, "width": 56}),
        tokenizer=tok)
    os.makedirs(OUT, exist_ok=True)
    model.save_pretrained(OUT)
    processor.save_pretrained(OUT)
    rng = np.random.default_rng(2026)
    images, rows = {}, []
    for i, ((h, w), prompt) in enumerate(zip(SIZES, PROMPTS)):
        y, x = np.mgrid[0:h, 0:w]
        smooth = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (3 * x + 5 * y) % 256], -1)
        img = np.clip(smooth + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        images[f"image.{i}"] = img
        inputs = processor(text=[prompt], images=[Image.fromarray(img)], return_tensors="pt",
                           padding=True, truncation=True, max_length=77)
        with torch.no_grad():
            im = model.get_image_features(pixel_values=inputs["pixel_values"])
            tx = model.get_text_features(input_ids=inputs["input_ids"],
                                         attention_mask=inputs["attention_mask"])
            im = im / im.norm(dim=-1, keepdim=True)
            tx = tx / tx.norm(dim=-1, keepdim=True)
            cos = (im * tx).sum(-1)[0]
            pick = model.logit_scale.exp() * cos
        rows.append({"image": f"image.{i}", "size": [h, w], "prompt": prompt,
                     "cosine": float(cos), "pickscore": float(pick)})
    save_file(images, os.path.join(OUT, "images.safetensors"))
    meta = {"transformers": transformers.__version__, "torch": torch.__version__,
            "pillow": PIL.__version__}
    with open(os.path.join(OUT, "expected.json"), "w", encoding="utf-8") as f:
        json.dump({"made_with": meta, "cases": rows}, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
