/* func_matmul.c - the function classes matmul (torch.matmul, the @ operator)
 * and bmm, per sample: y_n = A_n @ B_n with PyTorch's matmul rules on the
 * per-sample tensors (a 1-D A is a row [1, k], a 1-D B a column [k, 1],
 * both dims dropped from the result; the leading per-sample batch dims
 * broadcast, right-aligned).  Both operands carry the batch dimension: a
 * get_attr weight W of shape [d, e] arrives replicated per sample, so
 * x [N, T, d] @ W is [T, d] @ [d, e] per sample, as PyTorch computes it.
 * bmm takes exactly [m, k] @ [k, n] per sample ([N, m, k] @ [N, k, n]).
 * A result without per-sample dims (1-D @ 1-D) has the per-sample shape [1].
 *
 * The per-sample product is PyTorch's product of the full tensors when the
 * batch dimension pairs with itself: for two activations (both [N, ...] in
 * PyTorch) iff their per-sample ranks are equal and >= 2 (otherwise
 * PyTorch's right-aligned broadcasting or its 1-D/2-D rules mix samples);
 * for a get_attr operand W (no batch dimension in PyTorch, replicated here)
 * iff W has no more batch dims than the activation and the activation has
 * per-sample rank >= 2 (or rank 1 as the first operand, W of rank <= 2:
 * x [N, d] @ W [d, e]).  The class cannot tell the two
 * apart (both arrive with the batch dim): the graph builder, which can,
 * refuses the other combinations.
 *
 * Bilinear: J [rA, rB] = rA B + A rB; J^T gy = (gy B^T, A^T gy) summed over
 * broadcast batch dims; the second-order terms are the cross terms
 * gA += gy rB^T, gB += rA^T gy.  Each (vector, sample) pair is a run of
 * cblas_sgemm calls, one per (broadcast) batch slice; when B has no batch
 * slices the slices of A are one GEMM.  Small GEMMs run on cv_parallel_for
 * ranges of pairs, large ones on OpenBLAS's own threads. */
#include <cblas.h>
#include <string.h>

#include "func_shape.h"
#include "parallel.h"

extern const cv_layer_class cv_bmm_class;

/* OpenBLAS runs a GEMM of fewer multiply-adds than this on one thread. */
#define MM_SMALL ((size_t)1 << 18)

typedef struct {
    int m, kk, nn;       /* a slice: [m, kk] @ [kk, nn] = [m, nn] */
    int ob[2], ab[2], bb[2]; /* batch dims of y, A, B, right-aligned, 1 = none */
    size_t asz, bsz, ysz; /* slice sizes */
    size_t an, bn, yn;    /* per-sample sizes */
} mm_plan;

/* The plan of A (shape a) @ B (shape b), or -1 with e when they do not fit. */
static int mm_plan_of(const cv_layer *L, const cv_shape *a, const cv_shape *b, mm_plan *p,
                      cv_err *e)
{
    const char *fn = L->cls->name;
    char sa[64], sb[64];
    cv_shape_str(a, sa, sizeof sa);
    cv_shape_str(b, sb, sizeof sb);
    if (L->cls == &cv_bmm_class && (a->rank != 2 || b->rank != 2))
        return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                          "bmm: needs 3-D inputs [N, m, k] and [N, k, n] (per sample 2-D), "
                          "got per-sample shapes %s and %s (use matmul to broadcast)", sa, sb);
    memset(p, 0, sizeof *p);
    p->m = a->rank >= 2 ? a->dim[a->rank - 2] : 1;
    int ka = a->dim[a->rank - 1];
    int kb = b->rank >= 2 ? b->dim[b->rank - 2] : b->dim[0];
    p->nn = b->rank >= 2 ? b->dim[b->rank - 1] : 1;
    if (ka != kb)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                          "%s: per-sample shapes %s and %s cannot be multiplied (%d != %d)", fn,
                          sa, sb, ka, kb);
    p->kk = ka;
    int na = a->rank > 2 ? a->rank - 2 : 0, nb = b->rank > 2 ? b->rank - 2 : 0;
    for (int i = 0; i < 2; i++) {
        int ia = i - (2 - na), ib = i - (2 - nb);
        p->ab[i] = ia >= 0 ? a->dim[ia] : 1;
        p->bb[i] = ib >= 0 ? b->dim[ib] : 1;
        if (p->ab[i] != p->bb[i] && p->ab[i] != 1 && p->bb[i] != 1)
            return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                              "%s: the batch dims of per-sample shapes %s and %s do not "
                              "broadcast", fn, sa, sb);
        p->ob[i] = p->ab[i] > p->bb[i] ? p->ab[i] : p->bb[i];
    }
    p->asz = (size_t)p->m * p->kk;
    p->bsz = (size_t)p->kk * p->nn;
    p->ysz = (size_t)p->m * p->nn;
    p->an = p->asz * p->ab[0] * p->ab[1];
    p->bn = p->bsz * p->bb[0] * p->bb[1];
    p->yn = p->ysz * p->ob[0] * p->ob[1];
    return 0;
}

