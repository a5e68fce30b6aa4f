//! The server's memory allocator and how it gives memory back: jemalloc, whose background
//! threads return the pages no thread uses to the OS, whichever threads are busy or asleep;
//! and transparent huge pages off, so that the kernel does not fill those pages back in.

use tracing::warn;

// jemalloc rather than mimalloc: mimalloc frees lazily and only on the owning thread, so
// memory freed by one runtime worker for another that then sleeps stays resident until that
// worker wakes; jemalloc returns freed pages to arenas any thread can purge, and purges them
// on its own threads. What an idle thread keeps is its thread cache, bounded per thread
// whatever the load (turning it off costs 62-76% more instructions per call). The figures
// are in docs/performance.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once as it starts (jemalloc(3), "TUNING"; the symbol carries the
/// `_rjem_` prefix tikv-jemalloc-sys builds jemalloc with):
///
/// - `background_thread:true`: jemalloc's own threads purge unused pages of every arena on
///   the decay schedule below, so no request path and no runtime worker pays for it, and
///   a sleeping worker does not hold its pages.
/// - `dirty_decay_ms:1000`: pages freed go back to the OS over about a second (the default,
///   10 s, would hold a load's peak ten times as long); pages reused within it cost nothing.
/// - `muzzy_decay_ms:0`: purged pages are unmapped at once (MADV_DONTNEED) rather than only
///   marked (MADV_FREE), which the kernel counts in RSS until it runs short of memory.
#[allow(unsafe_code, non_upper_case_globals)]
// SAFETY: jemalloc reads this as a `const char *` to a NUL-terminated string, once, at
// its first allocation; a reference to a byte array is that pointer, and it is never
// written.
#[unsafe(export_name = "_rjem_malloc_conf")]
static malloc_conf: &[u8; 60] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// Turns transparent huge pages off for this process: khugepaged would otherwise refill
/// what jemalloc hands back, 2 MiB at a time wherever one 4 KiB page of the range is still
/// in use. Call once, before the runtime starts.
pub fn tune() {
    #[cfg(target_os = "linux")]
    if let Err(err) = nix::sys::prctl::set_thp_disable(true) {
        warn!(error = %err, "could not turn transparent huge pages off: memory freed after a load may return");
    }
}
