/* dataset.h - a batch-addressable dataset: inputs x and targets y.
 *
 * x is float32 [N, *sample_shape] row-major.  y is either int64 class indices
 * [N] (CrossEntropyLoss) or float32 targets [N, *target_shape] (MSELoss,
 * BCEWithLogitsLoss).  A cv_batch is a view (gathered copy) of some samples.
 */
#ifndef CV_DATASET_H
#define CV_DATASET_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "model.h"

typedef struct {
    size_t n;                 /* samples */
    cv_shape x_shape;         /* per-sample input shape */
    float *x;                 /* n * numel(x_shape) */
    int y_is_index;           /* 1: labels (int64), 0: float targets */
    int64_t *labels;          /* n, when y_is_index */
    cv_shape y_shape;         /* per-sample target shape, when !y_is_index */
    float *targets;           /* n * numel(y_shape) */
} cv_dataset;

/* A batch: gathered samples of a dataset; owns its memory. Same layout. */
typedef cv_dataset cv_batch;

void cv_dataset_free(cv_dataset *d);

/* Gathers samples idx[0..count) into a new batch (copy). */
int cv_batch_gather(const cv_dataset *d, const size_t *idx, size_t count, cv_batch *out,
                    cv_err *e);
/* Batch of samples [offset, offset+size). */
int cv_batch_range(const cv_dataset *d, size_t offset, size_t size, cv_batch *out, cv_err *e);

/* Checks that the dataset fits the model and its loss: input shape, target
 * shape or label range, finiteness.  Names the problem in e. */
int cv_dataset_check(const cv_dataset *d, const cv_model *m, cv_err *e);

#endif
