/* jobs.c - job table, bounded FIFO queue, worker threads, janitor and job
 * metrics (see jobs.h for the life of a job). */
#include "server/jobs.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "api/op_laplace.h"
#include "api/ops_table.h"
#include "engine/linop.h"
#include "server/util.h"

const double cv_job_hist_bounds[CV_HIST_BUCKETS] = {0.01, 0.05, 0.1, 0.25, 0.5, 1,
                                                    2.5,  5,    10,  30,   60,  300};

struct cv_job {
    atomic_int refs;
    char id[24];
    cv_job_spec *spec;               /* the typed job; freed when it finishes */
    char *text;                      /* under mpirun: the document, for the other ranks */
    char op[32];
    char client[64];                 /* who submitted it (cv_jobs_submit_from), or "" */
    char model[CV_REG_NAME_MAX + 1], dataset[CV_REG_NAME_MAX + 1];
    cv_snap *msnap, *dsnap;          /* pinned until the job finishes */
    cv_snap *psnap;                  /* the kept posterior it reads (pinned likewise), or NULL */
    char keep[CV_REG_NAME_MAX + 1];  /* the name it keeps a posterior under, or "" */
    unsigned long model_version, dataset_version;
    double timeout;                  /* seconds of running time, 0 = none */
    double created_at, started_at, finished_at;   /* wall clock */
    double t_submit, t_start, t_end;                /* monotonic */
    cv_job_status status;            /* guarded by J->mu */
    cv_progress progress;
    atomic_int cancel;
    const char *cancel_code, *cancel_msg; /* why the cancel flag was set */
    char *result_text;               /* compact JSON of the result (succeeded) */
    size_t result_len;
    cv_err err;                      /* failed / cancelled */
    int low;                         /* queued in the low-priority lane (monitors) */
    size_t doc_bytes;                /* --max-memory: its document, counted until it ends */
    size_t run_bytes;                /* and its engine + result estimate while it runs */
    size_t result_bytes;             /* the result's part of run_bytes (the engine's goes
                                      * when the engine returns) */
    int waited_memory;               /* counted in memory_waits_total */
    cv_curv_plan plan;               /* the submit check's micro-batch plan, handed to */
    int planned;                     /* the engine (one process only): no second probe */
    struct cv_job *qnext;            /* queue link */
    struct cv_job *prev, *next;      /* table links, creation order */
};

struct cv_jobs {
    cv_jobs_config cfg;
    cv_registry *reg;
    pthread_mutex_t mu;
    pthread_cond_t work_cv;          /* queue became non-empty / stop */
    pthread_cond_t done_cv;          /* some job finished */
    pthread_cond_t jan_cv;           /* janitor wake-up */
    cv_job *qhead, *qtail;
    size_t qlen;
    cv_job *lqhead, *lqtail;         /* the low-priority lane: taken when qhead is empty */
    size_t lqlen;
    cv_jobs_done_fn done_fn;         /* called when a low-priority job ends */
    void *done_arg;
    cv_job *head, *tail;             /* all kept jobs */
    size_t njobs;
    size_t kept_bytes;               /* memory of finished jobs (results) */
    long evicted_total;              /* finished jobs dropped for max_kept_bytes */
    long memory_waits_total;         /* jobs that waited in the queue for memory */
    int draining, stop, stop_waiters;
    int busy;
    pthread_mutex_t idmu;            /* guards the id counter (taken alone or inside mu) */
    uint64_t counter, salt;
    uint64_t id_reserved;            /* --state-dir: ids up to this are recorded as used */
    pthread_t *threads;
    int nthreads;
    pthread_t janitor;
    int have_janitor;
    /* metrics */
    long finished_total[CV_JOB_NSTATUS];
    long submitted_total, rejected_total;
    long matvecs_finished;
    unsigned long hist[CV_HIST_BUCKETS + 1];
    double hist_sum;
    unsigned long hist_count;
    unsigned long qhist[CV_HIST_BUCKETS + 1]; /* submit -> start (or -> cancel while queued) */
    double qhist_sum;
    unsigned long qhist_count;
};

/* What a finished job costs to keep: its result text plus the record
 * (counted in J->kept_bytes from finish_locked until purge drops it). */
static size_t job_kept_bytes(const cv_job *j) { return sizeof *j + j->result_len; }

/* Under J->mu: finished jobs' bytes come and go (J->kept_bytes and the
 * memory account's kept_results together). */
static void kept_add(cv_jobs *J, size_t b)
{
    J->kept_bytes += b;
    cv_memory_add(J->cfg.memory, CV_MEM_KEPT, b);
}

static void kept_sub(cv_jobs *J, size_t b)
{
    J->kept_bytes -= b;
    cv_memory_sub(J->cfg.memory, CV_MEM_KEPT, b);
}

/* The registry's part of the memory account: current versions, uploads in
 * parts and old versions pinned by jobs. */
static size_t registry_used(cv_jobs *J)
{
    cv_registry_stats st;
    cv_registry_stats_get(J->reg, &st);
    return st.bytes + st.staged_bytes + st.retired_bytes;
}

/* Under J->mu: what kept results may hold now: --max-kept-bytes, and under
 * --max-memory what the registry, the jobs' documents, the running jobs and
 * `reserve` (a job about to start) leave; SIZE_MAX: no cap. */
static size_t kept_cap_locked(cv_jobs *J, size_t reserve)
{
    size_t cap = J->cfg.max_kept_bytes ? J->cfg.max_kept_bytes : SIZE_MAX;
    const cv_memory *m = J->cfg.memory;
    if (m && m->limit) {
        size_t busy = registry_used(J) + cv_memory_in_flight(m) + reserve;
        size_t left = busy < m->limit ? m->limit - busy : 0;
        cap = left < cap ? left : cap;
    }
    return cap;
}

/* Under J->mu: the finished jobs hold more than they may (kept_cap_locked). */
static int over_kept_bytes(cv_jobs *J) { return J->kept_bytes > kept_cap_locked(J, 0); }

/* Under J->mu: j's document leaves the memory account (it ended or was withdrawn). */
static void release_doc_locked(cv_jobs *J, cv_job *j)
{
    cv_memory_sub(J->cfg.memory, CV_MEM_DOCUMENTS, j->doc_bytes);
    j->doc_bytes = 0;
}

static void hist_add(unsigned long *h, double *sum, unsigned long *count, double d)
{
    for (int b = 0; b < CV_HIST_BUCKETS; b++)
        if (d <= cv_job_hist_bounds[b])
            h[b]++;
    h[CV_HIST_BUCKETS]++;
    *sum += d;
    (*count)++;
}

static int is_finished(cv_job_status s) { return s >= CV_JOB_SUCCEEDED; }

const char *cv_job_id(const cv_job *j) { return j->id; }

static void job_ref(cv_job *j) { atomic_fetch_add(&j->refs, 1); }

void cv_job_ref(cv_job *j) { atomic_fetch_add(&j->refs, 1); }

void cv_job_unref(cv_job *j)
{
    if (!j || atomic_fetch_sub(&j->refs, 1) != 1)
        return;
    cv_job_spec_free(j->spec);
    free(j->text);
    free(j->result_text);
    /* pins are released when the job finishes; this is a safety net */
    cv_snap_unref(j->msnap);
    cv_snap_unref(j->dsnap);
    cv_snap_unref(j->psnap);
    free(j);
}

/* ---- time helpers ---------------------------------------------------------- */

static void abs_deadline(struct timespec *ts, double seconds)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    if (seconds < 0)
        seconds = 0;
    if (seconds > 1e6)
        seconds = 1e6;
    long sec = (long)seconds;
    long nsec = (long)((seconds - (double)sec) * 1e9);
    ts->tv_sec += sec;
    ts->tv_nsec += nsec;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

static int init_cond(pthread_cond_t *c)
{
    pthread_condattr_t a;
    if (pthread_condattr_init(&a))
        return -1;
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    int rc = pthread_cond_init(c, &a);
    pthread_condattr_destroy(&a);
    return rc;
}

/* Wall-clock times of jobs are kept to the microsecond, and records print
 * them with exactly six decimals: a restored time is the same double, so its
 * millisecond in the status documents is too (cJSON's shortest form may
 * drop a digit that moves it across a millisecond). */
static double wall_us(void) { return round(cv_wall_s() * 1e6) / 1e6; }

static int add_time_us(cJSON *o, const char *key, double t)
{
    char buf[40];
    snprintf(buf, sizeof buf, "%.6f", t);
    return cJSON_AddRawToObject(o, key, buf) != NULL;
}

/* ---- finishing ------------------------------------------------------------- */

/* Under J->mu: marks j finished with status st, releases its pins, updates
 * metrics and wakes waiters. */
