/* curv.c - the curvature operators of a batch (API in curv.h) over its
 * micro-batches: the split (curv_plan.c), the kept and recomputed forward
 * states (engine/part.h: one micro-batch's engine), the sums of their
 * shares with per-micro-batch progress and cancel, the workspace handed
 * from micro-batch to micro-batch, the accounting of the bytes held; for a
 * data-parallel job, the reduction of every share over the ranks
 * (engine/comm.h); plus the curvature names and parameter blocks. */
#include "curv.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "names.h"
#include "part.h"

struct cv_curv {
    const cv_model *m;
    const cv_batch *b;         /* this rank's shard of the batch: the whole batch in one
                                * process (borrowed) */
    cv_batch whole_y;          /* data-parallel: the whole batch's targets (x unset) */
    const cv_batch *y;         /* the whole batch's targets: b or &whole_y */
    cv_curv_options opt;
    cv_curv_plan plan;
    int C;
    size_t n, nloc, first, mb; /* samples of the whole batch; the shard, samples [first,
                                * first + nloc); micro-batch size */
    int nparts;
    cv_batch *views;           /* micro-batch i: shard samples [i*mb, i*mb + views[i].n) */
    cv_part **parts;           /* the kept states (i < plan.cached), NULL for the others */
    cv_part *scratch;          /* the state recomputed micro-batches run in */
    int scratch_at;            /* the micro-batch it holds now (-1: none) */
    cv_part *ws;               /* the part holding the workspace */
    size_t gram_budget;
    double loss;
    float *outputs;            /* n x C (the whole batch) */
    cv_loss_state ls;          /* the whole batch's loss state (over outputs) */
    size_t peak;
};

/* The most samples of one micro-batch and the most micro-batches (int counts). */
#define CV_CURV_MAX_MICRO ((size_t)1 << 30)

#define CV_CURV_NAME_(id, name) [id] = name,
static const char *const curv_names[CV_CURV_COUNT] = {CV_CURVATURES(CV_CURV_NAME_)};
#undef CV_CURV_NAME_

const char *cv_curvature_name(cv_curvature c)
{
    return cv_name_or(curv_names, CV_CURV_COUNT, (int)c, "?");
}

int cv_curvature_from_name(const char *name)
{
    return cv_name_index(name, curv_names, CV_CURV_COUNT);
}

/* ---- blocks ------------------------------------------------------------ */

void cv_block_full(const cv_model *m, cv_block *b)
{
    b->count = cv_model_param_count(m);
    b->name[0] = 0;
    for (int i = 0; i < b->count; i++)
        b->idx[i] = i;
    b->dim = m->nparams_total;
}

static int cmp_int(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }

int cv_block_from_indices(const cv_model *m, const int *idx, int count, cv_block *b, cv_err *e)
{
    int total = cv_model_param_count(m);
    if (count < 1 || count > total)
        return cv_err_set(e, CV_EINVAL, "invalid_block", "blocks",
                          "a block needs between 1 and %d parameter tensors", total);
    memcpy(b->idx, idx, sizeof(int) * (size_t)count);
    b->name[0] = 0;
    qsort(b->idx, (size_t)count, sizeof(int), cmp_int);
    b->count = 0;
    b->dim = 0;
    for (int i = 0; i < count; i++) {
        if (b->idx[i] < 0 || b->idx[i] >= total)
            return cv_err_set(e, CV_EINVAL, "invalid_block", "blocks",
                              "parameter index %d out of range", b->idx[i]);
        if (i > 0 && b->idx[i] == b->idx[i - 1])
            return cv_err_set(e, CV_EINVAL, "invalid_block", "blocks",
                              "parameter %s listed twice in one block",
                              cv_model_param(m, b->idx[i])->name);
        b->idx[b->count++] = b->idx[i];
        b->dim += cv_model_param(m, b->idx[i])->numel;
    }
    return 0;
}

/* The name of layer L's block: its module, or its first tensor's name. */
static const char *owner_name(const cv_layer *L)
{
    return L->module[0] ? L->module : L->params[0].name;
}

