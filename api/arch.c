/* arch.c - architecture JSON parsing/validation into cv_model and back. */
#include "api/arch.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define INT_LIMIT (1 << 24) /* sizes beyond this are certainly a mistake */
#define NO_DEFAULT INT_MIN

/* ---- paths and messages ------------------------------------------------ */

/* buf = "obj.key" (or "key"), truncated to len. */
static void join(char *buf, size_t len, const char *obj, const char *key)
{
    size_t used = 0;
    const char *parts[3] = {obj && *obj ? obj : "", obj && *obj ? "." : "", key};
    for (int i = 0; i < 3; i++)
        for (const char *p = parts[i]; *p && used + 1 < len; p++)
            buf[used++] = *p;
    if (len)
        buf[used] = 0;
}

static const char *json_kind(const cJSON *v, char *buf, size_t len)
{
    if (!v)
        return "nothing";
    if (cJSON_IsNull(v))
        return "null";
    if (cJSON_IsBool(v))
        return cJSON_IsTrue(v) ? "true" : "false";
    if (cJSON_IsNumber(v)) {
        snprintf(buf, len, "%.17g", v->valuedouble);
        return buf;
    }
    if (cJSON_IsString(v)) {
        snprintf(buf, len, "string \"%.40s\"", v->valuestring);
        return buf;
    }
    if (cJSON_IsArray(v))
        return "a list";
    if (cJSON_IsObject(v))
        return "an object";
    return "an invalid value";
}

static int bad(cv_err *e, const char *code, const char *path, const char *what,
               const cJSON *got)
{
    char k[80];
    if (got)
        return cv_err_set(e, CV_EINVAL, code, path, "%s: %s, got %s", path, what,
                          json_kind(got, k, sizeof k));
    return cv_err_set(e, CV_EINVAL, code, path, "%s: %s", path, what);
}

/* Levenshtein distance, capped; for "did you mean" hints. */
static int edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 40 || lb > 40)
        return 99;
    int row[41];
    for (size_t j = 0; j <= lb; j++)
        row[j] = (int)j;
    for (size_t i = 1; i <= la; i++) {
        int prev = row[0];
        row[0] = (int)i;
        for (size_t j = 1; j <= lb; j++) {
            int cur = row[j];
            int best = prev + (a[i - 1] != b[j - 1]);
            if (row[j] + 1 < best)
                best = row[j] + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            prev = cur;
        }
    }
    return row[lb];
}

/* Rejects keys of o not in allowed (NULL-terminated) and duplicate keys. */
static int check_keys(const cJSON *o, const char *obj, const char *what,
                      const char *const *allowed, cv_err *e)
{
    char path[160];
    for (const cJSON *c = o->child; c; c = c->next) {
        join(path, sizeof path, obj, c->string);
        for (const cJSON *d = o->child; d != c; d = d->next)
            if (strcmp(d->string, c->string) == 0)
                return cv_err_set(e, CV_EINVAL, "duplicate_field", path,
                                  "%s: field given twice", path);
        int ok = 0;
        for (int i = 0; allowed[i]; i++)
            if (strcmp(allowed[i], c->string) == 0)
                ok = 1;
        if (ok)
            continue;
        char known[400] = "", hint[96] = "";
        size_t used = 0;
        int best = 99;
        for (int i = 0; allowed[i]; i++) {
            if (strcmp(allowed[i], "type") != 0 && used < sizeof known)
                used += (size_t)snprintf(known + used, sizeof known - used, "%s%s",
                                         used ? ", " : "", allowed[i]);
            int dist = edit_distance(c->string, allowed[i]);
            if (dist < best && dist <= 2) {
                best = dist;
                snprintf(hint, sizeof hint, "; did you mean '%s'?", allowed[i]);
            }
        }
        return cv_err_set(e, CV_EINVAL, "unknown_field", path,
                          "%s: unknown field for %s (known: %s)%s", path, what,
                          used ? known : "none", hint);
    }
    return 0;
}

/* ---- typed getters ------------------------------------------------------ */

static int as_int(const cJSON *v, const char *path, int min, int *out, cv_err *e)
{
    char what[96];
    if (min > -INT_LIMIT)
        snprintf(what, sizeof what, "must be an integer >= %d", min);
    else
        snprintf(what, sizeof what, "must be an integer");
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble))
        return bad(e, "invalid_type", path, what, v);
    double d = v->valuedouble;
    if (d < min)
        return bad(e, "invalid_value", path, what, v);
    if (fabs(d) > INT_LIMIT) {
        snprintf(what, sizeof what, "is too large (limit %d)", INT_LIMIT);
        return bad(e, "invalid_value", path, what, v);
    }
    *out = (int)d;
    return 0;
}

