/* arch_graph.c - the graph form of the architecture document
 * (docs/interface.md §1.2): "modules" (PyTorch qualified name -> type and
 * attributes) and "nodes" (torch.fx's vocabulary, topological order) into the
 * layers and wiring of a cv_model, and back.  Attributes are read and written
 * through the layer classes' field tables (api/arch.c). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/arch_internal.h"
#include "api/suggest.h"
#include "engine/layer.h"
#include "engine/layer_attention.h"

/* Room left in a tensor name for ".<suffix>" after a module name. */
#define NAME_ROOM 24

static const char *const K_NODE_BASE[] = {"name", "op", "target", "args", NULL};
static const char *const K_NODE_FUNCTION[] = {"name", "op", "target", "args", "params", NULL};
static const char *const K_NODE_GET_ATTR[] = {"name", "op", "target", NULL};
static const char *const OPS[] = {"placeholder", "get_attr", "call_module", "call_function",
                                  "output", NULL};

typedef struct {
    const cJSON *modules;       /* "modules", or NULL */
    int nmod;
    const cJSON *mod_obj[CV_MAX_LAYERS];
    char mod_name[CV_MAX_LAYERS][CV_NAME_MAX];
    cv_layer *mod_tmpl;         /* nmod parsed modules */
    int nnodes;
    char node_name[CV_MAX_LAYERS + 2][CV_NAME_MAX];
    int node_value[CV_MAX_LAYERS + 2]; /* activation index, -1: none (output) */
    const cJSON *nodes;
    /* names local to the expansion being parsed ("#qkv"), and their values */
    int nx;
    char xname[32][16];
    int xvalue[32];
} graph_doc;

/* ---- names --------------------------------------------------------------- */

/* 1 if s is a usable name: letters, digits, '_' and '.' (a qualified name),
 * shorter than max. */
static int good_name(const char *s, size_t max)
{
    size_t n = strlen(s);
    if (n == 0 || n >= max)
        return 0;
    for (const char *p = s; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
              *p == '_' || *p == '.'))
            return 0;
    return 1;
}

static int name_field(const cJSON *v, const char *path, size_t max, cv_err *e)
{
    char what[128];
    snprintf(what, sizeof what,
             "must be a name of 1 to %zu letters, digits, '_' or '.'", max - 1);
    if (!cJSON_IsString(v))
        return cv_arch_bad(e, v ? "invalid_type" : "missing_field", path,
                           v ? what : "required field is missing", v);
    if (!good_name(v->valuestring, max))
        return cv_arch_bad(e, "invalid_value", path, what, v);
    return 0;
}

/* ---- modules ------------------------------------------------------------- */

static int parse_modules(graph_doc *g, const char *pre, cv_err *e)
{
    char path[160], obj[200];
    cv_arch_join(path, sizeof path, pre, "modules");
    if (!g->modules)
        return 0;
    if (!cJSON_IsObject(g->modules))
        return cv_arch_bad(e, "invalid_type", path,
                           "must be an object: qualified module name -> {\"type\", ...}",
                           g->modules);
    int n = cJSON_GetArraySize(g->modules);
    if (n > CV_MAX_LAYERS)
        return cv_err_set(e, CV_ETOOLARGE, "too_large", path, "%s: more than %d modules",
                          path, CV_MAX_LAYERS);
    g->mod_tmpl = calloc((size_t)(n ? n : 1), sizeof(cv_layer));
    if (!g->mod_tmpl)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", path, "%s: out of memory", path);
    static const char *const extra[] = {"type", NULL};
    for (const cJSON *c = g->modules->child; c; c = c->next) {
        snprintf(obj, sizeof obj, "%s.%s", path, c->string);
        for (int i = 0; i < g->nmod; i++)
            if (strcmp(g->mod_name[i], c->string) == 0)
                return cv_err_set(e, CV_EINVAL, "duplicate_field", obj,
                                  "%s: module given twice", obj);
        if (!good_name(c->string, CV_NAME_MAX - NAME_ROOM))
            return cv_err_set(e, CV_EINVAL, "invalid_value", obj,
                              "%s: a module name is 1 to %d letters, digits, '_' or '.'", obj,
                              CV_NAME_MAX - NAME_ROOM - 1);
        if (!cJSON_IsObject(c))
            return cv_arch_bad(e, "invalid_type", obj,
                               "must be an object with a \"type\" and the module's attributes",
                               c);
        char tpath[240];
        const cJSON *t = cv_arch_type_field(c, obj, "must be a module type name", tpath,
                                            sizeof tpath, e);
        if (!t)
            return -1;
        const cv_layer_class *cls = cv_layer_class_find(t->valuestring);
        if (!cls || !cv_layer_class_is_module(cls))
            return cv_arch_unknown_type(tpath, t->valuestring, e);
        if (cv_arch_parse_fields(c, obj, cls, extra, &g->mod_tmpl[g->nmod], e))
            return -1;
        snprintf(g->mod_name[g->nmod], CV_NAME_MAX, "%s", c->string);
        g->mod_obj[g->nmod++] = c;
    }
    return 0;
}

