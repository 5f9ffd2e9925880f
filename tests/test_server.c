/* test_server.c - the service's building blocks without HTTP: base64 and
 * multipart decoding, names, the registry (versions, pinned snapshots, 409
 * while in use, memory budget), the job queue (results, 429, cancel, time
 * limit, drain), metrics text, the demo, the route table against
 * api/openapi.yaml (run from the repository root, as `make unit` does), the
 * HTTP replies' framing over a socket, strict parsing over HTTP (duplicate
 * keys, %00 in a URL, Retry-After on 429/503), requests answered without
 * a socket (cv_http_handle), and the command line's flag tables. */
#include "testutil.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <regex.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "api/job.h"
#include "api/params.h"
#include "server/b64.h"
#include "server/cli.h"
#include "server/demo.h"
#include "server/http.h"
#include "server/jobs.h"
#include "server/metrics.h"
#include "server/multipart.h"
#include "server/registry.h"

/* ---- base64 ------------------------------------------------------------------ */

static void b64_ok(const char *in, const char *want, size_t wantlen)
{
    void *out;
    size_t n;
    cv_err e;
    ck_assert_msg(cv_b64_decode(in, strlen(in), &out, &n, "f", &e) == 0, "%s: %s", in,
                  e.message);
    ck_assert_uint_eq(n, wantlen);
    ck_assert(memcmp(out, want, n) == 0);
    free(out);
}

static void b64_bad(const char *in)
{
    void *out = (void *)1;
    size_t n;
    cv_err e;
    cv_err_clear(&e);
    ck_assert_msg(cv_b64_decode(in, strlen(in), &out, &n, "field", &e) == -1, "%s", in);
    ck_assert_int_eq(e.status, CV_EINVAL);
    ck_assert_str_eq(e.code, "bad_base64");
    ck_assert_str_eq(e.field, "field");
    ck_assert_ptr_null(out);
}

START_TEST(base64_decodes_and_rejects)
{
    b64_ok("", "", 0);
    b64_ok("Zg==", "f", 1);
    b64_ok("Zm8=", "fo", 2);
    b64_ok("Zm9v", "foo", 3);
    b64_ok("Zm9vYmFy", "foobar", 6);
    b64_ok("Zm9v\r\nYmFy\n", "foobar", 6);
    b64_ok("Zm8", "fo", 2);          /* unpadded */
    b64_ok("-_8=", "\xfb\xff", 2);   /* URL-safe alphabet */
    b64_bad("Zm9v!");
    b64_bad("Z");
    b64_bad("Zg=");
    b64_bad("Zg==Zg==");
    b64_bad("Zg===");
    /* round trip of all byte values */
    unsigned char all[256];
    for (int i = 0; i < 256; i++)
        all[i] = (unsigned char)i;
    for (size_t len = 0; len <= 256; len += 37) {
        char *enc = cv_b64_encode(all, len);
        ck_assert_ptr_nonnull(enc);
        void *dec;
        size_t n;
        cv_err e;
        ck_assert_int_eq(cv_b64_decode(enc, strlen(enc), &dec, &n, "f", &e), 0);
        ck_assert_uint_eq(n, len);
        ck_assert(memcmp(dec, all, len) == 0);
        free(dec);
        free(enc);
    }
}
END_TEST

/* ---- multipart --------------------------------------------------------------- */

START_TEST(multipart_parses_parts)
{
    static const char body[] =
        "preamble\r\n"
        "--XyZ\r\n"
        "Content-Disposition: form-data; name=\"name\"\r\n\r\n"
        "m1\r\n"
        "--XyZ\r\n"
        "Content-Disposition: form-data; name=\"parameters\"; filename=\"p.safetensors\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
        "\x01\x00\r\n--X\r\nbinary\r\n"
        "--XyZ--\r\n";
    cv_multipart mp;
    cv_err e;
    ck_assert_int_eq(cv_mp_is_multipart("multipart/form-data; boundary=XyZ"), 1);
    ck_assert_int_eq(cv_mp_is_multipart("application/json"), 0);
    ck_assert_int_eq(cv_mp_is_multipart(NULL), 0);
    ck_assert_msg(cv_mp_parse("multipart/form-data; boundary=XyZ", body, sizeof body - 1, &mp,
                              &e) == 0,
                  "%s", e.message);
    ck_assert_int_eq(mp.nparts, 2);
    const cv_mp_part *n = cv_mp_find(&mp, "name"), *p = cv_mp_find(&mp, "parameters");
    ck_assert_ptr_nonnull(n);
    ck_assert_ptr_nonnull(p);
    ck_assert_uint_eq(n->len, 2);
    ck_assert(memcmp(n->data, "m1", 2) == 0);
    ck_assert_str_eq(p->filename, "p.safetensors");
    ck_assert_uint_eq(p->len, 15);
    ck_assert(memcmp(p->data, "\x01\x00\r\n--X\r\nbinary", 15) == 0);
    ck_assert_ptr_null(cv_mp_find(&mp, "other"));
    /* quoted boundary */
    ck_assert_int_eq(
        cv_mp_parse("multipart/form-data; boundary=\"XyZ\"", body, sizeof body - 1, &mp, &e), 0);
}
END_TEST

START_TEST(multipart_rejects_malformed)
{
    cv_multipart mp;
    cv_err e;
    const char *ct = "multipart/form-data; boundary=B";
    static const char *const bad[] = {
        "no boundary here",
        "--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nunterminated",
        "--B\r\nContent-Disposition: form-data; name=\"a\"\r\nno blank line",
        "--B\r\nContent-Type: text/plain\r\n\r\nx\r\n--B--",
        ("--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--B\r\n"
         "Content-Disposition: form-data; name=\"a\"\r\n\r\n2\r\n--B--"),
        "--Bjunk",
        /* a part whose headers never end must not run into the next part and
         * take its name (it was read as one part "a"; found by review while
         * fuzzing, tests/fuzz/multipart/finding-headers-across-boundary) */
        ("--B\r\nX-Other: y\r\n--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n"
         "data\r\n--B--\r\n"),
        /* no empty line before the delimiter: the delimiter's CRLF is not it */
        "--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n--B--",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        cv_err_clear(&e);
        ck_assert_msg(cv_mp_parse(ct, bad[i], strlen(bad[i]), &mp, &e) == -1, "case %zu", i);
        ck_assert_int_eq(e.status, CV_EINVAL);
    }
    ck_assert_int_eq(cv_mp_parse("multipart/form-data", "--B--", 5, &mp, &e), -1);
    /* a truncated body never reads outside the buffer */
    static const char ok[] = "--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nv\r\n--B--";
    for (size_t len = 0; len < sizeof ok - 1; len++)
        cv_mp_parse(ct, ok, len, &mp, &e);
    ck_assert_int_eq(cv_mp_parse(ct, ok, sizeof ok - 1, &mp, &e), 0);
    /* empty content, and a part without headers (refused for its missing name) */
    static const char empty[] =
        "--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n\r\n--B--";
    ck_assert_int_eq(cv_mp_parse(ct, empty, sizeof empty - 1, &mp, &e), 0);
    ck_assert_int_eq(mp.nparts, 1);
    ck_assert_uint_eq(mp.parts[0].len, 0);
    static const char nohead[] = "--B\r\n\r\nx\r\n--B--";
    ck_assert_int_eq(cv_mp_parse(ct, nohead, sizeof nohead - 1, &mp, &e), -1);
    ck_assert_msg(strstr(e.message, "no Content-Disposition name"), "%s", e.message);
}
END_TEST

/* ---- names and registry -------------------------------------------------------- */

/* cv_job_text_indices: a plain index list is read into int32 and replaced
 * by a placeholder of its length ("[0", spaces, "]"); anything else (not the
 * top-level batch's, not plain integers) is left to the strict parser. */
static void indices_case(const char *text, int want, size_t n, int32_t last, const char *rest)
{
    char *r = NULL;
    size_t rl = 0, count = 0;
    int32_t *idx = NULL;
    int rc = cv_job_text_indices(text, strlen(text), &r, &rl, &idx, &count);
    ck_assert_msg(rc == want, "%s: %d", text, rc);
    if (rc == 1) {
        ck_assert_uint_eq(count, n);
        ck_assert_int_eq(idx[count - 1], last);
        ck_assert_str_eq(r, rest);
        ck_assert_uint_eq(rl, strlen(rest));
    }
    free(r);
    free(idx);
}

START_TEST(job_indices_read_apart)
{
    indices_case("{\"op\":\"loss\",\"batch\":{\"indices\":[1,2,3]}}", 1, 3, 3,
                 "{\"op\":\"loss\",\"batch\":{\"indices\":[0    ]}}");
    indices_case("{ \"batch\" : { \"size\" : 2, \"indices\" : [ 7 , 2147483647 ] } , \"op\":\"x\"}",
                 1, 2, 2147483647,
                 "{ \"batch\" : { \"size\" : 2, \"indices\" : [0               ] } , \"op\":\"x\"}");
    indices_case("{\"batch\":{\"indices\":[5]}}", 1, 1, 5, "{\"batch\":{\"indices\":[0]}}");
    indices_case("{\"x\":\"\\\"batch\\\":{\\\"indices\\\":[5]}\",\"batch\":{\"offset\":1}}", 0, 0,
                 0, "");
    indices_case("{\"options\":{\"batch\":{\"indices\":[1]}}}", 0, 0, 0, "");
    indices_case("{\"batch\":{\"indices\":[1,2.0]}}", 0, 0, 0, "");
    indices_case("{\"batch\":{\"indices\":[01]}}", 0, 0, 0, "");
    indices_case("{\"batch\":{\"indices\":[2147483648]}}", 0, 0, 0, "");
    indices_case("{\"batch\":{\"indices\":[-1]}}", 0, 0, 0, "");
    indices_case("{\"batch\":{\"indices\":[]}}", 0, 0, 0, "");
    indices_case("{\"batch\":{\"indices\":[1,2", 0, 0, 0, "");
    indices_case("[1,2]", 0, 0, 0, "");
}
END_TEST

START_TEST(names)
{
    ck_assert(cv_name_valid("demo-mlp"));
    ck_assert(cv_name_valid("a.b_C-9"));
    ck_assert(!cv_name_valid(""));
    ck_assert(!cv_name_valid(NULL));
    ck_assert(!cv_name_valid("a b"));
    ck_assert(!cv_name_valid("../x"));
    ck_assert(!cv_name_valid("a/b"));
    char s[80];
    memset(s, 'a', 64);
    s[64] = 0;
    ck_assert(cv_name_valid(s));
    s[64] = 'a';
    s[65] = 0;
    ck_assert(!cv_name_valid(s));
}
END_TEST

static const tu_layer mlp[] = {{&cv_linear_class, 5}, {&cv_tanh_class, 0}, {&cv_linear_class, 3}};

static cv_model *heap_model(uint64_t seed)
{
    cv_model *m = malloc(sizeof *m);
    ck_assert_ptr_nonnull(m);
    tu_model(m, 4, mlp, 3, CV_LOSS_CE, CV_RED_MEAN, seed);
    return m;
}

static cv_dataset *heap_data(const cv_model *m, size_t n)
{
    cv_dataset *d = malloc(sizeof *d);
    ck_assert_ptr_nonnull(d);
    tu_data(d, m, n, 9);
    return d;
}

