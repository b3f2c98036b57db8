package virtio

import (
	"encoding/binary"
	"errors"
	"fmt"

	"govmm/vmm/guestmem"
)

// Split virtqueue layout (virtio 1.x §2.7). All fields are little-endian
// and every one of them is written by the guest, so every one is checked
// before use. Guest memory is decoded field by field with encoding/binary;
// no Go struct is ever overlaid on it.
const (
	descSize     = 16 // struct virtq_desc: addr u64, len u32, flags u16, next u16
	usedElemSize = 8  // struct virtq_used_elem: id u32, len u32

	descFNext     = 1 // VIRTQ_DESC_F_NEXT
	descFWrite    = 2 // VIRTQ_DESC_F_WRITE
	descFIndirect = 4 // VIRTQ_DESC_F_INDIRECT

	availFNoInterrupt = 1 // VIRTQ_AVAIL_F_NO_INTERRUPT

	// MaxQueueSize is the largest queue size a device offers. The driver
	// may choose a smaller power of two.
	MaxQueueSize = 256

	// MaxIndirectDescs caps the entries of one indirect table. Linux sizes
	// indirect tables by the request's segment count (virtio-blk: seg_max+2),
	// which may exceed a small queue size, so this cap is independent of it.
	MaxIndirectDescs = 1024

	// MaxChainBytes caps the sum of buffer lengths in one chain. A real
	// request (blk: seg_max*size_max, net: a 64 KiB TSO frame) stays far
	// below it.
	MaxChainBytes = 64 << 20
)

// Reasons a chain or a ring is malformed. ChainError.Reason is one of them,
// so callers and tests can use errors.Is.
var (
	ErrAvailIdx       = errors.New("avail idx ran more than the queue size ahead")
	ErrHeadIndex      = errors.New("head index out of range")
	ErrNextIndex      = errors.New("next index out of range")
	ErrChainTooLong   = errors.New("descriptor chain longer than its table (loop)")
	ErrBufferRange    = errors.New("buffer outside guest memory")
	ErrChainBytes     = errors.New("chain longer than the byte cap")
	ErrReadAfterWrite = errors.New("device-readable descriptor after a device-writable one")
	ErrIndirectLen    = errors.New("bad indirect table length")
	ErrNestedIndirect = errors.New("indirect descriptor inside an indirect table")
	ErrIndirectNext   = errors.New("indirect descriptor with the next flag")
	ErrRingRange      = errors.New("ring outside guest memory")
)

// ChainError reports a malformed chain or ring: Reason is one of the Err*
// sentinels above and Head the chain's head index (or the avail ring slot
// for ErrAvailIdx and ErrHeadIndex).
type ChainError struct {
	Reason error
	Head   uint16
}

func (e *ChainError) Error() string {
	return fmt.Sprintf("virtqueue chain %d: %v", e.Head, e.Reason)
}

// Unwrap returns Reason.
func (e *ChainError) Unwrap() error { return e.Reason }

// Buffer is one guest buffer of a chain. A zero-length descriptor is
// counted but produces no Buffer.
type Buffer struct {
	GPA   guestmem.GPA
	Len   uint32
	Write bool // device-writable
}

// Chain is one descriptor chain taken from the avail ring: its readable
// buffers first, then its writable ones.
type Chain struct {
	Head     uint16
	Bufs     []Buffer
	ReadLen  uint64 // sum of readable buffer lengths
	WriteLen uint64 // sum of writable buffer lengths
	Descs    int    // descriptors visited, direct and indirect
}

func (c *Chain) reset(head uint16) {
	c.Head = head
	c.Bufs = c.Bufs[:0]
	c.ReadLen, c.WriteLen, c.Descs = 0, 0, 0
}

// Queue is a split virtqueue as the device sees it. Its fields are set by
// the transport while the device is stopped and otherwise used by one
// goroutine at a time (the device worker); see pci.go.
type Queue struct {
	mem *guestmem.Memory

	Size              uint16 // a power of two, 1..MaxQueueSize
	Desc, Avail, Used guestmem.GPA

	lastAvail uint16 // next avail ring slot the device will take
	usedIdx   uint16 // the used idx the device last published
	pushed    bool   // used entries were added since the last interrupt
}

