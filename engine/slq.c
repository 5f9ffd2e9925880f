/* slq.c - spectral density by stochastic Lanczos quadrature (PyHessian
 * density() conventions): quadrature nodes/weights per run and their
 * Gaussian-broadened, normalized average on a grid. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "est_util.h"

void cv_density_options_default(cv_density_options *o)
{
    memset(o, 0, sizeof *o);
    o->lanczos_steps = 100;
    o->runs = 1;
    o->grid_points = 10000;
    o->sigma2 = 1e-5;
    o->margin = 0.01;
}

void cv_density_result_free(cv_density_result *r)
{
    if (!r)
        return;
    free(r->nodes);
    free(r->weights);
    free(r->grid);
    free(r->values);
    memset(r, 0, sizeof *r);
}

static int density_check(const cv_linop *op, const cv_density_options *o, cv_err *e)
{
    if (cv_est_check_op(op, e))
        return -1;
    if (o->lanczos_steps < 1)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.lanczos_steps",
                          "lanczos_steps must be >= 1, got %d", o->lanczos_steps);
    if (o->runs < 1)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.runs",
                          "runs must be >= 1, got %d", o->runs);
    if (o->grid_points < 2)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.grid_points",
                          "grid_points must be >= 2, got %d", o->grid_points);
    if (!(o->sigma2 > 0) || !isfinite(o->sigma2))
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.sigma2",
                          "sigma2 must be a finite number > 0");
    if (!(o->margin >= 0) || !isfinite(o->margin))
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.margin",
                          "margin must be a finite number >= 0");
    return 0;
}

/* One run: Lanczos from a normalized Rademacher vector; nodes = eig(T),
 * weights = squared first components of T's eigenvectors. */
static int slq_run(const cv_linop *op, int m, cv_rng *rng, double *v0, double *S,
                   double *nodes, double *weights, long *matvecs, long *reorths, cv_err *e)
{
    cv_rng_rademacher(rng, v0, op->n);
    /* Partial reorthogonalization (from 2^16 on, where the basis is float32
     * anyway): semi-orthogonality keeps T's nodes and weights at float32
     * precision without a pass over the basis on every step. */
    cv_lanczos_options lo = {.steps = m, .keep_basis = 0, .partial_reorth = 1};
    cv_lanczos_result lr;
    if (cv_est_lanczos(op, v0, &lo, rng, 0, &lr, e))
        return -1;
    *matvecs += lr.matvecs;
    *reorths += lr.reorths;
    int rc = 0;
    if (lr.steps != m)
        rc = cv_err_set(e, CV_EINTERNAL, "lanczos_breakdown", "",
                        "Lanczos stopped after %d of %d steps", lr.steps, m);
    else
        rc = cv_est_tridiag_eig(m, lr.alpha, lr.beta, nodes, S, e);
    for (int i = 0; rc == 0 && i < m; i++)
        weights[i] = S[(size_t)i * m] * S[(size_t)i * m];
    cv_lanczos_result_free(&lr);
    return rc;
}

/* Grid over the mean per-run extremes plus margin; Gaussian broadening;
 * average over runs; normalization sum * spacing = 1. */
static void broaden(const cv_density_options *o, cv_density_result *r)
{
    int m = r->steps, G = r->grid_points;
    double lo = 0, hi = 0;
    for (int k = 0; k < r->runs; k++) {
        lo += r->nodes[(size_t)k * m] / r->runs;
        hi += r->nodes[(size_t)k * m + m - 1] / r->runs;
    }
    lo -= o->margin;
    hi += o->margin;
    if (!(hi > lo)) { /* a single point mass and margin 0 */
        lo -= 0.5;
        hi += 0.5;
    }
    double dx = (hi - lo) / (G - 1);
    r->sigma2_used = o->sigma2 * fmax(1.0, hi - lo);
    double sd = sqrt(r->sigma2_used), c = 1.0 / sqrt(2 * M_PI * r->sigma2_used);
    for (int j = 0; j < G; j++)
        r->grid[j] = lo + dx * j;
    for (size_t i = 0; i < (size_t)r->runs * m; i++) {
        double x0 = r->nodes[i], w = r->weights[i] * c / r->runs;
        /* beyond 12 standard deviations a Gaussian is below 1e-31 of its peak */
        long j0 = (long)floor((x0 - 12 * sd - lo) / dx), j1 = (long)ceil((x0 + 12 * sd - lo) / dx);
        for (long j = j0 < 0 ? 0 : j0; j <= j1 && j < G; j++) {
            double d = r->grid[j] - x0;
            r->values[j] += w * exp(-d * d / (2 * r->sigma2_used));
        }
    }
    double sum = 0;
    for (int j = 0; j < G; j++)
        sum += r->values[j];
    if (sum > 0)
        for (int j = 0; j < G; j++)
            r->values[j] /= sum * dx;
}

