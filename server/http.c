/* http.c - the HTTP API: libmicrohttpd daemon, body accumulation, the route
 * table and one handler per route (see http.h; routes in api/openapi.yaml). */
#include "server/http.h"

#include <arpa/inet.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

#include "api/arch.h"
#include "api/datafile.h"
#include "api/job.h"
#include "api/params.h"
#include "engine/curv.h"
#include "engine/linop.h"
#include "server/b64.h"
#include "server/dashboard.h"
#include "server/metrics.h"
#include "server/multipart.h"
#include "server/util.h"

struct cv_http {
    cv_http_config cfg;
    cv_registry *reg;
    cv_jobs *jobs;
    struct MHD_Daemon *d;
    int port;
    double started;
    atomic_ulong requests[6];
};

/* Per-request state: the accumulated body and, once dispatched, the reply. */
typedef struct {
    char *body;
    size_t len, cap;
    size_t limit;              /* --max-body, or --max-job-bytes for POST /v1/jobs */
    const char *limit_opt;     /* the option that set limit, for messages */
    int too_large;
    int oom;                   /* the body buffer could not grow */
    int dispatched;
} conn_state;

/* Stands in for a conn_state that could not be allocated: the request was
 * answered 503 at once; never written to, never freed. */
static conn_state oom_state = {.dispatched = 1};

#define MAX_PARAM 160

typedef struct {
    cv_http *h;
    struct MHD_Connection *conn;
    const char *method;        /* as routed (HEAD is served as GET) */
    const char *url;
    char param[MAX_PARAM];     /* the {name} / {id} path segment */
    const char *body;
    size_t body_len;
    /* reply */
    unsigned status;
    char *out;                 /* malloc()ed */
    size_t out_len;
    const char *ctype;
    char location[256];
    char allow[64];
    char extra_name[32], extra_value[64];
} req;

/* ---- replies --------------------------------------------------------------- */

static void set_text(req *r, unsigned status, char *text, size_t len, const char *ctype)
{
    free(r->out);
    r->status = status;
    r->out = text;
    r->out_len = len;
    r->ctype = ctype;
}

static void reply_err(req *r, const cv_err *e)
{
    cv_err fallback;
    if (!e || e->status == CV_OK) {
        cv_err_set(&fallback, CV_EINTERNAL, "internal", "", "internal error");
        e = &fallback;
    }
    unsigned st = (unsigned)cv_err_http_status(e->status);
    if (e->status == CV_ECANCELLED)
        st = 409;
    cv_err clean = *e; /* messages may quote client bytes */
    clean.code[sizeof clean.code - 1] = 0;
    clean.field[sizeof clean.field - 1] = 0;
    clean.message[sizeof clean.message - 1] = 0;
    cv_utf8_sanitize(clean.code);
    cv_utf8_sanitize(clean.field);
    cv_utf8_sanitize(clean.message);
    cJSON *j = cv_err_to_json(&clean);
    char *t = j ? cJSON_PrintUnformatted(j) : NULL;
    cJSON_Delete(j);
    if (!t) {
        static const char oom[] =
            "{\"error\":{\"code\":\"out_of_memory\",\"message\":\"out of memory\",\"field\":\"\"}}";
        t = strdup(oom);
        st = 500;
    }
    set_text(r, st, t, t ? strlen(t) : 0, "application/json");
}

static void reply_errf(req *r, cv_status st, const char *code, const char *field,
                       const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static void reply_errf(req *r, cv_status st, const char *code, const char *field,
                       const char *fmt, ...)
{
    cv_err e;
    char msg[sizeof e.message];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    cv_err_set(&e, st, code, field, "%s", msg);
    reply_err(r, &e);
}

static void reply_oom(req *r)
{
    reply_errf(r, CV_ENOMEM, "out_of_memory", "", "out of memory building the response");
}

/* Takes ownership of j. */
static void reply_json(req *r, unsigned status, cJSON *j)
{
    if (!j) {
        reply_oom(r);
        return;
    }
    char *t = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    if (!t) {
        reply_oom(r);
        return;
    }
    set_text(r, status, t, strlen(t), "application/json");
}

/* ---- request helpers ------------------------------------------------------- */

static const char *query(req *r, const char *key)
{
    return MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, key);
}

static const char *header(req *r, const char *key)
{
    return MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, key);
}

/* ?wait= / ?timeout= seconds, capped at cap (cap < 0: no cap); returns -1
 * after replying 400. */
static int query_seconds(req *r, const char *key, double cap, double *out)
{
    *out = 0;
    const char *v = query(r, key);
    if (!v)
        return 0;
    double s;
    if (cv_parse_double(v, 0, 1e9, &s)) {
        reply_errf(r, CV_EINVAL, "invalid_query", key,
                   "%s must be a number of seconds >= 0, got '%.40s'", key, v);
        return -1;
    }
    *out = cap >= 0 && s > cap ? cap : s;
    return 0;
}

