/* dashboard.c - lookup of the embedded dashboard files (see dashboard.h). */
#include "server/dashboard.h"

#include <string.h>

#include "dashboard_assets.inc"

static const char *content_type(const char *name)
{
    static const char *const types[][2] = {
        {".html", "text/html; charset=utf-8"}, {".js", "text/javascript; charset=utf-8"},
        {".css", "text/css; charset=utf-8"},   {".svg", "image/svg+xml"},
        {".png", "image/png"},                 {".json", "application/json"},
        {".ico", "image/x-icon"},
    };
    const char *dot = strrchr(name, '.');
    for (size_t i = 0; dot && i < sizeof types / sizeof types[0]; i++)
        if (strcmp(dot, types[i][0]) == 0)
            return types[i][1];
    return "application/octet-stream";
}

const cv_dashboard_file *cv_dashboard_find(const char *name, cv_dashboard_file *out)
{
    for (int i = 0; dash_assets[i].name; i++)
        if (strcmp(dash_assets[i].name, name) == 0) {
            *out = dash_assets[i];
            out->content_type = content_type(out->name);
            return out;
        }
    return NULL;
}

int cv_dashboard_count(void)
{
    int n = 0;
    while (dash_assets[n].name)
        n++;
    return n;
}
