/* vivit.c - ViViT on one block (see vivit.h): the GGN factor V, its Gram
 * matrix and eigendecomposition, products with V and V^T, per-sample
 * directional derivatives, gradient SNR per layer, bootstrap damping and
 * directionally damped / full damped Newton steps. */
#include "vivit.h"

#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "est_util.h"
#include "loss.h"
#include "rng.h"

#define VV_CHUNK 32

/* ---- small helpers --------------------------------------------------------- */

static void *vv_alloc(size_t count, size_t size, const char *what, cv_err *e)
{
    if (count == 0)
        count = 1;
    if (size && count > (size_t)-1 / size) {
        cv_err_set(e, CV_ETOOLARGE, "too_large", "", "%s: size overflow", what);
        return NULL;
    }
    void *p = calloc(count, size);
    if (!p)
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "%s (%zu bytes)", what, count * size);
    return p;
}

static void vv_count(cv_progress *p, long k)
{
    if (!p)
        return;
    long done = atomic_fetch_add(&p->done, k) + k;
    if (done > atomic_load(&p->planned))
        atomic_store(&p->planned, done);
    if (p->on_progress)
        p->on_progress(p, p->user);
}

static double vv_dot(size_t n, const double *a, const double *b)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

void cv_vivit_options_default(cv_vivit_options *o)
{
    memset(o, 0, sizeof *o);
    o->threshold = -1;
}

void cv_vivit_damping_default(cv_vivit_damping *d)
{
    memset(d, 0, sizeof *d);
    d->damping = 1.0;
}

const char *cv_vivit_gram_path_name(int path)
{
    return path == CV_VIVIT_GRAM_KERNEL ? "kernel" : path == CV_VIVIT_GRAM_EXPLICIT ? "explicit"
                                                                                : "none";
}

static int cmp_int(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

int cv_vivit_subsample(int n, double frac, uint64_t seed, int *idx)
{
    int ns = (int)llround(frac * n);
    ns = ns < 1 ? 1 : (ns > n ? n : ns);
    for (int i = 0; i < n; i++)
        idx[i] = i;
    cv_rng r;
    cv_rng_seed(&r, seed);
    for (int i = 0; i < ns; i++) {
        int j = i + (int)cv_rng_below(&r, (uint64_t)(n - i));
        int t = idx[i];
        idx[i] = idx[j];
        idx[j] = t;
    }
    qsort(idx, (size_t)ns, sizeof(int), cmp_int);
    return ns;
}

/* ---- factor columns ------------------------------------------------------ */

static int setup_subset(cv_vivit *v, const cv_vivit_options *o, cv_err *e)
{
    v->ns = o->subset ? o->n_subset : v->n;
    if (v->ns < 1 || v->ns > v->n)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.subsample",
                          "the curvature needs between 1 and %d samples, got %d", v->n, v->ns);
    v->sub = vv_alloc((size_t)v->ns, sizeof(int), "sample subset", e);
    v->jpos = v->sub ? vv_alloc((size_t)v->ns, sizeof(int), "sample subset", e) : NULL;
    if (!v->jpos)
        return -1;
    for (int i = 0; i < v->ns; i++) {
        v->sub[i] = o->subset ? o->subset[i] : i;
        if (v->sub[i] < 0 || v->sub[i] >= v->n || (i && v->sub[i] <= v->sub[i - 1]))
            return cv_err_set(e, CV_EINVAL, "invalid_option", "options.subsample",
                              "subset indices must be ascending and below %d", v->n);
        v->jpos[i] = o->subset_curv ? i : v->sub[i];
    }
    v->jac = o->subset_curv ? o->subset_curv : v->curv;
    v->nj = (int)cv_curv_batch_size(v->jac);
    if (o->subset_curv && v->nj != v->ns)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.subsample",
                          "the subset engine has %d samples, the subset %d", v->nj, v->ns);
    v->alpha = sqrt((double)v->n / v->ns);
    return 0;
}

static int check_size(const cv_vivit *v, const cv_vivit_options *o, cv_err *e)
{
    size_t lim = o->max_columns ? o->max_columns : CV_VIVIT_MAX_COLUMNS;
    size_t cols = (size_t)v->m * (size_t)v->nj;
    if (cols <= lim)
        return 0;
    /* sub-sampling without a subset engine still backpropagates all samples */
    const char *sub = o->subset_curv ? "options.subsample (a fraction of the batch), " : "";
    return cv_err_set(e, CV_ETOOLARGE, "too_large", "options",
                      "the GGN Gram matrix would have %zu x %zu entries (%d samples x %d "
                      "columns), above the limit of %zu columns; use options.mc (one column "
                      "per sample instead of %d), %sblocks \"layer\" or a smaller batch",
                      cols, cols, v->nj, v->m, lim, v->C, sub);
}

