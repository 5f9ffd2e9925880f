/* libcurvd.c - the in-process C API of api/curvd.h (build/libcurvd.so):
 * model and dataset handles over cv_model / cv_dataset, and curvd_run, which
 * parses, binds, plans (job memory) and executes one job as `curvd run`
 * does, with every error turned into the API's JSON error document. */
#include "api/curvd.h"

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/arch.h"
#include "api/datafile.h"
#include "api/job.h"
#include "api/json_strict.h"
#include "api/params.h"

#define CURVD_EXPORT __attribute__((visibility("default")))

struct curvd_model {
    cv_model m;
};

struct curvd_data {
    cv_dataset d;
    float *x_owned;          /* token ids converted to float32 */
    int64_t *labels_owned;   /* int32 labels widened */
};

void openblas_set_num_threads(int num_threads);

/* ---- errors ---------------------------------------------------------------------- */

/* *err = the JSON error document of e (a fixed text when even that fails). */
static void put_err(const cv_err *e, char **err)
{
    if (!err)
        return;
    cJSON *j = cv_err_to_json(e);
    *err = j ? cJSON_PrintUnformatted(j) : NULL;
    cJSON_Delete(j);
    if (!*err)
        *err = strdup("{\"error\":{\"code\":\"out_of_memory\",\"message\":\"out of memory "
                      "reporting an error\",\"field\":\"\"}}");
}

static int fail(char **err, cv_status st, const char *code, const char *field, const char *msg)
{
    cv_err e;
    cv_err_set(&e, st, code, field, "%s", msg);
    put_err(&e, err);
    return -1;
}

/* ---- library --------------------------------------------------------------------- */

CURVD_EXPORT const char *curvd_version(void) { return CURVD_VERSION; }

CURVD_EXPORT int curvd_api_version(void) { return CURVD_API_VERSION; }

CURVD_EXPORT void curvd_free(void *p) { free(p); }

CURVD_EXPORT void curvd_set_blas_threads(int n) { openblas_set_num_threads(n < 1 ? 1 : n); }

/* ---- models ---------------------------------------------------------------------- */

CURVD_EXPORT curvd_model *curvd_model_open(const char *arch_json, size_t len, char **err)
{
    if (err)
        *err = NULL;
    if (!arch_json) {
        fail(err, CV_EINVAL, "invalid_value", "architecture", "architecture: NULL text");
        return NULL;
    }
    curvd_model *h = calloc(1, sizeof *h);
    if (!h) {
        fail(err, CV_ENOMEM, "out_of_memory", "", "out of memory");
        return NULL;
    }
    cv_err e;
    if (cv_arch_parse(arch_json, len, &h->m, &e) ||
        (cv_model_alloc(&h->m) &&
         cv_err_set(&e, CV_ENOMEM, "out_of_memory", "", "out of memory allocating %zu "
                    "parameters", h->m.nparams_total))) {
        put_err(&e, err);
        curvd_model_close(h);
        return NULL;
    }
    return h;
}

CURVD_EXPORT void curvd_model_close(curvd_model *m)
{
    if (!m)
        return;
    cv_model_free(&m->m);
    free(m);
}

CURVD_EXPORT int curvd_model_tensor_count(const curvd_model *m)
{
    return m ? cv_params_count(&m->m) : 0;
}

static const cv_tensor_info *entry(const curvd_model *m, int i, int *is_buffer)
{
    *is_buffer = 0;
    return m && i >= 0 ? cv_params_entry(&m->m, i, is_buffer) : NULL;
}

CURVD_EXPORT const char *curvd_model_tensor_name(const curvd_model *m, int i)
{
    int b;
    const cv_tensor_info *ti = entry(m, i, &b);
    return ti ? ti->name : NULL;
}

CURVD_EXPORT int64_t curvd_model_tensor_numel(const curvd_model *m, int i)
{
    int b;
    const cv_tensor_info *ti = entry(m, i, &b);
    return ti ? (int64_t)ti->numel : -1;
}

CURVD_EXPORT int curvd_model_tensor_is_param(const curvd_model *m, int i)
{
    int b;
    const cv_tensor_info *ti = entry(m, i, &b);
    return ti ? !b : -1;
}

