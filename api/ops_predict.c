/* ops_predict.c - the "predict" op (issue 23, item 2): the linearized (GLM)
 * predictive of a Laplace posterior, f(x) +- J P^-1 J^T, on the job's batch
 * or on inputs options.x, with laplace-torch's link approximations (probit,
 * Monte Carlo), the predictive's NLL / accuracy / ECE against the batch's
 * targets, and posterior samples.
 *
 * The posterior is built on the job's batch exactly as op laplace builds it
 * (api/op_laplace.h, shared: the same options and scaling, G_sum =
 * ggn_factor * ggn, P = G_sum / (sigma^2 T) + P0, the same optimization of
 * the prior and the noise), or taken from a kept posterior (options.posterior,
 * the service's registry), and kept whole (engine/posterior.h: a Cholesky
 * factor, a diagonal, Kronecker eigenbases, a Woodbury low rank).  The predictive takes the
 * output Jacobians J_n of the points predicted (the batch's samples, or
 * options.x's) from engines of their own over chunks of those samples: per
 * chunk one vjp with C one-hot cotangents per sample (J_n^T e_c), whitened
 * by the posterior, J_n P^-1 J_n^T = W_n^T W_n (- Wm_n^T Wm_n, low rank).
 * Data-parallel jobs gather the batch and predict it on every rank. */
#include <lapacke.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "api/op_laplace.h"
#include "api/op_util.h"
#include "engine/posterior.h"
#include "engine/rng.h"

#define PREDICT_MC_SALT 0x9e3d1c7a5ull     /* mc_probs: stream n draws sample n's logits */
#define PREDICT_THETA_SALT 0x7e7a5a3b1ull  /* posterior_samples: stream t draws sample t */
#define PREDICT_MAX_COV_OUTPUTS 256        /* return_covariance: outputs per sample */
#define PREDICT_MAX_SAMPLE_ENTRIES 1e7     /* posterior_samples: samples x parameters */
#define PREDICT_CHUNK_DOUBLES ((size_t)1 << 22) /* a chunk's D x (samples * C) Jacobian */

typedef struct {
    cv_lap_args common;
    cv_opt_list x;
    int return_covariance, samples, return_posterior_samples;
} predict_args;

static const cv_opt_spec predict_opts[] = {
    CV_OPT_LAPLACE(predict_args),
    {"x", CV_OPT_LIST, 0, 0, NULL, offsetof(predict_args, x), NULL},
    {"return_covariance", CV_OPT_BOOL, 0, 0, NULL, offsetof(predict_args, return_covariance),
     NULL},
    {"samples", CV_OPT_INT, 1, 100000, NULL, offsetof(predict_args, samples), NULL},
    {"return_posterior_samples", CV_OPT_BOOL, 0, 0, NULL,
     offsetof(predict_args, return_posterior_samples), NULL},
    {"posterior", CV_OPT_NAME, 0, 0, NULL, CV_LAP_OFF(predict_args, posterior), NULL},
    CV_OPT_END};
CV_OPT_TABLE_FITS(predict_opts);

static void predict_defaults(void *p, int method)
{
    predict_args *a = p;
    cv_lap_defaults(&a->common.lap); /* as op laplace */
    a->samples = 100;                /* laplace-torch's n_samples */
}

static int check_predict(const cv_opts *o, cv_curvature kind, cv_err *e)
{
    const predict_args *a = o->args;
    if (cv_lap_check(o, e))
        return -1;
    if (a->return_posterior_samples && cv_lap_inner(&a->common.lap) == CV_LAP_LOWRANK)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.return_posterior_samples",
                          "posterior samples are drawn for structure full, diag and kron (and "
                          "last_layer with those); not for lowrank");
    if (cv_opts_given(o, "x") && a->x.n < 1)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.x",
                          "options.x must hold at least one sample");
    return 0;
}

