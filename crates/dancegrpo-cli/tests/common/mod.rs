//! Helpers shared by the CLI test binaries.

use std::path::Path;

use dancegrpo::io::torch_pt::write_torch_pt_view;
use tch::{Kind, Tensor};

/// A reference-format directory as DanceGRPO's `preprocess_flux_embedding.py`
/// writes it with batch 2: each `.pt` is `torch.save(batch[i])`, a view into the
/// batch's storage (bf16), `text_ids[i]` a row of the `[Lt, 3]` zeros.
pub fn write_reference(
    dir: &Path,
    n: usize,
    lt: i64,
    d: i64,
    p: i64,
) -> (Tensor, Tensor, Vec<String>) {
    for sub in ["prompt_embed", "pooled_prompt_embeds", "text_ids"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let n64 = n as i64;
    let embeds = (Tensor::arange(n64 * lt * d, (Kind::Float, tch::Device::Cpu)) * 0.37)
        .sin()
        .to_kind(Kind::BFloat16)
        .view([n64, lt, d]);
    let pooled = (Tensor::arange(n64 * p, (Kind::Float, tch::Device::Cpu)) * 1.3)
        .cos()
        .to_kind(Kind::BFloat16)
        .view([n64, p]);
    let text_ids = Tensor::zeros([lt, 3], (Kind::Float, tch::Device::Cpu));
    let mut items = Vec::new();
    let mut captions = Vec::new();
    for i in 0..n64 {
        let (b, j) = (i / 2, i % 2); // batch b, row j
        let rows = 2.min(n64 - 2 * b);
        let batch_e = embeds.narrow(0, 2 * b, rows).flatten(0, -1);
        let batch_p = pooled.narrow(0, 2 * b, rows).flatten(0, -1);
        let name = format!("{i}.pt");
        write_torch_pt_view(
            &dir.join("prompt_embed").join(&name),
            &batch_e,
            j * lt * d,
            &[lt, d],
            &[d, 1],
        )
        .unwrap();
        write_torch_pt_view(
            &dir.join("pooled_prompt_embeds").join(&name),
            &batch_p,
            j * p,
            &[p],
            &[1],
        )
        .unwrap();
        write_torch_pt_view(
            &dir.join("text_ids").join(&name),
            &text_ids.flatten(0, -1),
            j * 3,
            &[3],
            &[1],
        )
        .unwrap();
        let caption = format!("caption {i} ✓");
        items.push(serde_json::json!({
            "prompt_embed_path": name, "text_ids": name, "pooled_prompt_embeds_path": name, "caption": caption,
        }));
        captions.push(caption);
    }
    std::fs::write(
        dir.join("videos2caption.json"),
        serde_json::to_string_pretty(&items).unwrap(),
    )
    .unwrap();
    (embeds, pooled, captions)
}