/* Parses the body as a JSON object; replies 400 and returns NULL if it is not one. */
static cJSON *body_object(req *r)
{
    if (!r->body_len) {
        reply_errf(r, CV_EINVAL, "invalid_json", "", "the request body is empty; expected a JSON "
                                                     "object");
        return NULL;
    }
    const char *end = NULL;
    cJSON *j = cJSON_ParseWithLengthOpts(r->body, r->body_len, &end, 0);
    if (!j) {
        size_t off = end && end >= r->body ? (size_t)(end - r->body) : 0;
        reply_errf(r, CV_EINVAL, "invalid_json", "",
                   "the request body is not valid JSON (error near byte %zu)", off);
        return NULL;
    }
    if (!cJSON_IsObject(j)) {
        cJSON_Delete(j);
        reply_errf(r, CV_EINVAL, "invalid_json", "", "the request body must be a JSON object");
        return NULL;
    }
    return j;
}

/* Rejects members of obj not in allowed (NULL-terminated); replies 400. */
static int only_fields(req *r, const cJSON *obj, const char *const *allowed, const char *what)
{
    const cJSON *v;
    cJSON_ArrayForEach(v, obj)
    {
        int ok = 0;
        for (int i = 0; allowed[i]; i++)
            ok |= strcmp(allowed[i], v->string) == 0;
        if (!ok) {
            char known[160] = "";
            for (int i = 0; allowed[i]; i++) {
                strncat(known, i ? ", " : "", sizeof known - strlen(known) - 1);
                strncat(known, allowed[i], sizeof known - strlen(known) - 1);
            }
            reply_errf(r, CV_EINVAL, "unknown_field", v->string,
                       "unknown field '%.64s' in %s (known: %s)", v->string, what, known);
            return -1;
        }
    }
    return 0;
}

static const char *string_member(req *r, const cJSON *obj, const char *key, int required)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v) {
        if (required)
            reply_errf(r, CV_EINVAL, "missing_field", key, "missing field '%s'", key);
        return NULL;
    }
    if (!cJSON_IsString(v)) {
        reply_errf(r, CV_EINVAL, "invalid_field", key, "'%s' must be a string", key);
        return NULL;
    }
    return v->valuestring;
}

/* ---- models ---------------------------------------------------------------- */

static cv_model *model_new(void)
{
    cv_model *m = calloc(1, sizeof *m);
    return m;
}

static void model_delete(cv_model *m)
{
    if (m) {
        cv_model_free(m);
        free(m);
    }
}

static void reply_snap(req *r, unsigned status, cv_snap *s, int full, const char *prefix)
{
    cJSON *j = cv_snap_to_json(s, full);
    if (prefix && status == 201)
        snprintf(r->location, sizeof r->location, "%s/%s", prefix, s->name);
    cv_snap_unref(s);
    reply_json(r, status, j);
}

/* The text of form part p as a registry name in name: trailing newlines,
 * carriage returns and spaces dropped; "" (invalid) when the part holds a NUL
 * or is longer than CV_REG_NAME_MAX + 2 bytes. */
static void part_name(const cv_mp_part *p, char name[CV_REG_NAME_MAX + 2])
{
    size_t cap = CV_REG_NAME_MAX + 2;
    size_t nl = p->len < cap - 1 ? p->len : cap - 1;
    memcpy(name, p->data, nl);
    name[nl] = 0;
    while (nl && (name[nl - 1] == '\n' || name[nl - 1] == '\r' || name[nl - 1] == ' '))
        name[--nl] = 0;
    if (memchr(name, 0, nl) || p->len > cap)
        name[0] = 0;
}

/* Builds a model from an architecture (JSON object or JSON text) and a
 * safetensors buffer, and registers it under name. */
static void register_model(req *r, const char *name, const cJSON *arch_obj,
                           const char *arch_text, size_t arch_len, const void *params,
                           size_t plen)
{
    cv_err e;
    cv_err_clear(&e);
    if (cv_name_check(name, "name", &e)) {
        reply_err(r, &e);
        return;
    }
    cv_model *m = model_new();
    if (!m) {
        reply_oom(r);
        return;
    }
    cJSON *parsed = NULL;
    if (!arch_obj) {
        const char *end = NULL;
        parsed = cJSON_ParseWithLengthOpts(arch_text, arch_len, &end, 0);
        if (!parsed) {
            model_delete(m);
            reply_errf(r, CV_EINVAL, "invalid_json", "architecture",
                       "architecture is not valid JSON (error near byte %zu)",
                       end && end >= arch_text ? (size_t)(end - arch_text) : (size_t)0);
            return;
        }
        arch_obj = parsed;
    }
    int rc = cv_arch_from_json(arch_obj, "architecture", m, &e);
    cJSON_Delete(parsed);
    if (rc == 0)
        rc = cv_params_parse(m, params, plen, &e);
    if (rc) {
        model_delete(m);
        reply_err(r, &e);
        return;
    }
    cv_snap *s;
    if (cv_registry_add_model(r->h->reg, name, m, "http", &s, &e)) {
        reply_err(r, &e);
        return;
    }
    reply_snap(r, 201, s, 1, "/v1/models");
}

