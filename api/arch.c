/* arch.c - architecture JSON parsing/validation into cv_model and back; a
 * layer object through its class's field table (engine/layer.h). */
#include "api/arch.h"
#include "api/arch_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/fileio.h"
#include "api/json_strict.h"
#include "api/suggest.h"
#include "engine/layer.h"

#define INT_LIMIT CV_ATTR_INT_LIMIT /* sizes beyond this are certainly a mistake */

/* ---- paths and messages ------------------------------------------------ */

/* buf = "obj.key" (or "key"), truncated to len. */
void cv_arch_join(char *buf, size_t len, const char *obj, const char *key)
{
    size_t used = 0;
    const char *parts[3] = {obj && *obj ? obj : "", obj && *obj ? "." : "", key};
    for (int i = 0; i < 3; i++)
        for (const char *p = parts[i]; *p && used + 1 < len; p++)
            buf[used++] = *p;
    if (len)
        buf[used] = 0;
}


int cv_arch_bad(cv_err *e, const char *code, const char *path, const char *what,
                const cJSON *got)
{
    char k[80];
    if (got)
        return cv_err_set(e, CV_EINVAL, code, path, "%s: %s, got %s", path, what,
                          cv_json_kind(got, k, sizeof k));
    return cv_err_set(e, CV_EINVAL, code, path, "%s: %s", path, what);
}

/* Rejects keys of o not in allowed (NULL-terminated) and duplicate keys. */
int cv_arch_check_keys(const cJSON *o, const char *obj, const char *what,
                       const char *const *allowed, cv_err *e)
{
    char path[160];
    for (const cJSON *c = o->child; c; c = c->next) {
        cv_arch_join(path, sizeof path, obj, c->string);
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
        char known[400], hint[96];
        const char *names[CV_LAYER_MAX_FIELDS + 2]; /* allowed but "type" */
        int n = 0;
        for (int i = 0; allowed[i] && n < CV_LAYER_MAX_FIELDS + 2; i++)
            if (strcmp(allowed[i], "type") != 0)
                names[n++] = allowed[i];
        cv_suggest_hint(c->string, allowed, -1, hint, sizeof hint);
        return cv_err_set(e, CV_EINVAL, "unknown_field", path,
                          "%s: unknown field for %s (known: %s)%s", path, what,
                          n ? cv_join_names(names, n, ", ", ", ", known, sizeof known) : "none",
                          hint);
    }
    return 0;
}

/* ---- typed getters ------------------------------------------------------ */

int cv_arch_as_int(const cJSON *v, const char *path, int min, int *out, cv_err *e)
{
    char what[96];
    if (min > -INT_LIMIT)
        snprintf(what, sizeof what, "must be an integer >= %d", min);
    else
        snprintf(what, sizeof what, "must be an integer");
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble))
        return cv_arch_bad(e, "invalid_type", path, what, v);
    double d = v->valuedouble;
    if (d < min)
        return cv_arch_bad(e, "invalid_value", path, what, v);
    if (fabs(d) > INT_LIMIT) {
        snprintf(what, sizeof what, "is too large (limit %d)", INT_LIMIT);
        return cv_arch_bad(e, "invalid_value", path, what, v);
    }
    *out = (int)d;
    return 0;
}

/* An int or a list of two ints ([h, w]). */
static int as_pair(const cJSON *v, const char *path, int min, int out[2], cv_err *e)
{
    if (cJSON_IsArray(v)) {
        char p[176];
        if (cJSON_GetArraySize(v) != 2)
            return cv_arch_bad(e, "invalid_value", path, "must be an integer or a list of 2 integers",
                       v);
        snprintf(p, sizeof p, "%s[0]", path);
        if (cv_arch_as_int(v->child, p, min, &out[0], e))
            return -1;
        snprintf(p, sizeof p, "%s[1]", path);
        return cv_arch_as_int(v->child->next, p, min, &out[1], e);
    }
    if (!cJSON_IsNumber(v))
        return cv_arch_bad(e, "invalid_type", path, "must be an integer or a list of 2 integers", v);
    if (cv_arch_as_int(v, path, min, &out[0], e))
        return -1;
    out[1] = out[0];
    return 0;
}

/* An integer (a list of one) or a list of 1 to max integers, each >= min,
 * into out[0..*n). */
