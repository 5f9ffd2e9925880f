/* test_kernel_check.c - the kernel oracle of kernel_check.h on the existing
 * layer classes (they pass), and on deliberately broken copies of Linear's
 * and Tanh's kernels (each break is caught, with a message naming the
 * failed check). */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "engine/layer_passthrough.h"
#include "kernel_check.h"
#include "testutil.h"

/* ---- existing classes pass ------------------------------------------------------ */

START_TEST(linear_passes)
{
    cv_layer L;
    cv_shape s = kc_shape(1, 5);
    ck_assert_int_eq(kc_layer(&L, "Linear", 1, &s), 0);
    ck_assert_int_eq(kc_set(&L, "in_features", 5), 0);
    ck_assert_int_eq(kc_set(&L, "out_features", 3), 0);
    KC_ASSERT(&L, NULL);
    ck_assert_int_eq(kc_set(&L, "bias", 0), 0);
    KC_ASSERT(&L, NULL);
}
END_TEST

START_TEST(activations_pass)
{
    static const char *const smooth[] = {"Tanh", "Sigmoid", "GELU", "Softplus", "SiLU"};
    cv_shape s = kc_shape(2, 3, 4);
    cv_layer L;
    for (size_t i = 0; i < sizeof smooth / sizeof smooth[0]; i++) {
        ck_assert_int_eq(kc_layer(&L, smooth[i], 1, &s), 0);
        KC_ASSERT(&L, NULL);
    }
    kc_opts o = kc_defaults();
    o.kinks = 1;
    ck_assert_int_eq(kc_layer(&L, "ReLU", 1, &s), 0);
    KC_ASSERT(&L, &o);
    ck_assert_int_eq(kc_layer(&L, "LeakyReLU", 1, &s), 0);
    KC_ASSERT(&L, &o);
    ck_assert_int_eq(kc_layer(&L, "ELU", 1, &s), 0); /* phi'' jumps at 0 */
    KC_ASSERT(&L, &o);
}
END_TEST

START_TEST(conv_and_norm_pass)
{
    cv_layer L;
    cv_shape s = kc_shape(3, 2, 5, 4);
    ck_assert_int_eq(kc_layer(&L, "Conv2d", 1, &s), 0);
    kc_set(&L, "in_channels", 2);
    kc_set(&L, "out_channels", 3);
    kc_set(&L, "kernel_size", 2);
    kc_set(&L, "padding", 1);
    KC_ASSERT(&L, NULL);
    ck_assert_int_eq(kc_layer(&L, "BatchNorm2d", 1, &s), 0);
    kc_set(&L, "num_features", 2);
    KC_ASSERT(&L, NULL);
    ck_assert_int_eq(kc_layer(&L, "AvgPool2d", 1, &s), 0);
    kc_set(&L, "kernel_size", 2);
    ck_assert_int_eq(kc_set(&L, "no_such_attribute", 1), -1);
    KC_ASSERT(&L, NULL);
    kc_opts o = kc_defaults();
    o.kinks = 1;
    ck_assert_int_eq(kc_layer(&L, "MaxPool2d", 1, &s), 0);
    kc_set(&L, "kernel_size", 2);
    KC_ASSERT(&L, &o);
}
END_TEST

/* ---- broken kernels are caught ------------------------------------------------------ */

typedef enum {
    BREAK_JVP,        /* jvp scaled by 1.01: adjoint identity and differences */
    BREAK_HVP,        /* hvp_extra adds a little too much */
    BREAK_HVP_ASYM,   /* hvp_extra's parameter output off: symmetry / differences */
    BREAK_VJP_OVERRUN,/* vjp writes one float past gx */
    BREAK_PER_SAMPLE, /* per_sample row 0 scaled */
    BREAK_QUAD,       /* quad_extra off */
    BREAK_STACK,      /* jvp ignores the second stacked vector */
    BREAK_HVP_SET,    /* hvp_extra overwrites instead of adding */
    BREAK_INPUT,      /* vjp scribbles on its forward input */
    BREAK_COUNT
} breakage;

static const char *const expect[BREAK_COUNT] = {
    "adjoint", "hvp_extra", "hvp_extra", "wrote past", "per_sample", "quad_extra", "k=2",
    "hvp_extra", "changed input 0",
};

/* the kernels of the class under test: Linear's or Tanh's, one of them broken */
static const cv_layer_ops *base_ops;
static breakage broken;

static void b_jvp(const cv_layer_ctx *c, int k, const float *rx, const float *v, float *ry)
{
    base_ops->jvp(c, k, rx, v, ry);
    size_t len = (size_t)c->n * c->out_numel;
    if (broken == BREAK_JVP)
        for (size_t i = 0; i < len; i++)
            ry[i] *= 1.01f;
    if (broken == BREAK_STACK && k == 2)
        memset(ry + len, 0, sizeof(float) * len);
}

