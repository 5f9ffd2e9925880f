/* opts.c - validating and reading job options against cv_opt_spec tables. */
#include "opts.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static int in_choices(const char *choices, const char *s)
{
    size_t n = strlen(s);
    const char *p = choices;
    while (p && *p) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == n && strncmp(p, s, n) == 0)
            return 1;
        p = bar ? bar + 1 : NULL;
    }
    return 0;
}

static int check_number(const cJSON *v, const cv_opt_spec *s, int integer, const char *field,
                        cv_err *e)
{
    double d = v->valuedouble;
    if (!cJSON_IsNumber(v) || !isfinite(d))
        return cv_err_set(e, CV_EINVAL, "invalid_option", field, "%s must be a %s", field,
                          integer ? "integer" : "number");
    if (integer && d != floor(d))
        return cv_err_set(e, CV_EINVAL, "invalid_option", field, "%s must be an integer, got %g",
                          field, d);
    if (d < s->min || d > s->max)
        return cv_err_set(e, CV_EINVAL, "invalid_option", field,
                          "%s must be in [%g, %g], got %g", field, s->min, s->max, d);
    return 0;
}

static int check_enum(const cJSON *v, const cv_opt_spec *s, const char *field, cv_err *e)
{
    if (!cJSON_IsString(v) || !in_choices(s->choices, v->valuestring))
        return cv_err_set(e, CV_EINVAL, "invalid_option", field, "%s must be one of %s", field,
                          s->choices);
    return 0;
}

static int check_one(const cJSON *v, const cv_opt_spec *s, cv_err *e)
{
    char field[96];
    snprintf(field, sizeof field, "options.%s", s->name);
    switch (s->type) {
    case CV_OPT_INT: return check_number(v, s, 1, field, e);
    case CV_OPT_NUM: return check_number(v, s, 0, field, e);
    case CV_OPT_BOOL:
        if (!cJSON_IsBool(v))
            return cv_err_set(e, CV_EINVAL, "invalid_option", field, "%s must be true or false",
                              field);
        return 0;
    case CV_OPT_ENUM: return check_enum(v, s, field, e);
    case CV_OPT_NUM_OR_ENUM:
    case CV_OPT_INT_OR_ENUM:
        if (cJSON_IsString(v))
            return check_enum(v, s, field, e);
        return check_number(v, s, s->type == CV_OPT_INT_OR_ENUM, field, e);
    case CV_OPT_LIST: {
        if (!cJSON_IsArray(v))
            return cv_err_set(e, CV_EINVAL, "invalid_option", field,
                              "%s must be a list of numbers", field);
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
    }
    return 0;
}

int cv_opts_validate(const cJSON *options, const cv_opt_spec *specs, cv_err *e)
{
    if (!options || cJSON_IsNull(options))
        return 0;
    if (!cJSON_IsObject(options))
        return cv_err_set(e, CV_EINVAL, "invalid_field", "options", "options must be an object");
    const cJSON *v;
    cJSON_ArrayForEach(v, options)
    {
        const cv_opt_spec *s = specs;
        while (s->name && strcmp(s->name, v->string) != 0)
            s++;
        if (!s->name) {
            char known[512] = "";
            size_t used = 0;
            for (const cv_opt_spec *t = specs; t->name && used < sizeof known; t++)
                used += (size_t)snprintf(known + used, sizeof known - used, "%s%s",
                                         used ? ", " : "", t->name);
            char field[96];
            snprintf(field, sizeof field, "options.%s", v->string);
            return cv_err_set(e, CV_EINVAL, "unknown_option", field,
                              "unknown option '%s' for this op (known: %s)", v->string,
                              used ? known : "none");
        }
        if (check_one(v, s, e))
            return -1;
    }
    return 0;
}

const cJSON *cv_opt_get(const cJSON *options, const char *name)
{
    if (!options || !cJSON_IsObject(options))
        return NULL;
    return cJSON_GetObjectItemCaseSensitive(options, name);
}

int cv_opt_int(const cJSON *options, const char *name, int def)
{
    const cJSON *v = cv_opt_get(options, name);
    return cJSON_IsNumber(v) ? (int)v->valuedouble : def;
}

double cv_opt_num(const cJSON *options, const char *name, double def)
{
    const cJSON *v = cv_opt_get(options, name);
    return cJSON_IsNumber(v) ? v->valuedouble : def;
}

int cv_opt_bool(const cJSON *options, const char *name, int def)
{
    const cJSON *v = cv_opt_get(options, name);
    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : def;
}

const char *cv_opt_str(const cJSON *options, const char *name, const char *def)
{
    const cJSON *v = cv_opt_get(options, name);
    return cJSON_IsString(v) ? v->valuestring : def;
}

int cv_json_to_doubles(const cJSON *arr, size_t n, double *out, const char *field, cv_err *e)
{
    if (!cJSON_IsArray(arr))
        return cv_err_set(e, CV_EINVAL, "invalid_vector", field, "%s must be a list", field);
    size_t len = (size_t)cJSON_GetArraySize(arr);
    if (len != n)
        return cv_err_set(e, CV_EINVAL, "invalid_vector", field,
                          "%s has %zu entries, the block has dimension %zu", field, len, n);
    size_t i = 0;
    const cJSON *x;
    cJSON_ArrayForEach(x, arr)
    {
        if (!cJSON_IsNumber(x) || !isfinite(x->valuedouble))
            return cv_err_set(e, CV_EINVAL, "invalid_vector", field,
                              "%s[%zu] is not a finite number", field, i);
        out[i++] = x->valuedouble;
    }
    return 0;
}
