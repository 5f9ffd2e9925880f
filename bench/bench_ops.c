/* bench_ops.c - times curvd's engine on one model and batch, in process.
 *
 *   bench_ops --arch A.json --params P.safetensors --data D.safetensors
 *             [--threads T] [--reps R] [--only op,op] [--block B] [--cpu-time]
 *   bench_ops --sgemm [--threads T]      measured sgemm peak (GFLOP/s)
 *
 * Prints one JSON object: seconds per op (best of R), matvecs, and the
 * FLOP count of the dense-layer work for the GEMM-bound products.
 * Ops: gradient (forward + backward, as a training step does), hvp, ggnvp
 * (one vector, forward cached), hvp16/ggnvp16 (16 vectors at once, per
 * vector), trace (Hutchinson, 100 probes), eigen5 (Lanczos top-5), eigen10
 * (10 Lanczos steps for the top eigenvalue, tol 0: hessian_max_eigenvalue's
 * work; against 10 x hvp it gives Lanczos' own per-step cost), power5
 * (PyHessian-style power iteration, top-5), density (SLQ, 100 steps).
 * diagggn, diagef, diaghessian: the exact GGN / empirical Fisher / Hessian
 * diagonal by backpropagation (engine/diag_exact.h; forward pass included, as
 * gradient's).
 * instr_fo, instr_all: op "instruments" as a job on the whole batch (cv_job_run, no
 * memory budget): instr_fo the first-order instruments (loss, gradient_norm,
 * batch_gradient_norms, gradient_histogram, the three tests, mean_gsnr),
 * instr_nh the same without gradient_histogram (it bins all N x D entries),
 * instr_tl the first-order ones with hessian_trace (10 probes) and
 * hessian_max_eigenvalue (10 Lanczos steps), instr_all every single-version instrument (hessian_trace and tic_* from 10
 * probes, hessian_max_eigenvalue from 10 Lanczos steps); issue 24's speed
 * targets are instr_fo <= 2x gradient and instr_tl <= 25x.
 * kfac_t2, kfac_emp: op kfac's factors (fisher_type type-2 / empirical, eigenvalues
 * false) as `curvd run` runs the job (its memory check's probe included; issue 22
 * item 4); --cpu-time: timed in process CPU time (load-robust at --threads 1).
 * --block B: probes per product in trace (default: the engine's choice).
 */
#include <cblas.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "api/arch.h"
#include "api/job.h"
#include "api/datafile.h"
#include "api/params.h"
#include "engine/curv.h"
#include "engine/diag_exact.h"
#include "engine/estimators.h"
#include "engine/layer_conv.h"
#include "engine/layer_linear.h"
#include "server/util.h"

void openblas_set_num_threads(int);

typedef struct {
    const char *arch, *params, *data, *only;
    int threads, reps, sgemm, block, cpu;
} bench_args;

static double best_of(int reps, double (*fn)(void *), void *ctx)
{
    double best = 1e300;
    for (int r = 0; r < reps; r++) {
        double t = fn(ctx);
        if (t < best)
            best = t;
    }
    return best;
}

typedef struct {
    const cv_model *m;
    const cv_dataset *d;
    cv_curv *c;
    cv_block full;
    cv_curvature kind;
    int k;
    double *X, *Y;
    long matvecs, reorths;
    const char *which;
    int block; /* trace: probes per product, 0 = the engine's default */
    int cpu;   /* kfac_*: the process's CPU time instead of the wall clock */
} op_ctx;

static void die(const cv_err *e)
{
    fprintf(stderr, "bench_ops: %s (%s)\n", e->message, e->field);
    exit(1);
}

static double t_gradient(void *p)
{
    op_ctx *o = p;
    cv_err e;
    double t0 = cv_now_s();
    cv_curv *c = cv_curv_new(o->m, o->d, NULL, &e);
    if (!c || cv_curv_gradient(c, &o->full, o->Y, &e))
        die(&e);
    double t = cv_now_s() - t0;
    cv_curv_free(c);
    return t;
}

