/* test_microbatch.c - the micro-batched engine (issue 20): every product,
 * quadratic form, gradient, per-sample quantity, Jacobian product, Gram
 * matrix and loss of a batch split into micro-batches (sizes 1, 7, N, and a
 * memory budget that keeps some micro-batches and recomputes the others)
 * equals the un-split engine's to float32 summation order, on an MLP with
 * ignored targets (the mean's 1/N counts every micro-batch), a CNN with
 * BatchNorm and max pooling, and a residual graph; the plan refuses a budget
 * below its minimum; a plan given beforehand is taken as is; cancel stops between
 * micro-batches. */
#include "testutil.h"

#include "api/arch.h"

#define N_SAMPLES 23

static const char *MLP_IGNORE =
    "{\"input_shape\": [6], \"layers\": ["
    "{\"type\": \"Linear\", \"in_features\": 6, \"out_features\": 5},"
    "{\"type\": \"Tanh\"},"
    "{\"type\": \"Linear\", \"in_features\": 5, \"out_features\": 4}],"
    "\"loss\": {\"type\": \"CrossEntropyLoss\"}}";

static const char *CNN_BN =
    "{\"input_shape\": [2, 6, 6], \"layers\": ["
    "{\"type\": \"Conv2d\", \"in_channels\": 2, \"out_channels\": 3, \"kernel_size\": 3,"
    " \"padding\": 1},"
    "{\"type\": \"BatchNorm2d\", \"num_features\": 3},"
    "{\"type\": \"ReLU\"},"
    "{\"type\": \"MaxPool2d\", \"kernel_size\": 2},"
    "{\"type\": \"Flatten\"},"
    "{\"type\": \"Linear\", \"in_features\": 27, \"out_features\": 3}],"
    "\"loss\": {\"type\": \"MSELoss\"}}";

static const char *RESIDUAL =
    "{\"input_shape\": [6],"
    " \"modules\": {\"fc1\": {\"type\": \"Linear\", \"in_features\": 6, \"out_features\": 6},"
    "               \"act\": {\"type\": \"Tanh\"},"
    "               \"fc2\": {\"type\": \"Linear\", \"in_features\": 6, \"out_features\": 3}},"
    " \"nodes\": [{\"name\": \"x\", \"op\": \"placeholder\"},"
    "  {\"name\": \"fc1\", \"op\": \"call_module\", \"target\": \"fc1\", \"args\": [\"x\"]},"
    "  {\"name\": \"act\", \"op\": \"call_module\", \"target\": \"act\", \"args\": [\"fc1\"]},"
    "  {\"name\": \"res\", \"op\": \"call_function\", \"target\": \"add\", \"args\": [\"act\", \"x\"]},"
    "  {\"name\": \"fc2\", \"op\": \"call_module\", \"target\": \"fc2\", \"args\": [\"res\"]},"
    "  {\"name\": \"output\", \"op\": \"output\", \"args\": [\"fc2\"]}],"
    " \"loss\": {\"type\": \"CrossEntropyLoss\", \"reduction\": \"sum\"}}";

/* Wide activations: a kept cotangent shows against the budget. */
static const char *WIDE =
    "{\"input_shape\": [6], \"layers\": ["
    "{\"type\": \"Linear\", \"in_features\": 6, \"out_features\": 3000},"
    "{\"type\": \"Tanh\"},"
    "{\"type\": \"Linear\", \"in_features\": 3000, \"out_features\": 4}],"
    "\"loss\": {\"type\": \"CrossEntropyLoss\"}}";

static const char *const DOCS[] = {"mlp_ignore", "cnn_bn", "residual", "wide"};

/* The model of variant v with random parameters, buffers and data. */
static void build(int v, cv_model *m, cv_dataset *d)
{
    const char *json = v == 0 ? MLP_IGNORE : v == 1 ? CNN_BN : v == 2 ? RESIDUAL : WIDE;
    cv_err e;
    memset(m, 0, sizeof *m);
    ck_assert_msg(cv_arch_parse(json, strlen(json), m, &e) == 0, "parse: %s", e.message);
    ck_assert_int_eq(cv_model_alloc(m), 0);
    cv_rng r;
    cv_rng_seed(&r, 11 + (uint64_t)v);
    for (size_t q = 0; q < m->nparams_total; q++)
        m->params[q] = (float)(0.8 * (2 * cv_rng_uniform(&r) - 1));
    for (size_t q = 0; q < m->nbuffers_total; q++)
        m->buffers[q] = (float)(0.5 + cv_rng_uniform(&r));
    tu_data(d, m, N_SAMPLES, 40 + (uint64_t)v);
    if (v == 0) /* ignored targets spread over the micro-batches */
        for (size_t i = 2; i < N_SAMPLES; i += 5)
            d->labels[i] = -100;
}

