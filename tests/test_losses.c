/* test_losses.c - engine/loss.c against an independent double-precision
 * implementation of PyTorch's losses on outputs of any per-sample shape:
 * CrossEntropyLoss with class_dim 1 ([K, d...]) and -1 ([d..., K]), label
 * smoothing, ignore_index (the mean's denominator counts only the other
 * positions; a batch with a single counted position), NLLLoss on log_softmax
 * outputs, MSELoss and BCEWithLogitsLoss on rank-3 outputs.  Oracles: the
 * value and gradient against the reference (whose own gradient is checked by
 * finite differences of its value), per-sample gradients summing to the batch
 * gradient, Hessian products against finite differences of the reference
 * gradient, the Hessian factor S S^T = Lambda, the Monte Carlo Fisher's
 * empirical mean of s s^T approaching Lambda / c (and through
 * cv_loss_outer_apply), the reduction scale. */
#include "testutil.h"

#include "engine/loss.h"

/* One loss configuration and its batch. */
typedef struct {
    cv_model m;
    cv_batch b;
    int n, C;
    float *h;
} lcase;

static void lcase_free(lcase *t)
{
    free(t->b.labels);
    free(t->b.targets);
    free(t->h);
}

/* A model whose output has per-sample shape `out` (rank dims) and a batch of
 * n samples: outputs ~ 1.5 N(0, 1), labels uniform in [0, K) with each
 * position ignored with probability p_ign (ignore_index ign), targets as the
 * loss needs. */
static void lcase_make(lcase *t, cv_loss_type loss, cv_reduction red, int class_dim,
                       int64_t ign, double smoothing, int rank, const int *dims, int n,
                       double p_ign, uint64_t seed)
{
    memset(t, 0, sizeof *t);
    cv_model *m = &t->m;
    m->nlayers = 1;
    m->layers[0].out_shape.rank = rank;
    for (int d = 0; d < rank; d++)
        m->layers[0].out_shape.dim[d] = dims[d];
    m->loss = loss;
    m->reduction = red;
    m->class_dim = class_dim;
    m->ignore_index = ign;
    m->label_smoothing = smoothing;
    t->n = n;
    t->C = (int)cv_shape_numel(&m->layers[0].out_shape);
    cv_rng r;
    cv_rng_seed(&r, seed);
    t->h = malloc(sizeof(float) * (size_t)n * t->C);
    for (int q = 0; q < n * t->C; q++)
        t->h[q] = (float)(1.5 * cv_rng_normal(&r));
    t->b.n = (size_t)n;
    if (cv_loss_is_class(loss)) {
        int K = class_dim < 0 ? dims[rank - 1] : dims[0], S = t->C / K;
        t->b.y_is_index = 1;
        t->b.labels = malloc(sizeof(int64_t) * (size_t)n * S);
        for (int q = 0; q < n * S; q++)
            t->b.labels[q] = cv_rng_uniform(&r) < p_ign ? ign
                                                        : (int64_t)cv_rng_below(&r, (uint64_t)K);
    } else {
        t->b.y_shape = m->layers[0].out_shape;
        t->b.targets = malloc(sizeof(float) * (size_t)n * t->C);
        for (int q = 0; q < n * t->C; q++)
            t->b.targets[q] = loss == CV_LOSS_BCE ? (float)cv_rng_uniform(&r)
                                                  : (float)cv_rng_normal(&r);
    }
}

/* ---- the reference (double) ------------------------------------------------- */

/* Class layout as PyTorch stores it: K classes, S positions, entry of (k, p). */
static void ref_layout(const lcase *t, int *K, int *S, int *cs, int *ps)
{
    const cv_shape *o = &t->m.layers[0].out_shape;
    int last = t->m.class_dim < 0;
    *K = last ? o->dim[o->rank - 1] : o->dim[0];
    *S = t->C / *K;
    *cs = last ? 1 : *S;
    *ps = last ? *K : 1;
}

