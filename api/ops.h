/* ops.h - the table of job ops.
 *
 * An op is one cv_op_def: its name, its option table (api/opts.h; values
 * land in the op's argument struct), its methods (a table of cv_op_method,
 * each with its run function and its own submit-time checks; which options
 * apply to which method is the option table's `methods` column), whether it
 * reads a curvature and honours blocks, its checks against the bound blocks,
 * and the result fields it may write.
 * api/job.c does everything common (parsing, batch, blocks, envelope) and
 * api/ops_table.c lists the ops (api/ops_table.h: the registry); the op modules (ops_core.c,
 * ops_estimators.c, ops_vivit.c, ops_kron.c) only compute, with api/op_util.h.
 */
#ifndef CV_OPS_H
#define CV_OPS_H

#include <cJSON.h>
#include <stddef.h>
#include <stdint.h>

#include "api/job.h"
#include "api/opts.h"
#include "engine/curv.h"
#include "engine/kron.h"

/* Every op's argument struct starts with this (options common to the ops
 * that take them; read by api/job.c when it builds the engine). */
typedef struct {
    int mc_samples; /* fisher_mc samples per data point (default 1) */
    /* Kronecker-factored curvatures (kfac, kflr, kfra, ekfac; api/op_kron.h):
     * cv_kron_fisher and cv_kron_approx of engine/kron.h (0: type-2, expand). */
    int fisher_type, kfac_approx;
} cv_op_base;

#define CV_OPT_MC(T) {"mc_samples", CV_OPT_INT, 1, 1e6, NULL, offsetof(T, base.mc_samples), NULL}
/* The Kronecker options of every op that applies a curvature (refused with
 * another curvature: api/op_kron.c cv_op_kron_check). */
#define CV_OPT_KRON(T)                                                                     \
    {"fisher_type", CV_OPT_ENUM, 0, 0, "type-2|mc|empirical", offsetof(T, base.fisher_type), \
     NULL},                                                                                \
        {"kfac_approx", CV_OPT_ENUM, 0, 0, "expand|reduce", offsetof(T, base.kfac_approx), NULL}
#define CV_OPT_END {NULL, 0, 0, 0, NULL, 0, NULL}

struct cv_op_kron;

/* The result fields of a Kronecker curvature's job (api/job.c run_one). */
#define CV_KRON_RESULTS "exact", "block_kinds"

/* What an op's run function gets. */
typedef struct {
    cv_curv *curv;
    const cv_model *m;
    cv_curvature kind;
    const cv_opts *opts;      /* opts->args: the op's argument struct */
    const char *method;       /* the method's name, NULL for ops without methods */
    uint64_t seed;
    cv_progress *progress;
    const cv_job_limits *lim;
    struct cv_op_kron *kron;  /* a Kronecker curvature's factors and per-block operators
                               * (api/op_kron.h; built once per job), else NULL */
    cv_job_store *store;      /* the service's kept state (api/job.h), NULL in-process */
    const cv_job_history *history; /* earlier versions of the model (api/job.h; NULL
                                    * vectors when unknown); NULL outside cv_job_exec */
} cv_op_ctx;

/* Computes the op on block b, adding result fields to out. */
typedef int (*cv_op_run_fn)(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e);
/* Submit-time check of option combinations (kind: the job's curvature). */
typedef int (*cv_op_check_fn)(const cv_opts *o, cv_curvature kind, cv_err *e);
/* Submit-time check of the options against one of the job's blocks, once
 * cv_job_bind has resolved them on the model (sizes: a vector's length, a
 * count bounded by the dimension); called for every block. */
typedef int (*cv_op_bind_fn)(const cv_opts *o, const cv_block *b, cv_err *e);

/* What an op holds besides the engine, for the job's memory plan: its own
 * vectors (probes, a Lanczos basis, a Gram matrix; bytes, an upper estimate),
 * the most vectors one product takes, and whether it forms Gram matrices
 * (micro-batches are then evaluated in pairs).  A job that builds Kronecker
 * factors (a Kronecker curvature, the kfac op, newton's Kronecker methods)
 * declares them in factor_bytes: the factors and what the op keeps per
 * factor (api/op_kron.h cv_op_kron_memory), from kron, the sizes of the
 * model's factors (filled by api/job.c before the memory function runs). */
