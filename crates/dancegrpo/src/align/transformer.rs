//! The `transformer` stage: every stored sampling call of the model, teacher
//! forced from the stored latents, plus the first call's intermediate activations.

use tch::{Device, Kind, Tensor};

use super::{Case, Stage, StageAcc, StageReport};
use crate::error::Result;
use crate::models::flux::{FluxTransformer, Trace};
use crate::models::VelocityModel;

/// Relative tolerance of the stage (float32).
pub const TOL: f64 = 1e-5;

/// Runs the stage on `case`.
pub fn run(case: &Case) -> Result<StageReport> {
    let model =
        FluxTransformer::from_dir(&case.dir().join("transformer"), Kind::Float, Device::Cpu)?;
    let cond = case.conditioning(model.config().guidance_embeds)?;
    let latents = case.expected("sample/latents")?; // (B, S+1, L, c)
    let timesteps = case.expected("sample/timestep_input")?; // (B, S)
    let want = case.expected("sample/model_output")?; // (B, S, L, c)
    let (b_total, steps) = (want.size()[0], want.size()[1]);
    let mut acc = StageAcc::new(Stage::Transformer, TOL);
    let _guard = tch::no_grad_guard();
    for b in 0..b_total {
        for i in 0..steps {
            let z = latents.get(b).get(i).unsqueeze(0);
            let ts = timesteps.get(b).narrow(0, i, 1);
            let sc = cond.for_samples(&[b]);
            let inputs = cond.inputs(&sc, &z, &ts);
            let v = if b == 0 && i == 0 {
                let mut trace = Trace::new();
                let v = model.forward_traced(&inputs, Some(&mut trace))?;
                compare_trace(case, &trace, &mut acc)?;
                v
            } else {
                model.velocity(&inputs)?
            };
            acc.compare(
                format!("sample/model_output[{b},{i}]"),
                &v.squeeze_dim(0),
                &want.get(b).get(i),
            );
        }
    }
    Ok(acc.finish())
}

/// Compares the first call's activations; a stored activation we did not record fails.
fn compare_trace(case: &Case, trace: &Trace, acc: &mut StageAcc) -> Result<()> {
    for key in case.expected_names("debug/transformer_first_call/") {
        let module = key.trim_start_matches("debug/transformer_first_call/");
        let ours = trace
            .get(module)
            .map_or_else(Tensor::new, Tensor::shallow_clone);
        acc.compare(key.clone(), &ours, &case.expected(&key)?);
    }
    Ok(())
}
