//! The KL term toward the reference policy: under LoRA the reference is the
//! model with its adapters off, so the KL is exactly 0 until an optimizer step
//! moves the adapters, and its gradient (quadratic around the reference)
//! leaves the first step unchanged.

use dancegrpo::grpo::update::{TransitionBatch, UpdateStats};
use dancegrpo::grpo::{UpdateConfig, UpdateObserver};
use dancegrpo::models::lora::LoraConfig;
use dancegrpo::models::ActivationCheckpointing;
use dancegrpo::sampler::SdeForm;
use tch::Tensor;

use super::setup::*;

/// KL values and ratios of the active rows, before and after the first step.
#[derive(Default)]
struct KlSeen {
    stepped: bool,
    first: Vec<(f32, f32)>,
    later: Vec<(f32, f32)>,
}

impl UpdateObserver for KlSeen {
    fn transitions(&mut self, x: &TransitionBatch) -> dancegrpo::Result<()> {
        let kl: Vec<f32> = Vec::try_from(x.kl.expect("a KL term")).unwrap();
        let ratio: Vec<f32> = Vec::try_from(&x.terms.ratio).unwrap();
        let rows = x
            .active
            .iter()
            .map(|&r| (kl[r as usize], ratio[r as usize]));
        match self.stepped {
            false => self.first.extend(rows),
            true => self.later.extend(rows),
        }
        Ok(())
    }
    fn after_step(&mut self, _: u64, _: &[(String, Tensor)]) -> dancegrpo::Result<()> {
        self.stepped = true;
        Ok(())
    }
}

/// One update of a LoRA model with `beta` and the step form `sde`.
fn lora_update(beta: f64, sde: SdeForm, observer: &mut dyn UpdateObserver) -> UpdateStats {
    let mut m = model(ActivationCheckpointing::Off);
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        ..LoraConfig::default()
    };
    m.attach_lora(&lora, 7).unwrap();
    let cfg = UpdateConfig {
        kl_beta: beta,
        sde,
        eta: 0.7,
        // a large rate so that the adapters move visibly in one step
        learning_rate: 1e-2,
        ..config(G)
    };
    update_after_rollout(&m, G, &cfg, observer).1.unwrap()
}

#[test]
fn kl_to_the_base_model_is_zero_until_the_adapters_move() {
    for sde in [SdeForm::Dance, SdeForm::FlowGrpo, SdeForm::Cps] {
        let mut seen = KlSeen::default();
        let with = lora_update(10.0, sde, &mut seen);
        let without = lora_update(0.0, sde, &mut dancegrpo::grpo::NoObserver);
        // the first accumulation window: adapters at B = 0, the policy is the reference
        assert_eq!(seen.first.len() as i64, G * 3);
        assert!(
            seen.first.iter().all(|&(kl, r)| kl == 0.0 && r == 1.0),
            "{sde:?} {:?}",
            seen.first
        );
        // after a step the adapters moved: every KL is positive
        assert_eq!(seen.later.len() as i64, G * 3);
        assert!(
            seen.later.iter().all(|&(kl, _)| kl > 0.0),
            "{sde:?} {:?}",
            seen.later
        );
        let mean: f64 =
            seen.later.iter().map(|&(kl, _)| kl as f64).sum::<f64>() / (2 * G * 3) as f64;
        assert!(
            (with.kl_mean - mean).abs() <= 1e-6 * mean,
            "{} {mean}",
            with.kl_mean
        );
        assert_eq!(without.kl_mean, 0.0);
        // the KL's gradient vanishes at the reference: the first step is the same,
        // the second is pulled back toward the base model
        assert_eq!(with.grad_norms[0], without.grad_norms[0], "{sde:?}");
        assert_eq!(with.losses[..G as usize], without.losses[..G as usize]);
        assert_ne!(with.grad_norms[1], without.grad_norms[1], "{sde:?}");
    }
}

#[test]
fn kl_without_a_reference_policy_is_an_error() {
    let m = model(ActivationCheckpointing::Off);
    let cfg = UpdateConfig {
        kl_beta: 0.1,
        ..config(G)
    };
    let (_, stats) = update_after_rollout(&m, G, &cfg, &mut dancegrpo::grpo::NoObserver);
    let err = stats.unwrap_err().to_string();
    assert!(
        err.contains("reference policy") && err.contains("LoRA"),
        "{err}"
    );
}
