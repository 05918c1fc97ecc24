//! FLUX's latent layout: VAE latents `(b, 16, h, w)` <-> tokens `(b, h/2 * w/2, 64)`
//! (2x2 patches; token `r * w/2 + c`, channel `ch * 4 + dy * 2 + dx`), and the
//! position ids fed to the rotary embedding.

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::models::TokenLayout;

/// (b, c, h, w) -> (b, h/2 * w/2, 4c)
pub fn pack(latents: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = latents.size4().map_err(|_| {
        Error::Input(format!(
            "pack: expected (b, c, h, w) latents, got {:?}",
            latents.size()
        ))
    })?;
    if h % 2 != 0 || w % 2 != 0 {
        return Err(Error::Input(format!(
            "pack: latent height and width must be even, got {h}x{w}"
        )));
    }
    Ok(latents
        .view([b, c, h / 2, 2, w / 2, 2])
        .permute([0, 2, 4, 1, 3, 5])
        .reshape([b, (h / 2) * (w / 2), c * 4]))
}

/// (b, h/2 * w/2, 4c) -> (b, c, h, w) for latent size `h` x `w`.
pub fn unpack(tokens: &Tensor, h: i64, w: i64) -> Result<Tensor> {
    let (b, l, d) = tokens.size3().map_err(|_| {
        Error::Input(format!(
            "unpack: expected (b, L, d) tokens, got {:?}",
            tokens.size()
        ))
    })?;
    if h % 2 != 0 || w % 2 != 0 || l != (h / 2) * (w / 2) || d % 4 != 0 {
        return Err(Error::Input(format!(
            "unpack: tokens {:?} do not fit a {h}x{w} latent",
            tokens.size()
        )));
    }
    Ok(tokens
        .view([b, h / 2, w / 2, d / 4, 2, 2])
        .permute([0, 3, 1, 4, 2, 5])
        .reshape([b, d / 4, h, w]))
}

/// Position ids `(h/2 * w/2, 3)` of the packed image tokens: `(0, row, col)`.
pub fn image_ids(h: i64, w: i64, device: Device) -> Tensor {
    let (rows, cols) = (h / 2, w / 2);
    let r = Tensor::arange(rows, (Kind::Float, device))
        .unsqueeze(1)
        .expand([rows, cols], false);
    let c = Tensor::arange(cols, (Kind::Float, device))
        .unsqueeze(0)
        .expand([rows, cols], false);
    let zero = Tensor::zeros([rows, cols], (Kind::Float, device));
    Tensor::stack(&[zero, r, c], -1).reshape([rows * cols, 3])
}

/// Position ids `(seq, 3)` of the text tokens: all zeros.
pub fn text_ids(seq: i64, device: Device) -> Tensor {
    Tensor::zeros([seq, 3], (Kind::Float, device))
}

/// FLUX's [`TokenLayout`]: the functions of this module.
#[derive(Debug, Clone, Copy, Default)]
pub struct FluxPacking;

impl TokenLayout for FluxPacking {
    fn pack(&self, latents: &Tensor) -> Result<Tensor> {
        pack(latents)
    }

    fn unpack(&self, tokens: &Tensor, [_, h, w]: [i64; 3]) -> Result<Tensor> {
        unpack(tokens, h, w)
    }

    fn image_ids(&self, [_, h, w]: [i64; 3], device: Device) -> Tensor {
        image_ids(h, w, device)
    }

    fn text_ids(&self, len: i64, device: Device) -> Tensor {
        text_ids(len, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_layout_and_roundtrip() {
        let z = Tensor::arange(2 * 16 * 4 * 6, (Kind::Float, Device::Cpu)).reshape([2, 16, 4, 6]);
        let p = pack(&z).unwrap();
        assert_eq!(p.size(), [2, 6, 64]);
        // token r*(w/2)+c, channel ch*4 + dy*2 + dx holds z[b, ch, 2r+dy, 2c+dx]
        let (b, ch, r, c, dy, dx) = (1, 5, 1, 2, 1, 0);
        let want = z.double_value(&[b, ch, 2 * r + dy, 2 * c + dx]);
        assert_eq!(p.double_value(&[b, r * 3 + c, ch * 4 + dy * 2 + dx]), want);
        assert!(unpack(&p, 4, 6).unwrap().equal(&z));
        assert!(pack(&z.narrow(2, 0, 3)).is_err());
    }

    #[test]
    fn image_ids_are_row_col() {
        let ids = image_ids(4, 6, Device::Cpu);
        assert_eq!(ids.size(), [6, 3]);
        let v: Vec<f32> = Vec::try_from(ids.flatten(0, -1)).unwrap();
        assert_eq!(&v[..9], &[0., 0., 0., 0., 0., 1., 0., 0., 2.]);
        assert_eq!(&v[15..], &[0., 1., 2.]);
    }
}
