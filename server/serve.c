/* serve.c - the daemon's life cycle: start-up (BLAS threads, registry, demo,
 * files from the command line, workers, HTTP) and the ordered shutdown on
 * SIGTERM/SIGINT described in serve.h. */
#include "server/serve.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "api/arch.h"
#include "api/datafile.h"
#include "api/job.h"
#include "api/params.h"
#include "engine/linop.h"
#include "server/demo.h"
#include "server/persist.h"
#include "server/registry.h"
#include "server/monitors.h"
#include "server/state.h"

/* From OpenBLAS's cblas.h (Debian's pthread build); declared here so the
 * server does not depend on which cblas.h is first on the include path. */
void openblas_set_num_threads(int num_threads);

void cv_set_blas_threads(int n)
{
    if (n > 0)
        openblas_set_num_threads(n);
}

void cv_serve_config_default(cv_serve_config *c)
{
    memset(c, 0, sizeof *c);
    c->http.bind = "127.0.0.1";
    c->http.port = 8080;
    c->http.max_body = (size_t)256 << 20;
    c->http.max_job_body = (size_t)16 << 20;
    c->http.max_connections = 1024;
    c->http.max_connections_per_ip = 256;
    c->http.idle_timeout = 10;
    c->http.header_timeout = 10;
    c->http.max_wait = 300;
    c->http.upload_timeout = 3600;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    c->jobs.workers = ncpu < 1 ? 1 : ncpu > 8 ? 8 : (int)ncpu;
    c->jobs.max_queue = 256;
    c->jobs.job_timeout = 3600;
    c->jobs.keep_s = 600;
    c->jobs.max_kept = 10000;
    c->jobs.max_kept_bytes = (size_t)256 << 20;
    cv_job_limits_default(&c->jobs.limits);
    c->blas_threads = 1;
    c->max_registry_bytes = (size_t)1 << 30;
    c->max_memory = cv_memory_default_limit();
    c->grace_s = 10;
    c->demo = 1;
    c->rank_timeout = 300;
}

static void print_err(const char *what, const cv_err *e)
{
    fprintf(stderr, "curvd: %s: %s%s%s%s\n", what, e->message, e->field[0] ? " (" : "",
            e->field, e->field[0] ? ")" : "");
}

static int load_files(const cv_serve_config *c, cv_registry *reg)
{
    cv_err e;
    for (int i = 0; i < c->nmodels; i++) {
        const cv_model_spec *s = &c->models[i];
        cv_err_clear(&e);
        cv_model *m = calloc(1, sizeof *m);
        if (!m) {
            fprintf(stderr, "curvd: out of memory\n");
            return -1;
        }
        if (cv_arch_load(s->arch_path, m, &e) || cv_params_read(m, s->params_path, &e)) {
            char what[600];
            snprintf(what, sizeof what, "--model %s=%s:%s", s->name, s->arch_path,
                     s->params_path);
            print_err(what, &e);
            cv_model_free(m);
            free(m);
            return -1;
        }
        char src[160];
        snprintf(src, sizeof src, "file %s:%s", s->arch_path, s->params_path);
        if (cv_registry_add_model(reg, s->name, m, src, NULL, &e)) {
            print_err("--model", &e);
            return -1;
        }
        fprintf(stderr, "curvd: model %s from %s (%zu parameters)\n", s->name, src,
                m->nparams_total);
    }
    for (int i = 0; i < c->ndatasets; i++) {
        const cv_dataset_spec *s = &c->datasets[i];
        cv_err_clear(&e);
        cv_dataset *d = calloc(1, sizeof *d);
        if (!d) {
            fprintf(stderr, "curvd: out of memory\n");
            return -1;
        }
        if (cv_datafile_read(s->path, d, &e)) {
            char what[400];
            snprintf(what, sizeof what, "--dataset %s=%s", s->name, s->path);
            print_err(what, &e);
            free(d);
            return -1;
        }
        size_t n = d->n;
        char src[160];
        snprintf(src, sizeof src, "file %s", s->path);
        if (cv_registry_add_dataset(reg, s->name, d, src, NULL, &e)) {
            print_err("--dataset", &e);
            return -1;
        }
        fprintf(stderr, "curvd: dataset %s from %s (%zu samples)\n", s->name, s->path, n);
    }
    return 0;
}

