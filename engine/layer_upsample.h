/* layer_upsample.h - torch.nn.Upsample (mode "nearest")'s attributes and
 * layer class. */
#ifndef CV_LAYER_UPSAMPLE_H
#define CV_LAYER_UPSAMPLE_H

#include "layer.h"

CV_LAYER_ATTRS(cv_upsample_attr, {
    int size[2];         /* [h, w] ([C, L] inputs: both the length); 0: None */
    double scale_factor; /* 0: None; given with size, the two must agree */
});

extern const cv_layer_class cv_upsample_class;

#endif
