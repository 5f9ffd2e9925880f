/* test_cnn.c - Conv2d, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, BatchNorm1d/2d
 * (eval) and Dropout: forward semantics against naive PyTorch-rule loops, and
 * for small CNNs built in code every curvature product against independent
 * oracles (finite differences of loss, gradient and outputs, dense
 * J^T Lambda J, symmetry/PSD, per-sample gradients, Gram, adjointness). */
#include "testutil.h"

#include "engine/conv_direct.h"
#include "engine/im2col.h"
#include "engine/layer.h"
#include "engine/layer_batchnorm.h"
#include "engine/layer_conv.h"
#include "engine/layer_passthrough.h"
#include "engine/layer_pool.h"
#include "engine/loss.h"

/* a layer's attributes by its class */
#define CONV(L) CV_LAYER_ATTR(L, cv_conv2d_attr)
#define POOL(L) CV_LAYER_ATTR(L, cv_pool2d_attr)
#define BN(L) CV_LAYER_ATTR(L, cv_batchnorm_attr)
#define LIN(L) CV_LAYER_ATTR(L, cv_linear_attr)

/* ---- building models in code ------------------------------------------------ */

static cv_layer conv(int cin, int cout, int kh, int kw, int s0, int s1, int p0, int p1, int d0,
                     int d1, int groups, int bias)
{
    cv_layer L;
    cv_layer_init(&L, &cv_conv2d_class);
    cv_conv2d_attr *a = CONV(&L);
    a->in_channels = cin;
    a->out_channels = cout;
    a->kernel[0] = kh, a->kernel[1] = kw;
    a->stride[0] = s0, a->stride[1] = s1;
    a->padding[0] = p0, a->padding[1] = p1;
    a->dilation[0] = d0, a->dilation[1] = d1;
    a->groups = groups;
    a->has_bias = bias;
    return L;
}

static cv_layer conv3(int cin, int cout) { return conv(cin, cout, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1); }

static cv_layer pool(const cv_layer_class *cls, int k, int s, int p, int d, int ceil_mode,
                     int cip)
{
    cv_layer L;
    cv_layer_init(&L, cls);
    cv_pool2d_attr *a = POOL(&L);
    a->kernel[0] = a->kernel[1] = k;
    a->stride[0] = a->stride[1] = s;
    a->padding[0] = a->padding[1] = p;
    a->dilation[0] = a->dilation[1] = d;
    a->ceil_mode = ceil_mode;
    a->count_include_pad = cip;
    return L;
}

static cv_layer adaptive(int oh, int ow)
{
    cv_layer L;
    cv_layer_init(&L, &cv_adaptiveavgpool2d_class);
    POOL(&L)->output_size[0] = oh;
    POOL(&L)->output_size[1] = ow;
    return L;
}

static cv_layer bnorm(const cv_layer_class *cls, int C, int affine)
{
    cv_layer L;
    cv_layer_init(&L, cls); /* eps 1e-5, track_running_stats */
    BN(&L)->num_features = C;
    BN(&L)->affine = affine;
    return L;
}

static cv_layer simple(const cv_layer_class *cls)
{
    cv_layer L;
    cv_layer_init(&L, cls); /* Flatten: start_dim 1, end_dim -1; Dropout: p 0.5 */
    return L;
}

/* Linear with in_features inferred from the previous layer (0 here). */
static cv_layer linear(int out)
{
    cv_layer L = simple(&cv_linear_class);
    LIN(&L)->out_features = out;
    LIN(&L)->has_bias = 1;
    return L;
}

static float urand(cv_rng *r, float lo, float hi)
{
    return lo + (hi - lo) * (float)cv_rng_uniform(r);
}

static void init_layer(cv_model *m, const cv_layer *L, cv_rng *r)
{
    float *p = L->nparams ? m->params + L->params[0].offset : NULL;
    if (L->cls == &cv_conv2d_class || L->cls == &cv_linear_class) {
        int fan = L->cls == &cv_linear_class
                      ? LIN(L)->in_features
                      : CONV(L)->in_channels / CONV(L)->groups * CONV(L)->kernel[0] *
                            CONV(L)->kernel[1];
        float s = 1.5f / sqrtf((float)fan);
        for (size_t q = 0; q < L->params[0].numel; q++)
            p[q] = urand(r, -s, s);
        if (L->nparams > 1) /* bias */
            for (size_t q = 0; q < L->params[1].numel; q++)
                m->params[L->params[1].offset + q] = urand(r, -0.5f, 0.5f);
    }
    if (L->cls == &cv_batchnorm1d_class || L->cls == &cv_batchnorm2d_class) {
        int C = BN(L)->num_features;
        float *b = m->buffers + L->buffers[0].offset;
        for (int c = 0; c < C; c++) {
            b[c] = urand(r, -0.5f, 0.5f);         /* running_mean */
            b[C + c] = urand(r, 0.3f, 2.0f);      /* running_var */
            if (BN(L)->affine) {
                p[c] = urand(r, 0.5f, 1.5f);      /* gamma */
                p[C + c] = urand(r, -0.5f, 0.5f); /* beta */
            }
        }
        b[2 * C] = 10;                            /* num_batches_tracked */
    }
}

/* Builds, finalizes and randomly initializes a model on input [C, H, W]
 * ([C, H] if W is 0). */
static void cnn_model(cv_model *m, int C, int H, int W, const cv_layer *layers, int nl,
                      cv_loss_type loss, cv_reduction red, uint64_t seed)
{
    memset(m, 0, sizeof *m);
    m->input_shape.rank = W ? 3 : 2;
    m->input_shape.dim[0] = C;
    m->input_shape.dim[1] = H;
    m->input_shape.dim[2] = W;
    m->loss = loss;
    m->reduction = red;
    cv_err fe;
    for (int i = 0; i < nl; i++) {
        m->layers[i] = layers[i];
        if (layers[i].cls == &cv_linear_class && LIN(&layers[i])->in_features == 0) {
            m->nlayers = i; /* shapes of the prefix; it may have no parameters yet */
            if (i && cv_model_finalize(m, &fe) && !strstr(fe.message, "no parameters"))
                ck_abort_msg("finalize prefix: %s", fe.message);
            LIN(&m->layers[i])->in_features =
                i ? (int)cv_shape_numel(&m->layers[i - 1].out_shape) : C * H * (W ? W : 1);
        }
    }
    m->nlayers = nl;
    if (cv_model_finalize(m, &fe))
        ck_abort_msg("finalize: %s", fe.message);
    ck_assert_int_eq(cv_model_alloc(m), 0);
    cv_rng r;
    cv_rng_seed(&r, seed);
    for (int i = 0; i < nl; i++)
        init_layer(m, &m->layers[i], &r);
}

/* ---- the variants ------------------------------------------------------------ */

typedef tu_fixture fixture;

#define MAXL 16
#define NVARIANTS 19

/* Variant i: a parametrized layer before the layer under test, so that its
 * second-order terms in x and theta both reach the products. */
