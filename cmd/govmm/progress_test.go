package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// On a terminal the bar redraws one line in place and ends it at finish;
// elsewhere a quick transfer prints one line at finish, with what moved
// and the rate; a bar that saw no update says nothing.
func TestTransferBar(t *testing.T) {
	t.Parallel()
	var tty bytes.Buffer
	b := newTransferBar(&tty, true, "initial sync")
	b.update(16<<20, 64<<20, "disks")
	b.update(64<<20, 64<<20, "round 2: pages dirtied meanwhile")
	b.finish()
	b.finish()
	out := tty.String()
	require.True(t, strings.HasPrefix(out, "\rinitial sync [=======>"), "%q", out)
	assert.Contains(t, out, " 25%  16 MiB / 64 MiB  - /s, disks\x1b[K", "the first update is drawn at once, with its note")
	assert.Contains(t, out, "\x1b[K\rinitial sync [==============================] 100%  64 MiB / 64 MiB  ")
	assert.True(t, strings.HasSuffix(out, "/s\x1b[K\n"), "the last state drawn without its note: %q", out)
	assert.Equal(t, 1, strings.Count(out, "\n"), "one line, ended once")

	// A log line in the middle ends the bar's line; the bar goes on below.
	tty.Reset()
	b = newTransferBar(&tty, true, "package download")
	b.update(1<<20, 2<<20, "")
	_, err := b.interleave().Write([]byte("guestimg: downloading linux-image\n"))
	require.NoError(t, err)
	b.update(2<<20, 2<<20, "")
	b.finish()
	lines := strings.Split(tty.String(), "\n")
	require.Len(t, lines, 4, "%q", tty.String())
	assert.Contains(t, lines[0], " 50%  1 MiB / 2 MiB")
	assert.Equal(t, "guestimg: downloading linux-image", lines[1])
	assert.Contains(t, lines[2], "100%  2 MiB / 2 MiB")
	assert.Empty(t, lines[3])

	var log bytes.Buffer
	b = newTransferBar(&log, false, "download")
	b.update(1<<20, 3<<20, "")
	b.update(3<<20, 3<<20, "waiting")
	b.finish()
	assert.Regexp(t, `^govmm: download: 3 MiB in \S+ \(\d+(\.\d+)? [KMGT]iB/s\)\n$`, log.String())

	var none bytes.Buffer
	newTransferBar(&none, false, "download").finish()
	assert.Empty(t, none.String())
}
