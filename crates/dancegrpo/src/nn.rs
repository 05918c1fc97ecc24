//! Building blocks shared by the models, each calling the same libtorch kernel
//! as its PyTorch counterpart (`F.linear`, `F.layer_norm`, `F.group_norm`,
//! `F.conv2d`) so results agree bit for bit with the reference.

use tch::{Kind, Tensor};

use crate::adapter::{Lora, LoraSlot};
use crate::error::Result;
use crate::weights::{Init, VarBuilder};

/// The kind a float32 island of the reference (a norm's variance, a softmax,
/// sinusoidal or rotary features, the SDE's log-probability) computes in for
/// tensors of `kind`: float32, except that float64 stays float64, as the
/// fixtures' float64 replay runs those islands in float64.
pub fn upcast_kind(kind: Kind) -> Kind {
    match kind {
        Kind::Double => Kind::Double,
        _ => Kind::Float,
    }
}

/// `t` in `kind` (the same tensor when it already is): layers compute in the
/// dtype of their input, so float32 master weights serve a bfloat16 forward
/// pass, and the cast is differentiable, its gradient float32 again.
pub fn cast(t: &Tensor, kind: Kind) -> Tensor {
    if t.kind() == kind {
        t.shallow_clone()
    } else {
        t.to_kind(kind)
    }
}

/// `nn.Linear`: `y = x W^T + b`, weight `[out, in]`, with an optional LoRA adapter.
pub struct Linear {
    /// Weight `[out, in]`.
    pub weight: Tensor,
    /// Optional bias `[out]`.
    pub bias: Option<Tensor>,
    lora: LoraSlot,
}

impl Linear {
    /// Builds `weight` (and `bias` when `bias` is true) under `vb`.
    pub fn new(vb: &VarBuilder, in_dim: i64, out_dim: i64, bias: bool) -> Result<Self> {
        let weight = vb.get("weight", &[out_dim, in_dim], Init::FanIn)?;
        let bias = if bias {
            Some(vb.get("bias", &[out_dim], Init::Normal(0.05))?)
        } else {
            None
        };
        Ok(Self::from_parts(vb, weight, bias))
    }

    /// A layer from already-built tensors (registered under `vb`'s prefix).
    pub fn from_parts(vb: &VarBuilder, weight: Tensor, bias: Option<Tensor>) -> Self {
        let lora = LoraSlot::default();
        vb.register_linear(&lora);
        Linear { weight, bias, lora }
    }

    /// The attached adapter, if any (also while switched off).
    pub fn lora(&self) -> Option<&Lora> {
        self.lora.get()
    }

    /// The attached adapter when it applies (attached and switched on).
    fn active_lora(&self) -> Option<&Lora> {
        self.lora.get().filter(|l| l.switch.on())
    }

    /// `x W^T + b` (plus the adapter) with the weights `w` already in `x`'s dtype.
    fn forward_one(&self, x: &Tensor, w: &Weights) -> Tensor {
        let y = x.linear(&w.weight, w.bias.as_ref());
        match (self.active_lora(), &w.lora) {
            (Some(l), Some((a, b))) => {
                y + x.linear(a, None::<Tensor>).linear(b, None::<Tensor>) * l.scale
            }
            _ => y,
        }
    }

    /// Applies the layer to the last dimension of `x`, in `x`'s dtype (the
    /// weights are cast to it once per call).
    ///
    /// A 2-d input `(b, in)` is applied row by row: BLAS takes a matrix-vector
    /// path for one row and a matrix-matrix path for several, which round
    /// differently, so batching per-sample vectors (time embeddings,
    /// modulations) would make a sample's result depend on the batch size.
    /// Row by row, every sample gets the bits it gets alone (and as the
    /// reference's batch-1 calls get).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let k = x.kind();
        let w = Weights {
            weight: cast(&self.weight, k),
            bias: self.bias.as_ref().map(|b| cast(b, k)),
            lora: self.active_lora().map(|l| (cast(&l.a, k), cast(&l.b, k))),
        };
        match x.size().as_slice() {
            [b, _] if *b > 1 => {
                // split, not narrow: its backward is one concatenation, not a
                // zero-filled (b, in) gradient per row
                let rows: Vec<Tensor> = (x.split(1, 0).iter())
                    .map(|row| self.forward_one(row, &w))
                    .collect();
                Tensor::cat(&rows, 0)
            }
            _ => self.forward_one(x, &w),
        }
    }
}

