//! Rollout of groups: `G` samples per prompt drawn with the SDE sampler,
//! every transition stored with its log-probability, in batches of any size.

use tch::{Device, Kind, Tensor};

use super::capture::{join, CapturePlan, KeptVelocities, Pieces};
use super::dpm::{model_timestep, Dpm2M, PostWindow};
use super::sde::{At, Next};
use super::tree::{distinct_rows, Tree, TreeDraws};
use super::{Conditioning, Draws, Schedule};
use super::{SdeForm, StepWindow};
use crate::error::Result;
use crate::io::image::to_uint8;
use crate::models::{LatentDecoder, TokenLayout, VelocityModel};

/// How a rollout is run.
#[derive(Debug, Clone)]
pub struct RolloutSettings {
    /// The stochastic step's form.
    pub sde: SdeForm,
    /// Its noise level (`eta`).
    pub eta: f64,
    /// The steps that take it (MixGRPO's window); the others are ODE steps.
    /// `None`: every step.
    pub window: Option<StepWindow>,
    /// Samples per model call (any size; the update recomputes in the same batches).
    pub batch: i64,
    /// Samples per accumulation window (consecutive runs from sample 0): a
    /// model batch never holds samples of two windows. An update that
    /// recomputes in the rollout's batches evaluates a batch once for each
    /// window it holds. `None`: batches of `batch` across windows.
    pub window_samples: Option<i64>,
    /// Whether every step's mean is kept (GRPO-Guard's ratio normalisation reads them).
    pub means: StepMeans,
    /// How each group's trajectories branch ([`super::tree`]); `None`: every
    /// sample its own trajectory.
    pub tree: Option<Tree>,
    /// What samples the steps after the window ([`super::dpm`]).
    pub post: PostWindow,
}

/// Whether a rollout keeps its steps' means.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StepMeans {
    /// Only latents and log-probabilities (default).
    #[default]
    Drop,
    /// Also the mean of every step `(B, S, L, c)`.
    Keep,
}

/// The stored trajectories of one iteration's samples.
#[derive(Debug)]
pub struct Rollout {
    /// Latents `z_0 .. z_S` of every sample `(B, S+1, L, c)` (after a window
    /// with DPM-Solver steps, its compressed schedule's: `S` is then fewer).
    pub latents: Tensor,
    /// Log-probability of every transition `(B, S)`, float32 (0 for ODE steps).
    pub log_probs: Tensor,
    /// The last step's predicted x0 `(B, L, c)` (what the reference decodes).
    pub pred_x0: Tensor,
    /// The mean of every step `(B, S, L, c)`, when kept ([`StepMeans::Keep`]).
    pub means: Option<Tensor>,
    /// The sample indices of each model batch, in order (the update reuses them).
    pub batches: Vec<Vec<i64>>,
    /// The branching of the groups, for a tree rollout (the update trains its nodes).
    pub tree: Option<Tree>,
    /// Rows the model evaluated (one per sample and step; fewer in a tree).
    pub model_rows: i64,
    /// The velocities of a [`CapturePlan`]'s transitions with their graphs,
    /// for the update (empty without a plan).
    pub kept: KeptVelocities,
}

/// Splits samples `0..n` into consecutive batches of `batch`, cut where a
/// window of `window` samples ends (`None`: no windows).
pub fn batches(n: i64, batch: i64, window: Option<i64>) -> Vec<Vec<i64>> {
    let batch = batch.max(1);
    let window = window.unwrap_or(n).max(1);
    (0..n)
        .step_by(window as usize)
        .flat_map(|w| {
            let end = (w + window).min(n);
            (w..end)
                .step_by(batch as usize)
                .map(move |s| (s..(s + batch).min(end)).collect())
        })
        .collect()
}

/// Samples every sample of `cond` from its initial noise with the SDE sampler
/// (under `no_grad`), latent shape `latent = [c, h, w]`, on `device`.
pub fn rollout(
    model: &dyn VelocityModel,
    cond: &Conditioning,
    draws: &dyn Draws,
    schedule: &Schedule,
    latent: [i64; 3],
    settings: &RolloutSettings,
    device: Device,
) -> Result<Rollout> {
    let inputs = (cond, draws, schedule, latent);
    rollout_reporting(model, inputs, settings, device, &|_, _| {})
}

