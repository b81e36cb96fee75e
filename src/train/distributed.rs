//! Data-parallel training across the processes a launcher started: Azure ML's
//! `PyTorchDistribution`, `torchrun`, or anything else that sets the torch.distributed
//! environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`).
//!
//! ferrotune does not launch or discover processes itself; it joins the group the launcher
//! made. Rank 0 listens on `MASTER_ADDR:MASTER_PORT`; every other rank connects to it and
//! says who it is and which training plan it computed. Rank 0 refuses a group whose plans
//! differ (different data, batch settings or code), so a misconfigured node fails at the
//! start with a message instead of training something else.
//!
//! Collectives are sums, always taken in rank order at rank 0, so a run's numbers do not
//! depend on timing. Two transports:
//! * the rendezvous connections themselves (a star through rank 0): every device, no
//!   extra library; fine for LoRA gradients (tens of MB per optimizer step) within a node;
//! * the backend's own collective — NCCL on GPUs (CUDA builds): gradients stay on the
//!   GPUs. Rank 0's backend makes the NCCL unique id and it is handed out over the
//!   rendezvous connection.
//!
//! Why not torch.distributed's own store and gloo: they live in libtorch, which ferrotune
//! does not depend on; the handshake here is a few messages on one socket.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::kernels::{Backend, Buf};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::progress::Ctx;

const MAGIC: &[u8; 8] = b"FTDP\x00\x00\x00\x01";
const OK: u8 = 0;
const REFUSED: u8 = 1;

/// This process's place in the group, as the launcher described it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorldSpec {
    pub rank: usize,
    pub world_size: usize,
    #[serde(default)]
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// Seconds to wait for the group to form and for any one collective.
    #[serde(default = "d_timeout")]
    pub timeout_s: f64,
}

fn d_timeout() -> f64 {
    1800.0
}

impl WorldSpec {
    pub fn validate(&self) -> Result<()> {
        if self.world_size < 2 || self.rank >= self.world_size {
            return Err(Error::InvalidArgument(format!(
                "distributed: rank {} of world size {} is not a data-parallel group (need world_size >= 2 and 0 <= rank < world_size)",
                self.rank, self.world_size
            )));
        }
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "distributed: timeout_s must be positive, got {}",
                self.timeout_s
            )));
        }
        Ok(())
    }
}

fn lost(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Training(format!(
        "data-parallel: {what} ({e}). Another process of the group failed or was stopped; its own log has the cause"
    ))
}

/// One connection with a deadline on every read and write.
struct Link {
    stream: TcpStream,
    peer: usize,
}

impl Link {
    fn new(stream: TcpStream, peer: usize, timeout: Duration) -> Result<Self> {
        let setup = |e| lost(&format!("setting up the connection to rank {peer}"), e);
        stream.set_nodelay(true).map_err(setup)?;
        stream.set_read_timeout(Some(timeout)).map_err(setup)?;
        stream.set_write_timeout(Some(timeout)).map_err(setup)?;
        Ok(Self { stream, peer })
    }

    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream
            .write_all(bytes)
            .map_err(|e| lost(&format!("sending to rank {}", self.peer), e))
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<()> {
        self.stream
            .read_exact(buf)
            .map_err(|e| lost(&format!("receiving from rank {}", self.peer), e))
    }

    fn send_frame(&mut self, bytes: &[u8]) -> Result<()> {
        self.send(&(bytes.len() as u64).to_le_bytes())?;
        self.send(bytes)
    }

    fn recv_frame(&mut self, limit: usize) -> Result<Vec<u8>> {
        let mut n = [0u8; 8];
        self.recv(&mut n)?;
        let n = u64::from_le_bytes(n) as usize;
        if n > limit {
            return Err(lost(
                &format!("rank {} sent a {n}-byte message", self.peer),
                "not a ferrotune process of this group?",
            ));
        }
        let mut buf = vec![0u8; n];
        self.recv(&mut buf)?;
        Ok(buf)
    }
}

/// Bytes per piece of a pipelined sum: rank 0 adds up and returns piece k while the ranks
/// are still sending piece k+1, so a sum costs about one transfer each way, not two.
const PIECE: usize = 1 << 20;