static cv_curv *engine(const cv_model *m, const cv_dataset *d, size_t mb, size_t budget,
                       cv_curvature kind, int pairs)
{
    cv_curv_options o = {.mc_samples = 2, .seed = 9, .micro_batch = mb, .memory_budget = budget,
                         .max_vectors = 3, .kind = kind, .pairs = pairs};
    cv_err e;
    cv_curv *c = cv_curv_new(m, d, &o, &e);
    ck_assert_msg(c != NULL, "cv_curv_new (micro_batch %zu, budget %zu): %s", mb, budget,
                  e.message);
    return c;
}

static void near(const double *a, const double *b, size_t n, double tol, const char *what,
                 const char *tag)
{
    double r = tu_relerr(a, b, n, 1e-12);
    ck_assert_msg(r <= tol, "%s %s: relative difference %.3g", tag, what, r);
}

static void near_f(const float *a, const float *b, size_t n, const char *what, const char *tag)
{
    double *x = malloc(sizeof(double) * n), *y = malloc(sizeof(double) * n);
    for (size_t i = 0; i < n; i++) {
        x[i] = a[i];
        y[i] = b[i];
    }
    near(x, y, n, 2e-5, what, tag);
    free(x);
    free(y);
}

/* Every quantity of c against the un-split reference ref. */
static void compare(cv_curv *c, cv_curv *ref, const cv_model *m, const char *tag)
{
    cv_block b;
    cv_block_full(m, &b);
    size_t D = b.dim, N = N_SAMPLES, C = (size_t)cv_model_output_dim(m);
    int k = 3;
    cv_err e;
    ck_assert_msg(fabs(cv_curv_loss(c) - cv_curv_loss(ref)) <= 1e-6 * fabs(cv_curv_loss(ref)),
                  "%s loss %.9g vs %.9g", tag, cv_curv_loss(c), cv_curv_loss(ref));
    near_f(cv_curv_outputs(c), cv_curv_outputs(ref), N * C, "outputs", tag);
    double *X = malloc(sizeof(double) * D * k), *Y1 = malloc(sizeof(double) * D * k),
           *Y2 = malloc(sizeof(double) * D * k), q1[3], q2[3];
    cv_rng r;
    cv_rng_seed(&r, 3);
    cv_rng_gaussian(&r, X, D * k);
    ck_assert(cv_curv_gradient(c, &b, Y1, &e) == 0 && cv_curv_gradient(ref, &b, Y2, &e) == 0);
    near(Y1, Y2, D, 2e-5, "gradient", tag);
    for (int kind = 0; kind < CV_CURV_EXACT_COUNT; kind++) {
        ck_assert_msg(cv_curv_matvec(c, kind, &b, k, X, Y1, &e) == 0, "%s", e.message);
        ck_assert(cv_curv_matvec(ref, kind, &b, k, X, Y2, &e) == 0);
        near(Y1, Y2, D * k, 2e-5, cv_curvature_name(kind), tag);
        ck_assert(cv_curv_quadform(c, kind, &b, k, X, q1, &e) == 0);
        ck_assert(cv_curv_quadform(ref, kind, &b, k, X, q2, &e) == 0);
        near(q1, q2, (size_t)k, 2e-5, "quadratic forms", tag);
    }
    double *G1 = malloc(sizeof(double) * N * D), *G2 = malloc(sizeof(double) * N * D);
    ck_assert(cv_curv_per_sample_gradients(c, &b, G1, &e) == 0);
    ck_assert(cv_curv_per_sample_gradients(ref, &b, G2, &e) == 0);
    near(G1, G2, N * D, 2e-5, "per-sample gradients", tag);
    float *J1 = malloc(sizeof(float) * k * N * C), *J2 = malloc(sizeof(float) * k * N * C);
    ck_assert(cv_curv_jvp(c, &b, k, X, J1, &e) == 0 && cv_curv_jvp(ref, &b, k, X, J2, &e) == 0);
    near_f(J1, J2, (size_t)k * N * C, "jvp", tag);
    ck_assert(cv_curv_vjp(c, &b, k, J2, Y1, &e) == 0 && cv_curv_vjp(ref, &b, k, J2, Y2, &e) == 0);
    near(Y1, Y2, D * k, 2e-5, "vjp", tag);
    size_t R = 2 * N;
    double *M1 = malloc(sizeof(double) * R * R), *M2 = malloc(sizeof(double) * R * R);
    ck_assert_msg(cv_curv_gram(c, &b, 2, J2, M1, &e) == 0, "%s gram: %s", tag, e.message);
    ck_assert(cv_curv_gram(ref, &b, 2, J2, M2, &e) == 0);
    near(M1, M2, R * R, 5e-5, "Gram matrix", tag);
    double l1, l2;
    for (size_t i = 0; i < D; i++)
        X[i] *= 1e-2;
    ck_assert(cv_curv_loss_at(c, &b, X, &l1, &e) == 0 && cv_curv_loss_at(ref, &b, X, &l2, &e) == 0);
    ck_assert_msg(fabs(l1 - l2) <= 1e-6 * fabs(l2), "%s loss at a step %.9g vs %.9g", tag, l1, l2);
    free(X), free(Y1), free(Y2), free(G1), free(G2), free(J1), free(J2), free(M1), free(M2);
}

