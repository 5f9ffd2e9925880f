/* part.h - the curvature engine on one micro-batch: its forward state
 * (activations, layer caches, loss derivatives, the loss's cotangents),
 * and its share of every product, quadratic form, gradient, per-sample
 * quantity and Gram kernel.  engine/curv.c splits a job's batch into
 * micro-batches, keeps the state of as many as its memory budget allows and
 * sums their shares; nothing else uses this API.
 *
 * A part is built for at most `cap` samples and may be re-bound to another
 * micro-batch of at most cap samples (its forward pass rerun in the same
 * memory).  Its scratch (tangents, cotangent pool, layer scratch: the
 * workspace) is separate from its state, so that parts used one after the
 * other can hand one workspace along (cv_part_take_workspace).
 *
 * Everything "_add" adds this micro-batch's share into the caller's buffer;
 * everything else is in the part's own sample numbering (sample i of the
 * part is sample first + i of the whole batch).  Vectors and scaling are as
 * in curv.h; the loss scale is the whole batch's (options.scale). */
#ifndef CV_PART_H
#define CV_PART_H

#include <stddef.h>

#include "curv.h"
#include "loss.h"

typedef struct cv_part cv_part;

typedef struct {
    cv_curv_options base;
    double scale;    /* the whole batch's loss scale (cv_loss_batch_scale); < 0: this
                      * batch's own (a part that is the whole batch) */
    size_t first;    /* index of the part's first sample in the whole batch (the
                      * Monte Carlo draws of a sample depend on its index only) */
    size_t ws_samples; /* size the workspace for at least this many samples (the
                        * largest part it will be handed to) */
} cv_part_options;

/* Builds a part for b (borrowed, must outlive the part or its next rebind)
 * and runs its forward pass; NULL with e filled on failure. */
cv_part *cv_part_new(const cv_model *m, const cv_batch *b, const cv_part_options *opt,
                     cv_err *e);
/* Reruns the forward pass on another micro-batch b (b->n <= the samples the
 * part was built for) whose first sample is sample `first` of the batch. */
int cv_part_rebind(cv_part *c, const cv_batch *b, size_t first, cv_err *e);
void cv_part_free(cv_part *c);

size_t cv_part_batch_size(const cv_part *c);
double cv_part_loss(const cv_part *c);                 /* its share of the batch loss */
const float *cv_part_outputs(const cv_part *c);        /* n x C */
void cv_part_set_gram_budget(cv_part *c, size_t floats);

/* Sizes the part for products of `kind` with up to k vectors at a time:
 * the loss cotangents (Hessian), the output samples (fisher_mc, ef) and the
 * workspace. */
int cv_part_prepare(cv_part *c, cv_curvature kind, int k, cv_err *e);
/* The same for backward walks alone (cv_part_kron_walk_k): the loss
 * cotangents and output samples, and pooled cotangent buffers for k
 * vectors, without the products' tangent and parameter buffers. */
int cv_part_prepare_walk(cv_part *c, cv_curvature kind, int k, cv_err *e);

/* g += this micro-batch's gradient on block b (the loss's cotangents it
 * computes are kept only when the part's curvature is the Hessian). */
int cv_part_gradient_add(cv_part *c, const cv_block *b, double *g, cv_err *e);
/* Y += A_part X / q_j += x_j^T A_part x_j for k vectors of block b. */
int cv_part_matvec_add(cv_part *c, cv_curvature kind, const cv_block *b, int k,
                       const double *X, double *Y, cv_err *e);
int cv_part_quadform_add(cv_part *c, cv_curvature kind, const cv_block *b, int k,
                         const double *X, double *q, cv_err *e);
/* Rows of the per-sample gradients (n x b->dim, zeroed first). */
int cv_part_per_sample_gradients(cv_part *c, const cv_block *b, double *G, cv_err *e);
/* out (k x n x C) = J X; Y += J^T cot for cot k x n x C. */
int cv_part_jvp(cv_part *c, const cv_block *b, int k, const double *X, float *out, cv_err *e);
int cv_part_vjp_add(cv_part *c, const cv_block *b, int k, const float *cot, double *Y,
                    cv_err *e);
/* The Gram matrix of the part's own samples (curv.h, cv_curv_gram). */
int cv_part_gram(cv_part *c, const cv_block *b, int k, const float *cot, double *G,
                 cv_err *e);

