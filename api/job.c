/* job.c - the job document: validation of its common fields, resolution of
 * batch and blocks against a model and dataset, and the result envelope
 * (op, curvature, matvecs, elapsed_s, per-block results). */
#include "job.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/ops.h"

static const cv_op_def *const op_table[] = {
    &cv_op_loss,  &cv_op_gradient, &cv_op_matvec,  &cv_op_dense, &cv_op_per_sample,
    &cv_op_trace, &cv_op_diag,     &cv_op_eigen,   &cv_op_density,
    &cv_op_solve, &cv_op_newton,   &cv_op_snr,     NULL};

const cv_op_def *cv_op_find(const char *name)
{
    for (int i = 0; op_table[i]; i++)
        if (strcmp(op_table[i]->name, name) == 0)
            return op_table[i];
    return NULL;
}

const char *const *cv_job_op_names(void)
{
    static const char *names[sizeof op_table / sizeof op_table[0]];
    for (int i = 0; op_table[i]; i++)
        names[i] = op_table[i]->name;
    return names;
}

void cv_job_limits_default(cv_job_limits *l)
{
    l->dense_max = 4096;
    l->max_vector_dim = 0;
    l->blas_threads = 0;
}

cJSON *cv_err_to_json(const cv_err *e)
{
    cJSON *root = cJSON_CreateObject(), *err = cJSON_AddObjectToObject(root, "error");
    cJSON_AddStringToObject(err, "code", e->code[0] ? e->code : cv_status_name(e->status));
    cJSON_AddStringToObject(err, "message", e->message);
    cJSON_AddStringToObject(err, "field", e->field);
    return root;
}

static const cJSON *field(const cJSON *job, const char *name)
{
    return cJSON_GetObjectItemCaseSensitive(job, name);
}

