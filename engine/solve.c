/* solve.c - linear solves with a damped operator (A + damping I) x = b:
 * conjugate gradients (positive definite; refuses negative curvature),
 * MINRES (Paige-Saunders; symmetric indefinite), LSMR (Fong-Saunders; least
 * squares, any A) and the truncated Neumann series (curvlinops' convention). */
#include <cblas.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "est_util.h"
#include "names.h"
#include "solve_block.h"

/* index = cv_solve_method */
static const char *const method_names[] = {"cg", "minres", "lsmr", "neumann", "block_cg"};

int cv_solve_method_from_name(const char *name) { return cv_name_index(name, method_names, 5); }

const char *cv_solve_method_name(cv_solve_method m)
{
    return cv_name_or(method_names, 5, (int)m, "cg");
}

void cv_solve_options_default(cv_solve_options *o)
{
    memset(o, 0, sizeof *o);
    o->method = CV_SOLVE_CG;
    o->tol = 1e-6;
    o->scale = 1.0;
    o->num_terms = 100;
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
    if ((int)o->method < 0 || o->method > CV_SOLVE_BLOCK_CG)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.method",
                          "method must be cg, minres, lsmr, neumann or block_cg");
    if (o->method == CV_SOLVE_NEUMANN && !(o->scale > 0 && isfinite(o->scale)))
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.scale",
                          "scale must be a finite number > 0");
    if (o->method == CV_SOLVE_NEUMANN && o->num_terms < 0)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.num_terms",
                          "num_terms must be >= 0");
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

/* LSMR (Fong & Saunders 2011) on the damped operator M = A + delta I
 * (symmetric: M^T u = M u), from x = 0: Golub-Kahan bidiagonalization
 * (two products per iteration) with the two Givens QR factorizations of the
 * paper's section 2.  M x is carried along (M h_k from the next M v_k), so
 * the stopping test is the exact recurrence residual ||b - M x|| <= tol ||b||. */
typedef struct {
    double *u, *v, *h, *hbar, *mv, *mh, *mhbar, *mx;
} lsmr_ws;

static void lsmr_free(lsmr_ws *w)
{
    double *bufs[] = {w->u, w->v, w->h, w->hbar, w->mv, w->mh, w->mhbar, w->mx};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        free(bufs[i]);
}

static int lsmr_alloc(lsmr_ws *w, size_t n, cv_err *e)
{
    memset(w, 0, sizeof *w);
    double **bufs[] = {&w->u, &w->v, &w->h, &w->hbar, &w->mv, &w->mh, &w->mhbar, &w->mx};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (!(*bufs[i] = CV_EST_ALLOC(n, double, e))) {
            lsmr_free(w);
            return -1;
        }
    return 0;
}

/* ||b - mx|| */
static double resid_norm(size_t n, const double *b, const double *mx)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += (b[i] - mx[i]) * (b[i] - mx[i]);
    return sqrt(s);
}

