/* layer.c - what every layer class shares: default attributes from the field
 * table, tensor declarations for layout hooks, sliding-window output sizes
 * for infer hooks, the release of forward caches, and the accumulation
 * helpers of the Kronecker-factor kernels, the diag_add kernel of the layers
 * that square their per_sample gradients. */
#include "layer.h"
#include "bigmem.h"

#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <cblas.h>
#include <stdlib.h>
#include <string.h>

void cv_layer_ctx_release(cv_layer_ctx *c)
{
    free(c->d1);
    free(c->d2);
    free(c->idx);
    c->d1 = c->d2 = NULL;
    c->idx = NULL;
    c->cache_bytes = 0;
}

void *cv_layer_cache(cv_layer_ctx *c, size_t bytes)
{
    void *p = cv_big_malloc(bytes ? bytes : 1);
    if (p)
        c->cache_bytes += bytes ? bytes : 1;
    return p;
}

int cv_layer_diag_per_sample(const cv_layer_ctx *c, int k, const float *gy, int per_sample,
                             double *d)
{
    size_t P = c->nparam, n = (size_t)c->n;
    if (!P || !n)
        return 0;
    float *G = malloc(sizeof(float) * n * P);
    if (!G)
        return -1;
    for (int j = 0; j < k; j++) {
        c->L->cls->ops->per_sample(c, gy + (size_t)j * n * c->out_numel, G);
        for (size_t i = 0; i < n; i++) {
            const float *g = G + i * P;
            double *di = per_sample ? d + i * P : d;
            for (size_t p = 0; p < P; p++)
                di[p] += (double)g[p] * (double)g[p];
        }
    }
    free(G);
    return 0;
}

void cv_kron_add_sym(int m, const float *S, double w, double *M, int ldm)
{
    for (int i = 0; i < m; i++)
        for (int j = i; j < m; j++) {
            double v = w * S[(size_t)i * m + j];
            M[(size_t)i * ldm + j] += v;
            if (j != i)
                M[(size_t)j * ldm + i] += v;
        }
}

/* Column panels of KRON_PANEL: the float scratch is n x KRON_PANEL (3.2 MB for
 * n = 3136), not n x n, and each panel is added while it is in cache. */
#define KRON_PANEL 256

/* Up to this many bytes of float scratch the Gram comes from one ssyrk (half
 * the products of a GEMM, and one BLAS call: ~1.5-2x faster than the panels
 * at n = 513-785, m = 512); larger Grams (im2col'd convolutions) use panels. */
#define KRON_SYRK_MAX_BYTES ((size_t)8 << 20)

/* Tile edge of the lower triangle's copy into M (add_lower_sym). */
#define KRON_TILE 64

/* M += w S for the n x n symmetric S given by its lower triangle (row-major):
 * both triangles of M, every entry by the same single addition as a plain
 * copy.  In tiles, each in two passes that write M along its rows: the lower
 * part from S's rows, the upper from S's columns.  Writing M's upper part down
 * its columns instead (one store per row of M) took 1.8 ms at n = 512, whose
 * 4 KiB rows all map to one L1 set, against 0.1-0.3 ms now (0.5 ms vs 0.25
 * ms at n = 785; the ssyrk itself: ~3.8 ms). */
static void add_lower_sym(const float *S, int n, double w, double *M, int ldm)
{
    for (int i0 = 0; i0 < n; i0 += KRON_TILE) {
        int i1 = n - i0 < KRON_TILE ? n : i0 + KRON_TILE;
        for (int j0 = 0; j0 <= i0; j0 += KRON_TILE) {
            int j1 = n - j0 < KRON_TILE ? n : j0 + KRON_TILE;
            for (int i = i0; i < i1; i++) { /* lower part and diagonal: rows of S and M */
                const float *Si = S + (size_t)i * n;
                double *Mi = M + (size_t)i * ldm;
                int je = j1 < i ? j1 : i;
                for (int j = j0; j < je; j++)
                    Mi[j] += w * Si[j];
                if (i >= j0 && i < j1)
                    Mi[i] += w * Si[i];
            }
            for (int j = j0; j < j1; j++) { /* upper part: M's row j from S's column j */
                double *Mj = M + (size_t)j * ldm;
                for (int i = i0 > j + 1 ? i0 : j + 1; i < i1; i++)
                    Mj[i] += w * S[(size_t)i * n + j];
            }
        }
    }
}

static int gram_add_syrk(const float *X, size_t m, int n, double w, double *M, int ldm)
{
    float *S = cv_big_malloc_populated(sizeof(float) * (size_t)n * n); /* written whole */
    if (!S)
        return -1;
    cblas_ssyrk(CblasRowMajor, CblasLower, CblasTrans, n, (int)m, 1.0f, X, n, 0.0f, S, n);
    add_lower_sym(S, n, w, M, ldm);
    free(S);
    return 0;
}

int cv_kron_gram_add(const float *X, size_t m, int n, double w, double *M, int ldm)
{
    if (n < 1 || m < 1)
        return 0;
    if (sizeof(float) * (size_t)n * (size_t)n <= KRON_SYRK_MAX_BYTES && m <= (size_t)INT_MAX)
        return gram_add_syrk(X, m, n, w, M, ldm);
    int pb = n < KRON_PANEL ? n : KRON_PANEL;
    float *P = malloc(sizeof(float) * (size_t)n * pb);
    if (!P)
        return -1;
    for (int j0 = 0; j0 < n; j0 += pb) {
        int jb = n - j0 < pb ? n - j0 : pb, rows = n - j0;
        /* P (rows x jb) = X[:, j0:n]^T X[:, j0:j0+jb]: the lower part of columns
         * j0..j0+jb (the diagonal block in full) */
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, rows, jb, (int)m, 1.0f, X + j0, n,
                    X + j0, n, 0.0f, P, jb);
        for (int r = 0; r < rows; r++) { /* row j0 + r, columns j0..j0+min(r, jb-1) */
            double *Mr = M + (size_t)(j0 + r) * ldm + j0;
            const float *Pr = P + (size_t)r * jb;
            int cmax = r < jb ? r + 1 : jb;
            for (int q = 0; q < cmax; q++)
                Mr[q] += w * Pr[q];
        }
        for (int q = 0; q < jb; q++) { /* row j0 + q, columns after the diagonal */
            double *Mq = M + (size_t)(j0 + q) * ldm + j0;
            for (int r = q + 1; r < rows; r++)
                Mq[r] += w * P[(size_t)r * jb + q];
        }
    }
    free(P);
    return 0;
}

