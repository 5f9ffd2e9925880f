/* test_kron.c - the Kronecker factors of engine/kron.c (issue 22):
 *  - N = 1: every Linear block P (B (x) A) P^T equals the exact diagonal
 *    block of the matching curvature (type-2 <-> ggn, mc <-> fisher_mc with
 *    the same seed and mc_samples, empirical <-> ef) for an MLP with and
 *    without biases under CE mean/sum and MSE mean; a Conv2d with a 1 x 1
 *    output (R = 1: expand = reduce = exact), both approximations;
 *  - N > 1 and weight sharing: A and B of both layers of Linear-Tanh-Linear
 *    on [N, 5] and on [N, 3, 4] (R = T = 3) and of Conv2d-Flatten-Linear
 *    (R = 4 output pixels) against the formulas evaluated here in double from
 *    the inputs (recomputed forward, patches by loops) and the cotangents
 *    backpropagated by hand from the loss's own output factor (the Hessian's
 *    square root, the fisher_mc draws of the whole batch, the sample
 *    gradients), expand and reduce;
 *  - micro-batches of 2 and 3 give the factors of one micro-batch;
 *  - blocks without a Kronecker structure (Conv2d groups 2) are listed as
 *    exact. */
#include "kron_fixture.h"

#include "engine/kron.h"
#include "engine/layer_conv.h"
#include "engine/layer_passthrough.h"

#define TOL 1e-5

/* P (B (x) A) P^T in the block's order (dim x dim, symmetric). */
static double *kron_dense(const cv_kron_factor *f)
{
    size_t D = f->block.dim, da = (size_t)f->dim_a;
    ck_assert_uint_eq(D, (size_t)f->dim_a * f->dim_b);
    double *K = malloc(sizeof(double) * D * D);
    for (size_t i = 0; i < D; i++) {
        size_t wi = cv_kron_w_index(f, i);
        for (size_t j = 0; j < D; j++) {
            size_t wj = cv_kron_w_index(f, j);
            K[i * D + j] = f->B[(wi / da) * f->dim_b + wj / da] * f->A[(wi % da) * da + wj % da];
        }
    }
    return K;
}

/* Every factor's Kronecker block equals the exact block of its curvature. */
static void check_exact(fx *f, cv_kron_fisher ft, cv_kron_approx ap, int want_factors,
                        const char *tag)
{
    cv_kron k;
    kron_of(f, ft, ap, &k);
    ck_assert_int_eq(k.nfactors, want_factors);
    ck_assert_int_eq(k.nexact, 0);
    for (int i = 0; i < k.nfactors; i++) {
        const cv_kron_factor *kf = &k.factors[i];
        size_t D = kf->block.dim;
        double *E = malloc(sizeof(double) * D * D), *K = kron_dense(kf);
        cv_err e;
        ck_assert_int_eq(
            cv_curv_dense(f->c, cv_kron_fisher_curvature(ft), &kf->block, 4096, E, &e), 0);
        double err = tu_relerr(K, E, D * D, 1e-12);
        ck_assert_msg(err < TOL, "%s %s %s layer %d: relative error %g (|exact| %g)", tag,
                      cv_kron_fisher_name(ft), cv_kron_approx_name(ap), kf->layer, err,
                      tu_norm(E, D * D));
        free(E);
        free(K);
    }
    cv_kron_free(&k);
}

/* ---- N = 1: the exact blocks ---------------------------------------------------- */

static const cv_loss_type mlp_loss[] = {CV_LOSS_CE, CV_LOSS_CE, CV_LOSS_MSE};
static const cv_reduction mlp_red[] = {CV_RED_MEAN, CV_RED_SUM, CV_RED_MEAN};

/* _i: loss variant * 2 + bias */
START_TEST(mlp_single_sample_equals_exact_blocks)
{
    int bias = _i % 2, dims[] = {5};
    cv_layer Ls[] = {lin(5, 6, bias),  simple(&cv_tanh_class), lin(6, 4, bias),
                     simple(&cv_relu_class), lin(4, 3, bias)};
    fx f;
    fx_make(&f, 1, dims, Ls, 5, mlp_loss[_i / 2], mlp_red[_i / 2], 1, 11 + (uint64_t)_i, 0);
    char tag[32];
    snprintf(tag, sizeof tag, "variant %d", _i);
    for (int ft = 0; ft < 3; ft++)
        check_exact(&f, (cv_kron_fisher)ft, CV_KRON_EXPAND, 3, tag);
    check_exact(&f, CV_KRON_TYPE2, CV_KRON_REDUCE, 3, tag); /* R = 1: the same */
    fx_free(&f);
}
END_TEST

