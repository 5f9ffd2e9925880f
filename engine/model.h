/* model.h - the in-memory description of a network and its loss.
 *
 * A cv_model is an input shape, an ordered list of layers and a loss.  In the
 * Sequential form (torch.nn.Sequential) layer l reads layer l-1's output; in
 * the graph form (any torch.fx graph) each layer names the activations it
 * reads (cv_layer.in[]: 0 the model input, l+1 layer l's output) and the
 * list is in topological order, the network output being the last layer's.
 * Parameters live in one contiguous float32 vector, layer by layer in the
 * order the layers first use them (weight before bias within a layer; for a
 * Sequential that is state_dict order); a tensor several layers use (tied)
 * is stored once.  Buffers such as BatchNorm running statistics live in a
 * separate float32 vector and are not curvature parameters.  Everything here
 * is plain data: parsing (JSON, safetensors) lives in api/, numerics in the
 * other engine modules.
 *
 * A layer's type is its class (engine/layer.h: name, attribute table, shape
 * inference, tensor layout, kernels; engine/layer_registry.c lists them all);
 * its attributes live in the layer's fixed-size attribute area, laid out by
 * the attribute struct its class's file defines (CV_LAYER_ATTR).
 */
#ifndef CV_MODEL_H
#define CV_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

#define CV_MAX_LAYERS 512
#define CV_MAX_RANK 4           /* per-sample tensor rank, e.g. [C, H, W] */
#define CV_MAX_LAYER_PARAMS 2   /* weight, bias (cv_block sizes its index list by it) */
#define CV_MAX_LAYER_BUFFERS 3  /* running_mean, running_var, num_batches_tracked */
#define CV_MAX_NODE_INPUTS 4    /* inputs of one graph node (attention: q, k, v, mask) */
#define CV_MAX_NAMED_TENSORS 6  /* tensors a function node may name ("params") */
#define CV_NAME_MAX 64
#define CV_MAX_SAMPLE_NUMEL (1 << 28) /* entries of one sample's input or activation */


/* NLLLoss follows a log_softmax and is computed as CrossEntropyLoss on its
 * input (engine/loss.h). */
typedef enum { CV_LOSS_MSE = 0, CV_LOSS_CE, CV_LOSS_BCE, CV_LOSS_NLL } cv_loss_type;
typedef enum { CV_RED_MEAN = 0, CV_RED_SUM } cv_reduction;

/* Per-sample shape of an activation: rank 1 [F], 2 [C, L] or 3 [C, H, W]. */
typedef struct {
    int rank;
    int dim[CV_MAX_RANK];
} cv_shape;

typedef struct {
    char name[CV_NAME_MAX];   /* state_dict name, e.g. "0.weight" */
    int rank;
    int dim[CV_MAX_RANK];
    size_t numel;
    size_t offset;            /* into cv_model.params (or .buffers) */
    int shared;               /* graph: the same tensor as an earlier one of this name
                               * (tied weights, a module called twice, one buffer read
                               * by several get_attr nodes): its offset is that one's,
                               * and it is not counted again */
} cv_tensor_info;

#define CV_LAYER_ATTR_SIZE 128  /* bytes of per-type attributes in every cv_layer */

typedef struct cv_layer_class cv_layer_class; /* engine/layer.h */

/* How a graph node made a layer (the document's "op"). */
typedef enum {
    CV_NODE_CALL_MODULE = 0, /* a module of "modules" (and every Sequential layer) */
    CV_NODE_CALL_FUNCTION,   /* a function ("add", "linear" with "params") */
    CV_NODE_GET_ATTR,        /* a learned tensor or buffer outside a called module */
    CV_NODE_OUTPUT           /* added by the parser: the output node reads an earlier value */
} cv_node_op;

typedef struct {
    const cv_layer_class *cls;            /* the layer's type */
    union {                               /* the class's attribute struct (CV_LAYER_ATTR) */
        unsigned char bytes[CV_LAYER_ATTR_SIZE];
        double align_d;
        long long align_ll;
        void *align_p;
    } attr;

    cv_shape in_shape, out_shape;         /* per-sample, filled by cv_model_finalize */
    /* Graph wiring: the activations the layer reads, 0 = the model input,
     * l + 1 = the output of layer l (a Sequential layer l reads {l}), and
     * their shapes (in_shapes[0] == in_shape). */
    int nin;
    int in[CV_MAX_NODE_INPUTS];
    cv_shape in_shapes[CV_MAX_NODE_INPUTS];
    char node[CV_NAME_MAX];               /* graph: the node's name ("" in Sequential) */
    int src;                              /* graph: the node's index in "nodes" */
    cv_node_op op;                        /* graph: what kind of node made it */
    char module[CV_NAME_MAX];             /* prefix of its tensors' names: the module's
                                           * qualified name ("layer1.0.conv1"), the layer
                                           * index in Sequential, "" when pnames name them */
    /* Graph: explicit state_dict names of tensors (function nodes with
     * "params", e.g. F.batch_norm's weight and running statistics), each
     * "suffix=name" ("weight=w_out"); "" unused. */
    char pnames[CV_MAX_NAMED_TENSORS][CV_NAME_MAX];
    int nparams;                           /* tensors in the parameter vector */
    cv_tensor_info params[CV_MAX_LAYER_PARAMS];
    int nbuffers;
    cv_tensor_info buffers[CV_MAX_LAYER_BUFFERS];
} cv_layer;

