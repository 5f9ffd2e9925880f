/* op_args.h - the argument structs of the ops whose methods live in more
 * than one module: eigen (lanczos, power in ops_estimators.c; gram in
 * ops_vivit.c), newton (cg, minres; vivit; kfac, ekfac, kfra, acp) and the ViViT settings they share
 * with snr.  The option tables write into these fields by offsetof. */
#ifndef CV_OP_ARGS_H
#define CV_OP_ARGS_H

#include "api/ops.h"
#include "engine/estimators.h"

/* ViViT factor settings (eigen gram, newton vivit, snr). */
typedef struct {
    int mc;            /* Monte Carlo factor columns (with ggn) */
    double threshold;  /* eigenvalue clip; < 0: the default (1e-6 lambda_max) */
    double subsample;  /* fraction of the batch for the curvature (1: all) */
} cv_vivit_args;

#define CV_OPT_VIVIT(T, M)                                                                 \
    {"threshold", CV_OPT_NUM, 0, 1e9, NULL, offsetof(T, vivit.threshold), M},              \
        {"mc", CV_OPT_BOOL, 0, 0, NULL, offsetof(T, vivit.mc), M},                         \
        {"subsample", CV_OPT_NUM, 1e-9, 1, NULL, offsetof(T, vivit.subsample), M}

void cv_vivit_args_default(cv_vivit_args *a);

enum { CV_EIGEN_LANCZOS = 0, CV_EIGEN_POWER, CV_EIGEN_GRAM, CV_EIGEN_BLOCK_LANCZOS };

typedef struct {
    cv_op_base base;
    cv_eigen_options o;  /* k, which, max_iter, tol, return_vectors */
    int method;
    cv_vivit_args vivit;
    int block_size;      /* block_lanczos: vectors per product (default 16) */
} cv_eigen_args;

enum { CV_NEWTON_CG = 0, CV_NEWTON_MINRES, CV_NEWTON_VIVIT, CV_NEWTON_KFAC, CV_NEWTON_EKFAC,
       CV_NEWTON_KFRA, CV_NEWTON_ACP, CV_NEWTON_LSMR, CV_NEWTON_NEUMANN };
enum { CV_NEWTON_DAMP_EXACT = 0, CV_NEWTON_DAMP_FACTORED };
enum { CV_NEWTON_DIRECTIONAL = 0, CV_NEWTON_FULL };

typedef struct {
    cv_op_base base;
    cv_solve_options o;     /* tol, max_iter (cg, minres) */
    int method;
    cv_opt_choice damping;  /* a number, or choice 0: "bootstrap" (vivit) */
    cv_opt_choice k;        /* a number, or choice 0: "all" (vivit) */
    int actual_change;
    int mode;               /* CV_NEWTON_DIRECTIONAL / _FULL */
    cv_opt_list grid;
    int bootstrap_samples;  /* 0: the engine's default */
    cv_vivit_args vivit;
    int damping_mode;       /* CV_NEWTON_DAMP_* (kfac, ekfac, kfra) */
    int rescale;            /* Botev's alpha* with the exact curvature (kfac, ekfac, kfra, acp) */
    cv_opt_choice acp_alpha;/* acp: a number > 0, or choice 0: "max" (George's heuristic) */
} cv_newton_args;

#endif
