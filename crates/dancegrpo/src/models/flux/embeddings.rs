//! FLUX conditioning embeddings: sinusoidal timestep features, the combined
//! timestep / guidance / pooled-text embedding, and 3-axis rotary positions.

use std::cell::RefCell;

use tch::{Kind, Tensor};

use crate::error::Result;
use crate::nn::{cast, upcast_kind, Linear};
use crate::weights::VarBuilder;

/// Sinusoidal features of `t` (b,) -> (b, dim), diffusers' `get_timestep_embedding`
/// with `flip_sin_to_cos=True`, `downscale_freq_shift=0`: `[cos | sin]`, in
/// float32 (float64 for a float64 `t`).
pub fn timestep_features(t: &Tensor, dim: i64) -> Tensor {
    let half = dim / 2;
    let kind = upcast_kind(t.kind());
    let exponent = Tensor::arange(half, (kind, t.device())) * (-(10000f64).ln());
    let exponent = exponent / half as f64;
    let freqs = exponent.exp(); // (half,)
    let args = t.unsqueeze(1).to_kind(kind) * freqs.unsqueeze(0); // (b, half)
    let emb = Tensor::cat(&[args.sin(), args.cos()], -1);
    let emb = Tensor::cat(&[emb.narrow(1, half, half), emb.narrow(1, 0, half)], -1);
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1, 0, 0])
    } else {
        emb
    }
}

/// `TimestepEmbedding`: linear -> SiLU -> linear (keys `linear_1`, `linear_2`).
pub struct MlpEmbedder {
    linear_1: Linear,
    linear_2: Linear,
}

impl MlpEmbedder {
    /// Builds an embedder from `in_dim` features to `out_dim`.
    pub fn new(vb: &VarBuilder, in_dim: i64, out_dim: i64) -> Result<Self> {
        Ok(MlpEmbedder {
            linear_1: Linear::new(&vb.pp("linear_1"), in_dim, out_dim, true)?,
            linear_2: Linear::new(&vb.pp("linear_2"), out_dim, out_dim, true)?,
        })
    }

    /// (b, in) -> (b, out)
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(x).silu())
    }
}

/// `CombinedTimestep[Guidance]TextProjEmbeddings`: `temb = mlp(t) [+ mlp(g)] + mlp(pooled)`.
pub struct TimeTextEmbed {
    timestep_embedder: MlpEmbedder,
    guidance_embedder: Option<MlpEmbedder>,
    text_embedder: MlpEmbedder,
}

impl TimeTextEmbed {
    /// Builds the embedding of width `dim`; `guidance` adds `guidance_embedder`.
    pub fn new(vb: &VarBuilder, dim: i64, pooled_dim: i64, guidance: bool) -> Result<Self> {
        let timestep_embedder = MlpEmbedder::new(&vb.pp("timestep_embedder"), 256, dim)?;
        let guidance_embedder = if guidance {
            Some(MlpEmbedder::new(&vb.pp("guidance_embedder"), 256, dim)?)
        } else {
            None
        };
        let text_embedder = MlpEmbedder::new(&vb.pp("text_embedder"), pooled_dim, dim)?;
        Ok(TimeTextEmbed {
            timestep_embedder,
            guidance_embedder,
            text_embedder,
        })
    }

    /// Whether the model expects a guidance value.
    pub fn has_guidance(&self) -> bool {
        self.guidance_embedder.is_some()
    }

    /// `timestep`, `guidance`: (b,) already multiplied by 1000; `pooled`: (b, p) -> (b, dim)
    pub fn forward(&self, timestep: &Tensor, guidance: Option<&Tensor>, pooled: &Tensor) -> Tensor {
        let kind = pooled.kind();
        let t_emb = self
            .timestep_embedder
            .forward(&timestep_features(timestep, 256).to_kind(kind));
        let tg_emb = match (&self.guidance_embedder, guidance) {
            (Some(embedder), Some(g)) => {
                t_emb + embedder.forward(&timestep_features(g, 256).to_kind(kind))
            }
            _ => t_emb,
        };
        tg_emb + self.text_embedder.forward(pooled)
    }
}

