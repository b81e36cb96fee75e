//! ferrotune core.
pub mod chat;
pub mod data;
pub mod error;
pub mod generate;
pub mod hub;
pub mod kernels;
pub mod model;
pub mod progress;
pub mod train;

#[cfg(feature = "python")]
mod python;

/// Tokenization allocates many small strings per word from every thread; glibc's malloc
/// serialises them on its arenas (two threads ran no faster than one), mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Training frees and re-allocates tensors of hundreds of MB every step. By default
/// mimalloc 2 decommits freed memory after 10 ms, so every reuse pays for the kernel zeroing
/// fresh pages (40 % of a CPU training step in a perf profile). Here freed memory is purged
/// after a second (mimalloc 3's default) and with `MADV_FREE` instead of a decommit: the OS
/// can still take it back under memory pressure, and otherwise a reuse costs nothing.
/// Measured on the CPU benchmark's forward+backward: 8.5 s → 5.3 s per step.
pub fn tune_allocator_for_training() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // Entries of mimalloc 2's `mi_option_e` (the Rust bindings name only some of them).
    const MI_OPTION_PURGE_DECOMMITS: libmimalloc_sys::mi_option_t = 5;
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    ONCE.call_once(|| unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DECOMMITS, 0);
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000);
    });
}
