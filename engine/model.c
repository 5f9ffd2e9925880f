/* model.c - shape inference and parameter layout of sequential models. */
#include "model.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *type_names[CV_LAYER_TYPE_COUNT] = {
    "Linear",      "Conv2d",      "ReLU",      "Tanh",      "Sigmoid",
    "LeakyReLU",   "ELU",         "GELU",      "Softplus",  "Identity",
    "Flatten",     "MaxPool2d",   "AvgPool2d", "AdaptiveAvgPool2d",
    "BatchNorm1d", "BatchNorm2d", "Dropout"};

const char *cv_layer_type_name(cv_layer_type t)
{
    return (unsigned)t < CV_LAYER_TYPE_COUNT ? type_names[t] : "?";
}

int cv_layer_type_from_name(const char *name)
{
    for (int i = 0; i < CV_LAYER_TYPE_COUNT; i++)
        if (strcmp(name, type_names[i]) == 0)
            return i;
    return -1;
}

int cv_layer_is_elementwise(cv_layer_type t)
{
    switch (t) {
    case CV_RELU: case CV_TANH: case CV_SIGMOID: case CV_LEAKYRELU: case CV_ELU:
    case CV_GELU: case CV_SOFTPLUS: case CV_IDENTITY: case CV_DROPOUT:
        return 1;
    default:
        return 0;
    }
}

/* 1 if the product of dim[0..rank) (each >= 0) exceeds limit (<= INT64_MAX / INT_MAX),
 * computed without overflow. */
static int dims_exceed(const int *dim, int rank, int64_t limit)
{
    int64_t p = 1;
    for (int i = 0; i < rank; i++) {
        p *= dim[i] > 0 ? dim[i] : 0; /* p <= limit before the step: no overflow */
        if (p > limit)
            return 1;
    }
    return 0;
}

size_t cv_shape_numel(const cv_shape *s)
{
    size_t n = 1;
    for (int i = 0; i < s->rank; i++)
        n *= (size_t)s->dim[i];
    return n;
}

void cv_dims_str(const int *dim, int rank, char *buf, size_t len)
{
    size_t used = (size_t)snprintf(buf, len, "[");
    for (int i = 0; i < rank && used < len; i++)
        used += (size_t)snprintf(buf + used, len - used, i ? ", %d" : "%d", dim[i]);
    if (used < len)
        snprintf(buf + used, len - used, "]");
}

void cv_shape_str(const cv_shape *s, char *buf, size_t len)
{
    cv_dims_str(s->dim, s->rank, buf, len);
}

static int fail(char *err, size_t errlen, int li, const cv_layer *L, const char *fmt,
                const char *detail)
{
    char where[96];
    snprintf(where, sizeof where, "layers[%d] (%s)", li, cv_layer_type_name(L->type));
    snprintf(err, errlen, "%s: %s%s", where, fmt, detail ? detail : "");
    return -1;
}

static void add_tensor(cv_tensor_info *t, int *count, int layer, const char *suffix, int rank,
                       const int *dims, size_t *offset)
{
    cv_tensor_info *ti = &t[(*count)++];
    snprintf(ti->name, sizeof ti->name, "%d.%s", layer, suffix);
    ti->rank = rank;
    ti->numel = 1;
    for (int i = 0; i < rank; i++) {
        ti->dim[i] = dims[i];
        ti->numel *= (size_t)dims[i];
    }
    ti->offset = *offset;
    *offset += ti->numel;
}

/* Output length of a window (kernel k, stride s, dilation d) sliding over an
 * axis of `in` entries with padding lo before and hi after, as PyTorch
 * computes it, in 64-bit so that no configuration the parser accepts can
 * wrap around; -1 if the effective kernel d*(k-1)+1 exceeds the padded input. */
static int64_t window_out(int64_t in, int64_t k, int64_t s, int64_t lo, int64_t hi, int64_t d,
                          int ceil_mode)
{
    int64_t num = in + lo + hi - (d * (k - 1) + 1);
    if (num < 0)
        return -1;
    int64_t out = (ceil_mode ? (num + s - 1) / s : num / s) + 1;
    /* PyTorch: the last window must start inside the (left-padded) input */
    if (ceil_mode && (out - 1) * s >= in + lo)
        out--;
    return out;
}

