/* multipart.c - a bounded multipart/form-data parser over a complete body. */
#include "server/multipart.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

int cv_mp_is_multipart(const char *ct)
{
    if (!ct)
        return 0;
    while (*ct == ' ' || *ct == '\t')
        ct++;
    return strncasecmp(ct, "multipart/form-data", 19) == 0;
}

/* Copies the value of parameter `key` (e.g. boundary, name) from a header
 * value like `form-data; name="x"; filename="y"` into out.  Returns 1 if
 * found. */
static int header_param(const char *h, size_t hlen, const char *key, char *out, size_t outlen)
{
    size_t klen = strlen(key);
    size_t i = 0;
    while (i < hlen) {
        /* advance to the next ';' separated parameter */
        while (i < hlen && h[i] != ';')
            i++;
        if (i >= hlen)
            break;
        i++;
        while (i < hlen && (h[i] == ' ' || h[i] == '\t'))
            i++;
        if (hlen - i > klen && strncasecmp(h + i, key, klen) == 0 && h[i + klen] == '=') {
            i += klen + 1;
            size_t o = 0;
            if (i < hlen && h[i] == '"') {
                i++;
                while (i < hlen && h[i] != '"') {
                    if (h[i] == '\\' && i + 1 < hlen)
                        i++;
                    if (o + 1 < outlen)
                        out[o++] = h[i];
                    i++;
                }
            } else {
                while (i < hlen && h[i] != ';' && h[i] != ' ' && h[i] != '\t' && h[i] != '\r' &&
                       h[i] != '\n') {
                    if (o + 1 < outlen)
                        out[o++] = h[i];
                    i++;
                }
            }
            if (outlen)
                out[o] = 0;
            return 1;
        }
    }
    return 0;
}

static const char *find_bytes(const char *hay, size_t hlen, const char *needle, size_t nlen)
{
    if (nlen == 0 || hlen < nlen)
        return NULL;
    return memmem(hay, hlen, needle, nlen);
}

int cv_mp_parse(const char *ct, const char *body, size_t len, cv_multipart *out, cv_err *e)
{
    memset(out, 0, sizeof *out);
    char boundary[80];
    if (!ct || !header_param(ct, strlen(ct), "boundary", boundary, sizeof boundary) ||
        !boundary[0] || strlen(boundary) > 70)
        return cv_err_set(e, CV_EINVAL, "bad_multipart", "Content-Type",
                          "multipart/form-data needs a boundary parameter of 1 to 70 "
                          "characters");
    char delim[80];
    int dl = snprintf(delim, sizeof delim, "--%s", boundary);
    /* first delimiter (may be preceded by a preamble) */
    const char *p = find_bytes(body, len, delim, (size_t)dl);
    if (!p)
        return cv_err_set(e, CV_EINVAL, "bad_multipart", "",
                          "multipart body: boundary '%s' not found", boundary);
    const char *end = body + len;
    char crlf_delim[84];
    int cdl = snprintf(crlf_delim, sizeof crlf_delim, "\r\n--%s", boundary);
    for (;;) {
        p += dl;
        if (end - p >= 2 && p[0] == '-' && p[1] == '-')
            return 0; /* closing delimiter */
        /* skip transport padding and the line break after the delimiter */
        while (p < end && (*p == ' ' || *p == '\t'))
            p++;
        if (end - p < 2 || p[0] != '\r' || p[1] != '\n')
            return cv_err_set(e, CV_EINVAL, "bad_multipart", "",
                              "multipart body: malformed or missing closing boundary");
        p += 2;
        /* the part is [p, next): headers, an empty line, the content; its
         * headers end before the next delimiter (searched for from the
         * part's start, so that a part whose headers never end cannot run
         * into the next part and take its headers) */
        const char *next = find_bytes(p, (size_t)(end - p), crlf_delim, (size_t)cdl);
        if (!next)
            return cv_err_set(e, CV_EINVAL, "bad_multipart", "",
                              "multipart body: part is not terminated by the boundary");
        const char *hdrs = p;
        size_t hlen;
        if (next - p >= 2 && p[0] == '\r' && p[1] == '\n') {
            hlen = 0; /* no headers at all */
            p += 2;
        } else {
            const char *hend = find_bytes(p, (size_t)(next - p), "\r\n\r\n", 4);
            if (!hend)
                return cv_err_set(e, CV_EINVAL, "bad_multipart", "",
                                  "multipart body: part %d: its headers do not end (with an "
                                  "empty line) before the next boundary", out->nparts + 1);
            hlen = (size_t)(hend - p);
            p = hend + 4;
        }
        if (out->nparts >= CV_MP_MAX_PARTS)
            return cv_err_set(e, CV_EINVAL, "bad_multipart", "",
                              "multipart body: more than %d parts", CV_MP_MAX_PARTS);
        cv_mp_part *part = &out->parts[out->nparts];
        memset(part, 0, sizeof *part);
        /* Content-Disposition among the headers (one per line) */
        int have_cd = 0;
        const char *line = hdrs, *hstop = hdrs + hlen;
        while (line < hstop) {
            const char *eol = find_bytes(line, (size_t)(hstop - line), "\r\n", 2);
            size_t ll = eol ? (size_t)(eol - line) : (size_t)(hstop - line);
            if (ll > 20 && strncasecmp(line, "Content-Disposition:", 20) == 0) {
                have_cd = 1;
                if (!header_param(line, ll, "name", part->name, sizeof part->name))
                    part->name[0] = 0;
                header_param(line, ll, "filename", part->filename, sizeof part->filename);
            }
            line += ll + (eol ? 2 : 0);
        }
        if (!have_cd || !part->name[0])
            return cv_err_set(e, CV_EINVAL, "bad_multipart", "",
                              "multipart body: part %d has no Content-Disposition name",
                              out->nparts + 1);
        if (cv_mp_find(out, part->name))
            return cv_err_set(e, CV_EINVAL, "duplicate_field", part->name,
                              "multipart body: part '%s' appears more than once", part->name);
        part->data = p;
        part->len = (size_t)(next - p);
        out->nparts++;
        p = next + 2; /* at "--boundary" */
    }
}

const cv_mp_part *cv_mp_find(const cv_multipart *mp, const char *name)
{
    for (int i = 0; i < mp->nparts; i++)
        if (strcmp(mp->parts[i].name, name) == 0)
            return &mp->parts[i];
    return NULL;
}
