//! The `decode` stage: VAE latents from the stored final predicted x0, the VAE
//! decoder from the stored `decode/vae_input`, and the uint8 conversion.

use tch::{Device, Kind, Tensor};

const CPU: Device = Device::Cpu;

use super::judge::Rule;
use super::{errors, Case, Precision, Stage, StageAcc, StageReport, TensorCheck};
use crate::error::Result;
use crate::models::flux::packing;
use crate::models::flux::Trace;
use crate::models::vae::{to_uint8, Vae};

/// Bound of the stage against the float32 reference when a case has no truth.
pub const TOL: f64 = 1e-5;

/// Runs the stage on `case` in `precision`.
pub fn run(case: &Case, precision: Precision) -> Result<StageReport> {
    let (kind, dev) = (precision.state_kind(), case.device());
    let vae = Vae::from_dir(&case.dir().join("vae"), precision.frozen_kind(), dev)?;
    let vae_in = case.reference("decode/vae_input")?; // (B, 16, h, w)
    let images = case.reference("decode/image")?; // (B, 3, H, W)
    let uint8 = case.expected("decode/image_uint8")?; // (B, H, W, 3)
    let pred_x0 = case
        .expected("sample/pred_x0")?
        .to_kind(kind)
        .to_device(dev); // (B, S, L, 64)
    let stored_in = vae_in.expected.to_kind(kind).to_device(dev);
    let (h, w) = (stored_in.size()[2], stored_in.size()[3]);
    let last = pred_x0.size()[1] - 1;
    let mut acc = StageAcc::new(Stage::Decode, Rule::new(precision, TOL));
    let _guard = tch::no_grad_guard();
    for b in 0..stored_in.size()[0] {
        let x0 = pred_x0.get(b).get(last).unsqueeze(0);
        let z = vae.denormalize(&packing::unpack(&x0, h, w)?);
        acc.compare(
            format!("decode/vae_input[{b}]"),
            &z.squeeze_dim(0),
            &vae_in.get(b),
        );
        let mut trace = Trace::new();
        let image = vae.decode(&stored_in.narrow(0, b, 1), (b == 0).then_some(&mut trace));
        acc.compare(
            format!("decode/image[{b}]"),
            &image.squeeze_dim(0),
            &images.get(b),
        );
        acc.push(pixel_check(
            b,
            &to_uint8(&image).squeeze_dim(0).to_device(CPU),
            &uint8.get(b),
            &images.expected.get(b),
        ));
        for (module, ours) in &trace {
            let key = format!("debug/vae_first_decode/{module}");
            if let Ok(reference) = case.reference(&key) {
                acc.compare(key, ours, &reference);
            }
        }
    }
    Ok(acc.finish())
}

/// uint8 pixels must be equal, except +-1 where the reference value `x*127.5+127.5`
/// sits within 1e-3 of a .5 rounding boundary.
fn pixel_check(b: i64, ours: &Tensor, reference: &Tensor, ref_image: &Tensor) -> TensorCheck {
    let diff = (ours.to_kind(Kind::Int64) - reference.to_kind(Kind::Int64)).abs();
    let scaled = (ref_image * 0.5 + 0.5).clamp(0.0, 1.0).permute([1, 2, 0]) * 255.0;
    let on_half = (scaled.frac() - 0.5).abs().le(1e-3);
    let allowed = diff.le(1).logical_and(&on_half).logical_or(&diff.eq(0));
    TensorCheck::exact(
        format!("decode/image_uint8[{b}]"),
        errors(ours, reference),
        allowed.all().int64_value(&[]) != 0,
    )
}
