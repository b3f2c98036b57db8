package virtio

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"govmm/vmm/guestmem"
)

var updateSeeds = flag.Bool("update-seeds", false, "rewrite testdata/fuzz/FuzzChainWalk seed files")

// Fuzz memory: two regions with a hole between them, so buffers that
// straddle a region end or land in the hole are exercised.
var fuzzSpecs = []guestmem.Spec{{GPA: 0, Size: 0x8000}, {GPA: 0x10000, Size: 0x8000}}

// fuzzLayout places a queue of 2^(b0%9) entries compactly at the start of
// guest memory: descriptors at 0, then the avail ring, then the used ring.
// The fuzz input is b0, two bytes of initial lastAvail, then the bytes of
// guest memory from address 0.
func fuzzLayout(b0 byte) (size uint16, desc, avail, used guestmem.GPA) {
	size = 1 << (b0 % 9)
	avail = guestmem.GPA(descSize * uint64(size))
	used = (avail + 6 + 2*guestmem.GPA(size) + 3) &^ 3
	return size, 0, avail, used
}

func FuzzChainWalk(f *testing.F) {
	mem, err := guestmem.New(fuzzSpecs)
	if err != nil {
		f.Fatal(err)
	}
	defer mem.Close()
	region := mem.Regions()[0]
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < 3 {
			return
		}
		size, desc, avail, used := fuzzLayout(data[0])
		start := uint16(data[1]) | uint16(data[2])<<8
		clear(region.Host)
		copy(region.Host, data[3:])
		q := NewQueue(mem, size, desc, avail, used)
		require.NoError(t, q.Check())
		q.SetIndices(start, start)
		var c Chain
		for range int(size) + 1 {
			ok, err := q.Pop(&c)
			if err != nil {
				var ce *ChainError
				require.True(t, errors.As(err, &ce), "error %v is not a *ChainError", err)
				return
			}
			if !ok {
				return
			}
			require.Less(t, c.Head, size)
			var r, w uint64
			seenW := false
			for _, b := range c.Bufs {
				require.NotZero(t, b.Len)
				require.True(t, mem.Contains(b.GPA, uint64(b.Len)), "buffer %#x+%#x outside memory", b.GPA, b.Len)
				require.False(t, !b.Write && seenW, "readable after writable")
				seenW = seenW || b.Write
				if b.Write {
					w += uint64(b.Len)
				} else {
					r += uint64(b.Len)
				}
			}
			require.Equal(t, r, c.ReadLen)
			require.Equal(t, w, c.WriteLen)
			require.LessOrEqual(t, r+w, uint64(MaxChainBytes))
			require.LessOrEqual(t, c.Descs, int(size)+MaxIndirectDescs)
			require.NoError(t, q.Push(c.Head, uint32(w)))
		}
		t.Fatalf("popped more than %d chains from a ring of %d", size+1, size)
	})
}

// fuzzSeeds builds the seed inputs: each a queue of 8 entries in the
// fuzz layout with one or two chains.
func fuzzSeeds(t *testing.T) map[string][]byte {
	const b0 = 3 // size 8
	size, descT, avail, _ := fuzzLayout(b0)
	build := func(fill func(mem *guestmem.Memory, g *guestRing)) []byte {
		mem, err := guestmem.New(fuzzSpecs)
		require.NoError(t, err)
		defer mem.Close()
		g := &guestRing{t: t, mem: mem, size: size, desc: descT, avail: avail, indir: 0x400}
		fill(mem, g)
		host := mem.Regions()[0].Host
		n := len(host)
		for n > 0 && host[n-1] == 0 {
			n--
		}
		return append([]byte{b0, 0, 0}, host[:n]...)
	}
	return map[string][]byte{
		"direct": build(func(_ *guestmem.Memory, g *guestRing) {
			g.add(gbuf{0x1000, 16, false}, gbuf{0x1100, 512, true}, gbuf{0x1400, 1, true})
			g.add(gbuf{0x10000, 1514, false})
		}),
		"indirect": build(func(_ *guestmem.Memory, g *guestRing) {
			g.addIndirect(gbuf{0x1000, 16, false}, gbuf{0x10000, 4096, true}, gbuf{0x1400, 1, true})
		}),
		"loop": build(func(mem *guestmem.Memory, g *guestRing) {
			putDesc(t, mem, g.desc, 0, desc{addr: 0x1000, len: 8, flags: descFNext, next: 1})
			putDesc(t, mem, g.desc, 1, desc{addr: 0x1000, len: 8, flags: descFNext, next: 0})
			g.publish(0)
		}),
		"straddle": build(func(mem *guestmem.Memory, g *guestRing) {
			putDesc(t, mem, g.desc, 0, desc{addr: 0x7ff0, len: 0x20})
			g.publish(0)
		}),
		"nested-indirect": build(func(mem *guestmem.Memory, g *guestRing) {
			putDesc(t, mem, g.desc, 0, desc{addr: 0x400, len: 32, flags: descFIndirect})
			putDesc(t, mem, 0x400, 0, desc{addr: 0x1000, len: 8, flags: descFNext, next: 1})
			putDesc(t, mem, 0x400, 1, desc{addr: 0x500, len: 16, flags: descFIndirect})
			g.publish(0)
		}),
		"read-after-write": build(func(_ *guestmem.Memory, g *guestRing) {
			g.add(gbuf{0x1000, 8, true}, gbuf{0x1100, 8, false})
		}),
	}
}

// TestFuzzSeeds keeps the committed corpus in step with fuzzSeeds; run
// with -update-seeds to rewrite it.
func TestFuzzSeeds(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzChainWalk")
	for name, b := range fuzzSeeds(t) {
		want := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)
		path := filepath.Join(dir, name)
		if *updateSeeds {
			require.NoError(t, os.MkdirAll(dir, 0o755))
			require.NoError(t, os.WriteFile(path, []byte(want), 0o644))
			continue
		}
		got, err := os.ReadFile(path)
		require.NoError(t, err, "run go test -run TestFuzzSeeds -update-seeds")
		require.Equal(t, want, string(got), "seed %s is stale; run with -update-seeds", name)
	}
}
