package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"syscall"
)

const (
	diskDev   = "/dev/vda"
	dataDir   = "/data"
	probeSize = 1 << 20 // bytes read to decide whether a disk is blank
)

// signature is a magic number that marks a disk as in use.
type signature struct {
	name  string
	off   int
	magic string
}

// signatures are checked before anything else: a disk that has any of them,
// or any non-zero byte in the first probeSize bytes, is never formatted.
var signatures = []signature{
	{"ext2/3/4", 1080, "\x53\xef"}, // s_magic 0xEF53, superblock at 1024
	{"XFS", 0, "XFSB"},
	{"LUKS", 0, "LUKS\xba\xbe"},
	{"squashfs", 0, "hsqs"},
	{"GPT partition table", 512, "EFI PART"},
	{"LVM2", 536, "LVM2 001"},
	{"swap", 4086, "SWAPSPACE2"},
	{"swap", 4086, "SWAP-SPACE"},
	{"ISO 9660", 0x8001, "CD001"},
	{"btrfs", 0x10040, "_BHRfS_M"},
	{"MBR boot sector", 510, "\x55\xaa"},
}

// diskContent says what the first bytes of a disk hold: "" for a blank disk
// (all zero), "ext2/3/4" for a file system we mount, another name for
// anything else. A disk shorter than the superblock is never blank.
func diskContent(head []byte) string {
	for _, s := range signatures {
		if len(head) >= s.off+len(s.magic) && string(head[s.off:s.off+len(s.magic)]) == s.magic {
			return s.name
		}
	}
	if len(head) < 2048 {
		return "a disk too small for ext4"
	}
	if i := bytes.IndexFunc(head, func(r rune) bool { return r != 0 }); i >= 0 {
		return fmt.Sprintf("unrecognized data (first non-zero byte at offset %d)", i)
	}
	return ""
}

// PCI IDs of virtio devices (virtio 1.x spec, 4.1.2): 0x1040+type for
// modern devices, the old transitional IDs for the rest.
var (
	virtioNetIDs = []string{"0x1041", "0x1000"}
	virtioBlkIDs = []string{"0x1042", "0x1001"}
)

// pciHas reports whether the PCI bus has a device of vendor 0x1af4 (virtio)
// with one of the device IDs.
func pciHas(ids []string) bool {
	devs, _ := filepath.Glob("/sys/bus/pci/devices/*")
	for _, d := range devs {
		v, _ := os.ReadFile(filepath.Join(d, "vendor"))
		id, _ := os.ReadFile(filepath.Join(d, "device"))
		if strings.TrimSpace(string(v)) == "0x1af4" && slices.Contains(ids, strings.TrimSpace(string(id))) {
			return true
		}
	}
	return false
}

// waitFor polls until p exists or d has passed.
func waitFor(p string, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		if _, err := os.Stat(p); err == nil {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// errNoDisk means there is no virtio disk; not a failure.
var errNoDisk = errors.New("no virtio disk")

// setupDisk mounts the virtio disk at /data, formatting it first if it is
// blank. It returns whether /data is writable.
func (in *initProc) setupDisk() (writable bool, err error) {
	if !pciHas(virtioBlkIDs) {
		return false, errNoDisk
	}
	if !waitFor(diskDev, 2*time.Second) {
		return false, fmt.Errorf("virtio-blk device present but %s did not appear", diskDev)
	}
	ro := false
	if b, err := os.ReadFile("/sys/block/vda/ro"); err == nil {
		ro = strings.TrimSpace(string(b)) == "1"
	}
	f, err := os.Open(diskDev)
	if err != nil {
		return false, fmt.Errorf("open %s: %w", diskDev, err)
	}
	head := make([]byte, probeSize)
	n, err := io.ReadFull(f, head)
	f.Close()
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return false, fmt.Errorf("read %s: %w", diskDev, err)
	}
	switch c := diskContent(head[:n]); c {
	case "ext2/3/4":
	case "":
		if ro {
			return false, fmt.Errorf("%s is blank and read-only: not mounted", diskDev)
		}
		in.say("formatting blank %s as ext4", diskDev)
		start := time.Now()
		if err := in.runQuiet("mkfs.ext4", "-F", "-q", diskDev); err != nil {
			return false, err
		}
		in.debugf("mkfs.ext4 took %v", time.Since(start))
	default:
		return false, fmt.Errorf("%s holds %s: not formatting or mounting it", diskDev, c)
	}
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		return false, err
	}
	flags := uintptr(syscall.MS_NOATIME)
	if ro {
		flags |= syscall.MS_RDONLY
	}
	err = syscall.Mount(diskDev, dataDir, "ext4", flags, "")
	if err != nil && ro {
		// A read-only disk whose journal needs recovery mounts only
		// without replaying it.
		err = syscall.Mount(diskDev, dataDir, "ext4", flags, "noload")
	}
	if err != nil {
		return false, fmt.Errorf("mount %s on %s: %w", diskDev, dataDir, err)
	}
	if ro {
		in.say("%s is read-only: mounted read-only on %s", diskDev, dataDir)
	}
	return !ro, nil
}

// unmountData flushes and unmounts /data, or at least makes it read-only.
func unmountData() error {
	syscall.Sync()
	if err := syscall.Unmount(dataDir, 0); err == nil || errors.Is(err, syscall.EINVAL) {
		return nil // EINVAL: not mounted
	}
	if err := syscall.Mount("", dataDir, "", syscall.MS_REMOUNT|syscall.MS_RDONLY, ""); err != nil {
		return fmt.Errorf("unmount %s: %w", dataDir, err)
	}
	return nil
}