START_TEST(micro_batch_sizes_agree)
{
    cv_model m;
    cv_dataset d;
    build(_i, &m, &d);
    cv_curv *ref = engine(&m, &d, 0, 0, CV_CURV_HESSIAN, 0);
    const size_t sizes[] = {1, 7, N_SAMPLES, 100};
    for (int s = 0; s < 4; s++) {
        char tag[64];
        snprintf(tag, sizeof tag, "%s micro_batch %zu", DOCS[_i], sizes[s]);
        cv_curv *c = engine(&m, &d, sizes[s], 0, CV_CURV_HESSIAN, 0);
        cv_curv_plan p;
        cv_curv_memory(c, &p);
        size_t mb = sizes[s] < N_SAMPLES ? sizes[s] : N_SAMPLES;
        ck_assert_uint_eq(p.micro_batch, mb);
        ck_assert_uint_eq(p.micro_batches, (N_SAMPLES + mb - 1) / mb);
        ck_assert_uint_eq(p.cached, p.micro_batches); /* no budget: all kept */
        compare(c, ref, &m, tag);
        cv_curv_free(c);
    }
    cv_curv_free(ref);
    cv_model_free(&m);
    tu_data_free(&d);
}
END_TEST

/* A budget that keeps some micro-batches of 5 and recomputes the others. */
START_TEST(recomputed_micro_batches_agree)
{
    cv_model m;
    cv_dataset d;
    build(_i, &m, &d);
    cv_curv_options o = {.mc_samples = 2, .seed = 9, .micro_batch = 5, .max_vectors = 3,
                         .kind = CV_CURV_HESSIAN, .pairs = 1};
    cv_curv_plan p;
    cv_err e;
    ck_assert_msg(cv_curv_plan_memory(&m, &d, &o, &p, &e) == 0, "%s", e.message);
    size_t part = p.state_fixed + 5 * p.state_per_sample;
    size_t budget = p.minimum_bytes + 2 * part + part / 2;
    cv_curv *ref = engine(&m, &d, 0, 0, CV_CURV_HESSIAN, 1);
    cv_curv *c = engine(&m, &d, 5, budget, CV_CURV_HESSIAN, 1);
    cv_curv_memory(c, &p);
    ck_assert_uint_eq(p.micro_batches, 5);
    ck_assert_msg(p.cached == 2, "%s: %zu of 5 micro-batches kept at %zu bytes", DOCS[_i],
                  p.cached, budget);
    char tag[64];
    snprintf(tag, sizeof tag, "%s recomputed", DOCS[_i]);
    compare(c, ref, &m, tag);
    cv_curv_memory(c, &p);
    ck_assert_msg(p.peak_bytes > 0 && p.peak_bytes <= budget,
                  "%s: peak %zu bytes accounted, budget %zu", DOCS[_i], p.peak_bytes, budget);
    cv_curv_free(c);
    cv_curv_free(ref);
    cv_model_free(&m);
    tu_data_free(&d);
}
END_TEST

/* A curvature without the loss's cotangents (GGN) planned at a tight budget:
 * the gradient's cotangents are not kept, a product of more vectors than
 * one chunk (40 > 32) is handed from micro-batch to micro-batch, and the
 * engine stays within the budget. */
