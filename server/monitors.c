/* monitors.c - training monitors: their table, the versions they count, the
 * instruments jobs they submit (low-priority lane, coalesced), their
 * histories, gauges and records (see monitors.h). */
#include "server/monitors.h"

#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "server/util.h"

typedef struct {
    unsigned long version, skipped;
    double time;
    char job[24];
    int failed;
    char *body; /* compact JSON: the instruments object, or the error object */
} hentry;

typedef struct inflight {
    cv_job *job;
    unsigned long skipped;
    struct inflight *next;
} inflight;

typedef struct mon {
    char id[24];
    char model[CV_REG_NAME_MAX + 1];
    cJSON *doc;            /* the monitor's fields as given, every filled in */
    cJSON *job;            /* the job document it submits */
    long every;
    unsigned long seen;    /* versions pushed since its creation */
    unsigned long runs, skipped_total;
    unsigned long seg_low; /* its oldest history segment record not removed yet */
    double created_at;
    inflight *fl;          /* its jobs not finished yet (at most one queued) */
    hentry *ring;          /* n entries from start (mod cap) */
    size_t ring_cap, start, n;
    struct mon *next;
} mon;

struct cv_monitors {
    cv_jobs *J;
    cv_registry *reg;
    cv_state *st;
    size_t cap;
    pthread_mutex_t mu;
    mon *head;
    int count;
    unsigned long next_id;
    uint64_t salt;
};

static const char *const FIELDS[] = {"dataset", "batch", "every", "include", "exclude", "probes",
                                     "bins", "lanczos_steps", "tic_epsilon", "seed", NULL};
static const char *const OPTIONS[] = {"include", "exclude", "probes", "bins", "lanczos_steps",
                                      "tic_epsilon", NULL};

/* ---- history ring ------------------------------------------------------------ */

static hentry *entry_at(mon *m, size_t i) { return &m->ring[(m->start + i) % m->ring_cap]; }

static int push_entry(mon *m, size_t cap, const hentry *h)
{
    if (m->n == m->ring_cap && m->ring_cap < cap) {
        size_t nc = m->ring_cap ? 2 * m->ring_cap : 16;
        if (nc > cap)
            nc = cap;
        hentry *nr = malloc(nc * sizeof *nr);
        if (!nr)
            return -1;
        for (size_t i = 0; i < m->n; i++)
            nr[i] = *entry_at(m, i);
        free(m->ring);
        m->ring = nr;
        m->ring_cap = nc;
        m->start = 0;
    }
    if (m->n == m->ring_cap) { /* full at the cap: the oldest goes */
        free(m->ring[m->start].body);
        m->ring[m->start] = *h;
        m->start = (m->start + 1) % m->ring_cap;
        return 0;
    }
    *entry_at(m, m->n++) = *h;
    return 0;
}

static cJSON *entry_json(const mon *m, const hentry *h)
{
    cJSON *o = cJSON_CreateObject();
    if (!o)
        return NULL;
    cJSON *body = cJSON_Parse(h->body);
    cJSON_AddStringToObject(o, "monitor", m->id);
    cJSON_AddNumberToObject(o, "version", (double)h->version);
    cv_json_add_time(o, "time", h->time);
    cJSON_AddStringToObject(o, "job", h->job);
    cJSON_AddNumberToObject(o, "skipped", (double)h->skipped);
    cJSON_AddItemToObject(o, h->failed ? "error" : "instruments",
                          body ? body : cJSON_CreateNull());
    return o;
}

/* ---- records (--state-dir) ------------------------------------------------------ */

static cJSON *mon_json(const mon *m)
{
    cJSON *o = cJSON_Duplicate(m->doc, 1);
    if (!o)
        return NULL;
    cJSON_AddStringToObject(o, "id", m->id);
    cJSON_AddStringToObject(o, "model", m->model);
    cv_json_add_time(o, "created_at", m->created_at);
    cJSON_AddNumberToObject(o, "versions_seen", (double)m->seen);
    cJSON_AddNumberToObject(o, "runs", (double)m->runs);
    cJSON_AddNumberToObject(o, "skipped", (double)m->skipped_total);
    cJSON_AddNumberToObject(o, "history_entries", (double)m->n);
    size_t pending = 0;
    for (const inflight *f = m->fl; f; f = f->next)
        pending++;
    cJSON_AddNumberToObject(o, "pending", (double)pending);
    return o;
}

/* History entries per segment record: a new entry rewrites only its segment
 * (at most SEG entries) and the monitor's small record. */
#define SEG 256

