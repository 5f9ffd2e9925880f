/* opts.c - validating job options against cv_opt_spec tables and storing
 * them into an op's argument struct (see opts.h). */
#include "api/opts.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/suggest.h"

int cv_opts_choice_index(const char *choices, const char *s)
{
    size_t n = strlen(s);
    const char *p = choices;
    for (int i = 0; p && *p; i++) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == n && strncmp(p, s, n) == 0)
            return i;
        p = bar ? bar + 1 : NULL;
    }
    return -1;
}

int cv_opts_in_list(const char *list, const char *name)
{
    return cv_opts_choice_index(list, name) >= 0;
}

const char *cv_opt_type_name(cv_opt_type t)
{
    switch (t) {
    case CV_OPT_INT:
    case CV_OPT_U64: return "integer";
    case CV_OPT_NUM: return "number";
    case CV_OPT_BOOL: return "boolean";
    case CV_OPT_ENUM:
    case CV_OPT_METHOD: return "enum";
    case CV_OPT_NUM_OR_ENUM: return "number_or_enum";
    case CV_OPT_INT_OR_ENUM: return "integer_or_enum";
    case CV_OPT_LIST: return "list";
    case CV_OPT_ENUM_OR_LIST: return "enum_or_list";
    case CV_OPT_NUM_OR_LIST: return "number_or_list";
    case CV_OPT_NAME: return "name";
    case CV_OPT_BOOL_OR_NAME: return "boolean_or_name";
    case CV_OPT_ENUM_LIST: return "enum_list";
    }
    return "?";
}

/* The choices of s: "a|b|c", the op's method names for CV_OPT_METHOD. */
static const char *spec_choices(const cv_opt_spec *s, const char *const *methods, char *buf,
                                size_t len)
{
    return s->type == CV_OPT_METHOD ? cv_join_names(methods, -1, "|", "|", buf, len)
                                    : s->choices;
}

static int check_number(const cJSON *v, const cv_opt_spec *s, int integer, const char *field,
                        cv_err *e)
{
    double d = v->valuedouble;
    if (!cJSON_IsNumber(v) || !isfinite(d)) {
        char k[80];
        return cv_err_set(e, CV_EINVAL, "invalid_option", field, "%s must be %s, got %s", field,
                          integer ? "an integer" : "a number", cv_json_kind(v, k, sizeof k));
    }
    if (integer && d != floor(d))
        return cv_err_set(e, CV_EINVAL, "invalid_option", field, "%s must be an integer, got %g",
                          field, d);
    if (d < s->min || d > s->max)
        return cv_err_set(e, CV_EINVAL, "invalid_option", field,
                          "%s must be in [%g, %g], got %g", field, s->min, s->max, d);
    return 0;
}

/* "; did you mean 'b'?" for a string v close to one of choices ("a|b|c"), or "". */
static const char *choice_hint(const cJSON *v, const char *choices, char *buf, size_t len)
{
    buf[0] = 0;
    if (!cJSON_IsString(v))
        return buf;
    char copy[256];
    const char *names[32];
    int n = 0;
    snprintf(copy, sizeof copy, "%s", choices);
    for (char *save = NULL, *t = strtok_r(copy, "|", &save); t && n < 32;
         t = strtok_r(NULL, "|", &save))
        names[n++] = t;
    return cv_suggest_hint(v->valuestring, names, n, buf, len);
}

static int check_enum(const cJSON *v, const char *choices, const char *field, cv_err *e)
{
    char hint[96];
    if (!cJSON_IsString(v) || cv_opts_choice_index(choices, v->valuestring) < 0)
        return cv_err_set(e, CV_EINVAL, "invalid_option", field, "%s must be one of %s%s",
                          field, choices, choice_hint(v, choices, hint, sizeof hint));
    return 0;
}

static int check_list(const cJSON *v, const char *field, cv_err *e)
{
    if (!cJSON_IsArray(v))
        return cv_err_set(e, CV_EINVAL, "invalid_option", field, "%s must be a list of numbers",
                          field);
    int i = 0;
    const cJSON *x;
    cJSON_ArrayForEach(x, v)
    {
        if (!cJSON_IsNumber(x) || !isfinite(x->valuedouble))
            return cv_err_set(e, CV_EINVAL, "invalid_option", field,
                              "%s[%d] is not a finite number", field, i);
        i++;
    }
    return 0;
}

/* A list of names from choices; field of a bad entry: "options.NAME[i]". */
static int check_enum_list(const cJSON *v, const char *choices, const char *field, cv_err *e)
{
    if (!cJSON_IsArray(v))
        return cv_err_set(e, CV_EINVAL, "invalid_option", field,
                          "%s must be a list of names from %s", field, choices);
    int i = 0;
    const cJSON *x;
    cJSON_ArrayForEach(x, v)
    {
        char f[112];
        snprintf(f, sizeof f, "%s[%d]", field, i++);
        if (check_enum(x, choices, f, e))
            return -1;
    }
    return 0;
}