static int mm_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    const cv_shape *a = &L->in_shapes[0], *b = &L->in_shapes[1];
    mm_plan p;
    if (L->nin != 2)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "", "%s: takes 2 inputs, got %d",
                          L->cls->name, L->nin);
    if (mm_plan_of(L, a, b, &p, e))
        return -1;
    int na = a->rank > 2 ? a->rank - 2 : 0, nb = b->rank > 2 ? b->rank - 2 : 0;
    cv_shape out = {0, {0}};
    for (int i = 2 - (na > nb ? na : nb); i < 2; i++)
        out.dim[out.rank++] = p.ob[i];
    if (a->rank >= 2)
        out.dim[out.rank++] = p.m;
    if (b->rank >= 2)
        out.dim[out.rank++] = p.nn;
    if (out.rank == 0)
        out = (cv_shape){1, {1}};
    L->out_shape = out;
    return 0;
}

/* A plan for the kernels: when B has one slice, A's slices are one GEMM. */
static void mm_kernel_plan(const cv_layer_ctx *c, mm_plan *p)
{
    cv_err e;
    mm_plan_of(c->L, &c->L->in_shapes[0], &c->L->in_shapes[1], p, &e);
    if (p->bb[0] * p->bb[1] == 1) {
        p->m *= p->ab[0] * p->ab[1];
        p->ab[0] = p->ab[1] = p->ob[0] = p->ob[1] = 1;
        p->asz = p->an;
        p->ysz = p->yn;
    }
}

/* ---- the (vector, sample) pair kernels -------------------------------------- */

typedef enum { MM_FORWARD, MM_JVP, MM_VJP, MM_HVP } mm_kind;

typedef struct {
    const cv_layer_ctx *c;
    const mm_plan *p;
    mm_kind kind;
    const float *gy;     /* VJP: stacked cotangents; HVP: the gradient cotangent */
    const float *ra, *rb; /* JVP, HVP: stacked directions (NULL: zero) */
    float *y;            /* FORWARD, JVP: stacked outputs */
    float *ga, *gb;      /* VJP (overwritten), HVP (added to): stacked, NULL: not needed */
} mm_job;

static void gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int M, int N, int K, const float *A,
                 const float *B, float beta, float *C)
{
    cblas_sgemm(CblasRowMajor, ta, tb, M, N, K, 1.0f, A, ta == CblasNoTrans ? K : M, B,
                tb == CblasNoTrans ? N : K, beta, C, N);
}

/* Pair it = j * n + sample: every batch slice of its product. */
static void mm_pair(const mm_job *q, size_t it)
{
    const mm_plan *p = q->p;
    size_t n = it % (size_t)q->c->n;
    const float *A = q->c->xs[0] + n * p->an, *B = q->c->xs[1] + n * p->bn;
    const float *gy = q->gy ? q->gy + (q->kind == MM_HVP ? n : it) * p->yn : NULL;
    const float *ra = q->ra ? q->ra + it * p->an : NULL, *rb = q->rb ? q->rb + it * p->bn : NULL;
    float *y = q->y ? q->y + it * p->yn : NULL;
    float *ga = q->ga ? q->ga + it * p->an : NULL, *gb = q->gb ? q->gb + it * p->bn : NULL;
    /* a slice of A or B hit by several slices of y accumulates */
    int a_bcast = p->ab[0] * p->ab[1] != p->ob[0] * p->ob[1];
    int b_bcast = p->bb[0] * p->bb[1] != p->ob[0] * p->ob[1];
    float beta_a = q->kind == MM_HVP || a_bcast ? 1.0f : 0.0f;
    float beta_b = q->kind == MM_HVP || b_bcast ? 1.0f : 0.0f;
    if (q->kind == MM_VJP && ga && a_bcast)
        memset(ga, 0, sizeof(float) * p->an);
    if (q->kind == MM_VJP && gb && b_bcast)
        memset(gb, 0, sizeof(float) * p->bn);
    int M = p->m, K = p->kk, N = p->nn;
    for (int i0 = 0; i0 < p->ob[0]; i0++)
        for (int i1 = 0; i1 < p->ob[1]; i1++) {
            size_t s = (size_t)i0 * p->ob[1] + i1;
            size_t sa = ((size_t)(p->ab[0] > 1 ? i0 : 0) * p->ab[1] + (p->ab[1] > 1 ? i1 : 0)) *
                        p->asz;
            size_t sb = ((size_t)(p->bb[0] > 1 ? i0 : 0) * p->bb[1] + (p->bb[1] > 1 ? i1 : 0)) *
                        p->bsz;
            size_t sy = s * p->ysz;
            switch (q->kind) {
            case MM_FORWARD:
                gemm(CblasNoTrans, CblasNoTrans, M, N, K, A + sa, B + sb, 0.0f, y + sy);
                break;
            case MM_JVP:
                if (ra)
                    gemm(CblasNoTrans, CblasNoTrans, M, N, K, ra + sa, B + sb, 0.0f, y + sy);
                if (rb)
                    gemm(CblasNoTrans, CblasNoTrans, M, N, K, A + sa, rb + sb, ra ? 1.0f : 0.0f,
                         y + sy);
                if (!ra && !rb)
                    memset(y + sy, 0, sizeof(float) * p->ysz);
                break;
            case MM_VJP:
                if (ga)
                    gemm(CblasNoTrans, CblasTrans, M, K, N, gy + sy, B + sb, beta_a, ga + sa);
                if (gb)
                    gemm(CblasTrans, CblasNoTrans, K, N, M, A + sa, gy + sy, beta_b, gb + sb);
                break;
            case MM_HVP:
                if (ga && rb)
                    gemm(CblasNoTrans, CblasTrans, M, K, N, gy + sy, rb + sb, beta_a, ga + sa);
                if (gb && ra)
                    gemm(CblasTrans, CblasNoTrans, K, N, M, ra + sa, gy + sy, beta_b, gb + sb);
                break;
            }
        }
}

