/* test_uploads.c - datasets bigger than one request: uploads in parts
 * (server/staging.c: assembly, per-part checks, the registry budget, busy
 * areas, expiry, failed commits kept), files of --data-dir
 * (server/datadir.c: memory-mapped in place or converted, path escapes,
 * files that are not safetensors) and both over HTTP (--max-body, jobs on
 * the assembled and on the mapped dataset equal to the same job on the
 * dataset registered in one piece). */
#include "testutil.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "api/datafile.h"
#include "api/safetensors.h"
#include "server/datadir.h"
#include "server/http.h"
#include "server/jobs.h"
#include "server/registry.h"
#include "server/staging.h"

static const tu_layer mlp[] = {{&cv_linear_class, 5}, {&cv_tanh_class, 0}, {&cv_linear_class, 3}};

static cv_model *heap_model(void)
{
    cv_model *m = malloc(sizeof *m);
    ck_assert_ptr_nonnull(m);
    tu_model(m, 4, mlp, 3, CV_LOSS_CE, CV_RED_MEAN, 1);
    return m;
}

/* Rows [off, off + n) of d as a safetensors dataset file. */
static void *part_of(const cv_dataset *d, size_t off, size_t n, size_t *len)
{
    cv_batch b;
    cv_batch_view(d, off, n, &b);
    void *buf;
    cv_err e;
    ck_assert_msg(cv_datafile_export(&b, &buf, len, &e) == 0, "%s", e.message);
    return buf;
}

static void append_ok(cv_staging *s, const char *name, const cv_dataset *d, size_t off,
                      size_t n)
{
    size_t len;
    void *buf = part_of(d, off, n, &len);
    cv_err e;
    cJSON *j;
    ck_assert_msg(cv_staging_append(s, name, buf, len, &j, &e) == 0, "%s", e.message);
    ck_assert_double_eq(tu_num(j, "n"), (double)(off + n));
    cJSON_Delete(j);
    free(buf);
}

static void same_data(const cv_dataset *a, const cv_dataset *b)
{
    ck_assert_uint_eq(a->n, b->n);
    size_t sx = cv_shape_numel(&a->x_shape), sy = cv_shape_numel(&a->y_shape);
    ck_assert_uint_eq(sx, cv_shape_numel(&b->x_shape));
    ck_assert(memcmp(a->x, b->x, a->n * sx * sizeof(float)) == 0);
    ck_assert_int_eq(a->y_is_index, b->y_is_index);
    if (a->y_is_index)
        ck_assert(memcmp(a->labels, b->labels, a->n * sy * sizeof(int64_t)) == 0);
    else
        ck_assert(memcmp(a->targets, b->targets, a->n * sy * sizeof(float)) == 0);
}

static size_t staged(cv_registry *r)
{
    cv_registry_stats st;
    cv_registry_stats_get(r, &st);
    return st.staged_bytes;
}