static void b_vjp(const cv_layer_ctx *c, int k, const float *gy, float *gx, float *gt)
{
    base_ops->vjp(c, k, gy, gx, gt);
    if (broken == BREAK_VJP_OVERRUN && gx)
        gx[(size_t)k * c->n * c->in_numel] = 0;
    if (broken == BREAK_INPUT)
        ((float *)c->x)[0] += 1e-3f;
}

static void b_hvp(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                  const float *v, float *gx, float *gt)
{
    if (broken == BREAK_HVP_SET && gx)
        memset(gx, 0, sizeof(float) * (size_t)k * c->n * c->in_numel);
    base_ops->hvp_extra(c, k, gy, rx, v, gx, gt);
    if (broken == BREAK_HVP && gx && rx)
        for (size_t i = 0; i < (size_t)k * c->n * c->in_numel; i++)
            gx[i] += 0.01f * rx[i];
    if (broken == BREAK_HVP_ASYM && gt && rx)
        for (size_t i = 0; i < (size_t)k * c->nparam; i++)
            gt[i] += 0.01f;
}

static void b_per_sample(const cv_layer_ctx *c, const float *gy, float *G)
{
    base_ops->per_sample(c, gy, G);
    if (broken == BREAK_PER_SAMPLE)
        G[0] *= 1.5f;
}

static void b_quad(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                   const float *v, double *q)
{
    base_ops->quad_extra(c, k, gy, rx, v, q);
    if (broken == BREAK_QUAD)
        q[k - 1] += 0.01;
}

/* L (input [4]; Linear 4 -> 3) of a copy cls of class orig whose kernels ops
 * are the wrappers above, broken as b says (BREAK_COUNT: not broken) */
static void wrap_layer(cv_layer *L, const cv_layer_class *orig, breakage b, cv_layer_ops *ops,
                       cv_layer_class *cls)
{
    base_ops = orig->ops;
    broken = b;
    *ops = *orig->ops;
    ops->jvp = b_jvp;
    ops->vjp = b_vjp;
    ops->hvp_extra = b_hvp;
    if (ops->per_sample)
        ops->per_sample = b_per_sample;
    if (ops->quad_extra)
        ops->quad_extra = b_quad;
    *cls = *orig;
    cls->ops = ops;
    cv_layer_init(L, cls);
    L->nin = 1;
    L->in_shapes[0] = kc_shape(1, 4);
    if (orig == &cv_linear_class) {
        kc_set(L, "in_features", 4);
        kc_set(L, "out_features", 3);
    }
}

START_TEST(broken_kernels_are_caught)
{
    int b = _i;
    /* Tanh for the hvp_extra breaks on the input (Linear's hvp in x is zero and
     * its symmetric check involves parameters), Identity for the scribble (no
     * product of it depends on x, so only the final comparison sees it),
     * Linear for the rest */
    const cv_layer_class *orig = b == BREAK_HVP || b == BREAK_HVP_SET ? &cv_tanh_class
                                 : b == BREAK_INPUT                   ? &cv_identity_class
                                                                      : &cv_linear_class;
    cv_layer_ops ops;
    cv_layer_class cls;
    cv_layer L;
    wrap_layer(&L, orig, (breakage)b, &ops, &cls);
    char why[512];
    ck_assert_msg(kc_check(&L, NULL, why, sizeof why) == -1, "breakage %d not caught", b);
    ck_assert_msg(strstr(why, expect[b]) != NULL, "breakage %d: expected '%s' in: %s", b,
                  expect[b], why);
}
END_TEST

/* Unbroken, the same wrapping passes (the wrappers are not the failure). */
START_TEST(wrapped_unbroken_passes)
{
    cv_layer_ops ops;
    cv_layer_class cls;
    cv_layer L;
    wrap_layer(&L, &cv_linear_class, BREAK_COUNT, &ops, &cls);
    KC_ASSERT(&L, NULL);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("kernel_check");
    TCase *t = tcase_create("existing");
    tcase_add_test(t, linear_passes);
    tcase_add_test(t, activations_pass);
    tcase_add_test(t, conv_and_norm_pass);
    suite_add_tcase(s, t);
    t = tcase_create("broken");
    tcase_add_loop_test(t, broken_kernels_are_caught, 0, BREAK_COUNT);
    tcase_add_test(t, wrapped_unbroken_passes);
    suite_add_tcase(s, t);
    return s;
}

int main(void) { return tu_main(suite); }
