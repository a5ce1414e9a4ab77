//! The communicator's tests: ranks as threads, and as processes of their own.
use super::api::comm_ref;
use super::segment::id_name;
use super::*;
use crate::stream;
use cudarc::driver::sys::CUstream;
use cudarc::nccl::sys::{ncclComm_t, ncclConfig_t, ncclUniqueId};
use half::bf16;
use std::ffi::{c_char, CStr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Ranks as threads of this process: `body(rank, comm)` on each, results in rank order.
fn ranks<T: Send + 'static>(n: usize, body: impl Fn(usize, Arc<Comm>) -> T + Send + Sync + 'static) -> Vec<T> {
    let id = new_unique_id();
    let body = Arc::new(body);
    let threads: Vec<_> = (0..n)
        .rev() // the others start before rank 0 creates the segment
        .map(|r| {
            let body = body.clone();
            std::thread::spawn(move || body(r, init(&id, n, r).unwrap()))
        })
        .collect();
    let mut out: Vec<T> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    out.reverse();
    out
}

fn op(kind: Kind, send: &[f32], recv: &mut [f32], count: usize) -> Op {
    Op {
        kind,
        send: send.as_ptr() as usize,
        recv: recv.as_mut_ptr() as usize,
        count,
        elem: Elem::F32,
        reduce: Reduce::Sum,
        root: 0,
    }
}

/// Distinct values per rank and index whose f32 sums depend on the order of addition.
fn data(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7 + rank * 13) % 101) as f32 * 0.1 + (rank as f32 + 1.0) * 1e-7 * i as f32).collect()
}

/// Sum over ranks in rank order, as a plain loop.
fn rank_order_sum(n: usize, len: usize) -> Vec<f32> {
    let all: Vec<Vec<f32>> = (0..n).map(|r| data(r, len)).collect();
    (0..len).map(|i| (1..n).fold(all[0][i], |acc, r| acc + all[r][i])).collect()
}

#[test]
fn the_four_collectives_over_three_ranks_match_a_rank_order_reference() {
    // More than a slot per rank, so every collective takes several rounds.
    let len = SLOT_BYTES / 4 * 3 + 123;
    let n = 3;
    let results = ranks(n, move |r, comm| {
        let mine = data(r, len);
        let mut sum = vec![0f32; len];
        comm.run(&op(Kind::AllReduce, &mine, &mut sum, len)).unwrap();
        // Reduce-scatter of n·k elements: rank r keeps part r of the sum.
        let k = len / n;
        let mut part = vec![0f32; k];
        comm.run(&op(Kind::ReduceScatter, &mine[..n * k], &mut part, k)).unwrap();
        let mut gathered = vec![0f32; n * k];
        comm.run(&op(Kind::AllGather, &part, &mut gathered, k)).unwrap();
        // Broadcast in place: only the root's buffer is read.
        let mut from_root = if r == 0 { mine.clone() } else { vec![0f32; len] };
        let p = from_root.as_mut_ptr() as usize;
        comm.run(&Op { send: p, recv: p, ..op(Kind::Broadcast, &[], &mut [], len) }).unwrap();
        // In place: the send buffer is the receive buffer.
        let mut inplace = mine.clone();
        let p = inplace.as_mut_ptr() as usize;
        comm.run(&Op { send: p, recv: p, ..op(Kind::AllReduce, &[], &mut [], len) }).unwrap();
        (sum, part, gathered, from_root, inplace)
    });
    let want = rank_order_sum(n, len);
    let k = len / n;
    for (r, (sum, part, gathered, from_root, inplace)) in results.iter().enumerate() {
        assert!(
            sum.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
            "rank {r}: all-reduce is not the rank-order sum"
        );
        assert_eq!(inplace, sum, "rank {r}: in-place all-reduce");
        assert!(
            part.iter().zip(&want[r * k..]).all(|(a, b)| a.to_bits() == b.to_bits()),
            "rank {r}: reduce-scatter part"
        );
        assert!(
            gathered.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
            "rank {r}: all-gather of the parts"
        );
        assert_eq!(from_root, &data(0, len), "rank {r}: broadcast from rank 0");
    }
}