START_TEST(registry_versions_pins_conflicts_budget)
{
    cv_registry *r = cv_registry_new((size_t)1 << 30);
    cv_err e;
    cv_model *m = heap_model(1);
    cv_dataset *d = heap_data(m, 20);
    ck_assert_int_eq(cv_registry_add_model(r, "m", m, "test", NULL, &e), 0);
    ck_assert_int_eq(cv_registry_add_dataset(r, "d", d, "test", NULL, &e), 0);
    cv_registry_stats st;
    cv_registry_stats_get(r, &st);
    ck_assert_int_eq(st.models, 1);
    ck_assert_int_eq(st.datasets, 1);

    /* duplicate name */
    ck_assert_int_eq(cv_registry_add_model(r, "m", heap_model(2), "test", NULL, &e), -1);
    ck_assert_int_eq(e.status, CV_ECONFLICT);
    /* invalid name */
    ck_assert_int_eq(cv_registry_add_model(r, "bad name", heap_model(2), "test", NULL, &e), -1);
    ck_assert_int_eq(e.status, CV_EINVAL);

    /* a job pins version 1 */
    cv_snap *pin = cv_registry_acquire(r, CV_REG_MODEL, "m", &e);
    ck_assert_ptr_nonnull(pin);
    ck_assert_uint_eq(pin->version, 1);
    float first = pin->model->params[0];

    /* new weights: version 2, the pinned snapshot is untouched */
    cv_model *m2 = heap_model(7);
    void *buf;
    size_t len;
    ck_assert_int_eq(cv_params_export(m2, &buf, &len, &e), 0);
    cv_snap *s2;
    ck_assert_msg(cv_registry_put_params(r, "m", buf, len, &s2, &e) == 0, "%s", e.message);
    ck_assert_uint_eq(s2->version, 2);
    ck_assert(s2->model->params[0] == m2->params[0]);
    ck_assert(pin->model->params[0] == first);
    ck_assert(first != m2->params[0]);
    cv_snap_unref(s2);
    /* bad parameters leave version 2 in place */
    ck_assert_int_eq(cv_registry_put_params(r, "m", buf, len / 2, NULL, &e), -1);
    ck_assert_int_eq(e.status, CV_EINVAL);
    ck_assert_int_eq(cv_registry_put_params(r, "nope", buf, len, NULL, &e), -1);
    ck_assert_int_eq(e.status, CV_ENOTFOUND);
    free(buf);
    cv_model_free(m2);
    free(m2);
    cv_snap *cur = cv_registry_get(r, CV_REG_MODEL, "m", &e);
    ck_assert_uint_eq(cur->version, 2);
    cv_snap_unref(cur);

    /* in use: 409; released: deleted */
    ck_assert_int_eq(cv_registry_delete(r, CV_REG_MODEL, "m", &e), -1);
    ck_assert_int_eq(e.status, CV_ECONFLICT);
    ck_assert_str_eq(e.code, "in_use");
    cv_registry_release(r, pin);
    ck_assert_int_eq(cv_registry_delete(r, CV_REG_MODEL, "m", &e), 0);
    ck_assert_ptr_null(cv_registry_get(r, CV_REG_MODEL, "m", &e));
    ck_assert_int_eq(e.status, CV_ENOTFOUND);
    ck_assert_int_eq(cv_registry_delete(r, CV_REG_MODEL, "m", &e), -1);
    ck_assert_int_eq(e.status, CV_ENOTFOUND);

    /* datasets: PUT creates then replaces */
    cv_model *mm = heap_model(3);
    int created = -1;
    cv_snap *ds;
    ck_assert_int_eq(cv_registry_put_dataset(r, "d", heap_data(mm, 10), "t", &created, &ds, &e), 0);
    ck_assert_int_eq(created, 0);
    ck_assert_uint_eq(ds->version, 2);
    ck_assert_uint_eq(ds->data->n, 10);
    cv_snap_unref(ds);
    ck_assert_int_eq(cv_registry_put_dataset(r, "d2", heap_data(mm, 10), "t", &created, NULL, &e), 0);
    ck_assert_int_eq(created, 1);
    cv_snap **v;
    int n = cv_registry_list(r, CV_REG_DATASET, &v);
    ck_assert_int_eq(n, 2);
    ck_assert_str_eq(v[0]->name, "d");
    ck_assert_str_eq(v[1]->name, "d2");
    cJSON *j = cv_snap_to_json(v[0], 1);
    ck_assert_ptr_nonnull(j);
    ck_assert_int_eq(cJSON_GetObjectItem(j, "n")->valueint, 10);
    cJSON_Delete(j);
    cv_snaps_release(v, n);
    cv_model_free(mm);
    free(mm);
    cv_registry_free(r);

    /* memory budget: 413 naming the budget; nothing changes */
    cv_model *b1 = heap_model(1);
    size_t one = cv_model_bytes(b1);
    r = cv_registry_new(one + one / 2);
    ck_assert_int_eq(cv_registry_add_model(r, "b1", b1, "t", NULL, &e), 0);
    ck_assert_int_eq(cv_registry_add_model(r, "b2", heap_model(2), "t", NULL, &e), -1);
    ck_assert_int_eq(e.status, CV_ETOOLARGE);
    ck_assert_str_eq(e.code, "registry_full");
    char budget[32];
    snprintf(budget, sizeof budget, "%zu", one + one / 2);
    ck_assert_msg(strstr(e.message, budget) != NULL, "%s", e.message);
    cv_registry_stats_get(r, &st);
    ck_assert_uint_eq(st.bytes, one);
    ck_assert_int_eq(st.models, 1);
    cv_registry_free(r);
}
END_TEST

/* DELETE + a new registration (another architecture) while a PUT of new
 * weights is parsed outside the lock: the PUT must fail with 409 and leave
 * the new registration alone.  A second PUT in between is fine. */
static const tu_layer mlp_wide[] = {{&cv_linear_class, 7}, {&cv_tanh_class, 0},
                                    {&cv_linear_class, 3}};
static int hook_mode;
static void race_hook(cv_registry *r, const char *name, void *arg)
{
    (void)arg;
    cv_err e;
    if (hook_mode == 1) {
        ck_assert_int_eq(cv_registry_delete(r, CV_REG_MODEL, name, &e), 0);
        cv_model *w = malloc(sizeof *w);
        ck_assert_ptr_nonnull(w);
        tu_model(w, 4, mlp_wide, 3, CV_LOSS_CE, CV_RED_MEAN, 5);
        ck_assert_int_eq(cv_registry_add_model(r, name, w, "race", NULL, &e), 0);
    } else if (hook_mode == 2) {
        ck_assert_int_eq(cv_registry_delete(r, CV_REG_MODEL, name, &e), 0);
    } else if (hook_mode == 3) {
        /* another PUT of the same registration */
        hook_mode = 0;
        cv_model *m3 = heap_model(9);
        void *b;
        size_t bl;
        ck_assert_int_eq(cv_params_export(m3, &b, &bl, &e), 0);
        ck_assert_int_eq(cv_registry_put_params(r, name, b, bl, NULL, &e), 0);
        free(b);
        cv_model_free(m3);
        free(m3);
    }
}

/* A stand-in for a kept posterior: counts its frees. */
static int posts_freed;
static void post_free(void *p)
{
    posts_freed++;
    free(p);
}

/* Kept posteriors (server/registry.h CV_REG_POSTERIOR): per model, counted in the
 * budget, replaced by name, accumulate_into's expect refused once replaced, pinned by a
 * job (DELETE 409), gone with the model's DELETE. */
START_TEST(registry_posteriors)
{
    cv_err e;
    cv_model *m = heap_model(1);
    size_t mb = cv_model_bytes(m);
    cv_registry *r = cv_registry_new(mb + 1000);
    posts_freed = 0;
    ck_assert_int_eq(cv_registry_add_model(r, "m", m, "test", NULL, &e), 0);
    cv_snap *ms = cv_registry_get(r, CV_REG_MODEL, "m", &e);
    cv_snap *p1;
    ck_assert_int_eq(cv_registry_keep_posterior(r, ms, "a", malloc(8), 600, post_free, NULL, &p1,
                                                &e), 0);
    ck_assert_str_eq(p1->owner, "m");
    ck_assert_uint_eq(p1->owner_version, 1);
    /* over the budget: 413 registry_full naming it; the posterior is freed */
    ck_assert_int_eq(cv_registry_keep_posterior(r, ms, "b", malloc(8), 600, post_free, NULL,
                                                NULL, &e), -1);
    ck_assert_int_eq(e.status, CV_ETOOLARGE);
    ck_assert_str_eq(e.code, "registry_full");
    ck_assert(strstr(e.message, "--max-registry-bytes") != NULL);
    ck_assert_int_eq(posts_freed, 1);
    cv_registry_stats st;
    cv_registry_stats_get(r, &st);
    ck_assert_int_eq(st.posteriors, 1);
    ck_assert_int_eq(st.datasets, 0);
    ck_assert_uint_eq(st.bytes, mb + 600);
    /* a job pins "a"; replacing it under accumulate_into's expect works once */
    cv_snap *pin = cv_registry_acquire_posterior(r, "m", "a", "options.posterior", &e);
    ck_assert_ptr_eq(pin, p1);
    ck_assert_int_eq(cv_registry_delete_posterior(r, "m", "a", &e), -1);
    ck_assert_int_eq(e.status, CV_ECONFLICT);
    cv_snap *p2;
    ck_assert_int_eq(cv_registry_keep_posterior(r, ms, "a", malloc(8), 300, post_free, pin, &p2,
                                                &e), 0);
    ck_assert_uint_eq(p2->version, 2);
    ck_assert_int_eq(cv_registry_keep_posterior(r, ms, "a", malloc(8), 300, post_free, pin, NULL,
                                                &e), -1);
    ck_assert_int_eq(e.status, CV_ECONFLICT);
    ck_assert_str_eq(e.field, "options.accumulate_into");
    ck_assert(cv_registry_acquire_posterior(r, "m", "zz", "options.posterior", &e) == NULL);
    ck_assert_int_eq(e.status, CV_ENOTFOUND);
    ck_assert_str_eq(e.field, "options.posterior");
    cv_registry_release(r, pin);
    cv_snap_unref(p1);
    cv_snap **v;
    ck_assert_int_eq(cv_registry_list_posteriors(r, "m", &v), 1);
    cv_snaps_release(v, 1);
    /* the model's DELETE takes its posteriors */
    cv_snap_unref(p2);
    cv_snap_unref(ms);
    ck_assert_int_eq(cv_registry_delete(r, CV_REG_MODEL, "m", &e), 0);
    cv_registry_stats_get(r, &st);
    ck_assert_int_eq(st.posteriors, 0);
    ck_assert_uint_eq(st.bytes, 0);
    ck_assert_int_eq(posts_freed, 4);
    cv_registry_free(r);
}
END_TEST

/* Each version keeps the replaced version's and the first version's
 * parameters (the cross-version instruments of op "instruments"). */
START_TEST(registry_keeps_previous_and_first_parameters)
{
    cv_registry *r = cv_registry_new((size_t)1 << 30);
    cv_err e;
    cv_model *v1 = heap_model(3);
    for (size_t i = 0; i < v1->nparams_total; i++)
        v1->params[i] = 1.0f + (float)i;
    float first0 = v1->params[0];
    ck_assert_int_eq(cv_registry_add_model(r, "h", v1, "test", NULL, &e), 0);
    cv_snap *s = cv_registry_get(r, CV_REG_MODEL, "h", &e);
    ck_assert_ptr_null(s->previous);
    ck_assert_ptr_null(s->first);
    cv_snap_unref(s);
    float want_prev0 = first0;
    for (int v = 2; v <= 4; v++) {
        cv_model *m = heap_model(3);
        for (size_t i = 0; i < m->nparams_total; i++)
            m->params[i] = 10.0f * (float)v + (float)i;
        void *buf;
        size_t len;
        ck_assert_int_eq(cv_params_export(m, &buf, &len, &e), 0);
        ck_assert_msg(cv_registry_put_params(r, "h", buf, len, &s, &e) == 0, "%s", e.message);
        ck_assert_uint_eq(s->version, (unsigned long)v);
        ck_assert_ptr_nonnull(s->previous);
        ck_assert_ptr_nonnull(s->first);
        ck_assert_uint_eq(s->previous->version, (unsigned long)v - 1);
        ck_assert_uint_eq(s->first->version, 1);
        ck_assert_uint_eq(s->previous->n, m->nparams_total);
        ck_assert(s->previous->v[0] == want_prev0);
        ck_assert(s->first->v[0] == first0);
        want_prev0 = m->params[0];
        cv_snap_unref(s);
        free(buf);
        cv_model_free(m);
        free(m);
    }
    /* a model restored from --state-dir at version 5: its first version's
     * parameters are gone, so a later version keeps none (not version 5's) */
    cv_model *v5 = heap_model(3);
    ck_assert_int_eq(cv_registry_restore(r, "k", v5, NULL, NULL, "test", 5, 1.0, 2.0, &e), 0);
    cv_model *m6 = heap_model(3);
    void *buf;
    size_t len;
    ck_assert_int_eq(cv_params_export(m6, &buf, &len, &e), 0);
    ck_assert_int_eq(cv_registry_put_params(r, "k", buf, len, &s, &e), 0);
    ck_assert_uint_eq(s->version, 6);
    ck_assert_ptr_nonnull(s->previous);
    ck_assert_uint_eq(s->previous->version, 5);
    ck_assert_ptr_null(s->first);
    cv_snap_unref(s);
    free(buf);
    cv_model_free(m6);
    free(m6);
    cv_registry_free(r);
}
END_TEST

