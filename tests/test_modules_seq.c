/* test_modules_seq.c - the module classes of issue 19 (Linear on rows,
 * LayerNorm, GroupNorm, Embedding, Mish, Hardswish): each class's kernels
 * against the kernel oracle (kernel_check.h), forward semantics against
 * naive double loops, and small Sequential models built from them with every
 * curvature product against the independent oracles of testutil.h (finite
 * differences of loss, gradient and outputs, dense J^T Lambda J, symmetry/
 * PSD, per-sample gradients, Gram, adjointness, quadratic forms). */
#include "testutil.h"

#include "engine/layer.h"
#include "engine/layer_embedding.h"
#include "engine/layer_norm.h"
#include "engine/layer_passthrough.h"
#include "engine/parallel.h"
#include "kernel_check.h"

void openblas_set_num_threads(int);

#define LN(L) CV_LAYER_ATTR(L, cv_layernorm_attr)
#define GN(L) CV_LAYER_ATTR(L, cv_groupnorm_attr)
#define EMB(L) CV_LAYER_ATTR(L, cv_embedding_attr)
#define LIN(L) CV_LAYER_ATTR(L, cv_linear_attr)

/* ---- building layers -------------------------------------------------------- */

static cv_layer simple(const cv_layer_class *cls)
{
    cv_layer L;
    cv_layer_init(&L, cls);
    return L;
}

static cv_layer linear(int in, int out, int bias)
{
    cv_layer L = simple(&cv_linear_class);
    LIN(&L)->in_features = in;
    LIN(&L)->out_features = out;
    LIN(&L)->has_bias = bias;
    return L;
}

/* LayerNorm over the last `rank` dims d0.. (eps 1e-5 unless given) */
static cv_layer layernorm(int rank, const int *dims, int affine, int bias)
{
    cv_layer L = simple(&cv_layernorm_class);
    LN(&L)->normalized_shape.rank = rank;
    for (int i = 0; i < rank; i++)
        LN(&L)->normalized_shape.dim[i] = dims[i];
    LN(&L)->elementwise_affine = affine;
    LN(&L)->has_bias = bias;
    return L;
}

static cv_layer groupnorm(int groups, int C, int affine)
{
    cv_layer L = simple(&cv_groupnorm_class);
    GN(&L)->num_groups = groups;
    GN(&L)->num_channels = C;
    GN(&L)->affine = affine;
    return L;
}

static cv_layer embedding(int V, int d, int padding_idx)
{
    cv_layer L = simple(&cv_embedding_class);
    EMB(&L)->num_embeddings = V;
    EMB(&L)->embedding_dim = d;
    EMB(&L)->padding_idx = padding_idx;
    return L;
}

/* ---- kernel oracle on each class -------------------------------------------------- */

START_TEST(linear_rows_pass_kernel_check)
{
    /* flat; rows (Gram: per-sample gradients); few rows of a wide layer (Gram:
     * the row-pair kernel) */
    cv_shape shapes[4] = {kc_shape(1, 5), kc_shape(2, 3, 5), kc_shape(3, 2, 3, 5),
                          kc_shape(2, 2, 16)};
    for (int s = 0; s < 4; s++)
        for (int bias = 0; bias < 2; bias++) {
            cv_layer L;
            int in = shapes[s].dim[shapes[s].rank - 1], out = in == 16 ? 16 : 4;
            ck_assert_int_eq(kc_layer(&L, "Linear", 1, &shapes[s]), 0);
            kc_set(&L, "in_features", in);
            kc_set(&L, "out_features", out);
            kc_set(&L, "bias", bias);
            KC_ASSERT(&L, NULL);
            ck_assert_int_eq(L.out_shape.rank, shapes[s].rank);
            ck_assert_int_eq(L.out_shape.dim[L.out_shape.rank - 1], out);
        }
}
END_TEST

START_TEST(layernorm_passes_kernel_check)
{
    struct {
        cv_shape in;
        int rank, dims[2], affine, bias;
    } cases[] = {
        {kc_shape(1, 6), 1, {6}, 1, 1},        {kc_shape(2, 3, 5), 1, {5}, 1, 1},
        {kc_shape(3, 2, 3, 4), 2, {3, 4}, 1, 1}, {kc_shape(2, 3, 5), 1, {5}, 0, 0},
        {kc_shape(2, 4, 3), 1, {3}, 1, 0},     {kc_shape(2, 3, 4), 2, {3, 4}, 0, 1},
    };
    for (size_t t = 0; t < sizeof cases / sizeof cases[0]; t++) {
        cv_layer L;
        ck_assert_int_eq(kc_layer(&L, "layer_norm", 1, &cases[t].in), 0);
        ck_assert_ptr_eq(L.cls, &cv_layernorm_class);
        LN(&L)->normalized_shape.rank = cases[t].rank;
        for (int i = 0; i < cases[t].rank; i++)
            LN(&L)->normalized_shape.dim[i] = cases[t].dims[i];
        LN(&L)->elementwise_affine = cases[t].affine;
        LN(&L)->has_bias = cases[t].bias;
        kc_opts o = kc_defaults();
        o.seed = 10 + t;
        KC_ASSERT(&L, &o);
        size_t P = (size_t)cases[t].dims[0] * (cases[t].rank > 1 ? cases[t].dims[1] : 1);
        ck_assert_int_eq(L.nparams, cases[t].affine ? 1 + cases[t].bias : 0);
        if (L.nparams)
            ck_assert_uint_eq(L.params[0].numel, P);
    }
}
END_TEST

