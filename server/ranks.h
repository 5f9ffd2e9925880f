/* ranks.h - `mpirun -np R curvd serve`: what rank 0 (the HTTP daemon, the
 * registry, the job queue) and the other ranks say to each other.
 *
 * The other ranks hold no registry: they wait (asleep) for rank 0's
 * commands on the command channel (server/cluster.h) and keep one model and
 * one dataset shard, each named by (name, lineage, version):
 *   model    the architecture (api/arch.c's JSON) and the parameters
 *            (safetensors), broadcast; sent when a model is registered or
 *            its parameters are pushed (cv_ranks_offer, when no job runs)
 *            and before a job whose model the others lack;
 *   dataset  scattered: rank r receives its share (cv_comm_share) of the
 *            samples, before the first job on that dataset version;
 *   job      the job document and the limits, broadcast; for a batch other
 *            than "all" rank 0 sends each rank its shard of the job's batch;
 *            then every rank runs cv_job_exec_shard and rank 0 keeps the
 *            result;
 *   stop     at shutdown.
 * Jobs run one at a time on all ranks.  When a rank is lost (dead, or
 * silent past --rank-timeout) the running job fails with 503 "rank_lost",
 * the other ranks are told to leave, and the daemon keeps serving with
 * rank 0 alone (cv_ranks_alive: 1).  mpirun kills every rank when one dies
 * unless it runs with --enable-recovery (docs/interface.md).
 */
#ifndef CV_RANKS_H
#define CV_RANKS_H

#include <cJSON.h>

#include "api/job.h"
#include "server/cluster.h"
#include "server/registry.h"

typedef struct cv_ranks cv_ranks;

/* Rank 0's side (cl borrowed, must outlive it). */
cv_ranks *cv_ranks_lead(cv_cluster *cl, cv_err *e);
/* Sends stop to the other ranks (when they are whole) and frees k. */
void cv_ranks_free(cv_ranks *k);
/* Sends stop to the other ranks (rank 0; no-op once a rank was lost). */
void cv_ranks_stop(cv_cluster *cl);

/* Runs bound job j (its document: text) on every rank on model snapshot ms
 * and dataset snapshot ds, sending them first where the others lack them;
 * on rank 0 alone once a rank was lost.  Returns rank 0's result, or NULL
 * with e filled. */
cJSON *cv_ranks_exec(cv_ranks *k, const cv_job_spec *j, const char *text, const cv_snap *ms,
                     const cv_snap *ds, const cv_job_limits *lim, cv_progress *p, cv_err *e);

/* Sends model snapshot s to the other ranks now unless a job is running
 * (then the next job sends it). */
void cv_ranks_offer(cv_ranks *k, const cv_snap *s);

/* Ranks started by mpirun; ranks jobs run on now (1 after a loss). */
int cv_ranks_size(const cv_ranks *k);
int cv_ranks_alive(const cv_ranks *k);

/* Ranks 1..R-1: serve rank 0's commands until stop (or a loss); returns
 * the process exit status. */
int cv_ranks_follow(cv_cluster *cl);

#endif