/* online Laplace: a job that read posterior "a" (its pin) replaces it with one of
 * the same size; the budget holds one of them, not both (the pinned one is the job's
 * own and goes when it finishes) */
START_TEST(registry_posterior_accumulate_within_budget)
{
    cv_err e;
    cv_model *m = heap_model(1);
    size_t mb = cv_model_bytes(m);
    cv_registry *r = cv_registry_new(mb + 1000);
    ck_assert_int_eq(cv_registry_add_model(r, "m", m, "test", NULL, &e), 0);
    cv_snap *ms = cv_registry_get(r, CV_REG_MODEL, "m", &e);
    ck_assert_int_eq(cv_registry_keep_posterior(r, ms, "a", malloc(8), 600, free, NULL, NULL,
                                                &e), 0);
    cv_snap *pin = cv_registry_acquire_posterior(r, "m", "a", "options.accumulate_into", &e);
    ck_assert_ptr_nonnull(pin);
    int rc = cv_registry_keep_posterior(r, ms, "a", malloc(8), 600, free, pin, NULL, &e);
    ck_assert_msg(rc == 0, "%s", e.message);
    cv_registry_release(r, pin);
    cv_registry_stats st;
    cv_registry_stats_get(r, &st);
    ck_assert_uint_eq(st.bytes, mb + 600);
    cv_snap_unref(ms);
    cv_registry_free(r);
}
END_TEST

START_TEST(registry_put_params_race_and_pinned_budget)
{
    cv_registry *r = cv_registry_new((size_t)1 << 30);
    cv_err e;
    ck_assert_int_eq(cv_registry_add_model(r, "m", heap_model(1), "test", NULL, &e), 0);
    cv_model *m2 = heap_model(7);
    void *buf;
    size_t len;
    ck_assert_int_eq(cv_params_export(m2, &buf, &len, &e), 0);
    cv_registry_put_params_hook = race_hook;

    hook_mode = 1;
    ck_assert_int_eq(cv_registry_put_params(r, "m", buf, len, NULL, &e), -1);
    ck_assert_int_eq(e.status, CV_ECONFLICT);
    ck_assert_str_eq(e.code, "conflict");
    cv_snap *cur = cv_registry_get(r, CV_REG_MODEL, "m", &e);
    ck_assert_ptr_nonnull(cur);
    ck_assert_uint_eq(cur->version, 1);
    ck_assert_str_eq(cur->source, "race");
    ck_assert_int_eq((int)cur->model->layers[0].params[0].dim[0], 7); /* still the wide one */
    cv_snap_unref(cur);

    hook_mode = 2;
    ck_assert_int_eq(cv_registry_delete(r, CV_REG_MODEL, "m", &e), 0);
    ck_assert_int_eq(cv_registry_add_model(r, "m", heap_model(1), "test", NULL, &e), 0);
    ck_assert_int_eq(cv_registry_put_params(r, "m", buf, len, NULL, &e), -1);
    ck_assert_int_eq(e.status, CV_ENOTFOUND);

    hook_mode = 3;
    ck_assert_int_eq(cv_registry_add_model(r, "m", heap_model(1), "test", NULL, &e), 0);
    cv_snap *s;
    ck_assert_msg(cv_registry_put_params(r, "m", buf, len, &s, &e) == 0, "%s", e.message);
    ck_assert_uint_eq(s->version, 3);
    ck_assert(s->model->params[0] == m2->params[0]);
    cv_snap_unref(s);
    cv_registry_put_params_hook = NULL;
    cv_registry_free(r);

    /* old versions pinned by jobs count against the budget */
    size_t one = cv_model_bytes(m2);
    r = cv_registry_new(2 * one + one / 2);
    ck_assert_int_eq(cv_registry_add_model(r, "p", heap_model(1), "t", NULL, &e), 0);
    cv_snap *pin = cv_registry_acquire(r, CV_REG_MODEL, "p", &e);
    ck_assert_msg(cv_registry_put_params(r, "p", buf, len, NULL, &e) == 0, "%s", e.message);
    cv_registry_stats st;
    cv_registry_stats_get(r, &st);
    /* version 2 also counts the kept parameters of versions 1 and (first) 1 */
    size_t kept = 2 * (sizeof(cv_param_blob) + sizeof(float) * m2->nparams_total);
    ck_assert_uint_eq(st.bytes, one + kept);
    ck_assert_uint_eq(st.retired_bytes, one);
    ck_assert_int_eq(st.retired, 1);
    /* a second model fits the budget only without the pinned version: 429 */
    ck_assert_int_eq(cv_registry_add_model(r, "q", heap_model(2), "t", NULL, &e), -1);
    ck_assert_int_eq(e.status, CV_EBUSY);
    ck_assert_str_eq(e.code, "registry_full");
    ck_assert_msg(strstr(e.message, "pinned") != NULL, "%s", e.message);
    /* and replacing p again while v2 is pinned too would hold 3 copies */
    cv_snap *pin2 = cv_registry_acquire(r, CV_REG_MODEL, "p", &e);
    ck_assert_int_eq(cv_registry_put_params(r, "p", buf, len, NULL, &e), -1);
    ck_assert_int_eq(e.status, CV_EBUSY);
    cv_registry_release(r, pin2);
    /* the job finishes: its old version is freed and no longer counted */
    cv_registry_release(r, pin);
    cv_registry_stats_get(r, &st);
    ck_assert_uint_eq(st.retired_bytes, 0);
    ck_assert_int_eq(cv_registry_add_model(r, "q", heap_model(2), "t", NULL, &e), 0);
    cv_registry_free(r);
    free(buf);
    cv_model_free(m2);
    free(m2);
}
END_TEST

/* ---- jobs -------------------------------------------------------------------- */

typedef struct {
    cv_registry *reg;
    cv_jobs *jobs;
} jfx;

/* A job queue on f's registry (default limits). */
static cv_jobs *jfx_jobs(jfx *f, int workers, size_t max_queue, double timeout, double keep,
                         size_t max_kept)
{
    cv_jobs_config c = {.workers = workers, .max_queue = max_queue, .job_timeout = timeout,
                        .keep_s = keep, .max_kept = max_kept};
    cv_job_limits_default(&c.limits);
    cv_err e;
    cv_jobs *jobs = cv_jobs_new(&c, f->reg, &e);
    ck_assert_ptr_nonnull(jobs);
    return jobs;
}

static void jfx_make_keep(jfx *f, int workers, size_t max_queue, double timeout, double keep)
{
    cv_err e;
    f->reg = cv_registry_new((size_t)1 << 30);
    cv_model *m = heap_model(1);
    ck_assert_int_eq(cv_registry_add_dataset(f->reg, "d", heap_data(m, 300), "t", NULL, &e), 0);
    ck_assert_int_eq(cv_registry_add_model(f->reg, "m", m, "t", NULL, &e), 0);
    f->jobs = jfx_jobs(f, workers, max_queue, timeout, keep, 1000);
}

static void jfx_make(jfx *f, int workers, size_t max_queue, double timeout)
{
    jfx_make_keep(f, workers, max_queue, timeout, 600);
}

static void jfx_free(jfx *f)
{
    cv_jobs_free(f->jobs);
    cv_registry_free(f->reg);
}

static int submit(jfx *f, const char *text, cv_job **j, cv_err *e)
{
    cJSON *doc = cJSON_Parse(text);
    ck_assert_ptr_nonnull(doc);
    int rc = cv_jobs_submit(f->jobs, doc, 0, j, e);
    cJSON_Delete(doc);
    return rc;
}

static cJSON *status_of(jfx *f, cv_job *j)
{
    size_t len;
    char *t = cv_job_status_text(f->jobs, j, &len);
    ck_assert_ptr_nonnull(t);
    ck_assert_uint_eq(strlen(t), len);
    cJSON *s = cJSON_Parse(t);
    ck_assert_msg(s != NULL, "status text is not JSON: %.200s", t);
    free(t);
    return s;
}

static const char *sfield(cJSON *o, const char *a, const char *b)
{
    cJSON *v = cJSON_GetObjectItem(o, a);
    if (b)
        v = cJSON_GetObjectItem(v, b);
    return cJSON_IsString(v) ? v->valuestring : "";
}

/* j's status text says status and, when code is not NULL, error.code. */
static void expect_status(jfx *f, cv_job *j, const char *status, const char *code)
{
    cJSON *s = status_of(f, j);
    ck_assert_str_eq(sfield(s, "status", NULL), status);
    if (code)
        ck_assert_str_eq(sfield(s, "error", "code"), code);
    cJSON_Delete(s);
}

#define LONG_JOB                                                                                 \
    "{\"op\":\"trace\",\"model\":\"m\",\"dataset\":\"d\",\"curvature\":\"hessian\","           \
    "\"options\":{\"max_probes\":1000000,\"tol\":0}}"

static void wait_running(jfx *f, cv_job *j)
{
    for (int i = 0; i < 1000; i++) {
        cJSON *s = status_of(f, j);
        int running = strcmp(sfield(s, "status", NULL), "running") == 0 &&
                      cJSON_GetObjectItem(cJSON_GetObjectItem(s, "progress"), "matvecs_done")
                              ->valuedouble > 0;
        cJSON_Delete(s);
        if (running)
            return;
        struct timespec ts = {0, 10000000};
        nanosleep(&ts, NULL);
    }
    ck_abort_msg("job never ran");
}

