/* test_ops.c - the op table and the typed job (api/ops_table.c, api/job.c,
 * api/opts.c, api/suggest.c): "did you mean" hints for ops, options and
 * fields; method-specific options refused for the other methods (the rule
 * derived from the option table, with the messages and codes of before);
 * option values landing in the engine's option structs; the GET /v1/ops
 * document's shape; that the result fields every op writes on a small
 * model are exactly those its table lists; and solve's rhs given as a list
 * (against a dense LAPACK solve, and its refusals); strict JSON reading
 * (api/json_strict.c: duplicate keys, trailing data, NULs, control
 * characters, loose numbers) and a parameter named in two blocks. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/arch.h"
#include "api/job.h"
#include "api/json_strict.h"
#include "api/op_args.h"
#include "api/op_laplace.h"
#include "api/ops.h"
#include "api/ops_table.h"
#include "api/suggest.h"
#include "engine/rng.h"
#include "testutil.h"

/* ---- helpers ---------------------------------------------------------------- */

static cv_job_spec *parse(const char *text, cv_err *e)
{
    cJSON *doc = cJSON_Parse(text);
    ck_assert_msg(doc != NULL, "bad test JSON %s", text);
    cv_err_clear(e);
    cv_job_spec *j = cv_job_parse(doc, e);
    cJSON_Delete(doc);
    return j;
}

/* The job must be refused with code, field and a message containing msg. */
static void refused(const char *text, const char *code, const char *field, const char *msg)
{
    cv_err e;
    cv_job_spec *j = parse(text, &e);
    ck_assert_msg(j == NULL, "accepted: %s", text);
    ck_assert_msg(e.status == CV_EINVAL, "%s: status %d", text, e.status);
    ck_assert_msg(strcmp(e.code, code) == 0, "%s: code %s", text, e.code);
    ck_assert_msg(strcmp(e.field, field) == 0, "%s: field %s", text, e.field);
    ck_assert_msg(strstr(e.message, msg) != NULL, "%s: message '%s' lacks '%s'", text, e.message,
                  msg);
}

static cv_job_spec *accepted(const char *text)
{
    cv_err e;
    cv_job_spec *j = parse(text, &e);
    ck_assert_msg(j != NULL, "%s refused: %s (%s, field %s)", text, e.message, e.code, e.field);
    return j;
}

/* A bind refusal the table-driven bind tests expect: the job parses, and
 * cv_job_bind refuses it with exactly this code, field and message. */
typedef struct {
    const char *job, *code, *field, *msg;
} bind_refusal;

static void expect_bind_refused(cv_model *m, cv_dataset *d, const bind_refusal *b)
{
    cv_err e;
    cv_job_spec *j = accepted(b->job);
    ck_assert_msg(cv_job_bind(j, m, d, &e) == -1, "%s bound", b->job);
    ck_assert_int_eq(e.status, CV_EINVAL);
    ck_assert_str_eq(e.code, b->code);
    ck_assert_str_eq(e.field, b->field);
    ck_assert_msg(strcmp(e.message, b->msg) == 0, "%s: '%s'", b->job, e.message);
    cv_job_spec_free(j);
}

/* This binary's strdup: the n-th call from now fails when strdup_fail_in = n
 * (cv_job_parse's out-of-memory paths); otherwise a plain copy. */
static int strdup_fail_in;

char *strdup(const char *s)
{
    if (strdup_fail_in > 0 && --strdup_fail_in == 0)
        return NULL;
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    return d ? memcpy(d, s, n) : NULL;
}

/* ---- suggestions -------------------------------------------------------------- */

START_TEST(edit_distance_and_suggest)
{
    ck_assert_int_eq(cv_edit_distance("kitten", "sitting"), 3);
    ck_assert_int_eq(cv_edit_distance("", "abc"), 3);
    ck_assert_int_eq(cv_edit_distance("same", "same"), 0);
    static const char *const names[] = {"trace", "diag", "density", NULL};
    ck_assert_str_eq(cv_suggest("trcae", names, -1), "trace");
    ck_assert_str_eq(cv_suggest("dig", names, 3), "diag");
    ck_assert_ptr_null(cv_suggest("eigenvalues", names, -1));
    /* case alone, and a word that a name begins with */
    static const char *const cls[] = {"ReLU", "CrossEntropyLoss", NULL};
    ck_assert_str_eq(cv_suggest("relu", cls, -1), "ReLU");
    ck_assert_str_eq(cv_suggest("crossentropy", cls, -1), "CrossEntropyLoss");
    ck_assert_ptr_null(cv_suggest("Cros", cls, 1)); /* only ReLU offered */
    char buf[64];
    ck_assert_str_eq(cv_suggest_hint("densty", names, -1, buf, sizeof buf),
                     "; did you mean 'density'?");
    ck_assert_str_eq(cv_suggest_hint("zzzzzzz", names, -1, buf, sizeof buf), "");
    /* name lists */
    ck_assert_str_eq(cv_join_names(names, -1, ", ", " and ", buf, sizeof buf),
                     "trace, diag and density");
    ck_assert_str_eq(cv_join_names(names, 2, ", ", " and ", buf, sizeof buf), "trace and diag");
    ck_assert_str_eq(cv_join_names(names, 1, ", ", " and ", buf, sizeof buf), "trace");
    ck_assert_str_eq(cv_join_names(names, 0, ", ", " and ", buf, sizeof buf), "");
    ck_assert_str_eq(cv_join_names(NULL, -1, "|", "|", buf, sizeof buf), "");
    ck_assert_str_eq(cv_join_names(names, 3, "|", "|", buf, sizeof buf), "trace|diag|density");
    ck_assert_str_eq(cv_join_names(names, 3, ", ", ", ", buf, 9), "trace, d"); /* truncated */
}
END_TEST

START_TEST(did_you_mean_ops_options_fields)
{
    refused("{\"op\":\"trac\"}", "unknown_op", "op", "unknown op 'trac'");
    refused("{\"op\":\"trac\"}", "unknown_op", "op", "did you mean 'trace'?");
    refused("{\"op\":\"eigne\"}", "unknown_op", "op", "did you mean 'eigen'?");
    refused("{\"op\":\"nope-at-all\"}", "unknown_op", "op",
            "unknown op 'nope-at-all' (known: loss, gradient, matvec, dense, "
            "per_sample_gradients, trace, diag, eigen, density, solve, newton, snr, kfac, "
            "frobenius_norm, jvp, vjp, jacobian, laplace, predict, instruments)");
    refused("{\"op\":\"trace\",\"options\":{\"max_probe\":5}}", "unknown_option",
            "options.max_probe", "did you mean 'max_probes'?");
    refused("{\"op\":\"trace\",\"options\":{\"probes\":5}}", "unknown_option", "options.probes",
            "unknown option 'probes' for this op (known: method, max_probes, tol, "
            "distribution, return_samples, mc_samples, fisher_type, kfac_approx)");
    refused("{\"op\":\"eigen\",\"options\":{\"retrun_vectors\":true}}", "unknown_option",
            "options.retrun_vectors", "did you mean 'return_vectors'?");
    refused("{\"op\":\"loss\",\"options\":{\"k\":1}}", "unknown_option", "options.k",
            "(known: none)");
    refused("{\"op\":\"loss\",\"curvatur\":\"ggn\"}", "unknown_field", "curvatur",
            "did you mean 'curvature'?");
    refused("{\"op\":\"trace\",\"curvature\":\"gnn\"}", "invalid_curvature", "curvature",
            "curvature must be one of hessian, ggn, fisher_mc, ef, kfac, kflr, "
            "kfra, ekfac; did you mean 'ggn'?");
    refused("{\"op\":\"trace\",\"options\":{\"method\":\"hutchpp\"}}", "invalid_option",
            "options.method", "must be one of hutchinson|hutch++|xtrace|xnystrace; did you mean 'hutch++'?");
    refused("{\"op\":\"trace\",\"options\":{\"max_probes\":\"5\"}}", "invalid_option",
            "options.max_probes", "options.max_probes must be an integer, got string \"5\"");
    /* no hint when nothing is close */
    cv_err e;
    ck_assert_ptr_null(parse("{\"op\":\"trace\",\"options\":{\"qqqqqqqq\":1}}", &e));
    ck_assert_ptr_null(strstr(e.message, "did you mean"));
}
END_TEST