// NewQueue returns a queue over mem with the given layout. Call Check
// before using it.
func NewQueue(mem *guestmem.Memory, size uint16, desc, avail, used guestmem.GPA) *Queue {
	return &Queue{mem: mem, Size: size, Desc: desc, Avail: avail, Used: used}
}

// Check validates the layout the driver chose: the size is a power of two
// no larger than MaxQueueSize, the three areas are aligned as §2.7 asks
// and lie inside guest memory.
func (q *Queue) Check() error {
	if q.Size == 0 || q.Size > MaxQueueSize || q.Size&(q.Size-1) != 0 {
		return fmt.Errorf("virtqueue size %d: not a power of two up to %d", q.Size, MaxQueueSize)
	}
	n := uint64(q.Size)
	areas := []struct {
		name  string
		gpa   guestmem.GPA
		size  uint64
		align uint64
	}{
		{"descriptor table", q.Desc, descSize * n, 16},
		{"avail ring", q.Avail, 6 + 2*n, 2},
		{"used ring", q.Used, 6 + usedElemSize*n, 4},
	}
	for _, a := range areas {
		if uint64(a.gpa)%a.align != 0 {
			return fmt.Errorf("virtqueue %s at %#x: not %d-byte aligned", a.name, uint64(a.gpa), a.align)
		}
		if !q.mem.Contains(a.gpa, a.size) {
			return fmt.Errorf("virtqueue %s at %#x+%#x: %w", a.name, uint64(a.gpa), a.size, ErrRingRange)
		}
	}
	return nil
}

// Indices returns the device's ring positions (for device state).
func (q *Queue) Indices() (lastAvail, usedIdx uint16) { return q.lastAvail, q.usedIdx }

// SetIndices restores the device's ring positions.
func (q *Queue) SetIndices(lastAvail, usedIdx uint16) { q.lastAvail, q.usedIdx = lastAvail, usedIdx }

func (q *Queue) u16(gpa guestmem.GPA) (uint16, error) {
	var b [2]byte
	if err := q.mem.ReadAt(b[:], gpa); err != nil {
		return 0, &ChainError{Reason: ErrRingRange, Head: 0}
	}
	return binary.LittleEndian.Uint16(b[:]), nil
}

// availIdx reads avail->idx and checks that it is at most Size ahead of
// lastAvail. It returns how many chains are waiting.
func (q *Queue) pending() (uint16, error) {
	idx, err := q.u16(q.Avail + 2)
	if err != nil {
		return 0, err
	}
	n := idx - q.lastAvail // 16-bit arithmetic: wrap-around is fine
	if n > q.Size {
		return 0, &ChainError{Reason: ErrAvailIdx, Head: q.lastAvail}
	}
	return n, nil
}

// Pop takes the next available chain into c. It returns false when the
// ring is empty, and a *ChainError when the ring or the chain is malformed
// (the transport then marks the device broken). On an error lastAvail is
// not advanced.
func (q *Queue) Pop(c *Chain) (bool, error) {
	n, err := q.pending()
	if err != nil || n == 0 {
		return false, err
	}
	head, err := q.u16(q.Avail + 4 + 2*guestmem.GPA(q.lastAvail%q.Size))
	if err != nil {
		return false, err
	}
	if err := q.walk(head, c); err != nil {
		return false, err
	}
	q.lastAvail++
	return true, nil
}

// Unpop gives back the last n chains taken by Pop and not yet pushed, so
// they are taken again later (virtio-net when a frame did not fit).
func (q *Queue) Unpop(n uint16) { q.lastAvail -= n }

