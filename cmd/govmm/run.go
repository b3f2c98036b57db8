package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"govmm/guestimg"
	"govmm/lab"
	"govmm/replicate"
	"govmm/replicate/stream"
	"govmm/replicate/witness"
	"govmm/vmm"
)

const runUsage = `Usage: govmm run [flags] [-- CMD ARGS...]

Boots a Linux guest. With no --kernel/--initrd it boots the default guest
image (built on first use) to a shell on this terminal; press Ctrl-A x to
quit. With -- CMD, it runs CMD inside the guest, streams its output and
exits with CMD's exit status.

With --replicate-to HOST:PORT the guest is protected by a hot standby
('govmm standby --listen HOST:PORT', with the same devices): its disks and
memory are copied there, then a checkpoint is shipped every --epoch, and
the guest's network output waits for the standby's ack of the checkpoint
that covers it. A standby that is slow is waited for (the epochs stretch);
one silent for --failover-timeout is lost, and the guest runs on
unprotected (or pauses: --on-standby-loss). Settings for a link:

  link                 RTT        --epoch      --failover-timeout
  LAN, one switch      < 0.5 ms   25ms         1s-2s (default 2s)
  campus or metro      1-5 ms     50ms         3s
  WAN                  10-100 ms  100-200ms    5s-10s

The two ends use the larger of their failover timeouts. With --epoch-max
the epoch lengthens, up to that, while the guest dirties more memory than
the checkpoints keep up with, and comes back to --epoch when it calms
down. docs/STREAM.md explains the choice.

With --witness HOST:PORT ('govmm witness' on a third host; the same
--key-file) the guest is protected against split brain as well: its
output leaves only under a lease from the witness (renewed every quarter
--witness-lease), a standby takes over only after winning the next
generation there, and a VMM that learns that another one holds a newer
generation is FENCED: its guest stops for good, no frame or disk write
leaves it again, 'govmm ctl info' says so, and it exits with status 3
(when stopped; until then it stays up for ctl info and ctl snapshot). A
witness that cannot be reached at start is an error: the guest does not
boot. Without --witness, replication warns that split brain is possible
(docs/FENCING.md says when that is acceptable). Give the standby the same
--witness and --name.

Flags:
`

// runFlags are the flags of govmm run.
type runFlags struct {
	kernel, initrd, cmdline string
	kernelEntry             string // run --kernel-entry: auto, pvh or bzimage
	cmdlineBase             string // run --cmdline-base
	mem                     string
	cpus                    int
	name                    string
	net, mac                string
	publish                 listFlag
	guestIP, guestGW        string
	disks                   listFlag
	noIOEventFD             bool
	apiSock                 string
	apiSockDefault          string // how to choose another when apiSock is defaultAPISock's
	metricsListen           string // HOST:PORT
	keyFile                 string
	startPaused             bool   // restore --paused
	dirtyTracking           string // vmm.Config.DirtyTracking
	bootTrace               bool   // run --boot-trace

	replicateTo     string // HOST:PORT
	epoch           time.Duration
	epochMax        time.Duration
	failoverTimeout time.Duration
	streamCompress  stream.Compression
	streamDeltas    bool
	streamCipher    stream.Cipher
	onStandbyLoss   string
	checkpointCopy  string
	// checkpointCoWPages is --checkpoint-cow-pages.
	checkpointCoWPages int
	// ackSpin is --ack-spin (0: never poll).
	ackSpin      time.Duration
	witness      string // HOST:PORT
	witnessLease time.Duration
	// streamSendBuffer is --stream-send-buffer (stream.Config.SendBuffer).
	streamSendBuffer int

	// Benchmark-only switches, hidden from help (see hiddenFlags).
	unsafeNoOutputBuffering bool
	nullStandby             bool
}

// hiddenFlags are benchmark-only switches: accepted, but left out of the
// user's help because they make the guest unprotected or slower.
var hiddenFlags = map[string]bool{"unsafe-no-output-buffering": true, "null-standby": true, "no-ioeventfd": true, "ack-standby-end": true}

// listFlag collects a repeatable flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error { *l = append(*l, s); return nil }

