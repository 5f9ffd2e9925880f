/* job_indices.c - reading a job document's batch.indices straight from its
 * text into an int32 array (cv_job_text_indices, api/job.h), so that a
 * document with millions of indices never becomes millions of cJSON nodes
 * (about 80 bytes each: 40 times a short index's text). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "api/job.h"

typedef struct {
    const char *p, *end;
} scan;

static void skip_ws(scan *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
        s->p++;
}

/* A string at s->p: its raw bytes (between the quotes) in *b, *n; -1 if not one. */
static int read_string(scan *s, const char **b, size_t *n)
{
    if (s->p >= s->end || *s->p != '"')
        return -1;
    const char *q = ++s->p;
    while (s->p < s->end && *s->p != '"')
        s->p += *s->p == '\\' ? 2 : 1;
    if (s->p >= s->end)
        return -1;
    *b = q;
    *n = (size_t)(s->p - q);
    s->p++;
    return 0;
}

/* Skips one value (any JSON; checked later by the strict parser). */
static int skip_value(scan *s)
{
    const char *b;
    size_t n;
    if (s->p >= s->end)
        return -1;
    if (*s->p == '"')
        return read_string(s, &b, &n);
    if (*s->p != '{' && *s->p != '[') {
        while (s->p < s->end && !strchr(",}] \t\r\n", *s->p))
            s->p++;
        return 0;
    }
    int depth = 0;
    while (s->p < s->end) {
        char c = *s->p;
        if (c == '"') {
            if (read_string(s, &b, &n))
                return -1;
            continue;
        }
        depth += c == '{' || c == '[';
        depth -= c == '}' || c == ']';
        s->p++;
        if (!depth)
            return 0;
    }
    return -1;
}

static int key_is(const char *b, size_t n, const char *k)
{
    return n == strlen(k) && memcmp(b, k, n) == 0;
}

/* The array at s->p of plain non-negative integers below 2^31 (digits only,
 * no leading zeros) into *out (malloc'd), *count; 0 when it is something
 * else (left to the strict parser), -1 out of memory. */
static int read_indices(scan *s, int32_t **out, size_t *count)
{
    size_t n = 0, cap = 1024;
    int32_t *v = malloc(cap * sizeof *v);
    if (!v)
        return -1;
    s->p++; /* '[' */
    for (;;) {
        skip_ws(s);
        const char *d = s->p;
        int64_t x = 0;
        while (s->p < s->end && *s->p >= '0' && *s->p <= '9' && s->p - d < 11)
            x = x * 10 + (*s->p++ - '0');
        if (s->p == d || s->p - d > 10 || x > INT32_MAX || (*d == '0' && s->p - d > 1))
            break;
        if (n == cap) {
            int32_t *nv = realloc(v, 2 * cap * sizeof *v);
            if (!nv) {
                free(v);
                return -1;
            }
            v = nv;
            cap *= 2;
        }
        v[n++] = (int32_t)x;
        skip_ws(s);
        if (s->p < s->end && *s->p == ',') {
            s->p++;
            continue;
        }
        if (s->p < s->end && *s->p == ']') {
            s->p++;
            *out = v;
            *count = n;
            return 1;
        }
        break;
    }
    free(v);
    return 0;
}

/* Finds the top-level "batch" object's "indices" array: [*a, *b) of text
 * and its numbers; 1 found, 0 not (or not in the plain form), -1 OOM. */
static int find_indices(scan *s, const char **a, const char **b, int32_t **idx, size_t *n)
{
    const char *k;
    size_t kn;
    skip_ws(s);
    if (s->p >= s->end || *s->p != '{')
        return 0;
    s->p++;
    for (int depth = 1;;) { /* depth 1: the job's members; 2: batch's */
        skip_ws(s);
        if (s->p < s->end && *s->p == '}' && depth == 2) {
            s->p++;
            depth = 1;
            skip_ws(s);
            if (s->p < s->end && *s->p == ',')
                s->p++;
            continue;
        }
        if (read_string(s, &k, &kn))
            return 0;
        skip_ws(s);
        if (s->p >= s->end || *s->p != ':')
            return 0;
        s->p++;
        skip_ws(s);
        if (s->p >= s->end)
            return 0;
        if (depth == 1 && key_is(k, kn, "batch") && *s->p == '{') {
            s->p++;
            depth = 2;
            continue;
        }
        if (depth == 2 && key_is(k, kn, "indices") && *s->p == '[') {
            *a = s->p;
            int rc = read_indices(s, idx, n);
            *b = s->p;
            return rc;
        }
        if (skip_value(s))
            return 0;
        skip_ws(s);
        if (s->p < s->end && *s->p == ',') {
            s->p++;
            continue;
        }
        if (depth == 2 && s->p < s->end && *s->p == '}')
            continue;
        return 0;
    }
}

int cv_job_text_indices(const char *text, size_t len, char **rest, size_t *rest_len,
                        int32_t **idx, size_t *count)
{
    scan s = {text, text + len};
    const char *a = NULL, *b = NULL;
    int rc = find_indices(&s, &a, &b, idx, count);
    if (rc != 1)
        return rc;
    /* the placeholder "[0" + spaces + "]" is as long as the list it stands
     * for, so every byte offset in the strict parser's messages is the one
     * the whole text would give */
    char *r = malloc(len + 1);
    if (!r) {
        free(*idx);
        *idx = NULL;
        return -1;
    }
    memcpy(r, text, len);
    size_t head = (size_t)(a - text), span = (size_t)(b - a); /* at least "[d]" */
    r[head] = '[';
    r[head + 1] = '0';
    memset(r + head + 2, ' ', span - 3);
    r[head + span - 1] = ']';
    r[len] = 0;
    *rest = r;
    *rest_len = len;
    return 1;
}
