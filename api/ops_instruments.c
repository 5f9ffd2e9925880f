/* ops_instruments.c - op "instruments": Cockpit's training instruments
 * (Schneider, Dangel, Hennig 2021) of one model version on one batch
 * (docs/interface.md "Op instruments"; the definitions of issue 24).
 *
 * With g_i = d l_i / d theta the gradient of sample i's unreduced loss l_i
 * (the engine's per-sample rows divided by the reduction scale c) and
 * gbar = (1/n) sum_i g_i, one per-sample gradient pass, layer by layer (the
 * engine's cached forward and output gradients; one layer's n x D_l rows in
 * memory at a time), gives every first-order instrument: gradient_norm,
 * batch_gradient_norms, gradient_histogram (a second pass over the layers
 * once the range is known), norm/inner-product/orthogonality tests,
 * mean_gsnr and M = (1/n) sum_i g_i g_i^T for TIC (Linear layers from their
 * factors in float GEMMs, cancelling sums redone in double: fast_stats).
 * `probes` Rademacher Hessian quadratic forms give hessian_trace, or Hessian
 * products when the Hutchinson diagonal is needed for tic_diag (no exact one);
 * hessian_max_eigenvalue is Lanczos with `lanczos_steps` steps.  The
 * cross-version instruments read the model's earlier versions
 * (cv_op_ctx.history, kept by server/registry.c) and, for alpha/alpha_fit,
 * build a second engine at the previous parameters on the same batch.
 */
#include <cblas.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "api/op_util.h"
#include "api/ops.h"
#include "engine/diag_exact.h"
#include "engine/parallel.h"
#include "engine/estimators.h"
#include "engine/rng.h"

/* The instruments, in the order of INSTRUMENT_NAMES (bit i of a mask). */
enum {
    I_LOSS, I_GRAD_NORM, I_BATCH_NORMS, I_HIST, I_NORM_TEST, I_INNER_TEST, I_ORTHO_TEST,
    I_GSNR, I_TIC_TRACE, I_TIC_DIAG, I_HTRACE, I_HMAX, I_UPDATE, I_DIST, I_ALPHA, I_ALPHA_FIT,
    I_COUNT
};
#define INSTRUMENT_NAMES                                                                   \
    "loss|gradient_norm|batch_gradient_norms|gradient_histogram|norm_test|"                \
    "inner_product_test|orthogonality_test|mean_gsnr|tic_trace|tic_diag|hessian_trace|"    \
    "hessian_max_eigenvalue|update_size|distance_from_init|alpha|alpha_fit"
#define BIT(i) (1u << (i))
#define FIRST_ORDER                                                                        \
    (BIT(I_GRAD_NORM) | BIT(I_BATCH_NORMS) | BIT(I_HIST) | BIT(I_NORM_TEST) |              \
     BIT(I_INNER_TEST) | BIT(I_ORTHO_TEST) | BIT(I_GSNR) | BIT(I_TIC_TRACE) | BIT(I_TIC_DIAG))
#define CROSS (BIT(I_UPDATE) | BIT(I_DIST) | BIT(I_ALPHA) | BIT(I_ALPHA_FIT))
#define PROBE_BLOCK 16 /* Hessian probes per product, at most */
/* ... and at most this many bytes per block of probe vectors: larger blocks are
 * fresh mappings (glibc's mmap threshold, server/util.c cv_tune_allocator) whose
 * page faults every job pays, and are no faster per probe on an MLP */
#define PROBE_BLOCK_BYTES ((size_t)16 << 20)
#define EXACT_DIAG_MAX_COLUMNS 64 /* tic_diag: the exact diagonal up to this many walks */

typedef struct {
    cv_op_base base;
    unsigned include, exclude;
    int probes, bins, lanczos_steps;
    double tic_epsilon;
    /* set at bind (the memory plan): the largest layer without the Linear fast
     * path (per-sample rows formed), the Linear factors' numbers per sample and
     * the largest Linear layer on the fast path */
    size_t max_layer_dim, factor_per_sample, max_fast_dim;
} instr_args;

static const cv_opt_spec instr_opts[] = {
    {"include", CV_OPT_ENUM_LIST, 0, 0, INSTRUMENT_NAMES, offsetof(instr_args, include), NULL},
    {"exclude", CV_OPT_ENUM_LIST, 0, 0, INSTRUMENT_NAMES, offsetof(instr_args, exclude), NULL},
    {"probes", CV_OPT_INT, 1, 10000, NULL, offsetof(instr_args, probes), NULL},
    {"bins", CV_OPT_INT, 1, 100000, NULL, offsetof(instr_args, bins), NULL},
    {"lanczos_steps", CV_OPT_INT, 1, 10000, NULL, offsetof(instr_args, lanczos_steps), NULL},
    {"tic_epsilon", CV_OPT_NUM, 0, 1e300, NULL, offsetof(instr_args, tic_epsilon), NULL},
    CV_OPT_END};
CV_OPT_TABLE_FITS(instr_opts);

static void instr_defaults(void *args, int method)
{
    instr_args *a = args;
    a->probes = 10;
    a->bins = 20;
    a->lanczos_steps = 10;
    a->tic_epsilon = 1e-7;
}

/* The instruments the job computes. */
static unsigned wanted(const cv_opts *o)
{
    const instr_args *a = o->args;
    unsigned all = BIT(I_COUNT) - 1;
    return (cv_opts_given(o, "include") ? a->include : all) & ~a->exclude & all;
}

static int check_instr(const cv_opts *o, cv_curvature kind, cv_err *e)
{
    if (kind != CV_CURV_HESSIAN)
        return cv_err_set(e, CV_EINVAL, "invalid_curvature", "curvature",
                          "instruments use the Hessian (hessian_trace, "
                          "hessian_max_eigenvalue, TIC): leave \"curvature\" out or give "
                          "\"hessian\"");
    if (!wanted(o))
        return cv_err_set(e, CV_EINVAL, "invalid_option",
                          cv_opts_given(o, "exclude") ? "options.exclude" : "options.include",
                          "options.include and options.exclude leave no instrument to compute");
    return 0;
}

/* Layer block lb is one layer whose per-sample gradients come from its
 * factors (engine/curv.h cv_linear_factor_layer); its layer index in *l. */
static int fast_layer(const cv_model *m, const cv_block *lb, int *l)
{
    *l = cv_model_param_layer(m, lb->idx[0]);
    return cv_linear_factor_layer(m, *l) && lb->count == m->layers[*l].nparams;
}

static int bind_instr(const cv_opts *o, const cv_model *m, const cv_block *blocks, int n,
                      cv_err *e)
{
    instr_args *a = o->args;
    if (n != 1 || blocks[0].count != cv_model_param_count(m))
        return cv_err_set(e, CV_EINVAL, "invalid_blocks", "blocks",
                          "instruments use the whole model (per-layer values are in "
                          "\"layers\"): leave \"blocks\" out or give \"full\"");
    cv_block *lay = malloc(sizeof *lay * CV_MAX_LAYERS);
    if (!lay)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "layer blocks");
    int nl = cv_blocks_per_layer(m, lay, CV_MAX_LAYERS), l;
    a->max_layer_dim = a->factor_per_sample = a->max_fast_dim = 0;
    for (int i = 0; i < nl; i++) {
        if (fast_layer(m, &lay[i], &l)) {
            a->factor_per_sample += m->layers[l].in_shape.dim[0] > 0
                                        ? cv_shape_numel(&m->layers[l].in_shape) +
                                              cv_shape_numel(&m->layers[l].out_shape)
                                        : 0;
            a->max_fast_dim = lay[i].dim > a->max_fast_dim ? lay[i].dim : a->max_fast_dim;
        } else if (lay[i].dim > a->max_layer_dim)
            a->max_layer_dim = lay[i].dim;
    }
    free(lay);
    return 0;
}

/* Probes per Hessian product for p probes of dimension D (PROBE_BLOCK_BYTES). */
static int probe_cols(size_t D, int p)
{
    size_t cols = PROBE_BLOCK_BYTES / (sizeof(double) * (D ? D : 1));
    cols = cols < 1 ? 1 : cols > PROBE_BLOCK ? PROBE_BLOCK : cols;
    return (size_t)p < cols ? p : (int)cols;
}

static void mem_instr(const cv_opts *o, cv_curvature kind, const cv_block *b, size_t n, int C,
                      cv_op_memory *m)
{
    const instr_args *a = o->args;
    unsigned w = wanted(o);
    double D = (double)b->dim, v = 8 * D; /* gbar, M's diagonal, deltas, the Hessian diagonal */
    if (w & FIRST_ORDER) /* factors in double then float, a fast layer's float sums and
                          * squared (or transposed) factors, the rows of the others */
        v += ((double)n + 1) * (double)a->max_layer_dim +
             2.5 * (double)n * (double)a->factor_per_sample + (double)a->max_fast_dim +
             3 * D + 10 * (double)n;
    if (w & (BIT(I_HTRACE) | BIT(I_TIC_TRACE) | BIT(I_TIC_DIAG)))
        v += 2.0 * probe_cols(b->dim, a->probes) * D;
    if (w & BIT(I_HMAX))
        v += ((double)a->lanczos_steps + 2) * D;
    m->vector_bytes = cv_op_bytes(v * sizeof(double));
    m->max_vectors = probe_cols(b->dim, a->probes);
    m->pairs = 0;
}

