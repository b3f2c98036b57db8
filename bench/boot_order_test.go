package bench

import (
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Every run boots each peer once; who goes first rotates; and no peer
// always follows the same one.
func TestBootOrder(t *testing.T) {
	for _, n := range []int{1, 2, 5} {
		before := make([]map[int]bool, n) // peer -> the peers that booted just before it
		for p := range before {
			before[p] = map[int]bool{}
		}
		var first []int
		for run := 1; run <= n; run++ {
			order := make([]int, n)
			for i := range n {
				order[i] = bootOrder(run, i, n)
				if i > 0 {
					before[order[i]][order[i-1]] = true
				}
			}
			first = append(first, order[0])
			sorted := slices.Clone(order)
			slices.Sort(sorted)
			for p := range n {
				require.Equal(t, p, sorted[p], "run %d of %d peers boots each once: %v", run, n, order)
			}
		}
		slices.Sort(first)
		for p := range n {
			assert.Equal(t, p, first[p], "in %d runs each of %d peers goes first once", n, n)
		}
		if n > 2 {
			for p, b := range before {
				assert.Greater(t, len(b), 1, "peer %d of %d follows more than one peer", p, n)
			}
		}
	}
}
