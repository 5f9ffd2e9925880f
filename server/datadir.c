/* datadir.c - registering safetensors files of --data-dir by name,
 * memory-mapped (see datadir.h). */
#include "server/datadir.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "api/datafile.h"
#include "api/safetensors.h"

struct cv_mapped {
    void *base;
    size_t len;
    float *x_copy;            /* converted x, or NULL */
    void *y_copy;             /* converted labels / targets, or NULL */
};

/* Refuses names that are absolute, empty or hold a ".." component. */
static int check_name(const char *file, cv_err *e)
{
    if (!file[0])
        return cv_err_set(e, CV_EINVAL, "invalid_file", "file", "file: empty file name");
    if (strlen(file) >= PATH_MAX)
        return cv_err_set(e, CV_EINVAL, "invalid_file", "file", "file: name too long");
    if (file[0] == '/')
        return cv_err_set(e, CV_EINVAL, "path_escape", "file",
                          "file '%.200s': absolute paths are refused; name a file relative to "
                          "the data directory (--data-dir)", file);
    for (const char *p = file; *p;) {
        size_t n = strcspn(p, "/");
        if (n == 2 && p[0] == '.' && p[1] == '.')
            return cv_err_set(e, CV_EINVAL, "path_escape", "file",
                              "file '%.200s': '..' components are refused; name a file inside "
                              "the data directory (--data-dir)", file);
        p += n;
        while (*p == '/')
            p++;
    }
    return 0;
}

int cv_datadir_resolve(const char *dir, const char *file, char *out, size_t len, cv_err *e)
{
    if (check_name(file, e))
        return -1;
    char root[PATH_MAX], joined[2 * PATH_MAX + 2], real[PATH_MAX];
    if (!realpath(dir, root))
        return cv_err_set(e, CV_EINTERNAL, "data_dir_unavailable", "file",
                          "the data directory (--data-dir) cannot be read: %s", strerror(errno));
    snprintf(joined, sizeof joined, "%s/%s", root, file);
    if (!realpath(joined, real)) {
        if (errno == ENOENT || errno == ENOTDIR)
            return cv_err_set(e, CV_ENOTFOUND, "not_found", "file",
                              "file '%.200s' not found in the data directory", file);
        return cv_err_set(e, CV_EINVAL, "invalid_file", "file", "file '%.200s': %s", file,
                          strerror(errno));
    }
    size_t rl = strlen(root);
    int inside = strcmp(root, "/") == 0 ? real[0] == '/'
                                        : strncmp(real, root, rl) == 0 && real[rl] == '/';
    if (!inside)
        return cv_err_set(e, CV_EINVAL, "path_escape", "file",
                          "file '%.200s' resolves outside the data directory (a symbolic link "
                          "out of it?); only files inside --data-dir can be registered", file);
    if (strlen(real) >= len)
        return cv_err_set(e, CV_EINVAL, "invalid_file", "file", "file: path too long");
    snprintf(out, len, "%s", real);
    return 0;
}

void cv_mapped_free(void *p)
{
    cv_mapped *m = p;
    if (!m)
        return;
    free(m->x_copy);
    free(m->y_copy);
    if (m->base)
        munmap(m->base, m->len);
    free(m);
}

/* Opens path (no symbolic link at its end: it was resolved) and maps it. */
static int map_file(const char *path, const char *file, cv_mapped *m, cv_err *e)
{
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return cv_err_set(e, errno == ENOENT ? CV_ENOTFOUND : CV_EINVAL,
                          errno == ENOENT ? "not_found" : "invalid_file", "file",
                          "file '%.200s' cannot be opened: %s", file, strerror(errno));
    struct stat st;
    int rc = 0;
    if (fstat(fd, &st) != 0)
        rc = cv_err_set(e, CV_EINVAL, "invalid_file", "file", "file '%.200s': %s", file,
                        strerror(errno));
    else if (!S_ISREG(st.st_mode))
        rc = cv_err_set(e, CV_EINVAL, "not_a_file", "file",
                        "file '%.200s' is not a regular file", file);
    else if (st.st_size < 8)
        rc = cv_err_set(e, CV_EINVAL, "bad_safetensors", "file",
                        "file '%.200s' is not safetensors: %lld bytes, shorter than the 8-byte "
                        "header length", file, (long long)st.st_size);
    if (rc == 0) {
        m->len = (size_t)st.st_size;
        m->base = mmap(NULL, m->len, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m->base == MAP_FAILED) {
            m->base = NULL;
            rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "file",
                            "file '%.200s' cannot be mapped: %s", file, strerror(errno));
        }
    }
    close(fd);
    return rc;
}

