/* http.c - the HTTP server: the libmicrohttpd daemon, request bodies
 * (accumulated up to the limits of http.h), the route table and dispatch.
 * The handlers are server/handlers_*.c, the helpers they share
 * server/http_req.c (see http_internal.h); routes in api/openapi.yaml.
 * cv_http_handle answers a request given as data, without the daemon (the
 * fuzz harness). */
#include "api/suggest.h"
#include "server/http.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

#include "engine/linop.h"
#include "server/connguard.h"
#include "server/http_internal.h"
#include "server/registry.h"
#include "server/util.h"

/* Per-request state: the accumulated body and, once dispatched, the reply. */
typedef struct {
    char *body;
    size_t len, cap;
    size_t limit;              /* --max-body, or --max-job-bytes for POST /v1/jobs */
    const char *limit_opt;     /* the option that set limit, for messages */
    int too_large;
    size_t declared;           /* a Content-Length over the limit (drained, then refused) */
    int oom;                   /* the body buffer could not grow */
    size_t charged;            /* bytes of the body buffer in the memory account */
    int dispatched;
    char client[64];           /* req.client */
    int anonymous;             /* req.anonymous */
} conn_state;

/* Stands in for a conn_state that could not be allocated: the request was
 * answered 503 at once; never written to, never freed. */
static conn_state oom_state = {.dispatched = 1};

/* Per-connection state (the socket context, MHD_OPTION_NOTIFY_CONNECTION):
 * whether the URL of the request being read decoded a %00.  libmicrohttpd
 * hands the handler the URL as a C string, so NAME%00zzz would arrive as
 * NAME; unescape_url records the NUL here and on_request refuses the
 * request.  Requests on one connection are read one after the other, so
 * one flag per connection is enough. */
typedef struct {
    int nul_in_url;
    cv_conn_slot *slot;        /* the header deadline's record (server/connguard.h) */
} conn_ctx;

static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe)
{
    cv_http *h = cls;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        conn_ctx *x = calloc(1, sizeof(conn_ctx)); /* NULL: unescape_url falls back */
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
        if (x && ci)
            x->slot = cv_connguard_add(h->guard, ci->connect_fd);
        *socket_context = x;
    } else {
        conn_ctx *x = *socket_context;
        if (x)
            cv_connguard_remove(h->guard, x->slot); /* before MHD closes the socket */
        free(x);
        *socket_context = NULL;
    }
}

static conn_ctx *connection_ctx(struct MHD_Connection *conn)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    return ci ? ci->socket_context : NULL;
}

/* libmicrohttpd's %HH decoding of the path and of every query key and
 * value; a decoded NUL marks the connection (or, without its state, becomes
 * 0x01, which no name, id or number accepts). */
static size_t unescape_url(void *cls, struct MHD_Connection *conn, char *s)
{
    (void)cls;
    size_t n = MHD_http_unescape(s);
    if (!memchr(s, 0, n))
        return n;
    conn_ctx *x = connection_ctx(conn);
    if (x)
        x->nul_in_url = 1;
    else
        for (size_t i = 0; i < n; i++)
            if (!s[i])
                s[i] = 1;
    return n;
}

/* 1 (and the flag cleared) when the request's URL decoded a NUL. */
static int take_nul_in_url(struct MHD_Connection *conn)
{
    conn_ctx *x = connection_ctx(conn);
    int nul = x && x->nul_in_url;
    if (x)
        x->nul_in_url = 0;
    return nul;
}

/* ---- routing --------------------------------------------------------------- */

typedef struct {
    cv_route_info info;
    void (*fn)(req *r);
    const char *const *queries; /* the query parameters it reads (NULL: none) */
} route;

static const char *const Q_JOBS_POST[] = {"wait", "timeout", NULL};
static const char *const Q_JOB_GET[] = {"wait", NULL};
static const char *const Q_JOBS_LIST[] = {"status", "model", "dataset", "op", "limit", NULL};
static const char *const Q_POSTERIORS_DELETE[] = {"name", NULL};
static const char *const Q_HISTORY[] = {"monitor", "since", NULL};

