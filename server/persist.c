/* persist.c - models and datasets in the state directory: the registry's
 * write hooks and the start-up load (see persist.h). */
#include "server/persist.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/arch.h"
#include "api/datafile.h"
#include "api/params.h"
#include "server/datadir.h"

static cv_state_kind state_kind(cv_reg_kind k)
{
    return k == CV_REG_MODEL ? CV_STATE_MODEL : CV_STATE_DATASET;
}

/* ---- writing ----------------------------------------------------------------- */

static cJSON *snap_meta(const cv_snap *s)
{
    cJSON *o = cJSON_CreateObject();
    if (!o || !cJSON_AddStringToObject(o, "name", s->name) ||
        !cJSON_AddNumberToObject(o, "version", (double)s->version) ||
        !cJSON_AddNumberToObject(o, "created_at", s->created_at) ||
        !cJSON_AddNumberToObject(o, "updated_at", s->updated_at) ||
        !cJSON_AddStringToObject(o, "source", s->source))
        goto fail;
    if (s->kind == CV_REG_MODEL) {
        cJSON *arch = cv_arch_to_json(s->model);
        if (!arch || !cJSON_AddItemToObject(o, "architecture", arch)) {
            cJSON_Delete(arch);
            goto fail;
        }
    } else if (s->data_file[0] && !cJSON_AddStringToObject(o, "data_file", s->data_file)) {
        goto fail;
    }
    return o;
fail:
    cJSON_Delete(o);
    return NULL;
}

static int prepare(void *arg, const cv_snap *s, void **tx, cv_err *e)
{
    cv_state *st = arg;
    cJSON *meta = snap_meta(s);
    char *text = meta ? cJSON_PrintUnformatted(meta) : NULL;
    cJSON_Delete(meta);
    if (!text)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
    void *blob = NULL;
    size_t blen = 0;
    int rc = 0;
    if (s->kind == CV_REG_MODEL)
        rc = cv_params_export(s->model, &blob, &blen, e);
    else if (!s->data_file[0])
        rc = cv_datafile_export(s->data, &blob, &blen, e);
    if (rc == 0)
        rc = cv_state_prepare(st, state_kind(s->kind), s->name, text, strlen(text), blob, blen,
                              (cv_state_tx **)tx, e);
    free(blob);
    free(text);
    return rc;
}

static int commit(void *arg, void *tx, cv_err *e) { return cv_state_commit(tx, e); }
static void abort_tx(void *arg, void *tx) { cv_state_abort(tx); }

static int remove_rec(void *arg, cv_reg_kind kind, const char *name, cv_err *e)
{
    return cv_state_remove(arg, state_kind(kind), name, e);
}

/* ---- loading ----------------------------------------------------------------- */

typedef struct {
    cv_state *st;
    cv_registry *reg;
    const char *data_dir;
    cv_reg_kind kind;
} load_ctx;

/* The common meta fields; -1 with why filled. */
static int read_meta(const cJSON *o, const char *file_name, const char **name,
                     unsigned long *version, double *created, double *updated,
                     const char **source, char *why, size_t wl)
{
    const cJSON *n = cJSON_GetObjectItemCaseSensitive(o, "name");
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, "version");
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(o, "created_at");
    const cJSON *u = cJSON_GetObjectItemCaseSensitive(o, "updated_at");
    const cJSON *s = cJSON_GetObjectItemCaseSensitive(o, "source");
    if (!cJSON_IsString(n) || !cJSON_IsNumber(v) || !cJSON_IsNumber(c) || !cJSON_IsNumber(u) ||
        !cJSON_IsString(s) || v->valuedouble < 1 || v->valuedouble > 9e15 ||
        v->valuedouble != floor(v->valuedouble)) {
        snprintf(why, wl, "meta lacks name, version, created_at, updated_at or source");
        return -1;
    }
    if (strcmp(n->valuestring, file_name) != 0 || !cv_name_valid(n->valuestring)) {
        snprintf(why, wl, "the record names '%.64s', not the file's name", n->valuestring);
        return -1;
    }
    *name = n->valuestring;
    *version = (unsigned long)v->valuedouble;
    *created = c->valuedouble;
    *updated = u->valuedouble;
    *source = s->valuestring;
    return 0;
}

