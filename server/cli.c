/* cli.c - the flag tables of `curvd serve` and `curvd run`, their parsers
 * and the `curvd --help` text printed from the same tables (see cli.h). */
#include "server/cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/suggest.h"
#include "server/util.h"

/* ---- the tables --------------------------------------------------------------- */

static const char *add_model(void *args, const char *v);
static const char *add_dataset(void *args, const char *v);

#define SERVE(field) offsetof(cv_serve_args, cfg.field)
#define RUN(field) offsetof(cv_run_args, field)
#define POW2(n) ((double)((size_t)1 << (n)))

const cv_flag cv_serve_flags[] = {
    {.name = "--port", .arg = "N", .kind = CV_FLAG_INT, .off = SERVE(http.port), .hi = 65535,
     .help = "TCP port; 0 picks a free one"},
    {.name = "--bind", .arg = "ADDR", .kind = CV_FLAG_STRING, .off = SERVE(http.bind),
     .help = "IPv4/IPv6 address to listen on"},
    {.name = "--workers", .arg = "N", .kind = CV_FLAG_INT, .off = SERVE(jobs.workers), .lo = 1,
     .hi = 1024, .dflt = "online CPUs, at most 8", .help = "job worker threads"},
    {.name = "--blas-threads", .arg = "N", .kind = CV_FLAG_INT, .off = SERVE(blas_threads),
     .lo = 1, .hi = 1024,
     .help = "OpenBLAS threads (process-wide, shared by all\n"
             "workers: workers x N should not exceed the cores)"},
    {.name = "--max-body", .arg = "BYTES", .kind = CV_FLAG_BYTES, .off = SERVE(http.max_body),
     .lo = 1, .hi = POW2(40), .help = "largest request body; suffixes K, M, G"},
    {.name = "--max-job-bytes", .arg = "BYTES", .kind = CV_FLAG_BYTES,
     .off = SERVE(http.max_job_body), .lo = 1, .hi = POW2(40),
     .help = "largest POST /v1/jobs body (the job JSON), 413\n"
             "body_too_large above it"},
    {.name = "--max-registry-bytes", .arg = "BYTES", .kind = CV_FLAG_BYTES,
     .off = SERVE(max_registry_bytes), .lo = 1, .hi = POW2(50),
     .help = "memory budget of registered models+datasets, old\n"
             "versions still pinned by queued/running jobs\n"
             "included: an upload over it is 413 registry_full,\n"
             "429 registry_full if it fits once those jobs end"},
    {.name = "--max-memory", .arg = "BYTES", .kind = CV_FLAG_BYTES, .off = SERVE(max_memory),
     .hi = POW2(50), .dflt = "75% of physical memory, or of the cgroup memory limit when lower",
     .help = "memory the daemon may hold: registry + queued and\n"
             "running jobs' documents + running jobs' engine and\n"
             "result estimates + kept results; a job that can\n"
             "never fit is 413 memory_limit, one that fits later\n"
             "waits in the queue (429 memory_busy when even its\n"
             "document cannot be held); 0 = no limit"},
    {.name = "--monitor-history", .arg = "N", .kind = CV_FLAG_COUNT,
     .off = SERVE(monitor_history), .lo = 1, .hi = 100000000, .dflt = "10000",
     .help = "history entries kept per training monitor (GET\n"
             "/v1/models/{name}/history); the oldest go first"},
    {.name = "--max-queue", .arg = "N", .kind = CV_FLAG_COUNT, .off = SERVE(jobs.max_queue),
     .lo = 1, .hi = 1000000, .help = "queued jobs before POST /v1/jobs answers 429"},
    {.name = "--job-timeout", .arg = "SECONDS", .kind = CV_FLAG_SECONDS,
     .off = SERVE(jobs.job_timeout), .hi = 1e9, .help = "running-time limit per job; 0 = none"},
    {.name = "--keep-jobs", .arg = "SECONDS", .kind = CV_FLAG_SECONDS, .off = SERVE(jobs.keep_s),
     .hi = 1e9, .help = "finished jobs stay readable this long"},
    {.name = "--max-kept-bytes", .arg = "BYTES", .kind = CV_FLAG_BYTES,
     .off = SERVE(jobs.max_kept_bytes), .hi = POW2(50),
     .help = "memory for finished jobs' results; beyond it the\n"
             "oldest finished jobs are dropped first (the newest\n"
             "always stays); 0 = no cap"},
    {.name = "--max-wait", .arg = "SECONDS", .kind = CV_FLAG_SECONDS, .off = SERVE(http.max_wait),
     .hi = 86400,
     .help = "cap on ?wait=; 0 = ?wait= never waits (answers at\n"
             "once)"},
    {.name = "--shutdown-grace", .arg = "SECONDS", .kind = CV_FLAG_SECONDS, .off = SERVE(grace_s),
     .hi = 86400,
     .help = "on SIGTERM/SIGINT queued jobs are cancelled at once\n"
             "(code shutting_down); running jobs get this long\n"
             "to finish before they are cancelled"},
    {.name = "--max-connections", .arg = "N", .kind = CV_FLAG_UINT,
     .off = SERVE(http.max_connections), .lo = 1, .hi = 100000,
     .help = "concurrent HTTP connections (one thread each);\n"
             "more are closed at accept"},
    {.name = "--max-connections-per-ip", .arg = "N", .kind = CV_FLAG_UINT,
     .off = SERVE(http.max_connections_per_ip), .lo = 0, .hi = 100000,
     .help = "concurrent connections from one client address;\n0 = no limit"},
    {.name = "--idle-timeout", .arg = "SECONDS", .kind = CV_FLAG_SECONDS,
     .off = SERVE(http.idle_timeout), .hi = 86400,
     .help = "a connection that sends nothing this long is\n"
             "closed (never while its request is answered, a\n"
             "?wait= included); 0 = --max-wait + 60"},
    {.name = "--header-timeout", .arg = "SECONDS", .kind = CV_FLAG_SECONDS,
     .off = SERVE(http.header_timeout), .hi = 86400,
     .help = "a request's headers must be in within this of the\n"
             "accept or the previous request's end, however\n"
             "slowly they trickle in (slowloris); 0 = no limit"},
    {.name = "--max-queued-per-client", .arg = "N", .kind = CV_FLAG_COUNT,
     .off = SERVE(jobs.max_queued_per_client), .hi = 1000000,
     .help = "queued jobs one client (token, or address without\n"
             "tokens) may have; more are 429 client_queue_full;\n"
             "0 = no cap (only --max-queue)"},
    {.name = "--auth-token-file", .arg = "FILE", .kind = CV_FLAG_STRING,
     .off = SERVE(http.auth_token_file), .dflt = "none",
     .help = "require 'Authorization: Bearer TOKEN': lines\n"
             "TOKEN [read|submit|admin] (no role: all); 401\n"
             "without a listed token, 403 when its role is\n"
             "short; none: no token needed"},
    {.name = "--generate-token", .kind = CV_FLAG_SWITCH, .off = SERVE(http.generate_token),
     .ival = 1,
     .help = "without --auth-token-file: require one admin token,\n"
             "$CURVD_TOKEN if set, else random and printed to\n"
             "the log (the Docker image does this)"},
    {.name = "--tls-cert", .arg = "PEM", .kind = CV_FLAG_STRING, .off = SERVE(http.tls_cert),
     .dflt = "none", .help = "serve HTTPS with this certificate (chain)"},
    {.name = "--tls-key", .arg = "PEM", .kind = CV_FLAG_STRING, .off = SERVE(http.tls_key),
     .dflt = "", .help = "the private key of --tls-cert"},
    {.name = "--allowed-hosts", .arg = "H1,H2", .kind = CV_FLAG_STRING,
     .off = SERVE(http.allowed_hosts), .dflt = "",
     .help = "Host header names served (port ignored); others\n"
             "are 421 host_not_allowed (DNS rebinding); * = any;\n"
             "default localhost, 127.0.0.1, ::1 and --bind"},
    {.name = "--cors-origin", .arg = "ORIGIN", .kind = CV_FLAG_STRING,
     .off = SERVE(http.cors_origin), .dflt = "off",
     .help = "allow cross-origin requests from this one origin\n"
             "(e.g. https://app.example.com); answers preflights"},
    {.name = "--dense-max", .arg = "D", .kind = CV_FLAG_COUNT, .off = SERVE(jobs.limits.dense_max),
     .lo = 1, .hi = POW2(20), .help = "largest D for op dense"},
    {.name = "--job-memory", .arg = "BYTES", .kind = CV_FLAG_BYTES,
     .off = SERVE(jobs.limits.job_memory), .lo = 0, .hi = POW2(50),
     .help = "engine working memory of one job (micro-batch states,\n"
             "workspace, the estimator's vectors; not the model or\n"
             "dataset): larger batches run in micro-batches, a job\n"
             "that cannot fit is refused (400 job_memory); 0: no limit"},
    {.name = "--model", .arg = "NAME=ARCH.json:PARAMS.safetensors", .kind = CV_FLAG_CALL,
     .fn = add_model, .help = "register a model (repeatable)"},
    {.name = "--dataset", .arg = "NAME=DATA.safetensors", .kind = CV_FLAG_CALL, .fn = add_dataset,
     .help = "register a dataset (repeatable)"},
    {.name = "--data-dir", .arg = "DIR", .kind = CV_FLAG_STRING, .off = SERVE(http.data_dir),
     .dflt = "none",
     .help = "safetensors files in DIR can be registered by name\n"
             "(POST /v1/datasets/{name} {\"file\": ...}), memory-mapped"},
    {.name = "--state-dir", .arg = "DIR", .kind = CV_FLAG_STRING, .off = SERVE(state_dir),
     .dflt = "none",
     .help = "models, datasets and finished jobs survive restarts\n"
             "(and kill -9): every change is written to DIR\n"
             "before it is answered; created if missing"},
    {.name = "--upload-timeout", .arg = "SECONDS", .kind = CV_FLAG_SECONDS,
     .off = SERVE(http.upload_timeout), .hi = 1e9,
     .help = "an upload in parts idle this long is dropped;\n0 = never"},
    {.name = "--no-demo", .kind = CV_FLAG_SWITCH, .off = SERVE(demo), .ival = 0,
     .help = "do not register the built-in demo models/datasets"},
    {.name = "--rank-timeout", .arg = "SECONDS", .kind = CV_FLAG_SECONDS,
     .off = SERVE(rank_timeout), .hi = 1e9,
     .help = "under mpirun: a job fails (503 rank_lost) when\n"
             "another rank does not answer within this; 0 = never"},
    {.name = "--log-requests", .kind = CV_FLAG_SWITCH, .off = SERVE(http.log_requests), .ival = 1,
     .help = "one stderr line per request"},
    {.name = NULL},
};

