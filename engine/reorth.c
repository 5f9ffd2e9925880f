/* reorth.c - Gram-Schmidt of a double vector against a float32 basis shadow
 * (see reorth.h). */
#include "reorth.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

#include "est_util.h"

/* One pass: c = Vf^T w, w -= Vf c (through float32 copies); h += c. */
static void cgs_pass(size_t n, int j, const float *Vf, double *w, double *h, float *work)
{
    float *wf = work, *y = work + n, *c = work + 2 * n;
    cv_reorth_shadow(n, w, wf);
    cblas_sgemv(CblasColMajor, CblasTrans, (int)n, j, 1.0f, Vf, (int)n, wf, 1, 0.0f, c, 1);
    cblas_sgemv(CblasColMajor, CblasNoTrans, (int)n, j, 1.0f, Vf, (int)n, c, 1, 0.0f, y, 1);
    for (size_t i = 0; i < n; i++)
        w[i] -= y[i];
    for (int i = 0; h && i < j; i++)
        h[i] += c[i];
}

double cv_reorth_cgs(size_t n, int j, const float *Vf, double *w, double *h, float *work)
{
    if (h)
        memset(h, 0, sizeof(double) * (size_t)j);
    double before = cv_est_norm(n, w), after = before;
    for (int pass = 0; pass < 2 && j > 0; pass++) {
        cgs_pass(n, j, Vf, w, h, work);
        after = cv_est_norm(n, w);
        if (after >= M_SQRT1_2 * before)
            break;
        before = after;
    }
    return after;
}

void cv_reorth_shadow(size_t n, const double *src, float *dst)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = (float)src[i];
}
