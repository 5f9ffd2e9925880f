/* parallel.h - fork-join loops for the memory-bound kernels that run between
 * BLAS calls (unfolding, layout copies, elementwise maps).
 *
 * cv_parallel_for splits [0, n) into contiguous ranges and runs fn on each,
 * the first range on the calling thread and the others on short-lived
 * pthreads, then joins.  The thread count follows OpenBLAS's thread count
 * (the job's core budget: openblas_set_num_threads), capped at
 * CV_PARALLEL_MAX_THREADS, and no range is shorter than `grain`; with one
 * thread, or too little work, fn(ctx, 0, n) runs inline.  fn must write
 * disjoint outputs for disjoint ranges (no reductions), so results do not
 * depend on the thread count.  If a thread cannot be started its range runs
 * on the caller: the loop never fails. */
#ifndef CV_PARALLEL_H
#define CV_PARALLEL_H

#include <stddef.h>

#define CV_PARALLEL_MAX_THREADS 16

typedef void (*cv_range_fn)(void *ctx, size_t lo, size_t hi);

void cv_parallel_for(size_t n, size_t grain, cv_range_fn fn, void *ctx);

/* The number of threads cv_parallel_for would use for n items of `grain`. */
int cv_parallel_threads(size_t n, size_t grain);

/* Below this many floats of work a range is not worth a thread. */
#define CV_PARALLEL_MIN_FLOATS ((size_t)1 << 15)

/* The grain for items of floats_per_item floats each: ranges of at least
 * CV_PARALLEL_MIN_FLOATS floats (one item when an item alone is that big). */
size_t cv_parallel_grain(size_t floats_per_item);

#endif