const cv_flag cv_run_flags[] = {
    {.name = "--arch", .arg = "A.json", .kind = CV_FLAG_STRING, .off = RUN(arch), .required = 1},
    {.name = "--params", .arg = "P.safetensors", .kind = CV_FLAG_STRING, .off = RUN(params),
     .required = 1},
    {.name = "--data", .arg = "D.safetensors", .kind = CV_FLAG_STRING, .off = RUN(data),
     .required = 1},
    {.name = "--job", .arg = "J.json", .kind = CV_FLAG_STRING, .off = RUN(job), .required = 1},
    {.name = "--blas-threads", .arg = "N", .kind = CV_FLAG_INT, .off = RUN(blas_threads), .lo = 1,
     .hi = POW2(30)},
    {.name = "--dense-max", .arg = "D", .kind = CV_FLAG_COUNT, .off = RUN(dense_max), .lo = 1,
     .hi = POW2(30)},
    {.name = "--job-memory", .arg = "BYTES", .kind = CV_FLAG_BYTES, .off = RUN(job_memory),
     .lo = 0, .hi = POW2(50)},
    {.name = "--vectors-out", .arg = "V.safetensors", .kind = CV_FLAG_STRING,
     .off = RUN(vectors_out)},
    {.name = "--rank-timeout", .arg = "SECONDS", .kind = CV_FLAG_SECONDS,
     .off = RUN(rank_timeout), .hi = 1e9},
    {.name = NULL},
};

