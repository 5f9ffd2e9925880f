/* dashboard.c - lookup of the embedded dashboard files (see dashboard.h). */
#include "server/dashboard.h"

#include <string.h>

#include "dashboard_assets.inc"

static const char *content_type(const char *name)
{
    const char *dot = strrchr(name, '.');
    if (!dot)
        return "application/octet-stream";
    if (strcmp(dot, ".html") == 0)
        return "text/html; charset=utf-8";
    if (strcmp(dot, ".js") == 0)
        return "text/javascript; charset=utf-8";
    if (strcmp(dot, ".css") == 0)
        return "text/css; charset=utf-8";
    if (strcmp(dot, ".svg") == 0)
        return "image/svg+xml";
    if (strcmp(dot, ".png") == 0)
        return "image/png";
    if (strcmp(dot, ".json") == 0)
        return "application/json";
    if (strcmp(dot, ".ico") == 0)
        return "image/x-icon";
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
