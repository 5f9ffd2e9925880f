/* registry.c - named, versioned, reference-counted models and datasets with
 * a memory budget (see registry.h for the rules). */
#include "server/registry.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/arch.h"
#include "api/op_laplace.h"
#include "api/params.h"
#include "api/suggest.h"
#include "server/util.h"

typedef struct {
    cv_reg_kind kind;
    char owner[CV_REG_NAME_MAX + 1]; /* a posterior's model, "" else */
    char name[CV_REG_NAME_MAX + 1];
    cv_snap *cur;
    int jobs;                 /* queued or running jobs counted against this name */
} slot;

struct cv_registry {
    pthread_mutex_t mu;
    size_t max_bytes, bytes;
    slot *slots;
    int nslots, cap;
    /* Retired snapshots (replaced or deleted) that someone else still held
     * when they left their slot: the registry keeps one reference to each
     * and counts their bytes against the budget until only that reference
     * is left (the last job pinning them finished); sweep() drops them. */
    cv_snap **retired;
    int nretired, retired_cap;
    size_t retired_bytes;
    size_t staged;            /* reserved by uploads in parts (cv_registry_reserve) */
    unsigned long lineages;   /* registrations so far (cv_snap.lineage) */
    /* --state-dir: the hooks, and the writer lock that orders installs,
     * deletes and their files (taken before mu) */
    cv_registry_persist persist;
    int persisting;
    pthread_mutex_t wmu;
    cv_memory *memory;        /* --max-memory's account (jobs' parts), or NULL */
};

int cv_name_valid(const char *name)
{
    if (!name)
        return 0;
    size_t n = 0;
    for (const char *p = name; *p; p++, n++) {
        char c = *p;
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '.' || c == '-'))
            return 0;
        if (n >= CV_REG_NAME_MAX)
            return 0;
    }
    return n >= 1;
}

int cv_name_check(const char *name, const char *field, cv_err *e)
{
    if (cv_name_valid(name))
        return 0;
    return cv_err_set(e, CV_EINVAL, "invalid_name", field,
                      "%s must be 1 to %d characters from [A-Za-z0-9_.-]", field,
                      CV_REG_NAME_MAX);
}

cv_registry *cv_registry_new(size_t max_bytes)
{
    cv_registry *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    if (pthread_mutex_init(&r->mu, NULL)) {
        free(r);
        return NULL;
    }
    if (pthread_mutex_init(&r->wmu, NULL)) {
        pthread_mutex_destroy(&r->mu);
        free(r);
        return NULL;
    }
    r->max_bytes = max_bytes;
    return r;
}

void cv_registry_free(cv_registry *r)
{
    if (!r)
        return;
    for (int i = 0; i < r->nslots; i++)
        cv_snap_unref(r->slots[i].cur);
    for (int i = 0; i < r->nretired; i++)
        cv_snap_unref(r->retired[i]);
    free(r->retired);
    free(r->slots);
    pthread_mutex_destroy(&r->mu);
    pthread_mutex_destroy(&r->wmu);
    free(r);
}

size_t cv_model_bytes(const cv_model *m)
{
    return sizeof *m + sizeof(float) * (m->nparams_total + m->nbuffers_total);
}

size_t cv_dataset_bytes(const cv_dataset *d)
{
    size_t b = sizeof *d + sizeof(float) * d->n * cv_shape_numel(&d->x_shape);
    if (d->y_is_index)
        b += sizeof(int64_t) * d->n * cv_shape_numel(&d->y_shape);
    else
        b += sizeof(float) * d->n * cv_shape_numel(&d->y_shape);
    return b;
}

static void free_model(cv_model *m)
{
    if (m) {
        cv_model_free(m);
        free(m);
    }
}

static void free_dataset(cv_dataset *d)
{
    if (d) {
        cv_dataset_free(d);
        free(d);
    }
}

void cv_snap_ref(cv_snap *s)
{
    if (s)
        atomic_fetch_add(&s->refs, 1);
}

static void blob_unref(cv_param_blob *b)
{
    if (b && atomic_fetch_sub(&b->refs, 1) == 1)
        free(b);
}

static cv_param_blob *blob_ref(cv_param_blob *b)
{
    if (b)
        atomic_fetch_add(&b->refs, 1);
    return b;
}

/* A copy of model m's parameters as version `version`'s blob (NULL: no memory). */
static cv_param_blob *blob_of(const cv_model *m, unsigned long version)
{
    cv_param_blob *b = malloc(sizeof *b + sizeof(float) * (m->nparams_total ? m->nparams_total : 1));
    if (!b)
        return NULL;
    atomic_init(&b->refs, 1);
    b->version = version;
    b->n = m->nparams_total;
    memcpy(b->v, m->params, sizeof(float) * m->nparams_total);
    return b;
}

/* Under the lock, as s replaces cur: s keeps cur's parameters (s->previous,
 * copied from the snapshot read before parsing; recopied here if another
 * PUT was installed in between) and the first version's. */
static void link_history(cv_snap *s, const cv_snap *cur)
{
    if (!s->previous)
        return;
    if (s->previous->version != cur->version && s->previous->n == cur->model->nparams_total) {
        memcpy(s->previous->v, cur->model->params, sizeof(float) * s->previous->n);
        s->previous->version = cur->version;
    }
    /* the first version's parameters: kept from version 1 on; a model restored
     * from --state-dir at a later version has none (its earlier ones are gone) */
    s->first = cur->first ? blob_ref(cur->first) : cur->version == 1 ? blob_ref(s->previous) : NULL;
}

