/* vivit.h - ViViT (Dangel, Tatzel, Hennig 2022, "ViViT: Curvature access
 * through the generalized Gauss-Newton's low-rank structure", TMLR): the
 * GGN of one block through its low-rank factor, its exact nonzero
 * eigenpairs, per-sample directional derivatives and their signal-to-noise
 * ratios, and directionally damped Newton steps.
 *
 * Factor.  With curv.h's scaling G = sum_n J_n^T Lambda_n J_n and
 * Lambda_n = S_n S_n^T (cv_loss_hessian_sqrt, the sqrt(c) of the reduction
 * already inside S_n), G = V V^T with the columns of V
 *     v_(j,i) = alpha J_(n_i)^T S~_i[:, j],  i < ns (curvature samples n_i),
 * alpha = sqrt(N / ns) (1 without sub-sampling; no extra 1/sqrt(N): curv.h's
 * c plays the role of NOTES' 1/N), and
 *     exact:     S~_i = S_(n_i)                      (m = C columns)
 *     MC (M):    S~_i[:, j] = sqrt(c / M) s_(n_i, j)  (m = M columns), s drawn
 *                by cv_loss_sample_mc_at(mc_seed) (each sample from its own
 *                stream), exactly as the engine draws fisher_mc: with
 *                mc_seed = cv_curv_options.seed, V V^T is CV_CURV_FISHER_MC.
 * Sub-sampling keeps ns of the N samples (alpha^2 = N/ns keeps the scale of
 * an estimate of the batch GGN).  The Gram matrix G~ = V^T V (R = m*ns
 * columns, index r = j*ns + i) is built by cv_curv_gram from per-layer
 * (a^T a) .* (s^T s) kernels without forming V; blocks with a layer lacking a
 * Gram kernel fall back to building V column by column (dim*R doubles).
 * cv_vivit.gram_path records which of the two built it.
 * Nonzero eigenvalues of G are those of G~; e_k = V g~_k / sqrt(lambda_k).
 *
 * Directional derivatives along e_k (per-sample quantities are scaled by N so
 * that their means are the batch quantities; for mean reductions this is the
 * derivative of the sample's own loss, for "sum" N times it):
 *     gamma_nk  = N e_k^T grad L_n = N c (J_n e_k)^T dl_n/dh,   n < N (all samples)
 *     lambda_ik = N |S~_i^T J_(n_i) e_k|^2 = ns e_k^T (alpha^2 J^T S~ S~^T J) e_k,  i < ns
 * so mean_n gamma_nk = e_k^T g (g the batch gradient) and mean_i lambda_ik =
 * lambda_k.  J_n e_k comes from cv_curv_jvp; SNR = mean^2 / var (ddof 1).
 *
 * Engines: `curv` is the whole batch (gradient, loss state, gamma).  The
 * Jacobian products of the curvature (Gram, V y) run on `subset_curv` when
 * given (an engine on the ns sub-sampled samples, in subset order, same
 * model): then sub-sampling saves backpropagation.  Without it they run on
 * `curv` with zero cotangents for the samples left out (same numbers; only
 * the eigenproblem shrinks).
 *
 * Products are counted in progress->done as batch-wide Jacobian passes (one
 * jvp or vjp of one vector = 1; the Gram = m), and the cancel flag/deadline
 * are checked between stages.  Memory: the Gram needs (m*nj)^2 doubles
 * (nj = samples of the Jacobian engine) plus the same again for dsyevd;
 * refused (CV_ETOOLARGE) above max_columns columns.
 */
#ifndef CV_VIVIT_H
#define CV_VIVIT_H

#include <stddef.h>
#include <stdint.h>

#include "curv.h"
#include "err.h"
#include "linop.h"

#define CV_VIVIT_MAX_COLUMNS 8192      /* default Gram size limit (~1.5 GiB at the limit) */
#define CV_VIVIT_REL_THRESHOLD 1e-6    /* default clip: lambda <= 1e-6 * lambda_max */
#define CV_VIVIT_EXPLICIT_MAX ((size_t)1 << 26) /* doubles of an explicit V (512 MiB) */

enum { CV_VIVIT_GRAM_KERNEL = 1, CV_VIVIT_GRAM_EXPLICIT = 2 };
/* "kernel" / "explicit" (JSON field gram_path) */
const char *cv_vivit_gram_path_name(int path);

