/* testutil.h - shared helpers for curvd's Check tests: the runner every
 * test_*.c main() calls (tu_main), small random models and datasets built in
 * code, a curvature fixture with its independent oracles (finite differences,
 * dense blocks, the loss's Lambda_n), dense linear algebra checks.  The small
 * builders below are inline; the runner and the oracles are in testutil.c,
 * linked into every test binary. */
#ifndef CV_TESTUTIL_H
#define CV_TESTUTIL_H

#include <cJSON.h>
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
#include "engine/loss.h"
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
    cv_loss_layout lay;
    cv_loss_layout_of(m, &lay);
    if (cv_loss_is_class(m->loss)) { /* labels [n, positions] in [0, classes) */
        d->y_is_index = 1;
        d->y_shape = lay.label_shape;
        size_t S = (size_t)lay.positions;
        d->labels = malloc(sizeof(int64_t) * n * S);
        for (size_t i = 0; i < n * S; i++)
            d->labels[i] = (int64_t)cv_rng_below(&r, (uint64_t)lay.classes);
    } else {
        d->y_shape = lay.out_shape;
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
    double *q = malloc(sizeof(double) * k), first[CV_CURV_EXACT_COUNT];
    cv_rng r;
    cv_rng_seed(&r, seed);
    cv_rng_gaussian(&r, X, D * k);
    cv_err e;
    for (int kind = 0; kind < CV_CURV_EXACT_COUNT; kind++) {
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

/* ---- testutil.c ----------------------------------------------------------- */

/* Runs the suite make() returns with Check's defaults from the environment
 * (CK_FORK, CK_DEFAULT_TIMEOUT, CK_RUN_SUITE/CK_RUN_CASE, CK_VERBOSITY);
 * returns EXIT_SUCCESS when every test passed, else EXIT_FAILURE.  Every
 * test file's main() is `return tu_main(its_suite);`. */
int tu_main(Suite *(*make)(void));

/* A model, a dataset and the cv_curv on them, with the full block. */
typedef struct {
    cv_model m;
    cv_dataset d;
    cv_curv *c;
    cv_block full;
    int kinks; /* ReLU / max pooling: finite differences may cross a kink */
} tu_fixture;

/* tu_model + tu_data (n samples, seed + 100) + cv_curv_new with options co
 * (NULL: defaults); kinks = 0.  Aborts the test on errors. */
void tu_fx_make(tu_fixture *f, int in, const tu_layer *layers, int nl, cv_loss_type loss,
                cv_reduction red, size_t n, uint64_t seed, const cv_curv_options *co);
void tu_fx_free(tu_fixture *f);

/* Dense curvature `kind` on block b of f (b->dim x b->dim, column-major,
 * caller frees). */
double *tu_dense(tu_fixture *f, cv_curvature kind, const cv_block *b);

/* Independent oracles on f's full block; each returns the relative error
 * ||got - oracle|| / max(||oracle||, floor) for the caller to assert on.
 * Central differences of step eps throughout: the loss by cv_curv_loss_at,
 * gradients and outputs from a fresh cv_curv on a perturbed clone of the
 * model. */

/* cv_curv_gradient vs differences of the loss along every coordinate
 * (floor 1e-3). */
double tu_gradient_fd_relerr(tu_fixture *f, double eps);

/* H v (cv_curv_matvec, Hessian) vs differences of the gradient along v, a
 * random unit vector drawn with `seed` (floor 1e-3). */
double tu_hessian_fd_relerr(tu_fixture *f, uint64_t seed, double eps);

/* The dense GGN vs sum_n J_n^T Lambda_n J_n, J by differences of the network
 * outputs and Lambda_n = d^2 L_n / dh^2 in double from f's outputs, loss,
 * reduction and batch size (floor 1e-6). */
double tu_ggn_fd_relerr(tu_fixture *f, double eps);

/* cv_curv_per_sample_gradients on the full block sum to the gradient, and
 * the dense EF equals (1/c) sum_n g_n g_n^T (c the loss scale); both to 1e-5
 * relative.  tag starts the failure messages. */
void tu_check_per_sample_gradients(tu_fixture *f, const char *tag);

/* Every curvature of f on the full block is non-zero and symmetric to 1e-5
 * of its largest entry; all but the Hessian are PSD (smallest eigenvalue >=
 * -1e-5 of the largest).  tag starts the failure messages. */
void tu_check_symmetric_psd(tu_fixture *f, const char *tag);

/* The oracle checks every variant of a fixture family runs (test_curv's
 * MLPs, test_cnn's CNNs), one per loop iteration. */
typedef enum {
    TU_ORACLE_GRADIENT,      /* tu_gradient_fd_relerr < grad_tol */
    TU_ORACLE_HESSIAN,       /* tu_hessian_fd_relerr < tol */
    TU_ORACLE_GGN,           /* tu_ggn_fd_relerr < tol */
    TU_ORACLE_SYMMETRIC_PSD, /* tu_check_symmetric_psd */
    TU_ORACLE_PER_SAMPLE,    /* tu_check_per_sample_gradients */
    TU_NORACLES
} tu_oracle;

/* Finite-difference steps and bounds for tu_check_oracle. */
typedef struct {
    double grad_eps, grad_tol; /* the gradient's step and bound */
    double eps, tol;           /* H v's and the GGN's */
    uint64_t hess_seed;        /* H v's direction */
} tu_fd_bounds;

/* The adjoint identity <cot, J x> = <J^T cot, x> (cv_curv_jvp, cv_curv_vjp)
 * on block b for k random cotangents and directions drawn with seed, to
 * 1e-5 (|rhs| + 1).  tag starts the failure messages. */
void tu_check_adjoint(tu_fixture *f, const cv_block *b, int k, uint64_t seed, const char *tag);

/* cv_curv_gram on block b for k random cotangent sets (seed 9) vs the Gram
 * of the per-row gradients (one vjp per cotangent row), to 1e-4 (|want| +
 * 1e-3) plus rounding |g_a| |g_q| (float rounding of nearly orthogonal rows
 * cancels: 1e-6 on deep models, 0 for the strict bound). */
void tu_check_gram(tu_fixture *f, const cv_block *b, int k, double rounding, const char *tag);

/* Runs oracle `which` on f; messages start "variant N: ". */
void tu_check_oracle(tu_fixture *f, tu_oracle which, const tu_fd_bounds *b, int variant);

/* Models a and b are equal: layers, classes, attributes, shapes, tensors,
 * loss and reduction (name starts the attribute message). */
void tu_assert_same_model(const cv_model *a, const cv_model *b, const char *name);

/* Exports m as architecture JSON, parses the text into m2 and asserts that
 * m2 equals m and exports the same text; returns that text (caller frees). */
char *tu_arch_reparse(const cv_model *m, cv_model *m2, const char *name);

/* The number o[k]; fails the test when it is missing or not a number. */
double tu_num(const cJSON *o, const char *k);

#endif
