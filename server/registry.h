/* registry.h - the in-memory registry of models and datasets.
 *
 * Each name maps to a *snapshot*: an immutable, reference-counted entry
 * (a model with its parameters, or a dataset).  Replacing a model's
 * parameters (PUT) or a dataset builds a new snapshot with version + 1 and
 * swaps it in; whoever holds a reference to the old one (a queued or running
 * job) keeps reading exactly the version it pinned, which is freed when the
 * last reference goes.
 *
 * Jobs pin with cv_registry_acquire(), which also counts the job against
 * the name; DELETE of a name with queued or running jobs is refused with
 * 409 conflict (not deferred), so a name never disappears under a job that
 * a client is watching.
 *
 * Memory budget: the bytes of the current snapshots (model structure plus
 * parameters and buffers; dataset arrays, for a memory-mapped dataset only
 * the arrays that had to be converted) plus the bytes reserved by uploads
 * in parts still being assembled (cv_registry_reserve, server/staging.c)
 * plus the bytes of older (replaced or deleted) snapshots still pinned by
 * queued or running jobs may not exceed max_bytes.  An upload too large for the budget by itself (current
 * versions only) fails with 413 registry_full; one that fits only once the
 * pinned old versions are freed (their jobs finish) fails with 429
 * registry_full, retryable.  Old versions leave the count as soon as the
 * last job holding them finishes.
 *
 * Parameter replacement (PUT) parses the new weights outside the lock
 * against a copy of the current snapshot and installs them only if the
 * name still holds the same registration (lineage); if a DELETE and a new
 * registration (perhaps of another architecture) came in between, it fails
 * with 409 conflict (404 if just deleted).  Concurrent PUTs of the same
 * registration both succeed; the one installed last is the newer version.
 *
 * Thread-safe: one mutex guards the table; snapshots are immutable.
 */
#ifndef CV_REGISTRY_H
#define CV_REGISTRY_H

#include <cJSON.h>
#include <stdatomic.h>
#include <stddef.h>

#include "engine/dataset.h"
#include "engine/err.h"
#include "engine/model.h"
#include "server/memory.h"

#define CV_REG_NAME_MAX 64

/* CV_REG_POSTERIOR: a Laplace posterior kept by a job (ops laplace and
 * predict, api/op_laplace.h), named per model (owner); it records the model
 * version and registration it was fitted on and counts against the budget
 * like the others (its `backing` is the posterior, freed by backing_free).
 * It stays when the model gets new parameters (predict refuses it on
 * another version; accumulate_into takes it to the new one) and goes with
 * the model's DELETE. */
typedef enum { CV_REG_MODEL = 0, CV_REG_DATASET = 1, CV_REG_POSTERIOR = 2 } cv_reg_kind;

/* A model version's parameter vector kept for a later version (the
 * cross-version instruments of op "instruments", api/job.h cv_job_history):
 * reference-counted, shared by the snapshots that keep it. */
typedef struct cv_param_blob {
    atomic_int refs;
    unsigned long version;    /* the version these parameters were */
    size_t n;                 /* floats */
    float v[];
} cv_param_blob;

typedef struct cv_snap {
    atomic_int refs;
    cv_reg_kind kind;
    char name[CV_REG_NAME_MAX + 1];
    unsigned long version;    /* 1 on registration, +1 per replacement */
    unsigned long lineage;    /* which registration of the name (shared by its versions) */
    size_t bytes;             /* memory held by this snapshot */
    double created_at;        /* epoch seconds the name was registered */
    double updated_at;        /* epoch seconds of this version */
    char source[160];         /* where it came from: "http", "file ...", "demo: ..." */
    cv_model *model;          /* CV_REG_MODEL: finalized, parameters allocated */
    cv_dataset *data;         /* CV_REG_DATASET */
    size_t mapped_bytes;      /* bytes of a memory-mapped file data points into (not in bytes) */
    void *backing;            /* what data borrows from (a mapping), or NULL */
    void (*backing_free)(void *backing); /* called with the last reference, after data */
    char data_file[256];      /* a --data-dir file the dataset maps ("" otherwise) */
    /* CV_REG_POSTERIOR: the model (name, version, lineage) it was fitted on ("" else) */
    char owner[CV_REG_NAME_MAX + 1];
    unsigned long owner_version, owner_lineage;
    /* CV_REG_MODEL from version 2 on (else NULL): the parameters of version - 1
     * and of version 1 of this registration.  bytes counts two parameter
     * vectors for them (conservative: version 2's two are one blob, and the
     * first version's blob is shared by all later versions). */
    cv_param_blob *previous, *first;
} cv_snap;