static void finish_locked(cv_jobs *J, cv_job *j, cv_job_status st)
{
    int ran = j->status == CV_JOB_RUNNING;
    j->status = st;
    if (j->finished_at <= 0) { /* both set already when its record was written first */
        j->finished_at = wall_us();
        j->t_end = cv_now_s();
    }
    cv_registry_release(J->reg, j->psnap);
    cv_registry_release(J->reg, j->msnap);
    cv_registry_release(J->reg, j->dsnap);
    j->msnap = j->dsnap = j->psnap = NULL;
    /* the typed job is only needed to run it */
    cv_job_spec_free(j->spec);
    j->spec = NULL;
    free(j->text);
    j->text = NULL;
    release_doc_locked(J, j);
    kept_add(J, job_kept_bytes(j));
    J->finished_total[st]++;
    if (ran) {
        J->busy--;
        cv_memory_sub(J->cfg.memory, CV_MEM_RUNNING, j->run_bytes);
        j->run_bytes = 0;
        pthread_cond_broadcast(&J->work_cv); /* a job waiting for memory may fit now */
        J->matvecs_finished += atomic_load(&j->progress.done);
        hist_add(J->hist, &J->hist_sum, &J->hist_count, j->t_end - j->t_start);
    } else {
        /* cancelled while queued: its whole life was queue time */
        hist_add(J->qhist, &J->qhist_sum, &J->qhist_count, j->t_end - j->t_submit);
    }
    pthread_cond_broadcast(&J->done_cv);
}

/* Under J->mu: asks a running job to stop at its next matvec. */
static void set_cancel_locked(cv_job *j, const char *code, const char *msg)
{
    if (!j->cancel_code) {
        j->cancel_code = code;
        j->cancel_msg = msg;
    }
    atomic_store(&j->cancel, 1);
}

/* Under J->mu: takes queued j out of its lane; -1 if it is not queued there. */
static int unlink_queued_locked(cv_jobs *J, cv_job *j)
{
    cv_job **head = j->low ? &J->lqhead : &J->qhead, **tail = j->low ? &J->lqtail : &J->qtail;
    cv_job **pp = head, *prev = NULL;
    while (*pp && *pp != j) {
        prev = *pp;
        pp = &(*pp)->qnext;
    }
    if (!*pp)
        return -1;
    *pp = j->qnext;
    if (*tail == j)
        *tail = prev;
    j->qnext = NULL;
    if (j->low)
        J->lqlen--;
    else
        J->qlen--;
    return 0;
}

/* Under J->mu: removes a queued job from the queue and cancels it; returns
 * the queue's reference for the caller to drop after unlocking. */
static cv_job *cancel_queued_locked(cv_jobs *J, cv_job *j, const char *code, const char *msg)
{
    if (unlink_queued_locked(J, j))
        return NULL;
    pthread_cond_broadcast(&J->work_cv); /* it may have held the queue's head for memory */
    cv_err_set(&j->err, CV_ECANCELLED, code, "", "%s", msg);
    finish_locked(J, j, CV_JOB_CANCELLED);
    return j;
}

/* ---- the state directory (--state-dir) -------------------------------------- */

static uint64_t mix64(uint64_t x);

/* The record's meta: the job's status fields with times as epoch seconds
 * (st, run_s and finished_at as they will be once the record is written). */
static char *job_meta_text(const cv_job *j, cv_job_status st, double run_s, double finished_at)
{
    cJSON *o = cJSON_CreateObject();
    char *text = NULL;
    if (!o || !cJSON_AddStringToObject(o, "id", j->id) ||
        !cJSON_AddStringToObject(o, "status", cv_job_status_name(st)) ||
        !cJSON_AddStringToObject(o, "op", j->op) ||
        !cJSON_AddStringToObject(o, "model", j->model) ||
        !cJSON_AddNumberToObject(o, "model_version", (double)j->model_version) ||
        !cJSON_AddStringToObject(o, "dataset", j->dataset) ||
        !cJSON_AddNumberToObject(o, "dataset_version", (double)j->dataset_version) ||
        !add_time_us(o, "created_at", j->created_at) ||
        !add_time_us(o, "started_at", j->started_at) ||
        !add_time_us(o, "finished_at", finished_at) ||
        !cJSON_AddNumberToObject(o, "run_s", run_s) ||
        !cJSON_AddNumberToObject(o, "timeout_s", j->timeout) ||
        !cJSON_AddNumberToObject(o, "matvecs_done", (double)atomic_load(&j->progress.done)) ||
        !cJSON_AddNumberToObject(o, "matvecs_planned",
                                 (double)atomic_load(&j->progress.planned)))
        goto out;
    if (st == CV_JOB_FAILED || st == CV_JOB_CANCELLED) {
        cJSON *e = cJSON_AddObjectToObject(o, "error");
        if (!e || !cJSON_AddNumberToObject(e, "status", (double)j->err.status) ||
            !cJSON_AddStringToObject(e, "code", j->err.code) ||
            !cJSON_AddStringToObject(e, "field", j->err.field) ||
            !cJSON_AddStringToObject(e, "message", j->err.message))
            goto out;
    }
    text = cJSON_PrintUnformatted(o);
out:
    cJSON_Delete(o);
    return text;
}

/* Writes j's record as status st (the result with it when succeeded).  Not
 * under J->mu (it fsyncs): only fields no other thread writes any more are
 * read.  -1 with e filled (and a log line) on failure. */
static int record_job_e(cv_jobs *J, cv_job *j, cv_job_status st, double run_s,
                        double finished_at, cv_err *e)
{
    char *meta = job_meta_text(j, st, run_s, finished_at);
    if (!meta)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
    const char *res = st == CV_JOB_SUCCEEDED ? j->result_text : NULL;
    int rc = cv_state_write(J->cfg.state, CV_STATE_JOB, j->id, meta, strlen(meta), res,
                            res ? j->result_len : 0, e);
    free(meta);
    if (rc)
        fprintf(stderr, "curvd: state: job %s (%s): %s\n", j->id, cv_job_status_name(st),
                e->message);
    return rc;
}

static void record_job(cv_jobs *J, cv_job *j, cv_job_status st, double run_s,
                       double finished_at)
{
    cv_err e;
    if (J->cfg.state)
        record_job_e(J, j, st, run_s, finished_at, &e);
}

/* A result this large was a cJSON tree of many small nodes (about 80 bytes
 * per number) freed just now: the heap gives those pages back to the OS
 * (glibc keeps freed small chunks otherwise; large buffers are mmap()ed and
 * go back by themselves). */
#define TRIM_AFTER_BYTES ((size_t)4 << 20)

static void give_back_memory(void)
{
#ifdef __GLIBC__
    malloc_trim(0);
#endif
}

#define ID_BLOCK 4096 /* ids reserved (recorded as used) per write of ids.cvst */

static int ids_write(cv_jobs *J, uint64_t reserved, cv_err *e)
{
    char meta[128];
    int n = snprintf(meta, sizeof meta, "{\"salt\":\"%016llx\",\"reserved\":\"%llu\"}",
                     (unsigned long long)J->salt, (unsigned long long)reserved);
    return cv_state_write(J->cfg.state, CV_STATE_IDS, "ids", meta, (size_t)n, NULL, 0, e);
}

/* Reads the id salt and the last reserved counter back (a fresh salt when
 * there is no usable ids.cvst). */
static void ids_load(cv_jobs *J)
{
    char path[8400], why[256];
    cv_state_path(J->cfg.state, CV_STATE_IDS, "ids", path, sizeof path);
    cv_state_rec rec;
    if (cv_state_read(path, CV_STATE_IDS, &rec, why, sizeof why)) {
        if (access(path, F_OK) == 0)
            cv_state_set_aside(J->cfg.state, path, why);
        return;
    }
    unsigned long long salt, reserved;
    cJSON *o = cJSON_ParseWithLength(rec.meta, rec.meta_len);
    const cJSON *sa = cJSON_GetObjectItemCaseSensitive(o, "salt");
    const cJSON *re = cJSON_GetObjectItemCaseSensitive(o, "reserved");
    if (cJSON_IsString(sa) && cJSON_IsString(re) && sscanf(sa->valuestring, "%llx", &salt) == 1 &&
        sscanf(re->valuestring, "%llu", &reserved) == 1) {
        J->salt = salt;
        J->counter = J->id_reserved = reserved; /* the next id starts a new block */
    } else {
        cv_state_set_aside(J->cfg.state, path, "no salt and reserved counter");
    }
    cJSON_Delete(o);
    cv_state_rec_free(&rec);
}

/* The next job id into id; with a state directory a new block of ids is
 * recorded first when the reserved ones are used up. */
static int next_id(cv_jobs *J, char *id, size_t len, cv_err *e)
{
    pthread_mutex_lock(&J->idmu);
    uint64_t c = J->counter + 1;
    if (J->cfg.state && c > J->id_reserved) {
        if (ids_write(J, J->id_reserved + ID_BLOCK, e)) {
            pthread_mutex_unlock(&J->idmu);
            return -1;
        }
        J->id_reserved += ID_BLOCK;
    }
    J->counter = c;
    snprintf(id, len, "%016llx", (unsigned long long)mix64(J->salt + c));
    pthread_mutex_unlock(&J->idmu);
    return 0;
}

