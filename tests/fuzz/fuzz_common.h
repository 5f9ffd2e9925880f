/* fuzz_common.h - what the libFuzzer harnesses (tests/fuzz/fuzz_*.c) share:
 * small models and datasets to parse job documents against and to register
 * behind the HTTP router.  Harnesses abort (a finding) when these fail. */
#ifndef CV_FUZZ_COMMON_H
#define CV_FUZZ_COMMON_H

#include <stddef.h>
#include <stdint.h>

#include "engine/dataset.h"
#include "engine/model.h"

/* Architecture documents of the small models (docs/interface.md §1). */
extern const char *const cv_fz_arch_mlp; /* Linear-ReLU-Linear, CrossEntropyLoss */
extern const char *const cv_fz_arch_cnn; /* Conv2d-ReLU-Flatten-Linear, CrossEntropyLoss */

/* Parses arch into *m (finalized) with deterministic parameters. */
void cv_fz_model(const char *arch, cv_model *m);
/* A dataset of n samples that fits m (deterministic). */
void cv_fz_data(const cv_model *m, size_t n, cv_dataset *d);
/* The harnesses' pair of models (cv_fz_arch_mlp, cv_fz_arch_cnn) and, when
 * mlp_data and cnn_data are non-NULL, their datasets of 16 and 8 samples. */
void cv_fz_models(cv_model *mlp, cv_model *cnn, cv_dataset *mlp_data, cv_dataset *cnn_data);

/* A NUL-terminated copy of data[0..size) (free()). */
char *cv_fz_strndup(const uint8_t *data, size_t size);

#endif