/* Ring entries i0..n-1 as JSON lines (malloc()ed, *blen bytes); NULL out of memory. */
static char *lines_text(mon *m, size_t i0, size_t *blen)
{
    size_t len = 0, cap = 4096;
    char *blob = malloc(cap);
    for (size_t i = i0; i < m->n && blob; i++) {
        const hentry *h = entry_at(m, i);
        char line[160];
        int k = snprintf(line, sizeof line,
                         "{\"version\":%lu,\"time\":%.17g,\"job\":\"%s\",\"skipped\":%lu,\"%s\":",
                         h->version, h->time, h->job, h->skipped,
                         h->failed ? "error" : "instruments");
        size_t bl = strlen(h->body), need = len + (size_t)k + bl + 3;
        if (need > cap) {
            while (cap < need)
                cap *= 2;
            char *nb = realloc(blob, cap);
            if (!nb) {
                free(blob);
                return NULL;
            }
            blob = nb;
        }
        memcpy(blob + len, line, (size_t)k);
        len += (size_t)k;
        memcpy(blob + len, h->body, bl);
        len += bl;
        blob[len++] = '}';
        blob[len++] = '\n';
    }
    *blen = len;
    return blob;
}

static void seg_name(const mon *m, unsigned long seg, char *out, size_t len)
{
    snprintf(out, len, "%s-%08lu", m->id, seg);
}

/* Under M->mu: writes m's record (the monitor and its counters, no blob). */
static void record_meta(cv_monitors *M, mon *m)
{
    if (!M->st)
        return;
    cJSON *meta = cJSON_CreateObject();
    cJSON_AddStringToObject(meta, "id", m->id);
    cJSON_AddStringToObject(meta, "model", m->model);
    cJSON_AddItemToObject(meta, "monitor", cJSON_Duplicate(m->doc, 1));
    cJSON_AddNumberToObject(meta, "created_at", m->created_at);
    cJSON_AddNumberToObject(meta, "seen", (double)m->seen);
    cJSON_AddNumberToObject(meta, "runs", (double)m->runs);
    cJSON_AddNumberToObject(meta, "skipped", (double)m->skipped_total);
    char *mt = cJSON_PrintUnformatted(meta);
    cJSON_Delete(meta);
    cv_err e;
    if (!mt)
        fprintf(stderr, "curvd: state: monitor %s: out of memory\n", m->id);
    else if (cv_state_write(M->st, CV_STATE_MONITOR, m->id, mt, strlen(mt), NULL, 0, &e))
        fprintf(stderr, "curvd: state: monitor %s: %s\n", m->id, e.message);
    free(mt);
}

/* Under M->mu, after an entry: rewrites the segment of the newest entry and
 * removes the segments whose entries have all been dropped. */
static void record_segment(cv_monitors *M, mon *m)
{
    if (!M->st || !m->runs)
        return;
    unsigned long seg = (m->runs - 1) / SEG, first = m->runs - m->n; /* ring 0's number */
    size_t i0 = seg * SEG > first ? seg * SEG - first : 0, blen;
    char name[64], meta[96];
    seg_name(m, seg, name, sizeof name);
    int ml = snprintf(meta, sizeof meta, "{\"monitor\":\"%s\",\"segment\":%lu}", m->id, seg);
    char *blob = lines_text(m, i0, &blen);
    cv_err e;
    if (!blob)
        fprintf(stderr, "curvd: state: monitor %s: out of memory\n", m->id);
    else if (cv_state_write(M->st, CV_STATE_MONITOR, name, meta, (size_t)ml, blob, blen, &e))
        fprintf(stderr, "curvd: state: monitor %s: %s\n", name, e.message);
    free(blob);
    while ((m->seg_low + 1) * SEG <= first) {
        seg_name(m, m->seg_low++, name, sizeof name);
        if (cv_state_remove(M->st, CV_STATE_MONITOR, name, &e))
            fprintf(stderr, "curvd: state: monitor %s: %s\n", name, e.message);
    }
}

/* Under M->mu: removes m's records (the monitor first: segments left by a
 * crash are removed at the next start). */
static void unrecord(cv_monitors *M, mon *m)
{
    cv_err e;
    if (!M->st)
        return;
    if (cv_state_remove(M->st, CV_STATE_MONITOR, m->id, &e))
        fprintf(stderr, "curvd: state: monitor %s: %s\n", m->id, e.message);
    for (unsigned long s = m->seg_low; m->runs && s <= (m->runs - 1) / SEG; s++) {
        char name[64];
        seg_name(m, s, name, sizeof name);
        if (cv_state_remove(M->st, CV_STATE_MONITOR, name, &e))
            fprintf(stderr, "curvd: state: monitor %s: %s\n", name, e.message);
    }
}