typedef struct {
    int mc;                 /* 0: exact S (C columns per sample); M >= 1: M MC columns */
    uint64_t mc_seed;       /* MC draw seed (see above) */
    const int *subset;      /* ns ascending sample indices for the curvature; NULL: all */
    int n_subset;
    cv_curv *subset_curv;   /* optional engine on exactly those samples (see above) */
    double threshold;       /* keep eigenvalues > threshold; < 0: CV_VIVIT_REL_THRESHOLD
                               * lambda_max (float32 Jacobians leave noise eigenvalues at
                               ~1e-7 lambda_max where G has rank < R) */
    size_t max_columns;     /* 0: CV_VIVIT_MAX_COLUMNS */
    int explicit_factor;    /* non-zero: always build V explicitly (the fallback; tests) */
    cv_progress *progress;  /* may be NULL */
} cv_vivit_options;

void cv_vivit_options_default(cv_vivit_options *o);

/* Draws round(frac * n) (at least 1) distinct sample indices, ascending, from
 * cv_rng_seed(seed) (partial Fisher-Yates).  idx needs n ints; returns ns. */
int cv_vivit_subsample(int n, double frac, uint64_t seed, int *idx);

typedef struct {
    cv_curv *curv, *jac;    /* whole batch; Jacobians of the curvature (curv or subset) */
    cv_block block;
    size_t dim;
    int n, C, m;            /* batch size, outputs, factor columns per sample */
    int mc;                 /* MC columns per sample, 0 for the exact factor */
    int ns, nj;             /* curvature samples; samples of jac */
    int *sub;               /* ns batch indices of the curvature samples */
    int *jpos;              /* ns positions of those samples in jac's batch */
    double scale;           /* the loss's reduction scale c */
    double alpha;           /* sqrt(n / ns) */
    double *S;              /* ns x C x m: alpha * S~_i[c, j] at S + (i*C + c)*m + j */
    int R;                  /* Gram size m * ns */
    double *gram;           /* R x R symmetric (NULL after cv_vivit_eigh) */
    int rank;               /* eigenpairs kept by cv_vivit_eigh */
    double *eigenvalues;    /* rank, descending */
    double *gram_vectors;   /* R x rank column-major, unit Gram eigenvectors */
    double lambda_max;      /* largest Gram eigenvalue (before clipping) */
    double threshold_used;  /* eigenvalues kept are > this */
    double threshold;       /* as asked (options) */
    cv_progress *progress;
    int gram_path;          /* how the Gram was built: CV_VIVIT_GRAM_KERNEL (per-layer
                               (a^T a) .* (s^T s) kernels, V never formed) or
                               CV_VIVIT_GRAM_EXPLICIT (V column by column: a layer
                               without a kernel, or options.explicit_factor) */
    /* A sub-batch engine handed over with cv_vivit_adopt_subset (freed with v). */
    cv_curv *own_jac;
    cv_batch own_batch;
} cv_vivit;

/* Hands ownership of the sub-batch engine `jac` and its batch to v (both are
 * freed by cv_vivit_free). */
void cv_vivit_adopt_subset(cv_vivit *v, cv_curv *jac, cv_batch *batch);

/* Builds the factor columns and the Gram matrix of block b.  Refuses (CV_EINVAL)
 * a batch/subset mismatch and (CV_ETOOLARGE, field "options") more than
 * max_columns Gram columns.  On failure nothing is left to free. */
int cv_vivit_init(cv_vivit *v, cv_curv *c, const cv_block *b, const cv_vivit_options *o,
                  cv_err *e);
void cv_vivit_free(cv_vivit *v);

/* Eigendecomposition of G~ (LAPACK dsyevd), keeping eigenvalues above the
 * threshold (descending) and their Gram eigenvectors; frees the Gram. */
int cv_vivit_eigh(cv_vivit *v, cv_err *e);

/* The top k (<= rank) GGN eigenvectors e_k = V g~_k / sqrt(lambda_k), dim x k
 * column-major, normalized to unit length (float32 products leave ~1e-6). */
int cv_vivit_eigenvectors(cv_vivit *v, int k, double *E, cv_err *e);

/* Y = V^T X (R x k) for k block vectors X (dim x k); J X from cv_curv_jvp. */
int cv_vivit_apply_vt(cv_vivit *v, int k, const double *X, double *Y, cv_err *e);
/* X = V Y (dim x k) for k Gram-space vectors Y (R x k); one vjp per vector. */
int cv_vivit_apply_v(cv_vivit *v, int k, const double *Y, double *X, cv_err *e);

/* ---- directional derivatives and SNR ---------------------------------------- */

typedef struct {
    int n, ns, k;
    double *gamma;          /* n x k column-major: gamma + k*n + sample */
    double *lambda;         /* ns x k column-major */
} cv_vivit_derivs;

/* gamma_nk and lambda_ik (see above) for the k block vectors E (dim x k). */
int cv_vivit_directional(cv_vivit *v, int k, const double *E, cv_vivit_derivs *out,
                         cv_err *e);
void cv_vivit_derivs_free(cv_vivit_derivs *d);