CURVD_EXPORT int curvd_model_set_tensor(curvd_model *m, const char *name, const float *values,
                                        int64_t numel, char **err)
{
    if (err)
        *err = NULL;
    if (!m || !name || (!values && numel > 0) || numel < 0)
        return fail(err, CV_EINVAL, "invalid_value", name ? name : "",
                    "curvd_model_set_tensor: NULL model, name or values, or numel < 0");
    cv_err e;
    if (cv_params_set(&m->m, name, values, (size_t)numel, &e)) {
        put_err(&e, err);
        return -1;
    }
    return 0;
}

CURVD_EXPORT int curvd_model_load_params(curvd_model *m, const void *safetensors, size_t len,
                                         char **err)
{
    if (err)
        *err = NULL;
    if (!m || !safetensors)
        return fail(err, CV_EINVAL, "invalid_value", "params",
                    "curvd_model_load_params: NULL model or buffer");
    cv_err e;
    if (cv_params_parse(&m->m, safetensors, len, &e)) {
        put_err(&e, err);
        return -1;
    }
    return 0;
}

/* ---- datasets -------------------------------------------------------------------- */

static int set_shape(cv_shape *s, int rank, const int64_t *dims, const char *what, cv_err *e)
{
    if (rank < 0 || rank > CV_MAX_RANK - 1 || (rank > 0 && !dims))
        return cv_err_set(e, CV_EINVAL, "invalid_shape", what,
                          "%s: per-sample rank %d outside [0, %d] (or no shape given)", what,
                          rank, CV_MAX_RANK - 1);
    s->rank = rank;
    for (int i = 0; i < rank; i++) {
        if (dims[i] < 1 || dims[i] > INT32_MAX)
            return cv_err_set(e, CV_EINVAL, "invalid_shape", what,
                              "%s: dimension %d is %lld (must be >= 1)", what, i + 1,
                              (long long)dims[i]);
        s->dim[i] = (int)dims[i];
    }
    return 0;
}

/* x as the engine holds it: float32 borrowed, token ids converted. */
static int set_x(curvd_data *h, const void *x, int dtype, size_t count, cv_err *e)
{
    cv_dataset *d = &h->d;
    if (dtype == CURVD_FLOAT32) {
        d->x = (float *)x;
        return 0;
    }
    if (dtype != CURVD_INT64 && dtype != CURVD_INT32)
        return cv_err_set(e, CV_EINVAL, "bad_dtype", "x",
                          "x: dtype %d is not float32 (0), int64 (1) or int32 (2)", dtype);
    h->x_owned = malloc((count ? count : 1) * sizeof(float));
    if (!h->x_owned)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "x", "x: out of memory");
    for (size_t i = 0; i < count; i++) {
        int64_t v = dtype == CURVD_INT64 ? ((const int64_t *)x)[i] : ((const int32_t *)x)[i];
        if (v < -(1 << 24) || v > (1 << 24))
            return cv_err_set(e, CV_EINVAL, "invalid_value", "x",
                              "x: token id %lld at flat index %zu is outside [-2^24, 2^24]",
                              (long long)v, i);
        h->x_owned[i] = (float)v;
    }
    d->x = h->x_owned;
    d->x_dtype = dtype == CURVD_INT64 ? CV_DTYPE_INT64 : CV_DTYPE_INT32;
    return 0;
}

/* y as the engine holds it: int64 labels and float32 targets borrowed. */
static int set_y(curvd_data *h, const void *y, int dtype, size_t count, cv_err *e)
{
    cv_dataset *d = &h->d;
    if (dtype == CURVD_FLOAT32) {
        d->targets = (float *)y;
        return 0;
    }
    if (dtype != CURVD_INT64 && dtype != CURVD_INT32)
        return cv_err_set(e, CV_EINVAL, "bad_dtype", "y",
                          "y: dtype %d is not float32 (0), int64 (1) or int32 (2)", dtype);
    d->y_is_index = 1;
    if (dtype == CURVD_INT64) {
        d->labels = (int64_t *)y;
        return 0;
    }
    h->labels_owned = malloc((count ? count : 1) * sizeof(int64_t));
    if (!h->labels_owned)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "y", "y: out of memory");
    for (size_t i = 0; i < count; i++)
        h->labels_owned[i] = ((const int32_t *)y)[i];
    d->labels = h->labels_owned;
    return 0;
}

