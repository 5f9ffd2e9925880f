/* safetensors.c - validating safetensors parser, dtype conversion and writer. */
#include "api/safetensors.h"

#include <cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "api/fileio.h"
#include "api/json_strict.h"
#include "engine/names.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "curvd's safetensors code assumes a little-endian host"
#endif

#define BAD "bad_safetensors"

static const char *const dtype_names[CV_ST_DTYPE_COUNT] = {
    "BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "I64", "U64", "F64"};
static const size_t dtype_sizes[CV_ST_DTYPE_COUNT] = {1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 8, 8, 8};

const char *cv_st_dtype_name(cv_st_dtype d)
{
    return cv_name_or(dtype_names, CV_ST_DTYPE_COUNT, (int)d, "?");
}

int cv_st_dtype_from_name(const char *name)
{
    return cv_name_index(name, dtype_names, CV_ST_DTYPE_COUNT);
}

size_t cv_st_dtype_size(cv_st_dtype d)
{
    return (unsigned)d < CV_ST_DTYPE_COUNT ? dtype_sizes[d] : 0;
}

int cv_st_dtype_is_float(cv_st_dtype d)
{
    return d == CV_ST_F16 || d == CV_ST_BF16 || d == CV_ST_F32 || d == CV_ST_F64;
}

/* ---- parsing ---------------------------------------------------------- */

static void st_free_partial(cv_st_file *f)
{
    if (f->tensors)
        for (size_t i = 0; i < f->ntensors; i++)
            free(f->tensors[i].name);
    free(f->tensors);
    for (size_t i = 0; i < f->nmeta; i++) {
        free(f->meta_keys[i]);
        free(f->meta_values[i]);
    }
    free(f->meta_keys);
    free(f->meta_values);
    free(f->owned);
    memset(f, 0, sizeof *f);
}

void cv_st_free(cv_st_file *f)
{
    if (f)
        st_free_partial(f);
}

/* A JSON number that is a non-negative integer exactly representable (< 2^53). */
static int json_uint(const cJSON *v, uint64_t *out)
{
    if (!cJSON_IsNumber(v))
        return -1;
    double d = v->valuedouble;
    if (!(d >= 0) || d > 9007199254740992.0 || d != floor(d))
        return -1;
    *out = (uint64_t)d;
    return 0;
}

static int parse_meta(const cJSON *m, cv_st_file *f, cv_err *e)
{
    if (!cJSON_IsObject(m))
        return cv_err_set(e, CV_EINVAL, BAD, "__metadata__",
                          "safetensors header: __metadata__ must be an object of strings");
    size_t n = 0;
    for (const cJSON *c = m->child; c; c = c->next)
        n++;
    if (n == 0)
        return 0;
    f->meta_keys = calloc(n, sizeof(char *));
    f->meta_values = calloc(n, sizeof(char *));
    if (!f->meta_keys || !f->meta_values)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory reading metadata");
    for (const cJSON *c = m->child; c; c = c->next) {
        if (!cJSON_IsString(c))
            return cv_err_set(e, CV_EINVAL, BAD, "__metadata__",
                              "safetensors header: __metadata__ value of '%s' is not a string",
                              c->string ? c->string : "");
        for (size_t i = 0; i < f->nmeta; i++)
            if (strcmp(f->meta_keys[i], c->string) == 0)
                return cv_err_set(e, CV_EINVAL, BAD, "__metadata__",
                                  "safetensors header: duplicate __metadata__ key '%s'",
                                  c->string);
        f->meta_keys[f->nmeta] = strdup(c->string);
        f->meta_values[f->nmeta] = strdup(c->valuestring);
        f->nmeta++;
        if (!f->meta_keys[f->nmeta - 1] || !f->meta_values[f->nmeta - 1])
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                              "out of memory reading metadata");
    }
    return 0;
}