/* ignore_index as PyTorch's default when the fields were not set (class_dim 0). */
static int64_t ref_ignore(const lcase *t) { return t->m.class_dim ? t->m.ignore_index : -100; }

static double ref_scale(const lcase *t)
{
    if (t->m.reduction == CV_RED_SUM)
        return 1.0;
    if (!cv_loss_is_class(t->m.loss))
        return 1.0 / ((double)t->n * t->C);
    int K, S, cs, ps, counted = 0;
    ref_layout(t, &K, &S, &cs, &ps);
    for (int q = 0; q < t->n * S; q++)
        counted += t->b.labels[q] != ref_ignore(t);
    return counted ? 1.0 / counted : 0.0;
}

/* l_i (unscaled) of sample i at outputs h (the sample's C entries); if g,
 * also d l_i / dh (C entries). */
static double ref_sample(const lcase *t, int i, const double *h, double *g)
{
    double l = 0;
    int C = t->C;
    if (!cv_loss_is_class(t->m.loss)) {
        for (int c = 0; c < C; c++) {
            double y = t->b.targets[(size_t)i * C + c], x = h[c];
            if (t->m.loss == CV_LOSS_MSE) {
                l += (x - y) * (x - y);
                if (g)
                    g[c] = 2 * (x - y);
            } else {
                l += log(1 + exp(x)) - x * y;
                if (g)
                    g[c] = 1 / (1 + exp(-x)) - y;
            }
        }
        return l;
    }
    int K, S, cs, ps;
    ref_layout(t, &K, &S, &cs, &ps);
    double eps = t->m.loss == CV_LOSS_CE ? t->m.label_smoothing : 0.0;
    for (int p = 0; p < S; p++) {
        int64_t y = t->b.labels[(size_t)i * S + p];
        double z = 0;
        for (int k = 0; k < K; k++)
            z += exp(h[k * cs + p * ps]);
        for (int k = 0; k < K; k++) {
            double q = y == ref_ignore(t) ? 0.0 : (k == y ? 1 - eps : 0.0) + eps / K;
            double logp = h[k * cs + p * ps] - log(z);
            l -= q * logp;
            if (g)
                g[k * cs + p * ps] = y == ref_ignore(t) ? 0.0 : exp(logp) - q;
        }
    }
    return l;
}

static double ref_total(const lcase *t, const double *h)
{
    double s = 0;
    for (int i = 0; i < t->n; i++)
        s += ref_sample(t, i, h + (size_t)i * t->C, NULL);
    return ref_scale(t) * s;
}

/* Dense Lambda_i = c d^2 l_i / dh^2 (C x C) by central differences of the
 * reference gradient. */
static void ref_hessian(const lcase *t, int i, double *H)
{
    int C = t->C;
    double *h = malloc(sizeof(double) * C), *gp = malloc(sizeof(double) * C),
           *gm = malloc(sizeof(double) * C), c = ref_scale(t), step = 1e-5;
    for (int a = 0; a < C; a++) {
        for (int q = 0; q < C; q++)
            h[q] = t->h[(size_t)i * C + q];
        h[a] += step;
        ref_sample(t, i, h, gp);
        h[a] -= 2 * step;
        ref_sample(t, i, h, gm);
        for (int q = 0; q < C; q++)
            H[(size_t)q * C + a] = c * (gp[q] - gm[q]) / (2 * step);
    }
    free(h);
    free(gp);
    free(gm);
}

static double max_abs(const double *a, size_t n)
{
    double m = 0;
    for (size_t i = 0; i < n; i++)
        m = fmax(m, fabs(a[i]));
    return m;
}

/* ---- the checks ------------------------------------------------------------- */

