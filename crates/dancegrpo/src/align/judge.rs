//! How a compared tensor is judged.
//!
//! A case stores what the reference's float32 run produced (`expected`) and a
//! float64 replay of every tensor from the same stored inputs (`truth`,
//! FORMAT.md "the float64 truth"). A float32 run can only be as close to the
//! reference as float32 rounding on *this* CPU allows, and that differs between
//! CPUs, thread counts and BLAS kernels; how far the reference itself is from
//! exact arithmetic, `err_ref = ||expected - truth|| / ||truth||`, is the
//! measure of that rounding for each tensor. So:
//!
//! * a **float32** run passes a tensor when `err_ours = ||ours - truth|| /
//!   ||truth||` is at most `max(K * err_ref, FLOOR)`; the direct
//!   `||ours - expected|| / ||expected||` is printed beside it;
//! * a **float64** run passes when `err_ours <= F64_TOL`: the semantic check,
//!   the same on every CPU;
//! * a check that is not teacher forced (the free-running `end_to_end` stage,
//!   the reward from the uint8 images) is judged as a float32 one in either
//!   precision (see [`COMPOSED_FLOOR`]);
//! * a case without a truth falls back to the direct error and the stage's
//!   fixed bound (float32 only);
//! * a **bf16** run (training's mixed precision) is reported, not judged: its
//!   errors are figures, and only a non-finite one fails.
//!
//! `K`, `FLOOR` and `F64_TOL` were chosen from measurements written down in
//! `docs/alignment.md` ("Parity across CPUs").

use serde::Serialize;
use tch::{Kind, Tensor};

use super::{Precision, Stage, StageReport};

/// A float32 run may be this many times further from the truth than the
/// reference's own float32 run. Measured: `err_ours / err_ref` is at most 1.10
/// on every tensor of `flux_tiny_a` and of two 4-step cases, under every MKL
/// code path and 1 or 2 threads; 4 leaves room for other CPUs without hiding a
/// real error (a wrong op is off by orders of magnitude more).
pub const K: f64 = 4.0;

/// The smallest bound of a float32 run: about 16 float32 roundings, for tensors
/// the reference happens to get (nearly) exact (`err_ref` of 0 or 1e-8).
pub const FLOOR: f64 = 1e-6;

/// Bound of a float64 run against the truth. Measured: 1.2e-14 worst on
/// `flux_tiny_a` (1 or 2 threads, every MKL code path); the fixtures' own
/// float64 replays agree to 3e-14. Float32 rounding is 1e-7 and a wrong op
/// far more, so the bound separates them by orders of magnitude either way.
pub const F64_TOL: f64 = 1e-10;

/// The smallest bound of a composed (not teacher-forced) check, such as the
/// free-running `end_to_end` stage: the truth is replayed from the reference's
/// stored float32 values at every stage, so a free run, in any precision, is
/// off it by the float32 error the reference accumulated along its own
/// trajectory, which no per-tensor `err_ref` shows (a float64 free run is
/// 1.3e-5 off on `decode/image`, where `err_ref` is 9e-7).
pub const COMPOSED_FLOOR: f64 = 1e-4;

/// What one tensor is compared with: the reference's float32 result and,
/// where the case has it, the float64 truth of the same tensor.
pub struct Reference {
    /// The reference's float32 value (`expected.safetensors`).
    pub expected: Tensor,
    /// The float64 truth (`expected_f64.safetensors`), if the case has one.
    pub truth: Option<Tensor>,
}

impl Reference {
    /// The same selection of both tensors.
    pub fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> Reference {
        Reference {
            expected: f(&self.expected),
            truth: self.truth.as_ref().map(f),
        }
    }

    /// Row `i` of both.
    pub fn get(&self, i: i64) -> Reference {
        self.map(|t| t.get(i))
    }
}

