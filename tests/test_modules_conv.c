/* test_modules_conv.c - Conv1d, MaxPool1d, AvgPool1d, AdaptiveAvgPool1d,
 * ConvTranspose2d and Upsample (nearest): forward semantics against naive
 * loops in double written from PyTorch's definitions, every kernel through
 * the kernel oracle (kernel_check.h), the attribute rules (refusals, the
 * document's forms), and small Sequential models built in code against the
 * curvature oracles of testutil.h (finite differences, dense J^T Lambda J,
 * symmetry/PSD, per-sample sums), as test_cnn.c does for the 2-d layers. */
#include "testutil.h"

#include "api/arch.h"
#include "engine/layer.h"
#include "engine/layer_conv.h"
#include "engine/layer_convt.h"
#include "engine/layer_pool.h"
#include "engine/layer_upsample.h"
#include "kernel_check.h"

/* ---- one layer, finished and run -------------------------------------------- */

/* The layer `name` on per-sample input `in` with attributes fields[i] =
 * values[i] (kc_set), its check hook, infer and layout run. */
static cv_layer make_layer(const char *name, cv_shape in, const char *const *fields,
                           const double *values, int nf)
{
    cv_layer L;
    cv_err e;
    ck_assert_int_eq(kc_layer(&L, name, 1, &in), 0);
    for (int i = 0; i < nf; i++)
        ck_assert_msg(kc_set(&L, fields[i], values[i]) == 0, "%s.%s", name, fields[i]);
    if (L.cls->check)
        ck_assert_msg(L.cls->check(&L, &e) == 0, "%s check: %s", name, e.message);
    ck_assert_msg(L.cls->infer(&L, &in, &e) == 0, "%s infer: %s", name, e.message);
    if (L.cls->layout)
        ck_assert_int_eq(L.cls->layout(&L), 0);
    return L;
}

static size_t nparam_of(const cv_layer *L)
{
    size_t P = 0;
    for (int i = 0; i < L->nparams; i++)
        P += L->params[i].numel;
    return P;
}

static float *random_floats(size_t len, uint64_t seed)
{
    float *p = malloc(sizeof(float) * (len ? len : 1));
    cv_rng r;
    cv_rng_seed(&r, seed);
    for (size_t i = 0; i < len; i++)
        p[i] = (float)cv_rng_normal(&r);
    return p;
}

/* forward of L on n samples x with parameters theta; caller frees y */
static float *run_forward(const cv_layer *L, int n, const float *x, const float *theta)
{
    cv_layer_ctx c;
    cv_err e;
    memset(&c, 0, sizeof c);
    c.L = L;
    c.theta = theta;
    c.n = n;
    c.in_numel = cv_shape_numel(&L->in_shape);
    c.out_numel = cv_shape_numel(&L->out_shape);
    c.nparam = nparam_of(L);
    c.x = x;
    c.nin = 1;
    c.xs[0] = x;
    c.in_numels[0] = c.in_numel;
    float *y = malloc(sizeof(float) * n * c.out_numel);
    ck_assert_msg(L->cls->ops->forward(&c, y, &e) == 0, "forward: %s", e.message);
    cv_layer_ctx_release(&c);
    return y;
}

static void assert_close(const float *got, const double *want, size_t len, const char *tag)
{
    for (size_t i = 0; i < len; i++)
        ck_assert_msg(fabs(got[i] - want[i]) <= 1e-4 * (1 + fabs(want[i])),
                      "%s: entry %zu is %.7g, expected %.7g", tag, i, got[i], want[i]);
}

#define NF(a) ((int)(sizeof(a) / sizeof((a)[0])))

/* ---- forward semantics ---------------------------------------------------------- */

typedef struct {
    int cin, cout, k, s, p, d, groups, bias, same;
} conv1d_case;

/* y[o, t] = b[o] + sum_{c in o's group, j} W[o, c, j] x[c, t*s - p + j*d]; "same"
 * pads d*(k-1) in all, the larger half on the right. */
static void conv1d_ref(const conv1d_case *q, int L, int Lo, const float *W, const float *b,
                       const float *x, double *y)
{
    int cg = q->cin / q->groups, og = q->cout / q->groups;
    int left = q->same ? q->d * (q->k - 1) / 2 : q->p;
    for (int o = 0; o < q->cout; o++)
        for (int t = 0; t < Lo; t++) {
            double s = q->bias ? b[o] : 0;
            for (int c = 0; c < cg; c++)
                for (int j = 0; j < q->k; j++) {
                    int i = t * q->s - left + j * q->d;
                    if (i >= 0 && i < L)
                        s += (double)W[(o * cg + c) * q->k + j] * x[(o / og * cg + c) * L + i];
                }
            y[o * Lo + t] = s;
        }
}

