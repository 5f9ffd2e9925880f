/* fuzz_http.c - libFuzzer harness: the HTTP router and every handler
 * (server/http*.c, server/handlers_*.c) through cv_http_handle, without
 * sockets.  Each input starts from a fresh service: models "mlp" and "cnn",
 * datasets "data" (fits mlp) and "img" (fits cnn), a job queue whose jobs
 * never run (no workers), a --data-dir with data.safetensors,
 * sub/img.safetensors and link.safetensors (a symbolic link to a file outside
 * it; registering that file is a finding).  The registry is kept across
 * inputs and put back to this base after each.
 *
 * An input is up to MAX_REQ requests separated by a line "%%":
 *
 *   METHOD TARGET            TARGET: /path?key=value&... (%-decoded like
 *   Header-Name: value       libmicrohttpd; a request whose path or query
 *   ...                      decodes a NUL is skipped: the server refuses it
 *                            before routing)
 *   (empty line)
 *   body (any bytes, to the separator; no empty line: no body)
 *
 * "@id" in TARGET stands for the id of the last job a reply named.  Every
 * reply must carry a status other than 0 (no handler replied) or 500, and a
 * JSON reply must be a JSON value ending with a newline; anything else
 * aborts (a finding).  CV_FUZZ_TRACE=1 prints each request and its reply. */
#include <cJSON.h>
#include <microhttpd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "api/datafile.h"
#include "server/http.h"
#include "server/jobs.h"
#include "server/registry.h"
#include "tests/fuzz/fuzz_common.h"

#define MAX_REQ 8
#define MAX_KV 16

static cv_model mlp, cnn;
static cv_dataset mlp_data, cnn_data;
static int trace; /* CV_FUZZ_TRACE=1: one stderr line per request (reading a corpus) */

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* --data-dir: DIR/data.safetensors (fits mlp), DIR/sub/img.safetensors (fits
 * cnn) and DIR/link.safetensors, a symbolic link to DIR/../outside.safetensors:
 * OUTSIDE_N samples, a file outside the directory that no registration may
 * reach. */
#define OUTSIDE_N 3
static char top[64] = "/tmp/curvd-fuzz-XXXXXX", data_dir[96];

static void write_dataset(const char *path, const cv_dataset *d)
{
    void *buf;
    size_t len;
    cv_err e;
    FILE *f = fopen(path, "wb");
    if (!f || cv_datafile_export(d, &buf, &len, &e) || fwrite(buf, 1, len, f) != len ||
        fclose(f))
        abort();
    free(buf);
}

static void remove_data_dir(void)
{
    char p[160];
    static const char *const files[] = {"data/link.safetensors", "data/sub/img.safetensors",
                                        "data/data.safetensors", "outside.safetensors"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(p, sizeof p, "%s/%s", top, files[i]);
        unlink(p);
    }
    snprintf(p, sizeof p, "%s/data/sub", top);
    rmdir(p);
    rmdir(data_dir);
    rmdir(top);
}

static void make_data_dir(void)
{
    char p[160];
    if (!mkdtemp(top))
        abort();
    snprintf(data_dir, sizeof data_dir, "%s/data", top);
    snprintf(p, sizeof p, "%s/sub", data_dir);
    if (mkdir(data_dir, 0700) || mkdir(p, 0700))
        abort();
    atexit(remove_data_dir);
    snprintf(p, sizeof p, "%s/data.safetensors", data_dir);
    write_dataset(p, &mlp_data);
    snprintf(p, sizeof p, "%s/sub/img.safetensors", data_dir);
    write_dataset(p, &cnn_data);
    cv_dataset outside = mlp_data;
    outside.n = OUTSIDE_N;
    snprintf(p, sizeof p, "%s/outside.safetensors", top);
    write_dataset(p, &outside);
    snprintf(p, sizeof p, "%s/link.safetensors", data_dir);
    if (symlink("../outside.safetensors", p))
        abort();
}

/* The registry lives across inputs (a model is a large struct: building
 * them for every input would cost more than the requests); after each input
 * it is put back to its base: names the input added are deleted, base names
 * it replaced or deleted are registered again.  The job queue and the HTTP
 * state (staging areas) are new for every input. */
typedef struct {
    const char *name;
    cv_reg_kind kind;
    const cv_model *model;
    const cv_dataset *data;
    cv_snap *snap; /* our reference to the base snapshot */
} base_entry;