static void h_models_post(req *r)
{
    const char *ct = header(r, MHD_HTTP_HEADER_CONTENT_TYPE);
    if (cv_mp_is_multipart(ct)) {
        cv_multipart mp;
        cv_err e;
        if (cv_mp_parse(ct, r->body, r->body_len, &mp, &e)) {
            reply_err(r, &e);
            return;
        }
        static const char *const parts[] = {"name", "architecture", "parameters", NULL};
        for (int i = 0; i < mp.nparts; i++) {
            int ok = 0;
            for (int k = 0; parts[k]; k++)
                ok |= strcmp(parts[k], mp.parts[i].name) == 0;
            if (!ok) {
                reply_errf(r, CV_EINVAL, "unknown_field", mp.parts[i].name,
                           "unknown form part '%s' (known: name, architecture, parameters)",
                           mp.parts[i].name);
                return;
            }
        }
        for (int k = 0; parts[k]; k++)
            if (!cv_mp_find(&mp, parts[k])) {
                reply_errf(r, CV_EINVAL, "missing_field", parts[k], "missing form part '%s'",
                           parts[k]);
                return;
            }
        char name[CV_REG_NAME_MAX + 2];
        part_name(cv_mp_find(&mp, "name"), name);
        const cv_mp_part *pa = cv_mp_find(&mp, "architecture");
        const cv_mp_part *pp = cv_mp_find(&mp, "parameters");
        register_model(r, name, NULL, pa->data, pa->len, pp->data, pp->len);
        return;
    }
    cJSON *j = body_object(r);
    if (!j)
        return;
    static const char *const fields[] = {"name", "architecture", "parameters", NULL};
    const char *name = NULL, *b64 = NULL;
    const cJSON *arch;
    if (only_fields(r, j, fields, "the model") || !(name = string_member(r, j, "name", 1)))
        goto out;
    arch = cJSON_GetObjectItemCaseSensitive(j, "architecture");
    if (!arch) {
        reply_errf(r, CV_EINVAL, "missing_field", "architecture",
                   "missing field 'architecture' (the model's architecture document)");
        goto out;
    }
    if (!cJSON_IsObject(arch) && !cJSON_IsString(arch)) {
        reply_errf(r, CV_EINVAL, "invalid_field", "architecture",
                   "'architecture' must be a JSON object (or a string holding one)");
        goto out;
    }
    if (!(b64 = string_member(r, j, "parameters", 1)))
        goto out;
    void *buf;
    size_t blen;
    cv_err e;
    if (cv_b64_decode(b64, strlen(b64), &buf, &blen, "parameters", &e)) {
        reply_err(r, &e);
        goto out;
    }
    if (cJSON_IsObject(arch))
        register_model(r, name, arch, NULL, 0, buf, blen);
    else
        register_model(r, name, NULL, arch->valuestring, strlen(arch->valuestring), buf, blen);
    free(buf);
out:
    cJSON_Delete(j);
}

/* List, describe and delete work the same for models and datasets. */
static void list_snaps(req *r, cv_reg_kind kind, const char *key)
{
    cv_snap **v;
    int n = cv_registry_list(r->h->reg, kind, &v);
    if (n < 0) {
        reply_oom(r);
        return;
    }
    cJSON *root = cJSON_CreateObject();
    cJSON *arr = root ? cJSON_AddArrayToObject(root, key) : NULL;
    int ok = arr != NULL;
    for (int i = 0; ok && i < n; i++) {
        cJSON *o = cv_snap_to_json(v[i], 0);
        ok = o && cJSON_AddItemToArray(arr, o);
        if (!ok)
            cJSON_Delete(o);
    }
    cv_snaps_release(v, n);
    if (!ok) {
        cJSON_Delete(root);
        root = NULL;
    }
    reply_json(r, 200, root);
}

static void get_snap(req *r, cv_reg_kind kind)
{
    cv_err e;
    cv_snap *s = cv_registry_get(r->h->reg, kind, r->param, &e);
    if (!s) {
        reply_err(r, &e);
        return;
    }
    reply_snap(r, 200, s, 1, NULL);
}

static void delete_snap(req *r, cv_reg_kind kind, const char *what)
{
    cv_err e;
    if (cv_registry_delete(r->h->reg, kind, r->param, &e)) {
        reply_err(r, &e);
        return;
    }
    cJSON *j = cJSON_CreateObject();
    if (j && (!cJSON_AddStringToObject(j, "deleted", r->param) ||
              !cJSON_AddStringToObject(j, "kind", what))) {
        cJSON_Delete(j);
        j = NULL;
    }
    reply_json(r, 200, j);
}

static void h_models_list(req *r) { list_snaps(r, CV_REG_MODEL, "models"); }
static void h_model_get(req *r) { get_snap(r, CV_REG_MODEL); }
static void h_model_delete(req *r) { delete_snap(r, CV_REG_MODEL, "model"); }
static void h_datasets_list(req *r) { list_snaps(r, CV_REG_DATASET, "datasets"); }
static void h_dataset_get(req *r) { get_snap(r, CV_REG_DATASET); }
static void h_dataset_delete(req *r) { delete_snap(r, CV_REG_DATASET, "dataset"); }

static void h_model_params_put(req *r)
{
    cv_err e;
    cv_snap *s;
    if (cv_registry_put_params(r->h->reg, r->param, r->body, r->body_len, &s, &e)) {
        reply_err(r, &e);
        return;
    }
    reply_snap(r, 200, s, 0, NULL);
}

static void reply_binary(req *r, void *buf, size_t len, unsigned long version)
{
    set_text(r, 200, buf, len, "application/octet-stream");
    snprintf(r->extra_name, sizeof r->extra_name, "X-Curvd-Version");
    snprintf(r->extra_value, sizeof r->extra_value, "%lu", version);
}

