/* loss.c - MSELoss, CrossEntropyLoss (with class_dim, label smoothing,
 * ignore_index), NLLLoss and BCEWithLogitsLoss: values, output gradients,
 * Hessian products, Monte Carlo gradient samples, Hessian roots. */
#include "loss.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int cv_loss_is_class(cv_loss_type t) { return t == CV_LOSS_CE || t == CV_LOSS_NLL; }

void cv_loss_layout_of(const cv_model *m, cv_loss_layout *lay)
{
    memset(lay, 0, sizeof *lay);
    lay->out_shape = m->nlayers ? m->layers[m->nlayers - 1].out_shape : m->input_shape;
    const cv_shape *o = &lay->out_shape;
    int C = (int)cv_shape_numel(o);
    int parsed = m->class_dim != 0;
    lay->class_dim = parsed && m->class_dim < 0 ? -1 : 1;
    lay->ignore_index = parsed ? m->ignore_index : -100;
    if (!cv_loss_is_class(m->loss) || o->rank < 1) {
        lay->classes = C;
        lay->positions = 1;
        lay->cstride = 1;
        lay->label_shape = *o;
        return;
    }
    lay->label_smoothing = m->loss == CV_LOSS_CE ? m->label_smoothing : 0.0;
    int cd = lay->class_dim > 0 ? 0 : o->rank - 1; /* per-sample index of the class dim */
    lay->classes = o->dim[cd];
    lay->positions = lay->classes > 0 ? C / lay->classes : 0;
    lay->cstride = cd == 0 ? lay->positions : 1;
    lay->pstride = cd == 0 ? 1 : lay->classes;
    for (int d = 0; d < o->rank; d++)
        if (d != cd)
            lay->label_shape.dim[lay->label_shape.rank++] = o->dim[d];
}

double cv_loss_scale(cv_loss_type t, cv_reduction r, size_t n, int C)
{
    if (r == CV_RED_SUM)
        return 1.0;
    if (cv_loss_is_class(t))
        return n ? 1.0 / (double)n : 0.0;
    return 1.0 / ((double)n * C);
}

/* ---- one class position ------------------------------------------------ */

/* p = softmax over the K classes of a position (entries h[k*cs]); returns
 * log-sum-exp in double. */
static double softmax_pos(const float *h, int K, int cs, float *p)
{
    double mx = h[0], z = 0;
    for (int k = 1; k < K; k++)
        if (h[(size_t)k * cs] > mx)
            mx = h[(size_t)k * cs];
    for (int k = 0; k < K; k++)
        z += exp((double)h[(size_t)k * cs] - mx);
    double lse = mx + log(z);
    for (int k = 0; k < K; k++)
        p[(size_t)k * cs] = (float)exp((double)h[(size_t)k * cs] - lse);
    return lse;
}

/* Entry offset of position p within a sample. */
static size_t pos_off(const cv_loss_state *s, int p) { return (size_t)p * s->ps; }

static int ignored(const cv_loss_state *s, int i, int p)
{
    return s->labels[(size_t)i * s->S + p] == s->ignore_index;
}

/* Loss of position p of sample i (counted positions only). */
static double pos_loss(const cv_loss_state *s, int i, int p)
{
    const float *h = s->h + (size_t)i * s->C + pos_off(s, p);
    int K = s->K, cs = s->cs;
    double mx = h[0], z = 0, sum = 0;
    for (int k = 1; k < K; k++)
        if (h[(size_t)k * cs] > mx)
            mx = h[(size_t)k * cs];
    for (int k = 0; k < K; k++) {
        z += exp((double)h[(size_t)k * cs] - mx);
        sum += h[(size_t)k * cs];
    }
    int64_t y = s->labels[(size_t)i * s->S + p];
    double eps = s->smoothing;
    return mx + log(z) - (1.0 - eps) * h[(size_t)y * cs] - eps / K * sum;
}

static double sample_loss(const cv_loss_state *s, int i)
{
    double l = 0;
    if (cv_loss_is_class(s->type)) {
        for (int p = 0; p < s->S; p++)
            if (!ignored(s, i, p))
                l += pos_loss(s, i, p);
        return l;
    }
    const float *h = s->h + (size_t)i * s->C;
    const float *y = s->targets + (size_t)i * s->C;
    for (int c = 0; c < s->C; c++) {
        double x = h[c];
        if (s->type == CV_LOSS_MSE)
            l += (x - y[c]) * (x - y[c]);
        else
            l += (x > 0 ? x : 0) - x * y[c] + log1p(exp(-fabs(x)));
    }
    return l;
}

