/* dataset.c - dataset memory, batch selection and dataset/model compatibility checks. */
#include "dataset.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void cv_dataset_free(cv_dataset *d)
{
    if (!d)
        return;
    free(d->x);
    free(d->labels);
    free(d->targets);
    memset(d, 0, sizeof *d);
}

static int same_shape(const cv_shape *a, const cv_shape *b)
{
    if (a->rank != b->rank)
        return 0;
    for (int i = 0; i < a->rank; i++)
        if (a->dim[i] != b->dim[i])
            return 0;
    return 1;
}

static size_t y_numel(const cv_dataset *d)
{
    return d->y_is_index ? 1 : cv_shape_numel(&d->y_shape);
}

/* Allocates an empty batch of count samples shaped like d. */
static int batch_alloc(const cv_dataset *d, size_t count, cv_batch *out, cv_err *e)
{
    size_t sx = cv_shape_numel(&d->x_shape), sy = y_numel(d);
    size_t esz = d->y_is_index ? sizeof(int64_t) : sizeof(float);
    if ((sx && count > SIZE_MAX / sizeof(float) / sx) || (sy && count > SIZE_MAX / esz / sy))
        return cv_err_set(e, CV_ETOOLARGE, "too_large", "batch", "batch of %zu samples is too "
                          "large", count);
    out->n = count;
    out->x_shape = d->x_shape;
    out->y_shape = d->y_shape;
    out->y_is_index = d->y_is_index;
    out->x = malloc((count * sx > 0 ? count * sx : 1) * sizeof(float));
    if (d->y_is_index)
        out->labels = malloc(count * sizeof(int64_t));
    else
        out->targets = malloc((count * sy > 0 ? count * sy : 1) * sizeof(float));
    if (!out->x || (d->y_is_index ? !out->labels : !out->targets)) {
        cv_dataset_free(out);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "batch",
                          "out of memory for a batch of %zu samples", count);
    }
    return 0;
}

static void copy_sample(const cv_dataset *d, size_t from, cv_batch *out, size_t to)
{
    size_t sx = cv_shape_numel(&d->x_shape), sy = y_numel(d);
    memcpy(out->x + to * sx, d->x + from * sx, sx * sizeof(float));
    if (d->y_is_index)
        out->labels[to] = d->labels[from];
    else
        memcpy(out->targets + to * sy, d->targets + from * sy, sy * sizeof(float));
}

int cv_batch_gather(const cv_dataset *d, const size_t *idx, size_t count, cv_batch *out,
                    cv_err *e)
{
    memset(out, 0, sizeof *out);
    if (count == 0)
        return cv_err_set(e, CV_EINVAL, "empty_batch", "batch.indices",
                          "batch.indices: the batch is empty");
    for (size_t i = 0; i < count; i++)
        if (idx[i] >= d->n) {
            char field[64];
            snprintf(field, sizeof field, "batch.indices[%zu]", i);
            return cv_err_set(e, CV_EINVAL, "out_of_range", field,
                              "%s: sample %zu is out of range for a dataset of %zu samples",
                              field, idx[i], d->n);
        }
    if (batch_alloc(d, count, out, e))
        return -1;
    for (size_t i = 0; i < count; i++)
        copy_sample(d, idx[i], out, i);
    return 0;
}

int cv_batch_range(const cv_dataset *d, size_t offset, size_t size, cv_batch *out, cv_err *e)
{
    memset(out, 0, sizeof *out);
    if (size == 0)
        return cv_err_set(e, CV_EINVAL, "empty_batch", "batch.size",
                          "batch.size: must be at least 1");
    if (offset >= d->n)
        return cv_err_set(e, CV_EINVAL, "out_of_range", "batch.offset",
                          "batch.offset: %zu is beyond the dataset's %zu samples", offset, d->n);
    if (size > d->n - offset)
        return cv_err_set(e, CV_EINVAL, "out_of_range", "batch.size",
                          "batch.size: samples [%zu, %zu + %zu) exceed the dataset's %zu "
                          "samples (at most %zu from offset %zu)", offset, offset, size, d->n,
                          d->n - offset, offset);
    if (batch_alloc(d, size, out, e))
        return -1;
    size_t sx = cv_shape_numel(&d->x_shape), sy = y_numel(d);
    memcpy(out->x, d->x + offset * sx, size * sx * sizeof(float));
    if (d->y_is_index)
        memcpy(out->labels, d->labels + offset, size * sizeof(int64_t));
    else
        memcpy(out->targets, d->targets + offset * sy, size * sy * sizeof(float));
    return 0;
}