static int as_ints(const cJSON *v, const char *path, int min, int max, int *out, int *n,
                   cv_err *e)
{
    char what[96], p[176];
    snprintf(what, sizeof what, "must be an integer or a list of 1 to %d integers", max);
    if (cJSON_IsNumber(v)) {
        *n = 1;
        return cv_arch_as_int(v, path, min, &out[0], e);
    }
    if (!cJSON_IsArray(v))
        return cv_arch_bad(e, "invalid_type", path, what, v);
    int len = cJSON_GetArraySize(v);
    if (len < 1 || len > max)
        return cv_arch_bad(e, "invalid_value", path, what, v);
    int i = 0;
    for (const cJSON *c = v->child; c; c = c->next, i++) {
        snprintf(p, sizeof p, "%s[%d]", path, i);
        if (cv_arch_as_int(c, p, min, &out[i], e))
            return -1;
    }
    *n = len;
    return 0;
}

/* CV_F_INT_LIST: as_ints with max clamped to 1..CV_INT_LIST_MAX. */
static int as_int_list(const cJSON *v, const char *path, int min, int max, cv_int_list *out,
                       cv_err *e)
{
    if (max < 1 || max > CV_INT_LIST_MAX)
        max = CV_INT_LIST_MAX;
    return as_ints(v, path, min, max, out->v, &out->n, e);
}

/* ---- layers ------------------------------------------------------------
 * Generic: a layer object is read and written by walking its class's field
 * table (engine/layer.h); only the meaning of each field kind lives here. */

/* `"a" or "b"`, `"a", "b" or "c"` */
static void choice_list(const char *const *choices, char *buf, size_t len)
{
    size_t used = 0;
    *buf = 0;
    for (int i = 0; choices[i] && used < len; i++)
        used += (size_t)snprintf(buf + used, len - used, "%s\"%s\"",
                                 i == 0 ? "" : choices[i + 1] ? ", " : " or ", choices[i]);
}

/* A keyword of f->choices (v a string): its index + 1, stored as int at aux. */
static int parse_choice(const cJSON *v, const char *path, const cv_field *f,
                        unsigned char *attr, cv_err *e)
{
    for (int i = 0; f->choices[i]; i++)
        if (strcmp(v->valuestring, f->choices[i]) == 0) {
            *(int *)(attr + f->aux) = i + 1;
            return 0;
        }
    return cv_arch_bad(e, "invalid_value", path, f->text, v);
}

static int parse_pair_field(const cJSON *v, const char *path, const cv_field *f,
                            unsigned char *attr, cv_err *e)
{
    if (f->choices && cJSON_IsString(v))
        return parse_choice(v, path, f, attr, e);
    if ((f->flags & CV_F_NO_NONE) && cJSON_IsArray(v))
        for (const cJSON *c = v->child; c; c = c->next)
            if (cJSON_IsNull(c))
                return cv_err_set(e, CV_EINVAL, "unsupported", path,
                                  "%s: None entries are not supported; give both sizes", path);
    return as_pair(v, path, (int)f->min, (int *)(attr + f->offset), e);
}

/* CV_F_DIMS: an int n ([n]) or a list of 1..CV_MAX_RANK ints >= min. */
static int parse_dims_field(const cJSON *v, const char *path, const cv_field *f, cv_shape *out,
                            cv_err *e)
{
    return as_ints(v, path, (int)f->min, CV_MAX_RANK, out->dim, &out->rank, e);
}

/* An INT field: an integer; with CV_F_LIST1 also a list of one (PyTorch's
 * 1-tuples); with choices also a keyword (index + 1 stored as int at aux). */
static int parse_int_field(const cJSON *v, const char *path, const cv_field *f,
                           unsigned char *attr, cv_err *e)
{
    if (f->choices && cJSON_IsString(v))
        return parse_choice(v, path, f, attr, e);
    if ((f->flags & CV_F_LIST1) && cJSON_IsArray(v)) {
        char p[176];
        if (cJSON_GetArraySize(v) != 1)
            return cv_arch_bad(e, "invalid_value", path, "must be an integer or a list of 1 integer", v);
        snprintf(p, sizeof p, "%s[0]", path);
        return cv_arch_as_int(v->child, p, (int)f->min, (int *)(attr + f->offset), e);
    }
    return cv_arch_as_int(v, path, (int)f->min, (int *)(attr + f->offset), e);
}

