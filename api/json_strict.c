/* json_strict.c - strict JSON reading (see json_strict.h): cJSON parses,
 * then a scan of the text refuses what cJSON lets through (control
 * characters, loose numbers, NULs in strings, trailing data) and a walk of
 * the tree refuses duplicate keys. */
#include "api/json_strict.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PATH_MAX_LEN 256

/* ---- paths ------------------------------------------------------------------ */

/* Appends ".key" (or "key" at the root) or "[i]" to path (of length *n),
 * truncating; returns the old length, for path_pop. */
static size_t path_push(char *path, size_t *n, const char *key, int index)
{
    size_t old = *n;
    char part[PATH_MAX_LEN];
    if (key)
        snprintf(part, sizeof part, "%s%s", old ? "." : "", key);
    else
        snprintf(part, sizeof part, "[%d]", index);
    size_t add = strlen(part);
    if (old + add >= PATH_MAX_LEN)
        add = PATH_MAX_LEN - 1 - old;
    memcpy(path + old, part, add);
    *n = old + add;
    path[*n] = 0;
    return old;
}

static void path_pop(char *path, size_t *n, size_t old)
{
    *n = old;
    path[old] = 0;
}

static size_t path_init(char *path, const char *prefix)
{
    snprintf(path, PATH_MAX_LEN, "%s", prefix ? prefix : "");
    return strlen(path);
}

/* ---- duplicate keys ----------------------------------------------------------- */