/* ---- evaluation -------------------------------------------------------- */

double cv_loss_sample(const cv_loss_state *s, int i) { return sample_loss(s, i); }

static void setup_state(cv_loss_state *s, const cv_model *m, const cv_batch *b, const float *h)
{
    cv_loss_layout lay;
    cv_loss_layout_of(m, &lay);
    memset(s, 0, sizeof *s);
    s->type = m->loss;
    s->n = (int)b->n;
    s->C = (int)cv_shape_numel(&lay.out_shape);
    s->K = lay.classes;
    s->S = lay.positions;
    s->cs = lay.cstride;
    s->ps = lay.pstride;
    s->ignore_index = lay.ignore_index;
    s->smoothing = lay.label_smoothing;
    s->h = h;
    s->labels = b->labels;
    s->targets = b->targets;
    size_t count = b->n;
    if (cv_loss_is_class(s->type)) {
        count = 0;
        for (int i = 0; i < s->n; i++)
            for (int p = 0; p < s->S; p++)
                count += !ignored(s, i, p);
        s->counted = count;
    }
    s->scale = cv_loss_scale(m->loss, m->reduction, count, s->C);
}

double cv_loss_batch_scale(const cv_model *m, const cv_batch *b)
{
    cv_loss_state s;
    setup_state(&s, m, b, NULL);
    return s.scale;
}

static void fill_prob(cv_loss_state *s)
{
    for (int i = 0; i < s->n; i++) {
        const float *hi = s->h + (size_t)i * s->C;
        float *pi = s->prob + (size_t)i * s->C;
        if (cv_loss_is_class(s->type))
            for (int p = 0; p < s->S; p++)
                softmax_pos(hi + pos_off(s, p), s->K, s->cs, pi + pos_off(s, p));
        else if (s->type == CV_LOSS_BCE)
            for (int c = 0; c < s->C; c++)
                pi[c] = (float)(1.0 / (1.0 + exp(-(double)hi[c])));
    }
}

int cv_loss_eval(cv_loss_state *s, const cv_model *m, const cv_batch *b, const float *h,
                 double *loss, float *gh)
{
    return cv_loss_eval_scaled(s, m, b, h, -1.0, loss, gh);
}

int cv_loss_eval_scaled(cv_loss_state *s, const cv_model *m, const cv_batch *b,
                        const float *h, double scale, double *loss, float *gh)
{
    setup_state(s, m, b, h);
    if (scale >= 0)
        s->scale = scale;
    size_t len = (size_t)s->n * s->C;
    s->prob = malloc(sizeof(float) * (len ? len : 1));
    if (!s->prob)
        return -1;
    fill_prob(s);
    double total = 0;
    for (int i = 0; i < s->n; i++)
        total += sample_loss(s, i);
    *loss = s->scale * total;
    if (gh) {
        cv_loss_sample_grad(s, gh);
        for (size_t i = 0; i < len; i++)
            gh[i] = (float)(gh[i] * s->scale);
    }
    return 0;
}

void cv_loss_state_free(cv_loss_state *s)
{
    free(s->prob);
    s->prob = NULL;
}

/* ---- first order ------------------------------------------------------- */

/* g = p - (1 - eps) e_y - eps/K at every position of sample i (0 where ignored). */
static void class_grad(const cv_loss_state *s, int i, float *g)
{
    const float *pr = s->prob + (size_t)i * s->C;
    double off = s->smoothing / s->K, on = 1.0 - s->smoothing;
    for (int p = 0; p < s->S; p++) {
        size_t o = pos_off(s, p);
        int64_t y = s->labels[(size_t)i * s->S + p];
        for (int k = 0; k < s->K; k++) {
            size_t q = o + (size_t)k * s->cs;
            g[q] = y == s->ignore_index ? 0.0f
                                        : (float)(pr[q] - off - (k == y ? on : 0.0));
        }
    }
}

void cv_loss_sample_grad(const cv_loss_state *s, float *g)
{
    int C = s->C;
    for (int i = 0; i < s->n; i++) {
        const float *h = s->h + (size_t)i * C, *p = s->prob + (size_t)i * C;
        float *gi = g + (size_t)i * C;
        if (cv_loss_is_class(s->type)) {
            class_grad(s, i, gi);
            continue;
        }
        for (int c = 0; c < C; c++) {
            if (s->type == CV_LOSS_MSE)
                gi[c] = 2.0f * (h[c] - s->targets[(size_t)i * C + c]);
            else
                gi[c] = p[c] - s->targets[(size_t)i * C + c];
        }
    }
}

/* ---- second order ------------------------------------------------------ */