static cv_registry *reg;
static base_entry base[] = {
    {"mlp", CV_REG_MODEL, &mlp, NULL, NULL},
    {"cnn", CV_REG_MODEL, &cnn, NULL, NULL},
    {"data", CV_REG_DATASET, NULL, &mlp_data, NULL},
    {"img", CV_REG_DATASET, NULL, &cnn_data, NULL},
};
#define NBASE ((int)(sizeof base / sizeof base[0]))

typedef struct {
    cv_jobs *jobs;
    cv_http *http;
    char job_id[64];
} service;

static cv_snap *add_model(const char *name, const cv_model *tmpl)
{
    cv_model *m = malloc(sizeof *m);
    cv_err e;
    cv_snap *s;
    if (!m || cv_model_clone(tmpl, m) || cv_registry_add_model(reg, name, m, "fuzz", &s, &e))
        abort();
    return s;
}

static cv_snap *add_dataset(const char *name, const cv_dataset *tmpl)
{
    cv_dataset *d = calloc(1, sizeof *d);
    if (!d)
        abort();
    *d = *tmpl;
    size_t xs = tmpl->n * cv_shape_numel(&tmpl->x_shape) * sizeof(float);
    size_t ys = tmpl->n * cv_shape_numel(&tmpl->y_shape) * sizeof(int64_t);
    d->x = malloc(xs);
    d->labels = malloc(ys);
    if (!d->x || !d->labels)
        abort();
    memcpy(d->x, tmpl->x, xs);
    memcpy(d->labels, tmpl->labels, ys);
    cv_err e;
    cv_snap *s;
    if (cv_registry_add_dataset(reg, name, d, "fuzz", &s, &e))
        abort();
    return s;
}

static void add_base(base_entry *b)
{
    if (b->snap)
        cv_snap_unref(b->snap);
    b->snap = b->model ? add_model(b->name, b->model) : add_dataset(b->name, b->data);
}

static int is_base(const cv_snap *s)
{
    for (int i = 0; i < NBASE; i++)
        if (base[i].snap == s)
            return 1;
    return 0;
}

/* The registry back to its base (no job holds a name any more). */
static void restore_registry(void)
{
    cv_err e;
    for (int kind = CV_REG_MODEL; kind <= CV_REG_DATASET; kind++) {
        cv_snap **v;
        int n = cv_registry_list(reg, (cv_reg_kind)kind, &v);
        if (n < 0)
            abort();
        for (int i = 0; i < n; i++) {
            if (v[i]->mapped_bytes && v[i]->data->n == OUTSIDE_N) {
                fprintf(stderr, "a file outside --data-dir was registered: %s\n", v[i]->source);
                abort();
            }
            if (!is_base(v[i]) && cv_registry_delete(reg, (cv_reg_kind)kind, v[i]->name, &e))
                abort();
        }
        cv_snaps_release(v, n);
    }
    for (int i = 0; i < NBASE; i++) {
        cv_snap *cur = cv_registry_get(reg, base[i].kind, base[i].name, &e);
        if (cur)
            cv_snap_unref(cur);
        if (cur != base[i].snap)
            add_base(&base[i]);
    }
}

static void service_start(service *s)
{
    memset(s, 0, sizeof *s);
    cv_err e;
    cv_jobs_config jc = {.workers = 1, .max_queue = 4, .keep_s = 600, .max_kept = 100,
                         .no_workers = 1};
    cv_job_limits_default(&jc.limits);
    jc.limits.job_memory = (size_t)64 << 20;
    s->jobs = cv_jobs_new(&jc, reg, &e);
    cv_http_config hc = {.max_body = (size_t)1 << 20, .max_job_body = (size_t)1 << 20,
                         .max_wait = 0, .upload_timeout = 600, .data_dir = data_dir};
    s->http = s->jobs ? cv_http_new_unbound(&hc, reg, s->jobs, &e) : NULL;
    if (!s->http)
        abort();
}

static void service_stop(service *s)
{
    cv_http_stop(s->http);
    cv_jobs_free(s->jobs);
    restore_registry();
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    cv_fz_models(&mlp, &cnn, &mlp_data, &cnn_data);
    trace = getenv("CV_FUZZ_TRACE") != NULL;
    make_data_dir();
    reg = cv_registry_new((size_t)64 << 20);
    if (!reg)
        abort();
    for (int i = 0; i < NBASE; i++)
        add_base(&base[i]);
    return 0;
}

/* Decodes s in place like libmicrohttpd; -1 when it decodes a NUL. */
static int unescape(char *s)
{
    size_t n = MHD_http_unescape(s);
    return memchr(s, 0, n) ? -1 : 0;
}

