/* suggest.c - edit distance, closest-name hints, name lists and how a JSON
 * value reads in a message (see suggest.h). */
#include "api/suggest.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

int cv_edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 40 || lb > 40)
        return 99;
    int row[41];
    for (size_t j = 0; j <= lb; j++)
        row[j] = (int)j;
    for (size_t i = 1; i <= la; i++) {
        int prev = row[0];
        row[0] = (int)i;
        for (size_t j = 1; j <= lb; j++) {
            int cur = row[j];
            int best = prev + (a[i - 1] != b[j - 1]);
            if (row[j] + 1 < best)
                best = row[j] + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            prev = cur;
        }
    }
    return row[lb];
}

const char *cv_suggest(const char *word, const char *const *cands, int n)
{
    const char *hit = NULL;
    int best = 3;
    for (int i = 0; n < 0 ? cands[i] != NULL : i < n; i++) {
        /* a name that differs only in case ("relu", "ReLU") is the answer; one
         * that the word begins ("CrossEntropy", "CrossEntropyLoss") is close */
        size_t lw = strlen(word);
        int d = strcasecmp(word, cands[i]) == 0 ? 0 : cv_edit_distance(word, cands[i]);
        if (d > 2 && lw >= 4 && strncasecmp(word, cands[i], lw) == 0)
            d = 2;
        if (d < best) {
            best = d;
            hit = cands[i];
        }
    }
    return hit;
}

char *cv_suggest_hint(const char *word, const char *const *cands, int n, char *buf, size_t len)
{
    const char *s = cv_suggest(word, cands, n);
    if (len)
        buf[0] = 0;
    if (s)
        snprintf(buf, len, "; did you mean '%s'?", s);
    return buf;
}

char *cv_join_names(const char *const *names, int n, const char *sep, const char *last,
                    char *buf, size_t len)
{
    if (!len)
        return buf;
    buf[0] = 0;
    int count = n;
    if (names && n < 0)
        for (count = 0; names[count]; count++)
            ;
    size_t used = 0;
    for (int i = 0; names && i < count && used < len; i++)
        used += (size_t)snprintf(buf + used, len - used, "%s%s",
                                 i == 0 ? "" : i == count - 1 ? last : sep, names[i]);
    return buf;
}

const char *cv_json_kind(const cJSON *v, char *buf, size_t len)
{
    if (!v)
        return "nothing";
    if (cJSON_IsNull(v))
        return "null";
    if (cJSON_IsBool(v))
        return cJSON_IsTrue(v) ? "true" : "false";
    if (cJSON_IsNumber(v)) {
        snprintf(buf, len, "%.17g", v->valuedouble);
        return buf;
    }
    if (cJSON_IsString(v)) {
        snprintf(buf, len, "string \"%.40s\"", v->valuestring);
        return buf;
    }
    if (cJSON_IsArray(v))
        return "a list";
    if (cJSON_IsObject(v))
        return "an object";
    return "an invalid value";
}
