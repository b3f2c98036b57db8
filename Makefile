# govmm: see README.md. Every target installs what it needs.
GO        ?= go
BIN       := bin/govmm
RACE_PKGS := ./vmm/... ./virtio/... ./internal/... ./guestimg/... ./dirtylog/... ./ctlapi/... ./replicate/...
FUZZTIME  ?= 20s

.PHONY: all build image run demo bench-failover-guest bench-wire-guest bench-migration-guest soak soak-host soak-migrations soak-failovers soak-fencing test test-kvm test-guest vet fuzz bench bench-quick clean deps

all: build

# govmm --version names the commit: Go stamps it unless -buildvcs=false,
# and this says it either way.
build:
	$(GO) build -ldflags "-X main.buildCommit=$$(git describe --always --dirty 2>/dev/null)" -o $(BIN) ./cmd/govmm

deps:
	scripts/deps.sh test

# The default guest image (kernel, busybox, modules, our guest programs),
# cached under ~/.cache/govmm; rebuilt only when its inputs change.
image: build deps
	$(BIN) image build

# The main job: boot the default guest to a shell (Ctrl-A x quits).
run: image
	$(BIN) run

# The main job: the default guest replicated to a standby on this machine
# (in the lab where this host's KVM cannot boot Linux), a client on one
# keep-alive connection, the primary SIGKILLed, the standby carrying on
# (scripts/demo.sh).
demo: deps image
	scripts/demo.sh

# Many failovers at random moments (tests with SIGKILLed primaries), then
# the real guest where Linux boots (the lab here), each run in an L1 of
# its own so that one lab crash costs one run, not the soak:
#   soak-migrations  SOAK_MIGRATIONS live migrations under load, one after
#                    the other on one guest, each checked page by page at
#                    the cut;
#   soak-failovers   SOAK_FAILOVERS SIGKILLed primaries (one boot each) with
#                    a keep-alive client carrying on; then the distribution
#                    of the failover time (SIGKILL to the first answer);
#   soak-fencing     SOAK_FENCING fencing trials with a witness, in
#                    SOAK_FENCING_RUNS boots: SIGKILL, SIGSTOP past the
#                    timeout, short SIGSTOP or a cut primary<->standby link
#                    at random moments, checked for one emitter on the
#                    wire and the client's history.
SOAK_COUNT        ?= 20
SOAK_MIGRATIONS   ?= 10
SOAK_FAILOVERS    ?= 20
SOAK_FENCING      ?= 50
SOAK_FENCING_RUNS ?= 5
SOAK_LOGS = bin/guest-tests/logs
soak: soak-host soak-migrations soak-failovers soak-fencing
soak-host: build image
	$(GO) test -count=$(SOAK_COUNT) -run 'TestReplicationFailover|TestReplicatedDiskFollowsCheckpoints' ./replicate/
	$(GO) test -count=$(SOAK_COUNT) -run 'TestReplicateAndFailover|TestReprotectAndFailOverAgain' ./cmd/govmm/
soak-migrations: build image
	GOVMM_SOAK_MIGRATIONS=$(SOAK_MIGRATIONS) scripts/guest-tests.sh -timeout 3h -run '^TestGuestMigrateUnderLoad$$'
soak-failovers: build image
	scripts/guest-tests.sh -timeout 3h -count $(SOAK_FAILOVERS) -run '^TestGuestFailoverKeepsConnection$$'
	@grep -ho --exclude='*.crashed-*.log' 'failover (SIGKILL to the first answer) [0-9.]*m\?s' \
		$(SOAK_LOGS)/cmd_govmm.TestGuestFailoverKeepsConnection.*.log | \
		awk '{v=$$NF; if (v ~ /ms$$/) {sub(/ms$$/,"",v); v/=1000} else sub(/s$$/,"",v); print v}' | sort -n | \
		awk '{a[NR]=$$1} END {if (NR) printf "soak: failover time (SIGKILL to the first answer) over %d trials: min %.3f s, median %.3f s, max %.3f s\n", NR, a[1], a[int((NR+1)/2)], a[NR]}'
soak-fencing: build image
	GOVMM_SOAK_FENCING=$$(( $(SOAK_FENCING) / $(SOAK_FENCING_RUNS) - 1 )) \
		scripts/guest-tests.sh -timeout 3h -count $(SOAK_FENCING_RUNS) -run '^TestGuestFencingStoppedPrimary$$'

vet:
	@test -z "$$(gofmt -l . | tee /dev/stderr)" || { echo "gofmt: files above need formatting"; exit 1; }
	$(GO) vet ./...

