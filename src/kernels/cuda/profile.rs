//! The GPU profiler: the device's time per kernel and per GEMM shape over a stretch of work
//! (`_core._gpu_profile("start")` … `("stop")`; `bench/gpu_train.py` profiles a few
//! training steps after its timed ones and `scripts/gpu_check.sh` reports the top of it).
//!
//! Why our own: the GPU machines this project is measured on have no Nsight Systems, and
//! `ncu` replays each kernel in isolation. Here every launch, GEMM and copy is bracketed by two
//! marks in the device's queue (CUDA events on a GPU, the host clock on the emulator), so
//! the time between them is the device's time on that call, in the order and the state of a
//! real step. The gaps between one call's end and the next one's start are where the device
//! waited for the host: the device span minus the busy time says how launch-bound a step is.
//! Cost while on: two event records per call (a few µs of host time); off: one atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use super::runtime::{Gemm, Launch, Mark, Runtime};
use crate::error::{Error, Result};

static ON: AtomicBool = AtomicBool::new(false);
static SESSION: Mutex<Option<Session>> = Mutex::new(None);
/// Calls kept unread before the profiler waits for the device and reads them (bounds the
/// number of live events).
const MAX_PENDING: usize = 8192;

/// One profiled call, its marks not read yet.
struct Pending {
    rt: Arc<dyn Runtime>,
    label: String,
    flops: f64,
    start: Mark,
    end: Mark,
}

impl Pending {
    /// Gives the marks back unread.
    fn release(self) {
        self.rt.release(self.start);
        self.rt.release(self.end);
    }
}

#[derive(Default)]
struct Total {
    calls: u64,
    seconds: f64,
    flops: f64,
}

struct Session {
    host_start: Instant,
    /// The first call's start mark, and its runtime (one GPU per process): the device span
    /// is measured from it.
    first: Option<(Arc<dyn Runtime>, Mark)>,
    device_span: f64,
    pending: Vec<Pending>,
    totals: HashMap<String, Total>,
}

/// One row of a profile: a kernel, a GEMM shape or a kind of copy.
#[derive(Debug, Serialize)]
pub struct Entry {
    pub name: String,
    pub calls: u64,
    pub seconds: f64,
    /// Floating-point operations of the GEMM rows (2 m n k per call), 0 for the others.
    pub flops: f64,
}

/// What the device did between [`start`] and [`stop`].
#[derive(Debug, Serialize)]
pub struct Profile {
    /// [`Runtime::describe`] of the profiled device ("" when nothing ran).
    pub device: String,
    /// Host seconds from start to stop.
    pub host_seconds: f64,
    /// Device seconds from the first profiled call's start to the last one's end.
    pub device_span_seconds: f64,
    /// The sum of the calls' device seconds (≤ the span: the rest is the device waiting).
    pub busy_seconds: f64,
    pub calls: u64,
    /// Rows by device time, longest first.
    pub entries: Vec<Entry>,
}

/// Starts profiling every GPU backend of the process (again from zero if it was on).
pub fn start() {
    let mut s = SESSION.lock().expect("profiler");
    if let Some(old) = s.take() {
        old.discard();
    }
    *s = Some(Session {
        host_start: Instant::now(),
        first: None,
        device_span: 0.0,
        pending: Vec::new(),
        totals: HashMap::new(),
    });
    ON.store(true, Ordering::SeqCst);
}

/// Stops profiling: waits for the profiled work and returns what it cost.
pub fn stop() -> Result<Profile> {
    ON.store(false, Ordering::SeqCst);
    let mut guard = SESSION.lock().expect("profiler");
    let Some(mut s) = guard.take() else {
        return Err(Error::InvalidArgument(
            "the GPU profiler is not running: start it first".into(),
        ));
    };
    let read = s.read_pending(true);
    let host_seconds = s.host_start.elapsed().as_secs_f64();
    let device = s
        .first
        .as_ref()
        .map(|(rt, _)| rt.describe())
        .unwrap_or_default();
    let (device_span, totals) = (s.device_span, std::mem::take(&mut s.totals));
    s.discard();
    read?;
    let mut entries: Vec<Entry> = totals
        .into_iter()
        .map(|(name, t)| Entry {
            name,
            calls: t.calls,
            seconds: t.seconds,
            flops: t.flops,
        })
        .collect();
    entries.sort_by(|a, b| b.seconds.total_cmp(&a.seconds).then(a.name.cmp(&b.name)));
    Ok(Profile {
        device,
        host_seconds,
        device_span_seconds: device_span,
        busy_seconds: entries.iter().map(|e| e.seconds).sum(),
        calls: entries.iter().map(|e| e.calls).sum(),
        entries,
    })
}

impl Session {
    /// Reads the pending calls' marks into the totals (after waiting for their devices
    /// when `wait`; otherwise the caller has just synchronised them) and releases them.
    fn read_pending(&mut self, wait: bool) -> Result<()> {
        let pending = std::mem::take(&mut self.pending);
        if wait {
            let mut synced: Vec<*const ()> = Vec::new();
            for p in &pending {
                let key = Arc::as_ptr(&p.rt) as *const ();
                if !synced.contains(&key) {
                    p.rt.sync()?;
                    synced.push(key);
                }
            }
        }
        let mut result = Ok(());
        for p in pending {
            if result.is_ok() {
                result = self.add(&p);
            }
            p.release();
        }
        result
    }

