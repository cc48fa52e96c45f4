//! Keeping the agent's resident memory close to what it holds.
//!
//! The binary allocates with mimalloc (`main.rs` sets it as the global allocator). glibc's
//! malloc was measured slower and fatter for what this program does: the CLI decodes a dump
//! of a large cluster into millions of small values on every core (57 MB of YAML at 100,000
//! pods: 5.5–6.5 s with glibc, most of it in malloc and in frees across threads, against
//! 2.6 s with mimalloc), and the agent frees its whole previous ruleset on every full
//! compile, which glibc kept mapped in per-thread arenas (a third of the agent's RSS at
//! 100,000 pods).
//!
//! mimalloc by default keeps freed memory committed for a while and commits its arenas
//! eagerly, which costs resident memory for speed the agent does not need (it compiles at
//! most a few times a second). [`configure_for_agent`] makes it give freed pages back at
//! once and commit on demand; [`release_free_memory`] after a full sync returns what the
//! threads still cache. The figures are in docs/benchmarks.md ("Where the agent's memory
//! goes").

use libmimalloc_sys as mi;

/// `mi_option_arena_eager_commit` and `mi_option_purge_delay` in the `mi_option_e` enum of
/// the mimalloc 2.x that libmimalloc-sys builds (include/mimalloc.h); the crate names only
/// some of the options.
const ARENA_EAGER_COMMIT: mi::mi_option_t = 4;
const PURGE_DELAY: mi::mi_option_t = 15;

/// Trade a little allocation speed for resident memory. Call first thing in the agent: the
/// options apply to memory allocated from then on.
pub fn configure_for_agent() {
    // SAFETY: mi_option_set only stores a tunable; both options accept these values.
    unsafe {
        mi::mi_option_set(PURGE_DELAY, 0);
        mi::mi_option_set(ARENA_EAGER_COMMIT, 0);
    }
}

/// Return the allocator's free pages to the kernel (after a full sync freed the previous
/// ruleset and the resolver's indexes).
pub fn release_free_memory() {
    // SAFETY: mi_collect takes no pointers; `force` also frees the calling thread's caches.
    unsafe {
        mi::mi_collect(true);
    }
}