void cv_snap_unref(cv_snap *s)
{
    if (!s || atomic_fetch_sub(&s->refs, 1) != 1)
        return;
    blob_unref(s->previous);
    blob_unref(s->first);
    free_model(s->model);
    free_dataset(s->data);
    if (s->backing_free)
        s->backing_free(s->backing);
    free(s);
}

static cv_snap *snap_new(cv_reg_kind kind, const char *name, cv_model *m, cv_dataset *d,
                         const char *source, const cv_dataset_backing *b)
{
    cv_snap *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    atomic_init(&s->refs, 1);
    s->kind = kind;
    snprintf(s->name, sizeof s->name, "%s", name);
    snprintf(s->source, sizeof s->source, "%s", source ? source : "http");
    s->model = m;
    s->data = d;
    s->bytes = m ? cv_model_bytes(m) : b && b->bytes ? b->bytes : cv_dataset_bytes(d);
    if (b) {
        s->mapped_bytes = b->mapped_bytes;
        s->backing = b->backing;
        s->backing_free = b->backing_free;
        if (b->data_file)
            snprintf(s->data_file, sizeof s->data_file, "%s", b->data_file);
    }
    s->version = 1;
    s->created_at = s->updated_at = cv_wall_s();
    return s;
}

static slot *find_slot(cv_registry *r, cv_reg_kind kind, const char *owner, const char *name)
{
    for (int i = 0; i < r->nslots; i++)
        if (r->slots[i].kind == kind && strcmp(r->slots[i].name, name) == 0 &&
            strcmp(r->slots[i].owner, owner) == 0)
            return &r->slots[i];
    return NULL;
}

static const char *kind_word(cv_reg_kind k)
{
    return k == CV_REG_MODEL ? "model" : k == CV_REG_DATASET ? "dataset" : "posterior";
}

/* Under r->mu: "; did you mean 'demo-mlp'?" for a misspelt name of kind, or "". */
static void name_hint(cv_registry *r, cv_reg_kind kind, const char *name, char *buf, size_t len)
{
    buf[0] = 0;
    const char **names = malloc(sizeof *names * (size_t)(r->nslots + 1));
    if (!names)
        return; /* no hint: the answer is still not_found */
    int n = 0;
    for (int i = 0; i < r->nslots; i++)
        if (r->slots[i].kind == kind)
            names[n++] = r->slots[i].name;
    cv_suggest_hint(name, names, n, buf, len);
    free(names);
}

/* Under r->mu: moves the registry's reference to s (just taken out of its
 * slot) to the retired list if anyone besides the registry and `held` known
 * callers still references it.  Returns s if the caller should drop the
 * reference itself (after unlocking), NULL if the retired list kept it.  If
 * the list cannot grow, the snapshot is simply not counted. */
static cv_snap *retire_locked(cv_registry *r, cv_snap *s, int held)
{
    if (atomic_load(&s->refs) <= 1 + held)
        return s;
    if (r->nretired == r->retired_cap) {
        int ncap = r->retired_cap ? 2 * r->retired_cap : 16;
        cv_snap **nv = realloc(r->retired, sizeof *nv * (size_t)ncap);
        if (!nv)
            return s;
        r->retired = nv;
        r->retired_cap = ncap;
    }
    r->retired[r->nretired++] = s;
    r->retired_bytes += s->bytes;
    return NULL;
}

/* Under r->mu: takes out of the retired list one snapshot that only the
 * list still references (the caller unrefs it after unlocking), or NULL. */
static cv_snap *sweep_one_locked(cv_registry *r)
{
    for (int i = 0; i < r->nretired; i++) {
        cv_snap *s = r->retired[i];
        if (atomic_load(&s->refs) == 1) {
            r->retired_bytes -= s->bytes;
            r->retired[i] = r->retired[--r->nretired];
            return s;
        }
    }
    return NULL;
}

/* Frees every retired snapshot no job holds any more (takes the lock). */
static void sweep(cv_registry *r)
{
    for (;;) {
        pthread_mutex_lock(&r->mu);
        cv_snap *s = sweep_one_locked(r);
        pthread_mutex_unlock(&r->mu);
        if (!s)
            return;
        cv_snap_unref(s);
    }
}

void cv_registry_set_memory(cv_registry *r, cv_memory *m) { r->memory = m; }

/* Under r->mu: --max-memory's checks of `need` more bytes for `name`:
 * current: the current versions and reservations the registry will hold
 * beside it; pinned: old versions still pinned by jobs.  413 memory_limit
 * when current + need exceed the limit (nothing but deleting registered
 * things helps), 429 memory_busy when the pinned versions and the jobs'
 * documents and running estimates leave no room now (kept results give way
 * by themselves and do not count). */
