/* dataset.c - dataset memory, batch selection and dataset/model compatibility checks. */
#include "dataset.h"

#include "layer.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loss.h"

void cv_dataset_free(cv_dataset *d)
{
    if (!d)
        return;
    if (d->borrowed) {
        memset(d, 0, sizeof *d);
        return;
    }
    free(d->x);
    free(d->labels);
    free(d->targets);
    memset(d, 0, sizeof *d);
}

static size_t y_numel(const cv_dataset *d) { return cv_shape_numel(&d->y_shape); }

int cv_batch_alloc_y(const cv_dataset *d, size_t count, cv_batch *out, cv_err *e)
{
    memset(out, 0, sizeof *out);
    size_t sy = y_numel(d), esz = d->y_is_index ? sizeof(int64_t) : sizeof(float);
    if (sy && count > SIZE_MAX / esz / sy)
        return cv_err_set(e, CV_ETOOLARGE, "too_large", "batch", "batch of %zu samples is too "
                          "large", count);
    out->n = count;
    out->x_shape = d->x_shape;
    out->x_dtype = d->x_dtype;
    out->y_shape = d->y_shape;
    out->y_is_index = d->y_is_index;
    void *y = calloc(count * sy > 0 ? count * sy : 1, esz);
    if (d->y_is_index)
        out->labels = y;
    else
        out->targets = y;
    if (!y)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "batch",
                          "out of memory for the targets of %zu samples", count);
    return 0;
}

int cv_batch_alloc(const cv_dataset *d, size_t count, cv_batch *out, cv_err *e)
{
    size_t sx = cv_shape_numel(&d->x_shape);
    if (sx && count > SIZE_MAX / sizeof(float) / sx) {
        memset(out, 0, sizeof *out);
        return cv_err_set(e, CV_ETOOLARGE, "too_large", "batch", "batch of %zu samples is too "
                          "large", count);
    }
    if (cv_batch_alloc_y(d, count, out, e))
        return -1;
    out->x = calloc(count * sx > 0 ? count * sx : 1, sizeof(float));
    if (!out->x) {
        cv_dataset_free(out);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "batch",
                          "out of memory for a batch of %zu samples", count);
    }
    return 0;
}

void cv_batch_copy_sample(const cv_dataset *d, size_t from, cv_batch *out, size_t to)
{
    size_t sx = cv_shape_numel(&d->x_shape), sy = y_numel(d);
    memcpy(out->x + to * sx, d->x + from * sx, sx * sizeof(float));
    if (d->y_is_index)
        memcpy(out->labels + to * sy, d->labels + from * sy, sy * sizeof(int64_t));
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
    if (cv_batch_alloc(d, count, out, e))
        return -1;
    for (size_t i = 0; i < count; i++)
        cv_batch_copy_sample(d, idx[i], out, i);
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
    if (cv_batch_alloc(d, size, out, e))
        return -1;
    size_t sx = cv_shape_numel(&d->x_shape), sy = y_numel(d);
    memcpy(out->x, d->x + offset * sx, size * sx * sizeof(float));
    if (d->y_is_index)
        memcpy(out->labels, d->labels + offset * sy, size * sy * sizeof(int64_t));
    else
        memcpy(out->targets, d->targets + offset * sy, size * sy * sizeof(float));
    return 0;
}

/* "[N, d0, d1]" for a per-sample shape. */
static void batch_shape_str(const cv_shape *s, char *buf, size_t len)
{
    char inner[96];
    cv_shape_str(s, inner, sizeof inner);
    snprintf(buf, len, "[N%s%s", s->rank ? ", " : "]", s->rank ? inner + 1 : "");
}

static const char *model_dtype_name(cv_input_dtype t)
{
    return t == CV_DTYPE_INT64 ? "int64" : t == CV_DTYPE_INT32 ? "int32" : "float32";
}

/* Integer-input models take integer data (I64 or I32), float models float. */
static int check_x_dtype(const cv_dataset *d, const cv_model *m, cv_err *e)
{
    int want_int = m->input_dtype != CV_DTYPE_FLOAT32, have_int = d->x_dtype != CV_DTYPE_FLOAT32;
    if (want_int && !have_int)
        return cv_err_set(e, CV_EINVAL, "dtype_mismatch", "x",
                          "x: the model takes integer token ids (input_dtype \"%s\"); the "
                          "dataset's x holds floating-point values (store x as I64 or I32)",
                          model_dtype_name(m->input_dtype));
    if (!want_int && have_int)
        return cv_err_set(e, CV_EINVAL, "dtype_mismatch", "x",
                          "x: the model takes floating-point inputs (input_dtype \"float32\"); "
                          "the dataset's x holds integer ids (%s): store x as F32, or give "
                          "the architecture \"input_dtype\": \"int64\" for token ids",
                          d->x_dtype == CV_DTYPE_INT32 ? "I32" : "I64");
    return 0;
}

/* "y[3]" (one label per sample) or "y[3, 1, 0]" (label q of the flat array). */
static void label_index_str(const cv_shape *ls, size_t q, char *buf, size_t len)
{
    size_t S = cv_shape_numel(ls), pos = q % S;
    int idx[CV_MAX_RANK];
    for (int k = ls->rank - 1; k >= 0; k--) {
        idx[k] = (int)(pos % (size_t)ls->dim[k]);
        pos /= (size_t)ls->dim[k];
    }
    int w = snprintf(buf, len, "y[%zu", q / S);
    for (int k = 0; k < ls->rank && w > 0 && (size_t)w < len; k++)
        w += snprintf(buf + w, len - (size_t)w, ", %d", idx[k]);
    if (w > 0 && (size_t)w < len)
        snprintf(buf + w, len - (size_t)w, "]");
}

