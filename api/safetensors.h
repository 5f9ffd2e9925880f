/* safetensors.h - reading and writing the safetensors container format.
 *
 * Layout: 8-byte little-endian u64 header length N, N bytes of JSON header
 * {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
 * then the data buffer; offsets are relative to the start of the buffer.
 * The parser validates everything (sizes, offsets, no holes or overlaps,
 * duplicate names) and never reads outside the given bytes.  Little-endian
 * hosts only (enforced at compile time).
 */
#ifndef CV_SAFETENSORS_H
#define CV_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"

#define CV_ST_MAX_RANK 8
#define CV_ST_MAX_HEADER 100000000u /* like the reference implementation */

typedef enum {
    CV_ST_BOOL = 0,
    CV_ST_U8,
    CV_ST_I8,
    CV_ST_I16,
    CV_ST_U16,
    CV_ST_F16,
    CV_ST_BF16,
    CV_ST_I32,
    CV_ST_U32,
    CV_ST_F32,
    CV_ST_I64,
    CV_ST_U64,
    CV_ST_F64,
    CV_ST_DTYPE_COUNT
} cv_st_dtype;

typedef struct {
    char *name;
    cv_st_dtype dtype;
    int rank;
    int64_t shape[CV_ST_MAX_RANK];
    size_t numel;
    size_t begin, end;        /* byte offsets into the data buffer */
    const uint8_t *data;      /* begin of this tensor's bytes (may be unaligned) */
} cv_st_tensor;

typedef struct {
    size_t ntensors;
    cv_st_tensor *tensors;    /* in header order */
    size_t nmeta;
    char **meta_keys, **meta_values;
    const uint8_t *data;      /* data buffer */
    size_t data_len;
    void *owned;              /* file contents owned by this struct (cv_st_load) */
} cv_st_file;

/* Entry for the writer.  data holds numel * dtype size bytes (host = little-endian). */
typedef struct {
    const char *name;
    cv_st_dtype dtype;
    int rank;
    int64_t shape[CV_ST_MAX_RANK];
    const void *data;
} cv_st_entry;

const char *cv_st_dtype_name(cv_st_dtype d);
int cv_st_dtype_from_name(const char *name); /* -1 if unknown */
size_t cv_st_dtype_size(cv_st_dtype d);
int cv_st_dtype_is_float(cv_st_dtype d);     /* F16, BF16, F32, F64 */

/* Parses buf[0..len).  The result borrows buf: tensor data pointers point
 * into it, so buf must outlive *out.  On error *out is left empty. */
int cv_st_parse(const void *buf, size_t len, cv_st_file *out, cv_err *e);
/* Reads and parses a file; *out owns the contents. */
int cv_st_load(const char *path, cv_st_file *out, cv_err *e);
void cv_st_free(cv_st_file *f);

const cv_st_tensor *cv_st_find(const cv_st_file *f, const char *name);
const char *cv_st_meta(const cv_st_file *f, const char *key); /* NULL if absent */

/* Writes "[2, 3]" into buf. */
void cv_st_shape_str(const cv_st_tensor *t, char *buf, size_t len);

/* Converts a tensor's elements (any dtype) into dst[0..numel). */
void cv_st_read_f32(const cv_st_tensor *t, float *dst);
/* Integer dtypes (and BOOL) only; fails on float dtypes and U64 overflow. */
int cv_st_read_i64(const cv_st_tensor *t, int64_t *dst, cv_err *e);
/* Same, into newly allocated arrays (free()); numel 0 gives a valid pointer. */
int cv_st_to_f32(const cv_st_tensor *t, float **out, cv_err *e);
int cv_st_to_i64(const cv_st_tensor *t, int64_t **out, cv_err *e);

/* Builds a safetensors file from n tensors (data laid out in the given order)
 * and optional metadata (meta[2i] = key, meta[2i+1] = value).  The header is
 * padded with spaces to a multiple of 8 bytes.  *out is malloc()ed. */
int cv_st_write(const cv_st_entry *t, size_t n, const char *const *meta, size_t nmeta,
                void **out, size_t *outlen, cv_err *e);
int cv_st_save(const char *path, const cv_st_entry *t, size_t n, const char *const *meta,
               size_t nmeta, cv_err *e);

#endif
