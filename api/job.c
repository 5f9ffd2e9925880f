/* job.c - the job document: parsing it once into a cv_job_spec (every
 * check that needs no model), binding the spec to a model and dataset
 * (batch range, block names, the options against the blocks), and running
 * it: the engine, the blocks and the result envelope (op, curvature,
 * matvecs, elapsed_s, per-block results).  The ops themselves are table
 * entries (api/ops.h). */
#include "job.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/op_kron.h"
#include "api/op_laplace.h"
#include "api/op_util.h"
#include "api/ops.h"
#include "api/ops_table.h"
#include "api/suggest.h"

void cv_job_limits_default(cv_job_limits *l)
{
    l->dense_max = 4096;
    l->max_vector_dim = 0;
    l->job_memory = (size_t)2 << 30;
}

cJSON *cv_err_to_json(const cv_err *e)
{
    cJSON *root = cJSON_CreateObject(), *err = cJSON_AddObjectToObject(root, "error");
    cJSON_AddStringToObject(err, "code", e->code[0] ? e->code : cv_status_name(e->status));
    cJSON_AddStringToObject(err, "message", e->message);
    cJSON_AddStringToObject(err, "field", e->field);
    return root;
}

const char *cv_job_op_name(const cv_job_spec *j) { return j->op->name; }

static const cJSON *field(const cJSON *job, const char *name)
{
    return cJSON_GetObjectItemCaseSensitive(job, name);
}

/* ---- validation of the document ------------------------------------------- */

static int is_nonneg_int(const cJSON *v)
{
    return cJSON_IsNumber(v) && v->valuedouble >= 0 && v->valuedouble == floor(v->valuedouble) &&
           v->valuedouble < 9.007199254740992e15;
}

static int validate_batch(const cJSON *b, cv_err *e)
{
    if (!b || (cJSON_IsString(b) && strcmp(b->valuestring, "all") == 0))
        return 0;
    if (!cJSON_IsObject(b))
        return cv_err_set(e, CV_EINVAL, "invalid_batch", "batch",
                          "batch must be \"all\", {\"offset\", \"size\"} or {\"indices\"}");
    const cJSON *v;
    cJSON_ArrayForEach(v, b)
    {
        char f[64];
        snprintf(f, sizeof f, "batch.%s", v->string);
        if (strcmp(v->string, "offset") == 0 || strcmp(v->string, "size") == 0) {
            if (!is_nonneg_int(v) || (strcmp(v->string, "size") == 0 && v->valuedouble < 1))
                return cv_err_set(e, CV_EINVAL, "invalid_batch", f,
                                  "%s must be a %s integer", f,
                                  v->string[0] == 's' ? "positive" : "non-negative");
        } else if (strcmp(v->string, "indices") == 0) {
            if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) < 1)
                return cv_err_set(e, CV_EINVAL, "invalid_batch", f,
                                  "batch.indices must be a non-empty list of sample indices");
            const cJSON *x;
            int i = 0;
            cJSON_ArrayForEach(x, v)
            {
                if (!is_nonneg_int(x))
                    return cv_err_set(e, CV_EINVAL, "invalid_batch", f,
                                      "batch.indices[%d] is not a non-negative integer", i);
                if (x->valuedouble > INT32_MAX) {
                    snprintf(f, sizeof f, "batch.indices[%d]", i);
                    return cv_err_set(e, CV_EINVAL, "invalid_batch", f,
                                      "sample index %.0f is beyond any dataset (at most 2^31 "
                                      "samples)", x->valuedouble);
                }
                i++;
            }
        } else {
            return cv_err_set(e, CV_EINVAL, "unknown_field", f,
                              "unknown field %s (batch takes offset+size or indices)", f);
        }
    }
    if (field(b, "indices") && (field(b, "offset") || field(b, "size")))
        return cv_err_set(e, CV_EINVAL, "invalid_batch", "batch",
                          "give either indices or offset+size, not both");
    return 0;
}

typedef struct {
    const char *name;
    int group, item; /* blocks[group][item] */
    size_t order;    /* in the document */
} block_name;

static int cmp_block_names(const void *pa, const void *pb)
{
    const block_name *a = pa, *b = pb;
    int c = strcmp(a->name, b->name);
    return c ? c : a->order < b->order ? -1 : a->order > b->order;
}

/* A parameter may be in one block only, and once in it: a list of lists of
 * names (already checked to be one) with a name twice is refused, naming
 * both places.  Sorted, so that a long list costs n log n. */
static int blocks_disjoint(const cJSON *b, cv_err *e)
{
    size_t total = 0;
    const cJSON *g, *n;
    cJSON_ArrayForEach(g, b) total += (size_t)cJSON_GetArraySize(g);
    if (total < 2)
        return 0;
    block_name *all = malloc(total * sizeof *all);
    if (!all)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "blocks", "out of memory");
    size_t k = 0;
    int gi = 0;
    cJSON_ArrayForEach(g, b)
    {
        int ni = 0;
        cJSON_ArrayForEach(n, g)
        {
            all[k] = (block_name){n->valuestring, gi, ni++, k};
            k++;
        }
        gi++;
    }
    qsort(all, total, sizeof *all, cmp_block_names);
    int rc = 0;
    for (size_t i = 1; i < total && !rc; i++)
        if (strcmp(all[i - 1].name, all[i].name) == 0) {
            char f[48];
            snprintf(f, sizeof f, "blocks[%d][%d]", all[i].group, all[i].item);
            rc = cv_err_set(e, CV_EINVAL, "invalid_blocks", f,
                            "parameter '%.64s' is named twice: blocks[%d][%d] and %s (a "
                            "parameter may be in one block, once)",
                            all[i].name, all[i - 1].group, all[i - 1].item, f);
        }
    free(all);
    return rc;
}

