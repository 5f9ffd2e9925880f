/* kron_fixture.h - what the Kronecker suites (test_kron.c, test_kron_ext.c)
 * share: layer builders (Linear, Conv2d, parameterless classes), a model
 * with random parameters, a cv_curv fixture (mc_samples 3, seed 77) and the
 * factors of it. */
#ifndef CV_KRON_FIXTURE_H
#define CV_KRON_FIXTURE_H

#include "testutil.h"

#include "engine/kron.h"
#include "engine/layer_conv.h"
#include "engine/layer_passthrough.h"

/* ---- models -------------------------------------------------------------------- */

static inline cv_layer lin(int in, int out, int bias)
{
    cv_layer L;
    cv_layer_init(&L, &cv_linear_class);
    CV_LAYER_ATTR(&L, cv_linear_attr)->in_features = in;
    CV_LAYER_ATTR(&L, cv_linear_attr)->out_features = out;
    CV_LAYER_ATTR(&L, cv_linear_attr)->has_bias = bias;
    return L;
}

static inline cv_layer simple(const cv_layer_class *cls)
{
    cv_layer L;
    cv_layer_init(&L, cls);
    return L;
}

static inline cv_layer conv(int cin, int cout, int k, int groups, int bias)
{
    cv_layer L;
    cv_layer_init(&L, &cv_conv2d_class);
    cv_conv2d_attr *a = CV_LAYER_ATTR(&L, cv_conv2d_attr);
    a->in_channels = cin;
    a->out_channels = cout;
    a->kernel[0] = a->kernel[1] = k;
    a->groups = groups;
    a->has_bias = bias;
    return L;
}

/* Model on per-sample input dims[0..rank) with random parameters. */
static inline void build(cv_model *m, int rank, const int *dims, const cv_layer *Ls, int nl,
                  cv_loss_type loss, cv_reduction red, uint64_t seed)
{
    memset(m, 0, sizeof *m);
    m->input_shape.rank = rank;
    for (int i = 0; i < rank; i++)
        m->input_shape.dim[i] = dims[i];
    m->nlayers = nl;
    for (int i = 0; i < nl; i++)
        m->layers[i] = Ls[i];
    m->loss = loss;
    m->reduction = red;
    cv_err e;
    if (cv_model_finalize(m, &e))
        ck_abort_msg("finalize: %s", e.message);
    ck_assert_int_eq(cv_model_alloc(m), 0);
    cv_rng r;
    cv_rng_seed(&r, seed);
    for (size_t q = 0; q < m->nparams_total; q++)
        m->params[q] = (float)(0.8 * (2 * cv_rng_uniform(&r) - 1));
}

typedef struct {
    cv_model m;
    cv_dataset d;
    cv_curv *c;
} fx;

static inline void fx_make(fx *f, int rank, const int *dims, const cv_layer *Ls, int nl,
                    cv_loss_type loss, cv_reduction red, size_t n, uint64_t seed,
                    size_t micro_batch)
{
    build(&f->m, rank, dims, Ls, nl, loss, red, seed);
    tu_data(&f->d, &f->m, n, seed + 100);
    cv_curv_options co = {.mc_samples = 3, .seed = 77, .micro_batch = micro_batch};
    cv_err e;
    f->c = cv_curv_new(&f->m, &f->d, &co, &e);
    ck_assert_msg(f->c != NULL, "cv_curv_new: %s", e.message);
}

static inline void fx_free(fx *f)
{
    cv_curv_free(f->c);
    cv_model_free(&f->m);
    tu_data_free(&f->d);
}

static inline void kron_of(fx *f, cv_kron_fisher ft, cv_kron_approx ap, cv_kron *k)
{
    cv_kron_options o = {ft, ap, 0, 0};
    cv_err e;
    ck_assert_msg(cv_curv_kron(f->c, &o, k, &e) == 0, "cv_curv_kron: %s", e.message);
}

#endif
