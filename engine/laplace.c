/* laplace.c - the Laplace evidence and its optimization over the prior
 * precisions and the noise (engine/laplace.h). */
#include "laplace.h"

#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

int cv_laplace_init(cv_laplace *L, cv_laplace_kind kind, int nblocks, cv_err *e)
{
    memset(L, 0, sizeof *L);
    L->kind = kind;
    L->blocks = calloc((size_t)(nblocks > 0 ? nblocks : 1), sizeof *L->blocks);
    if (!L->blocks)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Laplace blocks");
    L->nblocks = nblocks;
    return 0;
}

void cv_laplace_free(cv_laplace *L)
{
    for (int b = 0; L->blocks && b < L->nblocks; b++)
        free(L->blocks[b].vals);
    free(L->blocks);
    free(L->G);
    free(L->owner);
    free(L->lam);
    free(L->W);
    memset(L, 0, sizeof *L);
}

static int not_pd(cv_err *e)
{
    return cv_err_set(e, CV_EINVAL, "not_positive_definite", "options.prior_precision",
                      "the posterior precision is not positive definite at this prior "
                      "precision (the curvature has a negative eigenvalue below -prior_precision)");
}

static int logdet_spectra(const cv_laplace *L, const double *delta, double g, double *out,
                          double *block_logdet, cv_err *e)
{
    double s = 0;
    for (int b = 0; b < L->nblocks; b++) {
        const cv_laplace_block *k = &L->blocks[b];
        double sb = (double)(k->dim - k->m) * log(delta[b]);
        for (size_t i = 0; i < k->m; i++) {
            double x = g * k->vals[i] + delta[b];
            if (!(x > 0))
                return not_pd(e);
            sb += log(x);
        }
        if (block_logdet)
            block_logdet[b] = sb;
        s += sb;
    }
    *out = s;
    return 0;
}

/* log det of the n x n SPD matrix M (overwritten by its Cholesky factor). */
static int chol_logdet(double *M, size_t n, double *out, cv_err *e)
{
    if (n == 0) {
        *out = 0;
        return 0;
    }
    if (LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'L', (lapack_int)n, M, (lapack_int)n) != 0)
        return not_pd(e);
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += log(M[i * n + i]);
    *out = 2 * s;
    return 0;
}

static int logdet_dense(const cv_laplace *L, const double *delta, double g, double *out,
                        cv_err *e)
{
    size_t n = L->dim;
    double *M = malloc(sizeof(double) * (n ? n * n : 1));
    if (!M)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "posterior precision %zu x %zu",
                          n, n);
    for (size_t i = 0; i < n * n; i++)
        M[i] = g * L->G[i];
    for (size_t i = 0; i < n; i++)
        M[i * n + i] += delta[L->owner[i]];
    int rc = chol_logdet(M, n, out, e);
    free(M);
    return rc;
}

static int logdet_lowrank(const cv_laplace *L, const double *delta, double g, double *out,
                          cv_err *e)
{
    size_t k = (size_t)L->k;
    double *M = calloc(k ? k * k : 1, sizeof(double)), *r = malloc(sizeof(double) * (k ? k : 1));
    int rc = M && r ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "low-rank kernel");
    double lp = 0;
    for (int b = 0; b < L->nblocks && !rc; b++) {
        lp += (double)L->blocks[b].dim * log(delta[b]);
        const double *W = L->W + (size_t)b * k * k;
        for (size_t i = 0; i < k * k; i++)
            M[i] += W[i] / delta[b];
    }
    for (size_t i = 0; i < k && !rc; i++)
        r[i] = sqrt(fmax(g * L->lam[i], 0.0));
    for (size_t j = 0; j < k && !rc; j++)
        for (size_t i = 0; i < k; i++)
            M[j * k + i] = (i == j) + r[i] * r[j] * M[j * k + i];
    double ld = 0;
    if (!rc)
        rc = chol_logdet(M, k, &ld, e);
    free(M);
    free(r);
    if (!rc)
        *out = lp + ld;
    return rc;
}