static const route routes[] = {
    {{"GET", "/v1/health", "Service health and load"}, h_health, NULL},
    {{"GET", "/v1/ops", "Ops and curvature types the engine supports"}, h_ops, NULL},
    {{"GET", "/metrics", "Prometheus metrics"}, h_metrics, NULL},
    {{"GET", "/v1/models", "List models"}, h_models_list, NULL},
    {{"POST", "/v1/models", "Register a model (JSON with base64 parameters, or multipart)"},
     h_models_post, NULL},
    {{"GET", "/v1/models/{name}", "Describe a model"}, h_model_get, NULL},
    {{"DELETE", "/v1/models/{name}", "Delete a model"}, h_model_delete, NULL},
    {{"GET", "/v1/models/{name}/parameters", "Download the parameters (safetensors)"},
     h_model_params_get, NULL},
    {{"PUT", "/v1/models/{name}/parameters", "Replace the parameters (safetensors body)"},
     h_model_params_put, NULL},
    {{"DELETE", "/v1/models/{name}/posteriors", "Delete the model's kept Laplace posteriors "
      "(?name=: one)"}, h_model_posteriors_delete, Q_POSTERIORS_DELETE},
    {{"POST", "/v1/models/{name}/monitors", "Create a training monitor (instruments on every "
      "k-th pushed version)"}, h_monitors_post, NULL},
    {{"GET", "/v1/models/{name}/monitors", "List the model's training monitors"},
     h_monitors_list, NULL},
    {{"DELETE", "/v1/models/{name}/monitors/{id}", "Delete a training monitor"},
     h_monitor_delete, NULL},
    {{"GET", "/v1/models/{name}/history", "The monitors' instruments time series (filters: "
      "monitor, since)"}, h_history, Q_HISTORY},
    {{"GET", "/v1/datasets", "List datasets"}, h_datasets_list, NULL},
    {{"POST", "/v1/datasets", "Register a dataset (JSON with base64 data, or multipart)"},
     h_datasets_post, NULL},
    {{"GET", "/v1/datasets/{name}", "Describe a dataset"}, h_dataset_get, NULL},
    {{"PUT", "/v1/datasets/{name}", "Create or replace a dataset (safetensors body)"},
     h_dataset_put, NULL},
    {{"DELETE", "/v1/datasets/{name}", "Delete a dataset"}, h_dataset_delete, NULL},
    {{"POST", "/v1/datasets/{name}", "Register a file of --data-dir (memory-mapped)"},
     h_dataset_file_post, NULL},
    {{"POST", "/v1/datasets/{name}/parts", "Append a part to an upload in parts (safetensors "
      "body)"}, h_dataset_parts_post, NULL},
    {{"GET", "/v1/datasets/{name}/parts", "Describe an upload in parts"}, h_dataset_parts_get,
     NULL},
    {{"DELETE", "/v1/datasets/{name}/parts", "Abandon an upload in parts"},
     h_dataset_parts_delete, NULL},
    {{"POST", "/v1/datasets/{name}/commit", "Register the dataset uploaded in parts"},
     h_dataset_commit, NULL},
    {{"GET", "/v1/datasets/{name}/data", "Download the dataset (safetensors)"},
     h_dataset_data_get, NULL},
    {{"GET", "/v1/jobs", "List jobs (filters: status, model, dataset, op, limit)"},
     h_jobs_list, Q_JOBS_LIST},
    {{"POST", "/v1/jobs", "Submit a job"}, h_jobs_post, Q_JOBS_POST},
    {{"GET", "/v1/jobs/{id}", "Job status and result"}, h_job_get, Q_JOB_GET},
    {{"DELETE", "/v1/jobs/{id}", "Cancel a job"}, h_job_delete, NULL},
    {{"GET", "/", "Web dashboard (HTML page)"}, h_dashboard_index, NULL},
    {{"GET", "/dashboard/{file}", "Web dashboard static files (JS, CSS)"}, h_dashboard_file, NULL},
};
#define NROUTES ((int)(sizeof routes / sizeof routes[0]))

int cv_http_route_count(void) { return NROUTES; }

const cv_route_info *cv_http_route(int i)
{
    return i >= 0 && i < NROUTES ? &routes[i].info : NULL;
}

typedef struct {
    const char *const *known;
    const char *unknown; /* the first query parameter not in known, or NULL */
} query_scan;

