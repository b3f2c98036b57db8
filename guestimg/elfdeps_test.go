package guestimg

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestResolveIn(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(root, "lib/x86_64-linux-gnu"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(root, "lib/x86_64-linux-gnu/libc.so.6"), nil, 0o644))
	require.NoError(t, os.Mkdir(filepath.Join(root, "lib64"), 0o755))
	// Debian's loader link is absolute; inside root it must stay inside root.
	require.NoError(t, os.Symlink("/lib/x86_64-linux-gnu/libc.so.6", filepath.Join(root, "lib64/abs")))
	require.NoError(t, os.Symlink("../lib/x86_64-linux-gnu/libc.so.6", filepath.Join(root, "lib64/rel")))
	require.NoError(t, os.Symlink("lib", filepath.Join(root, "usrlib")))
	require.NoError(t, os.Symlink("../../../../../lib64/rel", filepath.Join(root, "lib64/escape")))
	require.NoError(t, os.Symlink("loop", filepath.Join(root, "loop")))

	tests := []struct {
		in, want string
		wantErr  bool
	}{
		{in: "/lib64/abs", want: "/lib/x86_64-linux-gnu/libc.so.6"},
		{in: "/lib64/rel", want: "/lib/x86_64-linux-gnu/libc.so.6"},
		{in: "/usrlib/x86_64-linux-gnu/libc.so.6", want: "/lib/x86_64-linux-gnu/libc.so.6"},
		{in: "/lib64/escape", want: "/lib/x86_64-linux-gnu/libc.so.6"},
		{in: "/loop", wantErr: true},
		{in: "/nosuch", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := resolveIn(root, tt.in)
			if tt.wantErr {
				assert.Error(t, err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}

// The host's /bin/ls is dynamically linked against glibc; its closure has
// the loader and libc, every file exists, and nothing repeats.
func TestELFClosureHostLs(t *testing.T) {
	t.Parallel()
	deps, err := elfClosure("/", []string{"/bin/ls"})
	require.NoError(t, err)
	require.NotEmpty(t, deps)
	assert.Equal(t, "/bin/ls", deps[0].Path)
	var names []string
	seen := map[string]bool{}
	for _, d := range deps {
		assert.False(t, seen[d.Path], "duplicate %s", d.Path)
		seen[d.Path] = true
		fi, err := os.Stat(d.Real)
		require.NoError(t, err)
		assert.True(t, fi.Mode().IsRegular(), d.Real)
		names = append(names, filepath.Base(d.Path))
	}
	assert.Contains(t, names, "libc.so.6")
	assert.Contains(t, names, "ld-linux-x86-64.so.2")
}

func TestELFClosureMissingLibrary(t *testing.T) {
	t.Parallel()
	// A root that has the program but none of its libraries.
	root := t.TempDir()
	require.NoError(t, os.Mkdir(filepath.Join(root, "bin"), 0o755))
	b, err := os.ReadFile("/bin/ls")
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(root, "bin/ls"), b, 0o755))
	_, err = elfClosure(root, []string{"/bin/ls"})
	assert.Error(t, err)
}
