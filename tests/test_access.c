/* test_access.c - server/access.c without HTTP: the token file (roles,
 * comments, malformed lines), token matching (exact only: prefixes,
 * extensions and near misses refused), the role each route needs and what
 * each role may do, --generate-token (random and CURVD_TOKEN), Host names
 * (ports, IPv6 brackets, a trailing dot, '*'), the documented Content-Types
 * of every POST/PUT route and CORS origin matching. */
#include "testutil.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "server/access.h"

static char tokfile[64];

static void write_tokens(const char *text)
{
    snprintf(tokfile, sizeof tokfile, "/tmp/curvd-test-access-%d", (int)getpid());
    FILE *f = fopen(tokfile, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
}

static cv_access *with_tokens(const char *text, cv_err *e)
{
    write_tokens(text);
    cv_access_config c = {.token_file = tokfile};
    cv_access *a = cv_access_new(&c, e);
    unlink(tokfile);
    return a;
}

/* The status of method+path with "Bearer token" (NULL: no header); 0 = allowed. */
static unsigned status_of(const cv_access *a, const char *method, const char *path,
                          const char *token)
{
    char h[600];
    if (token)
        snprintf(h, sizeof h, "Bearer %s", token);
    cv_access_denial d;
    int client;
    return cv_access_check_token(a, method, path, token ? h : NULL, &client, &d) ? d.status : 0;
}

START_TEST(token_file_and_roles)
{
    cv_err e;
    cv_access *a = with_tokens("# tokens\n\n  all-token-0001  \nread-token-0002 read # c\n"
                               "submit-token-03\tsubmit\nadmin-token-004 admin\n",
                               &e);
    ck_assert_msg(a != NULL, "%s", e.message);
    ck_assert_int_eq(cv_access_tokens(a), 4);
    ck_assert_ptr_null(cv_access_generated_token(a));
    static const struct {
        const char *method, *path;
        unsigned read, submit, admin;
    } cases[] = {
        {"GET", "/v1/models", 0, 0, 0},
        {"HEAD", "/v1/jobs/abc", 0, 0, 0},
        {"GET", "/metrics", 0, 0, 0},
        {"POST", "/v1/jobs", 403, 0, 0},
        {"POST", "/v1/jobs/", 403, 0, 0},
        {"DELETE", "/v1/jobs/0123", 403, 0, 0},
        {"POST", "/v1/models", 403, 403, 0},
        {"PUT", "/v1/models/m/parameters", 403, 403, 0},
        {"DELETE", "/v1/models/m", 403, 403, 0},
        {"PUT", "/v1/datasets/d", 403, 403, 0},
        {"POST", "/v1/datasets/d/parts", 403, 403, 0},
        {"POST", "/v1/datasets/d/commit", 403, 403, 0},
        {"DELETE", "/v1/datasets/d/parts", 403, 403, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *m = cases[i].method, *p = cases[i].path;
        ck_assert_uint_eq(status_of(a, m, p, "read-token-0002"), cases[i].read);
        ck_assert_uint_eq(status_of(a, m, p, "submit-token-03"), cases[i].submit);
        ck_assert_uint_eq(status_of(a, m, p, "admin-token-004"), cases[i].admin);
        ck_assert_uint_eq(status_of(a, m, p, "all-token-0001"), 0);
        ck_assert_uint_eq(status_of(a, m, p, NULL), 401);
    }
    /* near misses */
    const char *bad[] = {"all-token-000", "all-token-00011", "all-token-0002", "ALL-TOKEN-0001",
                         "x", "read-token-0002 read"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ck_assert_uint_eq(status_of(a, "GET", "/v1/models", bad[i]), 401);
    cv_access_denial d;
    int client = 7;
    ck_assert_int_eq(cv_access_check_token(a, "GET", "/v1/models", "Basic abc", &client, &d), -1);
    ck_assert_uint_eq(d.status, 401);
    ck_assert_str_eq(d.code, "unauthorized");
    ck_assert_ptr_nonnull(strstr(d.www_authenticate, "Bearer realm=\"curvd\""));
    ck_assert_int_eq(cv_access_check_token(a, "GET", "/v1/models", "bearer   read-token-0002 ",
                                           &client, &d), 0);
    ck_assert_int_eq(client, 1);
    /* without a header: liveness and the dashboard's static files only */
    ck_assert_int_eq(cv_access_check_token(a, "GET", "/v1/health", NULL, &client, &d), 0);
    ck_assert_int_eq(client, -2);
    ck_assert_uint_eq(status_of(a, "GET", "/", NULL), 0);
    ck_assert_uint_eq(status_of(a, "GET", "/dashboard/app.js", NULL), 0);
    ck_assert_uint_eq(status_of(a, "POST", "/v1/health", NULL), 401);
    ck_assert_uint_eq(status_of(a, "GET", "/v1/health", "wrong"), 401);
    cv_access_free(a);
}
END_TEST

START_TEST(bad_token_files)
{
    cv_err e;
    const char *bad[] = {"tok superuser\n", "tok read extra\n", "# only comments\n\n", ""};
    const char *want[] = {"unknown role", "more words", "lists no token", "lists no token"};
    for (int i = 0; i < 4; i++) {
        cv_err_clear(&e);
        ck_assert_ptr_null(with_tokens(bad[i], &e));
        ck_assert_msg(strstr(e.message, want[i]) != NULL, "%s", e.message);
    }
    cv_access_config c = {.token_file = "/nonexistent/tokens"};
    ck_assert_ptr_null(cv_access_new(&c, &e));
    ck_assert_str_eq(e.code, "invalid_token_file");
    /* no tokens: everything allowed, client -1 */
    cv_access_config open = {0};
    cv_access *a = cv_access_new(&open, &e);
    ck_assert_ptr_nonnull(a);
    ck_assert_int_eq(cv_access_tokens(a), 0);
    ck_assert_uint_eq(status_of(a, "DELETE", "/v1/models/m", NULL), 0);
    cv_access_free(a);
}
END_TEST

START_TEST(generated_tokens)
{
    cv_err e;
    cv_access_config c = {.generate_token = 1};
    cv_access *a = cv_access_new(&c, &e), *b = cv_access_new(&c, &e);
    ck_assert_ptr_nonnull(a);
    ck_assert_ptr_nonnull(b);
    const char *t = cv_access_generated_token(a);
    ck_assert_ptr_nonnull(t);
    ck_assert_uint_eq(strlen(t), 32);
    ck_assert_uint_eq(strspn(t, "0123456789abcdef"), 32);
    ck_assert_str_ne(t, cv_access_generated_token(b));
    ck_assert_uint_eq(status_of(a, "DELETE", "/v1/models/m", t), 0);
    ck_assert_uint_eq(status_of(a, "GET", "/v1/models", NULL), 401);
    cv_access_free(a);
    cv_access_free(b);
    cv_access_config env = {.generate_token = 1, .env_token = "from-env-1234"};
    a = cv_access_new(&env, &e);
    ck_assert_ptr_nonnull(a);
    ck_assert_ptr_null(cv_access_generated_token(a));
    ck_assert_uint_eq(status_of(a, "POST", "/v1/models", "from-env-1234"), 0);
    cv_access_free(a);
    cv_access_config spaced = {.generate_token = 1, .env_token = "two words"};
    ck_assert_ptr_null(cv_access_new(&spaced, &e));
}
END_TEST

static int host_ok(const cv_access *a, const char *host)
{
    cv_access_denial d;
    return cv_access_check_host(a, host, &d) == 0;
}

START_TEST(hosts)
{
    cv_err e;
    cv_access_config c = {.bind = "10.1.2.3"};
    cv_access *a = cv_access_new(&c, &e);
    ck_assert(host_ok(a, "localhost"));
    ck_assert(host_ok(a, "LOCALHOST:8080"));
    ck_assert(host_ok(a, "localhost.:80"));
    ck_assert(host_ok(a, "127.0.0.1:1"));
    ck_assert(host_ok(a, "[::1]:8080"));
    ck_assert(host_ok(a, "10.1.2.3:8080"));
    ck_assert(host_ok(a, NULL)); /* HTTP/1.0 without Host */
    ck_assert(!host_ok(a, "evil.example"));
    ck_assert(!host_ok(a, "localhost.evil.example"));
    ck_assert(!host_ok(a, "[::1"));
    ck_assert(!host_ok(a, ""));
    ck_assert(!host_ok(a, "10.1.2.4"));
    cv_access_denial d;
    cv_access_check_host(a, "evil.example", &d);
    ck_assert_uint_eq(d.status, 421);
    ck_assert_str_eq(d.code, "host_not_allowed");
    cv_access_free(a);
    cv_access_config list = {.allowed_hosts = "curvd.example, other.example"};
    a = cv_access_new(&list, &e);
    ck_assert(host_ok(a, "curvd.example:443"));
    ck_assert(host_ok(a, "other.example"));
    ck_assert(!host_ok(a, "localhost"));
    cv_access_free(a);
    cv_access_config any = {.allowed_hosts = "*"};
    a = cv_access_new(&any, &e);
    ck_assert(host_ok(a, "anything.example"));
    cv_access_free(a);
    cv_access_config none = {.allowed_hosts = " , "};
    ck_assert_ptr_null(cv_access_new(&none, &e));
}
END_TEST

static unsigned ctype_status(const char *m, const char *p, const char *ct, int body)
{
    cv_access_denial d;
    return cv_access_check_content_type(m, p, ct, body, &d) ? d.status : 0;
}

START_TEST(content_types)
{
    const char *J = "application/json", *O = "application/octet-stream";
    ck_assert_uint_eq(ctype_status("POST", "/v1/jobs", J, 1), 0);
    ck_assert_uint_eq(ctype_status("POST", "/v1/jobs/", "Application/JSON; charset=utf-8", 1), 0);
    ck_assert_uint_eq(ctype_status("POST", "/v1/jobs", "application/x-www-form-urlencoded", 1),
                      415);
    ck_assert_uint_eq(ctype_status("POST", "/v1/jobs", "text/plain", 1), 415);
    ck_assert_uint_eq(ctype_status("POST", "/v1/jobs", "application/jsonx", 1), 415);
    ck_assert_uint_eq(ctype_status("POST", "/v1/jobs", NULL, 1), 415);
    ck_assert_uint_eq(ctype_status("POST", "/v1/jobs", NULL, 0), 0);
    ck_assert_uint_eq(ctype_status("POST", "/v1/models", "multipart/form-data; boundary=x", 1), 0);
    ck_assert_uint_eq(ctype_status("POST", "/v1/datasets", J, 1), 0);
    ck_assert_uint_eq(ctype_status("POST", "/v1/datasets", O, 1), 415);
    ck_assert_uint_eq(ctype_status("PUT", "/v1/datasets/d", O, 1), 0);
    ck_assert_uint_eq(ctype_status("PUT", "/v1/datasets/d", J, 1), 415);
    ck_assert_uint_eq(ctype_status("PUT", "/v1/models/m/parameters", O, 1), 0);
    ck_assert_uint_eq(ctype_status("PUT", "/v1/models/m/parameters", "text/plain", 1), 415);
    ck_assert_uint_eq(ctype_status("POST", "/v1/datasets/d", J, 1), 0);
    ck_assert_uint_eq(ctype_status("POST", "/v1/datasets/d/parts", O, 1), 0);
    ck_assert_uint_eq(ctype_status("POST", "/v1/datasets/d/parts", J, 1), 415);
    ck_assert_uint_eq(ctype_status("POST", "/v1/datasets/d/commit", J, 1), 0);
    ck_assert_uint_eq(ctype_status("POST", "/v1/datasets/d/commit", NULL, 0), 0);
    ck_assert_uint_eq(ctype_status("GET", "/v1/jobs", "text/plain", 1), 0);
    ck_assert_uint_eq(ctype_status("POST", "/v1/nothing", "text/plain", 1), 0); /* 404 later */
}
END_TEST

START_TEST(cors)
{
    cv_err e;
    cv_access_config off = {0};
    cv_access *a = cv_access_new(&off, &e);
    ck_assert_ptr_null(cv_access_cors_origin(a));
    ck_assert_ptr_null(cv_access_cors_allow(a, "https://app.example"));
    cv_access_free(a);
    cv_access_config on = {.cors_origin = "https://app.example"};
    a = cv_access_new(&on, &e);
    ck_assert_str_eq(cv_access_cors_allow(a, "https://app.example"), "https://app.example");
    ck_assert_ptr_null(cv_access_cors_allow(a, "https://app.example.evil"));
    ck_assert_ptr_null(cv_access_cors_allow(a, "http://app.example"));
    ck_assert_ptr_null(cv_access_cors_allow(a, NULL));
    cv_access_free(a);
}
END_TEST

static Suite *access_suite(void)
{
    Suite *s = suite_create("access");
    TCase *t = tcase_create("access");
    tcase_add_test(t, token_file_and_roles);
    tcase_add_test(t, bad_token_files);
    tcase_add_test(t, generated_tokens);
    tcase_add_test(t, hosts);
    tcase_add_test(t, content_types);
    tcase_add_test(t, cors);
    suite_add_tcase(s, t);
    return s;
}

int main(void) { return tu_main(access_suite); }
