/* func_shape.h - what the function classes of the graph form share (engine/
 * func_*.c): resolving a PyTorch dimension attribute, which counts the batch
 * dimension (0 = batch, negative from the end of the full rank), to a
 * per-sample axis, refusing the batch dimension. */
#ifndef CV_FUNC_SHAPE_H
#define CV_FUNC_SHAPE_H

#include "layer.h"

/* The per-sample axis (0..rank-1) of attribute value dim for a per-sample
 * rank `rank` (full rank rank + 1) into *axis; or -1 with e naming attr
 * (e->field = attr, message "attr: ...") when dim is out of range or the
 * batch dimension.  what: how the message names the value ("dim",
 * "dims[2]"), attr when NULL. */
int cv_func_axis(int dim, int rank, const char *attr, const char *what, int *axis, cv_err *e);

/* Refuses (at parse time, before shapes are known) a dimension attribute
 * that is literally 0, the batch dimension: -1 with e naming attr. */
int cv_func_not_batch(int dim, const char *attr, const char *what, cv_err *e);

#endif
