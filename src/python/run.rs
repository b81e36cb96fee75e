//! The one helper every long call goes through.
//!
//! The work runs on a worker thread with the GIL released. The calling thread
//! waits in short slices: between slices it takes the GIL to forward progress events to
//! the Python renderer and to check for signals. A Ctrl-C sets the core's cancel flag (the
//! worker's loops poll it and stop, removing temporary files), then `KeyboardInterrupt` is
//! raised once the worker has stopped. Any exception a Python signal handler raises works
//! the same way (`finetune` installs one for SIGTERM). A panic in the worker becomes a
//! `FerrotuneError`, never a crash.

use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use super::errors::to_pyerr;
use crate::error::Result;
use crate::progress::{Cancel, Ctx, Progress};

enum Event {
    Start(u64, String, Option<u64>, String),
    Advance(u64, u64),
    Finish(u64),
    Message(String),
    Metrics(String),
    Text(u64, String),
}

/// Progress sink that queues events for the calling thread.
struct Channel(Mutex<Sender<Event>>);

impl Channel {
    fn send(&self, e: Event) {
        if let Ok(tx) = self.0.lock() {
            let _ = tx.send(e);
        }
    }
}

impl Progress for Channel {
    fn start(&self, id: u64, name: &str, total: Option<u64>, unit: &str) {
        self.send(Event::Start(id, name.to_string(), total, unit.to_string()));
    }
    fn advance(&self, id: u64, n: u64) {
        self.send(Event::Advance(id, n));
    }
    fn finish(&self, id: u64) {
        self.send(Event::Finish(id));
    }
    fn message(&self, text: &str) {
        self.send(Event::Message(text.to_string()));
    }
    fn metrics(&self, json: &str) {
        self.send(Event::Metrics(json.to_string()));
    }
    fn text(&self, id: u64, delta: &str) {
        self.send(Event::Text(id, delta.to_string()));
    }
}

/// Calls `progress(kind, id, name, total, n, unit)` for each event; advances of one task are
/// merged so Python sees at most one call per task per slice.
fn deliver(py: Python<'_>, cb: &Option<PyObject>, events: Vec<Event>) -> PyResult<()> {
    let Some(cb) = cb else { return Ok(()) };
    let mut pending: Vec<(u64, u64)> = Vec::new();
    let flush = |pending: &mut Vec<(u64, u64)>| -> PyResult<()> {
        for (id, n) in pending.drain(..) {
            cb.call1(py, ("advance", id, "", None::<u64>, n, ""))?;
        }
        Ok(())
    };
    for e in events {
        match e {
            Event::Advance(id, n) => match pending.iter_mut().find(|(i, _)| *i == id) {
                Some(p) => p.1 += n,
                None => pending.push((id, n)),
            },
            Event::Start(id, name, total, unit) => {
                flush(&mut pending)?;
                cb.call1(py, ("start", id, name, total, 0u64, unit))?;
            }
            Event::Finish(id) => {
                flush(&mut pending)?;
                cb.call1(py, ("finish", id, "", None::<u64>, 0u64, ""))?;
            }
            Event::Message(text) => {
                flush(&mut pending)?;
                cb.call1(py, ("message", 0u64, text, None::<u64>, 0u64, ""))?;
            }
            Event::Metrics(json) => {
                flush(&mut pending)?;
                cb.call1(py, ("metrics", 0u64, json, None::<u64>, 0u64, ""))?;
            }
            Event::Text(id, delta) => {
                flush(&mut pending)?;
                cb.call1(py, ("text", id, delta, None::<u64>, 0u64, ""))?;
            }
        }
    }
    flush(&mut pending)
}

/// How long a cancelled worker gets to stop by itself before the caller stops waiting.
/// A worker blocked in a network read only notices the flag when the read returns; it is
/// then left to finish in the background (its temporary files are removed on the way
/// out, and nothing is renamed to a final name once the flag is set).
const CANCEL_GRACE: Duration = Duration::from_millis(1500);

