/* handlers_misc.c - the service routes: GET /v1/health (liveness and load),
 * GET /metrics (Prometheus text, server/metrics.c) and the embedded web
 * dashboard (GET / and GET /dashboard/{file}, server/dashboard.c). */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/linop.h"
#include "server/dashboard.h"
#include "server/http_internal.h"
#include "server/monitors.h"
#include "server/metrics.h"
#include "server/util.h"

/* "memory": {"limit_bytes", "used_bytes", "by_kind": {kind: bytes}} (--max-memory). */
static int add_memory(cJSON *j, const cv_jobs_stats *js)
{
    cJSON *m = cJSON_AddObjectToObject(j, "memory"), *k = m ? cJSON_CreateObject() : NULL;
    size_t total = 0;
    for (int i = 0; k && i < CV_MEM_KINDS; i++) {
        total += js->memory_used[i];
        if (!cJSON_AddNumberToObject(k, cv_memory_kind_name((cv_mem_kind)i),
                                     (double)js->memory_used[i]))
            break;
    }
    if (!k || !cJSON_AddNumberToObject(m, "limit_bytes", (double)js->memory_limit) ||
        !cJSON_AddNumberToObject(m, "used_bytes", (double)total) ||
        !cJSON_AddNumberToObject(m, "waits_total", (double)js->memory_waits_total)) {
        cJSON_Delete(k);
        return 0;
    }
    cJSON_AddItemToObject(m, "by_kind", k);
    return 1;
}

void h_health(req *r)
{
    if (r->anonymous) { /* tokens required, none given: liveness only */
        int draining = cv_jobs_draining(r->h->jobs);
        cJSON *j = cJSON_CreateObject();
        if (j && !cJSON_AddStringToObject(j, "status", draining ? "draining" : "ok")) {
            cJSON_Delete(j);
            j = NULL;
        }
        reply_json(r, draining ? 503 : 200, j);
        return;
    }
    cv_registry_stats rs;
    cv_jobs_stats js;
    cv_registry_stats_get(r->h->reg, &rs);
    int staged_areas;
    size_t staged_bytes;
    cv_staging_stats(r->h->staging, &staged_areas, &staged_bytes);
    cv_jobs_stats_get(r->h->jobs, &js);
    int draining = cv_jobs_draining(r->h->jobs);
    int ranks_started, ranks;
    cv_jobs_ranks(r->h->jobs, &ranks_started, &ranks);
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
              !cJSON_AddNumberToObject(j, "registry_staged_bytes", (double)rs.staged_bytes) ||
              !cJSON_AddNumberToObject(j, "staged_uploads", staged_areas) ||
              !cJSON_AddNumberToObject(j, "max_body_bytes", (double)r->h->cfg.max_body) ||
              !cJSON_AddBoolToObject(j, "data_dir", r->h->cfg.data_dir != NULL) ||
              !cJSON_AddBoolToObject(j, "state_dir", r->h->cfg.state_dir) ||
              !cJSON_AddNumberToObject(j, "kept_job_bytes", (double)js.kept_bytes) ||
              !cJSON_AddNumberToObject(j, "max_kept_bytes", (double)js.max_kept_bytes) ||
              !add_memory(j, &js) ||
              !cJSON_AddNumberToObject(j, "ranks", ranks) ||
              !cJSON_AddNumberToObject(j, "ranks_started", ranks_started))) {
        cJSON_Delete(j);
        j = NULL;
    }
    reply_json(r, draining ? 503 : 200, j);
}

void h_metrics(req *r)
{
    cv_http_counters hc;
    for (int i = 0; i < 6; i++)
        hc.requests[i] = atomic_load(&r->h->requests[i]);
    char *t = cv_metrics_render(r->h->reg, r->h->jobs, &hc, cv_now_s() - r->h->started);
    char *g = t && r->h->cfg.monitors ? cv_monitors_metrics(r->h->cfg.monitors) : NULL;
    if (g && g[0]) {
        size_t a = strlen(t), b = strlen(g);
        char *both = realloc(t, a + b + 1);
        if (both) {
            memcpy(both + a, g, b + 1);
            t = both;
        }
    }
    free(g);
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

void h_dashboard_index(req *r) { serve_dashboard_file(r, "index.html"); }
void h_dashboard_file(req *r) { serve_dashboard_file(r, r->param); }
