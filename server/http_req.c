/* http_req.c - what every HTTP handler shares (see http_internal.h): the
 * reply helpers (JSON bodies end with a newline; errors are the error
 * document of docs/interface.md §5), the HTTP status of an engine error (cv_http_status), and
 * the request helpers (query, headers, JSON body and its members). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "api/job.h"
#include "api/json_strict.h"
#include "server/http_internal.h"
#include "server/util.h"

int cv_http_status(cv_status st)
{
    switch (st) {
    case CV_OK: return 200;
    case CV_EINVAL: return 400;
    case CV_ENOTFOUND: return 404;
    case CV_ECONFLICT: return 409;
    case CV_ETOOLARGE: return 413;
    case CV_EBUSY: return 429;
    case CV_ESHUTDOWN: return 503;
    case CV_EUNAVAILABLE: return 503;
    case CV_ECANCELLED: return 409;
    case CV_ETIMEOUT: return 408;
    case CV_ENOMEM: return 507;
    default: return 500;
    }
}

/* ---- replies --------------------------------------------------------------- */

static void job_stream_free(void *cls);

void set_text(req *r, unsigned status, char *text, size_t len, const char *ctype)
{
    free(r->out);
    job_stream_free(r->stream); /* a later reply replaces a streamed one */
    r->stream = NULL;
    r->status = status;
    r->out = text;
    r->out_len = len;
    r->ctype = ctype;
}

/* t (malloc()ed, len bytes) with a newline appended, or NULL (t freed). */
static char *with_newline(char *t, size_t len)
{
    char *nt = realloc(t, len + 2);
    if (!nt) {
        free(t);
        return NULL;
    }
    nt[len] = '\n';
    nt[len + 1] = 0;
    return nt;
}

void reply_err(req *r, const cv_err *e)
{
    cv_err fallback;
    if (!e || e->status == CV_OK) {
        cv_err_set(&fallback, CV_EINTERNAL, "internal", "", "internal error");
        e = &fallback;
    }
    unsigned st = (unsigned)cv_http_status(e->status);
    cv_err clean = *e; /* messages may quote client bytes */
    clean.code[sizeof clean.code - 1] = 0;
    clean.field[sizeof clean.field - 1] = 0;
    clean.message[sizeof clean.message - 1] = 0;
    cv_utf8_sanitize(clean.code);
    cv_utf8_sanitize(clean.field);
    cv_utf8_sanitize(clean.message);
    cJSON *j = cv_err_to_json(&clean);
    char *t = j ? cJSON_PrintUnformatted(j) : NULL;
    cJSON_Delete(j);
    if (t)
        t = with_newline(t, strlen(t));
    if (!t) {
        static const char oom[] = "{\"error\":{\"code\":\"out_of_memory\",\"message\":\"out of "
                                  "memory\",\"field\":\"\"}}\n";
        t = strdup(oom);
        st = 500;
    }
    set_text(r, st, t, t ? strlen(t) : 0, "application/json");
}

void reply_errf(req *r, cv_status st, const char *code, const char *field, const char *fmt, ...)
{
    cv_err e;
    char msg[sizeof e.message];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    cv_err_set(&e, st, code, field, "%s", msg);
    reply_err(r, &e);
}

void reply_oom(req *r)
{
    reply_errf(r, CV_ENOMEM, "out_of_memory", "", "out of memory building the response");
}

void set_json(req *r, unsigned status, char *t, size_t len)
{
    t = with_newline(t, len);
    if (!t)
        reply_oom(r);
    else
        set_text(r, status, t, len + 1, "application/json");
}

/* A job document sent in four pieces: head, ",\"result\":", the job's kept
 * result text (borrowed through the job reference), "}\n". */
struct job_stream {
    cv_job *job;
    char *head;
    const char *piece[4];
    size_t len[4];
    size_t total;
};

static void job_stream_free(void *cls)
{
    struct job_stream *s = cls;
    if (!s)
        return;
    cv_job_unref(s->job);
    free(s->head);
    free(s);
}

static ssize_t job_stream_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    struct job_stream *s = cls;
    size_t n = 0, start = 0;
    for (int i = 0; i < 4 && n < max; start += s->len[i], i++) {
        if (pos + n >= start + s->len[i])
            continue;
        size_t off = (size_t)(pos + n - start), take = s->len[i] - off;
        take = take < max - n ? take : max - n;
        memcpy(buf + n, s->piece[i] + off, take);
        n += take;
    }
    return n ? (ssize_t)n : MHD_CONTENT_READER_END_OF_STREAM;
}

