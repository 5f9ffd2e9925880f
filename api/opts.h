/* opts.h - declarative validation of a job's "options" object.
 *
 * Each op lists its options as a cv_opt_spec table; cv_opts_validate rejects
 * unknown names, wrong types and out-of-range values with field
 * "options.NAME".  The getters read an already validated object.
 */
#ifndef CV_OPTS_H
#define CV_OPTS_H

#include <cJSON.h>

#include "engine/err.h"

typedef enum {
    CV_OPT_INT,        /* integer in [min, max] */
    CV_OPT_NUM,        /* finite number in [min, max] */
    CV_OPT_BOOL,
    CV_OPT_ENUM,       /* one of choices ("a|b|c") */
    CV_OPT_NUM_OR_ENUM,/* a number in [min, max] or one of choices */
    CV_OPT_INT_OR_ENUM,/* an integer in [min, max] or one of choices */
    CV_OPT_LIST        /* array of finite numbers */
} cv_opt_type;

typedef struct {
    const char *name;
    cv_opt_type type;
    double min, max;
    const char *choices;
} cv_opt_spec;

/* options may be NULL (no options).  specs ends with {NULL}. */
int cv_opts_validate(const cJSON *options, const cv_opt_spec *specs, cv_err *e);

int cv_opt_int(const cJSON *options, const char *name, int def);
double cv_opt_num(const cJSON *options, const char *name, double def);
int cv_opt_bool(const cJSON *options, const char *name, int def);
/* String value, or def when absent or not a string. */
const char *cv_opt_str(const cJSON *options, const char *name, const char *def);
const cJSON *cv_opt_get(const cJSON *options, const char *name);

/* Copies a JSON number array of exactly n entries into out (fills e). */
int cv_json_to_doubles(const cJSON *arr, size_t n, double *out, const char *field, cv_err *e);

#endif