static void h_model_params_get(req *r)
{
    cv_err e;
    cv_snap *s = cv_registry_get(r->h->reg, CV_REG_MODEL, r->param, &e);
    if (!s) {
        reply_err(r, &e);
        return;
    }
    void *buf;
    size_t len;
    if (cv_params_export(s->model, &buf, &len, &e))
        reply_err(r, &e);
    else
        reply_binary(r, buf, len, s->version);
    cv_snap_unref(s);
}

/* ---- datasets -------------------------------------------------------------- */

static cv_dataset *dataset_from(req *r, const void *buf, size_t len, const char *field)
{
    cv_err e;
    cv_dataset *d = calloc(1, sizeof *d);
    if (!d) {
        reply_oom(r);
        return NULL;
    }
    if (cv_datafile_parse(buf, len, d, &e)) {
        free(d);
        if (!e.field[0])
            snprintf(e.field, sizeof e.field, "%s", field);
        reply_err(r, &e);
        return NULL;
    }
    return d;
}

static void add_dataset(req *r, const char *name, const void *buf, size_t len,
                        const char *field)
{
    cv_err e;
    if (cv_name_check(name, "name", &e)) {
        reply_err(r, &e);
        return;
    }
    cv_dataset *d = dataset_from(r, buf, len, field);
    if (!d)
        return;
    cv_snap *s;
    if (cv_registry_add_dataset(r->h->reg, name, d, "http", &s, &e)) {
        reply_err(r, &e);
        return;
    }
    reply_snap(r, 201, s, 1, "/v1/datasets");
}

static void h_datasets_post(req *r)
{
    const char *ct = header(r, MHD_HTTP_HEADER_CONTENT_TYPE);
    if (cv_mp_is_multipart(ct)) {
        cv_multipart mp;
        cv_err e;
        if (cv_mp_parse(ct, r->body, r->body_len, &mp, &e)) {
            reply_err(r, &e);
            return;
        }
        const cv_mp_part *pn = NULL, *pd = NULL;
        for (int i = 0; i < mp.nparts; i++) {
            const cv_mp_part *p = &mp.parts[i];
            if (strcmp(p->name, "name") == 0)
                pn = p;
            else if (strcmp(p->name, "data") == 0 || strcmp(p->name, "file") == 0) {
                if (pd) {
                    reply_errf(r, CV_EINVAL, "duplicate_field", p->name,
                               "give the dataset once, as form part 'data' (or 'file')");
                    return;
                }
                pd = p;
            } else {
                reply_errf(r, CV_EINVAL, "unknown_field", p->name,
                           "unknown form part '%s' (known: name, data)", p->name);
                return;
            }
        }
        if (!pn || !pd) {
            reply_errf(r, CV_EINVAL, "missing_field", pn ? "data" : "name",
                       "missing form part '%s'", pn ? "data" : "name");
            return;
        }
        char name[CV_REG_NAME_MAX + 2];
        part_name(pn, name);
        add_dataset(r, name, pd->data, pd->len, "data");
        return;
    }
    cJSON *j = body_object(r);
    if (!j)
        return;
    static const char *const fields[] = {"name", "data", NULL};
    const char *name, *b64;
    if (only_fields(r, j, fields, "the dataset") || !(name = string_member(r, j, "name", 1)) ||
        !(b64 = string_member(r, j, "data", 1))) {
        cJSON_Delete(j);
        return;
    }
    void *buf;
    size_t blen;
    cv_err e;
    if (cv_b64_decode(b64, strlen(b64), &buf, &blen, "data", &e)) {
        reply_err(r, &e);
    } else {
        add_dataset(r, name, buf, blen, "data");
        free(buf);
    }
    cJSON_Delete(j);
}

static void h_dataset_put(req *r)
{
    cv_err e;
    if (cv_name_check(r->param, "name", &e)) {
        reply_err(r, &e);
        return;
    }
    cv_dataset *d = dataset_from(r, r->body, r->body_len, "body");
    if (!d)
        return;
    cv_snap *s;
    int created = 0;
    if (cv_registry_put_dataset(r->h->reg, r->param, d, "http", &created, &s, &e)) {
        reply_err(r, &e);
        return;
    }
    reply_snap(r, created ? 201 : 200, s, 1, "/v1/datasets");
}

static void h_dataset_data_get(req *r)
{
    cv_err e;
    cv_snap *s = cv_registry_get(r->h->reg, CV_REG_DATASET, r->param, &e);
    if (!s) {
        reply_err(r, &e);
        return;
    }
    void *buf;
    size_t len;
    if (cv_datafile_export(s->data, &buf, &len, &e))
        reply_err(r, &e);
    else
        reply_binary(r, buf, len, s->version);
    cv_snap_unref(s);
}

/* ---- jobs ------------------------------------------------------------------ */

static void reply_job(req *r, unsigned status, cv_job *j)
{
    size_t len;
    char *t = cv_job_status_text(r->h->jobs, j, &len);
    if (!t)
        reply_oom(r);
    else
        set_text(r, status, t, len, "application/json");
}

