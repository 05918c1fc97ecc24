//! Seeded standard normals: one `Philox::normal` after another (how a draw was
//! made before) against `Philox::normals_into` (each normal from its own Philox
//! block, split over libtorch's intra-op threads), alternated in the same run,
//! on the SDE noise of one sample.
//!
//! ```text
//! cargo run --release --example draws_bench -- [normals per draw] [rounds] [threads]
//! ```
//!
//! The default draw is a FLUX.1 latent at 1024x1024 (4096 tokens x 64 channels),
//! one sample's noise per SDE step; `threads` defaults to the machine's cores.
//! Both give the same values bit for bit (checked here on every round).

use std::time::Instant;

use dancegrpo::rng::Philox;

/// Seconds to draw `n` normals of a fresh stream, and the draw: one after
/// another, or with `normals_into` on `threads` threads.
fn time_draw(n: usize, round: u64, threads: Option<i32>) -> (f64, Vec<f32>) {
    let mut rng = Philox::new(7, round);
    if let Some(t) = threads {
        tch::set_num_threads(t);
    }
    let start = Instant::now();
    let out = match threads {
        None => (0..n).map(|_| rng.normal() as f32).collect(),
        Some(_) => {
            let mut out = vec![0f32; n];
            rng.normals_into(&mut out, |z| z as f32);
            out
        }
    };
    (start.elapsed().as_secs_f64(), out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg =
        |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (n, rounds) = (arg(0, 4096 * 64), arg(1, 21));
    let threads = arg(
        2,
        std::thread::available_parallelism().map_or(1, |p| p.get()),
    ) as i32;
    let (mut one, mut many) = (Vec::new(), Vec::new());
    for round in 0..rounds as u64 {
        let (t1, a) = time_draw(n, round, None);
        let (tn, b) = time_draw(n, round, Some(threads));
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "round {round}: the draws differ"
        );
        one.push(t1);
        many.push(tn);
    }
    let ratios: Vec<f64> = one.iter().zip(&many).map(|(a, b)| b / a).collect();
    let (m1, mn) = (median(one), median(many));
    println!(
        "{n} normals per draw, {rounds} rounds: one after another {:.2} ms ({:.1} ns/normal), by blocks on {threads} threads {:.2} ms ({:.1} ns/normal), median ratio {:.3}",
        m1 * 1e3,
        m1 * 1e9 / n as f64,
        mn * 1e3,
        mn * 1e9 / n as f64,
        median(ratios)
    );
}
