/* handlers_registry.c - the model and dataset routes: register (JSON with
 * base64 content, multipart form, or for PUT /v1/datasets/{name} the raw
 * safetensors body, all through one upload path), list, describe, download,
 * replace a model's parameters, delete.  The store is server/registry.c;
 * the loaders are api/arch.c, api/params.c and api/datafile.c. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/arch.h"
#include "api/datafile.h"
#include "api/json_strict.h"
#include "api/params.h"
#include "api/suggest.h"
#include "server/b64.h"
#include "server/http_internal.h"
#include "server/monitors.h"
#include "server/multipart.h"

static void reply_snap(req *r, unsigned status, cv_snap *s, int full, const char *prefix)
{
    cJSON *j = cv_snap_to_json(s, full);
    if (prefix && status == 201)
        snprintf(r->location, sizeof r->location, "%s/%s", prefix, s->name);
    cv_snap_unref(s);
    reply_json(r, status, j);
}

/* ---- uploads: POST /v1/models, POST and PUT /v1/datasets ---------------------- */

/* One content field of an upload: bytes (a form part, a base64-decoded JSON
 * member, or the raw body) or, where the kind allows it, a JSON object. */
typedef struct {
    const char *field;   /* its name, for messages */
    const char *data;
    size_t len;
    const cJSON *obj;    /* the member given inline as a JSON object, else NULL */
} upload_part;

#define UPLOAD_MAX 2     /* content fields of one kind */

typedef struct {
    const char *noun;                      /* "model", "dataset" */
    const char *fields[UPLOAD_MAX + 2];    /* "name", the content fields, NULL */
    /* A second form-part name of one content field (a repeated part can only
     * come from it: the multipart parser rejects repeated names). */
    const char *alias, *alias_of;
    /* A JSON member that may be a JSON object or a string holding one (not
     * base64), and what it is, for the message when it is missing. */
    const char *inline_field, *inline_doc;
    /* Builds the object from p[] (one per content field) and registers it
     * under name (already checked): added, or with replace created or
     * replaced.  Replies. */
    void (*store)(req *r, const char *name, const upload_part *p, int replace);
} upload_kind;

static void store(req *r, const upload_kind *k, const char *name, const upload_part *p,
                  int replace)
{
    cv_err e;
    if (cv_name_check(name, "name", &e))
        reply_err(r, &e);
    else
        k->store(r, name, p, replace);
}

static int field_index(const upload_kind *k, const char *name)
{
    for (int i = 0; k->fields[i]; i++)
        if (strcmp(k->fields[i], name) == 0)
            return i;
    return -1;
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

static void upload_multipart(req *r, const upload_kind *k, const char *ct)
{
    cv_multipart mp;
    cv_err e;
    if (cv_mp_parse(ct, r->body, r->body_len, &mp, &e)) {
        reply_err(r, &e);
        return;
    }
    const cv_mp_part *got[UPLOAD_MAX + 1] = {NULL};
    for (int i = 0; i < mp.nparts; i++) {
        const cv_mp_part *p = &mp.parts[i];
        int f = field_index(k, k->alias && strcmp(p->name, k->alias) == 0 ? k->alias_of
                                                                           : p->name);
        if (f < 0) {
            char known[96], hint[96];
            reply_errf(r, CV_EINVAL, "unknown_field", p->name,
                       "unknown form part '%s' (known: %s)%s", p->name,
                       cv_join_names(k->fields, -1, ", ", ", ", known, sizeof known),
                       cv_suggest_hint(p->name, k->fields, -1, hint, sizeof hint));
            return;
        }
        if (got[f]) {
            reply_errf(r, CV_EINVAL, "duplicate_field", p->name,
                       "give the %s once, as form part '%s' (or '%s')", k->noun, k->alias_of,
                       k->alias);
            return;
        }
        got[f] = p;
    }
    for (int f = 0; k->fields[f]; f++)
        if (!got[f]) {
            reply_errf(r, CV_EINVAL, "missing_field", k->fields[f], "missing form part '%s'",
                       k->fields[f]);
            return;
        }
    char name[CV_REG_NAME_MAX + 2];
    part_name(got[0], name);
    upload_part parts[UPLOAD_MAX];
    for (int f = 1; k->fields[f]; f++)
        parts[f - 1] = (upload_part){k->fields[f], got[f]->data, got[f]->len, NULL};
    store(r, k, name, parts, 0);
}

/* Member key of a JSON upload into *p: base64 (decoded into *owned), or
 * for the kind's inline field a JSON object or a string holding one.
 * Returns -1 after replying 400. */
static int json_part(req *r, const upload_kind *k, const cJSON *j, const char *key,
                     upload_part *p, void **owned)
{
    p->field = key;
    if (k->inline_field && strcmp(key, k->inline_field) == 0) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
        if (!v) {
            reply_errf(r, CV_EINVAL, "missing_field", key, "missing field '%s' (%s)", key,
                       k->inline_doc);
            return -1;
        }
        if (!cJSON_IsObject(v) && !cJSON_IsString(v)) {
            reply_errf(r, CV_EINVAL, "invalid_field", key,
                       "'%s' must be a JSON object (or a string holding one)", key);
            return -1;
        }
        if (cJSON_IsObject(v))
            p->obj = v;
        else {
            p->data = v->valuestring;
            p->len = strlen(v->valuestring);
        }
        return 0;
    }
    const char *b64 = string_member(r, j, key, 1);
    if (!b64)
        return -1;
    cv_err e;
    if (cv_b64_decode(b64, strlen(b64), owned, &p->len, key, &e)) {
        reply_err(r, &e);
        return -1;
    }
    p->data = *owned;
    return 0;
}

