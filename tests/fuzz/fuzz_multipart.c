/* fuzz_multipart.c - libFuzzer harness: a multipart/form-data body
 * (server/multipart.c).  The input's first line is the Content-Type header's
 * value, the rest the body.  Every part found must lie inside the body, and
 * cv_mp_find must find it. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "server/multipart.h"
#include "tests/fuzz/fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *nl = memchr(data, '\n', size);
    if (!nl)
        return 0;
    char *ct = cv_fz_strndup(data, (size_t)(nl - data));
    size_t blen = size - (size_t)(nl + 1 - data);
    /* the body in a buffer of its own, so that ASan sees reads past it */
    char *body = malloc(blen ? blen : 1);
    if (!body)
        abort();
    memcpy(body, nl + 1, blen);
    (void)cv_mp_is_multipart(ct);
    cv_multipart mp;
    cv_err e;
    if (cv_mp_parse(ct, body, blen, &mp, &e) == 0) {
        for (int i = 0; i < mp.nparts; i++) {
            const cv_mp_part *p = &mp.parts[i];
            if (p->data < body || p->len > blen || (size_t)(p->data - body) > blen - p->len)
                abort();
            if (cv_mp_find(&mp, p->name) != p)
                abort();
        }
    }
    free(body);
    free(ct);
    return 0;
}