static int load_model(load_ctx *L, const cJSON *o, const char *file_name,
                      const cv_state_rec *rec, char *why, size_t wl)
{
    const char *name, *source;
    unsigned long version;
    double created, updated;
    if (read_meta(o, file_name, &name, &version, &created, &updated, &source, why, wl))
        return -1;
    const cJSON *arch = cJSON_GetObjectItemCaseSensitive(o, "architecture");
    cv_model *m = calloc(1, sizeof *m);
    if (!m) {
        snprintf(why, wl, "out of memory");
        return 1;
    }
    cv_err e;
    cv_err_clear(&e);
    if (!cJSON_IsObject(arch) || cv_arch_from_json(arch, "architecture", m, &e) ||
        cv_params_parse(m, rec->blob, rec->blob_len, &e)) {
        snprintf(why, wl, "the model does not load: %s", arch ? e.message : "no architecture");
        cv_model_free(m);
        free(m);
        return -1;
    }
    size_t np = m->nparams_total;
    if (cv_registry_restore(L->reg, name, m, NULL, NULL, source, version, created, updated,
                            &e)) {
        fprintf(cv_state_log(L->st), "curvd: state: model %s version %lu not registered: %s "
                                     "(its file is kept)\n", name, version, e.message);
        cv_model_free(m);
        free(m);
        return 1;
    }
    fprintf(cv_state_log(L->st), "curvd: state: model %s version %lu (%zu parameters)\n", name,
            version, np);
    return 0;
}

static int load_dataset(load_ctx *L, const cJSON *o, const char *file_name,
                        const cv_state_rec *rec, char *why, size_t wl)
{
    const char *name, *source;
    unsigned long version;
    double created, updated;
    if (read_meta(o, file_name, &name, &version, &created, &updated, &source, why, wl))
        return -1;
    const cJSON *df = cJSON_GetObjectItemCaseSensitive(o, "data_file");
    cv_dataset *d = calloc(1, sizeof *d);
    if (!d) {
        snprintf(why, wl, "out of memory");
        return 1;
    }
    cv_err e;
    cv_err_clear(&e);
    cv_dataset_backing b = {0};
    cv_mapped *map = NULL;
    if (cJSON_IsString(df)) {
        /* a --data-dir file: mapped again, as POST /v1/datasets/{name} did */
        size_t heap = 0, mapped = 0;
        cv_registry_stats rs;
        cv_registry_stats_get(L->reg, &rs);
        size_t used = rs.bytes + rs.staged_bytes + rs.retired_bytes;
        if (!L->data_dir ||
            cv_datadir_map(L->data_dir, df->valuestring, used < rs.max_bytes ? rs.max_bytes - used : 0,
                           1, d, &map, &heap, &mapped, &e)) {
            fprintf(cv_state_log(L->st), "curvd: state: dataset %s version %lu (--data-dir file "
                                         "%s) not registered: %s (its record is kept)\n", name,
                    version, df->valuestring, L->data_dir ? e.message : "no --data-dir given");
            free(d);
            return 1;
        }
        b = (cv_dataset_backing){.bytes = heap, .mapped_bytes = mapped, .backing = map,
                                 .backing_free = cv_mapped_free, .data_file = df->valuestring};
    } else if (cv_datafile_parse(rec->blob, rec->blob_len, d, &e)) {
        snprintf(why, wl, "the dataset does not load: %s", e.message);
        free(d);
        return -1;
    }
    size_t n = d->n;
    if (cv_registry_restore(L->reg, name, NULL, d, map ? &b : NULL, source, version, created,
                            updated, &e)) {
        fprintf(cv_state_log(L->st), "curvd: state: dataset %s version %lu not registered: %s "
                                     "(its file is kept)\n", name, version, e.message);
        cv_dataset_free(d);
        free(d);
        cv_mapped_free(map);
        return 1;
    }
    fprintf(cv_state_log(L->st), "curvd: state: dataset %s version %lu (%zu samples%s)\n", name,
            version, n, map ? ", mapped from --data-dir" : "");
    return 0;
}

static int load_one(void *arg, const char *file_name, const cv_state_rec *rec, char *why,
                    size_t wl)
{
    load_ctx *L = arg;
    cJSON *o = cJSON_ParseWithLength(rec->meta, rec->meta_len);
    if (!cJSON_IsObject(o)) {
        cJSON_Delete(o);
        snprintf(why, wl, "the meta is not a JSON object");
        return -1;
    }
    int rc = L->kind == CV_REG_MODEL ? load_model(L, o, file_name, rec, why, wl)
                                     : load_dataset(L, o, file_name, rec, why, wl);
    cJSON_Delete(o);
    return rc;
}

int cv_persist_attach(cv_state *st, cv_registry *reg, const char *data_dir)
{
    load_ctx L = {st, reg, data_dir, CV_REG_MODEL};
    int n = cv_state_scan(st, CV_STATE_MODEL, load_one, &L);
    L.kind = CV_REG_DATASET;
    n += cv_state_scan(st, CV_STATE_DATASET, load_one, &L);
    cv_registry_persist p = {prepare, commit, abort_tx, remove_rec, st};
    cv_registry_set_persist(reg, &p);
    fflush(cv_state_log(st));
    return n;
}