static int memory_check_locked(cv_registry *r, size_t need, size_t current, size_t pinned,
                               const char *name, cv_err *e)
{
    const cv_memory *m = r->memory;
    if (!m || !m->limit)
        return 0;
    size_t base = cv_memory_get(m, CV_MEM_BASELINE), held = current + base;
    if (held > m->limit || need > m->limit - held)
        return cv_err_set(e, CV_ETOOLARGE, "memory_limit", "",
                          "'%s' needs %zu bytes but --max-memory is %zu bytes and the registry "
                          "holds %zu (models, datasets, uploads in parts) beside the daemon's "
                          "baseline %zu; delete something or raise --max-memory",
                          name, need, m->limit, current, base);
    size_t docs = cv_memory_get(m, CV_MEM_DOCUMENTS), run = cv_memory_get(m, CV_MEM_RUNNING);
    size_t used = held + pinned + docs + run; /* not request bodies: this one's is among them */
    if (used <= m->limit && need <= m->limit - used)
        return 0;
    return cv_err_set(e, CV_EBUSY, "memory_busy", "",
                      "'%s' needs %zu bytes: --max-memory is %zu bytes with %zu in use "
                      "(registry %zu, old versions pinned by jobs %zu, queued and running jobs' "
                      "documents %zu, running jobs %zu, the daemon's baseline %zu); retry when "
                      "jobs have finished",
                      name, need, m->limit, used, current, pinned, docs, run, base);
}

/* freed: bytes that the operation gives back (a replaced version, its own
 * staged reservation). */
static int budget_error(cv_registry *r, size_t need, size_t freed, const char *name, cv_err *e)
{
    return cv_err_set(e, CV_ETOOLARGE, "registry_full", "",
                      "'%s' needs %zu bytes but the registry memory budget "
                      "(--max-registry-bytes) is %zu bytes with %zu in use (%zu of them "
                      "reserved by uploads in parts); delete something or raise the budget",
                      name, need, r->max_bytes, r->bytes + r->staged - freed, r->staged);
}

/* Inserts or replaces s under the lock.  replace: 0 = must not exist,
 * 1 = must exist, 2 = either.  expect (replace 1, may be NULL): the snapshot
 * s was built from, which the caller holds a reference to; if the slot holds
 * another one by now (DELETE and a new registration, or another PUT, came in
 * between), 409 conflict.  On success the registry owns s's reference; the
 * replaced snapshot is returned in *old (unref outside) unless it went to
 * the retired list. */
static int install(cv_registry *r, cv_snap *s, int replace, const cv_snap *expect,
                   size_t staged, int *created, cv_snap **old, cv_err *e)
{
    *old = NULL;
    slot *sl = find_slot(r, s->kind, s->owner, s->name);
    if (sl && replace == 1 && expect && sl->cur->lineage != expect->lineage)
        return cv_err_set(e, CV_ECONFLICT, "conflict", "name",
                          "%s '%s' was deleted and registered again while the request was "
                          "processed (it now holds version %lu of the new registration); "
                          "nothing was changed: check the %s and retry", kind_word(s->kind), s->name,
                          sl->cur->version, kind_word(s->kind));
    if (sl && replace == 0)
        return cv_err_set(e, CV_ECONFLICT, "already_exists", "name",
                          "%s '%s' already exists (version %lu); %s", kind_word(s->kind),
                          s->name, sl->cur->version,
                          s->kind == CV_REG_MODEL
                              ? "PUT /v1/models/{name}/parameters updates its weights, or "
                                "DELETE it first"
                              : "PUT /v1/datasets/{name} replaces it");
    if (!sl && replace == 1)
        return cv_err_set(e, CV_ENOTFOUND, "not_found", "name", "%s '%s' not found",
                          kind_word(s->kind), s->name);
    if (!sl && expect)
        return cv_err_set(e, CV_ENOTFOUND, "not_found", "name",
                          "%s '%s' was deleted while the request was processed",
                          kind_word(s->kind), s->name);
    size_t freed = sl ? sl->cur->bytes : 0;
    if (staged > r->staged)
        staged = r->staged;
    size_t used = r->bytes + r->staged - staged; /* current versions and other reservations */
    /* the current snapshot is only freed if no job (nor anyone but the
     * caller) still holds it; otherwise it is retired and stays counted */
    int held = expect && sl->cur == expect;
    size_t really_freed = sl && atomic_load(&sl->cur->refs) <= 1 + held ? freed : 0;
    if (s->bytes > r->max_bytes || used - freed + s->bytes > r->max_bytes)
        return budget_error(r, s->bytes, freed + staged, s->name, e);
    if (used + r->retired_bytes - really_freed + s->bytes > r->max_bytes)
        return cv_err_set(e, CV_EBUSY, "registry_full", "",
                          "'%s' needs %zu bytes: the registry memory budget "
                          "(--max-registry-bytes) is %zu bytes, %zu are in current versions "
                          "and %zu in %d older version%s still pinned by queued or running "
                          "jobs%s; retry when those jobs finish, or raise the budget",
                          s->name, s->bytes, r->max_bytes, used - freed + really_freed,
                          r->retired_bytes + (freed - really_freed),
                          r->nretired + (freed != really_freed),
                          r->nretired + (freed != really_freed) == 1 ? "" : "s",
                          freed != really_freed ? " (the version being replaced included)" : "");
    if (memory_check_locked(r, s->bytes, used - freed, r->retired_bytes + freed - really_freed,
                            s->name, e))
        return -1;
    if (sl) {
        r->staged -= staged;
        s->version = sl->cur->version + 1;
        s->created_at = sl->cur->created_at;
        s->lineage = sl->cur->lineage;
        link_history(s, sl->cur);
        *old = retire_locked(r, sl->cur, held);
        sl->cur = s;
        r->bytes = r->bytes - freed + s->bytes;
        if (created)
            *created = 0;
        return 0;
    }
    if (r->nslots == r->cap) {
        int ncap = r->cap ? 2 * r->cap : 16;
        slot *ns = realloc(r->slots, sizeof *ns * (size_t)ncap);
        if (!ns)
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
        r->slots = ns;
        r->cap = ncap;
    }
    r->staged -= staged;
    sl = &r->slots[r->nslots++];
    memset(sl, 0, sizeof *sl);
    sl->kind = s->kind;
    snprintf(sl->name, sizeof sl->name, "%s", s->name);
    snprintf(sl->owner, sizeof sl->owner, "%s", s->owner);
    sl->cur = s;
    s->lineage = ++r->lineages;
    r->bytes += s->bytes;
    if (created)
        *created = 1;
    return 0;
}