/* Output size along axis a (0: height, 1: width) into *out, or a message
 * naming the field: the effective kernel larger than the padded input, or an
 * output that does not fit an int. */
static int axis_out(cv_layer *L, int li, const cv_shape *in, int a, int ceil_mode, int *out,
                    char *err, size_t errlen)
{
    static const char *const axis[2] = {"height", "width"};
    char msg[300];
    int64_t n = in->dim[1 + a], lo = L->padding[a], hi = (int64_t)L->padding[a] + L->pad_extra[a];
    int64_t eff = (int64_t)L->dilation[a] * (L->kernel[a] - 1) + 1;
    int64_t o = window_out(n, L->kernel[a], L->stride[a], lo, hi, L->dilation[a], ceil_mode);
    if (o < 1) {
        snprintf(msg, sizeof msg,
                 "kernel_size[%d]: kernel larger than the padded input: kernel_size %d with "
                 "dilation %d spans %lld, the input %s is %lld with padding %lld+%lld",
                 a, L->kernel[a], L->dilation[a], (long long)eff, axis[a], (long long)n,
                 (long long)lo, (long long)hi);
        return fail(err, errlen, li, L, msg, NULL);
    }
    if (o > INT_MAX) {
        snprintf(msg, sizeof msg, "stride[%d]: output %s %lld does not fit an int", a, axis[a],
                 (long long)o);
        return fail(err, errlen, li, L, msg, NULL);
    }
    *out = (int)o;
    return 0;
}

static int infer_linear(cv_layer *L, int li, const cv_shape *in, char *err, size_t errlen)
{
    char s[64];
    cv_shape_str(in, s, sizeof s);
    if (L->in_features < 1 || L->out_features < 1)
        return fail(err, errlen, li, L, "in_features and out_features must be positive", NULL);
    if (in->rank != 1 || in->dim[0] != L->in_features) {
        char msg[160];
        snprintf(msg, sizeof msg, "expects per-sample input [%d], got %s%s", L->in_features, s,
                 in->rank != 1 ? " (add a Flatten layer before it)" : "");
        return fail(err, errlen, li, L, msg, NULL);
    }
    L->out_shape.rank = 1;
    L->out_shape.dim[0] = L->out_features;
    return 0;
}

static int check_pos2(const int *v, int min)
{
    return v[0] >= min && v[1] >= min;
}

static int infer_conv(cv_layer *L, int li, const cv_shape *in, char *err, size_t errlen)
{
    char s[64], msg[200];
    cv_shape_str(in, s, sizeof s);
    if (L->in_channels < 1 || L->out_channels < 1 || L->groups < 1)
        return fail(err, errlen, li, L, "in_channels, out_channels and groups must be positive",
                    NULL);
    if (L->in_channels % L->groups || L->out_channels % L->groups)
        return fail(err, errlen, li, L,
                    "in_channels and out_channels must be divisible by groups", NULL);
    if (!check_pos2(L->kernel, 1) || !check_pos2(L->stride, 1) || !check_pos2(L->dilation, 1) ||
        !check_pos2(L->padding, 0))
        return fail(err, errlen, li, L,
                    "kernel_size, stride, dilation must be >= 1 and padding >= 0", NULL);
    if (in->rank != 3 || in->dim[0] != L->in_channels) {
        snprintf(msg, sizeof msg, "expects per-sample input [%d, H, W], got %s", L->in_channels,
                 s);
        return fail(err, errlen, li, L, msg, NULL);
    }
    if (L->pad_extra[0] < 0 || L->pad_extra[1] < 0)
        return fail(err, errlen, li, L, "padding: bottom/right padding must be >= 0", NULL);
    int wdims[4] = {L->out_channels, L->in_channels / L->groups, L->kernel[0], L->kernel[1]};
    if (dims_exceed(wdims, 4, INT_MAX)) { /* also bounds the unfolded rows C*kh*kw */
        snprintf(msg, sizeof msg,
                 "kernel_size: the weight [%d, %d, %d, %d] has more than %d entries", wdims[0],
                 wdims[1], wdims[2], wdims[3], INT_MAX);
        return fail(err, errlen, li, L, msg, NULL);
    }
    int oh, ow;
    if (axis_out(L, li, in, 0, 0, &oh, err, errlen) || axis_out(L, li, in, 1, 0, &ow, err, errlen))
        return -1;
    L->out_shape.rank = 3;
    L->out_shape.dim[0] = L->out_channels;
    L->out_shape.dim[1] = oh;
    L->out_shape.dim[2] = ow;
    return 0;
}