/* ---- parsing ------------------------------------------------------------------ */

static const cv_flag *find_flag(const cv_flag *t, const char *name)
{
    for (; t->name; t++)
        if (strcmp(t->name, name) == 0)
            return t;
    return NULL;
}

/* "; did you mean '--port'?" for a misspelt flag of table t, or "". */
static const char *flag_hint(const cv_flag *t, const char *arg, char *buf, size_t len)
{
    const char *names[64];
    int n = 0;
    for (; t->name && n < 64; t++)
        names[n++] = t->name;
    return cv_suggest_hint(arg, names, n, buf, len);
}

/* Stores value v (NULL for a switch) of flag f into args.  Returns 0, or -1
 * with *msg NULL (a number out of range or malformed) or a printf format
 * taking v. */
static int set_value(const cv_flag *f, void *args, const char *v, const char **msg)
{
    char *p = (char *)args + f->off;
    size_t n = 0;
    int bad = 0;
    *msg = NULL;
    switch (f->kind) {
    case CV_FLAG_SWITCH: *(int *)p = f->ival; break;
    case CV_FLAG_STRING: *(const char **)p = v; break;
    case CV_FLAG_SECONDS: bad = cv_parse_double(v, f->lo, f->hi, (double *)p); break;
    case CV_FLAG_CALL: *msg = f->fn(args, v); bad = *msg != NULL; break;
    case CV_FLAG_INT:
    case CV_FLAG_UINT:
    case CV_FLAG_COUNT:
    case CV_FLAG_BYTES:
        bad = cv_parse_size(v, (size_t)f->lo, (size_t)f->hi, &n);
        if (bad)
            break;
        if (f->kind == CV_FLAG_INT)
            *(int *)p = (int)n;
        else if (f->kind == CV_FLAG_UINT)
            *(unsigned *)p = (unsigned)n;
        else
            *(size_t *)p = n;
        break;
    }
    return bad ? -1 : 0;
}