typedef struct {
    cv_jobs *J;
    cv_job **v;
    size_t n, cap;
} restore_ctx;

static const char *str_item(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static double num_item(const cJSON *o, const char *k, int *ok)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (!cJSON_IsNumber(v))
        *ok = 0;
    return cJSON_IsNumber(v) ? v->valuedouble : 0;
}

/* Builds a finished job from its record (an unfinished one becomes failed,
 * "interrupted", and its record is rewritten). */
static int restore_one(void *arg, const char *name, const cv_state_rec *rec, char *why,
                       size_t wl)
{
    restore_ctx *R = arg;
    cJSON *o = cJSON_ParseWithLength(rec->meta, rec->meta_len);
    const char *id = str_item(o, "id"), *status = str_item(o, "status"), *op = str_item(o, "op");
    const char *model = str_item(o, "model"), *dataset = str_item(o, "dataset");
    int ok = id && status && op && model && dataset && strcmp(id, name) == 0 &&
             strlen(id) < sizeof(((cv_job *)0)->id) && cv_job_status_from_name(status) >= 0;
    double mv = num_item(o, "model_version", &ok), dv = num_item(o, "dataset_version", &ok);
    double created = num_item(o, "created_at", &ok), started = num_item(o, "started_at", &ok);
    double finished = num_item(o, "finished_at", &ok), run_s = num_item(o, "run_s", &ok);
    double timeout = num_item(o, "timeout_s", &ok);
    double done = num_item(o, "matvecs_done", &ok), planned = num_item(o, "matvecs_planned", &ok);
    cv_job *j = NULL;
    if (!ok) {
        snprintf(why, wl, "not a job record (fields missing)");
        cJSON_Delete(o);
        return -1;
    }
    if (R->n == R->cap) {
        size_t nc = R->cap ? 2 * R->cap : 64;
        cv_job **nv = realloc(R->v, nc * sizeof *nv);
        if (!nv)
            goto oom;
        R->v = nv;
        R->cap = nc;
    }
    if (!(j = calloc(1, sizeof *j)))
        goto oom;
    atomic_init(&j->refs, 1);
    atomic_init(&j->cancel, 0);
    cv_progress_init(&j->progress);
    j->progress.cancel = &j->cancel;
    snprintf(j->id, sizeof j->id, "%s", id);
    snprintf(j->op, sizeof j->op, "%s", op);
    snprintf(j->model, sizeof j->model, "%s", model);
    snprintf(j->dataset, sizeof j->dataset, "%s", dataset);
    j->model_version = (unsigned long)mv;
    j->dataset_version = (unsigned long)dv;
    j->created_at = created;
    j->started_at = started;
    j->finished_at = finished;
    j->timeout = timeout;
    atomic_store(&j->progress.done, (long)done);
    atomic_store(&j->progress.planned, (long)planned);
    j->status = (cv_job_status)cv_job_status_from_name(status);
    const cJSON *err = cJSON_GetObjectItemCaseSensitive(o, "error");
    if (cJSON_IsObject(err)) {
        int eok = 1;
        double es = num_item(err, "status", &eok);
        const char *code = str_item(err, "code"), *field = str_item(err, "field");
        const char *msg = str_item(err, "message");
        cv_err_set(&j->err, eok ? (cv_status)es : CV_EINTERNAL, code ? code : "internal",
                   field ? field : "", "%s", msg ? msg : "");
    }
    if (j->status == CV_JOB_SUCCEEDED) {
        if (!(j->result_text = malloc(rec->blob_len + 1)))
            goto oom;
        memcpy(j->result_text, rec->blob, rec->blob_len);
        j->result_text[rec->blob_len] = 0;
        j->result_len = rec->blob_len;
    }
    if (!is_finished(j->status)) {
        /* queued or running when the daemon stopped */
        j->status = CV_JOB_FAILED;
        j->finished_at = wall_us();
        run_s = started > 0 ? j->finished_at - started : 0;
        cv_err_set(&j->err, CV_EUNAVAILABLE, "interrupted", "",
                   "the daemon stopped (restart or crash) before this job finished; "
                   "submit it again");
        record_job(R->J, j, CV_JOB_FAILED, run_s, j->finished_at);
    }
    /* monotonic times as if it had finished in this process */
    double age = cv_wall_s() - j->finished_at;
    j->t_end = cv_now_s() - (age > 0 ? age : 0);
    j->t_start = j->t_end - run_s;
    j->t_submit = j->t_start;
    R->v[R->n++] = j;
    cJSON_Delete(o);
    return 0;
oom:
    snprintf(why, wl, "out of memory");
    cJSON_Delete(o);
    cv_job_unref(j);
    return 1;
}

static int cmp_created(const void *a, const void *b)
{
    const cv_job *x = *(cv_job *const *)a, *y = *(cv_job *const *)b;
    return x->created_at < y->created_at ? -1 : x->created_at > y->created_at;
}

static void purge(cv_jobs *J);
static int purge_for(cv_jobs *J, size_t reserve);

/* Under J->mu: j leaves the job list (its own next/prev are left as they were). */
static void unlink_locked(cv_jobs *J, cv_job *j)
{
    if (j->prev)
        j->prev->next = j->next;
    else
        J->head = j->next;
    if (j->next)
        j->next->prev = j->prev;
    else
        J->tail = j->prev;
    J->njobs--;
}

/* Under J->mu (or before the workers start): j joins the end of the job list. */
static void append_locked(cv_jobs *J, cv_job *j)
{
    j->prev = J->tail;
    if (J->tail)
        J->tail->next = j;
    else
        J->head = j;
    J->tail = j;
    J->njobs++;
}

/* Reads the id counter and the job records back (before the workers start). */
static void restore_jobs(cv_jobs *J)
{
    ids_load(J);
    restore_ctx R = {J, NULL, 0, 0};
    cv_state_scan(J->cfg.state, CV_STATE_JOB, restore_one, &R);
    if (R.n)
        qsort(R.v, R.n, sizeof *R.v, cmp_created);
    for (size_t i = 0; i < R.n; i++) {
        cv_job *j = R.v[i];
        append_locked(J, j);
        kept_add(J, job_kept_bytes(j));
    }
    free(R.v);
    size_t n = J->njobs;
    purge(J); /* --keep-jobs, --max-kept-bytes and the count cap, as if they had run here */
    if (n)
        fprintf(stderr, "curvd: state: %zu finished job%s read back, %zu kept\n", n,
                n == 1 ? "" : "s", J->njobs);
}

/* Keeps the posterior job j produced (its keep name, its model version;
 * accumulate_into: only if the one it read is still the current one). */
static int keep_posterior(cv_jobs *J, cv_job *j, struct cv_lap_post *p, cv_err *e)
{
    const char *rd, *wr;
    cv_lap_job_names(j->spec, &rd, &wr);
    return cv_registry_keep_posterior(J->reg, j->msnap, j->keep, p, p->bytes,
                                      cv_lap_post_destroy,
                                      rd && wr && strcmp(rd, wr) == 0 ? j->psnap : NULL, NULL,
                                      e);
}

/* ---- workers --------------------------------------------------------------- */

/* Under J->mu: whether queued job j may start under --max-memory: the
 * registry, the documents, the running jobs' estimates, the kept results
 * (evictable: *kept_in_way says they alone are in the way) and j's own
 * estimate fit the limit.  A job always may when nothing runs (submit made
 * sure it fits alone), so the queue never deadlocks. */
static int may_start_locked(cv_jobs *J, const cv_job *j, int *kept_in_way)
{
    const cv_memory *m = J->cfg.memory;
    *kept_in_way = 0;
    if (!m || !m->limit)
        return 1;
    size_t busy = registry_used(J) + cv_memory_in_flight(m) + j->run_bytes;
    if (busy + J->kept_bytes <= m->limit)
        return 1;
    *kept_in_way = J->kept_bytes > 0 && (busy <= m->limit || J->busy == 0);
    return 0;
}

/* Under J->mu: waits for the next job a worker may start (interactive jobs
 * first, the low-priority lane only when none waits; FIFO: a job waiting
 * for memory holds back the ones behind it) and returns it, still queued;
 * NULL when the workers stop.  Kept results in its way are dropped, oldest
 * first, before it waits; a job that cannot fit beside the running ones
 * waits for one of them to end. */
static cv_job *take_locked(cv_jobs *J)
{
    cv_job *tried = NULL; /* kept results were dropped for this one already */
    for (;;) {
        if (J->stop && !J->qhead && !J->lqhead)
            return NULL;
        cv_job *j = J->qhead ? J->qhead : J->lqhead;
        if (!j) {
            pthread_cond_wait(&J->work_cv, &J->mu);
            continue;
        }
        int kept_in_way;
        if (may_start_locked(J, j, &kept_in_way))
            return j;
        if (kept_in_way && tried != j) {
            tried = j;
            size_t reserve = j->run_bytes;
            job_ref(j); /* stays valid while the lock is dropped */
            pthread_mutex_unlock(&J->mu);
            purge_for(J, reserve);
            pthread_mutex_lock(&J->mu);
            cv_job_unref(j); /* the queue or the caller still holds it */
            continue;
        }
        if (J->busy == 0)
            return j; /* it fits alone (checked at submit): never wait for nothing */
        if (!j->waited_memory) {
            j->waited_memory = 1;
            J->memory_waits_total++;
        }
        struct timespec ts;
        abs_deadline(&ts, 1.0); /* also sees registry memory freed meanwhile */
        pthread_cond_timedwait(&J->work_cv, &J->mu, &ts);
        tried = NULL;
    }
}

