/* posterior.c - a Laplace posterior's whitening and sampling
 * (engine/posterior.h). */
#include "posterior.h"

#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static int not_pd(cv_err *e)
{
    return cv_err_set(e, CV_EINVAL, "not_positive_definite", "options.prior_precision",
                      "the posterior precision is not positive definite at this prior "
                      "precision (the curvature has a negative eigenvalue below -prior_precision)");
}

static int oom(cv_err *e, const char *what)
{
    return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "%s", what);
}

/* M (n x n) = g M + diag(d) (d NULL: delta), then its lower Cholesky factor. */
static int chol_shifted(double *M, size_t n, double g, const double *d, double delta,
                        cv_err *e)
{
    for (size_t i = 0; i < n * n; i++)
        M[i] *= g;
    for (size_t i = 0; i < n; i++)
        M[i * n + i] += d ? d[i] : delta;
    if (n && LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'L', (lapack_int)n, M, (lapack_int)n) != 0)
        return not_pd(e);
    return 0;
}

int cv_posterior_dense(cv_posterior *P, size_t dim, double *G, double g, const double *p0,
                       cv_err *e)
{
    memset(P, 0, sizeof *P);
    P->kind = CV_POST_DENSE;
    P->dim = dim;
    P->L = G;
    return chol_shifted(G, dim, g, p0, 0, e);
}

int cv_posterior_diag(cv_posterior *P, size_t dim, const double *d, double g, const double *p0,
                      cv_err *e)
{
    memset(P, 0, sizeof *P);
    P->kind = CV_POST_DIAG;
    P->dim = dim;
    if (!(P->p = malloc(sizeof(double) * (dim ? dim : 1))))
        return oom(e, "posterior diagonal");
    for (size_t i = 0; i < dim; i++)
        if (!((P->p[i] = g * d[i] + p0[i]) > 0))
            return not_pd(e);
    return 0;
}

int cv_posterior_blocks(cv_posterior *P, size_t dim, int nslots, cv_err *e)
{
    memset(P, 0, sizeof *P);
    P->kind = CV_POST_BLOCKS;
    P->dim = dim;
    if (!(P->slots = calloc((size_t)(nslots > 0 ? nslots : 1), sizeof *P->slots)))
        return oom(e, "posterior blocks");
    P->nslots = nslots;
    return 0;
}

static int slot_idx(cv_post_slot *s, const size_t *idx, size_t dim, cv_err *e)
{
    s->dim = dim;
    if (!(s->idx = malloc(sizeof(size_t) * (dim ? dim : 1))))
        return oom(e, "posterior block coordinates");
    memcpy(s->idx, idx, sizeof(size_t) * dim);
    s->contiguous = 1;
    for (size_t i = 1; i < dim; i++)
        s->contiguous &= idx[i] == idx[0] + i;
    return 0;
}

int cv_posterior_slot_kron(cv_posterior *P, int i, const size_t *idx, cv_kron_block *kb,
                           double g, double delta, cv_err *e)
{
    cv_post_slot *s = &P->slots[i];
    s->kron = *kb;
    s->is_kron = 1;
    memset(kb, 0, sizeof *kb);
    if (slot_idx(s, idx, s->kron.dim, e))
        return -1;
    if (!(s->s = malloc(sizeof(double) * (s->dim ? s->dim : 1))))
        return oom(e, "posterior eigenvalues");
    if (cv_kron_block_eig(&s->kron, e) || cv_kron_block_products(&s->kron, s->s, e))
        return -1;
    for (size_t c = 0; c < s->dim; c++) /* kept as P's eigenvalues^-1/2 */
        if ((s->s[c] = g * s->s[c] + delta) > 0)
            s->s[c] = 1 / sqrt(s->s[c]);
        else
            return not_pd(e);
    return 0;
}

int cv_posterior_slot_dense(cv_posterior *P, int i, const size_t *idx, size_t dim, double *G,
                            double g, double delta, cv_err *e)
{
    cv_post_slot *s = &P->slots[i];
    s->L = G;
    if (slot_idx(s, idx, dim, e))
        return -1;
    return chol_shifted(G, dim, g, NULL, delta, e);
}