/* ---- methods and their options ------------------------------------------------ */

START_TEST(method_options_refused_for_other_methods)
{
    /* the messages and codes of before the table */
    refused("{\"op\":\"eigen\",\"options\":{\"threshold\":0.1}}", "invalid_option",
            "options.method", "threshold, mc and subsample apply to method gram only");
    refused("{\"op\":\"eigen\",\"options\":{\"method\":\"power\",\"mc\":true}}", "invalid_option",
            "options.method", "threshold, mc and subsample apply to method gram only");
    refused("{\"op\":\"newton\",\"options\":{\"k\":2}}", "invalid_option", "options.method",
            "k, mode, grid, bootstrap_samples, threshold, mc and subsample apply to method vivit "
            "only");
    refused("{\"op\":\"newton\",\"options\":{\"method\":\"minres\",\"subsample\":0.5}}",
            "invalid_option", "options.method", "apply to method vivit only");
    refused("{\"op\":\"newton\",\"options\":{\"damping\":\"bootstrap\"}}", "invalid_option",
            "options.damping", "damping \"bootstrap\" needs method vivit");
    refused("{\"op\":\"eigen\",\"options\":{\"method\":\"power\",\"which\":\"smallest\"}}",
            "invalid_option", "options.which", "power iteration finds dominant eigenvalues only");
    refused("{\"op\":\"trace\",\"options\":{\"method\":\"hutch++\",\"tol\":0.1}}",
            "invalid_option", "options.tol", "tol applies to method hutchinson only");
    refused("{\"op\":\"trace\",\"options\":{\"method\":\"hutch++\",\"max_probes\":2}}",
            "invalid_option", "options.max_probes", "at least 3 matvecs");
    refused("{\"op\":\"eigen\",\"options\":{\"method\":\"lanczoz\"}}", "invalid_option",
            "options.method", "options.method must be one of lanczos|power|gram");
    /* checks of the ViViT methods now run at submit, not in the worker */
    refused("{\"op\":\"eigen\",\"curvature\":\"ggn\",\"options\":{\"method\":\"gram\","
            "\"which\":\"smallest\"}}",
            "invalid_option", "options.which", "method gram gives");
    refused("{\"op\":\"eigen\",\"curvature\":\"ef\",\"options\":{\"method\":\"gram\"}}",
            "invalid_curvature", "curvature", "ViViT works on the GGN's low-rank factor");
    refused("{\"op\":\"snr\"}", "invalid_curvature", "curvature", "(the default when");
    refused("{\"op\":\"newton\",\"curvature\":\"ggn\",\"options\":{\"method\":\"vivit\","
            "\"mode\":\"full\",\"k\":2}}",
            "invalid_option", "options.k", "k applies to mode directional");
    refused("{\"op\":\"newton\",\"curvature\":\"ggn\",\"options\":{\"method\":\"vivit\","
            "\"damping\":\"bootstrap\",\"grid\":[1,-1]}}",
            "invalid_option", "options.grid", "grid values must be positive");
    cv_job_spec_free(accepted("{\"op\":\"trace\",\"options\":{\"method\":\"hutch++\",\"tol\":0}}"));
}
END_TEST

/* A valid value of spec s as JSON text. */
static void valid_value(const cv_opt_spec *s, char *buf, size_t len)
{
    switch (s->type) {
    case CV_OPT_BOOL: snprintf(buf, len, "true"); break;
    case CV_OPT_LIST: snprintf(buf, len, "[1]"); break;
    case CV_OPT_ENUM:
    case CV_OPT_ENUM_OR_LIST:
        snprintf(buf, len, "\"%.*s\"", (int)strcspn(s->choices, "|"), s->choices);
        break;
    default: snprintf(buf, len, "%.17g", s->min > 0 ? s->min : s->max < 1 ? s->max : 1); break;
    }
}

/* Every method-specific option, given with every method of its op: refused
 * with field options.method exactly for the methods it does not list. */
START_TEST(method_applicability_follows_the_table)
{
    int tried = 0;
    for (int i = 0; i < cv_op_count(); i++) {
        const cv_op_def *def = cv_op_at(i);
        for (const cv_opt_spec *s = def->options; s->name; s++) {
            if (!s->methods)
                continue;
            ck_assert_msg(def->methods != NULL, "%s.%s: methods on an op without", def->name,
                          s->name);
            for (int m = 0; def->methods[m]; m++) {
                char val[64], text[512];
                valid_value(s, val, sizeof val);
                snprintf(text, sizeof text,
                         "{\"op\":\"%s\",\"curvature\":\"ggn\",\"options\":{\"method\":\"%s\","
                         "\"%s\":%s}}",
                         def->name, def->methods[m]->name, s->name, val);
                cv_err e;
                cv_job_spec *j = parse(text, &e);
                int applies = cv_opts_in_list(s->methods, def->methods[m]->name);
                int method_err = !j && strcmp(e.field, "options.method") == 0;
                ck_assert_msg(applies ? !method_err : method_err && !strcmp(e.code, "invalid_option"),
                              "%s: %s", text, j ? "accepted" : e.message);
                cv_job_spec_free(j);
                tried++;
            }
        }
    }
    ck_assert_int_ge(tried, 20);
}
END_TEST