static int parse_number_field(const cJSON *v, const char *path, const cv_field *f, double *out,
                              cv_err *e)
{
    char what[96];
    int lo_open = (f->flags & CV_F_MIN_OPEN) != 0;
    if ((f->flags & CV_F_INF_STRINGS) && cJSON_IsString(v) &&
        (strcmp(v->valuestring, "inf") == 0 || strcmp(v->valuestring, "-inf") == 0)) {
        *out = v->valuestring[0] == '-' ? -INFINITY : INFINITY;
        return 0;
    }
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
        return cv_arch_bad(e, "invalid_type", path,
                           f->flags & CV_F_INF_STRINGS ? "must be a number, \"inf\" or \"-inf\""
                                                        : "must be a number", v);
    double x = v->valuedouble;
    if (x < f->min || (lo_open && x == f->min) || x > f->max) {
        if (isinf(f->max))
            snprintf(what, sizeof what, "must be %s %g", lo_open ? ">" : ">=", f->min);
        else
            snprintf(what, sizeof what, "must be in %s%g, %g]", lo_open ? "(" : "[", f->min,
                     f->max);
        return cv_arch_bad(e, "invalid_value", path, what, v);
    }
    *out = x;
    return 0;
}

/* A field that is accepted and ignored: checks its JSON kind. */
static int parse_ignored_field(const cJSON *v, const char *path, const cv_field *f, cv_err *e)
{
    if (((f->flags & CV_F_ACCEPT_BOOL) && cJSON_IsBool(v)) ||
        ((f->flags & CV_F_ACCEPT_NUMBER) && cJSON_IsNumber(v)) ||
        ((f->flags & CV_F_ACCEPT_NULL) && cJSON_IsNull(v)))
        return 0;
    char what[96] = "must be";
    size_t used = strlen(what);
    const char *kinds[3] = {(f->flags & CV_F_ACCEPT_BOOL) ? "true or false" : NULL,
                            (f->flags & CV_F_ACCEPT_NUMBER) ? "a number" : NULL,
                            (f->flags & CV_F_ACCEPT_NULL) ? "null" : NULL};
    for (int i = 0, n = 0; i < 3; i++)
        if (kinds[i] && used < sizeof what)
            used += (size_t)snprintf(what + used, sizeof what - used, "%s%s",
                                     n++ ? " or " : " ", kinds[i]);
    return cv_arch_bad(e, "invalid_type", path, what, v);
}

/* Reads field f of layer object o (at obj) into attr; absent fields keep
 * the default cv_layer_init gave them. */
static int parse_field(const cJSON *o, const char *obj, const cv_field *f, unsigned char *attr,
                       cv_err *e)
{
    char path[160], what[160];
    cv_arch_join(path, sizeof path, obj, f->name);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, f->name);
    if (v && cJSON_IsNull(v) && (f->flags & CV_F_NULLABLE))
        v = NULL;
    if (!v)
        return (f->flags & CV_F_REQUIRED)
                   ? cv_arch_bad(e, "missing_field", path, "required field is missing", NULL)
                   : 0;
    void *dst = f->offset == CV_F_NOSTORE ? NULL : attr + f->offset;
    switch (f->kind) {
    case CV_F_INT:
        return parse_int_field(v, path, f, attr, e);
    case CV_F_PAIR:
        return parse_pair_field(v, path, f, attr, e);
    case CV_F_BOOL:
    case CV_F_FIXED_BOOL:
        if (!cJSON_IsBool(v))
            return cv_arch_bad(e, "invalid_type", path, "must be true or false", v);
        if (f->kind == CV_F_FIXED_BOOL && cJSON_IsTrue(v) != (f->def != 0))
            return cv_err_set(e, CV_EINVAL, "unsupported", path, "%s: %s is not supported: %s",
                              path, cJSON_IsTrue(v) ? "true" : "false", f->text);
        if (dst)
            *(int *)dst = cJSON_IsTrue(v) ? 1 : 0;
        return 0;
    case CV_F_NUMBER:
        return parse_number_field(v, path, f, dst, e);
    case CV_F_ENUM:
        for (int i = 0; cJSON_IsString(v) && f->choices[i]; i++)
            if (strcmp(v->valuestring, f->choices[i]) == 0) {
                *(int *)dst = i;
                return 0;
            }
        snprintf(what, sizeof what, "must be ");
        choice_list(f->choices, what + strlen(what), sizeof what - strlen(what));
        return cv_arch_bad(e, cJSON_IsString(v) ? "invalid_value" : "invalid_type", path, what, v);
    case CV_F_FIXED_STRING:
        if (!cJSON_IsString(v))
            return cv_arch_bad(e, "invalid_type", path, "must be a string", v);
        if (strcmp(v->valuestring, f->text) != 0)
            return cv_err_set(e, CV_EINVAL, "unsupported", path,
                              "%s: %s '%.40s' is not supported (only \"%s\")", path, f->name,
                              v->valuestring, f->text);
        return 0;
    case CV_F_FIXED_NULL:
        return cJSON_IsNull(v) ? 0
                               : cv_arch_bad(e, "unsupported", path, "is not supported (must be null)", v);
    case CV_F_IGNORED:
        return parse_ignored_field(v, path, f, e);
    case CV_F_INT_LIST:
        return as_int_list(v, path, (int)f->min, (int)f->max, dst, e);
    case CV_F_DIMS:
        return parse_dims_field(v, path, f, dst, e);
    }
    return cv_err_set(e, CV_EINTERNAL, "internal", path, "%s: unknown field kind", path);
}

