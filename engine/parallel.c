/* parallel.c - fork-join loops on short-lived pthreads (see parallel.h). */
#include "parallel.h"

#include <pthread.h>

int openblas_get_num_threads(void);

typedef struct {
    cv_range_fn fn;
    void *ctx;
    size_t lo, hi;
} range_task;

static void *run_range(void *p)
{
    range_task *t = p;
    t->fn(t->ctx, t->lo, t->hi);
    return NULL;
}

int cv_parallel_threads(size_t n, size_t grain)
{
    int nt = openblas_get_num_threads();
    if (nt > CV_PARALLEL_MAX_THREADS)
        nt = CV_PARALLEL_MAX_THREADS;
    if (grain < 1)
        grain = 1;
    if ((size_t)nt > n / grain)
        nt = (int)(n / grain);
    return nt < 1 ? 1 : nt;
}

size_t cv_parallel_grain(size_t floats_per_item)
{
    if (floats_per_item >= CV_PARALLEL_MIN_FLOATS)
        return 1;
    return CV_PARALLEL_MIN_FLOATS / (floats_per_item ? floats_per_item : 1) + 1;
}

void cv_parallel_for(size_t n, size_t grain, cv_range_fn fn, void *ctx)
{
    int nt = cv_parallel_threads(n, grain);
    if (nt <= 1) {
        fn(ctx, 0, n);
        return;
    }
    range_task task[CV_PARALLEL_MAX_THREADS];
    pthread_t tid[CV_PARALLEL_MAX_THREADS];
    int started[CV_PARALLEL_MAX_THREADS] = {0};
    for (int t = 0; t < nt; t++) {
        task[t] = (range_task){fn, ctx, n * (size_t)t / (size_t)nt,
                               n * (size_t)(t + 1) / (size_t)nt};
        if (t > 0)
            started[t] = pthread_create(&tid[t], NULL, run_range, &task[t]) == 0;
    }
    run_range(&task[0]);
    for (int t = 1; t < nt; t++) {
        if (started[t])
            pthread_join(tid[t], NULL);
        else
            run_range(&task[t]);
    }
}