/// [`rollout`] calling `done(samples_done, samples)` after each model batch.
pub fn rollout_reporting(
    model: &dyn VelocityModel,
    inputs: (&Conditioning, &dyn Draws, &Schedule, [i64; 3]),
    settings: &RolloutSettings,
    device: Device,
    done: &dyn Fn(usize, usize),
) -> Result<Rollout> {
    let none = CapturePlan::none();
    rollout_capturing(model, inputs, settings, &none, device, done)
}

/// [`rollout_reporting`] evaluating the transitions of `plan` with gradients
/// and keeping their velocities ([`Rollout::kept`]); a tree cannot keep any.
pub fn rollout_capturing(
    model: &dyn VelocityModel,
    inputs: (&Conditioning, &dyn Draws, &Schedule, [i64; 3]),
    settings: &RolloutSettings,
    plan: &CapturePlan,
    device: Device,
    done: &dyn Fn(usize, usize),
) -> Result<Rollout> {
    let (cond, draws, schedule, latent) = inputs;
    let Some(tree) = &settings.tree else {
        return run(model, inputs, settings, plan, device, done);
    };
    if !plan.is_empty() {
        return Err(crate::error::Error::Input(
            "a tree rollout cannot keep the first window's graphs (first_window = \"rollout_graphs\")".into(),
        ));
    }
    // conditioning per sample (group 1) is one process's shard of the
    // groups, whose size the run's configuration checked
    let group = match cond.group() {
        1 => tree.root_size(),
        g => g,
    };
    let invalid =
        (tree.check(group, schedule.steps())).or_else(|| tree.check_batch(settings.batch));
    let invalid = invalid.or_else(|| settings.window_samples.and_then(|k| tree.check_batch(k)));
    if let Some((field, msg)) = invalid {
        return Err(crate::error::Error::Input(format!("tree.{field}: {msg}")));
    }
    let draws = TreeDraws { inner: draws, tree };
    run(
        model,
        (cond, &draws, schedule, latent),
        settings,
        plan,
        device,
        done,
    )
}

fn run(
    model: &dyn VelocityModel,
    (cond, draws, schedule, latent): (&Conditioning, &dyn Draws, &Schedule, [i64; 3]),
    settings: &RolloutSettings,
    plan: &CapturePlan,
    device: Device,
    done: &dyn Fn(usize, usize),
) -> Result<Rollout> {
    let _guard = tch::no_grad_guard();
    let chunks = batches(cond.samples(), settings.batch, settings.window_samples);
    let (mut latents, mut log_probs, mut x0s, mut means) = (vec![], vec![], vec![], vec![]);
    let mut model_rows = 0;
    let total = cond.samples() as usize;
    let mut pieces = Pieces::default();
    for samples in &chunks {
        done(samples[0] as usize, total);
        let capture = (plan, &mut pieces);
        let (z, lp, x0, mean, rows) = rollout_batch(
            model, cond, draws, schedule, latent, samples, settings, capture, device,
        )?;
        model_rows += rows;
        latents.push(z);
        log_probs.push(lp);
        x0s.push(x0);
        means.push(mean);
    }
    Ok(Rollout {
        latents: Tensor::cat(&latents, 0),
        log_probs: Tensor::cat(&log_probs, 0),
        pred_x0: Tensor::cat(&x0s, 0),
        means: match means.iter().flatten().collect::<Vec<_>>() {
            kept if kept.is_empty() => None,
            kept => Some(Tensor::cat(&kept, 0)),
        },
        batches: chunks,
        tree: settings.tree.clone(),
        model_rows,
        kept: pieces.finish(plan)?,
    })
}