static int get_int(const cJSON *o, const char *obj, const char *key, int min, int def, int *out,
                   cv_err *e)
{
    char path[160];
    join(path, sizeof path, obj, key);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v) {
        if (def == NO_DEFAULT)
            return bad(e, "missing_field", path, "required field is missing", NULL);
        *out = def;
        return 0;
    }
    return as_int(v, path, min, out, e);
}

/* An int or a list of two ints ([h, w]). */
static int as_pair(const cJSON *v, const char *path, int min, int out[2], cv_err *e)
{
    if (cJSON_IsArray(v)) {
        char p[176];
        if (cJSON_GetArraySize(v) != 2)
            return bad(e, "invalid_value", path, "must be an integer or a list of 2 integers",
                       v);
        snprintf(p, sizeof p, "%s[0]", path);
        if (as_int(v->child, p, min, &out[0], e))
            return -1;
        snprintf(p, sizeof p, "%s[1]", path);
        return as_int(v->child->next, p, min, &out[1], e);
    }
    if (!cJSON_IsNumber(v))
        return bad(e, "invalid_type", path, "must be an integer or a list of 2 integers", v);
    if (as_int(v, path, min, &out[0], e))
        return -1;
    out[1] = out[0];
    return 0;
}

static int get_pair(const cJSON *o, const char *obj, const char *key, int min, int def,
                    int out[2], cv_err *e)
{
    char path[160];
    join(path, sizeof path, obj, key);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v) {
        if (def == NO_DEFAULT)
            return bad(e, "missing_field", path, "required field is missing", NULL);
        out[0] = out[1] = def;
        return 0;
    }
    return as_pair(v, path, min, out, e);
}

static int get_bool(const cJSON *o, const char *obj, const char *key, int def, int *out,
                    cv_err *e)
{
    char path[160];
    join(path, sizeof path, obj, key);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsBool(v))
        return bad(e, "invalid_type", path, "must be true or false", v);
    *out = cJSON_IsTrue(v) ? 1 : 0;
    return 0;
}

/* A number in [lo, hi]; lo_open excludes lo. */
static int get_num(const cJSON *o, const char *obj, const char *key, double def, double lo,
                   int lo_open, double hi, double *out, cv_err *e)
{
    char path[160], what[96];
    join(path, sizeof path, obj, key);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
        return bad(e, "invalid_type", path, "must be a number", v);
    double x = v->valuedouble;
    if (x < lo || (lo_open && x == lo) || x > hi) {
        if (isinf(hi))
            snprintf(what, sizeof what, "must be %s %g", lo_open ? ">" : ">=", lo);
        else
            snprintf(what, sizeof what, "must be in %s%g, %g]", lo_open ? "(" : "[", lo, hi);
        return bad(e, "invalid_value", path, what, v);
    }
    *out = x;
    return 0;
}

/* Field that must be absent, or equal to the one accepted value (as JSON). */
static int get_fixed_bool(const cJSON *o, const char *obj, const char *key, int accepted,
                          const char *why, cv_err *e)
{
    int v;
    char path[160];
    if (get_bool(o, obj, key, accepted, &v, e))
        return -1;
    join(path, sizeof path, obj, key);
    if (v != accepted)
        return cv_err_set(e, CV_EINVAL, "unsupported", path, "%s: %s is not supported: %s",
                          path, v ? "true" : "false", why);
    return 0;
}

/* ---- layers ------------------------------------------------------------ */

static const char *const K_LINEAR[] = {"type", "in_features", "out_features", "bias", NULL};
static const char *const K_CONV[] = {"type",   "in_channels", "out_channels", "kernel_size",
                                     "stride", "padding",     "dilation",     "groups",
                                     "bias",   "padding_mode", NULL};
static const char *const K_INPLACE[] = {"type", "inplace", NULL};
static const char *const K_NONE[] = {"type", NULL};
static const char *const K_LEAKY[] = {"type", "negative_slope", "inplace", NULL};
static const char *const K_ELU[] = {"type", "alpha", "inplace", NULL};
static const char *const K_GELU[] = {"type", "approximate", NULL};
static const char *const K_SOFTPLUS[] = {"type", "beta", "threshold", NULL};
static const char *const K_FLATTEN[] = {"type", "start_dim", "end_dim", NULL};
static const char *const K_MAXPOOL[] = {"type",     "kernel_size", "stride",         "padding",
                                        "dilation", "ceil_mode",   "return_indices", NULL};