static int validate_blocks(const cJSON *b, cv_err *e)
{
    if (!b)
        return 0;
    if (cJSON_IsString(b)) {
        static const char *const words[] = {"full", "layer", NULL};
        char hint[96];
        if (strcmp(b->valuestring, "full") && strcmp(b->valuestring, "layer"))
            return cv_err_set(e, CV_EINVAL, "invalid_blocks", "blocks",
                              "blocks must be \"full\", \"layer\" or a list of lists of "
                              "parameter names, got \"%s\"%s",
                              b->valuestring,
                              cv_suggest_hint(b->valuestring, words, -1, hint, sizeof hint));
        return 0;
    }
    if (!cJSON_IsArray(b) || cJSON_GetArraySize(b) < 1)
        return cv_err_set(e, CV_EINVAL, "invalid_blocks", "blocks",
                          "blocks must be \"full\", \"layer\" or a non-empty list of lists of "
                          "parameter names");
    int i = 0;
    const cJSON *g;
    cJSON_ArrayForEach(g, b)
    {
        if (!cJSON_IsArray(g) || cJSON_GetArraySize(g) < 1)
            return cv_err_set(e, CV_EINVAL, "invalid_blocks", "blocks",
                              "blocks[%d] must be a non-empty list of parameter names", i);
        int j = 0;
        const cJSON *n;
        cJSON_ArrayForEach(n, g)
        {
            if (!cJSON_IsString(n)) {
                char f[48];
                snprintf(f, sizeof f, "blocks[%d][%d]", i, j);
                return cv_err_set(e, CV_EINVAL, "invalid_blocks", f,
                                  "%s must be a parameter name (string)", f);
            }
            j++;
        }
        i++;
    }
    return blocks_disjoint(b, e);
}

static const char *const known_fields[] = {"op",   "model", "dataset", "curvature",   "batch",
                                           "blocks", "seed", "options", "micro_batch", NULL};

static int validate_known_fields(const cJSON *job, cv_err *e)
{
    const cJSON *v;
    cJSON_ArrayForEach(v, job)
    {
        int i = 0;
        while (known_fields[i] && strcmp(known_fields[i], v->string) != 0)
            i++;
        if (known_fields[i])
            continue;
        char hint[96];
        return cv_err_set(e, CV_EINVAL, "unknown_field", v->string,
                          "unknown field '%s' in job (known: op, model, dataset, "
                          "curvature, batch, blocks, seed, options)%s",
                          v->string, cv_suggest_hint(v->string, known_fields, -1, hint, sizeof hint));
    }
    return 0;
}

static const cv_op_def *find_op(const cJSON *job, cv_err *e)
{
    const cJSON *v = field(job, "op");
    if (!cJSON_IsString(v)) {
        cv_err_set(e, CV_EINVAL, "missing_field", "op", "job needs \"op\" (a string)");
        return NULL;
    }
    const cv_op_def *def = cv_op_find(v->valuestring);
    if (def)
        return def;
    const char *names[64];
    int n = 0;
    for (; n < cv_op_count() && n < 64; n++)
        names[n] = cv_op_at(n)->name;
    char known[512], hint[96];
    cv_err_set(e, CV_EINVAL, "unknown_op", "op", "unknown op '%s' (known: %s)%s", v->valuestring,
               cv_join_names(names, n, ", ", ", ", known, sizeof known),
               cv_suggest_hint(v->valuestring, names, n, hint, sizeof hint));
    return NULL;
}

static int validate_curvature(const cJSON *cu, cv_err *e)
{
    if (!cu || (cJSON_IsString(cu) && cv_curvature_from_name(cu->valuestring) >= 0))
        return 0;
    const char *names[CV_CURV_COUNT];
    for (int i = 0; i < CV_CURV_COUNT; i++)
        names[i] = cv_curvature_name((cv_curvature)i);
    char known[128], hint[96] = "";
    if (cJSON_IsString(cu))
        cv_suggest_hint(cu->valuestring, names, CV_CURV_COUNT, hint, sizeof hint);
    return cv_err_set(e, CV_EINVAL, "invalid_curvature", "curvature",
                      "curvature must be one of %s%s",
                      cv_join_names(names, CV_CURV_COUNT, ", ", ", ", known, sizeof known), hint);
}

/* The common fields and the blocks rule; the options come after. */
static int validate_fields(const cJSON *job, const cv_op_def *def, cv_err *e)
{
    for (int i = 1; i < 3; i++) {
        const cJSON *v = field(job, known_fields[i]);
        if (v && !cJSON_IsString(v))
            return cv_err_set(e, CV_EINVAL, "invalid_field", known_fields[i],
                              "%s must be a string", known_fields[i]);
    }
    if (validate_curvature(field(job, "curvature"), e))
        return -1;
    const cJSON *seed = field(job, "seed"), *mb = field(job, "micro_batch");
    if (seed && !is_nonneg_int(seed))
        return cv_err_set(e, CV_EINVAL, "invalid_field", "seed",
                          "seed must be a non-negative integer below 2^53 (exact in JSON)");
    if (mb && (!is_nonneg_int(mb) || mb->valuedouble < 1 || mb->valuedouble > 2147483647.0))
        return cv_err_set(e, CV_EINVAL, "invalid_field", "micro_batch",
                          "micro_batch must be an integer in [1, 2^31): the samples per "
                          "micro-batch");
    if (validate_batch(field(job, "batch"), e) || validate_blocks(field(job, "blocks"), e))
        return -1;
    const cJSON *bl = field(job, "blocks");
    if (!def->blockwise && bl &&
        !(cJSON_IsString(bl) && strcmp(bl->valuestring, "full") == 0) &&
        !(cJSON_IsArray(bl) && cJSON_GetArraySize(bl) == 1 && def->uses_curvature))
        return cv_err_set(e, CV_EINVAL, "invalid_blocks", "blocks",
                          "op %s gives one result: blocks must be \"full\"%s", def->name,
                          def->uses_curvature ? " or a list holding one group of parameter names"
                                              : "");
    return 0;
}

/* ---- the typed job ---------------------------------------------------------- */

static char *dup_or_null(const cJSON *v)
{
    return cJSON_IsString(v) ? strdup(v->valuestring) : NULL;
}