START_TEST(jobs_run_and_report)
{
    jfx f;
    jfx_make(&f, 2, 8, 0);
    cv_job *j;
    cv_err e;
    ck_assert_int_eq(submit(&f, "{\"op\":\"loss\",\"model\":\"m\",\"dataset\":\"d\"}", &j, &e), 0);
    ck_assert_int_eq(cv_jobs_wait(f.jobs, j, 30), 1);
    cJSON *s = status_of(&f, j);
    ck_assert_str_eq(sfield(s, "status", NULL), "succeeded");
    ck_assert_str_eq(sfield(s, "result", "op"), "loss");
    ck_assert(cJSON_IsNumber(cJSON_GetObjectItem(cJSON_GetObjectItem(s, "result"), "loss")));
    ck_assert_int_eq(cJSON_GetObjectItem(s, "model_version")->valueint, 1);
    ck_assert_str_eq(sfield(s, "id", NULL), cv_job_id(j));
    cJSON_Delete(s);
    cv_job *g = cv_jobs_get(f.jobs, cv_job_id(j), &e);
    ck_assert_ptr_eq(g, j);
    cv_job_unref(g);
    ck_assert_ptr_null(cv_jobs_get(f.jobs, "nope", &e));
    ck_assert_int_eq(e.status, CV_ENOTFOUND);
    cv_job_unref(j);

    /* validation and lookups before queueing */
    ck_assert_int_eq(submit(&f, "{\"op\":\"nope\",\"model\":\"m\",\"dataset\":\"d\"}", &j, &e), -1);
    ck_assert_int_eq(e.status, CV_EINVAL);
    ck_assert_int_eq(submit(&f, "{\"op\":\"loss\",\"model\":\"x\",\"dataset\":\"d\"}", &j, &e), -1);
    ck_assert_int_eq(e.status, CV_ENOTFOUND);
    ck_assert_str_eq(e.field, "model");
    ck_assert_int_eq(submit(&f, "{\"op\":\"loss\",\"model\":\"m\",\"dataset\":\"x\"}", &j, &e), -1);
    ck_assert_int_eq(e.status, CV_ENOTFOUND);
    ck_assert_int_eq(submit(&f, "{\"op\":\"loss\",\"dataset\":\"d\"}", &j, &e), -1);
    ck_assert_int_eq(e.status, CV_EINVAL);

    cJSON *l = cv_jobs_list(f.jobs, CV_JOB_SUCCEEDED, "m", NULL, "loss", 10);
    ck_assert_int_eq(cJSON_GetObjectItem(l, "count")->valueint, 1);
    cJSON_Delete(l);
    l = cv_jobs_list(f.jobs, CV_JOB_FAILED, NULL, NULL, NULL, 10);
    ck_assert_int_eq(cJSON_GetObjectItem(l, "count")->valueint, 0);
    cJSON_Delete(l);
    /* finished jobs no longer hold the model */
    ck_assert_int_eq(cv_registry_delete(f.reg, CV_REG_MODEL, "m", &e), 0);
    jfx_free(&f);
}
END_TEST

START_TEST(jobs_queue_full_cancel_and_drain)
{
    jfx f;
    jfx_make(&f, 1, 1, 0);
    cv_job *a, *b, *c;
    cv_err e;
    ck_assert_int_eq(submit(&f, LONG_JOB, &a, &e), 0);
    wait_running(&f, a);
    ck_assert_int_eq(submit(&f, LONG_JOB, &b, &e), 0);
    ck_assert_int_eq(submit(&f, LONG_JOB, &c, &e), -1);
    ck_assert_int_eq(e.status, CV_EBUSY);
    ck_assert_str_eq(e.code, "queue_full");
    cv_jobs_stats st;
    cv_jobs_stats_get(f.jobs, &st);
    ck_assert_uint_eq(st.queue_depth, 1);
    ck_assert_int_eq(st.busy_workers, 1);
    ck_assert_int_eq(st.rejected_total, 1);
    /* model in use while jobs hold it */
    ck_assert_int_eq(cv_registry_delete(f.reg, CV_REG_DATASET, "d", &e), -1);
    ck_assert_int_eq(e.status, CV_ECONFLICT);
    /* cancel the queued one, then the running one */
    cv_jobs_cancel(f.jobs, b, 0);
    expect_status(&f, b, "cancelled", "cancelled");
    cv_jobs_cancel(f.jobs, a, 10);
    expect_status(&f, a, "cancelled", NULL);
    cv_job_unref(a);
    cv_job_unref(b);
    ck_assert_int_eq(cv_registry_delete(f.reg, CV_REG_DATASET, "d", &e), 0);
    /* metrics text */
    char *t = cv_metrics_render(f.reg, f.jobs, NULL, 1.0);
    ck_assert_ptr_nonnull(t);
    ck_assert_ptr_nonnull(strstr(t, "curvd_jobs{status=\"cancelled\"} 2\n"));
    ck_assert_ptr_nonnull(strstr(t, "curvd_job_duration_seconds_count 1\n"));
    ck_assert_ptr_nonnull(strstr(t, "curvd_queue_depth 0\n"));
    ck_assert_ptr_nonnull(strstr(t, "curvd_datasets 0\n"));
    free(t);
    /* draining refuses new jobs */
    cv_jobs_drain(f.jobs);
    ck_assert_int_eq(submit(&f, LONG_JOB, &c, &e), -1);
    ck_assert_int_eq(e.status, CV_ESHUTDOWN);
    jfx_free(&f);
}
END_TEST

/* A job over micro-batches (issue 20): progress names the micro-batches of
 * the running product, DELETE stops it within one, and a job whose minimum
 * does not fit the budget is refused at submission (400 job_memory). */
START_TEST(jobs_micro_batches_progress_cancel_budget)
{
    jfx f;
    jfx_make(&f, 1, 4, 0);
    cv_job *a;
    cv_err e;
    ck_assert_int_eq(submit(&f,
                            "{\"op\":\"trace\",\"model\":\"m\",\"dataset\":\"d\","
                            "\"micro_batch\":1,\"options\":{\"max_probes\":1000000,\"tol\":0}}",
                            &a, &e),
                     0);
    wait_running(&f, a);
    int seen = 0;
    for (int i = 0; i < 1000 && !seen; i++) {
        cJSON *s = status_of(&f, a);
        cJSON *p = cJSON_GetObjectItem(s, "progress");
        cJSON *done = cJSON_GetObjectItem(p, "micro_batches_done"),
              *total = cJSON_GetObjectItem(p, "micro_batches");
        if (done && total) {
            ck_assert_int_eq(total->valueint, 300);
            ck_assert(done->valueint >= 0 && done->valueint <= 300);
            seen = 1;
        }
        cJSON_Delete(s);
    }
    ck_assert_msg(seen, "progress never named the micro-batches");
    cv_jobs_cancel(f.jobs, a, 10);
    expect_status(&f, a, "cancelled", NULL);
    cv_job_unref(a);
    jfx_free(&f);

    jfx_make(&f, 1, 4, 0);
    cv_jobs_free(f.jobs);
    cv_jobs_config c = {.workers = 1, .max_queue = 4, .keep_s = 600, .max_kept = 1000};
    cv_job_limits_default(&c.limits);
    c.limits.job_memory = 1000; /* below one sample's state */
    f.jobs = cv_jobs_new(&c, f.reg, &e);
    ck_assert_ptr_nonnull(f.jobs);
    ck_assert_int_eq(submit(&f, "{\"op\":\"trace\",\"model\":\"m\",\"dataset\":\"d\"}", &a,
                            &e),
                     -1);
    ck_assert_int_eq(e.status, CV_EINVAL);
    ck_assert_str_eq(e.code, "job_memory");
    ck_assert_msg(strstr(e.message, "needs at least") != NULL, "%s", e.message);
    jfx_free(&f);
}
END_TEST

START_TEST(jobs_time_limit_and_shutdown_cancel)
{
    jfx f;
    jfx_make(&f, 1, 4, 0.3);
    cv_job *a, *b, *c;
    cv_err e;
    ck_assert_int_eq(submit(&f, LONG_JOB, &a, &e), 0);
    ck_assert_int_eq(cv_jobs_wait(f.jobs, a, 30), 1);
    expect_status(&f, a, "failed", "job_timeout");
    cv_job_unref(a);
    /* drain cancels the queued job; cancel_running stops the running one */
    cv_jobs_free(f.jobs);
    f.jobs = jfx_jobs(&f, 1, 4, 0, 600, 100);
    ck_assert_int_eq(submit(&f, LONG_JOB, &b, &e), 0);
    wait_running(&f, b);
    ck_assert_int_eq(submit(&f, LONG_JOB, &c, &e), 0);
    cv_jobs_drain(f.jobs);
    expect_status(&f, c, "cancelled", "shutting_down");
    ck_assert_int_eq(cv_jobs_wait_idle(f.jobs, 0.05), 1);
    cv_jobs_cancel_running(f.jobs);
    ck_assert_int_eq(cv_jobs_wait_idle(f.jobs, 30), 0);
    expect_status(&f, b, "cancelled", "shutting_down");
    cv_job_unref(b);
    cv_job_unref(c);
    jfx_free(&f);
}
END_TEST

/* The cgroup limit: v2 "max" is no limit (v1 is read then), a number is,
 * v1's "unlimited" huge value is none; the default never exceeds 75% of it. */
START_TEST(memory_cgroup_limit)
{
    char v2[] = "/tmp/cv_cg2_XXXXXX", v1[] = "/tmp/cv_cg1_XXXXXX";
    int f2 = mkstemp(v2), f1 = mkstemp(v1);
    ck_assert(f2 >= 0 && f1 >= 0);
    ck_assert_int_eq(write(f2, "max\n", 4), 4);
    ck_assert_int_eq(write(f1, "9223372036854771712\n", 20), 20);
    ck_assert_uint_eq(cv_memory_cgroup_limit(v2, v1), 0);
    ck_assert_int_eq(ftruncate(f1, 0), 0);
    ck_assert_int_eq(pwrite(f1, "536870912\n", 10, 0), 10);
    ck_assert_uint_eq(cv_memory_cgroup_limit(v2, v1), 536870912);
    ck_assert_int_eq(ftruncate(f2, 0), 0);
    ck_assert_int_eq(pwrite(f2, "1073741824\n", 11, 0), 11);
    ck_assert_uint_eq(cv_memory_cgroup_limit(v2, v1), 1073741824);
    ck_assert_uint_eq(cv_memory_cgroup_limit("/nonexistent/x", NULL), 0);
    close(f2);
    close(f1);
    unlink(v2);
    unlink(v1);
    size_t lim = cv_memory_default_limit(),
           cg = cv_memory_cgroup_limit("/sys/fs/cgroup/memory.max",
                                       "/sys/fs/cgroup/memory/memory.limit_in_bytes");
    ck_assert(lim > 0);
    if (cg)
        ck_assert(lim <= cg / 4 * 3 + 1);
}
END_TEST

/* --max-memory (server/memory.h): what the account counts, 413 memory_limit
 * for a job that can never fit, 429 memory_busy when its document cannot be
 * held now, a job that fits only alone waits in the queue (a worker free)
 * until the running one ends, uploads checked against the same account,
 * 413 result_too_large above --max-kept-bytes, and nothing left counted
 * once every job has ended. */