static const char *const K_AVGPOOL[] = {"type",      "kernel_size",       "stride",
                                        "padding",   "ceil_mode",         "count_include_pad",
                                        "divisor_override", NULL};
static const char *const K_ADAPTIVE[] = {"type", "output_size", NULL};
static const char *const K_BN[] = {"type",   "num_features",        "eps",      "momentum",
                                   "affine", "track_running_stats", "training", NULL};
static const char *const K_DROPOUT[] = {"type", "p", "inplace", "training", NULL};

static const char *const *allowed_keys(cv_layer_type t)
{
    switch (t) {
    case CV_LINEAR: return K_LINEAR;
    case CV_CONV2D: return K_CONV;
    case CV_RELU: return K_INPLACE;
    case CV_LEAKYRELU: return K_LEAKY;
    case CV_ELU: return K_ELU;
    case CV_GELU: return K_GELU;
    case CV_SOFTPLUS: return K_SOFTPLUS;
    case CV_FLATTEN: return K_FLATTEN;
    case CV_MAXPOOL2D: return K_MAXPOOL;
    case CV_AVGPOOL2D: return K_AVGPOOL;
    case CV_ADAPTIVEAVGPOOL2D: return K_ADAPTIVE;
    case CV_BATCHNORM1D:
    case CV_BATCHNORM2D: return K_BN;
    case CV_DROPOUT: return K_DROPOUT;
    default: return K_NONE; /* Tanh, Sigmoid, Identity */
    }
}

static int parse_conv_padding(const cJSON *o, const char *obj, cv_layer *L, cv_err *e)
{
    char path[160];
    join(path, sizeof path, obj, "padding");
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, "padding");
    if (!v) {
        L->padding[0] = L->padding[1] = 0;
        return 0;
    }
    if (!cJSON_IsString(v))
        return as_pair(v, path, 0, L->padding, e);
    if (strcmp(v->valuestring, "valid") == 0) {
        L->padding[0] = L->padding[1] = 0;
        return 0;
    }
    if (strcmp(v->valuestring, "same") != 0)
        return bad(e, "invalid_value", path,
                   "must be an integer, [ph, pw], \"valid\" or \"same\"", v);
    if (L->stride[0] != 1 || L->stride[1] != 1)
        return cv_err_set(e, CV_EINVAL, "invalid_value", path,
                          "%s: padding='same' is not supported for strided convolutions "
                          "(as in PyTorch)", path);
    /* PyTorch: total padding d*(k-1), total//2 on the top/left and the rest
     * (one more for an even effective kernel) on the bottom/right */
    for (int a = 0; a < 2; a++) {
        int64_t total = (int64_t)L->dilation[a] * (L->kernel[a] - 1);
        if (total - total / 2 > INT_LIMIT)
            return cv_err_set(e, CV_EINVAL, "invalid_value", path,
                              "%s: padding='same' with kernel_size %d and dilation %d needs "
                              "padding %lld, too large (limit %d)", path, L->kernel[a],
                              L->dilation[a], (long long)(total - total / 2), INT_LIMIT);
        L->padding[a] = (int)(total / 2);
        L->pad_extra[a] = (int)(total % 2);
    }
    return 0;
}

