# curvd build (GNU make).  `make help` prints this block.
#
# Targets:
#   make                  build build/curvd; installs nothing (a missing Debian
#                         package is named with its apt-get line, see `make deps`)
#   make run [ARGS=...]   install missing packages (scripts/deps.sh), build, serve
#                         the demo on 127.0.0.1:8080 (ARGS: extra `curvd serve` flags)
#   make test             install missing packages, build, then test-unit,
#                         unit-portable and e2e
#   make test-unit        build and run the Check suites tests/test_*.c (alias: unit);
#                         `make SANITIZE=address,undefined test-unit` under sanitizers
#   make build-tests      build curvd, the suites and bench_ops, run nothing (-j friendly)
#   make unit-portable    test_cnn once more, built without the AVX-512 direct kernels
#   make e2e              the end-to-end scripts tests/e2e_*.sh and tests/e2e_*.py
#   make e2e-manycore     the unit suites and e2e scripts with curvd seeing 16 CPUs (an
#                         LD_PRELOAD shim, tests/tools/manycore.sh; not in `make test`)
#   make python [PY=venv/bin/python]  install the Python packages curvd (in-process,
#                         with build/libcurvd.so) and curvd_client into PY's environment
#   make bench [BENCH_ARGS=...]  curvd vs PyTorch (bench/README.md)
#   make bench-mpi [BENCH_ARGS=...]  data-parallel speed-up under mpirun (bench/README.md)
#   make bench-kfac / bench-laplace [BENCH_ARGS=...]  Kronecker factors vs torch; a Kronecker
#                         Laplace posterior vs the factor time (bench/README.md)
#   make soak [SOAK_ARGS=...]  the load test at full size (tests/load/curvd_load.py)
#   make crash-soak [KILLS=1000]  the --state-dir crash loop of tests/e2e_persist.py
#                         (SIGKILL at random moments, then every acknowledged write
#                         checked) with KILLS kills; `make test` runs it with 60
#   make fuzz [FUZZ_SECONDS=60]  build the libFuzzer harnesses (clang, ASan+UBSan) in
#                         build/fuzz/ and run each for FUZZ_SECONDS, FUZZ_JOBS (2) at a time
#                         (tests/fuzz/README.md); not in `make test`
#   make deps             install (as root) or name the missing build packages
#   make clean            remove build/ (every build directory below it)
#
# Variables (on the command line, e.g. `make CC=clang CFLAGS=-O0`):
#   CC=clang              another C compiler; GCC-only flags are left out
#   CFLAGS=...            added after the project's flags, so CFLAGS=-O0 or
#                         CFLAGS=-march=native win; includes and -std stay
#   OPT=-O2  DEBUG=-g     the default optimisation and debug flags
#   LDFLAGS=...           extra link flags
#   SANITIZE=address,undefined   -fsanitize=... build in build/san-address-undefined/
#   SANITIZE=thread       ThreadSanitizer build in build/san-thread/ (OpenBLAS
#                         reports suppressed by tests/tsan.supp)
#   WERROR=1              warnings are errors (.ci/run)
#   B=dir                 build directory [build, or build/san-... with SANITIZE]
# Changing CC or any flag rebuilds everything in that build directory.

PKGS      := openblas check libcjson libmicrohttpd
LIB_PKGS  := openblas libcjson libmicrohttpd
PY        := /usr/bin/python3
comma     := ,
empty     :=
space     := $(empty) $(empty)

# ---- flags, in layers: FINAL_CFLAGS = STD WARN OPT DEBUG VECT SAN DEFS CFLAGS DEPS
STD       := -std=c11 -D_GNU_SOURCE -pthread
# position-independent objects, so that build/libcurvd.so (the in-process
# API, api/curvd.h) links the same objects as curvd; without semantic
# interposition GCC still inlines and calls directly within the library
PIC       := -fPIC $(call cc_flag,-fno-semantic-interposition)
WARN      := -Wall -Wextra -Wshadow -Wno-unused-parameter
OPT       := -O2
DEBUG     := -g
CFLAGS    ?=
LDFLAGS   ?=
DEFS      :=
ifneq ($(WERROR),)
WARN      += -Werror
endif

