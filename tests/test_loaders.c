/* test_loaders.c - safetensors, architecture JSON, parameter and dataset
 * loaders: every rejection names its problem, round-trips are exact, dtype
 * conversions are correct.  Fixtures are generated in code with cv_st_write. */
#include "testutil.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "api/arch.h"
#include "api/datafile.h"
#include "api/params.h"
#include "api/safetensors.h"
#include "engine/dataset.h"
#include "engine/layer_activation.h"
#include "engine/layer_batchnorm.h"
#include "engine/layer_conv.h"
#include "engine/layer_linear.h"
#include "engine/layer_passthrough.h"
#include "engine/layer_pool.h"

/* layer i's attributes by its class */
#define CONV(m, i) CV_LAYER_ATTR(&(m)->layers[i], cv_conv2d_attr)
#define POOL(m, i) CV_LAYER_ATTR(&(m)->layers[i], cv_pool2d_attr)
#define BN(m, i) CV_LAYER_ATTR(&(m)->layers[i], cv_batchnorm_attr)
#define LIN(m, i) CV_LAYER_ATTR(&(m)->layers[i], cv_linear_attr)
#define FLAT(m, i) CV_LAYER_ATTR(&(m)->layers[i], cv_flatten_attr)

#define ASSERT_ERR(rc, e, code_, field_, substr)                                              \
    do {                                                                                      \
        ck_assert_int_eq((rc), -1);                                                           \
        ck_assert_msg(strcmp((e).code, (code_)) == 0, "code '%s' != '%s' (%s)", (e).code,     \
                      (code_), (e).message);                                                  \
        if ((field_) != NULL)                                                                 \
            ck_assert_msg(strcmp((e).field, (field_) ? (field_) : "") == 0,                   \
                          "field '%s' != '%s' (%s)", (e).field, (field_) ? (field_) : "",     \
                          (e).message);                                                       \
        ck_assert_msg(strstr((e).message, (substr)) != NULL, "message '%s' lacks '%s'",       \
                      (e).message, (substr));                                                 \
    } while (0)

/* ---- helpers ----------------------------------------------------------- */

/* A safetensors file with a literal header (' -> ") and datalen zero bytes. */
static uint8_t *raw_st(const char *hdr, size_t datalen, size_t *len)
{
    size_t n = strlen(hdr);
    uint8_t *b = calloc(1, 8 + n + datalen);
    ck_assert_ptr_nonnull(b);
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)((uint64_t)n >> (8 * i));
    for (size_t i = 0; i < n; i++)
        b[8 + i] = hdr[i] == '\'' ? '"' : (uint8_t)hdr[i];
    *len = 8 + n + datalen;
    return b;
}

static void st_expect(const char *hdr, size_t datalen, const char *code, const char *field,
                      const char *substr)
{
    size_t len;
    uint8_t *b = raw_st(hdr, datalen, &len);
    cv_st_file f;
    cv_err e;
    cv_err_clear(&e);
    int rc = cv_st_parse(b, len, &f, &e);
    ASSERT_ERR(rc, e, code, field, substr);
    ck_assert_uint_eq(f.ntensors, 0);
    ck_assert_ptr_null(f.tensors);
    free(b);
}

static cv_st_entry ent(const char *name, cv_st_dtype dt, int rank, const int64_t *shape,
                       const void *data)
{
    cv_st_entry t;
    memset(&t, 0, sizeof t);
    t.name = name;
    t.dtype = dt;
    t.rank = rank;
    for (int i = 0; i < rank; i++)
        t.shape[i] = shape[i];
    t.data = data;
    return t;
}

/* Architecture from JSON text written with ' for ". */
static int arch_q(const char *text, cv_model *m, cv_err *e)
{
    size_t n = strlen(text);
    char *s = malloc(n + 1);
    ck_assert_ptr_nonnull(s);
    for (size_t i = 0; i <= n; i++)
        s[i] = text[i] == '\'' ? '"' : text[i];
    cv_err_clear(e);
    int rc = cv_arch_parse(s, n, m, e);
    free(s);
    return rc;
}

/* {input_shape: in, layers: [layers], loss: {type: loss}} */
static int arch_l(const char *in, const char *layers, const char *loss, cv_model *m, cv_err *e)
{
    char buf[4096];
    snprintf(buf, sizeof buf, "{'input_shape': %s, 'layers': [%s], 'loss': {'type': '%s'}}",
             in, layers, loss);
    return arch_q(buf, m, e);
}

static void arch_expect(const char *in, const char *layers, const char *code, const char *field,
                        const char *substr)
{
    cv_model *m = calloc(1, sizeof *m);
    cv_err e;
    int rc = arch_l(in, layers, "MSELoss", m, &e);
    ASSERT_ERR(rc, e, code, field, substr);
    free(m);
}

static cv_model *new_model(const char *in, const char *layers, const char *loss)
{
    cv_model *m = calloc(1, sizeof *m);
    cv_err e;
    ck_assert_ptr_nonnull(m);
    int rc = arch_l(in, layers, loss, m, &e);
    ck_assert_msg(rc == 0, "arch: %s (%s)", e.message, e.field);
    return m;
}

static void free_model(cv_model *m)
{
    cv_model_free(m);
    free(m);
}

/* ---- safetensors --------------------------------------------------------- */

START_TEST(st_roundtrip)
{
    float a[6] = {1, -2, 3.5f, 0, 1e-30f, -7};
    int64_t b[4] = {0, -1, INT64_MAX, INT64_MIN};
    float s = 42;
    int64_t sa[] = {2, 3}, sb[] = {4}, sz[] = {0, 3};
    cv_st_entry t[4] = {ent("a", CV_ST_F32, 2, sa, a), ent("b\"q", CV_ST_I64, 1, sb, b),
                        ent("scalar", CV_ST_F32, 0, NULL, &s),
                        ent("empty", CV_ST_F32, 2, sz, NULL)};
    const char *meta[] = {"format", "pt", "note", "a\\b"};
    void *buf;
    size_t len;
    cv_err e;
    ck_assert_int_eq(cv_st_write(t, 4, meta, 2, &buf, &len, &e), 0);
    uint64_t hl = 0;
    memcpy(&hl, buf, 8);
    ck_assert_uint_eq(hl % 8, 0);
    ck_assert_uint_eq(len, 8 + hl + 24 + 32 + 4);
    {
        const char *h = (const char *)buf + 8;
        size_t end = hl;
        while (end > 0 && h[end - 1] == ' ')
            end--;
        ck_assert_int_eq(h[end - 1], '}');
        ck_assert_uint_lt(hl - end, 8);
    }

    cv_st_file f;
    ck_assert_int_eq(cv_st_parse(buf, len, &f, &e), 0);
    ck_assert_uint_eq(f.ntensors, 4);
    ck_assert_str_eq(cv_st_meta(&f, "format"), "pt");
    ck_assert_str_eq(cv_st_meta(&f, "note"), "a\\b");
    ck_assert_ptr_null(cv_st_meta(&f, "nope"));
    const cv_st_tensor *ta = cv_st_find(&f, "a"), *tb = cv_st_find(&f, "b\"q"),
                       *ts = cv_st_find(&f, "scalar"), *tz = cv_st_find(&f, "empty");
    ck_assert_ptr_nonnull(ta);
    ck_assert_ptr_nonnull(tb);
    ck_assert_ptr_nonnull(ts);
    ck_assert_ptr_nonnull(tz);
    ck_assert_ptr_null(cv_st_find(&f, "c"));
    ck_assert_int_eq(ta->dtype, CV_ST_F32);
    ck_assert_int_eq(ta->rank, 2);
    ck_assert_int_eq(ta->shape[0], 2);
    ck_assert_int_eq(ta->shape[1], 3);
    ck_assert_uint_eq(ta->numel, 6);
    ck_assert_int_eq(ts->rank, 0);
    ck_assert_uint_eq(ts->numel, 1);
    ck_assert_uint_eq(tz->numel, 0);
    float *fa;
    int64_t *ib;
    ck_assert_int_eq(cv_st_to_f32(ta, &fa, &e), 0);
    ck_assert_int_eq(memcmp(fa, a, sizeof a), 0);
    ck_assert_int_eq(cv_st_to_i64(tb, &ib, &e), 0);
    ck_assert_int_eq(memcmp(ib, b, sizeof b), 0);
    char sh[64];
    cv_st_shape_str(ta, sh, sizeof sh);
    ck_assert_str_eq(sh, "[2, 3]");
    cv_st_shape_str(ts, sh, sizeof sh);
    ck_assert_str_eq(sh, "[]");

    /* rewrite from the parsed file: identical bytes */
    cv_st_entry t2[4];
    for (size_t i = 0; i < 4; i++) {
        const cv_st_tensor *p = cv_st_find(&f, t[i].name);
        t2[i] = ent(p->name, p->dtype, p->rank, p->shape, p->data);
    }
    const char *meta2[4] = {f.meta_keys[0], f.meta_values[0], f.meta_keys[1], f.meta_values[1]};
    void *buf2;
    size_t len2;
    ck_assert_int_eq(cv_st_write(t2, 4, meta2, 2, &buf2, &len2, &e), 0);
    ck_assert_uint_eq(len2, len);
    ck_assert_int_eq(memcmp(buf, buf2, len), 0);
    free(buf2);
    free(fa);
    free(ib);
    cv_st_free(&f);
    free(buf);
}
END_TEST

START_TEST(st_file_io)
{
    char path[] = "/tmp/curvd_test_st_XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    close(fd);
    double v[3] = {1.5, -2.25, 1e300};
    int64_t sh[] = {3};
    cv_st_entry t = ent("v", CV_ST_F64, 1, sh, v);
    cv_err e;
    ck_assert_int_eq(cv_st_save(path, &t, 1, NULL, 0, &e), 0);
    cv_st_file f;
    ck_assert_int_eq(cv_st_load(path, &f, &e), 0);
    float *out;
    ck_assert_int_eq(cv_st_to_f32(cv_st_find(&f, "v"), &out, &e), 0);
    ck_assert(out[0] == 1.5f && out[1] == -2.25f && isinf(out[2]));
    free(out);
    cv_st_free(&f);
    unlink(path);
    ck_assert_int_eq(cv_st_load(path, &f, &e), -1);
    ck_assert_int_eq(e.status, CV_ENOTFOUND);
    ck_assert_str_eq(e.field, path);
}
END_TEST

START_TEST(st_bad_container)
{
    cv_st_file f;
    cv_err e;
    uint8_t small[7] = {0};
    ASSERT_ERR(cv_st_parse(small, 7, &f, &e), e, "bad_safetensors", "", "shorter than the 8-byte");
    ASSERT_ERR(cv_st_parse(small, 0, &f, &e), e, "bad_safetensors", "", "0 bytes");
    uint8_t b[20] = {100, 0, 0, 0, 0, 0, 0, 0, '{', '}'};
    ASSERT_ERR(cv_st_parse(b, sizeof b, &f, &e), e, "bad_safetensors", "",
               "header length 100 exceeds the 12 bytes");
    uint8_t c[16] = {0, 0, 0, 0, 0, 1, 0, 0};
    ASSERT_ERR(cv_st_parse(c, sizeof c, &f, &e), e, "bad_safetensors", "", "absurd");
    uint8_t d[8] = {0};
    ASSERT_ERR(cv_st_parse(d, sizeof d, &f, &e), e, "bad_safetensors", "", "not a JSON object");
    ck_assert_int_eq(e.status, CV_EINVAL);
}
END_TEST

