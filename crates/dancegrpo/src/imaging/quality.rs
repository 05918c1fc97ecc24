//! Image quality against a reference image: PSNR and SSIM, as image-quality
//! papers and tools report them, for `bench generate` (a cached sampling
//! against the uncached one on the same seeds).
//!
//! Written here rather than taken from a crate: the images are already
//! libtorch tensors, and both measures are a few tensor expressions.
//! SSIM is Wang et al. (2004) with its usual constants: an 11x11 Gaussian
//! window of std 1.5, `K1 = 0.01`, `K2 = 0.03`, dynamic range 255, computed
//! per channel over the "valid" window positions and averaged (as
//! scikit-image's `structural_similarity(..., gaussian_weights=True,
//! use_sample_covariance=False, data_range=255, channel_axis=-1)`).

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// Peak signal-to-noise ratio in dB of uint8 images `a` against `b`
/// (same shape): `10 log10(255^2 / MSE)`, infinite for equal images.
pub fn psnr(a: &Tensor, b: &Tensor) -> Result<f64> {
    same_shape(a, b)?;
    let diff = a.to_kind(Kind::Double) - b.to_kind(Kind::Double);
    let mse = diff.square().mean(Kind::Double).double_value(&[]);
    Ok(match mse {
        0.0 => f64::INFINITY,
        m => 10.0 * (255.0 * 255.0 / m).log10(),
    })
}

/// Mean SSIM of uint8 images `a` against `b`, both `(n, H, W, 3)` (sides at least 11).
pub fn ssim(a: &Tensor, b: &Tensor) -> Result<f64> {
    same_shape(a, b)?;
    let size = a.size();
    if size.len() != 4 || size[1] < 11 || size[2] < 11 {
        return Err(Error::Input(format!(
            "SSIM needs images (n, H, W, C) of sides >= 11, got {size:?}"
        )));
    }
    let c = size[3];
    // (n, C, H, W) in float64
    let planes = |t: &Tensor| t.to_kind(Kind::Double).permute([0, 3, 1, 2]).contiguous();
    let (x, y) = (planes(a), planes(b));
    let w = gaussian_window(c, a.device());
    let blur = |t: &Tensor| t.conv2d(&w, None::<Tensor>, [1, 1], [0, 0], [1, 1], c);
    let (mx, my) = (blur(&x), blur(&y));
    let vx = blur(&(&x * &x)) - &mx * &mx;
    let vy = blur(&(&y * &y)) - &my * &my;
    let cov = blur(&(&x * &y)) - &mx * &my;
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    let num = (&mx * &my * 2.0 + c1) * (cov * 2.0 + c2);
    let den = (mx.square() + my.square() + c1) * (vx + vy + c2);
    Ok((num / den).mean(Kind::Double).double_value(&[]))
}

/// The normalised 11x11 Gaussian (std 1.5), one per channel `(c, 1, 11, 11)`.
fn gaussian_window(c: i64, device: tch::Device) -> Tensor {
    let g: Vec<f64> = (0..11)
        .map(|i| (-((i - 5) as f64).powi(2) / (2.0 * 1.5 * 1.5)).exp())
        .collect();
    let sum: f64 = g.iter().sum();
    let g = Tensor::from_slice(&g).to_device(device) / sum; // (11,)
    let w = g.unsqueeze(1) * g.unsqueeze(0); // (11, 11)
    w.expand([c, 1, 11, 11], false).contiguous()
}

fn same_shape(a: &Tensor, b: &Tensor) -> Result<()> {
    match a.size() == b.size() {
        true => Ok(()),
        false => Err(Error::Input(format!(
            "images of shapes {:?} and {:?} cannot be compared",
            a.size(),
            b.size()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psnr_and_ssim_by_hand() {
        let a = Tensor::full([1, 16, 16, 3], 100, (Kind::Uint8, tch::Device::Cpu));
        // every pixel 10 off: MSE 100, PSNR 10 log10(65025 / 100)
        let b = &a + 10;
        assert!((psnr(&a, &b).unwrap() - 10.0 * 650.25f64.log10()).abs() < 1e-9);
        assert_eq!(psnr(&a, &a).unwrap(), f64::INFINITY);
        // flat images: SSIM is the luminance term (2 mx my + c1) / (mx^2 + my^2 + c1)
        let c1 = (0.01f64 * 255.0).powi(2);
        let want = (2.0 * 100.0 * 110.0 + c1) / (100.0f64.powi(2) + 110.0f64.powi(2) + c1);
        assert!((ssim(&a, &b).unwrap() - want).abs() < 1e-9);
        assert!((ssim(&a, &a).unwrap() - 1.0).abs() < 1e-12);
        // structure lost: a noisy image scores far below 1 against a smooth one
        let noise = (Tensor::rand([1, 16, 16, 3], (Kind::Float, tch::Device::Cpu)) * 255.0)
            .to_kind(Kind::Uint8);
        assert!(ssim(&a, &noise).unwrap() < 0.1);
        assert!(ssim(
            &a,
            &Tensor::zeros([1, 8, 8, 3], (Kind::Uint8, tch::Device::Cpu))
        )
        .is_err());
    }
}