int cv_density_slq(const cv_linop *op, const cv_density_options *opt, cv_rng *rng,
                   cv_density_result *out, cv_err *e)
{
    cv_density_options def;
    opt = CV_EST_OPTIONS(opt, &def, cv_density_options_default);
    memset(out, 0, sizeof *out);
    if (density_check(op, opt, e))
        return -1;
    int m = (size_t)opt->lanczos_steps > op->n ? (int)op->n : opt->lanczos_steps;
    size_t total = (size_t)opt->runs * m;
    out->runs = opt->runs;
    out->steps = m;
    out->grid_points = opt->grid_points;
    out->nodes = CV_EST_ALLOC(total, double, e);
    out->weights = out->nodes ? CV_EST_ALLOC(total, double, e) : NULL;
    out->grid = out->weights ? CV_EST_ALLOC((size_t)opt->grid_points, double, e) : NULL;
    out->values = out->grid ? CV_EST_ALLOC((size_t)opt->grid_points, double, e) : NULL;
    double *v0 = out->values ? CV_EST_ALLOC(op->n, double, e) : NULL;
    double *S = v0 ? CV_EST_ALLOC((size_t)m * m, double, e) : NULL;
    if (!S)
        goto fail;
    cv_progress_plan(op->progress, (long)total);
    for (int k = 0; k < opt->runs; k++) {
        if (slq_run(op, m, rng, v0, S, out->nodes + (size_t)k * m,
                    out->weights + (size_t)k * m, &out->matvecs, &out->reorths, e))
            goto fail;
    }
    broaden(opt, out);
    free(v0);
    free(S);
    return 0;
fail:
    free(v0);
    free(S);
    cv_density_result_free(out);
    return -1;
}

/* The operator stand-in of a known spectrum (density_check reads n only). */
static int no_apply(void *ctx, int k, const double *X, double *Y, cv_err *e)
{
    return cv_err_set(e, CV_EINTERNAL, "internal", "", "no operator");
}

int cv_density_from_spectrum(const double *vals, size_t n, const cv_density_options *opt,
                             cv_density_result *out, cv_err *e)
{
    cv_density_options def;
    opt = CV_EST_OPTIONS(opt, &def, cv_density_options_default);
    memset(out, 0, sizeof *out);
    cv_linop probe = {.n = n, .apply = no_apply};
    if (n > (size_t)1 << 30)
        return cv_err_set(e, CV_ETOOLARGE, "too_large", "", "spectrum of %zu values", n);
    if (density_check(&probe, opt, e))
        return -1;
    out->runs = 1;
    out->steps = (int)n;
    out->grid_points = opt->grid_points;
    out->nodes = CV_EST_ALLOC(n, double, e);
    out->weights = out->nodes ? CV_EST_ALLOC(n, double, e) : NULL;
    out->grid = out->weights ? CV_EST_ALLOC((size_t)opt->grid_points, double, e) : NULL;
    out->values = out->grid ? CV_EST_ALLOC((size_t)opt->grid_points, double, e) : NULL;
    if (!out->values) {
        cv_density_result_free(out);
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        out->nodes[i] = vals[i];
        out->weights[i] = 1.0 / (double)n;
    }
    broaden(opt, out);
    return 0;
}
