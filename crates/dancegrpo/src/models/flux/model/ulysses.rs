//! Ulysses sequence parallelism of the forward pass: the image tokens are
//! split over the `N` processes of a collective; around each attention an
//! all-to-all turns the sequence split into a head split (every process then
//! attends over the whole sequence for `heads / N` heads) and a second one
//! turns it back. The text tokens (a few hundred) are kept whole on every
//! process: each computes them, takes its own heads' text queries, keys and
//! values into the attention, and gathers the other heads' text outputs.
//! RoPE is applied before the exchange, with each token's own position.
//!
//! Every row-wise layer sees the same rows as in one process and every head
//! attends over the same sequence in the same order, so the velocity equals
//! the single-process one up to the attention kernel's blocking over fewer
//! heads (tested with 2 Gloo processes). A sharded model's units are gathered
//! around their use as in the plain forward (the same collectives on every
//! process, in the same order).

use tch::Tensor;

use super::super::blocks::{merge_heads, sdpa};
use super::{FluxTransformer, Rope};
use crate::dist::Collective;
use crate::error::Result;
use crate::models::{FlowInputs, VelocityModel};

impl FluxTransformer {
    /// The velocity `(b, L, c)` of the full inputs `x`, computed by the
    /// processes of `c` together (each holds `x` whole and ends with the whole
    /// velocity); `L` and the head count must be multiples of the world size.
    pub fn velocity_ulysses(&self, x: &FlowInputs, c: &dyn Collective) -> Result<Tensor> {
        self.check_inputs(x)?;
        let (n, r) = (c.world_size(), c.rank());
        let (b, l) = (x.latents.size()[0], x.latents.size()[1]);
        self.check_sequence_split(l, n)?;
        let lloc = l / n;
        let local = x.latents.narrow(1, r * lloc, lloc);
        self.acquire(self.unit_embed())?;
        let e = self.embed(&FlowInputs {
            latents: &local,
            ..*x
        });
        self.done_with(self.unit_embed())?;
        let lt = e.txt.size()[1];
        let full = self.rope(x);
        let rows =
            |t: &Tensor| Tensor::cat(&[t.narrow(0, 0, lt), t.narrow(0, lt + r * lloc, lloc)], 0);
        let rope = full.map_rows(rows);
        let exchange = Exchange { c, n, r, lt, lloc };
        let attend = |q: &Tensor, k: &Tensor, v: &Tensor| exchange.attention(q, k, v, &rope);
        let (mut img, mut txt) = (e.img, e.txt);
        for (i, block) in self.transformer_blocks.iter().enumerate() {
            self.acquire(self.unit_double(i))?;
            (txt, img) = block.forward_with(&img, &txt, &e.temb, &attend)?;
            self.done_with(self.unit_double(i))?;
        }
        let mut h = Tensor::cat(&[txt, img], 1);
        for (i, block) in self.single_transformer_blocks.iter().enumerate() {
            self.acquire(self.unit_single(i))?;
            h = block.forward_with(&h, &e.temb, &attend)?;
            self.done_with(self.unit_single(i))?;
        }
        self.acquire(self.unit_head())?;
        let (_, out) = self.head(&h, &e.temb, lt); // (b, lloc, c)
        self.done_with(self.unit_head())?;
        let ch = out.size()[2];
        let all = Tensor::zeros([n * b * lloc * ch], (out.kind(), out.device()));
        c.all_gather_into(&all, &out.contiguous().view([-1]))?;
        Ok(all
            .view([n, b, lloc, ch])
            .permute([1, 0, 2, 3])
            .reshape([b, l, ch]))
    }
}

/// One process's part of the attention exchanges.
struct Exchange<'a> {
    c: &'a dyn Collective,
    n: i64,
    r: i64,
    /// Text tokens (whole on every process) and this process's image tokens.
    lt: i64,
    lloc: i64,
}

impl Exchange<'_> {
    /// `(q, k, v)` (b, heads, Lt + lloc, hd) of this process's tokens ->
    /// the attention output (b, Lt + lloc, heads * hd) of the same tokens.
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, rope: &Rope) -> Result<Tensor> {
        let (q, k) = (rope.apply(q), rope.apply(k));
        let g = q.size()[1] / self.n; // heads per process
        let gather = |t: &Tensor| -> Result<Tensor> {
            let text = t.narrow(2, 0, self.lt).narrow(1, self.r * g, g); // (b, g, Lt, hd)
            let img = self.to_heads(&t.narrow(2, self.lt, self.lloc))?; // (b, g, L, hd)
            Ok(Tensor::cat(&[text, img], 2))
        };
        let out = sdpa(&gather(&q)?, &gather(&k)?, &gather(v)?); // (b, g, Lt + L, hd)
        let l = out.size()[2] - self.lt;
        let text = self.all_heads(&out.narrow(2, 0, self.lt))?; // (b, heads, Lt, hd)
        let img = self.to_tokens(&out.narrow(2, self.lt, l))?; // (b, heads, lloc, hd)
        Ok(merge_heads(&Tensor::cat(&[text, img], 2)))
    }

    /// (b, heads, lloc, hd) of this process's tokens -> (b, g, L, hd) of its heads.
    fn to_heads(&self, t: &Tensor) -> Result<Tensor> {
        let s = t.size();
        let (b, g, hd) = (s[0], s[1] / self.n, s[3]);
        // block j: heads of process j
        let send = t
            .reshape([b, self.n, g, self.lloc, hd])
            .permute([1, 0, 2, 3, 4]);
        let recv = self.swap(&send)?; // block j: process j's tokens, this process's heads
        Ok(recv
            .view([self.n, b, g, self.lloc, hd])
            .permute([1, 2, 0, 3, 4])
            .reshape([b, g, self.n * self.lloc, hd]))
    }

    /// (b, g, L, hd) of this process's heads -> (b, heads, lloc, hd) of its tokens.
    fn to_tokens(&self, t: &Tensor) -> Result<Tensor> {
        let s = t.size();
        let (b, g, hd) = (s[0], s[1], s[3]);
        // block j: the tokens of process j
        let send = t
            .reshape([b, g, self.n, self.lloc, hd])
            .permute([2, 0, 1, 3, 4]);
        let recv = self.swap(&send)?; // block j: process j's heads, this process's tokens
        Ok(recv
            .view([self.n, b, g, self.lloc, hd])
            .permute([1, 0, 2, 3, 4])
            .reshape([b, self.n * g, self.lloc, hd]))
    }

    /// (b, g, Lt, hd) of this process's heads -> (b, heads, Lt, hd).
    fn all_heads(&self, t: &Tensor) -> Result<Tensor> {
        let s = t.size();
        let all = Tensor::zeros([self.n * t.numel() as i64], (t.kind(), t.device()));
        self.c.all_gather_into(&all, &t.contiguous().view([-1]))?;
        Ok(all
            .view([self.n, s[0], s[1], s[2], s[3]])
            .permute([1, 0, 2, 3, 4])
            .reshape([s[0], self.n * s[1], s[2], s[3]]))
    }

    /// The all-to-all of `blocks` (n, ...): block j to process j; returns the
    /// received blocks, flat, in process order.
    fn swap(&self, blocks: &Tensor) -> Result<Tensor> {
        let send = blocks.contiguous().view([-1]);
        let recv = Tensor::zeros_like(&send);
        self.c.all_to_all(&recv, &send)?;
        Ok(recv)
    }
}