static int find_module(const graph_doc *g, const char *name)
{
    for (int i = 0; i < g->nmod; i++)
        if (strcmp(g->mod_name[i], name) == 0)
            return i;
    return -1;
}

/* ---- nodes --------------------------------------------------------------- */

static int find_node(const graph_doc *g, const char *name, int upto)
{
    for (int i = 0; i < upto; i++)
        if (strcmp(g->node_name[i], name) == 0)
            return i;
    return -1;
}

/* Did-you-mean among the first upto node names. */
static const char *node_hint(const graph_doc *g, const char *name, int upto, char *hint,
                             size_t len)
{
    const char *names[CV_MAX_LAYERS + 2];
    for (int i = 0; i < upto; i++)
        names[i] = g->node_name[i];
    return cv_suggest_hint(name, names, upto, hint, len);
}

/* The names of node ni's "args" into L->in[] (activation indices). */
static int parse_args(graph_doc *g, const cJSON *o, const char *obj, int ni, cv_layer *L,
                      cv_err *e)
{
    char path[240], p[260], hint[96];
    cv_arch_join(path, sizeof path, obj, "args");
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(o, "args");
    L->nin = 0;
    if (!a)
        return 0;
    if (!cJSON_IsArray(a))
        return cv_arch_bad(e, "invalid_type", path, "must be a list of node names", a);
    if (cJSON_GetArraySize(a) > CV_MAX_NODE_INPUTS)
        return cv_err_set(e, CV_EINVAL, "invalid_value", path,
                          "%s: at most %d inputs per node", path, CV_MAX_NODE_INPUTS);
    int i = 0;
    for (const cJSON *c = a->child; c; c = c->next, i++) {
        snprintf(p, sizeof p, "%s[%d]", path, i);
        if (!cJSON_IsString(c))
            return cv_arch_bad(e, "invalid_type", p,
                               "must be the name of an earlier node (other arguments are "
                               "named attributes of the node)", c);
        int x = 0; /* a node of the expansion being parsed ("#qkv") */
        while (c->valuestring[0] == '#' && x < g->nx && strcmp(g->xname[x], c->valuestring))
            x++;
        if (c->valuestring[0] == '#' && x < g->nx) {
            L->in[L->nin++] = g->xvalue[x];
            continue;
        }
        int src = find_node(g, c->valuestring, ni);
        if (src < 0) {
            int later = find_node(g, c->valuestring, g->nnodes);
            if (later >= 0 || strcmp(c->valuestring, g->node_name[ni]) == 0)
                return cv_err_set(e, CV_EINVAL, "invalid_graph", p,
                                  "%s: node '%.60s' is not computed before this node (nodes "
                                  "must be in topological order: a cycle?)", p, c->valuestring);
            return cv_err_set(e, CV_EINVAL, "invalid_graph", p, "%s: unknown node '%.60s'%s",
                              p, c->valuestring,
                              node_hint(g, c->valuestring, ni, hint, sizeof hint));
        }
        if (g->node_value[src] < 0)
            return cv_err_set(e, CV_EINVAL, "invalid_graph", p,
                              "%s: node '%.60s' has no value", p, c->valuestring);
        L->in[L->nin++] = g->node_value[src];
    }
    return 0;
}

/* "params": {"weight": "w", ...} of a function node into L->pnames. */
static int parse_params(const cJSON *o, const char *obj, cv_layer *L, cv_err *e)
{
    char path[240], p[320];
    cv_arch_join(path, sizeof path, obj, "params");
    const cJSON *ps = cJSON_GetObjectItemCaseSensitive(o, "params");
    if (!ps)
        return 0;
    if (!cJSON_IsObject(ps))
        return cv_arch_bad(e, "invalid_type", path,
                           "must be an object: tensor (\"weight\", \"bias\") -> state_dict name",
                           ps);
    int i = 0;
    for (const cJSON *c = ps->child; c; c = c->next, i++) {
        snprintf(p, sizeof p, "%s.%s", path, c->string);
        if (i >= CV_MAX_NAMED_TENSORS || !good_name(c->string, 24))
            return cv_err_set(e, CV_EINVAL, "invalid_value", p,
                              "%s: not a parameter of %s", p, L->cls->name);
        if (name_field(c, p, CV_NAME_MAX - 1 - strlen(c->string), e)) /* "key=name" fits */
            return -1;
        snprintf(L->pnames[i], CV_NAME_MAX, "%s=%s", c->string, c->valuestring);
    }
    return 0;
}

