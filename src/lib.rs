//! ferrotune core.
pub mod chat;
pub mod data;
pub mod error;
pub mod hub;
pub mod model;
pub mod progress;
pub mod train;

#[cfg(feature = "python")]
mod python;

/// Tokenization allocates many small strings per word from every thread; glibc's malloc
/// serialises them on its arenas (two threads ran no faster than one), mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Training frees and re-allocates tensors of hundreds of MB every step. With mimalloc 2's
/// default 10 ms purge delay they go back to the OS between uses and every reuse pays for
/// the kernel zeroing fresh pages (a third of a CPU training step in a perf profile).
/// A one-second delay (mimalloc 3's default) keeps them across a step.
pub fn tune_allocator_for_training() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // mi_option_purge_delay is entry 15 of mimalloc 2's `mi_option_e` (the Rust bindings
    // name only some entries).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    ONCE.call_once(|| unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000) });
}
