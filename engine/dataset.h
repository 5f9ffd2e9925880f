/* dataset.h - a batch-addressable dataset: inputs x and targets y.
 *
 * x is float32 [N, *sample_shape] row-major; integer inputs (token ids, x_dtype
 * CV_DTYPE_INT64/INT32) are held as exact float32 values (|id| <= 2^24).  y
 * is either int64 class indices [N, *y_shape] (CrossEntropyLoss, NLLLoss;
 * y_shape is [] for one class per sample, [T] for a sequence) or float32
 * targets [N, *y_shape] (MSELoss, BCEWithLogitsLoss).  A cv_batch is a view
 * (gathered copy) of some samples.
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
    cv_input_dtype x_dtype;   /* what x holds: floats (default) or integer ids */
    float *x;                 /* n * numel(x_shape) */
    int y_is_index;           /* 1: labels (int64), 0: float targets */
    int64_t *labels;          /* n * numel(y_shape), when y_is_index */
    cv_shape y_shape;         /* per-sample target (or label) shape; rank 0: [N] */
    float *targets;           /* n * numel(y_shape) */
    int borrowed;             /* 1: x/labels/targets belong to someone else (a view of
                               * another dataset, a memory-mapped file): cv_dataset_free
                               * only clears the struct */
} cv_dataset;

/* A batch: gathered samples of a dataset; owns its memory. Same layout. */
typedef cv_dataset cv_batch;

void cv_dataset_free(cv_dataset *d);

/* A new batch of count zeroed samples shaped like d (x and y). */
int cv_batch_alloc(const cv_dataset *d, size_t count, cv_batch *out, cv_err *e);
/* The same with only the targets (labels) allocated: x stays NULL. */
int cv_batch_alloc_y(const cv_dataset *d, size_t count, cv_batch *out, cv_err *e);
/* Copies sample `from` of d into sample `to` of out (shaped alike). */
void cv_batch_copy_sample(const cv_dataset *d, size_t from, cv_batch *out, size_t to);
/* Gathers samples idx[0..count) into a new batch (copy). */
int cv_batch_gather(const cv_dataset *d, const size_t *idx, size_t count, cv_batch *out,
                    cv_err *e);
/* Batch of samples [offset, offset+size). */
int cv_batch_range(const cv_dataset *d, size_t offset, size_t size, cv_batch *out, cv_err *e);
/* The same samples without a copy: out points into d (borrowed; valid while
 * d is); the caller checks the range. */
void cv_batch_view(const cv_dataset *d, size_t offset, size_t size, cv_batch *out);

/* Checks that the dataset fits the model and its loss: input shape and
 * dtype (the model's input_dtype), target shape (CE/NLL: the output without
 * its class dimension) or label range ([0, K) or the ignore_index; not every
 * label ignored), finiteness.  Names the problem in e (CV_EINVAL, field "x"
 * or "y"). */
int cv_dataset_check(const cv_dataset *d, const cv_model *m, cv_err *e);

#endif