/* The engine returned: its part of j's estimate leaves the account (a
 * posterior it made is counted by the registry once kept, not twice); the
 * result's part stays until j finishes. */
static void engine_done(cv_jobs *J, cv_job *j)
{
    pthread_mutex_lock(&J->mu);
    cv_memory_sub(J->cfg.memory, CV_MEM_RUNNING, j->run_bytes - j->result_bytes);
    j->run_bytes = j->result_bytes;
    pthread_cond_broadcast(&J->work_cv); /* a job waiting for memory may fit now */
    pthread_mutex_unlock(&J->mu);
}

static void *worker_main(void *arg)
{
    cv_jobs *J = arg;
    for (;;) {
        pthread_mutex_lock(&J->mu);
        cv_job *j = take_locked(J);
        if (!j) {
            pthread_mutex_unlock(&J->mu);
            break;
        }
        unlink_queued_locked(J, j);
        J->busy++;
        cv_memory_add(J->cfg.memory, CV_MEM_RUNNING, j->run_bytes);
        j->status = CV_JOB_RUNNING;
        j->started_at = wall_us();
        j->t_start = cv_now_s();
        hist_add(J->qhist, &J->qhist_sum, &J->qhist_count, j->t_start - j->t_submit);
        j->progress.deadline = j->timeout > 0 ? j->t_start + j->timeout : 0;
        const cv_model *m = j->msnap->model;
        const cv_dataset *d = j->dsnap->data;
        pthread_mutex_unlock(&J->mu);

        cv_err err;
        cv_err_clear(&err);
        cv_job_store store = {j->psnap ? j->psnap->backing : NULL, NULL};
        cJSON *res = J->cfg.ranks ? cv_ranks_exec(J->cfg.ranks, j->spec, j->text, j->msnap,
                                                  j->dsnap, &J->cfg.limits, &j->progress, &err)
                                  : cv_job_exec_planned(j->spec, m, d, &J->cfg.limits,
                                                        j->planned ? &j->plan : NULL,
                                                        &j->progress, &store, &err);
        engine_done(J, j);
        if (res && store.out && keep_posterior(J, j, store.out, &err)) {
            cJSON_Delete(res); /* not kept: the job fails with the registry's error */
            res = NULL;
        } else if (store.out && !res) {
            cv_lap_post_destroy(store.out);
        }
        char *text = NULL;
        if (res) {
            text = cJSON_PrintUnformatted(res);
            cJSON_Delete(res);
            if (!text)
                cv_err_set(&err, CV_ENOMEM, "out_of_memory", "",
                           "out of memory printing the result");
            else if (strlen(text) >= TRIM_AFTER_BYTES)
                give_back_memory();
        } else if (err.status == CV_OK) {
            cv_err_set(&err, CV_EINTERNAL, "internal", "", "job failed without an error");
        }

        pthread_mutex_lock(&J->mu);
        cv_job_status st;
        if (text) {
            j->result_text = text;
            j->result_len = strlen(text);
            st = CV_JOB_SUCCEEDED;
        } else if (err.status == CV_ECANCELLED) {
            st = CV_JOB_CANCELLED;
            if (j->cancel_code)
                cv_err_set(&err, CV_ECANCELLED, j->cancel_code, "", "%s after %ld matvecs",
                           j->cancel_msg, atomic_load(&j->progress.done));
        } else {
            if (err.status == CV_ETIMEOUT)
                cv_err_set(&err, CV_ETIMEOUT, "job_timeout", "",
                           "job exceeded its time limit of %g s after %ld matvecs", j->timeout,
                           atomic_load(&j->progress.done));
            st = CV_JOB_FAILED;
        }
        cv_utf8_sanitize(err.message); /* may quote the client's job document */
        cv_utf8_sanitize(err.field);
        j->err = err;
        if (J->cfg.state) {
            /* the record first: a client that sees the job finished can count on it */
            double fin_wall = wall_us(), fin = cv_now_s();
            pthread_mutex_unlock(&J->mu);
            record_job(J, j, st, fin - j->t_start, fin_wall);
            pthread_mutex_lock(&J->mu);
            j->finished_at = fin_wall; /* kept by finish_locked */
            j->t_end = fin;
        }
        finish_locked(J, j, st);
        if (J->draining)
            fprintf(stderr, "curvd: draining: running job %s (%s) ended %s%s%s\n", j->id, j->op,
                    cv_job_status_name(st), st == CV_JOB_SUCCEEDED ? "" : ": ",
                    st == CV_JOB_SUCCEEDED ? "" : j->err.code);
        int over = over_kept_bytes(J);
        pthread_mutex_unlock(&J->mu);
        if (j->low && J->done_fn)
            J->done_fn(J->done_arg, j, st == CV_JOB_SUCCEEDED ? j->result_text : NULL, &j->err,
                       j->model_version, j->finished_at);
        cv_job_unref(j); /* the queue's reference */
        if (over)
            purge(J);
    }
    return NULL;
}

/* Drops finished jobs older than keep_s, then the oldest finished ones
 * while more than max_kept are kept or they hold more than max_kept_bytes or
 * than --max-memory leaves them with `reserve` bytes set aside for a job
 * about to start (the most recently finished job is never dropped for bytes,
 * so a client can always read the last result).  Returns how many it dropped. */
static void purge(cv_jobs *J) { purge_for(J, 0); }

static int purge_for(cv_jobs *J, size_t reserve)
{
    int ndead = 0;
    cv_job *dead = NULL;
    double now = cv_now_s();
    pthread_mutex_lock(&J->mu);
    size_t finished = 0;
    cv_job *newest = NULL;
    for (cv_job *j = J->head; j; j = j->next)
        if (is_finished(j->status)) {
            finished++;
            if (!newest || j->t_end >= newest->t_end)
                newest = j;
        }
    size_t cap = kept_cap_locked(J, reserve); /* only shrinks what is kept below */
    cv_job *j = J->head;
    while (j) {
        cv_job *next = j->next;
        int aged = now - j->t_end > J->cfg.keep_s || finished > J->cfg.max_kept;
        int over_bytes = j != newest && J->kept_bytes > cap;
        if (is_finished(j->status) && (aged || over_bytes)) {
            if (!aged)
                J->evicted_total++;
            kept_sub(J, job_kept_bytes(j));
            unlink_locked(J, j);
            finished--;
            j->next = dead;
            dead = j;
            ndead++;
        }
        j = next;
    }
    pthread_mutex_unlock(&J->mu);
    while (dead) {
        cv_job *n = dead->next;
        cv_err e;
        if (J->cfg.state && cv_state_remove(J->cfg.state, CV_STATE_JOB, dead->id, &e))
            fprintf(stderr, "curvd: state: job %s: %s\n", dead->id, e.message);
        cv_job_unref(dead);
        dead = n;
    }
    return ndead;
}

static void *janitor_main(void *arg)
{
    cv_jobs *J = arg;
    pthread_mutex_lock(&J->mu);
    while (!J->stop) {
        struct timespec ts;
        abs_deadline(&ts, 1.0);
        pthread_cond_timedwait(&J->jan_cv, &J->mu, &ts);
        if (J->stop)
            break;
        pthread_mutex_unlock(&J->mu);
        purge(J);
        pthread_mutex_lock(&J->mu);
    }
    pthread_mutex_unlock(&J->mu);
    return NULL;
}

/* ---- life cycle ------------------------------------------------------------ */

cv_jobs *cv_jobs_new(const cv_jobs_config *c, cv_registry *reg, cv_err *e)
{
    cv_jobs *J = cv_err_calloc(sizeof *J, "out of memory", e);
    if (!J)
        return NULL;
    J->cfg = *c;
    if (J->cfg.workers < 1 || J->cfg.ranks)
        J->cfg.workers = 1;
    if (J->cfg.max_queue < 1)
        J->cfg.max_queue = 1;
    J->reg = reg;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    J->salt = mix64((uint64_t)now.tv_sec * 1000000000ull + (uint64_t)now.tv_nsec) ^
              (uint64_t)(uintptr_t)J;
    if (pthread_mutex_init(&J->mu, NULL) || pthread_mutex_init(&J->idmu, NULL) ||
        init_cond(&J->work_cv) || init_cond(&J->done_cv) || init_cond(&J->jan_cv)) {
        free(J);
        cv_err_set(e, CV_EINTERNAL, "internal", "", "cannot initialise locks");
        return NULL;
    }
    if (J->cfg.state)
        restore_jobs(J);
    J->threads = calloc((size_t)J->cfg.workers, sizeof *J->threads);
    if (!J->threads) {
        cv_jobs_free(J);
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
        return NULL;
    }
    for (int i = 0; i < J->cfg.workers && !J->cfg.no_workers; i++) {
        if (pthread_create(&J->threads[i], NULL, worker_main, J)) {
            cv_jobs_free(J);
            cv_err_set(e, CV_EINTERNAL, "internal", "", "cannot start worker thread %d", i);
            return NULL;
        }
        J->nthreads++;
    }
    if (J->cfg.no_workers)
        return J; /* and no janitor: nothing ever finishes but by cancellation */
    if (pthread_create(&J->janitor, NULL, janitor_main, J)) {
        cv_jobs_free(J);
        cv_err_set(e, CV_EINTERNAL, "internal", "", "cannot start the janitor thread");
        return NULL;
    }
    J->have_janitor = 1;
    return J;
}

