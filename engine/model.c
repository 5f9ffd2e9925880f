/* model.c - shape inference and parameter layout of sequential models, by
 * walking each layer's class (engine/layer.h). */
#include "model.h"

#include "layer.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *cv_layer_name(const cv_layer *L)
{
    return L->cls ? L->cls->name : "?";
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

int cv_shape_equal(const cv_shape *a, const cv_shape *b)
{
    if (a->rank != b->rank)
        return 0;
    for (int i = 0; i < a->rank; i++)
        if (a->dim[i] != b->dim[i])
            return 0;
    return 1;
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

/* The node as written (MultiheadAttention, scaled_dot_product_attention)
 * whose expansion layer li belongs to, or NULL. */
static const cv_layer *expanded_from(const cv_model *m, int li)
{
    for (int i = 0; i < m->nmacros; i++)
        if (li >= m->macros[i].first && li <= m->macros[i].last)
            return &m->macros[i].node;
    return NULL;
}

/* Rewrites e, set by a class hook of layer li, to name the layer: field
 * "layers[li]" or "layers[li].<attribute>", message "layers[li] (Name): ...";
 * in a graph "nodes[i]" / "nodes[i] (Name 'node')" with i the node's index. */
static int layer_fail(cv_err *e, const cv_model *m, int li, const cv_layer *L)
{
    if (!e)
        return -1;
    char sub[sizeof e->field], body[sizeof e->message], where[96];
    memcpy(sub, e->field, sizeof sub);
    memcpy(body, e->message, sizeof body);
    if (m->graph)
        snprintf(where, sizeof where, "nodes[%d]", L->src);
    else
        snprintf(where, sizeof where, "layers[%d]", li);
    const cv_layer *node = expanded_from(m, li);
    if (node) /* a primitive of an expanded attention node: name the node as written */
        cv_err_set(e, CV_EINVAL, "invalid_model", NULL, "%s (%s '%s', its %s): %s", where,
                   cv_layer_name(node), node->node, cv_layer_name(L), body);
    else if (m->graph)
        cv_err_set(e, CV_EINVAL, "invalid_model", NULL, "%s (%s '%s'): %s", where,
                   cv_layer_name(L), L->node, body);
    else
        cv_err_set(e, CV_EINVAL, "invalid_model", NULL, "%s (%s): %s", where, cv_layer_name(L),
                   body);
    int n = snprintf(e->field, sizeof e->field, "%s%s%s", where, *sub ? "." : "", sub);
    (void)n; /* a truncated field still names the layer */
    return -1;
}

/* The explicit name "suffix=name" in names for suffix, or NULL. */
static const char *explicit_name(char (*names)[CV_NAME_MAX], const char *suffix)
{
    size_t n = strlen(suffix);
    for (int i = 0; names && i < CV_MAX_NAMED_TENSORS; i++)
        if (strncmp(names[i], suffix, n) == 0 && names[i][n] == '=')
            return names[i] + n + 1;
    return NULL;
}

/* An earlier tensor (layers before li, or slots before `upto` of layer li)
 * of this name among params (buffers when is_buffer), or NULL. */
static const cv_tensor_info *earlier(const cv_model *m, int li, int upto, int is_buffer,
                                     const char *name)
{
    for (int l = 0; l <= li; l++) {
        const cv_layer *L = &m->layers[l];
        const cv_tensor_info *t = is_buffer ? L->buffers : L->params;
        int n = l < li ? (is_buffer ? L->nbuffers : L->nparams) : upto;
        for (int i = 0; i < n; i++)
            if (!t[i].shared && strcmp(t[i].name, name) == 0)
                return &t[i];
    }
    return NULL;
}

/* Gives the tensors a layout hook declared for layer li their state_dict
 * names ("<module>.<suffix>", the module alone for an empty suffix
 * (get_attr), or the explicit name in names) and offsets; a graph tensor
 * whose name an earlier one has is that tensor (shared: same offset), and
 * must have its shape. */
static int place(cv_model *m, int li, int is_buffer, char (*names)[CV_NAME_MAX], size_t *off,
                 cv_err *e)
{
    cv_layer *L = &m->layers[li];
    cv_tensor_info *t = is_buffer ? L->buffers : L->params;
    int count = is_buffer ? L->nbuffers : L->nparams;
    const char *module = L->module;
    for (int i = 0; i < count; i++) {
        t[i].shared = 0;
        char suffix[CV_NAME_MAX];
        memcpy(suffix, t[i].name, sizeof suffix);
        const char *given = explicit_name(names, suffix);
        int w;
        if (given)
            w = snprintf(t[i].name, sizeof t[i].name, "%s", given);
        else if (*module && *suffix)
            w = snprintf(t[i].name, sizeof t[i].name, "%s.%s", module, suffix);
        else
            w = snprintf(t[i].name, sizeof t[i].name, "%s", *module ? module : suffix);
        if (w >= (int)sizeof t[i].name)
            t[i].name[sizeof t[i].name - 1] = 0; /* names are checked shorter by the parser */
        const cv_tensor_info *o = m->graph ? earlier(m, li, i, is_buffer, t[i].name) : NULL;
        if (m->graph && earlier(m, li, is_buffer ? L->nparams : 0, !is_buffer, t[i].name)) {
            cv_err_set(e, CV_EINVAL, "invalid_model", "",
                       "tensor %s is a %s here and a %s in an earlier node", t[i].name,
                       is_buffer ? "buffer" : "parameter", is_buffer ? "parameter" : "buffer");
            return -1;
        }
        if (o && (o->rank != t[i].rank || memcmp(o->dim, t[i].dim, sizeof o->dim) != 0)) {
            char a[64], b[64];
            cv_dims_str(o->dim, o->rank, a, sizeof a);
            cv_dims_str(t[i].dim, t[i].rank, b, sizeof b);
            cv_err_set(e, CV_EINVAL, "invalid_model", "",
                       "tensor %s is shared with an earlier node that has it as %s, here %s",
                       t[i].name, a, b);
            return -1;
        }
        if (o) {
            t[i].offset = o->offset;
            t[i].shared = 1;
            continue;
        }
        t[i].offset = *off;
        *off += t[i].numel;
    }
    return 0;
}

/* Every tensor a node names in "params" is one of its class's (by suffix). */
static int check_named(const cv_layer *L, cv_err *e)
{
    for (int i = 0; i < CV_MAX_NAMED_TENSORS && L->pnames[i][0]; i++) {
        const char *eq = strchr(L->pnames[i], '=');
        size_t n = eq ? (size_t)(eq - L->pnames[i]) : strlen(L->pnames[i]);
        int found = 0;
        for (int t = 0; t < L->nparams + L->nbuffers && !found; t++) {
            const char *nm = t < L->nparams ? L->params[t].name : L->buffers[t - L->nparams].name;
            found = eq && strcmp(nm, eq + 1) == 0;
        }
        if (!found) {
            cv_err_set(e, CV_EINVAL, "invalid_model", "params",
                       "params.%.*s: %s has no tensor '%.*s'", (int)n, L->pnames[i],
                       cv_layer_name(L), (int)n, L->pnames[i]);
            return -1;
        }
    }
    return 0;
}

/* Wires layer li: a Sequential layer reads the previous one; a graph layer's
 * inputs must come from earlier layers and match its class's arity. */
static int wire_layer(cv_model *m, int li, cv_err *e)
{
    cv_layer *L = &m->layers[li];
    if (!m->graph) {
        L->nin = 1;
        L->in[0] = li;
        snprintf(L->module, sizeof L->module, "%d", li);
    }
    int lo = L->cls->min_inputs, hi = L->cls->max_inputs;
    if (!lo && !hi) /* one input, or none for a class with only multi-input kernels */
        lo = hi = L->cls->ops->vjp_n && !L->cls->ops->vjp ? 0 : 1;
    if (L->nin < lo || L->nin > hi) {
        if (lo == hi)
            cv_err_set(e, CV_EINVAL, "invalid_model", "args", "args: takes %d input%s, got %d",
                       lo, lo == 1 ? "" : "s", L->nin);
        else
            cv_err_set(e, CV_EINVAL, "invalid_model", "args",
                       "args: takes %d to %d inputs, got %d", lo, hi, L->nin);
        return -1;
    }
    for (int i = 0; i < L->nin; i++) {
        if (L->in[i] < 0 || L->in[i] > li) {
            cv_err_set(e, CV_EINVAL, "invalid_model", "args",
                       "args[%d]: reads a value not computed before this node", i);
            return -1;
        }
        L->in_shapes[i] = L->in[i] ? m->layers[L->in[i] - 1].out_shape : m->input_shape;
    }
    if (L->nin)
        L->in_shape = L->in_shapes[0];
    return 0;
}

/* Shape and tensor layout of layer li. */
static int finalize_layer(cv_model *m, int li, size_t *poff, size_t *boff, cv_err *e)
{
    cv_layer *L = &m->layers[li];
    if (!L->cls || !L->cls->ops) {
        cv_err_set(e, CV_EINVAL, "invalid_model", "", "unknown layer type");
        return layer_fail(e, m, li, L);
    }
    if (wire_layer(m, li, e))
        return layer_fail(e, m, li, L);
    if (!L->cls->infer)
        L->out_shape = L->in_shape;
    else if (L->cls->infer(L, L->in_shapes, e))
        return layer_fail(e, m, li, L);
    if (dims_exceed(L->out_shape.dim, L->out_shape.rank, CV_MAX_SAMPLE_NUMEL)) {
        char s[64];
        cv_shape_str(&L->out_shape, s, sizeof s);
        cv_err_set(e, CV_EINVAL, "invalid_model", "",
                   "output %s too large (more than %d entries per sample)", s,
                   CV_MAX_SAMPLE_NUMEL);
        return layer_fail(e, m, li, L);
    }
    L->nparams = L->nbuffers = 0;
    if (L->cls->layout && L->cls->layout(L)) {
        cv_err_set(e, CV_EINVAL, "invalid_model", "", "more tensors than a layer may have");
        return layer_fail(e, m, li, L);
    }
    if (place(m, li, 0, L->pnames, poff, e) || place(m, li, 1, L->pnames, boff, e) ||
        check_named(L, e))
        return layer_fail(e, m, li, L);
    for (int t = 0; t < L->nparams; t++)
        if (dims_exceed(L->params[t].dim, L->params[t].rank, INT_MAX) ||
            *poff > (size_t)INT_MAX) {
            cv_err_set(e, CV_EINVAL, "invalid_model", "",
                       "parameter %s makes the model larger than %d parameters",
                       L->params[t].name, INT_MAX);
            return layer_fail(e, m, li, L);
        }
    return 0;
}

int cv_model_finalize(cv_model *m, cv_err *e)
{
    if (m->nlayers < 1 || m->nlayers > CV_MAX_LAYERS)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "layers",
                          "layers: need between 1 and %d layers, got %d", CV_MAX_LAYERS,
                          m->nlayers);
    if (m->input_shape.rank < 1 || m->input_shape.rank > 3)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "input_shape",
                          "input_shape: rank must be 1 ([F]), 2 ([C, L]) or 3 ([C, H, W]), "
                          "got %d", m->input_shape.rank);
    for (int i = 0; i < m->input_shape.rank; i++)
        if (m->input_shape.dim[i] < 1) {
            char field[32];
            snprintf(field, sizeof field, "input_shape[%d]", i);
            return cv_err_set(e, CV_EINVAL, "invalid_model", field,
                              "input_shape[%d]: must be positive, got %d", i,
                              m->input_shape.dim[i]);
        }
    if (dims_exceed(m->input_shape.dim, m->input_shape.rank, CV_MAX_SAMPLE_NUMEL))
        return cv_err_set(e, CV_EINVAL, "invalid_model", "input_shape",
                          "input_shape: more than %d entries per sample", CV_MAX_SAMPLE_NUMEL);
    size_t poff = 0, boff = 0;
    for (int i = 0; i < m->nlayers; i++)
        if (finalize_layer(m, i, &poff, &boff, e))
            return -1;
    cv_shape cur = m->layers[m->nlayers - 1].out_shape;
    const cv_layer *last = &m->layers[m->nlayers - 1];
    if (m->loss == CV_LOSS_NLL && strcmp(cv_layer_name(last), "log_softmax") != 0)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "loss",
                          "loss: NLLLoss needs the network to end in log_softmax over the class "
                          "dimension (it ends in %s); or use CrossEntropyLoss on the logits",
                          cv_layer_name(last));
    int classes = cur.dim[m->class_dim == -1 ? cur.rank - 1 : 0];
    if ((m->loss == CV_LOSS_CE || m->loss == CV_LOSS_NLL) && classes < 2)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "loss",
                          "loss: CrossEntropyLoss needs at least 2 output classes, got %d",
                          classes);
    m->nparams_total = poff;
    m->nbuffers_total = boff;
    if (poff == 0)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "layers",
                          "layers: the model has no parameters");
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
        for (int j = 0; j < m->layers[i].nparams; j++)
            n += !m->layers[i].params[j].shared;
    return n;
}

static const cv_tensor_info *param_at(const cv_model *m, int idx, int *layer)
{
    for (int i = 0; i < m->nlayers; i++)
        for (int j = 0; j < m->layers[i].nparams; j++) {
            if (m->layers[i].params[j].shared)
                continue;
            if (idx-- == 0) {
                if (layer)
                    *layer = i;
                return &m->layers[i].params[j];
            }
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
