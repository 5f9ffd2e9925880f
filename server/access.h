/* access.h - access control of the HTTP server (docs/interface.md, Access
 * control): bearer tokens with roles (--auth-token-file), the Host header
 * allow-list (--allowed-hosts, against DNS rebinding), the documented request
 * Content-Type of each POST/PUT route, and CORS (--cors-origin).  The
 * decisions are pure functions of the request's method, path and headers;
 * http.c asks them before it reads a request body and answers the refusal.
 *
 * Roles, each including the ones before it: read (GET/HEAD: the API's
 * reads, /metrics, the dashboard), submit (also POST /v1/jobs and DELETE
 * /v1/jobs/{id}), admin (also every registry write and delete: models,
 * datasets, uploads).  A token listed without a role has every role.
 * Tokens are compared in constant time (the time depends on the listed
 * tokens' lengths, never on the bytes presented).
 */
#ifndef CV_ACCESS_H
#define CV_ACCESS_H

#include <stddef.h>

#include "engine/err.h"

typedef enum { CV_ROLE_READ = 1, CV_ROLE_SUBMIT = 2, CV_ROLE_ADMIN = 3 } cv_role;

typedef struct {
    const char *token_file;    /* --auth-token-file (NULL: no authentication) */
    const char *allowed_hosts; /* --allowed-hosts, comma-separated; NULL: localhost names
                                * and bind; "*": any */
    const char *bind;          /* the listening address (allowed as a Host by default) */
    const char *cors_origin;   /* --cors-origin (NULL: CORS off) */
    /* --generate-token without --auth-token-file: one admin token, env_token
     * when not NULL/empty (CURVD_TOKEN), else 32 random hex digits */
    int generate_token;
    const char *env_token;
} cv_access_config;

typedef struct cv_access cv_access;

/* Reads the token file (lines "TOKEN [ROLE]", '#' comments and blank lines
 * skipped).  NULL with e filled when the file cannot be read, a line is
 * malformed or the file lists no token. */
cv_access *cv_access_new(const cv_access_config *c, cv_err *e);
void cv_access_free(cv_access *a);
/* The number of tokens (0: authentication off). */
int cv_access_tokens(const cv_access *a);
/* The token made by generate_token from random bytes (to be logged), or
 * NULL (none generated: a file or CURVD_TOKEN gave the tokens). */
const char *cv_access_generated_token(const cv_access *a);

/* A refusal: HTTP status, error code and message, and for 401 the
 * WWW-Authenticate value. */
typedef struct {
    unsigned status;
    const char *code;
    char message[240];
    char www_authenticate[64];
} cv_access_denial;

/* The role a request needs (method as sent; HEAD counts as GET). */
cv_role cv_access_route_role(const char *method, const char *path);

/* 0 when Host (NULL: absent, allowed) names an allowed host; -1 with d filled
 * (421 host_not_allowed) otherwise. */
int cv_access_check_host(const cv_access *a, const char *host, cv_access_denial *d);

/* 0 when authentication is off or authorization ("Bearer TOKEN") carries a
 * listed token whose role allows method+path; *client (may be NULL) is then
 * the token's index (-1: authentication off).  Without an Authorization
 * header GET/HEAD of /v1/health (liveness probes carry no credentials; the
 * handler then tells only the status) and of the dashboard's static files
 * (/ and /dashboard/{file}: no data; what the page shows comes from /v1 with
 * the token it is given) pass too, with *client -2.  -1 with
 * d filled: 401 unauthorized (no or unknown token) or 403 forbidden (the
 * role is short). */
int cv_access_check_token(const cv_access *a, const char *method, const char *path,
                          const char *authorization, int *client, cv_access_denial *d);

/* 0 when the Content-Type fits the route's documented body types (a
 * request without Content-Type and without a body passes); -1 with d
 * filled (415 unsupported_media_type).  Only POST and PUT are checked. */
int cv_access_check_content_type(const char *method, const char *path, const char *ctype,
                                 int has_body, cv_access_denial *d);

/* The value of Access-Control-Allow-Origin for a request with this Origin
 * header: the configured origin when it matches exactly, else NULL. */
const char *cv_access_cors_allow(const cv_access *a, const char *origin);
/* The configured origin (NULL: CORS off). */
const char *cv_access_cors_origin(const cv_access *a);

/* Headers of a CORS answer. */
#define CV_CORS_ALLOW_METHODS "GET, HEAD, POST, PUT, DELETE, OPTIONS"
#define CV_CORS_ALLOW_HEADERS "Authorization, Content-Type"
#define CV_CORS_EXPOSE_HEADERS "Location, Retry-After"
#define CV_CORS_MAX_AGE "600"

#endif