static int parse_tensor(const cJSON *o, const char *name, size_t data_len, cv_st_tensor *t,
                        cv_err *e)
{
    if (!cJSON_IsObject(o))
        return cv_err_set(e, CV_EINVAL, BAD, name,
                          "safetensors header: entry '%s' must be an object with dtype, shape "
                          "and data_offsets", name);
    const cJSON *dt = NULL, *sh = NULL, *off = NULL;
    for (const cJSON *c = o->child; c; c = c->next) {
        const cJSON **slot = NULL;
        if (strcmp(c->string, "dtype") == 0)
            slot = &dt;
        else if (strcmp(c->string, "shape") == 0)
            slot = &sh;
        else if (strcmp(c->string, "data_offsets") == 0)
            slot = &off;
        else
            return cv_err_set(e, CV_EINVAL, BAD, name,
                              "safetensors header: tensor '%s' has unknown field '%s'", name,
                              c->string);
        if (*slot)
            return cv_err_set(e, CV_EINVAL, BAD, name,
                              "safetensors header: tensor '%s' has duplicate field '%s'", name,
                              c->string);
        *slot = c;
    }
    if (!dt)
        return cv_err_set(e, CV_EINVAL, BAD, name, "safetensors header: tensor '%s' has no dtype",
                          name);
    if (!cJSON_IsString(dt))
        return cv_err_set(e, CV_EINVAL, BAD, name,
                          "safetensors header: tensor '%s': dtype must be a string", name);
    int d = cv_st_dtype_from_name(dt->valuestring);
    if (d < 0) {
        if (strncmp(dt->valuestring, "F8", 2) == 0)
            return cv_err_set(e, CV_EINVAL, "bad_dtype", name,
                              "tensor '%s': unsupported dtype %s", name, dt->valuestring);
        return cv_err_set(e, CV_EINVAL, "bad_dtype", name,
                          "tensor '%s': unknown dtype '%s' (known: F32, F64, F16, BF16, I64, "
                          "I32, I16, I8, U8, U16, U32, U64, BOOL)", name, dt->valuestring);
    }
    t->dtype = (cv_st_dtype)d;

    if (!sh)
        return cv_err_set(e, CV_EINVAL, BAD, name, "safetensors header: tensor '%s' has no shape",
                          name);
    if (!cJSON_IsArray(sh))
        return cv_err_set(e, CV_EINVAL, BAD, name,
                          "safetensors header: tensor '%s': shape must be a list of integers",
                          name);
    int rank = cJSON_GetArraySize(sh);
    if (rank > CV_ST_MAX_RANK)
        return cv_err_set(e, CV_EINVAL, BAD, name,
                          "tensor '%s': rank %d exceeds the supported maximum %d", name, rank,
                          CV_ST_MAX_RANK);
    t->rank = rank;
    size_t numel = 1;
    int overflow = 0, i = 0;
    for (const cJSON *c = sh->child; c; c = c->next, i++) {
        uint64_t v;
        if (json_uint(c, &v))
            return cv_err_set(e, CV_EINVAL, BAD, name,
                              "safetensors header: tensor '%s': shape[%d] must be a "
                              "non-negative integer", name, i);
        t->shape[i] = (int64_t)v;
        if (v != 0 && numel > SIZE_MAX / v)
            overflow = 1;
        else
            numel *= (size_t)v;
    }
    size_t esz = dtype_sizes[t->dtype];
    if (numel == 0)
        overflow = 0; /* a zero dimension makes the product 0 whatever the others are */
    if (overflow || numel > SIZE_MAX / esz)
        return cv_err_set(e, CV_EINVAL, BAD, name, "tensor '%s': shape is too large", name);
    t->numel = numel;

    if (!off)
        return cv_err_set(e, CV_EINVAL, BAD, name,
                          "safetensors header: tensor '%s' has no data_offsets", name);
    uint64_t b, en;
    if (!cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2 || json_uint(off->child, &b) ||
        json_uint(off->child->next, &en))
        return cv_err_set(e, CV_EINVAL, BAD, name,
                          "safetensors header: tensor '%s': data_offsets must be "
                          "[begin, end] with non-negative integers", name);
    if (en < b)
        return cv_err_set(e, CV_EINVAL, BAD, name,
                          "tensor '%s': data_offsets end %llu is before begin %llu", name,
                          (unsigned long long)en, (unsigned long long)b);
    if (en > data_len)
        return cv_err_set(e, CV_EINVAL, BAD, name,
                          "tensor '%s': data_offsets [%llu, %llu] beyond the %zu-byte data "
                          "buffer", name, (unsigned long long)b, (unsigned long long)en,
                          data_len);
    if (en - b != numel * esz) {
        char s[160];
        cv_st_shape_str(t, s, sizeof s);
        return cv_err_set(e, CV_EINVAL, BAD, name,
                          "tensor '%s': %llu data bytes but dtype %s shape %s needs %zu", name,
                          (unsigned long long)(en - b), dtype_names[t->dtype], s, numel * esz);
    }
    t->begin = (size_t)b;
    t->end = (size_t)en;
    return 0;
}