typedef struct cv_registry cv_registry;

typedef struct {
    size_t bytes, max_bytes;
    size_t retired_bytes;     /* older versions still pinned by jobs */
    size_t staged_bytes;      /* reserved by uploads in parts not yet committed */
    int retired;              /* how many */
    int models, datasets, posteriors;
} cv_registry_stats;

/* [A-Za-z0-9_.-]{1,64} */
int cv_name_valid(const char *name);
/* Fills e (400, field) if name is not valid. */
int cv_name_check(const char *name, const char *field, cv_err *e);

cv_registry *cv_registry_new(size_t max_bytes);
/* Frees the registry; snapshots still referenced elsewhere stay alive. */
void cv_registry_free(cv_registry *r);

/* Memory footprint of a model / dataset as the registry counts it. */
size_t cv_model_bytes(const cv_model *m);
size_t cv_dataset_bytes(const cv_dataset *d);

/* Registers a new name.  Takes ownership of m / d (heap-allocated with
 * malloc, contents owned) in every case: on failure they are freed.
 * 409 if the name exists, 413 over budget.  *out (if non-NULL) gets a
 * reference to the new snapshot. */
int cv_registry_add_model(cv_registry *r, const char *name, cv_model *m, const char *source,
                          cv_snap **out, cv_err *e);
int cv_registry_add_dataset(cv_registry *r, const char *name, cv_dataset *d,
                            const char *source, cv_snap **out, cv_err *e);
/* Creates or replaces a dataset (PUT); *created tells which. */
int cv_registry_put_dataset(cv_registry *r, const char *name, cv_dataset *d, const char *source,
                            int *created, cv_snap **out, cv_err *e);
/* How a dataset given to cv_registry_install_dataset is held. */
typedef struct {
    size_t staged;            /* bytes reserved with cv_registry_reserve that the new
                               * snapshot takes over (released on success) */
    size_t bytes;             /* bytes to count (0: cv_dataset_bytes) */
    size_t mapped_bytes;      /* see cv_snap */
    void *backing;
    void (*backing_free)(void *backing);
    const char *data_file;    /* the --data-dir file mapped (cv_snap.data_file), or NULL */
} cv_dataset_backing;

/* Registers d (replace 0: must be new, 409 if it exists; 2: create or
 * replace).  Unlike cv_registry_add_dataset it takes ownership of d (and of
 * b's backing) only on success: on failure both stay the caller's. */
int cv_registry_install_dataset(cv_registry *r, const char *name, cv_dataset *d,
                                const char *source, int replace, const cv_dataset_backing *b,
                                int *created, cv_snap **out, cv_err *e);

/* Reserves bytes of the budget for an upload being assembled (413
 * registry_full if the budget cannot hold them, 429 if it can once pinned old
 * versions are freed); what names it in messages. */
int cv_registry_reserve(cv_registry *r, size_t bytes, const char *what, cv_err *e);
void cv_registry_unreserve(cv_registry *r, size_t bytes);

/* Replaces a model's parameters from a safetensors buffer: a new snapshot
 * with version + 1, which keeps the replaced version's parameters and the
 * first version's (cv_snap previous, first; counted in its bytes).  404 if unknown, 400 if the tensors do not fit, 409
 * conflict if the name was re-registered while the buffer was parsed, 413/429
 * over the budget (see above). */
int cv_registry_put_params(cv_registry *r, const char *name, const void *buf, size_t len,
                           cv_snap **out, cv_err *e);

/* Tests only: called by cv_registry_put_params between parsing the new
 * weights (outside the lock) and installing them, to provoke races. */
extern void (*cv_registry_put_params_hook)(cv_registry *r, const char *name, void *arg);
extern void *cv_registry_put_params_hook_arg;

/* A reference to the current snapshot (cv_snap_unref it), or NULL with e
 * filled (404). */
