package stream

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestStagingSink(t *testing.T) {
	mem := map[GPA][]byte{}
	dest := pageWriterFunc(func(p []byte, gpa GPA) error { mem[gpa] = bytes.Clone(p); return nil })
	s := &StagingSink{Dest: dest}

	// Initial sync: straight to memory, nothing resumable to protect yet.
	require.NoError(t, s.Begin(1, KindInitialSync))
	require.NoError(t, s.StagePage(0, page(1)))
	assert.Equal(t, page(1), mem[0])
	require.NoError(t, s.Commit())

	// An epoch is staged until commit, and an abort leaves memory alone.
	require.NoError(t, s.Begin(2, KindEpoch))
	require.NoError(t, s.StagePage(0, page(2)))
	require.NoError(t, s.StagePage(PageSize, nil))
	assert.Equal(t, page(1), mem[0])
	require.NoError(t, s.Commit())
	assert.Equal(t, page(2), mem[0])
	assert.Equal(t, make([]byte, PageSize), mem[PageSize])

	require.NoError(t, s.Begin(3, KindEpoch))
	require.NoError(t, s.StagePage(0, page(3)))
	s.Abort()
	assert.Equal(t, page(2), mem[0])
}

// flatMem is memory a sink can read in place; it counts the writes.
type flatMem struct {
	b      []byte
	writes int
}

func (m *flatMem) WriteAt(p []byte, gpa GPA) error { m.writes++; copy(m.b[gpa:], p); return nil }
func (m *flatMem) Slice(gpa GPA, n uint64) ([]byte, error) {
	return m.b[gpa : uint64(gpa)+n], nil
}

// A zero page is written only over a page that is not zero already, in
// initial sync (fresh memory stays untouched) and on commit alike.
func TestStagingSinkSkipsZeroOverZero(t *testing.T) {
	mem := &flatMem{b: make([]byte, 4*PageSize)}
	s := &StagingSink{Dest: mem}
	require.NoError(t, s.Begin(1, KindInitialSync))
	require.NoError(t, s.StagePage(0, nil))
	require.NoError(t, s.StagePage(PageSize, page(1)))
	require.NoError(t, s.Commit())
	assert.Equal(t, 1, mem.writes, "only the non-zero page was written")

	require.NoError(t, s.Begin(2, KindEpoch))
	require.NoError(t, s.StagePage(PageSize, nil))   // over page(1): written
	require.NoError(t, s.StagePage(2*PageSize, nil)) // over zeros: skipped
	require.NoError(t, s.Commit())
	assert.Equal(t, 2, mem.writes)
	assert.Equal(t, make([]byte, 4*PageSize), mem.b)
}

type pageWriterFunc func(p []byte, gpa GPA) error

func (f pageWriterFunc) WriteAt(p []byte, gpa GPA) error { return f(p, gpa) }
