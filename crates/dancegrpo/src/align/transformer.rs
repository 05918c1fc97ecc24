//! The `transformer` stage: every stored sampling call of the model, teacher
//! forced from the stored latents, plus the first call's intermediate activations.

use tch::Tensor;

use super::judge::Rule;
use super::{Case, Precision, Stage, StageAcc, StageReport};
use crate::error::Result;
use crate::models::flux::Trace;
use crate::models::VelocityModel;

/// Bound of the stage against the float32 reference when a case has no truth.
pub const TOL: f64 = 1e-5;

/// Runs the stage on `case` in `precision`.
pub fn run(case: &Case, precision: Precision) -> Result<StageReport> {
    let kind = precision.state_kind();
    let model = case.transformer(precision)?;
    let cond = case.conditioning(model.config().guidance_embeds, kind)?;
    let dev = case.device();
    let latents = case
        .expected("sample/latents")?
        .to_kind(kind)
        .to_device(dev); // (B, S+1, L, c)
                         // the stored float32 inputs; the truth feeds timestep_ints / 1000 in float64
    let timesteps = match precision {
        Precision::F32 | Precision::Bf16 => case.expected("sample/timestep_input")?,
        Precision::F64 => case.expected("timestep_ints")?.to_kind(kind).unsqueeze(0) / 1000.0,
    }
    .to_device(dev); // (B, S) or (1, S)
    let want = case.reference("sample/model_output")?; // (B, S, L, c)
    let (b_total, steps) = (want.expected.size()[0], want.expected.size()[1]);
    let mut acc = StageAcc::new(Stage::Transformer, Rule::new(precision, TOL));
    let _guard = tch::no_grad_guard();
    for b in 0..b_total {
        for i in 0..steps {
            let z = latents.get(b).get(i).unsqueeze(0);
            let row = timesteps.get(b.min(timesteps.size()[0] - 1));
            let ts = row.narrow(0, i, 1);
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
        acc.compare(key.clone(), &ours, &case.reference(&key)?);
    }
    Ok(())
}
