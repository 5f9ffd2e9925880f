/* jobs.h - the job table, the bounded queue and the worker pool.
 *
 * POST /v1/jobs lands in cv_jobs_submit(): the document is parsed into a
 * typed job (cv_job_parse: every check that needs no model), the model and
 * dataset are pinned in the registry (the exact versions current at
 * submission: later PUTs do not affect the job), the job is bound to them
 * (cv_job_bind: dataset fits the model, batch range, block names), and the
 * typed job is queued (the JSON document is not kept); a full queue is 429,
 * a draining service 503.  `workers` threads take jobs in FIFO order (the
 * low-priority lane of monitors only when no other job waits) and
 * run cv_job_exec() with a cv_progress whose cancel flag is the
 * job's and whose deadline is start + job_timeout (a job that runs past it
 * fails with code "job_timeout").  HTTP threads never run numerics.
 *
 * Memory (--max-memory, cfg.memory; server/memory.h): at submit a job's
 * need (its document, the engine's planned memory and its result's
 * estimate, cv_job_result_numbers) is checked: 413 result_too_large when
 * the result's text estimate exceeds --max-kept-bytes, 413 memory_limit
 * when the need cannot fit beside the registry's current versions even
 * with nothing else held, 429 memory_busy when the queued and running
 * jobs' documents and estimates leave no room for its document now.  A
 * queued job starts only when its estimate fits beside the running ones
 * (kept results are dropped for it, oldest first), or when nothing runs.
 *
 * Finished jobs (succeeded, failed, cancelled) stay readable for keep_s
 * seconds, then a janitor thread drops them; at most max_kept of them are
 * kept, holding at most max_kept_bytes (result text plus a small record):
 * beyond either cap the oldest finished jobs go first (the most recently
 * finished one always stays, whatever its size).
 *
 * With a state directory (cfg.state): a job is recorded there when it is
 * accepted (before 202), again when it finishes (before its status says so,
 * with the result) or is cancelled while queued (before the DELETE is
 * answered), and its record is removed when the job is dropped (keep_s,
 * max_kept, max_kept_bytes).  cv_jobs_new reads the records back: finished
 * jobs are kept as they were (the caps apply, by finishing time); a job that
 * was queued or running when the daemon stopped becomes failed with code
 * "interrupted".  Job ids come from a counter whose block reservations are
 * recorded (ids.cvst), so no id is given twice across restarts.
 *
 * Shutdown: cv_jobs_drain() refuses new jobs (503) and cancels every queued
 * job; cv_jobs_wait_idle() lets running jobs finish up to a grace period;
 * cv_jobs_cancel_running() cancels what is still running (each stops at its
 * next matvec); cv_jobs_free() joins the threads.
 */
#ifndef CV_JOBS_H
#define CV_JOBS_H

#include <cJSON.h>
#include <stddef.h>

#include "api/job.h"
#include "engine/err.h"
#include "server/memory.h"
#include "server/ranks.h"
#include "server/registry.h"
#include "server/state.h"

/* cv_job_status: api/job.h; cv_job_status_name and cv_job_status_from_name:
 * api/ops_table.h. */

typedef struct {
    int workers;              /* worker threads (>= 1) */
    size_t max_queue;         /* queued (not yet running) jobs (>= 1) */
    double job_timeout;       /* seconds of running time per job; 0 = none */
    double keep_s;            /* finished jobs are kept this long */
    size_t max_kept;          /* and at most this many */
    size_t max_kept_bytes;    /* and holding at most this many bytes (results); 0 = no cap */
    cv_job_limits limits;
    size_t max_queued_per_client; /* queued jobs one client may have (cv_jobs_submit_from); 0: no cap */
    cv_ranks *ranks;          /* under mpirun: jobs run on every rank (one at a time:
                               * workers is 1); NULL: in this process */
    cv_state *state;          /* --state-dir: jobs are recorded there (see below); NULL: not */
    int no_workers;           /* tests (the fuzz harness): start no thread (no worker,
                               * no janitor), so jobs stay queued and never run */
    cv_memory *memory;        /* --max-memory: the daemon's account (server/memory.h;
                               * borrowed, outlives the table); NULL: none */
} cv_jobs_config;

typedef struct cv_jobs cv_jobs;
typedef struct cv_job cv_job;

/* Starts the workers and the janitor.  NULL with e filled on failure. */
cv_jobs *cv_jobs_new(const cv_jobs_config *c, cv_registry *reg, cv_err *e);
/* Stops and joins all threads (cancelling anything left) and frees all. */
void cv_jobs_free(cv_jobs *J);

/* Under mpirun: model or dataset snapshot s was registered or replaced;
 * the other ranks get it now if they are idle (no-op otherwise). */
void cv_jobs_offer(cv_jobs *J, const cv_snap *s);
/* Ranks started by mpirun and ranks jobs run on now (1 and 1 without). */
void cv_jobs_ranks(const cv_jobs *J, int *size, int *alive);

/* Parses, binds and queues doc (borrowed; not kept).  timeout > 0 lowers the
 * job's time limit below the configured one.  On success *out holds a
 * reference to the job (cv_job_unref it). */
int cv_jobs_submit(cv_jobs *J, const cJSON *doc, double timeout, cv_job **out, cv_err *e);
/* cv_jobs_submit for a client (a token or address, at most 63 bytes kept;
 * NULL: none): when the client already has max_queued_per_client jobs
 * queued the job is refused (429 client_queue_full). */
int cv_jobs_submit_from(cv_jobs *J, const cJSON *doc, double timeout, const char *client,
                        cv_job **out, cv_err *e);

