/* test_curv.c - curvature products of engine/curv.c against independent
 * oracles: finite differences of the loss, of the gradient and of the network
 * outputs (J), dense J^T Lambda J, and identities (symmetry, PSD, GGN = H for
 * linear+MSE, equal diagonal blocks for ReLU nets, MC Fisher -> GGN). */
#include "testutil.h"

#include "engine/layer.h"
#include "engine/layer_passthrough.h"
#include "engine/loss.h"

typedef tu_fixture fixture;

static const tu_layer smooth_net[] = {
    {&cv_linear_class, 6},  {&cv_tanh_class, 0},   {&cv_linear_class, 4},
    {&cv_sigmoid_class, 0}, {&cv_linear_class, 3}};

extern const cv_layer_class cv_silu_class; /* engine/layer_silu.c (no header) */

static const cv_layer_class *const acts[] = {
    &cv_tanh_class,     &cv_sigmoid_class,   &cv_elu_class,  &cv_gelu_class,
    &cv_softplus_class, &cv_leakyrelu_class, &cv_relu_class, &cv_identity_class,
    &cv_silu_class};

/* ReLU / LeakyReLU: kinks, so finite differences are looser */
static int piecewise_linear(const cv_layer_class *cls)
{
    return cls == &cv_relu_class || cls == &cv_leakyrelu_class;
}
static const cv_loss_type losses[] = {CV_LOSS_MSE, CV_LOSS_CE, CV_LOSS_BCE};

/* _i: activation index * 6 + loss index * 2 + reduction */
static void make_variant(fixture *f, int i)
{
    tu_layer net[] = {{&cv_linear_class, 6}, {acts[i / 6], 0}, {&cv_linear_class, 4},
                      {acts[i / 6], 0},      {&cv_linear_class, 3}};
    tu_fx_make(f, 5, net, 5, losses[(i / 2) % 3], (cv_reduction)(i % 2), 7, 17 + (uint64_t)i, NULL);
}

/* _i = variant * TU_NORACLES + oracle: finite differences of the gradient,
 * of H v and of the GGN, symmetry/PSD, per-sample gradients and the EF. */
START_TEST(variant_matches_oracles)
{
    int v = _i / TU_NORACLES;
    fixture f;
    make_variant(&f, v);
    /* ReLU / LeakyReLU kinks can sit within eps of a sample: looser there */
    int kinks = piecewise_linear(acts[v / 6]);
    tu_fd_bounds fd = {2e-3, kinks ? 2e-2 : 2e-3, 3e-3, kinks ? 3e-2 : 3e-3, 3};
    tu_check_oracle(&f, (tu_oracle)(_i % TU_NORACLES), &fd, v);
    tu_fx_free(&f);
}
END_TEST

START_TEST(ggn_equals_hessian_for_linear_mse)
{
    fixture f;
    tu_layer net[] = {{&cv_linear_class, 4}};
    tu_fx_make(&f, 6, net, 1, CV_LOSS_MSE, CV_RED_MEAN, 9, 5, NULL);
    size_t D = f.full.dim;
    double *H = tu_dense(&f, CV_CURV_HESSIAN, &f.full), *G = tu_dense(&f, CV_CURV_GGN, &f.full);
    double err = tu_relerr(H, G, D * D, 1e-9);
    ck_assert_msg(err < 1e-6, "GGN != H for linear MSE: %g", err);
    free(H);
    free(G);
    tu_fx_free(&f);
}
END_TEST