START_TEST(st_bad_header)
{
    st_expect("{'a': ", 0, "bad_safetensors", "", "not valid JSON");
    st_expect("{'a': 1,}", 0, "bad_safetensors", "", "not valid JSON");
    st_expect("[1, 2]", 0, "bad_safetensors", "", "not a JSON object");
    st_expect("{} xyz", 0, "bad_safetensors", "", "trailing bytes");
    /* a NUL in a tensor name would truncate it (strict JSON, api/json_strict.h) */
    st_expect("{'a\\u0000b': {'dtype': 'F32', 'shape': [1], 'data_offsets': [0, 4]}}", 4,
              "bad_safetensors", "a", "NUL character");
    st_expect("{'a': 3}", 0, "bad_safetensors", "a", "must be an object");
    st_expect("{'a': {'shape': [1], 'data_offsets': [0, 4]}}", 4, "bad_safetensors", "a",
              "tensor 'a' has no dtype");
    st_expect("{'a': {'dtype': 5, 'shape': [1], 'data_offsets': [0, 4]}}", 4, "bad_safetensors",
              "a", "dtype must be a string");
    st_expect("{'a': {'dtype': 'F32', 'data_offsets': [0, 4]}}", 4, "bad_safetensors", "a",
              "has no shape");
    st_expect("{'a': {'dtype': 'F32', 'shape': 4, 'data_offsets': [0, 4]}}", 4, "bad_safetensors",
              "a", "shape must be a list");
    st_expect("{'a': {'dtype': 'F32', 'shape': [1, -2], 'data_offsets': [0, 4]}}", 4,
              "bad_safetensors", "a", "shape[1] must be a non-negative integer");
    st_expect("{'a': {'dtype': 'F32', 'shape': [1.5], 'data_offsets': [0, 4]}}", 4,
              "bad_safetensors", "a", "shape[0] must be a non-negative integer");
    st_expect("{'a': {'dtype': 'F32', 'shape': ['1'], 'data_offsets': [0, 4]}}", 4,
              "bad_safetensors", "a", "shape[0]");
    st_expect("{'a': {'dtype': 'F32', 'shape': [1,1,1,1,1,1,1,1,1], 'data_offsets': [0, 4]}}", 4,
              "bad_safetensors", "a", "rank 9");
    st_expect("{'a': {'dtype': 'F32', 'shape': [1]}}", 4, "bad_safetensors", "a",
              "no data_offsets");
    st_expect("{'a': {'dtype': 'F32', 'shape': [1], 'data_offsets': [0]}}", 4, "bad_safetensors",
              "a", "[begin, end]");
    st_expect("{'a': {'dtype': 'F32', 'shape': [1], 'data_offsets': [0, -4]}}", 4,
              "bad_safetensors", "a", "[begin, end]");
    st_expect("{'a': {'dtype': 'F32', 'shape': [1], 'data_offsets': [4, 0]}}", 4,
              "bad_safetensors", "a", "end 0 is before begin 4");
    st_expect("{'a': {'dtype': 'F32', 'shape': [1], 'data_offsets': [0, 8]}}", 4,
              "bad_safetensors", "a", "beyond the 4-byte data buffer");
    st_expect("{'a': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 4]}}", 4,
              "bad_safetensors", "a", "4 data bytes but dtype F32 shape [2] needs 8");
    st_expect("{'a': {'dtype': 'Q7', 'shape': [1], 'data_offsets': [0, 4]}}", 4, "bad_dtype", "a",
              "unknown dtype 'Q7'");
    st_expect("{'a': {'dtype': 'F8_E4M3', 'shape': [1], 'data_offsets': [0, 1]}}", 1, "bad_dtype",
              "a", "unsupported dtype F8_E4M3");
    st_expect("{'a': {'dtype': 'F32', 'shape': [1], 'data_offsets': [0, 4], 'extra': 1}}", 4,
              "bad_safetensors", "a", "unknown field 'extra'");
    st_expect("{'a': {'dtype': 'F32', 'shape': [1], 'data_offsets': [0, 4]},"
              " 'a': {'dtype': 'F32', 'shape': [1], 'data_offsets': [4, 8]}}",
              8, "bad_safetensors", "a", "duplicate tensor name 'a'");
    st_expect("{'a': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]},"
              " 'b': {'dtype': 'F32', 'shape': [1], 'data_offsets': [4, 8]}}",
              8, "bad_safetensors", "b", "overlaps tensor 'a'");
    st_expect("{'a': {'dtype': 'F32', 'shape': [1], 'data_offsets': [4, 8]}}", 8,
              "bad_safetensors", "a", "4 unused bytes before tensor 'a'");
    st_expect("{'a': {'dtype': 'F32', 'shape': [1], 'data_offsets': [0, 4]}}", 12,
              "bad_safetensors", "", "8 unused bytes after the last tensor");
    st_expect("{'__metadata__': {'k': 1}}", 0, "bad_safetensors", "__metadata__",
              "value of 'k' is not a string");
    st_expect("{'__metadata__': [1]}", 0, "bad_safetensors", "__metadata__", "must be an object");
    st_expect("{}", 4, "bad_safetensors", "", "4 data bytes but no tensors");
    st_expect("{'a': {'dtype': 'F32', 'shape': [4294967296, 4294967296, 4294967296],"
              " 'data_offsets': [0, 4]}}", 4, "bad_safetensors", "a", "too large");

    /* zero-size tensors may share an offset; the header may be padded with spaces */
    size_t len;
    uint8_t *b = raw_st("{'e': {'dtype': 'F32', 'shape': [0], 'data_offsets': [0, 0]},"
                        " 'f': {'dtype': 'I64', 'shape': [0, 5], 'data_offsets': [0, 0]}}   ",
                        0, &len);
    cv_st_file f;
    cv_err e;
    ck_assert_int_eq(cv_st_parse(b, len, &f, &e), 0);
    ck_assert_uint_eq(f.ntensors, 2);
    cv_st_free(&f);
    free(b);
}
END_TEST

START_TEST(st_conversions)
{
    uint16_t h[] = {0x3C00, 0xC000, 0x7BFF, 0x0001, 0x7C00, 0xFC00, 0x7E00, 0x3555, 0x8000, 0x0400};
    uint16_t bf[] = {0x3F80, 0xC040, 0x4049, 0x7F80, 0x0000};
    double d[] = {0.1, -1e-300, 3.0};
    int32_t i32[] = {-5, 7, INT32_MAX};
    int8_t i8[] = {-128, 127};
    uint8_t u8[] = {0, 255}, bo[] = {0, 1};
    uint64_t u64[] = {5, UINT64_MAX};
    int64_t n10[] = {10}, n5[] = {5}, n3[] = {3}, n2[] = {2};
    cv_st_entry t[] = {ent("h", CV_ST_F16, 1, n10, h), ent("bf", CV_ST_BF16, 1, n5, bf),
                       ent("d", CV_ST_F64, 1, n3, d),  ent("i32", CV_ST_I32, 1, n3, i32),
                       ent("i8", CV_ST_I8, 1, n2, i8), ent("u8", CV_ST_U8, 1, n2, u8),
                       ent("bo", CV_ST_BOOL, 1, n2, bo), ent("u64", CV_ST_U64, 1, n2, u64)};
    void *buf;
    size_t len;
    cv_err e;
    ck_assert_int_eq(cv_st_write(t, 8, NULL, 0, &buf, &len, &e), 0);
    cv_st_file f;
    ck_assert_int_eq(cv_st_parse(buf, len, &f, &e), 0);
    float *v;
    ck_assert_int_eq(cv_st_to_f32(cv_st_find(&f, "h"), &v, &e), 0);
    ck_assert(v[0] == 1.0f && v[1] == -2.0f && v[2] == 65504.0f);
    ck_assert(v[3] == 5.9604644775390625e-08f);
    ck_assert(isinf(v[4]) && v[4] > 0 && isinf(v[5]) && v[5] < 0 && isnan(v[6]));
    ck_assert(v[7] == 0.333251953125f);
    ck_assert(v[8] == 0 && signbit(v[8]));
    ck_assert(v[9] == 6.103515625e-05f); /* smallest normal */
    free(v);
    ck_assert_int_eq(cv_st_to_f32(cv_st_find(&f, "bf"), &v, &e), 0);
    ck_assert(v[0] == 1.0f && v[1] == -3.0f && v[2] == 3.140625f && isinf(v[3]) && v[4] == 0);
    free(v);
    ck_assert_int_eq(cv_st_to_f32(cv_st_find(&f, "d"), &v, &e), 0);
    ck_assert(v[0] == 0.1f && v[1] == 0 && v[2] == 3.0f);
    free(v);
    int64_t *iv;
    ck_assert_int_eq(cv_st_to_i64(cv_st_find(&f, "i32"), &iv, &e), 0);
    ck_assert(iv[0] == -5 && iv[1] == 7 && iv[2] == INT32_MAX);
    free(iv);
    ck_assert_int_eq(cv_st_to_i64(cv_st_find(&f, "i8"), &iv, &e), 0);
    ck_assert(iv[0] == -128 && iv[1] == 127);
    free(iv);
    ck_assert_int_eq(cv_st_to_i64(cv_st_find(&f, "u8"), &iv, &e), 0);
    ck_assert(iv[0] == 0 && iv[1] == 255);
    free(iv);
    ck_assert_int_eq(cv_st_to_i64(cv_st_find(&f, "bo"), &iv, &e), 0);
    ck_assert(iv[0] == 0 && iv[1] == 1);
    free(iv);
    ck_assert_int_eq(cv_st_to_f32(cv_st_find(&f, "i32"), &v, &e), 0);
    ck_assert(v[0] == -5.0f);
    free(v);
    ASSERT_ERR(cv_st_to_i64(cv_st_find(&f, "u64"), &iv, &e), e, "bad_value", "u64",
               "element 1 = 18446744073709551615 does not fit in int64");
    ck_assert_ptr_null(iv);
    ASSERT_ERR(cv_st_to_i64(cv_st_find(&f, "d"), &iv, &e), e, "bad_dtype", "d",
               "expected an integer dtype, got F64");
    cv_st_free(&f);
    free(buf);
}
END_TEST

START_TEST(st_writer_rejects)
{
    int64_t sh[] = {2}, neg[] = {-1};
    float a[2] = {0};
    cv_st_entry t[2] = {ent("a", CV_ST_F32, 1, sh, a), ent("a", CV_ST_F32, 1, sh, a)};
    void *buf;
    size_t len;
    cv_err e;
    ASSERT_ERR(cv_st_write(t, 2, NULL, 0, &buf, &len, &e), e, "bad_tensor", "a", "duplicate");
    ck_assert_ptr_null(buf);
    t[1] = ent("__metadata__", CV_ST_F32, 1, sh, a);
    ASSERT_ERR(cv_st_write(t, 2, NULL, 0, &buf, &len, &e), e, "bad_tensor", NULL, "invalid name");
    t[1] = ent("b", CV_ST_F32, 1, neg, a);
    ASSERT_ERR(cv_st_write(t, 2, NULL, 0, &buf, &len, &e), e, "bad_tensor", "b", "negative");
    t[1] = ent("b", CV_ST_F32, 1, sh, NULL);
    ASSERT_ERR(cv_st_write(t, 2, NULL, 0, &buf, &len, &e), e, "bad_tensor", "b", "no data");
    /* empty file: just "{}" padded */
    ck_assert_int_eq(cv_st_write(NULL, 0, NULL, 0, &buf, &len, &e), 0);
    ck_assert_uint_eq(len, 16);
    cv_st_file f;
    ck_assert_int_eq(cv_st_parse(buf, len, &f, &e), 0);
    ck_assert_uint_eq(f.ntensors, 0);
    cv_st_free(&f);
    free(buf);
}
END_TEST

/* ---- architecture -------------------------------------------------------- */

/* The example architecture of docs/interface.md §1. */
static const char *INTERFACE_ARCH =
    "{'input_shape': [1, 28, 28], 'layers': ["
    "{'type': 'Conv2d', 'in_channels': 1, 'out_channels': 8, 'kernel_size': 3, 'stride': 1,"
    " 'padding': 1},"
    "{'type': 'ReLU'}, {'type': 'MaxPool2d', 'kernel_size': 2}, {'type': 'Flatten'},"
    "{'type': 'Linear', 'in_features': 1568, 'out_features': 10, 'bias': true}],"
    " 'loss': {'type': 'CrossEntropyLoss', 'reduction': 'mean'}}";

