//! Per-block activation checkpointing for the FLUX transformer.
//!
//! libtorch's C++ API has no `torch.utils.checkpoint`, so the backward pass is
//! driven segment by segment: a gradient-free forward keeps only each block's
//! input; the loss is differentiated with respect to the (detached) output; then
//! every block is recomputed with gradients, last to first, and back-propagated
//! with the gradient flowing into its output. Only one block's graph is alive at
//! a time. The shared conditioning `temb` is one leaf whose gradient accumulates
//! over all blocks before it is pushed through the embedding layers.

use tch::Tensor;

use super::{FluxTransformer, Rope};
use crate::error::Result;
use crate::models::FlowInputs;

/// Backward of `loss_fn(model(inputs))` through `vjp`s of one block at a time.
/// Parameter gradients accumulate as with a plain `loss.backward()`. Each unit
/// is acquired from the model's residency only while it computes, and its
/// gradients are reported complete right after its own backward.
pub fn backward_per_block(
    model: &FluxTransformer,
    inputs: &FlowInputs,
    loss_fn: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    // 1. Forward without graph, keeping block inputs.
    let kept = tch::no_grad(|| forward_keeping_inputs(model, inputs))?;
    // 2. Loss gradient with respect to the model output.
    let out_leaf = kept.out.detach().set_requires_grad(true);
    let loss = loss_fn(&out_leaf)?;
    loss.backward();
    let temb = kept.temb.detach().set_requires_grad(true);
    // 3. Head, then single blocks, last to first.
    let h = leaf(&kept.head_in);
    backward_unit(model, model.unit_head(), || {
        Ok(vec![(
            model.output_head(&h, &temb, kept.lt),
            out_leaf.grad(),
        )])
    })?;
    let g = backward_singles(model, &kept, &temb, h.grad())?; // (b, txt + img, c)
                                                              // 4. Double blocks: split the joint gradient into text and image parts.
    let g_txt = g.narrow(1, 0, kept.lt);
    let g_img = g.narrow(1, kept.lt, g.size()[1] - kept.lt);
    let (g_txt, g_img) = backward_doubles(model, &kept, &temb, (g_txt, g_img))?;
    // 5. Embeddings, with the gradient accumulated on temb.
    backward_unit(model, model.unit_embed(), || {
        let (img_e, txt_e, temb_e, _) = model.embed_inputs(inputs)?;
        Ok(vec![(img_e, g_img), (txt_e, g_txt), (temb_e, temb.grad())])
    })?;
    Ok(loss)
}

/// What the gradient-free forward keeps: each block's input, the shared
/// conditioning and the output.
struct Kept {
    /// The conditioning `(b, c)` and rotary tables every block reads.
    temb: Tensor,
    /// See `temb`.
    rope: Rope,
    /// Each double block's `(img, txt)` inputs `(b, img, c)`, `(b, txt, c)`.
    double_in: Vec<(Tensor, Tensor)>,
    /// Each single block's joint input `(b, txt + img, c)`.
    single_in: Vec<Tensor>,
    /// The output head's input `(b, txt + img, c)`.
    head_in: Tensor,
    /// The model's output `(b, img, out)`.
    out: Tensor,
    /// Text tokens.
    lt: i64,
}

/// The model's forward pass, keeping every block's input (run without a graph).
fn forward_keeping_inputs(model: &FluxTransformer, inputs: &FlowInputs) -> Result<Kept> {
    let (doubles, singles) = model.parts();
    let (img, txt, temb, rope) = in_unit(model, model.unit_embed(), || model.embed_inputs(inputs))?;
    let (mut i, mut t) = (img, txt);
    let mut double_in = Vec::with_capacity(doubles.len());
    for (n, block) in doubles.iter().enumerate() {
        double_in.push((i.shallow_clone(), t.shallow_clone()));
        (t, i) = in_unit(model, model.unit_double(n), || {
            Ok(block.forward(&i, &t, &temb, &rope))
        })?;
    }
    let lt = t.size()[1];
    let mut h = Tensor::cat(&[t, i], 1);
    let mut single_in = Vec::with_capacity(singles.len());
    for (n, block) in singles.iter().enumerate() {
        single_in.push(h.shallow_clone());
        h = in_unit(model, model.unit_single(n), || {
            Ok(block.forward(&h, &temb, &rope))
        })?;
    }
    let out = in_unit(model, model.unit_head(), || {
        Ok(model.output_head(&h, &temb, lt))
    })?;
    Ok(Kept {
        temb,
        rope,
        double_in,
        single_in,
        head_in: h,
        out,
        lt,
    })
}

/// Back-propagates the single blocks, last to first, from the gradient `g`
/// of the last one's output; the gradient of the first one's input.
fn backward_singles(
    model: &FluxTransformer,
    kept: &Kept,
    temb: &Tensor,
    mut g: Tensor,
) -> Result<Tensor> {
    let (_, singles) = model.parts();
    for (n, (block, x_in)) in singles.iter().zip(&kept.single_in).enumerate().rev() {
        let x = leaf(x_in);
        backward_unit(model, model.unit_single(n), || {
            Ok(vec![(
                block.forward(&x, temb, &kept.rope),
                g.shallow_clone(),
            )])
        })?;
        g = x.grad();
    }
    Ok(g)
}

/// Back-propagates the double blocks, last to first, from the gradients of
/// the last one's text and image outputs; those of the first one's inputs.
fn backward_doubles(
    model: &FluxTransformer,
    kept: &Kept,
    temb: &Tensor,
    (mut g_txt, mut g_img): (Tensor, Tensor),
) -> Result<(Tensor, Tensor)> {
    let (doubles, _) = model.parts();
    for (n, (block, (i_in, t_in))) in doubles.iter().zip(&kept.double_in).enumerate().rev() {
        let (i, t) = (leaf(i_in), leaf(t_in));
        backward_unit(model, model.unit_double(n), || {
            let (t_out, i_out) = block.forward(&i, &t, temb, &kept.rope);
            Ok(vec![
                (t_out, g_txt.shallow_clone()),
                (i_out, g_img.shallow_clone()),
            ])
        })?;
        (g_txt, g_img) = (t.grad(), i.grad());
    }
    Ok((g_txt, g_img))
}

/// `f` with unit `u` resident, released after (a gradient-free pass).
fn in_unit<T>(model: &FluxTransformer, u: usize, f: impl FnOnce() -> Result<T>) -> Result<T> {
    model.acquire(u)?;
    let out = f()?;
    model.release(u)?;
    Ok(out)
}

/// Recomputes unit `u` (`f` gives its outputs and their gradients) with the
/// unit resident, back-propagates, reports its gradients and releases it.
fn backward_unit(
    model: &FluxTransformer,
    u: usize,
    f: impl FnOnce() -> Result<Vec<(Tensor, Tensor)>>,
) -> Result<()> {
    model.acquire(u)?;
    backprop(&f()?);
    model.gradients_ready(u)?;
    model.release(u)
}

fn leaf(t: &Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

/// Back-propagates `grad` into each `output` in one pass (`sum(out * grad)` has
/// exactly `grad` as its gradient with respect to `out`). Outputs no trained
/// parameter reaches (the embeddings under LoRA: frozen weights, inputs that
/// need no gradient) are left out; with none left there is nothing to do.
fn backprop(pairs: &[(Tensor, Tensor)]) {
    let total = pairs
        .iter()
        .filter(|(out, grad)| out.requires_grad() && grad.defined())
        .map(|(out, grad)| (out * grad.detach()).sum(out.kind()))
        .reduce(|a, b| a + b);
    if let Some(total) = total {
        total.backward();
    }
}