static const char *string_field(const cJSON *job, const char *name)
{
    const cJSON *v = field(job, name);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

const char *cv_job_model_name(const cJSON *job) { return string_field(job, "model"); }
const char *cv_job_dataset_name(const cJSON *job) { return string_field(job, "dataset"); }
const char *cv_job_op_name(const cJSON *job) { return string_field(job, "op"); }

/* ---- validation ------------------------------------------------------------ */

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

static int validate_blocks(const cJSON *b, cv_err *e)
{
    if (!b)
        return 0;
    if (cJSON_IsString(b)) {
        if (strcmp(b->valuestring, "full") && strcmp(b->valuestring, "layer"))
            return cv_err_set(e, CV_EINVAL, "invalid_blocks", "blocks",
                              "blocks must be \"full\", \"layer\" or a list of lists of "
                              "parameter names, got \"%s\"",
                              b->valuestring);
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
    return 0;
}

static const char *const known_fields[] = {"op",     "model", "dataset", "curvature", "batch",
                                           "blocks", "seed",  "options", NULL};

static int validate_known_fields(const cJSON *job, cv_err *e)
{
    const cJSON *v;
    cJSON_ArrayForEach(v, job)
    {
        int ok = 0;
        for (int i = 0; known_fields[i]; i++)
            ok |= strcmp(known_fields[i], v->string) == 0;
        if (!ok)
            return cv_err_set(e, CV_EINVAL, "unknown_field", v->string,
                              "unknown field '%s' in job (known: op, model, dataset, "
                              "curvature, batch, blocks, seed, options)",
                              v->string);
    }
    return 0;
}

int cv_job_validate(const cJSON *job, cv_err *e)
{
    if (!cJSON_IsObject(job))
        return cv_err_set(e, CV_EINVAL, "invalid_job", "", "a job must be a JSON object");
    if (validate_known_fields(job, e))
        return -1;
    const char *op = cv_job_op_name(job);
    if (!op)
        return cv_err_set(e, CV_EINVAL, "missing_field", "op", "job needs \"op\" (a string)");
    const cv_op_def *def = cv_op_find(op);
    if (!def)
        return cv_err_set(e, CV_EINVAL, "unknown_op", "op", "unknown op '%s'", op);
    for (int i = 1; i < 3; i++) {
        const cJSON *v = field(job, known_fields[i]);
        if (v && !cJSON_IsString(v))
            return cv_err_set(e, CV_EINVAL, "invalid_field", known_fields[i],
                              "%s must be a string", known_fields[i]);
    }
    const cJSON *cu = field(job, "curvature");
    if (cu && (!cJSON_IsString(cu) || cv_curvature_from_name(cu->valuestring) < 0))
        return cv_err_set(e, CV_EINVAL, "invalid_curvature", "curvature",
                          "curvature must be one of hessian, ggn, fisher_mc, ef");
    const cJSON *seed = field(job, "seed");
    if (seed && !is_nonneg_int(seed))
        return cv_err_set(e, CV_EINVAL, "invalid_field", "seed",
                          "seed must be a non-negative integer");
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
    const cJSON *opts = field(job, "options");
    if (cv_opts_validate(opts, def->options, e))
        return -1;
    return def->check ? def->check(opts, e) : 0;
}

/* ---- resolution against model and dataset -------------------------------- */

static int resolve_batch(const cJSON *b, const cv_dataset *d, cv_batch *out, cv_err *e)
{
    if (!b || cJSON_IsString(b))
        return cv_batch_range(d, 0, d->n, out, e);
    const cJSON *idx = field(b, "indices");
    if (idx) {
        size_t n = (size_t)cJSON_GetArraySize(idx), i = 0;
        size_t *v = malloc(sizeof(size_t) * n);
        if (!v)
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "batch", "batch indices");
        const cJSON *x;
        cJSON_ArrayForEach(x, idx) v[i++] = (size_t)x->valuedouble;
        int rc = cv_batch_gather(d, v, n, out, e);
        free(v);
        return rc;
    }
    const cJSON *off = field(b, "offset"), *size = field(b, "size");
    size_t o = off ? (size_t)off->valuedouble : 0;
    if (o >= d->n)
        return cv_err_set(e, CV_EINVAL, "invalid_batch", "batch.offset",
                          "batch.offset %zu is beyond the dataset's %zu samples", o, d->n);
    size_t s = size ? (size_t)size->valuedouble : d->n - o;
    return cv_batch_range(d, o, s, out, e);
}

static int resolve_blocks(const cJSON *spec, const cv_model *m, cv_block **out, int *count,
                          cv_err *e)
{
    int nlay = cv_blocks_per_layer(m, NULL, 0);
    int n = !spec || cJSON_IsString(spec)
                ? (spec && strcmp(spec->valuestring, "layer") == 0 ? nlay : 1)
                : cJSON_GetArraySize(spec);
    *out = calloc((size_t)n, sizeof(cv_block));
    *count = n;
    if (!*out)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "blocks", "blocks");
    if (!spec || (cJSON_IsString(spec) && strcmp(spec->valuestring, "full") == 0)) {
        cv_block_full(m, *out);
        return 0;
    }
    if (cJSON_IsString(spec)) {
        cv_blocks_per_layer(m, *out, n);
        return 0;
    }
    int bi = 0;
    const cJSON *g;
    cJSON_ArrayForEach(g, spec)
    {
        int idx[2 * CV_MAX_LAYERS], ni = 0;
        const cJSON *name;
        cJSON_ArrayForEach(name, g)
        {
            int t = cv_model_find_param(m, name->valuestring);
            if (t < 0) {
                char f[48];
                snprintf(f, sizeof f, "blocks[%d][%d]", bi, ni);
                return cv_err_set(e, CV_EINVAL, "unknown_parameter", f,
                                  "the model has no parameter named '%s'", name->valuestring);
            }
            if (ni >= 2 * CV_MAX_LAYERS)
                return cv_err_set(e, CV_EINVAL, "invalid_blocks", "blocks", "block too large");
            idx[ni++] = t;
        }
        if (cv_block_from_indices(m, idx, ni, &(*out)[bi], e))
            return -1;
        bi++;
    }
    return 0;
}

static cJSON *param_names(const cv_model *m, const cv_block *b)
{
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; i < b->count; i++)
        cJSON_AddItemToArray(a, cJSON_CreateString(cv_model_param(m, b->idx[i])->name));
    return a;
}

static int run_blocks(const cv_op_def *def, cv_op_ctx *c, const cJSON *spec, cJSON *res,
                      cv_err *e)
{
    cv_block *blocks = NULL;
    int nb = 0;
    int full = !spec || (cJSON_IsString(spec) && strcmp(spec->valuestring, "full") == 0);
    if (resolve_blocks(full ? NULL : spec, c->m, &blocks, &nb, e)) {
        free(blocks);
        return -1;
    }
    int rc = 0;
    if (full || !def->blockwise) { /* one result: the whole vector or the one group */
        rc = def->run(c, &blocks[0], res, e);
    } else {
        cJSON *arr = cJSON_AddArrayToObject(res, "blocks");
        for (int i = 0; i < nb && !rc; i++) {
            cJSON *o = cJSON_CreateObject();
            cJSON_AddItemToArray(arr, o);
            cJSON_AddItemToObject(o, "params", param_names(c->m, &blocks[i]));
            cJSON_AddNumberToObject(o, "dim", (double)blocks[i].dim);
            rc = def->run(c, &blocks[i], o, e);
        }
    }
    free(blocks);
    return rc;
}

