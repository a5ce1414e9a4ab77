//! Small, dependency-free, portable primitives whose output is part of the on-disk format or of
//! the reproducible data order: XXH64 (shard checksum) and SplitMix64 (shuffles).

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

#[inline]
fn round(acc: u64, lane: u64) -> u64 {
    acc.wrapping_add(lane.wrapping_mul(P2)).rotate_left(31).wrapping_mul(P1)
}

#[inline]
fn merge(acc: u64, val: u64) -> u64 {
    (acc ^ round(0, val)).wrapping_mul(P1).wrapping_add(P4)
}

#[inline]
fn rd64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

#[inline]
fn rd32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}

/// Streaming XXH64 (the standard algorithm, so `xxhsum -H64` agrees with it).
#[derive(Clone)]
pub struct Xxh64 {
    v: [u64; 4],
    seed: u64,
    total: u64,
    buf: [u8; 32],
    buf_len: usize,
}

impl Xxh64 {
    pub fn new(seed: u64) -> Self {
        Xxh64 {
            v: [
                seed.wrapping_add(P1).wrapping_add(P2),
                seed.wrapping_add(P2),
                seed,
                seed.wrapping_sub(P1),
            ],
            seed,
            total: 0,
            buf: [0; 32],
            buf_len: 0,
        }
    }

    #[inline]
    fn stripe(v: &mut [u64; 4], s: &[u8]) {
        v[0] = round(v[0], rd64(&s[0..]));
        v[1] = round(v[1], rd64(&s[8..]));
        v[2] = round(v[2], rd64(&s[16..]));
        v[3] = round(v[3], rd64(&s[24..]));
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.buf_len > 0 {
            let take = (32 - self.buf_len).min(data.len());
            self.buf[self.buf_len..self.buf_len + take].copy_from_slice(&data[..take]);
            self.buf_len += take;
            data = &data[take..];
            if self.buf_len < 32 {
                return;
            }
            let buf = self.buf;
            Self::stripe(&mut self.v, &buf);
            self.buf_len = 0;
        }
        let mut chunks = data.chunks_exact(32);
        for s in &mut chunks {
            Self::stripe(&mut self.v, s);
        }
        let rem = chunks.remainder();
        self.buf[..rem.len()].copy_from_slice(rem);
        self.buf_len = rem.len();
    }

    pub fn digest(&self) -> u64 {
        let mut h = if self.total >= 32 {
            let v = self.v;
            let mut h = v[0]
                .rotate_left(1)
                .wrapping_add(v[1].rotate_left(7))
                .wrapping_add(v[2].rotate_left(12))
                .wrapping_add(v[3].rotate_left(18));
            for x in v {
                h = merge(h, x);
            }
            h
        } else {
            self.seed.wrapping_add(P5)
        };
        h = h.wrapping_add(self.total);
        let mut rest = &self.buf[..self.buf_len];
        while rest.len() >= 8 {
            h ^= round(0, rd64(rest));
            h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
            rest = &rest[8..];
        }
        if rest.len() >= 4 {
            h ^= (rd32(rest) as u64).wrapping_mul(P1);
            h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
            rest = &rest[4..];
        }
        for &b in rest {
            h ^= (b as u64).wrapping_mul(P5);
            h = h.rotate_left(11).wrapping_mul(P1);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(P2);
        h ^= h >> 29;
        h = h.wrapping_mul(P3);
        h ^= h >> 32;
        h
    }
}

/// One-shot XXH64.
pub fn xxh64(data: &[u8], seed: u64) -> u64 {
    let mut h = Xxh64::new(seed);
    h.update(data);
    h.digest()
}

/// SplitMix64: a tiny, portable PRNG. The data order depends on it, so it must never change.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator keyed by several integers (seed, epoch, bucket, …), mixed so that nearby keys
    /// give unrelated streams.
    pub fn from_keys(keys: &[u64]) -> Self {
        let mut s = 0x243F_6A88_85A3_08D3u64;
        for &k in keys {
            s = mix(s ^ mix(k.wrapping_add(0x9E37_79B9_7F4A_7C15)));
        }
        SplitMix64(s)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
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

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
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
    /// it switched to crates (the same numbers came from the Python `xxhash` 4.1 package and a
    /// line-by-line Python SplitMix64), so the shard checksums and the data order cannot change.
    fn test_bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn xxh64_keeps_the_golden_values_shard_checksums_depend_on() {
        let lens = [0, 1, 3, 4, 7, 8, 9, 31, 32, 33, 63, 64, 65, 100, 1000];
        let seed0: [u64; 15] = [
            0xEF46DB3751D8E999, 0x1F25C8D0BC1F4BB6, 0x31D2363F52E564C9, 0x9BB64B7D66EE9FDA, 0x9A7B149959CE60D8, 0xDAB99D95C6F90092, 0x170BB6BF975B4C02, 0xA2AA5F33CC4A6119,
            0x23C3C17EF790FD97, 0x50A7CFC7BA588784, 0x5E3E54B431C7493C, 0x0EB64B3EF6EEB01F, 0xA383B724B2BD12F1, 0xA61F8D4C170FE531, 0x5F235FA033F1A3FB,
        ];
        let seed5: [u64; 15] = [
            0x4BE1D406981CFD3B, 0x8E04806881B4D61D, 0xA4218281579DBC2C, 0x8E0E5DCB6E4C4A2E, 0x5952098BBA4E3E1C, 0xBC36E05BDAFC3DF7, 0x1981BBB9377FEEDC, 0x4B620437708C3EA9,
            0xB483E00F1DD67337, 0xBB0F5983C203F593, 0xBF5E1C4FA32C6E24, 0xAC7714C41EC053A0, 0x08F9B8042E9C23AF, 0x708DC77ABB05EC00, 0x208BE8CAF3F789AF,
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
