//! c10d through the shim: two real processes (this test binary re-run as its
//! own children, with the variables torchrun would set) over Gloo.

mod common;

use dancegrpo::dist::{all_reduce_grads, barrier, gather_rows, Collective};
use dancegrpo::precision::ReduceDtype;
use tch::{Kind, Tensor};

/// A process group seen through the trait's defaults for all-to-all.
struct Gathered<'a>(&'a dyn Collective);

impl Collective for Gathered<'_> {
    fn rank(&self) -> i64 {
        self.0.rank()
    }
    fn world_size(&self) -> i64 {
        self.0.world_size()
    }
    fn all_reduce_sum(&self, t: &Tensor) -> dancegrpo::Result<()> {
        self.0.all_reduce_sum(t)
    }
    fn broadcast(&self, t: &Tensor, root: i64) -> dancegrpo::Result<()> {
        self.0.broadcast(t, root)
    }
    fn all_gather_into(&self, output: &Tensor, input: &Tensor) -> dancegrpo::Result<()> {
        self.0.all_gather_into(output, input)
    }
}

#[test]
fn gloo_sums_broadcasts_and_gathers_across_two_processes() {
    if !common::is_child() {
        return common::spawn_world("gloo_sums_broadcasts_and_gathers_across_two_processes", 2);
    }
    let pg = common::join_gloo();
    let r = pg.rank() as f64;
    assert_eq!(pg.world_size(), 2);
    // all-reduce: (1 + r) summed over ranks 0, 1 = 3; f64 and a strided view work
    let t = Tensor::from_slice(&[1.0 + r, 10.0 * r]);
    pg.all_reduce_sum(&t).unwrap();
    assert_eq!(Vec::<f64>::try_from(&t).unwrap(), vec![3.0, 10.0]);
    let m = Tensor::arange(6, (Kind::Float, tch::Device::Cpu))
        .reshape([2, 3])
        .tr();
    pg.all_reduce_sum(&m).unwrap();
    let want = Tensor::arange(6, (Kind::Float, tch::Device::Cpu))
        .reshape([2, 3])
        .tr()
        * 2.0;
    assert!(m.equal(&want));
    // broadcast from rank 1
    let b = Tensor::from_slice(&[r as f32 + 5.0]);
    pg.broadcast(&b, 1).unwrap();
    assert_eq!(b.double_value(&[0]), 6.0);
    // rows 1, 3 on rank 0 and 0, 2 on rank 1, NaN kept exactly
    let (ids, vals): (Vec<i64>, Vec<f32>) = match pg.rank() {
        0 => (vec![1, 3], vec![1.5, f32::NAN]),
        _ => (vec![0, 2], vec![-2.0, 0.25]),
    };
    let g = gather_rows(&pg, &Tensor::from_slice(&vals), &ids, 4).unwrap();
    let g: Vec<f32> = Vec::try_from(&g).unwrap();
    assert_eq!(&g[..3], &[-2.0, 1.5, 0.25]);
    assert!(g[3].is_nan());
    // gradients summed in buckets
    let p = [
        Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true),
        Tensor::zeros([2, 2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true),
    ];
    let loss = (&p[0] * (r + 1.0)).sum(Kind::Float) + (&p[1] * 2.0).sum(Kind::Float);
    loss.backward();
    all_reduce_grads(&pg, &p, 2, ReduceDtype::Fp32).unwrap();
    assert_eq!(Vec::<f32>::try_from(&p[0].grad()).unwrap(), vec![3.0; 3]);
    assert_eq!(
        Vec::<f32>::try_from(&p[1].grad().reshape([-1])).unwrap(),
        vec![4.0; 4]
    );
    // in bfloat16 the sum is rounded to bfloat16 (1 + 2^-10 is not a bfloat16)
    // and written back into the float32 gradients
    let q = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    (&q * (0.5 + r * (1.0 + 1.0 / 1024.0)))
        .sum(Kind::Float)
        .backward();
    all_reduce_grads(&pg, &[q.shallow_clone()], 2, ReduceDtype::Bf16).unwrap();
    assert_eq!(q.grad().kind(), Kind::Float);
    assert_eq!(q.grad().double_value(&[0]), 2.0);
    // all-gather and reduce-scatter of flat buffers (the backend's own ops)
    let part = Tensor::from_slice(&[r as f32 * 10.0, r as f32 * 10.0 + 1.0]);
    let full = Tensor::zeros([4], (Kind::Float, tch::Device::Cpu));
    pg.all_gather_into(&full, &part).unwrap();
    assert_eq!(
        Vec::<f32>::try_from(&full).unwrap(),
        vec![0.0, 1.0, 10.0, 11.0]
    );
    let contribution = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]) * (r + 1.0);
    let mine = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu));
    pg.reduce_scatter_sum(&mine, &contribution).unwrap();
    let want = match pg.rank() {
        0 => vec![3.0, 6.0],
        _ => vec![9.0, 12.0],
    };
    assert_eq!(Vec::<f32>::try_from(&mine).unwrap(), want);
    assert!(pg.all_gather_into(&mine, &part).is_err());
    // all-to-all: rank r sends block j = [r*10 + 2j, r*10 + 2j + 1] to rank j
    let send: Vec<f32> = (0..4).map(|i| (r * 10.0) as f32 + i as f32).collect();
    let got = Tensor::zeros([4], (Kind::Float, tch::Device::Cpu));
    pg.all_to_all(&got, &Tensor::from_slice(&send)).unwrap();
    let want = match pg.rank() {
        0 => vec![0.0, 1.0, 10.0, 11.0],
        _ => vec![2.0, 3.0, 12.0, 13.0],
    };
    assert_eq!(Vec::<f32>::try_from(&got).unwrap(), want);
    // the default (through all-gather) agrees with the backend's
    let via_gather = Tensor::zeros([4], (Kind::Float, tch::Device::Cpu));
    Gathered(&pg)
        .all_to_all(&via_gather, &Tensor::from_slice(&send))
        .unwrap();
    assert!(via_gather.equal(&got));
    assert!(pg
        .all_to_all(&got, &Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)))
        .is_err());
    barrier(&pg).unwrap();
}

