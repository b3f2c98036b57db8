package replicate

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// The copy mode defaults to auto and its threshold to DefaultCoWPages; a
// threshold given is kept, one below a page refused.
func TestConfigCopyDefaults(t *testing.T) {
	t.Parallel()
	cfg, err := ReplicateConfig{}.withDefaults()
	require.NoError(t, err)
	require.Equal(t, CopyAuto, cfg.Copy)
	require.Equal(t, DefaultCoWPages, cfg.CoWPages)

	cfg, err = ReplicateConfig{Copy: CopyStop, CoWPages: 100}.withDefaults()
	require.NoError(t, err)
	require.Equal(t, CopyStop, cfg.Copy)
	require.Equal(t, 100, cfg.CoWPages)

	_, err = ReplicateConfig{CoWPages: -1}.withDefaults()
	require.EqualError(t, err, "checkpoint cow-pages -1: must be at least 1")
	_, err = ReplicateConfig{Copy: "fast"}.withDefaults()
	require.Error(t, err)
}
