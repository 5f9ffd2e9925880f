/* test_diag_exact.c - the exact diagonal by backpropagation (engine/diag_exact.h,
 * layer.h diag_add): against the diagonal of the dense curvature (cv_curv_dense) for
 * ggn, fisher_mc, ef and the Hessian (GGN part plus the activations' residual terms) on a
 * Linear/Tanh MLP, Linear on rows [T, in] (weight sharing
 * within a sample), a Conv2d and a grouped Conv2d; per-layer blocks; micro-batches;
 * Linear's own kernel against the generic one (its per_sample gradients squared);
 * refusals (a Kronecker curvature, a tied tensor). */
#include "kron_fixture.h"

#include "engine/diag_exact.h"
#include "engine/layer_embedding.h"
#include "engine/part_internal.h"

static const cv_curvature kinds[] = {CV_CURV_GGN, CV_CURV_FISHER_MC, CV_CURV_EF,
                                     CV_CURV_HESSIAN};

/* _v: 0 MLP [5] (CE mean), 1 Linear rows [3, 4] (MSE mean), 2 Conv2d [2, 5, 5] and a
 * grouped Conv2d (CE sum), 3 BCE on an MLP. */
static void model(fx *f, int v, size_t micro_batch)
{
    int d0[] = {5}, d1[] = {3, 4}, d2[] = {2, 5, 5};
    cv_layer L0[] = {lin(5, 4, 1), simple(&cv_tanh_class), lin(4, 3, 1)};
    cv_layer L1[] = {lin(4, 5, 1), simple(&cv_tanh_class), lin(5, 2, 0)};
    cv_layer L2[] = {conv(2, 4, 3, 1, 1), simple(&cv_tanh_class), conv(4, 4, 2, 2, 0),
                     simple(&cv_flatten_class), lin(16, 3, 1)};
    if (v == 0)
        fx_make(f, 1, d0, L0, 3, CV_LOSS_CE, CV_RED_MEAN, 7, 41, micro_batch);
    else if (v == 1)
        fx_make(f, 2, d1, L1, 3, CV_LOSS_MSE, CV_RED_MEAN, 5, 42, micro_batch);
    else if (v == 2)
        fx_make(f, 3, d2, L2, 5, CV_LOSS_CE, CV_RED_SUM, 4, 43, micro_batch);
    else
        fx_make(f, 1, d0, L0, 3, CV_LOSS_BCE, CV_RED_MEAN, 6, 44, micro_batch);
}

static void dense_diag(fx *f, cv_curvature kind, const cv_block *b, double *out)
{
    size_t D = b->dim;
    double *F = malloc(sizeof(double) * D * D);
    cv_err e;
    ck_assert_msg(cv_curv_dense(f->c, kind, b, 4096, F, &e) == 0, "dense: %s", e.message);
    for (size_t i = 0; i < D; i++)
        out[i] = F[i * D + i];
    free(F);
}

static double maxrel(const double *a, const double *b, size_t n)
{
    double m = 0, s = 0;
    for (size_t i = 0; i < n; i++) {
        m = fmax(m, fabs(a[i] - b[i]));
        s = fmax(s, fabs(b[i]));
    }
    return s > 0 ? m / s : m;
}

START_TEST(backprop_diagonal_is_the_dense_diagonal)
{
    fx f;
    model(&f, _i, 0);
    int nb = cv_blocks_per_layer(&f.m, NULL, 0);
    cv_block *bl = calloc((size_t)nb + 1, sizeof *bl);
    cv_blocks_per_layer(&f.m, bl, nb);
    cv_block full;
    cv_block_full(&f.m, &full);
    for (int k = 0; k < 4; k++)
        for (int b = -1; b < nb; b++) {
            const cv_block *blk = b < 0 ? &full : &bl[b];
            double *d = malloc(sizeof(double) * blk->dim), *ref = malloc(sizeof(double) * blk->dim);
            cv_err e;
            ck_assert_msg(cv_curv_diag_backprop(f.c, kinds[k], blk, 0, d, &e) == 0, "%s",
                          e.message);
            dense_diag(&f, kinds[k], blk, ref);
            double err = maxrel(d, ref, blk->dim), top = 0;
            for (size_t q = 0; q < blk->dim; q++)
                top = fmax(top, ref[q]);
            ck_assert(top > 1e-6);
            ck_assert_msg(err < 2e-6, "model %d %s block %d: rel err %g", _i,
                          cv_curvature_name(kinds[k]), b, err);
            free(d), free(ref);
        }
    free(bl);
    fx_free(&f);
}
END_TEST

