/* b64.h - base64 decoding for JSON-embedded uploads (RFC 4648).
 *
 * Accepts the standard and the URL-safe alphabet, optional '=' padding and
 * ASCII whitespace (line breaks of wrapped encoders).  Anything else is an
 * error that names the byte offset, so a client sees where its data broke.
 */
#ifndef CV_B64_H
#define CV_B64_H

#include <stddef.h>

#include "engine/err.h"

/* Decodes src[0..len) into a new buffer (*out, malloc()ed, *outlen bytes;
 * a valid pointer even for empty input).  field names the JSON field in
 * errors.  Returns 0, or -1 with e filled (CV_EINVAL / CV_ENOMEM). */
int cv_b64_decode(const char *src, size_t len, void **out, size_t *outlen, const char *field,
                  cv_err *e);

/* Encodes (standard alphabet, padded) into a new NUL-terminated string. */
char *cv_b64_encode(const void *src, size_t len);

#endif
