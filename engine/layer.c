/* layer.c - dispatch from layer type to its kernel table. */
#include "layer.h"

#include <stdlib.h>

const cv_layer_ops *cv_layer_ops_for(cv_layer_type t)
{
    switch (t) {
    case CV_LINEAR: return &cv_linear_ops;
    case CV_RELU: case CV_TANH: case CV_SIGMOID: case CV_LEAKYRELU: case CV_ELU:
    case CV_GELU: case CV_SOFTPLUS:
        return &cv_activation_ops;
    case CV_IDENTITY: case CV_FLATTEN: case CV_DROPOUT:
        return &cv_passthrough_ops;
    case CV_CONV2D: return &cv_conv2d_ops;
    case CV_MAXPOOL2D: return &cv_maxpool2d_ops;
    case CV_AVGPOOL2D: case CV_ADAPTIVEAVGPOOL2D: return &cv_avgpool2d_ops;
    case CV_BATCHNORM1D: case CV_BATCHNORM2D: return &cv_batchnorm_ops;
    default:
        return NULL;
    }
}

void cv_layer_ctx_release(cv_layer_ctx *c)
{
    free(c->d1);
    free(c->d2);
    free(c->idx);
    c->d1 = c->d2 = NULL;
    c->idx = NULL;
}
