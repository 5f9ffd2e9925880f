/* linear_factors.c - the per-sample factors of Linear layers' gradients
 * (curv.h cv_curv_linear_factors): a Linear layer on one row per sample has
 * per-sample parameter gradients g_n = s_n a_n^T (weight) and s_n (bias), a_n
 * its input and s_n the cotangent of sample n's unscaled loss at its output,
 * so per-sample gradient statistics need only these N x (in + out) numbers
 * (op "instruments", api/ops_instruments.c).  One walk of the sample
 * gradients (engine/part.h cv_part_kron_walk, kind ef) per micro-batch. */
#include <string.h>

#include "curv.h"
#include "layer_linear.h"
#include "part.h"
#include "part_internal.h"

int cv_linear_factor_layer(const cv_model *m, int l)
{
    const cv_layer *L = &m->layers[l];
    if (L->cls != &cv_linear_class || L->nparams < 1)
        return 0;
    const cv_linear_attr *a = CV_LAYER_ATTR(L, cv_linear_attr);
    if (cv_shape_numel(&L->in_shape) != (size_t)a->in_features)
        return 0; /* several rows per sample: g_n is a sum of outer products */
    for (int t = 0; t < L->nparams; t++)
        if (L->params[t].shared)
            return 0;
    return 1;
}

typedef struct {
    const size_t *offset;
    size_t N;
    double *out;
} factor_job;

static int factor_visit(cv_part *c, int l, int k, const float *cot, void *arg, cv_err *e)
{
    const factor_job *j = arg;
    const cv_layer_ctx *x = &c->ctx[l];
    size_t in = x->in_numel, out = x->out_numel, first = c->opt.first;
    double *A = j->out + j->offset[l], *S = A + j->N * in;
    for (int i = 0; i < x->n; i++) {
        const float *a = x->x + (size_t)i * in, *s = cot + (size_t)i * out;
        double *ai = A + (first + (size_t)i) * in, *si = S + (first + (size_t)i) * out;
        for (size_t q = 0; q < in; q++)
            ai[q] = a[q];
        for (size_t q = 0; q < out; q++)
            si[q] = s[q];
    }
    return 0;
}

typedef struct {
    const char *layers;
    factor_job job;
} factor_share;

static int factor_part(cv_part *p, void *arg, cv_err *e)
{
    factor_share *s = arg;
    return cv_part_kron_walk(p, CV_CURV_EF, s->layers, 0, factor_visit, &s->job, NULL, e);
}

int cv_curv_linear_factors(cv_curv *c, const char *layers, const size_t *offset, double *out,
                           size_t len, cv_err *e)
{
    factor_share s = {layers, {offset, cv_curv_batch_size(c), out}};
    return cv_curv_sum_parts(c, factor_part, &s, out, len, e);
}
