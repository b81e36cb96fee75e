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