static int variant_layers(int i, cv_layer *Ls, int *C, int *H, int *W, cv_loss_type *loss,
                          cv_reduction *red, int *kinks)
{
    int n = 0;
    *C = 2, *H = 6, *W = 6;
    *loss = CV_LOSS_CE;
    *red = CV_RED_MEAN;
    *kinks = 0;
    switch (i) {
    case 0: /* plain 3x3 conv */
        Ls[n++] = conv3(2, 3), Ls[n++] = simple(&cv_tanh_class), Ls[n++] = conv3(3, 3);
        break;
    case 1: /* stride 2, padding 1 */
        Ls[n++] = conv3(2, 3), Ls[n++] = simple(&cv_tanh_class);
        Ls[n++] = conv(3, 4, 3, 3, 2, 2, 1, 1, 1, 1, 1, 1);
        *loss = CV_LOSS_MSE, *red = CV_RED_SUM;
        break;
    case 2: /* rectangular kernel, per-axis stride/padding/dilation */
        Ls[n++] = conv3(2, 3), Ls[n++] = simple(&cv_tanh_class);
        Ls[n++] = conv(3, 2, 2, 3, 1, 2, 1, 0, 2, 1, 1, 1);
        *W = 7;
        break;
    case 3: /* groups, no bias */
        Ls[n++] = conv3(2, 4), Ls[n++] = simple(&cv_tanh_class);
        Ls[n++] = conv(4, 4, 3, 3, 1, 1, 1, 1, 1, 1, 2, 0);
        *loss = CV_LOSS_BCE;
        break;
    case 4: /* depthwise, dilation 2, padding 2 */
        Ls[n++] = conv(2, 4, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1), Ls[n++] = simple(&cv_tanh_class);
        Ls[n++] = conv(4, 4, 3, 3, 1, 1, 2, 2, 2, 2, 4, 1);
        *red = CV_RED_SUM;
        break;
    case 5: /* MaxPool2d(2) */
        Ls[n++] = conv3(2, 3), Ls[n++] = simple(&cv_tanh_class);
        Ls[n++] = pool(&cv_maxpool2d_class, 2, 2, 0, 1, 0, 0), Ls[n++] = conv3(3, 3);
        *kinks = 1;
        break;
    case 6: /* MaxPool2d(3, 2, padding 1, ceil_mode) */
        Ls[n++] = conv3(2, 3), Ls[n++] = simple(&cv_tanh_class);
        Ls[n++] = pool(&cv_maxpool2d_class, 3, 2, 1, 1, 1, 0), Ls[n++] = conv3(3, 2);
        *kinks = 1;
        break;
    case 7: /* MaxPool2d(2, stride 1, dilation 2) */
        Ls[n++] = conv3(2, 3), Ls[n++] = simple(&cv_tanh_class);
        Ls[n++] = pool(&cv_maxpool2d_class, 2, 1, 0, 2, 0, 0);
        *kinks = 1;
        *loss = CV_LOSS_MSE;
        break;
    case 8: /* AvgPool2d(3, 2, padding 1, ceil_mode, count_include_pad=False) */
        Ls[n++] = conv3(2, 3), Ls[n++] = simple(&cv_tanh_class);
        Ls[n++] = pool(&cv_avgpool2d_class, 3, 2, 1, 1, 1, 0), Ls[n++] = conv3(3, 3);
        break;
    case 9: /* AvgPool2d(2, 2, padding 1), count_include_pad */
        Ls[n++] = conv3(2, 3), Ls[n++] = simple(&cv_tanh_class);
        Ls[n++] = pool(&cv_avgpool2d_class, 2, 2, 1, 1, 0, 1), Ls[n++] = conv3(3, 3);
        *W = 5;
        break;
    case 10: /* AdaptiveAvgPool2d with overlapping windows */
        Ls[n++] = conv3(2, 3), Ls[n++] = simple(&cv_tanh_class);
        Ls[n++] = adaptive(3, 4), Ls[n++] = conv3(3, 3);
        *H = 5, *W = 7;
        break;
    case 11: /* BatchNorm2d */
        Ls[n++] = conv3(2, 3), Ls[n++] = bnorm(&cv_batchnorm2d_class, 3, 1);
        Ls[n++] = simple(&cv_tanh_class), Ls[n++] = conv3(3, 2);
        break;
    case 12: /* BatchNorm2d, affine=False */
        Ls[n++] = conv3(2, 3), Ls[n++] = bnorm(&cv_batchnorm2d_class, 3, 0);
        Ls[n++] = simple(&cv_tanh_class), Ls[n++] = conv3(3, 2);
        *loss = CV_LOSS_MSE;
        break;
    case 13: /* BatchNorm1d after Linear */
        Ls[n++] = conv(2, 2, 3, 3, 2, 2, 0, 0, 1, 1, 1, 1), Ls[n++] = simple(&cv_tanh_class);
        Ls[n++] = simple(&cv_flatten_class), Ls[n++] = linear(5);
        Ls[n++] = bnorm(&cv_batchnorm1d_class, 5, 1);
        break;
    case 14: /* Dropout (identity) */
        Ls[n++] = conv3(2, 3), Ls[n++] = simple(&cv_tanh_class);
        Ls[n++] = simple(&cv_dropout_class);
        Ls[n++] = conv3(3, 2);
        break;
    case 16: /* padding="same" with even effective kernels: one more row/column of
              * padding on the bottom/right, as PyTorch pads */
        Ls[n++] = conv3(2, 3), Ls[n++] = simple(&cv_tanh_class);
        Ls[n] = conv(3, 3, 2, 4, 1, 1, 1, 1, 3, 1, 1, 1);
        CONV(&Ls[n])->pad_extra[0] = CONV(&Ls[n])->pad_extra[1] = 1, n++;
        *W = 5;
        break;
    case 17: /* BatchNorm1d on per-sample [C, L] (PyTorch's (N, C, L)) */
        Ls[n++] = conv3(2, 3), Ls[n] = simple(&cv_flatten_class);
        CV_LAYER_ATTR(&Ls[n++], cv_flatten_attr)->start_dim = 2;
        Ls[n++] = bnorm(&cv_batchnorm1d_class, 3, 1);
        *loss = CV_LOSS_MSE;
        break;
    case 18: /* 16-channel stride-1 convs: the direct (AVX-512) kernels where the
              * CPU has them, forward, tangents and transposed convolutions */
        Ls[n++] = conv3(2, 16), Ls[n++] = simple(&cv_tanh_class);
        Ls[n++] = conv(16, 16, 1, 2, 1, 1, 0, 1, 1, 1, 1, 1);
        *H = 2, *W = 4;
        break;
    default: /* 15: the tiny CNN with every layer type */
        Ls[n++] = conv3(2, 4), Ls[n++] = bnorm(&cv_batchnorm2d_class, 4, 1);
        Ls[n++] = simple(&cv_relu_class), Ls[n++] = pool(&cv_maxpool2d_class, 2, 2, 0, 1, 0, 0);
        Ls[n++] = conv(4, 4, 2, 2, 1, 1, 1, 1, 2, 2, 2, 1), Ls[n++] = simple(&cv_tanh_class);
        Ls[n++] = pool(&cv_avgpool2d_class, 2, 1, 0, 1, 0, 1), Ls[n++] = adaptive(2, 2);
        *kinks = 1;
        break;
    }
    Ls[n++] = simple(&cv_tanh_class);
    Ls[n++] = simple(&cv_flatten_class);
    Ls[n++] = simple(&cv_dropout_class);
    Ls[n++] = linear(3);
    return n;
}

static void make_variant(fixture *f, int i)
{
    cv_layer Ls[MAXL];
    int C, H, W;
    cv_loss_type loss;
    cv_reduction red;
    int nl = variant_layers(i, Ls, &C, &H, &W, &loss, &red, &f->kinks);
    cnn_model(&f->m, C, H, W, Ls, nl, loss, red, 300 + (uint64_t)i);
    tu_data(&f->d, &f->m, 3, 400 + (uint64_t)i);
    cv_err e;
    f->c = cv_curv_new(&f->m, &f->d, NULL, &e);
    ck_assert_msg(f->c != NULL, "variant %d: cv_curv_new: %s", i, e.message);
    cv_block_full(&f->m, &f->full);
}

static double fd_tol(const fixture *f, double smooth) { return f->kinks ? 2e-2 : smooth; }

/* ---- oracles ------------------------------------------------------------------ */