static int bind_predict(const cv_opts *o, const cv_model *m, const cv_block *blocks, int n,
                        cv_err *e)
{
    predict_args *a = o->args;
    if (cv_lap_bind(o, m, e))
        return -1;
    if (cv_loss_is_class(m->loss)) {
        cv_loss_layout lay;
        cv_loss_layout_of(m, &lay);
        if (lay.positions != 1)
            return cv_err_set(e, CV_EINVAL, "invalid_model", "model",
                              "predict takes a classifier with one class vector per sample "
                              "(output shape [K]); this model's output has %d positions",
                              lay.positions);
    }
    int C = cv_model_output_dim(m);
    if (a->return_covariance && C > PREDICT_MAX_COV_OUTPUTS)
        return cv_err_set(e, CV_EINVAL, "too_large", "options.return_covariance",
                          "options.return_covariance returns C x C per sample; the model has "
                          "%d outputs (at most %d)", C, PREDICT_MAX_COV_OUTPUTS);
    size_t in = cv_shape_numel(&m->input_shape);
    if (cv_opts_given(o, "x") && (in == 0 || (size_t)a->x.n % in != 0))
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.x",
                          "options.x has %d numbers; it must hold whole samples of the model's "
                          "input (%zu numbers each, [N, *input_shape] flattened row-major)",
                          a->x.n, in);
    size_t dim = a->common.lap.post_dim;
    if (a->return_posterior_samples && (double)a->samples * dim > PREDICT_MAX_SAMPLE_ENTRIES)
        return cv_err_set(e, CV_EINVAL, "too_large", "options.samples",
                          "options.samples x the posterior's %zu parameters exceeds %.0f numbers "
                          "(fewer samples, or structure last_layer)",
                          dim, PREDICT_MAX_SAMPLE_ENTRIES);
    return 0;
}

static double *alloc_vals(size_t n) { return malloc(sizeof(double) * (n ? n : 1)); }

/* ---- the predictive ---------------------------------------------------------------- */

typedef struct {
    size_t N;
    int C;
    double *mean;  /* N x C */
    double *cov;   /* N x C x C */
} pred;

/* The engine options of a chunk's engine (ns samples of xs, k vectors): the
 * job's, one process; within the budget beside the job's engine when what it
 * holds leaves room, else the job's engine gives up its kept states (as op
 * eigen's gram sub-sample engine; the op's vectors are counted by the job's). */
static void chunk_options(cv_op_ctx *c, const cv_batch *xs, size_t ns, int k,
                          cv_curv_options *so)
{
    *so = *cv_curv_get_options(c->curv);
    int collective = cv_comm_active(so->comm);
    so->comm = NULL;
    so->progress = collective ? NULL : c->progress;
    so->vector_bytes = 0;
    so->factor_bytes = 0;
    so->max_vectors = k;
    so->pairs = 0;
    so->micro_batch = 0;
    so->kind = CV_CURV_GGN;
    size_t budget = so->memory_budget;
    if (!budget)
        return;
    cv_curv_plan held, fits;
    cv_err ignored;
    cv_curv_memory(c->curv, &held);
    so->memory_budget = budget > held.peak_bytes ? budget - held.peak_bytes : 1;
    cv_batch sub;
    cv_batch_view(xs, 0, ns, &sub);
    if (cv_curv_plan_memory(c->m, &sub, so, &fits, &ignored)) {
        size_t keep = cv_curv_release_states(c->curv);
        so->memory_budget = budget > keep ? budget - keep : 1;
    }
}

/* The predictive of samples [off, off + ns) of xs into out. */
static int predict_chunk(cv_lap_fit *s, cv_posterior *P, const cv_batch *xs, size_t off, size_t ns,
                         const cv_curv_options *so, float *cot, double *Y, double *W,
                         double *Wm, pred *out, cv_err *e)
{
    size_t D = s->tb.dim, C = (size_t)out->C, k = ns * C;
    int mr = cv_posterior_minus_rank(P);
    cv_batch sub;
    cv_batch_view(xs, off, ns, &sub);
    cv_curv *sc = cv_curv_new(s->c->m, &sub, so, e);
    if (!sc)
        return -1;
    const float *h = cv_curv_outputs(sc);
    for (size_t i = 0; i < ns * C; i++)
        out->mean[off * C + i] = h[i];
    memset(cot, 0, sizeof(float) * k * ns * C);
    for (size_t m = 0; m < ns; m++) /* vector j = m C + c: e_c at sample m */
        for (size_t c = 0; c < C; c++)
            cot[((m * C + c) * ns + m) * C + c] = 1.0f;
    int rc = cv_progress_check(s->c->progress, e) ||
             cv_curv_vjp(sc, &s->tb, (int)k, cot, Y, e) ||
             cv_posterior_whiten(P, (int)k, Y, W, Wm, e);
    for (size_t m = 0; m < ns && !rc; m++) {
        double *cv = out->cov + (off + m) * C * C;
        cblas_dgemm(CblasColMajor, CblasTrans, CblasNoTrans, (int)C, (int)C, (int)D, 1.0,
                    W + m * C * D, (int)D, W + m * C * D, (int)D, 0.0, cv, (int)C);
        if (mr)
            cblas_dgemm(CblasColMajor, CblasTrans, CblasNoTrans, (int)C, (int)C, mr, -1.0,
                        Wm + m * C * (size_t)mr, mr, Wm + m * C * (size_t)mr, mr, 1.0, cv,
                        (int)C);
    }
    cv_curv_free(sc);
    return rc;
}