static enum MHD_Result scan_query(void *cls, enum MHD_ValueKind kind, const char *key,
                                  const char *value)
{
    query_scan *q = cls;
    for (int i = 0; q->known && q->known[i]; i++)
        if (strcmp(q->known[i], key) == 0)
            return MHD_YES;
    q->unknown = key;
    return MHD_NO;
}

/* Answers 400 invalid_query (with a "did you mean" hint) when a request to
 * the API (/v1/...) has a query parameter the route does not read, so that a
 * typo such as ?wiat=5 is not silently ignored; returns 1 then.  The
 * dashboard's files and /metrics ignore query strings (cache busters,
 * scraper parameters). */
static int reject_unknown_query(req *r, const route *rt)
{
    if (strncmp(rt->info.path, "/v1/", 4) != 0)
        return 0;
    query_scan q = {rt->queries, NULL};
    if (r->conn)
        MHD_get_connection_values(r->conn, MHD_GET_ARGUMENT_KIND, scan_query, &q);
    else
        for (int i = 0; i < r->in->nquery && !q.unknown; i++)
            scan_query(&q, MHD_GET_ARGUMENT_KIND, r->in->query[i].key, r->in->query[i].value);
    if (!q.unknown)
        return 0;
    static const char *const none[] = {NULL};
    const char *const *known = rt->queries ? rt->queries : none;
    char list[128], hint[96];
    cv_join_names(known, -1, ", ", ", ", list, sizeof list);
    reply_errf(r, CV_EINVAL, "invalid_query", q.unknown,
               "unknown query parameter '%.40s' for %s %s (known: %s)%s", q.unknown,
               rt->info.method, rt->info.path, list[0] ? list : "none",
               cv_suggest_hint(q.unknown, known, -1, hint, sizeof hint));
    return 1;
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
    cv_staging_sweep(r->h->staging, cv_now_s()); /* idle uploads in parts */
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
            if (!reject_unknown_query(r, &routes[i]))
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

/* ---- access control (server/access.h) ------------------------------------------ */

static const char *conn_header(struct MHD_Connection *conn, const char *key)
{
    return MHD_lookup_connection_value(conn, MHD_HEADER_KIND, key);
}

/* The per-client quota's key: "token:N" with tokens, else "ip:ADDR". */
static void client_key(struct MHD_Connection *conn, int token, char *out, size_t len)
{
    if (token >= 0) {
        snprintf(out, len, "token:%d", token);
        return;
    }
    if (token == -2) {
        snprintf(out, len, "anonymous");
        return;
    }
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    char addr[INET6_ADDRSTRLEN] = "?";
    const struct sockaddr *sa = ci ? ci->client_addr : NULL;
    if (sa && sa->sa_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, addr, sizeof addr);
    else if (sa && sa->sa_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, addr, sizeof addr);
    snprintf(out, len, "ip:%s", addr);
}

/* Access-Control-* headers for a request from an allowed origin. */
static void add_cors_headers(cv_http *h, struct MHD_Connection *conn,
                             struct MHD_Response *resp, int preflight)
{
    if (!cv_access_cors_origin(h->access))
        return;
    MHD_add_response_header(resp, "Vary", "Origin");
    const char *allow = cv_access_cors_allow(h->access, conn_header(conn, "Origin"));
    if (!allow)
        return;
    MHD_add_response_header(resp, "Access-Control-Allow-Origin", allow);
    if (preflight) {
        MHD_add_response_header(resp, "Access-Control-Allow-Methods", CV_CORS_ALLOW_METHODS);
        MHD_add_response_header(resp, "Access-Control-Allow-Headers", CV_CORS_ALLOW_HEADERS);
        MHD_add_response_header(resp, "Access-Control-Max-Age", CV_CORS_MAX_AGE);
    } else {
        MHD_add_response_header(resp, "Access-Control-Expose-Headers", CV_CORS_EXPOSE_HEADERS);
    }
}

static enum MHD_Result send_reply(cv_http *h, struct MHD_Connection *conn, req *r);

static enum MHD_Result reply_denied(cv_http *h, struct MHD_Connection *conn, const char *method,
                                   const char *url, const cv_access_denial *d)
{
    req r;
    memset(&r, 0, sizeof r);
    r.h = h;
    r.conn = conn;
    r.method = method;
    r.url = url;
    reply_errf(&r, CV_EINVAL, d->code, "", "%s", d->message);
    if (r.out && r.status != 500)
        r.status = d->status;
    if (d->www_authenticate[0]) {
        snprintf(r.extra_name, sizeof r.extra_name, "WWW-Authenticate");
        snprintf(r.extra_value, sizeof r.extra_value, "%s", d->www_authenticate);
    }
    return send_reply(h, conn, &r);
}

/* OPTIONS: a CORS preflight from the allowed origin is 204 with the
 * Access-Control-* headers; from another origin 403 cors_not_allowed; without
 * Origin 204 with Allow. */
static enum MHD_Result answer_options(cv_http *h, struct MHD_Connection *conn, const char *url)
{
    const char *origin = conn_header(conn, "Origin");
    if (origin && !cv_access_cors_allow(h->access, origin)) {
        cv_access_denial d = {.status = 403, .code = "cors_not_allowed"};
        snprintf(d.message, sizeof d.message, "cross-origin requests from '%.80s' are not "
                 "allowed (--cors-origin %s)", origin,
                 cv_access_cors_origin(h->access) ? cv_access_cors_origin(h->access) : "unset");
        return reply_denied(h, conn, "OPTIONS", url, &d);
    }
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
    if (!resp)
        return MHD_NO;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, CV_CORS_ALLOW_METHODS);
    add_cors_headers(h, conn, resp, 1);
    atomic_fetch_add(&h->requests[2], 1);
    enum MHD_Result rc = MHD_queue_response(conn, 204, resp);
    MHD_destroy_response(resp);
    return rc;
}