/* _i = variant * TU_NORACLES + oracle: finite differences of the gradient,
 * of H v and of the GGN, symmetry/PSD, per-sample gradients and the EF. */
START_TEST(variant_matches_oracles)
{
    int v = _i / TU_NORACLES;
    fixture f;
    make_variant(&f, v);
    double tol = fd_tol(&f, 3e-3);
    tu_fd_bounds fd = {3e-3, tol, 3e-3, tol, 3 + (uint64_t)v};
    tu_check_oracle(&f, (tu_oracle)(_i % TU_NORACLES), &fd, v);
    tu_fx_free(&f);
}
END_TEST

/* ---- identities -------------------------------------------------------------- */

/* Blocks of variant f: full, the tested layer's first tensor, the last tensor. */
static int test_blocks(const fixture *f, cv_block *b)
{
    int T = cv_model_param_count(&f->m), idx[2] = {2, T - 1};
    cv_err e;
    b[0] = f->full;
    ck_assert_int_eq(cv_block_from_indices(&f->m, idx, 1, &b[1], &e), 0);
    ck_assert_int_eq(cv_block_from_indices(&f->m, idx + 1, 1, &b[2], &e), 0);
    return 3;
}

START_TEST(gram_and_jvp_vjp_adjoint)
{
    fixture f;
    make_variant(&f, _i);
    int k = 2;
    cv_block blocks[3];
    int nb = test_blocks(&f, blocks);
    for (int bi = 0; bi < nb; bi++) {
        const cv_block *b = &blocks[bi];
        char tag[64];
        snprintf(tag, sizeof tag, "variant %d block %d", _i, bi);
        tu_check_adjoint(&f, b, k, 19, tag);
        tu_check_gram(&f, b, k, 1e-6, tag);
    }
    tu_fx_free(&f);
}
END_TEST

START_TEST(batched_products_equal_single)
{
    fixture f;
    make_variant(&f, _i);
    size_t D = f.full.dim;
    int k = 40; /* more than one internal chunk */
    double *X = malloc(sizeof(double) * D * k), *Y = malloc(sizeof(double) * D * k);
    double *y1 = malloc(sizeof(double) * D);
    cv_rng r;
    cv_rng_seed(&r, 1);
    cv_rng_gaussian(&r, X, D * k);
    cv_err e;
    cv_curvature kinds[2] = {CV_CURV_HESSIAN, CV_CURV_GGN};
    for (int t = 0; t < 2; t++) {
        ck_assert_int_eq(cv_curv_matvec(f.c, kinds[t], &f.full, k, X, Y, &e), 0);
        for (int j = 0; j < k; j += 7) {
            ck_assert_int_eq(cv_curv_matvec(f.c, kinds[t], &f.full, 1, X + j * D, y1, &e), 0);
            ck_assert_msg(tu_relerr(Y + j * D, y1, D, 1e-9) < 1e-5, "variant %d %s column %d",
                          _i, cv_curvature_name(kinds[t]), j);
        }
    }
    free(X); free(Y); free(y1);
    tu_fx_free(&f);
}
END_TEST

/* x^T A x from one forward-mode pass equals x . (A x) for every curvature
 * on every CNN variant (full net and single-tensor blocks). */
START_TEST(quadform_equals_dot_of_product)
{
    fixture f;
    make_variant(&f, _i);
    cv_block b[3];
    int nb = test_blocks(&f, b);
    char tag[64];
    for (int i = 0; i < nb; i++) {
        snprintf(tag, sizeof tag, "variant %d block %d", _i, i);
        tu_check_quadforms(f.c, &b[i], i == 0 ? 36 : 3, 9 + (uint64_t)i, tag);
    }
    tu_fx_free(&f);
}
END_TEST

START_TEST(conv_gram_chunking)
{
    /* a budget below one output channel forces column chunks; then a few channels */
    size_t budgets[3] = {1, 40, 500};
    fixture f;
    make_variant(&f, 3); /* groups=2, no bias */
    cv_block b[3];
    test_blocks(&f, b);
    for (int t = 0; t < 3; t++) {
        cv_curv_set_gram_budget(f.c, budgets[t]);
        tu_check_gram(&f, &b[0], 3, 1e-6, "chunked full");
        tu_check_gram(&f, &b[1], 2, 1e-6, "chunked conv");
    }
    tu_fx_free(&f);
}
END_TEST

/* ---- forward semantics against naive loops --------------------------------- */

/* Outputs of layer 0 of the model [layer, Flatten, Linear] on random x,
 * straight from its forward kernel. */
static float *single_layer_outputs(cv_layer L, int C, int H, int W, int n, cv_model *m,
                                   cv_dataset *d, uint64_t seed)
{
    cv_layer Ls[3] = {L, simple(&cv_flatten_class), linear(2)};
    cnn_model(m, C, H, W, Ls, 3, CV_LOSS_MSE, CV_RED_MEAN, seed);
    tu_data(d, m, (size_t)n, seed + 1);
    const cv_layer *L0 = &m->layers[0];
    cv_layer_ctx c;
    memset(&c, 0, sizeof c);
    c.L = L0;
    c.n = n;
    c.in_numel = cv_shape_numel(&L0->in_shape);
    c.out_numel = cv_shape_numel(&L0->out_shape);
    c.nparam = L0->nparams ? L0->params[0].numel + (L0->nparams > 1 ? L0->params[1].numel : 0) : 0;
    c.theta = L0->nparams ? m->params + L0->params[0].offset : NULL;
    c.buffers = L0->nbuffers ? m->buffers + L0->buffers[0].offset : NULL;
    c.x = d->x;
    float *y = malloc(sizeof(float) * (size_t)n * c.out_numel);
    cv_err e;
    ck_assert_msg(L0->cls->ops->forward(&c, y, &e) == 0, "%s", e.message);
    cv_layer_ctx_release(&c);
    return y;
}

static void naive_conv(const cv_layer *L, const float *theta, const float *x, double *y)
{
    int C = L->in_shape.dim[0], H = L->in_shape.dim[1], W = L->in_shape.dim[2];
    int O = L->out_shape.dim[0], OH = L->out_shape.dim[1], OW = L->out_shape.dim[2];
    const cv_conv2d_attr *a = CONV(L);
    int cg = C / a->groups, og = O / a->groups, kh = a->kernel[0], kw = a->kernel[1];
    for (int o = 0; o < O; o++)
        for (int oy = 0; oy < OH; oy++)
            for (int ox = 0; ox < OW; ox++) {
                double s = a->has_bias ? theta[(size_t)O * cg * kh * kw + o] : 0;
                for (int ci = 0; ci < cg; ci++)
                    for (int i = 0; i < kh; i++)
                        for (int j = 0; j < kw; j++) {
                            int iy = oy * a->stride[0] - a->padding[0] + i * a->dilation[0];
                            int ix = ox * a->stride[1] - a->padding[1] + j * a->dilation[1];
                            if (iy < 0 || iy >= H || ix < 0 || ix >= W)
                                continue;
                            int c = o / og * cg + ci;
                            s += (double)theta[((o * cg + ci) * kh + i) * kw + j] *
                                 x[(c * H + iy) * W + ix];
                        }
                y[(o * OH + oy) * OW + ox] = s;
            }
}