int cv_laplace_eval(const cv_laplace *L, const double *delta, double sigma, double temperature,
                    cv_laplace_terms *t, double *block_logdet, cv_err *e)
{
    if (!L->gaussian)
        sigma = 1.0;
    double g = 1.0 / (sigma * sigma * temperature);
    memset(t, 0, sizeof *t);
    for (int b = 0; b < L->nblocks; b++) {
        t->log_det_prior_precision += (double)L->blocks[b].dim * log(delta[b]);
        t->scatter += delta[b] * L->blocks[b].sq_norm;
        if (block_logdet)
            block_logdet[b] = NAN;
    }
    t->log_likelihood = -g * L->nll;
    if (L->gaussian)
        t->log_likelihood -= L->n_outputs * log(sigma * sqrt(2 * M_PI));
    int rc = L->kind == CV_LAPLACE_SPECTRA
                 ? logdet_spectra(L, delta, g, &t->log_det_posterior_precision, block_logdet, e)
             : L->kind == CV_LAPLACE_DENSE
                 ? logdet_dense(L, delta, g, &t->log_det_posterior_precision, e)
                 : logdet_lowrank(L, delta, g, &t->log_det_posterior_precision, e);
    if (rc)
        return -1;
    t->log_marginal_likelihood =
        t->log_likelihood -
        0.5 * (t->log_det_posterior_precision - t->log_det_prior_precision + t->scatter);
    return 0;
}

/* ---- optimization ------------------------------------------------------------ */

typedef struct {
    const cv_laplace *L;
    double *delta, *sigma, T;
    int coord;          /* -1: log sigma; -2: every delta (one common value); b: delta_b */
    int evals;
    cv_err *e;
    int failed;         /* a non-PD error other than not_positive_definite */
} opt_ctx;

static double objective(opt_ctx *o, double x)
{
    double v = exp(x);
    if (o->coord == -1)
        *o->sigma = v;
    else if (o->coord == -2)
        for (int b = 0; b < o->L->nblocks; b++)
            o->delta[b] = v;
    else
        o->delta[o->coord] = v;
    cv_laplace_terms t;
    cv_err e2 = {0};
    o->evals++;
    if (cv_laplace_eval(o->L, o->delta, *o->sigma, o->T, &t, NULL, &e2)) {
        if (e2.status == CV_ENOMEM && !o->failed) {
            *o->e = e2;
            o->failed = 1;
        }
        return -INFINITY;
    }
    return t.log_marginal_likelihood;
}

/* Golden-section maximization of a unimodal objective on [lo, hi] in x;
 * leaves the coordinate at the best point seen (start x0 included). */
static double golden(opt_ctx *o, double lo, double hi, double x0)
{
    const double r = 0.5 * (sqrt(5.0) - 1.0);
    double best_x = x0, best = objective(o, x0);
    double a = lo, b = hi, c = b - r * (b - a), d = a + r * (b - a);
    double fc = objective(o, c), fd = objective(o, d);
    if (fc > best) best = fc, best_x = c;
    if (fd > best) best = fd, best_x = d;
    while (b - a > 1e-9 && !o->failed) {
        if (fc >= fd) {
            b = d;
            d = c;
            fd = fc;
            c = b - r * (b - a);
            fc = objective(o, c);
            if (fc > best) best = fc, best_x = c;
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + r * (b - a);
            fd = objective(o, d);
            if (fd > best) best = fd, best_x = d;
        }
    }
    objective(o, best_x);
    return best;
}

/* SPECTRA: the derivatives in t = log delta of the evidence's terms of
 * blocks [b0, b1) at a common delta (g = 1 / (sigma^2 T)):
 *   f'(t)  = sum_b [1/2 sum_i g v_i / (g v_i + delta) - 1/2 delta ||theta_b||^2],
 *   f''(t) = -sum_b [1/2 sum_i g v_i delta / (g v_i + delta)^2 + 1/2 delta ||theta_b||^2]
 * (f' decreases: the evidence is concave in t).  0, or -1 where P is not
 * positive definite at delta. */
static int spectra_derivatives(const cv_laplace *L, int b0, int b1, double delta, double g,
                               double *d1, double *d2)
{
    *d1 = *d2 = 0;
    for (int b = b0; b < b1; b++) {
        const cv_laplace_block *k = &L->blocks[b];
        for (size_t i = 0; i < k->m; i++) {
            double x = g * k->vals[i], den = x + delta;
            if (!(den > 0))
                return -1;
            *d1 += 0.5 * x / den;
            *d2 -= 0.5 * x * delta / (den * den);
        }
        *d1 -= 0.5 * delta * k->sq_norm;
        *d2 -= 0.5 * delta * k->sq_norm;
    }
    return 0;
}