static void exact_columns(cv_vivit *v, const cv_loss_state *ls)
{
    int C = v->C;
    double *tmp = v->S; /* write in place: S_i is C x C row-major, i.e. [c][j] */
    for (int i = 0; i < v->ns; i++) {
        double *Si = tmp + (size_t)i * C * C;
        cv_loss_hessian_sqrt(ls, v->sub[i], Si);
        for (int q = 0; q < C * C; q++)
            Si[q] *= v->alpha;
    }
}

static int mc_columns(cv_vivit *v, const cv_loss_state *ls, uint64_t seed, cv_err *e)
{
    int C = v->C, M = v->m;
    float *s = vv_alloc((size_t)M * v->n * C, sizeof(float), "Monte Carlo samples", e);
    if (!s)
        return -1;
    cv_loss_sample_mc_at(ls, seed, 0, M, s);
    double w = v->alpha * sqrt(v->scale / M);
    for (int i = 0; i < v->ns; i++)
        for (int c = 0; c < C; c++)
            for (int j = 0; j < M; j++)
                v->S[((size_t)i * C + c) * M + j] =
                    w * s[((size_t)j * v->n + v->sub[i]) * C + c];
    free(s);
    return 0;
}

/* cot (k x nj x C, zeroed here): sample jpos(i) of vector q gets
 * sum_j S~_i[:, j] Y[q*R + j*ns + i] (V Y as cotangents). */
static void gram_to_cot(const cv_vivit *v, int k, const double *Y, float *cot)
{
    int C = v->C, m = v->m;
    memset(cot, 0, sizeof(float) * (size_t)k * v->nj * C);
    for (int q = 0; q < k; q++)
        for (int i = 0; i < v->ns; i++) {
            float *ci = cot + ((size_t)q * v->nj + v->jpos[i]) * C;
            const double *Si = v->S + (size_t)i * C * m;
            for (int c = 0; c < C; c++) {
                double a = 0;
                for (int j = 0; j < m; j++)
                    a += Si[(size_t)c * m + j] * Y[(size_t)q * v->R + (size_t)j * v->ns + i];
                ci[c] = (float)a;
            }
        }
}

/* ---- Gram matrix ------------------------------------------------------------ */

/* Gram of the columns through the per-layer kernels; -2 when a layer of the
 * block has no Gram kernel (e cleared). */
static int gram_kernel(cv_vivit *v, cv_err *e)
{
    int C = v->C, m = v->m, nj = v->nj;
    size_t RJ = (size_t)m * nj;
    float *cot = vv_alloc(RJ * C, sizeof(float), "Gram cotangents", e);
    double *G = cot ? vv_alloc(RJ * RJ, sizeof(double), "Gram matrix", e) : NULL;
    if (!G) {
        free(cot);
        return -1;
    }
    for (int i = 0; i < v->ns; i++)
        for (int j = 0; j < m; j++)
            for (int c = 0; c < C; c++)
                cot[((size_t)j * nj + v->jpos[i]) * C + c] =
                    (float)v->S[((size_t)i * C + c) * m + j];
    int rc = cv_curv_gram(v->jac, &v->block, m, cot, G, e);
    free(cot);
    if (rc) {
        free(G);
        if (e && e->status == CV_EINVAL && strcmp(e->code, "unsupported") == 0) {
            cv_err_clear(e);
            return -2;
        }
        return -1;
    }
    vv_count(v->progress, m);
    v->gram_path = CV_VIVIT_GRAM_KERNEL;
    if (nj == v->ns) {
        v->gram = G;
        return 0;
    }
    v->gram = vv_alloc((size_t)v->R * v->R, sizeof(double), "Gram matrix", e);
    if (!v->gram) {
        free(G);
        return -1;
    }
    for (int r = 0; r < v->R; r++)
        for (int q = 0; q < v->R; q++) {
            size_t rf = (size_t)(r / v->ns) * nj + v->jpos[r % v->ns];
            size_t qf = (size_t)(q / v->ns) * nj + v->jpos[q % v->ns];
            v->gram[(size_t)r * v->R + q] = G[rf * RJ + qf];
        }
    free(G);
    return 0;
}