static int cmp_name(const void *a, const void *b)
{
    const cv_st_tensor *x = *(const cv_st_tensor *const *)a, *y = *(const cv_st_tensor *const *)b;
    return strcmp(x->name, y->name);
}

static int cmp_offset(const void *a, const void *b)
{
    const cv_st_tensor *x = *(const cv_st_tensor *const *)a, *y = *(const cv_st_tensor *const *)b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return 0;
}

/* Duplicate names, and that the tensors tile the data buffer exactly. */
static int check_layout(cv_st_file *f, cv_err *e)
{
    size_t n = f->ntensors;
    if (n == 0) {
        if (f->data_len)
            return cv_err_set(e, CV_EINVAL, BAD, "",
                              "safetensors: %zu data bytes but no tensors in the header",
                              f->data_len);
        return 0;
    }
    cv_st_tensor **idx = malloc(n * sizeof *idx);
    if (!idx)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
    for (size_t i = 0; i < n; i++)
        idx[i] = &f->tensors[i];
    int rc = 0;
    qsort(idx, n, sizeof *idx, cmp_name);
    for (size_t i = 1; i < n && !rc; i++)
        if (strcmp(idx[i - 1]->name, idx[i]->name) == 0)
            rc = cv_err_set(e, CV_EINVAL, BAD, idx[i]->name,
                            "safetensors header: duplicate tensor name '%s'", idx[i]->name);
    if (!rc) {
        qsort(idx, n, sizeof *idx, cmp_offset);
        size_t cur = 0;
        for (size_t i = 0; i < n && !rc; i++) {
            if (idx[i]->begin < cur)
                rc = cv_err_set(e, CV_EINVAL, BAD, idx[i]->name,
                                "tensor '%s' (bytes %zu..%zu) overlaps tensor '%s' (bytes "
                                "%zu..%zu)", idx[i]->name, idx[i]->begin, idx[i]->end,
                                idx[i - 1]->name, idx[i - 1]->begin, idx[i - 1]->end);
            else if (idx[i]->begin > cur)
                rc = cv_err_set(e, CV_EINVAL, BAD, idx[i]->name,
                                "safetensors: %zu unused bytes before tensor '%s' (offset %zu); "
                                "tensors must be contiguous", idx[i]->begin - cur, idx[i]->name,
                                idx[i]->begin);
            else
                cur = idx[i]->end;
        }
        if (!rc && cur != f->data_len)
            rc = cv_err_set(e, CV_EINVAL, BAD, "",
                            "safetensors: %zu unused bytes after the last tensor (data buffer "
                            "is %zu bytes, tensors end at %zu)", f->data_len - cur, f->data_len,
                            cur);
    }
    free(idx);
    return rc;
}

