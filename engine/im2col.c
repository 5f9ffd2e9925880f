/* im2col.c - unfold/fold of conv samples (im2col, col2im) and the Gram
 * accumulation G += B B^T used by the Conv2d and BatchNorm Gram kernels. */
#include "im2col.h"

#include <cblas.h>
#include <stdlib.h>
#include <string.h>

/* Output positions o in [*lo, *hi) whose input index o*s - p + t*d lies in [0, n). */
static void valid_range(int n, int out, int s, int p, int t, int d, int *lo, int *hi)
{
    int off = t * d - p; /* input index of output 0 */
    int a = off >= 0 ? 0 : (-off + s - 1) / s;
    int last = n - 1 - off; /* o*s <= last */
    int b = last < 0 ? 0 : last / s + 1;
    *lo = a;
    *hi = b < out ? b : out;
    if (*hi < *lo)
        *hi = *lo;
}

void cv_im2col(const cv_conv_geom *g, const float *x, int r0, int r1, float *cols)
{
    cv_im2col_ld(g, x, r0, r1, cols, (size_t)g->oh * g->ow);
}

/* d[t] += s[t] for t < n; blocks of 8 so that the compiler vectorizes. */
static void add_run(float *restrict d, const float *restrict s, int n)
{
    int t = 0;
    for (; t + 8 <= n; t += 8)
        for (int q = 0; q < 8; q++)
            d[t + q] += s[t + q];
    for (; t < n; t++)
        d[t] += s[t];
}

/* One unfolded row when stride is 1 and ow == W: the valid taps of all
 * output rows form one contiguous run of the input plane, so it is copied
 * at once and the entries that wrapped around a row edge are zeroed. */
static void im2col_row_flat(const cv_conv_geom *g, const float *xc, int i, int j, float *dst)
{
    int y0, y1, x0, x1, ow = g->ow;
    valid_range(g->H, g->oh, 1, g->ph, i, g->dh, &y0, &y1);
    valid_range(g->W, ow, 1, g->pw, j, g->dw, &x0, &x1);
    if (y1 <= y0 || x1 <= x0) {
        memset(dst, 0, sizeof(float) * (size_t)g->oh * ow);
        return;
    }
    long off = (long)(i * g->dh - g->ph) * g->W + j * g->dw - g->pw;
    size_t a = (size_t)y0 * ow + x0, b = (size_t)(y1 - 1) * ow + x1;
    memset(dst, 0, sizeof(float) * a);
    memcpy(dst + a, xc + (long)a + off, sizeof(float) * (b - a));
    memset(dst + b, 0, sizeof(float) * ((size_t)g->oh * ow - b));
    for (int t = 0; t < x0; t++) /* column-wise: short runs, no library calls */
        for (int oy = y0 + 1; oy < y1; oy++)
            dst[(size_t)oy * ow + t] = 0.0f;
    for (int t = x1; t < ow; t++)
        for (int oy = y0; oy < y1 - 1; oy++)
            dst[(size_t)oy * ow + t] = 0.0f;
}

void cv_im2col_ld(const cv_conv_geom *g, const float *x, int r0, int r1, float *cols,
                  size_t ld)
{
    int P = g->oh * g->ow, flat = g->sh == 1 && g->sw == 1 && g->ow == g->W;
    for (int r = r0; r < r1; r++) {
        int c = r / (g->kh * g->kw), i = (r / g->kw) % g->kh, j = r % g->kw;
        float *dst = cols + (size_t)(r - r0) * ld;
        const float *xc = x + (size_t)c * g->H * g->W;
        if (flat) {
            im2col_row_flat(g, xc, i, j, dst);
            continue;
        }
        int y0, y1, x0, x1;
        valid_range(g->H, g->oh, g->sh, g->ph, i, g->dh, &y0, &y1);
        valid_range(g->W, g->ow, g->sw, g->pw, j, g->dw, &x0, &x1);
        if (y0 > 0 || y1 < g->oh || x0 > 0 || x1 < g->ow)
            memset(dst, 0, sizeof(float) * (size_t)P);
        for (int oy = y0; oy < y1; oy++) {
            const float *src = xc + (size_t)(oy * g->sh - g->ph + i * g->dh) * g->W;
            float *d = dst + (size_t)oy * g->ow;
            int ix = x0 * g->sw - g->pw + j * g->dw;
            if (g->sw == 1)
                memcpy(d + x0, src + ix, sizeof(float) * (size_t)(x1 - x0));
            else
                for (int ox = x0; ox < x1; ox++, ix += g->sw)
                    d[ox] = src[ix];
        }
    }
}

void cv_col2im_add(const cv_conv_geom *g, const float *cols, float *x)
{
    cv_col2im_add_ld(g, cols, (size_t)g->oh * g->ow, x);
}

void cv_col2im_add_ld(const cv_conv_geom *g, const float *cols, size_t ld, float *x)
{
    int rows = g->C * g->kh * g->kw;
    for (int r = 0; r < rows; r++) {
        int c = r / (g->kh * g->kw), i = (r / g->kw) % g->kh, j = r % g->kw;
        const float *src = cols + (size_t)r * ld;
        float *xc = x + (size_t)c * g->H * g->W;
        int y0, y1, x0, x1;
        valid_range(g->H, g->oh, g->sh, g->ph, i, g->dh, &y0, &y1);
        valid_range(g->W, g->ow, g->sw, g->pw, j, g->dw, &x0, &x1);
        for (int oy = y0; oy < y1; oy++) {
            float *d = xc + (size_t)(oy * g->sh - g->ph + i * g->dh) * g->W;
            const float *s = src + (size_t)oy * g->ow;
            int ix = x0 * g->sw - g->pw + j * g->dw;
            if (g->sw == 1)
                add_run(d + ix, s + x0, x1 - x0);
            else
                for (int ox = x0; ox < x1; ox++, ix += g->sw)
                    d[ix] += s[ox];
        }
    }
}

int cv_gram_add_rows(int R, int w, const float *B, double *G)
{
    if (R < 1 || w < 1)
        return 0;
    float *S = malloc(sizeof(float) * (size_t)R * R);
    if (!S) {
        for (int r = 0; r < R; r++)
            for (int q = r; q < R; q++) {
                double v = cblas_sdot(w, B + (size_t)r * w, 1, B + (size_t)q * w, 1);
                G[(size_t)r * R + q] += v;
                if (q != r)
                    G[(size_t)q * R + r] += v;
            }
        return -1;
    }
    cblas_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, R, w, 1.0f, B, w, 0.0f, S, R);
    for (int r = 0; r < R; r++)
        for (int q = r; q < R; q++) {
            double v = S[(size_t)r * R + q];
            G[(size_t)r * R + q] += v;
            if (q != r)
                G[(size_t)q * R + r] += v;
        }
    free(S);
    return 0;
}