/* The reference gradient against central differences of its own value. */
static void check_reference(const lcase *t, const char *name)
{
    int C = t->C;
    double *h = malloc(sizeof(double) * C), *g = malloc(sizeof(double) * C);
    for (int i = 0; i < t->n; i++) {
        for (int q = 0; q < C; q++)
            h[q] = t->h[(size_t)i * C + q];
        ref_sample(t, i, h, g);
        for (int a = 0; a < C; a++) {
            double s = 1e-6, h0 = h[a];
            h[a] = h0 + s;
            double lp = ref_sample(t, i, h, NULL);
            h[a] = h0 - s;
            double lm = ref_sample(t, i, h, NULL);
            h[a] = h0;
            ck_assert_msg(fabs((lp - lm) / (2 * s) - g[a]) < 1e-7, "%s: reference gradient",
                          name);
        }
    }
    free(h);
    free(g);
}

/* Value, gradient and per-sample gradients of cv_loss_eval. */
static void check_first_order(lcase *t, cv_loss_state *s, const char *name)
{
    size_t NC = (size_t)t->n * t->C;
    double *hd = malloc(sizeof(double) * NC), *gref = malloc(sizeof(double) * NC);
    float *gh = malloc(sizeof(float) * NC), *gs = malloc(sizeof(float) * NC);
    for (size_t q = 0; q < NC; q++)
        hd[q] = t->h[q];
    double loss, ref = ref_total(t, hd), c = ref_scale(t);
    ck_assert_int_eq(cv_loss_eval(s, &t->m, &t->b, t->h, &loss, gh), 0);
    ck_assert_msg(fabs(s->scale - c) <= 1e-15 * c, "%s: scale %g, expected %g", name, s->scale,
                  c);
    ck_assert_msg(fabs(loss - ref) <= 1e-6 * fmax(1.0, fabs(ref)), "%s: loss %.10g, ref %.10g",
                  name, loss, ref);
    for (int i = 0; i < t->n; i++)
        ref_sample(t, i, hd + (size_t)i * t->C, gref + (size_t)i * t->C);
    cv_loss_sample_grad(s, gs);
    double gmax = max_abs(gref, NC);
    for (size_t q = 0; q < NC; q++) {
        ck_assert_msg(fabs(gs[q] - gref[q]) <= 1e-6 * fmax(1.0, gmax),
                      "%s: sample gradient [%zu] %g, ref %g", name, q, gs[q], gref[q]);
        ck_assert_msg(fabs(gh[q] - c * gref[q]) <= 1e-6 * fmax(1e-3, c * gmax),
                      "%s: gradient [%zu] %g, ref %g", name, q, gh[q], c * gref[q]);
    }
    free(hd);
    free(gref);
    free(gh);
    free(gs);
}

/* F F^T = Lambda_i (H, C x C) for a C x kf row-major factor F. */
static void check_factor(const double *F, int C, int kf, const double *H, double hmax,
                         const char *name, const char *what)
{
    for (int a = 0; a < C; a++)
        for (int b = 0; b < C; b++) {
            double v = 0;
            for (int q = 0; q < kf; q++)
                v += F[(size_t)a * kf + q] * F[(size_t)b * kf + q];
            ck_assert_msg(fabs(v - H[(size_t)a * C + b]) <= 1e-5 * fmax(hmax, 1e-3),
                          "%s: (%s)[%d][%d] = %g, Lambda %g (%d columns)", name, what, a, b, v,
                          H[(size_t)a * C + b], kf);
        }
}

/* cv_loss_hessian_factor: C - S columns for CE/NLL (one null direction per
 * position dropped), C otherwise, and F F^T = Lambda_i as the square root's. */
static void check_narrow_factor(const cv_loss_state *s, int i, const double *H, double hmax,
                                const char *name)
{
    int C = s->C, kf = cv_loss_factor_columns(s);
    ck_assert_int_eq(kf, cv_loss_is_class(s->type) && s->K >= 2 ? C - s->S : C);
    double *F = malloc(sizeof(double) * C * C), *T = malloc(sizeof(double) * C * C);
    ck_assert_int_eq(cv_loss_hessian_factor(s, i, T, F), 0);
    check_factor(F, C, kf, H, hmax, name, "F F^T");
    free(F);
    free(T);
}

