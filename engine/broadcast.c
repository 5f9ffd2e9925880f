/* broadcast.c - PyTorch broadcasting of two per-sample shapes and the merged
 * row walk over the result (API in broadcast.h). */
#include "broadcast.h"

#include <string.h>

/* dimension d of s counted from the right (0 = last), 1 beyond its rank */
static int dim_from_right(const cv_shape *s, int d)
{
    return d < s->rank ? s->dim[s->rank - 1 - d] : 1;
}

int cv_bcast_shape(const cv_shape *a, const cv_shape *b, cv_shape *out)
{
    cv_shape o;
    memset(&o, 0, sizeof o);
    o.rank = a->rank > b->rank ? a->rank : b->rank;
    for (int d = 0; d < o.rank; d++) {
        int x = dim_from_right(a, d), y = dim_from_right(b, d);
        if (x != y && x != 1 && y != 1)
            return -1;
        o.dim[o.rank - 1 - d] = x == 1 ? y : x;
    }
    *out = o;
    return 0;
}

void cv_bcast_init(cv_bcast *w, const cv_shape *a, const cv_shape *b)
{
    cv_shape o;
    memset(w, 0, sizeof *w);
    if (cv_bcast_shape(a, b, &o))
        return;
    w->na = cv_shape_numel(a);
    w->nb = cv_shape_numel(b);
    w->nz = cv_shape_numel(&o);
    /* per result dimension, left to right: extent and both strides */
    int ext[CV_MAX_RANK];
    size_t sa[CV_MAX_RANK], sb[CV_MAX_RANK], ra = 1, rb = 1;
    for (int d = 0; d < o.rank; d++) { /* d counted from the right */
        int x = dim_from_right(a, d), y = dim_from_right(b, d), i = o.rank - 1 - d;
        ext[i] = o.dim[i];
        sa[i] = x == 1 ? 0 : ra;
        sb[i] = y == 1 ? 0 : rb;
        ra *= (size_t)x;
        rb *= (size_t)y;
    }
    /* merge: drop extent-1 dimensions, join d into the previous kept one when
     * both operands step through them as one */
    int r = 0;
    for (int i = 0; i < o.rank; i++) {
        if (ext[i] == 1)
            continue;
        if (r > 0 && w->sa[r - 1] == sa[i] * (size_t)ext[i] &&
            w->sb[r - 1] == sb[i] * (size_t)ext[i]) {
            w->dim[r - 1] *= ext[i];
            w->sa[r - 1] = sa[i];
            w->sb[r - 1] = sb[i];
            continue;
        }
        w->dim[r] = ext[i];
        w->sa[r] = sa[i];
        w->sb[r] = sb[i];
        r++;
    }
    if (r == 0) { /* a single entry */
        w->dim[0] = 1;
        r = 1;
    }
    w->rank = r;
    w->len = (size_t)w->dim[r - 1];
    w->rows = w->nz / w->len;
    w->ia = w->sa[r - 1];
    w->ib = w->sb[r - 1];
}
