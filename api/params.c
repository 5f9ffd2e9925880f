/* params.c - loading/exporting a model's state_dict from/to safetensors. */
#include "api/params.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const cv_tensor_info *ti;
    int is_buffer;
} slot;

/* The model's state_dict tensors in order; *n gets the count. */
static slot *state_dict(const cv_model *m, size_t *n)
{
    size_t count = 0;
    for (int i = 0; i < m->nlayers; i++)
        count += (size_t)(m->layers[i].nparams + m->layers[i].nbuffers);
    slot *s = malloc((count ? count : 1) * sizeof *s);
    if (!s)
        return NULL;
    size_t k = 0;
    for (int i = 0; i < m->nlayers; i++) { /* shared tensors once */
        const cv_layer *L = &m->layers[i];
        for (int j = 0; j < L->nparams; j++)
            if (!L->params[j].shared)
                s[k++] = (slot){&L->params[j], 0};
        for (int j = 0; j < L->nbuffers; j++)
            if (!L->buffers[j].shared)
                s[k++] = (slot){&L->buffers[j], 1};
    }
    *n = k;
    return s;
}

static int ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

static int in_model(const slot *sd, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(sd[i].ti->name, name) == 0)
            return 1;
    return 0;
}

/* Appends up to a few names to buf: "a, b, c (and 4 more)". */
static void name_list(char *buf, size_t len, const char *const *names, size_t n)
{
    size_t used = 0;
    buf[0] = 0;
    for (size_t i = 0; i < n && i < 6 && used < len; i++)
        used += (size_t)snprintf(buf + used, len - used, "%s%s", i ? ", " : "", names[i]);
    if (n > 6 && used < len)
        snprintf(buf + used, len - used, " (and %zu more)", n - 6);
}

static int check_names(const slot *sd, size_t n, const cv_st_file *f, cv_err *e)
{
    /* unexpected tensors of the file, and missing tensors of the model */
    const char **extra = malloc((f->ntensors ? f->ntensors : 1) * sizeof *extra);
    const char **missing = malloc((n ? n : 1) * sizeof *missing);
    int rc = 0;
    if (!extra || !missing) {
        rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
        goto done;
    }
    size_t nextra = 0, nmissing = 0;
    for (size_t i = 0; i < f->ntensors; i++)
        if (!in_model(sd, n, f->tensors[i].name))
            extra[nextra++] = f->tensors[i].name;
    for (size_t i = 0; i < n; i++)
        if (!cv_st_find(f, sd[i].ti->name))
            missing[nmissing++] = sd[i].ti->name;
    char list[300], shape[96];
    if (nmissing) {
        const cv_tensor_info *ti = NULL;
        for (size_t i = 0; i < n && !ti; i++)
            if (sd[i].ti->name == missing[0])
                ti = sd[i].ti;
        cv_dims_str(ti->dim, ti->rank, shape, sizeof shape);
        char more[360] = "";
        if (nmissing > 1) {
            name_list(list, sizeof list, missing + 1, nmissing - 1);
            snprintf(more, sizeof more, "; also missing: %s", list);
        }
        char ex[360] = "";
        if (nextra) {
            name_list(list, sizeof list, extra, nextra);
            snprintf(ex, sizeof ex, "; the file has tensors the model does not: %s", list);
        }
        rc = cv_err_set(e, CV_EINVAL, "missing_tensor", missing[0],
                        "%s: missing from the parameters file (expected shape %s)%s%s",
                        missing[0], shape, more, ex);
    } else if (nextra) {
        const cv_st_tensor *t = cv_st_find(f, extra[0]);
        cv_st_shape_str(t, shape, sizeof shape);
        char more[360] = "";
        if (nextra > 1) {
            name_list(list, sizeof list, extra + 1, nextra - 1);
            snprintf(more, sizeof more, "; also unexpected: %s", list);
        }
        rc = cv_err_set(e, CV_EINVAL, "unexpected_tensor", extra[0],
                        "%s: unexpected tensor (shape %s) not in the model's state_dict%s",
                        extra[0], shape, more);
    }
done:
    free(extra);
    free(missing);
    return rc;
}

/* "[1, 2]" multi-index of flat index k for a tensor of the given dims. */
static void multi_index(const cv_tensor_info *ti, size_t k, char *buf, size_t len)
{
    size_t idx[CV_MAX_RANK];
    for (int d = ti->rank - 1; d >= 0; d--) {
        idx[d] = ti->dim[d] ? k % (size_t)ti->dim[d] : 0;
        k = ti->dim[d] ? k / (size_t)ti->dim[d] : 0;
    }
    size_t used = (size_t)snprintf(buf, len, "[");
    for (int d = 0; d < ti->rank && used < len; d++)
        used += (size_t)snprintf(buf + used, len - used, d ? ", %zu" : "%zu", idx[d]);
    if (used < len)
        snprintf(buf + used, len - used, "]");
}

