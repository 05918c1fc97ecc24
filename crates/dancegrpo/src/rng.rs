//! A counter-based random generator (Philox-4x32-10) computed on the CPU.
//!
//! Every draw is a pure function of `(seed, stream, position)`, so random
//! numbers do not depend on the device, the batch size or the order in which
//! streams are consumed: the same seed replays the same run anywhere.
//!
//! A standard normal takes exactly one Philox block (four 32-bit words), so a
//! long run of normals that starts on a block boundary is computed block by
//! block on libtorch's intra-op thread count, each normal from its own block:
//! the same values as one after another, bit for bit.

use tch::Tensor;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox-4x32-10 generator over one stream.
#[derive(Debug, Clone)]
pub struct Philox {
    key: [u32; 2],
    stream: u64,
    counter: u64,
    buf: [u32; 4],
    used: usize,
}

fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

fn philox_block(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (ctr, key);
    for _ in 0..10 {
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
    }
    c
}

/// 64-bit FNV-1a of a string, used to name streams.
pub fn stream_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Philox {
    /// The generator for `stream` under `seed`.
    pub fn new(seed: u64, stream: u64) -> Self {
        Philox {
            key: [seed as u32, (seed >> 32) as u32],
            stream,
            counter: 0,
            buf: [0; 4],
            used: 4,
        }
    }

    /// The generator for a named stream (e.g. a parameter name).
    pub fn for_stream(seed: u64, name: &str) -> Self {
        Self::new(seed, stream_id(name))
    }

    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        if self.used == 4 {
            self.buf = block_at(self.counter, self.stream, self.key);
            self.counter += 1;
            self.used = 0;
        }
        self.used += 1;
        self.buf[self.used - 1]
    }

    /// Uniform in the open interval (0, 1), 53-bit resolution.
    pub fn uniform(&mut self) -> f64 {
        let (hi, lo) = (self.next_u32(), self.next_u32());
        uniform_of(hi, lo)
    }

    /// Standard normal (Box-Muller, one value per pair of uniforms).
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        box_muller(u1, u2)
    }

    /// Fills `out` with `map(z)` of the next `out.len()` standard normals `z`,
    /// exactly as that many calls of [`Self::normal`] would. On a block
    /// boundary (as a fresh stream is) each normal is computed from its own
    /// block, and a long run is split over libtorch's intra-op threads.
    pub fn normals_into<T: Send>(&mut self, out: &mut [T], map: impl Fn(f64) -> T + Sync) {
        let threads = tch::get_num_threads().max(1) as usize;
        self.normals_on(out, map, threads);
    }

    /// [`Self::normals_into`] on at most `threads` threads.
    fn normals_on<T: Send>(
        &mut self,
        out: &mut [T],
        map: impl Fn(f64) -> T + Sync,
        threads: usize,
    ) {
        if self.used != 4 {
            out.iter_mut().for_each(|v| *v = map(self.normal()));
            return;
        }
        let (first, stream, key) = (self.counter, self.stream, self.key);
        let by_blocks = |part: &mut [T], start: u64| {
            for (i, v) in part.iter_mut().enumerate() {
                *v = map(normal_of_block(block_at(start + i as u64, stream, key)));
            }
        };
        let threads = threads.min(out.len() / PARALLEL_RUN).max(1);
        if threads == 1 {
            by_blocks(out, first);
        } else {
            // every part on a thread of its own: measured faster than keeping
            // one part on the calling thread (examples/draws_bench.rs)
            let chunk = out.len().div_ceil(threads);
            std::thread::scope(|scope| {
                for (c, part) in out.chunks_mut(chunk).enumerate() {
                    let by_blocks = &by_blocks;
                    scope.spawn(move || by_blocks(part, first + (c * chunk) as u64));
                }
            });
        }
        self.counter = first + out.len() as u64;
    }

    /// A float32 CPU tensor of standard normals.
    pub fn normal_tensor(&mut self, shape: &[i64]) -> Tensor {
        let n: i64 = shape.iter().product();
        let mut v = vec![0f32; n.max(0) as usize];
        self.normals_into(&mut v, |z| z as f32);
        Tensor::from_slice(&v).reshape(shape)
    }
}

/// Normals per thread below which a run is not split (a thread costs tens of
/// microseconds; a normal about 40 ns).
const PARALLEL_RUN: usize = 16_384;

/// Philox block number `counter` of `stream` under `key`.
fn block_at(counter: u64, stream: u64, key: [u32; 2]) -> [u32; 4] {
    let (c, s) = (counter, stream);
    philox_block(
        [c as u32, (c >> 32) as u32, s as u32, (s >> 32) as u32],
        key,
    )
}

/// The uniform of two 32-bit words (27 + 26 bits), in (0, 1).
fn uniform_of(hi: u32, lo: u32) -> f64 {
    let (hi, lo) = ((hi >> 5) as u64, (lo >> 6) as u64);
    ((hi << 26 | lo) as f64 + 0.5) / (1u64 << 53) as f64
}

/// Box-Muller's first normal of two uniforms.
fn box_muller(u1: f64, u2: f64) -> f64 {
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The normal that [`Philox::normal`] makes of one whole block.
fn normal_of_block(b: [u32; 4]) -> f64 {
    box_muller(uniform_of(b[0], b[1]), uniform_of(b[2], b[3]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_matches_the_published_known_answer() {
        // Random123 known-answer test for philox4x32-10 with all-ones counter and key.
        let out = philox_block([u32::MAX; 4], [u32::MAX; 2]);
        assert_eq!(out, [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
    }

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u32> = (0..8)
            .map({
                let mut g = Philox::for_stream(7, "x");
                move |_| g.next_u32()
            })
            .collect();
        let mut g = Philox::for_stream(7, "x");
        assert_eq!(a, (0..8).map(|_| g.next_u32()).collect::<Vec<_>>());
        let mut h = Philox::for_stream(7, "y");
        assert_ne!(a[0], h.next_u32());
    }

    #[test]
    fn split_runs_of_normals_equal_one_after_another() {
        for skip in [0usize, 1, 4] {
            // a stream `skip` words in: off a block boundary for 1, on it for 0 and 4
            let mut a = Philox::new(9, 3);
            for _ in 0..skip {
                a.next_u32();
            }
            let b = a.clone();
            let n = 3 * PARALLEL_RUN + 7;
            let one_by_one: Vec<f64> = (0..n).map(|_| a.normal()).collect();
            for threads in [1, 3] {
                let mut c = b.clone();
                let mut split = vec![0f64; n];
                c.normals_on(&mut split, |z| z, threads);
                let same = one_by_one.iter().zip(&split);
                assert!(
                    same.clone().all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{threads}"
                );
                assert_eq!(
                    a.clone().next_u32(),
                    c.next_u32(),
                    "the streams go on alike"
                );
            }
        }
    }

    #[test]
    fn normals_have_unit_moments() {
        let mut g = Philox::new(1, 2);
        let v: Vec<f64> = (0..20000).map(|_| g.normal()).collect();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "mean {mean} var {var}"
        );
    }
}
