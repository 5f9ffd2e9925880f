/* handlers_monitors.c - the HTTP side of training monitors (server/monitors.h):
 * POST/GET /v1/models/{name}/monitors, DELETE /v1/models/{name}/monitors/{id}
 * and GET /v1/models/{name}/history. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/http_internal.h"
#include "server/monitors.h"

/* The {name} segment of /v1/models/{name}/... into out (the router keeps
 * only the last segment in r->param). */
static int model_of(req *r, char *out, size_t len)
{
    const char *p = r->url + strlen("/v1/models/");
    const char *end = strchr(p, '/');
    size_t n = end ? (size_t)(end - p) : strlen(p);
    if (n == 0 || n >= len)
        return -1;
    memcpy(out, p, n);
    out[n] = 0;
    return 0;
}

void h_monitors_post(req *r)
{
    cJSON *doc = body_object(r);
    if (!doc)
        return;
    cJSON *out;
    cv_err e;
    if (cv_monitors_create(r->h->cfg.monitors, r->param, doc, &out, &e)) {
        cJSON_Delete(doc);
        reply_err(r, &e);
        return;
    }
    cJSON_Delete(doc);
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(out, "id");
    if (cJSON_IsString(id))
        snprintf(r->location, sizeof r->location, "/v1/models/%s/monitors/%s", r->param,
                 id->valuestring);
    reply_json(r, 201, out);
}

void h_monitors_list(req *r)
{
    cv_err e;
    cv_snap *s = cv_registry_acquire(r->h->reg, CV_REG_MODEL, r->param, &e);
    if (!s) {
        reply_err(r, &e);
        return;
    }
    cv_registry_release(r->h->reg, s);
    reply_json(r, 200, cv_monitors_list(r->h->cfg.monitors, r->param));
}

void h_monitor_delete(req *r)
{
    char model[MAX_PARAM];
    cv_err e;
    if (model_of(r, model, sizeof model) || !cv_name_valid(model)) {
        reply_errf(r, CV_ENOTFOUND, "not_found", "", "no such model");
        return;
    }
    if (cv_monitors_delete(r->h->cfg.monitors, model, r->param, &e)) {
        reply_err(r, &e);
        return;
    }
    cJSON *j = cJSON_CreateObject();
    if (j && (!cJSON_AddStringToObject(j, "deleted", r->param) ||
              !cJSON_AddStringToObject(j, "kind", "monitor"))) {
        cJSON_Delete(j);
        j = NULL;
    }
    reply_json(r, 200, j);
}

void h_history(req *r)
{
    const char *mon = query(r, "monitor"), *since = query(r, "since");
    unsigned long from = 0;
    if (since) {
        char *end;
        from = strtoul(since, &end, 10);
        if (!since[0] || *end || since[0] == '-') {
            reply_errf(r, CV_EINVAL, "invalid_query", "since",
                       "?since= is a model version (a non-negative integer)");
            return;
        }
    }
    cv_err e;
    cJSON *o = cv_monitors_history(r->h->cfg.monitors, r->param, mon, from, &e);
    if (!o)
        reply_err(r, &e);
    else
        reply_json(r, 200, o);
}
