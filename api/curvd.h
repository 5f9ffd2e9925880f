/* curvd.h - libcurvd, the curvd engine in-process (issue 25): the C API of
 * build/libcurvd.so, which the Python package `curvd` (clients/python/curvd)
 * binds with ctypes.  This header is its documentation.
 *
 * Three handles:
 *   curvd_model  an architecture (the JSON document of docs/interface.md §1,
 *                Sequential or graph form) with its parameters and buffers;
 *   curvd_data   a dataset: inputs x [N, *input_shape] and targets y;
 *   a job        a JSON document (docs/interface.md §3: op, curvature, batch,
 *                blocks, seed, options; "model" and "dataset" are ignored)
 *                run on one model and one dataset by curvd_run, which
 *                returns the same result document `curvd run` prints.
 *
 * Errors.  Every function that can fail returns 0 (or a handle) on success,
 * and -1 (or NULL) on failure with *err set to a malloc'd JSON document
 * {"error": {"code", "message", "field"}} - the same codes and fields as the
 * HTTP API - to be released with curvd_free.  err may be NULL (the error is
 * then dropped).  Nothing aborts the process on bad input.
 *
 * Threads.  Distinct handles may be used from distinct threads at once; one
 * model and one dataset may be shared by concurrent curvd_run calls (runs
 * only read them), but not while curvd_model_set_tensor / _load_params or
 * curvd_*_close run on them.  The only process-wide state is OpenBLAS's
 * thread count (curvd_set_blas_threads), which every run in the process
 * shares.
 *
 * Memory.  curvd_model_set_tensor and curvd_model_load_params copy the
 * values (the model owns its parameters, in its own layout).  curvd_data_open
 * borrows x and y without a copy where their dtype is the engine's (x
 * float32, y int64 labels or float32 targets; integer token ids are
 * converted to float32 and copied): the caller keeps those buffers alive and
 * unchanged until curvd_data_close.  Job limits default to `curvd run`'s
 * (dense_max 4096, job_memory 2 GiB) and are set per run in curvd_run's
 * options.
 */
#ifndef CURVD_H
#define CURVD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CURVD_VERSION "0.1.0"
#define CURVD_API_VERSION 1

typedef struct curvd_model curvd_model;
typedef struct curvd_data curvd_data;

/* The library's version ("0.x.y", the same as `curvd --version`) and API
 * version (CURVD_API_VERSION of the header it was built with). */
const char *curvd_version(void);
int curvd_api_version(void);

/* Releases a string returned by this library (results, errors, names). */
void curvd_free(void *p);

/* OpenBLAS's thread count for the whole process (n >= 1). */
void curvd_set_blas_threads(int n);

/* ---- models ------------------------------------------------------------ */

/* A model from its architecture document (len bytes of JSON text).  Its
 * parameters and buffers start at zero: set them with
 * curvd_model_set_tensor or curvd_model_load_params before running. */
curvd_model *curvd_model_open(const char *arch_json, size_t len, char **err);
void curvd_model_close(curvd_model *m);

/* The state_dict entries the model expects, parameters then buffers, in
 * state_dict order: count, and entry i's name (borrowed, valid while m
 * is), element count and kind (1 parameter, 0 buffer). */
int curvd_model_tensor_count(const curvd_model *m);
const char *curvd_model_tensor_name(const curvd_model *m, int i);
int64_t curvd_model_tensor_numel(const curvd_model *m, int i);
int curvd_model_tensor_is_param(const curvd_model *m, int i);

/* Sets one parameter or buffer from numel float32 values (contiguous, in
 * PyTorch's row-major order), copying them.  Errors: a name not in the
 * state_dict (unexpected_tensor), a wrong numel (shape_mismatch), a value
 * that is not finite (non_finite; a negative running_var: bad_value).  On
 * error the model is unchanged. */
int curvd_model_set_tensor(curvd_model *m, const char *name, const float *values,
                           int64_t numel, char **err);
/* Sets every parameter and buffer from a safetensors buffer holding exactly
 * the state_dict (as `curvd run --params`). */
int curvd_model_load_params(curvd_model *m, const void *safetensors, size_t len, char **err);

/* ---- datasets ---------------------------------------------------------- */

/* dtype names for curvd_data_open. */
#define CURVD_FLOAT32 0
#define CURVD_INT64 1
#define CURVD_INT32 2

/* A dataset of n samples: x [n, *x_shape] with dtype x_dtype (float32
 * inputs, or int64/int32 token ids for a model that starts with an
 * Embedding), y [n, *y_shape] with dtype y_dtype (int64/int32 class indices,
 * or float32 targets).  x_rank / y_rank count the per-sample dimensions
 * (x_shape / y_shape may be NULL when 0).  Both buffers are borrowed when
 * their dtype is the engine's (see Memory above).  Checked against a model
 * when a job runs (shapes, label range, finite values). */
curvd_data *curvd_data_open(int64_t n, const void *x, int x_dtype, int x_rank,
                            const int64_t *x_shape, const void *y, int y_dtype, int y_rank,
                            const int64_t *y_shape, char **err);
/* The same from a safetensors buffer with tensors "x" and "y" (as `curvd
 * run --data`); the buffer is copied. */
curvd_data *curvd_data_load(const void *safetensors, size_t len, char **err);
void curvd_data_close(curvd_data *d);

/* ---- jobs -------------------------------------------------------------- */

/* Runs the job document job_json (len bytes) on m and d in the calling
 * thread, with the engine's threads (curvd_set_blas_threads).  options:
 * NULL or a JSON object {"dense_max": D, "job_memory": bytes (0: none)}.
 * Returns the result document (malloc'd JSON text, curvd_free it), or NULL
 * with *err set (invalid job 400-class codes, job_memory, out_of_memory,
 * cancelled ...). */
char *curvd_run(const curvd_model *m, const curvd_data *d, const char *job_json, size_t len,
                const char *options, char **err);

/* ---- operators --------------------------------------------------------- */

/* A curvature operator kept open: the engine state of the job's batch
 * (forward pass, the Kronecker factors of a Kronecker curvature) built once,
 * then products A X at the cost of the products alone.  job_json is a
 * "matvec" job document (its vector / probe_seed are not used) with one
 * block (blocks "full" or one group); options as curvd_run's.  m and d are
 * borrowed: they must outlive the operator, and the model's parameters must
 * not change while it is open (close it and open a new one).  One thread at
 * a time per operator.  NULL with *err set. */
typedef struct curvd_operator curvd_operator;
curvd_operator *curvd_operator_open(const curvd_model *m, const curvd_data *d,
                                    const char *job_json, size_t len, const char *options,
                                    char **err);
/* The block's dimension. */
int64_t curvd_operator_dim(const curvd_operator *op);
/* Y = A X for k vectors (X, Y: k * dim doubles, vector j at + j * dim).
 * 0, or -1 with *err set. */
int curvd_operator_apply(curvd_operator *op, int k, const double *X, double *Y, char **err);
void curvd_operator_close(curvd_operator *op);

#ifdef __cplusplus
}
#endif

#endif