START_TEST(groupnorm_passes_kernel_check)
{
    struct {
        cv_shape in;
        int groups, affine;
    } cases[] = {
        {kc_shape(3, 4, 3, 2), 2, 1}, {kc_shape(1, 6), 3, 1}, {kc_shape(2, 6, 3), 1, 1},
        {kc_shape(2, 4, 5), 4, 1},    {kc_shape(3, 4, 2, 2), 2, 0},
    };
    for (size_t t = 0; t < sizeof cases / sizeof cases[0]; t++) {
        cv_layer L;
        ck_assert_int_eq(kc_layer(&L, "group_norm", 1, &cases[t].in), 0);
        kc_set(&L, "num_groups", cases[t].groups);
        kc_set(&L, "num_channels", cases[t].in.dim[0]);
        kc_set(&L, "affine", cases[t].affine);
        kc_opts o = kc_defaults();
        o.seed = 20 + t;
        KC_ASSERT(&L, &o);
    }
}
END_TEST

/* ids of n samples of T tokens in [0, V), with repeats within and across
 * samples; id `pad` (if >= 0) at a few positions */
static float *token_ids(int n, int T, int V, int pad, uint64_t seed)
{
    float *x = malloc(sizeof(float) * (size_t)n * T);
    cv_rng r;
    cv_rng_seed(&r, seed);
    for (int i = 0; i < n * T; i++)
        x[i] = (float)cv_rng_below(&r, (uint64_t)(V < 4 ? V : 4)); /* few ids: repeats */
    x[1] = (float)(V - 1);
    if (pad >= 0)
        x[0] = x[n * T - 1] = (float)pad;
    return x;
}

START_TEST(embedding_passes_kernel_check)
{
    cv_shape shapes[2] = {kc_shape(1, 6), kc_shape(2, 2, 3)};
    for (int s = 0; s < 2; s++)
        for (int pad = -1; pad < 3; pad += 3) {
            cv_layer L;
            ck_assert_int_eq(kc_layer(&L, "embedding", 1, &shapes[s]), 0);
            kc_set(&L, "num_embeddings", 7);
            kc_set(&L, "embedding_dim", 3);
            if (pad >= 0)
                kc_set(&L, "padding_idx", pad);
            kc_opts o = kc_defaults();
            float *ids = token_ids(o.n, 6, 7, pad, 5 + (uint64_t)s);
            o.inputs[0] = ids;
            o.constant[0] = 1;
            /* forward reads the padding row, which has no gradient (PyTorch): J
             * leaves it out by definition, so differences of forward disagree;
             * embedding_padding_row_has_no_gradient checks it instead */
            o.kinks = pad >= 0;
            KC_ASSERT(&L, &o);
            ck_assert_int_eq(L.out_shape.rank, shapes[s].rank + 1);
            ck_assert_int_eq(L.out_shape.dim[shapes[s].rank], 3);
            free(ids);
        }
}
END_TEST

START_TEST(mish_hardswish_pass_kernel_check)
{
    cv_shape s = kc_shape(2, 3, 4);
    cv_layer L;
    ck_assert_int_eq(kc_layer(&L, "mish", 1, &s), 0);
    ck_assert_ptr_eq(L.cls, &cv_mish_class);
    KC_ASSERT(&L, NULL);
    /* Hardswish: inputs over all three pieces, away from the kinks at +-3 */
    kc_opts o = kc_defaults();
    float x[3 * 12];
    for (int i = 0; i < 36; i++)
        x[i] = -5.5f + 11.0f * (float)i / 35 + ((i % 5 == 2) ? 0.13f : 0.0f);
    for (int i = 0; i < 36; i++)
        if (fabsf(fabsf(x[i]) - 3) < 0.1f)
            x[i] += 0.25f;
    o.inputs[0] = x;
    ck_assert_int_eq(kc_layer(&L, "hardswish", 1, &s), 0);
    ck_assert_ptr_eq(L.cls, &cv_hardswish_class);
    KC_ASSERT(&L, &o);
}
END_TEST

/* ---- forward semantics ---------------------------------------------------------------- */