/* ---- creation ------------------------------------------------------------------ */

static void mon_free(mon *m)
{
    if (!m)
        return;
    for (size_t i = 0; i < m->n; i++)
        free(entry_at(m, i)->body);
    free(m->ring);
    while (m->fl) {
        inflight *n = m->fl->next;
        cv_job_unref(m->fl->job);
        free(m->fl);
        m->fl = n;
    }
    cJSON_Delete(m->doc);
    cJSON_Delete(m->job);
    free(m);
}

/* Checks doc's fields and builds the job document (*job) and the monitor's
 * fields (*norm, every filled in).  400 with the field. */
static int parse_doc(const char *model, const cJSON *doc, cJSON **job, cJSON **norm, long *every,
                     cv_err *e)
{
    *job = *norm = NULL;
    if (!cJSON_IsObject(doc))
        return cv_err_set(e, CV_EINVAL, "invalid_json", "", "a monitor is a JSON object");
    const cJSON *v;
    cJSON_ArrayForEach(v, doc)
    {
        int ok = 0;
        for (int i = 0; FIELDS[i]; i++)
            ok |= strcmp(FIELDS[i], v->string) == 0;
        if (!ok)
            return cv_err_set(e, CV_EINVAL, "unknown_field", v->string,
                              "unknown field '%.64s' in a monitor (known: dataset, batch, every, "
                              "include, exclude, probes, bins, lanczos_steps, tic_epsilon, seed)",
                              v->string);
    }
    const cJSON *ds = cJSON_GetObjectItemCaseSensitive(doc, "dataset");
    if (!ds)
        return cv_err_set(e, CV_EINVAL, "missing_field", "dataset",
                          "a monitor needs \"dataset\": the name of a registered dataset");
    if (!cJSON_IsString(ds))
        return cv_err_set(e, CV_EINVAL, "invalid_field", "dataset", "\"dataset\" is a string");
    const cJSON *ev = cJSON_GetObjectItemCaseSensitive(doc, "every");
    *every = 1;
    if (ev) {
        if (!cJSON_IsNumber(ev) || ev->valuedouble < 1 || ev->valuedouble > 1e9 ||
            ev->valuedouble != (double)(long)ev->valuedouble)
            return cv_err_set(e, CV_EINVAL, "invalid_field", "every",
                              "\"every\" is an integer from 1 to 1000000000");
        *every = (long)ev->valuedouble;
    }
    cJSON *j = cJSON_CreateObject(), *opts = cJSON_CreateObject();
    *norm = cJSON_Duplicate(doc, 1);
    if (!j || !opts || !*norm) {
        cJSON_Delete(j);
        cJSON_Delete(opts);
        cJSON_Delete(*norm);
        *norm = NULL;
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
    }
    if (!ev)
        cJSON_AddNumberToObject(*norm, "every", 1);
    cJSON_AddStringToObject(j, "op", "instruments");
    cJSON_AddStringToObject(j, "model", model);
    cJSON_AddStringToObject(j, "dataset", ds->valuestring);
    const char *top[] = {"batch", "seed"};
    for (int i = 0; i < 2; i++)
        if ((v = cJSON_GetObjectItemCaseSensitive(doc, top[i])))
            cJSON_AddItemToObject(j, top[i], cJSON_Duplicate(v, 1));
    for (int i = 0; OPTIONS[i]; i++)
        if ((v = cJSON_GetObjectItemCaseSensitive(doc, OPTIONS[i])))
            cJSON_AddItemToObject(opts, OPTIONS[i], cJSON_Duplicate(v, 1));
    cJSON_AddItemToObject(j, "options", opts);
    *job = j;
    return 0;
}

/* The job document checked like a submitted job against the model and
 * dataset now registered (fields of the options named as the monitor's). */
static int check_job(cv_monitors *M, const cJSON *job, cv_err *e)
{
    cv_job_spec *spec = cv_job_parse(job, e);
    cv_snap *ms = NULL, *ds = NULL;
    int rc = -1;
    if (!spec)
        goto out;
    const char *dname = cJSON_GetObjectItemCaseSensitive(job, "dataset")->valuestring;
    const char *mname = cJSON_GetObjectItemCaseSensitive(job, "model")->valuestring;
    if (!(ms = cv_registry_acquire(M->reg, CV_REG_MODEL, mname, e)) ||
        !(ds = cv_registry_acquire(M->reg, CV_REG_DATASET, dname, e)))
        goto out;
    rc = cv_job_bind(spec, ms->model, ds->data, e);
out:
    if (rc && strncmp(e->field, "options.", 8) == 0) {
        /* the monitor's fields are the options themselves */
        memmove(e->field, e->field + 8, strlen(e->field + 8) + 1);
        char *o;
        while ((o = strstr(e->message, "options.")))
            memmove(o, o + 8, strlen(o + 8) + 1);
    }
    if (rc && e->status == CV_ENOTFOUND && ds == NULL && ms)
        snprintf(e->field, sizeof e->field, "dataset");
    cv_job_spec_free(spec);
    if (ms)
        cv_registry_release(M->reg, ms);
    if (ds)
        cv_registry_release(M->reg, ds);
    return rc;
}