static size_t chunk_samples(size_t N, size_t D, size_t C)
{
    size_t per = (D ? D : 1) * C, ns = PREDICT_CHUNK_DOUBLES / (per ? per : 1);
    ns = ns < 1 ? 1 : ns > 64 ? 64 : ns;
    return ns < N ? ns : (N ? N : 1);
}

static int predictive(cv_lap_fit *s, cv_posterior *P, const cv_batch *xs, pred *out, cv_err *e)
{
    size_t N = xs->n, D = s->tb.dim, C = (size_t)out->C;
    size_t ns = chunk_samples(N, D, C), k = ns * C;
    int mr = cv_posterior_minus_rank(P);
    out->N = N;
    out->mean = alloc_vals(N * C);
    out->cov = alloc_vals(N * C * C);
    float *cot = malloc(sizeof(float) * k * ns * C);
    double *Y = alloc_vals(D * k), *W = alloc_vals(D * k), *Wm = alloc_vals((size_t)mr * k);
    int rc = out->mean && out->cov && cot && Y && W && Wm
                 ? 0
                 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "predictive");
    cv_curv_options so;
    if (!rc)
        chunk_options(s->c, xs, ns, (int)k, &so);
    for (size_t off = 0; off < N && !rc; off += ns)
        rc = predict_chunk(s, P, xs, off, N - off < ns ? N - off : ns, &so, cot, Y, W, Wm, out,
                           e);
    free(cot);
    free(Y);
    free(W);
    free(Wm);
    return rc;
}

/* The samples predicted: options.x (zero targets, shaped like the job's
 * batch) or the job's batch (data-parallel: gathered whole on every rank). */
static int eval_set(cv_op_ctx *c, cv_batch *xs, int *owned, cv_err *e)
{
    const predict_args *a = c->opts->args;
    size_t first;
    const cv_batch *b = cv_curv_batch(c->curv, &first);
    *owned = 0;
    if (cv_opts_given(c->opts, "x")) {
        size_t in = cv_shape_numel(&c->m->input_shape), n = (size_t)a->x.n / in;
        if (cv_batch_alloc(b, n, xs, e))
            return -1;
        *owned = 1;
        for (size_t i = 0; i < n * in; i++)
            xs->x[i] = (float)a->x.v[i];
        if (!cv_dataset_check(xs, c->m, e))
            return 0;
        snprintf(e->field, sizeof e->field, "options.x");
        return -1;
    }
    if (!cv_comm_active(cv_curv_get_options(c->curv)->comm)) {
        *xs = *b;
        return 0;
    }
    size_t N = cv_curv_batch_size(c->curv);
    size_t *idx = malloc(sizeof(size_t) * (N ? N : 1));
    if (cv_curv_agree(c->curv, idx ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "batch"),
                      e)) {
        free(idx);
        return -1;
    }
    for (size_t i = 0; i < N; i++)
        idx[i] = i;
    int rc = cv_curv_gather_samples(c->curv, idx, N, xs, e);
    free(idx);
    *owned = !rc;
    return rc;
}

/* ---- link approximations and metrics ------------------------------------------------ */

static double sigmoid(double z) { return z >= 0 ? 1 / (1 + exp(-z)) : exp(z) / (1 + exp(z)); }

/* softmax of z (C) into p, or the sigmoid of each entry (bce). */
static void link(const double *z, size_t C, int bce, double *p)
{
    if (bce) {
        for (size_t c = 0; c < C; c++)
            p[c] = sigmoid(z[c]);
        return;
    }
    double mx = -INFINITY, sum = 0;
    for (size_t c = 0; c < C; c++)
        mx = z[c] > mx ? z[c] : mx;
    for (size_t c = 0; c < C; c++)
        sum += (p[c] = exp(z[c] - mx));
    for (size_t c = 0; c < C; c++)
        p[c] /= sum;
}

