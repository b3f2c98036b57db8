package guestrig

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

func TestEpoch(t *testing.T) {
	t.Setenv("GOVMM_TEST_EPOCH", "")
	t.Setenv("GOVMM_LAB", "")
	assert.Zero(t, Epoch(), "outside the lab: the default")
	assert.Empty(t, EpochArgs())

	t.Setenv("GOVMM_LAB", "1")
	assert.Equal(t, LabEpoch, Epoch(), "in the lab")
	assert.Equal(t, []string{"--epoch", "200ms"}, EpochArgs())

	t.Setenv("GOVMM_TEST_EPOCH", "75ms")
	assert.Equal(t, 75*time.Millisecond, Epoch(), "the environment wins, in the lab too")
	assert.Equal(t, []string{"--epoch", "75ms"}, EpochArgs())

	for _, bad := range []string{"200", "fast", "-5ms", "0s"} {
		t.Setenv("GOVMM_TEST_EPOCH", bad)
		assert.Panics(t, func() { Epoch() }, "GOVMM_TEST_EPOCH=%q", bad)
	}
}