func (f *runFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.kernel, "kernel", "", "kernel to boot: a bzImage, or a vmlinux (ELF) with a PVH entry (default: the default guest image's vmlinux)")
	fs.StringVar(&f.kernelEntry, "kernel-entry", "auto", "how a bzImage is entered: `auto|pvh|bzimage`; pvh enters its uncompressed kernel through PVH, skipping the decompressor in the guest (extracted once, kept in the cache: the guest image's cache directory's pvh/; no KASLR, as with any PVH boot), bzimage runs its own decompressor, auto is pvh where the kernel has a PVH entry (CONFIG_PVH) and bzimage where not (GOVMM_LOG=info says why). A vmlinux has only its PVH entry")
	fs.StringVar(&f.initrd, "initrd", "", "initramfs (default: the default guest image's)")
	fs.StringVar(&f.cmdline, "cmdline", "", "appended to the kernel command line")
	fs.StringVar(&f.cmdlineBase, "cmdline-base", vmm.DefaultCmdline, "the kernel command line before what govmm and --cmdline add; the default's tuning ("+vmm.TunedCmdline+") saves boot time, see docs/BOOT.md")
	f.mem, f.cpus = "256M", 1
	fs.Var(memFlag{&f.mem}, "mem", "guest memory, with a K, M, G or T suffix (a bare number is MiB, as for QEMU's -m)")
	fs.Var(cpusFlag{&f.cpus}, "cpus", fmt.Sprintf("number of vCPUs, 1 to %d", vmm.MaxCPUs))
	f.registerReplication(fs)
	f.registerDevices(fs)
	fs.StringVar(&f.guestIP, "guest-ip", "", "guest eth0 address ADDR/PREFIX (default with --net user: 10.0.2.15/24)")
	fs.StringVar(&f.guestGW, "guest-gw", "", "guest default gateway (default with --net user: 10.0.2.2)")
	fs.BoolVar(&f.bootTrace, "boot-trace", false, "when the guest says it is ready, print on stderr where boot time went: VMM setup, kernel decompression, kernel init, initramfs unpack, /init to ready")
}

// registerReplication registers the flags that protect a running guest,
// shared by run and standby (which re-protects the guest it took over).
func (f *runFlags) registerReplication(fs *flag.FlagSet) {
	fs.Var(hostPortFlag{&f.replicateTo}, "replicate-to", "keep a hot standby at `HOST:PORT` (govmm standby --listen), Remus-style")
	durationVar(fs, &f.epoch, "epoch", replicate.DefaultEpoch, replicate.CheckEpoch,
		"checkpoint interval when replicating")
	durationVar(fs, &f.epochMax, "epoch-max", 0, replicate.CheckMaxEpoch,
		"adaptive epochs: while the guest dirties so much memory that checkpoints fall behind, lengthen the epoch up to this `duration`, and shorten it back to --epoch as the load falls; held output waits at most this plus a pause and an ack while the standby keeps up (default 0: every epoch is --epoch)")
	f.onStandbyLoss = replicate.OnStandbyLossContinue
	fs.Var(choiceFlag{&f.onStandbyLoss, []string{replicate.OnStandbyLossContinue, replicate.OnStandbyLossPause}}, "on-standby-loss",
		"when the standby is lost: continue (unprotected, logged loudly) or pause (until 'govmm ctl unreplicate' runs it on unprotected, or 'ctl replicate' protects it anew)")
	f.checkpointCopy = string(replicate.CopyAuto)
	fs.Var(choiceFlag{&f.checkpointCopy, []string{string(replicate.CopyAuto), string(replicate.CopyStop), string(replicate.CopyCoW)}}, "checkpoint-copy",
		"how a checkpoint copies the dirty pages: cow (write-protect them in the pause and copy them after the resume, a write to a page not yet copied waiting for its copy: a pause that does not grow with the dirty set, but the copy then delays the ack; needs userfaultfd write-protect), stop (copy them with the guest stopped) or auto (per checkpoint: stop below --checkpoint-cow-pages dirty pages, where its pause is at most about a millisecond longer and its ack sooner, cow from there on; stop everywhere where the host lacks cow, said in the log)")
	f.checkpointCoWPages = replicate.DefaultCoWPages
	fs.Var(pagesFlag{&f.checkpointCoWPages, replicate.CheckCoWPages}, "checkpoint-cow-pages",
		"with --checkpoint-copy auto: a checkpoint of at least this many dirty pages copies on write, a smaller one with the guest stopped (the default is where copy-on-write's pause plus time to ack fell below stop-and-copy's in govmm bench checkpoint; lower it to favour short pauses, raise it to favour output delay)")
	durationVar(fs, &f.ackSpin, "ack-spin", 0, stream.CheckSpin,
		"after each checkpoint goes out, poll the connection up to this long for the standby's ack before sleeping until it comes (e.g. 300us), while at least a quarter of the acks come within it: held output can leave sooner where a wakeup is dear (0.1-0.8 ms on a VM whose idle CPUs halt); the CPU it spends is the primary's, taken from the guest where they share one; 0 (the default) never polls: measured, it helped small unkeyed checkpoints and not keyed ones (docs/STREAM.md)")
	fs.Var(sendBufferFlag{&f.streamSendBuffer}, "stream-send-buffer",
		"the replication and migration stream's socket send buffer: auto (fixed at 256 KiB where the handshake's round trip is at most 100us, the same host or a fast LAN, where a smaller buffer keeps what the standby reads in cache: on loopback checkpoints were acked in 0.93x the time, median over 24 sizes and modes in four runs; else the kernel's, autotuned), kernel (always the kernel's), or a size (256K, 1M) to fix it at; a fixed buffer caps the stream at about twice its size per round trip (docs/STREAM.md)")
	fs.Var(hostPortFlag{&f.witness}, "witness", "arbiter against split brain, `HOST:PORT` (govmm witness; needs --key-file): output leaves only under its lease, a standby takes over only after winning the next generation there")
	durationVar(fs, &f.witnessLease, "witness-lease", witness.DefaultLease, leaseCheck,
		"lease asked of the witness: a dead primary's lease runs out within it, so it bounds failover from below; about --failover-timeout")
	fs.BoolVar(&f.unsafeNoOutputBuffering, "unsafe-no-output-buffering", false, "UNSAFE, benchmarks only: let guest output out before its checkpoint is acknowledged")
	fs.BoolVar(&f.nullStandby, "null-standby", false, "benchmarks only: take checkpoints and ship them nowhere (the guest is NOT protected)")
}