START_TEST(conv1d_forward_matches_definition)
{
    static const conv1d_case cases[] = {
        {2, 3, 3, 1, 1, 1, 1, 1, 0}, {4, 6, 3, 2, 2, 2, 2, 0, 0}, {3, 3, 2, 1, 0, 1, 3, 1, 0},
        {2, 4, 4, 1, 0, 1, 1, 1, 1}, /* "same" with an even kernel: 1 left, 2 right */
        {16, 16, 3, 1, 1, 1, 1, 1, 0}, /* the direct kernels where the CPU has them */
    };
    int L = 9, n = 2;
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const conv1d_case *q = &cases[ci];
        const char *f[] = {"in_channels", "out_channels", "kernel_size", "stride", "padding",
                           "dilation", "groups", "bias"};
        double v[] = {q->cin, q->cout, q->k, q->s, q->p, q->d, q->groups, q->bias};
        cv_layer Ly;
        if (q->same) { /* through the document: padding="same" is a keyword */
            cv_layer_init(&Ly, &cv_conv1d_class);
            for (int i = 0; i < NF(f); i++)
                ck_assert_int_eq(kc_set(&Ly, f[i], v[i]), 0);
            CV_LAYER_ATTR(&Ly, cv_conv2d_attr)->padding_keyword = 2;
            cv_err e;
            ck_assert_int_eq(cv_conv1d_class.check(&Ly, &e), 0);
            Ly.in_shape = Ly.in_shapes[0] = kc_shape(2, q->cin, L);
            Ly.nin = 1;
            ck_assert_int_eq(cv_conv1d_class.infer(&Ly, &Ly.in_shape, &e), 0);
            ck_assert_int_eq(cv_conv1d_class.layout(&Ly), 0);
        } else {
            Ly = make_layer("Conv1d", kc_shape(2, q->cin, L), f, v, NF(f));
        }
        ck_assert_int_eq(Ly.out_shape.rank, 2);
        int Lo = Ly.out_shape.dim[1];
        int want_lo = q->same ? L : (L + 2 * q->p - q->d * (q->k - 1) - 1) / q->s + 1;
        ck_assert_int_eq(Lo, want_lo);
        ck_assert_int_eq(Ly.params[0].rank, 3); /* weight [out, in/groups, k] */
        size_t P = nparam_of(&Ly);
        float *theta = random_floats(P, 10 + ci), *x = random_floats((size_t)n * q->cin * L, 20);
        float *y = run_forward(&Ly, n, x, theta);
        double *want = malloc(sizeof(double) * q->cout * Lo);
        for (int s = 0; s < n; s++) {
            conv1d_ref(q, L, Lo, theta, theta + Ly.params[0].numel, x + (size_t)s * q->cin * L,
                       want);
            char tag[64];
            snprintf(tag, sizeof tag, "Conv1d case %zu sample %d", ci, s);
            assert_close(y + (size_t)s * q->cout * Lo, want, (size_t)q->cout * Lo, tag);
        }
        free(theta); free(x); free(y); free(want);
    }
}
END_TEST

typedef struct {
    int cin, cout, k[2], s[2], p[2], op[2], d[2], groups, bias;
} convt_case;

/* PyTorch's definition: every input entry x[c, iy, ix] scatters
 * x * W[c, o, ky, kx] to y[g*og + o, iy*s - p + ky*d, ...] (g = c's group). */
static void convt_ref(const convt_case *q, int H, int W_, int Ho, int Wo, const float *Wt,
                      const float *b, const float *x, double *y)
{
    int cg = q->cin / q->groups, og = q->cout / q->groups;
    for (int o = 0; o < q->cout; o++)
        for (int t = 0; t < Ho * Wo; t++)
            y[o * Ho * Wo + t] = q->bias ? b[o] : 0;
    for (int c = 0; c < q->cin; c++)
        for (int iy = 0; iy < H; iy++)
            for (int ix = 0; ix < W_; ix++)
                for (int o = 0; o < og; o++)
                    for (int ky = 0; ky < q->k[0]; ky++)
                        for (int kx = 0; kx < q->k[1]; kx++) {
                            int oy = iy * q->s[0] - q->p[0] + ky * q->d[0];
                            int ox = ix * q->s[1] - q->p[1] + kx * q->d[1];
                            if (oy < 0 || oy >= Ho || ox < 0 || ox >= Wo)
                                continue;
                            double w = Wt[((c * og + o) * q->k[0] + ky) * q->k[1] + kx];
                            y[((c / cg * og + o) * Ho + oy) * Wo + ox] +=
                                w * x[(c * H + iy) * W_ + ix];
                        }
}

