"""Writes what peft 0.13.2 saves for a LoRA on the built-in tiny FLUX transformer, for the layout
check of our LoRA checkpoints (crates/dancegrpo-cli/tests/train.rs).

    /tmp/tf/bin/pip install peft==0.13.2 diffusers==0.32.0 (with torch importable)
    dancegrpo train --out /tmp/run --set optim.lora.rank=4 --set optim.lora.alpha=8 --set run.iterations=1
    python tools/peft_reference.py /tmp/run/base/transformer

Output: crates/dancegrpo/tests/data/peft-lora/{adapter_config.json,keys.json}: peft's own
`save_pretrained` config and the names (with shapes) of its `adapter_model.safetensors`.
"""
import json
import os
import sys
import tempfile

from diffusers import FluxTransformer2DModel
from peft import LoraConfig, get_peft_model
from safetensors import safe_open

TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
           "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
           "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp"]  # LoraConfig::default()'s
OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "dancegrpo", "tests", "data", "peft-lora")


def main():
    base = FluxTransformer2DModel.from_pretrained(sys.argv[1])
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, "adapter_config.json")) as f:
            config = json.load(f)
        with safe_open(os.path.join(tmp, "adapter_model.safetensors"), "pt") as f:
            keys = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=1, sort_keys=True)
    with open(os.path.join(OUT, "keys.json"), "w") as f:
        json.dump(keys, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
