/* ops.h - the table of job ops: each op declares its options and runs on one
 * block of one curvature of one batch, writing result fields into a JSON
 * object.  api/job.c does everything common (parsing, batch, blocks,
 * envelope); the op modules (ops_core.c, ops_estimators.c, ...) only compute. */
#ifndef CV_OPS_H
#define CV_OPS_H

#include <cJSON.h>
#include <stdint.h>

#include "api/job.h"
#include "api/opts.h"
#include "engine/curv.h"

typedef struct {
    cv_curv *curv;
    const cv_model *m;
    cv_curvature kind;
    const cJSON *options;
    uint64_t seed;
    cv_progress *progress;
    const cv_job_limits *lim;
} cv_op_ctx;

typedef struct {
    const char *name;
    const cv_opt_spec *options;  /* ends with {NULL} */
    int uses_curvature;          /* reads "curvature" */
    int blockwise;               /* honours "blocks" (one result per block) */
    /* Extra validation of option combinations (may be NULL). */
    int (*check)(const cJSON *options, cv_err *e);
    int (*run)(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e);
} cv_op_def;

/* The op named name, or NULL. */
const cv_op_def *cv_op_find(const char *name);

/* A linop for the op's curvature on block b (ctx storage is the caller's). */
void cv_op_linop(cv_op_ctx *c, const cv_block *b, cv_linop *op, cv_curv_linop_ctx *lctx);

/* With options.actual_change, adds "actual_change": L(theta + step) - L(theta). */
int cv_op_add_actual_change(cv_op_ctx *c, const cv_block *b, const double *step, cJSON *out,
                            cv_err *e);

/* JSON helpers for results. */
cJSON *cv_json_doubles(const double *v, size_t n);
/* k columns of n doubles (column-major) as a list of k lists. */
cJSON *cv_json_columns(const double *v, size_t n, int k);

extern const cv_op_def cv_op_loss, cv_op_gradient, cv_op_matvec, cv_op_dense,
    cv_op_per_sample;
extern const cv_op_def cv_op_trace, cv_op_diag, cv_op_eigen, cv_op_density, cv_op_solve,
    cv_op_newton;
extern const cv_op_def cv_op_snr;

/* ViViT (api/ops_vivit.c): eigen with method "gram", newton with method "vivit". */
int cv_op_eigen_gram(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e);
int cv_op_newton_vivit(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e);

#endif