START_TEST(memory_account_admission)
{
    jfx f;
    cv_err e;
    f.reg = cv_registry_new((size_t)1 << 30);
    cv_model *m = heap_model(1);
    ck_assert_int_eq(cv_registry_add_dataset(f.reg, "d", heap_data(m, 300), "t", NULL, &e), 0);
    ck_assert_int_eq(cv_registry_add_model(f.reg, "m", m, "t", NULL, &e), 0);
    cv_memory mem;
    cv_memory_init(&mem, 0);
    cv_registry_set_memory(f.reg, &mem);
    cv_jobs_config c = {.workers = 2, .max_queue = 8, .keep_s = 600, .max_kept = 100,
                        .max_kept_bytes = 4096, .memory = &mem};
    cv_job_limits_default(&c.limits);
    ck_assert_ptr_nonnull(f.jobs = cv_jobs_new(&c, f.reg, &e));
    cv_jobs_stats st;
    cv_registry_stats rs;
    cv_registry_stats_get(f.reg, &rs);
    cv_jobs_stats_get(f.jobs, &st);
    size_t reg = st.memory_used[CV_MEM_REGISTRY];
    ck_assert_uint_eq(reg, rs.bytes);
    ck_assert_uint_eq(st.memory_limit, 0);
    mem.limit = (size_t)1 << 40;

    /* a running job: its document and its estimate are counted */
    cv_job *a, *b, *x;
    ck_assert_int_eq(submit(&f, LONG_JOB, &a, &e), 0);
    wait_running(&f, a);
    cv_jobs_stats_get(f.jobs, &st);
    size_t doc = st.memory_used[CV_MEM_DOCUMENTS], run = st.memory_used[CV_MEM_RUNNING];
    ck_assert_uint_gt(doc, sizeof(cv_job_spec));
    ck_assert_uint_gt(run, 0);
    ck_assert_uint_eq(st.memory_limit, (size_t)1 << 40);

    /* can never fit beside the registry: 413 with the numbers */
    mem.limit = reg + doc / 2;
    ck_assert_int_eq(submit(&f, LONG_JOB, &x, &e), -1);
    ck_assert_int_eq(e.status, CV_ETOOLARGE);
    ck_assert_str_eq(e.code, "memory_limit");
    char lim[32];
    snprintf(lim, sizeof lim, "%zu", mem.limit);
    ck_assert_msg(strstr(e.message, lim) != NULL, "%s", e.message);
    /* fits alone, but not even its document beside the running job: 429 */
    mem.limit = reg + doc + run + doc / 2;
    ck_assert_int_eq(submit(&f, LONG_JOB, &x, &e), -1);
    ck_assert_int_eq(e.status, CV_EBUSY);
    ck_assert_str_eq(e.code, "memory_busy");
    /* room for its document, not for running beside a: it waits, a worker free */
    mem.limit = reg + 2 * doc + run + run / 2;
    ck_assert_int_eq(submit(&f, LONG_JOB, &b, &e), 0);
    /* the free worker's look at b (memory_waits_total counts it; polled, not a
     * fixed sleep, which a slow sanitizer run could outlast): b stays queued */
    for (int i = 0; i < 1000; i++) {
        cv_jobs_stats_get(f.jobs, &st);
        if (st.memory_waits_total >= 1)
            break;
        struct timespec ts = {0, 10000000};
        nanosleep(&ts, NULL);
    }
    expect_status(&f, b, "queued", NULL);
    cv_jobs_stats_get(f.jobs, &st);
    ck_assert_int_eq(st.busy_workers, 1);
    ck_assert_int_eq(st.memory_waits_total, 1);
    ck_assert_uint_eq(st.memory_used[CV_MEM_DOCUMENTS], 2 * doc);
    ck_assert_uint_eq(st.memory_used[CV_MEM_RUNNING], run);

    /* uploads count against the same account */
    ck_assert_int_eq(cv_registry_reserve(f.reg, mem.limit, "big", &e), -1);
    ck_assert_int_eq(e.status, CV_ETOOLARGE);
    ck_assert_str_eq(e.code, "memory_limit");
    ck_assert_int_eq(cv_registry_reserve(f.reg, run, "mid", &e), -1);
    ck_assert_int_eq(e.status, CV_EBUSY);
    ck_assert_str_eq(e.code, "memory_busy");
    ck_assert_int_eq(cv_registry_reserve(f.reg, run / 4, "small", &e), 0);
    cv_registry_unreserve(f.reg, run / 4);

    /* a ends: b starts */
    cv_jobs_cancel(f.jobs, a, 5);
    wait_running(&f, b);
    cv_jobs_cancel(f.jobs, b, 5);
    ck_assert_int_eq(cv_jobs_wait(f.jobs, b, 10), 1);
    cv_job_unref(a);
    cv_job_unref(b);

    /* a result above --max-kept-bytes is refused at submit; a small one runs */
    mem.limit = (size_t)1 << 40;
    ck_assert_int_eq(submit(&f, "{\"op\":\"per_sample_gradients\",\"model\":\"m\","
                                "\"dataset\":\"d\"}", &x, &e), -1);
    ck_assert_int_eq(e.status, CV_ETOOLARGE);
    ck_assert_str_eq(e.code, "result_too_large");
    ck_assert_int_eq(submit(&f, "{\"op\":\"per_sample_gradients\",\"model\":\"m\","
                                "\"dataset\":\"d\",\"batch\":{\"size\":1}}", &x, &e), 0);
    ck_assert_int_eq(cv_jobs_wait(f.jobs, x, 30), 1);
    expect_status(&f, x, "succeeded", NULL);
    cv_job_unref(x);

    /* nothing queued or running: only the kept results are left */
    cv_jobs_stats_get(f.jobs, &st);
    ck_assert_uint_eq(st.memory_used[CV_MEM_DOCUMENTS], 0);
    ck_assert_uint_eq(st.memory_used[CV_MEM_RUNNING], 0);
    ck_assert_uint_eq(st.memory_used[CV_MEM_KEPT], st.kept_bytes);
    ck_assert_uint_gt(st.kept_bytes, 0);
    jfx_free(&f);
}
END_TEST

START_TEST(finished_jobs_are_purged)
{
    jfx f;
    jfx_make_keep(&f, 1, 4, 0, 0.2);
    cv_job *j;
    cv_err e;
    ck_assert_int_eq(submit(&f, "{\"op\":\"loss\",\"model\":\"m\",\"dataset\":\"d\"}", &j, &e), 0);
    ck_assert_int_eq(cv_jobs_wait(f.jobs, j, 30), 1);
    char id[64];
    snprintf(id, sizeof id, "%s", cv_job_id(j));
    cv_job_unref(j);
    cv_job *g = NULL;
    for (int i = 0; i < 60; i++) { /* the janitor runs once a second */
        g = cv_jobs_get(f.jobs, id, &e);
        if (!g)
            break;
        cv_job_unref(g);
        struct timespec ts = {0, 100000000};
        nanosleep(&ts, NULL);
    }
    ck_assert_ptr_null(g);
    ck_assert_int_eq(e.status, CV_ENOTFOUND);
    jfx_free(&f);
}
END_TEST

/* ---- demo -------------------------------------------------------------------- */

START_TEST(demo_registers_trained_models)
{
    cv_dataset d;
    int real;
    cv_err e;
    ck_assert_int_eq(cv_demo_digits(&d, &real, &e), 0);
    ck_assert_uint_eq(d.n, 1797);
    ck_assert_int_eq(d.x_shape.dim[0], 64);
    int seen[10] = {0};
    for (size_t i = 0; i < d.n; i++) {
        ck_assert(d.labels[i] >= 0 && d.labels[i] <= 9);
        seen[d.labels[i]] = 1;
    }
    for (int k = 0; k < 10; k++)
        ck_assert(seen[k]);
    for (size_t i = 0; i < d.n * 64; i++)
        ck_assert(d.x[i] >= 0 && d.x[i] <= 1);
    cv_dataset_free(&d);

    cv_registry *r = cv_registry_new((size_t)1 << 30);
    ck_assert_msg(cv_demo_register(r, NULL, &e) == 0, "%s", e.message);
    cv_snap *m = cv_registry_get(r, CV_REG_MODEL, "demo-mlp", &e);
    cv_snap *ds = cv_registry_get(r, CV_REG_DATASET, "digits", &e);
    ck_assert_ptr_nonnull(m);
    ck_assert_ptr_nonnull(ds);
    ck_assert_uint_eq(m->model->nparams_total, 64 * 32 + 32 + 32 * 10 + 10);
    cv_curv *c = cv_curv_new(m->model, ds->data, NULL, &e);
    ck_assert_ptr_nonnull(c);
    ck_assert_msg(cv_curv_loss(c) < 0.5, "demo-mlp loss %g: not trained", cv_curv_loss(c));
    cv_curv_free(c);
    cv_snap_unref(m);
    cv_snap_unref(ds);
    ck_assert_ptr_nonnull(m = cv_registry_get(r, CV_REG_MODEL, "demo-regression", &e));
    ck_assert_ptr_nonnull(ds = cv_registry_get(r, CV_REG_DATASET, "regression", &e));
    ck_assert_int_eq(cv_dataset_check(ds->data, m->model, &e), 0);
    cv_snap_unref(m);
    cv_snap_unref(ds);
    cv_registry_free(r);
}
END_TEST

/* ---- routes <-> api/openapi.yaml ---------------------------------------------- */

START_TEST(routes_match_openapi)
{
    FILE *f = fopen("api/openapi.yaml", "r");
    ck_assert_msg(f != NULL, "api/openapi.yaml not found (run from the repository root)");
    char spec[128][96];
    int ns = 0;
    char line[512], path[256] = "";
    regex_t rp, rm;
    ck_assert_int_eq(regcomp(&rp, "^  (/[^ :]*):[ ]*$", REG_EXTENDED), 0);
    ck_assert_int_eq(regcomp(&rm, "^    (get|put|post|delete|patch):[ ]*$", REG_EXTENDED), 0);
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        regmatch_t g[2];
        if (regexec(&rp, line, 2, g, 0) == 0) {
            snprintf(path, sizeof path, "%.*s", (int)(g[1].rm_eo - g[1].rm_so), line + g[1].rm_so);
            continue;
        }
        if (line[0] && line[0] != ' ')
            path[0] = 0;
        if (path[0] && regexec(&rm, line, 2, g, 0) == 0 && ns < 128) {
            char m[16];
            int k = 0;
            for (int i = g[1].rm_so; i < g[1].rm_eo && k < 15; i++)
                m[k++] = (char)(line[i] - 'a' + 'A');
            m[k] = 0;
            int w = snprintf(spec[ns++], sizeof spec[0], "%s %s", m, path);
            ck_assert_msg(w < (int)sizeof spec[0], "openapi path too long: %s", path);
        }
    }
    fclose(f);
    regfree(&rp);
    regfree(&rm);
    int n = cv_http_route_count();
    ck_assert_int_eq(ns, n);
    for (int i = 0; i < n; i++) {
        char want[96];
        snprintf(want, sizeof want, "%s %s", cv_http_route(i)->method, cv_http_route(i)->path);
        int found = 0;
        for (int k = 0; k < ns; k++)
            found |= strcmp(spec[k], want) == 0;
        ck_assert_msg(found, "route %s is not in api/openapi.yaml", want);
    }
}
END_TEST

/* ---- HTTP replies over a socket ------------------------------------------------ */

typedef struct {
    int status;
    char ctype[96];
    long content_length;   /* -1: no header */
    char *body;            /* malloc()ed, NUL-terminated */
    size_t body_len;
    int retry_after;       /* -1: no header */
} http_reply;

/* One HTTP/1.0 request to 127.0.0.1:port; the whole reply in *out. */
static void http_call(int port, const char *method, const char *path, const char *body,
                      http_reply *out)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(fd, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(connect(fd, (struct sockaddr *)&a, sizeof a), 0);
    char head[512];
    size_t blen = body ? strlen(body) : 0;
    int n = snprintf(head, sizeof head,
                     "%s %s HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\n\r\n",
                     method, path, blen);
    ck_assert_int_eq(write(fd, head, (size_t)n), n);
    if (blen)
        ck_assert_int_eq(write(fd, body, blen), (ssize_t)blen);
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap + 1);
    ssize_t r;
    while ((r = read(fd, buf + len, cap - len)) > 0) {
        len += (size_t)r;
        if (len == cap)
            ck_assert_ptr_nonnull(buf = realloc(buf, (cap *= 2) + 1));
    }
    close(fd);
    buf[len] = 0;
    char *sep = strstr(buf, "\r\n\r\n");
    ck_assert_msg(sep != NULL, "no header end in %.200s", buf);
    *sep = 0;
    memset(out, 0, sizeof *out);
    ck_assert_int_eq(sscanf(buf, "HTTP/1.%*d %d", &out->status), 1);
    out->content_length = -1;
    out->retry_after = -1;
    for (char *line = strstr(buf, "\r\n"); line; line = strstr(line + 2, "\r\n")) {
        if (strncasecmp(line + 2, "Retry-After: ", 13) == 0)
            out->retry_after = atoi(line + 15);
        if (strncasecmp(line + 2, "Content-Type: ", 14) == 0)
            sscanf(line + 16, "%95[^\r]", out->ctype);
        if (strncasecmp(line + 2, "Content-Length: ", 16) == 0)
            out->content_length = atol(line + 18);
    }
    out->body_len = len - (size_t)(sep + 4 - buf);
    out->body = malloc(out->body_len + 1);
    memcpy(out->body, sep + 4, out->body_len + 1);
    free(buf);
}