static void upload_json(req *r, const upload_kind *k)
{
    cJSON *j = body_object(r);
    if (!j)
        return;
    char what[32];
    snprintf(what, sizeof what, "the %s", k->noun);
    upload_part parts[UPLOAD_MAX];
    void *owned[UPLOAD_MAX] = {NULL};
    memset(parts, 0, sizeof parts);
    const char *name;
    if (only_fields(r, j, k->fields, what) || !(name = string_member(r, j, "name", 1)))
        goto out;
    for (int f = 1; k->fields[f]; f++)
        if (json_part(r, k, j, k->fields[f], &parts[f - 1], &owned[f - 1]))
            goto out;
    store(r, k, name, parts, 0);
out:
    for (int f = 0; f < UPLOAD_MAX; f++)
        free(owned[f]);
    cJSON_Delete(j);
}

/* POST: a multipart form, or a JSON object with the content base64-encoded. */
static void upload(req *r, const upload_kind *k)
{
    const char *ct = header(r, MHD_HTTP_HEADER_CONTENT_TYPE);
    if (cv_mp_is_multipart(ct))
        upload_multipart(r, k, ct);
    else
        upload_json(r, k);
}

/* PUT /{kind}/{name}: the body is the kind's one content field. */
static void upload_raw(req *r, const upload_kind *k)
{
    upload_part p = {"body", r->body, r->body_len, NULL};
    store(r, k, r->param, &p, 1);
}

/* ---- models ---------------------------------------------------------------- */

static void model_delete(cv_model *m)
{
    if (m) {
        cv_model_free(m);
        free(m);
    }
}

/* p[0]: the architecture (a JSON object or JSON text), p[1]: the parameters
 * (safetensors).  Models are only added (replace is never set). */
static void store_model(req *r, const char *name, const upload_part *p, int replace)
{
    (void)replace;
    cv_err e;
    cv_err_clear(&e);
    cv_model *m = calloc(1, sizeof *m);
    if (!m) {
        reply_oom(r);
        return;
    }
    const cJSON *arch = p[0].obj;
    cJSON *parsed = NULL;
    if (!arch) {
        parsed = cv_json_parse_strict(p[0].data, p[0].len, "architecture", "architecture", &e);
        if (!parsed) {
            model_delete(m);
            reply_err(r, &e);
            return;
        }
        arch = parsed;
    }
    int rc = cv_arch_from_json(arch, "architecture", m, &e);
    cJSON_Delete(parsed);
    if (rc == 0)
        rc = cv_params_parse(m, p[1].data, p[1].len, &e);
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
    cv_jobs_offer(r->h->jobs, s);
    reply_snap(r, 201, s, 1, "/v1/models");
}

static const upload_kind model_upload = {
    .noun = "model",
    .fields = {"name", "architecture", "parameters", NULL},
    .inline_field = "architecture",
    .inline_doc = "the model's architecture document",
    .store = store_model,
};

void h_models_post(req *r) { upload(r, &model_upload); }

void h_model_params_put(req *r)
{
    cv_err e;
    cv_snap *s;
    if (cv_registry_put_params(r->h->reg, r->param, r->body, r->body_len, &s, &e)) {
        reply_err(r, &e);
        return;
    }
    cv_jobs_offer(r->h->jobs, s);
    if (r->h->cfg.monitors)
        cv_monitors_version(r->h->cfg.monitors, r->param);
    reply_snap(r, 200, s, 0, NULL);
}

/* ---- datasets -------------------------------------------------------------- */

/* p[0]: the dataset (safetensors). */
static void store_dataset(req *r, const char *name, const upload_part *p, int replace)
{
    cv_err e;
    cv_dataset *d = calloc(1, sizeof *d);
    if (!d) {
        reply_oom(r);
        return;
    }
    if (cv_datafile_parse(p->data, p->len, d, &e)) {
        free(d);
        if (!e.field[0])
            snprintf(e.field, sizeof e.field, "%s", p->field);
        reply_err(r, &e);
        return;
    }
    cv_snap *s;
    int created = 1;
    if (replace ? cv_registry_put_dataset(r->h->reg, name, d, "http", &created, &s, &e)
                : cv_registry_add_dataset(r->h->reg, name, d, "http", &s, &e)) {
        reply_err(r, &e);
        return;
    }
    cv_jobs_offer(r->h->jobs, s); /* scattered into shards */
    reply_snap(r, created ? 201 : 200, s, 1, "/v1/datasets");
}

