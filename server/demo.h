/* demo.h - the built-in demo: what `curvd serve` offers with no files.
 *
 *   dataset "digits"          scikit-learn's 8x8 digits (1797 x 64, pixels/16,
 *                             labels 0-9), converted at build time from
 *                             python3-sklearn's digits.csv.gz; a deterministic
 *                             synthetic 10-class set of the same shape when
 *                             that file was absent at build time
 *   model "demo-mlp"          Linear(64,32) Tanh Linear(32,10),
 *                             CrossEntropyLoss(mean); seeded PyTorch-style init,
 *                             then a few hundred plain-SGD steps on digits
 *   dataset "regression"      256 x 4 inputs, 2 smooth targets (synthetic)
 *   model "demo-regression"   Linear(4,16) Tanh Linear(16,2), MSELoss(mean),
 *                             trained the same way
 * Everything is deterministic: the same build gives the same numbers.
 */
#ifndef CV_DEMO_H
#define CV_DEMO_H

#include <stdio.h>

#include "engine/dataset.h"
#include "engine/err.h"
#include "server/registry.h"

/* Registers the demo models and datasets; log (may be NULL) gets one line
 * per model with the loss before and after training. */
int cv_demo_register(cv_registry *reg, FILE *log, cv_err *e);

/* The digits dataset (real or synthetic); *real tells which. */
int cv_demo_digits(cv_dataset *out, int *real, cv_err *e);

#endif
