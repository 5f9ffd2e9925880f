/* layer_norm.h - torch.nn.LayerNorm and torch.nn.GroupNorm: their attributes
 * and layer classes (engine/layer_norm.c).  Both normalize contiguous groups
 * of a sample's entries to zero mean and unit (biased) variance, then apply
 * an elementwise affine map: LayerNorm over the last dims (normalized_shape,
 * weight/bias of that shape), GroupNorm over num_groups channel groups of a
 * [C, *] input (weight/bias per channel). */
#ifndef CV_LAYER_NORM_H
#define CV_LAYER_NORM_H

#include "layer.h"

CV_LAYER_ATTRS(cv_layernorm_attr, {
    cv_shape normalized_shape;
    double eps;
    int elementwise_affine;
    int has_bias;                  /* "bias" (PyTorch >= 2.1; only with elementwise_affine) */
});

CV_LAYER_ATTRS(cv_groupnorm_attr, {
    int num_groups, num_channels;
    double eps;
    int affine;
});

extern const cv_layer_class cv_layernorm_class;
extern const cv_layer_class cv_groupnorm_class;

#endif