START_TEST(arch_interface_example)
{
    cv_model *m = calloc(1, sizeof *m);
    cv_err e;
    ck_assert_msg(arch_q(INTERFACE_ARCH, m, &e) == 0, "%s", e.message);
    ck_assert_int_eq(m->nlayers, 5);
    ck_assert_int_eq(m->loss, CV_LOSS_CE);
    ck_assert_int_eq(m->reduction, CV_RED_MEAN);
    ck_assert_ptr_eq(m->layers[0].cls, &cv_conv2d_class);
    ck_assert_int_eq(CONV(m, 0)->kernel[1], 3);
    ck_assert_int_eq(CONV(m, 0)->padding[0], 1);
    ck_assert_int_eq(CONV(m, 0)->has_bias, 1);
    ck_assert_int_eq(POOL(m, 2)->stride[0], 2); /* default = kernel_size */
    ck_assert_int_eq(FLAT(m, 3)->start_dim, 1);
    ck_assert_int_eq(FLAT(m, 3)->end_dim, -1);
    ck_assert_uint_eq(m->nparams_total, 8 * 9 + 8 + 1568 * 10 + 10);
    ck_assert_ptr_null(m->params);
    free(m);
}
END_TEST

static const char *ALL_LAYERS =
    "{'input_shape': [3, 12, 12], 'layers': ["
    "{'type': 'Conv2d', 'in_channels': 3, 'out_channels': 4, 'kernel_size': [3, 5],"
    " 'stride': [1, 2], 'padding': [1, 2], 'dilation': 1, 'groups': 1, 'bias': false,"
    " 'padding_mode': 'zeros'},"
    "{'type': 'BatchNorm2d', 'num_features': 4, 'eps': 0.001, 'momentum': null,"
    " 'affine': true, 'track_running_stats': true, 'training': false},"
    "{'type': 'LeakyReLU', 'negative_slope': 0.2, 'inplace': true},"
    "{'type': 'MaxPool2d', 'kernel_size': 2, 'stride': null, 'padding': 1, 'dilation': 1,"
    " 'ceil_mode': true, 'return_indices': false},"
    "{'type': 'ELU', 'alpha': 0.5},"
    "{'type': 'AvgPool2d', 'kernel_size': [2, 1], 'stride': 1, 'padding': 0,"
    " 'ceil_mode': false, 'count_include_pad': false, 'divisor_override': null},"
    "{'type': 'Conv2d', 'in_channels': 4, 'out_channels': 4, 'kernel_size': 3,"
    " 'padding': 'same', 'groups': 2},"
    "{'type': 'AdaptiveAvgPool2d', 'output_size': [2, 3]},"
    "{'type': 'GELU', 'approximate': 'tanh'},"
    "{'type': 'Flatten', 'start_dim': 1, 'end_dim': -1},"
    "{'type': 'Dropout', 'p': 0.25, 'inplace': false},"
    "{'type': 'Linear', 'in_features': 24, 'out_features': 6, 'bias': true},"
    "{'type': 'BatchNorm1d', 'num_features': 6, 'affine': false},"
    "{'type': 'Softplus', 'beta': 2, 'threshold': 10},"
    "{'type': 'Tanh'}, {'type': 'Sigmoid'}, {'type': 'Identity'}, {'type': 'ReLU'},"
    "{'type': 'Linear', 'in_features': 6, 'out_features': 3}],"
    " 'loss': {'type': 'BCEWithLogitsLoss', 'reduction': 'sum'}}";

START_TEST(arch_roundtrip)
{
    cv_model *m = calloc(1, sizeof *m), *m2 = calloc(1, sizeof *m2);
    cv_err e;
    ck_assert_msg(arch_q(ALL_LAYERS, m, &e) == 0, "%s (%s)", e.message, e.field);
    ck_assert_int_eq(m->nlayers, 19);
    ck_assert_int_eq(m->loss, CV_LOSS_BCE);
    ck_assert_int_eq(m->reduction, CV_RED_SUM);
    const cv_layer *L = m->layers;
    ck_assert(CONV(m, 0)->kernel[0] == 3 && CONV(m, 0)->kernel[1] == 5 &&
              CONV(m, 0)->stride[1] == 2 && CONV(m, 0)->has_bias == 0);
    ck_assert(BN(m, 1)->eps == 0.001 && BN(m, 1)->affine == 1 &&
              BN(m, 1)->track_running_stats == 1);
    ck_assert(CV_LAYER_ATTR(&L[2], cv_leakyrelu_attr)->negative_slope == 0.2);
    ck_assert(POOL(m, 3)->stride[0] == 2 && POOL(m, 3)->ceil_mode == 1 &&
              POOL(m, 3)->padding[1] == 1);
    ck_assert(CV_LAYER_ATTR(&L[4], cv_elu_attr)->alpha == 0.5);
    ck_assert(POOL(m, 5)->kernel[0] == 2 && POOL(m, 5)->kernel[1] == 1 &&
              POOL(m, 5)->count_include_pad == 0);
    ck_assert(CONV(m, 6)->padding[0] == 1 && CONV(m, 6)->padding[1] == 1 &&
              CONV(m, 6)->groups == 2);
    ck_assert(POOL(m, 7)->output_size[0] == 2 && POOL(m, 7)->output_size[1] == 3);
    ck_assert(CV_LAYER_ATTR(&L[8], cv_gelu_attr)->approximate == 1);
    ck_assert(CV_LAYER_ATTR(&L[10], cv_dropout_attr)->p == 0.25);
    ck_assert(BN(m, 12)->affine == 0 && BN(m, 12)->eps == 1e-5);
    ck_assert(CV_LAYER_ATTR(&L[13], cv_softplus_attr)->beta == 2 &&
              CV_LAYER_ATTR(&L[13], cv_softplus_attr)->threshold == 10);
    ck_assert(LIN(m, 18)->has_bias == 1);
    ck_assert_int_eq(L[18].out_shape.dim[0], 3);

    char *text = tu_arch_reparse(m, m2, "arch_roundtrip");
    /* the interface example: padding 'same' came out as numbers, type names kept */
    ck_assert_ptr_nonnull(strstr(text, "\"type\":\"AdaptiveAvgPool2d\""));
    ck_assert_ptr_nonnull(strstr(text, "\"reduction\":\"sum\""));
    free(text);
    free(m);
    free(m2);
}
END_TEST

START_TEST(arch_defaults)
{
    cv_model *m = new_model("[2, 8, 8]",
                            "{'type': 'Conv2d', 'in_channels': 2, 'out_channels': 2,"
                            " 'kernel_size': 3, 'padding': 'valid'},"
                            "{'type': 'AvgPool2d', 'kernel_size': 2}, {'type': 'LeakyReLU'},"
                            "{'type': 'ELU'}, {'type': 'GELU'}, {'type': 'Softplus'},"
                            "{'type': 'Dropout'}, {'type': 'Flatten'},"
                            "{'type': 'Linear', 'in_features': 18, 'out_features': 2},"
                            "{'type': 'BatchNorm1d', 'num_features': 2}",
                            "MSELoss");
    const cv_layer *L = m->layers;
    ck_assert(CONV(m, 0)->padding[0] == 0 && CONV(m, 0)->stride[0] == 1 &&
              CONV(m, 0)->dilation[1] == 1 && CONV(m, 0)->groups == 1 &&
              CONV(m, 0)->has_bias == 1);
    ck_assert(POOL(m, 1)->stride[0] == 2 && POOL(m, 1)->count_include_pad == 1 &&
              POOL(m, 1)->ceil_mode == 0);
    ck_assert(CV_LAYER_ATTR(&L[2], cv_leakyrelu_attr)->negative_slope == 0.01);
    ck_assert(CV_LAYER_ATTR(&L[3], cv_elu_attr)->alpha == 1.0);
    ck_assert(CV_LAYER_ATTR(&L[4], cv_gelu_attr)->approximate == 0);
    ck_assert(CV_LAYER_ATTR(&L[5], cv_softplus_attr)->beta == 1.0 &&
              CV_LAYER_ATTR(&L[5], cv_softplus_attr)->threshold == 20.0);
    ck_assert(CV_LAYER_ATTR(&L[6], cv_dropout_attr)->p == 0.5);
    ck_assert(BN(m, 9)->eps == 1e-5 && BN(m, 9)->affine == 1 &&
              BN(m, 9)->track_running_stats == 1);
    ck_assert_int_eq(L[9].nbuffers, 3);
    ck_assert_str_eq(L[9].buffers[2].name, "9.num_batches_tracked");
    ck_assert_int_eq(m->reduction, CV_RED_MEAN);
    free_model(m);
}
END_TEST

/* padding="same" as PyTorch pads it: d*(k-1) in all, the odd one on the
 * bottom/right; exported as "same" when asymmetric, numbers otherwise. */
START_TEST(arch_same_padding_and_bn1d_cl)
{
    cv_model *m = new_model("[2, 5, 7]",
                            "{'type': 'Conv2d', 'in_channels': 2, 'out_channels': 2,"
                            " 'kernel_size': [2, 4], 'dilation': [3, 1], 'padding': 'same'},"
                            "{'type': 'Conv2d', 'in_channels': 2, 'out_channels': 3,"
                            " 'kernel_size': 3, 'dilation': 2, 'padding': 'same'},"
                            "{'type': 'Flatten', 'start_dim': 2},"
                            "{'type': 'BatchNorm1d', 'num_features': 3},"
                            "{'type': 'Flatten'},"
                            "{'type': 'Linear', 'in_features': 105, 'out_features': 2}",
                            "MSELoss");
    const cv_layer *L = m->layers;
    ck_assert(CONV(m, 0)->padding[0] == 1 && CONV(m, 0)->pad_extra[0] == 1); /* 3 = 1 + 2 */
    ck_assert(CONV(m, 0)->padding[1] == 1 && CONV(m, 0)->pad_extra[1] == 1); /* 3 = 1 + 2 */
    ck_assert(CONV(m, 1)->padding[0] == 2 && CONV(m, 1)->pad_extra[0] == 0 &&
              CONV(m, 1)->pad_extra[1] == 0);
    for (int i = 0; i < 2; i++)
        ck_assert(L[i].out_shape.dim[1] == 5 && L[i].out_shape.dim[2] == 7);
    ck_assert(L[3].in_shape.rank == 2 && L[3].in_shape.dim[0] == 3 && L[3].in_shape.dim[1] == 35);
    ck_assert_int_eq(L[3].nparams, 2);
    cJSON *j = cv_arch_to_json(m);
    char *text = cJSON_PrintUnformatted(j);
    ck_assert_msg(strstr(text, "\"padding\":\"same\"") != NULL, "%s", text);
    ck_assert_msg(strstr(text, "\"padding\":[2,2]") != NULL, "%s", text);
    cv_model *m2 = calloc(1, sizeof *m2);
    cv_err e;
    ck_assert_msg(cv_arch_parse(text, strlen(text), m2, &e) == 0, "%s", e.message);
    for (int i = 0; i < 2; i++)
        for (int a = 0; a < 2; a++)
            ck_assert(CONV(m2, i)->padding[a] == CONV(m, i)->padding[a] &&
                      CONV(m2, i)->pad_extra[a] == CONV(m, i)->pad_extra[a]);
    free(text);
    cJSON_Delete(j);
    free_model(m2);
    free_model(m);
    /* rank-2 input straight in: [C, L] */
    m = new_model("[3, 4]", "{'type': 'BatchNorm1d', 'num_features': 3}, {'type': 'Flatten'},"
                  "{'type': 'Linear', 'in_features': 12, 'out_features': 2}", "MSELoss");
    ck_assert_int_eq(m->layers[0].out_shape.rank, 2);
    free_model(m);
}
END_TEST