/// Rotary tables `(cos, sin)`, each `(seq, head_dim)`, for the concatenated
/// text-then-image position ids.
pub struct Rope {
    /// Cosines `(seq, head_dim)`, float32 (float64 for a float64 model).
    pub cos: Tensor,
    /// Sines `(seq, head_dim)`, float32 (float64 for a float64 model).
    pub sin: Tensor,
    /// The sines with the sign of the rotation folded in: `-sin` on the even
    /// (real) columns, `sin` on the odd ones, `(seq, head_dim)`.
    signed_sin: Tensor,
    /// `(cos, signed_sin)` laid out for a head count (see [`Rope::spread`]),
    /// built at the first rotation that can use them.
    spread: RefCell<Option<(i64, Tensor, Tensor)>>,
}

impl Rope {
    /// `FluxPosEmbed(theta=10000, axes_dim)` of `ids` `(seq, n_axes)`: frequencies
    /// in float64, each repeated twice (interleaved pairs), cast to float32, or
    /// kept in float64 when the model computes in `model_kind` float64.
    pub fn new(ids: &Tensor, axes_dims: &[i64], model_kind: Kind) -> Self {
        let table_kind = upcast_kind(model_kind);
        let pos = ids.to_kind(table_kind);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for (i, &dim) in axes_dims.iter().enumerate() {
            let range = Tensor::arange_start_step(0, dim, 2, (Kind::Double, ids.device()));
            let freqs = Tensor::pow_scalar(10000f64, &(range / dim as f64)).reciprocal(); // (dim/2,)
            let angles = pos.select(1, i as i64).outer(&freqs); // (seq, dim/2) float64
            cos.push(
                angles
                    .cos()
                    .repeat_interleave_self_int(2, 1, None)
                    .to_kind(table_kind),
            );
            sin.push(
                angles
                    .sin()
                    .repeat_interleave_self_int(2, 1, None)
                    .to_kind(table_kind),
            );
        }
        Rope::from_tables(Tensor::cat(&cos, -1), Tensor::cat(&sin, -1))
    }

    /// The rotation of the tables `cos`, `sin` `(seq, head_dim)`.
    pub fn from_tables(cos: Tensor, sin: Tensor) -> Self {
        let hd = sin.size()[1];
        // (+1, -1, +1, ...) negated: -1 on the real column of each pair
        let sign = Tensor::arange(hd, (Kind::Int64, sin.device())).remainder(2) * 2 - 1;
        let signed_sin = &sin * sign.to_kind(sin.kind()); // exact: a sign change
        Rope {
            cos,
            sin,
            signed_sin,
            spread: RefCell::new(None),
        }
    }

    /// `(cos, signed_sin)` as `(heads, seq, head_dim)` views of
    /// `(seq, heads, head_dim)` memory: the order of the projections that
    /// `apply` rotates, so a CPU product walks both operands in one run per
    /// row instead of `head_dim`-long pieces of a broadcast table.
    fn spread(&self, heads: i64) -> (Tensor, Tensor) {
        let mut cache = self.spread.borrow_mut();
        if let Some((_, cos, ssin)) = cache.as_ref().filter(|(h, _, _)| *h == heads) {
            return (cos.shallow_clone(), ssin.shallow_clone());
        }
        let lay = |t: &Tensor| {
            let (seq, hd) = (t.size()[0], t.size()[1]);
            let spread = t.unsqueeze(1).expand([seq, heads, hd], false).contiguous();
            spread.transpose(0, 1) // (heads, seq, hd)
        };
        let (cos, ssin) = (lay(&self.cos), lay(&self.signed_sin));
        *cache = Some((heads, cos.shallow_clone(), ssin.shallow_clone()));
        (cos, ssin)
    }

    /// The rotation of the rows `f(table)` of these tables (a sequence shard).
    pub fn map_rows(&self, f: impl Fn(&Tensor) -> Tensor) -> Self {
        Rope::from_tables(f(&self.cos), f(&self.sin))
    }

