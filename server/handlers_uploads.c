/* handlers_uploads.c - the routes for datasets bigger than one request:
 * uploads in parts (POST/GET/DELETE /v1/datasets/{name}/parts, POST
 * /v1/datasets/{name}/commit; the staging areas are server/staging.c) and
 * files of --data-dir registered by name, memory-mapped (POST
 * /v1/datasets/{name}; server/datadir.c). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/datadir.h"
#include "server/http_internal.h"
#include "server/multipart.h"
#include "server/staging.h"

static void reply_dataset(req *r, cv_snap *s, int created)
{
    cJSON *j = cv_snap_to_json(s, 1);
    if (created)
        snprintf(r->location, sizeof r->location, "/v1/datasets/%s", s->name);
    cv_snap_unref(s);
    reply_json(r, created ? 201 : 200, j);
}

/* A JSON member that must be a boolean; def when absent.  -1 after replying. */
static int bool_member(req *r, const cJSON *j, const char *key, int def)
{
    const cJSON *v = j ? cJSON_GetObjectItemCaseSensitive(j, key) : NULL;
    if (!v)
        return def;
    if (!cJSON_IsBool(v)) {
        reply_errf(r, CV_EINVAL, "invalid_field", key, "'%s' must be true or false", key);
        return -1;
    }
    return cJSON_IsTrue(v);
}

/* A JSON member that must be a whole number >= 0; -1 when absent, -2 after replying. */
static long long count_member(req *r, const cJSON *j, const char *key)
{
    const cJSON *v = j ? cJSON_GetObjectItemCaseSensitive(j, key) : NULL;
    if (!v)
        return -1;
    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > 9e15 ||
        v->valuedouble != (double)(long long)v->valuedouble) {
        reply_errf(r, CV_EINVAL, "invalid_field", key, "'%s' must be a whole number >= 0", key);
        return -2;
    }
    return (long long)v->valuedouble;
}

/* ---- uploads in parts ---------------------------------------------------------- */

void h_dataset_parts_post(req *r)
{
    const char *ct = header(r, MHD_HTTP_HEADER_CONTENT_TYPE);
    if (cv_mp_is_multipart(ct) || (ct && strncmp(ct, "application/json", 16) == 0)) {
        reply_errf(r, CV_EINVAL, "bad_content_type", "body",
                   "a part is the raw safetensors body (Content-Type: "
                   "application/octet-stream), not %.60s", ct);
        return;
    }
    cv_err e;
    cJSON *j;
    if (cv_staging_append(r->h->staging, r->param, r->body, r->body_len, &j, &e)) {
        if (!e.field[0])
            snprintf(e.field, sizeof e.field, "body");
        reply_err(r, &e);
        return;
    }
    reply_json(r, 200, j);
}

void h_dataset_parts_get(req *r)
{
    cv_err e;
    cJSON *j;
    if (cv_staging_describe(r->h->staging, r->param, &j, &e))
        reply_err(r, &e);
    else
        reply_json(r, 200, j);
}

void h_dataset_parts_delete(req *r)
{
    cv_err e;
    if (cv_staging_drop(r->h->staging, r->param, &e)) {
        reply_err(r, &e);
        return;
    }
    cJSON *j = cJSON_CreateObject();
    if (j && (!cJSON_AddStringToObject(j, "deleted", r->param) ||
              !cJSON_AddStringToObject(j, "kind", "upload"))) {
        cJSON_Delete(j);
        j = NULL;
    }
    reply_json(r, 200, j);
}

/* Body (optional): {"replace": bool, "n": rows, "parts": count}. */
void h_dataset_commit(req *r)
{
    static const char *const fields[] = {"replace", "n", "parts", NULL};
    cJSON *j = NULL;
    if (r->body_len && !(j = body_object(r)))
        return;
    int replace = 0;
    long long n = -1, parts = -1;
    if ((j && only_fields(r, j, fields, "the commit")) ||
        (replace = bool_member(r, j, "replace", 0)) < 0 || (n = count_member(r, j, "n")) < -1 ||
        (parts = count_member(r, j, "parts")) < -1) {
        cJSON_Delete(j);
        return;
    }
    cJSON_Delete(j);
    cv_err e;
    cv_snap *s;
    int created = 1;
    if (cv_staging_commit(r->h->staging, r->param, replace, n, parts, &created, &s, &e))
        reply_err(r, &e);
    else
        reply_dataset(r, s, created);
}

/* ---- files of --data-dir ------------------------------------------------------- */

/* Body: {"file": "relative/name.safetensors", "replace": bool}. */
void h_dataset_file_post(req *r)
{
    static const char *const fields[] = {"file", "replace", NULL};
    if (!r->h->cfg.data_dir) {
        reply_errf(r, CV_EINVAL, "no_data_dir", "file",
                   "this server has no data directory: start it with `curvd serve --data-dir "
                   "DIR` to register files that are already on the server; upload the data "
                   "instead (POST /v1/datasets, or in parts)");
        return;
    }
    cJSON *j = body_object(r);
    if (!j)
        return;
    const char *file;
    int replace = 0;
    if (only_fields(r, j, fields, "a data-dir registration") ||
        !(file = string_member(r, j, "file", 1)) ||
        (replace = bool_member(r, j, "replace", 0)) < 0) {
        cJSON_Delete(j);
        return;
    }
    cv_err e;
    cv_dataset *d = calloc(1, sizeof *d);
    cv_mapped *map = NULL;
    size_t heap = 0, mapped = 0;
    if (!d) {
        cJSON_Delete(j);
        reply_oom(r);
        return;
    }
    cv_registry_stats rs;
    cv_registry_stats_get(r->h->reg, &rs);
    size_t used = rs.bytes + rs.staged_bytes + rs.retired_bytes;
    size_t room = used < rs.max_bytes ? rs.max_bytes - used : 0;
    if (cv_datadir_map(r->h->cfg.data_dir, file, room, 1, d, &map, &heap, &mapped, &e)) {
        free(d);
        cJSON_Delete(j);
        reply_err(r, &e);
        return;
    }
    char source[160], data_file[256];
    snprintf(source, sizeof source, "file %.140s (mapped)", file);
    snprintf(data_file, sizeof data_file, "%s", file); /* for --state-dir */
    cJSON_Delete(j);
    cv_dataset_backing b = {.bytes = heap, .mapped_bytes = mapped, .backing = map,
                            .backing_free = cv_mapped_free, .data_file = data_file};
    cv_snap *s;
    int created = 1;
    if (cv_registry_install_dataset(r->h->reg, r->param, d, source, replace ? 2 : 0, &b,
                                    &created, &s, &e)) {
        cv_dataset_free(d);
        free(d);
        cv_mapped_free(map);
        reply_err(r, &e);
        return;
    }
    reply_dataset(r, s, created);
}
