/* part_internal.h - what the files of the one-micro-batch engine share
 * (part.c: the forward pass and the products; part_walk.c: the graph walks
 * and their cotangent pool; part_gram.c: Gram matrices): the engine state
 * and the walk.  Not an API for other modules (engine/part.h is). */
#ifndef CV_PART_INTERNAL_H
#define CV_PART_INTERNAL_H

#include <stddef.h>

#include "curv.h"
#include "part.h"
#include "layer.h"
#include "loss.h"

/* Cotangents of the backward passes live in pooled buffers: a buffer is taken
 * when the first consumer of an activation (in reverse order) writes it and
 * given back once its producer has been processed, so a chain needs two and a
 * residual network a few, however deep. */
#define CV_POOL_MAX (CV_MAX_LAYERS + 1)

struct cv_part {
    const cv_model *m;
    const cv_batch *b;
    int n, L, C;
    int cap;                         /* samples the state is allocated for (n <= cap) */
    cv_part_options opt;
    cv_layer_ctx ctx[CV_MAX_LAYERS];
    const cv_layer_ops *ops[CV_MAX_LAYERS];
    size_t numel[CV_MAX_LAYERS + 1]; /* per-sample numel of act[a] */
    size_t poff[CV_MAX_LAYERS];      /* offset of layer l's parameters */
    /* Parameter tensors by use: slot i of layer l is unique tensor uid[l][i]
     * at loc[l][i] in the layer's own vector (its tensors concatenated); a
     * tensor used by several layers (tied) makes the model `tied`. */
    int uid[CV_MAX_LAYERS][CV_MAX_LAYER_PARAMS];
    size_t loc[CV_MAX_LAYERS][CV_MAX_LAYER_PARAMS];
    int nuid, tied;
    long *bpos;                      /* per uid: offset in the current block, or -1 */
    size_t copy_bytes;               /* bytes of bpos and theta_copy */
    float *theta_copy[CV_MAX_LAYERS]; /* gathered parameters of non-contiguous layers */
    float *act[CV_MAX_LAYERS + 1];   /* act[0] = batch x (borrowed), act[l+1] = layer l's output */
    size_t max_numel;

    cv_loss_state ls;
    double loss;
    float *gh;                       /* dL/dh */
    int have_gy;                     /* gy[] holds this micro-batch's cotangents */
    float *gy[CV_MAX_LAYERS];        /* dL/d(output of layer l) */

    float *mc_s;                     /* fisher_mc gradient samples */
    float *ef_s;                     /* per-sample output gradients (EF) */

    int wk;                          /* vectors the workspace is sized for */
    int ws_n;                        /* samples the workspace is sized for */
    float *rx[CV_MAX_LAYERS + 1];    /* tangents of act[a], wk*n*numel[a] */
    float *vth[CV_MAX_LAYERS];       /* per-layer parameter directions */
    float *gth[CV_MAX_LAYERS];       /* per-layer parameter products */

    size_t pool_floats;              /* size of every pooled cotangent buffer */
    int npool, nfree;
    float *pool[CV_POOL_MAX];        /* all pooled buffers */
    float *free_bufs[CV_POOL_MAX];   /* those not in use */
    float *slot_tmp[CV_MAX_NODE_INPUTS]; /* a node's input cotangent before it is added
                                          * (cv_part_slot allocates them on first use) */
};

/* One backward walk over the live layers for k stacked cotangents. */
typedef struct {
    int k;
    const char *active, *live;  /* NULL live: every layer (the gradient pass) */
    int hessian;                /* add the second-order terms (gy, rx, vth) */
    float **gtheta;             /* per-layer parameter products (active layers), or NULL */
    int use_gy;                 /* cotangents are the persistent gy[] (gradient pass) */
    /* Called with each active layer's output cotangent, before its vjp. */
    int (*at_layer)(cv_part *c, int l, const float *cot, void *arg, cv_err *e);
    void *arg;
    float *cot[CV_MAX_LAYERS + 1];
    char set[CV_MAX_LAYERS + 1];
} cv_walk;

/* The samples the workspace is sized for (at least the part's own). */
size_t cv_part_ws_samples(const cv_part *c);
/* Scratch of layer l's kernels for k vectors (grown on demand). */
int cv_part_layer_work(cv_part *c, int l, int k, cv_err *e);

/* ---- the graph walks (curv_walk.c) ----------------------------------------
 * Activation a is produced by layer a - 1 (a = 0: the model input).  For a
 * set of active layers (those owning tensors of the block), a layer is live
 * when it is active or reads a live layer's output: exactly the layers whose
 * outputs have nonzero tangents and whose inputs need cotangents. */
void cv_part_live(const cv_part *c, const char *active, char *live);
/* 1 when input slot i of layer l carries a tangent / needs a cotangent. */
int cv_part_slot_live(const cv_part *c, const char *live, int l, int i);
/* Forward tangents rx[] of the live layers for k directions in vth[]. */
void cv_part_tangents(cv_part *c, const char *active, const char *live, int k);
/* Runs walk w from the output cotangent top (k*n*C floats): gy[L-1] in the
 * gradient pass, else a pooled buffer the walk gives back. */
int cv_part_walk(cv_part *c, cv_walk *w, float *top, cv_err *e);
/* The same from activation a's cotangent top (k*n*numel[a] floats, a pooled
 * buffer the walk gives back) through layers a-1 down to 0 (live ones; the
 * caller's live flags leave out layers that do not lead to a). */
int cv_part_walk_from(cv_part *c, cv_walk *w, int a, float *top, cv_err *e);
/* The loss's backward pass: gy[l] of every layer (once per forward; kept
 * while the part's curvature is the Hessian, else until the next call of
 * the products that drop them). */
int cv_part_ensure_gy(cv_part *c, cv_err *e);

/* The cotangent pool: buffers of k*n*max_numel floats. */
int cv_part_pool_ensure(cv_part *c, int k, cv_err *e);
float *cv_part_pool_take(cv_part *c);
void cv_part_pool_give(cv_part *c, float *p);
/* Slot buffer i (pool-sized), allocated on first use; NULL when out of memory. */
float *cv_part_slot(cv_part *c, int i);
void cv_part_pool_free(cv_part *c);

/* ---- blocks (curv.c) ------------------------------------------------------- */
/* Fills c->bpos for block b, marks the layers using its tensors (active) and
 * the live ones. */
void cv_part_mark_block(cv_part *c, const cv_block *b, char *active, char *live);

#endif