CURVD_EXPORT curvd_data *curvd_data_open(int64_t n, const void *x, int x_dtype, int x_rank,
                                         const int64_t *x_shape, const void *y, int y_dtype,
                                         int y_rank, const int64_t *y_shape, char **err)
{
    if (err)
        *err = NULL;
    cv_err e;
    curvd_data *h = calloc(1, sizeof *h);
    if (!h) {
        fail(err, CV_ENOMEM, "out_of_memory", "", "out of memory");
        return NULL;
    }
    h->d.borrowed = 1;
    h->d.n = n > 0 ? (size_t)n : 0;
    int rc = n < 1 ? cv_err_set(&e, CV_EINVAL, "invalid_shape", "x",
                                "x: the dataset needs at least one sample, got %lld",
                                (long long)n)
             : !x || !y ? cv_err_set(&e, CV_EINVAL, "invalid_value", !x ? "x" : "y",
                                     "%s: NULL buffer", !x ? "x" : "y")
                        : 0;
    if (!rc)
        rc = set_shape(&h->d.x_shape, x_rank, x_shape, "x", &e) ||
             set_shape(&h->d.y_shape, y_rank, y_shape, "y", &e);
    if (!rc)
        rc = set_x(h, x, x_dtype, h->d.n * cv_shape_numel(&h->d.x_shape), &e) ||
             set_y(h, y, y_dtype, h->d.n * cv_shape_numel(&h->d.y_shape), &e);
    if (rc) {
        put_err(&e, err);
        curvd_data_close(h);
        return NULL;
    }
    return h;
}

CURVD_EXPORT curvd_data *curvd_data_load(const void *safetensors, size_t len, char **err)
{
    if (err)
        *err = NULL;
    curvd_data *h = calloc(1, sizeof *h);
    if (!h || !safetensors) {
        fail(err, h ? CV_EINVAL : CV_ENOMEM, h ? "invalid_value" : "out_of_memory", "data",
             h ? "data: NULL buffer" : "out of memory");
        free(h);
        return NULL;
    }
    cv_err e;
    if (cv_datafile_parse(safetensors, len, &h->d, &e)) {
        put_err(&e, err);
        free(h);
        return NULL;
    }
    return h;
}

CURVD_EXPORT void curvd_data_close(curvd_data *d)
{
    if (!d)
        return;
    cv_dataset_free(&d->d);
    free(d->x_owned);
    free(d->labels_owned);
    free(d);
}

/* ---- jobs ------------------------------------------------------------------------ */

/* Job limits from the options document {"dense_max", "job_memory"}. */
static int read_limits(const char *options, cv_job_limits *lim, cv_err *e)
{
    cv_job_limits_default(lim);
    if (!options || !*options)
        return 0;
    cJSON *o = cv_json_parse_strict(options, strlen(options), "options", "options", e);
    int rc = o ? 0 : -1;
    if (o && !cJSON_IsObject(o))
        rc = cv_err_set(e, CV_EINVAL, "invalid_json", "options",
                        "options: not a JSON object");
    for (const cJSON *it = o ? o->child : NULL; it && !rc; it = it->next) {
        int dense = strcmp(it->string, "dense_max") == 0;
        if (!dense && strcmp(it->string, "job_memory") != 0)
            rc = cv_err_set(e, CV_EINVAL, "unknown_field", it->string,
                            "options.%s: unknown (dense_max, job_memory)", it->string);
        else if (!cJSON_IsNumber(it) || it->valuedouble < 0 || it->valuedouble > 1e18 ||
                 it->valuedouble != (double)(size_t)it->valuedouble)
            rc = cv_err_set(e, CV_EINVAL, "invalid_value", it->string,
                            "options.%s: must be a non-negative integer", it->string);
        else if (dense)
            lim->dense_max = (size_t)it->valuedouble;
        else
            lim->job_memory = (size_t)it->valuedouble;
    }
    cJSON_Delete(o);
    return rc;
}

/* The job text, strictly (api/json_strict.h); syntax errors name field "job". */
static cJSON *parse_job(const char *job_json, size_t len, cv_err *e)
{
    cJSON *doc = cv_json_parse_strict(job_json, len, "job", "", e);
    if (!doc && strcmp(e->code, "invalid_json") == 0 && !e->field[0])
        snprintf(e->field, sizeof e->field, "job");
    return doc;
}