static int op_index(const cJSON *o, const char *obj, cv_err *e)
{
    char path[240], hint[96], what[160];
    cv_arch_join(path, sizeof path, obj, "op");
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, "op");
    snprintf(what, sizeof what,
             "must be \"placeholder\", \"get_attr\", \"call_module\", \"call_function\" or "
             "\"output\"");
    if (!cJSON_IsString(v))
        return cv_arch_bad(e, v ? "invalid_type" : "missing_field", path,
                           v ? what : "required field is missing", v), -1;
    for (int i = 0; OPS[i]; i++)
        if (strcmp(v->valuestring, OPS[i]) == 0)
            return i;
    cv_err_set(e, CV_EINVAL, "invalid_value", path, "%s: %s, got '%.40s'%s", path, what,
               v->valuestring, cv_suggest_hint(v->valuestring, OPS, -1, hint, sizeof hint));
    return -1;
}

static const cJSON *target_of(const cJSON *o, const char *obj, char *path, size_t len,
                              cv_err *e)
{
    cv_arch_join(path, len, obj, "target");
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(o, "target");
    if (!cJSON_IsString(t)) {
        cv_arch_bad(e, t ? "invalid_type" : "missing_field", path,
                    t ? "must be a string" : "required field is missing", t);
        return NULL;
    }
    return t;
}

static int unknown_function(const char *path, const char *name, cv_err *e)
{
    const char *names[160];
    int n = 0;
    int nc = cv_layer_class_count(), nf = cv_function_class_count();
    for (int i = 0; i < nc + nf && n < 160; i++) {
        const cv_layer_class *c = i < nc ? cv_layer_class_at(i) : cv_function_class_at(i - nc);
        const char *fn = cv_layer_class_is_module(c) ? c->function : c->name;
        if (fn && strcmp(fn, "get_attr") != 0 && strcmp(fn, "attn_scale") != 0)
            names[n++] = fn;
    }
    char known[1200], hint[96];
    return cv_err_set(e, CV_EINVAL, "unknown_function", path,
                      "%s: unknown function '%.60s' (supported: %s)%s", path, name,
                      cv_join_names(names, n, ", ", ", ", known, sizeof known),
                      cv_suggest_hint(name, names, n, hint, sizeof hint));
}

static int parse_call_module(graph_doc *g, const cJSON *o, const char *obj, cv_layer *L,
                             cv_err *e)
{
    char path[240], hint[96];
    const cJSON *t = target_of(o, obj, path, sizeof path, e);
    if (!t)
        return -1;
    int mi = find_module(g, t->valuestring);
    if (mi < 0) {
        const char *names[CV_MAX_LAYERS];
        for (int i = 0; i < g->nmod; i++)
            names[i] = g->mod_name[i];
        return cv_err_set(e, CV_EINVAL, "invalid_graph", path,
                          "%s: no module '%.60s' in \"modules\"%s", path, t->valuestring,
                          cv_suggest_hint(t->valuestring, names, g->nmod, hint, sizeof hint));
    }
    *L = g->mod_tmpl[mi];
    snprintf(L->module, sizeof L->module, "%s", t->valuestring);
    if (L->cls == &cv_mha_class)
        return 1; /* expanded by the caller */
    if (cv_arch_check_keys(o, obj, "a call_module node", K_NODE_BASE, e))
        return -1;
    L->op = CV_NODE_CALL_MODULE; /* a second call shares the module's tensors (finalize) */
    return 0;
}

static int parse_call_function(const cJSON *o, const char *obj, cv_layer *L, cv_err *e)
{
    char path[240];
    const cJSON *t = target_of(o, obj, path, sizeof path, e);
    if (!t)
        return -1;
    const cv_layer_class *cls = cv_layer_class_for_function(t->valuestring);
    if (!cls || strcmp(t->valuestring, "get_attr") == 0)
        return unknown_function(path, t->valuestring, e);
    if (cv_arch_parse_fields(o, obj, cls, K_NODE_FUNCTION, L, e) || parse_params(o, obj, L, e))
        return -1;
    L->op = CV_NODE_CALL_FUNCTION;
    return cls == &cv_sdpa_class ? 1 : 0; /* 1: expanded by the caller */
}