# Elementwise kernels (activations, max pooling) vectorize only with these:
# GCC's -O2 cost model refuses loops of unknown length, and with trapping math
# it will not turn a float compare into a select.  Results are bit-identical
# (no reassociation, no FMA contraction without -march); we never read FP flags.
# A compiler that does not know a flag (clang: -fvect-cost-model) goes without.
cc_flag   = $(shell $(CC) -Werror $(1) -x c -c -o /dev/null /dev/null >/dev/null 2>&1 && echo $(1))
VECT      := $(call cc_flag,-fvect-cost-model=dynamic) $(call cc_flag,-fno-trapping-math)

SAN_FLAGS :=
SAN_ENV   :=
ifneq ($(SANITIZE),)
SAN_LIST  := $(subst $(comma),$(space),$(SANITIZE))
SAN_FLAGS := -fsanitize=$(SANITIZE) -fno-omit-frame-pointer
ifneq ($(filter undefined,$(SAN_LIST)),)
# a UBSan finding stops the program (and so fails its test)
SAN_FLAGS += -fno-sanitize-recover=undefined
endif
# Check forks a child per test; a sanitizer report makes the child exit non-zero
# (LeakSanitizer included: it runs when the child exits), so the test fails.
# allocator_may_return_null: tests ask for impossible sizes and expect NULL.
SAN_ENV   := ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1:exitcode=23 \
             UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
             TSAN_OPTIONS=halt_on_error=1:allocator_may_return_null=1:exitcode=66:suppressions=$(CURDIR)/tests/tsan.supp \
             CK_TIMEOUT_MULTIPLIER=10
endif
ifneq ($(origin B),command line)
B         := build$(if $(SANITIZE),/san-$(subst $(space),-,$(SAN_LIST)))
endif

DEPS_CFLAGS  := -I. $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
FINAL_CFLAGS  = $(STD) $(PIC) $(WARN) $(OPT) $(DEBUG) $(VECT) $(SAN_FLAGS) $(DEFS) $(CFLAGS) \
                $(DEPS_CFLAGS) $(GEN_CFLAGS)
FINAL_LDFLAGS = $(SAN_FLAGS) $(LDFLAGS)
LDLIBS    := $(shell pkg-config --libs $(LIB_PKGS) 2>/dev/null) -llapacke -lm -pthread
CHECKLIBS := $(shell pkg-config --libs check 2>/dev/null)
# header dependencies: each compile writes the headers it read to a .d file
DEPGEN     = -MMD -MP -MF $@.d