/* The dtype of the model input (the dataset's x): integer inputs are token
 * ids for Embedding, held as exact float32 values in cv_dataset.x. */
typedef enum { CV_DTYPE_FLOAT32 = 0, CV_DTYPE_INT64, CV_DTYPE_INT32 } cv_input_dtype;

/* A graph node the parser expanded into primitive layers first..last
 * (MultiheadAttention, scaled_dot_product_attention): the node as written
 * (class, attributes, name, module, inputs), for export. */
#define CV_MAX_MACROS 32
typedef struct {
    int first, last;
    cv_layer node;
} cv_macro;

typedef struct {
    cv_shape input_shape;
    cv_input_dtype input_dtype;
    int nmacros;
    cv_macro macros[CV_MAX_MACROS];
    int graph;                /* 1: written in the graph form (modules + nodes) */
    char input_name[CV_NAME_MAX];  /* graph: the placeholder node's name */
    char output_name[CV_NAME_MAX]; /* graph: the output node's name */
    int nlayers;
    cv_layer layers[CV_MAX_LAYERS];
    cv_loss_type loss;
    cv_reduction reduction;
    int class_dim;            /* CE/NLL: 1 (PyTorch's [N, C, d1...]) or -1 ([N, ..., C]);
                               * 0 (not parsed): PyTorch's defaults (engine/loss.h) */
    double label_smoothing;   /* CrossEntropy, in [0, 1] */
    int64_t ignore_index;     /* CE/NLL: targets equal to it are left out (-100) */

    size_t nparams_total;     /* D */
    float *params;            /* D floats, state_dict order */
    size_t nbuffers_total;
    float *buffers;           /* BatchNorm statistics etc. */
} cv_model;

/* Defines T as a layer attribute struct with the members in braces:
 *     CV_LAYER_ATTRS(cv_linear_attr, {
 *         int in_features, out_features;
 *     });
 * checks at compile time that it fits the attribute area, and marks it
 * may_alias: the area is declared as bytes, and without the mark the
 * compiler may drop stores made through T (strict aliasing). */
#define CV_LAYER_ATTRS(T, ...)                                                     \
    typedef struct __attribute__((may_alias)) __VA_ARGS__ T;                       \
    typedef T T##_view; /* CV_LAYER_ATTR accepts only T defined here */            \
    _Static_assert(sizeof(T) <= CV_LAYER_ATTR_SIZE && _Alignof(T) <= _Alignof(double), \
                   #T " does not fit cv_layer's attribute area")
/* The attributes of layer L (a cv_layer * or const cv_layer *) as its class's
 * struct T, e.g. CV_LAYER_ATTR(L, cv_linear_attr)->in_features; const in,
 * const out. */
#define CV_LAYER_ATTR(L, T)                                                        \
    _Generic((L), const cv_layer *: (const T##_view *)(const void *)(L)->attr.bytes, \
             default: (T##_view *)(void *)(L)->attr.bytes)

/* Shape helpers. */
size_t cv_shape_numel(const cv_shape *s);
/* 1 when a and b have the same rank and dimensions. */
int cv_shape_equal(const cv_shape *a, const cv_shape *b);
/* "[d0, d1, ...]" into buf (truncated to len). */
void cv_dims_str(const int *dim, int rank, char *buf, size_t len);
void cv_shape_str(const cv_shape *s, char *buf, size_t len);

/* Fills in_shape/out_shape, parameter/buffer layout (names, offsets) of
 * every layer and checks that consecutive layers fit together.  Does not
 * allocate parameter storage.  Returns 0, or -1 with e set: code
 * "invalid_model", field the model path at fault ("input_shape[0]",
 * "layers", "layers[2]", "layers[2].kernel_size", "loss"), message
 * "layers[2] (Conv2d): kernel_size[0]: ..." and the like. */
int cv_model_finalize(cv_model *m, cv_err *e);

/* Allocates zeroed params/buffers for a finalized model. */
int cv_model_alloc(cv_model *m);
void cv_model_free(cv_model *m);

/* Deep copy (architecture and values). */
int cv_model_clone(const cv_model *src, cv_model *dst);

/* Output dimension C of the network (numel of the last out_shape). */
int cv_model_output_dim(const cv_model *m);

/* Number of parameter tensors, and the i-th one in state_dict order (shared
 * tensors once, at their first use). */
int cv_model_param_count(const cv_model *m);
const cv_tensor_info *cv_model_param(const cv_model *m, int i);
/* Index of the layer owning parameter tensor i. */
int cv_model_param_layer(const cv_model *m, int i);
/* Index of the parameter tensor with this name, or -1. */
int cv_model_find_param(const cv_model *m, const char *name);

/* The class name of L ("Conv2d"), "?" without a class. */
const char *cv_layer_name(const cv_layer *L);

#endif