/* o = c0 (diag(p) - p p^T) r at every counted position of sample i. */
static void class_hessian(const cv_loss_state *s, int i, double c0, const float *r, float *o)
{
    const float *pr = s->prob + (size_t)i * s->C;
    for (int p = 0; p < s->S; p++) {
        size_t base = pos_off(s, p);
        int ign = ignored(s, i, p);
        double dot = 0;
        for (int k = 0; k < s->K && !ign; k++) {
            size_t q = base + (size_t)k * s->cs;
            dot += (double)pr[q] * r[q];
        }
        for (int k = 0; k < s->K; k++) {
            size_t q = base + (size_t)k * s->cs;
            o[q] = ign ? 0.0f : (float)(c0 * pr[q] * (r[q] - dot));
        }
    }
}

void cv_loss_hessian_apply(const cv_loss_state *s, int k, const float *r, float *out)
{
    int C = s->C;
    double c0 = s->scale;
    for (int j = 0; j < k; j++)
        for (int i = 0; i < s->n; i++) {
            size_t off = ((size_t)j * s->n + i) * C;
            const float *ri = r + off, *p = s->prob + (size_t)i * C;
            float *oi = out + off;
            if (cv_loss_is_class(s->type)) {
                class_hessian(s, i, c0, ri, oi);
            } else if (s->type == CV_LOSS_MSE) {
                for (int c = 0; c < C; c++)
                    oi[c] = (float)(2.0 * c0 * ri[c]);
            } else {
                for (int c = 0; c < C; c++)
                    oi[c] = (float)(c0 * p[c] * (1.0 - p[c]) * ri[c]);
            }
        }
}

static int sample_categorical(const float *p, int K, int cs, cv_rng *rng)
{
    double u = cv_rng_uniform(rng), acc = 0;
    for (int k = 0; k < K; k++) {
        acc += p[(size_t)k * cs];
        if (u < acc)
            return k;
    }
    return K - 1;
}

/* s = p - e_yhat, yhat ~ p, at every counted position of sample i. */
static void class_mc(const cv_loss_state *s, int i, cv_rng *rng, float *si)
{
    const float *pr = s->prob + (size_t)i * s->C;
    for (int p = 0; p < s->S; p++) {
        size_t base = pos_off(s, p);
        int ign = ignored(s, i, p);
        int y = ign ? -1 : sample_categorical(pr + base, s->K, s->cs, rng);
        for (int k = 0; k < s->K; k++) {
            size_t q = base + (size_t)k * s->cs;
            si[q] = ign ? 0.0f : pr[q] - (k == y ? 1.0f : 0.0f);
        }
    }
}

/* One Monte Carlo output gradient of sample i into si. */
static void sample_mc_one(const cv_loss_state *s, int i, cv_rng *rng, float *si)
{
    int C = s->C;
    const float *p = s->prob + (size_t)i * C;
    if (cv_loss_is_class(s->type)) {
        class_mc(s, i, rng, si);
    } else if (s->type == CV_LOSS_MSE) {
        /* l = |h - y|^2 is the NLL of N(h, I/2) up to constants:
         * yhat = h + eps/sqrt(2), s = 2 (h - yhat) = -sqrt(2) eps */
        for (int c = 0; c < C; c++)
            si[c] = (float)(-M_SQRT2 * cv_rng_normal(rng));
    } else {
        for (int c = 0; c < C; c++)
            si[c] = p[c] - (cv_rng_uniform(rng) < p[c] ? 1.0f : 0.0f);
    }
}

void cv_loss_sample_mc(const cv_loss_state *s, cv_rng *rng, int mc, float *S)
{
    for (int m = 0; m < mc; m++)
        for (int i = 0; i < s->n; i++)
            sample_mc_one(s, i, rng, S + ((size_t)m * s->n + i) * s->C);
}

void cv_loss_sample_mc_at(const cv_loss_state *s, uint64_t seed, size_t first, int mc,
                          float *S)
{
    for (int i = 0; i < s->n; i++) {
        cv_rng rng;
        cv_rng_seed_stream(&rng, seed, first + (size_t)i);
        for (int m = 0; m < mc; m++)
            sample_mc_one(s, i, &rng, S + ((size_t)m * s->n + i) * s->C);
    }
}