/* Hessian products (k = 2 stacked blocks) and the factor S S^T against the
 * dense reference Lambda_i. */

static void check_second_order(lcase *t, const cv_loss_state *s, const char *name)
{
    int C = t->C, n = t->n, k = 2;
    size_t NC = (size_t)n * C;
    float *r = malloc(sizeof(float) * k * NC), *out = malloc(sizeof(float) * k * NC);
    double *H = malloc(sizeof(double) * C * C), *F = malloc(sizeof(double) * C * C);
    cv_rng rng;
    cv_rng_seed(&rng, 77);
    for (size_t q = 0; q < k * NC; q++)
        r[q] = (float)cv_rng_normal(&rng);
    cv_loss_hessian_apply(s, k, r, out);
    for (int i = 0; i < n; i++) {
        ref_hessian(t, i, H);
        double hmax = max_abs(H, (size_t)C * C);
        for (int j = 0; j < k; j++)
            for (int a = 0; a < C; a++) {
                double want = 0;
                for (int b = 0; b < C; b++)
                    want += H[(size_t)a * C + b] * r[(size_t)j * NC + (size_t)i * C + b];
                double got = out[(size_t)j * NC + (size_t)i * C + a];
                ck_assert_msg(fabs(got - want) <= 1e-5 * fmax(hmax, 1e-3) * 4,
                              "%s: Hessian product sample %d entry %d: %g, ref %g", name, i, a,
                              got, want);
            }
        cv_loss_hessian_sqrt(s, i, F);
        check_factor(F, C, C, H, hmax, name, "S S^T");
        check_narrow_factor(s, i, H, hmax, name);
    }
    free(r);
    free(out);
    free(H);
    free(F);
}

/* Monte Carlo samples: mean of s s^T over mc draws against Lambda_i / c, the
 * same through cv_loss_outer_apply; returns the largest deviation relative to
 * max |Lambda_i / c|. */
static double mc_error(lcase *t, const cv_loss_state *s, int mc, uint64_t seed)
{
    int C = t->C, n = t->n;
    size_t NC = (size_t)n * C;
    float *S = malloc(sizeof(float) * mc * NC), *r = malloc(sizeof(float) * NC),
          *out = malloc(sizeof(float) * NC);
    double *H = malloc(sizeof(double) * C * C), *E = malloc(sizeof(double) * C * C);
    cv_rng rng;
    cv_rng_seed(&rng, seed);
    cv_loss_sample_mc(s, &rng, mc, S);
    for (size_t q = 0; q < NC; q++)
        r[q] = (float)cv_rng_normal(&rng);
    cv_loss_outer_apply(s, mc, S, 1.0 / mc, 1, r, out);
    double c = ref_scale(t), worst = 0;
    for (int i = 0; i < n; i++) {
        ref_hessian(t, i, H);
        memset(E, 0, sizeof(double) * C * C);
        for (int m = 0; m < mc; m++) {
            const float *si = S + ((size_t)m * n + i) * C;
            for (int a = 0; a < C; a++)
                for (int b = 0; b < C; b++)
                    E[(size_t)a * C + b] += (double)si[a] * si[b] / mc;
        }
        double hmax = max_abs(H, (size_t)C * C) / c;
        for (int a = 0; a < C; a++) {
            double want = 0, ew = 0;
            for (int b = 0; b < C; b++) {
                worst = fmax(worst, fabs(E[(size_t)a * C + b] - H[(size_t)a * C + b] / c) / hmax);
                ew += E[(size_t)a * C + b] * r[(size_t)i * C + b];
                want += H[(size_t)a * C + b] / c * r[(size_t)i * C + b];
            }
            /* outer_apply is the empirical matrix times r (float sums over mc) */
            ck_assert_msg(fabs(out[(size_t)i * C + a] - ew) <= 2e-3 * (fabs(ew) + 1),
                          "outer_apply %g vs %g", out[(size_t)i * C + a], ew);
            (void)want;
        }
    }
    free(S);
    free(r);
    free(out);
    free(H);
    free(E);
    return worst;
}