/* ---- helpers ------------------------------------------------------------------ */

/* Block b's entries of a parameter vector p (the model's float layout). */
static void block_values(const cv_model *m, const cv_block *b, const float *p, double *out)
{
    size_t o = 0;
    for (int i = 0; i < b->count; i++) {
        const cv_tensor_info *t = cv_model_param(m, b->idx[i]);
        for (size_t q = 0; q < t->numel; q++)
            out[o++] = p[t->offset + q];
    }
}

/* n, or 1 for 0 (allocation sizes). */
static size_t nz(size_t n) { return n ? n : 1; }

static double norm2(const double *v, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += v[i] * v[i];
    return s;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Quantile q of sorted x[0..n) with linear interpolation (numpy's default). */
static double quantile(const double *x, size_t n, double q)
{
    double pos = q * (double)(n - 1);
    size_t lo = (size_t)floor(pos);
    size_t hi = lo + 1 < n ? lo + 1 : lo;
    return x[lo] + (pos - (double)lo) * (x[hi] - x[lo]);
}

/* out[name] = v, or null with the reason in unavailable[name]. */
static void put_num(cJSON *out, cJSON *unav, const char *name, int ok, double v,
                    const char *reason)
{
    if (ok && isfinite(v)) {
        cJSON_AddNumberToObject(out, name, v);
        return;
    }
    cJSON_AddNullToObject(out, name);
    cJSON_AddStringToObject(unav, name, ok ? "not finite" : reason);
}

/* Sample variance (ddof 1) of x[0..n). */
static double variance(const double *x, size_t n)
{
    if (n < 2)
        return 0;
    double mu = 0, s = 0;
    for (size_t i = 0; i < n; i++)
        mu += x[i];
    mu /= (double)n;
    for (size_t i = 0; i < n; i++)
        s += (x[i] - mu) * (x[i] - mu);
    return s / (double)(n - 1);
}

/* ---- the first-order pass ------------------------------------------------------ */

typedef struct {
    cv_curv *curv;
    const cv_model *m;
    const cv_block *lay;      /* the layer blocks */
    int nl;
    size_t N, D;
    double inv_scale;         /* 1/c: per-sample rows -> g_i */
    const double *delta;      /* theta_v - theta_{v-1} in block order (alpha_fit), or NULL */
    int squares, dots;        /* wanted: M's diagonal (GSNR, TIC), g_i^T gbar (the tests) */
    /* results */
    double *gbar;             /* D */
    double *mdiag;            /* D: M_jj = (1/n) sum_i g_ij^2 */
    double *sq, *dev, *dot, *proj; /* N: ||g_i||^2, ||g_i - gbar||^2, g_i^T gbar, g_i^T delta */
    double *layer_norm2, *layer_gsnr; /* nl */
    size_t *layer_gsnr_count, *layer_excluded;
    double lo, hi;            /* range of the entries */
    double *Gl;               /* N x the largest layer without factors */
    float *fac;               /* the Linear layers' factors (cv_curv_linear_factors) */
    size_t fac_off[CV_MAX_LAYERS], fac_len;
    char fast[CV_MAX_LAYERS]; /* by layer block: from the factors */
    int lidx[CV_MAX_LAYERS];  /* by layer block: its layer */
} first_pass;

/* Per-sample gradients g_i of layer block lb into G (N x lb->dim, row i). */
static int layer_rows(first_pass *f, const cv_block *lb, double *G, cv_err *e)
{
    if (cv_curv_per_sample_gradients(f->curv, lb, G, e))
        return -1;
    size_t len = f->N * lb->dim;
    for (size_t q = 0; q < len; q++)
        G[q] *= f->inv_scale;
    return 0;
}

static void layer_stats(first_pass *f, int l, const double *G, size_t off)
{
    size_t N = f->N, Dl = f->lay[l].dim;
    double *gb = f->gbar + off, *md = f->mdiag + off;
    for (size_t j = 0; j < Dl; j++)
        gb[j] = md[j] = 0;
    for (size_t i = 0; i < N; i++) {
        const double *g = G + i * Dl;
        for (size_t j = 0; j < Dl; j++) {
            gb[j] += g[j];
            md[j] += g[j] * g[j];
            f->lo = g[j] < f->lo ? g[j] : f->lo;
            f->hi = g[j] > f->hi ? g[j] : f->hi;
        }
    }
    double *var = calloc(Dl ? Dl : 1, sizeof(double));
    for (size_t j = 0; j < Dl; j++) {
        gb[j] /= (double)N;
        md[j] /= (double)N;
    }
    for (size_t i = 0; i < N; i++) {
        const double *g = G + i * Dl;
        double sq = 0, dev = 0, dot = 0, proj = 0;
        for (size_t j = 0; j < Dl; j++) {
            double d = g[j] - gb[j];
            sq += g[j] * g[j];
            dev += d * d;
            dot += g[j] * gb[j];
            if (var)
                var[j] += d * d;
            if (f->delta)
                proj += g[j] * f->delta[off + j];
        }
        f->sq[i] += sq;
        f->dev[i] += dev;
        f->dot[i] += dot;
        f->proj[i] += proj;
    }
    double gs = 0;
    size_t cnt = 0, excl = 0;
    for (size_t j = 0; var && j < Dl; j++) {
        double s2 = N > 1 ? var[j] / (double)(N - 1) : 0;
        if (s2 > 0) {
            gs += gb[j] * gb[j] / s2;
            cnt++;
        } else {
            excl++;
        }
    }
    free(var);
    f->layer_norm2[l] = norm2(gb, Dl);
    f->layer_gsnr[l] = gs;
    f->layer_gsnr_count[l] = cnt;
    f->layer_excluded[l] = excl;
}

/* The factors of layer block l: A (N x in), S (N x out), has_bias. */
static void factors_of(const first_pass *f, int l, const float **A, const float **S,
                       size_t *in, size_t *out, int *bias)
{
    const cv_layer *L = &f->m->layers[f->lidx[l]];
    *in = cv_shape_numel(&L->in_shape);
    *out = cv_shape_numel(&L->out_shape);
    *bias = L->nparams > 1;
    *A = f->fac + f->fac_off[f->lidx[l]];
    *S = *A + f->N * *in;
}

typedef struct {
    size_t out;
    const float *S, *U;
    const double *vb;
    double *y;
} rows_job;

/* y_i = s_i^T (u_i + vb) for the samples [i0, i1). */
static void rows_range(void *arg, size_t i0, size_t i1)
{
    const rows_job *j = arg;
    for (size_t i = i0; i < i1; i++) {
        double t = 0;
        const float *s = j->S + i * j->out, *u = j->U + i * j->out;
        for (size_t o = 0; o < j->out; o++)
            t += (double)s[o] * ((double)u[o] + (j->vb ? j->vb[o] : 0));
        j->y[i] = t;
    }
}

/* y_n = s_n^T V a_n + s_n^T v_b for all n (V out x in in float, vb the bias
 * part or NULL): one float GEMM U = A V^T, the sums over o in double. */
static int float_rows(size_t N, size_t in, size_t out, const float *A, const float *S,
                      const float *V, const double *vb, double *y)
{
    float *U = malloc(sizeof(float) * nz(N * out));
    if (!U)
        return -1;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)N, (int)out, (int)in, 1.0f, A,
                (int)in, V, (int)in, 0.0f, U, (int)out);
    rows_job j = {out, S, U, vb, y};
    cv_parallel_for(N, cv_parallel_grain(2 * out), rows_range, &j);
    free(U);
    return 0;
}

/* The same in double for the samples idx[0..n) (all N when idx is NULL):
 * y[k] = s^T V a + s^T vb of sample idx[k] (V out x in in double). */
static int double_rows(size_t in, size_t out, const float *A, const float *S, const double *V,
                       const double *vb, const size_t *idx, size_t n, double *y)
{
    double *X = calloc(nz(n * in), sizeof(double)), *U = malloc(sizeof(double) * nz(n * out));
    if (!X || !U) {
        free(X);
        free(U);
        return -1;
    }
    for (size_t k = 0; k < n; k++)
        for (size_t q = 0; q < in; q++)
            X[k * in + q] = A[(idx ? idx[k] : k) * in + q];
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)out, (int)in, 1.0, X,
                (int)in, V, (int)in, 0.0, U, (int)out);
    for (size_t k = 0; k < n; k++) {
        double t = 0;
        const float *s = S + (idx ? idx[k] : k) * out;
        for (size_t o = 0; o < out; o++)
            t += (double)s[o] * (U[k * out + o] + (vb ? vb[o] : 0));
        y[k] = t;
    }
    free(X);
    free(U);
    return 0;
}

/* A sample's ||g_n - gbar||^2 = ||g_n||^2 - 2 g_n^T gbar + ||gbar||^2 from a
 * float g_n^T gbar is recomputed in double when it keeps less than this
 * fraction of ||g_n||^2 + ||gbar||^2 (g_n close to gbar). */
#define DEV_RECHECK (1.0 / 16)

