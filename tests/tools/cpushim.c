/* cpushim.c - an LD_PRELOAD shim that makes curvd see a many-core machine
 * (default 16 CPUs; CURVD_SHIM_CPUS=N for another count), to run the test
 * suite as on a large CI runner from a small VM.  Not linked into curvd.
 *
 * Lies only to callers in the project's own code (curvd, libcurvd.so, the
 * test suites): a caller whose object lives under /usr or /lib (OpenBLAS,
 * glibc, Python, torch) gets the truth, so OpenBLAS keeps its real default
 * thread pool and Python/torch do not oversubscribe the real cores.
 *   sysconf(_SC_NPROCESSORS_ONLN/_CONF), get_nprocs(), get_nprocs_conf(),
 *   sched_getaffinity (CPUs 0..N-1)  -> N CPUs
 *   openblas_get_num_threads()        -> the count last passed to
 *       openblas_set_num_threads (through this shim), else N: OpenBLAS's own
 *       default on an N-core machine (engine/parallel.c sizes its loops so).
 * CURVD_SHIM_BLAS=1 lies to OpenBLAS as well, so that its default pool (the
 * thread count of `curvd run` without --blas-threads) really has N threads:
 * the CI machine's BLAS work split, at the cost of oversubscribing the cores.
 * Build: cc -shared -fPIC -O2 -o build/cpushim.so tests/tools/cpushim.c -ldl
 * Use:   LD_PRELOAD=$PWD/build/cpushim.so build/curvd serve ...  */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int shim_cpus(void)
{
    const char *s = getenv("CURVD_SHIM_CPUS");
    int n = s ? atoi(s) : 16;
    return n > 0 ? n : 16;
}

/* Whether the code at return address `ra` belongs to the project. */
static int project_caller(const void *ra)
{
    Dl_info di;
    if (!dladdr(ra, &di) || !di.dli_fname)
        return 0;
    const char *f = di.dli_fname;
    if (!f[0]) /* the main program, when dladdr leaves its name empty */
        return 1;
    if (strstr(f, "libopenblas") && getenv("CURVD_SHIM_BLAS"))
        return 1; /* OpenBLAS sizes its own default pool for N cores too */
    return strncmp(f, "/usr/", 5) && strncmp(f, "/lib", 4);
}

#define NEXT(name) static __typeof__(name) *real; if (!real) real = (__typeof__(name) *)dlsym(RTLD_NEXT, #name)

long sysconf(int name)
{
    NEXT(sysconf);
    if ((name == _SC_NPROCESSORS_ONLN || name == _SC_NPROCESSORS_CONF) &&
        project_caller(__builtin_return_address(0)))
        return shim_cpus();
    return real(name);
}

int get_nprocs(void)
{
    NEXT(get_nprocs);
    return project_caller(__builtin_return_address(0)) ? shim_cpus() : real();
}

int get_nprocs_conf(void)
{
    NEXT(get_nprocs_conf);
    return project_caller(__builtin_return_address(0)) ? shim_cpus() : real();
}

int sched_getaffinity(pid_t pid, size_t size, cpu_set_t *set)
{
    NEXT(sched_getaffinity);
    if (!project_caller(__builtin_return_address(0)))
        return real(pid, size, set);
    CPU_ZERO_S(size, set);
    for (int i = 0; i < shim_cpus(); i++)
        CPU_SET_S(i, size, set);
    return 0;
}

static atomic_int blas_set; /* 0: never set through the shim */

/* OpenBLAS may be loaded after the shim, local to a dlopen'ed library
 * (Python's ctypes loads libcurvd.so RTLD_LOCAL): RTLD_NEXT misses it then. */
void openblas_set_num_threads(int n)
{
    typedef void set_fn(int);
    set_fn *real = (set_fn *)dlsym(RTLD_NEXT, "openblas_set_num_threads");
    void *h = real ? NULL : dlopen("libopenblas.so.0", RTLD_NOW | RTLD_NOLOAD);
    if (h) { /* (only then: ThreadSanitizer's dlopen hook rescans the libraries) */
        real = (set_fn *)dlsym(h, "openblas_set_num_threads");
        dlclose(h);
    }
    atomic_store(&blas_set, n < 1 ? 1 : n);
    if (real)
        real(n);
}

int openblas_get_num_threads(void)
{
    int n = atomic_load(&blas_set);
    return n ? n : shim_cpus();
}
