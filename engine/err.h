/* err.h - the one error record every curvd module fills in.
 *
 * Mirrors the interface's JSON error shape {"code","message","field"} without
 * depending on JSON: api/ turns it into JSON, server/ (cv_http_status) into
 * an HTTP status.
 */
#ifndef CV_ERR_H
#define CV_ERR_H

#include <stddef.h>

typedef enum {
    CV_OK = 0,
    CV_EINVAL,      /* bad input */
    CV_ENOTFOUND,   /* unknown name */
    CV_ECONFLICT,   /* clashes with the current state (exists, in use) */
    CV_ETOOLARGE,   /* over a configured limit */
    CV_EBUSY,       /* full for now (queue, memory held by jobs): retry later */
    CV_ESHUTDOWN,   /* the service is shutting down */
    CV_ECANCELLED,  /* job cancelled */
    CV_ETIMEOUT,    /* job time limit */
    CV_ENOMEM,      /* allocation failed */
    CV_EINTERNAL,   /* a bug */
    CV_EUNAVAILABLE /* a rank of a data-parallel job failed or stopped answering */
} cv_status;

typedef struct {
    cv_status status;
    char code[48];      /* machine-readable, e.g. "invalid_shape" */
    char field[128];    /* where: JSON path or tensor name, may be empty */
    char message[512];  /* what and why, for people */
} cv_err;

/* Sets *e (if e is non-NULL) and returns -1, so callers can write
 * `return cv_err_set(e, CV_EINVAL, "bad_dtype", "x", "x must be F32, got %s", d);` */
int cv_err_set(cv_err *e, cv_status st, const char *code, const char *field,
               const char *fmt, ...) __attribute__((format(printf, 5, 6)));
void cv_err_clear(cv_err *e);
/* calloc(1, size), or NULL with *e set: CV_ENOMEM, "out_of_memory", message what. */
void *cv_err_calloc(size_t size, const char *what, cv_err *e);
const char *cv_status_name(cv_status st);

#endif