/// A linear layer's tensors in the dtype of one call.
struct Weights {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<(Tensor, Tensor)>,
}

/// `nn.LayerNorm(dim, elementwise_affine=False)` over the last dimension.
pub fn layer_norm(x: &Tensor, eps: f64) -> Tensor {
    let d = *x.size().last().expect("layer_norm of a scalar");
    x.layer_norm([d], None::<Tensor>, None::<Tensor>, eps, true)
}

/// `nn.LayerNorm` with affine parameters `weight`, `bias`.
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Builds `weight` and `bias` of size `dim` under `vb`.
    pub fn new(vb: &VarBuilder, dim: i64, eps: f64) -> Result<Self> {
        let weight = vb.get("weight", &[dim], Init::OnePlusNormal(0.1))?;
        let bias = vb.get("bias", &[dim], Init::Normal(0.05))?;
        Ok(LayerNorm { weight, bias, eps })
    }

    /// Normalises the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let d = *x.size().last().expect("layer_norm of a scalar");
        let (w, b) = (cast(&self.weight, x.kind()), cast(&self.bias, x.kind()));
        x.layer_norm([d], Some(&w), Some(&b), self.eps, true)
    }
}

/// diffusers' `RMSNorm(dim, eps, elementwise_affine=True)`:
/// `x * rsqrt(mean(x^2) + eps) * weight`, the mean taken in float32.
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Builds `weight` of size `dim` under `vb`.
    pub fn new(vb: &VarBuilder, dim: i64, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: vb.get("weight", &[dim], Init::OnePlusNormal(0.1))?,
            eps,
        })
    }

    /// Normalises the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let variance = x
            .to_kind(upcast_kind(x.kind()))
            .pow_tensor_scalar(2)
            .mean_dim(-1, true, None);
        // back to the input's dtype (bfloat16 in mixed precision) before the scale
        let h = (x * (variance + self.eps).rsqrt()).to_kind(x.kind());
        h * cast(&self.weight, x.kind())
    }
}

/// `nn.GroupNorm(groups, channels)` with affine parameters, on `(b, c, ...)`.
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: i64,
    eps: f64,
}

impl GroupNorm {
    /// Builds `weight` and `bias` of size `channels` under `vb`.
    pub fn new(vb: &VarBuilder, groups: i64, channels: i64, eps: f64) -> Result<Self> {
        let weight = vb.get("weight", &[channels], Init::OnePlusNormal(0.1))?;
        let bias = vb.get("bias", &[channels], Init::Normal(0.05))?;
        Ok(GroupNorm {
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// Normalises `x` of shape `(b, c, ...)`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.group_norm(
            self.groups,
            Some(&cast(&self.weight, x.kind())),
            Some(&cast(&self.bias, x.kind())),
            self.eps,
            true,
        )
    }
}

/// `nn.Conv2d` with a square kernel, equal strides and symmetric padding.
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    /// Builds `weight [out, in, k, k]` and `bias [out]` under `vb` (stride 1).
    pub fn new(vb: &VarBuilder, in_c: i64, out_c: i64, kernel: i64, padding: i64) -> Result<Self> {
        Self::strided(vb, in_c, out_c, kernel, 1, padding)
    }

    /// As [`Conv2d::new`] with stride `stride` in both directions.
    pub fn strided(
        vb: &VarBuilder,
        in_c: i64,
        out_c: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
    ) -> Result<Self> {
        let weight = vb.get("weight", &[out_c, in_c, kernel, kernel], Init::FanIn)?;
        let bias = vb.get("bias", &[out_c], Init::Normal(0.05))?;
        Ok(Conv2d {
            weight,
            bias,
            stride,
            padding,
        })
    }

    /// Convolves `x` of shape `(b, in, h, w)`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(
            &cast(&self.weight, x.kind()),
            Some(&cast(&self.bias, x.kind())),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        )
    }
}