/* Fallback: V column by column (one-sample cotangents), G~ = V^T V. */
static int gram_explicit(cv_vivit *v, cv_err *e)
{
    size_t R = (size_t)v->R, D = v->dim;
    if (D * R > CV_VIVIT_EXPLICIT_MAX)
        return cv_err_set(e, CV_ETOOLARGE, "too_large", "blocks",
                          "this block has a layer without a Gram kernel and its explicit "
                          "factor (%zu x %zu) exceeds the limit; use smaller blocks, "
                          "options.mc or options.subsample", D, R);
    double *V = vv_alloc(D * R, sizeof(double), "explicit factor", e);
    float *cot = V ? vv_alloc((size_t)VV_CHUNK * v->nj * v->C, sizeof(float), "cotangents", e)
                   : NULL;
    double *Y = cot ? vv_alloc(R * VV_CHUNK, sizeof(double), "unit vectors", e) : NULL;
    v->gram = Y ? vv_alloc(R * R, sizeof(double), "Gram matrix", e) : NULL;
    int rc = v->gram ? 0 : -1;
    for (size_t r0 = 0; r0 < R && !rc; r0 += VV_CHUNK) {
        int kk = R - r0 < VV_CHUNK ? (int)(R - r0) : VV_CHUNK;
        memset(Y, 0, sizeof(double) * R * VV_CHUNK);
        for (int q = 0; q < kk; q++)
            Y[(size_t)q * R + r0 + q] = 1.0;
        gram_to_cot(v, kk, Y, cot);
        rc = cv_progress_check(v->progress, e) ? -1
             : cv_curv_vjp(v->jac, &v->block, kk, cot, V + r0 * D, e);
        vv_count(v->progress, kk);
    }
    if (!rc) {
        v->gram_path = CV_VIVIT_GRAM_EXPLICIT;
        cblas_dsyrk(CblasColMajor, CblasUpper, CblasTrans, (int)R, (int)D, 1.0, V, (int)D, 0.0,
                    v->gram, (int)R);
        for (size_t a = 0; a < R; a++)
            for (size_t b = a + 1; b < R; b++)
                v->gram[a * R + b] = v->gram[b * R + a];
    }
    free(V);
    free(cot);
    free(Y);
    return rc;
}

int cv_vivit_init(cv_vivit *v, cv_curv *c, const cv_block *b, const cv_vivit_options *o,
                  cv_err *e)
{
    cv_vivit_options def;
    o = CV_EST_OPTIONS(o, &def, cv_vivit_options_default);
    memset(v, 0, sizeof *v);
    const cv_loss_state *ls = cv_curv_loss_state(c);
    v->curv = c;
    v->block = *b;
    v->dim = b->dim;
    v->n = (int)cv_curv_batch_size(c);
    v->C = ls->C;
    v->m = o->mc > 0 ? o->mc : v->C;
    v->mc = o->mc > 0 ? o->mc : 0;
    v->scale = ls->scale;
    v->threshold = o->threshold;
    v->progress = o->progress;
    int rc = setup_subset(v, o, e);
    if (!rc)
        rc = check_size(v, o, e);
    v->R = v->m * v->ns;
    if (!rc && !(v->S = vv_alloc((size_t)v->ns * v->C * v->m, sizeof(double), "factor", e)))
        rc = -1;
    if (!rc && o->mc > 0)
        rc = mc_columns(v, ls, o->mc_seed, e);
    else if (!rc)
        exact_columns(v, ls);
    if (!rc)
        rc = cv_progress_check(v->progress, e);
    if (!rc)
        cv_progress_plan(v->progress, o->explicit_factor ? v->R : v->m);
    if (!rc && !o->explicit_factor)
        rc = gram_kernel(v, e);
    if (rc == -2 || (!rc && o->explicit_factor))
        rc = gram_explicit(v, e);
    if (rc)
        cv_vivit_free(v);
    return rc ? -1 : 0;
}

void cv_vivit_adopt_subset(cv_vivit *v, cv_curv *jac, cv_batch *batch)
{
    v->own_jac = jac;
    v->own_batch = *batch;
}

void cv_vivit_free(cv_vivit *v)
{
    if (!v)
        return;
    free(v->sub);
    free(v->jpos);
    free(v->S);
    free(v->gram);
    free(v->eigenvalues);
    free(v->gram_vectors);
    cv_curv_free(v->own_jac);
    if (v->own_jac)
        cv_dataset_free(&v->own_batch);
    memset(v, 0, sizeof *v);
}

