/* reorth.c - Gram-Schmidt of a double vector against a float32 basis shadow
 * (see reorth.h). */
#include "reorth.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

#include "est_util.h"

/* w -= y; returns ||w|| (one pass instead of two; four partial sums keep
 * the loop at streaming speed; where the sum of squares under- or
 * overflows, cv_est_norm's scaled fallback). */
static double sub_norm(size_t n, double *w, const float *y)
{
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        double t0 = w[i] - y[i], t1 = w[i + 1] - y[i + 1];
        double t2 = w[i + 2] - y[i + 2], t3 = w[i + 3] - y[i + 3];
        w[i] = t0, w[i + 1] = t1, w[i + 2] = t2, w[i + 3] = t3;
        s0 += t0 * t0, s1 += t1 * t1, s2 += t2 * t2, s3 += t3 * t3;
    }
    for (; i < n; i++) {
        w[i] -= y[i];
        s0 += w[i] * w[i];
    }
    double ss = (s0 + s1) + (s2 + s3);
    if (ss > 1e-280 && ss < 1e280)
        return sqrt(ss);
    return cv_est_norm(n, w);
}

/* One pass: c = Vf^T w, w -= Vf c (through float32 copies); h += c; returns
 * ||w|| afterwards.  shadowed: work's wf already holds w in float32. */
static double cgs_pass(size_t n, int j, const float *Vf, double *w, double *h, float *work,
                       int shadowed)
{
    float *wf = work, *y = work + n, *c = work + 2 * n;
    if (!shadowed)
        cv_reorth_shadow(n, w, wf);
    cblas_sgemv(CblasColMajor, CblasTrans, (int)n, j, 1.0f, Vf, (int)n, wf, 1, 0.0f, c, 1);
    cblas_sgemv(CblasColMajor, CblasNoTrans, (int)n, j, 1.0f, Vf, (int)n, c, 1, 0.0f, y, 1);
    for (int i = 0; h && i < j; i++)
        h[i] += c[i];
    return sub_norm(n, w, y);
}

double cv_reorth_cgs_shadowed(size_t n, int j, const float *Vf, double *w, double norm,
                              double *h, float *work)
{
    if (h)
        memset(h, 0, sizeof(double) * (size_t)j);
    double before = norm, after = before;
    for (int pass = 0; pass < 2 && j > 0; pass++) {
        after = cgs_pass(n, j, Vf, w, h, work, pass == 0);
        if (after >= M_SQRT1_2 * before)
            break;
        before = after;
    }
    return after;
}

double cv_reorth_cgs(size_t n, int j, const float *Vf, double *w, double *h, float *work)
{
    if (j > 0)
        cv_reorth_shadow(n, w, work);
    return cv_reorth_cgs_shadowed(n, j, Vf, w, cv_est_norm(n, w), h, work);
}

void cv_reorth_shadow(size_t n, const double *src, float *dst)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = (float)src[i];
}
