/* datafile.c - loading/exporting datasets (x, y) from/to safetensors. */
#include "api/datafile.h"

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Per-sample shape of tensor t (dims 1..rank-1) into s; what names it. */
static int sample_shape(const cv_st_tensor *t, const char *what, cv_shape *s, cv_err *e)
{
    char sh[160];
    cv_st_shape_str(t, sh, sizeof sh);
    if (t->rank - 1 > CV_MAX_RANK)
        return cv_err_set(e, CV_EINVAL, "bad_shape", t->name,
                          "%s: shape %s has more than %d per-sample dimensions", what, sh,
                          CV_MAX_RANK);
    s->rank = t->rank - 1;
    for (int d = 1; d < t->rank; d++) {
        if (t->shape[d] < 1 || t->shape[d] > INT_MAX)
            return cv_err_set(e, CV_EINVAL, "bad_shape", t->name,
                              "%s: shape %s: dimension %d must be between 1 and %d", what, sh, d,
                              INT_MAX);
        s->dim[d - 1] = (int)t->shape[d];
    }
    return 0;
}

static int check_finite(const float *v, size_t n, size_t per_sample, const char *name,
                        cv_err *e)
{
    for (size_t k = 0; k < n; k++)
        if (!isfinite(v[k]))
            return cv_err_set(e, CV_EINVAL, "non_finite", name,
                              "%s: non-finite value %g at flat index %zu (sample %zu)", name,
                              (double)v[k], k, per_sample ? k / per_sample : 0);
    return 0;
}

#define MAX_EXACT_ID (1 << 24) /* integers up to 2^24 have exact float32 values */

/* Integer x (token ids, I64/I32): exact float32 values, |id| <= 2^24. */
static int load_int_x(const cv_st_tensor *x, cv_dataset *out, cv_err *e)
{
    int64_t *ids;
    if (cv_st_to_i64(x, &ids, e))
        return -1;
    size_t per = x->numel / out->n;
    out->x = malloc((x->numel ? x->numel : 1) * sizeof(float));
    int rc = out->x ? 0
                    : cv_err_set(e, CV_ENOMEM, "out_of_memory", "x",
                                 "out of memory converting tensor 'x' (%zu elements)", x->numel);
    for (size_t k = 0; k < x->numel && !rc; k++) {
        if (ids[k] > MAX_EXACT_ID || ids[k] < -MAX_EXACT_ID)
            rc = cv_err_set(e, CV_EINVAL, "bad_value", "x",
                            "x: integer %lld at flat index %zu (sample %zu) is beyond 2^24 = %d: "
                            "token ids are held as exact float32 values", (long long)ids[k], k,
                            k / per, MAX_EXACT_ID);
        else
            out->x[k] = (float)ids[k];
    }
    out->x_dtype = x->dtype == CV_ST_I32 ? CV_DTYPE_INT32 : CV_DTYPE_INT64;
    free(ids);
    return rc;
}

/* t's data as float32 / int64 without a copy, when its dtype and alignment
 * allow it (and borrow is set), else NULL. */
static void *in_place(const cv_st_tensor *t, cv_st_dtype want, size_t align, int borrow)
{
    if (!borrow || t->dtype != want || ((uintptr_t)t->data % align) != 0)
        return NULL;
    return (void *)(uintptr_t)t->data;
}

/* Frees what load() allocated: everything, or with borrow only the arrays
 * flagged in copied. */
static void load_fail(cv_dataset *out, int borrow, unsigned copied)
{
    if (borrow) {
        if (copied & CV_DF_X_COPIED)
            free(out->x);
        if (copied & CV_DF_Y_COPIED) {
            free(out->labels);
            free(out->targets);
        }
    }
    out->borrowed = 0;
    if (borrow)
        memset(out, 0, sizeof *out);
    else
        cv_dataset_free(out);
}

