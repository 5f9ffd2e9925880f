/* kron_ext.c - the Kronecker variants built on cv_curv_kron's factors (API
 * in kron.h): EKFAC's eigenvalues in KFAC's eigenbasis (cv_curv_ekfac: one
 * backward walk of the fisher type's vectors, the layers' ekfac_add kernels)
 * and Botev's KFRA recursion for the output factors (cv_curv_kfra: batch
 * averages from the forward state, no backward walk), both over
 * micro-batches and ranks. */
#include "kron.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kronop.h"
#include "layer_activation.h"
#include "layer_linear.h"
#include "layer_passthrough.h"
#include "part_internal.h"

static int check_options(const cv_kron_options *o, cv_err *e)
{
    if ((unsigned)o->fisher_type > CV_KRON_EMPIRICAL || (unsigned)o->approx > CV_KRON_REDUCE)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options",
                          "unknown fisher_type or kfac_approx");
    return 0;
}

/* The weight of B's vectors (kron.h: type-2 1, mc c/M, empirical c). */
static double vector_weight(cv_curv *c, cv_kron_fisher ft)
{
    const cv_curv_options *co = cv_curv_get_options(c);
    double cs = cv_curv_loss_state(c)->scale;
    int M = co->mc_samples > 0 ? co->mc_samples : 1;
    return ft == CV_KRON_MC ? cs / M : ft == CV_KRON_EMPIRICAL ? cs : 1.0;
}

/* ---- EKFAC ------------------------------------------------------------------- */

typedef struct {
    cv_curvature kind;
    char layers[CV_MAX_LAYERS];
    const cv_kron_block *kb[CV_MAX_LAYERS];
    double *s[CV_MAX_LAYERS];
} ekfac_job;

static int ekfac_visit(cv_part *c, int l, int k, const float *cot, void *arg, cv_err *e)
{
    const ekfac_job *j = arg;
    if (c->ops[l]->ekfac_add(&c->ctx[l], k, cot, j->kb[l]->q_a, j->kb[l]->q_b, j->s[l]))
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "EKFAC values of layers[%d]", l);
    return 0;
}

static int ekfac_share(cv_part *p, void *arg, cv_err *e)
{
    ekfac_job *j = arg;
    return cv_part_kron_walk(p, j->kind, j->layers, 0, ekfac_visit, j, NULL, e);
}

/* The factors' eigenbases (kb[f], borrowed factors) and the offsets of
 * each factor's values in one buffer of *len doubles. */
static int ekfac_setup(const cv_model *m, const cv_kron *k, cv_kron_block *kb, size_t *off,
                       size_t *len, cv_err *e)
{
    *len = 0;
    for (int f = 0; f < k->nfactors; f++) {
        const cv_kron_factor *kf = &k->factors[f];
        const cv_layer *L = &m->layers[kf->layer];
        if (!L->cls->ops->ekfac_add)
            return cv_err_set(e, CV_EINVAL, "unsupported", "curvature",
                              "ekfac: layers[%d] (%s) has no EKFAC kernel", kf->layer,
                              L->cls->name);
        if (cv_kron_block_init(&kb[f], kf->dim_a - kf->has_bias, kf->dim_b, kf->has_bias, kf->A,
                               kf->B, 0, e) ||
            cv_kron_block_eig(&kb[f], e))
            return -1;
        off[f] = *len;
        *len += (size_t)kf->dim_a * kf->dim_b;
    }
    return 0;
}

static void free_values(double **s, int n)
{
    for (int f = 0; s && f < n; f++)
        free(s[f]);
    free(s);
}

