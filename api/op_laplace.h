/* op_laplace.h - what ops laplace and predict share (issue 23): their common
 * options, checks and binding; the fit of a Laplace posterior's curvature on
 * the job's batch in one of the structures (full, diag, kron, lowrank,
 * last_layer: one of those on the last layer) with its prior and noise
 * (given, or the evidence's optimum) and the posterior built from it
 * (engine/posterior.h); and the kept posterior of options keep, posterior
 * and accumulate_into (the service's registry holds it: server/registry.h;
 * in-process there is none and those options are refused).
 *
 * Scaling (laplace-torch's): curvd's ggn is the GGN of the job's loss as
 * reduced, L = c sum_n l_n; the summed negative log-likelihood is kappa L / c
 * (kappa 1/2 for MSELoss, 1 otherwise), so G_sum = factor ggn with
 * factor = kappa / c ("ggn_factor"); likewise the Kronecker B (A is the
 * averaged input factor, as laplace-torch's KronLaplace).  The posterior
 * precision is P = g G_sum + P0, g = 1 / (sigma^2 T).
 *
 * A kept posterior holds P's data term H = g G_sum (P = H + P0) in the
 * structure it was fitted with, its per-block prior precisions delta_b and
 * its noise sigma; it belongs to the model version it was fitted on (the
 * registry records which).  Online Laplace (Botev's thesis §5.1.3, Ritter
 * et al. 2018): accumulate_into adds a new task's data term to it,
 * H <- H + g_t G_sum,t (the prior is not added again):
 *   full, diag, the dense blocks of kron's layers without a Kronecker
 *     structure: the exact sum;
 *   kron: the sum of Kronecker products is not a Kronecker product; the
 *     kept block stays one, B_acc (x) A_acc with
 *       A_acc = sum_t N_t A_t / sum_t N_t,  B_acc = sum_t g_t factor_t B_t
 *     (N_t the task's batch size): the KFAC factors of the union of the
 *     tasks' data, each task's at its own MAP - Botev's "adding up the
 *     Kronecker factors separately" with A weighted by the samples, exact
 *     for one task and for tasks with equal A; constant memory in the
 *     number of tasks, where the exact sum sum_t B_t (x) A_t would keep one
 *     pair of factors per task;
 *   lowrank: refused (a sum of rank-k terms is not rank k).
 */
#ifndef CV_OP_LAPLACE_H
#define CV_OP_LAPLACE_H

#include "api/ops.h"
#include "engine/kronop.h"
#include "engine/laplace.h"
#include "engine/posterior.h"

enum { CV_LAP_FULL = 0, CV_LAP_DIAG, CV_LAP_KRON, CV_LAP_LOWRANK, CV_LAP_LAST_LAYER };
#define CV_LAP_STRUCTURES "full|diag|kron|lowrank|last_layer"
#define CV_LAP_INNER_STRUCTURES "full|diag|kron|lowrank"
/* The name option keep: true gives the kept posterior. */
#define CV_LAP_DEFAULT_NAME "default"

/* The options of both ops. */
typedef struct {
    int structure, last_layer_structure;
    cv_opt_num_list prior;        /* prior_precision */
    double sigma_noise, temperature;
    int optimize_prior, optimize_sigma;
    int k;
    cv_opt_name keep, accumulate_into; /* laplace */
    cv_opt_name posterior;        /* predict */
    size_t post_dim;              /* the posterior's dimension, recorded at bind for the
                                   * memory plan (last_layer: the last layer's) */
} cv_lap_opts;

/* Both ops' argument structs start with this. */
typedef struct {
    cv_op_base base;
    cv_lap_opts lap;
} cv_lap_args;

#define CV_LAP_OFF(T, f) offsetof(T, common.lap.f)
/* The option table entries of both ops (T: the op's args, starting with
 * cv_lap_args common). */