static int parse_batch(const cJSON *b, cv_job_spec *j)
{
    if (!b || !cJSON_IsObject(b))
        return 0; /* "all" */
    const cJSON *idx = field(b, "indices"), *off = field(b, "offset"), *size = field(b, "size");
    if (!idx) {
        j->batch.kind = CV_JOB_BATCH_RANGE;
        j->batch.has_offset = off != NULL;
        j->batch.offset = off ? (size_t)off->valuedouble : 0;
        j->batch.size = size ? (size_t)size->valuedouble : 0;
        return 0;
    }
    j->batch.kind = CV_JOB_BATCH_INDICES;
    j->batch.count = (size_t)cJSON_GetArraySize(idx);
    j->batch.indices = malloc(sizeof(int32_t) * j->batch.count);
    if (!j->batch.indices)
        return -1;
    size_t i = 0;
    const cJSON *x;
    cJSON_ArrayForEach(x, idx) j->batch.indices[i++] = (int32_t)x->valuedouble;
    return 0;
}

static int parse_blocks(const cJSON *b, cv_job_spec *j)
{
    if (!b || cJSON_IsString(b)) {
        j->blocks.kind = b && strcmp(b->valuestring, "layer") == 0 ? CV_JOB_BLOCKS_LAYER
                                                                   : CV_JOB_BLOCKS_FULL;
        return 0;
    }
    j->blocks.kind = CV_JOB_BLOCKS_LIST;
    int ng = cJSON_GetArraySize(b), total = 0, gi = 0;
    const cJSON *g, *n;
    cJSON_ArrayForEach(g, b) total += cJSON_GetArraySize(g);
    j->blocks.group_len = calloc((size_t)ng, sizeof(int));
    j->blocks.names = calloc((size_t)total, sizeof(char *));
    if (!j->blocks.group_len || !j->blocks.names)
        return -1;
    j->blocks.ngroups = ng;
    cJSON_ArrayForEach(g, b)
    {
        j->blocks.group_len[gi++] = cJSON_GetArraySize(g);
        cJSON_ArrayForEach(n, g)
        {
            if (!(j->blocks.names[j->blocks.nnames] = strdup(n->valuestring)))
                return -1;
            j->blocks.nnames++;
        }
    }
    return 0;
}

/* "a", "a and b", "a, b and c" of the options of def with the method list ms. */
static void names_with_methods(const cv_op_def *def, const char *ms, char *buf, size_t len)
{
    const char *names[CV_OPT_MAX];
    int n = 0;
    for (const cv_opt_spec *s = def->options; s->name && n < CV_OPT_MAX; s++)
        if (s->methods && strcmp(s->methods, ms) == 0)
            names[n++] = s->name;
    cv_join_names(names, n, ", ", " and ", buf, len);
}

/* Options given for another method than the job's (derived from the
 * table's methods column): "x, y and z apply to method M only". */
static int check_method_options(const cv_op_def *def, const cv_opts *o, const char *method,
                                cv_err *e)
{
    for (int i = 0; def->options[i].name; i++) {
        const cv_opt_spec *s = &def->options[i];
        if (!cv_opts_given_at(o, i) || !s->methods || cv_opts_in_list(s->methods, method))
            continue;
        char names[256], ms[128];
        names_with_methods(def, s->methods, names, sizeof names);
        snprintf(ms, sizeof ms, "%s", s->methods);
        int several = strchr(ms, '|') != NULL;
        for (char *p = ms; *p; p++)
            if (*p == '|')
                *p = '/';
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.method",
                          "%s %s to method%s %s only", names,
                          strstr(names, " and ") ? "apply" : "applies", several ? "s" : "", ms);
    }
    return 0;
}

/* The first option of type enum_or_list given as a list (a vector over the
 * job's block), or NULL. */
static const cv_opt_spec *vector_option(const cv_opts *o)
{
    for (int i = 0; o->specs && o->specs[i].name; i++) {
        const cv_opt_spec *s = &o->specs[i];
        if (s->type == CV_OPT_ENUM_OR_LIST && cv_opts_given_at(o, i) &&
            ((const cv_opt_choice_list *)((const char *)o->args + s->offset))->choice < 0)
            return s;
    }
    return NULL;
}

/* A vector option needs exactly one block (nblocks: the job's blocks as far
 * as known; blocks "layer" counts as one until bound) and, at bind (blk: the
 * one block; NULL at parse), exactly its D numbers. */
static int check_vector_option(const cv_opts *o, int nblocks, const cv_block *blk, cv_err *e)
{
    const cv_opt_spec *s = vector_option(o);
    if (!s)
        return 0;
    char f[96];
    snprintf(f, sizeof f, "options.%s", s->name);
    if (nblocks > 1)
        return cv_err_set(e, CV_EINVAL, "invalid_option", f,
                          "%s as a list of numbers needs one block (blocks \"full\" or one "
                          "group of parameter names); the job has %d blocks",
                          f, nblocks);
    int n = ((const cv_opt_choice_list *)((const char *)o->args + s->offset))->list.n;
    int many = strcmp(s->name, "rhs") == 0; /* k right-hand sides: k x D numbers */
    if (blk && (size_t)n != blk->dim && !(many && n > 0 && blk->dim && n % blk->dim == 0))
        return cv_err_set(e, CV_EINVAL, "invalid_option", f,
                          "%s has %d numbers; the block has %zu parameters%s", f, n, blk->dim,
                          many ? " (k right-hand sides: k x that many, one after the other)"
                               : "");
    return 0;
}

/* Options: validated, the method chosen, defaults, values stored, checked. */
static int parse_options(const cJSON *opts, int curvature_given, cv_job_spec *j, cv_err *e)
{
    const cv_op_def *def = j->op;
    const char *methods[16];
    cv_op_method_names(def, methods, 16);
    if (cv_opts_validate(opts, def->options, methods, e))
        return -1;
    int mi = 0;
    for (const cv_opt_spec *s = def->options; s->name; s++) {
        const cJSON *v = s->type == CV_OPT_METHOD && cJSON_IsObject(opts) ? field(opts, s->name)
                                                                            : NULL;
        if (v)
            mi = cv_op_method_index(def, v->valuestring);
    }
    j->method = def->methods ? def->methods[mi] : NULL;
    j->opts.specs = def->options;
    j->opts.args = calloc(1, def->args_size);
    if (!j->opts.args)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "options", "option values");
    ((cv_op_base *)j->opts.args)->mc_samples = 1;
    if (def->defaults)
        def->defaults(j->opts.args, mi);
    if (cv_opts_store(opts, &j->opts, methods, e) ||
        check_vector_option(&j->opts, j->blocks.kind == CV_JOB_BLOCKS_LIST ? j->blocks.ngroups : 1,
                            NULL, e))
        return -1;
    if (j->method && j->method->resolve &&
        j->method->resolve(&j->opts, curvature_given, &j->curvature, e))
        return -1;
    if (def->uses_curvature && cv_op_kron_check(&j->opts, j->curvature, e))
        return -1;
    if (def->check && def->check(&j->opts, j->curvature, e))
        return -1;
    if (j->method && check_method_options(def, &j->opts, j->method->name, e))
        return -1;
    return j->method && j->method->check ? j->method->check(&j->opts, j->curvature, e) : 0;
}

