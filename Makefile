# Entry points for cbt.  The real build is meson + ninja; this file only
# strings the steps together.  See HACKING.md.

BUILD       ?= build
ASAN_BUILD  ?= build-asan
FUZZ_BUILD  ?= build-fuzz
TSAN_BUILD  ?= build-tsan
PYTHON      ?= /usr/bin/python3
FUZZ_SECONDS ?= 20
FUZZ_LONG_SECONDS ?= 300
# Warnings are errors in check and CI; `make WERROR=false` to relax locally.
WERROR      ?= true

export ASAN_OPTIONS  = detect_leaks=1:abort_on_error=0:halt_on_error=1
export UBSAN_OPTIONS = print_stacktrace=1:halt_on_error=1
# A data race fails the test (exit 66) at the first report.
export TSAN_OPTIONS  = halt_on_error=1:second_deadlock_stack=1

.PHONY: all deps build check unit tsan install-check fuzz-smoke pytest demo bench fuzz clean

all: build

deps:
	@scripts/install-deps.sh

$(BUILD)/build.ninja:
	meson setup $(BUILD) -Dwerror=$(WERROR)

build: deps $(BUILD)/build.ninja
	ninja -C $(BUILD)

$(ASAN_BUILD)/build.ninja:
	meson setup $(ASAN_BUILD) -Dwerror=$(WERROR) -Db_sanitize=address,undefined \
	    -Db_lundef=false -Dc_args=-fno-sanitize-recover=undefined

# ThreadSanitizer: its own build, needing none of the others.
$(TSAN_BUILD)/build.ninja:
	meson setup $(TSAN_BUILD) -Dwerror=$(WERROR) -Db_sanitize=thread

$(FUZZ_BUILD)/build.ninja:
	CC=clang meson setup $(FUZZ_BUILD) -Dfuzz=true -Dwerror=$(WERROR) \
	    -Db_sanitize=address,undefined -Db_lundef=false

# The whole test suite: every tier, under ASan+UBSan.
check: deps $(BUILD)/build.ninja $(ASAN_BUILD)/build.ninja $(FUZZ_BUILD)/build.ninja
	ninja -C $(BUILD)
	ninja -C $(ASAN_BUILD)
	$(MAKE) unit tsan install-check fuzz-smoke pytest

unit:
	meson test -C $(ASAN_BUILD) --print-errorlogs --suite unit

# The multi-threaded tests (suite "threads": one image read, written,
# resized and reopened from several threads; the block pipeline) under
# ThreadSanitizer, then the integration tests of the commands that run
# threads (hash and compression workers, the pipeline's writer, convert's
# writer, a live backup's release of its view) with the TSan-built cbt:
# a report exits 66 and fails the test.
# The other unit tests are single-threaded and slow under it.
TSAN_PYTEST ?= tests/integration/test_backup.py \
	tests/integration/test_backup_compress.py \
	tests/integration/test_restore_verify.py \
	tests/integration/test_convert.py tests/integration/test_commit.py \
	tests/live/test_live_backup.py
tsan: deps $(TSAN_BUILD)/build.ninja
	ninja -C $(TSAN_BUILD)
	meson test -C $(TSAN_BUILD) --print-errorlogs --suite threads
	CBT=$(CURDIR)/$(TSAN_BUILD)/src/cli/cbt $(PYTHON) -m pytest -q \
	    -p no:cacheprovider $(TSAN_PYTEST)

# libcbt as an outside program sees it: `meson install --destdir` of
# $(BUILD) into a temporary folder, examples/backup_example.c built there
# through pkg-config and run on a sample disk (tests/install/run.sh).
install-check: build
	tests/install/run.sh $(BUILD)

fuzz-smoke:
	ninja -C $(FUZZ_BUILD)
	fuzz/run.sh $(FUZZ_BUILD) $(FUZZ_SECONDS)

pytest:
	CBT=$(CURDIR)/$(ASAN_BUILD)/src/cli/cbt $(PYTHON) -m pytest -q -p no:cacheprovider tests

demo: build
	scripts/demo.sh $(BUILD)/src/cli/cbt

bench: build
	bench/run.sh $(BUILD)/src/cli/cbt

fuzz: deps $(FUZZ_BUILD)/build.ninja
	ninja -C $(FUZZ_BUILD)
	fuzz/run.sh $(FUZZ_BUILD) $(FUZZ_LONG_SECONDS)

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(FUZZ_BUILD) $(TSAN_BUILD)