void cv_kron_add_bias(int m, const double *sum, double w, double count, double *M)
{
    size_t ld = (size_t)m + 1;
    for (int i = 0; i < m; i++) {
        M[(size_t)i * ld + m] += w * sum[i];
        M[(size_t)m * ld + i] += w * sum[i];
    }
    M[(size_t)m * ld + m] += count;
}

void cv_kron_ekfac_rotate_add(int da, int db, const double *G, const double *qa,
                              const double *qb, double *work, double *s)
{
    /* work = G Q_A (qa read row-major is Q_A^T), then s += (Q_B^T work).^2, one row of
     * Q_B^T (= row p of qb read row-major) at a time into G's shape */
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, db, da, da, 1.0, G, da, qa, da, 0.0,
                work, da);
    for (int p = 0; p < db; p++)
        for (int q = 0; q < da; q++) {
            double v = 0;
            for (int o = 0; o < db; o++)
                v += qb[(size_t)p * db + o] * work[(size_t)o * da + q];
            s[(size_t)p * da + q] += v * v;
        }
}

static void field_default(const cv_field *f, unsigned char *attr)
{
    if (f->offset == CV_F_NOSTORE)
        return;
    void *p = attr + f->offset;
    switch (f->kind) {
    case CV_F_INT:
    case CV_F_BOOL:
    case CV_F_ENUM:
    case CV_F_FIXED_BOOL:
        *(int *)p = (int)f->def;
        break;
    case CV_F_PAIR:
        ((int *)p)[0] = ((int *)p)[1] = (int)f->def;
        break;
    case CV_F_NUMBER:
        *(double *)p = f->def;
        break;
    case CV_F_DIMS:
        memset(p, 0, sizeof(cv_shape));
        break;
    default: /* FIXED_STRING, FIXED_NULL, IGNORED: nothing stored */
        break;
    }
}

void cv_layer_init(cv_layer *L, const cv_layer_class *cls)
{
    memset(L, 0, sizeof *L);
    L->cls = cls;
    for (int i = 0; i < cls->nfields; i++)
        field_default(&cls->fields[i], L->attr.bytes);
    if (cls->init)
        cls->init(L);
}

static int add_tensor(cv_tensor_info *t, int *count, int max, const char *suffix, int rank,
                      const int *dims)
{
    if (*count >= max || rank < 0 || rank > CV_MAX_RANK)
        return -1;
    cv_tensor_info *ti = &t[(*count)++];
    memset(ti, 0, sizeof *ti);
    snprintf(ti->name, sizeof ti->name, "%s", suffix);
    ti->rank = rank;
    ti->numel = 1;
    for (int i = 0; i < rank; i++) {
        ti->dim[i] = dims[i];
        ti->numel *= (size_t)dims[i];
    }
    return 0;
}

int cv_layer_add_param(cv_layer *L, const char *suffix, int rank, const int *dims)
{
    return add_tensor(L->params, &L->nparams, CV_MAX_LAYER_PARAMS, suffix, rank, dims);
}

int cv_layer_add_buffer(cv_layer *L, const char *suffix, int rank, const int *dims)
{
    return add_tensor(L->buffers, &L->nbuffers, CV_MAX_LAYER_BUFFERS, suffix, rank, dims);
}

/* Output length of a window (kernel k, stride s, dilation d) sliding over an
 * axis of `in` entries with padding lo before and hi after, as PyTorch
 * computes it, in 64-bit so that no configuration the parser accepts can
 * wrap around; -1 if the effective kernel d*(k-1)+1 exceeds the padded input. */
static int64_t window_out(int64_t in, int64_t k, int64_t s, int64_t lo, int64_t hi, int64_t d,
                          int ceil_mode)
{
    int64_t num = in + lo + hi - (d * (k - 1) + 1);
    if (num < 0)
        return -1;
    int64_t out = (ceil_mode ? (num + s - 1) / s : num / s) + 1;
    /* PyTorch: the last window must start inside the (left-padded) input */
    if (ceil_mode && (out - 1) * s >= in + lo)
        out--;
    return out;
}

int cv_layer_window_out(const cv_shape *in, int a, int k, int s, int lo, int hi, int d,
                        int ceil_mode, int *out, cv_err *e)
{
    static const char *const axis[2] = {"height", "width"};
    int64_t n = in->dim[1 + a];
    int64_t eff = (int64_t)d * (k - 1) + 1;
    int64_t o = window_out(n, k, s, lo, hi, d, ceil_mode);
    if (o < 1)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "kernel_size",
                          "kernel_size[%d]: kernel larger than the padded input: kernel_size %d "
                          "with dilation %d spans %lld, the input %s is %lld with padding "
                          "%lld+%lld",
                          a, k, d, (long long)eff, axis[a], (long long)n, (long long)lo,
                          (long long)hi);
    if (o > INT_MAX)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "stride",
                          "stride[%d]: output %s %lld does not fit an int", a, axis[a],
                          (long long)o);
    *out = (int)o;
    return 0;
}
