/* arch.h - the architecture JSON document (docs/interface.md §1) <-> cv_model.
 *
 * Mirrors torch.nn.Sequential: {"input_shape": [...], "layers": [{"type":
 * "Linear", "in_features": ..., ...}, ...], "loss": {"type", "reduction"}}
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

#endif