static int parse_header(const char *hdr, size_t n, cv_st_file *f, cv_err *e)
{
    if (n == 0 || hdr[0] != '{')
        return cv_err_set(e, CV_EINVAL, BAD, "",
                          "safetensors header is not a JSON object (must start with '{')");
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(hdr, n, &end, 0);
    if (!root) {
        size_t pos = end && end >= hdr && end <= hdr + n ? (size_t)(end - hdr) : 0;
        return cv_err_set(e, CV_EINVAL, BAD, "",
                          "safetensors header is not valid JSON (error near byte %zu of %zu)",
                          pos, n);
    }
    int rc = 0;
    for (const char *p = end; p && p < hdr + n; p++)
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r' && *p != '\0') {
            rc = cv_err_set(e, CV_EINVAL, BAD, "",
                            "safetensors header has trailing bytes after the JSON object "
                            "(byte %zu of %zu)", (size_t)(p - hdr), n);
            break;
        }
    if (!rc && cv_json_check_text(hdr, (size_t)(end - hdr), root, "safetensors header", "", e)) {
        rc = -1; /* a NUL in a tensor name, a control character, a loose number */
        if (e)
            snprintf(e->code, sizeof e->code, "%s", BAD);
    }
    if (!rc && !cJSON_IsObject(root))
        rc = cv_err_set(e, CV_EINVAL, BAD, "", "safetensors header is not a JSON object");
    size_t count = 0, nmeta_obj = 0;
    if (!rc)
        for (const cJSON *c = root->child; c; c = c->next) {
            if (strcmp(c->string, "__metadata__") == 0)
                nmeta_obj++;
            else
                count++;
        }
    if (!rc && nmeta_obj > 1)
        rc = cv_err_set(e, CV_EINVAL, BAD, "__metadata__",
                        "safetensors header: duplicate __metadata__");
    if (!rc && count) {
        f->tensors = calloc(count, sizeof *f->tensors);
        if (!f->tensors)
            rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
    }
    for (const cJSON *c = root ? root->child : NULL; c && !rc; c = c->next) {
        if (strcmp(c->string, "__metadata__") == 0) {
            rc = parse_meta(c, f, e);
            continue;
        }
        cv_st_tensor *t = &f->tensors[f->ntensors];
        t->name = strdup(c->string);
        if (!t->name) {
            rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
            break;
        }
        f->ntensors++;
        rc = parse_tensor(c, t->name, f->data_len, t, e);
        if (!rc)
            t->data = f->data + t->begin;
    }
    cJSON_Delete(root);
    if (!rc)
        rc = check_layout(f, e);
    return rc;
}

int cv_st_parse(const void *buf, size_t len, cv_st_file *out, cv_err *e)
{
    memset(out, 0, sizeof *out);
    const uint8_t *b = buf;
    if (!b || len < 8)
        return cv_err_set(e, CV_EINVAL, BAD, "",
                          "safetensors file is %zu bytes, shorter than the 8-byte header length",
                          b ? len : 0);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = (n << 8) | b[i];
    if (n > CV_ST_MAX_HEADER)
        return cv_err_set(e, CV_EINVAL, BAD, "",
                          "safetensors header length %llu is absurd (limit %u bytes); not a "
                          "safetensors file?", (unsigned long long)n, CV_ST_MAX_HEADER);
    if (n > len - 8)
        return cv_err_set(e, CV_EINVAL, BAD, "",
                          "safetensors header length %llu exceeds the %zu bytes after the "
                          "length prefix (truncated file?)", (unsigned long long)n, len - 8);
    out->data = b + 8 + n;
    out->data_len = len - 8 - (size_t)n;
    if (parse_header((const char *)b + 8, (size_t)n, out, e)) {
        st_free_partial(out);
        return -1;
    }
    return 0;
}

int cv_st_load(const char *path, cv_st_file *out, cv_err *e)
{
    memset(out, 0, sizeof *out);
    FILE *fp = cv_open_input(path, e);
    if (!fp)
        return -1;
    struct stat st;
    if (fstat(fileno(fp), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(fp);
        return cv_err_set(e, CV_EINVAL, "io_error", path, "%s is not a regular file", path);
    }
    size_t len = (size_t)st.st_size;
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf) {
        fclose(fp);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", path,
                          "out of memory reading %s (%zu bytes)", path, len);
    }
    size_t got = len ? fread(buf, 1, len, fp) : 0;
    int rerr = ferror(fp);
    fclose(fp);
    if (got != len || rerr) {
        free(buf);
        return cv_err_set(e, CV_EINVAL, "io_error", path, "short read on %s", path);
    }
    if (cv_st_parse(buf, len, out, e)) {
        free(buf);
        return -1;
    }
    out->owned = buf;
    return 0;
}

const cv_st_tensor *cv_st_find(const cv_st_file *f, const char *name)
{
    for (size_t i = 0; i < f->ntensors; i++)
        if (strcmp(f->tensors[i].name, name) == 0)
            return &f->tensors[i];
    return NULL;
}