/* ---- eigendecomposition ------------------------------------------------------ */

int cv_vivit_eigh(cv_vivit *v, cv_err *e)
{
    if (!v->gram)
        return cv_err_set(e, CV_EINTERNAL, "internal", "", "Gram matrix already decomposed");
    int R = v->R;
    double *w = vv_alloc((size_t)R, sizeof(double), "Gram eigenvalues", e);
    if (!w)
        return -1;
    lapack_int info = LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'V', 'U', R, v->gram, R, w);
    if (info) {
        free(w);
        return cv_err_set(e, info == LAPACK_WORK_MEMORY_ERROR ? CV_ENOMEM : CV_EINTERNAL,
                          info == LAPACK_WORK_MEMORY_ERROR ? "out_of_memory" : "internal", "",
                          "Gram eigendecomposition (dsyevd, n = %d) failed: info %d", R,
                          (int)info);
    }
    v->lambda_max = w[R - 1] > 0 ? w[R - 1] : 0;
    v->threshold_used = v->threshold >= 0 ? v->threshold : CV_VIVIT_REL_THRESHOLD * v->lambda_max;
    int K = 0;
    while (K < R && w[R - 1 - K] > v->threshold_used)
        K++;
    v->eigenvalues = vv_alloc((size_t)K, sizeof(double), "eigenvalues", e);
    v->gram_vectors = v->eigenvalues ? vv_alloc((size_t)K * R, sizeof(double), "eigenvectors", e)
                                     : NULL;
    if (!v->gram_vectors) {
        free(w);
        return -1;
    }
    for (int k = 0; k < K; k++) {
        v->eigenvalues[k] = w[R - 1 - k];
        memcpy(v->gram_vectors + (size_t)k * R, v->gram + (size_t)(R - 1 - k) * R,
               sizeof(double) * (size_t)R);
    }
    v->rank = K;
    free(w);
    free(v->gram);
    v->gram = NULL;
    return 0;
}

/* ---- products with V and V^T ---------------------------------------------------- */

int cv_vivit_apply_v(cv_vivit *v, int k, const double *Y, double *X, cv_err *e)
{
    int chunk = k < VV_CHUNK ? k : VV_CHUNK;
    float *cot = vv_alloc((size_t)chunk * v->nj * v->C, sizeof(float), "cotangents", e);
    if (!cot)
        return -1;
    int rc = 0;
    cv_progress_plan(v->progress, k);
    for (int q = 0; q < k && !rc; q += chunk) {
        int kk = k - q < chunk ? k - q : chunk;
        gram_to_cot(v, kk, Y + (size_t)q * v->R, cot);
        rc = cv_progress_check(v->progress, e) ? -1
             : cv_curv_vjp(v->jac, &v->block, kk, cot, X + (size_t)q * v->dim, e);
        vv_count(v->progress, kk);
    }
    free(cot);
    return rc;
}

/* J X on the whole batch for up to VV_CHUNK vectors: out kk x n x C. */
static int jvp_chunk(cv_vivit *v, int kk, const double *X, float *out, cv_err *e)
{
    if (cv_progress_check(v->progress, e) || cv_curv_jvp(v->curv, &v->block, kk, X, out, e))
        return -1;
    vv_count(v->progress, kk);
    return 0;
}

/* Y[:, q] = V^T x_q from JX (kk x n x C). */
static void jx_to_gram(const cv_vivit *v, int kk, const float *JX, double *Y)
{
    int C = v->C, m = v->m;
    for (int q = 0; q < kk; q++)
        for (int i = 0; i < v->ns; i++) {
            const float *jx = JX + ((size_t)q * v->n + v->sub[i]) * C;
            const double *Si = v->S + (size_t)i * C * m;
            for (int j = 0; j < m; j++) {
                double a = 0;
                for (int c = 0; c < C; c++)
                    a += Si[(size_t)c * m + j] * jx[c];
                Y[(size_t)q * v->R + (size_t)j * v->ns + i] = a;
            }
        }
}