void set_job_reply(req *r, unsigned status, cv_job *j)
{
    struct job_stream *s = calloc(1, sizeof *s);
    const char *res = NULL;
    size_t rlen = 0;
    if (s)
        s->head = cv_job_status_parts(r->h->jobs, j, &s->len[0], &res, &rlen);
    if (!s || !s->head) {
        free(s);
        reply_oom(r);
        return;
    }
    cv_job_ref(j);
    s->job = j;
    s->piece[0] = s->head;
    s->piece[1] = res ? ",\"result\":" : "";
    s->len[1] = strlen(s->piece[1]);
    s->piece[2] = res ? res : "";
    s->len[2] = rlen;
    s->piece[3] = "}\n";
    s->len[3] = 2;
    s->total = s->len[0] + s->len[1] + s->len[2] + s->len[3];
    set_text(r, status, NULL, 0, "application/json");
    job_stream_free(r->stream);
    r->stream = s;
}

void job_stream_to_text(req *r)
{
    struct job_stream *s = r->stream;
    char *t = malloc(s->total + 1);
    if (!t) {
        reply_oom(r); /* frees the stream */
        return;
    }
    /* the bytes a connection would have read, through the same reader */
    ssize_t n = s->total ? job_stream_read(s, 0, t, s->total) : 0;
    size_t at = n > 0 ? (size_t)n : 0;
    t[at] = 0;
    unsigned st = r->status;
    set_text(r, st, t, at, "application/json"); /* frees the stream */
}

struct MHD_Response *job_stream_response(req *r)
{
    struct job_stream *s = r->stream;
    r->stream = NULL;
    struct MHD_Response *resp =
        MHD_create_response_from_callback(s->total, 64 * 1024, job_stream_read, s,
                                          job_stream_free);
    if (!resp)
        job_stream_free(s);
    return resp;
}

void reply_json(req *r, unsigned status, cJSON *j)
{
    if (!j) {
        reply_oom(r);
        return;
    }
    char *t = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    if (!t) {
        reply_oom(r);
        return;
    }
    set_json(r, status, t, strlen(t));
}

/* ---- requests -------------------------------------------------------------- */

/* The value of key among in's pairs (header names: case-insensitive). */
static const char *kv_find(const cv_http_kv *kv, int n, const char *key, int caseless)
{
    for (int i = 0; i < n; i++)
        if (caseless ? strcasecmp(kv[i].key, key) == 0 : strcmp(kv[i].key, key) == 0)
            return kv[i].value;
    return NULL;
}

const char *query(req *r, const char *key)
{
    if (!r->conn)
        return kv_find(r->in->query, r->in->nquery, key, 0);
    return MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, key);
}

const char *header(req *r, const char *key)
{
    if (!r->conn)
        return kv_find(r->in->headers, r->in->nheaders, key, 1);
    return MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, key);
}

int query_seconds(req *r, const char *key, double cap, double *out)
{
    *out = 0;
    const char *v = query(r, key);
    if (!v)
        return 0;
    double s;
    if (cv_parse_double(v, 0, 1e9, &s)) {
        reply_errf(r, CV_EINVAL, "invalid_query", key,
                   "%s must be a number of seconds >= 0, got '%.40s'", key, v);
        return -1;
    }
    *out = cap >= 0 && s > cap ? cap : s;
    return 0;
}

cJSON *body_object(req *r)
{
    if (!r->body_len) {
        reply_errf(r, CV_EINVAL, "invalid_json", "", "the request body is empty; expected a JSON "
                                                     "object");
        return NULL;
    }
    cv_err e;
    cJSON *j = cv_json_parse_strict(r->body, r->body_len, "the request body", "", &e);
    if (!j) {
        reply_err(r, &e);
        return NULL;
    }
    if (!cJSON_IsObject(j)) {
        cJSON_Delete(j);
        reply_errf(r, CV_EINVAL, "invalid_json", "", "the request body must be a JSON object");
        return NULL;
    }
    return j;
}

int only_fields(req *r, const cJSON *obj, const char *const *allowed, const char *what)
{
    const cJSON *v;
    cJSON_ArrayForEach(v, obj)
    {
        int ok = 0;
        for (int i = 0; allowed[i]; i++)
            ok |= strcmp(allowed[i], v->string) == 0;
        if (!ok) {
            char known[160] = "";
            for (int i = 0; allowed[i]; i++) {
                strncat(known, i ? ", " : "", sizeof known - strlen(known) - 1);
                strncat(known, allowed[i], sizeof known - strlen(known) - 1);
            }
            reply_errf(r, CV_EINVAL, "unknown_field", v->string,
                       "unknown field '%.64s' in %s (known: %s)", v->string, what, known);
            return -1;
        }
    }
    return 0;
}

const char *string_member(req *r, const cJSON *obj, const char *key, int required)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v) {
        if (required)
            reply_errf(r, CV_EINVAL, "missing_field", key, "missing field '%s'", key);
        return NULL;
    }
    if (!cJSON_IsString(v)) {
        reply_errf(r, CV_EINVAL, "invalid_field", key, "'%s' must be a string", key);
        return NULL;
    }
    return v->valuestring;
}
