/* layer_linear.h - torch.nn.Linear's attributes and layer class. */
#ifndef CV_LAYER_LINEAR_H
#define CV_LAYER_LINEAR_H

#include "layer.h"

CV_LAYER_ATTRS(cv_linear_attr, {
    int in_features, out_features;
    int has_bias;                  /* "bias" */
});

extern const cv_layer_class cv_linear_class;

#endif