START_TEST(ggn_gradient_and_chunks_within_budget)
{
    cv_model m;
    cv_dataset d;
    build(_i, &m, &d);
    int k = 40;
    cv_curv_options o = {.mc_samples = 1, .micro_batch = 5, .max_vectors = k,
                         .kind = CV_CURV_GGN};
    cv_curv_plan p;
    cv_err e;
    ck_assert(cv_curv_plan_memory(&m, &d, &o, &p, &e) == 0);
    size_t part = p.state_fixed + 5 * p.state_per_sample;
    size_t budget = p.minimum_bytes + 2 * part + part / 4;
    cv_curv *ref = engine(&m, &d, 0, 0, CV_CURV_GGN, 0);
    o.memory_budget = budget;
    cv_curv *c = cv_curv_new(&m, &d, &o, &e);
    ck_assert_msg(c != NULL, "%s", e.message);
    cv_block b;
    cv_block_full(&m, &b);
    size_t D = b.dim;
    double *X = malloc(sizeof(double) * D * k), *Y1 = malloc(sizeof(double) * D * k),
           *Y2 = malloc(sizeof(double) * D * k);
    cv_rng r;
    cv_rng_seed(&r, 8);
    cv_rng_gaussian(&r, X, D * k);
    ck_assert(cv_curv_gradient(c, &b, Y1, &e) == 0 && cv_curv_gradient(ref, &b, Y2, &e) == 0);
    near(Y1, Y2, D, 2e-5, "gradient", DOCS[_i]);
    ck_assert(cv_curv_matvec(c, CV_CURV_GGN, &b, k, X, Y1, &e) == 0);
    ck_assert(cv_curv_matvec(ref, CV_CURV_GGN, &b, k, X, Y2, &e) == 0);
    near(Y1, Y2, D * k, 2e-5, "40 GGN products", DOCS[_i]);
    cv_curv_memory(c, &p);
    ck_assert_msg(p.cached >= 1 && p.cached < p.micro_batches, "%zu of %zu kept", p.cached,
                  p.micro_batches);
    ck_assert_msg(p.peak_bytes <= budget, "%s: peak %zu bytes accounted, budget %zu",
                  DOCS[_i], p.peak_bytes, budget);
    free(X), free(Y1), free(Y2);
    cv_curv_free(c);
    cv_curv_free(ref);
    cv_model_free(&m);
    tu_data_free(&d);
}
END_TEST

/* Without a forced size the budget picks one: all kept when it is large,
 * smaller micro-batches as it shrinks, refused below the minimum. */
START_TEST(budget_chooses_and_refuses)
{
    cv_model m;
    cv_dataset d;
    build(1, &m, &d);
    cv_curv_options o = {.mc_samples = 1, .max_vectors = 1, .kind = CV_CURV_HESSIAN,
                         .vector_bytes = 1000};
    cv_curv_plan p;
    cv_err e;
    o.memory_budget = (size_t)1 << 30;
    ck_assert(cv_curv_plan_memory(&m, &d, &o, &p, &e) == 0);
    ck_assert_uint_eq(p.micro_batches, 1);
    ck_assert_uint_eq(p.cached, 1);
    size_t least = p.minimum_bytes;
    o.memory_budget = least + 3 * p.state_per_sample;
    ck_assert(cv_curv_plan_memory(&m, &d, &o, &p, &e) == 0);
    ck_assert_msg(p.micro_batches > 1 && p.cached < p.micro_batches,
                  "%zu micro-batches of %zu, %zu kept", p.micro_batches, p.micro_batch, p.cached);
    ck_assert_msg(p.planned_bytes <= o.memory_budget, "planned %zu of %zu", p.planned_bytes,
                  o.memory_budget);
    o.memory_budget = least / 2; /* (the probe's heap sizes vary by a few bytes) */
    ck_assert_int_eq(cv_curv_plan_memory(&m, &d, &o, &p, &e), -1);
    ck_assert_str_eq(e.code, "job_memory");
    ck_assert_msg(strstr(e.message, "at least") != NULL, "%s", e.message);
    ck_assert_ptr_null(cv_curv_new(&m, &d, &o, &e));
    ck_assert_str_eq(e.code, "job_memory");
    cv_model_free(&m);
    tu_data_free(&d);
}
END_TEST

/* A plan made beforehand (the job's memory check, cv_curv_options.plan) is taken
 * as is: the engine splits as that plan says even where its own budget would
 * choose otherwise, gives equal results, and does not pass the plan on; a plan
 * that does not split this batch is ignored (the engine plans itself). */
