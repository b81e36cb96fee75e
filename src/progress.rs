//! Progress reporting and cancellation, the two things every long call carries.
//!
//! Core code reports through [`Progress`] and polls [`Cancel`]; it never knows who renders
//! the bars. The Python bindings forward events to a Python renderer (tqdm in notebooks,
//! plain lines in logs, nothing on request); Rust callers can use [`Silent`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};

/// Receiver of progress events. Implementations must be cheap and thread-safe: `advance`
/// is called from worker threads, often.
pub trait Progress: Send + Sync {
    /// A new task starts: `id` is unique within the call, `total` is in `unit`s when known.
    fn start(&self, id: u64, name: &str, total: Option<u64>, unit: &str);
    /// `n` more units of task `id` are done.
    fn advance(&self, id: u64, n: u64);
    /// Task `id` is finished (successfully or not).
    fn finish(&self, id: u64);
    /// A one-line note for the user (e.g. "footer-only read of train_sft").
    fn message(&self, text: &str);
    /// Training metrics as a JSON object (`{"step": 10, "loss": 1.23, ...}`).
    fn metrics(&self, _json: &str) {}
    /// Generated text as it forms: `delta` continues stream `id` (a conversation).
    fn text(&self, _id: u64, _delta: &str) {}
}

/// A [`Progress`] that drops everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Progress for Silent {
    fn start(&self, _: u64, _: &str, _: Option<u64>, _: &str) {}
    fn advance(&self, _: u64, _: u64) {}
    fn finish(&self, _: u64) {}
    fn message(&self, _: &str) {}
}

/// A shared cancellation flag. Set from outside (Ctrl-C), polled by long loops.
#[derive(Debug, Default, Clone)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }
    /// Asks every holder of this flag to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
    /// `Err(Error::Cancelled)` once cancellation was requested.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// What a long call carries: where progress goes and the flag that stops it.
#[derive(Clone)]
pub struct Ctx {
    progress: Arc<dyn Progress>,
    cancel: Cancel,
    next_id: Arc<AtomicU64>,
}

impl Default for Ctx {
    fn default() -> Self {
        Self::new(Arc::new(Silent), Cancel::new())
    }
}

impl Ctx {
    pub fn new(progress: Arc<dyn Progress>, cancel: Cancel) -> Self {
        Self {
            progress,
            cancel,
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }
    /// A context that reports nothing and is never cancelled.
    pub fn silent() -> Self {
        Self::default()
    }
    pub fn cancel(&self) -> &Cancel {
        &self.cancel
    }
    /// Shorthand for `self.cancel().check()`.
    pub fn check(&self) -> Result<()> {
        self.cancel.check()
    }
    /// Sends training metrics (a JSON object) to whoever renders progress.
    pub fn metrics(&self, json: &str) {
        self.progress.metrics(json);
    }

    pub fn message(&self, text: &str) {
        self.progress.message(text);
    }
    /// Streams generated text (`delta` continues stream `id`).
    pub fn text(&self, id: u64, delta: &str) {
        self.progress.text(id, delta);
    }
    /// Starts a task; it finishes when the returned guard drops.
    pub fn task(&self, name: &str, total: Option<u64>, unit: &str) -> Task {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.progress.start(id, name, total, unit);
        Task {
            id,
            progress: Arc::clone(&self.progress),
        }
    }
}

/// One running task; finishes on drop.
pub struct Task {
    id: u64,
    progress: Arc<dyn Progress>,
}

impl Task {
    pub fn advance(&self, n: u64) {
        if n > 0 {
            self.progress.advance(self.id, n);
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.progress.finish(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Record(Mutex<Vec<String>>);
    impl Progress for Record {
        fn start(&self, id: u64, name: &str, total: Option<u64>, unit: &str) {
            self.0
                .lock()
                .unwrap()
                .push(format!("start {id} {name} {total:?} {unit}"));
        }
        fn advance(&self, id: u64, n: u64) {
            self.0.lock().unwrap().push(format!("advance {id} {n}"));
        }
        fn finish(&self, id: u64) {
            self.0.lock().unwrap().push(format!("finish {id}"));
        }
        fn message(&self, text: &str) {
            self.0.lock().unwrap().push(format!("msg {text}"));
        }
    }

    #[test]
    fn task_events_in_order_and_finish_on_drop() {
        let rec = Arc::new(Record::default());
        let ctx = Ctx::new(rec.clone(), Cancel::new());
        {
            let t = ctx.task("dl", Some(10), "B");
            t.advance(4);
            t.advance(0);
            t.advance(6);
        }
        ctx.message("hi");
        let got = rec.0.lock().unwrap().clone();
        assert_eq!(
            got,
            vec![
                "start 1 dl Some(10) B",
                "advance 1 4",
                "advance 1 6",
                "finish 1",
                "msg hi"
            ]
        );
    }

    #[test]
    fn cancel_is_shared() {
        let ctx = Ctx::silent();
        let other = ctx.clone();
        assert!(ctx.check().is_ok());
        other.cancel().cancel();
        assert!(matches!(ctx.check(), Err(Error::Cancelled)));
    }
}