START_TEST(parts_assemble_and_commit)
{
    cv_registry *r = cv_registry_new((size_t)1 << 30);
    cv_staging *s = cv_staging_new(r, 0);
    cv_model *m = heap_model();
    cv_dataset full;
    tu_data(&full, m, 50, 3);
    append_ok(s, "big", &full, 0, 17);
    append_ok(s, "big", &full, 17, 23);
    append_ok(s, "big", &full, 40, 10);
    ck_assert_uint_gt(staged(r), 50 * (4 * sizeof(float) + sizeof(int64_t)) - 1);
    cv_err e;
    /* not a dataset before the commit */
    ck_assert_ptr_null(cv_registry_get(r, CV_REG_DATASET, "big", &e));
    cJSON *j;
    ck_assert_int_eq(cv_staging_describe(s, "big", &j, &e), 0);
    ck_assert_double_eq(tu_num(j, "parts"), 3);
    ck_assert_double_eq(tu_num(j, "n"), 50);
    cJSON_Delete(j);
    /* a commit expecting other counts changes nothing */
    cv_snap *snap;
    int created;
    ck_assert_int_eq(cv_staging_commit(s, "big", 0, 49, -1, &created, &snap, &e), -1);
    ck_assert_str_eq(e.code, "upload_incomplete");
    ck_assert_int_eq(cv_staging_commit(s, "big", 0, -1, 4, &created, &snap, &e), -1);
    ck_assert_str_eq(e.field, "parts");
    ck_assert_int_eq(cv_staging_commit(s, "big", 0, 50, 3, &created, &snap, &e), 0);
    ck_assert_int_eq(created, 1);
    same_data(snap->data, &full);
    ck_assert_uint_eq(snap->bytes, cv_dataset_bytes(snap->data));
    ck_assert_int_eq(snap->backing != NULL, 0);
    cv_snap_unref(snap);
    /* the reservation moved into the snapshot */
    cv_registry_stats st;
    cv_registry_stats_get(r, &st);
    ck_assert_uint_eq(st.staged_bytes, 0);
    ck_assert_uint_eq(st.bytes, cv_dataset_bytes(&full));
    ck_assert_int_eq(cv_staging_describe(s, "big", &j, &e), -1);
    ck_assert_str_eq(e.code, "not_found");
    ck_assert_int_eq(cv_staging_commit(s, "big", 0, -1, -1, &created, &snap, &e), -1);
    ck_assert_str_eq(e.code, "not_found");
    /* a second upload of the name: 409 without replace (kept), then replaced */
    append_ok(s, "big", &full, 0, 5);
    ck_assert_int_eq(cv_staging_commit(s, "big", 0, -1, -1, &created, &snap, &e), -1);
    ck_assert_str_eq(e.code, "already_exists");
    ck_assert_ptr_nonnull(strstr(e.message, "kept"));
    ck_assert_int_eq(cv_staging_commit(s, "big", 1, 5, 1, &created, &snap, &e), 0);
    ck_assert_int_eq(created, 0);
    ck_assert_uint_eq(snap->version, 2);
    ck_assert_uint_eq(snap->data->n, 5);
    cv_snap_unref(snap);
    ck_assert_uint_eq(staged(r), 0);
    cv_staging_free(s);
    cv_registry_free(r);
    tu_data_free(&full);
    cv_model_free(m);
    free(m);
}
END_TEST

/* A safetensors dataset with x of the given dtype/shape and y I64 [n]. */
static void *custom_part(cv_st_dtype xdt, int n, int d, cv_st_dtype ydt, size_t *len)
{
    static double xbuf[64 * 8];
    static int64_t ybuf[64];
    memset(xbuf, 0, sizeof xbuf);
    for (int i = 0; i < n; i++)
        ybuf[i] = i % 3;
    for (int i = 0; i < n; i++) {
        if (ydt == CV_ST_F32)
            ((float *)ybuf)[i] = 0.5f;
        if (ydt == CV_ST_I32)
            ((int32_t *)ybuf)[i] = i % 3;
    }
    cv_st_entry t[2] = {{.name = "x", .dtype = xdt, .rank = 2, .shape = {n, d}, .data = xbuf},
                        {.name = "y", .dtype = ydt, .rank = 1, .shape = {n}, .data = ybuf}};
    void *buf;
    cv_err e;
    ck_assert_int_eq(cv_st_write(t, 2, NULL, 0, &buf, len, &e), 0);
    return buf;
}

static void append_bad(cv_staging *s, void *buf, size_t len, const char *code,
                       const char *field)
{
    cv_err e;
    cv_err_clear(&e);
    ck_assert_int_eq(cv_staging_append(s, "p", buf, len, NULL, &e), -1);
    ck_assert_msg(strcmp(e.code, code) == 0, "code %s, want %s: %s", e.code, code, e.message);
    ck_assert_str_eq(e.field, field);
    ck_assert_int_eq(cv_http_status(e.status), 400);
    free(buf);
}

static void bad_part(cv_staging *s, cv_st_dtype xdt, int n, int d, cv_st_dtype ydt,
                     const char *code, const char *field)
{
    size_t len;
    void *buf = custom_part(xdt, n, d, ydt, &len);
    append_bad(s, buf, len, code, field);
}

