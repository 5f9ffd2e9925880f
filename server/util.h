/* util.h - small helpers shared by the server modules: wall-clock time,
 * JSON timestamps and numbers. */
#ifndef CV_SERVER_UTIL_H
#define CV_SERVER_UTIL_H

#include <cJSON.h>
#include <stddef.h>

#include "api/curvd.h"

#define CV_SERVER_VERSION CURVD_VERSION

/* Wall-clock epoch seconds (timestamps shown to users). */
double cv_wall_s(void);
/* Adds an RFC 3339 UTC timestamp with milliseconds ("2024-05-01T12:00:00.123Z"),
 * or null for t <= 0.  Returns 0, -1 on allocation failure. */
int cv_json_add_time(cJSON *obj, const char *key, double t);
/* Adds a JSON array of n sizes. */
int cv_json_add_sizes(cJSON *obj, const char *key, const size_t *v, int n);
/* Parses a non-negative decimal number (seconds, bytes, counts) from s;
 * returns 0 on success (whole string consumed, finite, in [lo, hi]). */
int cv_parse_double(const char *s, double lo, double hi, double *out);
int cv_parse_size(const char *s, size_t lo, size_t hi, size_t *out);
/* Replaces every byte of s that is not part of well-formed UTF-8 with '?'
 * in place (error messages may quote client bytes; JSON must stay valid). */
void cv_utf8_sanitize(char *s);

/* Process-wide allocator policy for job memory (call once at start-up):
 * blocks up to 32 MiB come from the heap, and up to 512 MiB of freed heap
 * is kept, so the next job reuses the last one's pages instead of faulting
 * in fresh ones (on virtual machines first touch costs ~1.5 GB/s, a third
 * of a CNN gradient).  Bigger blocks are mapped and unmapped as usual. */
void cv_tune_allocator(void);

#endif
