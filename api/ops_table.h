/* ops_table.h - the op registry (api/ops_table.c): the ops by name and by
 * index, their methods, the names of the job statuses (the enum is
 * cv_job_status in api/job.h) and the GET /v1/ops document. */
#ifndef CV_OPS_TABLE_H
#define CV_OPS_TABLE_H

#include <cJSON.h>

#include "api/job.h"

struct cv_op_def; /* api/ops.h */

/* The op named name, or NULL. */
const struct cv_op_def *cv_op_find(const char *name);
/* The i-th op (0 <= i < cv_op_count()). */
int cv_op_count(void);
const struct cv_op_def *cv_op_at(int i);
/* Index of the method named name in def's table, or -1; the method count. */
int cv_op_method_index(const struct cv_op_def *def, const char *name);
int cv_op_method_count(const struct cv_op_def *def);
/* def's method names into names (max entries, NULL-terminated); returns the count. */
int cv_op_method_names(const struct cv_op_def *def, const char **names, int max);

/* The job statuses' names (the CV_JOB_STATUSES list). */
const char *cv_job_status_name(cv_job_status s);
int cv_job_status_from_name(const char *s); /* -1 if unknown */

/* GET /v1/ops: {"ops", "curvatures", "statuses", "op_specs"}; NULL when out
 * of memory. */
cJSON *cv_ops_describe(void);

#endif