START_TEST(parts_must_match_the_first)
{
    cv_registry *r = cv_registry_new((size_t)1 << 30);
    cv_staging *s = cv_staging_new(r, 0);
    cv_err e;
    /* not a dataset: nothing staged */
    append_bad(s, strdup("not safetensors at all"), 22, "bad_safetensors", "");
    cJSON *j;
    ck_assert_int_eq(cv_staging_describe(s, "p", &j, &e), -1);
    size_t len;
    void *buf = custom_part(CV_ST_F32, 4, 3, CV_ST_I64, &len);
    ck_assert_int_eq(cv_staging_append(s, "p", buf, len, NULL, &e), 0);
    free(buf);
    bad_part(s, CV_ST_F32, 4, 2, CV_ST_I64, "part_mismatch", "x");
    bad_part(s, CV_ST_F64, 4, 3, CV_ST_I64, "part_mismatch", "x");
    bad_part(s, CV_ST_F32, 4, 3, CV_ST_F32, "part_mismatch", "y");
    bad_part(s, CV_ST_F32, 4, 3, CV_ST_I32, "part_mismatch", "y");
    buf = custom_part(CV_ST_F32, 4, 2, CV_ST_I64, &len);
    ck_assert_int_eq(cv_staging_append(s, "p", buf, len, NULL, &e), -1);
    ck_assert_msg(strstr(e.message, "part 2: x is F32 with per-sample shape [2], but the first "
                                    "part's x is F32 with per-sample shape [3]") != NULL,
                  "%s", e.message);
    free(buf);
    ck_assert_int_eq(cv_staging_describe(s, "p", &j, &e), 0);
    ck_assert_double_eq(tu_num(j, "n"), 4);
    ck_assert_double_eq(tu_num(j, "parts"), 1);
    cJSON_Delete(j);
    /* DELETE frees the area and its reservation */
    ck_assert_uint_gt(staged(r), 0);
    ck_assert_int_eq(cv_staging_drop(s, "p", &e), 0);
    ck_assert_uint_eq(staged(r), 0);
    ck_assert_int_eq(cv_staging_drop(s, "p", &e), -1);
    ck_assert_str_eq(e.code, "not_found");
    cv_staging_free(s);
    cv_registry_free(r);
}
END_TEST

START_TEST(parts_count_against_the_budget_and_expire)
{
    cv_model *m = heap_model();
    cv_dataset full;
    tu_data(&full, m, 200, 5);
    size_t row = 4 * sizeof(float) + sizeof(int64_t); /* 24 bytes */
    cv_registry *r = cv_registry_new(100 * row + 64);
    cv_staging *s = cv_staging_new(r, 0.2);
    cv_err e;
    append_ok(s, "b", &full, 0, 60);
    append_ok(s, "b", &full, 60, 30); /* 90 rows: 1.5x growth does not fit, exact does */
    ck_assert_uint_eq(staged(r), 90 * row);
    size_t len;
    void *buf = part_of(&full, 90, 20, &len);
    ck_assert_int_eq(cv_staging_append(s, "b", buf, len, NULL, &e), -1);
    free(buf);
    ck_assert_str_eq(e.code, "registry_full");
    ck_assert_int_eq(cv_http_status(e.status), 413);
    ck_assert_msg(strstr(e.message, "reserved by uploads in parts") != NULL, "%s", e.message);
    /* staged bytes keep other uploads out */
    cv_dataset *d = malloc(sizeof *d);
    tu_data(d, m, 20, 1);
    ck_assert_int_eq(cv_registry_add_dataset(r, "other", d, "t", NULL, &e), -1);
    ck_assert_str_eq(e.code, "registry_full");
    cJSON *j;
    ck_assert_int_eq(cv_staging_describe(s, "b", &j, &e), 0);
    ck_assert_double_eq(tu_num(j, "n"), 90);
    cJSON_Delete(j);
    /* an idle area expires */
    ck_assert_int_eq(cv_staging_sweep(s, cv_now_s()), 0);
    usleep(300 * 1000);
    ck_assert_int_eq(cv_staging_sweep(s, cv_now_s()), 1);
    ck_assert_uint_eq(staged(r), 0);
    ck_assert_int_eq(cv_staging_describe(s, "b", &j, &e), -1);
    d = malloc(sizeof *d);
    tu_data(d, m, 20, 1);
    ck_assert_int_eq(cv_registry_add_dataset(r, "other", d, "t", NULL, &e), 0);
    cv_staging_free(s);
    cv_registry_free(r);
    tu_data_free(&full);
    cv_model_free(m);
    free(m);
}
END_TEST

typedef struct {
    cv_staging *s;
    void *buf;
    size_t len;
    int ok, busy;
} racer;