int cv_vivit_apply_vt(cv_vivit *v, int k, const double *X, double *Y, cv_err *e)
{
    int chunk = k < VV_CHUNK ? k : VV_CHUNK;
    float *jx = vv_alloc((size_t)chunk * v->n * v->C, sizeof(float), "output tangents", e);
    if (!jx)
        return -1;
    int rc = 0;
    cv_progress_plan(v->progress, k);
    for (int q = 0; q < k && !rc; q += chunk) {
        int kk = k - q < chunk ? k - q : chunk;
        rc = jvp_chunk(v, kk, X + (size_t)q * v->dim, jx, e);
        if (!rc)
            jx_to_gram(v, kk, jx, Y + (size_t)q * v->R);
    }
    free(jx);
    return rc;
}

int cv_vivit_eigenvectors(cv_vivit *v, int k, double *E, cv_err *e)
{
    if (k < 0 || k > v->rank)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.k",
                          "k = %d exceeds the %d eigenpairs above the threshold", k, v->rank);
    if (k == 0)
        return 0;
    double *Y = vv_alloc((size_t)k * v->R, sizeof(double), "Gram vectors", e);
    if (!Y)
        return -1;
    for (int q = 0; q < k; q++)
        for (int r = 0; r < v->R; r++)
            Y[(size_t)q * v->R + r] =
                v->gram_vectors[(size_t)q * v->R + r] / sqrt(v->eigenvalues[q]);
    int rc = cv_vivit_apply_v(v, k, Y, E, e);
    free(Y);
    for (int q = 0; q < k && !rc; q++) {
        double *x = E + (size_t)q * v->dim, nrm = sqrt(vv_dot(v->dim, x, x));
        for (size_t i = 0; i < v->dim && nrm > 0; i++)
            x[i] /= nrm;
    }
    return rc;
}

/* ---- directional derivatives ---------------------------------------------------- */

void cv_vivit_derivs_free(cv_vivit_derivs *d)
{
    if (!d)
        return;
    free(d->gamma);
    free(d->lambda);
    memset(d, 0, sizeof *d);
}

/* gamma and lambda of directions q0..q0+kk from their output tangents. */
static void derivs_chunk(const cv_vivit *v, int q0, int kk, const float *JX, const float *gl,
                         cv_vivit_derivs *d)
{
    int C = v->C, m = v->m;
    for (int q = 0; q < kk; q++) {
        double *gam = d->gamma + (size_t)(q0 + q) * v->n;
        double *lam = d->lambda + (size_t)(q0 + q) * v->ns;
        for (int n = 0; n < v->n; n++) {
            const float *jx = JX + ((size_t)q * v->n + n) * C, *g = gl + (size_t)n * C;
            double a = 0;
            for (int c = 0; c < C; c++)
                a += (double)jx[c] * g[c];
            gam[n] = v->n * v->scale * a;
        }
        for (int i = 0; i < v->ns; i++) {
            const float *jx = JX + ((size_t)q * v->n + v->sub[i]) * C;
            const double *Si = v->S + (size_t)i * C * m;
            double a = 0;
            for (int j = 0; j < m; j++) {
                double t = 0;
                for (int c = 0; c < C; c++)
                    t += Si[(size_t)c * m + j] * jx[c];
                a += t * t;
            }
            lam[i] = v->ns * a;
        }
    }
}

int cv_vivit_directional(cv_vivit *v, int k, const double *E, cv_vivit_derivs *out, cv_err *e)
{
    memset(out, 0, sizeof *out);
    out->n = v->n;
    out->ns = v->ns;
    out->k = k;
    int chunk = k < VV_CHUNK ? (k > 0 ? k : 1) : VV_CHUNK;
    out->gamma = vv_alloc((size_t)k * v->n, sizeof(double), "gamma", e);
    out->lambda = out->gamma ? vv_alloc((size_t)k * v->ns, sizeof(double), "lambda", e) : NULL;
    float *gl = out->lambda ? vv_alloc((size_t)v->n * v->C, sizeof(float), "output grads", e)
                            : NULL;
    float *jx = gl ? vv_alloc((size_t)chunk * v->n * v->C, sizeof(float), "tangents", e) : NULL;
    int rc = jx ? 0 : -1;
    if (!rc) {
        cv_loss_sample_grad(cv_curv_loss_state(v->curv), gl);
        cv_progress_plan(v->progress, k);
    }
    for (int q = 0; q < k && !rc; q += chunk) {
        int kk = k - q < chunk ? k - q : chunk;
        rc = jvp_chunk(v, kk, E + (size_t)q * v->dim, jx, e);
        if (!rc)
            derivs_chunk(v, q, kk, jx, gl, out);
    }
    free(gl);
    free(jx);
    if (rc)
        cv_vivit_derivs_free(out);
    return rc;
}