START_TEST(convt_forward_matches_definition)
{
    static const convt_case cases[] = {
        {2, 3, {3, 3}, {2, 2}, {1, 1}, {1, 1}, {1, 1}, 1, 1},
        {4, 6, {2, 3}, {1, 2}, {0, 1}, {0, 1}, {2, 1}, 2, 0},
        {2, 2, {3, 2}, {1, 1}, {1, 0}, {1, 0}, {2, 1}, 1, 1}, /* output_padding < dilation */
        {16, 16, {3, 3}, {1, 1}, {1, 1}, {0, 0}, {1, 1}, 1, 1}, /* direct where available */
    };
    int H = 4, W_ = 5, n = 2;
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const convt_case *q = &cases[ci];
        cv_layer L;
        ck_assert_int_eq(kc_layer(&L, "ConvTranspose2d", 1, (cv_shape[]){kc_shape(3, q->cin, H, W_)}), 0);
        cv_convt2d_attr *a = CV_LAYER_ATTR(&L, cv_convt2d_attr);
        a->in_channels = q->cin, a->out_channels = q->cout, a->groups = q->groups;
        a->has_bias = q->bias;
        for (int i = 0; i < 2; i++) {
            a->kernel[i] = q->k[i], a->stride[i] = q->s[i], a->padding[i] = q->p[i];
            a->output_padding[i] = q->op[i], a->dilation[i] = q->d[i];
        }
        cv_err e;
        ck_assert_msg(L.cls->check(&L, &e) == 0, "%s", e.message);
        ck_assert_msg(L.cls->infer(&L, &L.in_shape, &e) == 0, "%s", e.message);
        ck_assert_int_eq(L.cls->layout(&L), 0);
        int Ho = L.out_shape.dim[1], Wo = L.out_shape.dim[2];
        ck_assert_int_eq(Ho, (H - 1) * q->s[0] - 2 * q->p[0] + q->d[0] * (q->k[0] - 1) +
                                 q->op[0] + 1);
        ck_assert_int_eq(Wo, (W_ - 1) * q->s[1] - 2 * q->p[1] + q->d[1] * (q->k[1] - 1) +
                                 q->op[1] + 1);
        ck_assert_int_eq(L.params[0].dim[0], q->cin); /* weight [in, out/groups, kh, kw] */
        ck_assert_int_eq(L.params[0].dim[1], q->cout / q->groups);
        size_t P = nparam_of(&L), in = (size_t)q->cin * H * W_, out = (size_t)q->cout * Ho * Wo;
        float *theta = random_floats(P, 30 + ci), *x = random_floats(n * in, 40);
        float *y = run_forward(&L, n, x, theta);
        double *want = malloc(sizeof(double) * out);
        for (int s = 0; s < n; s++) {
            convt_ref(q, H, W_, Ho, Wo, theta, theta + L.params[0].numel, x + s * in, want);
            char tag[64];
            snprintf(tag, sizeof tag, "ConvTranspose2d case %zu sample %d", ci, s);
            assert_close(y + s * out, want, out, tag);
        }
        free(theta); free(x); free(y); free(want);
    }
}
END_TEST

/* Windows of PyTorch's 1-d pools over x (length L) with padding p (as -inf
 * for max, zeros for average), output length Lo from the formula. */
static void pool1d_ref(int max, int k, int s, int p, int d, int cip, int L, int Lo,
                       const float *x, double *y)
{
    for (int o = 0; o < Lo; o++) {
        int st = o * s - p;
        double acc = max ? -INFINITY : 0;
        int cnt = 0;
        for (int j = 0; j < k; j++) {
            int i = st + j * d;
            if (i < 0 || i >= L)
                continue;
            cnt++;
            acc = max ? (x[i] > acc ? x[i] : acc) : acc + x[i];
        }
        if (!max) { /* the divisor: the window clipped to the padded input, or to the input */
            int e = st + k < L + p ? st + k : L + p;
            acc /= cip ? e - st : cnt;
        }
        y[o] = acc;
    }
}

