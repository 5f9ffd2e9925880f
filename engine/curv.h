/* curv.h - curvature operators of a model's loss on one batch, evaluated
 * over micro-batches within a memory budget.
 *
 * A cv_curv holds a model and a batch split into micro-batches (consecutive
 * samples; one micro-batch, the whole batch, when no budget or size is set).
 * Every product, quadratic form, gradient, per-sample quantity and Gram
 * matrix is the sum of (or is assembled from) the micro-batches' shares, so
 * the numbers are those of the whole batch and do not depend on the
 * micro-batch size beyond float32 summation order.  The forward state
 * (activations, layer caches, loss derivatives and cotangents) of as many
 * micro-batches as the budget allows is kept; the others are recomputed in
 * one scratch state for every product.  All products take and return double
 * vectors (estimators reduce in double) while the network math runs in
 * float32, as in PyTorch.
 *
 * Vectors live in a *block* of the parameter vector: a subset of parameter
 * tensors, laid out in state_dict order.  Blocks of several vectors are
 * column-major (column j of X is X + j*dim).
 *
 * Scaling: the loss is exactly PyTorch's, L = sum_n L_n with
 * L_n = c * l_n, where l_n is the unreduced per-sample loss (summed over
 * output entries) and c = 1 for reduction "sum", 1/N for CrossEntropy "mean",
 * 1/(N*C) for MSELoss/BCEWithLogitsLoss "mean" (they average over entries).
 *   hessian    H  = d^2 L / d theta^2
 *   ggn        G  = sum_n J_n^T (d^2 L_n / dh^2) J_n
 *   fisher_mc  F  = c * sum_n J_n^T (1/M sum_m s_nm s_nm^T) J_n,
 *                   s_nm = d l(h_n, yhat_m)/dh, yhat_m ~ p(y | h_n) (M = mc_samples,
 *                   drawn once per cv_curv from the seed, so F is one fixed matrix)
 *   ef         EF = c * sum_n (d l_n/d theta)(d l_n/d theta)^T
 * so that E[F] = G, and for N = 1 with sum reduction EF = g g^T.
 *
 * Data-parallel (options.comm spanning several ranks, engine/comm.h): every
 * rank calls the same functions in the same order with the same arguments;
 * the batch given to cv_curv_new is this rank's shard (cv_comm_share of the
 * whole batch) and everything else - N, outputs, losses, products, per-sample
 * rows, Gram matrices - is the whole batch's, identical on every rank.  Each
 * function that returns numbers is one agreement plus one collective: an
 * error on any rank is every rank's.
 */
#ifndef CV_CURV_H
#define CV_CURV_H

#include <stddef.h>
#include <stdint.h>

#include "comm.h"
#include "dataset.h"
#include "err.h"
#include "linop.h"
#include "model.h"

/* The curvature types, in the order of the enum (the one list: the job
 * validator, GET /v1/ops and its readers take the names from here). */
#define CV_CURVATURES(X)                                                                   \
    X(CV_CURV_HESSIAN, "hessian")                                                          \
    X(CV_CURV_GGN, "ggn")                                                                  \
    X(CV_CURV_FISHER_MC, "fisher_mc")                                                      \
    X(CV_CURV_EF, "ef")                                                                    \
    X(CV_CURV_KFAC, "kfac")                                                                \
    X(CV_CURV_KFLR, "kflr")                                                                \
    X(CV_CURV_KFRA, "kfra")                                                                \
    X(CV_CURV_EKFAC, "ekfac")

#define CV_CURV_ENUM_(id, name) id,
typedef enum { CV_CURVATURES(CV_CURV_ENUM_) CV_CURV_COUNT } cv_curvature;
#undef CV_CURV_ENUM_