static int infer_pool(cv_layer *L, int li, const cv_shape *in, char *err, size_t errlen)
{
    char s[64], msg[200];
    cv_shape_str(in, s, sizeof s);
    if (in->rank != 3) {
        snprintf(msg, sizeof msg, "expects per-sample input [C, H, W], got %s", s);
        return fail(err, errlen, li, L, msg, NULL);
    }
    L->out_shape = *in;
    if (L->type == CV_ADAPTIVEAVGPOOL2D) {
        if (!check_pos2(L->output_size, 1))
            return fail(err, errlen, li, L, "output_size must be positive", NULL);
        L->out_shape.dim[1] = L->output_size[0];
        L->out_shape.dim[2] = L->output_size[1];
        return 0;
    }
    if (L->type == CV_AVGPOOL2D)
        L->dilation[0] = L->dilation[1] = 1;
    if (!check_pos2(L->kernel, 1) || !check_pos2(L->stride, 1) || !check_pos2(L->dilation, 1) ||
        !check_pos2(L->padding, 0))
        return fail(err, errlen, li, L,
                    "kernel_size, stride, dilation must be >= 1 and padding >= 0", NULL);
    if (2 * (int64_t)L->padding[0] > L->kernel[0] || 2 * (int64_t)L->padding[1] > L->kernel[1])
        return fail(err, errlen, li, L, "padding must be at most half of kernel_size", NULL);
    L->pad_extra[0] = L->pad_extra[1] = 0;
    for (int a = 0; a < 2; a++)
        if (axis_out(L, li, in, a, L->ceil_mode, &L->out_shape.dim[1 + a], err, errlen))
            return -1;
    return 0;
}

static int infer_batchnorm(cv_layer *L, int li, const cv_shape *in, char *err, size_t errlen)
{
    char s[64], msg[200];
    cv_shape_str(in, s, sizeof s);
    /* BatchNorm1d: [C] or [C, L] (PyTorch's (N, C) and (N, C, L)); BatchNorm2d: [C, H, W] */
    int want_rank = L->type == CV_BATCHNORM2D ? 3 : in->rank == 2 ? 2 : 1;
    if (L->num_features < 1)
        return fail(err, errlen, li, L, "num_features must be positive", NULL);
    if (!L->track_running_stats)
        return fail(err, errlen, li, L,
                    "track_running_stats=false needs batch statistics (training mode); "
                    "curvd supports evaluation mode only",
                    NULL);
    if (in->rank != want_rank || in->dim[0] != L->num_features) {
        if (want_rank == 3)
            snprintf(msg, sizeof msg, "expects per-sample input [%d, H, W], got %s",
                     L->num_features, s);
        else
            snprintf(msg, sizeof msg, "expects per-sample input [%d] or [%d, L], got %s",
                     L->num_features, L->num_features, s);
        return fail(err, errlen, li, L, msg, NULL);
    }
    L->out_shape = *in;
    return 0;
}

static int infer_flatten(cv_layer *L, int li, const cv_shape *in, char *err, size_t errlen)
{
    /* start_dim/end_dim count the batch dimension as 0, like PyTorch */
    int full_rank = in->rank + 1;
    int sd = L->start_dim < 0 ? L->start_dim + full_rank : L->start_dim;
    int ed = L->end_dim < 0 ? L->end_dim + full_rank : L->end_dim;
    if (sd < 1 || ed >= full_rank || sd > ed)
        return fail(err, errlen, li, L,
                    "start_dim/end_dim must select per-sample dimensions (start_dim >= 1)",
                    NULL);
    cv_shape out = {0, {0}};
    for (int d = 1; d < full_rank; d++) {
        if (d <= sd || d > ed)
            out.dim[out.rank++] = in->dim[d - 1];
        else
            out.dim[out.rank - 1] *= in->dim[d - 1];
    }
    L->out_shape = out;
    return 0;
}