typedef struct {
    size_t vector_bytes;
    int max_vectors;
    int pairs;
    size_t factor_bytes;
    cv_kron_sizes kron;       /* in: the model's Kronecker layers (engine/kron.h) */
} cv_op_memory;
/* Bytes from an estimate in double, clamped to SIZE_MAX (an estimate that
 * large is refused by the budget either way). */
static inline size_t cv_op_bytes(double b)
{
    return b >= (double)SIZE_MAX ? SIZE_MAX : b > 0 ? (size_t)b : 0;
}

/* For the job's curvature on block b of a batch of n samples with C outputs each. */
typedef void (*cv_op_memory_fn)(const cv_opts *o, cv_curvature kind, const cv_block *b,
                                size_t n, int C, cv_op_memory *out);

typedef struct cv_op_method {
    const char *name;
    cv_op_run_fn run;
    cv_op_check_fn check;         /* after the op's check; may be NULL */
    cv_op_memory_fn memory;       /* NULL: the op's */
    /* May be NULL.  At parse time, before the Kronecker option checks: the
     * curvature the job runs with (*kind: the job's, hessian when the job has
     * no "curvature"; curvature_given says whether it had one); may refuse
     * (400) or fill options the curvature implies.  newton kfac/ekfac/kfra. */
    int (*resolve)(cv_opts *o, int curvature_given, cv_curvature *kind, cv_err *e);
} cv_op_method;

typedef struct cv_op_def {
    const char *name;
    const cv_opt_spec *options;   /* ends with CV_OPT_END; at most CV_OPT_MAX */
    const cv_op_method *const *methods; /* NULL-terminated, the first is the default;
                                           NULL: the op has no methods */
    size_t args_size;             /* of the argument struct (starts with cv_op_base) */
    void (*defaults)(void *args, int method); /* NULL: zeros; mc_samples is set to 1 first */
    int uses_curvature;           /* reads "curvature" */
    int blockwise;                /* honours "blocks" (one result per block) */
    cv_op_check_fn check;         /* may be NULL */
    cv_op_run_fn run;             /* ops without methods */
    const char *const *results;   /* result fields it may write (NULL-terminated) */
    cv_op_bind_fn bind;           /* may be NULL */
    cv_op_memory_fn memory;       /* NULL: two vectors of the block, one at a time */
    /* May be NULL.  At bind, after the blocks (and bind): checks of the options
     * against the model itself (its loss, its layers; laplace); may record in
     * o->args what the memory function needs of the model (the bound job is
     * planned and run with those args). */
    int (*bind_model)(const cv_opts *o, const cv_model *m, const cv_block *blocks, int n,
                      cv_err *e);
} cv_op_def;

/* ---- the ops (one module each group) ---- */

extern const cv_op_def cv_op_loss, cv_op_gradient, cv_op_matvec, cv_op_dense,
    cv_op_per_sample;
extern const cv_op_def cv_op_trace, cv_op_diag, cv_op_eigen, cv_op_density, cv_op_solve,
    cv_op_newton, cv_op_frobenius;
extern const cv_op_def cv_op_snr;
extern const cv_op_def cv_op_kfac; /* api/ops_kron.c */
extern const cv_op_def cv_op_jvp, cv_op_vjp, cv_op_jacobian; /* api/ops_jacobian.c */
extern const cv_op_def cv_op_laplace; /* api/ops_laplace.c */
extern const cv_op_def cv_op_predict; /* api/ops_predict.c */
extern const cv_op_def cv_op_instruments; /* api/ops_instruments.c */

/* ViViT methods (api/ops_vivit.c): eigen "gram", newton "vivit". */
extern const cv_op_method cv_method_eigen_gram, cv_method_newton_vivit;
/* Kronecker Newton methods (api/ops_newton_kron.c): newton kfac, ekfac, kfra, acp. */
extern const cv_op_method cv_method_newton_kfac, cv_method_newton_ekfac, cv_method_newton_kfra,
    cv_method_newton_acp;

#endif