/* A parameter's sums sum_n g_n and sum_n g_n^2 in float are recomputed in
 * double where the float variance sum g^2 - (sum g)^2 / N keeps less than this
 * fraction of sum g^2 (a cancellation that float rounding would distort: GSNR
 * above about 15), or is not finite. */
#define GSNR_RECHECK (1.0 / 16)

/* Exact (double) sums of entry (o, q) of a Linear layer over the N samples
 * from the transposed factors At (in x N) and St (out x N). */
static void exact_sums(size_t N, const float *st, const float *at, double *sum, double *ss)
{
    double s1 = 0, s2 = 0;
    for (size_t i = 0; i < N; i++) {
        double g = (double)st[i] * (double)at[i]; /* exact: 24 + 24 bits */
        s1 += g;
        s2 += g * g;
    }
    *sum = s1;
    *ss = s2;
}

/* The elementwise passes over the factors, on cv_parallel_for's threads:
 * y = x * x (float), y = (float)xd, zero-column flags of an N x w X. */
typedef struct {
    const float *x;
    const double *xd;
    float *y;
    size_t N, w;
    char *zero;
} map_job;

static void square_range(void *arg, size_t lo, size_t hi)
{
    const map_job *j = arg;
    for (size_t q = lo; q < hi; q++)
        j->y[q] = j->x[q] * j->x[q];
}

static void narrow_range(void *arg, size_t lo, size_t hi)
{
    const map_job *j = arg;
    for (size_t q = lo; q < hi; q++)
        j->y[q] = (float)j->xd[q];
}

static void zero_range(void *arg, size_t q0, size_t q1)
{
    const map_job *j = arg;
    for (size_t q = q0; q < q1; q++)
        j->zero[q] = 1;
    for (size_t i = 0; i < j->N; i++)
        for (size_t q = q0; q < q1; q++)
            j->zero[q] &= j->x[i * j->w + q] == 0;
}

/* y = x .* x over n floats. */
static void squares(const float *x, size_t n, float *y)
{
    map_job j = {x, NULL, y, 0, 0, NULL};
    cv_parallel_for(n, cv_parallel_grain(1), square_range, &j);
}

/* zero[q] = 1 when column q of X (N x w) is zero for every sample. */
static void zero_columns(const float *X, size_t N, size_t w, char *zero)
{
    map_job j = {X, NULL, NULL, N, w, zero};
    cv_parallel_for(w, cv_parallel_grain(N), zero_range, &j);
}

static float *transposed(const float *X, size_t N, size_t w)
{
    float *T = malloc(sizeof(float) * nz(N * w));
    for (size_t i = 0; T && i < N; i++)
        for (size_t q = 0; q < w; q++)
            T[q * N + i] = X[i * w + q];
    return T;
}

typedef struct {
    size_t N, in;
    float *Gf;
    const float *Q;
    const char *zq, *zo;
    double *gb, *md;
} sums_job;

/* Rows [o0, o1) of weight_sums' gb, md and Gf from the float sums; an entry
 * whose variance cancels (GSNR_RECHECK) is left NaN in gb for the exact pass
 * (a NaN sum too: the recheck of `!(variance > ...)`).  Entries of a dead
 * input or output are exactly zero: no recheck. */
static void sums_rows(void *arg, size_t o0, size_t o1)
{
    const sums_job *j = arg;
    double inv = 1.0 / (double)j->N;
    for (size_t o = o0; o < o1; o++) {
        size_t base = o * j->in;
        for (size_t q = 0; q < j->in; q++) {
            double sum = j->Gf[base + q], ss = j->Q[base + q];
            if (!(ss - sum * sum * inv > GSNR_RECHECK * ss) && !j->zq[q] && !j->zo[o]) {
                j->gb[base + q] = NAN;
                continue;
            }
            j->gb[base + q] = sum / (double)j->N;
            j->md[base + q] = ss / (double)j->N;
            j->Gf[base + q] = (float)j->gb[base + q];
        }
    }
}

/* Sums G = S^T A and Q = (S.*S)^T (A.*A) (out x in, float GEMMs) into gb = G/N
 * and md = Q/N (double), the entries whose variance cancels (GSNR_RECHECK)
 * recomputed in double; Gf gets gb in float (for the per-sample products).
 * md NULL: G alone. */
static int weight_sums(size_t N, size_t in, size_t out, const float *A, const float *S,
                       double *gb, double *md, float *Gf, cv_err *e)
{
    size_t W = out * in;
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)out, (int)in, (int)N, 1.0f, S,
                (int)out, A, (int)in, 0.0f, Gf, (int)in);
    if (!md) { /* gbar alone */
        for (size_t j = 0; j < W; j++) {
            gb[j] = Gf[j] / (double)N;
            Gf[j] = (float)gb[j];
        }
        return 0;
    }
    float *A2 = malloc(sizeof(float) * nz(N * in));
    float *S2 = malloc(sizeof(float) * nz(N * out));
    float *Q = malloc(sizeof(float) * nz(W)), *At = NULL, *St = NULL;
    char *zq = malloc(nz(in)), *zo = malloc(nz(out)); /* inputs / outputs zero for all n */
    int rc = A2 && S2 && Q && zq && zo
                 ? 0
                 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "squared factors");
    if (!rc) {
        zero_columns(A, N, in, zq);
        zero_columns(S, N, out, zo);
    }
    if (!rc) {
        squares(A, N * in, A2);
        squares(S, N * out, S2);
    }
    if (!rc)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)out, (int)in, (int)N, 1.0f,
                    S2, (int)out, A2, (int)in, 0.0f, Q, (int)in);
    sums_job sj = {N, in, Gf, Q, zq, zo, gb, md};
    if (!rc)
        cv_parallel_for(out, cv_parallel_grain(in), sums_rows, &sj);
    for (size_t j = 0; !rc && j < W; j++) {
        if (!isnan(gb[j]))
            continue;
        double sum, ss;
        if (!At && (!(At = transposed(A, N, in)) || !(St = transposed(S, N, out)))) {
            rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "transposed factors");
            break;
        }
        exact_sums(N, St + (j / in) * N, At + (j % in) * N, &sum, &ss);
        gb[j] = sum / (double)N;
        md[j] = ss / (double)N;
        Gf[j] = (float)gb[j];
    }
    free(A2);
    free(S2);
    free(Q);
    free(At);
    free(St);
    free(zq);
    free(zo);
    return rc;
}

/* sample_norms over the samples [i0, i1): ||g_n||^2 and the extremes of g_n's entries. */
typedef struct {
    size_t in, out;
    int bias;
    const float *A, *S;
    double *sq, *lo, *hi; /* by sample */
} norms_job;

static void norms_range(void *arg, size_t i0, size_t i1)
{
    const norms_job *j = arg;
    size_t in = j->in, out = j->out;
    const float *A = j->A, *S = j->S;
    for (size_t i = i0; i < i1; i++) {
        double a2 = 0, s2 = 0, amin = INFINITY, amax = -INFINITY, smin = INFINITY, smax = -INFINITY;
        for (size_t q = 0; q < in; q++) {
            double a = A[i * in + q];
            a2 += a * a;
            amin = a < amin ? a : amin;
            amax = a > amax ? a : amax;
        }
        for (size_t q = 0; q < out; q++) {
            double s = S[i * out + q];
            s2 += s * s;
            smin = s < smin ? s : smin;
            smax = s > smax ? s : smax;
        }
        j->sq[i] = s2 * (a2 + (j->bias ? 1 : 0));
        double ext[6] = {smin * amin, smin * amax, smax * amin, smax * amax, smin, smax};
        double lo = INFINITY, hi = -INFINITY;
        for (int q = 0; q < (j->bias ? 6 : 4); q++) {
            lo = fmin(lo, ext[q]);
            hi = fmax(hi, ext[q]);
        }
        j->lo[i] = lo;
        j->hi[i] = hi;
    }
}

/* Sample n's ||g_n||^2 (into sq[n]) and the range of its entries (into *lo,
 * *hi), the samples on cv_parallel_for's threads (minima and maxima: the same
 * whatever the order).  -1: out of memory. */
static int sample_norms(size_t N, size_t in, size_t out, int bias, const float *A,
                        const float *S, double *sq, double *lo, double *hi)
{
    double *ext = malloc(sizeof(double) * 2 * nz(N));
    if (!ext)
        return -1;
    norms_job j = {in, out, bias, A, S, sq, ext, ext + N};
    cv_parallel_for(N, cv_parallel_grain(in + out), norms_range, &j);
    for (size_t i = 0; i < N; i++) {
        *lo = fmin(*lo, ext[i]);
        *hi = fmax(*hi, ext[N + i]);
    }
    free(ext);
    return 0;
}

/* dot[n] = g_n^T gbar of one Linear layer: float_rows, then double_rows for the
 * samples whose ||g_n - gbar||^2 would cancel (DEV_RECHECK). */
