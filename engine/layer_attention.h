/* layer_attention.h - attention as the graph form spells it.
 *
 * torch.nn.MultiheadAttention and F.scaled_dot_product_attention are
 * composite: the architecture parser (api/arch_graph.c) expands each call
 * into primitive nodes (linear, narrow, reshape, permute, matmul, softmax,
 * causal_fill, add), so every curvature product is the composition of exact
 * primitive kernels.  The two classes below only carry and check the
 * attributes (they have no kernels); attn_scale is the one primitive they add:
 * y = s x with s the `scale` attribute, or 1/sqrt(E) for E the last
 * dimension of x (PyTorch's default softmax scale, applied to the query).
 */
#ifndef CV_LAYER_ATTENTION_H
#define CV_LAYER_ATTENTION_H

#include "layer.h"

CV_LAYER_ATTRS(cv_mha_attr, {
    int embed_dim, num_heads;
    double dropout;
    int bias, batch_first;
    int call_causal;  /* not an attribute: the graph call's is_causal (export) */
});

CV_LAYER_ATTRS(cv_sdpa_attr, {
    int is_causal;
    double scale;     /* NaN: 1/sqrt(E) */
    double dropout_p;
});

CV_LAYER_ATTRS(cv_attn_scale_attr, {
    double scale;     /* NaN: 1/sqrt(last dimension of the input) */
    double s;         /* the factor in use, set by infer */
});

extern const cv_layer_class cv_mha_class, cv_sdpa_class, cv_attn_scale_class;

#endif
