//! FLUX transformer blocks: AdaLN-zero modulation, the double-stream (joint
//! attention) block and the single-stream block, as in diffusers.

use tch::Tensor;

use super::embeddings::Rope;
use crate::error::Result;
use crate::nn::{cast, layer_norm, Linear, RmsNorm};
use crate::weights::VarBuilder;

const EPS: f64 = 1e-6;

/// Query/key/value projections of one stream with per-head RMS norms on q and k.
struct Qkv {
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
}

impl Qkv {
    /// Keys: `{q}`, `{k}`, `{v}`, `{nq}`, `{nk}` under `vb` (module order of diffusers' `Attention`).
    fn new(vb: &VarBuilder, names: [&str; 5], dim: i64, head_dim: i64) -> Result<Self> {
        let norm_q = RmsNorm::new(&vb.pp(names[3]), head_dim, EPS)?;
        let norm_k = RmsNorm::new(&vb.pp(names[4]), head_dim, EPS)?;
        let q = Linear::new(&vb.pp(names[0]), dim, dim, true)?;
        let k = Linear::new(&vb.pp(names[1]), dim, dim, true)?;
        let v = Linear::new(&vb.pp(names[2]), dim, dim, true)?;
        Ok(Qkv {
            q,
            k,
            v,
            norm_q,
            norm_k,
        })
    }

    /// (b, seq, dim) -> q, k, v each (b, heads, seq, head_dim), q and k normalised.
    fn project(&self, x: &Tensor, heads: i64) -> (Tensor, Tensor, Tensor) {
        let split = |t: Tensor| {
            let b = t.size()[0];
            let d = t.size()[2];
            t.view([b, -1, heads, d / heads]).transpose(1, 2)
        };
        let q = self.norm_q.forward(&split(self.q.forward(x)));
        let k = self.norm_k.forward(&split(self.k.forward(x)));
        (q, k, split(self.v.forward(x)))
    }
}

/// Rotary positions then scaled dot-product attention; (b, heads, seq, hd) -> (b, seq, dim).
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, rope: &Rope) -> Tensor {
    merge_heads(&sdpa(&rope.apply(q), &rope.apply(k), v))
}

/// Scaled dot-product attention of rotated `q`, `k` and `v` (b, heads, seq, hd)
/// -> (b, heads, seq, hd) in `q`'s dtype.
///
/// On the CPU, bfloat16 attention runs in float32: libtorch's CPU flash
/// attention is slower in bfloat16 than in float32 (medium preset: 2.7 s
/// against 1.9 s per iteration, forward and backward), and float32 is the more
/// exact of the two.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let up = q.device() == tch::Device::Cpu && q.kind() == tch::Kind::BFloat16;
    let wide = |t: &Tensor| match up {
        true => t.to_kind(tch::Kind::Float),
        false => t.shallow_clone(),
    };
    let (q32, k32, v32) = (wide(q), wide(k), wide(v));
    let out = Tensor::scaled_dot_product_attention(
        &q32,
        &k32,
        &v32,
        None::<Tensor>,
        0.0,
        false,
        None,
        false,
    );
    cast(&out, q.kind())
}

/// (b, heads, seq, hd) -> (b, seq, heads * hd).
pub fn merge_heads(out: &Tensor) -> Tensor {
    let s = out.size();
    out.transpose(1, 2).reshape([s[0], -1, s[1] * s[3]])
}

/// An attention over `(q, k, v)` (b, heads, seq, hd) before rotation, giving
/// (b, seq, dim): the plain one, or a sequence-parallel one.
pub type Attend<'a> = &'a dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;

