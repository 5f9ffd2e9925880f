/* layer.h - the per-layer kernels every curvature product is assembled from,
 * and the layer class: everything about one layer type (see below).
 *
 * Each layer type implements five kernels on a batch of N samples with
 * float32 row-major activations (sample n of x at x + n*in_numel):
 *   forward   y = f(x; theta)
 *   vjp       transposed Jacobian: gx = J_x^T gy, gtheta = J_theta^T gy
 *   jvp       Jacobian: ry = J_x rx + J_theta vtheta
 *   hvp_extra second-order terms of the backward pass (Pearlmutter's R-op),
 *             added to gx / gtheta: R(J_x^T) gy and R(J_theta^T) gy for the
 *             fixed gradient cotangent gy, direction (rx, vtheta)
 *   per_sample parameter gradient of each sample separately
 *   quad_extra the hvp_extra terms dotted with the direction (rx, vtheta),
 *             for quadratic forms v^T H v without a backward pass
 * Kernels take k stacked vectors: sample n of vector j at ptr + (j*N + n)*numel.
 * A NULL input means zero; a NULL output means "not needed".  An output never
 * overlaps an input or the context's x, y and caches (the driver ping-pongs
 * separate buffers); the elementwise kernels rely on it (restrict pointers).
 * Parameter vectors of a layer are all its parameter tensors concatenated in
 * state_dict order (P = numel of weight + bias); theta points at them inside
 * the model's parameter vector.
 */
#ifndef CV_LAYER_H
#define CV_LAYER_H

#include <stddef.h>

#include "err.h"
#include "model.h"

typedef struct {
    const cv_layer *L;
    const float *theta;        /* the layer's parameters (P floats), or NULL */
    const float *buffers;      /* the layer's buffers (BatchNorm statistics), or NULL */
    int n;                     /* batch size */
    size_t in_numel, out_numel, nparam;
    const float *x;            /* forward input, n * in_numel (== xs[0]) */
    int nin;                   /* inputs of the node (1 for a Sequential layer) */
    const float *xs[CV_MAX_NODE_INPUTS];  /* input i, n * in_numels[i] */
    size_t in_numels[CV_MAX_NODE_INPUTS];
    const float *y;            /* forward output, n * out_numel */
    float *d1, *d2;            /* cached first/second derivatives (activations) */
    int *idx;                  /* cached argmax (MaxPool2d) */
    size_t cache_bytes;        /* bytes of d1, d2 and idx (cv_layer_cache) */
    size_t gram_budget;        /* floats a Gram kernel may buffer (0: its default) */
    float *work;               /* scratch owned by the caller, work_floats long */
    size_t work_floats;
} cv_layer_ctx;

