/* solve_block.h - block conjugate gradients for several right-hand sides
 * (engine/solve_block.c); called by cv_solve_many (estimators.h) for method
 * block_cg. */
#ifndef CV_SOLVE_BLOCK_H
#define CV_SOLVE_BLOCK_H

#include "estimators.h"

/* The k systems (A + o->damping I) x_j = b_j (b_j column j of B, n x k
 * column-major) by block CG from x = 0, at most max_iter block iterations,
 * each applying A to the current search block (at most the unconverged
 * systems' count of columns, fewer once directions become dependent).
 * Fills out[j].x, .n, .iterations (the iteration at which system j met tol,
 * or the last one), .converged and .matvecs (the columns applied in all,
 * the same for every system); the caller computes the residuals.
 * Refuses (CV_EINVAL "not_positive_definite", field options.damping) when
 * the damped operator is not positive definite on the search block.
 * Memory: 5k vectors of n doubles.  0, or -1 with e (out[j].x may be set:
 * the caller frees). */
int cv_solve_block_cg(const cv_linop *op, int k, const double *B, const cv_solve_options *o,
                      int max_iter, cv_solve_result *out, cv_err *e);

#endif
