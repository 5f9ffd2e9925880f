/* layer_conv.h - torch.nn.Conv2d's attributes and the layer classes Conv2d and
 * Conv1d (a height-1 Conv2d: its attributes in the width entries). */
#ifndef CV_LAYER_CONV_H
#define CV_LAYER_CONV_H

#include "layer.h"

CV_LAYER_ATTRS(cv_conv2d_attr, {
    int in_channels, out_channels;
    int kernel[2], stride[2], padding[2], dilation[2]; /* "kernel_size", ... [h, w] */
    int groups;
    int has_bias;                                      /* "bias" */
    /* padding[a] is the top/left padding; the bottom/right padding is
     * padding[a] + pad_extra[a] (pad_extra is 1 where padding="same" meets an
     * even effective kernel, as PyTorch pads; 0 otherwise) */
    int pad_extra[2];
    int padding_keyword; /* 0: numbers; 1 "valid", 2 "same" until checked; after the
                          * check 2 only where "same" is asymmetric (exported so) */
});

extern const cv_layer_class cv_conv2d_class;
extern const cv_layer_class cv_conv1d_class;

#endif
