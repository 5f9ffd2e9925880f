/* dashboard.h - the web dashboard's static files (clients/dashboard), embedded
 * into the binary at build time (build/gen/dashboard_assets.inc, written by
 * clients/dashboard/embed.sh) and served by http.c at GET / and
 * GET /dashboard/{file}.  No files are read at run time, so the page works
 * wherever the daemon runs, offline. */
#ifndef CV_DASHBOARD_H
#define CV_DASHBOARD_H

#include <stddef.h>

typedef struct {
    const char *name;              /* base name, e.g. "app.js" */
    const unsigned char *data;     /* NUL-terminated */
    size_t len;                    /* bytes, without the NUL */
    const char *content_type;      /* from the extension (NULL in the table) */
} cv_dashboard_file;

/* The file with this base name, or NULL.  The result's content_type is set. */
const cv_dashboard_file *cv_dashboard_find(const char *name, cv_dashboard_file *out);
/* Number of embedded files. */
int cv_dashboard_count(void);

#endif
