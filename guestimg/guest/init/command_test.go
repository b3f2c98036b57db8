package main

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"syscall"
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
