package replicate

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"govmm/replicate/stream"
	"govmm/vmm"
)

// DiskLog is the primary's side of disk mirroring (invariant 5) for one
// disk: it reads the disk for the initial copy, and records the guest's
// writes so that the checkpoint covering them carries them to the
// standby. The primary's own disk is written at once by the device; the
// standby applies an epoch's writes only when its checkpoint commits, and
// syncs them before acknowledging, so a failover finds its disk matching
// its memory, and every write a client was told about (its reply was held
// until that ack) is on the standby's disk.
//
// Record and RecordZero are the virtio-blk OnWrite and OnZero hooks
// (device worker goroutine); Take runs at each checkpoint's cut with the
// device quiesced, and between pre-copy rounds.
type DiskLog struct {
	src     io.ReaderAt
	size    int64
	fenced  atomic.Bool   // sticky: AllowWrite refuses every write
	written atomic.Uint64 // bytes of writes recorded, in all
	zeroed  atomic.Uint64 // bytes of zero runs recorded, in all

	mu       sync.Mutex // guards the fields below
	armed    bool
	cur      []DiskWrite
	cost     uint64        // of cur, toward MaxEpochDiskBytes
	pressure chan struct{} // signalled once an epoch's writes pass PressureDiskBytes
}

// DiskWrite is one guest write: Data at Off, or, with Zero > 0, a zero
// run of Zero bytes at Off (a discard or write-zeroes; Data nil).
type DiskWrite struct {
	Off  int64
	Data []byte
	Zero int64
}

// MaxEpochDiskBytes bounds what one epoch's writes may cost: what one
// checkpoint can (stream.MaxCheckpointDisk). A write costs its bytes, a
// zero run stream.ZeroCost of its length (64 bytes a MiB), so a guest
// may discard its whole disk in one epoch. A guest that writes more in
// one epoch fails the disk write (the guest sees an I/O error) rather
// than the VMM growing without bound; PressureDiskBytes makes that rare
// by ending the epoch early.
const MaxEpochDiskBytes = stream.MaxCheckpointDisk

// PressureDiskBytes of writes in one epoch make the replicator take the
// next checkpoint at once instead of at the epoch's end.
const PressureDiskBytes = MaxEpochDiskBytes / 4

// ErrDiskEpochFull is returned by Record past MaxEpochDiskBytes.
var ErrDiskEpochFull = errors.New("too much disk writing in one epoch for the checkpoint")

// NewDiskLog is the log of a disk whose image src holds size bytes: the
// initial sync copies it to the standby from there.
func NewDiskLog(src io.ReaderAt, size int64) *DiskLog {
	return &DiskLog{src: src, size: size, pressure: make(chan struct{}, 1)}
}

// Size is the disk's size in bytes.
func (d *DiskLog) Size() int64 { return d.size }

// extent says what the disk holds from off on, up to until (at most end):
// a hole (it reads as zeros, and the initial copy sends it as a zero run
// without reading it) or data. An image that cannot tell (a block device,
// a file system without SEEK_DATA, a source that is no file) is data.
// Only the file's offset moves: the device reads and writes at explicit
// offsets.
func (d *DiskLog) extent(off, end int64) (hole bool, until int64) {
	f, ok := d.src.(interface{ Fd() uintptr })
	if !ok {
		return false, end
	}
	fd := int(f.Fd())
	data, err := unix.Seek(fd, off, unix.SEEK_DATA)
	switch {
	case errors.Is(err, unix.ENXIO): // no data from off to the end of the file
		return true, end
	case err != nil:
		return false, end
	case data > off:
		return true, min(data, end)
	}
	h, err := unix.Seek(fd, off, unix.SEEK_HOLE)
	if err != nil || h <= off {
		return false, end
	}
	return false, min(h, end)
}

// Pressure is signalled when the current epoch's writes pass
// PressureDiskBytes.
func (d *DiskLog) Pressure() <-chan struct{} { return d.pressure }

// ErrDiskFenced is why a fenced VMM's disk refuses writes.
var ErrDiskFenced = errors.New("disk fenced: this VMM never writes the guest's disk again")

// AllowWrite is the virtio-blk AllowWrite hook (device worker): nil until
// Fence, ErrDiskFenced for good after.
func (d *DiskLog) AllowWrite() error {
	if d.fenced.Load() {
		return ErrDiskFenced
	}
	return nil
}

// Fence makes the disk refuse every later write (a fenced VMM, DESIGN.md
// invariant 8): the guest sees an I/O error and the image stays as it
// was, for inspection.
func (d *DiskLog) Fence() { d.fenced.Store(true) }

// Record keeps a copy of a write while replication is on.
func (d *DiskLog) Record(off int64, p []byte) error {
	return d.record(DiskWrite{Off: off, Data: p}, uint64(len(p)))
}

// RecordZero keeps a zero run of n bytes at off while replication is on:
// the guest discarded or zeroed them, and the image reads as zeros there.
// A run that follows the last one recorded extends it.
func (d *DiskLog) RecordZero(off, n int64) error {
	return d.record(DiskWrite{Off: off, Zero: n}, stream.ZeroCost(n))
}

