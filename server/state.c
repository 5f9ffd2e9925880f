/* state.c - checksummed record files in the state directory, written
 * atomically (temporary file, fsync, rename, directory fsync) and checked
 * when read (see state.h; format in docs/interface.md, "Persistence"). */
#include "server/state.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

struct cv_state {
    char dir[4096];
    FILE *log;
    int lock_fd;              /* DIR/lock, flock()ed while open: one daemon per directory */
};

static const char MAGIC[8] = {'C', 'U', 'R', 'V', 'D', 'S', 'T', 0};
#define FORMAT 1u

/* ---- CRC32C ---------------------------------------------------------------- */

uint32_t cv_crc32c(uint32_t crc, const void *p, size_t n)
{
    uint32_t table[256]; /* built per call: 2 KiB of work, no global state */
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        table[i] = c;
    }
    const unsigned char *b = p;
    crc = ~crc;
    for (size_t i = 0; i < n; i++)
        crc = table[(crc ^ b[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

/* ---- little-endian fields ---------------------------------------------------- */

static void put32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t get32(const unsigned char *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static uint64_t get64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

/* ---- paths ------------------------------------------------------------------ */

static const char *subdir(cv_state_kind kind)
{
    switch (kind) {
    case CV_STATE_MODEL: return "models";
    case CV_STATE_DATASET: return "datasets";
    case CV_STATE_JOB: return "jobs";
    case CV_STATE_MONITOR: return "monitors";
    default: return "";
    }
}

static void dir_of(const cv_state *st, cv_state_kind kind, char *out, size_t len)
{
    const char *sd = subdir(kind);
    snprintf(out, len, "%s%s%s", st->dir, sd[0] ? "/" : "", sd);
}

void cv_state_path(const cv_state *st, cv_state_kind kind, const char *name, char *out,
                   size_t len)
{
    char d[4200];
    dir_of(st, kind, d, sizeof d);
    snprintf(out, len, "%s/%s%s", d, name, CV_STATE_SUFFIX);
}

const char *cv_state_dir(const cv_state *st) { return st->dir; }
FILE *cv_state_log(const cv_state *st) { return st->log; }

static int fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

static int has_suffix(const char *s, const char *suf)
{
    size_t n = strlen(s), k = strlen(suf);
    return n >= k && strcmp(s + n - k, suf) == 0;
}

/* ---- open ------------------------------------------------------------------- */

/* Creates path (if missing) and, when it did, fsyncs its parent so that the
 * new entry is durable too. */
static int make_dir(const char *path, cv_err *e)
{
    int made = mkdir(path, 0700) == 0;
    if (made) {
        char parent[4200];
        snprintf(parent, sizeof parent, "%s", path);
        char *slash = strrchr(parent, '/');
        if (slash == parent)
            slash[1] = 0;
        else if (slash)
            *slash = 0;
        else
            snprintf(parent, sizeof parent, ".");
        fsync_dir(parent);
    }
    if (made || errno == EEXIST) {
        struct stat sb;
        if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode))
            return 0;
        return cv_err_set(e, CV_EINVAL, "invalid_state_dir", "--state-dir",
                          "%s is not a directory", path);
    }
    return cv_err_set(e, CV_EINVAL, "invalid_state_dir", "--state-dir", "cannot create %s: %s",
                      path, strerror(errno));
}

/* Removes temporary files a crash left in dir (a write that never reached
 * its rename: the previous version, if any, is still in place). */
static void remove_temps(cv_state *st, const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    int removed = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (strncmp(de->d_name, ".tmp-", 5) != 0 || has_suffix(de->d_name, CV_STATE_SUFFIX))
            continue;
        char p[8400];
        snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
        if (unlink(p) == 0) {
            removed++;
            fprintf(st->log, "curvd: state: %s: partial write (a crash before its rename), "
                             "removed; the previous version is kept\n", p);
        }
    }
    closedir(d);
    if (removed)
        fsync_dir(dir);
}

cv_state *cv_state_open(const char *dir, FILE *log, cv_err *e)
{
    if (!dir || !dir[0] || strlen(dir) >= 3800) {
        cv_err_set(e, CV_EINVAL, "invalid_state_dir", "--state-dir",
                   "--state-dir needs a directory path (at most 3800 bytes)");
        return NULL;
    }
    cv_state *st = cv_err_calloc(sizeof *st, "out of memory", e);
    if (!st)
        return NULL;
    snprintf(st->dir, sizeof st->dir, "%s", dir);
    size_t n = strlen(st->dir);
    while (n > 1 && st->dir[n - 1] == '/')
        st->dir[--n] = 0;
    st->log = log ? log : stderr;
    st->lock_fd = -1;
    if (make_dir(st->dir, e))
        goto fail;
    char lock[4200];
    snprintf(lock, sizeof lock, "%s/lock", st->dir);
    st->lock_fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (st->lock_fd < 0) {
        cv_err_set(e, CV_EINVAL, "invalid_state_dir", "--state-dir", "cannot open %s: %s", lock,
                   strerror(errno));
        goto fail;
    }
    if (flock(st->lock_fd, LOCK_EX | LOCK_NB)) {
        cv_err_set(e, CV_ECONFLICT, "state_dir_in_use", "--state-dir",
                   "%s is in use by another curvd (%s is locked)", st->dir, lock);
        goto fail;
    }
    static const cv_state_kind kinds[] = {CV_STATE_MODEL, CV_STATE_DATASET, CV_STATE_JOB,
                                           CV_STATE_MONITOR};
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        char d[4200];
        dir_of(st, kinds[i], d, sizeof d);
        if (make_dir(d, e))
            goto fail;
        remove_temps(st, d);
    }
    remove_temps(st, st->dir);
    /* the new subdirectories' entries */
    if (fsync_dir(st->dir)) {
        cv_err_set(e, CV_EINVAL, "invalid_state_dir", "--state-dir", "cannot fsync %s: %s",
                   st->dir, strerror(errno));
        goto fail;
    }
    char probe[4200];
    snprintf(probe, sizeof probe, "%s/models", st->dir);
    if (access(probe, W_OK) != 0) {
        cv_err_set(e, CV_EINVAL, "invalid_state_dir", "--state-dir", "%s is not writable",
                   probe);
        goto fail;
    }
    return st;
fail:
    if (st->lock_fd >= 0)
        close(st->lock_fd);
    free(st);
    return NULL;
}

