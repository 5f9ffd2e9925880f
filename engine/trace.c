/* trace.c - trace estimators: Hutchinson with PyHessian's stopping rule and
 * Hutch++ (sketch + exact projected trace + Hutchinson on the remainder). */
#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "est_util.h"
#include "names.h"

/* index = cv_probe_dist */
static const char *const dist_names[] = {"rademacher", "gaussian"};

int cv_probe_dist_from_name(const char *name) { return cv_name_index(name, dist_names, 2); }

const char *cv_probe_dist_name(cv_probe_dist d)
{
    return cv_name_or(dist_names, 2, (int)d, "rademacher");
}

void cv_trace_options_default(cv_trace_options *o)
{
    memset(o, 0, sizeof *o);
    o->max_probes = 100;
    o->tol = 1e-3;
    o->distribution = CV_PROBE_RADEMACHER;
}

void cv_trace_result_free(cv_trace_result *r)
{
    if (!r)
        return;
    free(r->samples);
    memset(r, 0, sizeof *r);
}

static int check_options(const cv_linop *op, const cv_trace_options *o, int min_probes,
                         cv_err *e)
{
    if (cv_est_check_op(op, e))
        return -1;
    if (o->max_probes < min_probes)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.max_probes",
                          "max_probes must be >= %d, got %d", min_probes, o->max_probes);
    if (isnan(o->tol))
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.tol", "tol must be a number");
    if (o->distribution != CV_PROBE_RADEMACHER && o->distribution != CV_PROBE_GAUSSIAN)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.distribution",
                          "distribution must be rademacher or gaussian");
    return cv_est_block_check(o->block, e);
}

/* Start of an estimator run: clears out and returns the options in force
 * (opt, or the defaults written to *def), checked against op and min_probes;
 * NULL with e set when they are invalid. */
static const cv_trace_options *trace_begin(const cv_linop *op, const cv_trace_options *opt,
                                           cv_trace_options *def, int min_probes,
                                           cv_trace_result *out, cv_err *e)
{
    opt = CV_EST_OPTIONS(opt, def, cv_trace_options_default);
    memset(out, 0, sizeof *out);
    return check_options(op, opt, min_probes, e) ? NULL : opt;
}

/* State of a Hutchinson run on P A P (P = I - QQ^T, or I without Q). */
typedef struct {
    const cv_linop *op;
    const double *Q;        /* n x q or NULL */
    int q;
    double offset;          /* added to every sample */
    int squared;            /* samples ||A v||^2 (Frobenius) instead of v^T A v */
    cv_est_stats st;
    double prev_mean;
    int stopped;
} hutch_run;

/* V <- (I - QQ^T) V for `cols` columns; tmp holds q x cols. */
static void project_out(const hutch_run *h, int cols, double *V, double *tmp)
{
    int n = (int)h->op->n;
    cblas_dgemm(CblasColMajor, CblasTrans, CblasNoTrans, h->q, cols, n, 1.0, h->Q, n, V, n,
                0.0, tmp, h->q);
    cblas_dgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, n, cols, h->q, -1.0, h->Q, n, tmp,
                h->q, 1.0, V, n);
}

/* Adds one sample; returns non-zero when the stopping rule fires. */
static int add_sample(hutch_run *h, double x, double tol)
{
    cv_est_stats_add(&h->st, x);
    double mean = h->st.mean;
    int stop = tol > 0 && fabs(mean - h->prev_mean) / (fabs(h->prev_mean) + 1e-6) < tol;
    h->prev_mean = mean;
    return stop;
}

/* Runs up to nprobes probes of h (all of them when tol <= 0), filling out
 * (trace, std_err, probes, matvecs, samples). */
static int hutch_probes(hutch_run *h, const cv_trace_options *o, int nprobes, double tol,
                        cv_rng *rng, cv_trace_result *out, cv_err *e)
{
    size_t n = h->op->n;
    int b = cv_est_block_size(n, o->block, nprobes);
    double *V = CV_EST_ALLOC(n * (size_t)b, double, e);
    int need_y = !h->op->quad || h->squared; /* quad needs no product */
    double *Y = V && need_y ? CV_EST_ALLOC(n * (size_t)b, double, e) : NULL;
    int ok = V && (Y || !need_y);
    double *tmp = ok ? CV_EST_ALLOC((size_t)(h->q > 0 ? h->q : 1) * b, double, e) : NULL;
    double *quad = tmp ? CV_EST_ALLOC((size_t)b, double, e) : NULL;
    double *samples = quad && o->return_samples ? CV_EST_ALLOC((size_t)nprobes, double, e)
                                                 : NULL;
    int rc = -1;
    if (!quad || (o->return_samples && !samples))
        goto done;
    int used = 0;
    while (!h->stopped && used < nprobes) {
        int cols = nprobes - used < b ? nprobes - used : b;
        for (int c = 0; c < cols; c++)
            cv_est_probe(rng, o->distribution, V + (size_t)c * n, n);
        if (h->Q)
            project_out(h, cols, V, tmp);
        if (h->squared ? cv_linop_apply(h->op, cols, V, Y, e)
                       : cv_linop_quad(h->op, cols, V, quad, Y, e)) /* v^T A v, no product */
            goto done;
        for (int c = 0; h->squared && c < cols; c++)
            quad[c] = cv_est_dot(n, Y + (size_t)c * n, Y + (size_t)c * n);
        out->matvecs += cols;
        for (int c = 0; c < cols && !h->stopped; c++) {
            double x = h->offset + quad[c];
            if (samples)
                samples[used] = x;
            used++;
            h->stopped = add_sample(h, x, tol);
        }
        cv_progress_partial(h->op->progress, h->st.mean, cv_est_stats_stderr(&h->st), used);
    }
    out->trace = h->st.mean;
    out->std_err = cv_est_stats_stderr(&h->st);
    out->probes = used;
    out->samples = samples;
    samples = NULL;
    rc = 0;
done:
    free(V);
    free(Y);
    free(tmp);
    free(quad);
    free(samples);
    return rc;
}

