//! XXH64 (shard checksums, fingerprints) and SplitMix64 (shuffles), whose output is part of the
//! on-disk format or of the reproducible data order: thin wrappers over the `twox-hash` and
//! `rand_xoshiro` crates; the tests pin their output to golden values.
use rand_xoshiro::rand_core::{RngCore, SeedableRng};
use std::hash::Hasher;

/// Streaming XXH64 (the standard algorithm, so `xxhsum -H64` agrees with it).
#[derive(Clone)]
pub struct Xxh64(twox_hash::XxHash64);

impl Xxh64 {
    pub fn new(seed: u64) -> Self {
        Xxh64(twox_hash::XxHash64::with_seed(seed))
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0.write(data);
    }

    pub fn digest(&self) -> u64 {
        self.0.finish()
    }
}

/// One-shot XXH64.
pub fn xxh64(data: &[u8], seed: u64) -> u64 {
    twox_hash::XxHash64::oneshot(seed, data)
}

/// SplitMix64's state increment.
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64: a tiny, portable PRNG. The data order depends on it, so it must never change.
#[derive(Clone, Debug)]
pub struct SplitMix64(rand_xoshiro::SplitMix64);

impl SplitMix64 {
    /// A generator keyed by several integers (seed, epoch, bucket, …), mixed so that nearby keys
    /// give unrelated streams.
    pub fn from_keys(keys: &[u64]) -> Self {
        let mut s = 0x243F_6A88_85A3_08D3u64;
        for &k in keys {
            s = mix(s ^ mix(k.wrapping_add(GOLDEN_GAMMA)));
        }
        SplitMix64(rand_xoshiro::SplitMix64::seed_from_u64(s))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-40 for any n < 2^24
    /// and irrelevant for shuffling, and the result is fully deterministic).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// SplitMix64's output function of `z`: the output of a generator whose state steps to `z`.
fn mix(z: u64) -> u64 {
    rand_xoshiro::SplitMix64::seed_from_u64(z.wrapping_sub(GOLDEN_GAMMA)).next_u64()
}

/// Stable 64-bit key of a string (for per-sub-dataset seeds).
pub fn str_key(s: &str) -> u64 {
    xxh64(s.as_bytes(), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xxh64_reference_vectors() {
        assert_eq!(xxh64(b"", 0), 0xEF46_DB37_51D8_E999);
        assert_eq!(xxh64(b"a", 0), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(xxh64(b"abc", 0), 0x44BC_2CF5_AD77_0999);
        // Streaming in odd pieces equals one shot.
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut h = Xxh64::new(5);
        for c in data.chunks(13) {
            h.update(c);
        }
        assert_eq!(h.digest(), xxh64(&data, 5));
    }

    /// Golden values: computed with the hand-written XXH64 and SplitMix64 this module held before
    /// it switched to crates (commit 49ca13c) (the same numbers came from the Python `xxhash` 4.1 package and a
    /// line-by-line Python SplitMix64), so the shard checksums and the data order cannot change.
    fn test_bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn xxh64_keeps_the_golden_values_shard_checksums_depend_on() {
        let lens = [0, 1, 3, 4, 7, 8, 9, 31, 32, 33, 63, 64, 65, 100, 1000];
        let seed0: [u64; 15] = [
            0xEF46DB3751D8E999,
            0x1F25C8D0BC1F4BB6,
            0x31D2363F52E564C9,
            0x9BB64B7D66EE9FDA,
            0x9A7B149959CE60D8,
            0xDAB99D95C6F90092,
            0x170BB6BF975B4C02,
            0xA2AA5F33CC4A6119,
            0x23C3C17EF790FD97,
            0x50A7CFC7BA588784,
            0x5E3E54B431C7493C,
            0x0EB64B3EF6EEB01F,
            0xA383B724B2BD12F1,
            0xA61F8D4C170FE531,
            0x5F235FA033F1A3FB,
        ];
        let seed5: [u64; 15] = [
            0x4BE1D406981CFD3B,
            0x8E04806881B4D61D,
            0xA4218281579DBC2C,
            0x8E0E5DCB6E4C4A2E,
            0x5952098BBA4E3E1C,
            0xBC36E05BDAFC3DF7,
            0x1981BBB9377FEEDC,
            0x4B620437708C3EA9,
            0xB483E00F1DD67337,
            0xBB0F5983C203F593,
            0xBF5E1C4FA32C6E24,
            0xAC7714C41EC053A0,
            0x08F9B8042E9C23AF,
            0x708DC77ABB05EC00,
            0x208BE8CAF3F789AF,
        ];
        for (i, &n) in lens.iter().enumerate() {
            assert_eq!(xxh64(&test_bytes(n), 0), seed0[i], "length {n}, seed 0");
            assert_eq!(xxh64(&test_bytes(n), 5), seed5[i], "length {n}, seed 5");
            // Streamed in uneven pieces (a shard is checksummed as it is written).
            let mut h = Xxh64::new(5);
            for piece in test_bytes(n).chunks(13) {
                h.update(piece);
            }
            assert_eq!(h.digest(), seed5[i], "length {n}, streamed");
        }
        // Every length 0..=300 (all tail paths), folded.
        let fold = (0..=300).fold(0u64, |acc, n| acc.rotate_left(5) ^ xxh64(&test_bytes(n), 0x9E37_79B9_7F4A_7C15));
        assert_eq!(fold, 0xDBD1520565A07DA4);
        assert_eq!(str_key("world"), 0xE778FBFE66EE51EF);
    }

    #[test]
    fn splitmix64_keeps_the_golden_stream_the_data_order_depends_on() {
        let mut r = SplitMix64::from_keys(&[7, 0, 3, str_key("world")]);
        let got: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
        assert_eq!(got, [0x36F3B86D1C0BDDA6, 0x54B1E8BDB2518517, 0x0F8192ED9B95AA00, 0xA03409F003161561]);
        let mut v: Vec<u32> = (0..20).collect();
        SplitMix64::from_keys(&[1, 2]).shuffle(&mut v);
        assert_eq!(v, [2, 12, 15, 17, 8, 18, 19, 13, 9, 0, 10, 4, 5, 16, 7, 3, 6, 11, 1, 14]);
    }

    #[test]
    fn shuffle_is_deterministic_permutation() {
        let mut a: Vec<u32> = (0..100).collect();
        let mut b = a.clone();
        SplitMix64::from_keys(&[1, 2]).shuffle(&mut a);
        SplitMix64::from_keys(&[1, 2]).shuffle(&mut b);
        assert_eq!(a, b);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        let mut c: Vec<u32> = (0..100).collect();
        SplitMix64::from_keys(&[1, 3]).shuffle(&mut c);
        assert_ne!(a, c);
    }
}
