/* serve.h - `curvd serve`: wires registry, demo, job workers and HTTP
 * together, and shuts them down in order on SIGTERM/SIGINT.
 *
 * Shutdown: the first SIGTERM/SIGINT stops accepting jobs (POST /v1/jobs
 * answers 503, /v1/health reports "draining" with 503), cancels every queued
 * job at once, and lets running jobs finish for up to grace_s seconds while
 * status queries keep working; jobs still running then are cancelled (they
 * stop at their next matvec and end as "cancelled").  A second signal skips
 * the rest of the grace period.  Then HTTP stops and the process exits 0.
 *
 * BLAS threads: Debian's OpenBLAS (pthread build) has one process-wide thread
 * count, set once at startup with openblas_set_num_threads(blas_threads);
 * every worker's BLAS calls share it, so up to workers x blas_threads cores
 * are busy.  The default (blas_threads 1, workers = cores up to 8) runs jobs
 * in parallel, one core each; few large jobs do better with fewer workers and
 * more BLAS threads.
 */
#ifndef CV_SERVE_H
#define CV_SERVE_H

#include <stddef.h>

#include "server/http.h"
#include "server/jobs.h"

typedef struct {
    const char *name, *arch_path, *params_path;
} cv_model_spec;

typedef struct {
    const char *name, *path;
} cv_dataset_spec;

typedef struct {
    cv_http_config http;
    cv_jobs_config jobs;
    int blas_threads;         /* 0: leave OpenBLAS's default */
    size_t max_registry_bytes;
    size_t max_memory;        /* --max-memory (server/memory.h); 0: no limit */
    size_t monitor_history;   /* --monitor-history: entries kept per monitor (0: default) */
    double grace_s;
    int demo;                 /* register the built-in demo */
    const cv_model_spec *models;
    int nmodels;
    const cv_dataset_spec *datasets;
    int ndatasets;
    const char *state_dir;    /* --state-dir: models, datasets and jobs survive restarts
                               * (server/state.h, server/persist.h); NULL: in memory only */
    double rank_timeout;      /* under mpirun: longest wait for another rank (0: none) */
    cv_ranks *ranks;          /* under mpirun (rank 0): the ranks jobs run on; NULL: alone */
} cv_serve_config;

/* Fills the defaults documented in `curvd --help`. */
void cv_serve_config_default(cv_serve_config *c);

/* Runs the daemon until SIGTERM/SIGINT; returns the process exit status. */
int cv_serve(const cv_serve_config *c);

/* openblas_set_num_threads when n > 0 (no-op otherwise). */
void cv_set_blas_threads(int n);

#endif