int cv_blocks_per_layer(const cv_model *m, cv_block *out, int max)
{
    int nb = 0, t = 0;
    cv_block *tmp = malloc(sizeof(cv_block) * (size_t)(m->nlayers ? m->nlayers : 1));
    if (!tmp)
        return 0;
    for (int l = 0; l < m->nlayers; l++) {
        const cv_layer *L = &m->layers[l];
        int own = 0; /* tensors first used here (a shared one belongs to its first user) */
        for (int i = 0; i < L->nparams; i++)
            own += !L->params[i].shared;
        if (!own)
            continue;
        int bi = 0;
        while (bi < nb && !(L->module[0] && strcmp(tmp[bi].name, L->module) == 0))
            bi++;
        cv_block *b = &tmp[bi];
        if (bi == nb) {
            memset(b, 0, sizeof *b);
            snprintf(b->name, sizeof b->name, "%s", owner_name(L));
            nb++;
        }
        for (int i = 0; i < L->nparams; i++) {
            if (L->params[i].shared)
                continue;
            b->idx[b->count++] = t++;
            b->dim += L->params[i].numel;
        }
    }
    for (int i = 0; out && i < nb && i < max; i++)
        out[i] = tmp[i];
    free(tmp);
    return nb;
}

/* ---- micro-batches ---------------------------------------------------------- */

static cv_part_options part_options(const cv_curv *c, size_t first)
{
    cv_part_options po = {c->opt, c->ls.scale, c->first + first, c->mb};
    po.base.progress = NULL;
    return po;
}

/* Bytes held for the whole batch: the caller's vectors and Kronecker
 * factors, the outputs and the loss state's probabilities. */
static size_t batch_bytes(const cv_curv *c)
{
    return c->opt.vector_bytes + c->opt.factor_bytes + sizeof(float) * c->n * (size_t)c->C * 2;
}

/* Bytes held now (kept and scratch states, their workspace, batch_bytes,
 * `extra` held beside them); the peak follows. */
static void account(cv_curv *c, size_t extra)
{
    size_t b = extra + batch_bytes(c);
    for (int i = 0; i < c->nparts; i++)
        if (c->parts[i])
            b += cv_part_state_bytes(c->parts[i]) + cv_part_work_bytes(c->parts[i]);
    if (c->scratch)
        b += cv_part_state_bytes(c->scratch) + cv_part_work_bytes(c->scratch);
    if (b > c->peak)
        c->peak = b;
}

/* Stops between micro-batches when the job was cancelled or ran out of time. */
static int check_cancel(const cv_curv *c, cv_err *e)
{
    return c->nparts > 1 && c->opt.progress && cv_progress_check(c->opt.progress, e) ? -1 : 0;
}

static void progress_micro(const cv_curv *c, long done)
{
    if (c->nparts > 1 && c->opt.progress) {
        atomic_store(&c->opt.progress->micro_total, c->nparts);
        atomic_store(&c->opt.progress->micro_done, done);
    }
}

/* The part holding micro-batch i's forward state, with the workspace: its
 * kept state, or the scratch state rerun on it. */
static cv_part *visit(cv_curv *c, int i, cv_err *e)
{
    if (check_cancel(c, e))
        return NULL;
    cv_part *p = c->parts[i];
    if (!p && c->scratch_at != i) {
        if (!c->scratch) {
            cv_part_options po = part_options(c, (size_t)i * c->mb);
            c->scratch = cv_part_new(c->m, &c->views[i], &po, e);
            if (!c->scratch)
                return NULL;
            cv_part_set_gram_budget(c->scratch, c->gram_budget);
        } else if (cv_part_rebind(c->scratch, &c->views[i], c->first + (size_t)i * c->mb, e)) {
            c->scratch_at = -1;
            return NULL;
        }
        c->scratch_at = i;
    }
    if (!p)
        p = c->scratch;
    if (c->ws && c->ws != p)
        cv_part_take_workspace(p, c->ws);
    c->ws = p;
    return p;
}

/* After micro-batch i's share: accounting and progress. */
static void visited(cv_curv *c, int i)
{
    account(c, 0);
    progress_micro(c, i + 1);
}

/* Frees the scratch state and the workspace (before a pass that builds
 * states of its own: Gram pairs, the loss at a step). */
static void release_scratch(cv_curv *c)
{
    if (c->ws)
        cv_part_free_workspace(c->ws);
    c->ws = NULL;
    cv_part_free(c->scratch);
    c->scratch = NULL;
    c->scratch_at = -1;
}

static int split(cv_curv *c, cv_err *e)
{
    c->mb = c->plan.micro_batch;
    c->nparts = (int)c->plan.micro_batches;
    c->views = calloc((size_t)c->nparts + 1, sizeof(cv_batch));
    c->parts = calloc((size_t)c->nparts + 1, sizeof(cv_part *));
    c->outputs = calloc(c->n * (size_t)c->C + 1, sizeof(float));
    if (!c->views || !c->parts || !c->outputs)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "micro-batches");
    for (int i = 0; i < c->nparts; i++) {
        size_t off = (size_t)i * c->mb;
        cv_batch_view(c->b, off, c->nloc - off < c->mb ? c->nloc - off : c->mb, &c->views[i]);
    }
    return 0;
}