START_TEST(pool1d_forward_matches_definition)
{
    int C = 2, L = 9, n = 2;
    float *x = random_floats((size_t)n * C * L, 50);
    /* {max, k, s, p, d, ceil, cip} */
    static const int cases[][7] = {{1, 3, 2, 1, 1, 0, 0}, {1, 2, 1, 1, 3, 1, 0},
                                   {1, 3, 3, 1, 1, 1, 0}, {0, 3, 2, 1, 1, 1, 0},
                                   {0, 3, 2, 1, 1, 0, 1}, {0, 4, 3, 2, 1, 1, 1}};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const int *q = cases[ci];
        const char *fm[] = {"kernel_size", "stride", "padding", "dilation", "ceil_mode"};
        const char *fa[] = {"kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"};
        double vm[] = {q[1], q[2], q[3], q[4], q[5]}, va[] = {q[1], q[2], q[3], q[5], q[6]};
        cv_layer Ly = q[0] ? make_layer("MaxPool1d", kc_shape(2, C, L), fm, vm, 5)
                           : make_layer("AvgPool1d", kc_shape(2, C, L), fa, va, 5);
        int Lo = Ly.out_shape.dim[1];
        int num = L + 2 * q[3] - q[4] * (q[1] - 1) - 1;
        int want_lo = (q[5] ? (num + q[2] - 1) / q[2] : num / q[2]) + 1;
        if (q[5] && (want_lo - 1) * q[2] >= L + q[3])
            want_lo--;
        ck_assert_int_eq(Ly.out_shape.rank, 2);
        ck_assert_int_eq(Lo, want_lo);
        float *y = run_forward(&Ly, n, x, NULL);
        double *want = malloc(sizeof(double) * Lo);
        for (int pl = 0; pl < n * C; pl++) {
            pool1d_ref(q[0], q[1], q[2], q[3], q[4], q[6], L, Lo, x + pl * L, want);
            char tag[64];
            snprintf(tag, sizeof tag, "pool case %zu plane %d", ci, pl);
            assert_close(y + pl * Lo, want, Lo, tag);
        }
        free(y); free(want);
    }
    /* AdaptiveAvgPool1d(4) on 9: windows [floor(o*9/4), ceil((o+1)*9/4)) */
    const char *fo[] = {"output_size"};
    double vo[] = {4};
    cv_layer La = make_layer("AdaptiveAvgPool1d", kc_shape(2, C, L), fo, vo, 1);
    ck_assert_int_eq(La.out_shape.dim[1], 4);
    float *y = run_forward(&La, n, x, NULL);
    static const int win[4][2] = {{0, 3}, {2, 5}, {4, 7}, {6, 9}};
    for (int pl = 0; pl < n * C; pl++)
        for (int o = 0; o < 4; o++) {
            double s = 0;
            for (int i = win[o][0]; i < win[o][1]; i++)
                s += x[pl * L + i];
            assert_close(y + pl * 4 + o, (double[]){s / (win[o][1] - win[o][0])}, 1, "adaptive");
        }
    free(y);
    free(x);
}
END_TEST

/* Upsample(nearest): the source index of output o for the given case. */
START_TEST(upsample_forward_matches_definition)
{
    int n = 2;
    /* [2, 3, 4] x2: y[c, oy, ox] = x[c, oy / 2, ox / 2] */
    const char *fs[] = {"scale_factor"}, *fz[] = {"size"};
    double two[] = {2}, three[] = {3};
    cv_layer L = make_layer("Upsample", kc_shape(3, 2, 3, 4), fs, two, 1);
    ck_assert_int_eq(L.out_shape.dim[1], 6);
    ck_assert_int_eq(L.out_shape.dim[2], 8);
    float *x = random_floats((size_t)n * 2 * 12, 60), *y = run_forward(&L, n, x, NULL);
    for (int pl = 0; pl < n * 2; pl++)
        for (int oy = 0; oy < 6; oy++)
            for (int ox = 0; ox < 8; ox++)
                ck_assert_float_eq(y[pl * 48 + oy * 8 + ox], x[pl * 12 + oy / 2 * 4 + ox / 2]);
    free(y);
    free(x);
    /* [2, 4] x3: y[c, o] = x[c, o / 3] */
    L = make_layer("Upsample", kc_shape(2, 2, 4), fs, three, 1);
    ck_assert_int_eq(L.out_shape.rank, 2);
    ck_assert_int_eq(L.out_shape.dim[1], 12);
    x = random_floats((size_t)n * 8, 61), y = run_forward(&L, n, x, NULL);
    for (int pl = 0; pl < n * 2; pl++)
        for (int o = 0; o < 12; o++)
            ck_assert_float_eq(y[pl * 12 + o], x[pl * 4 + o / 3]);
    free(y);
    free(x);
    /* as torch.nn.functional.interpolate on CPU (torch 1.13): size 5 from 3,
     * floor(o * 0.6); scale_factor 1.3 from 5 (6 outputs) and from 3 (3
     * outputs, yet not the identity), floor(o / 1.3) in float; size 8 from 5 */
    static const struct {
        int in, size;
        double scale;
        int out, idx[8];
    } ups[] = {{3, 5, 0, 5, {0, 0, 1, 1, 2}},
               {5, 0, 1.3, 6, {0, 0, 1, 2, 3, 3}},
               {3, 0, 1.3, 3, {0, 0, 1}},
               {5, 8, 0, 8, {0, 0, 1, 1, 2, 3, 3, 4}}};
    for (size_t t = 0; t < sizeof ups / sizeof ups[0]; t++) {
        double sz[] = {ups[t].size}, sc[] = {ups[t].scale};
        L = make_layer("Upsample", kc_shape(2, 1, ups[t].in), ups[t].size ? fz : fs,
                       ups[t].size ? sz : sc, 1);
        int Lo = L.out_shape.dim[1];
        ck_assert_int_eq(Lo, ups[t].out);
        x = random_floats(ups[t].in, 62), y = run_forward(&L, 1, x, NULL);
        for (int o = 0; o < Lo; o++)
            ck_assert_msg(y[o] == x[ups[t].idx[o]], "Upsample case %zu output %d", t, o);
        free(y);
        free(x);
    }
}
END_TEST