START_TEST(options_land_in_engine_structs)
{
    cv_job_spec *j = accepted("{\"op\":\"eigen\",\"options\":{\"k\":3,\"which\":\"magnitude\","
                              "\"method\":\"power\",\"max_iter\":7,\"return_vectors\":true,"
                              "\"mc_samples\":4}}");
    const cv_eigen_args *a = j->opts.args;
    ck_assert_str_eq(j->method->name, "power");
    ck_assert_int_eq(a->method, CV_EIGEN_POWER);
    ck_assert_int_eq(a->o.k, 3);
    ck_assert_int_eq(a->o.which, CV_WHICH_MAGNITUDE);
    ck_assert_int_eq(a->o.max_iter, 7);
    ck_assert_int_eq(a->o.return_vectors, 1);
    ck_assert_int_eq(a->base.mc_samples, 4);
    cv_eigen_options p;
    cv_power_options_default(&p);
    ck_assert_double_eq(a->o.tol, p.tol); /* the method's default */
    ck_assert(cv_opts_given(&j->opts, "k") && !cv_opts_given(&j->opts, "tol"));
    cv_job_spec_free(j);

    /* enum choices are the engine's names in its enum order */
    static const char *const which[] = {"largest", "smallest", "magnitude"};
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(cv_which_from_name(which[i]), i);
    ck_assert_int_eq(cv_probe_dist_from_name("rademacher"), CV_PROBE_RADEMACHER);
    ck_assert_int_eq(cv_probe_dist_from_name("gaussian"), CV_PROBE_GAUSSIAN);
    ck_assert_int_eq(cv_op_method_index(&cv_op_solve, "minres"), CV_SOLVE_MINRES);
    ck_assert_int_eq(cv_op_method_index(&cv_op_newton, "cg"), CV_NEWTON_CG);
    ck_assert_int_eq(cv_op_method_index(&cv_op_newton, "vivit"), CV_NEWTON_VIVIT);
    ck_assert_int_eq(cv_op_method_index(&cv_op_eigen, "gram"), CV_EIGEN_GRAM);

    j = accepted("{\"op\":\"newton\",\"curvature\":\"ggn\",\"seed\":9,\"options\":{\"method\":"
                 "\"vivit\",\"damping\":\"bootstrap\",\"grid\":[0.5,2],\"k\":\"all\"},"
                 "\"batch\":{\"indices\":[3,1,2]},\"blocks\":[[\"0.weight\"],[\"2.bias\"]]}");
    const cv_newton_args *n = j->opts.args;
    ck_assert_int_eq(n->damping.choice, 0);
    ck_assert_int_eq(n->k.choice, 0);
    ck_assert_int_eq(n->grid.n, 2);
    ck_assert_double_eq(n->grid.v[1], 2);
    ck_assert_int_eq(n->vivit.mc, 0);
    ck_assert_double_eq(n->vivit.subsample, 1.0);
    ck_assert_int_eq((int)j->seed, 9);
    ck_assert_int_eq(j->curvature, CV_CURV_GGN);
    ck_assert_int_eq(j->batch.kind, CV_JOB_BATCH_INDICES);
    ck_assert_uint_eq(j->batch.count, 3);
    ck_assert_int_eq(j->batch.indices[0], 3);
    ck_assert_int_eq(j->blocks.kind, CV_JOB_BLOCKS_LIST);
    ck_assert_int_eq(j->blocks.ngroups, 2);
    ck_assert_str_eq(j->blocks.names[1], "2.bias");
    cv_job_spec_free(j);

    j = accepted("{\"op\":\"newton\",\"options\":{\"damping\":0.25}}");
    n = j->opts.args;
    ck_assert_double_eq(n->damping.num, 0.25);
    ck_assert_int_eq(n->damping.choice, -1);
    cv_job_spec_free(j);
    j = accepted("{\"op\":\"newton\",\"options\":{\"method\":\"vivit\"},\"curvature\":\"ggn\"}");
    ck_assert_double_eq(((const cv_newton_args *)j->opts.args)->damping.num, 1.0);
    cv_job_spec_free(j);
}
END_TEST

/* cv_opts.given has CV_OPT_MAX bits: every op's table fits, and an entry
 * beyond the bits is refused by cv_opts_store (before: 1ull << 65, undefined,
 * on x86 the bit of entry 1) and never reads as given. */
START_TEST(option_tables_fit_the_given_bits)
{
    for (int i = 0; i < cv_op_count(); i++) {
        int n = 0;
        while (cv_op_at(i)->options[n].name)
            n++;
        ck_assert_msg(n <= CV_OPT_MAX, "op %s has %d options", cv_op_at(i)->name, n);
    }
    enum { N = CV_OPT_MAX + 6 };
    static char names[N][8];
    cv_opt_spec specs[N + 1];
    memset(specs, 0, sizeof specs);
    for (int i = 0; i < N; i++) {
        snprintf(names[i], sizeof names[i], "o%d", i);
        specs[i] = (cv_opt_spec){names[i], CV_OPT_INT, 0, 9, NULL, 0, NULL};
    }
    int value = 0;
    cv_opts o = {&value, specs, 0};
    cJSON *doc = cJSON_Parse("{\"o65\": 3}");
    cv_err e;
    cv_err_clear(&e);
    ck_assert_int_eq(cv_opts_validate(doc, specs, NULL, &e), 0);
    ck_assert_int_eq(cv_opts_store(doc, &o, NULL, &e), -1);
    ck_assert_str_eq(e.code, "internal");
    ck_assert_msg(o.given == 0, "given = %#llx", (unsigned long long)o.given);
    ck_assert(!cv_opts_given(&o, "o65") && !cv_opts_given(&o, "o1") && !cv_opts_given_at(&o, 65));
    cJSON_Delete(doc);
}
END_TEST

/* ---- GET /v1/ops ---------------------------------------------------------------- */

static void strings(const cJSON *a, const char *what)
{
    ck_assert_msg(cJSON_IsArray(a) && cJSON_GetArraySize(a) > 0, "%s is not a list", what);
    const cJSON *x;
    cJSON_ArrayForEach(x, a) ck_assert_msg(cJSON_IsString(x), "%s holds a non-string", what);
}

static int list_has(const cJSON *a, const char *s)
{
    const cJSON *x;
    cJSON_ArrayForEach(x, a) if (strcmp(x->valuestring, s) == 0) return 1;
    return 0;
}

START_TEST(ops_document_shape)
{
    cJSON *d = cv_ops_describe();
    ck_assert_ptr_nonnull(d);
    const cJSON *ops = cJSON_GetObjectItem(d, "ops"), *cu = cJSON_GetObjectItem(d, "curvatures");
    const cJSON *st = cJSON_GetObjectItem(d, "statuses"), *specs = cJSON_GetObjectItem(d, "op_specs");
    strings(ops, "ops");
    strings(cu, "curvatures");
    strings(st, "statuses");
    char *t = cJSON_PrintUnformatted(cu);
    ck_assert_str_eq(t, "[\"hessian\",\"ggn\",\"fisher_mc\",\"ef\",\"kfac\",\"kflr\",\"kfra\","
                        "\"ekfac\"]");
    free(t);
    t = cJSON_PrintUnformatted(st);
    ck_assert_str_eq(t, "[\"queued\",\"running\",\"succeeded\",\"failed\",\"cancelled\"]");
    free(t);
    ck_assert(cJSON_IsObject(specs));
    ck_assert_int_eq(cJSON_GetArraySize(specs), cJSON_GetArraySize(ops));
    ck_assert_int_eq(cJSON_GetArraySize(ops), cv_op_count());
    static const char *const types =
        "integer|number|boolean|enum|number_or_enum|integer_or_enum|list|enum_or_list|"
        "number_or_list|name|boolean_or_name|enum_list";
    const cJSON *op;
    cJSON_ArrayForEach(op, ops)
    {
        const cJSON *s = cJSON_GetObjectItemCaseSensitive(specs, op->valuestring);
        ck_assert_msg(cJSON_IsObject(s), "no op_specs.%s", op->valuestring);
        ck_assert(cJSON_IsBool(cJSON_GetObjectItem(s, "uses_curvature")));
        ck_assert(cJSON_IsBool(cJSON_GetObjectItem(s, "blockwise")));
        strings(cJSON_GetObjectItem(s, "results"), "results");
        const cJSON *methods = cJSON_GetObjectItem(s, "methods");
        const cv_op_def *def = cv_op_find(op->valuestring);
        ck_assert_int_eq(methods != NULL, def->methods != NULL);
        if (methods)
            strings(methods, "methods");
        const cJSON *opts = cJSON_GetObjectItem(s, "options"), *o;
        ck_assert(cJSON_IsArray(opts));
        int n = 0;
        cJSON_ArrayForEach(o, opts)
        {
            const cJSON *name = cJSON_GetObjectItem(o, "name"), *type = cJSON_GetObjectItem(o, "type");
            ck_assert(cJSON_IsString(name) && cJSON_IsString(type));
            ck_assert_msg(cv_opts_in_list(types, type->valuestring), "type %s", type->valuestring);
            int enumish = strstr(type->valuestring, "enum") != NULL;
            const cJSON *ch = cJSON_GetObjectItem(o, "choices");
            ck_assert_msg(enumish == (ch != NULL), "%s.%s choices", op->valuestring, name->valuestring);
            if (ch)
                strings(ch, "choices");
            int ranged = !enumish || strstr(type->valuestring, "_or_enum") != NULL;
            ranged = ranged && strcmp(type->valuestring, "boolean") &&
                     strcmp(type->valuestring, "list") && !strstr(type->valuestring, "name");
            ck_assert_int_eq(cJSON_IsNumber(cJSON_GetObjectItem(o, "min")), ranged);
            ck_assert_int_eq(cJSON_IsNumber(cJSON_GetObjectItem(o, "max")), ranged);
            const cJSON *om = cJSON_GetObjectItem(o, "methods"), *x;
            if (om) {
                strings(om, "option methods");
                cJSON_ArrayForEach(x, om) ck_assert_msg(methods && list_has(methods, x->valuestring),
                                                        "%s.%s: method %s", op->valuestring,
                                                        name->valuestring, x->valuestring);
            }
            if (strcmp(name->valuestring, "method") == 0) {
                t = cJSON_PrintUnformatted(ch), free(t);
                ck_assert_int_eq(cJSON_GetArraySize(ch), cJSON_GetArraySize(methods));
            }
            n++;
        }
        int want = 0;
        while (def->options[want].name)
            want++;
        ck_assert_int_eq(n, want);
    }
    cJSON_Delete(d);
}
END_TEST

