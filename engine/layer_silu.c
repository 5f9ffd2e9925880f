/* layer_silu.c - torch.nn.SiLU (swish): phi(x) = x sigmoid(x), an activation
 * on the shared elementwise kernels of layer_activation.h.  With s =
 * sigmoid(x): phi' = s (1 + x (1 - s)), phi'' = s (1 - s) (2 + x (1 - 2 s)). */
#include <math.h>

#include "layer_activation.h"

static inline cv_act_val silu_phi(const cv_layer *L, double x)
{
    double s = x >= 0 ? 1.0 / (1.0 + exp(-x)) : exp(x) / (1.0 + exp(x));
    cv_act_val v = {x * s, s * (1 + x * (1 - s)), s * (1 - s) * (2 + x * (1 - 2 * s))};
    return v;
}

CV_ACTIVATION_FORWARD(silu_forward, silu_phi)

static const cv_activation silu_act = {silu_forward, 0};

static const cv_field silu_fields[] = {CV_FIELD_INPLACE};

const cv_layer_class cv_silu_class = {
    .name = "SiLU",
    CV_FIELDS(silu_fields),
    .ops = &cv_activation_ops,
    .function = "silu",
    .impl = &silu_act,
};