/* Under r->wmu: gives s the version and creation time install() will give
 * it (no other writer runs until the install), so that its file can be
 * written first.  Returns 0 if the install cannot succeed anyway (the name
 * exists for replace 0, is missing for replace 1). */
static int predict_version(cv_registry *r, cv_snap *s, int replace)
{
    pthread_mutex_lock(&r->mu);
    slot *sl = find_slot(r, s->kind, s->owner, s->name);
    int ok = sl ? replace != 0 : replace != 1;
    if (sl && ok) {
        s->version = sl->cur->version + 1;
        s->created_at = sl->cur->created_at;
    }
    pthread_mutex_unlock(&r->mu);
    return ok;
}

/* Installs the new snapshot s (see install); on failure s stays the caller's.
 * With persistence, its file is prepared before and committed after. */
static int install_snap(cv_registry *r, cv_snap *s, int replace, const cv_snap *expect,
                        size_t staged, int *created, cv_snap **out, cv_err *e)
{
    cv_snap *old = NULL;
    void *tx = NULL;
    int persisting = r->persisting;
    if (persisting) {
        pthread_mutex_lock(&r->wmu);
        if (predict_version(r, s, replace) && r->persist.prepare(r->persist.arg, s, &tx, e)) {
            pthread_mutex_unlock(&r->wmu);
            return -1;
        }
    }
    pthread_mutex_lock(&r->mu);
    int rc = install(r, s, replace, expect, staged, created, &old, e);
    if (rc == 0 && out) {
        cv_snap_ref(s);
        *out = s;
    }
    pthread_mutex_unlock(&r->mu);
    if (persisting) {
        if (tx && rc == 0) {
            cv_err ce;
            if (r->persist.commit(r->persist.arg, tx, &ce))
                fprintf(stderr, "curvd: state: %s '%s' version %lu is in memory only: %s\n",
                        kind_word(s->kind), s->name, s->version, ce.message);
        } else if (tx) {
            r->persist.abort(r->persist.arg, tx);
        }
        pthread_mutex_unlock(&r->wmu);
    }
    cv_snap_unref(old);
    return rc;
}

static int add_snap(cv_registry *r, cv_reg_kind kind, const char *name, cv_model *m,
                    cv_dataset *d, const char *source, int replace, const cv_snap *expect,
                    int *created, cv_snap **out, cv_err *e)
{
    sweep(r);
    if (out)
        *out = NULL;
    if (cv_name_check(name, "name", e)) {
        free_model(m);
        free_dataset(d);
        return -1;
    }
    cv_snap *s = snap_new(kind, name, m, d, source, NULL);
    if (!s) {
        free_model(m);
        free_dataset(d);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
    }
    int rc = install_snap(r, s, replace, expect, 0, created, out, e);
    if (rc)
        cv_snap_unref(s);
    return rc;
}

int cv_registry_install_dataset(cv_registry *r, const char *name, cv_dataset *d,
                                const char *source, int replace, const cv_dataset_backing *b,
                                int *created, cv_snap **out, cv_err *e)
{
    sweep(r);
    if (out)
        *out = NULL;
    if (cv_name_check(name, "name", e))
        return -1;
    cv_snap *s = snap_new(CV_REG_DATASET, name, NULL, d, source, b);
    if (!s)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
    int rc = install_snap(r, s, replace, NULL, b ? b->staged : 0, created, out, e);
    if (rc) { /* d and the backing go back to the caller */
        s->data = NULL;
        s->backing_free = NULL;
        cv_snap_unref(s);
    }
    return rc;
}

int cv_registry_reserve(cv_registry *r, size_t bytes, const char *what, cv_err *e)
{
    sweep(r);
    pthread_mutex_lock(&r->mu);
    size_t used = r->bytes + r->staged;
    int rc = 0;
    if (bytes > r->max_bytes || used > r->max_bytes - bytes)
        rc = budget_error(r, bytes, 0, what, e);
    else if (used + r->retired_bytes > r->max_bytes - bytes)
        rc = cv_err_set(e, CV_EBUSY, "registry_full", "",
                        "'%s' needs %zu more bytes: the registry memory budget "
                        "(--max-registry-bytes) is %zu bytes, %zu are in use and %zu in %d "
                        "older version%s still pinned by queued or running jobs; retry when "
                        "those jobs finish, or raise the budget", what, bytes, r->max_bytes,
                        used, r->retired_bytes, r->nretired, r->nretired == 1 ? "" : "s");
    else if (!memory_check_locked(r, bytes, used, r->retired_bytes, what, e))
        r->staged += bytes;
    else
        rc = -1;
    pthread_mutex_unlock(&r->mu);
    return rc;
}