#[test]
fn processes_out_of_step_are_detected_and_named() {
    if !common::is_child() {
        return common::spawn_world("processes_out_of_step_are_detected_and_named", 2);
    }
    let pg = common::join_gloo();
    let w = Tensor::from_slice(&[0.5f32, -1.25, 3.0]);
    let named = vec![
        ("a".to_string(), w.copy()),
        ("b.weight".to_string(), w.copy()),
    ];
    dancegrpo::dist::check_in_sync(&pg, &named).unwrap();
    // one bit of one element on rank 1
    if pg.rank() == 1 {
        let v = f32::from_bits(3.0f32.to_bits() + 1);
        let _ = named[1]
            .1
            .shallow_clone()
            .index_fill_(0, &Tensor::from_slice(&[2i64]), v as f64);
    }
    let e = dancegrpo::dist::check_in_sync(&pg, &named)
        .unwrap_err()
        .to_string();
    assert!(e.contains("out of step") && e.contains("1 process"), "{e}");
    if pg.rank() == 1 {
        assert!(e.contains("`b.weight`"), "{e}");
    }
}

#[test]
fn ulysses_sequence_parallel_forward_equals_one_process() {
    use dancegrpo::models::flux::{packing, FluxConfig, FluxTransformer};
    use dancegrpo::models::{FlowInputs, VelocityModel};
    use dancegrpo::rng::Philox;
    use dancegrpo::weights::Source;
    if !common::is_child() {
        return common::spawn_world("ulysses_sequence_parallel_forward_equals_one_process", 2);
    }
    let pg = common::join_gloo();
    let cpu = tch::Device::Cpu;
    let model = |heads: i64| {
        let cfg = FluxConfig {
            num_layers: 2,
            num_single_layers: 2,
            num_attention_heads: heads,
            ..FluxConfig::tiny()
        };
        FluxTransformer::new(cfg, Source::Seeded(3), Kind::Float, cpu).unwrap()
    };
    // every process holds the same inputs: 16 image tokens, 8 text tokens, 2 samples
    let mut rng = Philox::new(8, 0);
    let (z, text, pooled) = (
        rng.normal_tensor(&[2, 16, 64]),
        rng.normal_tensor(&[2, 8, 32]),
        rng.normal_tensor(&[2, 4]),
    );
    let (t, g) = (
        Tensor::from_slice(&[0.75f32, 0.3]),
        Tensor::from_slice(&[3.5f32, 3.5]),
    );
    let (txt_ids, img_ids) = (packing::text_ids(8, cpu), packing::image_ids(8, 8, cpu));
    let x = FlowInputs {
        latents: &z,
        timestep: &t,
        text: &text,
        pooled: &pooled,
        text_ids: &txt_ids,
        image_ids: &img_ids,
        guidance: Some(&g),
    };
    let m = model(2);
    let one = m.velocity(&x).unwrap();
    let split = m.velocity_ulysses(&x, &pg).unwrap();
    // each process attends over the whole sequence for 1 of the 2 heads; the
    // row-wise layers see the same rows: bit-identical on the CPU it was
    // written on, allowed to differ by the kernels' blocking over fewer heads
    let err = (&split - &one).abs().max().double_value(&[]) / one.abs().max().double_value(&[]);
    eprintln!(
        "rank {}: relative difference {err:.2e} (bit-identical: {})",
        pg.rank(),
        split.equal(&one)
    );
    assert!(err < 1e-6, "{err}");
    // 3 heads cannot be split over 2 processes
    let odd = model(3);
    let err = odd.velocity_ulysses(&x, &pg).unwrap_err().to_string();
    assert!(err.contains("heads (3)"), "{err}");
    barrier(&pg).unwrap();
}