void cv_jobs_free(cv_jobs *J)
{
    if (!J)
        return;
    cv_job *dropped = NULL;
    pthread_mutex_lock(&J->mu);
    J->stop = J->stop_waiters = J->draining = 1;
    while (J->qhead || J->lqhead) {
        cv_job *j = cancel_queued_locked(J, J->qhead ? J->qhead : J->lqhead, "shutting_down",
                                         "cancelled: the service is shutting down");
        j->qnext = dropped;
        dropped = j;
    }
    for (cv_job *j = J->head; j; j = j->next)
        if (j->status == CV_JOB_RUNNING)
            set_cancel_locked(j, "shutting_down", "cancelled: the service is shutting down");
    pthread_cond_broadcast(&J->work_cv);
    pthread_cond_broadcast(&J->done_cv);
    pthread_cond_broadcast(&J->jan_cv);
    pthread_mutex_unlock(&J->mu);
    while (dropped) {
        cv_job *n = dropped->qnext;
        cv_job_unref(dropped);
        dropped = n;
    }
    for (int i = 0; i < J->nthreads; i++)
        pthread_join(J->threads[i], NULL);
    if (J->have_janitor)
        pthread_join(J->janitor, NULL);
    cv_job *j = J->head;
    while (j) {
        cv_job *n = j->next;
        cv_job_unref(j);
        j = n;
    }
    free(J->threads);
    pthread_cond_destroy(&J->work_cv);
    pthread_cond_destroy(&J->done_cv);
    pthread_cond_destroy(&J->jan_cv);
    pthread_mutex_destroy(&J->mu);
    pthread_mutex_destroy(&J->idmu);
    free(J);
}

/* ---- submission ------------------------------------------------------------ */

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    x ^= x >> 31;
    return x;
}

/* The job's memory check: under mpirun the budget is per rank (rank 0's
 * shard here; the others' differ by a sample at most and are checked when
 * the job runs). */
static int check_memory(cv_jobs *J, const cv_job_spec *spec, const cv_snap *ms,
                        const cv_snap *ds, cv_curv_plan *plan, cv_curv_plan *engine,
                        int *planned, cv_err *e)
{
    int R = cv_ranks_alive(J->cfg.ranks);
    *plan = *engine = (cv_curv_plan){0};
    *planned = 0;
    if (R <= 1 && !J->cfg.ranks && (J->cfg.limits.job_memory || spec->micro_batch)) {
        /* the plan the engine would make (it takes this one: one probe per job) */
        if (cv_job_check_memory(spec, ms->model, ds->data, &J->cfg.limits, engine, e))
            return -1;
        *planned = 1;
        if (J->cfg.memory && J->cfg.memory->limit)
            *plan = *engine;
        return 0;
    }
    if (R <= 1)
        return cv_job_check_memory(spec, ms->model, ds->data, &J->cfg.limits,
                                   J->cfg.memory && J->cfg.memory->limit ? plan : NULL, e);
    cv_batch shard;
    if (cv_job_shard(spec, ds->data, R, 0, &shard, e))
        return -1;
    int rc = cv_job_check_memory_shard(spec, ms->model, &shard,
                                       cv_job_batch_size(spec, ds->data->n), NULL,
                                       &J->cfg.limits, plan, e);
    cv_dataset_free(&shard);
    return rc;
}

/* Whether the posterior job spec keeps under name could fit the registry's
 * budget at all (its lower bound, beside what the registry holds but the
 * posterior it replaces): 413 registry_full at submit if not. */
static int keep_fits(cv_jobs *J, const cv_job_spec *spec, const cv_snap *ms, const char *name,
                     cv_err *e)
{
    size_t need = cv_lap_keep_bytes_min(spec, ms->model), replaced = 0;
    cv_registry_stats st;
    cv_registry_stats_get(J->reg, &st);
    cv_snap **v;
    int n = cv_registry_list_posteriors(J->reg, ms->name, &v);
    for (int i = 0; i < n; i++)
        if (strcmp(v[i]->name, name) == 0)
            replaced = v[i]->bytes;
    if (n >= 0)
        cv_snaps_release(v, n);
    size_t used = st.bytes + st.staged_bytes - replaced;
    if (need <= st.max_bytes && used <= st.max_bytes - need)
        return 0;
    return cv_err_set(e, CV_ETOOLARGE, "registry_full", "options.keep",
                      "posterior '%s' of model '%s' needs at least %zu bytes but the registry "
                      "memory budget (--max-registry-bytes) is %zu bytes with %zu in use; "
                      "delete something (DELETE /v1/models/%s/posteriors) or raise the budget",
                      name, ms->name, need, st.max_bytes, used, ms->name);
}

/* The kept posterior a job reads (*ps, pinned) and the checks of keeping
 * one: not under mpirun (the ranks have no registry); predict's posterior
 * must be the model version's the job runs on; accumulate_into's any
 * version of the model's registration (the accumulated posterior moves to
 * the job's version). */
static int kept_posterior(cv_jobs *J, cv_job_spec *spec, const cv_snap *ms, cv_snap **ps,
                          cv_err *e)
{
    const char *rd, *wr;
    cv_lap_job_names(spec, &rd, &wr);
    if ((rd || wr) && J->cfg.ranks)
        return cv_err_set(e, CV_EINVAL, "invalid_option",
                          !rd                          ? "options.keep"
                          : spec->op == &cv_op_predict ? "options.posterior"
                                                       : "options.accumulate_into",
                          "kept posteriors are not supported under mpirun (data-parallel "
                          "ranks): fit and predict in one predict job");
    if (wr && keep_fits(J, spec, ms, wr, e))
        return -1;
    if (!rd)
        return 0;
    const char *field =
        spec->op == &cv_op_predict ? "options.posterior" : "options.accumulate_into";
    if (!(*ps = cv_registry_acquire_posterior(J->reg, ms->name, rd, field, e)))
        return -1;
    const cv_snap *p = *ps;
    if (p->owner_lineage != ms->lineage)
        return cv_err_set(e, CV_ECONFLICT, "conflict", field,
                          "posterior '%s' belongs to an earlier registration of model '%s'", rd,
                          ms->name);
    if (spec->op == &cv_op_predict && p->owner_version != ms->version)
        return cv_err_set(e, CV_ECONFLICT, "posterior_version_mismatch", "options.posterior",
                          "posterior '%s' was fitted on version %lu of model '%s'; the model is "
                          "at version %lu (new parameters): fit it again (op laplace keep, or "
                          "accumulate_into it for the next task)",
                          rd, p->owner_version, ms->name, ms->version);
    return cv_lap_job_use(spec, p->backing, ms->model, e);
}

/* The job's cost to the service (j->doc_bytes, j->run_bytes: the engine's
 * plan, the posterior it keeps, built in the engine's memory, and the
 * result) and the checks that need no lock: 413 result_too_large when its
 * result's text would exceed --max-kept-bytes, 413 memory_limit when it
 * cannot fit under --max-memory beside the registry's current versions
 * even alone. */
