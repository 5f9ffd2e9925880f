/* main.c - the curvd command line (docs/interface.md): `curvd serve` (the
 * daemon, see serve.h), `curvd run` (one job in-process: result JSON on
 * stdout, or a JSON error on stderr and a non-zero exit; under mpirun,
 * data-parallel over the ranks, rank 0 printing), `curvd routes` (the
 * HTTP route table, for tests), --help, --version.  The flags and the usage
 * text are the tables of cli.c. */
#include <cJSON.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/vectors_out.h"
#include "api/arch.h"
#include "api/datafile.h"
#include "api/job.h"
#include "api/json_strict.h"
#include "api/params.h"
#include "server/cli.h"
#include "server/cluster.h"
#include "server/datadir.h"
#include "server/ranks.h"
#include "server/http.h"
#include "server/serve.h"
#include "server/util.h"

/* ---- curvd run -------------------------------------------------------------- */

static int run_fail(const cv_err *e, int code)
{
    cv_err clean = *e;
    cv_utf8_sanitize(clean.message);
    cv_utf8_sanitize(clean.field);
    cJSON *j = cv_err_to_json(&clean);
    char *t = j ? cJSON_PrintUnformatted(j) : NULL;
    if (t)
        fprintf(stderr, "%s\n", t);
    else
        fprintf(stderr, "{\"error\":{\"code\":\"%s\",\"message\":\"%s\",\"field\":\"\"}}\n",
                e->code, "error (out of memory printing it)");
    free(t);
    cJSON_Delete(j);
    return code;
}

/* Reads a whole file ("-" = stdin) into a NUL-terminated buffer. */
static char *read_all(const char *path, size_t *len, cv_err *e)
{
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "rb");
    if (!f) {
        cv_err_set(e, CV_EINVAL, "cannot_read", "job", "cannot open job file '%s'", path);
        return NULL;
    }
    size_t cap = 65536, n = 0;
    char *buf = malloc(cap);
    int oom = buf == NULL;
    while (!oom) {
        if (n + 1 >= cap) {
            char *nb = cap < ((size_t)1 << 31) ? realloc(buf, cap * 2) : NULL;
            if (!nb) {
                oom = 1;
                break;
            }
            buf = nb;
            cap *= 2;
        }
        size_t r = fread(buf + n, 1, cap - n - 1, f);
        n += r;
        if (r == 0)
            break;
    }
    int bad = ferror(f);
    if (f != stdin)
        fclose(f);
    if (oom || bad) {
        free(buf);
        cv_err_set(e, bad ? CV_EINVAL : CV_ENOMEM, bad ? "cannot_read" : "out_of_memory", "job",
                   "cannot read job file '%s'", path);
        return NULL;
    }
    buf[n] = 0;
    *len = n;
    return buf;
}

/* The job of `curvd run` and what it runs on: one process, or this rank's
 * part of a data-parallel run. */
typedef struct {
    cv_job_spec *spec;
    cv_model *m;
    cv_dataset d;
    cv_mapped *map;            /* data-parallel: d is memory-mapped */
    cv_batch shard;
    cv_cluster *cl;
} run_ctx;

/* Data-parallel: the data file memory-mapped, so that this rank reads only
 * the pages of its shard. */
static int map_data(const char *path, run_ctx *r, cv_err *e)
{
    char real[PATH_MAX];
    if (!realpath(path, real))
        return cv_err_set(e, CV_EINVAL, "cannot_read", "data", "cannot open data file '%s'",
                          path);
    char *slash = strrchr(real, '/');
    *slash = 0;
    size_t heap, mapped;
    return cv_datadir_map(real[0] ? real : "/", slash + 1, SIZE_MAX, 0, &r->d, &r->map, &heap,
                          &mapped, e);
}

/* Loads what the job names (every rank its own copy of the model; the
 * data mapped when data-parallel). */
static int run_load(run_ctx *r, const cv_run_args *a, cJSON *job, cv_err *e)
{
    r->m = calloc(1, sizeof *r->m);
    if (!r->m)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
    r->spec = cv_job_parse(job, e);
    if (!r->spec || cv_arch_load(a->arch, r->m, e) || cv_params_read(r->m, a->params, e))
        return -1;
    return r->cl ? map_data(a->data, r, e) : cv_datafile_read(a->data, &r->d, e);
}

/* Binds and runs the job: the result, or NULL with e filled (on every rank). */
static cJSON *run_job(run_ctx *r, const cv_job_limits *lim, cv_err *e)
{
    if (!r->cl) {
        /* the check's plan goes to the engine: the model is probed once */
        cv_curv_plan plan;
        int planned = lim->job_memory || r->spec->micro_batch;
        if (cv_job_bind(r->spec, r->m, &r->d, e) ||
            cv_job_check_memory(r->spec, r->m, &r->d, lim, planned ? &plan : NULL, e))
            return NULL;
        return cv_job_exec_planned(r->spec, r->m, &r->d, lim, planned ? &plan : NULL, NULL,
                                   NULL, e);
    }
    const cv_comm *comm = cv_cluster_comm(r->cl);
    size_t n = cv_job_batch_size(r->spec, r->d.n);
    if (cv_job_bind_shard(r->spec, r->m, &r->d, comm, &r->shard, e) ||
        cv_job_check_memory_shard(r->spec, r->m, &r->shard, n, comm, lim, NULL, e))
        return NULL;
    return cv_job_exec_shard(r->spec, r->m, &r->shard, n, comm, lim, NULL, e);
}