static void h_jobs_post(req *r)
{
    double wait, timeout;
    if (query_seconds(r, "wait", r->h->cfg.max_wait, &wait) ||
        query_seconds(r, "timeout", -1, &timeout))
        return;
    cJSON *doc = body_object(r);
    if (!doc)
        return;
    cv_job *j;
    cv_err e;
    int rc = cv_jobs_submit(r->h->jobs, doc, timeout, &j, &e);
    cJSON_Delete(doc);
    if (rc) {
        reply_err(r, &e);
        return;
    }
    snprintf(r->location, sizeof r->location, "/v1/jobs/%s", cv_job_id(j));
    if (wait > 0 && cv_jobs_wait(r->h->jobs, j, wait)) {
        reply_job(r, 200, j);
    } else {
        reply_json(r, 202, cv_job_to_json(r->h->jobs, j));
    }
    cv_job_unref(j);
}

static void h_job_get(req *r)
{
    double wait;
    if (query_seconds(r, "wait", r->h->cfg.max_wait, &wait))
        return;
    cv_err e;
    cv_job *j = cv_jobs_get(r->h->jobs, r->param, &e);
    if (!j) {
        reply_err(r, &e);
        return;
    }
    if (wait > 0)
        cv_jobs_wait(r->h->jobs, j, wait);
    reply_job(r, 200, j);
    cv_job_unref(j);
}

static void h_job_delete(req *r)
{
    cv_err e;
    cv_job *j = cv_jobs_get(r->h->jobs, r->param, &e);
    if (!j) {
        reply_err(r, &e);
        return;
    }
    cv_jobs_cancel(r->h->jobs, j, 5.0);
    reply_job(r, 200, j);
    cv_job_unref(j);
}

static void h_jobs_list(req *r)
{
    const char *st = query(r, "status"), *lim = query(r, "limit");
    int status = -1;
    if (st && (status = cv_job_status_from_name(st)) < 0) {
        reply_errf(r, CV_EINVAL, "invalid_query", "status",
                   "status must be one of queued, running, succeeded, failed, cancelled; got "
                   "'%.40s'", st);
        return;
    }
    size_t limit = 1000;
    if (lim && cv_parse_size(lim, 1, 100000, &limit)) {
        reply_errf(r, CV_EINVAL, "invalid_query", "limit",
                   "limit must be an integer between 1 and 100000");
        return;
    }
    reply_json(r, 200,
               cv_jobs_list(r->h->jobs, status, query(r, "model"), query(r, "dataset"),
                            query(r, "op"), limit));
}

/* ---- service --------------------------------------------------------------- */

static void h_health(req *r)
{
    cv_registry_stats rs;
    cv_jobs_stats js;
    cv_registry_stats_get(r->h->reg, &rs);
    cv_jobs_stats_get(r->h->jobs, &js);
    int draining = cv_jobs_draining(r->h->jobs);
    cJSON *j = cJSON_CreateObject();
    if (j && (!cJSON_AddStringToObject(j, "status", draining ? "draining" : "ok") ||
              !cJSON_AddStringToObject(j, "version", CV_SERVER_VERSION) ||
              !cJSON_AddNumberToObject(j, "uptime_s", cv_now_s() - r->h->started) ||
              !cJSON_AddNumberToObject(j, "workers", js.workers) ||
              !cJSON_AddNumberToObject(j, "busy_workers", js.busy_workers) ||
              !cJSON_AddNumberToObject(j, "queue_depth", (double)js.queue_depth) ||
              !cJSON_AddNumberToObject(j, "max_queue", (double)js.max_queue) ||
              !cJSON_AddNumberToObject(j, "models", rs.models) ||
              !cJSON_AddNumberToObject(j, "datasets", rs.datasets) ||
              !cJSON_AddNumberToObject(j, "registry_bytes", (double)rs.bytes) ||
              !cJSON_AddNumberToObject(j, "max_registry_bytes", (double)rs.max_bytes) ||
              !cJSON_AddNumberToObject(j, "registry_retired_bytes", (double)rs.retired_bytes) ||
              !cJSON_AddNumberToObject(j, "kept_job_bytes", (double)js.kept_bytes) ||
              !cJSON_AddNumberToObject(j, "max_kept_bytes", (double)js.max_kept_bytes))) {
        cJSON_Delete(j);
        j = NULL;
    }
    reply_json(r, draining ? 503 : 200, j);
}

static void h_ops(req *r) { reply_json(r, 200, cv_ops_describe()); }

static void h_metrics(req *r)
{
    cv_http_counters hc;
    for (int i = 0; i < 6; i++)
        hc.requests[i] = atomic_load(&r->h->requests[i]);
    char *t = cv_metrics_render(r->h->reg, r->h->jobs, &hc, cv_now_s() - r->h->started);
    if (!t)
        reply_oom(r);
    else
        set_text(r, 200, t, strlen(t), "text/plain; version=0.0.4; charset=utf-8");
}

/* ---- dashboard (clients/dashboard, embedded by server/dashboard.c) ----------- */

static void serve_dashboard_file(req *r, const char *name)
{
    cv_dashboard_file f;
    if (!cv_dashboard_find(name, &f)) {
        reply_errf(r, CV_ENOTFOUND, "not_found", "", "no dashboard file '%.100s'", name);
        return;
    }
    char *copy = malloc(f.len + 1);
    if (!copy) {
        reply_oom(r);
        return;
    }
    memcpy(copy, f.data, f.len + 1);
    set_text(r, 200, copy, f.len, f.content_type);
    snprintf(r->extra_name, sizeof r->extra_name, "Cache-Control");
    snprintf(r->extra_value, sizeof r->extra_value, "no-cache");
}