#[test]
fn bf16_sums_round_after_each_rank_and_other_types_reduce() {
    let n = 3;
    let results = ranks(n, move |r, comm| {
        let mine: Vec<bf16> = (0..1000).map(|i| bf16::from_f32(1.0 + (i as f32) * 0.37 + r as f32 * 0.011)).collect();
        let mut out = vec![bf16::ZERO; 1000];
        let o = Op {
            kind: Kind::AllReduce,
            send: mine.as_ptr() as usize,
            recv: out.as_mut_ptr() as usize,
            count: 1000,
            elem: Elem::Bf16,
            reduce: Reduce::Sum,
            root: 0,
        };
        comm.run(&o).unwrap();
        let ints = [r as i64 - 5, 1 << 40];
        let mut max = [0i64; 2];
        comm.run(&Op {
            elem: Elem::I64,
            reduce: Reduce::Max,
            send: ints.as_ptr() as usize,
            recv: max.as_mut_ptr() as usize,
            count: 2,
            ..o
        })
        .unwrap();
        let scalars = [0.1f64 * (r + 1) as f64];
        let mut total = [0f64];
        comm.run(&Op {
            elem: Elem::F64,
            send: scalars.as_ptr() as usize,
            recv: total.as_mut_ptr() as usize,
            count: 1,
            ..o
        })
        .unwrap();
        (out, max, total)
    });
    for (out, max, total) in &results {
        for (i, got) in out.iter().enumerate() {
            let v = |r: usize| bf16::from_f32(1.0 + (i as f32) * 0.37 + r as f32 * 0.011);
            let want = bf16::from_f32(bf16::from_f32(v(0).to_f32() + v(1).to_f32()).to_f32() + v(2).to_f32());
            assert_eq!(got.to_bits(), want.to_bits(), "element {i}");
        }
        assert_eq!(*max, [-3, 1 << 40]);
        assert_eq!(total[0], (0.1f64 + 0.2) + 0.30000000000000004);
    }
}

#[test]
fn abort_from_another_thread_ends_a_wait_and_the_peer_learns_of_it() {
    let id = new_unique_id();
    let peer = std::thread::spawn(move || init(&id, 2, 1).unwrap());
    let comm = init(&id, 2, 0).unwrap();
    let peer = peer.join().unwrap();
    let aborter = {
        let comm = comm.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            comm.abort();
        })
    };
    // Rank 1 never joins: only the abort can end this.
    let (x, mut y) = (vec![1f32; 10], vec![0f32; 10]);
    let t0 = Instant::now();
    let err = comm.run(&op(Kind::AllReduce, &x, &mut y, 10)).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(err.message.contains("aborted"), "{}", err.message);
    aborter.join().unwrap();
    let err = peer.run(&op(Kind::AllReduce, &x, &mut y, 10)).unwrap_err();
    assert_eq!(err.code, ncclResult_t::ncclRemoteError);
    assert!(err.message.contains("rank 0 aborted"), "{}", err.message);
}

