/* testutil.h - shared helpers for curvd's Check tests: small random models
 * and datasets built in code, dense linear algebra checks. Header-only. */
#ifndef CV_TESTUTIL_H
#define CV_TESTUTIL_H

#include <check.h>
#include <lapacke.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/curv.h"
#include "engine/dataset.h"
#include "engine/layer_activation.h"
#include "engine/layer_linear.h"
#include "engine/model.h"
#include "engine/rng.h"

/* A layer spec for tu_model: class plus the one size that matters. */
typedef struct {
    const cv_layer_class *cls;
    int out;        /* Linear out_features */
} tu_layer;

/* Builds and finalizes an MLP-like model with random parameters of scale
 * `scale`/sqrt(fan_in).  Aborts the test on errors. */
static inline void tu_model(cv_model *m, int in, const tu_layer *layers, int nl,
                            cv_loss_type loss, cv_reduction red, uint64_t seed)
{
    memset(m, 0, sizeof *m);
    m->input_shape.rank = 1;
    m->input_shape.dim[0] = in;
    m->nlayers = nl;
    m->loss = loss;
    m->reduction = red;
    int cur = in;
    for (int i = 0; i < nl; i++) {
        cv_layer *L = &m->layers[i];
        cv_layer_init(L, layers[i].cls); /* PyTorch's defaults */
        if (L->cls == &cv_leakyrelu_class)
            CV_LAYER_ATTR(L, cv_leakyrelu_attr)->negative_slope = 0.1;
        if (L->cls == &cv_linear_class) {
            cv_linear_attr *a = CV_LAYER_ATTR(L, cv_linear_attr);
            a->in_features = cur;
            a->out_features = layers[i].out;
            a->has_bias = 1;
            cur = layers[i].out;
        }
    }
    cv_err fe;
    if (cv_model_finalize(m, &fe))
        ck_abort_msg("finalize: %s", fe.message);
    ck_assert_int_eq(cv_model_alloc(m), 0);
    cv_rng r;
    cv_rng_seed(&r, seed);
    for (int i = 0; i < m->nlayers; i++) {
        const cv_layer *L = &m->layers[i];
        for (int p = 0; p < L->nparams; p++) {
            const cv_tensor_info *t = &L->params[p];
            double s = L->cls == &cv_linear_class
                           ? 1.0 / sqrt((double)CV_LAYER_ATTR(L, cv_linear_attr)->in_features)
                           : 0.5;
            for (size_t q = 0; q < t->numel; q++)
                m->params[t->offset + q] = (float)(s * (2 * cv_rng_uniform(&r) - 1) * 1.5);
        }
    }
}

/* Random dataset fitting model m: x ~ N(0,1); labels or targets as the loss needs. */
static inline void tu_data(cv_dataset *d, const cv_model *m, size_t n, uint64_t seed)
{
    memset(d, 0, sizeof *d);
    cv_rng r;
    cv_rng_seed(&r, seed);
    d->n = n;
    d->x_shape = m->input_shape;
    size_t xs = cv_shape_numel(&m->input_shape);
    int C = cv_model_output_dim(m);
    d->x = malloc(sizeof(float) * n * xs);
    for (size_t i = 0; i < n * xs; i++)
        d->x[i] = (float)cv_rng_normal(&r);
    if (m->loss == CV_LOSS_CE) {
        d->y_is_index = 1;
        d->labels = malloc(sizeof(int64_t) * n);
        for (size_t i = 0; i < n; i++)
            d->labels[i] = (int64_t)cv_rng_below(&r, (uint64_t)C);
    } else {
        d->y_shape.rank = 1;
        d->y_shape.dim[0] = C;
        d->targets = malloc(sizeof(float) * n * C);
        for (size_t i = 0; i < n * (size_t)C; i++)
            d->targets[i] = m->loss == CV_LOSS_BCE ? (float)cv_rng_uniform(&r)
                                                   : (float)cv_rng_normal(&r);
    }
}

static inline void tu_data_free(cv_dataset *d)
{
    free(d->x);
    free(d->labels);
    free(d->targets);
    memset(d, 0, sizeof *d);
}

static inline double tu_dot(const double *a, const double *b, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

static inline double tu_norm(const double *a, size_t n) { return sqrt(tu_dot(a, a, n)); }

/* ||a - b|| / max(||b||, floor) */
static inline double tu_relerr(const double *a, const double *b, size_t n, double floor)
{
    double d = 0, nb = 0;
    for (size_t i = 0; i < n; i++) {
        d += (a[i] - b[i]) * (a[i] - b[i]);
        nb += b[i] * b[i];
    }
    nb = sqrt(nb);
    return sqrt(d) / (nb > floor ? nb : floor);
}

/* Checks cv_curv_quadform against the dot of x with cv_curv_matvec's product
 * for every curvature on block b (k random directions, several internal
 * chunks when k > 32); returns the Hessian's minus the GGN's first form,
 * relative, so callers can assert the second-order terms were exercised. */
static inline double tu_check_quadforms(cv_curv *c, const cv_block *b, int k, uint64_t seed,
                                        const char *tag)
{
    size_t D = b->dim;
    double *X = malloc(sizeof(double) * D * k), *Y = malloc(sizeof(double) * D * k);
    double *q = malloc(sizeof(double) * k), first[CV_CURV_COUNT];
    cv_rng r;
    cv_rng_seed(&r, seed);
    cv_rng_gaussian(&r, X, D * k);
    cv_err e;
    for (int kind = 0; kind < CV_CURV_COUNT; kind++) {
        ck_assert_int_eq(cv_curv_matvec(c, (cv_curvature)kind, b, k, X, Y, &e), 0);
        ck_assert_msg(cv_curv_quadform(c, (cv_curvature)kind, b, k, X, q, &e) == 0, "%s: %s",
                      tag, e.message);
        for (int j = 0; j < k; j++) {
            double ref = tu_dot(X + j * D, Y + j * D, D);
            double scale = tu_norm(X + j * D, D) * tu_norm(Y + j * D, D);
            ck_assert_msg(fabs(q[j] - ref) <= 2e-5 * scale + 1e-12,
                          "%s %s vector %d: quadform %.9g, x.Ax %.9g (scale %g)", tag,
                          cv_curvature_name(kind), j, q[j], ref, scale);
        }
        first[kind] = q[0];
    }
    free(X);
    free(Y);
    free(q);
    return fabs(first[CV_CURV_HESSIAN] - first[CV_CURV_GGN]) /
           (fabs(first[CV_CURV_GGN]) + 1e-30);
}

/* Eigenvalues (ascending) of a symmetric n x n column-major matrix (copied). */
static inline void tu_eigvalsh(const double *A, int n, double *w)
{
    double *a = malloc(sizeof(double) * (size_t)n * n);
    memcpy(a, A, sizeof(double) * (size_t)n * n);
    for (int i = 0; i < n; i++)        /* symmetrize float noise */
        for (int j = 0; j < i; j++) {
            double s = 0.5 * (a[i + (size_t)j * n] + a[j + (size_t)i * n]);
            a[i + (size_t)j * n] = a[j + (size_t)i * n] = s;
        }
    ck_assert_int_eq(LAPACKE_dsyev(LAPACK_COL_MAJOR, 'N', 'U', n, a, n, w), 0);
    free(a);
}

#endif
