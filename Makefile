# curvd build. `make` builds, `make test` runs every test, `make run` serves the demo.
CC      ?= cc
PKGS    := openblas check libcjson libmicrohttpd
CFLAGS  ?= -O2 -g
# Elementwise kernels (activations, max pooling) vectorize only with these:
# GCC's -O2 cost model refuses loops of unknown length, and with trapping math
# it will not turn a float compare into a select.  Results are bit-identical
# (no reassociation, no FMA contraction without -march); we never read FP flags.
CFLAGS  += -fvect-cost-model=dynamic -fno-trapping-math
CFLAGS  += -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wshadow -Wno-unused-parameter -pthread \
           -I. $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
LDLIBS  := $(shell pkg-config --libs openblas libcjson libmicrohttpd 2>/dev/null) -llapacke -lm -pthread
CHECKLIBS := $(shell pkg-config --libs check 2>/dev/null)
PY      := /usr/bin/python3
B       := build

LIB_SRC  := $(wildcard engine/*.c) $(wildcard api/*.c) $(filter-out server/main.c,$(wildcard server/*.c))
LIB_OBJ  := $(LIB_SRC:%.c=$(B)/%.o)
TEST_SRC := $(wildcard tests/test_*.c)
TEST_BIN := $(TEST_SRC:tests/%.c=$(B)/tests/%)
HDRS     := $(wildcard engine/*.h api/*.h server/*.h tests/*.h)

.PHONY: all deps test unit unit-portable e2e run bench clean
all: deps $(B)/curvd

deps:
	@scripts/deps.sh build

$(B)/%.o: %.c $(HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(B)/libcurvd.a: $(LIB_OBJ)
	ar rcs $@ $^

$(B)/curvd: $(B)/server/main.o $(B)/libcurvd.a
	$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS)

# Every test binary links the shared runner and oracles (tests/testutil.c).
$(TEST_BIN): $(B)/tests/%: tests/%.c $(B)/tests/testutil.o $(B)/libcurvd.a $(HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(B)/tests/testutil.o $(B)/libcurvd.a $(CHECKLIBS) $(LDLIBS)

# server/demo.c embeds scikit-learn's digits (python3-sklearn's data file),
# converted at build time; an empty table (synthetic fallback) when absent.
DIGITS_CSV := /usr/lib/python3/dist-packages/sklearn/datasets/data/digits.csv.gz
$(B)/gen/digits.inc: server/gen_digits.sh $(wildcard $(DIGITS_CSV))
	@mkdir -p $(dir $@)
	sh server/gen_digits.sh $(DIGITS_CSV) > $@.tmp && mv $@.tmp $@
$(B)/server/demo.o: $(B)/gen/digits.inc
$(B)/server/demo.o: CFLAGS += -I$(B)/gen

# The web dashboard (clients/dashboard), embedded into the binary by
# server/dashboard.c; served at GET / and GET /dashboard/{file}.
DASH_FILES := $(sort $(wildcard clients/dashboard/*.html clients/dashboard/*.css clients/dashboard/*.js))
$(B)/gen/dashboard_assets.inc: clients/dashboard/embed.sh $(DASH_FILES)
	@mkdir -p $(dir $@)
	sh clients/dashboard/embed.sh $(DASH_FILES) > $@.tmp && mv $@.tmp $@
$(B)/server/dashboard.o: $(B)/gen/dashboard_assets.inc
$(B)/server/dashboard.o: CFLAGS += -I$(B)/gen

unit: $(TEST_BIN)
	@set -e; for t in $(TEST_BIN); do echo "== $$t"; CK_DEFAULT_TIMEOUT=600 $$t; done

# Conv2d's im2col + sgemm path on every CPU: test_cnn once more, built without
# the direct (AVX-512) kernels of engine/conv_direct.c.
unit-portable:
	@CFLAGS="-O2 -g -DCV_DCONV_PORTABLE" $(MAKE) --no-print-directory B=$(B)/portable \
	    $(B)/portable/tests/test_cnn
	@echo "== $(B)/portable/tests/test_cnn"; CK_DEFAULT_TIMEOUT=600 $(B)/portable/tests/test_cnn

e2e: $(B)/curvd $(B)/bench_ops
	@set -e; for t in $(filter-out tests/e2e_lib.sh,$(wildcard tests/e2e_*.sh)); do echo "== $$t"; sh $$t $(B)/curvd; done
	@set -e; for t in $(filter-out tests/e2e_lib.py,$(wildcard tests/e2e_*.py)); do echo "== $$t"; $(PY) $$t $(B)/curvd; done

test:
	@scripts/deps.sh test
	@$(MAKE) --no-print-directory all unit unit-portable e2e

run:
	@scripts/deps.sh run
	@$(MAKE) --no-print-directory all
	$(B)/curvd serve $(ARGS)

$(B)/bench_ops: bench/bench_ops.c $(B)/libcurvd.a $(HDRS)
	$(CC) $(CFLAGS) -o $@ $< $(B)/libcurvd.a $(LDLIBS)

bench:
	@scripts/deps.sh bench
	@$(MAKE) --no-print-directory all $(B)/bench_ops
	$(PY) bench/bench.py --bench-ops $(B)/bench_ops $(BENCH_ARGS)

clean:
	rm -rf $(B)