// registerDevices registers the flags that describe devices and the
// control socket, shared by run, restore and standby. The guest's own
// network settings (--guest-ip, --guest-gw) are run's: a restored or
// replicated guest has them in its memory already.
func (f *runFlags) registerDevices(fs *flag.FlagSet) {
	fs.StringVar(&f.apiSock, "api-sock", "", "serve the control API (HTTP/JSON, see govmm ctl) on this unix `socket`, '' for none; run and restore serve it by default at /run/govmm/NAME.sock for --name NAME ($XDG_RUNTIME_DIR/govmm/ for a user other than root), where 'govmm ctl' looks for the default name; standby serves it only when given")
	fs.Var(hostPortFlag{&f.metricsListen}, "metrics-listen", "serve Prometheus metrics at http://HOST:PORT/metrics (TCP; e.g. 127.0.0.1:9100)")
	durationVar(fs, &f.failoverTimeout, "failover-timeout", replicate.DefaultFailoverTimeout, replicate.CheckFailoverTimeout,
		"declare the peer lost after this long without a byte from it while listening (replication; the larger of the two ends' wins)")
	fs.StringVar(&f.keyFile, "key-file", "", "pre-shared key authenticating the migration stream (mode 0600, at least 16 bytes); without it only loopback is allowed")
	fs.Var(compressFlag{&f.streamCompress}, "stream-compress", "compress the guest pages on the replication and migration stream: s2 (about 1 GB/s per core: for links slower than that), zstd (a fifth fewer bytes, 3x slower: for a WAN) or none; a primary's default is none, a standby's to take any codec (none there refuses compressed pages: the primary then sends them uncompressed)")
	fs.BoolVar(&f.streamDeltas, "stream-deltas", false, "ship guest pages the standby already holds as XOR deltas against what it holds, and pages whose bytes it holds at any page as a reference to that page, when the standby also gives it (costs a copy of guest memory on each end; new standbys get whole pages first)")
	fs.Var(cipherFlag{&f.streamCipher}, "stream-cipher", "what a keyed replication and migration stream (--key-file) seals its frames with: auto (AEGIS-128X2 where both hosts' CPUs have VAES, else AEGIS-128L where both run it, several times faster than AES-256-GCM, else AES-256-GCM), aegis-128x2 or aegis-128l (refuse a peer that will not) or aes-256-gcm (NIST-approved only; the peer follows)")
	fs.StringVar(&f.name, "name", "govmm", "VM name (the default MAC derives from it)")
	fs.StringVar(&f.net, "net", "user", "network: user (NAT on a user-mode TCP/IP stack), tap:NAME, or none")
	fs.StringVar(&f.mac, "mac", "", "guest MAC address (default: derived from --name)")
	fs.Var(&f.publish, "publish", "forward host TCP `[HOSTIP:]HOSTPORT:GUESTPORT` into the guest (--net user; repeatable)")
	fs.Var(&f.disks, "disk", "raw disk image `PATH[,ro][,nodiscard]` as a virtio-blk device (repeatable); a writable one takes the guest's discards (fstrim) as holes punched in it, unless nodiscard keeps it, and a standby's copy, fully allocated")
	f.dirtyTracking = vmm.DirtyAuto
	fs.Var(choiceFlag{&f.dirtyTracking, []string{vmm.DirtyAuto, vmm.DirtyBitmap, vmm.DirtyRing}}, "dirty-tracking",
		"how KVM reports the pages the guest writes, for replication and migration (local to this end): bitmap (per memory slot), ring (per vCPU; an error where KVM lacks it) or auto (the bitmap, which wins on the hosts measured: govmm bench checkpoint)")
	fs.BoolVar(&f.noIOEventFD, "no-ioeventfd", false, "take queue notifications through MMIO exits instead of ioeventfd (for benchmarks)")
}