/* ---- the kernel oracle ------------------------------------------------------------ */

typedef struct {
    const char *name;
    int rank, dims[3];
    const char *fields[10];
    double values[10];
    int kinks;
} kc_case;

static const kc_case KC_CASES[] = {
    {"Conv1d", 2, {2, 7}, {"in_channels", "out_channels", "kernel_size", "padding"},
     {2, 3, 3, 1}, 0},
    {"Conv1d", 2, {4, 11},
     {"in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
      "bias"},
     {4, 6, 3, 2, 2, 2, 2, 0}, 0},
    {"Conv1d", 2, {16, 6}, {"in_channels", "out_channels", "kernel_size", "padding"},
     {16, 16, 3, 1}, 0},
    {"ConvTranspose2d", 3, {2, 3, 4},
     {"in_channels", "out_channels", "kernel_size", "stride", "padding", "output_padding"},
     {2, 3, 3, 2, 1, 1}, 0},
    {"ConvTranspose2d", 3, {4, 3, 3},
     {"in_channels", "out_channels", "kernel_size", "stride", "dilation", "groups", "bias"},
     {4, 2, 2, 1, 2, 2, 0}, 0},
    {"ConvTranspose2d", 3, {2, 3, 4}, /* output_padding >= stride (< dilation) */
     {"in_channels", "out_channels", "kernel_size", "dilation", "output_padding"},
     {2, 3, 2, 2, 1}, 0},
    {"ConvTranspose2d", 3, {16, 3, 4},
     {"in_channels", "out_channels", "kernel_size", "padding"}, {16, 16, 3, 1}, 0},
    {"MaxPool1d", 2, {2, 9}, {"kernel_size", "stride", "padding", "dilation", "ceil_mode"},
     {3, 2, 1, 2, 1}, 1},
    {"AvgPool1d", 2, {2, 9}, {"kernel_size", "stride", "padding", "ceil_mode",
                              "count_include_pad"}, {3, 2, 1, 1, 0}, 0},
    {"AvgPool1d", 2, {2, 9}, {"kernel_size", "stride", "padding"}, {2, 2, 1}, 0},
    {"AdaptiveAvgPool1d", 2, {2, 9}, {"output_size"}, {4}, 0},
    {"Upsample", 3, {2, 3, 4}, {"scale_factor"}, {2}, 0},
    {"Upsample", 3, {2, 3, 4}, {"size"}, {5}, 0},
    {"Upsample", 2, {2, 3}, {"scale_factor"}, {1.5}, 0},
};

/* _i: case */
START_TEST(kernels_pass_the_oracle)
{
    const kc_case *q = &KC_CASES[_i];
    cv_shape s = q->rank == 2 ? kc_shape(2, q->dims[0], q->dims[1])
                              : kc_shape(3, q->dims[0], q->dims[1], q->dims[2]);
    cv_layer L;
    ck_assert_int_eq(kc_layer(&L, q->name, 1, &s), 0);
    for (int f = 0; f < 10 && q->fields[f]; f++)
        ck_assert_msg(kc_set(&L, q->fields[f], q->values[f]) == 0, "%s.%s", q->name,
                      q->fields[f]);
    cv_err e;
    if (L.cls->check)
        ck_assert_msg(L.cls->check(&L, &e) == 0, "%s", e.message);
    kc_opts o = kc_defaults();
    o.kinks = q->kinks;
    o.seed = 70 + (uint64_t)_i;
    KC_ASSERT(&L, &o);
}
END_TEST

/* ---- the document: forms and refusals ------------------------------------------------ */

/* Parses the layer object (single quotes) on input `in` followed by Flatten,
 * MSELoss; returns 0 or -1 with e set. */
static int parse_layer(const char *in, const char *layer, cv_model *m, cv_err *e)
{
    char buf[1024];
    int rank = 1;
    for (const char *p = in; *p; p++)
        rank += *p == ',';
    snprintf(buf, sizeof buf,
             "{'input_shape': %s, 'layers': [{'type': 'Conv%dd', 'in_channels': 2,"
             " 'out_channels': 2, 'kernel_size': 1}, %s, {'type': 'Flatten'}],"
             " 'loss': {'type': 'MSELoss'}}", in, rank - 1, layer);
    for (char *p = buf; *p; p++)
        if (*p == '\'')
            *p = '"';
    return cv_arch_parse(buf, strlen(buf), m, e);
}

