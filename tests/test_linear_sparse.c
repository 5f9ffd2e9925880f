/* test_linear_sparse.c - the row-group kernel of a Linear layer's input
 * cotangents (engine/linear_sparse.h) against sgemm: k blocks of n rows
 * whose groups share zeros (about half the units off, as after a ReLU, plus
 * zeros of single rows), k from 4 to 24 (register tiles of 12 and their
 * remainders), inputs that are not a multiple of 32 (masked tiles), one
 * thread and two; and when it declines (dense rows, k < 4, no AVX-512). */
#include <cblas.h>
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/linear_sparse.h"
#include "engine/rng.h"
#include "testutil.h"

void openblas_set_num_threads(int);

/* k*n x out cotangents: unit q of group r is on with probability `on`, and
 * an on unit's entry in a row is 0 with probability 1/4 (the group's union
 * stays on). */
static float *cotangents(int k, int n, int out, double on, uint64_t seed)
{
    float *gy = calloc((size_t)k * n * out, sizeof(float));
    cv_rng rng;
    cv_rng_seed(&rng, seed);
    for (int r = 0; r < n; r++)
        for (int q = 0; q < out; q++) {
            if (cv_rng_uniform(&rng) >= on)
                continue;
            for (int j = 0; j < k; j++)
                if (j == 0 || cv_rng_uniform(&rng) >= 0.25)
                    gy[((size_t)j * n + r) * out + q] = (float)cv_rng_normal(&rng);
        }
    return gy;
}

/* Whether the kernel can run: an AVX-512 CPU, in a build that has it. */
static int has_avx512(void)
{
#if defined(__x86_64__) && defined(__GNUC__) && !defined(CV_LSPARSE_PORTABLE)
    return __builtin_cpu_supports("avx512f") != 0;
#else
    return 0;
#endif
}

static const int cases[][4] = {/* k, n, out, in */
                               {9, 37, 100, 37},  {4, 5, 64, 16},   {12, 20, 64, 64},
                               {13, 17, 128, 100}, {24, 33, 96, 200}, {9, 1, 512, 512}};

START_TEST(kernel_is_sgemm)
{
    int k = cases[_i][0], n = cases[_i][1], out = cases[_i][2], in = cases[_i][3];
    float *gy = cotangents(k, n, out, 0.5, 11 + (uint64_t)_i);
    float *W = malloc(sizeof(float) * out * in), *ref = malloc(sizeof(float) * k * n * in),
          *got = malloc(sizeof(float) * k * n * in);
    cv_rng rng;
    cv_rng_seed(&rng, 5);
    for (int i = 0; i < out * in; i++)
        W[i] = (float)cv_rng_normal(&rng);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, k * n, in, out, 1.0f, gy, out, W, in,
                0.0f, ref, in);
    ck_assert_int_eq(cv_lsparse_worth(k, n, out, gy), has_avx512());
    for (int threads = 1; threads <= 2; threads++) {
        openblas_set_num_threads(threads);
        memset(got, 0xff, sizeof(float) * k * n * in); /* NaN: every entry must be written */
        cv_lsparse_vjp(k, n, out, in, gy, W, got);
        double err = 0, top = 0;
        for (size_t i = 0; i < (size_t)k * n * in; i++) {
            err = fmax(err, fabs((double)got[i] - ref[i]));
            top = fmax(top, fabs((double)ref[i]));
            ck_assert_msg(isfinite(got[i]), "entry %zu not written", i);
        }
        ck_assert_msg(top > 0 && err <= 1e-5 * top, "k %d n %d out %d in %d threads %d: err %g of %g",
                      k, n, out, in, threads, err, top);
    }
    free(gy), free(W), free(ref), free(got);
}
END_TEST

START_TEST(declines_dense_rows_and_few_vectors)
{
    float *dense = cotangents(9, 40, 128, 1.0, 3), *sparse = cotangents(3, 40, 128, 0.5, 4);
    ck_assert_int_eq(cv_lsparse_worth(9, 40, 128, dense), 0);
    ck_assert_int_eq(cv_lsparse_worth(3, 40, 128, sparse), 0); /* k < CV_LSPARSE_MIN_K */
    free(dense), free(sparse);
    float *few = cotangents(9, 40, 32, 0.5, 6); /* out < 64 */
    ck_assert_int_eq(cv_lsparse_worth(9, 40, 32, few), 0);
    free(few);
}
END_TEST

static Suite *lsparse_suite(void)
{
    Suite *s = suite_create("linear_sparse");
    TCase *tc = tcase_create("core");
    tcase_add_loop_test(tc, kernel_is_sgemm, 0, (int)(sizeof cases / sizeof cases[0]));
    tcase_add_test(tc, declines_dense_rows_and_few_vectors);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_main(lsparse_suite); }
