/* access.c - tokens and roles, the Host allow-list, the documented request
 * Content-Types and CORS (see access.h).  Owns the token table read from
 * --auth-token-file; nothing here is mutable after cv_access_new. */
#include "server/access.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>

#define MAX_TOKEN 512
#define MAX_HOSTS 64

typedef struct {
    char *token;
    size_t len;
    cv_role role;
} token_entry;

struct cv_access {
    token_entry *tokens;
    int ntokens;
    char *hosts_buf;          /* the --allowed-hosts copy the entries point into */
    const char *hosts[MAX_HOSTS];
    int nhosts;
    int any_host;
    char *cors_origin;
    const char *generated;    /* tokens[0].token when it was generated at random */
};

static const char *role_name(cv_role r)
{
    return r == CV_ROLE_READ ? "read" : r == CV_ROLE_SUBMIT ? "submit" : "admin";
}

static int parse_role(const char *s, cv_role *out)
{
    if (strcmp(s, "read") == 0)
        *out = CV_ROLE_READ;
    else if (strcmp(s, "submit") == 0)
        *out = CV_ROLE_SUBMIT;
    else if (strcmp(s, "admin") == 0)
        *out = CV_ROLE_ADMIN;
    else
        return -1;
    return 0;
}

/* One line of the token file (comment and surrounding blanks already
 * stripped, non-empty) into t; -1 with e filled. */
static int parse_token_line(char *line, const char *path, int lineno, token_entry *t,
                            cv_err *e)
{
    char *tok = strtok(line, " \t");
    char *role = strtok(NULL, " \t");
    char *extra = strtok(NULL, " \t");
    if (extra)
        return cv_err_set(e, CV_EINVAL, "invalid_token_file", "auth-token-file",
                          "--auth-token-file %s line %d: want TOKEN [read|submit|admin], got "
                          "more words", path, lineno);
    size_t n = strlen(tok);
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)tok[i] < 0x21 || (unsigned char)tok[i] > 0x7e)
            return cv_err_set(e, CV_EINVAL, "invalid_token_file", "auth-token-file",
                              "--auth-token-file %s line %d: a token is printable ASCII "
                              "without spaces", path, lineno);
    if (n > MAX_TOKEN)
        return cv_err_set(e, CV_EINVAL, "invalid_token_file", "auth-token-file",
                          "--auth-token-file %s line %d: token longer than %d characters",
                          path, lineno, MAX_TOKEN);
    t->role = CV_ROLE_ADMIN;
    if (role && parse_role(role, &t->role))
        return cv_err_set(e, CV_EINVAL, "invalid_token_file", "auth-token-file",
                          "--auth-token-file %s line %d: unknown role '%.32s' (read, submit or "
                          "admin)", path, lineno, role);
    t->token = strdup(tok);
    t->len = n;
    return t->token ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
}

static int load_tokens(cv_access *a, const char *path, cv_err *e)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return cv_err_set(e, CV_EINVAL, "invalid_token_file", "auth-token-file",
                          "--auth-token-file %s: %s", path, strerror(errno));
    char line[MAX_TOKEN + 64];
    int lineno = 0, rc = 0, cap = 0;
    while (!rc && fgets(line, sizeof line, f)) {
        lineno++;
        size_t n = strlen(line);
        if (n == sizeof line - 1 && line[n - 1] != '\n' && !feof(f)) {
            rc = cv_err_set(e, CV_EINVAL, "invalid_token_file", "auth-token-file",
                            "--auth-token-file %s line %d: line too long", path, lineno);
            break;
        }
        char *hash = strchr(line, '#');
        if (hash)
            *hash = 0;
        char *s = line;
        while (*s && isspace((unsigned char)*s))
            s++;
        n = strlen(s);
        while (n && isspace((unsigned char)s[n - 1]))
            s[--n] = 0;
        if (!n)
            continue;
        if (a->ntokens == cap) {
            int ncap = cap ? 2 * cap : 8;
            token_entry *nt = realloc(a->tokens, (size_t)ncap * sizeof *nt);
            if (!nt) {
                rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
                break;
            }
            a->tokens = nt;
            cap = ncap;
        }
        rc = parse_token_line(s, path, lineno, &a->tokens[a->ntokens], e);
        if (!rc)
            a->ntokens++;
    }
    fclose(f);
    if (!rc && !a->ntokens)
        rc = cv_err_set(e, CV_EINVAL, "invalid_token_file", "auth-token-file",
                        "--auth-token-file %s lists no token", path);
    return rc;
}