static int layer_dots(size_t N, size_t in, size_t out, const float *A, const float *S,
                      const float *Gf, const double *gb, int bias, const double *sq, double g2,
                      double *dot)
{
    size_t *idx = malloc(sizeof(size_t) * nz(N)), n = 0;
    double *y = malloc(sizeof(double) * nz(N));
    const double *vb = bias ? gb + out * in : NULL;
    int rc = idx && y ? float_rows(N, in, out, A, S, Gf, vb, dot) : -1;
    for (size_t i = 0; !rc && i < N; i++)
        if (!(sq[i] - 2 * dot[i] + g2 > DEV_RECHECK * (sq[i] + g2)))
            idx[n++] = i;
    if (!rc && n)
        rc = double_rows(in, out, A, S, gb, vb, idx, n, y);
    for (size_t k = 0; !rc && k < n; k++)
        dot[idx[k]] = y[k];
    free(idx);
    free(y);
    return rc;
}

/* The bias entries of gbar and M's diagonal: the sums of s_n and s_n^2. */
static void bias_sums(size_t N, size_t out, const float *S, double *gb, double *md)
{
    for (size_t o = 0; o < out; o++) {
        double sm = 0, s2 = 0;
        for (size_t i = 0; i < N; i++) {
            double s = S[i * out + o];
            sm += s;
            s2 += s * s;
        }
        gb[o] = sm / (double)N;
        md[o] = s2 / (double)N;
    }
}

/* Layer l's GSNR sum, count and exclusions from gbar and M's diagonal. */
static void layer_gsnr(first_pass *f, int l, const double *gb, const double *md, size_t Dl)
{
    size_t N = f->N, cnt = 0, excl = 0;
    double gs = 0;
    for (size_t j = 0; j < Dl; j++) {
        double ss = md[j] * (double)N, s2 = N > 1 ? (ss - (double)N * gb[j] * gb[j]) / (double)(N - 1) : 0;
        if (s2 > 4 * DBL_EPSILON * ss) {
            gs += gb[j] * gb[j] / s2;
            cnt++;
        } else {
            excl++;
        }
    }
    f->layer_gsnr[l] = gs;
    f->layer_gsnr_count[l] = cnt;
    f->layer_excluded[l] = excl;
}

/* layer_stats from the factors (no n x D rows): gbar = S^T A / N, sum_n g^2 =
 * (S.*S)^T (A.*A) (weight_sums), g_n^T gbar = s_n^T Gbar a_n (layer_dots),
 * ||g_n||^2 = ||s_n||^2 (||a_n||^2 + bias); variances from sum g^2 - N gbar^2
 * (zero to rounding: excluded).  g_n^T delta (alpha_fit) in double. */
static int fast_stats(first_pass *f, int l, size_t off, cv_err *e)
{
    const float *A, *S;
    size_t in, out, N = f->N;
    int bias;
    factors_of(f, l, &A, &S, &in, &out, &bias);
    size_t Dl = f->lay[l].dim, W = out * in;
    double *gb = f->gbar + off, *md = f->mdiag + off;
    float *Gf = malloc(sizeof(float) * nz(W));
    double *dot = malloc(sizeof(double) * nz(N)), *sq = malloc(sizeof(double) * nz(N));
    double *proj = f->delta ? malloc(sizeof(double) * nz(N)) : NULL;
    int rc = Gf && dot && sq && (proj || !f->delta)
                 ? weight_sums(N, in, out, A, S, gb, f->squares ? md : NULL, Gf, e)
                 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "per-sample products");
    if (!rc && bias)
        bias_sums(N, out, S, gb + W, md + W);
    double g2 = norm2(gb, Dl);
    if (!rc && sample_norms(N, in, out, bias, A, S, sq, &f->lo, &f->hi))
        rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "per-sample norms");
    for (size_t i = 0; !f->dots && i < N; i++)
        dot[i] = 0;
    if (!rc && ((f->dots && layer_dots(N, in, out, A, S, Gf, gb, bias, sq, g2, dot)) ||
                (proj && double_rows(in, out, A, S, f->delta + off,
                                     bias ? f->delta + off + W : NULL, NULL, N, proj))))
        rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "per-sample products");
    for (size_t i = 0; !rc && i < N; i++) {
        f->sq[i] += sq[i];
        f->dot[i] += dot[i];
        f->dev[i] += fmax(sq[i] - 2 * dot[i] + g2, 0);
        if (proj)
            f->proj[i] += proj[i];
    }
    if (!rc && f->squares)
        layer_gsnr(f, l, gb, md, Dl);
    f->layer_norm2[l] = g2;
    free(dot);
    free(sq);
    free(proj);
    free(Gf);
    return rc;
}

/* The Linear factors of the fast layers, once (kept in float: the engine's
 * values are float32 inputs and cotangents). */
static int get_factors(first_pass *f, cv_err *e)
{
    char layers[CV_MAX_LAYERS] = {0};
    size_t len = 0;
    int any = 0;
    for (int l = 0; l < f->nl; l++) {
        f->fast[l] = (char)fast_layer(f->m, &f->lay[l], &f->lidx[l]);
        if (!f->fast[l])
            continue;
        const cv_layer *L = &f->m->layers[f->lidx[l]];
        layers[f->lidx[l]] = 1;
        f->fac_off[f->lidx[l]] = len;
        len += f->N * (cv_shape_numel(&L->in_shape) + cv_shape_numel(&L->out_shape));
        any = 1;
    }
    f->fac_len = len;
    if (!any)
        return 0;
    double *d = malloc(sizeof(double) * len);
    f->fac = malloc(sizeof(float) * len);
    int rc = d && f->fac ? cv_curv_linear_factors(f->curv, layers, f->fac_off, d, len, e)
                         : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Linear factors");
    map_job j = {NULL, d, f->fac, 0, 0, NULL};
    if (!rc)
        cv_parallel_for(len, cv_parallel_grain(2), narrow_range, &j);
    free(d);
    return rc;
}

static int run_first_order(first_pass *f, cv_err *e)
{
    size_t off = 0;
    f->lo = INFINITY;
    f->hi = -INFINITY;
    if (get_factors(f, e))
        return -1;
    for (int l = 0; l < f->nl; l++) {
        if (f->fast[l]) {
            if (fast_stats(f, l, off, e))
                return -1;
        } else {
            if (layer_rows(f, &f->lay[l], f->Gl, e))
                return -1;
            layer_stats(f, l, f->Gl, off);
        }
        off += f->lay[l].dim;
    }
    return 0;
}

static long bin_of(double v, double lo, double w, int bins)
{
    long k = (long)((v - lo) * w);
    return k < 0 ? 0 : k >= bins ? bins - 1 : k;
}

/* One sample's sorted inputs a[0..n) with a bucket index: idx[b] is the first
 * position with a >= a[0] + b * step (b < HIST_BUCKETS), idx[HIST_BUCKETS] = n. */
#define HIST_BUCKETS 128
typedef struct {
    const float *a;
    size_t n;
    double amin, amax, inv_step;
    size_t idx[HIST_BUCKETS + 1];
} sorted_row;

static void index_row(sorted_row *r, const float *a, size_t n)
{
    r->a = a;
    r->n = n;
    r->amin = a[0];
    r->amax = a[n - 1];
    double step = (r->amax - r->amin) / HIST_BUCKETS;
    r->inv_step = step > 0 ? 1 / step : 0;
    size_t i = 0;
    for (int b = 0; b < HIST_BUCKETS; b++) {
        double edge = r->amin + b * step;
        while (i < n && a[i] < edge)
            i++;
        r->idx[b] = i;
    }
    r->idx[HIST_BUCKETS] = n;
}

/* About the number of a below x (a guess: run_end makes it exact). */
static size_t count_below(const sorted_row *r, double x)
{
    if (!(x > r->amin))
        return 0;
    if (x > r->amax)
        return r->n;
    double fb = (x - r->amin) * r->inv_step;
    size_t b = fb < HIST_BUCKETS - 1 ? (size_t)fb : HIST_BUCKETS - 1;
    const float *base = r->a + r->idx[b];
    size_t len = r->idx[b + 1] - r->idx[b];
    if (!len)
        return r->idx[b];
    while (len > 1) { /* branch-free halving (a conditional move) */
        size_t half = len / 2;
        base = base[half - 1] < x ? base + half : base;
        len -= half;
    }
    return (size_t)(base - r->a) + (base[0] < x);
}

typedef struct {
    double lo, w;
    int bins;
} bin_rule;

static long bin_at(const bin_rule *br, double so, float a)
{
    return bin_of(so * (double)a, br->lo, br->w, br->bins);
}

/* The end of the run of bin k that starts at q (bin_at(a[q]) == k; the bins
 * are monotone in the position): the first position after q with another
 * bin, or n.  From the guess g by galloping, then bisection: exact whatever g. */
static size_t run_end(const bin_rule *br, double so, const float *a, size_t n, size_t q, long k,
                      size_t g)
{
    size_t lo = q, hi = n, step = 1; /* bin_at(a[lo]) == k; hi == n or bin_at(a[hi]) != k */
    g = g <= q ? q + 1 : g > n ? n : g;
    if (g < n && bin_at(br, so, a[g]) == k) {
        lo = g;
        while (lo + step < n && bin_at(br, so, a[lo + step]) == k) {
            lo += step;
            step *= 2;
        }
        hi = lo + step < n ? lo + step : n;
    } else {
        hi = g;
        while (hi - q > step && bin_at(br, so, a[hi - step]) != k) {
            hi -= step;
            step *= 2;
        }
        lo = hi - q > step ? hi - step : q;
    }
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (bin_at(br, so, a[mid]) == k)
            lo = mid;
        else
            hi = mid;
    }
    return hi;
}