/* ---- results against the table --------------------------------------------------- */

static const char *const ARCH =
    "{\"input_shape\": [4], \"layers\": ["
    "{\"type\": \"Linear\", \"in_features\": 4, \"out_features\": 5},"
    "{\"type\": \"Tanh\"},"
    "{\"type\": \"Linear\", \"in_features\": 5, \"out_features\": 3}],"
    " \"loss\": {\"type\": \"CrossEntropyLoss\", \"reduction\": \"mean\"}}";

typedef struct {
    cv_model m;
    cv_dataset d;
} fixture;

static void fx_make(fixture *f)
{
    memset(f, 0, sizeof *f);
    cv_err e;
    ck_assert_msg(cv_arch_parse(ARCH, strlen(ARCH), &f->m, &e) == 0, "%s", e.message);
    ck_assert_int_eq(cv_model_alloc(&f->m), 0);
    cv_rng r;
    cv_rng_seed(&r, 7);
    for (size_t i = 0; i < f->m.nparams_total; i++)
        f->m.params[i] = (float)(0.7 * cv_rng_normal(&r));
    size_t n = 12;
    f->d.n = n;
    f->d.x_shape = f->m.input_shape;
    f->d.x = malloc(sizeof(float) * n * 4);
    f->d.y_is_index = 1;
    f->d.labels = malloc(sizeof(int64_t) * n);
    for (size_t i = 0; i < n * 4; i++)
        f->d.x[i] = (float)cv_rng_normal(&r);
    for (size_t i = 0; i < n; i++)
        f->d.labels[i] = (int64_t)(i % 3);
}

static void fx_free(fixture *f)
{
    cv_model_free(&f->m);
    cv_dataset_free(&f->d);
}

/* The envelope of every result and of every block's result. */
static int is_envelope(const char *k)
{
    return cv_opts_in_list("op|curvature|batch_size|num_params|matvecs|elapsed_s|blocks|"
                           "micro_batches|micro_batch_size|cached_micro_batches|"
                           "peak_memory_bytes", k) ||
           cv_opts_in_list("params|dim|name", k);
}

/* Result fields of one object must be in the op's list; marks them seen. */
static void check_fields(const cv_op_def *def, const cJSON *o, int *seen, const char *job)
{
    const cJSON *k;
    cJSON_ArrayForEach(k, o)
    {
        if (is_envelope(k->string))
            continue;
        int found = 0;
        for (int i = 0; def->results[i]; i++)
            if (strcmp(def->results[i], k->string) == 0) {
                seen[i] = found = 1;
            }
        ck_assert_msg(found, "op %s writes '%s', not in its results table (job %s)", def->name,
                      k->string, job);
    }
}