/* The reply is JSON with the given status, ends with exactly one newline,
 * and Content-Length counts that newline; returns the parsed document. */
static cJSON *json_reply(int port, const char *method, const char *path, const char *body,
                         int status)
{
    http_reply r;
    http_call(port, method, path, body, &r);
    ck_assert_msg(r.status == status, "%s %s: status %d, want %d: %s", method, path, r.status,
                  status, r.body);
    ck_assert_str_eq(r.ctype, "application/json");
    ck_assert_int_eq(r.content_length, (long)r.body_len);
    ck_assert_msg(r.body_len >= 2 && r.body[r.body_len - 1] == '\n' &&
                      r.body[r.body_len - 2] == '}',
                  "%s %s: body does not end with \"}\\n\": %s", method, path, r.body);
    cJSON *j = cJSON_Parse(r.body);
    ck_assert_msg(j != NULL, "%s %s: not JSON: %s", method, path, r.body);
    free(r.body);
    return j;
}

START_TEST(json_bodies_end_with_newline)
{
    jfx f;
    jfx_make(&f, 1, 8, 0);
    cv_http_config c;
    memset(&c, 0, sizeof c);
    c.max_body = 1 << 20;
    c.max_wait = 30;
    cv_err e;
    cv_http *h = cv_http_start(&c, f.reg, f.jobs, &e);
    ck_assert_msg(h != NULL, "%s", e.message);
    int port = cv_http_port(h);
    cJSON_Delete(json_reply(port, "GET", "/v1/health", NULL, 200));
    cJSON_Delete(json_reply(port, "GET", "/v1/ops", NULL, 200));
    cJSON_Delete(json_reply(port, "GET", "/v1/models", NULL, 200));
    cJSON_Delete(json_reply(port, "GET", "/v1/datasets/d", NULL, 200));
    cJSON_Delete(json_reply(port, "GET", "/v1/nope", NULL, 404));
    cJSON_Delete(json_reply(port, "PATCH", "/v1/models", NULL, 405));
    cJSON_Delete(json_reply(port, "POST", "/v1/models", "{", 400));
    /* a finished job's status is assembled from stored result text */
    cJSON *j = json_reply(port, "POST", "/v1/jobs?wait=30",
                          "{\"op\":\"loss\",\"model\":\"m\",\"dataset\":\"d\"}", 200);
    ck_assert_str_eq(sfield(j, "status", NULL), "succeeded");
    char path[96];
    snprintf(path, sizeof path, "/v1/jobs/%s", sfield(j, "id", NULL));
    cJSON_Delete(j);
    cJSON_Delete(json_reply(port, "GET", path, NULL, 200));
    cJSON_Delete(json_reply(port, "GET", "/v1/jobs", NULL, 200));
    /* other bodies are passed through as they are */
    http_reply r;
    http_call(port, "GET", "/v1/models/m/parameters", NULL, &r);
    ck_assert_int_eq(r.status, 200);
    ck_assert_str_eq(r.ctype, "application/octet-stream");
    ck_assert_int_eq(r.content_length, (long)r.body_len);
    cv_snap *s = cv_registry_get(f.reg, CV_REG_MODEL, "m", &e);
    void *want;
    size_t wlen;
    ck_assert_int_eq(cv_params_export(s->model, &want, &wlen, &e), 0);
    ck_assert_uint_eq(r.body_len, wlen);
    ck_assert(memcmp(r.body, want, wlen) == 0);
    free(want);
    free(r.body);
    cv_snap_unref(s);
    cv_http_stop(h);
    jfx_free(&f);
}
END_TEST

/* The error document of a reply: its status, code and field. */
static void expect_http_err(int port, const char *method, const char *path, const char *body,
                            int status, const char *code, const char *field, int retry_after)
{
    http_reply r;
    http_call(port, method, path, body, &r);
    ck_assert_msg(r.status == status, "%s %s: status %d, want %d: %s", method, path, r.status,
                  status, r.body);
    cJSON *j = cJSON_Parse(r.body);
    ck_assert_msg(j != NULL, "%s %s: not JSON: %s", method, path, r.body);
    ck_assert_str_eq(sfield(j, "error", "code"), code);
    ck_assert_str_eq(sfield(j, "error", "field"), field);
    ck_assert_int_eq(r.retry_after, retry_after);
    cJSON_Delete(j);
    free(r.body);
}

START_TEST(strict_requests_and_retry_after)
{
    jfx f;
    jfx_make(&f, 1, 1, 0);
    cv_http_config c;
    memset(&c, 0, sizeof c);
    c.max_body = 1 << 20;
    cv_err e;
    cv_http *h = cv_http_start(&c, f.reg, f.jobs, &e);
    ck_assert_msg(h != NULL, "%s", e.message);
    int port = cv_http_port(h);
    /* duplicate keys, trailing data, NULs: 400 before anything is queued */
    expect_http_err(port, "POST", "/v1/jobs",
                    "{\"op\":\"loss\",\"model\":\"m\",\"dataset\":\"d\",\"model\":\"x\"}", 400,
                    "duplicate_field", "model", -1);
    expect_http_err(port, "POST", "/v1/jobs", "{\"op\":\"loss\",\"model\":\"m\"} []", 400,
                    "invalid_json", "", -1);
    expect_http_err(port, "POST", "/v1/jobs",
                    "{\"op\":\"loss\",\"model\":\"m\\u0000x\",\"dataset\":\"d\"}", 400,
                    "nul_in_string", "model", -1);
    cJSON *l = json_reply(port, "GET", "/v1/jobs", NULL, 200);
    ck_assert_int_eq((int)cJSON_GetObjectItem(l, "count")->valuedouble, 0);
    cJSON_Delete(l);
    /* %00 in a path segment: refused, the model stays */
    expect_http_err(port, "DELETE", "/v1/models/m%00zzz", NULL, 400, "nul_in_url", "", -1);
    expect_http_err(port, "GET", "/v1/jobs?status=queued%00", NULL, 400, "nul_in_url", "", -1);
    cJSON_Delete(json_reply(port, "GET", "/v1/models/m", NULL, 200));
    /* a full queue: 429 with Retry-After */
    cv_job *a, *b;
    ck_assert_int_eq(submit(&f, LONG_JOB, &a, &e), 0);
    wait_running(&f, a);
    ck_assert_int_eq(submit(&f, LONG_JOB, &b, &e), 0);
    expect_http_err(port, "POST", "/v1/jobs", LONG_JOB, 429, "queue_full", "", 1);
    /* draining: 503 with Retry-After */
    cv_jobs_drain(f.jobs);
    expect_http_err(port, "POST", "/v1/jobs", LONG_JOB, 503, "shutting_down", "", 5);
    cv_jobs_cancel(f.jobs, b, 0);
    cv_jobs_cancel(f.jobs, a, 10);
    cv_job_unref(a);
    cv_job_unref(b);
    cv_http_stop(h);
    jfx_free(&f);
}
END_TEST

/* cv_http_handle: a request given as data goes through the routes and
 * handlers as over a socket (query parameters, headers, HEAD as GET), and a
 * queue without workers keeps its jobs queued (the fuzz harness's service). */
static unsigned handle(cv_http *h, const char *method, const char *path, const cv_http_kv *q,
                       int nq, const cv_http_kv *hd, int nh, const char *body, cJSON **j)
{
    cv_http_request in = {method, path, q, nq, hd, nh, body, body ? strlen(body) : 0};
    char *out;
    size_t len;
    const char *ctype;
    unsigned st = cv_http_handle(h, &in, &out, &len, &ctype);
    ck_assert_ptr_nonnull(out);
    ck_assert_str_eq(ctype, "application/json");
    ck_assert_msg(len > 0 && out[len - 1] == '\n', "%s %s: no newline", method, path);
    *j = cJSON_ParseWithLength(out, len);
    ck_assert_ptr_nonnull(*j);
    free(out);
    return st;
}

/* The fixture's registry behind a job table without workers (jobs stay
 * queued) and an HTTP server without a socket (cv_http_handle); bodies up to
 * 1 MiB, POST /v1/jobs up to max_job_body (0: its default). */
static cv_http *socketless_http(jfx *f, size_t max_queue, size_t max_job_body)
{
    jfx_make(f, 1, max_queue, 0);
    cv_jobs_free(f->jobs);
    cv_jobs_config jc = {.max_queue = max_queue, .keep_s = 600, .max_kept = 100,
                         .no_workers = 1};
    cv_job_limits_default(&jc.limits);
    cv_err e;
    f->jobs = cv_jobs_new(&jc, f->reg, &e);
    ck_assert_ptr_nonnull(f->jobs);
    cv_http_config c;
    memset(&c, 0, sizeof c);
    c.max_body = 1 << 20;
    c.max_job_body = max_job_body;
    cv_http *h = cv_http_new_unbound(&c, f->reg, f->jobs, &e);
    ck_assert_msg(h != NULL, "%s", e.message);
    return h;
}

START_TEST(requests_without_a_socket)
{
    jfx f;
    cv_http *h = socketless_http(&f, 8, 0);
    cJSON *j;
    ck_assert_uint_eq(handle(h, "HEAD", "/v1/models/m", NULL, 0, NULL, 0, NULL, &j), 200);
    ck_assert_str_eq(sfield(j, "name", NULL), "m");
    cJSON_Delete(j);
    /* the query: an unknown key is refused with its name, a known one is read */
    cv_http_kv wiat[] = {{"wiat", "5"}}, bad_wait[] = {{"wait", "soon"}};
    ck_assert_uint_eq(handle(h, "GET", "/v1/jobs", wiat, 1, NULL, 0, NULL, &j), 400);
    ck_assert_str_eq(sfield(j, "error", "field"), "wiat");
    cJSON_Delete(j);
    ck_assert_uint_eq(handle(h, "POST", "/v1/jobs", bad_wait, 1, NULL, 0, "{}", &j), 400);
    ck_assert_str_eq(sfield(j, "error", "field"), "wait");
    cJSON_Delete(j);
    /* a header (matched case-insensitively): a part must not be JSON */
    cv_http_kv ct[] = {{"content-type", "application/json"}};
    ck_assert_uint_eq(handle(h, "POST", "/v1/datasets/x/parts", NULL, 0, ct, 1, "{}", &j), 400);
    ck_assert_str_eq(sfield(j, "error", "code"), "bad_content_type");
    cJSON_Delete(j);
    /* a job stays queued, and is cancelled at once */
    cv_http_kv wait[] = {{"wait", "0"}};
    ck_assert_uint_eq(handle(h, "POST", "/v1/jobs", wait, 1, NULL, 0,
                             "{\"op\":\"loss\",\"model\":\"m\",\"dataset\":\"d\"}", &j),
                      202);
    ck_assert_str_eq(sfield(j, "status", NULL), "queued");
    char path[96];
    snprintf(path, sizeof path, "/v1/jobs/%s", sfield(j, "id", NULL));
    cJSON_Delete(j);
    ck_assert_uint_eq(handle(h, "DELETE", path, NULL, 0, NULL, 0, NULL, &j), 200);
    ck_assert_str_eq(sfield(j, "status", NULL), "cancelled");
    cJSON_Delete(j);
    ck_assert_uint_eq(handle(h, "PATCH", "/v1/models", NULL, 0, NULL, 0, NULL, &j), 405);
    cJSON_Delete(j);
    cv_http_stop(h);
    jfx_free(&f);
}
END_TEST

/* A job body of at least 4 KiB whose batch.indices start with `first`
 * ("100": the compact reader takes the list; "1e2", the same value and
 * length: it leaves the body to the tree parser), then `more`, then `rest`
 * (what follows the index list's ']'). */