START_TEST(conv_forward_matches_naive)
{
    cv_layer cases[] = {conv3(3, 4), conv(3, 6, 3, 2, 2, 1, 1, 2, 1, 2, 3, 1),
                        conv(4, 2, 1, 1, 2, 3, 0, 1, 1, 1, 2, 0),
                        conv(2, 4, 5, 5, 1, 1, 2, 2, 1, 1, 1, 1),
                        conv(4, 4, 3, 3, 3, 2, 3, 0, 2, 3, 4, 1),
                        conv(3, 2, 2, 4, 1, 1, 0, 1, 1, 1, 1, 1), /* "same", even kernels */
                        conv(2, 2, 2, 3, 1, 1, 1, 1, 3, 1, 2, 0)};
    CONV(&cases[5])->pad_extra[0] = CONV(&cases[5])->pad_extra[1] = 1;
    CONV(&cases[6])->pad_extra[0] = 1; /* dilated even kernel: (1, 2) rows of padding */
    int chans[] = {3, 3, 4, 2, 4, 3, 2};
    for (int t = 0; t < 7; t++) {
        cv_model m;
        cv_dataset d;
        int n = 2;
        float *y = single_layer_outputs(cases[t], chans[t], 7, 8, n, &m, &d, 50 + (uint64_t)t);
        const cv_layer *L = &m.layers[0];
        if (t >= 5) /* "same": the output plane is the input plane */
            ck_assert(L->out_shape.dim[1] == 7 && L->out_shape.dim[2] == 8);
        size_t in = L->in_shape.dim[0] * 56, out = cv_shape_numel(&L->out_shape);
        double *ref = malloc(sizeof(double) * out);
        for (int s = 0; s < n; s++) {
            naive_conv(L, m.params, d.x + s * in, ref);
            for (size_t q = 0; q < out; q++)
                ck_assert_msg(fabs(y[s * out + q] - ref[q]) <= 1e-5 * (1 + fabs(ref[q])),
                              "case %d sample %d entry %zu: %g vs %g", t, s, q, y[s * out + q],
                              ref[q]);
        }
        free(ref);
        free(y);
        cv_model_free(&m);
        tu_data_free(&d);
    }
}
END_TEST

/* Pooling by PyTorch's rules; returns the output value, *arg the argmax (max). */
static double naive_pool(const cv_layer *L, const float *x, int H, int W, int oy, int ox,
                         int *arg)
{
    const cv_pool2d_attr *a = POOL(L);
    if (L->cls == &cv_adaptiveavgpool2d_class) {
        int OH = a->output_size[0], OW = a->output_size[1];
        int y0 = oy * H / OH, y1 = ((oy + 1) * H + OH - 1) / OH;
        int x0 = ox * W / OW, x1 = ((ox + 1) * W + OW - 1) / OW;
        double s = 0;
        for (int iy = y0; iy < y1; iy++)
            for (int ix = x0; ix < x1; ix++)
                s += x[iy * W + ix];
        return s / ((y1 - y0) * (x1 - x0));
    }
    double best = -INFINITY, s = 0;
    int cnt = 0, padded = 0;
    *arg = -1;
    for (int i = 0; i < a->kernel[0]; i++)
        for (int j = 0; j < a->kernel[1]; j++) {
            int iy = oy * a->stride[0] - a->padding[0] + i * a->dilation[0];
            int ix = ox * a->stride[1] - a->padding[1] + j * a->dilation[1];
            /* count_include_pad counts padding but not the ceil_mode overhang */
            if (iy < H + a->padding[0] && ix < W + a->padding[1])
                padded++;
            if (iy < 0 || iy >= H || ix < 0 || ix >= W)
                continue;
            double v = x[iy * W + ix];
            if (v > best) {
                best = v;
                *arg = iy * W + ix;
            }
            s += v;
            cnt++;
        }
    if (L->cls == &cv_maxpool2d_class)
        return best;
    return s / (a->count_include_pad ? padded : cnt);
}

START_TEST(pooling_forward_matches_naive)
{
    const cv_layer_class *mp = &cv_maxpool2d_class, *ap = &cv_avgpool2d_class;
    cv_layer cases[] = {pool(mp, 2, 2, 0, 1, 0, 0), pool(mp, 3, 2, 1, 1, 1, 0),
                        pool(mp, 3, 1, 1, 2, 0, 0), pool(mp, 2, 3, 1, 1, 1, 0),
                        pool(ap, 3, 2, 1, 1, 1, 1), pool(ap, 3, 2, 1, 1, 1, 0),
                        pool(ap, 2, 1, 0, 1, 0, 1), pool(ap, 4, 3, 2, 1, 1, 1),
                        adaptive(3, 4), adaptive(7, 8), adaptive(1, 1), adaptive(4, 3),
                        adaptive(9, 11)};
    int nc = (int)(sizeof cases / sizeof cases[0]);
    for (int t = 0; t < nc; t++) {
        cv_model m;
        cv_dataset d;
        int n = 2, C = 2, H = 7, W = 8;
        float *y = single_layer_outputs(cases[t], C, H, W, n, &m, &d, 70 + (uint64_t)t);
        const cv_layer *L = &m.layers[0];
        int OH = L->out_shape.dim[1], OW = L->out_shape.dim[2];
        for (int pl = 0; pl < n * C; pl++)
            for (int oy = 0; oy < OH; oy++)
                for (int ox = 0; ox < OW; ox++) {
                    int arg;
                    double want = naive_pool(L, d.x + (size_t)pl * H * W, H, W, oy, ox, &arg);
                    double got = y[((size_t)pl * OH + oy) * OW + ox];
                    ck_assert_msg(fabs(got - want) <= 1e-5 * (1 + fabs(want)),
                                  "case %d (%s) plane %d (%d,%d): %g vs %g", t,
                                  cv_layer_name(L), pl, oy, ox, got, want);
                }
        free(y);
        cv_model_free(&m);
        tu_data_free(&d);
    }
}
END_TEST

START_TEST(pooling_output_shapes_follow_pytorch)
{
    /* (H, kernel, stride, padding, dilation, ceil_mode) -> PyTorch's size */
    int cases[][7] = {{6, 3, 2, 1, 1, 1, 4}, {5, 2, 2, 0, 1, 1, 3}, {5, 2, 2, 0, 1, 0, 2},
                      {7, 3, 3, 1, 1, 1, 3}, {6, 2, 2, 1, 1, 1, 4}, {8, 3, 1, 1, 2, 0, 6}};
    for (int t = 0; t < 6; t++) {
        cv_model m;
        cv_layer Ls[3] = {pool(&cv_maxpool2d_class, cases[t][1], cases[t][2], cases[t][3],
                               cases[t][4], cases[t][5], 0),
                          simple(&cv_flatten_class), linear(2)};
        cnn_model(&m, 1, cases[t][0], cases[t][0], Ls, 3, CV_LOSS_MSE, CV_RED_MEAN, 1);
        ck_assert_msg(m.layers[0].out_shape.dim[1] == cases[t][6], "case %d: %d vs %d", t,
                      m.layers[0].out_shape.dim[1], cases[t][6]);
        cv_model_free(&m);
    }
}
END_TEST

START_TEST(maxpool_ties_and_nan_follow_pytorch)
{
    cv_model m;
    cv_layer Ls[3] = {pool(&cv_maxpool2d_class, 2, 2, 1, 1, 0, 0), simple(&cv_flatten_class),
                      linear(2)};
    cnn_model(&m, 1, 4, 4, Ls, 3, CV_LOSS_MSE, CV_RED_MEAN, 1);
    const cv_layer *L = &m.layers[0]; /* 4x4 -> 3x3 with padding 1 */
    float x[16], y[9], gy[9], gx[16];
    for (int i = 0; i < 16; i++)
        x[i] = 1.0f; /* all ties: the first in-window element wins */
    x[10] = NAN;     /* a NaN wins its window */
    cv_layer_ctx c;
    memset(&c, 0, sizeof c);
    c.L = L;
    c.n = 1;
    c.in_numel = 16;
    c.out_numel = 9;
    c.x = x;
    const cv_layer_ops *ops = cv_maxpool2d_class.ops;
    cv_err e;
    ck_assert_int_eq(ops->forward(&c, y, &e), 0);
    /* window (oy, ox) covers rows 2oy-1..2oy, cols 2ox-1..2ox */
    int want[9] = {0, 1, 3, 4, 5, 7, 12, 13, 15};
    want[4] = 10;
    for (int q = 0; q < 9; q++)
        ck_assert_msg(c.idx[q] == want[q], "output %d: argmax %d, want %d", q, c.idx[q], want[q]);
    ck_assert(isnan(y[4]));
    for (int q = 0; q < 9; q++)
        gy[q] = (float)(q + 1);
    ops->vjp(&c, 1, gy, gx, NULL);
    for (int q = 0; q < 9; q++)
        ck_assert_float_eq(gx[want[q]], (float)(q + 1));
    cv_layer_ctx_release(&c);
    cv_model_free(&m);
}
END_TEST