const char *cv_curvature_name(cv_curvature c);
/* The Kronecker-factored curvatures (kfac, kflr, kfra, ekfac; issue 22):
 * approximations built from engine/kron.h's factors, applied by the ops
 * through api/op_kron.c.  The exact-curvature functions below (matvec,
 * quadform, dense) refuse them (CV_EINVAL "invalid_curvature"). */
#define CV_CURV_EXACT_COUNT CV_CURV_KFAC /* the exact curvatures come first */
static inline int cv_curvature_is_kron(cv_curvature c)
{
    return c >= CV_CURV_KFAC && c < CV_CURV_COUNT;
}
int cv_curvature_from_name(const char *name); /* -1 if unknown */

/* A subset of parameter tensors (indices into the state_dict order, ascending). */
typedef struct {
    int count;
    int idx[2 * CV_MAX_LAYERS];
    size_t dim;               /* total numel */
    char name[CV_NAME_MAX];   /* per-layer blocks: the module's qualified name ("layer1.0.conv1";
                               * Sequential: the layer index); "" otherwise */
} cv_block;

/* The block of all parameters / of the parameters of one layer. */
void cv_block_full(const cv_model *m, cv_block *b);
/* Builds a block from tensor indices (sorted, deduplicated, dim computed). */
int cv_block_from_indices(const cv_model *m, const int *idx, int count, cv_block *b, cv_err *e);
/* One block per module that owns parameters (in a graph, the layers of one
 * module - an expanded MultiheadAttention - share a block; a function node's
 * or get_attr's tensors form their own); returns the number of blocks and
 * writes at most max of them to out (out may be NULL). */
int cv_blocks_per_layer(const cv_model *m, cv_block *out, int max);

typedef struct cv_curv cv_curv;

typedef struct {
    int mc_samples;           /* fisher_mc samples per data point (default 1) */
    uint64_t seed;            /* fisher_mc sampling seed (sample i of the batch draws
                               * from its own stream: the same for any micro-batching) */
    /* Micro-batching and memory (all 0: one micro-batch, kept; nothing accounted). */
    size_t memory_budget;     /* bytes of engine working memory: micro-batch states,
                               * workspace and vector_bytes (0: unlimited) */
    size_t micro_batch;       /* micro-batch size (0: chosen from the budget) */
    size_t vector_bytes;      /* the caller's own vectors (an estimator's basis, probes),
                               * counted against the budget */
    size_t factor_bytes;      /* Kronecker factors and what the op keeps with them (their
                               * eigenvectors, EKFAC values; held for the whole job), counted
                               * against the budget like vector_bytes and named apart */
    int max_vectors;          /* most vectors one product takes (sizes the workspace; 0: 1) */
    int pairs;                /* Gram matrices will be formed: pairs of micro-batches are
                               * evaluated together (planned at twice the size) */
    cv_curvature kind;        /* the curvature products will use (the Hessian keeps the
                               * loss's cotangents too) */
    cv_progress *progress;    /* micro-batch progress and cancel/deadline (may be NULL) */
    const cv_comm *comm;      /* data-parallel ranks (NULL: one process; borrowed) */
    /* The plan cv_curv_plan_memory already made for this batch and these options (the
     * job's memory check): cv_curv_new takes its split as is instead of probing the
     * model again (NULL: planned here when there is a budget or a micro_batch).  Read
     * by cv_curv_new only (borrowed for that call; cv_curv_get_options returns NULL
     * here, so engines built from a copy of the options plan for themselves).  Not with
     * comm: a rank's shard is planned where it runs. */
    const struct cv_curv_plan *plan;
} cv_curv_options;

/* How a batch is split and what it costs, from a probe of the model on one
 * and two samples (cv_curv_plan_memory) or as run (cv_curv_memory). */