/* The forward pass of every micro-batch of the shard: kept states built,
 * the others run in the scratch state; the shard's outputs and loss. */
static int forward_shard(cv_curv *c, cv_err *e)
{
    c->loss = 0;
    for (int i = 0; i < c->nparts; i++) {
        if ((size_t)i < c->plan.cached) {
            if (check_cancel(c, e))
                return -1;
            cv_part_options po = part_options(c, (size_t)i * c->mb);
            if (!(c->parts[i] = cv_part_new(c->m, &c->views[i], &po, e)))
                return -1;
        }
        cv_part *p = visit(c, i, e);
        if (!p)
            return -1;
        memcpy(c->outputs + (c->first + (size_t)i * c->mb) * c->C, cv_part_outputs(p),
               sizeof(float) * c->views[i].n * (size_t)c->C);
        c->loss += cv_part_loss(p);
        visited(c, i);
    }
    return 0;
}

/* After every rank's forward pass (rc: this rank's): the whole batch's
 * outputs, loss and loss state. */
static int forward_whole(cv_curv *c, int rc, cv_err *e)
{
    const cv_comm *cm = c->opt.comm;
    if (cv_comm_gather_rows(cm, rc, c->outputs, c->n, (size_t)c->C, 1, CV_COMM_F32, NULL, e) ||
        cv_comm_sum(cm, 0, &c->loss, 1, NULL, e))
        return -1;
    double loss;
    if (cv_loss_eval_scaled(&c->ls, c->m, c->y, c->outputs, c->ls.scale, &loss, NULL))
        rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "loss state");
    return cv_comm_agree(cm, rc, NULL, e);
}

/* Whether plan p (cv_curv_options.plan) splits this engine's batch. */
static int plan_fits(const cv_curv *c, const cv_curv_plan *p)
{
    return p && !cv_comm_active(c->opt.comm) && p->micro_batch >= 1 &&
           p->micro_batches == (c->nloc + p->micro_batch - 1) / p->micro_batch &&
           p->cached <= p->micro_batches;
}

static int plan_split(cv_curv *c, cv_err *e)
{
    const cv_curv_plan *given = c->opt.plan;
    c->opt.plan = NULL; /* not passed on: an engine on other samples plans for itself */
    if (c->nloc == 0 || (!c->opt.memory_budget && !c->opt.micro_batch)) {
        c->plan = (cv_curv_plan){0};
        c->plan.micro_batch = c->nloc < CV_CURV_MAX_MICRO ? c->nloc : CV_CURV_MAX_MICRO;
        c->plan.micro_batches = c->plan.cached =
            c->nloc ? (c->nloc + c->plan.micro_batch - 1) / c->plan.micro_batch : 0;
        return 0;
    }
    if (plan_fits(c, given)) {
        c->plan = *given; /* the job's memory check probed this batch already */
        c->plan.peak_bytes = 0;
    } else if (cv_curv_plan_memory(c->m, c->b, &c->opt, &c->plan, e)) {
        return -1;
    }
    if (c->plan.micro_batch > CV_CURV_MAX_MICRO || c->plan.micro_batches > CV_CURV_MAX_MICRO)
        return cv_err_set(e, CV_ETOOLARGE, "too_large", "batch",
                          "%zu micro-batches of %zu samples: at most 2^30 of 2^30 each",
                          c->plan.micro_batches, c->plan.micro_batch);
    return 0;
}

/* Sample i's targets (or labels) in batch b. */
static void *y_row(const cv_batch *b, size_t i)
{
    size_t sy = cv_shape_numel(&b->y_shape);
    return b->y_is_index ? (void *)(b->labels + i * sy) : (void *)(b->targets + i * sy);
}

/* Data-parallel: the whole batch's size (every rank's shard must be its
 * cv_comm_share) and targets. */
