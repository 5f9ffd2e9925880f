/* err.h - the one error record every curvd module fills in.
 *
 * Mirrors the contract's JSON error shape {"code","message","field"} without
 * depending on JSON: api/ turns it into JSON, server/ into an HTTP status.
 */
#ifndef CV_ERR_H
#define CV_ERR_H

#include <stddef.h>

typedef enum {
    CV_OK = 0,
    CV_EINVAL,      /* bad input: 400 */
    CV_ENOTFOUND,   /* unknown name: 404 */
    CV_ECONFLICT,   /* 409 */
    CV_ETOOLARGE,   /* over a configured limit: 413 */
    CV_EBUSY,       /* queue full: 429 */
    CV_ESHUTDOWN,   /* 503 */
    CV_ECANCELLED,  /* job cancelled */
    CV_ETIMEOUT,    /* job time limit */
    CV_ENOMEM,      /* allocation failed: 507/500 */
    CV_EINTERNAL    /* 500 */
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
/* HTTP status that fits the error. */
int cv_err_http_status(cv_status st);
const char *cv_status_name(cv_status st);

#endif
