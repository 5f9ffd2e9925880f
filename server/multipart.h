/* multipart.h - parsing a complete multipart/form-data body (RFC 7578).
 *
 * The HTTP layer accumulates the whole body (bounded by --max-body), so the
 * parser works on one buffer: it finds the boundary in the Content-Type,
 * splits the parts and reads each part's Content-Disposition name (and
 * filename).  Part contents point into the body; nothing is copied.
 */
#ifndef CV_MULTIPART_H
#define CV_MULTIPART_H

#include <stddef.h>

#include "engine/err.h"

#define CV_MP_MAX_PARTS 16

typedef struct {
    char name[64];
    char filename[128];
    const char *data;   /* into the body */
    size_t len;
} cv_mp_part;

typedef struct {
    int nparts;
    cv_mp_part parts[CV_MP_MAX_PARTS];
} cv_multipart;

/* Non-zero if content_type is multipart/form-data (case-insensitive). */
int cv_mp_is_multipart(const char *content_type);

/* Parses body[0..len) with the boundary from content_type.  Returns 0, or
 * -1 with e filled (CV_EINVAL: no boundary, malformed part, duplicate name,
 * too many parts). */
int cv_mp_parse(const char *content_type, const char *body, size_t len, cv_multipart *out,
                cv_err *e);

/* The part named name, or NULL. */
const cv_mp_part *cv_mp_find(const cv_multipart *mp, const char *name);

#endif