#define CV_OPT_LAPLACE(T)                                                                  \
    {"structure", CV_OPT_ENUM, 0, 0, CV_LAP_STRUCTURES, CV_LAP_OFF(T, structure), NULL},   \
        {"last_layer_structure", CV_OPT_ENUM, 0, 0, CV_LAP_INNER_STRUCTURES,               \
         CV_LAP_OFF(T, last_layer_structure), NULL},                                       \
        {"prior_precision", CV_OPT_NUM_OR_LIST, 0, 1e300, NULL, CV_LAP_OFF(T, prior), NULL}, \
        {"sigma_noise", CV_OPT_NUM, 0, 1e300, NULL, CV_LAP_OFF(T, sigma_noise), NULL},     \
        {"temperature", CV_OPT_NUM, 0, 1e300, NULL, CV_LAP_OFF(T, temperature), NULL},     \
        {"optimize_prior", CV_OPT_BOOL, 0, 0, NULL, CV_LAP_OFF(T, optimize_prior), NULL},  \
        {"optimize_sigma", CV_OPT_BOOL, 0, 0, NULL, CV_LAP_OFF(T, optimize_sigma), NULL},  \
        {"k", CV_OPT_INT, 1, 1e9, NULL, CV_LAP_OFF(T, k), NULL}

static inline cv_lap_opts *cv_lap_of(const cv_opts *o) { return &((cv_lap_args *)o->args)->lap; }

/* laplace-torch's defaults (structure kron, prior precision 1, ...). */
void cv_lap_defaults(cv_lap_opts *a);
/* The structure the curvature is built with (last_layer: its inner one). */
int cv_lap_inner(const cv_lap_opts *a);
/* Submit-time checks of the common options (values, combinations). */
int cv_lap_check(const cv_opts *o, cv_err *e);
/* Checks against the model (the likelihood's options, the prior's length,
 * k); records post_dim. */
int cv_lap_bind(const cv_opts *o, const cv_model *m, cv_err *e);
/* The layer blocks the posterior covers (all, or the last) into *out (malloc'd). */
int cv_lap_prior_blocks(const cv_model *m, int last_layer, cv_block **out, int *n, cv_err *e);
/* The memory of the fit (bytes of vectors of the posterior's dimension D)
 * and the most vectors one product takes. */
double cv_lap_fit_memory(const cv_lap_opts *a, double D, int *max_vectors);

/* ---- the kept posterior ---------------------------------------------------------- */

typedef struct cv_lap_post {
    int structure, inner;
    int nb;                       /* prior (layer) blocks */
    size_t dim;
    size_t *bdim;                 /* nb */
    int tasks;                    /* fits accumulated (1: one) */
    double *delta;                /* nb prior precisions */
    double sigma, temperature;    /* the first task's */
    /* H by structure (g applied): full D x D; diag D; kron per block: kb
     * (B scaled by g factor, A averaged over kron_n samples) when kb[b].dim,
     * else Gb[b]; lowrank V (D x K), lam (K) */
    double *G, *d, **Gb, *V, *lam;
    cv_kron_block *kb;
    int K;
    double kron_n;
    size_t bytes;                 /* what it holds (the registry's count) */
} cv_lap_post;

void cv_lap_post_free(cv_lap_post *p);
/* For the registry (a void * destructor): frees and releases p's memory. */
void cv_lap_post_destroy(void *p);
/* A short description: structure, n_params, tasks, prior_precision, bytes. */
cJSON *cv_lap_post_json(const cv_lap_post *p);

/* The name the job keeps its posterior under (keep's, or accumulate_into's
 * own), or NULL. */
const char *cv_lap_keep_name(const cv_lap_opts *a);
/* What kept posterior a bound job reads (predict's posterior, laplace's
 * accumulate_into) and under which name it keeps one (laplace's keep, or
 * accumulate_into's own name); NULL when none.  Any other op: both NULL. */
