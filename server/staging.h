/* staging.h - datasets uploaded in parts (POST /v1/datasets/{name}/parts,
 * then POST /v1/datasets/{name}/commit; docs/interface.md, "Large datasets").
 *
 * Each name has at most one staging area: the rows of its parts so far, in
 * one growing set of arrays (x float32, y int64 labels or float32 targets)
 * that the commit hands to the registry as they are (shrunk to fit, no second
 * copy).  A part is a dataset upload body of its own (safetensors "x" and
 * "y", api/datafile.c, with the same checks); every part must have the first
 * part's per-sample shapes and dtypes (400 part_mismatch naming what
 * differs).  The arrays' capacity is reserved in the registry's budget
 * (cv_registry_reserve) before it is allocated: staged bytes count against
 * --max-registry-bytes, and the commit moves them into the new snapshot.
 *
 * One request at a time works on an area: a part, commit or delete that
 * arrives while another is in progress is refused with 409 upload_busy.
 * Until the commit the name is not a dataset (GET /v1/datasets/{name} is 404,
 * jobs cannot use it).  A failed commit (409 already_exists, 413/429
 * registry_full) keeps the area for a retry.  An area untouched for
 * timeout_s seconds is dropped by cv_staging_sweep, as is one deleted
 * (DELETE /v1/datasets/{name}/parts).
 *
 * Thread-safe: a mutex guards the table; an area being worked on is marked
 * busy and touched only by the request that marked it.
 */
#ifndef CV_STAGING_H
#define CV_STAGING_H

#include <cJSON.h>
#include <stddef.h>

#include "engine/err.h"
#include "server/registry.h"

typedef struct cv_staging cv_staging;

/* timeout_s <= 0: areas never expire. */
cv_staging *cv_staging_new(cv_registry *reg, double timeout_s);
/* Drops every area (their reservations are released). */
void cv_staging_free(cv_staging *s);

/* Appends the rows of buf (a safetensors dataset) to name's area, creating
 * it with the first part.  *out (if non-NULL): the area's description. */
int cv_staging_append(cv_staging *s, const char *name, const void *buf, size_t len,
                      cJSON **out, cv_err *e);
/* The area's description, or 404. */
int cv_staging_describe(cv_staging *s, const char *name, cJSON **out, cv_err *e);
/* Registers the assembled dataset: replace 0 like POST (409 if the name
 * exists), 1 like PUT (create or replace).  expect_n / expect_parts >= 0:
 * the rows / parts the client sent, checked first (400 upload_incomplete).
 * On success the area is gone and *out holds a reference to the snapshot. */
int cv_staging_commit(cv_staging *s, const char *name, int replace, long long expect_n,
                      long long expect_parts, int *created, cv_snap **out, cv_err *e);
/* Drops the area (404 if none, 409 while a request works on it). */
int cv_staging_drop(cv_staging *s, const char *name, cv_err *e);
/* Drops the areas idle for longer than the timeout at time now (cv_now_s
 * seconds); returns how many. */
int cv_staging_sweep(cv_staging *s, double now);
/* Areas and the bytes they hold. */
void cv_staging_stats(cv_staging *s, int *areas, size_t *bytes);

#endif