// walk follows the chain starting at descriptor head. Every index, length,
// address and flag combination is checked (see the Err* reasons).
func (q *Queue) walk(head uint16, c *Chain) error {
	c.reset(head)
	fail := func(reason error) error { return &ChainError{Reason: reason, Head: head} }
	if head >= q.Size {
		return fail(ErrHeadIndex)
	}
	var (
		table   = q.Desc    // current descriptor table
		entries = q.Size    // its number of entries
		i       = head      // current index in it
		visited = 0         // descriptors visited in this table
		inIndir = false     // walking an indirect table
		seenW   = false     // a writable descriptor was seen
		total   = uint64(0) // sum of lengths
		raw     [descSize]byte
	)
	for {
		visited++
		c.Descs++
		if visited > int(entries) {
			return fail(ErrChainTooLong)
		}
		if err := q.mem.ReadAt(raw[:], table+guestmem.GPA(i)*descSize); err != nil {
			// The direct table was checked at enable and an indirect one
			// before entering it; this is a defence in depth.
			return fail(ErrRingRange)
		}
		addr := binary.LittleEndian.Uint64(raw[0:])
		length := binary.LittleEndian.Uint32(raw[8:])
		flags := binary.LittleEndian.Uint16(raw[12:])
		next := binary.LittleEndian.Uint16(raw[14:])

		if flags&descFIndirect != 0 {
			if inIndir {
				return fail(ErrNestedIndirect)
			}
			if flags&descFNext != 0 {
				return fail(ErrIndirectNext)
			}
			if length == 0 || length%descSize != 0 || length/descSize > MaxIndirectDescs {
				return fail(ErrIndirectLen)
			}
			if !q.mem.Contains(guestmem.GPA(addr), uint64(length)) {
				return fail(ErrBufferRange)
			}
			// §2.7.5.3.1: the device ignores the write flag here.
			table, entries, i, visited, inIndir = guestmem.GPA(addr), uint16(length/descSize), 0, 0, true
			continue
		}

		write := flags&descFWrite != 0
		if !write && seenW {
			return fail(ErrReadAfterWrite)
		}
		seenW = seenW || write
		total += uint64(length)
		if total > MaxChainBytes {
			return fail(ErrChainBytes)
		}
		if length > 0 {
			if !q.mem.Contains(guestmem.GPA(addr), uint64(length)) {
				return fail(ErrBufferRange)
			}
			c.Bufs = append(c.Bufs, Buffer{GPA: guestmem.GPA(addr), Len: length, Write: write})
			if write {
				c.WriteLen += uint64(length)
			} else {
				c.ReadLen += uint64(length)
			}
		}
		if flags&descFNext == 0 {
			return nil
		}
		if next >= entries {
			return fail(ErrNextIndex)
		}
		i = next
	}
}

// Push returns chain head to the driver with written bytes in its
// writable buffers: the used element first, then used->idx, both through
// the dirty-marking accessor. Go has no weaker ordering to fear here
// (stores from one goroutine are not reordered as seen by another thread
// on amd64, and the guest reads idx before the element).
func (q *Queue) Push(head uint16, written uint32) error {
	var el [usedElemSize]byte
	binary.LittleEndian.PutUint32(el[0:], uint32(head))
	binary.LittleEndian.PutUint32(el[4:], written)
	slot := q.Used + 4 + guestmem.GPA(q.usedIdx%q.Size)*usedElemSize
	if err := q.mem.WriteAt(el[:], slot); err != nil {
		return &ChainError{Reason: ErrRingRange, Head: head}
	}
	q.usedIdx++
	var idx [2]byte
	binary.LittleEndian.PutUint16(idx[:], q.usedIdx)
	if err := q.mem.WriteAt(idx[:], q.Used+2); err != nil {
		return &ChainError{Reason: ErrRingRange, Head: head}
	}
	q.pushed = true
	return nil
}

// takeInterrupt reports whether the driver should be interrupted for used
// entries pushed since the last call: something was pushed and the driver
// did not set VIRTQ_AVAIL_F_NO_INTERRUPT (§2.7.7; without EVENT_IDX this
// flag is the only suppression).
func (q *Queue) takeInterrupt() bool {
	if !q.pushed {
		return false
	}
	q.pushed = false
	flags, err := q.u16(q.Avail)
	return err != nil || flags&availFNoInterrupt == 0
}