/* Bytes of the converted copies cv_datafile_load_borrowed would make of f
 * (a tensor that is missing counts 0: the load names it). */
static size_t copy_bytes(const cv_st_file *f)
{
    const cv_st_tensor *x = cv_st_find(f, "x"), *y = cv_st_find(f, "y");
    size_t b = 0;
    if (x && (x->dtype != CV_ST_F32 || (uintptr_t)x->data % sizeof(float)))
        b += x->numel * sizeof(float);
    if (y && cv_st_dtype_is_float(y->dtype) &&
        (y->dtype != CV_ST_F32 || (uintptr_t)y->data % sizeof(float)))
        b += y->numel * sizeof(float);
    else if (y && !cv_st_dtype_is_float(y->dtype) &&
             (y->dtype != CV_ST_I64 || (uintptr_t)y->data % sizeof(int64_t)))
        b += y->numel * sizeof(int64_t);
    return b;
}

int cv_datadir_map(const char *dir, const char *file, size_t max_copy, int scan, cv_dataset *d,
                   cv_mapped **map, size_t *heap_bytes, size_t *mapped_bytes, cv_err *e)
{
    *map = NULL;
    memset(d, 0, sizeof *d);
    char path[PATH_MAX];
    if (cv_datadir_resolve(dir, file, path, sizeof path, e))
        return -1;
    cv_mapped *m = calloc(1, sizeof *m);
    if (!m)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "file", "out of memory");
    if (map_file(path, file, m, e)) {
        cv_mapped_free(m);
        return -1;
    }
    madvise(m->base, m->len, MADV_WILLNEED);
    cv_st_file f;
    unsigned copied = 0;
    if (cv_st_parse(m->base, m->len, &f, e)) {
        cv_err why = *e;
        cv_err_set(e, why.status, why.code, "file", "file '%.200s' is not a valid safetensors "
                   "file: %.280s", file, why.message);
        cv_mapped_free(m);
        return -1;
    }
    size_t need = copy_bytes(&f);
    if (need > max_copy) {
        cv_st_free(&f);
        cv_mapped_free(m);
        return cv_err_set(e, CV_ETOOLARGE, "registry_full", "file",
                          "file '%.200s': its dtypes need a converted copy of %zu bytes (only "
                          "F32 x and I64 labels / F32 targets are used in place), more than the "
                          "%zu bytes left in the registry budget (--max-registry-bytes)", file,
                          need, max_copy);
    }
    int rc = scan ? cv_datafile_load_borrowed(&f, d, &copied, e)
                  : cv_datafile_load_unscanned(&f, d, &copied, e);
    cv_st_free(&f);
    if (rc) {
        cv_mapped_free(m);
        return -1;
    }
    size_t sx = d->n * cv_shape_numel(&d->x_shape), sy = d->n * cv_shape_numel(&d->y_shape);
    *heap_bytes = sizeof *d;
    if (copied & CV_DF_X_COPIED) {
        m->x_copy = d->x;
        *heap_bytes += sx * sizeof(float);
    }
    if (copied & CV_DF_Y_COPIED) {
        m->y_copy = d->y_is_index ? (void *)d->labels : (void *)d->targets;
        *heap_bytes += sy * (d->y_is_index ? sizeof(int64_t) : sizeof(float));
    }
    *mapped_bytes = m->len;
    *map = m;
    return 0;
}
