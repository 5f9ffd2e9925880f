/* b64.c - base64 decoding/encoding for uploads embedded in JSON bodies. */
#include "server/b64.h"

#include <stdint.h>
#include <stdlib.h>

static int b64_val(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+' || c == '-')
        return 62;
    if (c == '/' || c == '_')
        return 63;
    return -1;
}

static int is_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

int cv_b64_decode(const char *src, size_t len, void **out, size_t *outlen, const char *field,
                  cv_err *e)
{
    *out = NULL;
    *outlen = 0;
    uint8_t *buf = malloc(len / 4 * 3 + 3);
    if (!buf)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", field,
                          "%s: cannot allocate %zu bytes for the decoded data", field,
                          len / 4 * 3 + 3);
    size_t n = 0, pad = 0, quad = 0;
    uint32_t acc = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)src[i];
        if (is_space(c))
            continue;
        if (c == '=') {
            pad++;
            continue;
        }
        int v = b64_val(c);
        if (v < 0 || pad) {
            free(buf);
            if (v < 0)
                return cv_err_set(e, CV_EINVAL, "bad_base64", field,
                                  "%s: invalid base64 character 0x%02x at offset %zu", field, c,
                                  i);
            return cv_err_set(e, CV_EINVAL, "bad_base64", field,
                              "%s: base64 data continues after '=' padding (offset %zu)", field,
                              i);
        }
        acc = (acc << 6) | (uint32_t)v;
        if (++quad == 4) {
            buf[n++] = (uint8_t)(acc >> 16);
            buf[n++] = (uint8_t)(acc >> 8);
            buf[n++] = (uint8_t)acc;
            quad = 0;
            acc = 0;
        }
    }
    if (quad == 1 || pad > 2 || (pad && (quad + pad) % 4 != 0)) {
        free(buf);
        return cv_err_set(e, CV_EINVAL, "bad_base64", field,
                          "%s: truncated base64 data (length is not a whole number of "
                          "3-byte groups)", field);
    }
    if (quad == 2) {
        buf[n++] = (uint8_t)(acc >> 4);
    } else if (quad == 3) {
        buf[n++] = (uint8_t)(acc >> 10);
        buf[n++] = (uint8_t)(acc >> 2);
    }
    *out = buf;
    *outlen = n;
    return 0;
}

char *cv_b64_encode(const void *src, size_t len)
{
    static const char tab[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const uint8_t *s = src;
    if (len > (SIZE_MAX - 1) / 4 * 3 - 3)
        return NULL;
    char *o = malloc((len + 2) / 3 * 4 + 1);
    if (!o)
        return NULL;
    size_t j = 0, i = 0;
    for (; i + 3 <= len; i += 3) {
        uint32_t v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8 | s[i + 2];
        o[j++] = tab[v >> 18];
        o[j++] = tab[(v >> 12) & 63];
        o[j++] = tab[(v >> 6) & 63];
        o[j++] = tab[v & 63];
    }
    if (len - i == 1) {
        uint32_t v = (uint32_t)s[i] << 16;
        o[j++] = tab[v >> 18];
        o[j++] = tab[(v >> 12) & 63];
        o[j++] = '=';
        o[j++] = '=';
    } else if (len - i == 2) {
        uint32_t v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8;
        o[j++] = tab[v >> 18];
        o[j++] = tab[(v >> 12) & 63];
        o[j++] = tab[(v >> 6) & 63];
        o[j++] = '=';
    }
    o[j] = 0;
    return o;
}
