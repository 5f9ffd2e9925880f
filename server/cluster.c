/* cluster.c - detecting mpirun, loading and joining the MPI transport
 * plugin, the cv_comm over it (API in cluster.h). */
#include "server/cluster.h"

#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "server/mpi_plugin.h"

struct cv_cluster {
    void *lib;
    const cv_mpi_plugin *fn;
    cv_comm comm;
};

int cv_cluster_launched_size(void)
{
    static const char *const vars[] = {"OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMI_SIZE"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        const char *v = getenv(vars[i]);
        if (v && *v)
            return atoi(v) > 1 ? atoi(v) : 1;
    }
    return 1;
}

/* $CURVD_MPI_PLUGIN, else curvd-mpi.so in the directory of this binary. */
static void plugin_path(char *out, size_t len)
{
    const char *env = getenv("CURVD_MPI_PLUGIN");
    if (env && *env) {
        snprintf(out, len, "%s", env);
        return;
    }
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    exe[n > 0 ? n : 0] = 0;
    char *slash = strrchr(exe, '/');
    if (slash)
        slash[1] = 0;
    snprintf(out, len, "%scurvd-mpi.so", slash ? exe : "./");
}

cv_cluster *cv_cluster_join(double rank_timeout_s, cv_err *e)
{
    char path[PATH_MAX + 16];
    plugin_path(path, sizeof path);
    cv_cluster *cl = cv_err_calloc(sizeof *cl, "cluster", e);
    if (!cl)
        return NULL;
    /* RTLD_GLOBAL: OpenMPI's own components resolve libmpi's symbols */
    cl->lib = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
    cv_mpi_plugin_fn get = cl->lib ? (cv_mpi_plugin_fn)dlsym(cl->lib, CV_MPI_PLUGIN_SYMBOL) : NULL;
    if (!get) {
        cv_err_set(e, CV_EINVAL, "mpi_unavailable", "",
                   "started by mpirun with %d ranks, but the MPI plugin %s cannot be loaded "
                   "(%s): build curvd where libopenmpi-dev is installed (make builds "
                   "curvd-mpi.so beside curvd) or set CURVD_MPI_PLUGIN",
                   cv_cluster_launched_size(), path, dlerror());
        if (cl->lib)
            dlclose(cl->lib);
        free(cl);
        return NULL;
    }
    cl->fn = get();
    if (cl->fn->init(rank_timeout_s, &cl->comm.rank, &cl->comm.size, e)) {
        free(cl); /* the library stays loaded: MPI may hold threads */
        return NULL;
    }
    cl->comm.allreduce = cl->fn->allreduce;
    cl->comm.allgather_rows = cl->fn->allgather_rows;
    cl->comm.bcast = cl->fn->bcast;
    cl->comm.stats = cl->fn->stats;
    return cl;
}

const cv_comm *cv_cluster_comm(const cv_cluster *cl) { return cl ? &cl->comm : NULL; }
int cv_cluster_rank(const cv_cluster *cl) { return cl ? cl->comm.rank : 0; }
int cv_cluster_size(const cv_cluster *cl) { return cl ? cl->comm.size : 1; }
int cv_cluster_alive(const cv_cluster *cl) { return cl ? cl->fn->alive() : 1; }
int cv_cluster_broken(const cv_cluster *cl) { return cl ? cl->fn->broken() : 0; }

int cv_cluster_command(cv_cluster *cl, void *buf, size_t bytes, cv_err *e)
{
    return cl->fn->command(buf, bytes, e);
}

int cv_cluster_send(cv_cluster *cl, int to, const void *buf, size_t bytes, cv_err *e)
{
    return cl->fn->send(to, buf, bytes, e);
}

int cv_cluster_recv(cv_cluster *cl, void *buf, size_t bytes, cv_err *e)
{
    return cl->fn->recv(buf, bytes, e);
}

void cv_cluster_leave(cv_cluster *cl)
{
    if (!cl)
        return;
    cl->fn->finish();
    free(cl);
}