/* MaxPool2d(2) on one H x W plane through the 2x2/stride-2 fast path; y, idx
 * hold the OH x OW outputs and argmaxes.  */
static void maxpool2_plane(const float *x, int H, int W, float *y, int *idx, float *gx)
{
    cv_model m;
    cv_layer Ls[3] = {pool(&cv_maxpool2d_class, 2, 2, 0, 1, 0, 0), simple(&cv_flatten_class),
                      linear(2)};
    cnn_model(&m, 1, H, W, Ls, 3, CV_LOSS_MSE, CV_RED_MEAN, 1);
    const cv_layer *L = &m.layers[0];
    int OH = L->out_shape.dim[1], OW = L->out_shape.dim[2];
    ck_assert(OH == H / 2 && OW == W / 2);
    cv_layer_ctx c;
    memset(&c, 0, sizeof c);
    c.L = L;
    c.n = 1;
    c.in_numel = (size_t)H * W;
    c.out_numel = (size_t)OH * OW;
    c.x = x;
    const cv_layer_ops *ops = cv_maxpool2d_class.ops;
    cv_err e;
    ck_assert_int_eq(ops->forward(&c, y, &e), 0);
    memcpy(idx, c.idx, sizeof(int) * (size_t)OH * OW);
    float gy[64];
    for (int q = 0; q < OH * OW; q++)
        gy[q] = (float)(q + 1);
    ops->vjp(&c, 1, gy, gx, NULL);
    cv_layer_ctx_release(&c);
    cv_model_free(&m);
}

START_TEST(maxpool_2x2_fast_path_ties_and_nan)
{
    /* 5 x 5 plane: 2 x 2 outputs, the last row and column in no window.  The
     * window of (oy, ox) scans x[2oy][2ox], x[2oy][2ox+1], x[2oy+1][2ox],
     * x[2oy+1][2ox+1]; PyTorch's CPU rule: a later element wins if it is
     * greater or NaN (so the first of equal maxima, the last of NaNs). */
    enum { H = 5, W = 5 };
    float x[H * W], y[4], gx[H * W];
    int idx[4];
    for (int q = 0; q < H * W; q++)
        x[q] = 2.0f; /* all ties everywhere */
    x[0] = NAN;      /* window 0: NaN in the first slot beats the later 2s */
    x[3] = NAN;      /* window 1: NaN in the second slot (first slot 2) */
    x[8] = NAN;      /* window 1: a NaN in the last slot beats the earlier NaN */
    x[11] = 7.0f;    /* window 2: the last-but-one slot is the maximum ... */
    x[15] = 7.0f;    /* ... tied by the last slot: the first one wins */
    /* window 3 (rows 2-3, cols 2-3): all ties -> its first slot */
    maxpool2_plane(x, H, W, y, idx, gx);
    int want[4] = {0, 8, 11, 12};
    for (int q = 0; q < 4; q++)
        ck_assert_msg(idx[q] == want[q], "output %d: argmax %d, want %d", q, idx[q], want[q]);
    ck_assert(isnan(y[0]) && isnan(y[1]));
    ck_assert_float_eq(y[2], 7.0f);
    ck_assert_float_eq(y[3], 2.0f);
    for (int q = 0; q < H * W; q++) { /* the cotangent goes to the argmax only */
        float g = 0;
        for (int o = 0; o < 4; o++)
            g += want[o] == q ? (float)(o + 1) : 0.0f;
        ck_assert_msg(gx[q] == g, "gx[%d] = %g, want %g", q, gx[q], g);
    }
    /* -inf everywhere: nothing beats the first slot, whose value is -inf */
    for (int q = 0; q < H * W; q++)
        x[q] = -INFINITY;
    maxpool2_plane(x, H, W, y, idx, gx);
    for (int q = 0; q < 4; q++) {
        ck_assert_msg(idx[q] == (q / 2) * 2 * W + (q % 2) * 2, "-inf output %d: argmax %d", q,
                      idx[q]);
        ck_assert(isinf(y[q]) && y[q] < 0);
    }
    /* all ties on an even plane: every window's first slot */
    float x4[16], y4[4], g4[16];
    for (int q = 0; q < 16; q++)
        x4[q] = -1.5f;
    maxpool2_plane(x4, 4, 4, y4, idx, g4);
    for (int q = 0; q < 4; q++)
        ck_assert_int_eq(idx[q], (q / 2) * 8 + (q % 2) * 2);
}
END_TEST

/* Unfolded sample by the definition: row (c*kh + i)*kw + j, column oy*ow + ox
 * holds x[c][oy*sh - ph + i*dh][ox*sw - pw + j*dw], 0 outside the input. */
static void naive_im2col(const cv_conv_geom *g, const float *x, float *cols)
{
    int P = g->oh * g->ow;
    for (int c = 0; c < g->C; c++)
        for (int i = 0; i < g->kh; i++)
            for (int j = 0; j < g->kw; j++)
                for (int oy = 0; oy < g->oh; oy++)
                    for (int ox = 0; ox < g->ow; ox++) {
                        int iy = oy * g->sh - g->ph + i * g->dh;
                        int ix = ox * g->sw - g->pw + j * g->dw;
                        int in = iy >= 0 && iy < g->H && ix >= 0 && ix < g->W;
                        cols[(size_t)((c * g->kh + i) * g->kw + j) * P + oy * g->ow + ox] =
                            in ? x[(c * g->H + iy) * g->W + ix] : 0.0f;
                    }
}