/* Runs L's forward on n samples x (after infer/layout through kc), theta
 * given; returns y (caller frees) and the error code of forward in *rc. */
static float *run_forward(cv_layer *L, const float *theta, const float *x, int n, int *rc,
                          cv_err *e)
{
    cv_layer_ctx c;
    memset(&c, 0, sizeof c);
    c.L = L;
    c.n = n;
    c.nin = 1;
    c.in_numel = c.in_numels[0] = cv_shape_numel(&L->in_shape);
    c.out_numel = cv_shape_numel(&L->out_shape);
    for (int p = 0; p < L->nparams; p++)
        c.nparam += L->params[p].numel;
    c.theta = theta;
    c.x = c.xs[0] = x;
    float *y = malloc(sizeof(float) * (size_t)n * c.out_numel);
    *rc = L->cls->ops->forward(&c, y, e);
    cv_layer_ctx_release(&c);
    return y;
}

/* infer + layout as cv_model_finalize does ([L, Flatten, Linear(out_numel, 1)]) */
static void finalize_one(cv_layer *L, const cv_shape *in, int out_numel)
{
    cv_model *m = calloc(1, sizeof *m);
    m->input_shape = *in;
    m->nlayers = 3;
    m->layers[0] = *L;
    m->layers[1] = simple(&cv_flatten_class);
    m->layers[2] = linear(out_numel, 1, 1);
    m->loss = CV_LOSS_MSE;
    cv_err e;
    ck_assert_msg(cv_model_finalize(m, &e) == 0, "%s", e.message);
    *L = m->layers[0];
    free(m);
}

START_TEST(norm_forward_matches_naive)
{
    /* GroupNorm(2, 4) on [4, 3] and LayerNorm([3]) on [4, 3] with random affine */
    cv_shape in = kc_shape(2, 4, 3);
    int three[1] = {3};
    cv_layer Ls[2] = {groupnorm(2, 4, 1), layernorm(1, three, 1, 1)};
    cv_rng r;
    cv_rng_seed(&r, 3);
    float x[2 * 12], theta[8];
    for (int i = 0; i < 24; i++)
        x[i] = (float)(3 * cv_rng_normal(&r) + 1);
    for (int i = 0; i < 8; i++)
        theta[i] = (float)cv_rng_normal(&r);
    for (int t = 0; t < 2; t++) {
        cv_layer L = Ls[t];
        finalize_one(&L, &in, 12);
        int rc;
        cv_err e;
        float *y = run_forward(&L, theta, x, 2, &rc, &e);
        ck_assert_int_eq(rc, 0);
        int gsize = 6, P = t == 0 ? 4 : 3, S = t == 0 ? 3 : 1; /* group size, affine */
        for (int g = 0; g < 4 * (t == 0 ? 1 : 2); g++) {
            if (t == 1)
                gsize = 3;
            double mu = 0, var = 0;
            for (int i = 0; i < gsize; i++)
                mu += x[g * gsize + i];
            mu /= gsize;
            for (int i = 0; i < gsize; i++)
                var += (x[g * gsize + i] - mu) * (x[g * gsize + i] - mu);
            var /= gsize; /* biased, as PyTorch */
            for (int i = 0; i < gsize; i++) {
                int e0 = (g * gsize + i) % 12, p = (e0 / S) % P;
                double want = (x[g * gsize + i] - mu) / sqrt(var + 1e-5) * theta[p] + theta[P + p];
                ck_assert_msg(fabs(y[g * gsize + i] - want) < 1e-5 * (1 + fabs(want)),
                              "%s group %d entry %d: %g vs %g", cv_layer_name(&L), g, i,
                              y[g * gsize + i], want);
            }
        }
        free(y);
    }
}
END_TEST

