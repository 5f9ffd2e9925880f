/* params.h - model parameters <-> safetensors (state_dict names).
 *
 * A parameters file holds exactly the model's state_dict: every parameter
 * ("0.weight", "0.bias", ...) and buffer ("1.running_mean", "1.running_var",
 * "1.num_batches_tracked").  F64/F16/BF16 are converted to float32; buffers
 * may also be integer (num_batches_tracked is I64 in PyTorch).
 */
#ifndef CV_PARAMS_H
#define CV_PARAMS_H

#include <stddef.h>

#include "api/safetensors.h"
#include "engine/err.h"
#include "engine/model.h"

/* Validates f against the finalized model m (names, shapes, dtypes, finite
 * values) and copies the values into m->params / m->buffers, allocating them
 * with cv_model_alloc() if m->params is NULL.  On error m is unchanged. */
int cv_params_load(cv_model *m, const cv_st_file *f, cv_err *e);
/* Same from a safetensors buffer / file. */
int cv_params_parse(cv_model *m, const void *buf, size_t len, cv_err *e);
int cv_params_read(cv_model *m, const char *path, cv_err *e);

/* The state_dict entries in order (parameters and buffers, shared tensors
 * once): their count, and entry k (NULL when out of range) with
 * *is_buffer set. */
int cv_params_count(const cv_model *m);
const cv_tensor_info *cv_params_entry(const cv_model *m, int k, int *is_buffer);
/* Sets one state_dict entry from numel float32 values (copied; finite,
 * running_var >= 0), allocating the model's storage (zeroed) first if it
 * has none.  On error m is unchanged. */
int cv_params_set(cv_model *m, const char *name, const float *v, size_t numel, cv_err *e);

/* The model's state_dict as a safetensors buffer (malloc()ed): parameters
 * and buffers as F32 in state_dict order, num_batches_tracked as I64 so that
 * torch's load_state_dict accepts it. */
int cv_params_export(const cv_model *m, void **out, size_t *outlen, cv_err *e);
int cv_params_save(const cv_model *m, const char *path, cv_err *e);

#endif
