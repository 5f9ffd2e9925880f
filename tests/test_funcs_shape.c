/* test_funcs_shape.c - the shape, reduction, softmax and matmul function
 * classes of the graph form (engine/func_*.c): each case checks the
 * inferred per-sample shape, the forward against a naive reference written
 * here (index arithmetic on multi-indices, double sums), and every kernel
 * with the oracle of kernel_check.h (finite differences, adjoint identity,
 * hvp_extra against differences of vjp, stacks, NULL/overwrite contracts);
 * then the refusals: dims on the batch dimension, out of range, shapes that
 * do not fit, each naming its attribute. */
#include <cJSON.h>
#include <cblas.h>
#include <check.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "api/arch.h"
#include "engine/parallel.h"
#include "engine/rng.h"
#include "kernel_check.h"
#include "testutil.h"

#define NS 3 /* samples of the forward checks */

/* ---- helpers ------------------------------------------------------------------ */

/* Sets list field `field` of L to the n integers that follow. */
static void set_list(cv_layer *L, const char *field, int n, ...)
{
    for (int i = 0; i < L->cls->nfields; i++) {
        const cv_field *f = &L->cls->fields[i];
        if (strcmp(f->name, field) != 0)
            continue;
        ck_assert_int_eq(f->kind, CV_F_INT_LIST);
        cv_int_list *l = (cv_int_list *)(void *)(L->attr.bytes + f->offset);
        va_list ap;
        va_start(ap, n);
        l->n = n;
        for (int j = 0; j < n; j++)
            l->v[j] = va_arg(ap, int);
        va_end(ap);
        return;
    }
    ck_abort_msg("%s has no field %s", L->cls->name, field);
}

static void assert_shape(const cv_shape *s, int rank, ...)
{
    char got[64];
    cv_shape_str(s, got, sizeof got);
    ck_assert_msg(s->rank == rank, "rank of %s, expected %d", got, rank);
    va_list ap;
    va_start(ap, rank);
    for (int i = 0; i < rank; i++) {
        int d = va_arg(ap, int);
        ck_assert_msg(s->dim[i] == d, "shape %s: dim %d expected %d", got, i, d);
    }
    va_end(ap);
}

static float *randn(size_t len, uint64_t seed)
{
    cv_rng r;
    cv_rng_seed(&r, seed);
    float *p = malloc(sizeof(float) * len);
    for (size_t i = 0; i < len; i++)
        p[i] = (float)cv_rng_normal(&r);
    return p;
}

/* Inputs of L (NS samples each, random). */
static void make_inputs(const cv_layer *L, float **xs)
{
    for (int i = 0; i < L->nin; i++)
        xs[i] = randn((size_t)NS * cv_shape_numel(&L->in_shapes[i]), 100 + (uint64_t)i);
}

/* check + infer, then the forward on xs: NS samples of y (malloc). */
static float *forward(cv_layer *L, float *const *xs)
{
    cv_err e;
    memset(&e, 0, sizeof e);
    L->in_shape = L->in_shapes[0];
    ck_assert_msg(!L->cls->check || L->cls->check(L, &e) == 0, "check: %s", e.message);
    ck_assert_msg(L->cls->infer(L, &L->in_shape, &e) == 0, "infer: %s", e.message);
    cv_layer_ctx c;
    memset(&c, 0, sizeof c);
    c.L = L;
    c.n = NS;
    c.nin = L->nin;
    for (int i = 0; i < L->nin; i++) {
        c.xs[i] = xs[i];
        c.in_numels[i] = cv_shape_numel(&L->in_shapes[i]);
    }
    c.x = xs[0];
    c.in_numel = c.in_numels[0];
    c.out_numel = cv_shape_numel(&L->out_shape);
    float *y = malloc(sizeof(float) * NS * c.out_numel);
    ck_assert_int_eq(L->cls->ops->forward(&c, y, &e), 0);
    cv_layer_ctx_release(&c);
    return y;
}

static void assert_close(const float *got, const double *ref, size_t len, const char *what)
{
    for (size_t i = 0; i < len; i++)
        ck_assert_msg(fabs(got[i] - ref[i]) <= 1e-5 * (1 + fabs(ref[i])),
                      "%s: entry %zu is %.7g, expected %.7g", what, i, got[i], ref[i]);
}

/* Flat offset of multi-index idx in shape s. */
static size_t flat(const cv_shape *s, const int *idx)
{
    size_t o = 0;
    for (int d = 0; d < s->rank; d++)
        o = o * (size_t)s->dim[d] + (size_t)idx[d];
    return o;
}

/* Multi-index of flat offset o in shape s. */
static void unflat(const cv_shape *s, size_t o, int *idx)
{
    for (int d = s->rank - 1; d >= 0; d--) {
        idx[d] = (int)(o % (size_t)s->dim[d]);
        o /= (size_t)s->dim[d];
    }
}

static void free_all(float **xs, int n, float *y, double *ref)
{
    for (int i = 0; i < n; i++)
        free(xs[i]);
    free(y);
    free(ref);
}