START_TEST(relu_net_hessian_and_ggn_diagonal_blocks_agree)
{
    fixture f;
    tu_layer net[] = {{&cv_linear_class, 6}, {&cv_relu_class, 0}, {&cv_linear_class, 5},
                      {&cv_relu_class, 0},   {&cv_linear_class, 3}};
    tu_fx_make(&f, 4, net, 5, CV_LOSS_CE, CV_RED_MEAN, 11, 8, NULL);
    size_t D = f.full.dim;
    double *H = tu_dense(&f, CV_CURV_HESSIAN, &f.full), *G = tu_dense(&f, CV_CURV_GGN, &f.full);
    double trh = 0, trg = 0, offdiff = 0, blockdiff = 0, mx = 0;
    for (size_t i = 0; i < D; i++) {
        trh += H[i + i * D];
        trg += G[i + i * D];
    }
    /* per-layer blocks (weight+bias of each Linear) */
    cv_block blocks[8];
    int nb = cv_blocks_per_layer(&f.m, blocks, 8);
    ck_assert_int_eq(nb, 3);
    size_t start = 0;
    for (int b = 0; b < nb; b++) {
        for (size_t i = start; i < start + blocks[b].dim; i++)
            for (size_t j = start; j < start + blocks[b].dim; j++) {
                blockdiff = fmax(blockdiff, fabs(H[i + j * D] - G[i + j * D]));
                mx = fmax(mx, fabs(G[i + j * D]));
            }
        start += blocks[b].dim;
    }
    for (size_t i = 0; i < D * D; i++)
        offdiff = fmax(offdiff, fabs(H[i] - G[i]));
    ck_assert_msg(fabs(trh - trg) <= 1e-5 * fabs(trg), "tr H %g vs tr G %g", trh, trg);
    ck_assert_msg(blockdiff <= 1e-5 * mx, "diagonal blocks differ by %g", blockdiff);
    /* and the identity is not vacuous: the off-diagonal blocks do differ */
    ck_assert_msg(offdiff > 1e-3 * mx, "H == G everywhere? %g", offdiff);
    free(H);
    free(G);
    tu_fx_free(&f);
}
END_TEST

/* ||F - G|| / ||G|| for the dense MC Fisher (options o) and the GGN of
 * smooth_net (4 inputs, loss, seed) on n samples (seed dseed). */
static double mc_fisher_vs_ggn(cv_loss_type loss, uint64_t seed, size_t n, uint64_t dseed,
                               cv_curv_options o)
{
    fixture f;
    tu_model(&f.m, 4, smooth_net, 5, loss, CV_RED_MEAN, seed);
    tu_data(&f.d, &f.m, n, dseed);
    cv_err e;
    f.c = cv_curv_new(&f.m, &f.d, &o, &e);
    cv_block_full(&f.m, &f.full);
    size_t D = f.full.dim;
    double *F = tu_dense(&f, CV_CURV_FISHER_MC, &f.full);
    double *G = tu_dense(&f, CV_CURV_GGN, &f.full);
    double err = tu_relerr(F, G, D * D, 1e-9);
    free(F);
    free(G);
    tu_fx_free(&f);
    return err;
}

START_TEST(mc_fisher_converges_to_ggn)
{
    double errs[2];
    int samples[2] = {1, 4000};
    for (int s = 0; s < 2; s++)
        errs[s] = mc_fisher_vs_ggn(CV_LOSS_CE, 21, 6, 22, (cv_curv_options){.mc_samples = samples[s], .seed = 99});
    ck_assert_msg(errs[1] < 0.05, "MC Fisher (4000 samples) vs GGN rel err %g", errs[1]);
    ck_assert_msg(errs[0] > 4 * errs[1], "no convergence: %g -> %g", errs[0], errs[1]);
}
END_TEST

START_TEST(mc_fisher_mse_and_bce_converge)
{
    for (int li = 0; li < 2; li++) {
        double err = mc_fisher_vs_ggn(li ? CV_LOSS_BCE : CV_LOSS_MSE, 31, 5, 32,
                                      (cv_curv_options){.mc_samples = 4000, .seed = 7});
        ck_assert_msg(err < 0.06, "loss %d: MC Fisher vs GGN rel err %g", li, err);
    }
}
END_TEST

