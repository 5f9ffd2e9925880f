/* solve.c - linear solves with a damped operator (A + damping I) x = b:
 * conjugate gradients (positive definite; refuses negative curvature) and
 * MINRES (Paige-Saunders; symmetric indefinite). */
#include <cblas.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "est_util.h"
#include "names.h"

/* index = cv_solve_method */
static const char *const method_names[] = {"cg", "minres"};

int cv_solve_method_from_name(const char *name) { return cv_name_index(name, method_names, 2); }

const char *cv_solve_method_name(cv_solve_method m)
{
    return cv_name_or(method_names, 2, (int)m, "cg");
}

void cv_solve_options_default(cv_solve_options *o)
{
    memset(o, 0, sizeof *o);
    o->method = CV_SOLVE_CG;
    o->tol = 1e-6;
}

void cv_solve_result_free(cv_solve_result *r)
{
    if (!r)
        return;
    free(r->x);
    memset(r, 0, sizeof *r);
}

static int solve_check(const cv_linop *op, const double *b, const cv_solve_options *o,
                       cv_err *e)
{
    if (cv_est_check_op(op, e))
        return -1;
    if (o->method != CV_SOLVE_CG && o->method != CV_SOLVE_MINRES)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.method",
                          "method must be cg or minres");
    if (!isfinite(o->damping))
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.damping",
                          "damping must be a finite number");
    if (!(o->tol >= 0) || !isfinite(o->tol))
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.tol",
                          "tol must be a finite number >= 0");
    if (o->max_iter < 0)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.max_iter",
                          "max_iter must be >= 0 (0 = 10 n), got %d", o->max_iter);
    if (!b)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.rhs",
                          "no right-hand side given");
    return 0;
}

/* The damped operator y = (A + delta I) x; A x alone into ax if non-NULL. */
typedef struct {
    const cv_linop *op;
    size_t n;
    double delta;
    long matvecs;
} damped_op;

static int damped_apply(damped_op *d, const double *x, double *y, cv_err *e)
{
    if (cv_linop_apply(d->op, 1, x, y, e))
        return -1;
    d->matvecs++;
    cblas_daxpy((int)d->n, d->delta, x, 1, y, 1);
    return 0;
}

static int non_finite(cv_err *e, const char *method, int it)
{
    return cv_err_set(e, CV_EINVAL, "non_finite", "",
                      "the operator produced non-finite values (%s iteration %d)", method, it);
}

/* Negative curvature p^T (A + delta I) p = pq <= 0 met by CG. */
static int not_pd(cv_err *e, double delta, double pq, double pp, int it)
{
    double rayleigh = pq / pp - delta; /* p^T A p / p^T p >= lambda_min(A) */
    return cv_err_set(e, CV_EINVAL, "not_positive_definite", "options.damping",
                      "matrix is not positive definite: p^T (A + %g I) p = %.6g <= 0 at CG "
                      "iteration %d; use damping larger than %.6g (a lower bound: the "
                      "smallest eigenvalue may be lower still) or method minres",
                      delta, pq, it, -rayleigh);
}

/* Conjugate gradients from x = 0 (x zeroed by the caller). */
static int cg(damped_op *A, const double *b, double bnorm, const cv_solve_options *o,
              int max_iter, cv_solve_result *out, cv_err *e)
{
    size_t n = A->n;
    double *r = CV_EST_ALLOC(n, double, e), *p = r ? CV_EST_ALLOC(n, double, e) : NULL;
    double *q = p ? CV_EST_ALLOC(n, double, e) : NULL;
    int rc = -1;
    if (!q)
        goto done;
    memcpy(r, b, sizeof(double) * n);
    memcpy(p, b, sizeof(double) * n);
    double rr = bnorm * bnorm;
    int it = 0;
    while (!(sqrt(rr) <= o->tol * bnorm) && it < max_iter) {
        if (damped_apply(A, p, q, e))
            goto done;
        it++;
        double pq = cv_est_dot(n, p, q);
        if (!isfinite(pq)) {
            non_finite(e, "CG", it);
            goto done;
        }
        if (pq <= 0) {
            not_pd(e, A->delta, pq, cv_est_dot(n, p, p), it);
            goto done;
        }
        double a = rr / pq;
        cblas_daxpy((int)n, a, p, 1, out->x, 1);
        cblas_daxpy((int)n, -a, q, 1, r, 1);
        double rr_new = cv_est_dot(n, r, r);
        for (size_t i = 0; i < n; i++)
            p[i] = r[i] + (rr_new / rr) * p[i];
        rr = rr_new;
    }
    out->iterations = it;
    out->converged = sqrt(rr) <= o->tol * bnorm;
    rc = 0;
done:
    free(r);
    free(p);
    free(q);
    return rc;
}

/* MINRES state (Paige & Saunders 1975; variable names follow SciPy's
 * minres without preconditioner). */
typedef struct {
    double *r1, *r2, *y, *v, *w, *w1, *w2;
    double beta1, beta, oldb, dbar, epsln, phibar, cs, sn;
} minres_ws;

static void minres_free(minres_ws *m)
{
    free(m->r1);
    free(m->r2);
    free(m->y);
    free(m->v);
    free(m->w);
    free(m->w1);
    free(m->w2);
}

static int minres_init(minres_ws *m, size_t n, const double *b, double bnorm, cv_err *e)
{
    memset(m, 0, sizeof *m);
    double **bufs[] = {&m->r1, &m->r2, &m->y, &m->v, &m->w, &m->w1, &m->w2};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (!(*bufs[i] = CV_EST_ALLOC(n, double, e))) {
            minres_free(m);
            return -1;
        }
    memcpy(m->r1, b, sizeof(double) * n);
    memcpy(m->r2, b, sizeof(double) * n);
    memcpy(m->y, b, sizeof(double) * n);
    m->beta1 = m->beta = m->phibar = bnorm;
    m->cs = -1;
    return 0;
}