/* Conv2d 2 -> 3 (3 x 3) on [2, 3, 3]: a 1 x 1 output; Tanh, Flatten, Linear. */
START_TEST(conv_one_position_equals_exact_blocks)
{
    int bias = _i % 2, dims[] = {2, 3, 3};
    cv_layer Ls[] = {conv(2, 3, 3, 1, bias), simple(&cv_tanh_class), simple(&cv_flatten_class),
                     lin(3, 4, 1)};
    fx f;
    fx_make(&f, 3, dims, Ls, 4, _i / 2 ? CV_LOSS_MSE : CV_LOSS_CE, CV_RED_MEAN, 1,
            5 + (uint64_t)_i, 0);
    for (int ft = 0; ft < 3; ft++)
        for (int ap = 0; ap < 2; ap++)
            check_exact(&f, (cv_kron_fisher)ft, (cv_kron_approx)ap, 2, "conv");
    fx_free(&f);
}
END_TEST

/* ---- the formulas for N > 1 and weight sharing --------------------------------- */

/* The output factor's vectors: tops[(j*N + n)*C + q] (double) and the weight
 * w of B, as kron.h defines them, from the whole batch's loss state. */
static double *output_vectors(fx *f, cv_kron_fisher ft, int *K, double *w)
{
    const cv_loss_state *ls = cv_curv_loss_state(f->c);
    size_t N = f->d.n, C = (size_t)cv_model_output_dim(&f->m);
    double c = ls->scale;
    double *t;
    if (ft == CV_KRON_TYPE2) {
        *K = (int)C, *w = 1;
        t = malloc(sizeof(double) * C * N * C);
        double *S = malloc(sizeof(double) * C * C);
        for (size_t n = 0; n < N; n++) {
            cv_loss_hessian_sqrt(ls, (int)n, S);
            for (size_t j = 0; j < C; j++)
                for (size_t q = 0; q < C; q++)
                    t[(j * N + n) * C + q] = S[q * C + j];
        }
        free(S);
        return t;
    }
    int M = ft == CV_KRON_MC ? 3 : 1;
    float *s = malloc(sizeof(float) * M * N * C);
    if (ft == CV_KRON_MC)
        cv_loss_sample_mc_at(ls, 77, 0, M, s);
    else
        cv_loss_sample_grad(ls, s);
    *K = M, *w = c / M;
    t = malloc(sizeof(double) * M * N * C);
    for (size_t q = 0; q < M * N * C; q++)
        t[q] = s[q];
    free(s);
    return t;
}

/* Reference A, B from per-position inputs a[(n*R + r)*da] (with the 1 of
 * the bias) and cotangents b[((j*N + n)*R + r)*db]. */
static void ref_factors(size_t N, int R, int K, int da, int db, const double *a,
                        const double *b, double w, cv_kron_approx ap, double *A, double *B)
{
    memset(A, 0, sizeof(double) * da * da);
    memset(B, 0, sizeof(double) * db * db);
    double *v = malloc(sizeof(double) * (da > db ? da : db));
    for (size_t n = 0; n < N; n++) {
        if (ap == CV_KRON_EXPAND) {
            for (int r = 0; r < R; r++)
                for (int p = 0; p < da; p++)
                    for (int q = 0; q < da; q++)
                        A[p * da + q] += a[(n * R + r) * da + p] * a[(n * R + r) * da + q] /
                                         ((double)N * R);
        } else {
            for (int p = 0; p < da; p++) {
                v[p] = 0;
                for (int r = 0; r < R; r++)
                    v[p] += a[(n * R + r) * da + p] / R;
            }
            for (int p = 0; p < da; p++)
                for (int q = 0; q < da; q++)
                    A[p * da + q] += v[p] * v[q] / (double)N;
        }
        for (int j = 0; j < K; j++) {
            const double *bj = b + ((size_t)j * N + n) * R * db;
            if (ap == CV_KRON_EXPAND) {
                for (int r = 0; r < R; r++)
                    for (int p = 0; p < db; p++)
                        for (int q = 0; q < db; q++)
                            B[p * db + q] += w * bj[r * db + p] * bj[r * db + q];
                continue;
            }
            for (int p = 0; p < db; p++) {
                v[p] = 0;
                for (int r = 0; r < R; r++)
                    v[p] += bj[r * db + p];
            }
            for (int p = 0; p < db; p++)
                for (int q = 0; q < db; q++)
                    B[p * db + q] += w * v[p] * v[q];
        }
    }
    free(v);
}