/* Every function of loss.h on one configuration. */
static void check_all(lcase *t, const char *name)
{
    cv_loss_state s;
    check_reference(t, name);
    check_first_order(t, &s, name);
    check_second_order(t, &s, name);
    /* the Monte Carlo error shrinks like 1/sqrt(mc) to well below the tolerance */
    double e1 = mc_error(t, &s, 400, 5), e2 = mc_error(t, &s, 40000, 6);
    ck_assert_msg(e2 < 0.04, "%s: Monte Carlo Fisher off by %g (relative) with 40000 samples",
                  name, e2);
    ck_assert_msg(e2 < e1, "%s: Monte Carlo error does not shrink: %g -> %g", name, e1, e2);
    cv_loss_state_free(&s);
}

static const int seq_dims[] = {4, 3};      /* [T, K] with class_dim -1; [K, T] with 1 */
static const int img_dims[] = {3, 2, 2};   /* [K, H, W] */

START_TEST(ce_class_dims)
{
    char name[96];
    for (int red = 0; red < 2; red++) {
        lcase t;
        snprintf(name, sizeof name, "CE class_dim -1 [4, 3] red %d", red);
        lcase_make(&t, CV_LOSS_CE, (cv_reduction)red, -1, -100, 0.0, 2, seq_dims, 3, 0.0, 1);
        check_all(&t, name);
        lcase_free(&t);
        snprintf(name, sizeof name, "CE class_dim 1 [4, 3] red %d", red);
        lcase_make(&t, CV_LOSS_CE, (cv_reduction)red, 1, -100, 0.0, 2, seq_dims, 3, 0.0, 2);
        check_all(&t, name);
        lcase_free(&t);
        snprintf(name, sizeof name, "CE class_dim 1 [3, 2, 2] red %d", red);
        lcase_make(&t, CV_LOSS_CE, (cv_reduction)red, 1, -100, 0.0, 3, img_dims, 2, 0.0, 3);
        check_all(&t, name);
        lcase_free(&t);
    }
}
END_TEST

START_TEST(ce_flat_unchanged)
{
    /* a flat [K] output: class_dim 1 and -1 and a zero-initialized model
     * (class_dim 0: PyTorch's defaults) give the same numbers */
    static const int flat[] = {5};
    lcase t[3];
    int cds[3] = {1, -1, 0};
    double loss[3];
    float *g[3];
    for (int v = 0; v < 3; v++) {
        lcase_make(&t[v], CV_LOSS_CE, CV_RED_MEAN, cds[v], cds[v] ? -100 : 0, 0.0, 1, flat, 6,
                   0.0, 9);
        t[v].b.labels[2] = 0;
        g[v] = malloc(sizeof(float) * 30);
        cv_loss_state s;
        ck_assert_int_eq(cv_loss_eval(&s, &t[v].m, &t[v].b, t[v].h, &loss[v], g[v]), 0);
        ck_assert_int_eq(s.K, 5);
        ck_assert_int_eq(s.S, 1);
        cv_loss_state_free(&s);
    }
    /* class 0 labels are not ignored by the zero-initialized model */
    int zeros = 0;
    for (int i = 0; i < 6; i++)
        zeros += t[2].b.labels[i] == 0;
    ck_assert_int_gt(zeros, 0);
    for (int v = 1; v < 3; v++) {
        ck_assert(loss[v] == loss[0]);
        ck_assert_int_eq(memcmp(g[v], g[0], sizeof(float) * 30), 0);
    }
    check_all(&t[2], "CE flat, zero-initialized loss fields");
    for (int v = 0; v < 3; v++) {
        free(g[v]);
        lcase_free(&t[v]);
    }
}
END_TEST