typedef struct cv_curv_plan {
    size_t micro_batch;        /* samples per micro-batch (the last may have fewer) */
    size_t micro_batches;
    size_t cached;             /* micro-batches whose forward state is kept */
    size_t state_per_sample;   /* bytes of forward state per sample ... */
    size_t state_fixed;        /* ... plus per micro-batch */
    size_t work_per_sample;    /* bytes of workspace per sample and vector ... */
    size_t work_fixed;         /* ... plus per vector */
    size_t minimum_bytes;      /* the least the job can run in: one sample (or the given
                                * micro-batch), recomputed, plus vector_bytes and
                                * factor_bytes */
    size_t planned_bytes;      /* what the chosen split should need */
    size_t peak_bytes;         /* cv_curv_memory: the most the engine held at once */
} cv_curv_plan;

/* Plans micro-batches for model m on batch b (this rank's shard) under opt
 * (the probe runs the model on at most two samples; no collectives).  Refuses (CV_EINVAL "job_memory", a 400,
 * naming what is needed) when the budget cannot hold the minimum. */
int cv_curv_plan_memory(const cv_model *m, const cv_batch *b, const cv_curv_options *opt,
                        cv_curv_plan *plan, cv_err *e);

/* Plans (as above), then runs the forward pass of model m on batch b over its
 * micro-batches (both borrowed; must outlive the cv_curv).  Returns NULL with
 * e filled on failure (out of memory, job_memory, cancelled). */
cv_curv *cv_curv_new(const cv_model *m, const cv_batch *b, const cv_curv_options *opt,
                     cv_err *e);
void cv_curv_free(cv_curv *c);

/* The split in use and the peak bytes accounted so far. */
void cv_curv_memory(const cv_curv *c, cv_curv_plan *out);
/* The options c was built with (an engine on a subset of its batch takes them). */
const cv_curv_options *cv_curv_get_options(const cv_curv *c);
/* Data-parallel: every rank passes its rc (0, or -1 with e filled: a local
 * failure such as an allocation before the next product); all return -1
 * with the lowest failing rank's error if any failed.  One process: rc. */
int cv_curv_agree(const cv_curv *c, int rc, cv_err *e);
/* Frees every kept forward state, the scratch state and the workspace (the
 * micro-batches are recomputed from then on) and returns the bytes c still
 * holds (outputs, the caller's vectors): what is left of the budget can go to
 * another engine (a ViViT sub-sample's). */
size_t cv_curv_release_states(cv_curv *c);

const cv_model *cv_curv_model(const cv_curv *c);
/* N, the whole batch's samples (every rank's shard together). */
size_t cv_curv_batch_size(const cv_curv *c);

/* Caps the floats a layer's Gram kernel buffers at once (0: the kernel's
 * default, 4M for Conv2d); smaller budgets mean more, smaller chunks. */
void cv_curv_set_gram_budget(cv_curv *c, size_t floats);

/* The batch the engine was built on (borrowed): data-parallel, this rank's
 * shard, samples [first, first + n) of the whole batch. */
const cv_batch *cv_curv_batch(const cv_curv *c, size_t *first);

/* A new batch of samples idx[0..count) of the whole batch (indices < N),
 * gathered from the ranks that hold them (collective); the caller frees it. */
int cv_curv_gather_samples(cv_curv *c, const size_t *idx, size_t count, cv_batch *out,
                           cv_err *e);

/* Network outputs h for the batch, N x C row-major (borrowed; kept for the
 * whole batch). */
const float *cv_curv_outputs(const cv_curv *c);

/* The batch loss (PyTorch's value, computed in float32, accumulated in double). */
double cv_curv_loss(cv_curv *c);

/* Gradient of the batch loss restricted to block b (b->dim doubles). */
int cv_curv_gradient(cv_curv *c, const cv_block *b, double *g, cv_err *e);

/* Y = A X for k vectors in block b, A the curvature restricted to b x b. */
int cv_curv_matvec(cv_curv *c, cv_curvature kind, const cv_block *b, int k, const double *X,
                   double *Y, cv_err *e);

