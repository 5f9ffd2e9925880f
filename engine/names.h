/* names.h - enum values <-> their names through a table of names (index =
 * value), for the many small enums whose names reach JSON: curvatures,
 * estimator options, safetensors dtypes, job statuses. */
#ifndef CV_NAMES_H
#define CV_NAMES_H

/* Index of name in names[0..n), or -1 when name is NULL or not there. */
int cv_name_index(const char *name, const char *const *names, int n);

/* names[i] when 0 <= i < n, else other. */
const char *cv_name_or(const char *const *names, int n, int i, const char *other);

#endif