/// One compared tensor.
#[derive(Debug, Clone, Serialize)]
pub struct TensorCheck {
    /// Tensor name (fixture key, with indices).
    pub name: String,
    /// Relative L2 error against the reference's float32 value.
    pub rel_err: f64,
    /// Max absolute error against the reference's float32 value.
    pub abs_err: f64,
    /// Relative L2 error against the float64 truth (`err_ours`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truth_err: Option<f64>,
    /// The reference's own relative error against the truth (`err_ref`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ref_err: Option<f64>,
    /// The bound the judged error (`truth_err`, else `rel_err`) is held to.
    pub bound: f64,
    /// Whether the tensor is within its bounds.
    pub pass: bool,
}

impl TensorCheck {
    /// A check decided by equality (token ids, pixels): `pass` as given.
    pub fn exact(name: String, (rel_err, abs_err): (f64, f64), pass: bool) -> Self {
        TensorCheck {
            name,
            rel_err,
            abs_err,
            truth_err: None,
            ref_err: None,
            bound: 0.0,
            pass,
        }
    }

    /// How close the check is to failing: its worst error over its bound
    /// (above 1 fails; an exact check is 0 or infinite).
    /// A reported (unbounded) check ranks by its error itself.
    pub fn margin(&self) -> f64 {
        let err = self.truth_err.unwrap_or(self.rel_err);
        match self.bound {
            0.0 => match self.pass {
                true => 0.0,
                false => f64::INFINITY,
            },
            b if b.is_infinite() => err,
            b => err / b,
        }
    }
}

/// Relative L2 and max absolute error of `ours` against `reference` (any
/// dtype or device); infinite for an undefined tensor or a shape mismatch.
pub fn errors(ours: &Tensor, reference: &Tensor) -> (f64, f64) {
    errors_scaled(ours, reference, None)
}

/// [`errors`] with the L2 error divided by `||scale||` instead of `||reference||`.
fn errors_scaled(ours: &Tensor, reference: &Tensor, scale: Option<&Tensor>) -> (f64, f64) {
    if !ours.defined() || !reference.defined() {
        return (f64::INFINITY, f64::INFINITY);
    }
    let double = |t: &Tensor| t.to_device(tch::Device::Cpu).to_kind(Kind::Double);
    let (a, b) = (double(ours), double(reference));
    if a.size() != b.size() {
        return (f64::INFINITY, f64::INFINITY);
    }
    let diff = &a - &b;
    let dn = diff.norm().double_value(&[]);
    let rn = double(scale.unwrap_or(reference)).norm().double_value(&[]);
    let abs = if diff.numel() == 0 {
        0.0
    } else {
        diff.abs().max().double_value(&[])
    };
    let rel = if rn > 0.0 { dn / rn } else { dn };
    (if rel.is_nan() { f64::INFINITY } else { rel }, abs)
}

/// The rule of one stage.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    precision: Precision,
    /// Bound on the direct error when the case has no float64 truth.
    direct: f64,
    /// Every check is composed, with this floor.
    composed: Option<f64>,
}

impl Rule {
    /// The rule for a run in `precision`: `direct` is the stage's fixed bound
    /// against the float32 reference, used alone when a case has no truth.
    pub fn new(precision: Precision, direct: f64) -> Self {
        Rule {
            precision,
            direct,
            composed: None,
        }
    }

    /// The rule of a stage whose every check is composed (not teacher forced):
    /// `err_ours <= max(K * err_ref, floor)` against the truth in any precision.
    pub fn composed(precision: Precision, direct: f64, floor: f64) -> Self {
        Rule {
            composed: Some(floor),
            ..Rule::new(precision, direct)
        }
    }