static const upload_kind dataset_upload = {
    .noun = "dataset",
    .fields = {"name", "data", NULL},
    .alias = "file",
    .alias_of = "data",
    .store = store_dataset,
};

void h_datasets_post(req *r) { upload(r, &dataset_upload); }
void h_dataset_put(req *r) { upload_raw(r, &dataset_upload); }

/* ---- list, describe, download and delete: the same for models and datasets ---- */

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

/* The snapshot named by the path, or NULL after replying 404. */
static cv_snap *find_snap(req *r, cv_reg_kind kind)
{
    cv_err e;
    cv_snap *s = cv_registry_get(r->h->reg, kind, r->param, &e);
    if (!s)
        reply_err(r, &e);
    return s;
}

/* A model's kept posteriors (ops laplace and predict) as "posteriors". */
static int add_posteriors(req *r, const cv_snap *s, cJSON *o)
{
    cv_snap **v;
    int n = cv_registry_list_posteriors(r->h->reg, s->name, &v);
    cJSON *arr = n >= 0 && o ? cJSON_AddArrayToObject(o, "posteriors") : NULL;
    int ok = arr != NULL;
    for (int i = 0; ok && i < n; i++) {
        cJSON *p = cv_snap_to_json(v[i], 0);
        ok = p && cJSON_AddItemToArray(arr, p);
        if (!ok)
            cJSON_Delete(p);
    }
    if (n >= 0)
        cv_snaps_release(v, n);
    return ok ? 0 : -1;
}

static void get_snap(req *r, cv_reg_kind kind)
{
    cv_snap *s = find_snap(r, kind);
    if (!s)
        return;
    if (kind != CV_REG_MODEL) {
        reply_snap(r, 200, s, 1, NULL);
        return;
    }
    cJSON *j = cv_snap_to_json(s, 1);
    if (j && add_posteriors(r, s, j)) {
        cJSON_Delete(j);
        j = NULL;
    }
    cv_snap_unref(s);
    reply_json(r, 200, j);
}

/* The model's parameters or the dataset as safetensors, with the version
 * in X-Curvd-Version. */
static void download_snap(req *r, cv_reg_kind kind)
{
    cv_snap *s = find_snap(r, kind);
    if (!s)
        return;
    cv_err e;
    void *buf;
    size_t len;
    if (kind == CV_REG_MODEL ? cv_params_export(s->model, &buf, &len, &e)
                             : cv_datafile_export(s->data, &buf, &len, &e)) {
        reply_err(r, &e);
    } else {
        set_text(r, 200, buf, len, "application/octet-stream");
        snprintf(r->extra_name, sizeof r->extra_name, "X-Curvd-Version");
        snprintf(r->extra_value, sizeof r->extra_value, "%lu", s->version);
    }
    cv_snap_unref(s);
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

/* DELETE /v1/models/{name}/posteriors[?name=P]: the model's kept posteriors (or
 * one); 404 unknown model or posterior, 409 while a job uses one (those
 * before it in name order are deleted). */
void h_model_posteriors_delete(req *r)
{
    cv_err e;
    cv_snap *m = find_snap(r, CV_REG_MODEL);
    if (!m)
        return;
    cv_snap_unref(m);
    const char *one = query(r, "name");
    cv_snap **v = NULL;
    int n = one ? 0 : cv_registry_list_posteriors(r->h->reg, r->param, &v);
    if (n < 0) {
        reply_oom(r);
        return;
    }
    cJSON *j = cJSON_CreateObject(), *arr = j ? cJSON_AddArrayToObject(j, "deleted") : NULL;
    int rc = 0;
    for (int i = 0; i < (one ? 1 : n) && !rc; i++) {
        const char *name = one ? one : v[i]->name;
        rc = cv_registry_delete_posterior(r->h->reg, r->param, name, &e);
        if (!rc && arr)
            cJSON_AddItemToArray(arr, cJSON_CreateString(name));
    }
    cv_snaps_release(v, n);
    if (rc) {
        cJSON_Delete(j);
        reply_err(r, &e);
        return;
    }
    reply_json(r, 200, j);
}

void h_models_list(req *r) { list_snaps(r, CV_REG_MODEL, "models"); }
void h_model_get(req *r) { get_snap(r, CV_REG_MODEL); }
void h_model_params_get(req *r) { download_snap(r, CV_REG_MODEL); }
void h_model_delete(req *r) { delete_snap(r, CV_REG_MODEL, "model"); }
void h_datasets_list(req *r) { list_snaps(r, CV_REG_DATASET, "datasets"); }
void h_dataset_get(req *r) { get_snap(r, CV_REG_DATASET); }
void h_dataset_data_get(req *r) { download_snap(r, CV_REG_DATASET); }
void h_dataset_delete(req *r) { delete_snap(r, CV_REG_DATASET, "dataset"); }
