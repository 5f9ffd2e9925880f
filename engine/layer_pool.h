/* layer_pool.h - torch.nn.MaxPool2d, AvgPool2d, AdaptiveAvgPool2d and their
 * 1-d versions: their attributes (one struct for all) and layer classes. */
#ifndef CV_LAYER_POOL_H
#define CV_LAYER_POOL_H

#include "layer.h"

CV_LAYER_ATTRS(cv_pool2d_attr, {
    int kernel[2], stride[2], padding[2], dilation[2]; /* "kernel_size", ... [h, w] */
    int ceil_mode;
    int count_include_pad;                             /* AvgPool2d */
    int output_size[2];                                /* AdaptiveAvgPool2d */
});

extern const cv_layer_class cv_maxpool2d_class;
extern const cv_layer_class cv_avgpool2d_class;
extern const cv_layer_class cv_adaptiveavgpool2d_class;
/* [C, L] inputs, as [C, 1, L]: the attributes in the width entries */
extern const cv_layer_class cv_maxpool1d_class;
extern const cv_layer_class cv_avgpool1d_class;
extern const cv_layer_class cv_adaptiveavgpool1d_class;

#endif