/* The probit approximation: the link of kappa_c mean_c, kappa_c = (1 + pi/8 var_c)^-1/2. */
static void probit(const pred *p, int bce, double *probs)
{
    size_t C = (size_t)p->C;
    double *z = alloc_vals(C);
    for (size_t n = 0; z && n < p->N; n++) {
        for (size_t c = 0; c < C; c++)
            z[c] = p->mean[n * C + c] /
                   sqrt(1 + M_PI / 8 * p->cov[n * C * C + c * C + c]);
        link(z, C, bce, probs + n * C);
    }
    free(z);
}

/* Monte Carlo: the link averaged over S draws of the logits from N(mean_n,
 * cov_n) (sample n: random stream n of the job's seed; cov_n's square root
 * from its eigendecomposition, negative rounding clipped). */
static int mc(const pred *p, int bce, int S, uint64_t seed, double *out, cv_err *e)
{
    size_t C = (size_t)p->C;
    double *Q = alloc_vals(C * C), *w = alloc_vals(C), *z = alloc_vals(3 * C);
    int rc = Q && w && z ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "mc_probs");
    for (size_t n = 0; n < p->N && !rc; n++) {
        memcpy(Q, p->cov + n * C * C, sizeof(double) * C * C);
        if (LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'V', 'U', (lapack_int)C, Q, (lapack_int)C, w)) {
            rc = cv_err_set(e, CV_EINTERNAL, "internal", "", "eigendecomposition failed");
            break;
        }
        for (size_t j = 0; j < C; j++) /* R = Q diag(sqrt(w)) */
            for (size_t i = 0; i < C; i++)
                Q[j * C + i] *= w[j] > 0 ? sqrt(w[j]) : 0;
        cv_rng r;
        cv_rng_seed_stream(&r, seed ^ PREDICT_MC_SALT, n);
        double *acc = out + n * C, *h = z + C, *pr = z + 2 * C;
        memset(acc, 0, sizeof(double) * C);
        for (int t = 0; t < S; t++) {
            cv_rng_gaussian(&r, z, C);
            for (size_t i = 0; i < C; i++) {
                h[i] = p->mean[n * C + i];
                for (size_t j = 0; j < C; j++)
                    h[i] += Q[j * C + i] * z[j];
            }
            link(h, C, bce, pr);
            for (size_t i = 0; i < C; i++)
                acc[i] += pr[i] / S;
        }
    }
    free(Q);
    free(w);
    free(z);
    return rc;
}

/* Expected calibration error with 10 equal-width confidence bins [b/10, (b+1)/10)
 * (confidence 1 in the last): sum_b |sum_{i in b} (correct_i - conf_i)| / n. */
typedef struct {
    double gap[10];
    size_t n, right;
    double nll;
} calib;

static void calib_add(calib *k, double conf, int correct)
{
    int b = (int)floor(conf * 10);
    b = b < 0 ? 0 : b > 9 ? 9 : b;
    k->gap[b] += correct - conf;
    k->n++;
    k->right += correct != 0;
}

static double calib_ece(const calib *k)
{
    double s = 0;
    for (int b = 0; b < 10; b++)
        s += fabs(k->gap[b]);
    return k->n ? s / (double)k->n : NAN;
}

static void add_num(cJSON *o, const char *name, double x)
{
    if (isfinite(x))
        cJSON_AddNumberToObject(o, name, x);
    else
        cJSON_AddNullToObject(o, name);
}

/* nll (mean over the samples of -log p(y_n | x_n)), accuracy and ece of the
 * probit predictive (classification), or the Gaussian predictive
 * N(mean, variance + sigma^2) (regression: nll only). */