/* The entries s_o a_q (q = 0..n) of one row o, r->a sorted ascending: their
 * bins are monotone in q (the products are exact in double), so each run of
 * equal bins is counted at once, its end found by run_end from the position of
 * the next bin edge in a (count_below): the counts are those of binning the
 * entries one by one. */
static void row_bins(double so, const sorted_row *r, const bin_rule *br, long k, long last,
                     double *counts)
{
    const float *a = r->a;
    size_t n = r->n, q = 0;
    while (k != last) {
        /* bin k ends where s_o a crosses lo + (k + 1)/w (s_o > 0) or lo + k/w;
         * the guess g is the end when a[g - 1] is in bin k and a[g] is not */
        double edge = br->lo + (double)(so > 0 ? k + 1 : k) / br->w;
        size_t g = count_below(r, edge / so), end;
        long next;
        if (g > q && g < n && (next = bin_at(br, so, a[g])) != k && bin_at(br, so, a[g - 1]) == k) {
            end = g;
        } else {
            end = run_end(br, so, a, n, q, k, g);
            next = bin_at(br, so, a[end]); /* end < n: bin last follows */
        }
        counts[k] += (double)(end - q);
        q = end;
        k = next;
    }
    counts[k] += (double)(n - q);
}

/* x[0..n) sorted ascending (LSD radix sort on the order-preserving integer
 * keys of the floats, 8 bits a pass; tmp: n keys of scratch). */
static void sort_floats(float *x, size_t n, uint32_t *key, uint32_t *tmp)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], sizeof u);
        key[i] = u & 0x80000000u ? ~u : u | 0x80000000u;
    }
    for (int shift = 0; shift < 32; shift += 8) {
        size_t cnt[257] = {0};
        for (size_t i = 0; i < n; i++)
            cnt[((key[i] >> shift) & 0xff) + 1]++;
        if (cnt[((key[0] >> shift) & 0xff) + 1] == n)
            continue; /* one digit value: the pass keeps the order */
        for (int b = 0; b < 256; b++)
            cnt[b + 1] += cnt[b];
        for (size_t i = 0; i < n; i++)
            tmp[cnt[(key[i] >> shift) & 0xff]++] = key[i];
        uint32_t *t = key;
        key = tmp;
        tmp = t;
    }
    for (size_t i = 0; i < n; i++) {
        uint32_t u = key[i] & 0x80000000u ? key[i] & 0x7fffffffu : ~key[i];
        memcpy(&x[i], &u, sizeof u);
    }
}

typedef struct {
    const float *A, *S;
    size_t N, in, out, chunks;
    int bias, bins;
    double lo, w;
    double *counts; /* chunks x bins: one histogram per chunk of samples */
    char *failed;   /* by chunk: could not allocate its scratch */
} bins_job;

/* The extremes of a[0..n), n > 0; 0 if some a is NaN (no extremes to bound
 * the bins by). */
static int extremes(const float *a, size_t n, float *amin, float *amax)
{
    float lo = a[0], hi = a[0];
    int nan = 0;
    for (size_t q = 0; q < n; q++) {
        lo = a[q] < lo ? a[q] : lo;
        hi = a[q] > hi ? a[q] : hi;
        nan |= a[q] != a[q];
    }
    *amin = lo;
    *amax = hi;
    return !nan;
}

/* Bins of one sample's entries s_o a_q (and s_o, the bias).  The bins of a
 * row are monotone in a_q (the products are exact in double), so a row whose
 * extremes s_o amin and s_o amax share a bin (s_o = 0, small s_o) lies in
 * that bin whole; the inputs are sorted (into as) once a row spans several
 * bins, and row_bins counts its runs. */
static void sample_bins(const bins_job *j, const bin_rule *br, const float *a, const float *s,
                        float *as, uint32_t *key, sorted_row *row, double *counts)
{
    size_t in = j->in;
    float amin = 0, amax = 0;
    int sorted = 0, bounded = in && extremes(a, in, &amin, &amax);
    for (size_t o = 0; o < j->out; o++) {
        if (j->bias)
            counts[bin_of(s[o], j->lo, j->w, j->bins)] += 1;
        if (!in)
            continue;
        long k0 = bin_at(br, s[o], amin), k1 = bin_at(br, s[o], amax);
        if (bounded && k0 == k1) {
            counts[k0] += (double)in;
            continue;
        }
        if (!sorted) {
            memcpy(as, a, sizeof(float) * in);
            sort_floats(as, in, key, key + in);
            index_row(row, as, in);
            sorted = 1;
        }
        if (!bounded) { /* the bins at the ends of the sorted inputs */
            k0 = bin_at(br, s[o], as[0]);
            k1 = bin_at(br, s[o], as[in - 1]);
        }
        row_bins(s[o], row, br, k0, k1, counts);
    }
}

/* The samples of chunks [c0, c1) (cv_parallel_for): each chunk bins into its own row
 * of counts, so the chunks may run on different threads. */
static void bins_range(void *arg, size_t c0, size_t c1)
{
    bins_job *j = arg;
    size_t in = j->in ? j->in : 1;
    bin_rule br = {j->lo, j->w, j->bins};
    sorted_row row = {0};
    float *as = malloc(sizeof(float) * in);
    uint32_t *key = malloc(sizeof(uint32_t) * 2 * in);
    for (size_t c = c0; c < c1 && (!as || !key); c++)
        j->failed[c] = 1;
    if (!as || !key)
        c1 = c0;
    for (size_t c = c0; c < c1; c++) {
        double *counts = j->counts + c * (size_t)j->bins;
        for (size_t i = j->N * c / j->chunks; i < j->N * (c + 1) / j->chunks; i++)
            sample_bins(j, &br, j->A + i * j->in, j->S + i * j->out, as, key, &row, counts);
    }
    free(as);
    free(key);
}

/* Bins of the entries s_o a_q (and s_o, the bias) of every sample of layer
 * block l, the samples in chunks on cv_parallel_for's threads (the counts are
 * whole numbers: their sum does not depend on the chunking). */
static int fast_bins(const first_pass *f, int l, double lo, double w, int bins, double *counts,
                     cv_err *e)
{
    bins_job j = {.N = f->N, .bins = bins, .lo = lo, .w = w};
    factors_of(f, l, &j.A, &j.S, &j.in, &j.out, &j.bias);
    size_t grain = cv_parallel_grain(j.in * (j.out + 8));
    j.chunks = (size_t)cv_parallel_threads(j.N, grain);
    j.counts = calloc(j.chunks * (size_t)bins, sizeof(double));
    j.failed = calloc(j.chunks, 1);
    int rc = j.counts && j.failed ? 0
                                  : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "histogram counts");
    if (!rc)
        cv_parallel_for(j.chunks, 1, bins_range, &j);
    for (size_t c = 0; !rc && c < j.chunks; c++) {
        if (j.failed[c])
            rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "histogram row");
        for (int k = 0; k < bins; k++)
            counts[k] += j.counts[c * (size_t)bins + k];
    }
    free(j.counts);
    free(j.failed);
    return rc;
}

/* numpy.histogram's bins over [lo, hi] (hi in the last bin; lo == hi widened by 0.5). */
static int run_histogram(first_pass *f, int bins, double *lo, double *hi, double *counts,
                         cv_err *e)
{
    *lo = f->lo;
    *hi = f->hi;
    if (*lo == *hi) {
        *lo -= 0.5;
        *hi += 0.5;
    }
    double w = (double)bins / (*hi - *lo);
    for (int k = 0; k < bins; k++)
        counts[k] = 0;
    for (int l = 0; l < f->nl; l++) {
        if (f->fast[l]) {
            if (fast_bins(f, l, *lo, w, bins, counts, e))
                return -1;
            continue;
        }
        if (layer_rows(f, &f->lay[l], f->Gl, e))
            return -1;
        size_t len = f->N * f->lay[l].dim;
        for (size_t q = 0; q < len; q++) {
            long k = (long)((f->Gl[q] - *lo) * w);
            counts[k < 0 ? 0 : k >= bins ? bins - 1 : k] += 1;
        }
    }
    return 0;
}

/* ---- second order ------------------------------------------------------------- */

/* Hutchinson with p Rademacher probes: the trace samples v^T H v and the
 * diagonal estimate mean_s v_s .* H v_s (diag may be NULL).  Without the
 * diagonal the samples are quadratic forms (cv_linop_quad: one forward-mode
 * pass and the second-order terms, about half a Hessian-vector product), with
 * it products. */
