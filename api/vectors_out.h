/* vectors_out.h - moving a result's large vectors out of the JSON into a
 * safetensors file (`curvd run --vectors-out FILE`), so PyTorch users load
 * eigenvectors, gradients and steps with safetensors instead of parsing
 * millions of JSON numbers. */
#ifndef CV_VECTORS_OUT_H
#define CV_VECTORS_OUT_H

#include <cJSON.h>

#include "engine/err.h"

/* Finds the vector fields of a job result (eigenvectors, gradient, step,
 * solution, product, diag, per_sample_gradients, matrix; also inside
 * result.blocks[i]), writes them as F64 tensors named FIELD or
 * blocks.I.FIELD to the safetensors file `path`, and replaces each in the
 * JSON by {"file": path, "tensor": name, "shape": [...]}.  A list of k lists
 * of D numbers becomes a [k, D] tensor.  Returns the number of tensors
 * written, or -1 with e filled. */
int cv_result_vectors_out(cJSON *result, const char *path, cv_err *e);

#endif
