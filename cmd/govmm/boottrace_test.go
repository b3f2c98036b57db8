package main

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The boot trace splits the VMM setup at run's steps; unknown steps give
// their time to the next one.
func TestSetupSteps(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	require.Equal(t, " (of the vmm setup: 80.0 ms exec and the Go runtime's start, 20.0 ms mapping the kernel and initramfs, "+
		"150.0 ms creating the machine and its devices, 250.0 ms loading the guest into memory, 50.0 ms setting up the vCPUs)",
		setupSteps(t0, at(80), at(100), at(250), at(500), at(550)))
	require.Equal(t, " (of the vmm setup: 80.0 ms exec and the Go runtime's start, "+
		"420.0 ms loading the guest into memory, 50.0 ms setting up the vCPUs)",
		setupSteps(t0, at(80), time.Time{}, time.Time{}, at(500), at(550)), "files and starting unknown")
	require.Empty(t, setupSteps(t0, at(80), at(100), at(250), at(500), time.Time{}), "never released")
	require.Empty(t, setupSteps(t0, time.Time{}, time.Time{}, time.Time{}, time.Time{}, at(550)), "one step is no split")
}