/* The checks of a request whose headers are in, before its body: Host
 * (421), OPTIONS, token and role (401/403), Content-Type (415).  Returns 1
 * when the request was answered (*rc the result), 0 to go on; fills
 * cs->client. */
static int check_access(cv_http *h, struct MHD_Connection *conn, const char *method,
                        const char *url, conn_state *cs, enum MHD_Result *rc)
{
    cv_access_denial d;
    int token = -1;
    if (cv_access_check_host(h->access, conn_header(conn, MHD_HTTP_HEADER_HOST), &d)) {
        *rc = reply_denied(h, conn, method, url, &d);
        return 1;
    }
    if (strcmp(method, "OPTIONS") == 0) {
        *rc = answer_options(h, conn, url);
        return 1;
    }
    const char *cl = conn_header(conn, MHD_HTTP_HEADER_CONTENT_LENGTH);
    int has_body = (cl && strcmp(cl, "0") != 0) ||
                   conn_header(conn, MHD_HTTP_HEADER_TRANSFER_ENCODING);
    if (cv_access_check_token(h->access, method, url,
                              conn_header(conn, MHD_HTTP_HEADER_AUTHORIZATION), &token, &d) ||
        cv_access_check_content_type(method, url,
                                     conn_header(conn, MHD_HTTP_HEADER_CONTENT_TYPE), has_body,
                                     &d)) {
        *rc = reply_denied(h, conn, method, url, &d);
        return 1;
    }
    cs->anonymous = token == -2;
    client_key(conn, token, cs->client, sizeof cs->client);
    return 0;
}

/* ---- MHD glue -------------------------------------------------------------- */

static enum MHD_Result send_reply(cv_http *h, struct MHD_Connection *conn, req *r)
{
    struct MHD_Response *resp;
    if (r->stream)
        resp = job_stream_response(r);
    else if (r->out)
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
    add_cors_headers(h, conn, resp, 0);
    unsigned st = r->status ? r->status : 500;
    if (st == 429 || st == 503) {
        /* every "retry later" says when: the handler's estimate, else a default */
        char ra[24];
        snprintf(ra, sizeof ra, "%u", r->retry_after ? r->retry_after
                                      : st == 429  ? RETRY_AFTER_BUSY_S
                                                   : RETRY_AFTER_UNAVAILABLE_S);
        MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, ra);
    }
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

/* The body buffer's size (cap bytes) in the --max-memory account as
 * request_bodies (server/memory.h): what it holds until the request ends. */
