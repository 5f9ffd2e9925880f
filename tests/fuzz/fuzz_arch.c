/* fuzz_arch.c - libFuzzer harness: an architecture document (docs/interface.md
 * §1) through cv_arch_parse (strict JSON, layers, shapes, parameter layout).
 * A document that parses must print back (cv_arch_to_json) into one that
 * parses to a model with the same layer and parameter counts and prints the
 * same again (printing is a fixed point); anything else aborts. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/arch.h"
#include "tests/fuzz/fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    cv_model m;
    cv_err e;
    if (cv_arch_parse((const char *)data, size, &m, &e)) {
        cv_model_free(&m);
        return 0;
    }
    cJSON *j = cv_arch_to_json(&m);
    char *t = j ? cJSON_PrintUnformatted(j) : NULL;
    cJSON_Delete(j);
    if (!t)
        abort();
    cv_model m2;
    if (cv_arch_parse(t, strlen(t), &m2, &e)) {
        fprintf(stderr, "the printed architecture does not parse: %s\n%s\n", e.message, t);
        abort();
    }
    cJSON *j2 = cv_arch_to_json(&m2);
    char *t2 = j2 ? cJSON_PrintUnformatted(j2) : NULL;
    cJSON_Delete(j2);
    if (!t2)
        abort();
    if (m2.nparams_total != m.nparams_total || m2.nlayers != m.nlayers || strcmp(t, t2) != 0) {
        fprintf(stderr, "the printed architecture reads back different\n%s\n%s\n", t, t2);
        abort();
    }
    free(t2);
    free(t);
    cv_model_free(&m2);
    cv_model_free(&m);
    return 0;
}