typedef struct {
    double mean, var, snr;  /* var: ddof 1 (NaN for n < 2); snr = mean^2 / var, with
                               var == 0: INFINITY if mean != 0, NaN if mean == 0 */
} cv_vivit_stat;

void cv_vivit_stats(const double *x, int n, cv_vivit_stat *s);

/* Per-parameter gradient SNR per layer: for each parameter q of the layer's
 * tensors in block b, mean_n^2 / var_n (ddof 1) of the per-sample gradients
 * (cv_curv_per_sample_gradients), averaged over the parameters with nonzero
 * variance (the GSNR of Liu et al. 2020, as monitoring dashboards use it). */
typedef struct {
    int layer;
    cv_block block;         /* the layer's tensors in b */
    double gsnr;            /* NaN when no parameter has nonzero variance */
    size_t params;          /* parameters averaged */
    size_t zero_variance;   /* parameters left out (variance 0, e.g. dead units) */
} cv_vivit_gsnr;

/* Fills out[0..*count) (max entries; CV_MAX_LAYERS always suffices). */
int cv_vivit_gsnr_layers(cv_curv *c, const cv_block *b, cv_vivit_gsnr *out, int max,
                         int *count, cv_progress *p, cv_err *e);

/* ---- damped Newton -------------------------------------------------------- */

#define CV_VIVIT_GRID_POINTS 200        /* default grid: log-spaced 1e-4 .. 1e2 (002 B.5) */
#define CV_VIVIT_BOOTSTRAP_SAMPLES 100

typedef struct {
    double damping;         /* constant delta */
    int bootstrap;          /* non-zero: directional delta_k by bootstrap */
    const double *grid;     /* candidate deltas (> 0); NULL: default grid */
    int grid_n;
    int samples;            /* bootstrap resamples B (0: CV_VIVIT_BOOTSTRAP_SAMPLES) */
    double percentile;      /* lower percentile of the gain (0: 5) */
    uint64_t seed;
} cv_vivit_damping;

void cv_vivit_damping_default(cv_vivit_damping *d);

/* Bootstrap damping (002 B.3): for direction k the step
 * tau(delta) = -gbar_k / (lbar_k + delta) uses the batch means gbar_k, lbar_k
 * (the observed quadratic model); each of the B resamples draws n indices with
 * replacement for gamma (and, when ns != n, ns indices for lambda; else the
 * same indices) giving means g_b, l_b of an equally valid quadratic model, and
 * the gain (loss reduction) R_b(delta) = -(tau g_b + 1/2 tau^2 l_b).  delta_k is
 * the grid value maximizing the `percentile`-th percentile (linear
 * interpolation, as torch.quantile) of R_b over b among those where it is
 * >= 0 (first maximum in grid order); INFINITY (no step along e_k) when none
 * is.  With g_b = gbar, l_b = lbar the gain is gbar^2/(lbar+delta) -
 * 1/2 lbar gbar^2/(lbar+delta)^2.  Resampling order is fixed, so the result
 * depends only on the seed.  gamma: n x k, lambda: ns x k (column-major). */
int cv_vivit_bootstrap_damping(const double *gamma, int n, const double *lambda, int ns, int k,
                               const double *gbar, const double *lbar,
                               const cv_vivit_damping *d, cv_progress *p, double *delta,
                               cv_err *e);

typedef struct {
    size_t dim;
    int k;                  /* directions used */
    double *step;           /* dim */
    double *eigenvalues;    /* k: lbar_k = lambda_k */
    double *gamma_mean;     /* k: gbar_k = e_k^T g */
    double *damping;        /* k: delta_k (INFINITY: direction skipped) */
    double *coeff;          /* k: tau_k = -gbar_k / (lbar_k + delta_k) (0 if skipped) */
    double predicted_change; /* sum_k tau_k gbar_k + 1/2 tau_k^2 lbar_k */
} cv_vivit_newton;

/* s = sum_k tau_k e_k over the top k eigenpairs (needs cv_vivit_eigh), with
 * constant damping or bootstrap delta_k.  lbar_k + delta_k must be > 0. */
int cv_vivit_newton_directional(cv_vivit *v, int k, const cv_vivit_damping *d,
                                cv_vivit_newton *out, cv_err *e);

/* Full damped Newton step s = -(G + delta I)^-1 g (delta > 0) by the matrix
 * inversion lemma s = -(1/delta)[g - V (delta I + G~)^-1 V^T g] (Cholesky,
 * dposv; needs the Gram, i.e. before cv_vivit_eigh).  step: dim doubles;
 * *predicted = g^T s + 1/2 |V^T s|^2. */
int cv_vivit_newton_full(cv_vivit *v, double delta, double *step, double *predicted,
                         cv_err *e);
void cv_vivit_newton_free(cv_vivit_newton *r);

#endif
