/* layer_batchnorm.h - torch.nn.BatchNorm1d / BatchNorm2d (evaluation mode):
 * their attributes (one struct for both) and layer classes. */
#ifndef CV_LAYER_BATCHNORM_H
#define CV_LAYER_BATCHNORM_H

#include "layer.h"

CV_LAYER_ATTRS(cv_batchnorm_attr, {
    int num_features;
    double eps;
    int affine;
    int track_running_stats; /* always 1: evaluation mode needs the statistics */
});

extern const cv_layer_class cv_batch_norm_fn_class;
extern const cv_layer_class cv_batchnorm1d_class;
extern const cv_layer_class cv_batchnorm2d_class;

#endif
