/* arch_internal.h - what api/arch.c shares with api/arch_graph.c: JSON paths
 * and error helpers, and reading/writing a layer's attributes through its
 * class's field table.  Not an API for other modules. */
#ifndef CV_ARCH_INTERNAL_H
#define CV_ARCH_INTERNAL_H

#include <cJSON.h>
#include <stddef.h>

#include "engine/err.h"
#include "engine/layer.h"
#include "engine/model.h"

/* buf = "obj.key" (or "key"), truncated to len. */
void cv_arch_join(char *buf, size_t len, const char *obj, const char *key);
/* Sets e: code at path, "path: what[, got <kind of got>]"; returns -1. */
int cv_arch_bad(cv_err *e, const char *code, const char *path, const char *what,
                const cJSON *got);
/* Rejects keys of object o (at obj) not in allowed (NULL-terminated) and
 * duplicate keys; `what` names the object in the message. */
int cv_arch_check_keys(const cJSON *o, const char *obj, const char *what,
                       const char *const *allowed, cv_err *e);
int cv_arch_as_int(const cJSON *v, const char *path, int min, int *out, cv_err *e);
/* The string "type" of o, or NULL after an error (path gets "obj.type"). */
const cJSON *cv_arch_type_field(const cJSON *o, const char *obj, const char *what, char *path,
                                size_t len, cv_err *e);
/* "unknown layer type" with the supported module types and a hint; -1. */
int cv_arch_unknown_type(const char *path, const char *name, cv_err *e);

/* Initializes L with class cls and reads cls's fields from o (at obj); keys
 * in extra (NULL-terminated) are allowed besides the fields; runs the
 * class's check hook. */
int cv_arch_parse_fields(const cJSON *o, const char *obj, const cv_layer_class *cls,
                         const char *const *extra, cv_layer *L, cv_err *e);
/* Writes L's attributes (not "type") into o. */
int cv_arch_fields_to_json(const cv_layer *L, cJSON *o);

/* The graph form (api/arch_graph.c): reads "modules" and "nodes" of doc
 * (paths under pre) into m's layers and wiring; m->graph = 1. */
int cv_arch_graph_from_json(const cJSON *doc, const char *pre, cv_model *m, cv_err *e);
/* Adds "modules" and "nodes" of graph model m to doc. */
int cv_arch_graph_to_json(const cv_model *m, cJSON *doc);

#endif