int cv_trace_hutchinson(const cv_linop *op, const cv_trace_options *opt, cv_rng *rng,
                        cv_trace_result *out, cv_err *e)
{
    cv_trace_options def;
    if (!(opt = trace_begin(op, opt, &def, 1, out, e)))
        return -1;
    cv_progress_plan(op->progress, opt->max_probes);
    hutch_run h = {.op = op};
    if (hutch_probes(&h, opt, opt->max_probes, opt->tol, rng, out, e)) {
        memset(out, 0, sizeof *out);
        return -1;
    }
    return 0;
}

int cv_frobenius_hutchinson(const cv_linop *op, const cv_trace_options *opt, cv_rng *rng,
                            cv_trace_result *out, cv_err *e)
{
    cv_trace_options def;
    if (!(opt = trace_begin(op, opt, &def, 1, out, e)))
        return -1;
    cv_progress_plan(op->progress, opt->max_probes);
    hutch_run h = {.op = op, .squared = 1};
    if (hutch_probes(&h, opt, opt->max_probes, opt->tol, rng, out, e)) {
        memset(out, 0, sizeof *out);
        return -1;
    }
    return 0;
}

/* Overwrites Y (n x s) with an orthonormal basis of its range. */
static int orthonormalize(size_t n, int s, double *Y, cv_err *e)
{
    double *tau = CV_EST_ALLOC((size_t)s, double, e);
    if (!tau)
        return -1;
    lapack_int info = LAPACKE_dgeqrf(LAPACK_COL_MAJOR, (int)n, s, Y, (int)n, tau);
    if (info == 0)
        info = LAPACKE_dorgqr(LAPACK_COL_MAJOR, (int)n, s, s, Y, (int)n, tau);
    free(tau);
    if (info == LAPACK_WORK_MEMORY_ERROR)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "QR workspace: out of memory");
    if (info != 0)
        return cv_err_set(e, CV_EINTERNAL, "lapack_failed", "", "QR failed (info %d)",
                          (int)info);
    return 0;
}

/* Q = orth(A S) for s probe columns S; sets *tq = tr(Q^T A Q).  Q is n x s. */
static int hutchpp_sketch(const cv_linop *op, const cv_trace_options *o, int s, cv_rng *rng,
                          double *Q, double *tq, cv_err *e)
{
    size_t n = op->n;
    int b = cv_est_block_size(n, o->block, s);
    double *S = CV_EST_ALLOC(n * (size_t)s, double, e);
    if (!S)
        return -1;
    int rc = -1;
    for (int c = 0; c < s; c++)
        cv_est_probe(rng, o->distribution, S + (size_t)c * n, n);
    if (cv_est_apply_chunked(op, s, S, Q, b, e) || orthonormalize(n, s, Q, e))
        goto done;
    if (cv_est_apply_chunked(op, s, Q, S, b, e)) /* S <- A Q */
        goto done;
    *tq = 0;
    for (int c = 0; c < s; c++)
        *tq += cv_est_dot(n, Q + (size_t)c * n, S + (size_t)c * n);
    rc = 0;
done:
    free(S);
    return rc;
}

int cv_trace_hutchpp(const cv_linop *op, const cv_trace_options *opt, cv_rng *rng,
                     cv_trace_result *out, cv_err *e)
{
    cv_trace_options def;
    if (!(opt = trace_begin(op, opt, &def, 3, out, e)))
        return -1;
    size_t n = op->n;
    int s = opt->max_probes / 3;
    if ((size_t)s > n)
        s = (int)n;
    int p = (size_t)s == n ? 0 : opt->max_probes - 2 * s;
    cv_progress_plan(op->progress, 2L * s + p);
    double *Q = CV_EST_ALLOC(n * (size_t)s, double, e);
    double tq = 0;
    if (!Q || hutchpp_sketch(op, opt, s, rng, Q, &tq, e))
        goto fail;
    /* No stopping rule: the running mean includes the exact tr(Q^T A Q),
     * which dwarfs the residual's fluctuations and would stop the rule after
     * a couple of probes; Hutch++ spends its whole budget (as curvlinops). */
    hutch_run h = {.op = op, .Q = Q, .q = s, .offset = tq};
    if (p > 0 && hutch_probes(&h, opt, p, 0.0, rng, out, e))
        goto fail;
    if (p == 0)
        out->trace = tq;
    out->sketch = s;
    out->matvecs += 2L * s;
    free(Q);
    return 0;
fail:
    free(Q);
    cv_trace_result_free(out);
    return -1;
}