START_TEST(im2col_matches_naive)
{
    /* {C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, extra_h, extra_w}; the output
     * plane from PyTorch's formula with padding ph (+ extra) */
    static const int cases[][13] = {
        {2, 3, 2, 1, 5, 1, 1, 0, 2, 1, 1, 0, 0}, /* flat: taps j = 0, 4 wholly in padding */
        {1, 1, 1, 3, 3, 1, 1, 1, 1, 1, 1, 0, 0}, /* flat, 1 x 1 plane */
        {2, 5, 4, 3, 3, 1, 1, 2, 1, 2, 1, 0, 0}, /* flat: dilation, rectangular padding */
        {1, 6, 5, 2, 3, 1, 1, 1, 2, 3, 2, 0, 0}, /* flat: dilation (3, 2), padding (1, 2) */
        {3, 4, 6, 2, 4, 1, 1, 0, 1, 1, 1, 1, 1}, /* flat: "same" with even kernels */
        {2, 5, 7, 2, 2, 1, 1, 1, 1, 3, 3, 1, 1}, /* flat: "same", dilation 3 (3 = 1 + 2) */
        {2, 4, 3, 5, 3, 1, 1, 3, 1, 1, 1, 0, 0}, /* flat: rows wholly in padding */
        {2, 5, 6, 3, 3, 1, 1, 0, 0, 1, 1, 0, 0}, /* stride 1, ow < W: general path */
        {2, 6, 7, 3, 2, 2, 3, 1, 1, 2, 1, 0, 0}, /* strided, general path */
        {1, 5, 5, 3, 3, 2, 1, 1, 1, 1, 2, 0, 0}, /* sw = 1, sh = 2, ow < W */
    };
    int nc = (int)(sizeof cases / sizeof cases[0]);
    cv_rng r;
    cv_rng_seed(&r, 5);
    for (int t = 0; t < nc; t++) {
        const int *q = cases[t];
        cv_conv_geom g = {q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7], q[8], q[9], q[10], 0, 0};
        g.oh = (g.H + 2 * g.ph + q[11] - g.dh * (g.kh - 1) - 1) / g.sh + 1;
        g.ow = (g.W + 2 * g.pw + q[12] - g.dw * (g.kw - 1) - 1) / g.sw + 1;
        ck_assert_msg(g.oh >= 1 && g.ow >= 1, "case %d: empty output", t);
        ck_assert_msg((t < 7) == (g.ow == g.W), "case %d: flat path %s", t,
                      g.ow == g.W ? "taken" : "not taken");
        int K = g.C * g.kh * g.kw, P = g.oh * g.ow;
        size_t xn = (size_t)g.C * g.H * g.W;
        float *x = malloc(sizeof(float) * xn), *want = malloc(sizeof(float) * K * P);
        float *got = malloc(sizeof(float) * K * (P + 3)); /* also the ld = P + 3 rows */
        for (size_t i = 0; i < xn; i++)
            x[i] = (float)cv_rng_normal(&r) + 3.0f; /* nonzero: no accidental zeros */
        naive_im2col(&g, x, want);
        for (int i = 0; i < K * (P + 3); i++)
            got[i] = NAN; /* every entry must be written */
        cv_im2col(&g, x, 0, K, got);
        for (int i = 0; i < K * P; i++)
            ck_assert_msg(got[i] == want[i], "case %d row %d col %d: %g vs %g", t, i / P, i % P,
                          got[i], want[i]);
        /* a row range with a leading dimension wider than the plane */
        size_t ld = (size_t)P + 3;
        int r0 = K / 3, r1 = K;
        cv_im2col_ld(&g, x, r0, r1, got, ld);
        for (int row = r0; row < r1; row++)
            for (int p = 0; p < P; p++)
                ck_assert_msg(got[(row - r0) * ld + p] == want[row * P + p],
                              "case %d ld row %d col %d", t, row, p);
        /* col2im is the adjoint: fold(cols)[x] sums the entries that read x */
        float *cols = malloc(sizeof(float) * K * P), *fold = calloc(xn, sizeof(float));
        double *fwant = calloc(xn, sizeof(double));
        for (int i = 0; i < K * P; i++)
            cols[i] = (float)cv_rng_normal(&r);
        cv_col2im_add(&g, cols, fold);
        for (int c = 0; c < g.C; c++)
            for (int i = 0; i < g.kh; i++)
                for (int j = 0; j < g.kw; j++)
                    for (int oy = 0; oy < g.oh; oy++)
                        for (int ox = 0; ox < g.ow; ox++) {
                            int iy = oy * g.sh - g.ph + i * g.dh, ix = ox * g.sw - g.pw + j * g.dw;
                            if (iy >= 0 && iy < g.H && ix >= 0 && ix < g.W)
                                fwant[(c * g.H + iy) * g.W + ix] +=
                                    cols[((c * g.kh + i) * g.kw + j) * P + oy * g.ow + ox];
                        }
        for (size_t i = 0; i < xn; i++)
            ck_assert_msg(fabs(fold[i] - fwant[i]) <= 1e-5 * (1 + fabs(fwant[i])),
                          "case %d col2im entry %zu: %g vs %g", t, i, fold[i], fwant[i]);
        free(x); free(want); free(got); free(cols); free(fold); free(fwant);
    }
}
END_TEST

/* y[o][oy][ox] = b[o] + sum W[o][c][i][j] x[c][oy - ph + i][ox - pw + j] in double. */
static double naive_conv_at(const cv_conv_geom *g, const float *W, const float *b,
                            const float *x, int o, int oy, int ox)
{
    double s = b ? b[o] : 0.0;
    for (int c = 0; c < g->C; c++)
        for (int i = 0; i < g->kh; i++)
            for (int j = 0; j < g->kw; j++) {
                int iy = oy - g->ph + i, ix = ox - g->pw + j;
                if (iy >= 0 && iy < g->H && ix >= 0 && ix < g->W)
                    s += (double)W[((o * g->C + c) * g->kh + i) * g->kw + j] *
                         x[(c * g->H + iy) * g->W + ix];
            }
    return s;
}

/* gx[c][y][x] = sum W[o][c][i][j] gy[o][y + ph - i][x + pw - j]: the adjoint of
 * naive_conv_at's map x -> y (no bias), in double; *mag = the sum of |terms|. */
static double naive_tconv_at(const cv_conv_geom *g, int cout, const float *W, const float *gy,
                             int c, int y, int x, double *mag)
{
    double s = 0;
    *mag = 0;
    for (int o = 0; o < cout; o++)
        for (int i = 0; i < g->kh; i++)
            for (int j = 0; j < g->kw; j++) {
                int oy = y + g->ph - i, ox = x + g->pw - j;
                if (oy >= 0 && oy < g->oh && ox >= 0 && ox < g->ow) {
                    double term = (double)W[((o * g->C + c) * g->kh + i) * g->kw + j] *
                                  gy[(o * g->oh + oy) * g->ow + ox];
                    s += term;
                    *mag += fabs(term);
                }
            }
    return s;
}

static float *randn(cv_rng *r, size_t len)
{
    float *v = malloc(sizeof(float) * len);
    for (size_t i = 0; i < len; i++)
        v[i] = (float)cv_rng_normal(r);
    return v;
}

/* cv_dconv_weight_grad against sum_s sum_p gy_s[o][p] x_s[c][oy - ph + i][ox - pw + j]
 * (double), for n samples (n = 40: 16 sample groups of 2-3, staged 2 at a time). */
static void check_direct_wgrad(const cv_conv_geom *g, int O, int n, cv_rng *r, size_t t)
{
    size_t in = (size_t)g->C * g->H * g->W, out = (size_t)O * g->oh * g->ow;
    size_t K = (size_t)g->C * g->kh * g->kw;
    float *x = randn(r, n * in), *gy = randn(r, n * out), *gW = randn(r, O * K);
    float *gW0 = malloc(sizeof(float) * O * K);
    float *sc = malloc(sizeof(float) * cv_dconv_wgrad_scratch(g, O));
    memcpy(gW0, gW, sizeof(float) * O * K);
    cv_dconv_weight_grad(g, O, n, x, in, gy, out, 1, gW, sc);
    for (int o = 0; o < O; o++)
        for (int c = 0; c < g->C; c++)
            for (int i = 0; i < g->kh; i++)
                for (int j = 0; j < g->kw; j++) {
                    double want = 0;
                    for (int s = 0; s < n; s++)
                        for (int oy = 0; oy < g->oh; oy++)
                            for (int ox = 0; ox < g->ow; ox++) {
                                int iy = oy - g->ph + i, ix = ox - g->pw + j;
                                if (iy >= 0 && iy < g->H && ix >= 0 && ix < g->W)
                                    want += (double)gy[s * out + (o * g->oh + oy) * g->ow + ox] *
                                            x[s * in + (c * g->H + iy) * g->W + ix];
                            }
                    size_t q = (size_t)o * K + (c * g->kh + i) * g->kw + j;
                    double tol = 1e-5 * (1 + sqrt((double)n * g->oh * g->ow));
                    ck_assert_msg(fabs(gW[q] - gW0[q] - want) <= tol,
                                  "case %zu weight grad o %d c %d tap (%d, %d): %g vs %g", t, o, c,
                                  i, j, gW[q] - gW0[q], want);
                }
    free(x); free(gy); free(gW); free(gW0); free(sc);
}