/* ---- permutations ---------------------------------------------------------------- */

/* L (transpose or permute on in) maps out axis i to in axis p[i]. */
static void check_permutation(cv_layer *L, const int *p)
{
    float *xs[1];
    make_inputs(L, xs);
    float *y = forward(L, xs);
    const cv_shape *in = &L->in_shapes[0], *out = &L->out_shape;
    ck_assert_int_eq(out->rank, in->rank);
    for (int i = 0; i < in->rank; i++)
        ck_assert_int_eq(out->dim[i], in->dim[p[i]]);
    size_t numel = cv_shape_numel(in);
    double *ref = malloc(sizeof(double) * NS * numel);
    for (int n = 0; n < NS; n++)
        for (size_t o = 0; o < numel; o++) {
            int oi[CV_MAX_RANK], ii[CV_MAX_RANK];
            unflat(out, o, oi);
            for (int i = 0; i < in->rank; i++)
                ii[p[i]] = oi[i];
            ref[n * numel + o] = xs[0][n * numel + flat(in, ii)];
        }
    assert_close(y, ref, NS * numel, L->cls->name);
    free_all(xs, 1, y, ref);
    KC_ASSERT(L, NULL);
}

START_TEST(transpose_cases)
{
    cv_layer L;
    cv_shape s = kc_shape(3, 4, 2, 3); /* [T, h, d] */
    static const struct { int d0, d1, p[3]; } cases[] = {
        {1, 2, {1, 0, 2}}, {-2, -3, {1, 0, 2}}, {2, 3, {0, 2, 1}}, {1, -1, {2, 1, 0}},
        {3, 3, {0, 1, 2}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        ck_assert_int_eq(kc_layer(&L, "transpose", 1, &s), 0);
        kc_set(&L, "dim0", cases[i].d0);
        kc_set(&L, "dim1", cases[i].d1);
        check_permutation(&L, cases[i].p);
    }
    cv_shape s2 = kc_shape(2, 5, 3); /* [T, d] -> [d, T] */
    ck_assert_int_eq(kc_layer(&L, "transpose", 1, &s2), 0);
    kc_set(&L, "dim0", -1);
    kc_set(&L, "dim1", -2);
    check_permutation(&L, (const int[]){1, 0});
}
END_TEST

START_TEST(permute_cases)
{
    cv_layer L;
    cv_shape s = kc_shape(3, 4, 2, 3); /* [T, h, d] -> [h, T, d]: permute(0, 2, 1, 3) */
    ck_assert_int_eq(kc_layer(&L, "permute", 1, &s), 0);
    set_list(&L, "dims", 4, 0, 2, 1, 3);
    check_permutation(&L, (const int[]){1, 0, 2});
    ck_assert_int_eq(kc_layer(&L, "permute", 1, &s), 0);
    set_list(&L, "dims", 4, 0, -1, 1, -2); /* a cycle, negative dims */
    check_permutation(&L, (const int[]){2, 0, 1});
    cv_shape s4 = kc_shape(4, 2, 3, 2, 2);
    ck_assert_int_eq(kc_layer(&L, "permute", 1, &s4), 0);
    set_list(&L, "dims", 5, 0, 4, 2, 1, 3);
    check_permutation(&L, (const int[]){3, 1, 0, 2});
}
END_TEST

/* ---- views ------------------------------------------------------------------------ */

/* A view keeps the memory layout: y == x. */
static void check_view(cv_layer *L)
{
    float *xs[1];
    make_inputs(L, xs);
    float *y = forward(L, xs);
    size_t numel = cv_shape_numel(&L->in_shapes[0]);
    ck_assert_uint_eq(cv_shape_numel(&L->out_shape), numel);
    double *ref = malloc(sizeof(double) * NS * numel);
    for (size_t i = 0; i < NS * numel; i++)
        ref[i] = xs[0][i];
    assert_close(y, ref, NS * numel, L->cls->name);
    free_all(xs, 1, y, ref);
    KC_ASSERT(L, NULL);
}

START_TEST(reshape_cases)
{
    cv_layer L;
    cv_shape s = kc_shape(2, 4, 6); /* [T, d] -> [T, h, dk] */
    ck_assert_int_eq(kc_layer(&L, "reshape", 1, &s), 0);
    set_list(&L, "shape", 4, -1, 4, 2, 3);
    check_view(&L);
    assert_shape(&L.out_shape, 3, 4, 2, 3);
    ck_assert_int_eq(kc_layer(&L, "reshape", 1, &s), 0);
    set_list(&L, "shape", 4, -1, 4, -1, 3); /* the inferred entry */
    check_view(&L);
    assert_shape(&L.out_shape, 3, 4, 2, 3);
    ck_assert_int_eq(kc_layer(&L, "reshape", 1, &s), 0);
    set_list(&L, "shape", 2, -1, 24);
    check_view(&L);
    assert_shape(&L.out_shape, 1, 24);
}
END_TEST

START_TEST(flatten_cases)
{
    cv_layer L;
    cv_shape s = kc_shape(3, 2, 3, 4);
    ck_assert_int_eq(kc_layer(&L, "flatten", 1, &s), 0);
    kc_set(&L, "start_dim", 1);
    check_view(&L);
    assert_shape(&L.out_shape, 1, 24);
    ck_assert_int_eq(kc_layer(&L, "flatten", 1, &s), 0);
    kc_set(&L, "start_dim", 2);
    kc_set(&L, "end_dim", -1);
    check_view(&L);
    assert_shape(&L.out_shape, 2, 2, 12);
    ck_assert_int_eq(kc_layer(&L, "flatten", 1, &s), 0);
    kc_set(&L, "start_dim", -3);
    kc_set(&L, "end_dim", 2);
    check_view(&L);
    assert_shape(&L.out_shape, 2, 6, 4);
}
END_TEST

/* ---- cat and narrow ------------------------------------------------------------------ */

static void check_cat(int nin, const cv_shape *s, int dim, int axis)
{
    cv_layer L;
    ck_assert_int_eq(kc_layer(&L, "cat", nin, s), 0);
    kc_set(&L, "dim", dim);
    float *xs[CV_MAX_NODE_INPUTS];
    make_inputs(&L, xs);
    float *y = forward(&L, xs);
    const cv_shape *out = &L.out_shape;
    int total = 0;
    for (int i = 0; i < nin; i++)
        total += s[i].dim[axis];
    ck_assert_int_eq(out->dim[axis], total);
    size_t numel = cv_shape_numel(out);
    double *ref = malloc(sizeof(double) * NS * numel);
    for (int n = 0; n < NS; n++)
        for (size_t o = 0; o < numel; o++) {
            int idx[CV_MAX_RANK], i = 0;
            unflat(out, o, idx);
            while (idx[axis] >= s[i].dim[axis])
                idx[axis] -= s[i++].dim[axis];
            ref[n * numel + o] = xs[i][n * cv_shape_numel(&s[i]) + flat(&s[i], idx)];
        }
    assert_close(y, ref, NS * numel, "cat");
    free_all(xs, nin, y, ref);
    KC_ASSERT(&L, NULL);
}

START_TEST(cat_cases)
{
    cv_shape last[2] = {kc_shape(2, 3, 4), kc_shape(2, 3, 2)};
    check_cat(2, last, -1, 1);
    check_cat(2, last, 2, 1);
    cv_shape mid[3] = {kc_shape(3, 2, 1, 3), kc_shape(3, 2, 3, 3), kc_shape(3, 2, 2, 3)};
    check_cat(3, mid, 2, 1);
    cv_shape first[4] = {kc_shape(2, 1, 5), kc_shape(2, 2, 5), kc_shape(2, 1, 5),
                         kc_shape(2, 3, 5)};
    check_cat(4, first, -2, 0);
}
END_TEST

static void check_narrow(cv_shape s, int dim, int axis, int start, int length)
{
    cv_layer L;
    ck_assert_int_eq(kc_layer(&L, "narrow", 1, &s), 0);
    kc_set(&L, "dim", dim);
    kc_set(&L, "start", start);
    kc_set(&L, "length", length);
    float *xs[1];
    make_inputs(&L, xs);
    float *y = forward(&L, xs);
    ck_assert_int_eq(L.out_shape.dim[axis], length);
    int first = start < 0 ? start + s.dim[axis] : start;
    size_t numel = cv_shape_numel(&L.out_shape), in_numel = cv_shape_numel(&s);
    double *ref = malloc(sizeof(double) * NS * numel);
    for (int n = 0; n < NS; n++)
        for (size_t o = 0; o < numel; o++) {
            int idx[CV_MAX_RANK];
            unflat(&L.out_shape, o, idx);
            idx[axis] += first;
            ref[n * numel + o] = xs[0][n * in_numel + flat(&s, idx)];
        }
    assert_close(y, ref, NS * numel, "narrow");
    free_all(xs, 1, y, ref);
    KC_ASSERT(&L, NULL);
}

START_TEST(narrow_cases)
{
    check_narrow(kc_shape(2, 4, 9), -1, 1, 3, 3);   /* a chunk of q, k, v */
    check_narrow(kc_shape(3, 2, 5, 3), 2, 1, 1, 3); /* a middle dim */
    check_narrow(kc_shape(2, 6, 2), 1, 0, -2, 2);   /* negative start */
    check_narrow(kc_shape(1, 7), 1, 0, 0, 7);       /* everything */
}
END_TEST

/* ---- mean and sum ------------------------------------------------------------------- */

static void check_reduce(const char *fn, cv_shape s, int keepdim, int ndim, const int *dims,
                         unsigned mask)
{
    cv_layer L;
    ck_assert_int_eq(kc_layer(&L, fn, 1, &s), 0);
    if (ndim == 1)
        set_list(&L, "dim", 1, dims[0]);
    else
        set_list(&L, "dim", 2, dims[0], dims[1]);
    kc_set(&L, "keepdim", keepdim);
    float *xs[1];
    make_inputs(&L, xs);
    float *y = forward(&L, xs);
    /* the expected shape: reduced axes dropped, or 1 with keepdim */
    cv_shape want = {0, {0}}, kept = s;
    size_t count = 1;
    for (int a = 0; a < s.rank; a++) {
        if (mask & (1u << a)) {
            count *= (size_t)s.dim[a];
            kept.dim[a] = 1;
            if (keepdim)
                want.dim[want.rank++] = 1;
        } else {
            want.dim[want.rank++] = s.dim[a];
        }
    }
    if (want.rank == 0)
        want = kc_shape(1, 1);
    ck_assert_int_eq(L.out_shape.rank, want.rank);
    for (int a = 0; a < want.rank; a++)
        ck_assert_int_eq(L.out_shape.dim[a], want.dim[a]);
    size_t numel = cv_shape_numel(&want), in_numel = cv_shape_numel(&s);
    double *ref = calloc(NS * numel, sizeof(double));
    for (int n = 0; n < NS; n++)
        for (size_t i = 0; i < in_numel; i++) {
            int idx[CV_MAX_RANK];
            unflat(&s, i, idx);
            for (int a = 0; a < s.rank; a++)
                if (mask & (1u << a))
                    idx[a] = 0;
            double v = xs[0][n * in_numel + i];
            ref[n * numel + flat(&kept, idx)] += strcmp(fn, "mean") == 0 ? v / count : v;
        }
    assert_close(y, ref, NS * numel, fn);
    free_all(xs, 1, y, ref);
    KC_ASSERT(&L, NULL);
}

START_TEST(reduce_cases)
{
    static const char *const fns[] = {"mean", "sum"};
    cv_shape s = kc_shape(3, 3, 4, 5);
    for (int f = 0; f < 2; f++)
        for (int keep = 0; keep < 2; keep++) {
            check_reduce(fns[f], s, keep, 1, (const int[]){-1}, 4u);
            check_reduce(fns[f], s, keep, 1, (const int[]){2}, 2u);
            check_reduce(fns[f], s, keep, 2, (const int[]){1, -1}, 5u);
            check_reduce(fns[f], s, keep, 2, (const int[]){3, 2}, 6u);
            check_reduce(fns[f], kc_shape(2, 4, 3), keep, 2, (const int[]){1, 2}, 3u);
            check_reduce(fns[f], kc_shape(1, 6), keep, 1, (const int[]){1}, 1u);
        }
}
END_TEST

/* ---- softmax and log_softmax ---------------------------------------------------------- */

static void check_softmax(const char *fn, cv_shape s, int dim, int axis)
{
    cv_layer L;
    ck_assert_int_eq(kc_layer(&L, fn, 1, &s), 0);
    kc_set(&L, "dim", dim);
    float *xs[1];
    make_inputs(&L, xs);
    float *y = forward(&L, xs);
    assert_shape(&L.out_shape, s.rank, s.dim[0], s.rank > 1 ? s.dim[1] : 0,
                 s.rank > 2 ? s.dim[2] : 0, s.rank > 3 ? s.dim[3] : 0);
    size_t numel = cv_shape_numel(&s);
    double *ref = malloc(sizeof(double) * NS * numel);
    int islog = strcmp(fn, "log_softmax") == 0;
    for (int n = 0; n < NS; n++)
        for (size_t o = 0; o < numel; o++) {
            int idx[CV_MAX_RANK];
            unflat(&s, o, idx);
            double sum = 0;
            for (int t = 0; t < s.dim[axis]; t++) {
                int j[CV_MAX_RANK];
                memcpy(j, idx, sizeof j);
                j[axis] = t;
                sum += exp((double)xs[0][n * numel + flat(&s, j)]);
            }
            double x = xs[0][n * numel + o];
            ref[n * numel + o] = islog ? x - log(sum) : exp(x) / sum;
        }
    assert_close(y, ref, NS * numel, fn);
    free_all(xs, 1, y, ref);
    KC_ASSERT(&L, NULL);
}

START_TEST(softmax_cases)
{
    static const char *const fns[] = {"softmax", "log_softmax"};
    for (int f = 0; f < 2; f++) {
        check_softmax(fns[f], kc_shape(2, 3, 5), -1, 1);       /* last */
        check_softmax(fns[f], kc_shape(3, 2, 4, 3), 2, 1);     /* middle */
        check_softmax(fns[f], kc_shape(3, 4, 2, 3), 1, 0);     /* first per-sample */
        check_softmax(fns[f], kc_shape(4, 2, 2, 3, 4), -1, 3); /* attention scores */
        check_softmax(fns[f], kc_shape(1, 6), 1, 0);
    }
}
END_TEST

/* Large logits: no overflow, no cancellation (the row maximum is subtracted). */
START_TEST(softmax_is_stable)
{
    cv_layer L;
    cv_shape s = kc_shape(1, 3);
    ck_assert_int_eq(kc_layer(&L, "softmax", 1, &s), 0);
    kc_set(&L, "dim", -1);
    float x[3 * NS] = {100000, 100001, 99999, -1000, -1000, -1000, 0, 0, 0};
    float *xs[1] = {x};
    float *y = forward(&L, xs);
    double e1 = exp(1.0), em1 = exp(-1.0);
    double ref[3 * NS] = {1 / (1 + e1 + em1), e1 / (1 + e1 + em1), em1 / (1 + e1 + em1),
                          1.0 / 3, 1.0 / 3, 1.0 / 3, 1.0 / 3, 1.0 / 3, 1.0 / 3};
    assert_close(y, ref, 3 * NS, "softmax");
    free(y);
    ck_assert_int_eq(kc_layer(&L, "log_softmax", 1, &s), 0);
    kc_set(&L, "dim", -1);
    y = forward(&L, xs);
    for (int i = 0; i < 3 * NS; i++)
        ref[i] = log(ref[i]);
    assert_close(y, ref, 3 * NS, "log_softmax");
    free(y);
}
END_TEST

/* ---- matmul and bmm ------------------------------------------------------------------------ */

/* y = a @ b per sample with PyTorch's rules, the expected out shape given. */
static void check_matmul(const char *fn, cv_shape a, cv_shape b, cv_shape want)
{
    cv_layer L;
    cv_shape s[2] = {a, b};
    ck_assert_int_eq(kc_layer(&L, fn, 2, s), 0);
    float *xs[2];
    make_inputs(&L, xs);
    float *y = forward(&L, xs);
    ck_assert_int_eq(L.out_shape.rank, want.rank);
    for (int d = 0; d < want.rank; d++)
        ck_assert_int_eq(L.out_shape.dim[d], want.dim[d]);
    /* promote 1-D operands, pad batch dims to 2 */
    int K = a.dim[a.rank - 1], M = a.rank >= 2 ? a.dim[a.rank - 2] : 1;
    int Nn = b.rank >= 2 ? b.dim[b.rank - 1] : 1;
    int ab[2] = {1, 1}, bb[2] = {1, 1};
    for (int i = 0; i < a.rank - 2; i++)
        ab[2 - (a.rank - 2) + i] = a.dim[i];
    for (int i = 0; i < b.rank - 2; i++)
        bb[2 - (b.rank - 2) + i] = b.dim[i];
    int ob[2] = {ab[0] > bb[0] ? ab[0] : bb[0], ab[1] > bb[1] ? ab[1] : bb[1]};
    size_t an = cv_shape_numel(&a), bn = cv_shape_numel(&b), yn = cv_shape_numel(&want);
    ck_assert_uint_eq(yn, (size_t)ob[0] * ob[1] * M * Nn);
    double *ref = malloc(sizeof(double) * NS * yn);
    for (int n = 0; n < NS; n++)
        for (int i0 = 0; i0 < ob[0]; i0++)
            for (int i1 = 0; i1 < ob[1]; i1++)
                for (int i = 0; i < M; i++)
                    for (int j = 0; j < Nn; j++) {
                        int a0 = ab[0] == 1 ? 0 : i0, a1 = ab[1] == 1 ? 0 : i1;
                        int b0 = bb[0] == 1 ? 0 : i0, b1 = bb[1] == 1 ? 0 : i1;
                        double acc = 0;
                        for (int t = 0; t < K; t++)
                            acc += (double)xs[0][n * an + (((size_t)a0 * ab[1] + a1) * M + i) * K + t] *
                                   xs[1][n * bn + (((size_t)b0 * bb[1] + b1) * K + t) * Nn + j];
                        ref[n * yn + (((size_t)i0 * ob[1] + i1) * M + i) * Nn + j] = acc;
                    }
    assert_close(y, ref, NS * yn, fn);
    free_all(xs, 2, y, ref);
    KC_ASSERT(&L, NULL);
}

START_TEST(matmul_cases)
{
    /* [N, T, d] @ W [d, e] replicated per sample */
    check_matmul("matmul", kc_shape(2, 4, 3), kc_shape(2, 3, 5), kc_shape(2, 4, 5));
    /* attention scores [N, h, T, d] @ [N, h, d, T] */
    check_matmul("matmul", kc_shape(3, 2, 4, 3), kc_shape(3, 2, 3, 4), kc_shape(3, 2, 4, 4));
    /* batch dims broadcast: [h, T, d] @ [1, d, e] and [1, T, d] @ [h, d, e] */
    check_matmul("matmul", kc_shape(3, 2, 4, 3), kc_shape(3, 1, 3, 5), kc_shape(3, 2, 4, 5));
    check_matmul("matmul", kc_shape(3, 1, 4, 3), kc_shape(3, 2, 3, 5), kc_shape(3, 2, 4, 5));
    /* [h, T, d] @ W [d, e]: B (a get_attr) without batch dims */
    check_matmul("matmul", kc_shape(3, 2, 4, 3), kc_shape(2, 3, 5), kc_shape(3, 2, 4, 5));
    /* W [T, d] @ [h, d, e]: A (a get_attr) without batch dims */
    check_matmul("matmul", kc_shape(2, 4, 3), kc_shape(3, 2, 3, 5), kc_shape(3, 2, 4, 5));
    /* two batch dims, both broadcast: [2, 1, T, d] @ [1, 3, d, e] */
    check_matmul("matmul", kc_shape(4, 2, 1, 2, 3), kc_shape(4, 1, 3, 3, 2),
                 kc_shape(4, 2, 3, 2, 2));
    /* 1-D operands (one of them a get_attr): [d] @ [d, e], [T, d] @ [d], [d] @ [d] */
    check_matmul("matmul", kc_shape(1, 3), kc_shape(2, 3, 5), kc_shape(1, 5));
    check_matmul("matmul", kc_shape(2, 4, 3), kc_shape(1, 3), kc_shape(1, 4));
    check_matmul("matmul", kc_shape(1, 3), kc_shape(1, 3), kc_shape(1, 1));
    /* 1-D with batch dims on the other side: v [d] @ [h, d, e], [h, T, d] @ v [d] */
    check_matmul("matmul", kc_shape(1, 3), kc_shape(3, 2, 3, 5), kc_shape(2, 2, 5));
    check_matmul("matmul", kc_shape(3, 2, 4, 3), kc_shape(1, 3), kc_shape(2, 2, 4));
    /* bmm: [N, m, k] @ [N, k, n] */
    check_matmul("bmm", kc_shape(2, 4, 3), kc_shape(2, 3, 2), kc_shape(2, 4, 2));
}
END_TEST

/* A product large enough for OpenBLAS's own threads, and a stack of small
 * ones spread over threads: the same results as the reference. */
START_TEST(matmul_sizes)
{
    check_matmul("matmul", kc_shape(2, 64, 70), kc_shape(2, 70, 72), kc_shape(2, 64, 72));
    check_matmul("matmul", kc_shape(3, 8, 16, 8), kc_shape(3, 8, 8, 16),
                 kc_shape(3, 8, 16, 16));
}
END_TEST

/* Samples big enough for cv_parallel_for to split the (vector, sample)
 * items over threads: the same references and oracle pass. */
START_TEST(threaded_sizes)
{
    openblas_set_num_threads(2);
    cv_shape s = kc_shape(3, 8, 64, 64);
    ck_assert_int_ge(cv_parallel_threads(NS, cv_parallel_grain(4 * cv_shape_numel(&s))), 2);
    check_softmax("softmax", s, -1, 2);
    check_softmax("log_softmax", s, 2, 1);
    cv_layer L;
    ck_assert_int_eq(kc_layer(&L, "transpose", 1, &s), 0);
    kc_set(&L, "dim0", 1);
    kc_set(&L, "dim1", 3);
    check_permutation(&L, (const int[]){2, 1, 0});
    check_reduce("mean", s, 1, 1, (const int[]){2}, 2u);
    check_matmul("matmul", kc_shape(3, 8, 64, 32), kc_shape(3, 8, 32, 64),
                 kc_shape(3, 8, 64, 64));
}
END_TEST

/* ---- refusals ---------------------------------------------------------------------------- */

/* check + infer of L must fail naming field, the message starting "field:"
 * and containing `says`. */
static void expect_refused(cv_layer *L, const char *field, const char *says)
{
    cv_err e;
    memset(&e, 0, sizeof e);
    L->in_shape = L->in_shapes[0];
    int rc = L->cls->check ? L->cls->check(L, &e) : 0;
    if (rc == 0)
        rc = L->cls->infer(L, &L->in_shape, &e);
    ck_assert_msg(rc == -1, "%s: accepted", L->cls->name);
    ck_assert_int_eq(e.status, CV_EINVAL);
    ck_assert_str_eq(e.field, field);
    if (*field) {
        char pre[64];
        snprintf(pre, sizeof pre, "%s", field);
        ck_assert_msg(strncmp(e.message, pre, strlen(pre)) == 0, "'%s' does not start with %s",
                      e.message, pre);
    }
    ck_assert_msg(strstr(e.message, says) != NULL, "'%s' lacks '%s'", e.message, says);
}

START_TEST(batch_dimension_is_refused)
{
    cv_layer L;
    cv_shape s = kc_shape(2, 4, 6), two[2] = {kc_shape(2, 4, 6), kc_shape(2, 4, 6)};
    ck_assert_int_eq(kc_layer(&L, "transpose", 1, &s), 0);
    kc_set(&L, "dim0", 0);
    kc_set(&L, "dim1", 1);
    expect_refused(&L, "dim0", "batch dimension");
    ck_assert_int_eq(kc_layer(&L, "transpose", 1, &s), 0);
    kc_set(&L, "dim0", 1);
    kc_set(&L, "dim1", -3); /* the batch, counted from the end */
    expect_refused(&L, "dim1", "batch dimension");
    ck_assert_int_eq(kc_layer(&L, "permute", 1, &s), 0);
    set_list(&L, "dims", 3, 1, 0, 2);
    expect_refused(&L, "dims", "dims[0] must be 0");
    ck_assert_int_eq(kc_layer(&L, "permute", 1, &s), 0);
    set_list(&L, "dims", 3, 0, 2, -3);
    expect_refused(&L, "dims", "dims[2]: dimension -3 is the batch");
    ck_assert_int_eq(kc_layer(&L, "reshape", 1, &s), 0);
    set_list(&L, "shape", 3, 4, 4, 6);
    expect_refused(&L, "shape", "shape[0] must be -1");
    ck_assert_int_eq(kc_layer(&L, "flatten", 1, &s), 0); /* torch.flatten's default 0 */
    expect_refused(&L, "start_dim", "batch dimension");
    ck_assert_int_eq(kc_layer(&L, "cat", 2, two), 0); /* torch.cat's default 0 */
    expect_refused(&L, "dim", "batch dimension");
    ck_assert_int_eq(kc_layer(&L, "narrow", 1, &s), 0);
    kc_set(&L, "dim", -3);
    kc_set(&L, "length", 1);
    expect_refused(&L, "dim", "batch dimension");
    static const char *const red[] = {"mean", "sum"};
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(kc_layer(&L, red[i], 1, &s), 0); /* no dim: over the batch too */
        expect_refused(&L, "dim", "reduces the batch dimension too");
        ck_assert_int_eq(kc_layer(&L, red[i], 1, &s), 0);
        set_list(&L, "dim", 2, 1, 0);
        expect_refused(&L, "dim", "dim[1]: 0 is the batch dimension");
        ck_assert_int_eq(kc_layer(&L, red[i], 1, &s), 0);
        set_list(&L, "dim", 2, -1, -3);
        expect_refused(&L, "dim", "dim[1]: dimension -3 is the batch");
    }
    static const char *const sm[] = {"softmax", "log_softmax"};
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(kc_layer(&L, sm[i], 1, &s), 0);
        kc_set(&L, "dim", 0);
        expect_refused(&L, "dim", "batch dimension");
        ck_assert_int_eq(kc_layer(&L, sm[i], 1, &s), 0);
        kc_set(&L, "dim", -3);
        expect_refused(&L, "dim", "batch dimension");
    }
}
END_TEST

