/* staging.c - datasets uploaded in parts: staging areas that grow by whole
 * parts and are committed to the registry without a copy (see staging.h). */
#include "server/staging.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/datafile.h"
#include "api/safetensors.h"
#include "engine/linop.h"
#include "server/util.h"

typedef struct {
    char name[CV_REG_NAME_MAX + 1];
    int busy;                 /* a request works on it (outside the lock) */
    int parts;
    double created_at, updated_at; /* epoch seconds */
    double touched;           /* cv_now_s() of the last part */
    cv_st_dtype x_dt, y_dt;   /* the first part's dtypes */
    cv_dataset d;             /* d.n rows so far, arrays of cap rows */
    size_t cap;
    size_t reserved;          /* bytes reserved in the registry (the arrays' capacity) */
    /* What other requests may read (under the lock): the counts as of the end
     * of the last request that worked on the area; 0 parts: not yet visible. */
    size_t pub_n, pub_reserved;
    int pub_parts;
    double pub_updated_at;
} area;

/* The counts a description shows. */
typedef struct {
    size_t n, reserved;
    int parts;
    double updated_at;
} counts;

struct cv_staging {
    pthread_mutex_t mu;
    cv_registry *reg;
    double timeout;
    area **v;
    int n, cap;
};

cv_staging *cv_staging_new(cv_registry *reg, double timeout_s)
{
    cv_staging *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    if (pthread_mutex_init(&s->mu, NULL)) {
        free(s);
        return NULL;
    }
    s->reg = reg;
    s->timeout = timeout_s;
    return s;
}

/* Frees an area taken out of the table, with its reservation. */
static void area_free(cv_staging *s, area *a)
{
    if (!a)
        return;
    cv_dataset_free(&a->d);
    cv_registry_unreserve(s->reg, a->reserved);
    free(a);
}