/* Waits up to seconds for a signal in set; returns it, or 0 on timeout. */
static int wait_signal(const sigset_t *set, double seconds)
{
    if (seconds < 0) {
        int sig = 0;
        return sigwait(set, &sig) == 0 ? sig : 0;
    }
    struct timespec ts = {(time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9)};
    int sig = sigtimedwait(set, NULL, &ts);
    return sig > 0 ? sig : 0;
}

int cv_serve(const cv_serve_config *c)
{
    /* Block the shutdown signals in every thread (threads inherit the mask);
     * the main thread takes them with sigwait. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    struct stat dst;
    if (c->http.data_dir && (stat(c->http.data_dir, &dst) != 0 || !S_ISDIR(dst.st_mode))) {
        fprintf(stderr, "curvd: --data-dir %s: not a readable directory\n", c->http.data_dir);
        return 2;
    }
    cv_set_blas_threads(c->blas_threads);
    cv_registry *reg = cv_registry_new(c->max_registry_bytes);
    if (!reg) {
        fprintf(stderr, "curvd: out of memory\n");
        return 1;
    }
    cv_memory memory; /* --max-memory: lives as long as the daemon serves */
    cv_memory_init(&memory, c->max_memory);
    /* what the process holds by itself: counted first, so that jobs and
     * uploads get what is left of --max-memory */
    int nworkers = c->ranks ? 1 : c->jobs.workers;
    size_t baseline = cv_memory_self_resident() + (size_t)nworkers * CV_MEM_WORKER_BYTES;
    cv_memory_add(&memory, CV_MEM_BASELINE, baseline);
    if (c->max_memory && c->max_memory <= baseline) {
        fprintf(stderr, "curvd: --max-memory %zu bytes is not above the daemon's own baseline "
                "of %zu bytes (resident now, plus %zu per worker x %d workers): raise it or "
                "use fewer --workers\n", c->max_memory, baseline, CV_MEM_WORKER_BYTES, nworkers);
        cv_registry_free(reg);
        return 2;
    }
    cv_registry_set_memory(reg, &memory);
    cv_err e;
    cv_err_clear(&e);
    if (c->demo && cv_demo_register(reg, stderr, &e)) {
        print_err("demo", &e);
        cv_registry_free(reg);
        return 1;
    }
    if (load_files(c, reg)) {
        cv_registry_free(reg);
        return 1;
    }
    /* --state-dir: what clients registered last wins over the demo and the
     * command line; from here on every change is written there */
    cv_state *state = NULL;
    if (c->state_dir) {
        if (!(state = cv_state_open(c->state_dir, stderr, &e))) {
            print_err("--state-dir", &e);
            cv_registry_free(reg);
            return 2;
        }
        int n = cv_persist_attach(state, reg, c->http.data_dir);
        fprintf(stderr, "curvd: state directory %s: %d model%s and dataset%s read back\n",
                cv_state_dir(state), n, n == 1 ? "" : "s", n == 1 ? "" : "s");
    }
    cv_jobs_config jc = c->jobs;
    jc.ranks = c->ranks;
    jc.state = state;
    jc.memory = &memory;
    cv_jobs *jobs = cv_jobs_new(&jc, reg, &e);
    if (!jobs) {
        print_err("jobs", &e);
        cv_registry_free(reg);
        cv_state_close(state);
        return 1;
    }
    cv_monitors *monitors = cv_monitors_new(jobs, reg, state, c->monitor_history, &e);
    if (!monitors) {
        print_err("monitors", &e);
        cv_jobs_free(jobs);
        cv_registry_free(reg);
        cv_state_close(state);
        return 1;
    }
    cv_http_config hc = c->http;
    hc.state_dir = state != NULL;
    hc.monitors = monitors;
    hc.memory = &memory;
    cv_http *http = cv_http_start(&hc, reg, jobs, &e);
    if (!http) {
        print_err("http", &e);
        cv_jobs_free(jobs);
        cv_monitors_free(monitors);
        cv_registry_free(reg);
        cv_state_close(state);
        return 1;
    }
    const char *bind = c->http.bind ? c->http.bind : "127.0.0.1";
    int v6 = strchr(bind, ':') != NULL;
    fprintf(stderr,
            "curvd: %d workers, %d BLAS thread%s each, queue %zu, job timeout %g s, "
            "registry budget %zu bytes, memory limit %zu bytes, body limit %zu bytes (jobs "
            "%zu), kept results %zu bytes, max wait %g s\n",
            jc.ranks ? 1 : c->jobs.workers, c->blas_threads, c->blas_threads == 1 ? "" : "s",
            c->jobs.max_queue, c->jobs.job_timeout, c->max_registry_bytes, c->max_memory,
            c->http.max_body,
            c->http.max_job_body, c->jobs.max_kept_bytes, c->http.max_wait);
    if (jc.ranks)
        fprintf(stderr, "curvd: data-parallel over %d ranks (jobs run one at a time on all of "
                        "them; rank timeout %g s)\n", cv_ranks_size(jc.ranks), c->rank_timeout);
    fprintf(stderr, "curvd: access: %s, Host %s, CORS %s\n",
            !cv_http_tokens_required(http) ? "no token needed"
            : c->http.auth_token_file      ? "tokens required (--auth-token-file)"
                                           : "token required (--generate-token)",
            c->http.allowed_hosts ? c->http.allowed_hosts : "localhost names and --bind",
            c->http.cors_origin ? c->http.cors_origin : "off");
    const char *scheme = c->http.tls_cert ? "https" : "http";
    if (cv_http_generated_token(http))
        fprintf(stderr, "curvd: generated token (role admin; send 'Authorization: Bearer "
                "TOKEN', clients read CURVD_TOKEN): %s\n"
                "curvd: dashboard with the token: %s://%s%s%s:%d/#token=%s\n",
                cv_http_generated_token(http), scheme, v6 ? "[" : "",
                strcmp(bind, "0.0.0.0") == 0 || strcmp(bind, "::") == 0 ? "localhost" : bind,
                v6 ? "]" : "", cv_http_port(http), cv_http_generated_token(http));
    else if (c->http.generate_token && !c->http.auth_token_file)
        fprintf(stderr, "curvd: token from CURVD_TOKEN (role admin)\n");
    fprintf(stderr, "curvd: listening on %s://%s%s%s:%d\n", scheme, v6 ? "[" : "", bind,
            v6 ? "]" : "", cv_http_port(http));
    fflush(stderr);

    int sig = wait_signal(&set, -1);
    fprintf(stderr, "curvd: %s: draining: no new jobs, queued jobs cancelled, running jobs "
                    "get %g s to finish\n", sig == SIGINT ? "SIGINT" : "SIGTERM", c->grace_s);
    cv_jobs_drain(jobs);
    double deadline = cv_now_s() + c->grace_s;
    int left = cv_jobs_wait_idle(jobs, 0);
    while (left > 0 && cv_now_s() < deadline) {
        if (wait_signal(&set, 0.05)) {
            fprintf(stderr, "curvd: second signal: cancelling running jobs now\n");
            break;
        }
        left = cv_jobs_wait_idle(jobs, 0.15);
    }
    if (left > 0) {
        fprintf(stderr, "curvd: cancelling %d running job%s\n", left, left == 1 ? "" : "s");
        cv_jobs_cancel_running(jobs);
        left = cv_jobs_wait_idle(jobs, 30);
    }
    cv_jobs_stop_waiters(jobs);
    cv_http_stop(http);
    if (left > 0) {
        /* a job ignores its cancel flag (stuck outside a matvec): leave it */
        fprintf(stderr, "curvd: %d job%s did not stop; exiting without cleanup\n", left,
                left == 1 ? "" : "s");
        return 0;
    }
    cv_jobs_free(jobs);
    cv_monitors_free(monitors); /* after the workers (their done hook) */
    cv_registry_free(reg);
    cv_state_close(state);
    fprintf(stderr, "curvd: stopped\n");
    return 0;
}