    /// Rotates `x` `(b, heads, seq, head_dim)`: pairs `(re, im)` become
    /// `(re cos - im sin, im cos + re sin)`, computed in float32 (float64 for float64).
    ///
    /// Written as `x * cos + swap(x) * signed_sin` with `swap` exchanging the two
    /// members of each pair: every element is the same two correctly rounded
    /// products and one sum as the reference's `x * cos + stack(-im, re) * sin`
    /// (a sign change is exact), forward and backward, in 3 kernels instead of 7
    /// and without the zero-filled gradients of `select`.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let kind = upcast_kind(x.kind());
        let pairs = x.reshape([size[0], size[1], size[2], size[3] / 2, 2]);
        // (b, heads, seq, hd) with each pair's members exchanged: (im, re)
        let swapped = pairs.flip([-1]).reshape(&size);
        // on the CPU, x in the projections' (b, seq, heads, hd) memory order:
        // tables to match (a GPU kernel indexes a broadcast table at no cost,
        // and reading heads-times larger tables would cost memory traffic)
        let cpu = x.device() == tch::Device::Cpu;
        let (cos, ssin) = match cpu && x.stride()[1] == size[3] {
            true => self.spread(size[1]),
            false => (self.cos.shallow_clone(), self.signed_sin.shallow_clone()),
        };
        // each term widened on its own, as diffusers (a bfloat16 gradient rounds per term)
        let rotated = cast(x, kind) * cos + cast(&swapped, kind) * ssin;
        cast(&rotated, x.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference's formulation of the rotation.
    fn apply_reference(rope: &Rope, x: &Tensor) -> Tensor {
        let size = x.size();
        let pairs = x.reshape([size[0], size[1], size[2], size[3] / 2, 2]);
        let (re, im) = (pairs.select(-1, 0), pairs.select(-1, 1));
        let rotated = Tensor::stack(&[im.neg(), re], -1).flatten(3, -1);
        let cos = rope.cos.unsqueeze(0).unsqueeze(0);
        let sin = rope.sin.unsqueeze(0).unsqueeze(0);
        let kind = upcast_kind(x.kind());
        (x.to_kind(kind) * cos + rotated.to_kind(kind) * sin).to_kind(x.kind())
    }

    /// Values and gradients of the rotation of a `(b, heads, seq, hd)` input,
    /// laid out as the projections give it (`transposed`) or contiguous.
    fn rotate(rope: &Rope, kind: Kind, reference: bool, transposed: bool) -> (Tensor, Tensor) {
        tch::manual_seed(7);
        let x = Tensor::randn([2, 24, 3, 16], (Kind::Float, tch::Device::Cpu)) // (b, seq, heads, hd)
            .to_kind(kind)
            .transpose(1, 2);
        let x = match transposed {
            true => x,
            false => x.contiguous(),
        };
        let x = x.detach().set_requires_grad(true);
        let y = match reference {
            true => apply_reference(rope, &x),
            false => rope.apply(&x),
        };
        let g = Tensor::randn(y.size(), (Kind::Float, tch::Device::Cpu)).to_kind(kind);
        (&y * g).sum(Kind::Double).backward();
        (y.detach(), x.grad())
    }

    fn bits_equal(a: &Tensor, b: &Tensor) -> bool {
        let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
        let same = a.eq_tensor(&b).all().int64_value(&[]) == 1;
        same && a.signbit().eq_tensor(&b.signbit()).all().int64_value(&[]) == 1
    }

    #[test]
    fn rotation_matches_the_reference_formulation_bit_for_bit() {
        let ids = Tensor::randint(64, [24, 3], (Kind::Int64, tch::Device::Cpu));
        for kind in [Kind::Float, Kind::BFloat16, Kind::Double] {
            let rope = Rope::new(&ids, &[4, 6, 6], kind);
            for transposed in [true, false] {
                let (y_ref, g_ref) = rotate(&rope, kind, true, transposed);
                let (y, g) = rotate(&rope, kind, false, transposed);
                assert_eq!(y.kind(), kind);
                assert!(bits_equal(&y, &y_ref), "{kind:?} values, {transposed}");
                assert!(bits_equal(&g, &g_ref), "{kind:?} gradients, {transposed}");
            }
        }
    }
}