    fn add(&mut self, p: &Pending) -> Result<()> {
        let seconds = p.rt.elapsed(&p.start, &p.end)?;
        let t = self.totals.entry(p.label.clone()).or_default();
        t.calls += 1;
        t.seconds += seconds;
        t.flops += p.flops;
        if let Some((rt, first)) = &self.first {
            if Arc::ptr_eq(rt, &p.rt) {
                self.device_span = self.device_span.max(rt.elapsed(first, &p.end)?);
            }
        }
        Ok(())
    }

    /// Releases every mark without reading it.
    fn discard(mut self) {
        for p in std::mem::take(&mut self.pending) {
            p.release();
        }
        if let Some((rt, m)) = self.first.take() {
            rt.release(m);
        }
    }
}

/// A runtime whose calls the profiler times while it is on.
pub struct Profiled(Arc<dyn Runtime>);

impl Profiled {
    /// `rt`, timed by the profiler while it is on.
    pub fn wrap(rt: Arc<dyn Runtime>) -> Arc<dyn Runtime> {
        Arc::new(Profiled(rt))
    }

    fn timed<T>(
        &self,
        label: impl FnOnce() -> String,
        flops: f64,
        call: impl FnOnce(&dyn Runtime) -> Result<T>,
    ) -> Result<T> {
        if !ON.load(Ordering::Relaxed) {
            return call(self.0.as_ref());
        }
        {
            // the device span starts at the first profiled call: a mark of its own, kept
            // until the end
            let mut guard = SESSION.lock().expect("profiler");
            if let Some(s) = guard.as_mut().filter(|s| s.first.is_none()) {
                s.first = Some((Arc::clone(&self.0), self.0.mark()?));
            }
        }
        let start = self.0.mark()?;
        let out = call(self.0.as_ref());
        let end = match self.0.mark() {
            Ok(m) => m,
            Err(e) => {
                self.0.release(start);
                return Err(e);
            }
        };
        let mut guard = SESSION.lock().expect("profiler");
        let Some(s) = guard.as_mut() else {
            // stopped meanwhile
            self.0.release(start);
            self.0.release(end);
            return out;
        };
        s.pending.push(Pending {
            rt: Arc::clone(&self.0),
            label: label(),
            flops,
            start,
            end,
        });
        if s.pending.len() >= MAX_PENDING {
            s.read_pending(true)?;
        }
        out
    }

    /// After a synchronisation: every pending call of the profiler is done, read them.
    fn after_sync(&self) -> Result<()> {
        if !ON.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut guard = SESSION.lock().expect("profiler");
        match guard.as_mut() {
            Some(s) if s.pending.iter().all(|p| Arc::ptr_eq(&p.rt, &self.0)) => {
                s.read_pending(false)
            }
            _ => Ok(()),
        }
    }
}

/// "gemm NT 9216x4096x3072 bf16" (cuBLAS's column-major terms; "→f32" when C is f32 and
/// A, B are not).
fn gemm_label(g: &Gemm) -> String {
    let op = |t: bool| if t { 'T' } else { 'N' };
    let out = if g.c_dt != g.ab {
        format!("→{}", g.c_dt.kernel_suffix())
    } else {
        String::new()
    };
    format!(
        "gemm {}{} {}x{}x{} {}{}",
        op(g.trans_a),
        op(g.trans_b),
        g.m,
        g.n,
        g.k,
        g.ab.kernel_suffix(),
        out
    )
}

impl Runtime for Profiled {
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn capability(&self) -> (u32, u32) {
        self.0.capability()
    }
    fn alloc(&self, bytes: usize) -> Result<u64> {
        self.0.alloc(bytes)
    }
    unsafe fn free(&self, ptr: u64) {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.0.free(ptr) }
    }
    fn upload(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.timed(|| "copy to the GPU".into(), 0.0, |rt| rt.upload(dst, src))
    }
    fn download(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.0.download(src, dst)?;
        self.after_sync()
    }
    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.timed(
            || "copy on the GPU".into(),
            0.0,
            |rt| rt.copy(dst, src, bytes),
        )
    }
    fn memset_zero(&self, dst: u64, bytes: usize) -> Result<()> {
        self.timed(|| "memset".into(), 0.0, |rt| rt.memset_zero(dst, bytes))
    }
    fn launch(&self, name: &str, cfg: Launch, params: &[u8]) -> Result<()> {
        self.timed(|| name.to_string(), 0.0, |rt| rt.launch(name, cfg, params))
    }
    fn gemm(&self, g: &Gemm) -> Result<()> {
        let flops = 2.0 * g.m as f64 * g.n as f64 * g.k as f64;
        self.timed(|| gemm_label(g), flops, |rt| rt.gemm(g))
    }
    fn sync(&self) -> Result<()> {
        self.0.sync()?;
        self.after_sync()
    }
    fn memory(&self) -> Result<(usize, usize)> {
        self.0.memory()
    }
    fn mark(&self) -> Result<Mark> {
        self.0.mark()
    }
    fn elapsed(&self, a: &Mark, b: &Mark) -> Result<f64> {
        self.0.elapsed(a, b)
    }
    fn release(&self, m: Mark) {
        self.0.release(m)
    }
}
