/* err.c - filling cv_err records and naming their status codes. */
#include "err.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
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

void *cv_err_calloc(size_t size, const char *what, cv_err *e)
{
    void *p = calloc(1, size);
    if (!p)
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "%s", what);
    return p;
}

void cv_err_clear(cv_err *e)
{
    if (e)
        memset(e, 0, sizeof *e);
}

const char *cv_status_name(cv_status st)
{
    static const char *names[] = {"ok", "invalid", "not_found", "conflict", "too_large",
                                  "busy", "shutting_down", "cancelled", "timeout",
                                  "out_of_memory", "internal", "unavailable"};
    if ((unsigned)st < sizeof names / sizeof names[0])
        return names[st];
    return "internal";
}
