//! A model calls its residency around every parameter unit: with a residency
//! that really empties each unit while it is not acquired (what sharded
//! training does), a forward pass and a checkpointed backward give the same
//! bits as the model with its parameters in place.

use std::cell::RefCell;
use std::rc::Rc;

use dancegrpo::autograd::reset_grad;
use dancegrpo::models::flux::packing;
use dancegrpo::models::flux::{FluxConfig, FluxTransformer};
use dancegrpo::models::{ActivationCheckpointing, FlowInputs, Residency, VelocityModel};
use dancegrpo::weights::Source;
use tch::{Device, Kind, Tensor};

/// Keeps every unit's values aside; a released unit's parameters hold nothing.
struct Evicting {
    units: Vec<Vec<(Tensor, Tensor)>>, // (parameter, its value)
    resident: RefCell<Vec<bool>>,
    log: RefCell<Vec<(char, usize)>>,
    grads: RefCell<Vec<Option<Tensor>>>, // per parameter, summed over passes
}

impl Evicting {
    fn new(model: &FluxTransformer) -> Rc<Self> {
        let units: Vec<Vec<(Tensor, Tensor)>> = model
            .units()
            .into_iter()
            .map(|u| {
                u.params
                    .into_iter()
                    .map(|(_, p)| (p.shallow_clone(), p.detach().copy()))
                    .collect()
            })
            .collect();
        let n = units.iter().map(|u| u.len()).sum();
        let r = Rc::new(Evicting {
            resident: RefCell::new(vec![true; units.len()]),
            units,
            log: RefCell::new(Vec::new()),
            grads: RefCell::new((0..n).map(|_| None).collect()),
        });
        for u in 0..r.units.len() {
            r.release(u).unwrap();
        }
        r.log.borrow_mut().clear();
        r
    }

    fn set(&self, u: usize, resident: bool) {
        let _guard = tch::no_grad_guard();
        for (p, value) in &self.units[u] {
            let empty = Tensor::zeros([0], (value.kind(), value.device()));
            p.shallow_clone()
                .set_data(if resident { value } else { &empty });
        }
        self.resident.borrow_mut()[u] = resident;
    }

    fn offset(&self, u: usize) -> usize {
        self.units[..u].iter().map(|x| x.len()).sum()
    }
}

impl Residency for Evicting {
    fn acquire(&self, u: usize) -> dancegrpo::Result<()> {
        assert!(!self.resident.borrow()[u], "unit {u} acquired twice");
        self.log.borrow_mut().push(('a', u));
        self.set(u, true);
        Ok(())
    }
    fn release(&self, u: usize) -> dancegrpo::Result<()> {
        self.log.borrow_mut().push(('r', u));
        self.set(u, false);
        Ok(())
    }
    fn gradients_ready(&self, u: usize) -> dancegrpo::Result<()> {
        assert!(
            self.resident.borrow()[u],
            "unit {u} reported while released"
        );
        self.log.borrow_mut().push(('g', u));
        let at = self.offset(u);
        let mut grads = self.grads.borrow_mut();
        for (k, (p, _)) in self.units[u].iter().enumerate() {
            let g = p.grad();
            assert!(g.defined(), "unit {u}: a parameter without a gradient");
            grads[at + k] = Some(match grads[at + k].take() {
                Some(sum) => sum + &g,
                None => g.copy(),
            });
            reset_grad(p);
        }
        Ok(())
    }
}

fn model() -> FluxTransformer {
    let mut m = FluxTransformer::new(
        FluxConfig::tiny(),
        Source::Seeded(4),
        Kind::Float,
        Device::Cpu,
    )
    .unwrap();
    m.set_checkpointing(ActivationCheckpointing::PerBlock);
    m
}

struct Inputs {
    z: Tensor,
    t: Tensor,
    text: Tensor,
    pooled: Tensor,
    text_ids: Tensor,
    image_ids: Tensor,
    g: Tensor,
}

impl Inputs {
    fn new(b: i64, seed: i64) -> Self {
        tch::manual_seed(seed);
        let opts = (Kind::Float, Device::Cpu);
        Inputs {
            z: Tensor::randn([b, 16, 64], opts),
            t: Tensor::rand([b], opts),
            text: Tensor::randn([b, 32, 32], opts),
            pooled: Tensor::randn([b, 4], opts),
            text_ids: packing::text_ids(32, Device::Cpu),
            image_ids: packing::image_ids(8, 8, Device::Cpu),
            g: Tensor::full([b], 3.5, opts),
        }
    }

    fn flow(&self) -> FlowInputs<'_> {
        FlowInputs {
            latents: &self.z,
            timestep: &self.t,
            text: &self.text,
            pooled: &self.pooled,
            text_ids: &self.text_ids,
            image_ids: &self.image_ids,
            guidance: Some(&self.g),
        }
    }
}

#[test]
fn units_partition_the_parameters_in_order() {
    let m = model();
    let units = m.units();
    let names: Vec<String> = units
        .iter()
        .flat_map(|u| u.params.iter().map(|(n, _)| n.clone()))
        .collect();
    let all: Vec<String> = m.parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, all);
    let cfg = FluxConfig::tiny();
    assert_eq!(units.len(), 2 + cfg.num_layers + cfg.num_single_layers);
    assert_eq!(units[0].name, "embed");
    assert_eq!(units[1].name, "transformer_blocks.0");
    assert_eq!(units.last().unwrap().name, "head");
}

#[test]
fn evicted_units_give_the_same_forward_and_gradients() {
    let plain = model();
    let mut sharded = model();
    let residency = Evicting::new(&sharded);
    sharded.set_residency(Some(residency.clone()));
    let n_units = residency.units.len();

    // a gradient-free forward acquires and releases every unit in order
    let x = Inputs::new(2, 1);
    let a = tch::no_grad(|| plain.velocity(&x.flow())).unwrap();
    let b = tch::no_grad(|| sharded.velocity(&x.flow())).unwrap();
    assert!(a.equal(&b));
    let log: Vec<(char, usize)> = residency.log.borrow_mut().drain(..).collect();
    let want: Vec<(char, usize)> = (0..n_units).flat_map(|u| [('a', u), ('r', u)]).collect();
    assert_eq!(log, want);
    assert!(residency.resident.borrow().iter().all(|r| !r));

    // two checkpointed backward passes: gradients reported unit by unit, last to first
    for seed in [2, 3] {
        let x = Inputs::new(2, seed);
        let w = Tensor::randn([2, 16, 64], (Kind::Float, Device::Cpu));
        let loss = |v: &Tensor| Ok((v * &w).sum(Kind::Float));
        let _ = plain
            .velocity_backward(&x.flow(), &mut loss.clone())
            .unwrap();
        let _ = sharded
            .velocity_backward(&x.flow(), &mut loss.clone())
            .unwrap();
    }
    let grads_reported: Vec<usize> = residency
        .log
        .borrow()
        .iter()
        .filter(|(k, _)| *k == 'g')
        .map(|(_, u)| *u)
        .collect();
    let one_pass: Vec<usize> = (0..n_units).rev().collect();
    assert_eq!(grads_reported, [one_pass.clone(), one_pass].concat());
    let grads = residency.grads.borrow();
    for (k, (name, p)) in plain.parameters().iter().enumerate() {
        let g = grads[k].as_ref().unwrap();
        assert!(g.equal(&p.grad()), "{name}: gradients differ");
    }
}
