//! Who shares secrets with whom: a random k-regular graph (a Harary graph
//! over a random ordering, as in Bell et al. 2020), derived from a seed
//! every member computes from the roster, so the server cannot choose it.

use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha20Rng;

/// Each of `n` members' neighbours, sorted, for degree `k` rounded up to
/// even. `k ≥ n − 1` is the complete graph of the original SecAgg.
pub fn neighbours(seed: [u8; 32], n: usize, k: usize) -> Vec<Vec<u32>> {
    if k + 1 >= n {
        return (0..n)
            .map(|i| (0..n as u32).filter(|&j| j as usize != i).collect())
            .collect();
    }
    let half = k.div_ceil(2);
    if 2 * half + 1 > n {
        return neighbours(seed, n, n);
    }
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.shuffle(&mut ChaCha20Rng::from_seed(seed));
    let mut adjacency = vec![Vec::with_capacity(2 * half); n];
    for (pos, &member) in order.iter().enumerate() {
        for d in 1..=half {
            adjacency[member as usize].push(order[(pos + d) % n]);
            adjacency[member as usize].push(order[(pos + n - d) % n]);
        }
    }
    for list in &mut adjacency {
        list.sort_unstable();
    }
    adjacency
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graphs_are_regular_symmetric_and_seeded() {
        for (n, k) in [(5, 2), (10, 4), (50, 7), (1000, 20), (6, 10)] {
            let g = neighbours([1; 32], n, k);
            let degree = if k + 1 >= n { n - 1 } else { k.div_ceil(2) * 2 };
            for (i, list) in g.iter().enumerate() {
                assert_eq!(list.len(), degree, "n={n} k={k}");
                assert!(!list.contains(&(i as u32)));
                assert!(list.windows(2).all(|w| w[0] < w[1]));
                for &j in list {
                    assert!(g[j as usize].contains(&(i as u32)));
                }
            }
        }
        assert_eq!(neighbours([1; 32], 100, 6), neighbours([1; 32], 100, 6));
        assert_ne!(neighbours([1; 32], 100, 6), neighbours([2; 32], 100, 6));
    }
}
