//! Process-wide allocator settings for tensor work on the CPU.
//!
//! candle allocates a fresh buffer for every op's output, and glibc by default hands buffers
//! larger than a few megabytes to `mmap` and gives them back to the kernel on free (and trims
//! the heap top as it shrinks). A forward pass of a GPT-2-small batch then spends ~10% of its
//! time in page faults zeroing the same memory again on every call. [`keep_freed_buffers`]
//! makes glibc serve large buffers from the heap and keep up to [`TRIM_THRESHOLD`] of free heap
//! top, so the next pass reuses the pages (`benches/compare_forward.sh`; BENCHMARKS.md).
//! The price is that the process keeps its peak heap for reuse rather than returning it.

/// Free heap above the highest live buffer that glibc keeps instead of returning it.
pub const TRIM_THRESHOLD: i32 = 1 << 30;

/// Serves large allocations from the heap and keeps freed pages for reuse. Call once at the
/// start of a process (the binary and the benchmarks do); a no-op off glibc.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation thresholds; it is safe to call at any
    // time and returns 0 when a value is rejected, which leaves the default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}