static int parse_layer_fields(const cJSON *o, const char *obj, cv_layer *L, cv_err *e)
{
    char path[160];
    const cJSON *v;
    switch (L->type) {
    case CV_LINEAR:
        if (get_int(o, obj, "in_features", 1, NO_DEFAULT, &L->in_features, e) ||
            get_int(o, obj, "out_features", 1, NO_DEFAULT, &L->out_features, e) ||
            get_bool(o, obj, "bias", 1, &L->has_bias, e))
            return -1;
        return 0;
    case CV_CONV2D:
        if (get_int(o, obj, "in_channels", 1, NO_DEFAULT, &L->in_channels, e) ||
            get_int(o, obj, "out_channels", 1, NO_DEFAULT, &L->out_channels, e) ||
            get_pair(o, obj, "kernel_size", 1, NO_DEFAULT, L->kernel, e) ||
            get_pair(o, obj, "stride", 1, 1, L->stride, e) ||
            get_pair(o, obj, "dilation", 1, 1, L->dilation, e) ||
            parse_conv_padding(o, obj, L, e) ||
            get_int(o, obj, "groups", 1, 1, &L->groups, e) ||
            get_bool(o, obj, "bias", 1, &L->has_bias, e))
            return -1;
        join(path, sizeof path, obj, "padding_mode");
        v = cJSON_GetObjectItemCaseSensitive(o, "padding_mode");
        if (v && !cJSON_IsString(v))
            return bad(e, "invalid_type", path, "must be a string", v);
        if (v && strcmp(v->valuestring, "zeros") != 0)
            return cv_err_set(e, CV_EINVAL, "unsupported", path,
                              "%s: padding_mode '%.40s' is not supported (only \"zeros\")", path,
                              v->valuestring);
        if (L->in_channels % L->groups || L->out_channels % L->groups) {
            join(path, sizeof path, obj, "groups");
            return cv_err_set(e, CV_EINVAL, "invalid_value", path,
                              "%s: in_channels (%d) and out_channels (%d) must be divisible by "
                              "groups (%d)", path, L->in_channels, L->out_channels, L->groups);
        }
        return 0;
    case CV_RELU:
    case CV_DROPOUT:
    case CV_LEAKYRELU:
    case CV_ELU: {
        int inplace;
        if (get_bool(o, obj, "inplace", 0, &inplace, e)) /* accepted, ignored */
            return -1;
        if (L->type == CV_LEAKYRELU)
            return get_num(o, obj, "negative_slope", 0.01, -INFINITY, 0, INFINITY,
                           &L->negative_slope, e);
        if (L->type == CV_ELU)
            return get_num(o, obj, "alpha", 1.0, -INFINITY, 0, INFINITY, &L->alpha, e);
        if (L->type == CV_DROPOUT) {
            if (get_num(o, obj, "p", 0.5, 0.0, 0, 1.0, &L->p, e) ||
                get_fixed_bool(o, obj, "training", 0,
                               "curvd evaluates models in evaluation mode, where Dropout is "
                               "the identity", e))
                return -1;
        }
        return 0;
    }
    case CV_GELU:
        join(path, sizeof path, obj, "approximate");
        v = cJSON_GetObjectItemCaseSensitive(o, "approximate");
        L->gelu_tanh = 0;
        if (!v)
            return 0;
        if (cJSON_IsString(v) && strcmp(v->valuestring, "none") == 0)
            return 0;
        if (cJSON_IsString(v) && strcmp(v->valuestring, "tanh") == 0) {
            L->gelu_tanh = 1;
            return 0;
        }
        return bad(e, cJSON_IsString(v) ? "invalid_value" : "invalid_type", path,
                   "must be \"none\" or \"tanh\"", v);
    case CV_SOFTPLUS:
        if (get_num(o, obj, "beta", 1.0, -INFINITY, 0, INFINITY, &L->beta, e) ||
            get_num(o, obj, "threshold", 20.0, -INFINITY, 0, INFINITY, &L->threshold, e))
            return -1;
        if (L->beta == 0) {
            join(path, sizeof path, obj, "beta");
            return cv_err_set(e, CV_EINVAL, "invalid_value", path, "%s: must not be 0", path);
        }
        return 0;
    case CV_FLATTEN:
        if (get_int(o, obj, "start_dim", -INT_LIMIT, 1, &L->start_dim, e) ||
            get_int(o, obj, "end_dim", -INT_LIMIT, -1, &L->end_dim, e))
            return -1;
        if (L->start_dim == 0) {
            join(path, sizeof path, obj, "start_dim");
            return cv_err_set(e, CV_EINVAL, "invalid_value", path,
                              "%s: 0 would flatten the batch dimension; use start_dim >= 1",
                              path);
        }
        return 0;
    case CV_MAXPOOL2D:
    case CV_AVGPOOL2D:
        if (get_pair(o, obj, "kernel_size", 1, NO_DEFAULT, L->kernel, e))
            return -1;
        v = cJSON_GetObjectItemCaseSensitive(o, "stride");
        join(path, sizeof path, obj, "stride");
        if (!v || cJSON_IsNull(v)) { /* PyTorch: stride=None means kernel_size */
            L->stride[0] = L->kernel[0];
            L->stride[1] = L->kernel[1];
        } else if (as_pair(v, path, 1, L->stride, e)) {
            return -1;
        }
        if (get_pair(o, obj, "padding", 0, 0, L->padding, e) ||
            get_bool(o, obj, "ceil_mode", 0, &L->ceil_mode, e))
            return -1;
        for (int a = 0; a < 2; a++)
            if (2 * L->padding[a] > L->kernel[a]) {
                join(path, sizeof path, obj, "padding");
                return cv_err_set(e, CV_EINVAL, "invalid_value", path,
                                  "%s: must be at most half of kernel_size (%d > %d / 2), as in "
                                  "PyTorch", path, L->padding[a], L->kernel[a]);
            }
        if (L->type == CV_MAXPOOL2D) {
            L->count_include_pad = 0;
            if (get_pair(o, obj, "dilation", 1, 1, L->dilation, e) ||
                get_fixed_bool(o, obj, "return_indices", 0,
                               "a layer in Sequential must return one tensor", e))
                return -1;
            return 0;
        }
        L->dilation[0] = L->dilation[1] = 1;
        if (get_bool(o, obj, "count_include_pad", 1, &L->count_include_pad, e))
            return -1;
        v = cJSON_GetObjectItemCaseSensitive(o, "divisor_override");
        if (v && !cJSON_IsNull(v)) {
            join(path, sizeof path, obj, "divisor_override");
            return bad(e, "unsupported", path, "is not supported (must be null)", v);
        }
        return 0;
    case CV_ADAPTIVEAVGPOOL2D:
        join(path, sizeof path, obj, "output_size");
        v = cJSON_GetObjectItemCaseSensitive(o, "output_size");
        if (!v)
            return bad(e, "missing_field", path, "required field is missing", NULL);
        if (cJSON_IsArray(v))
            for (const cJSON *c = v->child; c; c = c->next)
                if (cJSON_IsNull(c))
                    return cv_err_set(e, CV_EINVAL, "unsupported", path,
                                      "%s: None entries are not supported; give both sizes",
                                      path);
        return as_pair(v, path, 1, L->output_size, e);
    case CV_BATCHNORM1D:
    case CV_BATCHNORM2D:
        if (get_int(o, obj, "num_features", 1, NO_DEFAULT, &L->num_features, e) ||
            get_num(o, obj, "eps", 1e-5, 0.0, 1, INFINITY, &L->eps, e) ||
            get_bool(o, obj, "affine", 1, &L->affine, e) ||
            get_fixed_bool(o, obj, "track_running_stats", 1,
                           "evaluation mode normalizes with the running statistics", e) ||
            get_fixed_bool(o, obj, "training", 0,
                           "curvd evaluates BatchNorm in evaluation mode (running "
                           "statistics); set \"training\": false or omit it", e))
            return -1;
        L->track_running_stats = 1;
        v = cJSON_GetObjectItemCaseSensitive(o, "momentum"); /* ignored in evaluation mode */
        if (v && !cJSON_IsNull(v) && !cJSON_IsNumber(v)) {
            join(path, sizeof path, obj, "momentum");
            return bad(e, "invalid_type", path, "must be a number or null", v);
        }
        return 0;
    default: /* Tanh, Sigmoid, Identity: no attributes */
        return 0;
    }
}