static void h_dashboard_index(req *r) { serve_dashboard_file(r, "index.html"); }
static void h_dashboard_file(req *r) { serve_dashboard_file(r, r->param); }

/* ---- routing --------------------------------------------------------------- */

typedef struct {
    cv_route_info info;
    void (*fn)(req *r);
} route;

static const route routes[] = {
    {{"GET", "/v1/health", "Service health and load"}, h_health},
    {{"GET", "/v1/ops", "Ops and curvature types the engine supports"}, h_ops},
    {{"GET", "/metrics", "Prometheus metrics"}, h_metrics},
    {{"GET", "/v1/models", "List models"}, h_models_list},
    {{"POST", "/v1/models", "Register a model (JSON with base64 parameters, or multipart)"},
     h_models_post},
    {{"GET", "/v1/models/{name}", "Describe a model"}, h_model_get},
    {{"DELETE", "/v1/models/{name}", "Delete a model"}, h_model_delete},
    {{"GET", "/v1/models/{name}/parameters", "Download the parameters (safetensors)"},
     h_model_params_get},
    {{"PUT", "/v1/models/{name}/parameters", "Replace the parameters (safetensors body)"},
     h_model_params_put},
    {{"GET", "/v1/datasets", "List datasets"}, h_datasets_list},
    {{"POST", "/v1/datasets", "Register a dataset (JSON with base64 data, or multipart)"},
     h_datasets_post},
    {{"GET", "/v1/datasets/{name}", "Describe a dataset"}, h_dataset_get},
    {{"PUT", "/v1/datasets/{name}", "Create or replace a dataset (safetensors body)"},
     h_dataset_put},
    {{"DELETE", "/v1/datasets/{name}", "Delete a dataset"}, h_dataset_delete},
    {{"GET", "/v1/datasets/{name}/data", "Download the dataset (safetensors)"},
     h_dataset_data_get},
    {{"GET", "/v1/jobs", "List jobs (filters: status, model, dataset, op, limit)"},
     h_jobs_list},
    {{"POST", "/v1/jobs", "Submit a job"}, h_jobs_post},
    {{"GET", "/v1/jobs/{id}", "Job status and result"}, h_job_get},
    {{"DELETE", "/v1/jobs/{id}", "Cancel a job"}, h_job_delete},
    {{"GET", "/", "Web dashboard (HTML page)"}, h_dashboard_index},
    {{"GET", "/dashboard/{file}", "Web dashboard static files (JS, CSS)"}, h_dashboard_file},
};
#define NROUTES ((int)(sizeof routes / sizeof routes[0]))

int cv_http_route_count(void) { return NROUTES; }

const cv_route_info *cv_http_route(int i)
{
    return i >= 0 && i < NROUTES ? &routes[i].info : NULL;
}

/* Matches path against a template; a {x} segment captures one non-empty
 * segment into param. */
static int match(const char *tmpl, const char *path, char *param, size_t plen, int *too_long)
{
    *too_long = 0;
    const char *t = tmpl, *p = path;
    while (*t && *p) {
        if (*t == '{') {
            const char *te = strchr(t, '}');
            const char *pe = strchr(p, '/');
            if (!te)
                return 0;
            size_t n = pe ? (size_t)(pe - p) : strlen(p);
            if (n == 0)
                return 0;
            size_t c = n < plen ? n : plen - 1; /* longer: truncated, *too_long set */
            memcpy(param, p, c);
            param[c] = 0;
            if (n >= plen)
                *too_long = 1;
            t = te + 1;
            p += n;
            continue;
        }
        if (*t != *p)
            return 0;
        t++;
        p++;
    }
    return *t == 0 && *p == 0;
}

static void dispatch(req *r)
{
    char path[512];
    size_t n = strlen(r->url);
    if (n >= sizeof path) {
        reply_errf(r, CV_ENOTFOUND, "not_found", "", "no such path (%zu characters)", n);
        return;
    }
    memcpy(path, r->url, n + 1);
    if (n > 1 && path[n - 1] == '/')
        path[n - 1] = 0; /* /v1/models/ == /v1/models */
    char allow[64] = "";
    for (int i = 0; i < NROUTES; i++) {
        char param[MAX_PARAM];
        int too_long;
        if (!match(routes[i].info.path, path, param, sizeof param, &too_long))
            continue;
        if (strcmp(routes[i].info.method, r->method) == 0) {
            memcpy(r->param, param, sizeof param);
            /* a {name} segment that cannot be a name is a bad request, not an
             * unknown name (ids and file names just are not found) */
            if (strstr(routes[i].info.path, "{name}") && (too_long || !cv_name_valid(param))) {
                cv_err e;
                cv_name_check(too_long ? "" : param, "name", &e);
                if (too_long)
                    snprintf(e.message, sizeof e.message,
                             "name must be 1 to %d characters from [A-Za-z0-9_.-] (the path "
                             "segment has %zu or more)", CV_REG_NAME_MAX, sizeof param);
                reply_err(r, &e);
                return;
            }
            if (too_long) {
                reply_errf(r, CV_ENOTFOUND, "not_found", "", "no %s '%.40s...' (%zu or more "
                           "characters)", strstr(routes[i].info.path, "{id}") ? "job" : "file",
                           param, sizeof param);
                return;
            }
            routes[i].fn(r);
            return;
        }
        if (!strstr(allow, routes[i].info.method)) {
            strncat(allow, allow[0] ? ", " : "", sizeof allow - strlen(allow) - 1);
            strncat(allow, routes[i].info.method, sizeof allow - strlen(allow) - 1);
        }
    }
    if (allow[0]) {
        snprintf(r->allow, sizeof r->allow, "%s", allow);
        reply_errf(r, CV_EINVAL, "method_not_allowed", "",
                   "method %.16s is not allowed on %.300s (allowed: %s)", r->method, path, allow);
        r->status = 405;
        return;
    }
    reply_errf(r, CV_ENOTFOUND, "not_found", "", "no route for %.16s %.300s", r->method, path);
}

