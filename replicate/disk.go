package replicate

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"

	"govmm/vmm"
	"govmm/vmm/devstate"
)

// DiskLog records the guest's writes to one disk during an epoch, so that
// the checkpoint covering them carries them to the standby (invariant 5).
// The primary's own disk is written at once by the device; the standby
// applies an epoch's writes only when its checkpoint commits, and syncs
// them before acknowledging, so a failover finds its disk matching its
// memory, and every write a client was told about (its reply was held
// until that ack) is on the standby's disk.
//
// Record is the virtio-blk OnWrite hook (device worker goroutine); Take
// runs at the checkpoint cut with the device quiesced.
type DiskLog struct {
	mu    sync.Mutex
	armed bool
	cur   []DiskWrite
	bytes int
}

// DiskWrite is one guest write.
type DiskWrite struct {
	Off  int64
	Data []byte
}

// MaxEpochDiskBytes bounds the writes one epoch may carry; a guest that
// writes more in one epoch fails the disk write (the guest sees an I/O
// error) rather than the VMM growing without bound.
const MaxEpochDiskBytes = 256 << 20

// ErrDiskEpochFull is returned by Record past MaxEpochDiskBytes.
var ErrDiskEpochFull = errors.New("too much disk writing in one epoch for the checkpoint")

// Record keeps a copy of a write while replication is on.
func (d *DiskLog) Record(off int64, p []byte) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.armed {
		return nil
	}
	if d.bytes+len(p) > MaxEpochDiskBytes {
		return ErrDiskEpochFull
	}
	d.cur = append(d.cur, DiskWrite{Off: off, Data: append([]byte(nil), p...)})
	d.bytes += len(p)
	return nil
}

// Arm starts recording (at the cut of the first replicated checkpoint,
// from which on the standby's copy must follow); Disarm stops it.
func (d *DiskLog) Arm() {
	d.mu.Lock()
	d.armed, d.cur, d.bytes = true, nil, 0
	d.mu.Unlock()
}

// Disarm stops recording and drops what was recorded.
func (d *DiskLog) Disarm() {
	d.mu.Lock()
	d.armed, d.cur, d.bytes = false, nil, 0
	d.mu.Unlock()
}

// Take returns and clears the writes of the epoch that just ended.
func (d *DiskLog) Take() []DiskWrite {
	d.mu.Lock()
	defer d.mu.Unlock()
	w := d.cur
	d.cur, d.bytes = nil, 0
	return w
}

// A checkpoint's state payload is an envelope: the machine state and the
// epoch's disk writes. Layout: magic "GOVMMCKP", u16 version, then with
// devstate encoding: blob machine state, u32 disk count, per disk u32
// write count and per write u64 offset and blob data.
const (
	envelopeMagic   = "GOVMMCKP"
	envelopeVersion = 1
	maxDisks        = 64
	maxWrites       = 1 << 20
)

// EncodeCheckpoint wraps a machine state and the disks' writes.
func EncodeCheckpoint(state []byte, disks [][]DiskWrite) []byte {
	var e devstate.Encoder
	e.Blob(state)
	e.U32(uint32(len(disks)))
	for _, ws := range disks {
		e.U32(uint32(len(ws)))
		for _, w := range ws {
			e.U64(uint64(w.Off))
			e.Blob(w.Data)
		}
	}
	out := append([]byte(envelopeMagic), 0, 0)
	binary.LittleEndian.PutUint16(out[8:], envelopeVersion)
	return append(out, e.Bytes()...)
}