// refuseFlags registers names on fs as flags that refuse any value, saying
// why: flags that other commands take and this one would otherwise ignore,
// so that a user who passes one learns that it has no effect here. They
// stay out of the command's help.
func refuseFlags(fs *flag.FlagSet, why string, names ...string) {
	for _, n := range names {
		fs.Var(refusedFlag(why), n, why)
	}
}

// refusedFlag is a flag.Value whose Set always fails with its text.
type refusedFlag string

func (r refusedFlag) String() string   { return "" }
func (r refusedFlag) Set(string) error { return errors.New(string(r)) }

// given reports which flags of fs the command line set.
func given(fs *flag.FlagSet) map[string]bool {
	set := map[string]bool{}
	fs.Visit(func(fl *flag.Flag) { set[fl.Name] = true })
	return set
}

// refuseUnused fails when the command line set one of names, which what
// the command was asked to do (why) would ignore.
func refuseUnused(fs *flag.FlagSet, why string, names ...string) error {
	set := given(fs)
	for _, n := range names {
		if set[n] {
			return usagef(fs.Name(), "--%s does not apply %s", n, why)
		}
	}
	return nil
}

func cmdRun(args []string) error {
	var f runFlags
	fs := newFlagSet("run", runUsage)
	f.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	command := fs.Args()
	if len(command) > 0 && !argsHadDashDash(args, command) {
		return usagef("run", "unexpected argument %q (put the guest command after --)", command[0])
	}
	if err := f.check(fs); err != nil {
		return err
	}
	if err := defaultAPISock(fs, &f); err != nil {
		return err
	}
	mem, _ := parseMemSize(f.mem) // checked by memFlag
	if total, err := vmm.HostMemory(); err == nil && mem > total {
		return fmt.Errorf("--mem %s: more than this host has (%s)", f.mem, ctlBytes(total))
	}
	kernel, initrd, initrdAppend, cmdline, err := bootFiles(&f, command)
	if err != nil {
		return err
	}
	defer kernel.close()
	defer initrd.close()
	filesAt := time.Now()
	var lease *witness.Lease
	if f.witness != "" {
		if lease, err = acquireLease(&f); err != nil {
			return err
		}
	}
	nics, disks, guestNet, err := f.devices()
	if err != nil {
		if lease != nil {
			lease.Close()
		}
		return err
	}
	if guestNet != "" {
		cmdline += " " + guestNet
	}
	if f.cmdline != "" {
		cmdline += " " + f.cmdline
	}

	cfg := vmm.Config{MemSize: mem, CPUs: f.cpus, Kernel: kernel.b, Initrd: initrd.b, InitrdAppend: initrdAppend, Cmdline: cmdline,
		DirtyTracking: f.dirtyTracking}
	var trace *bootTracer
	if f.bootTrace {
		trace = newBootTracer()
		trace.files = filesAt
		cfg.Console = io.MultiWriter(os.Stdout, trace.rec)
	}
	m, devs, err := newMachine(cfg, &f, nics, disks)
	if err != nil {
		if lease != nil {
			lease.Close()
		}
		return err
	}
	defer m.Close()
	defer devs.Close()
	// The lease gates the guest's output from its first frame.
	fence := devs.fence(lease, &f, m)
	if fence != nil {
		defer fence.Close()
	}
	if trace != nil {
		trace.starting = time.Now()
	}
	if err := m.Start(); err != nil {
		return err
	}
	// The guest has its copy: the files' pages stop counting as the VMM's.
	kernel.drop()
	initrd.drop()
	if trace != nil {
		go trace.report(m)
	}
	return supervise(m, &f, devs, replicate.NewNode(replicate.Booted, replicate.Takeover{}, fence))
}