START_TEST(blocks_are_submatrices_and_batched_equals_single)
{
    fixture f;
    tu_fx_make(&f, 5, smooth_net, 5, CV_LOSS_CE, CV_RED_SUM, 8, 41, NULL);
    size_t D = f.full.dim;
    double *H = tu_dense(&f, CV_CURV_HESSIAN, &f.full);
    /* block {2.weight, 0.bias}: indices 2 and 1 */
    int idx[2] = {2, 1};
    cv_block b;
    cv_err e;
    ck_assert_int_eq(cv_block_from_indices(&f.m, idx, 2, &b, &e), 0);
    const cv_tensor_info *t1 = cv_model_param(&f.m, 1), *t2 = cv_model_param(&f.m, 2);
    ck_assert_uint_eq(b.dim, t1->numel + t2->numel);
    size_t pos[64], np = 0;
    for (size_t q = 0; q < t1->numel; q++)
        pos[np++] = t1->offset + q;
    for (size_t q = 0; q < t2->numel; q++)
        pos[np++] = t2->offset + q;
    double *Hb = malloc(sizeof(double) * np * np);
    ck_assert_int_eq(cv_curv_dense(f.c, CV_CURV_HESSIAN, &b, 4096, Hb, &e), 0);
    for (size_t i = 0; i < np; i++)
        for (size_t j = 0; j < np; j++)
            ck_assert_msg(fabs(Hb[i + j * np] - H[pos[i] + pos[j] * D]) <=
                              1e-5 * (1 + fabs(H[pos[i] + pos[j] * D])),
                          "block entry (%zu,%zu)", i, j);
    /* 40 vectors at once (more than one internal chunk) == one at a time */
    int k = 40;
    double *X = malloc(sizeof(double) * D * k), *Y = malloc(sizeof(double) * D * k);
    double *y1 = malloc(sizeof(double) * D);
    cv_rng r;
    cv_rng_seed(&r, 1);
    cv_rng_gaussian(&r, X, D * k);
    ck_assert_int_eq(cv_curv_matvec(f.c, CV_CURV_GGN, &f.full, k, X, Y, &e), 0);
    for (int j = 0; j < k; j++) {
        ck_assert_int_eq(cv_curv_matvec(f.c, CV_CURV_GGN, &f.full, 1, X + j * D, y1, &e), 0);
        ck_assert_msg(tu_relerr(Y + j * D, y1, D, 1e-9) < 1e-6, "column %d", j);
    }
    free(H); free(Hb); free(X); free(Y); free(y1);
    tu_fx_free(&f);
}
END_TEST

/* x^T A x from one forward-mode pass equals x . (A x) for every curvature,
 * on the full net, each layer's block and a block spanning two layers. */
START_TEST(quadform_equals_dot_of_product)
{
    fixture f;
    make_variant(&f, _i);
    cv_block b[CV_MAX_LAYERS + 2];
    int nb = cv_blocks_per_layer(&f.m, b, CV_MAX_LAYERS);
    int idx[2] = {2, 1};
    cv_err e;
    ck_assert_int_eq(cv_block_from_indices(&f.m, idx, 2, &b[nb++], &e), 0);
    b[nb++] = f.full;
    char tag[64];
    for (int i = 0; i < nb; i++) {
        snprintf(tag, sizeof tag, "variant %d block %d", _i, i);
        double d = tu_check_quadforms(f.c, &b[i], i == nb - 1 ? 40 : 3, 5 + (uint64_t)i, tag);
        /* the full net's Hessian has bilinear cross-layer terms the GGN lacks */
        if (i == nb - 1)
            ck_assert_msg(d > 1e-4, "variant %d: Hessian form equals the GGN's (%g)", _i, d);
    }
    tu_fx_free(&f);
}
END_TEST

START_TEST(dense_refused_above_limit)
{
    fixture f;
    tu_fx_make(&f, 5, smooth_net, 5, CV_LOSS_CE, CV_RED_MEAN, 4, 2, NULL);
    double A[4];
    cv_err e;
    ck_assert_int_eq(cv_curv_dense(f.c, CV_CURV_GGN, &f.full, 10, A, &e), -1);
    ck_assert_int_eq(e.status, CV_ETOOLARGE);
    ck_assert_ptr_nonnull(strstr(e.message, "dense limit"));
    tu_fx_free(&f);
}
END_TEST

START_TEST(loss_values_match_closed_forms)
{
    /* one sample, identity-like net: Linear 2->2 with W = I, b = 0 */
    cv_model m;
    tu_layer net[] = {{&cv_linear_class, 2}};
    for (int li = 0; li < 3; li++) {
        tu_model(&m, 2, net, 1, losses[li], CV_RED_MEAN, 1);
        float p[6] = {1, 0, 0, 1, 0, 0};
        memcpy(m.params, p, sizeof p);
        cv_dataset d;
        tu_data(&d, &m, 1, 3);
        d.x[0] = 0.5f;
        d.x[1] = -1.0f;
        if (d.labels)
            d.labels[0] = 1;
        else {
            d.targets[0] = 0.25f;
            d.targets[1] = 1.0f;
        }
        cv_err e;
        cv_curv *c = cv_curv_new(&m, &d, NULL, &e);
        double want;
        if (li == 0)
            want = (0.25 * 0.25 + 2.0 * 2.0) / 2;
        else if (li == 1)
            want = log(exp(0.5) + exp(-1.0)) + 1.0;
        else
            want = ((log1p(exp(-0.5)) + 0.5 - 0.5 * 0.25) + (log1p(exp(-1.0)) + 1.0)) / 2;
        ck_assert_msg(fabs(cv_curv_loss(c) - want) < 1e-6, "loss %d: %g vs %g", li,
                      cv_curv_loss(c), want);
        cv_curv_free(c);
        tu_data_free(&d);
        cv_model_free(&m);
    }
}
END_TEST