// DecodeCheckpoint unwraps an envelope, checking every count and length.
// A payload without the envelope (a migration's final checkpoint) is a
// bare machine state with no disk writes.
func DecodeCheckpoint(b []byte) (*vmm.MachineState, [][]DiskWrite, error) {
	var st vmm.MachineState
	if !bytes.HasPrefix(b, []byte(envelopeMagic)) {
		err := st.UnmarshalBinary(b)
		return &st, nil, err
	}
	if len(b) < 10 || binary.LittleEndian.Uint16(b[8:]) != envelopeVersion {
		return nil, nil, fmt.Errorf("checkpoint envelope: version not understood")
	}
	d := devstate.NewDecoder(b[10:])
	state := d.Blob(vmm.MaxStateSize + 64)
	nd := d.U32()
	if d.Err() == nil && nd > maxDisks {
		return nil, nil, fmt.Errorf("checkpoint envelope: %d disks", nd)
	}
	var disks [][]DiskWrite
	for i := uint32(0); i < nd && d.Err() == nil; i++ {
		nw := d.U32()
		if nw > maxWrites {
			return nil, nil, fmt.Errorf("checkpoint envelope: disk %d: %d writes", i, nw)
		}
		var ws []DiskWrite
		for j := uint32(0); j < nw && d.Err() == nil; j++ {
			off := d.U64()
			data := d.Blob(MaxEpochDiskBytes)
			if off > 1<<62 {
				return nil, nil, fmt.Errorf("checkpoint envelope: disk %d: offset %#x", i, off)
			}
			ws = append(ws, DiskWrite{Off: int64(off), Data: data})
		}
		disks = append(disks, ws)
	}
	if err := d.Done(); err != nil {
		return nil, nil, fmt.Errorf("checkpoint envelope: %w", err)
	}
	if err := st.UnmarshalBinary(state); err != nil {
		return nil, nil, err
	}
	return &st, disks, nil
}

// cutState is a checkpoint's state payload, taken at a consistent cut
// (inside Machine.WithPaused): the machine state and the disks' writes
// since the previous cut.
func cutState(m *vmm.Machine, disks []*DiskLog) ([]byte, error) {
	st, err := m.SaveState()
	if err != nil {
		return nil, err
	}
	raw, err := st.MarshalBinary()
	if err != nil {
		return nil, err
	}
	writes := make([][]DiskWrite, 0, len(disks))
	for _, d := range disks {
		writes = append(writes, d.Take())
	}
	return EncodeCheckpoint(raw, writes), nil
}

// applyCheckpoint is the standby's side of cutState: it decodes the
// payload, checks that m could resume the state (CPU features, TSC rate,
// shape: refused before the checkpoint is acknowledged, so the source
// keeps a guest that could not run here), applies and syncs the disk
// writes to the standby's copies, and returns the machine state to resume
// from.
func applyCheckpoint(m *vmm.Machine, files []*os.File, payload []byte) (*vmm.MachineState, error) {
	st, writes, err := DecodeCheckpoint(payload)
	if err != nil {
		return nil, err
	}
	if err := m.CheckState(st); err != nil {
		return nil, err
	}
	if err := applyDiskWrites(files, writes); err != nil {
		return nil, err
	}
	return st, nil
}

// applyDiskWrites writes one checkpoint's writes to the standby's copies
// and syncs them, before the checkpoint is acknowledged.
func applyDiskWrites(files []*os.File, disks [][]DiskWrite) error {
	if len(disks) > len(files) {
		return fmt.Errorf("checkpoint carries writes for %d disks, the standby has %d", len(disks), len(files))
	}
	for i, ws := range disks {
		if len(ws) == 0 {
			continue
		}
		f := files[i]
		fi, err := f.Stat()
		if err != nil {
			return err
		}
		for _, w := range ws {
			if w.Off < 0 || w.Off+int64(len(w.Data)) > fi.Size() {
				return fmt.Errorf("disk %d: write at %d+%d beyond its %d bytes", i, w.Off, len(w.Data), fi.Size())
			}
			if _, err := f.WriteAt(w.Data, w.Off); err != nil {
				return fmt.Errorf("disk %d: %w", i, err)
			}
		}
		if err := f.Sync(); err != nil {
			return fmt.Errorf("disk %d: sync: %w", i, err)
		}
	}
	return nil
}
