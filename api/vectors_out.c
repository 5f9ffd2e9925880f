/* vectors_out.c - writing a result's vector fields to safetensors (the
 * result's and each "blocks" entry's vector fields; op kfac's factors A and B
 * of each "layers" entry, as "layers.NAME.A" / "layers.NAME.B"). */
#include "vectors_out.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/safetensors.h"

static const char *const vector_fields[] = {"eigenvectors", "gradient", "step", "solution",
                                            "product", "diag", "per_sample_gradients",
                                            "matrix", NULL};

/* Fields moved from each entry of a result's "layers" list (op kfac). */
static const char *const layer_fields[] = {"A", "B", NULL};

#define MAX_TENSORS 4096

typedef struct {
    cv_st_entry t[MAX_TENSORS];
    char *names[MAX_TENSORS];
    double *data[MAX_TENSORS];
    size_t n;
} tensor_list;

/* Shape of a list of numbers (rank 1) or of equal-length lists (rank 2). */
static int json_shape(const cJSON *v, int64_t *rows, int64_t *cols)
{
    if (!cJSON_IsArray(v))
        return -1;
    const cJSON *first = v->child;
    *rows = cJSON_GetArraySize(v);
    if (!first || cJSON_IsNumber(first) || cJSON_IsNull(first)) {
        *cols = -1;
        return 0;
    }
    *cols = cJSON_GetArraySize(first);
    const cJSON *r;
    cJSON_ArrayForEach(r, v) if (!cJSON_IsArray(r) || cJSON_GetArraySize(r) != *cols) return -1;
    return 0;
}

static void copy_numbers(const cJSON *list, double *out)
{
    const cJSON *x;
    cJSON_ArrayForEach(x, list)* out++ = cJSON_IsNumber(x) ? x->valuedouble : 0.0 / 0.0;
}

static int add_tensor(tensor_list *L, const cJSON *v, const char *name, cv_err *e)
{
    int64_t rows, cols;
    if (json_shape(v, &rows, &cols))
        return 0; /* not a plain vector/matrix: leave it in the JSON */
    if (L->n >= MAX_TENSORS)
        return cv_err_set(e, CV_ETOOLARGE, "too_large", "vectors-out", "too many vector fields");
    size_t numel = (size_t)rows * (size_t)(cols < 0 ? 1 : cols);
    double *d = malloc(sizeof(double) * (numel ? numel : 1));
    char *nm = strdup(name);
    if (!d || !nm) {
        free(d);
        free(nm);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "vector buffer");
    }
    if (cols < 0) {
        copy_numbers(v, d);
    } else {
        size_t i = 0;
        const cJSON *r;
        cJSON_ArrayForEach(r, v) copy_numbers(r, d + (i++) * (size_t)cols);
    }
    cv_st_entry *t = &L->t[L->n];
    memset(t, 0, sizeof *t);
    t->name = nm;
    t->dtype = CV_ST_F64;
    t->rank = cols < 0 ? 1 : 2;
    t->shape[0] = rows;
    t->shape[1] = cols;
    t->data = d;
    L->names[L->n] = nm;
    L->data[L->n] = d;
    L->n++;
    return 1;
}

static cJSON *reference(const char *path, const cv_st_entry *t)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "file", path);
    cJSON_AddStringToObject(o, "tensor", t->name);
    cJSON *s = cJSON_AddArrayToObject(o, "shape");
    for (int i = 0; i < t->rank; i++)
        cJSON_AddItemToArray(s, cJSON_CreateNumber((double)t->shape[i]));
    return o;
}

static int collect_fields(cJSON *obj, const char *const *fields, const char *prefix,
                          tensor_list *L, const char *path, cv_err *e)
{
    for (int f = 0; fields[f]; f++) {
        cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, fields[f]);
        if (!v)
            continue;
        char name[256];
        snprintf(name, sizeof name, "%s%s", prefix, fields[f]);
        int rc = add_tensor(L, v, name, e);
        if (rc < 0)
            return -1;
        if (rc > 0)
            cJSON_ReplaceItemInObjectCaseSensitive(obj, fields[f],
                                                   reference(path, &L->t[L->n - 1]));
    }
    return 0;
}

static int collect(cJSON *obj, const char *prefix, tensor_list *L, const char *path, cv_err *e)
{
    return collect_fields(obj, vector_fields, prefix, L, path, e);
}

/* Op kfac's "layers": A and B of each entry, named by the layer's name (its
 * index when it has none). */
static int collect_layers(cJSON *result, tensor_list *L, const char *path, cv_err *e)
{
    cJSON *layers = cJSON_GetObjectItemCaseSensitive(result, "layers");
    int i = 0;
    cJSON *l;
    cJSON_ArrayForEach(l, layers)
    {
        const cJSON *nm = cJSON_GetObjectItemCaseSensitive(l, "name");
        char prefix[160];
        if (cJSON_IsString(nm) && nm->valuestring[0])
            snprintf(prefix, sizeof prefix, "layers.%.140s.", nm->valuestring);
        else
            snprintf(prefix, sizeof prefix, "layers.%d.", i);
        i++;
        if (collect_fields(l, layer_fields, prefix, L, path, e))
            return -1;
    }
    return 0;
}

int cv_result_vectors_out(cJSON *result, const char *path, cv_err *e)
{
    tensor_list *L = cv_err_calloc(sizeof *L, "tensor list", e);
    if (!L)
        return -1;
    int rc = collect(result, "", L, path, e);
    if (!rc)
        rc = collect_layers(result, L, path, e);
    cJSON *blocks = cJSON_GetObjectItemCaseSensitive(result, "blocks");
    int i = 0;
    cJSON *b;
    cJSON_ArrayForEach(b, blocks)
    {
        if (rc)
            break;
        char prefix[32];
        snprintf(prefix, sizeof prefix, "blocks.%d.", i++);
        rc = collect(b, prefix, L, path, e);
    }
    if (!rc && L->n)
        rc = cv_st_save(path, L->t, L->n, NULL, 0, e);
    int n = (int)L->n;
    for (size_t k = 0; k < L->n; k++) {
        free(L->names[k]);
        free(L->data[k]);
    }
    free(L);
    return rc ? -1 : n;
}