const char *cv_st_meta(const cv_st_file *f, const char *key)
{
    for (size_t i = 0; i < f->nmeta; i++)
        if (strcmp(f->meta_keys[i], key) == 0)
            return f->meta_values[i];
    return NULL;
}

void cv_st_shape_str(const cv_st_tensor *t, char *buf, size_t len)
{
    if (!len)
        return;
    size_t used = (size_t)snprintf(buf, len, "[");
    for (int i = 0; i < t->rank && used < len; i++)
        used += (size_t)snprintf(buf + used, len - used, i ? ", %lld" : "%lld",
                                 (long long)t->shape[i]);
    if (used < len)
        snprintf(buf + used, len - used, "]");
}

/* ---- conversion ------------------------------------------------------- */

static float f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: value = man * 2^-24 */
            float v = (float)man * 5.9604644775390625e-08f;
            return sign ? -v : v;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

void cv_st_read_f32(const cv_st_tensor *t, float *dst)
{
    const uint8_t *p = t->data;
    size_t n = t->numel;
    for (size_t i = 0; i < n; i++) {
        switch (t->dtype) {
        case CV_ST_BOOL: dst[i] = p[i] ? 1.0f : 0.0f; break;
        case CV_ST_U8: dst[i] = (float)p[i]; break;
        case CV_ST_I8: dst[i] = (float)(int8_t)p[i]; break;
        case CV_ST_I16: { int16_t v; memcpy(&v, p + 2 * i, 2); dst[i] = (float)v; break; }
        case CV_ST_U16: { uint16_t v; memcpy(&v, p + 2 * i, 2); dst[i] = (float)v; break; }
        case CV_ST_F16: { uint16_t v; memcpy(&v, p + 2 * i, 2); dst[i] = f16_to_f32(v); break; }
        case CV_ST_BF16: {
            uint16_t v;
            memcpy(&v, p + 2 * i, 2);
            uint32_t bits = (uint32_t)v << 16;
            memcpy(&dst[i], &bits, 4);
            break;
        }
        case CV_ST_I32: { int32_t v; memcpy(&v, p + 4 * i, 4); dst[i] = (float)v; break; }
        case CV_ST_U32: { uint32_t v; memcpy(&v, p + 4 * i, 4); dst[i] = (float)v; break; }
        case CV_ST_F32: memcpy(&dst[i], p + 4 * i, 4); break;
        case CV_ST_I64: { int64_t v; memcpy(&v, p + 8 * i, 8); dst[i] = (float)v; break; }
        case CV_ST_U64: { uint64_t v; memcpy(&v, p + 8 * i, 8); dst[i] = (float)v; break; }
        case CV_ST_F64: { double v; memcpy(&v, p + 8 * i, 8); dst[i] = (float)v; break; }
        default: dst[i] = 0; break;
        }
    }
}

int cv_st_read_i64(const cv_st_tensor *t, int64_t *dst, cv_err *e)
{
    if (cv_st_dtype_is_float(t->dtype))
        return cv_err_set(e, CV_EINVAL, "bad_dtype", t->name,
                          "tensor '%s': expected an integer dtype, got %s", t->name,
                          cv_st_dtype_name(t->dtype));
    const uint8_t *p = t->data;
    for (size_t i = 0; i < t->numel; i++) {
        switch (t->dtype) {
        case CV_ST_BOOL: dst[i] = p[i] != 0; break;
        case CV_ST_U8: dst[i] = p[i]; break;
        case CV_ST_I8: dst[i] = (int8_t)p[i]; break;
        case CV_ST_I16: { int16_t v; memcpy(&v, p + 2 * i, 2); dst[i] = v; break; }
        case CV_ST_U16: { uint16_t v; memcpy(&v, p + 2 * i, 2); dst[i] = v; break; }
        case CV_ST_I32: { int32_t v; memcpy(&v, p + 4 * i, 4); dst[i] = v; break; }
        case CV_ST_U32: { uint32_t v; memcpy(&v, p + 4 * i, 4); dst[i] = v; break; }
        case CV_ST_I64: memcpy(&dst[i], p + 8 * i, 8); break;
        case CV_ST_U64: {
            uint64_t v;
            memcpy(&v, p + 8 * i, 8);
            if (v > (uint64_t)INT64_MAX)
                return cv_err_set(e, CV_EINVAL, "bad_value", t->name,
                                  "tensor '%s': element %zu = %llu does not fit in int64",
                                  t->name, i, (unsigned long long)v);
            dst[i] = (int64_t)v;
            break;
        }
        default:
            return cv_err_set(e, CV_EINVAL, "bad_dtype", t->name, "tensor '%s': bad dtype",
                              t->name);
        }
    }
    return 0;
}