static void compare_factor(const cv_kron_factor *kf, const double *A, const double *B,
                           const char *tag)
{
    size_t da = (size_t)kf->dim_a, db = (size_t)kf->dim_b;
    double ea = tu_relerr(kf->A, A, da * da, 1e-12), eb = tu_relerr(kf->B, B, db * db, 1e-12);
    ck_assert_msg(ea < TOL && eb < TOL, "%s layer %d: A error %g, B error %g", tag, kf->layer,
                  ea, eb);
}

static const float *param(const cv_model *m, int l, int i)
{
    return m->params + m->layers[l].params[i].offset;
}

/* Linear(in, H) - Tanh - Linear(H, O) on [T, in] rows: both layers' pieces
 * by hand, compared with the engine's for every fisher type and approx. */
static void check_two_linear(fx *f, int T, int in, int H, int O, int bias, const char *tag)
{
    size_t N = f->d.n, C = (size_t)T * O;
    const float *W1 = param(&f->m, 0, 0), *W2 = param(&f->m, 2, 0);
    const float *b1 = bias ? param(&f->m, 0, 1) : NULL, *b2 = bias ? param(&f->m, 2, 1) : NULL;
    int da1 = in + bias, da2 = H + bias;
    double *a1 = malloc(sizeof(double) * N * T * da1), *a2 = malloc(sizeof(double) * N * T * da2);
    for (size_t n = 0; n < N; n++)
        for (int r = 0; r < T; r++) {
            const float *x = f->d.x + (n * T + r) * in;
            double *p1 = a1 + (n * T + r) * da1, *p2 = a2 + (n * T + r) * da2;
            for (int q = 0; q < in; q++)
                p1[q] = x[q];
            for (int h = 0; h < H; h++) {
                double z = b1 ? b1[h] : 0;
                for (int q = 0; q < in; q++)
                    z += (double)W1[h * in + q] * x[q];
                p2[h] = tanh(z);
            }
            if (bias)
                p1[in] = p2[H] = 1;
        }
    /* the engine's outputs are the forward pass recomputed here */
    for (size_t n = 0; n < N; n++)
        for (int r = 0; r < T; r++)
            for (int o = 0; o < O; o++) {
                double h = b2 ? b2[o] : 0;
                for (int q = 0; q < H; q++)
                    h += (double)W2[o * H + q] * a2[(n * T + r) * da2 + q];
                ck_assert(fabs(h - cv_curv_outputs(f->c)[n * C + r * O + o]) < 1e-5);
            }
    for (int ft = 0; ft < 3; ft++) {
        int K;
        double w;
        double *t = output_vectors(f, (cv_kron_fisher)ft, &K, &w);
        double *g1 = malloc(sizeof(double) * K * N * T * H); /* cotangents of layer 0's z */
        for (size_t jn = 0; jn < (size_t)K * N; jn++)
            for (int r = 0; r < T; r++)
                for (int h = 0; h < H; h++) {
                    double s = 0;
                    for (int o = 0; o < O; o++)
                        s += (double)W2[o * H + h] * t[jn * C + r * O + o];
                    double y = a2[((jn % N) * T + r) * da2 + h];
                    g1[(jn * T + r) * H + h] = s * (1 - y * y);
                }
        for (int ap = 0; ap < 2; ap++) {
            cv_kron k;
            kron_of(f, (cv_kron_fisher)ft, (cv_kron_approx)ap, &k);
            ck_assert_int_eq(k.nfactors, 2);
            ck_assert_int_eq(k.factors[0].layer, 0);
            ck_assert_int_eq(k.factors[1].layer, 2);
            double *A = malloc(sizeof(double) * da2 * da2 * 4), *B = malloc(sizeof(double) * 64);
            char s[96];
            snprintf(s, sizeof s, "%s %s %s", tag, cv_kron_fisher_name(ft),
                     cv_kron_approx_name(ap));
            ref_factors(N, T, K, da1, H, a1, g1, w, (cv_kron_approx)ap, A, B);
            compare_factor(&k.factors[0], A, B, s);
            ref_factors(N, T, K, da2, O, a2, t, w, (cv_kron_approx)ap, A, B);
            compare_factor(&k.factors[1], A, B, s);
            free(A);
            free(B);
            cv_kron_free(&k);
        }
        free(g1);
        free(t);
    }
    free(a1);
    free(a2);
}