/* A number in [min, max] or a non-empty list of them. */
static int check_num_or_list(const cJSON *v, const cv_opt_spec *s, const char *field, cv_err *e)
{
    if (!cJSON_IsArray(v))
        return cJSON_IsNumber(v) ? check_number(v, s, 0, field, e)
                                 : cv_err_set(e, CV_EINVAL, "invalid_option", field,
                                              "%s must be a number or a list of numbers", field);
    if (cJSON_GetArraySize(v) == 0)
        return cv_err_set(e, CV_EINVAL, "invalid_option", field, "%s is an empty list", field);
    int i = 0;
    const cJSON *x;
    cJSON_ArrayForEach(x, v)
    {
        char f[112];
        snprintf(f, sizeof f, "%s[%d]", field, i++);
        if (check_number(x, s, 0, f, e))
            return -1;
    }
    return 0;
}

/* A name: 1 to CV_OPT_NAME_MAX characters from [A-Za-z0-9_.-] (the registry's). */
static int check_name(const cJSON *v, const char *field, int or_bool, cv_err *e)
{
    if (or_bool && cJSON_IsBool(v))
        return 0;
    size_t n = cJSON_IsString(v) ? strlen(v->valuestring) : 0;
    int ok = n >= 1 && n <= CV_OPT_NAME_MAX;
    for (size_t i = 0; ok && i < n; i++) {
        char c = v->valuestring[i];
        ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
             c == '_' || c == '.' || c == '-';
    }
    return ok ? 0
              : cv_err_set(e, CV_EINVAL, "invalid_option", field,
                           "%s must be %sa name of 1 to %d characters from [A-Za-z0-9_.-]",
                           field, or_bool ? "true, false or " : "", CV_OPT_NAME_MAX);
}

static int check_one(const cJSON *v, const cv_opt_spec *s, const char *const *methods, cv_err *e)
{
    char field[96], mbuf[256];
    snprintf(field, sizeof field, "options.%s", s->name);
    switch (s->type) {
    case CV_OPT_INT:
    case CV_OPT_U64: return check_number(v, s, 1, field, e);
    case CV_OPT_NUM: return check_number(v, s, 0, field, e);
    case CV_OPT_BOOL:
        if (!cJSON_IsBool(v))
            return cv_err_set(e, CV_EINVAL, "invalid_option", field, "%s must be true or false",
                              field);
        return 0;
    case CV_OPT_ENUM:
    case CV_OPT_METHOD: return check_enum(v, spec_choices(s, methods, mbuf, sizeof mbuf), field, e);
    case CV_OPT_NUM_OR_ENUM:
    case CV_OPT_INT_OR_ENUM:
        if (cJSON_IsString(v))
            return check_enum(v, s->choices, field, e);
        return check_number(v, s, s->type == CV_OPT_INT_OR_ENUM, field, e);
    case CV_OPT_LIST: return check_list(v, field, e);
    case CV_OPT_ENUM_OR_LIST:
        if (cJSON_IsArray(v))
            return check_list(v, field, e);
        if (!cJSON_IsString(v) || cv_opts_choice_index(s->choices, v->valuestring) < 0)
            return cv_err_set(e, CV_EINVAL, "invalid_option", field,
                              "%s must be one of %s or a list of numbers", field, s->choices);
        return 0;
    case CV_OPT_NUM_OR_LIST: return check_num_or_list(v, s, field, e);
    case CV_OPT_NAME:
    case CV_OPT_BOOL_OR_NAME: return check_name(v, field, s->type == CV_OPT_BOOL_OR_NAME, e);
    case CV_OPT_ENUM_LIST: return check_enum_list(v, s->choices, field, e);
    }
    return 0;
}

const cv_opt_spec *cv_opts_find(const cv_opt_spec *specs, const char *name)
{
    for (const cv_opt_spec *s = specs; s->name; s++)
        if (strcmp(s->name, name) == 0)
            return s;
    return NULL;
}

static int unknown_option(const char *name, const cv_opt_spec *specs, cv_err *e)
{
    char known[512], hint[96];
    const char *names[CV_OPT_MAX];
    int n = 0;
    for (const cv_opt_spec *t = specs; t->name && n < CV_OPT_MAX; t++)
        names[n++] = t->name;
    char field[96];
    snprintf(field, sizeof field, "options.%s", name);
    return cv_err_set(e, CV_EINVAL, "unknown_option", field,
                      "unknown option '%s' for this op (known: %s)%s", name,
                      n ? cv_join_names(names, n, ", ", ", ", known, sizeof known) : "none",
                      cv_suggest_hint(name, names, n, hint, sizeof hint));
}

int cv_opts_validate(const cJSON *options, const cv_opt_spec *specs,
                     const char *const *methods, cv_err *e)
{
    if (!options || cJSON_IsNull(options))
        return 0;
    if (!cJSON_IsObject(options))
        return cv_err_set(e, CV_EINVAL, "invalid_field", "options", "options must be an object");
    const cJSON *v;
    cJSON_ArrayForEach(v, options)
    {
        const cv_opt_spec *s = cv_opts_find(specs, v->string);
        if (!s)
            return unknown_option(v->string, specs, e);
        if (check_one(v, s, methods, e))
            return -1;
    }
    return 0;
}

