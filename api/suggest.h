/* suggest.h - names in messages: "did you mean" hints for misspelt names
 * (fields, ops, options, layer types, choices) by a capped Levenshtein
 * distance, lists of names ("a, b and c", "a|b"), and how a JSON value reads
 * after "got". */
#ifndef CV_SUGGEST_H
#define CV_SUGGEST_H

#include <cJSON.h>
#include <stddef.h>

/* Levenshtein distance of a and b; 99 when either is longer than 40 bytes. */
int cv_edit_distance(const char *a, const char *b);

/* The candidate closest to word at distance <= 2 (the first of equals; a
 * candidate equal but for case counts as distance 0, one that begins with a
 * word of 4 or more characters as distance 2), or NULL.  cands holds n names, or is NULL-terminated when n < 0. */
const char *cv_suggest(const char *word, const char *const *cands, int n);

/* Writes "; did you mean 'NAME'?" into buf for cv_suggest's answer, or ""
 * when there is none; returns buf. */
char *cv_suggest_hint(const char *word, const char *const *cands, int n, char *buf, size_t len);

/* Joins n names (NULL-terminated when n < 0; none when names is NULL) into
 * buf, truncated to len: sep between two names, last before the last one
 * (", " and " and " give "a, b and c"; "|" and "|" give "a|b|c").  Returns buf. */
char *cv_join_names(const char *const *names, int n, const char *sep, const char *last,
                    char *buf, size_t len);

/* How a JSON value reads in an error message ("got ..."): its value for
 * numbers, booleans and short strings, else its kind ("a list", "null").
 * Numbers and strings are written into buf. */
const char *cv_json_kind(const cJSON *v, char *buf, size_t len);

#endif