START_TEST(arch_rejects_fields)
{
    const char *lin = "{'type': 'Linear', 'in_features': 4, 'out_features': 2}";
    char buf[512];
    arch_expect("[4]", "{'type': 'Conv2d', 'in_channels': 1, 'out_channels': 1, 'kernal_size': 3}",
                "unknown_field", "layers[0].kernal_size", "did you mean 'kernel_size'?");
    arch_expect("[4]", "{'type': 'Linear', 'in_features': '4', 'out_features': 2}",
                "invalid_type", "layers[0].in_features", "must be an integer >= 1, got string");
    arch_expect("[4]", "{'type': 'Linear', 'in_features': 4, 'out_features': 0}",
                "invalid_value", "layers[0].out_features", "must be an integer >= 1, got 0");
    arch_expect("[4]", "{'type': 'Linear', 'in_features': -4, 'out_features': 2}",
                "invalid_value", "layers[0].in_features", "got -4");
    arch_expect("[4]", "{'type': 'Linear', 'in_features': 4.5, 'out_features': 2}",
                "invalid_type", "layers[0].in_features", "got 4.5");
    arch_expect("[4]", "{'type': 'Linear', 'in_features': 1e12, 'out_features': 2}",
                "invalid_value", "layers[0].in_features", "too large");
    arch_expect("[4]", "{'type': 'Linear', 'out_features': 2}", "missing_field",
                "layers[0].in_features", "missing");
    arch_expect("[4]", "{'type': 'Linear', 'in_features': 4, 'out_features': 2, 'bias': 1}",
                "invalid_type", "layers[0].bias", "must be true or false, got 1");
    arch_expect("[4]", "{'in_features': 4}", "missing_field", "layers[0].type", "missing");
    arch_expect("[4]", "{'type': 3}", "invalid_type", "layers[0].type", "got 3");
    arch_expect("[4]", "{'type': 'Conv3d'}", "unknown_layer_type", "layers[0].type",
                "unknown layer type 'Conv3d' (supported: Linear, Conv2d");
    arch_expect("[4]", "{'type': 'relu'}", "unknown_layer_type", "layers[0].type",
                "Dropout, SiLU, "); /* the list goes on */
    arch_expect("[4]", "{'type': 'relu'}", "unknown_layer_type", "layers[0].type",
                "); did you mean 'ReLU'?");
    arch_expect("[4]", "[1]", "invalid_type", "layers[0]", "must be an object");
    arch_expect("[4]", "{'type': 'ReLU', 'inplace': true, 'inplace': false}", "duplicate_field",
                "layers[0].inplace", "given twice");
    arch_expect("[4]", "{'type': 'Tanh', 'inplace': true}", "unknown_field", "layers[0].inplace",
                "unknown field for Tanh (known: none)");
    arch_expect("[4]", "{'type': 'Linear', 'in_features': 4, 'out_features': 2, 'bais': true}",
                "unknown_field", "layers[0].bais",
                "layers[0].bais: unknown field for Linear (known: in_features, out_features, "
                "bias); did you mean 'bias'?");
    snprintf(buf, sizeof buf, "%s, {'type': 'Sigmoid', 'beta': 1}", lin);
    arch_expect("[4]", buf, "unknown_field", "layers[1].beta", "unknown field for Sigmoid");
    arch_expect("[1, 4, 4]",
                "{'type': 'Conv2d', 'in_channels': 1, 'out_channels': 1, 'kernel_size': 3,"
                " 'padding_mode': 'reflect'}",
                "unsupported", "layers[0].padding_mode", "'reflect' is not supported");
    arch_expect("[1, 4, 4]",
                "{'type': 'Conv2d', 'in_channels': 1, 'out_channels': 1, 'kernel_size': 3,"
                " 'stride': 2, 'padding': 'same'}",
                "invalid_value", "layers[0].padding", "not supported for strided");
    /* kernel 257 with dilation 2^24 spans 2^32 + 1, which wraps to 1 in int */
    arch_expect("[1, 28, 28]",
                "{'type': 'Conv2d', 'in_channels': 1, 'out_channels': 1, 'kernel_size': 257,"
                " 'dilation': 16777216}",
                "invalid_model", "layers[0].kernel_size", "kernel larger than the padded input");
    arch_expect("[1, 28, 28]",
                "{'type': 'Conv2d', 'in_channels': 1, 'out_channels': 1, 'kernel_size': [3, 257],"
                " 'padding': 1, 'dilation': [1, 16777216]}",
                "invalid_model", "layers[0].kernel_size", "kernel_size[1]");
    arch_expect("[1, 28, 28]",
                "{'type': 'MaxPool2d', 'kernel_size': 257, 'stride': 1,"
                " 'dilation': 16777216}",
                "invalid_model", "layers[0].kernel_size", "spans 4294967297");
    arch_expect("[1, 28, 28]",
                "{'type': 'MaxPool2d', 'kernel_size': 3, 'stride': 1, 'padding': 1,"
                " 'dilation': 16777216, 'ceil_mode': true}",
                "invalid_model", "layers[0].kernel_size", "kernel larger");
    arch_expect("[1, 1, 1]",
                "{'type': 'Conv2d', 'in_channels': 1, 'out_channels': 16777216,"
                " 'kernel_size': 1, 'padding': 16777216}",
                "invalid_model", "layers[0]", "too large");
    arch_expect("[1, 1, 1]",
                "{'type': 'Conv2d', 'in_channels': 1, 'out_channels': 1048576,"
                " 'kernel_size': 4096, 'padding': 2048}",
                "invalid_model", "layers[0].kernel_size", "more than 2147483647 entries");
    arch_expect("[1, 4, 4]",
                "{'type': 'Conv2d', 'in_channels': 1, 'out_channels': 1, 'kernel_size': 257,"
                " 'dilation': 16777216, 'padding': 'same'}",
                "invalid_value", "layers[0].padding", "too large");
    arch_expect("[16777216, 16777216, 16777216]", "{'type': 'Flatten'}", "invalid_model",
                "input_shape", "more than");
    arch_expect("[3, 6]", "{'type': 'BatchNorm1d', 'num_features': 4}", "invalid_model",
                "layers[0]", "[4] or [4, L], got [3, 6]");
    arch_expect("[1, 4, 4]",
                "{'type': 'Conv2d', 'in_channels': 1, 'out_channels': 1, 'kernel_size': 3,"
                " 'padding': 'full'}",
                "invalid_value", "layers[0].padding", "\"valid\" or \"same\"");
    arch_expect("[1, 4, 4]",
                "{'type': 'Conv2d', 'in_channels': 1, 'out_channels': 1, 'kernel_size': [3, 3, 3]}",
                "invalid_value", "layers[0].kernel_size", "list of 2 integers");
    arch_expect("[1, 4, 4]",
                "{'type': 'Conv2d', 'in_channels': 1, 'out_channels': 1, 'kernel_size': [3, -1]}",
                "invalid_value", "layers[0].kernel_size[1]", ">= 1");
    arch_expect("[3, 4, 4]",
                "{'type': 'Conv2d', 'in_channels': 3, 'out_channels': 4, 'kernel_size': 1,"
                " 'groups': 2}",
                "invalid_value", "layers[0].groups", "divisible by groups");
    arch_expect("[4]", "{'type': 'BatchNorm1d', 'num_features': 4, 'training': true}",
                "unsupported", "layers[0].training", "evaluation mode");
    arch_expect("[4]", "{'type': 'BatchNorm1d', 'num_features': 4, 'track_running_stats': false}",
                "unsupported", "layers[0].track_running_stats", "running statistics");
    arch_expect("[4]", "{'type': 'BatchNorm1d', 'num_features': 4, 'eps': 0}", "invalid_value",
                "layers[0].eps", "must be > 0");
    arch_expect("[4]", "{'type': 'BatchNorm1d', 'num_features': 4, 'momentum': 'x'}",
                "invalid_type", "layers[0].momentum", "number or null");
    arch_expect("[1, 4, 4]", "{'type': 'AvgPool2d', 'kernel_size': 2, 'divisor_override': 3}",
                "unsupported", "layers[0].divisor_override", "not supported");
    arch_expect("[1, 4, 4]", "{'type': 'AvgPool2d', 'kernel_size': 2, 'dilation': 1}",
                "unknown_field", "layers[0].dilation", "unknown field for AvgPool2d");
    arch_expect("[1, 4, 4]", "{'type': 'MaxPool2d', 'kernel_size': 2, 'return_indices': true}",
                "unsupported", "layers[0].return_indices", "one tensor");
    arch_expect("[1, 4, 4]", "{'type': 'MaxPool2d', 'kernel_size': 2, 'padding': 2}",
                "invalid_value", "layers[0].padding", "at most half of kernel_size");
    arch_expect("[1, 4, 4]", "{'type': 'AdaptiveAvgPool2d', 'output_size': [2, null]}",
                "unsupported", "layers[0].output_size", "None entries");
    arch_expect("[4]", "{'type': 'GELU', 'approximate': 'fast'}", "invalid_value",
                "layers[0].approximate", "\"none\" or \"tanh\"");
    arch_expect("[4]", "{'type': 'Dropout', 'p': 1.5}", "invalid_value", "layers[0].p",
                "must be in [0, 1], got 1.5");
    arch_expect("[4]", "{'type': 'Dropout', 'training': true}", "unsupported",
                "layers[0].training", "identity");
    arch_expect("[4]", "{'type': 'Softplus', 'beta': 0}", "invalid_value", "layers[0].beta",
                "must not be 0");
    arch_expect("[4]", "{'type': 'Flatten', 'start_dim': 0}", "invalid_value",
                "layers[0].start_dim", "batch dimension");
    arch_expect("[4]", "{'type': 'LeakyReLU', 'negative_slope': 'a'}", "invalid_type",
                "layers[0].negative_slope", "must be a number");
    arch_expect("[0]", lin, "invalid_value", "input_shape[0]", ">= 1");
    arch_expect("[]", lin, "invalid_value", "input_shape", "1 to 4 dimensions");
    arch_expect("4", lin, "invalid_type", "input_shape", "list of positive integers");
    arch_expect("[4]", "", "invalid_value", "layers", "need between 1 and 512 layers, got 0");
}
END_TEST

