//! Heap accounting for memory work: the binary's allocator adds to these counters, and
//! `PREFTUNE_MEM_TRACE=1` makes the trainer print them per phase. Only a binary with a counting
//! allocator turns this on ([`enable_from_env`]); library users and tests never trace.
use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

/// A global allocator that forwards to `A` and adds every size to the counters below
/// (`#[global_allocator] static A: Counting<mimalloc::MiMalloc> = Counting(mimalloc::MiMalloc);`).
pub struct Counting<A>(pub A);

// SAFETY: every call is forwarded to `A` unchanged; the counters only observe sizes.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for this method, passed on unchanged.
        let p = unsafe { self.0.alloc(l) };
        if !p.is_null() {
            on_alloc(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for this method, passed on unchanged.
        let p = unsafe { self.0.alloc_zeroed(l) };
        if !p.is_null() {
            on_alloc(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        on_free(l.size());
        // SAFETY: the caller's contract for this method, passed on unchanged.
        unsafe { self.0.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: the caller's contract for this method, passed on unchanged.
        let q = unsafe { self.0.realloc(p, l, new) };
        // On failure the old block stays allocated and the counts stay as they were.
        if !q.is_null() {
            on_free(l.size());
            on_alloc(new);
        }
        q
    }
}

/// Counting and tracing, off unless [`enable_from_env`] found `PREFTUNE_MEM_TRACE=1`: counting
/// costs shared atomics on every allocation of every thread.
static ON: AtomicBool = AtomicBool::new(false);

/// Turns counting and tracing on when `PREFTUNE_MEM_TRACE=1`; the binary calls it first thing,
/// before the counts matter.
pub fn enable_from_env() {
    let on = std::env::var("PREFTUNE_MEM_TRACE").is_ok_and(|v| v == "1");
    ON.store(on, Relaxed);
}

/// Bytes allocated and not yet freed.
pub static LIVE: AtomicUsize = AtomicUsize::new(0);
/// The most `LIVE` has been since the last [`take_peak`].
pub static PEAK: AtomicUsize = AtomicUsize::new(0);

pub fn on_alloc(bytes: usize) {
    if !ON.load(Relaxed) {
        return;
    }
    let now = LIVE.fetch_add(bytes, Relaxed) + bytes;
    if now > PEAK.load(Relaxed) {
        PEAK.fetch_max(now, Relaxed);
    }
}

pub fn on_free(bytes: usize) {
    if ON.load(Relaxed) {
        LIVE.fetch_sub(bytes, Relaxed);
    }
}

/// The peak since the last call, in MiB; the peak restarts from the current live bytes.
pub fn take_peak() -> f64 {
    let p = PEAK.swap(LIVE.load(Relaxed), Relaxed);
    p as f64 / (1 << 20) as f64
}

pub fn live_mib() -> f64 {
    LIVE.load(Relaxed) as f64 / (1 << 20) as f64
}

/// Whether per-phase heap lines are on ([`enable_from_env`]).
pub fn tracing() -> bool {
    ON.load(Relaxed)
}

/// The process's resident set in MiB (Linux; 0 elsewhere): heap plus what the allocator keeps.
pub fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |pages| pages * 4096.0 / (1 << 20) as f64)
}

/// Prints `live`, the peak since the previous trace line and the RSS, when tracing.
pub fn trace(what: &str) {
    if tracing() {
        let peak = take_peak();
        eprintln!(
            "mem {what}: live {:.0} MiB, peak since last {peak:.0} MiB, rss {:.0} MiB",
            live_mib(),
            rss_mib()
        );
    }
}