static int parse_layer(const cJSON *o, const char *obj, cv_layer *L, cv_err *e)
{
    char path[160];
    if (!cJSON_IsObject(o))
        return bad(e, "invalid_type", obj, "each layer must be an object with a \"type\"", o);
    join(path, sizeof path, obj, "type");
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(o, "type");
    if (!t)
        return bad(e, "missing_field", path, "required field is missing", NULL);
    if (!cJSON_IsString(t))
        return bad(e, "invalid_type", path, "must be a layer type name", t);
    int type = cv_layer_type_from_name(t->valuestring);
    if (type < 0) {
        char known[400] = "";
        size_t used = 0;
        for (int i = 0; i < CV_LAYER_TYPE_COUNT && used < sizeof known; i++)
            used += (size_t)snprintf(known + used, sizeof known - used, "%s%s", i ? ", " : "",
                                     cv_layer_type_name((cv_layer_type)i));
        return cv_err_set(e, CV_EINVAL, "unknown_layer_type", path,
                          "%s: unknown layer type '%.60s' (supported: %s)", path, t->valuestring,
                          known);
    }
    memset(L, 0, sizeof *L);
    L->type = (cv_layer_type)type;
    L->kernel[0] = L->kernel[1] = 1;
    L->stride[0] = L->stride[1] = 1;
    L->dilation[0] = L->dilation[1] = 1;
    L->groups = 1;
    if (check_keys(o, obj, t->valuestring, allowed_keys(L->type), e))
        return -1;
    return parse_layer_fields(o, obj, L, e);
}

/* ---- document ---------------------------------------------------------- */

static const char *const K_TOP[] = {"input_shape", "layers", "loss", NULL};
static const char *const K_LOSS[] = {"type", "reduction", NULL};