START_TEST(ce_ignore_index)
{
    lcase t;
    /* about a third of the positions ignored, ignore_index a valid class id */
    lcase_make(&t, CV_LOSS_CE, CV_RED_MEAN, -1, 1, 0.0, 2, seq_dims, 4, 0.35, 11);
    int ign = 0;
    for (int q = 0; q < 16; q++)
        ign += t.b.labels[q] == 1;
    ck_assert(ign > 0 && ign < 16);
    check_all(&t, "CE ignore_index 1");
    lcase_free(&t);
    lcase_make(&t, CV_LOSS_CE, CV_RED_SUM, 1, -100, 0.2, 2, seq_dims, 3, 0.3, 12);
    check_all(&t, "CE ignore_index -100, smoothing, sum");
    lcase_free(&t);

    /* all positions but one ignored: the mean is that position's loss */
    lcase_make(&t, CV_LOSS_CE, CV_RED_MEAN, -1, -100, 0.0, 2, seq_dims, 2, 0.0, 13);
    for (int q = 0; q < 8; q++)
        t.b.labels[q] = q == 5 ? 2 : -100;
    check_all(&t, "CE one counted position");
    cv_loss_state s;
    double loss;
    float g[24];
    ck_assert_int_eq(cv_loss_eval(&s, &t.m, &t.b, t.h, &loss, g), 0);
    ck_assert_uint_eq(s.counted, 1);
    ck_assert(s.scale == 1.0);
    const float *hp = t.h + 12 + 1 * 3; /* sample 1, position 1 */
    double z = exp(hp[0]) + exp(hp[1]) + exp(hp[2]);
    ck_assert_msg(fabs(loss - (log(z) - hp[2])) < 1e-6, "loss %g", loss);
    for (int q = 0; q < 24; q++)
        if (q < 15 || q >= 18)
            ck_assert(g[q] == 0.0f);
        else
            ck_assert(g[q] != 0.0f);
    cv_loss_state_free(&s);
    /* every position ignored: no terms, scale 0 */
    for (int q = 0; q < 8; q++)
        t.b.labels[q] = -100;
    ck_assert_int_eq(cv_loss_eval(&s, &t.m, &t.b, t.h, &loss, g), 0);
    ck_assert(s.counted == 0 && s.scale == 0.0 && loss == 0.0);
    cv_loss_state_free(&s);
    lcase_free(&t);
}
END_TEST

START_TEST(ce_label_smoothing)
{
    lcase t;
    lcase_make(&t, CV_LOSS_CE, CV_RED_MEAN, -1, -100, 0.1, 2, seq_dims, 3, 0.0, 21);
    check_all(&t, "CE label_smoothing 0.1, class_dim -1");
    lcase_free(&t);
    lcase_make(&t, CV_LOSS_CE, CV_RED_MEAN, 1, -100, 1.0, 3, img_dims, 2, 0.0, 22);
    check_all(&t, "CE label_smoothing 1, class_dim 1");
    lcase_free(&t);
}
END_TEST

START_TEST(nll_loss)
{
    /* NLLLoss on log_softmax outputs: PyTorch's value -mean z_y, CE's
     * numbers; label_smoothing is not an NLLLoss field and is ignored */
    lcase t;
    lcase_make(&t, CV_LOSS_NLL, CV_RED_MEAN, -1, 0, 0.3, 2, seq_dims, 3, 0.2, 31);
    int K = 3, S = 4;
    for (int i = 0; i < 3 * S; i++) {
        float *hp = t.h + (size_t)i * K;
        double z = 0;
        for (int k = 0; k < K; k++)
            z += exp(hp[k]);
        for (int k = 0; k < K; k++)
            hp[k] = (float)(hp[k] - log(z));
    }
    double nll = 0;
    int counted = 0;
    for (int q = 0; q < 3 * S; q++)
        if (t.b.labels[q] != 0) {
            nll -= t.h[(size_t)q * K + t.b.labels[q]];
            counted++;
        }
    nll /= counted;
    cv_loss_state s;
    double loss;
    ck_assert_int_eq(cv_loss_eval(&s, &t.m, &t.b, t.h, &loss, NULL), 0);
    ck_assert_msg(fabs(loss - nll) < 1e-6, "NLL %g, expected %g", loss, nll);
    ck_assert(s.smoothing == 0.0);
    cv_loss_state_free(&s);
    t.m.label_smoothing = 0.0; /* the reference reads it for CE only; NLL has none */
    check_all(&t, "NLLLoss");
    lcase_free(&t);
}
END_TEST