/// Element types the host transport sums (f32 and f64 only: no padding, every bit pattern
/// valid, so their memory can go on the wire as it is).
trait Elem: Copy + Default + Send + Sync + std::ops::AddAssign {}
impl Elem for f32 {}
impl Elem for f64 {}

// The wire carries the processes' own byte order; every target ferrotune builds for is
// little-endian, and mixing byte orders within one group is not a thing.
const _: () = assert!(cfg!(target_endian = "little"));

fn bytes_of<T: Elem>(xs: &[T]) -> &[u8] {
    // SAFETY: `T` is f32 or f64 (private trait): plain bytes, no padding.
    unsafe { std::slice::from_raw_parts(xs.as_ptr().cast(), std::mem::size_of_val(xs)) }
}

fn bytes_of_mut<T: Elem>(xs: &mut [T]) -> &mut [u8] {
    // SAFETY: as above, and every bit pattern is a valid f32 / f64.
    unsafe { std::slice::from_raw_parts_mut(xs.as_mut_ptr().cast(), std::mem::size_of_val(xs)) }
}

/// The group this process belongs to.
pub struct Group {
    pub rank: usize,
    pub size: usize,
    /// Rank 0: links to ranks 1.., in rank order. Other ranks: the link to rank 0.
    links: Vec<Link>,
    /// Whether the backend sums buffers itself (NCCL on GPUs).
    collective: bool,
}

