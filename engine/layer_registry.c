/* layer_registry.c - the one list of layer classes.  The architecture parser
 * and exporter, the model layout and the kernel dispatch find a layer type
 * here; adding a type is its engine/layer_*.c file plus one line below. */
#include "layer.h"

#include <string.h>

#define CV_LAYER_CLASSES(X)       \
    X(cv_linear_class)            \
    X(cv_conv2d_class)            \
    X(cv_relu_class)              \
    X(cv_tanh_class)              \
    X(cv_sigmoid_class)           \
    X(cv_leakyrelu_class)         \
    X(cv_elu_class)               \
    X(cv_gelu_class)              \
    X(cv_softplus_class)          \
    X(cv_identity_class)          \
    X(cv_flatten_class)           \
    X(cv_maxpool2d_class)         \
    X(cv_avgpool2d_class)         \
    X(cv_adaptiveavgpool2d_class) \
    X(cv_batchnorm1d_class)       \
    X(cv_batchnorm2d_class)       \
    X(cv_dropout_class)           \
    X(cv_silu_class)              \
    X(cv_mha_class)               \
    X(cv_sdpa_class)              \
    X(cv_attn_scale_class)        \
    X(cv_transpose_class)         \
    X(cv_permute_class)           \
    X(cv_reshape_class)           \
    X(cv_flatten_fn_class)        \
    X(cv_cat_class)               \
    X(cv_narrow_class)            \
    X(cv_mean_class)              \
    X(cv_sum_class)               \
    X(cv_softmax_class)           \
    X(cv_log_softmax_class)       \
    X(cv_matmul_class)            \
    X(cv_bmm_class)               \
    X(cv_mish_class)              \
    X(cv_hardswish_class)         \
    X(cv_layernorm_class)         \
    X(cv_groupnorm_class)         \
    X(cv_embedding_class)         \
    X(cv_conv1d_class)            \
    X(cv_maxpool1d_class)         \
    X(cv_avgpool1d_class)         \
    X(cv_adaptiveavgpool1d_class) \
    X(cv_convt2d_class)           \
    X(cv_upsample_class)          \
    /* one line per class above, in the order "supported:" lists them */

#define CV_DECLARE_CLASS(c) extern const cv_layer_class c;
CV_LAYER_CLASSES(CV_DECLARE_CLASS)

#define CV_CLASS_ENTRY(c) &c,
static const cv_layer_class *const classes[] = {CV_LAYER_CLASSES(CV_CLASS_ENTRY)};

#define NCLASSES ((int)(sizeof classes / sizeof classes[0]))

int cv_layer_class_count(void) { return NCLASSES; }

const cv_layer_class *cv_layer_class_at(int i)
{
    return i >= 0 && i < NCLASSES ? classes[i] : NULL;
}

const cv_layer_class *cv_layer_class_find(const char *name)
{
    for (int i = 0; i < NCLASSES; i++)
        if (strcmp(classes[i]->name, name) == 0)
            return classes[i];
    return NULL;
}

int cv_layer_class_is_module(const cv_layer_class *cls)
{
    return cls->name[0] >= 'A' && cls->name[0] <= 'Z';
}

const cv_layer_class *cv_layer_class_for_function(const char *target)
{
    for (int i = 0; i < NCLASSES; i++) {
        const cv_layer_class *c = classes[i];
        if (cv_layer_class_is_module(c) ? c->function && strcmp(c->function, target) == 0
                                        : strcmp(c->name, target) == 0)
            return c;
    }
    return NULL;
}