# ---- sources ---------------------------------------------------------------------------
LIB_SRC   := $(wildcard engine/*.c) $(wildcard api/*.c) $(filter-out server/main.c,$(wildcard server/*.c))
LIB_OBJ   := $(LIB_SRC:%.c=$(B)/%.o)
TEST_SRC  := $(wildcard tests/test_*.c)
TEST_BIN  := $(TEST_SRC:tests/%.c=$(B)/tests/%)
# shared test code (tests/*.c that are not suites), linked into every suite
TEST_OBJ  := $(patsubst %.c,$(B)/%.o,$(filter-out $(TEST_SRC),$(wildcard tests/*.c)))
E2E_SH    := $(filter-out tests/e2e_lib.sh,$(wildcard tests/e2e_*.sh))
E2E_PY    := $(filter-out tests/e2e_lib.py,$(wildcard tests/e2e_*.py))

# The MPI transport plugin (server/mpi_plugin.h, `mpirun -np R curvd ...`):
# built beside curvd when OpenMPI's development files are installed
# (libopenmpi-dev; `make test` installs them); curvd itself never links MPI.
MPI_CFLAGS := $(shell pkg-config --cflags ompi-c 2>/dev/null)
MPI_LIBS   := $(shell pkg-config --libs ompi-c 2>/dev/null)
MPI_PLUGIN := $(if $(shell pkg-config --exists ompi-c 2>/dev/null && echo y),$(B)/curvd-mpi.so)

.PHONY: all help deps depcheck build-tests test test-unit unit unit-portable e2e e2e-manycore run python bench bench-mpi bench-kfac bench-laplace soak crash-soak fuzz fuzz-bins clean
all: $(B)/curvd $(MPI_PLUGIN) $(B)/libcurvd.so

build-tests: $(B)/curvd $(MPI_PLUGIN) $(B)/libcurvd.so $(TEST_BIN) $(B)/bench_ops

help:
	@sed -n '3,/^$$/s/^# \{0,1\}//p' $(firstword $(MAKEFILE_LIST))

deps:
	@scripts/deps.sh build

# Plain `make` never installs: when pkg-config misses a package, deps.sh --check
# names the missing ones and the apt-get line, and the build stops.
depcheck:
	@pkg-config --exists $(PKGS) 2>/dev/null || scripts/deps.sh --check build

# Everything in $(B) is rebuilt when the compiler or a flag changes.
FLAGS_STAMP := $(B)/.flags
FLAGS_NOW    = $(CC) $(FINAL_CFLAGS) $(FINAL_LDFLAGS) $(LDLIBS) $(CHECKLIBS)
ifneq ($(filter-out clean help deps fuzz,$(or $(MAKECMDGOALS),all)),)
ifneq ($(file <$(FLAGS_STAMP)),$(strip $(FLAGS_NOW)))
$(shell mkdir -p $(B))
$(file >$(FLAGS_STAMP),$(strip $(FLAGS_NOW)))
endif
endif

$(B)/%.o: %.c $(FLAGS_STAMP) | depcheck
	@mkdir -p $(dir $@)
	$(CC) $(FINAL_CFLAGS) $(DEPGEN) -c $< -o $@

$(B)/libcurvd.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

# The in-process library (api/curvd.h): the engine and api objects, exporting
# only the curvd_* functions (api/libcurvd.map).
SO_OBJ    := $(filter $(B)/engine/% $(B)/api/%,$(LIB_OBJ))
$(B)/libcurvd.so: $(SO_OBJ) api/libcurvd.map
	$(CC) $(FINAL_CFLAGS) -shared $(FINAL_LDFLAGS) -Wl,--no-undefined \
	    -Wl,--version-script=api/libcurvd.map -o $@ $(SO_OBJ) $(LDLIBS)

$(B)/curvd: $(B)/server/main.o $(B)/libcurvd.a
	$(CC) $(FINAL_CFLAGS) $(FINAL_LDFLAGS) -o $@ $^ $(LDLIBS)

$(B)/curvd-mpi.so: server/mpi/curvd_mpi.c server/mpi_plugin.h engine/comm.h engine/err.h \
                   $(FLAGS_STAMP) | depcheck
	$(CC) $(FINAL_CFLAGS) $(MPI_CFLAGS) -fPIC -shared $(FINAL_LDFLAGS) -o $@ $< $(MPI_LIBS)

$(TEST_BIN): $(B)/tests/%: tests/%.c $(TEST_OBJ) $(B)/libcurvd.a $(FLAGS_STAMP) | depcheck
	@mkdir -p $(dir $@)
	$(CC) $(FINAL_CFLAGS) $(DEPGEN) $(FINAL_LDFLAGS) -o $@ $< $(TEST_OBJ) $(B)/libcurvd.a \
	    $(CHECKLIBS) $(LDLIBS)

$(B)/bench_ops: bench/bench_ops.c $(B)/libcurvd.a $(FLAGS_STAMP) | depcheck
	$(CC) $(FINAL_CFLAGS) $(DEPGEN) $(FINAL_LDFLAGS) -o $@ $< $(B)/libcurvd.a $(LDLIBS)

-include $(LIB_OBJ:.o=.o.d) $(TEST_OBJ:.o=.o.d) $(B)/server/main.o.d $(TEST_BIN:=.d) $(B)/bench_ops.d

# server/demo.c embeds scikit-learn's digits (python3-sklearn's data file),
# converted at build time; an empty table (synthetic fallback) when absent.
DIGITS_CSV := /usr/lib/python3/dist-packages/sklearn/datasets/data/digits.csv.gz
$(B)/gen/digits.inc: server/gen_digits.sh $(wildcard $(DIGITS_CSV))
	@mkdir -p $(dir $@)
	sh server/gen_digits.sh $(DIGITS_CSV) > $@.tmp && mv $@.tmp $@
$(B)/server/demo.o: $(B)/gen/digits.inc
$(B)/server/demo.o: GEN_CFLAGS := -I$(B)/gen

# The web dashboard (clients/dashboard), embedded into the binary by
# server/dashboard.c; served at GET / and GET /dashboard/{file}.
DASH_FILES := $(sort $(wildcard clients/dashboard/*.html clients/dashboard/*.css clients/dashboard/*.js))
$(B)/gen/dashboard_assets.inc: clients/dashboard/embed.sh $(DASH_FILES)
	@mkdir -p $(dir $@)
	sh clients/dashboard/embed.sh $(DASH_FILES) > $@.tmp && mv $@.tmp $@
$(B)/server/dashboard.o: $(B)/gen/dashboard_assets.inc
$(B)/server/dashboard.o: GEN_CFLAGS := -I$(B)/gen

# ---- tests ---------------------------------------------------------------------------
# Under SANITIZE, SAN_ENV sets the sanitizers' options and stretches Check's
# timeouts (CK_TIMEOUT_MULTIPLIER); empty otherwise.
test-unit: $(TEST_BIN)
	@set -e; for t in $(TEST_BIN); do echo "== $$t"; \
	    CK_DEFAULT_TIMEOUT=600 $(SAN_ENV) $$t; done
unit: test-unit

# The paths CPUs without AVX-512 take, on every CPU: test_cnn (Conv2d's
# im2col + sgemm) and test_linear_sparse, test_diag_exact (Linear's input
# cotangents by sgemm) once more, built without the AVX-512 kernels of
# engine/conv_direct.c and engine/linear_sparse.c.
PORTABLE_TESTS = test_cnn test_linear_sparse test_diag_exact
unit-portable:
	@$(MAKE) --no-print-directory B=$(B)/portable \
	    DEFS="-DCV_DCONV_PORTABLE -DCV_LSPARSE_PORTABLE" \
	    $(addprefix $(B)/portable/tests/,$(PORTABLE_TESTS))
	@set -e; for t in $(PORTABLE_TESTS); do echo "== $(B)/portable/tests/$$t"; \
	    CK_DEFAULT_TIMEOUT=600 $(SAN_ENV) $(B)/portable/tests/$$t; done

e2e: $(B)/curvd $(MPI_PLUGIN) $(B)/libcurvd.so $(B)/bench_ops
	@set -e; for t in $(E2E_SH); do echo "== $$t"; s=$$(date +%s); \
	    $(SAN_ENV) sh $$t $(B)/curvd; echo "-- $$t: $$(( $$(date +%s) - s )) s"; done
	@set -e; for t in $(E2E_PY); do echo "== $$t"; s=$$(date +%s); \
	    $(SAN_ENV) $(PY) $$t $(B)/curvd; echo "-- $$t: $$(( $$(date +%s) - s )) s"; done

e2e-manycore: build-tests
	@tests/tools/manycore.sh -u

test:
	@scripts/deps.sh test
	@$(MAKE) --no-print-directory all test-unit unit-portable e2e

run:
	@scripts/deps.sh run
	@$(MAKE) --no-print-directory all
	$(B)/curvd serve $(ARGS)

# `import curvd` outside the clone: libcurvd.so into the package, which pip installs
# (offline, Debian's setuptools) into the Python that PY names - a virtual
# environment's, e.g. `make python PY=venv/bin/python` (Debian's own python3 refuses
# system-wide pip installs, PEP 668).
python: $(B)/libcurvd.so
	cp $(B)/libcurvd.so clients/python/curvd/libcurvd.so
	$(PY) -m pip install --no-build-isolation --no-deps --no-index clients/python

bench:
	@scripts/deps.sh bench
	@$(MAKE) --no-print-directory all $(B)/bench_ops
	$(PY) bench/bench.py --bench-ops $(B)/bench_ops $(BENCH_ARGS)

# Data-parallel speed-up under mpirun and its scaling model (bench/README.md); not in `make test`.
bench-mpi:
	@scripts/deps.sh bench
	@$(MAKE) --no-print-directory all
	$(PY) bench/bench_mpi.py --curvd $(B)/curvd $(BENCH_ARGS)

# Kronecker factors (op kfac) against a torch implementation (bench/README.md); not in `make test`.
bench-kfac:
	@scripts/deps.sh bench
	@$(MAKE) --no-print-directory all
	$(PY) bench/bench_kfac.py --curvd $(B)/curvd $(BENCH_ARGS)

# A Kronecker Laplace posterior with prior optimization against the KFAC factor time
# (bench/README.md); not in `make test`.
bench-laplace:
	@scripts/deps.sh bench
	@$(MAKE) --no-print-directory all
	$(PY) bench/bench_laplace.py --curvd $(B)/curvd $(BENCH_ARGS)

# The load test at full size (tests/load/curvd_load.py: 200 clients x 10 jobs, 512 idle and
# 64 slow-header sockets, 10 readers of a large result); `make test` runs it small
# (tests/e2e_load.py).  SOAK_ARGS adds flags, e.g. SOAK_ARGS="--serve-arg=--max-queue=64".
soak:
	@scripts/deps.sh test
	@$(MAKE) --no-print-directory all
	ulimit -n 4096; $(PY) tests/load/curvd_load.py --curvd $(B)/curvd $(SOAK_ARGS)
# The --state-dir crash loop with many kills (tests/e2e_persist.py; `make test` runs 60).
KILLS ?= 1000
crash-soak: $(B)/curvd
	$(PY) tests/e2e_persist.py $(B)/curvd --only crash --kills $(KILLS)

# ---- fuzzing (tests/fuzz/README.md) -----------------------------------------------------
# libFuzzer harnesses tests/fuzz/fuzz_<h>.c, built with clang in build/fuzz/ (the library
# with -fsanitize=fuzzer-no-link,address,undefined; each harness linked with
# -fsanitize=fuzzer), run with the seeds of tests/fuzz/<h>/; what they add to the corpus
# goes to build/fuzz/corpus/<h>/, a finding to build/fuzz/artifacts/ (and fails the run).
FUZZ_HARNESSES := job arch safetensors multipart http
FUZZ_SECONDS   ?= 60
FUZZ_JOBS      ?= 2
FUZZ_ARGS      ?=
FUZZ_B         := build/fuzz
FUZZ_MAKE       = $(MAKE) --no-print-directory B=$(FUZZ_B) CC=clang \
                  SANITIZE=fuzzer-no-link,address,undefined
FUZZ_ENV       := ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 \
                  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
FUZZ_BIN       := $(FUZZ_HARNESSES:%=$(B)/fuzz/fuzz_%)

fuzz:
	@scripts/deps.sh fuzz
	@$(FUZZ_MAKE) -j$(FUZZ_JOBS) fuzz-bins
	@$(FUZZ_MAKE) -j$(FUZZ_JOBS) $(FUZZ_HARNESSES:%=fuzz-run-%)

fuzz-bins: $(FUZZ_BIN)

$(FUZZ_BIN): $(B)/fuzz/fuzz_%: tests/fuzz/fuzz_%.c $(B)/tests/fuzz/fuzz_common.o $(B)/libcurvd.a \
                                $(FLAGS_STAMP) | depcheck
	@mkdir -p $(dir $@)
	$(CC) $(FINAL_CFLAGS) $(DEPGEN) $(FINAL_LDFLAGS) -fsanitize=fuzzer -o $@ $< \
	    $(B)/tests/fuzz/fuzz_common.o $(B)/libcurvd.a $(LDLIBS)

-include $(FUZZ_BIN:=.d)

# One harness for FUZZ_SECONDS: the log in build/fuzz/<h>.log; prints the executions.
fuzz-run-%: $(B)/fuzz/fuzz_%
	@mkdir -p $(B)/corpus/$* $(B)/artifacts
	@echo "== fuzz $* ($(FUZZ_SECONDS) s)"
	@$(FUZZ_ENV) $< -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 \
	    -print_final_stats=1 -artifact_prefix=$(B)/artifacts/$*- $(FUZZ_ARGS) \
	    $(B)/corpus/$* tests/fuzz/$* > $(B)/$*.log 2>&1 || \
	    { tail -n 60 $(B)/$*.log; echo "fuzz $*: FINDING (input in $(B)/artifacts/)"; \
	      exit 1; }
	@awk '/^stat::number_of_executed_units/ {n=$$2} /^stat::average_exec_per_sec/ {r=$$2} \
	    END {printf "fuzz $*: %s executions (%s/s), no finding\n", n, r}' $(B)/$*.log

clean:
	rm -rf build $(filter-out build build/%,$(B))