START_TEST(arch_rejects_document)
{
    cv_model *m = calloc(1, sizeof *m);
    cv_err e;
    const char *lin = "{'type': 'Linear', 'in_features': 4, 'out_features': 2}";
    char buf[1024];
    snprintf(buf, sizeof buf, "{'input_shape': [4], 'layers': [%s], 'loss': {'type': 'MSELoss'},"
             " 'inputshape': 1}", lin);
    ASSERT_ERR(arch_q(buf, m, &e), e, "unknown_field", "inputshape", "did you mean 'input_shape'");
    snprintf(buf, sizeof buf, "{'input_shape': [4], 'layers': [%s]}", lin);
    ASSERT_ERR(arch_q(buf, m, &e), e, "missing_field", "loss", "missing");
    snprintf(buf, sizeof buf, "{'layers': [%s], 'loss': {'type': 'MSELoss'}}", lin);
    ASSERT_ERR(arch_q(buf, m, &e), e, "missing_field", "input_shape", "missing");
    ASSERT_ERR(arch_q("{'input_shape': [4], 'loss': {'type': 'MSELoss'}}", m, &e), e,
               "missing_field", "layers", "missing");
    ASSERT_ERR(arch_q("{'input_shape': [4], 'layers': {}, 'loss': {'type': 'MSELoss'}}", m, &e),
               e, "invalid_type", "layers", "must be a list");
    snprintf(buf, sizeof buf, "{'input_shape': [4], 'layers': [%s], 'loss': {'type': "
             "'HuberLoss'}}", lin);
    ASSERT_ERR(arch_q(buf, m, &e), e, "unknown_loss", "loss.type", "unknown loss 'HuberLoss'");
    snprintf(buf, sizeof buf, "{'input_shape': [4], 'layers': [%s], 'loss': {'type': "
             "'CrossEntropy'}}", lin);
    ASSERT_ERR(arch_q(buf, m, &e), e, "unknown_loss", "loss.type",
               "BCEWithLogitsLoss); did you mean 'CrossEntropyLoss'?");
    snprintf(buf, sizeof buf, "{'input_shape': [4], 'layers': [%s], 'loss': {'type': 'MSELoss',"
             " 'reduction': 'none'}}", lin);
    ASSERT_ERR(arch_q(buf, m, &e), e, "unsupported", "loss.reduction", "scalar loss");
    snprintf(buf, sizeof buf, "{'input_shape': [4], 'layers': [%s], 'loss': {'type': 'MSELoss',"
             " 'weight': null}}", lin);
    ASSERT_ERR(arch_q(buf, m, &e), e, "unknown_field", "loss.weight", "unknown field for loss");
    snprintf(buf, sizeof buf, "{'input_shape': [4], 'layers': [%s], 'loss': 'MSELoss'}", lin);
    ASSERT_ERR(arch_q(buf, m, &e), e, "invalid_type", "loss", "must be an object");
    ASSERT_ERR(arch_q("[1, 2]", m, &e), e, "invalid_type", "architecture", "JSON object");
    ASSERT_ERR(arch_q("{'input_shape': [4], ", m, &e), e, "invalid_json", "", "not valid JSON");
    ASSERT_ERR(arch_q("{} {}", m, &e), e, "invalid_json", "", "trailing characters");
    /* shape errors found by cv_model_finalize name the layer */
    ASSERT_ERR(arch_l("[5]", lin, "MSELoss", m, &e), e, "invalid_model", "layers[0]",
               "expects per-sample input [4], got [5]");
    /* Linear acts on the last dimension (PyTorch): [1, 4, 4] is four rows of 4;
     * [1, 2, 2] holds 4 features but not in its last dimension */
    ASSERT_ERR(arch_l("[1, 2, 2]", lin, "MSELoss", m, &e), e, "invalid_model", "layers[0]",
               "add a Flatten");
    snprintf(buf, sizeof buf, "%s, {'type': 'Flatten'}", lin);
    ck_assert_msg(arch_l("[1, 4, 4]", buf, "MSELoss", m, &e) == 0, "%s", e.message);
    ck_assert_int_eq(m->layers[0].out_shape.rank, 3);
    ck_assert_int_eq(m->layers[0].out_shape.dim[1], 4);
    ck_assert_int_eq(m->layers[0].out_shape.dim[2], m->layers[0].params[0].dim[0]);
    cv_model_free(m);
    ASSERT_ERR(arch_l("[4]", "{'type': 'Linear', 'in_features': 4, 'out_features': 1}",
                      "CrossEntropyLoss", m, &e),
               e, "invalid_model", "loss", "at least 2 output classes");
    ASSERT_ERR(arch_l("[4]", "{'type': 'ReLU'}", "MSELoss", m, &e), e, "invalid_model", "layers",
               "no parameters");
    ck_assert_int_eq(e.status, CV_EINVAL);
    /* prefix for embedded documents */
    cJSON *doc = cJSON_Parse("{\"input_shape\": [4], \"layers\": [{\"type\": \"Linear\","
                             " \"in_features\": 4, \"out_features\": 2, \"biass\": true}],"
                             " \"loss\": {\"type\": \"MSELoss\"}}");
    ck_assert_ptr_nonnull(doc);
    ASSERT_ERR(cv_arch_from_json(doc, "architecture", m, &e), e, "unknown_field",
               "architecture.layers[0].biass", "did you mean 'bias'");
    cJSON_Delete(doc);
    free(m);
}
END_TEST

/* {input_shape: [4], Linear 4 -> 3, loss: {<loss>}} with extra top-level fields. */
static int arch_loss(const char *loss, const char *top, cv_model *m, cv_err *e)
{
    char buf[1024];
    /* NLLLoss needs log-probabilities: the network ends in log_softmax */
    snprintf(buf, sizeof buf, "{'input_shape': [4], %s 'layers': [{'type': 'Linear', "
             "'in_features': 4, 'out_features': 3}%s], 'loss': {%s}}", top,
             strstr(loss, "NLLLoss") ? ", {'type': 'log_softmax', 'dim': 1}" : "", loss);
    return arch_q(buf, m, e);
}

/* The loss object's class_dim, label_smoothing, ignore_index, NLLLoss, and
 * the document's input_dtype: parsed, defaults, exported, refused. */
START_TEST(arch_loss_fields)
{
    cv_model *m = calloc(1, sizeof *m), *m2 = calloc(1, sizeof *m2);
    cv_err e;
    ck_assert_int_eq(arch_loss("'type': 'CrossEntropyLoss'", "", m, &e), 0);
    ck_assert(m->class_dim == 1 && m->ignore_index == -100 && m->label_smoothing == 0.0);
    ck_assert_int_eq(m->input_dtype, CV_DTYPE_FLOAT32);
    cJSON *j = cv_arch_to_json(m);
    char *text = cJSON_PrintUnformatted(j);
    /* defaults are not written: today's documents stay as they were */
    ck_assert_msg(strstr(text, "\"loss\":{\"type\":\"CrossEntropyLoss\",\"reduction\":\"mean\"}") &&
                      !strstr(text, "input_dtype"), "%s", text);
    free(text);
    cJSON_Delete(j);

    ck_assert_int_eq(arch_loss("'type': 'CrossEntropyLoss', 'class_dim': -1, 'ignore_index': 0,"
                               " 'label_smoothing': 0.25, 'reduction': 'sum'",
                               "'input_dtype': 'int64',", m, &e), 0);
    ck_assert(m->class_dim == -1 && m->ignore_index == 0 && m->label_smoothing == 0.25 &&
              m->reduction == CV_RED_SUM && m->input_dtype == CV_DTYPE_INT64);
    j = cv_arch_to_json(m);
    text = cJSON_PrintUnformatted(j);
    ck_assert_msg(strstr(text, "\"class_dim\":-1") && strstr(text, "\"ignore_index\":0") &&
                      strstr(text, "\"label_smoothing\":0.25") &&
                      strstr(text, "\"input_dtype\":\"int64\""), "%s", text);
    ck_assert_msg(cv_arch_parse(text, strlen(text), m2, &e) == 0, "%s", e.message);
    ck_assert(m2->class_dim == -1 && m2->ignore_index == 0 && m2->label_smoothing == 0.25 &&
              m2->input_dtype == CV_DTYPE_INT64);
    free(text);
    cJSON_Delete(j);

    ck_assert_int_eq(arch_loss("'type': 'NLLLoss', 'ignore_index': 2, 'class_dim': 1",
                               "'input_dtype': 'int32',", m, &e), 0);
    ck_assert(m->loss == CV_LOSS_NLL && m->ignore_index == 2 && m->class_dim == 1 &&
              m->input_dtype == CV_DTYPE_INT32);
    j = cv_arch_to_json(m);
    text = cJSON_PrintUnformatted(j);
    ck_assert_msg(strstr(text, "\"type\":\"NLLLoss\"") && strstr(text, "\"ignore_index\":2") &&
                      !strstr(text, "class_dim") && strstr(text, "\"input_dtype\":\"int32\""),
                  "%s", text);
    ck_assert_msg(cv_arch_parse(text, strlen(text), m2, &e) == 0, "%s", e.message);
    ck_assert(m2->loss == CV_LOSS_NLL && m2->ignore_index == 2);
    free(text);
    cJSON_Delete(j);

    static const struct {
        const char *loss, *top, *code, *field, *substr;
    } refused[] = {
        {"'type': 'NLLLoss', 'label_smoothing': 0.1", "",
         "unknown_field", "loss.label_smoothing", "unknown field for NLLLoss"},
        {"'type': 'MSELoss', 'class_dim': -1", "",
         "unknown_field", "loss.class_dim", "unknown field for MSELoss"},
        {"'type': 'BCEWithLogitsLoss', 'ignore_index': 1", "",
         "unknown_field", "loss.ignore_index", "unknown field for BCEWithLogitsLoss"},
        {"'type': 'CrossEntropyLoss', 'class_dim': 2", "",
         "invalid_value", "loss.class_dim", "must be 1 (classes in dimension 1"},
        {"'type': 'CrossEntropyLoss', 'class_dim': '-1'", "",
         "invalid_type", "loss.class_dim", "or -1 (classes last"},
        {"'type': 'CrossEntropyLoss', 'label_smoothing': 1.5", "",
         "invalid_value", "loss.label_smoothing", "in [0, 1]"},
        {"'type': 'CrossEntropyLoss', 'label_smoothing': true", "",
         "invalid_type", "loss.label_smoothing", "in [0, 1]"},
        {"'type': 'CrossEntropyLoss', 'ignore_index': 0.5", "",
         "invalid_type", "loss.ignore_index", "must be an integer"},
        {"'type': 'CrossEntropyLoss', 'class_dim': -1, 'class_dim': 1", "",
         "duplicate_field", "loss.class_dim", "given twice"},
        {"'type': 'CrossEntropyLoss'", "'input_dtype': 'int16',",
         "invalid_value", "input_dtype", "must be \"float32\", \"int64\" or \"int32\""},
        {"'type': 'CrossEntropyLoss'", "'input_dtype': 'in64',",
         "invalid_value", "input_dtype", "did you mean 'int64'"},
        {"'type': 'CrossEntropyLoss'", "'input_dtype': 64,",
         "invalid_type", "input_dtype", "got 64"},
    };
    for (size_t r = 0; r < sizeof refused / sizeof refused[0]; r++)
        ASSERT_ERR(arch_loss(refused[r].loss, refused[r].top, m, &e), e, refused[r].code,
                   refused[r].field, refused[r].substr);
    free_model(m);
    free_model(m2);
}
END_TEST

START_TEST(arch_file)
{
    char path[] = "/tmp/curvd_test_arch_XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    char *s = strdup(INTERFACE_ARCH);
    for (char *p = s; *p; p++)
        if (*p == '\'')
            *p = '"';
    ck_assert_int_eq(write(fd, s, strlen(s)), (ssize_t)strlen(s));
    close(fd);
    free(s);
    cv_model *m = calloc(1, sizeof *m);
    cv_err e;
    ck_assert_msg(cv_arch_load(path, m, &e) == 0, "%s", e.message);
    ck_assert_int_eq(m->nlayers, 5);
    unlink(path);
    ck_assert_int_eq(cv_arch_load(path, m, &e), -1);
    ck_assert_int_eq(e.status, CV_ENOTFOUND);
    free(m);
}
END_TEST

/* ---- parameters ---------------------------------------------------------- */

/* Linear(3,4) - BatchNorm1d(4) - ReLU - Linear(4,2) */
static const char *PARAM_LAYERS =
    "{'type': 'Linear', 'in_features': 3, 'out_features': 4},"
    "{'type': 'BatchNorm1d', 'num_features': 4}, {'type': 'ReLU'},"
    "{'type': 'Linear', 'in_features': 4, 'out_features': 2}";

typedef struct {
    float w0[12], b0[4], g1[4], be1[4], rm1[4], rv1[4], w3[8], b3[2];
    int64_t nbt;
    cv_st_entry t[9];
} pfix;

