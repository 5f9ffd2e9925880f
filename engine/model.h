/* model.h - the in-memory description of a sequential network and its loss.
 *
 * A cv_model mirrors torch.nn.Sequential: an input shape, an ordered list of
 * layers, and a loss.  Parameters live in one contiguous float32 vector in
 * state_dict order (weight before bias within a layer); buffers such as
 * BatchNorm running statistics live in a separate float32 vector and are not
 * curvature parameters.  Everything here is plain data: parsing (JSON,
 * safetensors) lives in api/, numerics in the other engine modules.
 */
#ifndef CV_MODEL_H
#define CV_MODEL_H

#include <stddef.h>
#include <stdint.h>

#define CV_MAX_LAYERS 256
#define CV_MAX_RANK 4           /* per-sample tensor rank, e.g. [C, H, W] */
#define CV_MAX_LAYER_PARAMS 2   /* weight, bias */
#define CV_MAX_LAYER_BUFFERS 3  /* running_mean, running_var, num_batches_tracked */
#define CV_NAME_MAX 64
#define CV_MAX_SAMPLE_NUMEL (1 << 28) /* entries of one sample's input or activation */

typedef enum {
    CV_LINEAR = 0,
    CV_CONV2D,
    CV_RELU,
    CV_TANH,
    CV_SIGMOID,
    CV_LEAKYRELU,
    CV_ELU,
    CV_GELU,
    CV_SOFTPLUS,
    CV_IDENTITY,
    CV_FLATTEN,
    CV_MAXPOOL2D,
    CV_AVGPOOL2D,
    CV_ADAPTIVEAVGPOOL2D,
    CV_BATCHNORM1D,
    CV_BATCHNORM2D,
    CV_DROPOUT,
    CV_LAYER_TYPE_COUNT
} cv_layer_type;

typedef enum { CV_LOSS_MSE = 0, CV_LOSS_CE, CV_LOSS_BCE } cv_loss_type;
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
} cv_tensor_info;

typedef struct {
    cv_layer_type type;
    /* Linear */
    int in_features, out_features;
    /* Conv2d / pooling */
    int in_channels, out_channels;
    int kernel[2], stride[2], padding[2], dilation[2], groups;
    /* Conv2d: padding[a] is the top/left padding; the bottom/right padding is
     * padding[a] + pad_extra[a] (pad_extra is 1 where padding="same" meets an
     * even effective kernel, as PyTorch pads; 0 otherwise) */
    int pad_extra[2];
    int ceil_mode, count_include_pad;
    int output_size[2];       /* AdaptiveAvgPool2d */
    int has_bias;
    /* activations */
    double negative_slope;    /* LeakyReLU */
    double alpha;             /* ELU */
    double beta, threshold;   /* Softplus */
    int gelu_tanh;            /* GELU approximate="tanh" (default erf) */
    /* BatchNorm */
    int num_features;
    double eps;
    int affine, track_running_stats;
    /* Flatten */
    int start_dim, end_dim;
    /* Dropout */
    double p;

    cv_shape in_shape, out_shape;         /* per-sample, filled by cv_model_finalize */
    int nparams;                           /* tensors in the parameter vector */
    cv_tensor_info params[CV_MAX_LAYER_PARAMS];
    int nbuffers;
    cv_tensor_info buffers[CV_MAX_LAYER_BUFFERS];
} cv_layer;

typedef struct {
    cv_shape input_shape;
    int nlayers;
    cv_layer layers[CV_MAX_LAYERS];
    cv_loss_type loss;
    cv_reduction reduction;

    size_t nparams_total;     /* D */
    float *params;            /* D floats, state_dict order */
    size_t nbuffers_total;
    float *buffers;           /* BatchNorm statistics etc. */
} cv_model;

/* Shape helpers. */
size_t cv_shape_numel(const cv_shape *s);
/* "[d0, d1, ...]" into buf (truncated to len). */
void cv_dims_str(const int *dim, int rank, char *buf, size_t len);
void cv_shape_str(const cv_shape *s, char *buf, size_t len);

/* Fills in_shape/out_shape, parameter/buffer layout (names, offsets) of
 * every layer and checks that consecutive layers fit together.  Does not
 * allocate parameter storage.  Returns 0, or -1 with a message in err. */
int cv_model_finalize(cv_model *m, char *err, size_t errlen);

/* Allocates zeroed params/buffers for a finalized model. */
int cv_model_alloc(cv_model *m);
void cv_model_free(cv_model *m);

/* Deep copy (architecture and values). */
int cv_model_clone(const cv_model *src, cv_model *dst);

/* Output dimension C of the network (numel of the last out_shape). */
int cv_model_output_dim(const cv_model *m);

/* Number of parameter tensors, and the i-th one in state_dict order. */
int cv_model_param_count(const cv_model *m);
const cv_tensor_info *cv_model_param(const cv_model *m, int i);
/* Index of the layer owning parameter tensor i. */
int cv_model_param_layer(const cv_model *m, int i);
/* Index of the parameter tensor with this name, or -1. */
int cv_model_find_param(const cv_model *m, const char *name);

const char *cv_layer_type_name(cv_layer_type t);
int cv_layer_type_from_name(const char *name); /* -1 if unknown */
int cv_layer_is_elementwise(cv_layer_type t);

#endif
