/* layer_convt.c - torch.nn.ConvTranspose2d (stride, padding, output_padding,
 * groups, bias, dilation): y = T(x; W) + b, the adjoint of the Conv2d D that
 * maps y's shape [out, Ho, Wo] to x's [in, Hi, Wi] with the same kernel,
 * stride, padding, dilation and groups; PyTorch's weight [in, out/groups,
 * kh, kw] is exactly D's [cout, cin/groups, kh, kw].  Every kernel is one of
 * Conv2d's kernels on D (engine/layer_conv.c, through cv_conv2d_class.ops):
 *   forward / tangent in x   T x = D^T x           Conv2d's input cotangent
 *   tangent in W             T(x; V)               Conv2d's R-op term in gx
 *   input cotangent          D gy                  Conv2d's tangent
 *   weight cotangent         x (x) unfold(gy)      Conv2d's R-op term in gtheta
 * and the bias is added here.  T is bilinear in (x, W): the second-order
 * terms are the cross terms only. */
#include "layer_convt.h"

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "im2col.h"
#include "layer_conv.h"

#define CONVT(L) CV_LAYER_ATTR(L, cv_convt2d_attr)

static size_t wnumel_of(const cv_layer *L)
{
    const cv_convt2d_attr *a = CONVT(L);
    return (size_t)a->in_channels * (a->out_channels / a->groups) * a->kernel[0] * a->kernel[1];
}

/* Scratch ahead of D's: one batch of input-shaped floats (hvp_extra's D V_j gy). */
static size_t tmp_floats(const cv_layer_ctx *c) { return (size_t)c->n * c->in_numel; }

/* D (a Conv2d without bias) and its context over c's batch: D's input is
 * y's space, its output x's; parameter vectors keep c's stride (nparam), D
 * reads only their weight part.  D's scratch follows tmp_floats in c's. */
static void dual_of(const cv_layer_ctx *c, cv_layer *D, cv_layer_ctx *cd)
{
    const cv_convt2d_attr *a = CONVT(c->L);
    cv_layer_init(D, &cv_conv2d_class);
    cv_conv2d_attr *b = CV_LAYER_ATTR(D, cv_conv2d_attr);
    b->in_channels = a->out_channels;
    b->out_channels = a->in_channels;
    for (int i = 0; i < 2; i++) {
        b->kernel[i] = a->kernel[i];
        b->stride[i] = a->stride[i];
        b->padding[i] = a->padding[i];
        b->dilation[i] = a->dilation[i];
    }
    b->groups = a->groups;
    b->has_bias = 0;
    D->in_shape = c->L->out_shape;
    D->out_shape = c->L->in_shape;
    D->nin = 1;
    D->in_shapes[0] = D->in_shape;
    memset(cd, 0, sizeof *cd);
    cd->L = D;
    cd->theta = c->theta;
    cd->n = c->n;
    cd->in_numel = c->out_numel;
    cd->out_numel = c->in_numel;
    cd->nparam = c->nparam;
    cd->nin = 1;
    cd->in_numels[0] = cd->in_numel;
    cd->gram_budget = c->gram_budget;
    size_t t = tmp_floats(c);
    if (c->work && c->work_floats > t) {
        cd->work = c->work + t;
        cd->work_floats = c->work_floats - t;
    }
}

static const cv_layer_ops *conv_ops(void) { return cv_conv2d_class.ops; }

static size_t convt_work(const cv_layer_ctx *c, int k)
{
    cv_layer D;
    cv_layer_ctx cd;
    dual_of(c, &D, &cd);
    return tmp_floats(c) + conv_ops()->work_size(&cd, k);
}