/* Splits "k=v&k2=v2" (in place) into kv; -1 when a part decodes a NUL. */
static int split_query(char *q, cv_http_kv *kv, int *n)
{
    *n = 0;
    while (q && *q && *n < MAX_KV) {
        char *amp = strchr(q, '&');
        if (amp)
            *amp = 0;
        char *eq = strchr(q, '=');
        if (eq)
            *eq = 0;
        if (unescape(q) || (eq && unescape(eq + 1)))
            return -1;
        kv[*n].key = q;
        kv[*n].value = eq ? eq + 1 : NULL;
        (*n)++;
        q = amp ? amp + 1 : NULL;
    }
    return 0;
}

/* The id of a job named in a reply, remembered for "@id". */
static void remember_id(service *s, const char *out, size_t len)
{
    cJSON *j = cJSON_ParseWithLength(out, len);
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(j, "id");
    if (cJSON_IsString(id) && strlen(id->valuestring) < sizeof s->job_id)
        strcpy(s->job_id, id->valuestring);
    cJSON_Delete(j);
}

static void check_reply(const char *line, unsigned status, const char *out, size_t len,
                        const char *ctype)
{
    if (status == 0 || status == 500) {
        fprintf(stderr, "%s -> %u: %.*s\n", line, status, (int)(len < 400 ? len : 400),
                out ? out : "");
        abort();
    }
    if (ctype && strcmp(ctype, "application/json") == 0) {
        cJSON *j = out ? cJSON_ParseWithLength(out, len) : NULL;
        if (!j || len == 0 || out[len - 1] != '\n') {
            fprintf(stderr, "%s -> %u: not a JSON body ending with a newline\n", line, status);
            abort();
        }
        cJSON_Delete(j);
    }
}

/* Runs one request text (NUL-terminated, modified in place). */
static void one_request(service *s, char *text, size_t len)
{
    char *end = text + len;
    char *eol = memchr(text, '\n', len);
    char *line = text;
    char *rest = eol ? eol + 1 : end;
    if (eol)
        *eol = 0;
    char *sp = strchr(line, ' ');
    if (!sp)
        return;
    *sp = 0;
    const char *method = line;
    char target[1024];
    const char *at = strstr(sp + 1, "@id");
    if (at)
        snprintf(target, sizeof target, "%.*s%s%s", (int)(at - (sp + 1)), sp + 1, s->job_id,
                 at + 3);
    else
        snprintf(target, sizeof target, "%s", sp + 1);
    char *qm = strchr(target, '?');
    if (qm)
        *qm = 0;
    cv_http_kv query[MAX_KV], headers[MAX_KV];
    int nq, nh = 0;
    if (unescape(target) || split_query(qm ? qm + 1 : NULL, query, &nq))
        return;
    /* headers up to an empty line; the body after it */
    const char *body = NULL;
    size_t body_len = 0;
    char *p = rest;
    while (p < end) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        if (nl == p) {
            body = p + 1;
            body_len = (size_t)(end - body);
            break;
        }
        if (nl)
            *nl = 0;
        char *colon = strchr(p, ':');
        if (colon && nh < MAX_KV) {
            *colon = 0;
            char *v = colon + 1;
            while (*v == ' ')
                v++;
            headers[nh].key = p;
            headers[nh].value = v;
            nh++;
        }
        if (!nl)
            break;
        p = nl + 1;
    }
    cv_http_request in = {method, target, query, nq, headers, nh, body, body_len};
    char *out;
    size_t out_len;
    const char *ctype;
    unsigned status = cv_http_handle(s->http, &in, &out, &out_len, &ctype);
    if (trace)
        fprintf(stderr, "%s %s -> %u %.*s\n", method, target, status,
                (int)(out && out_len < 160 ? out_len : 0), out ? out : "");
    check_reply(method, status, out, out_len, ctype);
    if (out && ctype && strcmp(ctype, "application/json") == 0)
        remember_id(s, out, out_len);
    free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = cv_fz_strndup(data, size);
    service s;
    service_start(&s);
    char *p = text, *end = text + size;
    for (int i = 0; i < MAX_REQ && p < end; i++) {
        char *sep = memmem(p, (size_t)(end - p), "\n%%\n", 4);
        size_t len = sep ? (size_t)(sep - p) : (size_t)(end - p);
        p[len] = 0;
        one_request(&s, p, len);
        if (!sep)
            break;
        p = sep + 4;
    }
    service_stop(&s);
    free(text);
    return 0;
}