cv_job_spec *cv_job_parse(const cJSON *doc, cv_err *e)
{
    if (!cJSON_IsObject(doc)) {
        cv_err_set(e, CV_EINVAL, "invalid_job", "", "a job must be a JSON object");
        return NULL;
    }
    const cv_op_def *def;
    if (validate_known_fields(doc, e) || !(def = find_op(doc, e)) || validate_fields(doc, def, e))
        return NULL;
    cv_job_spec *j = cv_err_calloc(sizeof *j, "out of memory", e);
    if (!j)
        return NULL;
    j->op = def;
    const cJSON *cu = field(doc, "curvature"), *seed = field(doc, "seed");
    j->curvature = cu ? (cv_curvature)cv_curvature_from_name(cu->valuestring) : CV_CURV_HESSIAN;
    j->seed = seed ? (uint64_t)seed->valuedouble : 0;
    const cJSON *mb = field(doc, "micro_batch");
    j->micro_batch = mb ? (size_t)mb->valuedouble : 0;
    j->model = dup_or_null(field(doc, "model"));
    j->dataset = dup_or_null(field(doc, "dataset"));
    if ((field(doc, "model") && !j->model) || (field(doc, "dataset") && !j->dataset) ||
        parse_batch(field(doc, "batch"), j) || parse_blocks(field(doc, "blocks"), j)) {
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
        cv_job_spec_free(j);
        return NULL;
    }
    if (parse_options(field(doc, "options"), cu != NULL, j, e)) {
        cv_job_spec_free(j);
        return NULL;
    }
    return j;
}

void cv_job_spec_free(cv_job_spec *j)
{
    if (!j)
        return;
    free(j->model);
    free(j->dataset);
    free(j->batch.indices);
    for (int i = 0; i < j->blocks.nnames; i++)
        free(j->blocks.names[i]);
    free(j->blocks.names);
    free(j->blocks.group_len);
    free(j->blocks.resolved);
    cv_opts_release(&j->opts);
    free(j->opts.args);
    free(j);
}

/* ---- binding to a model and dataset --------------------------------------- */

static int check_batch(const cv_job_spec *j, const cv_dataset *d, cv_err *e)
{
    if (j->batch.kind == CV_JOB_BATCH_INDICES) {
        for (size_t i = 0; i < j->batch.count; i++)
            if ((size_t)j->batch.indices[i] >= d->n) {
                char f[48];
                snprintf(f, sizeof f, "batch.indices[%zu]", i);
                return cv_err_set(e, CV_EINVAL, "invalid_batch", f,
                                  "sample index %d is beyond the dataset's %zu samples",
                                  (int)j->batch.indices[i], d->n);
            }
    } else if (j->batch.kind == CV_JOB_BATCH_RANGE) {
        double o = (double)j->batch.offset, s = j->batch.size ? (double)j->batch.size : 1;
        if (o >= (double)d->n || o + s > (double)d->n)
            return cv_err_set(e, CV_EINVAL, "invalid_batch",
                              j->batch.has_offset ? "batch.offset" : "batch.size",
                              "batch [%.0f, %.0f) is not inside the dataset's %zu samples", o,
                              o + s, d->n);
    }
    return 0;
}

static int resolve_blocks(const cv_job_spec *j, const cv_model *m, cv_block *out, cv_err *e)
{
    if (j->blocks.kind == CV_JOB_BLOCKS_FULL) {
        cv_block_full(m, out);
        return 0;
    }
    if (j->blocks.kind == CV_JOB_BLOCKS_LAYER) {
        cv_blocks_per_layer(m, out, cv_blocks_per_layer(m, NULL, 0));
        return 0;
    }
    for (int g = 0, ni = 0; g < j->blocks.ngroups; g++) {
        int idx[2 * CV_MAX_LAYERS];
        for (int i = 0; i < j->blocks.group_len[g]; i++) {
            const char *name = j->blocks.names[ni++];
            int t = cv_model_find_param(m, name);
            if (t < 0) {
                char f[48], hint[96];
                const char *names[CV_MAX_LAYERS * CV_MAX_LAYER_PARAMS];
                int np = cv_model_param_count(m); /* <= the array's size */
                for (int q = 0; q < np; q++)
                    names[q] = cv_model_param(m, q)->name;
                snprintf(f, sizeof f, "blocks[%d][%d]", g, i);
                return cv_err_set(e, CV_EINVAL, "unknown_parameter", f,
                                  "the model has no parameter named '%s'%s", name,
                                  cv_suggest_hint(name, names, np, hint, sizeof hint));
            }
            if (i >= 2 * CV_MAX_LAYERS)
                return cv_err_set(e, CV_EINVAL, "invalid_blocks", "blocks", "block too large");
            idx[i] = t;
        }
        if (cv_block_from_indices(m, idx, j->blocks.group_len[g], &out[g], e))
            return -1;
    }
    return 0;
}

int cv_job_bind(cv_job_spec *j, const cv_model *m, const cv_dataset *d, cv_err *e)
{
    if (cv_dataset_check(d, m, e) || check_batch(j, d, e))
        return -1;
    return cv_job_bind_model(j, m, e);
}