START_TEST(activation_values_match_closed_forms)
{
    cv_shape in = kc_shape(1, 9);
    float x[9] = {-4, -3, -1.5f, -0.25f, 0, 0.5f, 2, 3, 7.5f};
    const cv_layer_class *cls[2] = {&cv_mish_class, &cv_hardswish_class};
    for (int t = 0; t < 2; t++) {
        cv_layer L = simple(cls[t]);
        finalize_one(&L, &in, 9);
        cv_layer_ctx c;
        memset(&c, 0, sizeof c);
        c.L = &L;
        c.n = 1;
        c.in_numel = c.out_numel = 9;
        c.x = x;
        float y[9];
        cv_err e;
        ck_assert_int_eq(L.cls->ops->forward(&c, y, &e), 0);
        for (int i = 0; i < 9; i++) {
            double v = x[i], f, d1;
            if (t == 0) {
                f = v * tanh(log1p(exp(v)));
                double h = 1e-4; /* derivative by central differences in double */
                d1 = ((v + h) * tanh(log1p(exp(v + h))) - (v - h) * tanh(log1p(exp(v - h)))) /
                     (2 * h);
            } else { /* PyTorch: x relu6(x + 3) / 6, slope x/3 + 1/2 on [-3, 3] */
                double r6 = v + 3 < 0 ? 0 : v + 3 > 6 ? 6 : v + 3;
                f = v * r6 / 6;
                d1 = v < -3 ? 0 : v <= 3 ? v / 3 + 0.5 : 1;
            }
            ck_assert_msg(fabs(y[i] - f) < 1e-6 * (1 + fabs(f)), "%s(%g) = %g, want %g",
                          cv_layer_name(&L), v, y[i], f);
            ck_assert_msg(fabs(c.d1[i] - d1) < 1e-5 * (1 + fabs(d1)), "%s'(%g) = %g, want %g",
                          cv_layer_name(&L), v, c.d1[i], d1);
        }
        if (t == 1) { /* the second derivative is 1/3 on [-3, 3], 0 outside */
            ck_assert_float_eq_tol(c.d2[1], 1.0f / 3, 1e-7f);
            ck_assert_float_eq_tol(c.d2[7], 1.0f / 3, 1e-7f);
            ck_assert_float_eq(c.d2[0], 0.0f);
            ck_assert_float_eq(c.d2[8], 0.0f);
        }
        cv_layer_ctx_release(&c);
    }
}
END_TEST

START_TEST(embedding_forward_and_bad_ids)
{
    cv_shape in = kc_shape(1, 3);
    cv_layer L = embedding(5, 2, 4);
    finalize_one(&L, &in, 6);
    float theta[10], x[6] = {0, 4, 2, 3, 3, 1};
    for (int i = 0; i < 10; i++)
        theta[i] = (float)(i + 1);
    int rc;
    cv_err e;
    float *y = run_forward(&L, theta, x, 2, &rc, &e);
    ck_assert_int_eq(rc, 0);
    for (int t = 0; t < 6; t++) /* the padding row is read as any other */
        for (int j = 0; j < 2; j++)
            ck_assert_float_eq(y[t * 2 + j], theta[(int)x[t] * 2 + j]);
    free(y);
    float bad[3][6] = {{0, 1, 2, 3, 5, 1}, {0, 1, 2, -1, 3, 1}, {0, 1.5f, 2, 3, 3, 1}};
    const char *want[3] = {"token id 5 at sample 1, position 1",
                           "token id -1 at sample 1, position 0",
                           "token id 1.5 at sample 0, position 1"};
    for (int t = 0; t < 3; t++) {
        y = run_forward(&L, theta, bad[t], 2, &rc, &e);
        ck_assert_int_eq(rc, -1);
        ck_assert_str_eq(e.code, "invalid_data");
        ck_assert_msg(strstr(e.message, want[t]) != NULL, "'%s' lacks '%s'", e.message,
                      want[t]);
        free(y);
    }
    /* negative padding_idx counts from the end, as PyTorch stores it; out of range refused */
    cv_layer P = embedding(5, 2, -2);
    ck_assert_int_eq(P.cls->check(&P, &e), 0);
    ck_assert_int_eq(EMB(&P)->padding_idx, 3);
    P = embedding(5, 2, 5);
    ck_assert_int_eq(P.cls->check(&P, &e), -1);
    ck_assert_str_eq(e.field, "padding_idx");
}
END_TEST

/* PyTorch's padding_idx: the row's gradient is zero, J leaves it out (a
 * tangent on it changes nothing), every other row as without padding. */
START_TEST(embedding_padding_row_has_no_gradient)
{
    cv_shape in = kc_shape(1, 3);
    cv_layer P = embedding(5, 2, 1), N = embedding(5, 2, CV_EMBEDDING_NO_PADDING);
    finalize_one(&P, &in, 6);
    finalize_one(&N, &in, 6);
    float theta[10], x[6] = {1, 0, 1, 3, 1, 0}, gy[12], gp[10], gn[10], v[10], ry[12];
    for (int i = 0; i < 10; i++)
        theta[i] = (float)(i - 3);
    for (int i = 0; i < 12; i++)
        gy[i] = (float)(i % 5) - 1.5f;
    cv_layer *Ls[2] = {&P, &N};
    float *g[2] = {gp, gn};
    for (int t = 0; t < 2; t++) {
        cv_layer_ctx c;
        memset(&c, 0, sizeof c);
        c.L = Ls[t];
        c.n = 2;
        c.in_numel = 3;
        c.out_numel = 6;
        c.nparam = 10;
        c.theta = theta;
        c.x = x;
        float y[12], gx[6] = {7, 7, 7, 7, 7, 7};
        cv_err e;
        ck_assert_int_eq(Ls[t]->cls->ops->forward(&c, y, &e), 0);
        Ls[t]->cls->ops->vjp(&c, 1, gy, gx, g[t]);
        for (int i = 0; i < 6; i++) /* integer input: no cotangent */
            ck_assert_float_eq(gx[i], 0.0f);
        if (t == 0) {
            for (int i = 0; i < 10; i++)
                v[i] = i / 2 == 1 ? 1.0f : 0.0f; /* only the padding row */
            Ls[t]->cls->ops->jvp(&c, 1, NULL, v, ry);
            for (int i = 0; i < 12; i++)
                ck_assert_float_eq(ry[i], 0.0f);
        }
    }
    for (int i = 0; i < 10; i++)
        ck_assert_float_eq(gp[i], i / 2 == 1 ? 0.0f : gn[i]);
    ck_assert_float_ne(gn[2], 0.0f); /* the row is used */
}
END_TEST