static int model_exists(cv_monitors *M, const char *model, cv_err *e)
{
    cv_snap *s = cv_registry_acquire(M->reg, CV_REG_MODEL, model, e);
    if (!s)
        return 0;
    cv_registry_release(M->reg, s);
    return 1;
}

int cv_monitors_create(cv_monitors *M, const char *model, const cJSON *doc, cJSON **out,
                       cv_err *e)
{
    *out = NULL;
    cJSON *job, *norm;
    long every;
    if (!model_exists(M, model, e) || parse_doc(model, doc, &job, &norm, &every, e))
        return -1;
    mon *m = NULL;
    if (check_job(M, job, e) ||
        !(m = cv_err_calloc(sizeof *m, "out of memory", e))) {
        cJSON_Delete(job);
        cJSON_Delete(norm);
        return -1;
    }
    snprintf(m->model, sizeof m->model, "%s", model);
    m->doc = norm;
    m->job = job;
    m->every = every;
    m->created_at = cv_wall_s();
    pthread_mutex_lock(&M->mu);
    if (M->count >= CV_MONITORS_MAX) {
        pthread_mutex_unlock(&M->mu);
        mon_free(m);
        return cv_err_set(e, CV_EBUSY, "too_many_monitors", "",
                          "there are %d monitors already (the most curvd keeps); delete one",
                          CV_MONITORS_MAX);
    }
    /* ids never repeat across restarts: the start time's salt and a counter */
    uint64_t x = M->salt + ++M->next_id;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    snprintf(m->id, sizeof m->id, "m%012llx", (unsigned long long)((x ^ (x >> 31)) >> 16));
    m->next = M->head;
    M->head = m;
    M->count++;
    record_meta(M, m);
    *out = mon_json(m);
    pthread_mutex_unlock(&M->mu);
    return 0;
}

cJSON *cv_monitors_list(cv_monitors *M, const char *model)
{
    cJSON *o = cJSON_CreateObject(), *a = cJSON_AddArrayToObject(o, "monitors");
    pthread_mutex_lock(&M->mu);
    /* oldest first: the list is newest first */
    mon *v[CV_MONITORS_MAX];
    int n = 0;
    for (mon *m = M->head; m && n < CV_MONITORS_MAX; m = m->next)
        if (strcmp(m->model, model) == 0)
            v[n++] = m;
    for (int i = n - 1; i >= 0 && a; i--)
        cJSON_AddItemToArray(a, mon_json(v[i]));
    pthread_mutex_unlock(&M->mu);
    return o;
}

static mon *find_locked(cv_monitors *M, const char *model, const char *id, mon ***link)
{
    for (mon **pp = &M->head; *pp; pp = &(*pp)->next)
        if (strcmp((*pp)->model, model) == 0 && strcmp((*pp)->id, id) == 0) {
            if (link)
                *link = pp;
            return *pp;
        }
    return NULL;
}

int cv_monitors_delete(cv_monitors *M, const char *model, const char *id, cv_err *e)
{
    if (!model_exists(M, model, e))
        return -1;
    pthread_mutex_lock(&M->mu);
    mon **pp, *m = find_locked(M, model, id, &pp);
    if (!m) {
        pthread_mutex_unlock(&M->mu);
        return cv_err_set(e, CV_ENOTFOUND, "not_found", "id",
                          "model '%s' has no monitor '%.40s'", model, id);
    }
    *pp = m->next;
    M->count--;
    for (inflight *f = m->fl; f; f = f->next)
        cv_jobs_withdraw(M->J, f->job); /* a running one finishes; its entry is not kept */
    unrecord(M, m);
    pthread_mutex_unlock(&M->mu);
    mon_free(m);
    return 0;
}

/* ---- versions and jobs ------------------------------------------------------------ */

/* Under M->mu: drops m's in-flight jobs that finished without the hook
 * (cancelled by DELETE /v1/jobs/ID while queued). */
static void prune_locked(cv_monitors *M, mon *m)
{
    for (inflight **pp = &m->fl; *pp;) {
        inflight *f = *pp;
        if (cv_jobs_wait(M->J, f->job, 0)) {
            *pp = f->next;
            cv_job_unref(f->job);
            free(f);
        } else {
            pp = &f->next;
        }
    }
}

