/* test_state.c - the state directory (server/state.c: the record format,
 * checksums, atomic writes, damaged and partial files) and the registry's
 * persistence through it (server/persist.c: versions, parameters, deletes,
 * a failed install leaves the previous file).  Over HTTP and under kill -9:
 * tests/e2e_persist.py. */
#include "testutil.h"

#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include "api/params.h"
#include "server/persist.h"
#include "server/registry.h"
#include "server/state.h"

static const tu_layer mlp[] = {{&cv_linear_class, 3}};

static char *tmpdir(void)
{
    static char t[64]; /* one test per forked process */
    snprintf(t, sizeof t, "/tmp/curvd-state-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(t));
    return t;
}

static void rm_tree(const char *dir)
{
    char cmd[200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
}

static size_t file_size(const char *p)
{
    struct stat sb;
    ck_assert_int_eq(stat(p, &sb), 0);
    return (size_t)sb.st_size;
}

static void read_file(const char *p, unsigned char *buf, size_t n)
{
    FILE *f = fopen(p, "rb");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fread(buf, 1, n, f), n);
    fclose(f);
}

static void write_file(const char *p, const unsigned char *buf, size_t n)
{
    FILE *f = fopen(p, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(buf, 1, n, f), n);
    fclose(f);
}

START_TEST(crc32c_known_values)
{
    /* the CRC-32C check value (RFC 3720 B.4 and every CRC catalogue) */
    ck_assert_uint_eq(cv_crc32c(0, "123456789", 9), 0xE3069283u);
    ck_assert_uint_eq(cv_crc32c(0, "", 0), 0);
    /* incremental = whole */
    ck_assert_uint_eq(cv_crc32c(cv_crc32c(0, "1234", 4), "56789", 5), 0xE3069283u);
}
END_TEST

START_TEST(every_flipped_byte_and_every_truncation_is_refused)
{
    char *dir = tmpdir();
    cv_err e;
    cv_state *st = cv_state_open(dir, stderr, &e);
    ck_assert_ptr_nonnull(st);
    const char meta[] = "{\"name\":\"x\"}";
    unsigned char blob[100];
    for (int i = 0; i < 100; i++)
        blob[i] = (unsigned char)(i * 7);
    ck_assert_int_eq(cv_state_write(st, CV_STATE_MODEL, "x", meta, strlen(meta), blob, 100, &e), 0);
    char path[8400], why[256];
    cv_state_path(st, CV_STATE_MODEL, "x", path, sizeof path);
    cv_state_rec rec;
    ck_assert_int_eq(cv_state_read(path, CV_STATE_MODEL, &rec, why, sizeof why), 0);
    ck_assert_str_eq(rec.meta, meta);
    ck_assert_uint_eq(rec.blob_len, 100);
    ck_assert_mem_eq(rec.blob, blob, 100);
    cv_state_rec_free(&rec);
    /* the wrong kind */
    ck_assert_int_eq(cv_state_read(path, CV_STATE_JOB, &rec, why, sizeof why), -1);

    size_t n = file_size(path);
    ck_assert_uint_eq(n, CV_STATE_HEADER + strlen(meta) + 100);
    unsigned char *good = malloc(n);
    read_file(path, good, n);
    char bad[8500];
    snprintf(bad, sizeof bad, "%s/bad", dir);
    for (size_t i = 0; i < n; i++) {
        for (int bit = 0; bit < 8; bit += 3) {
            good[i] ^= (unsigned char)(1 << bit);
            write_file(bad, good, n);
            good[i] ^= (unsigned char)(1 << bit);
            ck_assert_msg(cv_state_read(bad, CV_STATE_MODEL, &rec, why, sizeof why) == -1,
                          "byte %zu bit %d flipped: accepted", i, bit);
        }
    }
    for (size_t k = 0; k < n; k++) {
        write_file(bad, good, k);
        ck_assert_msg(cv_state_read(bad, CV_STATE_MODEL, &rec, why, sizeof why) == -1,
                      "truncated to %zu bytes: accepted", k);
    }
    unsigned char *longer = calloc(n + 1, 1);
    memcpy(longer, good, n);
    write_file(bad, longer, n + 1);
    ck_assert_int_eq(cv_state_read(bad, CV_STATE_MODEL, &rec, why, sizeof why), -1);
    ck_assert_ptr_nonnull(strstr(why, "trailing"));
    free(longer);
    free(good);
    cv_state_close(st);
    rm_tree(dir);
}
END_TEST

static int count_cb(void *arg, const char *name, const cv_state_rec *rec, char *why, size_t wl)
{
    (*(int *)arg)++;
    return 0;
}

START_TEST(abort_keeps_the_previous_file_and_temporaries_are_removed)
{
    char *dir = tmpdir();
    cv_err e;
    cv_state *st = cv_state_open(dir, stderr, &e);
    ck_assert_ptr_nonnull(st);
    ck_assert_int_eq(cv_state_write(st, CV_STATE_DATASET, "d", "{\"v\":1}", 7, NULL, 0, &e), 0);
    cv_state_tx *tx;
    ck_assert_int_eq(cv_state_prepare(st, CV_STATE_DATASET, "d", "{\"v\":2}", 7, "zz", 2, &tx, &e),
                     0);
    cv_state_abort(tx);
    char path[8400], why[256];
    cv_state_path(st, CV_STATE_DATASET, "d", path, sizeof path);
    cv_state_rec rec;
    ck_assert_int_eq(cv_state_read(path, CV_STATE_DATASET, &rec, why, sizeof why), 0);
    ck_assert_str_eq(rec.meta, "{\"v\":1}");
    cv_state_rec_free(&rec);
    /* a prepared, never committed write (a crash before the rename) */
    ck_assert_int_eq(cv_state_prepare(st, CV_STATE_DATASET, "d", "{\"v\":3}", 7, NULL, 0, &tx, &e),
                     0);
    cv_state_close(st);
    st = cv_state_open(dir, stderr, &e); /* removes the temporary file */
    ck_assert_ptr_nonnull(st);
    char sub[8400];
    snprintf(sub, sizeof sub, "%s/datasets", dir);
    DIR *dd = opendir(sub);
    int files = 0;
    struct dirent *de;
    while ((de = readdir(dd)))
        files += de->d_name[0] != '.' || strncmp(de->d_name, ".tmp-", 5) == 0;
    closedir(dd);
    ck_assert_int_eq(files, 1);
    cv_state_abort(tx); /* frees it; the file is gone already */
    int n = 0;
    ck_assert_int_eq(cv_state_scan(st, CV_STATE_DATASET, count_cb, &n), 1);
    ck_assert_int_eq(n, 1);
    ck_assert_int_eq(cv_state_read(path, CV_STATE_DATASET, &rec, why, sizeof why), 0);
    ck_assert_str_eq(rec.meta, "{\"v\":1}");
    cv_state_rec_free(&rec);
    ck_assert_int_eq(cv_state_remove(st, CV_STATE_DATASET, "d", &e), 0);
    ck_assert_int_eq(access(path, F_OK), -1);
    ck_assert_int_eq(cv_state_remove(st, CV_STATE_DATASET, "d", &e), 0); /* already gone: fine */
    cv_state_close(st);
    rm_tree(dir);
}
END_TEST

static cv_model *heap_model(float v)
{
    cv_model *m = malloc(sizeof *m);
    ck_assert_ptr_nonnull(m);
    tu_model(m, 4, mlp, 1, CV_LOSS_CE, CV_RED_MEAN, 1);
    for (size_t i = 0; i < m->nparams_total; i++)
        m->params[i] = v + 0.001f * (float)i;
    return m;
}

START_TEST(registry_changes_survive_and_a_refused_install_writes_nothing)
{
    char *dir = tmpdir();
    cv_err e;
    cv_state *st = cv_state_open(dir, stderr, &e);
    ck_assert_ptr_nonnull(st);
    cv_registry *r = cv_registry_new((size_t)64 << 20);
    ck_assert_int_eq(cv_persist_attach(st, r, NULL), 0);
    ck_assert_int_eq(cv_registry_add_model(r, "a", heap_model(1), "http", NULL, &e), 0);
    ck_assert_msg(cv_registry_add_model(r, "b", heap_model(2), "http", NULL, &e) == 0, "%s", e.message);
    cv_model *p = heap_model(3);
    void *buf;
    size_t len;
    ck_assert_int_eq(cv_params_export(p, &buf, &len, &e), 0);
    ck_assert_int_eq(cv_registry_put_params(r, "a", buf, len, NULL, &e), 0);
    /* refused: the name exists; the file keeps version 1 of b */
    ck_assert_int_eq(cv_registry_add_model(r, "b", heap_model(4), "http", NULL, &e), -1);
    ck_assert_int_eq(cv_registry_add_model(r, "gone", heap_model(6), "http", NULL, &e), 0);
    ck_assert_int_eq(cv_registry_delete(r, CV_REG_MODEL, "gone", &e), 0);
    ck_assert_int_eq(cv_registry_add_model(r, "c", heap_model(5), "http", NULL, &e), 0);
    cv_registry *tiny = cv_registry_new(1);
    cv_registry_free(r);
    cv_state_close(st);

    st = cv_state_open(dir, stderr, &e);
    r = cv_registry_new((size_t)64 << 20);
    ck_assert_int_eq(cv_persist_attach(st, r, NULL), 3);
    cv_snap *s = cv_registry_get(r, CV_REG_MODEL, "a", &e);
    ck_assert_ptr_nonnull(s);
    ck_assert_uint_eq(s->version, 2);
    tu_assert_same_model(s->model, p, "a v2");
    cv_snap_unref(s);
    ck_assert_ptr_null(cv_registry_get(r, CV_REG_MODEL, "gone", &e));
    s = cv_registry_get(r, CV_REG_MODEL, "b", &e);
    ck_assert_ptr_nonnull(s);
    cv_model *b1 = heap_model(2);
    tu_assert_same_model(s->model, b1, "b v1 (the refused registration wrote nothing)");
    cv_model_free(b1);
    free(b1);
    cv_snap_unref(s);
    s = cv_registry_get(r, CV_REG_MODEL, "c", &e);
    ck_assert_ptr_nonnull(s);
    ck_assert_uint_eq(s->version, 1);
    ck_assert_str_eq(s->source, "http");
    cv_snap_unref(s);
    cv_registry_free(r);
    /* a registry too small for them: reported, files kept */
    ck_assert_int_eq(cv_persist_attach(st, tiny, NULL), 0);
    cv_registry_free(tiny);
    char path[8400];
    cv_state_path(st, CV_STATE_MODEL, "a", path, sizeof path);
    ck_assert_int_eq(access(path, F_OK), 0);
    cv_state_close(st);
    cv_model_free(p);
    free(p);
    free(buf);
    rm_tree(dir);
}
END_TEST

static Suite *state_suite(void)
{
    Suite *s = suite_create("state");
    TCase *t = tcase_create("state");
    tcase_add_test(t, crc32c_known_values);
    tcase_add_test(t, every_flipped_byte_and_every_truncation_is_refused);
    tcase_add_test(t, abort_keeps_the_previous_file_and_temporaries_are_removed);
    tcase_add_test(t, registry_changes_survive_and_a_refused_install_writes_nothing);
    suite_add_tcase(s, t);
    return s;
}

int main(void) { return tu_main(state_suite); }