void cv_lap_job_names(const cv_job_spec *j, const char **read, const char **write);
/* A lower bound of the bytes of the posterior the bound job j (on model m)
 * keeps (0 when it keeps none): the service refuses it at submit when even
 * that does not fit the registry's budget. */
size_t cv_lap_keep_bytes_min(const cv_job_spec *j, const cv_model *m);
/* Submit-time: the bound job j (on model m) reads kept posterior p (m's,
 * checked by the caller): checks that they fit together (accumulate_into:
 * the same structure; predict: no structure or prior options of its own)
 * and binds j again with p's structure (its memory plan, its sizes). */
int cv_lap_job_use(cv_job_spec *j, const cv_lap_post *p, const cv_model *m, cv_err *e);

/* ---- the fit ----------------------------------------------------------------------- */

typedef struct {
    cv_op_ctx *c;
    const cv_lap_opts *a;
    int structure, inner;
    cv_block *lb;                 /* prior blocks */
    int nb;
    cv_block tb;                  /* their union (the posterior's coordinates) */
    int *owner;                   /* the prior block of each coordinate */
    double *theta;                /* the MAP parameters on tb */
    double factor;                /* G_sum = factor * ggn */
    double nll;                   /* the summed NLL at unit noise (engine/laplace.h) */
    /* the curvature: G_sum (kron: B (x) A times kfac) */
    double *G, *d;
    cv_kron_block *kb;
    double **Gb;
    double *V, *lam;
    int K, converged;
    double kfac, kron_n;
    long *krank;                  /* kron: per block the factors' ranks (rank_a, rank_b;
                                   * engine/kron.h), 0 when unknown */
    /* the prior and the noise used; g = 1 / (sigma^2 T) (1 for a kept one) */
    double *delta;
    double sigma, g;
    const cv_lap_post *kept;      /* the kept posterior it was loaded from, or NULL */
} cv_lap_fit;

/* The prior blocks, the coordinates and the curvature of the options'
 * structure on the job's batch. */
int cv_lap_fit_build(cv_op_ctx *c, const cv_lap_opts *a, cv_lap_fit *s, cv_err *e);
/* The prior blocks and coordinates on the job's model and the curvature,
 * prior and noise of kept posterior p (copied). */
int cv_lap_fit_load(cv_op_ctx *c, const cv_lap_post *p, cv_lap_fit *s, cv_err *e);
/* The evidence's representation of s's curvature (engine/laplace.h) with
 * the likelihood and ||theta_b||^2 filled. */
int cv_lap_fit_evidence(const cv_lap_fit *s, cv_laplace *L, cv_err *e);
/* s->delta, s->sigma and s->g: the options, or the evidence's optimum. */
int cv_lap_fit_prior(cv_lap_fit *s, cv_err *e);
/* The posterior N(theta, P^-1); moves the dense curvature into it. */
int cv_lap_fit_posterior(cv_lap_fit *s, cv_posterior *P, cv_err *e);
/* A kept posterior from s (moves the curvature into it, scaled by g) after
 * cv_lap_fit_prior; with prev (may be NULL), prev's data term plus s's
 * (accumulate_into). */
int cv_lap_fit_keep(cv_lap_fit *s, const cv_lap_post *prev, cv_lap_post **out, cv_err *e);
/* log det P of a kept posterior (its H + P0). */
int cv_lap_post_logdet(cv_op_ctx *c, const cv_lap_post *p, double *out, cv_err *e);
void cv_lap_fit_free(cv_lap_fit *s);

/* "structure", "last_layer_structure", "likelihood", "ggn_factor", "n_params"
 * and with lowrank "k", "converged". */
void cv_lap_fit_header(const cv_lap_fit *s, cJSON *out);
/* A number, or null when not finite. */
void cv_lap_add_num(cJSON *o, const char *name, double x);
/* Refuses keep / posterior / accumulate_into without a store (in-process). */
int cv_lap_check_store(const cv_op_ctx *c, cv_err *e);

#endif