// bootFiles loads the kernel and initramfs (--kernel and --initrd, or the
// default image) and returns them with the guest command's archive, when
// there is one, to follow the initramfs in guest memory (vmm.Config's
// InitrdAppend: the mapped initramfs is not copied to append it), and the
// start of the kernel command line.
func bootFiles(f *runFlags, command []string) (kernel, initrd fileBytes, initrdAppend []byte, cmdline string, err error) {
	kernel, initrd, err = loadImage(f.kernel, f.initrd, f.kernelEntry)
	if err != nil {
		return fileBytes{}, fileBytes{}, nil, "", err
	}
	if reason := lab.Emulated(); reason != "" && f.kernel == "" {
		fmt.Fprintf(os.Stderr, "govmm: warning: %s; it boots in the lab: govmm lab -- %s (see 'govmm help lab')\n",
			reason, shellJoin(os.Args))
	}
	cmdline = f.cmdlineBase
	if len(command) > 0 {
		if initrdAppend, err = guestimg.CommandArchive(command); err != nil {
			kernel.close()
			initrd.close()
			return fileBytes{}, fileBytes{}, nil, "", err
		}
		cmdline += " loglevel=1" // the command's output alone, but panics still show
	}
	return kernel, initrd, initrdAppend, cmdline, nil
}

// supervise serves the control API, starts replication when asked,
// forwards the console and signals, and waits for the machine to stop.
// It returns the guest's exit status as an exitError.
func supervise(m *vmm.Machine, f *runFlags, devs *machineDevices, node *replicate.Node) error {
	return superviseOn(nil, m, f, devs, node)
}

// superviseOn is supervise with the control API and metrics already
// served by ep (a standby's, which serve the VM from now on), or started
// here when ep is nil.
func superviseOn(ep *endpoints, m *vmm.Machine, f *runFlags, devs *machineDevices, node *replicate.Node) error {
	// A machine restored with --paused holds the operator's pause.
	be := &vmBackend{m: m, f: f, devs: devs, node: node, started: time.Now(), userPaused: f.startPaused}
	if ep == nil {
		var err error
		if ep, err = serveEndpoints(f, be); err != nil {
			m.Stop()
			m.Wait()
			return err
		}
	} else {
		ep.live.set(be)
	}
	defer ep.Close()
	if f.replicateTo != "" || f.nullStandby {
		err := startReplication(m, f, devs, node, f.replicateTo, f.epoch, f.epochMax, nil)
		switch {
		case err != nil && node.Origin() != replicate.Booted:
			reprotectFailed(err)
		case err != nil:
			m.Stop()
			m.Wait()
			return err
		}
	}
	defer func() { _ = node.Unprotect() }()
	if fence := node.Fence(); fence != nil {
		go func() {
			select {
			case <-fence.Fenced():
				fmt.Fprintf(os.Stderr, "govmm: FENCED: %v\ngovmm: the guest is stopped for good and nothing leaves this VMM again; it stays up for 'govmm ctl info' and 'ctl snapshot', and exits with status %d when stopped\n",
					fence.Err(), fencedStatus)
			case <-m.Done():
			}
		}()
	}
	restore := attachConsole(m)
	defer restore()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	sigc := make(chan syscall.Signal, 1)
	go func() {
		select {
		case s := <-sigs:
			sigc <- s.(syscall.Signal)
			m.Stop()
		case <-m.Done():
		}
	}()
	res, err := m.Wait()
	restore()
	if fence := node.Fence(); fence != nil && fence.Err() != nil {
		fmt.Fprintf(os.Stderr, "govmm: exiting FENCED (status %d): %v\n", fencedStatus, fence.Err())
		return exitError{fencedStatus}
	}
	if err != nil {
		return err
	}
	select {
	case s := <-sigc:
		if res.Reason == "stopped" {
			return exitError{128 + int(s)}
		}
	default:
	}
	if res.Status != 0 {
		return exitError{res.Status}
	}
	return nil
}