void cv_state_close(cv_state *st)
{
    if (st) {
        close(st->lock_fd); /* releases the lock */
        free(st);
    }
}

/* ---- write ------------------------------------------------------------------ */

static int write_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n) {
        ssize_t w = write(fd, c, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        c += w;
        n -= (size_t)w;
    }
    return 0;
}

static int write_failed(const char *what, const char *path, cv_err *e)
{
    return cv_err_set(e, CV_EINTERNAL, "state_write_failed", "",
                      "cannot %s %s in the state directory: %s", what, path, strerror(errno));
}

struct cv_state_tx {
    char dir[4200], tmp[8400], final[8400];
};

int cv_state_prepare(cv_state *st, cv_state_kind kind, const char *name, const char *meta,
                     size_t meta_len, const void *blob, size_t blob_len, cv_state_tx **tx,
                     cv_err *e)
{
    *tx = NULL;
    unsigned char h[CV_STATE_HEADER];
    memcpy(h, MAGIC, 8);
    put32(h + 8, FORMAT);
    put32(h + 12, (uint32_t)kind);
    put64(h + 16, meta_len);
    put64(h + 24, blob_len);
    uint32_t crc = cv_crc32c(0, meta, meta_len);
    crc = cv_crc32c(crc, blob, blob_len);
    put32(h + 32, crc);
    put32(h + 36, cv_crc32c(0, h, 36));

    cv_state_tx *t = cv_err_calloc(sizeof *t, "out of memory", e);
    if (!t)
        return -1;
    dir_of(st, kind, t->dir, sizeof t->dir);
    cv_state_path(st, kind, name, t->final, sizeof t->final);
    snprintf(t->tmp, sizeof t->tmp, "%s/.tmp-%s-XXXXXX", t->dir, name);
    int fd = mkostemp(t->tmp, O_CLOEXEC);
    if (fd < 0) {
        write_failed("create a temporary file for", t->final, e);
        free(t);
        return -1;
    }
    if (write_all(fd, h, sizeof h) || write_all(fd, meta, meta_len) ||
        (blob_len && write_all(fd, blob, blob_len))) {
        write_failed("write", t->tmp, e);
        goto fail;
    }
    if (fsync(fd)) {
        write_failed("fsync", t->tmp, e);
        goto fail;
    }
    int rc = close(fd);
    fd = -1;
    if (rc) {
        write_failed("close", t->tmp, e);
        goto fail;
    }
    *tx = t;
    return 0;
fail:
    if (fd >= 0)
        close(fd);
    unlink(t->tmp);
    free(t);
    return -1;
}