/* The normalization kernels run on cv_parallel_for ranges of groups: with 4
 * threads every output is bit-identical to one thread's. */
static void norm_kernels(cv_layer *L, int n, const float *theta, const float *x,
                         const float *gy, const float *rx, const float *v, float *out)
{
    size_t len = (size_t)n * cv_shape_numel(&L->in_shape), P = 0;
    for (int p = 0; p < L->nparams; p++)
        P += L->params[p].numel;
    cv_layer_ctx c;
    memset(&c, 0, sizeof c);
    c.L = L;
    c.n = n;
    c.in_numel = c.out_numel = len / n;
    c.nparam = P;
    c.theta = theta;
    c.x = x;
    cv_err e;
    ck_assert_int_eq(L->cls->ops->forward(&c, out, &e), 0);
    L->cls->ops->vjp(&c, 1, gy, out + len, out + 4 * len);
    L->cls->ops->jvp(&c, 1, rx, v, out + 2 * len);
    memset(out + 3 * len, 0, sizeof(float) * len);
    L->cls->ops->hvp_extra(&c, 1, gy, rx, v, out + 3 * len, out + 4 * len + P);
    cv_layer_ctx_release(&c);
}

START_TEST(norm_threads_bit_identical)
{
    int n = 8, d = 256, last[1] = {256}; /* 8 x [64, 256]: several parallel ranges */
    cv_shape in = kc_shape(2, 64, d);
    cv_layer Ls[2] = {layernorm(1, last, 1, 1), groupnorm(4, 64, 1)};
    size_t len = (size_t)n * 64 * d;
    float *x = malloc(sizeof(float) * len * 3), *theta = malloc(sizeof(float) * 2 * d);
    float *out1 = malloc(sizeof(float) * (5 * len)), *out4 = malloc(sizeof(float) * (5 * len));
    cv_rng r;
    cv_rng_seed(&r, 12);
    for (size_t i = 0; i < 3 * len; i++)
        x[i] = (float)cv_rng_normal(&r);
    for (int i = 0; i < 2 * d; i++)
        theta[i] = (float)cv_rng_normal(&r);
    for (int t = 0; t < 2; t++) {
        cv_layer L = Ls[t];
        finalize_one(&L, &in, (int)(len / n));
        openblas_set_num_threads(1);
        memset(out1, 0, sizeof(float) * 5 * len);
        norm_kernels(&L, n, theta, x, x + len, x + 2 * len, theta, out1);
        openblas_set_num_threads(4);
        ck_assert_int_ge(cv_parallel_threads((size_t)n * 64, 1), 2);
        memset(out4, 0, sizeof(float) * 5 * len);
        norm_kernels(&L, n, theta, x, x + len, x + 2 * len, theta, out4);
        ck_assert_msg(memcmp(out1, out4, sizeof(float) * 5 * len) == 0, "%s differs",
                      cv_layer_name(&L));
    }
    openblas_set_num_threads(1);
    free(x); free(theta); free(out1); free(out4);
}
END_TEST

/* ---- Sequential models ---------------------------------------------------------------- */

typedef tu_fixture fixture;

#define MAXL 10
#define NVARIANTS 10

typedef struct {
    cv_shape in;
    int nl;
    cv_layer L[MAXL];
    cv_loss_type loss;
    cv_reduction red;
    int vocab, pad; /* Embedding first: token ids in [0, vocab); pad >= 0 appears */
} variant;

static void push(variant *v, cv_layer L) { v->L[v->nl++] = L; }

/* Flatten + Linear(numel, 3) head */
static void head(variant *v, int numel)
{
    push(v, simple(&cv_flatten_class));
    push(v, linear(numel, 3, 1));
}