START_TEST(mse_bce_any_shape)
{
    char name[64];
    for (int red = 0; red < 2; red++) {
        lcase t;
        snprintf(name, sizeof name, "MSE [3, 2, 2] red %d", red);
        lcase_make(&t, CV_LOSS_MSE, (cv_reduction)red, 1, -100, 0.0, 3, img_dims, 3, 0.0, 41);
        check_all(&t, name);
        lcase_free(&t);
        snprintf(name, sizeof name, "BCE [4, 3] red %d", red);
        lcase_make(&t, CV_LOSS_BCE, (cv_reduction)red, -1, -100, 0.0, 2, seq_dims, 3, 0.0, 42);
        check_all(&t, name);
        lcase_free(&t);
    }
}
END_TEST

START_TEST(layout_and_scale)
{
    cv_model m;
    memset(&m, 0, sizeof m);
    m.nlayers = 1;
    m.loss = CV_LOSS_CE;
    m.layers[0].out_shape = (cv_shape){3, {5, 4, 2}};
    cv_loss_layout lay;
    cv_loss_layout_of(&m, &lay); /* class_dim 0: PyTorch's defaults */
    ck_assert(lay.classes == 5 && lay.positions == 8 && lay.cstride == 8 && lay.pstride == 1);
    ck_assert(lay.class_dim == 1 && lay.ignore_index == -100);
    ck_assert(lay.label_shape.rank == 2 && lay.label_shape.dim[0] == 4 &&
              lay.label_shape.dim[1] == 2);
    m.class_dim = -1;
    m.ignore_index = 7;
    m.label_smoothing = 0.25;
    cv_loss_layout_of(&m, &lay);
    ck_assert(lay.classes == 2 && lay.positions == 20 && lay.cstride == 1 && lay.pstride == 2);
    ck_assert(lay.ignore_index == 7 && lay.label_smoothing == 0.25);
    ck_assert(lay.label_shape.rank == 2 && lay.label_shape.dim[0] == 5 &&
              lay.label_shape.dim[1] == 4);
    m.loss = CV_LOSS_NLL;
    cv_loss_layout_of(&m, &lay);
    ck_assert(lay.label_smoothing == 0.0 && lay.classes == 2);
    m.loss = CV_LOSS_MSE;
    cv_loss_layout_of(&m, &lay);
    ck_assert(lay.classes == 40 && lay.positions == 1 && lay.label_shape.rank == 3);
    ck_assert(cv_loss_scale(CV_LOSS_CE, CV_RED_MEAN, 4, 10) == 0.25);
    ck_assert(cv_loss_scale(CV_LOSS_NLL, CV_RED_MEAN, 0, 10) == 0.0);
    ck_assert(cv_loss_scale(CV_LOSS_MSE, CV_RED_MEAN, 4, 10) == 1.0 / 40);
    ck_assert(cv_loss_scale(CV_LOSS_BCE, CV_RED_SUM, 4, 10) == 1.0);
    ck_assert(cv_loss_is_class(CV_LOSS_NLL) && !cv_loss_is_class(CV_LOSS_BCE));
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("losses");
    TCase *tc = tcase_create("losses");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, layout_and_scale);
    tcase_add_test(tc, ce_flat_unchanged);
    tcase_add_test(tc, ce_class_dims);
    tcase_add_test(tc, ce_ignore_index);
    tcase_add_test(tc, ce_label_smoothing);
    tcase_add_test(tc, nll_loss);
    tcase_add_test(tc, mse_bce_any_shape);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_main(suite); }