void cv_vivit_stats(const double *x, int n, cv_vivit_stat *s)
{
    double mean = 0, ss = 0;
    for (int i = 0; i < n; i++)
        mean += x[i];
    mean = n > 0 ? mean / n : NAN;
    for (int i = 0; i < n; i++)
        ss += (x[i] - mean) * (x[i] - mean);
    s->mean = mean;
    s->var = n > 1 ? ss / (n - 1) : NAN;
    if (!(n > 1))
        s->snr = NAN;
    else if (s->var > 0)
        s->snr = mean * mean / s->var;
    else
        s->snr = mean != 0 ? INFINITY : NAN;
}

/* ---- per-parameter gradient SNR ------------------------------------------------- */

/* Adds the per-parameter SNRs of tensor t (a one-tensor block) to g. */
static int gsnr_tensor(cv_curv *c, int t, cv_vivit_gsnr *g, cv_err *e)
{
    const cv_model *m = cv_curv_model(c);
    cv_block tb;
    if (cv_block_from_indices(m, &t, 1, &tb, e))
        return -1;
    int n = (int)cv_curv_batch_size(c);
    double *G = vv_alloc((size_t)n * tb.dim, sizeof(double), "per-sample gradients", e);
    double *col = G ? vv_alloc((size_t)n, sizeof(double), "per-sample gradients", e) : NULL;
    int rc = col ? cv_curv_per_sample_gradients(c, &tb, G, e) : -1;
    for (size_t q = 0; q < tb.dim && !rc; q++) {
        for (int s = 0; s < n; s++)
            col[s] = G[(size_t)s * tb.dim + q];
        cv_vivit_stat st;
        cv_vivit_stats(col, n, &st);
        if (st.var > 0) {
            g->gsnr += st.snr;
            g->params++;
        } else {
            g->zero_variance++;
        }
    }
    free(G);
    free(col);
    return rc;
}

int cv_vivit_gsnr_layers(cv_curv *c, const cv_block *b, cv_vivit_gsnr *out, int max,
                         int *count, cv_progress *p, cv_err *e)
{
    const cv_model *m = cv_curv_model(c);
    *count = 0;
    for (int i = 0; i < b->count; i++) {
        int l = cv_model_param_layer(m, b->idx[i]);
        if (*count == 0 || out[*count - 1].layer != l) {
            if (*count >= max)
                return cv_err_set(e, CV_EINTERNAL, "internal", "", "too many layers");
            cv_vivit_gsnr *g = &out[(*count)++];
            memset(g, 0, sizeof *g);
            g->layer = l;
        }
        cv_vivit_gsnr *g = &out[*count - 1];
        g->block.idx[g->block.count++] = b->idx[i];
        g->block.dim += cv_model_param(m, b->idx[i])->numel;
        if (cv_progress_check(p, e) || gsnr_tensor(c, b->idx[i], g, e))
            return -1;
    }
    for (int i = 0; i < *count; i++)
        out[i].gsnr = out[i].params ? out[i].gsnr / (double)out[i].params : NAN;
    return 0;
}

/* ---- bootstrap damping ------------------------------------------------------------ */

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Linear-interpolation quantile (torch.quantile) of x (n, sorted here). */
static double vv_quantile(double *x, int n, double q)
{
    qsort(x, (size_t)n, sizeof(double), cmp_double);
    double pos = q * (n - 1);
    int lo = (int)floor(pos);
    if (lo >= n - 1)
        return x[n - 1];
    return x[lo] + (pos - lo) * (x[lo + 1] - x[lo]);
}

static double resample_mean(cv_rng *r, const double *x, int n)
{
    double s = 0;
    for (int i = 0; i < n; i++)
        s += x[cv_rng_below(r, (uint64_t)n)];
    return s / n;
}

/* Resampled means (gb, lb: B each) of one direction, in a fixed draw order. */
static void resample_direction(cv_rng *r, const double *gam, int n, const double *lam, int ns,
                               int B, double *gb, double *lb)
{
    for (int b = 0; b < B; b++) {
        if (ns == n) {
            double sg = 0, sl = 0;
            for (int i = 0; i < n; i++) {
                uint64_t j = cv_rng_below(r, (uint64_t)n);
                sg += gam[j];
                sl += lam[j];
            }
            gb[b] = sg / n;
            lb[b] = sl / n;
        } else {
            gb[b] = resample_mean(r, gam, n);
            lb[b] = resample_mean(r, lam, ns);
        }
    }
}