static variant make_layers(int i)
{
    variant v;
    memset(&v, 0, sizeof v);
    v.loss = CV_LOSS_CE;
    v.red = CV_RED_MEAN;
    v.pad = -1;
    int four[1] = {4}, six[1] = {6}, d45[2] = {4, 5};
    switch (i) {
    case 0: /* Linear on rows, LayerNorm over the last dim, Linear on rows */
        v.in = kc_shape(2, 4, 5);
        push(&v, linear(5, 6, 1)), push(&v, simple(&cv_tanh_class));
        push(&v, layernorm(1, six, 1, 1)), push(&v, linear(6, 3, 1));
        head(&v, 12);
        break;
    case 1: /* LayerNorm over two dims, Mish */
        v.in = kc_shape(2, 4, 5);
        push(&v, linear(5, 5, 1)), push(&v, layernorm(2, d45, 1, 1));
        push(&v, simple(&cv_mish_class)), push(&v, linear(5, 2, 0));
        head(&v, 8);
        v.loss = CV_LOSS_MSE, v.red = CV_RED_SUM;
        break;
    case 2: /* rank-3 rows, LayerNorm without affine, Hardswish */
        v.in = kc_shape(3, 2, 3, 5);
        push(&v, linear(5, 4, 0)), push(&v, layernorm(1, four, 0, 0));
        push(&v, simple(&cv_hardswish_class));
        head(&v, 24);
        v.loss = CV_LOSS_BCE;
        break;
    case 3: /* LayerNorm with weight only */
        v.in = kc_shape(2, 3, 4);
        push(&v, linear(4, 4, 1)), push(&v, layernorm(1, four, 1, 0));
        push(&v, simple(&cv_tanh_class));
        head(&v, 12);
        break;
    case 4: /* GroupNorm on [C, H, W] after a Linear over W */
        v.in = kc_shape(3, 4, 3, 3);
        push(&v, linear(3, 3, 1)), push(&v, groupnorm(2, 4, 1));
        push(&v, simple(&cv_tanh_class));
        head(&v, 36);
        break;
    case 5: /* GroupNorm, one channel per group, no affine; MSE mean */
        v.in = kc_shape(2, 4, 6);
        push(&v, linear(6, 6, 1)), push(&v, groupnorm(4, 4, 0));
        push(&v, simple(&cv_mish_class));
        head(&v, 24);
        v.loss = CV_LOSS_MSE;
        break;
    case 6: /* GroupNorm on a flat [C] */
        v.in = kc_shape(1, 6);
        push(&v, linear(6, 6, 1)), push(&v, groupnorm(3, 6, 1));
        push(&v, simple(&cv_tanh_class)), push(&v, linear(6, 3, 1));
        break;
    case 7: /* token model: Embedding, LayerNorm, Linear on rows */
        v.in = kc_shape(1, 5);
        v.vocab = 7;
        push(&v, embedding(7, 4, CV_EMBEDDING_NO_PADDING)), push(&v, layernorm(1, four, 1, 1));
        push(&v, linear(4, 4, 1)), push(&v, simple(&cv_tanh_class));
        head(&v, 20);
        break;
    case 9: /* few rows of a wide Linear: the row-pair Gram kernel (budget 1: chunks) */
        v.in = kc_shape(2, 2, 16);
        push(&v, linear(16, 16, 1)), push(&v, simple(&cv_tanh_class));
        push(&v, linear(16, 16, 0));
        head(&v, 32);
        break;
    default: /* 8: Embedding with padding_idx, MSE sum */
        v.in = kc_shape(2, 2, 3);
        v.vocab = 6, v.pad = 2;
        push(&v, embedding(6, 3, 2)), push(&v, simple(&cv_mish_class));
        head(&v, 18);
        v.loss = CV_LOSS_MSE, v.red = CV_RED_SUM;
        break;
    }
    return v;
}

static void init_params(cv_model *m, cv_rng *r)
{
    for (int l = 0; l < m->nlayers; l++) {
        const cv_layer *L = &m->layers[l];
        for (int p = 0; p < L->nparams; p++) {
            const cv_tensor_info *t = &L->params[p];
            float *w = m->params + t->offset;
            for (size_t q = 0; q < t->numel; q++) {
                double u = 2 * cv_rng_uniform(r) - 1;
                if (L->cls == &cv_linear_class && p == 0)
                    u *= 1.5 / sqrt((double)LIN(L)->in_features);
                else if (L->cls == &cv_embedding_class)
                    u = cv_rng_normal(r);
                else if (p == 0) /* norm weights */
                    u = 1 + 0.5 * u;
                else
                    u *= 0.5;
                w[q] = (float)u;
            }
        }
    }
}