static int parse_get_attr(const cJSON *o, const char *obj, cv_layer *L, cv_err *e)
{
    char path[240];
    const cJSON *t = target_of(o, obj, path, sizeof path, e);
    if (!t || name_field(t, path, CV_NAME_MAX, e))
        return -1;
    const cv_layer_class *cls = cv_layer_class_for_function("get_attr");
    if (!cls)
        return cv_err_set(e, CV_EINTERNAL, "internal", path, "%s: get_attr is not built in",
                          path);
    if (cv_arch_parse_fields(o, obj, cls, K_NODE_GET_ATTR, L, e))
        return -1;
    L->op = CV_NODE_GET_ATTR;
    snprintf(L->module, sizeof L->module, "%s", t->valuestring);
    return 0;
}

/* ---- expansions: attention as primitive nodes ----------------------------
 * MultiheadAttention and scaled_dot_product_attention become primitive
 * function nodes (names local to the expansion start with '#'); the last one
 * carries the node's own name.  The model remembers the node as written
 * (cv_macro) so export gives it back. */

static cJSON *xnode(cJSON *list, const char *name, const char *target, const char *a0,
                    const char *a1)
{
    cJSON *o = cJSON_CreateObject();
    if (!o || !cJSON_AddItemToArray(list, o))
        return cJSON_Delete(o), NULL;
    cJSON *a = NULL;
    if (!cJSON_AddStringToObject(o, "name", name) ||
        !cJSON_AddStringToObject(o, "op", "call_function") ||
        !cJSON_AddStringToObject(o, "target", target) ||
        !(a = cJSON_AddArrayToObject(o, "args")))
        return NULL;
    if (a0)
        cJSON_AddItemToArray(a, cJSON_CreateString(a0));
    if (a1)
        cJSON_AddItemToArray(a, cJSON_CreateString(a1));
    return o;
}

static void xints(cJSON *o, const char *key, const int *v, int n)
{
    if (o)
        cJSON_AddItemToObject(o, key, cJSON_CreateIntArray(v, n));
}

/* softmax(scale q k^T [causal] [mask]) v over per-sample [..., T, E] operands. */
static void attention_core(cJSON *list, const char *q, const char *k, const char *v,
                           const char *mask, int mask_fill, int causal, double scale,
                           const char *out)
{
    cJSON *o = xnode(list, "#qs", "attn_scale", q, NULL);
    if (o && !isnan(scale))
        cJSON_AddNumberToObject(o, "scale", scale);
    o = xnode(list, "#kt", "transpose", k, NULL);
    if (o) {
        cJSON_AddNumberToObject(o, "dim0", -2);
        cJSON_AddNumberToObject(o, "dim1", -1);
    }
    xnode(list, "#s", "matmul", "#qs", "#kt");
    const char *cur = "#s";
    if (causal) {
        xnode(list, "#sc", "causal_fill", cur, NULL);
        cur = "#sc";
    }
    if (mask) {
        o = xnode(list, "#sm", mask_fill ? "masked_fill" : "add", cur, mask);
        if (o && mask_fill)
            cJSON_AddStringToObject(o, "value", "-inf");
        cur = "#sm";
    }
    o = xnode(list, "#p", "softmax", cur, NULL);
    if (o)
        cJSON_AddNumberToObject(o, "dim", -1);
    xnode(list, out, "matmul", "#p", v);
}

static cJSON *xlinear(cJSON *list, const char *name, const char *in, int fin, int fout,
                      int bias, const char *w, const char *b)
{
    cJSON *o = xnode(list, name, "linear", in, NULL);
    if (!o)
        return NULL;
    cJSON_AddNumberToObject(o, "in_features", fin);
    cJSON_AddNumberToObject(o, "out_features", fout);
    cJSON_AddBoolToObject(o, "bias", bias);
    cJSON *ps = cJSON_AddObjectToObject(o, "params");
    if (ps) {
        cJSON_AddStringToObject(ps, "weight", w);
        if (bias)
            cJSON_AddStringToObject(ps, "bias", b);
    }
    return o;
}

/* Self-attention of module M on [T, E] inputs: qkv projection, heads,
 * attention, merge, output projection. */