static int parse_loss(const cJSON *o, const char *obj, cv_model *m, cv_err *e)
{
    char path[160];
    if (!o)
        return bad(e, "missing_field", obj, "required field is missing (e.g. {\"type\": "
                   "\"CrossEntropyLoss\"})", NULL);
    if (!cJSON_IsObject(o))
        return bad(e, "invalid_type", obj, "must be an object {\"type\", \"reduction\"}", o);
    if (check_keys(o, obj, "loss", K_LOSS, e))
        return -1;
    join(path, sizeof path, obj, "type");
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(o, "type");
    if (!t)
        return bad(e, "missing_field", path, "required field is missing", NULL);
    if (!cJSON_IsString(t))
        return bad(e, "invalid_type", path, "must be a loss name", t);
    if (strcmp(t->valuestring, "MSELoss") == 0)
        m->loss = CV_LOSS_MSE;
    else if (strcmp(t->valuestring, "CrossEntropyLoss") == 0)
        m->loss = CV_LOSS_CE;
    else if (strcmp(t->valuestring, "BCEWithLogitsLoss") == 0)
        m->loss = CV_LOSS_BCE;
    else
        return cv_err_set(e, CV_EINVAL, "unknown_loss", path,
                          "%s: unknown loss '%.60s' (supported: MSELoss, CrossEntropyLoss, "
                          "BCEWithLogitsLoss)", path, t->valuestring);
    join(path, sizeof path, obj, "reduction");
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(o, "reduction");
    m->reduction = CV_RED_MEAN;
    if (!r)
        return 0;
    if (!cJSON_IsString(r))
        return bad(e, "invalid_type", path, "must be \"mean\" or \"sum\"", r);
    if (strcmp(r->valuestring, "mean") == 0)
        return 0;
    if (strcmp(r->valuestring, "sum") == 0) {
        m->reduction = CV_RED_SUM;
        return 0;
    }
    if (strcmp(r->valuestring, "none") == 0)
        return cv_err_set(e, CV_EINVAL, "unsupported", path,
                          "%s: \"none\" is not supported: curvature needs a scalar loss (use "
                          "\"mean\" or \"sum\")", path);
    return bad(e, "invalid_value", path, "must be \"mean\" or \"sum\"", r);
}

/* The attribute a finalize message names after its layer: "layers[2] (Conv2d):
 * kernel_size[0]: ..." -> "kernel_size"; "" if none. */
static void finalize_attr(const char *rest, char *attr, size_t len)
{
    *attr = 0;
    if (strncmp(rest, " (", 2) == 0) {
        const char *close = strchr(rest, ')');
        if (!close)
            return;
        rest = close + 1;
    }
    if (strncmp(rest, ": ", 2) != 0)
        return;
    rest += 2;
    size_t n = strspn(rest, "abcdefghijklmnopqrstuvwxyz_");
    if (n == 0 || n >= len || (rest[n] != ':' && rest[n] != '['))
        return;
    memcpy(attr, rest, n);
    attr[n] = 0;
}

/* "layers[2] (Linear): ..." -> "layers[2]"; "input_shape[0]: ..." -> "input_shape[0]";
 * "layers[1] (Conv2d): kernel_size[0]: ..." -> "layers[1].kernel_size". */
static void finalize_field(const char *msg, const char *prefix, char *out, size_t len)
{
    size_t n = strcspn(msg, " :(");
    char head[160], attr[40] = "";
    if (n == 0 || n >= 96 || (strncmp(msg, "layers", 6) != 0 &&
                              strncmp(msg, "input_shape", 11) != 0 &&
                              strncmp(msg, "loss", 4) != 0)) {
        snprintf(head, sizeof head, "layers");
    } else {
        memcpy(head, msg, n);
        head[n] = 0;
        if (strncmp(msg, "layers[", 7) == 0)
            finalize_attr(msg + n, attr, sizeof attr);
        if (*attr)
            snprintf(head + n, sizeof head - n, ".%s", attr);
    }
    join(out, len, prefix, head);
}