/* ---- MHD glue -------------------------------------------------------------- */

static enum MHD_Result send_reply(cv_http *h, struct MHD_Connection *conn, req *r)
{
    struct MHD_Response *resp;
    if (r->out)
        resp = MHD_create_response_from_buffer(r->out_len, r->out, MHD_RESPMEM_MUST_FREE);
    else
        resp = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
    if (!resp) {
        free(r->out);
        r->out = NULL;
        return MHD_NO;
    }
    r->out = NULL; /* owned by the response now */
    if (r->ctype)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, r->ctype);
    if (r->location[0])
        MHD_add_response_header(resp, MHD_HTTP_HEADER_LOCATION, r->location);
    if (r->allow[0])
        MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, r->allow);
    if (r->extra_name[0])
        MHD_add_response_header(resp, r->extra_name, r->extra_value);
    unsigned st = r->status ? r->status : 500;
    if (st / 100 >= 1 && st / 100 <= 5)
        atomic_fetch_add(&h->requests[st / 100], 1);
    if (h->cfg.log_requests || (st >= 500 && st != 503))
        fprintf(stderr, "curvd: %s %s -> %u\n", r->method, r->url, st);
    enum MHD_Result rc = MHD_queue_response(conn, st, resp);
    MHD_destroy_response(resp);
    return rc;
}

/* http_status 0: the status that fits st. */
static enum MHD_Result reply_simple_error(cv_http *h, struct MHD_Connection *conn,
                                          const char *method, const char *url, cv_status st,
                                          unsigned http_status, const char *code,
                                          const char *msg)
{
    req r;
    memset(&r, 0, sizeof r);
    r.h = h;
    r.conn = conn;
    r.method = method;
    r.url = url;
    reply_errf(&r, st, code, "", "%s", msg);
    if (http_status && r.out && r.status != 500)
        r.status = http_status;
    return send_reply(h, conn, &r);
}

static int is_job_post(const char *method, const char *url)
{
    return strcmp(method, "POST") == 0 &&
           (strcmp(url, "/v1/jobs") == 0 || strcmp(url, "/v1/jobs/") == 0);
}

static void body_limit_msg(const conn_state *cs, char *msg, size_t len, size_t declared)
{
    if (declared)
        snprintf(msg, len, "request body of %zu bytes exceeds the limit of %zu bytes (%s)",
                 declared, cs->limit, cs->limit_opt);
    else
        snprintf(msg, len, "request body exceeds the limit of %zu bytes (%s)", cs->limit,
                 cs->limit_opt);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version,
                                  const char *upload_data, size_t *upload_data_size,
                                  void **con_cls)
{
    (void)version;
    cv_http *h = cls;
    conn_state *cs = *con_cls;
    if (!cs) {
        cs = calloc(1, sizeof *cs);
        if (!cs) {
            *con_cls = &oom_state;
            return reply_simple_error(h, conn, method, url, CV_ENOMEM, 503, "out_of_memory",
                                      "the server is out of memory; retry later");
        }
        *con_cls = cs;
        int job = is_job_post(method, url);
        cs->limit = job ? h->cfg.max_job_body : h->cfg.max_body;
        cs->limit_opt = job ? "--max-job-bytes" : "--max-body";
        const char *cl =
            MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        size_t declared;
        if (cl && cv_parse_size(cl, 0, (size_t)-1, &declared) == 0 && declared > cs->limit) {
            char msg[200];
            body_limit_msg(cs, msg, sizeof msg, declared);
            cs->dispatched = 1;
            return reply_simple_error(h, conn, method, url, CV_ETOOLARGE, 0, "body_too_large",
                                      msg);
        }
        return MHD_YES;
    }
    if (*upload_data_size) {
        size_t n = *upload_data_size;
        *upload_data_size = 0;
        if (cs->dispatched || cs->too_large || cs->oom)
            return MHD_YES;
        if (n > cs->limit - cs->len) {
            cs->too_large = 1;
            free(cs->body);
            cs->body = NULL;
            cs->len = cs->cap = 0;
            return MHD_YES;
        }
        if (cs->len + n > cs->cap) {
            size_t ncap = cs->cap ? cs->cap : 65536;
            while (ncap < cs->len + n)
                ncap = ncap > cs->limit / 2 ? cs->limit : 2 * ncap;
            char *nb = realloc(cs->body, ncap + 1);
            if (!nb) {
                cs->oom = 1; /* answered below as out of memory */
                free(cs->body);
                cs->body = NULL;
                cs->len = cs->cap = 0;
                return MHD_YES;
            }
            cs->body = nb;
            cs->cap = ncap;
        }
        memcpy(cs->body + cs->len, upload_data, n);
        cs->len += n;
        return MHD_YES;
    }
    if (cs->dispatched)
        return MHD_YES;
    cs->dispatched = 1;
    if (cs->oom) {
        char msg[200];
        snprintf(msg, sizeof msg, "out of memory receiving the request body (%zu bytes so far); "
                 "retry later", cs->len);
        return reply_simple_error(h, conn, method, url, CV_ENOMEM, 503, "out_of_memory", msg);
    }
    if (cs->too_large) {
        char msg[200];
        body_limit_msg(cs, msg, sizeof msg, 0);
        return reply_simple_error(h, conn, method, url, CV_ETOOLARGE, 0, "body_too_large", msg);
    }
    req r;
    memset(&r, 0, sizeof r);
    r.h = h;
    r.conn = conn;
    r.method = strcmp(method, "HEAD") == 0 ? "GET" : method;
    r.url = url;
    r.body = cs->body ? cs->body : "";
    r.body_len = cs->len;
    dispatch(&r);
    return send_reply(h, conn, &r);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    (void)cls;
    (void)conn;
    (void)toe;
    conn_state *cs = *con_cls;
    if (cs && cs != &oom_state) {
        free(cs->body);
        free(cs);
        *con_cls = NULL;
    }
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    fprintf(stderr, "curvd: http: ");
    vfprintf(stderr, fmt, ap);
}