void cv_monitors_version(cv_monitors *M, const char *model)
{
    pthread_mutex_lock(&M->mu);
    for (mon *m = M->head; m; m = m->next) {
        if (strcmp(m->model, model) != 0)
            continue;
        ++m->seen;
        record_meta(M, m); /* the count goes on after a restart */
        if (m->seen % (unsigned long)m->every)
            continue;
        prune_locked(M, m);
        unsigned long skipped = 0;
        inflight *last = NULL;
        for (inflight *f = m->fl; f; f = f->next)
            last = f;
        if (last && cv_jobs_withdraw(M->J, last->job)) {
            /* behind: the waiting version is skipped for this newer one */
            skipped = last->skipped + 1;
            m->skipped_total++;
            for (inflight **pp = &m->fl; *pp; pp = &(*pp)->next)
                if (*pp == last) {
                    *pp = NULL;
                    break;
                }
            cv_job_unref(last->job);
            free(last);
        }
        inflight *f = calloc(1, sizeof *f);
        cv_err e;
        cv_job *j = NULL;
        if (!f || cv_jobs_submit_low(M->J, m->job, &j, &e)) {
            if (f)
                fprintf(stderr, "curvd: monitor %s of model %s: version not run: %s\n", m->id,
                        m->model, e.message);
            free(f);
            continue;
        }
        f->job = j;
        f->skipped = skipped;
        f->next = NULL;
        inflight **pp = &m->fl;
        while (*pp)
            pp = &(*pp)->next;
        *pp = f;
    }
    pthread_mutex_unlock(&M->mu);
}

/* The scalar instruments a history entry keeps (those the result has). */
static const char *const SCALARS[] = {
    "loss", "gradient_norm", "norm_test", "inner_product_test", "orthogonality_test",
    "mean_gsnr", "gsnr_excluded", "tic_trace", "tic_diag", "hessian_trace",
    "hessian_trace_std_err", "hessian_max_eigenvalue", "hessian_max_eigenvalue_residual",
    "update_size", "distance_from_init", "alpha", "alpha_fit", NULL};

static int is_scalar(const char *name)
{
    for (int i = 0; SCALARS[i]; i++)
        if (strcmp(SCALARS[i], name) == 0)
            return 1;
    return 0;
}

/* The scalar instruments of a result (numbers, or null when unavailable). */
static char *scalars_text(const char *result)
{
    cJSON *r = cJSON_Parse(result), *o = cJSON_CreateObject();
    const cJSON *v;
    cJSON_ArrayForEach(v, r)
    {
        if (!is_scalar(v->string))
            continue;
        if (cJSON_IsNumber(v))
            cJSON_AddNumberToObject(o, v->string, v->valuedouble);
        else if (cJSON_IsNull(v))
            cJSON_AddNullToObject(o, v->string);
    }
    char *t = o ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(r);
    cJSON_Delete(o);
    return t;
}

static void job_done(void *arg, cv_job *j, const char *result, const cv_err *err,
                     unsigned long version, double finished_at)
{
    cv_monitors *M = arg;
    pthread_mutex_lock(&M->mu);
    for (mon *m = M->head; m; m = m->next)
        for (inflight **pp = &m->fl; *pp; pp = &(*pp)->next) {
            inflight *f = *pp;
            if (f->job != j)
                continue;
            *pp = f->next;
            hentry h = {version, f->skipped, finished_at, "", !result, NULL};
            snprintf(h.job, sizeof h.job, "%s", cv_job_id(j));
            if (result) {
                h.body = scalars_text(result);
            } else {
                cJSON *eo = cJSON_CreateObject();
                cJSON_AddStringToObject(eo, "code", err->code);
                cJSON_AddStringToObject(eo, "message", err->message);
                h.body = cJSON_PrintUnformatted(eo);
                cJSON_Delete(eo);
            }
            if (h.body && push_entry(m, M->cap, &h) == 0) {
                m->runs++;
                record_segment(M, m);
                record_meta(M, m);
            } else {
                free(h.body);
                fprintf(stderr, "curvd: monitor %s: out of memory, version %lu not kept\n",
                        m->id, version);
            }
            cv_job_unref(f->job);
            free(f);
            pthread_mutex_unlock(&M->mu);
            return;
        }
    pthread_mutex_unlock(&M->mu);
}

/* ---- history and gauges ------------------------------------------------------------- */