// argsHadDashDash reports whether rest came after a "--" in args (the
// flag package stops at the first non-flag too, which we refuse).
func argsHadDashDash(args, rest []string) bool {
	i := len(args) - len(rest) - 1
	return i >= 0 && args[i] == "--"
}

// loadImage reads the kernel and initramfs, building the default image
// for whichever was not given. A bzImage is swapped for its uncompressed
// kernel, entered through PVH, as entry says (pvhKernel). The caller
// closes both.
func loadImage(kernelPath, initrdPath, entry string) (kernel, initrd fileBytes, err error) {
	if kernelPath == "" || initrdPath == "" {
		img, err := defaultImage()
		if err != nil {
			return fileBytes{}, fileBytes{}, err
		}
		if kernelPath == "" {
			// The uncompressed kernel, entered through PVH: no
			// decompressor runs in the guest.
			kernelPath = img.Vmlinux
		}
		if initrdPath == "" {
			initrdPath = img.Initrd
		}
	}
	given, err := mapFile(kernelPath)
	if err != nil {
		return fileBytes{}, fileBytes{}, fmt.Errorf("kernel: %w", err)
	}
	if err := vmm.CheckKernel(given.b); err != nil {
		given.close()
		return fileBytes{}, fileBytes{}, fmt.Errorf("kernel %s: %w", kernelPath, err)
	}
	if kernel, err = pvhKernel(kernelPath, given, entry); err != nil {
		given.close()
		return fileBytes{}, fileBytes{}, err
	}
	if initrd, err = mapFile(initrdPath); err != nil {
		kernel.close()
		return fileBytes{}, fileBytes{}, fmt.Errorf("initrd: %w", err)
	}
	return kernel, initrd, nil
}

// pvhKernel returns the kernel to boot for the file at path (its bytes,
// checked by vmm.CheckKernel) under --kernel-entry entry: for a bzImage
// and auto or pvh, its uncompressed kernel from the cache
// (guestimg.PVHKernel), made on first use. The guest's own decompressor
// costs seconds of an emulated boot (docs/BOOT.md); the packed vmlinux
// is bigger to load, but loading is the VMM's copy, not the guest's work.
// auto falls back to the bzImage's own entry when there is no PVH kernel
// (no PVH note, a codec not known here, an unwritable cache), saying why
// at info level; pvh makes that an error. When it returns the cached
// kernel it has closed the bzImage's bytes; on an error they are still
// the caller's.
func pvhKernel(path string, kernel fileBytes, entry string) (fileBytes, error) {
	if vmm.IsELF(kernel.b) {
		if entry == "bzimage" {
			return fileBytes{}, fmt.Errorf("--kernel-entry bzimage: %s is a vmlinux (ELF), which has only its PVH entry", path)
		}
		return kernel, nil
	}
	if entry == "bzimage" {
		return kernel, nil
	}
	var err error
	for try := 0; try < 2; try++ {
		var p string
		if p, err = guestimg.PVHKernel(context.Background(), guestimg.DefaultCacheDir(), path, kernel.b, vmm.CheckKernel); err != nil {
			break
		}
		var k fileBytes
		if k, err = mapFile(p); err == nil {
			if err = vmm.CheckKernel(k.b); err != nil {
				k.close()
			}
		}
		if err == nil {
			slog.Info("kernel: the bzImage's uncompressed kernel, entered through PVH", "bzImage", path, "vmlinux", p)
			kernel.close() // the bzImage is not booted: 8 MB of RSS for Debian's
			return k, nil
		}
		// A damaged cache entry: made again once.
		err = fmt.Errorf("cached %s: %w", p, err)
		_ = os.Remove(p)
	}
	if entry == "pvh" {
		return fileBytes{}, fmt.Errorf("--kernel-entry pvh: %s: %w", path, err)
	}
	slog.Info("kernel: the bzImage through its own entry and decompressor", "bzImage", path, "why", err)
	return kernel, nil
}

// fileBytes is a file's contents: mapped read-only where it could be
// (mapFile), else read into the Go heap.
type fileBytes struct {
	b      []byte
	mapped bool
}