cv_http *cv_http_start(const cv_http_config *c, cv_registry *reg, cv_jobs *jobs, cv_err *e)
{
    cv_http *h = calloc(1, sizeof *h);
    if (!h) {
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
        return NULL;
    }
    h->cfg = *c;
    if (!h->cfg.bind || !h->cfg.bind[0])
        h->cfg.bind = "127.0.0.1";
    if (!h->cfg.max_connections)
        h->cfg.max_connections = 512;
    if (!h->cfg.max_job_body)
        h->cfg.max_job_body = (size_t)16 << 20;
    if (h->cfg.max_wait < 0)
        h->cfg.max_wait = 0;
    /* A connection idle longer than this is closed; a request blocked in
     * ?wait= is idle for up to max_wait seconds, so leave a minute more. */
    double cto = h->cfg.max_wait + 60;
    unsigned conn_timeout = cto > 86400 * 30 ? 0 /* none */ : (unsigned)cto + 1;
    h->reg = reg;
    h->jobs = jobs;
    h->started = cv_now_s();
    for (int i = 0; i < 6; i++)
        atomic_init(&h->requests[i], 0);

    struct sockaddr_in a4;
    struct sockaddr_in6 a6;
    struct sockaddr *sa;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION |
                     MHD_USE_POLL | MHD_USE_ERROR_LOG;
    if (c->port < 0 || c->port > 65535) {
        free(h);
        cv_err_set(e, CV_EINVAL, "invalid_port", "port", "port must be 0..65535");
        return NULL;
    }
    memset(&a4, 0, sizeof a4);
    memset(&a6, 0, sizeof a6);
    if (inet_pton(AF_INET, h->cfg.bind, &a4.sin_addr) == 1) {
        a4.sin_family = AF_INET;
        a4.sin_port = htons((uint16_t)c->port);
        sa = (struct sockaddr *)&a4;
    } else if (inet_pton(AF_INET6, h->cfg.bind, &a6.sin6_addr) == 1) {
        a6.sin6_family = AF_INET6;
        a6.sin6_port = htons((uint16_t)c->port);
        sa = (struct sockaddr *)&a6;
        flags |= MHD_USE_IPv6;
    } else {
        free(h);
        cv_err_set(e, CV_EINVAL, "invalid_bind", "bind",
                   "--bind '%s' is not an IPv4 or IPv6 address", c->bind);
        return NULL;
    }
    h->d = MHD_start_daemon(flags, (uint16_t)c->port, NULL, NULL, on_request, h,
                            MHD_OPTION_EXTERNAL_LOGGER, mhd_log, h,
                            MHD_OPTION_SOCK_ADDR, sa,
                            MHD_OPTION_CONNECTION_LIMIT, h->cfg.max_connections,
                            MHD_OPTION_CONNECTION_TIMEOUT, conn_timeout,
                            MHD_OPTION_NOTIFY_COMPLETED, on_completed, h,
                            MHD_OPTION_END);
    if (!h->d) {
        free(h);
        cv_err_set(e, CV_EINTERNAL, "listen_failed", "port",
                   "cannot listen on %s port %d (in use, or not a local address?)",
                   c->bind ? c->bind : "127.0.0.1", c->port);
        return NULL;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
    h->port = info ? info->port : c->port;
    return h;
}

int cv_http_port(const cv_http *h) { return h->port; }

void cv_http_stop(cv_http *h)
{
    if (!h)
        return;
    if (h->d)
        MHD_stop_daemon(h->d);
    free(h);
}