START_TEST(results_match_the_table)
{
    static const char *const jobs[] = {
        "{\"op\":\"loss\"}",
        "{\"op\":\"gradient\",\"blocks\":\"layer\"}",
        "{\"op\":\"matvec\",\"curvature\":\"ggn\",\"options\":{\"probe_seed\":1}}",
        "{\"op\":\"dense\",\"curvature\":\"ggn\"}",
        "{\"op\":\"per_sample_gradients\"}",
        "{\"op\":\"trace\",\"options\":{\"max_probes\":5,\"return_samples\":true}}",
        "{\"op\":\"trace\",\"blocks\":\"layer\",\"options\":{\"method\":\"hutch++\",\"max_probes\":6}}",
        "{\"op\":\"diag\",\"options\":{\"max_probes\":3}}",
        "{\"op\":\"diag\",\"options\":{\"method\":\"exact\"}}",
        "{\"op\":\"eigen\",\"options\":{\"k\":2,\"return_vectors\":true}}",
        "{\"op\":\"eigen\",\"options\":{\"method\":\"power\",\"max_iter\":20}}",
        "{\"op\":\"eigen\",\"curvature\":\"ggn\",\"options\":{\"method\":\"gram\","
        "\"return_vectors\":true,\"subsample\":0.5}}",
        "{\"op\":\"density\",\"options\":{\"lanczos_steps\":5,\"grid_points\":10}}",
        "{\"op\":\"solve\",\"curvature\":\"ggn\",\"options\":{\"damping\":1}}",
        "{\"op\":\"newton\",\"curvature\":\"ggn\",\"options\":{\"damping\":1,"
        "\"actual_change\":true}}",
        "{\"op\":\"newton\",\"curvature\":\"ggn\",\"options\":{\"method\":\"vivit\","
        "\"actual_change\":true}}",
        "{\"op\":\"newton\",\"curvature\":\"fisher_mc\",\"options\":{\"method\":\"vivit\","
        "\"mode\":\"full\",\"subsample\":0.5}}",
        "{\"op\":\"snr\",\"curvature\":\"ggn\",\"options\":{\"return_raw\":true,\"k\":2}}",
        "{\"op\":\"snr\",\"curvature\":\"ggn\",\"options\":{\"subsample\":0.5}}",
        "{\"op\":\"kfac\",\"options\":{\"compare\":true}}",
        "{\"op\":\"kfac\",\"options\":{\"fisher_type\":\"mc\",\"kfac_approx\":\"reduce\"}}",
        "{\"op\":\"laplace\",\"options\":{\"structure\":\"lowrank\",\"k\":2,"
        "\"optimize_prior\":true}}",
        "{\"op\":\"laplace\",\"options\":{\"structure\":\"last_layer\",\"prior_precision\":[2]}}",
        "{\"op\":\"predict\",\"options\":{\"structure\":\"kron\",\"samples\":5,"
        "\"return_covariance\":true,\"return_posterior_samples\":true}}",
        "{\"op\":\"predict\",\"options\":{\"structure\":\"last_layer\","
        "\"last_layer_structure\":\"lowrank\",\"k\":2,\"optimize_prior\":true,"
        "\"x\":[0.1,0.2,0.3,0.4,-1,0,1,2]}}",
        /* Kronecker curvatures: exact, block_kinds (and trace's logdet) */
        "{\"op\":\"matvec\",\"curvature\":\"kfac\",\"options\":{\"probe_seed\":1}}",
        "{\"op\":\"dense\",\"curvature\":\"kflr\",\"blocks\":\"layer\"}",
        "{\"op\":\"trace\",\"curvature\":\"kfac\",\"options\":{\"fisher_type\":\"empirical\"}}",
        "{\"op\":\"trace\",\"curvature\":\"kfac\",\"blocks\":\"layer\"}",
        "{\"op\":\"diag\",\"curvature\":\"kfac\"}",
        "{\"op\":\"eigen\",\"curvature\":\"kfac\",\"options\":{\"k\":2}}",
        "{\"op\":\"density\",\"curvature\":\"kfac\",\"options\":{\"grid_points\":10}}",
        "{\"op\":\"solve\",\"curvature\":\"kfac\",\"options\":{\"damping\":1}}",
        "{\"op\":\"newton\",\"curvature\":\"kfac\",\"options\":{\"damping\":1}}",
        "{\"op\":\"newton\",\"options\":{\"method\":\"kfac\",\"damping\":1,"
        "\"damping_mode\":\"factored\",\"rescale\":true}}",
        "{\"op\":\"newton\",\"options\":{\"method\":\"acp\",\"damping\":1}}",
        /* issue 26: sketching trace/diag methods, frobenius_norm, Jacobian ops */
        "{\"op\":\"trace\",\"options\":{\"method\":\"xtrace\",\"max_probes\":6}}",
        "{\"op\":\"trace\",\"curvature\":\"ggn\",\"options\":{\"method\":\"xnystrace\","
        "\"max_probes\":4}}",
        "{\"op\":\"diag\",\"options\":{\"method\":\"xdiag\",\"max_probes\":6}}",
        "{\"op\":\"diag\",\"curvature\":\"ggn\",\"options\":{\"method\":\"exact\","
        "\"per_sample\":true}}",
        "{\"op\":\"frobenius_norm\",\"options\":{\"max_probes\":4,\"return_samples\":true}}",
        "{\"op\":\"frobenius_norm\",\"curvature\":\"kfac\",\"options\":{\"method\":"
        "\"xnystrace\",\"max_probes\":4}}",
        "{\"op\":\"eigen\",\"options\":{\"method\":\"block_lanczos\",\"k\":2,"
        "\"block_size\":3,\"return_vectors\":true}}",
        "{\"op\":\"jvp\",\"options\":{\"probe_seed\":2}}",
        "{\"op\":\"vjp\",\"options\":{\"cotangent_seed\":2}}",
        "{\"op\":\"jacobian\",\"blocks\":\"layer\"}",
        "{\"op\":\"solve\",\"curvature\":\"ggn\",\"options\":{\"damping\":1,\"method\":"
        "\"lsmr\"}}",
        "{\"op\":\"solve\",\"curvature\":\"ggn\",\"blocks\":[[\"2.bias\"]],"
        "\"options\":{\"damping\":1,\"rhs\":[1,2,3,4,5,6]}}",
        "{\"op\":\"solve\",\"curvature\":\"ggn\",\"options\":{\"damping\":1,\"method\":"
        "\"neumann\",\"scale\":0.1,\"num_terms\":5}}",
        /* issue 23: a kept posterior (the store the service gives a job), accumulated,
         * predicted with */
        "{\"op\":\"laplace\",\"options\":{\"structure\":\"diag\",\"keep\":true}}",
        "{\"op\":\"laplace\",\"options\":{\"structure\":\"diag\","
        "\"accumulate_into\":\"default\"}}",
        "{\"op\":\"predict\",\"options\":{\"posterior\":\"default\"}}",
        /* issue 24: instruments (the second with kept versions: see below) */
        "{\"op\":\"instruments\",\"options\":{\"exclude\":[\"alpha\"],\"bins\":5}}",
        "{\"op\":\"instruments\",\"seed\":7,\"options\":{\"probes\":3,"
        "\"lanczos_steps\":4}}",
    };
    fixture f;
    fx_make(&f);
    /* the cross-version instruments: version 3 with a perturbed version 2 */
    float *prev = malloc(sizeof(float) * f.m.nparams_total);
    ck_assert_ptr_nonnull(prev);
    for (size_t i = 0; i < f.m.nparams_total; i++)
        prev[i] = f.m.params[i] + 0.01f * (float)(i % 3);
    int nops = cv_op_count();
    int (*seen)[64] = calloc((size_t)nops, sizeof *seen);
    int ran[64] = {0};
    cv_lap_post *kept = NULL;
    for (size_t q = 0; q < sizeof jobs / sizeof jobs[0]; q++) {
        cv_err e;
        cv_job_spec *j = parse(jobs[q], &e);
        ck_assert_msg(j != NULL, "%s: %s", jobs[q], e.message);
        /* the document is gone: the typed job alone binds and runs */
        ck_assert_msg(cv_job_bind(j, &f.m, &f.d, &e) == 0, "%s: %s", jobs[q], e.message);
        const char *rd, *wr;
        cv_lap_job_names(j, &rd, &wr);
        cv_job_store st = {rd ? kept : NULL, NULL};
        ck_assert_msg(!rd || (kept && cv_lap_job_use(j, kept, &f.m, &e) == 0), "%s", jobs[q]);
        if (j->seed == 7 && strcmp(j->op->name, "instruments") == 0)
            j->history = (cv_job_history){3, prev, f.m.params, f.m.nparams_total};
        cJSON *res = cv_job_exec_store(j, &f.m, &f.d, NULL, NULL, &st, &e);
        ck_assert_msg(res != NULL, "%s: %s", jobs[q], e.message);
        ck_assert_msg(!wr == !st.out, "%s: kept %p", jobs[q], (void *)st.out);
        if (st.out) {
            cv_lap_post_destroy(kept);
            kept = st.out;
        }
        int oi = 0;
        while (cv_op_at(oi) != j->op)
            oi++;
        ran[oi] = 1;
        check_fields(j->op, res, seen[oi], jobs[q]);
        const cJSON *blocks = cJSON_GetObjectItem(res, "blocks"), *b;
        cJSON_ArrayForEach(b, blocks) check_fields(j->op, b, seen[oi], jobs[q]);
        cJSON_Delete(res);
        cv_job_spec_free(j);
    }
    /* and every listed field is written by some job above (no stale entries) */
    for (int i = 0; i < nops; i++) {
        const cv_op_def *def = cv_op_at(i);
        ck_assert_msg(ran[i], "op %s not exercised", def->name);
        for (int r = 0; def->results[r]; r++)
            ck_assert_msg(seen[i][r], "op %s lists '%s' but no job wrote it", def->name,
                          def->results[r]);
    }
    cv_lap_post_destroy(kept);
    free(seen);
    free(prev);
    fx_free(&f);
}
END_TEST

/* The engine's exact products refuse the Kronecker curvatures (ops reach
 * them through api/op_kron.c's operator), with a 400 invalid_curvature. */
START_TEST(engine_refuses_kronecker_kinds)
{
    fixture f;
    fx_make(&f);
    cv_err e;
    cv_curv_options co = {0};
    cv_curv *c = cv_curv_new(&f.m, &f.d, &co, &e);
    ck_assert_ptr_nonnull(c);
    cv_block b;
    cv_block_full(&f.m, &b);
    double *x = calloc(b.dim, sizeof(double)), *y = calloc(b.dim * b.dim, sizeof(double)), q;
    for (int k = CV_CURV_EXACT_COUNT; k < CV_CURV_COUNT; k++) {
        ck_assert(cv_curvature_is_kron((cv_curvature)k));
        ck_assert_int_eq(cv_curv_matvec(c, (cv_curvature)k, &b, 1, x, y, &e), -1);
        ck_assert_str_eq(e.code, "invalid_curvature");
        ck_assert_int_eq(cv_curv_quadform(c, (cv_curvature)k, &b, 1, x, &q, &e), -1);
        ck_assert_int_eq(cv_curv_dense(c, (cv_curvature)k, &b, b.dim, y, &e), -1);
        ck_assert_str_eq(e.code, "invalid_curvature");
    }
    ck_assert(!cv_curvature_is_kron(CV_CURV_EF));
    free(x);
    free(y);
    cv_curv_free(c);
    fx_free(&f);
}
END_TEST