int cv_st_to_f32(const cv_st_tensor *t, float **out, cv_err *e)
{
    *out = malloc((t->numel ? t->numel : 1) * sizeof(float));
    if (!*out)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", t->name,
                          "out of memory converting tensor '%s' (%zu elements)", t->name,
                          t->numel);
    cv_st_read_f32(t, *out);
    return 0;
}

int cv_st_to_i64(const cv_st_tensor *t, int64_t **out, cv_err *e)
{
    *out = NULL;
    if (cv_st_dtype_is_float(t->dtype))
        return cv_st_read_i64(t, NULL, e); /* sets the dtype error */
    int64_t *p = malloc((t->numel ? t->numel : 1) * sizeof(int64_t));
    if (!p)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", t->name,
                          "out of memory converting tensor '%s' (%zu elements)", t->name,
                          t->numel);
    if (cv_st_read_i64(t, p, e)) {
        free(p);
        return -1;
    }
    *out = p;
    return 0;
}

/* ---- writing ---------------------------------------------------------- */

typedef struct {
    char *s;
    size_t len, cap;
    int oom;
} sbuf;

static void sb_put(sbuf *b, const char *s, size_t n)
{
    if (b->oom)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->s, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->s = p;
        b->cap = cap;
    }
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = 0;
}

static void sb_str(sbuf *b, const char *s)
{
    sb_put(b, s, strlen(s));
}

static void sb_json_str(sbuf *b, const char *s)
{
    sb_put(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char tmp[8];
        if (*p == '"' || *p == '\\') {
            tmp[0] = '\\';
            tmp[1] = (char)*p;
            sb_put(b, tmp, 2);
        } else if (*p < 0x20) {
            snprintf(tmp, sizeof tmp, "\\u%04x", *p);
            sb_put(b, tmp, 6);
        } else {
            sb_put(b, (const char *)p, 1);
        }
    }
    sb_put(b, "\"", 1);
}