static int hutchinson(cv_op_ctx *c, const cv_block *b, int p, double *samples, double *diag,
                      cv_err *e)
{
    size_t D = b->dim, cols = (size_t)probe_cols(D, p);
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_op_linop(c, b, &op, &lc);
    int products = diag || !op.quad;
    double *V = malloc(sizeof(double) * D * cols);
    double *Y = products ? malloc(sizeof(double) * D * cols) : NULL;
    int rc = V && (Y || !products) ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "probe vectors");
    cv_rng r;
    cv_rng_seed(&r, c->seed);
    cv_progress_plan(c->progress, p);
    if (diag)
        memset(diag, 0, sizeof(double) * D);
    for (int s = 0; s < p && !rc; s += (int)cols) {
        int k = p - s < (int)cols ? p - s : (int)cols;
        for (int j = 0; j < k; j++)
            cv_rng_rademacher(&r, V + (size_t)j * D, D);
        if (!products) {
            rc = cv_linop_quad(&op, k, V, samples + s, NULL, e);
            continue;
        }
        if ((rc = cv_linop_apply(&op, k, V, Y, e)))
            break;
        for (int j = 0; j < k; j++) {
            const double *v = V + (size_t)j * D, *y = Y + (size_t)j * D;
            double t = 0;
            for (size_t q = 0; q < D; q++) {
                t += v[q] * y[q];
                if (diag)
                    diag[q] += v[q] * y[q] / p;
            }
            samples[s + j] = t;
        }
    }
    free(V);
    free(Y);
    return rc;
}

static int run_lambda_max(cv_op_ctx *c, const cv_block *b, int steps, cJSON *out, cJSON *unav,
                          cv_err *e)
{
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_op_linop(c, b, &op, &lc);
    cv_eigen_options eo;
    cv_eigen_options_default(&eo);
    eo.k = 1;
    eo.which = CV_WHICH_LARGEST;
    eo.max_iter = steps < (int)b->dim ? steps : (int)b->dim;
    cv_rng r;
    cv_rng_seed(&r, c->seed ^ 0x1a2c705ull);
    cv_eigen_result er;
    if (cv_eigen_lanczos(&op, &eo, &r, &er, e))
        return -1;
    put_num(out, unav, "hessian_max_eigenvalue", 1, er.eigenvalues[0], "");
    cJSON_AddNumberToObject(out, "hessian_max_eigenvalue_residual", er.residuals[0]);
    cJSON_AddNumberToObject(out, "lanczos_steps", er.iterations);
    cv_eigen_result_free(&er);
    return 0;
}

/* ---- across versions --------------------------------------------------------------- */

/* Cockpit's alpha fit (cockpit/quantities/alpha.py _fit_quadratic and
 * _get_alpha): weighted least squares of q(x) = mu0 + mu1 x + mu2 x^2 through
 * f(0), f(t), f'(0), f'(t) with weights 1/variance (0 -> 1e-10), t = ||delta||;
 * alpha = 2t / (-mu1/mu2) - 1, -1 when mu2 < 0 (concave).  0 with mu, -1 if
 * the normal equations are singular. */
static int alpha_fit(double t, const double f[2], const double df[2], const double vf[2],
                     const double vdf[2], double mu[3], double *alpha)
{
    const double phi[4][3] = {{1, 0, 0}, {1, t, t * t}, {0, 1, 0}, {0, 1, 2 * t}};
    const double y[4] = {f[0], f[1], df[0], df[1]};
    const double var[4] = {vf[0], vf[1], vdf[0], vdf[1]};
    double A[3][4] = {{0}};
    for (int k = 0; k < 4; k++) {
        double w = 1.0 / (var[k] == 0 ? 1e-10 : var[k]);
        for (int a = 0; a < 3; a++) {
            for (int b = 0; b < 3; b++)
                A[a][b] += w * phi[k][a] * phi[k][b];
            A[a][3] += w * phi[k][a] * y[k];
        }
    }
    for (int col = 0; col < 3; col++) { /* Gaussian elimination, partial pivoting */
        int piv = col;
        for (int r = col + 1; r < 3; r++)
            if (fabs(A[r][col]) > fabs(A[piv][col]))
                piv = r;
        if (A[piv][col] == 0 || !isfinite(A[piv][col]))
            return -1;
        for (int q = 0; q < 4; q++) {
            double tmp = A[col][q];
            A[col][q] = A[piv][q];
            A[piv][q] = tmp;
        }
        for (int r = 0; r < 3; r++) {
            if (r == col)
                continue;
            double fct = A[r][col] / A[col][col];
            for (int q = col; q < 4; q++)
                A[r][q] -= fct * A[col][q];
        }
    }
    for (int a = 0; a < 3; a++)
        mu[a] = A[a][3] / A[a][a];
    *alpha = mu[2] < 0 ? -1 : 2 * t / (-mu[1] / mu[2]) - 1;
    return 0;
}

typedef struct {
    double f0, f1, d0;        /* the batch loss L at theta_{v-1}, theta_v; grad L(theta_{v-1})^T delta */
    double mf[2], md[2];      /* mean-loss units: (1/n) sum l_i and gbar^T delta / ||delta|| */
    double vf[2], vd[2];      /* their sample variances over i */
} cross_vals;

static int alloc_pass(first_pass *f, size_t maxdim, cv_err *e);
static void free_pass(first_pass *f);

/* Loss, projected gradient and per-sample spreads at the previous parameters,
 * from a second engine on the same batch (per_sample: the first-order pass
 * there, for alpha_fit's spread of the projected gradients). */
static int at_previous(cv_op_ctx *c, const cv_block *b, const cv_block *lay, int nl,
                       const float *prev, const double *delta, double dnorm, size_t maxdim,
                       int per_sample, cross_vals *cv, cv_err *e)
{
    const cv_model *m = c->m;
    size_t N = cv_curv_batch_size(c->curv), D = b->dim;
    cv_model *pm = malloc(sizeof *pm);
    if (!pm || cv_model_clone(m, pm)) {
        free(pm);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "model copy");
    }
    memcpy(pm->params, prev, sizeof(float) * m->nparams_total);
    cv_curv_options co = *cv_curv_get_options(c->curv);
    cv_curv_release_states(c->curv); /* its budget goes to the second engine */
    cv_curv *e0 = cv_curv_new(pm, cv_curv_batch(c->curv, NULL), &co, e);
    double *G = NULL;
    int rc = e0 ? 0 : -1;
    first_pass f = {0};
    if (!rc) {
        double scale = cv_curv_loss_state(e0)->scale;
        cv->f0 = cv_curv_loss(e0);
        double *lossv = malloc(sizeof(double) * N);
        if (lossv) {
            const cv_loss_state *ls = cv_curv_loss_state(e0);
            for (size_t i = 0; i < N; i++)
                lossv[i] = cv_loss_sample(ls, (int)i);
            cv->vf[0] = variance(lossv, N);
        }
        free(lossv);
        cv->mf[0] = cv->f0 / (scale * (double)N);
        if (per_sample) {
            f.curv = e0;
            f.m = pm;
            f.lay = lay;
            f.nl = nl;
            f.N = N;
            f.D = D;
            f.inv_scale = 1.0 / scale;
            f.delta = delta;
            rc = alloc_pass(&f, maxdim, e) || run_first_order(&f, e) ? -1 : 0;
            if (!rc) {
                double sum = 0;
                for (size_t i = 0; i < N; i++)
                    sum += f.proj[i];
                cv->d0 = sum * scale; /* grad L = c sum_i g_i */
                for (size_t i = 0; i < N; i++)
                    f.proj[i] /= dnorm;
                cv->md[0] = sum / (double)N / dnorm;
                cv->vd[0] = variance(f.proj, N);
            }
        } else {
            G = malloc(sizeof(double) * (D ? D : 1));
            rc = G ? cv_curv_gradient(e0, b, G, e)
                   : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "gradient");
            if (!rc) {
                double sum = 0;
                for (size_t j = 0; j < D; j++)
                    sum += G[j] * delta[j];
                cv->d0 = sum;
            }
        }
    }
    free_pass(&f);
    free(G);
    cv_curv_free(e0);
    cv_model_free(pm);
    free(pm);
    return rc;
}

/* The alpha of issue 24 from f0, f1, d0: a = f1 - f0 - d0, alpha = 1/s* - 1
 * with s* = -d0 / (2a); null when a <= 0 or d0 = 0. */
static void put_alpha(const cross_vals *v, cJSON *out, cJSON *unav)
{
    double a = v->f1 - v->f0 - v->d0;
    if (!(a > 0)) {
        put_num(out, unav, "alpha", 0, 0,
                "the parabola through f0, f1 with slope d0 is not convex (a <= 0)");
        return;
    }
    if (v->d0 == 0) {
        put_num(out, unav, "alpha", 0, 0, "zero slope along the step (d0 = 0)");
        return;
    }
    double sstar = -v->d0 / (2 * a);
    put_num(out, unav, "alpha", 1, 1 / sstar - 1, "");
}

/* ---- the op --------------------------------------------------------------------- */

typedef struct {
    cv_block *lay;
    int nl;
    double *delta_prev, *delta_first; /* theta_v - theta_{v-1}, theta_v - theta_1 */
} instr_state;

static void free_pass(first_pass *f)
{
    free(f->gbar);
    free(f->mdiag);
    free(f->sq);
    free(f->dev);
    free(f->dot);
    free(f->proj);
    free(f->layer_norm2);
    free(f->layer_gsnr);
    free(f->layer_gsnr_count);
    free(f->layer_excluded);
    free(f->Gl);
    free(f->fac);
}

