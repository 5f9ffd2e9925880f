/* ops_table.c - the op registry (one line per op), the job status names,
 * and the GET /v1/ops document built from the op, curvature and status
 * tables (ops, curvatures, statuses, op_specs: options and results). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/job.h"
#include "api/ops.h"
#include "api/ops_table.h"
#include "engine/names.h"

static const cv_op_def *const op_table[] = {
    &cv_op_loss,  &cv_op_gradient, &cv_op_matvec,  &cv_op_dense, &cv_op_per_sample,
    &cv_op_trace, &cv_op_diag,     &cv_op_eigen,   &cv_op_density,
    &cv_op_solve, &cv_op_newton,   &cv_op_snr,     &cv_op_kfac, &cv_op_frobenius,
    &cv_op_jvp,   &cv_op_vjp,      &cv_op_jacobian, &cv_op_laplace, &cv_op_predict,
    &cv_op_instruments, NULL};

#define NOPS ((int)(sizeof op_table / sizeof op_table[0]) - 1)

int cv_op_count(void) { return NOPS; }

const cv_op_def *cv_op_at(int i) { return i >= 0 && i < NOPS ? op_table[i] : NULL; }

const cv_op_def *cv_op_find(const char *name)
{
    for (int i = 0; op_table[i]; i++)
        if (strcmp(op_table[i]->name, name) == 0)
            return op_table[i];
    return NULL;
}

int cv_op_method_count(const cv_op_def *def)
{
    int n = 0;
    while (def->methods && def->methods[n])
        n++;
    return n;
}

int cv_op_method_index(const cv_op_def *def, const char *name)
{
    for (int i = 0; def->methods && def->methods[i]; i++)
        if (strcmp(def->methods[i]->name, name) == 0)
            return i;
    return -1;
}

int cv_op_method_names(const cv_op_def *def, const char **names, int max)
{
    int n = 0;
    for (; def->methods && def->methods[n] && n < max - 1; n++)
        names[n] = def->methods[n]->name;
    if (max > 0)
        names[n] = NULL;
    return n;
}

/* ---- job statuses ---------------------------------------------------------- */

#define CV_STATUS_NAME_(id, name) [id] = name,
static const char *const status_names[CV_JOB_NSTATUS] = {CV_JOB_STATUSES(CV_STATUS_NAME_)};
#undef CV_STATUS_NAME_

const char *cv_job_status_name(cv_job_status s)
{
    return cv_name_or(status_names, CV_JOB_NSTATUS, (int)s, "unknown");
}

int cv_job_status_from_name(const char *s) { return cv_name_index(s, status_names, CV_JOB_NSTATUS); }

/* ---- GET /v1/ops ----------------------------------------------------------- */

/* A JSON list of the "a|b|c" names, or of names (NULL-terminated). */
static cJSON *bar_list(const char *bars)
{
    cJSON *a = cJSON_CreateArray();
    const char *p = bars;
    while (a && p && *p) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        char buf[64];
        snprintf(buf, sizeof buf, "%.*s", (int)len, p);
        if (!cJSON_AddItemToArray(a, cJSON_CreateString(buf))) {
            cJSON_Delete(a);
            return NULL;
        }
        p = bar ? bar + 1 : NULL;
    }
    return a;
}

static cJSON *names_list(const char *const *names, int n)
{
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; a && (n < 0 ? names[i] != NULL : i < n); i++)
        if (!cJSON_AddItemToArray(a, cJSON_CreateString(names[i]))) {
            cJSON_Delete(a);
            return NULL;
        }
    return a;
}

static int has_range(cv_opt_type t)
{
    return t == CV_OPT_INT || t == CV_OPT_U64 || t == CV_OPT_NUM || t == CV_OPT_NUM_OR_ENUM ||
           t == CV_OPT_INT_OR_ENUM || t == CV_OPT_NUM_OR_LIST;
}