START_TEST(bad_shapes_are_refused)
{
    cv_layer L;
    cv_shape s = kc_shape(2, 4, 6);
    ck_assert_int_eq(kc_layer(&L, "transpose", 1, &s), 0);
    kc_set(&L, "dim0", 1);
    kc_set(&L, "dim1", 3);
    expect_refused(&L, "dim1", "out of range");
    ck_assert_int_eq(kc_layer(&L, "permute", 1, &s), 0);
    set_list(&L, "dims", 2, 0, 1);
    expect_refused(&L, "dims", "2 entries for an input of 3 dimensions");
    ck_assert_int_eq(kc_layer(&L, "permute", 1, &s), 0);
    set_list(&L, "dims", 3, 0, 1, -2);
    expect_refused(&L, "dims", "listed twice");
    ck_assert_int_eq(kc_layer(&L, "reshape", 1, &s), 0);
    set_list(&L, "shape", 3, -1, 5, -1);
    expect_refused(&L, "shape", "cannot be reshaped");
    ck_assert_int_eq(kc_layer(&L, "reshape", 1, &s), 0);
    set_list(&L, "shape", 3, -1, -1, -1);
    expect_refused(&L, "shape", "at most one");
    ck_assert_int_eq(kc_layer(&L, "reshape", 1, &s), 0);
    set_list(&L, "shape", 2, -1, 25);
    expect_refused(&L, "shape", "cannot be reshaped");
    ck_assert_int_eq(kc_layer(&L, "flatten", 1, &s), 0);
    kc_set(&L, "start_dim", 2);
    kc_set(&L, "end_dim", 1);
    expect_refused(&L, "start_dim", "comes after end_dim");
    cv_shape bad_cat[2] = {kc_shape(2, 4, 6), kc_shape(2, 3, 5)};
    ck_assert_int_eq(kc_layer(&L, "cat", 2, bad_cat), 0);
    kc_set(&L, "dim", -1);
    expect_refused(&L, "dim", "sizes must match except along dimension 2");
    ck_assert_int_eq(kc_layer(&L, "narrow", 1, &s), 0);
    kc_set(&L, "dim", 2);
    kc_set(&L, "start", 4);
    kc_set(&L, "length", 3);
    expect_refused(&L, "length", "exceeds the size 6");
    ck_assert_int_eq(kc_layer(&L, "narrow", 1, &s), 0);
    kc_set(&L, "dim", 2);
    kc_set(&L, "start", -7);
    kc_set(&L, "length", 1);
    expect_refused(&L, "start", "out of range");
    ck_assert_int_eq(kc_layer(&L, "sum", 1, &s), 0);
    set_list(&L, "dim", 2, 2, -1);
    expect_refused(&L, "dim", "appears twice");
    cv_shape mm[2] = {kc_shape(2, 4, 6), kc_shape(2, 5, 3)};
    ck_assert_int_eq(kc_layer(&L, "matmul", 2, mm), 0);
    expect_refused(&L, "", "cannot be multiplied (6 != 5)");
    cv_shape mb[2] = {kc_shape(3, 2, 4, 6), kc_shape(3, 3, 6, 2)};
    ck_assert_int_eq(kc_layer(&L, "matmul", 2, mb), 0);
    expect_refused(&L, "", "do not broadcast");
    ck_assert_int_eq(kc_layer(&L, "bmm", 2, mb), 0);
    expect_refused(&L, "", "bmm: needs 3-D inputs");
}
END_TEST