int cv_state_commit(cv_state_tx *t, cv_err *e)
{
    int rc = 0;
    if (rename(t->tmp, t->final)) {
        rc = write_failed("rename", t->tmp, e);
        unlink(t->tmp);
    } else if (fsync_dir(t->dir)) {
        rc = write_failed("fsync the directory of", t->final, e);
    }
    free(t);
    return rc;
}

void cv_state_abort(cv_state_tx *t)
{
    if (t) {
        unlink(t->tmp);
        free(t);
    }
}

int cv_state_write(cv_state *st, cv_state_kind kind, const char *name, const char *meta,
                   size_t meta_len, const void *blob, size_t blob_len, cv_err *e)
{
    cv_state_tx *t;
    if (cv_state_prepare(st, kind, name, meta, meta_len, blob, blob_len, &t, e))
        return -1;
    return cv_state_commit(t, e);
}

int cv_state_remove(cv_state *st, cv_state_kind kind, const char *name, cv_err *e)
{
    char dir[4200], path[8400];
    dir_of(st, kind, dir, sizeof dir);
    cv_state_path(st, kind, name, path, sizeof path);
    if (unlink(path) && errno != ENOENT)
        return write_failed("remove", path, e);
    if (fsync_dir(dir))
        return write_failed("fsync the directory of", path, e);
    return 0;
}

/* ---- read ------------------------------------------------------------------- */

void cv_state_rec_free(cv_state_rec *rec)
{
    if (rec) {
        free(rec->buf);
        memset(rec, 0, sizeof *rec);
    }
}

