/* loss.c - MSELoss, CrossEntropyLoss and BCEWithLogitsLoss: values, output
 * gradients, Hessian products, Monte Carlo gradient samples, Hessian roots. */
#include "loss.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

double cv_loss_scale(cv_loss_type t, cv_reduction r, size_t n, int C)
{
    if (r == CV_RED_SUM)
        return 1.0;
    return t == CV_LOSS_CE ? 1.0 / (double)n : 1.0 / ((double)n * C);
}

static double softmax_row(const float *h, int C, float *p)
{
    double mx = h[0], z = 0;
    for (int c = 1; c < C; c++)
        if (h[c] > mx)
            mx = h[c];
    for (int c = 0; c < C; c++)
        z += exp((double)h[c] - mx);
    double lse = mx + log(z);
    for (int c = 0; c < C; c++)
        p[c] = (float)exp((double)h[c] - lse);
    return lse;
}

static double sample_loss(const cv_loss_state *s, int i)
{
    const float *h = s->h + (size_t)i * s->C;
    double l = 0;
    if (s->type == CV_LOSS_CE) {
        double mx = h[0], z = 0;
        for (int c = 1; c < s->C; c++)
            if (h[c] > mx)
                mx = h[c];
        for (int c = 0; c < s->C; c++)
            z += exp((double)h[c] - mx);
        return mx + log(z) - h[s->labels[i]];
    }
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

int cv_loss_eval(cv_loss_state *s, const cv_model *m, const cv_batch *b, const float *h,
                 double *loss, float *gh)
{
    memset(s, 0, sizeof *s);
    s->type = m->loss;
    s->n = (int)b->n;
    s->C = cv_model_output_dim(m);
    s->scale = cv_loss_scale(m->loss, m->reduction, b->n, s->C);
    s->h = h;
    s->labels = b->labels;
    s->targets = b->targets;
    size_t len = (size_t)s->n * s->C;
    s->prob = malloc(sizeof(float) * len);
    if (!s->prob)
        return -1;
    for (int i = 0; i < s->n; i++) {
        const float *hi = h + (size_t)i * s->C;
        float *pi = s->prob + (size_t)i * s->C;
        if (s->type == CV_LOSS_CE)
            softmax_row(hi, s->C, pi);
        else if (s->type == CV_LOSS_BCE)
            for (int c = 0; c < s->C; c++)
                pi[c] = (float)(1.0 / (1.0 + exp(-(double)hi[c])));
    }
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

void cv_loss_sample_grad(const cv_loss_state *s, float *g)
{
    int C = s->C;
    for (int i = 0; i < s->n; i++) {
        const float *h = s->h + (size_t)i * C, *p = s->prob + (size_t)i * C;
        float *gi = g + (size_t)i * C;
        for (int c = 0; c < C; c++) {
            if (s->type == CV_LOSS_CE)
                gi[c] = p[c] - (c == s->labels[i] ? 1.0f : 0.0f);
            else if (s->type == CV_LOSS_MSE)
                gi[c] = 2.0f * (h[c] - s->targets[(size_t)i * C + c]);
            else
                gi[c] = p[c] - s->targets[(size_t)i * C + c];
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
            if (s->type == CV_LOSS_CE) {
                double dot = 0;
                for (int c = 0; c < C; c++)
                    dot += (double)p[c] * ri[c];
                for (int c = 0; c < C; c++)
                    oi[c] = (float)(c0 * p[c] * (ri[c] - dot));
            } else if (s->type == CV_LOSS_MSE) {
                for (int c = 0; c < C; c++)
                    oi[c] = (float)(2.0 * c0 * ri[c]);
            } else {
                for (int c = 0; c < C; c++)
                    oi[c] = (float)(c0 * p[c] * (1.0 - p[c]) * ri[c]);
            }
        }
}

static int sample_categorical(const float *p, int C, cv_rng *rng)
{
    double u = cv_rng_uniform(rng), acc = 0;
    for (int c = 0; c < C; c++) {
        acc += p[c];
        if (u < acc)
            return c;
    }
    return C - 1;
}

void cv_loss_sample_mc(const cv_loss_state *s, cv_rng *rng, int mc, float *S)
{
    int C = s->C;
    for (int m = 0; m < mc; m++)
        for (int i = 0; i < s->n; i++) {
            const float *p = s->prob + (size_t)i * C;
            float *si = S + ((size_t)m * s->n + i) * C;
            if (s->type == CV_LOSS_CE) {
                int y = sample_categorical(p, C, rng);
                for (int c = 0; c < C; c++)
                    si[c] = p[c] - (c == y ? 1.0f : 0.0f);
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

void cv_loss_hessian_sqrt(const cv_loss_state *s, int i, double *S)
{
    int C = s->C;
    double sc = sqrt(s->scale);
    const float *p = s->prob + (size_t)i * C;
    memset(S, 0, sizeof(double) * (size_t)C * C);
    for (int a = 0; a < C; a++) {
        if (s->type == CV_LOSS_CE) {
            /* S = diag(sqrt p) - p sqrt(p)^T */
            for (int b = 0; b < C; b++)
                S[(size_t)a * C + b] = sc * ((a == b ? sqrt(p[a]) : 0.0) - p[a] * sqrt(p[b]));
        } else if (s->type == CV_LOSS_MSE) {
            S[(size_t)a * C + a] = sc * M_SQRT2;
        } else {
            S[(size_t)a * C + a] = sc * sqrt(p[a] * (1.0 - p[a]));
        }
    }
}