/* SPECTRA: the root of f' in [log DELTA_MIN, log DELTA_MAX] for the delta of
 * blocks [b0, b1) (all set to it) by Newton's method safeguarded by bisection
 * (f' decreases; where P is not PD the root lies to the right); a bound when
 * f' keeps its sign.  Each derivative evaluation counts as an evaluation. */
static void spectra_newton(opt_ctx *o, int b0, int b1, double t0)
{
    const cv_laplace *L = o->L;
    double sg = L->gaussian ? *o->sigma : 1.0, g = 1.0 / (sg * sg * o->T);
    double a = log(CV_LAPLACE_DELTA_MIN), b = log(CV_LAPLACE_DELTA_MAX), t = t0, scale = 1;
    for (int k = b0; k < b1; k++)
        scale += (double)L->blocks[k].m;
    for (int it = 0; it < 300; it++) {
        double d1, d2;
        o->evals++;
        int pd = spectra_derivatives(L, b0, b1, exp(t), g, &d1, &d2) == 0;
        if (!pd || d1 > 0)
            a = t;
        else
            b = t;
        if (pd && fabs(d1) <= 1e-14 * scale)
            break;
        double tn = pd && d2 < 0 ? t - d1 / d2 : 0.5 * (a + b);
        if (!(tn > a && tn < b))
            tn = 0.5 * (a + b);
        int done = fabs(tn - t) <= 1e-13 * (1 + fabs(t)) || b - a <= 1e-13 * (1 + fabs(t));
        t = tn;
        if (done)
            break;
    }
    for (int k = b0; k < b1; k++)
        o->delta[k] = exp(t);
}

/* The evidence at delta and sigma, counted; -inf where P is not PD. */
static double evidence_at(opt_ctx *o, const double *delta, double sigma)
{
    cv_laplace_terms t;
    cv_err e2 = {0};
    o->evals++;
    if (cv_laplace_eval(o->L, delta, sigma, o->T, &t, NULL, &e2)) {
        if (e2.status == CV_ENOMEM && !o->failed) {
            *o->e = e2;
            o->failed = 1;
        }
        return -INFINITY;
    }
    return t.log_marginal_likelihood;
}

/* Gradient and Hessian of the evidence (DENSE, one delta per block) in
 * x = (t_1..t_nb, s), t_b = log delta_b, s = log sigma, from P^-1 (Cholesky,
 * then its inverse), with tr_b = tr_b(P^-1), F_bc = ||(P^-1)_bc||_F^2,
 * s_b = ||theta_b||^2, gamma = n - sum_b delta_b tr_b = tr(P^-1 g G):
 *   df/dt_b        = 1/2 (dim_b - delta_b tr_b - delta_b s_b)
 *   d2f/dt_b dt_c  = 1/2 delta_b delta_c F_bc - [b = c] 1/2 delta_b (tr_b + s_b)
 *   df/ds          = 2 g nll - N C + gamma
 *   d2f/ds dt_b    = -delta_b tr_b + delta_b sum_c delta_c F_bc
 *   d2f/ds2        = -4 g nll - 2 sum_b delta_b (tr_b - sum_c delta_c F_bc)
 * (the s entries only for a Gaussian likelihood).  grad: nb + 1, H: (nb + 1)^2
 * column-major; M: dim^2 scratch, w: nb + nb^2 scratch.  0, or -1 (not PD). */
static int dense_derivatives(const cv_laplace *L, const double *delta, double g, double *M,
                             double *w, double *grad, double *H)
{
    size_t n = L->dim;
    int nb = L->nblocks, m = nb + 1;
    for (size_t i = 0; i < n * n; i++)
        M[i] = g * L->G[i];
    for (size_t i = 0; i < n; i++)
        M[i * n + i] += delta[L->owner[i]];
    if (LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'L', (lapack_int)n, M, (lapack_int)n) != 0 ||
        LAPACKE_dpotri(LAPACK_COL_MAJOR, 'L', (lapack_int)n, M, (lapack_int)n) != 0)
        return -1;
    double *tr = w, *F = w + nb;
    memset(w, 0, sizeof(double) * (size_t)(nb + nb * nb));
    for (size_t j = 0; j < n; j++) {
        int bj = L->owner[j];
        tr[bj] += M[j * n + j];
        F[bj * nb + bj] += M[j * n + j] * M[j * n + j];
        for (size_t i = j + 1; i < n; i++) {
            double v2 = M[j * n + i] * M[j * n + i];
            int bi = L->owner[i];
            F[bi * nb + bj] += v2;
            F[bj * nb + bi] += v2;
        }
    }
    double gamma = (double)n, hss = -4 * g * L->nll;
    for (int b = 0; b < nb; b++) {
        double db = delta[b], sb = L->blocks[b].sq_norm, dF = 0;
        for (int c = 0; c < nb; c++) {
            H[c * m + b] = 0.5 * db * delta[c] * F[b * nb + c];
            dF += delta[c] * F[b * nb + c];
        }
        H[b * m + b] -= 0.5 * db * (tr[b] + sb);
        grad[b] = 0.5 * ((double)L->blocks[b].dim - db * tr[b] - db * sb);
        gamma -= db * tr[b];
        H[nb * m + b] = H[b * m + nb] = -db * tr[b] + db * dF;
        hss -= 2 * db * (tr[b] - dF);
    }
    grad[nb] = 2 * g * L->nll - L->n_outputs + gamma;
    H[nb * m + nb] = hss;
    return 0;
}