/* The instruments job o->which ("instr_fo" or "instr_all") on the whole batch. */
static double t_instruments(void *p)
{
    op_ctx *o = p;
    const char *doc1 =
        "{\"op\":\"instruments\",\"seed\":1,\"options\":{\"include\":[\"loss\","
        "\"gradient_norm\",\"batch_gradient_norms\",\"gradient_histogram\",\"norm_test\","
        "\"inner_product_test\",\"orthogonality_test\",\"mean_gsnr\"]}}";
    const char *doc = "{\"op\":\"instruments\",\"seed\":1,\"options\":{\"probes\":10,"
                      "\"lanczos_steps\":10}}";
    const char *doc_nh =
        "{\"op\":\"instruments\",\"seed\":1,\"options\":{\"include\":[\"loss\","
        "\"gradient_norm\",\"batch_gradient_norms\",\"norm_test\","
        "\"inner_product_test\",\"orthogonality_test\",\"mean_gsnr\"]}}";
    const char *doc_tl =
        "{\"op\":\"instruments\",\"seed\":1,\"options\":{\"probes\":10,"
        "\"lanczos_steps\":10,\"exclude\":[\"tic_trace\",\"tic_diag\"]}}";
    cJSON *j = cJSON_Parse(strcmp(o->which, "instr_fo") == 0   ? doc1
                           : strcmp(o->which, "instr_nh") == 0 ? doc_nh
                           : strcmp(o->which, "instr_tl") == 0 ? doc_tl
                                                               : doc);
    cv_job_limits lim;
    cv_job_limits_default(&lim);
    lim.job_memory = 0;
    cv_err e;
    double t0 = cv_now_s();
    cJSON *res = cv_job_run(j, o->m, o->d, &lim, NULL, &e);
    double t = cv_now_s() - t0;
    if (!res)
        die(&e);
    cJSON_Delete(res);
    cJSON_Delete(j);
    return t;
}

static double cpu_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* The factors-only kfac job o->which ("kfac_t2", "kfac_emp": fisher_type type-2 or
 * empirical, eigenvalues false, return_factors false) as `curvd run` runs it: bound,
 * its memory checked under curvd run's default limits (2 GiB: the plan's probe),
 * executed with that plan; timed whole (wall clock, or CPU time with --cpu-time). */
static double t_kfac(void *p)
{
    op_ctx *o = p;
    char doc[160];
    snprintf(doc, sizeof doc,
             "{\"op\":\"kfac\",\"options\":{\"fisher_type\":\"%s\","
             "\"return_factors\":false,\"eigenvalues\":false}}",
             strcmp(o->which, "kfac_t2") == 0 ? "type-2" : "empirical");
    cJSON *j = cJSON_Parse(doc);
    cv_job_limits lim;
    cv_job_limits_default(&lim);
    cv_err e;
    cv_curv_plan plan;
    double t0 = o->cpu ? cpu_now() : cv_now_s();
    cv_job_spec *s = cv_job_parse(j, &e);
    cJSON *res = s && !cv_job_bind(s, o->m, o->d, &e) &&
                         !cv_job_check_memory(s, o->m, o->d, &lim, &plan, &e)
                     ? cv_job_exec_planned(s, o->m, o->d, &lim, &plan, NULL, NULL, &e)
                     : NULL;
    double t = (o->cpu ? cpu_now() : cv_now_s()) - t0;
    if (!res)
        die(&e);
    cJSON_Delete(res);
    cv_job_spec_free(s);
    cJSON_Delete(j);
    return t;
}

static double t_diag(void *p)
{
    op_ctx *o = p;
    cv_err e;
    double t0 = cv_now_s();
    cv_curv *c = cv_curv_new(o->m, o->d, NULL, &e);
    if (!c || cv_curv_diag_backprop(c, o->kind, &o->full, 0, o->Y, &e))
        die(&e);
    double t = cv_now_s() - t0;
    cv_curv_free(c);
    return t;
}

