//! The shared-memory segment: its header, the slots, futex waits, and the unique id that names it.
use super::{ID_TAG, MAX_RANKS, SLOT_BYTES};
use cudarc::nccl::sys::ncclUniqueId;
use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Process-shared header at the start of the segment (zeroed by `ftruncate`).
#[repr(C)]
pub(super) struct Header {
    pub(super) ready: AtomicU64,
    pub(super) nranks: AtomicU32,
    /// Ranks attached so far (a futex word during init).
    pub(super) attached: AtomicU32,
    /// The central barrier: arrivals in this round, and the round number (the futex word).
    pub(super) arrivals: AtomicU32,
    pub(super) round: AtomicU32,
    /// 1 + the first rank that aborted or failed; 0 while all is well.
    pub(super) failed: AtomicU32,
    /// 1 + the first rank found dead, so that every survivor names it (not a survivor that
    /// exited after it with its own error).
    pub(super) dead: AtomicU32,
    pub(super) pids: [AtomicI32; MAX_RANKS],
}

const SLOTS_OFFSET: usize = std::mem::size_of::<Header>().next_multiple_of(4096);

pub(super) fn segment_len(nranks: usize) -> usize {
    SLOTS_OFFSET + nranks * SLOT_BYTES
}

/// A mapping of the shared segment.
pub(super) struct Segment {
    base: *mut u8,
    len: usize,
}

// SAFETY: the header is accessed through atomics only; the slots are written by their own rank
// and read by others only between barriers.
unsafe impl Send for Segment {}
unsafe impl Sync for Segment {}

impl Drop for Segment {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.base as *mut c_void, self.len) };
    }
}

impl Segment {
    pub(super) fn map(fd: c_int, len: usize) -> std::io::Result<Segment> {
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Segment { base: base as *mut u8, len })
    }
    pub(super) fn header(&self) -> &Header {
        unsafe { &*(self.base as *const Header) }
    }
    pub(super) fn slot(&self, rank: usize) -> *mut u8 {
        unsafe { self.base.add(SLOTS_OFFSET + rank * SLOT_BYTES) }
    }
}

/// Whether process `pid` still runs (a zombie does not).
pub(super) fn alive(pid: i32) -> bool {
    if unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    // "pid (comm) S ...": the state follows the last ')'.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_none_or(|s| s != 'Z' && s != 'X'),
        Err(_) => true, // no /proc: trust kill()
    }
}

pub(super) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts =
        libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as libc::c_long };
    // Shared (not FUTEX_PRIVATE): the word lives in memory mapped by several processes.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT, expected, &ts as *const libc::timespec) };
}

pub(super) fn futex_wake_all(word: &AtomicU32) {
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
}

/// The segment name inside a unique id.
pub(super) fn id_name(id: &ncclUniqueId) -> Option<CString> {
    let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
    let rest = bytes.strip_prefix(&ID_TAG[..])?;
    let end = rest.iter().position(|&b| b == 0)?;
    CString::new(&rest[..end]).ok().filter(|n| n.as_bytes().starts_with(b"/"))
}

/// A fresh unique id: a segment name no other communicator of this machine uses.
pub fn new_unique_id() -> ncclUniqueId {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let name = format!("/lcpt-nccl-{}-{nanos}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
    let mut id = ncclUniqueId { internal: [0; 128] };
    for (d, s) in id.internal.iter_mut().zip(ID_TAG.iter().chain(name.as_bytes())) {
        *d = *s as c_char;
    }
    id
}