void cv_registry_unreserve(cv_registry *r, size_t bytes)
{
    pthread_mutex_lock(&r->mu);
    r->staged -= bytes < r->staged ? bytes : r->staged;
    pthread_mutex_unlock(&r->mu);
}

int cv_registry_add_model(cv_registry *r, const char *name, cv_model *m, const char *source,
                          cv_snap **out, cv_err *e)
{
    return add_snap(r, CV_REG_MODEL, name, m, NULL, source, 0, NULL, NULL, out, e);
}

int cv_registry_add_dataset(cv_registry *r, const char *name, cv_dataset *d,
                            const char *source, cv_snap **out, cv_err *e)
{
    return add_snap(r, CV_REG_DATASET, name, NULL, d, source, 0, NULL, NULL, out, e);
}

int cv_registry_put_dataset(cv_registry *r, const char *name, cv_dataset *d, const char *source,
                            int *created, cv_snap **out, cv_err *e)
{
    return add_snap(r, CV_REG_DATASET, name, NULL, d, source, 2, NULL, created, out, e);
}

void (*cv_registry_put_params_hook)(cv_registry *r, const char *name, void *arg);
void *cv_registry_put_params_hook_arg;

/* Installs m as the version after cur (add_snap with replace 1), keeping
 * cur's parameters for the cross-version instruments. */
static int add_model_version(cv_registry *r, const char *name, cv_model *m, const char *source,
                             const cv_snap *cur, cv_snap **out, cv_err *e)
{
    sweep(r);
    cv_snap *s = snap_new(CV_REG_MODEL, name, m, NULL, source, NULL);
    if (!s) {
        free_model(m);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
    }
    if (!(s->previous = blob_of(cur->model, cur->version))) {
        cv_snap_unref(s);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
    }
    s->bytes += 2 * (sizeof(cv_param_blob) + sizeof(float) * s->previous->n);
    int rc = install_snap(r, s, 1, cur, 0, NULL, out, e);
    if (rc)
        cv_snap_unref(s);
    return rc;
}

int cv_registry_put_params(cv_registry *r, const char *name, const void *buf, size_t len,
                           cv_snap **out, cv_err *e)
{
    if (out)
        *out = NULL;
    cv_snap *cur = cv_registry_get(r, CV_REG_MODEL, name, e);
    if (!cur)
        return -1;
    cv_model *m = malloc(sizeof *m);
    if (!m) {
        cv_snap_unref(cur);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
    }
    if (cv_model_clone(cur->model, m)) {
        free(m);
        cv_snap_unref(cur);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory copying model");
    }
    char source[160];
    snprintf(source, sizeof source, "%s", cur->source);
    if (cv_params_parse(m, buf, len, e)) {
        free_model(m);
        cv_snap_unref(cur);
        return -1;
    }
    /* install refuses (409) if the name was deleted and registered again
     * (maybe with another architecture) since cur was read; another PUT in
     * between is fine: same architecture, this one becomes the newer version */
    if (cv_registry_put_params_hook)
        cv_registry_put_params_hook(r, name, cv_registry_put_params_hook_arg);
    int rc = add_model_version(r, name, m, source, cur, out, e);
    cv_snap_unref(cur);
    return rc;
}

static cv_snap *get_locked(cv_registry *r, cv_reg_kind kind, const char *name, int job,
                           cv_err *e)
{
    slot *sl = name ? find_slot(r, kind, "", name) : NULL;
    if (!sl) {
        char hint[96] = "";
        if (name)
            name_hint(r, kind, name, hint, sizeof hint);
        cv_err_set(e, CV_ENOTFOUND, "not_found", kind == CV_REG_MODEL ? "model" : "dataset",
                   "%s '%s' not found%s", kind_word(kind), name ? name : "", hint);
        return NULL;
    }
    cv_snap_ref(sl->cur);
    if (job)
        sl->jobs++;
    return sl->cur;
}

cv_snap *cv_registry_get(cv_registry *r, cv_reg_kind kind, const char *name, cv_err *e)
{
    pthread_mutex_lock(&r->mu);
    cv_snap *s = get_locked(r, kind, name, 0, e);
    pthread_mutex_unlock(&r->mu);
    return s;
}

cv_snap *cv_registry_acquire(cv_registry *r, cv_reg_kind kind, const char *name, cv_err *e)
{
    pthread_mutex_lock(&r->mu);
    cv_snap *s = get_locked(r, kind, name, 1, e);
    pthread_mutex_unlock(&r->mu);
    return s;
}

void cv_registry_release(cv_registry *r, cv_snap *s)
{
    if (!s)
        return;
    pthread_mutex_lock(&r->mu);
    slot *sl = find_slot(r, s->kind, s->owner, s->name);
    if (sl && sl->jobs > 0)
        sl->jobs--;
    pthread_mutex_unlock(&r->mu);
    cv_snap_unref(s);
    sweep(r);
}

static int cmp_snap(const void *a, const void *b);
static int list_where(cv_registry *r, cv_reg_kind kind, const char *owner, cv_snap ***out);

/* Under r->mu: takes slot sl out (the caller checked its jobs); returns the
 * snapshot to unref after unlocking, or NULL if it was retired. */
static cv_snap *remove_locked(cv_registry *r, slot *sl)
{
    cv_snap *s = sl->cur;
    r->bytes -= s->bytes;
    *sl = r->slots[--r->nslots];
    return retire_locked(r, s, 0);
}

static int delete_now(cv_registry *r, cv_reg_kind kind, const char *owner, const char *name,
                      cv_err *e);