/// One batch of samples through all steps: `(latents (n, S+1, L, c),
/// log_probs (n, S), x0 (n, L, c), means (n, S, L, c) when kept, rows the
/// model evaluated)`.
#[allow(clippy::too_many_arguments)]
fn rollout_batch(
    model: &dyn VelocityModel,
    cond: &Conditioning,
    draws: &dyn Draws,
    schedule: &Schedule,
    latent: [i64; 3],
    samples: &[i64],
    settings: &RolloutSettings,
    (plan, pieces): (&CapturePlan, &mut Pieces),
    device: Device,
) -> Result<(Tensor, Tensor, Tensor, Option<Tensor>, i64)> {
    let (sde, eta, window) = (settings.sde, settings.eta, settings.window);
    let (mut rows, n) = (0, samples.len() as i64);
    let sc = cond.for_samples(samples);
    let mut z = initial_state(model, draws, samples, latent, schedule, device)?; // (n, L, c)
    let token_shape = [z.size()[1], z.size()[2]];
    let mut traj = Trajectory::new(&z, settings.means);
    let mut x0 = z.shallow_clone();
    let mut post = post_plan(settings, schedule)?;
    let steps = post.as_ref().map_or(schedule.steps(), |p| p.last + 1);
    for i in 0..steps {
        let t = schedule.model_timestep(i, n).to_device(device);
        let (v, evaluated) = match &settings.tree {
            None => {
                let at = (samples, i, &z, &t);
                (captured_velocity(model, (cond, &sc), at, plan, pieces)?, n)
            }
            Some(tree) => state_velocity(model, cond, tree, samples, i, (&z, &t))?,
        };
        rows += evaluated;
        let noise = step_noise(draws, samples, i, token_shape)?.to_device(device);
        let form = match window {
            Some(w) if !w.contains(i) => SdeForm::Ode,
            _ => sde,
        };
        let (at, next) = (At::Step(i), Next::Noise(&noise));
        let step = form.step(&v, &z, &schedule.sigmas, at, eta, next);
        if let Some(p) = &mut post {
            p.dpm.record(&step.pred_x0, schedule.sigma(i));
        }
        (z, x0) = (step.next.shallow_clone(), step.pred_x0);
        traj.push(&step.next, step.log_prob, step.mean);
    }
    if let Some(p) = &mut post {
        let inputs = PostInputs {
            model,
            cond,
            sc: &sc,
            kind: schedule.sigmas.kind(),
        };
        let zero_lp = Tensor::zeros([n], (traj.log_prob_kind(), device));
        let mut each = |next: &Tensor| traj.push(next, zero_lp.copy(), next.shallow_clone());
        (_, x0, rows) = post_steps(&inputs, (z, x0, rows), &p.sigmas, &mut p.dpm, &mut each)?;
    }
    let (latents, log_probs, means) = traj.finish();
    Ok((latents, log_probs, x0, means, rows))
}

/// The samples' initial noise, packed into tokens `(n, L, c)` in the
/// schedule's kind (float32; float64 in the float64 replay).
fn initial_state(
    model: &dyn VelocityModel,
    draws: &dyn Draws,
    samples: &[i64],
    latent: [i64; 3],
    schedule: &Schedule,
    device: Device,
) -> Result<Tensor> {
    let noise0 = (samples.iter())
        .map(|&b| draws.init_noise(b, &latent))
        .collect::<Result<Vec<_>>>()?;
    let z0 = Tensor::cat(&noise0, 0).to_kind(schedule.sigmas.kind()); // (n, c, h, w)
    model.layout().pack(&z0.to_device(device))
}

/// The states, log-probabilities and (when kept) means of a batch's steps.
struct Trajectory {
    zs: Vec<Tensor>,
    lps: Vec<Tensor>,
    means: Option<Vec<Tensor>>,
}

impl Trajectory {
    /// Starting at `z0` (n, L, c).
    fn new(z0: &Tensor, means: StepMeans) -> Self {
        Trajectory {
            zs: vec![z0.shallow_clone()],
            lps: Vec::new(),
            means: (means == StepMeans::Keep).then(Vec::new),
        }
    }