/* CrossEntropyLoss / NLLLoss: integer class indices shaped like the output
 * without its class dimension, each in [0, K) or the ignore_index. */
static int check_class_targets(const cv_dataset *d, const cv_model *m, cv_err *e)
{
    cv_loss_layout lay;
    cv_loss_layout_of(m, &lay);
    const char *loss = m->loss == CV_LOSS_NLL ? "NLLLoss" : "CrossEntropyLoss";
    char a[112], b[112], want[112], at[96];
    batch_shape_str(&lay.label_shape, want, sizeof want);
    if (!d->y_is_index) {
        cv_shape_str(&d->y_shape, a, sizeof a);
        return cv_err_set(e, CV_EINVAL, "target_mismatch", "y",
                          "y: %s needs integer class indices %s (I64 or I32); the dataset has "
                          "float targets of per-sample shape %s", loss, want, a);
    }
    if (!d->labels)
        return cv_err_set(e, CV_EINVAL, "empty_dataset", "y", "y: no labels");
    if (!cv_shape_equal(&d->y_shape, &lay.label_shape)) {
        batch_shape_str(&d->y_shape, a, sizeof a);
        batch_shape_str(&lay.out_shape, b, sizeof b);
        return cv_err_set(e, CV_EINVAL, "shape_mismatch", "y",
                          "y: class indices of shape %s do not fit the model output %s: %s "
                          "(class_dim %d) needs %s, the output without its class dimension",
                          a, b, loss, lay.class_dim, want);
    }
    size_t total = d->n * cv_shape_numel(&d->y_shape), counted = 0;
    long long K = lay.classes;
    for (size_t q = 0; q < total; q++) {
        int64_t v = d->labels[q];
        if (v == lay.ignore_index)
            continue;
        counted++;
        if (v >= 0 && v < K)
            continue;
        label_index_str(&lay.label_shape, q, at, sizeof at);
        if (lay.label_shape.rank == 0)
            return cv_err_set(e, CV_EINVAL, "bad_label", "y",
                              "%s = %lld is not a class index in [0, %lld) (the model has "
                              "%lld outputs) nor the ignore_index %" PRId64, at, (long long)v,
                              K, K, lay.ignore_index);
        return cv_err_set(e, CV_EINVAL, "bad_label", "y",
                          "%s = %lld is not a class index in [0, %lld) (the model output has "
                          "%lld classes along class_dim %d) nor the ignore_index %" PRId64, at,
                          (long long)v, K, K, lay.class_dim, lay.ignore_index);
    }
    if (!counted)
        return cv_err_set(e, CV_EINVAL, "bad_label", "y",
                          "y: every target equals the ignore_index %" PRId64 ": the loss has "
                          "no terms", lay.ignore_index);
    return 0;
}

int cv_dataset_check(const cv_dataset *d, const cv_model *m, cv_err *e)
{
    char a[96], b[96];
    if (!d->n || !d->x)
        return cv_err_set(e, CV_EINVAL, "empty_dataset", "x", "the dataset has no samples");
    if (!cv_shape_equal(&d->x_shape, &m->input_shape)) {
        cv_shape_str(&d->x_shape, a, sizeof a);
        cv_shape_str(&m->input_shape, b, sizeof b);
        return cv_err_set(e, CV_EINVAL, "shape_mismatch", "x",
                          "x: per-sample shape %s does not match the model's input_shape %s", a,
                          b);
    }
    if (check_x_dtype(d, m, e))
        return -1;
    const cv_shape *out = m->nlayers ? &m->layers[m->nlayers - 1].out_shape : &m->input_shape;
    cv_shape_str(out, b, sizeof b);
    size_t sx = cv_shape_numel(&d->x_shape);
    for (size_t k = 0; k < d->n * sx; k++)
        if (!isfinite(d->x[k]))
            return cv_err_set(e, CV_EINVAL, "non_finite", "x",
                              "x: non-finite value %g at sample %zu (flat index %zu)",
                              (double)d->x[k], k / sx, k);

    for (int l = 0; l < m->nlayers; l++) {
        const cv_layer *L = &m->layers[l];
        for (int i = 0; i < L->nin; i++)
            if (L->in[i] == 0 && L->cls->check_input && L->cls->check_input(L, d->x, d->n, e))
                return -1;
    }
    if (cv_loss_is_class(m->loss))
        return check_class_targets(d, m, e);

    const char *loss = m->loss == CV_LOSS_MSE ? "MSELoss" : "BCEWithLogitsLoss";
    if (d->y_is_index)
        return cv_err_set(e, CV_EINVAL, "target_mismatch", "y",
                          "y: %s needs float targets shaped like the model output %s per sample; "
                          "the dataset has integer class indices (store y as F32 [N, ...])",
                          loss, b);
    if (!cv_shape_equal(&d->y_shape, out)) {
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

void cv_batch_view(const cv_dataset *d, size_t offset, size_t size, cv_batch *out)
{
    size_t sx = cv_shape_numel(&d->x_shape), sy = y_numel(d);
    *out = *d;
    out->n = size;
    out->borrowed = 1;
    out->x = d->x + offset * sx;
    out->labels = d->y_is_index ? d->labels + offset * sy : NULL;
    out->targets = d->y_is_index ? NULL : d->targets + offset * sy;
}