static double t_matvec(void *p)
{
    op_ctx *o = p;
    cv_err e;
    double t0 = cv_now_s();
    if (cv_curv_matvec(o->c, o->kind, &o->full, o->k, o->X, o->Y, &e))
        die(&e);
    return (cv_now_s() - t0) / o->k;
}

static double t_estimator(void *p)
{
    op_ctx *o = p;
    cv_err e;
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_progress prog;
    cv_progress_init(&prog);
    cv_curv_linop(&op, &lc, o->c, CV_CURV_HESSIAN, &o->full, &prog);
    /* the stream a job with seed 0 draws from on the whole parameter vector
     * (api/ops_estimators.c linop_and_rng: block key 0, salt trace 1, eigen 3,
     * density 4; power 3 too), so that each row does the work of the job
     * bench_inproc.py and `curvd run` time: the same probes and start vector,
     * the same number of products */
    static const struct {
        const char *name;
        uint64_t salt;
    } salts[] = {{"trace", 1}, {"eigen5", 3}, {"eigen10", 3}, {"power5", 3}, {"density", 4}};
    uint64_t salt = 0;
    for (size_t i = 0; i < sizeof salts / sizeof salts[0]; i++)
        if (strcmp(o->which, salts[i].name) == 0)
            salt = salts[i].salt;
    cv_rng r;
    cv_rng_seed_stream(&r, 0, salt);
    double t0 = cv_now_s();
    int rc = 0;
    if (strcmp(o->which, "trace") == 0) {
        cv_trace_options to;
        cv_trace_options_default(&to);
        to.max_probes = 100;
        to.tol = 0;
        to.block = o->block;
        cv_trace_result tr;
        rc = cv_trace_hutchinson(&op, &to, &r, &tr, &e);
        if (!rc)
            cv_trace_result_free(&tr);
    } else if (strcmp(o->which, "eigen5") == 0 || strcmp(o->which, "power5") == 0 ||
               strcmp(o->which, "eigen10") == 0) {
        int power = o->which[0] == 'p';
        cv_eigen_options eo;
        if (power)
            cv_power_options_default(&eo);
        else
            cv_eigen_options_default(&eo);
        eo.k = 5;
        if (!power)
            eo.tol = 1e-3; /* PyHessian's tolerance, for like-for-like accuracy */
        if (strcmp(o->which, "eigen10") == 0) {
            eo.k = 1;
            eo.max_iter = 10;
            eo.tol = 0;
        }
        cv_eigen_result er;
        rc = power ? cv_eigen_power(&op, &eo, &r, &er, &e) : cv_eigen_lanczos(&op, &eo, &r, &er, &e);
        if (!rc)
            cv_eigen_result_free(&er);
    } else {
        cv_density_options dop;
        cv_density_options_default(&dop);
        dop.lanczos_steps = 100;
        dop.runs = 1;
        cv_density_result dr;
        rc = cv_density_slq(&op, &dop, &r, &dr, &e);
        o->reorths = dr.reorths;
        if (!rc)
            cv_density_result_free(&dr);
    }
    if (rc)
        die(&e);
    o->matvecs = atomic_load(&prog.done);
    return cv_now_s() - t0;
}

static double sgemm_peak(void)
{
    int n = 1024;
    float *a = malloc(sizeof(float) * n * n), *b = malloc(sizeof(float) * n * n);
    float *c = malloc(sizeof(float) * n * n);
    for (int i = 0; i < n * n; i++)
        a[i] = b[i] = (float)(i % 7) * 0.1f;
    double best = 1e300;
    for (int r = 0; r < 5; r++) {
        double t0 = cv_now_s();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1, a, n, b, n, 0, c, n);
        double t = cv_now_s() - t0;
        if (t < best)
            best = t;
    }
    free(a);
    free(b);
    free(c);
    return 2.0 * n * n * (double)n / best * 1e-9;
}

/* Multiply-adds of one sample's forward pass through layer l (Linear/Conv2d;
 * a Linear on [T, in] per sample is T rows of in x out). */