/* SiLU's forward kernel: phi(x) = x / (1 + exp(-x)) in closed form, phi' and
 * phi'' (its caches) against central differences of that closed form. */
static double silu_ref(double x) { return x / (1.0 + exp(-x)); }

START_TEST(silu_matches_closed_form)
{
    float x[] = {-30.0f, -6.5f, -2.0f, -1.0f, -0.25f, 0.0f, 0.125f, 0.5f, 1.5f, 3.0f, 8.0f, 40.0f};
    int n = (int)(sizeof x / sizeof x[0]);
    float y[sizeof x / sizeof x[0]];
    cv_layer L;
    cv_layer_init(&L, &cv_silu_class);
    cv_layer_ctx c;
    memset(&c, 0, sizeof c);
    c.L = &L;
    c.n = n;
    c.in_numel = c.out_numel = 1;
    c.x = x;
    cv_err e;
    ck_assert_int_eq(cv_silu_class.ops->forward(&c, y, &e), 0);
    ck_assert_ptr_nonnull(c.d2);
    const double h = 1e-3;
    for (int i = 0; i < n; i++) {
        double xi = x[i], f = silu_ref(xi);
        double d1 = (silu_ref(xi + h) - silu_ref(xi - h)) / (2 * h);
        double d2 = (silu_ref(xi + h) - 2 * f + silu_ref(xi - h)) / (h * h);
        ck_assert_msg(fabs(y[i] - f) <= 1e-6 * (1 + fabs(f)), "phi(%g) = %.9g, want %.9g", xi,
                      y[i], f);
        ck_assert_msg(fabs(c.d1[i] - d1) <= 1e-5, "phi'(%g) = %.9g, want %.9g", xi, c.d1[i], d1);
        ck_assert_msg(fabs(c.d2[i] - d2) <= 1e-4, "phi''(%g) = %.9g, want %.9g", xi, c.d2[i], d2);
    }
    ck_assert(c.d1[5] == 0.5f && c.d2[5] == 0.5f); /* at 0: 1/2 and 2 * 1/4 */
    cv_layer_ctx_release(&c);
}
END_TEST

START_TEST(jvp_vjp_adjoint_and_gram)
{
    fixture f;
    tu_fx_make(&f, 5, smooth_net, 5, CV_LOSS_CE, CV_RED_MEAN, 6, 51, NULL);
    int k = 2;
    int idx[1] = {2};
    cv_block part;
    cv_err e;
    ck_assert_int_eq(cv_block_from_indices(&f.m, idx, 1, &part, &e), 0);
    const cv_block *blocks[2] = {&f.full, &part};
    for (int bi = 0; bi < 2; bi++) {
        char tag[32];
        snprintf(tag, sizeof tag, "block %d", bi);
        tu_check_adjoint(&f, blocks[bi], k, 9, tag);
        /* Gram vs explicit per-(j, n) gradients from one-sample cotangents */
        tu_check_gram(&f, blocks[bi], k, 0.0, tag);
    }
    tu_fx_free(&f);
}
END_TEST

static Suite *curv_suite(void)
{
    Suite *s = suite_create("curv");
    TCase *fd = tcase_create("oracles");
    tcase_set_timeout(fd, 120);
    int nvar = (int)(sizeof acts / sizeof acts[0]) * 6;
    tcase_add_loop_test(fd, variant_matches_oracles, 0, nvar * TU_NORACLES);
    suite_add_tcase(s, fd);
    TCase *id = tcase_create("identities");
    tcase_set_timeout(id, 120);
    tcase_add_test(id, ggn_equals_hessian_for_linear_mse);
    tcase_add_test(id, relu_net_hessian_and_ggn_diagonal_blocks_agree);
    tcase_add_test(id, mc_fisher_converges_to_ggn);
    tcase_add_test(id, mc_fisher_mse_and_bce_converge);
    tcase_add_test(id, blocks_are_submatrices_and_batched_equals_single);
    tcase_add_test(id, dense_refused_above_limit);
    tcase_add_loop_test(id, quadform_equals_dot_of_product, 0, nvar);
    tcase_add_test(id, loss_values_match_closed_forms);
    tcase_add_test(id, silu_matches_closed_form);
    tcase_add_test(id, jvp_vjp_adjoint_and_gram);
    suite_add_tcase(s, id);
    return s;
}

int main(void) { return tu_main(curv_suite); }