/* out[f] = malloc'd copies of buf's pieces times w; NULL when out of memory. */
static double **split_values(const cv_kron *k, const double *buf, const size_t *off, double w)
{
    double **out = calloc((size_t)k->nfactors + 1, sizeof(double *));
    for (int f = 0; out && f < k->nfactors; f++) {
        size_t d = (size_t)k->factors[f].dim_a * k->factors[f].dim_b;
        if (!(out[f] = malloc(sizeof(double) * d))) {
            free_values(out, f);
            return NULL;
        }
        double mx = 0;
        for (size_t q = 0; q < d; q++)
            mx = fmax(mx, out[f][q] = w * buf[off[f] + q]);
        /* sums of squared rotated float32 gradients: a coordinate the
         * gradients do not reach gets float32 noise, not 0 (as kronop
         * rounds the factors' eigenvalues) */
        double tol = sqrt((double)d) * FLT_EPSILON * mx;
        for (size_t q = 0; q < d; q++)
            if (out[f][q] <= tol)
                out[f][q] = 0;
    }
    return out;
}

int cv_curv_ekfac(cv_curv *c, const cv_kron_options *o, const cv_kron *k, double ***s_out,
                  cv_err *e)
{
    *s_out = NULL;
    cv_kron_options opt = o ? *o : (cv_kron_options){0};
    if (check_options(&opt, e))
        return -1;
    const cv_model *m = cv_curv_model(c);
    int nf = k->nfactors;
    cv_kron_block *kb = calloc((size_t)nf + 1, sizeof *kb);
    size_t *off = calloc((size_t)nf + 1, sizeof *off), len = 0;
    ekfac_job *job = calloc(1, sizeof *job);
    double *buf = NULL;
    int rc = kb && off && job ? 0
                              : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "EKFAC setup");
    if (!rc)
        rc = ekfac_setup(m, k, kb, off, &len, e);
    if (!rc && !(buf = calloc(len + 1, sizeof(double))))
        rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "EKFAC values (%zu doubles)", len);
    if (!cv_curv_agree(c, rc, e)) {
        job->kind = cv_kron_fisher_curvature(opt.fisher_type);
        for (int f = 0; f < nf; f++) {
            int l = k->factors[f].layer;
            job->layers[l] = 1;
            job->kb[l] = &kb[f];
            job->s[l] = buf + off[f];
        }
        rc = cv_curv_sum_parts(c, ekfac_share, job, buf, len, e);
        if (!rc && !(*s_out = split_values(k, buf, off, vector_weight(c, opt.fisher_type))))
            rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "EKFAC values");
    } else {
        rc = -1;
    }
    for (int f = 0; kb && f < nf; f++)
        cv_kron_block_free(&kb[f]);
    free(kb);
    free(off);
    free(job);
    free(buf);
    return rc;
}

/* ---- KFRA -------------------------------------------------------------------- */

static int is_activation(const cv_layer *L) { return L->cls->ops == &cv_activation_ops; }

static int is_passthrough(const cv_layer *L)
{
    return L->cls == &cv_identity_class || L->cls == &cv_dropout_class ||
           L->cls == &cv_flatten_class;
}

/* The supported models: Sequential, CE/MSE/BCE, Linear layers on one row per
 * sample with elementwise activations (and identities) between them. */
static int kfra_check(const cv_model *m, cv_err *e)
{
    if (m->graph)
        return cv_err_set(e, CV_EINVAL, "unsupported", "curvature",
                          "kfra: supports Sequential models only, not the graph form");
    if (m->loss != CV_LOSS_CE && m->loss != CV_LOSS_MSE && m->loss != CV_LOSS_BCE)
        return cv_err_set(e, CV_EINVAL, "unsupported", "curvature",
                          "kfra: supports the CrossEntropy, MSE and BCE losses");
    int nlin = 0;
    for (int l = 0; l < m->nlayers; l++) {
        const cv_layer *L = &m->layers[l];
        int lin = L->cls == &cv_linear_class;
        if (lin && L->in_shape.rank != 1)
            return cv_err_set(e, CV_EINVAL, "unsupported", "curvature",
                              "kfra: layers[%d] (Linear) acts on rows of a sequence; KFRA "
                              "supports one row per sample",
                              l);
        if (!lin && !is_activation(L) && !is_passthrough(L))
            return cv_err_set(e, CV_EINVAL, "unsupported", "curvature",
                              "kfra: layers[%d] (%s) is not supported; KFRA supports chains of "
                              "Linear layers with elementwise activations between them",
                              l, L->cls->name);
        if (!lin && nlin && (is_activation(L) || L->cls == &cv_flatten_class) &&
            L->in_shape.rank != 1)
            return cv_err_set(e, CV_EINVAL, "unsupported", "curvature",
                              "kfra: layers[%d] (%s) acts on more than one dimension", l,
                              L->cls->name);
        nlin += lin;
    }
    if (!nlin)
        return cv_err_set(e, CV_EINVAL, "unsupported", "curvature", "kfra: no Linear layer");
    return 0;
}

