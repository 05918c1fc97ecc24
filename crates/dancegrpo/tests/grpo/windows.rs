//! Rollout batches and accumulation windows: with the update recomputing in
//! the rollout's batches, a rollout batch is cut where a window ends, so the
//! update evaluates each trained transition once.

use dancegrpo::grpo::{run_iteration, AdamW, AdamWConfig, Iteration};
use dancegrpo::models::{ActivationCheckpointing, VelocityModel};
use tch::Tensor;

use super::setup::*;

/// One iteration of a fresh seeded model through [`run_iteration`] with
/// rollout batches of `batch` and the default update batching (the
/// rollout's): the iteration, the first window's ratios, the weights after.
fn one_iteration(batch: i64, grad_accum: i64) -> (Iteration, FirstWindow, Vec<Tensor>) {
    let (m, vae) = (model(ActivationCheckpointing::Off), vae());
    let data = IterationData::new();
    let inputs = data.inputs(None);
    let cfg = iteration_settings(batch, 1, config(grad_accum));
    let params: Vec<Tensor> = m.parameters().into_iter().map(|(_, p)| p).collect();
    let mut opt = AdamW::new(AdamWConfig::default(), &params);
    let mut reward = Brightness { fail: vec![] };
    let mut obs = FirstWindow::default();
    let it = run_iteration(&m, &vae, &mut reward, &mut opt, &inputs, &cfg, &mut obs).unwrap();
    let after = params.iter().map(|p| p.detach().copy()).collect();
    (it, obs, after)
}

#[test]
fn rollout_batches_are_cut_where_an_accumulation_window_ends() {
    // batches of 4 over windows of 2 samples run as batches of 2
    let (wide, wide_obs, wide_params) = one_iteration(4, 2);
    let (narrow, _, narrow_params) = one_iteration(2, 2);
    let samples = PROMPTS * G;
    // the rollout's rows, then every sample's 3 trained transitions once
    // (a batch of 4 held two windows and was evaluated for each: 2 x 8 x 3)
    let rows = (samples * STEPS + samples * 3) as u64;
    assert_eq!(wide.report.transformer_rows, rows);
    assert_eq!(narrow.report.transformer_rows, rows);
    assert_eq!(wide_obs.ratios.len(), 2 * 3);
    assert!(
        wide_obs.ratios.iter().all(|&r| r == 1.0),
        "{:?}",
        wide_obs.ratios
    );
    // the same model batches: the same weights bit for bit
    for (a, b) in wide_params.iter().zip(&narrow_params) {
        assert!(a.equal(b));
    }
    assert_eq!(wide.report.rewards, narrow.report.rewards);
    // windows of 4 hold a batch of 4 whole: nothing is cut
    let (whole, _, _) = one_iteration(4, 4);
    assert_eq!(whole.report.transformer_rows, rows);
}
