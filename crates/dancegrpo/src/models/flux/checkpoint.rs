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

use super::model::FluxTransformer;
use crate::error::Result;
use crate::models::FlowInputs;

/// Backward of `loss_fn(model(inputs))` through `vjp`s of one block at a time.
/// Parameter gradients accumulate as with a plain `loss.backward()`.
pub fn backward_per_block(
    model: &FluxTransformer,
    inputs: &FlowInputs,
    loss_fn: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (doubles, singles) = model.parts();
    // 1. Forward without graph, keeping block inputs.
    let (temb, rope, double_in, single_in, out) = tch::no_grad(|| -> Result<_> {
        let (img, txt, temb, rope) = model.embed_inputs(inputs)?;
        let (mut i, mut t) = (img.shallow_clone(), txt.shallow_clone());
        let mut double_in = Vec::with_capacity(doubles.len());
        for block in doubles {
            double_in.push((i.shallow_clone(), t.shallow_clone()));
            (t, i) = block.forward(&i, &t, &temb, &rope);
        }
        let lt = t.size()[1];
        let mut h = Tensor::cat(&[t, i], 1);
        let mut single_in = Vec::with_capacity(singles.len());
        for block in singles {
            single_in.push(h.shallow_clone());
            h = block.forward(&h, &temb, &rope);
        }
        let out = model.output_head(&h, &temb, lt);
        Ok((temb, rope, double_in, single_in, (h, out, lt)))
    })?;
    let (head_in, out, lt) = out;

    // 2. Loss gradient with respect to the model output.
    let out_leaf = out.detach().set_requires_grad(true);
    let loss = loss_fn(&out_leaf)?;
    loss.backward();
    let temb_leaf = temb.detach().set_requires_grad(true);

    // 3. Head, then single blocks, last to first.
    let h = leaf(&head_in);
    backprop(&[(model.output_head(&h, &temb_leaf, lt), out_leaf.grad())]);
    let mut g = h.grad();
    for (block, x_in) in singles.iter().zip(&single_in).rev() {
        let x = leaf(x_in);
        backprop(&[(block.forward(&x, &temb_leaf, &rope), g)]);
        g = x.grad();
    }
    // 4. Double blocks: split the joint gradient into text and image parts.
    let mut g_txt = g.narrow(1, 0, lt);
    let mut g_img = g.narrow(1, lt, g.size()[1] - lt);
    for (block, (i_in, t_in)) in doubles.iter().zip(&double_in).rev() {
        let (i, t) = (leaf(i_in), leaf(t_in));
        let (t_out, i_out) = block.forward(&i, &t, &temb_leaf, &rope);
        backprop(&[(t_out, g_txt), (i_out, g_img)]);
        (g_txt, g_img) = (t.grad(), i.grad());
    }
    // 5. Embeddings, with the gradient accumulated on temb.
    let (img_e, txt_e, temb_e, _) = model.embed_inputs(inputs)?;
    backprop(&[(img_e, g_img), (txt_e, g_txt), (temb_e, temb_leaf.grad())]);
    Ok(loss)
}

fn leaf(t: &Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

/// Back-propagates `grad` into each `output` in one pass (`sum(out * grad)` has
/// exactly `grad` as its gradient with respect to `out`).
fn backprop(pairs: &[(Tensor, Tensor)]) {
    let total = pairs
        .iter()
        .map(|(out, grad)| (out * grad.detach()).sum(out.kind()))
        .reduce(|a, b| a + b)
        .expect("at least one output");
    total.backward();
}