/* _i: loss variant (CE mean, CE sum, MSE mean) * 2 + bias; N = 6 */
START_TEST(mlp_batch_matches_formulas)
{
    int bias = _i % 2, dims[] = {5};
    cv_layer Ls[] = {lin(5, 4, bias), simple(&cv_tanh_class), lin(4, 3, bias)};
    fx f;
    fx_make(&f, 1, dims, Ls, 3, mlp_loss[_i / 2], mlp_red[_i / 2], 6, 21 + (uint64_t)_i, 0);
    check_two_linear(&f, 1, 5, 4, 3, bias, "mlp");
    fx_free(&f);
}
END_TEST

/* Linear on [N, 3, 4] rows (R = T = 3), MSE (mean / sum) over the [3, 2] output. */
START_TEST(linear_rows_match_formulas)
{
    int bias = _i % 2, dims[] = {3, 4};
    cv_layer Ls[] = {lin(4, 5, bias), simple(&cv_tanh_class), lin(5, 2, bias)};
    fx f;
    fx_make(&f, 2, dims, Ls, 3, CV_LOSS_MSE, (cv_reduction)(_i / 2), 5, 41 + (uint64_t)_i, 0);
    check_two_linear(&f, 3, 4, 5, 2, bias, "rows");
    fx_free(&f);
}
END_TEST

/* Conv2d(2 -> 3, 3 x 3) on [2, 4, 4]: R = 4 output pixels; Flatten, Linear(12, 3).
 * The conv layer's patches by loops and its cotangents W_lin^T t by hand. */
START_TEST(conv_positions_match_formulas)
{
    int bias = _i % 2, dims[] = {2, 4, 4}, Ci = 2, Co = 3, P = 4, O = 3, KK = Ci * 9;
    cv_layer Ls[] = {conv(Ci, Co, 3, 1, bias), simple(&cv_flatten_class), lin(Co * P, O, 1)};
    fx f;
    fx_make(&f, 3, dims, Ls, 3, _i / 2 ? CV_LOSS_MSE : CV_LOSS_CE, CV_RED_MEAN, 4,
            61 + (uint64_t)_i, 0);
    size_t N = f.d.n;
    int da = KK + bias;
    double *a = malloc(sizeof(double) * N * P * da);
    for (size_t n = 0; n < N; n++)
        for (int oy = 0; oy < 2; oy++)
            for (int ox = 0; ox < 2; ox++) {
                double *pa = a + (n * P + oy * 2 + ox) * da;
                for (int c = 0; c < Ci; c++)
                    for (int i = 0; i < 3; i++)
                        for (int j = 0; j < 3; j++)
                            pa[(c * 3 + i) * 3 + j] = f.d.x[n * 32 + c * 16 + (oy + i) * 4 + ox + j];
                if (bias)
                    pa[KK] = 1;
            }
    const float *Wl = param(&f.m, 2, 0);
    for (int ft = 0; ft < 3; ft++) {
        int K;
        double w;
        double *t = output_vectors(&f, (cv_kron_fisher)ft, &K, &w);
        double *g = malloc(sizeof(double) * K * N * P * Co);
        for (size_t jn = 0; jn < (size_t)K * N; jn++)
            for (int o = 0; o < Co; o++)
                for (int p = 0; p < P; p++) {
                    double s = 0;
                    for (int q = 0; q < O; q++)
                        s += (double)Wl[q * Co * P + o * P + p] * t[jn * O + q];
                    g[(jn * P + p) * Co + o] = s;
                }
        for (int ap = 0; ap < 2; ap++) {
            cv_kron k;
            kron_of(&f, (cv_kron_fisher)ft, (cv_kron_approx)ap, &k);
            ck_assert_int_eq(k.nfactors, 2);
            ck_assert_int_eq(k.factors[0].dim_a, da);
            double *A = malloc(sizeof(double) * da * da), *B = malloc(sizeof(double) * Co * Co);
            char s[64];
            snprintf(s, sizeof s, "conv %s %s", cv_kron_fisher_name(ft), cv_kron_approx_name(ap));
            ref_factors(N, P, K, da, Co, a, g, w, (cv_kron_approx)ap, A, B);
            compare_factor(&k.factors[0], A, B, s);
            free(A);
            free(B);
            cv_kron_free(&k);
        }
        free(g);
        free(t);
    }
    free(a);
    fx_free(&f);
}
END_TEST

