//! A TCP rendezvous: rank 0 listens at `MASTER_ADDR:MASTER_PORT`, every other rank connects and
//! says who it is, and rank 0 sends them all the same payload (NCCL's unique id), so a GPU run
//! needs no MPI library. Both sides give up after a timeout with an error that says which ranks
//! never arrived, instead of hanging.
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const HELLO: &[u8; 8] = b"llamacpt";

/// Rank 0 passes `Some(payload)` and gets it back; the others pass `None` and get rank 0's.
pub fn share(
    master: (&str, u16),
    rank: usize,
    world_size: usize,
    payload: Option<&[u8]>,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let (host, port) = master;
    if rank == 0 {
        let payload = payload.context("rank 0 must provide the rendezvous payload")?;
        serve(host, port, world_size, payload, timeout)
    } else {
        join(host, port, rank, world_size, timeout)
    }
}

fn serve(host: &str, port: u16, world_size: usize, payload: &[u8], timeout: Duration) -> Result<Vec<u8>> {
    let listener = TcpListener::bind((host, port))
        .or_else(|_| TcpListener::bind(("0.0.0.0", port)))
        .with_context(|| format!("rendezvous: rank 0 cannot listen on {host}:{port}"))?;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let mut arrived = vec![false; world_size];
    arrived[0] = true;
    while arrived.iter().any(|a| !a) {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut hello = [0u8; 16];
                stream.read_exact(&mut hello).with_context(|| format!("rendezvous: reading the greeting of {peer}"))?;
                let rank = u64::from_le_bytes(hello[8..].try_into().unwrap()) as usize;
                if &hello[..8] != HELLO || rank == 0 || rank >= world_size {
                    bail!("rendezvous: {peer} sent a bad greeting (rank {rank} of {world_size})");
                }
                if arrived[rank] {
                    bail!("rendezvous: rank {rank} arrived twice (two processes with the same RANK?)");
                }
                arrived[rank] = true;
                stream.write_all(&(payload.len() as u64).to_le_bytes())?;
                stream.write_all(payload)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<usize> = (0..world_size).filter(|&r| !arrived[r]).collect();
                    bail!(
                        "rendezvous at {host}:{port}: ranks {missing:?} of {world_size} never arrived within {:.0} s",
                        timeout.as_secs_f64()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("rendezvous: accepting a connection"),
        }
    }
    Ok(payload.to_vec())
}

fn join(host: &str, port: u16, rank: usize, world_size: usize, timeout: Duration) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let addr = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("rendezvous: resolving MASTER_ADDR {host}"))?
        .next()
        .with_context(|| format!("rendezvous: {host} has no address"))?;
    let mut stream = loop {
        // Rank 0 may not be listening yet: retry until the deadline.
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| {
                    format!(
                    "rendezvous: rank {rank} of {world_size} could not reach rank 0 at {host}:{port} within {:.0} s",
                    timeout.as_secs_f64()
                )
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    stream.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1))))?;
    let mut hello = HELLO.to_vec();
    hello.extend((rank as u64).to_le_bytes());
    stream.write_all(&hello)?;
    let mut len = [0u8; 8];
    stream.read_exact(&mut len).with_context(|| format!("rendezvous: rank {rank} waiting for rank 0's reply"))?;
    let mut payload = vec![0u8; u64::from_le_bytes(len) as usize];
    stream.read_exact(&mut payload)?;
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn every_rank_gets_rank_zeros_payload() {
        let port = free_port();
        let world = 4;
        let handles: Vec<_> = (0..world)
            .rev() // the others start before rank 0 listens
            .map(|r| {
                std::thread::spawn(move || {
                    share(
                        ("127.0.0.1", port),
                        r,
                        world,
                        (r == 0).then_some(&b"nccl-id-bytes"[..]),
                        Duration::from_secs(20),
                    )
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap().unwrap(), b"nccl-id-bytes");
        }
    }

    #[test]
    fn a_rank_that_never_arrives_is_named_after_the_timeout() {
        let port = free_port();
        let joined = std::thread::spawn(move || share(("127.0.0.1", port), 1, 3, None, Duration::from_secs(5)));
        let err = share(("127.0.0.1", port), 0, 3, Some(b"id"), Duration::from_secs(1)).unwrap_err();
        assert!(format!("{err:#}").contains("ranks [2] of 3 never arrived"), "{err:#}");
        // Rank 1 had arrived and got its payload before rank 0 gave up.
        assert_eq!(joined.join().unwrap().unwrap(), b"id");
        let lonely = share(("127.0.0.1", free_port()), 2, 3, None, Duration::from_millis(500)).unwrap_err();
        assert!(format!("{lonely:#}").contains("could not reach rank 0"), "{lonely:#}");
    }
}