START_TEST(given_plan_is_taken)
{
    cv_model m;
    cv_dataset d;
    build(1, &m, &d);
    cv_curv_options o = {.mc_samples = 2, .seed = 9, .micro_batch = 5, .max_vectors = 3,
                         .kind = CV_CURV_HESSIAN, .pairs = 1};
    cv_curv_plan p, q;
    cv_err e;
    ck_assert_msg(cv_curv_plan_memory(&m, &d, &o, &p, &e) == 0, "%s", e.message);
    size_t part = p.state_fixed + 5 * p.state_per_sample;
    o.memory_budget = p.minimum_bytes + 2 * part + part / 2;
    ck_assert(cv_curv_plan_memory(&m, &d, &o, &p, &e) == 0);
    ck_assert_uint_eq(p.micro_batches, 5);
    ck_assert_uint_eq(p.cached, 2);
    /* the same plan under an ample budget with no micro_batch: one kept micro-batch if
     * the engine planned itself */
    o.micro_batch = 0;
    o.memory_budget = (size_t)1 << 30;
    o.plan = &p;
    cv_curv *c = cv_curv_new(&m, &d, &o, &e);
    ck_assert_msg(c != NULL, "%s", e.message);
    cv_curv_memory(c, &q);
    ck_assert_uint_eq(q.micro_batch, p.micro_batch);
    ck_assert_uint_eq(q.micro_batches, 5);
    ck_assert_uint_eq(q.cached, 2);
    ck_assert_ptr_null(cv_curv_get_options(c)->plan);
    cv_curv *ref = engine(&m, &d, 0, 0, CV_CURV_HESSIAN, 1);
    compare(c, ref, &m, "given plan");
    cv_curv_free(c);
    /* a plan for another batch size: ignored */
    cv_curv_plan other = p;
    other.micro_batches = 2;
    o.plan = &other;
    c = cv_curv_new(&m, &d, &o, &e);
    ck_assert_msg(c != NULL, "%s", e.message);
    cv_curv_memory(c, &q);
    ck_assert_uint_eq(q.micro_batches, 1);
    ck_assert_uint_eq(q.cached, 1);
    cv_curv_free(c);
    cv_curv_free(ref);
    cv_model_free(&m);
    tu_data_free(&d);
}
END_TEST

/* A set cancel flag stops a product between micro-batches; progress names
 * the micro-batches of the product. */
START_TEST(cancel_between_micro_batches)
{
    cv_model m;
    cv_dataset d;
    build(0, &m, &d);
    cv_progress pr;
    cv_progress_init(&pr);
    atomic_int cancel = 0;
    pr.cancel = &cancel;
    cv_curv_options o = {.mc_samples = 1, .micro_batch = 4, .kind = CV_CURV_GGN,
                         .progress = &pr};
    cv_err e;
    cv_curv *c = cv_curv_new(&m, &d, &o, &e);
    ck_assert_ptr_nonnull(c);
    ck_assert_int_eq(atomic_load(&pr.micro_total), 6);
    ck_assert_int_eq(atomic_load(&pr.micro_done), 6);
    cv_block b;
    cv_block_full(&m, &b);
    double *X = calloc(b.dim, sizeof(double)), *Y = calloc(b.dim, sizeof(double));
    atomic_store(&cancel, 1);
    ck_assert_int_eq(cv_curv_matvec(c, CV_CURV_GGN, &b, 1, X, Y, &e), -1);
    ck_assert_int_eq(e.status, CV_ECANCELLED);
    free(X);
    free(Y);
    cv_curv_free(c);
    cv_model_free(&m);
    tu_data_free(&d);
}
END_TEST

static Suite *microbatch_suite(void)
{
    Suite *s = suite_create("microbatch");
    TCase *t = tcase_create("agree");
    tcase_add_loop_test(t, micro_batch_sizes_agree, 0, 3);
    tcase_add_loop_test(t, recomputed_micro_batches_agree, 0, 3);
    tcase_add_loop_test(t, ggn_gradient_and_chunks_within_budget, 0, 4);
    suite_add_tcase(s, t);
    TCase *p = tcase_create("plan");
    tcase_add_test(p, budget_chooses_and_refuses);
    tcase_add_test(p, given_plan_is_taken);
    tcase_add_test(p, cancel_between_micro_batches);
    suite_add_tcase(s, p);
    return s;
}

int main(void) { return tu_main(microbatch_suite); }