static void *race(void *arg)
{
    racer *x = arg;
    for (int i = 0; i < 40; i++) {
        cv_err e;
        if (cv_staging_append(x->s, "race", x->buf, x->len, NULL, &e) == 0)
            x->ok++;
        else if (strcmp(e.code, "upload_busy") == 0 && cv_http_status(e.status) == 409)
            x->busy++;
        else
            ck_abort_msg("unexpected error %s: %s", e.code, e.message);
    }
    return NULL;
}

START_TEST(concurrent_parts_are_serialised_or_refused)
{
    cv_model *m = heap_model();
    cv_dataset full;
    tu_data(&full, m, 3000, 2);
    cv_registry *r = cv_registry_new((size_t)1 << 30);
    cv_staging *s = cv_staging_new(r, 0);
    racer x[3];
    pthread_t t[3];
    for (int i = 0; i < 3; i++) {
        x[i] = (racer){.s = s};
        x[i].buf = part_of(&full, 0, 3000, &x[i].len);
        pthread_create(&t[i], NULL, race, &x[i]);
    }
    int ok = 0;
    for (int i = 0; i < 3; i++) {
        pthread_join(t[i], NULL);
        ok += x[i].ok;
        free(x[i].buf);
    }
    cv_err e;
    cJSON *j;
    ck_assert_int_eq(cv_staging_describe(s, "race", &j, &e), 0);
    ck_assert_double_eq(tu_num(j, "parts"), ok);
    ck_assert_double_eq(tu_num(j, "n"), 3000.0 * ok);
    cJSON_Delete(j);
    cv_staging_free(s);
    ck_assert_uint_eq(staged(r), 0);
    cv_registry_free(r);
    tu_data_free(&full);
    cv_model_free(m);
    free(m);
}
END_TEST

/* ---- --data-dir ------------------------------------------------------------------ */

typedef struct {
    char dir[64], outside[64];
} dirs;

static void write_file(const char *dir, const char *name, const void *buf, size_t len)
{
    char p[256];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    FILE *f = fopen(p, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(buf, 1, len, f), len);
    fclose(f);
}

/* DIR with data.safetensors (F32 x, I64 y: in place), f64.safetensors
 * (converted), junk.safetensors, sub/, and out.safetensors -> a file outside. */