static int store_list(const cJSON *v, cv_opt_list *l, const char *name, cv_err *e)
{
    int n = cJSON_GetArraySize(v), i = 0;
    free(l->v);
    l->v = malloc(sizeof(double) * (size_t)(n ? n : 1));
    l->n = 0;
    if (!l->v)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "options.%s", name);
    const cJSON *x;
    cJSON_ArrayForEach(x, v) l->v[i++] = x->valuedouble;
    l->n = n;
    return 0;
}

static int store_one(const cJSON *v, const cv_opt_spec *s, void *at, const char *const *methods,
                     cv_err *e)
{
    char mbuf[256];
    switch (s->type) {
    case CV_OPT_INT: *(int *)at = (int)v->valuedouble; return 0;
    case CV_OPT_U64: *(uint64_t *)at = (uint64_t)v->valuedouble; return 0;
    case CV_OPT_NUM: *(double *)at = v->valuedouble; return 0;
    case CV_OPT_BOOL: *(int *)at = cJSON_IsTrue(v); return 0;
    case CV_OPT_ENUM:
    case CV_OPT_METHOD:
        *(int *)at = cv_opts_choice_index(spec_choices(s, methods, mbuf, sizeof mbuf),
                                          v->valuestring);
        return 0;
    case CV_OPT_NUM_OR_ENUM:
    case CV_OPT_INT_OR_ENUM: {
        cv_opt_choice *c = at;
        c->choice = cJSON_IsString(v) ? cv_opts_choice_index(s->choices, v->valuestring) : -1;
        if (c->choice < 0)
            c->num = v->valuedouble;
        return 0;
    }
    case CV_OPT_LIST: return store_list(v, at, s->name, e);
    case CV_OPT_ENUM_OR_LIST: {
        cv_opt_choice_list *c = at;
        c->choice = cJSON_IsArray(v) ? -1 : cv_opts_choice_index(s->choices, v->valuestring);
        return c->choice < 0 ? store_list(v, &c->list, s->name, e) : 0;
    }
    case CV_OPT_NUM_OR_LIST: {
        cv_opt_num_list *c = at;
        c->is_list = cJSON_IsArray(v);
        if (!c->is_list)
            c->num = v->valuedouble;
        return c->is_list ? store_list(v, &c->list, s->name, e) : 0;
    }
    case CV_OPT_NAME:
    case CV_OPT_BOOL_OR_NAME: {
        cv_opt_name *c = at;
        c->on = cJSON_IsString(v) || cJSON_IsTrue(v);
        snprintf(c->s, sizeof c->s, "%s", cJSON_IsString(v) ? v->valuestring : "");
        return 0;
    }
    case CV_OPT_ENUM_LIST: {
        unsigned mask = 0;
        const cJSON *x;
        cJSON_ArrayForEach(x, v)
        {
            int i = cv_opts_choice_index(s->choices, x->valuestring);
            if (i >= 0 && i < 32)
                mask |= 1u << i;
        }
        *(unsigned *)at = mask;
        return 0;
    }
    }
    return 0;
}

int cv_opts_store(const cJSON *options, cv_opts *o, const char *const *methods, cv_err *e)
{
    o->given = 0;
    if (!options || !cJSON_IsObject(options))
        return 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, options)
    {
        const cv_opt_spec *s = cv_opts_find(o->specs, v->string);
        if (!s || cv_opts_given_at(o, s - o->specs)) /* a repeated name: the first counts */
            continue;
        if (s - o->specs >= CV_OPT_MAX) /* CV_OPT_TABLE_FITS keeps the tables below */
            return cv_err_set(e, CV_EINTERNAL, "internal", "options", "option table too long");
        o->given |= 1ull << (s - o->specs);
        if (store_one(v, s, (char *)o->args + s->offset, methods, e))
            return -1;
    }
    return 0;
}

void cv_opts_release(cv_opts *o)
{
    if (!o->args)
        return;
    for (const cv_opt_spec *s = o->specs; s->name; s++) {
        char *at = (char *)o->args + s->offset;
        cv_opt_list *l = s->type == CV_OPT_LIST           ? (cv_opt_list *)at
                         : s->type == CV_OPT_ENUM_OR_LIST ? &((cv_opt_choice_list *)at)->list
                         : s->type == CV_OPT_NUM_OR_LIST  ? &((cv_opt_num_list *)at)->list
                                                          : NULL;
        if (l) {
            free(l->v);
            l->v = NULL;
            l->n = 0;
        }
    }
}

int cv_opts_given(const cv_opts *o, const char *name)
{
    const cv_opt_spec *s = cv_opts_find(o->specs, name);
    return s && cv_opts_given_at(o, s - o->specs);
}

int cv_opts_given_at(const cv_opts *o, long i)
{
    return i >= 0 && i < CV_OPT_MAX && (o->given >> i & 1);
}