int cv_posterior_lowrank(cv_posterior *P, size_t dim, int k, const double *V, const double *lam,
                         double g, const double *p0, cv_err *e)
{
    memset(P, 0, sizeof *P);
    P->kind = CV_POST_LOWRANK;
    P->dim = dim;
    P->k = k;
    size_t K = (size_t)k;
    P->p = malloc(sizeof(double) * (dim ? dim : 1));
    P->U = malloc(sizeof(double) * (dim * K + 1));
    P->M = calloc(K * K + 1, sizeof(double));
    if (!P->p || !P->U || !P->M)
        return oom(e, "low-rank posterior");
    for (size_t i = 0; i < dim; i++)
        if (!((P->p[i] = p0[i]) > 0))
            return not_pd(e);
    for (size_t j = 0; j < K; j++) { /* U = P0^-1 V S^1/2 */
        double sj = g * lam[j] > 0 ? sqrt(g * lam[j]) : 0;
        for (size_t i = 0; i < dim; i++)
            P->U[j * dim + i] = V[j * dim + i] * sj / P->p[i];
    }
    /* M = I + S^1/2 V^T P0^-1 V S^1/2 = I + (P0^1/2 U)^T (P0^1/2 U) */
    for (size_t a = 0; a < K; a++)
        for (size_t b = 0; b <= a; b++) {
            double t = 0;
            for (size_t i = 0; i < dim; i++)
                t += P->U[a * dim + i] * P->U[b * dim + i] * P->p[i];
            P->M[b * K + a] = P->M[a * K + b] = t + (a == b);
        }
    if (K && LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'L', (lapack_int)K, P->M, (lapack_int)K) != 0)
        return not_pd(e);
    return 0;
}

void cv_posterior_free(cv_posterior *P)
{
    for (int i = 0; P->slots && i < P->nslots; i++) {
        cv_post_slot *s = &P->slots[i];
        free(s->idx);
        free(s->s);
        free(s->L);
        if (s->is_kron)
            cv_kron_block_free(&s->kron);
    }
    free(P->slots);
    free(P->work);
    free(P->L);
    free(P->p);
    free(P->U);
    free(P->M);
    memset(P, 0, sizeof *P);
}

int cv_posterior_minus_rank(const cv_posterior *P)
{
    return P->kind == CV_POST_LOWRANK ? P->k : 0;
}

/* z = Q^T x for one vector x of a Kronecker block (eigen coordinates).  When
 * x's matrix form W~ is of rank one to 1e-6 relative (a Linear layer's
 * per-sample output Jacobian row, b a^T: not a layer that shares weights), as
 * (Q_B^T u) (x) (Q_A^T v) in O(dim_a^2 + dim_b^2) instead of the two-sided
 * rotation's O(dim (dim_a + dim_b)); the rank-one fit's error is below the
 * float32 rounding of the Jacobian itself.  m: dim + 2 dim_b + dim_a scratch. */
static int kron_rotate_one(cv_kron_block *kb, const double *x, double *z, double *m, cv_err *e)
{
    int da = kb->dim_a, db = kb->dim_b, ob = 0;
    double *u = m + kb->dim, *qb = u + db, *qa = qb + db;
    cv_kron_theta_to_mat(kb, 1, x, m); /* column o (dim_a numbers): row o of W~ */
    double tot = 0, best = -1;
    for (int o = 0; o < db; o++) {
        double c = cblas_ddot(da, m + (size_t)o * da, 1, m + (size_t)o * da, 1);
        tot += c;
        if (c > best) {
            best = c;
            ob = o;
        }
    }
    if (!(tot > 0)) {
        memset(z, 0, sizeof(double) * kb->dim);
        return 0;
    }
    const double *v = m + (size_t)ob * da; /* W~ = u v^T: u_o = <v, row o> / <v, v> */
    cblas_dgemv(CblasColMajor, CblasTrans, da, db, 1.0 / best, m, da, v, 1, 0.0, u, 1);
    double uu = cblas_ddot(db, u, 1, u, 1);
    if (tot - best * uu > 1e-12 * tot)
        return cv_kron_block_rotate(kb, 1, x, z, e);
    cblas_dgemv(CblasColMajor, CblasTrans, db, db, 1.0, kb->q_b, db, u, 1, 0.0, qb, 1);
    cblas_dgemv(CblasColMajor, CblasTrans, da, da, 1.0, kb->q_a, da, v, 1, 0.0, qa, 1);
    for (int o = 0; o < db; o++)
        for (int i = 0; i < da; i++)
            z[(size_t)o * da + i] = qb[o] * qa[i];
    return 0;
}

/* Slot s on vector x (the posterior's dim): gather its rows into B, whiten
 * (sample 0) or sample (1) into T, scatter into y.  m: kron_rotate_one's
 * scratch. */
