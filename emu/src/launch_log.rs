//! What a process's kernels did, for the checks of tools/emu-sanitize.sh and tools/emu-check.sh:
//! - `LLAMA_CPT_EMU_KERNEL_LOG=FILE`: the first launch writes `entry NAME` for every kernel compiled
//!   in, and each successful run of a kernel at a launch shape not seen before
//!   `ran NAME grid=X,Y,Z block=X,Y,Z smem=BYTES` (an entry point no test launched is then a named
//!   failure of the sanitizer run, and the shapes each ran at are on record);
//! - `LLAMA_CPT_EMU_DIGEST_LOG=FILE`: after every run, `SEQ NAME k:HASH …` with a hash of the
//!   whole allocation each pointer argument `k` points into (inputs and outputs alike). Two runs
//!   of the same tests with the same seed under two block schedules (LLAMA_CPT_EMU_SCHEDULE) must
//!   write the same lines: a line of one run missing from the other names a kernel whose result
//!   depends on the order its threads ran in — a race the tolerance of a test would let through.
//!   SEQ is the launch's number in this process, to put the lines back in launch order. A word of
//!   a buffer that points into a live allocation (a table of pointers, as AdamW's segments) is
//!   hashed as its offset there: addresses differ from run to run, offsets do not.
//!
//! Both files are appended to (several processes may share one), one whole line per write.
use crate::driver::live_allocations;
use crate::kernels::{self, Kernel};
use std::collections::{BTreeMap, HashSet};
use std::ffi::c_void;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

fn open(var: &str) -> Option<Mutex<std::fs::File>> {
    let path = std::env::var_os(var)?;
    match std::fs::OpenOptions::new().create(true).append(true).open(&path) {
        Ok(f) => Some(Mutex::new(f)),
        Err(e) => {
            eprintln!("emulated CUDA: {var}={}: {e}", path.to_string_lossy());
            std::process::exit(2)
        }
    }
}

fn write(file: &Mutex<std::fs::File>, text: &str) {
    let _ = file.lock().unwrap().write_all(text.as_bytes());
}

struct Coverage {
    file: Mutex<std::fs::File>,
    ran: Mutex<HashSet<(Kernel, Geometry)>>,
}

fn coverage() -> Option<&'static Coverage> {
    static LOG: OnceLock<Option<Coverage>> = OnceLock::new();
    LOG.get_or_init(|| {
        let file = open("LLAMA_CPT_EMU_KERNEL_LOG")?;
        write(&file, &kernels::all().map(|k| format!("entry {}\n", k.name())).collect::<String>());
        Some(Coverage { file, ran: Mutex::new(HashSet::new()) })
    })
    .as_ref()
}

fn digests() -> Option<&'static Mutex<std::fs::File>> {
    static LOG: OnceLock<Option<Mutex<std::fs::File>>> = OnceLock::new();
    LOG.get_or_init(|| open("LLAMA_CPT_EMU_DIGEST_LOG")).as_ref()
}

/// The number of the launch being enqueued, when digests are logged (else 0).
pub fn next_launch() -> u64 {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    if digests().is_some() {
        SEQ.fetch_add(1, Ordering::Relaxed)
    } else {
        0
    }
}

/// A launch's shape: grid, block, dynamic shared memory bytes.
pub type Geometry = ([u32; 3], [u32; 3], u32);

/// Notes that launch `seq` of `k` ran to completion at `shape` with the arguments `args`
/// (kernelParams; `sizes` their sizes in bytes).
pub fn ran(k: Kernel, seq: u64, shape: Geometry, args: &[*mut c_void], sizes: &[usize]) {
    if let Some(c) = coverage() {
        if c.ran.lock().unwrap().insert((k, shape)) {
            let ([gx, gy, gz], [bx, by, bz], smem) = shape;
            write(&c.file, &format!("ran {} grid={gx},{gy},{gz} block={bx},{by},{bz} smem={smem}\n", k.name()));
        }
    }
    if let Some(file) = digests() {
        let allocs = live_allocations();
        let mut line = format!("{seq} {}", k.name());
        for (i, (&arg, &size)) in args.iter().zip(sizes).enumerate() {
            if size != 8 {
                continue;
            }
            let value = unsafe { (arg as *const u64).read_unaligned() };
            if let Some((start, bytes)) = containing(&allocs, value) {
                let contents = unsafe { std::slice::from_raw_parts(start as *const u8, bytes) };
                line.push_str(&format!(" {i}:{:016x}", hash(contents, &allocs)));
            }
        }
        line.push('\n');
        write(file, &line);
    }
}

/// The allocation (start, size) of `allocs` that `ptr` points into.
fn containing(allocs: &BTreeMap<u64, usize>, ptr: u64) -> Option<(u64, usize)> {
    let (&start, &size) = allocs.range(..=ptr).next_back()?;
    (ptr < start + size as u64).then_some((start, size))
}

/// A 64-bit hash of `bytes` (eight bytes at a time, multiply-xorshift mixed): equal contents,
/// equal hash; a flipped bit anywhere changes it with overwhelming probability. An aligned word
/// that points into one of `allocs` counts as its offset there (module comment).
fn hash(bytes: &[u8], allocs: &BTreeMap<u64, usize>) -> u64 {
    let lo = allocs.keys().next().copied().unwrap_or(u64::MAX);
    let hi = allocs.iter().next_back().map_or(0, |(&s, &n)| s + n as u64);
    let mut h = 0x9e37_79b9_7f4a_7c15u64 ^ bytes.len() as u64;
    let mut mix = |w: u64| {
        h = (h ^ w).wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 32;
    };
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().unwrap());
        match (lo..hi).contains(&w).then(|| containing(allocs, w)).flatten() {
            Some((start, _)) => mix((w - start) ^ 0x5eed_0000_0000_0000),
            None => mix(w),
        }
    }
    let mut tail = [0u8; 8];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    mix(u64::from_le_bytes(tail));
    h
}

#[cfg(test)]
mod tests {
    use super::hash;
    use std::collections::BTreeMap;

    #[test]
    fn the_hash_sees_every_byte_and_the_length() {
        let none = BTreeMap::new();
        let a: Vec<u8> = (0..1001u32).map(|i| (i * 7) as u8).collect();
        let h = hash(&a, &none);
        for i in [0, 7, 8, 500, 999, 1000] {
            let mut b = a.clone();
            b[i] ^= 1;
            assert_ne!(hash(&b, &none), h, "byte {i}");
        }
        assert_ne!(hash(&a[..1000], &none), h);
        assert_eq!(hash(&a.clone(), &none), h);
    }

    #[test]
    fn a_pointer_counts_as_its_offset_in_its_allocation() {
        let table = |base: u64| [base + 16, 7u64, base + 4096 + 8].map(u64::to_le_bytes).concat();
        let run = |base: u64| BTreeMap::from([(base, 4096usize), (base + 4096, 256)]);
        let (a, b) = (0x7f00_0000_0000u64, 0x5555_0000_1000u64);
        assert_eq!(hash(&table(a), &run(a)), hash(&table(b), &run(b)));
        // Another offset, or a pointer where there was none, is another hash.
        let mut moved = table(b);
        moved[0] ^= 8;
        assert_ne!(hash(&moved, &run(b)), hash(&table(a), &run(a)));
        assert_ne!(hash(&table(b), &BTreeMap::new()), hash(&table(a), &run(a)));
    }
}
