/* curv_plan.c - how a batch is split into micro-batches under a memory
 * budget (cv_curv_plan_memory): what one sample costs, measured on a probe
 * of the model on one and two samples (forward state; workspace of one
 * product), and the split that keeps the most forward state within the
 * budget beside what the job holds for the whole batch (the caller's
 * vectors, Kronecker factors, outputs). */
#include <stdio.h>
#include <stdlib.h>

#include "bigmem.h"
#include "curv.h"
#include "part.h"

/* Bytes of state and workspace (one vector) of a part of n samples after
 * one product of the job's curvature. */
static int probe(const cv_model *m, const cv_batch *b, size_t n, const cv_curv_options *o,
                 size_t *state, size_t *work, cv_err *e)
{
    cv_batch v;
    cv_batch_view(b, 0, n, &v);
    cv_part_options po = {*o, -1.0, 0, 0};
    cv_part *p = cv_part_new(m, &v, &po, e);
    if (!p)
        return -1;
    cv_block *blk = malloc(sizeof *blk);
    double *X = blk ? cv_big_calloc(m->nparams_total + 1, sizeof(double)) : NULL;
    int rc = X ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "memory probe");
    if (!rc) {
        cv_block_full(m, blk);
        /* X is both the (zero) direction and the product: scattered before the
         * product is added */
        rc = cv_part_matvec_add(p, o->kind, blk, 1, X, X, e);
    }
    *state = cv_part_state_bytes(p);
    *work = cv_part_work_bytes(p);
    free(X);
    free(blk);
    cv_part_free(p);
    return rc;
}

typedef struct {
    double s0, s;   /* state: per micro-batch, per sample */
    double w0, w;   /* workspace of one vector: fixed, per sample */
    int k, u;       /* vectors at a time; micro-batches evaluated together (pairs: 2) */
    double v;       /* the caller's vectors */
    double f;       /* the Kronecker factors (and what the op keeps with them) */
    double out;     /* the whole batch's outputs and loss state */
    size_t n;
    int C;
} costs;

/* Bytes from an estimate in double, clamped to SIZE_MAX. */
static size_t bytes_of(double b) { return b >= (double)SIZE_MAX ? SIZE_MAX : (size_t)b; }

static double state_of(const costs *c, size_t m) { return c->s0 + c->s * (double)m; }
static double work_of(const costs *c, size_t m) { return c->k * (c->w0 + c->w * (double)m); }

/* A Gram pair of micro-batches of mb (pairs: evaluated together, its Gram
 * block of k columns per sample and their cotangents), else 0. */
static double pair_bytes(const costs *c, size_t mb)
{
    if (c->u < 2)
        return 0;
    double R = (double)c->k * 2.0 * (double)mb;
    return state_of(c, 2 * mb) + work_of(c, 2 * mb) + 8.0 * R * R + 4.0 * R * c->C;
}

/* Bytes with every micro-batch of size mb kept (a Gram pair's state then
 * comes on top of them; its workspace replaces the shared one). */
static double all_cached(const costs *c, size_t mb)
{
    size_t M = (c->n + mb - 1) / mb;
    double work = c->u > 1 ? pair_bytes(c, mb) : work_of(c, mb);
    return (double)c->n * c->s + (double)M * c->s0 + work + c->v + c->f + c->out;
}

/* The bytes of the smallest run: micro-batches of mb, none kept (the
 * scratch state and the workspace, or a Gram pair instead of them). */
static double recomputed(const costs *c, size_t mb)
{
    double one = state_of(c, mb) + work_of(c, mb), pair = pair_bytes(c, mb);
    return (pair > one ? pair : one) + c->v + c->f + c->out;
}

/* Micro-batches kept when micro-batches of mb run within the budget. */
static size_t kept(const costs *c, size_t mb, double budget)
{
    size_t M = (c->n + mb - 1) / mb;
    if (budget <= 0 || all_cached(c, mb) <= budget)
        return M;
    double left = budget - recomputed(c, mb);
    size_t keep = left > 0 ? (size_t)(left / state_of(c, mb)) : 0;
    return keep < M - 1 ? keep : M - 1;
}

/* Relative time of one product over the batch in micro-batches of mb: the
 * kernels lose efficiency below a few dozen samples (1 + 16/mb), and a
 * recomputed sample costs its forward pass and the loss's backward pass
 * (about 3/5 of a product of one vector; its share falls with the vectors
 * per product). */
static double est_time(const costs *c, size_t mb, double budget)
{
    double cached = (double)kept(c, mb, budget) * (double)mb;
    double redo = (double)c->n - (cached < (double)c->n ? cached : (double)c->n);
    return ((double)c->n + redo * 0.6 / c->k) * (1.0 + 16.0 / (double)mb);
}

/* The size with the least estimated time among those that fit: powers of
 * two and the whole batch. */