/* y_j[o, p] += b_j[o] for k vectors (b_j = b + j*bstride) over the batch. */
static void add_bias(const cv_layer_ctx *c, int k, const float *b, size_t bstride, float *y)
{
    int cout = c->L->out_shape.dim[0];
    size_t P = c->out_numel / (size_t)cout;
    for (int j = 0; j < k; j++)
        for (int s = 0; s < c->n; s++) {
            float *ys = y + ((size_t)j * c->n + s) * c->out_numel;
            for (int o = 0; o < cout; o++)
                for (size_t p = 0; p < P; p++)
                    ys[o * P + p] += b[j * bstride + o];
        }
}

/* gb[o] = sum over samples and positions of gy[o, .] (n samples). */
static void bias_grad(const cv_layer_ctx *c, int n, const float *gy, float *gb)
{
    int cout = c->L->out_shape.dim[0];
    size_t P = c->out_numel / (size_t)cout;
    for (int o = 0; o < cout; o++) {
        double s = 0;
        for (int i = 0; i < n; i++) {
            const float *g = gy + (size_t)i * c->out_numel + (size_t)o * P;
            for (size_t p = 0; p < P; p++)
                s += g[p];
        }
        gb[o] = (float)s;
    }
}

static int convt_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    cv_layer D;
    cv_layer_ctx cd;
    dual_of(c, &D, &cd);
    size_t need = conv_ops()->work_size(&cd, 1);
    float *w = malloc(sizeof(float) * (need ? need : 1));
    if (!w)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "ConvTranspose2d scratch");
    cd.work = w;
    cd.work_floats = need;
    conv_ops()->vjp(&cd, 1, c->x, y, NULL);
    free(w);
    if (CONVT(c->L)->has_bias)
        add_bias(c, 1, c->theta + wnumel_of(c->L), 0, y);
    return 0;
}

static void convt_vjp(const cv_layer_ctx *c, int k, const float *gy, float *gx, float *gtheta)
{
    cv_layer D;
    cv_layer_ctx cd;
    dual_of(c, &D, &cd);
    size_t wn = wnumel_of(c->L);
    if (gx)
        conv_ops()->jvp(&cd, k, gy, NULL, gx);
    if (!gtheta)
        return;
    for (int j = 0; j < k; j++)
        memset(gtheta + (size_t)j * c->nparam, 0, sizeof(float) * wn);
    conv_ops()->hvp_extra(&cd, k, c->x, gy, NULL, NULL, gtheta);
    for (int j = 0; CONVT(c->L)->has_bias && j < k; j++)
        bias_grad(c, c->n, gy + (size_t)j * c->n * c->out_numel,
                  gtheta + (size_t)j * c->nparam + wn);
}

static void convt_jvp(const cv_layer_ctx *c, int k, const float *rx, const float *vtheta,
                      float *ry)
{
    cv_layer D;
    cv_layer_ctx cd;
    dual_of(c, &D, &cd);
    if (rx)
        conv_ops()->vjp(&cd, k, rx, ry, NULL);
    else
        memset(ry, 0, sizeof(float) * (size_t)k * c->n * c->out_numel);
    if (!vtheta)
        return;
    conv_ops()->hvp_extra(&cd, k, c->x, NULL, vtheta, ry, NULL);
    if (CONVT(c->L)->has_bias)
        add_bias(c, k, vtheta + wnumel_of(c->L), c->nparam, ry);
}

/* Cross terms of the bilinear T: gx_j += D_{V_j} gy (Conv2d of gy with V_j),
 * gW_j += rx_j (x) unfold(gy); the bias enters linearly (no terms). */
static void convt_hvp_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                            const float *vtheta, float *gx_add, float *gtheta_add)
{
    cv_layer D;
    cv_layer_ctx cd;
    dual_of(c, &D, &cd);
    size_t len = tmp_floats(c);
    if (gx_add && vtheta) {
        float *tmp = c->work && c->work_floats >= len ? c->work : NULL;
        for (int j = 0; j < k; j++) {
            float *g = gx_add + (size_t)j * len;
            if (!tmp) {
                for (size_t q = 0; q < len; q++)
                    g[q] = NAN;
                continue;
            }
            cv_layer_ctx cj = cd;
            cj.theta = vtheta + (size_t)j * c->nparam;
            conv_ops()->jvp(&cj, 1, gy, NULL, tmp);
            for (size_t q = 0; q < len; q++)
                g[q] += tmp[q];
        }
    }
    for (int j = 0; gtheta_add && rx && j < k; j++)
        conv_ops()->hvp_extra(&cd, 1, rx + (size_t)j * len, gy, NULL, NULL,
                              gtheta_add + (size_t)j * c->nparam);
}