static void body_charge(cv_http *h, conn_state *cs, size_t cap)
{
    if (cap > cs->charged)
        cv_memory_add(h->cfg.memory, CV_MEM_REQUESTS, cap - cs->charged);
    else
        cv_memory_sub(h->cfg.memory, CV_MEM_REQUESTS, cs->charged - cap);
    cs->charged = cap;
}

/* A body declared at most this far over its limit is read and dropped before
 * the 413 (see on_request); a larger one is refused at once. */
#define BODY_DRAIN_MAX ((size_t)16 << 20)

/* 1 when the client waits for "100 Continue" before it sends the body (so an
 * answer sent at once reaches it intact). */
static int expects_continue(struct MHD_Connection *conn)
{
    const char *x = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_EXPECT);
    return x && strcasecmp(x, "100-continue") == 0;
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
        conn_ctx *x = connection_ctx(conn);
        if (x)
            cv_connguard_headers_in(h->guard, x->slot);
        if (take_nul_in_url(conn)) {
            cs->dispatched = 1;
            return reply_simple_error(h, conn, method, url, CV_EINVAL, 400, "nul_in_url",
                                      "the URL holds %00 (a NUL character), which no path "
                                      "segment or query parameter may contain");
        }
        enum MHD_Result arc;
        if (check_access(h, conn, method, url, cs, &arc)) {
            cs->dispatched = 1;
            return arc;
        }
        int job = is_job_post(method, url);
        cs->limit = job ? h->cfg.max_job_body : h->cfg.max_body;
        cs->limit_opt = job ? "--max-job-bytes" : "--max-body";
        const char *cl =
            MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        size_t declared;
        if (cl && cv_parse_size(cl, 0, (size_t)-1, &declared) == 0 && declared > cs->limit) {
            if (!expects_continue(conn) && declared - cs->limit <= BODY_DRAIN_MAX) {
                /* a client already sending: read and drop the body, then answer 413
                 * (answering first and closing would reset the connection under
                 * the client's send, which then never reads the answer) */
                cs->too_large = 1;
                cs->declared = declared;
                return MHD_YES;
            }
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
            body_charge(h, cs, 0);
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
                body_charge(h, cs, 0);
                return MHD_YES;
            }
            cs->body = nb;
            cs->cap = ncap;
            body_charge(h, cs, ncap);
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
        body_limit_msg(cs, msg, sizeof msg, cs->declared);
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
    r.client = cs->client;
    r.anonymous = cs->anonymous;
    /* answering may block (?wait=, a large upload's parse): no idle cut-off meanwhile */
    MHD_set_connection_option(conn, MHD_CONNECTION_OPTION_TIMEOUT, h->busy_timeout);
    dispatch(&r);
    return send_reply(h, conn, &r);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    (void)toe;
    take_nul_in_url(conn); /* a request refused before on_request leaves no mark */
    cv_http *h = cls;
    MHD_set_connection_option(conn, MHD_CONNECTION_OPTION_TIMEOUT, h->idle_timeout);
    conn_ctx *x = connection_ctx(conn);
    if (x)
        cv_connguard_request_done(h->guard, x->slot);
    conn_state *cs = *con_cls;
    if (cs && cs != &oom_state) {
        body_charge(h, cs, 0);
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

/* The whole of a text file (a PEM certificate or key), NUL-terminated; NULL
 * with e filled. */
static char *read_text_file(const char *path, const char *flag, cv_err *e)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        cv_err_set(e, CV_EINVAL, "invalid_tls", flag, "%s %s: cannot read it", flag, path);
        return NULL;
    }
    size_t cap = 16384, len = 0;
    char *buf = malloc(cap + 1);
    size_t n;
    while (buf && (n = fread(buf + len, 1, cap - len, f)) > 0) {
        len += n;
        if (len == cap && cap < ((size_t)1 << 24)) {
            char *nb = realloc(buf, 2 * cap + 1);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
    }
    fclose(f);
    if (!buf) {
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
        return NULL;
    }
    buf[len] = 0;
    if (!strstr(buf, "-----BEGIN ")) {
        free(buf);
        cv_err_set(e, CV_EINVAL, "invalid_tls", flag, "%s %s is not a PEM file", flag, path);
        return NULL;
    }
    return buf;
}