int cv_st_write(const cv_st_entry *t, size_t n, const char *const *meta, size_t nmeta,
                void **out, size_t *outlen, cv_err *e)
{
    *out = NULL;
    *outlen = 0;
    if ((n && !t) || (nmeta && !meta))
        return cv_err_set(e, CV_EINVAL, "bad_tensor", "",
                          "cv_st_write: NULL tensor or metadata list");
    size_t *nbytes = malloc((n ? n : 1) * sizeof *nbytes);
    if (!nbytes)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
    int rc = 0;
    size_t total = 0;
    for (size_t i = 0; i < n && !rc; i++) {
        const char *nm = t[i].name ? t[i].name : "";
        if (!t[i].name || strcmp(nm, "__metadata__") == 0)
            rc = cv_err_set(e, CV_EINVAL, "bad_tensor", nm, "tensor %zu: invalid name", i);
        else if ((unsigned)t[i].dtype >= CV_ST_DTYPE_COUNT)
            rc = cv_err_set(e, CV_EINVAL, "bad_dtype", nm, "tensor '%s': invalid dtype", nm);
        else if (t[i].rank < 0 || t[i].rank > CV_ST_MAX_RANK)
            rc = cv_err_set(e, CV_EINVAL, "bad_tensor", nm, "tensor '%s': rank %d out of range",
                            nm, t[i].rank);
        for (size_t j = 0; j < i && !rc; j++)
            if (strcmp(t[j].name, nm) == 0)
                rc = cv_err_set(e, CV_EINVAL, "bad_tensor", nm, "duplicate tensor name '%s'",
                                nm);
        if (rc)
            break;
        size_t numel = 1;
        for (int d = 0; d < t[i].rank && !rc; d++) {
            int64_t v = t[i].shape[d];
            if (v < 0)
                rc = cv_err_set(e, CV_EINVAL, "bad_tensor", nm,
                                "tensor '%s': negative dimension", nm);
            else if (v && numel > SIZE_MAX / 16 / (uint64_t)v)
                rc = cv_err_set(e, CV_EINVAL, "bad_tensor", nm, "tensor '%s': too large", nm);
            else
                numel *= (size_t)v;
        }
        if (rc)
            break;
        nbytes[i] = numel * dtype_sizes[t[i].dtype];
        if (nbytes[i] && !t[i].data)
            rc = cv_err_set(e, CV_EINVAL, "bad_tensor", nm, "tensor '%s': no data", nm);
        else if (total > SIZE_MAX / 2 - nbytes[i])
            rc = cv_err_set(e, CV_ETOOLARGE, "too_large", nm, "tensors too large");
        else
            total += nbytes[i];
    }
    if (rc) {
        free(nbytes);
        return -1;
    }

    sbuf h = {0};
    sb_str(&h, "{");
    int first = 1;
    if (nmeta) {
        sb_str(&h, "\"__metadata__\":{");
        for (size_t i = 0; i < nmeta; i++) {
            if (i)
                sb_str(&h, ",");
            sb_json_str(&h, meta[2 * i] ? meta[2 * i] : "");
            sb_str(&h, ":");
            sb_json_str(&h, meta[2 * i + 1] ? meta[2 * i + 1] : "");
        }
        sb_str(&h, "}");
        first = 0;
    }
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        char num[64];
        if (!first)
            sb_str(&h, ",");
        first = 0;
        sb_json_str(&h, t[i].name);
        sb_str(&h, ":{\"dtype\":\"");
        sb_str(&h, dtype_names[t[i].dtype]);
        sb_str(&h, "\",\"shape\":[");
        for (int d = 0; d < t[i].rank; d++) {
            snprintf(num, sizeof num, d ? ",%lld" : "%lld", (long long)t[i].shape[d]);
            sb_str(&h, num);
        }
        snprintf(num, sizeof num, "],\"data_offsets\":[%zu,%zu]}", off, off + nbytes[i]);
        sb_str(&h, num);
        off += nbytes[i];
    }
    sb_str(&h, "}");
    while (!h.oom && h.len % 8)
        sb_str(&h, " ");
    if (h.oom) {
        free(h.s);
        free(nbytes);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "out of memory");
    }
    size_t len = 8 + h.len + total;
    uint8_t *buf = malloc(len);
    if (!buf) {
        free(h.s);
        free(nbytes);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                          "out of memory writing safetensors (%zu bytes)", len);
    }
    uint64_t hl = h.len;
    for (int i = 0; i < 8; i++)
        buf[i] = (uint8_t)(hl >> (8 * i));
    memcpy(buf + 8, h.s, h.len);
    uint8_t *p = buf + 8 + h.len;
    for (size_t i = 0; i < n; i++) {
        if (nbytes[i])
            memcpy(p, t[i].data, nbytes[i]);
        p += nbytes[i];
    }
    free(h.s);
    free(nbytes);
    *out = buf;
    *outlen = len;
    return 0;
}

int cv_st_save(const char *path, const cv_st_entry *t, size_t n, const char *const *meta,
               size_t nmeta, cv_err *e)
{
    void *buf;
    size_t len;
    if (cv_st_write(t, n, meta, nmeta, &buf, &len, e))
        return -1;
    FILE *fp = fopen(path, "wb");
    if (!fp) {
        int err = errno;
        free(buf);
        return cv_err_set(e, CV_EINVAL, "io_error", path, "cannot create %s: %s", path,
                          strerror(err));
    }
    size_t put = fwrite(buf, 1, len, fp);
    int bad = put != len;
    if (fclose(fp) != 0)
        bad = 1;
    free(buf);
    if (bad)
        return cv_err_set(e, CV_EINVAL, "io_error", path, "short write on %s", path);
    return 0;
}