/// Runs `work` with the GIL released; see the module docs.
pub fn run_blocking<T, F>(py: Python<'_>, progress: Option<PyObject>, work: F) -> PyResult<T>
where
    T: Send + 'static,
    F: FnOnce(&Ctx) -> Result<T> + Send + 'static,
{
    run_blocking_with_grace(py, progress, CANCEL_GRACE, work)
}

/// [`run_blocking`] that waits up to `grace` for a cancelled worker to stop (training
/// saves a checkpoint on Ctrl-C, which takes longer than the default allows).
pub fn run_blocking_with_grace<T, F>(
    py: Python<'_>,
    progress: Option<PyObject>,
    grace: Duration,
    work: F,
) -> PyResult<T>
where
    T: Send + 'static,
    F: FnOnce(&Ctx) -> Result<T> + Send + 'static,
{
    let (tx, rx) = channel::<Event>();
    let (done_tx, done_rx) = channel::<std::thread::Result<Result<T>>>();
    let cancel = Cancel::new();
    let ctx = Ctx::new(Arc::new(Channel(Mutex::new(tx))), cancel.clone());
    let slice = Duration::from_millis(100);
    std::thread::Builder::new()
        .name("ferrotune-worker".into())
        .spawn(move || {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&ctx)));
            let _ = done_tx.send(out);
        })
        .map_err(|e| {
            pyo3::exceptions::PyRuntimeError::new_err(format!("cannot start a worker thread: {e}"))
        })?;
    // Receivers are Send but not Sync; the mutexes let the GIL-free closure borrow them.
    let rx = Mutex::new(rx);
    let done_rx = Mutex::new(done_rx);
    let mut py_error: Option<PyErr> = None;
    let mut renderer_failed = false;
    let mut cancelled_at: Option<Instant> = None;
    let outcome = loop {
        let (events, finished) = py.allow_threads(|| {
            let mut evs = Vec::new();
            let rx = rx.lock().expect("only this thread locks it");
            let until = Instant::now() + slice;
            loop {
                let now = Instant::now();
                if now >= until {
                    break;
                }
                match rx.recv_timeout(until - now) {
                    Ok(e) => evs.push(e),
                    Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
                }
                if evs.len() > 10_000 {
                    break;
                }
            }
            let finished = done_rx
                .lock()
                .expect("only this thread locks it")
                .try_recv()
                .ok();
            (evs, finished)
        });
        // After a Ctrl-C the worker may still report (training announces the checkpoint it
        // saves): keep rendering, unless the renderer itself is what failed.
        if !renderer_failed {
            if let Err(e) = deliver(py, &progress, events) {
                // The renderer failed, or a signal handler raised while it ran (Ctrl-C's
                // KeyboardInterrupt, or another BaseException such as finetune's SIGTERM
                // stop): stop the work; only a renderer error ends the rendering too.
                cancel.cancel();
                renderer_failed = e.is_instance_of::<pyo3::exceptions::PyException>(py);
                py_error.get_or_insert(e);
            }
        }
        if py_error.is_none() {
            if let Err(e) = py.check_signals() {
                cancel.cancel();
                py_error = Some(e);
            }
        }
        if let Some(f) = finished {
            break Some(f);
        }
        if py_error.is_some() {
            let t = *cancelled_at.get_or_insert_with(Instant::now);
            if t.elapsed() >= grace {
                break None;
            }
        }
    };
    let rest: Vec<Event> = rx
        .lock()
        .expect("only this thread locks it")
        .try_iter()
        .collect();
    if let Some(e) = py_error {
        if !renderer_failed {
            let _ = deliver(py, &progress, rest);
        }
        return Err(e);
    }
    deliver(py, &progress, rest)?;
    match outcome.expect("no error means the worker finished") {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(to_pyerr(py, e)),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let cls = py
                .import("ferrotune.exceptions")
                .and_then(|m| m.getattr("FerrotuneError"))?;
            Err(PyErr::from_value(cls.call1((format!(
                "internal error in ferrotune (please report it): {what}"
            ),))?))
        }
    }
}