typedef struct {
    /* Scratch floats the kernels need for k stacked vectors. */
    size_t (*work_size)(const cv_layer_ctx *c, int k);
    /* Allocates/computes caches (d1, d2, idx) and writes y. */
    int (*forward)(cv_layer_ctx *c, float *y, cv_err *e);
    void (*vjp)(const cv_layer_ctx *c, int k, const float *gy, float *gx, float *gtheta);
    void (*jvp)(const cv_layer_ctx *c, int k, const float *rx, const float *vtheta, float *ry);
    void (*hvp_extra)(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                      const float *vtheta, float *gx_add, float *gtheta_add);
    /* G: n x nparam, row i = gradient of sample i's contribution. */
    void (*per_sample)(const cv_layer_ctx *c, const float *gy, float *G);
    /* Gram matrix of per-sample parameter gradients (may be NULL for
     * layers without parameters): for k stacked cotangents gy, with row
     * r = j*n + i the gradient of theta produced by gy_j(sample i) alone,
     * G[r, r'] += <grad_r, grad_r'> restricted to the parameter tensors in
     * `mask` (bit t = t-th tensor of the layer).  G is (k*n) x (k*n),
     * row-major, double. */
    void (*gram_add)(const cv_layer_ctx *c, int k, const float *gy, unsigned mask, double *G);
    /* q[j] += rx_j . R(J_x^T) gy + vtheta_j . R(J_theta^T) gy for k
     * directions (the hvp_extra terms dotted with the direction), without
     * forming the terms.  NULL: the driver forms hvp_extra and dots it. */
    void (*quad_extra)(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                       const float *vtheta, double *q);
    /* vjp of the k cotangents gy, then hvp_extra of the gradient cotangent
     * g0 with the directions (rx, vtheta), in one pass, so that a layer can
     * share work between the two (Conv2d forms one unfolded input cotangent
     * per vector and folds it once).  NULL: the driver calls vjp, then
     * hvp_extra. */
    void (*vjp_hvp)(const cv_layer_ctx *c, int k, const float *gy, const float *g0,
                    const float *rx, const float *vtheta, float *gx, float *gtheta);
    /* Nodes with other than exactly one input (add, matmul, cat, attention,
     * get_attr with none) implement these instead of vjp/jvp/hvp_extra: the
     * same contracts with one pointer per input, c->nin of them (a NULL
     * entry: zero tangent / cotangent not needed).  gx[i] is overwritten;
     * gx_add[i] is added to.  quad_extra, vjp_hvp and gram_add are then
     * unused (the driver forms hvp_extra_n and dots it); per_sample and
     * gram_add only matter for classes with parameters. */
    void (*vjp_n)(const cv_layer_ctx *c, int k, const float *gy, float *const *gx,
                  float *gtheta);
    void (*jvp_n)(const cv_layer_ctx *c, int k, const float *const *rx, const float *vtheta,
                  float *ry);
    void (*hvp_extra_n)(const cv_layer_ctx *c, int k, const float *gy, const float *const *rx,
                        const float *vtheta, float *const *gx_add, float *gtheta_add);
    /* Kronecker factors (KFAC; engine/kron.h): optional, for layers whose
     * parameter block is W~ = [W | b] acting as z_r = W~ a~_r at R weight-
     * sharing positions r of a sample (Linear: R = rows T of [..., in];
     * Conv2d/Conv1d: R = output positions, a_r the im2col column of r).
     * kron_dims: 1 with dim_a (in + has_bias) and dim_b (out) when layer L
     * has that structure, 0 when not (Conv2d with groups > 1).
     * kron_a_add: A += sum_i A_i over the n samples (once per micro-batch:
     * A does not depend on the cotangents), A_i = (1/R) sum_r a~_ir a~_ir^T
     * (CV_KRON_EXPAND) or abar_i abar_i^T with abar_i = (1/R) sum_r a~_ir
     * (CV_KRON_REDUCE); a~ = [a; 1] with a bias.  The caller divides by N.
     * kron_b_add: B += sum_j sum_i B_ji for k stacked output cotangents gy
     * (vector j, sample i at gy + (j*n + i)*out_numel), B_ji = sum_r
     * g_jir g_jir^T (expand) or (sum_r g_jir)(sum_r g_jir)^T (reduce),
     * g_jir the cotangent of z at position r; unscaled (the caller weighs
     * the cotangents).  A and B are row-major dim x dim doubles, both
     * triangles.  Both return 0, or -1 when out of scratch memory. */
    int (*kron_dims)(const cv_layer *L, int *dim_a, int *dim_b);
    int (*kron_a_add)(const cv_layer_ctx *c, int approx, double *A);
    int (*kron_b_add)(const cv_layer_ctx *c, int k, const float *gy, int approx, double *B);
    /* EKFAC (engine/kron_ext.c): for k stacked output cotangents gy (as
     * kron_b_add) the per-(vector, sample) gradients G_ji = sum_r g_jir a~_ir^T
     * of W~ (dim_b x dim_a) rotated into the factors' eigenbases:
     * s[p*dim_a + q] += sum_j sum_i ((Q_B^T G_ji Q_A)_pq)^2, unweighted.
     * qa (dim_a x dim_a) and qb (dim_b x dim_b) hold the eigenvectors as
     * columns, column-major (kronop.h's q_a, q_b).  0, or -1 when out of
     * scratch memory.  Optional (a layer without it gets no EKFAC). */
    int (*ekfac_add)(const cv_layer_ctx *c, int k, const float *gy, const double *qa,
                     const double *qb, double *s);
    /* Exact diagonal by backpropagation (engine/diag_exact.c; BackPACK's
     * DiagGGNExact / DiagGGNMC / squared sample gradients): for k stacked
     * output cotangents gy (vector j, sample i at gy + (j*n + i)*out_numel)
     * d[p] += sum_j sum_i (g_ji[p])^2, g_ji = J_theta^T gy_ji the parameter
     * gradient of that cotangent of that sample alone (weight sharing
     * within a sample sums before squaring); d holds P doubles in the
     * layer's parameter order, unweighted.  per_sample: d is n x P (sample
     * i's row at d + i*P) and row i += sum_j (g_ji[p])^2.  0, or -1 when out
     * of scratch memory.  Optional: a layer without it has no
     * backpropagated diagonal. */
    int (*diag_add)(const cv_layer_ctx *c, int k, const float *gy, int per_sample, double *d);
    /* The same from the squared cotangents alone, for layers whose
     * per-sample parameter gradients are rank one in the cotangent (Linear
     * with one row per sample: (g_ji[p])^2 = gy_ji[o]^2 a_i[q]^2), so that
     * a caller can sum sq_i = sum_j gy_ji.^2 (n x out_numel floats) over
     * all its vectors first and pay the layer's product once: d (P
     * doubles, not per sample) += the diagonal of those sq.  sq NULL: only
     * asks, 0 when the layer's shape allows it.  Returns 0, 1 when it does
     * not apply (the caller uses diag_add), -1 out of scratch memory.
     * Optional. */
    int (*diag_sq_add)(const cv_layer_ctx *c, const float *sq, double *d);
} cv_layer_ops;

