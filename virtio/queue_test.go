package virtio

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/vmm/guestmem"
)

const ringBase = 0x10000

func TestQueueCheck(t *testing.T) {
	mem := newTestMem(t)
	tests := []struct {
		name              string
		size              uint16
		desc, avail, used guestmem.GPA
		ok                bool
	}{
		{"good", 256, 0x1000, 0x2000, 0x3000, true},
		{"small", 1, 0x1000, 0x2000, 0x3000, true},
		{"size zero", 0, 0x1000, 0x2000, 0x3000, false},
		{"size not power of two", 100, 0x1000, 0x2000, 0x3000, false},
		{"size too big", 512, 0x1000, 0x2000, 0x3000, false},
		{"desc misaligned", 8, 0x1008, 0x2000, 0x3000, false},
		{"avail misaligned", 8, 0x1000, 0x2001, 0x3000, false},
		{"used misaligned", 8, 0x1000, 0x2000, 0x3002, false},
		{"desc outside memory", 256, 1<<20 - 0x800, 0x2000, 0x3000, false},
		{"used past the end", 8, 0x1000, 0x2000, 1<<20 - 8, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := NewQueue(mem, tt.size, tt.desc, tt.avail, tt.used).Check()
			assert.Equal(t, tt.ok, err == nil, "err %v", err)
		})
	}
}

func TestChainHappyPaths(t *testing.T) {
	t.Run("direct", func(t *testing.T) {
		mem := newTestMem(t)
		g := newGuestRing(t, mem, ringBase, 8)
		q := g.queue()
		require.NoError(t, q.Check())
		head := g.add(gbuf{0x40000, 16, false}, gbuf{0x41000, 0, false}, gbuf{0x42000, 512, true}, gbuf{0x43000, 1, true})
		var c Chain
		ok, err := q.Pop(&c)
		require.NoError(t, err)
		require.True(t, ok)
		assert.Equal(t, head, c.Head)
		assert.Equal(t, []Buffer{{0x40000, 16, false}, {0x42000, 512, true}, {0x43000, 1, true}}, c.Bufs,
			"zero-length descriptor counted but not returned")
		assert.Equal(t, uint64(16), c.ReadLen)
		assert.Equal(t, uint64(513), c.WriteLen)
		assert.Equal(t, 4, c.Descs)
		ok, err = q.Pop(&c)
		require.NoError(t, err)
		assert.False(t, ok, "ring empty")
	})
	t.Run("indirect", func(t *testing.T) {
		mem := newTestMem(t)
		g := newGuestRing(t, mem, ringBase, 4)
		q := g.queue()
		g.addIndirect(gbuf{0x40000, 16, false}, gbuf{0x41000, 4096, false}, gbuf{0x43000, 1, true})
		var c Chain
		ok, err := q.Pop(&c)
		require.NoError(t, err)
		require.True(t, ok)
		assert.Equal(t, []Buffer{{0x40000, 16, false}, {0x41000, 4096, false}, {0x43000, 1, true}}, c.Bufs)
		assert.Equal(t, 4, c.Descs)
	})
	t.Run("indirect longer than the queue", func(t *testing.T) {
		mem := newTestMem(t)
		g := newGuestRing(t, mem, ringBase, 2)
		q := g.queue()
		var bufs []gbuf
		for i := range 10 {
			bufs = append(bufs, gbuf{uint64(0x40000 + i*0x100), 0x100, false})
		}
		g.addIndirect(bufs...)
		var c Chain
		ok, err := q.Pop(&c)
		require.NoError(t, err)
		require.True(t, ok)
		assert.Len(t, c.Bufs, 10)
	})
	t.Run("wrap of the 16-bit indices", func(t *testing.T) {
		mem := newTestMem(t)
		g := newGuestRing(t, mem, ringBase, 4)
		q := g.queue()
		// Start both sides just below the 16-bit wrap.
		g.availIdx, g.usedSeen = 0xfffe, 0xfffe
		q.SetIndices(0xfffe, 0xfffe)
		putU16(t, mem, g.used+2, 0xfffe)
		putU16(t, mem, g.avail+2, 0xfffe)
		var c Chain
		for i := range 5 {
			head := g.add(gbuf{uint64(0x40000 + i*0x1000), 64, true})
			ok, err := q.Pop(&c)
			require.NoError(t, err)
			require.True(t, ok)
			require.Equal(t, head, c.Head)
			require.NoError(t, q.Push(c.Head, 64))
			id, n, ok := g.takeUsed()
			require.True(t, ok)
			assert.Equal(t, uint32(head), id)
			assert.Equal(t, uint32(64), n)
		}
		la, ui := q.Indices()
		assert.Equal(t, uint16(3), la)
		assert.Equal(t, uint16(3), ui)
	})
	t.Run("full ring", func(t *testing.T) {
		mem := newTestMem(t)
		g := newGuestRing(t, mem, ringBase, 4)
		q := g.queue()
		for i := range 4 {
			g.add(gbuf{uint64(0x40000 + i*0x1000), 64, true})
		}
		var c Chain
		for range 4 {
			ok, err := q.Pop(&c)
			require.NoError(t, err)
			require.True(t, ok)
		}
		q.Unpop(2)
		ok, err := q.Pop(&c)
		require.NoError(t, err)
		require.True(t, ok)
		assert.Equal(t, uint16(2), c.Head, "unpopped chain comes back")
	})
}