int cv_job_bind_model(cv_job_spec *j, const cv_model *m, cv_err *e)
{
    int n = j->blocks.kind == CV_JOB_BLOCKS_FULL    ? 1
            : j->blocks.kind == CV_JOB_BLOCKS_LAYER ? cv_blocks_per_layer(m, NULL, 0)
                                                    : j->blocks.ngroups;
    free(j->blocks.resolved);
    j->blocks.nresolved = 0;
    j->blocks.resolved = calloc((size_t)(n > 0 ? n : 1), sizeof(cv_block));
    if (!j->blocks.resolved)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "blocks", "blocks");
    if (resolve_blocks(j, m, j->blocks.resolved, e)) {
        free(j->blocks.resolved);
        j->blocks.resolved = NULL;
        return -1;
    }
    j->blocks.nresolved = n;
    if (check_vector_option(&j->opts, n, n == 1 ? &j->blocks.resolved[0] : NULL, e))
        return -1;
    for (int i = 0; i < n && j->op->bind; i++)
        if (j->op->bind(&j->opts, &j->blocks.resolved[i], e))
            return -1;
    return j->op->bind_model ? j->op->bind_model(&j->opts, m, j->blocks.resolved, n, e) : 0;
}

/* ---- running ---------------------------------------------------------------- */

size_t cv_job_batch_size(const cv_job_spec *j, size_t dataset_n)
{
    if (j->batch.kind == CV_JOB_BATCH_ALL)
        return dataset_n;
    if (j->batch.kind == CV_JOB_BATCH_RANGE)
        return j->batch.size ? j->batch.size
               : dataset_n > j->batch.offset ? dataset_n - j->batch.offset
                                             : 0;
    return j->batch.count;
}

size_t cv_job_batch_copy_bytes(const cv_job_spec *j, const cv_dataset *d)
{
    if (j->batch.kind != CV_JOB_BATCH_INDICES)
        return 0;
    double per = 4.0 * (double)cv_shape_numel(&d->x_shape) +
                 (d->y_is_index ? 8.0 : 4.0) * (double)cv_shape_numel(&d->y_shape) +
                 (double)sizeof(size_t);
    double b = per * (double)j->batch.count;
    return b >= (double)SIZE_MAX ? SIZE_MAX : (size_t)b;
}

/* Samples [first, first + n) of the job's batch: a view of the dataset for
 * all or a range (no copy; cv_job_bind checked it), a gathered copy for
 * indices. */
static int batch_part(const cv_job_spec *j, const cv_dataset *d, size_t first, size_t n,
                      cv_batch *out, cv_err *e)
{
    if (j->batch.kind == CV_JOB_BATCH_ALL) {
        cv_batch_view(d, first, n, out);
        return 0;
    }
    if (j->batch.kind == CV_JOB_BATCH_RANGE) {
        size_t o = j->batch.offset;
        if (o >= d->n || (j->batch.size && j->batch.size > d->n - o))
            return cv_err_set(e, CV_EINVAL, "out_of_range", "batch", "batch outside the dataset");
        cv_batch_view(d, o + first, n, out);
        return 0;
    }
    if (n == 0) {
        cv_batch_view(d, 0, 0, out);
        return 0;
    }
    size_t *v = malloc(sizeof(size_t) * n);
    if (!v)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "batch", "batch indices");
    for (size_t i = 0; i < n; i++)
        v[i] = (size_t)j->batch.indices[first + i];
    int rc = cv_batch_gather(d, v, n, out, e);
    free(v);
    return rc;
}

static int make_batch(const cv_job_spec *j, const cv_dataset *d, cv_batch *out, cv_err *e)
{
    return batch_part(j, d, 0, cv_job_batch_size(j, d->n), out, e);
}

int cv_job_shard(const cv_job_spec *j, const cv_dataset *d, int ranks, int rank,
                 cv_batch *out, cv_err *e)
{
    size_t first, n;
    cv_comm_share(cv_job_batch_size(j, d->n), ranks, rank, &first, &n);
    return batch_part(j, d, first, n, out, e);
}

int cv_job_bind_shard(cv_job_spec *j, const cv_model *m, const cv_dataset *d,
                      const cv_comm *comm, cv_batch *shard, cv_err *e)
{
    memset(shard, 0, sizeof *shard);
    int rc = check_batch(j, d, e) ||
                     cv_job_shard(j, d, cv_comm_size(comm), cv_comm_rank(comm), shard, e)
                 ? -1
                 : 0;
    if (!rc && shard->n && cv_dataset_check(shard, m, e)) {
        size_t first, n;
        cv_comm_share(cv_job_batch_size(j, d->n), cv_comm_size(comm), cv_comm_rank(comm),
                      &first, &n);
        char msg[sizeof e->message + 160];
        snprintf(msg, sizeof msg, "%.400s (in samples [%zu, %zu) of the batch: rank %d's shard, "
                 "sample numbers counted from its start)", e->message, first, first + n,
                 cv_comm_rank(comm));
        msg[sizeof e->message - 1] = 0;
        memcpy(e->message, msg, sizeof e->message);
        rc = -1;
    }
    if (!rc)
        rc = cv_job_bind_model(j, m, e);
    if (rc)
        cv_dataset_free(shard);
    return cv_comm_agree(comm, rc, NULL, e);
}

/* One block's run; a Kronecker curvature's result adds block_kinds and
 * "exact" (false unless the op answered from the factors). */
static int run_one(cv_op_run_fn run, cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    if (run(c, b, out, e))
        return -1;
    if (c->kron) {
        if (!cJSON_GetObjectItemCaseSensitive(out, "exact"))
            cJSON_AddBoolToObject(out, "exact", 0);
        cv_op_kron_block_kinds(c, b, out);
    }
    return 0;
}

static int run_blocks(const cv_job_spec *j, cv_op_ctx *c, cJSON *res, cv_err *e)
{
    cv_op_run_fn run = j->method ? j->method->run : j->op->run;
    if (j->blocks.kind == CV_JOB_BLOCKS_FULL || !j->op->blockwise) /* one result */
        return run_one(run, c, &j->blocks.resolved[0], res, e);
    cJSON *arr = cJSON_AddArrayToObject(res, "blocks");
    int rc = 0;
    for (int i = 0; i < j->blocks.nresolved && !rc; i++) {
        const cv_block *b = &j->blocks.resolved[i];
        cJSON *o = cJSON_CreateObject();
        cJSON_AddItemToArray(arr, o);
        if (b->name[0])
            cJSON_AddStringToObject(o, "name", b->name);
        cJSON_AddItemToObject(o, "params", cv_json_param_names(c->m, b));
        cJSON_AddNumberToObject(o, "dim", (double)b->dim);
        rc = run_one(run, c, b, o, e);
    }
    return rc;
}

