//! Text normalisation and the stable hashes the filters use.
//!
//! Words are maximal runs of alphanumeric characters, lower-cased; every
//! other character separates words. Hashes are FNV-1a over bytes followed by
//! a SplitMix64 finaliser, so they are the same on every machine and run.

/// Lower-cased alphanumeric words of `s`.
pub fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect()
}

/// The number of words in `s` (as [`words`] counts them).
pub fn word_count(s: &str) -> usize {
    s.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).count()
}

/// `s` lower-cased with punctuation dropped and whitespace collapsed.
pub fn normalize(s: &str) -> String {
    words(s).join(" ")
}

/// SplitMix64's finaliser: a bijective 64-bit mixer.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A seeded 64-bit hash of bytes.
pub fn hash_bytes(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64 ^ mix64(seed);
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h ^ bytes.len() as u64)
}

/// A 128-bit hash of a string (two independently seeded 64-bit hashes).
pub fn hash128(s: &str) -> u128 {
    let a = hash_bytes(s.as_bytes(), 0x5eed_0001);
    let b = hash_bytes(s.as_bytes(), 0x5eed_0002);
    (u128::from(a) << 64) | u128::from(b)
}

/// A hash of a string with a seed derived from a name, for per-source RNG
/// streams that do not depend on the order of sources.
pub fn name_seed(seed: u64, name: &str, salt: u64) -> u64 {
    mix64(hash_bytes(name.as_bytes(), seed) ^ mix64(salt))
}

const ROLL_BASE: u64 = 0x9e37_79b9_7f4a_7c15 | 1;

/// Hashes of every window of `n` consecutive items of `word_hashes` (a
/// polynomial rolling hash mod 2^64 over already-mixed word hashes). Empty
/// when there are fewer than `n` items or `n` is 0.
pub fn ngram_hashes(word_hashes: &[u64], n: usize) -> Vec<u64> {
    if n == 0 || word_hashes.len() < n {
        return Vec::new();
    }
    // base^(n-1), to remove the outgoing word.
    let mut top = 1u64;
    for _ in 1..n {
        top = top.wrapping_mul(ROLL_BASE);
    }
    let mut out = Vec::with_capacity(word_hashes.len() - n + 1);
    let mut h = 0u64;
    for (i, &w) in word_hashes.iter().enumerate() {
        if i >= n {
            h = h.wrapping_sub(word_hashes[i - n].wrapping_mul(top));
        }
        h = h.wrapping_mul(ROLL_BASE).wrapping_add(w);
        if i + 1 >= n {
            out.push(mix64(h ^ n as u64));
        }
    }
    out
}

/// Word hashes of `s` (see [`words`]).
pub fn word_hashes(s: &str) -> Vec<u64> {
    words(s).iter().map(|w| hash_bytes(w.as_bytes(), 0x0057_04d5)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_ignores_case_punctuation_and_spacing() {
        assert_eq!(normalize("  Hello,   WORLD!\n"), "hello world");
        assert_eq!(normalize("Hello world"), normalize("hello -- world."));
        assert_eq!(word_count("It's 3 o'clock."), 5);
    }

    #[test]
    fn rolling_ngram_hash_equals_direct_hash_of_each_window() {
        let w = word_hashes("a b c d e f a b c");
        let grams = ngram_hashes(&w, 3);
        assert_eq!(grams.len(), 7);
        for (i, g) in grams.iter().enumerate() {
            assert_eq!(*g, ngram_hashes(&w[i..i + 3], 3)[0]);
        }
        // "a b c" occurs at 0 and 6.
        assert_eq!(grams[0], grams[6]);
        assert_ne!(grams[0], grams[1]);
        assert!(ngram_hashes(&w, 10).is_empty());
    }
}
