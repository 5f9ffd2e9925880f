/* fileio.c - opening input files (see fileio.h). */
#include "api/fileio.h"

#include <errno.h>
#include <string.h>

FILE *cv_open_input(const char *path, cv_err *e)
{
    FILE *fp = fopen(path, "rb");
    if (!fp)
        cv_err_set(e, errno == ENOENT ? CV_ENOTFOUND : CV_EINVAL, "io_error", path,
                   "cannot open %s: %s", path, strerror(errno));
    return fp;
}