    fn check(
        &self,
        name: String,
        ours: &Tensor,
        r: &Reference,
        scale: Option<&Reference>,
        composed: bool,
    ) -> TensorCheck {
        let (rel_err, abs_err) = errors_scaled(ours, &r.expected, scale.map(|s| &s.expected));
        let truth_scale = scale.and_then(|s| s.truth.as_ref());
        let truth = r.truth.as_ref().map(|t| {
            let ours_err = errors_scaled(ours, t, truth_scale).0;
            let ref_err = errors_scaled(&r.expected, t, truth_scale).0;
            (ours_err, ref_err)
        });
        // a composed check is judged as a float32 one, whatever the precision
        let floor = self.composed.or(composed.then_some(FLOOR));
        let relative = match floor {
            Some(_) => Precision::F32,
            None => self.precision,
        };
        let relative = match self.precision {
            Precision::Bf16 => Precision::Bf16,
            _ => relative,
        };
        let bound = match (relative, truth) {
            (Precision::F64, _) => F64_TOL,
            (Precision::F32, Some((_, ref_err))) => (K * ref_err).max(floor.unwrap_or(FLOOR)),
            (Precision::F32, None) => self.direct,
            // bf16 is reported, not judged
            (Precision::Bf16, _) => f64::INFINITY,
        };
        let judged = match (relative, truth) {
            (_, Some((ours_err, _))) => ours_err,
            // a float64 run has nothing to be judged against without a truth
            (Precision::F64, None) => f64::INFINITY,
            (_, None) => rel_err,
        };
        let pass = judged <= bound && judged.is_finite();
        TensorCheck {
            name,
            rel_err,
            abs_err,
            truth_err: truth.map(|t| t.0),
            ref_err: truth.map(|t| t.1),
            bound,
            pass,
        }
    }
}

/// Collects the checks of one stage.
pub struct StageAcc {
    stage: Stage,
    rule: Rule,
    checks: Vec<TensorCheck>,
}

impl StageAcc {
    /// An empty stage judged by `rule`.
    pub fn new(stage: Stage, rule: Rule) -> Self {
        StageAcc {
            stage,
            rule,
            checks: Vec::new(),
        }
    }

    /// Compares `ours` with the reference `r`.
    pub fn compare(&mut self, name: impl Into<String>, ours: &Tensor, r: &Reference) {
        let check = self.rule.check(name.into(), ours, r, None, false);
        self.checks.push(check);
    }

    /// Compares a result that is not teacher forced (computed from an earlier
    /// result of ours, where the truth starts from the reference's stored
    /// float32 value): judged relative to `err_ref` in any precision.
    pub fn compare_composed(&mut self, name: impl Into<String>, ours: &Tensor, r: &Reference) {
        let check = self.rule.check(name.into(), ours, r, None, true);
        self.checks.push(check);
    }

    /// Compares `ours` with `r` measuring every error against the norm of the
    /// `terms` it is computed from instead of its own: for a difference or a
    /// cancelling sum of rounded terms, whose own size says nothing about how
    /// precisely it can be computed (`train/log_ratio = new - old`,
    /// `train/total_loss = sum of train/loss`). Listed as `name (error / |terms_name|)`.
    pub fn compare_to_terms(
        &mut self,
        name: &str,
        ours: &Tensor,
        r: &Reference,
        (terms_name, terms): (&str, &Reference),
    ) {
        let name = format!("{name} (error / |{terms_name}|)");
        let check = self.rule.check(name, ours, r, Some(terms), false);
        self.checks.push(check);
    }

    /// Records a check judged by its own rule (reported instead in a bf16 run).
    pub fn push(&mut self, mut check: TensorCheck) {
        if self.rule.precision == Precision::Bf16 {
            check.pass = check.rel_err.is_finite();
            check.bound = f64::INFINITY;
        }
        self.checks.push(check);
    }