static int lsmr(damped_op *A, const double *b, double bnorm, const cv_solve_options *o,
                int max_iter, cv_solve_result *out, cv_err *e)
{
    size_t n = A->n;
    lsmr_ws w;
    if (lsmr_alloc(&w, n, e))
        return -1;
    int rc = -1, it = 0, done_ = 0;
    double *x = out->x, beta = bnorm, alpha;
    for (size_t i = 0; i < n; i++)
        w.u[i] = b[i] / beta;
    if (damped_apply(A, w.u, w.v, e)) /* alpha_1 v_1 = M^T u_1 */
        goto done;
    alpha = cv_est_norm(n, w.v);
    if (!isfinite(alpha)) {
        non_finite(e, "LSMR", 0);
        goto done;
    }
    if (alpha == 0) { /* M b = 0: x = 0 is the least-squares solution */
        done_ = 1;
        goto finish;
    }
    cblas_dscal((int)n, 1.0 / alpha, w.v, 1);
    memcpy(w.h, w.v, sizeof(double) * n);
    double alphabar = alpha, zetabar = alpha * beta, rho = 1, rhobar = 1, cbar = 1, sbar = 0;
    double norm_a2 = alpha * alpha; /* ||B_k||_F^2 estimates ||M||_F^2 (as SciPy's lsmr) */
    double hcoef = 0; /* h_k = v_k - hcoef h_{k-1} */
    while (it < max_iter && !done_) {
        if (damped_apply(A, w.v, w.mv, e)) /* M v_k */
            goto done;
        it++;
        if (it == 1)
            memcpy(w.mh, w.mv, sizeof(double) * n);
        else
            for (size_t i = 0; i < n; i++)
                w.mh[i] = w.mv[i] - hcoef * w.mh[i];
        for (size_t i = 0; i < n; i++) /* beta_{k+1} u_{k+1} = M v_k - alpha_k u_k */
            w.u[i] = w.mv[i] - alpha * w.u[i];
        beta = cv_est_norm(n, w.u);
        double alpha_next = 0;
        if (beta > 0) {
            cblas_dscal((int)n, 1.0 / beta, w.u, 1);
            double *t = w.mv; /* M v_k is used up: M u_{k+1} goes there */
            if (damped_apply(A, w.u, t, e))
                goto done;
            for (size_t i = 0; i < n; i++) /* alpha_{k+1} v_{k+1} = M u_{k+1} - beta v_k */
                t[i] -= beta * w.v[i];
            alpha_next = cv_est_norm(n, t);
            if (alpha_next > 0)
                for (size_t i = 0; i < n; i++)
                    w.v[i] = t[i] / alpha_next;
        }
        if (!isfinite(beta) || !isfinite(alpha_next)) {
            non_finite(e, "LSMR", it);
            goto done;
        }
        double rhoold = rho, rhobarold = rhobar;
        rho = hypot(alphabar, beta);
        double c = alphabar / rho, s_ = beta / rho;
        double thetanew = s_ * alpha_next;
        alphabar = c * alpha_next;
        double thetabar = sbar * rho, rhotemp = cbar * rho;
        rhobar = hypot(rhotemp, thetanew);
        cbar = rhotemp / rhobar;
        sbar = thetanew / rhobar;
        double zeta = cbar * zetabar;
        zetabar = -sbar * zetabar;
        double hb = thetabar * rho / (rhoold * rhobarold), step = zeta / (rho * rhobar);
        for (size_t i = 0; i < n; i++) {
            w.hbar[i] = w.h[i] - hb * w.hbar[i];
            w.mhbar[i] = w.mh[i] - hb * w.mhbar[i];
            x[i] += step * w.hbar[i];
            w.mx[i] += step * w.mhbar[i];
        }
        hcoef = thetanew / rho;
        for (size_t i = 0; i < n; i++) /* h_{k+1} = v_{k+1} - (theta_{k+1} / rho_k) h_k */
            w.h[i] = w.v[i] - hcoef * w.h[i];
        norm_a2 += beta * beta + alpha_next * alpha_next;
        double rn = resid_norm(n, b, w.mx);
        /* ||b - M x|| within tol, or the normal equations: ||M^T r|| = |zetabar| <=
         * tol ||M|| ||r|| (a least-squares solution of an inconsistent system) */
        done_ = rn <= o->tol * bnorm || fabs(zetabar) <= o->tol * sqrt(norm_a2) * rn ||
                beta == 0 || alpha_next == 0;
        alpha = alpha_next;
    }
finish:
    out->iterations = it;
    out->converged = resid_norm(n, b, w.mx) <= o->tol * bnorm || done_;
    rc = 0;
done:
    lsmr_free(&w);
    return rc;
}

/* Truncated Neumann series x = s sum_{k=0}^{K} (I - s M)^k b (curvlinops'
 * NeumannInverseLinearOperator, s = scale, K = num_terms matvecs); it
 * converges when every eigenvalue of M lies in (0, 2/s).  A term that grows
 * past 1e8 ||b|| (or turns non-finite) stops it: CV_EINVAL "diverges". */
