/* handlers_jobs.c - the job routes: POST /v1/jobs (submit, optionally wait),
 * GET /v1/jobs (list with filters), GET and DELETE /v1/jobs/{id} (status and
 * result, cancel), and GET /v1/ops (what a job may ask for).  The queue and
 * the workers are server/jobs.c; the job document is api/job.c. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/job.h"
#include "api/json_strict.h"
#include "api/ops_table.h"
#include "engine/curv.h"
#include "server/http_internal.h"
#include "server/util.h"

static void reply_job(req *r, unsigned status, cv_job *j) { set_job_reply(r, status, j); }

/* Bodies from this size on have their batch.indices read straight into an
 * int32 array (cv_job_text_indices), not into a cJSON node per index. */
#define COMPACT_INDICES_FROM 4096
/* A document parsed into a cJSON tree from this size on is followed by
 * cv_memory_trim (the tree was some 25x its text). */
#define TRIM_AFTER_BODY ((size_t)1 << 20)

/* The job document of the request (NULL: answered with the error); a large
 * one's batch.indices in *idx, *n (the document holds a placeholder). */
static cJSON *job_body(req *r, int32_t **idx, size_t *n)
{
    int ranks, alive;
    cv_jobs_ranks(r->h->jobs, &ranks, &alive);
    char *rest = NULL;
    size_t rest_len;
    int rc = r->body_len >= COMPACT_INDICES_FROM && ranks <= 1
                 ? cv_job_text_indices(r->body, r->body_len, &rest, &rest_len, idx, n)
                 : 0;
    if (rc < 0) {
        reply_errf(r, CV_ENOMEM, "out_of_memory", "", "out of memory reading the job");
        return NULL;
    }
    if (rc == 0)
        return body_object(r);
    cv_err e;
    cJSON *doc = cv_json_parse_strict(rest, rest_len, "the request body", "", &e);
    free(rest);
    if (!doc) {
        free(*idx);
        *idx = NULL;
        reply_err(r, &e);
    }
    return doc; /* an object: the text starts with '{' and parsed whole */
}

void h_jobs_post(req *r)
{
    double wait, timeout;
    if (query_seconds(r, "wait", r->h->cfg.max_wait, &wait) ||
        query_seconds(r, "timeout", -1, &timeout))
        return;
    cv_job *j;
    cv_err e;
    int32_t *idx = NULL;
    size_t nidx = 0;
    cJSON *doc = job_body(r, &idx, &nidx);
    if (!doc)
        return;
    int tree = !idx; /* parsed into one cJSON node per value */
    int rc = idx ? cv_jobs_submit_indices(r->h->jobs, doc, idx, nidx, timeout, r->client, &j, &e)
                 : cv_jobs_submit_from(r->h->jobs, doc, timeout, r->client, &j, &e);
    cJSON_Delete(doc);
    if (tree && r->body_len >= TRIM_AFTER_BODY)
        cv_memory_trim(); /* that many small nodes: give their pages back */
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