// Zeroed is how many bytes of zero runs RecordZero has recorded while
// armed (discarded or zeroed by the guest), since the log was made.
func (d *DiskLog) Zeroed() uint64 { return d.zeroed.Load() }

// Written is how many bytes of guest writes Record has recorded while
// armed, since the log was made.
func (d *DiskLog) Written() uint64 { return d.written.Load() }

func (d *DiskLog) record(w DiskWrite, cost uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.armed {
		return nil
	}
	if k := len(d.cur) - 1; w.Zero > 0 && k >= 0 && d.cur[k].Zero > 0 && d.cur[k].Off+d.cur[k].Zero == w.Off {
		// Extending the last run costs what the longer run costs.
		last := &d.cur[k]
		cost = stream.ZeroCost(last.Zero+w.Zero) - stream.ZeroCost(last.Zero)
		if d.cost+cost > MaxEpochDiskBytes {
			return ErrDiskEpochFull
		}
		last.Zero += w.Zero
		d.zeroed.Add(uint64(w.Zero))
	} else {
		if d.cost+cost > MaxEpochDiskBytes {
			return ErrDiskEpochFull
		}
		if w.Data != nil {
			w.Data = append([]byte(nil), w.Data...)
		}
		d.written.Add(uint64(len(w.Data)))
		d.zeroed.Add(uint64(w.Zero))
		d.cur = append(d.cur, w)
	}
	d.cost += cost
	if d.cost >= PressureDiskBytes {
		select {
		case d.pressure <- struct{}{}:
		default:
		}
	}
	return nil
}

// Arm starts recording, before the initial copy reads the disk: from then
// on every write reaches the standby after the copy of the blocks it
// touches. Disarm stops it.
func (d *DiskLog) Arm() {
	d.mu.Lock()
	d.armed, d.cur, d.cost = true, nil, 0
	d.mu.Unlock()
}

// Disarm stops recording and drops what was recorded.
func (d *DiskLog) Disarm() {
	d.mu.Lock()
	d.armed, d.cur, d.cost = false, nil, 0
	d.mu.Unlock()
}

// Take returns and clears the writes recorded since the last Take.
func (d *DiskLog) Take() []DiskWrite {
	d.mu.Lock()
	defer d.mu.Unlock()
	w := d.cur
	d.cur, d.cost = nil, 0
	return w
}

// takeAll takes every disk's writes, in disk order.
func takeAll(disks []*DiskLog) [][]DiskWrite {
	out := make([][]DiskWrite, len(disks))
	for i, d := range disks {
		out[i] = d.Take()
	}
	return out
}

// sendWrites adds writes (by disk number) to t's open checkpoint.
func sendWrites(t Transport, writes [][]DiskWrite) error {
	for i, ws := range writes {
		for _, w := range ws {
			var err error
			if w.Zero > 0 {
				err = t.SendDiskZero(i, w.Off, w.Zero)
			} else {
				err = t.SendDisk(i, w.Off, w.Data)
			}
			if err != nil {
				return fmt.Errorf("disk %d: %w", i, err)
			}
		}
	}
	return nil
}

// DiskSize is the size of a disk image: a regular file's length, or a
// block device's capacity (BLKGETSIZE64: stat says 0 for those).
func DiskSize(f *os.File) (int64, error) {
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	if fi.Mode()&os.ModeDevice == 0 {
		return fi.Size(), nil
	}
	// BLKGETSIZE64 fills a u64; on the 64-bit hosts govmm runs on (KVM on
	// x86-64), IoctlGetInt's int is that wide.
	n, err := unix.IoctlGetInt(int(f.Fd()), unix.BLKGETSIZE64)
	if err != nil {
		return 0, fmt.Errorf("%s: BLKGETSIZE64: %w", f.Name(), err)
	}
	return int64(n), nil
}

// cutState is a checkpoint's machine state, taken at a consistent cut
// (inside Machine.WithPaused), with the disks' writes since the previous
// Take: together they are the checkpoint's state payload and Disk frames.
// meanwhile (if not nil) runs at the same cut while the vCPUs read their
// registers (Machine.EncodeStateWhile): a checkpoint's harvest and copy.
func cutState(m *vmm.Machine, disks []*DiskLog, meanwhile func() error) ([]byte, [][]DiskWrite, error) {
	raw, err := m.EncodeStateWhile(meanwhile)
	if err != nil {
		return nil, nil, err
	}
	return raw, takeAll(disks), nil
}

// decodeState decodes a checkpoint's machine state and checks that m
// could resume it (vmm.Machine.CheckState: shape, devices, the CPU
// features the guest uses, its TSC rate). A standby calls it before it
// acknowledges the checkpoint, so a state it could not run is refused
// while the source still has the guest.
func decodeState(m *vmm.Machine, b []byte) (*vmm.MachineState, error) {
	var st vmm.MachineState
	if err := st.UnmarshalBinary(b); err != nil {
		return nil, err
	}
	if err := m.CheckState(&st); err != nil {
		return nil, err
	}
	return &st, nil
}
