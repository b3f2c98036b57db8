package virtio

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/require"

	"govmm/vmm/guestmem"
)

// Test-only guest side of a split virtqueue: it writes descriptors and
// rings into guest memory the way a driver would.

// desc is one descriptor as a test driver writes it.
type desc struct {
	addr  uint64
	len   uint32
	flags uint16
	next  uint16
}

func putDesc(t testing.TB, mem *guestmem.Memory, table guestmem.GPA, i uint16, d desc) {
	t.Helper()
	var b [descSize]byte
	binary.LittleEndian.PutUint64(b[0:], d.addr)
	binary.LittleEndian.PutUint32(b[8:], d.len)
	binary.LittleEndian.PutUint16(b[12:], d.flags)
	binary.LittleEndian.PutUint16(b[14:], d.next)
	require.NoError(t, mem.WriteAt(b[:], table+guestmem.GPA(i)*descSize))
}

func putU16(t testing.TB, mem *guestmem.Memory, gpa guestmem.GPA, v uint16) {
	t.Helper()
	var b [2]byte
	binary.LittleEndian.PutUint16(b[:], v)
	require.NoError(t, mem.WriteAt(b[:], gpa))
}

func getU16(t testing.TB, mem *guestmem.Memory, gpa guestmem.GPA) uint16 {
	t.Helper()
	var b [2]byte
	require.NoError(t, mem.ReadAt(b[:], gpa))
	return binary.LittleEndian.Uint16(b[:])
}

func getU32(t testing.TB, mem *guestmem.Memory, gpa guestmem.GPA) uint32 {
	t.Helper()
	var b [4]byte
	require.NoError(t, mem.ReadAt(b[:], gpa))
	return binary.LittleEndian.Uint32(b[:])
}

// gbuf is a guest buffer in a chain the test driver posts.
type gbuf struct {
	addr  uint64
	len   uint32
	write bool
}

// guestRing is the driver's view of one queue.
type guestRing struct {
	t                 testing.TB
	mem               *guestmem.Memory
	size              uint16
	desc, avail, used guestmem.GPA
	indir             guestmem.GPA // scratch area for indirect tables
	nextDesc          uint16
	availIdx          uint16
	usedSeen          uint16
}

// newGuestRing lays a queue out at base: descriptors, then avail, then
// used, each page-aligned, and 64 KiB of indirect tables after them.
func newGuestRing(t testing.TB, mem *guestmem.Memory, base guestmem.GPA, size uint16) *guestRing {
	return &guestRing{t: t, mem: mem, size: size,
		desc: base, avail: base + 0x1000, used: base + 0x2000, indir: base + 0x4000}
}

// add posts a direct chain and publishes it; it returns the head.
func (g *guestRing) add(bufs ...gbuf) uint16 {
	g.t.Helper()
	head := g.nextDesc
	for i, b := range bufs {
		idx := (head + uint16(i)) % g.size
		d := desc{addr: b.addr, len: b.len, next: (idx + 1) % g.size}
		if b.write {
			d.flags |= descFWrite
		}
		if i < len(bufs)-1 {
			d.flags |= descFNext
		}
		putDesc(g.t, g.mem, g.desc, idx, d)
	}
	g.nextDesc = (head + uint16(len(bufs))) % g.size
	g.publish(head)
	return head
}

// addIndirect posts a chain as one indirect descriptor.
func (g *guestRing) addIndirect(bufs ...gbuf) uint16 {
	g.t.Helper()
	head := g.nextDesc
	table := g.indir + guestmem.GPA(head)*0x100
	for i, b := range bufs {
		d := desc{addr: b.addr, len: b.len, next: uint16(i + 1)}
		if b.write {
			d.flags |= descFWrite
		}
		if i < len(bufs)-1 {
			d.flags |= descFNext
		}
		putDesc(g.t, g.mem, table, uint16(i), d)
	}
	putDesc(g.t, g.mem, g.desc, head, desc{addr: uint64(table), len: uint32(len(bufs)) * descSize, flags: descFIndirect})
	g.nextDesc = (head + 1) % g.size
	g.publish(head)
	return head
}

func (g *guestRing) publish(head uint16) {
	putU16(g.t, g.mem, g.avail+4+2*guestmem.GPA(g.availIdx%g.size), head)
	g.availIdx++
	putU16(g.t, g.mem, g.avail+2, g.availIdx)
}

// usedIdx reads the device's used idx.
func (g *guestRing) usedIdx() uint16 { return getU16(g.t, g.mem, g.used+2) }

// takeUsed returns the next used element, if any.
func (g *guestRing) takeUsed() (id, n uint32, ok bool) {
	if g.usedIdx() == g.usedSeen {
		return 0, 0, false
	}
	slot := g.used + 4 + guestmem.GPA(g.usedSeen%g.size)*usedElemSize
	g.usedSeen++
	return getU32(g.t, g.mem, slot), getU32(g.t, g.mem, slot+4), true
}

func (g *guestRing) queue() *Queue {
	return NewQueue(g.mem, g.size, g.desc, g.avail, g.used)
}

func newTestMem(t testing.TB) *guestmem.Memory {
	t.Helper()
	mem, err := guestmem.New([]guestmem.Spec{{GPA: 0, Size: 1 << 20}})
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })
	return mem
}