/* A diag_add from the layer's per_sample kernel (k calls of it on n x P
 * floats it allocates), for layers without a faster one. */
int cv_layer_diag_per_sample(const cv_layer_ctx *c, int k, const float *gy, int per_sample,
                             double *d);

/* Weight-sharing approximations of the Kronecker factors (Eschenhagen et
 * al. 2023; see kron_a_add above). */
typedef enum { CV_KRON_EXPAND = 0, CV_KRON_REDUCE = 1 } cv_kron_approx;

/* For kron kernels: the top-left m x m of M (row stride ldm) += w * S for
 * the float m x m upper triangle S (row-major, from ssyrk), both triangles
 * written; and, for the bias entry of an (m+1) x (m+1) factor, its last row
 * and column += w * sum (m doubles), its corner += count. */
void cv_kron_add_sym(int m, const float *S, double w, double *M, int ldm);
void cv_kron_add_bias(int m, const double *sum, double w, double count, double *M);
/* The top-left n x n of M (row stride ldm) += w * X^T X for X (m x n,
 * row-major floats), both triangles written: float32 products (as ssyrk's)
 * in column panels added into M in double, with n x 256 floats of scratch
 * instead of the n x n of ssyrk's result.  Returns 0, or -1 out of memory. */
int cv_kron_gram_add(const float *X, size_t m, int n, double w, double *M, int ldm);
/* For ekfac_add kernels: s[p*da + q] += ((Q_B^T G Q_A)_pq)^2 for one
 * gradient G (db x da, row-major; qa, qb as ekfac_add takes them); work:
 * db*da doubles. */
void cv_kron_ekfac_rotate_add(int da, int db, const double *G, const double *qa,
                              const double *qb, double *work, double *s);

/* Release caches allocated by forward (d1, d2, idx). */
void cv_layer_ctx_release(cv_layer_ctx *c);

/* A forward cache (for d1, d2 or idx) of `bytes`, counted in c->cache_bytes
 * (the bytes asked for: the memory accounting must not depend on what the
 * allocator rounds them up to); NULL when out of memory. */