cJSON *cv_monitors_history(cv_monitors *M, const char *model, const char *monitor,
                           unsigned long since, cv_err *e)
{
    if (!model_exists(M, model, e))
        return NULL;
    pthread_mutex_lock(&M->mu);
    if (monitor && !find_locked(M, model, monitor, NULL)) {
        pthread_mutex_unlock(&M->mu);
        cv_err_set(e, CV_ENOTFOUND, "not_found", "monitor", "model '%s' has no monitor '%.40s'",
                   model, monitor);
        return NULL;
    }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "model", model);
    cJSON_AddNumberToObject(o, "cap", (double)M->cap);
    cJSON *a = cJSON_AddArrayToObject(o, "history");
    mon *v[CV_MONITORS_MAX];
    int n = 0;
    for (mon *m = M->head; m && n < CV_MONITORS_MAX; m = m->next)
        if (strcmp(m->model, model) == 0 && (!monitor || strcmp(m->id, monitor) == 0))
            v[n++] = m;
    for (int k = n - 1; k >= 0 && a; k--)
        for (size_t i = 0; i < v[k]->n; i++) {
            const hentry *h = entry_at(v[k], i);
            if (h->version >= since)
                cJSON_AddItemToArray(a, entry_json(v[k], h));
        }
    pthread_mutex_unlock(&M->mu);
    if (!a) {
        cJSON_Delete(o);
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
        return NULL;
    }
    return o;
}

/* Prometheus label values: \ " and newline escaped. */
static void label(char *out, size_t len, const char *s)
{
    size_t k = 0;
    for (; *s && k + 3 < len; s++) {
        if (*s == '\\' || *s == '"' || *s == '\n') {
            out[k++] = '\\';
            out[k++] = *s == '\n' ? 'n' : *s;
        } else {
            out[k++] = *s;
        }
    }
    out[k] = 0;
}

char *cv_monitors_metrics(cv_monitors *M)
{
    size_t len = 0, cap = 1024;
    char *buf = malloc(cap);
    if (!buf)
        return NULL;
    buf[0] = 0;
    int header = 0;
    pthread_mutex_lock(&M->mu);
    for (mon *m = M->head; m; m = m->next) {
        int first = 1; /* only the first monitor of each model speaks for it */
        for (mon *o = M->head; o != m; o = o->next)
            first &= strcmp(o->model, m->model) != 0;
        if (!first)
            continue;
        const hentry *best = NULL;
        for (mon *o = m; o; o = o->next)
            if (strcmp(o->model, m->model) == 0)
                for (size_t i = 0; i < o->n; i++) {
                    const hentry *h = entry_at(o, i);
                    if (!h->failed && (!best || h->version > best->version ||
                                       (h->version == best->version && h->time > best->time)))
                        best = h;
                }
        if (!best)
            continue;
        cJSON *ins = cJSON_Parse(best->body);
        const cJSON *v;
        char mlab[2 * CV_REG_NAME_MAX + 4];
        label(mlab, sizeof mlab, m->model);
        cJSON_ArrayForEach(v, ins)
        {
            if (!cJSON_IsNumber(v))
                continue;
            char line[512];
            int k = snprintf(line, sizeof line, "%scurvd_instrument{model=\"%s\",name=\"%s\"} %.17g\n",
                             header ? "" : "# HELP curvd_instrument latest value of each scalar "
                                           "instrument of a model's monitors\n"
                                           "# TYPE curvd_instrument gauge\n",
                             mlab, v->string, v->valuedouble);
            header = 1;
            if (k < 0 || (size_t)k >= sizeof line)
                continue;
            if (len + (size_t)k + 1 > cap) {
                size_t nc = 2 * cap + (size_t)k;
                char *nb = realloc(buf, nc);
                if (!nb) {
                    cJSON_Delete(ins);
                    pthread_mutex_unlock(&M->mu);
                    free(buf);
                    return NULL;
                }
                buf = nb;
                cap = nc;
            }
            memcpy(buf + len, line, (size_t)k + 1);
            len += (size_t)k;
        }
        cJSON_Delete(ins);
    }
    pthread_mutex_unlock(&M->mu);
    return buf;
}

/* ---- life cycle -------------------------------------------------------------------- */