/* ---- memory ------------------------------------------------------------------ */

/* The op's (or its method's) memory needs, the largest over the job's blocks. */
static void op_memory(const cv_job_spec *j, const cv_model *m, size_t n, cv_op_memory *out)
{
    cv_op_memory_fn fn = j->method && j->method->memory ? j->method->memory : j->op->memory;
    *out = (cv_op_memory){0, 1, 0, 0, {0}};
    cv_err ignored;
    if (cv_kron_sizes_of(m, &out->kron, &ignored)) /* out of memory: planned without them */
        out->kron = (cv_kron_sizes){0};
    for (int i = 0; i < j->blocks.nresolved; i++) {
        const cv_block *b = &j->blocks.resolved[i];
        cv_op_memory one = {2 * b->dim * sizeof(double), 1, 0, 0, out->kron};
        if (fn)
            fn(&j->opts, j->op->uses_curvature ? j->curvature : CV_CURV_HESSIAN, b, n,
               cv_model_output_dim(m), &one);
        if (one.vector_bytes > out->vector_bytes)
            out->vector_bytes = one.vector_bytes;
        if (one.max_vectors > out->max_vectors)
            out->max_vectors = one.max_vectors;
        if (one.factor_bytes > out->factor_bytes) /* the job's factors, once */
            out->factor_bytes = one.factor_bytes;
        out->pairs |= one.pairs;
    }
}

/* The engine options of job j on a batch of n samples (the whole batch's). */
static void engine_options(const cv_job_spec *j, const cv_model *m, size_t n,
                           const cv_job_limits *lim, cv_progress *p, cv_curv_options *co)
{
    cv_op_memory om;
    op_memory(j, m, n, &om);
    *co = (cv_curv_options){0};
    co->mc_samples = ((const cv_op_base *)j->opts.args)->mc_samples;
    co->seed = CV_OP_CURV_SEED(j->seed);
    co->memory_budget = lim->job_memory;
    co->micro_batch = j->micro_batch;
    co->vector_bytes = om.vector_bytes;
    co->factor_bytes = om.factor_bytes;
    co->max_vectors = om.max_vectors;
    co->pairs = om.pairs;
    co->kind = j->op->uses_curvature
                   ? cv_op_kron_engine_kind(j->curvature, (const cv_op_base *)j->opts.args)
                   : CV_CURV_GGN;
    co->progress = p;
}

static void add_memory_fields(const cv_curv *c, cJSON *res)
{
    cv_curv_plan pl;
    cv_curv_memory(c, &pl);
    cJSON_AddNumberToObject(res, "micro_batches", (double)pl.micro_batches);
    cJSON_AddNumberToObject(res, "micro_batch_size", (double)pl.micro_batch);
    cJSON_AddNumberToObject(res, "cached_micro_batches", (double)pl.cached);
    cJSON_AddNumberToObject(res, "peak_memory_bytes", (double)pl.peak_bytes);
}

int cv_job_check_memory(const cv_job_spec *j, const cv_model *m, const cv_dataset *d,
                        const cv_job_limits *lim, cv_curv_plan *plan, cv_err *e)
{
    cv_curv_plan local;
    cv_batch batch;
    if (!lim->job_memory && !j->micro_batch && !plan)
        return 0;
    if (j->batch.kind == CV_JOB_BATCH_INDICES) {
        /* the probe reads the first two samples only: gather just those (the
         * batch's own size is what the plan splits) */
        size_t idx[2] = {(size_t)j->batch.indices[0],
                         (size_t)j->batch.indices[j->batch.count > 1 ? 1 : 0]};
        if (cv_batch_gather(d, idx, j->batch.count > 1 ? 2 : 1, &batch, e))
            return -1;
        batch.n = j->batch.count;
    } else if (make_batch(j, d, &batch, e)) {
        return -1;
    }
    cv_curv_options co;
    engine_options(j, m, batch.n, lim, NULL, &co);
    int rc = cv_curv_plan_memory(m, &batch, &co, plan ? plan : &local, e);
    cv_dataset_free(&batch);
    return rc;
}

int cv_job_check_memory_shard(const cv_job_spec *j, const cv_model *m, const cv_batch *shard,
                              size_t n, const cv_comm *comm, const cv_job_limits *lim,
                              cv_curv_plan *plan, cv_err *e)
{
    cv_curv_plan local;
    cv_curv_options co;
    engine_options(j, m, n, lim, NULL, &co);
    co.comm = comm;
    int rc = (lim->job_memory || j->micro_batch) &&
             cv_curv_plan_memory(m, shard, &co, plan ? plan : &local, e);
    return cv_comm_agree(comm, rc ? -1 : 0, NULL, e);
}

