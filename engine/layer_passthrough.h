/* layer_passthrough.h - torch.nn.Identity, Flatten and Dropout (evaluation
 * mode): their attributes and layer classes, and the copying and no-op
 * kernels other parameterless classes reuse. */
#ifndef CV_LAYER_PASSTHROUGH_H
#define CV_LAYER_PASSTHROUGH_H

#include "layer.h"

CV_LAYER_ATTRS(cv_flatten_attr, {
    int start_dim, end_dim; /* counting the batch dimension as 0, like PyTorch */
});

CV_LAYER_ATTRS(cv_dropout_attr, {
    double p;
});

/* The kernels of a sample that is copied unchanged (also for the function
 * classes that only change the shape: reshape, flatten): no parameters, no
 * second-order terms. */
extern const cv_layer_ops cv_passthrough_ops;

/* Its kernels that do nothing, for other parameterless linear classes: no
 * work buffer, no second-order terms (hvp_extra, quad_extra), no parameters
 * (per_sample). */
size_t cv_no_work(const cv_layer_ctx *c, int k);
void cv_no_hvp_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                     const float *vtheta, float *gx_add, float *gtheta_add);
void cv_no_quad_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                      const float *vtheta, double *q);
void cv_no_per_sample(const cv_layer_ctx *c, const float *gy, float *G);

extern const cv_layer_class cv_identity_class;
extern const cv_layer_class cv_flatten_class;
extern const cv_layer_class cv_dropout_class;
extern const cv_layer_class cv_contiguous_class; /* function only: x.contiguous() */

#endif