// drop gives back the pages a mapping has resident once nothing needs
// them soon (the guest has its copy): they stay in the page cache and the
// mapping stays valid, a later read faulting them in again, but the
// process's RSS no longer counts them (the kernel and initramfs were
// tens of MB of govmm's: docs/BOOT.md).
func (f fileBytes) drop() {
	if f.mapped {
		_ = unix.Madvise(f.b, unix.MADV_DONTNEED)
	}
}

// close unmaps a mapping; f.b must not be used after.
func (f fileBytes) close() {
	if f.mapped {
		_ = unix.Munmap(f.b)
	}
}

// mapFile maps a file read-only: a boot copies the kernel and the
// initramfs once, from the page cache into guest RAM, with no copy in the
// Go heap between (tens of MB: measurable at boot, docs/BOOT.md).
// Appending to the slice copies it, as for any full slice. An empty file,
// one that is not regular or one that cannot be mapped is read instead.
func mapFile(path string) (fileBytes, error) {
	f, err := os.Open(path)
	if err != nil {
		return fileBytes{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fileBytes{}, err
	}
	if fi.Size() == 0 || !fi.Mode().IsRegular() {
		b, err := os.ReadFile(path)
		return fileBytes{b: b}, err
	}
	b, err := unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_PRIVATE)
	if err != nil {
		b, err := os.ReadFile(path)
		return fileBytes{b: b}, err
	}
	// Every byte is copied into guest RAM next: fault the whole file in
	// with one call (read ahead in large requests, then mapped) rather
	// than page by page as the copy goes. In the lab, where the file
	// comes over 9p, this halved a cold load. Kernels before 5.14 do not
	// know it; then the copy faults the pages in.
	_ = unix.Madvise(b, unix.MADV_POPULATE_READ)
	return fileBytes{b: b, mapped: true}, nil
}

// escapeKey (Ctrl-A) followed by 'x' quits, as in QEMU; Ctrl-A Ctrl-A
// sends one Ctrl-A.
const escapeKey = 0x01

// attachConsole forwards stdin to the guest's UART, in raw mode when stdin
// is a terminal. The returned function restores the terminal; it is
// idempotent.
//
// A VMM that is a background job of an interactive shell ('govmm standby
// ... &') leaves its terminal alone: changing the terminal's modes would
// get it stopped by SIGTTOU, and reading it by SIGTTIN, at boot or at a
// takeover, with the guest frozen. The guest's console output still goes
// to stdout; its input stays with the shell.
func attachConsole(m *vmm.Machine) (restore func()) {
	fd := int(os.Stdin.Fd())
	old, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	isTTY := err == nil
	if isTTY && !foreground(fd) {
		return func() {}
	}
	restored := false
	restore = func() {
		if isTTY && !restored {
			restored = true
			_ = unix.IoctlSetTermios(fd, unix.TCSETS, old)
		}
	}
	if isTTY {
		raw := *old
		raw.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
		raw.Oflag &^= unix.OPOST
		raw.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
		raw.Cflag &^= unix.CSIZE | unix.PARENB
		raw.Cflag |= unix.CS8
		raw.Cc[unix.VMIN], raw.Cc[unix.VTIME] = 1, 0
		_ = unix.IoctlSetTermios(fd, unix.TCSETS, &raw)
	}
	go forwardInput(m, os.Stdin, isTTY)
	return restore
}

// foreground reports whether this process's group is the foreground
// process group of the terminal fd (tcgetpgrp(fd) == getpgrp()).
func foreground(fd int) bool {
	pgrp, err := unix.IoctlGetInt(fd, unix.TIOCGPGRP)
	return err == nil && pgrp == unix.Getpgrp()
}

func forwardInput(m *vmm.Machine, r io.Reader, escapes bool) {
	buf := make([]byte, 256)
	sawEscape := false
	for {
		n, err := r.Read(buf)
		if n > 0 {
			out := make([]byte, 0, n)
			for _, b := range buf[:n] {
				switch {
				case escapes && sawEscape:
					sawEscape = false
					if b == 'x' || b == 'X' {
						m.Stop()
						return
					}
					out = append(out, b)
				case escapes && b == escapeKey:
					sawEscape = true
				default:
					out = append(out, b)
				}
			}
			m.UART().Input(out)
		}
		if err != nil {
			return
		}
	}
}

// defaultImage builds (or finds in the cache) the default guest image.
func defaultImage() (guestimg.Image, error) {
	img, err := buildImage(context.Background(), "")
	if err != nil {
		return img, fmt.Errorf("default guest image: %w (or pass --kernel and --initrd)", err)
	}
	return img, nil
}