/* Runs bound job j on batch (this rank's shard when comm is active). */
static cJSON *exec_batch(const cv_job_spec *j, const cv_model *m, const cv_batch *batch,
                         size_t n, const cv_comm *comm, const cv_job_limits *lim,
                         const cv_curv_plan *plan, cv_progress *p, cv_job_store *store,
                         cv_err *e)
{
    double t0 = cv_now_s();
    if (!j->blocks.resolved) {
        cv_err_set(e, CV_EINTERNAL, "internal", "", "job run before it was bound");
        return NULL;
    }
    cv_job_limits deflim;
    if (!lim) {
        cv_job_limits_default(&deflim);
        lim = &deflim;
    }
    cv_progress local;
    if (!p) {
        cv_progress_init(&local);
        p = &local;
    }
    p->collective = cv_comm_active(comm);
    long done0 = atomic_load(&p->done);
    cv_comm_stats s0, s1;
    cv_comm_get_stats(comm, &s0);
    cv_op_ctx c = {0};
    c.m = m;
    c.kind = j->curvature;
    c.opts = &j->opts;
    c.method = j->method ? j->method->name : NULL;
    c.seed = j->seed;
    c.progress = p;
    c.lim = lim;
    c.store = store;
    c.history = &j->history;

    cv_curv_options co;
    engine_options(j, m, n, lim, p, &co);
    co.comm = comm;
    co.plan = plan;
    c.curv = cv_curv_new(m, batch, &co, e);
    if (!c.curv)
        return NULL;
    if (j->op->uses_curvature && cv_curvature_is_kron(c.kind) &&
        cv_op_kron_new(&c, j->blocks.resolved, j->blocks.nresolved, e)) {
        cv_curv_free(c.curv);
        return NULL;
    }
    cJSON *res = cJSON_CreateObject();
    cJSON_AddStringToObject(res, "op", j->op->name);
    if (j->op->uses_curvature)
        cJSON_AddStringToObject(res, "curvature", cv_curvature_name(c.kind));
    cJSON_AddNumberToObject(res, "batch_size", (double)cv_curv_batch_size(c.curv));
    cJSON_AddNumberToObject(res, "num_params", (double)m->nparams_total);
    if (run_blocks(j, &c, res, e)) {
        cJSON_Delete(res);
        res = NULL;
    } else {
        cJSON_AddNumberToObject(res, "matvecs", (double)(atomic_load(&p->done) - done0));
        cJSON_AddNumberToObject(res, "elapsed_s", cv_now_s() - t0);
        add_memory_fields(c.curv, res);
        if (cv_comm_active(comm)) {
            cJSON_AddNumberToObject(res, "ranks", cv_comm_size(comm));
            cv_comm_get_stats(comm, &s1);
            cJSON *cs = cJSON_AddObjectToObject(res, "communication");
            cJSON_AddNumberToObject(cs, "collectives", (double)(s1.collectives - s0.collectives));
            cJSON_AddNumberToObject(cs, "bytes", (double)(s1.bytes - s0.bytes));
            cJSON_AddNumberToObject(cs, "seconds", s1.seconds - s0.seconds);
        }
    }
    cv_op_kron_free(&c);
    cv_curv_free(c.curv);
    return res;
}

/* ---- a curvature operator kept open (libcurvd's curvd_operator) ------------ */

struct cv_job_linop {
    cv_batch batch;
    cv_progress progress;
    cv_op_ctx c;
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_job_limits lim;
};

void cv_job_linop_close(cv_job_linop *o)
{
    if (!o)
        return;
    cv_op_kron_free(&o->c);
    cv_curv_free(o->c.curv);
    cv_dataset_free(&o->batch);
    free(o);
}

cv_job_linop *cv_job_linop_open(const cv_job_spec *j, const cv_model *m, const cv_dataset *d,
                                const cv_job_limits *lim, cv_err *e)
{
    if (!j->blocks.resolved || !j->op->uses_curvature || j->blocks.nresolved != 1) {
        cv_err_set(e, CV_EINVAL, "invalid_blocks", "blocks",
                   "an operator needs a bound job on a curvature with one block (blocks "
                   "\"full\" or one group), got %d", j->blocks.nresolved);
        return NULL;
    }
    cv_job_linop *o = cv_err_calloc(sizeof *o, "operator", e);
    if (!o)
        return NULL;
    cv_job_limits_default(&o->lim);
    if (lim)
        o->lim = *lim;
    cv_progress_init(&o->progress);
    o->c.m = m;
    o->c.kind = j->curvature;
    o->c.opts = &j->opts;
    o->c.seed = j->seed;
    o->c.progress = &o->progress;
    o->c.lim = &o->lim;
    cv_curv_options co;
    if (make_batch(j, d, &o->batch, e)) {
        free(o);
        return NULL;
    }
    engine_options(j, m, o->batch.n, &o->lim, &o->progress, &co);
    o->c.curv = cv_curv_new(m, &o->batch, &co, e);
    if (!o->c.curv ||
        (cv_curvature_is_kron(o->c.kind) && cv_op_kron_new(&o->c, j->blocks.resolved, 1, e))) {
        cv_job_linop_close(o);
        return NULL;
    }
    cv_op_linop(&o->c, &j->blocks.resolved[0], &o->op, &o->lc);
    return o;
}

size_t cv_job_linop_dim(const cv_job_linop *o) { return o->op.n; }

int cv_job_linop_apply(cv_job_linop *o, int k, const double *X, double *Y, cv_err *e)
{
    return cv_linop_apply(&o->op, k, X, Y, e);
}

cJSON *cv_job_exec(const cv_job_spec *j, const cv_model *m, const cv_dataset *d,
                   const cv_job_limits *lim, cv_progress *p, cv_err *e)
{
    return cv_job_exec_store(j, m, d, lim, p, NULL, e);
}

cJSON *cv_job_exec_store(const cv_job_spec *j, const cv_model *m, const cv_dataset *d,
                         const cv_job_limits *lim, cv_progress *p, cv_job_store *store,
                         cv_err *e)
{
    return cv_job_exec_planned(j, m, d, lim, NULL, p, store, e);
}

cJSON *cv_job_exec_planned(const cv_job_spec *j, const cv_model *m, const cv_dataset *d,
                           const cv_job_limits *lim, const cv_curv_plan *plan, cv_progress *p,
                           cv_job_store *store, cv_err *e)
{
    cv_batch batch;
    if (make_batch(j, d, &batch, e))
        return NULL;
    cJSON *res = exec_batch(j, m, &batch, batch.n, NULL, lim, plan, p, store, e);
    cv_dataset_free(&batch);
    return res;
}

cJSON *cv_job_exec_shard(const cv_job_spec *j, const cv_model *m, const cv_batch *shard,
                         size_t n, const cv_comm *comm, const cv_job_limits *lim,
                         cv_progress *p, cv_err *e)
{
    return exec_batch(j, m, shard, n, comm, lim, NULL, p, NULL, e);
}

cJSON *cv_job_run(const cJSON *doc, const cv_model *m, const cv_dataset *d,
                  const cv_job_limits *lim, cv_progress *p, cv_err *e)
{
    cv_job_spec *j = cv_job_parse(doc, e);
    cJSON *res = j && !cv_job_bind(j, m, d, e) ? cv_job_exec(j, m, d, lim, p, e) : NULL;
    cv_job_spec_free(j);
    return res;
}

/* ---- what a job costs the service (--max-memory, server/jobs.c) ------------- */