static int delete_slot(cv_registry *r, cv_reg_kind kind, const char *owner, const char *name,
                       cv_err *e)
{
    if (!r->persisting || kind == CV_REG_POSTERIOR) /* posteriors live in memory only */
        return delete_now(r, kind, owner, name, e);
    /* the file goes with the name, under the writer lock so that no install
     * of the same name writes in between */
    pthread_mutex_lock(&r->wmu);
    int rc = delete_now(r, kind, owner, name, e);
    if (rc == 0)
        rc = r->persist.remove(r->persist.arg, kind, name, e);
    pthread_mutex_unlock(&r->wmu);
    return rc;
}

/* The delete itself (takes r->mu); a model's posteriors go with it. */
static int delete_now(cv_registry *r, cv_reg_kind kind, const char *owner, const char *name,
                      cv_err *e)
{
    pthread_mutex_lock(&r->mu);
    slot *sl = find_slot(r, kind, owner, name);
    if (!sl) {
        pthread_mutex_unlock(&r->mu);
        return cv_err_set(e, CV_ENOTFOUND, "not_found", "name", "%s '%s'%s%s%s not found",
                          kind_word(kind), name, owner[0] ? " of model '" : "", owner,
                          owner[0] ? "'" : "");
    }
    if (sl->jobs > 0) {
        int n = sl->jobs;
        pthread_mutex_unlock(&r->mu);
        return cv_err_set(e, CV_ECONFLICT, "in_use", "name",
                          "%s '%s' is used by %d queued or running job%s; cancel or wait for "
                          "them, then delete", kind_word(kind), name, n, n == 1 ? "" : "s");
    }
    cv_snap *gone[64];
    int ngone = 0;
    if (kind == CV_REG_MODEL) /* its posteriors go with it (none has jobs: they hold the model) */
        for (int i = 0; i < r->nslots;) {
            if (r->slots[i].kind == CV_REG_POSTERIOR && strcmp(r->slots[i].owner, name) == 0) {
                cv_snap *g = remove_locked(r, &r->slots[i]);
                if (g && ngone < 64)
                    gone[ngone++] = g;
                else if (g)
                    cv_snap_unref(g); /* the registry's reference only: no lock needed */
                continue;
            }
            i++;
        }
    sl = find_slot(r, kind, owner, name); /* moved by the removals */
    cv_snap *s = remove_locked(r, sl);
    pthread_mutex_unlock(&r->mu);
    cv_snap_unref(s);
    for (int i = 0; i < ngone; i++)
        cv_snap_unref(gone[i]);
    return 0;
}

void cv_registry_set_persist(cv_registry *r, const cv_registry_persist *p)
{
    pthread_mutex_lock(&r->wmu);
    memset(&r->persist, 0, sizeof r->persist);
    if (p)
        r->persist = *p;
    r->persisting = p && p->prepare && p->commit && p->abort && p->remove;
    pthread_mutex_unlock(&r->wmu);
}

int cv_registry_restore(cv_registry *r, const char *name, cv_model *m, cv_dataset *d,
                        const cv_dataset_backing *b, const char *source, unsigned long version,
                        double created_at, double updated_at, cv_err *e)
{
    if (cv_name_check(name, "name", e))
        return -1;
    cv_reg_kind kind = m ? CV_REG_MODEL : CV_REG_DATASET;
    cv_snap *s = snap_new(kind, name, m, d, source, b);
    if (!s)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
    s->version = version ? version : 1;
    s->created_at = created_at;
    s->updated_at = updated_at;
    cv_err ign;
    delete_now(r, kind, "", name, &ign); /* a demo or command-line one: the state wins */
    int rc = install_snap(r, s, 0, NULL, 0, NULL, NULL, e);
    if (rc) { /* m, d and the backing go back to the caller */
        s->model = NULL;
        s->data = NULL;
        s->backing_free = NULL;
        cv_snap_unref(s);
    }
    return rc;
}

int cv_registry_delete(cv_registry *r, cv_reg_kind kind, const char *name, cv_err *e)
{
    return delete_slot(r, kind, "", name, e);
}

int cv_registry_delete_posterior(cv_registry *r, const char *model, const char *name, cv_err *e)
{
    return delete_slot(r, CV_REG_POSTERIOR, model, name, e);
}

int cv_registry_keep_posterior(cv_registry *r, const cv_snap *model, const char *name,
                               void *post, size_t bytes, void (*destroy)(void *),
                               const cv_snap *expect, cv_snap **out, cv_err *e)
{
    sweep(r);
    if (out)
        *out = NULL;
    cv_snap *s = calloc(1, sizeof *s);
    if (!s) {
        destroy(post);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
    }
    atomic_init(&s->refs, 1);
    s->kind = CV_REG_POSTERIOR;
    snprintf(s->name, sizeof s->name, "%s", name);
    snprintf(s->owner, sizeof s->owner, "%s", model->name);
    snprintf(s->source, sizeof s->source, "op laplace");
    s->owner_version = model->version;
    s->owner_lineage = model->lineage;
    s->bytes = bytes;
    s->backing = post;
    s->backing_free = destroy;
    s->version = 1;
    s->created_at = s->updated_at = cv_wall_s();
    cv_snap *old = NULL;
    int rc = 0;
    pthread_mutex_lock(&r->mu);
    slot *ms = find_slot(r, CV_REG_MODEL, "", model->name);
    slot *ps = find_slot(r, CV_REG_POSTERIOR, model->name, name);
    if (!ms || ms->cur->lineage != model->lineage)
        rc = cv_err_set(e, CV_ECONFLICT, "conflict", "model",
                        "model '%s' was deleted%s while the job ran; posterior '%s' was not "
                        "kept", model->name, ms ? " and registered again" : "", name);
    else if (expect && (!ps || ps->cur != expect))
        rc = cv_err_set(e, CV_ECONFLICT, "conflict", "options.accumulate_into",
                        "posterior '%s' of model '%s' was %s while the job ran; nothing was "
                        "kept: accumulate into the new one", name, model->name,
                        ps ? "replaced" : "deleted");
    else
        rc = install(r, s, 2, expect, 0, NULL, &old, e); /* expect: the job's own pin */
    if (!rc && out) {
        cv_snap_ref(s);
        *out = s;
    }
    pthread_mutex_unlock(&r->mu);
    cv_snap_unref(old);
    if (rc)
        cv_snap_unref(s); /* frees post */
    return rc;
}

