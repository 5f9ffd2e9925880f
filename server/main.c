/* main.c - the curvd command line (contract §4): `curvd serve` (the daemon,
 * see serve.h), `curvd run` (one job in-process: result JSON on stdout, or a
 * JSON error on stderr and a non-zero exit), `curvd routes` (the HTTP route
 * table, for tests), --help, --version. */
#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/vectors_out.h"
#include "api/arch.h"
#include "api/datafile.h"
#include "api/job.h"
#include "api/params.h"
#include "server/http.h"
#include "server/serve.h"
#include "server/util.h"

static const char usage[] =
    "usage:\n"
    "  curvd serve [options]      run the HTTP daemon (contract §5)\n"
    "  curvd run --arch A.json --params P.safetensors --data D.safetensors --job J.json\n"
    "             [--blas-threads N] [--dense-max D] [--vectors-out V.safetensors]\n"
    "                             run one job in-process; --job - reads stdin; prints the\n"
    "                             result JSON (exit 0) or a JSON error on stderr (exit 1,\n"
    "                             2 for usage errors); --vectors-out writes eigenvectors,\n"
    "                             gradients, steps, ... to a safetensors file (F64) and\n"
    "                             puts {file, tensor, shape} in the JSON instead\n"
    "  curvd routes               print the HTTP routes (METHOD PATH)\n"
    "  curvd --help | --version\n"
    "\n"
    "serve options (defaults in brackets):\n"
    "  --port N                   TCP port; 0 picks a free one [8080]\n"
    "  --bind ADDR                IPv4/IPv6 address to listen on [127.0.0.1]\n"
    "  --workers N                job worker threads [online CPUs, at most 8]\n"
    "  --blas-threads N           OpenBLAS threads (process-wide, shared by all\n"
    "                             workers: workers x N should not exceed the cores) [1]\n"
    "  --max-body BYTES           largest request body; suffixes K, M, G [256M]\n"
    "  --max-job-bytes BYTES      largest POST /v1/jobs body (the job JSON), 413\n"
    "                             body_too_large above it [16M]\n"
    "  --max-registry-bytes BYTES memory budget of registered models+datasets, old\n"
    "                             versions still pinned by queued/running jobs\n"
    "                             included: an upload over it is 413 registry_full,\n"
    "                             429 registry_full if it fits once those jobs end [1G]\n"
    "  --max-queue N              queued jobs before POST /v1/jobs answers 429 [256]\n"
    "  --job-timeout SECONDS      running-time limit per job; 0 = none [3600]\n"
    "  --keep-jobs SECONDS        finished jobs stay readable this long [600]\n"
    "  --max-kept-bytes BYTES     memory for finished jobs' results; beyond it the\n"
    "                             oldest finished jobs are dropped first (the newest\n"
    "                             always stays); 0 = no cap [256M]\n"
    "  --max-wait SECONDS         cap on ?wait=; 0 = ?wait= never waits (answers at\n"
    "                             once); idle connections close after this + 60 s [300]\n"
    "  --shutdown-grace SECONDS   on SIGTERM/SIGINT queued jobs are cancelled at once\n"
    "                             (code shutting_down); running jobs get this long\n"
    "                             to finish before they are cancelled [10]\n"
    "  --max-connections N        concurrent HTTP connections [512]\n"
    "  --dense-max D              largest D for op dense [4096]\n"
    "  --model NAME=ARCH.json:PARAMS.safetensors   register a model (repeatable)\n"
    "  --dataset NAME=DATA.safetensors             register a dataset (repeatable)\n"
    "  --no-demo                  do not register the built-in demo models/datasets\n"
    "  --log-requests             one stderr line per request\n";

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

static int usage_fail(const char *fmt, const char *arg)
{
    cv_err e;
    cv_err_set(&e, CV_EINVAL, "usage", arg ? arg : "", fmt, arg ? arg : "");
    return run_fail(&e, 2);
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
    const char *arch = NULL, *params = NULL, *data = NULL, *jobp = NULL, *vout = NULL;
    int blas = 0;
    cv_job_limits lim;
    cv_job_limits_default(&lim);
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char **dst = strcmp(a, "--arch") == 0     ? &arch
                           : strcmp(a, "--params") == 0 ? &params
                           : strcmp(a, "--data") == 0   ? &data
                           : strcmp(a, "--job") == 0    ? &jobp
                           : strcmp(a, "--vectors-out") == 0 ? &vout
                                                        : NULL;
        int is_num = strcmp(a, "--blas-threads") == 0 || strcmp(a, "--dense-max") == 0;
        if (!dst && !is_num)
            return usage_fail("curvd run: unknown argument '%s' (see curvd --help)", a);
        if (i + 1 >= argc)
            return usage_fail("curvd run: %s needs a value", a);
        if (dst) {
            *dst = argv[++i];
            continue;
        }
        size_t v;
        if (cv_parse_size(argv[++i], 1, 1u << 30, &v))
            return usage_fail("curvd run: %s needs a positive integer", a);
        if (a[2] == 'b')
            blas = (int)v;
        else
            lim.dense_max = v;
    }
    if (!arch || !params || !data || !jobp)
        return usage_fail("curvd run needs --arch, --params, --data and --job%s", NULL);
    cv_set_blas_threads(blas);

    cv_err e;
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
        cv_datafile_read(data, &d, &e) || cv_job_bind(spec, m, &d, &e))
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

static int serve_fail(const char *msg, const char *arg)
{
    fprintf(stderr, "curvd serve: ");
    fprintf(stderr, msg, arg);
    fprintf(stderr, " (see curvd --help)\n");
    return 2;
}

