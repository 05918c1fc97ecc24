//! The training data order: position `n` of the prompt stream as a pure
//! function of `(seed, n)` (one seeded permutation per epoch). The prompt
//! sets it indexes are [`crate::data::PromptSet`]s.

use crate::rng::Philox;

/// The data order: position `n` of the stream maps to a prompt index, epoch by epoch.
pub struct DataOrder {
    seed: u64,
    len: u64,
    cached: Option<(u64, Vec<u64>)>,
}

impl DataOrder {
    /// The order over `len` prompts under `seed`.
    pub fn new(seed: u64, len: u64) -> Self {
        DataOrder {
            seed,
            len,
            cached: None,
        }
    }

    /// The prompt index at stream position `position`.
    pub fn index(&mut self, position: u64) -> u64 {
        let epoch = position / self.len;
        if self.cached.as_ref().map(|c| c.0) != Some(epoch) {
            let mut rng = Philox::for_stream(self.seed, &format!("data/{epoch}"));
            let mut perm: Vec<u64> = (0..self.len).collect();
            for i in (1..perm.len()).rev() {
                let j = ((rng.uniform() * (i + 1) as f64) as usize).min(i);
                perm.swap(i, j);
            }
            self.cached = Some((epoch, perm));
        }
        self.cached.as_ref().expect("cached").1[(position % self.len) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_order_is_a_permutation_per_epoch() {
        let mut order = DataOrder::new(3, 10);
        let mut first: Vec<u64> = (0..10).map(|p| order.index(p)).collect();
        let second: Vec<u64> = (10..20).map(|p| order.index(p)).collect();
        assert_ne!(first, second);
        assert_eq!(order.index(3), DataOrder::new(3, 10).index(3));
        first.sort_unstable();
        assert_eq!(first, (0..10).collect::<Vec<_>>());
    }
}
