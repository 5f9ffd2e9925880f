/* err.c - filling and classifying cv_err records. */
#include "err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int cv_err_set(cv_err *e, cv_status st, const char *code, const char *field,
               const char *fmt, ...)
{
    if (!e)
        return -1;
    e->status = st;
    snprintf(e->code, sizeof e->code, "%s", code ? code : "error");
    snprintf(e->field, sizeof e->field, "%s", field ? field : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return -1;
}

void cv_err_clear(cv_err *e)
{
    if (e)
        memset(e, 0, sizeof *e);
}

int cv_err_http_status(cv_status st)
{
    switch (st) {
    case CV_OK: return 200;
    case CV_EINVAL: return 400;
    case CV_ENOTFOUND: return 404;
    case CV_ECONFLICT: return 409;
    case CV_ETOOLARGE: return 413;
    case CV_EBUSY: return 429;
    case CV_ESHUTDOWN: return 503;
    case CV_ECANCELLED: return 409;
    case CV_ETIMEOUT: return 408;
    case CV_ENOMEM: return 507;
    default: return 500;
    }
}

const char *cv_status_name(cv_status st)
{
    static const char *names[] = {"ok", "invalid", "not_found", "conflict", "too_large",
                                  "busy", "shutting_down", "cancelled", "timeout",
                                  "out_of_memory", "internal"};
    if ((unsigned)st < sizeof names / sizeof names[0])
        return names[st];
    return "internal";
}