/* --model NAME=ARCH.json:PARAMS.safetensors (split at the first '=' and the
 * last ':') */
static const char *add_model(void *args, const char *v)
{
    cv_serve_args *a = args;
    const char *eq = strchr(v, '='), *colon = strrchr(v, ':');
    if (!eq || !colon || colon < eq || eq == v || colon == eq + 1 || !colon[1])
        return "--model wants NAME=ARCH.json:PARAMS.safetensors, got '%s'";
    char *copy = strdup(v);
    if (!copy)
        return "out of memory";
    copy[eq - v] = 0;
    copy[colon - v] = 0;
    cv_model_spec *ms = &a->models[a->cfg.nmodels++];
    ms->name = copy;
    ms->arch_path = copy + (eq - v) + 1;
    ms->params_path = copy + (colon - v) + 1;
    return NULL;
}

/* --dataset NAME=DATA.safetensors */
static const char *add_dataset(void *args, const char *v)
{
    cv_serve_args *a = args;
    const char *eq = strchr(v, '=');
    if (!eq || eq == v || !eq[1])
        return "--dataset wants NAME=DATA.safetensors, got '%s'";
    char *copy = strdup(v);
    if (!copy)
        return "out of memory";
    copy[eq - v] = 0;
    cv_dataset_spec *ds = &a->datasets[a->cfg.ndatasets++];
    ds->name = copy;
    ds->path = copy + (eq - v) + 1;
    return NULL;
}

static int serve_fail(const char *msg, const char *arg)
{
    fprintf(stderr, "curvd serve: ");
    fprintf(stderr, msg, arg);
    fprintf(stderr, " (see curvd --help)\n");
    return 2;
}

