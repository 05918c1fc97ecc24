//! c10d through the shim: two real processes (this test binary re-run as its
//! own children, with the variables torchrun would set) over Gloo.

mod common;

use dancegrpo::dist::{all_reduce_grads, barrier, gather_rows, Collective};
use dancegrpo::precision::ReduceDtype;
use tch::{Kind, Tensor};

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