static double layer_macs(const cv_layer *L)
{
    if (L->cls == &cv_linear_class) {
        const cv_linear_attr *a = CV_LAYER_ATTR(L, cv_linear_attr);
        return (double)cv_shape_numel(&L->in_shape) * a->out_features;
    }
    if (L->cls == &cv_conv2d_class) {
        const cv_conv2d_attr *a = CV_LAYER_ATTR(L, cv_conv2d_attr);
        return (double)L->out_shape.dim[0] * L->out_shape.dim[1] * L->out_shape.dim[2] *
               (a->in_channels / a->groups) * a->kernel[0] * a->kernel[1];
    }
    return 0;
}

/* FLOPs of the GEMM work per batch (2 per multiply-add), exactly as the
 * engine does it: every product below is one GEMM of the layer's size;
 * the first parameter layer (graph: a layer reading the model input) needs
 * no input cotangent and has no input tangent.  Graph models: Linear and
 * Conv2d only (attention's batched matmuls are not counted). */
typedef struct {
    double forward, gradient, ggnvp, hvp;
} flop_counts;

static int reads_model_input(const cv_layer *L)
{
    return L->nin > 0 && L->in[0] == 0;
}

static flop_counts count_flops(const cv_model *m, double n)
{
    flop_counts f = {0, 0, 0, 0};
    int first = 1;
    for (int l = 0; l < m->nlayers; l++) {
        double M = 2 * n * layer_macs(&m->layers[l]);
        if (M == 0)
            continue;
        if (m->graph)
            first = reads_model_input(&m->layers[l]);
        double inner = first ? 0 : M;         /* terms through the layer's input */
        f.forward += M;
        f.gradient += M + M + inner;          /* forward, dW, dx */
        f.ggnvp += (M + inner) + (M + inner); /* J v: x V^T (+ rx W^T); J^T: dW (+ dx) */
        f.hvp += (M + inner) + (M + inner) + 2 * inner; /* + gy V and gy^T rx */
        first = 0;
    }
    return f;
}

static int wanted(const bench_args *a, const char *op)
{
    if (!a->only)
        return 1;
    const char *p = strstr(a->only, op);
    size_t n = strlen(op);
    return p && (p[n] == 0 || p[n] == ',') && (p == a->only || p[-1] == ',');
}

static void parse_args(int argc, char **argv, bench_args *a)
{
    memset(a, 0, sizeof *a);
    a->threads = 1;
    a->reps = 3;
    for (int i = 1; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(argv[i], "--sgemm") == 0)
            a->sgemm = 1;
        else if (v && strcmp(argv[i], "--arch") == 0)
            a->arch = argv[++i];
        else if (v && strcmp(argv[i], "--params") == 0)
            a->params = argv[++i];
        else if (v && strcmp(argv[i], "--data") == 0)
            a->data = argv[++i];
        else if (v && strcmp(argv[i], "--threads") == 0)
            a->threads = atoi(argv[++i]);
        else if (v && strcmp(argv[i], "--reps") == 0)
            a->reps = atoi(argv[++i]);
        else if (v && strcmp(argv[i], "--only") == 0)
            a->only = argv[++i];
        else if (v && strcmp(argv[i], "--block") == 0)
            a->block = atoi(argv[++i]);
        else if (strcmp(argv[i], "--cpu-time") == 0)
            a->cpu = 1;
        else {
            fprintf(stderr, "bench_ops: unknown argument %s\n", argv[i]);
            exit(2);
        }
    }
}