int cv_arch_from_json(const cJSON *doc, const char *prefix, cv_model *m, cv_err *e)
{
    const char *pre = prefix ? prefix : "";
    char path[160], obj[160];
    memset(m, 0, sizeof *m);
    if (!cJSON_IsObject(doc))
        return bad(e, "invalid_type", *pre ? pre : "architecture",
                   "the architecture must be a JSON object with input_shape, layers and loss",
                   doc);
    if (check_keys(doc, pre, "the architecture", K_TOP, e))
        return -1;

    join(path, sizeof path, pre, "input_shape");
    const cJSON *is = cJSON_GetObjectItemCaseSensitive(doc, "input_shape");
    if (!is)
        return bad(e, "missing_field", path, "required field is missing (e.g. [1, 28, 28])",
                   NULL);
    if (!cJSON_IsArray(is))
        return bad(e, "invalid_type", path, "must be a list of positive integers", is);
    int rank = cJSON_GetArraySize(is);
    if (rank < 1 || rank > CV_MAX_RANK)
        return cv_err_set(e, CV_EINVAL, "invalid_value", path,
                          "%s: must have 1 to %d dimensions (per sample, without the batch "
                          "dimension), got %d", path, CV_MAX_RANK, rank);
    int i = 0;
    for (const cJSON *c = is->child; c; c = c->next, i++) {
        char p[176];
        snprintf(p, sizeof p, "%s[%d]", path, i);
        if (as_int(c, p, 1, &m->input_shape.dim[i], e))
            return -1;
    }
    m->input_shape.rank = rank;

    join(path, sizeof path, pre, "layers");
    const cJSON *ls = cJSON_GetObjectItemCaseSensitive(doc, "layers");
    if (!ls)
        return bad(e, "missing_field", path, "required field is missing", NULL);
    if (!cJSON_IsArray(ls))
        return bad(e, "invalid_type", path, "must be a list of layer objects", ls);
    int n = cJSON_GetArraySize(ls);
    if (n < 1 || n > CV_MAX_LAYERS)
        return cv_err_set(e, n < 1 ? CV_EINVAL : CV_ETOOLARGE,
                          n < 1 ? "invalid_value" : "too_large", path,
                          "%s: need between 1 and %d layers, got %d", path, CV_MAX_LAYERS, n);
    i = 0;
    for (const cJSON *c = ls->child; c; c = c->next, i++) {
        if (snprintf(obj, sizeof obj, "%s[%d]", path, i) >= (int)sizeof obj)
            obj[sizeof obj - 1] = 0;
        if (parse_layer(c, obj, &m->layers[i], e))
            return -1;
    }
    m->nlayers = n;

    join(path, sizeof path, pre, "loss");
    if (parse_loss(cJSON_GetObjectItemCaseSensitive(doc, "loss"), path, m, e))
        return -1;

    char msg[400];
    if (cv_model_finalize(m, msg, sizeof msg)) {
        char field[160];
        finalize_field(msg, pre, field, sizeof field);
        if (*pre)
            return cv_err_set(e, CV_EINVAL, "invalid_model", field, "%s.%s", pre, msg);
        return cv_err_set(e, CV_EINVAL, "invalid_model", field, "%s", msg);
    }
    return 0;
}

int cv_arch_parse(const char *text, size_t len, cv_model *m, cv_err *e)
{
    memset(m, 0, sizeof *m);
    const char *end = NULL;
    cJSON *doc = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (!doc) {
        size_t pos = end && end >= text && end <= text + len ? (size_t)(end - text) : 0;
        return cv_err_set(e, CV_EINVAL, "invalid_json", "",
                          "architecture is not valid JSON (error near byte %zu)", pos);
    }
    for (const char *p = end; p && p < text + len && *p; p++)
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            cJSON_Delete(doc);
            return cv_err_set(e, CV_EINVAL, "invalid_json", "",
                              "architecture: trailing characters after the JSON document "
                              "(byte %zu)", (size_t)(p - text));
        }
    int rc = cv_arch_from_json(doc, NULL, m, e);
    cJSON_Delete(doc);
    return rc;
}

int cv_arch_load(const char *path, cv_model *m, cv_err *e)
{
    memset(m, 0, sizeof *m);
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return cv_err_set(e, errno == ENOENT ? CV_ENOTFOUND : CV_EINVAL, "io_error", path,
                          "cannot open %s: %s", path, strerror(errno));
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    int rc = 0;
    while (buf) {
        size_t got = fread(buf + len, 1, cap - len, fp);
        len += got;
        if (got == 0 || len < cap) {
            if (ferror(fp))
                rc = cv_err_set(e, CV_EINVAL, "io_error", path, "error reading %s", path);
            break;
        }
        if (cap >= (size_t)64 << 20) {
            rc = cv_err_set(e, CV_ETOOLARGE, "too_large", path,
                            "%s: architecture file larger than 64 MiB", path);
            break;
        }
        char *nb = realloc(buf, cap * 2);
        if (!nb) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = nb;
        cap *= 2;
    }
    fclose(fp);
    if (!buf)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", path, "out of memory reading %s", path);
    if (!rc)
        rc = cv_arch_parse(buf, len, m, e);
    free(buf);
    return rc;
}

/* ---- export ------------------------------------------------------------ */

static int add_pair(cJSON *o, const char *key, const int v[2])
{
    int vals[2] = {v[0], v[1]};
    cJSON *a = cJSON_CreateIntArray(vals, 2);
    return a && cJSON_AddItemToObject(o, key, a) ? 0 : (cJSON_Delete(a), -1);
}

static int add_num(cJSON *o, const char *key, double v)
{
    return cJSON_AddNumberToObject(o, key, v) ? 0 : -1;
}