static int add_host(cv_access *a, const char *h)
{
    if (a->nhosts == MAX_HOSTS)
        return -1;
    a->hosts[a->nhosts++] = h;
    return 0;
}

static int set_hosts(cv_access *a, const cv_access_config *c, cv_err *e)
{
    if (!c->allowed_hosts) {
        add_host(a, "localhost");
        add_host(a, "127.0.0.1");
        add_host(a, "::1");
        if (c->bind && c->bind[0])
            add_host(a, c->bind);
        return 0;
    }
    if (!(a->hosts_buf = strdup(c->allowed_hosts)))
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
    for (char *save = NULL, *h = strtok_r(a->hosts_buf, ", ", &save); h;
         h = strtok_r(NULL, ", ", &save)) {
        if (strcmp(h, "*") == 0)
            a->any_host = 1;
        else if (add_host(a, h))
            return cv_err_set(e, CV_EINVAL, "invalid_allowed_hosts", "allowed-hosts",
                              "--allowed-hosts lists more than %d hosts", MAX_HOSTS);
    }
    if (!a->any_host && !a->nhosts)
        return cv_err_set(e, CV_EINVAL, "invalid_allowed_hosts", "allowed-hosts",
                          "--allowed-hosts lists no host (use '*' for any)");
    return 0;
}

/* --generate-token: one admin token, from CURVD_TOKEN or random. */
static int make_token(cv_access *a, const char *env_token, cv_err *e)
{
    char buf[33];
    const char *tok = env_token;
    if (!tok || !tok[0]) {
        unsigned char rnd[16];
        size_t got = 0;
        while (got < sizeof rnd) {
            ssize_t n = getrandom(rnd + got, sizeof rnd - got, 0);
            if (n <= 0)
                return cv_err_set(e, CV_EINTERNAL, "no_random", "generate-token",
                                  "--generate-token: no random bytes (getrandom: %s)",
                                  strerror(errno));
            got += (size_t)n;
        }
        for (size_t i = 0; i < sizeof rnd; i++)
            snprintf(buf + 2 * i, 3, "%02x", rnd[i]);
        tok = buf;
    }
    size_t n = strlen(tok);
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)tok[i] < 0x21 || (unsigned char)tok[i] > 0x7e || n > MAX_TOKEN)
            return cv_err_set(e, CV_EINVAL, "invalid_token", "CURVD_TOKEN",
                              "CURVD_TOKEN must be up to %d printable ASCII characters "
                              "without spaces", MAX_TOKEN);
    if (!(a->tokens = calloc(1, sizeof *a->tokens)) || !(a->tokens[0].token = strdup(tok)))
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
    a->tokens[0].len = n;
    a->tokens[0].role = CV_ROLE_ADMIN;
    a->ntokens = 1;
    if (tok == buf)
        a->generated = a->tokens[0].token;
    return 0;
}

cv_access *cv_access_new(const cv_access_config *c, cv_err *e)
{
    cv_access *a = calloc(1, sizeof *a);
    if (!a) {
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
        return NULL;
    }
    if ((c->token_file && load_tokens(a, c->token_file, e)) ||
        (!c->token_file && c->generate_token && make_token(a, c->env_token, e)) ||
        set_hosts(a, c, e)) {
        cv_access_free(a);
        return NULL;
    }
    if (c->cors_origin && c->cors_origin[0] && !(a->cors_origin = strdup(c->cors_origin))) {
        cv_access_free(a);
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
        return NULL;
    }
    return a;
}

void cv_access_free(cv_access *a)
{
    if (!a)
        return;
    for (int i = 0; i < a->ntokens; i++) {
        volatile char *p = a->tokens[i].token;
        for (size_t k = 0; k < a->tokens[i].len; k++)
            p[k] = 0;
        free(a->tokens[i].token);
    }
    free(a->tokens);
    free(a->hosts_buf);
    free(a->cors_origin);
    free(a);
}

int cv_access_tokens(const cv_access *a) { return a ? a->ntokens : 0; }

const char *cv_access_generated_token(const cv_access *a) { return a ? a->generated : NULL; }

/* ---- routes ------------------------------------------------------------------- */

/* The path's segments after the leading '/', without a trailing '/': up to
 * 4 (seg[i] points into path, len[i] its length); returns the count (5: more). */