static int whole_batch(cv_curv *c, cv_err *e)
{
    const cv_comm *cm = c->opt.comm;
    int64_t n = (int64_t)c->nloc;
    if (cv_comm_reduce(cm, 0, &n, 1, CV_COMM_I64, CV_COMM_SUM, NULL, e))
        return -1;
    c->n = (size_t)n;
    size_t first, count;
    cv_comm_share(c->n, cm->size, cm->rank, &first, &count);
    c->first = first;
    int rc = count == c->nloc ? 0
                              : cv_err_set(e, CV_EINTERNAL, "internal", "batch",
                                           "rank %d holds %zu samples, not its share %zu of %zu",
                                           cm->rank, c->nloc, count, c->n);
    cv_batch *y = &c->whole_y;
    size_t sy = cv_shape_numel(&c->b->y_shape), es = c->b->y_is_index ? 8 : 4;
    if (!rc)
        rc = cv_batch_alloc_y(c->b, c->n, y, e);
    if (!rc && c->nloc)
        memcpy(y_row(y, first), y_row(c->b, 0), c->nloc * sy * es);
    c->y = y;
    return cv_comm_gather_rows(cm, rc, rc ? NULL : y_row(y, 0), c->n, sy, 1,
                               y->y_is_index ? CV_COMM_I64 : CV_COMM_F32, NULL, e);
}

cv_curv *cv_curv_new(const cv_model *m, const cv_batch *b, const cv_curv_options *opt,
                     cv_err *e)
{
    int active = opt && cv_comm_active(opt->comm);
    if (b->n < 1 && !active) {
        cv_err_set(e, CV_EINVAL, "empty_batch", "batch", "the batch has no samples");
        return NULL;
    }
    cv_curv *c = calloc(1, sizeof *c);
    int rc = c ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "engine state");
    if (!active && rc)
        return NULL;
    if (active && cv_comm_agree(opt->comm, rc, NULL, e)) {
        free(c);
        return NULL;
    }
    c->m = m;
    c->b = c->y = b;
    c->n = c->nloc = b->n;
    c->C = cv_model_output_dim(m);
    c->scratch_at = -1;
    if (opt)
        c->opt = *opt;
    if (c->opt.mc_samples < 1)
        c->opt.mc_samples = 1;
    if (active && whole_batch(c, e)) {
        cv_curv_free(c);
        return NULL;
    }
    if (c->n < 1) {
        cv_err_set(e, CV_EINVAL, "empty_batch", "batch", "the batch has no samples");
        cv_curv_free(c);
        return NULL;
    }
    c->ls.scale = cv_loss_batch_scale(m, c->y);
    rc = plan_split(c, e) || split(c, e) || forward_shard(c, e) ? -1 : 0;
    if (forward_whole(c, rc, e)) {
        cv_curv_free(c);
        return NULL;
    }
    return c;
}

void cv_curv_free(cv_curv *c)
{
    if (!c)
        return;
    for (int i = 0; c->parts && i < c->nparts; i++)
        cv_part_free(c->parts[i]);
    cv_part_free(c->scratch);
    free(c->parts);
    free(c->views);
    free(c->outputs);
    cv_loss_state_free(&c->ls);
    cv_dataset_free(&c->whole_y);
    free(c);
}

void cv_curv_memory(const cv_curv *c, cv_curv_plan *out)
{
    *out = c->plan;
    out->peak_bytes = c->peak;
}

const cv_curv_options *cv_curv_get_options(const cv_curv *c) { return &c->opt; }

int cv_curv_agree(const cv_curv *c, int rc, cv_err *e)
{
    return cv_comm_agree(c->opt.comm, rc, NULL, e);
}
const cv_model *cv_curv_model(const cv_curv *c) { return c->m; }
size_t cv_curv_batch_size(const cv_curv *c) { return c->n; }
double cv_curv_loss(cv_curv *c) { return c->loss; }
const float *cv_curv_outputs(const cv_curv *c) { return c->outputs; }
const cv_batch *cv_curv_batch(const cv_curv *c, size_t *first)
{
    if (first)
        *first = c->first;
    return c->b;
}
const cv_loss_state *cv_curv_loss_state(const cv_curv *c) { return &c->ls; }

void cv_curv_set_gram_budget(cv_curv *c, size_t floats)
{
    c->gram_budget = floats;
    for (int i = 0; i < c->nparts; i++)
        if (c->parts[i])
            cv_part_set_gram_budget(c->parts[i], floats);
    if (c->scratch)
        cv_part_set_gram_budget(c->scratch, floats);
}

size_t cv_curv_release_states(cv_curv *c)
{
    release_scratch(c);
    for (int i = 0; i < c->nparts; i++) {
        cv_part_free(c->parts[i]);
        c->parts[i] = NULL;
    }
    c->plan.cached = 0;
    return batch_bytes(c);
}

/* ---- sums over micro-batches -------------------------------------------------- */

typedef enum { SUM_GRADIENT, SUM_MATVEC, SUM_QUAD } sum_kind;

/* out (zeroed first: len doubles) = the sum of every micro-batch's share
 * (over every rank's). */
