/* kron.h - Kronecker-factored curvature (KFAC / KFLR, issue 22): the
 * factors A_l, B_l of every layer with a Kronecker structure on a batch,
 * over its micro-batches and data-parallel ranks.  The algebra on the
 * factors (products, inverses, eigen) is engine/kronop.h's.
 *
 * A Kronecker layer (Linear, also inside an expanded MultiheadAttention;
 * Conv2d/Conv1d with groups 1) owns the block theta_l = [vec_r(W), b] (weight row-major, then the bias when it has one;
 * Conv: W as [out, in*kh*kw]).  With W~ = [W | b] (out x dim_a) and
 * a~ = [a; 1] (the 1 only with a bias):
 *   A = (1/N) sum_n A_n,  A_n = (1/R) sum_r a~_nr a~_nr^T      (expand)
 *                         A_n = abar_n abar_n^T, abar_n = (1/R) sum_r a~_nr   (reduce)
 *   B = w sum_n sum_j B_nj, B_nj = sum_r b_njr b_njr^T          (expand)
 *                         B_nj = (sum_r b_njr)(sum_r b_njr)^T   (reduce)
 * where r runs over the R weight-sharing positions of sample n (Linear on
 * [..., T, in]: the T rows; Conv: the output pixels, a_nr the im2col column)
 * and b_njr is the cotangent at the layer's output (position r) of vector j
 * of the loss's output factor backpropagated through the rest of the
 * network J_n^T:
 *   CV_KRON_TYPE2      j over the C columns of S_n, S_n S_n^T = d^2 L_n/dh^2
 *                      (L_n = c l_n, c the loss scale of curv.h), w = 1: KFLR;
 *   CV_KRON_MC         j over the mc_samples gradients s_nm = d l(h_n, yhat_m)/dh
 *                      drawn as fisher_mc draws them (the cv_curv's seed and
 *                      mc_samples), w = c / mc_samples;
 *   CV_KRON_EMPIRICAL  j = 1, the sample gradient d l_n / dh, w = c (so
 *                      B_n = (1/c) g_n g_n^T with g_n = d L_n / dz_n).
 * These are curvlinops' KFACLinearOperator normalizations (expand: A
 * divided by N R, B not; reduce: inputs averaged, cotangents summed over
 * positions).  In the row-major order of W~ the block is B (x) A (output
 * index outer); in theta_l's order it is P (B (x) A) P^T with P the
 * permutation cv_kron_w_index gives.  For N = 1 and R = 1 it equals the
 * exact diagonal block of ggn / fisher_mc / ef.
 *
 * Cost: one forward state per micro-batch (the engine's), the A's from the
 * layer inputs, one backward walk with C (type-2), mc_samples or 1 vectors
 * per sample in chunks of at most 32, keeping k*n*C cotangents (plus, for
 * type-2, the n C x C square roots) per micro-batch.
 *
 * Data-parallel: every rank calls cv_curv_kron with the same options; the
 * factors are reduced over the ranks (one agreement, one cv_comm_sum) and
 * are the whole batch's on every rank. */
#ifndef CV_KRON_H
#define CV_KRON_H

#include "curv.h"
#include "layer.h"

typedef enum { CV_KRON_TYPE2 = 0, CV_KRON_MC, CV_KRON_EMPIRICAL } cv_kron_fisher;

typedef struct {
    cv_kron_fisher fisher_type;   /* default (0): type-2 */
    cv_kron_approx approx;        /* default (0): expand */
    /* ACP (George's amortized covariance preconditioner, newton method acp):
     * non-zero: B = alpha_l I_out instead of the fisher type's B (no walk of
     * its vectors; fisher_type is ignored), with alpha_l = acp_alpha when
     * acp_alpha > 0, else George's heuristic
     *   alpha_l = (N / c) max_{n, r, j} (g_nr)_j^2,   g_nr = d L_n / d z_nr,
     * L_n = c l_n (c the loss scale), the max over the samples, the layer's
     * weight-sharing positions r and its outputs j (both approximations):
     * = max (d l_n / d z)_j^2 for a mean-reduced cross-entropy (c = 1/N),
     * N times it for a sum; an upper bound of the diagonal of the empirical
     * B = (1/c) sum_n g_n g_n^T (R = 1).  One backward walk of the sample
     * gradients (as empirical's), the max over micro-batches and ranks. */
    int acp;
    double acp_alpha;
} cv_kron_options;

typedef struct {
    int layer;                    /* index in the model's layers */
    cv_block block;               /* its weight (+ bias): its per-layer block, or where
                                   * that block spans several layers (MultiheadAttention's
                                   * in_proj and out_proj) those tensors alone, named after
                                   * the weight without ".weight" / "_weight" */
    int has_bias;
    int dim_a, dim_b;             /* in (+1 with a bias; Conv: in*kh*kw (+1)), out */
    double *A, *B;                /* dim_a^2 and dim_b^2, row-major, symmetric */
    long rank_a, rank_b;          /* the outer products summed into A and B (bounds on
                                   * their ranks in exact arithmetic) */
    double alpha;                 /* ACP (options acp): B = alpha I; 0 otherwise */
} cv_kron_factor;

typedef struct {
    int nfactors;
    cv_kron_factor *factors;      /* in layer order */
    int nexact;
    cv_block *exact;              /* the per-layer blocks (cv_blocks_per_layer) without a
                                   * Kronecker structure, and the other tensors (each run of
                                   * consecutive ones) of a per-layer block that also holds
                                   * Kronecker layers: use their exact blocks; in tensor
                                   * order */
    int columns;                  /* vectors per sample backpropagated for B (ACP: 1 for
                                   * the heuristic's walk, 0 with a given alpha) */
    double *data;                 /* owns every A and B */
} cv_kron;