static void make_variant(fixture *f, int i)
{
    variant v = make_layers(i);
    memset(f, 0, sizeof *f);
    f->m.input_shape = v.in;
    f->m.loss = v.loss;
    f->m.reduction = v.red;
    f->m.nlayers = v.nl;
    for (int l = 0; l < v.nl; l++)
        f->m.layers[l] = v.L[l];
    cv_err e;
    ck_assert_msg(cv_model_finalize(&f->m, &e) == 0, "variant %d: %s", i, e.message);
    ck_assert_int_eq(cv_model_alloc(&f->m), 0);
    cv_rng r;
    cv_rng_seed(&r, 500 + (uint64_t)i);
    init_params(&f->m, &r);
    tu_data(&f->d, &f->m, 3, 600 + (uint64_t)i);
    if (v.vocab) {
        size_t T = cv_shape_numel(&v.in);
        float *ids = token_ids(3, (int)T, v.vocab, v.pad, 700 + (uint64_t)i);
        memcpy(f->d.x, ids, sizeof(float) * 3 * T);
        free(ids);
    }
    f->c = cv_curv_new(&f->m, &f->d, NULL, &e);
    ck_assert_msg(f->c != NULL, "variant %d: cv_curv_new: %s", i, e.message);
    cv_block_full(&f->m, &f->full);
}

/* _i = variant * TU_NORACLES + oracle */
START_TEST(variant_matches_oracles)
{
    int v = _i / TU_NORACLES;
    tu_oracle which = (tu_oracle)(_i % TU_NORACLES);
    /* the padding row is read but has no gradient (PyTorch): differences of
     * the loss disagree by definition; padding_is_projected_no_padding checks
     * that variant against the same model without padding */
    if (make_layers(v).pad >= 0 && which != TU_ORACLE_SYMMETRIC_PSD &&
        which != TU_ORACLE_PER_SAMPLE)
        return;
    fixture f;
    make_variant(&f, v);
    tu_fd_bounds fd = {3e-3, 3e-3, 3e-3, 3e-3, 3 + (uint64_t)v};
    tu_check_oracle(&f, which, &fd, v);
    tu_fx_free(&f);
}
END_TEST

/* Blocks: full, each parameter tensor of the first layer, the last tensor. */
static int test_blocks(const fixture *f, cv_block *b)
{
    int T = cv_model_param_count(&f->m), n = 0, idx;
    cv_err e;
    b[n++] = f->full;
    for (int t = 0; t < f->m.layers[0].nparams; t++) {
        idx = t;
        ck_assert_int_eq(cv_block_from_indices(&f->m, &idx, 1, &b[n++], &e), 0);
    }
    for (int t = f->m.layers[0].nparams; t < T; t++) /* the first normalization's tensors */
        if (f->m.layers[cv_model_param_layer(&f->m, t)].cls == &cv_layernorm_class ||
            f->m.layers[cv_model_param_layer(&f->m, t)].cls == &cv_groupnorm_class) {
            idx = t;
            ck_assert_int_eq(cv_block_from_indices(&f->m, &idx, 1, &b[n++], &e), 0);
        }
    idx = T - 1;
    ck_assert_int_eq(cv_block_from_indices(&f->m, &idx, 1, &b[n++], &e), 0);
    return n;
}

START_TEST(gram_adjoint_quadforms)
{
    fixture f;
    make_variant(&f, _i);
    int k = 2;
    cv_block blocks[8];
    int nb = test_blocks(&f, blocks);
    char tag[64];
    for (int bi = 0; bi < nb; bi++) {
        const cv_block *b = &blocks[bi];
        snprintf(tag, sizeof tag, "variant %d block %d", _i, bi);
        tu_check_adjoint(&f, b, k, 19, tag);
        tu_check_gram(&f, b, k, 1e-6, tag);
        tu_check_quadforms(f.c, b, bi == 0 ? 36 : 3, 9 + (uint64_t)bi, tag);
    }
    /* Linear's row Gram in chunks of one output row, then a few */
    cv_curv_set_gram_budget(f.c, 1);
    tu_check_gram(&f, &f.full, 3, 1e-6, "budget 1");
    cv_curv_set_gram_budget(f.c, 40);
    tu_check_gram(&f, &f.full, 2, 1e-6, "budget 40");
    tu_fx_free(&f);
}
END_TEST

/* The Hessian differs from the GGN on these models: the second-order terms
 * of the normalizations (and activations) reach the products. */
START_TEST(hessian_differs_from_ggn)
{
    fixture f;
    make_variant(&f, _i);
    size_t D = f.full.dim;
    double *x = malloc(sizeof(double) * D), *h = malloc(sizeof(double) * D),
           *g = malloc(sizeof(double) * D);
    cv_rng r;
    cv_rng_seed(&r, 4);
    cv_rng_gaussian(&r, x, D);
    cv_err e;
    ck_assert_int_eq(cv_curv_matvec(f.c, CV_CURV_HESSIAN, &f.full, 1, x, h, &e), 0);
    ck_assert_int_eq(cv_curv_matvec(f.c, CV_CURV_GGN, &f.full, 1, x, g, &e), 0);
    ck_assert_msg(tu_relerr(h, g, D, 1e-9) > 1e-3, "variant %d: H v == G v", _i);
    free(x); free(h); free(g);
    tu_fx_free(&f);
}
END_TEST