static void metrics(const cv_lap_fit *s, const pred *p, const double *probs, const cv_batch *xs,
                    cJSON *out)
{
    const cv_model *m = s->c->m;
    size_t C = (size_t)p->C, counted = 0;
    calib k = {{0}, 0, 0, 0};
    double nll = 0;
    if (m->loss == CV_LOSS_MSE) {
        double s2 = s->sigma * s->sigma;
        for (size_t n = 0; n < p->N; n++)
            for (size_t c = 0; c < C; c++) {
                double v = p->cov[n * C * C + c * C + c] + s2,
                       r = xs->targets[n * C + c] - p->mean[n * C + c];
                nll += 0.5 * (log(2 * M_PI * v) + r * r / v);
            }
        add_num(out, "nll", nll / (double)p->N);
        return;
    }
    if (m->loss == CV_LOSS_BCE) {
        for (size_t n = 0; n < p->N; n++)
            for (size_t c = 0; c < C; c++) {
                double q = probs[n * C + c], t = xs->targets[n * C + c];
                nll -= t * log(q > 1e-300 ? q : 1e-300) +
                       (1 - t) * log(1 - q > 1e-300 ? 1 - q : 1e-300);
                calib_add(&k, q >= 0.5 ? q : 1 - q, (q > 0.5) == (t > 0.5));
            }
        counted = p->N;
    } else {
        cv_loss_layout lay;
        cv_loss_layout_of(m, &lay);
        for (size_t n = 0; n < p->N; n++) {
            int64_t y = xs->labels[n];
            if (y == lay.ignore_index || y < 0 || (size_t)y >= C)
                continue;
            const double *q = probs + n * C;
            size_t best = 0;
            for (size_t c = 1; c < C; c++)
                best = q[c] > q[best] ? c : best;
            nll -= log(q[y] > 1e-300 ? q[y] : 1e-300);
            calib_add(&k, q[best], best == (size_t)y);
            counted++;
        }
    }
    add_num(out, "nll", counted ? nll / (double)counted : NAN);
    add_num(out, "accuracy", k.n ? (double)k.right / (double)k.n : NAN);
    add_num(out, "ece", calib_ece(&k));
}

/* ---- the result --------------------------------------------------------------------- */

static cJSON *rows(const double *v, size_t N, size_t C)
{
    cJSON *a = cJSON_CreateArray();
    for (size_t n = 0; a && n < N; n++)
        cJSON_AddItemToArray(a, cv_json_doubles(v + n * C, C));
    return a;
}

static int posterior_samples(cv_lap_fit *s, cv_posterior *P, cJSON *out, cv_err *e)
{
    const predict_args *a = s->c->opts->args;
    size_t D = s->tb.dim;
    double *z = alloc_vals(2 * D), *th = z + D;
    if (!z)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "posterior samples");
    cJSON *arr = cJSON_AddArrayToObject(out, "posterior_samples");
    int rc = 0;
    for (int t = 0; t < a->samples && !rc; t++) {
        cv_rng r;
        cv_rng_seed_stream(&r, s->c->seed ^ PREDICT_THETA_SALT, (uint64_t)t);
        cv_rng_gaussian(&r, z, D);
        rc = cv_posterior_sample(P, z, th, e);
        for (size_t i = 0; i < D && !rc; i++)
            th[i] += s->theta[i];
        if (!rc)
            cJSON_AddItemToArray(arr, cv_json_doubles(th, D));
    }
    cJSON_AddItemToObject(out, "posterior_params", cv_json_param_names(s->c->m, &s->tb));
    free(z);
    return rc;
}

/* The posterior's description: the fit's header, its prior and noise. */
static void header(const cv_lap_fit *s, cJSON *out)
{
    cv_lap_fit_header(s, out);
    if (s->kept) {
        cJSON_AddStringToObject(out, "posterior", cv_lap_of(s->c->opts)->posterior.s);
        cJSON_AddNumberToObject(out, "tasks", s->kept->tasks);
    }
    if (s->kept || s->a->prior.is_list)
        cJSON_AddItemToObject(out, "prior_precision", cv_json_doubles(s->delta, (size_t)s->nb));
    else
        add_num(out, "prior_precision", s->delta[0]);
    add_num(out, "sigma_noise", s->sigma);
    add_num(out, "temperature", s->kept ? s->kept->temperature : s->a->temperature);
}