/* DENSE (one delta per block): Newton's method in the log delta's (opt_prior)
 * and log sigma (opt_sigma) with a backtracking line search, instead of a
 * golden-section search per coordinate (each evaluation is a Cholesky
 * factorization).  Updates o->delta and *o->sigma; returns the evidence. */
static double dense_newton(opt_ctx *o, int opt_prior, int opt_sigma)
{
    const cv_laplace *L = o->L;
    int nb = L->nblocks, m = nb + 1, nv = 0, var[CV_LAPLACE_MAX_NEWTON];
    size_t n = L->dim, mm = (size_t)m * (size_t)m;
    for (int b = 0; b < nb && opt_prior && nv < CV_LAPLACE_MAX_NEWTON - 1; b++)
        var[nv++] = b;
    if (opt_sigma)
        var[nv++] = nb;
    double *M = malloc(sizeof(double) * (n ? n * n : 1));
    double *w = malloc(sizeof(double) * ((size_t)nb + (size_t)nb * nb + 4 * (size_t)m + 2 * mm));
    if (!M || !w) {
        free(M);
        free(w);
        cv_err_set(o->e, CV_ENOMEM, "out_of_memory", "", "Newton workspace");
        o->failed = 1;
        return -INFINITY;
    }
    double *grad = w + nb + (size_t)nb * nb, *H = grad + m, *A = H + mm, *p = A + mm,
           *x = p + m, *trial = x + m;
    double tlo = log(CV_LAPLACE_DELTA_MIN), thi = log(CV_LAPLACE_DELTA_MAX);
    double slo = log(CV_LAPLACE_SIGMA_MIN), shi = log(CV_LAPLACE_SIGMA_MAX);
    for (int b = 0; b < nb; b++)
        x[b] = fmin(fmax(log(o->delta[b]), tlo), thi);
    x[nb] = fmin(fmax(log(*o->sigma), slo), shi);
    for (int b = 0; b < nb; b++)
        trial[b] = exp(x[b]);
    double f = evidence_at(o, trial, exp(x[nb])), dmax = 1;
    for (int b = 0; b < nb; b++)
        dmax = fmax(dmax, (double)L->blocks[b].dim);
    for (int it = 0; it < 100 && isfinite(f) && !o->failed; it++) {
        double sg = L->gaussian ? exp(x[nb]) : 1.0, g = 1.0 / (sg * sg * o->T);
        for (int b = 0; b < nb; b++)
            trial[b] = exp(x[b]);
        if (dense_derivatives(L, trial, g, M, w, grad, H))
            break;
        double gmax = 0;
        for (int i = 0; i < nv; i++)
            gmax = fmax(gmax, fabs(grad[var[i]]));
        if (gmax < 1e-10 * (dmax + L->n_outputs))
            break;
        /* p = (-H)^-1 grad on the variables (-H is positive definite where f is
         * strictly concave); steepest ascent otherwise */
        for (int j = 0; j < nv; j++) {
            for (int i = 0; i < nv; i++)
                A[j * nv + i] = -H[var[j] * m + var[i]];
            p[j] = grad[var[j]];
        }
        if (LAPACKE_dposv(LAPACK_COL_MAJOR, 'L', nv, 1, A, nv, p, nv) != 0)
            for (int j = 0; j < nv; j++)
                p[j] = grad[var[j]];
        double slope = 0, pmax = 0;
        for (int j = 0; j < nv; j++)
            pmax = fmax(pmax, fabs(p[j]));
        for (int j = 0; j < nv && pmax > 5; j++) /* at most a factor e^5 per step */
            p[j] *= 5 / pmax;
        for (int j = 0; j < nv; j++)
            slope += grad[var[j]] * p[j];
        double alpha = 1, fnew = -INFINITY, xs = x[nb];
        int accepted = 0;
        for (int ls = 0; ls < 40 && !o->failed; ls++, alpha *= 0.5) {
            for (int b = 0; b < nb; b++)
                trial[b] = exp(x[b]);
            xs = x[nb];
            for (int j = 0; j < nv; j++) {
                int v = var[j];
                if (v < nb)
                    trial[v] = exp(fmin(fmax(x[v] + alpha * p[j], tlo), thi));
                else
                    xs = fmin(fmax(x[nb] + alpha * p[j], slo), shi);
            }
            fnew = evidence_at(o, trial, exp(xs));
            if (fnew >= f + 1e-4 * alpha * slope) {
                accepted = 1;
                break;
            }
        }
        if (!accepted || fnew <= f)
            break;
        for (int b = 0; b < nb; b++)
            x[b] = log(trial[b]);
        x[nb] = xs;
        double gain = fnew - f;
        f = fnew;
        if (gain <= 1e-15 * (1 + fabs(f)))
            break;
    }
    for (int b = 0; b < nb; b++)
        o->delta[b] = exp(x[b]);
    if (opt_sigma)
        *o->sigma = exp(x[nb]);
    free(M);
    free(w);
    return f;
}

