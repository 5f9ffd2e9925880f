/* fuzz_job.c - libFuzzer harness: a job document (the body of POST
 * /v1/jobs) through strict JSON parsing, cv_job_parse, cv_job_bind against
 * a small model and dataset ("model": "cnn" picks the convolutional one,
 * anything else the MLP) and the memory plan (cv_job_check_memory: a probe
 * on one and two samples).  The job never runs.  Also differentially: the
 * compact batch.indices reader (cv_job_text_indices, used for large POST
 * /v1/jobs bodies) against the tree parser: the same indices, or the same
 * parse error; a difference aborts. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "api/job.h"
#include "api/json_strict.h"
#include "tests/fuzz/fuzz_common.h"

static cv_model mlp, cnn;
static cv_dataset mlp_data, cnn_data;

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    cv_fz_models(&mlp, &cnn, &mlp_data, &cnn_data);
    return 0;
}

/* 1 when doc's batch.indices holds exactly idx[0..n). */
static int same_indices(const cJSON *doc, const int32_t *idx, size_t n)
{
    const cJSON *b = cJSON_GetObjectItemCaseSensitive(doc, "batch");
    const cJSON *a = b ? cJSON_GetObjectItemCaseSensitive(b, "indices") : NULL;
    if (!cJSON_IsArray(a) || (size_t)cJSON_GetArraySize(a) != n)
        return 0;
    size_t i = 0;
    for (const cJSON *x = a->child; x; x = x->next, i++)
        if (!cJSON_IsNumber(x) || x->valuedouble != (double)idx[i])
            return 0;
    return 1;
}

static void check_indices_apart(const uint8_t *data, size_t size)
{
    char *rest = NULL;
    size_t rest_len = 0, n = 0;
    int32_t *idx = NULL;
    if (cv_job_text_indices((const char *)data, size, &rest, &rest_len, &idx, &n) != 1)
        return;
    cv_err e1, e2;
    cJSON *whole = cv_json_parse_strict((const char *)data, size, "the job", "", &e1);
    cJSON *apart = cv_json_parse_strict(rest, rest_len, "the job", "", &e2);
    if (!whole != !apart || (!whole && strcmp(e1.message, e2.message) != 0) ||
        (whole && !same_indices(whole, idx, n)))
        abort();
    cJSON_Delete(whole);
    cJSON_Delete(apart);
    free(rest);
    free(idx);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    check_indices_apart(data, size);
    cv_err e;
    cJSON *doc = cv_json_parse_strict((const char *)data, size, "the job", "", &e);
    if (!doc)
        return 0;
    cv_job_spec *spec = cv_job_parse(doc, &e);
    cJSON_Delete(doc);
    if (!spec)
        return 0;
    int cnn_job = spec->model && strcmp(spec->model, "cnn") == 0;
    const cv_model *m = cnn_job ? &cnn : &mlp;
    const cv_dataset *d = cnn_job ? &cnn_data : &mlp_data;
    (void)cv_job_op_name(spec);
    if (cv_job_bind(spec, m, d, &e) == 0) {
        cv_job_limits lim;
        cv_job_limits_default(&lim);
        lim.job_memory = (size_t)64 << 20;
        (void)cv_job_batch_size(spec, d->n);
        (void)cv_job_check_memory(spec, m, d, &lim, NULL, &e);
    }
    cv_job_spec_free(spec);
    return 0;
}
