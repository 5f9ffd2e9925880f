/* arch.h - the architecture JSON document (docs/interface.md §1) <-> cv_model.
 *
 * Mirrors torch.nn.Sequential: {"input_shape": [...], "layers": [{"type":
 * "Linear", "in_features": ..., ...}, ...], "loss": {"type", "reduction",
 * and for CrossEntropyLoss/NLLLoss "class_dim", "ignore_index",
 * CrossEntropyLoss's "label_smoothing"}}
 * with PyTorch's type and attribute names and defaults.  Unknown or
 * ill-typed fields are errors whose cv_err.field is the JSON path
 * (e.g. "layers[2].kernel_size").
 */
#ifndef CV_ARCH_H
#define CV_ARCH_H

#include <cJSON.h>
#include <stddef.h>

#include "engine/err.h"
#include "engine/model.h"

/* Parses an architecture document into *m and finalizes it (shapes,
 * parameter layout); parameter storage is not allocated (m->params = NULL).
 * prefix, if non-NULL and non-empty, is prepended to error field paths
 * (e.g. "architecture" gives "architecture.layers[0].type"). */
int cv_arch_from_json(const cJSON *doc, const char *prefix, cv_model *m, cv_err *e);
/* Same from text (len bytes, need not be NUL-terminated). */
int cv_arch_parse(const char *text, size_t len, cv_model *m, cv_err *e);
int cv_arch_load(const char *path, cv_model *m, cv_err *e);

/* The architecture document of a finalized model, every attribute explicit
 * (cJSON_Delete it); NULL on allocation failure.  Parsing it gives back the
 * same model. */
cJSON *cv_arch_to_json(const cv_model *m);

/* The document's optional "input_dtype" ("float32" (default), "int64" or
 * "int32": token ids for Embedding) into m->input_dtype.  Errors: field
 * "<prefix.>input_dtype", code "invalid_type" (not a string) or
 * "invalid_value" (another name, with a did-you-mean hint). */
int cv_arch_parse_input_dtype(const cJSON *doc, const char *prefix, cv_model *m, cv_err *e);
/* Adds "input_dtype" to doc unless it is float32 (documents of float models
 * stay as they were).  0, or -1 on allocation failure. */
int cv_arch_input_dtype_to_json(const cv_model *m, cJSON *doc);

#endif