static cJSON *option_json(const cv_op_def *def, const cv_opt_spec *s)
{
    cJSON *o = cJSON_CreateObject();
    int ok = o && cJSON_AddStringToObject(o, "name", s->name) &&
             cJSON_AddStringToObject(o, "type", cv_opt_type_name(s->type));
    if (ok && has_range(s->type))
        ok = cJSON_AddNumberToObject(o, "min", s->min) && cJSON_AddNumberToObject(o, "max", s->max);
    cJSON *ch = NULL;
    if (ok && s->type == CV_OPT_METHOD) {
        const char *names[16];
        int n = cv_op_method_names(def, names, 16);
        ok = (ch = names_list(names, n)) != NULL;
    } else if (ok && s->choices) {
        ok = (ch = bar_list(s->choices)) != NULL;
    }
    if (ch && !cJSON_AddItemToObject(o, "choices", ch)) {
        cJSON_Delete(ch);
        ok = 0;
    }
    cJSON *ms = NULL;
    if (ok && s->methods && !((ms = bar_list(s->methods)) && cJSON_AddItemToObject(o, "methods", ms))) {
        cJSON_Delete(ms);
        ok = 0;
    }
    if (!ok) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

static cJSON *op_spec_json(const cv_op_def *def)
{
    cJSON *o = cJSON_CreateObject(), *opts = NULL, *res = NULL;
    int ok = o && cJSON_AddBoolToObject(o, "uses_curvature", def->uses_curvature) &&
             cJSON_AddBoolToObject(o, "blockwise", def->blockwise);
    if (ok && def->methods) {
        const char *names[16];
        int n = cv_op_method_names(def, names, 16);
        cJSON *m = names_list(names, n);
        ok = m && cJSON_AddItemToObject(o, "methods", m);
        if (!ok)
            cJSON_Delete(m);
    }
    ok = ok && (opts = cJSON_AddArrayToObject(o, "options")) != NULL;
    for (const cv_opt_spec *s = def->options; ok && s->name; s++) {
        cJSON *x = option_json(def, s);
        ok = x && cJSON_AddItemToArray(opts, x);
        if (!ok)
            cJSON_Delete(x);
    }
    if (ok && (res = names_list(def->results, -1)) && !cJSON_AddItemToObject(o, "results", res)) {
        cJSON_Delete(res);
        res = NULL;
    }
    if (!ok || !res) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

cJSON *cv_ops_describe(void)
{
    const char *curv[CV_CURV_COUNT], *st[CV_JOB_NSTATUS];
    for (int i = 0; i < CV_CURV_COUNT; i++)
        curv[i] = cv_curvature_name((cv_curvature)i);
    for (int i = 0; i < CV_JOB_NSTATUS; i++)
        st[i] = cv_job_status_name((cv_job_status)i);
    cJSON *root = cJSON_CreateObject(), *specs = NULL;
    const char *ops[sizeof op_table / sizeof op_table[0]];
    for (int i = 0; i < NOPS; i++)
        ops[i] = op_table[i]->name;
    cJSON *lists[3] = {names_list(ops, NOPS), names_list(curv, CV_CURV_COUNT),
                       names_list(st, CV_JOB_NSTATUS)};
    static const char *const keys[3] = {"ops", "curvatures", "statuses"};
    int ok = root != NULL;
    for (int i = 0; i < 3; i++) {
        if (ok && lists[i] && cJSON_AddItemToObject(root, keys[i], lists[i]))
            continue;
        cJSON_Delete(lists[i]);
        ok = 0;
    }
    ok = ok && (specs = cJSON_AddObjectToObject(root, "op_specs")) != NULL;
    for (int i = 0; ok && op_table[i]; i++) {
        cJSON *s = op_spec_json(op_table[i]);
        ok = s && cJSON_AddItemToObject(specs, op_table[i]->name, s);
        if (!ok)
            cJSON_Delete(s);
    }
    if (!ok) {
        cJSON_Delete(root);
        return NULL;
    }
    return root;
}