int cv_serve_args_parse(cv_serve_args *a, int argc, char **argv)
{
    memset(a, 0, sizeof *a);
    cv_serve_config_default(&a->cfg);
    a->models = calloc((size_t)argc + 1, sizeof *a->models);
    a->datasets = calloc((size_t)argc + 1, sizeof *a->datasets);
    if (!a->models || !a->datasets) {
        fprintf(stderr, "curvd: out of memory\n");
        return 1;
    }
    a->cfg.models = a->models;
    a->cfg.datasets = a->datasets;
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i], *msg;
        if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
            cv_usage(stdout);
            return 0;
        }
        const cv_flag *f = find_flag(cv_serve_flags, arg);
        if (!f && strncmp(arg, "--", 2) == 0) {
            char m[160], hint[96];
            snprintf(m, sizeof m, "unknown option '%%s'%s",
                     flag_hint(cv_serve_flags, arg, hint, sizeof hint));
            return serve_fail(m, arg);
        }
        if (f && f->kind == CV_FLAG_SWITCH) {
            set_value(f, a, NULL, &msg);
            continue;
        }
        if (i + 1 >= argc)
            return serve_fail(strncmp(arg, "--", 2) == 0 ? "%s needs a value"
                                                         : "unknown argument '%s'",
                              arg);
        const char *v = argv[++i];
        if (!f)
            return serve_fail("unknown argument '%s'", arg);
        if (set_value(f, a, v, &msg))
            return msg ? serve_fail(msg, v) : serve_fail("bad value for %s", arg);
    }
    return -1;
}

void cv_serve_args_free(cv_serve_args *a)
{
    for (int i = 0; a->models && i < a->cfg.nmodels; i++)
        free((char *)a->models[i].name);
    for (int i = 0; a->datasets && i < a->cfg.ndatasets; i++)
        free((char *)a->datasets[i].name);
    free(a->models);
    free(a->datasets);
    a->models = NULL;
    a->datasets = NULL;
}

int cv_run_args_parse(cv_run_args *a, int argc, char **argv, cv_err *e)
{
    memset(a, 0, sizeof *a);
    a->job_memory = (size_t)2 << 30;
    a->rank_timeout = 300;
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i], *msg;
        const cv_flag *f = find_flag(cv_run_flags, arg);
        char hint[96];
        if (!f)
            return cv_err_set(e, CV_EINVAL, "usage", arg,
                              "curvd run: unknown argument '%s'%s (see curvd --help)", arg,
                              flag_hint(cv_run_flags, arg, hint, sizeof hint));
        if (i + 1 >= argc)
            return cv_err_set(e, CV_EINVAL, "usage", arg, "curvd run: %s needs a value", arg);
        if (set_value(f, a, argv[++i], &msg))
            return cv_err_set(e, CV_EINVAL, "usage", arg, "curvd run: %s needs a positive integer",
                              arg);
    }
    char need[128] = "";
    int missing = 0, nreq = 0;
    for (const cv_flag *f = cv_run_flags; f->name; f++) {
        if (!f->required)
            continue;
        missing |= *(const char **)((const char *)a + f->off) == NULL;
        nreq++;
    }
    if (!missing)
        return 0;
    for (const cv_flag *f = cv_run_flags; f->name; f++)
        if (f->required)
            snprintf(need + strlen(need), sizeof need - strlen(need), "%s%s",
                     !need[0] ? "" : --nreq > 1 ? ", " : " and ", f->name);
    return cv_err_set(e, CV_EINVAL, "usage", "", "curvd run needs %s", need);
}

/* ---- usage -------------------------------------------------------------------- */

#define HELP_COL 27 /* width of the flag column: help starts at column 29 */

/* The default of flag f as parsing starts from it (defaults: the argument
 * struct so filled), into buf; "" when none is shown. */