/* Binding: batch and block names are checked against the dataset and model. */
START_TEST(bind_checks_batch_and_blocks)
{
    fixture f;
    fx_make(&f);
    static const bind_refusal bad[] = {
        {"{\"op\":\"loss\",\"batch\":{\"offset\":12}}", "invalid_batch", "batch.offset",
         "batch [12, 13) is not inside the dataset's 12 samples"},
        {"{\"op\":\"loss\",\"batch\":{\"size\":13}}", "invalid_batch", "batch.size",
         "batch [0, 13) is not inside the dataset's 12 samples"},
        {"{\"op\":\"loss\",\"batch\":{\"offset\":0,\"size\":13}}", "invalid_batch",
         "batch.offset", "batch [0, 13) is not inside the dataset's 12 samples"},
        {"{\"op\":\"loss\",\"batch\":{\"offset\":10,\"size\":3}}", "invalid_batch",
         "batch.offset", "batch [10, 13) is not inside the dataset's 12 samples"},
        {"{\"op\":\"loss\",\"batch\":{\"indices\":[0,12]}}", "invalid_batch", "batch.indices[1]",
         "sample index 12 is beyond the dataset's 12 samples"},
        {"{\"op\":\"trace\",\"blocks\":[[\"0.weight\",\"9.bias\"]]}", "unknown_parameter",
         "blocks[0][1]", "the model has no parameter named '9.bias'; did you mean '0.bias'?"},
        {"{\"op\":\"trace\",\"blocks\":[[\"nothing.like.it\"]]}", "unknown_parameter",
         "blocks[0][0]", "the model has no parameter named 'nothing.like.it'"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        expect_bind_refused(&f.m, &f.d, &bad[i]);
    /* a range: offset+size, offset alone (to the end), size alone (from 0) */
    static const struct {
        const char *job;
        int n;
    } good[] = {
        {"{\"op\":\"loss\",\"batch\":{\"offset\":4,\"size\":8}}", 8},
        {"{\"op\":\"loss\",\"batch\":{\"offset\":5}}", 7},
        {"{\"op\":\"loss\",\"batch\":{\"offset\":11}}", 1},
        {"{\"op\":\"loss\",\"batch\":{\"size\":3}}", 3},
        {"{\"op\":\"loss\",\"batch\":{}}", 12},
    };
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        cv_err e;
        cv_job_spec *j = parse(good[i].job, &e);
        ck_assert_int_eq(cv_job_bind(j, &f.m, &f.d, &e), 0);
        cJSON *res = cv_job_exec(j, &f.m, &f.d, NULL, NULL, &e);
        ck_assert_msg(res != NULL, "%s: %s", good[i].job, e.message);
        ck_assert_int_eq((int)cJSON_GetObjectItem(res, "batch_size")->valuedouble, good[i].n);
        cJSON_Delete(res);
        cv_job_spec_free(j);
    }
    fx_free(&f);
}
END_TEST

/* Binding: options whose bounds are sizes of the model are checked against
 * each bound block at submit (400), not when the job runs: matvec's vector
 * length, eigen's k for lanczos and power (per block: "layer" refuses a k
 * above its smallest block); gram's k caps the rank and binds. */
START_TEST(bind_checks_option_sizes)
{
    fixture f;
    fx_make(&f);
    static const bind_refusal bad[] = {
        {"{\"op\":\"matvec\",\"options\":{\"vector\":[1,2,3]}}", "invalid_vector",
         "options.vector", "options.vector has 3 entries, the block has dimension 43"},
        {"{\"op\":\"matvec\",\"blocks\":[[\"2.bias\"]],\"options\":{\"vector\":[1,2]}}",
         "invalid_vector", "options.vector", "options.vector has 2 entries, the block has "
         "dimension 3"},
        {"{\"op\":\"eigen\",\"options\":{\"k\":44}}", "invalid_option", "options.k",
         "k = 44 exceeds the block dimension 43"},
        {"{\"op\":\"eigen\",\"blocks\":\"layer\",\"options\":{\"k\":19}}", "invalid_option",
         "options.k", "k = 19 exceeds the block dimension 18"},
        {"{\"op\":\"eigen\",\"blocks\":[[\"2.bias\"]],\"options\":{\"method\":\"power\","
         "\"k\":4}}",
         "invalid_option", "options.k", "k = 4 exceeds the block dimension 3"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        expect_bind_refused(&f.m, &f.d, &bad[i]);
    static const char *const good[] = {
        "{\"op\":\"matvec\",\"blocks\":[[\"2.bias\"]],\"options\":{\"vector\":[1,2,3]}}",
        "{\"op\":\"matvec\",\"options\":{\"probe_seed\":3}}",
        "{\"op\":\"eigen\",\"blocks\":\"layer\",\"options\":{\"k\":18}}",
        "{\"op\":\"eigen\",\"curvature\":\"ggn\",\"options\":{\"method\":\"gram\",\"k\":50}}",
    };
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        cv_err e;
        cv_job_spec *j = accepted(good[i]);
        ck_assert_msg(cv_job_bind(j, &f.m, &f.d, &e) == 0, "%s: %s", good[i], e.message);
        cv_job_spec_free(j);
    }
    fx_free(&f);
}
END_TEST

/* A block name that cannot be copied: the job is refused with out_of_memory
 * and the spec freed with exactly the names copied so far (before the fix
 * the free summed group lengths not yet written: garbage under ASan or
 * valgrind). */
START_TEST(parse_out_of_memory_in_blocks)
{
    static const char *const text =
        "{\"op\":\"trace\",\"blocks\":[[\"0.weight\",\"0.bias\"],[\"2.weight\"],"
        "[\"2.bias\",\"4.bias\",\"4.weight\"],[\"6.weight\"]]}";
    cJSON *doc = cJSON_Parse(text);
    ck_assert_ptr_nonnull(doc);
    for (int k = 1; k <= 7; k++) {
        cv_err e;
        cv_err_clear(&e);
        strdup_fail_in = k;
        cv_job_spec *j = cv_job_parse(doc, &e);
        int left = strdup_fail_in;
        strdup_fail_in = 0;
        ck_assert_msg(j == NULL && left == 0, "name %d: %s", k, j ? "accepted" : "not reached");
        ck_assert_int_eq(e.status, CV_ENOMEM);
        ck_assert_str_eq(e.code, "out_of_memory");
    }
    strdup_fail_in = 8; /* seven names: the eighth call never comes */
    cv_err e;
    cv_job_spec *j = cv_job_parse(doc, &e);
    strdup_fail_in = 0;
    ck_assert_ptr_nonnull(j);
    ck_assert_int_eq(j->blocks.nnames, 7);
    cv_job_spec_free(j);
    cJSON_Delete(doc);
}
END_TEST

/* ---- solve with a given right-hand side -------------------------------------------- */

/* Runs the bound solve job text with rhs b (n numbers) on f; returns the
 * solution (n doubles, caller frees) and the bound block in *blk. */
static double *solve_with(fixture *f, const char *fmt, const double *b, int n, cv_block *blk)
{
    size_t len = 64 + 26 * (size_t)n, used = 0;
    char *list = malloc(len), *text = malloc(len + 512);
    used += (size_t)snprintf(list, len, "[");
    for (int i = 0; i < n; i++)
        used += (size_t)snprintf(list + used, len - used, "%s%.17g", i ? "," : "", b[i]);
    snprintf(list + used, len - used, "]");
    snprintf(text, len + 512, fmt, list);
    cv_err e;
    cv_job_spec *j = parse(text, &e);
    ck_assert_msg(j != NULL, "%s: %s", text, e.message);
    ck_assert_msg(cv_job_bind(j, &f->m, &f->d, &e) == 0, "%s: %s", text, e.message);
    *blk = j->blocks.resolved[0];
    cJSON *res = cv_job_exec(j, &f->m, &f->d, NULL, NULL, &e);
    ck_assert_msg(res != NULL, "%s: %s", text, e.message);
    const cJSON *blocks = cJSON_GetObjectItem(res, "blocks");
    const cJSON *r = blocks ? cJSON_GetArrayItem(blocks, 0) : res;
    ck_assert(cJSON_IsTrue(cJSON_GetObjectItem(r, "converged")));
    const cJSON *sol = cJSON_GetObjectItem(r, "solution"), *x;
    ck_assert_int_eq(cJSON_GetArraySize(sol), n);
    double *out = malloc(sizeof(double) * (size_t)n);
    int i = 0;
    cJSON_ArrayForEach(x, sol) out[i++] = x->valuedouble;
    cJSON_Delete(res);
    cv_job_spec_free(j);
    free(list);
    free(text);
    return out;
}

/* x = (A + damping I)^-1 b by LAPACK, A the dense GGN of f on block blk. */
static void dense_solve(fixture *f, const cv_block *blk, double damping, const double *b,
                        double *x)
{
    int D = (int)blk->dim;
    cv_batch batch;
    cv_err e;
    ck_assert_int_eq(cv_batch_range(&f->d, 0, f->d.n, &batch, &e), 0);
    cv_curv *c = cv_curv_new(&f->m, &batch, NULL, &e);
    ck_assert_ptr_nonnull(c);
    double *Id = calloc((size_t)D * D, sizeof(double)), *A = malloc(sizeof(double) * D * D);
    for (int i = 0; i < D; i++)
        Id[i + (size_t)i * D] = 1;
    ck_assert_int_eq(cv_curv_matvec(c, CV_CURV_GGN, blk, D, Id, A, &e), 0);
    for (int i = 0; i < D; i++)
        A[i + (size_t)i * D] += damping;
    int *piv = malloc(sizeof(int) * D);
    memcpy(x, b, sizeof(double) * D);
    ck_assert_int_eq(LAPACKE_dgesv(LAPACK_COL_MAJOR, D, 1, A, D, piv, x, D), 0);
    free(piv);
    free(A);
    free(Id);
    cv_curv_free(c);
    cv_dataset_free(&batch);
}

/* rhs as a list: (A + damping I) x = b on the full block and on one group
 * (CG and MINRES), against a dense solve; "gradient" as a list gives the
 * default's solution; refused at submit (parse or bind) with field
 * options.rhs when it is not a list of D finite numbers or the job has more
 * than one block. */
START_TEST(solve_rhs_list)
{
    fixture f;
    fx_make(&f);
    int D = (int)f.m.nparams_total;
    double *b = malloc(sizeof(double) * D), *ref = malloc(sizeof(double) * D);
    cv_rng r;
    cv_rng_seed(&r, 11);
    cv_rng_gaussian(&r, b, (size_t)D);
    cv_block blk;
    double *x = solve_with(&f, "{\"op\":\"solve\",\"curvature\":\"ggn\",\"options\":{\"damping\":"
                               "0.5,\"tol\":1e-12,\"max_iter\":500,\"rhs\":%s}}",
                           b, D, &blk);
    ck_assert_int_eq((int)blk.dim, D);
    dense_solve(&f, &blk, 0.5, b, ref);
    double err = tu_relerr(x, ref, (size_t)D, 1e-12);
    ck_assert_msg(err < 1e-6, "full block: |x - x_dense| / |x_dense| = %g", err);
    free(x);

    /* one group: 2.weight and 2.bias (5*3 + 3 = 18 parameters), MINRES */
    x = solve_with(&f, "{\"op\":\"solve\",\"curvature\":\"ggn\",\"blocks\":[[\"2.weight\","
                       "\"2.bias\"]],\"options\":{\"method\":\"minres\",\"damping\":0.25,"
                       "\"tol\":1e-12,\"max_iter\":500,\"rhs\":%s}}",
                   b, 18, &blk);
    ck_assert_int_eq((int)blk.dim, 18);
    dense_solve(&f, &blk, 0.25, b, ref);
    err = tu_relerr(x, ref, 18, 1e-12);
    ck_assert_msg(err < 1e-6, "one group: |x - x_dense| / |x_dense| = %g", err);
    free(x);

    /* the gradient given as a list solves the same system as the default */
    cv_batch batch;
    cv_err e;
    ck_assert_int_eq(cv_batch_range(&f.d, 0, f.d.n, &batch, &e), 0);
    cv_curv *c = cv_curv_new(&f.m, &batch, NULL, &e);
    cv_block full;
    cv_block_full(&f.m, &full);
    ck_assert_int_eq(cv_curv_gradient(c, &full, b, &e), 0);
    cv_curv_free(c);
    cv_dataset_free(&batch);
    x = solve_with(&f, "{\"op\":\"solve\",\"curvature\":\"ggn\",\"options\":{\"damping\":1,"
                       "\"tol\":1e-12,\"rhs\":%s}}",
                   b, D, &blk);
    double *g = solve_with(&f, "{\"op\":\"solve\",\"curvature\":\"ggn\",\"options\":{\"damping\":1,"
                               "\"tol\":1e-12,\"rhs\":\"gradient\"%.0s}}",
                           b, D, &blk);
    ck_assert_msg(tu_relerr(x, g, (size_t)D, 1e-12) < 1e-12, "gradient as a list differs");
    free(x);
    free(g);

    /* refused at parse */
    refused("{\"op\":\"solve\",\"options\":{\"rhs\":\"grad\"}}", "invalid_option", "options.rhs",
            "options.rhs must be one of gradient or a list of numbers");
    refused("{\"op\":\"solve\",\"options\":{\"rhs\":0}}", "invalid_option", "options.rhs",
            "options.rhs must be one of gradient or a list of numbers");
    refused("{\"op\":\"solve\",\"options\":{\"rhs\":[1,\"2\"]}}", "invalid_option", "options.rhs",
            "options.rhs[1] is not a finite number");
    refused("{\"op\":\"solve\",\"options\":{\"rhs\":[1e999]}}", "invalid_option", "options.rhs",
            "options.rhs[0] is not a finite number");
    refused("{\"op\":\"solve\",\"blocks\":[[\"0.bias\"],[\"2.bias\"]],\"options\":{\"rhs\":[1,2,3]}}",
            "invalid_option", "options.rhs", "needs one block");
    /* refused at bind: the length against the block, and "layer" giving two blocks */
    static const struct {
        const char *job, *msg;
    } bad[] = {
        {"{\"op\":\"solve\",\"options\":{\"rhs\":[1,2,3]}}",
         "options.rhs has 3 numbers; the block has 43 parameters"},
        {"{\"op\":\"solve\",\"blocks\":[[\"2.bias\"]],\"options\":{\"rhs\":[1,2]}}",
         "options.rhs has 2 numbers; the block has 3 parameters"},
        {"{\"op\":\"solve\",\"blocks\":\"layer\",\"options\":{\"rhs\":[1,2,3]}}",
         "the job has 2 blocks"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        cv_job_spec *j = accepted(bad[i].job);
        ck_assert_int_eq(cv_job_bind(j, &f.m, &f.d, &e), -1);
        ck_assert_int_eq(e.status, CV_EINVAL);
        ck_assert_str_eq(e.code, "invalid_option");
        ck_assert_str_eq(e.field, "options.rhs");
        ck_assert_msg(strstr(e.message, bad[i].msg) != NULL, "%s: '%s'", bad[i].job, e.message);
        cv_job_spec_free(j);
    }
    /* a right length binds */
    cv_job_spec *j = accepted("{\"op\":\"solve\",\"blocks\":[[\"2.bias\"]],\"options\":{\"rhs\":[1,2,3]}}");
    ck_assert_int_eq(cv_job_bind(j, &f.m, &f.d, &e), 0);
    cv_job_spec_free(j);
    free(b);
    free(ref);
    fx_free(&f);
}
END_TEST

/* ---- strict JSON ------------------------------------------------------------------- */

/* text (len bytes; 0: strlen) must be refused with code and field, and a
 * message holding msg. */
static void strict_refused(const char *text, size_t len, const char *code, const char *field,
                           const char *msg)
{
    cv_err e;
    cv_err_clear(&e);
    cJSON *doc = cv_json_parse_strict(text, len ? len : strlen(text), "doc", "", &e);
    ck_assert_msg(doc == NULL, "accepted: %s", text);
    cJSON_Delete(doc);
    ck_assert_int_eq(e.status, CV_EINVAL);
    ck_assert_msg(strcmp(e.code, code) == 0, "%s: code %s (%s)", text, e.code, e.message);
    ck_assert_msg(strcmp(e.field, field) == 0, "%s: field '%s'", text, e.field);
    ck_assert_msg(strstr(e.message, msg) != NULL, "%s: message '%s' lacks '%s'", text,
                  e.message, msg);
}

static void strict_accepted(const char *text)
{
    cv_err e;
    cJSON *doc = cv_json_parse_strict(text, strlen(text), "doc", "", &e);
    ck_assert_msg(doc != NULL, "%s refused: %s (%s, field %s)", text, e.message, e.code,
                  e.field);
    cJSON_Delete(doc);
}

START_TEST(strict_json_refusals)
{
    /* duplicate keys at any depth, named by their path */
    strict_refused("{\"op\":\"loss\",\"op\":\"trace\"}", 0, "duplicate_field", "op",
                   "key 'op' is given twice in the top-level object");
    strict_refused("{\"options\":{\"k\":2,\"k\":3}}", 0, "duplicate_field", "options.k",
                   "in options");
    strict_refused("{\"a\":[{\"b\":{}},{\"b\":{\"x\":1,\"y\":2,\"x\":3}}]}", 0,
                   "duplicate_field", "a[1].b.x", "key 'x'");
    /* a large object is sorted, not compared pairwise */
    char big[4096];
    size_t n = (size_t)snprintf(big, sizeof big, "{");
    for (int i = 0; i < 200; i++)
        n += (size_t)snprintf(big + n, sizeof big - n, "\"k%d\":%d,", i, i);
    snprintf(big + n, sizeof big - n, "\"k17\":0}");
    strict_refused(big, 0, "duplicate_field", "k17", "key 'k17'");
    big[n - 1] = '}';
    big[n] = 0;
    strict_accepted(big);
    /* trailing data; white space after the value is fine */
    strict_refused("{\"a\":1} x", 0, "invalid_json", "", "trailing characters");
    strict_refused("{\"a\":1}{}", 0, "invalid_json", "", "trailing characters");
    strict_refused("{\"a\":1}\0x", 9, "invalid_json", "", "trailing characters");
    strict_accepted("{\"a\":1} \n\t\r ");
    /* NUL in strings and keys, escaped or raw */
    strict_refused("{\"op\":\"loss\\u0000x\"}", 0, "nul_in_string", "op", "NUL");
    strict_refused("{\"blocks\":[[\"a\",\"b\\u0000\"]]}", 0, "nul_in_string",
                   "blocks[0][1]", "the string at 'blocks[0][1]'");
    strict_refused("{\"o\":{\"k\\u0000\":1}}", 0, "nul_in_string", "o.k", "the key");
    strict_refused("{\"op\":\"lo\0ss\"}", 14, "nul_in_string", "op", "NUL");
    strict_accepted("{\"op\":\"\\\\u0000\"}"); /* an escaped backslash, then text */
    /* control characters cJSON takes for white space, and raw ones in strings */
    strict_refused("{\x01\"a\":1}", 0, "invalid_json", "", "control character 0x01");
    strict_refused("\0{\"a\":1}", 8, "invalid_json", "", "control character 0x00");
    strict_refused("{\"a\":\"x\ty\"}", 0, "invalid_json", "", "unescaped control character");
    /* numbers outside the JSON grammar */
    strict_refused("{\"a\":01}", 0, "invalid_json", "", "malformed number");
    strict_refused("{\"a\":1.}", 0, "invalid_json", "", "malformed number");
    strict_refused("{\"a\":-.5}", 0, "invalid_json", "", "malformed number");
    strict_refused("{\"a\":1.e3}", 0, "invalid_json", "", "malformed number");
    strict_accepted("{\"a\":[0,-0,1.5,-2e-3,1E+9,10,0.25]}");
    /* plain syntax errors keep their message; the path prefix names them */
    cv_err e;
    ck_assert_ptr_null(cv_json_parse_strict("{\"a\":", 5, "architecture", "architecture", &e));
    ck_assert_str_eq(e.code, "invalid_json");
    ck_assert_str_eq(e.field, "architecture");
    ck_assert_msg(strstr(e.message, "architecture is not valid JSON"), "%s", e.message);
    static const char dup_layer[] = "{\"layers\":[{\"a\":1,\"a\":2}]}";
    ck_assert_ptr_null(cv_json_parse_strict(dup_layer, strlen(dup_layer), "architecture",
                                            "architecture", &e));
    ck_assert_str_eq(e.field, "architecture.layers[0].a");
}
END_TEST

START_TEST(parameter_in_two_blocks)
{
    refused("{\"op\":\"trace\",\"blocks\":[[\"0.weight\"],[\"0.bias\",\"0.weight\"]]}",
            "invalid_blocks", "blocks[1][1]",
            "parameter '0.weight' is named twice: blocks[0][0] and blocks[1][1]");
    refused("{\"op\":\"trace\",\"blocks\":[[\"a\",\"b\",\"a\"]]}", "invalid_blocks",
            "blocks[0][2]", "parameter 'a' is named twice: blocks[0][0] and blocks[0][2]");
    cv_job_spec *j = accepted("{\"op\":\"trace\",\"blocks\":[[\"a\",\"b\"],[\"c\"]]}");
    cv_job_spec_free(j);
}
END_TEST

static Suite *ops_suite(void)
{
    Suite *s = suite_create("ops");
    TCase *t = tcase_create("table");
    tcase_set_timeout(t, 120);
    tcase_add_test(t, edit_distance_and_suggest);
    tcase_add_test(t, did_you_mean_ops_options_fields);
    tcase_add_test(t, method_options_refused_for_other_methods);
    tcase_add_test(t, method_applicability_follows_the_table);
    tcase_add_test(t, options_land_in_engine_structs);
    tcase_add_test(t, ops_document_shape);
    tcase_add_test(t, option_tables_fit_the_given_bits);
    tcase_add_test(t, results_match_the_table);
    tcase_add_test(t, engine_refuses_kronecker_kinds);
    tcase_add_test(t, bind_checks_batch_and_blocks);
    tcase_add_test(t, bind_checks_option_sizes);
    tcase_add_test(t, parse_out_of_memory_in_blocks);
    tcase_add_test(t, solve_rhs_list);
    tcase_add_test(t, strict_json_refusals);
    tcase_add_test(t, parameter_in_two_blocks);
    suite_add_tcase(s, t);
    return s;
}

int main(void) { return tu_main(ops_suite); }