static char *indices_body(const char *first, const char *more, const char *rest)
{
    size_t cap = 8192 + strlen(more) + strlen(rest);
    char *b = malloc(cap);
    ck_assert_ptr_nonnull(b);
    int n = snprintf(b, cap, "{\"op\":\"loss\",\"model\":\"m\",\"dataset\":\"d\",\"batch\":"
                             "{\"indices\":[%s", first);
    for (int i = 0; i < 2100; i++)
        n += snprintf(b + n, cap - (size_t)n, ",%d", i % 7);
    snprintf(b + n, cap - (size_t)n, "%s]%s", more, rest);
    return b;
}

/* POST /v1/jobs answers a large body whose indices the compact reader takes
 * exactly as the tree parser answers the same document (status, code,
 * field and message: byte offsets in syntax errors included). */
static void same_answer(cv_http *h, const char *more, const char *rest)
{
    char *fast = indices_body("100", more, rest), *slow = indices_body("1e2", more, rest);
    ck_assert_uint_eq(strlen(fast), strlen(slow));
    ck_assert_uint_ge(strlen(fast), 4096);
    char *r = NULL;
    size_t rl, n;
    int32_t *idx = NULL;
    ck_assert_int_eq(cv_job_text_indices(fast, strlen(fast), &r, &rl, &idx, &n), 1);
    free(r);
    free(idx);
    ck_assert_int_eq(cv_job_text_indices(slow, strlen(slow), &r, &rl, &idx, &n), 0);
    cv_http_kv wait[] = {{"wait", "0"}};
    cJSON *a, *b;
    unsigned sa = handle(h, "POST", "/v1/jobs", wait, 1, NULL, 0, fast, &a);
    unsigned sb = handle(h, "POST", "/v1/jobs", wait, 1, NULL, 0, slow, &b);
    ck_assert_msg(sa == sb, "%s: %u vs %u", rest, sa, sb);
    if (sa >= 400) {
        ck_assert_str_eq(sfield(a, "error", "code"), sfield(b, "error", "code"));
        ck_assert_str_eq(sfield(a, "error", "field"), sfield(b, "error", "field"));
        ck_assert_str_eq(sfield(a, "error", "message"), sfield(b, "error", "message"));
    } else {
        ck_assert_str_eq(sfield(a, "status", NULL), sfield(b, "status", NULL));
    }
    cJSON_Delete(a);
    cJSON_Delete(b);
    free(fast);
    free(slow);
}

START_TEST(job_indices_same_answers)
{
    jfx f;
    cv_http *h = socketless_http(&f, 64, 1 << 20);
    same_answer(h, "", "}}");                          /* queued */
    same_answer(h, "", "}}  x");                       /* trailing data (byte N) */
    same_answer(h, "", "}} \x01");                     /* control character (byte N) */
    same_answer(h, "", "},\"options\":{} \"x\":1}");   /* not JSON (near byte N) */
    same_answer(h, "", "},\"options\":{\"k\":01}}");   /* malformed number (byte N) */
    same_answer(h, "", "},\"op\":\"a\tb\"}");          /* raw tab in a string (byte N) */
    same_answer(h, "", "},\"batch\":\"all\"}");        /* duplicate key */
    same_answer(h, "", ",\"indices\":[1]}}");          /* duplicate key in batch */
    same_answer(h, "", ",\"size\":3}}");               /* indices and size */
    same_answer(h, "", ",\"sizes\":3}}");              /* unknown batch field */
    same_answer(h, ",300", "}}");                      /* beyond the dataset */
    same_answer(h, ",2147483647", "}}");               /* far beyond it */
    same_answer(h, "", "},\"model\":\"m\\u0000\"}");   /* NUL in a string, duplicate */
    same_answer(h, "", "},\"b\\u0061tch\":1}");        /* unicode escape in a key */
    same_answer(h, "", "}");                           /* the document ends early */
    cv_http_stop(h);
    jfx_free(&f);
}
END_TEST

/* The memory fixture: model m, dataset d (300 samples), workers, an
 * account (limit 0 until a test sets it) shared by the registry and jobs. */
static void mfx_make(jfx *f, cv_memory *mem, int workers, size_t max_kept_bytes)
{
    cv_err e;
    f->reg = cv_registry_new((size_t)1 << 30);
    cv_model *m = heap_model(1);
    ck_assert_int_eq(cv_registry_add_dataset(f->reg, "d", heap_data(m, 300), "t", NULL, &e), 0);
    ck_assert_int_eq(cv_registry_add_model(f->reg, "m", m, "t", NULL, &e), 0);
    cv_memory_init(mem, 0);
    cv_registry_set_memory(f->reg, mem);
    cv_jobs_config c = {.workers = workers, .max_queue = 16, .keep_s = 600, .max_kept = 100,
                        .max_kept_bytes = max_kept_bytes, .memory = mem};
    cv_job_limits_default(&c.limits);
    ck_assert_ptr_nonnull(f->jobs = cv_jobs_new(&c, f->reg, &e));
}

/* What job `text` needs (document + engine + result) by the 413 memory_limit
 * answer to it under a limit that holds nothing beside the registry. */
static size_t job_need(jfx *f, cv_memory *mem, const char *text)
{
    cv_jobs_stats st;
    cv_jobs_stats_get(f->jobs, &st);
    size_t old = mem->limit, need = 0;
    mem->limit = st.memory_used[CV_MEM_REGISTRY] + 1;
    cv_job *x;
    cv_err e;
    ck_assert_int_eq(submit(f, text, &x, &e), -1);
    ck_assert_str_eq(e.code, "memory_limit");
    ck_assert_int_eq(sscanf(e.message, "this job needs about %zu bytes", &need), 1);
    mem->limit = old;
    return need;
}

static void expect_account_empty(jfx *f)
{
    cv_jobs_stats st;
    cv_jobs_stats_get(f->jobs, &st);
    ck_assert_uint_eq(st.memory_used[CV_MEM_DOCUMENTS], 0);
    ck_assert_uint_eq(st.memory_used[CV_MEM_RUNNING], 0);
    ck_assert_uint_eq(st.memory_used[CV_MEM_KEPT], st.kept_bytes);
}

#define KEEP_JOB(name)                                                                           \
    "{\"op\":\"laplace\",\"model\":\"m\",\"dataset\":\"d\","                                \
    "\"options\":{\"keep\":\"" name "\",\"structure\":\"full\"}}"

/* A job that was admitted alone (its need fits beside the registry) keeps
 * its posterior when it ends alone: the posterior is made of the engine
 * memory its estimate counted, not a second allocation beside it. */
START_TEST(memory_posterior_kept_by_a_lone_job)
{
    jfx f;
    cv_memory mem;
    mfx_make(&f, &mem, 1, 0);
    cv_err e;
    cv_job *x;
    /* a first posterior, with no limit */
    ck_assert_msg(submit(&f, KEEP_JOB("p"), &x, &e) == 0, "%s", e.message);
    ck_assert_int_eq(cv_jobs_wait(f.jobs, x, 30), 1);
    expect_status(&f, x, "succeeded", NULL);
    cv_job_unref(x);
    cv_jobs_stats st;
    cv_jobs_stats_get(f.jobs, &st);
    size_t reg = st.memory_used[CV_MEM_REGISTRY]; /* models, dataset, posterior p */
    size_t need = job_need(&f, &mem, KEEP_JOB("q"));
    /* room for the job alone: its posterior q, made of memory its
     * estimate counts, is not counted a second time when kept */
    mem.limit = reg + need + 64;
    ck_assert_msg(submit(&f, KEEP_JOB("q"), &x, &e) == 0, "%s", e.message);
    ck_assert_int_eq(cv_jobs_wait(f.jobs, x, 30), 1);
    cJSON *s = status_of(&f, x);
    ck_assert_msg(strcmp(sfield(s, "status", NULL), "succeeded") == 0, "%s: %s",
                  sfield(s, "error", "code"), sfield(s, "error", "message"));
    cJSON_Delete(s);
    cv_job_unref(x);
    expect_account_empty(&f);
    jfx_free(&f);
}
END_TEST

/* --max-kept-bytes holds for every op with a large result: density's grid,
 * kfac's factors, snr's per-sample values and predict's per-point fields
 * are estimated at submit too (413 result_too_large), and what fits runs. */
START_TEST(memory_result_estimates_kfac_snr_predict)
{
    jfx f;
    cv_memory mem;
    mfx_make(&f, &mem, 1, 1024);
    cv_err e;
    cv_job *x;
    static const char *const big[] = {
        /* 4-5-3 MLP: factors 5x5, 5x5, 6x6, 3x3 (95 numbers) and their eigenvalues */
        "{\"op\":\"kfac\",\"model\":\"m\",\"dataset\":\"d\"}",
        /* a grid of 1000 points and the density on it */
        "{\"op\":\"density\",\"model\":\"m\",\"dataset\":\"d\",\"curvature\":\"ggn\","
        "\"options\":{\"grid_points\":1000}}",
        /* the per-sample gamma and lambda: 300 samples x 3 directions each */
        "{\"op\":\"snr\",\"model\":\"m\",\"dataset\":\"d\",\"curvature\":\"ggn\","
        "\"options\":{\"return_raw\":true}}",
        /* 300 points x 3 outputs: mean, variance, probs, and covariance 3x3 */
        "{\"op\":\"predict\",\"model\":\"m\",\"dataset\":\"d\",\"options\":"
        "{\"structure\":\"diag\",\"return_covariance\":true}}",
        "{\"op\":\"predict\",\"model\":\"m\",\"dataset\":\"d\",\"batch\":{\"size\":1},"
        "\"options\":{\"structure\":\"diag\",\"x\":[" /* 100 points of 4 inputs */
        "1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,"
        "1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,"
        "1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,"
        "1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,"
        "1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,"
        "1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,"
        "1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,"
        "1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,"
        "1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,"
        "1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4]}}"};
    for (size_t i = 0; i < sizeof big / sizeof big[0]; i++) {
        int rc = submit(&f, big[i], &x, &e);
        if (rc == 0) { /* show what it would have kept */
            ck_assert_int_eq(cv_jobs_wait(f.jobs, x, 30), 1);
            size_t len;
            char *t = cv_job_status_text(f.jobs, x, &len);
            ck_abort_msg("%s: accepted, status and result %zu bytes: %.300s", big[i], len, t);
        }
        ck_assert_str_eq(e.code, "result_too_large");
    }
    static const char *const small[] = {
        "{\"op\":\"kfac\",\"model\":\"m\",\"dataset\":\"d\",\"options\":"
        "{\"return_factors\":false,\"eigenvalues\":false}}",
        "{\"op\":\"snr\",\"model\":\"m\",\"dataset\":\"d\",\"curvature\":\"ggn\","
        "\"batch\":{\"size\":8}}",
        "{\"op\":\"predict\",\"model\":\"m\",\"dataset\":\"d\",\"batch\":{\"size\":4},"
        "\"options\":{\"structure\":\"diag\"}}"};
    for (size_t i = 0; i < sizeof small / sizeof small[0]; i++) {
        ck_assert_msg(submit(&f, small[i], &x, &e) == 0, "%s: %s", small[i], e.message);
        ck_assert_int_eq(cv_jobs_wait(f.jobs, x, 30), 1);
        expect_status(&f, x, "succeeded", NULL);
        cv_job_unref(x);
    }
    jfx_free(&f);
}
END_TEST

/* A job waiting at the head of the queue for memory that is cancelled (or
 * withdrawn) makes way at once: the job behind it, which fits, starts
 * without waiting for the workers' next periodic look. */