/* The string field "type" of o (path set to "obj.type"), or NULL after an
 * error: missing, or not a string ("what" says what it must be). */
const cJSON *cv_arch_type_field(const cJSON *o, const char *obj, const char *what, char *path,
                               size_t len, cv_err *e)
{
    cv_arch_join(path, len, obj, "type");
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(o, "type");
    if (!t)
        cv_arch_bad(e, "missing_field", path, "required field is missing", NULL);
    else if (!cJSON_IsString(t))
        cv_arch_bad(e, "invalid_type", path, what, t);
    else
        return t;
    return NULL;
}

int cv_arch_parse_fields(const cJSON *o, const char *obj, const cv_layer_class *cls,
                         const char *const *extra, cv_layer *L, cv_err *e)
{
    char path[160];
    const char *allowed[CV_LAYER_MAX_FIELDS + 8];
    int na = 0;
    for (int i = 0; extra[i] && na < 7; i++)
        allowed[na++] = extra[i];
    int nf = cls->nfields < CV_LAYER_MAX_FIELDS ? cls->nfields : CV_LAYER_MAX_FIELDS;
    for (int i = 0; i < nf; i++)
        allowed[na++] = cls->fields[i].name;
    allowed[na] = NULL;
    if (cv_arch_check_keys(o, obj, cls->name, allowed, e))
        return -1;
    cv_layer_init(L, cls);
    for (int i = 0; i < nf; i++)
        if (parse_field(o, obj, &cls->fields[i], L->attr.bytes, e))
            return -1;
    cv_err ce;
    cv_err_clear(&ce);
    if (cls->check && cls->check(L, &ce)) {
        if (ce.status == CV_OK) /* a hook that failed without filling ce: a bug */
            return cv_err_set(e, CV_EINTERNAL, "internal", obj,
                              "%s: the %s layer check failed without a reason", obj,
                              cls->name);
        /* the hook names the attribute: prefix the layer's path */
        cv_arch_join(path, sizeof path, obj, ce.field);
        return cv_err_set(e, ce.status, ce.code, path, "%s.%s", obj, ce.message);
    }
    return 0;
}

int cv_arch_unknown_type(const char *path, const char *name, cv_err *e)
{
    char known[600], hint[96];
    const char *names[128];
    int n = 0;
    for (int i = 0; i < cv_layer_class_count() && n < 128; i++)
        if (cv_layer_class_is_module(cv_layer_class_at(i)))
            names[n++] = cv_layer_class_at(i)->name;
    return cv_err_set(e, CV_EINVAL, "unknown_layer_type", path,
                      "%s: unknown layer type '%.60s' (supported: %s)%s", path, name,
                      cv_join_names(names, n, ", ", ", ", known, sizeof known),
                      cv_suggest_hint(name, names, n, hint, sizeof hint));
}