static void make_dirs(dirs *d, const cv_dataset *full)
{
    snprintf(d->dir, sizeof d->dir, "/tmp/curvd_dd_XXXXXX");
    snprintf(d->outside, sizeof d->outside, "/tmp/curvd_out_XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(d->dir));
    ck_assert_ptr_nonnull(mkdtemp(d->outside));
    size_t len;
    void *buf = part_of(full, 0, full->n, &len);
    write_file(d->dir, "data.safetensors", buf, len);
    write_file(d->outside, "secret.safetensors", buf, len);
    free(buf);
    buf = custom_part(CV_ST_F64, 6, 4, CV_ST_I32, &len);
    write_file(d->dir, "f64.safetensors", buf, len);
    free(buf);
    write_file(d->dir, "junk.safetensors", "this is not safetensors", 23);
    char p[256], q[256];
    snprintf(p, sizeof p, "%s/sub", d->dir);
    ck_assert_int_eq(mkdir(p, 0700), 0);
    snprintf(p, sizeof p, "%s/secret.safetensors", d->outside);
    snprintf(q, sizeof q, "%s/out.safetensors", d->dir);
    ck_assert_int_eq(symlink(p, q), 0);
    snprintf(q, sizeof q, "%s/sub/in.safetensors", d->dir);
    ck_assert_int_eq(symlink("../data.safetensors", q), 0);
}

static void rm_dirs(const dirs *d)
{
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf %s %s", d->dir, d->outside);
    ck_assert_int_eq(system(cmd), 0);
}

static void map_bad(const dirs *d, const char *file, const char *code, int http)
{
    cv_dataset ds;
    cv_mapped *map = (cv_mapped *)1;
    size_t hb, mb;
    cv_err e;
    cv_err_clear(&e);
    ck_assert_int_eq(cv_datadir_map(d->dir, file, SIZE_MAX, 1, &ds, &map, &hb, &mb, &e), -1);
    ck_assert_msg(strcmp(e.code, code) == 0, "%s: code %s, want %s: %s", file, e.code, code,
                  e.message);
    ck_assert_int_eq(cv_http_status(e.status), http);
    ck_assert_str_eq(e.field, "file");
    ck_assert_ptr_null(map);
}

START_TEST(data_dir_maps_files_and_refuses_escapes)
{
    cv_model *m = heap_model();
    cv_dataset full;
    tu_data(&full, m, 30, 4);
    dirs d;
    make_dirs(&d, &full);
    cv_dataset ds;
    cv_mapped *map;
    size_t hb, mb;
    cv_err e;
    /* F32 x and I64 y are used where they lie */
    ck_assert_msg(cv_datadir_map(d.dir, "data.safetensors", 0, 1, &ds, &map, &hb, &mb, &e) == 0,
                  "%s", e.message);
    ck_assert_int_eq(ds.borrowed, 1);
    ck_assert_uint_eq(hb, sizeof(cv_dataset));
    ck_assert_uint_gt(mb, 30 * 4 * sizeof(float));
    same_data(&ds, &full);
    cv_dataset_free(&ds);
    cv_mapped_free(map);
    /* through a symbolic link that stays inside */
    ck_assert_int_eq(cv_datadir_map(d.dir, "sub/in.safetensors", 0, 1, &ds, &map, &hb, &mb, &e), 0);
    same_data(&ds, &full);
    cv_mapped_free(map);
    /* F64 x and I32 y are converted copies */
    size_t copies = 6 * 4 * sizeof(float) + 6 * sizeof(int64_t);
    ck_assert_int_eq(
        cv_datadir_map(d.dir, "f64.safetensors", copies - 1, 1, &ds, &map, &hb, &mb, &e), -1);
    ck_assert_str_eq(e.code, "registry_full");
    ck_assert_int_eq(cv_http_status(e.status), 413);
    ck_assert_ptr_null(map);
    ck_assert_int_eq(cv_datadir_map(d.dir, "f64.safetensors", copies, 1, &ds, &map, &hb, &mb, &e),
                     0);
    ck_assert_uint_eq(hb, sizeof(cv_dataset) + copies);
    ck_assert_int_eq((int)ds.labels[4], 1);
    cv_mapped_free(map);
    map_bad(&d, "../curvd_out/secret.safetensors", "path_escape", 400);
    map_bad(&d, "sub/../../x.safetensors", "path_escape", 400);
    map_bad(&d, "..", "path_escape", 400);
    map_bad(&d, "/etc/passwd", "path_escape", 400);
    map_bad(&d, "out.safetensors", "path_escape", 400);
    map_bad(&d, "junk.safetensors", "bad_safetensors", 400);
    map_bad(&d, "sub", "not_a_file", 400);
    map_bad(&d, "missing.safetensors", "not_found", 404);
    map_bad(&d, "", "invalid_file", 400);
    rm_dirs(&d);
    tu_data_free(&full);
    cv_model_free(m);
    free(m);
}
END_TEST

/* ---- over HTTP ------------------------------------------------------------------- */

/* One HTTP/1.0 request; returns the body (malloc()ed) and the status. */
static char *http_do(int port, const char *method, const char *path, const char *ctype,
                     const void *body, size_t blen, int *status)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(fd, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(connect(fd, (struct sockaddr *)&a, sizeof a), 0);
    char head[512];
    int n = snprintf(head, sizeof head,
                     "%s %s HTTP/1.0\r\nHost: localhost\r\nContent-Type: %s\r\n"
                     "Content-Length: %zu\r\n\r\n", method, path, ctype, blen);
    ck_assert_int_eq(write(fd, head, (size_t)n), n);
    if (blen) /* a body over the limit may be cut off by the early answer */
        (void)!write(fd, body, blen);
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap + 1);
    ssize_t r;
    while ((r = read(fd, buf + len, cap - len)) > 0) {
        len += (size_t)r;
        if (len == cap)
            ck_assert_ptr_nonnull(buf = realloc(buf, (cap *= 2) + 1));
    }
    close(fd);
    buf[len] = 0;
    ck_assert_int_eq(sscanf(buf, "HTTP/1.%*d %d", status), 1);
    char *sep = strstr(buf, "\r\n\r\n");
    ck_assert_ptr_nonnull(sep);
    char *out = strdup(sep + 4);
    free(buf);
    return out;
}