fuzz:
	GO=$(GO) scripts/fuzz.sh $(FUZZTIME) FuzzChainWalk ./virtio/
	GO=$(GO) scripts/fuzz.sh $(FUZZTIME) FuzzServeHTTP ./ctlapi/
	GO=$(GO) scripts/fuzz.sh $(FUZZTIME) '^FuzzParse$$' ./vmm/container/
	GO=$(GO) scripts/fuzz.sh $(FUZZTIME) FuzzParsePages ./vmm/container/
	GO=$(GO) scripts/fuzz.sh $(FUZZTIME) FuzzStateBody ./vmm/
	GO=$(GO) scripts/fuzz.sh $(FUZZTIME) FuzzSnapshotConfig ./vmm/
	GO=$(GO) scripts/fuzz.sh $(FUZZTIME) FuzzDecodeFrame ./replicate/stream/
	GO=$(GO) scripts/fuzz.sh $(FUZZTIME) FuzzDecodeFrame ./replicate/witness/
	GO=$(GO) scripts/fuzz.sh $(FUZZTIME) FuzzDecodeState ./replicate/witness/
	GO=$(GO) scripts/fuzz.sh $(FUZZTIME) FuzzAgainstReference ./replicate/internal/aegis/

# Unit and tiny-guest tests here; on a host without /dev/kvm the
# tiny-guest tests (which go test skips there, listing each in
# bin/kvm-skips: kvmtest.SkipsEnv) in the lab, those of KVM_RACE_PKGS
# again with -race; then the real-guest tests (TestGuest*) where Linux
# boots: on this host's KVM if it can, else in the lab.
KVM_RACE_PKGS := ./vmm ./dirtylog
test: deps vet build image
	rm -f bin/kvm-skips
	GOVMM_KVMTEST_SKIPS=$(CURDIR)/bin/kvm-skips $(GO) test -count=1 -skip '^TestGuest' ./...
	$(GO) test -count=1 -race -skip '^TestGuest' $(RACE_PKGS)
	$(MAKE) fuzz
	scripts/kvm-tests.sh -race '$(KVM_RACE_PKGS)' -skips bin/kvm-skips
	scripts/guest-tests.sh

# Only the tiny-guest KVM tests, in the lab where this host has no
# /dev/kvm (scripts/kvm-tests.sh); RUN narrows them.
test-kvm: deps build
	scripts/kvm-tests.sh -race '$(KVM_RACE_PKGS)' $(if $(filter-out ^TestGuest,$(RUN)),-run '$(RUN)')

# Only the real-guest tests (in the lab where needed); RUN narrows them.
RUN ?= ^TestGuest
test-guest: deps build image
	scripts/guest-tests.sh -run '$(RUN)'

bench: build
	scripts/deps.sh bench
	$(BIN) bench

# Every suite with tiny parameters: proves they work (CI runs it through
# bench's TestQuickSuitesProduceOutput too); the numbers mean little.
bench-quick: build
	scripts/deps.sh bench
	$(BIN) bench --quick --out $$(mktemp -d)

# The failover-guest suite (the default guest, SIGKILL/SIGSTOP of the
# primary to the first answer from the standby, without and with a
# witness) in BENCH_RUNS short runs of BENCH_TRIALS trials of each of
# BENCH_MODES (sigkill, sigstop), BENCH_WITNESS (without, with, both), each run in an
# L1 of its own, merged into one report (scripts/bench-failover-guest.sh).
BENCH_RUNS ?= 5
BENCH_TRIALS ?= 1
BENCH_MODES ?= sigkill,sigstop
BENCH_WITNESS ?= both
bench-failover-guest: build image
	scripts/bench-failover-guest.sh $(BENCH_RUNS) $(BENCH_TRIALS) $(BENCH_MODES) $(BENCH_WITNESS)

# The wire-guest suite (the stream's bytes on the wire per dirty page on
# real-guest workloads: the demo service under load, untar, sort and gzip,
# untar onto the guest's disk;
# the default guest booted once per WIRE_MODES stream mode and WIRE_RUNS
# trial, counters read WIRE_WINDOW apart) in the lab where this host's KVM
# cannot boot Linux, else here. WIRE_BASELINE=PATH replicates guests with
# another govmm binary (e.g. a build of main) beside them, side by side.
WIRE_MODES ?= none,s2,s2+deltas,zstd+deltas
WIRE_WORKLOADS ?= demo,untar,compress,disk
WIRE_RUNS ?= 1
WIRE_WINDOW ?= 10s
bench-wire-guest: build image
	lab=; if $(BIN) lab --needed; then lab="$(BIN) lab --timeout 45m --share bench/results --"; fi; \
		$$lab nice $(BIN) bench --runs $(WIRE_RUNS) --stream-modes $(WIRE_MODES) --workloads $(WIRE_WORKLOADS) --window $(WIRE_WINDOW) $(if $(WIRE_BASELINE),--baseline $(WIRE_BASELINE)) wire-guest

# Live migration of the idle default guest, govmm beside QEMU, in the lab
# where this host cannot boot Linux (one L1 CPU: the command and both
# ends of the migration share it). MIGRATION_BASELINE=PATH migrates
# another govmm binary (e.g. a build of main) beside them.
MIGRATION_RUNS ?= 3
bench-migration-guest: build image
	lab=; if $(BIN) lab --needed; then lab="$(BIN) lab --cpus 1 --timeout 30m --share bench/results --"; fi; \
		$$lab nice $(BIN) bench --runs $(MIGRATION_RUNS) $(if $(MIGRATION_BASELINE),--baseline $(MIGRATION_BASELINE)) migration-guest

clean:
	rm -rf bin