static int cost_job(cv_jobs *J, cv_job *j, const cv_curv_plan *plan, const cv_model *model,
                    const cv_dataset *data, cv_err *e)
{
    size_t n = cv_job_batch_size(j->spec, data->n), copy = cv_job_batch_copy_bytes(j->spec, data);
    size_t engine = plan->planned_bytes + copy < copy ? SIZE_MAX : plan->planned_bytes + copy;
    double numbers = cv_job_result_numbers(j->spec, model, n);
    size_t text = cv_memory_numbers(numbers, CV_MEM_RESULT_TEXT_BYTES);
    size_t build = cv_memory_numbers(numbers, CV_MEM_RESULT_BUILD_BYTES);
    size_t keep = cv_lap_keep_bytes_min(j->spec, model);
    if (engine + keep < keep)
        engine = SIZE_MAX;
    else
        engine += keep;
    /* under mpirun the document's text for the other ranks too */
    j->doc_bytes = cv_job_spec_bytes(j->spec) + sizeof *j + (j->text ? strlen(j->text) + 1 : 0);
    j->result_bytes = build;
    j->run_bytes = engine + build;
    if (j->run_bytes < build)
        j->run_bytes = SIZE_MAX;
    if (J->cfg.max_kept_bytes && text > J->cfg.max_kept_bytes)
        return cv_err_set(e, CV_ETOOLARGE, "result_too_large", "",
                          "the result of this %s job would be about %zu bytes of JSON (%.0f "
                          "numbers at about %d bytes each) but finished jobs' results may "
                          "hold at most %zu bytes (--max-kept-bytes): ask for fewer numbers "
                          "(a smaller batch or block) or raise --max-kept-bytes",
                          j->op, text, numbers, CV_MEM_RESULT_TEXT_BYTES,
                          J->cfg.max_kept_bytes);
    const cv_memory *m = J->cfg.memory;
    if (!m || !m->limit)
        return 0;
    cv_registry_stats st;
    cv_registry_stats_get(J->reg, &st);
    size_t base = cv_memory_get(m, CV_MEM_BASELINE);
    size_t reg = st.bytes + st.staged_bytes + base, need = j->doc_bytes + j->run_bytes;
    if (need < j->run_bytes || reg > m->limit || need > m->limit - reg)
        return cv_err_set(e, CV_ETOOLARGE, "memory_limit", "",
                          "this job needs about %zu bytes (engine %zu, of which the gathered "
                          "index batch %zu and the kept posterior %zu; result while built %zu; "
                          "document %zu) but --max-memory is %zu bytes and the registry and the "
                          "daemon's baseline hold %zu (models, datasets, uploads in parts; "
                          "%zu of the process itself and its workers): it cannot run even alone; "
                          "use a smaller batch or micro_batch, a lower --job-memory, or raise "
                          "--max-memory",
                          need, engine, copy, keep, build, j->doc_bytes, m->limit, reg, base);
    return 0;
}

/* Under J->mu: 429 memory_busy when the queued and running jobs' documents
 * and estimates and the registry leave no room for j's document now. */
static int memory_room_locked(cv_jobs *J, const cv_job *j, cv_err *e)
{
    const cv_memory *m = J->cfg.memory;
    if (!m || !m->limit)
        return 0;
    size_t reg = registry_used(J), docs = cv_memory_get(m, CV_MEM_DOCUMENTS);
    size_t run = cv_memory_get(m, CV_MEM_RUNNING), base = cv_memory_get(m, CV_MEM_BASELINE);
    size_t used = reg + docs + run + base; /* not request bodies: this one's is among them */
    if (used <= m->limit && j->doc_bytes <= m->limit - used)
        return 0;
    J->rejected_total++;
    return cv_err_set(e, CV_EBUSY, "memory_busy", "",
                      "this job's document needs %zu bytes but --max-memory is %zu bytes with "
                      "%zu in use (registry %zu, queued and running jobs' documents %zu, "
                      "running jobs %zu, the daemon's baseline %zu); retry when queued jobs "
                      "have run",
                      j->doc_bytes, m->limit, used, reg, docs, run, base);
}

void cv_jobs_offer(cv_jobs *J, const cv_snap *s) { cv_ranks_offer(J->cfg.ranks, s); }

void cv_jobs_ranks(const cv_jobs *J, int *size, int *alive)
{
    *size = cv_ranks_size(J->cfg.ranks);
    *alive = cv_ranks_alive(J->cfg.ranks);
}

/* Under J->mu: 503 while draining, 429 with a full queue. */
static int admit_locked(cv_jobs *J, cv_err *e)
{
    if (J->draining)
        return cv_err_set(e, CV_ESHUTDOWN, "shutting_down", "",
                          "the service is shutting down and accepts no new jobs");
    if (J->qlen >= J->cfg.max_queue) {
        J->rejected_total++;
        return cv_err_set(e, CV_EBUSY, "queue_full", "",
                          "the job queue is full (%zu queued, --max-queue %zu); retry later",
                          J->qlen, J->cfg.max_queue);
    }
    return 0;
}

int cv_jobs_submit(cv_jobs *J, const cJSON *doc, double timeout, cv_job **out, cv_err *e)
{
    return cv_jobs_submit_from(J, doc, timeout, NULL, out, e);
}

/* Under J->mu: the queued jobs of client. */
static size_t queued_by(const cv_jobs *J, const char *client)
{
    size_t n = 0;
    for (const cv_job *q = J->qhead; q; q = q->qnext)
        n += strcmp(q->client, client) == 0;
    return n;
}

/* Under J->mu: -1 with e (429 client_queue_full) when the submitting client
 * (client: as given, key: its stored copy) has --max-queued-per-client jobs
 * queued already. */
static int quota_locked(cv_jobs *J, const char *client, const char *key, cv_err *e)
{
    size_t mine;
    if (!client || !client[0] || !J->cfg.max_queued_per_client ||
        (mine = queued_by(J, key)) < J->cfg.max_queued_per_client)
        return 0;
    J->rejected_total++;
    return cv_err_set(e, CV_EBUSY, "client_queue_full", "",
                      "this client has %zu jobs queued (--max-queued-per-client %zu); retry when "
                      "one has started", mine, J->cfg.max_queued_per_client);
}
static int submit(cv_jobs *J, const cJSON *doc, int32_t *idx, size_t nidx, double timeout,
                  const char *client, int low, cv_job **out, cv_err *e);

int cv_jobs_submit_from(cv_jobs *J, const cJSON *doc, double timeout, const char *client,
                        cv_job **out, cv_err *e)
{
    return submit(J, doc, NULL, 0, timeout, client, 0, out, e);
}

int cv_jobs_submit_indices(cv_jobs *J, const cJSON *doc, int32_t *idx, size_t n,
                           double timeout, const char *client, cv_job **out, cv_err *e)
{
    return submit(J, doc, idx, n, timeout, client, 0, out, e);
}

int cv_jobs_submit_low(cv_jobs *J, const cJSON *doc, cv_job **out, cv_err *e)
{
    return submit(J, doc, NULL, 0, 0, NULL, 1, out, e);
}

/* Under J->mu: 503 while draining; a full queue (429) only for the normal lane. */
static int admit_lane_locked(cv_jobs *J, int low, cv_err *e)
{
    if (low && J->draining)
        return cv_err_set(e, CV_ESHUTDOWN, "shutting_down", "",
                          "the service is shutting down and accepts no new jobs");
    return low ? 0 : admit_locked(J, e);
}

