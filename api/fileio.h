/* fileio.h - opening the input files the loaders read (architecture JSON,
 * safetensors), with the one io_error they all report. */
#ifndef CV_FILEIO_H
#define CV_FILEIO_H

#include <stdio.h>

#include "engine/err.h"

/* fopen(path, "rb"), or NULL with e set: code "io_error", field path,
 * "cannot open PATH: REASON", status CV_ENOTFOUND when path does not exist,
 * else CV_EINVAL. */
FILE *cv_open_input(const char *path, cv_err *e);

#endif