static void expect_refused(const char *in, const char *layer, const char *field,
                           const char *words)
{
    cv_model *m = calloc(1, sizeof *m);
    cv_err e;
    ck_assert_msg(parse_layer(in, layer, m, &e) == -1, "accepted: %s", layer);
    ck_assert_msg(strstr(e.field, field) != NULL, "%s: field '%s', expected '%s'", layer,
                  e.field, field);
    ck_assert_msg(strstr(e.message, words) != NULL, "%s: '%s' lacks '%s'", layer, e.message,
                  words);
    free(m);
}

START_TEST(attribute_rules)
{
    expect_refused("[2, 3, 4]", "{'type': 'Upsample', 'scale_factor': 2, 'mode': 'bilinear'}",
                   "mode", "not supported");
    expect_refused("[2, 3, 4]", "{'type': 'Upsample'}", "size", "give size or scale_factor");
    expect_refused("[2, 3, 4]", "{'type': 'Upsample', 'size': [6, 7], 'scale_factor': 2}",
                   "size", "disagrees");
    expect_refused("[2, 5]", "{'type': 'Upsample', 'size': [6, 7]}", "size", "one size");
    expect_refused("[2, 3, 4]", "{'type': 'Upsample', 'scale_factor': 2,"
                   " 'recompute_scale_factor': true}", "recompute_scale_factor",
                   "not supported");
    expect_refused("[2, 3, 4]", "{'type': 'Upsample', 'scale_factor': 2, 'antialias': true}",
                   "antialias", "not supported");
    expect_refused("[2, 5]", "{'type': 'Conv1d', 'in_channels': 2, 'out_channels': 2,"
                   " 'kernel_size': [3, 3]}", "kernel_size", "list of 1 integer");
    expect_refused("[2, 5]", "{'type': 'Conv1d', 'in_channels': 2, 'out_channels': 2,"
                   " 'kernel_size': 3, 'padding': 'full'}", "padding", "\"same\"");
    expect_refused("[2, 5]", "{'type': 'Conv1d', 'in_channels': 2, 'out_channels': 2,"
                   " 'kernel_size': 3, 'stride': 2, 'padding': 'same'}", "padding", "strided");
    expect_refused("[2, 5]", "{'type': 'Conv1d', 'in_channels': 2, 'out_channels': 2,"
                   " 'kernel_size': 3, 'padding_mode': 'circular'}", "padding_mode",
                   "not supported");
    expect_refused("[2, 5]", "{'type': 'Conv1d', 'in_channels': 2, 'out_channels': 2,"
                   " 'kernel_size': 7}", "layers[1]", "kernel larger");
    expect_refused("[2, 3, 4]", "{'type': 'Conv1d', 'in_channels': 2, 'out_channels': 2,"
                   " 'kernel_size': 1}", "layers[1]", "[2, L]");
    expect_refused("[2, 5]", "{'type': 'MaxPool1d', 'kernel_size': 2, 'return_indices': true}",
                   "return_indices", "not supported");
    expect_refused("[2, 5]", "{'type': 'AvgPool1d', 'kernel_size': 2, 'padding': 2}",
                   "padding", "at most half");
    expect_refused("[2, 3, 4]", "{'type': 'ConvTranspose2d', 'in_channels': 2,"
                   " 'out_channels': 2, 'kernel_size': 3, 'stride': 2, 'output_padding': 2}",
                   "output_padding", "smaller than either stride");
    expect_refused("[2, 3, 4]", "{'type': 'ConvTranspose2d', 'in_channels': 2,"
                   " 'out_channels': 3, 'kernel_size': 3, 'groups': 2}", "groups",
                   "divisible");

    /* accepted forms, and what the export writes back */
    static const char *const ok[][3] = {
        {"[2, 6]", "{'type': 'Conv1d', 'in_channels': 2, 'out_channels': 2, 'kernel_size': 4,"
                   " 'padding': 'same'}", "\"padding\":\"same\""},
        {"[2, 6]", "{'type': 'Conv1d', 'in_channels': 2, 'out_channels': 2, 'kernel_size': [3],"
                   " 'padding': 'same'}", "\"padding\":1"},
        {"[2, 6]", "{'type': 'MaxPool1d', 'kernel_size': [2], 'stride': null}", "\"stride\":2"},
        {"[2, 3, 4]", "{'type': 'Upsample', 'scale_factor': 2}", "\"size\":null"},
        {"[2, 3, 4]", "{'type': 'Upsample', 'size': 5, 'scale_factor': null}",
         "\"scale_factor\":null"},
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        cv_model *m = calloc(1, sizeof *m), *m2 = calloc(1, sizeof *m2);
        cv_err e;
        ck_assert_msg(parse_layer(ok[i][0], ok[i][1], m, &e) == 0, "%s: %s", ok[i][1],
                      e.message);
        char *text = tu_arch_reparse(m, m2, "ok");
        ck_assert_msg(strstr(text, ok[i][2]) != NULL, "%s exported as %s", ok[i][1], text);
        free(text);
        free(m);
        free(m2);
    }
}
END_TEST