/* Pushes the history entries of JSON lines p (len bytes) onto m. */
static void push_lines(cv_monitors *M, mon *m, const char *p, size_t len)
{
    const char *end = p + len;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t n = nl ? (size_t)(nl - p) : (size_t)(end - p);
        cJSON *h = cJSON_ParseWithLength(p, n);
        const cJSON *ver = cJSON_GetObjectItemCaseSensitive(h, "version");
        const cJSON *tm = cJSON_GetObjectItemCaseSensitive(h, "time");
        const cJSON *jb = cJSON_GetObjectItemCaseSensitive(h, "job");
        const cJSON *sk = cJSON_GetObjectItemCaseSensitive(h, "skipped");
        const cJSON *ins = cJSON_GetObjectItemCaseSensitive(h, "instruments");
        const cJSON *er = cJSON_GetObjectItemCaseSensitive(h, "error");
        if (cJSON_IsNumber(ver) && cJSON_IsNumber(tm) && cJSON_IsString(jb) &&
            cJSON_IsNumber(sk) && (ins || er)) {
            hentry he = {(unsigned long)ver->valuedouble, (unsigned long)sk->valuedouble,
                         tm->valuedouble, "", ins == NULL, cJSON_PrintUnformatted(ins ? ins : er)};
            snprintf(he.job, sizeof he.job, "%s", jb->valuestring);
            if (!he.body || push_entry(m, M->cap, &he))
                free(he.body);
        }
        cJSON_Delete(h);
        p += n + 1;
    }
}

/* A history segment read before its monitor (names sort so). */
typedef struct {
    char id[24];
    unsigned long seg;
    char *lines;
    size_t len;
} stashed;

typedef struct {
    cv_monitors *M;
    stashed *v;
    size_t n, cap;
} restore_ctx;

static int stash_segment(restore_ctx *R, const char *name, const cv_state_rec *rec, char *why,
                         size_t wl)
{
    cJSON *o = cJSON_ParseWithLength(rec->meta, rec->meta_len);
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(o, "monitor");
    const cJSON *sg = cJSON_GetObjectItemCaseSensitive(o, "segment");
    char expect[64] = "";
    if (cJSON_IsString(id) && strlen(id->valuestring) < 24 && cJSON_IsNumber(sg))
        snprintf(expect, sizeof expect, "%s-%08lu", id->valuestring,
                 (unsigned long)sg->valuedouble);
    if (!expect[0] || strcmp(expect, name) != 0) {
        cJSON_Delete(o);
        snprintf(why, wl, "not a monitor history segment");
        return -1;
    }
    if (R->n == R->cap) {
        size_t nc = R->cap ? 2 * R->cap : 16;
        stashed *nv = realloc(R->v, nc * sizeof *nv);
        if (!nv) {
            cJSON_Delete(o);
            snprintf(why, wl, "out of memory");
            return 1;
        }
        R->v = nv;
        R->cap = nc;
    }
    stashed *t = &R->v[R->n];
    snprintf(t->id, sizeof t->id, "%s", id->valuestring);
    t->seg = (unsigned long)sg->valuedouble;
    cJSON_Delete(o);
    if (!(t->lines = malloc(rec->blob_len + 1))) {
        snprintf(why, wl, "out of memory");
        return 1;
    }
    memcpy(t->lines, rec->blob, rec->blob_len);
    t->len = rec->blob_len;
    R->n++;
    return 0;
}

/* Reads a monitor record back (a history segment is stashed for later). */
static int restore_one(void *arg, const char *name, const cv_state_rec *rec, char *why,
                       size_t wl)
{
    restore_ctx *R = arg;
    cv_monitors *M = R->M;
    if (strchr(name, '-'))
        return stash_segment(R, name, rec, why, wl);
    if (M->count >= CV_MONITORS_MAX) {
        fprintf(stderr, "curvd: state: monitor %s skipped (more than %d monitors)\n", name,
                CV_MONITORS_MAX);
        return 1;
    }
    cJSON *o = cJSON_ParseWithLength(rec->meta, rec->meta_len);
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(o, "id");
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(o, "model");
    const cJSON *doc = cJSON_GetObjectItemCaseSensitive(o, "monitor");
    cJSON *job = NULL, *norm = NULL;
    long every;
    cv_err e;
    if (!cJSON_IsString(id) || !cJSON_IsString(model) || strcmp(id->valuestring, name) != 0 ||
        strlen(id->valuestring) >= 24 || !cv_name_valid(model->valuestring) ||
        parse_doc(model->valuestring, doc, &job, &norm, &every, &e)) {
        snprintf(why, wl, "not a monitor record");
        cJSON_Delete(o);
        return -1;
    }
    mon *m = calloc(1, sizeof *m);
    if (!m) {
        snprintf(why, wl, "out of memory");
        cJSON_Delete(o);
        cJSON_Delete(job);
        cJSON_Delete(norm);
        return 1;
    }
    snprintf(m->id, sizeof m->id, "%s", id->valuestring);
    snprintf(m->model, sizeof m->model, "%s", model->valuestring);
    m->doc = norm;
    m->job = job;
    m->every = every;
    const cJSON *v;
    if (cJSON_IsNumber(v = cJSON_GetObjectItemCaseSensitive(o, "created_at")))
        m->created_at = v->valuedouble;
    if (cJSON_IsNumber(v = cJSON_GetObjectItemCaseSensitive(o, "seen")))
        m->seen = (unsigned long)v->valuedouble;
    if (cJSON_IsNumber(v = cJSON_GetObjectItemCaseSensitive(o, "runs")))
        m->runs = (unsigned long)v->valuedouble;
    if (cJSON_IsNumber(v = cJSON_GetObjectItemCaseSensitive(o, "skipped")))
        m->skipped_total = (unsigned long)v->valuedouble;
    m->seg_low = ULONG_MAX; /* set by the segments attached */
    cJSON_Delete(o);
    m->next = M->head;
    M->head = m;
    M->count++;
    return 0;
}