static cJSON *expand_mha(const cv_layer *M, const char *x, const char *mask, int causal,
                         const char *out)
{
    const cv_mha_attr *a = CV_LAYER_ATTR(M, cv_mha_attr);
    int E = a->embed_dim, h = a->num_heads, dk = E / h;
    char w[CV_NAME_MAX + 16], b[CV_NAME_MAX + 16];
    cJSON *list = cJSON_CreateArray();
    if (!list)
        return NULL;
    snprintf(w, sizeof w, "%s.in_proj_weight", M->module);
    snprintf(b, sizeof b, "%s.in_proj_bias", M->module);
    xlinear(list, "#qkv", x, E, 3 * E, a->bias, w, b);
    static const char *const part[3] = {"#q", "#k", "#v"};
    static const char *const heads[3] = {"#qh", "#kh", "#vh"};
    static const char *const split[3] = {"#q4", "#k4", "#v4"};
    int shape[4] = {-1, -1, h, dk}, perm[4] = {0, 2, 1, 3}, merged[3] = {-1, -1, E};
    for (int i = 0; i < 3; i++) {
        cJSON *o = xnode(list, part[i], "narrow", "#qkv", NULL);
        if (o) {
            cJSON_AddNumberToObject(o, "dim", -1);
            cJSON_AddNumberToObject(o, "start", i * E);
            cJSON_AddNumberToObject(o, "length", E);
        }
        xints(xnode(list, split[i], "reshape", part[i], NULL), "shape", shape, 4);
        xints(xnode(list, heads[i], "permute", split[i], NULL), "dims", perm, 4);
    }
    attention_core(list, "#qh", "#kh", "#vh", mask, 1, causal, NAN, "#o");
    xints(xnode(list, "#om", "permute", "#o", NULL), "dims", perm, 4);
    xints(xnode(list, "#or", "reshape", "#om", NULL), "shape", merged, 3);
    snprintf(w, sizeof w, "%s.out_proj.weight", M->module);
    snprintf(b, sizeof b, "%s.out_proj.bias", M->module);
    xlinear(list, out, "#or", E, E, a->bias, w, b);
    return list;
}

/* Parses the generated nodes of list as node ni's layers and records the
 * node as written (orig) for export. */
static int parse_expansion(graph_doc *g, cJSON *list, const char *obj, int ni, cv_model *m,
                           const cv_layer *orig, cv_err *e)
{
    if (!list)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", obj, "%s: out of memory", obj);
    if (m->nmacros >= CV_MAX_MACROS)
        return cv_err_set(e, CV_ETOOLARGE, "too_large", obj,
                          "%s: more than %d attention nodes", obj, CV_MAX_MACROS);
    int first = m->nlayers;
    g->nx = 0;
    for (const cJSON *c = list->child; c; c = c->next) {
        const char *nm = cJSON_GetObjectItemCaseSensitive(c, "name")->valuestring;
        if (m->nlayers >= CV_MAX_LAYERS)
            return cv_err_set(e, CV_ETOOLARGE, "too_large", obj, "%s: more than %d layers",
                              obj, CV_MAX_LAYERS);
        cv_layer *L = &m->layers[m->nlayers];
        if (parse_call_function(c, obj, L, e) || parse_args(g, c, obj, ni, L, e))
            return -1;
        if (c->next) /* internal: "<node>#qkv" (messages only) */
            snprintf(L->node, sizeof L->node, "%.40s%s", g->node_name[ni], nm);
        else         /* the node's own value */
            snprintf(L->node, sizeof L->node, "%s", g->node_name[ni]);
        snprintf(L->module, sizeof L->module, "%s", orig->module);
        L->src = ni;
        m->nlayers++;
        if (!c->next) {
            g->node_value[ni] = m->nlayers;
        } else if (g->nx < 32) {
            snprintf(g->xname[g->nx], sizeof g->xname[0], "%s", nm);
            g->xvalue[g->nx++] = m->nlayers;
        }
    }
    g->nx = 0; /* its '#' names end with it */
    cv_macro *mac = &m->macros[m->nmacros++];
    mac->first = first;
    mac->last = m->nlayers - 1;
    mac->node = *orig;
    return 0;
}

static const char *arg_name(const cJSON *o, int i)
{
    const cJSON *a = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(o, "args"), i);
    return a ? a->valuestring : NULL;
}

