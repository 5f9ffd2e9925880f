/* layer_convt.h - torch.nn.ConvTranspose2d's attributes and layer class. */
#ifndef CV_LAYER_CONVT_H
#define CV_LAYER_CONVT_H

#include "layer.h"

CV_LAYER_ATTRS(cv_convt2d_attr, {
    int in_channels, out_channels;
    int kernel[2], stride[2], padding[2], output_padding[2]; /* [h, w] */
    int groups;
    int has_bias;                                            /* "bias" */
    int dilation[2];
});

extern const cv_layer_class cv_convt2d_class;

#endif