/* The factor table: one per Linear layer, in order, with its per-layer block. */
static int kfra_layout(const cv_model *m, cv_kron *out, size_t *len, cv_err *e)
{
    int nb = cv_blocks_per_layer(m, NULL, 0), nf = 0;
    out->factors = calloc((size_t)nb + 1, sizeof(cv_kron_factor));
    out->exact = calloc(1, sizeof(cv_block));
    cv_block *bl = calloc((size_t)nb + 1, sizeof(cv_block));
    if (!out->factors || !out->exact || !bl) {
        free(bl);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Kronecker layers");
    }
    cv_blocks_per_layer(m, bl, nb);
    *len = 0;
    for (int l = 0; l < m->nlayers; l++) {
        const cv_layer *L = &m->layers[l];
        if (L->cls != &cv_linear_class)
            continue;
        if (nf >= nb) { /* not expected: every Linear owns one block */
            free(bl);
            return cv_err_set(e, CV_EINVAL, "unsupported", "curvature",
                              "kfra: layers[%d] has no block of its own", l);
        }
        cv_kron_factor *f = &out->factors[nf];
        f->layer = l;
        f->block = bl[nf++];
        f->has_bias = L->nparams > 1;
        L->cls->ops->kron_dims(L, &f->dim_a, &f->dim_b);
        *len += (size_t)f->dim_a * f->dim_a + (size_t)f->dim_b * f->dim_b;
    }
    out->nfactors = nf;
    free(bl);
    if (nf != nb)
        return cv_err_set(e, CV_EINVAL, "unsupported", "curvature",
                          "kfra: a layer other than Linear has parameters");
    return 0;
}

typedef struct {
    const cv_kron *k;
    double *d;      /* scratch: max dim_b doubles */
    double *S;      /* scratch: C x C */
} kfra_job;

/* d (db) = the product of the derivatives of the activations after layer
 * `from` up to (not including) the next Linear layer, for sample i. */
static void derivs(const cv_part *p, int from, int i, int db, double *d)
{
    for (int q = 0; q < db; q++)
        d[q] = 1;
    for (int l = from + 1; l < p->L && p->m->layers[l].cls != &cv_linear_class; l++) {
        if (!is_activation(&p->m->layers[l]))
            continue;
        const float *d1 = p->ctx[l].d1 + (size_t)i * db;
        for (int q = 0; q < db; q++)
            d[q] *= d1[q];
    }
}

/* One micro-batch: A += kron_a_add; the B slots of the layers before the
 * last += sum_i d_i d_i^T; the last's += sum_i diag(d_i) Lambda_i diag(d_i). */
static int kfra_share(cv_part *p, void *arg, cv_err *e)
{
    const kfra_job *j = arg;
    const cv_kron *k = j->k;
    int C = p->C;
    if (cv_part_prepare_walk(p, CV_CURV_GGN, 1, e)) /* no products: no workspace */
        return -1;
    for (int f = 0; f < k->nfactors; f++) {
        const cv_kron_factor *kf = &k->factors[f];
        int l = kf->layer, db = kf->dim_b, last = f == k->nfactors - 1;
        if (p->ops[l]->kron_a_add(&p->ctx[l], CV_KRON_EXPAND, kf->A))
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                              "Kronecker factor A of layers[%d]", l);
        for (int i = 0; i < p->n; i++) {
            derivs(p, l, i, db, j->d);
            if (!last) {
                for (int a = 0; a < db; a++)
                    for (int b = 0; b < db; b++)
                        kf->B[(size_t)a * db + b] += j->d[a] * j->d[b];
                continue;
            }
            cv_loss_hessian_sqrt(&p->ls, i, j->S); /* db == C */
            for (int a = 0; a < db; a++)
                for (int b = 0; b < db; b++) {
                    double v = 0;
                    for (int q = 0; q < C; q++)
                        v += j->S[(size_t)a * C + q] * j->S[(size_t)b * C + q];
                    kf->B[(size_t)a * db + b] += j->d[a] * j->d[b] * v;
                }
        }
    }
    return 0;
}