static int add_bool(cJSON *o, const char *key, int v)
{
    return cJSON_AddBoolToObject(o, key, v ? 1 : 0) ? 0 : -1;
}

/* Conv2d padding: [ph, pw], or "same" where it is asymmetric (only "same" makes it so). */
static int conv_padding_json(const cv_layer *L, cJSON *o)
{
    if (L->pad_extra[0] || L->pad_extra[1])
        return cJSON_AddStringToObject(o, "padding", "same") ? 0 : -1;
    return add_pair(o, "padding", L->padding);
}

static int layer_to_json(const cv_layer *L, cJSON *o)
{
    if (!cJSON_AddStringToObject(o, "type", cv_layer_type_name(L->type)))
        return -1;
    switch (L->type) {
    case CV_LINEAR:
        return add_num(o, "in_features", L->in_features) ||
               add_num(o, "out_features", L->out_features) || add_bool(o, "bias", L->has_bias);
    case CV_CONV2D:
        return add_num(o, "in_channels", L->in_channels) ||
               add_num(o, "out_channels", L->out_channels) ||
               add_pair(o, "kernel_size", L->kernel) || add_pair(o, "stride", L->stride) ||
               conv_padding_json(L, o) || add_pair(o, "dilation", L->dilation) ||
               add_num(o, "groups", L->groups) || add_bool(o, "bias", L->has_bias) ||
               !cJSON_AddStringToObject(o, "padding_mode", "zeros");
    case CV_LEAKYRELU: return add_num(o, "negative_slope", L->negative_slope);
    case CV_ELU: return add_num(o, "alpha", L->alpha);
    case CV_GELU:
        return cJSON_AddStringToObject(o, "approximate", L->gelu_tanh ? "tanh" : "none") ? 0
                                                                                         : -1;
    case CV_SOFTPLUS: return add_num(o, "beta", L->beta) || add_num(o, "threshold", L->threshold);
    case CV_FLATTEN: return add_num(o, "start_dim", L->start_dim) ||
                            add_num(o, "end_dim", L->end_dim);
    case CV_MAXPOOL2D:
        return add_pair(o, "kernel_size", L->kernel) || add_pair(o, "stride", L->stride) ||
               add_pair(o, "padding", L->padding) || add_pair(o, "dilation", L->dilation) ||
               add_bool(o, "ceil_mode", L->ceil_mode);
    case CV_AVGPOOL2D:
        return add_pair(o, "kernel_size", L->kernel) || add_pair(o, "stride", L->stride) ||
               add_pair(o, "padding", L->padding) || add_bool(o, "ceil_mode", L->ceil_mode) ||
               add_bool(o, "count_include_pad", L->count_include_pad);
    case CV_ADAPTIVEAVGPOOL2D: return add_pair(o, "output_size", L->output_size);
    case CV_BATCHNORM1D:
    case CV_BATCHNORM2D:
        return add_num(o, "num_features", L->num_features) || add_num(o, "eps", L->eps) ||
               add_bool(o, "affine", L->affine) || add_bool(o, "track_running_stats", 1);
    case CV_DROPOUT: return add_num(o, "p", L->p);
    default: return 0;
    }
}

cJSON *cv_arch_to_json(const cv_model *m)
{
    cJSON *doc = cJSON_CreateObject();
    if (!doc)
        return NULL;
    cJSON *is = cJSON_CreateIntArray(m->input_shape.dim, m->input_shape.rank);
    if (!is || !cJSON_AddItemToObject(doc, "input_shape", is)) {
        cJSON_Delete(is);
        goto fail;
    }
    cJSON *ls = cJSON_AddArrayToObject(doc, "layers");
    if (!ls)
        goto fail;
    for (int i = 0; i < m->nlayers; i++) {
        cJSON *o = cJSON_CreateObject();
        if (!o || !cJSON_AddItemToArray(ls, o)) {
            cJSON_Delete(o);
            goto fail;
        }
        if (layer_to_json(&m->layers[i], o))
            goto fail;
    }
    cJSON *loss = cJSON_AddObjectToObject(doc, "loss");
    static const char *const loss_names[] = {"MSELoss", "CrossEntropyLoss", "BCEWithLogitsLoss"};
    if (!loss || (unsigned)m->loss > CV_LOSS_BCE ||
        !cJSON_AddStringToObject(loss, "type", loss_names[m->loss]) ||
        !cJSON_AddStringToObject(loss, "reduction", m->reduction == CV_RED_SUM ? "sum" : "mean"))
        goto fail;
    return doc;
fail:
    cJSON_Delete(doc);
    return NULL;
}