static void pfix_init(pfix *p)
{
    for (int i = 0; i < 12; i++)
        p->w0[i] = 0.1f * (float)i - 0.5f;
    for (int i = 0; i < 4; i++) {
        p->b0[i] = (float)i;
        p->g1[i] = 1.0f + 0.5f * (float)i;
        p->be1[i] = -0.25f * (float)i;
        p->rm1[i] = 0.125f * (float)i;
        p->rv1[i] = 2.0f + (float)i;
    }
    for (int i = 0; i < 8; i++)
        p->w3[i] = 0.3f * (float)i;
    p->b3[0] = 7;
    p->b3[1] = -7;
    p->nbt = 123;
    static const int64_t s43[] = {4, 3}, s4[] = {4}, s24[] = {2, 4}, s2[] = {2};
    p->t[0] = ent("0.weight", CV_ST_F32, 2, s43, p->w0);
    p->t[1] = ent("0.bias", CV_ST_F32, 1, s4, p->b0);
    p->t[2] = ent("1.weight", CV_ST_F32, 1, s4, p->g1);
    p->t[3] = ent("1.bias", CV_ST_F32, 1, s4, p->be1);
    p->t[4] = ent("1.running_mean", CV_ST_F32, 1, s4, p->rm1);
    p->t[5] = ent("1.running_var", CV_ST_F32, 1, s4, p->rv1);
    p->t[6] = ent("1.num_batches_tracked", CV_ST_I64, 0, NULL, &p->nbt);
    p->t[7] = ent("3.weight", CV_ST_F32, 2, s24, p->w3);
    p->t[8] = ent("3.bias", CV_ST_F32, 1, s2, p->b3);
}

static int load_entries(cv_model *m, const cv_st_entry *t, size_t n, cv_err *e)
{
    void *buf;
    size_t len;
    ck_assert_int_eq(cv_st_write(t, n, NULL, 0, &buf, &len, e), 0);
    cv_err_clear(e);
    int rc = cv_params_parse(m, buf, len, e);
    free(buf);
    return rc;
}

START_TEST(params_load_export)
{
    cv_model *m = new_model("[3]", PARAM_LAYERS, "MSELoss");
    pfix p;
    pfix_init(&p);
    cv_err e;
    ck_assert_msg(load_entries(m, p.t, 9, &e) == 0, "%s", e.message);
    ck_assert_uint_eq(m->nparams_total, 12 + 4 + 4 + 4 + 8 + 2);
    ck_assert_uint_eq(m->nbuffers_total, 9);
    ck_assert_int_eq(memcmp(m->params, p.w0, sizeof p.w0), 0);
    ck_assert_int_eq(memcmp(m->params + 12, p.b0, sizeof p.b0), 0);
    ck_assert_int_eq(memcmp(m->params + 16, p.g1, sizeof p.g1), 0);
    ck_assert_int_eq(memcmp(m->params + 20, p.be1, sizeof p.be1), 0);
    ck_assert_int_eq(memcmp(m->params + 24, p.w3, sizeof p.w3), 0);
    ck_assert_int_eq(memcmp(m->params + 32, p.b3, sizeof p.b3), 0);
    ck_assert_int_eq(memcmp(m->buffers, p.rm1, sizeof p.rm1), 0);
    ck_assert_int_eq(memcmp(m->buffers + 4, p.rv1, sizeof p.rv1), 0);
    ck_assert(m->buffers[8] == 123.0f);

    /* export: state_dict order and dtypes, identical to the fixture's bytes */
    void *out, *ref;
    size_t len, rlen;
    ck_assert_int_eq(cv_params_export(m, &out, &len, &e), 0);
    ck_assert_int_eq(cv_st_write(p.t, 9, NULL, 0, &ref, &rlen, &e), 0);
    ck_assert_uint_eq(len, rlen);
    ck_assert_int_eq(memcmp(out, ref, len), 0);
    /* and it loads into a fresh model */
    cv_model *m2 = new_model("[3]", PARAM_LAYERS, "MSELoss");
    ck_assert_int_eq(cv_params_parse(m2, out, len, &e), 0);
    ck_assert_int_eq(memcmp(m->params, m2->params, m->nparams_total * sizeof(float)), 0);
    ck_assert_int_eq(memcmp(m->buffers, m2->buffers, m->nbuffers_total * sizeof(float)), 0);
    /* via a file */
    char path[] = "/tmp/curvd_test_params_XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    close(fd);
    ck_assert_int_eq(cv_params_save(m, path, &e), 0);
    m2->params[0] = 99;
    ck_assert_int_eq(cv_params_read(m2, path, &e), 0);
    ck_assert(m2->params[0] == p.w0[0]);
    unlink(path);
    free(out);
    free(ref);
    free_model(m2);
    free_model(m);
}
END_TEST

START_TEST(params_conversions)
{
    cv_model *m = new_model("[3]", PARAM_LAYERS, "MSELoss");
    pfix p;
    pfix_init(&p);
    double w0[12];
    uint16_t b0h[4] = {0x3C00, 0xC000, 0x3800, 0x0000};   /* F16: 1, -2, 0.5, 0 */
    uint16_t w3b[8] = {0x3F80, 0x4000, 0xBF80, 0x3E80, 0, 0, 0, 0x4049}; /* BF16 */
    int32_t nbt32 = 5;
    for (int i = 0; i < 12; i++)
        w0[i] = 1.0 / 3.0 * i;
    p.t[0].dtype = CV_ST_F64;
    p.t[0].data = w0;
    p.t[1].dtype = CV_ST_F16;
    p.t[1].data = b0h;
    p.t[7].dtype = CV_ST_BF16;
    p.t[7].data = w3b;
    p.t[6].dtype = CV_ST_I32;
    p.t[6].data = &nbt32;
    cv_err e;
    ck_assert_msg(load_entries(m, p.t, 9, &e) == 0, "%s", e.message);
    for (int i = 0; i < 12; i++)
        ck_assert(m->params[i] == (float)w0[i]);
    ck_assert(m->params[12] == 1.0f && m->params[13] == -2.0f && m->params[14] == 0.5f);
    ck_assert(m->params[24] == 1.0f && m->params[25] == 2.0f && m->params[26] == -1.0f &&
              m->params[27] == 0.25f && m->params[31] == 3.140625f);
    ck_assert(m->buffers[8] == 5.0f);
    free_model(m);
}
END_TEST

START_TEST(params_rejects)
{
    cv_model *m = new_model("[3]", PARAM_LAYERS, "MSELoss");
    pfix p;
    pfix_init(&p);
    cv_err e;
    /* missing: drop 0.bias */
    cv_st_entry t[10];
    memcpy(t, p.t, sizeof p.t);
    t[1] = t[8];
    ASSERT_ERR(load_entries(m, t, 8, &e), e, "missing_tensor", "0.bias",
               "0.bias: missing from the parameters file (expected shape [4])");
    ck_assert_ptr_null(m->params); /* nothing allocated on failure */
    /* extra */
    memcpy(t, p.t, sizeof p.t);
    static const int64_t s1[] = {1};
    t[9] = ent("4.weight", CV_ST_F32, 1, s1, p.b3);
    ASSERT_ERR(load_entries(m, t, 10, &e), e, "unexpected_tensor", "4.weight",
               "4.weight: unexpected tensor (shape [1]) not in the model's state_dict");
    /* mis-shaped (transposed) */
    memcpy(t, p.t, sizeof p.t);
    t[0].shape[0] = 3;
    t[0].shape[1] = 4;
    ASSERT_ERR(load_entries(m, t, 9, &e), e, "shape_mismatch", "0.weight",
               "0.weight: expected [4, 3], got [3, 4]");
    /* scalar buffer given as [1] */
    memcpy(t, p.t, sizeof p.t);
    t[6].rank = 1;
    t[6].shape[0] = 1;
    ASSERT_ERR(load_entries(m, t, 9, &e), e, "shape_mismatch", "1.num_batches_tracked",
               "expected [], got [1]");
    /* integer parameter */
    memcpy(t, p.t, sizeof p.t);
    int32_t ib[4] = {1, 2, 3, 4};
    t[1].dtype = CV_ST_I32;
    t[1].data = ib;
    ASSERT_ERR(load_entries(m, t, 9, &e), e, "bad_dtype", "0.bias", "I32 is not a floating-point");
    /* NaN, named with flat and multi-index */
    memcpy(t, p.t, sizeof p.t);
    float w0[12];
    memcpy(w0, p.w0, sizeof w0);
    w0[5] = NAN;
    t[0].data = w0;
    ASSERT_ERR(load_entries(m, t, 9, &e), e, "non_finite", "0.weight",
               "0.weight: non-finite value nan at index 5 [1, 2]");
    /* F64 overflow becomes inf after conversion */
    memcpy(t, p.t, sizeof p.t);
    double big[2] = {1.0, 1e39};
    t[8].dtype = CV_ST_F64;
    t[8].data = big;
    ASSERT_ERR(load_entries(m, t, 9, &e), e, "non_finite", "3.bias",
               "non-finite value inf at index 1 [1] (after conversion to float32)");
    /* Inf in a buffer */
    memcpy(t, p.t, sizeof p.t);
    float rm[4] = {0, 0, -INFINITY, 0};
    t[4].data = rm;
    ASSERT_ERR(load_entries(m, t, 9, &e), e, "non_finite", "1.running_mean", "index 2");
    /* negative variance */
    memcpy(t, p.t, sizeof p.t);
    float rv[4] = {1, -1, 1, 1};
    t[5].data = rv;
    ASSERT_ERR(load_entries(m, t, 9, &e), e, "bad_value", "1.running_var",
               "negative variance -1 at index 1");
    /* prefixed names: missing first, with the unexpected ones listed */
    memcpy(t, p.t, sizeof p.t);
    const char *pref[9] = {"model.0.weight", "model.0.bias", "model.1.weight", "model.1.bias",
                           "model.1.running_mean", "model.1.running_var",
                           "model.1.num_batches_tracked", "model.3.weight", "model.3.bias"};
    for (int i = 0; i < 9; i++)
        t[i].name = pref[i];
    ASSERT_ERR(load_entries(m, t, 9, &e), e, "missing_tensor", "0.weight",
               "the file has tensors the model does not: model.0.weight");
    ck_assert_ptr_nonnull(strstr(e.message, "also missing: 0.bias"));
    /* a model with values keeps them when a load fails */
    ck_assert_int_eq(load_entries(m, p.t, 9, &e), 0);
    float *before = m->params;
    memcpy(t, p.t, sizeof p.t);
    t[0].data = w0; /* NaN at 5 */
    ck_assert_int_eq(load_entries(m, t, 9, &e), -1);
    ck_assert_ptr_eq(m->params, before);
    ck_assert_int_eq(memcmp(m->params, p.w0, sizeof p.w0), 0);
    /* garbage bytes */
    uint8_t junk[4] = {1, 2, 3, 4};
    ASSERT_ERR(cv_params_parse(m, junk, 4, &e), e, "bad_safetensors", "", "shorter");
    free_model(m);
}
END_TEST

/* ---- datasets ----------------------------------------------------------- */

static int data_entries(const cv_st_entry *t, size_t n, cv_dataset *d, cv_err *e)
{
    void *buf;
    size_t len;
    ck_assert_int_eq(cv_st_write(t, n, NULL, 0, &buf, &len, e), 0);
    cv_err_clear(e);
    int rc = cv_datafile_parse(buf, len, d, e);
    free(buf);
    return rc;
}