static int submit(cv_jobs *J, const cJSON *doc, int32_t *idx, size_t nidx, double timeout,
                  const char *client, int low, cv_job **out, cv_err *e)
{
    *out = NULL;
    if (idx && J->cfg.ranks) { /* the other ranks get the document's text */
        free(idx);
        return cv_err_set(e, CV_EINTERNAL, "internal", "batch.indices",
                          "indices given apart under mpirun");
    }
    if (cv_jobs_draining(J)) {
        free(idx);
        return cv_err_set(e, CV_ESHUTDOWN, "shutting_down", "",
                          "the service is shutting down and accepts no new jobs");
    }
    cv_job_spec *spec = cv_job_parse(doc, e);
    if (!spec) {
        free(idx);
        return -1;
    }
    if (idx && cv_job_spec_set_indices(spec, idx, nidx, e)) {
        cv_job_spec_free(spec);
        return -1;
    }
    const char *mname = spec->model, *dname = spec->dataset;
    cv_snap *ms = NULL, *ds = NULL, *ps = NULL;
    cv_job *j = NULL;
    int recorded = 0, planned = 0;
    cv_curv_plan plan, engine_plan;
    if (!mname) {
        cv_err_set(e, CV_EINVAL, "missing_field", "model",
                   "job needs \"model\": the name of a registered model");
        goto fail;
    }
    if (!dname) {
        cv_err_set(e, CV_EINVAL, "missing_field", "dataset",
                   "job needs \"dataset\": the name of a registered dataset");
        goto fail;
    }
    if (!(ms = cv_registry_acquire(J->reg, CV_REG_MODEL, mname, e)) ||
        !(ds = cv_registry_acquire(J->reg, CV_REG_DATASET, dname, e)) ||
        cv_job_bind(spec, ms->model, ds->data, e) ||
        kept_posterior(J, spec, ms, &ps, e) ||
        check_memory(J, spec, ms, ds, &plan, &engine_plan, &planned, e))
        goto fail;
    if (!(j = cv_err_calloc(sizeof *j, "out of memory", e)))
        goto fail;
    j->plan = engine_plan;
    j->planned = planned;
    atomic_init(&j->refs, 1);
    atomic_init(&j->cancel, 0);
    cv_progress_init(&j->progress);
    j->progress.cancel = &j->cancel;
    snprintf(j->op, sizeof j->op, "%s", cv_job_op_name(spec));
    snprintf(j->client, sizeof j->client, "%s", client ? client : "");
    snprintf(j->model, sizeof j->model, "%s", mname);
    snprintf(j->dataset, sizeof j->dataset, "%s", dname);
    j->spec = spec;
    if (J->cfg.ranks && !(j->text = cJSON_PrintUnformatted(doc))) {
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
        goto fail;
    }
    if (cost_job(J, j, &plan, ms->model, ds->data, e)) {
        j->spec = NULL; /* freed below */
        goto fail;
    }
    j->msnap = ms;
    j->dsnap = ds;
    j->psnap = ps;
    {
        const char *rd, *wr;
        cv_lap_job_names(spec, &rd, &wr);
        snprintf(j->keep, sizeof j->keep, "%s", wr ? wr : "");
    }
    /* the cross-version instruments read the pinned snapshot's kept versions */
    spec->history = (cv_job_history){ms->version, ms->previous ? ms->previous->v : NULL,
                                     ms->first ? ms->first->v : NULL,
                                     ms->model->nparams_total};
    j->model_version = ms->version;
    j->dataset_version = ds->version;
    j->timeout = J->cfg.job_timeout;
    if (timeout > 0 && (j->timeout <= 0 || timeout < j->timeout))
        j->timeout = timeout;
    j->created_at = wall_us();
    j->t_submit = cv_now_s();
    j->status = CV_JOB_QUEUED;

    if (J->cfg.state) {
        /* refused cheaply before the record is written, checked again after */
        pthread_mutex_lock(&J->mu);
        int rc = admit_lane_locked(J, low, e) || quota_locked(J, client, j->client, e);
        pthread_mutex_unlock(&J->mu);
        if (rc || next_id(J, j->id, sizeof j->id, e) ||
            record_job_e(J, j, CV_JOB_QUEUED, 0, 0, e))
            goto fail;
        recorded = 1;
    }
    pthread_mutex_lock(&J->mu);
    if (admit_lane_locked(J, low, e)) {
        pthread_mutex_unlock(&J->mu);
        goto fail;
    }
    if (!recorded && next_id(J, j->id, sizeof j->id, e)) { /* no I/O without a state dir */
        pthread_mutex_unlock(&J->mu);
        goto fail;
    }
    if (quota_locked(J, client, j->client, e) || memory_room_locked(J, j, e)) {
        pthread_mutex_unlock(&J->mu);
        goto fail;
    }
    cv_memory_add(J->cfg.memory, CV_MEM_DOCUMENTS, j->doc_bytes);
    /* table reference (j's own), queue reference, caller reference */
    atomic_store(&j->refs, 3);
    append_locked(J, j);
    j->low = low;
    cv_job **head = low ? &J->lqhead : &J->qhead, **tail = low ? &J->lqtail : &J->qtail;
    if (*tail)
        (*tail)->qnext = j;
    else
        *head = j;
    *tail = j;
    if (low)
        J->lqlen++;
    else
        J->qlen++;
    J->submitted_total++;
    pthread_cond_signal(&J->work_cv);
    pthread_mutex_unlock(&J->mu);
    *out = j;
    return 0;
fail:
    if (recorded) {
        cv_err re;
        if (cv_state_remove(J->cfg.state, CV_STATE_JOB, j->id, &re))
            fprintf(stderr, "curvd: state: job %s: %s\n", j->id, re.message);
    }
    if (j)
        free(j->text);
    free(j);
    cv_job_spec_free(spec);
    if (ms)
        cv_registry_release(J->reg, ms);
    if (ds)
        cv_registry_release(J->reg, ds);
    if (ps)
        cv_registry_release(J->reg, ps);
    return -1;
}

void cv_jobs_set_done_hook(cv_jobs *J, cv_jobs_done_fn fn, void *arg)
{
    pthread_mutex_lock(&J->mu);
    J->done_fn = fn;
    J->done_arg = arg;
    pthread_mutex_unlock(&J->mu);
}

int cv_jobs_withdraw(cv_jobs *J, cv_job *j)
{
    pthread_mutex_lock(&J->mu);
    if (j->status != CV_JOB_QUEUED || !j->low || unlink_queued_locked(J, j)) {
        pthread_mutex_unlock(&J->mu);
        return 0;
    }
    unlink_locked(J, j);
    j->prev = j->next = NULL;
    pthread_cond_broadcast(&J->work_cv); /* it may have held the low lane's head for memory */
    J->submitted_total--; /* as if it had never been queued */
    release_doc_locked(J, j);
    cv_registry_release(J->reg, j->psnap);
    cv_registry_release(J->reg, j->msnap);
    cv_registry_release(J->reg, j->dsnap);
    j->msnap = j->dsnap = j->psnap = NULL;
    j->status = CV_JOB_CANCELLED;
    cv_err_set(&j->err, CV_ECANCELLED, "superseded", "",
               "withdrawn: a newer version of the model superseded it (monitor coalescing)");
    pthread_cond_broadcast(&J->done_cv); /* a ?wait= on it returns */
    pthread_mutex_unlock(&J->mu);
    cv_err e;
    if (J->cfg.state && cv_state_remove(J->cfg.state, CV_STATE_JOB, j->id, &e))
        fprintf(stderr, "curvd: state: job %s: %s\n", j->id, e.message);
    cv_job_unref(j); /* the table's reference */
    cv_job_unref(j); /* the queue's reference */
    return 1;
}

cv_job *cv_jobs_get(cv_jobs *J, const char *id, cv_err *e)
{
    pthread_mutex_lock(&J->mu);
    for (cv_job *j = J->tail; j; j = j->prev)
        if (strcmp(j->id, id) == 0) {
            job_ref(j);
            pthread_mutex_unlock(&J->mu);
            return j;
        }
    pthread_mutex_unlock(&J->mu);
    cv_err_set(e, CV_ENOTFOUND, "not_found", "id",
               "job '%.64s' not found (finished jobs are kept for a limited time)", id);
    return NULL;
}

int cv_jobs_wait(cv_jobs *J, cv_job *j, double seconds)
{
    struct timespec ts;
    abs_deadline(&ts, seconds);
    pthread_mutex_lock(&J->mu);
    while (!is_finished(j->status) && !J->stop_waiters) {
        if (pthread_cond_timedwait(&J->done_cv, &J->mu, &ts) == ETIMEDOUT)
            break;
    }
    int done = is_finished(j->status);
    pthread_mutex_unlock(&J->mu);
    return done;
}

void cv_jobs_cancel(cv_jobs *J, cv_job *j, double wait)
{
    pthread_mutex_lock(&J->mu);
    cv_job *dropped = NULL;
    int running = 0;
    if (j->status == CV_JOB_QUEUED)
        dropped = cancel_queued_locked(J, j, "cancelled", "cancelled by request");
    else if (j->status == CV_JOB_RUNNING) {
        set_cancel_locked(j, "cancelled", "cancelled by request");
        running = 1;
    }
    pthread_mutex_unlock(&J->mu);
    if (dropped) /* recorded before the DELETE is answered */
        record_job(J, dropped, CV_JOB_CANCELLED, 0, dropped->finished_at);
    cv_job_unref(dropped);
    if (running && wait > 0)
        cv_jobs_wait(J, j, wait);
}

/* ---- status documents ------------------------------------------------------ */

static cJSON *status_json_locked(cv_job *j)
{
    cJSON *o = cJSON_CreateObject();
    if (!o)
        return NULL;
    long done = atomic_load(&j->progress.done), planned = atomic_load(&j->progress.planned);
    long mdone = atomic_load(&j->progress.micro_done), mtotal = atomic_load(&j->progress.micro_total);
    /* within a product over micro-batches, its share done counts too */
    double within = mtotal > 0 && mdone < mtotal ? (double)mdone / (double)mtotal : 0.0;
    double frac = planned > 0 ? ((double)done + within) / (double)planned : 0.0;
    if (j->status == CV_JOB_SUCCEEDED)
        frac = 1.0;
    if (frac > 1)
        frac = 1;
    cJSON *p;
    if (!cJSON_AddStringToObject(o, "id", j->id) ||
        !cJSON_AddStringToObject(o, "status", cv_job_status_name(j->status)) ||
        !cJSON_AddStringToObject(o, "op", j->op) ||
        !cJSON_AddStringToObject(o, "model", j->model) ||
        !cJSON_AddNumberToObject(o, "model_version", (double)j->model_version) ||
        !cJSON_AddStringToObject(o, "dataset", j->dataset) ||
        !cJSON_AddNumberToObject(o, "dataset_version", (double)j->dataset_version) ||
        cv_json_add_time(o, "created_at", j->created_at) ||
        cv_json_add_time(o, "started_at", j->started_at) ||
        cv_json_add_time(o, "finished_at", j->finished_at))
        goto fail;
    if (j->status >= CV_JOB_RUNNING && j->started_at > 0) {
        double run = (is_finished(j->status) ? j->t_end : cv_now_s()) - j->t_start;
        if (!cJSON_AddNumberToObject(o, "run_s", run))
            goto fail;
    } else if (!cJSON_AddNullToObject(o, "run_s")) {
        goto fail;
    }
    if (!(j->timeout > 0 ? cJSON_AddNumberToObject(o, "timeout_s", j->timeout)
                         : cJSON_AddNullToObject(o, "timeout_s")))
        goto fail;
    if (!(p = cJSON_AddObjectToObject(o, "progress")) ||
        !cJSON_AddNumberToObject(p, "matvecs_done", (double)done) ||
        !cJSON_AddNumberToObject(p, "matvecs_planned", (double)planned) ||
        !cJSON_AddNumberToObject(p, "fraction", frac))
        goto fail;
    if (mtotal > 0 && !is_finished(j->status) &&
        (!cJSON_AddNumberToObject(p, "micro_batches_done", (double)mdone) ||
         !cJSON_AddNumberToObject(p, "micro_batches", (double)mtotal)))
        goto fail;
    double pv, pe;
    long ps = cv_progress_get_partial(&j->progress, &pv, &pe);
    if (ps > 0 && !is_finished(j->status)) {
        cJSON *part = cJSON_AddObjectToObject(o, "partial");
        if (!part || !cJSON_AddNumberToObject(part, "estimate", pv) ||
            !cJSON_AddNumberToObject(part, "stderr", pe) ||
            !cJSON_AddNumberToObject(part, "samples", (double)ps))
            goto fail;
    }
    if (j->status == CV_JOB_FAILED || j->status == CV_JOB_CANCELLED) {
        cJSON *ej = cv_err_to_json(&j->err);
        cJSON *inner = ej ? cJSON_DetachItemFromObject(ej, "error") : NULL;
        cJSON_Delete(ej);
        if (!inner || !cJSON_AddItemToObject(o, "error", inner)) {
            cJSON_Delete(inner);
            goto fail;
        }
    }
    return o;
fail:
    cJSON_Delete(o);
    return NULL;
}

