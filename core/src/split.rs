//! How one job is cut into units of work for threads that claim them from a
//! shared counter (the native worker's `evaluate_parallel`, the benchmark's
//! two-thread figures). The core has no threads; this is only the plan.
//!
//! Equal chunks leave a tail: when one thread gets less of its core (other
//! programs share it), the other finishes its last chunk and waits for the
//! slow one's, up to a whole chunk per job. Guided self-scheduling (chunks
//! shrinking with the work left) keeps the early chunks large, so a call's
//! fixed cost (packing the weights) is paid rarely, and the last ones small,
//! so the threads end close together.

use alloc::vec::Vec;
use core::ops::Range;

/// Chunks over `0..n` for `workers` threads: each is the work left divided
/// by `2 * workers`, rounded up to a multiple of `align` and at least `min`
/// (the last one takes what remains). In order, contiguous, covering
/// `0..n`; every chunk but the last starts and ends on a multiple of
/// `align`, so antithetic pairs (`align` = 2) are never cut. One worker
/// gets one chunk: splitting would only add calls.
///
/// `align` and `min` of 0 count as 1.
pub fn guided(n: usize, workers: usize, min: usize, align: usize) -> Vec<Range<usize>> {
    let align = align.max(1);
    let min = min.max(1).next_multiple_of(align);
    if workers <= 1 {
        return if n == 0 { Vec::new() } else { alloc::vec![0..n] };
    }
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let left = n - start;
        let size = left.div_ceil(2 * workers).next_multiple_of(align).max(min);
        let end = start + size.min(left);
        out.push(start..end);
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan's invariants for many shapes: contiguous cover of `0..n`,
    /// aligned cuts, no chunk below `min` but the last, never growing.
    #[test]
    fn chunks_cover_in_order_aligned_and_shrink() {
        for n in 0..600 {
            for workers in 1..5 {
                for (min, align) in [(1, 1), (4, 2), (16, 2), (64, 1), (3, 2)] {
                    let plan = guided(n, workers, min, align);
                    let mut at = 0;
                    for (i, c) in plan.iter().enumerate() {
                        assert_eq!(c.start, at, "n={n} w={workers}: gap or overlap");
                        assert!(c.end > c.start, "empty chunk");
                        let last = i + 1 == plan.len();
                        if !last {
                            assert_eq!(c.end % align, 0, "cut inside an aligned group");
                            assert!(c.len() >= min, "chunk below min");
                        }
                        if i > 0 {
                            assert!(c.len() <= plan[i - 1].len(), "chunk grew: {plan:?}");
                        }
                        at = c.end;
                    }
                    assert_eq!(at, n, "not covered: {plan:?}");
                    if workers == 1 {
                        assert!(plan.len() <= 1);
                    }
                }
            }
        }
    }

    /// RW-256's population on two threads: a few large chunks first, pairs
    /// of members at the end, and far fewer calls than 16-member chunks.
    #[test]
    fn rw256_population_on_two_threads() {
        let sizes: Vec<usize> = guided(256, 2, 4, 2).iter().map(Range::len).collect();
        assert_eq!(sizes[0], 64);
        assert_eq!(*sizes.last().unwrap(), 4);
        assert!(sizes.len() < 16, "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 256);
    }
}