static void http_free(cv_http *h)
{
    cv_connguard_free(h->guard);
    cv_staging_free(h->staging);
    cv_access_free(h->access);
    free(h->tls_cert);
    if (h->tls_key) { /* the private key does not outlive the server in freed memory */
        volatile char *k = h->tls_key;
        for (size_t i = 0; k[i]; i++)
            k[i] = 0;
        free(h->tls_key);
    }
    free(h);
}

/* --tls-cert/--tls-key into h (both or neither); -1 with e filled. */
static int load_tls(cv_http *h, cv_err *e)
{
    const cv_http_config *c = &h->cfg;
    if (!c->tls_cert && !c->tls_key)
        return 0;
    if (!c->tls_cert || !c->tls_key)
        return cv_err_set(e, CV_EINVAL, "invalid_tls", c->tls_cert ? "tls-key" : "tls-cert",
                          "TLS needs both --tls-cert and --tls-key");
    if (MHD_is_feature_supported(MHD_FEATURE_TLS) != MHD_YES)
        return cv_err_set(e, CV_EINVAL, "tls_unsupported", "tls-cert",
                          "this libmicrohttpd was built without TLS (GnuTLS); --tls-cert needs "
                          "one built with it (Debian's libmicrohttpd12 has it)");
    if (!(h->tls_cert = read_text_file(c->tls_cert, "--tls-cert", e)) ||
        !(h->tls_key = read_text_file(c->tls_key, "--tls-key", e)))
        return -1;
    return 0;
}

static unsigned timeout_s(double s)
{
    return s > 86400.0 * 30 ? 0 /* none */ : (unsigned)s + (s > (unsigned)s);
}

/* The server without its daemon: configuration defaults, timeouts, the staging areas. */
static cv_http *http_new(const cv_http_config *c, cv_registry *reg, cv_jobs *jobs, cv_err *e)
{
    cv_http *h = cv_err_calloc(sizeof *h, "out of memory", e);
    if (!h)
        return NULL;
    h->cfg = *c;
    if (!h->cfg.bind || !h->cfg.bind[0])
        h->cfg.bind = "127.0.0.1";
    if (!h->cfg.max_connections)
        h->cfg.max_connections = 1024;
    if (!h->cfg.max_job_body)
        h->cfg.max_job_body = (size_t)16 << 20;
    if (h->cfg.max_wait < 0)
        h->cfg.max_wait = 0;
    /* While a request is answered (blocked in ?wait= up to max_wait seconds)
     * a minute more than that; between requests and while one is being
     * sent, idle_timeout of silence closes the connection. */
    h->busy_timeout = timeout_s(h->cfg.max_wait + 60);
    h->idle_timeout = h->cfg.idle_timeout > 0 ? timeout_s(h->cfg.idle_timeout) : h->busy_timeout;
    h->reg = reg;
    h->jobs = jobs;
    h->staging = cv_staging_new(reg, h->cfg.upload_timeout);
    if (!h->staging) {
        free(h);
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
        return NULL;
    }
    h->started = cv_now_s();
    for (int i = 0; i < 6; i++)
        atomic_init(&h->requests[i], 0);
    return h;
}

cv_http *cv_http_new_unbound(const cv_http_config *c, cv_registry *reg, cv_jobs *jobs,
                             cv_err *e)
{
    return http_new(c, reg, jobs, e);
}

unsigned cv_http_handle(cv_http *h, const cv_http_request *in, char **out, size_t *out_len,
                        const char **ctype)
{
    req r;
    memset(&r, 0, sizeof r);
    r.h = h;
    r.in = in;
    r.method = strcmp(in->method, "HEAD") == 0 ? "GET" : in->method;
    r.url = in->path;
    r.body = in->body ? in->body : "";
    r.body_len = in->body ? in->body_len : 0;
    dispatch(&r);
    if (r.stream)
        job_stream_to_text(&r); /* what a connection would have been sent */
    *out = r.out;
    *out_len = r.out_len;
    *ctype = r.ctype;
    return r.status;
}