static int sum_shares(cv_curv *c, sum_kind what, cv_curvature kind, const cv_block *b, int k,
                      const double *X, double *out, size_t len, cv_err *e)
{
    memset(out, 0, sizeof(double) * (len ? len : 1));
    if (k < 1)
        return 0;
    int rc = 0;
    for (int i = 0; i < c->nparts && !rc; i++) {
        cv_part *p = visit(c, i, e);
        rc = !p ? -1
             : what == SUM_GRADIENT ? cv_part_gradient_add(p, b, out, e)
             : what == SUM_MATVEC   ? cv_part_matvec_add(p, kind, b, k, X, out, e)
                                    : cv_part_quadform_add(p, kind, b, k, X, out, e);
        if (!rc)
            visited(c, i);
    }
    return cv_comm_sum(c->opt.comm, rc, out, len, c->opt.progress, e);
}

int cv_curv_sum_parts(cv_curv *c, cv_part_share_fn fn, void *arg, double *out, size_t len,
                      cv_err *e)
{
    if (out)
        memset(out, 0, sizeof(double) * len);
    int rc = 0;
    for (int i = 0; i < c->nparts && !rc; i++) {
        cv_part *p = visit(c, i, e);
        rc = !p || fn(p, arg, e) ? -1 : 0;
        if (!rc)
            visited(c, i);
    }
    return cv_comm_sum(c->opt.comm, rc, out, len, c->opt.progress, e);
}

int cv_curv_gradient(cv_curv *c, const cv_block *b, double *g, cv_err *e)
{
    return sum_shares(c, SUM_GRADIENT, CV_CURV_GGN, b, 1, NULL, g, b->dim, e);
}

/* Refuses a kind that is no exact curvature (unknown, or Kronecker-factored). */
static int exact_kind(cv_curvature kind, cv_err *e)
{
    if ((unsigned)kind >= CV_CURV_COUNT)
        return cv_err_set(e, CV_EINVAL, "invalid_curvature", "curvature", "unknown curvature");
    if (cv_curvature_is_kron(kind))
        return cv_err_set(e, CV_EINVAL, "invalid_curvature", "curvature",
                          "%s is a Kronecker-factored curvature: the engine's exact products "
                          "take hessian, ggn, fisher_mc or ef (ops apply %s through its "
                          "factors)", cv_curvature_name(kind), cv_curvature_name(kind));
    return 0;
}

int cv_curv_matvec(cv_curv *c, cv_curvature kind, const cv_block *b, int k, const double *X,
                   double *Y, cv_err *e)
{
    if (exact_kind(kind, e))
        return -1;
    return sum_shares(c, SUM_MATVEC, kind, b, k, X, Y, (size_t)(k > 0 ? k : 0) * b->dim, e);
}

int cv_curv_quadform(cv_curv *c, cv_curvature kind, const cv_block *b, int k, const double *X,
                     double *q, cv_err *e)
{
    if (exact_kind(kind, e))
        return -1;
    return sum_shares(c, SUM_QUAD, kind, b, k, X, q, (size_t)(k > 0 ? k : 0), e);
}

int cv_curv_per_sample_gradients(cv_curv *c, const cv_block *b, double *G, cv_err *e)
{
    int rc = 0;
    for (int i = 0; i < c->nparts && !rc; i++) {
        cv_part *p = visit(c, i, e);
        rc = !p || cv_part_per_sample_gradients(
                       p, b, G + (c->first + (size_t)i * c->mb) * b->dim, e) ? -1 : 0;
        if (!rc)
            visited(c, i);
    }
    return cv_comm_gather_rows(c->opt.comm, rc, G, c->n, b->dim, 1, CV_COMM_F64,
                               c->opt.progress, e);
}

/* Copies the k blocks of micro-batch i between a whole-batch array (k x n x C)
 * and a micro-batch one (k x m x C): to_part 1 gathers, 0 scatters. */
static void copy_rows(const cv_curv *c, int i, int k, float *whole, float *part, int to_part)
{
    size_t m = c->views[i].n, C = (size_t)c->C, off = c->first + (size_t)i * c->mb;
    for (int j = 0; j < k; j++) {
        float *w = whole + ((size_t)j * c->n + off) * C, *p = part + (size_t)j * m * C;
        memcpy(to_part ? p : w, to_part ? w : p, sizeof(float) * m * C);
    }
}

