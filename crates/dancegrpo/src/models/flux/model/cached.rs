//! The forward pass with a span of blocks run and its residual kept, or
//! skipped with a kept residual added in its place (the hook of
//! [`crate::sampler::cache`]'s block cache).
//!
//! Blocks are numbered in forward order: the double-stream blocks, then the
//! single-stream ones. Until the last double-stream block the hidden state is
//! the pair `(text, image)`; the residual of a span is always taken on the
//! joint tokens `[text, image]` (b, Lt + L, D), so a span may cross from one
//! kind of block to the other.

use std::ops::Range;

use tch::Tensor;

use super::FluxTransformer;
use crate::error::Result;
use crate::models::FlowInputs;

/// The hidden state between blocks.
enum Hidden {
    /// Before the single-stream blocks: text (b, Lt, D) and image (b, L, D) tokens.
    Pair(Tensor, Tensor),
    /// From the first single-stream block on: `[text, image]` (b, Lt + L, D).
    Joint(Tensor),
}

impl Hidden {
    /// The joint tokens (b, Lt + L, D).
    fn joint(&self) -> Tensor {
        match self {
            Hidden::Pair(txt, img) => Tensor::cat(&[txt, img], 1),
            Hidden::Joint(h) => h.shallow_clone(),
        }
    }

    /// Joint tokens `h` in this state's form (`lt` text tokens).
    fn with_joint(&self, h: Tensor, lt: i64) -> Hidden {
        match self {
            Hidden::Pair(..) => {
                let l = h.size()[1] - lt;
                Hidden::Pair(h.narrow(1, 0, lt), h.narrow(1, lt, l))
            }
            Hidden::Joint(_) => Hidden::Joint(h),
        }
    }
}

impl FluxTransformer {
    /// The velocity with the blocks `span` run (returning the residual they
    /// added, `(b, Lt + L, D)`) or, given `reuse`, skipped with it added.
    pub(in crate::models::flux) fn forward_span(
        &self,
        x: &FlowInputs,
        span: Range<usize>,
        reuse: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.check_inputs(x)?;
        self.acquire(self.unit_embed())?;
        let e = self.embed(x);
        self.done_with(self.unit_embed())?;
        let rope = self.rope(x);
        let (nd, ns) = (
            self.transformer_blocks.len(),
            self.single_transformer_blocks.len(),
        );
        let lt = e.txt.size()[1];
        let mut state = Hidden::Pair(e.txt, e.img);
        let (mut start, mut residual) = (None, None);
        for k in 0..nd + ns {
            if k == nd {
                state = Hidden::Joint(state.joint());
            }
            if k == span.start {
                let h = state.joint();
                if let Some(res) = reuse {
                    state = state.with_joint(&h + res, lt);
                }
                start = Some(h);
            }
            if reuse.is_some() && span.contains(&k) {
                continue;
            }
            state = self.run_block(k, state, (&e.temb, &rope))?;
            if k + 1 == span.end && reuse.is_none() {
                residual = start.take().map(|h0| state.joint() - h0);
            }
        }
        let h = state.joint();
        self.acquire(self.unit_head())?;
        let (_, out) = self.head(&h, &e.temb, lt);
        self.done_with(self.unit_head())?;
        Ok((out, residual))
    }

    /// Block `k` (forward order) on `state`.
    fn run_block(
        &self,
        k: usize,
        state: Hidden,
        (temb, rope): (&Tensor, &super::Rope),
    ) -> Result<Hidden> {
        let nd = self.transformer_blocks.len();
        let unit = match k < nd {
            true => self.unit_double(k),
            false => self.unit_single(k - nd),
        };
        self.acquire(unit)?;
        let next = match state {
            Hidden::Pair(txt, img) => {
                let (txt, img) = self.transformer_blocks[k].forward(&img, &txt, temb, rope);
                Hidden::Pair(txt, img)
            }
            Hidden::Joint(h) => {
                Hidden::Joint(self.single_transformer_blocks[k - nd].forward(&h, temb, rope))
            }
        };
        self.done_with(unit)?;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use crate::models::flux::{packing, FluxConfig, FluxTransformer};
    use crate::models::{FlowInputs, VelocityModel};
    use crate::rng::Philox;
    use crate::weights::Source;

    #[test]
    fn a_span_run_is_the_plain_forward_and_its_residual_replays_it() {
        // 2 double-stream blocks (0, 1) and 3 single-stream ones (2, 3, 4)
        let cfg = FluxConfig {
            num_layers: 2,
            num_single_layers: 3,
            ..FluxConfig::tiny()
        };
        let m =
            FluxTransformer::new(cfg.clone(), Source::Seeded(1), Kind::Float, Device::Cpu).unwrap();
        assert_eq!(m.cacheable_blocks(), 5);
        let mut rng = Philox::new(4, 0);
        let (z, text) = (
            rng.normal_tensor(&[2, 16, 64]),
            rng.normal_tensor(&[2, 8, 32]),
        );
        let z2 = &z + rng.normal_tensor(&[2, 16, 64]) * 0.05;
        let (pooled, t) = (
            rng.normal_tensor(&[2, 4]),
            Tensor::from_slice(&[0.5f32, 0.25]),
        );
        let (txt_ids, img_ids) = (
            packing::text_ids(8, Device::Cpu),
            packing::image_ids(8, 8, Device::Cpu),
        );
        let g = Tensor::from_slice(&[3.5f32, 3.5]);
        let at = |z: &'_ Tensor| -> Tensor {
            let x = FlowInputs {
                latents: z,
                timestep: &t,
                text: &text,
                pooled: &pooled,
                text_ids: &txt_ids,
                image_ids: &img_ids,
                guidance: Some(&g),
            };
            m.velocity(&x).unwrap()
        };
        let (v, v2) = (at(&z), at(&z2));
        // spans inside the double-stream blocks, across the kinds, inside the single-stream ones
        for span in [0..1, 1..3, 0..5, 3..5] {
            let x = FlowInputs {
                latents: &z,
                timestep: &t,
                text: &text,
                pooled: &pooled,
                text_ids: &txt_ids,
                image_ids: &img_ids,
                guidance: Some(&g),
            };
            let (out, res) = m.velocity_blocks(&x, span.clone(), None).unwrap();
            assert!(
                out.equal(&v),
                "{span:?}: running the span is the plain forward, bit for bit"
            );
            let res = res.unwrap();
            assert_eq!(res.size(), [2, 8 + 16, 32]);
            // the residual added back in place of the blocks: the same velocity up to rounding
            let (replay, none) = m.velocity_blocks(&x, span.clone(), Some(&res)).unwrap();
            assert!(none.is_none());
            let err = (&replay - &v).abs().max().double_value(&[]);
            assert!(
                err < 1e-5 * v.abs().max().double_value(&[]),
                "{span:?}: {err}"
            );
            // on other latents the stale residual approximates, it does not reproduce
            let x2 = FlowInputs { latents: &z2, ..x };
            let (cached, _) = m.velocity_blocks(&x2, span.clone(), Some(&res)).unwrap();
            let off = (&cached - &v2).abs().max().double_value(&[]);
            assert!(
                off > 1e-6 && off < (&v2 - &v).abs().max().double_value(&[]) * 2.0,
                "{span:?}: {off}"
            );
        }
    }
}
