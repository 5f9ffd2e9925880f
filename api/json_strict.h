/* json_strict.h - strict JSON reading for every document curvd takes (job
 * documents, architectures, HTTP request bodies, `curvd run`'s job file,
 * libcurvd's job and options text).
 *
 * cJSON alone is lax: it keeps every duplicate key (the first one wins on
 * lookup), accepts any byte <= 0x20 as white space, stops at the end of the
 * first value without complaint about what follows, and decodes "\u0000"
 * into a NUL that silently truncates the string ("loss\u0000x" reads as
 * "loss").  cv_json_parse_strict refuses all of these:
 *   invalid_json     not JSON; a control character outside a string (other
 *                    than space, tab, CR, LF) or a raw one inside a string;
 *                    anything but white space after the value
 *   duplicate_field  a key given twice in one object (field: its JSON path,
 *                    e.g. "options.k")
 *   nul_in_string    a NUL in a string or key, "\u0000" or raw (field: the
 *                    path of the string, e.g. "model" or "blocks[0][1]")
 * All are CV_EINVAL (HTTP 400).  Paths are written as the job validator
 * writes them: members joined with '.', array items as [i], below `path`.
 */
#ifndef CV_JSON_STRICT_H
#define CV_JSON_STRICT_H

#include <cJSON.h>
#include <stddef.h>

#include "engine/err.h"

/* Parses len bytes of text (need not be NUL-terminated) as one JSON value.
 * what names the document in messages ("the request body", "architecture");
 * path (NULL or "" for none) is the field of syntax errors and the prefix of
 * the paths of the others.  NULL with e filled when it is not strict JSON. */
cJSON *cv_json_parse_strict(const char *text, size_t len, const char *what, const char *path,
                            cv_err *e);

/* The checks of the text alone (control characters, numbers, NULs; no
 * duplicate keys, no trailing data): text[0..len) is the value cJSON parsed
 * into doc (up to its return_parse_end).  0, or -1 with e filled. */
int cv_json_check_text(const char *text, size_t len, const cJSON *doc, const char *what,
                       const char *path, cv_err *e);

/* The duplicate-key check alone, over a parsed value (every object at any
 * depth); 0, or -1 with e filled (duplicate_field, or out_of_memory). */
int cv_json_unique_keys(const cJSON *v, const char *path, cv_err *e);

#endif