START_TEST(micro_batches_sum_to_the_whole)
{
    fx f, g;
    model(&f, _i, 0);
    model(&g, _i, 2);
    cv_block full;
    cv_block_full(&f.m, &full);
    for (int k = 0; k < 4; k++) {
        double *a = malloc(sizeof(double) * full.dim), *b = malloc(sizeof(double) * full.dim);
        cv_err e;
        ck_assert_int_eq(cv_curv_diag_backprop(f.c, kinds[k], &full, 0, a, &e), 0);
        ck_assert_int_eq(cv_curv_diag_backprop(g.c, kinds[k], &full, 0, b, &e), 0);
        ck_assert_msg(maxrel(b, a, full.dim) < 1e-6, "model %d %s: %g", _i,
                      cv_curvature_name(kinds[k]), maxrel(b, a, full.dim));
        free(a), free(b);
    }
    fx_free(&f);
    fx_free(&g);
}
END_TEST

/* per_sample: N rows that sum to the diagonal, row i the diagonal of sample i alone
 * (micro-batches of 2: rows placed at the part's first sample). */
START_TEST(per_sample_rows_sum_to_the_diagonal)
{
    fx f, g;
    model(&f, _i, 0);
    model(&g, _i, 2);
    cv_block full;
    cv_block_full(&f.m, &full);
    size_t N = cv_curv_batch_size(f.c), D = full.dim;
    for (int k = 0; k < 4; k++) {
        double *a = malloc(sizeof(double) * D), *r = malloc(sizeof(double) * N * D);
        double *r2 = malloc(sizeof(double) * N * D), *s = calloc(D, sizeof(double));
        cv_err e;
        ck_assert_int_eq(cv_curv_diag_backprop(f.c, kinds[k], &full, 0, a, &e), 0);
        ck_assert_int_eq(cv_curv_diag_backprop(f.c, kinds[k], &full, 1, r, &e), 0);
        ck_assert_int_eq(cv_curv_diag_backprop(g.c, kinds[k], &full, 1, r2, &e), 0);
        for (size_t i = 0; i < N; i++)
            for (size_t q = 0; q < D; q++)
                s[q] += r[i * D + q];
        ck_assert_msg(maxrel(s, a, D) < 1e-6, "model %d %s: %g", _i,
                      cv_curvature_name(kinds[k]), maxrel(s, a, D));
        ck_assert_msg(maxrel(r2, r, N * D) < 1e-6, "micro-batched rows: %g",
                      maxrel(r2, r, N * D));
        /* rows differ between samples: not one row repeated */
        ck_assert(maxrel(r, r + D, D) > 1e-3);
        free(a), free(r), free(r2), free(s);
    }
    fx_free(&f);
    fx_free(&g);
}
END_TEST

/* Linear's diag_add (one GEMM for T = 1, per (vector, sample) for T rows) against the
 * generic kernel that squares its per_sample gradients, with k = 3 random cotangents. */
START_TEST(linear_kernel_matches_squared_per_sample_gradients)
{
    int rows = _i % 2 ? 3 : 1, ps = _i / 2, in = 4, out = 5, n = 6, k = 3;
    int dims[] = {rows, in};
    cv_layer L[] = {lin(in, out, 1)};
    cv_model m;
    build(&m, rows > 1 ? 2 : 1, rows > 1 ? dims : dims + 1, L, 1, CV_LOSS_MSE, CV_RED_MEAN, 5);
    size_t xin = (size_t)n * rows * in, yout = (size_t)n * rows * out, P = m.nparams_total;
    float *x = malloc(sizeof(float) * xin), *y = malloc(sizeof(float) * yout);
    float *gy = malloc(sizeof(float) * yout * k);
    cv_rng r;
    cv_rng_seed(&r, 9);
    for (size_t q = 0; q < xin; q++)
        x[q] = (float)(2 * cv_rng_uniform(&r) - 1);
    for (size_t q = 0; q < yout * k; q++)
        gy[q] = (float)(2 * cv_rng_uniform(&r) - 1);
    cv_layer_ctx c = {.L = &m.layers[0], .theta = m.params, .n = n, .in_numel = xin / n,
                      .out_numel = yout / n, .nparam = P, .x = x, .nin = 1, .y = y};
    c.xs[0] = x;
    c.in_numels[0] = c.in_numel;
    cv_err e;
    ck_assert_int_eq(m.layers[0].cls->ops->forward(&c, y, &e), 0);
    size_t len = P * (ps ? (size_t)n : 1);
    double *a = calloc(len, sizeof(double)), *b = calloc(len, sizeof(double));
    ck_assert_int_eq(m.layers[0].cls->ops->diag_add(&c, k, gy, ps, a), 0);
    ck_assert_int_eq(cv_layer_diag_per_sample(&c, k, gy, ps, b), 0);
    ck_assert_msg(maxrel(a, b, len) < 1e-6, "rows %d: %g", rows, maxrel(a, b, len));
    ck_assert(b[len - 1] > 0);
    ck_assert(b[0] > 0);
    free(x), free(y), free(gy), free(a), free(b);
    cv_model_free(&m);
}
END_TEST