/* ---- Sequential models against the curvature oracles ----------------------------------- */

static cv_layer lay(const char *name, const char *const *fields, const double *values, int nf)
{
    cv_layer L;
    ck_assert_int_eq(kc_layer(&L, name, 0, NULL), 0);
    for (int i = 0; i < nf; i++)
        ck_assert_msg(kc_set(&L, fields[i], values[i]) == 0, "%s.%s", name, fields[i]);
    return L;
}

static cv_layer conv1d(int cin, int cout, int k, int s, int p, int d, int g)
{
    const char *f[] = {"in_channels", "out_channels", "kernel_size", "stride", "padding",
                       "dilation", "groups"};
    double v[] = {cin, cout, k, s, p, d, g};
    return lay("Conv1d", f, v, NF(f));
}

static cv_layer conv2d(int cin, int cout, int k, int s, int p)
{
    const char *f[] = {"in_channels", "out_channels", "kernel_size", "stride", "padding"};
    double v[] = {cin, cout, k, s, p};
    return lay("Conv2d", f, v, NF(f));
}

static cv_layer convt(int cin, int cout, int k, int s, int p, int op, int d, int g, int bias)
{
    const char *f[] = {"in_channels", "out_channels", "kernel_size", "stride", "padding",
                       "output_padding", "dilation", "groups", "bias"};
    double v[] = {cin, cout, k, s, p, op, d, g, bias};
    return lay("ConvTranspose2d", f, v, NF(f));
}

static cv_layer named(const char *name, const char *field, double value)
{
    return lay(name, &field, &value, field ? 1 : 0);
}

#define NVARIANTS 7
#define MAXL 12

/* Variant i on input [C, L] (W 0) or [C, H, W]; kinks for max pooling. */
static int variant_layers(int i, cv_layer *Ls, int *C, int *H, int *W, cv_loss_type *loss,
                          cv_reduction *red, int *kinks)
{
    int n = 0;
    *C = 2, *H = 9, *W = 0;
    *loss = CV_LOSS_CE, *red = CV_RED_MEAN, *kinks = 0;
    cv_err e;
    switch (i) {
    case 0: /* Conv1d: padding, then stride/dilation/groups */
        Ls[n++] = conv1d(2, 4, 3, 1, 1, 1, 1), Ls[n++] = named("Tanh", NULL, 0);
        Ls[n++] = conv1d(4, 4, 3, 2, 2, 2, 2);
        break;
    case 1: /* MaxPool1d(3, 2, padding 1, ceil_mode) */
        Ls[n++] = conv1d(2, 3, 3, 1, 1, 1, 1), Ls[n++] = named("Tanh", NULL, 0);
        Ls[n] = named("MaxPool1d", "kernel_size", 3);
        kc_set(&Ls[n], "stride", 2), kc_set(&Ls[n], "padding", 1), kc_set(&Ls[n], "ceil_mode", 1);
        n++;
        Ls[n++] = conv1d(3, 3, 2, 1, 0, 1, 1);
        *kinks = 1;
        break;
    case 2: /* AvgPool1d(3, 2, padding 1, ceil, count_include_pad False), AdaptiveAvgPool1d */
        Ls[n++] = conv1d(2, 3, 3, 1, 1, 1, 1), Ls[n++] = named("Tanh", NULL, 0);
        Ls[n] = named("AvgPool1d", "kernel_size", 3);
        kc_set(&Ls[n], "stride", 2), kc_set(&Ls[n], "padding", 1), kc_set(&Ls[n], "ceil_mode", 1);
        kc_set(&Ls[n], "count_include_pad", 0), n++;
        Ls[n++] = named("AdaptiveAvgPool1d", "output_size", 3);
        *loss = CV_LOSS_MSE, *red = CV_RED_SUM;
        break;
    case 3: /* ConvTranspose2d: stride 2, padding, output_padding */
        *H = 3, *W = 4;
        Ls[n++] = conv2d(2, 3, 3, 1, 1), Ls[n++] = named("Tanh", NULL, 0);
        Ls[n++] = convt(3, 2, 3, 2, 1, 1, 1, 1, 1);
        break;
    case 4: /* ConvTranspose2d first (its input terms reach nothing), groups, dilation,
             * no bias, then another */
        *C = 4, *H = 3, *W = 3;
        Ls[n++] = convt(4, 2, 2, 1, 0, 0, 2, 2, 0), Ls[n++] = named("Tanh", NULL, 0);
        Ls[n++] = convt(2, 2, 2, 2, 1, 0, 1, 1, 1);
        *loss = CV_LOSS_BCE;
        break;
    case 5: /* Upsample x2 between convolutions */
        *H = 3, *W = 3;
        Ls[n++] = conv2d(2, 3, 3, 1, 1), Ls[n++] = named("Tanh", NULL, 0);
        Ls[n++] = named("Upsample", "scale_factor", 2), Ls[n++] = conv2d(3, 2, 3, 2, 0);
        *loss = CV_LOSS_MSE;
        break;
    default: /* 6: Upsample to a non-multiple size on [C, L] */
        *H = 4;
        Ls[n++] = conv1d(2, 3, 3, 1, 1, 1, 1), Ls[n++] = named("Tanh", NULL, 0);
        Ls[n++] = named("Upsample", "size", 7), Ls[n++] = conv1d(3, 2, 3, 1, 0, 1, 1);
        break;
    }
    for (int l = 0; l < n; l++)
        if (Ls[l].cls->check)
            ck_assert_msg(Ls[l].cls->check(&Ls[l], &e) == 0, "%s", e.message);
    Ls[n++] = named("Tanh", NULL, 0);
    Ls[n++] = named("Flatten", NULL, 0);
    Ls[n++] = named("Linear", "out_features", 3);
    return n;
}

