/* util.c - wall-clock time, JSON timestamps, number parsing and the
 * allocator policy for server/. */
#include "server/util.h"

#include <errno.h>
#include <malloc.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

double cv_wall_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int cv_json_add_time(cJSON *obj, const char *key, double t)
{
    if (t <= 0)
        return cJSON_AddNullToObject(obj, key) ? 0 : -1;
    time_t sec = (time_t)t;
    int ms = (int)((t - (double)sec) * 1000.0);
    if (ms < 0)
        ms = 0;
    if (ms > 999)
        ms = 999;
    struct tm tm;
    if (!gmtime_r(&sec, &tm))
        return cJSON_AddNullToObject(obj, key) ? 0 : -1;
    char buf[48];
    snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ms);
    return cJSON_AddStringToObject(obj, key, buf) ? 0 : -1;
}

int cv_json_add_sizes(cJSON *obj, const char *key, const size_t *v, int n)
{
    cJSON *a = cJSON_AddArrayToObject(obj, key);
    if (!a)
        return -1;
    for (int i = 0; i < n; i++) {
        cJSON *x = cJSON_CreateNumber((double)v[i]);
        if (!x || !cJSON_AddItemToArray(a, x)) {
            cJSON_Delete(x);
            return -1;
        }
    }
    return 0;
}

int cv_parse_double(const char *s, double lo, double hi, double *out)
{
    if (!s || !*s)
        return -1;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || !isfinite(v) || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

int cv_parse_size(const char *s, size_t lo, size_t hi, size_t *out)
{
    if (!s || *s < '0' || *s > '9')
        return -1;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    /* optional binary suffixes: 64K, 256M, 2G */
    unsigned long long mul = 1;
    if (*end == 'K' || *end == 'k')
        mul = 1ull << 10, end++;
    else if (*end == 'M' || *end == 'm')
        mul = 1ull << 20, end++;
    else if (*end == 'G' || *end == 'g')
        mul = 1ull << 30, end++;
    if (errno || *end || (mul > 1 && v > (unsigned long long)SIZE_MAX / mul))
        return -1;
    v *= mul;
    if (v < lo || v > hi)
        return -1;
    *out = (size_t)v;
    return 0;
}

void cv_utf8_sanitize(char *str)
{
    unsigned char *s = (unsigned char *)str;
    while (*s) {
        unsigned char c = *s;
        int n = c < 0x80 ? 0 : (c >> 5) == 6 ? 1 : (c >> 4) == 14 ? 2 : (c >> 3) == 30 ? 3 : -1;
        int ok = n >= 0;
        for (int k = 1; ok && k <= n; k++)
            ok = (s[k] & 0xC0) == 0x80;
        if (ok && n == 1)
            ok = c >= 0xC2; /* no overlong 2-byte forms */
        if (ok && n == 2) {
            unsigned cp = (unsigned)(c & 0x0F) << 12 | (unsigned)(s[1] & 0x3F) << 6 | (s[2] & 0x3F);
            ok = cp >= 0x800 && (cp < 0xD800 || cp > 0xDFFF);
        }
        if (ok && n == 3) {
            unsigned cp = (unsigned)(c & 0x07) << 18 | (unsigned)(s[1] & 0x3F) << 12 |
                          (unsigned)(s[2] & 0x3F) << 6 | (s[3] & 0x3F);
            ok = cp >= 0x10000 && cp <= 0x10FFFF;
        }
        if (!ok) {
            *s++ = '?';
            continue;
        }
        s += n + 1;
    }
}

void cv_tune_allocator(void)
{
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 512 << 20);
}
