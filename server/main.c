/* main.c - the curvd command line (docs/interface.md): `curvd serve` (the
 * daemon, see serve.h), `curvd run` (one job in-process: result JSON on
 * stdout, or a JSON error on stderr and a non-zero exit), `curvd routes` (the
 * HTTP route table, for tests), --help, --version.  The flags and the usage
 * text are the tables of cli.c. */
#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/vectors_out.h"
#include "api/arch.h"
#include "api/datafile.h"
#include "api/job.h"
#include "api/params.h"
#include "server/cli.h"
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

static int cmd_run(int argc, char **argv)
{
    cv_err e;
    cv_run_args a;
    if (cv_run_args_parse(&a, argc, argv, &e))
        return run_fail(&e, 2);
    const char *arch = a.arch, *params = a.params, *data = a.data, *jobp = a.job,
               *vout = a.vectors_out;
    cv_job_limits lim;
    cv_job_limits_default(&lim);
    if (a.dense_max)
        lim.dense_max = a.dense_max;
    lim.job_memory = a.job_memory;
    cv_set_blas_threads(a.blas_threads);

    cv_err_clear(&e);
    size_t jlen;
    char *jtext = read_all(jobp, &jlen, &e);
    if (!jtext)
        return run_fail(&e, 1);
    const char *end = NULL;
    cJSON *job = cJSON_ParseWithLengthOpts(jtext, jlen, &end, 0);
    if (!job) {
        cv_err_set(&e, CV_EINVAL, "invalid_json", "job",
                   "job file '%s' is not valid JSON (error near byte %zu)", jobp,
                   end && end >= jtext ? (size_t)(end - jtext) : (size_t)0);
        free(jtext);
        return run_fail(&e, 1);
    }
    free(jtext);
    int rc = 1;
    cv_job_spec *spec = NULL;
    cv_model *m = calloc(1, sizeof *m);
    cv_dataset d;
    memset(&d, 0, sizeof d);
    if (!m) {
        cv_err_set(&e, CV_ENOMEM, "out_of_memory", "", "out of memory");
        goto out;
    }
    /* parsed once; the typed job is bound to the files and run */
    spec = cv_job_parse(job, &e);
    cJSON_Delete(job);
    job = NULL;
    if (!spec || cv_arch_load(arch, m, &e) || cv_params_read(m, params, &e) ||
        cv_datafile_read(data, &d, &e) || cv_job_bind(spec, m, &d, &e) ||
        cv_job_check_memory(spec, m, &d, &lim, NULL, &e))
        goto out;
    cJSON *res = cv_job_exec(spec, m, &d, &lim, NULL, &e);
    if (!res)
        goto out;
    if (vout && cv_result_vectors_out(res, vout, &e) < 0) {
        cJSON_Delete(res);
        goto out;
    }
    char *t = cJSON_PrintUnformatted(res);
    cJSON_Delete(res);
    if (!t) {
        cv_err_set(&e, CV_ENOMEM, "out_of_memory", "", "out of memory printing the result");
        goto out;
    }
    if (fputs(t, stdout) == EOF || fputc('\n', stdout) == EOF || fflush(stdout)) {
        cv_err_set(&e, CV_EINTERNAL, "write_failed", "", "cannot write the result to stdout");
        free(t);
        goto out;
    }
    free(t);
    rc = 0;
out:
    cJSON_Delete(job);
    cv_job_spec_free(spec);
    if (m) {
        cv_model_free(m);
        free(m);
    }
    cv_dataset_free(&d);
    return rc ? run_fail(&e, rc) : 0;
}

/* ---- curvd serve ------------------------------------------------------------ */

static int cmd_serve(int argc, char **argv)
{
    cv_serve_args a;
    int rc = cv_serve_args_parse(&a, argc, argv);
    if (rc < 0)
        rc = cv_serve(&a.cfg);
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