static int parse_layer(const cJSON *o, const char *obj, cv_layer *L, cv_err *e)
{
    char path[160];
    if (!cJSON_IsObject(o))
        return cv_arch_bad(e, "invalid_type", obj, "each layer must be an object with a \"type\"", o);
    const cJSON *t = cv_arch_type_field(o, obj, "must be a layer type name", path, sizeof path, e);
    if (!t)
        return -1;
    const cv_layer_class *cls = cv_layer_class_find(t->valuestring);
    if (!cls)
        return cv_arch_unknown_type(path, t->valuestring, e);
    if (!cls->ops || cls->min_inputs > 1 || cls->max_inputs > 1 ||
        (cls->max_inputs == 0 && cls->min_inputs == 0 && cls->ops->vjp_n))
        return cv_err_set(e, CV_EINVAL, "unsupported", path,
                          "%s: %s takes other inputs than the previous layer's output: write "
                          "the model in the graph form (\"modules\" and \"nodes\")", path,
                          cls->name);
    static const char *const extra[] = {"type", NULL};
    return cv_arch_parse_fields(o, obj, cls, extra, L, e);
}

/* ---- document ---------------------------------------------------------- */

static const char *const K_TOP[] = {"input_shape", "input_dtype", "layers", "modules",
                                    "nodes", "loss", NULL};

/* ---- input dtype ---------------------------------------------------------- */

static const char *const DTYPE_NAMES[] = {"float32", "int64", "int32", NULL};

int cv_arch_parse_input_dtype(const cJSON *doc, const char *prefix, cv_model *m, cv_err *e)
{
    char path[160];
    cv_arch_join(path, sizeof path, prefix ? prefix : "", "input_dtype");
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(doc, "input_dtype");
    m->input_dtype = CV_DTYPE_FLOAT32;
    if (!v)
        return 0;
    static const char *what = "must be \"float32\", \"int64\" or \"int32\" (token ids)";
    if (!cJSON_IsString(v))
        return cv_arch_bad(e, "invalid_type", path, what, v);
    for (int i = 0; DTYPE_NAMES[i]; i++)
        if (strcmp(v->valuestring, DTYPE_NAMES[i]) == 0) {
            m->input_dtype = (cv_input_dtype)i;
            return 0;
        }
    char hint[96];
    return cv_err_set(e, CV_EINVAL, "invalid_value", path, "%s: %s, got \"%.40s\"%s", path,
                      what, v->valuestring,
                      cv_suggest_hint(v->valuestring, DTYPE_NAMES, 3, hint, sizeof hint));
}

int cv_arch_input_dtype_to_json(const cv_model *m, cJSON *doc)
{
    if (m->input_dtype == CV_DTYPE_FLOAT32)
        return 0;
    if ((unsigned)m->input_dtype > CV_DTYPE_INT32)
        return -1;
    return cJSON_AddStringToObject(doc, "input_dtype", DTYPE_NAMES[m->input_dtype]) ? 0 : -1;
}

/* ---- loss ------------------------------------------------------------------ */

static const char *const LOSS_NAMES[] = {"MSELoss", "CrossEntropyLoss", "BCEWithLogitsLoss",
                                         "NLLLoss", NULL}; /* cv_loss_type order */
static const char *const K_LOSS[] = {"type", "reduction", "class_dim", "label_smoothing",
                                     "ignore_index", NULL};
static const char *const K_LOSS_NLL[] = {"type", "reduction", "class_dim", "ignore_index", NULL};
static const char *const K_LOSS_PLAIN[] = {"type", "reduction", NULL};

static int parse_reduction(const cJSON *o, const char *obj, cv_model *m, cv_err *e)
{
    char path[160];
    cv_arch_join(path, sizeof path, obj, "reduction");
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(o, "reduction");
    m->reduction = CV_RED_MEAN;
    if (!r)
        return 0;
    if (!cJSON_IsString(r))
        return cv_arch_bad(e, "invalid_type", path, "must be \"mean\" or \"sum\"", r);
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
    return cv_arch_bad(e, "invalid_value", path, "must be \"mean\" or \"sum\"", r);
}

/* class_dim, ignore_index, label_smoothing of CrossEntropyLoss/NLLLoss
 * (PyTorch's defaults 1, -100, 0.0 when absent). */