/* Embedding's diag_add (distinct ids per sample, their rows' cotangents summed, then
 * squared) against the generic kernel, with repeated ids and (_i = 1) a padding row. */
START_TEST(embedding_kernel_matches_squared_per_sample_gradients)
{
    int V = 7, dm = 3, T = 6, n = 4, k = 2;
    cv_layer L[1];
    cv_layer_init(&L[0], &cv_embedding_class);
    CV_LAYER_ATTR(&L[0], cv_embedding_attr)->num_embeddings = V;
    CV_LAYER_ATTR(&L[0], cv_embedding_attr)->embedding_dim = dm;
    if (_i)
        CV_LAYER_ATTR(&L[0], cv_embedding_attr)->padding_idx = 2;
    int dims[] = {T};
    cv_model m;
    build(&m, 1, dims, L, 1, CV_LOSS_MSE, CV_RED_MEAN, 6);
    size_t P = m.nparams_total, nt = (size_t)n * T;
    float *x = malloc(sizeof(float) * nt), *y = malloc(sizeof(float) * nt * dm);
    float *gy = malloc(sizeof(float) * nt * dm * k);
    cv_rng r;
    cv_rng_seed(&r, 10);
    for (size_t q = 0; q < nt; q++)
        x[q] = (float)((q * 5 + q / T) % 4); /* ids 0..3, repeated within samples */
    for (size_t q = 0; q < nt * dm * k; q++)
        gy[q] = (float)(2 * cv_rng_uniform(&r) - 1);
    cv_layer_ctx c = {.L = &m.layers[0], .theta = m.params, .n = n, .in_numel = (size_t)T,
                      .out_numel = (size_t)T * dm, .nparam = P, .x = x, .nin = 1, .y = y};
    c.xs[0] = x;
    c.in_numels[0] = c.in_numel;
    cv_err e;
    ck_assert_int_eq(m.layers[0].cls->ops->forward(&c, y, &e), 0);
    for (int ps = 0; ps < 2; ps++) {
        size_t len = P * (ps ? (size_t)n : 1);
        double *a = calloc(len, sizeof(double)), *b = calloc(len, sizeof(double));
        ck_assert_int_eq(m.layers[0].cls->ops->diag_add(&c, k, gy, ps, a), 0);
        ck_assert_int_eq(cv_layer_diag_per_sample(&c, k, gy, ps, b), 0);
        ck_assert_msg(maxrel(a, b, len) < 1e-6, "per_sample %d: %g", ps, maxrel(a, b, len));
        ck_assert(b[0] > 0 && (_i ? a[2 * dm] == 0 : a[2 * dm] > 0));
        free(a), free(b);
    }
    free(x), free(y), free(gy);
    cv_model_free(&m);
}
END_TEST

START_TEST(refusals)
{
    fx f;
    model(&f, 0, 0);
    cv_block full;
    cv_block_full(&f.m, &full);
    double *d = malloc(sizeof(double) * full.dim);
    cv_err e;
    ck_assert_int_eq(cv_curv_diag_backprop(f.c, CV_CURV_KFAC, &full, 0, d, &e), -1);
    ck_assert_str_eq(e.code, "unsupported");
    ck_assert_int_eq(cv_diag_backprop_check(&f.m, CV_CURV_GGN, &full, &e), 0);
    /* a tied tensor: the second Linear's weight marked as the first's */
    cv_model m = f.m;
    m.layers[2].params[0].offset = m.layers[0].params[0].offset;
    ck_assert_int_eq(cv_diag_backprop_check(&m, CV_CURV_GGN, &full, &e), -1);
    ck_assert_msg(strstr(e.message, "tied") && strstr(e.message, "layers[0]"), "%s",
                  e.message);
    free(d);
    fx_free(&f);
}
END_TEST

static Suite *diag_exact_suite(void)
{
    Suite *s = suite_create("diag_exact");
    TCase *t = tcase_create("diag_exact");
    tcase_add_loop_test(t, backprop_diagonal_is_the_dense_diagonal, 0, 4);
    tcase_add_loop_test(t, micro_batches_sum_to_the_whole, 0, 4);
    tcase_add_loop_test(t, linear_kernel_matches_squared_per_sample_gradients, 0, 4);
    tcase_add_loop_test(t, per_sample_rows_sum_to_the_diagonal, 0, 4);
    tcase_add_loop_test(t, embedding_kernel_matches_squared_per_sample_gradients, 0, 2);
    tcase_add_test(t, refusals);
    suite_add_tcase(s, t);
    return s;
}

int main(void) { return tu_main(diag_exact_suite); }