/// `FeedForward(dim, activation_fn="gelu-approximate")`: keys `net.0.proj`, `net.2`.
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(vb: &VarBuilder, dim: i64) -> Result<Self> {
        Ok(FeedForward {
            proj_in: Linear::new(&vb.pp("net").pp(0).pp("proj"), dim, 4 * dim, true)?,
            proj_out: Linear::new(&vb.pp("net").pp(2), 4 * dim, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.proj_out.forward(&self.proj_in.forward(x).gelu("tanh"))
    }
}

/// `norm(x) * (1 + scale) + shift` with per-sample (b, dim) modulation.
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    layer_norm(x, EPS) * (scale.unsqueeze(1) + 1.0) + shift.unsqueeze(1)
}

/// `silu(temb) -> linear -> n chunks` (AdaLN-zero modulation parameters).
fn ada_chunks(linear: &Linear, temb: &Tensor, n: i64) -> Vec<Tensor> {
    linear.forward(&temb.silu()).chunk(n, 1)
}

/// `FluxTransformerBlock`: image and text streams with joint attention.
pub struct DoubleBlock {
    norm1: Linear,
    norm1_context: Linear,
    img_qkv: Qkv,
    txt_qkv: Qkv,
    to_out: Linear,
    to_add_out: Linear,
    ff: FeedForward,
    ff_context: FeedForward,
    heads: i64,
}

impl DoubleBlock {
    /// Builds the block of width `dim` under `vb` (`transformer_blocks.<i>`).
    pub fn new(vb: &VarBuilder, dim: i64, heads: i64, head_dim: i64) -> Result<Self> {
        let norm1 = Linear::new(&vb.pp("norm1").pp("linear"), dim, 6 * dim, true)?;
        let norm1_context = Linear::new(&vb.pp("norm1_context").pp("linear"), dim, 6 * dim, true)?;
        let attn = vb.pp("attn");
        let img_qkv = Qkv::new(
            &attn,
            ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
            dim,
            head_dim,
        )?;
        // diffusers creates the context projections in the order k, v, q, then the
        // output projections, then the context norms: keep it for named_parameters().
        let add_k = Linear::new(&attn.pp("add_k_proj"), dim, dim, true)?;
        let add_v = Linear::new(&attn.pp("add_v_proj"), dim, dim, true)?;
        let add_q = Linear::new(&attn.pp("add_q_proj"), dim, dim, true)?;
        let to_out = Linear::new(&attn.pp("to_out").pp(0), dim, dim, true)?;
        let to_add_out = Linear::new(&attn.pp("to_add_out"), dim, dim, true)?;
        let txt_qkv = Qkv {
            q: add_q,
            k: add_k,
            v: add_v,
            norm_q: RmsNorm::new(&attn.pp("norm_added_q"), head_dim, EPS)?,
            norm_k: RmsNorm::new(&attn.pp("norm_added_k"), head_dim, EPS)?,
        };
        let ff = FeedForward::new(&vb.pp("ff"), dim)?;
        let ff_context = FeedForward::new(&vb.pp("ff_context"), dim)?;
        Ok(DoubleBlock {
            norm1,
            norm1_context,
            img_qkv,
            txt_qkv,
            to_out,
            to_add_out,
            ff,
            ff_context,
            heads,
        })
    }

    /// img (b, L, dim), txt (b, Lt, dim), temb (b, dim) -> (txt, img)
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &Rope,
    ) -> (Tensor, Tensor) {
        let plain = |q: &Tensor, k: &Tensor, v: &Tensor| Ok(attention(q, k, v, rope));
        match self.forward_with(img, txt, temb, &plain) {
            Ok(out) => out,
            Err(_) => unreachable!("the plain attention does not fail"),
        }
    }

    /// [`Self::forward`] with the attention `attend` (it rotates).
    pub fn forward_with(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        attend: Attend,
    ) -> Result<(Tensor, Tensor)> {
        let m = ada_chunks(&self.norm1, temb, 6); // shift, scale, gate (msa); shift, scale, gate (mlp)
        let c = ada_chunks(&self.norm1_context, temb, 6);
        let img_n = modulate(img, &m[0], &m[1]);
        let txt_n = modulate(txt, &c[0], &c[1]);
        let (iq, ik, iv) = self.img_qkv.project(&img_n, self.heads);
        let (tq, tk, tv) = self.txt_qkv.project(&txt_n, self.heads);
        let q = Tensor::cat(&[tq, iq], 2);
        let k = Tensor::cat(&[tk, ik], 2);
        let v = Tensor::cat(&[tv, iv], 2);
        let joint = attend(&q, &k, &v)?; // (b, Lt + L, dim)
        let (lt, l) = (txt.size()[1], img.size()[1]);
        // split: its backward is one concatenation, not two zero-filled gradients
        let parts = joint.split_with_sizes([lt, l], 1);
        let txt_attn = self.to_add_out.forward(&parts[0]);
        let img_attn = self.to_out.forward(&parts[1]);

        let img = img + m[2].unsqueeze(1) * img_attn;
        let img_ff = self.ff.forward(&modulate(&img, &m[3], &m[4]));
        let img = &img + m[5].unsqueeze(1) * img_ff;

        let txt = txt + c[2].unsqueeze(1) * txt_attn;
        let txt_ff = self.ff_context.forward(&modulate(&txt, &c[3], &c[4]));
        let txt = &txt + c[5].unsqueeze(1) * txt_ff;
        Ok((txt, img))
    }
}

/// `FluxSingleTransformerBlock`: parallel attention and MLP on the joint sequence.
pub struct SingleBlock {
    norm: Linear,
    proj_mlp: Linear,
    proj_out: Linear,
    qkv: Qkv,
    heads: i64,
}

impl SingleBlock {
    /// Builds the block of width `dim` under `vb` (`single_transformer_blocks.<i>`).
    pub fn new(vb: &VarBuilder, dim: i64, heads: i64, head_dim: i64) -> Result<Self> {
        let norm = Linear::new(&vb.pp("norm").pp("linear"), dim, 3 * dim, true)?;
        let proj_mlp = Linear::new(&vb.pp("proj_mlp"), dim, 4 * dim, true)?;
        let proj_out = Linear::new(&vb.pp("proj_out"), 5 * dim, dim, true)?;
        let qkv = Qkv::new(
            &vb.pp("attn"),
            ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
            dim,
            head_dim,
        )?;
        Ok(SingleBlock {
            norm,
            proj_mlp,
            proj_out,
            qkv,
            heads,
        })
    }

    /// x (b, Lt + L, dim), temb (b, dim) -> (b, Lt + L, dim)
    pub fn forward(&self, x: &Tensor, temb: &Tensor, rope: &Rope) -> Tensor {
        let plain = |q: &Tensor, k: &Tensor, v: &Tensor| Ok(attention(q, k, v, rope));
        match self.forward_with(x, temb, &plain) {
            Ok(out) => out,
            Err(_) => unreachable!("the plain attention does not fail"),
        }
    }

    /// [`Self::forward`] with the attention `attend` (it rotates).
    pub fn forward_with(&self, x: &Tensor, temb: &Tensor, attend: Attend) -> Result<Tensor> {
        let m = ada_chunks(&self.norm, temb, 3); // shift, scale, gate
        let x_n = modulate(x, &m[0], &m[1]);
        let mlp = self.proj_mlp.forward(&x_n).gelu("tanh");
        let (q, k, v) = self.qkv.project(&x_n, self.heads);
        let attn = attend(&q, &k, &v)?;
        let h = Tensor::cat(&[attn, mlp], 2);
        Ok(x + m[2].unsqueeze(1) * self.proj_out.forward(&h))
    }
}