/* delta of the grid maximizing the q-quantile of the gains (>= 0), or INFINITY. */
static double choose_delta(const double *grid, int G, double gbar, double lbar,
                           const double *gb, const double *lb, int B, double q, double *gain)
{
    double best = INFINITY, best_val = -INFINITY;
    for (int t = 0; t < G; t++) {
        if (!(lbar + grid[t] > 0))
            continue;
        double tau = -gbar / (lbar + grid[t]);
        for (int b = 0; b < B; b++)
            gain[b] = -(tau * gb[b] + 0.5 * tau * tau * lb[b]);
        double p = vv_quantile(gain, B, q);
        if (p >= 0 && p > best_val) {
            best_val = p;
            best = grid[t];
        }
    }
    return best;
}

static double *default_grid(int *G, cv_err *e)
{
    *G = CV_VIVIT_GRID_POINTS;
    double *g = vv_alloc((size_t)*G, sizeof(double), "damping grid", e);
    for (int t = 0; g && t < *G; t++)
        g[t] = pow(10.0, -4.0 + 6.0 * t / (*G - 1));
    return g;
}

int cv_vivit_bootstrap_damping(const double *gamma, int n, const double *lambda, int ns, int k,
                               const double *gbar, const double *lbar,
                               const cv_vivit_damping *d, cv_progress *p, double *delta,
                               cv_err *e)
{
    int G = d->grid_n, B = d->samples > 0 ? d->samples : CV_VIVIT_BOOTSTRAP_SAMPLES;
    double q = (d->percentile > 0 ? d->percentile : 5.0) / 100.0;
    if (n < 1 || ns < 1)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.damping",
                          "bootstrap damping needs samples");
    double *own = d->grid ? NULL : default_grid(&G, e);
    const double *grid = d->grid ? d->grid : own;
    double *buf = grid ? vv_alloc((size_t)3 * B, sizeof(double), "bootstrap samples", e) : NULL;
    if (!buf) {
        free(own);
        return -1;
    }
    cv_rng r;
    cv_rng_seed(&r, d->seed);
    int rc = 0;
    for (int j = 0; j < k && !rc; j++) {
        rc = cv_progress_check(p, e);
        if (rc)
            break;
        resample_direction(&r, gamma + (size_t)j * n, n, lambda + (size_t)j * ns, ns, B, buf,
                           buf + B);
        delta[j] = choose_delta(grid, G, gbar[j], lbar[j], buf, buf + B, B, q, buf + 2 * B);
    }
    free(buf);
    free(own);
    return rc ? -1 : 0;
}

/* ---- damped Newton ---------------------------------------------------------------- */

void cv_vivit_newton_free(cv_vivit_newton *r)
{
    if (!r)
        return;
    free(r->step);
    free(r->eigenvalues);
    free(r->gamma_mean);
    free(r->damping);
    free(r->coeff);
    memset(r, 0, sizeof *r);
}

static int newton_alloc(cv_vivit_newton *r, size_t dim, int k, cv_err *e)
{
    r->dim = dim;
    r->k = k;
    r->step = vv_alloc(dim, sizeof(double), "step", e);
    r->eigenvalues = vv_alloc((size_t)k, sizeof(double), "eigenvalues", e);
    r->gamma_mean = vv_alloc((size_t)k, sizeof(double), "gamma", e);
    r->damping = vv_alloc((size_t)k, sizeof(double), "damping", e);
    r->coeff = vv_alloc((size_t)k, sizeof(double), "coefficients", e);
    if (r->step && r->eigenvalues && r->gamma_mean && r->damping && r->coeff)
        return 0;
    cv_vivit_newton_free(r);
    return -1;
}

static int newton_dampings(cv_vivit *v, int k, const double *E, const cv_vivit_damping *d,
                           cv_vivit_newton *r, cv_err *e)
{
    if (!d->bootstrap) {
        for (int j = 0; j < k; j++)
            r->damping[j] = d->damping;
        return 0;
    }
    cv_vivit_derivs dv;
    if (cv_vivit_directional(v, k, E, &dv, e))
        return -1;
    int rc = cv_vivit_bootstrap_damping(dv.gamma, dv.n, dv.lambda, dv.ns, k, r->gamma_mean,
                                        r->eigenvalues, d, v->progress, r->damping, e);
    cv_vivit_derivs_free(&dv);
    return rc;
}