/* One MINRES iteration: Lanczos step, QR update by a Givens rotation, x
 * update.  Returns -1 on error, else 0. */
static int minres_iter(damped_op *A, minres_ws *m, int it, double *x, cv_err *e)
{
    size_t n = A->n;
    for (size_t i = 0; i < n; i++)
        m->v[i] = m->y[i] / m->beta;
    if (damped_apply(A, m->v, m->y, e))
        return -1;
    if (it >= 2)
        cblas_daxpy((int)n, -m->beta / m->oldb, m->r1, 1, m->y, 1);
    double alfa = cv_est_dot(n, m->v, m->y);
    cblas_daxpy((int)n, -alfa / m->beta, m->r2, 1, m->y, 1);
    double *t = m->r1;
    m->r1 = m->r2;
    m->r2 = t;
    memcpy(m->r2, m->y, sizeof(double) * n);
    m->oldb = m->beta;
    m->beta = cv_est_norm(n, m->y);
    if (!isfinite(alfa) || !isfinite(m->beta))
        return non_finite(e, "MINRES", it);
    double oldeps = m->epsln;
    double delta = m->cs * m->dbar + m->sn * alfa;
    double gbar = m->sn * m->dbar - m->cs * alfa;
    m->epsln = m->sn * m->beta;
    m->dbar = -m->cs * m->beta;
    double gamma = fmax(hypot(gbar, m->beta), DBL_EPSILON);
    m->cs = gbar / gamma;
    m->sn = m->beta / gamma;
    double phi = m->cs * m->phibar;
    m->phibar *= m->sn;
    t = m->w1; /* w1 <- w2, w2 <- w, w <- (v - oldeps w1 - delta w2) / gamma */
    m->w1 = m->w2;
    m->w2 = m->w;
    m->w = t;
    for (size_t i = 0; i < n; i++)
        m->w[i] = (m->v[i] - oldeps * m->w1[i] - delta * m->w2[i]) / gamma;
    cblas_daxpy((int)n, phi, m->w, 1, x, 1);
    return 0;
}

static int minres(damped_op *A, const double *b, double bnorm, const cv_solve_options *o,
                  int max_iter, cv_solve_result *out, cv_err *e)
{
    minres_ws m;
    if (minres_init(&m, A->n, b, bnorm, e))
        return -1;
    int it = 0;
    while (!(m.phibar <= o->tol * bnorm) && it < max_iter) {
        if (minres_iter(A, &m, ++it, out->x, e)) {
            minres_free(&m);
            return -1;
        }
        if (m.beta <= DBL_EPSILON * m.beta1) /* Krylov space invariant: x is final */
            break;
    }
    out->iterations = it;
    out->converged = m.phibar <= o->tol * bnorm || m.beta <= DBL_EPSILON * m.beta1;
    minres_free(&m);
    return 0;
}

/* out->residual = ||b - (A + delta I) x|| / ||b||, with A x into ax. */
static int true_residual(damped_op *A, const double *b, double bnorm, cv_solve_result *out,
                         double *ax, cv_err *e)
{
    size_t n = A->n;
    if (cv_linop_apply(A->op, 1, out->x, ax, e))
        return -1;
    A->matvecs++;
    double s = 0;
    for (size_t i = 0; i < n; i++) {
        double ri = b[i] - ax[i] - A->delta * out->x[i];
        s += ri * ri;
    }
    out->residual = sqrt(s) / bnorm;
    return 0;
}

int cv_solve(const cv_linop *op, const double *b, const cv_solve_options *opt,
             cv_solve_result *out, double *Ax, cv_err *e)
{
    cv_solve_options def;
    opt = CV_EST_OPTIONS(opt, &def, cv_solve_options_default);
    memset(out, 0, sizeof *out);
    if (solve_check(op, b, opt, e))
        return -1;
    size_t n = op->n;
    double bnorm = cv_est_norm(n, b);
    if (!isfinite(bnorm))
        return cv_err_set(e, CV_EINVAL, "non_finite", "options.rhs",
                          "the right-hand side has non-finite entries");
    long mi = opt->max_iter > 0 ? opt->max_iter : 10L * (long)n;
    int max_iter = mi > INT_MAX - 1 ? INT_MAX - 1 : (int)mi;
    out->n = n;
    out->x = CV_EST_ALLOC(n, double, e);
    double *ax = Ax ? Ax : out->x ? CV_EST_ALLOC(n, double, e) : NULL;
    if (!ax)
        goto fail;
    if (bnorm == 0) { /* x = 0 solves it exactly */
        memset(ax, 0, sizeof(double) * n);
        out->converged = 1;
        if (ax != Ax)
            free(ax);
        return 0;
    }
    /* Both methods finish within n iterations in exact arithmetic; plan
     * that (the plan grows by itself if rounding needs more). */
    long plan_iter = (size_t)max_iter < n ? (long)max_iter : (long)n;
    cv_progress_plan(op->progress, plan_iter + 1);
    damped_op A = {.op = op, .n = n, .delta = opt->damping};
    int rc = opt->method == CV_SOLVE_CG ? cg(&A, b, bnorm, opt, max_iter, out, e)
                                        : minres(&A, b, bnorm, opt, max_iter, out, e);
    if (rc || true_residual(&A, b, bnorm, out, ax, e))
        goto fail;
    out->matvecs = A.matvecs;
    if (ax != Ax)
        free(ax);
    return 0;
fail:
    if (ax != Ax)
        free(ax);
    cv_solve_result_free(out);
    return -1;
}