void cv_loss_outer_apply(const cv_loss_state *s, int mc, const float *S, double w, int k,
                         const float *r, float *out)
{
    int C = s->C;
    for (int j = 0; j < k; j++)
        for (int i = 0; i < s->n; i++) {
            size_t off = ((size_t)j * s->n + i) * C;
            const float *ri = r + off;
            float *oi = out + off;
            for (int c = 0; c < C; c++)
                oi[c] = 0;
            for (int m = 0; m < mc; m++) {
                const float *si = S + ((size_t)m * s->n + i) * C;
                double dot = 0;
                for (int c = 0; c < C; c++)
                    dot += (double)si[c] * ri[c];
                for (int c = 0; c < C; c++)
                    oi[c] += (float)(w * dot * si[c]);
            }
        }
}

/* S[a][b] = sc (delta_ab sqrt(p_a) - p_a sqrt(p_b)) within each counted
 * position (a, b entries of the same position): S S^T = sc^2 (diag p - p p^T). */
static void class_sqrt(const cv_loss_state *s, int i, double sc, double *S)
{
    const float *pr = s->prob + (size_t)i * s->C;
    size_t C = (size_t)s->C;
    for (int p = 0; p < s->S; p++) {
        if (ignored(s, i, p))
            continue;
        size_t base = pos_off(s, p);
        for (int a = 0; a < s->K; a++) {
            size_t qa = base + (size_t)a * s->cs;
            for (int b = 0; b < s->K; b++) {
                size_t qb = base + (size_t)b * s->cs;
                S[qa * C + qb] = sc * ((a == b ? sqrt(pr[qa]) : 0.0) - pr[qa] * sqrt(pr[qb]));
            }
        }
    }
}

void cv_loss_hessian_sqrt(const cv_loss_state *s, int i, double *S)
{
    int C = s->C;
    double sc = sqrt(s->scale);
    const float *p = s->prob + (size_t)i * C;
    memset(S, 0, sizeof(double) * (size_t)C * C);
    if (cv_loss_is_class(s->type)) {
        class_sqrt(s, i, sc, S);
        return;
    }
    for (int a = 0; a < C; a++) {
        if (s->type == CV_LOSS_MSE)
            S[(size_t)a * C + a] = sc * M_SQRT2;
        else
            S[(size_t)a * C + a] = sc * sqrt(p[a] * (1.0 - p[a]));
    }
}

int cv_loss_factor_columns(const cv_loss_state *s)
{
    return cv_loss_is_class(s->type) && s->K >= 2 ? s->C - s->S : s->C;
}

/* Position p's columns of F (kf = C - S, position p's at p (K - 1) + a', a'
 * the classes but k) from S's (block-diagonal: only the position's K rows
 * are non-zero): x = sqrt(p) over its classes, v = x + |x| e_k,
 * F_a = S_a - (2 v_a / v.v) S v for a != k.  w: 2K doubles. */
static void position_factor(const cv_loss_state *s, int i, int p, const double *S, int kf,
                            double *w, double *F)
{
    size_t C = (size_t)s->C, base = pos_off(s, p);
    const float *pr = s->prob + (size_t)i * C;
    int K = s->K, k = 0;
    double *v = w, *Sv = w + K, nx = 0, vv = 0;
    for (int a = 0; a < K; a++) {
        v[a] = sqrt((double)pr[base + (size_t)a * s->cs]);
        nx += v[a] * v[a];
        k = v[a] > v[k] ? a : k;
    }
    v[k] += sqrt(nx);
    for (int a = 0; a < K; a++)
        vv += v[a] * v[a];
    for (int r = 0; r < K; r++) {
        const double *Sr = S + (base + (size_t)r * s->cs) * C + base;
        Sv[r] = 0;
        for (int b = 0; b < K; b++)
            Sv[r] += Sr[(size_t)b * s->cs] * v[b];
    }
    for (int a = 0, col = p * (K - 1); a < K; a++) {
        if (a == k)
            continue;
        double f = 2.0 * v[a] / vv;
        size_t qa = base + (size_t)a * s->cs;
        for (int r = 0; r < K; r++) {
            size_t qr = base + (size_t)r * s->cs;
            F[qr * (size_t)kf + (size_t)col] = S[qr * C + qa] - f * Sv[r];
        }
        col++;
    }
}

int cv_loss_hessian_factor(const cv_loss_state *s, int i, double *S, double *F)
{
    int C = s->C, kf = cv_loss_factor_columns(s);
    cv_loss_hessian_sqrt(s, i, kf == C ? F : S);
    if (kf == C)
        return 0;
    double *w = malloc(sizeof(double) * 2 * (size_t)s->K);
    if (!w)
        return -1;
    memset(F, 0, sizeof(double) * (size_t)C * kf);
    for (int p = 0; p < s->S; p++)
        if (!ignored(s, i, p))
            position_factor(s, i, p, S, kf, w, F);
    free(w);
    return 0;
}