static int segments(const char *path, const char *seg[4], size_t len[4])
{
    int n = 0;
    const char *p = path;
    while (*p == '/')
        p++;
    while (*p) {
        size_t l = strcspn(p, "/");
        if (n == 4)
            return 5;
        seg[n] = p;
        len[n++] = l;
        p += l;
        while (*p == '/')
            p++;
    }
    return n;
}

static int seg_is(const char *s, size_t n, const char *word)
{
    return strlen(word) == n && strncmp(s, word, n) == 0;
}

cv_role cv_access_route_role(const char *method, const char *path)
{
    if (strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0)
        return CV_ROLE_READ;
    const char *seg[4];
    size_t len[4];
    int n = segments(path, seg, len);
    if (n >= 2 && n <= 3 && seg_is(seg[0], len[0], "v1") && seg_is(seg[1], len[1], "jobs") &&
        ((n == 2 && strcmp(method, "POST") == 0) || (n == 3 && strcmp(method, "DELETE") == 0)))
        return CV_ROLE_SUBMIT;
    return CV_ROLE_ADMIN;
}

/* The media types a POST/PUT route documents (api/openapi.yaml), or NULL
 * for a route that does not exist (the router answers it). */
static const char *const *route_types(const char *method, const char *path)
{
    static const char *const json[] = {"application/json", NULL};
    static const char *const json_or_form[] = {"application/json", "multipart/form-data",
                                               NULL};
    static const char *const octets[] = {"application/octet-stream", NULL};
    const char *seg[4];
    size_t len[4];
    int n = segments(path, seg, len);
    int post = strcmp(method, "POST") == 0, put = strcmp(method, "PUT") == 0;
    if (n < 2 || !seg_is(seg[0], len[0], "v1"))
        return NULL;
    int models = seg_is(seg[1], len[1], "models"), datasets = seg_is(seg[1], len[1], "datasets");
    if (n == 2 && post && seg_is(seg[1], len[1], "jobs"))
        return json;
    if (n == 2 && post && (models || datasets))
        return json_or_form;
    if (n == 3 && datasets)
        return put ? octets : post ? json : NULL; /* PUT safetensors; POST a --data-dir file */
    if (n == 4 && models && put && seg_is(seg[3], len[3], "parameters"))
        return octets;
    if (n == 4 && models && post && seg_is(seg[3], len[3], "monitors"))
        return json;
    if (n == 4 && datasets && post && seg_is(seg[3], len[3], "parts"))
        return octets;
    if (n == 4 && datasets && post && seg_is(seg[3], len[3], "commit"))
        return json;
    return NULL;
}

int cv_access_check_content_type(const char *method, const char *path, const char *ctype,
                                 int has_body, cv_access_denial *d)
{
    if (strcmp(method, "POST") != 0 && strcmp(method, "PUT") != 0)
        return 0;
    const char *const *types = route_types(method, path);
    if (!types || (!ctype && !has_body))
        return 0;
    char media[96] = "";
    if (ctype) {
        size_t n = strcspn(ctype, ";");
        while (n && (ctype[n - 1] == ' ' || ctype[n - 1] == '\t'))
            n--;
        const char *s = ctype;
        while (n && (*s == ' ' || *s == '\t'))
            s++, n--;
        if (n < sizeof media) {
            memcpy(media, s, n);
            media[n] = 0;
        }
        for (int i = 0; media[0] && types[i]; i++)
            if (strcasecmp(media, types[i]) == 0)
                return 0;
    }
    char want[96] = "";
    for (int i = 0; types[i]; i++)
        snprintf(want + strlen(want), sizeof want - strlen(want), "%s%s", i ? " or " : "",
                 types[i]);
    d->status = 415;
    d->code = "unsupported_media_type";
    d->www_authenticate[0] = 0;
    if (ctype)
        snprintf(d->message, sizeof d->message, "%s %s takes Content-Type %s, not '%.60s'",
                 method, path, want, ctype);
    else
        snprintf(d->message, sizeof d->message,
                 "%s %s needs a Content-Type header: %s", method, path, want);
    return -1;
}

/* ---- hosts -------------------------------------------------------------------- */

/* The host part of a Host header ("[::1]:8080" -> "::1", "a:80" -> "a")
 * into out; -1 when malformed or too long. */
