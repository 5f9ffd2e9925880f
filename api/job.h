/* job.h - the job document (docs/interface.md §3), parsed once into a typed job.
 *
 * A job is JSON {op, model, dataset, curvature, batch, blocks, seed, options}.
 * cv_job_parse checks it completely without touching a model (unknown
 * fields, types, ranges, the op's options and their combinations, with "did
 * you mean" hints for misspelt ops, options and fields) and returns a
 * cv_job_spec: the op, its method, the curvature, the batch (a range or an
 * index array), the blocks, the seed and the op's argument struct with the
 * option values.  The JSON document is not needed after that.
 * cv_job_bind checks the spec against a model and dataset (the dataset fits
 * the model, the batch lies inside the dataset, block parameter names exist,
 * an option given as a vector over the block has its length, the op's bind
 * check of its options against each block) and resolves the blocks; cv_job_exec runs a bound spec.  The HTTP service
 * parses and binds at submit (400 before queueing) and executes in a
 * worker; `curvd run` does the same in one process.
 */
#ifndef CV_JOB_H
#define CV_JOB_H

#include <cJSON.h>
#include <stddef.h>
#include <stdint.h>

#include "api/opts.h"
#include "engine/comm.h"
#include "engine/curv.h"
#include "engine/dataset.h"
#include "engine/err.h"
#include "engine/linop.h"
#include "engine/model.h"

typedef struct {
    size_t dense_max;        /* largest D for op "dense" / exact paths (default 4096) */
    size_t max_vector_dim;   /* largest vector returned inline (default: unlimited) */
    size_t job_memory;       /* engine working memory of one job, bytes (default 2 GiB;
                              * 0: unlimited, one micro-batch) */
} cv_job_limits;

void cv_job_limits_default(cv_job_limits *l);

/* The job statuses, in the order of cv_job_status (the one list: the job
 * table, GET /v1/jobs?status= and GET /v1/ops read it; their names:
 * cv_job_status_name in api/ops_table.h). */
#define CV_JOB_STATUSES(X)                                                                 \
    X(CV_JOB_QUEUED, "queued")                                                             \
    X(CV_JOB_RUNNING, "running")                                                           \
    X(CV_JOB_SUCCEEDED, "succeeded")                                                       \
    X(CV_JOB_FAILED, "failed")                                                             \
    X(CV_JOB_CANCELLED, "cancelled")

#define CV_JOB_STATUS_ENUM_(id, name) id,
typedef enum { CV_JOB_STATUSES(CV_JOB_STATUS_ENUM_) CV_JOB_NSTATUS } cv_job_status;
#undef CV_JOB_STATUS_ENUM_

struct cv_op_def;
struct cv_op_method;

typedef enum { CV_JOB_BATCH_ALL = 0, CV_JOB_BATCH_RANGE, CV_JOB_BATCH_INDICES } cv_job_batch_kind;
typedef enum { CV_JOB_BLOCKS_FULL = 0, CV_JOB_BLOCKS_LAYER, CV_JOB_BLOCKS_LIST } cv_job_blocks_kind;

/* Earlier versions of the job's model, for the cross-version instruments of
 * op "instruments" (api/ops_instruments.c): the parameter vectors (the
 * model's D floats, state_dict order) of the version before the job's and
 * of the first version of its registration.  The HTTP service sets them
 * from the pinned snapshot (server/registry.c keeps them; borrowed, live
 * as long as the job); zero (NULL vectors) elsewhere: `curvd run`, libcurvd. */
typedef struct {
    unsigned long version;              /* the job's model version (0: not known) */
    const float *previous;              /* version - 1's parameters, or NULL */
    const float *first;                 /* version 1's, or NULL */
    size_t n;                           /* floats in each */
} cv_job_history;

/* A parsed job. */
typedef struct {
    const struct cv_op_def *op;
    const struct cv_op_method *method;  /* NULL for ops without methods */
    char *model, *dataset;              /* names, NULL when absent */
    cv_curvature curvature;             /* hessian when absent */
    uint64_t seed;
    struct {
        cv_job_batch_kind kind;
        size_t offset, size;            /* RANGE; size 0: not given (to the end; a
                                           given size is >= 1) */
        int has_offset;                 /* offset given (names the error's field) */
        int32_t *indices;               /* INDICES */
        size_t count;
    } batch;
    struct {
        cv_job_blocks_kind kind;
        int ngroups;                    /* LIST: groups of parameter names */
        int *group_len;
        char **names;                   /* all groups' names, in order */
        int nnames;                     /* names copied so far (what cv_job_spec_free frees) */
        cv_block *resolved;             /* after cv_job_bind */
        int nresolved;
    } blocks;
    size_t micro_batch;                 /* "micro_batch": samples per micro-batch (0: from
                                           the memory budget) */
    cv_opts opts;                       /* opts.args: the op's argument struct */
    cv_job_history history;             /* zero after parsing; see cv_job_history */
} cv_job_spec;

