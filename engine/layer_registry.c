/* layer_registry.c - the one list of layer classes, and the list of
 * function-only classes (graph form).  The architecture parser and exporter,
 * the model layout and the kernel dispatch find a layer type here; adding a
 * type is its engine/layer_*.c (func_*.c) file plus one line below. */
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

/* Function-only classes: call_function targets of the graph form (and
 * get_attr) that are no module, named by their function name.  Module
 * classes above that are also functions say so in their `function`. */
#define CV_FUNCTION_CLASSES(X)    \
    X(cv_contiguous_class)        \
    X(cv_add_class)               \
    X(cv_sub_class)               \
    X(cv_mul_class)               \
    X(cv_div_class)               \
    X(cv_neg_class)               \
    X(cv_pow_class)               \
    X(cv_sqrt_class)              \
    X(cv_rsqrt_class)             \
    X(cv_masked_fill_class)       \
    X(cv_causal_fill_class)       \
    X(cv_get_attr_class)          \
    X(cv_batch_norm_fn_class)     \
    /* one line per function-only class */

#define CV_DECLARE_CLASS(c) extern const cv_layer_class c;
CV_LAYER_CLASSES(CV_DECLARE_CLASS)
CV_FUNCTION_CLASSES(CV_DECLARE_CLASS)

#define CV_CLASS_ENTRY(c) &c,
static const cv_layer_class *const classes[] = {CV_LAYER_CLASSES(CV_CLASS_ENTRY)};
static const cv_layer_class *const functions[] = {CV_FUNCTION_CLASSES(CV_CLASS_ENTRY)};

#define NCLASSES ((int)(sizeof classes / sizeof classes[0]))
#define NFUNCTIONS ((int)(sizeof functions / sizeof functions[0]))

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

int cv_function_class_count(void) { return NFUNCTIONS; }

const cv_layer_class *cv_function_class_at(int i)
{
    return i >= 0 && i < NFUNCTIONS ? functions[i] : NULL;
}

const cv_layer_class *cv_function_find(const char *fn)
{
    for (int i = 0; i < NFUNCTIONS; i++)
        if (strcmp(functions[i]->name, fn) == 0)
            return functions[i];
    for (int i = 0; i < NCLASSES; i++)
        if (classes[i]->function && strcmp(classes[i]->function, fn) == 0)
            return classes[i];
    return NULL;
}

int cv_layer_class_is_module(const cv_layer_class *cls)
{
    return cls->name[0] >= 'A' && cls->name[0] <= 'Z';
}

const cv_layer_class *cv_layer_class_for_function(const char *target)
{
    const cv_layer_class *c = cv_function_find(target);
    for (int i = 0; !c && i < NCLASSES; i++)
        if (!cv_layer_class_is_module(classes[i]) && strcmp(classes[i]->name, target) == 0)
            c = classes[i];
    return c;
}
