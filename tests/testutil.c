/* testutil.c - the Check runner every test binary's main() calls, and the
 * independent oracles the curvature tests share: a model/dataset/cv_curv
 * fixture, finite differences of the loss, the gradient and the outputs,
 * dense blocks, Lambda_n from the outputs, the symmetry/PSD check.  API in
 * testutil.h. */
#include "testutil.h"

#include "api/arch.h"
#include "engine/loss.h"

int tu_main(Suite *(*make)(void))
{
    SRunner *sr = srunner_create(make());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

/* ---- the fixture ------------------------------------------------------------ */

void tu_fx_make(tu_fixture *f, int in, const tu_layer *layers, int nl, cv_loss_type loss,
                cv_reduction red, size_t n, uint64_t seed, const cv_curv_options *co)
{
    tu_model(&f->m, in, layers, nl, loss, red, seed);
    tu_data(&f->d, &f->m, n, seed + 100);
    cv_err e;
    f->c = cv_curv_new(&f->m, &f->d, co, &e);
    ck_assert_msg(f->c != NULL, "cv_curv_new: %s", e.message);
    cv_block_full(&f->m, &f->full);
    f->kinks = 0;
}

void tu_fx_free(tu_fixture *f)
{
    cv_curv_free(f->c);
    cv_model_free(&f->m);
    tu_data_free(&f->d);
}

double *tu_dense(tu_fixture *f, cv_curvature kind, const cv_block *b)
{
    double *A = malloc(sizeof(double) * b->dim * b->dim);
    cv_err e;
    ck_assert_int_eq(cv_curv_dense(f->c, kind, b, 4096, A, &e), 0);
    return A;
}

/* ---- finite differences ----------------------------------------------------- */

/* Gradient (full block) of f's loss at theta + step. */
static void grad_at(const tu_fixture *f, const double *step, double *g)
{
    cv_model t;
    ck_assert_int_eq(cv_model_clone(&f->m, &t), 0);
    for (size_t i = 0; i < t.nparams_total; i++)
        t.params[i] += (float)step[i];
    cv_err e;
    cv_curv *c = cv_curv_new(&t, &f->d, NULL, &e);
    ck_assert_ptr_nonnull(c);
    ck_assert_int_eq(cv_curv_gradient(c, &f->full, g, &e), 0);
    cv_curv_free(c);
    cv_model_free(&t);
}

/* fd[q] ~ dL/dtheta_q */
static void fd_gradient(const tu_fixture *f, double eps, double *fd)
{
    size_t D = f->full.dim;
    double *step = calloc(D, sizeof(double));
    cv_err e;
    for (size_t q = 0; q < D; q++) {
        step[q] = eps;
        double lp;
        ck_assert_int_eq(cv_curv_loss_at(f->c, &f->full, step, &lp, &e), 0);
        step[q] = -eps;
        double lm;
        ck_assert_int_eq(cv_curv_loss_at(f->c, &f->full, step, &lm, &e), 0);
        step[q] = 0;
        fd[q] = (lp - lm) / (2 * eps);
    }
    free(step);
}

/* fd ~ H v */
static void fd_hessian_vec(const tu_fixture *f, const double *v, double eps, double *fd)
{
    size_t D = f->full.dim;
    double *gp = malloc(sizeof(double) * D), *gm = malloc(sizeof(double) * D);
    double *s = calloc(D, sizeof(double));
    for (size_t q = 0; q < D; q++)
        s[q] = eps * v[q];
    grad_at(f, s, gp);
    for (size_t q = 0; q < D; q++)
        s[q] = -eps * v[q];
    grad_at(f, s, gm);
    for (size_t q = 0; q < D; q++)
        fd[q] = (gp[q] - gm[q]) / (2 * eps);
    free(gp);
    free(gm);
    free(s);
}

/* J[n][c][q] (N x C x D): the outputs' derivatives. */
static double *fd_jacobian(const tu_fixture *f, double eps)
{
    size_t D = f->full.dim, N = f->d.n;
    int C = cv_model_output_dim(&f->m);
    double *J = calloc(N * C * D, sizeof(double));
    for (size_t q = 0; q < D; q++) {
        const float *hs[2];
        cv_model t[2];
        cv_curv *cc[2];
        cv_err e;
        for (int s = 0; s < 2; s++) {
            ck_assert_int_eq(cv_model_clone(&f->m, &t[s]), 0);
            t[s].params[q] += (float)(s ? -eps : eps);
            cc[s] = cv_curv_new(&t[s], &f->d, NULL, &e);
            ck_assert_ptr_nonnull(cc[s]);
            hs[s] = cv_curv_outputs(cc[s]);
        }
        for (size_t n = 0; n < N; n++)
            for (int c = 0; c < C; c++)
                J[(n * C + c) * D + q] = (hs[0][n * C + c] - hs[1][n * C + c]) / (2 * eps);
        for (int s = 0; s < 2; s++) {
            cv_curv_free(cc[s]);
            cv_model_free(&t[s]);
        }
    }
    return J;
}

/* ---- dense references -------------------------------------------------------- */

/* The loss scale c in double from the labels: mean over counted positions
 * (CE/NLL) or entries (MSE/BCE), 1 for sum. */
static double oracle_scale(const tu_fixture *f, const cv_loss_layout *lay)
{
    if (f->m.reduction == CV_RED_SUM)
        return 1.0;
    if (!cv_loss_is_class(f->m.loss))
        return 1.0 / ((double)f->d.n * cv_model_output_dim(&f->m));
    size_t counted = 0;
    for (size_t i = 0; i < f->d.n * (size_t)lay->positions; i++)
        counted += f->d.labels[i] != lay->ignore_index;
    return 1.0 / (double)counted;
}

/* Lambda_n = d^2 L_n / dh^2 (C x C, C <= 64) of sample n from the outputs h
 * (N x C), in double: per target position softmax's diag(p) - p p^T (zero
 * where the label is ignored), sigmoid's p (1 - p), or MSE's 2. */
static void oracle_lambda(const tu_fixture *f, const float *h, int n, double *Lam)
{
    int C = cv_model_output_dim(&f->m);
    ck_assert_int_le(C, 64);
    cv_loss_layout lay;
    cv_loss_layout_of(&f->m, &lay);
    double c = oracle_scale(f, &lay);
    const float *hn = h + (size_t)n * C;
    memset(Lam, 0, sizeof(double) * C * C);
    if (!cv_loss_is_class(f->m.loss)) {
        for (int a = 0; a < C; a++) {
            double q = 1 / (1 + exp(-hn[a]));
            Lam[a * C + a] = f->m.loss == CV_LOSS_MSE ? 2 * c : c * q * (1 - q);
        }
        return;
    }
    double p[64];
    for (int s = 0; s < lay.positions; s++) {
        if (f->d.labels[(size_t)n * lay.positions + s] == lay.ignore_index)
            continue;
        double z = 0, mx = -INFINITY;
        for (int k = 0; k < lay.classes; k++)
            mx = fmax(mx, hn[k * lay.cstride + s * lay.pstride]);
        for (int k = 0; k < lay.classes; k++)
            z += p[k] = exp(hn[k * lay.cstride + s * lay.pstride] - mx);
        for (int k = 0; k < lay.classes; k++)
            p[k] /= z;
        for (int a = 0; a < lay.classes; a++)
            for (int b = 0; b < lay.classes; b++) {
                int ia = a * lay.cstride + s * lay.pstride, ib = b * lay.cstride + s * lay.pstride;
                Lam[ia * C + ib] = c * ((a == b) * p[a] - p[a] * p[b]);
            }
    }
}

/* sum_n J_n^T Lambda_n J_n (D x D, column-major). */
static double *fd_ggn(const tu_fixture *f, double eps)
{
    size_t D = f->full.dim, N = f->d.n;
    int C = cv_model_output_dim(&f->m);
    double *J = fd_jacobian(f, eps);
    double *G = calloc(D * D, sizeof(double)), *LJ = malloc(sizeof(double) * C * D);
    double *Lam = malloc(sizeof(double) * C * C);
    for (size_t n = 0; n < N; n++) {
        const double *Jn = J + n * C * D;
        oracle_lambda(f, cv_curv_outputs(f->c), (int)n, Lam);
        for (int a = 0; a < C; a++)
            for (size_t j = 0; j < D; j++) {
                double s = 0;
                for (int b = 0; b < C; b++)
                    s += Lam[a * C + b] * Jn[b * D + j];
                LJ[a * D + j] = s;
            }
        for (size_t i = 0; i < D; i++)
            for (int a = 0; a < C; a++)
                for (size_t j = 0; j < D; j++)
                    G[i + j * D] += Jn[a * D + i] * LJ[a * D + j];
    }
    free(J);
    free(LJ);
    free(Lam);
    return G;
}

/* ---- the checks ------------------------------------------------------------- */

/* tu_relerr(got, want, n, floor), freeing both. */
static double relerr_freeing(double *got, double *want, size_t n, double floor)
{
    double err = tu_relerr(got, want, n, floor);
    free(got);
    free(want);
    return err;
}

double tu_gradient_fd_relerr(tu_fixture *f, double eps)
{
    size_t D = f->full.dim;
    double *g = malloc(sizeof(double) * D), *fd = malloc(sizeof(double) * D);
    cv_err e;
    ck_assert_int_eq(cv_curv_gradient(f->c, &f->full, g, &e), 0);
    fd_gradient(f, eps, fd);
    return relerr_freeing(g, fd, D, 1e-3);
}

double tu_hessian_fd_relerr(tu_fixture *f, uint64_t seed, double eps)
{
    size_t D = f->full.dim;
    double *v = malloc(sizeof(double) * D), *hv = malloc(sizeof(double) * D);
    double *fd = malloc(sizeof(double) * D);
    cv_rng r;
    cv_rng_seed(&r, seed);
    cv_rng_gaussian(&r, v, D);
    double nv = tu_norm(v, D);
    for (size_t q = 0; q < D; q++)
        v[q] /= nv;
    cv_err e;
    ck_assert_int_eq(cv_curv_matvec(f->c, CV_CURV_HESSIAN, &f->full, 1, v, hv, &e), 0);
    fd_hessian_vec(f, v, eps, fd);
    free(v);
    return relerr_freeing(hv, fd, D, 1e-3);
}

double tu_ggn_fd_relerr(tu_fixture *f, double eps)
{
    size_t D = f->full.dim;
    double *G = fd_ggn(f, eps), *A = tu_dense(f, CV_CURV_GGN, &f->full);
    return relerr_freeing(A, G, D * D, 1e-6);
}

void tu_check_per_sample_gradients(tu_fixture *f, const char *tag)
{
    size_t D = f->full.dim, N = f->d.n;
    double *Gs = malloc(sizeof(double) * N * D), *g = malloc(sizeof(double) * D);
    cv_err e;
    ck_assert_int_eq(cv_curv_per_sample_gradients(f->c, &f->full, Gs, &e), 0);
    ck_assert_int_eq(cv_curv_gradient(f->c, &f->full, g, &e), 0);
    double *sum = calloc(D, sizeof(double));
    for (size_t n = 0; n < N; n++)
        for (size_t q = 0; q < D; q++)
            sum[q] += Gs[n * D + q];
    double err = tu_relerr(sum, g, D, 1e-6);
    ck_assert_msg(err < 1e-5, "%sper-sample gradients sum: %g", tag, err);
    /* EF = (1/c) sum_n g_n g_n^T with g_n = c dl_n/dtheta */
    cv_loss_layout lay;
    cv_loss_layout_of(&f->m, &lay);
    double c = oracle_scale(f, &lay);
    double *EF = calloc(D * D, sizeof(double));
    for (size_t n = 0; n < N; n++)
        for (size_t i = 0; i < D; i++)
            for (size_t j = 0; j < D; j++)
                EF[i + j * D] += Gs[n * D + i] * Gs[n * D + j] / c;
    double *A = tu_dense(f, CV_CURV_EF, &f->full);
    err = tu_relerr(A, EF, D * D, 1e-9);
    ck_assert_msg(err < 1e-5, "%sEF vs per-sample outer products: %g", tag, err);
    free(Gs);
    free(g);
    free(sum);
    free(EF);
    free(A);
}

void tu_check_adjoint(tu_fixture *f, const cv_block *b, int k, uint64_t seed, const char *tag)
{
    size_t D = b->dim, olen = f->d.n * (size_t)cv_model_output_dim(&f->m);
    float *cot = malloc(sizeof(float) * k * olen), *jx = malloc(sizeof(float) * k * olen);
    double *x = malloc(sizeof(double) * D * k), *y = malloc(sizeof(double) * D * k);
    cv_rng r;
    cv_rng_seed(&r, seed);
    for (size_t i = 0; i < k * olen; i++)
        cot[i] = (float)cv_rng_normal(&r);
    cv_rng_gaussian(&r, x, D * k);
    cv_err e;
    ck_assert_msg(cv_curv_jvp(f->c, b, k, x, jx, &e) == 0, "%s: %s", tag, e.message);
    ck_assert_msg(cv_curv_vjp(f->c, b, k, cot, y, &e) == 0, "%s: %s", tag, e.message);
    for (int j = 0; j < k; j++) {
        double lhs = 0, rhs = tu_dot(y + j * D, x + j * D, D);
        for (size_t i = 0; i < olen; i++)
            lhs += (double)cot[j * olen + i] * jx[j * olen + i];
        ck_assert_msg(fabs(lhs - rhs) <= 1e-5 * (fabs(rhs) + 1), "%s: adjoint %g vs %g", tag,
                      lhs, rhs);
    }
    free(cot); free(jx); free(x); free(y);
}

void tu_check_gram(tu_fixture *f, const cv_block *b, int k, double rounding, const char *tag)
{
    size_t N = f->d.n, D = b->dim, R = (size_t)k * N;
    int C = cv_model_output_dim(&f->m);
    size_t olen = N * (size_t)C;
    float *cot = malloc(sizeof(float) * R * C), *one = calloc(olen, sizeof(float));
    double *grads = malloc(sizeof(double) * R * D), *G = malloc(sizeof(double) * R * R);
    cv_rng r;
    cv_rng_seed(&r, 9);
    for (size_t i = 0; i < R * C; i++)
        cot[i] = (float)cv_rng_normal(&r);
    cv_err e;
    for (size_t rr = 0; rr < R; rr++) {
        size_t j = rr / N, n = rr % N;
        memset(one, 0, sizeof(float) * olen);
        memcpy(one + n * C, cot + j * olen + n * C, sizeof(float) * C);
        ck_assert_int_eq(cv_curv_vjp(f->c, b, 1, one, grads + rr * D, &e), 0);
    }
    ck_assert_msg(cv_curv_gram(f->c, b, k, cot, G, &e) == 0, "%s: %s", tag, e.message);
    for (size_t a = 0; a < R; a++)
        for (size_t q = 0; q < R; q++) {
            double want = tu_dot(grads + a * D, grads + q * D, D);
            double scale = sqrt(tu_dot(grads + a * D, grads + a * D, D) *
                                tu_dot(grads + q * D, grads + q * D, D));
            ck_assert_msg(fabs(G[a * R + q] - want) <=
                              1e-4 * (fabs(want) + 1e-3) + rounding * scale,
                          "%s Gram[%zu,%zu] %g vs %g (diagonal %g, %g)", tag, a, q,
                          G[a * R + q], want, G[a * R + a], G[q * R + q]);
        }
    free(cot); free(one); free(grads); free(G);
}

void tu_check_symmetric_psd(tu_fixture *f, const char *tag)
{
    size_t D = f->full.dim;
    for (int kind = 0; kind < CV_CURV_EXACT_COUNT; kind++) {
        double *A = tu_dense(f, (cv_curvature)kind, &f->full);
        double mx = 0, asym = 0;
        for (size_t i = 0; i < D; i++)
            for (size_t j = 0; j < D; j++) {
                mx = fmax(mx, fabs(A[i + j * D]));
                asym = fmax(asym, fabs(A[i + j * D] - A[j + i * D]));
            }
        ck_assert_msg(mx > 0, "%s%s is zero", tag, cv_curvature_name(kind));
        ck_assert_msg(asym <= 1e-5 * mx, "%s%s asymmetry %g of %g", tag,
                      cv_curvature_name(kind), asym, mx);
        if (kind != CV_CURV_HESSIAN) {
            double *w = malloc(sizeof(double) * D);
            tu_eigvalsh(A, (int)D, w);
            ck_assert_msg(w[0] >= -1e-5 * w[D - 1], "%s%s not PSD: %g (max %g)", tag,
                          cv_curvature_name(kind), w[0], w[D - 1]);
            free(w);
        }
        free(A);
    }
}

void tu_check_oracle(tu_fixture *f, tu_oracle which, const tu_fd_bounds *b, int variant)
{
    char tag[32];
    snprintf(tag, sizeof tag, "variant %d: ", variant);
    double err;
    switch (which) {
    case TU_ORACLE_GRADIENT:
        err = tu_gradient_fd_relerr(f, b->grad_eps);
        ck_assert_msg(err < b->grad_tol, "%sgradient vs FD rel err %g", tag, err);
        break;
    case TU_ORACLE_HESSIAN:
        err = tu_hessian_fd_relerr(f, b->hess_seed, b->eps);
        ck_assert_msg(err < b->tol, "%sHv vs FD rel err %g", tag, err);
        break;
    case TU_ORACLE_GGN:
        err = tu_ggn_fd_relerr(f, b->eps);
        ck_assert_msg(err < b->tol, "%sGGN vs dense J^T Lambda J rel err %g", tag, err);
        break;
    case TU_ORACLE_SYMMETRIC_PSD:
        tu_check_symmetric_psd(f, tag);
        break;
    case TU_ORACLE_PER_SAMPLE:
        tu_check_per_sample_gradients(f, tag);
        break;
    default:
        ck_abort_msg("unknown oracle %d", (int)which);
    }
}

/* ---- architecture JSON ------------------------------------------------------- */

static void same_tensors(const cv_tensor_info *a, const cv_tensor_info *b, int n)
{
    for (int t = 0; t < n; t++) {
        ck_assert_str_eq(a[t].name, b[t].name);
        ck_assert_int_eq(a[t].rank, b[t].rank);
        ck_assert_int_eq(memcmp(a[t].dim, b[t].dim, sizeof a[t].dim), 0);
        ck_assert_uint_eq(a[t].offset, b[t].offset);
        ck_assert_uint_eq(a[t].numel, b[t].numel);
    }
}

void tu_assert_same_model(const cv_model *a, const cv_model *b, const char *name)
{
    ck_assert_int_eq(a->nlayers, b->nlayers);
    ck_assert_uint_eq(a->nparams_total, b->nparams_total);
    ck_assert_uint_eq(a->nbuffers_total, b->nbuffers_total);
    ck_assert_int_eq(a->loss, b->loss);
    ck_assert_int_eq(a->reduction, b->reduction);
    for (int i = 0; i < a->nlayers; i++) {
        const cv_layer *x = &a->layers[i], *y = &b->layers[i];
        ck_assert_ptr_eq(x->cls, y->cls);
        ck_assert_msg(memcmp(x->attr.bytes, y->attr.bytes, sizeof x->attr.bytes) == 0,
                      "%s: layers[%d] attributes differ after export and re-parse", name, i);
        ck_assert_int_eq(memcmp(&x->in_shape, &y->in_shape, sizeof x->in_shape), 0);
        ck_assert_int_eq(memcmp(&x->out_shape, &y->out_shape, sizeof x->out_shape), 0);
        ck_assert_int_eq(x->nparams, y->nparams);
        ck_assert_int_eq(x->nbuffers, y->nbuffers);
        ck_assert_int_eq(x->nin, y->nin);
        ck_assert_int_eq(memcmp(x->in, y->in, sizeof x->in), 0);
        same_tensors(x->params, y->params, x->nparams);
        same_tensors(x->buffers, y->buffers, x->nbuffers);
    }
}

char *tu_arch_reparse(const cv_model *m, cv_model *m2, const char *name)
{
    cJSON *j = cv_arch_to_json(m);
    ck_assert_ptr_nonnull(j);
    char *text = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    cv_err e;
    ck_assert_msg(cv_arch_parse(text, strlen(text), m2, &e) == 0, "%s: %s in %s", name,
                  e.message, text);
    tu_assert_same_model(m, m2, name);
    cJSON *j2 = cv_arch_to_json(m2);
    char *text2 = cJSON_PrintUnformatted(j2);
    ck_assert_str_eq(text, text2);
    free(text2);
    cJSON_Delete(j2);
    return text;
}

/* ---- JSON results ------------------------------------------------------------ */

double tu_num(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    ck_assert_msg(cJSON_IsNumber(v), "result field %s missing", k);
    return v->valuedouble;
}