static int infer_shape(cv_layer *L, int li, const cv_shape *in, char *err, size_t errlen)
{
    L->in_shape = *in;
    switch (L->type) {
    case CV_LINEAR: return infer_linear(L, li, in, err, errlen);
    case CV_CONV2D: return infer_conv(L, li, in, err, errlen);
    case CV_MAXPOOL2D:
    case CV_AVGPOOL2D:
    case CV_ADAPTIVEAVGPOOL2D: return infer_pool(L, li, in, err, errlen);
    case CV_BATCHNORM1D:
    case CV_BATCHNORM2D: return infer_batchnorm(L, li, in, err, errlen);
    case CV_FLATTEN: return infer_flatten(L, li, in, err, errlen);
    default:
        if (!cv_layer_is_elementwise(L->type))
            return fail(err, errlen, li, L, "unknown layer type", NULL);
        L->out_shape = *in;
        return 0;
    }
}

static void layout_tensors(cv_layer *L, int li, size_t *poff, size_t *boff)
{
    L->nparams = L->nbuffers = 0;
    int dims[4];
    if (L->type == CV_LINEAR) {
        dims[0] = L->out_features;
        dims[1] = L->in_features;
        add_tensor(L->params, &L->nparams, li, "weight", 2, dims, poff);
        if (L->has_bias)
            add_tensor(L->params, &L->nparams, li, "bias", 1, dims, poff);
    } else if (L->type == CV_CONV2D) {
        dims[0] = L->out_channels;
        dims[1] = L->in_channels / L->groups;
        dims[2] = L->kernel[0];
        dims[3] = L->kernel[1];
        add_tensor(L->params, &L->nparams, li, "weight", 4, dims, poff);
        if (L->has_bias)
            add_tensor(L->params, &L->nparams, li, "bias", 1, dims, poff);
    } else if (L->type == CV_BATCHNORM1D || L->type == CV_BATCHNORM2D) {
        dims[0] = L->num_features;
        if (L->affine) {
            add_tensor(L->params, &L->nparams, li, "weight", 1, dims, poff);
            add_tensor(L->params, &L->nparams, li, "bias", 1, dims, poff);
        }
        add_tensor(L->buffers, &L->nbuffers, li, "running_mean", 1, dims, boff);
        add_tensor(L->buffers, &L->nbuffers, li, "running_var", 1, dims, boff);
        add_tensor(L->buffers, &L->nbuffers, li, "num_batches_tracked", 0, dims, boff);
    }
}