static int host_name(const char *host, char *out, size_t len)
{
    const char *s = host, *e;
    if (*s == '[') {
        e = strchr(s, ']');
        if (!e || (e[1] && e[1] != ':'))
            return -1;
        s++;
    } else {
        e = strchr(s, ':');
        if (!e)
            e = s + strlen(s);
    }
    size_t n = (size_t)(e - s);
    while (n && s[n - 1] == '.')
        n--; /* "localhost." is localhost */
    if (!n || n >= len)
        return -1;
    memcpy(out, s, n);
    out[n] = 0;
    return 0;
}

int cv_access_check_host(const cv_access *a, const char *host, cv_access_denial *d)
{
    if (!host || a->any_host)
        return 0;
    char name[256];
    if (host_name(host, name, sizeof name) == 0)
        for (int i = 0; i < a->nhosts; i++)
            if (strcasecmp(name, a->hosts[i]) == 0)
                return 0;
    d->status = 421;
    d->code = "host_not_allowed";
    d->www_authenticate[0] = 0;
    snprintf(d->message, sizeof d->message,
             "Host '%.80s' is not served here (allow it with --allowed-hosts)", host);
    return -1;
}

/* ---- tokens ------------------------------------------------------------------- */

/* Index of the listed token equal to p (n bytes), or -1.  Every listed token
 * is compared in full, without an early exit, so the time depends only on
 * the listed tokens' lengths. */
static int find_token(const cv_access *a, const char *p, size_t n)
{
    int found = -1;
    for (int i = 0; i < a->ntokens; i++) {
        const token_entry *t = &a->tokens[i];
        unsigned diff = (unsigned)(t->len ^ n);
        for (size_t k = 0; k < t->len; k++)
            diff |= (unsigned char)t->token[k] ^ (unsigned char)(n ? p[k % n] : 0);
        /* 0 when diff == 0, else all ones */
        unsigned miss = (unsigned)-(int)((diff | -diff) >> (sizeof diff * 8 - 1));
        found = (int)(((unsigned)found & miss) | ((unsigned)i & ~miss));
    }
    return found;
}

static int deny401(const char *msg, const char *error, cv_access_denial *d)
{
    d->status = 401;
    d->code = "unauthorized";
    snprintf(d->message, sizeof d->message, "%s", msg);
    if (error)
        snprintf(d->www_authenticate, sizeof d->www_authenticate,
                 "Bearer realm=\"curvd\", error=\"%s\"", error);
    else
        snprintf(d->www_authenticate, sizeof d->www_authenticate, "Bearer realm=\"curvd\"");
    return -1;
}

int cv_access_check_token(const cv_access *a, const char *method, const char *path,
                          const char *authorization, int *client, cv_access_denial *d)
{
    if (client)
        *client = -1;
    if (!a || !a->ntokens)
        return 0;
    if (!authorization && (strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0) &&
        (strcmp(path, "/v1/health") == 0 || strcmp(path, "/v1/health/") == 0 ||
         strcmp(path, "/") == 0 || strncmp(path, "/dashboard/", 11) == 0)) {
        if (client)
            *client = -2;
        return 0;
    }
    if (!authorization)
        return deny401("this server requires a token: send 'Authorization: Bearer TOKEN' "
                       "(clients read CURVD_TOKEN)", NULL, d);
    const char *s = authorization;
    while (*s == ' ')
        s++;
    if (strncasecmp(s, "Bearer", 6) != 0 || (s[6] != ' ' && s[6] != '\t'))
        return deny401("the Authorization header must be 'Bearer TOKEN'", "invalid_request", d);
    s += 7;
    while (*s == ' ' || *s == '\t')
        s++;
    size_t n = strlen(s);
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t'))
        n--;
    int i = n && n <= MAX_TOKEN ? find_token(a, s, n) : -1;
    if (i < 0)
        return deny401("unknown token", "invalid_token", d);
    cv_role need = cv_access_route_role(method, path);
    if (a->tokens[i].role < need) {
        d->status = 403;
        d->code = "forbidden";
        d->www_authenticate[0] = 0;
        snprintf(d->message, sizeof d->message,
                 "the token's role '%s' does not allow %.8s %.120s (needs '%s')",
                 role_name(a->tokens[i].role), method, path, role_name(need));
        return -1;
    }
    if (client)
        *client = i;
    return 0;
}

/* ---- CORS --------------------------------------------------------------------- */

const char *cv_access_cors_allow(const cv_access *a, const char *origin)
{
    return a && a->cors_origin && origin && strcmp(origin, a->cors_origin) == 0
               ? a->cors_origin
               : NULL;
}

const char *cv_access_cors_origin(const cv_access *a) { return a ? a->cors_origin : NULL; }
