/* monitors.h - training monitors (issue 24 item 2): op `instruments` run
 * automatically on every k-th pushed version of a model, kept as a time
 * series (GET /v1/models/{name}/history) and as Prometheus gauges.
 *
 * A monitor is created with a document {"dataset", "batch", "every",
 * "include", "exclude", "probes", "bins", "lanczos_steps", "tic_epsilon",
 * "seed"} (checked like the job it will submit: 400 with the field).  Each
 * version pushed after its creation (cv_monitors_version, called after PUT
 * /v1/models/{name}/parameters) counts; every `every`-th one submits an
 * instruments job in the jobs' low-priority lane (server/jobs.h).  When the
 * previous monitored version's job has not started yet it is withdrawn and
 * the new one carries its skipped count plus one (coalescing: at most one
 * job of a monitor waits).  The worker's done hook appends a history entry
 * {version, time, job, skipped, instruments | error}; each monitor keeps at
 * most history_cap entries (oldest dropped).
 *
 * With a state directory each monitor is a record (kind CV_STATE_MONITOR,
 * name ID: the monitor and its counters, rewritten at each version and
 * entry) plus history segments (name ID-NNNNNNNN: up to 256 entries as JSON
 * lines; an entry rewrites only its segment; segments wholly dropped by the
 * cap are removed), read back by cv_monitors_new.
 *
 * Thread-safe (one mutex; job submission happens under it, the done hook
 * takes it without any jobs lock held).
 */
#ifndef CV_MONITORS_H
#define CV_MONITORS_H

#include <cJSON.h>
#include <stddef.h>

#include "engine/err.h"
#include "server/jobs.h"
#include "server/registry.h"
#include "server/state.h"

#define CV_MONITOR_HISTORY_DEFAULT 10000 /* entries per monitor */
#define CV_MONITORS_MAX 256              /* monitors in all */

typedef struct cv_monitors cv_monitors;

/* st: --state-dir (NULL: memory only); monitors recorded there are read
 * back.  Sets J's done hook. */
cv_monitors *cv_monitors_new(cv_jobs *J, cv_registry *reg, cv_state *st, size_t history_cap,
                             cv_err *e);
void cv_monitors_free(cv_monitors *M);

/* Creates a monitor of model from doc; *out: the monitor document.  404
 * unknown model or dataset, 400 bad fields (field set), 429 too many. */
int cv_monitors_create(cv_monitors *M, const char *model, const cJSON *doc, cJSON **out,
                       cv_err *e);
/* {"monitors": [...]} of model. */
cJSON *cv_monitors_list(cv_monitors *M, const char *model);
/* 404 when model has no monitor id. */
int cv_monitors_delete(cv_monitors *M, const char *model, const char *id, cv_err *e);
/* A version of model was pushed. */
void cv_monitors_version(cv_monitors *M, const char *model);
/* {"model", "history": [...]} oldest first; monitor NULL: all of the
 * model's monitors; only entries with version >= since.  404 unknown monitor. */
cJSON *cv_monitors_history(cv_monitors *M, const char *model, const char *monitor,
                           unsigned long since, cv_err *e);
/* The curvd_instrument{model,name} gauges (the newest entry per model with
 * instruments) as Prometheus text, malloc()ed; NULL out of memory. */
char *cv_monitors_metrics(cv_monitors *M);

#endif