static int by_segment(const void *a, const void *b)
{
    const stashed *x = a, *y = b;
    int c = strcmp(x->id, y->id);
    return c ? c : x->seg < y->seg ? -1 : x->seg > y->seg;
}

/* Gives the stashed segments to their monitors in order; a segment whose
 * monitor is gone (deleted, and the daemon stopped before its segments were
 * removed) is removed now. */
static void attach_segments(restore_ctx *R)
{
    cv_monitors *M = R->M;
    if (R->n)
        qsort(R->v, R->n, sizeof *R->v, by_segment);
    for (size_t i = 0; i < R->n; i++) {
        stashed *t = &R->v[i];
        mon *m = M->head;
        while (m && strcmp(m->id, t->id) != 0)
            m = m->next;
        char name[64];
        snprintf(name, sizeof name, "%s-%08lu", t->id, t->seg);
        cv_err e;
        if (!m) {
            fprintf(stderr, "curvd: state: monitor history %s has no monitor; removed\n", name);
            if (cv_state_remove(M->st, CV_STATE_MONITOR, name, &e))
                fprintf(stderr, "curvd: state: monitor %s: %s\n", name, e.message);
        } else {
            push_lines(M, m, t->lines, t->len);
            if (t->seg < m->seg_low)
                m->seg_low = t->seg;
        }
        free(t->lines);
    }
    free(R->v);
    for (mon *m = M->head; m; m = m->next) {
        if (m->seg_low == ULONG_MAX)
            m->seg_low = m->runs ? (m->runs - 1) / SEG : 0;
        if (m->n > m->runs) /* a record older than its segments: trust the entries */
            m->runs = m->n;
    }
}

static int newer_first(const void *a, const void *b)
{
    const mon *x = *(mon *const *)a, *y = *(mon *const *)b;
    return x->created_at > y->created_at ? -1 : x->created_at < y->created_at;
}

/* The list newest first (as creation leaves it), after records read in name order. */
static void sort_by_creation(cv_monitors *M)
{
    mon *v[CV_MONITORS_MAX];
    int n = 0;
    for (mon *m = M->head; m && n < CV_MONITORS_MAX; m = m->next)
        v[n++] = m;
    if (n < 2)
        return;
    qsort(v, (size_t)n, sizeof *v, newer_first);
    for (int i = 0; i < n; i++)
        v[i]->next = i + 1 < n ? v[i + 1] : NULL;
    M->head = v[0];
}

cv_monitors *cv_monitors_new(cv_jobs *J, cv_registry *reg, cv_state *st, size_t history_cap,
                             cv_err *e)
{
    cv_monitors *M = cv_err_calloc(sizeof *M, "out of memory", e);
    if (!M)
        return NULL;
    M->J = J;
    M->reg = reg;
    M->st = st;
    M->cap = history_cap ? history_cap : CV_MONITOR_HISTORY_DEFAULT;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    M->salt = (uint64_t)now.tv_sec * 1000000000ull + (uint64_t)now.tv_nsec;
    pthread_mutex_init(&M->mu, NULL);
    if (st) {
        restore_ctx R = {M, NULL, 0, 0};
        cv_state_scan(st, CV_STATE_MONITOR, restore_one, &R);
        attach_segments(&R);
        if (M->count)
            fprintf(stderr, "curvd: state: %d monitor%s read back\n", M->count,
                    M->count == 1 ? "" : "s");
        sort_by_creation(M);
    }
    cv_jobs_set_done_hook(J, job_done, M);
    return M;
}

void cv_monitors_free(cv_monitors *M)
{
    if (!M)
        return;
    while (M->head) {
        mon *n = M->head->next;
        mon_free(M->head);
        M->head = n;
    }
    pthread_mutex_destroy(&M->mu);
    free(M);
}