/* cv_jobs_submit_from with the batch's indices read apart from the text
 * (cv_job_text_indices, api/job.h): doc's batch.indices is the placeholder,
 * idx (n of them) the real ones, taken in every case.  Not under mpirun. */
int cv_jobs_submit_indices(cv_jobs *J, const cJSON *doc, int32_t *idx, size_t n,
                           double timeout, const char *client, cv_job **out, cv_err *e);

/* The low-priority lane (monitors, server/monitors.h): the job is queued
 * behind every interactive job (a worker takes it only when the normal
 * queue is empty), is not counted against --max-queue or a client's quota
 * and is refused only while draining.  *out as for cv_jobs_submit. */
int cv_jobs_submit_low(cv_jobs *J, const cJSON *doc, cv_job **out, cv_err *e);
/* Takes a low-priority job that has not started out of the queue and the
 * job table as if it had never been submitted (its record too); returns 1,
 * or 0 when it has started (or finished) and is left alone.  The caller's
 * reference stays the caller's. */
int cv_jobs_withdraw(cv_jobs *J, cv_job *j);
/* Called by the worker when a low-priority job it ran has finished (its
 * status already says so): result is the result text (NULL unless it
 * succeeded), err the error otherwise.  Set once, before jobs run. */
typedef void (*cv_jobs_done_fn)(void *arg, cv_job *j, const char *result, const cv_err *err,
                                unsigned long model_version, double finished_at);
void cv_jobs_set_done_hook(cv_jobs *J, cv_jobs_done_fn fn, void *arg);

/* A reference to the job with this id, or NULL (404 in e). */
cv_job *cv_jobs_get(cv_jobs *J, const char *id, cv_err *e);
/* Another reference to j (released with cv_job_unref). */
void cv_job_ref(cv_job *j);
void cv_job_unref(cv_job *j);
const char *cv_job_id(const cv_job *j);

/* Waits up to seconds for the job to finish; returns 1 if it is finished. */
int cv_jobs_wait(cv_jobs *J, cv_job *j, double seconds);
/* Cancels: a queued job becomes cancelled at once; a running job gets its
 * cancel flag and stops at its next matvec (this waits up to `wait`
 * seconds for that).  Finished jobs are left as they are. */
void cv_jobs_cancel(cv_jobs *J, cv_job *j, double wait);

/* The status document without the result: {"id","status","op","model",
 * "model_version","dataset","dataset_version","created_at","started_at",
 * "finished_at","timeout_s","progress":{...}} plus "error" when failed or
 * cancelled (listings). */
cJSON *cv_job_to_json(cv_jobs *J, cv_job *j);
/* The full status document as compact JSON text (malloc()ed, *len bytes),
 * with "result" for a succeeded job.  Results are kept as printed text, so
 * large results are not copied into a JSON tree again. */
char *cv_job_status_text(cv_jobs *J, cv_job *j, size_t *len);
/* The same document in parts, for replies streamed without a copy of the
 * result: returns the status document without its closing brace
 * (malloc()ed, *head_len bytes) and sets *result to the kept result text
 * (*result_len bytes; NULL unless the job succeeded), which stays valid and
 * unchanged while the caller holds a reference to j.  The whole document is
 * head + ",\"result\":" + result + "}" (head + "}" without a result). */
char *cv_job_status_parts(cv_jobs *J, cv_job *j, size_t *head_len, const char **result,
                          size_t *result_len);

/* {"jobs": [...]} filtered by status/model/dataset/op (NULL = any), oldest
 * first, at most limit entries (the newest ones). */
cJSON *cv_jobs_list(cv_jobs *J, int status, const char *model, const char *dataset,
                    const char *op, size_t limit);

/* Shutdown steps (see above). */
void cv_jobs_drain(cv_jobs *J);
int cv_jobs_draining(cv_jobs *J);
/* Waits up to seconds for no job to be running; returns running jobs left. */
int cv_jobs_wait_idle(cv_jobs *J, double seconds);
void cv_jobs_cancel_running(cv_jobs *J);
/* Makes every cv_jobs_wait return at once (before stopping HTTP). */
void cv_jobs_stop_waiters(cv_jobs *J);

#define CV_HIST_BUCKETS 12
extern const double cv_job_hist_bounds[CV_HIST_BUCKETS]; /* seconds; +Inf implied */

typedef struct {
    size_t queue_depth, max_queue;
    int workers, busy_workers;
    long by_status[CV_JOB_NSTATUS];     /* jobs currently held, by status */
    long finished_total[CV_JOB_NSTATUS]; /* jobs that ended in this status, ever */
    long submitted_total, rejected_total;
    long matvecs_total;                 /* finished jobs plus running ones so far */
    unsigned long hist[CV_HIST_BUCKETS + 1]; /* cumulative counts, last = +Inf */
    double hist_sum;
    unsigned long hist_count;
    /* time from submission to start (or to cancellation while queued) */
    unsigned long qhist[CV_HIST_BUCKETS + 1];
    double qhist_sum;
    unsigned long qhist_count;
    size_t kept_bytes, max_kept_bytes;  /* finished jobs' memory and its cap */
    /* --max-memory: the limit (0: none) and the account by cv_mem_kind (the
     * registry's part read from the registry) */
    size_t memory_limit, memory_used[CV_MEM_KINDS];
    long memory_waits_total;            /* times a job waited in the queue for memory */
    long evicted_total;                 /* finished jobs dropped for the byte cap */
} cv_jobs_stats;

void cv_jobs_stats_get(cv_jobs *J, cv_jobs_stats *st);

#endif