static size_t choose_size(const costs *c, double budget)
{
    if (budget <= 0 || all_cached(c, c->n) <= budget)
        return c->n;
    size_t best = 1;
    double tbest = est_time(c, 1, budget);
    for (size_t mb = 2; mb < 2 * c->n; mb *= 2) {
        size_t m = mb < c->n ? mb : c->n;
        if (recomputed(c, m) > budget)
            break;
        double t = est_time(c, m, budget);
        if (t < tbest) {
            tbest = t;
            best = m;
        }
    }
    return best;
}

static void fill_plan(const costs *c, size_t mb, double budget, cv_curv_plan *p)
{
    p->micro_batch = mb;
    p->micro_batches = (c->n + mb - 1) / mb;
    p->cached = kept(c, mb, budget);
    p->planned_bytes = bytes_of(p->cached == p->micro_batches
                                    ? all_cached(c, mb)
                                    : recomputed(c, mb) + (double)p->cached * state_of(c, mb));
}

static void fmt_bytes(char *buf, size_t len, double b)
{
    const char *unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (b >= 1024 && u < 4) {
        b /= 1024;
        u++;
    }
    snprintf(buf, len, u ? "%.1f %s" : "%.0f %s", b, unit[u]);
}

static int refuse(const costs *c, size_t mb, double budget, cv_err *e)
{
    char need[32], have[32], ps[32], pw[32], vec[32], fac[32], facs[80] = "";
    fmt_bytes(need, sizeof need, recomputed(c, mb));
    fmt_bytes(have, sizeof have, budget);
    fmt_bytes(ps, sizeof ps, c->s);
    fmt_bytes(pw, sizeof pw, c->w);
    fmt_bytes(vec, sizeof vec, c->v);
    fmt_bytes(fac, sizeof fac, c->f);
    if (c->f > 0)
        snprintf(facs, sizeof facs, " and %s of Kronecker factors", fac);
    return cv_err_set(e, CV_EINVAL, "job_memory", "job_memory",
                      "the job needs at least %s of engine memory (%zu sample%s at a time: %s "
                      "of forward state and %s of workspace per sample and vector, %d "
                      "vector%s at a time, plus %s of the estimator's own vectors%s); the job "
                      "memory budget is %s", need, mb, mb == 1 ? "" : "s", ps, pw, c->k,
                      c->k == 1 ? "" : "s", vec, facs, have);
}

int cv_curv_plan_memory(const cv_model *m, const cv_batch *b, const cv_curv_options *opt,
                        cv_curv_plan *plan, cv_err *e)
{
    cv_curv_options o = *opt;
    o.progress = NULL;
    size_t s1, w1, s2 = 0, w2 = 0;
    if (b->n < 1 && cv_comm_active(opt->comm)) { /* a rank with no share of a small batch */
        *plan = (cv_curv_plan){0};
        return 0;
    }
    if (b->n < 1)
        return cv_err_set(e, CV_EINVAL, "empty_batch", "batch", "the batch has no samples");
    if (probe(m, b, 1, &o, &s1, &w1, e) || (b->n > 1 && probe(m, b, 2, &o, &s2, &w2, e)))
        return -1;
    costs c = {0};
    c.s = b->n > 1 && s2 > s1 ? (double)(s2 - s1) : (double)s1;
    c.s0 = (double)s1 > c.s ? (double)s1 - c.s : 0;
    c.w = b->n > 1 && w2 > w1 ? (double)(w2 - w1) : (double)w1;
    c.w0 = (double)w1 > c.w ? (double)w1 - c.w : 0;
    /* a part takes at most 32 vectors at a time (chunks) */
    c.k = opt->max_vectors > 32 ? 32 : opt->max_vectors > 0 ? opt->max_vectors : 1;
    c.u = opt->pairs && b->n > 1 ? 2 : 1;
    c.v = (double)opt->vector_bytes;
    c.f = (double)opt->factor_bytes;
    c.n = b->n;
    c.C = cv_model_output_dim(m);
    c.out = 8.0 * (double)b->n * c.C;
    double budget = (double)opt->memory_budget;
    size_t least = opt->micro_batch ? (opt->micro_batch < b->n ? opt->micro_batch : b->n) : 1;
    if (budget > 0 && recomputed(&c, least) > budget)
        return refuse(&c, least, budget, e);
    size_t mb = opt->micro_batch ? least : choose_size(&c, budget);
    *plan = (cv_curv_plan){0};
    fill_plan(&c, mb, budget, plan);
    plan->state_per_sample = (size_t)c.s;
    plan->state_fixed = (size_t)c.s0;
    plan->work_per_sample = (size_t)c.w;
    plan->work_fixed = (size_t)c.w0;
    plan->minimum_bytes = bytes_of(recomputed(&c, least));
    return 0;
}
