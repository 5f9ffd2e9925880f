/* layer_passthrough.h - torch.nn.Identity, Flatten and Dropout (evaluation
 * mode): their attributes and layer classes. */
#ifndef CV_LAYER_PASSTHROUGH_H
#define CV_LAYER_PASSTHROUGH_H

#include "layer.h"

CV_LAYER_ATTRS(cv_flatten_attr, {
    int start_dim, end_dim; /* counting the batch dimension as 0, like PyTorch */
});

CV_LAYER_ATTRS(cv_dropout_attr, {
    double p;
});

extern const cv_layer_class cv_identity_class;
extern const cv_layer_class cv_flatten_class;
extern const cv_layer_class cv_dropout_class;
extern const cv_layer_class cv_contiguous_class; /* function only: x.contiguous() */

#endif
