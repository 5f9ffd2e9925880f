/* conv_direct.h - direct (no im2col) stride-1 convolution for CPUs with
 * AVX-512 (checked at run time): each sample's zero-padded input planes stay
 * in cache while a register tile of 64 output channels x 7 output columns
 * (32 x 14 or 16 x 14 when cout is not a multiple of 64) accumulates over all
 * input channels and taps; and the matching weight gradients.  Used by Conv2d
 * for the convolutions of its products (forward, tangents, input cotangents
 * as the transposed convolution, weight gradients) where the geometry
 * allows; elsewhere im2col + sgemm.  Sums run over (input channel, tap row,
 * tap column) in that order for every output, whatever the thread count. */
#ifndef CV_CONV_DIRECT_H
#define CV_CONV_DIRECT_H

#include <stddef.h>

#include "im2col.h"

#define CV_DCONV_RUN 14 /* output columns per register block */

/* Whether cv_dconv_run handles geometry g (stride 1, dilation 1, output
 * plane of PyTorch's formula without extra padding, padding below the
 * kernel size) with cout output channels (a multiple of 16) on this CPU. */
int cv_dconv_supported(const cv_conv_geom *g, int cout);

/* The transposed geometry: input cotangents gx = conv(gy, W') of a
 * supported g, with C' = cout, planes oh x ow -> H x W, padding k-1-p. */
cv_conv_geom cv_dconv_transposed(const cv_conv_geom *g, int cout);

/* Floats of the packed weights of g with cout outputs: C*kh*kw*cout. */
size_t cv_dconv_packed_floats(const cv_conv_geom *g, int cout);

/* Packs W [cout][C][kh][kw] for cv_dconv_run: Wp[((c*kh + i)*kw + j)*cout + o]. */
void cv_dconv_pack(const cv_conv_geom *g, int cout, const float *W, float *Wp);

/* Packs W of geometry g for the transposed convolution cv_dconv_transposed(g):
 * W'[o'=c][c'=o][i][j] = W[o][c][kh-1-i][kw-1-j]. */
void cv_dconv_pack_transposed(const cv_conv_geom *g, int cout, const float *W, float *Wp);

/* For samples s < n: y_s (cout x oh x ow at y + s*ystride) = conv(x_s, W)
 * (+ bias[o] if bias) (+ y_s if add), x_s at x + s*xstride ([C][H][W]).
 * Wp from cv_dconv_pack (or _transposed for the transposed geometry).
 * Runs on cv_parallel_for over samples; the padded planes of a sample sit
 * on the stack (cv_dconv_supported bounds them at 128 KiB). */
void cv_dconv_run(const cv_conv_geom *g, int cout, const float *Wp, const float *bias, int n,
                 const float *x, size_t xstride, float *y, size_t ystride, int add);

/* ---- weight gradients ----------------------------------------------------
 * gW[o][c][i][j] = sum over samples s and positions p of gy_s[o][p] times
 * the input under tap (i, j) at p: per (16 or 32 output channels, input
 * channel, tap row) the kw tap columns accumulate in registers, samples in
 * order, so the sums do not depend on the thread count. */

/* Whether cv_dconv_weight_grad handles g with cout outputs (as
 * cv_dconv_supported, and kw <= 7). */
int cv_dconv_wgrad_supported(const cv_conv_geom *g, int cout);

/* Scratch floats cv_dconv_weight_grad needs. */
size_t cv_dconv_wgrad_scratch(const cv_conv_geom *g, int cout);

/* gW (cout x C*kh*kw, PyTorch's layout) (+ gW if add) = the weight gradient
 * of y = conv(x, W) for cotangents gy, over n samples (x_s at x + s*xstride,
 * gy_s at gy + s*gystride). */
void cv_dconv_weight_grad(const cv_conv_geom *g, int cout, int n, const float *x,
                          size_t xstride, const float *gy, size_t gystride, int add, float *gW,
                          float *scratch);

#endif
