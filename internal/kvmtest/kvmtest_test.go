package kvmtest

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A recorded skip names the package's directory and the top-level test,
// one whole line each, however many tests append at once.
func TestRecordSkip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "skips")
	t.Setenv(SkipsEnv, path)
	wd, err := os.Getwd()
	require.NoError(t, err)
	wd, err = filepath.EvalSymlinks(wd)
	require.NoError(t, err)
	t.Run("sub/deeper", func(t *testing.T) { recordSkip(t) })
	var wg sync.WaitGroup
	for i := range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t.Run(fmt.Sprint("par", i), func(t *testing.T) { recordSkip(t) })
		}()
	}
	wg.Wait()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	require.Len(t, lines, 51)
	for _, l := range lines {
		assert.Equal(t, wd+"\tTestRecordSkip", l)
	}
}

// Without SkipsEnv nothing is written anywhere.
func TestRecordSkipUnset(t *testing.T) {
	t.Setenv(SkipsEnv, "")
	t.Chdir(t.TempDir())
	recordSkip(t)
	entries, err := os.ReadDir(".")
	require.NoError(t, err)
	assert.Empty(t, entries)
}