#[test]
fn non_blocking_init_reports_in_progress_then_success() {
    let mut id = ncclUniqueId { internal: [0; 128] };
    assert_eq!(unsafe { ncclGetUniqueId(&mut id) }, ncclResult_t::ncclSuccess);
    let config = || {
        let mut c: ncclConfig_t = unsafe { std::mem::zeroed() };
        c.size = std::mem::size_of::<ncclConfig_t>();
        c.magic = CONFIG_MAGIC;
        c.version = VERSION as u32;
        c.blocking = 0;
        c
    };
    let handles: Vec<usize> = (0..2)
        .map(|r| {
            let mut comm: ncclComm_t = std::ptr::null_mut();
            let mut cfg = config();
            assert_eq!(unsafe { ncclCommInitRankConfig(&mut comm, 2, id, r, &mut cfg) }, ncclResult_t::ncclInProgress);
            comm as usize
        })
        .collect();
    let t0 = Instant::now();
    for &h in &handles {
        loop {
            let mut state = ncclResult_t::ncclInternalError;
            assert_eq!(unsafe { ncclCommGetAsyncError(h as ncclComm_t, &mut state) }, ncclResult_t::ncclSuccess);
            if state == ncclResult_t::ncclSuccess {
                break;
            }
            assert_eq!(state, ncclResult_t::ncclInProgress);
            assert!(t0.elapsed() < Duration::from_secs(10), "init never completed");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let mut bad = config();
    bad.magic = 0;
    let mut comm: ncclComm_t = std::ptr::null_mut();
    assert_eq!(unsafe { ncclCommInitRankConfig(&mut comm, 2, id, 0, &mut bad) }, ncclResult_t::ncclInvalidArgument);
    for h in handles {
        assert_eq!(unsafe { ncclCommDestroy(h as ncclComm_t) }, ncclResult_t::ncclSuccess);
    }
}

#[test]
fn collectives_queued_on_streams_run_in_order_and_a_failure_becomes_the_async_error() {
    let mut id = ncclUniqueId { internal: [0; 128] };
    assert_eq!(unsafe { ncclGetUniqueId(&mut id) }, ncclResult_t::ncclSuccess);
    let rank = move |r: i32| {
        let mut comm: ncclComm_t = std::ptr::null_mut();
        assert_eq!(unsafe { ncclCommInitRank(&mut comm, 2, id, r) }, ncclResult_t::ncclSuccess);
        let s = stream::create();
        let x: Vec<f32> = (0..5000).map(|i| (i as f32) * (r as f32 + 1.0)).collect();
        let mut y = vec![0f32; 5000];
        let mut z = vec![0f32; 10000];
        unsafe {
            // The all-gather reads what the all-reduce wrote: only stream order makes it right.
            assert_eq!(
                ncclAllReduce(x.as_ptr() as _, y.as_mut_ptr() as _, 5000, 7, 0, comm, s as _),
                ncclResult_t::ncclSuccess
            );
            assert_eq!(
                ncclAllGather(y.as_ptr() as _, z.as_mut_ptr() as _, 5000, 7, comm, s as _),
                ncclResult_t::ncclSuccess
            );
        }
        stream::synchronize(s).unwrap();
        (comm as usize, s as usize, y, z)
    };
    let peer = std::thread::spawn(move || rank(1));
    let (c0, s0, y, mut z) = rank(0);
    let (c1, _, y1, _) = peer.join().unwrap();
    let want: Vec<f32> = (0..5000).map(|i| i as f32 + i as f32 * 2.0).collect();
    assert_eq!((&y, &y1), (&want, &want));
    assert_eq!(z, [&want[..], &want[..]].concat());
    // Rank 1 aborts; rank 0's next collective fails without poisoning its stream.
    assert_eq!(unsafe { ncclCommAbort(c1 as ncclComm_t) }, ncclResult_t::ncclSuccess);
    let (c0, s0) = (c0 as ncclComm_t, s0 as CUstream);
    assert_eq!(
        unsafe { ncclAllReduce(y.as_ptr() as _, z.as_mut_ptr() as _, 5000, 7, 0, c0, s0 as _) },
        ncclResult_t::ncclSuccess
    );
    stream::synchronize(s0).unwrap();
    let mut state = ncclResult_t::ncclSuccess;
    assert_eq!(unsafe { ncclCommGetAsyncError(c0, &mut state) }, ncclResult_t::ncclSuccess);
    assert_eq!(state, ncclResult_t::ncclRemoteError);
    let last = unsafe { CStr::from_ptr(ncclGetLastError(c0)) }.to_string_lossy().into_owned();
    assert!(last.contains("rank 1 aborted"), "{last}");
    // Later calls report the error at once.
    assert_eq!(
        unsafe { ncclAllReduce(y.as_ptr() as _, z.as_mut_ptr() as _, 5000, 7, 0, c0, s0 as _) },
        ncclResult_t::ncclRemoteError
    );
    assert_eq!(unsafe { ncclCommDestroy(c0) }, ncclResult_t::ncclSuccess);
}

#[test]
fn an_init_whose_peer_never_comes_ends_on_abort_and_leaves_no_segment_behind() {
    let id = new_unique_id();
    let name = id_name(&id).unwrap();
    let mut comm: ncclComm_t = std::ptr::null_mut();
    let mut cfg: ncclConfig_t = unsafe { std::mem::zeroed() };
    cfg.magic = CONFIG_MAGIC;
    cfg.blocking = 0;
    assert_eq!(unsafe { ncclCommInitRankConfig(&mut comm, 2, id, 0, &mut cfg) }, ncclResult_t::ncclInProgress);
    let c = unsafe { comm_ref(comm) }.unwrap() as *const Comm as usize;
    std::thread::sleep(Duration::from_millis(100));
    let shm = std::path::Path::new("/dev/shm").join(&name.to_str().unwrap()[1..]);
    assert!(shm.exists(), "rank 0 created {name:?}");
    assert_eq!(unsafe { ncclCommGetAsyncError(comm, &mut ncclResult_t::ncclSuccess) }, ncclResult_t::ncclSuccess);
    // Keep the communicator alive past the abort to read its final state.
    unsafe { Arc::increment_strong_count(c as *const Comm) };
    let kept = unsafe { Arc::from_raw(c as *const Comm) };
    assert_eq!(unsafe { ncclCommAbort(comm) }, ncclResult_t::ncclSuccess);
    let t0 = Instant::now();
    while kept.status() == ncclResult_t::ncclInProgress {
        assert!(t0.elapsed() < Duration::from_secs(5), "the init did not notice the abort");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_ne!(kept.status(), ncclResult_t::ncclSuccess);
    assert!(!shm.exists(), "{name:?} left behind");
}

/// How a rank in another process is told what to do (see `child_rank`).
const CHILD: &str = "LLAMA_CPT_EMU_NCCL_TEST_CHILD";

fn hex(id: &ncclUniqueId) -> String {
    id.internal.iter().map(|&c| format!("{:02x}", c as u8)).collect()
}

fn spawn_child(id: &ncclUniqueId, rank: usize, nranks: usize, scenario: &str) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "nccl::tests::child_rank", "--nocapture", "--test-threads=1"])
        .env(CHILD, format!("{rank} {nranks} {scenario} {}", hex(id)))
        .spawn()
        .unwrap()
}