/* ---- micro-batches, exact blocks ---------------------------------------------- */

static void assert_same_kron(const cv_kron *x, const cv_kron *y, const char *tag)
{
    ck_assert_int_eq(x->nfactors, y->nfactors);
    for (int i = 0; i < x->nfactors; i++)
        compare_factor(&x->factors[i], y->factors[i].A, y->factors[i].B, tag);
}

/* _i: 0 Linear rows, 1 conv; N = 7, micro-batches of 2 and 3 */
START_TEST(micro_batches_give_the_same_factors)
{
    int rows[] = {3, 4}, img[] = {2, 4, 4};
    cv_layer Lr[] = {lin(4, 5, 1), simple(&cv_tanh_class), lin(5, 2, 1)};
    cv_layer Lc[] = {conv(2, 3, 3, 1, 1), simple(&cv_tanh_class), simple(&cv_flatten_class),
                     lin(12, 3, 1)};
    fx one, mb[2];
    size_t sizes[] = {2, 3};
    for (int v = 0; v < 3; v++) {
        fx *f = v ? &mb[v - 1] : &one;
        if (_i == 0)
            fx_make(f, 2, rows, Lr, 3, CV_LOSS_MSE, CV_RED_MEAN, 7, 3, v ? sizes[v - 1] : 0);
        else
            fx_make(f, 3, img, Lc, 4, CV_LOSS_CE, CV_RED_MEAN, 7, 3, v ? sizes[v - 1] : 0);
    }
    cv_curv_plan p;
    cv_curv_memory(mb[0].c, &p);
    ck_assert_uint_eq(p.micro_batches, 4);
    for (int ft = 0; ft < 3; ft++)
        for (int ap = 0; ap < 2; ap++) {
            cv_kron k0, k1;
            kron_of(&one, (cv_kron_fisher)ft, (cv_kron_approx)ap, &k0);
            for (int v = 0; v < 2; v++) {
                kron_of(&mb[v], (cv_kron_fisher)ft, (cv_kron_approx)ap, &k1);
                ck_assert_int_eq(k1.columns, k0.columns);
                assert_same_kron(&k1, &k0, "micro-batches");
                cv_kron_free(&k1);
            }
            cv_kron_free(&k0);
        }
    fx_free(&one);
    fx_free(&mb[0]);
    fx_free(&mb[1]);
}
END_TEST

/* A grouped Conv2d has no Kronecker structure here: its block is exact. */
START_TEST(grouped_conv_block_is_exact)
{
    int img[] = {2, 4, 4};
    cv_layer Ls[] = {conv(2, 4, 3, 2, 1), simple(&cv_flatten_class), lin(16, 3, 1)};
    fx f;
    fx_make(&f, 3, img, Ls, 3, CV_LOSS_CE, CV_RED_SUM, 3, 9, 0);
    cv_kron k;
    kron_of(&f, CV_KRON_TYPE2, CV_KRON_EXPAND, &k);
    ck_assert_int_eq(k.nfactors, 1);
    ck_assert_int_eq(k.factors[0].layer, 2);
    ck_assert_int_eq(k.nexact, 1);
    ck_assert_int_eq(k.exact[0].count, 2);
    ck_assert_int_eq(k.exact[0].idx[0], 0);
    ck_assert_int_eq(k.columns, 3);
    cv_kron_free(&k);
    cv_kron_options bad = {(cv_kron_fisher)7, CV_KRON_EXPAND, 0, 0};
    cv_err e;
    ck_assert_int_eq(cv_curv_kron(f.c, &bad, &k, &e), -1);
    cv_kron_free(&k);
    fx_free(&f);
}
END_TEST