static int neumann(damped_op *A, const double *b, double bnorm, const cv_solve_options *o,
                   cv_solve_result *out, cv_err *e)
{
    size_t n = A->n;
    double *v = CV_EST_ALLOC(n, double, e), *mv = v ? CV_EST_ALLOC(n, double, e) : NULL;
    int rc = -1, k = 0;
    if (!mv)
        goto done;
    memcpy(v, b, sizeof(double) * n);
    memcpy(out->x, b, sizeof(double) * n);
    for (k = 1; k <= o->num_terms; k++) {
        if (damped_apply(A, v, mv, e))
            goto done;
        cblas_daxpy((int)n, -o->scale, mv, 1, v, 1);
        cblas_daxpy((int)n, 1.0, v, 1, out->x, 1);
        double vn = cv_est_norm(n, v);
        if (!(vn <= 1e8 * bnorm)) {
            cv_err_set(e, CV_EINVAL, "diverges", "options.scale",
                       "the Neumann series diverges (term %d has norm %.3g, %.3g times the "
                       "right-hand side's): scale x the eigenvalues of A + damping I must "
                       "lie in (0, 2); use a smaller scale, a larger damping, or method cg",
                       k, vn, vn / bnorm);
            goto done;
        }
    }
    cblas_dscal((int)n, o->scale, out->x, 1);
    out->iterations = o->num_terms;
    rc = 0;
done:
    free(v);
    free(mv);
    return rc;
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
    if (opt->method == CV_SOLVE_LSMR)
        plan_iter = 2 * plan_iter + 1;
    else if (opt->method == CV_SOLVE_NEUMANN)
        plan_iter = opt->num_terms;
    cv_progress_plan(op->progress, plan_iter + 1);
    damped_op A = {.op = op, .n = n, .delta = opt->damping};
    int rc = opt->method == CV_SOLVE_CG || opt->method == CV_SOLVE_BLOCK_CG /* one: CG */
                 ? cg(&A, b, bnorm, opt, max_iter, out, e)
             : opt->method == CV_SOLVE_MINRES ? minres(&A, b, bnorm, opt, max_iter, out, e)
             : opt->method == CV_SOLVE_LSMR   ? lsmr(&A, b, bnorm, opt, max_iter, out, e)
                                              : neumann(&A, b, bnorm, opt, out, e);
    if (rc || true_residual(&A, b, bnorm, out, ax, e))
        goto fail;
    if (opt->method == CV_SOLVE_NEUMANN) /* no stopping rule: converged = within tol */
        out->converged = out->residual <= opt->tol;
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

/* ---- several right-hand sides ------------------------------------------------ */

/* k CG systems in lockstep (column j of B, R, P, X, Q at + j n): one product of
 * the still active directions per iteration. */
typedef struct {
    size_t n;
    int k;
    double *R, *P, *Q, *G, *rr, *bnorm;  /* G: the gathered active directions */
    int *active, *its, *map;             /* map: gathered column -> system */
} cg_many_ws;

static void cg_many_free(cg_many_ws *w)
{
    free(w->R);
    free(w->P);
    free(w->Q);
    free(w->G);
    free(w->rr);
    free(w->bnorm);
    free(w->active);
    free(w->its);
    free(w->map);
}

static int cg_many_init(cg_many_ws *w, size_t n, int k, const double *B, cv_err *e)
{
    size_t nk = n * (size_t)k;
    memset(w, 0, sizeof *w);
    w->n = n;
    w->k = k;
    w->R = CV_EST_ALLOC(nk, double, e);
    w->P = w->R ? CV_EST_ALLOC(nk, double, e) : NULL;
    w->Q = w->P ? CV_EST_ALLOC(nk, double, e) : NULL;
    w->G = w->Q ? CV_EST_ALLOC(nk, double, e) : NULL;
    w->rr = w->G ? CV_EST_ALLOC((size_t)k, double, e) : NULL;
    w->bnorm = w->rr ? CV_EST_ALLOC((size_t)k, double, e) : NULL;
    w->active = w->bnorm ? CV_EST_ALLOC((size_t)k, int, e) : NULL;
    w->its = w->active ? CV_EST_ALLOC((size_t)k, int, e) : NULL;
    w->map = w->its ? CV_EST_ALLOC((size_t)k, int, e) : NULL;
    if (!w->map) {
        cg_many_free(w);
        return -1;
    }
    memcpy(w->R, B, nk * sizeof(double));
    memcpy(w->P, B, nk * sizeof(double));
    for (int j = 0; j < k; j++) {
        w->bnorm[j] = cv_est_norm(n, B + (size_t)j * n);
        w->rr[j] = w->bnorm[j] * w->bnorm[j];
    }
    return 0;
}

/* One lockstep iteration: Q = (A + delta I) P for the active columns, then
 * each active system's CG update; *left = systems still active. */
static int cg_many_iter(const cv_linop *op, double delta, const cv_solve_options *o,
                        cg_many_ws *w, double *X, int it, int *left, cv_err *e)
{
    size_t n = w->n;
    int na = 0, *map = w->map;
    for (int j = 0; j < w->k; j++)
        if (w->active[j]) {
            memcpy(w->G + (size_t)na * n, w->P + (size_t)j * n, n * sizeof(double));
            map[na++] = j;
        }
    if (cv_est_apply_chunked(op, na, w->G, w->Q, cv_est_block_size(n, 0, na), e))
        return -1;
    *left = 0;
    for (int c = 0; c < na; c++) {
        int j = map[c];
        double *p = w->P + (size_t)j * n, *r = w->R + (size_t)j * n, *q = w->Q + (size_t)c * n;
        cblas_daxpy((int)n, delta, p, 1, q, 1);
        double pq = cv_est_dot(n, p, q);
        if (!isfinite(pq))
            return non_finite(e, "CG", it);
        if (pq <= 0)
            return not_pd(e, delta, pq, cv_est_dot(n, p, p), it);
        double a = w->rr[j] / pq;
        cblas_daxpy((int)n, a, p, 1, X + (size_t)j * n, 1);
        cblas_daxpy((int)n, -a, q, 1, r, 1);
        double rr_new = cv_est_dot(n, r, r);
        for (size_t i = 0; i < n; i++)
            p[i] = r[i] + (rr_new / w->rr[j]) * p[i];
        w->rr[j] = rr_new;
        w->its[j] = it;
        w->active[j] = !(sqrt(rr_new) <= o->tol * w->bnorm[j]);
        *left += w->active[j];
    }
    return 0;
}

/* The true residuals of the k solutions (one k-column product); Ax: n x k or NULL. */
static int many_residuals(const cv_linop *op, double delta, int k, const double *B,
                          cv_solve_result *out, double *AX, cv_err *e)
{
    size_t n = op->n;
    double *X = CV_EST_ALLOC(n * (size_t)k, double, e);
    if (!X)
        return -1;
    for (int j = 0; j < k; j++)
        memcpy(X + (size_t)j * n, out[j].x, n * sizeof(double));
    int rc = cv_est_apply_chunked(op, k, X, AX, cv_est_block_size(n, 0, k), e);
    for (int j = 0; j < k && !rc; j++) {
        const double *b = B + (size_t)j * n, *ax = AX + (size_t)j * n, *x = out[j].x;
        double ss = 0, bn = cv_est_norm(n, b);
        for (size_t i = 0; i < n; i++)
            ss += (b[i] - ax[i] - delta * x[i]) * (b[i] - ax[i] - delta * x[i]);
        out[j].residual = bn > 0 ? sqrt(ss) / bn : 0;
        out[j].matvecs = out[j].iterations + 1;
    }
    free(X);
    return rc;
}

static int cg_many(const cv_linop *op, int k, const double *B, const cv_solve_options *o,
                   int max_iter, cv_solve_result *out, cv_err *e)
{
    size_t n = op->n;
    cg_many_ws w;
    if (cg_many_init(&w, n, k, B, e))
        return -1;
    double *X = CV_EST_ALLOC(n * (size_t)k, double, e);
    int rc = X ? 0 : -1, left = 0;
    for (int j = 0; j < k && !rc; j++) {
        w.active[j] = !(w.bnorm[j] == 0 || sqrt(w.rr[j]) <= o->tol * w.bnorm[j]);
        left += w.active[j];
    }
    for (int it = 1; !rc && left > 0 && it <= max_iter; it++)
        rc = cg_many_iter(op, o->damping, o, &w, X, it, &left, e);
    for (int j = 0; j < k && !rc; j++) {
        out[j].n = n;
        out[j].x = CV_EST_ALLOC(n, double, e);
        if (!out[j].x) {
            rc = -1;
            break;
        }
        memcpy(out[j].x, X + (size_t)j * n, n * sizeof(double));
        out[j].iterations = w.its[j];
        out[j].converged = !w.active[j];
    }
    if (!rc)
        rc = many_residuals(op, o->damping, k, B, out, w.Q, e);
    free(X);
    cg_many_free(&w);
    return rc;
}

/* Block CG (engine/solve_block.c), then the true residuals; every system's
 * matvecs is the whole job's (the block's products are shared). */
static int block_cg(const cv_linop *op, int k, const double *B, const cv_solve_options *o,
                    int max_iter, cv_solve_result *out, cv_err *e)
{
    size_t n = op->n;
    double *AX = CV_EST_ALLOC(n * (size_t)k, double, e);
    int rc = !AX || cv_solve_block_cg(op, k, B, o, max_iter, out, e) ? -1 : 0;
    long products = rc ? 0 : out[0].matvecs; /* the block's, shared */
    rc = rc || many_residuals(op, o->damping, k, B, out, AX, e) ? -1 : 0;
    for (int j = 0; j < k && !rc; j++)
        out[j].matvecs = products + k;
    free(AX);
    return rc;
}

int cv_solve_many(const cv_linop *op, int k, const double *B, const cv_solve_options *opt,
                  cv_solve_result *out, cv_err *e)
{
    cv_solve_options def;
    opt = CV_EST_OPTIONS(opt, &def, cv_solve_options_default);
    memset(out, 0, sizeof *out * (size_t)(k > 0 ? k : 0));
    if (k < 1)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.rhs",
                          "no right-hand side given");
    if (solve_check(op, B, opt, e))
        return -1;
    size_t n = op->n;
    for (size_t i = 0; i < n * (size_t)k; i++)
        if (!isfinite(B[i]))
            return cv_err_set(e, CV_EINVAL, "non_finite", "options.rhs",
                              "the right-hand side has non-finite entries");
    int rc = 0;
    int lockstep = opt->method == CV_SOLVE_CG, block = opt->method == CV_SOLVE_BLOCK_CG;
    if ((!lockstep && !block) || k == 1) { /* one system after the other */
        for (int j = 0; j < k && !rc; j++)
            rc = cv_solve(op, B + (size_t)j * n, opt, &out[j], NULL, e);
    } else {
        long mi = opt->max_iter > 0 ? opt->max_iter : 10L * (long)n;
        int max_iter = mi > INT_MAX - 1 ? INT_MAX - 1 : (int)mi;
        /* exact arithmetic: CG within n iterations, block CG within n / k */
        long bound = block ? (long)((n + (size_t)k - 1) / (size_t)k) : (long)n;
        long plan_iter = max_iter < bound ? (long)max_iter : bound;
        cv_progress_plan(op->progress, (plan_iter + 1) * k);
        rc = block ? block_cg(op, k, B, opt, max_iter, out, e)
                   : cg_many(op, k, B, opt, max_iter, out, e);
    }
    if (rc)
        for (int j = 0; j < k; j++)
            cv_solve_result_free(&out[j]);
    return rc;
}