static void default_text(const cv_flag *f, const void *defaults, char *buf, size_t len)
{
    const char *p = (const char *)defaults + f->off;
    buf[0] = 0;
    if (f->dflt) {
        snprintf(buf, len, "%s", f->dflt);
        return;
    }
    switch (f->kind) {
    case CV_FLAG_INT: snprintf(buf, len, "%d", *(const int *)p); break;
    case CV_FLAG_UINT: snprintf(buf, len, "%u", *(const unsigned *)p); break;
    case CV_FLAG_COUNT: snprintf(buf, len, "%zu", *(const size_t *)p); break;
    case CV_FLAG_SECONDS: snprintf(buf, len, "%g", *(const double *)p); break;
    case CV_FLAG_STRING:
        snprintf(buf, len, "%s", *(const char *const *)p ? *(const char *const *)p : "");
        break;
    case CV_FLAG_BYTES: {
        size_t v = *(const size_t *)p;
        int s = 0;
        while (s < 3 && v && v % 1024 == 0)
            v /= 1024, s++;
        snprintf(buf, len, "%zu%s", v, (const char *[]){"", "K", "M", "G"}[s]);
        break;
    }
    case CV_FLAG_SWITCH:
    case CV_FLAG_CALL: break;
    }
}

static void synopsis(const cv_flag *f, char *buf, size_t len)
{
    snprintf(buf, len, "%s%s%s", f->name, f->arg ? " " : "", f->arg ? f->arg : "");
}

/* One line per help line; a flag too long for the column has its help on a
 * second column shared with the other long ones. */
static void usage_flags(FILE *out, const cv_flag *t, const void *defaults)
{
    char syn[96], dflt[64];
    int wide = 0;
    for (const cv_flag *f = t; f->name; f++) {
        synopsis(f, syn, sizeof syn);
        int n = (int)strlen(syn);
        if (n >= HELP_COL && n + 3 > wide)
            wide = n + 3;
    }
    for (const cv_flag *f = t; f->name; f++) {
        synopsis(f, syn, sizeof syn);
        int col = (int)strlen(syn) >= HELP_COL ? wide : HELP_COL;
        default_text(f, defaults, dflt, sizeof dflt);
        fprintf(out, "  %-*s", col, syn);
        for (const char *h = f->help; *h;) {
            size_t n = strcspn(h, "\n");
            fprintf(out, "%.*s", (int)n, h);
            h += n;
            if (*h) {
                h++;
                fprintf(out, "\n  %-*s", col, "");
            }
        }
        fprintf(out, dflt[0] ? " [%s]\n" : "\n", dflt);
    }
}

void cv_usage(FILE *f)
{
    cv_serve_args defaults;
    memset(&defaults, 0, sizeof defaults);
    cv_serve_config_default(&defaults.cfg);
    fputs("usage:\n"
          "  curvd serve [options]      run the HTTP daemon (API: docs/interface.md)\n"
          "  curvd run",
          f);
    for (const cv_flag *r = cv_run_flags; r->name; r++)
        if (r->required)
            fprintf(f, " %s %s", r->name, r->arg);
    fputs("\n            ", f);
    for (const cv_flag *r = cv_run_flags; r->name; r++)
        if (!r->required)
            fprintf(f, " [%s %s]", r->name, r->arg);
    fputs("\n"
          "                             run one job in-process; --job - reads stdin; prints the\n"
          "                             result JSON (exit 0) or a JSON error on stderr (exit 1,\n"
          "                             2 for usage errors); --vectors-out writes eigenvectors,\n"
          "                             gradients, steps, ... to a safetensors file (F64) and\n"
          "                             puts {file, tensor, shape} in the JSON instead; under\n"
          "                             `mpirun -np R` the job runs data-parallel on R ranks\n"
          "                             (each reads its shard of the batch; rank 0 prints;\n"
          "                             --rank-timeout: longest wait for another rank [300])\n"
          "  curvd routes               print the HTTP routes (METHOD PATH)\n"
          "  curvd --help | --version\n"
          "\n"
          "serve options (defaults in brackets):\n",
          f);
    usage_flags(f, cv_serve_flags, &defaults);
}
