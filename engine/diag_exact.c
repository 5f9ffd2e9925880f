/* diag_exact.c - the exact diagonal of ggn, fisher_mc and ef by
 * backpropagation (API in diag_exact.h): which blocks the layers' diag_add
 * kernels cover, one micro-batch's share (a backward walk of the output
 * factor's vectors, each active layer squaring its per-(sample, column)
 * gradients into its own parameter vector, then placed at the block's
 * offsets), the sum over micro-batches and ranks and the weight of the
 * vectors (as the Kronecker factors': ggn 1, fisher_mc c/M, ef c). */
#include "diag_exact.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "layer.h"
#include "part_internal.h"

/* Names layer l for a refusal: its class and, in the graph form, its node. */
static void layer_label(const cv_layer *L, int l, char *s, size_t n)
{
    if (L->node[0])
        snprintf(s, n, "layers[%d] (%s, node '%s')", l, L->cls->name, L->node);
    else
        snprintf(s, n, "layers[%d] (%s)", l, L->cls->name);
}

int cv_diag_backprop_check(const cv_model *m, cv_curvature kind, const cv_block *b, cv_err *e)
{
    if (kind != CV_CURV_GGN && kind != CV_CURV_FISHER_MC && kind != CV_CURV_EF)
        return cv_err_set(e, CV_EINVAL, "unsupported", "options.method",
                          "the backpropagated exact diagonal covers ggn, fisher_mc and ef, "
                          "not %s", cv_curvature_name(kind));
    for (int t = 0; t < b->count; t++) {
        size_t off = cv_model_param(m, b->idx[t])->offset;
        int users = 0, first = -1;
        for (int l = 0; l < m->nlayers; l++)
            for (int i = 0; i < m->layers[l].nparams; i++)
                if (m->layers[l].params[i].offset == off) {
                    users++;
                    first = first < 0 ? l : first;
                    const cv_layer_ops *o = m->layers[l].cls->ops;
                    if (o && o->diag_add)
                        continue;
                    char s[160];
                    layer_label(&m->layers[l], l, s, sizeof s);
                    return cv_err_set(e, CV_EINVAL, "unsupported", "options.method",
                                      "exact diagonal: %s has no backpropagated diagonal "
                                      "kernel (diag_add)", s);
                }
        if (users > 1) {
            char s[160];
            layer_label(&m->layers[first], first, s, sizeof s);
            return cv_err_set(e, CV_EINVAL, "unsupported", "options.method",
                              "exact diagonal: tensor '%s' of %s is used by %d layers (tied "
                              "weights); the backpropagated diagonal squares one layer's "
                              "gradients",
                              cv_model_param(m, b->idx[t])->name, s, users);
        }
    }
    return 0;
}

typedef struct {
    cv_curvature kind;
    const cv_block *b;
    int per_sample;
    double *out;                 /* b->dim (per_sample: N x b->dim): the share is added here */
    double *dl[CV_MAX_LAYERS];   /* per active layer: P doubles (per_sample: n x P) */
} diag_job;

static int diag_visit(cv_part *c, int l, int k, const float *cot, void *arg, cv_err *e)
{
    diag_job *j = arg;
    if (c->ops[l]->diag_add(&c->ctx[l], k, cot, j->per_sample, j->dl[l]))
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                          "exact diagonal of layers[%d] (scratch)", l);
    return 0;
}

/* out[block offset of slot (l, i)] += dl[l][its place in the layer's vector]
 * (per_sample: row first + s of out from row s of dl[l]). */
static void place(cv_part *c, const char *active, diag_job *j)
{
    int rows = j->per_sample ? c->n : 1;
    for (int l = 0; l < c->L; l++)
        for (int i = 0; active[l] && i < c->m->layers[l].nparams; i++) {
            long p = c->bpos[c->uid[l][i]];
            if (p < 0)
                continue;
            size_t n = c->m->layers[l].params[i].numel;
            for (int s = 0; s < rows; s++) {
                const double *src = j->dl[l] + (size_t)s * c->ctx[l].nparam + c->loc[l][i];
                double *dst = j->out + p +
                              (j->per_sample ? (c->opt.first + (size_t)s) * j->b->dim : 0);
                for (size_t q = 0; q < n; q++)
                    dst[q] += src[q];
            }
        }
}

static int diag_share(cv_part *c, void *arg, cv_err *e)
{
    diag_job *j = arg;
    char active[CV_MAX_LAYERS], live[CV_MAX_LAYERS];
    cv_part_mark_block(c, j->b, active, live);
    int rc = 0;
    for (int l = 0; l < c->L && !rc; l++) {
        j->dl[l] = NULL;
        size_t len = c->ctx[l].nparam * (j->per_sample ? (size_t)c->n : 1) + 1;
        if (active[l] && !(j->dl[l] = calloc(len, sizeof(double))))
            rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "exact diagonal of layers[%d]",
                            l);
    }
    if (!rc)
        rc = cv_part_kron_walk(c, j->kind, active, diag_visit, j, NULL, e);
    if (!rc) {
        cv_part_mark_block(c, j->b, active, live); /* bpos again: the walk may use it */
        place(c, active, j);
    }
    for (int l = 0; l < c->L; l++) {
        free(j->dl[l]);
        j->dl[l] = NULL;
    }
    return rc;
}

int cv_curv_diag_backprop(cv_curv *c, cv_curvature kind, const cv_block *b, int per_sample,
                          double *d, cv_err *e)
{
    if (cv_curv_agree(c, cv_diag_backprop_check(cv_curv_model(c), kind, b, e), e))
        return -1;
    diag_job *j = calloc(1, sizeof *j);
    if (cv_curv_agree(c, j ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "exact diagonal"),
                      e)) {
        free(j);
        return -1;
    }
    j->kind = kind;
    j->b = b;
    j->per_sample = per_sample != 0;
    j->out = d;
    size_t len = b->dim * (per_sample ? cv_curv_batch_size(c) : 1);
    int rc = cv_curv_sum_parts(c, diag_share, j, d, len, e);
    free(j);
    if (rc)
        return -1;
    const cv_curv_options *co = cv_curv_get_options(c);
    double cs = cv_curv_loss_state(c)->scale;
    int M = co->mc_samples > 0 ? co->mc_samples : 1;
    double w = kind == CV_CURV_FISHER_MC ? cs / M : kind == CV_CURV_EF ? cs : 1.0;
    for (size_t q = 0; q < len; q++)
        d[q] *= w;
    return 0;
}