static cJSON *call(int port, const char *method, const char *path, const char *ctype,
                   const void *body, size_t blen, int want)
{
    int st;
    char *t = http_do(port, method, path, ctype, body, blen, &st);
    ck_assert_msg(st == want, "%s %s: %d, want %d: %s", method, path, st, want, t);
    cJSON *j = cJSON_Parse(t);
    ck_assert_msg(j != NULL, "%s %s: not JSON: %s", method, path, t);
    free(t);
    return j;
}

static cJSON *jcall(int port, const char *method, const char *path, const char *json, int want)
{
    return call(port, method, path, "application/json", json, json ? strlen(json) : 0, want);
}

static void expect_code(cJSON *j, const char *code)
{
    cJSON *err = cJSON_GetObjectItem(j, "error");
    const char *c = cJSON_GetStringValue(cJSON_GetObjectItem(err, "code"));
    ck_assert_msg(c && strcmp(c, code) == 0, "code %s, want %s", c ? c : "(none)", code);
    cJSON_Delete(j);
}

/* The loss and gradient norm of a job on dataset ds, as JSON text. */
static char *job_result(int port, const char *ds)
{
    char body[160];
    snprintf(body, sizeof body, "{\"op\":\"gradient\",\"model\":\"m\",\"dataset\":\"%s\"}", ds);
    cJSON *j = jcall(port, "POST", "/v1/jobs?wait=60", body, 200);
    ck_assert_str_eq(cJSON_GetStringValue(cJSON_GetObjectItem(j, "status")), "succeeded");
    cJSON *res = cJSON_GetObjectItem(j, "result");
    ck_assert_ptr_nonnull(res);
    cJSON *v = cJSON_GetObjectItem(res, "gradient");
    ck_assert_msg(v != NULL, "no gradient in %s", cJSON_PrintUnformatted(res));
    char *t = cJSON_PrintUnformatted(v);
    cJSON_Delete(j);
    return t;
}