static void make_variant(tu_fixture *f, int v)
{
    cv_layer Ls[MAXL];
    int C, H, W;
    cv_loss_type loss;
    cv_reduction red;
    int nl = variant_layers(v, Ls, &C, &H, &W, &loss, &red, &f->kinks);
    cv_model *m = &f->m;
    memset(m, 0, sizeof *m);
    m->input_shape = W ? kc_shape(3, C, H, W) : kc_shape(2, C, H);
    m->loss = loss;
    m->reduction = red;
    cv_err e;
    /* the last Linear's in_features from the prefix's output */
    for (int l = 0; l < nl; l++)
        m->layers[l] = Ls[l];
    m->nlayers = nl - 1;
    ck_assert_msg(cv_model_finalize(m, &e) == 0 || strstr(e.message, "no parameters"),
                  "variant %d prefix: %s", v, e.message);
    CV_LAYER_ATTR(&m->layers[nl - 1], cv_linear_attr)->in_features =
        (int)cv_shape_numel(&m->layers[nl - 2].out_shape);
    CV_LAYER_ATTR(&m->layers[nl - 1], cv_linear_attr)->has_bias = 1;
    m->nlayers = nl;
    ck_assert_msg(cv_model_finalize(m, &e) == 0, "variant %d: %s", v, e.message);
    ck_assert_int_eq(cv_model_alloc(m), 0);
    cv_rng r;
    cv_rng_seed(&r, 500 + (uint64_t)v);
    for (int l = 0; l < nl; l++)
        for (int p = 0; p < m->layers[l].nparams; p++) {
            const cv_tensor_info *t = &m->layers[l].params[p];
            double s = t->rank > 1 ? 1.5 / sqrt((double)(t->numel / t->dim[0])) : 0.5;
            for (size_t q = 0; q < t->numel; q++)
                m->params[t->offset + q] = (float)(s * (2 * cv_rng_uniform(&r) - 1));
        }
    tu_data(&f->d, m, 3, 600 + (uint64_t)v);
    f->c = cv_curv_new(m, &f->d, NULL, &e);
    ck_assert_msg(f->c != NULL, "variant %d: cv_curv_new: %s", v, e.message);
    cv_block_full(m, &f->full);
}

/* _i = variant * TU_NORACLES + oracle */
START_TEST(variant_matches_oracles)
{
    int v = _i / TU_NORACLES;
    tu_fixture f;
    make_variant(&f, v);
    double tol = f.kinks ? 2e-2 : 3e-3;
    tu_fd_bounds fd = {3e-3, tol, 3e-3, tol, 7 + (uint64_t)v};
    tu_check_oracle(&f, (tu_oracle)(_i % TU_NORACLES), &fd, v);
    tu_fx_free(&f);
}
END_TEST

static Suite *modules_conv_suite(void)
{
    Suite *s = suite_create("modules_conv");
    TCase *fw = tcase_create("forward");
    tcase_add_test(fw, conv1d_forward_matches_definition);
    tcase_add_test(fw, convt_forward_matches_definition);
    tcase_add_test(fw, pool1d_forward_matches_definition);
    tcase_add_test(fw, upsample_forward_matches_definition);
    tcase_add_test(fw, attribute_rules);
    suite_add_tcase(s, fw);
    TCase *kc = tcase_create("kernels");
    tcase_add_loop_test(kc, kernels_pass_the_oracle, 0,
                        (int)(sizeof KC_CASES / sizeof KC_CASES[0]));
    tcase_set_timeout(kc, 120);
    suite_add_tcase(s, kc);
    TCase *or = tcase_create("oracles");
    tcase_add_loop_test(or, variant_matches_oracles, 0, NVARIANTS * TU_NORACLES);
    tcase_set_timeout(or, 300);
    suite_add_tcase(s, or);
    return s;
}

int main(void) { return tu_main(modules_conv_suite); }
