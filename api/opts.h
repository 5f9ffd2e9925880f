/* opts.h - a job's "options" object against an op's option table.
 *
 * Each op lists its options as a cv_opt_spec table.  An entry names the
 * option, its type and range, where its value goes in the op's argument
 * struct (offsetof: an engine option struct embedded there, or a field of
 * the op's own) and, for method-specific options, the methods it applies
 * to.  cv_opts_validate rejects unknown names (with a "did you mean" hint),
 * wrong types and out-of-range values with field "options.NAME";
 * cv_opts_store then writes the values into the argument struct.
 *
 * Storage at spec->offset, by type:
 *   CV_OPT_INT, CV_OPT_BOOL, CV_OPT_ENUM, CV_OPT_METHOD: int (an enum field
 *     takes the index of the choice, so choices list the engine enum's names
 *     in its order); CV_OPT_U64: uint64_t; CV_OPT_NUM: double;
 *   CV_OPT_NUM_OR_ENUM, CV_OPT_INT_OR_ENUM: cv_opt_choice;
 *   CV_OPT_LIST: cv_opt_list (malloc()ed; cv_opts_release frees it);
 *   CV_OPT_ENUM_OR_LIST: cv_opt_choice_list (its list likewise);
 *   CV_OPT_NUM_OR_LIST: cv_opt_num_list (its list likewise);
 *   CV_OPT_NAME, CV_OPT_BOOL_OR_NAME: cv_opt_name.
 *   CV_OPT_ENUM_LIST: unsigned (bit i: choice i was listed).
 */
#ifndef CV_OPTS_H
#define CV_OPTS_H

#include <cJSON.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"

typedef enum {
    CV_OPT_INT,        /* integer in [min, max] */
    CV_OPT_U64,        /* integer in [min, max], up to 2^53 */
    CV_OPT_NUM,        /* finite number in [min, max] */
    CV_OPT_BOOL,
    CV_OPT_ENUM,       /* one of choices ("a|b|c") */
    CV_OPT_METHOD,     /* one of the op's method names (the op's method table) */
    CV_OPT_NUM_OR_ENUM,/* a number in [min, max] or one of choices */
    CV_OPT_INT_OR_ENUM,/* an integer in [min, max] or one of choices */
    CV_OPT_LIST,       /* array of finite numbers */
    CV_OPT_ENUM_OR_LIST,/* one of choices or an array of finite numbers; a list
                          is a vector over the job's block: api/job.c checks at
                          bind that there is one block and the list has its D */
    CV_OPT_NUM_OR_LIST,/* a number in [min, max] or a non-empty array of them (its
                          length is the op's to check) */
    CV_OPT_NAME,       /* a name of something kept by the service: 1 to
                          CV_OPT_NAME_MAX characters from [A-Za-z0-9_.-] */
    CV_OPT_BOOL_OR_NAME,/* true, false or such a name */
    CV_OPT_ENUM_LIST   /* an array of choices (at most 32; repeats allowed) */
} cv_opt_type;

#define CV_OPT_NAME_MAX 64

/* A name value: on 0 (false, or not given), or on 1 with s the name (""
 * for true). */
typedef struct {
    int on;
    char s[CV_OPT_NAME_MAX + 1];
} cv_opt_name;

typedef struct {
    const char *name;
    cv_opt_type type;
    double min, max;
    const char *choices;   /* "a|b|c" for the enum types */
    size_t offset;         /* of the value in the op's argument struct */
    const char *methods;   /* "a|b": the methods it applies to; NULL: every method */
} cv_opt_spec;

/* A number-or-choice value: choice is the index in choices, or -1 for a number. */
typedef struct {
    double num;
    int choice;
} cv_opt_choice;

typedef struct {
    double *v;
    int n;
} cv_opt_list;

/* A choice-or-list value: choice is the index in choices, or -1 for the list. */
typedef struct {
    int choice;
    cv_opt_list list;
} cv_opt_choice_list;

/* A number-or-list value: is_list 0: num; 1: list. */
typedef struct {
    double num;
    int is_list;
    cv_opt_list list;
} cv_opt_num_list;

/* Parsed options: the op's argument struct and which options were given. */
typedef struct {
    void *args;
    const cv_opt_spec *specs;
    uint64_t given;        /* bit i: specs[i] was given */
} cv_opts;

#define CV_OPT_MAX 64      /* entries per table (bits of cv_opts.given) */

/* Compile-time guard, after each option table t (an array ending with
 * {NULL}): at most CV_OPT_MAX options.  cv_opts_store refuses an entry
 * beyond it (internal error) in any case. */
#define CV_OPT_TABLE_FITS(t)                                                                \
    _Static_assert(sizeof(t) / sizeof((t)[0]) <= CV_OPT_MAX + 1,                           \
                   #t " has more than CV_OPT_MAX options")

/* Type and range check of every entry of options (NULL: none), in document
 * order.  specs ends with {NULL}; methods (NULL-terminated) are the names a
 * CV_OPT_METHOD option may take. */
int cv_opts_validate(const cJSON *options, const cv_opt_spec *specs,
                     const char *const *methods, cv_err *e);

/* Writes the validated options into o->args and sets o->given (o->args and
 * o->specs are the caller's).  -1 (ENOMEM in e) when a list cannot be copied. */
int cv_opts_store(const cJSON *options, cv_opts *o, const char *const *methods, cv_err *e);

/* Frees the lists held in o->args. */
void cv_opts_release(cv_opts *o);

/* The entry named name, or NULL; whether it was given; whether o->specs[i]
 * was given (0 for i >= CV_OPT_MAX). */
const cv_opt_spec *cv_opts_find(const cv_opt_spec *specs, const char *name);
int cv_opts_given(const cv_opts *o, const char *name);
int cv_opts_given_at(const cv_opts *o, long i);

/* Index of s in choices ("a|b|c"), or -1. */
int cv_opts_choice_index(const char *choices, const char *s);

/* A method-list string ("a|b") contains name. */
int cv_opts_in_list(const char *list, const char *name);

/* The type's name in GET /v1/ops: "integer", "number", "boolean", "enum",
 * "number_or_enum", "integer_or_enum", "list", "enum_or_list", "number_or_list", "name",
 * "boolean_or_name" or "enum_list". */
const char *cv_opt_type_name(cv_opt_type t);

#endif
