/* fuzz_job.c - libFuzzer harness: a job document (the body of POST
 * /v1/jobs) through strict JSON parsing, cv_job_parse, cv_job_bind against
 * a small model and dataset ("model": "cnn" picks the convolutional one,
 * anything else the MLP) and the memory plan (cv_job_check_memory: a probe
 * on one and two samples).  The job never runs. */
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
    cv_fz_model(cv_fz_arch_mlp, &mlp);
    cv_fz_model(cv_fz_arch_cnn, &cnn);
    cv_fz_data(&mlp, 16, &mlp_data);
    cv_fz_data(&cnn, 8, &cnn_data);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
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