void cv_staging_free(cv_staging *s)
{
    if (!s)
        return;
    for (int i = 0; i < s->n; i++)
        area_free(s, s->v[i]);
    free(s->v);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

/* Under s->mu. */
static int find(cv_staging *s, const char *name)
{
    for (int i = 0; i < s->n; i++)
        if (strcmp(s->v[i]->name, name) == 0)
            return i;
    return -1;
}

/* Under s->mu: removes v[i] from the table, returns it. */
static area *take(cv_staging *s, int i)
{
    area *a = s->v[i];
    s->v[i] = s->v[--s->n];
    return a;
}

static int busy_error(const char *name, cv_err *e)
{
    return cv_err_set(e, CV_ECONFLICT, "upload_busy", "name",
                      "another request is working on the upload in parts of dataset '%s'; "
                      "send its parts one at a time (wait for each answer)", name);
}

static int none_error(const char *name, cv_err *e)
{
    return cv_err_set(e, CV_ENOTFOUND, "not_found", "name",
                      "no upload in parts of dataset '%s' is staged (send parts with POST "
                      "/v1/datasets/%s/parts; an area idle too long is dropped)", name, name);
}

/* Marks name's area busy and returns it; create: make one if there is none
 * (*fresh set).  NULL with e filled: 409 busy, 404 none, out of memory. */
static area *claim(cv_staging *s, const char *name, int create, int *fresh, cv_err *e)
{
    *fresh = 0;
    pthread_mutex_lock(&s->mu);
    int i = find(s, name);
    area *a = NULL;
    if (i >= 0 && s->v[i]->busy)
        busy_error(name, e);
    else if (i >= 0)
        a = s->v[i];
    else if (!create)
        none_error(name, e);
    else if (s->n == s->cap) {
        int ncap = s->cap ? 2 * s->cap : 8;
        area **nv = realloc(s->v, sizeof *nv * (size_t)ncap);
        if (nv) {
            s->v = nv;
            s->cap = ncap;
        }
    }
    if (!a && i < 0 && create && s->n < s->cap && (a = calloc(1, sizeof *a))) {
        snprintf(a->name, sizeof a->name, "%s", name);
        a->created_at = cv_wall_s();
        s->v[s->n++] = a;
        *fresh = 1;
    } else if (!a && i < 0 && create) {
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
    }
    if (a) {
        a->busy = 1;
        a->touched = cv_now_s();
    }
    pthread_mutex_unlock(&s->mu);
    return a;
}

/* Ends the work on a; drop: remove and free it. */
static void unclaim(cv_staging *s, area *a, int drop)
{
    pthread_mutex_lock(&s->mu);
    a->busy = 0;
    a->pub_n = a->d.n;
    a->pub_parts = a->parts;
    a->pub_reserved = a->reserved;
    a->pub_updated_at = a->updated_at;
    a->touched = cv_now_s();
    int i = -1;
    if (drop)
        for (int k = 0; k < s->n; k++)
            if (s->v[k] == a)
                i = k;
    if (i >= 0)
        take(s, i);
    pthread_mutex_unlock(&s->mu);
    if (i >= 0)
        area_free(s, a);
}

static void shape_str(const cv_shape *sh, char *buf, size_t len)
{
    size_t k = (size_t)snprintf(buf, len, "[");
    for (int i = 0; i < sh->rank && k < len; i++)
        k += (size_t)snprintf(buf + k, len - k, "%s%d", i ? ", " : "", sh->dim[i]);
    if (k < len)
        snprintf(buf + k, len - k, "]");
}

/* Tensor `name` of part number `part` (dtype dt, per-sample shape sh)
 * against the first part's (fdt, fsh). */
static int check_tensor(const char *name, int part, cv_st_dtype dt, const cv_shape *sh,
                        cv_st_dtype fdt, const cv_shape *fsh, cv_err *e)
{
    if (dt == fdt && cv_shape_equal(sh, fsh))
        return 0;
    char s1[96], s2[96];
    shape_str(sh, s1, sizeof s1);
    shape_str(fsh, s2, sizeof s2);
    return cv_err_set(e, CV_EINVAL, "part_mismatch", name,
                      "part %d: %s is %s with per-sample shape %s, but the first part's %s "
                      "is %s with per-sample shape %s; every part must match the first "
                      "(nothing was added)", part, name, cv_st_dtype_name(dt), s1, name,
                      cv_st_dtype_name(fdt), s2);
}

/* The part p (dtypes xdt, ydt) against the first part's layout in a. */
static int check_part(const area *a, const cv_dataset *p, cv_st_dtype xdt, cv_st_dtype ydt,
                      cv_err *e)
{
    return check_tensor("x", a->parts + 1, xdt, &p->x_shape, a->x_dt, &a->d.x_shape, e) ||
                   check_tensor("y", a->parts + 1, ydt, &p->y_shape, a->y_dt, &a->d.y_shape, e)
               ? -1
               : 0;
}

static size_t y_size(const cv_dataset *d)
{
    return d->y_is_index ? sizeof(int64_t) : sizeof(float);
}

/* Grows a's arrays to hold k more rows, reserving the bytes first: 1.5x
 * the capacity when the budget allows, else exactly what is needed. */
static int grow(cv_staging *s, area *a, size_t k, cv_err *e)
{
    size_t sx = cv_shape_numel(&a->d.x_shape) * sizeof(float);
    size_t sy = cv_shape_numel(&a->d.y_shape) * y_size(&a->d);
    size_t row = sx + sy, need = a->d.n + k;
    if (need < k || need > SIZE_MAX / 2 / (row ? row : 1))
        return cv_err_set(e, CV_ETOOLARGE, "too_large", "x", "dataset '%s': %zu rows are too "
                          "many", a->name, need);
    if (need <= a->cap)
        return 0;
    size_t want = a->cap + a->cap / 2 > need ? a->cap + a->cap / 2 : need;
    cv_err e2;
    if (cv_registry_reserve(s->reg, (want - a->cap) * row, a->name, &e2)) {
        want = need;
        if (cv_registry_reserve(s->reg, (want - a->cap) * row, a->name, e))
            return -1;
    }
    size_t delta = (want - a->cap) * row;
    float *x = realloc(a->d.x, want * sx > 0 ? want * sx : 1);
    if (x)
        a->d.x = x;
    void **yp = a->d.y_is_index ? (void **)&a->d.labels : (void **)&a->d.targets;
    void *y = x ? realloc(*yp, want * sy > 0 ? want * sy : 1) : NULL;
    if (!y) {
        cv_registry_unreserve(s->reg, delta);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "dataset '%s': out of memory "
                          "growing the staged rows to %zu", a->name, want);
    }
    *yp = y;
    a->cap = want;
    a->reserved += delta;
    return 0;
}

/* Copies p's rows after a's. */
static void append_rows(area *a, const cv_dataset *p)
{
    size_t sx = cv_shape_numel(&a->d.x_shape), sy = cv_shape_numel(&a->d.y_shape);
    memcpy(a->d.x + a->d.n * sx, p->x, p->n * sx * sizeof(float));
    if (a->d.y_is_index)
        memcpy(a->d.labels + a->d.n * sy, p->labels, p->n * sy * sizeof(int64_t));
    else
        memcpy(a->d.targets + a->d.n * sy, p->targets, p->n * sy * sizeof(float));
    a->d.n += p->n;
    a->parts++;
    a->updated_at = cv_wall_s();
}

