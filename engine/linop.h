/* linop.h - a symmetric linear operator as estimators see it, plus progress.
 *
 * Estimators (trace, diag, eigen, density, solve) never see a network: they
 * see n, and a function that multiplies an n x k block of vectors.  Blocks are
 * column-major with each column contiguous: column j of X is X + j*n.
 * Every apply counts k matvecs towards the progress record and the estimator
 * checks the cancel flag before each apply.
 */
#ifndef CV_LINOP_H
#define CV_LINOP_H

#include <stddef.h>
#include <stdatomic.h>

#include "err.h"

typedef struct cv_progress {
    atomic_long done;           /* matvecs done */
    atomic_long planned;        /* matvecs planned (an upper bound; may grow) */
    /* Within the product running now: micro-batches done of micro_total (0: one
     * micro-batch; the engine sets them). */
    atomic_long micro_done, micro_total;
    atomic_int *cancel;         /* non-zero: stop at the next check (may be NULL) */
    double deadline;            /* cv_now_s() time after which the job stops; 0 = none */
    int collective;             /* a data-parallel job's: cancel and deadline are sampled
                                 * only at the ranks' agreements (engine/comm.h), so
                                 * cv_progress_check is 0 between them */
    /* Latest running estimate of a long estimator (Hutchinson: the trace so
     * far and its standard error; Lanczos: the leading wanted Ritz value),
     * published with cv_progress_partial, read with cv_progress_get_partial. */
    _Atomic double partial_value, partial_stderr;
    atomic_long partial_samples;   /* probes/steps behind it; 0: none yet */
    /* Called after each apply (from the computing thread); may be NULL. */
    void (*on_progress)(struct cv_progress *p, void *user);
    void *user;
} cv_progress;

typedef struct cv_linop {
    size_t n;
    /* Y = A X for k columns; returns 0 or -1 with e filled. */
    int (*apply)(void *ctx, int k, const double *X, double *Y, cv_err *e);
    /* Optional: q_j = x_j^T A x_j for k columns, cheaper than apply + dot
     * (NULL: cv_linop_quad multiplies and dots). */
    int (*quad)(void *ctx, int k, const double *X, double *q, cv_err *e);
    void *ctx;
    cv_progress *progress;      /* may be NULL */
} cv_linop;

/* Applies op to k columns: checks cancel/deadline first (CV_ECANCELLED /
 * CV_ETIMEOUT), then calls apply and counts k matvecs. */
int cv_linop_apply(const cv_linop *op, int k, const double *X, double *Y, cv_err *e);
/* q_j = x_j^T A x_j for k columns, with op->quad when the operator has one,
 * else apply into Y (n x k scratch) and dot; checks and counts as apply. */
int cv_linop_quad(const cv_linop *op, int k, const double *X, double *q, double *Y,
                  cv_err *e);
/* Non-zero if the job was cancelled or ran past its deadline (fills e);
 * always 0 for a collective record (see cv_progress_check_now). */
int cv_progress_check(cv_progress *p, cv_err *e);
/* The same check whether or not p is collective (engine/comm.c's agreement). */
int cv_progress_check_now(cv_progress *p, cv_err *e);
void cv_progress_plan(cv_progress *p, long more_matvecs);
void cv_progress_init(cv_progress *p);
void cv_progress_partial(cv_progress *p, double value, double std_err, long samples);
/* Returns the samples behind the partial estimate (0: none) and fills value/std_err. */
long cv_progress_get_partial(cv_progress *p, double *value, double *std_err);

/* Wall-clock seconds (CLOCK_MONOTONIC). */
double cv_now_s(void);

/* A dense symmetric n x n matrix (column-major) as a cv_linop, for tests and
 * for the exact paths; the matrix is borrowed. */
typedef struct {
    size_t n;
    const double *a;
} cv_dense_op;
void cv_linop_from_dense(cv_linop *op, cv_dense_op *ctx, size_t n, const double *a);

#endif