    /// One step: its next state, log-probability (n,) and mean (n, L, c).
    fn push(&mut self, next: &Tensor, log_prob: Tensor, mean: Tensor) {
        self.zs.push(next.shallow_clone());
        self.lps.push(log_prob);
        if let Some(m) = &mut self.means {
            m.push(mean);
        }
    }

    /// The kind of the recorded log-probabilities (float32 without any).
    fn log_prob_kind(&self) -> Kind {
        self.lps.last().map_or(Kind::Float, |l| l.kind())
    }

    /// `(latents (n, S+1, L, c), log_probs (n, S), means (n, S, L, c))`.
    fn finish(self) -> (Tensor, Tensor, Option<Tensor>) {
        let means = self.means.filter(|m| !m.is_empty());
        (
            Tensor::stack(&self.zs, 1),
            Tensor::stack(&self.lps, 1),
            means.map(|m| Tensor::stack(&m, 1)),
        )
    }
}

/// The velocity of the batch `samples` (conditioning `sc`) at step `i`
/// `(n, L, c)`, without gradients; the rows `plan` names at this step are
/// evaluated apart, one model call per group with gradients, their
/// velocities (graphs attached) added to `pieces`.
fn captured_velocity(
    model: &dyn VelocityModel,
    (cond, sc): (&Conditioning, &super::SampleConditioning),
    (samples, i, z, t): (&[i64], i64, &Tensor, &Tensor),
    plan: &CapturePlan,
    pieces: &mut Pieces,
) -> Result<Tensor> {
    let groups = plan.at_step(samples, i);
    if groups.is_empty() {
        return model.velocity(&cond.inputs(sc, z, t));
    }
    let call = |rows: &[i64]| {
        let nodes: Vec<i64> = rows.iter().map(|&r| samples[r as usize]).collect();
        let r = Tensor::from_slice(rows).to_device(z.device());
        let (z, t) = (z.index_select(0, &r), t.index_select(0, &r)); // (m, L, c), (m,)
        model.velocity(&cond.inputs(&cond.for_samples(&nodes), &z, &t))
    };
    let (mut parts, mut order) = (Vec::new(), Vec::new());
    for (g, rows, places) in groups {
        let v = tch::with_grad(|| call(&rows))?; // (m, L, c), graph attached
        parts.push(v.detach());
        order.extend(rows.iter().map(|&r| r as usize));
        pieces.add(g, places, v);
    }
    let rest: Vec<i64> = (0..samples.len() as i64)
        .filter(|&r| !order.contains(&(r as usize)))
        .collect();
    if !rest.is_empty() {
        parts.push(call(&rest)?);
        order.extend(rest.iter().map(|&r| r as usize));
    }
    Ok(join(&parts, &order)) // (n, L, c), the batch's row order
}

/// The SDE noise of step `i` of every sample of `samples` (n, L, c), on the CPU.
fn step_noise(draws: &dyn Draws, samples: &[i64], i: i64, shape: [i64; 2]) -> Result<Tensor> {
    let noise = samples
        .iter()
        .map(|&b| draws.sde_noise(b, i, &shape))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&noise, 0))
}

/// DPM-Solver steps after a window: its last step, the sigmas after it and
/// the solver's state.
struct PostPlan {
    last: i64,
    sigmas: Vec<f64>,
    dpm: Dpm2M,
}

/// The DPM-Solver steps `settings` asks for after its window, if any.
fn post_plan(settings: &RolloutSettings, schedule: &Schedule) -> Result<Option<PostPlan>> {
    let PostWindow::DpmSolver2m { variant, .. } = settings.post else {
        return Ok(None);
    };
    let Some(w) = settings.window.filter(|w| !w.is_empty()) else {
        return Ok(None);
    };
    if settings.tree.is_some() {
        return Err(crate::error::Error::Input(
            "DPM-Solver steps after the window cannot sample a tree".into(),
        ));
    }
    let last = w.end - 1;
    Ok(
        (settings.post.sigmas_after(schedule, last)).map(|sigmas| PostPlan {
            last,
            sigmas,
            dpm: Dpm2M::new(variant),
        }),
    )
}

