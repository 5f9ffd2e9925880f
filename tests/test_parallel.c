/* test_parallel.c - cv_parallel_for: every index exactly once, in ranges
 * that really run on several threads when OpenBLAS has several, inline
 * with one thread or too little work. */
#include "testutil.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "engine/parallel.h"

void openblas_set_num_threads(int);

#define N 1001

typedef struct {
    atomic_int hits[N];
    pthread_t caller;
    atomic_int off_caller; /* ranges run on another thread */
    atomic_int calls;
} visit;

static void visit_range(void *p, size_t lo, size_t hi)
{
    visit *v = p;
    atomic_fetch_add(&v->calls, 1);
    if (!pthread_equal(pthread_self(), v->caller))
        atomic_fetch_add(&v->off_caller, 1);
    for (size_t i = lo; i < hi; i++)
        atomic_fetch_add(&v->hits[i], 1);
}

static visit *run(size_t n, size_t grain)
{
    visit *v = calloc(1, sizeof *v);
    ck_assert_ptr_nonnull(v);
    v->caller = pthread_self();
    cv_parallel_for(n, grain, visit_range, v);
    for (size_t i = 0; i < N; i++)
        ck_assert_int_eq(atomic_load(&v->hits[i]), i < n ? 1 : 0);
    return v;
}

START_TEST(every_index_once_on_several_threads)
{
    openblas_set_num_threads(4);
    ck_assert_int_eq(cv_parallel_threads(N, 10), 4);
    visit *v = run(N, 10);
    ck_assert_int_eq(atomic_load(&v->calls), 4);
    ck_assert_int_eq(atomic_load(&v->off_caller), 3);
    free(v);
    /* grain limits the threads: 1001 items of grain 400 -> 2 ranges */
    ck_assert_int_eq(cv_parallel_threads(N, 400), 2);
    v = run(N, 400);
    ck_assert_int_eq(atomic_load(&v->calls), 2);
    free(v);
    v = run(3, 1); /* fewer items than threads */
    ck_assert_int_eq(atomic_load(&v->calls), 3);
    free(v);
}
END_TEST

START_TEST(inline_with_one_thread_or_little_work)
{
    openblas_set_num_threads(1);
    visit *v = run(N, 1);
    ck_assert_int_eq(atomic_load(&v->calls), 1);
    ck_assert_int_eq(atomic_load(&v->off_caller), 0);
    free(v);
    openblas_set_num_threads(4);
    v = run(N, 5000); /* less than one grain */
    ck_assert_int_eq(atomic_load(&v->calls), 1);
    ck_assert_int_eq(atomic_load(&v->off_caller), 0);
    free(v);
    v = run(0, 1);
    ck_assert_int_eq(atomic_load(&v->calls), 1);
    free(v);
}
END_TEST

static Suite *parallel_suite(void)
{
    Suite *s = suite_create("parallel");
    TCase *t = tcase_create("core");
    tcase_add_test(t, every_index_once_on_several_threads);
    tcase_add_test(t, inline_with_one_thread_or_little_work);
    suite_add_tcase(s, t);
    return s;
}

int main(void) { return tu_main(parallel_suite); }