func TestPushMarksDirty(t *testing.T) {
	mem := newTestMem(t)
	g := newGuestRing(t, mem, ringBase, 8)
	q := g.queue()
	g.add(gbuf{0x40000, 64, true})
	var c Chain
	_, err := q.Pop(&c)
	require.NoError(t, err)
	r := mem.Regions()[0]
	r.HarvestVMMDirty(make([]uint64, r.BitmapWords())) // forget the test's own writes
	require.NoError(t, q.Push(c.Head, 10))
	bm := make([]uint64, r.BitmapWords())
	r.HarvestVMMDirty(bm)
	page := uint64(g.used) / guestmem.PageSize
	assert.NotZero(t, bm[page/64]&(1<<(page%64)), "used ring page marked dirty")
	assert.Equal(t, uint16(1), g.usedIdx())
}

func TestChainMalformed(t *testing.T) {
	const size = 8
	tests := []struct {
		name   string
		build  func(t *testing.T, g *guestRing)
		reason error
	}{
		{"avail idx too far ahead", func(t *testing.T, g *guestRing) {
			putU16(t, g.mem, g.avail+2, size+1)
		}, ErrAvailIdx},
		{"head index out of range", func(t *testing.T, g *guestRing) {
			g.publish(size)
		}, ErrHeadIndex},
		{"next index out of range", func(t *testing.T, g *guestRing) {
			putDesc(t, g.mem, g.desc, 0, desc{addr: 0x40000, len: 8, flags: descFNext, next: size})
			g.publish(0)
		}, ErrNextIndex},
		{"loop", func(t *testing.T, g *guestRing) {
			putDesc(t, g.mem, g.desc, 0, desc{addr: 0x40000, len: 8, flags: descFNext, next: 1})
			putDesc(t, g.mem, g.desc, 1, desc{addr: 0x40000, len: 8, flags: descFNext, next: 0})
			g.publish(0)
		}, ErrChainTooLong},
		{"self loop", func(t *testing.T, g *guestRing) {
			putDesc(t, g.mem, g.desc, 3, desc{addr: 0x40000, len: 8, flags: descFNext, next: 3})
			g.publish(3)
		}, ErrChainTooLong},
		{"buffer past the end of memory", func(t *testing.T, g *guestRing) {
			putDesc(t, g.mem, g.desc, 0, desc{addr: 1<<20 - 4, len: 8})
			g.publish(0)
		}, ErrBufferRange},
		{"buffer address wraps", func(t *testing.T, g *guestRing) {
			putDesc(t, g.mem, g.desc, 0, desc{addr: ^uint64(0) - 2, len: 8})
			g.publish(0)
		}, ErrBufferRange},
		{"total length over the cap", func(t *testing.T, g *guestRing) {
			for i := uint16(0); i < size; i++ {
				putDesc(t, g.mem, g.desc, i, desc{addr: 0, len: 1 << 20, flags: descFNext, next: i + 1})
			}
			putDesc(t, g.mem, g.desc, size-1, desc{addr: 0, len: ^uint32(0)})
			g.publish(0)
		}, ErrChainBytes},
		{"readable after writable", func(t *testing.T, g *guestRing) {
			putDesc(t, g.mem, g.desc, 0, desc{addr: 0x40000, len: 8, flags: descFNext | descFWrite, next: 1})
			putDesc(t, g.mem, g.desc, 1, desc{addr: 0x41000, len: 8})
			g.publish(0)
		}, ErrReadAfterWrite},
		{"indirect length not a multiple of 16", func(t *testing.T, g *guestRing) {
			putDesc(t, g.mem, g.desc, 0, desc{addr: 0x50000, len: 24, flags: descFIndirect})
			g.publish(0)
		}, ErrIndirectLen},
		{"indirect length zero", func(t *testing.T, g *guestRing) {
			putDesc(t, g.mem, g.desc, 0, desc{addr: 0x50000, len: 0, flags: descFIndirect})
			g.publish(0)
		}, ErrIndirectLen},
		{"indirect table too long", func(t *testing.T, g *guestRing) {
			putDesc(t, g.mem, g.desc, 0, desc{addr: 0x50000, len: (MaxIndirectDescs + 1) * descSize, flags: descFIndirect})
			g.publish(0)
		}, ErrIndirectLen},
		{"indirect table outside memory", func(t *testing.T, g *guestRing) {
			putDesc(t, g.mem, g.desc, 0, desc{addr: 1<<20 - 16, len: 32, flags: descFIndirect})
			g.publish(0)
		}, ErrBufferRange},
		{"nested indirect", func(t *testing.T, g *guestRing) {
			putDesc(t, g.mem, g.desc, 0, desc{addr: 0x50000, len: 32, flags: descFIndirect})
			putDesc(t, g.mem, 0x50000, 0, desc{addr: 0x40000, len: 8, flags: descFNext, next: 1})
			putDesc(t, g.mem, 0x50000, 1, desc{addr: 0x51000, len: 16, flags: descFIndirect})
			g.publish(0)
		}, ErrNestedIndirect},
		{"indirect with next", func(t *testing.T, g *guestRing) {
			putDesc(t, g.mem, g.desc, 0, desc{addr: 0x50000, len: 16, flags: descFIndirect | descFNext, next: 1})
			putDesc(t, g.mem, 0x50000, 0, desc{addr: 0x40000, len: 8})
			g.publish(0)
		}, ErrIndirectNext},
		{"loop inside indirect table", func(t *testing.T, g *guestRing) {
			putDesc(t, g.mem, g.desc, 0, desc{addr: 0x50000, len: 32, flags: descFIndirect})
			putDesc(t, g.mem, 0x50000, 0, desc{addr: 0x40000, len: 8, flags: descFNext, next: 1})
			putDesc(t, g.mem, 0x50000, 1, desc{addr: 0x40000, len: 8, flags: descFNext, next: 0})
			g.publish(0)
		}, ErrChainTooLong},
		{"next out of indirect table", func(t *testing.T, g *guestRing) {
			putDesc(t, g.mem, g.desc, 0, desc{addr: 0x50000, len: 32, flags: descFIndirect})
			putDesc(t, g.mem, 0x50000, 0, desc{addr: 0x40000, len: 8, flags: descFNext, next: 2})
			g.publish(0)
		}, ErrNextIndex},
		{"readable after writable in indirect table", func(t *testing.T, g *guestRing) {
			putDesc(t, g.mem, g.desc, 0, desc{addr: 0x41000, len: 8, flags: descFNext | descFWrite, next: 1})
			putDesc(t, g.mem, g.desc, 1, desc{addr: 0x50000, len: 16, flags: descFIndirect})
			putDesc(t, g.mem, 0x50000, 0, desc{addr: 0x40000, len: 8})
			g.publish(0)
		}, ErrReadAfterWrite},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mem := newTestMem(t)
			g := newGuestRing(t, mem, ringBase, size)
			q := g.queue()
			require.NoError(t, q.Check())
			tt.build(t, g)
			var c Chain
			ok, err := q.Pop(&c)
			assert.False(t, ok)
			assert.ErrorIs(t, err, tt.reason)
			var ce *ChainError
			assert.ErrorAs(t, err, &ce)
			la, _ := q.Indices()
			assert.Equal(t, uint16(0), la, "lastAvail not advanced on error")
		})
	}
}