/* A per-layer block spanning several layers (one module name, as an expanded
 * MultiheadAttention's in_proj and out_proj): each Kronecker layer in it is
 * a factor of its own (its tensors, named after its weight), the other
 * tensors an exact block named as the module; N = 1 and R = 1: the last
 * layer's factor is its exact block. */
START_TEST(block_spanning_layers_splits)
{
    int img[] = {2, 4, 4};
    cv_layer Ls[] = {lin(4, 4, 1), conv(2, 4, 3, 2, 1), simple(&cv_flatten_class),
                     lin(16, 3, 1)};
    fx f;
    fx_make(&f, 3, img, Ls, 4, CV_LOSS_CE, CV_RED_SUM, 1, 13, 0);
    static const int in_m[] = {0, 1, 3};
    for (int i = 0; i < 3; i++)
        snprintf(f.m.layers[in_m[i]].module, sizeof f.m.layers[0].module, "m");
    cv_block bl[4];
    ck_assert_int_eq(cv_blocks_per_layer(&f.m, bl, 4), 1);
    ck_assert_int_eq(bl[0].count, 6);
    cv_kron k;
    kron_of(&f, CV_KRON_TYPE2, CV_KRON_EXPAND, &k);
    ck_assert_int_eq(k.nfactors, 2);
    ck_assert_int_eq(k.nexact, 1);
    static const int want_layer[] = {0, 3}, want_first[] = {0, 4};
    for (int i = 0; i < 2; i++) {
        const cv_kron_factor *kf = &k.factors[i];
        ck_assert_int_eq(kf->layer, want_layer[i]);
        ck_assert_int_eq(kf->block.count, 2);
        ck_assert_int_eq(kf->block.idx[0], want_first[i]);
        ck_assert_int_eq(kf->block.idx[1], want_first[i] + 1);
        ck_assert_str_eq(kf->block.name, i ? "3" : "0"); /* "3.weight" without ".weight" */
    }
    ck_assert_int_eq(k.exact[0].count, 2);
    ck_assert_int_eq(k.exact[0].idx[0], 2);
    ck_assert_int_eq(k.exact[0].idx[1], 3);
    ck_assert_str_eq(k.exact[0].name, "m");
    const cv_kron_factor *kf = &k.factors[1];
    size_t D = kf->block.dim;
    double *E = malloc(sizeof(double) * D * D), *K = kron_dense(kf);
    cv_err e;
    ck_assert_int_eq(cv_curv_dense(f.c, CV_CURV_GGN, &kf->block, 4096, E, &e), 0);
    double err = tu_relerr(K, E, D * D, 1e-12);
    ck_assert_msg(err < TOL, "factor of layer 3: relative error %g", err);
    free(E);
    free(K);
    cv_kron_free(&k);
    fx_free(&f);
}
END_TEST

static Suite *kron_suite(void)
{
    Suite *s = suite_create("kron");
    TCase *t = tcase_create("kron");
    tcase_add_loop_test(t, mlp_single_sample_equals_exact_blocks, 0, 6);
    tcase_add_loop_test(t, conv_one_position_equals_exact_blocks, 0, 4);
    tcase_add_loop_test(t, mlp_batch_matches_formulas, 0, 6);
    tcase_add_loop_test(t, linear_rows_match_formulas, 0, 4);
    tcase_add_loop_test(t, conv_positions_match_formulas, 0, 4);
    tcase_add_loop_test(t, micro_batches_give_the_same_factors, 0, 2);
    tcase_add_test(t, grouped_conv_block_is_exact);
    tcase_add_test(t, block_spanning_layers_splits);
    suite_add_tcase(s, t);
    return s;
}

int main(void) { return tu_main(kron_suite); }
