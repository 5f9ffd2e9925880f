/* reorth.h - full reorthogonalization against a float32 shadow of a basis.
 *
 * Lanczos keeps its basis in double, but each step's reorthogonalization
 * streams the whole basis from memory, the dominant cost for large n.  After
 * the three-term recurrence the components left to remove are round-off
 * sized, so they are projected out through a float32 copy of the basis
 * (OpenBLAS sgemv, reading half the bytes of dgemv): the basis then stays
 * orthogonal to about float32 precision (~1e-7), the level of the float32
 * operator's own error and of PyHessian's float32 Lanczos.
 *
 * cv_reorth_cgs: w -= Vf (Vf^T w) (classical Gram-Schmidt against the j
 * columns of Vf, n x j column-major), repeated once when the first pass
 * removed more than 1 - 1/sqrt(2) of ||w|| (DGKS).  h (j, may be NULL) gets
 * the summed coefficients.  work needs CV_REORTH_WORK(n, j) floats (j the
 * largest column count it is used with).  Returns ||w|| afterwards. */
#ifndef CV_REORTH_H
#define CV_REORTH_H

#include <stddef.h>

#define CV_REORTH_WORK(n, j) (2 * (size_t)(n) + (size_t)(j))

double cv_reorth_cgs(size_t n, int j, const float *Vf, double *w, double *h, float *work);

/* cv_reorth_cgs for a w whose float32 rounding the caller already wrote to
 * work's first n floats and whose norm ||w|| it already knows (both from
 * the pass that formed w: two passes over w fewer). */
double cv_reorth_cgs_shadowed(size_t n, int j, const float *Vf, double *w, double norm,
                              double *h, float *work);

/* dst (n floats) = src rounded to float32. */
void cv_reorth_shadow(size_t n, const double *src, float *dst);

#endif