START_TEST(data_load)
{
    float x[6 * 4];
    for (int i = 0; i < 24; i++)
        x[i] = (float)i * 0.5f;
    int64_t y[6] = {0, 1, 2, 0, 1, 2};
    int32_t y32[6] = {2, 2, 1, 1, 0, 0};
    float yt[6 * 2];
    double x64[24];
    for (int i = 0; i < 12; i++)
        yt[i] = (float)i / 12;
    for (int i = 0; i < 24; i++)
        x64[i] = x[i];
    static const int64_t sx[] = {6, 4}, sy[] = {6}, syt[] = {6, 2}, sx3[] = {6, 1, 2, 2};
    cv_st_entry t[2] = {ent("y", CV_ST_I64, 1, sy, y), ent("x", CV_ST_F32, 2, sx, x)};
    cv_dataset d;
    cv_err e;
    ck_assert_msg(data_entries(t, 2, &d, &e) == 0, "%s", e.message);
    ck_assert_uint_eq(d.n, 6);
    ck_assert_int_eq(d.x_shape.rank, 1);
    ck_assert_int_eq(d.x_shape.dim[0], 4);
    ck_assert_int_eq(d.y_is_index, 1);
    ck_assert_int_eq(memcmp(d.x, x, sizeof x), 0);
    ck_assert_int_eq(memcmp(d.labels, y, sizeof y), 0);
    ck_assert_ptr_null(d.targets);
    /* export round trip */
    void *buf;
    size_t len;
    ck_assert_int_eq(cv_datafile_export(&d, &buf, &len, &e), 0);
    cv_dataset d2;
    ck_assert_int_eq(cv_datafile_parse(buf, len, &d2, &e), 0);
    ck_assert_int_eq(memcmp(d2.x, x, sizeof x), 0);
    ck_assert_int_eq(memcmp(d2.labels, y, sizeof y), 0);
    free(buf);
    cv_dataset_free(&d2);
    cv_dataset_free(&d);
    ck_assert_ptr_null(d.x);

    t[0] = ent("y", CV_ST_I32, 1, sy, y32);
    t[1] = ent("x", CV_ST_F64, 4, sx3, x64);
    ck_assert_msg(data_entries(t, 2, &d, &e) == 0, "%s", e.message);
    ck_assert_int_eq(d.x_shape.rank, 3);
    ck_assert_int_eq(d.x_shape.dim[2], 2);
    ck_assert_int_eq(memcmp(d.x, x, sizeof x), 0);
    ck_assert(d.labels[0] == 2 && d.labels[5] == 0);
    cv_dataset_free(&d);

    /* token ids: I64 x [6, 4] (exact up to 2^24), sequence labels I64 y [6, 4] */
    int64_t ids[24], yseq[24];
    int32_t ids32[24];
    for (int i = 0; i < 24; i++) {
        ids[i] = i == 5 ? 16777216 : i == 6 ? -3 : (i * 7) % 11;
        ids32[i] = (int32_t)ids[i];
        yseq[i] = i == 3 ? -100 : i % 5;
    }
    t[0] = ent("y", CV_ST_I64, 2, sx, yseq);
    t[1] = ent("x", CV_ST_I64, 2, sx, ids);
    ck_assert_msg(data_entries(t, 2, &d, &e) == 0, "%s", e.message);
    ck_assert_int_eq(d.x_dtype, CV_DTYPE_INT64);
    ck_assert(d.y_is_index == 1 && d.y_shape.rank == 1 && d.y_shape.dim[0] == 4);
    for (int i = 0; i < 24; i++)
        ck_assert(d.x[i] == (float)ids[i] && (int64_t)d.x[i] == ids[i] && d.labels[i] == yseq[i]);
    ck_assert_int_eq(cv_datafile_export(&d, &buf, &len, &e), 0);
    cv_st_file sf;
    ck_assert_int_eq(cv_st_parse(buf, len, &sf, &e), 0);
    ck_assert(cv_st_find(&sf, "x")->dtype == CV_ST_I64 && cv_st_find(&sf, "y")->rank == 2);
    ck_assert_int_eq(memcmp(cv_st_find(&sf, "x")->data, ids, sizeof ids), 0);
    ck_assert_int_eq(memcmp(cv_st_find(&sf, "y")->data, yseq, sizeof yseq), 0);
    cv_st_free(&sf);
    free(buf);
    cv_dataset_free(&d);
    t[1] = ent("x", CV_ST_I32, 2, sx, ids32);
    ck_assert_msg(data_entries(t, 2, &d, &e) == 0, "%s", e.message);
    ck_assert_int_eq(d.x_dtype, CV_DTYPE_INT32);
    ck_assert(d.x[5] == 16777216.0f && d.x[6] == -3.0f);
    ck_assert_int_eq(cv_datafile_export(&d, &buf, &len, &e), 0);
    ck_assert_int_eq(cv_datafile_parse(buf, len, &d2, &e), 0);
    ck_assert(d2.x_dtype == CV_DTYPE_INT32 && memcmp(d2.x, d.x, sizeof(float) * 24) == 0 &&
              memcmp(d2.labels, yseq, sizeof yseq) == 0);
    free(buf);
    cv_dataset_free(&d2);
    cv_dataset_free(&d);

    t[0] = ent("y", CV_ST_F32, 2, syt, yt);
    t[1] = ent("x", CV_ST_F32, 2, sx, x);
    ck_assert_msg(data_entries(t, 2, &d, &e) == 0, "%s", e.message);
    ck_assert_int_eq(d.x_dtype, CV_DTYPE_FLOAT32);
    ck_assert_int_eq(d.y_is_index, 0);
    ck_assert_int_eq(d.y_shape.rank, 1);
    ck_assert_int_eq(d.y_shape.dim[0], 2);
    ck_assert_int_eq(memcmp(d.targets, yt, sizeof yt), 0);
    ck_assert_int_eq(cv_datafile_export(&d, &buf, &len, &e), 0);
    ck_assert_int_eq(cv_datafile_parse(buf, len, &d2, &e), 0);
    ck_assert_int_eq(memcmp(d2.targets, yt, sizeof yt), 0);
    free(buf);
    cv_dataset_free(&d2);
    cv_dataset_free(&d);
}
END_TEST