/* Prints the result (rank 0), vectors to --vectors-out first. */
static int run_print(cJSON *res, const char *vout, cv_err *e)
{
    if (vout && cv_result_vectors_out(res, vout, e) < 0)
        return -1;
    char *t = cJSON_PrintUnformatted(res);
    if (!t)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory printing the result");
    int bad = fputs(t, stdout) == EOF || fputc('\n', stdout) == EOF || fflush(stdout);
    free(t);
    return bad ? cv_err_set(e, CV_EINTERNAL, "write_failed", "", "cannot write the result to stdout")
               : 0;
}

static void run_free(run_ctx *r)
{
    cv_job_spec_free(r->spec);
    if (r->m) {
        cv_model_free(r->m);
        free(r->m);
    }
    cv_dataset_free(&r->shard);
    cv_dataset_free(&r->d);
    cv_mapped_free(r->map);
}

/* The job text: read by rank 0 (mpirun gives only rank 0 stdin) and
 * broadcast to the others.  NULL with e filled on every rank on failure. */
static char *read_job(const cv_run_args *a, cv_cluster *cl, size_t *len, cv_err *e)
{
    const cv_comm *comm = cv_cluster_comm(cl);
    int rank = cv_cluster_rank(cl);
    char *text = rank == 0 ? read_all(a->job, len, e) : NULL;
    if (!cl)
        return text;
    int64_t n = (int64_t)*len;
    if (cv_comm_bcast(comm, rank == 0 && !text ? -1 : 0, &n, 1, CV_COMM_I64, 0, NULL, e)) {
        free(text);
        return NULL;
    }
    *len = (size_t)n;
    if (rank != 0 && !(text = malloc(*len + 1)))
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "job", "job text");
    if (cv_comm_bcast(comm, text ? 0 : -1, text, *len, CV_COMM_BYTE, 0, NULL, e)) {
        free(text);
        return NULL;
    }
    text[*len] = 0;
    return text;
}

static int cmd_run(int argc, char **argv)
{
    cv_err e;
    cv_run_args a;
    if (cv_run_args_parse(&a, argc, argv, &e))
        return run_fail(&e, 2);
    cv_job_limits lim;
    cv_job_limits_default(&lim);
    if (a.dense_max)
        lim.dense_max = a.dense_max;
    lim.job_memory = a.job_memory;
    cv_set_blas_threads(a.blas_threads);

    run_ctx r = {0};
    cv_err_clear(&e);
    if (cv_cluster_launched_size() > 1 && !(r.cl = cv_cluster_join(a.rank_timeout, &e)))
        return run_fail(&e, 1);
    int rank = cv_cluster_rank(r.cl);
    size_t jlen = 0;
    char *jtext = read_job(&a, r.cl, &jlen, &e);
    cJSON *job = NULL;
    char what[96];
    snprintf(what, sizeof what, "job file '%.64s'", a.job);
    if (jtext && !(job = cv_json_parse_strict(jtext, jlen, what, "", &e)) &&
        strcmp(e.code, "invalid_json") == 0 && !e.field[0])
        snprintf(e.field, sizeof e.field, "job");
    free(jtext);
    /* parsed once; the typed job is bound to the files and run */
    int rc = job ? run_load(&r, &a, job, &e) : -1;
    cJSON_Delete(job);
    cJSON *res = NULL;
    if (!cv_comm_agree(cv_cluster_comm(r.cl), rc, NULL, &e))
        res = run_job(&r, &lim, &e);
    rc = !res || (rank == 0 && run_print(res, a.vectors_out, &e)) ? 1 : 0;
    cJSON_Delete(res);
    run_free(&r);
    /* rank 0 reports before leaving: once the others exit (non-zero on an
     * error), mpirun may kill it */
    if (rc && rank == 0)
        run_fail(&e, rc);
    cv_cluster_leave(r.cl);
    return rc;
}

/* ---- curvd serve ------------------------------------------------------------ */

/* Under mpirun rank 0 runs the daemon, the other ranks its jobs. */
static int cmd_serve(int argc, char **argv)
{
    cv_serve_args a;
    int rc = cv_serve_args_parse(&a, argc, argv);
    cv_cluster *cl = NULL;
    cv_err e;
    if (rc < 0 && cv_cluster_launched_size() > 1 &&
        !(cl = cv_cluster_join(a.cfg.rank_timeout, &e)))
        rc = run_fail(&e, 1);
    if (rc < 0 && cv_cluster_rank(cl) > 0) {
        rc = cv_ranks_follow(cl); /* leaves the cluster */
        cl = NULL;
    } else if (rc < 0 && cl && !(a.cfg.ranks = cv_ranks_lead(cl, &e))) {
        cv_ranks_stop(cl);
        rc = run_fail(&e, 1);
    } else if (rc < 0) {
        rc = cv_serve(&a.cfg);
    }
    cv_ranks_free(a.cfg.ranks); /* tells the other ranks to stop */
    cv_cluster_leave(cl);
    cv_serve_args_free(&a);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        cv_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "version") == 0) {
        printf("curvd %s\n", CV_SERVER_VERSION);
        return 0;
    }
    cv_tune_allocator();
    if (strcmp(argv[1], "serve") == 0)
        return cmd_serve(argc - 2, argv + 2);
    if (strcmp(argv[1], "run") == 0)
        return cmd_run(argc - 2, argv + 2);
    if (strcmp(argv[1], "routes") == 0) {
        for (int i = 0; i < cv_http_route_count(); i++)
            printf("%s %s\n", cv_http_route(i)->method, cv_http_route(i)->path);
        return 0;
    }
    fprintf(stderr, "curvd: unknown command '%s'\n", argv[1]);
    cv_usage(stderr);
    return 2;
}