/// What the steps after the window read.
struct PostInputs<'a> {
    model: &'a dyn VelocityModel,
    cond: &'a Conditioning,
    sc: &'a super::SampleConditioning,
    /// The kind of the model's timestep input (the schedule's).
    kind: Kind,
}

/// The DPM-Solver steps along `sigmas` (the window's last step ends at
/// `sigmas[0]`) from `(z, x0, rows)`: the final `(z, x0, rows)`, each new state
/// given to `each`.
fn post_steps(
    inp: &PostInputs,
    (mut z, mut x0, mut rows): (Tensor, Tensor, i64),
    sigmas: &[f64],
    dpm: &mut Dpm2M,
    each: &mut dyn FnMut(&Tensor),
) -> Result<(Tensor, Tensor, i64)> {
    let n = z.size()[0];
    for (k, w) in sigmas.windows(2).enumerate() {
        let t = model_timestep(w[0], inp.kind, n).to_device(z.device());
        let v = inp.model.velocity(&inp.cond.inputs(inp.sc, &z, &t))?; // (n, L, c)
        rows += n;
        let last = k + 2 == sigmas.len();
        (z, x0) = dpm.step(&z, &v, (w[0], w[1]), last);
        each(&z);
    }
    Ok((z, x0, rows))
}

/// The velocity of every row of a tree's batch `samples` at step `i`,
/// evaluated once per state (the rows of a state's node hold it exactly),
/// and the rows the model evaluated.
fn state_velocity(
    model: &dyn VelocityModel,
    cond: &Conditioning,
    tree: &Tree,
    samples: &[i64],
    i: i64,
    (z, t): (&Tensor, &Tensor),
) -> Result<(Tensor, i64)> {
    let (first, take) = distinct_rows(samples, tree.state_size(i));
    let device = z.device();
    let rows = Tensor::from_slice(&first).to_device(device);
    let nodes: Vec<i64> = first.iter().map(|&r| samples[r as usize]).collect();
    let sc = cond.for_samples(&nodes);
    let (z, t) = (z.index_select(0, &rows), t.index_select(0, &rows)); // (nodes, L, c)
    let v = model.velocity(&cond.inputs(&sc, &z, &t))?;
    let v = v.index_select(0, &Tensor::from_slice(&take).to_device(device)); // (n, L, c)
    Ok((v, first.len() as i64))
}

/// Decodes predicted x0 tokens `(B, L, d)` of latent shape `latent` (read
/// with `layout`) to images, `batch` at a time: float images `(B, 3, H, W)` in
/// [-1, 1] (unclamped) and uint8 `(B, H, W, 3)`.
pub fn decode(
    decoder: &dyn LatentDecoder,
    layout: &dyn TokenLayout,
    x0: &Tensor,
    latent: [i64; 3],
    batch: i64,
) -> Result<(Tensor, Tensor)> {
    let _guard = tch::no_grad_guard();
    let (mut images, mut bytes) = (Vec::new(), Vec::new());
    for samples in batches(x0.size()[0], batch, None) {
        let part = x0.narrow(0, samples[0], samples.len() as i64);
        let image = decoder.decode_latents(&layout.unpack(&part, latent)?);
        bytes.push(to_uint8(&image));
        images.push(image);
    }
    Ok((Tensor::cat(&images, 0), Tensor::cat(&bytes, 0)))
}

#[cfg(test)]
mod tests {
    use super::batches;

    #[test]
    fn batches_are_cut_where_a_window_ends() {
        let b = |n, batch, window| batches(n, batch, window);
        assert_eq!(b(5, 2, None), vec![vec![0, 1], vec![2, 3], vec![4]]);
        // windows of 3: [0, 1, 2] [3, 4, 5] [6]
        let cut = vec![vec![0, 1], vec![2], vec![3, 4], vec![5], vec![6]];
        assert_eq!(b(7, 2, Some(3)), cut);
        assert_eq!(
            b(8, 8, Some(2)),
            vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]
        );
        assert_eq!(b(4, 4, Some(4)), vec![vec![0, 1, 2, 3]]);
        assert!(b(0, 4, Some(2)).is_empty());
    }
}