void *cv_layer_cache(cv_layer_ctx *c, size_t bytes);

/* ---- layer classes ---------------------------------------------------------
 * A layer class is everything about one layer type: its name as PyTorch
 * spells it, its attributes (a field table over the attribute struct its
 * file defines), shape inference, parameter/buffer layout and kernels.  Each
 * engine/layer_*.c defines its class(es); engine/layer_registry.c lists them.
 * The field table is plain data: api/arch.c reads and writes the
 * architecture document from it; nothing here knows JSON. */

#define CV_ATTR_INT_LIMIT (1 << 24) /* integer attributes beyond this are a mistake */
#define CV_LAYER_MAX_FIELDS 24
#define CV_F_NOSTORE ((size_t)-1)   /* offset of a field that is checked, not stored */

typedef enum {
    CV_F_INT,          /* int, an integer in [min, CV_ATTR_INT_LIMIT]; with
                        * CV_F_LIST1 also [k]; with choices, a keyword too, as
                        * PAIR (1-d sliding windows: Conv1d's kernel_size, padding) */
    CV_F_PAIR,         /* int[2], an integer (both) or [h, w], each >= min; with
                        * choices, a keyword is accepted too: index + 1 stored as
                        * int at aux (0: numbers), exported instead of the numbers
                        * while it is nonzero (class check resolves it) */
    CV_F_BOOL,         /* int 0/1, true or false */
    CV_F_NUMBER,       /* double, a finite number in [min, max] ((min, max] with
                        * CV_F_MIN_OPEN) */
    CV_F_ENUM,         /* int, the index of one of choices (strings) */
    CV_F_FIXED_BOOL,   /* true or false, only def accepted ("unsupported" otherwise,
                        * text says why); stored as int unless offset is CV_F_NOSTORE */
    CV_F_FIXED_STRING, /* a string, only text accepted ("unsupported" otherwise) */
    CV_F_FIXED_NULL,   /* absent or null, anything else "unsupported" */
    CV_F_IGNORED,      /* accepted and ignored: JSON kinds in CV_F_ACCEPT_* flags */
    CV_F_INT_LIST,     /* cv_int_list, a list of 1 to max (at most CV_INT_LIST_MAX)
                        * integers, each in [min, CV_ATTR_INT_LIMIT]; a plain integer
                        * is a list of one; absent: the empty list (n = 0), which is
                        * not exported */
    CV_F_DIMS          /* cv_shape, an integer n ([n]) or a list of 1..CV_MAX_RANK
                        * integers, each >= min (LayerNorm's normalized_shape);
                        * exported as a list; default: rank 0 */
} cv_field_kind;

/* The value of a CV_F_INT_LIST field (dims, shape): n entries in v. */
#define CV_INT_LIST_MAX (CV_MAX_RANK + 1) /* a full shape: batch + per-sample dims */
typedef struct {
    int n;
    int v[CV_INT_LIST_MAX];
} cv_int_list;

enum {
    CV_F_REQUIRED = 1u << 0,      /* no default: the document must give it */
    CV_F_NULLABLE = 1u << 1,      /* null means the default (PyTorch's None); an INT
                                   * at its default is exported as null */
    CV_F_NO_NONE = 1u << 2,       /* PAIR: a null entry is "unsupported" */
    CV_F_MIN_OPEN = 1u << 3,      /* NUMBER: min itself is excluded */
    CV_F_HIDDEN = 1u << 4,        /* accepted on input, not written on export */
    CV_F_ACCEPT_BOOL = 1u << 5,   /* IGNORED: true/false accepted */
    CV_F_ACCEPT_NUMBER = 1u << 6, /* IGNORED: numbers accepted */
    CV_F_ACCEPT_NULL = 1u << 7,   /* IGNORED: null accepted */
    CV_F_LIST1 = 1u << 8,         /* INT: a list of one integer accepted too (1-tuples) */
    CV_F_ZERO_NULL = 1u << 9,     /* INT, PAIR, NUMBER (with NULLABLE): a stored 0 is
                                   * PyTorch's None, exported as null */
    CV_F_INF_STRINGS = 1u << 10   /* NUMBER: the strings "inf" and "-inf" are accepted
                                   * (stored as +-INFINITY, exported as those strings;
                                   * JSON has no infinite numbers), e.g. masked_fill's
                                   * value; min/max bound the finite numbers only */
};