int cv_model_finalize(cv_model *m, char *err, size_t errlen)
{
    if (m->nlayers < 1 || m->nlayers > CV_MAX_LAYERS) {
        snprintf(err, errlen, "layers: need between 1 and %d layers, got %d", CV_MAX_LAYERS,
                 m->nlayers);
        return -1;
    }
    if (m->input_shape.rank < 1 || m->input_shape.rank > 3) {
        snprintf(err, errlen, "input_shape: rank must be 1 ([F]), 2 ([C, L]) or 3 ([C, H, W]), "
                 "got %d", m->input_shape.rank);
        return -1;
    }
    for (int i = 0; i < m->input_shape.rank; i++)
        if (m->input_shape.dim[i] < 1) {
            snprintf(err, errlen, "input_shape[%d]: must be positive, got %d", i,
                     m->input_shape.dim[i]);
            return -1;
        }
    if (dims_exceed(m->input_shape.dim, m->input_shape.rank, CV_MAX_SAMPLE_NUMEL)) {
        snprintf(err, errlen, "input_shape: more than %d entries per sample",
                 CV_MAX_SAMPLE_NUMEL);
        return -1;
    }
    cv_shape cur = m->input_shape;
    size_t poff = 0, boff = 0;
    for (int i = 0; i < m->nlayers; i++) {
        cv_layer *L = &m->layers[i];
        if (infer_shape(L, i, &cur, err, errlen))
            return -1;
        if (dims_exceed(L->out_shape.dim, L->out_shape.rank, CV_MAX_SAMPLE_NUMEL)) {
            char s[64];
            cv_shape_str(&L->out_shape, s, sizeof s);
            snprintf(err, errlen, "layers[%d] (%s): output %s too large (more than %d entries "
                     "per sample)", i, cv_layer_type_name(L->type), s, CV_MAX_SAMPLE_NUMEL);
            return -1;
        }
        layout_tensors(L, i, &poff, &boff);
        for (int t = 0; t < L->nparams; t++)
            if (dims_exceed(L->params[t].dim, L->params[t].rank, INT_MAX) ||
                poff > (size_t)INT_MAX) {
                snprintf(err, errlen, "layers[%d] (%s): parameter %s makes the model larger "
                         "than %d parameters", i, cv_layer_type_name(L->type),
                         L->params[t].name, INT_MAX);
                return -1;
            }
        cur = L->out_shape;
    }
    if (cur.rank != 1) {
        char s[64];
        cv_shape_str(&cur, s, sizeof s);
        snprintf(err, errlen, "the network output must be flat [C] per sample, got %s "
                 "(add Flatten)", s);
        return -1;
    }
    if (m->loss == CV_LOSS_CE && cur.dim[0] < 2) {
        snprintf(err, errlen, "loss: CrossEntropyLoss needs at least 2 output classes, got %d",
                 cur.dim[0]);
        return -1;
    }
    m->nparams_total = poff;
    m->nbuffers_total = boff;
    if (poff == 0) {
        snprintf(err, errlen, "layers: the model has no parameters");
        return -1;
    }
    return 0;
}

int cv_model_alloc(cv_model *m)
{
    m->params = calloc(m->nparams_total ? m->nparams_total : 1, sizeof(float));
    m->buffers = calloc(m->nbuffers_total ? m->nbuffers_total : 1, sizeof(float));
    if (!m->params || !m->buffers) {
        cv_model_free(m);
        return -1;
    }
    return 0;
}

void cv_model_free(cv_model *m)
{
    free(m->params);
    free(m->buffers);
    m->params = NULL;
    m->buffers = NULL;
}

int cv_model_clone(const cv_model *src, cv_model *dst)
{
    *dst = *src;
    dst->params = dst->buffers = NULL;
    if (cv_model_alloc(dst))
        return -1;
    if (src->params)
        memcpy(dst->params, src->params, src->nparams_total * sizeof(float));
    if (src->buffers)
        memcpy(dst->buffers, src->buffers, src->nbuffers_total * sizeof(float));
    return 0;
}

int cv_model_output_dim(const cv_model *m)
{
    return (int)cv_shape_numel(&m->layers[m->nlayers - 1].out_shape);
}

int cv_model_param_count(const cv_model *m)
{
    int n = 0;
    for (int i = 0; i < m->nlayers; i++)
        n += m->layers[i].nparams;
    return n;
}

static const cv_tensor_info *param_at(const cv_model *m, int idx, int *layer)
{
    for (int i = 0; i < m->nlayers; i++) {
        if (idx < m->layers[i].nparams) {
            if (layer)
                *layer = i;
            return &m->layers[i].params[idx];
        }
        idx -= m->layers[i].nparams;
    }
    return NULL;
}

const cv_tensor_info *cv_model_param(const cv_model *m, int i)
{
    return param_at(m, i, NULL);
}

int cv_model_param_layer(const cv_model *m, int i)
{
    int layer = -1;
    param_at(m, i, &layer);
    return layer;
}

int cv_model_find_param(const cv_model *m, const char *name)
{
    int n = cv_model_param_count(m);
    for (int i = 0; i < n; i++)
        if (strcmp(cv_model_param(m, i)->name, name) == 0)
            return i;
    return -1;
}
