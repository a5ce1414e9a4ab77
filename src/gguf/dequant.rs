//! Dequantisation of GGUF tensor data to f32: F32, F16, BF16 and the block types Q8_0, Q4_0
//! and Q4_1, exactly as GGML defines them. Public as `gguf::{dequantize, QK}`.
use super::GgmlType;
use anyhow::{bail, Result};
use half::{bf16, f16};
use rayon::prelude::*;

/// Elements per block of the quantised types.
pub const QK: usize = 32;

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Q8_0 block (34 bytes): f16 scale `d`, 32 × i8 `q`; value `q·d`.
fn q8_0_block(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = (q as i8) as f32 * d;
    }
}

/// Q4_0 block (18 bytes): f16 `d`, 16 bytes; byte j holds element j in its low nibble and
/// element j+16 in its high nibble; value `(q − 8)·d`.
fn q4_0_block(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        out[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        out[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1 block (20 bytes): f16 `d`, f16 min `m`, 16 bytes of nibbles as in Q4_0; value `q·d + m`.
fn q4_1_block(b: &[u8], out: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        out[j] = (q & 0x0F) as f32 * d + m;
        out[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// Decodes `n` elements of type `t` from `bytes` (which must hold exactly that many).
pub fn dequantize(t: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let Some((block, block_bytes)) = t.block().filter(|_| t.is_supported()) else {
        bail!("type {t} cannot be decoded (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)");
    };
    if !n.is_multiple_of(block) || bytes.len() != n / block * block_bytes {
        bail!("{n} elements of {t} need {} bytes, found {}", n.div_ceil(block) * block_bytes, bytes.len());
    }
    let mut out = vec![0f32; n];
    // Chunks of whole blocks, decoded in parallel.
    const BLOCKS_PER_CHUNK: usize = 4096;
    out.par_chunks_mut(BLOCKS_PER_CHUNK * block).zip(bytes.par_chunks(BLOCKS_PER_CHUNK * block_bytes)).for_each(
        |(o, b)| match t {
            GgmlType::F32 => {
                o.iter_mut().zip(b.chunks_exact(4)).for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            GgmlType::F16 => {
                o.iter_mut().zip(b.chunks_exact(2)).for_each(|(o, b)| *o = f16::from_le_bytes([b[0], b[1]]).to_f32())
            }
            GgmlType::BF16 => {
                o.iter_mut().zip(b.chunks_exact(2)).for_each(|(o, b)| *o = bf16::from_le_bytes([b[0], b[1]]).to_f32())
            }
            GgmlType::Q8_0 => o.chunks_exact_mut(QK).zip(b.chunks_exact(34)).for_each(|(o, b)| q8_0_block(b, o)),
            GgmlType::Q4_0 => o.chunks_exact_mut(QK).zip(b.chunks_exact(18)).for_each(|(o, b)| q4_0_block(b, o)),
            GgmlType::Q4_1 => o.chunks_exact_mut(QK).zip(b.chunks_exact(20)).for_each(|(o, b)| q4_1_block(b, o)),
            _ => unreachable!("checked above"),
        },
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q8_0_block_is_q_times_d() {
        let mut b = h(0.5).to_vec();
        let q: Vec<i8> = (0..32).map(|i| (i as i8 - 16) * 7).collect();
        b.extend(q.iter().map(|&x| x as u8));
        let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        let want: Vec<f32> = q.iter().map(|&x| x as f32 * 0.5).collect();
        assert_eq!(y, want);
        assert_eq!((y[0], y[31]), (-56.0, 52.5));
    }

    #[test]
    fn q4_0_low_nibbles_first_then_high() {
        let mut b = h(0.25).to_vec();
        // Byte j: low nibble j (element j), high nibble 15 − j (element j + 16).
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 0.25, "element {j}");
            assert_eq!(y[j + 16], ((15 - j) as f32 - 8.0) * 0.25, "element {}", j + 16);
        }
        assert_eq!((y[0], y[16]), (-2.0, 1.75));
    }

    #[test]
    fn q4_1_is_q_times_d_plus_min() {
        let mut b = h(0.125).to_vec();
        b.extend(h(-1.0));
        b.extend((0..16u8).map(|j| (15 - j) | (j << 4)));
        let y = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], (15 - j) as f32 * 0.125 - 1.0);
            assert_eq!(y[j + 16], j as f32 * 0.125 - 1.0);
        }
        assert_eq!((y[0], y[16]), (0.875, -1.0));
    }

    #[test]
    fn float_types_and_several_blocks() {
        let xs = [1.5f32, -2.25, 0.0, 65504.0];
        let f32b: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(dequantize(GgmlType::F32, &f32b, 4).unwrap(), xs);
        let f16b: Vec<u8> = xs.iter().flat_map(|&x| h(x)).collect();
        assert_eq!(dequantize(GgmlType::F16, &f16b, 4).unwrap(), xs);
        // bf16 keeps the top 16 bits of the f32.
        let bf: Vec<u8> = [0x3FC0u16, 0xC010, 0x0000, 0x4780].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(dequantize(GgmlType::BF16, &bf, 4).unwrap(), [1.5, -2.25, 0.0, 65536.0]);
        // Blocks are independent: two Q8_0 blocks with different scales.
        let mut b = h(1.0).to_vec();
        b.extend([3u8; 32]);
        b.extend(h(-2.0));
        b.extend([3u8; 32]);
        let y = dequantize(GgmlType::Q8_0, &b, 64).unwrap();
        assert!(y[..32].iter().all(|&v| v == 3.0) && y[32..].iter().all(|&v| v == -6.0));
    }

    #[test]
    fn wrong_sizes_and_unsupported_types_are_errors() {
        let e = dequantize(GgmlType::Q4_1, &[0u8; 19], 32).unwrap_err().to_string();
        assert!(e.contains("need 20 bytes, found 19"), "{e}");
        let e = dequantize(GgmlType::Q8_0, &[0u8; 34], 31).unwrap_err().to_string();
        assert!(e.contains("31 elements"), "{e}");
        let e = dequantize(GgmlType(12), &[0u8; 144], 256).unwrap_err().to_string();
        assert!(e.contains("Q4_K"), "{e}");
        assert_eq!(GgmlType(99).name(), "type 99");
    }
}
