/* im2col.h - unfold/fold of one [C, H, W] sample for Conv2d as GEMM, and the
 * G += B B^T accumulation shared by the Gram kernels. */
#ifndef CV_IM2COL_H
#define CV_IM2COL_H

#include <stddef.h>

/* Geometry of a 2-d convolution (PyTorch's stride/padding/dilation). */
typedef struct {
    int C, H, W;      /* input sample */
    int kh, kw;       /* kernel */
    int sh, sw;       /* stride */
    int ph, pw;       /* zero padding on the top / left; the bottom / right padding
                       * is implied by oh, ow (more than ph, pw where padding="same"
                       * meets an even effective kernel) */
    int dh, dw;       /* dilation */
    int oh, ow;       /* output plane */
} cv_conv_geom;

/* Rows [r0, r1) of the unfolded sample: row r = (c*kh + i)*kw + j holds,
 * for every output position p = oy*ow + ox, the input value under kernel
 * tap (i, j) (0 in the padding).  cols is (r1 - r0) x (oh*ow), row-major. */
void cv_im2col(const cv_conv_geom *g, const float *x, int r0, int r1, float *cols);

/* cv_im2col with row stride ld >= oh*ow (row r at cols + (r - r0)*ld), so
 * that the columns of several samples can sit side by side in one matrix. */
void cv_im2col_ld(const cv_conv_geom *g, const float *x, int r0, int r1, float *cols,
                  size_t ld);

/* The adjoint of cv_im2col over all C*kh*kw rows: x += fold(cols). */
void cv_col2im_add(const cv_conv_geom *g, const float *cols, float *x);

/* cv_col2im_add reading rows of stride ld. */
void cv_col2im_add_ld(const cv_conv_geom *g, const float *cols, size_t ld, float *x);

/* G += B B^T for B (R x w floats, row-major), G (R x R doubles, symmetric,
 * row-major).  Returns 0, or -1 if it could not allocate its R x R float
 * scratch, in which case it falls back to dot products (still correct). */
int cv_gram_add_rows(int R, int w, const float *B, double *G);

#endif
