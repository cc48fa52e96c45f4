//! Keeping the agent's resident memory close to what it holds.
//!
//! At 100,000 pods a full compile allocates and frees tens of megabytes (the previous
//! ruleset, the resolver's per-namespace indexes, the watchers' list pages), and glibc's
//! allocator keeps freed memory mapped: in one arena per thread that allocated (up to eight
//! per core), and in the middle of its heaps where `free` never returns it. Measured on the
//! 10× model, that was a third of the agent's RSS. Two calls to glibc fix it, and no crate
//! offers them (allocator crates replace malloc instead, a larger change for the same end):
//! - [`limit_arenas`] before any thread starts: two arenas serve the agent's few busy threads
//!   (the sync task, the watchers, the HTTP answers) without contention worth measuring;
//! - [`release_free_memory`] after a full sync: `malloc_trim` gives every whole free page
//!   back to the kernel, from all arenas.
//!
//! On other C libraries both are no-ops.

/// Cap the number of malloc arenas. Call before the async runtime starts its threads: the
/// cap applies to arenas created from then on.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; M_ARENA_MAX takes any positive count.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Return the allocator's free pages to the kernel.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes the allocator's own locks; 0 keeps no extra pad.
    unsafe {
        libc::malloc_trim(0);
    }
}