    /// The stage report: the check closest to (or furthest past) its bound.
    pub fn finish(self) -> StageReport {
        let worst = self
            .checks
            .iter()
            .max_by(|a, b| a.margin().total_cmp(&b.margin()));
        let pass = !self.checks.is_empty() && self.checks.iter().all(|c| c.pass);
        let worst = worst
            .cloned()
            .unwrap_or_else(|| TensorCheck::exact("(nothing compared)".into(), (0.0, 0.0), false));
        StageReport {
            name: self.stage.name().into(),
            precision: self.rule.precision,
            worst: worst.name.clone(),
            rel_err: worst.rel_err,
            abs_err: worst.abs_err,
            truth_err: worst.truth_err,
            ref_err: worst.ref_err,
            bound: worst.bound,
            pass,
            tensors: self.checks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(expected: &[f64], truth: &[f64]) -> Reference {
        Reference {
            expected: Tensor::from_slice(expected),
            truth: Some(Tensor::from_slice(truth)),
        }
    }

    #[test]
    fn float32_is_judged_against_the_references_own_error() {
        let rule = Rule::new(Precision::F32, 1e-5);
        // the reference is 1e-3 off the truth: ours may be up to 4e-3 off
        let r = reference(&[1.001, 0.0], &[1.0, 0.0]);
        let ours = |v: f64| Tensor::from_slice(&[v, 0.0]);
        let near = rule.check("a".into(), &ours(1.003), &r, None, false);
        assert!(near.pass, "{near:?}");
        assert!((near.ref_err.unwrap() - 1e-3).abs() < 1e-9);
        assert!((near.bound - 4e-3).abs() < 1e-9);
        let far = rule.check("a".into(), &ours(1.005), &r, None, false);
        assert!(!far.pass && far.margin() > 1.0, "{far:?}");
        // an exact reference leaves the floor
        let exact = reference(&[1.0, 2.0], &[1.0, 2.0]);
        let c = rule.check(
            "b".into(),
            &Tensor::from_slice(&[1.0 + 1e-7, 2.0]),
            &exact,
            None,
            false,
        );
        assert!(c.pass && c.bound == FLOOR);
        let c = rule.check(
            "b".into(),
            &Tensor::from_slice(&[1.0 + 1e-5, 2.0]),
            &exact,
            None,
            false,
        );
        assert!(!c.pass);
    }

    #[test]
    fn float64_composed_and_missing_truth() {
        let r = reference(&[1.001], &[1.0]);
        let ours = Tensor::from_slice(&[1.002]);
        // a composed check of a float64 run is judged as float32: 1e-3 <= 4e-3
        let composed = Rule::composed(Precision::F64, 1e-4, COMPOSED_FLOOR);
        let c = composed.check("a".into(), &ours, &r, None, false);
        assert!(c.pass && (c.bound - 4e-3).abs() < 1e-9, "{c:?}");
        let f64_rule = Rule::new(Precision::F64, 1e-5);
        assert!(!f64_rule.check("a".into(), &ours, &r, None, false).pass);
        let c = f64_rule.check(
            "a".into(),
            &Tensor::from_slice(&[1.0 + 1e-13]),
            &r,
            None,
            false,
        );
        assert!(c.pass && c.bound == F64_TOL);
        let no_truth = Reference {
            expected: Tensor::from_slice(&[1.0]),
            truth: None,
        };
        assert!(
            !f64_rule
                .check("a".into(), &ours, &no_truth, None, false)
                .pass
        );
        let f32_rule = Rule::new(Precision::F32, 1e-5);
        let c = f32_rule.check(
            "a".into(),
            &Tensor::from_slice(&[1.0 + 1e-6]),
            &no_truth,
            None,
            false,
        );
        assert!(c.pass && c.bound == 1e-5 && c.truth_err.is_none());
    }

    #[test]
    fn errors_against_terms_use_the_terms_norm() {
        let rule = Rule::new(Precision::F64, 1e-5);
        let r = reference(&[1e-6], &[1e-6]);
        let terms = reference(&[3.0, 4.0], &[3.0, 4.0]);
        let c = rule.check(
            "d".into(),
            &Tensor::from_slice(&[1e-6 + 5e-13]),
            &r,
            Some(&terms),
            false,
        );
        assert!(
            (c.truth_err.unwrap() - 1e-13).abs() < 1e-18 && c.pass,
            "{c:?}"
        );
        assert!(errors(&Tensor::new(), &Tensor::from_slice(&[1.0]))
            .0
            .is_infinite());
    }
}
