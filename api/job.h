/* job.h - the job document (contract §3): validation and execution.
 *
 * A job is JSON {op, model, dataset, curvature, batch, blocks, seed, options}.
 * cv_job_validate checks it completely (unknown fields, types, ranges, option
 * names of the op) without touching a model, so a service can answer 400
 * before queueing.  cv_job_run resolves the batch against a dataset, builds
 * the curvature engine and runs the op, returning the result JSON.
 * The same code serves `curvd run` and the HTTP API.
 */
#ifndef CV_JOB_H
#define CV_JOB_H

#include <cJSON.h>
#include <stddef.h>

#include "engine/dataset.h"
#include "engine/err.h"
#include "engine/linop.h"
#include "engine/model.h"

typedef struct {
    size_t dense_max;        /* largest D for op "dense" / exact paths (default 4096) */
    size_t max_vector_dim;   /* largest vector returned inline (default: unlimited) */
    int blas_threads;        /* 0: leave OpenBLAS as configured */
} cv_job_limits;

void cv_job_limits_default(cv_job_limits *l);

/* Full validation of a job document; fills e (field = JSON path). */
int cv_job_validate(const cJSON *job, cv_err *e);

/* cv_job_validate plus everything that can be checked against the model
 * and dataset without running: the dataset fits the model, the batch lies
 * inside the dataset, block parameter names exist.  Cheap. */
int cv_job_check(const cJSON *job, const cv_model *m, const cv_dataset *d, cv_err *e);

/* Names of the model and dataset the job refers to (NULL if absent). */
const char *cv_job_model_name(const cJSON *job);
const char *cv_job_dataset_name(const cJSON *job);
const char *cv_job_op_name(const cJSON *job);

/* Runs a job.  m and d are borrowed and must not change during the call.
 * p may be NULL; when given, its cancel flag and deadline are honoured and
 * matvecs are counted.  Returns a new cJSON result or NULL with e filled. */
cJSON *cv_job_run(const cJSON *job, const cv_model *m, const cv_dataset *d,
                  const cv_job_limits *lim, cv_progress *p, cv_err *e);

/* {"error": {"code", "message", "field"}} */
cJSON *cv_err_to_json(const cv_err *e);

/* The ops curvd knows (NULL-terminated), for documentation and listings. */
const char *const *cv_job_op_names(void);

#endif