static int parse_class_fields(const cJSON *o, const char *obj, cv_model *m, cv_err *e)
{
    char path[160];
    m->class_dim = 1;
    m->ignore_index = -100;
    m->label_smoothing = 0.0;
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, "class_dim");
    cv_arch_join(path, sizeof path, obj, "class_dim");
    static const char *cd = "must be 1 (classes in dimension 1, PyTorch's [N, C, d1, ...]) or -1 "
                            "(classes last, [N, ..., C])";
    if (v && (!cJSON_IsNumber(v) || (v->valuedouble != 1 && v->valuedouble != -1)))
        return cv_arch_bad(e, cJSON_IsNumber(v) ? "invalid_value" : "invalid_type", path, cd, v);
    if (v)
        m->class_dim = (int)v->valuedouble;
    v = cJSON_GetObjectItemCaseSensitive(o, "ignore_index");
    cv_arch_join(path, sizeof path, obj, "ignore_index");
    if (v && (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) ||
              fabs(v->valuedouble) > 9007199254740992.0))
        return cv_arch_bad(e, "invalid_type", path, "must be an integer (a target value to leave out)",
                   v);
    if (v)
        m->ignore_index = (int64_t)v->valuedouble;
    v = cJSON_GetObjectItemCaseSensitive(o, "label_smoothing");
    cv_arch_join(path, sizeof path, obj, "label_smoothing");
    if (v && !cJSON_IsNumber(v))
        return cv_arch_bad(e, "invalid_type", path, "must be a number in [0, 1]", v);
    if (v && !(v->valuedouble >= 0 && v->valuedouble <= 1))
        return cv_arch_bad(e, "invalid_value", path, "must be a number in [0, 1]", v);
    if (v)
        m->label_smoothing = v->valuedouble;
    return 0;
}

static int parse_loss(const cJSON *o, const char *obj, cv_model *m, cv_err *e)
{
    char path[160];
    if (!o)
        return cv_arch_bad(e, "missing_field", obj, "required field is missing (e.g. {\"type\": "
                   "\"CrossEntropyLoss\"})", NULL);
    if (!cJSON_IsObject(o))
        return cv_arch_bad(e, "invalid_type", obj, "must be an object {\"type\", \"reduction\"}", o);
    if (cv_arch_check_keys(o, obj, "loss", K_LOSS, e))
        return -1;
    const cJSON *t = cv_arch_type_field(o, obj, "must be a loss name", path, sizeof path, e);
    if (!t)
        return -1;
    int li = 0;
    while (LOSS_NAMES[li] && strcmp(t->valuestring, LOSS_NAMES[li]) != 0)
        li++;
    if (!LOSS_NAMES[li]) {
        char hint[96];
        return cv_err_set(e, CV_EINVAL, "unknown_loss", path,
                          "%s: unknown loss '%.60s' (supported: MSELoss, CrossEntropyLoss, "
                          "NLLLoss, BCEWithLogitsLoss)%s", path, t->valuestring,
                          cv_suggest_hint(t->valuestring, LOSS_NAMES, 4, hint, sizeof hint));
    }
    m->loss = (cv_loss_type)li;
    const char *const *keys = m->loss == CV_LOSS_CE    ? K_LOSS
                              : m->loss == CV_LOSS_NLL ? K_LOSS_NLL
                                                       : K_LOSS_PLAIN;
    if (cv_arch_check_keys(o, obj, LOSS_NAMES[li], keys, e) || parse_reduction(o, obj, m, e))
        return -1;
    return parse_class_fields(o, obj, m, e);
}


/* The Sequential "layers" list into m's layers. */
static int parse_sequential(const cJSON *doc, const char *pre, cv_model *m, cv_err *e)
{
    char path[160], obj[160];
    int i;
    cv_arch_join(path, sizeof path, pre, "layers");
    const cJSON *ls = cJSON_GetObjectItemCaseSensitive(doc, "layers");
    if (!ls)
        return cv_arch_bad(e, "missing_field", path, "required field is missing", NULL);
    if (!cJSON_IsArray(ls))
        return cv_arch_bad(e, "invalid_type", path, "must be a list of layer objects", ls);
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

    return 0;
}

/* "layers" (Sequential) or "modules" + "nodes" (graph), not both. */
static int parse_body(const cJSON *doc, const char *pre, cv_model *m, cv_err *e)
{
    char path[160];
    const cJSON *ls = cJSON_GetObjectItemCaseSensitive(doc, "layers");
    const cJSON *nodes = cJSON_GetObjectItemCaseSensitive(doc, "nodes");
    const cJSON *mods = cJSON_GetObjectItemCaseSensitive(doc, "modules");
    if (ls && (nodes || mods)) {
        cv_arch_join(path, sizeof path, pre, nodes ? "nodes" : "modules");
        return cv_err_set(e, CV_EINVAL, "invalid_value", path,
                          "%s: an architecture has either \"layers\" (Sequential) or "
                          "\"modules\" and \"nodes\" (a graph), not both", path);
    }
    if (nodes || mods)
        return cv_arch_graph_from_json(doc, pre, m, e);
    return parse_sequential(doc, pre, m, e);
}