int cv_dataset_check(const cv_dataset *d, const cv_model *m, cv_err *e)
{
    char a[96], b[96];
    if (!d->n || !d->x)
        return cv_err_set(e, CV_EINVAL, "empty_dataset", "x", "the dataset has no samples");
    if (!same_shape(&d->x_shape, &m->input_shape)) {
        cv_shape_str(&d->x_shape, a, sizeof a);
        cv_shape_str(&m->input_shape, b, sizeof b);
        return cv_err_set(e, CV_EINVAL, "shape_mismatch", "x",
                          "x: per-sample shape %s does not match the model's input_shape %s", a,
                          b);
    }
    const cv_shape *out = m->nlayers ? &m->layers[m->nlayers - 1].out_shape : &m->input_shape;
    cv_shape_str(out, b, sizeof b);
    size_t sx = cv_shape_numel(&d->x_shape);
    for (size_t k = 0; k < d->n * sx; k++)
        if (!isfinite(d->x[k]))
            return cv_err_set(e, CV_EINVAL, "non_finite", "x",
                              "x: non-finite value %g at sample %zu (flat index %zu)",
                              (double)d->x[k], k / sx, k);

    if (m->loss == CV_LOSS_CE) {
        if (!d->y_is_index) {
            cv_shape_str(&d->y_shape, a, sizeof a);
            return cv_err_set(e, CV_EINVAL, "target_mismatch", "y",
                              "y: CrossEntropyLoss needs integer class indices [N] (I64 or I32); "
                              "the dataset has float targets of per-sample shape %s", a);
        }
        if (!d->labels)
            return cv_err_set(e, CV_EINVAL, "empty_dataset", "y", "y: no labels");
        int64_t c = out->rank == 1 ? out->dim[0] : (int64_t)cv_shape_numel(out);
        for (size_t i = 0; i < d->n; i++)
            if (d->labels[i] < 0 || d->labels[i] >= c)
                return cv_err_set(e, CV_EINVAL, "bad_label", "y",
                                  "y[%zu] = %lld is not a class index in [0, %lld) (the model "
                                  "has %lld outputs)", i, (long long)d->labels[i], (long long)c,
                                  (long long)c);
        return 0;
    }

    const char *loss = m->loss == CV_LOSS_MSE ? "MSELoss" : "BCEWithLogitsLoss";
    if (d->y_is_index)
        return cv_err_set(e, CV_EINVAL, "target_mismatch", "y",
                          "y: %s needs float targets shaped like the model output %s per sample; "
                          "the dataset has integer class indices (store y as F32 [N, ...])",
                          loss, b);
    if (!same_shape(&d->y_shape, out)) {
        cv_shape_str(&d->y_shape, a, sizeof a);
        return cv_err_set(e, CV_EINVAL, "shape_mismatch", "y",
                          "y: per-sample target shape %s does not match the model output %s "
                          "(%s)", a, b, loss);
    }
    if (!d->targets)
        return cv_err_set(e, CV_EINVAL, "empty_dataset", "y", "y: no targets");
    size_t sy = cv_shape_numel(&d->y_shape);
    for (size_t k = 0; k < d->n * sy; k++) {
        float v = d->targets[k];
        if (!isfinite(v))
            return cv_err_set(e, CV_EINVAL, "non_finite", "y",
                              "y: non-finite value %g at sample %zu (flat index %zu)", (double)v,
                              k / sy, k);
        if (m->loss == CV_LOSS_BCE && (v < 0 || v > 1))
            return cv_err_set(e, CV_EINVAL, "bad_target", "y",
                              "y: target %g at sample %zu (flat index %zu) is outside [0, 1] "
                              "(BCEWithLogitsLoss targets are probabilities)", (double)v, k / sy,
                              k);
    }
    return 0;
}