static int load(const cv_st_file *f, cv_dataset *out, int borrow, int scan, unsigned *copied,
                cv_err *e)
{
    memset(out, 0, sizeof *out);
    *copied = 0;
    char sh[160], sh2[160];
    for (size_t i = 0; i < f->ntensors; i++) {
        const char *nm = f->tensors[i].name;
        if (strcmp(nm, "x") != 0 && strcmp(nm, "y") != 0) {
            cv_st_shape_str(&f->tensors[i], sh, sizeof sh);
            return cv_err_set(e, CV_EINVAL, "unexpected_tensor", nm,
                              "dataset: unexpected tensor '%s' (shape %s); a dataset holds "
                              "exactly 'x' and 'y'", nm, sh);
        }
    }
    const cv_st_tensor *x = cv_st_find(f, "x"), *y = cv_st_find(f, "y");
    if (!x)
        return cv_err_set(e, CV_EINVAL, "missing_tensor", "x",
                          "dataset: missing tensor 'x' (inputs, F32 [N, *input_shape], or I64 "
                          "token ids)");
    if (!y)
        return cv_err_set(e, CV_EINVAL, "missing_tensor", "y",
                          "dataset: missing tensor 'y' (I64 class indices [N] or [N, T, ...], "
                          "or F32 targets [N, ...])");
    cv_st_shape_str(x, sh, sizeof sh);
    int x_int = x->dtype == CV_ST_I64 || x->dtype == CV_ST_I32;
    if (!cv_st_dtype_is_float(x->dtype) && !x_int)
        return cv_err_set(e, CV_EINVAL, "bad_dtype", "x",
                          "x: dtype %s is not a floating-point dtype (F32, F64, F16, BF16) nor "
                          "an integer token-id dtype (I64, I32)", cv_st_dtype_name(x->dtype));
    if (x->rank < 2)
        return cv_err_set(e, CV_EINVAL, "bad_shape", "x",
                          "x: shape %s must be [N, *input_shape] (at least 2 dimensions)", sh);
    if (x->shape[0] == 0)
        return cv_err_set(e, CV_EINVAL, "empty_dataset", "x", "x: shape %s has no samples", sh);
    if (sample_shape(x, "x", &out->x_shape, e))
        return -1;
    size_t n = (size_t)x->shape[0];

    cv_st_shape_str(y, sh2, sizeof sh2);
    if (y->rank < 1 || (size_t)y->shape[0] != n)
        return cv_err_set(e, CV_EINVAL, "shape_mismatch", "y",
                          "y: shape %s does not have the %zu samples of x %s", sh2, n, sh);
    if (y->dtype == CV_ST_BOOL)
        return cv_err_set(e, CV_EINVAL, "bad_dtype", "y",
                          "y: dtype BOOL is ambiguous; use I64 class indices or F32 targets");
    int is_index = !cv_st_dtype_is_float(y->dtype);
    if (sample_shape(y, "y", &out->y_shape, e))
        return -1;

    out->n = n;
    out->x = in_place(x, CV_ST_F32, sizeof(float), borrow);
    if (!out->x) {
        *copied |= CV_DF_X_COPIED;
        if (x_int ? load_int_x(x, out, e) : cv_st_to_f32(x, &out->x, e))
            goto fail;
    }
    if (scan && check_finite(out->x, x->numel, x->numel / n, "x", e))
        goto fail;
    out->y_is_index = is_index;
    if (is_index) {
        out->labels = in_place(y, CV_ST_I64, sizeof(int64_t), borrow);
        if (!out->labels) {
            *copied |= CV_DF_Y_COPIED;
            if (cv_st_to_i64(y, &out->labels, e))
                goto fail;
        }
    } else {
        out->targets = in_place(y, CV_ST_F32, sizeof(float), borrow);
        if (!out->targets) {
            *copied |= CV_DF_Y_COPIED;
            if (cv_st_to_f32(y, &out->targets, e))
                goto fail;
        }
        if (scan && check_finite(out->targets, y->numel, y->numel / n, "y", e))
            goto fail;
    }
    out->borrowed = borrow;
    return 0;
fail:
    load_fail(out, borrow, *copied);
    return -1;
}