static void free_state(instr_state *s, first_pass *f)
{
    free(s->lay);
    free(s->delta_prev);
    free(s->delta_first);
    free_pass(f);
}

/* Deltas against the kept versions; *why: why the cross-version instruments
 * are null (NULL: available). */
static int history_deltas(cv_op_ctx *c, const cv_block *b, instr_state *s, const char **why,
                          cv_err *e)
{
    const cv_job_history *h = c->history;
    const cv_curv_options *co = cv_curv_get_options(c->curv);
    *why = NULL;
    if (!h || !h->previous)
        *why = "no previous version of the model (the first version, or a job outside the "
               "service's registry)";
    else if (!h->first)
        *why = "the first version's parameters are not kept (the model was restored from "
               "--state-dir at a later version: earlier versions are not persisted)";
    else if (cv_comm_active(co->comm))
        *why = "not available on several ranks";
    else if (h->n != c->m->nparams_total)
        *why = "the kept versions do not match the model's parameters";
    if (*why)
        return 0;
    size_t D = b->dim;
    s->delta_prev = malloc(sizeof(double) * D);
    s->delta_first = malloc(sizeof(double) * D);
    double *tmp = malloc(sizeof(double) * D);
    if (!s->delta_prev || !s->delta_first || !tmp) {
        free(tmp);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "parameter differences");
    }
    block_values(c->m, b, c->m->params, tmp);
    block_values(c->m, b, h->previous, s->delta_prev);
    block_values(c->m, b, h->first, s->delta_first);
    for (size_t j = 0; j < D; j++) {
        s->delta_prev[j] = tmp[j] - s->delta_prev[j];
        s->delta_first[j] = tmp[j] - s->delta_first[j];
    }
    free(tmp);
    return 0;
}

static int alloc_pass(first_pass *f, size_t maxdim, cv_err *e)
{
    size_t N = f->N, D = f->D ? f->D : 1, nl = (size_t)(f->nl ? f->nl : 1);
    f->gbar = calloc(D, sizeof(double));
    f->mdiag = calloc(D, sizeof(double));
    f->sq = calloc(N, sizeof(double));
    f->dev = calloc(N, sizeof(double));
    f->dot = calloc(N, sizeof(double));
    f->proj = calloc(N, sizeof(double));
    f->layer_norm2 = calloc(nl, sizeof(double));
    f->layer_gsnr = calloc(nl, sizeof(double));
    f->layer_gsnr_count = calloc(nl, sizeof(size_t));
    f->layer_excluded = calloc(nl, sizeof(size_t));
    f->Gl = malloc(sizeof(double) * N * (maxdim ? maxdim : 1));
    if (!f->gbar || !f->mdiag || !f->sq || !f->dev || !f->dot || !f->proj || !f->layer_norm2 ||
        !f->layer_gsnr || !f->layer_gsnr_count || !f->layer_excluded || !f->Gl)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                          "per-sample gradients of %zu samples x %zu parameters", N, maxdim);
    return 0;
}

static void put_first_order(const first_pass *f, unsigned w, cJSON *out, cJSON *unav)
{
    size_t N = f->N;
    double g2 = 0;
    for (int l = 0; l < f->nl; l++)
        g2 += f->layer_norm2[l];
    if (w & BIT(I_GRAD_NORM))
        put_num(out, unav, "gradient_norm", 1, sqrt(g2), "");
    if (w & BIT(I_BATCH_NORMS)) {
        double *nrm = malloc(sizeof(double) * N);
        cJSON *o = cJSON_AddObjectToObject(out, "batch_gradient_norms");
        for (size_t i = 0; nrm && i < N; i++)
            nrm[i] = sqrt(f->sq[i]);
        if (nrm) {
            qsort(nrm, N, sizeof(double), cmp_double);
            cJSON_AddNumberToObject(o, "min", nrm[0]);
            cJSON_AddNumberToObject(o, "q1", quantile(nrm, N, 0.25));
            cJSON_AddNumberToObject(o, "median", quantile(nrm, N, 0.5));
            cJSON_AddNumberToObject(o, "q3", quantile(nrm, N, 0.75));
            cJSON_AddNumberToObject(o, "max", nrm[N - 1]);
        }
        free(nrm);
    }
    double nn = (double)N * ((double)N - 1);
    int ok = N > 1 && g2 > 0;
    const char *why = N < 2 ? "needs at least 2 samples" : "the mean gradient is zero";
    double sdev = 0, sin = 0, sorth = 0;
    for (size_t i = 0; ok && i < N; i++) {
        double ip = f->dot[i] - g2; /* (g_i - gbar)^T gbar */
        sdev += f->dev[i];
        sin += ip * ip;
        double o = f->dev[i] - ip * ip / g2;
        sorth += o > 0 ? o : 0;
    }
    if (w & BIT(I_NORM_TEST))
        put_num(out, unav, "norm_test", ok, sdev / (nn * g2), why);
    if (w & BIT(I_INNER_TEST))
        put_num(out, unav, "inner_product_test", ok, sin / (nn * g2 * g2), why);
    if (w & BIT(I_ORTHO_TEST))
        put_num(out, unav, "orthogonality_test", ok, sorth / (nn * g2), why);
    if (w & BIT(I_GSNR)) {
        double gs = 0;
        size_t cnt = 0, excl = 0;
        for (int l = 0; l < f->nl; l++) {
            gs += f->layer_gsnr[l];
            cnt += f->layer_gsnr_count[l];
            excl += f->layer_excluded[l];
        }
        put_num(out, unav, "mean_gsnr", cnt > 0, cnt ? gs / (double)cnt : 0,
                N < 2 ? "needs at least 2 samples" : "every parameter has zero variance");
        cJSON_AddNumberToObject(out, "gsnr_excluded", (double)excl);
    }
}

static cJSON *layers_json(const cv_model *m, const first_pass *f, const instr_state *s,
                          unsigned w, int first_order)
{
    cJSON *arr = cJSON_CreateArray();
    size_t off = 0;
    for (int l = 0; arr && l < f->nl; l++) {
        const cv_block *lb = &f->lay[l];
        cJSON *o = cJSON_CreateObject();
        cJSON_AddItemToArray(arr, o);
        cJSON_AddStringToObject(o, "name", lb->name);
        cJSON_AddStringToObject(o, "type",
                                cv_layer_name(&m->layers[cv_model_param_layer(m, lb->idx[0])]));
        cJSON_AddItemToObject(o, "params", cv_json_param_names(m, lb));
        cJSON_AddNumberToObject(o, "dim", (double)lb->dim);
        if (first_order && (w & BIT(I_GRAD_NORM)))
            cJSON_AddNumberToObject(o, "gradient_norm", sqrt(f->layer_norm2[l]));
        if (first_order && (w & BIT(I_GSNR))) {
            size_t cnt = f->layer_gsnr_count[l];
            if (cnt)
                cJSON_AddNumberToObject(o, "mean_gsnr", f->layer_gsnr[l] / (double)cnt);
            else
                cJSON_AddNullToObject(o, "mean_gsnr");
            cJSON_AddNumberToObject(o, "gsnr_excluded", (double)f->layer_excluded[l]);
        }
        if (s->delta_prev && (w & BIT(I_UPDATE)))
            cJSON_AddNumberToObject(o, "update_size", sqrt(norm2(s->delta_prev + off, lb->dim)));
        if (s->delta_first && (w & BIT(I_DIST)))
            cJSON_AddNumberToObject(o, "distance_from_init",
                                    sqrt(norm2(s->delta_first + off, lb->dim)));
        off += lb->dim;
    }
    return arr;
}

static int run_second_order(cv_op_ctx *c, const cv_block *b, const first_pass *f, unsigned w,
                            cJSON *out, cJSON *unav, cv_err *e)
{
    const instr_args *a = c->opts->args;
    size_t D = b->dim, N = f->N;
    double hmean = 1.0 / (cv_curv_loss_state(c->curv)->scale * (double)N); /* H_mean = hmean H */
    int need_trace = (w & (BIT(I_HTRACE) | BIT(I_TIC_TRACE))) != 0;
    int exact = 0;
    cv_err ignored;
    if (w & BIT(I_TIC_DIAG))
        exact = !cv_diag_backprop_check(c->m, CV_CURV_HESSIAN, b, &ignored) &&
                cv_diag_backprop_columns(c->m, CV_CURV_HESSIAN, b, 1) <= EXACT_DIAG_MAX_COLUMNS;
    int hutch_diag = (w & BIT(I_TIC_DIAG)) && !exact;
    double *samples = NULL, *diag = NULL;
    int rc = 0;
    if (need_trace || hutch_diag || exact) {
        samples = malloc(sizeof(double) * (size_t)a->probes);
        diag = (w & BIT(I_TIC_DIAG)) ? malloc(sizeof(double) * (D ? D : 1)) : NULL;
        if (!samples || ((w & BIT(I_TIC_DIAG)) && !diag))
            rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Hessian probes");
    }
    if (!rc && (need_trace || hutch_diag))
        rc = hutchinson(c, b, a->probes, samples, hutch_diag ? diag : NULL, e);
    if (!rc && exact)
        rc = cv_curv_diag_backprop(c->curv, CV_CURV_HESSIAN, b, 0, diag, e);
    if (!rc && need_trace) {
        double tr = 0;
        for (int s = 0; s < a->probes; s++)
            tr += samples[s];
        tr /= a->probes;
        double var = variance(samples, (size_t)a->probes);
        if (w & BIT(I_HTRACE)) {
            put_num(out, unav, "hessian_trace", 1, tr, "");
            cJSON_AddNumberToObject(out, "hessian_trace_std_err", sqrt(var / a->probes));
        }
        if (w & BIT(I_TIC_TRACE)) {
            double trm = 0;
            for (size_t j = 0; j < D; j++)
                trm += f->mdiag[j];
            put_num(out, unav, "tic_trace", tr != 0, trm / (hmean * tr),
                    "the Hessian trace estimate is zero");
        }
    }
    if (!rc && (need_trace || hutch_diag))
        cJSON_AddNumberToObject(out, "probes", a->probes);
    if (!rc && (w & BIT(I_TIC_DIAG))) {
        double s = 0;
        for (size_t j = 0; j < D; j++)
            s += f->mdiag[j] / (hmean * diag[j] + a->tic_epsilon);
        put_num(out, unav, "tic_diag", 1, s / (double)D, "");
        cJSON_AddStringToObject(out, "tic_diag_method", exact ? "exact" : "hutchinson");
    }
    free(samples);
    free(diag);
    if (!rc && (w & BIT(I_HMAX)))
        rc = run_lambda_max(c, b, a->lanczos_steps, out, unav, e);
    return rc;
}