typedef struct {
    const char *name;             /* attribute name as PyTorch and the document spell it */
    cv_field_kind kind;
    unsigned flags;               /* CV_F_* */
    size_t offset;                /* of the value in the class's attribute struct */
    double def;                   /* default (BOOL, FIXED_BOOL: 0/1; ENUM: index;
                                   * PAIR: both entries) */
    double min, max;              /* bounds (INT, PAIR: min; NUMBER: both; INT_LIST:
                                   * entries >= min, at most max entries) */
    const char *const *choices;   /* ENUM values / PAIR keywords, NULL-terminated */
    size_t aux;                   /* PAIR or INT with choices: offset of the keyword (int) */
    const char *text;             /* FIXED_BOOL: why; FIXED_STRING: the accepted
                                   * string; PAIR or INT with choices: what a bad string is
                                   * told it must be */
} cv_field;

/* Shorthands for the common fields of attribute struct T. */
#define CV_FIELD_INT(n, T, m, lo, d) \
    {.name = n, .kind = CV_F_INT, .offset = offsetof(T, m), .def = (d), .min = (lo)}
#define CV_FIELD_INT_REQ(n, T, m, lo)                                                        \
    {.name = n, .kind = CV_F_INT, .flags = CV_F_REQUIRED, .offset = offsetof(T, m),          \
     .min = (lo)}
#define CV_FIELD_PAIR(n, T, m, lo, d) \
    {.name = n, .kind = CV_F_PAIR, .offset = offsetof(T, m), .def = (d), .min = (lo)}
#define CV_FIELD_PAIR_REQ(n, T, m, lo)                                                       \
    {.name = n, .kind = CV_F_PAIR, .flags = CV_F_REQUIRED, .offset = offsetof(T, m),         \
     .min = (lo)}
#define CV_FIELD_BOOL(n, T, m, d) \
    {.name = n, .kind = CV_F_BOOL, .offset = offsetof(T, m), .def = (d)}
#define CV_FIELD_NUMBER(n, T, m, d, lo, hi)                                                  \
    {.name = n, .kind = CV_F_NUMBER, .offset = offsetof(T, m), .def = (d), .min = (lo),      \
     .max = (hi)}
/* Integers that may be negative (PyTorch dims count from the end). */
#define CV_FIELD_INT_ANY(n, T, m, d) CV_FIELD_INT(n, T, m, -CV_ATTR_INT_LIMIT, d)
#define CV_FIELD_INT_ANY_REQ(n, T, m) CV_FIELD_INT_REQ(n, T, m, -CV_ATTR_INT_LIMIT)
/* A list of at most CV_INT_LIST_MAX integers of any sign (flags: 0, CV_F_REQUIRED or
 * CV_F_NULLABLE). */
#define CV_FIELD_INT_LIST(n, T, m, fl)                                                       \
    {.name = n, .kind = CV_F_INT_LIST, .flags = (fl), .offset = offsetof(T, m),              \
     .min = -CV_ATTR_INT_LIMIT, .max = CV_INT_LIST_MAX}
/* In a class definition: its field table a (an array). */
#define CV_FIELDS(a) .fields = (a), .nfields = (int)(sizeof(a) / sizeof((a)[0]))
/* PyTorch's `inplace`: a boolean, meaningless here. */
#define CV_FIELD_INPLACE                                                                     \
    {.name = "inplace", .kind = CV_F_IGNORED, .flags = CV_F_ACCEPT_BOOL | CV_F_HIDDEN,       \
     .offset = CV_F_NOSTORE}