/* A call_module node of a MultiheadAttention module (template M). */
static int expand_mha_node(graph_doc *g, const cJSON *o, const char *obj, int ni, cv_model *m,
                           cv_layer *M, cv_err *e)
{
    char path[240];
    static const char *const keys[] = {"name", "op", "target", "args", "is_causal", NULL};
    if (cv_arch_check_keys(o, obj, "a MultiheadAttention call", keys, e) ||
        parse_args(g, o, obj, ni, M, e))
        return -1;
    cv_arch_join(path, sizeof path, obj, "args");
    if (M->nin < 3 || M->in[0] != M->in[1] || M->in[0] != M->in[2])
        return cv_err_set(e, CV_EINVAL, "unsupported", path,
                          "%s: MultiheadAttention is supported as self-attention, args "
                          "[x, x, x] or [x, x, x, attn_mask] (a boolean buffer, true = masked)",
                          path);
    const cJSON *ic = cJSON_GetObjectItemCaseSensitive(o, "is_causal");
    cv_arch_join(path, sizeof path, obj, "is_causal");
    if (ic && !cJSON_IsBool(ic))
        return cv_arch_bad(e, "invalid_type", path, "must be true or false", ic);
    int causal = cJSON_IsTrue(ic);
    snprintf(M->node, sizeof M->node, "%s", g->node_name[ni]);
    M->op = CV_NODE_CALL_MODULE;
    CV_LAYER_ATTR(M, cv_mha_attr)->call_causal = causal;
    cJSON *list = expand_mha(M, arg_name(o, 0), M->nin > 3 ? arg_name(o, 3) : NULL, causal,
                             g->node_name[ni]);
    int rc = parse_expansion(g, list, obj, ni, m, M, e);
    cJSON_Delete(list);
    return rc;
}

/* A call_function node of scaled_dot_product_attention (template S). */
static int expand_sdpa_node(graph_doc *g, const cJSON *o, const char *obj, int ni, cv_model *m,
                            cv_layer *S, cv_err *e)
{
    if (parse_args(g, o, obj, ni, S, e))
        return -1;
    const cv_sdpa_attr *a = CV_LAYER_ATTR(S, cv_sdpa_attr);
    snprintf(S->node, sizeof S->node, "%s", g->node_name[ni]);
    cJSON *list = cJSON_CreateArray();
    if (list)
        attention_core(list, arg_name(o, 0), arg_name(o, 1), arg_name(o, 2),
                       S->nin > 3 ? arg_name(o, 3) : NULL, 0, a->is_causal, a->scale,
                       g->node_name[ni]);
    int rc = parse_expansion(g, list, obj, ni, m, S, e);
    cJSON_Delete(list);
    return rc;
}

/* The output node: its one arg must be a computed value; an earlier one than
 * the last layer's gets an identity layer so the network output is last. */
static int parse_output(graph_doc *g, const cJSON *o, const char *obj, int ni, cv_model *m,
                        cv_err *e)
{
    char path[240];
    if (cv_arch_check_keys(o, obj, "the output node", K_NODE_BASE, e))
        return -1;
    cv_layer tmp;
    memset(&tmp, 0, sizeof tmp);
    if (parse_args(g, o, obj, ni, &tmp, e))
        return -1;
    cv_arch_join(path, sizeof path, obj, "args");
    if (tmp.nin != 1)
        return cv_err_set(e, CV_EINVAL, "invalid_graph", path,
                          "%s: the output node reads exactly one node (the network output)",
                          path);
    if (tmp.in[0] == m->nlayers && m->nlayers > 0)
        return 0;
    if (m->nlayers >= CV_MAX_LAYERS)
        return cv_err_set(e, CV_ETOOLARGE, "too_large", path, "%s: more than %d nodes", path,
                          CV_MAX_LAYERS);
    cv_layer *L = &m->layers[m->nlayers++];
    cv_layer_init(L, cv_layer_class_find("Identity"));
    L->op = CV_NODE_OUTPUT;
    L->nin = 1;
    L->in[0] = tmp.in[0];
    L->src = ni;
    return 0;
}

/* Node ni (object o at obj): a layer appended to m, or the placeholder /
 * output. */
