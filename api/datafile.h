/* datafile.h - datasets stored as safetensors (docs/interface.md §2).
 *
 * Exactly two tensors: "x" (floating point, [N, *input_shape], converted to
 * float32; or I64/I32 token ids, held as exact float32 values with
 * cv_dataset.x_dtype saying which, |id| <= 2^24) and "y": integer class
 * indices [N] or [N, d1, ...] (labels, one per target position) or
 * floating-point targets [N, ...].  Fitting a particular model is checked
 * separately by cv_dataset_check() (engine/dataset.h).
 */
#ifndef CV_DATAFILE_H
#define CV_DATAFILE_H

#include <stddef.h>

#include "api/safetensors.h"
#include "engine/dataset.h"
#include "engine/err.h"

int cv_datafile_load(const cv_st_file *f, cv_dataset *out, cv_err *e);

/* Like cv_datafile_load, with the same checks, but x (when F32) and y (I64
 * labels or F32 targets) point into f's data, without a copy, where the
 * tensor's dtype matches and its bytes are aligned for it; other dtypes
 * (F64/F16/BF16 x, token ids, I32 labels, ...) or unaligned tensors are
 * converted into new arrays, which *copied flags (CV_DF_X_COPIED,
 * CV_DF_Y_COPIED).  out->borrowed is set: the caller frees the copied arrays
 * (and keeps f's data alive) itself. */
#define CV_DF_X_COPIED 1u
#define CV_DF_Y_COPIED 2u
int cv_datafile_load_borrowed(const cv_st_file *f, cv_dataset *out, unsigned *copied,
                              cv_err *e);
/* cv_datafile_load_borrowed without the pass over every value (finite x
 * and targets): a data-parallel rank reads only its shard's pages and
 * checks those values itself (cv_dataset_check). */
int cv_datafile_load_unscanned(const cv_st_file *f, cv_dataset *out, unsigned *copied,
                               cv_err *e);
int cv_datafile_parse(const void *buf, size_t len, cv_dataset *out, cv_err *e);
int cv_datafile_read(const char *path, cv_dataset *out, cv_err *e);

/* The dataset as safetensors: x F32 (or I64/I32 as x_dtype says), y I64
 * (labels) or F32 (targets). */
int cv_datafile_export(const cv_dataset *d, void **out, size_t *outlen, cv_err *e);

#endif