cv_snap *cv_registry_acquire_posterior(cv_registry *r, const char *model, const char *name,
                                       const char *field, cv_err *e)
{
    pthread_mutex_lock(&r->mu);
    slot *sl = find_slot(r, CV_REG_POSTERIOR, model, name);
    if (sl) {
        cv_snap_ref(sl->cur);
        sl->jobs++;
    }
    pthread_mutex_unlock(&r->mu);
    if (!sl)
        cv_err_set(e, CV_ENOTFOUND, "not_found", field,
                   "posterior '%s' of model '%s' not found (ops laplace keep it: "
                   "options.keep; GET /v1/models/%s lists them)", name, model, model);
    return sl ? sl->cur : NULL;
}

int cv_registry_list_posteriors(cv_registry *r, const char *model, cv_snap ***out)
{
    return list_where(r, CV_REG_POSTERIOR, model, out);
}

static int cmp_snap(const void *a, const void *b)
{
    return strcmp((*(cv_snap *const *)a)->name, (*(cv_snap *const *)b)->name);
}

/* References to the current snapshots of kind (owner non-NULL: of that
 * owner's), sorted by name; the count, or -1. */
static int list_where(cv_registry *r, cv_reg_kind kind, const char *owner, cv_snap ***out)
{
    *out = NULL;
    pthread_mutex_lock(&r->mu);
    int n = 0;
    for (int i = 0; i < r->nslots; i++)
        n += r->slots[i].kind == kind && (!owner || strcmp(r->slots[i].owner, owner) == 0);
    cv_snap **v = malloc(sizeof *v * (size_t)(n ? n : 1));
    if (!v) {
        pthread_mutex_unlock(&r->mu);
        return -1;
    }
    int k = 0;
    for (int i = 0; i < r->nslots; i++)
        if (r->slots[i].kind == kind && (!owner || strcmp(r->slots[i].owner, owner) == 0)) {
            cv_snap_ref(r->slots[i].cur);
            v[k++] = r->slots[i].cur;
        }
    pthread_mutex_unlock(&r->mu);
    qsort(v, (size_t)n, sizeof *v, cmp_snap);
    *out = v;
    return n;
}

int cv_registry_list(cv_registry *r, cv_reg_kind kind, cv_snap ***out)
{
    return list_where(r, kind, NULL, out);
}

void cv_snaps_release(cv_snap **v, int n)
{
    for (int i = 0; i < n; i++)
        cv_snap_unref(v[i]);
    free(v);
}

void cv_registry_stats_get(cv_registry *r, cv_registry_stats *st)
{
    memset(st, 0, sizeof *st);
    sweep(r);
    pthread_mutex_lock(&r->mu);
    st->bytes = r->bytes;
    st->max_bytes = r->max_bytes;
    st->retired_bytes = r->retired_bytes;
    st->retired = r->nretired;
    st->staged_bytes = r->staged;
    for (int i = 0; i < r->nslots; i++) {
        if (r->slots[i].kind == CV_REG_MODEL)
            st->models++;
        else if (r->slots[i].kind == CV_REG_DATASET)
            st->datasets++;
        else
            st->posteriors++;
    }
    pthread_mutex_unlock(&r->mu);
}

/* ---- JSON descriptions ------------------------------------------------- */

static cJSON *shape_json(size_t lead, const cv_shape *s)
{
    size_t v[CV_MAX_RANK + 1];
    int n = 0;
    v[n++] = lead;
    for (int i = 0; i < s->rank && i < CV_MAX_RANK; i++)
        v[n++] = (size_t)s->dim[i];
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; a && i < n; i++) {
        cJSON *x = cJSON_CreateNumber((double)v[i]);
        if (!x || !cJSON_AddItemToArray(a, x)) {
            cJSON_Delete(x);
            cJSON_Delete(a);
            return NULL;
        }
    }
    return a;
}

static cJSON *tensors_json(const cv_tensor_info *t, int n, cJSON *arr)
{
    for (int i = 0; i < n; i++) {
        if (t[i].shared) /* listed at its first use */
            continue;
        cJSON *o = cJSON_CreateObject();
        if (!o || !cJSON_AddItemToArray(arr, o)) {
            cJSON_Delete(o);
            return NULL;
        }
        cJSON *sh = cJSON_CreateIntArray(t[i].dim, t[i].rank);
        if (!cJSON_AddStringToObject(o, "name", t[i].name) || !sh ||
            !cJSON_AddItemToObject(o, "shape", sh) ||
            !cJSON_AddNumberToObject(o, "numel", (double)t[i].numel)) {
            if (sh && !cJSON_GetObjectItemCaseSensitive(o, "shape"))
                cJSON_Delete(sh);
            return NULL;
        }
    }
    return arr;
}

