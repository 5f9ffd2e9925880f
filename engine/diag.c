/* diag.c - diagonal estimators: Hutchinson (mean of (A v) .* v with per-entry
 * standard errors) and the exact diagonal from identity columns. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "est_util.h"

void cv_diag_options_default(cv_diag_options *o)
{
    memset(o, 0, sizeof *o);
    o->max_probes = 100;
    o->distribution = CV_PROBE_RADEMACHER;
}

void cv_diag_result_free(cv_diag_result *r)
{
    if (!r)
        return;
    free(r->diag);
    free(r->std_err);
    memset(r, 0, sizeof *r);
}

/* Allocates out->diag and out->std_err (zeroed). */
static int alloc_result(size_t n, cv_diag_result *out, cv_err *e)
{
    out->n = n;
    out->diag = CV_EST_ALLOC(n, double, e);
    out->std_err = out->diag ? CV_EST_ALLOC(n, double, e) : NULL;
    if (!out->std_err) {
        cv_diag_result_free(out);
        return -1;
    }
    return 0;
}

/* Welford update of per-entry mean (in mean) and M2 (in m2) with x = y .* v. */
static void add_probe(size_t n, long count, const double *v, const double *y, double *mean,
                      double *m2)
{
    for (size_t i = 0; i < n; i++) {
        double x = y[i] * v[i];
        double d = x - mean[i];
        mean[i] += d / (double)count;
        m2[i] += d * (x - mean[i]);
    }
}

/* Turns M2 into standard errors of the mean over count samples. */
static void finish_stderr(size_t n, long count, double *m2)
{
    for (size_t i = 0; i < n; i++) {
        double var = count > 1 ? m2[i] / (double)(count - 1) : 0.0;
        m2[i] = count > 1 ? sqrt((var > 0 ? var : 0) / (double)count) : 0.0;
    }
}

/* Start of an estimator run: clears out and returns the options in force
 * (opt, or the defaults written to *def) after checking op and
 * options.block; NULL with e set when they are invalid. */
static const cv_diag_options *diag_begin(const cv_linop *op, const cv_diag_options *opt,
                                         cv_diag_options *def, cv_diag_result *out, cv_err *e)
{
    opt = CV_EST_OPTIONS(opt, def, cv_diag_options_default);
    memset(out, 0, sizeof *out);
    if (cv_est_check_op(op, e) || cv_est_block_check(opt->block, e))
        return NULL;
    return opt;
}

int cv_diag_hutchinson(const cv_linop *op, const cv_diag_options *opt, cv_rng *rng,
                       cv_diag_result *out, cv_err *e)
{
    cv_diag_options def;
    if (!(opt = diag_begin(op, opt, &def, out, e)))
        return -1;
    if (opt->max_probes < 1)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.max_probes",
                          "max_probes must be >= 1, got %d", opt->max_probes);
    if (opt->distribution != CV_PROBE_RADEMACHER && opt->distribution != CV_PROBE_GAUSSIAN)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.distribution",
                          "distribution must be rademacher or gaussian");
    size_t n = op->n;
    int b = cv_est_block_size(n, opt->block, opt->max_probes);
    cv_progress_plan(op->progress, opt->max_probes);
    double *V = CV_EST_ALLOC(n * (size_t)b, double, e);
    double *Y = V ? CV_EST_ALLOC(n * (size_t)b, double, e) : NULL;
    if (!Y || alloc_result(n, out, e))
        goto fail;
    long count = 0;
    while (count < opt->max_probes) {
        int cols = opt->max_probes - count < b ? (int)(opt->max_probes - count) : b;
        for (int c = 0; c < cols; c++)
            cv_est_probe(rng, opt->distribution, V + (size_t)c * n, n);
        if (cv_linop_apply(op, cols, V, Y, e))
            goto fail;
        out->matvecs += cols;
        for (int c = 0; c < cols; c++)
            add_probe(n, ++count, V + (size_t)c * n, Y + (size_t)c * n, out->diag,
                      out->std_err);
    }
    finish_stderr(n, count, out->std_err);
    out->probes = (int)count;
    free(V);
    free(Y);
    return 0;
fail:
    free(V);
    free(Y);
    cv_diag_result_free(out);
    return -1;
}

int cv_diag_exact(const cv_linop *op, const cv_diag_options *opt, cv_diag_result *out,
                  cv_err *e)
{
    cv_diag_options def;
    if (!(opt = diag_begin(op, opt, &def, out, e)))
        return -1;
    size_t n = op->n;
    int b = cv_est_block_size(n, opt->block, (long)n);
    cv_progress_plan(op->progress, (long)n);
    double *X = CV_EST_ALLOC(n * (size_t)b, double, e);
    double *Y = X ? CV_EST_ALLOC(n * (size_t)b, double, e) : NULL;
    if (!Y || alloc_result(n, out, e))
        goto fail;
    for (size_t j0 = 0; j0 < n; j0 += (size_t)b) {
        int cols = n - j0 < (size_t)b ? (int)(n - j0) : b;
        for (int c = 0; c < cols; c++)
            X[j0 + c + (size_t)c * n] = 1.0;
        if (cv_linop_apply(op, cols, X, Y, e))
            goto fail;
        out->matvecs += cols;
        for (int c = 0; c < cols; c++) {
            out->diag[j0 + c] = Y[j0 + c + (size_t)c * n];
            X[j0 + c + (size_t)c * n] = 0.0;
        }
    }
    free(X);
    free(Y);
    return 0;
fail:
    free(X);
    free(Y);
    cv_diag_result_free(out);
    return -1;
}