static void convt_per_sample(const cv_layer_ctx *c, const float *gy, float *G)
{
    cv_layer D;
    cv_layer_ctx cd;
    dual_of(c, &D, &cd);
    cd.x = gy; /* D's input: the unfolded side of the weight gradient */
    conv_ops()->per_sample(&cd, c->x, G);
    size_t wn = wnumel_of(c->L);
    for (int i = 0; CONVT(c->L)->has_bias && i < c->n; i++)
        bias_grad(c, 1, gy + (size_t)i * c->out_numel, G + (size_t)i * c->nparam + wn);
}

/* The (k*n) per-(vector, sample) weight gradients x_i (x) unfold(gy_ji) as
 * rows of one matrix (D's per-sample kernel, vector by vector), then
 * G += B B^T; the bias rows are the gradients' channel sums. */
static void convt_gram_add(const cv_layer_ctx *c, int k, const float *gy, unsigned mask,
                           double *G)
{
    cv_layer D;
    cv_layer_ctx cd;
    dual_of(c, &D, &cd);
    size_t R = (size_t)k * c->n, wn = wnumel_of(c->L);
    int cout = c->L->out_shape.dim[0], bad = 0;
    if (mask & 1u) {
        float *B = malloc(sizeof(float) * R * wn);
        cd.nparam = wn; /* rows of B */
        for (int j = 0; B && j < k; j++) {
            cd.x = gy + (size_t)j * c->n * c->out_numel;
            conv_ops()->per_sample(&cd, c->x, B + (size_t)j * c->n * wn);
        }
        if (B) /* -1: it fell back to dot products, still correct */
            (void)cv_gram_add_rows((int)R, (int)wn, B, G);
        bad |= !B;
        free(B);
    }
    if (CONVT(c->L)->has_bias && (mask & 2u)) {
        float *S = malloc(sizeof(float) * R * cout);
        for (size_t r = 0; S && r < R; r++)
            bias_grad(c, 1, gy + r * c->out_numel, S + r * cout);
        if (S)
            (void)cv_gram_add_rows((int)R, cout, S, G);
        bad |= !S;
        free(S);
    }
    if (bad) /* out of memory: make the failure visible rather than wrong */
        for (size_t q = 0; q < R * R; q++)
            G[q] = NAN;
}

static const cv_layer_ops convt2d_ops = {
    .diag_add = cv_layer_diag_per_sample,
    .work_size = convt_work,
    .forward = convt_forward,
    .vjp = convt_vjp,
    .jvp = convt_jvp,
    .hvp_extra = convt_hvp_extra,
    .per_sample = convt_per_sample,
    .gram_add = convt_gram_add,
};

/* ---- class ----------------------------------------------------------------- */

static const cv_field convt_fields[] = {
    CV_FIELD_INT_REQ("in_channels", cv_convt2d_attr, in_channels, 1),
    CV_FIELD_INT_REQ("out_channels", cv_convt2d_attr, out_channels, 1),
    CV_FIELD_PAIR_REQ("kernel_size", cv_convt2d_attr, kernel, 1),
    CV_FIELD_PAIR("stride", cv_convt2d_attr, stride, 1, 1),
    CV_FIELD_PAIR("padding", cv_convt2d_attr, padding, 0, 0),
    CV_FIELD_PAIR("output_padding", cv_convt2d_attr, output_padding, 0, 0),
    CV_FIELD_INT("groups", cv_convt2d_attr, groups, 1, 1),
    CV_FIELD_BOOL("bias", cv_convt2d_attr, has_bias, 1),
    CV_FIELD_PAIR("dilation", cv_convt2d_attr, dilation, 1, 1),
    {.name = "padding_mode", .kind = CV_F_FIXED_STRING, .offset = CV_F_NOSTORE, .text = "zeros"},
};

