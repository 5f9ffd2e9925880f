/* state.h - the on-disk state directory of `curvd serve --state-dir DIR`:
 * checksummed record files written atomically (docs/interface.md,
 * "Persistence" has the format).
 *
 * Layout: DIR/models/NAME.cvst, DIR/datasets/NAME.cvst, DIR/jobs/ID.cvst,
 * DIR/monitors/ID.cvst and
 * DIR/ids.cvst (job id counter).  Every file is one record: a 40-byte header
 * (magic "CURVDST\0", format 1, kind, meta and blob lengths, CRC32C of meta
 * and blob, CRC32C of the header) followed by the meta (JSON text) and the
 * blob (safetensors, a result text, or nothing).
 *
 * Writes are atomic: a temporary file in the same directory (".tmp-" prefix),
 * write, fsync, rename over the final name, fsync of the directory; removals
 * unlink and fsync the directory.  When cv_state_write or cv_state_remove
 * returns 0 the change survives a crash (kill -9, power loss with honest
 * disks).
 *
 * One process at a time: cv_state_open takes an exclusive flock() on
 * DIR/lock (released when the process ends, kill -9 included).
 *
 * Reading checks the length, both checksums, the magic, format and kind; a
 * file that fails is reported (one log line naming it and why), renamed to
 * NAME.cvst.damaged and never used in part.  Left-over temporary files (a
 * write cut by a crash) are reported and removed when the directory is
 * opened.
 *
 * Thread-safe: writes of different names may run concurrently; writes of
 * one name must be ordered by the caller.
 */
#ifndef CV_STATE_H
#define CV_STATE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "engine/err.h"

typedef enum {
    CV_STATE_MODEL = 1,
    CV_STATE_DATASET = 2,
    CV_STATE_JOB = 3,
    CV_STATE_IDS = 4,
    CV_STATE_MONITOR = 5, /* DIR/monitors/ID.cvst and ID-NNNNNNNN.cvst: a monitor
                           * and its history segments (server/monitors.h) */
} cv_state_kind;

#define CV_STATE_HEADER 40
#define CV_STATE_SUFFIX ".cvst"

typedef struct cv_state cv_state;

/* A record read back: meta is NUL-terminated JSON text (meta_len bytes
 * before the NUL); blob points into the same buffer. */
typedef struct {
    char *meta;
    size_t meta_len;
    const void *blob;
    size_t blob_len;
    void *buf;
} cv_state_rec;

/* CRC32C (Castagnoli), the iSCSI/ext4 checksum; crc 0 to start. */
uint32_t cv_crc32c(uint32_t crc, const void *p, size_t n);

/* Opens (creating as needed) dir and its subdirectories and locks it;
 * removes left-over temporary files, reporting each to log.  NULL with e
 * filled on failure (409 state_dir_in_use: another process holds it). */
cv_state *cv_state_open(const char *dir, FILE *log, cv_err *e);
void cv_state_close(cv_state *st);
const char *cv_state_dir(const cv_state *st);
FILE *cv_state_log(const cv_state *st);

/* The final path of a record into out. */
void cv_state_path(const cv_state *st, cv_state_kind kind, const char *name, char *out,
                   size_t len);

/* Writes the record (meta text, then blob) atomically and durably (see
 * above).  -1 with e filled (500 state_write_failed) on failure; the
 * previous file, if any, is then unchanged. */
int cv_state_write(cv_state *st, cv_state_kind kind, const char *name, const char *meta,
                   size_t meta_len, const void *blob, size_t blob_len, cv_err *e);
/* The same in two steps: prepare writes and fsyncs the temporary file,
 * commit renames it into place and fsyncs the directory (the change is
 * durable when it returns 0), abort removes it (the previous file stays).
 * Commit and abort free tx. */
typedef struct cv_state_tx cv_state_tx;
int cv_state_prepare(cv_state *st, cv_state_kind kind, const char *name, const char *meta,
                     size_t meta_len, const void *blob, size_t blob_len, cv_state_tx **tx,
                     cv_err *e);
int cv_state_commit(cv_state_tx *tx, cv_err *e);
void cv_state_abort(cv_state_tx *tx);
/* Removes the record durably; a missing file is not an error. */
int cv_state_remove(cv_state *st, cv_state_kind kind, const char *name, cv_err *e);

/* Reads and checks path as a record of kind.  -1 with why filled (and
 * nothing allocated) if it is damaged or partial. */
int cv_state_read(const char *path, cv_state_kind kind, cv_state_rec *rec, char *why,
                  size_t why_len);
void cv_state_rec_free(cv_state_rec *rec);

/* Calls fn for every record file of kind (ids: none; use cv_state_read),
 * in name order; name is the file name without the suffix.  A damaged file,
 * or one fn refuses as damaged (returns -1 with why filled), is reported and
 * set aside (cv_state_set_aside); fn returns 1 to skip a record and keep its
 * file (it reports why itself).  Returns the number of records fn accepted. */
typedef int (*cv_state_fn)(void *arg, const char *name, const cv_state_rec *rec, char *why,
                           size_t why_len);
int cv_state_scan(cv_state *st, cv_state_kind kind, cv_state_fn fn, void *arg);

/* Reports path as damaged ("curvd: state: PATH: damaged (WHY), skipped")
 * and renames it to PATH.damaged so that it is not read again. */
void cv_state_set_aside(cv_state *st, const char *path, const char *why);

#endif