static int cmd_serve(int argc, char **argv)
{
    cv_serve_config c;
    cv_serve_config_default(&c);
    cv_model_spec *models = calloc((size_t)argc + 1, sizeof *models);
    cv_dataset_spec *datasets = calloc((size_t)argc + 1, sizeof *datasets);
    if (!models || !datasets) {
        free(models);
        free(datasets);
        fprintf(stderr, "curvd: out of memory\n");
        return 1;
    }
    c.models = models;
    c.datasets = datasets;
    int rc = -1;
    for (int i = 0; i < argc && rc < 0; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--no-demo") == 0) {
            c.demo = 0;
            continue;
        }
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(usage, stdout);
            rc = 0;
            break;
        }
        if (strcmp(a, "--log-requests") == 0) {
            c.http.log_requests = 1;
            continue;
        }
        if (i + 1 >= argc) {
            rc = serve_fail(strncmp(a, "--", 2) == 0 ? "%s needs a value" : "unknown argument '%s'",
                            a);
            break;
        }
        const char *v = argv[++i];
        size_t n;
        double s;
        int bad = 0;
        if (strcmp(a, "--port") == 0) {
            bad = cv_parse_size(v, 0, 65535, &n);
            c.http.port = (int)n;
        } else if (strcmp(a, "--bind") == 0) {
            c.http.bind = v;
        } else if (strcmp(a, "--workers") == 0) {
            bad = cv_parse_size(v, 1, 1024, &n);
            c.jobs.workers = (int)n;
        } else if (strcmp(a, "--blas-threads") == 0) {
            bad = cv_parse_size(v, 1, 1024, &n);
            c.blas_threads = (int)n;
        } else if (strcmp(a, "--max-body") == 0) {
            bad = cv_parse_size(v, 1, (size_t)1 << 40, &c.http.max_body);
        } else if (strcmp(a, "--max-job-bytes") == 0) {
            bad = cv_parse_size(v, 1, (size_t)1 << 40, &c.http.max_job_body);
        } else if (strcmp(a, "--max-kept-bytes") == 0) {
            bad = cv_parse_size(v, 0, (size_t)1 << 50, &c.jobs.max_kept_bytes);
        } else if (strcmp(a, "--max-registry-bytes") == 0) {
            bad = cv_parse_size(v, 1, (size_t)1 << 50, &c.max_registry_bytes);
        } else if (strcmp(a, "--max-queue") == 0) {
            bad = cv_parse_size(v, 1, 1000000, &c.jobs.max_queue);
        } else if (strcmp(a, "--max-connections") == 0) {
            bad = cv_parse_size(v, 1, 100000, &n);
            c.http.max_connections = (unsigned)n;
        } else if (strcmp(a, "--dense-max") == 0) {
            bad = cv_parse_size(v, 1, (size_t)1 << 20, &c.jobs.limits.dense_max);
        } else if (strcmp(a, "--job-timeout") == 0) {
            bad = cv_parse_double(v, 0, 1e9, &c.jobs.job_timeout);
        } else if (strcmp(a, "--keep-jobs") == 0) {
            bad = cv_parse_double(v, 0, 1e9, &c.jobs.keep_s);
        } else if (strcmp(a, "--max-wait") == 0) {
            bad = cv_parse_double(v, 0, 86400, &c.http.max_wait);
        } else if (strcmp(a, "--shutdown-grace") == 0) {
            bad = cv_parse_double(v, 0, 86400, &s);
            c.grace_s = s;
        } else if (strcmp(a, "--model") == 0) {
            /* NAME=ARCH.json:PARAMS.safetensors (split at the first '=' and
             * the last ':') */
            const char *eq = strchr(v, '='), *colon = strrchr(v, ':');
            if (!eq || !colon || colon < eq || eq == v || colon == eq + 1 || !colon[1]) {
                rc = serve_fail("--model wants NAME=ARCH.json:PARAMS.safetensors, got '%s'", v);
                break;
            }
            cv_model_spec *ms = &models[c.nmodels++];
            char *copy = strdup(v);
            if (!copy) {
                rc = serve_fail("out of memory%s", "");
                break;
            }
            copy[eq - v] = 0;
            copy[colon - v] = 0;
            ms->name = copy;
            ms->arch_path = copy + (eq - v) + 1;
            ms->params_path = copy + (colon - v) + 1;
        } else if (strcmp(a, "--dataset") == 0) {
            const char *eq = strchr(v, '=');
            if (!eq || eq == v || !eq[1]) {
                rc = serve_fail("--dataset wants NAME=DATA.safetensors, got '%s'", v);
                break;
            }
            cv_dataset_spec *ds = &datasets[c.ndatasets++];
            char *copy = strdup(v);
            if (!copy) {
                rc = serve_fail("out of memory%s", "");
                break;
            }
            copy[eq - v] = 0;
            ds->name = copy;
            ds->path = copy + (eq - v) + 1;
        } else {
            rc = serve_fail("unknown option '%s'", a);
            break;
        }
        if (bad)
            rc = serve_fail("bad value for %s", a);
    }
    if (rc < 0)
        rc = cv_serve(&c);
    for (int i = 0; i < c.nmodels; i++)
        free((char *)models[i].name);
    for (int i = 0; i < c.ndatasets; i++)
        free((char *)datasets[i].name);
    free(models);
    free(datasets);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        fputs(usage, argc < 2 ? stderr : stdout);
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
    fprintf(stderr, "curvd: unknown command '%s'\n%s", argv[1], usage);
    return 2;
}