static int cmp_keys(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* The first key of object o that appears twice, or NULL (*oom set when the
 * sort buffer could not be had).  Small objects pairwise, large ones sorted:
 * a body with a million keys must not cost a million squared. */
static const char *duplicate_key(const cJSON *o, int *oom)
{
    int n = cJSON_GetArraySize(o);
    if (n < 2)
        return NULL;
    if (n <= 16) {
        for (const cJSON *a = o->child; a; a = a->next)
            for (const cJSON *b = a->next; b; b = b->next)
                if (strcmp(a->string, b->string) == 0)
                    return b->string;
        return NULL;
    }
    const char **keys = malloc((size_t)n * sizeof *keys);
    if (!keys) {
        *oom = 1;
        return NULL;
    }
    int i = 0;
    for (const cJSON *a = o->child; a && i < n; a = a->next)
        keys[i++] = a->string;
    qsort(keys, (size_t)i, sizeof *keys, cmp_keys);
    const char *dup = NULL;
    for (int k = 1; k < i && !dup; k++)
        if (strcmp(keys[k - 1], keys[k]) == 0)
            dup = keys[k];
    free(keys);
    return dup;
}

static int unique_walk(const cJSON *v, char *path, size_t *n, cv_err *e)
{
    if (cJSON_IsObject(v)) {
        int oom = 0;
        const char *dup = duplicate_key(v, &oom);
        if (oom)
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", path, "out of memory");
        if (dup) {
            char where[PATH_MAX_LEN];
            snprintf(where, sizeof where, "%s", *n ? path : "the top-level object");
            size_t old = path_push(path, n, dup, 0);
            int rc = cv_err_set(e, CV_EINVAL, "duplicate_field", path,
                                "key '%.64s' is given twice in %s (each key may appear "
                                "once)", dup, where);
            path_pop(path, n, old);
            return rc;
        }
    }
    int i = 0;
    for (const cJSON *c = v->child; c; c = c->next, i++) {
        if (!cJSON_IsObject(c) && !cJSON_IsArray(c))
            continue;
        size_t old = path_push(path, n, cJSON_IsObject(v) ? c->string : NULL, i);
        int rc = unique_walk(c, path, n, e);
        path_pop(path, n, old);
        if (rc)
            return rc;
    }
    return 0;
}

int cv_json_unique_keys(const cJSON *v, const char *prefix, cv_err *e)
{
    char path[PATH_MAX_LEN];
    size_t n = path_init(path, prefix);
    return v ? unique_walk(v, path, &n, e) : 0;
}

/* ---- the text scan --------------------------------------------------------------- */

static int is_digit(char c) { return c >= '0' && c <= '9'; }

/* The length of the JSON number at t[0..n) (RFC 8259 grammar), or 0 when
 * it is malformed ("01", "1.", ".5", "1.e3", "-") or runs into more number
 * characters. */
static size_t number_len(const char *t, size_t n)
{
    size_t i = 0;
    if (i < n && t[i] == '-')
        i++;
    if (i < n && t[i] == '0')
        i++;
    else if (i < n && is_digit(t[i]))
        while (i < n && is_digit(t[i]))
            i++;
    else
        return 0;
    if (i < n && t[i] == '.') {
        size_t d = ++i;
        while (i < n && is_digit(t[i]))
            i++;
        if (i == d)
            return 0;
    }
    if (i < n && (t[i] == 'e' || t[i] == 'E')) {
        i++;
        if (i < n && (t[i] == '+' || t[i] == '-'))
            i++;
        size_t d = i;
        while (i < n && is_digit(t[i]))
            i++;
        if (i == d)
            return 0;
    }
    if (i < n && (is_digit(t[i]) || t[i] == '.' || t[i] == 'e' || t[i] == 'E' ||
                  t[i] == '+' || t[i] == '-'))
        return 0;
    return i;
}

static int json_space(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/* Scans t[0..end), a value cJSON parsed: -1 with e filled on a control
 * character outside a string, a raw one (but NUL) inside one, or a
 * malformed number; *nul_ord is the ordinal (keys and string values in
 * document order) of the first string holding a NUL, SIZE_MAX if none. */
static int scan(const char *t, size_t end, const char *what, const char *path, size_t *nul_ord,
                cv_err *e)
{
    size_t ord = 0;
    *nul_ord = SIZE_MAX;
    for (size_t i = 0; i < end; i++) {
        unsigned char c = (unsigned char)t[i];
        if (c == '-' || is_digit((char)c)) {
            size_t len = number_len(t + i, end - i);
            if (!len)
                return cv_err_set(e, CV_EINVAL, "invalid_json", path,
                                  "%s is not valid JSON: malformed number at byte %zu", what, i);
            i += len - 1;
            continue;
        }
        if (c != '"') {
            if (c < 0x20 && !json_space(c))
                return cv_err_set(e, CV_EINVAL, "invalid_json", path,
                                  "%s is not valid JSON: control character 0x%02x at byte %zu",
                                  what, c, i);
            continue;
        }
        for (i++; i < end && t[i] != '"'; i++) {
            unsigned char s = (unsigned char)t[i];
            if (s == '\\') {
                if (i + 5 < end && memcmp(t + i + 1, "u0000", 5) == 0 && *nul_ord == SIZE_MAX)
                    *nul_ord = ord;
                i++; /* the escaped character (\" included) */
            } else if (s == 0) {
                if (*nul_ord == SIZE_MAX)
                    *nul_ord = ord;
            } else if (s < 0x20) {
                return cv_err_set(e, CV_EINVAL, "invalid_json", path,
                                  "%s is not valid JSON: unescaped control character 0x%02x "
                                  "in a string at byte %zu", what, s, i);
            }
        }
        ord++;
    }
    return 0;
}

/* The path of the string with ordinal *k (counted down) below v, into path;
 * *is_key set when it is a key.  1 when found. */
static int find_string(const cJSON *v, size_t *k, char *path, size_t *n, int *is_key)
{
    int i = 0;
    for (const cJSON *c = v->child; c; c = c->next, i++) {
        int obj = cJSON_IsObject(v);
        size_t old = path_push(path, n, obj ? c->string : NULL, i);
        if (obj && (*k)-- == 0) {
            *is_key = 1;
            return 1;
        }
        if (cJSON_IsString(c) && (*k)-- == 0)
            return 1;
        if ((cJSON_IsObject(c) || cJSON_IsArray(c)) && find_string(c, k, path, n, is_key))
            return 1;
        path_pop(path, n, old);
    }
    return 0;
}

int cv_json_check_text(const char *text, size_t len, const cJSON *doc, const char *what,
                       const char *path, cv_err *e)
{
    if (!path)
        path = "";
    size_t nul;
    if (scan(text, len, what, path, &nul, e))
        return -1;
    if (nul == SIZE_MAX)
        return 0;
    char p[PATH_MAX_LEN];
    size_t n = path_init(p, path);
    int is_key = 0;
    find_string(doc, &nul, p, &n, &is_key);
    return cv_err_set(e, CV_EINVAL, "nul_in_string", p,
                      "%s: the %s %s%s%s holds a NUL character (\\u0000), which no name or "
                      "value may contain", what, is_key ? "key" : "string", n ? "at '" : "",
                      n ? p : "(the whole document)", n ? "'" : "");
}

cJSON *cv_json_parse_strict(const char *text, size_t len, const char *what, const char *path,
                            cv_err *e)
{
    if (!path)
        path = "";
    const char *end = NULL;
    cJSON *doc = text ? cJSON_ParseWithLengthOpts(text, len, &end, 0) : NULL;
    if (!doc) {
        size_t off = text && end && end >= text && end <= text + len ? (size_t)(end - text) : 0;
        cv_err_set(e, CV_EINVAL, "invalid_json", path,
                   "%s is not valid JSON (error near byte %zu)", what, off);
        return NULL;
    }
    size_t stop = end && end >= text && end <= text + len ? (size_t)(end - text) : len;
    for (size_t i = stop; i < len; i++)
        if (!json_space((unsigned char)text[i])) {
            cv_err_set(e, CV_EINVAL, "invalid_json", path,
                       "%s: trailing characters after the JSON document (byte %zu)", what, i);
            cJSON_Delete(doc);
            return NULL;
        }
    if (cv_json_check_text(text, stop, doc, what, path, e)) {
        cJSON_Delete(doc);
        return NULL;
    }
    if (cv_json_unique_keys(doc, path, e)) {
        cJSON_Delete(doc);
        return NULL;
    }
    return doc;
}