/* Fills out (freed with cv_kron_free, also after a failure).  Returns 0, or
 * -1 with e filled (invalid options, out of memory, cancelled, a rank
 * failed). */
int cv_curv_kron(cv_curv *c, const cv_kron_options *o, cv_kron *out, cv_err *e);
void cv_kron_free(cv_kron *k);

/* The curvature whose diagonal blocks the factors equal for N = 1 (ggn,
 * fisher_mc, ef). */
cv_curvature cv_kron_fisher_curvature(cv_kron_fisher f);
/* Names "type-2", "mc", "empirical" / "expand", "reduce"; -1 if unknown. */
const char *cv_kron_fisher_name(cv_kron_fisher f);
int cv_kron_fisher_from_name(const char *s);
const char *cv_kron_approx_name(cv_kron_approx a);
int cv_kron_approx_from_name(const char *s);

/* EKFAC (George et al. 2018; engine/kron_ext.c): KFAC's eigenbasis
 * Q = P (Q_B (x) Q_A) of every factor of k (from cv_curv_kron on the same
 * cv_curv, with the same options: the caller's basis), with the eigenvalues
 * replaced by the second moments of the per-sample gradients in that basis:
 *   s_c = w sum_n sum_j ((Q_B^T G_nj Q_A)_pq)^2,   c = p*dim_a + q,
 *   G_nj = sum_r b_njr a~_nr^T  (dim_b x dim_a, the gradient of W~),
 * b_njr, j and w as B's above for o->fisher_type (type-2: the C square-root
 * columns, w = 1; mc: w = c / mc_samples; empirical: w = c).  The true
 * per-sample gradients (summed over the weight-sharing positions), so
 * s_c = q_c^T F q_c exactly, F the layer's block of ggn / fisher_mc / ef and
 * q_c = P (q_Bp (x) q_Aq) the eigenvector of eigen coordinate c (kronop.h's
 * order and eigenvectors: pass s to the cv_kron_block functions with
 * factors A, B).  o->approx only matters for k.  Where a factor has
 * repeated eigenvalues, s depends on the eigenvectors LAPACK picks in that
 * eigenspace (only their sum is determined): notably k from "reduce" with
 * weight sharing and N R > rank(A), whose null space of A still carries the
 * per-position gradients.  *s (malloc'd, k->nfactors
 * entries) gets s[f] (malloc'd, dim_a*dim_b doubles) for factor f; free
 * each s[f] and *s with free().  One backward walk of the fisher type's
 * vectors (as cv_curv_kron's).  Returns 0, or -1 with e filled and
 * *s NULL (invalid options; CV_EINVAL "unsupported" for a layer without an
 * ekfac_add kernel; out of memory; cancelled; a rank failed).
 * Data-parallel: every rank calls it with the same k; *s is the whole
 * batch's on every rank.  Values within sqrt(dim) float32 epsilons of zero
 * (relative to the factor's largest) are 0: coordinates the gradients do
 * not reach. */
int cv_curv_ekfac(cv_curv *c, const cv_kron_options *o, const cv_kron *k, double ***s,
                  cv_err *e);

/* KFRA (Botev et al. 2017, Algorithm 1; engine/kron_ext.c): the factors of
 * cv_curv_kron's struct (A as KFAC's; nexact 0; columns 0) with the output
 * factors from the batch-averaged recursion instead of backpropagated
 * vectors.  For the Linear layers f = 1..F (in order, each z_f = W~_f a~_f,
 * a_{f+1} = phi_f(z_f) elementwise, phi_f the product of the activations
 * between f and f+1, identity without one):
 *   B_F     = sum_n D_Fn Lambda_n D_Fn      (Lambda_n = d^2 L_n / dh^2 with
 *             L_n = c l_n: kfac type-2's B of the last layer; D_Fn the
 *             derivatives of activations after the last Linear, if any)
 *   B_f     = (W_{f+1}^T B_{f+1} W_{f+1}) (.) (1/N) sum_n phi_f'(z_fn) phi_f'(z_fn)^T
 * (W without its bias column).  For N = 1, and for any N in a deep linear
 * network (Lemma 4.1), this equals cv_curv_kron type-2 expand.  Sums over
 * the micro-batches and ranks first (one cv_comm_sum), then the recursion
 * once.  Supported: Sequential chains of Linear layers (one row per sample)
 * with elementwise activations (and Identity / Dropout / Flatten) between
 * them, losses CE, MSE, BCE; anything else is refused with CV_EINVAL
 * "unsupported" naming the layer, and fisher_type other than type-2 with
 * "invalid_option" (o->approx is ignored: no weight sharing).  Returns 0 or
 * -1 with e filled; out is freed with cv_kron_free also after a failure. */
int cv_curv_kfra(cv_curv *c, const cv_kron_options *o, cv_kron *out, cv_err *e);

/* Plan-time sizes of the factors cv_curv_kron computes on model m (no
 * batch needed: the Kronecker layers and their kron_dims). */
typedef struct {
    int nfactors;
    double square;    /* sum over the factors of dim_a^2 + dim_b^2 (the A's and B's) */
    double product;   /* sum of dim_a * dim_b (the layers' parameters: EKFAC's values) */
    double linear;    /* sum of dim_a + dim_b (the factors' eigenvalues) */
} cv_kron_sizes;
/* 0, or -1 with e filled (out of memory). */
int cv_kron_sizes_of(const cv_model *m, cv_kron_sizes *out, cv_err *e);

/* The index in vec_r(W~) (row o, column a: o*dim_a + a) of entry i of the
 * factor's block vector theta_l (weight entries, then the bias). */
size_t cv_kron_w_index(const cv_kron_factor *f, size_t i);

#endif