cv_http *cv_http_start(const cv_http_config *c, cv_registry *reg, cv_jobs *jobs, cv_err *e)
{
    cv_http *h = http_new(c, reg, jobs, e);
    if (!h)
        return NULL;
    cv_access_config ac = {.token_file = c->auth_token_file, .allowed_hosts = c->allowed_hosts,
                           .bind = h->cfg.bind, .cors_origin = c->cors_origin,
                           .generate_token = c->generate_token,
                           .env_token = getenv("CURVD_TOKEN")};
    if (!(h->access = cv_access_new(&ac, e)) || load_tls(h, e)) {
        http_free(h);
        return NULL;
    }
    if (!(h->guard = cv_connguard_new(h->cfg.header_timeout))) {
        http_free(h);
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "cannot start the header-deadline thread");
        return NULL;
    }

    struct sockaddr_in a4;
    struct sockaddr_in6 a6;
    struct sockaddr *sa;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION |
                     MHD_USE_POLL | MHD_USE_ERROR_LOG;
    if (c->port < 0 || c->port > 65535) {
        http_free(h);
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
        http_free(h);
        cv_err_set(e, CV_EINVAL, "invalid_bind", "bind",
                   "--bind '%s' is not an IPv4 or IPv6 address", c->bind);
        return NULL;
    }
    struct MHD_OptionItem ops[16];
    int n = 0;
#define OPT(o, v, p) (ops[n++] = (struct MHD_OptionItem){(o), (intptr_t)(v), (p)})
    OPT(MHD_OPTION_EXTERNAL_LOGGER, (intptr_t)mhd_log, h);
    OPT(MHD_OPTION_SOCK_ADDR, 0, sa);
    OPT(MHD_OPTION_CONNECTION_LIMIT, h->cfg.max_connections, NULL);
    OPT(MHD_OPTION_CONNECTION_TIMEOUT, h->idle_timeout, NULL);
    OPT(MHD_OPTION_NOTIFY_COMPLETED, (intptr_t)on_completed, h);
    OPT(MHD_OPTION_NOTIFY_CONNECTION, (intptr_t)on_connection, h);
    OPT(MHD_OPTION_UNESCAPE_CALLBACK, (intptr_t)unescape_url, h);
    if (h->cfg.max_connections_per_ip)
        OPT(MHD_OPTION_PER_IP_CONNECTION_LIMIT, h->cfg.max_connections_per_ip, NULL);
    if (h->tls_cert) {
        flags |= MHD_USE_TLS;
        OPT(MHD_OPTION_HTTPS_MEM_CERT, 0, h->tls_cert);
        OPT(MHD_OPTION_HTTPS_MEM_KEY, 0, h->tls_key);
    }
    OPT(MHD_OPTION_END, 0, NULL);
#undef OPT
    h->d = MHD_start_daemon(flags, (uint16_t)c->port, NULL, NULL, on_request, h,
                            MHD_OPTION_ARRAY, ops, MHD_OPTION_END);
    if (!h->d) {
        int tls = h->tls_cert != NULL;
        http_free(h);
        if (tls)
            cv_err_set(e, CV_EINTERNAL, "listen_failed", "tls-cert",
                       "cannot start HTTPS on %s port %d: the port is in use, or --tls-cert/"
                       "--tls-key are not a matching PEM certificate and key (libmicrohttpd's "
                       "message above)", c->bind ? c->bind : "127.0.0.1", c->port);
        else
            cv_err_set(e, CV_EINTERNAL, "listen_failed", "port",
                       "cannot listen on %s port %d (in use, or not a local address?); choose "
                       "another with --port N (make run ARGS=\"--port N\"), or 0 for a free "
                       "one", c->bind ? c->bind : "127.0.0.1", c->port);
        return NULL;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
    h->port = info ? info->port : c->port;
    return h;
}

int cv_http_port(const cv_http *h) { return h->port; }

const char *cv_http_generated_token(const cv_http *h)
{
    return cv_access_generated_token(h->access);
}

int cv_http_tokens_required(const cv_http *h) { return cv_access_tokens(h->access) > 0; }

void cv_http_stop(cv_http *h)
{
    if (!h)
        return;
    if (h->d)
        MHD_stop_daemon(h->d); /* its connections leave the guard as they close */
    http_free(h);
}