static int run_cross(cv_op_ctx *c, const cv_block *b, const first_pass *f, const instr_state *s,
                     unsigned w, cJSON *out, cJSON *unav, cv_err *e)
{
    size_t D = b->dim, N = f->N;
    double dn = sqrt(norm2(s->delta_prev, D));
    if (w & BIT(I_UPDATE))
        put_num(out, unav, "update_size", 1, dn, "");
    if (w & BIT(I_DIST))
        put_num(out, unav, "distance_from_init", 1, sqrt(norm2(s->delta_first, D)), "");
    if (!(w & (BIT(I_ALPHA) | BIT(I_ALPHA_FIT))))
        return 0;
    if (dn == 0) {
        if (w & BIT(I_ALPHA))
            put_num(out, unav, "alpha", 0, 0, "the parameters did not change");
        if (w & BIT(I_ALPHA_FIT))
            put_num(out, unav, "alpha_fit", 0, 0, "the parameters did not change");
        return 0;
    }
    const cv_loss_state *ls = cv_curv_loss_state(c->curv);
    double scale = ls->scale;
    cross_vals v = {0};
    v.f1 = cv_curv_loss(c->curv);
    v.mf[1] = v.f1 / (scale * (double)N);
    int fit = (w & BIT(I_ALPHA_FIT)) != 0;
    if (fit) {
        double *lossv = malloc(sizeof(double) * N), *proj = malloc(sizeof(double) * N);
        if (!lossv || !proj) {
            free(lossv);
            free(proj);
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "per-sample losses");
        }
        for (size_t i = 0; i < N; i++) {
            lossv[i] = cv_loss_sample(ls, (int)i);
            proj[i] = f->proj[i] / dn;
        }
        v.vf[1] = variance(lossv, N);
        v.vd[1] = variance(proj, N);
        double gd = 0;
        for (size_t j = 0; j < D; j++)
            gd += f->gbar[j] * s->delta_prev[j];
        v.md[1] = gd / dn;
        free(lossv);
        free(proj);
    }
    size_t maxdim = ((const instr_args *)c->opts->args)->max_layer_dim;
    if (at_previous(c, b, s->lay, s->nl, c->history->previous, s->delta_prev, dn, maxdim, fit,
                    &v, e))
        return -1;
    if (w & BIT(I_ALPHA))
        put_alpha(&v, out, unav);
    if (fit) {
        double mu[3], al;
        if (alpha_fit(dn, v.mf, v.md, v.vf, v.vd, mu, &al)) {
            put_num(out, unav, "alpha_fit", 0, 0, "the fit's normal equations are singular");
        } else {
            put_num(out, unav, "alpha_fit", mu[2] != 0, al, "the fitted parabola is flat");
            cJSON_AddItemToObject(out, "alpha_fit_coefficients", cv_json_doubles(mu, 3));
        }
    }
    return 0;
}

static int run_instruments(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    const instr_args *a = c->opts->args;
    unsigned w = wanted(c->opts);
    instr_state s = {0};
    first_pass f = {0};
    int rc = 0;
    const char *why = NULL;
    cJSON *unav = cJSON_CreateObject();
    s.lay = malloc(sizeof *s.lay * CV_MAX_LAYERS);
    if (!s.lay || !unav) {
        cJSON_Delete(unav);
        free(s.lay);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "layer blocks");
    }
    s.nl = cv_blocks_per_layer(c->m, s.lay, CV_MAX_LAYERS);
    f.curv = c->curv;
    f.m = c->m;
    f.lay = s.lay;
    f.nl = s.nl;
    f.N = cv_curv_batch_size(c->curv);
    f.D = b->dim;
    double scale = cv_curv_loss_state(c->curv)->scale;
    if (!(scale > 0))
        rc = cv_err_set(e, CV_EINVAL, "empty_batch", "batch",
                        "the batch has no loss terms (every target ignored)");
    if (!rc && (w & CROSS))
        rc = history_deltas(c, b, &s, &why, e);
    f.inv_scale = 1.0 / scale;
    f.delta = (w & BIT(I_ALPHA_FIT)) ? s.delta_prev : NULL;
    f.squares = (w & (BIT(I_GSNR) | BIT(I_TIC_TRACE) | BIT(I_TIC_DIAG))) != 0;
    f.dots = (w & (BIT(I_NORM_TEST) | BIT(I_INNER_TEST) | BIT(I_ORTHO_TEST))) != 0;
    if (!rc && (w & BIT(I_LOSS)))
        put_num(out, unav, "loss", 1, cv_curv_loss(c->curv), "");
    int first_order = (w & FIRST_ORDER) || (f.delta != NULL);
    if (!rc && first_order)
        rc = alloc_pass(&f, a->max_layer_dim, e) || run_first_order(&f, e) ? -1 : 0;
    if (!rc && first_order)
        put_first_order(&f, w, out, unav);
    if (!rc && (w & BIT(I_HIST))) {
        double lo = 0, hi = 0, *counts = malloc(sizeof(double) * (size_t)a->bins);
        rc = counts ? run_histogram(&f, a->bins, &lo, &hi, counts, e)
                    : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "histogram");
        if (!rc) {
            cJSON *h = cJSON_AddObjectToObject(out, "gradient_histogram");
            cJSON_AddNumberToObject(h, "bins", a->bins);
            double r[2] = {lo, hi};
            cJSON_AddItemToObject(h, "range", cv_json_doubles(r, 2));
            cJSON_AddItemToObject(h, "counts", cv_json_doubles(counts, (size_t)a->bins));
        }
        free(counts);
    }
    if (!rc)
        rc = run_second_order(c, b, &f, w, out, unav, e);
    if (!rc && (w & CROSS) && why) {
        static const int cross[] = {I_UPDATE, I_DIST, I_ALPHA, I_ALPHA_FIT};
        static const char *const names[] = {"update_size", "distance_from_init", "alpha",
                                            "alpha_fit"};
        for (int i = 0; i < 4; i++)
            if (w & BIT(cross[i]))
                put_num(out, unav, names[i], 0, 0, why);
    } else if (!rc && (w & CROSS)) {
        const cv_job_history *h = c->history;
        cJSON *vs = cJSON_AddObjectToObject(out, "versions");
        cJSON_AddNumberToObject(vs, "model", (double)h->version);
        cJSON_AddNumberToObject(vs, "previous", (double)h->version - 1);
        cJSON_AddNumberToObject(vs, "first", 1);
        rc = run_cross(c, b, &f, &s, w, out, unav, e);
    }
    if (!rc)
        cJSON_AddItemToObject(out, "layers", layers_json(c->m, &f, &s, w, first_order));
    if (!rc)
        cJSON_AddItemToObject(out, "unavailable", unav);
    else
        cJSON_Delete(unav);
    free_state(&s, &f);
    return rc;
}

static const char *const instr_results[] = {
    "loss", "gradient_norm", "batch_gradient_norms", "gradient_histogram", "norm_test",
    "inner_product_test", "orthogonality_test", "mean_gsnr", "gsnr_excluded", "tic_trace",
    "tic_diag", "tic_diag_method", "hessian_trace", "hessian_trace_std_err", "probes",
    "hessian_max_eigenvalue", "hessian_max_eigenvalue_residual", "lanczos_steps",
    "update_size", "distance_from_init", "alpha", "alpha_fit", "alpha_fit_coefficients",
    "versions", "layers", "unavailable", NULL};

const cv_op_def cv_op_instruments = {"instruments", instr_opts, NULL, sizeof(instr_args),
                                     instr_defaults, 1, 0, check_instr, run_instruments,
                                     instr_results, NULL, mem_instr, bind_instr};