int cv_state_read(const char *path, cv_state_kind kind, cv_state_rec *rec, char *why,
                  size_t why_len)
{
    memset(rec, 0, sizeof *rec);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(why, why_len, "cannot open: %s", strerror(errno));
        return -1;
    }
    struct stat sb;
    unsigned char h[CV_STATE_HEADER];
    char *buf = NULL;
    if (fstat(fd, &sb) || !S_ISREG(sb.st_mode)) {
        snprintf(why, why_len, "not a regular file");
        goto fail;
    }
    size_t size = (size_t)sb.st_size;
    if (size < sizeof h) {
        snprintf(why, why_len, "truncated: %zu bytes, shorter than the %d-byte header", size,
                 CV_STATE_HEADER);
        goto fail;
    }
    if (pread(fd, h, sizeof h, 0) != (ssize_t)sizeof h) {
        snprintf(why, why_len, "cannot read the header");
        goto fail;
    }
    if (memcmp(h, MAGIC, 8)) {
        snprintf(why, why_len, "not a curvd state file (bad magic)");
        goto fail;
    }
    if (get32(h + 36) != cv_crc32c(0, h, 36)) {
        snprintf(why, why_len, "header checksum mismatch");
        goto fail;
    }
    if (get32(h + 8) != FORMAT || get32(h + 12) != (uint32_t)kind) {
        snprintf(why, why_len, "format %u kind %u, expected format %u kind %d", get32(h + 8),
                 get32(h + 12), FORMAT, (int)kind);
        goto fail;
    }
    uint64_t ml = get64(h + 16), bl = get64(h + 24);
    if (ml > size || bl > size || sizeof h + ml + bl != size) {
        snprintf(why, why_len, "%s: %zu bytes, the header says %llu",
                 sizeof h + ml + bl > size ? "truncated" : "trailing bytes", size,
                 (unsigned long long)(sizeof h + ml + bl));
        goto fail;
    }
    buf = malloc(size - sizeof h + 1);
    if (!buf) {
        snprintf(why, why_len, "out of memory reading %zu bytes", size);
        goto fail;
    }
    size_t got = 0, want = size - sizeof h;
    while (got < want) {
        ssize_t r = pread(fd, buf + got, want - got, (off_t)(sizeof h + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            snprintf(why, why_len, "short read");
            goto fail;
        }
        got += (size_t)r;
    }
    if (cv_crc32c(0, buf, want) != get32(h + 32)) {
        snprintf(why, why_len, "checksum mismatch (CRC32C of the contents)");
        goto fail;
    }
    close(fd);
    /* the meta is text: NUL-terminate it in place after moving the blob on
     * (the blob follows it; one spare byte was allocated at the end) */
    memmove(buf + ml + 1, buf + ml, bl);
    buf[ml] = 0;
    rec->buf = buf;
    rec->meta = buf;
    rec->meta_len = ml;
    rec->blob = buf + ml + 1;
    rec->blob_len = bl;
    return 0;
fail:
    free(buf);
    close(fd);
    return -1;
}

void cv_state_set_aside(cv_state *st, const char *path, const char *why)
{
    char aside[8500];
    snprintf(aside, sizeof aside, "%s.damaged", path);
    int moved = rename(path, aside) == 0;
    fprintf(st->log, "curvd: state: %s: damaged (%s), skipped%s%s\n", path, why,
            moved ? "; renamed to " : "", moved ? aside : "");
    fflush(st->log);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int cv_state_scan(cv_state *st, cv_state_kind kind, cv_state_fn fn, void *arg)
{
    char dir[4200];
    dir_of(st, kind, dir, sizeof dir);
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    char **names = NULL;
    size_t n = 0, cap = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!has_suffix(de->d_name, CV_STATE_SUFFIX))
            continue;
        if (n == cap) {
            size_t nc = cap ? 2 * cap : 64;
            char **nv = realloc(names, nc * sizeof *nv);
            if (!nv)
                break;
            names = nv;
            cap = nc;
        }
        if (!(names[n] = strdup(de->d_name)))
            break;
        n++;
    }
    closedir(d);
    if (n)
        qsort(names, n, sizeof *names, cmp_str);
    int ok = 0;
    for (size_t i = 0; i < n; i++) {
        char path[8400], why[256] = "", name[4096];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        snprintf(name, sizeof name, "%.*s", (int)(strlen(names[i]) - strlen(CV_STATE_SUFFIX)),
                 names[i]);
        cv_state_rec rec;
        if (cv_state_read(path, kind, &rec, why, sizeof why) == 0) {
            int rc = fn(arg, name, &rec, why, sizeof why);
            if (rc == 0)
                ok++;
            else if (rc < 0)
                cv_state_set_aside(st, path, why[0] ? why : "refused");
            cv_state_rec_free(&rec);
        } else {
            cv_state_set_aside(st, path, why);
        }
        free(names[i]);
    }
    free(names);
    return ok;
}