static void mm_range(void *ctx, size_t lo, size_t hi)
{
    for (size_t it = lo; it < hi; it++)
        mm_pair(ctx, it);
}

static void mm_run(mm_job *q, int k)
{
    mm_plan p;
    mm_kernel_plan(q->c, &p);
    q->p = &p;
    size_t pairs = (size_t)k * q->c->n;
    size_t slice = (size_t)p.m * p.kk * p.nn, pair = slice * p.ob[0] * p.ob[1];
    if (slice >= MM_SMALL) {
        mm_range(q, 0, pairs); /* OpenBLAS threads each GEMM */
        return;
    }
    size_t grain = pair ? MM_SMALL / pair + 1 : pairs;
    cv_parallel_for(pairs, grain, mm_range, q);
}

static size_t mm_work(const cv_layer_ctx *c, int k) { return 0; }

static int mm_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    mm_job q = {.c = c, .kind = MM_FORWARD, .y = y};
    mm_run(&q, 1);
    return 0;
}

static void mm_vjp_n(const cv_layer_ctx *c, int k, const float *gy, float *const *gx,
                     float *gtheta)
{
    mm_job q = {.c = c, .kind = MM_VJP, .gy = gy, .ga = gx[0], .gb = gx[1]};
    if (q.ga || q.gb)
        mm_run(&q, k);
}

static void mm_jvp_n(const cv_layer_ctx *c, int k, const float *const *rx, const float *vtheta,
                     float *ry)
{
    mm_job q = {.c = c, .kind = MM_JVP, .ra = rx[0], .rb = rx[1], .y = ry};
    mm_run(&q, k);
}

static void mm_hvp_extra_n(const cv_layer_ctx *c, int k, const float *gy,
                           const float *const *rx, const float *vtheta, float *const *gx_add,
                           float *gtheta_add)
{
    mm_job q = {.c = c, .kind = MM_HVP, .gy = gy, .ra = rx[0], .rb = rx[1]};
    q.ga = rx[1] ? gx_add[0] : NULL; /* gA += gy rB^T */
    q.gb = rx[0] ? gx_add[1] : NULL; /* gB += rA^T gy */
    if (gy && (q.ga || q.gb))
        mm_run(&q, k);
}

static void mm_per_sample(const cv_layer_ctx *c, const float *gy, float *G) {}

static const cv_layer_ops matmul_ops = {
    .work_size = mm_work,
    .forward = mm_forward,
    .per_sample = mm_per_sample,
    .vjp_n = mm_vjp_n,
    .jvp_n = mm_jvp_n,
    .hvp_extra_n = mm_hvp_extra_n,
};

const cv_layer_class cv_matmul_class = {
    .name = "matmul",
    .infer = mm_infer,
    .ops = &matmul_ops,
    .min_inputs = 2,
    .max_inputs = 2,
    .function = "matmul",
};

const cv_layer_class cv_bmm_class = {
    .name = "bmm",
    .infer = mm_infer,
    .ops = &matmul_ops,
    .min_inputs = 2,
    .max_inputs = 2,
    .function = "bmm",
};