START_TEST(http_parts_and_data_dir)
{
    cv_model *m = heap_model();
    cv_dataset full;
    tu_data(&full, m, 400, 6);
    dirs d;
    make_dirs(&d, &full);
    cv_registry *reg = cv_registry_new((size_t)1 << 30);
    cv_err e;
    cv_dataset *one = malloc(sizeof *one);
    tu_data(one, m, 400, 6);
    ck_assert_int_eq(cv_registry_add_dataset(reg, "whole", one, "t", NULL, &e), 0);
    ck_assert_int_eq(cv_registry_add_model(reg, "m", m, "t", NULL, &e), 0);
    cv_jobs_config jc = {.workers = 1, .max_queue = 8, .keep_s = 60, .max_kept = 100};
    cv_job_limits_default(&jc.limits);
    cv_jobs *jobs = cv_jobs_new(&jc, reg, &e);
    ck_assert_ptr_nonnull(jobs);
    cv_http_config c;
    memset(&c, 0, sizeof c);
    c.max_body = 4096;
    c.max_wait = 60;
    c.data_dir = d.dir;
    cv_http *h = cv_http_start(&c, reg, jobs, &e);
    ck_assert_msg(h != NULL, "%s", e.message);
    int port = cv_http_port(h);
    cJSON *j = jcall(port, "GET", "/v1/health", NULL, 200);
    ck_assert_double_eq(tu_num(j, "max_body_bytes"), 4096);
    cJSON_Delete(j);
    /* the whole set is over --max-body: 413; in parts of 100 rows it fits */
    size_t len;
    void *buf = part_of(&full, 0, 400, &len);
    ck_assert_uint_gt(len, 4096);
    expect_code(call(port, "POST", "/v1/datasets/big/parts", "application/octet-stream", buf,
                     len, 413), "body_too_large");
    free(buf);
    for (size_t off = 0; off < 400; off += 100) {
        buf = part_of(&full, off, 100, &len);
        ck_assert_uint_le(len, 4096);
        j = call(port, "POST", "/v1/datasets/big/parts", "application/octet-stream", buf, len,
                 200);
        ck_assert_double_eq(tu_num(j, "n"), (double)(off + 100));
        cJSON_Delete(j);
        free(buf);
    }
    expect_code(jcall(port, "GET", "/v1/datasets/big", NULL, 404), "not_found");
    expect_code(jcall(port, "POST", "/v1/datasets/big/parts", "{\"data\":\"\"}", 415),
                "unsupported_media_type");
    j = jcall(port, "GET", "/v1/datasets/big/parts", NULL, 200);
    ck_assert_double_eq(tu_num(j, "parts"), 4);
    cJSON_Delete(j);
    expect_code(jcall(port, "POST", "/v1/datasets/big/commit", "{\"n\": 401}", 400),
                "upload_incomplete");
    expect_code(jcall(port, "POST", "/v1/datasets/big/commit", "{\"replace\": 1}", 400),
                "invalid_field");
    j = jcall(port, "POST", "/v1/datasets/big/commit", "{\"n\": 400, \"parts\": 4}", 201);
    ck_assert_double_eq(tu_num(j, "n"), 400);
    ck_assert(cJSON_IsFalse(cJSON_GetObjectItem(j, "mapped")));
    cJSON_Delete(j);
    expect_code(jcall(port, "GET", "/v1/datasets/big/parts", NULL, 404), "not_found");
    expect_code(jcall(port, "DELETE", "/v1/datasets/big/parts", NULL, 404), "not_found");
    /* the same file, memory-mapped from --data-dir */
    j = jcall(port, "POST", "/v1/datasets/mapped", "{\"file\": \"data.safetensors\"}", 201);
    ck_assert(cJSON_IsTrue(cJSON_GetObjectItem(j, "mapped")));
    ck_assert_double_eq(tu_num(j, "bytes"), (double)sizeof(cv_dataset));
    ck_assert_double_gt(tu_num(j, "mapped_bytes"), 400 * 16);
    cJSON_Delete(j);
    expect_code(jcall(port, "POST", "/v1/datasets/mapped", "{\"file\": \"data.safetensors\"}",
                      409), "already_exists");
    j = jcall(port, "POST", "/v1/datasets/mapped",
              "{\"file\": \"data.safetensors\", \"replace\": true}", 200);
    ck_assert_double_eq(tu_num(j, "version"), 2);
    cJSON_Delete(j);
    expect_code(jcall(port, "POST", "/v1/datasets/x", "{\"file\": \"../etc/passwd\"}", 400),
                "path_escape");
    expect_code(jcall(port, "POST", "/v1/datasets/x", "{\"file\": \"out.safetensors\"}", 400),
                "path_escape");
    expect_code(jcall(port, "POST", "/v1/datasets/x", "{\"file\": \"junk.safetensors\"}", 400),
                "bad_safetensors");
    expect_code(jcall(port, "POST", "/v1/datasets/x", "{\"path\": \"data.safetensors\"}", 400),
                "unknown_field");
    /* jobs on the assembled and on the mapped dataset equal the one-piece result */
    char *want = job_result(port, "whole");
    char *got = job_result(port, "big");
    ck_assert_str_eq(got, want);
    free(got);
    got = job_result(port, "mapped");
    ck_assert_str_eq(got, want);
    free(got);
    free(want);
    cJSON_Delete(jcall(port, "DELETE", "/v1/datasets/mapped", NULL, 200));
    cv_http_stop(h);
    cv_jobs_free(jobs);
    cv_registry_free(reg);
    /* without --data-dir a file cannot be named */
    reg = cv_registry_new((size_t)1 << 30);
    jobs = cv_jobs_new(&jc, reg, &e);
    c.data_dir = NULL;
    h = cv_http_start(&c, reg, jobs, &e);
    expect_code(jcall(cv_http_port(h), "POST", "/v1/datasets/x",
                      "{\"file\": \"data.safetensors\"}", 400), "no_data_dir");
    cv_http_stop(h);
    cv_jobs_free(jobs);
    cv_registry_free(reg);
    rm_dirs(&d);
    tu_data_free(&full);
}
END_TEST

static Suite *uploads_suite(void)
{
    Suite *s = suite_create("uploads");
    TCase *t = tcase_create("parts");
    tcase_add_test(t, parts_assemble_and_commit);
    tcase_add_test(t, parts_must_match_the_first);
    tcase_add_test(t, parts_count_against_the_budget_and_expire);
    tcase_add_test(t, concurrent_parts_are_serialised_or_refused);
    suite_add_tcase(s, t);
    TCase *dd = tcase_create("data_dir");
    tcase_add_test(dd, data_dir_maps_files_and_refuses_escapes);
    tcase_add_test(dd, http_parts_and_data_dir);
    tcase_set_timeout(dd, 120);
    suite_add_tcase(s, dd);
    return s;
}

int main(void) { return tu_main(uploads_suite); }