static int convt_check(cv_layer *L, cv_err *e)
{
    const cv_convt2d_attr *a = CONVT(L);
    if (a->in_channels % a->groups || a->out_channels % a->groups)
        return cv_err_set(e, CV_EINVAL, "invalid_value", "groups",
                          "groups: in_channels (%d) and out_channels (%d) must be divisible by "
                          "groups (%d)", a->in_channels, a->out_channels, a->groups);
    for (int i = 0; i < 2; i++)
        if (a->output_padding[i] >= a->stride[i] && a->output_padding[i] >= a->dilation[i])
            return cv_err_set(e, CV_EINVAL, "invalid_value", "output_padding",
                              "output_padding: %d must be smaller than either stride (%d) or "
                              "dilation (%d), as in PyTorch", a->output_padding[i],
                              a->stride[i], a->dilation[i]);
    return 0;
}

static int convt_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    const cv_convt2d_attr *a = CONVT(L);
    char s[64];
    cv_shape_str(in, s, sizeof s);
    if (a->in_channels < 1 || a->out_channels < 1 || a->groups < 1 ||
        a->in_channels % a->groups || a->out_channels % a->groups)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                          "in_channels and out_channels must be positive and divisible by "
                          "groups");
    for (int i = 0; i < 2; i++)
        if (a->kernel[i] < 1 || a->stride[i] < 1 || a->dilation[i] < 1 || a->padding[i] < 0 ||
            a->output_padding[i] < 0)
            return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                              "kernel_size, stride, dilation must be >= 1, padding and "
                              "output_padding >= 0");
    if (in->rank != 3 || in->dim[0] != a->in_channels)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                          "expects per-sample input [%d, H, W], got %s", a->in_channels, s);
    int64_t wn = (int64_t)a->in_channels * (a->out_channels / a->groups) * a->kernel[0];
    if (wn > INT_MAX || wn * a->kernel[1] > INT_MAX)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "kernel_size",
                          "kernel_size: the weight has more than %d entries", INT_MAX);
    static const char *const axis[2] = {"height", "width"};
    L->out_shape.rank = 3;
    L->out_shape.dim[0] = a->out_channels;
    for (int i = 0; i < 2; i++) {
        int64_t o = ((int64_t)in->dim[1 + i] - 1) * a->stride[i] - 2 * (int64_t)a->padding[i] +
                    (int64_t)a->dilation[i] * (a->kernel[i] - 1) + a->output_padding[i] + 1;
        if (o < 1 || o > INT_MAX)
            return cv_err_set(e, CV_EINVAL, "invalid_model", "padding",
                              "padding: output %s %lld of input %s is out of range",
                              axis[i], (long long)o, s);
        L->out_shape.dim[1 + i] = (int)o;
    }
    return 0;
}

static int convt_layout(cv_layer *L)
{
    const cv_convt2d_attr *a = CONVT(L);
    int dims[4] = {a->in_channels, a->out_channels / a->groups, a->kernel[0], a->kernel[1]};
    int bdims[1] = {a->out_channels};
    return cv_layer_add_param(L, "weight", 4, dims) ||
           (a->has_bias && cv_layer_add_param(L, "bias", 1, bdims));
}

const cv_layer_class cv_convt2d_class = {
    .name = "ConvTranspose2d", .attr_size = sizeof(cv_convt2d_attr), CV_FIELDS(convt_fields),
    .check = convt_check, .infer = convt_infer, .layout = convt_layout, .ops = &convt2d_ops,
    .function = "conv_transpose2d"};
