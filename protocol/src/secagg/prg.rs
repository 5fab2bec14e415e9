//! The mask generator: a 32-byte seed expanded into ring words with
//! AES-256 in counter mode, so the server can regenerate thousands of masks
//! at memory speed.
//!
//! ring exposes AES-CTR only inside AES-GCM; GCM's ciphertext of zeros is
//! exactly the CTR keystream, so sealing zeros under distinct nonces is the
//! generator (the tag is discarded).

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

/// Words expanded per nonce: 64 KiB of keystream stays in cache. Slices
/// of a mask start at multiples of it.
pub const BLOCK_WORDS: usize = 16 * 1024;

/// Whether a mask is added to or subtracted from the words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sign {
    Add,
    Subtract,
}

impl Sign {
    pub fn flip(self) -> Self {
        match self {
            Self::Add => Self::Subtract,
            Self::Subtract => Self::Add,
        }
    }
}

/// Adds (or subtracts) the mask expanded from `seed` to `words`, modulo
/// 2^bits. Each word of the mask is uniform in the ring because 2^bits
/// divides 2^32.
pub fn apply_mask(seed: &[u8; 32], bits: u32, words: &mut [u32], sign: Sign) {
    apply_mask_from(seed, bits, words, sign, 0);
}

/// [`apply_mask`] to the words of a longer vector that start at word
/// `first_block × BLOCK_WORDS`, so threads can mask disjoint slices.
pub fn apply_mask_from(
    seed: &[u8; 32],
    bits: u32,
    words: &mut [u32],
    sign: Sign,
    first_block: usize,
) {
    let mask = ring_mask(bits);
    let Ok(key) = UnboundKey::new(&AES_256_GCM, seed) else {
        unreachable!("a 32-byte key is always valid for AES-256")
    };
    let key = LessSafeKey::new(key);
    let mut stream = vec![0u8; BLOCK_WORDS * 4];
    for (block, chunk) in (first_block..).zip(words.chunks_mut(BLOCK_WORDS)) {
        let bytes = &mut stream[..chunk.len() * 4];
        bytes.fill(0);
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&(block as u64).to_be_bytes());
        // Sealing cannot fail below GCM's 64 GiB per-nonce limit.
        let _ = key.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::empty(),
            bytes,
        );
        let draws = bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        match sign {
            Sign::Add => {
                for (w, m) in chunk.iter_mut().zip(draws) {
                    *w = w.wrapping_add(m) & mask;
                }
            }
            Sign::Subtract => {
                for (w, m) in chunk.iter_mut().zip(draws) {
                    *w = w.wrapping_sub(m) & mask;
                }
            }
        }
    }
}

/// The low `bits` bits set: reduction modulo 2^bits.
pub fn ring_mask(bits: u32) -> u32 {
    if bits >= 32 {
        u32::MAX
    } else {
        (1u32 << bits) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_cancel_and_depend_on_the_seed() {
        let original: Vec<u32> = (0..40_000u32).map(|i| i % 1000).collect();
        let mut words = original.clone();
        apply_mask(&[7; 32], 16, &mut words, Sign::Add);
        assert_ne!(words, original);
        assert!(words.iter().all(|&w| w < 1 << 16));
        apply_mask(&[7; 32], 16, &mut words, Sign::Subtract);
        assert_eq!(words, original);
        let (mut a, mut b) = (vec![0u32; 100], vec![0u32; 100]);
        apply_mask(&[1; 32], 32, &mut a, Sign::Add);
        apply_mask(&[2; 32], 32, &mut b, Sign::Add);
        assert_ne!(a, b);
    }

    #[test]
    fn slices_mask_like_the_whole() {
        let mut whole = vec![5u32; 3 * BLOCK_WORDS + 17];
        let mut parts = whole.clone();
        apply_mask(&[9; 32], 20, &mut whole, Sign::Add);
        let (a, b) = parts.split_at_mut(2 * BLOCK_WORDS);
        apply_mask_from(&[9; 32], 20, a, Sign::Add, 0);
        apply_mask_from(&[9; 32], 20, b, Sign::Add, 2);
        assert_eq!(whole, parts);
    }

    #[test]
    fn masks_are_uniform_bytes() {
        // χ² over the 256 byte values of 2^20 mask bytes; 99.9% quantile of
        // χ²(255) is about 330.
        let mut words = vec![0u32; 1 << 18];
        apply_mask(&[3; 32], 32, &mut words, Sign::Add);
        let mut counts = [0f64; 256];
        for w in &words {
            for b in w.to_le_bytes() {
                counts[b as usize] += 1.0;
            }
        }
        let expected = (words.len() * 4) as f64 / 256.0;
        let chi2: f64 = counts
            .iter()
            .map(|c| (c - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 330.0, "χ² = {chi2}");
    }
}