static cJSON *run_spec(const cv_model *m, const cv_dataset *d, const cJSON *doc,
                       const cv_job_limits *lim, cv_err *e)
{
    cv_job_spec *j = cv_job_parse(doc, e);
    cJSON *res = NULL;
    /* no cv_job_check_memory first: the engine cv_job_exec builds plans the
     * same split under the same limits and refuses with the same error, and
     * the plan's probe products cost ~10 ms a job (issue 25's in-process times) */
    if (j && !cv_job_bind(j, m, d, e))
        res = cv_job_exec(j, m, d, lim, NULL, e);
    cv_job_spec_free(j);
    return res;
}

/* ---- operators ------------------------------------------------------------------ */

struct curvd_operator {
    cv_job_spec *spec;
    cv_job_linop *op;
};

CURVD_EXPORT void curvd_operator_close(curvd_operator *o)
{
    if (!o)
        return;
    cv_job_linop_close(o->op);
    cv_job_spec_free(o->spec);
    free(o);
}

CURVD_EXPORT curvd_operator *curvd_operator_open(const curvd_model *m, const curvd_data *d,
                                                 const char *job_json, size_t len,
                                                 const char *options, char **err)
{
    if (err)
        *err = NULL;
    if (!m || !d || !job_json) {
        fail(err, CV_EINVAL, "invalid_value", "job", "curvd_operator_open: NULL argument");
        return NULL;
    }
    cv_err e;
    cv_job_limits lim;
    curvd_operator *o = calloc(1, sizeof *o);
    cJSON *doc = NULL;
    int rc = !o ? cv_err_set(&e, CV_ENOMEM, "out_of_memory", "", "out of memory")
             : read_limits(options, &lim, &e) ? -1
             : !(doc = parse_job(job_json, len, &e)) ? -1
                                                    : 0;
    if (!rc && !(o->spec = cv_job_parse(doc, &e)))
        rc = -1;
    if (!rc && (cv_job_bind(o->spec, &m->m, &d->d, &e) ||
                cv_job_check_memory(o->spec, &m->m, &d->d, &lim, NULL, &e) ||
                !(o->op = cv_job_linop_open(o->spec, &m->m, &d->d, &lim, &e))))
        rc = -1;
    cJSON_Delete(doc);
    if (rc) {
        put_err(&e, err);
        curvd_operator_close(o);
        return NULL;
    }
    return o;
}

CURVD_EXPORT int64_t curvd_operator_dim(const curvd_operator *o)
{
    return o ? (int64_t)cv_job_linop_dim(o->op) : -1;
}

CURVD_EXPORT int curvd_operator_apply(curvd_operator *o, int k, const double *X, double *Y,
                                      char **err)
{
    if (err)
        *err = NULL;
    if (!o || !X || !Y || k < 1)
        return fail(err, CV_EINVAL, "invalid_value", "vector",
                    "curvd_operator_apply: NULL operator or vectors, or k < 1");
    cv_err e;
    if (cv_job_linop_apply(o->op, k, X, Y, &e)) {
        put_err(&e, err);
        return -1;
    }
    return 0;
}

CURVD_EXPORT char *curvd_run(const curvd_model *m, const curvd_data *d, const char *job_json,
                             size_t len, const char *options, char **err)
{
    if (err)
        *err = NULL;
    if (!m || !d || !job_json) {
        fail(err, CV_EINVAL, "invalid_value", "job", "curvd_run: NULL model, data or job");
        return NULL;
    }
    cv_err e;
    cv_job_limits lim;
    if (read_limits(options, &lim, &e)) {
        put_err(&e, err);
        return NULL;
    }
    cJSON *doc = parse_job(job_json, len, &e);
    cJSON *res = NULL;
    if (doc)
        res = run_spec(&m->m, &d->d, doc, &lim, &e);
    char *text = res ? cJSON_PrintUnformatted(res) : NULL;
    if (res && !text)
        cv_err_set(&e, CV_ENOMEM, "out_of_memory", "", "out of memory printing the result");
    if (!text)
        put_err(&e, err);
    cJSON_Delete(res);
    cJSON_Delete(doc);
    return text;
}
