/* broadcast.h - PyTorch broadcasting of two per-sample shapes: the result
 * shape (right-aligned, size-1 dimensions expand, ranks may differ) and a
 * walk over the result in rows, with the offsets of both operands, for
 * elementwise kernels of two inputs (add, mul, masked_fill).  Adjacent
 * dimensions that both operands traverse alike are merged, so equal shapes
 * are one row and [T, d] + [d] is T rows of d. */
#ifndef CV_BROADCAST_H
#define CV_BROADCAST_H

#include <stddef.h>

#include "model.h"

typedef struct {
    int rank;                   /* of the merged walk, 1..CV_MAX_RANK */
    int dim[CV_MAX_RANK];       /* merged result extents; rows are dim[rank - 1] long */
    size_t sa[CV_MAX_RANK];     /* strides (floats) of a per merged dimension, 0 where
                                 * a is broadcast */
    size_t sb[CV_MAX_RANK];     /* the same for b */
    size_t na, nb, nz;          /* numel of a, b and the result */
    size_t rows, len;           /* nz = rows * len */
    size_t ia, ib;              /* strides of a and b along a row: 0 or 1 */
} cv_bcast;

/* The broadcast shape of a and b into *out; -1 when a dimension differs
 * and neither is 1 (out untouched). */
int cv_bcast_shape(const cv_shape *a, const cv_shape *b, cv_shape *out);

/* The walk over the broadcast of a and b (which must broadcast). */
void cv_bcast_init(cv_bcast *w, const cv_shape *a, const cv_shape *b);

/* Offsets of row r's first entry in a and b (the result's is r * len). */
static inline void cv_bcast_row(const cv_bcast *w, size_t r, size_t *oa, size_t *ob)
{
    size_t a = 0, b = 0;
    for (int d = w->rank - 2; d >= 0; d--) {
        size_t i = r % (size_t)w->dim[d];
        r /= (size_t)w->dim[d];
        a += i * w->sa[d];
        b += i * w->sb[d];
    }
    *oa = a;
    *ob = b;
}

#endif