int cv_job_check(const cJSON *job, const cv_model *m, const cv_dataset *d, cv_err *e)
{
    if (cv_job_validate(job, e) || cv_dataset_check(d, m, e))
        return -1;
    const cJSON *b = field(job, "batch");
    if (b && cJSON_IsObject(b)) {
        const cJSON *idx = field(b, "indices"), *off = field(b, "offset"), *size = field(b, "size");
        if (idx) {
            int i = 0;
            const cJSON *x;
            cJSON_ArrayForEach(x, idx)
            {
                if (x->valuedouble >= (double)d->n) {
                    char f[48];
                    snprintf(f, sizeof f, "batch.indices[%d]", i);
                    return cv_err_set(e, CV_EINVAL, "invalid_batch", f,
                                      "sample index %.0f is beyond the dataset's %zu samples",
                                      x->valuedouble, d->n);
                }
                i++;
            }
        } else {
            double o = off ? off->valuedouble : 0, s = size ? size->valuedouble : 1;
            if (o >= (double)d->n || o + s > (double)d->n)
                return cv_err_set(e, CV_EINVAL, "invalid_batch", off ? "batch.offset" : "batch.size",
                                  "batch [%.0f, %.0f) is not inside the dataset's %zu samples", o,
                                  o + s, d->n);
        }
    }
    const cJSON *spec = field(job, "blocks");
    cv_block *blocks = NULL;
    int nb = 0, rc = 0;
    if (spec && cJSON_IsArray(spec))
        rc = resolve_blocks(spec, m, &blocks, &nb, e);
    free(blocks);
    return rc;
}

static cv_curvature job_curvature(const cJSON *job)
{
    const char *s = string_field(job, "curvature");
    return s ? (cv_curvature)cv_curvature_from_name(s) : CV_CURV_HESSIAN;
}

cJSON *cv_job_run(const cJSON *job, const cv_model *m, const cv_dataset *d,
                  const cv_job_limits *lim, cv_progress *p, cv_err *e)
{
    double t0 = cv_now_s();
    if (cv_job_validate(job, e) || cv_dataset_check(d, m, e))
        return NULL;
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
    long done0 = atomic_load(&p->done);
    const cv_op_def *def = cv_op_find(cv_job_op_name(job));
    const cJSON *seedv = field(job, "seed");
    const cJSON *opts = field(job, "options");
    cv_op_ctx c = {0};
    c.m = m;
    c.kind = job_curvature(job);
    c.options = opts;
    c.seed = seedv ? (uint64_t)seedv->valuedouble : 0;
    c.progress = p;
    c.lim = lim;

    cv_batch batch;
    if (resolve_batch(field(job, "batch"), d, &batch, e))
        return NULL;
    cv_curv_options co = {cv_opt_int(opts, "mc_samples", 1), c.seed ^ 0x5eedF15Cull, 0};
    c.curv = cv_curv_new(m, &batch, &co, e);
    if (!c.curv) {
        cv_dataset_free(&batch);
        return NULL;
    }
    cJSON *res = cJSON_CreateObject();
    cJSON_AddStringToObject(res, "op", def->name);
    if (def->uses_curvature)
        cJSON_AddStringToObject(res, "curvature", cv_curvature_name(c.kind));
    cJSON_AddNumberToObject(res, "batch_size", (double)batch.n);
    cJSON_AddNumberToObject(res, "num_params", (double)m->nparams_total);
    if (run_blocks(def, &c, field(job, "blocks"), res, e)) {
        cJSON_Delete(res);
        res = NULL;
    } else {
        cJSON_AddNumberToObject(res, "matvecs", (double)(atomic_load(&p->done) - done0));
        cJSON_AddNumberToObject(res, "elapsed_s", cv_now_s() - t0);
    }
    cv_curv_free(c.curv);
    cv_dataset_free(&batch);
    return res;
}

/* ---- helpers shared by the op modules ------------------------------------ */

void cv_op_linop(cv_op_ctx *c, const cv_block *b, cv_linop *op, cv_curv_linop_ctx *lctx)
{
    cv_curv_linop(op, lctx, c->curv, c->kind, b, c->progress);
}

cJSON *cv_json_doubles(const double *v, size_t n)
{
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; i < n; i++)
        cJSON_AddItemToArray(a, cJSON_CreateNumber(v[i]));
    return a;
}

cJSON *cv_json_columns(const double *v, size_t n, int k)
{
    cJSON *a = cJSON_CreateArray();
    for (int j = 0; j < k; j++)
        cJSON_AddItemToArray(a, cv_json_doubles(v + (size_t)j * n, n));
    return a;
}
