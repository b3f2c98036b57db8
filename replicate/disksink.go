package replicate

import (
	"fmt"
	"os"

	"govmm/replicate/stream"
	"govmm/virtio"
)

// diskSink is the standby's side: it applies checkpoints' disk writes to
// its copies of the guest's disks (files or block devices), as a
// stream.DiskSink. Until the first resumable checkpoint commits there is
// nothing to protect, so the initial copy goes straight to the disks;
// after that, an epoch's writes are staged in memory and applied, then
// synced, at its commit, before the ack. The Receiver's goroutine alone
// uses it.
//
// A zero run (a range that reads as zeros at the source: a hole in its
// image, or a block of zeros) is applied by punching a hole
// (FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE): a sparse file stays sparse
// and a block device that can zero a range without writing it does so,
// as qemu-img convert leaves its output sparse. Where the disk cannot
// (its file system, a block device that cannot promise zeros), zeros are
// written instead (virtio.ImageZeroer, which the guest's discards go
// through on the primary too). Either way the range reads as zeros. A
// disk kept allocated is zeroed in place instead, never punched.
type diskSink struct {
	files     []*os.File
	sizes     []int64
	resumable bool // a resumable checkpoint has been committed
	kind      stream.Kind
	direct    bool
	staged    []stagedWrite
	touched   []bool // by disk: written since the last sync
	zeroers   []virtio.ImageZeroer
	// pending is a zero run not applied yet while writing directly: runs
	// that follow one another on a disk become one hole.
	pending stagedWrite
}

// stagedWrite is w (a write, or a zero run) on disk number disk.
type stagedWrite struct {
	disk int
	w    DiskWrite
}

var _ stream.DiskSink = (*diskSink)(nil)

// newDiskSink applies to files; keep[i] keeps files[i] allocated.
func newDiskSink(files []*os.File, keep []bool) (*diskSink, error) {
	s := &diskSink{files: files, touched: make([]bool, len(files))}
	for i, f := range files {
		s.zeroers = append(s.zeroers, virtio.ImageZeroer{F: f, KeepAllocated: i < len(keep) && keep[i]})
		n, err := DiskSize(f)
		if err != nil {
			return nil, err
		}
		s.sizes = append(s.sizes, n)
	}
	return s, nil
}

// Begin implements stream.DiskSink.
func (s *diskSink) Begin(epoch uint64, kind stream.Kind) error {
	s.staged = s.staged[:0]
	s.pending = stagedWrite{}
	s.kind = kind
	s.direct = !s.resumable && kind == stream.KindInitialSync
	return nil
}

// check refuses a write of n bytes at off that is not on one of the disks.
func (s *diskSink) check(disk int, off, n int64) error {
	if disk >= len(s.files) {
		return fmt.Errorf("disk %d: the standby has %d disks", disk, len(s.files))
	}
	if off < 0 || n < 0 || off+n > s.sizes[disk] {
		return fmt.Errorf("disk %d: write at %d+%d beyond its %d bytes", disk, off, n, s.sizes[disk])
	}
	return nil
}

// StageWrite implements stream.DiskSink.
func (s *diskSink) StageWrite(disk int, off int64, data []byte) error {
	if err := s.check(disk, off, int64(len(data))); err != nil {
		return err
	}
	if s.direct {
		if err := s.flushPending(); err != nil {
			return err
		}
		return s.write(disk, off, data)
	}
	s.staged = append(s.staged, stagedWrite{disk: disk, w: DiskWrite{Off: off, Data: append([]byte(nil), data...)}})
	return nil
}

// StageZero implements stream.DiskSink: a run that follows the last
// staged (or pending) one on the same disk extends it.
func (s *diskSink) StageZero(disk int, off, n int64) error {
	if err := s.check(disk, off, n); err != nil {
		return err
	}
	run := stagedWrite{disk: disk, w: DiskWrite{Off: off, Zero: n}}
	if s.direct {
		if s.pending.extend(run) {
			return nil
		}
		if err := s.flushPending(); err != nil {
			return err
		}
		s.pending = run
		return nil
	}
	if k := len(s.staged); k > 0 && s.staged[k-1].extend(run) {
		return nil
	}
	s.staged = append(s.staged, run)
	return nil
}

// extend makes the zero run w cover run too, if run follows it on the
// same disk.
func (w *stagedWrite) extend(run stagedWrite) bool {
	if w.w.Zero == 0 || w.disk != run.disk || w.w.Off+w.w.Zero != run.w.Off {
		return false
	}
	w.w.Zero += run.w.Zero
	return true
}

// flushPending applies the pending zero run, if any.
func (s *diskSink) flushPending() error {
	p := s.pending
	s.pending = stagedWrite{}
	if p.w.Zero == 0 {
		return nil
	}
	return s.zero(p.disk, p.w.Off, p.w.Zero)
}

func (s *diskSink) write(disk int, off int64, data []byte) error {
	if _, err := s.files[disk].WriteAt(data, off); err != nil {
		return fmt.Errorf("disk %d: %w", disk, err)
	}
	s.touched[disk] = true
	return nil
}

// zero makes n bytes at off on disk read as zeros: a hole punched, or
// zeros written where the disk cannot punch one.
func (s *diskSink) zero(disk int, off, n int64) error {
	s.touched[disk] = true
	if err := s.zeroers[disk].Zero(off, n); err != nil {
		return fmt.Errorf("disk %d: %w", disk, err)
	}
	return nil
}

// Commit implements stream.DiskSink: the staged writes, in order, then a
// sync of every disk written.
func (s *diskSink) Commit() error {
	if err := s.flushPending(); err != nil {
		return err
	}
	for _, sw := range s.staged {
		var err error
		if sw.w.Zero > 0 {
			err = s.zero(sw.disk, sw.w.Off, sw.w.Zero)
		} else {
			err = s.write(sw.disk, sw.w.Off, sw.w.Data)
		}
		if err != nil {
			return err
		}
	}
	s.staged = s.staged[:0]
	for i, t := range s.touched {
		if !t {
			continue
		}
		if err := s.files[i].Sync(); err != nil {
			return fmt.Errorf("disk %d: sync: %w", i, err)
		}
		s.touched[i] = false
	}
	if s.kind.Resumable() {
		s.resumable = true
	}
	return nil
}

// Abort implements stream.DiskSink.
func (s *diskSink) Abort() {
	s.staged = s.staged[:0]
	s.pending = stagedWrite{}
}