size_t cv_job_spec_bytes(const cv_job_spec *j)
{
    size_t b = sizeof *j + j->op->args_size + j->batch.count * sizeof(int32_t);
    b += (j->model ? strlen(j->model) + 1 : 0) + (j->dataset ? strlen(j->dataset) + 1 : 0);
    b += (size_t)j->blocks.ngroups * sizeof(int) + (size_t)j->blocks.nnames * sizeof(char *);
    for (int i = 0; i < j->blocks.nnames; i++)
        b += strlen(j->blocks.names[i]) + 1;
    b += (size_t)(j->blocks.nresolved > 0 ? j->blocks.nresolved : 0) * sizeof(cv_block);
    for (int i = 0; j->opts.specs && j->opts.specs[i].name; i++) {
        const cv_opt_spec *s = &j->opts.specs[i];
        const char *at = (const char *)j->opts.args + s->offset;
        if (s->type == CV_OPT_LIST)
            b += (size_t)((const cv_opt_list *)at)->n * sizeof(double);
        else if (s->type == CV_OPT_ENUM_OR_LIST)
            b += (size_t)((const cv_opt_choice_list *)at)->list.n * sizeof(double);
    }
    return b;
}

/* The value of the job's int or bool option `name` (0 when the op has none). */
static int opt_int(const cv_job_spec *j, const char *name)
{
    for (int i = 0; j->opts.specs && j->opts.specs[i].name; i++) {
        const cv_opt_spec *s = &j->opts.specs[i];
        if (strcmp(s->name, name) == 0 && (s->type == CV_OPT_INT || s->type == CV_OPT_BOOL))
            return *(const int *)((const char *)j->opts.args + s->offset);
    }
    return 0;
}

/* The length of the job's list option `name` (0 when the op has none or it
 * was not given). */
static double opt_list_len(const cv_job_spec *j, const char *name)
{
    for (int i = 0; j->opts.specs && j->opts.specs[i].name; i++) {
        const cv_opt_spec *s = &j->opts.specs[i];
        if (strcmp(s->name, name) == 0 && s->type == CV_OPT_LIST)
            return (double)((const cv_opt_list *)((const char *)j->opts.args + s->offset))->n;
    }
    return 0;
}

/* Numbers in the large fields of a result that is not blockwise, on n
 * samples of C outputs each: kfac's factors and their eigenvalues (as
 * asked), predict's per-point fields (mean, variance, for a classifier
 * probs and with samples mc_probs: C each; covariance C^2) on the batch or
 * options.x, and its posterior samples. */
static double whole_result_numbers(const cv_job_spec *j, const cv_model *m, double n, double C)
{
    if (j->op == &cv_op_kfac) {
        cv_kron_sizes ks;
        cv_err ignored;
        if (cv_kron_sizes_of(m, &ks, &ignored))
            return 0;
        return (opt_int(j, "return_factors") ? ks.square : 0) +
               (opt_int(j, "eigenvalues") ? ks.linear : 0);
    }
    if (j->op == &cv_op_predict) {
        double in = (double)cv_shape_numel(&m->input_shape), x = opt_list_len(j, "x");
        double N = x > 0 && in > 0 ? x / in : n;
        double post = opt_int(j, "return_posterior_samples")
                          ? (double)opt_int(j, "samples") * (double)cv_lap_of(&j->opts)->post_dim
                          : 0;
        int cls = cv_loss_is_class(m->loss), mc = cls && cv_opts_given(&j->opts, "samples");
        double per = (2 + cls + mc) * C + (opt_int(j, "return_covariance") ? C * C : 0);
        return N * per + post;
    }
    return 0;
}

/* Numbers in one block's result of dimension D on n samples of C outputs each. */
static double block_result_numbers(const cv_job_spec *j, double D, double n, double C)
{
    const cv_op_def *op = j->op;
    if (op == &cv_op_dense)
        return D * D;
    if (op == &cv_op_per_sample)
        return n * D;
    if (op == &cv_op_jacobian)
        return n * C * D;
    if (op == &cv_op_jvp)
        return n * C;
    if (op == &cv_op_diag) /* diag and stderr, and the per-sample diagonals if asked */
        return 2 * D + (opt_int(j, "per_sample") ? n * D : 0);
    if (op == &cv_op_gradient || op == &cv_op_matvec || op == &cv_op_vjp ||
        op == &cv_op_newton)
        return D;
    if (op == &cv_op_solve) { /* k right-hand sides given as k x D numbers, else one */
        for (int i = 0; j->opts.specs && j->opts.specs[i].name; i++)
            if (strcmp(j->opts.specs[i].name, "rhs") == 0) {
                const cv_opt_choice_list *r =
                    (const void *)((const char *)j->opts.args + j->opts.specs[i].offset);
                if (r->choice < 0 && D > 0 && r->list.n > D)
                    return (double)r->list.n;
            }
        return D;
    }
    if (op == &cv_op_eigen)
        return opt_int(j, "return_vectors") ? (double)opt_int(j, "k") * D : 0;
    if (op == &cv_op_density) /* the grid and the density on it */
        return 2 * (double)opt_int(j, "grid_points");
    if (op == &cv_op_snr) { /* k directions (8 numbers each); raw: gamma n x k, lambda ns x k */
        double mc = opt_int(j, "mc_samples") > 1 ? opt_int(j, "mc_samples") : 1;
        double k = cv_opts_given(&j->opts, "k") ? opt_int(j, "k") : C;
        if (k > n * C * mc)
            k = n * C * mc; /* the rank bounds the directions */
        return 8 * k + (opt_int(j, "return_raw") ? 2 * n * k : 0); /* ns <= n */
    }
    return 0;
}

double cv_job_result_numbers(const cv_job_spec *j, const cv_model *m, size_t n)
{
    double C = (double)cv_model_output_dim(m);
    double total = whole_result_numbers(j, m, (double)n, C);
    for (int i = 0; i < j->blocks.nresolved; i++)
        total += block_result_numbers(j, (double)j->blocks.resolved[i].dim, (double)n, C);
    return total;
}

int cv_job_spec_set_indices(cv_job_spec *j, int32_t *idx, size_t count, cv_err *e)
{
    if (j->batch.kind != CV_JOB_BATCH_INDICES || !count) {
        free(idx);
        return cv_err_set(e, CV_EINTERNAL, "internal", "batch.indices",
                          "indices given apart from a job without an index list");
    }
    free(j->batch.indices);
    j->batch.indices = idx;
    j->batch.count = count;
    return 0;
}