/// A rank in a process of its own, when started by a test below; otherwise nothing.
#[test]
fn child_rank() {
    let Ok(spec) = std::env::var(CHILD) else { return };
    let parts: Vec<&str> = spec.split(' ').collect();
    let (rank, nranks, scenario) = (parts[0].parse().unwrap(), parts[1].parse().unwrap(), parts[2]);
    let mut id = ncclUniqueId { internal: [0; 128] };
    for (i, d) in id.internal.iter_mut().enumerate() {
        *d = u8::from_str_radix(&parts[3][2 * i..2 * i + 2], 16).unwrap() as c_char;
    }
    let comm = init(&id, nranks, rank).unwrap();
    match scenario {
        "sum" => {
            let len = SLOT_BYTES / 4 + 17;
            let mut out = vec![0f32; len];
            comm.run(&op(Kind::AllReduce, &data(rank, len), &mut out, len)).unwrap();
            assert_eq!(out, rank_order_sum(nranks, len));
        }
        // Attach, then die without joining the collective the others wait in.
        "exit" => std::process::exit(0),
        other => panic!("unknown scenario {other}"),
    }
}

#[test]
fn ranks_in_separate_processes_sum_in_rank_order() {
    let id = new_unique_id();
    let children: Vec<_> = (1..3).map(|r| spawn_child(&id, r, 3, "sum")).collect();
    let comm = init(&id, 3, 0).unwrap();
    let len = SLOT_BYTES / 4 + 17;
    let mut out = vec![0f32; len];
    comm.run(&op(Kind::AllReduce, &data(0, len), &mut out, len)).unwrap();
    assert_eq!(out, rank_order_sum(3, len));
    for mut c in children {
        assert!(c.wait().unwrap().success(), "a child rank failed");
    }
    // Rank 0 removed the segment's name once everyone was attached.
    let name = id_name(&id).unwrap();
    assert!(!std::path::Path::new("/dev/shm").join(&name.to_str().unwrap()[1..]).exists(), "{name:?} left behind");
}

#[test]
fn a_peer_process_that_exits_ends_the_wait_with_a_remote_error() {
    let id = new_unique_id();
    let mut child = spawn_child(&id, 1, 2, "exit");
    let comm = init(&id, 2, 0).unwrap();
    assert!(child.wait().unwrap().success());
    let (x, mut y) = (vec![1f32; 10], vec![0f32; 10]);
    let t0 = Instant::now();
    let err = comm.run(&op(Kind::AllReduce, &x, &mut y, 10)).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(err.code, ncclResult_t::ncclRemoteError);
    assert!(err.message.contains("rank 1") && err.message.contains("has exited"), "{}", err.message);
}