static int slot_apply(cv_post_slot *s, const double *x, double *y, int sample, double *B,
                      double *T, double *m, cv_err *e)
{
    size_t n = s->dim;
    if (s->contiguous && n)
        memcpy(B, x + s->idx[0], sizeof(double) * n);
    else
        for (size_t i = 0; i < n; i++)
            B[i] = x[s->idx[i]];
    if (s->is_kron && !sample) { /* W = diag(s)^-1/2 Q^T x */
        if (kron_rotate_one(&s->kron, B, T, m, e))
            return -1;
        for (size_t c = 0; c < n; c++)
            T[c] *= s->s[c];
    } else if (s->is_kron) { /* R z = Q diag(s)^-1/2 z */
        for (size_t c = 0; c < n; c++)
            B[c] *= s->s[c];
        if (cv_kron_block_unrotate(&s->kron, 1, B, T, e))
            return -1;
    } else { /* P = L L^T: whiten L^-1 x, sample L^-T z */
        memcpy(T, B, sizeof(double) * n);
        if (n)
            cblas_dtrsv(CblasColMajor, CblasLower, sample ? CblasTrans : CblasNoTrans,
                        CblasNonUnit, (int)n, s->L, (int)n, T, 1);
    }
    if (s->contiguous && n)
        memcpy(y + s->idx[0], T, sizeof(double) * n);
    else
        for (size_t i = 0; i < n; i++)
            y[s->idx[i]] = T[i];
    return 0;
}

/* The slots on k vectors; the scratch (6 x the largest slot) is the
 * posterior's, kept between calls (no allocation per vector). */
static int blocks_apply(cv_posterior *P, int k, const double *X, double *Y, int sample,
                        cv_err *e)
{
    size_t most = 0;
    for (int i = 0; i < P->nslots; i++)
        most = P->slots[i].dim > most ? P->slots[i].dim : most;
    if (!P->work && !(P->work = malloc(sizeof(double) * (6 * most + 8))))
        return oom(e, "posterior scratch");
    double *B = P->work, *T = B + most, *m = T + most;
    memset(Y, 0, sizeof(double) * P->dim * (size_t)k); /* coordinates outside every slot */
    for (int j = 0; j < k; j++)
        for (int i = 0; i < P->nslots; i++)
            if (slot_apply(&P->slots[i], X + (size_t)j * P->dim, Y + (size_t)j * P->dim, sample,
                           B, T, m, e))
                return -1;
    return 0;
}

int cv_posterior_whiten(cv_posterior *P, int k, const double *X, double *W, double *Wm,
                        cv_err *e)
{
    size_t D = P->dim, n = D * (size_t)k;
    switch (P->kind) {
    case CV_POST_DENSE:
        memcpy(W, X, sizeof(double) * n);
        if (D)
            cblas_dtrsm(CblasColMajor, CblasLeft, CblasLower, CblasNoTrans, CblasNonUnit, (int)D,
                        k, 1.0, P->L, (int)D, W, (int)D);
        return 0;
    case CV_POST_DIAG:
        for (size_t i = 0; i < n; i++)
            W[i] = X[i] / sqrt(P->p[i % D]);
        return 0;
    case CV_POST_BLOCKS:
        return blocks_apply(P, k, X, W, 0, e);
    case CV_POST_LOWRANK:
        /* P^-1 = P0^-1 - U M^-1 U^T (Woodbury): W = P0^-1/2 X, Wm = L_M^-1 U^T X */
        for (size_t i = 0; i < n; i++)
            W[i] = X[i] / sqrt(P->p[i % D]);
        if (P->k && k) {
            cblas_dgemm(CblasColMajor, CblasTrans, CblasNoTrans, P->k, k, (int)D, 1.0, P->U,
                        (int)D, X, (int)D, 0.0, Wm, P->k);
            cblas_dtrsm(CblasColMajor, CblasLeft, CblasLower, CblasNoTrans, CblasNonUnit, P->k,
                        k, 1.0, P->M, P->k, Wm, P->k);
        }
        return 0;
    }
    return 0;
}

int cv_posterior_sample(cv_posterior *P, const double *z, double *out, cv_err *e)
{
    size_t D = P->dim;
    switch (P->kind) {
    case CV_POST_DENSE:
        memcpy(out, z, sizeof(double) * D);
        if (D)
            cblas_dtrsv(CblasColMajor, CblasLower, CblasTrans, CblasNonUnit, (int)D, P->L,
                        (int)D, out, 1);
        return 0;
    case CV_POST_DIAG:
        for (size_t i = 0; i < D; i++)
            out[i] = z[i] / sqrt(P->p[i]);
        return 0;
    case CV_POST_BLOCKS:
        return blocks_apply(P, 1, z, out, 1, e);
    case CV_POST_LOWRANK:
        break;
    }
    return cv_err_set(e, CV_EINVAL, "invalid_option", "options.return_posterior_samples",
                      "posterior samples are drawn for structure full, diag and kron (and "
                      "last_layer with those); not for lowrank");
}