START_TEST(direct_conv_matches_naive)
{
    /* {C, H, W, kh, kw, ph, pw, cout}: blocks of one, two and four 16-channel
     * groups (48: one and two), whole and partial column runs, rectangular kernels */
    static const int cases[][8] = {
        {3, 5, 14, 3, 3, 1, 1, 32}, {16, 4, 31, 5, 3, 2, 0, 16}, {1, 7, 9, 1, 5, 0, 4, 48},
        {32, 3, 3, 3, 3, 1, 1, 16}, {2, 6, 15, 2, 4, 1, 3, 32}, {16, 3, 15, 3, 5, 1, 2, 64},
    };
    if (!cv_dconv_supported(&(cv_conv_geom){3, 5, 14, 3, 3, 1, 1, 1, 1, 1, 1, 5, 14}, 32)) {
#ifndef CV_DCONV_PORTABLE /* the build switch that leaves the direct kernels out */
        ck_assert(!__builtin_cpu_supports("avx512f")); /* only a CPU without AVX-512 */
#endif
        return;
    }
    cv_rng r;
    cv_rng_seed(&r, 17);
    for (size_t t = 0; t < sizeof cases / sizeof cases[0]; t++) {
        const int *q = cases[t];
        int O = q[7], n = 2;
        cv_conv_geom g = {q[0], q[1], q[2], q[3], q[4], 1, 1, q[5], q[6], 1, 1, 0, 0};
        g.oh = g.H + 2 * g.ph - g.kh + 1;
        g.ow = g.W + 2 * g.pw - g.kw + 1;
        cv_conv_geom gt = cv_dconv_transposed(&g, O);
        ck_assert_msg(cv_dconv_supported(&g, O) && (O % 16 || g.C % 16 ||
                                                    cv_dconv_supported(&gt, g.C)),
                      "case %zu: not supported", t);
        size_t in = (size_t)g.C * g.H * g.W, out = (size_t)O * g.oh * g.ow;
        size_t K = (size_t)g.C * g.kh * g.kw;
        float *W = randn(&r, (size_t)O * K), *b = randn(&r, (size_t)O);
        float *x = randn(&r, n * in), *y = randn(&r, n * out), *y0 = malloc(sizeof(float) * n * out);
        float *Wp = malloc(sizeof(float) * cv_dconv_packed_floats(&g, O));
        memcpy(y0, y, sizeof(float) * n * out);
        cv_dconv_pack(&g, O, W, Wp);
        cv_dconv_run(&g, O, Wp, b, n, x, in, y, out, 1); /* y += conv(x) + b */
        for (int s = 0; s < n; s++)
            for (int o = 0; o < O; o++)
                for (int p = 0; p < g.oh * g.ow; p++) {
                    size_t i = s * out + (size_t)o * g.oh * g.ow + p;
                    double want = y0[i] + naive_conv_at(&g, W, b, x + s * in, o, p / g.ow, p % g.ow);
                    ck_assert_msg(fabs(y[i] - want) <= 1e-5 * (1 + sqrt((double)K)),
                                  "case %zu sample %d out %d pos %d: %g vs %g", t, s, o, p, y[i], want);
                }
        if (cv_dconv_wgrad_supported(&g, O)) /* the weight gradient, added to gW */
            check_direct_wgrad(&g, O, t == 0 ? 40 : n, &r, t);
        if (g.C % 16 == 0) { /* the transposed convolution, overwriting gx */
            float *gx = randn(&r, n * in), *Wt = malloc(sizeof(float) * cv_dconv_packed_floats(&gt, g.C));
            cv_dconv_pack_transposed(&g, O, W, Wt);
            cv_dconv_run(&gt, g.C, Wt, NULL, n, y, out, gx, in, 0);
            for (int s = 0; s < n; s++)
                for (int c = 0; c < g.C; c++)
                    for (int p = 0; p < g.H * g.W; p++) {
                        size_t i = s * in + (size_t)c * g.H * g.W + p;
                        double mag;
                        double want = naive_tconv_at(&g, O, W, y + s * out, c, p / g.W, p % g.W,
                                                     &mag);
                        ck_assert_msg(fabs(gx[i] - want) <= 1e-5 * (1 + mag), /* float sums */
                                      "case %zu transposed sample %d ch %d pos %d: %g vs %g", t,
                                      s, c, p, gx[i], want);
                    }
            free(gx);
            free(Wt);
        }
        free(W); free(b); free(x); free(y); free(y0); free(Wp);
    }
    /* outside the kernels' reach: strides, dilation, 15 channels, extra padding */
    cv_conv_geom s2 = {4, 8, 8, 3, 3, 2, 2, 1, 1, 1, 1, 4, 4};
    cv_conv_geom d2 = {4, 8, 8, 3, 3, 1, 1, 2, 2, 2, 2, 8, 8};
    cv_conv_geom same = {4, 8, 8, 2, 2, 1, 1, 0, 0, 1, 1, 8, 8};
    ck_assert(!cv_dconv_supported(&s2, 16) && !cv_dconv_supported(&d2, 16));
    ck_assert(!cv_dconv_supported(&same, 16));
    ck_assert(!cv_dconv_supported(&(cv_conv_geom){4, 8, 8, 3, 3, 1, 1, 1, 1, 1, 1, 8, 8}, 15));
}
END_TEST

START_TEST(batchnorm_forward_matches_formula)
{
    /* BatchNorm2d on [3, 4, 5]; BatchNorm1d on [3, 7] (PyTorch's (N, C, L) input) */
    cv_layer cases[3] = {bnorm(&cv_batchnorm2d_class, 3, 1), bnorm(&cv_batchnorm2d_class, 3, 0),
                         bnorm(&cv_batchnorm1d_class, 3, 1)};
    int shapes[3][2] = {{4, 5}, {4, 5}, {7, 0}};
    for (int t = 0; t < 3; t++) {
        cv_model m;
        cv_dataset d;
        int n = 2;
        float *y = single_layer_outputs(cases[t], 3, shapes[t][0], shapes[t][1], n, &m, &d,
                                        90 + (uint64_t)t);
        const cv_layer *L = &m.layers[0];
        ck_assert_int_eq(L->in_shape.rank, t < 2 ? 3 : 2);
        int P = (int)(cv_shape_numel(&L->in_shape) / 3);
        const float *mean = m.buffers + L->buffers[0].offset;
        const float *var = m.buffers + L->buffers[1].offset;
        for (int s = 0; s < n; s++)
            for (int c = 0; c < 3; c++)
                for (int p = 0; p < P; p++) {
                    size_t q = ((size_t)s * 3 + c) * P + p;
                    double g = BN(L)->affine ? m.params[L->params[0].offset + c] : 1;
                    double b = BN(L)->affine ? m.params[L->params[1].offset + c] : 0;
                    double want = (d.x[q] - mean[c]) / sqrt(var[c] + BN(L)->eps) * g + b;
                    ck_assert_msg(fabs(y[q] - want) <= 1e-5 * (1 + fabs(want)),
                                  "case %d entry %zu: %g vs %g", t, q, y[q], want);
                }
        free(y);
        cv_model_free(&m);
        tu_data_free(&d);
    }
}
END_TEST

/* ---- malformed configurations ------------------------------------------------- */

static void expect_finalize_error(cv_layer *Ls, int nl, int C, int H, int W, const char *a,
                                  const char *b)
{
    cv_model m;
    memset(&m, 0, sizeof m);
    m.input_shape.rank = W ? 3 : H ? 2 : 1;
    m.input_shape.dim[0] = C;
    m.input_shape.dim[1] = H;
    m.input_shape.dim[2] = W;
    m.nlayers = nl;
    memcpy(m.layers, Ls, sizeof(cv_layer) * nl);
    cv_err e;
    ck_assert_int_eq(cv_model_finalize(&m, &e), -1);
    ck_assert_str_eq(e.code, "invalid_model");
    ck_assert_msg(strstr(e.message, a) && strstr(e.message, b), "message '%s' lacks '%s' / '%s'",
                  e.message, a, b);
}