/* J X into out (k x n x C), or Y = J^T cot (cot given). */
static int jacobian(cv_curv *c, const cv_block *b, int k, const double *X, float *out,
                    const float *cot, double *Y, cv_err *e)
{
    if (k < 1)
        return 0;
    if (Y)
        memset(Y, 0, sizeof(double) * (size_t)k * b->dim);
    int direct = c->nparts == 1 && c->nloc == c->n; /* the part's rows are the batch's */
    size_t tmp_len = !direct && c->nparts ? (size_t)k * c->mb * c->C : 0;
    float *tmp = tmp_len ? malloc(sizeof(float) * tmp_len) : NULL;
    int rc = tmp_len && !tmp ? cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                                          "micro-batch outputs") : 0;
    account(c, sizeof(float) * tmp_len);
    for (int i = 0; i < c->nparts && !rc; i++) {
        cv_part *p = visit(c, i, e);
        if (!p) {
            rc = -1;
            break;
        }
        float *buf = tmp ? tmp : X ? out : (float *)cot;
        if (!X && tmp)
            copy_rows(c, i, k, (float *)cot, tmp, 1);
        rc = X ? cv_part_jvp(p, b, k, X, buf, e) : cv_part_vjp_add(p, b, k, buf, Y, e);
        if (!rc && X && tmp)
            copy_rows(c, i, k, out, tmp, 0);
        visited(c, i);
    }
    free(tmp);
    if (X)
        return cv_comm_gather_rows(c->opt.comm, rc, out, c->n, (size_t)c->C, k, CV_COMM_F32,
                                   c->opt.progress, e);
    return cv_comm_sum(c->opt.comm, rc, Y, (size_t)k * b->dim, c->opt.progress, e);
}

int cv_curv_jvp(cv_curv *c, const cv_block *b, int k, const double *X, float *out, cv_err *e)
{
    return jacobian(c, b, k, X, out, NULL, NULL, e);
}

int cv_curv_vjp(cv_curv *c, const cv_block *b, int k, const float *cot, double *Y, cv_err *e)
{
    return jacobian(c, b, k, NULL, NULL, cot, Y, e);
}

/* ---- other ranks' samples; Gram matrices over pairs of micro-batches ------- */

int cv_curv_gather_samples(cv_curv *c, const size_t *idx, size_t count, cv_batch *out,
                           cv_err *e)
{
    if (!cv_comm_active(c->opt.comm))
        return cv_batch_gather(c->b, idx, count, out, e);
    for (size_t i = 0; i < count; i++) /* the same answer on every rank */
        if (idx[i] >= c->n)
            return cv_err_set(e, CV_EINVAL, "out_of_range", "batch",
                              "sample %zu is out of range for a batch of %zu", idx[i], c->n);
    int rc = cv_batch_alloc(c->b, count, out, e);
    for (size_t i = 0; i < count && !rc; i++)
        if (idx[i] >= c->first && idx[i] - c->first < c->nloc)
            cv_batch_copy_sample(c->b, idx[i] - c->first, out, i);
    size_t sx = cv_shape_numel(&out->x_shape) * count, sy = cv_shape_numel(&out->y_shape) * count;
    /* each sample is one rank's: its row plus zeros, exact */
    if (cv_comm_reduce(c->opt.comm, rc, out->x, sx, CV_COMM_F32, CV_COMM_SUM, NULL, e) ||
        cv_comm_reduce(c->opt.comm, 0, y_row(out, 0), sy,
                       out->y_is_index ? CV_COMM_I64 : CV_COMM_F32, CV_COMM_SUM, NULL, e)) {
        cv_dataset_free(out);
        return -1;
    }
    return 0;
}

/* Samples [off, off + n) of the whole batch in a Gram pair; own: the pair
 * writes the block of these samples with themselves (each entry of G is
 * written by one pair: the diagonal block of micro-batch i by pair (i, i+1),
 * the last one's by (i-1, i)). */
typedef struct {
    size_t off, n;
    int own;
} gram_range;

/* Two ranges of the whole batch (src: indexed by whole-batch sample)
 * evaluated together: their samples gathered into one batch, its Gram
 * matrix, its blocks written into G. */