cv_snap *cv_registry_get(cv_registry *r, cv_reg_kind kind, const char *name, cv_err *e);
/* Like get, and counts a job against the name until cv_registry_release. */
cv_snap *cv_registry_acquire(cv_registry *r, cv_reg_kind kind, const char *name, cv_err *e);
void cv_registry_release(cv_registry *r, cv_snap *s);

/* Keeps post (bytes, freed with destroy; taken in every case) as posterior
 * `name` of model snapshot `model` (its version and lineage recorded),
 * replacing one of that name.  409 conflict if the model was deleted or
 * registered again, or (expect non-NULL, accumulate_into) if the posterior
 * is no longer expect; 413/429 registry_full over the budget. */
int cv_registry_keep_posterior(cv_registry *r, const cv_snap *model, const char *name,
                               void *post, size_t bytes, void (*destroy)(void *),
                               const cv_snap *expect, cv_snap **out, cv_err *e);
/* Like cv_registry_acquire for posterior `name` of model `model` (404 with
 * field, the option that named it). */
cv_snap *cv_registry_acquire_posterior(cv_registry *r, const char *model, const char *name,
                                       const char *field, cv_err *e);
/* The model's posteriors, sorted by name (cv_snaps_release them). */
int cv_registry_list_posteriors(cv_registry *r, const char *model, cv_snap ***out);
/* 404 unknown, 409 while jobs use it. */
int cv_registry_delete_posterior(cv_registry *r, const char *model, const char *name, cv_err *e);

/* 404 unknown, 409 while jobs use it (a model's posteriors go with it). */
int cv_registry_delete(cv_registry *r, cv_reg_kind kind, const char *name, cv_err *e);

/* References to all current snapshots of a kind, sorted by name; returns
 * the count (or -1 on allocation failure).  Free with cv_snaps_release. */
int cv_registry_list(cv_registry *r, cv_reg_kind kind, cv_snap ***out);
void cv_snaps_release(cv_snap **v, int n);

void cv_registry_stats_get(cv_registry *r, cv_registry_stats *st);

/* --max-memory (server/memory.h): installs, replacements, posteriors kept
 * by jobs, reservations of uploads in parts and snapshots restored at
 * start-up are also checked against m's limit: 413 memory_limit when the
 * registry's current versions with the new bytes exceed it, 429
 * memory_busy when old versions pinned by jobs and the jobs' documents and
 * running estimates leave no room now.  Set before serving (m outlives r). */
void cv_registry_set_memory(cv_registry *r, cv_memory *m);

/* ---- persistence (--state-dir, server/persist.c) ----------------------------
 * With hooks set, every change is written before it is answered: a new or
 * replaced snapshot is prepared (written and fsynced to a temporary file,
 * with the version it is about to get) before it is installed, committed
 * (renamed into place) once installed, aborted if the install fails; a
 * delete removes the file.  One writer lock orders these (the installs and
 * their files happen in the same order); reads, jobs and uploads in parts do
 * not take it.  A prepare failure fails the request (500
 * state_write_failed, nothing changed); a commit failure (rename or
 * directory fsync: an I/O error) is logged and the change stays in memory
 * only. */
typedef struct {
    int (*prepare)(void *arg, const cv_snap *s, void **tx, cv_err *e);
    int (*commit)(void *arg, void *tx, cv_err *e);
    void (*abort)(void *arg, void *tx);
    int (*remove)(void *arg, cv_reg_kind kind, const char *name, cv_err *e);
    void *arg;
} cv_registry_persist;

/* Sets the hooks (NULL: none); call before serving requests. */
void cv_registry_set_persist(cv_registry *r, const cv_registry_persist *p);

/* Start-up: installs a snapshot read back from the state directory with its
 * recorded version and times, replacing a snapshot of the same name (the
 * demo, the command line).  m or d (and b's backing) become the registry's
 * on success only.  Not written back (no hooks are called). */
int cv_registry_restore(cv_registry *r, const char *name, cv_model *m, cv_dataset *d,
                        const cv_dataset_backing *b, const char *source, unsigned long version,
                        double created_at, double updated_at, cv_err *e);

void cv_snap_ref(cv_snap *s);
void cv_snap_unref(cv_snap *s);

/* JSON descriptions (NULL on allocation failure).  full: architecture and
 * tensor shapes for a model; list entries are shorter. */
cJSON *cv_snap_to_json(const cv_snap *s, int full);

#endif