/* Parses buf as a dataset part into *p, with its x and y dtypes. */
static int parse_part(const void *buf, size_t len, cv_dataset *p, cv_st_dtype *xdt,
                      cv_st_dtype *ydt, cv_err *e)
{
    cv_st_file f;
    memset(p, 0, sizeof *p);
    if (cv_st_parse(buf, len, &f, e))
        return -1;
    int rc = cv_datafile_load(&f, p, e);
    if (rc == 0) {
        *xdt = cv_st_find(&f, "x")->dtype;
        *ydt = cv_st_find(&f, "y")->dtype;
    }
    cv_st_free(&f);
    return rc;
}

/* The description of a with the counts c (the owner's own, or the published ones). */
static cJSON *describe(const cv_staging *s, const area *a, const counts *c, double now)
{
    cJSON *o = cJSON_CreateObject();
    cJSON *y = o ? cJSON_AddObjectToObject(o, "y") : NULL;
    size_t xs[CV_MAX_RANK + 1], ys[CV_MAX_RANK + 1];
    xs[0] = ys[0] = c->n;
    for (int i = 0; i < a->d.x_shape.rank; i++)
        xs[i + 1] = (size_t)a->d.x_shape.dim[i];
    for (int i = 0; i < a->d.y_shape.rank; i++)
        ys[i + 1] = (size_t)a->d.y_shape.dim[i];
    double left = s->timeout > 0 ? s->timeout - (now - a->touched) : -1;
    if (!y || !cJSON_AddStringToObject(o, "name", a->name) ||
        !cJSON_AddNumberToObject(o, "parts", c->parts) ||
        !cJSON_AddNumberToObject(o, "n", (double)c->n) ||
        cv_json_add_sizes(o, "x_shape", xs, a->d.x_shape.rank + 1) ||
        !cJSON_AddStringToObject(o, "x_dtype", cv_st_dtype_name(a->x_dt)) ||
        !cJSON_AddStringToObject(y, "kind", a->d.y_is_index ? "labels" : "targets") ||
        !cJSON_AddStringToObject(y, "dtype", cv_st_dtype_name(a->y_dt)) ||
        cv_json_add_sizes(y, "shape", ys, a->d.y_shape.rank + 1) ||
        !cJSON_AddNumberToObject(o, "staged_bytes", (double)c->reserved) ||
        cv_json_add_time(o, "created_at", a->created_at) ||
        cv_json_add_time(o, "updated_at", c->updated_at) ||
        (s->timeout > 0 ? !cJSON_AddNumberToObject(o, "expires_in_s", left < 0 ? 0 : left)
                        : !cJSON_AddNullToObject(o, "expires_in_s"))) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

static int describe_out(cv_staging *s, const area *a, cJSON **out, cv_err *e)
{
    if (!out)
        return 0;
    counts c = {a->d.n, a->reserved, a->parts, a->updated_at}; /* a is ours (busy) */
    *out = describe(s, a, &c, cv_now_s());
    return *out ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
}

int cv_staging_append(cv_staging *s, const char *name, const void *buf, size_t len,
                      cJSON **out, cv_err *e)
{
    if (out)
        *out = NULL;
    if (cv_name_check(name, "name", e))
        return -1;
    cv_dataset p;
    cv_st_dtype xdt = CV_ST_F32, ydt = CV_ST_I64;
    if (parse_part(buf, len, &p, &xdt, &ydt, e))
        return -1;
    int fresh;
    area *a = claim(s, name, 1, &fresh, e);
    if (!a) {
        cv_dataset_free(&p);
        return -1;
    }
    if (fresh) {
        a->d.x_shape = p.x_shape;
        a->d.x_dtype = p.x_dtype;
        a->d.y_is_index = p.y_is_index;
        a->d.y_shape = p.y_shape;
        a->x_dt = xdt;
        a->y_dt = ydt;
    }
    int rc = fresh ? 0 : check_part(a, &p, xdt, ydt, e);
    if (rc == 0)
        rc = grow(s, a, p.n, e);
    if (rc == 0) {
        append_rows(a, &p);
        rc = describe_out(s, a, out, e);
    }
    cv_dataset_free(&p);
    unclaim(s, a, rc != 0 && fresh);
    return rc;
}

int cv_staging_describe(cv_staging *s, const char *name, cJSON **out, cv_err *e)
{
    *out = NULL;
    pthread_mutex_lock(&s->mu);
    int i = find(s, name);
    if (i >= 0 && s->v[i]->pub_parts == 0)
        i = -1; /* its first part is still arriving */
    if (i >= 0) {
        const area *a = s->v[i];
        counts c = {a->pub_n, a->pub_reserved, a->pub_parts, a->pub_updated_at};
        *out = describe(s, a, &c, cv_now_s());
    }
    pthread_mutex_unlock(&s->mu);
    if (i < 0)
        return none_error(name, e);
    return *out ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
}

/* Shrinks a's arrays to its rows (the reservation stays until the commit). */
static void shrink(area *a)
{
    size_t nx = a->d.n * cv_shape_numel(&a->d.x_shape) * sizeof(float);
    size_t ny = a->d.n * cv_shape_numel(&a->d.y_shape) * y_size(&a->d);
    float *x = realloc(a->d.x, nx ? nx : 1);
    if (x)
        a->d.x = x;
    void **yp = a->d.y_is_index ? (void **)&a->d.labels : (void **)&a->d.targets;
    void *y = realloc(*yp, ny ? ny : 1);
    if (y)
        *yp = y;
    a->cap = a->d.n;
}

static int check_expected(const area *a, long long n, long long parts, cv_err *e)
{
    if (n >= 0 && (unsigned long long)n != a->d.n)
        return cv_err_set(e, CV_EINVAL, "upload_incomplete", "n",
                          "dataset '%s': the commit expects %lld rows but %zu arrived in %d "
                          "parts (nothing was registered; the parts are kept)", a->name, n,
                          a->d.n, a->parts);
    if (parts >= 0 && parts != a->parts)
        return cv_err_set(e, CV_EINVAL, "upload_incomplete", "parts",
                          "dataset '%s': the commit expects %lld parts but %d arrived (%zu "
                          "rows; nothing was registered; the parts are kept)", a->name, parts,
                          a->parts, a->d.n);
    return 0;
}

int cv_staging_commit(cv_staging *s, const char *name, int replace, long long expect_n,
                      long long expect_parts, int *created, cv_snap **out, cv_err *e)
{
    *out = NULL;
    int fresh;
    area *a = claim(s, name, 0, &fresh, e);
    if (!a)
        return -1;
    if (check_expected(a, expect_n, expect_parts, e)) {
        unclaim(s, a, 0);
        return -1;
    }
    shrink(a);
    cv_dataset *d = malloc(sizeof *d);
    if (!d) {
        unclaim(s, a, 0);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
    }
    *d = a->d;
    char source[64];
    snprintf(source, sizeof source, "http (%d part%s)", a->parts, a->parts == 1 ? "" : "s");
    cv_dataset_backing b = {.staged = a->reserved};
    if (cv_registry_install_dataset(s->reg, name, d, source, replace ? 2 : 0, &b, created, out,
                                    e)) {
        free(d); /* the arrays stay a's */
        size_t k = strlen(e->message);
        snprintf(e->message + k, sizeof e->message - k, " (the staged parts are kept: retry "
                 "the commit, or DELETE /v1/datasets/%s/parts)", name);
        unclaim(s, a, 0);
        return -1;
    }
    memset(&a->d, 0, sizeof a->d); /* the snapshot owns the arrays and the reservation */
    a->reserved = 0;
    unclaim(s, a, 1);
    return 0;
}

int cv_staging_drop(cv_staging *s, const char *name, cv_err *e)
{
    pthread_mutex_lock(&s->mu);
    int i = find(s, name);
    area *a = NULL;
    if (i >= 0 && !s->v[i]->busy)
        a = take(s, i);
    pthread_mutex_unlock(&s->mu);
    if (i < 0)
        return none_error(name, e);
    if (!a)
        return busy_error(name, e);
    area_free(s, a);
    return 0;
}

int cv_staging_sweep(cv_staging *s, double now)
{
    if (s->timeout <= 0)
        return 0;
    int dropped = 0;
    for (;;) {
        area *a = NULL;
        pthread_mutex_lock(&s->mu);
        for (int i = 0; i < s->n && !a; i++)
            if (!s->v[i]->busy && now - s->v[i]->touched > s->timeout)
                a = take(s, i);
        pthread_mutex_unlock(&s->mu);
        if (!a)
            return dropped;
        area_free(s, a);
        dropped++;
    }
}

void cv_staging_stats(cv_staging *s, int *areas, size_t *bytes)
{
    pthread_mutex_lock(&s->mu);
    *areas = s->n;
    *bytes = 0;
    for (int i = 0; i < s->n; i++)
        *bytes += s->v[i]->pub_reserved;
    pthread_mutex_unlock(&s->mu);
}