cJSON *cv_job_to_json(cv_jobs *J, cv_job *j)
{
    pthread_mutex_lock(&J->mu);
    cJSON *o = status_json_locked(j);
    pthread_mutex_unlock(&J->mu);
    return o;
}

char *cv_job_status_parts(cv_jobs *J, cv_job *j, size_t *head_len, const char **result,
                          size_t *result_len)
{
    pthread_mutex_lock(&J->mu);
    cJSON *o = status_json_locked(j);
    /* result_text is immutable once set; the caller's reference keeps it */
    *result = j->status == CV_JOB_SUCCEEDED ? j->result_text : NULL;
    *result_len = *result ? j->result_len : 0;
    pthread_mutex_unlock(&J->mu);
    char *head = o ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    if (!head)
        return NULL;
    *head_len = strlen(head) - 1; /* without the closing brace */
    head[*head_len] = 0;
    return head;
}

char *cv_job_status_text(cv_jobs *J, cv_job *j, size_t *len)
{
    static const char key[] = ",\"result\":";
    size_t hl, rlen;
    const char *res;
    char *head = cv_job_status_parts(J, j, &hl, &res, &rlen);
    size_t total = hl + (res ? sizeof key - 1 + rlen : 0) + 1;
    char *txt = head ? realloc(head, total + 1) : NULL;
    if (!txt) {
        free(head);
        return NULL;
    }
    if (res) {
        memcpy(txt + hl, key, sizeof key - 1);
        memcpy(txt + hl + sizeof key - 1, res, rlen);
    }
    txt[total - 1] = '}';
    txt[total] = 0;
    *len = total;
    return txt;
}

cJSON *cv_jobs_list(cv_jobs *J, int status, const char *model, const char *dataset,
                    const char *op, size_t limit)
{
    cJSON *root = cJSON_CreateObject();
    cJSON *arr = root ? cJSON_AddArrayToObject(root, "jobs") : NULL;
    if (!arr) {
        cJSON_Delete(root);
        return NULL;
    }
    pthread_mutex_lock(&J->mu);
    /* newest `limit` matches, listed oldest first */
    size_t matched = 0;
    cv_job *start = NULL;
    for (cv_job *j = J->tail; j; j = j->prev) {
        if ((status >= 0 && (int)j->status != status) || (model && strcmp(model, j->model)) ||
            (dataset && strcmp(dataset, j->dataset)) || (op && strcmp(op, j->op)))
            continue;
        if (matched == limit)
            break;
        matched++;
        start = j;
    }
    size_t added = 0;
    for (cv_job *j = start; j && added < matched; j = j->next) {
        if ((status >= 0 && (int)j->status != status) || (model && strcmp(model, j->model)) ||
            (dataset && strcmp(dataset, j->dataset)) || (op && strcmp(op, j->op)))
            continue;
        cJSON *o = status_json_locked(j);
        if (!o || !cJSON_AddItemToArray(arr, o)) {
            cJSON_Delete(o);
            pthread_mutex_unlock(&J->mu);
            cJSON_Delete(root);
            return NULL;
        }
        added++;
    }
    pthread_mutex_unlock(&J->mu);
    if (!cJSON_AddNumberToObject(root, "count", (double)added)) {
        cJSON_Delete(root);
        return NULL;
    }
    return root;
}

/* ---- shutdown -------------------------------------------------------------- */

void cv_jobs_drain(cv_jobs *J)
{
    cv_job *dropped = NULL;
    int n = 0;
    pthread_mutex_lock(&J->mu);
    J->draining = 1;
    while (J->qhead || J->lqhead) {
        cv_job *j = cancel_queued_locked(J, J->qhead ? J->qhead : J->lqhead, "shutting_down",
                                         "cancelled: the service is shutting down");
        j->qnext = dropped;
        dropped = j;
        n++;
    }
    int busy = J->busy;
    pthread_mutex_unlock(&J->mu);
    fprintf(stderr, "curvd: draining: %d queued job%s cancelled (shutting_down), %d running\n",
            n, n == 1 ? "" : "s", busy);
    while (dropped) {
        cv_job *nx = dropped->qnext;
        record_job(J, dropped, CV_JOB_CANCELLED, 0, dropped->finished_at);
        cv_job_unref(dropped);
        dropped = nx;
    }
}

int cv_jobs_draining(cv_jobs *J)
{
    pthread_mutex_lock(&J->mu);
    int d = J->draining;
    pthread_mutex_unlock(&J->mu);
    return d;
}

int cv_jobs_wait_idle(cv_jobs *J, double seconds)
{
    struct timespec ts;
    abs_deadline(&ts, seconds);
    pthread_mutex_lock(&J->mu);
    while (J->busy > 0) {
        if (pthread_cond_timedwait(&J->done_cv, &J->mu, &ts) == ETIMEDOUT)
            break;
    }
    int busy = J->busy;
    pthread_mutex_unlock(&J->mu);
    return busy;
}

void cv_jobs_cancel_running(cv_jobs *J)
{
    pthread_mutex_lock(&J->mu);
    for (cv_job *j = J->head; j; j = j->next)
        if (j->status == CV_JOB_RUNNING)
            set_cancel_locked(j, "shutting_down",
                              "cancelled: the service is shutting down (grace period over)");
    pthread_mutex_unlock(&J->mu);
}

void cv_jobs_stop_waiters(cv_jobs *J)
{
    pthread_mutex_lock(&J->mu);
    J->stop_waiters = 1;
    pthread_cond_broadcast(&J->done_cv);
    pthread_mutex_unlock(&J->mu);
}

void cv_jobs_stats_get(cv_jobs *J, cv_jobs_stats *st)
{
    memset(st, 0, sizeof *st);
    pthread_mutex_lock(&J->mu);
    st->queue_depth = J->qlen;
    st->max_queue = J->cfg.max_queue;
    st->workers = J->cfg.workers;
    st->busy_workers = J->busy;
    long running_mv = 0;
    for (cv_job *j = J->head; j; j = j->next) {
        st->by_status[j->status]++;
        if (j->status == CV_JOB_RUNNING)
            running_mv += atomic_load(&j->progress.done);
    }
    memcpy(st->finished_total, J->finished_total, sizeof st->finished_total);
    st->submitted_total = J->submitted_total;
    st->rejected_total = J->rejected_total;
    st->matvecs_total = J->matvecs_finished + running_mv;
    memcpy(st->hist, J->hist, sizeof st->hist);
    st->hist_sum = J->hist_sum;
    st->hist_count = J->hist_count;
    memcpy(st->qhist, J->qhist, sizeof st->qhist);
    st->qhist_sum = J->qhist_sum;
    st->qhist_count = J->qhist_count;
    st->kept_bytes = J->kept_bytes;
    st->memory_limit = J->cfg.memory ? J->cfg.memory->limit : 0;
    for (int k = 0; k < CV_MEM_KINDS; k++)
        st->memory_used[k] = k == CV_MEM_REGISTRY ? registry_used(J)
                                                  : cv_memory_get(J->cfg.memory, (cv_mem_kind)k);
    st->memory_waits_total = J->memory_waits_total;
    st->max_kept_bytes = J->cfg.max_kept_bytes;
    st->evicted_total = J->evicted_total;
    pthread_mutex_unlock(&J->mu);
}