START_TEST(memory_cancel_of_a_waiting_job_wakes_the_queue)
{
    jfx f;
    cv_memory mem;
    mfx_make(&f, &mem, 2, 0);
    cv_err e;
    cv_job *a, *b, *c;
    cv_jobs_stats st;
    cv_jobs_stats_get(f.jobs, &st);
    size_t reg = st.memory_used[CV_MEM_REGISTRY];
    mem.limit = (size_t)1 << 40;
    ck_assert_int_eq(submit(&f, LONG_JOB, &a, &e), 0);
    wait_running(&f, a);
    cv_jobs_stats_get(f.jobs, &st);
    size_t doc = st.memory_used[CV_MEM_DOCUMENTS], run = st.memory_used[CV_MEM_RUNNING];
    mem.limit = reg + 4 * doc + run + run / 2; /* another LONG_JOB waits, a small job fits */
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(submit(&f, LONG_JOB, &b, &e), 0);
        ck_assert_int_eq(submit(&f, "{\"op\":\"loss\",\"model\":\"m\",\"dataset\":\"d\","
                                    "\"batch\":{\"size\":1}}", &c, &e), 0);
        struct timespec ts = {0, 100000000};
        nanosleep(&ts, NULL);
        expect_status(&f, b, "queued", NULL);
        expect_status(&f, c, "queued", NULL); /* behind b */
        cv_jobs_cancel(f.jobs, b, 0);
        ck_assert_msg(cv_jobs_wait(f.jobs, c, 0.25) == 1, "try %d: the job behind a cancelled "
                      "waiting job did not start within 0.25 s", i);
        cv_job_unref(b);
        cv_job_unref(c);
    }
    cv_jobs_cancel(f.jobs, a, 5);
    ck_assert_int_eq(cv_jobs_wait(f.jobs, a, 10), 1);
    cv_job_unref(a);
    expect_account_empty(&f);
    jfx_free(&f);
}
END_TEST

START_TEST(http_status_of_errors)
{
    static const struct {
        cv_status st;
        int http;
    } want[] = {{CV_OK, 200},         {CV_EINVAL, 400},     {CV_ENOTFOUND, 404},
                {CV_ECONFLICT, 409},  {CV_ETOOLARGE, 413},  {CV_EBUSY, 429},
                {CV_ESHUTDOWN, 503},  {CV_ECANCELLED, 409}, {CV_ETIMEOUT, 408},
                {CV_ENOMEM, 507},     {CV_EINTERNAL, 500}};
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        ck_assert_int_eq(cv_http_status(want[i].st), want[i].http);
}
END_TEST

/* ---- command line: flag tables and usage ---------------------------------------- */

static char *usage_text(void)
{
    FILE *f = tmpfile();
    ck_assert_ptr_nonnull(f);
    cv_usage(f);
    long len = ftell(f);
    ck_assert_int_gt(len, 0);
    char *text = malloc((size_t)len + 1);
    rewind(f);
    ck_assert_uint_eq(fread(text, 1, (size_t)len, f), (size_t)len);
    text[len] = 0;
    fclose(f);
    return text;
}

/* The usage lines of flag fl ("\n  --name ARG ..."), up to the next flag's
 * line, without the final newline. */
static void flag_entry(const char *usage, const cv_flag *fl, char *out, size_t len)
{
    char key[96];
    snprintf(key, sizeof key, "\n  %s%s%s ", fl->name, fl->arg ? " " : "",
             fl->arg ? fl->arg : "");
    const char *p = strstr(usage, key);
    ck_assert_msg(p != NULL, "usage has no line for %s", key + 3);
    const char *end = strstr(p + 1, "\n  --");
    size_t n = end ? (size_t)(end - p) : strlen(p) - 1;
    snprintf(out, len, "%.*s", (int)n, p);
}

START_TEST(usage_lists_every_flag)
{
    char *usage = usage_text();
    ck_assert_ptr_null(strstr(usage, "contract"));
    /* every serve flag has its line; a printed default parses back to the
     * default, and every flag is accepted */
    cv_serve_args def;
    memset(&def, 0, sizeof def);
    cv_serve_config_default(&def.cfg);
    int nflags = 0;
    for (const cv_flag *fl = cv_serve_flags; fl->name; fl++, nflags++) {
        char entry[1024];
        flag_entry(usage, fl, entry, sizeof entry);
        ck_assert_msg(strstr(entry, fl->help) || strchr(fl->help, '\n'), "%s: help", fl->name);
        const char *open = strrchr(entry, '[');
        char shown[64] = "";
        if (open && entry[strlen(entry) - 1] == ']')
            snprintf(shown, sizeof shown, "%.*s", (int)(strlen(open) - 2), open + 1);
        char *argv[2] = {(char *)fl->name, shown};
        int argc = 2;
        if (fl->kind == CV_FLAG_SWITCH)
            argc = 1;
        else if (fl->kind == CV_FLAG_CALL)
            argv[1] = strcmp(fl->name, "--model") == 0 ? "m=a.json:p.safetensors" : "d=d.safetensors";
        else if (fl->dflt) /* a default in words: parse the lowest value */
            snprintf(shown, sizeof shown, "%.0f", fl->lo);
        else
            ck_assert_msg(shown[0], "%s: no default in the usage", fl->name);
        cv_serve_args a;
        ck_assert_msg(cv_serve_args_parse(&a, argc, argv) == -1, "%s %s rejected", argv[0],
                      argc > 1 ? argv[1] : "");
        if (fl->kind == CV_FLAG_CALL)
            ck_assert_int_eq(a.cfg.nmodels + a.cfg.ndatasets, 1);
        else if (fl->kind == CV_FLAG_STRING && !fl->dflt) /* (none: --data-dir) */
            ck_assert_str_eq(*(const char **)((char *)&a + fl->off),
                             *(const char **)((char *)&def + fl->off));
        else if (fl->kind != CV_FLAG_SWITCH && !fl->dflt) {
            size_t size = fl->kind == CV_FLAG_SECONDS                            ? sizeof(double)
                          : fl->kind == CV_FLAG_COUNT || fl->kind == CV_FLAG_BYTES ? sizeof(size_t)
                                                                                   : sizeof(int);
            ck_assert_msg(memcmp((char *)&a + fl->off, (char *)&def + fl->off, size) == 0,
                          "%s [%s] does not parse back to the default", fl->name, shown);
        }
        cv_serve_args_free(&a);
    }
    /* and no option line that is not in the table */
    int lines = 0;
    for (const char *p = strstr(usage, "\nserve options"); (p = strstr(p + 1, "\n  --"));)
        lines++;
    ck_assert_int_eq(lines, nflags);
    /* every run flag is in the synopsis, optional ones in brackets */
    for (const cv_flag *fl = cv_run_flags; fl->name; fl++) {
        char key[96];
        snprintf(key, sizeof key, fl->required ? " %s %s " : " [%s %s]", fl->name, fl->arg);
        if (fl->required && !fl[1].required)
            key[strlen(key) - 1] = '\n';
        ck_assert_msg(strstr(usage, key) != NULL, "usage has no '%s'", key);
    }
    free(usage);
}
END_TEST

START_TEST(command_line_errors)
{
    cv_serve_args a;
    char *bad_port[] = {"--port", "65536"};
    ck_assert_int_eq(cv_serve_args_parse(&a, 2, bad_port), 2);
    cv_serve_args_free(&a);
    char *no_value[] = {"--no-demo", "--workers"};
    ck_assert_int_eq(cv_serve_args_parse(&a, 2, no_value), 2);
    ck_assert_int_eq(a.cfg.demo, 0);
    cv_serve_args_free(&a);
    char *ok[] = {"--max-body", "1K", "--log-requests", "--shutdown-grace", "2.5",
                  "--model", "x=a:b:c", "--dataset", "y=z"};
    ck_assert_int_eq(cv_serve_args_parse(&a, 9, ok), -1);
    ck_assert_uint_eq(a.cfg.http.max_body, 1024);
    ck_assert_int_eq(a.cfg.http.log_requests, 1);
    ck_assert(a.cfg.grace_s == 2.5);
    ck_assert_str_eq(a.models[0].name, "x");
    ck_assert_str_eq(a.models[0].arch_path, "a:b");
    ck_assert_str_eq(a.models[0].params_path, "c");
    ck_assert_str_eq(a.datasets[0].path, "z");
    cv_serve_args_free(&a);

    cv_run_args r;
    cv_err e;
    char *run_ok[] = {"--job", "j", "--arch", "a", "--data", "d", "--params", "p",
                      "--dense-max", "7"};
    ck_assert_int_eq(cv_run_args_parse(&r, 10, run_ok, &e), 0);
    ck_assert_str_eq(r.job, "j");
    ck_assert_uint_eq(r.dense_max, 7);
    ck_assert_int_eq(r.blas_threads, 0);
    ck_assert_int_eq(cv_run_args_parse(&r, 2, run_ok + 2, &e), -1);
    ck_assert_str_eq(e.code, "usage");
    ck_assert_str_eq(e.message, "curvd run needs --arch, --params, --data and --job");
    char *run_bad[] = {"--blas-threads", "0"};
    ck_assert_int_eq(cv_run_args_parse(&r, 2, run_bad, &e), -1);
    ck_assert_str_eq(e.field, "--blas-threads");
    ck_assert_str_eq(e.message, "curvd run: --blas-threads needs a positive integer");
    char *run_typo[] = {"--arhc", "a"};
    ck_assert_int_eq(cv_run_args_parse(&r, 2, run_typo, &e), -1);
    ck_assert_str_eq(e.message,
                     "curvd run: unknown argument '--arhc'; did you mean '--arch'? (see curvd --help)");
    /* a misspelt serve flag is refused (exit 2) even when it is the last argument */
    char *serve_typo[] = {"--prot"};
    ck_assert_int_eq(cv_serve_args_parse(&a, 1, serve_typo), 2);
    cv_serve_args_free(&a);
}
END_TEST

static Suite *server_suite(void)
{
    Suite *s = suite_create("server");
    TCase *codec = tcase_create("codec");
    tcase_add_test(codec, base64_decodes_and_rejects);
    tcase_add_test(codec, multipart_parses_parts);
    tcase_add_test(codec, multipart_rejects_malformed);
    tcase_add_test(codec, names);
    tcase_add_test(codec, job_indices_read_apart);
    tcase_add_test(codec, routes_match_openapi);
    tcase_add_test(codec, http_status_of_errors);
    tcase_add_test(codec, usage_lists_every_flag);
    tcase_add_test(codec, command_line_errors);
    suite_add_tcase(s, codec);
    TCase *reg = tcase_create("registry");
    tcase_add_test(reg, registry_versions_pins_conflicts_budget);
    tcase_add_test(reg, registry_put_params_race_and_pinned_budget);
    tcase_add_test(reg, registry_posteriors);
    tcase_add_test(reg, registry_keeps_previous_and_first_parameters);
    tcase_add_test(reg, registry_posterior_accumulate_within_budget);
    tcase_add_test(reg, demo_registers_trained_models);
    suite_add_tcase(s, reg);
    TCase *jobs = tcase_create("jobs");
    tcase_set_timeout(jobs, 120);
    tcase_add_test(jobs, jobs_run_and_report);
    tcase_add_test(jobs, jobs_queue_full_cancel_and_drain);
    tcase_add_test(jobs, jobs_time_limit_and_shutdown_cancel);
    tcase_add_test(jobs, jobs_micro_batches_progress_cancel_budget);
    tcase_add_test(jobs, finished_jobs_are_purged);
    tcase_add_test(jobs, memory_cgroup_limit);
    tcase_add_test(jobs, memory_account_admission);
    tcase_add_test(jobs, json_bodies_end_with_newline);
    tcase_add_test(jobs, strict_requests_and_retry_after);
    tcase_add_test(jobs, requests_without_a_socket);
    suite_add_tcase(s, jobs);
    /* --max-memory's review: the compact index reader, accounting on every path */
    TCase *mem = tcase_create("memory");
    tcase_set_timeout(mem, 120);
    tcase_add_test(mem, job_indices_same_answers);
    tcase_add_test(mem, memory_posterior_kept_by_a_lone_job);
    tcase_add_test(mem, memory_result_estimates_kfac_snr_predict);
    tcase_add_test(mem, memory_cancel_of_a_waiting_job_wakes_the_queue);
    suite_add_tcase(s, mem);
    return s;
}

int main(void) { return tu_main(server_suite); }