static int newton_combine(cv_vivit_newton *r, const double *E, cv_err *e)
{
    r->predicted_change = 0;
    for (int j = 0; j < r->k; j++) {
        double den = r->eigenvalues[j] + r->damping[j];
        if (isinf(r->damping[j])) {
            r->coeff[j] = 0;
            continue;
        }
        if (!(den > 0))
            return cv_err_set(e, CV_EINVAL, "invalid_option", "options.damping",
                              "eigenvalue %g + damping %g is not positive", r->eigenvalues[j],
                              r->damping[j]);
        double tau = -r->gamma_mean[j] / den;
        r->coeff[j] = tau;
        r->predicted_change += tau * r->gamma_mean[j] + 0.5 * tau * tau * r->eigenvalues[j];
        for (size_t i = 0; i < r->dim; i++)
            r->step[i] += tau * E[(size_t)j * r->dim + i];
    }
    return 0;
}

int cv_vivit_newton_directional(cv_vivit *v, int k, const cv_vivit_damping *d,
                                cv_vivit_newton *out, cv_err *e)
{
    memset(out, 0, sizeof *out);
    if (k < 0 || k > v->rank)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.k",
                          "k = %d exceeds the %d eigenpairs above the threshold", k, v->rank);
    if (newton_alloc(out, v->dim, k, e))
        return -1;
    double *E = vv_alloc((size_t)k * v->dim, sizeof(double), "eigenvectors", e);
    double *g = E ? vv_alloc(v->dim, sizeof(double), "gradient", e) : NULL;
    int rc = g ? 0 : -1;
    if (!rc)
        rc = cv_vivit_eigenvectors(v, k, E, e);
    if (!rc)
        rc = cv_curv_gradient(v->curv, &v->block, g, e);
    for (int j = 0; j < k && !rc; j++) {
        out->eigenvalues[j] = v->eigenvalues[j];
        out->gamma_mean[j] = vv_dot(v->dim, E + (size_t)j * v->dim, g);
    }
    if (!rc)
        rc = newton_dampings(v, k, E, d, out, e);
    if (!rc)
        rc = newton_combine(out, E, e);
    free(E);
    free(g);
    if (rc)
        cv_vivit_newton_free(out);
    return rc;
}

/* y = (delta I + G~)^-1 u in place (Cholesky). */
static int damped_gram_solve(const cv_vivit *v, double delta, double *u, cv_err *e)
{
    size_t R = (size_t)v->R;
    double *A = vv_alloc(R * R, sizeof(double), "damped Gram matrix", e);
    if (!A)
        return -1;
    memcpy(A, v->gram, sizeof(double) * R * R);
    for (size_t i = 0; i < R; i++)
        A[i * R + i] += delta;
    lapack_int info = LAPACKE_dposv(LAPACK_COL_MAJOR, 'U', (int)R, 1, A, (int)R, u, (int)R);
    free(A);
    if (info)
        return cv_err_set(e, CV_EINVAL, "not_positive_definite", "options.damping",
                          "delta I + Gram is not positive definite (dposv info %d); increase "
                          "the damping", (int)info);
    return 0;
}

int cv_vivit_newton_full(cv_vivit *v, double delta, double *step, double *predicted,
                         cv_err *e)
{
    if (!(delta > 0))
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.damping",
                          "the full damped Newton step needs damping > 0, got %g", delta);
    if (!v->gram)
        return cv_err_set(e, CV_EINTERNAL, "internal", "", "Gram matrix already decomposed");
    size_t D = v->dim;
    double *g = vv_alloc(D, sizeof(double), "gradient", e);
    double *u = g ? vv_alloc((size_t)v->R, sizeof(double), "Gram vector", e) : NULL;
    double *vy = u ? vv_alloc(D, sizeof(double), "V y", e) : NULL;
    int rc = vy ? cv_curv_gradient(v->curv, &v->block, g, e) : -1;
    if (!rc)
        rc = cv_vivit_apply_vt(v, 1, g, u, e);
    if (!rc)
        rc = damped_gram_solve(v, delta, u, e);
    if (!rc)
        rc = cv_vivit_apply_v(v, 1, u, vy, e);
    for (size_t i = 0; i < D && !rc; i++)
        step[i] = -(g[i] - vy[i]) / delta;
    if (!rc)
        rc = cv_vivit_apply_vt(v, 1, step, u, e);
    if (!rc)
        *predicted = vv_dot(D, g, step) + 0.5 * vv_dot((size_t)v->R, u, u);
    free(g);
    free(u);
    free(vy);
    return rc;
}