/* B_f = (W^T B_{f+1} W) (.) B_f (B_f holding the averaged d d^T), W the next
 * layer's weight (db_{f+1} x db_f, row-major, without the bias column). */
static int kfra_recursion(const cv_model *m, cv_kron *k, cv_err *e)
{
    for (int f = k->nfactors - 2; f >= 0; f--) {
        cv_kron_factor *kf = &k->factors[f], *nx = &k->factors[f + 1];
        int n = kf->dim_b, o = nx->dim_b;
        const float *W = m->params + m->layers[nx->layer].params[0].offset;
        double *T = malloc(sizeof(double) * (size_t)o * n); /* B_{f+1} W */
        if (!T)
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "KFRA recursion");
        for (int a = 0; a < o; a++)
            for (int b = 0; b < n; b++) {
                double v = 0;
                for (int q = 0; q < o; q++)
                    v += nx->B[(size_t)a * o + q] * W[(size_t)q * n + b];
                T[(size_t)a * n + b] = v;
            }
        for (int a = 0; a < n; a++)
            for (int b = 0; b < n; b++) {
                double v = 0;
                for (int q = 0; q < o; q++)
                    v += (double)W[(size_t)q * n + a] * T[(size_t)q * n + b];
                kf->B[(size_t)a * n + b] *= v;
            }
        free(T);
    }
    return 0;
}

int cv_curv_kfra(cv_curv *c, const cv_kron_options *o, cv_kron *out, cv_err *e)
{
    memset(out, 0, sizeof *out);
    cv_kron_options opt = o ? *o : (cv_kron_options){0};
    if (check_options(&opt, e))
        return -1;
    if (opt.fisher_type != CV_KRON_TYPE2)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.fisher_type",
                          "kfra: the recursion is the GGN's (fisher_type type-2 only)");
    const cv_model *m = cv_curv_model(c);
    if (kfra_check(m, e))
        return -1;
    size_t len = 0;
    int C = cv_model_output_dim(m), maxb = 1;
    int rc = kfra_layout(m, out, &len, e);
    if (!rc && !(out->data = calloc(len + 1, sizeof(double))))
        rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Kronecker factors (%zu doubles)",
                        len);
    double *at = out->data;
    for (int f = 0; !rc && f < out->nfactors; f++) {
        cv_kron_factor *kf = &out->factors[f];
        kf->A = at;
        kf->B = at + (size_t)kf->dim_a * kf->dim_a;
        at = kf->B + (size_t)kf->dim_b * kf->dim_b;
        maxb = kf->dim_b > maxb ? kf->dim_b : maxb;
    }
    kfra_job job = {out, malloc(sizeof(double) * (size_t)maxb),
                    malloc(sizeof(double) * (size_t)C * C + 1)};
    if (!rc && (!job.d || !job.S))
        rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "KFRA scratch");
    if (!cv_curv_agree(c, rc, e))
        rc = cv_curv_sum_parts(c, kfra_share, &job, out->data, len, e);
    else
        rc = -1;
    free(job.d);
    free(job.S);
    if (rc)
        return -1;
    double N = (double)cv_curv_batch_size(c);
    for (int f = 0; f < out->nfactors; f++) {
        cv_kron_factor *kf = &out->factors[f];
        for (size_t q = 0; q < (size_t)kf->dim_a * kf->dim_a; q++)
            kf->A[q] /= N;
        for (size_t q = 0; f < out->nfactors - 1 && q < (size_t)kf->dim_b * kf->dim_b; q++)
            kf->B[q] /= N;
    }
    out->columns = 0;
    return kfra_recursion(m, out, e);
}