static int gram_pair(cv_curv *c, const cv_batch *src, const cv_block *b, int k,
                     const float *cot, double *G, gram_range ri, gram_range rj, cv_err *e)
{
    size_t mi = ri.n, R = mi + rj.n, C = (size_t)c->C, N = c->n, kR = (size_t)k * R;
    size_t *idx = malloc(sizeof(size_t) * R);
    float *pc = malloc(sizeof(float) * kR * C);
    double *PG = malloc(sizeof(double) * kR * kR);
    cv_batch pb = {0};
    int rc = idx && pc && PG ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Gram pair");
    for (size_t s = 0; s < R && !rc; s++)
        idx[s] = s < mi ? ri.off + s : rj.off + s - mi;
    for (int q = 0; q < k && !rc; q++)
        for (size_t s = 0; s < R; s++)
            memcpy(pc + ((size_t)q * R + s) * C, cot + ((size_t)q * N + idx[s]) * C,
                   sizeof(float) * C);
    cv_part *p = NULL;
    if (!rc && !(rc = cv_batch_gather(src, idx, R, &pb, e))) {
        cv_part_options po = part_options(c, 0);
        po.first = ri.off;
        po.ws_samples = R;
        p = cv_part_new(c->m, &pb, &po, e);
        if (p)
            cv_part_set_gram_budget(p, c->gram_budget);
        rc = !p || cv_part_gram(p, b, k, pc, PG, e) ? -1 : 0;
    }
    if (p) /* the pair's state is held beside the kept ones */
        account(c, cv_part_state_bytes(p) + cv_part_work_bytes(p) +
                       sizeof(double) * kR * kR + sizeof(float) * kR * C);
    for (size_t r = 0; r < kR && !rc; r++)
        for (size_t q = 0; q < kR; q++) {
            int ir = r % R < mi, iq = q % R < mi;
            if (ir == iq && !(ir ? ri.own : rj.own))
                continue;
            G[((r / R) * N + idx[r % R]) * (size_t)k * N + (q / R) * N + idx[q % R]] =
                PG[r * kR + q];
        }
    cv_part_free(p);
    cv_dataset_free(&pb);
    free(idx);
    free(pc);
    free(PG);
    return rc;
}

/* The pairs of micro-batches of mb samples of the whole batch (src) that
 * this rank evaluates: pair t of P(P-1)/2 (one micro-batch: the pair (0, 0))
 * when t % ranks == rank. */
static int gram_pairs(cv_curv *c, const cv_batch *src, size_t mb, const cv_block *b, int k,
                      const float *cot, double *G, cv_err *e)
{
    int rank = cv_comm_rank(c->opt.comm), size = cv_comm_size(c->opt.comm);
    size_t P = (c->n + mb - 1) / mb;
    if (P == 1)
        return rank == 0 ? gram_pair(c, src, b, k, cot, G, (gram_range){0, c->n, 1},
                                     (gram_range){0, 0, 0}, e)
                         : 0;
    long total = (long)(P * (P - 1) / 2), t = 0;
    for (size_t i = 0; i < P; i++)
        for (size_t j = i + 1; j < P; j++, t++) {
            if (t % size != rank)
                continue;
            size_t ni = i + 1 < P ? mb : c->n - i * mb, nj = j + 1 < P ? mb : c->n - j * mb;
            gram_range ri = {i * mb, ni, j == i + 1}, rj = {j * mb, nj, j == P - 1 && i == P - 2};
            if (check_cancel(c, e) || gram_pair(c, src, b, k, cot, G, ri, rj, e))
                return -1;
            if (c->opt.progress) {
                atomic_store(&c->opt.progress->micro_total, total);
                atomic_store(&c->opt.progress->micro_done, t + 1);
            }
        }
    return 0;
}

/* Data-parallel: every sample gathered on every rank (a Gram matrix couples
 * samples of all shards), the pairs shared out, G summed over ranks. */
static int gram_ranks(cv_curv *c, const cv_block *b, int k, const float *cot, double *G,
                      cv_err *e)
{
    size_t N = c->n, *all = malloc(sizeof(size_t) * N);
    int64_t mb = c->mb ? (int64_t)c->mb : (int64_t)N; /* the smallest planned micro-batch */
    int rc = all ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Gram samples");
    if (cv_comm_reduce(c->opt.comm, rc, &mb, 1, CV_COMM_I64, CV_COMM_MIN, NULL, e)) {
        free(all);
        return -1;
    }
    for (size_t i = 0; i < N; i++)
        all[i] = i;
    cv_batch whole;
    rc = cv_curv_gather_samples(c, all, N, &whole, e);
    free(all);
    if (rc)
        return -1;
    memset(G, 0, sizeof(double) * (size_t)k * N * (size_t)k * N);
    account(c, sizeof(float) * N * (cv_shape_numel(&whole.x_shape) + 2));
    rc = gram_pairs(c, &whole, (size_t)mb, b, k, cot, G, e);
    cv_dataset_free(&whole);
    return cv_comm_sum(c->opt.comm, rc, G, (size_t)k * N * (size_t)k * N, c->opt.progress, e);
}

