/* fuzz_safetensors.c - libFuzzer harness: a safetensors buffer through
 * cv_st_parse and every tensor's conversion, then as a dataset file
 * (cv_datafile_parse, cv_datafile_load_borrowed, cv_dataset_check against
 * the small models) and as a parameters file (cv_params_parse into the small
 * models).  A parsed file must write (cv_st_write) into one that reads back the
 * same; a dataset that loads must export into a file that loads again. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/datafile.h"
#include "api/params.h"
#include "api/safetensors.h"
#include "tests/fuzz/fuzz_common.h"

static cv_model mlp, cnn;

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    cv_fz_models(&mlp, &cnn, NULL, NULL);
    return 0;
}

static void tensors(const cv_st_file *f)
{
    cv_err e;
    for (size_t i = 0; i < f->ntensors; i++) {
        const cv_st_tensor *t = &f->tensors[i];
        char shape[128];
        cv_st_shape_str(t, shape, sizeof shape);
        if (cv_st_find(f, t->name) == NULL)
            abort();
        float *v;
        if (cv_st_to_f32(t, &v, &e) == 0)
            free(v);
        int64_t *w;
        if (cv_st_to_i64(t, &w, &e) == 0)
            free(w);
    }
    for (size_t i = 0; i < f->nmeta; i++)
        if (!cv_st_meta(f, f->meta_keys[i]))
            abort();
}

/* The writer gives back what the parser read: the same tensors (names,
 * dtypes, shapes, bytes) and metadata. */
static void round_trip(const cv_st_file *f)
{
    cv_st_entry *t = calloc(f->ntensors ? f->ntensors : 1, sizeof *t);
    const char **meta = calloc(2 * f->nmeta + 1, sizeof *meta);
    if (!t || !meta)
        abort();
    for (size_t i = 0; i < f->ntensors; i++) {
        const cv_st_tensor *s = &f->tensors[i];
        t[i].name = s->name;
        t[i].dtype = s->dtype;
        t[i].rank = s->rank;
        memcpy(t[i].shape, s->shape, sizeof t[i].shape);
        t[i].data = s->data;
    }
    for (size_t i = 0; i < f->nmeta; i++) {
        meta[2 * i] = f->meta_keys[i];
        meta[2 * i + 1] = f->meta_values[i];
    }
    void *out;
    size_t len;
    cv_err e;
    if (cv_st_write(t, f->ntensors, meta, f->nmeta, &out, &len, &e)) {
        fprintf(stderr, "a parsed file does not write: %s\n", e.message);
        abort();
    }
    cv_st_file g;
    if (cv_st_parse(out, len, &g, &e)) {
        fprintf(stderr, "a written file does not parse: %s\n", e.message);
        abort();
    }
    int same = g.ntensors == f->ntensors && g.nmeta == f->nmeta;
    for (size_t i = 0; same && i < f->ntensors; i++) {
        const cv_st_tensor *a = &f->tensors[i], *b = cv_st_find(&g, a->name);
        same = b && b->dtype == a->dtype && b->rank == a->rank &&
               memcmp(b->shape, a->shape, sizeof(int64_t) * (size_t)a->rank) == 0 &&
               b->end - b->begin == a->end - a->begin &&
               memcmp(b->data, a->data, a->end - a->begin) == 0;
    }
    for (size_t i = 0; same && i < f->nmeta; i++) {
        const char *v = cv_st_meta(&g, f->meta_keys[i]);
        same = v && strcmp(v, f->meta_values[i]) == 0;
    }
    if (!same) {
        fprintf(stderr, "a written file reads back different\n");
        abort();
    }
    cv_st_free(&g);
    free(out);
    free(meta);
    free(t);
}

static void as_dataset(const cv_st_file *f, const uint8_t *data, size_t size)
{
    cv_err e;
    cv_dataset d;
    if (cv_datafile_parse(data, size, &d, &e) == 0) {
        (void)cv_dataset_check(&d, &mlp, &e);
        (void)cv_dataset_check(&d, &cnn, &e);
        void *out;
        size_t len;
        if (cv_datafile_export(&d, &out, &len, &e) == 0) {
            cv_dataset d2;
            if (cv_datafile_parse(out, len, &d2, &e)) {
                fprintf(stderr, "an exported dataset does not load: %s\n", e.message);
                abort();
            }
            cv_dataset_free(&d2);
            free(out);
        }
        cv_dataset_free(&d);
    }
    unsigned copied;
    cv_dataset b;
    if (cv_datafile_load_borrowed(f, &b, &copied, &e) == 0) {
        if (copied & CV_DF_X_COPIED)
            free(b.x);
        if (copied & CV_DF_Y_COPIED) {
            free(b.labels);
            free(b.targets);
        }
    }
}

static void as_params(const uint8_t *data, size_t size, const cv_model *m)
{
    cv_model c;
    if (cv_model_clone(m, &c))
        abort();
    cv_err e;
    (void)cv_params_parse(&c, data, size, &e);
    cv_model_free(&c);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    cv_st_file f;
    cv_err e;
    if (cv_st_parse(data, size, &f, &e))
        return 0;
    tensors(&f);
    round_trip(&f);
    as_dataset(&f, data, size);
    cv_st_free(&f);
    as_params(data, size, &mlp);
    as_params(data, size, &cnn);
    return 0;
}
