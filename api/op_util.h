/* op_util.h - helpers every op module uses: the engine's curvature seed,
 * the op's curvature as a linop,
 * the actual loss change of a step, and result JSON (double arrays, a
 * block's parameter names; the job runner's "params" too).
 * (Shared here so that the op modules depend on this file, not on each
 * other.) */
#ifndef CV_OP_UTIL_H
#define CV_OP_UTIL_H

#include <cJSON.h>

#include "api/ops.h"

/* The seed of the engine's fisher_mc draws for job seed s: api/job.c builds
 * the engine with it and ops_vivit.c draws its Monte Carlo factor columns
 * with it, so that those columns are the engine's fisher_mc exactly. */
#define CV_OP_CURV_SEED(s) ((uint64_t)(s) ^ 0x5eedF15Cull)

/* A linop for the op's curvature on block b (ctx storage is the caller's;
 * a Kronecker curvature's operator is the job's, api/op_kron.h). */
void cv_op_linop(cv_op_ctx *c, const cv_block *b, cv_linop *op, cv_curv_linop_ctx *lctx);

/* When want is set, adds "actual_change": L(theta + step) - L(theta). */
int cv_op_add_actual_change(cv_op_ctx *c, const cv_block *b, const double *step, int want,
                            cJSON *out, cv_err *e);

/* n doubles as a JSON list. */
cJSON *cv_json_doubles(const double *v, size_t n);
/* k columns of n doubles (column-major) as a list of k lists. */
cJSON *cv_json_columns(const double *v, size_t n, int k);
/* The state_dict names of block b's tensors in model m, as a list. */
cJSON *cv_json_param_names(const cv_model *m, const cv_block *b);

#endif