int cv_curv_gram(cv_curv *c, const cv_block *b, int k, const float *cot, double *G,
                 cv_err *e)
{
    if (cv_comm_active(c->opt.comm)) {
        release_scratch(c);
        return gram_ranks(c, b, k, cot, G, e);
    }
    if (c->nparts == 1) {
        cv_part *p = visit(c, 0, e);
        int rc = p ? cv_part_gram(p, b, k, cot, G, e) : -1;
        account(c, 0);
        return rc;
    }
    release_scratch(c);
    return gram_pairs(c, c->b, c->mb, b, k, cot, G, e);
}

/* ---- dense matrices, loss at a step ------------------------------------------- */

int cv_curv_dense(cv_curv *c, cv_curvature kind, const cv_block *b, size_t max_dim, double *A,
                  cv_err *e)
{
    if (exact_kind(kind, e))
        return -1;
    if (b->dim > max_dim)
        return cv_err_set(e, CV_ETOOLARGE, "too_large", "op",
                          "dense matrix of dimension %zu exceeds the dense limit %zu", b->dim,
                          max_dim);
    size_t D = b->dim;
    int chunk = D < 64 ? (int)D : 64;
    double *X = calloc((size_t)chunk * D, sizeof(double));
    if (cv_curv_agree(c, X ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "dense basis"),
                      e)) {
        free(X);
        return -1;
    }
    int rc = 0;
    for (size_t j = 0; j < D && !rc; j += (size_t)chunk) {
        int kk = D - j < (size_t)chunk ? (int)(D - j) : chunk;
        memset(X, 0, sizeof(double) * (size_t)chunk * D);
        for (int q = 0; q < kk; q++)
            X[(size_t)q * D + j + q] = 1.0;
        rc = cv_curv_matvec(c, kind, b, kk, X, A + j * D, e);
    }
    free(X);
    return rc;
}

/* The loss of model tmp over the micro-batches, in one part rerun on each. */
static int loss_over_parts(cv_curv *c, const cv_model *tmp, double *loss, cv_err *e)
{
    cv_part *p = NULL;
    *loss = 0;
    int rc = 0;
    for (int i = 0; i < c->nparts && !rc; i++) {
        cv_part_options po = part_options(c, (size_t)i * c->mb);
        rc = check_cancel(c, e);
        if (!rc && !p)
            rc = (p = cv_part_new(tmp, &c->views[i], &po, e)) ? 0 : -1;
        else if (!rc)
            rc = cv_part_rebind(p, &c->views[i], po.first, e);
        if (!rc)
            *loss += cv_part_loss(p);
        if (!rc && i == 0)
            account(c, cv_part_state_bytes(p) + tmp->nparams_total * sizeof(float));
    }
    cv_part_free(p);
    return rc;
}

int cv_curv_loss_at(cv_curv *c, const cv_block *b, const double *step, double *loss,
                    cv_err *e)
{
    cv_model *tmp = malloc(sizeof *tmp);
    int rc = 0;
    *loss = 0;
    if (!tmp || cv_model_clone(c->m, tmp)) {
        free(tmp);
        tmp = NULL;
        rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "model copy");
    }
    size_t o = 0;
    for (int i = 0; tmp && i < b->count; i++) {
        const cv_tensor_info *t = cv_model_param(tmp, b->idx[i]);
        for (size_t q = 0; q < t->numel; q++)
            tmp->params[t->offset + q] += (float)step[o++];
    }
    release_scratch(c); /* the part on the stepped model takes its place */
    if (!rc)
        rc = loss_over_parts(c, tmp, loss, e);
    if (tmp) {
        cv_model_free(tmp);
        free(tmp);
    }
    return cv_comm_sum(c->opt.comm, rc, loss, 1, c->opt.progress, e);
}

/* ---- cv_linop view --------------------------------------------------------- */

static int curv_linop_apply(void *ctx, int k, const double *X, double *Y, cv_err *e)
{
    cv_curv_linop_ctx *x = ctx;
    return cv_curv_matvec(x->curv, x->kind, x->block, k, X, Y, e);
}

static int curv_linop_quad(void *ctx, int k, const double *X, double *q, cv_err *e)
{
    cv_curv_linop_ctx *x = ctx;
    return cv_curv_quadform(x->curv, x->kind, x->block, k, X, q, e);
}

void cv_curv_linop(cv_linop *op, cv_curv_linop_ctx *ctx, cv_curv *c, cv_curvature kind,
                   const cv_block *b, cv_progress *p)
{
    op->quad = curv_linop_quad;
    ctx->curv = c;
    ctx->kind = kind;
    ctx->block = b;
    op->n = b->dim;
    op->apply = curv_linop_apply;
    op->ctx = ctx;
    op->progress = p;
}