/* ---- the list field kind (CV_F_INT_LIST) in the architecture document ------------------ */

/* A layer list [BatchNorm1d, layer] on input [4, 6] with MSELoss; ' for ". */
static int parse_one(const char *layer, cv_model *m, cv_err *e)
{
    char buf[640];
    snprintf(buf, sizeof buf,
             "{'input_shape': [4, 6], 'layers': [{'type': 'BatchNorm1d', 'num_features': 4}, %s], 'loss': {'type': 'MSELoss'}}", layer);
    for (char *p = buf; *p; p++)
        if (*p == '\'')
            *p = '"';
    return cv_arch_parse(buf, strlen(buf), m, e);
}

static void expect_parse_error(const char *layer, const char *code, const char *field,
                               const char *says)
{
    cv_model *m = calloc(1, sizeof *m);
    cv_err e;
    ck_assert_msg(parse_one(layer, m, &e) == -1, "%s: accepted", layer);
    ck_assert_str_eq(e.code, code);
    ck_assert_str_eq(e.field, field);
    ck_assert_msg(strstr(e.message, says) != NULL, "'%s' lacks '%s'", e.message, says);
    cv_model_free(m);
    free(m);
}

START_TEST(int_list_field_parses)
{
    cv_model *m = calloc(1, sizeof *m);
    cv_err e;
    /* a plain integer is a list of one, exported as a list */
    ck_assert_msg(parse_one("{'type': 'sum', 'dim': -1}", m, &e) == 0, "%s", e.message);
    assert_shape(&m->layers[1].out_shape, 1, 4);
    cJSON *j = cv_arch_to_json(m);
    const cJSON *lo = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "layers"), 1);
    const cJSON *d = cJSON_GetObjectItem(lo, "dim");
    ck_assert(cJSON_IsArray(d) && cJSON_GetArraySize(d) == 1);
    ck_assert_int_eq(d->child->valueint, -1);
    cJSON_Delete(j);
    cv_model_free(m);
    ck_assert_msg(parse_one("{'type': 'reshape', 'shape': [-1, -1]}", m, &e) == 0, "%s",
                  e.message);
    assert_shape(&m->layers[1].out_shape, 1, 24);
    cv_model_free(m);
    free(m);
    expect_parse_error("{'type': 'reshape', 'shape': [-1, 2.5]}", "invalid_type",
                       "layers[1].shape[1]", "must be an integer");
    expect_parse_error("{'type': 'reshape', 'shape': '-1'}", "invalid_type", "layers[1].shape",
                       "must be an integer or a list of 1 to 5 integers");
    expect_parse_error("{'type': 'reshape', 'shape': [-1, 1, 1, 1, 4, 6]}", "invalid_value",
                       "layers[1].shape", "a list of 1 to 5 integers");
    expect_parse_error("{'type': 'permute', 'dims': []}", "invalid_value", "layers[1].dims",
                       "a list of 1 to 5 integers");
    expect_parse_error("{'type': 'permute'}", "missing_field", "layers[1].dims", "required");
    expect_parse_error("{'type': 'mean', 'keepdim': true}", "invalid_value", "layers[1].dim",
                       "reduces the batch dimension too");
    expect_parse_error("{'type': 'sum', 'dim': null}", "invalid_value", "layers[1].dim",
                       "reduces the batch dimension too");
    expect_parse_error("{'type': 'softmax', 'dim': 0}", "invalid_value", "layers[1].dim",
                       "batch dimension");
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("funcs_shape");
    TCase *t = tcase_create("kernels");
    tcase_set_timeout(t, 60);
    tcase_add_test(t, transpose_cases);
    tcase_add_test(t, permute_cases);
    tcase_add_test(t, reshape_cases);
    tcase_add_test(t, flatten_cases);
    tcase_add_test(t, cat_cases);
    tcase_add_test(t, narrow_cases);
    tcase_add_test(t, reduce_cases);
    tcase_add_test(t, softmax_cases);
    tcase_add_test(t, softmax_is_stable);
    tcase_add_test(t, matmul_cases);
    tcase_add_test(t, matmul_sizes);
    tcase_add_test(t, threaded_sizes);
    suite_add_tcase(s, t);
    t = tcase_create("refusals");
    tcase_add_test(t, batch_dimension_is_refused);
    tcase_add_test(t, bad_shapes_are_refused);
    tcase_add_test(t, int_list_field_parses);
    suite_add_tcase(s, t);
    return s;
}

int main(void) { return tu_main(suite); }
