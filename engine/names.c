/* names.c - enum/name tables (see names.h). */
#include "engine/names.h"

#include <string.h>

int cv_name_index(const char *name, const char *const *names, int n)
{
    for (int i = 0; name && i < n; i++)
        if (strcmp(name, names[i]) == 0)
            return i;
    return -1;
}

const char *cv_name_or(const char *const *names, int n, int i, const char *other)
{
    return i >= 0 && i < n ? names[i] : other;
}