static int model_json(const cv_snap *s, cJSON *o, int full)
{
    const cv_model *m = s->model;
    if (!cJSON_AddNumberToObject(o, "parameter_count", (double)m->nparams_total) ||
        !cJSON_AddNumberToObject(o, "parameter_tensors", cv_model_param_count(m)) ||
        !cJSON_AddNumberToObject(o, "layers", m->nlayers))
        return -1;
    cJSON *is = shape_json(0, &m->input_shape);
    if (!is)
        return -1;
    cJSON_DeleteItemFromArray(is, 0);
    if (!cJSON_AddItemToObject(o, "input_shape", is)) {
        cJSON_Delete(is);
        return -1;
    }
    if (!cJSON_AddNumberToObject(o, "output_dim", cv_model_output_dim(m)))
        return -1;
    if (!full)
        return 0;
    cJSON *arch = cv_arch_to_json(m);
    if (!arch || !cJSON_AddItemToObject(o, "architecture", arch)) {
        cJSON_Delete(arch);
        return -1;
    }
    cJSON *ps = cJSON_AddArrayToObject(o, "parameters");
    cJSON *bs = cJSON_AddArrayToObject(o, "buffers");
    if (!ps || !bs)
        return -1;
    for (int l = 0; l < m->nlayers; l++) {
        if (!tensors_json(m->layers[l].params, m->layers[l].nparams, ps) ||
            !tensors_json(m->layers[l].buffers, m->layers[l].nbuffers, bs))
            return -1;
    }
    return 0;
}

static int dataset_json(const cv_snap *s, cJSON *o)
{
    const cv_dataset *d = s->data;
    if (!cJSON_AddNumberToObject(o, "n", (double)d->n))
        return -1;
    cJSON *xs = shape_json(d->n, &d->x_shape);
    if (!xs || !cJSON_AddItemToObject(o, "x_shape", xs)) {
        cJSON_Delete(xs);
        return -1;
    }
    cJSON *y = cJSON_AddObjectToObject(o, "y");
    if (!y)
        return -1;
    cJSON *ys;
    if (d->y_is_index) {
        int64_t lo = 0, hi = -1;
        size_t total = d->n * cv_shape_numel(&d->y_shape); /* [N] or [N, T, ...] labels */
        for (size_t i = 0; i < total; i++) {
            if (i == 0 || d->labels[i] < lo)
                lo = d->labels[i];
            if (i == 0 || d->labels[i] > hi)
                hi = d->labels[i];
        }
        ys = shape_json(d->n, &d->y_shape);
        if (!cJSON_AddStringToObject(y, "kind", "labels") ||
            !cJSON_AddStringToObject(y, "dtype", "I64") ||
            !cJSON_AddNumberToObject(y, "min_label", (double)lo) ||
            !cJSON_AddNumberToObject(y, "max_label", (double)hi)) {
            cJSON_Delete(ys);
            return -1;
        }
    } else {
        ys = shape_json(d->n, &d->y_shape);
        if (!cJSON_AddStringToObject(y, "kind", "targets") ||
            !cJSON_AddStringToObject(y, "dtype", "F32")) {
            cJSON_Delete(ys);
            return -1;
        }
    }
    if (!ys || !cJSON_AddItemToObject(y, "shape", ys)) {
        cJSON_Delete(ys);
        return -1;
    }
    return 0;
}

cJSON *cv_snap_to_json(const cv_snap *s, int full)
{
    cJSON *o = cJSON_CreateObject();
    if (!o)
        return NULL;
    if (!cJSON_AddStringToObject(o, "name", s->name) ||
        !cJSON_AddNumberToObject(o, "version", (double)s->version) ||
        !cJSON_AddNumberToObject(o, "bytes", (double)s->bytes) ||
        (s->kind == CV_REG_DATASET &&
         (!cJSON_AddBoolToObject(o, "mapped", s->backing != NULL) ||
          (s->backing && !cJSON_AddNumberToObject(o, "mapped_bytes", (double)s->mapped_bytes)))) ||
        !cJSON_AddStringToObject(o, "source", s->source) ||
        cv_json_add_time(o, "created_at", s->created_at) ||
        cv_json_add_time(o, "updated_at", s->updated_at))
        goto fail;
    if (s->kind == CV_REG_POSTERIOR) {
        cJSON *d = cv_lap_post_json(s->backing);
        if (!d || !cJSON_AddStringToObject(o, "model", s->owner) ||
            !cJSON_AddNumberToObject(o, "model_version", (double)s->owner_version)) {
            cJSON_Delete(d);
            goto fail;
        }
        cJSON *it; /* the posterior's own fields after the envelope's */
        while ((it = d->child)) {
            cJSON_DetachItemViaPointer(d, it);
            cJSON_AddItemToObject(o, it->string, it);
        }
        cJSON_Delete(d);
        return o;
    }
    if (s->kind == CV_REG_MODEL ? model_json(s, o, full) : dataset_json(s, o))
        goto fail;
    return o;
fail:
    cJSON_Delete(o);
    return NULL;
}