int cv_laplace_optimize(const cv_laplace *L, double *delta, int per_block, int opt_prior,
                        double *sigma, int opt_sigma, double temperature, int *evals,
                        cv_err *e)
{
    opt_ctx o = {L, delta, sigma, temperature, 0, 0, e, 0};
    if (!L->gaussian)
        opt_sigma = 0;
    double dlo = log(CV_LAPLACE_DELTA_MIN), dhi = log(CV_LAPLACE_DELTA_MAX);
    double slo = log(CV_LAPLACE_SIGMA_MIN), shi = log(CV_LAPLACE_SIGMA_MAX);
    int ncoord = opt_prior ? (per_block ? L->nblocks : 1) : 0;
    double prev = -INFINITY;
    for (int sweep = 0; sweep < 100 && (ncoord || opt_sigma); sweep++) {
        double cur = -INFINITY;
        if (L->kind == CV_LAPLACE_DENSE && (per_block || !opt_prior) &&
            L->nblocks < CV_LAPLACE_MAX_NEWTON) {
            /* every coordinate at once: one pass */
            cur = dense_newton(&o, opt_prior, opt_sigma);
            break;
        }
        for (int c = 0; c < ncoord && !o.failed; c++) {
            o.coord = per_block ? c : -2;
            double x0 = log(fmin(fmax(delta[per_block ? c : 0], CV_LAPLACE_DELTA_MIN),
                                 CV_LAPLACE_DELTA_MAX));
            if (L->kind == CV_LAPLACE_SPECTRA) /* separable: Newton on f' */
                spectra_newton(&o, per_block ? c : 0, per_block ? c + 1 : L->nblocks, x0);
            else
                cur = golden(&o, dlo, dhi, x0);
        }
        if (L->kind == CV_LAPLACE_SPECTRA && ncoord && !o.failed)
            cur = evidence_at(&o, delta, *sigma);
        if (opt_sigma && !o.failed) {
            o.coord = -1;
            double x0 = log(fmin(fmax(*sigma, CV_LAPLACE_SIGMA_MIN), CV_LAPLACE_SIGMA_MAX));
            cur = golden(&o, slo, shi, x0);
        }
        if (o.failed)
            break;
        /* one coordinate (or separable blocks without sigma): one sweep is exact */
        if ((ncoord + opt_sigma == 1) ||
            (L->kind == CV_LAPLACE_SPECTRA && !opt_sigma) ||
            (isfinite(prev) && cur - prev <= 1e-12 * (1 + fabs(cur))))
            break;
        prev = cur;
    }
    if (evals)
        *evals = o.evals;
    if (o.failed)
        return -1;
    cv_laplace_terms t;
    return cv_laplace_eval(L, delta, *sigma, temperature, &t, NULL, e);
}