START_TEST(malformed_configurations_rejected)
{
    cv_layer big[2] = {conv3(2, 2), conv(2, 2, 9, 9, 1, 1, 1, 1, 1, 1, 1, 1)};
    expect_finalize_error(big, 2, 2, 6, 6, "layers[1] (Conv2d)", "kernel larger");
    cv_layer grp[1] = {conv(3, 4, 3, 3, 1, 1, 1, 1, 1, 1, 2, 1)};
    expect_finalize_error(grp, 1, 3, 6, 6, "layers[0] (Conv2d)", "divisible by groups");
    cv_layer chans[2] = {conv3(2, 4), conv3(3, 2)};
    expect_finalize_error(chans, 2, 2, 6, 6, "layers[1] (Conv2d)", "[3, H, W]");
    cv_layer bn[2] = {conv3(2, 4), bnorm(&cv_batchnorm2d_class, 3, 1)};
    expect_finalize_error(bn, 2, 2, 6, 6, "layers[1] (BatchNorm2d)", "[3, H, W]");
    cv_layer bn1[3] = {conv3(2, 4), simple(&cv_flatten_class), bnorm(&cv_batchnorm1d_class, 4, 1)};
    expect_finalize_error(bn1, 3, 2, 6, 6, "layers[2] (BatchNorm1d)", "expects");
    cv_layer mp[1] = {pool(&cv_maxpool2d_class, 8, 1, 0, 1, 0, 0)};
    expect_finalize_error(mp, 1, 2, 6, 6, "layers[0] (MaxPool2d)", "kernel larger");
    cv_layer pad[1] = {pool(&cv_avgpool2d_class, 2, 2, 2, 1, 0, 1)};
    expect_finalize_error(pad, 1, 2, 6, 6, "layers[0] (AvgPool2d)", "half of kernel_size");
    /* dilation*(kernel-1)+1 = 2^32 + 1 wraps to 1 in 32-bit arithmetic */
    cv_layer wrap[1] = {conv(1, 2, 257, 3, 1, 1, 0, 1, 1 << 24, 1, 1, 1)};
    expect_finalize_error(wrap, 1, 1, 28, 28, "layers[0] (Conv2d): kernel_size[0]",
                          "kernel larger than the padded input");
    expect_finalize_error(wrap, 1, 1, 28, 28, "spans 4294967297", "height is 28");
    cv_layer wrapw[2] = {conv3(1, 2), conv(2, 2, 3, 257, 1, 1, 1, 1, 1, 1 << 24, 1, 1)};
    expect_finalize_error(wrapw, 2, 1, 28, 28, "layers[1] (Conv2d): kernel_size[1]", "width");
    cv_layer mwrap[1] = {pool(&cv_maxpool2d_class, 257, 1, 0, 1 << 24, 0, 0)};
    expect_finalize_error(mwrap, 1, 1, 28, 28, "layers[0] (MaxPool2d): kernel_size[0]",
                          "kernel larger than the padded input");
    cv_layer mwrap2[1] = {pool(&cv_maxpool2d_class, 3, 1, 1, 1 << 24, 1, 0)}; /* ceil_mode */
    expect_finalize_error(mwrap2, 1, 1, 28, 28, "layers[0] (MaxPool2d)", "kernel larger");
    /* effective kernel just over the padded input: 2*(3-1)+1 = 5 > 3 + 2*0 */
    cv_layer edge[1] = {conv(1, 1, 3, 1, 1, 1, 0, 0, 2, 1, 1, 1)};
    expect_finalize_error(edge, 1, 1, 3, 3, "layers[0] (Conv2d): kernel_size[0]", "spans 5");
    cv_layer sameh[1] = {conv(1, 1, 4, 1, 1, 1, 1, 0, 1, 1, 1, 1)}; /* 1 + 1 pad, not 3 */
    expect_finalize_error(sameh, 1, 1, 1, 3, "layers[0] (Conv2d)", "padding 1+1");
    /* sizes whose products overflow int */
    cv_layer wbig[1] = {conv(1, 1 << 20, 1 << 12, 1 << 12, 1, 1, 1 << 11, 1 << 11, 1, 1, 1, 1)};
    expect_finalize_error(wbig, 1, 1, 1, 1, "layers[0] (Conv2d): kernel_size", "more than");
    cv_layer obig[1] = {conv(1, 1 << 24, 1, 1, 1, 1, 1 << 24, 1 << 24, 1, 1, 1, 1)};
    expect_finalize_error(obig, 1, 1, 1, 1, "layers[0] (Conv2d)", "too large");
    cv_layer abig[2] = {adaptive(1 << 24, 1 << 24), simple(&cv_flatten_class)};
    expect_finalize_error(abig, 2, 4, 6, 6, "layers[0] (AdaptiveAvgPool2d)", "too large");
    cv_layer lbig[1] = {linear(1 << 24)};
    LIN(&lbig[0])->in_features = 1 << 24;
    expect_finalize_error(lbig, 1, 1 << 24, 0, 0, "layers[0] (Linear)", "parameters");
    cv_layer ibig[1] = {simple(&cv_flatten_class)};
    expect_finalize_error(ibig, 1, 1 << 24, 1 << 24, 1 << 24, "input_shape", "more than");
    /* BatchNorm1d takes [C] or [C, L], not [C, H, W] nor a mismatched C */
    cv_layer bn3[1] = {bnorm(&cv_batchnorm1d_class, 2, 1)};
    expect_finalize_error(bn3, 1, 2, 6, 6, "layers[0] (BatchNorm1d)", "[2] or [2, L]");
    cv_layer bnl[1] = {bnorm(&cv_batchnorm1d_class, 3, 1)};
    expect_finalize_error(bnl, 1, 2, 6, 0, "layers[0] (BatchNorm1d)", "got [2, 6]");
}
END_TEST

static Suite *cnn_suite(void)
{
    Suite *s = suite_create("cnn");
    TCase *fd = tcase_create("oracles");
    tcase_set_timeout(fd, 300);
    tcase_add_loop_test(fd, variant_matches_oracles, 0, NVARIANTS * TU_NORACLES);
    suite_add_tcase(s, fd);
    TCase *id = tcase_create("identities");
    tcase_set_timeout(id, 300);
    tcase_add_loop_test(id, gram_and_jvp_vjp_adjoint, 0, NVARIANTS);
    tcase_add_loop_test(id, batched_products_equal_single, 0, NVARIANTS);
    tcase_add_loop_test(id, quadform_equals_dot_of_product, 0, NVARIANTS);
    tcase_add_test(id, conv_gram_chunking);
    suite_add_tcase(s, id);
    TCase *sem = tcase_create("semantics");
    tcase_add_test(sem, conv_forward_matches_naive);
    tcase_add_test(sem, pooling_forward_matches_naive);
    tcase_add_test(sem, pooling_output_shapes_follow_pytorch);
    tcase_add_test(sem, maxpool_ties_and_nan_follow_pytorch);
    tcase_add_test(sem, maxpool_2x2_fast_path_ties_and_nan);
    tcase_add_test(sem, im2col_matches_naive);
    tcase_add_test(sem, direct_conv_matches_naive);
    tcase_add_test(sem, batchnorm_forward_matches_formula);
    tcase_add_test(sem, malformed_configurations_rejected);
    suite_add_tcase(s, sem);
    return s;
}

int main(void) { return tu_main(cnn_suite); }