static int parse_node(graph_doc *g, const cJSON *o, const char *obj, int ni, cv_model *m,
                      cv_err *e)
{
    char path[240];
    if (!cJSON_IsObject(o))
        return cv_arch_bad(e, "invalid_type", obj,
                           "each node must be an object with \"name\" and \"op\"", o);
    int op = op_index(o, obj, e);
    if (op < 0)
        return -1;
    int last = ni == g->nnodes - 1;
    cv_arch_join(path, sizeof path, obj, "op");
    if ((op == 0) != (ni == 0))
        return cv_err_set(e, CV_EINVAL, "invalid_graph", path,
                          "%s: the first node, and only it, is the \"placeholder\" (the input)",
                          path);
    if ((op == 4) != last)
        return cv_err_set(e, CV_EINVAL, "invalid_graph", path,
                          "%s: the last node, and only it, is the \"output\"", path);
    g->node_value[ni] = -1;
    if (op == 0) {
        g->node_value[ni] = 0;
        snprintf(m->input_name, sizeof m->input_name, "%s", g->node_name[ni]);
        static const char *const keys[] = {"name", "op", NULL};
        return cv_arch_check_keys(o, obj, "the placeholder node", keys, e);
    }
    if (op == 4) {
        snprintf(m->output_name, sizeof m->output_name, "%s", g->node_name[ni]);
        return parse_output(g, o, obj, ni, m, e);
    }
    if (m->nlayers >= CV_MAX_LAYERS)
        return cv_err_set(e, CV_ETOOLARGE, "too_large", obj, "%s: more than %d nodes", obj,
                          CV_MAX_LAYERS);
    cv_layer *L = &m->layers[m->nlayers];
    int rc = op == 1 ? parse_get_attr(o, obj, L, e)
             : op == 2 ? parse_call_module(g, o, obj, L, e)
                       : parse_call_function(o, obj, L, e);
    if (rc == 1) { /* attention: expanded into primitive nodes */
        cv_layer orig = *L;
        return op == 2 ? expand_mha_node(g, o, obj, ni, m, &orig, e)
                       : expand_sdpa_node(g, o, obj, ni, m, &orig, e);
    }
    if (rc || (op != 1 && parse_args(g, o, obj, ni, L, e)))
        return -1;
    snprintf(L->node, sizeof L->node, "%s", g->node_name[ni]);
    L->src = ni;
    g->node_value[ni] = ++m->nlayers;
    return 0;
}

/* Names of every node first (so a forward reference is told apart from an
 * unknown name), checked unique. */
static int collect_names(graph_doc *g, const char *path, cv_err *e)
{
    char obj[200], p[240];
    int i = 0;
    for (const cJSON *c = g->nodes->child; c; c = c->next, i++) {
        snprintf(obj, sizeof obj, "%s[%d]", path, i);
        cv_arch_join(p, sizeof p, obj, "name");
        const cJSON *nm = cJSON_IsObject(c) ? cJSON_GetObjectItemCaseSensitive(c, "name") : NULL;
        if (!cJSON_IsObject(c))
            return cv_arch_bad(e, "invalid_type", obj,
                               "each node must be an object with \"name\" and \"op\"", c);
        if (name_field(nm, p, CV_NAME_MAX, e))
            return -1;
        if (find_node(g, nm->valuestring, i) >= 0)
            return cv_err_set(e, CV_EINVAL, "invalid_graph", p,
                              "%s: node name '%s' is used twice", p, nm->valuestring);
        snprintf(g->node_name[i], CV_NAME_MAX, "%s", nm->valuestring);
    }
    return 0;
}

int cv_arch_graph_from_json(const cJSON *doc, const char *pre, cv_model *m, cv_err *e)
{
    char path[160], obj[200];
    graph_doc *g = calloc(1, sizeof *g);
    if (!g)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "graph parser state");
    g->modules = cJSON_GetObjectItemCaseSensitive(doc, "modules");
    g->nodes = cJSON_GetObjectItemCaseSensitive(doc, "nodes");
    cv_arch_join(path, sizeof path, pre, "nodes");
    int rc = parse_modules(g, pre, e);
    if (!rc && !cJSON_IsArray(g->nodes))
        rc = cv_arch_bad(e, "invalid_type", path,
                         "must be a list of nodes (placeholder first, output last)", g->nodes);
    if (!rc) {
        g->nnodes = cJSON_GetArraySize(g->nodes);
        if (g->nnodes < 3 || g->nnodes > CV_MAX_LAYERS + 2)
            rc = cv_err_set(e, g->nnodes < 3 ? CV_EINVAL : CV_ETOOLARGE,
                            g->nnodes < 3 ? "invalid_value" : "too_large", path,
                            "%s: need between 3 and %d nodes (placeholder, computations, "
                            "output), got %d", path, CV_MAX_LAYERS + 2, g->nnodes);
    }
    if (!rc)
        rc = collect_names(g, path, e);
    m->graph = 1;
    m->nlayers = 0;
    int i = 0;
    for (const cJSON *c = rc ? NULL : g->nodes->child; c; c = c->next, i++) {
        snprintf(obj, sizeof obj, "%s[%d]", path, i);
        if ((rc = parse_node(g, c, obj, i, m, e)) != 0)
            break;
    }
    free(g->mod_tmpl);
    free(g);
    return rc;
}

/* ---- export -------------------------------------------------------------- */

static const char *value_name(const cv_model *m, int a)
{
    return a == 0 ? m->input_name : m->layers[a - 1].node;
}

