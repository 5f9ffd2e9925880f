/* linear_sparse.h - a Linear layer's input cotangents gx = gy W from output
 * cotangents whose rows share their zeros, for CPUs with AVX-512 (checked at
 * run time).  A backward walk of k stacked vectors through a ReLU brings to
 * the Linear before it k rows per sample that are zero on the same units
 * (those the ReLU switched off, about half): row r of every block j
 * (row j*n + r) only needs the rows of W of the units where one of the k
 * rows is non-zero.  Per row group (r), the non-zero units are listed once
 * and register tiles of up to 9 rows x 48 inputs (12 x 32) sum W's rows of the
 * listed units, in unit order (the same sums whatever the thread count). */
#ifndef CV_LINEAR_SPARSE_H
#define CV_LINEAR_SPARSE_H

#include <stddef.h>

/* 1 when cv_lsparse_vjp handles k blocks of n rows of out cotangents (this
 * CPU has AVX-512, k >= CV_LSPARSE_MIN_K) and, judged on the first rows,
 * the units non-zero in some of a group's k rows are at most
 * CV_LSPARSE_MAX_DENSITY of out. */
int cv_lsparse_worth(int k, int n, int out, const float *gy);

/* gx (k*n x in, row-major) = gy (k*n x out) W (out x in): the row groups
 * split over cv_parallel_for.  Only after cv_lsparse_worth returned 1. */
void cv_lsparse_vjp(int k, int n, int out, int in, const float *gy, const float *W, float *gx);

#define CV_LSPARSE_MIN_K 4
#define CV_LSPARSE_MAX_DENSITY 0.7

#endif