int cv_arch_from_json(const cJSON *doc, const char *prefix, cv_model *m, cv_err *e)
{
    const char *pre = prefix ? prefix : "";
    char path[160];
    memset(m, 0, sizeof *m);
    if (!cJSON_IsObject(doc))
        return cv_arch_bad(e, "invalid_type", *pre ? pre : "architecture",
                   "the architecture must be a JSON object with input_shape, layers and loss",
                   doc);
    if (cv_arch_check_keys(doc, pre, "the architecture", K_TOP, e))
        return -1;

    cv_arch_join(path, sizeof path, pre, "input_shape");
    const cJSON *is = cJSON_GetObjectItemCaseSensitive(doc, "input_shape");
    if (!is)
        return cv_arch_bad(e, "missing_field", path, "required field is missing (e.g. [1, 28, 28])",
                   NULL);
    if (!cJSON_IsArray(is))
        return cv_arch_bad(e, "invalid_type", path, "must be a list of positive integers", is);
    int rank = cJSON_GetArraySize(is);
    if (rank < 1 || rank > CV_MAX_RANK)
        return cv_err_set(e, CV_EINVAL, "invalid_value", path,
                          "%s: must have 1 to %d dimensions (per sample, without the batch "
                          "dimension), got %d", path, CV_MAX_RANK, rank);
    int i = 0;
    for (const cJSON *c = is->child; c; c = c->next, i++) {
        char p[176];
        snprintf(p, sizeof p, "%s[%d]", path, i);
        if (cv_arch_as_int(c, p, 1, &m->input_shape.dim[i], e))
            return -1;
    }
    m->input_shape.rank = rank;
    if (cv_arch_parse_input_dtype(doc, pre, m, e) || parse_body(doc, pre, m, e))
        return -1;

    cv_arch_join(path, sizeof path, pre, "loss");
    if (parse_loss(cJSON_GetObjectItemCaseSensitive(doc, "loss"), path, m, e))
        return -1;

    cv_err fe;
    if (cv_model_finalize(m, &fe)) {
        /* fe.field is the model path ("layers[2].kernel_size"): prefix it */
        char field[sizeof fe.field];
        cv_arch_join(field, sizeof field, pre, fe.field);
        if (*pre)
            return cv_err_set(e, fe.status, fe.code, field, "%s.%s", pre, fe.message);
        return cv_err_set(e, fe.status, fe.code, field, "%s", fe.message);
    }
    return 0;
}

int cv_arch_parse(const char *text, size_t len, cv_model *m, cv_err *e)
{
    memset(m, 0, sizeof *m);
    cJSON *doc = cv_json_parse_strict(text, len, "architecture", "", e);
    if (!doc)
        return -1;
    int rc = cv_arch_from_json(doc, NULL, m, e);
    cJSON_Delete(doc);
    return rc;
}

