/* memory.h - the daemon's memory account (--max-memory).
 *
 * One account per daemon (made by server/serve.c, shared by the registry
 * and the job table) bounds what the daemon holds:
 *   registry       current snapshots, uploads in parts being assembled and
 *                  old versions still pinned by jobs (the registry's own
 *                  count, cv_registry_stats; not kept here)
 *   job_documents  the parsed documents of queued and running jobs
 *                  (cv_job_spec_bytes plus the job's record)
 *   running_jobs   the running jobs' estimates: the engine's planned memory
 *                  plus the result while it is built and printed
 *                  (CV_MEM_RESULT_BUILD_BYTES per number)
 *   kept_results   finished jobs' result text and records
 *   request_bodies request bodies being received and not yet answered
 *                  (server/http.c: the body buffer as it grows)
 *   baseline       fixed at start (server/serve.c): the process's resident
 *                  memory then (binary, libraries, demo data) and
 *                  CV_MEM_WORKER_BYTES per worker thread
 * The job counters are atomics, so the registry reads them under its own
 * lock without taking the job table's (server/jobs.c takes the registry's
 * lock inside its own, never the other way round).
 *
 * Who refuses what: server/jobs.c (submit: 413 memory_limit when a job can
 * never fit, 429 memory_busy when its document cannot be held now; the
 * worker starts a job only when its estimate fits beside the running ones,
 * or when nothing runs; kept results are dropped, oldest first, to make
 * room), server/registry.c (uploads: 413 memory_limit / 429 memory_busy).
 */
#ifndef CV_MEMORY_H
#define CV_MEMORY_H

#include <stdatomic.h>
#include <stddef.h>

typedef enum {
    CV_MEM_REGISTRY = 0,
    CV_MEM_DOCUMENTS,
    CV_MEM_RUNNING,
    CV_MEM_KEPT,
    CV_MEM_REQUESTS,
    CV_MEM_BASELINE,
    CV_MEM_KINDS
} cv_mem_kind;

/* JSON text of one result number ("-1.2345678901234567e-05," is 24 bytes). */
#define CV_MEM_RESULT_TEXT_BYTES 24
/* One result number while the result is a cJSON tree and then printed text:
 * a cJSON node (64 bytes) with its allocation overhead, plus the text. */
#define CV_MEM_RESULT_BUILD_BYTES (80 + CV_MEM_RESULT_TEXT_BYTES)

typedef struct {
    size_t limit;                      /* --max-memory bytes; 0: no limit (nothing refused) */
    atomic_size_t used[CV_MEM_KINDS];  /* CV_MEM_REGISTRY unused (the registry counts it) */
} cv_memory;

/* 75% of physical memory (sysconf) or of the daemon's cgroup memory limit
 * when that is lower (a container), or 0 when neither can be read. */
size_t cv_memory_default_limit(void);
/* The cgroup memory limit read from v2_file (memory.max) or else v1_file
 * (memory.limit_in_bytes): 0 for none ("max", unlimited, unreadable). */
size_t cv_memory_cgroup_limit(const char *v2_file, const char *v1_file);
void cv_memory_init(cv_memory *m, size_t limit);
void cv_memory_add(cv_memory *m, cv_mem_kind k, size_t bytes);
void cv_memory_sub(cv_memory *m, cv_mem_kind k, size_t bytes);
size_t cv_memory_get(const cv_memory *m, cv_mem_kind k);
/* Resident memory a worker thread keeps once it has run a job, beside
 * what the account counts: OpenBLAS's packing buffers of the threads it
 * calls from, its stack and its allocator arena (measured ~30 MB a worker
 * on the bench machines: 43/74/135 MB resident with 1/2/4 workers after
 * one trace job each, 13 MB at start). */
#define CV_MEM_WORKER_BYTES ((size_t)32 << 20)
/* What the daemon holds beside the registry and the kept results: its
 * baseline + job documents + running jobs + request bodies. */
size_t cv_memory_in_flight(const cv_memory *m);
/* The process's resident memory now (/proc/self/statm), or 0. */
size_t cv_memory_self_resident(void);
/* The gauge label of a kind: registry, job_documents, running_jobs, kept_results,
 * request_bodies, baseline. */
const char *cv_memory_kind_name(cv_mem_kind k);
/* Gives freed heap pages back to the OS (glibc's malloc_trim; no-op elsewhere):
 * after a large cJSON tree of many small nodes was freed. */
void cv_memory_trim(void);
/* Bytes for n result numbers at b bytes each (clamped to SIZE_MAX). */
size_t cv_memory_numbers(double n, size_t b);

#endif