/* Parses and validates a job document (borrowed).  NULL with e filled
 * (field = JSON path) when it is not a valid job. */
cv_job_spec *cv_job_parse(const cJSON *doc, cv_err *e);
void cv_job_spec_free(cv_job_spec *j);

/* Checks j against a model and dataset and resolves its blocks (kept in j
 * for cv_job_exec on the same model).  Cheap. */
int cv_job_bind(cv_job_spec *j, const cv_model *m, const cv_dataset *d, cv_err *e);
/* The part of cv_job_bind that needs no dataset: blocks resolved against m
 * and the options checked against them. */
int cv_job_bind_model(cv_job_spec *j, const cv_model *m, cv_err *e);
/* The number of samples N of j's batch on a dataset of dataset_n samples. */
size_t cv_job_batch_size(const cv_job_spec *j, size_t dataset_n);
/* Bytes the job's batch takes beside the dataset while it runs: an index
 * batch is gathered into a copy of its samples (x, y and the index list);
 * a whole or a range batch is a view (0). */
size_t cv_job_batch_copy_bytes(const cv_job_spec *j, const cv_dataset *d);

/* Plans the bound job's micro-batches under lim->job_memory (a probe of the
 * model on one and two samples): 0, or -1 with e filled ("job_memory", 400)
 * when even its minimum does not fit.  plan may be NULL (then a job without
 * a budget nor a micro_batch is not probed at all); given, it is always
 * filled (plan->planned_bytes: the engine memory the run should need). */
int cv_job_check_memory(const cv_job_spec *j, const cv_model *m, const cv_dataset *d,
                        const cv_job_limits *lim, cv_curv_plan *plan, cv_err *e);

/* What the service keeps for a job between jobs (ops laplace and predict:
 * api/op_laplace.h): in, the kept posterior the job reads (pinned by the
 * caller for the job's run, read-only), or NULL; out, set by the job: a new
 * posterior (struct cv_lap_post, malloc'd) for the caller to keep (and
 * free with cv_lap_post_destroy).  In-process runs have no store. */
typedef struct cv_job_store {
    const struct cv_lap_post *in;
    struct cv_lap_post *out;
} cv_job_store;

/* Runs a bound job.  m and d are the ones it was bound to (borrowed, must
 * not change during the call).  p may be NULL; when given, its cancel flag
 * and deadline are honoured and matvecs are counted.  Returns a new cJSON
 * result or NULL with e filled. */
cJSON *cv_job_exec(const cv_job_spec *j, const cv_model *m, const cv_dataset *d,
                   const cv_job_limits *lim, cv_progress *p, cv_err *e);
/* The same with the service's store (may be NULL: cv_job_exec). */
cJSON *cv_job_exec_store(const cv_job_spec *j, const cv_model *m, const cv_dataset *d,
                         const cv_job_limits *lim, cv_progress *p, cv_job_store *store,
                         cv_err *e);
/* cv_job_exec_store with the plan cv_job_check_memory made for this job, model,
 * dataset and limits (NULL: none): the engine takes that split instead of
 * probing the model a second time (the same plan; one probe of one and two
 * samples per job instead of two). */
cJSON *cv_job_exec_planned(const cv_job_spec *j, const cv_model *m, const cv_dataset *d,
                           const cv_job_limits *lim, const cv_curv_plan *plan, cv_progress *p,
                           cv_job_store *store, cv_err *e);

/* ---- data-parallel jobs (engine/comm.h) --------------------------------------
 * Every rank of comm calls these in the same order with the same job and
 * model; each returns the same result or the same error.  A rank's shard is
 * its cv_comm_share of the job's N samples. */

/* Rank `rank`'s shard (of `ranks`) of the bound job's batch of d (which may
 * be memory-mapped: only the shard's samples are read): a view for
 * all/range, a gathered copy of its indices. */
int cv_job_shard(const cv_job_spec *j, const cv_dataset *d, int ranks, int rank,
                 cv_batch *out, cv_err *e);
/* cv_job_bind with the dataset's values checked in this rank's shard only
 * (returned in *shard; free it with cv_dataset_free), agreed over the ranks. */