int cv_arch_load(const char *path, cv_model *m, cv_err *e)
{
    memset(m, 0, sizeof *m);
    FILE *fp = cv_open_input(path, e);
    if (!fp)
        return -1;
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

static int add_string(cJSON *o, const char *key, const char *v)
{
    return cJSON_AddStringToObject(o, key, v) ? 0 : -1;
}

/* CV_F_ZERO_NULL: the stored value is 0 (None) */
static int field_is_zero(const cv_field *f, const void *p)
{
    if (f->kind == CV_F_NUMBER)
        return *(const double *)p == 0;
    if (f->kind == CV_F_PAIR)
        return ((const int *)p)[0] == 0 && ((const int *)p)[1] == 0;
    return *(const int *)p == 0;
}

/* Field f of attr, as the document spells it; hidden and ignored fields are
 * not written. */
static int field_to_json(const cv_field *f, const unsigned char *attr, cJSON *o)
{
    if (f->flags & CV_F_HIDDEN)
        return 0;
    const void *p = f->offset == CV_F_NOSTORE ? NULL : attr + f->offset;
    if ((f->flags & CV_F_ZERO_NULL) && p && field_is_zero(f, p))
        return cJSON_AddNullToObject(o, f->name) ? 0 : -1;
    switch (f->kind) {
    case CV_F_INT:
        if ((f->flags & CV_F_NULLABLE) && *(const int *)p == (int)f->def)
            return cJSON_AddNullToObject(o, f->name) ? 0 : -1;
        if (f->choices && *(const int *)(attr + f->aux) > 0)
            return add_string(o, f->name, f->choices[*(const int *)(attr + f->aux) - 1]);
        return add_num(o, f->name, *(const int *)p);
    case CV_F_DIMS: {
        const cv_shape *d = p;
        cJSON *a = cJSON_CreateIntArray(d->dim, d->rank);
        return a && cJSON_AddItemToObject(o, f->name, a) ? 0 : (cJSON_Delete(a), -1);
    }
    case CV_F_PAIR: {
        int kw = f->choices ? *(const int *)(attr + f->aux) : 0;
        if (kw > 0)
            return add_string(o, f->name, f->choices[kw - 1]);
        return add_pair(o, f->name, p);
    }
    case CV_F_BOOL: return add_bool(o, f->name, *(const int *)p);
    case CV_F_NUMBER:
        if ((f->flags & CV_F_INF_STRINGS) && isinf(*(const double *)p))
            return add_string(o, f->name, *(const double *)p < 0 ? "-inf" : "inf");
        return add_num(o, f->name, *(const double *)p);
    case CV_F_ENUM: return add_string(o, f->name, f->choices[*(const int *)p]);
    case CV_F_FIXED_BOOL: return add_bool(o, f->name, f->def != 0);
    case CV_F_FIXED_STRING: return add_string(o, f->name, f->text);
    case CV_F_INT_LIST: { /* the empty list is the field's absence */
        const cv_int_list *l = p;
        cJSON *a = l->n > 0 ? cJSON_CreateIntArray(l->v, l->n) : NULL;
        return l->n <= 0 || (a && cJSON_AddItemToObject(o, f->name, a)) ? 0
                                                                         : (cJSON_Delete(a), -1);
    }
    default: return 0; /* FIXED_NULL, IGNORED */
    }
}

int cv_arch_fields_to_json(const cv_layer *L, cJSON *o)
{
    for (int i = 0; i < L->cls->nfields; i++)
        if (field_to_json(&L->cls->fields[i], L->attr.bytes, o))
            return -1;
    return 0;
}

static int layer_to_json(const cv_layer *L, cJSON *o)
{
    if (!L->cls || add_string(o, "type", L->cls->name))
        return -1;
    return cv_arch_fields_to_json(L, o);
}

/* The loss object; CrossEntropyLoss/NLLLoss fields only where they differ
 * from PyTorch's defaults (today's documents stay as they were). */
static int loss_to_json(const cv_model *m, cJSON *doc)
{
    cJSON *loss = cJSON_AddObjectToObject(doc, "loss");
    if (!loss || (unsigned)m->loss > CV_LOSS_NLL || add_string(loss, "type", LOSS_NAMES[m->loss]) ||
        add_string(loss, "reduction", m->reduction == CV_RED_SUM ? "sum" : "mean"))
        return -1;
    if (m->loss != CV_LOSS_CE && m->loss != CV_LOSS_NLL)
        return 0;
    int cd = m->class_dim < 0 ? -1 : 1;
    int64_t ign = m->class_dim ? m->ignore_index : -100;
    if ((cd != 1 && add_num(loss, "class_dim", cd)) ||
        (m->loss == CV_LOSS_CE && m->label_smoothing != 0 &&
         add_num(loss, "label_smoothing", m->label_smoothing)) ||
        (ign != -100 && add_num(loss, "ignore_index", (double)ign)))
        return -1;
    return 0;
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
    if (cv_arch_input_dtype_to_json(m, doc))
        goto fail;
    cJSON *ls = m->graph ? NULL : cJSON_AddArrayToObject(doc, "layers");
    if (m->graph ? cv_arch_graph_to_json(m, doc) != 0 : !ls)
        goto fail;
    for (int i = 0; ls && i < m->nlayers; i++) {
        cJSON *o = cJSON_CreateObject();
        if (!o || !cJSON_AddItemToArray(ls, o)) {
            cJSON_Delete(o);
            goto fail;
        }
        if (layer_to_json(&m->layers[i], o))
            goto fail;
    }
    if (loss_to_json(m, doc))
        goto fail;
    return doc;
fail:
    cJSON_Delete(doc);
    return NULL;
}
