/* fuzz_common.c - small models and datasets for the fuzz harnesses (see
 * fuzz_common.h). */
#include "tests/fuzz/fuzz_common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/arch.h"
#include "engine/err.h"
#include "engine/loss.h"

const char *const cv_fz_arch_mlp =
    "{\"input_shape\": [4], \"layers\": ["
    "{\"type\": \"Linear\", \"in_features\": 4, \"out_features\": 8}, {\"type\": \"ReLU\"}, "
    "{\"type\": \"Linear\", \"in_features\": 8, \"out_features\": 3}], "
    "\"loss\": {\"type\": \"CrossEntropyLoss\"}}";

const char *const cv_fz_arch_cnn =
    "{\"input_shape\": [1, 6, 6], \"layers\": ["
    "{\"type\": \"Conv2d\", \"in_channels\": 1, \"out_channels\": 2, \"kernel_size\": 3}, "
    "{\"type\": \"ReLU\"}, {\"type\": \"Flatten\"}, "
    "{\"type\": \"Linear\", \"in_features\": 32, \"out_features\": 3}], "
    "\"loss\": {\"type\": \"CrossEntropyLoss\"}}";

static void die(const char *what, const cv_err *e)
{
    fprintf(stderr, "fuzz setup: %s: %s\n", what, e ? e->message : "failed");
    abort();
}

/* A deterministic value in [-1, 1) for element i. */
static float value(size_t i) { return (float)((i * 2654435761u) % 2000) / 1000.0f - 1.0f; }

void cv_fz_model(const char *arch, cv_model *m)
{
    cv_err e;
    if (cv_arch_parse(arch, strlen(arch), m, &e))
        die("architecture", &e);
    if (cv_model_alloc(m))
        die("parameters", NULL);
    size_t n = (size_t)m->nparams_total;
    for (size_t i = 0; i < n; i++)
        m->params[i] = 0.3f * value(i);
}

void cv_fz_data(const cv_model *m, size_t n, cv_dataset *d)
{
    memset(d, 0, sizeof *d);
    d->n = n;
    d->x_shape = m->input_shape;
    size_t xs = cv_shape_numel(&m->input_shape);
    cv_loss_layout lay;
    cv_loss_layout_of(m, &lay);
    d->x = malloc(sizeof(float) * n * xs);
    d->y_is_index = 1;
    d->y_shape = lay.label_shape;
    size_t S = (size_t)lay.positions;
    d->labels = malloc(sizeof(int64_t) * n * S);
    if (!d->x || !d->labels)
        die("dataset", NULL);
    for (size_t i = 0; i < n * xs; i++)
        d->x[i] = value(i + 7);
    for (size_t i = 0; i < n * S; i++)
        d->labels[i] = (int64_t)(i % (size_t)lay.classes);
}

char *cv_fz_strndup(const uint8_t *data, size_t size)
{
    char *s = malloc(size + 1);
    if (!s)
        abort();
    memcpy(s, data, size);
    s[size] = 0;
    return s;
}

void cv_fz_models(cv_model *mlp, cv_model *cnn, cv_dataset *mlp_data, cv_dataset *cnn_data)
{
    cv_fz_model(cv_fz_arch_mlp, mlp);
    cv_fz_model(cv_fz_arch_cnn, cnn);
    if (mlp_data)
        cv_fz_data(mlp, 16, mlp_data);
    if (cnn_data)
        cv_fz_data(cnn, 8, cnn_data);
}