impl Group {
    /// Joins the group: rank 0 waits for every other rank, checks that all computed the
    /// same `plan`, and answers each. Errors name what differs or who did not come.
    pub fn join(spec: &WorldSpec, plan: &str, be: &dyn Backend, ctx: &Ctx) -> Result<Self> {
        spec.validate()?;
        let timeout = Duration::from_secs_f64(spec.timeout_s);
        let links = if spec.rank == 0 {
            Self::accept_all(spec, plan, timeout, ctx)?
        } else {
            vec![Self::connect(spec, plan, timeout, ctx)?]
        };
        let mut group = Self {
            rank: spec.rank,
            size: spec.world_size,
            links,
            collective: false,
        };
        group.collective = group.join_collective(be)?;
        ctx.message(&format!(
            "data-parallel: rank {} of {} joined ({} transport)",
            group.rank,
            group.size,
            group.transport()
        ));
        Ok(group)
    }

    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Sets up the backend's own collective (NCCL) when rank 0's backend offers one: its id
    /// travels over the rendezvous links. Every rank runs the same build, so all agree.
    fn join_collective(&mut self, be: &dyn Backend) -> Result<bool> {
        let id = if self.is_root() {
            let id = be.collective_id()?;
            let frame = id.clone().unwrap_or_default();
            for link in &mut self.links {
                link.send_frame(&frame)?;
            }
            id
        } else {
            let frame = self.links[0].recv_frame(4096)?;
            (!frame.is_empty()).then_some(frame)
        };
        match id {
            Some(id) => {
                be.collective_join(&id, self.rank, self.size)
                    .map_err(|e| lost("the GPU collective (NCCL) could not be set up", e))?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// "nccl" or "tcp".
    pub fn transport(&self) -> &'static str {
        if self.collective {
            return "nccl";
        }
        "tcp"
    }

    fn accept_all(spec: &WorldSpec, plan: &str, timeout: Duration, ctx: &Ctx) -> Result<Vec<Link>> {
        let addr = ("0.0.0.0", spec.master_port);
        let listener = TcpListener::bind(addr).map_err(|e| {
            Error::Training(format!(
                "data-parallel: rank 0 cannot listen on port {} (MASTER_PORT): {e}. Another job on this node may hold it; pick another MASTER_PORT",
                spec.master_port
            ))
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| lost("listening", e))?;
        let deadline = Instant::now() + timeout;
        let mut slots: Vec<Option<Link>> = (1..spec.world_size).map(|_| None).collect();
        let mut problems: Vec<String> = Vec::new();
        while slots.iter().any(Option::is_none) {
            ctx.cancel().check()?;
            match listener.accept() {
                Ok((stream, from)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(|e| lost("accepting", e))?;
                    let mut link = Link::new(stream, usize::MAX, timeout)?;
                    match Self::read_hello(&mut link, spec, plan) {
                        Ok(rank) if slots[rank - 1].is_none() => {
                            link.peer = rank;
                            slots[rank - 1] = Some(link);
                        }
                        Ok(rank) => {
                            let why = format!(
                                "two processes say they are rank {rank} (the second from {from})"
                            );
                            let _ = refuse(&mut link, &why);
                            problems.push(why);
                        }
                        Err(why) => {
                            let _ = refuse(&mut link, &why);
                            problems.push(format!("{from}: {why}"));
                        }
                    }
                    if !problems.is_empty() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> = slots
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| s.is_none())
                            .map(|(i, _)| (i + 1).to_string())
                            .collect();
                        problems.push(format!(
                            "rank(s) {} did not join within {:.0} s",
                            missing.join(", "),
                            spec.timeout_s
                        ));
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(lost("accepting a connection", e)),
            }
        }
        if !problems.is_empty() {
            for link in slots.iter_mut().flatten() {
                let _ = refuse(link, &problems.join("; "));
            }
            return Err(Error::Training(format!(
                "data-parallel: the group of {} did not form: {}",
                spec.world_size,
                problems.join("; ")
            )));
        }
        let mut links: Vec<Link> = slots.into_iter().map(|s| s.expect("all joined")).collect();
        for link in &mut links {
            link.send(&[OK])?;
        }
        Ok(links)
    }

    /// Reads a worker's hello; the error is the reason to refuse it.
    fn read_hello(
        link: &mut Link,
        spec: &WorldSpec,
        plan: &str,
    ) -> std::result::Result<usize, String> {
        let mut head = [0u8; 24];
        link.recv(&mut head).map_err(|e| e.to_string())?;
        if &head[..8] != MAGIC {
            return Err("not a ferrotune process of this version (bad greeting)".into());
        }
        let rank = u64::from_le_bytes(head[8..16].try_into().expect("8")) as usize;
        let size = u64::from_le_bytes(head[16..24].try_into().expect("8")) as usize;
        let theirs = link.recv_frame(1 << 20).map_err(|e| e.to_string())?;
        if size != spec.world_size {
            return Err(format!(
                "rank {rank} was started with WORLD_SIZE={size}, rank 0 with {}",
                spec.world_size
            ));
        }
        if rank == 0 || rank >= size {
            return Err(format!("a process says it is rank {rank} of {size}"));
        }
        let theirs = String::from_utf8_lossy(&theirs);
        if theirs != plan {
            return Err(format!(
                "rank {rank} computed a different training plan than rank 0 ({}). Every process needs the same data files, parameters and ferrotune version",
                plan_difference(&theirs, plan, rank)
            ));
        }
        Ok(rank)
    }

    fn connect(spec: &WorldSpec, plan: &str, timeout: Duration, ctx: &Ctx) -> Result<Link> {
        let deadline = Instant::now() + timeout;
        let target = format!("{}:{}", spec.master_addr, spec.master_port);
        let stream = loop {
            ctx.cancel().check()?;
            let attempt = target
                .to_socket_addrs()
                .and_then(|mut a| {
                    a.next().ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
                    })
                })
                .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(5)));
            match attempt {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(Error::Training(format!(
                        "data-parallel: rank {} could not reach rank 0 at {target} (MASTER_ADDR:MASTER_PORT) within {:.0} s: {e}",
                        spec.rank, spec.timeout_s
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let mut link = Link::new(stream, 0, timeout)?;
        let mut head = Vec::with_capacity(24);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&(spec.rank as u64).to_le_bytes());
        head.extend_from_slice(&(spec.world_size as u64).to_le_bytes());
        link.send(&head)?;
        link.send_frame(plan.as_bytes())?;
        let mut answer = [0u8; 1];
        link.recv(&mut answer)?;
        if answer[0] != OK {
            let why = link.recv_frame(1 << 20)?;
            return Err(Error::Training(format!(
                "data-parallel: rank 0 refused rank {}: {}",
                spec.rank,
                String::from_utf8_lossy(&why)
            )));
        }
        Ok(link)
    }

    /// Element-wise sum over the group, in place, in rank order (host transport).
    fn host_sum<T: Elem>(&mut self, xs: &mut [T]) -> Result<()> {
        let per = (PIECE / std::mem::size_of::<T>()).max(1);
        if self.is_root() {
            let mut buf = vec![T::default(); per.min(xs.len())];
            for piece in xs.chunks_mut(per) {
                let theirs = &mut buf[..piece.len()];
                for link in &mut self.links {
                    link.recv(bytes_of_mut(theirs))?;
                    for (x, y) in piece.iter_mut().zip(theirs.iter()) {
                        *x += *y;
                    }
                }
                for link in &mut self.links {
                    link.send(bytes_of(piece))?;
                }
            }
            return Ok(());
        }
        let link = &mut self.links[0];
        if xs.len() <= per {
            // One piece: rank 0 answers only after it has all of it; no overlap to gain.
            link.send(bytes_of(xs))?;
            return link.recv(bytes_of_mut(xs));
        }
        // Send on a second thread while the sums of the first pieces come back.
        let mut writer = link
            .stream
            .try_clone()
            .map_err(|e| lost("setting up a sum", e))?;
        let outgoing = xs.to_vec();
        std::thread::scope(|scope| {
            let sender = scope.spawn(move || writer.write_all(bytes_of(&outgoing)));
            let got = xs
                .chunks_mut(per)
                .try_for_each(|piece| link.recv(bytes_of_mut(piece)));
            if got.is_err() {
                // Unblock the sender (rank 0 is gone or stuck); the receive error is the story.
                let _ = link.stream.shutdown(std::net::Shutdown::Both);
            }
            let sent = sender.join().expect("the sending thread does not panic");
            got?;
            sent.map_err(|e| lost("sending to rank 0", e))
        })
    }

    /// Sum of small host-side statistics (counts, loss sums, flags).
    pub fn sum_f64(&mut self, xs: &mut [f64]) -> Result<()> {
        self.host_sum(xs)
    }

    /// Sum of float32 values over the group (through the host links).
    pub fn sum_f32(&mut self, xs: &mut [f32]) -> Result<()> {
        self.host_sum(xs)
    }

    /// Sum of a float32 buffer over the group, in place: on the devices with the backend's
    /// collective (NCCL), else through the host.
    pub fn sum_buf(&mut self, be: &dyn Backend, b: &mut Buf) -> Result<()> {
        if self.collective {
            return be.collective_sum(b);
        }
        let mut host = be.to_f32(b)?;
        self.host_sum(&mut host)?;
        *b = be.upload_f32(&host, b.dt())?;
        Ok(())
    }

    /// Every rank waits here until all arrive (and rank 0 has finished what it did first).
    pub fn barrier(&mut self) -> Result<()> {
        self.sum_f64(&mut [0.0])
    }
}

/// "learning_rate: 0.005 on rank 1, 0.01 on rank 0; ..." for two plans (JSON objects,
/// compared one level into nested objects).
fn plan_difference(theirs: &str, ours: &str, rank: usize) -> String {
    use serde_json::Value;
    let parse = |s: &str| serde_json::from_str::<Value>(s).unwrap_or(Value::Null);
    let (a, b) = (parse(theirs), parse(ours));
    let mut out = Vec::new();
    let walk = |prefix: &str, a: &Value, b: &Value, out: &mut Vec<String>| {
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
            return;
        };
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            let (x, y) = (
                a.get(k).unwrap_or(&Value::Null),
                b.get(k).unwrap_or(&Value::Null),
            );
            if x != y && !(x.is_object() && y.is_object()) {
                out.push(format!("{prefix}{k}: {x} on rank {rank}, {y} on rank 0"));
            }
        }
    };
    walk("", &a, &b, &mut out);
    if let (Some(x), Some(y)) = (a.get("plan"), b.get("plan")) {
        walk("", x, y, &mut out);
    }
    if out.is_empty() {
        "the versions differ".into()
    } else {
        out.join("; ")
    }
}

fn refuse(link: &mut Link, why: &str) -> Result<()> {
    link.send(&[REFUSED])?;
    link.send_frame(why.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rank: usize, size: usize, port: u16) -> WorldSpec {
        WorldSpec {
            rank,
            world_size: size,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            timeout_s: 20.0,
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Runs `f(rank)` on `size` threads, each joining the group with its plan.
    fn group_of<T: Send + 'static>(
        size: usize,
        plans: Vec<&'static str>,
        f: impl Fn(Result<Group>) -> T + Send + Sync + Copy + 'static,
    ) -> Vec<T> {
        let port = free_port();
        let handles: Vec<_> = (0..size)
            .map(|r| {
                let plan = plans[r];
                std::thread::spawn(move || {
                    f(Group::join(
                        &spec(r, size, port),
                        plan,
                        &crate::kernels::cpu::Cpu,
                        &Ctx::silent(),
                    ))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn sums_are_the_same_on_every_rank_and_in_rank_order() {
        let out = group_of(3, vec!["{}"; 3], |g| {
            let mut g = g.unwrap();
            let r = g.rank as f32;
            let mut t = [r, 1.0, 2.0 * r, 1e-8];
            g.sum_f32(&mut t).unwrap();
            let s = vec![vec![t[0], t[1]], vec![t[2], t[3]]];
            let mut stats = [g.rank as f64, 0.5];
            g.sum_f64(&mut stats).unwrap();
            g.barrier().unwrap();
            (s, stats)
        });
        for (s, stats) in out {
            assert_eq!(s, vec![vec![3.0, 3.0], vec![6.0, 3e-8]]);
            assert_eq!(stats, [3.0, 1.5]);
        }
    }

    #[test]
    fn a_sum_of_many_pieces_is_exact_and_in_rank_order() {
        // 2.4 MB: several pieces, sent while earlier pieces come back.
        let n = 600_001;
        let value = |r: usize, i: usize| ((i * 7 + r * 13) % 1000) as f32 * 0.001 + r as f32;
        let out = group_of(3, vec!["{}"; 3], move |g| {
            let mut g = g.unwrap();
            let xs: Vec<f32> = (0..n).map(|i| value(g.rank, i)).collect();
            let mut xs = xs;
            g.sum_f32(&mut xs).unwrap();
            xs
        });
        let want: Vec<f32> = (0..n)
            .map(|i| value(0, i) + value(1, i) + value(2, i))
            .collect();
        for got in out {
            assert!(got == want, "sums differ from (r0 + r1) + r2");
        }
    }

    #[test]
    fn a_different_plan_is_refused_on_both_sides_with_the_difference() {
        let out = group_of(
            2,
            vec![
                r#"{"lr":0.1,"plan":{"rows":4}}"#,
                r#"{"lr":0.1,"plan":{"rows":5}}"#,
            ],
            |g| g.err().map(|e| e.to_string()),
        );
        let want = "rows: 5 on rank 1, 4 on rank 0";
        assert!(out[0].as_deref().unwrap().contains(want), "{out:?}");
        assert!(
            out[1].as_deref().unwrap().contains("rank 0 refused rank 1"),
            "{out:?}"
        );
        assert!(out[1].as_deref().unwrap().contains(want), "{out:?}");
    }

    #[test]
    fn a_lost_peer_is_an_error_not_a_hang() {
        let out = group_of(2, vec!["{}"; 2], |g| {
            let mut g = g.unwrap();
            if g.rank == 1 {
                drop(g); // gone before the first sum
                return None;
            }
            Some(g.sum_f64(&mut [1.0]).unwrap_err().to_string())
        });
        let msg = out[0].as_ref().unwrap();
        assert!(
            msg.contains("receiving from rank 1") && msg.contains("failed or was stopped"),
            "{msg}"
        );
    }

    #[test]
    fn a_bad_world_is_refused_before_any_network() {
        let mut s = spec(2, 2, 1);
        assert!(s.validate().is_err());
        s = spec(0, 1, 1);
        assert!(s.validate().is_err());
        s = spec(0, 2, 1);
        s.timeout_s = f64::NAN;
        assert!(s.validate().is_err());
    }
}