static int check_tensor(const slot *s, const cv_st_tensor *t, cv_err *e)
{
    const cv_tensor_info *ti = s->ti;
    int same = t->rank == ti->rank;
    for (int d = 0; same && d < ti->rank; d++)
        same = t->shape[d] == ti->dim[d];
    if (!same) {
        char want[96], got[160];
        cv_dims_str(ti->dim, ti->rank, want, sizeof want);
        cv_st_shape_str(t, got, sizeof got);
        return cv_err_set(e, CV_EINVAL, "shape_mismatch", ti->name, "%s: expected %s, got %s",
                          ti->name, want, got);
    }
    if (!s->is_buffer && !cv_st_dtype_is_float(t->dtype))
        return cv_err_set(e, CV_EINVAL, "bad_dtype", ti->name,
                          "%s: dtype %s is not a floating-point dtype (F32, F64, F16, BF16 are "
                          "accepted for parameters)", ti->name, cv_st_dtype_name(t->dtype));
    return 0;
}

static int check_values(const slot *s, const cv_st_tensor *t, const float *v, cv_err *e)
{
    const cv_tensor_info *ti = s->ti;
    int is_var = s->is_buffer && ends_with(ti->name, "running_var");
    for (size_t k = 0; k < ti->numel; k++) {
        if (isfinite(v[k]) && !(is_var && v[k] < 0))
            continue;
        char at[96];
        multi_index(ti, k, at, sizeof at);
        if (is_var && isfinite(v[k]))
            return cv_err_set(e, CV_EINVAL, "bad_value", ti->name,
                              "%s: negative variance %g at index %zu %s", ti->name, (double)v[k],
                              k, at);
        return cv_err_set(e, CV_EINVAL, "non_finite", ti->name,
                          "%s: non-finite value %g at index %zu %s%s", ti->name, (double)v[k], k,
                          at, t->dtype == CV_ST_F32 ? "" : " (after conversion to float32)");
    }
    return 0;
}

int cv_params_load(cv_model *m, const cv_st_file *f, cv_err *e)
{
    size_t n;
    slot *sd = state_dict(m, &n);
    if (!sd)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
    float *sp = NULL, *sb = NULL;
    int rc = check_names(sd, n, f, e);
    for (size_t i = 0; i < n && !rc; i++)
        rc = check_tensor(&sd[i], cv_st_find(f, sd[i].ti->name), e);
    if (!rc) {
        sp = malloc((m->nparams_total ? m->nparams_total : 1) * sizeof(float));
        sb = malloc((m->nbuffers_total ? m->nbuffers_total : 1) * sizeof(float));
        if (!sp || !sb)
            rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                            "out of memory loading %zu parameters", m->nparams_total);
    }
    for (size_t i = 0; i < n && !rc; i++) {
        const cv_tensor_info *ti = sd[i].ti;
        size_t total = sd[i].is_buffer ? m->nbuffers_total : m->nparams_total;
        if (ti->offset > total || ti->numel > total - ti->offset) {
            rc = cv_err_set(e, CV_EINTERNAL, "internal", ti->name,
                            "%s: layout outside the model's storage", ti->name);
            break;
        }
        float *dst = (sd[i].is_buffer ? sb : sp) + ti->offset;
        const cv_st_tensor *t = cv_st_find(f, ti->name);
        cv_st_read_f32(t, dst);
        rc = check_values(&sd[i], t, dst, e);
    }
    if (!rc && (!m->params || !m->buffers)) {
        cv_model_free(m);
        if (cv_model_alloc(m))
            rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                            "out of memory allocating %zu parameters", m->nparams_total);
    }
    if (!rc) {
        memcpy(m->params, sp, m->nparams_total * sizeof(float));
        memcpy(m->buffers, sb, m->nbuffers_total * sizeof(float));
    }
    free(sp);
    free(sb);
    free(sd);
    return rc;
}

int cv_params_count(const cv_model *m)
{
    int k = 0;
    for (int i = 0; i < m->nlayers; i++) {
        const cv_layer *L = &m->layers[i];
        for (int j = 0; j < L->nparams; j++)
            k += !L->params[j].shared;
        for (int j = 0; j < L->nbuffers; j++)
            k += !L->buffers[j].shared;
    }
    return k;
}

