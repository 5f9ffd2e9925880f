/* http_internal.h - private to the HTTP server (server/http*.c and
 * server/handlers_*.c): the server's state, the per-request record, the
 * request and reply helpers (http_req.c) and the handlers the route table of
 * http.c dispatches to.
 *
 * A handler reads r->param (the {name}/{id}/{file} path segment), r->body
 * and the query, and fills in the reply with exactly one of the reply_*
 * or set_* helpers (a later call replaces an earlier reply).  JSON replies
 * end with a newline.  These names are not cv_-prefixed: nothing outside the
 * HTTP server includes this header.
 */
#ifndef CV_HTTP_INTERNAL_H
#define CV_HTTP_INTERNAL_H

#include <cJSON.h>
#include <microhttpd.h>
#include <stdatomic.h>
#include <stddef.h>

#include "engine/err.h"
#include "server/access.h"
#include "server/http.h"
#include "server/jobs.h"
#include "server/registry.h"
#include "server/staging.h"

struct cv_http {
    cv_http_config cfg;
    cv_registry *reg;
    cv_jobs *jobs;
    cv_staging *staging;      /* uploads in parts */
    struct MHD_Daemon *d;
    cv_access *access;        /* tokens, hosts, CORS (server/access.h) */
    struct cv_connguard *guard; /* the request-header deadline (server/connguard.h) */
    char *tls_cert, *tls_key; /* PEM texts of --tls-cert/--tls-key (NULL: plain HTTP) */
    unsigned idle_timeout;    /* seconds a connection may send nothing (MHD's timeout) */
    unsigned busy_timeout;    /* the same while its request is answered (>= max_wait) */
    int port;
    double started;
    atomic_ulong requests[6]; /* answered, by status class 1xx..5xx */
};

#define MAX_PARAM 160

typedef struct {
    cv_http *h;
    struct MHD_Connection *conn;
    const cv_http_request *in; /* without a connection (cv_http_handle): its query, headers */
    const char *method;        /* as routed (HEAD is served as GET) */
    const char *url;
    char param[MAX_PARAM];     /* the {name} / {id} path segment */
    const char *client;        /* "token:N" or "ip:ADDR": the per-client job quota's key */
    int anonymous;             /* tokens are required and this request has none (health) */
    const char *body;
    size_t body_len;
    /* reply */
    unsigned status;
    char *out;                 /* malloc()ed */
    size_t out_len;
    struct job_stream *stream; /* instead of out: a job document streamed (set_job_reply) */
    const char *ctype;
    char location[256];
    char allow[64];
    char extra_name[32], extra_value[64];
    unsigned retry_after;      /* Retry-After seconds of a 429/503 (0: the default) */
} req;

/* Retry-After of a 429 (queue or registry full) and of a 503 (shutting
 * down, out of memory) when the handler gives no estimate. */
#define RETRY_AFTER_BUSY_S 1
#define RETRY_AFTER_UNAVAILABLE_S 5

/* ---- replies (http_req.c) ------------------------------------------------- */

/* Takes ownership of text (malloc()ed, len bytes) as the reply body. */
void set_text(req *r, unsigned status, char *text, size_t len, const char *ctype);
/* Takes ownership of t (malloc()ed JSON text, len bytes) as an
 * application/json body, to which it appends the newline; answers 507
 * out_of_memory when that fails. */
void set_json(req *r, unsigned status, char *t, size_t len);
/* The error document (docs/interface.md §5, Errors), with the HTTP status cv_http_status() gives. */
void reply_err(req *r, const cv_err *e);
void reply_errf(req *r, cv_status st, const char *code, const char *field, const char *fmt,
                ...) __attribute__((format(printf, 5, 6)));
void reply_oom(req *r);
/* Takes ownership of j (NULL: out of memory). */
void reply_json(req *r, unsigned status, cJSON *j);
/* The job's full status document (cv_job_status_parts) as an application/json
 * reply streamed from the kept result text: every reader of a large result
 * shares the one copy the job keeps (the reply holds a reference to j). */
void set_job_reply(req *r, unsigned status, cv_job *j);
/* The MHD response of a streamed reply (takes r->stream), or NULL. */
struct MHD_Response *job_stream_response(req *r);
/* A streamed reply as one malloc()ed body in r->out instead (no connection:
 * cv_http_handle); 507 out_of_memory when that fails. */
void job_stream_to_text(req *r);

/* ---- requests (http_req.c) ------------------------------------------------ */

const char *query(req *r, const char *key);
const char *header(req *r, const char *key);
/* ?wait= / ?timeout= seconds, capped at cap (cap < 0: no cap); returns -1
 * after replying 400. */
int query_seconds(req *r, const char *key, double cap, double *out);
/* Parses the body as a JSON object; replies 400 and returns NULL if it is not one. */
cJSON *body_object(req *r);
/* Rejects members of obj not in allowed (NULL-terminated); replies 400. */
int only_fields(req *r, const cJSON *obj, const char *const *allowed, const char *what);
/* The string member key of obj; NULL after replying 400 when it is not a
 * string, or when it is missing and required (missing and optional: NULL,
 * no reply). */
const char *string_member(req *r, const cJSON *obj, const char *key, int required);

/* ---- handlers ------------------------------------------------------------- */

/* handlers_registry.c */
void h_models_list(req *r);
void h_models_post(req *r);
void h_model_get(req *r);
void h_model_delete(req *r);
void h_model_params_get(req *r);
void h_model_params_put(req *r);
void h_model_posteriors_delete(req *r);
void h_datasets_list(req *r);
void h_datasets_post(req *r);
void h_dataset_get(req *r);
void h_dataset_put(req *r);
void h_dataset_delete(req *r);
void h_dataset_data_get(req *r);

/* handlers_uploads.c */
void h_dataset_file_post(req *r);
void h_dataset_parts_post(req *r);
void h_dataset_parts_get(req *r);
void h_dataset_parts_delete(req *r);
void h_dataset_commit(req *r);

/* handlers_jobs.c */
void h_jobs_post(req *r);
void h_job_get(req *r);
void h_job_delete(req *r);
void h_jobs_list(req *r);
void h_ops(req *r);

/* handlers_monitors.c */
void h_monitors_post(req *r);
void h_monitors_list(req *r);
void h_monitor_delete(req *r);
void h_history(req *r);

/* handlers_misc.c */
void h_health(req *r);
void h_metrics(req *r);
void h_dashboard_index(req *r);
void h_dashboard_file(req *r);

#endif
