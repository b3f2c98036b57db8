package main

import (
	"fmt"
	"os"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseCommand(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		in   string
		want []string
	}{
		{"empty file", "", nil},
		{"one", "nproc\x00", []string{"nproc"}},
		{"sh -c", "sh\x00-c\x00echo a b\x00", []string{"sh", "-c", "echo a b"}},
		{"empty argument kept", "printf\x00\x00", []string{"printf", ""}},
		{"missing last NUL", "true", []string{"true"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, parseCommand([]byte(tt.in)))
		})
	}
}

func TestExitStatus(t *testing.T) {
	t.Parallel()
	// wait(2) encoding: exit code in bits 8..15, terminating signal in 0..6.
	assert.Equal(t, 0, exitStatus(syscall.WaitStatus(0)))
	assert.Equal(t, 7, exitStatus(syscall.WaitStatus(7<<8)))
	assert.Equal(t, 255, exitStatus(syscall.WaitStatus(255<<8)))
	assert.Equal(t, 128+9, exitStatus(syscall.WaitStatus(syscall.SIGKILL)))
	assert.Equal(t, 128+15, exitStatus(syscall.WaitStatus(syscall.SIGTERM)))
	assert.Equal(t, "exited with status 7", describe(syscall.WaitStatus(7<<8)))
	assert.Equal(t, "was killed by signal 9 (killed)", describe(syscall.WaitStatus(syscall.SIGKILL)))
}

// A slow step's note stays off command mode's console, whose bytes are
// the command's alone (a CI run in the lab once found "demo service:
// nothing listening ... after 3s" in front of a command's output), and
// goes to the kernel log there instead; interactively it is on the
// console.
func TestSlowNoteOffCommandModeConsole(t *testing.T) {
	t.Parallel()
	for _, cmdMode := range []bool{false, true} {
		console, err := os.CreateTemp(t.TempDir(), "console")
		require.NoError(t, err)
		defer console.Close()
		var logged []string
		in := &initProc{console: console, cmdMode: cmdMode,
			kernelLog: func(level int, msg string) { logged = append(logged, fmt.Sprintf("<%d>%s", level, msg)) }}
		in.slowf("demo service: %v; waiting", "slow")
		out, err := os.ReadFile(console.Name())
		require.NoError(t, err)
		if cmdMode {
			assert.Empty(t, string(out), "command mode's console")
			assert.Equal(t, []string{"<4>govmm-init: demo service: slow; waiting"}, logged, "in the kernel log, below the console's level")
		} else {
			assert.Equal(t, "govmm-init: demo service: slow; waiting\n", string(out))
			assert.Empty(t, logged)
		}
	}
}
