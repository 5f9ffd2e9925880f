/* cli.h - the curvd command line: one flag table per subcommand (`curvd
 * serve`, `curvd run`) that both parses the arguments and prints the usage
 * text, so a flag, its default and its help cannot drift apart.  main.c
 * runs the subcommands.
 *
 * A flag's value lands at an offset in the subcommand's argument struct
 * (cv_serve_args, cv_run_args); numbers are parsed with cv_parse_size /
 * cv_parse_double (K/M/G suffixes) and checked against [lo, hi].  The
 * default shown in `curvd --help` is formatted from the defaults that parsing
 * starts from (cv_serve_config_default), unless a flag gives its own text.
 */
#ifndef CV_CLI_H
#define CV_CLI_H

#include <stddef.h>
#include <stdio.h>

#include "engine/err.h"
#include "server/serve.h"

typedef enum {
    CV_FLAG_SWITCH,  /* no value: stores ival into an int */
    CV_FLAG_INT,     /* int */
    CV_FLAG_UINT,    /* unsigned */
    CV_FLAG_COUNT,   /* size_t */
    CV_FLAG_BYTES,   /* size_t, default shown with a K/M/G suffix */
    CV_FLAG_SECONDS, /* double */
    CV_FLAG_STRING,  /* const char *: the argument itself */
    CV_FLAG_CALL     /* fn(args, value) parses it */
} cv_flag_kind;

typedef struct {
    const char *name;  /* "--port" */
    const char *arg;   /* what the value is ("N", "BYTES"); NULL for a switch */
    cv_flag_kind kind;
    size_t off;        /* of the value in the argument struct */
    double lo, hi;     /* numbers: the accepted range */
    int ival;          /* CV_FLAG_SWITCH: the value stored */
    int required;      /* `curvd run`: must be given */
    /* CV_FLAG_CALL: NULL, or a printf format taking the value (the message
     * of a usage error). */
    const char *(*fn)(void *args, const char *value);
    const char *dflt;  /* default shown in brackets; NULL: formatted from the
                        * parsed defaults; "": none */
    const char *help;  /* lines separated by '\n' ("" in the run table) */
} cv_flag;

/* The tables, each ended by an entry with name NULL. */
extern const cv_flag cv_serve_flags[];
extern const cv_flag cv_run_flags[];

/* Writes the whole `curvd --help` text. */
void cv_usage(FILE *f);

/* `curvd serve` arguments: the daemon's configuration and the --model and
 * --dataset files it names. */
typedef struct {
    cv_serve_config cfg;
    cv_model_spec *models;      /* cfg.models, room for every argument */
    cv_dataset_spec *datasets;  /* cfg.datasets */
} cv_serve_args;

/* Parses the arguments after "serve" into a->cfg (defaults first).  Returns
 * -1 when the daemon should run, else the exit status: 0 after --help (usage
 * on stdout), 2 after a usage error, 1 out of memory (both explained on
 * stderr).  Call cv_serve_args_free() in every case. */
int cv_serve_args_parse(cv_serve_args *a, int argc, char **argv);
void cv_serve_args_free(cv_serve_args *a);

/* `curvd run` arguments; dense_max and blas_threads are 0 unless given,
 * job_memory 2 GiB (0: no limit). */
typedef struct {
    const char *arch, *params, *data, *job, *vectors_out;
    int blas_threads;
    size_t dense_max;
    size_t job_memory;
    double rank_timeout;      /* under mpirun: longest wait for another rank, s (0: none) */
} cv_run_args;


/* Parses the arguments after "run".  Returns 0, or -1 with e filled (code
 * "usage", field the argument at fault). */
int cv_run_args_parse(cv_run_args *a, int argc, char **argv, cv_err *e);

#endif