struct cv_layer_class {
    const char *name;             /* PyTorch's class name, e.g. "Conv2d" */
    size_t attr_size;             /* sizeof its attribute struct (CV_LAYER_ATTRS) */
    const cv_field *fields;       /* attributes, in document order */
    int nfields;
    /* Optional: attributes that are not fields, after the field defaults. */
    void (*init)(cv_layer *L);
    /* Optional: checks/resolves attributes once a document set them (e.g.
     * padding="same"); on error e->field is the attribute and e->message
     * starts with it ("groups: ..."); the parser prefixes the layer's path. */
    int (*check)(cv_layer *L, cv_err *e);
    /* Sets L->out_shape from the per-sample input shape in (== L->in_shape).
     * On error e->field is the attribute at fault or "", e->message says
     * what; cv_model_finalize prefixes the layer.  NULL: out = in. */
    int (*infer)(cv_layer *L, const cv_shape *in, cv_err *e);
    /* Optional: declares the parameter and buffer tensors in state_dict order
     * (cv_layer_add_param / cv_layer_add_buffer); returns 0 or -1. */
    int (*layout)(cv_layer *L);
    const cv_layer_ops *ops;      /* the kernels */
    /* Optional, for a layer reading the model input: checks a dataset's
     * inputs (n samples of in_numel values, e.g. token ids within
     * Embedding's range) before any job runs; -1 with e (field "x"). */
    int (*check_input)(const cv_layer *L, const float *x, size_t n, cv_err *e);
    /* Number of inputs the node reads; both 0 means exactly one.  Classes
     * with other arities implement vjp_n/jvp_n/hvp_extra_n; their infer hook
     * reads in[0..L->nin). */
    int min_inputs, max_inputs;
    /* Graph form only: the lower-case function name under which this class is
     * also a call_function target ("linear", "layer_norm"), or NULL. */
    const char *function;
    const void *impl;             /* constant data for kernels several classes share */
};

/* The registry (engine/layer_registry.c): every layer class, in a fixed order. */
int cv_layer_class_count(void);
const cv_layer_class *cv_layer_class_at(int i);
const cv_layer_class *cv_layer_class_find(const char *name); /* NULL if unknown */
/* The function-only classes (graph form: add, mul, get_attr, ...; name ==
 * function), which the list above leaves out; and the class of call_function
 * target fn: a function-only class, else the layer class whose `function`
 * is fn (ReLU for "relu"), NULL if none. */
int cv_function_class_count(void);
const cv_layer_class *cv_function_class_at(int i);
const cv_layer_class *cv_function_find(const char *fn);

/* 1 when cls is a module type (PyTorch's CapWords class name, "Linear"),
 * 0 for a function-only class of the graph form (lower-case, "add"). */
int cv_layer_class_is_module(const cv_layer_class *cls);
/* The class a graph call_function target names: a function-only class by
 * name or a module class by its `function` name ("linear"); NULL if none. */
const cv_layer_class *cv_layer_class_for_function(const char *target);

/* Zeroes L and gives it class cls with every field at its default. */
void cv_layer_init(cv_layer *L, const cv_layer_class *cls);

/* For layout hooks: appends a tensor (name suffix such as "weight", rank,
 * dims); cv_model_finalize names it "<layer>.<suffix>" and places it. */
int cv_layer_add_param(cv_layer *L, const char *suffix, int rank, const int *dims);
int cv_layer_add_buffer(cv_layer *L, const char *suffix, int rank, const int *dims);

/* For infer hooks of sliding windows: the output length along axis a (0:
 * height, 1: width) of per-sample input in ([C, H, W]) for kernel k,
 * stride s, padding lo before and hi after, dilation d, as PyTorch computes
 * it, into *out; or -1 with an error naming kernel_size (kernel larger than
 * the padded input) or stride (output too large for an int). */
int cv_layer_window_out(const cv_shape *in, int a, int k, int s, int lo, int hi, int d,
                        int ceil_mode, int *out, cv_err *e);

#endif
