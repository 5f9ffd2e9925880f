/* linop.c - applying cv_linops with progress, cancellation and deadlines. */
#include "linop.h"

#include <cblas.h>
#include <time.h>

double cv_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void cv_progress_init(cv_progress *p)
{
    atomic_init(&p->done, 0);
    atomic_init(&p->planned, 0);
    atomic_init(&p->micro_done, 0);
    atomic_init(&p->micro_total, 0);
    p->cancel = NULL;
    p->deadline = 0;
    p->collective = 0;
    atomic_init(&p->partial_value, 0.0);
    atomic_init(&p->partial_stderr, 0.0);
    atomic_init(&p->partial_samples, 0);
    p->on_progress = NULL;
    p->user = NULL;
}

int cv_progress_check(cv_progress *p, cv_err *e)
{
    return p && !p->collective ? cv_progress_check_now(p, e) : 0;
}

int cv_progress_check_now(cv_progress *p, cv_err *e)
{
    if (!p)
        return 0;
    if (p->cancel && atomic_load(p->cancel))
        return cv_err_set(e, CV_ECANCELLED, "cancelled", "", "job was cancelled"), 1;
    if (p->deadline > 0 && cv_now_s() > p->deadline)
        return cv_err_set(e, CV_ETIMEOUT, "job_timeout", "",
                          "job exceeded its time limit"), 1;
    return 0;
}

void cv_progress_partial(cv_progress *p, double value, double std_err, long samples)
{
    if (!p)
        return;
    atomic_store(&p->partial_value, value);
    atomic_store(&p->partial_stderr, std_err);
    atomic_store(&p->partial_samples, samples);
}

long cv_progress_get_partial(cv_progress *p, double *value, double *std_err)
{
    long n = atomic_load(&p->partial_samples);
    *value = atomic_load(&p->partial_value);
    *std_err = atomic_load(&p->partial_stderr);
    return n;
}

void cv_progress_plan(cv_progress *p, long more)
{
    if (p)
        atomic_fetch_add(&p->planned, more);
}

/* Counts k matvecs done and calls the progress hook. */
static void count_matvecs(const cv_linop *op, int k)
{
    if (op->progress) {
        long done = atomic_fetch_add(&op->progress->done, k) + k;
        if (done > atomic_load(&op->progress->planned))
            atomic_store(&op->progress->planned, done);
        if (op->progress->on_progress)
            op->progress->on_progress(op->progress, op->progress->user);
    }
}

int cv_linop_apply(const cv_linop *op, int k, const double *X, double *Y, cv_err *e)
{
    if (cv_progress_check(op->progress, e))
        return -1;
    if (op->apply(op->ctx, k, X, Y, e))
        return -1;
    count_matvecs(op, k);
    return 0;
}

int cv_linop_quad(const cv_linop *op, int k, const double *X, double *q, double *Y,
                  cv_err *e)
{
    if (!op->quad) {
        if (cv_linop_apply(op, k, X, Y, e))
            return -1;
        for (int j = 0; j < k; j++)
            q[j] = cblas_ddot((int)op->n, X + (size_t)j * op->n, 1, Y + (size_t)j * op->n, 1);
        return 0;
    }
    if (cv_progress_check(op->progress, e) || op->quad(op->ctx, k, X, q, e))
        return -1;
    count_matvecs(op, k);
    return 0;
}

static int dense_apply(void *ctx, int k, const double *X, double *Y, cv_err *e)
{
    (void)e;
    const cv_dense_op *d = ctx;
    cblas_dgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, (int)d->n, k, (int)d->n, 1.0,
                d->a, (int)d->n, X, (int)d->n, 0.0, Y, (int)d->n);
    return 0;
}

void cv_linop_from_dense(cv_linop *op, cv_dense_op *ctx, size_t n, const double *a)
{
    ctx->n = n;
    ctx->a = a;
    op->n = n;
    op->apply = dense_apply;
    op->quad = NULL;
    op->ctx = ctx;
    op->progress = NULL;
}
