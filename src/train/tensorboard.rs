//! TensorBoard scalar logs: `events.out.tfevents.*` files (TFRecord framing with masked CRC32C,
//! `tensorflow.Event` protocol buffers encoded by hand — three message types, no protobuf crate).
use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// CRC-32C (Castagnoli), bitwise: event files are small and written once per logged step.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn len_delimited(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time = 1 (double), step = 2 (int64), file_version = 3 | summary = 5 | session_log = 7 }`.
fn event(wall_time: f64, step: u64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = vec![0x09];
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(0x10);
    varint(step, &mut e);
    body(&mut e);
    e
}

pub struct EventWriter {
    file: std::fs::File,
}

impl EventWriter {
    /// Starts a new event file in `dir` (TensorBoard reads every file in the folder) whose first
    /// logged step will be `first_step`. It opens with a restart mark, `SessionLog { status =
    /// START }` at `first_step`, as TensorFlow's writers do after a restart: TensorBoard then drops
    /// what earlier files logged from that step on (steps replayed after a resume appear once).
    pub fn create(dir: &Path, first_step: u64) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        // TensorBoard reads the files in name order: the time to the nanosecond keeps a restart
        // (even one within the same second, in the same process) after the run it resumes.
        let path = dir.join(format!(
            "events.out.tfevents.{}.{:09}.llama-cpt.{}",
            now.as_secs(),
            now.subsec_nanos(),
            std::process::id()
        ));
        let file = std::fs::File::create_new(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = EventWriter { file };
        let first = event(now.as_secs_f64(), 0, |e| len_delimited(3, b"brain.Event:2", e));
        w.record(&first)?;
        // SessionLog { status = 1 (varint) = START (1) }.
        let start = event(now.as_secs_f64(), first_step, |e| len_delimited(7, &[0x08, 0x01], e));
        w.record(&start)?;
        Ok(w)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(data.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked_crc(&len).to_le_bytes());
        buf.extend_from_slice(data);
        buf.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file.write_all(&buf).context("writing a TensorBoard event")
    }

    /// Writes `Summary { value: [Value { tag = 1, simple_value = 2 }] }` for each finite scalar.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let mut summary = Vec::new();
        for (tag, v) in values.iter().filter(|(_, v)| v.is_finite()) {
            let mut val = Vec::new();
            len_delimited(1, tag.as_bytes(), &mut val);
            val.push(0x15);
            val.extend_from_slice(&(*v as f32).to_le_bytes());
            len_delimited(1, &val, &mut summary);
        }
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let e = event(wall, step, |e| len_delimited(5, &summary, e));
        self.record(&e)?;
        self.file.flush().context("flushing a TensorBoard event file")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_value() {
        // RFC 3720 test vector: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}