START_TEST(data_rejects)
{
    float x[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    int64_t y[4] = {0, 1, 0, 1};
    uint8_t xb[8] = {0};
    int64_t y2[8] = {0};
    static const int64_t sx[] = {4, 2}, sy[] = {4}, sy3[] = {3}, sx0[] = {0, 2}, sy0[] = {0},
                         sx1[] = {8}, syy[] = {4, 2}, sxz[] = {4, 0};
    cv_st_entry t[3];
    cv_dataset d;
    cv_err e;
    t[0] = ent("x", CV_ST_F32, 2, sx, x);
    ASSERT_ERR(data_entries(t, 1, &d, &e), e, "missing_tensor", "y", "missing tensor 'y'");
    ck_assert_ptr_null(d.x);
    t[0] = ent("y", CV_ST_I64, 1, sy, y);
    ASSERT_ERR(data_entries(t, 1, &d, &e), e, "missing_tensor", "x", "missing tensor 'x'");
    t[0] = ent("x", CV_ST_F32, 2, sx, x);
    t[1] = ent("y", CV_ST_I64, 1, sy, y);
    t[2] = ent("w", CV_ST_I64, 1, sy, y);
    ASSERT_ERR(data_entries(t, 3, &d, &e), e, "unexpected_tensor", "w",
               "unexpected tensor 'w' (shape [4])");
    t[1] = ent("y", CV_ST_I64, 1, sy3, y);
    ASSERT_ERR(data_entries(t, 2, &d, &e), e, "shape_mismatch", "y",
               "y: shape [3] does not have the 4 samples of x [4, 2]");
    t[0] = ent("x", CV_ST_F32, 2, sx0, x);
    t[1] = ent("y", CV_ST_I64, 1, sy0, y);
    ASSERT_ERR(data_entries(t, 2, &d, &e), e, "empty_dataset", "x", "no samples");
    t[0] = ent("x", CV_ST_U8, 2, sx, xb);
    t[1] = ent("y", CV_ST_I64, 1, sy, y);
    ASSERT_ERR(data_entries(t, 2, &d, &e), e, "bad_dtype", "x", "U8 is not a floating-point");
    ASSERT_ERR(data_entries(t, 2, &d, &e), e, "bad_dtype", "x", "integer token-id dtype (I64, I32)");
    /* token ids must have exact float32 values */
    int64_t big[8] = {0, 1, 2, 3, 16777216, -16777216, 16777217, 7};
    t[0] = ent("x", CV_ST_I64, 2, sx, big);
    ASSERT_ERR(data_entries(t, 2, &d, &e), e, "bad_value", "x",
               "x: integer 16777217 at flat index 6 (sample 3) is beyond 2^24");
    ck_assert_ptr_null(d.x);
    big[6] = -16777217;
    ASSERT_ERR(data_entries(t, 2, &d, &e), e, "bad_value", "x", "integer -16777217");
    t[0] = ent("x", CV_ST_F32, 1, sx1, x);
    ASSERT_ERR(data_entries(t, 2, &d, &e), e, "bad_shape", "x", "[N, *input_shape]");
    t[0] = ent("x", CV_ST_F32, 2, sxz, x);
    ASSERT_ERR(data_entries(t, 2, &d, &e), e, "bad_shape", "x", "dimension 1 must be between");
    t[0] = ent("x", CV_ST_F32, 2, sx, x);
    static const int64_t sy6[] = {4, 1, 1, 1, 2, 1};
    t[1] = ent("y", CV_ST_I64, 6, sy6, y2); /* [N, 2] labels are sequences now; rank 6 is not */
    ASSERT_ERR(data_entries(t, 2, &d, &e), e, "bad_shape", "y",
               "y: shape [4, 1, 1, 1, 2, 1] has more than 4 per-sample dimensions");
    t[1] = ent("y", CV_ST_BOOL, 1, sy, xb);
    ASSERT_ERR(data_entries(t, 2, &d, &e), e, "bad_dtype", "y", "BOOL");
    float xn[8] = {0, 1, 2, 3, 4, INFINITY, 6, 7};
    t[0] = ent("x", CV_ST_F32, 2, sx, xn);
    t[1] = ent("y", CV_ST_I64, 1, sy, y);
    ASSERT_ERR(data_entries(t, 2, &d, &e), e, "non_finite", "x",
               "x: non-finite value inf at flat index 5 (sample 2)");
    ck_assert_ptr_null(d.x);
    float yn[8] = {0, 0, 0, 0, 0, 0, NAN, 0};
    t[0] = ent("x", CV_ST_F32, 2, sx, x);
    t[1] = ent("y", CV_ST_F32, 2, syy, yn);
    ASSERT_ERR(data_entries(t, 2, &d, &e), e, "non_finite", "y", "sample 3");
}
END_TEST

/* Small in-memory datasets for the batch/check tests. */
static void mk_labels(cv_dataset *d, size_t n, int feat, const int64_t *labels)
{
    memset(d, 0, sizeof *d);
    d->n = n;
    d->x_shape.rank = 1;
    d->x_shape.dim[0] = feat;
    d->x = malloc(n * (size_t)feat * sizeof(float));
    d->labels = malloc(n * sizeof(int64_t));
    ck_assert(d->x && d->labels);
    for (size_t i = 0; i < n * (size_t)feat; i++)
        d->x[i] = (float)i;
    memcpy(d->labels, labels, n * sizeof(int64_t));
    d->y_is_index = 1;
}

static void mk_targets(cv_dataset *d, size_t n, int feat, int out, const float *t)
{
    memset(d, 0, sizeof *d);
    d->n = n;
    d->x_shape.rank = 1;
    d->x_shape.dim[0] = feat;
    d->y_shape.rank = 1;
    d->y_shape.dim[0] = out;
    d->x = calloc(n * (size_t)feat, sizeof(float));
    d->targets = malloc(n * (size_t)out * sizeof(float));
    ck_assert(d->x && d->targets);
    memcpy(d->targets, t, n * (size_t)out * sizeof(float));
}

START_TEST(batches)
{
    int64_t lab[5] = {0, 1, 2, 1, 0};
    cv_dataset d;
    mk_labels(&d, 5, 3, lab);
    cv_batch b;
    cv_err e;
    ck_assert_int_eq(cv_batch_range(&d, 1, 3, &b, &e), 0);
    ck_assert_uint_eq(b.n, 3);
    ck_assert(b.x[0] == 3.0f && b.x[8] == 11.0f && b.labels[0] == 1 && b.labels[2] == 1);
    ck_assert_int_eq(b.x_shape.dim[0], 3);
    cv_dataset_free(&b);
    ck_assert_int_eq(cv_batch_range(&d, 0, 5, &b, &e), 0);
    ck_assert_int_eq(memcmp(b.x, d.x, 15 * sizeof(float)), 0);
    cv_dataset_free(&b);
    ASSERT_ERR(cv_batch_range(&d, 3, 3, &b, &e), e, "out_of_range", "batch.size",
               "exceed the dataset's 5 samples (at most 2 from offset 3)");
    ASSERT_ERR(cv_batch_range(&d, 5, 1, &b, &e), e, "out_of_range", "batch.offset",
               "5 is beyond the dataset's 5 samples");
    ASSERT_ERR(cv_batch_range(&d, 2, SIZE_MAX, &b, &e), e, "out_of_range", "batch.size", "exceed");
    ASSERT_ERR(cv_batch_range(&d, SIZE_MAX, 2, &b, &e), e, "out_of_range", "batch.offset",
               "beyond");
    ASSERT_ERR(cv_batch_range(&d, 0, 0, &b, &e), e, "empty_batch", "batch.size", "at least 1");
    ck_assert_ptr_null(b.x);
    size_t idx[4] = {4, 0, 4, 2};
    ck_assert_int_eq(cv_batch_gather(&d, idx, 4, &b, &e), 0);
    ck_assert(b.n == 4 && b.x[0] == 12.0f && b.x[3] == 0.0f && b.x[6] == 12.0f &&
              b.labels[3] == 2);
    cv_dataset_free(&b);
    size_t bad[3] = {0, 1, 9};
    ASSERT_ERR(cv_batch_gather(&d, bad, 3, &b, &e), e, "out_of_range", "batch.indices[2]",
               "sample 9 is out of range for a dataset of 5 samples");
    ASSERT_ERR(cv_batch_gather(&d, idx, 0, &b, &e), e, "empty_batch", "batch.indices", "empty");
    cv_dataset_free(&d);

    /* sequence labels: 3 per sample, token-id x */
    int64_t seq[15];
    for (int i = 0; i < 15; i++)
        seq[i] = 10 * (i / 3) + i % 3;
    mk_labels(&d, 5, 3, seq); /* copies the first 5 labels: redo with 15 */
    free(d.labels);
    d.labels = malloc(sizeof seq);
    memcpy(d.labels, seq, sizeof seq);
    d.y_shape.rank = 1;
    d.y_shape.dim[0] = 3;
    d.x_dtype = CV_DTYPE_INT64;
    ck_assert_int_eq(cv_batch_range(&d, 3, 2, &b, &e), 0);
    ck_assert(b.labels[0] == 30 && b.labels[2] == 32 && b.labels[5] == 42 && b.y_shape.rank == 1);
    ck_assert(b.x_dtype == CV_DTYPE_INT64 && b.x[0] == 9.0f);
    cv_dataset_free(&b);
    size_t idx2[3] = {4, 1, 4};
    ck_assert_int_eq(cv_batch_gather(&d, idx2, 3, &b, &e), 0);
    ck_assert(b.labels[0] == 40 && b.labels[3] == 10 && b.labels[5] == 12 && b.labels[8] == 42);
    ck_assert(b.y_shape.dim[0] == 3 && b.x_dtype == CV_DTYPE_INT64);
    cv_dataset_free(&b);
    cv_dataset_free(&d);

    float t[4] = {0.5f, 1, 2, 3};
    mk_targets(&d, 2, 3, 2, t);
    ck_assert_int_eq(cv_batch_range(&d, 1, 1, &b, &e), 0);
    ck_assert(b.targets[0] == 2 && b.targets[1] == 3 && b.y_shape.dim[0] == 2);
    ck_assert_ptr_null(b.labels);
    cv_dataset_free(&b);
    cv_dataset_free(&d);
}
END_TEST

START_TEST(dataset_check)
{
    const char *lin = "{'type': 'Linear', 'in_features': 3, 'out_features': 3}";
    cv_model *ce = new_model("[3]", lin, "CrossEntropyLoss");
    cv_model *mse = new_model("[3]", lin, "MSELoss");
    cv_model *bce = new_model("[3]", lin, "BCEWithLogitsLoss");
    cv_model *wide = new_model("[4]", "{'type': 'Linear', 'in_features': 4, 'out_features': 3}",
                               "CrossEntropyLoss");
    cv_err e;
    cv_dataset d;
    int64_t good[4] = {0, 2, 1, 2}, badl[4] = {0, 1, 2, 7}, negl[4] = {0, -100, 1, 1};
    mk_labels(&d, 4, 3, good);
    ck_assert_int_eq(cv_dataset_check(&d, ce, &e), 0);
    ASSERT_ERR(cv_dataset_check(&d, wide, &e), e, "shape_mismatch", "x",
               "x: per-sample shape [3] does not match the model's input_shape [4]");
    ASSERT_ERR(cv_dataset_check(&d, mse, &e), e, "target_mismatch", "y",
               "MSELoss needs float targets shaped like the model output [3]");
    d.x[4] = NAN;
    ASSERT_ERR(cv_dataset_check(&d, ce, &e), e, "non_finite", "x", "sample 1 (flat index 4)");
    cv_dataset_free(&d);
    mk_labels(&d, 4, 3, badl);
    ASSERT_ERR(cv_dataset_check(&d, ce, &e), e, "bad_label", "y",
               "y[3] = 7 is not a class index in [0, 3)");
    cv_dataset_free(&d);
    mk_labels(&d, 4, 3, negl);
    /* -100 is PyTorch's default ignore_index: left out; refused under another one */
    ck_assert_int_eq(cv_dataset_check(&d, ce, &e), 0);
    ce->ignore_index = 5;
    ASSERT_ERR(cv_dataset_check(&d, ce, &e), e, "bad_label", "y",
               "y[1] = -100 is not a class index in [0, 3) (the model has 3 outputs) nor the "
               "ignore_index 5");
    ce->ignore_index = 1; /* an ignored class id is fine */
    ASSERT_ERR(cv_dataset_check(&d, ce, &e), e, "bad_label", "y", "y[1] = -100");
    ce->ignore_index = -100;
    for (int i = 0; i < 4; i++)
        d.labels[i] = -100;
    ASSERT_ERR(cv_dataset_check(&d, ce, &e), e, "bad_label", "y",
               "y: every target equals the ignore_index -100");
    /* input dtypes */
    ce->input_dtype = CV_DTYPE_INT64;
    d.labels[0] = 1;
    ASSERT_ERR(cv_dataset_check(&d, ce, &e), e, "dtype_mismatch", "x",
               "x: the model takes integer token ids (input_dtype \"int64\"); the dataset's x "
               "holds floating-point values");
    d.x_dtype = CV_DTYPE_INT32; /* either integer dtype feeds an integer model */
    ck_assert_int_eq(cv_dataset_check(&d, ce, &e), 0);
    ce->input_dtype = CV_DTYPE_FLOAT32;
    ASSERT_ERR(cv_dataset_check(&d, ce, &e), e, "dtype_mismatch", "x",
               "x: the model takes floating-point inputs (input_dtype \"float32\"); the "
               "dataset's x holds integer ids (I32)");
    cv_dataset_free(&d);

    float t[6] = {0, 0.5f, 1, 1, 0.25f, 0};
    mk_targets(&d, 2, 3, 3, t);
    ck_assert_int_eq(cv_dataset_check(&d, mse, &e), 0);
    ck_assert_int_eq(cv_dataset_check(&d, bce, &e), 0);
    ASSERT_ERR(cv_dataset_check(&d, ce, &e), e, "target_mismatch", "y",
               "CrossEntropyLoss needs integer class indices");
    d.targets[4] = 1.5f;
    ck_assert_int_eq(cv_dataset_check(&d, mse, &e), 0);
    ASSERT_ERR(cv_dataset_check(&d, bce, &e), e, "bad_target", "y",
               "target 1.5 at sample 1 (flat index 4) is outside [0, 1]");
    d.targets[4] = INFINITY;
    ASSERT_ERR(cv_dataset_check(&d, mse, &e), e, "non_finite", "y", "sample 1");
    cv_dataset_free(&d);
    mk_targets(&d, 3, 3, 2, t);
    ASSERT_ERR(cv_dataset_check(&d, mse, &e), e, "shape_mismatch", "y",
               "per-sample target shape [2] does not match the model output [3]");
    d.y_shape.rank = 0; /* y given as [N] for a [1]-output model is still a mismatch */
    ASSERT_ERR(cv_dataset_check(&d, mse, &e), e, "shape_mismatch", "y", "shape [] does not");
    cv_dataset_free(&d);

    /* a sequence output [4, 3] (set by hand: finalize takes flat outputs here) */
    cv_model *seq = new_model("[3]", lin, "CrossEntropyLoss");
    seq->layers[0].out_shape = (cv_shape){2, {4, 3}};
    int64_t ys[8] = {0, 1, 2, -100, 2, 2, 1, 0};
    mk_labels(&d, 2, 3, ys);
    free(d.labels);
    d.labels = malloc(sizeof ys);
    memcpy(d.labels, ys, sizeof ys);
    d.y_shape = (cv_shape){1, {4}};
    seq->class_dim = -1; /* [T, K] = [4, 3]: labels [N, 4] in [0, 3) */
    ck_assert_int_eq(cv_dataset_check(&d, seq, &e), 0);
    d.labels[6] = 3;
    ASSERT_ERR(cv_dataset_check(&d, seq, &e), e, "bad_label", "y",
               "y[1, 2] = 3 is not a class index in [0, 3) (the model output has 3 classes "
               "along class_dim -1) nor the ignore_index -100");
    seq->class_dim = 1; /* [K, T] = [4, 3]: labels [N, 3] in [0, 4) */
    ASSERT_ERR(cv_dataset_check(&d, seq, &e), e, "shape_mismatch", "y",
               "y: class indices of shape [N, 4] do not fit the model output [N, 4, 3]: "
               "CrossEntropyLoss (class_dim 1) needs [N, 3], the output without its class "
               "dimension");
    d.y_shape.rank = 0;
    ASSERT_ERR(cv_dataset_check(&d, seq, &e), e, "shape_mismatch", "y",
               "class indices of shape [N] do not fit");
    cv_dataset_free(&d);
    float yf[24] = {0};
    mk_targets(&d, 2, 3, 12, yf);
    seq->loss = CV_LOSS_NLL;
    ASSERT_ERR(cv_dataset_check(&d, seq, &e), e, "target_mismatch", "y",
               "y: NLLLoss needs integer class indices [N, 3] (I64 or I32)");
    seq->loss = CV_LOSS_MSE; /* MSE/BCE: targets shaped like the output */
    d.y_shape = (cv_shape){2, {4, 3}};
    ck_assert_int_eq(cv_dataset_check(&d, seq, &e), 0);
    cv_dataset_free(&d);
    free_model(seq);
    free_model(ce);
    free_model(mse);
    free_model(bce);
    free_model(wide);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("loaders");
    TCase *st = tcase_create("safetensors");
    tcase_add_test(st, st_roundtrip);
    tcase_add_test(st, st_file_io);
    tcase_add_test(st, st_bad_container);
    tcase_add_test(st, st_bad_header);
    tcase_add_test(st, st_conversions);
    tcase_add_test(st, st_writer_rejects);
    suite_add_tcase(s, st);
    TCase *ar = tcase_create("arch");
    tcase_add_test(ar, arch_interface_example);
    tcase_add_test(ar, arch_roundtrip);
    tcase_add_test(ar, arch_defaults);
    tcase_add_test(ar, arch_rejects_fields);
    tcase_add_test(ar, arch_same_padding_and_bn1d_cl);
    tcase_add_test(ar, arch_rejects_document);
    tcase_add_test(ar, arch_file);
    tcase_add_test(ar, arch_loss_fields);
    suite_add_tcase(s, ar);
    TCase *pa = tcase_create("params");
    tcase_add_test(pa, params_load_export);
    tcase_add_test(pa, params_conversions);
    tcase_add_test(pa, params_rejects);
    suite_add_tcase(s, pa);
    TCase *da = tcase_create("data");
    tcase_add_test(da, data_load);
    tcase_add_test(da, data_rejects);
    tcase_add_test(da, batches);
    tcase_add_test(da, dataset_check);
    suite_add_tcase(s, da);
    return s;
}

int main(void) { return tu_main(suite); }