/* q_j = x_j^T A x_j for k vectors in block b, without forming A x_j: one
 * forward-mode pass (plus, for the Hessian, each layer's second-order terms
 * dotted in place), about half the work of cv_curv_matvec on GEMM-bound
 * nets.  Equal to the dot of x_j with cv_curv_matvec's product up to float32
 * rounding. */
int cv_curv_quadform(cv_curv *c, cv_curvature kind, const cv_block *b, int k, const double *X,
                     double *q, cv_err *e);

/* Per-sample gradients d L_n / d theta (contributions to the batch loss, so
 * they sum to the gradient), N x b->dim, row n at G + n*b->dim. */
int cv_curv_per_sample_gradients(cv_curv *c, const cv_block *b, double *G, cv_err *e);

/* Per-sample gradient factors of Linear layers (engine/linear_factors.c).
 * cv_linear_factor_layer: 1 when layer l of m is a Linear layer on one row per
 * sample whose tensors no other layer uses: its per-sample gradients are
 * s_n a_n^T (weight, out x in row-major) and s_n (bias).
 * cv_curv_linear_factors: for every such layer l with layers[l] set (the
 * CV_MAX_LAYERS flags), writes its inputs a_n (N x in, row n for sample n) at
 * out + offset[l] and right after them the cotangents of the samples'
 * unscaled losses at its output, s_n = d l_n / d y_l (N x out), for the whole
 * batch (every rank); out has len doubles (zeroed first).  Costs one backward
 * walk of the sample gradients. */
int cv_linear_factor_layer(const cv_model *m, int l);
int cv_curv_linear_factors(cv_curv *c, const char *layers, const size_t *offset, double *out,
                           size_t len, cv_err *e);

/* The full b->dim x b->dim matrix (column-major, symmetric) built from matvecs;
 * refused above max_dim. */
int cv_curv_dense(cv_curv *c, cv_curvature kind, const cv_block *b, size_t max_dim, double *A,
                  cv_err *e);

/* *loss = loss of the model with parameters theta + step on block b (same
 * batch).  Returns 0, or -1 with e filled. */
int cv_curv_loss_at(cv_curv *c, const cv_block *b, const double *step, double *loss,
                    cv_err *e);

/* ---- building blocks for factor-based methods (ViViT, Kronecker factors) ----
 * Cotangent/tangent blocks at the network output are float, k x N x C
 * (vector j, sample n at + (j*N + n)*C). */

/* Output tangents J X: out = J_n x_j for k block vectors X (double, k x dim). */
int cv_curv_jvp(cv_curv *c, const cv_block *b, int k, const double *X, float *out, cv_err *e);

/* Parameter cotangents Y_j = sum_n J_n^T cot_j(n) restricted to block b. */
int cv_curv_vjp(cv_curv *c, const cv_block *b, int k, const float *cot, double *Y, cv_err *e);

/* Gram matrix of the per-(vector, sample) parameter gradients on block b:
 * G[r, r'] = <J_n^T cot_j(n), J_n'^T cot_j'(n')> with r = j*N + n, computed
 * layer by layer without forming the gradients (Linear: (a a^T) .* (s s^T)).
 * G is (k*N) x (k*N) row-major; refused if a layer in b has no Gram kernel. */
int cv_curv_gram(cv_curv *c, const cv_block *b, int k, const float *cot, double *G,
                 cv_err *e);

/* The loss state of the batch (output probabilities, scale, labels), for
 * loss-Hessian square roots and per-sample output gradients (loss.h). */
#include "loss.h"
const cv_loss_state *cv_curv_loss_state(const cv_curv *c);

/* A cv_linop view of (curvature kind) on block b; ctx storage is caller's. */
typedef struct {
    cv_curv *curv;
    cv_curvature kind;
    const cv_block *block;
} cv_curv_linop_ctx;
void cv_curv_linop(cv_linop *op, cv_curv_linop_ctx *ctx, cv_curv *c, cv_curvature kind,
                   const cv_block *b, cv_progress *p);

#endif
