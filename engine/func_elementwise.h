/* func_elementwise.h - the elementwise function classes of the graph form
 * (call_function targets, engine/layer.h's `function`): add, sub, mul, div
 * (two broadcast tensors, or one tensor and a scalar), neg, pow, sqrt,
 * rsqrt (func_arith.c); masked_fill, causal_fill (func_fill.c); get_attr, a
 * learned tensor or constant buffer outside any module (func_get_attr.c).
 * A function class's name is its function name; it has no Sequential form. */
#ifndef CV_FUNC_ELEMENTWISE_H
#define CV_FUNC_ELEMENTWISE_H

#include "layer.h"

/* add, sub, mul, div.  Two inputs: the tensors, broadcast as PyTorch does
 * (scalar and reverse unused).  One input x: x op scalar, or scalar op x
 * when reverse (1 - x, 2 / x). */
CV_LAYER_ATTRS(cv_arith_attr, {
    double scalar;
    int reverse;
});

CV_LAYER_ATTRS(cv_pow_attr, {
    double exponent;
});

/* masked_fill (x, mask: entries where the broadcast mask is nonzero become
 * value) and causal_fill (x [..., T, S]: entries with column j > row i
 * become value, PyTorch's is_causal mask); value may be +-INFINITY. */
CV_LAYER_ATTRS(cv_fill_attr, {
    double value;
});

/* get_attr: one tensor of full shape `shape` (1 to CV_MAX_RANK entries), a
 * parameter, or a buffer when `buffer`.  Per sample it is the tensor without
 * a leading 1 (shape[0] == 1 and rank >= 2), else the whole tensor; forward
 * gives every sample a copy. */
CV_LAYER_ATTRS(cv_get_attr_attr, {
    cv_int_list shape;
    int buffer;
});

extern const cv_layer_class cv_add_class;
extern const cv_layer_class cv_sub_class;
extern const cv_layer_class cv_mul_class;
extern const cv_layer_class cv_div_class;
extern const cv_layer_class cv_neg_class;
extern const cv_layer_class cv_pow_class;
extern const cv_layer_class cv_sqrt_class;
extern const cv_layer_class cv_rsqrt_class;
extern const cv_layer_class cv_masked_fill_class;
extern const cv_layer_class cv_causal_fill_class;
extern const cv_layer_class cv_get_attr_class;

#endif