static int results(cv_lap_fit *s, cv_posterior *P, const pred *p, const cv_batch *xs, int targets,
                   cJSON *out, cv_err *e)
{
    const predict_args *a = s->c->opts->args;
    const cv_model *m = s->c->m;
    size_t N = p->N, C = (size_t)p->C;
    header(s, out);
    cJSON_AddItemToObject(out, "mean", rows(p->mean, N, C));
    double *v = alloc_vals(N * C), *probs = alloc_vals(N * C);
    int rc = v && probs ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "predictive");
    for (size_t i = 0; i < N * C && !rc; i++)
        v[i] = p->cov[(i / C) * C * C + (i % C) * (C + 1)];
    if (!rc)
        cJSON_AddItemToObject(out, "variance", rows(v, N, C));
    if (!rc && a->return_covariance) {
        cJSON *cv = cJSON_AddArrayToObject(out, "covariance");
        for (size_t n = 0; n < N; n++)
            cJSON_AddItemToArray(cv, cv_json_columns(p->cov + n * C * C, C, (int)C));
    }
    int cls = m->loss != CV_LOSS_MSE, bce = m->loss == CV_LOSS_BCE;
    if (!rc && cls) {
        probit(p, bce, probs);
        cJSON_AddItemToObject(out, "probs", rows(probs, N, C));
    }
    if (!rc && cls && cv_opts_given(s->c->opts, "samples")) {
        double *q = alloc_vals(N * C);
        rc = q ? mc(p, bce, a->samples, s->c->seed, q, e)
               : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "mc_probs");
        if (!rc)
            cJSON_AddItemToObject(out, "mc_probs", rows(q, N, C));
        free(q);
    }
    if (!rc && (cv_opts_given(s->c->opts, "samples") || a->return_posterior_samples))
        cJSON_AddNumberToObject(out, "samples", a->samples);
    if (!rc && targets)
        metrics(s, p, probs, xs, out);
    if (!rc && a->return_posterior_samples)
        rc = posterior_samples(s, P, out, e);
    free(v);
    free(probs);
    return rc;
}

static int run_predict(cv_op_ctx *c, const cv_block *full, cJSON *out, cv_err *e)
{
    const cv_lap_opts *a = cv_lap_of(c->opts);
    const cv_model *m = c->m;
    cv_lap_fit s = {0};
    cv_posterior P = {0};
    pred p = {0};
    p.C = cv_model_output_dim(m);
    cv_batch xs = {0};
    int owned = 0, rc = cv_lap_check_store(c, e);
    if (!rc && a->posterior.on && !c->store->in)
        rc = cv_err_set(e, CV_EINTERNAL, "internal", "options.posterior",
                        "the kept posterior was not loaded");
    if (!rc)
        rc = a->posterior.on ? cv_lap_fit_load(c, c->store->in, &s, e)
                             : cv_lap_fit_build(c, a, &s, e) || cv_lap_fit_prior(&s, e);
    if (!rc)
        rc = cv_lap_fit_posterior(&s, &P, e);
    if (!rc)
        rc = eval_set(c, &xs, &owned, e);
    if (!rc)
        rc = predictive(&s, &P, &xs, &p, e);
    if (!rc)
        rc = results(&s, &P, &p, &xs, !cv_opts_given(c->opts, "x"), out, e);
    if (owned)
        cv_dataset_free(&xs);
    free(p.mean);
    free(p.cov);
    cv_posterior_free(&P);
    cv_lap_fit_free(&s);
    return rc;
}

static const char *const predict_results[] = {
    "structure", "last_layer_structure", "likelihood", "ggn_factor", "n_params", "k",
    "converged", "prior_precision", "sigma_noise", "temperature", "mean", "variance",
    "covariance", "probs", "mc_probs", "samples", "nll", "accuracy", "ece",
    "posterior_samples", "posterior_params", "posterior", "tasks", NULL};

/* Memory (bytes): the fit as op laplace's (api/op_laplace.h), a chunk's
 * Jacobian and its whitening, the predictive's means and covariances. */
static void mem_predict(const cv_opts *o, cv_curvature kind, const cv_block *b, size_t n, int C,
                        cv_op_memory *m)
{
    const predict_args *a = o->args;
    const cv_lap_opts *l = &a->common.lap;
    double D = (double)(l->post_dim ? l->post_dim : b->dim);
    int maxv;
    double fit = cv_lap_fit_memory(l, D, &maxv);
    double N = (double)n > a->x.n ? (double)n : a->x.n;
    size_t ns = chunk_samples((size_t)N, (size_t)D, (size_t)C);
    double chunk = (2 * D + l->k) * ns * C * sizeof(double) + (double)ns * ns * C * C * 4;
    double out = N * C * (C + 4.0) * sizeof(double);
    m->vector_bytes = cv_op_bytes(fit + chunk + out);
    m->max_vectors = maxv > (int)(ns * C) ? maxv : (int)(ns * C);
    m->pairs = 0;
}

const cv_op_def cv_op_predict = {"predict",      predict_opts,   NULL,   sizeof(predict_args),
                                 predict_defaults, 0,            0,      check_predict,
                                 run_predict,    predict_results, NULL,  mem_predict,
                                 bind_predict};
