/* handlers_jobs.c - the job routes: POST /v1/jobs (submit, optionally wait),
 * GET /v1/jobs (list with filters), GET and DELETE /v1/jobs/{id} (status and
 * result, cancel), and GET /v1/ops (what a job may ask for).  The queue and
 * the workers are server/jobs.c; the job document is api/job.c. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/job.h"
#include "api/ops_table.h"
#include "engine/curv.h"
#include "server/http_internal.h"
#include "server/util.h"

static void reply_job(req *r, unsigned status, cv_job *j) { set_job_reply(r, status, j); }

void h_jobs_post(req *r)
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
    int rc = cv_jobs_submit_from(r->h->jobs, doc, timeout, r->client, &j, &e);
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

void h_job_get(req *r)
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

void h_job_delete(req *r)
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

/* ", queued, running, ..." from the one list of statuses (api/job.h). */
#define STATUS_ITEM_(id, name) ", " name
static const char status_names[] = CV_JOB_STATUSES(STATUS_ITEM_);
#undef STATUS_ITEM_

void h_jobs_list(req *r)
{
    const char *st = query(r, "status"), *lim = query(r, "limit");
    int status = -1;
    if (st && (status = cv_job_status_from_name(st)) < 0) {
        reply_errf(r, CV_EINVAL, "invalid_query", "status", "status must be one of %s; got '%.40s'",
                   status_names + 2, st);
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

void h_ops(req *r) { reply_json(r, 200, cv_ops_describe()); }