/* With padding_idx p, every product equals the model's without padding
 * (which the finite-difference oracles check) with the padding row projected
 * out: g = P g0, A v = P A0 P v for every curvature (MC Fisher: same seed). */
START_TEST(padding_is_projected_no_padding)
{
    fixture f, f0;
    make_variant(&f, 8);
    make_variant(&f0, 8); /* same parameters and data ... */
    cv_curv_free(f0.c);
    EMB(&f0.m.layers[0])->padding_idx = CV_EMBEDDING_NO_PADDING; /* ... no padding */
    cv_err e;
    f0.c = cv_curv_new(&f0.m, &f0.d, NULL, &e);
    ck_assert_ptr_nonnull(f0.c);
    size_t D = f.full.dim, d = 3, pad = 2;
    double *x = malloc(sizeof(double) * D), *y = malloc(sizeof(double) * D),
           *y0 = malloc(sizeof(double) * D);
    cv_rng r;
    cv_rng_seed(&r, 8);
    cv_rng_gaussian(&r, x, D);
    for (int kind = -1; kind < CV_CURV_EXACT_COUNT; kind++) {
        if (kind < 0) {
            ck_assert_int_eq(cv_curv_gradient(f.c, &f.full, y, &e), 0);
            ck_assert_int_eq(cv_curv_gradient(f0.c, &f0.full, y0, &e), 0);
        } else {
            ck_assert_int_eq(cv_curv_matvec(f.c, (cv_curvature)kind, &f.full, 1, x, y, &e), 0);
            for (size_t i = 0; i < d; i++)
                x[pad * d + i] = 0;
            ck_assert_int_eq(cv_curv_matvec(f0.c, (cv_curvature)kind, &f0.full, 1, x, y0, &e),
                             0);
        }
        double zero = 0;
        for (size_t i = 0; i < d; i++) {
            zero += fabs(y[pad * d + i]);
            y0[pad * d + i] = 0;
        }
        ck_assert_msg(zero == 0, "kind %d: padding row %g", kind, zero);
        ck_assert_msg(tu_relerr(y, y0, D, 1e-9) < 1e-5, "kind %d: %g", kind,
                      tu_relerr(y, y0, D, 1e-9));
        cv_rng_seed(&r, 8);
        cv_rng_gaussian(&r, x, D);
    }
    free(x); free(y); free(y0);
    tu_fx_free(&f);
    tu_fx_free(&f0);
}
END_TEST

/* A token id outside the vocabulary in the dataset: cv_curv_new refuses it. */
START_TEST(bad_token_id_refused)
{
    variant v = make_layers(7);
    cv_model *m = calloc(1, sizeof *m);
    m->input_shape = v.in;
    m->loss = v.loss;
    m->nlayers = v.nl;
    for (int l = 0; l < v.nl; l++)
        m->layers[l] = v.L[l];
    cv_err e;
    ck_assert_int_eq(cv_model_finalize(m, &e), 0);
    ck_assert_int_eq(cv_model_alloc(m), 0);
    cv_dataset d;
    tu_data(&d, m, 2, 1);
    for (int i = 0; i < 10; i++)
        d.x[i] = (float)(i % 7);
    d.x[7] = 7;
    ck_assert_ptr_null(cv_curv_new(m, &d, NULL, &e));
    ck_assert_str_eq(e.code, "invalid_data");
    ck_assert_msg(strstr(e.message, "token id 7 at sample 1, position 2") != NULL, "%s",
                  e.message);
    tu_data_free(&d);
    cv_model_free(m);
    free(m);
}
END_TEST

static Suite *modules_suite(void)
{
    Suite *s = suite_create("modules_seq");
    TCase *tc = tcase_create("kernels");
    tcase_add_test(tc, linear_rows_pass_kernel_check);
    tcase_add_test(tc, layernorm_passes_kernel_check);
    tcase_add_test(tc, groupnorm_passes_kernel_check);
    tcase_add_test(tc, embedding_passes_kernel_check);
    tcase_add_test(tc, mish_hardswish_pass_kernel_check);
    tcase_add_test(tc, norm_forward_matches_naive);
    tcase_add_test(tc, activation_values_match_closed_forms);
    tcase_add_test(tc, embedding_forward_and_bad_ids);
    tcase_add_test(tc, embedding_padding_row_has_no_gradient);
    tcase_add_test(tc, norm_threads_bit_identical);
    suite_add_tcase(s, tc);
    tc = tcase_create("sequential");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, variant_matches_oracles, 0, NVARIANTS * TU_NORACLES);
    tcase_add_loop_test(tc, gram_adjoint_quadforms, 0, NVARIANTS);
    tcase_add_loop_test(tc, hessian_differs_from_ggn, 0, NVARIANTS);
    tcase_add_test(tc, bad_token_id_refused);
    tcase_add_test(tc, padding_is_projected_no_padding);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_main(modules_suite); }
