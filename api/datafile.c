/* datafile.c - loading/exporting datasets (x, y) from/to safetensors. */
#include "api/datafile.h"

#include <limits.h>
#include <math.h>
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

int cv_datafile_load(const cv_st_file *f, cv_dataset *out, cv_err *e)
{
    memset(out, 0, sizeof *out);
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
                          "dataset: missing tensor 'x' (inputs, F32 [N, *input_shape])");
    if (!y)
        return cv_err_set(e, CV_EINVAL, "missing_tensor", "y",
                          "dataset: missing tensor 'y' (I64 class indices [N] or F32 targets "
                          "[N, ...])");
    cv_st_shape_str(x, sh, sizeof sh);
    if (!cv_st_dtype_is_float(x->dtype))
        return cv_err_set(e, CV_EINVAL, "bad_dtype", "x",
                          "x: dtype %s is not a floating-point dtype (F32, F64, F16, BF16)",
                          cv_st_dtype_name(x->dtype));
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
    if (is_index && y->rank != 1)
        return cv_err_set(e, CV_EINVAL, "bad_shape", "y",
                          "y: integer class indices must have shape [N], got %s", sh2);
    if (!is_index && sample_shape(y, "y", &out->y_shape, e))
        return -1;

    out->n = n;
    if (cv_st_to_f32(x, &out->x, e))
        goto fail;
    if (check_finite(out->x, x->numel, x->numel / n, "x", e))
        goto fail;
    out->y_is_index = is_index;
    if (is_index) {
        if (cv_st_to_i64(y, &out->labels, e))
            goto fail;
    } else {
        if (cv_st_to_f32(y, &out->targets, e))
            goto fail;
        if (check_finite(out->targets, y->numel, y->numel / n, "y", e))
            goto fail;
    }
    return 0;
fail:
    cv_dataset_free(out);
    return -1;
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
    ent[1].name = "y";
    ent[1].shape[0] = (int64_t)d->n;
    if (d->y_is_index) {
        ent[1].dtype = CV_ST_I64;
        ent[1].rank = 1;
        ent[1].data = d->labels;
    } else {
        ent[1].dtype = CV_ST_F32;
        ent[1].rank = d->y_shape.rank + 1;
        for (int i = 0; i < d->y_shape.rank; i++)
            ent[1].shape[i + 1] = d->y_shape.dim[i];
        ent[1].data = d->targets;
    }
    return cv_st_write(ent, 2, NULL, 0, out, outlen, e);
}