static int add_args(const cv_model *m, const cv_layer *L, cJSON *o)
{
    cJSON *a = cJSON_AddArrayToObject(o, "args");
    for (int i = 0; a && i < L->nin; i++)
        if (!cJSON_AddItemToArray(a, cJSON_CreateString(value_name(m, L->in[i]))))
            return -1;
    return a ? 0 : -1;
}

static int add_params(const cv_layer *L, cJSON *o)
{
    cJSON *ps = NULL;
    for (int i = 0; i < CV_MAX_NAMED_TENSORS; i++) {
        const char *eq = strchr(L->pnames[i], '=');
        if (!eq)
            continue;
        if (!ps && !(ps = cJSON_AddObjectToObject(o, "params")))
            return -1;
        char suffix[CV_NAME_MAX];
        snprintf(suffix, sizeof suffix, "%.*s", (int)(eq - L->pnames[i]), L->pnames[i]);
        if (!cJSON_AddStringToObject(ps, suffix, eq + 1))
            return -1;
    }
    return 0;
}

static int add_module(cJSON *mods, const cv_layer *L)
{
    if (cJSON_GetObjectItemCaseSensitive(mods, L->module))
        return 0;
    cJSON *o = cJSON_AddObjectToObject(mods, L->module);
    return o && cJSON_AddStringToObject(o, "type", L->cls->name) ? cv_arch_fields_to_json(L, o)
                                                                 : -1;
}

static const char *const OP_NAMES[] = {"call_module", "call_function", "get_attr"};

/* The expansion starting at layer l, or NULL. */
static const cv_macro *macro_at(const cv_model *m, int l)
{
    for (int i = 0; i < m->nmacros; i++)
        if (m->macros[i].first == l)
            return &m->macros[i];
    return NULL;
}

static int layer_node(const cv_model *m, const cv_layer *L, cJSON *mods, cJSON *nodes)
{
    cJSON *o = cJSON_CreateObject();
    if (!o || !cJSON_AddItemToArray(nodes, o))
        return cJSON_Delete(o), -1;
    if (!cJSON_AddStringToObject(o, "name", L->node) ||
        !cJSON_AddStringToObject(o, "op", OP_NAMES[L->op]))
        return -1;
    const char *target = L->op == CV_NODE_CALL_FUNCTION
                             ? (cv_layer_class_is_module(L->cls) ? L->cls->function : L->cls->name)
                             : L->module;
    if (!cJSON_AddStringToObject(o, "target", target))
        return -1;
    if (L->op == CV_NODE_CALL_MODULE) {
        if (L->cls == &cv_mha_class && CV_LAYER_ATTR(L, cv_mha_attr)->call_causal &&
            !cJSON_AddBoolToObject(o, "is_causal", 1))
            return -1;
        return add_module(mods, L) || add_args(m, L, o) ? -1 : 0;
    }
    if (L->op == CV_NODE_CALL_FUNCTION && (add_args(m, L, o) || add_params(L, o)))
        return -1;
    return cv_arch_fields_to_json(L, o);
}

int cv_arch_graph_to_json(const cv_model *m, cJSON *doc)
{
    cJSON *mods = cJSON_AddObjectToObject(doc, "modules");
    cJSON *nodes = cJSON_AddArrayToObject(doc, "nodes");
    if (!mods || !nodes)
        return -1;
    cJSON *in = cJSON_CreateObject();
    if (!in || !cJSON_AddItemToArray(nodes, in) ||
        !cJSON_AddStringToObject(in, "name", m->input_name) ||
        !cJSON_AddStringToObject(in, "op", "placeholder"))
        return -1;
    int out = m->nlayers;
    for (int l = 0; l < m->nlayers; l++) {
        const cv_layer *L = &m->layers[l];
        const cv_macro *mac = macro_at(m, l);
        if (L->op == CV_NODE_OUTPUT) {
            out = L->in[0];
            continue;
        }
        if (mac) {
            if (layer_node(m, &mac->node, mods, nodes))
                return -1;
            l = mac->last;
            continue;
        }
        if (layer_node(m, L, mods, nodes))
            return -1;
    }
    cJSON *o = cJSON_CreateObject();
    if (!o || !cJSON_AddItemToArray(nodes, o) ||
        !cJSON_AddStringToObject(o, "name", m->output_name) ||
        !cJSON_AddStringToObject(o, "op", "output"))
        return -1;
    cJSON *a = cJSON_AddArrayToObject(o, "args");
    return a && cJSON_AddItemToArray(a, cJSON_CreateString(value_name(m, out))) ? 0 : -1;
}