/* Kronecker factors' shares (engine/kron.c): for every layer l with
 * layers[l] set (it has the kron kernels of layer.h), A[l] += its
 * kron_a_add over this micro-batch and B[l] += its kron_b_add of the
 * cotangents that reach its output when the output factor of `kind` is
 * backpropagated (one walk, in chunks of the workspace's vectors):
 *   CV_CURV_GGN        the C columns of the loss Hessian's square root
 *                      (cv_loss_hessian_sqrt: already scaled, weight 1);
 *   CV_CURV_FISHER_MC  the mc_samples gradient samples fisher_mc draws
 *                      (unscaled: the caller weighs B by c / mc_samples);
 *   CV_CURV_EF         the sample gradients d l_n / dh (unscaled: weight c).
 * Returns the vectors per sample backpropagated in *columns (may be NULL). */
typedef struct {
    cv_curvature kind;
    int approx;                       /* cv_kron_approx (layer.h) */
    const char *layers;               /* CV_MAX_LAYERS flags */
    double *A[CV_MAX_LAYERS], *B[CV_MAX_LAYERS];
    /* ACP (kron.h options acp): non-zero: no B; with gmax non-NULL the walk
     * of kind's vectors sets gmax[l] = max(gmax[l], the largest squared
     * entry of the cotangents that reach layer l's output), without it
     * only the A's are added. */
    int acp;
    double *gmax;                     /* CV_MAX_LAYERS entries or NULL */
} cv_part_kron;
int cv_part_kron_add(cv_part *c, const cv_part_kron *job, int *columns, cv_err *e);
/* The walk behind cv_part_kron_add, for other per-layer uses of the same
 * cotangents (EKFAC, engine/kron_ext.c): fn(c, l, k, cot, arg, e) is called
 * for every layer l with layers[l] set with the k stacked cotangents (vector
 * j, sample i at cot + (j*n + i)*out_numel) that reach its output, chunk by
 * chunk; it returns 0 or -1 with e filled. */
typedef int (*cv_part_kron_visit)(cv_part *c, int l, int k, const float *cot, void *arg,
                                  cv_err *e);
int cv_part_kron_walk(cv_part *c, cv_curvature kind, const char *layers, int narrow,
                      cv_part_kron_visit fn, void *arg, int *columns, cv_err *e);
/* The vectors per sample the walk's output factor of kind has: GGN C (narrow:
 * cv_loss_factor_columns, C - 1 for a flat CE/NLL output), fisher_mc
 * mc_samples, ef 1. */
int cv_part_kron_columns(const cv_part *c, cv_curvature kind, int narrow);
/* The same walk with max_k vectors at a time (max_k >= 1; cv_part_kron_walk:
 * up to 32, fewer where a cotangent buffer would pass 8 MB), sizing only
 * what walks use (cv_part_prepare_walk): for visits whose cost does not grow
 * with the number of chunks (exact diagonal), small chunks keep the buffers
 * a walk touches small and in cache.  narrow (GGN): the loss Hessian's
 * narrowest factor (cv_loss_hessian_factor: C - 1 columns for a flat CE/NLL
 * output, not C), for visits whose result only depends on the sum over the
 * vectors of their outer products or squares; 0: its C columns. */
int cv_part_kron_walk_k(cv_part *c, cv_curvature kind, const char *layers, int max_k,
                        int narrow, cv_part_kron_visit fn, void *arg, int *columns, cv_err *e);

/* For modules that add their own per-micro-batch shares (engine/kron.c):
 * out (len doubles, zeroed first) = the sum over micro-batches of what
 * fn(part, arg) adds into it, then over every rank (cv_comm_sum: every rank
 * calls it, an error on any is every rank's).  Defined in curv.c. */
typedef int (*cv_part_share_fn)(cv_part *p, void *arg, cv_err *e);
int cv_curv_sum_parts(cv_curv *c, cv_part_share_fn fn, void *arg, double *out, size_t len,
                      cv_err *e);

/* Frees the workspace. */
void cv_part_free_workspace(cv_part *c);

/* Bytes the part holds: its forward state (activations, layer caches, loss
 * state and cotangents, output samples) and its workspace. */
size_t cv_part_state_bytes(const cv_part *c);
size_t cv_part_work_bytes(const cv_part *c);
/* Moves from's workspace to `to` (which frees its own); `to` must not have
 * more samples than the workspace was sized for, else it is not moved. */
void cv_part_take_workspace(cv_part *to, cv_part *from);

#endif
