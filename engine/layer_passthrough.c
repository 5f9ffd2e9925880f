/* layer_passthrough.c - Identity, Flatten and Dropout (evaluation mode).
 * The memory layout of a sample does not change, so every kernel copies. */
#include "layer.h"

#include <string.h>

static size_t pass_work(const cv_layer_ctx *c, int k) { return 0; }

static int pass_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    memcpy(y, c->x, sizeof(float) * (size_t)c->n * c->in_numel);
    return 0;
}

static void pass_vjp(const cv_layer_ctx *c, int k, const float *gy, float *gx, float *gtheta)
{
    if (gx)
        memcpy(gx, gy, sizeof(float) * (size_t)k * c->n * c->in_numel);
}

static void pass_jvp(const cv_layer_ctx *c, int k, const float *rx, const float *vtheta,
                     float *ry)
{
    size_t len = sizeof(float) * (size_t)k * c->n * c->out_numel;
    if (rx)
        memcpy(ry, rx, len);
    else
        memset(ry, 0, len);
}

static void pass_hvp_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                           const float *vtheta, float *gx_add, float *gtheta_add)
{
}

static void pass_quad_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                            const float *vtheta, double *q)
{
}

static void pass_per_sample(const cv_layer_ctx *c, const float *gy, float *G) {}

const cv_layer_ops cv_passthrough_ops = {pass_work, pass_forward, pass_vjp, pass_jvp,
                                         pass_hvp_extra, pass_per_sample, NULL,
                                         pass_quad_extra, NULL};
