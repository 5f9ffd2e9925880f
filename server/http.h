/* http.h - the HTTP API (docs/interface.md, api/openapi.yaml) on libmicrohttpd.
 *
 * MHD runs one thread per connection (MHD_USE_THREAD_PER_CONNECTION with
 * its internal polling thread), so a request that waits for a job
 * (?wait=SECONDS, capped by max_wait) blocks only its own connection.  HTTP
 * threads parse and validate uploads but never run numerics: jobs go to the
 * worker pool of jobs.c.  Request bodies are accumulated up to max_body
 * bytes (max_job_body for POST /v1/jobs); a larger body (by Content-Length
 * or as it streams) is answered 413 body_too_large, a body that cannot be
 * buffered for lack of memory 503 out_of_memory.  A dataset larger than
 * max_body is uploaded in parts (server/staging.c) or registered from a file
 * of data_dir (server/datadir.c).  Idle uploads in parts are dropped after
 * upload_timeout seconds (checked as requests come in).  A connection that
 * sends nothing for idle_timeout seconds (waiting for a request, or stalled
 * inside one) is closed; while its request is being answered (a ?wait=
 * included) the limit is max_wait + 60 s, so a long poll is never cut off.
 * A connection must deliver each request's headers within header_timeout
 * seconds of its accept or of the previous request's end, however slowly it
 * trickles them (server/connguard.h; a slowloris client is cut off).
 * Connections are limited in all (max_connections) and per client address
 * (max_connections_per_ip): libmicrohttpd closes the ones beyond at accept.
 * Access control (tokens, Host, Content-Type, CORS) is server/access.h,
 * checked before a request's body is read; TLS is libmicrohttpd's (GnuTLS).
 * Every error is the interface's {"error": {"code", "message", "field"}} with
 * the HTTP status of cv_http_status(); unknown paths are 404 and known
 * paths with the wrong method 405 with an Allow header.  Every JSON body
 * ends with a newline.
 *
 * Inside: http.c (daemon, bodies, routing), http_req.c (request and reply
 * helpers), handlers_registry.c, handlers_jobs.c, handlers_misc.c; their
 * shared declarations are in http_internal.h.
 */
#ifndef CV_HTTP_H
#define CV_HTTP_H

#include <stddef.h>

#include "engine/err.h"
#include "server/jobs.h"
#include "server/registry.h"

typedef struct {
    const char *bind;         /* IPv4 or IPv6 address, default "127.0.0.1" */
    int port;                 /* 0: pick a free port */
    size_t max_body;          /* bytes */
    size_t max_job_body;      /* bytes of a POST /v1/jobs body (0: 16 MiB) */
    unsigned max_connections;
    double max_wait;          /* cap on ?wait= seconds; 0: ?wait= never waits */
    int log_requests;         /* one stderr line per request */
    int state_dir;            /* --state-dir is set (GET /v1/health says so) */
    const char *data_dir;     /* --data-dir: files registrable by name (NULL: none) */
    double upload_timeout;    /* seconds an idle upload in parts is kept (<= 0: forever) */
    /* access control (server/access.h) */
    const char *auth_token_file; /* --auth-token-file (NULL: no tokens needed) */
    int generate_token;          /* --generate-token: without a file, one admin token
                                  * from $CURVD_TOKEN or random (cv_http_generated_token) */
    const char *allowed_hosts;   /* --allowed-hosts (NULL: localhost names and bind) */
    const char *cors_origin;     /* --cors-origin (NULL: CORS off) */
    const char *tls_cert, *tls_key; /* --tls-cert/--tls-key PEM files (NULL: plain HTTP) */
    /* connections */
    unsigned max_connections_per_ip; /* 0: no limit */
    double idle_timeout;      /* seconds a connection may send nothing (0: max_wait + 60) */
    double header_timeout;    /* seconds to receive a request's headers (<= 0: no limit) */
    struct cv_monitors *monitors; /* training monitors (server/monitors.h); set by cv_serve */
    cv_memory *memory;        /* --max-memory account: request bodies are counted in
                               * it (server/memory.h; NULL: not counted) */
} cv_http_config;

typedef struct cv_http cv_http;

cv_http *cv_http_start(const cv_http_config *c, cv_registry *reg, cv_jobs *jobs, cv_err *e);
/* The port actually bound. */
int cv_http_port(const cv_http *h);
/* The random token of --generate-token (for the start-up log), or NULL. */
const char *cv_http_generated_token(const cv_http *h);
/* Tokens are required (--auth-token-file or --generate-token). */
int cv_http_tokens_required(const cv_http *h);
/* Stops accepting, closes connections and joins the HTTP threads. */
void cv_http_stop(cv_http *h);

/* Requests without a socket (the fuzz harness tests/fuzz/fuzz_http.c): a
 * server that never listens, and one request answered through the same
 * routing and handlers as over HTTP.  The request is what libmicrohttpd
 * hands the server: the path already %-decoded and without the query, the
 * query's keys and values decoded; header names match case-insensitively. */
typedef struct {
    const char *key, *value;
} cv_http_kv;

typedef struct {
    const char *method;       /* HEAD is answered as GET */
    const char *path;
    const cv_http_kv *query;
    int nquery;
    const cv_http_kv *headers;
    int nheaders;
    const char *body;         /* NULL: none */
    size_t body_len;
} cv_http_request;

/* Like cv_http_start without the daemon; free it with cv_http_stop. */
cv_http *cv_http_new_unbound(const cv_http_config *c, cv_registry *reg, cv_jobs *jobs,
                             cv_err *e);
/* Answers in: returns the HTTP status (0: no handler replied, which would
 * go out as 500); *out is the body (malloc()ed, *out_len bytes; NULL when
 * empty) and *ctype its Content-Type (static, or NULL). */
unsigned cv_http_handle(cv_http *h, const cv_http_request *in, char **out, size_t *out_len,
                        const char **ctype);

/* The route table: every (method, path template) the server answers, with
 * templates in OpenAPI form ("/v1/models/{name}"). */
typedef struct {
    const char *method;
    const char *path;
    const char *summary;
} cv_route_info;

int cv_http_route_count(void);
const cv_route_info *cv_http_route(int i);

/* The HTTP status that answers an engine error status: invalid 400,
 * not_found 404, conflict and cancelled 409, timeout 408, too_large 413,
 * busy 429, shutting_down 503, out_of_memory 507, anything else 500. */
int cv_http_status(cv_status st);

#endif