int cv_job_bind_shard(cv_job_spec *j, const cv_model *m, const cv_dataset *d,
                      const cv_comm *comm, cv_batch *shard, cv_err *e);
/* cv_job_check_memory of this rank's shard of a batch of n samples (the
 * budget is per rank), agreed over the ranks. */
int cv_job_check_memory_shard(const cv_job_spec *j, const cv_model *m, const cv_batch *shard,
                              size_t n, const cv_comm *comm, const cv_job_limits *lim,
                              cv_curv_plan *plan, cv_err *e);
/* cv_job_exec on this rank's shard of a batch of n samples.  p is made
 * collective (cancel and deadline are rank 0's, sampled at each agreement);
 * the result adds "ranks". */
cJSON *cv_job_exec_shard(const cv_job_spec *j, const cv_model *m, const cv_batch *shard,
                         size_t n, const cv_comm *comm, const cv_job_limits *lim,
                         cv_progress *p, cv_err *e);

/* A bound job's curvature operator kept open (libcurvd's curvd_operator):
 * its engine (the batch's forward state) built once, then any number of
 * products A X on its one block (blocks "full" or one group; the job's op
 * must use a curvature: "matvec" is the natural one, its vector options
 * unused).  j, m and d are borrowed and must outlive it; the model's values
 * must not change (open a new one after new parameters).  One thread at a
 * time per operator.  NULL with e filled (more than one block, out of
 * memory, the engine's errors). */
typedef struct cv_job_linop cv_job_linop;
cv_job_linop *cv_job_linop_open(const cv_job_spec *j, const cv_model *m, const cv_dataset *d,
                                const cv_job_limits *lim, cv_err *e);
size_t cv_job_linop_dim(const cv_job_linop *o);
/* Y = A X for k column-major vectors of the block's dimension. */
int cv_job_linop_apply(cv_job_linop *o, int k, const double *X, double *Y, cv_err *e);
void cv_job_linop_close(cv_job_linop *o);

/* Parse, bind and exec in one call (tests, tools). */
cJSON *cv_job_run(const cJSON *doc, const cv_model *m, const cv_dataset *d,
                  const cv_job_limits *lim, cv_progress *p, cv_err *e);

/* What a job costs the service (--max-memory, server/jobs.c):
 * cv_job_spec_bytes is the heap memory the parsed spec holds (its batch
 * indices as int32, names, option values and lists, resolved blocks);
 * cv_job_result_numbers (after bind to m) estimates the numbers of the
 * bound job's large result fields on a batch of n samples, per block of D
 * parameters (C: the model's outputs per sample): dense D^2,
 * per_sample_gradients n D, jacobian n C D, jvp n C, diag 2 D (+ n D with
 * per_sample), gradient, matvec, vjp, newton D, solve D per right-hand
 * side, eigen with return_vectors k D, density's grid (2 grid_points), snr
 * k directions (return_raw: its
 * per-sample values), and once per job kfac's factors and
 * eigenvalues (as asked) and predict's per-point fields and posterior
 * samples; 0 for ops whose results are small. */
size_t cv_job_spec_bytes(const cv_job_spec *j);
double cv_job_result_numbers(const cv_job_spec *j, const cv_model *m, size_t n);

/* A job document's text with its batch.indices read apart (api/job_indices.c):
 * when the top-level "batch" object's "indices" is a plain array of
 * integers in [0, 2^31) (digits only), returns 1 with the numbers in *idx
 * (malloc'd, *count of them) and in *rest (malloc'd, NUL-terminated,
 * *rest_len bytes) the text with that array replaced by a placeholder of
 * the same length ("[0" + spaces + "]", so byte offsets in parse errors
 * are the whole text's), to be parsed as usual; the spec parsed from it then takes *idx (cv_job_spec_set_indices).
 * 0 when there is no such array or it has another form (parse the text as
 * it is: the strict parser and cv_job_parse give the errors); -1 out of memory. */
int cv_job_text_indices(const char *text, size_t len, char **rest, size_t *rest_len,
                        int32_t **idx, size_t *count);
/* Replaces the parsed placeholder indices of j with idx (taken in every
 * case): -1 with e filled when j's batch is not an index list. */
int cv_job_spec_set_indices(cv_job_spec *j, int32_t *idx, size_t count, cv_err *e);

/* The op's name. */
const char *cv_job_op_name(const cv_job_spec *j);

/* {"error": {"code", "message", "field"}} */
cJSON *cv_err_to_json(const cv_err *e);

#endif