int cv_datafile_load(const cv_st_file *f, cv_dataset *out, cv_err *e)
{
    unsigned copied;
    return load(f, out, 0, 1, &copied, e);
}

int cv_datafile_load_borrowed(const cv_st_file *f, cv_dataset *out, unsigned *copied,
                              cv_err *e)
{
    return load(f, out, 1, 1, copied, e);
}

int cv_datafile_load_unscanned(const cv_st_file *f, cv_dataset *out, unsigned *copied,
                               cv_err *e)
{
    return load(f, out, 1, 0, copied, e);
}

int cv_datafile_parse(const void *buf, size_t len, cv_dataset *out, cv_err *e)
{
    cv_st_file f;
    memset(out, 0, sizeof *out);
    if (cv_st_parse(buf, len, &f, e))
        return -1;
    int rc = cv_datafile_load(&f, out, e);
    cv_st_free(&f);
    return rc;
}

int cv_datafile_read(const char *path, cv_dataset *out, cv_err *e)
{
    cv_st_file f;
    memset(out, 0, sizeof *out);
    if (cv_st_load(path, &f, e))
        return -1;
    int rc = cv_datafile_load(&f, out, e);
    cv_st_free(&f);
    return rc;
}

/* x's token ids as I64 or I32 (as the dataset came), newly allocated. */
static void *int_ids(const cv_dataset *d, cv_st_dtype *dtype, cv_err *e)
{
    size_t n = d->n * cv_shape_numel(&d->x_shape);
    int wide = d->x_dtype == CV_DTYPE_INT64;
    *dtype = wide ? CV_ST_I64 : CV_ST_I32;
    void *p = malloc((n ? n : 1) * (wide ? sizeof(int64_t) : sizeof(int32_t)));
    if (!p) {
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "x", "out of memory exporting x");
        return NULL;
    }
    for (size_t k = 0; k < n; k++) {
        if (wide)
            ((int64_t *)p)[k] = (int64_t)d->x[k];
        else
            ((int32_t *)p)[k] = (int32_t)d->x[k];
    }
    return p;
}

int cv_datafile_export(const cv_dataset *d, void **out, size_t *outlen, cv_err *e)
{
    *out = NULL;
    *outlen = 0;
    if (!d->x || (d->y_is_index ? !d->labels : !d->targets))
        return cv_err_set(e, CV_EINVAL, "empty_dataset", "", "dataset has no data");
    cv_st_entry ent[2];
    memset(ent, 0, sizeof ent);
    ent[0].name = "x";
    ent[0].dtype = CV_ST_F32;
    ent[0].rank = d->x_shape.rank + 1;
    ent[0].shape[0] = (int64_t)d->n;
    for (int i = 0; i < d->x_shape.rank; i++)
        ent[0].shape[i + 1] = d->x_shape.dim[i];
    ent[0].data = d->x;
    void *ids = NULL;
    if (d->x_dtype != CV_DTYPE_FLOAT32) {
        ids = int_ids(d, &ent[0].dtype, e);
        if (!ids)
            return -1;
        ent[0].data = ids;
    }
    ent[1].name = "y";
    ent[1].shape[0] = (int64_t)d->n;
    ent[1].dtype = d->y_is_index ? CV_ST_I64 : CV_ST_F32;
    ent[1].rank = d->y_shape.rank + 1;
    for (int i = 0; i < d->y_shape.rank; i++)
        ent[1].shape[i + 1] = d->y_shape.dim[i];
    ent[1].data = d->y_is_index ? (const void *)d->labels : (const void *)d->targets;
    int rc = cv_st_write(ent, 2, NULL, 0, out, outlen, e);
    free(ids);
    return rc;
}