int main(int argc, char **argv)
{
    bench_args a;
    parse_args(argc, argv, &a);
    cv_tune_allocator(); /* as curvd serve/run do */
    openblas_set_num_threads(a.threads);
    if (a.sgemm) {
        printf("{\"sgemm_gflops\": %.2f, \"threads\": %d}\n", sgemm_peak(), a.threads);
        return 0;
    }
    cv_model m;
    cv_dataset d;
    cv_err e;
    if (cv_arch_load(a.arch, &m, &e) || cv_params_read(&m, a.params, &e) ||
        cv_datafile_read(a.data, &d, &e) || cv_dataset_check(&d, &m, &e))
        die(&e);
    op_ctx o = {&m, &d, NULL, {0}, CV_CURV_HESSIAN, 1, NULL, NULL, 0, 0, NULL, a.block, a.cpu};
    cv_block_full(&m, &o.full);
    size_t D = o.full.dim;
    o.X = malloc(sizeof(double) * D * 16);
    o.Y = malloc(sizeof(double) * D * 16);
    cv_rng r;
    cv_rng_seed(&r, 1);
    cv_rng_rademacher(&r, o.X, D * 16);
    flop_counts fl = count_flops(&m, (double)d.n);
    printf("{\"params\": %zu, \"batch\": %zu, \"threads\": %d, \"flops\": {\"gradient\": %.0f, "
           "\"ggnvp\": %.0f, \"hvp\": %.0f}",
           D, d.n, a.threads, fl.gradient, fl.ggnvp, fl.hvp);
    if (wanted(&a, "gradient"))
        printf(", \"gradient\": %.6g", best_of(a.reps, t_gradient, &o));
    static const struct {
        const char *name;
        cv_curvature kind;
    } dg[] = {{"diagggn", CV_CURV_GGN},
              {"diagef", CV_CURV_EF},
              {"diaghessian", CV_CURV_HESSIAN}};
    for (size_t i = 0; i < sizeof dg / sizeof dg[0]; i++) {
        if (!wanted(&a, dg[i].name))
            continue;
        o.kind = dg[i].kind;
        printf(", \"%s\": %.6g", dg[i].name, best_of(a.reps, t_diag, &o));
    }
    const char *instr[] = {"instr_fo", "instr_nh", "instr_tl", "instr_all"};
    for (int i = 0; i < 4; i++) {
        if (!wanted(&a, instr[i]))
            continue;
        o.which = instr[i];
        printf(", \"%s\": %.6g", instr[i], best_of(a.reps, t_instruments, &o));
    }
    const char *kf[] = {"kfac_t2", "kfac_emp"};
    for (int i = 0; i < 2; i++) {
        if (!wanted(&a, kf[i]))
            continue;
        o.which = kf[i];
        printf(", \"%s\": %.6g", kf[i], best_of(a.reps, t_kfac, &o));
    }
    o.c = cv_curv_new(&m, &d, NULL, &e);
    if (!o.c)
        die(&e);
    static const struct {
        const char *name;
        cv_curvature kind;
        int k;
    } mv[] = {{"hvp", CV_CURV_HESSIAN, 1},
              {"ggnvp", CV_CURV_GGN, 1},
              {"hvp16", CV_CURV_HESSIAN, 16},
              {"ggnvp16", CV_CURV_GGN, 16}};
    for (size_t i = 0; i < sizeof mv / sizeof mv[0]; i++) {
        if (!wanted(&a, mv[i].name))
            continue;
        o.kind = mv[i].kind;
        o.k = mv[i].k;
        t_matvec(&o); /* warm-up: workspace allocation */
        printf(", \"%s\": %.6g", mv[i].name, best_of(a.reps, t_matvec, &o));
    }
    const char *est[] = {"trace", "eigen5", "eigen10", "power5", "density"};
    for (int i = 0; i < 5; i++) {
        if (!wanted(&a, est[i]))
            continue;
        o.which = est[i];
        double t = t_estimator(&o); /* repeat only the quick ones (timer noise) */
        if (t < 1.0 && a.reps > 1)
            t = fmin(t, best_of(a.reps, t_estimator, &o));
        printf(", \"%s\": %.6g, \"%s_matvecs\": %ld", est[i], t, est[i], o.matvecs);
        if (!strcmp(est[i], "density"))
            printf(", \"density_reorths\": %ld", o.reorths);
    }
    printf("}\n");
    cv_curv_free(o.c);
    free(o.X);
    free(o.Y);
    cv_model_free(&m);
    cv_dataset_free(&d);
    return 0;
}