const cv_tensor_info *cv_params_entry(const cv_model *m, int k, int *is_buffer)
{
    for (int i = 0; i < m->nlayers && k >= 0; i++) {
        const cv_layer *L = &m->layers[i];
        for (int j = 0; j < L->nparams; j++)
            if (!L->params[j].shared && k-- == 0) {
                *is_buffer = 0;
                return &L->params[j];
            }
        for (int j = 0; j < L->nbuffers; j++)
            if (!L->buffers[j].shared && k-- == 0) {
                *is_buffer = 1;
                return &L->buffers[j];
            }
    }
    return NULL;
}

int cv_params_set(cv_model *m, const char *name, const float *v, size_t numel, cv_err *e)
{
    int n = cv_params_count(m), is_buffer = 0;
    const cv_tensor_info *ti = NULL;
    for (int k = 0; k < n && !ti; k++) {
        ti = cv_params_entry(m, k, &is_buffer);
        if (strcmp(ti->name, name) != 0)
            ti = NULL;
    }
    if (!ti)
        return cv_err_set(e, CV_EINVAL, "unexpected_tensor", name,
                          "%s: not in the model's state_dict", name);
    if (numel != ti->numel) {
        char want[96];
        cv_dims_str(ti->dim, ti->rank, want, sizeof want);
        return cv_err_set(e, CV_EINVAL, "shape_mismatch", ti->name,
                          "%s: expected %zu values (shape %s), got %zu", ti->name, ti->numel,
                          want, numel);
    }
    slot s = {ti, is_buffer};
    cv_st_tensor t = {.dtype = CV_ST_F32};
    if (check_values(&s, &t, v, e))
        return -1;
    if ((!m->params || !m->buffers) && cv_model_alloc(m))
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                          "out of memory allocating %zu parameters", m->nparams_total);
    memcpy((is_buffer ? m->buffers : m->params) + ti->offset, v, numel * sizeof(float));
    return 0;
}

int cv_params_parse(cv_model *m, const void *buf, size_t len, cv_err *e)
{
    cv_st_file f;
    if (cv_st_parse(buf, len, &f, e))
        return -1;
    int rc = cv_params_load(m, &f, e);
    cv_st_free(&f);
    return rc;
}

int cv_params_read(cv_model *m, const char *path, cv_err *e)
{
    cv_st_file f;
    if (cv_st_load(path, &f, e))
        return -1;
    int rc = cv_params_load(m, &f, e);
    cv_st_free(&f);
    return rc;
}

int cv_params_export(const cv_model *m, void **out, size_t *outlen, cv_err *e)
{
    *out = NULL;
    *outlen = 0;
    if (!m->params || (m->nbuffers_total && !m->buffers))
        return cv_err_set(e, CV_EINVAL, "no_parameters", "", "the model has no parameter values");
    size_t n;
    slot *sd = state_dict(m, &n);
    cv_st_entry *ent = calloc(n ? n : 1, sizeof *ent);
    int64_t *ints = calloc(n ? n : 1, sizeof *ints);
    int rc = 0;
    if (!sd || !ent || !ints) {
        rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        const cv_tensor_info *ti = sd[i].ti;
        const float *src = (sd[i].is_buffer ? m->buffers : m->params) + ti->offset;
        ent[i].name = ti->name;
        ent[i].rank = ti->rank;
        for (int d = 0; d < ti->rank; d++)
            ent[i].shape[d] = ti->dim[d];
        if (sd[i].is_buffer && ti->numel == 1 && ends_with(ti->name, "num_batches_tracked")) {
            ints[i] = (int64_t)src[0];
            ent[i].dtype = CV_ST_I64;
            ent[i].data = &ints[i];
        } else {
            ent[i].dtype = CV_ST_F32;
            ent[i].data = src;
        }
    }
    rc = cv_st_write(ent, n, NULL, 0, out, outlen, e);
done:
    free(ent);
    free(ints);
    free(sd);
    return rc;
}

int cv_params_save(const cv_model *m, const char *path, cv_err *e)
{
    void *buf;
    size_t len;
    if (cv_params_export(m, &buf, &len, e))
        return -1;
    FILE *fp = fopen(path, "wb");
    int rc = 0;
    if (!fp) {
        rc = cv_err_set(e, CV_EINVAL, "io_error", path, "cannot create %s", path);
    } else {
        int bad = fwrite(buf, 1, len, fp) != len;
        if (fclose(fp) != 0 || bad)
            rc = cv_err_set(e, CV_EINVAL, "io_error", path, "short write on %s", path);
    }
    free(buf);
    return rc;
}
